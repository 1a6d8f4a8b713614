"""Label sets other than ACDC's, from config alone: the LabelSet rules, a left-ventricle-only dataset
trained, predicted and evaluated through the real CLIs, and ground truth coded in another label order."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from conftest import run_cli

from seg_densenet.checkpoint import read_checkpoint
from seg_densenet.data.labels import ACDC, LabelSet, indices_for
from seg_densenet.errors import ConfigError

LV_ONLY_YAML = """\
# A left-ventricle-only dataset (Sunnybrook-style) from ACDC-coded files: one yaml, no code.
defaults:
  - synthetic
  - _self_

structures: [LV]
label_mapping: {0: 0, 1: 0, 2: 0, 3: 1}
"""


def test_label_set_rules():
    assert ACDC.class_names == ["background", "RV", "MYO", "LV"] and ACDC.num_classes == 4
    assert ACDC.metric_names == {"rv": 1, "myo": 2, "lv": 3}
    assert ACDC.identity_mapping == {0: 0, 1: 1, 2: 2, 3: 3}
    lv = LabelSet.from_config({"LV": 1})
    assert lv.num_classes == 2 and indices_for(lv.structures) == ["LV_EDV_ml", "LV_ESV_ml", "LV_EF_pct"]
    assert LabelSet.from_config(["Myocardium", "Scar"]).structures == {"Myocardium": 1, "Scar": 2}
    assert LabelSet.from_config({"Scar": 2, "Myocardium": 1}).class_names == [
        "background",
        "Myocardium",
        "Scar",
    ]
    assert indices_for(LabelSet.from_config({"Scar": 1}).structures) == []
    assert LabelSet.from_record({"data": {}}) == ACDC  # checkpoints from before label sets were recorded
    for bad, message in [
        ({}, "expected structure names"),
        ({"LV": 2}, r"class values must be 1..1"),
        (["LV", "lv"], "names must be distinct"),
        ({"background": 1}, "not 'background'"),
        ({"LV": True}, "must be integers"),
    ]:
        with pytest.raises(ConfigError, match=f"data.structures: .*{message}"):
            LabelSet.from_config(bad)


def test_a_left_ventricle_only_dataset_trains_predicts_and_evaluates_from_one_yaml(tmp_path, synthetic_root):
    conf = tmp_path / "conf"
    (conf / "data").mkdir(parents=True)
    (conf / "data" / "lv_only.yaml").write_text(LV_ONLY_YAML)
    run = tmp_path / "run"
    result = run_cli([
        "-m", "seg_densenet.train", f"hydra.searchpath=[file://{conf}]", "data=lv_only", "task=segment",
        f"data.root={synthetic_root}", "data.synthetic=null", f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0", "data.crop_size=[64,64]", "data.target_spacing=[3.0,3.0]", "trainer.max_epochs=1",
        "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=2", "test=false",
        "++trainer.enable_model_summary=false", f"hydra.run.dir={run}",
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["metrics"]) >= {"val/dice", "val/dice_lv"}
    assert not any(key.endswith(("_rv", "_myo")) for key in summary["metrics"])
    record = read_checkpoint(summary["best_checkpoint"])["seg_densenet"]
    assert record["class_names"] == ["background", "LV"] and record["data"]["structures"] == ["LV"]

    # evaluate with ckpt=: predicts (2 classes), maps the ACDC-coded ground truth as training did
    report = tmp_path / "report"
    result = run_cli([
        "-m", "seg_densenet.evaluate", f"ckpt={summary['best_checkpoint']}", f"input={synthetic_root}",
        f"split={run / 'split.json'}", "subset=test", f"output={report}", "plots=false", "predict_options.tta=false",
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    test_patients = json.loads((run / "split.json").read_text())["test"]
    predictions = sorted((report / "predictions").rglob("*_pred.nii.gz"))
    assert len(predictions) == 2 * len(test_patients)
    assert set(np.unique(np.asarray(nib.load(predictions[0]).dataobj))) <= {0, 1}
    evaluated = json.loads((report / "summary.json").read_text())
    assert list(evaluated["per_structure"]) == ["LV"]
    assert list(evaluated["clinical"]) == ["LV_EDV_ml", "LV_ESV_ml", "LV_EF_pct"]
    with open(report / "clinical.csv") as f:
        assert next(csv.reader(f)) == ["patient", "source", "LV_EDV_ml", "LV_ESV_ml", "LV_EF_pct"]
    # the mapped ground truth is the LV cavity: the evaluated ground-truth volume is the cavity's
    gt_rows = [r for r in csv.DictReader(open(report / "clinical.csv")) if r["source"] == "gt"]
    truth = json.loads((synthetic_root / "truth.json").read_text())
    first = gt_rows[0]
    assert float(first["LV_EDV_ml"]) == pytest.approx(truth[first["patient"]]["LV_EDV_ml"], rel=1e-3)


def test_ground_truth_in_another_label_order_is_mapped_by_config(tmp_path, synthetic_root):
    """M&Ms codes LV 1 and RV 3: ``label_mapping`` maps its ground truth to ACDC-coded predictions."""
    case = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    gt_dir, pred_dir = tmp_path / "gt" / case.name, tmp_path / "pred"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir()
    (gt_dir / "Info.cfg").write_text((case / "Info.cfg").read_text())
    to_mnms = np.array([0, 3, 2, 1])
    for gt in sorted(case.glob("*_gt.nii.gz")):
        img = nib.load(gt)
        acdc = np.asarray(img.dataobj).astype(np.uint8)
        nib.save(nib.Nifti1Image(to_mnms[acdc].astype(np.uint8), img.affine, img.header), gt_dir / gt.name)
        nib.save(nib.Nifti1Image(acdc, img.affine, img.header), pred_dir / gt.name.replace("_gt", "_pred"))
    args = ["-m", "seg_densenet.evaluate", f"pred={pred_dir}", f"gt={tmp_path / 'gt'}", "plots=false"]
    result = run_cli([*args, f"output={tmp_path / 'mapped'}", "label_mapping={0: 0, 1: 3, 2: 2, 3: 1}"])
    assert result.returncode == 0, result.stderr[-3000:]
    dice = json.loads((tmp_path / "mapped" / "summary.json").read_text())["per_structure"]
    assert all(dice[s][p]["dice"] == 1.0 for s in ("RV", "MYO", "LV") for p in ("ED", "ES"))
    result = run_cli([*args, f"output={tmp_path / 'unmapped'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    dice = json.loads((tmp_path / "unmapped" / "summary.json").read_text())["per_structure"]
    assert dice["LV"]["ED"]["dice"] < 0.1 and dice["MYO"]["ED"]["dice"] == 1.0
    result = run_cli([*args, f"output={tmp_path / 'bad'}", "label_mapping={1: 7}"])
    assert result.returncode == 2 and "label_mapping" in result.stderr, result.stderr[-2000:]
