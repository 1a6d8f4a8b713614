"""Augmentation: image and mask stay aligned, labels are never invented, configs build, workers differ."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_acdc import toy_labels
from torch.utils.data import DataLoader, Dataset

from seg_densenet.data.transforms import WorkerSeededAugment, augment_slice

CONF = Path(__file__).resolve().parents[1] / "conf" / "augmentation"
NEAREST = cv2.INTER_NEAREST


def build(name: str) -> A.Compose:
    return instantiate(OmegaConf.load(CONF / f"{name}.yaml"))


def test_geometric_transforms_keep_image_and_mask_aligned():
    mask = toy_labels((64, 64, 1), radius=10)[..., 0]
    image = mask.astype(np.float32) * 100  # the image *is* the mask, so alignment is checkable
    geometric = A.Compose(
        [
            A.Affine(
                rotate=(-30, 30), scale=(0.8, 1.2), translate_percent=(-0.1, 0.1), interpolation=NEAREST, p=1
            ),
            A.ElasticTransform(alpha=30, sigma=5, interpolation=NEAREST, p=1),
            A.GridDistortion(distort_limit=0.3, interpolation=NEAREST, p=1),
            A.HorizontalFlip(p=0.5),
        ],
        seed=0,
    )
    moved = 0
    for _ in range(10):
        out_image, out_mask = augment_slice(geometric, image, mask)
        assert out_mask.dtype == np.uint8 and out_mask.shape == mask.shape
        np.testing.assert_allclose(out_image, out_mask.astype(np.float32) * 100, atol=1e-3)
        assert set(np.unique(out_mask)) <= {0, 1, 2, 3}
        moved += not np.array_equal(out_mask, mask)
    assert moved == 10


def test_default_pipeline_on_zscored_slices():
    augment = build("cardiac")
    assert not any("Flip" in type(t).__name__ for t in augment.transforms)  # flips off by default
    assert any("Flip" in type(t).__name__ for t in build("cardiac_flips").transforms)
    augment.set_random_seed(0)
    mask = toy_labels((48, 48, 1), radius=8)[..., 0]
    rng = np.random.default_rng(0)
    image = (mask * 1.0 + rng.normal(0, 0.1, mask.shape) - 1.2).astype(np.float32)  # negative like z-scores
    changed = 0
    for _ in range(20):
        out_image, out_mask = augment_slice(augment, image, mask)
        assert np.isfinite(out_image).all() and out_image.dtype == np.float32
        assert set(np.unique(out_mask)) <= {0, 1, 2, 3}
        # with linear image interpolation, each label region keeps its intensity where it is interior
        interior = out_mask == 3
        if interior.sum() > 20:
            assert np.median(out_image[interior]) > np.median(out_image[out_mask == 0])
        changed += not np.array_equal(out_image, image)
    assert changed >= 15


class _Repeat(Dataset):
    def __init__(self, augment):
        self.augment = augment
        self.mask = toy_labels((32, 32, 1))[..., 0]

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.from_numpy(self.augment(self.mask * 50.0, self.mask)[0])


def test_workers_draw_different_reproducible_augmentations():
    augment = A.Compose([A.Affine(rotate=(-90, 90), p=1)], seed=123)  # a fixed seed, copied to each worker

    def run():
        torch.manual_seed(0)
        loader = DataLoader(_Repeat(WorkerSeededAugment(augment)), batch_size=2, num_workers=2)
        return torch.cat(list(loader))

    first, again = run(), run()
    assert not torch.equal(first[0], first[2])  # worker 0's first item vs worker 1's first item
    assert torch.equal(first, again)


def _flip_draws(augment: WorkerSeededAugment, n: int) -> list[tuple[bool, bool]]:
    """(horizontal, vertical) of ``n`` draws of a pipeline holding the two flips."""
    image = np.arange(12, dtype=np.float32).reshape(3, 4)  # no symmetry: each flip is recognisable
    mask = np.zeros((3, 4), dtype=np.uint8)
    variants = {
        (False, False): image,
        (True, False): image[:, ::-1],
        (False, True): image[::-1],
        (True, True): image[::-1, ::-1],
    }
    draws = []
    for _ in range(n):
        out, _ = augment(image, mask)
        draws.append(next(k for k, v in variants.items() if np.allclose(out, v)))
    return draws


def test_transforms_draw_independently_in_a_seeded_pipeline():
    # albumentations gives each transform of a seeded Compose the same stream; the wrapper must not
    augment = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)], seed=7)
    torch.manual_seed(0)
    draws = _flip_draws(WorkerSeededAugment(augment), 400)
    both = sum(h and v for h, v in draws) / len(draws)
    reflections = sum(h != v for h, v in draws) / len(draws)
    assert 0.18 < both < 0.32  # independent p=0.5 events co-occur in 25 % of draws
    assert 0.40 < reflections < 0.60  # exactly one flip: a reflection, about half the time


def test_every_pair_of_the_recipe_augmentation_draws_independently():
    # a probability-only probe of the recipe's pipeline: each transform's own "apply" stream
    augment = build("cardiac_strong")
    torch.manual_seed(1)
    WorkerSeededAugment(augment)(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8))  # seeds it
    n = 2000
    fired = np.array([[t.py_random.random() < 0.5 for t in augment.transforms] for _ in range(n)])
    for a in range(fired.shape[1]):
        for b in range(a + 1, fired.shape[1]):
            assert 0.20 < np.mean(fired[:, a] & fired[:, b]) < 0.30, (
                augment.transforms[a],
                augment.transforms[b],
            )


def test_same_seed_gives_the_same_batches():
    augment = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.Affine(rotate=(-180, 180), p=0.5)])

    def run(seed):
        torch.manual_seed(seed)
        loader = DataLoader(_Repeat(WorkerSeededAugment(augment)), batch_size=2, num_workers=2)
        return torch.cat(list(loader))

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
