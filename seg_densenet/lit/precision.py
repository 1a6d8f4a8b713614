"""``trainer.precision: auto``: bf16 autocast where the hardware runs bf16, full fp32 elsewhere.

bf16 autocast pays only where bf16 has hardware kernels: a CPU with AMX-BF16 or AVX512-BF16, or a CUDA
GPU that supports it (else fp16 with loss scaling). On other CPUs autocast converts to and from bf16
and is slower than fp32. Measured for the real-heart recipe's training step (``python -m benchmarks.run
--suite train``, group ``recipe``; docs/benchmarks.md) and for its Dice (docs/results.md).
"""

from __future__ import annotations

import torch

from seg_densenet.utils.hardware import native_bf16


def resolve_precision(
    precision: str | int, accelerator: str = "auto", cpuinfo: str = "/proc/cpuinfo"
) -> str | int:
    """Lightning's precision for ``precision`` (returned unchanged unless it is ``"auto"``): on CUDA
    (``accelerator`` gpu/cuda, or auto with a GPU present) ``bf16-mixed`` where supported, else
    ``16-mixed``; on a CPU ``bf16-mixed`` with native bf16, else ``32-true``."""
    if precision != "auto":
        return precision
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if native_bf16("cuda") else "16-mixed"
    return "bf16-mixed" if native_bf16("cpu", cpuinfo) else "32-true"
