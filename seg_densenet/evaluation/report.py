"""Tables and summaries of an evaluation: ``metrics.csv``, ``clinical.csv``, ``summary.json``, ``summary.md``.

Rows are plain dicts. Metric rows: ``case, phase, structure, dice, iou, hd_mm, hd95_mm, assd_mm,
stem`` (one per frame and structure). Clinical rows: ``patient, source`` (``gt`` or ``pred``) and
:data:`~seg_densenet.evaluation.clinical.INDEX_NAMES` that the structures allow. Every file is written atomically; NaN is
``nan`` in CSV and ``null`` in JSON.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from seg_densenet.data.labels import indices_for, report_phases
from seg_densenet.evaluation.clinical import agreement
from seg_densenet.evaluation.metrics import METRIC_NAMES, aggregate
from seg_densenet.utils.atomic import atomic_write_text

METRIC_COLUMNS: tuple[str, ...] = ("case", "phase", "structure", *METRIC_NAMES, "stem")


def clinical_columns(structures: Sequence[str]) -> tuple[str, ...]:
    """The columns of ``clinical.csv``: patient, source and the indices that ``structures`` allow."""
    return ("patient", "source", *indices_for(structures))


_METRIC_TITLES = {
    "dice": "Dice",
    "iou": "IoU",
    "hd_mm": "HD (mm)",
    "hd95_mm": "HD95 (mm)",
    "assd_mm": "ASSD (mm)",
}


def summarise(
    metric_rows: Sequence[dict], clinical_rows: Sequence[dict], structures: Sequence[str], n_cases: int
) -> dict:
    """Aggregate the rows: ``{"n_cases", "per_structure": {s: {phase: {metric: aggregate}}}, "clinical":
    {index: agreement}}``, where aggregate is :func:`~seg_densenet.evaluation.metrics.aggregate`
    (mean, SD, finite count) and agreement is :func:`~seg_densenet.evaluation.clinical.agreement`.
    """
    phases = report_phases(r["phase"] for r in metric_rows)
    per_structure = {
        s: {
            phase: {
                m: aggregate([r[m] for r in metric_rows if r["structure"] == s and r["phase"] == phase])
                for m in METRIC_NAMES
            }
            for phase in phases
        }
        for s in structures
    }
    by_source = {
        src: {r["patient"]: r for r in clinical_rows if r["source"] == src} for src in ("gt", "pred")
    }
    patients = sorted(set(by_source["gt"]) & set(by_source["pred"]))
    clinical = {
        name: agreement(
            [by_source["pred"][p][name] for p in patients], [by_source["gt"][p][name] for p in patients]
        )
        for name in indices_for(structures)
    }
    return {"n_cases": n_cases, "per_structure": per_structure, "clinical": clinical}


def summary_json(stats: dict) -> dict:
    """The ``summary.json`` shape: means per structure/phase/metric and corr/bias/loa per index.

    ``{"n_cases": N, "per_structure": {s: {"ED": {metric: mean}, "ES": {...}}}, "clinical":
    {index: {"corr", "bias", "loa": [low, high]}}}``; NaN becomes ``None``.
    """
    return {
        "n_cases": stats["n_cases"],
        "per_structure": {
            s: {
                phase: {m: _finite(agg["mean"]) for m, agg in metrics.items()}
                for phase, metrics in phases.items()
            }
            for s, phases in stats["per_structure"].items()
        },
        "clinical": {
            name: {
                "corr": _finite(a["corr"]),
                "bias": _finite(a["bias"]),
                "loa": [_finite(v) for v in a["loa"]],
            }
            for name, a in stats["clinical"].items()
        },
    }


def summary_markdown(stats: dict, n_frames: int, sources: dict[str, str], warnings: Sequence[str]) -> str:
    """``summary.md``: an ACDC-style table of mean ± SD per structure and phase, and clinical agreement."""
    lines = [
        "# Segmentation evaluation",
        "",
        f"{stats['n_cases']} cases, {n_frames} frames. "
        + ", ".join(f"{key}: `{value}`" for key, value in sources.items()),
        "",
        "## Geometric metrics (mean ± SD over frames)",
        "",
        "3D, in the ground truth's voxel spacing. Distances are undefined (skipped) when one of the two "
        "masks is empty; `n` counts the frames with a finite HD95.",
        "",
        "| Structure | Phase | " + " | ".join(_METRIC_TITLES[m] for m in METRIC_NAMES) + " | n |",
        "|---|---|" + "---:|" * (len(METRIC_NAMES) + 1),
    ]
    for s, phases in stats["per_structure"].items():
        for phase, metrics in phases.items():
            if metrics["dice"]["n_total"] == 0:
                continue
            digits = {m: 3 if m in ("dice", "iou") else 2 for m in METRIC_NAMES}
            cells = [mean_sd_text(metrics[m], digits[m]) for m in METRIC_NAMES]
            n = metrics["hd95_mm"]
            lines.append(f"| {s} | {phase} | " + " | ".join(cells) + f" | {n['n']}/{n['n_total']} |")
    lines += [
        "",
        "## Clinical indices (prediction vs ground truth, over patients)",
        "",
        "Bias = mean(pred - gt); limits of agreement (LoA) = bias ± 1.96 SD of the differences.",
        "",
        "| Index | corr | bias | LoA | n |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, a in stats["clinical"].items():
        loa = f"[{number_text(a['loa'][0], 2)}, {number_text(a['loa'][1], 2)}]"
        lines.append(
            f"| {name} | {number_text(a['corr'], 3)} | {number_text(a['bias'], 2)} | {loa} | {a['n']} |"
        )
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    lines += [
        "",
        "## Conventions",
        "",
        "- HD: maximum symmetric surface distance; HD95: 95th percentile of the surface distances pooled "
        "from both directions (MedPy `hd95`); ASSD: mean of the two directed mean surface distances.",
        "- Both masks empty: Dice = IoU = 1 and distances 0; one mask empty: Dice = IoU = 0 and distances "
        "undefined (NaN, left out of the means).",
        "- Volumes: voxel count x voxel volume; EF = 100 (EDV - ESV) / EDV; myocardial mass = 1.05 g/ml x "
        "myocardium volume at ED.",
        "",
    ]
    return "\n".join(lines)


def write_markdown(path: Path, text: str) -> None:
    """Write ``summary.md`` atomically."""
    atomic_write_text(path, text)


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Write ``rows`` (dicts holding at least ``columns``) as CSV, atomically; floats keep 6 decimals."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row[c]) for c in columns])
    atomic_write_text(path, buffer.getvalue())


def write_json(path: Path, data: dict) -> None:
    """Write strictly valid JSON (``allow_nan=False``: NaN must already be ``None``), atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _csv_cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6f}"
    return str(value)


def number_text(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals, or ``n/a`` when it is None or not finite."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def mean_sd_text(agg: dict, digits: int) -> str:
    """``mean ± SD`` of an :func:`~seg_densenet.evaluation.metrics.aggregate` dict (``n/a`` if empty)."""
    if agg["n"] == 0:
        return "n/a"
    if not math.isfinite(agg["std"]):
        return number_text(agg["mean"], digits)
    return f"{agg['mean']:.{digits}f} ± {agg['std']:.{digits}f}"
