"""Suite ``scaling``: training-step time and memory as depth and image size grow, plain against memory-efficient.

Groups, each interleaved in one process run:

* ``models``: FC-DenseNet56, 67 and 103 at ``depth_size`` (depth), and ``size_model`` at each of
  ``sizes`` (image size). Configurations run smallest first; one whose step is predicted (from the same
  model and mode at a smaller size, scaling with the pixel count) to take longer than ``max_call_s`` or
  to need more than ``max_gb`` is skipped with the prediction as the reason.
* ``dense_block``: one FC-DenseNet dense block (48 input maps, k=16) with ``block_layers`` layers. Its
  plain mode stores the concatenation and BN output of every layer, ``sum_i (48 + 16 i)`` maps: memory
  quadratic in the layer count; the memory-efficient mode stores only the new maps: linear.

The memory figure to compare is ``added_gb``, what the step adds to the process (activations, gradients,
workspace), since the process's own footprint does not scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from benchmarks.measure import Measurement
from benchmarks.training import run_group
from seg_densenet.models import build_model
from seg_densenet.models.layers import DenseBlock

DEPTHS = {"fc_densenet56": 56, "fc_densenet67": 67, "fc_densenet103": 103}


@dataclass(frozen=True)
class ScalingPlan:
    batch: int = 1
    depth_size: int = 224
    depth_models: tuple[str, ...] = ("fc_densenet56", "fc_densenet67", "fc_densenet103")
    size_model: str = "fc_densenet56"
    sizes: tuple[int, ...] = (128, 224, 320)
    block_layers: tuple[int, ...] = (8, 16, 32)
    block_batch: int = 4
    block_size: int = 64
    block_warmup: int = 1
    block_repeats: int = 1
    warmup: int = 0
    repeats: int = 1
    max_call_s: float = 120.0
    max_gb: float = 16.0


PLANS = {
    "full": ScalingPlan(),
    # batch 2: BatchNorm needs two values per channel at the 1x1 bottleneck of a 32x32 input
    "quick": ScalingPlan(
        batch=2,
        depth_size=32,
        sizes=(32, 48),
        block_layers=(2, 4, 8),
        block_batch=2,
        block_size=32,
        block_warmup=0,
        block_repeats=1,
    ),
    "cuda": ScalingPlan(batch=8, warmup=3, repeats=10, block_warmup=3, block_repeats=10),
}


def config_name(model: str, size: int, memory_efficient: bool) -> str:
    return f"{model} {size}x{size} {'memory-efficient' if memory_efficient else 'plain'}"


def models_group(plan: ScalingPlan, device: torch.device) -> dict:
    """The depth and image-size grid in one interleaved run (one model object per architecture)."""
    torch.manual_seed(0)
    grid = {(m, plan.depth_size) for m in plan.depth_models} | {(plan.size_model, s) for s in plan.sizes}
    nets = {m: build_model(m, in_channels=1, num_classes=4).to(device).train() for m, _ in grid}
    results: dict = {}
    # one interleaved run per size (inputs differ), smallest first so that larger sizes can be predicted
    for size in sorted({s for _, s in grid}):
        x = torch.randn(plan.batch, 1, size, size, device=device)
        y = torch.randint(0, 4, (plan.batch, size, size), device=device)
        group = {
            config_name(m, size, me): (nets[m], me)
            for m, s in sorted(grid)
            if s == size
            for me in (False, True)
        }
        results |= run_group(
            group, x, y, device, plan.warmup, plan.repeats, plan.max_call_s, _predictor(plan, results, size)
        )
    for name, value in results.items():
        model, size, mode = name.split(" ")
        value |= {"model": model, "depth": DEPTHS[model], "pixels": int(size.split("x")[0]) ** 2}
    return results


def _predictor(
    plan: ScalingPlan, done: dict, size: int
) -> Callable[[str, dict[str, Measurement]], str | None]:
    """Skip check: scale the same model and mode's largest measured smaller size by the pixel ratio."""

    def check(name: str, _: dict) -> str | None:
        model, _, mode = name.split(" ")
        smaller = [
            (int(n.split(" ")[1].split("x")[0]), r)
            for n, r in done.items()
            if n.startswith(model + " ") and n.endswith(mode) and r["status"] == "ok"
        ]
        if not smaller:
            return None
        s, ref = max(smaller, key=lambda t: t[0])
        factor = (size / s) ** 2
        seconds = ref["median_s"] * factor
        peak_gb = ref["peak_gb"] - ref["added_gb"] + ref["added_gb"] * factor
        if seconds > plan.max_call_s or peak_gb > plan.max_gb:
            return (
                f"predicted {seconds:.0f} s and {peak_gb:.1f} GB per step from {s}x{s} "
                f"(limits {plan.max_call_s:.0f} s, {plan.max_gb:.0f} GB)"
            )
        return None

    return check


def dense_block_group(plan: ScalingPlan, device: torch.device) -> dict:
    """One dense block (48 input maps, k=16) of each length in ``block_layers``, plain and memory-efficient."""
    torch.manual_seed(0)
    x = torch.randn(plan.block_batch, 48, plan.block_size, plan.block_size, device=device)
    # the block's output maps are scored as classes 0-3 of a per-pixel cross-entropy: any loss would do
    y = torch.randint(0, 4, (plan.block_batch, plan.block_size, plan.block_size), device=device)
    group = {}
    for layers in plan.block_layers:
        block = DenseBlock(48, layers, growth_rate=16).to(device).train()
        for me in (False, True):
            group[f"{layers} layers {'memory-efficient' if me else 'plain'}"] = (block, me)
    results = run_group(group, x, y, device, plan.block_warmup, plan.block_repeats, plan.max_call_s)
    for name, value in results.items():
        value["layers"] = int(name.split(" ")[0])
        value["plain_stored_maps"] = sum(48 + 16 * i for i in range(value["layers"])) * 2
    return results


def run(plan: ScalingPlan, device: torch.device, log: Callable[[str], None] = print) -> dict:
    log("scaling/dense_block ...")
    out = {"plan": asdict(plan), "dense_block": dense_block_group(plan, device)}
    log("scaling/models ...")
    out["models"] = models_group(plan, device)
    return out
