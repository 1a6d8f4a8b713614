"""Baseline: segmentation-models-pytorch's U-Net with a DenseNet-121 encoder (never downloads).

smp's DenseNet encoder subclasses torchvision's DenseNet (classifier removed), so its state-dict keys are
torchvision's ``features.*``; it is filled from the same local file the DenseUNet encoder takes, read
by :func:`load_pretrained` (a 3-channel stem is summed to 1 channel for MRI).
"""

from __future__ import annotations

from pathlib import Path

import segmentation_models_pytorch as smp
from torch import Tensor, nn

from seg_densenet.models.densenet import densenet121
from seg_densenet.models.layers import padded_forward
from seg_densenet.models.weights import load_pretrained, weights_file


class PaddedUnet(smp.Unet):
    """``smp.Unet`` for any H, W: the input is reflect-padded to multiples of the encoder's output
    stride (32; smp itself rejects other sizes) and the logits cropped back, as :class:`DenseUNet` does.
    The state-dict keys are smp's own."""

    @property
    def min_size(self) -> int:
        """The smallest H and W: the reflect padding needs the input at least as large as the stride."""
        return self.encoder.output_stride

    def forward(self, x: Tensor) -> Tensor:
        return padded_forward(super().forward, x, self.encoder.output_stride)


def smp_unet(
    in_channels: int = 1, num_classes: int = 4, encoder_weights: str | Path | None = None
) -> nn.Module:
    """``smp.Unet("densenet121")``: ``(B, in_channels, H, W)`` -> logits ``(B, num_classes, H, W)``.

    Any H and W (padded to multiples of 32 inside, see :class:`PaddedUnet`). ``encoder_weights``: optional local
    torchvision-format DenseNet-121 weights file (or this project's classification checkpoint), or
    ``imagenet`` (torchvision's file in torch's hub cache).
    """
    model = PaddedUnet(
        encoder_name="densenet121", encoder_weights=None, in_channels=in_channels, classes=num_classes
    )
    if encoder_weights is not None:
        # smp's encoder overrides load_state_dict without ``strict``, so the file is read and adapted into
        # this project's DenseNet-121 features first, whose keys smp's encoder shares.
        features = load_pretrained(
            densenet121(in_channels=in_channels, num_classes=0), weights_file(encoder_weights, "densenet121")
        )
        model.encoder.load_state_dict(features.state_dict())
    return model
