"""Evaluation app: segmentations against ACDC-layout ground truth, reported as the ACDC challenge did.

Usage::

    python -m seg_densenet.evaluate pred=DIR gt=DIR output=DIR [allow_missing=true] [plots=false]
    python -m seg_densenet.evaluate ckpt=FILE input=DIR output=DIR  # predict into OUTPUT/predictions

Per frame and structure (``labels``; ACDC: RV, MYO, LV) at ED and ES: Dice, IoU, HD, HD95 and ASSD in mm
(3D, in the ground truth's header spacing); per patient: the volumes, ejection fractions and myocardial
mass that the structures allow, from the ED/ES pair, for ground truth and prediction, and their agreement. See
:mod:`seg_densenet.evaluation` for the definitions and ``conf/evaluate.yaml`` for the settings.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from seg_densenet.data.acdc import apply_label_mapping
from seg_densenet.data.labels import ACDC_STRUCTURES, PHASES, LabelSet, indices_for
from seg_densenet.data.nifti import Volume, check_label_values, load_volume
from seg_densenet.data.splits import split_patients
from seg_densenet.errors import ConfigError, DataError
from seg_densenet.evaluation import report
from seg_densenet.evaluation.cases import FramePair, find_frames
from seg_densenet.evaluation.clinical import indices_from_volumes, structure_volumes_ml
from seg_densenet.evaluation.html_report import write_html_report
from seg_densenet.evaluation.metrics import label_metrics
from seg_densenet.utils.atomic import refuse_overwrite_of_inputs
from seg_densenet.utils.cli import check_overrides, run_cli

AFFINE_TOLERANCE_MM = 1e-3
"""Largest difference between prediction and ground-truth affine entries that counts as equal (mm)."""

_BLAND_ALTMAN = (("LV_EF_pct", "LV EF", "%"), ("RV_EF_pct", "RV EF", "%"), ("LV_EDV_ml", "LV EDV", "ml"))


def evaluate_folders(
    pred: str | Path,
    gt: str | Path,
    output: str | Path,
    labels: Mapping[str, int] = ACDC_STRUCTURES,
    allow_missing: bool = False,
    make_plots: bool = True,
    console: Console | None = None,
    label_mapping: Mapping[int, int] | None = None,
) -> dict:
    """Evaluate every ground-truth frame under ``gt`` against its prediction under ``pred``.

    labels: structure name -> label value in the predictions (and in the ground truth once mapped);
    label_mapping: ground-truth value -> prediction value for ground truth coded otherwise (M&Ms:
    ``{0: 0, 1: 3, 2: 2, 3: 1}`` against ACDC-coded predictions); ``None``: both coded alike.

    Writes ``metrics.csv``, ``clinical.csv``, ``summary.json``, ``summary.md`` (and PNG plots) into
    ``output`` and returns the ``summary.json`` dict. Raises :class:`DataError` for bad input.
    """
    pred, gt, output = (Path(p).expanduser() for p in (pred, gt, output))
    labels = _check_labels(labels)
    mapping = _check_label_mapping(label_mapping, labels)
    err = console or Console(stderr=True)
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        err.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)

    frames = find_frames(gt, pred, allow_missing, warn)
    _check_output(output, frames)

    metric_rows, volumes = _score_frames(frames, labels, mapping, err)
    clinical_rows = _clinical_rows(frames, volumes, warn)

    cases = sorted({f.case for f in frames})
    stats = report.summarise(metric_rows, clinical_rows, list(labels), n_cases=len(cases))
    summary = report.summary_json(stats)
    output.mkdir(parents=True, exist_ok=True)
    report.write_csv(output / "metrics.csv", metric_rows, report.METRIC_COLUMNS)
    report.write_csv(output / "clinical.csv", clinical_rows, report.clinical_columns(labels))
    report.write_json(output / "summary.json", summary)
    sources = {"gt": str(gt), "pred": str(pred)}
    markdown = report.summary_markdown(stats, len(frames), sources, warnings)
    report.write_markdown(output / "summary.md", markdown)
    strips, figures = {}, {}
    if make_plots:
        _write_plots(output, frames, metric_rows, clinical_rows, labels, mapping, warn)
        strips = _case_strips(frames, labels, mapping)
        figures = {
            png.stem.replace("_", " "): png.read_bytes()
            for png in sorted(output.glob("*.png"))
            if not png.name.startswith("overlay_")
        }
    write_html_report(
        output / "report.html", markdown, metric_rows, clinical_rows, list(labels), strips, figures
    )
    _print_table(stats, output)
    return summary


def _score_frames(
    frames: list[FramePair], labels: dict[str, int], mapping: dict[int, int] | None, console: Console
) -> tuple[list[dict], dict[tuple[str, str], dict[str, dict[str, float]]]]:
    """Metric rows (one per frame and structure) and structure volumes ``{(case, stem): {"gt"|"pred":
    {structure: ml}}}`` of every frame, with a progress bar."""
    metric_rows: list[dict] = []
    volumes: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    progress = Progress(
        TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=console, transient=True,
    )  # fmt: skip
    with progress:
        task = progress.add_task("", total=len(frames))
        for frame in frames:
            progress.update(task, description=frame.stem)
            gt_vol, pred_vol = _load_pair(frame, labels, mapping)
            per_structure = label_metrics(pred_vol.data, gt_vol.data, gt_vol.spacing, labels)
            metric_rows += [
                {
                    "case": frame.case,
                    "phase": frame.phase,
                    "structure": structure,
                    **values,
                    "stem": frame.stem,
                }
                for structure, values in per_structure.items()
            ]
            volumes[(frame.case, frame.stem)] = {
                "gt": structure_volumes_ml(gt_vol.data, gt_vol.spacing, labels),
                "pred": structure_volumes_ml(pred_vol.data, gt_vol.spacing, labels),
            }
            progress.advance(task)
    return metric_rows, volumes


def evaluate(cfg: DictConfig) -> dict:
    """The app as a plain function of its config (``conf/evaluate.yaml``); returns ``summary.json``'s dict."""
    if cfg.output is None:
        raise ConfigError("output: set output=DIR, the folder for the reports")
    output = Path(cfg.output).expanduser()
    pred, gt, images = cfg.pred, cfg.gt, cfg.input
    if cfg.get("split") is not None:
        # the split's patients only (e.g. a training run's held-out fold), as a tree of links
        source = images if cfg.ckpt is not None else gt
        if source is None:
            raise ConfigError("split: needs the case folders, input=DIR (with ckpt=) or gt=DIR")
        cases = _link_cases(
            Path(source), split_patients(cfg.split, cfg.subset), output / f"{cfg.subset}_cases"
        )
        if cfg.ckpt is not None:
            images = cases  # the ground truth defaults to the images below
        else:
            gt = cases
    if cfg.ckpt is not None:
        if pred is not None:
            raise ConfigError(
                "pred: give either pred=DIR (evaluate) or ckpt=FILE input=DIR (predict, then evaluate)"
            )
        if images is None:
            raise ConfigError("input: ckpt=FILE needs input=DIR, the ACDC-layout images to segment")
        from seg_densenet.predict import predict_tree  # lazy: pulls in torch and the models

        pred = output / "predictions"
        options = OmegaConf.to_container(cfg.predict_options, resolve=True) or {}
        nnunet = (Path(images) / "dataset.json").is_file()  # an nnU-Net raw dataset: images in imagesTr/
        predict_tree(cfg.ckpt, Path(images) / "imagesTr" if nnunet else images, pred, **options)
        gt = gt if gt is not None else images
    if pred is None:
        raise ConfigError("pred: set pred=DIR (predictions) or ckpt=FILE input=DIR (predict, then evaluate)")
    if gt is None:
        raise ConfigError("gt: set gt=DIR, the ACDC-layout ground truth (<case>/<stem>_gt.nii.gz)")
    labels, mapping = _labels_and_mapping(cfg)
    return evaluate_folders(
        pred, gt, output, labels, bool(cfg.allow_missing), bool(cfg.plots), label_mapping=mapping
    )


def _labels_and_mapping(cfg: DictConfig) -> tuple[dict[str, int], dict[int, int] | None]:
    """``labels`` and ``label_mapping`` as set, else the checkpoint's (with ``ckpt=``), else ACDC's and none."""
    labels = OmegaConf.to_container(cfg.labels, resolve=True) if cfg.labels is not None else None
    mapping = (
        OmegaConf.to_container(cfg.label_mapping, resolve=True) if cfg.label_mapping is not None else None
    )
    if cfg.ckpt is not None:
        from seg_densenet.checkpoint import read_checkpoint

        first = cfg.ckpt if isinstance(cfg.ckpt, str) else cfg.ckpt[0]  # an ensemble's members share labels
        record = read_checkpoint(first)["seg_densenet"]
        labels = labels if labels is not None else LabelSet.from_record(record).structures
        mapping = mapping if mapping is not None else (record.get("data") or {}).get("label_mapping")
    return (labels if labels is not None else dict(ACDC_STRUCTURES)), mapping


def _link_cases(root: Path, patients: set[str], dest: Path) -> Path:
    """A folder ``dest`` holding links to the split's ``patients`` of ``root``, in ``root``'s layout."""
    if (root / "dataset.json").is_file():
        return _link_nnunet_cases(root, patients, dest)
    return _link_case_folders(root, patients, dest)


def _link_case_folders(root: Path, patients: set[str], dest: Path) -> Path:
    """ACDC layout: ``dest/<patient>`` links to the case folder ``root/<patient>``."""
    _check_found(root, patients, {p for p in patients if (root / p).is_dir()}, "case folder")
    _fresh_link_dir(dest)
    for patient in sorted(patients):
        (dest / patient).symlink_to((root / patient).resolve(), target_is_directory=True)
    return dest


def _link_nnunet_cases(root: Path, patients: set[str], dest: Path) -> Path:
    """nnU-Net raw dataset: ``dest`` is a dataset of its own (``dataset.json``, ``imagesTr/``,
    ``labelsTr/``) holding links to the patients' image and label files."""
    from seg_densenet.data.nnunet import NnUNetLayout

    layout = NnUNetLayout()
    found = {case: (image, label) for case, image, label in layout.pairs(root)}
    _check_found(root, patients, set(found), "label map")
    _fresh_link_dir(dest)
    (dest / "dataset.json").symlink_to((root / "dataset.json").resolve())
    for folder in (layout.images, layout.labels):
        (dest / folder).mkdir()
    for patient in sorted(patients):
        for path, folder in zip(found[patient], (layout.images, layout.labels)):
            (dest / folder / path.name).symlink_to(path.resolve())
    return dest


def _check_found(root: Path, patients: set[str], found: set[str], what: str) -> None:
    missing = sorted(patients - found)
    if missing:
        raise DataError(f"{root}: no {what} for the split's patient(s) {', '.join(missing[:5])}")


def _fresh_link_dir(dest: Path) -> None:
    """Make ``dest`` empty, refusing to delete anything in it but links made by an earlier run."""
    if dest.is_dir():
        if any(p.is_file() and not p.is_symlink() for p in dest.rglob("*")):  # rglob does not enter links
            raise DataError(f"{dest}: exists and holds more than case links; choose another output=")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def _hydra_app(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


def main() -> None:
    """Console-script entry point: user errors print ``error: <message>`` and exit with code 2."""
    check_overrides("evaluate")
    _hydra_app()


def _check_labels(labels: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(labels, Mapping) or not labels:
        raise ConfigError(
            f"labels: expected structure names mapped to label values, e.g. {ACDC_STRUCTURES}, got {labels}"
        )
    values = list(labels.values())
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values) or len(
        set(values)
    ) != len(values):
        raise ConfigError(f"labels: label values must be distinct positive integers, got {dict(labels)}")
    return {str(k): int(v) for k, v in labels.items()}


def _check_label_mapping(mapping: Mapping | None, labels: Mapping[str, int]) -> dict[int, int] | None:
    if mapping is None:
        return None
    if not isinstance(mapping, Mapping) or not all(
        isinstance(k, int) and isinstance(v, int) for k, v in mapping.items()
    ):
        raise ConfigError(
            f"label_mapping: expected ground-truth value -> label value integers, got {mapping}"
        )
    allowed = {0, *labels.values()}
    if not set(mapping.values()) <= allowed or any(k < 0 for k in mapping):
        raise ConfigError(
            f"label_mapping: targets must be 0 or values of labels {dict(labels)}, got {dict(mapping)}"
        )
    return {int(k): int(v) for k, v in mapping.items()}


def _check_output(output: Path, frames: list[FramePair]) -> None:
    """The output folder may be an input folder, but never an input file."""
    inputs = [p for f in frames for p in (f.gt_path, f.pred_path, f.image_path) if p is not None]
    refuse_overwrite_of_inputs(output, inputs)
    if output.exists() and not output.is_dir():
        raise DataError(f"{output}: output exists and is not a folder")


def _load_pair(
    frame: FramePair, labels: Mapping[str, int], mapping: Mapping[int, int] | None
) -> tuple[Volume, Volume]:
    """Ground truth (mapped to the predictions' values by ``mapping``, if any) and prediction of a frame,
    checked for label values and equal geometry."""
    allowed = {0, *labels.values()}
    gt_vol = apply_label_mapping(load_volume(frame.gt_path, label=True), mapping or {v: v for v in allowed})
    pred_vol = load_volume(frame.pred_path, label=True)
    if pred_vol.shape != gt_vol.shape:
        raise DataError(
            f"{frame.case}: prediction {frame.pred_path} has shape {pred_vol.shape} but ground truth "
            f"{frame.gt_path} has shape {gt_vol.shape}"
        )
    gap = float(np.abs(pred_vol.affine - gt_vol.affine).max())
    if gap > AFFINE_TOLERANCE_MM:
        raise DataError(
            f"{frame.case}: prediction {frame.pred_path} and ground truth {frame.gt_path} have different "
            f"affines (largest difference {gap:.4g} mm)"
        )
    check_label_values(pred_vol, allowed)
    return gt_vol, pred_vol


def _clinical_rows(frames: list[FramePair], volumes: dict, warn) -> list[dict]:
    """A ``gt`` and a ``pred`` row of clinical indices per case with exactly one ED and one ES frame."""
    rows = []
    if not any(f.phase in PHASES for f in frames):
        warn("no frame has an ED or ES phase: clinical indices skipped")
        return rows
    for case in sorted({f.case for f in frames}):
        by_phase = {phase: [f for f in frames if f.case == case and f.phase == phase] for phase in PHASES}
        if any(len(found) != 1 for found in by_phase.values()):
            counts = ", ".join(f"{len(found)} {phase}" for phase, found in by_phase.items())
            warn(f"{case}: needs one ED and one ES frame for clinical indices, found {counts}; skipped")
            continue
        ed, es = by_phase["ED"][0], by_phase["ES"][0]
        for source in ("gt", "pred"):
            indices = indices_from_volumes(volumes[(case, ed.stem)][source], volumes[(case, es.stem)][source])
            rows.append({"patient": case, "source": source, **indices})
    return rows


def _write_plots(output: Path, frames, metric_rows, clinical_rows, labels, mapping, warn) -> None:
    from seg_densenet.evaluation import plots  # lazy: matplotlib costs ~1 s of start-up when plots=false

    plots.dice_boxplot(metric_rows, list(labels), output / "dice_boxplot.png")
    by_source = {
        src: {r["patient"]: r for r in clinical_rows if r["source"] == src} for src in ("gt", "pred")
    }
    patients = sorted(by_source["gt"])
    if patients:
        indices = indices_for(labels)
        for key, name, unit in (entry for entry in _BLAND_ALTMAN if entry[0] in indices):
            pred = [by_source["pred"][p][key] for p in patients]
            gt = [by_source["gt"][p][key] for p in patients]
            plots.bland_altman(pred, gt, name, unit, output / f"bland_altman_{key.rsplit('_', 1)[0]}.png")
    else:
        warn("no patient with both ED and ES: Bland-Altman plots skipped")
    # best and worst frame by mean Dice over the structures
    frame_dice: dict[str, list[float]] = {}
    for row in metric_rows:
        frame_dice.setdefault(row["stem"], []).append(row["dice"])
    ranked = sorted(frames, key=lambda f: float(np.mean(frame_dice[f.stem])))
    for which, frame in (("best", ranked[-1]), ("worst", ranked[0])):
        gt_vol, pred_vol = _load_pair(frame, labels, mapping)
        if frame.image_path.is_file():
            image = load_volume(frame.image_path).data
        else:
            warn(f"{frame.image_path}: image not found; {which}-case overlay drawn on a blank background")
            image = np.zeros(gt_vol.shape, np.float32)
        if image.shape != gt_vol.shape:
            warn(
                f"{frame.image_path}: image shape {image.shape} differs from its ground truth; overlay skipped"
            )
            continue
        title = f"{which}: {frame.stem} ({frame.phase}), mean Dice {np.mean(frame_dice[frame.stem]):.3f}"
        plots.overlay_montage(
            image, gt_vol.data, pred_vol.data, labels, title, output / f"overlay_{which}.png"
        )


def _case_strips(
    frames: list[FramePair], labels: dict[str, int], mapping: dict[int, int] | None
) -> dict[str, bytes]:
    """The overlay strip (ED and ES) of every case whose image files are there, as PNG bytes."""
    from seg_densenet.evaluation import plots

    strips = {}
    for case in sorted({f.case for f in frames}):
        phases = {}
        for frame in sorted(
            (f for f in frames if f.case == case),
            key=lambda f: PHASES.index(f.phase) if f.phase in PHASES else len(PHASES),
        ):
            if not frame.image_path.is_file():
                continue
            gt_vol, pred_vol = _load_pair(frame, labels, mapping)
            image = load_volume(frame.image_path).data
            if image.shape == gt_vol.shape:
                phases[frame.phase or frame.stem] = (image, gt_vol.data, pred_vol.data)
        if phases:
            strips[case] = plots.overlay_strip(phases, labels, case)
    return strips


def _print_table(stats: dict, output: Path) -> None:
    table = Table(title=f"{stats['n_cases']} cases (mean ± SD)")
    for column in ("Structure", "Phase", "Dice", "HD95 mm", "ASSD mm"):
        table.add_column(column, justify="left" if column in ("Structure", "Phase") else "right")
    for structure, phases in stats["per_structure"].items():
        for phase, m in phases.items():
            if m["dice"]["n_total"]:
                table.add_row(
                    structure,
                    phase,
                    report.mean_sd_text(m["dice"], 3),
                    report.mean_sd_text(m["hd95_mm"], 2),
                    report.mean_sd_text(m["assd_mm"], 2),
                )
    out = Console()
    out.print(table)
    ef = stats["clinical"].get("LV_EF_pct")
    if ef and ef["n"]:
        out.print(
            f"LV EF: corr {report.number_text(ef['corr'], 3)}, bias {report.number_text(ef['bias'], 2)} %",
            highlight=False,
        )
    out.print(f"reports written to {output}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
