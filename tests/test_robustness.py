"""The robustness report: shift invariants on real NIfTI files, and the real CLI on a tiny checkpoint."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from seg_densenet.data.nifti import load_volume
from seg_densenet.errors import ConfigError, DataError
from seg_densenet.robustness import (
    BIAS_AMPLITUDE,
    GEOMETRIC,
    NOISE_PERCENTILES,
    SHIFTS,
    check_shifts,
    find_cases,
)
from tests.conftest import run_cli

# oblique, anisotropic, translated: a permuted or flipped axis shows up in every affine entry
AFFINE = np.array([[0.0, -1.3, 0.2, 10.0], [1.2, 0.0, 0.1, -5.0], [0.0, 0.1, 8.0, 3.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (9, 7, 3)
VOXEL_SHIFTS = [name for name in GEOMETRIC if not name.startswith("spacing_")]
SPACING_SHIFTS = [name for name in GEOMETRIC if name.startswith("spacing_")]


@pytest.fixture()
def volumes(tmp_path):
    """An image whose voxel values are their flat indices, and a label map, read back from NIfTI files."""
    image = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:6, 1:5, :2] = 3
    labels[6:8, 2:4, 1:] = 1
    nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(labels, AFFINE), str(tmp_path / "img_gt.nii.gz"))
    return load_volume(tmp_path / "img.nii.gz"), load_volume(tmp_path / "img_gt.nii.gz", label=True)


def _world(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    return (affine @ np.vstack([index, np.ones(index.shape[1])]))[:3]


@pytest.mark.parametrize("name", VOXEL_SHIFTS)
def test_geometric_shift_keeps_every_voxels_world_coordinate(volumes, name):
    image, labels = volumes
    shifted = SHIFTS[name](image)
    # each voxel's value names its original index: the same voxel must sit at the same point in mm
    new_index = np.indices(shifted.shape).reshape(3, -1)
    old_index = np.array(np.unravel_index(shifted.data.ravel().astype(int), SHAPE))
    np.testing.assert_allclose(_world(shifted.affine, new_index), _world(image.affine, old_index), atol=1e-9)
    # the header says the same: zooms are the affine's column lengths, qform/sform the affine
    np.testing.assert_allclose(shifted.spacing, np.linalg.norm(shifted.affine[:3, :3], axis=0), rtol=1e-6)
    np.testing.assert_allclose(shifted.header.get_best_affine(), shifted.affine, atol=1e-5)
    shifted_labels = SHIFTS[name](labels, label=True)
    np.testing.assert_array_equal(shifted_labels.affine, shifted.affine)
    assert shifted_labels.data.dtype == labels.data.dtype
    assert image.data.shape == SHAPE  # pure: the input is untouched


def test_rot90_four_times_and_rot90_then_rot270_give_back_the_volume(volumes):
    image, _ = volumes
    once = SHIFTS["rot90"](image)
    assert once.shape == (SHAPE[1], SHAPE[0], SHAPE[2])
    for back in (
        SHIFTS["rot270"](once),
        SHIFTS["rot180"](SHIFTS["rot180"](image)),
        SHIFTS["rot90"](SHIFTS["rot90"](SHIFTS["rot90"](once))),
    ):
        np.testing.assert_array_equal(back.data, image.data)
        np.testing.assert_allclose(back.affine, image.affine, atol=1e-12)
        np.testing.assert_allclose(back.spacing, image.spacing)
    for flip in ("flip_lr", "flip_ud", "flip_slices"):
        twice = SHIFTS[flip](SHIFTS[flip](image))
        np.testing.assert_array_equal(twice.data, image.data)
        np.testing.assert_allclose(twice.affine, image.affine, atol=1e-12)


@pytest.mark.parametrize("name", SPACING_SHIFTS)
def test_spacing_shift_keeps_the_field_of_view_and_label_values(volumes, name):
    image, labels = volumes
    factor = float(name.split("_")[1])
    shifted, shifted_labels = SHIFTS[name](image), SHIFTS[name](labels, label=True)
    new_shape = tuple(round(n / factor) for n in SHAPE[:2]) + SHAPE[2:]
    assert shifted.shape == shifted_labels.shape == new_shape
    np.testing.assert_array_equal(shifted_labels.affine, shifted.affine)
    # the grid's outer pixel edges (index -0.5 and n - 0.5) stay at the same world points
    for corner_old, corner_new in (
        ([-0.5, -0.5], [-0.5, -0.5]),
        (np.array(SHAPE[:2]) - 0.5, np.array(new_shape[:2]) - 0.5),
    ):
        old = np.array([[*corner_old, 1.0]]).T
        new = np.array([[*corner_new, 1.0]]).T
        np.testing.assert_allclose(_world(shifted.affine, new), _world(image.affine, old), atol=1e-9)
    expected = [s * n / m for s, n, m in zip(image.spacing, SHAPE, new_shape)]
    np.testing.assert_allclose(shifted.spacing, expected, rtol=1e-6)
    np.testing.assert_allclose(shifted.spacing, np.linalg.norm(shifted.affine[:3, :3], axis=0), rtol=1e-6)
    assert set(np.unique(shifted_labels.data)) <= {0, 1, 3}  # nearest neighbour: no blended labels
    assert image.data.min() <= shifted.data.min() and shifted.data.max() <= image.data.max()  # linear


@pytest.mark.parametrize("name", [n for n in SHIFTS if n not in GEOMETRIC and n != "none"])
def test_intensity_shift_keeps_geometry_and_ground_truth_and_is_seeded(volumes, name):
    image, labels = volumes
    shifted = SHIFTS[name](image)
    assert SHIFTS[name](labels, label=True) is labels
    np.testing.assert_array_equal(shifted.affine, image.affine)
    assert shifted.shape == image.shape and shifted.data.dtype == np.float32
    assert not np.array_equal(shifted.data, image.data)
    np.testing.assert_array_equal(SHIFTS[name](image).data, shifted.data)  # same draw every time
    span = float(image.data.max() - image.data.min())
    if name == "bias":
        ratio = shifted.data[image.data > 0] / image.data[image.data > 0]
        assert 1 - BIAS_AMPLITUDE - 1e-5 <= ratio.min() and ratio.max() <= 1 + BIAS_AMPLITUDE + 1e-5
        assert ratio.max() - ratio.min() > BIAS_AMPLITUDE  # smooth but not negligible
    if name == "noise":  # of the robust range: a bright outlier voxel does not scale it
        low, high = np.percentile(image.data, NOISE_PERCENTILES)
        assert 0.04 * (high - low) < float(np.std(shifted.data - image.data)) < 0.06 * (high - low)
        big = dataclasses.replace(image, data=np.tile(image.data, (8, 8, 1)))  # 0.5 % is many voxels
        spiked = dataclasses.replace(big, data=big.data.copy())
        spiked.data.flat[-1] = 10 * span
        added = [float(np.std(SHIFTS[name](v).data - v.data)) for v in (big, spiked)]
        assert added[1] == pytest.approx(added[0], rel=0.01)
    if name.startswith("gamma_"):
        assert shifted.data.min() == pytest.approx(image.data.min())
        assert shifted.data.max() == pytest.approx(image.data.max())


def test_shift_names_are_checked_and_none_comes_first():
    assert check_shifts(["noise", "rot90", "noise"]) == ["none", "noise", "rot90"]
    assert check_shifts("bias") == ["none", "bias"]
    assert check_shifts(None) == list(SHIFTS)
    with pytest.raises(ConfigError, match="rot45"):
        check_shifts(["rot90", "rot45"])


def test_split_selects_only_its_patients_and_names_missing_ones(synthetic_root, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(
        json.dumps({"train": ["patient001"], "val": ["patient003"], "test": ["patient002", "patient005"]})
    )
    frames = find_cases(synthetic_root, split, "test")
    assert sorted({f.case for f in frames}) == ["patient002", "patient005"]
    assert sorted(f.phase for f in frames) == ["ED", "ED", "ES", "ES"]
    assert {f.case for f in find_cases(synthetic_root, split, "val")} == {"patient003"}
    assert {f.case for f in find_cases(synthetic_root, patients=2)} == {"patient001", "patient002"}
    with pytest.raises(ConfigError, match="subset=holdout"):
        find_cases(synthetic_root, split, "holdout")
    split.write_text(json.dumps({"train": [], "val": [], "test": ["patient002", "patient999"]}))
    with pytest.raises(DataError, match="patient999"):
        find_cases(synthetic_root, split, "test")


def _read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_cli_writes_a_row_per_requested_shift_for_the_split_patients(trained_ckpt, synthetic_root, tmp_path):
    split = tmp_path / "run" / "split.json"
    split.parent.mkdir()
    split.write_text(json.dumps({"train": ["patient001", "patient003"], "val": [], "test": ["patient002"]}))
    out = tmp_path / "report"
    shifts = ["rot90", "permute", "spacing_1.4", "noise"]
    result = run_cli(
        [
            "-m",
            "seg_densenet.robustness",
            f"ckpt={trained_ckpt}",
            f"input={synthetic_root}",
            f"output={out}",
            f"split={split}",
            "subset=test",
            f"shifts=[{','.join(shifts)}]",
            "device=cpu",
            "batch_size=8",
        ],
        timeout=300,
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip  (one thread: the cores are shared)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _read_csv(out / "robustness.csv")
    assert [r["shift"] for r in rows] == ["none", *shifts]
    assert float(rows[0]["delta_dice"]) == 0.0
    for row in rows:
        assert row["n_frames"] == "2"
        dice = [float(row[k]) for k in ("dice_mean", "dice_RV", "dice_MYO", "dice_LV")]
        assert all(0.0 <= d <= 1.0 for d in dice)
        assert float(row["dice_mean"]) == pytest.approx(np.mean(dice[1:]), abs=1e-5)
        assert float(row["delta_dice"]) == pytest.approx(
            float(row["dice_mean"]) - float(rows[0]["dice_mean"]), abs=1e-5
        )
    cases = _read_csv(out / "robustness_cases.csv")
    assert {r["case"] for r in cases} == {"patient002"}
    assert len(cases) == len(rows) * 2 * 3  # shifts x frames (ED, ES) x structures
    markdown = (out / "robustness.md").read_text()
    assert str(trained_ckpt) in markdown and "1 patients, 2 frames" in markdown
    assert "tta=d4, postprocess=lcc" in markdown and "Worst shift: `" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in table] == ["none", *shifts]
    assert all(line in result.stdout for line in table)  # the table is printed too
    assert not list(out.glob(".*tmp*"))


def test_cli_bad_shift_name_is_a_one_line_error(tmp_path):
    out = tmp_path / "report"
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"the shift names are checked before the checkpoint is read")
    result = run_cli([
        "-m", "seg_densenet.robustness", f"ckpt={ckpt}", f"input={tmp_path}",
        f"output={out}", "shifts=[rot90,rot45]",
    ], timeout=120)  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: shifts:") and "rot45" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
