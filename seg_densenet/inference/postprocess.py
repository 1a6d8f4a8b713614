"""Post-processing of predicted label maps."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity in 3D


def largest_connected_components(labels: np.ndarray, within_heart: bool = True) -> np.ndarray:
    """Keep, for every structure, only its largest 3D connected component (26-connectivity).

    within_heart: choose among the structure's components inside the heart, the largest connected
    component of all structures together, and fall back to the largest overall only when none lies
    there. A false island larger than the true structure (a blob in the liver or the chest wall under
    a zoom the network has not seen) is then dropped instead of kept.
    """
    out = np.zeros_like(labels)
    heart = _largest(ndimage.label(labels > 0, structure=_CONNECTIVITY)[0]) if within_heart else None
    for value in np.unique(labels):
        if value == 0:
            continue
        components, n = ndimage.label(labels == value, structure=_CONNECTIVITY)
        if n == 0:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        keep = sizes.argmax()
        if heart is not None:
            # a structure's component lies wholly inside the heart or wholly outside it
            inside = np.unique(components[heart])
            inside = inside[inside > 0]
            if inside.size:
                keep = inside[sizes[inside].argmax()]
        out[components == keep] = value
    return out


def _largest(components: np.ndarray) -> np.ndarray | None:
    """The mask of the largest non-zero component of a component map, ``None`` if there is none."""
    sizes = np.bincount(components.ravel())
    if sizes.size < 2:
        return None
    sizes[0] = 0
    return components == sizes.argmax()
