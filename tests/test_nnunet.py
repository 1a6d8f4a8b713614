"""nnU-Net's raw dataset layout: discovery, dataset.json checks, and training with its classes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from seg_densenet.data.acdc import discover_cases
from seg_densenet.data.nnunet import read_dataset_json
from seg_densenet.errors import DataError

# LV and myocardium only, in another order than ACDC's: the classes must come from dataset.json
DATASET = {
    "channel_names": {"0": "cine MRI"},
    "labels": {"background": 0, "LV": 1, "MYO": 2},
    "file_ending": ".nii.gz",
}
ACDC_TO_DATASET = np.array([0, 0, 2, 1])  # RV -> background, MYO -> 2, LV -> 1


def write_nnunet(root: Path, synthetic_root: Path, spec: dict = DATASET) -> Path:
    """The first 5 synthetic patients' ED/ES frames as an nnU-Net raw dataset (one case per frame)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    n = 0
    for gt in sorted(synthetic_root.glob("*/*_gt.nii.gz"))[:10]:
        case = gt.name.replace("_gt.nii.gz", "")
        image = nib.load(gt.with_name(f"{case}.nii.gz"))
        nib.save(image, root / "imagesTr" / f"{case}_0000.nii.gz")
        label = nib.load(gt)
        mapped = ACDC_TO_DATASET[np.asarray(label.dataobj).astype(np.int64)].astype(np.uint8)
        nib.save(nib.Nifti1Image(mapped, label.affine, label.header), root / "labelsTr" / f"{case}.nii.gz")
        n += 1
    (root / "dataset.json").write_text(json.dumps({**spec, "numTraining": n}))
    return root


def test_discovery_and_the_classes_of_dataset_json(tmp_path, synthetic_root):
    root = write_nnunet(tmp_path / "Dataset001_Heart", synthetic_root)
    assert read_dataset_json(root) == {"structures": ["LV", "MYO"], "file_ending": ".nii.gz"}
    cases = discover_cases(root, {"format": "nnunet"})
    assert len(cases) == 10 and cases[0].name == "patient001_frame01" and cases[0].group is None
    frame = cases[0].frames["all"]
    assert frame.image.name == "patient001_frame01_0000.nii.gz" and frame.label.parent.name == "labelsTr"
    # nnU-Net v1 writes labels as value -> name
    (root / "dataset.json").write_text(
        json.dumps({"modality": {"0": "MRI"}, "labels": {"0": "background", "2": "MYO", "1": "LV"}})
    )
    assert read_dataset_json(root)["structures"] == ["LV", "MYO"]


def test_a_split_links_its_cases_into_a_dataset_of_their_own(tmp_path, synthetic_root):
    from seg_densenet.evaluate import _link_cases

    root = write_nnunet(tmp_path / "Dataset001_Heart", synthetic_root)
    dest = tmp_path / "out" / "test_cases"
    chosen = {"patient001_frame01", "patient002_frame01"}
    for _ in range(2):  # a second run replaces the links of the first
        assert _link_cases(root, chosen, dest) == dest
        assert (dest / "dataset.json").resolve() == (root / "dataset.json").resolve()
        assert sorted(p.name for p in (dest / "imagesTr").iterdir()) == [
            f"{c}_0000.nii.gz" for c in sorted(chosen)
        ]
        assert sorted(p.name for p in (dest / "labelsTr").iterdir()) == [
            f"{c}.nii.gz" for c in sorted(chosen)
        ]
        assert all(p.is_symlink() for p in (dest / "labelsTr").iterdir())
    with pytest.raises(DataError, match="no label map for the split's patient.s. patient999_frame01"):
        _link_cases(root, {"patient999_frame01"}, tmp_path / "elsewhere")
    (dest / "imagesTr" / "notes.txt").write_text("mine")  # a real file: the folder is not ours to delete
    with pytest.raises(DataError, match="holds more than case links"):
        _link_cases(root, chosen, dest)
    assert (dest / "imagesTr" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "spec, message",
    [
        ({**DATASET, "channel_names": {"0": "T1", "1": "T2"}}, "single-channel"),
        ({**DATASET, "labels": {"background": 0, "LV": 2}}, r"values 0..1"),
        ({**DATASET, "labels": {"background": 0, "heart": [1, 2]}}, "region-based"),
        ({**DATASET, "file_ending": ".png"}, "only NIfTI"),
    ],
)
def test_dataset_json_problems_are_one_line_errors_naming_the_file(tmp_path, spec, message):
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=f"dataset.json: .*{message}"):
        read_dataset_json(tmp_path)


def test_a_label_map_without_its_image_is_named(tmp_path, synthetic_root):
    root = write_nnunet(tmp_path / "data", synthetic_root)
    missing = root / "imagesTr" / "patient002_frame01_0000.nii.gz"
    missing.unlink()
    with pytest.raises(DataError, match="patient002_frame01_0000.nii.gz: file not found"):
        discover_cases(root, {"format": "nnunet"})
    errors: list = []
    assert (
        len(discover_cases(root, {"format": "nnunet"}, errors=errors)) == 9
        and errors[0][0] == "patient002_frame01"
    )


def test_data_nnunet_trains_predicts_and_evaluates_with_the_classes_of_dataset_json(
    compose_cfg, tmp_path, synthetic_root
):
    from hydra import compose, initialize_config_dir

    from seg_densenet.checkpoint import read_checkpoint
    from seg_densenet.config import CONFIG_DIR
    from seg_densenet.evaluate import evaluate
    from seg_densenet.train import train

    root = write_nnunet(tmp_path / "Dataset001_Heart", synthetic_root)
    cfg = compose_cfg([
        "data=nnunet", f"data.root={root}", "task=segment", f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0", "data.crop_size=[64,64]", "data.target_spacing=[3.0,3.0]", "trainer.max_epochs=1",
        "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=2", "test=false",
        "++trainer.enable_model_summary=false",
    ])  # fmt: skip
    assert list(cfg.data.structures) == ["LV", "MYO"] and cfg.data.num_classes == 3
    metrics = train(cfg)
    assert {"val/dice_lv", "val/dice_myo"} <= set(metrics) and "val/dice_rv" not in metrics
    ckpt = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())["best_checkpoint"]
    assert read_checkpoint(ckpt)["seg_densenet"]["data"]["structures"] == ["LV", "MYO"]
    # evaluate ckpt= input=<the dataset>: predicts imagesTr/, pairs labelsTr/, one phase ("all")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        eval_cfg = compose(
            config_name="evaluate",
            overrides=[
                f"ckpt={ckpt}",
                f"input={root}",
                f"output={tmp_path / 'report'}",
                "plots=false",
                "predict_options.tta=false",
            ],
        )
    summary = evaluate(eval_cfg)
    written = sorted((tmp_path / "report" / "predictions").glob("*_pred.nii.gz"))
    assert len(written) == 10 and written[0].name == "patient001_frame01_0000_pred.nii.gz"
    assert set(np.unique(np.asarray(nib.load(written[0]).dataobj)).tolist()) <= {0, 1, 2}
    assert list(summary["per_structure"]) == ["LV", "MYO"] and list(summary["per_structure"]["LV"]) == ["all"]
    assert 0.0 <= summary["per_structure"]["LV"]["all"]["dice"] <= 1.0
    # split= subset=: the run's held-out cases only, linked into a dataset of their own
    held_out = json.loads((Path(cfg.paths.output_dir) / "split.json").read_text())["val"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        eval_cfg = compose(
            config_name="evaluate",
            overrides=[
                f"ckpt={ckpt}",
                f"input={root}",
                f"output={tmp_path / 'val_report'}",
                "plots=false",
                "predict_options.tta=false",
                f"split={Path(cfg.paths.output_dir) / 'split.json'}",
                "subset=val",
            ],
        )
    evaluate(eval_cfg)
    written = sorted((tmp_path / "val_report" / "predictions").glob("*_pred.nii.gz"))
    assert [p.name for p in written] == [f"{case}_0000_pred.nii.gz" for case in sorted(held_out)]
