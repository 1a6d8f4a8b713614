"""A CSV logger that keeps a resumed run's history."""

from __future__ import annotations

import csv
import os

from pytorch_lightning import loggers


class CSVLogger(loggers.CSVLogger):
    """Lightning's CSVLogger, except that a resumed run keeps the rows logged up to its checkpoint.

    Lightning's logger deletes an existing ``metrics.csv`` when it starts. With ``keep_until_step``
    (the resumed checkpoint's global step), the rows logged at or before that step are carried over, and
    those of the interrupted epoch after it are dropped, since that epoch is trained again.
    """

    def __init__(self, *args, keep_until_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_until_step = keep_until_step

    @property
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        kept = self._kept_rows()
        experiment = super().experiment
        # ranks other than 0 get Lightning's dummy experiment, which writes nothing
        if kept and isinstance(getattr(experiment, "metrics", None), list):
            experiment.metrics[:0] = kept
        return experiment

    def _kept_rows(self) -> list[dict]:
        path = os.path.join(self.log_dir, "metrics.csv")
        if self.keep_until_step is None or not os.path.isfile(path):
            return []
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return [
            {k: v for k, v in row.items() if v != ""}
            for row in rows
            if row.get("step") not in (None, "") and int(float(row["step"])) <= self.keep_until_step
        ]
