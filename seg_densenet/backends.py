"""Inference backends for prediction: the PyTorch network, or ONNX Runtime running the checkpoint's
exported graph (``backend=onnxruntime``; ``auto`` takes it where it applies: a CPU, fp32, no MC dropout).

The ONNX graph is exported once per checkpoint, checked against PyTorch on several shapes by
:func:`seg_densenet.export.export_onnx`, and cached beside the checkpoint as
``<checkpoint>.<sha256[:16]>.onnx`` (keyed by the checkpoint's content, so a retrained file gets a new
export); a checkpoint folder that cannot be written caches it in the temporary folder instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from seg_densenet.errors import ConfigError, StorageError

log = logging.getLogger("seg_densenet.predict")

BACKENDS = ("torch", "onnxruntime", "auto")


class OnnxRuntimeModel(nn.Module):
    """An exported network run by ONNX Runtime, called like the PyTorch module it came from:
    ``(B, C, H, W)`` float32 tensor -> logits ``(B, classes, H, W)`` float32 tensor (CPU)."""

    def __init__(self, path: str | Path, min_size: int = 1, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.min_size = min_size

    def forward(self, x: Tensor) -> Tensor:
        try:
            out = self.session.run(None, {"image": x.detach().float().contiguous().cpu().numpy()})[0]
        except Exception as err:  # ONNX Runtime's own error types: one for every failure
            if "allocate memory" in str(err):  # as PyTorch's, so the predictor's batch-size hint applies
                raise torch.OutOfMemoryError(f"ONNX Runtime ran out of memory: {err}") from err
            raise
        return torch.from_numpy(out)


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_onnx(ckpt: str | Path) -> Path:
    """The checked ONNX export of ``ckpt``, exported on first use (see the module docstring)."""
    from seg_densenet.export import export_onnx

    ckpt = Path(ckpt)
    name = f"{ckpt.name}.{file_digest(ckpt)[:16]}.onnx"
    for folder in (ckpt.parent, Path(tempfile.gettempdir()) / "seg_densenet-onnx"):
        path = folder / name
        if path.is_file():
            return path
        try:
            diff = export_onnx(ckpt, path)
        except StorageError:
            continue
        log.info("exported %s for onnxruntime (max difference to PyTorch %.1e)", path, diff)
        return path
    raise StorageError(f"{ckpt}: no writable folder for its ONNX export; use backend=torch")


def resolve_backend(
    backend: str, device: str, precision: str, mc_samples: int, memory_budget_mb: float | None = None
) -> str:
    """``torch`` or ``onnxruntime`` for the request; ``auto`` takes onnxruntime on a CPU in fp32 without
    MC dropout when it is installed, and not under a memory budget (the budget's slices per pass are
    measured for PyTorch's allocator; ONNX Runtime's arena needs more and keeps it)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend}: valid values are {', '.join(BACKENDS)}")
    eligible = device == "cpu" and str(precision) == "32" and not mc_samples
    installed = importlib.util.find_spec("onnxruntime") is not None
    if backend == "auto":
        return "onnxruntime" if eligible and installed and not memory_budget_mb else "torch"
    if backend == "onnxruntime" and not eligible:
        raise ConfigError(
            f"backend=onnxruntime runs on the CPU in fp32 without MC dropout; got device={device}, "
            f"precision={precision}, mc_samples={mc_samples} (use backend=torch)"
        )
    if backend == "onnxruntime" and not installed:
        raise ConfigError(
            "backend=onnxruntime: onnxruntime is not installed (pip install 'seg-densenet[export]')"
        )
    return backend
