"""The one place where every app's options are checked, right after composition and before any work.

Each app (``config`` = train, ``predict``, ``evaluate``, ``export``, ``robustness``) has a table of
:class:`Rule` s, one per option: its type and range, or the file it must name. Cross-option checks
(the crop size a model can take, data and model channel/class counts, the fold within the folds)
follow the tables. A bad value raises :class:`~seg_densenet.errors.ConfigError` with one line that
names the option, the value and what is allowed; the apps print it and exit with status 2
(:func:`seg_densenet.utils.cli.check_overrides`, which runs :func:`validate` for every plain run, and
:func:`seg_densenet.train.train`, which runs it for multirun jobs and tests).

Options absent from a config (another data or model option has other keys) are not checked; an
option whose value cannot be resolved outside a Hydra run (``${hydra:...}``) is left to the app.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from seg_densenet.data.splits import ALL_FOLDS
from seg_densenet.errors import ConfigError

_ABSENT = object()

Check = Callable[[Any], bool]


@dataclass(frozen=True)
class Rule:
    """Option ``key`` (dotted) must pass ``check``; ``allowed`` says what passes, for the error line."""

    key: str
    check: Check
    allowed: str
    nullable: bool = False


# --- value checks ---------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def int_at_least(low: int) -> tuple[Check, str]:
    return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}"


def number_above(low: float) -> tuple[Check, str]:
    return (lambda v: _is_number(v) and v > low), f"a number > {low:g}"


def number_at_least(low: float) -> tuple[Check, str]:
    return (lambda v: _is_number(v) and v >= low), f"a number >= {low:g}"


def number_in(low: float, high: float, *, high_open: bool = False) -> tuple[Check, str]:
    bracket = ")" if high_open else "]"
    return (
        (lambda v: _is_number(v) and low <= v and (v < high if high_open else v <= high)),
        f"a number in [{low:g}, {high:g}{bracket}",
    )


def one_of(*values: Any) -> tuple[Check, str]:
    texts = ("null" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for v in values)
    shown = ", ".join(dict.fromkeys(texts))  # 32 and "32" read the same: shown once
    return (lambda v: any(v == x and type(v) is type(x) for x in values)), f"one of {shown}"


BOOLEAN = ((lambda v: isinstance(v, bool)), "true or false")


def either(first: tuple[Check, str], second: tuple[Check, str]) -> tuple[Check, str]:
    return (lambda v: first[0](v) or second[0](v)), f"{first[1]} or {second[1].removeprefix('one of ')}"


def pair_of(check: tuple[Check, str]) -> tuple[Check, str]:
    inner, text = check
    return (
        (lambda v: isinstance(v, list | tuple | ListConfig) and len(v) == 2 and all(inner(x) for x in v)),
        "a pair [a, b] of " + _plural(text),
    )


def _plural(text: str) -> str:
    """``"an integer >= 1"`` -> ``"integers >= 1"``."""
    noun, _, rest = text.removeprefix("a ").removeprefix("an ").partition(" ")
    return f"{noun}s {rest}".strip()


def list_of(check: tuple[Check, str]) -> tuple[Check, str]:
    inner, text = check
    return (
        (lambda v: isinstance(v, list | tuple | ListConfig) and len(v) > 0 and all(inner(x) for x in v)),
        "a list [a, b, ...] of " + _plural(text),
    )


SCALE_LIMITS = (0.25, 4.0)
"""Smallest and largest in-plane zoom of multi-scale TTA (``scales``), checked here and by the Predictor."""
SCALES = list_of(number_in(*SCALE_LIMITS))


def existing_file() -> tuple[Check, str]:
    return (lambda v: isinstance(v, str) and Path(v).is_file()), "an existing file"


def existing_files() -> tuple[Check, str]:
    """One existing file, or a non-empty list of them (an ensemble of checkpoints)."""
    one = existing_file()[0]
    return (
        (
            lambda v: (
                one(v) or (isinstance(v, list | tuple | ListConfig) and len(v) > 0 and all(one(x) for x in v))
            )
        ),
        "an existing file or a list [a, b, ...] of existing files",
    )


def existing_path() -> tuple[Check, str]:
    return (lambda v: isinstance(v, str) and Path(v).exists()), "an existing file or folder"


def existing_dir() -> tuple[Check, str]:
    return (lambda v: isinstance(v, str) and Path(v).is_dir()), "an existing folder"


def _writable(path: Path) -> bool:
    """``path`` can be created or written: its nearest existing folder is writable (EROFS counts)."""
    for folder in (path, *path.parents):
        if folder.exists():
            return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)
    return False


def writable_folder(option: str = "output=") -> tuple[Check, str]:
    return (
        (lambda v: isinstance(v, str) and not Path(v).is_file() and _writable(Path(v))),
        f"a folder this user can create or write into (choose another {option})",
    )


def writable_file(option: str = "output=") -> tuple[Check, str]:
    return (
        (lambda v: isinstance(v, str) and not Path(v).is_dir() and _writable(Path(v).parent)),
        f"a file path in a folder this user can write into (choose another {option})",
    )


def _device(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None


DEVICE = (_device, "auto, cpu, cuda or cuda:N")
WEIGHTS = ((lambda v: v == "imagenet" or existing_file()[0](v)), "imagenet or an existing file")
TTA = one_of(False, True, "d4")


def _label_set(v: Any) -> bool:
    from seg_densenet.data.labels import LabelSet

    try:
        LabelSet.from_config(v)
    except ConfigError:
        return False
    return isinstance(v, list | tuple | ListConfig)


def _int_map(check_key: Check, check_value: Check) -> Check:
    return lambda v: (
        isinstance(v, Mapping) and bool(v) and all(check_key(k) and check_value(x) for k, x in v.items())
    )


STRUCTURES = (_label_set, "a list of distinct structure names in class-value order, e.g. [RV, MYO, LV]")
LABEL_VALUES = (
    (
        lambda v: (
            _int_map(lambda k: isinstance(k, str), lambda x: _is_int(x) and x > 0)(v)
            and len(set(v.values())) == len(v)
        )
    ),
    "structure names mapped to distinct label values > 0, e.g. {RV: 1, MYO: 2, LV: 3}",
)
LABEL_MAPPING = (
    _int_map(lambda k: _is_int(k) and k >= 0, lambda x: _is_int(x) and x >= 0),
    "a mapping of label values in the files to class values, e.g. {0: 0, 1: 3, 2: 2, 3: 1}",
)
POSTPROCESS = one_of(None, "none", "lcc")
AUTO_SCALE = (
    (lambda v: pair_of(number_in(0, 100))[0](v) and v[0] <= v[1]),
    "a pair [low, high] of percentiles, 0 <= low <= high <= 100",
)


def rule(key: str, check: tuple[Check, str], *, nullable: bool = False) -> Rule:
    return Rule(key, check[0], check[1], nullable)


# --- the tables -----------------------------------------------------------------------------------
_DATA = [
    rule("data.batch_size", int_at_least(1)),
    rule("data.num_workers", int_at_least(0)),
    rule("data.crop_size", pair_of(int_at_least(1)), nullable=True),
    rule("data.image_size", pair_of(int_at_least(1)), nullable=True),
    rule("data.crop_jitter", int_at_least(0)),
    rule("data.augment_margin", int_at_least(0)),
    rule("data.labelled_patients", int_at_least(1), nullable=True),
    rule("data.pretrain_target", one_of("diagnosis", "phase_position")),
    rule("data.foreground_fraction", number_in(0, 1), nullable=True),
    rule("data.target_spacing", pair_of(number_above(0)), nullable=True),
    rule("data.percentiles", pair_of(number_in(0, 100)), nullable=True),
    rule("data.normalization", one_of("zscore", "minmax", "none")),
    rule("data.n_folds", int_at_least(2)),
    rule("data.fold", either(int_at_least(0), one_of(ALL_FOLDS))),
    rule("data.val_fraction", number_in(0, 1, high_open=True)),
    rule("data.context_slices", int_at_least(0)),
    rule("data.in_channels", int_at_least(1)),
    rule("data.structures", STRUCTURES),
    rule("data.label_mapping", LABEL_MAPPING, nullable=True),
    rule("data.num_classes", int_at_least(2), nullable=True),
    rule("data.synthetic.patients", int_at_least(1)),
    rule("data.pin_memory", BOOLEAN),
    rule("data.persistent_workers", BOOLEAN),
    rule("data.skip_bad_cases", BOOLEAN),
]
_OPTIM = [
    rule("optim.lr", number_above(0)),
    rule("optim.weight_decay", number_at_least(0)),
    rule("optim.momentum", number_in(0, 1, high_open=True)),
    rule("scheduler.scheduler.warmup_fraction", number_in(0, 1, high_open=True)),
    rule("scheduler.scheduler.min_lr_ratio", number_in(0, 1)),
    rule("scheduler.scheduler.gamma", number_in(0, 1)),
    rule("scheduler.interval", one_of("step", "epoch")),
]
_TRAINER = [
    rule("trainer.max_epochs", int_at_least(1)),
    rule("trainer.max_steps", either(int_at_least(1), one_of(-1))),
    rule("trainer.check_val_every_n_epoch", int_at_least(1)),
    rule("trainer.log_every_n_steps", int_at_least(1)),
    rule("trainer.accumulate_grad_batches", int_at_least(1)),
    rule("trainer.num_sanity_val_steps", int_at_least(-1)),
    rule("trainer.gradient_clip_val", number_at_least(0), nullable=True),
    rule(
        "trainer.precision",
        one_of(
            "auto",
            "32-true",
            "32",
            32,
            "bf16-mixed",
            "16-mixed",
            "bf16-true",
            "16-true",
            "64-true",
            "64",
            64,
            "bf16",
            "16",
            16,
            "transformer-engine",
        ),
    ),
]
_TASK = [
    rule("task.segment.max_epochs", int_at_least(1)),
    rule("task.segment.module.loss", one_of("ce", "dice", "dice_ce")),
    rule("task.segment.module.hd95_every_n_epochs", int_at_least(0)),
    rule("task.segment.module.freeze_encoder_epochs", int_at_least(0)),
    rule("task.segment.module.encoder_lr_mult", number_at_least(0)),
    rule("task.segment.module.freeze_encoder_bn", BOOLEAN),
    rule("task.segment.module.inference_batch_size", int_at_least(1)),
    rule("task.classify.max_epochs", int_at_least(1)),
    rule("task.classify.batch_size", int_at_least(1), nullable=True),
    rule("task.classify.module.label_smoothing", number_in(0, 1, high_open=True)),
]
_MODEL = [
    rule("model.growth_rate", int_at_least(1), nullable=True),
    rule("model.num_init_features", int_at_least(1), nullable=True),
    rule("model.bn_size", int_at_least(1), nullable=True),
    rule("model.compression", number_in(0, 1), nullable=True),
    rule("model.drop_rate", number_in(0, 1, high_open=True), nullable=True),
    rule("model.decoder_growth_rate", int_at_least(1), nullable=True),
    rule("model.deep_supervision", int_at_least(0)),
    rule("model.encoder_weights", WEIGHTS, nullable=True),
    rule("model.weights", WEIGHTS, nullable=True),
]
_TRAIN = [
    *_DATA,
    *_OPTIM,
    *_TRAINER,
    *_TASK,
    *_MODEL,
    rule("seed", int_at_least(0), nullable=True),
    rule("test", BOOLEAN),
    rule("channels_last", BOOLEAN),
]
_PREDICTION = [
    rule("batch_size", int_at_least(1)),
    rule("device", DEVICE),
    rule("channels_last", BOOLEAN),
    rule("tta", TTA),
    rule("postprocess", POSTPROCESS),
    rule("scales", SCALES),
    rule("auto_scale", AUTO_SCALE, nullable=True),
]
RULES: dict[str, list[Rule]] = {
    "config": _TRAIN,
    "predict": [
        rule("ckpt", existing_files()),
        rule("input", existing_path()),
        rule("output", writable_folder()),
        *_PREDICTION,
        rule("mc_samples", int_at_least(0)),
        rule("save_probs", BOOLEAN),
        rule("precision", one_of("32", 32, "bf16", "16", 16, "auto")),  # precision=32 reaches Hydra as an int
        rule("memory_budget_mb", number_above(0), nullable=True),
        rule("cine", BOOLEAN),
        rule("backend", one_of("torch", "onnxruntime", "auto")),
        rule("cine_frames", pair_of(int_at_least(1)), nullable=True),
    ],
    "evaluate": [
        rule("pred", existing_dir(), nullable=True),
        rule("gt", existing_dir(), nullable=True),
        rule("ckpt", existing_files(), nullable=True),
        rule("input", existing_dir(), nullable=True),
        rule("output", writable_folder(), nullable=True),
        rule("split", existing_file(), nullable=True),
        rule("subset", one_of("train", "val", "test")),
        rule("allow_missing", BOOLEAN),
        rule("plots", BOOLEAN),
        rule("labels", LABEL_VALUES, nullable=True),
        rule("label_mapping", LABEL_MAPPING, nullable=True),
        rule("predict_options.tta", TTA),
        rule("predict_options.postprocess", POSTPROCESS),
        rule("predict_options.scales", SCALES),
        rule("predict_options.auto_scale", AUTO_SCALE, nullable=True),
        rule("predict_options.batch_size", int_at_least(1)),
        rule("predict_options.mc_samples", int_at_least(0)),
        rule("predict_options.backend", one_of("torch", "onnxruntime", "auto")),
        rule("predict_options.memory_budget_mb", number_above(0), nullable=True),
    ],
    "export": [
        rule("ckpt", existing_file()),
        rule("output", writable_file()),
        rule("format", one_of("onnx")),
        rule("opset", int_at_least(11)),
        rule("image_size", pair_of(int_at_least(1))),
        rule("dynamic_size", BOOLEAN),
        rule("tolerance", number_above(0)),
    ],
    "info": [rule("ckpt", existing_file())],
    "robustness": [
        rule("ckpt", existing_files()),
        rule("input", existing_dir()),
        rule("output", writable_folder()),
        rule("split", existing_file(), nullable=True),
        rule("subset", one_of("train", "val", "test")),
        rule("patients", int_at_least(1), nullable=True),
        *_PREDICTION,
    ],
}


# --- checking -------------------------------------------------------------------------------------
def _value(cfg: DictConfig, key: str) -> Any:
    """The resolved value of ``key``, ``_ABSENT`` if the config has no such key or it cannot be
    resolved outside a Hydra run."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
    except Exception:  # an interpolation only a running Hydra app resolves (${hydra:...})
        return _ABSENT
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(list(value)) if isinstance(value, tuple) else str(value)


def bad_option(key: str, value: Any, allowed: str) -> ConfigError:
    """The one-line error for option ``key``: its value and what is allowed."""
    return ConfigError(f"{key}={_show(value)}: must be {allowed}")


def validate(app: str, cfg: DictConfig) -> None:
    """Check ``cfg`` of ``app`` (a key of :data:`RULES`); raise a one-line ConfigError on the first bad option."""
    for r in RULES.get(app, []):
        value = _value(cfg, r.key)
        if value is _ABSENT:
            continue
        if value is None and r.nullable:
            continue
        if not r.check(value):
            raise bad_option(r.key, value, r.allowed + (" or null" if r.nullable else ""))
    if app == "config":
        _check_training(cfg)


def _check_training(cfg: DictConfig) -> None:
    folds, fold = _value(cfg, "data.n_folds"), _value(cfg, "data.fold")
    if _is_int(folds) and _is_int(fold) and fold >= folds:
        raise bad_option("data.fold", fold, f"an integer in [0, {folds - 1}] (data.n_folds={folds})")
    percentiles = _value(cfg, "data.percentiles")
    if isinstance(percentiles, list) and percentiles[0] >= percentiles[1]:
        raise bad_option("data.percentiles", percentiles, "[low, high] with low < high")
    for key in ("in_channels", "num_classes"):
        data, model = _value(cfg, f"data.{key}"), _value(cfg, f"model.{key}")
        if _is_int(data) and _is_int(model) and data != model:
            raise bad_option(f"model.{key}", model, f"equal to data.{key}={data}")
    context = _value(cfg, "data.context_slices")
    if _is_int(context) and context > 0 and "classify" in (_value(cfg, "task.stages") or []):
        raise bad_option(
            "data.context_slices", context, "0 with classification pretraining (it reads single slices)"
        )
    weights = _value(cfg, "task.segment.module.class_weights")
    classes = _value(cfg, "data.num_classes")
    if weights not in (None, _ABSENT) and "segment" in (_value(cfg, "task.stages") or []):
        if not (
            isinstance(weights, list)
            and all(_is_number(w) and w >= 0 for w in weights)
            and (not _is_int(classes) or len(weights) == classes)
        ):
            raise bad_option(
                "task.segment.module.class_weights", weights, f"a list of {classes} numbers >= 0, or null"
            )
    _check_augmentation(cfg)
    _check_input_size(cfg)
    ckpt = _value(cfg, "ckpt_path")
    if ckpt not in (None, "last", _ABSENT) and not Path(str(ckpt)).is_file():
        raise bad_option("ckpt_path", ckpt, "last, null or an existing checkpoint file")


def _probabilities(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "p":
                yield f"{path}.p", value
            else:
                yield from _probabilities(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _probabilities(value, f"{path}.{index}")


def _check_augmentation(cfg: DictConfig) -> None:
    """Every ``p`` of the augmentation pipeline is a probability."""
    for root in ("data.augmentation", "augmentation"):
        node = _value(cfg, root)
        if node in (None, _ABSENT):
            continue
        for key, value in _probabilities(node, root):
            if not (_is_number(value) and 0 <= value <= 1):
                raise bad_option(key, value, "a probability in [0, 1]")


def _check_input_size(cfg: DictConfig) -> None:
    """Training crops at least the chosen model's smallest input (``min_size`` of the built network)."""
    sizes = [(key, _value(cfg, key)) for key in ("data.crop_size", "data.image_size")]
    sizes = [(key, value) for key, value in sizes if isinstance(value, list)]
    if not sizes:
        return
    minimum = model_min_size(cfg)
    for key, value in sizes:
        if min(value) < minimum:
            name = model_label(_value(cfg, "model"))
            raise bad_option(
                key, value, f"at least [{minimum}, {minimum}] for model {name} (its smallest input)"
            )


def model_label(model_cfg: Mapping[str, Any]) -> str:
    """How messages name a model config: its ``_target_``'s last part (``DenseUNet``, ``fc_densenet56``),
    or the ``name`` of a ``build_model`` config (checkpoints written before the configs named classes)."""
    return str(model_cfg.get("name") or str(model_cfg.get("_target_", "?")).rsplit(".", 1)[-1])


def model_min_size(cfg: DictConfig) -> int:
    """The smallest H and W the configured network (and, for a pipeline, its classifier) takes.

    The network is built on the meta device (no memory, no weights loaded) and asked for ``min_size``.
    """
    import torch
    from hydra.utils import instantiate

    model_cfg = _value(cfg, "model")
    if not isinstance(model_cfg, dict) or "_target_" not in model_cfg:
        return 1
    # no weights loaded; a class count left to the data (an image folder's) does not change the size
    probe = {k: (None if k in ("encoder_weights", "weights") else v) for k, v in model_cfg.items()}
    if probe.get("num_classes", 0) is None:
        probe["num_classes"] = 2
    try:
        with torch.device("meta"):
            net = instantiate(OmegaConf.create(probe))
    except Exception as exc:  # a wrong architecture value: say which model, not where torch failed
        from seg_densenet.utils.cli import user_error

        cause = user_error(exc) or exc
        raise ConfigError(
            f"model {model_label(model_cfg)}: cannot be built: {' '.join(str(cause).split())}"
        ) from exc
    return int(getattr(net, "min_size", 1))
