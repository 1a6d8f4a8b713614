"""Finding ground-truth frames in an ACDC-layout tree and pairing them with predictions.

Ground truth: an nnU-Net raw dataset folder (``dataset.json``, ``labelsTr/<case>.nii.gz``, predictions
``<case>_0000_pred.nii.gz``), or ``<gt_root>/.../<case>/<stem>_gt.nii.gz`` (the case folder may have any name, e.g.
``patient001`` or an M&Ms code ``A1D0Q7``), with the image ``<stem>.nii.gz`` and ``Info.cfg`` beside
it. ``Info.cfg`` holds ``ED: n`` and ``ES: m``, the frame numbers that appear in stems as
``_frameNN`` (``patient001_frame01``). Predictions: ``<stem>_pred.nii.gz`` anywhere under the
prediction folder, matched to the ground truth by stem.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from seg_densenet.data.acdc import read_info_cfg
from seg_densenet.data.labels import NO_PHASE, PHASES
from seg_densenet.errors import DataError
from seg_densenet.utils.files import walk_files

_NAME = re.compile(r"^(?P<stem>.+)_(?P<kind>gt|pred)\.nii(\.gz)?$")
_FRAME = re.compile(r"_frame(?P<number>\d+)$")
_PHASE_SUFFIX = re.compile(r"_(?P<phase>ED|ES)$", re.IGNORECASE)


@dataclass(frozen=True)
class FramePair:
    """One annotated frame to evaluate: its ground truth, its prediction and its phase."""

    case: str
    stem: str
    phase: str  # "ED", "ES" or "other"
    gt_path: Path
    pred_path: Path | None
    image_path: Path  # <stem>.nii.gz beside the ground truth; may not exist


def phase_frames(info_path: Path) -> dict[int, str]:
    """Frame number to phase (``{ed: "ED", es: "ES"}``) from an ``Info.cfg``."""
    info = read_info_cfg(info_path)
    missing = [phase for phase in PHASES if not isinstance(info.get(phase), int)]
    if missing:
        raise DataError(
            f"{info_path}: missing or non-integer field(s) {missing} (expected lines 'ED: n', 'ES: m')"
        )
    return {info[phase]: phase for phase in PHASES}


def phase_of(stem: str, frames: dict[int, str] | None) -> str:
    """Phase of a stem: ``ED``/``ES`` from its ``_frameNN`` number (or an ``_ED``/``_ES`` suffix)."""
    match = _FRAME.search(stem)
    if match and frames is not None:
        return frames.get(int(match["number"]), "other")
    match = _PHASE_SUFFIX.search(stem)
    return match["phase"].upper() if match else "other"


def find_labelled(root: Path, kind: str) -> dict[str, Path]:
    """All ``<stem>_<kind>.nii[.gz]`` files under ``root`` (kind ``gt`` or ``pred``), keyed by stem."""
    found: dict[str, Path] = {}
    for path in walk_files(root):
        match = _NAME.match(path.name)
        if path.name.startswith(".") or not match or match["kind"] != kind:
            continue
        stem = match["stem"]
        if stem in found:
            raise DataError(
                f"{path}: stem '{stem}' is also in {found[stem]}; each {kind} file needs a unique stem"
            )
        found[stem] = path
    return found


def find_frames(
    gt_root: Path, pred_root: Path, allow_missing: bool, warn: Callable[[str], None]
) -> list[FramePair]:
    """Ground-truth frames under ``gt_root`` paired with their predictions under ``pred_root``.

    A ground truth without a prediction is an error naming the stem, or with ``allow_missing`` a
    warning and the frame is skipped. Predictions without ground truth are ignored with a warning.
    """
    for name, root in (("gt", gt_root), ("pred", pred_root)):
        if not root.is_dir():
            raise DataError(f"{root}: {name} folder not found")
    if (gt_root / "dataset.json").is_file():
        return _nnunet_frames(gt_root, pred_root, allow_missing, warn)
    gts = find_labelled(gt_root, "gt")
    if not gts:
        raise DataError(f"{gt_root}: no ground-truth files (<case>/<stem>_gt.nii.gz) found")
    preds = find_labelled(pred_root, "pred")
    frames: list[FramePair] = []
    phases_by_folder: dict[Path, dict[int, str] | None] = {}
    for stem, gt_path in gts.items():
        folder = gt_path.parent
        if folder not in phases_by_folder:
            info = folder / "Info.cfg"
            phases_by_folder[folder] = phase_frames(info) if info.is_file() else None
            if phases_by_folder[folder] is None:
                warn(f"{folder}: no Info.cfg; ED/ES taken from stem suffixes only")
        pred_path = preds.get(stem)
        if pred_path is None:
            if not allow_missing:
                raise DataError(
                    f"{gt_path}: no prediction '{stem}_pred.nii.gz' under {pred_root} (allow_missing=true skips it)"
                )
            warn(f"{folder.name}: no prediction for {stem}; skipped")
            continue
        image = gt_path.with_name(gt_path.name.replace(f"{stem}_gt", stem, 1))
        frames.append(
            FramePair(folder.name, stem, phase_of(stem, phases_by_folder[folder]), gt_path, pred_path, image)
        )
    extra = sorted(set(preds) - set(gts))
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        warn(
            f"{pred_root}: {len(extra)} prediction(s) without ground truth ignored: {', '.join(extra[:3])}{more}"
        )
    if not frames:
        raise DataError(f"{pred_root}: none of the {len(gts)} ground-truth frames has a prediction")
    return frames


def _nnunet_frames(
    gt_root: Path, pred_root: Path, allow_missing: bool, warn: Callable[[str], None]
) -> list[FramePair]:
    """Frames of an nnU-Net raw dataset (``labelsTr/<case>``), each paired with ``<case>_0000_pred`` or
    ``<case>_pred`` under ``pred_root``; one frame per case, phase ``all``."""
    from seg_densenet.data.nnunet import NnUNetLayout

    preds = find_labelled(pred_root, "pred")
    frames = []
    for case, image, label in NnUNetLayout().pairs(gt_root):
        pred_path = preds.get(f"{case}_0000", preds.get(case))
        if pred_path is None:
            if not allow_missing:
                raise DataError(
                    f"{label}: no prediction '{case}_0000_pred.nii.gz' under {pred_root} (allow_missing=true skips it)"
                )
            warn(f"no prediction for {case}; skipped")
            continue
        frames.append(FramePair(case, case, NO_PHASE, label, pred_path, image))
    if not frames:
        raise DataError(f"{pred_root}: none of the label maps under {gt_root} has a prediction")
    return frames
