"""What a checkpoint is, before you trust it: ``python -m seg_densenet.info ckpt=FILE``.

Prints, from the file alone (nothing is built, loaded from elsewhere or downloaded): the architecture
and its parameter count, the data and its labels, the training grid (spacing, crop, intensity
normalisation), the augmentation, the validation and test metrics, the command that trained it and
when it was saved. Fields a checkpoint of an older version did not record say so.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from seg_densenet.checkpoint import read_checkpoint
from seg_densenet.config_checks import model_label
from seg_densenet.data.heart_size import size_at
from seg_densenet.data.splits import ALL_FOLDS
from seg_densenet.utils.cli import check_overrides, run_cli

NOT_RECORDED = "not recorded in this checkpoint"
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_ARCHITECTURE_KEYS = (
    "encoder",
    "growth_rate",
    "block_config",
    "num_init_features",
    "bn_size",
    "compression",
    "decoder_layers",
    "decoder_growth_rate",
    "n_layers_per_block",
    "n_pool",
    "upsample",
    "input_skip",
    "drop_rate",
    "in_channels",
    "num_classes",
)


def describe(path: str | Path) -> list[tuple[str, str]]:
    """``(field, text)`` rows describing the checkpoint at ``path``."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    record = ckpt["seg_densenet"]
    data = record.get("data") or ckpt.get("datamodule_hyper_parameters") or {}
    model = record["model"]
    weights = ckpt["state_dict"]
    n_params = sum(
        v.numel() for k, v in weights.items() if k.startswith("model.") and not k.endswith(_BUFFERS)
    )
    arch = ", ".join(f"{k} {_plain(model[k])}" for k in _ARCHITECTURE_KEYS if model.get(k) is not None)
    rows = [
        ("checkpoint", f"{path} ({path.stat().st_size / 1e6:.1f} MB)"),
        ("task", str(record.get("task", NOT_RECORDED))),
        ("architecture", f"{model_label(model)}: {arch}"),
        ("parameters", f"{n_params:,}"),
        *([("initial weights", str(record["init_checkpoint"]))] if record.get("init_checkpoint") else []),
        ("data", _data(data)),
        (
            "labels",
            ", ".join(f"{i} {name}" for i, name in enumerate(record.get("class_names") or []))
            or NOT_RECORDED,
        ),
        ("training grid", _grid(data)),
        ("heart size", _heart_size(record.get("heart_size"))),
        ("augmentation", _augmentation(data.get("augmentation"))),
        ("validation", _metrics(record.get("metrics"), ("val/",)) + _best(ckpt)),
        ("test", _metrics(record.get("test_metrics"), ("test/",))),
        (
            "trained",
            f"epoch {ckpt.get('epoch', '?')}, step {ckpt.get('global_step', '?')}, "
            f"Lightning {ckpt.get('pytorch-lightning_version', '?')}",
        ),
        ("command", record.get("command") or NOT_RECORDED),
        (
            "saved",
            record.get("saved")
            or f"{NOT_RECORDED} (file modified "
            f"{datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec='seconds')})",
        ),
    ]
    return rows


def _plain(value: Any) -> str:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list | tuple) else str(value)


def _data(data: dict) -> str:
    if not data:
        return NOT_RECORDED
    root = data.get("root", "?")
    if data.get("synthetic"):
        return f"synthetic phantom ({data['synthetic'].get('patients', '?')} patients) at {root}"
    split = f", test fold {data['fold']} of {data['n_folds']}" if "fold" in data and "n_folds" in data else ""
    if data.get("fold") == ALL_FOLDS:
        split = ", no test fold (every patient trained)"
    return f"{root}{split}"


def _grid(data: dict) -> str:
    if not data:
        return NOT_RECORDED
    spacing = data.get("target_spacing")
    spacing = f"{_plain(spacing)} mm in-plane" if spacing else "each scan's own pixel grid (no resampling)"
    crop = data.get("crop_size") or data.get("image_size")
    crop = f"crop {'x'.join(map(str, crop))}" if crop else "whole slices"
    norm = f"{data.get('normalization', '?')} after clipping to percentiles {_plain(data.get('percentiles'))}"
    context = int(data.get("context_slices") or 0)
    slices = f"; each slice with {context} neighbour(s) on each side as channels (2.5D)" if context else ""
    return f"{spacing}; {crop}; intensities {norm}{slices}"


def _heart_size(stats: dict | None) -> str:
    """The training hearts' sizes that the predictor's ``auto_scale`` zooms other scans into."""
    if not stats:
        return f"{NOT_RECORDED} (auto_scale is off for this checkpoint)"
    p5, p50, p95 = (size_at(stats, p) for p in (5, 50, 95))
    return f"{p5:.0f} / {p50:.0f} / {p95:.0f} px across (5th / 50th / 95th percentile of {stats['n_volumes']} training volumes)"


def _augmentation(node: Any) -> str:
    if not node:
        return "none" if node is not None else NOT_RECORDED
    parts = []
    for t in node.get("transforms", []):
        name = str(t.get("_target_", "?")).rsplit(".", 1)[-1]
        args = ", ".join(f"{k} {_plain(v)}" for k, v in t.items() if not k.startswith("_"))
        parts.append(f"{name}({args})")
    return "; ".join(parts) or "none"


def _metrics(metrics: dict | None, prefixes: tuple[str, ...]) -> str:
    if not metrics:
        return NOT_RECORDED
    shown = [(k, v) for k, v in metrics.items() if k.startswith(prefixes) and "elapsed" not in k]
    return ", ".join(f"{k} {v:.4f}" for k, v in shown) or NOT_RECORDED


def _best(ckpt: dict) -> str:
    for name, state in (ckpt.get("callbacks") or {}).items():
        if name.startswith("ModelCheckpoint") and state.get("best_model_score") is not None:
            return f" (run's best {state.get('monitor')} {float(state['best_model_score']):.4f})"
    return ""


def print_info(ckpt: str | Path) -> None:
    rows = describe(ckpt)
    width = max(len(field) for field, _ in rows)
    for field, text in rows:
        print(f"{field:<{width}}  {text}", file=sys.stdout)


@hydra.main(version_base="1.3", config_path="../conf", config_name="info")
def _hydra_main(cfg: DictConfig) -> None:
    run_cli(print_info, cfg.ckpt)


def main() -> None:
    check_overrides("info")
    _hydra_main()


if __name__ == "__main__":
    main()
