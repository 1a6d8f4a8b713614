"""Training callbacks of this project (Lightning's own ones are configured in ``conf/callbacks/``)."""

from __future__ import annotations

import logging
import sys
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Timer


def time_limit(trainer: pl.Trainer) -> Timer | None:
    """The trainer's :class:`~pytorch_lightning.callbacks.Timer` when it has a duration
    (``trainer.max_time``), else ``None``."""
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
    return timer if timer is not None and timer.time_remaining() is not None else None


class ElapsedTime(pl.Callback):
    """Logs ``val/elapsed_min``: wall-clock minutes since fitting started, at every validation, so
    that validation Dice can be plotted against training time (``csv/metrics.csv``). Time spent before
    a resume is not counted."""

    def __init__(self) -> None:
        self._start: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is None or trainer.sanity_checking:
            return
        pl_module.log("val/elapsed_min", (time.monotonic() - self._start) / 60.0)


class ProgressLog(pl.Callback):
    """Progress as plain log lines, for runs whose output goes to a file (``> run.log``, nohup, SLURM),
    where the rich progress bar draws nothing.

    One line at the end of every training epoch (after its validation), and one every ``every_n_steps``
    optimiser steps inside epochs longer than that, to the ``seg_densenet.progress`` logger: Hydra's
    logging sends it to stdout and to the run's ``train.log``. ``when``: ``not_tty`` (default: only when
    stdout is not a terminal, which has the bar), ``always`` or ``never``. A line reads::

        epoch 3/20 step 162 loss 0.412 | val dice 0.712 (rv 0.610 myo 0.700 lv 0.830) best 0.712 | 2.4 min, ~13.6 min left

    (``epoch 3 step 162/1000`` where ``trainer.max_steps`` sets the schedule.)

    The time left extrapolates the steps per minute of this run to ``trainer.estimated_stepping_batches``
    and is capped by what ``trainer.max_time`` leaves.
    """

    def __init__(self, every_n_steps: int = 200, when: str = "not_tty") -> None:
        if when not in ("not_tty", "always", "never"):
            raise ValueError(f"ProgressLog when={when!r}: valid values are not_tty, always, never")
        self.every_n_steps = every_n_steps
        self.enabled = when == "always" or (when == "not_tty" and not sys.stdout.isatty())
        self._start: float | None = None
        self._start_step = 0
        self._log = logging.getLogger("seg_densenet.progress")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()
        self._start_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        steps = trainer.num_training_batches
        if (
            not self.every_n_steps
            or not isinstance(steps, int)
            or steps <= self.every_n_steps
            or (batch_idx + 1) % self.every_n_steps
        ):
            return
        self._emit(trainer, f"{batch_idx + 1}/{steps} of the epoch, ")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        parts = []
        for stage in ("val", "train"):
            for name in ("dice", "acc"):
                value = metrics.get(f"{stage}/{name}")
                if value is None:
                    continue
                text = f"{stage} {name} {float(value):.3f}"
                per_class = [
                    (k.split("_", 1)[1], float(v))
                    for k, v in sorted(metrics.items())
                    if k.startswith(f"{stage}/{name}_") and not k.endswith("_best")
                ]
                if per_class:
                    text += " (" + " ".join(f"{k} {v:.3f}" for k, v in per_class) + ")"
                best = metrics.get(f"{stage}/{name}_best")
                if best is not None:
                    text += f" best {float(best):.3f}"
                parts.append(text)
            if parts:
                break
        self._emit(trainer, "", " | ".join(parts))

    def _emit(self, trainer: pl.Trainer, where: str, scores: str = "") -> None:
        if not self.enabled or not trainer.is_global_zero or self._start is None or trainer.sanity_checking:
            return
        elapsed = (time.monotonic() - self._start) / 60.0
        loss = trainer.callback_metrics.get("train/loss")
        epoch, step = trainer.current_epoch + 1, trainer.global_step
        if trainer.max_steps > 0:  # a schedule in steps (trainer.max_steps): the epochs are open-ended
            head = f"epoch {epoch} step {step}/{trainer.max_steps}"
        else:
            head = f"epoch {epoch}/{trainer.max_epochs} step {step}"
        head += f" {where}loss {float(loss):.4f}" if loss is not None else f" {where}".rstrip(", ")
        self._log.info(
            "%s%s | %s",
            head,
            f" | {scores}" if scores else "",
            f"{elapsed:.1f} min, {self._left(trainer, elapsed)}",
        )

    def _left(self, trainer: pl.Trainer, elapsed: float) -> str:
        done = trainer.global_step - self._start_step
        total = trainer.estimated_stepping_batches
        if done <= 0 or not isinstance(total, int | float) or total == float("inf"):
            return "time left unknown"
        left = elapsed / done * max(total - trainer.global_step, 0)
        timer = time_limit(trainer)
        if timer is not None:
            left = min(left, timer.time_remaining() / 60.0)
        return f"~{left:.1f} min left"


class ValidationOverlay(pl.Callback):
    """One validation overlay image per epoch in TensorBoard (``logger=tensorboard``): the middle slices of
    the first validation volume, RV, myocardium and LV in their own colours (prediction filled, ground
    truth as lines), under the tag ``val/overlay``. Does nothing without a TensorBoard logger or on
    classification batches; costs one extra forward pass of that volume per epoch."""

    def __init__(self, n_slices: int = 3) -> None:
        self.n_slices = n_slices

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if (
            batch_idx != 0
            or trainer.sanity_checking
            or not loggers
            or not isinstance(batch, dict)
            or "mask" not in batch
            or not hasattr(pl_module, "predict_volume_logits")
        ):
            return
        import numpy as np

        from seg_densenet.evaluation.plots import overlay_image

        pred = pl_module.predict_volume_logits(batch["image"]).argmax(1)
        # (S, H, W) -> (X, Y, Z), the evaluation's axis order
        image = batch["image"][:, 0].permute(1, 2, 0).float().cpu().numpy()
        gt = batch["mask"].permute(1, 2, 0).cpu().numpy()
        rgb = overlay_image(
            image,
            gt,
            pred.permute(1, 2, 0).cpu().numpy(),
            pl_module.label_set.structures,
            f"epoch {trainer.current_epoch + 1}",
            self.n_slices,
        )
        for logger in loggers:
            logger.experiment.add_image(
                "val/overlay", np.asarray(rgb), trainer.global_step, dataformats="HWC"
            )
