"""Training callbacks of this project (Lightning's own ones are configured in ``conf/callbacks/``)."""

from __future__ import annotations

import time

import pytorch_lightning as pl


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
