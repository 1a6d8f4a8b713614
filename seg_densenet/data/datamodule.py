"""Lightning DataModules: segmentation (slices for training, volumes for evaluation) and classification.

:class:`SegmentationDataModule` is built by Hydra from ``conf/data/<name>.yaml``. The classification
pretraining stage takes its data from the same module with :meth:`SegmentationDataModule.classification_datamodule`,
which uses the same patients and the same split (same seed and fold), so stage 1 never sees a test
patient. A :class:`ClassificationDataModule` over a folder of labelled images (``conf/data/imagefolder.yaml``)
has the same method, returning itself, so the classification stage can call it on either.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from seg_densenet.data.acdc import GROUPS, Case, Layout, discover_cases
from seg_densenet.data.cache import CachedVolume, VolumeCache
from seg_densenet.data.context import check_context_slices, input_channels
from seg_densenet.data.datasets import (
    PHASE_POSITIONS,
    DiagnosisSliceDataset,
    ImageFolderDataset,
    PhasePositionSliceDataset,
    SliceDataset,
    VolumeDataset,
    check_crop_options,
)
from seg_densenet.data.heart_size import size_percentiles
from seg_densenet.data.labels import LabelSet
from seg_densenet.data.preprocess import Preprocessor
from seg_densenet.data.splits import labelled_subset, make_split, save_split
from seg_densenet.data.transforms import WorkerSeededAugment
from seg_densenet.errors import ConfigError, DataError, SegDenseNetError

PRETRAIN_TARGETS = {"diagnosis": GROUPS, "phase_position": PHASE_POSITIONS}
"""Stage-1 classification targets drawn from the segmentation data, with their class names."""

SPLITS = ("train", "val", "test")


def _check_classes(
    label_set: LabelSet,
    in_channels: int,
    num_classes: int,
    label_mapping: Mapping | None,
    context_slices: int = 0,
) -> None:
    """The class options :class:`SegmentationDataModule` checks itself (for callers that bypass the CLI)."""
    check_context_slices(context_slices)
    if in_channels != input_channels(context_slices):
        raise ConfigError(
            f"data.in_channels: short-axis MRI has 1 channel per slice, {input_channels(context_slices)} "
            f"with data.context_slices={context_slices}; got {in_channels}"
        )
    if num_classes != label_set.num_classes:
        raise ConfigError(
            f"data.num_classes: data.structures {label_set.class_names[1:]} and background are "
            f"{label_set.num_classes} classes, got {num_classes}"
        )
    if label_mapping and not {int(v) for v in label_mapping.values()} <= set(range(num_classes)):
        raise ConfigError(
            f"data.label_mapping: targets must be class values 0..{num_classes - 1} of "
            f"data.structures, got {dict(label_mapping)}"
        )


class SegmentationDataModule(pl.LightningDataModule):
    """Cardiac short-axis segmentation data.

    root: dataset folder (see :class:`~seg_densenet.data.acdc.Layout`); layout: a ``Layout`` config
    mapping (``None``: ACDC); structures: names in class-value order 1..n (``None``: ACDC's RV, MYO, LV;
    :class:`~seg_densenet.data.labels.LabelSet`); label_mapping: source label value in the files -> class
    value (``None``: identity).
    synthetic: ``{"patients": N, "seed": S}`` (optionally ``"image_size": [X, Y]``) to generate the synthetic phantom into ``root`` when
    it is not complete there, or ``None``.
    crop_jitter: training crops are centred up to this many pixels away from the labels' centre.
    foreground_fraction: ``None`` keeps label-centred crops; a probability samples patches over the whole
    field of view, that fraction centred on a labelled pixel (:class:`~seg_densenet.data.datasets.SliceDataset`).
    augment_margin: pixels of context around each training crop for augmentation, cropped off after it.
    labelled_patients: ``N``: segmentation trains on the labels of only ``N`` training patients, spread over
    the diagnosis groups (:func:`~seg_densenet.data.splits.labelled_subset`, listed as ``labelled`` in
    ``split.json``); validation, test and the diagnosis classification keep every patient of their split.
    pretrain_target: what stage-1 classification learns from these patients (:meth:`classification_datamodule`):
    ``"diagnosis"`` (the group of each patient) or ``"phase_position"`` (each slice's phase and third of the
    stack, which needs neither contours nor diagnoses).
    normalization, percentiles, target_spacing (in-plane mm), crop_size (training ``(H, W)``): see
    :class:`~seg_densenet.data.preprocess.Preprocessor`; validation/test volumes are not cropped.
    cache_dir: where preprocessed volumes are kept (:mod:`~seg_densenet.data.cache`).
    fold, n_folds, val_fraction, seed: the patient split (:func:`~seg_densenet.data.splits.make_split`);
    ``fold="all"`` holds out no test patients (the model to deploy: nothing is left to test it on).
    augmentation: an albumentations pipeline for training slices, or ``None``.
    skip_bad_cases: ``False``: an unreadable case raises :class:`DataError`; ``True``: it is left out,
    with one warning listing all such cases.
    context_slices: 2.5D input, each slice with ``k`` neighbours on each side as channels
    (:mod:`~seg_densenet.data.context`); 0: one slice, one channel.
    in_channels, num_classes: ``2 * context_slices + 1`` and background + ``structures`` (checked); model
    configs read them from here.

    Batches: train ``{"image": (B, in_channels, H, W) float32, "mask": (B, H, W) int64, "case": list[str]}``;
    val/test: one volume per step, see :class:`~seg_densenet.data.datasets.VolumeDataset`.
    """

    def __init__(
        self,
        root: str | Path,
        layout: Mapping | Layout | None = None,
        structures: Sequence[str] | None = None,
        label_mapping: Mapping[int, int] | None = None,
        synthetic: Mapping | None = None,
        normalization: str = "zscore",
        percentiles: Sequence[float] | None = (0.5, 99.5),
        target_spacing: Sequence[float] | None = None,
        crop_size: Sequence[int] | None = (128, 128),
        crop_jitter: int = 0,
        foreground_fraction: float | None = None,
        augment_margin: int = 0,
        labelled_patients: int | None = None,
        pretrain_target: str = "diagnosis",
        cache_dir: str | Path = "data/cache",
        fold: int | str = 0,
        n_folds: int = 5,
        val_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 2,
        augmentation: Callable | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        skip_bad_cases: bool = False,
        context_slices: int = 0,
        in_channels: int = 1,
        num_classes: int = 4,
    ):
        super().__init__()
        self.label_set = LabelSet.from_config(structures)
        _check_classes(self.label_set, in_channels, num_classes, label_mapping, context_slices)
        check_crop_options(crop_jitter, foreground_fraction, augment_margin)
        self.save_hyperparameters(ignore=["augmentation"])
        self.root = Path(root)
        self.layout = Layout.from_config(layout)
        self.label_mapping = {int(k): int(v) for k, v in label_mapping.items()} if label_mapping else None
        self.synthetic = dict(synthetic) if synthetic else None
        self.preprocessor = Preprocessor(normalization, percentiles, target_spacing, crop_size=None)
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.crop_jitter = int(crop_jitter)
        self.foreground_fraction = foreground_fraction
        self.augment_margin = int(augment_margin)
        self.labelled_patients = labelled_patients
        if pretrain_target not in PRETRAIN_TARGETS:
            raise ConfigError(
                f"data.pretrain_target: {pretrain_target!r} is not one of {', '.join(PRETRAIN_TARGETS)}"
            )
        self.pretrain_target = pretrain_target
        self.cache_dir = Path(cache_dir)
        self.fold, self.n_folds, self.val_fraction, self.seed = fold, n_folds, val_fraction, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.augmentation = augmentation
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.skip_bad_cases = skip_bad_cases
        self.context_slices = int(context_slices)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.cases: list[Case] = []
        self.split: dict = {}
        self.entries: dict[str, list[CachedVolume]] = {}
        self.bad_cases: dict[str, str] = {}
        self.cache: VolumeCache | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names by value: ``("background", *data.structures)``."""
        return tuple(self.label_set.class_names)

    # -- setup ---------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Generate the synthetic dataset into ``root`` if configured and not complete."""
        if self.synthetic is not None:
            # imported here: the phantom generator is only needed when synthetic data is asked for
            from seg_densenet.data.synthetic import ensure_dataset

            extra = (
                {"image_size": tuple(self.synthetic["image_size"])}
                if self.synthetic.get("image_size")
                else {}
            )
            ensure_dataset(
                self.root,
                n_patients=int(self.synthetic["patients"]),
                seed=int(self.synthetic.get("seed", 0)),
                **extra,
            )

    def setup(self, stage: str | None = None) -> None:
        """Find the cases, split them by patient, and preprocess every frame into the cache."""
        if self.entries:
            return
        self.prepare_data()  # a no-op when the data is complete; covers callers that skip prepare_data
        errors: list[tuple[str, str]] = []
        self.cases = discover_cases(self.root, self.layout, errors=errors if self.skip_bad_cases else None)
        # the split covers every patient found, so leaving out a bad case never reshuffles the others
        self.split = make_split(
            [(c.name, c.group) for c in self.cases] + [(name, None) for name, _ in errors],
            fold=self.fold,
            n_folds=self.n_folds,
            val_fraction=self.val_fraction,
            seed=self.seed,
        )
        self.cache = VolumeCache(
            self.cache_dir, self.preprocessor, self.label_mapping or self.label_set.identity_mapping
        )
        by_name = {c.name: c for c in self.cases}
        entries: dict[str, list[CachedVolume]] = {name: [] for name in SPLITS}
        for split_name in SPLITS:
            for case_name in self.split[split_name]:
                case = by_name.get(case_name)
                if case is None:
                    continue
                try:
                    cached = [self.cache.get(frame) for frame in case.frames.values()]
                except SegDenseNetError as exc:
                    if not self.skip_bad_cases:
                        raise
                    errors.append((case_name, str(exc)))
                    continue
                entries[split_name].extend(cached)
        if self.labelled_patients is not None:
            # label-scarce training: segmentations of only these patients; classification (diagnosis)
            # still sees every training patient
            labelled = labelled_subset(
                self.split["train"], {c.name: c.group for c in self.cases}, self.labelled_patients, self.seed
            )
            self.split["labelled"] = labelled
            entries["labelled"] = [e for e in entries["train"] if e.name.rpartition("_")[0] in set(labelled)]
        self.bad_cases = dict(errors)
        if errors:
            listing = "; ".join(f"{name}: {msg}" for name, msg in errors)
            warnings.warn(f"skipping {len(errors)} bad case(s): {listing}", stacklevel=2)
        if not entries["train"]:
            raise DataError(f"{self.root}: no usable training case (fold {self.fold} of {self.n_folds})")
        self.entries = entries  # set last: a failed setup can be retried

    # -- loaders -------------------------------------------------------------------------------------
    def train_dataset(self) -> SliceDataset:
        augment = WorkerSeededAugment(self.augmentation) if self.augmentation is not None else None
        return SliceDataset(
            self.training_entries,
            self.crop_size,
            augment,
            self.crop_jitter,
            foreground_fraction=self.foreground_fraction,
            augment_margin=self.augment_margin,
            context_slices=self.context_slices,
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_dataset(),
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._volume_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._volume_loader("test")

    def heart_sizes(self) -> dict | None:
        """Percentiles of the training label maps' heart sizes in grid pixels, kept in the checkpoint
        record for the predictor's ``auto_scale`` (:func:`~seg_densenet.data.heart_size.size_percentiles`)."""
        self.setup()
        return size_percentiles(entry.load()[1] for entry in self.training_entries)

    @property
    def training_entries(self) -> list:
        """The slices' volumes that segmentation trains on: the labelled subset's under
        ``labelled_patients``, else every training volume's."""
        self.setup()
        return self.entries.get("labelled", self.entries["train"])

    @property
    def has_test_data(self) -> bool:
        """Whether any test volume is held out (none with ``fold="all"``)."""
        self.setup()
        return bool(self.entries["test"])

    def _volume_loader(self, split: str) -> DataLoader:
        # batch_size=None: one volume per step, returned as the dataset's item (no batch dimension)
        return DataLoader(
            VolumeDataset(self.entries[split], self.context_slices),
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    # -- split and classification ---------------------------------------------------------------------
    def save_split(self, path: str | Path) -> Path:
        """Write the patient split as JSON (after :meth:`setup`)."""
        if not self.split:
            self.setup()
        return save_split(path, self.split)

    def classification_datamodule(self, batch_size: int | None = None) -> ClassificationDataModule:
        """Stage-1 pretraining data: classification of ``pretrain_target`` over the same patients and split."""
        return ClassificationDataModule(
            source=self.pretrain_target,
            segmentation=self,
            batch_size=batch_size or self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )


class ClassificationDataModule(pl.LightningDataModule):
    """1-channel image classification, for pretraining the DenseNet encoder.

    source: ``"diagnosis"``: mid-ventricular ED/ES slices labelled by diagnosis group (``GROUPS``
    order, ``num_classes`` 5), from ``segmentation``'s patients and split, cropped to its crop size;
    patients without a known group are left out. ``"phase_position"``: every ED/ES slice of the same
    patients labelled by phase and third of the stack (``PHASE_POSITIONS``, 6 classes), crops centred. ``"imagefolder"``: ``root/<class>/<image>``,
    resized to ``image_size`` ``(H, W)``, ``val_fraction`` of each class held out (seeded).
    num_classes: expected class count (``None``: from the data; a mismatch is an error).
    in_channels: fixed at 1. Batches: ``{"image": (B, 1, H, W) float32, "label": (B,) int64, "case": list[str]}``.
    """

    def __init__(
        self,
        source: str = "imagefolder",
        root: str | Path | None = None,
        segmentation: SegmentationDataModule | None = None,
        image_size: Sequence[int] = (128, 128),
        val_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        in_channels: int = 1,
        num_classes: int | None = None,
    ):
        super().__init__()
        if source not in ("imagefolder", *PRETRAIN_TARGETS):
            raise ConfigError(
                f"data.source: {source!r} is not one of imagefolder, {', '.join(PRETRAIN_TARGETS)}"
            )
        if source in PRETRAIN_TARGETS and segmentation is None:
            raise ConfigError(
                f"data.source: {source!r} needs a SegmentationDataModule (use its classification_datamodule())"
            )
        if source == "imagefolder" and root is None:
            raise ConfigError("data.root: the image folder is not set")
        if in_channels != 1:
            raise ConfigError(f"data.in_channels: the classifier input has 1 channel, got {in_channels}")
        self.source, self.segmentation = source, segmentation
        self.root = Path(root) if root is not None else None
        self.image_size = tuple(image_size)
        self.val_fraction, self.seed = val_fraction, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.in_channels = in_channels
        self._expected_classes = num_classes
        self.datasets: dict = {}
        self.class_names: tuple[str, ...] = PRETRAIN_TARGETS.get(source, ())
        if self.class_names:
            self._check_num_classes(len(self.class_names))

    @property
    def num_classes(self) -> int:
        """Number of classes: 5 for diagnosis, 6 for phase_position; the class folders of an image folder."""
        if self.source == "imagefolder" and not self.class_names:
            self.class_names = tuple(_class_folders(self.root))
            self._check_num_classes(len(self.class_names))
        return len(self.class_names)

    def _check_num_classes(self, found: int) -> None:
        if self._expected_classes is not None and self._expected_classes != found:
            raise ConfigError(
                f"data.num_classes: set to {self._expected_classes} but the data has {found} classes"
            )

    def classification_datamodule(self, batch_size: int | None = None) -> ClassificationDataModule:
        """This module (with ``batch_size`` if given), so callers need not know which data they hold."""
        if batch_size:
            self.batch_size = batch_size
        return self

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.source == "diagnosis":
            self._setup_diagnosis()
        elif self.source == "phase_position":
            self._setup_phase_position()
        else:
            self._setup_imagefolder()

    def _setup_diagnosis(self) -> None:
        seg = self.segmentation
        lv_label = seg.label_set.structures.get("LV")
        if lv_label is None:
            raise ConfigError(
                f"data.structures: diagnosis pretraining picks slices through the LV cavity; {seg.label_set.class_names} has no LV"
            )
        seg.setup()
        group_of = {c.name: c.group_index for c in seg.cases}
        for split in ("train", "val"):
            entries = [e for e in seg.entries[split] if group_of.get(e.name.rpartition("_")[0]) is not None]
            labels = [group_of[e.name.rpartition("_")[0]] for e in entries]
            augment = WorkerSeededAugment(seg.augmentation) if split == "train" and seg.augmentation else None
            # label-scarce (data.labelled_patients): every patient has a diagnosis, few have contours, so
            # the pretraining slices and crops are chosen without any
            self.datasets[split] = DiagnosisSliceDataset(
                entries, labels, seg.crop_size, augment, lv_label, mask_free=seg.labelled_patients is not None
            )
        if len(self.datasets["train"]) == 0:
            raise DataError(
                f"{seg.root}: no training case has a diagnosis group in {GROUPS} (Group in the info file)"
            )

    def _setup_phase_position(self) -> None:
        seg = self.segmentation
        seg.setup()
        for split in ("train", "val"):
            augment = WorkerSeededAugment(seg.augmentation) if split == "train" and seg.augmentation else None
            self.datasets[split] = PhasePositionSliceDataset(seg.entries[split], seg.crop_size, augment)
        if len(self.datasets["train"]) == 0:
            raise DataError(
                f"{seg.root}: no training frame is an ED or ES phase (phase_position pretraining)"
            )

    def _setup_imagefolder(self) -> None:
        _ = self.num_classes  # checks the folder and the expected class count
        full = ImageFolderDataset(self.root, self.image_size)
        targets = np.asarray(full.folder.targets)
        rng = np.random.default_rng(self.seed)
        val: list[int] = []
        for c in range(len(full.classes)):
            members = np.flatnonzero(targets == c)
            n_val = int(len(members) * self.val_fraction)
            val.extend(int(i) for i in rng.permutation(members)[:n_val])
        val_set = set(val)
        self.datasets["train"] = ImageFolderDataset(
            self.root, self.image_size, [i for i in range(len(targets)) if i not in val_set]
        )
        self.datasets["val"] = ImageFolderDataset(self.root, self.image_size, sorted(val))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )


def _class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class subfolders found (expected {root}/<class>/<image>)")
    return classes
