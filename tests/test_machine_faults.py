"""Faults of the machine and of its use, through the real CLIs: images smaller than the network, a full
disk, a read-only folder, data that vanishes mid-run, two processes on one cache or one output tree.

The file-system faults use a size-limited or read-only tmpfs; mounting one needs root, so those tests
are skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl

from seg_densenet.checkpoint import safe_torch_load
from seg_densenet.config import REPO_ROOT
from seg_densenet.errors import DataError, StorageError
from seg_densenet.predict import pad_to_min_size
from seg_densenet.utils.atomic import atomic_path
from tests.conftest import quick_overrides, run_cli


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, readonly: bool = False):
    """A tmpfs of ``size`` bytes (mount's syntax: ``256k``) at ``path``; skips the test without root."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); these faults need root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> None:
    """Fill ``folder``'s file system to the last byte."""
    with open(folder / "filler", "wb", buffering=0) as f:
        for block in (4096, 1):  # pages, then the last bytes
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * block)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


def _write(path: Path, data: np.ndarray, spacing=(1.5, 1.5, 8.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))


# --- inputs of any size -------------------------------------------------------------------------
def test_pad_to_min_size_centres_and_cuts_back():
    image = np.arange(2 * 20 * 40, dtype=np.float32).reshape(2, 20, 40)
    padded, window = pad_to_min_size(image, 32)
    assert padded.shape == (2, 32, 40)
    np.testing.assert_array_equal(padded[(..., *window)], image)
    assert padded[:, :6].max() == image.min() and padded[:, 26:].max() == image.min()
    same, window = pad_to_min_size(image, 16)
    assert same is image and same[(..., *window)].shape == image.shape


def test_predict_and_evaluate_take_images_smaller_than_the_network(trained_ckpt, tmp_path):
    rng = np.random.default_rng(0)
    inputs = tmp_path / "small"
    shapes = {"thumb": (20, 20, 4), "one_slice": (40, 36, 1), "voxel": (1, 1, 1)}
    for name, shape in shapes.items():
        _write(inputs / f"{name}.nii.gz", rng.random(shape, dtype=np.float32))
    out = tmp_path / "pred"
    proc = run_cli(["-m", "seg_densenet.predict", f"ckpt={trained_ckpt}", f"input={inputs}", f"output={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, shape in shapes.items():
        pred = nib.load(out / f"{name}_pred.nii.gz")
        assert pred.shape == shape and set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}

    # evaluate in the checkpoint mode: a 20x20 ACDC-layout patient, predicted and scored
    case = tmp_path / "acdc" / "patient001"
    labels = np.zeros((20, 20, 3), np.int16)
    labels[6:14, 6:14] = 2
    labels[8:12, 8:12] = 3
    labels[2:6, 6:14] = 1
    for frame in (1, 5):
        _write(
            case / f"patient001_frame{frame:02d}.nii.gz",
            (labels * 100 + rng.random((20, 20, 3)) * 20).astype(np.float32),
        )
        _write(case / f"patient001_frame{frame:02d}_gt.nii.gz", labels)
    (case / "Info.cfg").write_text("ED: 1\nES: 5\nGroup: NOR\nHeight: 170.0\nWeight: 70.0\nNbFrame: 10\n")
    proc = run_cli(
        [
            "-m",
            "seg_densenet.evaluate",
            f"ckpt={trained_ckpt}",
            f"input={case.parent}",
            f"output={tmp_path / 'report'}",
            "plots=false",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "report" / "metrics.csv").is_file()


# --- a full disk, a read-only folder --------------------------------------------------------------
def test_atomic_write_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path):
    with tmpfs(tmp_path / "disk", "64k") as disk:
        fill(disk)
        with pytest.raises(StorageError, match=r"out\.bin: disk full .* MB free .*choose another output="):
            with atomic_path(disk / "out.bin") as tmp, open(tmp, "wb") as f:
                f.write(b"x" * 100_000)
                f.flush()
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_predict_into_a_full_disk(trained_ckpt, synthetic_root, tmp_path):
    with tmpfs(tmp_path / "disk", "256k") as disk:
        fill(disk)
        image = synthetic_root / "patient001" / "patient001_frame01.nii.gz"
        proc = run_cli(
            ["-m", "seg_densenet.predict", f"ckpt={trained_ckpt}", f"input={image}", f"output={disk}/pred"]
        )
        line = one_error_line(proc)
        assert "patient001_frame01_pred.nii.gz: disk full" in line and "choose another output=" in line, line
        assert not leftovers(disk) and not list(disk.rglob("*.nii.gz"))


def test_read_only_cache_folder_is_one_line(synthetic_root, tmp_path):
    with tmpfs(tmp_path / "cache", "1m", readonly=True) as cache:
        args = [a for a in quick_overrides(tmp_path, synthetic_root) if not a.startswith("data.cache_dir")]
        proc = run_cli(
            [
                "-m",
                "seg_densenet.train",
                *args,
                "task=segment",
                f"data.cache_dir={cache}",
                f"hydra.run.dir={tmp_path / 'run'}",
            ]
        )
        line = one_error_line(proc)
        assert str(cache) in line and "read-only: choose another data.cache_dir=" in line, line


def test_disk_full_at_a_checkpoint_keeps_the_last_good_one_and_resumes(
    trained_ckpt, synthetic_root, tmp_path
):
    size = trained_ckpt.stat().st_size  # the same network and optimiser as below
    with tmpfs(tmp_path / "disk", f"{int(2.5 * size) + 200_000}") as disk:
        run = disk / "run"
        args = [
            "-m",
            "seg_densenet.train",
            *quick_overrides(tmp_path, synthetic_root),
            "task=segment",
            "test=false",
            "model.drop_rate=0.1",
            "trainer.max_epochs=2",
            f"hydra.run.dir={run}",
        ]
        line = one_error_line(run_cli(args))
        assert "disk full: it needs" in line and "MB free: free" in line and "ckpt_path=last" in line, line
        assert not leftovers(disk)
        last = safe_torch_load(run / "checkpoints" / "last.ckpt")
        assert last["epoch"] == 0  # the checkpoint of the first epoch, whole

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        proc = run_cli([*args, "ckpt_path=last"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert safe_torch_load(run / "checkpoints" / "last.ckpt")["epoch"] == 1
        assert (run / "summary.json").is_file() and not leftovers(disk)


def test_a_failed_write_outside_the_atomic_writers_is_one_line(tmp_path):
    # a logger's plain write() on a full disk names no file; the line still says what to do
    from seg_densenet.utils.cli import user_error

    err = user_error(RuntimeError("wrapped").with_traceback(None))
    assert err is None
    exc = OSError(errno.ENOSPC, "No space left on device")
    assert "No space left on device: free space on the output's disk" in str(user_error(exc))
    exc = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "metrics.csv"))
    assert (
        str(user_error(exc))
        == f"{tmp_path / 'metrics.csv'}: no permission to write there: choose another output folder"
    )


# --- data that vanishes mid-run ------------------------------------------------------------------
def test_input_folder_removed_during_prediction(trained_ckpt, synthetic_root, tmp_path):
    inputs = tmp_path / "inputs"
    cases = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[:3]
    for case in cases:
        shutil.copytree(case, inputs / case.name)
    out = tmp_path / "pred"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "seg_densenet.predict",
            f"ckpt={trained_ckpt}",
            f"input={inputs}",
            f"output={out}",
            "tta=false",
            "batch_size=2",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not list(out.rglob("*_pred.nii.gz")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)  # hold it while its inputs go away
    shutil.rmtree(inputs)
    proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=300)
    line = one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert "file not found" in line and str(inputs) in line, line
    written = list(out.rglob("*_pred.nii.gz"))
    assert written and not leftovers(out)
    for pred in written:  # what was written is whole
        assert np.asarray(nib.load(pred).dataobj).shape == nib.load(pred).shape


def test_cache_removed_during_training_is_a_data_error(tmp_path, synthetic_root):
    from seg_densenet.data.acdc import discover_cases
    from seg_densenet.data.cache import VolumeCache
    from seg_densenet.data.datasets import _CachedArrays
    from seg_densenet.data.preprocess import Preprocessor

    cache = VolumeCache(tmp_path / "cache", Preprocessor())
    entries = [cache.get(frame) for frame in discover_cases(synthetic_root)[0].frames.values()]
    arrays = _CachedArrays(entries)
    arrays.arrays(0)  # opened (memory-mapped) before the removal: still readable
    shutil.rmtree(tmp_path / "cache")
    assert arrays.arrays(0)[0].shape[0] == entries[0].n_slices
    with pytest.raises(DataError, match=r"image\.npy: cached array vanished during the run"):
        arrays.arrays(1)


def test_worker_tracebacks_are_cut_to_the_original_line(capsys):
    from seg_densenet.utils.cli import fail

    message = (
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nseg_densenet.errors.DataError: /c/a.image.npy: cached array vanished\n'
    )
    with pytest.raises(SystemExit) as exit_:
        fail(message)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: /c/a.image.npy: cached array vanished\n"


# --- two processes at once ----------------------------------------------------------------------
def _start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]


def test_two_trainings_share_one_cache(synthetic_root, tmp_path):
    cache = tmp_path / "cache"
    runs = []
    for name in ("a", "b"):
        args = [a for a in quick_overrides(tmp_path, synthetic_root) if not a.startswith("data.cache_dir")]
        runs.append(
            _start(
                [
                    "-m",
                    "seg_densenet.train",
                    *args,
                    "task=segment",
                    "test=false",
                    f"data.cache_dir={cache}",
                    f"hydra.run.dir={tmp_path / name}",
                ]
            )
        )
    _finish(runs)
    assert not leftovers(cache)
    entries = sorted(cache.glob("*.json"))
    assert entries
    for meta in entries:  # every entry whole: both arrays present and readable
        stem = meta.name.removesuffix(".json")
        image, mask = np.load(cache / f"{stem}.image.npy"), np.load(cache / f"{stem}.mask.npy")
        assert image.shape == mask.shape and np.isfinite(image).all()
    for name in ("a", "b"):
        assert (tmp_path / name / "summary.json").is_file()


def test_two_predictions_write_one_output_tree(trained_ckpt, synthetic_root, tmp_path):
    inputs = tmp_path / "inputs"
    for case in sorted(p for p in synthetic_root.iterdir() if p.is_dir())[:2]:
        shutil.copytree(case, inputs / case.name)
    out = tmp_path / "pred"
    args = [
        "-m",
        "seg_densenet.predict",
        f"ckpt={trained_ckpt}",
        f"input={inputs}",
        f"output={out}",
        "tta=false",
    ]
    _finish([_start(args), _start(args)])
    images = [p for p in inputs.rglob("*.nii.gz") if not p.name.endswith("_gt.nii.gz")]
    preds = sorted(out.rglob("*_pred.nii.gz"))
    assert len(preds) == len(images) and not leftovers(out)
    for pred in preds:
        assert np.asarray(nib.load(pred).dataobj).dtype == np.uint8


class RemoveFolder(pl.Callback):
    """Removes ``folder`` when the second training epoch starts (a data folder vanishing mid-run)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            shutil.rmtree(self.folder)


def test_data_folder_removed_during_training_does_not_stop_it(compose_cfg, synthetic_root, tmp_path):
    from seg_densenet.train import train

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    cfg = compose_cfg(
        [
            *quick_overrides(tmp_path, data),
            "task=segment",
            "trainer.max_epochs=2",
            "+callbacks.remove_data._target_=tests.test_machine_faults.RemoveFolder",
            f"+callbacks.remove_data.folder={data}",
        ]
    )
    metrics = train(cfg)  # after setup, training reads only the cache
    assert not data.exists()
    assert "test/dice" in metrics and (tmp_path / "run" / "summary.json").is_file()
