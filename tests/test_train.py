"""The training app: config tree, tasks, pipeline hand-off, and the real CLI end to end."""

from __future__ import annotations

import csv
import inspect
import itertools
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger

from seg_densenet.checkpoint import safe_torch_load
from seg_densenet.config import CONFIG_DIR, REPO_ROOT
from seg_densenet.lit.precision import resolve_precision
from seg_densenet.train import train
from tests.conftest import quick_overrides, run_cli

GROUPS = (
    "task",
    "model",
    "data",
    "optim",
    "scheduler",
    "trainer",
    "callbacks",
    "logger",
    "experiment",
    "hparams_search",
    "debug",
)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_help_lists_groups_and_cfg_job_prints_config():
    result = run_cli(["-m", "seg_densenet.train", "--help"])
    assert result.returncode == 0, result.stderr
    for group in GROUPS:
        assert f"{group}:" in result.stdout
    for option in ("pipeline", "classify", "segment", "dense_unet", "fc_densenet103", "synthetic_quick"):
        assert option in result.stdout
    result = run_cli(["-m", "seg_densenet.train", "--cfg", "job", "model=fc_densenet56"])
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.model._target_.endswith(".fc_densenet56") and cfg.task.name == "pipeline"


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_composes_and_instantiates(group, compose_cfg, tmp_path):
    options = _options(group)
    assert options, f"conf/{group}/ is empty"
    for option in options:
        extra = []
        if (group, option) == ("data", "nnunet"):  # its classes come from the dataset's dataset.json
            (tmp_path / "nnunet").mkdir()
            (tmp_path / "nnunet" / "dataset.json").write_text(
                '{"channel_names": {"0": "MRI"}, "labels": {"background": 0, "LV": 1}, "file_ending": ".nii.gz"}'
            )
            extra = [f"data.root={tmp_path / 'nnunet'}"]
        cfg = compose_cfg([f"{group}={option}", *extra])
        resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        assert resolved["task"]["stages"]
        if group == "model":
            net = instantiate(cfg.model)
            assert isinstance(net, torch.nn.Module)
        elif group == "data":
            dm = instantiate(cfg.data)
            assert hasattr(dm, "train_dataloader")
        elif group == "optim":
            opt = instantiate(cfg.optim)([torch.nn.Parameter(torch.zeros(1))])
            assert isinstance(opt, torch.optim.Optimizer)
        elif group == "scheduler" and cfg.scheduler.scheduler is not None:
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
            factory = instantiate(cfg.scheduler.scheduler)
            kwargs = (
                {"total_steps": 10} if "total_steps" in inspect.signature(factory.func).parameters else {}
            )
            factory(opt, **kwargs).step()
        elif group == "trainer":
            # build it as a single CPU process (ddp's second process is tested end to end below)
            trainer = instantiate(
                cfg.trainer,
                accelerator="cpu",
                devices=1,
                strategy="auto",
                logger=False,
                enable_checkpointing=False,
            )
            assert trainer.max_epochs == cfg.trainer.max_epochs
        elif group in ("callbacks", "logger"):
            cfg.stage = {"dir": str(tmp_path), "monitor": "val/dice"}  # as train() fills it in for a stage
            for node in (cfg[group] or {}).values():
                built = instantiate(node)
                if isinstance(built, ModelCheckpoint):
                    assert (built.dirpath, built.monitor) == (str(tmp_path / "checkpoints"), "val/dice")
                if isinstance(built, Logger):
                    assert Path(built.save_dir) == tmp_path


def test_slurm_launcher_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == 1


@pytest.mark.parametrize("task", ["classify", "segment", "pipeline"])
def test_fast_dev_run_of_each_task(task, compose_cfg, tmp_path, synthetic_root):
    cfg = compose_cfg([*quick_overrides(tmp_path, synthetic_root), f"task={task}", "debug=fast_dev_run"])
    metrics = train(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == task
    assert summary["metrics"] == pytest.approx(metrics, nan_ok=True)
    key = "val/acc" if task == "classify" else "val/dice"
    assert key in metrics and 0.0 <= metrics[key] <= 1.0


def test_classify_stage_learns_the_phase_and_position_of_slices(compose_cfg, tmp_path, synthetic_root):
    overrides = [
        *quick_overrides(tmp_path, synthetic_root),
        "task=classify",
        "data.pretrain_target=phase_position",
    ]
    metrics = train(compose_cfg([*overrides, "debug=fast_dev_run"]))
    assert 0.0 <= metrics["val/acc"] <= 1.0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    ckpt = safe_torch_load(Path(summary["stages"]["classify"]["best_checkpoint"]))
    assert ckpt["state_dict"]["model.classifier.weight"].shape[0] == 6


def test_channels_last_training_runs_in_nhwc_and_matches_nchw(compose_cfg, tmp_path, synthetic_root):
    from seg_densenet.lit.segmentation import SegmentationModule

    cfg = compose_cfg(
        [
            *quick_overrides(tmp_path, synthetic_root),
            "task=segment",
            "debug=fast_dev_run",
            "channels_last=true",
        ]
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["val/dice"] <= 1.0
    net = instantiate(cfg.model)
    nchw = SegmentationModule(net, instantiate(cfg.optim))
    nhwc = SegmentationModule(instantiate(cfg.model), instantiate(cfg.optim), channels_last=True)
    nhwc.model.load_state_dict(nchw.model.state_dict())
    kernels = [p for p in nhwc.model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert kernels and all(k.is_contiguous(memory_format=torch.channels_last) for k in kernels)
    x = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(nhwc.eval()(x), nchw.eval()(x), atol=1e-5, rtol=1e-4)


def test_deep_supervision_trains_through_the_config(compose_cfg, tmp_path, synthetic_root):
    cfg = compose_cfg(
        [
            *quick_overrides(tmp_path, synthetic_root),
            "task=segment",
            "debug=fast_dev_run",
            "model.deep_supervision=2",
        ]
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["val/dice"] <= 1.0 and math.isfinite(metrics["train/loss"])


def test_pipeline_hands_stage1_weights_to_the_encoder(compose_cfg, tmp_path, synthetic_root):
    cfg = compose_cfg([*quick_overrides(tmp_path, synthetic_root), "task.segment.max_epochs=2"])
    train(cfg)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    stage1_ckpt = Path(summary["stages"]["classify"]["best_checkpoint"])
    assert stage1_ckpt.parent.parent == run / "stage1_classify"
    assert (run / "stage2_segment" / "checkpoints" / "last.ckpt").is_file()
    assert (run / "stage2_segment" / "split.json").is_file()
    assert "test/dice" in summary["metrics"] and "val/dice_best" in summary["metrics"]
    # the stage-2 record names the stage-1 checkpoint it started from ...
    record = json.loads((run / "stage2_segment" / "stage.json").read_text())
    assert record["encoder_weights"] == str(stage1_ckpt)
    # ... and the encoder built that way holds exactly the stage-1 classifier's features
    classifier_state = torch.load(stage1_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    net = instantiate(cfg.model, encoder_weights=str(stage1_ckpt))
    encoder_state = net.encoder.state_dict()
    compared = 0
    for key, value in classifier_state.items():
        if key.startswith("model.features."):
            enc_key = next(k for k in encoder_state if k.endswith(key.removeprefix("model.")))
            torch.testing.assert_close(encoder_state[enc_key], value, rtol=0, atol=0)
            compared += 1
    assert compared > 20


def test_same_seed_gives_identical_metrics(compose_cfg, tmp_path, synthetic_root):
    overrides = [*quick_overrides(tmp_path, synthetic_root), "task=segment", "test=false"]
    first = train(compose_cfg(overrides, tmp_path / "a"))
    second = train(compose_cfg(overrides, tmp_path / "b"))
    assert first["val/dice"] == second["val/dice"]
    assert first["train/loss"] == second["train/loss"]


def test_bf16_mixed_precision_on_cpu(compose_cfg, tmp_path, synthetic_root):
    cfg = compose_cfg(
        [
            *quick_overrides(tmp_path, synthetic_root),
            "task=segment",
            "debug=fast_dev_run",
            "trainer.precision=bf16-mixed",
        ]
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.parametrize(
    ("flags", "expected"), [("avx2 amx_bf16 amx_tile", "bf16-mixed"), ("avx2 fma", "32-true")]
)
def test_precision_auto_is_bf16_only_where_the_cpu_has_it(flags, expected, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
    assert resolve_precision("auto", "cpu", str(cpuinfo)) == expected
    assert resolve_precision("auto", "cpu", str(tmp_path / "missing")) == "32-true"
    assert resolve_precision("16-mixed", "cpu", str(cpuinfo)) == "16-mixed"  # an explicit choice stays


def test_precision_auto_trains_with_what_this_machine_offers(compose_cfg, tmp_path, synthetic_root, caplog):
    cfg = compose_cfg(
        [
            *quick_overrides(tmp_path, synthetic_root),
            "task=segment",
            "debug=fast_dev_run",
            "trainer.precision=auto",
        ]
    )
    with caplog.at_level("INFO", logger="seg_densenet.train"):
        metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert f"precision auto: {resolve_precision('auto', 'cpu')} on this machine" in caplog.text


@pytest.mark.slow
def test_cli_synthetic_quick_end_to_end(tmp_path, synthetic_root):
    run = tmp_path / "run"
    result = run_cli(
        [
            "-m",
            "seg_densenet.train",
            *quick_overrides(tmp_path, synthetic_root),
            "task.segment.max_epochs=4",
            f"hydra.run.dir={run}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "pipeline" and summary["output_dir"] == str(run)
    assert set(summary) >= {"task", "metrics", "best_checkpoint", "output_dir", "wall_time_s"}
    for stage in ("stage1_classify", "stage2_segment"):
        assert (run / stage / "checkpoints" / "last.ckpt").is_file()
        assert (run / stage / "csv" / "metrics.csv").is_file()
    assert (run / ".hydra" / "config.yaml").is_file()
    assert "final summary" in result.stdout and "best checkpoint" in result.stdout
    # stdout is a pipe here, not a terminal: one plain progress line per epoch, on stdout and in train.log
    log = (run / "train.log").read_text()
    for text in (result.stdout, log):
        seg_lines = [
            line
            for line in text.splitlines()
            if "val dice" in line and line.split("epoch ")[-1][:1].isdigit()
        ]
        assert seg_lines, text[-3000:]
        assert re.search(
            r"epoch 1/\d+ step \d+ loss \d\.\d{4} \| val dice 0\.\d{3} \(lv \d\.\d{3} myo \d\.\d{3} "
            r"rv \d\.\d{3}\) best \d\.\d{3} \| \d+\.\d min, ~\d+\.\d min left",
            seg_lines[0],
        ), seg_lines[0]
        assert re.search(r"epoch 1/\d+ step \d+ loss .* \| val acc \d\.\d{3}", text), text[-3000:]
    # what the checkpoint says about itself, from the file alone
    result = run_cli(["-m", "seg_densenet.info", f"ckpt={summary['best_checkpoint']}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    info = {}
    for line in result.stdout.splitlines():
        field, _, text = line.partition("  ")
        info[field.strip()] = text.strip()
    assert info["task"] == "segment" and info["architecture"].startswith("DenseUNet: encoder densenet121, ")
    assert int(info["parameters"].replace(",", "")) > 10_000
    assert info["labels"] == "0 background, 1 RV, 2 MYO, 3 LV"
    assert "crop 64x64" in info["training grid"] and "[3.0, 3.0] mm" in info["training grid"]
    assert "Affine(" in info["augmentation"]
    assert re.fullmatch(
        r"\d+ / \d+ / \d+ px across \(5th / 50th / 95th percentile of \d+ training volumes\)",
        info["heart size"],
    )
    assert re.search(r"val/dice 0\.\d{4}", info["validation"]) and re.search(
        r"test/dice 0\.\d{4}", info["test"]
    )
    assert info["command"].startswith("python -m seg_densenet.train experiment=synthetic_quick ")
    assert info["saved"].startswith("20") and "not recorded" not in info["saved"]
    # validation Dice against wall-clock minutes, from the run's own metrics.csv
    curve = tmp_path / "curve.png"
    result = run_cli(["-m", "seg_densenet.training_curve", str(run / "stage2_segment"), "--out", str(curve)])
    assert result.returncode == 0, result.stderr[-3000:]
    table = curve.with_suffix(".md").read_text()
    assert (
        curve.stat().st_size > 1000
        and "best val Dice by 10 min" in table
        and "| stage2_segment | 0." in table
    )
    result = run_cli(["-m", "seg_densenet.training_curve", str(tmp_path), "--out", str(curve)])
    assert result.returncode == 2 and "no metrics file" in result.stderr


def test_acdc_denseunet_trains_under_bf16_mixed_with_memory_efficient_layers(
    compose_cfg, tmp_path, synthetic_root
):
    # trainer=gpu is bf16-mixed and dense_unet is memory-efficient: the recomputing backward broke under
    # autocast (oneDNN: no convolution primitive for bf16 activations and fp32 weights); the CPU's
    # autocast stands in for the GPU's here
    cfg = compose_cfg(
        [
            "experiment=acdc_denseunet",
            f"data.root={synthetic_root}",
            "data.synthetic=null",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.num_workers=0",
            "data.crop_size=[64,64]",
            "data.augment_margin=0",
            "data.batch_size=2",
            "debug=fast_dev_run",
            "trainer.precision=bf16-mixed",
        ]
    )
    assert cfg.model.memory_efficient and cfg.model.encoder == "densenet121"
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_acdc_recipe_trains_on_every_patient_for_its_steps(compose_cfg, tmp_path, synthetic_root):
    # the recipe's own settings (patches anywhere, augmentation margin, strong augmentation), shrunk
    cfg = compose_cfg(
        [
            "experiment=acdc_recipe_cpu",
            f"data.root={synthetic_root}",
            "data.synthetic=null",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.num_workers=0",
            "data.crop_size=[48,48]",
            "data.augment_margin=8",
            "data.batch_size=4",
            "trainer.max_steps=3",
        ]
    )
    assert cfg.data.foreground_fraction and cfg.data.target_spacing is None
    assert any("VerticalFlip" in t["_target_"] for t in cfg.data.augmentation.transforms)
    # every patient trains (none tested, none validated); the model is the last step's weight average
    assert (
        cfg.data.fold == "all"
        and cfg.data.val_fraction == 0
        and cfg.task.segment.monitor is None
        and "weight_averaging" in cfg.callbacks
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert not any(key.startswith("test/") for key in metrics)  # nothing held out to test on
    run = Path(cfg.paths.output_dir)
    split = json.loads((run / "split.json").read_text())
    assert (
        split["test"] == []
        and split["val"] == []
        and len(split["train"]) == len([d for d in Path(synthetic_root).iterdir() if d.is_dir()])
    )
    # the schedule is in steps: the run stops inside its first epoch, and that step's model is saved
    last = safe_torch_load(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3 and last["epoch"] == 0


@pytest.mark.slow
def test_four_job_multirun_over_growth_rate_and_lr(tmp_path, synthetic_root):
    """The issue's sweep, ``-m model.growth_rate=12,16 optim.lr=1e-3,3e-4``: four jobs, four directories."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "-m",
            "seg_densenet.train",
            "-m",
            *quick_overrides(tmp_path, synthetic_root),
            "task=segment",
            "model.growth_rate=12,16",
            "optim.lr=1e-3,3e-4",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    swept = []
    for job in jobs:
        assert json.loads((job / "summary.json").read_text())["metrics"]["val/dice"] >= 0
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        swept.append((cfg.model.growth_rate, cfg.optim.lr))
    assert sorted(swept) == sorted([(12, 1e-3), (12, 3e-4), (16, 1e-3), (16, 3e-4)])
    # the sweep report is written at the end of the multirun, and on demand
    for name in ("sweep.csv", "sweep.md", "sweep.png"):
        assert (sweep / name).is_file()
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert sorted((int(r["model.growth_rate"]), float(r["optim.lr"])) for r in rows) == sorted(swept)
    assert all(r["val/dice_best"] for r in rows)
    (sweep / "sweep.md").unlink()
    result = run_cli(["-m", "seg_densenet.sweep_report", str(sweep)])
    assert result.returncode == 0 and (sweep / "sweep.md").is_file()


@pytest.mark.slow
def test_the_private_lightning_hook_that_the_ddp_patch_replaces_is_still_there():
    """seg_densenet/utils/ddp.py replaces lightning_fabric's private ``_hydra_subprocess_cmd``: this fails as
    soon as Lightning renames it, changes its signature or stops calling it, before a DDP run would."""
    import inspect

    from lightning_fabric.strategies.launchers import subprocess_script

    from seg_densenet.utils import ddp

    original = subprocess_script._hydra_subprocess_cmd
    assert list(inspect.signature(original).parameters) == list(
        inspect.signature(ddp._job_subprocess_cmd).parameters
    )
    assert "_hydra_subprocess_cmd(local_rank=local_rank)" in inspect.getsource(
        subprocess_script._SubprocessScriptLauncher
    )
    try:
        ddp.patch_lightning_hydra_launcher()
        assert subprocess_script._hydra_subprocess_cmd is ddp._job_subprocess_cmd
    finally:
        subprocess_script._hydra_subprocess_cmd = original


def test_ddp_on_cpu_with_two_processes(tmp_path, synthetic_root):
    run = tmp_path / "run"
    result = run_cli(
        [
            "-m",
            "seg_densenet.train",
            *quick_overrides(tmp_path, synthetic_root),
            "task=segment",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            # a time limit: the schedule reads the share spent on both processes (rank 0's, broadcast)
            "++trainer.max_time=00:00:30:00",
            f"hydra.run.dir={run}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "distributed_backend=gloo" in result.stdout + result.stderr
        or "GLOBAL_RANK: 1" in result.stdout + result.stderr
    )
    summary = json.loads((run / "summary.json").read_text())
    assert "val/dice" in summary["metrics"]
    # the child process wrote into the same run directory, not a new one
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_resume_after_sigkill_continues_to_the_same_final_epoch(tmp_path, synthetic_root):
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "seg_densenet.train",
        *quick_overrides(tmp_path, synthetic_root),
        "task=segment",
        "trainer.max_epochs=4",
        "test=false",
        f"hydra.run.dir={run}",
    ]
    last = run / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.is_file():
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists()
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert killed_at < 3
    result = run_cli(["-m", "seg_densenet.train", *args[3:], "ckpt_path=last"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["output_dir"] == str(run)
    # one validation row per epoch: the history continues where it stopped, no epoch missing or twice
    assert _logged_epochs(run) == [0, 1, 2, 3]
    # the best validation Dice so far carries over the resume (kept in the checkpoint)
    rows = sorted(_validation_rows(run), key=lambda row: int(float(row["epoch"])))
    dice = [float(row["val/dice"]) for row in rows]
    assert [float(row["val/dice_best"]) for row in rows] == pytest.approx(
        list(itertools.accumulate(dice, max))
    )


def _validation_rows(run: Path) -> list[dict]:
    path = run / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return [row for row in csv.DictReader(f) if row.get("val/dice")]


def _logged_epochs(run: Path) -> list[int]:
    return sorted(int(float(row["epoch"])) for row in _validation_rows(run))


def test_unknown_task_stage_is_a_config_error(compose_cfg, tmp_path, synthetic_root):
    from seg_densenet.errors import ConfigError

    # a bad later stage is reported before the earlier ones spend any time training
    cfg = compose_cfg([*quick_overrides(tmp_path, synthetic_root), "task.stages=[segment,pretrain]"])
    with pytest.raises(ConfigError, match="unknown stage 'pretrain'"):
        train(cfg)
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("stage1_segment"))


def test_init_checkpoint_starts_every_weight_from_a_trained_model(compose_cfg, tmp_path, synthetic_root):
    from seg_densenet.errors import CheckpointError, ConfigError
    from seg_densenet.info import describe

    base = [*quick_overrides(tmp_path, synthetic_root), "task=segment", "test=false"]
    train(compose_cfg(base, tmp_path / "first"))
    first = tmp_path / "first" / "checkpoints" / "last.ckpt"
    # at a learning rate of 1e-12 only BatchNorm's running statistics move: every other weight stays the file's
    train(
        compose_cfg([*base, f"task.segment.init_checkpoint={first}", "optim.lr=1e-12"], tmp_path / "second")
    )
    before = safe_torch_load(first)["state_dict"]
    after = safe_torch_load(tmp_path / "second" / "checkpoints" / "last.ckpt")
    for key, value in after["state_dict"].items():
        if key.startswith("model.") and not key.endswith(
            ("running_mean", "running_var", "num_batches_tracked")
        ):
            assert torch.allclose(value, before[key], rtol=0, atol=1e-9), key
    assert after["seg_densenet"]["init_checkpoint"] == str(first)
    assert ("initial weights", str(first)) in describe(tmp_path / "second" / "checkpoints" / "last.ckpt")
    # another architecture: one line naming the file; with encoder weights as well: refused
    with pytest.raises(CheckpointError, match=f"{first}: weights do not fit DenseUNet: .*wrong-shape"):
        train(
            compose_cfg(
                [*base, f"task.segment.init_checkpoint={first}", "model.growth_rate=4"], tmp_path / "b"
            )
        )
    with pytest.raises(ConfigError, match="cannot be combined with encoder weights"):
        train(compose_cfg([*base, f"task.segment.init_checkpoint={first}", f"model.encoder_weights={first}"]))


def test_repo_root_is_the_checkout():
    assert (REPO_ROOT / "conf" / "config.yaml").is_file()


def test_tensorboard_gets_a_coloured_validation_overlay_per_epoch(compose_cfg, tmp_path, synthetic_root):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    cfg = compose_cfg(
        [
            *quick_overrides(tmp_path, synthetic_root),
            "task=segment",
            "test=false",
            "logger=tensorboard",
            "trainer.max_epochs=2",
        ]
    )
    train(cfg)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={IMAGES: 0})
    events.Reload()
    assert "val/overlay" in events.Tags()["images"]
    images = events.Images("val/overlay")
    assert len(images) == 2 and images[0].width > 300 and images[0].height > 150


def test_classify_stage_pretrains_the_encoder_or_refuses_a_model_without_one(
    compose_cfg, tmp_path, synthetic_root
):
    from seg_densenet.errors import ConfigError
    from seg_densenet.train import classifier_config

    unet = compose_cfg([*quick_overrides(tmp_path, synthetic_root), "model.growth_rate=8"])
    classifier = instantiate(classifier_config(unet), num_classes=5)
    assert classifier.features.denseblock1.denselayer1.conv2.out_channels == 8  # the encoder's architecture
    cfg = compose_cfg([*quick_overrides(tmp_path, synthetic_root), "task=classify", "model=fc_densenet56"])
    with pytest.raises(
        ConfigError, match="model fc_densenet56: the classify stage needs a DenseNet classifier"
    ):
        train(cfg)


def test_ema_weights_are_what_the_checkpoint_the_test_pass_and_prediction_use(
    compose_cfg, tmp_path, synthetic_root
):
    from seg_densenet.checkpoint import load_model

    cfg = compose_cfg([*quick_overrides(tmp_path, synthetic_root), "task=segment", "callbacks=ema",
                       "trainer.max_epochs=2", f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    metrics = train(cfg)
    best = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]["segment"]["best_checkpoint"]
    saved = torch.load(best, map_location="cpu", weights_only=True)
    key = next(k for k in saved["state_dict"] if k.endswith("conv0.weight"))
    # the averaged weights are the model's; the raw ones are kept beside them to resume
    assert not torch.equal(saved["state_dict"][key], saved["current_model_state"][key])
    model, _ = load_model(best)
    assert torch.equal(model.state_dict()[key.removeprefix("model.")], saved["state_dict"][key])

    # the run's test pass scored the averaged weights, not the raw ones Lightning's own reload restores
    def test_dice(weights: str) -> float:
        datamodule = instantiate(cfg.data)
        module = instantiate(cfg.task.segment.module)(
            instantiate(cfg.model), instantiate(cfg.optim), labels=datamodule.label_set.structures
        )
        module.load_state_dict(saved[weights])
        trainer = pl.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        return trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/dice"]

    averaged, raw = test_dice("state_dict"), test_dice("current_model_state")
    assert abs(averaged - raw) > 1e-4  # two epochs: the average is still far from the raw weights
    assert metrics["test/dice"] == pytest.approx(averaged, abs=1e-6)
