"""2.5D input (data.context_slices): each slice with its neighbours as channels, the same way in
training crops, validation volumes and the predictor (seg_densenet/data/context.py)."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from conftest import compose_config, quick_overrides
from test_acdc import write_dataset

from seg_densenet.checkpoint import load_model
from seg_densenet.data.context import context_stack
from seg_densenet.data.datamodule import SegmentationDataModule
from seg_densenet.data.datasets import VolumeDataset
from seg_densenet.data.nifti import load_volume
from seg_densenet.errors import ConfigError
from seg_densenet.inference.predictor import build_predictor

SPACING = (1.5, 1.5, 8.0)


def make_dm(root, cache_dir, context_slices, **kwargs) -> SegmentationDataModule:
    return SegmentationDataModule(
        root,
        target_spacing=None,
        crop_size=(24, 24),
        cache_dir=cache_dir,
        batch_size=4,
        num_workers=0,
        context_slices=context_slices,
        in_channels=2 * context_slices + 1,
        **kwargs,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("acdc"), 6, shape=(40, 48, 5), spacing=SPACING)


def test_context_stack_clamps_at_the_ends_of_the_stack():
    stack = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 2, 3), np.float32)
    out = context_stack(stack, 1)
    assert out.shape == (4, 3, 2, 3) and out.dtype == np.float32
    assert out[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    assert context_stack(stack, 2, 1, 2)[0, :, 0, 0].tolist() == [0, 0, 1, 2, 3]
    assert np.array_equal(context_stack(stack, 0), stack[:, None])


def test_training_crops_hold_the_neighbours_in_either_order(dataset, tmp_path):
    plain, context = make_dm(dataset, tmp_path / "cache", 0), make_dm(dataset, tmp_path / "cache", 1)
    plain.setup(), context.setup()
    single, stacked = plain.train_dataset(), context.train_dataset()
    assert len(single) == len(stacked)
    forward = backward = 0
    for k in range(len(stacked)):
        i, z = stacked.index[k]
        item = stacked[k]
        assert item["image"].shape == (3, 24, 24) and item["mask"].shape == (24, 24)
        assert torch.equal(item["mask"], single[k]["mask"])
        assert torch.equal(item["image"][1], single[k]["image"][0])  # the labelled slice in the middle
        n = stacked.store.entries[i].n_slices
        below, above = (
            torch.from_numpy(single.store.crop(i, min(max(j, 0), n - 1), (24, 24))[0]) for j in (z - 1, z + 1)
        )
        if torch.equal(below, above):
            continue
        if torch.equal(item["image"][0], below) and torch.equal(item["image"][2], above):
            forward += 1
        else:  # a stack may run either way: the neighbours' order is reversed in half the items
            assert torch.equal(item["image"][0], above) and torch.equal(item["image"][2], below), (i, z)
            backward += 1
    assert forward + backward >= 30 and min(forward, backward) >= 0.25 * (forward + backward)
    with pytest.raises(ConfigError, match="data.in_channels"):
        SegmentationDataModule(dataset, cache_dir=tmp_path / "cache", context_slices=1, in_channels=1)


def test_augmentation_moves_the_neighbours_with_the_slice(dataset, tmp_path):
    # every slice of the stack made equal: whatever the spatial augmentation does, the three channels
    # must stay equal, i.e. they were rotated, flipped and distorted together
    dm = make_dm(dataset, tmp_path / "cache", 1, augmentation=A.Compose([
        A.Affine(rotate=(-180, 180), scale=(0.7, 1.4), p=1.0),
        A.HorizontalFlip(p=0.5),
        A.GridDistortion(distort_limit=0.3, p=1.0),
    ]))  # fmt: skip
    dm.setup()
    data = dm.train_dataset()
    for i in range(len(data.store.entries)):
        image, mask = data.store.arrays(i)
        data.store._open[i] = (np.repeat(np.asarray(image[2:3]), image.shape[0], 0), np.asarray(mask))
    torch.manual_seed(0)
    for k in range(0, len(data), 3):
        channels = data[k]["image"]
        assert channels[0].std() > 0 and torch.allclose(channels[0], channels[1]), k
        assert torch.allclose(channels[2], channels[1]), k


def test_validation_volumes_and_the_predictor_stack_slices_alike(tmp_path, synthetic_root):
    """A 2.5D checkpoint from a real training run: its validation input is each slice with its
    neighbours, and the predictor, given the NIfTI file, labels every voxel as that input does."""
    from seg_densenet.train import train

    overrides = [
        *quick_overrides(tmp_path, synthetic_root),
        "task=segment",
        "data.context_slices=1",
        "data.target_spacing=null",
        "test=false",
    ]
    cfg = compose_config(overrides, tmp_path / "run")
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    model, record = load_model(ckpt)
    assert record["data"]["context_slices"] == 1 and record["model"]["in_channels"] == 3

    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup()
    entry = dm.entries["train"][0]
    item = VolumeDataset([entry], context_slices=1)[0]
    image = item["image"]
    assert image.shape[1] == 3 and torch.equal(image[0, 0], image[0, 1])  # the first slice repeats itself
    assert torch.equal(image[1:, 0], image[:-1, 1]) and torch.equal(image[:-1, 2], image[1:, 1])
    with torch.no_grad():
        expected = model.eval()(image).argmax(1).permute(1, 2, 0).numpy()

    case, _, phase = entry.name.rpartition("_")
    frame = next(c for c in dm.cases if c.name == case).frames[phase]
    for options in ({}, {"memory_budget_mb": 64, "batch_size": 2}):
        predictor, _ = build_predictor(ckpt, device="cpu", backend="torch", precision="32", **options)
        assert predictor.context_slices == 1
        labels = predictor.predict(load_volume(frame.image))["labels"]
        assert labels.shape == expected.shape
        assert (labels == expected).mean() > 0.999, (labels == expected).mean()
