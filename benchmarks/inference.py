"""Suite ``infer``: slices/s and whole-volume latency in eval mode under ``torch.inference_mode``.

Groups, each interleaved in one process run:

* ``throughput``: per model, a batch of ``(B, 1, S, S)`` slices through fp32 eager, channels_last and
  bf16 autocast in both layouts (and, on a GPU, with ``cudnn.benchmark`` on). bf16 is first tried on a 1-slice pilot.
  A CPU without native bf16 emulates it, and the pilot's slowdown understates the full-size one
  (5x on the pilot, 34x at 224x224 for FC-DenseNet56 in the first run), so there only the pilot's
  figure is reported; elsewhere bf16 is skipped where predicted to take longer than ``max_call_s``.
* ``compile``: ``torch.compile`` against eager for the models in ``compile_models``, in a child process
  killed after ``compile_timeout_s`` (compiling on a CPU takes minutes and may fail); the compile time
  is reported apart and excluded from the throughput.
* ``volume``: :class:`seg_densenet.inference.predictor.Predictor` on one ``(X, Y, Z)`` volume (preprocessing,
  network, inverse mapping; no TTA, model already loaded), eager, channels_last and, on a CPU with
  onnxruntime installed, the ONNX export run by ONNX Runtime (``predict backend=onnxruntime``), and where
  bf16 is native, bf16 autocast in channels-last layout (``predict precision=bf16``).

The models are the paper architectures at their defaults, plus the real-heart recipe's small DenseUNet
(``experiment=acdc_recipe_cpu``'s model, composed from ``conf/``), the model most users predict with.

``python -m benchmarks.inference compile '<json>'`` is the child's entry point (used by the suite).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.measure import Measurement, interleave, summaries
from benchmarks.roofline import forward_gflop, per_item
from benchmarks.training import recipe_setting
from seg_densenet.data.nifti import Volume
from seg_densenet.data.preprocess import Preprocessor
from seg_densenet.inference.predictor import Predictor
from seg_densenet.models import build_model
from seg_densenet.utils.hardware import native_bf16

RECIPE_MODEL = "DenseUNet small (recipe)"  # the real-heart recipe's model
MODELS = {
    "FC-DenseNet56": "fc_densenet56",
    "FC-DenseNet103": "fc_densenet103",
    "DenseUNet": "dense_unet",
    "smp Unet(densenet121)": "smp_unet",
    RECIPE_MODEL: None,  # composed from conf/experiment/acdc_recipe_cpu.yaml
}
BF16_CL = "bf16 autocast, channels_last"  # throughput configuration
VOLUME_VARIANTS = ("eager", "channels_last", "onnxruntime", "bf16 channels_last")


@dataclass(frozen=True)
class InferPlan:
    batch: int = 2
    size: int = 224
    warmup: int = 1
    repeats: int = 2
    pilot_size: int = 64
    volume_shape: tuple[int, int, int] = (256, 216, 10)  # (X, Y, Z): 10 slices of 256x216
    volume_warmup: int = 1
    volume_repeats: int = 2
    compile_models: tuple[str, ...] = ("FC-DenseNet56",)
    compile_timeout_s: float = 150.0
    max_call_s: float = 40.0
    volume_max_call_s: float = 60.0
    volume_models: tuple[str, ...] = (
        "FC-DenseNet56",
        "DenseUNet",
        RECIPE_MODEL,
    )  # the goals' models and the recipe's


PLANS = {
    "full": InferPlan(),
    "quick": InferPlan(
        batch=1,
        size=32,
        warmup=0,
        repeats=1,
        pilot_size=32,
        volume_shape=(48, 40, 2),
        volume_warmup=0,
        volume_repeats=1,
        compile_timeout_s=10.0,
        max_call_s=1.0,
        volume_max_call_s=1.0,
    ),
    "cuda": InferPlan(batch=8, warmup=3, repeats=20, volume_warmup=3, volume_repeats=20),
}


def build(name: str, device: torch.device) -> nn.Module:
    """The model ``MODELS[name]`` for 1-channel, 4-class input, in eval mode on ``device``."""
    torch.manual_seed(0)
    if name == RECIPE_MODEL:
        return instantiate(recipe_setting()[0]).to(device).eval()
    return build_model(MODELS[name], in_channels=1, num_classes=4).to(device).eval()


def forward_call(
    model: nn.Module,
    x: torch.Tensor,
    autocast: torch.dtype | None = None,
    cudnn_benchmark: bool | None = None,
) -> Callable[[], None]:
    """A call running ``model(x)`` under inference_mode (and bf16/fp16 autocast if ``autocast``)."""

    def call() -> None:
        if cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = cudnn_benchmark
        with (
            torch.inference_mode(),
            torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None),
        ):
            model(x)

    return call


def _time_once(call: Callable[[], None]) -> float:
    call()  # first call builds the kernels
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def bf16_pilot(model: nn.Module, device: torch.device, size: int) -> float:
    """Seconds of bf16 autocast over fp32 for one ``size`` x ``size`` slice (the slowdown factor)."""
    x = torch.randn(1, 1, size, size, device=device)
    return _time_once(forward_call(model, x, torch.bfloat16)) / _time_once(forward_call(model, x))


def throughput_group(name: str, plan: InferPlan, device: torch.device) -> dict:
    """Slices/s of one model: fp32 eager, channels_last, bf16 autocast in both layouts (and cudnn.benchmark
    on a GPU)."""
    model = build(name, device)
    x = torch.randn(plan.batch, 1, plan.size, plan.size, device=device)
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    calls = {
        "eager": forward_call(model, x, cudnn_benchmark=False if device.type == "cuda" else None),
        "channels_last": forward_call(channels_last, x_nhwc),
        "bf16 autocast": forward_call(model, x, torch.bfloat16),
        BF16_CL: forward_call(channels_last, x_nhwc, torch.bfloat16),
    }
    if device.type == "cuda":
        calls["cudnn.benchmark"] = forward_call(model, x, cudnn_benchmark=True)
    slowdown = bf16_pilot(model, device, plan.pilot_size)
    emulated = device.type == "cpu" and not native_bf16(device.type)

    def skip_check(config: str, done: dict[str, Measurement]) -> str | None:
        eager = done["eager"]
        first = (eager.cold_s or eager.seconds or [0.0])[0]
        if config.startswith("bf16 autocast") and emulated:
            return (
                f"this CPU has no native bf16: {slowdown:.1f}x slower than fp32 on a 1-slice "
                f"{plan.pilot_size}x{plan.pilot_size} pilot, more at full size; not run at full size"
            )
        if config.startswith("bf16 autocast") and slowdown * first > plan.max_call_s:
            return (
                f"predicted {slowdown * first:.0f} s per call > {plan.max_call_s:.0f} s: bf16 ran {slowdown:.1f}x "
                f"slower than fp32 on a 1-slice {plan.pilot_size}x{plan.pilot_size} pilot"
            )
        return None

    gflop = per_item(forward_gflop(model, (1, 1, plan.size, plan.size)))
    settings = {
        c: {"batch": plan.batch, "size": [plan.size, plan.size], "gflop_per_item": gflop} for c in calls
    }
    for config in ("bf16 autocast", BF16_CL):
        settings[config]["pilot_slowdown"] = round(slowdown, 2)
    results = interleave(
        calls,
        dict.fromkeys(calls, plan.batch),
        device,
        warmup=plan.warmup,
        repeats=plan.repeats,
        max_call_s=plan.max_call_s,
        skip_check=skip_check,
        settings=settings,
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return summaries(results)


def synthetic_volume(shape: tuple[int, int, int]) -> Volume:
    """A random ``(X, Y, Z)`` float32 volume with 1.5 x 1.5 x 10 mm voxels (content does not change timing)."""
    data = np.random.default_rng(0).normal(100.0, 30.0, shape).astype(np.float32)
    affine = np.diag([1.5, 1.5, 10.0, 1.0])
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_zooms((1.5, 1.5, 10.0))
    return Volume(data, affine, header)


def volume_group(plan: InferPlan, device: torch.device, throughput: dict) -> dict:
    """Whole-volume latency through Predictor (eager, channels_last, onnxruntime on a CPU, bf16 channels_last
    where bf16 is native), for each model of ``plan.volume_models`` that fits the limits."""
    volume = synthetic_volume(plan.volume_shape)
    x_size, y_size, n_slices = plan.volume_shape
    preprocessor = Preprocessor(normalization="zscore", target_spacing=None, crop_size=None)
    calls, settings, skipped = {}, {}, {}
    for name in MODELS:
        if name not in plan.volume_models:
            skipped[name] = "volume latency is measured for the models in volume_models (the goals' models)"
            continue
        if name == "smp Unet(densenet121)" and (x_size % 32 or y_size % 32):
            skipped[name] = f"smp needs H and W divisible by 32; the volume is {x_size}x{y_size}"
            continue
        rate = throughput.get(name, {}).get("eager", {}).get("items_per_s")
        if rate:
            predicted = n_slices * (x_size * y_size) / (plan.size**2) / rate
            if predicted > plan.volume_max_call_s:
                skipped[name] = (
                    f"predicted {predicted:.0f} s per volume from its slices/s > {plan.volume_max_call_s:.0f} s"
                )
                continue
        for variant in VOLUME_VARIANTS:
            net = build(name, device)  # same seed: every variant holds the same weights
            if variant == "onnxruntime":
                if device.type != "cpu" or importlib.util.find_spec("onnxruntime") is None:
                    continue
                net = _onnxruntime_model(net, (x_size, y_size))
            if variant.startswith("bf16") and not native_bf16(device.type):
                continue
            predictor = Predictor(
                net,
                preprocessor,
                device=str(device),
                batch_size=n_slices,
                channels_last=variant.endswith("channels_last"),
                precision="bf16" if variant.startswith("bf16") else "32",
            )
            if (
                variant == "eager"
            ):  # the network's FLOPs at the size the predictor feeds it (padding included)
                gflop = per_item(_predictor_gflop(predictor, volume), n_slices)
            calls[f"{name} {variant}"] = lambda p=predictor: p.predict(volume)
            settings[f"{name} {variant}"] = {
                "volume_shape": list(plan.volume_shape),
                "tta": False,
                "gflop_per_item": gflop,
            }
    results = summaries(
        interleave(
            calls,
            dict.fromkeys(calls, n_slices),
            device,
            warmup=plan.volume_warmup,
            repeats=plan.volume_repeats,
            max_call_s=plan.volume_max_call_s,
            settings=settings,
        )
    )
    for name, reason in skipped.items():
        results[name] = {"status": "skipped", "reason": reason, "volume_shape": list(plan.volume_shape)}
    return results


def _predictor_gflop(predictor: Predictor, volume: Volume) -> float:
    """GFLOP of one ``predictor.predict(volume)``, counted on a real call (it pads and batches as it will)."""
    with FlopCounterMode(display=False) as counter:
        predictor.predict(volume)
    return counter.get_total_flops() / 1e9


def _onnxruntime_model(net: nn.Module, image_size: tuple[int, int]) -> nn.Module:
    """``net`` exported to ONNX (dynamic size, as ``predict backend=onnxruntime`` does) and run by ONNX Runtime."""
    from seg_densenet.backends import OnnxRuntimeModel
    from seg_densenet.export import write_onnx

    with tempfile.TemporaryDirectory(
        prefix="bench-onnx-"
    ) as folder:  # the session holds the model once built
        path = Path(folder) / "model.onnx"
        write_onnx(net.eval(), path, 1, image_size)
        return OnnxRuntimeModel(path, min_size=getattr(net, "min_size", 1), threads=torch.get_num_threads())


def compile_group(plan: InferPlan, device: torch.device, threads: int) -> dict:
    """torch.compile against eager per model in ``plan.compile_models``, each in a time-boxed child process."""
    out = {}
    for name in MODELS:
        if name not in plan.compile_models:
            out[name] = {
                "status": "skipped",
                "reason": "compile is time-boxed to the models in compile_models",
            }
            continue
        args = json.dumps({"name": name, "plan": asdict(plan), "device": str(device), "threads": threads})
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.inference", "compile", args],
                capture_output=True,
                text=True,
                timeout=plan.compile_timeout_s,
            )
        except subprocess.TimeoutExpired:
            out[name] = {"status": "failed", "reason": f"timed out after {plan.compile_timeout_s:.0f} s"}
            continue
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            out[name] = {"status": "failed", "reason": f"exit {proc.returncode}: {last}"}
            continue
        out[name] = json.loads(lines[-1]) | {"child_wall_s": round(time.perf_counter() - start, 1)}
    return out


def _compile_child(args: dict) -> dict:
    """Eager against compiled, interleaved; the compiled model's first call (the compilation) is timed apart."""
    device = torch.device(args["device"])
    torch.set_num_threads(args["threads"])
    plan = InferPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in args["plan"].items()})
    model = build(args["name"], device)
    compiled = torch.compile(model)
    x = torch.randn(plan.batch, 1, plan.size, plan.size, device=device)
    start = time.perf_counter()
    forward_call(compiled, x)()
    compile_s = time.perf_counter() - start
    calls = {"eager": forward_call(model, x), "compiled": forward_call(compiled, x)}
    results = interleave(
        calls, dict.fromkeys(calls, plan.batch), device, warmup=plan.warmup, repeats=plan.repeats
    )
    return {"status": "ok", "compile_s": round(compile_s, 1), **summaries(results)}


def run(plan: InferPlan, device: torch.device, threads: int, log: Callable[[str], None] = print) -> dict:
    out: dict = {"plan": asdict(plan)}
    if device.type == "cpu":
        out["cpu_native_bf16"] = native_bf16(device.type)
    out["throughput"] = {}
    for name in MODELS:
        log(f"infer/throughput {name} ...")
        out["throughput"][name] = throughput_group(name, plan, device)
    log("infer/volume ...")
    out["volume"] = volume_group(plan, device, out["throughput"])
    log("infer/compile ...")
    out["compile"] = compile_group(plan, device, threads)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "compile":
        sys.exit("usage: python -m benchmarks.inference compile '<json>' (the suite's compile child)")
    print(json.dumps(_compile_child(json.loads(sys.argv[2]))))
