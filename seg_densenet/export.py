"""Export to ONNX: ``python -m seg_densenet.export ckpt=PATH format=onnx output=FILE``.

The graph takes ``(B, 1, H, W)`` float32 slices (already normalised as in training) with a dynamic
batch and returns logits ``(B, C, H, W)``. The image size is fixed at export (``image_size``): the
networks crop each upsampled map to its skip's size, and torch's ONNX exporter (torch 2.14) does not
carry that crop arithmetic over for symbolic sizes (torch.export itself handles multiples of 32, but
onnxruntime then fails on a concatenation), so a dynamic image size would give wrong graphs. Export
once per acquisition size, or pad/crop slices to ``image_size`` (``seg_densenet.predict`` takes any
size in PyTorch). After export, onnxruntime runs the file on a
random batch and the largest difference to PyTorch must stay under ``tolerance`` (default 1e-4).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from seg_densenet import config as _config  # noqa: F401
from seg_densenet.checkpoint import load_model
from seg_densenet.errors import ConfigError, SegDenseNetError
from seg_densenet.utils.atomic import atomic_path
from seg_densenet.utils.cli import check_overrides, run_cli

FORMATS = ("onnx",)


def export_onnx(ckpt: str | Path, output: str | Path, *, opset: int = 18, image_size=(224, 224),
                tolerance: float = 1e-4) -> float:
    """Write ``output`` (ONNX) from a segmentation checkpoint; returns the checked max |difference|."""
    import onnxruntime as ort

    output = Path(output)
    if output.resolve() == Path(ckpt).resolve():
        raise SegDenseNetError(f"{output}: output path is the checkpoint itself; refusing to overwrite it")
    model, record = load_model(ckpt)
    model.eval()
    in_channels = int(record["model"].get("in_channels", 1))
    height, width = (int(n) for n in image_size)
    # batch 2: an example of size 1 would be specialised by torch.export
    example = torch.randn(2, in_channels, height, width)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with atomic_path(output) as tmp:
        torch.onnx.export(
            model, (example,), str(tmp), input_names=["image"], output_names=["logits"], opset_version=opset,
            dynamo=True, external_data=False,
            dynamic_shapes=({0: batch},),
        )
        x = torch.randn(3, in_channels, height, width)  # another batch size than the example
        with torch.inference_mode():
            expected = model(x).numpy()
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": x.numpy()})[0]
        diff = float(np.abs(got - expected).max())
        if got.shape != expected.shape or diff >= tolerance:
            raise SegDenseNetError(
                f"{output}: ONNX check failed: shape {got.shape} vs {expected.shape}, max difference {diff:.2e}"
            )
    return diff


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def _hydra_main(cfg: DictConfig) -> None:
    def run() -> None:
        if cfg.format not in FORMATS:
            raise ConfigError(f"format={cfg.format}: valid formats are {', '.join(FORMATS)}")
        diff = export_onnx(cfg.ckpt, cfg.output, opset=cfg.opset, image_size=tuple(cfg.image_size))
        print(f"wrote {cfg.output} (onnxruntime vs PyTorch: max difference {diff:.2e})")

    run_cli(run)


def main() -> None:
    check_overrides("export")
    _hydra_main()


if __name__ == "__main__":
    main()
