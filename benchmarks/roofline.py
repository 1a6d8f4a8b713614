"""The machine's ceiling and each model's place under it.

* :func:`conv_ceiling`: GFLOP/s of one large 3x3 convolution (the densest work these networks do),
  in NCHW and NHWC, the better of the two being the ceiling; fp32 always, bf16 where the hardware has it
  (a GPU, or a CPU with native bf16: AVX512-BF16 or AMX). Every suite measures it first, under the same
  load as its own rows.
* :func:`forward_gflop` / :func:`training_gflop`: a model's FLOPs counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` on the ``meta`` device (shapes only, no arithmetic),
  so counting costs nothing at full size. A multiply-add counts as 2 FLOPs, as in the ceiling.

A row's GFLOP/s is its GFLOP per item times items/s; its share of the ceiling is that over the ceiling.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from seg_densenet.utils.hardware import native_bf16


@dataclass(frozen=True)
class CeilingPlan:
    batch: int = 4
    channels: int = 256
    size: int = 56
    warmup: int = 2
    repeats: int = 5


CEILING_PLANS = {
    "full": CeilingPlan(),
    "quick": CeilingPlan(batch=1, channels=32, size=16, warmup=1, repeats=1),
    "cuda": CeilingPlan(batch=32, channels=256, size=56, warmup=5, repeats=20),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conv_ceiling(device: torch.device, plan: CeilingPlan, dtype: torch.dtype = torch.float32) -> dict:
    """GFLOP/s of a ``channels`` -> ``channels`` 3x3 convolution on ``(batch, channels, size, size)``."""
    conv = nn.Conv2d(plan.channels, plan.channels, 3, padding=1, bias=False).to(device, dtype).eval()
    x = torch.randn(plan.batch, plan.channels, plan.size, plan.size, device=device, dtype=dtype)
    gflop = 2 * plan.batch * plan.channels**2 * 9 * plan.size**2 / 1e9
    layouts = {
        "NCHW": (conv, x),
        "NHWC": (
            copy.deepcopy(conv).to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in layouts}
    with torch.inference_mode():
        for round_index in range(plan.warmup + plan.repeats):  # interleaved, as every comparison here
            for name, (module, inp) in layouts.items():
                _sync(device)
                start = time.perf_counter()
                module(inp)
                _sync(device)
                if round_index >= plan.warmup:
                    seconds[name].append(time.perf_counter() - start)
    rates = {name: round(gflop / statistics.median(s), 3) for name, s in seconds.items()}
    return {
        "status": "ok",
        "dtype": str(dtype).removeprefix("torch."),
        "gflop_per_call": round(gflop, 3),
        "layouts_gflop_per_s": rates,
        "gflop_per_s": max(rates.values()),
        **asdict(plan),
    }


def measure(device: torch.device, plan_key: str) -> dict:
    """The ceiling of ``device``: fp32, and bf16 where native (else the reason it is not measured)."""
    plan = CEILING_PLANS[plan_key]
    out = {"fp32": conv_ceiling(device, plan)}
    if native_bf16(device.type):
        out["bf16"] = conv_ceiling(device, plan, torch.bfloat16)
    else:
        where = "this GPU" if device.type == "cuda" else "this CPU (no AVX512-BF16 or AMX)"
        out["bf16"] = {"status": "skipped", "reason": f"no native bf16 on {where}"}
    return out


def meta_copy(model: nn.Module) -> nn.Module:
    """``model`` rebuilt on the ``meta`` device without copying its weights (a deepcopy whose memo maps
    every parameter and buffer to an empty meta tensor of the same shape)."""
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _counted(run) -> float:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 1e9


def forward_gflop(model: nn.Module, shape: tuple[int, ...]) -> float | None:
    """GFLOP of one eval-mode forward pass of ``model`` on a ``shape`` input (None if it cannot be counted)."""
    meta = meta_copy(model).eval()
    x = torch.empty(shape, device="meta")
    try:
        with torch.no_grad():
            return _counted(lambda: meta(x))
    except Exception:  # an operator without a meta kernel: no count rather than a wrong one
        return None


def training_gflop(model: nn.Module, shape: tuple[int, ...]) -> float | None:
    """GFLOP of one training step's forward and backward (cross-entropy) on a ``shape`` input, counted
    on the plain network: the memory-efficient mode's recomputation is extra work, not useful work."""
    meta = meta_copy(model).train()
    for m in meta.modules():
        if hasattr(m, "memory_efficient"):
            m.memory_efficient = False
    x = torch.empty(shape, device="meta")

    def step() -> None:
        out = meta(x)
        target = torch.zeros((out.shape[0], *out.shape[2:]), dtype=torch.long, device="meta")
        nn.functional.cross_entropy(out, target).backward()

    try:
        return _counted(step)
    except Exception:
        return None


def per_item(gflop: float | None, items: int = 1) -> float | None:
    """A row's ``gflop_per_item`` (4 decimals) from the GFLOP of one call of ``items`` items; None if not counted."""
    return round(gflop / items, 4) if gflop else None


def place(gflop_per_item: float | None, items_per_s: float | None, ceiling_gflop_per_s: float | None) -> dict:
    """``{"gflop_per_s", "pct_of_ceiling"}`` of a row (None where a figure is missing)."""
    if not gflop_per_item or not items_per_s:
        return {"gflop_per_s": None, "pct_of_ceiling": None}
    rate = gflop_per_item * items_per_s
    pct = 100.0 * rate / ceiling_gflop_per_s if ceiling_gflop_per_s else None
    return {"gflop_per_s": rate, "pct_of_ceiling": pct}
