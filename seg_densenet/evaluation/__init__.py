"""Evaluation of cardiac segmentations as the ACDC challenge reported it (Bernard et al., IEEE TMI 2018).

- :mod:`~seg_densenet.evaluation.metrics`: Dice, IoU, HD, HD95 and ASSD (mm) per structure, with the
  empty-mask conventions;
- :mod:`~seg_densenet.evaluation.clinical`: volumes (ml), ejection fractions (%), myocardial mass (g)
  and prediction-vs-truth agreement (correlation, bias, limits of agreement);
- :mod:`~seg_densenet.evaluation.cases`: ACDC-layout ground truth, ``Info.cfg`` phases and matching
  of ``<stem>_pred.nii.gz`` predictions;
- :mod:`~seg_densenet.evaluation.report` and :mod:`~seg_densenet.evaluation.plots`: the CSV, JSON,
  Markdown and PNG outputs of ``python -m seg_densenet.evaluate``.
"""

from seg_densenet.evaluation.clinical import agreement, clinical_indices, structure_volumes_ml
from seg_densenet.evaluation.metrics import aggregate, label_metrics, structure_metrics

__all__ = [
    "aggregate",
    "agreement",
    "clinical_indices",
    "label_metrics",
    "structure_metrics",
    "structure_volumes_ml",
]
