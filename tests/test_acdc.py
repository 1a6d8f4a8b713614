"""ACDC-layout reader: discovery, info files, pair checks, other layouts, bad input, the real data.

``write_case`` / ``write_dataset`` (real NIfTI files with a toy heart) are also used by the other
data tests.
"""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from seg_densenet.data.acdc import GROUPS, Layout, discover_cases, load_frame, read_info_cfg
from seg_densenet.errors import DataError

REAL_ACDC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "acdc" / "training"


def toy_labels(shape=(40, 48, 5), center=None, radius=7.0) -> np.ndarray:
    """ACDC-convention labels: LV cavity disc (3), myocardial ring (2), RV blob beside it (1)."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    cx, cy = center if center is not None else (shape[0] / 2, shape[1] / 2 + 3)
    labels = np.zeros(shape, dtype=np.uint8)
    for z in range(shape[2]):
        r = radius * (1.0 - 0.5 * z / max(shape[2] - 1, 1))  # smaller towards the apex
        d = np.hypot(x - cx, y - cy)
        rv = np.hypot(x - cx, y - (cy - 1.9 * r)) < 1.1 * r
        sl = labels[..., z]
        sl[rv] = 1
        sl[d < r + 3] = 2
        sl[d < r] = 3
    return labels


def write_nifti(path: Path, data: np.ndarray, spacing=(1.5, 1.5, 8.0)) -> Path:
    affine = np.diag([*spacing, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(spacing[: data.ndim] if data.ndim <= 3 else (*spacing, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_case(
    root: Path,
    name: str,
    group: str | None = "NOR",
    shape=(40, 48, 5),
    spacing=(1.5, 1.5, 8.0),
    frames=(1, 2),
    seed: int = 0,
    image_pattern: str = "{case}_frame{frame:02d}.nii.gz",
    labels_map=None,
    center=None,
) -> Path:
    """Write one case in the ACDC layout (or ``image_pattern``); returns its folder."""
    rng = np.random.default_rng(seed)
    folder = root / name
    for k, frame in enumerate(frames):
        labels = toy_labels(shape, center, radius=7.0 - 2 * k)  # ES: smaller cavity
        image = (np.choose(labels, [20.0, 250.0, 90.0, 260.0]) + rng.normal(0, 5, shape)).astype(np.float32)
        stem = image_pattern.format(case=name, frame=frame).removesuffix(".nii.gz")
        out_labels = labels if labels_map is None else np.vectorize(labels_map.get)(labels).astype(np.uint8)
        write_nifti(folder / f"{stem}.nii.gz", image, spacing)
        write_nifti(folder / f"{stem}_gt.nii.gz", out_labels, spacing)
    lines = [f"ED: {frames[0]}", f"ES: {frames[1]}", "NbFrame: 30"]
    if group is not None:
        lines.append(f"Group: {group}")
    (folder / "Info.cfg").write_text("\n".join(lines) + "\n")
    return folder


def write_dataset(
    root: Path, n_patients: int, shape=(40, 48, 5), spacing=(1.5, 1.5, 8.0), center=None
) -> Path:
    """``n_patients`` ACDC-layout cases, groups assigned round-robin."""
    for i in range(n_patients):
        write_case(
            root, f"patient{i + 1:03d}", GROUPS[i % len(GROUPS)], shape, spacing, seed=i, center=center
        )
    return root


# -- discovery and reading -------------------------------------------------------------------------


def test_discover_cases_reads_frames_group_and_info(tmp_path):
    write_dataset(tmp_path, 3)
    write_case(tmp_path, "patient010", group="MINF", frames=(1, 12))
    (tmp_path / "notes").mkdir()  # not a case folder
    cases = discover_cases(tmp_path)
    assert [c.name for c in cases] == ["patient001", "patient002", "patient003", "patient010"]
    last = cases[-1]
    assert last.group == "MINF" and last.group_index == GROUPS.index("MINF")
    assert last.info == {"ED": 1, "ES": 12, "NbFrame": 30, "Group": "MINF"}
    assert last.frames["ES"].image.name == "patient010_frame12.nii.gz"
    assert last.frames["ES"].label.name == "patient010_frame12_gt.nii.gz"
    assert last.frames["ED"].name == "patient010_ED"


def test_read_info_cfg_parses_numbers_and_tolerates_missing_fields(tmp_path):
    path = tmp_path / "Info.cfg"
    path.write_text("ED: 1\nES: 12\nGroup: DCM\nHeight: 184.0\nWeight: 95.0\nNbFrame: 30\n\n")
    assert read_info_cfg(path) == {
        "ED": 1,
        "ES": 12,
        "Group": "DCM",
        "Height": 184.0,
        "Weight": 95.0,
        "NbFrame": 30,
    }
    path.write_text("ED: 1\nES: 2\n")
    assert read_info_cfg(path) == {"ED": 1, "ES": 2}


def test_load_frame_keeps_header_geometry(tmp_path):
    write_case(tmp_path, "patient001", spacing=(1.25, 1.5, 10.0))
    image, label = load_frame(discover_cases(tmp_path)[0].frames["ED"])
    assert image.shape == label.shape == (40, 48, 5)
    assert image.data.dtype == np.float32 and label.data.dtype == np.int64
    assert image.spacing == (1.25, 1.5, 10.0) and label.spacing == (1.25, 1.5, 10.0)
    np.testing.assert_allclose(image.affine, np.diag([1.25, 1.5, 10.0, 1.0]))
    assert set(np.unique(label.data)) == {0, 1, 2, 3}


def test_mnms_style_layout_and_label_mapping(tmp_path):
    # M&Ms: case folders with codes for names, 1 = LV cavity and 3 = RV cavity
    mnms_to_acdc = {0: 0, 1: 3, 2: 2, 3: 1}
    write_case(tmp_path, "A1D0Q7", group="HCM", labels_map=mnms_to_acdc)  # the map is its own inverse
    layout = Layout.from_config({"case_glob": "*"})
    (case,) = discover_cases(tmp_path, layout)
    assert case.name == "A1D0Q7"
    _, mapped = load_frame(case.frames["ED"], mnms_to_acdc)
    np.testing.assert_array_equal(mapped.data, toy_labels())
    _, unmapped = load_frame(case.frames["ED"])
    assert not np.array_equal(unmapped.data, toy_labels())


def test_fixed_frames_need_no_info_file(tmp_path):
    write_case(tmp_path, "case_a", image_pattern="{case}_t{frame}.nii.gz", frames=(0, 7))
    (tmp_path / "case_a" / "Info.cfg").unlink()
    layout = Layout.from_config({"case_glob": "case_*", "image_pattern": "{case}_t{frame}.nii.gz",
                                 "info_file": None, "frames": {"ED": 0, "ES": 7}})  # fmt: skip
    (case,) = discover_cases(tmp_path, layout)
    assert case.group is None and case.frames["ES"].image.name == "case_a_t7.nii.gz"


# -- bad input: one-line DataError naming the file -------------------------------------------------


def _error(fn, *args) -> str:
    with pytest.raises(DataError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_root_and_no_cases(tmp_path):
    assert str(tmp_path / "nope") in _error(discover_cases, tmp_path / "nope")
    (tmp_path / "patient001").mkdir()
    message = _error(discover_cases, tmp_path)
    assert str(tmp_path) in message and "patient*" in message and "patient001" not in message
    assert "<case>_frame*.nii.gz" in message


def test_missing_info_cfg_is_named(tmp_path):
    write_case(tmp_path, "patient001")
    (tmp_path / "patient001" / "Info.cfg").unlink()
    assert "patient001/Info.cfg" in _error(discover_cases, tmp_path)


def test_missing_label_file_is_named(tmp_path):
    write_case(tmp_path, "patient001")
    (tmp_path / "patient001" / "patient001_frame02_gt.nii.gz").unlink()
    assert "patient001_frame02_gt.nii.gz" in _error(discover_cases, tmp_path)


def _frame(tmp_path):
    write_case(tmp_path, "patient001")
    return discover_cases(tmp_path)[0].frames["ED"]


def test_shape_mismatch_is_named(tmp_path):
    frame = _frame(tmp_path)
    write_nifti(frame.label, np.zeros((40, 48, 6), np.uint8))
    message = _error(load_frame, frame)
    assert frame.label.name in message and "(40, 48, 6)" in message


def test_label_values_outside_mapping(tmp_path):
    frame = _frame(tmp_path)
    labels = toy_labels()
    labels[0, 0, 0] = 7
    write_nifti(frame.label, labels)
    message = _error(load_frame, frame)
    assert frame.label.name in message and "[7]" in message


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_voxels(tmp_path, bad):
    frame = _frame(tmp_path)
    image = np.ones((40, 48, 5), np.float32)
    image[3, 4, 2] = float(bad)
    write_nifti(frame.image, image)
    assert frame.image.name in _error(load_frame, frame)


@pytest.mark.parametrize("shape", [(40, 48), (40, 48, 5, 2)])
def test_not_3d(tmp_path, shape):
    frame = _frame(tmp_path)
    write_nifti(frame.image, np.ones(shape, np.float32))
    message = _error(load_frame, frame)
    assert frame.image.name in message and "3D" in message


def test_truncated_gzip(tmp_path):
    frame = _frame(tmp_path)
    raw = frame.image.read_bytes()
    frame.image.write_bytes(raw[: len(raw) // 2])
    assert frame.image.name in _error(load_frame, frame)


def test_not_nifti(tmp_path):
    frame = _frame(tmp_path)
    frame.image.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    assert frame.image.name in _error(load_frame, frame)


# -- the real ACDC training set ----------------------------------------------------------------------


@pytest.mark.skipif(not REAL_ACDC.is_dir(), reason=f"real ACDC data not found at {REAL_ACDC}")
def test_real_acdc_all_patients_load():
    start = time.perf_counter()
    cases = discover_cases(REAL_ACDC)
    assert len(cases) == 70
    assert {c.group for c in cases} == set(GROUPS)
    for case in cases:
        assert set(case.frames) == {"ED", "ES"}
        for frame in case.frames.values():
            image, label = load_frame(frame)  # checks 3D, finite, equal shapes, labels within 0..3
            assert image.data.ndim == 3 and 6 <= image.shape[2] <= 18
            assert set(np.unique(label.data)) == {0, 1, 2, 3}, frame.label
            assert all(s > 0 for s in image.spacing)
    # all 280 files are decoded; keep an eye on the cost
    assert time.perf_counter() - start < 60
