"""Validation Dice against wall-clock minutes: ``python -m seg_densenet.training_curve RUN [RUN ...] --out FILE.png``.

Reads each run's ``csv/metrics.csv`` (the rows with ``val/dice`` and ``val/elapsed_min``, logged by
:class:`~seg_densenet.lit.callbacks.ElapsedTime`), plots ``val/dice`` per run against minutes, and
writes beside the figure a markdown table of the best validation Dice reached within 10, 30, 60 and
120 minutes, so a user sees what a time budget buys.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from seg_densenet.errors import SegDenseNetError
from seg_densenet.utils.atomic import atomic_write_text
from seg_densenet.utils.cli import run_cli

BUDGETS_MIN = (10, 30, 60, 120)


def read_curve(run_dir: str | Path) -> list[tuple[float, float]]:
    """``[(minutes, val/dice), ...]`` of a run, in time order."""
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.is_file():
        raise SegDenseNetError(f"{path}: no metrics file (is {run_dir} a training run directory?)")
    points = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("val/dice") and row.get("val/elapsed_min"):
                points.append((float(row["val/elapsed_min"]), float(row["val/dice"])))
    if not points:
        raise SegDenseNetError(f"{path}: no row holds both val/dice and val/elapsed_min")
    return sorted(points)


def best_within(points: list[tuple[float, float]], minutes: float) -> float | None:
    """The best validation Dice logged at or before ``minutes`` (``None``: nothing logged by then)."""
    values = [d for t, d in points if t <= minutes]
    return max(values) if values else None


def write_curve(runs: list[str], out: str | Path, labels: list[str] | None = None) -> Path:
    """Plot the runs' curves into ``out`` (PNG) and write ``out`` with ``.md``: the budget table."""
    from seg_densenet.utils.figures import new_figure, save_png

    labels = labels or [Path(r).name for r in runs]
    if len(labels) != len(runs):
        raise SegDenseNetError(f"--labels: {len(labels)} labels for {len(runs)} runs")
    curves = [read_curve(r) for r in runs]
    out = Path(out)
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    for label, points in zip(labels, curves):
        ax.plot([t for t, _ in points], [d for _, d in points], marker=".", label=label)
    for minutes in BUDGETS_MIN:
        ax.axvline(minutes, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("wall-clock minutes of training")
    ax.set_ylabel("validation mean Dice (RV, MYO, LV)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, out, dpi=120)
    header = "| run | " + " | ".join(f"best val Dice by {m} min" for m in BUDGETS_MIN) + " | last point |"
    lines = [header, "|" + " --- |" * (len(BUDGETS_MIN) + 2)]
    for label, points in zip(labels, curves):
        cells = [best_within(points, m) for m in BUDGETS_MIN]
        text = [f"{c:.3f}" if c is not None else "-" for c in cells]
        lines.append(
            f"| {label} | " + " | ".join(text) + f" | {points[-1][1]:.3f} at {points[-1][0]:.0f} min |"
        )
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="training run directories (holding csv/metrics.csv)")
    parser.add_argument("--out", required=True, help="PNG file to write (the table goes beside it as .md)")
    parser.add_argument("--labels", nargs="*", help="one legend label per run (default: folder names)")
    args = parser.parse_args()
    run_cli(write_curve, args.runs, args.out, args.labels)


if __name__ == "__main__":
    main()
