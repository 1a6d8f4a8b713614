"""Loading pretrained DenseNet weights from local files (never downloads).

Accepted files:

* a torchvision-format state dict (``.pth``/``.pt``), also with the legacy key style of the original
  ImageNet weight files (``denselayer1.norm.1.weight`` for ``denselayer1.norm1.weight``);
* a Lightning ``.ckpt`` (a dict with ``"state_dict"``) or any state dict whose keys carry a prefix
  such as ``model.``, ``net.`` or ``module.`` (the prefix under which most keys match is stripped;
  keys outside it, e.g. a loss module's buffers, are ignored);
* a ``.safetensors`` file.

Every pickle is read with ``torch.load(..., map_location="cpu", weights_only=True)``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from seg_densenet.checkpoint import _listing, _one_line, safe_torch_load
from seg_densenet.errors import CheckpointError, ConfigError
from seg_densenet.models.densenet import init_weights

__all__ = ["IMAGENET_FILES", "IN_CHANNEL_MODES", "load_pretrained", "weights_file"]

IMAGENET_FILES = {
    "densenet121": "densenet121-a639ec97.pth",
    "densenet169": "densenet169-b2777c0a.pth",
    "densenet201": "densenet201-c1103571.pth",
    "densenet161": "densenet161-8d451a50.pth",
}
"""torchvision's ImageNet DenseNet files, by the names torch's hub cache stores them under."""

IN_CHANNEL_MODES = ("sum", "mean", "repeat")
STEM_KEY = "features.conv0.weight"
# The regex torchvision uses to rename the original files' "norm.1" / "conv.2" keys to "norm1" / "conv2".
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def weights_file(spec: str | Path, architecture: str) -> Path:
    """The local file behind a weights setting: a path, or ``imagenet`` for torchvision's ImageNet file of
    ``architecture`` in torch's hub cache (``$TORCH_HOME/hub/checkpoints``, by default
    ``~/.cache/torch/hub/checkpoints``), where torchvision keeps what it downloads. Nothing is downloaded.

    Raises:
        CheckpointError: ``imagenet`` for an architecture without ImageNet weights, or the file is not
            there (the message says where it was looked for and the command that fetches it elsewhere).
    """
    if str(spec) != "imagenet":
        return Path(spec)
    if architecture not in IMAGENET_FILES:
        raise CheckpointError(
            f"weights=imagenet: there are ImageNet weights for {', '.join(IMAGENET_FILES)}, "
            f"not for {architecture}"
        )
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / IMAGENET_FILES[architecture]
    if not path.is_file():
        raise CheckpointError(
            f"weights=imagenet: {path} not found (this project never downloads); on a machine with a network run "
            f"python -c \"import torchvision; torchvision.models.{architecture}(weights='IMAGENET1K_V1')\" "
            f"and copy {IMAGENET_FILES[architecture]} into {folder} here (or set TORCH_HOME)"
        )
    return path


def load_pretrained(
    model: nn.Module, path: str | Path, in_channel_mode: str = "sum", strict_classifier: bool = False
) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (a ``DenseNet``) and return the model.

    Args:
        in_channel_mode: how a stem conv ``features.conv0.weight`` of shape ``(O, C_src, kh, kw)`` is
            adapted to a model with ``C`` input channels: ``"sum"`` (``C == 1``: sum of the source
            filters, so a grey image ``x`` gives the source model's response to ``x`` repeated on
            every channel), ``"mean"`` (``C == 1``: their mean) or ``"repeat"`` (any ``C``: tile the
            source filters to ``C`` channels and scale by ``C_src / C``).
        strict_classifier: raise instead of re-initialising the classifier when the class count
            differs. A model without a linear ``classifier`` (``num_classes=0``) ignores classifier keys.

    Raises:
        CheckpointError: unreadable file, non-tensor pickle, or weights that do not fit (the message
            lists the first missing/unexpected keys).
    """
    if in_channel_mode not in IN_CHANNEL_MODES:
        raise ConfigError(
            f"in_channel_mode must be one of {', '.join(IN_CHANNEL_MODES)}, got {in_channel_mode!r}"
        )
    path = Path(path)
    expected = model.state_dict()
    state = _strip_prefix(_read_state_dict(path), expected)
    state = _adapt_classifier(model, state, path, strict_classifier)
    if STEM_KEY in state and STEM_KEY in expected:
        state[STEM_KEY] = _adapt_stem(state[STEM_KEY], expected[STEM_KEY].shape, in_channel_mode, path)

    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        problems = [
            _listing("missing", missing),
            _listing("unexpected", unexpected),
            _listing("shape-mismatched", wrong_shape),
        ]
        raise CheckpointError(
            f"{path}: weights do not fit {type(model).__name__}: " + "; ".join(p for p in problems if p)
        )
    # Files saved before BatchNorm counted batches lack num_batches_tracked; keep the model's.
    model.load_state_dict({**expected, **state}, strict=True)
    return model


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of ``path`` by key, with legacy DenseNet keys renamed."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(err)})") from err
    else:
        obj = safe_torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning checkpoint
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: holds no state dict (expected a dict of tensors or a Lightning checkpoint)"
        )
    state = {}
    for key, value in obj.items():
        if isinstance(value, Tensor):
            match = _LEGACY_KEY.match(key)
            state[match.group(1) + match.group(2) if match else key] = value
    return state


def _strip_prefix(state: dict[str, Tensor], expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys under the prefix (``""``, ``"model."``, ``"module.net."``, ...) under which most keys match
    ``expected``, with that prefix removed; the longest prefix wins a tie."""
    counts: dict[str, int] = {}
    for key in state:
        for prefix in ["", *(key[: i + 1] for i, char in enumerate(key) if char == ".")]:
            if key[len(prefix) :] in expected:
                counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return state
    best = max(counts, key=lambda p: (counts[p], len(p)))
    return {k[len(best) :]: v for k, v in state.items() if k.startswith(best)}


def _adapt_classifier(
    model: nn.Module, state: dict[str, Tensor], path: Path, strict: bool
) -> dict[str, Tensor]:
    """Drop classifier keys the model cannot take (no linear classifier, or another class count) and
    put freshly initialised classifier weights in their place in the latter case."""
    classifier = getattr(model, "classifier", None)
    keys = [k for k in state if k.startswith("classifier.")]
    if not keys:
        return state
    if not isinstance(classifier, nn.Linear):
        return {k: v for k, v in state.items() if k not in keys}
    source = state.get("classifier.weight")
    if (
        source is None
        or source.shape[1] != classifier.in_features
        or source.shape[0] == classifier.out_features
    ):
        return state  # fits, or another architecture: the key check reports it
    if strict:
        raise CheckpointError(
            f"{path}: classifier has {source.shape[0]} classes but the model has {classifier.out_features} "
            "(strict_classifier=True)"
        )
    # A freshly initialised layer, so the model is left untouched if a later check fails.
    fresh_layer = nn.Linear(classifier.in_features, classifier.out_features, bias=classifier.bias is not None)
    init_weights(fresh_layer)
    fresh = {f"classifier.{k}": v for k, v in fresh_layer.state_dict().items()}
    return {**{k: v for k, v in state.items() if k not in keys}, **fresh}


def _adapt_stem(weight: Tensor, target: torch.Size, mode: str, path: Path) -> Tensor:
    """Stem conv weight ``(O, C_src, kh, kw)`` -> ``target`` ``(O, C, kh, kw)`` (see ``load_pretrained``)."""
    if weight.shape == target or weight.shape[0] != target[0] or weight.shape[2:] != target[2:]:
        return weight  # fits, or another architecture: the key check reports it
    src, dst = weight.shape[1], target[1]
    if mode in ("sum", "mean"):
        if dst != 1:
            raise CheckpointError(
                f"{path}: stem conv has {src} input channels, the model {dst}; in_channel_mode={mode!r} "
                "only adapts to 1 channel, use in_channel_mode='repeat'"
            )
        return weight.sum(1, keepdim=True) if mode == "sum" else weight.mean(1, keepdim=True)
    # Tiling keeps each source filter; the scale keeps the response to an image of equal channels.
    return weight.repeat(1, math.ceil(dst / src), 1, 1)[:, :dst] * (src / dst)
