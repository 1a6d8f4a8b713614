"""Classification pretraining of a DenseNet (cardiac diagnosis or any labelled image folder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from seg_densenet.lit.base import BaseModule


class ClassificationModule(BaseModule):
    """Cross-entropy training of a classifier returning logits ``(B, num_classes)``.

    Batches are dicts ``{"image": (B, C, H, W) float32, "label": (B,) int64}``. Logs ``train/loss``,
    ``train/acc``, ``val/loss``, ``val/acc``, ``val/acc_best``, ``test/acc``.
    """

    def __init__(
        self,
        model,
        optimizer,
        scheduler=None,
        scheduler_interval="step",
        record=None,
        num_classes: int = 5,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        scheduler_total_steps: bool = False,
        scheduler_elapsed_fraction: bool = False,
    ):
        super().__init__(
            model,
            optimizer,
            scheduler,
            scheduler_interval,
            record,
            channels_last,
            scheduler_total_steps,
            scheduler_elapsed_fraction,
        )
        self.label_smoothing = label_smoothing
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def _step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.label_smoothing)
        return loss, logits.argmax(dim=1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, pred = self._step(batch)
        self.check_finite(loss, batch)
        self.train_acc(pred, batch["label"])
        bs = batch["label"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, pred = self._step(batch)
        self.val_acc(pred, batch["label"])
        bs = batch["label"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=bs)

    def on_validation_epoch_end(self) -> None:
        acc = self.trainer.callback_metrics.get("val/acc")
        if acc is not None and not self.trainer.sanity_checking:
            self.log_best("val/acc", float(acc))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        loss, pred = self._step(batch)
        self.test_acc(pred, batch["label"])
        bs = batch["label"].shape[0]
        self.log("test/loss", loss, batch_size=bs, sync_dist=True)
        self.log("test/acc", self.test_acc, batch_size=bs)
