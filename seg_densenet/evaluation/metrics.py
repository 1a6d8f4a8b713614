"""Overlap and surface-distance metrics of 3D label maps, in physical units (mm).

Definitions follow the ACDC challenge (Bernard et al., IEEE TMI 2018), which computed its distances
with MedPy; every metric compares one structure (one label value) of a prediction ``P`` with the
ground truth ``G``, both boolean ``(X, Y, Z)`` masks on the same grid with voxel size ``spacing`` (mm):

- ``dice = 2 |P ∩ G| / (|P| + |G|)``, ``iou = |P ∩ G| / |P ∪ G|``.
- Surface voxels: the voxels of a mask that have at least one 6-connected neighbour outside it
  (``mask & ~binary_erosion(mask)``, with everything outside the array counted as background), as
  in MedPy's ``__surface_distances``.
- Directed surface distances ``d(P→G)``: for every surface voxel of ``P``, the Euclidean distance in
  mm (anisotropic spacing) to the nearest surface voxel of ``G``; likewise ``d(G→P)``.
- ``hd_mm`` (Hausdorff distance): ``max(max d(P→G), max d(G→P))``, the maximum symmetric surface
  distance.
- ``hd95_mm``: the 95th percentile (numpy's linear interpolation) of the *pooled* distances
  ``d(P→G) ∪ d(G→P)``, as MedPy's ``hd95``; not the maximum of the two directed 95th percentiles.
- ``assd_mm``: the mean of the two directed mean distances, ``(mean d(P→G) + mean d(G→P)) / 2``,
  as MedPy's ``assd``; not the mean of the pooled distances.

Empty masks (a structure absent from a slice stack, or a prediction that misses it):

- both empty: ``dice = iou = 1`` and all distances ``0`` (nothing to find, nothing found);
- exactly one empty: ``dice = iou = 0`` and all distances ``NaN`` (a distance to nothing is
  undefined; ``inf`` would swamp every mean). Aggregations therefore use ``nanmean``/``nanstd`` and
  report how many values were finite (:func:`aggregate`).

Distance maps are computed on the bounding box of ``P ∪ G`` grown by one voxel: every surface voxel
of both masks lies inside it, so the nearest-surface distances are exact and the Euclidean distance
transform runs on a small array instead of the whole field of view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "hd_mm", "hd95_mm", "assd_mm")
"""Keys of the dictionaries returned by :func:`structure_metrics`, in report order."""


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of two boolean masks of equal shape; ``1.0`` when both are empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union (Jaccard index) of two boolean masks; ``1.0`` when both are empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    union = int(np.logical_or(pred, gt).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, gt).sum()) / union


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the surface voxels of ``mask`` (those with a 6-connected background neighbour)."""
    mask = np.asarray(mask, bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    # border_value=0: voxels on the array border are surface voxels, as if the image were padded
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: ``(d(P→G), d(G→P))``, one value per surface voxel.

    Both masks must be non-empty. ``spacing`` is the voxel size per axis in mm.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if not pred.any() or not gt.any():
        raise ValueError("surface distances need two non-empty masks")
    box = _bounding_box(pred | gt, margin=1)
    pred, gt = pred[box], gt[box]
    surf_pred, surf_gt = surface(pred), surface(gt)
    sampling = [float(s) for s in spacing]
    # EDT of the complement gives, at every voxel, the distance to the nearest surface voxel
    to_gt = ndimage.distance_transform_edt(~surf_gt, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=sampling)
    return to_gt[surf_pred], to_pred[surf_gt]


def structure_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """All metrics of one structure: ``{"dice", "iou", "hd_mm", "hd95_mm", "assd_mm"}``.

    pred, gt: boolean masks of equal shape ``(X, Y, Z)``; spacing: voxel size in mm per axis.
    Empty-mask conventions are in the module docstring.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {pred.ndim}D mask")
    result = {"dice": dice(pred, gt), "iou": iou(pred, gt)}
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return result | {"hd_mm": 0.0, "hd95_mm": 0.0, "assd_mm": 0.0}
    if not has_pred or not has_gt:
        return result | {"hd_mm": float("nan"), "hd95_mm": float("nan"), "assd_mm": float("nan")}
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    pooled = np.concatenate([d_pg, d_gp])
    return result | {
        "hd_mm": float(pooled.max()),
        "hd95_mm": float(np.percentile(pooled, 95)),
        "assd_mm": float((d_pg.mean() + d_gp.mean()) / 2.0),
    }


def label_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], labels: Mapping[str, int]
) -> dict[str, dict[str, float]]:
    """Metrics per structure of two integer label maps: ``{name: structure_metrics(...)}``.

    labels: structure name to label value, e.g. ``{"RV": 1, "MYO": 2, "LV": 3}`` (ACDC).
    """
    return {name: structure_metrics(pred == value, gt == value, spacing) for name, value in labels.items()}


def aggregate(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, sample standard deviation (ddof=1) and count of the finite values; NaNs are skipped.

    Returns ``{"mean", "std", "n", "n_total"}``; mean/std are NaN when there are too few values.
    """
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    mean = float(finite.mean()) if finite.size else float("nan")
    std = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
    return {"mean": mean, "std": std, "n": int(finite.size), "n_total": int(arr.size)}


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the smallest box holding ``mask``, grown by ``margin`` voxels and clipped to the array."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)
