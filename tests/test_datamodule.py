"""DataModules on real NIfTI files: batch contracts, split, cache reuse, bad cases, classification."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from test_acdc import write_dataset

from seg_densenet.data.acdc import GROUPS
from seg_densenet.data.datamodule import ClassificationDataModule, SegmentationDataModule
from seg_densenet.errors import ConfigError, DataError

CONF = Path(__file__).resolve().parents[1] / "conf"
SHAPE, SPACING = (40, 48, 5), (1.5, 1.5, 8.0)  # in-plane 60 x 72 mm


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("acdc"), 10, shape=SHAPE, spacing=SPACING)


def make_dm(root, cache_dir, **kwargs) -> SegmentationDataModule:
    settings = dict(
        target_spacing=(2.0, 2.0), crop_size=(24, 24), cache_dir=cache_dir, batch_size=4, num_workers=0
    )
    settings.update(kwargs)
    return SegmentationDataModule(root, **settings)


def test_segmentation_batches_and_split(dataset, tmp_path):
    dm = make_dm(dataset, tmp_path / "cache")
    dm.setup("fit")
    assert dm.class_names == ("background", "RV", "MYO", "LV")
    train, val, test = (set(dm.split[k]) for k in ("train", "val", "test"))
    assert (
        len(test) == 2
        and len(val) == 2  # round(8 * 0.2)
        and len(train) == 6
        and not (train & val or train & test or val & test)
    )

    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 24, 24) and batch["mask"].dtype == torch.int64
    assert len(batch["case"]) == 4 and all(c.rsplit("_", 1)[0] in train for c in batch["case"])
    assert len(dm.train_dataloader().dataset) == 6 * 2 * SHAPE[2]  # every slice of ED and ES

    volumes = list(dm.val_dataloader())
    assert len(volumes) == 4  # one step per volume: ED and ES of the two validation patients
    item = volumes[0]
    # not cropped: the whole resampled slice (60 x 72 mm at 2 mm)
    assert item["image"].shape == (5, 1, 30, 36) and item["mask"].shape == (5, 30, 36)
    assert item["mask"].dtype == torch.int64 and set(item["mask"].unique().tolist()) == {0, 1, 2, 3}
    assert torch.equal(item["spacing"], torch.tensor([2.0, 2.0, 8.0]))
    assert item["case"] in val and item["phase"] in ("ED", "ES")
    assert {v["case"] for v in dm.test_dataloader()} == test

    path = dm.save_split(tmp_path / "split.json")
    saved = json.loads(path.read_text())
    assert saved["train"] == sorted(train) and (saved["seed"], saved["fold"], saved["n_folds"]) == (0, 0, 5)


def test_training_crop_is_centred_on_the_heart(tmp_path):
    # a heart in a corner: a centre crop would cut it, a crop centred on the labels keeps all of it
    root = write_dataset(tmp_path / "data", 5, shape=(56, 64, 3), spacing=SPACING, center=(14, 24))
    dm = make_dm(root, tmp_path / "cache", target_spacing=None, crop_size=(32, 36))
    dm.setup()
    masks = torch.stack([item["mask"] for item in dm.train_dataset()])
    full = torch.cat([torch.from_numpy(np.asarray(e.load()[1], dtype=np.int64)) for e in dm.entries["train"]])
    assert masks.shape[1:] == (32, 36)
    for c in (1, 2, 3):
        assert (masks == c).sum() == (full == c).sum()
    centre_crop = full[:, 12:44, 14:50]
    assert (centre_crop > 0).sum() < (full > 0).sum()


def test_crop_jitter_moves_crops_reproducibly_and_keeps_image_and_mask_aligned(tmp_path):
    root = write_dataset(tmp_path / "data", 5, shape=(56, 64, 3), spacing=SPACING, center=(28, 32))
    dm = make_dm(root, tmp_path / "cache", target_spacing=None, crop_size=(32, 32), crop_jitter=6)
    dm.setup()
    still = make_dm(root, tmp_path / "cache", target_spacing=None, crop_size=(32, 32)).train_dataset

    def items(seed):
        torch.manual_seed(seed)
        return [dm.train_dataset()[k] for k in range(6)]

    first, again, other = items(0), items(0), items(1)
    for a, b in zip(first, again):  # same torch seed, same crops
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert any(not torch.equal(a["mask"], b["mask"]) for a, b in zip(first, other))
    dm_still = make_dm(root, tmp_path / "cache", target_spacing=None, crop_size=(32, 32))
    dm_still.setup()
    centred = [dm_still.train_dataset()[k] for k in range(6)]
    assert any(not torch.equal(a["mask"], c["mask"]) for a, c in zip(first, centred))
    # every jittered crop is a window of the full slice: image and mask cut at the same place
    for k, item in enumerate(first):
        i, z = dm.train_dataset().index[k]
        image, mask = (np.asarray(a[z]) for a in dm.entries["train"][i].load())
        hits = [
            (y, x)
            for y in range(image.shape[0] - 31)
            for x in range(image.shape[1] - 31)
            if np.array_equal(image[y : y + 32, x : x + 32], item["image"][0].numpy())
        ]
        assert hits and any(
            np.array_equal(mask[y : y + 32, x : x + 32], item["mask"].numpy()) for y, x in hits
        )
    del still
    with pytest.raises(ConfigError, match="crop_jitter"):
        make_dm(root, tmp_path / "cache", crop_jitter=-1)


def test_patches_over_the_field_of_view_with_foreground_oversampling(tmp_path):
    # a small heart in a corner of a large field of view: uniform patches often miss it, foreground
    # patches always hold it, and every patch is a window of its slice (image and mask cut alike)
    root = write_dataset(tmp_path / "data", 5, shape=(96, 96, 3), spacing=SPACING, center=(24, 24))
    always = make_dm(
        root, tmp_path / "cache", target_spacing=None, crop_size=(32, 32), foreground_fraction=1.0
    )
    never = make_dm(
        root, tmp_path / "cache", target_spacing=None, crop_size=(32, 32), foreground_fraction=0.0
    )
    always.setup(), never.setup()

    def items(dm, seed):
        torch.manual_seed(seed)
        data = dm.train_dataset()
        slices = [k for k, (i, z) in enumerate(data.index) if np.any(np.asarray(data.store.arrays(i)[1][z]))]
        return [data[k] for k in slices[:12]]

    assert all(item["mask"].any() for item in items(always, 0))
    uniform = items(never, 0)
    assert sum(not item["mask"].any() for item in uniform) >= 3
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(uniform, items(never, 0)))
    data = never.train_dataset()
    for k, item in enumerate(uniform[:4]):
        i, z = data.index[k]
        image, mask = (np.asarray(a[z]) for a in data.store.entries[i].load())
        hits = [
            (y, x)
            for y in range(65)
            for x in range(65)
            if np.array_equal(image[y : y + 32, x : x + 32], item["image"][0].numpy())
        ]
        assert hits and any(
            np.array_equal(mask[y : y + 32, x : x + 32], item["mask"].numpy()) for y, x in hits
        )
    with pytest.raises(ConfigError, match="foreground_fraction"):
        make_dm(root, tmp_path / "cache", foreground_fraction=1.5)


def test_augment_margin_augments_a_larger_window_then_crops_it(tmp_path):
    root = write_dataset(tmp_path / "data", 5, shape=(56, 64, 3), spacing=SPACING, center=(28, 32))
    plain = make_dm(root, tmp_path / "cache", target_spacing=None, crop_size=(32, 32))
    margin = make_dm(root, tmp_path / "cache", target_spacing=None, crop_size=(32, 32), augment_margin=8)
    plain.setup(), margin.setup()
    seen = []
    margin.augmentation = lambda image, mask: (
        {"image": image, "mask": mask} if seen.append(image.shape) is None else None
    )
    with_margin, without = margin.train_dataset(), plain.train_dataset()
    for k in range(4):  # an identity augmentation: the margin is cut off again, the crop is unchanged
        a, b = with_margin[k], without[k]
        assert a["image"].shape == (1, 32, 32) and torch.equal(a["mask"], b["mask"])
        assert torch.allclose(a["image"], b["image"], atol=1e-5)  # augment_slice's [0, 1] round trip
    assert seen and all(shape == (48, 48) for shape in seen)  # the augmentation saw the 8-pixel margin
    with pytest.raises(ConfigError, match="augment_margin"):
        make_dm(root, tmp_path / "cache", augment_margin=-1)


def test_second_setup_uses_the_cache(dataset, tmp_path):
    first = make_dm(dataset, tmp_path / "cache")
    first.setup()
    assert first.cache.misses == 20 and first.cache.hits == 0
    second = make_dm(dataset, tmp_path / "cache")
    second.setup()
    assert second.cache.misses == 0 and second.cache.hits == 20


def test_workers_and_augmentation(dataset, tmp_path):
    import albumentations as A

    augmentation = A.Compose([A.Affine(rotate=(-20, 20), p=1), A.RandomGamma(p=1)])
    dm = make_dm(
        dataset, tmp_path / "cache", augmentation=augmentation, num_workers=2, persistent_workers=True
    )
    dm.setup()
    batches = list(dm.train_dataloader())
    assert sum(len(b["case"]) for b in batches) == 60  # 6 training patients x 2 frames x 5 slices
    assert all(torch.isfinite(b["image"]).all() for b in batches)


def test_bad_case_raises_or_is_skipped_with_one_warning(tmp_path):
    root = write_dataset(tmp_path / "data", 6, shape=SHAPE, spacing=SPACING)
    bad = root / "patient004" / "patient004_frame02.nii.gz"
    bad.write_bytes(bad.read_bytes()[:100])
    (root / "patient005" / "Info.cfg").unlink()
    with pytest.raises(DataError, match="patient005/Info.cfg"):
        make_dm(root, tmp_path / "cache", n_folds=3).setup()
    (root / "patient005" / "Info.cfg").write_text("ED: 1\nES: 2\n")
    with pytest.raises(DataError, match="patient004_frame02.nii.gz"):
        make_dm(root, tmp_path / "cache", n_folds=3).setup()

    (root / "patient005" / "Info.cfg").unlink()
    dm = make_dm(root, tmp_path / "cache", n_folds=3, skip_bad_cases=True)
    with pytest.warns(UserWarning) as record:
        dm.setup()
    assert len(record) == 1
    message = str(record[0].message)
    assert "2 bad case(s)" in message and "patient004_frame02.nii.gz" in message and "patient005" in message
    used = {e.name.rsplit("_", 1)[0] for split in dm.entries.values() for e in split}
    assert used == {"patient001", "patient002", "patient003", "patient006"}
    # the split still covers every patient, so it does not depend on which files are readable
    assert sum(len(dm.split[k]) for k in ("train", "val", "test")) == 6


def test_diagnosis_classification_uses_the_same_split(dataset, tmp_path):
    seg = make_dm(dataset, tmp_path / "cache", fold=1)
    cls = seg.classification_datamodule(batch_size=3)
    assert cls.num_classes == 5 and cls.class_names == GROUPS
    cls.setup("fit")
    seg_test = set(seg.split["test"])
    for split in ("train", "val"):
        cases = {
            cls.datasets[split].store.entries[i].name.rsplit("_", 1)[0] for i, _ in cls.datasets[split].index
        }
        assert cases == set(seg.split[split]) and not cases & seg_test
    batch = next(iter(cls.train_dataloader()))
    assert batch["image"].shape == (3, 1, 24, 24) and batch["label"].dtype == torch.int64
    assert all(0 <= v < 5 for v in batch["label"].tolist())
    # labels are the patients' groups (patientNNN has group GROUPS[(NNN - 1) % 5])
    for case, label in zip(batch["case"], batch["label"].tolist()):
        assert GROUPS[(int(case[7:10]) - 1) % 5] == GROUPS[label]
    # mid-ventricular: of the 5 slices per volume, all hold the LV; the middle half is 3 of them
    assert len(cls.datasets["train"]) == 6 * 2 * 3


def test_imagefolder_classification(tmp_path):
    rng = np.random.default_rng(0)
    for cls_name in ("cats", "dogs", "fish"):
        (tmp_path / "images" / cls_name).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / cls_name / f"{i}.png")
    dm = ClassificationDataModule(root=tmp_path / "images", image_size=(16, 16), batch_size=4, num_workers=0)
    assert dm.num_classes == 3 and dm.class_names == ("cats", "dogs", "fish")
    assert dm.classification_datamodule(batch_size=8) is dm and dm.batch_size == 8
    dm.setup()
    assert len(dm.datasets["train"]) == 12 and len(dm.datasets["val"]) == 3
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 1, 16, 16) and batch["label"].dtype == torch.int64
    with pytest.raises(ConfigError, match="set to 4 but the data has 3"):
        ClassificationDataModule(root=tmp_path / "images", num_classes=4).setup()
    with pytest.raises(DataError, match="no class subfolders"):
        ClassificationDataModule(root=tmp_path / "images" / "cats").setup()


def test_data_config_instantiates(dataset, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "data/synthetic",
            overrides=[
                f"+paths.data_dir={tmp_path}",
                "+paths.root_dir=.",
                f"data.root={dataset}",
                "data.synthetic=null",
                "data.crop_size=[32,32]",
                "data.num_workers=0",
            ],
        )
    assert cfg.data.in_channels == 1 and cfg.data.num_classes == 4
    dm = instantiate(cfg.data)
    assert isinstance(dm, SegmentationDataModule) and dm.cache_dir == tmp_path / "cache"
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 1, 32, 32) and torch.isfinite(batch["image"]).all()


@pytest.mark.skipif(
    importlib.util.find_spec("seg_densenet.data.synthetic") is None, reason="no phantom generator"
)
def test_synthetic_dataset_is_generated(tmp_path):
    dm = SegmentationDataModule(
        tmp_path / "synthetic",
        synthetic={"patients": 5, "seed": 0, "image_size": [64, 64]},
        target_spacing=(4.0, 4.0),
        crop_size=(32, 32),
        cache_dir=tmp_path / "cache",
        val_fraction=0.25,
        num_workers=0,
    )
    dm.prepare_data()
    dm.setup()
    assert len(dm.split["test"]) == 1 and len(dm.split["val"]) == 1
    assert next(iter(dm.train_dataloader()))["image"].shape[1:] == (1, 32, 32)


def test_labelled_patients_limits_segmentation_labels_only(dataset, tmp_path):
    dm = make_dm(dataset, tmp_path / "cache", labelled_patients=3)
    dm.setup("fit")
    labelled = dm.split["labelled"]
    assert len(labelled) == 3 and set(labelled) <= set(dm.split["train"])
    groups = {c.name: c.group for c in dm.cases}
    assert len({groups[name] for name in labelled}) == 3  # spread over the diagnosis groups
    cases = {item["case"].rsplit("_", 1)[0] for item in dm.train_dataset()}
    assert cases == set(labelled)
    # validation and the diagnosis classification keep every patient of their split
    assert len(list(dm.val_dataloader())) == 2 * len(dm.split["val"])
    cls = dm.classification_datamodule()
    cls.setup("fit")
    assert {e.name.rsplit("_", 1)[0] for e in cls.datasets["train"].store.entries} == set(dm.split["train"])
    # ... chosen without contours: the middle half of every stack, crops around the image centre
    diagnosis = cls.datasets["train"]
    assert diagnosis.mask_free
    for i in range(len(diagnosis.store.entries)):
        n = diagnosis.store.arrays(i)[0].shape[0]
        assert [z for j, z in diagnosis.index if j == i] == list(range(n // 4, n - n // 4))
    assert diagnosis[0]["image"].shape[1:] == tuple(dm.crop_size)
    # the same seed gives the same patients; split.json lists them
    again = make_dm(dataset, tmp_path / "cache", labelled_patients=3)
    again.setup("fit")
    assert again.split["labelled"] == labelled
    assert json.loads(dm.save_split(tmp_path / "split.json").read_text())["labelled"] == labelled
    with pytest.raises(ConfigError, match=r"data.labelled_patients=7: must be between 1 and the 6 training"):
        make_dm(dataset, tmp_path / "cache", labelled_patients=7).setup("fit")


def test_phase_position_pretraining_labels_every_slice_by_phase_and_third(dataset, tmp_path):
    dm = make_dm(dataset, tmp_path / "cache", pretrain_target="phase_position", labelled_patients=3)
    cls = dm.classification_datamodule()
    cls.setup("fit")
    assert cls.num_classes == 6 and cls.class_names[0] == "ED_top" and cls.class_names[5] == "ES_bottom"
    train = cls.datasets["train"]
    # every training patient (contours or not), every slice of both phases, each labelled by its own place
    assert {e.name.rsplit("_", 1)[0] for e in train.store.entries} == set(dm.split["train"])
    assert len(train) == sum(train.store.arrays(i)[0].shape[0] for i in range(len(train.store.entries)))
    for k in range(len(train)):
        i, z = train.index[k]
        name, n = train.store.entries[i].name, train.store.arrays(i)[0].shape[0]
        phase = ("ED", "ES").index(name.rsplit("_", 1)[1])
        item = train[k]
        assert int(item["label"]) == 3 * phase + min(2, 3 * z // n) and item["case"] == name
        assert item["image"].shape[1:] == tuple(dm.crop_size)
    assert {int(label) for label in train.slice_labels} == set(range(6))
    with pytest.raises(
        ConfigError, match="data.pretrain_target: 'position' is not one of diagnosis, phase_position"
    ):
        make_dm(dataset, tmp_path / "cache", pretrain_target="position")
