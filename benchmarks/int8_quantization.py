"""ONNX Runtime static int8 quantization of a segmentation checkpoint, against its fp32 ONNX export.

``python -m benchmarks.int8_quantization CKPT --data DIR --split SPLIT.json [--calibration MinMax|Percentile|Entropy]``

- Calibration: up to ``--slices`` preprocessed slices of every 4th training patient of the run's split
  (ED and ES frames), centre-cropped or padded to 192x192 (the histogram calibrators stack activations,
  so they need one size). QDQ format, per-channel int8 weights, uint8 activations; ``reduce_range`` (7-bit
  weights, ONNX Runtime's advice for CPUs without VNNI) by default only where the CPU lacks VNNI and
  AMX-INT8 (``--reduce-range on|off`` forces it).
- Accuracy: both models predict every frame of the split's test patients (no TTA, no post-processing);
  the mean volume Dice over RV, MYO and LV and the share of voxels with the same label are printed.
- Speed: the first test volume, each model ``--repeats`` times interleaved; the median is printed.

The project keeps int8 only if it loses at most 0.005 Dice and is faster (issue 16); docs/benchmarks.md
has the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from seg_densenet.backends import OnnxRuntimeModel, cached_onnx
from seg_densenet.checkpoint import load_model
from seg_densenet.data.labels import LabelSet
from seg_densenet.data.nifti import load_volume
from seg_densenet.evaluation.metrics import dice
from seg_densenet.inference.predictor import Predictor, pad_to_min_size, preprocessor_from_record
from seg_densenet.utils.hardware import cpu_has_int8_dot

CALIBRATION_SIZE = 192


def frames(root: Path, patient: str) -> list[Path]:
    """The patient's image frames (not the ground truth, not the 4D series)."""
    return sorted(
        p for p in (root / patient).glob(f"{patient}_frame*.nii.gz") if not p.name.endswith("_gt.nii.gz")
    )


def calibration_slices(root: Path, patients: list[str], preprocessor, n: int) -> list[np.ndarray]:
    """``n`` slices ``(1, 1, S, S)`` spread evenly over the patients' preprocessed frames."""
    slices = []
    for patient in patients:
        for path in frames(root, patient):
            image, _ = preprocessor.forward(load_volume(path))
            image, _ = pad_to_min_size(image, CALIBRATION_SIZE)
            top, left = ((d - CALIBRATION_SIZE) // 2 for d in image.shape[1:])
            image = image[:, top : top + CALIBRATION_SIZE, left : left + CALIBRATION_SIZE]
            slices += [image[z : z + 1, None].astype(np.float32) for z in range(image.shape[0])]
    chosen = np.linspace(0, len(slices) - 1, min(n, len(slices))).astype(int)
    return [slices[i] for i in chosen]


def quantize(fp32: Path, out: Path, slices: list[np.ndarray], method: str, reduce_range: bool) -> float:
    """Write the int8 model to ``out``; returns the seconds it took."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter({"image": s} for s in slices)

        def get_next(self):
            return next(self.items, None)

    start = time.perf_counter()
    prepared = out.with_suffix(".prep.onnx")
    # the symbolic shape inference cannot follow the crop arithmetic of the decoders; ONNX's own suffices
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
    )  # fmt: skip
    prepared.unlink()
    return time.perf_counter() - start


def accuracy(
    predictors: dict[str, Predictor], root: Path, patients: list[str], structures: dict[str, int]
) -> dict:
    """Mean volume Dice per model over the patients' frames, and the share of voxels labelled alike."""
    scores = {name: [] for name in predictors}
    same = []
    for patient in patients:
        for path in frames(root, patient):
            gt = load_volume(path.with_name(path.name.replace(".nii.gz", "_gt.nii.gz"))).data.astype(np.int64)
            labels = {name: p.predict(load_volume(path))["labels"] for name, p in predictors.items()}
            first, second = labels.values()
            same.append(float((first == second).mean()))
            for name, lab in labels.items():
                scores[name].append(np.mean([dice(lab == v, gt == v) for v in structures.values()]))
    return {"volumes": len(same), "dice": {k: float(np.mean(v)) for k, v in scores.items()},
            "same_label_pct": 100 * float(np.mean(same))}  # fmt: skip


def latency(predictors: dict[str, Predictor], path: Path, repeats: int) -> dict[str, float]:
    volume = load_volume(path)
    times = {name: [] for name in predictors}
    for _ in range(repeats):
        for name, predictor in predictors.items():
            start = time.perf_counter()
            predictor.predict(volume)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the ACDC-layout training folder")
    parser.add_argument("--split", type=Path, required=True, help="the run's split.json")
    parser.add_argument("--calibration", default="MinMax", choices=["MinMax", "Percentile", "Entropy"])
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument(
        "--reduce-range", choices=["auto", "on", "off"], default="auto",
        help="7-bit weights; auto: on without VNNI/AMX-INT8 (ONNX Runtime's advice), off with them",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    split = json.loads(args.split.read_text())
    model, record = load_model(args.ckpt)
    preprocessor = preprocessor_from_record(record["data"])
    label_set = LabelSet.from_record(record)
    fp32 = cached_onnx(args.ckpt)
    int8 = fp32.with_name(f"{fp32.stem}.int8-{args.calibration}.onnx")
    slices = calibration_slices(args.data, split["train"][::4], preprocessor, args.slices)
    reduce_range = {"on": True, "off": False}.get(args.reduce_range, not cpu_has_int8_dot())
    int8 = int8.with_name(int8.name.replace(".onnx", "-rr.onnx") if reduce_range else int8.name)
    seconds = quantize(fp32, int8, slices, args.calibration, reduce_range)
    print(f"int8 ({args.calibration}, reduce_range={reduce_range}, {len(slices)} calibration slices) in {seconds:.0f} s: {int8} "
          f"{int8.stat().st_size // 1024} KiB; fp32 {fp32.stat().st_size // 1024} KiB")  # fmt: skip
    threads = torch.get_num_threads()
    min_size = getattr(model, "min_size", 1)
    predictors = {
        name: Predictor(OnnxRuntimeModel(path, min_size=min_size, threads=threads), preprocessor,
                        num_classes=label_set.num_classes, channels_last=False)
        for name, path in (("fp32", fp32), ("int8", int8))
    }  # fmt: skip
    seconds = latency(predictors, frames(args.data, split["test"][0])[0], args.repeats)
    print(
        "one volume, median of",
        args.repeats,
        {k: f"{v:.3f} s" for k, v in seconds.items()},
        f"{threads} threads",
    )
    result = accuracy(predictors, args.data, split["test"], label_set.structures)
    print(f"{result['volumes']} test volumes: mean Dice", {k: f"{v:.4f}" for k, v in result["dice"].items()},
          f"labels equal on {result['same_label_pct']:.3f} % of voxels")  # fmt: skip


if __name__ == "__main__":
    main()
