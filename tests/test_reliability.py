"""Bad inputs, unsafe checkpoints and numerical failures.

Through the real command line, every case must end with a non-zero exit and ONE line on stderr that
names the file (or setting) and the problem, without a Python traceback (HYDRA_FULL_ERROR=1 shows it).
One bad data file of each reader takes that path; the other bad files call ``train(cfg)`` in this
process and check the error the command line would print (``user_error``), which spares each case the
command line's imports (about 10 s).
"""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from seg_densenet.train import train
from seg_densenet.utils.cli import user_error
from tests.conftest import compose_config, quick_overrides, run_cli


def _assert_one_line_error(result, *needles: str) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    _has(errors[0], *needles)
    return errors[0]


@pytest.fixture()
def dataset(tmp_path, synthetic_root):
    """A writable copy of the small synthetic dataset."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    return root


def _train(tmp_path, root, *extra: str):
    overrides = [o for o in quick_overrides(tmp_path, root)] + [
        "task=segment",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    return run_cli(["-m", "seg_densenet.train", *overrides, *extra])


def _train_error(tmp_path, root, *extra: str) -> str:
    """The message the command line would print for a training run on ``root``: one line."""
    cfg = compose_config([*quick_overrides(tmp_path, root), "task=segment", *extra], tmp_path / "run")
    with pytest.raises(Exception) as raised:
        train(cfg)
    err = user_error(raised.value)
    assert err is not None, f"not a user error: {raised.value!r}"
    assert "\n" not in str(err), str(err)
    return str(err)


def _has(message: str, *needles: str) -> None:
    for needle in needles:
        assert needle in message, message


def _image(root):
    return root / "patient001" / "patient001_frame01.nii.gz"


def _rewrite(path, data, dtype=None):
    ref = nib.load(path)
    array = np.asarray(data, dtype=dtype or ref.get_data_dtype())
    header = ref.header.copy()
    header.set_data_dtype(array.dtype)  # else nibabel casts to the old dtype (NaN -> 0 in int16)
    nib.save(nib.Nifti1Image(array, ref.affine, header), path)


# -- bad data files, through training ---------------------------------------------------------------
def test_truncated_gzip(tmp_path, dataset):
    path = _image(dataset)
    path.write_bytes(path.read_bytes()[:2000])
    _assert_one_line_error(_train(tmp_path, dataset), str(path), "truncated")


def test_text_file_named_nii_gz(tmp_path, dataset):
    path = _image(dataset)
    path.write_text("this is not an image\n")
    _has(_train_error(tmp_path, dataset), str(path))


def test_text_file_gzipped_with_nii_gz_name(tmp_path, dataset):
    path = _image(dataset)
    path.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    _has(_train_error(tmp_path, dataset), str(path), "NIfTI")


@pytest.mark.parametrize("shape", [(64, 64), (32, 32, 4, 3)])
def test_2d_or_4d_array(tmp_path, dataset, shape):
    path = _image(dataset)
    _rewrite(path, np.zeros(shape), np.int16)
    _has(_train_error(tmp_path, dataset), str(path), "3D")


def test_image_and_label_shapes_differ(tmp_path, dataset):
    path = _image(dataset)
    data = np.asarray(nib.load(path).dataobj)
    _rewrite(path, data[:-4])
    _has(_train_error(tmp_path, dataset), "patient001", "shape")


def _one_voxel(root, value):
    path = _image(root)
    data = np.asarray(nib.load(path).dataobj).astype(np.float32)
    data[5, 5, 0] = value
    _rewrite(path, data, np.float32)
    return path


def test_nan_voxel(tmp_path, dataset):
    path = _one_voxel(dataset, np.nan)
    _assert_one_line_error(_train(tmp_path, dataset), str(path), "1 NaN or infinite voxel(s)")


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_infinite_voxels(tmp_path, dataset, value):
    path = _one_voxel(dataset, value)
    _has(_train_error(tmp_path, dataset), str(path), "1 NaN or infinite voxel(s)")


def test_label_values_outside_mapping(tmp_path, dataset):
    path = dataset / "patient001" / "patient001_frame01_gt.nii.gz"
    data = np.asarray(nib.load(path).dataobj).copy()
    data[0, 0, 0] = 7
    _rewrite(path, data)
    _has(_train_error(tmp_path, dataset), str(path), "7")


def test_empty_data_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _has(_train_error(tmp_path, empty), str(empty), "no")


def test_patient_without_info_cfg(tmp_path, dataset):
    (dataset / "patient001" / "Info.cfg").unlink()
    _has(_train_error(tmp_path, dataset), "patient001", "Info.cfg")


# -- configuration mistakes -------------------------------------------------------------------------
def test_config_typo(tmp_path, dataset):
    _assert_one_line_error(_train(tmp_path, dataset, "trainer.max_epoch=3"), "max_epoch")


def test_unknown_encoder_name_lists_valid_names(tmp_path, dataset):
    line = _train_error(tmp_path, dataset, "model.encoder=densenet999")
    _has(line, "densenet999")
    for name in ("densenet121", "densenet169", "densenet201", "densenet161"):
        assert name in line


def test_unknown_model_option_lists_valid_options(tmp_path, dataset):
    line = _assert_one_line_error(_train(tmp_path, dataset, "model=unet3000"), "unet3000")
    assert "fc_densenet103" in line


# -- checkpoints ------------------------------------------------------------------------------------
def _predict(ckpt, tmp_path, synthetic_root):
    return run_cli(
        [
            "-m",
            "seg_densenet.predict",
            f"ckpt={ckpt}",
            f"input={_image(synthetic_root)}",
            f"output={tmp_path / 'pred'}",
        ]
    )


def test_checkpoint_of_another_architecture_lists_keys(trained_ckpt, tmp_path, synthetic_root):
    ckpt = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    ckpt["seg_densenet"]["model"] = {
        "_target_": "seg_densenet.models.build_model",
        "name": "fc_densenet56",
        "in_channels": 1,
        "num_classes": 4,
    }
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    line = _assert_one_line_error(
        _predict(other, tmp_path, synthetic_root), str(other), "missing", "unexpected"
    )
    assert "FCDenseNet" in line
    assert not (tmp_path / "pred").exists()


def test_file_that_is_not_a_checkpoint(tmp_path, synthetic_root):
    fake = tmp_path / "model.ckpt"
    fake.write_text("weights? no.\n")
    _assert_one_line_error(_predict(fake, tmp_path, synthetic_root), str(fake), "not a PyTorch checkpoint")


class _CreatesFile:
    """Unpickling this object would create a file: what a malicious checkpoint could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_checkpoint_is_refused(tmp_path, synthetic_root):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "seg_densenet": _CreatesFile(marker)}, evil)
    assert not marker.exists()
    _assert_one_line_error(_predict(evil, tmp_path, synthetic_root), str(evil), "refused")
    assert not marker.exists()


def test_full_traceback_with_hydra_full_error(tmp_path, synthetic_root):
    fake = tmp_path / "model.ckpt"
    fake.write_text("nope\n")
    result = run_cli(
        [
            "-m",
            "seg_densenet.predict",
            f"ckpt={fake}",
            f"input={_image(synthetic_root)}",
            f"output={tmp_path / 'pred'}",
        ],
        env={"HYDRA_FULL_ERROR": "1"},
    )
    assert result.returncode != 0 and "Traceback" in result.stderr


# -- numerical guard --------------------------------------------------------------------------------
def test_non_finite_loss_stops_training_without_checkpoints(tmp_path, dataset):
    result = _train(
        tmp_path,
        dataset,
        "optim=sgd",
        "optim.lr=1e30",
        "scheduler=none",
        "trainer.max_epochs=2",
        "++trainer.limit_train_batches=4",
    )
    line = _assert_one_line_error(result, "non-finite loss", "step", "patient")
    assert "batch cases" in line
    assert not list((tmp_path / "run").rglob("*.ckpt"))


# Runs `python -m seg_densenet.predict` (through runpy, as -m does) after capping the process's address
# space at what it uses after its imports plus HEADROOM MB: a real allocation failure, no mock.
_CAPPED_PREDICT = """
import resource, runpy, sys
headroom_mb = int(sys.argv.pop(1))
import torch, hydra, nibabel, scipy.ndimage, rich.progress  # noqa: the heavy imports, before the cap
import seg_densenet.checkpoint, seg_densenet.models, seg_densenet.data.nifti, seg_densenet.evaluation.metrics
vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + headroom_mb * 2**20,) * 2)
runpy.run_module("seg_densenet.predict", run_name="__main__", alter_sys=True)
"""


def test_out_of_memory_gives_the_batch_size_hint_and_the_budget_avoids_it(trained_ckpt, tmp_path):
    # 1024x1024 slices at the model's own spacing (no resampling), 8 of them
    data = np.random.default_rng(0).normal(100, 20, size=(1024, 1024, 8)).astype(np.float32)
    spacing = torch.load(trained_ckpt, map_location="cpu", weights_only=True)["seg_densenet"]["data"][
        "target_spacing"
    ]
    image = tmp_path / "large.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 8.0, 1.0])), image)
    env = {"MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    # one scale: the cap is sized for 1024x1024 passes (scales=[1.0,1.25] would add a 1280x1280 one)
    args = ["-c", _CAPPED_PREDICT, "700", f"ckpt={trained_ckpt}", f"input={image}", "scales=[1.0]"]
    result = run_cli([*args, f"output={tmp_path / 'oom'}", "batch_size=8"], env=env)
    _assert_one_line_error(result, str(image), "out of memory", "lower batch_size (now 8)")
    assert not (tmp_path / "oom").exists() or not list((tmp_path / "oom").rglob("*.nii.gz"))
    # the same cap, with a memory budget: fewer slices per pass, and the mask is written
    result = run_cli(
        [*args, f"output={tmp_path / 'budget'}", "batch_size=8", "memory_budget_mb=150"], env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mask = nib.load(tmp_path / "budget" / "large_pred.nii.gz")
    assert mask.shape == data.shape
