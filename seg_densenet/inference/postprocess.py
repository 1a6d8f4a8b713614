"""Post-processing of predicted label maps."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_connected_components(labels: np.ndarray) -> np.ndarray:
    """Keep, for every structure, only its largest 3D connected component (26-connectivity)."""
    out = np.zeros_like(labels)
    structure = np.ones((3, 3, 3), dtype=bool)
    for value in np.unique(labels):
        if value == 0:
            continue
        components, n = ndimage.label(labels == value, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[components == sizes.argmax()] = value
    return out
