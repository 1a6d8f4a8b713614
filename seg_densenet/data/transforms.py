"""Joint image/mask augmentation of training slices with albumentations.

The pipeline is an ``albumentations.Compose`` built by Hydra from the data config
(``conf/augmentation/cardiac.yaml``): rotation and scaling (``Affine``), grid distortion (or
``ElasticTransform``, slower), brightness/contrast, gamma, Gaussian noise and blur. Geometric transforms move image and
mask together; masks always use nearest interpolation, so no label value is invented.

Flips are off by default. A short-axis slice has a handedness: the RV lies on one side of the LV in
every scan acquired the usual way, and a flip puts it on the other side, teaching the network
anatomy that does not occur. Turn them on (``conf/augmentation/cardiac_flips.yaml``) only for data
whose orientation is not normalised.

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


class WorkerSeededAugment:
    """Wrap an albumentations pipeline so that each process draws its own, reproducible randomness.

    A pipeline seeded from OS entropy (or not at all) is copied into every DataLoader worker with
    the same random state, so all workers would apply the same transforms. On first use in a process
    the pipeline is reseeded from ``torch.initial_seed()``, which PyTorch makes distinct per worker and
    which ``seed_everything`` makes reproducible.
    """

    def __init__(self, augment: Callable):
        self.augment = augment
        self._pid: int | None = None

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            if hasattr(self.augment, "set_random_seed"):
                self.augment.set_random_seed(torch.initial_seed() % 2**32)
        return augment_slice(self.augment, image, mask)
