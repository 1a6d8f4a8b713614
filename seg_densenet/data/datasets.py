"""PyTorch datasets over cached, preprocessed volumes (see :mod:`seg_densenet.data.cache`).

- :class:`SliceDataset`: 2D training slices cropped/padded to a fixed size, optionally augmented.
- :class:`VolumeDataset`: whole volumes for validation and test, not cropped (the models accept any
  size), so volume metrics cover the whole slice.
- :class:`DiagnosisSliceDataset`: mid-ventricular slices labelled with the patient's diagnosis
  group, for classification pretraining of the encoder (1 channel, like the segmentation input).
- :class:`ImageFolderDataset`: the same classification items from a folder of class subfolders.

Arrays are slices-first: ``(S, H, W)`` with ``H`` = X, ``W`` = Y and ``S`` = Z of the NIfTI volume.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from seg_densenet.data.cache import CachedVolume
from seg_densenet.data.context import check_context_slices, context_stack
from seg_densenet.data.preprocess import center_shift, place
from seg_densenet.errors import ConfigError, DataError


class _CachedArrays:
    """Memory-mapped arrays of cached volumes, opened once per process."""

    def __init__(self, entries: Sequence[CachedVolume]):
        self.entries = list(entries)
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._open:
            try:
                self._open[i] = self.entries[i].load(mmap=True)
            except OSError as exc:  # the cache folder was removed or emptied while the run went on
                raise DataError(
                    f"{exc.filename or self.entries[i].image_path}: cached array vanished during "
                    "the run (was data.cache_dir removed?); run again to rebuild it"
                ) from exc
        return self._open[i]

    def image_slice(self, i: int, z: int, context_slices: int = 0) -> np.ndarray:
        """Slice ``z`` of entry ``i``: ``(H, W)`` float32, or ``(H, W, 2k + 1)`` with ``context_slices = k``
        neighbours on each side as channels (:mod:`seg_densenet.data.context`), channels last as
        albumentations takes them."""
        image, _ = self.arrays(i)
        if not context_slices:
            return np.asarray(image[z], dtype=np.float32)
        return np.moveaxis(context_stack(image, context_slices, z, z + 1)[0], 0, -1)

    def crop(
        self,
        i: int,
        z: int,
        size: Sequence[int] | None,
        offset: Sequence[int] = (0, 0),
        context_slices: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Slice ``z`` of entry ``i`` (with its neighbours, see :meth:`image_slice`), cropped/padded to
        ``size`` around the entry's label centre moved by ``offset`` pixels (the crop stays inside the
        array)."""
        _, mask = self.arrays(i)
        img, msk = self.image_slice(i, z, context_slices), np.asarray(mask[z])
        if size is None:
            return img, msk
        # centring on the volume's labels (not each slice's) keeps the heart inside the crop while
        # leaving its position natural, and is the same for every slice of a volume
        center = self.entries[i].label_center
        if center is not None and any(offset):
            center = [c + o for c, o in zip(center, offset)]
        return self._place(img, msk, size, center)

    def crop_at(
        self, i: int, z: int, size: Sequence[int], center: Sequence[float], context_slices: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Slice ``z`` of entry ``i`` (with its neighbours, see :meth:`image_slice`), cropped/padded to
        ``size`` around ``center`` (``(row, col)`` pixels)."""
        _, mask = self.arrays(i)
        return self._place(self.image_slice(i, z, context_slices), np.asarray(mask[z]), size, center)

    @staticmethod
    def _place(
        img: np.ndarray, msk: np.ndarray, size: Sequence[int], center
    ) -> tuple[np.ndarray, np.ndarray]:
        shift = center_shift(img.shape, size, center)
        return place(img, size, shift, fill=float(img.min())), place(msk, size, shift, fill=0)


def check_crop_options(crop_jitter: int, foreground_fraction: float | None, augment_margin: int) -> None:
    """The training-crop options (``data.crop_jitter``, ``data.foreground_fraction``, ``data.augment_margin``),
    checked; raises :class:`ConfigError` naming the option."""
    if crop_jitter < 0:
        raise ConfigError(f"data.crop_jitter: must be >= 0 pixels, got {crop_jitter}")
    if foreground_fraction is not None and not 0 <= foreground_fraction <= 1:
        raise ConfigError(f"data.foreground_fraction: must be in [0, 1] or null, got {foreground_fraction}")
    if augment_margin < 0:
        raise ConfigError(f"data.augment_margin: must be >= 0 pixels, got {augment_margin}")


class SliceDataset(Dataset):
    """Training slices. Item: ``{"image": (C, H, W) float32, "mask": (H, W) int64, "case": "patient001_ED"}``,
    ``C = 2 * context_slices + 1``.

    crop_size: ``(H, W)`` of every item (``None``: keep each volume's size, batches then need equal
    sizes); crop_jitter: the crop's centre moves from the volume's label centre by up to this many
    pixels per axis, uniformly at random (torch's generator, so worker seeding makes it reproducible),
    so that the network also sees the heart off-centre and more of the surrounding anatomy; augment: a
    callable ``(image, mask) -> (image, mask)`` on numpy slices, e.g.
    :class:`~seg_densenet.data.transforms.WorkerSeededAugment`.

    foreground_fraction: ``None`` centres crops on the volume's labels (plus jitter) as above. A value
    in [0, 1] samples patches over the whole field of view instead, as nnU-Net does: with that
    probability the crop is centred on a random labelled pixel of the slice, otherwise on a uniformly
    random pixel, so the network also learns what liver, bowel and chest wall look like.
    augment_margin: the crop is taken this many pixels larger on every side, augmented, then
    centre-cropped to ``crop_size``, so rotations and zooms bring in real anatomy instead of fill.

    context_slices: 2.5D input, ``k`` neighbouring slices on each side as channels
    (:mod:`seg_densenet.data.context`), augmented together with the slice. Which way a stack runs
    (base to apex or back) differs between scanners and affines, so each item reverses the
    neighbours' order with probability 0.5: the network learns from what the neighbours show, not
    from their direction.
    """

    def __init__(
        self,
        entries: Sequence[CachedVolume],
        crop_size: Sequence[int] | None = None,
        augment: Callable | None = None,
        crop_jitter: int = 0,
        foreground_fraction: float | None = None,
        augment_margin: int = 0,
        context_slices: int = 0,
    ):
        self.store = _CachedArrays(entries)
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.augment = augment
        check_crop_options(crop_jitter, foreground_fraction, augment_margin)
        self.context_slices = check_context_slices(context_slices)
        self.crop_jitter = int(crop_jitter)
        self.foreground_fraction = foreground_fraction
        self.augment_margin = int(augment_margin) if self.crop_size is not None else 0
        self.index = [(i, z) for i, e in enumerate(self.store.entries) for z in range(e.n_slices)]

    def __len__(self) -> int:
        return len(self.index)

    def _patch_center(self, i: int, z: int) -> tuple[float, float]:
        """A random labelled pixel of slice ``z`` (probability ``foreground_fraction``), else any pixel."""
        _, mask = self.store.arrays(i)
        height, width = mask.shape[1:]
        if float(torch.rand(())) < self.foreground_fraction:
            ys, xs = np.nonzero(np.asarray(mask[z]))
            if len(ys):
                j = int(torch.randint(len(ys), ()))
                return float(ys[j]), float(xs[j])
            center = self.store.entries[i].label_center
            if center is not None:
                return float(center[0]), float(center[1])
        return float(torch.randint(height, ())), float(torch.randint(width, ()))

    def __getitem__(self, k: int) -> dict:
        i, z = self.index[k]
        window = self.crop_size
        if window is not None and self.augment_margin:
            window = tuple(n + 2 * self.augment_margin for n in window)
        if self.foreground_fraction is None or window is None:  # no crop: whole slices
            offset = (0, 0)
            if self.crop_jitter:
                offset = tuple(torch.randint(-self.crop_jitter, self.crop_jitter + 1, (2,)).tolist())
            image, mask = self.store.crop(i, z, window, offset, self.context_slices)
        else:
            center = self._patch_center(i, z)
            image, mask = self.store.crop_at(i, z, window, center, self.context_slices)
        if self.augment is not None:
            image, mask = self.augment(image, mask)
        if window != self.crop_size:
            shift = center_shift(mask.shape, self.crop_size)
            image, mask = place(image, self.crop_size, shift), place(mask, self.crop_size, shift)
        if self.context_slices:
            image = np.moveaxis(image, -1, 0)  # (H, W, C) -> (C, H, W)
            if float(torch.rand(())) < 0.5:
                image = image[::-1]
        else:
            image = image[None]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "mask": torch.from_numpy(np.asarray(mask, dtype=np.int64)),
            "case": self.store.entries[i].name,
        }


class VolumeDataset(Dataset):
    """Whole volumes for validation/test.

    Item: ``{"image": (S, C, H, W) float32, "mask": (S, H, W) int64, "spacing": (3,) float32 mm as
    (sx, sy, sz) = (H, W, S) axes, "case": "patient001", "phase": "ED"}``; ``C = 2 * context_slices + 1``,
    each slice with its neighbours (:mod:`seg_densenet.data.context`).
    """

    def __init__(self, entries: Sequence[CachedVolume], context_slices: int = 0):
        self.store = _CachedArrays(entries)
        self.context_slices = int(context_slices)

    def __len__(self) -> int:
        return len(self.store.entries)

    def __getitem__(self, i: int) -> dict:
        entry = self.store.entries[i]
        image, mask = self.store.arrays(i)
        case, _, phase = entry.name.rpartition("_")
        return {
            "image": torch.from_numpy(context_stack(image, self.context_slices)),
            "mask": torch.from_numpy(np.array(mask, dtype=np.int64)),
            "spacing": torch.tensor(entry.meta.spacing, dtype=torch.float32),
            "case": case,
            "phase": phase,
        }


class DiagnosisSliceDataset(Dataset):
    """Mid-ventricular slices labelled with the diagnosis group, for classification pretraining.

    Of each volume's slices that contain the LV cavity, the middle half (at least one) is used:
    those show the ventricles in cross-section, where the groups differ most; apical and basal
    slices are ambiguous. Item: ``{"image": (1, H, W) float32, "label": int64 (index in GROUPS),
    "case": "patient001_ED"}``.

    labels: the group index of each entry; lv_label: the class value of the LV cavity in the masks.
    mask_free: use no contour at all, as for patients with a diagnosis but no segmentation (the
    label-scarce setting, ``data.labelled_patients``): the middle half of each stack's slices, cropped
    around the image centre instead of the heart.
    """

    def __init__(
        self,
        entries: Sequence[CachedVolume],
        labels: Sequence[int],
        crop_size: Sequence[int] | None = None,
        augment: Callable | None = None,
        lv_label: int = 3,
        mask_free: bool = False,
    ):
        self.store = _CachedArrays(entries)
        self.labels = [int(v) for v in labels]
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.augment = augment
        self.mask_free = mask_free
        self.lv_label = lv_label
        self.index = [(i, z) for i in range(len(self.store.entries)) for z in self._slices(i)]

    def _slices(self, i: int) -> list[int]:
        """The slices of entry ``i`` that are used: the middle half of those with LV cavity (of all, mask-free)."""
        _, mask = self.store.arrays(i)
        if self.mask_free:
            chosen = list(range(mask.shape[0]))
        else:
            chosen = [z for z in range(mask.shape[0]) if np.any(np.asarray(mask[z]) == self.lv_label)]
        cut = len(chosen) // 4
        return chosen[cut : len(chosen) - cut]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        i, z = self.index[k]
        if self.mask_free and self.crop_size is not None:
            shape = self.store.arrays(i)[0].shape[1:]
            image, mask = self.store.crop_at(i, z, self.crop_size, ((shape[0] - 1) / 2, (shape[1] - 1) / 2))
        else:
            image, mask = self.store.crop(i, z, self.crop_size)
        if self.augment is not None:
            image, _ = self.augment(image, mask)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            "label": torch.tensor(self.labels[i], dtype=torch.int64),
            "case": self.store.entries[i].name,
        }


PHASES = ("ED", "ES")  # the labelled frames of an ACDC patient
PHASE_POSITIONS = tuple(f"{phase}_{third}" for phase in PHASES for third in ("top", "middle", "bottom"))
"""The ``phase_position`` classes: the frame's phase, and the third of its stack the slice lies in."""


class PhasePositionSliceDataset(DiagnosisSliceDataset):
    """Every slice of the ED and ES stacks, labelled with its phase and the third of the stack it lies in
    (:data:`PHASE_POSITIONS`, in stack order), for classification pretraining without any contour or
    diagnosis: telling the cavities' size and the slice's level apart asks the encoder to find the
    ventricles. Crops are centred on the image. Entries of other phases are left out.
    Item: as :class:`DiagnosisSliceDataset`'s, ``label`` an index in :data:`PHASE_POSITIONS`."""

    def __init__(
        self,
        entries: Sequence[CachedVolume],
        crop_size: Sequence[int] | None = None,
        augment: Callable | None = None,
    ):
        entries = [e for e in entries if e.name.rpartition("_")[2] in PHASES]
        labels = [PHASES.index(e.name.rpartition("_")[2]) for e in entries]
        super().__init__(entries, labels, crop_size, augment, mask_free=True)
        self.slice_labels = [
            3 * self.labels[i] + min(2, 3 * z // self.store.arrays(i)[0].shape[0]) for i, z in self.index
        ]

    def _slices(self, i: int) -> list[int]:
        return list(range(self.store.arrays(i)[0].shape[0]))  # every slice: the position is the label

    def __getitem__(self, k: int) -> dict:
        item = super().__getitem__(k)
        item["label"] = torch.tensor(self.slice_labels[k], dtype=torch.int64)
        return item


class ImageFolderDataset(Dataset):
    """Labelled images from ``root/<class>/<image>`` (torchvision ``ImageFolder``), as 1-channel slices.

    Images are converted to grayscale, resized to ``image_size`` ``(H, W)`` and z-scored per image
    (like the MRI slices). Item: ``{"image": (1, H, W) float32, "label": int64, "case": file path}``.
    ``classes`` lists the class folder names in label order.
    """

    def __init__(self, root: str | Path, image_size: Sequence[int], indices: Sequence[int] | None = None):
        from torchvision import datasets, transforms

        steps = [
            transforms.Grayscale(num_output_channels=1),
            transforms.Resize(tuple(image_size)),
            transforms.ToTensor(),
        ]
        try:
            self.folder = datasets.ImageFolder(str(root), transform=transforms.Compose(steps))
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"{root}: cannot read the image folder ({exc})") from exc
        self.classes = list(self.folder.classes)
        self.indices = list(indices) if indices is not None else list(range(len(self.folder)))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        j = self.indices[k]
        image, label = self.folder[j]
        image = (image - image.mean()) / image.std().clamp_min(1e-8)
        return {
            "image": image,
            "label": torch.tensor(label, dtype=torch.int64),
            "case": self.folder.samples[j][0],
        }
