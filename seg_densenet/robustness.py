"""Robustness report: a checkpoint's Dice under controlled shifts of its test images.

Usage::

    python -m seg_densenet.robustness ckpt=PATH input=ACDC_TREE output=DIR
        [split=RUN/split.json subset=test] [shifts=[none,rot90,...]] [patients=N] [tta=...] [postprocess=...]

Every annotated frame (``<case>/<stem>.nii.gz`` with ``<stem>_gt.nii.gz``, phases from ``Info.cfg``)
is shifted in memory by each function of :data:`SHIFTS` (image and ground truth alike; intensity
shifts leave the ground truth as it is), predicted, and scored with volume Dice (and HD95 in mm) per
structure against the shifted ground truth. Geometric shifts keep every voxel's world coordinate:
they change how the scan is stored (orientation, axis order, pixel size), not the anatomy.

Writes into ``output``, atomically: ``robustness.md`` (settings and the table), ``robustness.csv``
(a row per shift) and ``robustness_cases.csv`` (a row per shift, frame and structure).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from seg_densenet.data.acdc import apply_label_mapping
from seg_densenet.data.labels import LabelSet
from seg_densenet.data.nifti import Volume, load_volume
from seg_densenet.data.preprocess import _resample
from seg_densenet.data.splits import split_patients
from seg_densenet.errors import ConfigError, DataError
from seg_densenet.evaluation import report
from seg_densenet.evaluation.cases import FramePair, find_labelled, phase_frames, phase_of
from seg_densenet.evaluation.metrics import label_metrics
from seg_densenet.utils.atomic import atomic_write_text
from seg_densenet.utils.cli import check_overrides, run_cli

SEED = 0
"""Seed of the bias field and the noise: every run and every case sees the same draw."""
BIAS_AMPLITUDE = 0.3
"""Largest relative change of the bias field over the field of view (±30 %)."""
NOISE_STD = 0.05
"""Standard deviation of the added Gaussian noise, as a fraction of the volume's robust intensity range."""
NOISE_PERCENTILES = (0.5, 99.5)
"""The robust range of ``NOISE_STD``: these percentiles (the preprocessing's default clip), so that one
bright outlier voxel does not scale the noise (one lent ACDC volume's maximum is 6x its 99.5th percentile)."""


# --- shifts: pure functions Volume -> Volume; ``label=True`` for a label map ---------------------


def _regrid(volume: Volume, data: np.ndarray, new_to_old: np.ndarray) -> Volume:
    """``data`` on a new voxel grid whose index ``p`` (homogeneous) is old index ``new_to_old @ p``.

    The affine becomes ``affine @ new_to_old``, so a voxel keeps its world coordinate (mm); header
    shape, zooms, qform and sform follow.
    """
    affine = volume.affine @ new_to_old
    zooms = np.abs(new_to_old[:3, :3]).T @ np.asarray(volume.spacing, dtype=np.float64)
    header = volume.header.copy()
    header.set_data_shape(data.shape)
    header.set_qform(affine)
    header.set_sform(affine)
    header.set_zooms(tuple(float(z) for z in zooms))  # last: the exact sizes, not re-derived from the affine
    return Volume(np.ascontiguousarray(data), affine, header, volume.path)


def identity(volume: Volume, label: bool = False) -> Volume:
    """The reference: the volume as stored."""
    return volume


def rotate90(volume: Volume, label: bool = False, *, k: int = 1) -> Volume:
    """``np.rot90(data, k, axes=(0, 1))`` with the affine compensated (world coordinates kept)."""
    for _ in range(k % 4):
        # np.rot90 once: new (i, j, k) holds old (j, n1 - 1 - i, k)
        n1 = volume.shape[1]
        new_to_old = np.array(
            [[0, 1, 0, 0], [-1, 0, 0, n1 - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64
        )
        volume = _regrid(volume, np.rot90(volume.data, 1, axes=(0, 1)), new_to_old)
    return volume


def flip(volume: Volume, label: bool = False, *, axis: int) -> Volume:
    """Reverse array axis ``axis`` (0: left-right, 1: up-down, 2: the order of the slices) with the
    affine compensated."""
    new_to_old = np.eye(4)
    new_to_old[axis, axis] = -1.0
    new_to_old[axis, 3] = volume.shape[axis] - 1
    return _regrid(volume, np.flip(volume.data, axis), new_to_old)


def slices_first(volume: Volume, label: bool = False) -> Volume:
    """Store ``(X, Y, Z)`` as ``(Z, X, Y)``: new (a, b, c) holds old (b, c, a); affine permuted."""
    new_to_old = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    return _regrid(volume, np.moveaxis(volume.data, 2, 0), new_to_old)


def resample_inplane(volume: Volume, label: bool = False, *, factor: float) -> Volume:
    """Resample in-plane to ``factor`` times the pixel size (image linear, labels nearest).

    The grid's extent (``n * spacing``) and its outer pixel edges stay where they were in world
    space; the size rounds, so the new pixel size is ``n * spacing / round(n / factor)`` mm.
    """
    shape = volume.shape
    new_shape = (*(max(1, round(n / factor)) for n in shape[:2]), shape[2])
    data = _resample(volume.data, new_shape, order=0 if label else 1)
    scale = np.array([n / m for n, m in zip(shape[:2], new_shape[:2])])
    new_to_old = np.eye(4)
    new_to_old[[0, 1], [0, 1]] = scale
    # grid_mode zoom: new pixel edge -0.5 sits on old edge -0.5, so centre i lands at scale * (i + 0.5) - 0.5
    new_to_old[:2, 3] = (scale - 1.0) / 2.0
    return _regrid(volume, data, new_to_old)


def _intensity(volume: Volume, data: np.ndarray) -> Volume:
    return dataclasses.replace(volume, data=data.astype(np.float32))


def gamma(volume: Volume, label: bool = False, *, power: float) -> Volume:
    """Map intensities to [0, 1] by min/max, raise to ``power``, map back (a contrast change)."""
    if label:
        return volume
    low, high = float(volume.data.min()), float(volume.data.max())
    if high <= low:
        return volume
    unit = (volume.data - low) / (high - low)
    return _intensity(volume, low + unit**power * (high - low))


def bias_field(volume: Volume, label: bool = False) -> Volume:
    """Multiply by a smooth in-plane field ``1 + 0.3 p(x, y)``, ``p`` a seeded quadratic with max |p| = 1."""
    if label:
        return volume
    x, y = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in volume.shape[:2]), indexing="ij")
    coeffs = np.random.default_rng(SEED).normal(size=5)
    poly = sum(c * t for c, t in zip(coeffs, (x, y, x * y, x**2, y**2)))
    poly = poly - poly.mean()
    poly = poly / max(float(np.abs(poly).max()), 1e-8)
    field = 1.0 + BIAS_AMPLITUDE * poly
    return _intensity(volume, volume.data * field[:, :, None].astype(np.float32))


def gaussian_noise(volume: Volume, label: bool = False) -> Volume:
    """Add seeded Gaussian noise of std ``NOISE_STD`` times the volume's robust intensity range
    (``NOISE_PERCENTILES``)."""
    if label:
        return volume
    low, high = np.percentile(volume.data, NOISE_PERCENTILES)
    std = NOISE_STD * float(high - low)
    noise = np.random.default_rng(SEED + 1).normal(0.0, std, size=volume.shape)
    return _intensity(volume, volume.data + noise)


SHIFTS: dict[str, Callable[..., Volume]] = {
    "none": identity,
    "rot90": partial(rotate90, k=1),
    "rot180": partial(rotate90, k=2),
    "rot270": partial(rotate90, k=3),
    "flip_lr": partial(flip, axis=0),
    "flip_ud": partial(flip, axis=1),
    "flip_slices": partial(flip, axis=2),
    "permute": slices_first,
    "spacing_0.7": partial(resample_inplane, factor=0.7),
    "spacing_1.4": partial(resample_inplane, factor=1.4),
    "gamma_0.6": partial(gamma, power=0.6),
    "gamma_1.6": partial(gamma, power=1.6),
    "bias": bias_field,
    "noise": gaussian_noise,
}
"""Shift name (the CSV key) -> ``fn(volume, label=False) -> Volume``."""

GEOMETRIC: tuple[str, ...] = (
    "rot90",
    "rot180",
    "rot270",
    "flip_lr",
    "flip_ud",
    "flip_slices",
    "permute",
    "spacing_0.7",
    "spacing_1.4",
)
"""Shifts that move voxels (and therefore the ground truth); the others change intensities only."""


# --- the app ---------------------------------------------------------------------------------------


def check_shifts(shifts: str | Sequence[str] | None) -> list[str]:
    """Shift names in the order given, without repeats, with the reference ``none`` first."""
    if shifts is None:
        return list(SHIFTS)
    names = [shifts] if isinstance(shifts, str) else [str(s) for s in shifts]
    unknown = [n for n in names if n not in SHIFTS]
    if unknown:
        raise ConfigError(f"shifts: unknown shift(s) {', '.join(unknown)}; valid: {', '.join(SHIFTS)}")
    return ["none", *dict.fromkeys(n for n in names if n != "none")]


def find_cases(
    input: str | Path, split: str | Path | None = None, subset: str = "test", patients: int | None = None
) -> list[FramePair]:
    """The annotated frames under ``input`` (``<case>/<stem>_gt.nii.gz`` beside ``<stem>.nii.gz``),
    limited to the patients of ``split[subset]`` and then to the first ``patients`` cases."""
    root = Path(input).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: input folder not found")
    gts = find_labelled(root, "gt")
    if not gts:
        raise DataError(f"{root}: no ground-truth files (<case>/<stem>_gt.nii.gz) found")
    frames = []
    phases: dict[Path, dict[int, str] | None] = {}
    for stem, gt_path in sorted(gts.items()):
        folder = gt_path.parent
        if folder not in phases:
            info = folder / "Info.cfg"
            phases[folder] = phase_frames(info) if info.is_file() else None
        image = gt_path.with_name(gt_path.name.replace(f"{stem}_gt", stem, 1))
        if not image.is_file():
            raise DataError(f"{gt_path}: its image {image.name} is not beside it")
        frames.append(FramePair(folder.name, stem, phase_of(stem, phases[folder]), gt_path, None, image))
    if split is not None:
        chosen = split_patients(split, subset)
        missing = sorted(chosen - {f.case for f in frames})
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DataError(
                f"{split}: {subset} patient(s) {', '.join(missing[:3])}{more} have no annotated frames "
                f"under {root}"
            )
        frames = [f for f in frames if f.case in chosen]
    if patients is not None:
        if int(patients) < 1:
            raise ConfigError(f"patients={patients}: must be at least 1 (null: every case)")
        keep = sorted({f.case for f in frames})[: int(patients)]
        frames = [f for f in frames if f.case in keep]
    return sorted(frames, key=lambda f: (f.case, f.stem))


def robustness_report(
    ckpt: str | Path | Sequence[str | Path],
    input: str | Path,
    output: str | Path,
    *,
    split: str | Path | None = None,
    subset: str = "test",
    shifts: Sequence[str] | None = None,
    patients: int | None = None,
    tta: bool | str = False,
    postprocess: str | None = None,
    device: str = "auto",
    batch_size: int = 16,
    channels_last: bool = True,
    scales: Sequence[float] = (1.0,),
    auto_scale: Sequence[float] | None = None,
) -> list[dict]:
    """Evaluate ``ckpt`` on every frame under ``input`` under every shift; returns the per-shift rows
    (``robustness.csv``) after writing the reports into ``output``."""
    names = check_shifts(shifts)
    frames = find_cases(input, split, subset, patients)
    output = Path(output).expanduser()
    if output.exists() and not output.is_dir():
        raise DataError(f"{output}: output exists and is not a folder")
    from seg_densenet.inference.predictor import build_predictor  # lazy: torch and the models

    predictor, record = build_predictor(
        ckpt,
        device=device,
        tta=tta,
        postprocess=postprocess,
        batch_size=batch_size,
        channels_last=channels_last,
        scales=scales,
        auto_scale=auto_scale,
    )
    labels = LabelSet.from_record(record).structures
    mapping = (record.get("data") or {}).get("label_mapping")
    case_rows = _score_shifts(predictor, frames, names, labels, mapping)
    rows = _summarise(case_rows, names, list(labels))
    ckpt_text = str(ckpt) if isinstance(ckpt, (str, Path)) else ", ".join(map(str, ckpt))
    settings = {
        "ckpt": ckpt_text, "input": str(input), "split": None if split is None else f"{split} ({subset})",
        "n_cases": len({f.case for f in frames}), "n_frames": len(frames),
        "tta": tta, "postprocess": postprocess, "scales": list(scales),
        "auto_scale": None if auto_scale is None else list(auto_scale),
    }  # fmt: skip
    markdown = robustness_markdown(rows, settings, list(labels))
    output.mkdir(parents=True, exist_ok=True)
    report.write_csv(output / "robustness_cases.csv", case_rows, CASE_COLUMNS)
    report.write_csv(output / "robustness.csv", rows, summary_columns(list(labels)))
    atomic_write_text(output / "robustness.md", markdown)
    print(_table(rows, list(labels)))
    print(_worst_line(rows))
    print(f"reports written to {output}")
    return rows


def _score_shifts(
    predictor,
    frames: list[FramePair],
    names: list[str],
    labels: dict[str, int],
    mapping: dict[int, int] | None,
) -> list[dict]:
    """One row per shift, frame and structure (Dice, HD95 mm) of ``predictor`` on every shifted frame."""
    case_rows: list[dict] = []
    progress = Progress(
        TextColumn("robustness"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=Console(stderr=True), transient=True,
    )  # fmt: skip
    with progress:
        task = progress.add_task("", total=len(frames) * len(names))
        for frame in frames:
            image, gt = _load_frame(frame, labels, mapping)
            for name in names:
                progress.update(task, description=f"{frame.stem} {name}")
                shifted_image, shifted_gt = SHIFTS[name](image), SHIFTS[name](gt, label=True)
                pred = predictor.predict(shifted_image)["labels"]
                if pred.shape != shifted_gt.shape:
                    raise DataError(
                        f"{frame.image_path}: shift {name}: prediction shape {pred.shape} differs from the "
                        f"shifted image's {shifted_gt.shape}"
                    )
                metrics = label_metrics(pred, shifted_gt.data, shifted_gt.spacing, labels)
                case_rows += [{
                    "shift": name, "case": frame.case, "phase": frame.phase, "structure": structure,
                    "dice": values["dice"], "hd95_mm": values["hd95_mm"], "stem": frame.stem,
                } for structure, values in metrics.items()]  # fmt: skip
                progress.advance(task)
    return case_rows


CASE_COLUMNS = ("shift", "case", "phase", "structure", "dice", "hd95_mm", "stem")


def summary_columns(structures: Sequence[str]) -> list[str]:
    return [
        "shift",
        "dice_mean",
        "delta_dice",
        *(f"dice_{s}" for s in structures),
        "hd95_mean_mm",
        "n_frames",
    ]


def _load_frame(
    frame: FramePair, labels: dict[str, int], mapping: dict[int, int] | None
) -> tuple[Volume, Volume]:
    """Image and ground truth, in the checkpoint's class values (mapped as its training data was)."""
    image = load_volume(frame.image_path)
    gt = load_volume(frame.gt_path, label=True)
    identity = {v: v for v in (0, *labels.values())}
    apply_label_mapping(gt, {int(k): int(v) for k, v in mapping.items()} if mapping else identity)
    if image.shape != gt.shape or not np.allclose(image.affine, gt.affine, atol=1e-3):
        raise DataError(f"{frame.gt_path}: shape or affine differs from its image {frame.image_path.name}")
    return image, gt


def _summarise(case_rows: list[dict], names: list[str], structures: list[str]) -> list[dict]:
    """A row per shift: mean Dice over frames and structures, per structure, and minus ``none``'s."""
    rows = []
    for name in names:
        mine = [r for r in case_rows if r["shift"] == name]
        hd95 = np.array([r["hd95_mm"] for r in mine], dtype=np.float64)
        row = {
            "shift": name,
            "dice_mean": float(np.mean([r["dice"] for r in mine])),
            **{
                f"dice_{s}": float(np.mean([r["dice"] for r in mine if r["structure"] == s]))
                for s in structures
            },
            "hd95_mean_mm": float(np.nanmean(hd95)) if np.isfinite(hd95).any() else float("nan"),
            "n_frames": len({(r["case"], r["stem"]) for r in mine}),
        }
        rows.append(row)
    reference = rows[0]["dice_mean"]  # check_shifts puts none first
    for row in rows:
        row["delta_dice"] = row["dice_mean"] - reference
    return rows


def _table(rows: list[dict], structures: list[str]) -> str:
    header = ["Shift", "Mean Dice", "Δ vs none", *(f"Dice {s}" for s in structures), "HD95 mm"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [
            f"`{row['shift']}`",
            report.number_text(row["dice_mean"], 3),
            f"{row['delta_dice']:+.3f}",
            *(report.number_text(row[f"dice_{s}"], 3) for s in structures),
            report.number_text(row["hd95_mean_mm"], 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _worst_line(rows: list[dict]) -> str:
    shifted = rows[1:]
    if not shifted:
        return "Worst shift: none run besides the reference."
    worst = min(shifted, key=lambda r: r["dice_mean"])
    return (
        f"Worst shift: `{worst['shift']}`, mean Dice {worst['dice_mean']:.3f} "
        f"({worst['delta_dice']:+.3f} vs `none`)."
    )


def robustness_markdown(rows: list[dict], settings: dict, structures: list[str]) -> str:
    """``robustness.md``: the settings, the worst shift and the table."""
    split = settings["split"] or "none (every case under input)"
    lines = [
        "# Robustness report",
        "",
        f"- Checkpoint: `{settings['ckpt']}`",
        f"- Input: `{settings['input']}`; split: {split}",
        f"- Cases: {settings['n_cases']} patients, {settings['n_frames']} frames",
        f"- Prediction: tta={str(settings['tta']).lower()}, postprocess={settings['postprocess'] or 'none'}, "
        f"scales={settings['scales']}, auto_scale={settings.get('auto_scale')}",
        f"- {_worst_line(rows)}",
        "",
        _table(rows, structures),
        "",
        "Dice: volume Dice per frame and structure against the ground truth shifted the same way; "
        "Mean Dice averages frames and structures, Δ is Mean Dice minus that of `none`. HD95: mean "
        "over the frames and structures where it is defined (mm). See docs/evaluation.md, Robustness report.",
        "",
    ]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="robustness")
def _hydra_main(cfg: DictConfig) -> None:
    shifts = (
        OmegaConf.to_container(cfg.shifts, resolve=True) if OmegaConf.is_config(cfg.shifts) else cfg.shifts
    )
    run_cli(
        robustness_report,
        cfg.ckpt,
        cfg.input,
        cfg.output,
        split=cfg.split,
        subset=str(cfg.subset),
        shifts=shifts,
        patients=cfg.patients,
        tta=cfg.tta,
        postprocess=cfg.postprocess,
        device=cfg.device,
        batch_size=cfg.batch_size,
        channels_last=cfg.channels_last,
        scales=list(cfg.scales),
        auto_scale=None if cfg.auto_scale is None else list(cfg.auto_scale),
    )


def main() -> None:
    check_overrides("robustness")
    _hydra_main()


if __name__ == "__main__":
    main()
