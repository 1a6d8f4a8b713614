"""What the machine's hardware runs natively: bf16 arithmetic (CPU: AMX-BF16, AVX512-BF16; or a GPU),
int8 dot products (CPU: VNNI, AMX-INT8)."""

from __future__ import annotations

import os

import torch

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 arithmetic
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # flags of CPUs with int8 dot-product instructions


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's flags from ``cpuinfo`` (empty where it cannot be read)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


BELOW_BF16_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
"""Values of oneDNN's ``ONEDNN_MAX_CPU_ISA`` that keep its bf16 instructions off."""


def native_bf16(device_type: str, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether bf16 runs on hardware for ``device_type`` (``cpu`` or ``cuda``). oneDNN also runs bf16 on
    AVX-512 CPUs without :data:`NATIVE_BF16_FLAGS`, by conversion, slower than fp32; and where
    ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) caps it below AVX512_CORE_BF16, it has none either."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if cap.upper() in BELOW_BF16_ISAS:
        return False
    return not cpu_flags(cpuinfo).isdisjoint(NATIVE_BF16_FLAGS)


def cpu_has_int8_dot(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU has int8 dot-product instructions (:data:`INT8_DOT_FLAGS`); without them ONNX Runtime
    advises 7-bit weights (``reduce_range``) against overflow in the 16-bit intermediate sums."""
    return not cpu_flags(cpuinfo).isdisjoint(INT8_DOT_FLAGS)
