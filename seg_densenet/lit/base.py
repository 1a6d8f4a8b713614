"""What the classification and segmentation modules share: optimiser, schedule, checkpoint record."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MaxMetric

from seg_densenet.errors import SegDenseNetError
from seg_densenet.lit.schedules import max_time_fraction


class NonFiniteLossError(SegDenseNetError):
    """Training produced a NaN or infinite loss."""


class BaseModule(pl.LightningModule):
    """A LightningModule around ``model`` with config-built optimiser and schedule.

    ``scheduler`` is called with the optimiser, and with ``total_steps`` (the run's optimiser steps, from
    Lightning's estimate) when ``scheduler_total_steps`` is set: the scheduler config's
    ``pass_total_steps`` (``conf/scheduler/warmup_cosine.yaml``); and with ``elapsed_fraction`` (the
    share of ``trainer.max_time`` spent, a callable) when ``scheduler_elapsed_fraction`` is set and the
    trainer has a time limit: the config's ``pass_elapsed_fraction``, so that the schedule ends by the
    time limit on a machine too slow for the steps.

    ``record`` (plain dicts and strings) is stored in every checkpoint under ``"seg_densenet"`` so that
    prediction can rebuild the network and its preprocessing from the checkpoint alone, and loading
    stays possible with ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        record: dict | None = None,
        channels_last: bool = False,
        scheduler_total_steps: bool = False,
        scheduler_elapsed_fraction: bool = False,
    ):
        super().__init__()
        # NHWC layout for the network and its 4-D inputs (the fast path of docs/benchmarks.md)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(memory_format=self.memory_format)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_total_steps = scheduler_total_steps
        self.scheduler_elapsed_fraction = scheduler_elapsed_fraction
        self.record = record or {}
        self.val_best = MaxMetric()  # the best value so far of the monitored validation metric (log_best)

    def log_best(self, name: str, value: float) -> None:
        """Log ``<name>_best``, the best ``name`` so far (kept in checkpoints, so a resumed run goes on
        from it); ``name`` is the stage's monitored validation metric (``val/dice``, ``val/acc``)."""
        self.val_best.update(torch.tensor(float(value)))
        self.log(f"{name}_best", self.val_best.compute(), prog_bar=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x)

    def parameter_groups(self) -> list[dict]:
        """The optimiser's parameter groups; a group's ``lr_mult`` scales the optimiser's learning rate."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameter_groups())
        for group in optimizer.param_groups:  # before the schedule reads each group's initial lr
            group["lr"] *= group.pop("lr_mult", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        if (
            self.scheduler_total_steps
        ):  # the scheduler config's pass_total_steps: a schedule over the whole run
            steps = self.trainer.estimated_stepping_batches
            kwargs["total_steps"] = int(steps) if math.isfinite(steps) else 1000
        if self.scheduler_elapsed_fraction:  # the config's pass_elapsed_fraction: end by trainer.max_time too
            fraction = max_time_fraction(self.trainer)
            if fraction is not None:
                kwargs["elapsed_fraction"] = fraction
        scheduler = self.scheduler_factory(optimizer, **kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }

    def check_finite(self, loss: torch.Tensor, batch: dict) -> None:
        """Stop before a NaN/inf loss reaches the weights (and so the checkpoints)."""
        if not torch.isfinite(loss):
            cases = batch.get("case", [])
            cases = ", ".join(cases) if isinstance(cases, list | tuple) else str(cases)
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at global step {self.global_step}, epoch {self.current_epoch}; "
                f"batch cases: {cases}"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # what `python -m seg_densenet.info` shows: the record, when it was saved, the metrics so far
        metrics = {
            k: float(v)
            for k, v in self.trainer.callback_metrics.items()
            if isinstance(v, torch.Tensor) and v.numel() == 1 and k.startswith(("train/", "val/"))
        }
        checkpoint["seg_densenet"] = {
            **self.record,
            "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "metrics": dict(sorted(metrics.items())),
        }
        if self.val_best.update_count:
            checkpoint["val_best"] = float(self.val_best.compute())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        best = checkpoint.get("val_best", checkpoint.get("best_val_acc"))  # best_val_acc: older classifiers
        if best is not None:
            self.val_best.update(torch.tensor(float(best)))
