"""Suite ``train``: one training step (forward, cross-entropy, backward, SGD update), plain and memory-efficient.

Groups, each interleaved in one process run:

* ``densenet121``: torchvision's DenseNet-121 against ours (same weights), ``(B, 3, S, S)``, 1000 classes;
  ours also with per-layer concatenation instead of its shared concatenation storage.
* ``segmentation``: DenseUNet (plain, plain with per-layer concatenation, memory-efficient) against smp's
  Unet(densenet121), ``(B, 1, S, S)``, 4 classes; smp and memory-efficient DenseUNet also channels-last.
* ``fc_densenet``: FC-DenseNet56 and FC-DenseNet103, same input. A step of these takes one to two
  minutes on two CPU cores, so by default each runs a single cold step (their goal is a memory ratio).
* ``recipe``: the model, batch and crop of ``experiment=acdc_recipe_cpu`` (composed from ``conf/``), in
  fp32 and under bf16 autocast, each NCHW and channels-last: the fast paths of the real-heart recipe's
  training step (issue 16, point 4). bf16 runs only where the CPU has native bf16 (or on CUDA).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from benchmarks.measure import SkipCheck, interleave, summaries
from benchmarks.roofline import per_item, training_gflop
from seg_densenet.config import CONFIG_DIR
from seg_densenet.models import build_model
from seg_densenet.models.shared_storage import per_layer_concatenation
from seg_densenet.utils.hardware import native_bf16

PER_LAYER = " (per-layer concatenation)"  # suffix of configurations run without shared storage
CHANNELS_LAST = ", channels_last"  # suffix of configurations whose model and input are NHWC
BF16 = ", bf16 autocast"  # suffix (before CHANNELS_LAST) of configurations whose forward and loss run under bf16 autocast
RECIPE = "acdc_recipe_cpu"  # the experiment whose training step the recipe group measures


@dataclass(frozen=True)
class TrainPlan:
    """batch/size/warmup/repeats of the DenseNet-121 and segmentation groups, ``fc_*`` of the FC-DenseNets;
    ``max_call_s``: a configuration whose step took longer gets no further rounds."""

    batch: int = 8
    size: int = 224
    warmup: int = 1
    repeats: int = 3
    fc_batch: int = 8
    fc_warmup: int = 0
    fc_repeats: int = 1
    max_call_s: float = 150.0
    recipe_batch_size: tuple[int, int] | None = (
        None  # (batch, size) for the recipe group; None: the recipe's own
    )


PLANS = {
    "full": TrainPlan(),
    "quick": TrainPlan(batch=2, size=32, warmup=0, repeats=1, fc_batch=2, recipe_batch_size=(2, 32)),
    "cuda": TrainPlan(warmup=3, repeats=10, fc_warmup=3, fc_repeats=10),
}


def set_memory_efficient(model: nn.Module, value: bool) -> None:
    """Switch every dense layer (ours and torchvision's read the flag at run time) to recompute or store."""
    for m in model.modules():
        if hasattr(m, "memory_efficient"):
            m.memory_efficient = value


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    memory_efficient: bool,
    per_layer: bool = False,
    bf16: bool = False,
) -> Callable[[], None]:
    """A call running one SGD step of ``model`` on ``x`` (B, C, H, W) with targets ``y`` (class ids);
    ``per_layer``: dense blocks concatenate for every layer instead of using shared storage; ``bf16``:
    forward and loss under bf16 autocast (as Lightning's ``bf16-mixed``), the backward outside it."""
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:
        set_memory_efficient(model, memory_efficient)
        optimizer.zero_grad(set_to_none=True)
        with per_layer_concatenation() if per_layer else contextlib.nullcontext():
            with autocast:
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        optimizer.step()

    return step


def run_group(
    models: dict[str, tuple[nn.Module, bool]],
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    warmup: int,
    repeats: int,
    max_call_s: float,
    skip_check: SkipCheck | None = None,
) -> dict:
    """Interleaved training steps of ``models`` ({config name: (model, memory_efficient)}) on ``x``, ``y``;
    a name ending in :data:`PER_LAYER` runs without shared concatenation storage, one ending in
    :data:`CHANNELS_LAST` gets its input in NHWC layout (its model must have been converted).

    A model listed twice (plain and memory-efficient) keeps one optimizer, so both configurations
    update the same momentum buffers, as one model trained with the flag switched would.
    """
    optimizers: dict[int, torch.optim.Optimizer] = {}
    steps = {}
    # A priming step per configuration on a small crop, outside any measurement: it allocates the
    # optimizer's momentum buffers and builds the kernels, which would otherwise land on the first
    # measured configuration of each model (the FC-DenseNets have no warm-up round on a CPU).
    s = min(64, x.shape[-1])
    x_small, y_small = x[..., :s, :s], (y[..., :s, :s] if y.dim() == 3 else y)
    for name, (model, memory_efficient) in models.items():
        if id(model) not in optimizers:
            optimizers[id(model)] = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        per_layer, bf16 = name.endswith(PER_LAYER), BF16 in name
        layout = torch.channels_last if name.endswith(CHANNELS_LAST) else torch.contiguous_format
        small, full = (t.contiguous(memory_format=layout) for t in (x_small, x))
        training_step(model, optimizers[id(model)], small, y_small, memory_efficient, per_layer, bf16)()
        steps[name] = training_step(model, optimizers[id(model)], full, y, memory_efficient, per_layer, bf16)
    # counted once per architecture: a model listed under several configurations, or its NHWC copy
    # (same modules, same FLOPs), is not counted again
    distinct = {repr(m): m for m, _ in models.values()}
    gflop = {key: per_item(training_gflop(m, tuple(x.shape)), x.shape[0]) for key, m in distinct.items()}
    settings = {
        name: {
            "batch": x.shape[0],
            "size": list(x.shape[-2:]),
            "memory_efficient": me,
            "gflop_per_item": gflop[repr(model)],
        }
        for name, (model, me) in models.items()
    }
    results = interleave(
        steps,
        dict.fromkeys(steps, x.shape[0]),
        device,
        warmup=warmup,
        repeats=repeats,
        max_call_s=max_call_s,
        skip_check=skip_check,
        settings=settings,
    )
    return summaries(results)


def densenet121_group(plan: TrainPlan, device: torch.device) -> dict:
    """torchvision's DenseNet-121 against ours with the same weights, plain and memory-efficient."""
    torch.manual_seed(0)
    reference = torchvision.models.densenet121(weights=None).to(device).train()
    ours = build_model("densenet121").to(device).train()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(plan.batch, 3, plan.size, plan.size, device=device)
    y = torch.randint(0, 1000, (plan.batch,), device=device)
    models = {
        "torchvision plain": (reference, False),
        "torchvision memory-efficient": (reference, True),
        "ours plain": (ours, False),
        "ours plain" + PER_LAYER: (ours, False),
        "ours memory-efficient": (ours, True),
    }
    return run_group(models, x, y, device, plan.warmup, plan.repeats, plan.max_call_s)


def _segmentation_inputs(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, 1, size, size, device=device)
    y = torch.randint(0, 4, (batch, size, size), device=device)
    return x, y


def segmentation_group(plan: TrainPlan, device: torch.device) -> dict:
    """DenseUNet (plain, memory-efficient) against smp Unet(densenet121), 1 channel, 4 classes; both
    also in channels-last layout."""
    torch.manual_seed(0)
    smp_unet = build_model("smp_unet", in_channels=1, num_classes=4).to(device).train()
    dense_unet = build_model("dense_unet", in_channels=1, num_classes=4).to(device).train()
    nhwc = {m: copy.deepcopy(m).to(memory_format=torch.channels_last) for m in (smp_unet, dense_unet)}
    x, y = _segmentation_inputs(plan.batch, plan.size, device)
    models = {
        "smp Unet(densenet121)": (smp_unet, False),
        "DenseUNet plain": (dense_unet, False),
        "DenseUNet plain" + PER_LAYER: (dense_unet, False),
        "DenseUNet memory-efficient": (dense_unet, True),
        "smp Unet(densenet121)" + CHANNELS_LAST: (nhwc[smp_unet], False),
        "DenseUNet memory-efficient" + CHANNELS_LAST: (nhwc[dense_unet], True),
    }
    return run_group(models, x, y, device, plan.warmup, plan.repeats, plan.max_call_s)


def fc_densenet_group(plan: TrainPlan, device: torch.device) -> dict:
    """FC-DenseNet56 (plain) and FC-DenseNet103 (plain, plain with per-layer concatenation,
    memory-efficient), 1 channel, 4 classes."""
    torch.manual_seed(0)
    fc56 = build_model("fc_densenet56", in_channels=1, num_classes=4).to(device).train()
    fc103 = build_model("fc_densenet103", in_channels=1, num_classes=4).to(device).train()
    x, y = _segmentation_inputs(plan.fc_batch, plan.size, device)
    models = {
        "FC-DenseNet56 plain": (fc56, False),
        "FC-DenseNet103 plain": (fc103, False),
        "FC-DenseNet103 plain" + PER_LAYER: (fc103, False),
        "FC-DenseNet103 memory-efficient": (fc103, True),
    }
    return run_group(models, x, y, device, plan.fc_warmup, plan.fc_repeats, plan.max_call_s)


def recipe_setting(batch_size: tuple[int, int] | None = None) -> tuple[DictConfig, int, list[int]]:
    """The model node, batch size and crop of :data:`RECIPE`, composed from ``conf/`` as ``train`` would;
    ``batch_size`` (batch, square size) replaces its batch and crop (the smoke test's tiny sizes)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=[f"experiment={RECIPE}"])
    if batch_size is not None:
        return cfg.model, batch_size[0], [batch_size[1]] * 2
    return cfg.model, int(cfg.data.batch_size), [int(c) for c in cfg.data.crop_size]


def recipe_group(plan: TrainPlan, device: torch.device) -> dict:
    """The real-heart recipe's model at its batch and crop: fp32 and (with native bf16) bf16 autocast,
    each NCHW and channels-last; one optimizer per layout, as two runs would have."""
    node, batch, crop = recipe_setting(plan.recipe_batch_size)
    torch.manual_seed(0)
    model = instantiate(node).to(device).train()
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(batch, int(node.in_channels), *crop, device=device)
    y = torch.randint(0, int(node.num_classes), (batch, *crop), device=device)
    models = {"recipe fp32": (model, False), "recipe fp32" + CHANNELS_LAST: (nhwc, False)}
    if native_bf16(device.type):
        models |= {"recipe" + BF16: (model, False), "recipe" + BF16 + CHANNELS_LAST: (nhwc, False)}
    return run_group(models, x, y, device, plan.warmup, plan.repeats, plan.max_call_s)


def run(plan: TrainPlan, device: torch.device, log: Callable[[str], None] = print) -> dict:
    out = {"plan": asdict(plan)}
    for name, group in (
        ("densenet121", densenet121_group),
        ("segmentation", segmentation_group),
        ("fc_densenet", fc_densenet_group),
        ("recipe", recipe_group),
    ):
        log(f"train/{name} ...")
        out[name] = group(plan, device)
    return out
