"""Inference parts: the predictor (:mod:`.predictor`), test-time augmentation (:mod:`.tta`), the slice
axis of a volume (:mod:`.geometry`) and post-processing (:mod:`.postprocess`); the prediction CLI and
file handling are :mod:`seg_densenet.predict`."""
