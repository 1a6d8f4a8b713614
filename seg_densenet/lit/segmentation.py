"""Segmentation training with volume metrics as in ACDC, per structure of the dataset's label set."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from seg_densenet.data.labels import LabelSet
from seg_densenet.evaluation.metrics import dice, iou, structure_metrics
from seg_densenet.lit.base import BaseModule
from seg_densenet.lit.finetuning import EncoderFinetuning
from seg_densenet.lit.losses import build_loss, deep_supervision_loss


class SegmentationModule(BaseModule):
    """Trains any network returning logits ``(B, C, H, W)`` on 2D slices; validates on whole volumes.

    Training batches: ``{"image": (B, 1, H, W) float32, "mask": (B, H, W) int64, "case": [str]}``.
    Validation/test items: one volume ``{"image": (S, 1, H, W), "mask": (S, H, W), "spacing": (3,) mm,
    "case": str, "phase": str}``; slices are predicted ``inference_batch_size`` at a time, and Dice,
    IoU (and HD95 in mm every ``hd95_every_n_epochs`` epochs, and always at test) are computed in 3D
    per volume, then averaged over volumes, one key per structure of ``labels`` (structure name -> class
    value, :class:`~seg_densenet.data.labels.LabelSet`; ``None``: ACDC's): ``val/dice_rv``, ``val/dice_myo``,
    ``val/dice_lv``, ``val/dice`` (their mean), ``val/dice_best`` (best ``val/dice`` so far), ``val/iou*``,
    ``val/hd95*``.

    Fine-tuning options act on ``model.encoder`` (DenseUNet, smp Unet): ``encoder_lr_mult`` (its own
    parameter group), and ``freeze_encoder_epochs`` and ``freeze_encoder_bn``, which the module hands to
    Lightning as an :class:`~seg_densenet.lit.finetuning.EncoderFinetuning` callback.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer,
        scheduler=None,
        scheduler_interval="step",
        record=None,
        loss: str = "dice_ce",
        class_weights: list[float] | None = None,
        hd95_every_n_epochs: int = 5,
        freeze_encoder_epochs: int = 0,
        encoder_lr_mult: float = 1.0,
        freeze_encoder_bn: bool = False,
        inference_batch_size: int = 16,
        channels_last: bool = False,
        labels: dict[str, int] | None = None,
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
        self.label_set = LabelSet.from_config(labels)
        self.structures = self.label_set.metric_names
        self.loss_fn = build_loss(loss, class_weights)
        self.hd95_every_n_epochs = hd95_every_n_epochs
        self.freeze_encoder_epochs = freeze_encoder_epochs
        self.encoder_lr_mult = encoder_lr_mult
        self.freeze_encoder_bn = freeze_encoder_bn
        self.inference_batch_size = inference_batch_size
        names = [f"{m}_{s}" for m in ("dice", "iou", "hd95") for s in self.structures]
        self.val_metrics = nn.ModuleDict({n: MeanMetric(nan_strategy="ignore") for n in names})
        self.test_metrics = nn.ModuleDict({n: MeanMetric(nan_strategy="ignore") for n in names})
        if (freeze_encoder_epochs or encoder_lr_mult != 1.0 or freeze_encoder_bn) and self.encoder is None:
            raise ValueError(
                "encoder fine-tuning options need a model with an `encoder` (dense_unet, smp_unet)"
            )

    @property
    def encoder(self) -> nn.Module | None:
        return getattr(self.model, "encoder", None)

    # -- training ---------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        if self.encoder is None or self.encoder_lr_mult == 1.0:
            return [{"params": list(self.model.parameters())}]
        encoder_ids = {id(p) for p in self.encoder.parameters()}
        rest = [p for p in self.model.parameters() if id(p) not in encoder_ids]
        return [
            {"params": rest},
            {"params": list(self.encoder.parameters()), "lr_mult": self.encoder_lr_mult},
        ]

    def configure_callbacks(self) -> list[pl.Callback]:
        if not (self.freeze_encoder_epochs or self.freeze_encoder_bn):
            return []
        return [EncoderFinetuning(self.freeze_encoder_epochs, self.freeze_encoder_bn)]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        outputs = self(batch["image"])
        if isinstance(outputs, tuple):  # deep supervision: logits and auxiliary logits at lower resolutions
            loss = deep_supervision_loss(self.loss_fn, outputs, batch["mask"])
        else:
            loss = self.loss_fn(outputs, batch["mask"])
        self.check_finite(loss, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    # -- volume evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def predict_volume_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(S, C, H, W)`` of a slice stack ``(S, in_channels, H, W)``, in batches of slices."""
        chunks = [
            self(image[i : i + self.inference_batch_size])
            for i in range(0, image.shape[0], self.inference_batch_size)
        ]
        return torch.cat(chunks)

    def _evaluate_volume(self, batch: dict, metrics: nn.ModuleDict, stage: str, with_hd95: bool) -> None:
        logits = self.predict_volume_logits(batch["image"])
        self.log(f"{stage}/loss", self.loss_fn(logits, batch["mask"]), batch_size=1, sync_dist=True)
        # (S, H, W) -> (X, Y, Z), the order of the spacing
        pred = logits.argmax(1).permute(1, 2, 0).cpu().numpy()
        gt = batch["mask"].permute(1, 2, 0).cpu().numpy()
        spacing = [float(s) for s in batch["spacing"]]
        for name, value in self.structures.items():
            p, g = pred == value, gt == value
            metrics[f"dice_{name}"].update(dice(p, g))
            metrics[f"iou_{name}"].update(iou(p, g))
            if with_hd95:
                metrics[f"hd95_{name}"].update(structure_metrics(p, g, spacing)["hd95_mm"])

    def _log_epoch(self, metrics: nn.ModuleDict, stage: str) -> dict[str, float]:
        """Log per-structure means over volumes and their mean over structures; reset the metrics."""
        values = {}
        for short in ("dice", "iou", "hd95"):
            per_structure = []
            for name in self.structures:
                metric = metrics[f"{short}_{name}"]
                if metric.update_count == 0 and not (self.trainer and self.trainer.world_size > 1):
                    continue
                v = float(metric.compute())
                metric.reset()
                if np.isfinite(v):
                    values[f"{stage}/{short}_{name}"] = v
                    per_structure.append(v)
            if len(per_structure) == len(self.structures):
                values[f"{stage}/{short}"] = float(np.mean(per_structure))
        for key, v in values.items():
            self.log(key, v, prog_bar=key == f"{stage}/dice", sync_dist=False)
        return values

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch(self.val_metrics, "val")
        if "val/dice" in values and not self.trainer.sanity_checking:
            self.log_best("val/dice", values["val/dice"])

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_metrics, "test")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        epoch = self.current_epoch + 1
        with_hd95 = self.hd95_every_n_epochs > 0 and epoch % self.hd95_every_n_epochs == 0
        self._evaluate_volume(batch, self.val_metrics, "val", with_hd95)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate_volume(batch, self.test_metrics, "test", with_hd95=True)
