"""End-to-end runs of ``python -m seg_densenet.evaluate`` on a tiny ACDC-layout tree."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from seg_densenet.errors import DataError, SegDenseNetError
from seg_densenet.evaluate import evaluate_folders
from seg_densenet.evaluation.clinical import clinical_indices

SPACING = (1.5, 1.5, 8.0)
SHAPE = (24, 20, 4)
# M&Ms-style case names work as well as ACDC's; ES is frame 3 here (read from Info.cfg, not assumed)
PATIENTS = {"patient001": (1, 3), "A1D0Q7": (1, 3)}
STRUCTURES = ("RV", "MYO", "LV")


def _affine(spacing=SPACING) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 2.0)
    return affine


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, _affine() if affine is None else affine), str(path))


def _labels(lv_radius: int, shift: int = 0) -> np.ndarray:
    """LV disc ringed by myocardium, RV box beside it, on 3 of the 4 slices."""
    x, y = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    r = np.hypot(x - 9 - shift, y - 10)
    plane = np.zeros(SHAPE[:2], np.uint8)
    plane[r <= lv_radius + 2] = 2
    plane[r <= lv_radius] = 3
    plane[17:22, 5:15] = 1
    labels = np.zeros(SHAPE, np.uint8)
    labels[:, :, :3] = plane[:, :, None]
    return labels


def _make_tree(root: Path, perturb: bool) -> tuple[Path, Path]:
    """gt/<case>/<stem>_gt.nii.gz (+ image, Info.cfg) and pred/nested/<stem>_pred.nii.gz."""
    gt_root, pred_root = root / "gt", root / "pred"
    rng = np.random.default_rng(0)
    for i, (case, (ed, es)) in enumerate(PATIENTS.items()):
        (gt_root / case).mkdir(parents=True)
        (gt_root / case / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nNbFrame: 5\n")
        for frame, radius in ((ed, 5 + i), (es, 3 + i)):
            stem = f"{case}_frame{frame:02d}"
            gt = _labels(radius)
            _write(gt_root / case / f"{stem}_gt.nii.gz", gt)
            _write(gt_root / case / f"{stem}.nii.gz", rng.random(SHAPE).astype(np.float32))
            pred = _labels(radius, shift=1) if perturb else gt
            _write(pred_root / "nested" / case / f"{stem}_pred.nii.gz", pred)
    return gt_root, pred_root


def _run(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "seg_densenet.evaluate", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with path.open() as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.slow
def test_cli_writes_every_report(tmp_path: Path) -> None:
    gt_root, pred_root = _make_tree(tmp_path, perturb=True)
    out = tmp_path / "out"
    work = tmp_path / "cwd"
    work.mkdir()
    result = _run(work, f"pred={pred_root}", f"gt={gt_root}", f"output={out}")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert list(work.iterdir()) == []  # Hydra writes no run folder or logs: only `output` is touched

    expected = {
        "metrics.csv",
        "clinical.csv",
        "summary.json",
        "summary.md",
        "dice_boxplot.png",
        "bland_altman_LV_EF.png",
        "bland_altman_RV_EF.png",
        "bland_altman_LV_EDV.png",
        "overlay_best.png",
        "overlay_worst.png",
        "report.html",
    }
    assert {p.name for p in out.iterdir()} == expected
    page = (out / "report.html").read_text()
    assert page.count('<figure id="case-') == len(PATIENTS) and 'class="sortable"' in page
    assert page.count("data:image/png;base64,") == len(PATIENTS) + 4  # strips, box plot, 3 Bland-Altman
    assert "<th>Dice RV ED</th>" in page and "Geometric metrics" in page
    for png in (p for p in out.iterdir() if p.suffix == ".png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    columns, rows = _read_csv(out / "metrics.csv")
    assert columns[:8] == ["case", "phase", "structure", "dice", "iou", "hd_mm", "hd95_mm", "assd_mm"]
    assert len(rows) == len(PATIENTS) * 2 * len(STRUCTURES)
    assert {(r["case"], r["phase"]) for r in rows} == {(c, p) for c in PATIENTS for p in ("ED", "ES")}
    rv = [r for r in rows if r["structure"] == "RV"]
    lv = [r for r in rows if r["structure"] == "LV"]
    assert all(float(r["dice"]) == 1.0 for r in rv)  # the RV was not perturbed
    # the LV disc moved one voxel along x (1.5 mm): overlap drops, the surfaces are 1.5 mm apart
    assert all(0.5 < float(r["dice"]) < 1.0 for r in lv)
    assert all(float(r["hd_mm"]) == pytest.approx(1.5) for r in lv)

    columns, clinical = _read_csv(out / "clinical.csv")
    assert columns == [
        "patient",
        "source",
        "LV_EDV_ml",
        "LV_ESV_ml",
        "LV_EF_pct",
        "RV_EDV_ml",
        "RV_ESV_ml",
        "RV_EF_pct",
        "MYO_mass_g",
    ]
    assert sorted((r["patient"], r["source"]) for r in clinical) == sorted(
        (c, s) for c in PATIENTS for s in ("gt", "pred")
    )
    # the gt rows equal the indices computed directly from the files
    for row in (r for r in clinical if r["source"] == "gt"):
        case = row["patient"]
        ed, es = (
            np.asarray(nib.load(gt_root / case / f"{case}_frame{f:02d}_gt.nii.gz").dataobj)
            for f in PATIENTS[case]
        )
        want = clinical_indices(ed, es, SPACING)
        for name, value in want.items():
            assert float(row[name]) == pytest.approx(value, abs=1e-5), name

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"n_cases", "per_structure", "clinical"}
    assert summary["n_cases"] == len(PATIENTS)
    assert set(summary["per_structure"]) == set(STRUCTURES)
    for phases in summary["per_structure"].values():
        assert set(phases) == {"ED", "ES"}
        for metrics in phases.values():
            assert set(metrics) == {"dice", "iou", "hd_mm", "hd95_mm", "assd_mm"}
    assert set(summary["clinical"]) == {
        "LV_EDV_ml",
        "LV_ESV_ml",
        "LV_EF_pct",
        "RV_EDV_ml",
        "RV_ESV_ml",
        "RV_EF_pct",
        "MYO_mass_g",
    }
    for stats in summary["clinical"].values():
        assert set(stats) == {"corr", "bias", "loa"} and len(stats["loa"]) == 2
    assert summary["clinical"]["RV_EDV_ml"]["bias"] == pytest.approx(0.0)
    markdown = (out / "summary.md").read_text()
    assert "| LV | ED |" in markdown and "LV_EF_pct" in markdown


@pytest.mark.slow
def test_cli_ground_truth_against_itself_is_perfect(tmp_path: Path) -> None:
    gt_root, pred_root = _make_tree(tmp_path, perturb=False)
    out = tmp_path / "out"
    result = _run(tmp_path, f"pred={pred_root}", f"gt={gt_root}", f"output={out}", "plots=false")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    for phases in summary["per_structure"].values():
        for metrics in phases.values():
            assert metrics == {"dice": 1.0, "iou": 1.0, "hd_mm": 0.0, "hd95_mm": 0.0, "assd_mm": 0.0}
    for stats in summary["clinical"].values():
        assert stats["bias"] == 0.0 and stats["loa"] == [0.0, 0.0]
    assert not list(out.glob("*.png"))


def test_cli_split_evaluates_only_that_list_of_patients(tmp_path: Path) -> None:
    gt_root, pred_root = _make_tree(tmp_path, perturb=False)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["patient001"], "val": [], "test": ["A1D0Q7"]}))
    out = tmp_path / "out"
    result = _run(
        tmp_path, f"pred={pred_root}", f"gt={gt_root}", f"output={out}", "plots=false", f"split={split}"
    )
    assert result.returncode == 0, result.stderr
    _, rows = _read_csv(out / "metrics.csv")
    assert {row["case"] for row in rows} == {"A1D0Q7"}
    assert (out / "test_cases" / "A1D0Q7").is_symlink() and gt_root.joinpath("patient001").is_dir()
    result = _run(
        tmp_path, f"pred={pred_root}", f"gt={gt_root}", f"output={out}", f"split={split}", "subset=val"
    )
    assert result.returncode == 2 and "the val list is empty" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_shape_mismatch_is_a_one_line_error(tmp_path: Path) -> None:
    gt_root, pred_root = _make_tree(tmp_path, perturb=False)
    bad = pred_root / "nested" / "A1D0Q7" / "A1D0Q7_frame03_pred.nii.gz"
    _write(bad, np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] + 1), np.uint8))
    result = _run(tmp_path, f"pred={pred_root}", f"gt={gt_root}", f"output={tmp_path / 'out'}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: A1D0Q7:"), result.stderr
    assert str(bad) in lines[0] and "A1D0Q7_frame03_gt.nii.gz" in lines[0]


@pytest.mark.slow
def test_cli_missing_es_skips_clinical_with_a_warning(tmp_path: Path) -> None:
    gt_root, pred_root = _make_tree(tmp_path, perturb=False)
    for folder in (gt_root / "A1D0Q7", pred_root / "nested" / "A1D0Q7"):
        for path in folder.glob("A1D0Q7_frame03*"):
            path.unlink()
    out = tmp_path / "out"
    result = _run(tmp_path, f"pred={pred_root}", f"gt={gt_root}", f"output={out}", "plots=false")
    assert result.returncode == 0, result.stderr
    assert any(line.startswith("warning: A1D0Q7:") for line in result.stderr.splitlines()), result.stderr
    _, clinical = _read_csv(out / "clinical.csv")
    assert {r["patient"] for r in clinical} == {"patient001"}
    _, rows = _read_csv(out / "metrics.csv")
    assert {(r["case"], r["phase"]) for r in rows if r["case"] == "A1D0Q7"} == {("A1D0Q7", "ED")}


@pytest.mark.slow
def test_cli_missing_folder_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = _run(tmp_path, f"pred={missing}", f"gt={tmp_path}", f"output={tmp_path / 'out'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: pred={missing}: must be an existing folder or null"
    ], result.stderr
    assert not (tmp_path / "out").exists()


# The remaining bad inputs go through the same function the CLI calls, in-process (faster).


def test_unexpected_label_value_names_the_file(tmp_path: Path) -> None:
    gt_root, pred_root = _make_tree(tmp_path, perturb=False)
    bad = pred_root / "nested" / "patient001" / "patient001_frame01_pred.nii.gz"
    labels = _labels(5)
    labels[0, 0, 0] = 7
    _write(bad, labels)
    with pytest.raises(DataError, match=rf"^{bad}: label values \[7\]"):
        evaluate_folders(pred_root, gt_root, tmp_path / "out", make_plots=False)


def test_affine_mismatch_names_both_files(tmp_path: Path) -> None:
    gt_root, pred_root = _make_tree(tmp_path, perturb=False)
    bad = pred_root / "nested" / "patient001" / "patient001_frame03_pred.nii.gz"
    _write(bad, _labels(3), affine=_affine((1.5, 1.5, 8.01)))
    with pytest.raises(DataError, match="patient001: .*different affines") as info:
        evaluate_folders(pred_root, gt_root, tmp_path / "out", make_plots=False)
    assert str(bad) in str(info.value) and "patient001_frame03_gt.nii.gz" in str(info.value)
    # within the 1e-3 mm tolerance the files count as aligned
    _write(bad, _labels(3), affine=_affine((1.5, 1.5, 8.0005)))
    evaluate_folders(pred_root, gt_root, tmp_path / "out", make_plots=False)


def test_missing_prediction_errors_or_is_skipped(tmp_path: Path, capsys) -> None:
    gt_root, pred_root = _make_tree(tmp_path, perturb=False)
    (pred_root / "nested" / "patient001" / "patient001_frame03_pred.nii.gz").unlink()
    with pytest.raises(DataError, match="no prediction 'patient001_frame03_pred.nii.gz'"):
        evaluate_folders(pred_root, gt_root, tmp_path / "out", make_plots=False)
    summary = evaluate_folders(pred_root, gt_root, tmp_path / "out", allow_missing=True, make_plots=False)
    assert summary["n_cases"] == 2
    err = capsys.readouterr().err
    assert "no prediction for patient001_frame03" in err
    assert "patient001: needs one ED and one ES frame" in err


def test_output_may_share_the_input_folder_but_never_overwrite_an_input(tmp_path: Path) -> None:
    gt_root, pred_root = _make_tree(tmp_path, perturb=False)
    before = {p: p.read_bytes() for p in pred_root.rglob("*.nii.gz")}
    evaluate_folders(pred_root, gt_root, pred_root, make_plots=False)  # reports beside the predictions
    assert (pred_root / "metrics.csv").is_file()
    assert all(p.read_bytes() == data for p, data in before.items())
    # an output path that is an input file is refused, and the file is left alone
    target = gt_root / "patient001" / "patient001_frame01_gt.nii.gz"
    data = target.read_bytes()
    with pytest.raises(SegDenseNetError, match="same as an input file"):
        evaluate_folders(pred_root, gt_root, target, make_plots=False)
    assert target.read_bytes() == data


def test_overlays_colour_each_structure(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    from seg_densenet.evaluation.plots import STRUCTURE_COLOURS, overlay_montage

    gt = _labels(10)
    image = gt.astype(np.float32) * 50 + 10
    path = tmp_path / "overlay.png"
    overlay_montage(image, gt, _labels(9, shift=2), {"RV": 1, "MYO": 2, "LV": 3}, "patient001 ED", path)
    pixels = mpimg.imread(path)[..., :3].reshape(-1, 3)
    for name, colour in STRUCTURE_COLOURS.items():
        rgb = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
        # the ground-truth contour of each structure is drawn in its own colour, at full strength
        assert (np.abs(pixels - rgb).max(axis=1) < 0.08).sum() > 20, name


def test_html_report_renders_and_sorts_in_a_headless_browser(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium here (.ci/run installs Debian's chromium package)")
    gt_root, pred_root = _make_tree(tmp_path, perturb=True)
    out = tmp_path / "out"
    evaluate_folders(pred_root, gt_root, out)
    page = (out / "report.html").as_uri()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1200,2400", page],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 50_000
    pixels = mpimg.imread(shot)[..., :3]
    # text, tables and figures, not a blank page
    assert pixels.shape[:2] == (2400, 1200) and pixels.std() > 0.1
    # the sortable table, sorted by the browser itself (report.html#sort=-<column>: descending)
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", "--virtual-time-budget=2000", page + "#sort=-patient"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    table = dom.split('id="patients"', 1)[1].split("</table>", 1)[0]
    assert 'data-order="desc"' in table.split("</thead>", 1)[0]
    rows = [
        re.findall(r'data-value="([^"]*)"', row) for row in table.split("<tbody>", 1)[1].split("<tr>")[1:]
    ]
    assert [row[0] for row in rows] == sorted(PATIENTS, reverse=True)
