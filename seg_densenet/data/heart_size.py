"""How large a heart is in the pixels of a grid, and the zoom that brings a scan's heart into the range
of sizes a model was trained on.

A network trained on one scanner's pixel size meets hearts of other pixel sizes at other scales:
after the same preprocessing, a scan with 0.7x the pixel size shows its heart 1.4x larger. Where the
headers can be trusted, resampling to a common grid removes that; where they cannot (the lent ACDC copy
says 1 mm for pixels of 1.4 to 1.7 mm, so its models train on the native grid), the heart itself is
the ruler. The training split's heart sizes are stored in the checkpoint
(:func:`size_percentiles`), and the predictor measures each volume's heart in a first pass and zooms
the slices so that it falls within a band of those percentiles (:func:`zoom_into_band`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

PERCENTILES = tuple(range(0, 101, 5))
"""The percentiles of the training heart sizes kept in a checkpoint record (``heart_size``)."""
SLICE_PERCENTILE = 75
"""The slice area that sizes a heart: the 75th percentile over its slices, so that the few small
apical and basal slices, and the slice count, do not change it."""


def heart_size(mask: np.ndarray) -> float | None:
    """Size of the heart in a label map ``(S, H, W)`` (S slices; any label > 0 is heart): the square root
    of the 75th percentile of the per-slice foreground area, in pixels (about the heart's diameter).
    ``None`` when no slice holds any foreground."""
    areas = (np.asarray(mask) > 0).reshape(mask.shape[0], -1).sum(1)
    areas = areas[areas > 0]
    if areas.size == 0:
        return None
    return float(np.sqrt(np.percentile(areas, SLICE_PERCENTILE)))


def size_percentiles(masks: Iterable[np.ndarray]) -> dict | None:
    """The checkpoint record's ``heart_size`` of training label maps ``(S, H, W)``:
    ``{"percentiles": [0, 5, ..., 100], "pixels": [...], "n_volumes": N}``; ``None`` without foreground."""
    sizes = [size for size in map(heart_size, masks) if size is not None]
    if not sizes:
        return None
    return {
        "percentiles": list(PERCENTILES),
        "pixels": [round(float(v), 2) for v in np.percentile(sizes, PERCENTILES)],
        "n_volumes": len(sizes),
    }


def size_at(stats: Mapping, percentile: float) -> float:
    """The training heart size (pixels) at ``percentile`` (0-100) of a record's ``heart_size``."""
    return float(np.interp(percentile, stats["percentiles"], stats["pixels"]))


def zoom_into_band(
    size: float | None, stats: Mapping, band: Sequence[float], limits: Sequence[float]
) -> float:
    """In-plane zoom that brings a heart of ``size`` pixels into the band ``(low, high)`` of training
    percentiles (to the nearer edge; 1.0 inside it, or when nothing was found), kept within ``limits``."""
    if size is None or size <= 0:
        return 1.0
    low, high = (size_at(stats, p) for p in band)
    zoom = float(np.clip(size, low, high)) / size
    return float(np.clip(zoom, *limits))
