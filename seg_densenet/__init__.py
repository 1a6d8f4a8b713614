"""seg_densenet: semantic segmentation of cardiac MRI with densely connected networks."""

__version__ = "0.1.0"
