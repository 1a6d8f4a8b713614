"""A plain U-Net decoder (Ronneberger et al. 2015, as segmentation-models-pytorch builds it).

The second decoder behind DenseUNet's encoder seam: the smp-like baseline without smp. Each stage resizes
its input to the skip's exact size (nearest neighbour), concatenates the skip and runs two Conv3x3-BN-ReLU
layers. Its submodule names are smp's (``blocks.{i}.conv1.0`` conv, ``.1`` BN), so an smp ``UnetDecoder``
state dict loads into it and the two give the same output (tests/test_dense_unet.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from seg_densenet.errors import ConfigError
from seg_densenet.models.layers import decoder_stages, per_stage


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (no bias: BN follows) - BN - ReLU, at the same H and W."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNetBlock(nn.Module):
    """Resize to the skip's size, concatenate the skip, two Conv3x3-BN-ReLU: ``(B, C, h, w)`` ->
    ``(B, out_channels, H, W)``."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = conv_bn_relu(out_channels, out_channels)

    def forward(self, x: Tensor, size: tuple[int, int] | torch.Size, skip: Tensor | None) -> Tensor:
        x = F.interpolate(x, size=tuple(size), mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], 1)
        return self.conv2(self.conv1(x))


class UNetDecoder(nn.Module):
    """U-Net decoder built from the encoder's channel plan; one stage per stride-2 step.

    Args:
        encoder_channels: channels of the encoder taps, high to low resolution (DenseNet-121: 64, 256,
            512, 1024, 1024). The last is the bottleneck; the others are skips.
        decoder_channels: output channels per stage, deep to shallow (len(encoder_channels) entries: one
            per skip plus the full-resolution stage); smp's default is 256, 128, 64, 32, 16.
        input_channels: channels of the input image concatenated to the full-resolution stage as its skip
            (the DenseNet encoder's first tap is at stride 2); 0: that stage has no skip, as in smp.

    Forward: list of encoder maps plus the output size (H, W) (and the image, with ``input_channels``) ->
    ``(B, out_channels, H, W)``, ``out_channels = decoder_channels[-1]``.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        input_channels: int = 0,
    ) -> None:
        super().__init__()
        decoder_channels = per_stage(decoder_channels, encoder_channels, "decoder_channels")
        if any(c < 1 for c in decoder_channels):
            raise ConfigError(f"decoder_channels must be >= 1, got {decoder_channels}")
        skip_channels = [*reversed(encoder_channels[:-1]), input_channels]
        in_channels = [encoder_channels[-1], *decoder_channels[:-1]]
        self.input_skip = input_channels > 0
        self.blocks = nn.ModuleList(
            UNetBlock(c_in, c_skip, c_out)
            for c_in, c_skip, c_out in zip(in_channels, skip_channels, decoder_channels)
        )
        self.out_channels = decoder_channels[-1]

    def forward(
        self, features: list[Tensor], size: tuple[int, int] | torch.Size, image: Tensor | None = None
    ) -> Tensor:
        """``features``: encoder maps high to low resolution; ``size``: (H, W) of the output; ``image``:
        the input, needed when the decoder was built with ``input_channels``."""
        if self.input_skip and image is None:
            raise ValueError("this decoder concatenates the input image at full resolution: pass image=")
        x = features[-1]
        for block, (target, skip) in zip(
            self.blocks, decoder_stages(features, size, image if self.input_skip else None)
        ):
            x = block(x, target, skip)
        return x
