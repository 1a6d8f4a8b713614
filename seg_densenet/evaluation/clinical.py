"""Clinical indices of the heart from an end-diastole / end-systole pair of label maps.

As reported by the ACDC challenge (Bernard et al., IEEE TMI 2018):

- cavity volumes in ml: ``voxel count x voxel volume (mm^3) / 1000``, at end-diastole (EDV) and
  end-systole (ESV), for the left (LV) and right (RV) ventricle;
- ejection fraction in %: ``EF = 100 x (EDV - ESV) / EDV`` (NaN when EDV is 0);
- myocardial mass in g at end-diastole: ``myocardium volume (ml) x 1.05 g/ml``.

Structures are found by name in a ``labels`` mapping (``{"RV": 1, "MYO": 2, "LV": 3}`` in ACDC; see
:mod:`seg_densenet.data.labels`); an index whose structure a label set lacks is left out. The voxel size
comes from each volume's header, never assumed.

:func:`agreement` compares a predicted index with the ground truth over patients the way the
challenge did: Pearson correlation, bias ``mean(pred - gt)`` and Bland-Altman limits of agreement
``bias ± 1.96 SD`` (SD of the differences, ddof=1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from seg_densenet.data.labels import ACDC_STRUCTURES, INDEX_STRUCTURES

MYOCARDIUM_DENSITY_G_PER_ML = 1.05
"""Density of myocardial tissue used for the mass (g/ml)."""

INDEX_NAMES: tuple[str, ...] = tuple(INDEX_STRUCTURES)
"""Keys of :func:`clinical_indices` (for a label set with LV, RV and MYO), in report order."""


def structure_volumes_ml(
    label_map: np.ndarray, spacing: Sequence[float], labels: Mapping[str, int] = ACDC_STRUCTURES
) -> dict[str, float]:
    """Volume in ml of every structure: ``{name: count(label_map == value) x prod(spacing) / 1000}``.

    label_map: integer ``(X, Y, Z)``; spacing: voxel size in mm.
    """
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    return {name: int(np.count_nonzero(label_map == value)) * voxel_ml for name, value in labels.items()}


def ejection_fraction(edv: float, esv: float) -> float:
    """Ejection fraction in %: ``100 (EDV - ESV) / EDV``; NaN when EDV is not positive."""
    if not edv > 0:
        return float("nan")
    return 100.0 * (edv - esv) / edv


def indices_from_volumes(ed_ml: Mapping[str, float], es_ml: Mapping[str, float]) -> dict[str, float]:
    """Clinical indices from structure volumes (ml) at ED and ES, keyed as :data:`INDEX_NAMES`.

    ed_ml, es_ml: ``{"LV": ml, "RV": ml, "MYO": ml}`` as returned by :func:`structure_volumes_ml`; the
    indices of a structure that is not there are left out (a left-ventricle-only label set gives LV's).
    """
    indices: dict[str, float] = {}
    for cavity in ("LV", "RV"):
        if cavity in ed_ml and cavity in es_ml:
            indices[f"{cavity}_EDV_ml"] = ed_ml[cavity]
            indices[f"{cavity}_ESV_ml"] = es_ml[cavity]
            indices[f"{cavity}_EF_pct"] = ejection_fraction(ed_ml[cavity], es_ml[cavity])
    if "MYO" in ed_ml:
        indices["MYO_mass_g"] = ed_ml["MYO"] * MYOCARDIUM_DENSITY_G_PER_ML
    return {name: indices[name] for name in INDEX_NAMES if name in indices}


def clinical_indices(
    ed: np.ndarray,
    es: np.ndarray,
    spacing: Sequence[float],
    labels: Mapping[str, int] = ACDC_STRUCTURES,
    es_spacing: Sequence[float] | None = None,
) -> dict[str, float]:
    """Clinical indices of one patient from its ED and ES label maps.

    ed, es: integer ``(X, Y, Z)`` label maps; spacing: ED voxel size in mm (``es_spacing`` defaults to
    it); labels: structure name -> label value. Returns ``{name: value}`` for the :data:`INDEX_NAMES` its
    structures allow (ml, %, g).
    """
    ed_ml = structure_volumes_ml(ed, spacing, labels)
    es_ml = structure_volumes_ml(es, spacing if es_spacing is None else es_spacing, labels)
    return indices_from_volumes(ed_ml, es_ml)


def agreement(pred: Sequence[float], gt: Sequence[float]) -> dict[str, float | int | list[float]]:
    """Agreement of predicted and ground-truth values of one index over patients.

    Pairs where either value is NaN are dropped. Returns ``{"corr", "bias", "sd", "loa", "n"}``:
    Pearson correlation (NaN with fewer than 2 pairs or no spread), bias ``mean(pred - gt)``, SD of
    the differences (ddof=1), limits of agreement ``[bias - 1.96 SD, bias + 1.96 SD]``, pair count.
    """
    pred_arr, gt_arr = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    if pred_arr.shape != gt_arr.shape:
        raise ValueError(f"pred and gt have different lengths: {pred_arr.shape} vs {gt_arr.shape}")
    keep = np.isfinite(pred_arr) & np.isfinite(gt_arr)
    pred_arr, gt_arr = pred_arr[keep], gt_arr[keep]
    n = int(pred_arr.size)
    nan = float("nan")
    if n == 0:
        return {"corr": nan, "bias": nan, "sd": nan, "loa": [nan, nan], "n": 0}
    diff = pred_arr - gt_arr
    bias = float(diff.mean())
    sd = float(diff.std(ddof=1)) if n > 1 else nan
    corr = nan
    if n > 1 and pred_arr.std() > 0 and gt_arr.std() > 0:
        corr = float(np.corrcoef(pred_arr, gt_arr)[0, 1])
    return {"corr": corr, "bias": bias, "sd": sd, "loa": [bias - 1.96 * sd, bias + 1.96 * sd], "n": n}
