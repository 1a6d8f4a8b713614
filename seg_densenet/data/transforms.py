"""Joint image/mask augmentation of training slices with albumentations.

The pipeline is an ``albumentations.Compose`` built by Hydra from the data config
(``conf/augmentation/cardiac.yaml``): rotation and scaling (``Affine``), grid distortion (or
``ElasticTransform``, slower), brightness/contrast, gamma, Gaussian noise and blur. Geometric transforms move image and
mask together; masks always use nearest interpolation, so no label value is invented.

Flips are off in ``conf/augmentation/cardiac.yaml`` (the phantom's): on data whose orientation is
normalised the RV lies on one side of the LV, and a flip teaches anatomy that does not occur there.
Real scans from other scanners are stored in any orientation and handedness, so the real-data recipe
(``conf/augmentation/cardiac_strong.yaml``) rotates by any angle and flips both ways.

albumentations' intensity transforms assume images in [0, 1] (gamma of a negative z-score is NaN),
so :func:`augment_slice` maps each slice to [0, 1] by its own min/max, augments, and maps back with
the same affine; the fill value of geometric transforms (0) then becomes the slice minimum, i.e.
background, whatever the normalisation.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch


def augment_slice(augment: Callable, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply an albumentations pipeline to one slice and its mask.

    image: ``(H, W)`` float32 in any intensity range; mask: ``(H, W)`` uint8 labels.
    Returns the augmented ``(image (H, W) float32, mask (H, W) uint8)``; the output size may differ
    only if the pipeline resizes.
    """
    low, high = float(image.min()), float(image.max())
    scale = high - low if high > low else 1.0
    unit = (np.asarray(image, dtype=np.float32) - low) / scale
    out = augment(image=unit, mask=np.asarray(mask, dtype=np.uint8))
    return (out["image"] * scale + low).astype(np.float32), out["mask"]


def seed_independently(transform, seed: int) -> None:
    """Seed ``transform`` and, recursively, every transform inside it with a stream of its own.

    albumentations' ``Compose.set_random_seed`` hands the *same* seed to each of its transforms, so
    transforms with equal ``p`` fire together (HorizontalFlip and VerticalFlip at p=0.5 give both
    flips or neither: a 180° rotation, never a reflection). Each child here gets its own seed spawned
    from ``seed`` (``numpy.random.SeedSequence``), so their draws are independent and reproducible.
    """
    transform.set_random_seed(seed)
    children = getattr(transform, "transforms", None)
    if children:
        for child, child_seed in zip(children, np.random.SeedSequence(seed).spawn(len(children))):
            seed_independently(child, int(child_seed.generate_state(1)[0]))


class WorkerSeededAugment:
    """Wrap an albumentations pipeline so that each process draws its own, reproducible randomness.

    A pipeline seeded from OS entropy (or not at all) is copied into every DataLoader worker with
    the same random state, so all workers would apply the same transforms. Whenever the process or
    its torch seed changes (a new worker, a new epoch's workers), the pipeline is reseeded from
    ``torch.initial_seed()``, which PyTorch makes distinct per worker and which ``seed_everything``
    makes reproducible; every transform gets an independent stream (:func:`seed_independently`).
    """

    def __init__(self, augment: Callable):
        self.augment = augment
        self._seeded_for: tuple[int, int] | None = None

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = (os.getpid(), torch.initial_seed())
        if self._seeded_for != key:
            self._seeded_for = key
            if hasattr(self.augment, "set_random_seed"):
                seed_independently(self.augment, torch.initial_seed() % 2**32)
        return augment_slice(self.augment, image, mask)
