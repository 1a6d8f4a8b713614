"""Cardiac MRI data: reading (``nifti``, ``acdc``), ``preprocess``ing, the preprocessed-volume
``cache``, patient ``splits``, augmentation (``transforms``), PyTorch ``datasets`` and Lightning
DataModules (``datamodule``).

Nothing is imported here, so that reading a NIfTI file does not pull in Lightning.
"""
