"""Whole cine stacks: a 4D series segmented into a 4D mask, volume-time curves, ED/ES and the cycle's
indices (seg_densenet/cine.py), on series built from the synthetic phantom's ED and ES frames."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from seg_densenet.cine import cycle_summary, ed_es_frames, volume_curves
from seg_densenet.data.labels import ACDC_STRUCTURES
from seg_densenet.errors import ConfigError
from seg_densenet.evaluation.clinical import clinical_indices
from seg_densenet.predict import predict_tree
from tests.conftest import run_cli

ED, ES, FRAMES = 2, 5, 8  # 0-based frame indexes of the known phases in the built series


def _series(synthetic_root, suffix: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    """A (X, Y, Z, 8) series of patient001: its ED frame at index 2, its ES frame at index 5, and
    in-between frames of the ED anatomy with the LV cavity one voxel thinner (volumes between)."""
    case = synthetic_root / "patient001"
    info = dict(line.split(": ") for line in (case / "Info.cfg").read_text().splitlines())
    ed_img = nib.load(case / f"patient001_frame{int(info['ED']):02d}{suffix}.nii.gz")
    es_img = nib.load(case / f"patient001_frame{int(info['ES']):02d}{suffix}.nii.gz")
    ed, es = np.asarray(ed_img.dataobj), np.asarray(es_img.dataobj)
    between = ed.copy()
    if suffix == "_gt":
        rim = (ed == 3) & ~ndimage.binary_erosion(ed == 3, iterations=1)
        between[rim] = 2
    frames = [ed if t == ED else es if t == ES else between for t in range(FRAMES)]
    return np.stack(frames, -1), ed_img


def test_ed_es_from_the_lv_curve_and_named_frames():
    lv = np.array([120.0, 140.0, 150.0, 110.0, 70.0, 60.0, 90.0, 150.0])
    assert ed_es_frames(lv) == (2, 5)  # the first of the two largest
    assert ed_es_frames(lv, [1, 6]) == (0, 5)
    with pytest.raises(
        ConfigError, match=r"cine_frames=\[0, 9\]: must be \[ED, ES\], frame numbers from 1 to 8"
    ):
        ed_es_frames(lv, [0, 9])


def test_curves_and_indices_of_a_ground_truth_series(synthetic_root):
    labels, ref = _series(synthetic_root, "_gt")
    spacing = ref.header.get_zooms()[:3]
    curves = volume_curves(labels, spacing, ACDC_STRUCTURES)
    assert curves["LV"].shape == (FRAMES,)
    assert ed_es_frames(curves["LV"]) == (ED, ES)
    summary = cycle_summary(curves, ED, ES, named=False)
    expected = clinical_indices(labels[..., ED], labels[..., ES], spacing)
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, abs=1e-3), key
    assert (summary["ED_frame"], summary["ES_frame"]) == (ED + 1, ES + 1)


def test_predict_segments_a_4d_series_into_a_4d_mask_with_its_cycle(trained_ckpt, synthetic_root, tmp_path):
    images, ref = _series(synthetic_root, "")
    header = ref.header.copy()
    header.set_data_shape(images.shape)
    header.set_zooms((*ref.header.get_zooms()[:3], 30.0))  # 30 ms per frame
    tree = tmp_path / "tree" / "patient001"
    tree.mkdir(parents=True)
    nib.save(nib.Nifti1Image(images.astype(np.float32), ref.affine, header), tree / "patient001_4d.nii.gz")
    nib.save(ref, tree / "patient001_frame01.nii.gz")  # a 3D frame beside it is predicted as before
    out = tmp_path / "pred"
    result = run_cli(
        [
            "-m",
            "seg_densenet.predict",
            f"ckpt={trained_ckpt}",
            f"input={tmp_path / 'tree'}",
            f"output={out}",
            "cine=true",
            "tta=false",
            "scales=[1.0]",
            # fp32 PyTorch: the frame-by-frame labels are compared voxel for voxel below, and bf16 (the
            # default on AMX CPUs) rounds a 4D frame and the same frame alone a little differently
            "precision=32",
            "backend=torch",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mask = nib.load(out / "patient001" / "patient001_4d_pred.nii.gz")
    assert mask.shape == images.shape and mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask.affine, ref.affine, atol=1e-6)
    np.testing.assert_allclose(mask.header.get_zooms(), header.get_zooms(), atol=1e-6)
    assert (out / "patient001" / "patient001_frame01_pred.nii.gz").is_file()
    with open(out / "patient001" / "patient001_4d_volumes.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["frame"]) for r in rows] == list(range(1, FRAMES + 1))
    lv = np.array([float(r["LV_ml"]) for r in rows])
    summary = json.loads((out / "patient001" / "patient001_4d_cine.json").read_text())
    # the predicted curve decides ED and ES, and the CSV says which rows they are
    assert (summary["ED_frame"] - 1, summary["ES_frame"] - 1) == ed_es_frames(lv)
    assert [r["phase"] for r in rows].count("ED") == 1 and summary["frames"] == FRAMES
    assert (out / "patient001" / "patient001_4d_volumes.png").stat().st_size > 5000
    # the same labels as predicting each frame on its own
    direct = np.asarray(nib.load(out / "patient001" / "patient001_frame01_pred.nii.gz").dataobj)
    np.testing.assert_array_equal(np.asarray(mask.dataobj)[..., ED], direct)

    # named frames: the user's ED and ES, whatever the curve says
    named = tmp_path / "named"
    predict_tree(trained_ckpt, tree / "patient001_4d.nii.gz", named, cine_frames=[4, 7], device="cpu")
    summary = json.loads((named / "patient001_4d_cine.json").read_text())
    assert (summary["ED_frame"], summary["ES_frame"]) == (4, 7) and summary["chosen_by"].startswith("user")
