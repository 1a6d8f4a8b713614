"""Export to ONNX: ``python -m seg_densenet.export ckpt=PATH format=onnx output=FILE``.

The graph takes ``(B, 1, H, W)`` float32 slices (already normalised as in training) and returns logits
``(B, C, H, W)``; batch, height and width are all dynamic (any H, W >= 32 for the DenseNet models,
multiples of 32 for smp's Unet). ``image_size`` is only the size of the example used to trace the model.

The graph is built by torch's TorchScript-based exporter (``dynamo=False``): the networks crop each
upsampled map to its skip's size, and that exporter records the crop arithmetic as shape operations, so
the graph is right for every size. The torch.export-based exporter of torch 2.14 (``dynamo=True``)
specialises that arithmetic for symbolic sizes and gives wrong logits (differences above 1) at sizes
other than the example's, so it is used only where the image size is fixed (``dynamic_size=false``).

After export, onnxruntime runs the file on random batches of other batch sizes and other image sizes
(one of them odd-sized) and the largest difference to PyTorch must stay under ``tolerance`` (default
1e-4); otherwise the file is not written.
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
from seg_densenet.models.smp_unet import PaddedUnet
from seg_densenet.utils.atomic import atomic_path
from seg_densenet.utils.cli import check_overrides, run_cli

FORMATS = ("onnx",)


def check_sizes(
    image_size: tuple[int, int], dynamic_size: bool, model: torch.nn.Module
) -> list[tuple[int, ...]]:
    """Shapes ``(B, H, W)`` the exported graph is checked on: other batch sizes, and with a dynamic image
    size also a larger and a smaller, odd-sized image (multiples of 32 for smp's Unet)."""
    height, width = image_size
    shapes = [(3, height, width)]
    if dynamic_size:
        if isinstance(model, PaddedUnet):
            shapes += [(1, height + 32, width + 64), (2, max(height - 32, 32), max(width - 32, 32))]
        else:
            shapes += [(1, height + 24, width + 40), (2, max(height - 13, 32), max(width - 7, 32))]
    return shapes


def write_onnx(
    model: torch.nn.Module,
    path: str | Path,
    in_channels: int,
    image_size=(224, 224),
    *,
    opset: int = 18,
    dynamic_size: bool = True,
) -> None:
    """Export ``model`` (eval mode) to ONNX at ``path``: input ``image`` ``(B, C, H, W)``, output ``logits``,
    a dynamic batch and, with ``dynamic_size``, a dynamic height and width."""
    # batch 2: an example of size 1 would be specialised by the exporter
    example = torch.randn(2, in_channels, *(int(n) for n in image_size))
    if dynamic_size:
        axes = {0: "batch", 2: "height", 3: "width"}
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={"image": axes, "logits": axes},
        )
    else:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            opset_version=opset,
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
        )


def export_onnx(
    ckpt: str | Path,
    output: str | Path,
    *,
    opset: int = 18,
    image_size=(224, 224),
    dynamic_size: bool = True,
    tolerance: float = 1e-4,
) -> float:
    """Write ``output`` (ONNX) from a segmentation checkpoint; returns the checked max |difference|."""
    import onnxruntime as ort

    output = Path(output)
    if output.resolve() == Path(ckpt).resolve():
        raise SegDenseNetError(f"{output}: output path is the checkpoint itself; refusing to overwrite it")
    model, record = load_model(ckpt)
    model.eval()
    in_channels = int(record["model"].get("in_channels", 1))
    height, width = (int(n) for n in image_size)
    with atomic_path(output) as tmp:
        write_onnx(model, tmp, in_channels, (height, width), opset=opset, dynamic_size=dynamic_size)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        diff = 0.0
        generator = torch.Generator().manual_seed(0)
        for batch, h, w in check_sizes((height, width), dynamic_size, model):
            x = torch.randn(batch, in_channels, h, w, generator=generator)
            with torch.inference_mode():
                expected = model(x).numpy()
            got = session.run(None, {"image": x.numpy()})[0]
            if got.shape != expected.shape:
                raise SegDenseNetError(
                    f"{output}: ONNX check failed at input {tuple(x.shape)}: output shape "
                    f"{got.shape}, PyTorch gives {expected.shape}"
                )
            diff = max(diff, float(np.abs(got - expected).max()))
            if diff >= tolerance:
                raise SegDenseNetError(
                    f"{output}: ONNX check failed at input {tuple(x.shape)}: max difference "
                    f"{diff:.2e} to PyTorch (tolerance {tolerance:g})"
                )
    return diff


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def _hydra_main(cfg: DictConfig) -> None:
    def run() -> None:
        if cfg.format not in FORMATS:
            raise ConfigError(f"format={cfg.format}: valid formats are {', '.join(FORMATS)}")
        diff = export_onnx(
            cfg.ckpt,
            cfg.output,
            opset=cfg.opset,
            image_size=tuple(cfg.image_size),
            dynamic_size=cfg.dynamic_size,
            tolerance=cfg.tolerance,
        )
        size = (
            "dynamic batch and image size"
            if cfg.dynamic_size
            else f"dynamic batch, image size {list(cfg.image_size)}"
        )
        print(f"wrote {cfg.output} ({size}; onnxruntime vs PyTorch: max difference {diff:.2e})")

    run_cli(run)


def main() -> None:
    check_overrides("export")
    _hydra_main()


if __name__ == "__main__":
    main()
