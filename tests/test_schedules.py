"""The warm-up cosine schedule: its shape, and its end by ``trainer.max_time`` on a real Trainer."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from seg_densenet.lit.base import BaseModule
from seg_densenet.lit.schedules import warmup_cosine

BASE_LR = 0.1
MIN_LR_RATIO = 0.01


def _lrs(steps: int, total_steps: int, elapsed_fraction=None) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    scheduler = warmup_cosine(
        optimizer,
        total_steps,
        warmup_fraction=0.1,
        min_lr_ratio=MIN_LR_RATIO,
        elapsed_fraction=elapsed_fraction,
    )
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_then_cosine_to_the_minimum():
    lrs = _lrs(101, 100)
    assert lrs[0] == pytest.approx(BASE_LR / 10)  # the first of 10 warm-up steps
    assert lrs[9] == pytest.approx(BASE_LR)  # the peak at the end of the warm-up
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then it only falls
    assert lrs[55] == pytest.approx(
        BASE_LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    )
    assert lrs[100] == pytest.approx(BASE_LR * MIN_LR_RATIO)


def test_the_time_budget_ends_the_schedule_whichever_comes_first():
    # time running slower than the steps changes nothing: the steps' schedule
    assert _lrs(100, 100, elapsed_fraction=lambda: 0.0) == _lrs(100, 100)
    # the time budget half spent at step 10 of 100: the schedule stands where step 50 would
    spent = iter([0.5] * 1000)
    lrs = _lrs(11, 100, elapsed_fraction=lambda: next(spent))
    assert lrs[10] == pytest.approx(_lrs(51, 100)[50])
    # the budget spent: the minimum, whatever the step
    assert _lrs(5, 100, elapsed_fraction=lambda: 1.0)[-1] == pytest.approx(BASE_LR * MIN_LR_RATIO)


class _Regression(BaseModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


def _final_lr(pass_elapsed_fraction: bool, tmp_path) -> tuple[float, int]:
    """A real Trainer run of far more steps than 2 seconds allow, stopped by ``max_time``."""
    module = _Regression(
        nn.Linear(4, 1),
        lambda params: torch.optim.SGD(params, lr=BASE_LR),
        lambda optimizer, **kwargs: warmup_cosine(
            optimizer, warmup_fraction=0.0, min_lr_ratio=MIN_LR_RATIO, **kwargs
        ),
        scheduler_interval="step",
        scheduler_total_steps=True,
        scheduler_elapsed_fraction=pass_elapsed_fraction,
    )
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    trainer = pl.Trainer(
        max_steps=10**7,
        max_time={"seconds": 2},
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    return trainer.optimizers[0].param_groups[0]["lr"], trainer.global_step


def test_a_run_stopped_by_max_time_ends_at_the_minimum_learning_rate(tmp_path):
    lr, steps = _final_lr(True, tmp_path / "budgeted")
    assert 0 < steps < 10**6  # max_time stopped it, long before max_steps
    assert lr < BASE_LR * 3 * MIN_LR_RATIO
    # without the time budget in the schedule the same run stops near the peak learning rate
    lr, _ = _final_lr(False, tmp_path / "steps_only")
    assert lr > BASE_LR * 0.99
