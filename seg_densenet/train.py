"""Training app: ``python -m seg_densenet.train [task=pipeline|classify|segment] [key=value ...]``.

``train(cfg)`` is a plain function (tests call it with a composed config); ``main`` is the thin Hydra
wrapper that returns the metric named by ``optimized_metric`` so that any sweeper can optimise it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities import rank_zero_only

from seg_densenet import config as _config  # noqa: F401  (registers the ${sd.repo_root:} resolver)
from seg_densenet.checkpoint import load_state_dict_strict, network_state, read_checkpoint, safe_torch_load
from seg_densenet.config_checks import model_label, validate
from seg_densenet.errors import ConfigError, SegDenseNetError
from seg_densenet.lit.precision import resolve_precision
from seg_densenet.models.dense_unet import ENCODER_ARCHITECTURE
from seg_densenet.models.densenet import DenseNet
from seg_densenet.utils.atomic import atomic_write_text
from seg_densenet.utils.cli import check_overrides, run_cli
from seg_densenet.utils.ddp import patch_lightning_hydra_launcher, release_ddp_children

log = logging.getLogger("seg_densenet.train")

STAGE_RECORD = "stage.json"


def train(cfg: DictConfig) -> dict[str, float]:
    """Run the task's stages (classify, segment, or both) and return the final metrics.

    Writes ``summary.json`` at the run directory's root:
    ``{"task", "metrics", "best_checkpoint", "output_dir", "wall_time_s", "stages"}``.
    """
    validate("config", cfg)  # also for multirun jobs and API callers, which check_overrides does not see
    start = time.time()
    run_dir = _run_dir(cfg)
    stages = list(cfg.task.stages)
    plan = [_stage(name) for name in stages]  # every name checked before the first stage trains
    results: dict[str, dict] = {}
    encoder_weights = None
    for index, (stage, runner) in enumerate(zip(stages, plan), start=1):
        stage_dir = run_dir / f"stage{index}_{stage}" if len(stages) > 1 else run_dir
        record = _finished_stage(stage_dir) if cfg.get("ckpt_path") else None
        if record is not None:
            log.info(
                "stage %d/%d (%s): already finished in %s, reusing it", index, len(stages), stage, stage_dir
            )
        else:
            log.info("stage %d/%d (%s): output in %s", index, len(stages), stage, stage_dir)
            if cfg.get("seed") is not None:
                # seeded per stage, so a stage gives the same result whether or not an earlier one ran
                pl.seed_everything(cfg.seed, workers=True)
            record = runner.run(cfg, stage_dir, encoder_weights)
        results[stage] = record
        if runner.pretrains_encoder:
            encoder_weights = record["best_checkpoint"]
    final = results[stages[-1]]
    summary = {
        "task": cfg.task.name,
        "metrics": final["metrics"],
        "best_checkpoint": final["best_checkpoint"],
        "output_dir": str(run_dir),
        "wall_time_s": round(time.time() - start, 1),
        "stages": {
            name: {"metrics": r["metrics"], "best_checkpoint": r["best_checkpoint"]}
            for name, r in results.items()
        },
    }
    if _is_global_zero():
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        _print_summary(summary)
    release_ddp_children()
    return final["metrics"]


# -- stages ---------------------------------------------------------------------------------------
def _run_classification(cfg: DictConfig, stage_dir: Path, encoder_weights: str | None = None) -> dict:
    stage_cfg = cfg.task.classify
    datamodule = _classification_datamodule(cfg, stage_cfg)
    datamodule.setup("fit")
    model_cfg = classifier_config(cfg)
    net = instantiate(model_cfg, num_classes=datamodule.num_classes)
    if not isinstance(net, DenseNet):
        raise ConfigError(
            f"model {model_label(cfg.model)}: the classify stage needs a DenseNet "
            "classifier (densenet121, ...) or a model with a DenseNet encoder (model.encoder) to pretrain"
        )
    record = {
        "task": "classify",
        "model": _container(model_cfg) | {"num_classes": datamodule.num_classes},
        "class_names": list(getattr(datamodule, "class_names", [])),
        "command": command_line(),
    }
    module = instantiate(stage_cfg.module)(
        net,
        instantiate(cfg.optim),
        **_scheduler_kwargs(cfg),
        record=record,
        num_classes=datamodule.num_classes,
        channels_last=cfg.channels_last,
    )
    return _fit(cfg, stage_cfg, module, datamodule, stage_dir)


def _run_segmentation(cfg: DictConfig, stage_dir: Path, encoder_weights: str | None) -> dict:
    stage_cfg = cfg.task.segment
    datamodule = instantiate(cfg.data)
    model_cfg = cfg.model
    overrides = {}
    if encoder_weights is not None:
        if "encoder_weights" not in model_cfg:
            raise ConfigError(f"model {model_label(model_cfg)} has no encoder to receive the stage-1 weights")
        overrides["encoder_weights"] = encoder_weights
        log.info("encoder starts from the stage-1 classifier %s", encoder_weights)
    net = instantiate(model_cfg, **overrides)
    init = stage_cfg.get("init_checkpoint")
    if init:
        _start_from_checkpoint(net, init, encoder_weights or model_cfg.get("encoder_weights"))
    record = {
        "task": "segment",
        "init_checkpoint": str(init) if init else None,
        # the checkpoint holds the trained encoder: rebuilding for prediction must not reload weights
        "model": _container(model_cfg)
        | ({"encoder_weights": None} if "encoder_weights" in model_cfg else {}),
        "data": _container(cfg.data),
        "heart_size": datamodule.heart_sizes(),  # the training hearts' sizes: the predictor's auto_scale
        "class_names": list(datamodule.class_names),
        "command": command_line(),
    }
    module = instantiate(stage_cfg.module)(
        net,
        instantiate(cfg.optim),
        **_scheduler_kwargs(cfg),
        record=record,
        channels_last=cfg.channels_last,
        labels=datamodule.label_set.structures,
    )
    return _fit(cfg, stage_cfg, module, datamodule, stage_dir, {"encoder_weights": encoder_weights})


def _start_from_checkpoint(net: torch.nn.Module, path: str, encoder_weights: str | None) -> None:
    """Load every weight of ``net`` from the segmentation checkpoint ``path`` (fine-tuning a trained model,
    e.g. one pretrained on the phantom, on a few labelled patients); the architecture must match exactly."""
    if encoder_weights:
        raise ConfigError(
            f"task.segment.init_checkpoint={path} sets every weight, the encoder's too: it cannot be combined "
            f"with encoder weights ({encoder_weights}); use task=segment and model.encoder_weights=null"
        )
    load_state_dict_strict(net, network_state(read_checkpoint(path)), path)
    log.info("every weight starts from %s", path)


def _fit(
    cfg: DictConfig,
    stage_cfg: DictConfig,
    module: pl.LightningModule,
    datamodule,
    stage_dir: Path,
    extra: dict | None = None,
) -> dict:
    stage_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):  # what this stage's callbacks and loggers read: ${stage.dir}, ${stage.monitor}
        cfg.stage = {"dir": str(stage_dir), "monitor": stage_cfg.monitor}
    callbacks = [instantiate(cb) for cb in (cfg.get("callbacks") or {}).values() if cb]
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg]
    ckpt_path = _resume_checkpoint(cfg, stage_dir)
    if ckpt_path:
        step = int(safe_torch_load(ckpt_path).get("global_step", 0))
        for logger in loggers:
            if hasattr(logger, "keep_until_step"):  # a logger that carries a resumed run's history over
                logger.keep_until_step = step
    precision = resolve_precision(
        cfg.trainer.get("precision", "32-true"), cfg.trainer.get("accelerator", "auto")
    )
    if precision != cfg.trainer.get("precision"):
        log.info("precision auto: %s on this machine", precision)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        precision=precision,
        callbacks=callbacks,
        logger=loggers or False,
        max_epochs=stage_cfg.max_epochs,
        default_root_dir=str(stage_dir),
    )
    if hasattr(datamodule, "save_split") and trainer.is_global_zero:
        datamodule.setup("fit")
        datamodule.save_split(stage_dir / "split.json")
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = _scalars(trainer.callback_metrics)
    checkpoint_cb = trainer.checkpoint_callback
    best = checkpoint_cb.best_model_path if checkpoint_cb is not None else ""
    if checkpoint_cb is not None and not best:
        best = checkpoint_cb.last_model_path
    if checkpoint_cb is not None and checkpoint_cb.best_model_score is not None:
        metrics[checkpoint_cb.monitor] = float(checkpoint_cb.best_model_score)
    if cfg.get("test", True) and _has_test_data(datamodule):
        metrics.update(_test(trainer, module, datamodule, best))
    record = {"metrics": metrics, "best_checkpoint": best, "epochs": trainer.current_epoch, **(extra or {})}
    if trainer.is_global_zero:
        atomic_write_text(stage_dir / STAGE_RECORD, json.dumps(record, indent=2) + "\n")
    return record


def _test(trainer: pl.Trainer, module: pl.LightningModule, datamodule, best: str) -> dict[str, float]:
    """Test the ``best`` checkpoint's weights (the module's own without one); returns the test metrics,
    which are also added to that checkpoint's record (``python -m seg_densenet.info`` shows them)."""
    from seg_densenet.lit.checkpoint_io import AtomicCheckpointIO

    checkpoint = safe_torch_load(best) if best else None
    if checkpoint is not None:
        # the checkpoint's own weights, which are the average where a WeightAveraging callback ran:
        # Lightning's reload (ckpt_path=best) would hand the test that callback's un-averaged weights
        module.load_state_dict(checkpoint["state_dict"])
    results = trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = _scalars(results[0] if results else {})
    if checkpoint is not None and trainer.is_global_zero:
        tests = {k: v for k, v in metrics.items() if k.startswith("test/")}
        checkpoint.setdefault("seg_densenet", {})["test_metrics"] = tests
        AtomicCheckpointIO().save_checkpoint(checkpoint, Path(best))
    return metrics


def command_line() -> str | None:
    """The command that started this Hydra run (``python -m seg_densenet.train`` and its overrides);
    ``None`` outside one (``train(cfg)`` called from Python)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return " ".join(["python -m seg_densenet.train", *HydraConfig.get().overrides.task])


# -- config helpers -------------------------------------------------------------------------------
def classifier_config(cfg: DictConfig) -> DictConfig:
    """The classifier to pretrain: a DenseNet built from ``cfg.model.encoder`` where the model has a
    DenseNet encoder (dense_unet: same architecture, so its weights hand over exactly), else
    ``cfg.model`` itself, which :func:`_run_classification` checks is a DenseNet classifier once built."""
    model = cfg.model
    if model.get("encoder") is None:
        return model
    params = dict(_container(model.get("encoder_params")) or {})
    for key in ENCODER_ARCHITECTURE:
        if model.get(key) is not None:
            params[key] = _container(model.get(key))
    return OmegaConf.create({
        "_target_": "seg_densenet.models.build_densenet", "name": model.encoder,
        "in_channels": model.in_channels, "drop_rate": 0.0, **params,
    })  # fmt: skip


def _classification_datamodule(cfg: DictConfig, stage_cfg: DictConfig):
    datamodule = instantiate(cfg.data)
    if hasattr(datamodule, "classification_datamodule"):
        datamodule = datamodule.classification_datamodule(batch_size=stage_cfg.get("batch_size"))
    return datamodule


def _scheduler_kwargs(cfg: DictConfig) -> dict[str, Any]:
    sched = cfg.get("scheduler") or {}
    factory = instantiate(sched.get("scheduler")) if sched.get("scheduler") else None
    return {
        "scheduler": factory,
        "scheduler_interval": sched.get("interval", "epoch"),
        "scheduler_total_steps": bool(sched.get("pass_total_steps", False)),
        "scheduler_elapsed_fraction": bool(sched.get("pass_elapsed_fraction", False)),
    }


def _resume_checkpoint(cfg: DictConfig, stage_dir: Path) -> str | None:
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return None
    if ckpt == "last":
        last = stage_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    path = Path(ckpt).resolve()
    # a checkpoint path belongs to the stage whose folder holds it
    return str(path) if stage_dir.resolve() in path.parents else None


def _finished_stage(stage_dir: Path) -> dict | None:
    path = stage_dir / STAGE_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage of ``task.stages``: how it runs, and whether its best checkpoint is the encoder the stages
    after it start from (stage 1 of the pipeline)."""

    run: Callable[[DictConfig, Path, str | None], dict]
    pretrains_encoder: bool = False


STAGES = {
    "classify": Stage(_run_classification, pretrains_encoder=True),
    "segment": Stage(_run_segmentation),
}


def _stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"task.stages: unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    return STAGES[name]


def _run_dir(cfg: DictConfig) -> Path:
    """The run directory; resuming from a checkpoint path continues in the run that holds it."""
    ckpt = cfg.get("ckpt_path")
    if ckpt and ckpt != "last":
        path = Path(ckpt).resolve()
        if not path.is_file():
            raise SegDenseNetError(f"{ckpt}: checkpoint not found")
        for parent in path.parents:
            if (parent / ".hydra").is_dir() or (parent / "summary.json").is_file():
                return parent
    return Path(cfg.paths.output_dir)


def _has_test_data(datamodule) -> bool:
    # LightningDataModule's own test_dataloader only raises: a datamodule has test data if it overrides it
    # and, where it says, holds some out (none with data.fold=all)
    if type(datamodule).test_dataloader is pl.LightningDataModule.test_dataloader:
        return False
    return bool(getattr(datamodule, "has_test_data", True))


def _scalars(metrics) -> dict[str, float]:
    out = {}
    for key, value in dict(metrics).items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        out[key] = float(value)
    return dict(sorted(out.items()))


def _container(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _is_global_zero() -> bool:
    return rank_zero_only.rank == 0


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics = summary["metrics"]
    table = Table(title=f"seg_densenet {summary['task']}: final summary", show_header=True)
    table.add_column("item")
    table.add_column("value", overflow="fold")
    for key in (
        "val/dice_best",
        "val/dice",
        "test/dice",
        "test/dice_rv",
        "test/dice_myo",
        "test/dice_lv",
        "test/hd95",
        "val/acc_best",
        "test/acc",
    ):
        if key in metrics:
            table.add_row(key, f"{metrics[key]:.4f}")
    table.add_row("best checkpoint", summary["best_checkpoint"] or "-")
    table.add_row("output directory", summary["output_dir"])
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s")
    Console(file=sys.stdout).print(table)


# -- entry point ----------------------------------------------------------------------------------
@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    patch_lightning_hydra_launcher()
    metrics = run_cli(train, cfg)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


def main() -> None:
    check_overrides("config")
    _hydra_main()


if __name__ == "__main__":
    main()
