"""Overlap and surface-distance metrics against analytic values and a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from seg_densenet.evaluation.metrics import (
    METRIC_NAMES,
    aggregate,
    dice,
    iou,
    label_metrics,
    structure_metrics,
    surface,
)

SPACING = (1.5, 1.5, 8.0)  # typical short-axis cine MRI: fine in-plane, thick slices


def _box(shape, start, size) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size))] = True
    return mask


def _reference(pred: np.ndarray, gt: np.ndarray, spacing) -> dict[str, float]:
    """Brute force: explicit 6-neighbour surfaces and all pairwise distances (MedPy's definitions)."""

    def surface_points(mask):
        padded = np.pad(mask, 1)
        inner = padded[1:-1, 1:-1, 1:-1]
        all_neighbours_in = np.ones_like(mask)
        for axis in range(3):
            for shift in (-1, 1):
                all_neighbours_in &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(inner & ~all_neighbours_in) * np.asarray(spacing)

    p, g = surface_points(pred), surface_points(gt)
    dist = cdist(p, g)
    d_pg, d_gp = dist.min(axis=1), dist.min(axis=0)
    pooled = np.concatenate([d_pg, d_gp])
    return {
        "dice": 2 * (pred & gt).sum() / (pred.sum() + gt.sum()),
        "iou": (pred & gt).sum() / (pred | gt).sum(),
        "hd_mm": pooled.max(),
        "hd95_mm": np.percentile(pooled, 95),
        "assd_mm": (d_pg.mean() + d_gp.mean()) / 2,
    }


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_boxes_offset_along_an_axis(axis: int, offset: int) -> None:
    size = [16, 14, 6]
    shape = (40, 40, 16)
    start = [10, 10, 4]
    gt = _box(shape, start, size)
    moved = list(start)
    moved[axis] += offset
    pred = _box(shape, moved, size)
    m = structure_metrics(pred, gt, SPACING)
    length = size[axis]
    assert m["dice"] == pytest.approx(1 - offset / length, abs=1e-12)
    assert m["iou"] == pytest.approx((length - offset) / (length + offset), abs=1e-12)
    # the faces perpendicular to the shift are offset x spacing apart; nothing is further
    assert m["hd_mm"] == pytest.approx(offset * SPACING[axis], abs=1e-9)
    assert 0 < m["assd_mm"] <= m["hd95_mm"] <= m["hd_mm"]


def test_spheres_offset_match_the_lens_formula() -> None:
    # a physical sphere of radius r on an anisotropic grid, shifted by d mm along x
    spacing = (1.0, 1.0, 2.0)
    r, d = 12.0, 4.0
    x, y, z = np.meshgrid(*(np.arange(n) * s for n, s in zip((48, 48, 24), spacing)), indexing="ij")
    centre = np.array([22.0, 24.0, 24.0])
    gt = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= r**2
    pred = (x - centre[0] - d) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= r**2
    m = structure_metrics(pred, gt, spacing)
    lens = math.pi * (4 * r + d) * (2 * r - d) ** 2 / 12  # volume of the overlap of two spheres
    assert m["dice"] == pytest.approx(lens / (4 / 3 * math.pi * r**3), abs=0.02)
    # the far pole of one sphere is d from the other sphere's surface; discretisation costs < a voxel
    assert m["hd_mm"] == pytest.approx(d, abs=max(spacing))


@pytest.mark.parametrize("seed", range(4))
def test_parity_with_brute_force_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (18, 16, 6)
    spacing = (1.37, 1.52, 7.0)

    def blob():
        noise = ndimage.gaussian_filter(rng.random(shape), sigma=(2.5, 2.5, 0.8))
        return noise > np.quantile(noise, 0.6)  # blobs that touch the array border too

    pred, gt = blob(), blob()
    got = structure_metrics(pred, gt, spacing)
    want = _reference(pred, gt, spacing)
    for name in METRIC_NAMES:
        assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-9), name
    # symmetric in prediction and ground truth
    swapped = structure_metrics(gt, pred, spacing)
    for name in METRIC_NAMES:
        assert swapped[name] == pytest.approx(got[name], rel=1e-12), name


def test_hd95_pools_both_directions() -> None:
    # a small prediction inside a large ground truth: the pooled 95th percentile differs from the
    # maximum of the two directed 95th percentiles, so this pins down which one is computed
    gt = _box((30, 30, 5), (2, 2, 0), (26, 26, 5))
    pred = _box((30, 30, 5), (4, 4, 0), (6, 6, 5))
    spacing = (1.0, 1.0, 1.0)
    m = structure_metrics(pred, gt, spacing)
    want = _reference(pred, gt, spacing)
    assert m["hd95_mm"] == pytest.approx(want["hd95_mm"])


def test_ground_truth_against_itself_is_perfect() -> None:
    gt = _box((20, 20, 8), (3, 4, 1), (9, 7, 5))
    assert structure_metrics(gt, gt.copy(), SPACING) == {
        "dice": 1.0,
        "iou": 1.0,
        "hd_mm": 0.0,
        "hd95_mm": 0.0,
        "assd_mm": 0.0,
    }


def test_empty_mask_conventions() -> None:
    empty = np.zeros((10, 10, 4), bool)
    full = _box((10, 10, 4), (2, 2, 1), (3, 3, 2))
    assert structure_metrics(empty, empty, SPACING) == {
        "dice": 1.0,
        "iou": 1.0,
        "hd_mm": 0.0,
        "hd95_mm": 0.0,
        "assd_mm": 0.0,
    }
    for pred, gt in ((empty, full), (full, empty)):
        m = structure_metrics(pred, gt, SPACING)
        assert m["dice"] == 0.0 and m["iou"] == 0.0
        assert all(math.isnan(m[k]) for k in ("hd_mm", "hd95_mm", "assd_mm"))


def test_surface_of_a_box_is_its_shell() -> None:
    mask = _box((8, 8, 8), (1, 1, 1), (5, 5, 5))
    assert surface(mask).sum() == 5**3 - 3**3
    # voxels on the array border are surface voxels (outside counts as background)
    assert surface(np.ones((4, 4, 4), bool)).sum() == 4**3 - 2**3


def test_label_metrics_and_aggregate() -> None:
    gt = np.zeros((20, 20, 4), np.int64)
    gt[2:8, 2:8] = 1
    gt[10:16, 10:16] = 3
    pred = gt.copy()
    pred[10:16, 10:16] = 0  # LV missed entirely
    result = label_metrics(pred, gt, SPACING, {"RV": 1, "MYO": 2, "LV": 3})
    assert list(result) == ["RV", "MYO", "LV"]
    assert result["RV"]["dice"] == 1.0
    assert result["MYO"]["dice"] == 1.0 and result["MYO"]["hd_mm"] == 0.0  # absent in both
    assert result["LV"]["dice"] == 0.0 and math.isnan(result["LV"]["hd_mm"])
    assert dice(pred == 1, gt == 1) == iou(pred == 1, gt == 1) == 1.0

    agg = aggregate([1.0, float("nan"), 3.0])
    assert agg["mean"] == 2.0 and agg["n"] == 2 and agg["n_total"] == 3
    assert agg["std"] == pytest.approx(np.std([1.0, 3.0], ddof=1))
    assert math.isnan(aggregate([float("nan")])["mean"])


def test_shape_and_spacing_mismatch_raise() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        structure_metrics(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool), SPACING)
    with pytest.raises(ValueError, match="spacing"):
        structure_metrics(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool), (1.0, 1.0))
