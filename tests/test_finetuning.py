"""Encoder fine-tuning options through Lightning's finetuning callback, with the real Trainer: the encoder
frozen for the first epochs (weights and BatchNorm statistics unchanged, the rest trained), BatchNorm
statistics fixed throughout, and the encoder's own learning rate."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from seg_densenet.lit.finetuning import EncoderFinetuning
from seg_densenet.lit.segmentation import SegmentationModule
from seg_densenet.models.dense_unet import DenseUNet

SMALL = {"growth_rate": 4, "block_config": (2, 2, 2, 2), "num_init_features": 8}


def _batches(n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(2, 1, 32, 32, generator=g), "mask": torch.randint(0, 4, (2, 32, 32), generator=g),
             "case": ["a", "b"]} for _ in range(n)]  # fmt: skip


class Snapshots(pl.Callback):
    """The encoder's state dict at the end of every training epoch."""

    def __init__(self):
        self.states = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.states.append({k: v.clone() for k, v in pl_module.encoder.state_dict().items()})


def _fit(tmp_path, epochs: int, **options):
    torch.manual_seed(0)
    net = DenseUNet(encoder_params=SMALL, decoder_layers=(1, 1, 1, 1, 1), decoder_growth_rate=4)
    module = SegmentationModule(net, functools.partial(torch.optim.AdamW, lr=1e-2), **options)
    initial = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    snapshots = Snapshots()
    trainer = pl.Trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[snapshots], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(_batches(), batch_size=None))
    return module, trainer, initial, snapshots.states


def _changed(a: dict, b: dict, suffix: str) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.endswith(suffix))


def test_encoder_frozen_for_the_first_epochs_then_trained(tmp_path):
    module, trainer, initial, states = _fit(tmp_path, epochs=2, freeze_encoder_epochs=1)
    assert any(isinstance(cb, EncoderFinetuning) for cb in trainer.callbacks)
    # epoch 0: nothing of the encoder moved, not even its BatchNorm running statistics
    assert not _changed(initial, states[0], "weight") and not _changed(initial, states[0], "running_mean")
    # epoch 1: unfrozen, weights and statistics move
    assert _changed(states[0], states[1], "conv1.weight") and _changed(states[0], states[1], "running_mean")
    assert all(p.requires_grad for p in module.encoder.parameters())


def test_frozen_batch_norm_keeps_its_statistics_while_the_weights_train(tmp_path):
    _, _, initial, states = _fit(tmp_path, epochs=2, freeze_encoder_bn=True)
    assert _changed(initial, states[1], "conv1.weight")
    assert not _changed(initial, states[1], "running_mean") and not _changed(
        initial, states[1], "running_var"
    )


def test_encoder_learning_rate_multiplier_and_no_callback_without_options(tmp_path):
    module, trainer, _, _ = _fit(tmp_path, epochs=1, encoder_lr_mult=0.1)
    groups = trainer.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-2, 1e-3]) and "lr_mult" not in groups[1]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in module.encoder.parameters()}
    assert not any(isinstance(cb, EncoderFinetuning) for cb in trainer.callbacks)
