"""Learning-rate schedules that torch does not ship as one object."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    min_lr_ratio: float = 0.01,
) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of ``total_steps``, then cosine decay to
    ``min_lr_ratio`` times the base learning rate. Step it once per optimiser step."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = int(round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
