"""Fine-tuning a pretrained encoder: Lightning's finetuning callback, set from the segmentation task's
options (``task.segment.module.freeze_encoder_epochs``,
``task.segment.module.freeze_encoder_bn``).

The encoder's parameters stay in the optimiser from the start (with ``encoder_lr_mult`` as their own
group, :meth:`~seg_densenet.lit.segmentation.SegmentationModule.parameter_groups`); freezing only turns
their gradients off, so the learning-rate schedule covers every group throughout and no parameter group
is added mid-run (a group added at unfreezing would escape a LambdaLR schedule).
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BaseFinetuning
from torch import nn
from torch.optim import Optimizer


class EncoderFinetuning(BaseFinetuning):
    """Keep ``pl_module.encoder`` frozen for the first ``freeze_epochs`` epochs, and its BatchNorm layers
    in eval mode (normalising with the pretrained running statistics, which do not move) while it is
    frozen, or throughout with ``freeze_bn``.

    A run resumed at any epoch ends up in the same state: the freezing is set from the epoch number.
    """

    def __init__(self, freeze_epochs: int = 0, freeze_bn: bool = False) -> None:
        super().__init__()
        if freeze_epochs < 0:
            raise ValueError(f"freeze_epochs must be >= 0, got {freeze_epochs}")
        self.freeze_epochs = freeze_epochs
        self.freeze_bn = freeze_bn
        self._batch_norms: list[nn.Module] = []

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        # SegmentationModule checks at construction that a model given these options has an encoder
        encoder = pl_module.encoder
        self._batch_norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if self.freeze_epochs:
            self.freeze(encoder, train_bn=False)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if self.freeze_epochs and epoch >= self.freeze_epochs:
            self.make_trainable(pl_module.encoder)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the base class also records the optimiser's parameter groups to restore them on resume; this
        # callback never changes them, so there is nothing to record
        for optimizer in trainer.optimizers:
            self.finetune_function(pl_module, trainer.current_epoch, optimizer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int
    ) -> None:
        # Lightning puts the whole model back in train mode after validation; set the mode every batch
        frozen = self.freeze_bn or trainer.current_epoch < self.freeze_epochs
        for module in self._batch_norms:
            module.train(pl_module.training and not frozen)
