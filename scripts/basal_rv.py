"""Where RV Dice at ES goes: RV predicted on slices whose ground truth has the LV or myocardium but no RV.

    python scripts/basal_rv.py PRED_DIR GT_DIR

PRED_DIR holds ``<stem>_pred.nii.gz`` masks (any depth, e.g. an evaluation's ``predictions/``); GT_DIR is
the ACDC-layout folder with ``<patient>/<stem>_gt.nii.gz`` and ``Info.cfg`` (its ED frame names the phase).
Per volume it prints the RV voxels predicted on such slices (in ACDC they are the basal slices, where the
annotators stop the RV at the valve) and the RV Dice with those slices' RV removed, the bound a fix of
that one error could reach; then per phase the mean RV Dice as predicted and with them removed, and for
every ground-truth volume of GT_DIR how often its most basal labelled slice holds RV.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from seg_densenet.data.acdc import read_info_cfg
from seg_densenet.data.nifti import load_volume
from seg_densenet.evaluation.metrics import dice

RV, MYO, LV = 1, 2, 3


def phase(gt_path: Path) -> str:
    """``ED`` or ``ES`` of a ground-truth file, from its patient's ``Info.cfg`` (the frame number)."""
    frame = int(gt_path.name.split("frame")[1][:2])
    return "ED" if frame == int(read_info_cfg(gt_path.parent / "Info.cfg")["ED"]) else "ES"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pred", type=Path)
    parser.add_argument("gt", type=Path)
    args = parser.parse_args()
    scores: dict[str, list[tuple[float, float]]] = {"ED": [], "ES": []}
    for pred_path in sorted(args.pred.rglob("*_pred.nii.gz")):
        stem = pred_path.name.removesuffix("_pred.nii.gz")
        gt_path = args.gt / stem.split("_")[0] / f"{stem}_gt.nii.gz"
        gt, pred = load_volume(gt_path).data.astype(int), load_volume(pred_path).data.astype(int)
        rv_gt, rv_pred = gt == RV, pred == RV
        slices = [
            z
            for z in range(gt.shape[2])
            if not rv_gt[..., z].any() and np.isin(gt[..., z], (MYO, LV)).any() and rv_pred[..., z].any()
        ]
        kept = rv_pred.copy()
        kept[..., slices] = False
        before, after = dice(rv_pred, rv_gt), dice(kept, rv_gt)
        name = phase(gt_path)
        scores[name].append((before, after))
        if slices:
            voxels = int(rv_pred[..., slices].sum())
            print(
                f"{stem} {name}: {voxels} RV voxels on slices {slices}; RV Dice {before:.3f} -> {after:.3f}"
            )
    for name, pairs in scores.items():
        if pairs:
            a = np.array(pairs)
            print(
                f"{name}: {len(a)} volumes, RV Dice {a[:, 0].mean():.3f}, without those slices {a[:, 1].mean():.3f}"
            )
    counts = {"ED": [0, 0], "ES": [0, 0]}
    for gt_path in sorted(args.gt.glob("patient*/*_gt.nii.gz")):
        gt = load_volume(gt_path).data
        labelled = [z for z in range(gt.shape[2]) if gt[..., z].any()]
        if labelled:
            count = counts[phase(gt_path)]
            count[0] += 1
            count[1] += int((gt[..., labelled[0]] == RV).any())
    for name, (n, with_rv) in counts.items():
        if n:
            print(f"ground truth {name}: the most basal labelled slice holds RV in {with_rv} of {n} volumes")


if __name__ == "__main__":
    main()
