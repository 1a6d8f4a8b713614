"""Segmentation losses: cross-entropy, soft Dice, and their sum (the default)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn
from torch.nn import functional as F

from seg_densenet.errors import ConfigError

LOSSES = ("ce", "dice", "dice_ce")


class DiceCELoss(nn.Module):
    """``ce_weight * CE + dice_weight * soft Dice`` over logits ``(B, C, H, W)`` and targets ``(B, H, W)``.

    Soft Dice (segmentation_models_pytorch, multiclass mode) is averaged over the classes present in
    the batch, background included, as in nnU-Net's default.
    """

    def __init__(
        self, class_weights: list[float] | None = None, ce_weight: float = 1.0, dice_weight: float = 1.0
    ):
        super().__init__()
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.ce = nn.CrossEntropyLoss(weight=weight)
        self.dice = DiceLoss(mode="multiclass", from_logits=True)
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros(())
        if self.ce_weight:
            loss = loss + self.ce_weight * self.ce(logits.float(), target)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits.float(), target)
        return loss


def build_loss(name: str, class_weights: list[float] | None = None) -> nn.Module:
    """``ce``, ``dice`` or ``dice_ce``; ``class_weights`` weight the cross-entropy term."""
    if name == "ce":
        return DiceCELoss(class_weights, ce_weight=1.0, dice_weight=0.0)
    if name == "dice":
        return DiceCELoss(class_weights, ce_weight=0.0, dice_weight=1.0)
    if name == "dice_ce":
        return DiceCELoss(class_weights)
    raise ConfigError(f"task.segment.module.loss: unknown loss {name!r}; valid names: {', '.join(LOSSES)}")


def deep_supervision_loss(
    loss_fn: nn.Module, outputs: Sequence[torch.Tensor], target: torch.Tensor
) -> torch.Tensor:
    """nnU-Net's deep-supervision loss: ``loss_fn`` of each output, full resolution first, against the
    target resized to it (nearest), weighted 1, 1/2, 1/4, ... and normalised to sum to 1.

    outputs: logits ``(B, C, H, W)``, then auxiliary logits ``(B, C, H / 2**i, W / 2**i)``; target ``(B, H, W)``.
    """
    weights = [0.5**i for i in range(len(outputs))]
    loss = outputs[0].new_zeros(())
    for weight, logits in zip(weights, outputs):
        scaled = target
        if logits.shape[-2:] != target.shape[-2:]:
            scaled = F.interpolate(target[:, None].float(), size=logits.shape[-2:], mode="nearest")[
                :, 0
            ].long()
        loss = loss + weight * loss_fn(logits, scaled)
    return loss / sum(weights)
