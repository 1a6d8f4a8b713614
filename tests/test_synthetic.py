"""Contracts of the synthetic ACDC-layout phantom: layout, geometry, anatomy, groups, truth, determinism."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from seg_densenet.data.synthetic import GROUPS, ensure_dataset, generate_dataset
from seg_densenet.errors import DataError

SIZE = (160, 176)  # smaller than ACDC's ~216x256 to keep the tests fast; spacing clips to 1.8 mm
N = 6  # one patient per group, plus a second NOR
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("syn") / "synthetic", N, seed=3, image_size=SIZE)


def _info(folder: Path) -> dict[str, str]:
    lines = (folder / "Info.cfg").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines)


def _frames(root: Path, name: str) -> dict[str, tuple[nib.Nifti1Image, nib.Nifti1Image]]:
    """ED and ES (image, labels) of one patient, by the frame numbers of its Info.cfg."""
    folder = root / name
    info = _info(folder)
    out = {}
    for phase in ("ED", "ES"):
        stem = folder / f"{name}_frame{int(info[phase]):02d}"
        out[phase] = (nib.load(f"{stem}.nii.gz"), nib.load(f"{stem}_gt.nii.gz"))
    return out


def _labels(img: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(img.dataobj)


def _volume_ml(gt: nib.Nifti1Image, label: int) -> float:
    return float((_labels(gt) == label).sum()) * float(np.prod(gt.header.get_zooms()[:3])) / 1000.0


def _mid_thickness_mm(gt: nib.Nifti1Image) -> float:
    """Mean wall thickness at the middle slice: difference of the equivalent-circle radii."""
    labels = _labels(gt)
    sl = labels[:, :, labels.shape[2] // 2]
    pixel = float(np.prod(gt.header.get_zooms()[:2]))
    cavity, myo = (sl == 3).sum() * pixel, (sl == 2).sum() * pixel
    return float(np.sqrt((cavity + myo) / np.pi) - np.sqrt(cavity / np.pi))


def _patients(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir())


def test_layout_and_info_cfg(dataset):
    assert _patients(dataset) == [f"patient{i:03d}" for i in range(1, N + 1)]
    assert (dataset / ".complete").is_file() and (dataset / "truth.json").is_file()
    for i, name in enumerate(_patients(dataset)):
        folder = dataset / name
        lines = (folder / "Info.cfg").read_text().splitlines()
        assert [line.split(": ")[0] for line in lines] == ["ED", "ES", "Group", "Height", "Weight", "NbFrame"]
        info = _info(folder)
        assert info["Group"] == GROUPS[i % len(GROUPS)]  # round-robin
        ed, es, nb = int(info["ED"]), int(info["ES"]), int(info["NbFrame"])
        assert ed == 1 and 1 < es <= nb
        assert 140 < float(info["Height"]) < 210 and 35 < float(info["Weight"]) < 150
        expected = {f"{name}_frame{f:02d}{s}.nii.gz" for f in (ed, es) for s in ("", "_gt")} | {"Info.cfg"}
        assert {p.name for p in folder.iterdir()} == expected


def test_geometry(dataset):
    for name in _patients(dataset):
        for image, gt in _frames(dataset, name).values():
            assert image.shape == gt.shape and len(image.shape) == 3
            assert image.shape[:2] == SIZE and 8 <= image.shape[2] <= 12
            sx, sy, sz = (float(z) for z in gt.header.get_zooms())
            assert 1.2 <= sx <= 1.8 and sx == sy and 5.0 <= sz <= 10.0
            for img in (image, gt):
                np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), [sx, sy, sz], rtol=1e-5)
                assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
                np.testing.assert_allclose(img.get_qform(), img.affine, atol=1e-4)
                np.testing.assert_allclose(img.get_sform(), img.affine, atol=1e-4)
            assert image.get_data_dtype() == np.int16 and gt.get_data_dtype() == np.uint8
            assert set(np.unique(_labels(gt)).tolist()) <= {0, 1, 2, 3}


def test_image_intensities_look_like_bssfp(dataset):
    # bright blood, dark myocardium (ACDC: myocardium ~ 0.3-0.6 of the blood pool), dark air
    for name in _patients(dataset):
        image, gt = _frames(dataset, name)["ED"]
        data, labels = np.asarray(image.dataobj, dtype=np.float32), _labels(gt)
        blood, myo = data[labels == 3].mean(), data[labels == 2].mean()
        assert 0.2 < myo / blood < 0.65, name
        assert data[:4, :4, :].mean() < 0.15 * blood  # a corner of the FOV is air


def test_anatomy(dataset):
    for name in _patients(dataset):
        frames = _frames(dataset, name)
        ed, es = _labels(frames["ED"][1]), _labels(frames["ES"][1])
        assert set(np.unique(ed).tolist()) == {0, 1, 2, 3}, name
        assert (ed == 3).sum() > (es == 3).sum(), name  # the LV empties in systole
        assert (ed == 1).sum() > (es == 1).sum(), name
        # RV at the base (slice 0), none at the apex (last slice); the LV shrinks towards the apex
        assert (ed[:, :, 0] == 1).sum() > 0 and (ed[:, :, -1] == 1).sum() == 0, name
        lv_area = [(ed[:, :, k] == 3).sum() for k in range(ed.shape[2])]
        assert lv_area[-1] < lv_area[ed.shape[2] // 2] < lv_area[0], name
        # myocardial volume is kept from ED to ES (the wall thickens)
        myo_ed, myo_es = (ed == 2).sum(), (es == 2).sum()
        assert abs(myo_es - myo_ed) < 0.04 * myo_ed, name
        assert _mid_thickness_mm(frames["ES"][1]) > _mid_thickness_mm(frames["ED"][1]), name
        # the heart lies in the central 60 % of the field of view, in every slice and frame
        nx, ny, _ = ed.shape
        x0, y0 = int(0.2 * nx), int(0.2 * ny)
        for labels in (ed, es):
            inside = labels[x0 : nx - x0, y0 : ny - y0]
            assert (inside > 0).sum() == (labels > 0).sum(), name


def test_groups_are_distinct(dataset):
    truth = json.loads((dataset / "truth.json").read_text())
    stats: dict[str, list[tuple[float, float, float]]] = {}
    for name in _patients(dataset):
        frames = _frames(dataset, name)
        (_, ed), (_, es) = frames["ED"], frames["ES"]
        lv = [_volume_ml(gt, 3) for gt in (ed, es)]
        rv = [_volume_ml(gt, 1) for gt in (ed, es)]
        ef = 100 * (lv[0] - lv[1]) / lv[0]
        rv_ef = 100 * (rv[0] - rv[1]) / rv[0]
        stats.setdefault(truth[name]["group"], []).append((ef, rv_ef, _mid_thickness_mm(ed)))
    mean = {g: np.mean(v, axis=0) for g, v in stats.items()}
    assert set(mean) == set(GROUPS)
    for ef, _, thickness in stats["NOR"]:
        assert 55 <= ef <= 70 and 6 <= thickness <= 12
    assert mean["DCM"][0] < 40 and mean["DCM"][0] < mean["NOR"][0]
    assert mean["HCM"][2] > 15 and mean["HCM"][2] > mean["NOR"][2] and mean["HCM"][0] > mean["NOR"][0]
    assert mean["MINF"][0] < 45
    assert mean["RV"][1] < 40 and mean["RV"][1] < mean["NOR"][1]


def test_truth_json_matches_label_maps(dataset):
    truth = json.loads((dataset / "truth.json").read_text())
    assert sorted(truth) == _patients(dataset)
    for name, t in truth.items():
        frames = _frames(dataset, name)
        ed, es = frames["ED"][1], frames["ES"][1]
        lv_ed, lv_es, rv_ed, rv_es = (
            _volume_ml(ed, 3),
            _volume_ml(es, 3),
            _volume_ml(ed, 1),
            _volume_ml(es, 1),
        )
        assert abs(100 * (lv_ed - lv_es) / lv_ed - t["LV_EF_pct"]) < 1.0
        assert abs(100 * (rv_ed - rv_es) / rv_ed - t["RV_EF_pct"]) < 1.0
        np.testing.assert_allclose([t["LV_EDV_ml"], t["LV_ESV_ml"]], [lv_ed, lv_es], rtol=1e-3)
        np.testing.assert_allclose([t["RV_EDV_ml"], t["RV_ESV_ml"]], [rv_ed, rv_es], rtol=1e-3)
        np.testing.assert_allclose(t["MYO_mass_g"], 1.05 * _volume_ml(ed, 2), rtol=1e-3)
        assert t["group"] == _info(dataset / name)["Group"]


def _file_bytes(root: Path, names: list[str]) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for n in names for p in sorted((root / n).iterdir())}


def test_same_seed_gives_identical_bytes_regardless_of_count(dataset, tmp_path):
    # patient k depends only on (seed, k): a 2-patient run reproduces the first two of the 6-patient run
    small = generate_dataset(tmp_path / "again", 2, seed=3, image_size=SIZE)
    names = ["patient001", "patient002"]
    assert _file_bytes(small, names) == _file_bytes(dataset, names)
    other = generate_dataset(tmp_path / "other", 1, seed=4, image_size=SIZE)
    a, b = _file_bytes(other, names[:1]), _file_bytes(dataset, names[:1])
    assert a.keys() != b.keys() or all(a[k] != b[k] for k in a if k.endswith(".nii.gz"))


def test_ensure_dataset_reuses_and_regenerates(tmp_path):
    out = tmp_path / "data" / "synthetic"
    ensure_dataset(out, 1, seed=0, image_size=SIZE)
    marker = out / ".complete"
    stamp = marker.stat().st_mtime_ns
    time.sleep(0.01)
    assert ensure_dataset(out, 1, seed=0, image_size=SIZE) == out
    assert marker.stat().st_mtime_ns == stamp  # complete, same parameters: nothing rewritten
    ensure_dataset(out, 2, seed=0, image_size=SIZE)  # different parameters: rebuilt
    assert _patients(out) == ["patient001", "patient002"]
    assert json.loads(marker.read_text())["n_patients"] == 2
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".synthetic.")]  # no leftovers


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="mine"):
        ensure_dataset(out, 1, seed=0, image_size=SIZE)
    assert (out / "notes.txt").read_text() == "keep me"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "seg_densenet.data.synthetic", *args]


def test_cli_writes_a_dataset(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run(
        _cli("--out", str(out), "--patients", "3", "--seed", "1", "--image-size", *map(str, SIZE)),
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert _patients(out) == ["patient001", "patient002", "patient003"]
    assert json.loads((out / ".complete").read_text())["seed"] == 1


def test_cli_reports_bad_arguments_in_one_line(tmp_path):
    res = subprocess.run(
        _cli("--out", str(tmp_path / "x"), "--patients", "0"), cwd=REPO, capture_output=True, text=True
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "n_patients" in res.stderr


def test_killed_run_leaves_no_dataset(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli("--out", str(out), "--patients", "40", "--image-size", *map(str, SIZE)), cwd=REPO
    )
    try:
        deadline = time.time() + 60
        # wait until the run has written a first patient into its hidden build folder
        while time.time() < deadline and not list(tmp_path.glob(".killed.tmp-*/patient001/Info.cfg")):
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert list(tmp_path.glob(".killed.tmp-*/patient001"))
    assert not out.exists()
    ensure_dataset(out, 1, seed=0, image_size=SIZE)  # the next run builds a complete dataset
    assert (out / ".complete").is_file() and _patients(out) == ["patient001"]
