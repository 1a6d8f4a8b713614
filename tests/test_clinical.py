"""Clinical indices (volumes, EF, mass) and agreement statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from seg_densenet.data.labels import ACDC_STRUCTURES
from seg_densenet.evaluation.clinical import (
    INDEX_NAMES,
    MYOCARDIUM_DENSITY_G_PER_ML,
    agreement,
    clinical_indices,
    ejection_fraction,
    structure_volumes_ml,
)

SPACING = (1.5, 1.5, 8.0)  # 18 mm^3 per voxel


def _heart(lv: tuple[int, int, int], rv: tuple[int, int, int], myo_slices: int) -> np.ndarray:
    """A label map holding an LV box, an RV box and a myocardium slab of known voxel counts."""
    labels = np.zeros((40, 40, 12), np.int64)
    labels[: lv[0], : lv[1], : lv[2]] = ACDC_STRUCTURES["LV"]
    labels[20 : 20 + rv[0], 20 : 20 + rv[1], : rv[2]] = ACDC_STRUCTURES["RV"]
    labels[:10, 30:40, :myo_slices] = ACDC_STRUCTURES["MYO"]
    return labels


def test_volumes_from_voxel_count_and_spacing() -> None:
    labels = _heart(lv=(10, 8, 4), rv=(5, 5, 2), myo_slices=3)
    ml = structure_volumes_ml(labels, SPACING)
    assert ml["LV"] == pytest.approx(320 * 18 / 1000)  # 5.76 ml
    assert ml["RV"] == pytest.approx(50 * 18 / 1000)
    assert ml["MYO"] == pytest.approx(300 * 18 / 1000)
    # the same voxels at another spacing scale with the voxel volume
    assert structure_volumes_ml(labels, (1.0, 1.0, 1.0))["LV"] == pytest.approx(0.32)


def test_clinical_indices_of_an_ed_es_pair() -> None:
    ed = _heart(lv=(10, 10, 5), rv=(10, 10, 4), myo_slices=4)
    es = _heart(lv=(10, 10, 2), rv=(10, 10, 3), myo_slices=6)
    got = clinical_indices(ed, es, SPACING)
    assert list(got) == list(INDEX_NAMES)
    assert got["LV_EDV_ml"] == pytest.approx(500 * 0.018)
    assert got["LV_ESV_ml"] == pytest.approx(200 * 0.018)
    assert got["LV_EF_pct"] == pytest.approx(60.0)
    assert got["RV_EF_pct"] == pytest.approx(25.0)
    # mass from the ED myocardium only
    assert got["MYO_mass_g"] == pytest.approx(400 * 0.018 * MYOCARDIUM_DENSITY_G_PER_ML)
    assert MYOCARDIUM_DENSITY_G_PER_ML == 1.05
    # other label values (M&Ms: 1 LV, 3 RV) through the mapping
    swapped = {"RV": 3, "MYO": 2, "LV": 1}
    remap = np.array([0, 3, 2, 1])
    assert clinical_indices(remap[ed], remap[es], SPACING, swapped) == pytest.approx(got)


def test_ejection_fraction_formula() -> None:
    assert ejection_fraction(150.0, 60.0) == pytest.approx(60.0)
    assert ejection_fraction(100.0, 100.0) == 0.0
    assert math.isnan(ejection_fraction(0.0, 0.0))


def test_agreement_matches_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    gt = rng.uniform(40, 70, size=25)
    pred = gt + rng.normal(1.5, 3.0, size=25)
    got = agreement(pred, gt)
    diff = pred - gt
    sd = np.std(diff, ddof=1)
    assert got["n"] == 25
    assert got["corr"] == pytest.approx(np.corrcoef(pred, gt)[0, 1])
    assert got["bias"] == pytest.approx(diff.mean())
    assert got["sd"] == pytest.approx(sd)
    assert got["loa"] == pytest.approx([diff.mean() - 1.96 * sd, diff.mean() + 1.96 * sd])


def test_agreement_drops_nan_pairs_and_handles_degenerate_input() -> None:
    got = agreement([1.0, float("nan"), 3.0, 5.0], [1.5, 2.0, float("nan"), 4.0])
    assert got["n"] == 2
    assert got["bias"] == pytest.approx(((1.0 - 1.5) + (5.0 - 4.0)) / 2)
    empty = agreement([], [])
    assert empty["n"] == 0 and math.isnan(empty["bias"])
    single = agreement([2.0], [1.0])
    assert single["bias"] == 1.0 and math.isnan(single["corr"]) and math.isnan(single["sd"])
    with pytest.raises(ValueError, match="lengths"):
        agreement([1.0], [1.0, 2.0])


def test_ejection_fraction_of_the_synthetic_phantom_matches_its_truth(tmp_path) -> None:
    synthetic = pytest.importorskip("seg_densenet.data.synthetic", reason="synthetic phantom not available")
    import json

    from seg_densenet.data.nifti import load_volume

    synthetic.generate_dataset(tmp_path, n_patients=3, seed=0)
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert len(truth) == 3
    for patient, values in truth.items():
        folder = tmp_path / patient
        ed = load_volume(folder / f"{patient}_frame{values['ED_frame']:02d}_gt.nii.gz", label=True)
        es = load_volume(folder / f"{patient}_frame{values['ES_frame']:02d}_gt.nii.gz", label=True)
        got = clinical_indices(ed.data, es.data, ed.spacing, es_spacing=es.spacing)
        for name in ("LV_EF_pct", "RV_EF_pct"):  # percentage points
            assert got[name] == pytest.approx(values[name], abs=1.0), (patient, name)
        for name in ("LV_EDV_ml", "LV_ESV_ml", "RV_EDV_ml", "RV_ESV_ml", "MYO_mass_g"):
            assert got[name] == pytest.approx(values[name], rel=0.01), (patient, name)
