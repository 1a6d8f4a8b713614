"""Reading this project's training checkpoints safely and rebuilding their networks.

Every pickle is read with ``torch.load(weights_only=True)``: a checkpoint from elsewhere cannot run
code. A segmentation checkpoint carries, under ``"seg_densenet"``, the model config and the data
config it was trained with (plain dicts), so prediction needs nothing but the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from seg_densenet.errors import CheckpointError


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path}: refused: the file holds non-tensor objects that weights_only loading does not "
                "unpickle (it may run code); only load it with full unpickling if you trust its source"
            ) from err
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({_one_line(err)})") from err
    except Exception as err:  # zip, EOF and opcode errors of truncated files or files of another kind
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({_one_line(err)})") from err


def read_checkpoint(path: str | Path) -> dict:
    """A training checkpoint of this project: a dict with ``state_dict`` and ``seg_densenet``."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a seg_densenet training checkpoint (no 'state_dict')")
    if "seg_densenet" not in ckpt or "model" not in ckpt["seg_densenet"]:
        raise CheckpointError(
            f"{path}: not a seg_densenet training checkpoint (no model record); weights-only files go to "
            "model.encoder_weights="
        )
    return ckpt


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the network of a checkpoint and load its weights strictly; returns ``(model, record)``."""
    ckpt = read_checkpoint(path)
    record = ckpt["seg_densenet"]
    model = instantiate(record["model"])
    load_state_dict_strict(model, network_state(ckpt), path)
    return model, record


def network_state(ckpt: dict) -> dict:
    """The network's weights of a training checkpoint: its ``model.`` keys, without the prefix."""
    return {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def load_state_dict_strict(model: nn.Module, state: dict, path: str | Path) -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line error listing the key mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [
            _listing("missing", missing),
            _listing("unexpected", unexpected),
            _listing("wrong-shape", shapes),
        ]
        raise CheckpointError(
            f"{path}: weights do not fit {type(model).__name__}: " + "; ".join(p for p in parts if p)
        )
    model.load_state_dict(state, strict=True)


def _listing(what: str, keys: list[str], shown: int = 5) -> str:
    if not keys:
        return ""
    more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{len(keys)} {what} keys ({', '.join(keys[:shown])}{more})"


def _one_line(err: BaseException) -> str:
    return (" ".join(str(err).split()) or type(err).__name__)[:200]
