"""Learning-rate schedules that torch does not ship as one object."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from seg_densenet.lit.callbacks import time_limit


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    min_lr_ratio: float = 0.01,
    elapsed_fraction: Callable[[], float] | None = None,
) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of ``total_steps``, then cosine decay to
    ``min_lr_ratio`` times the base learning rate. Step it once per optimiser step.

    ``elapsed_fraction`` (the share of a time budget spent, as ``trainer.max_time``'s, see
    :func:`max_time_fraction`) makes the schedule end by whichever comes first, the steps or the time:
    each step counts as at least that share of ``total_steps``. On a machine fast enough for the steps
    the schedule is the steps' alone; on a slower one the learning rate still anneals to its minimum by
    the time the budget stops the run, instead of the run stopping at a high learning rate."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = int(round(warmup_fraction * total_steps))

    def factor(step: float) -> float:
        if elapsed_fraction is not None:
            step = max(step, elapsed_fraction() * total_steps)
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def max_time_fraction(trainer) -> Callable[[], float] | None:
    """The share of ``trainer.max_time`` spent so far (time before a resume included, as Lightning's
    :class:`~pytorch_lightning.callbacks.Timer` counts it), as a callable; ``None`` without a time limit.
    Under DDP every process takes rank 0's reading (as the Timer does for its stop), so that all
    replicas step with the same learning rate."""
    timer = time_limit(trainer)
    if timer is None:
        return None

    def fraction() -> float:
        elapsed = timer.time_elapsed()
        return float(trainer.strategy.broadcast(elapsed / max(elapsed + timer.time_remaining(), 1e-9)))

    return fraction
