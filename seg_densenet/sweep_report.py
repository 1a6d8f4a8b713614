"""Sweep report: ``python -m seg_densenet.sweep_report DIR`` (also written at the end of every multirun).

Reads each job's ``summary.json`` and ``.hydra/overrides.yaml`` under a sweep folder and writes
``sweep.csv`` (a row per job: job, overrides, metrics), ``sweep.md`` (jobs ranked by the optimised
metric) and ``sweep.png`` (the metric against each swept parameter).

``--x PARAM --group PARAM --out FILE.png`` instead draws the metric against one parameter with a line
per value of another, over the jobs of one or more sweep folders, and writes the same numbers as a
Markdown table beside the plot (``FILE.md``), e.g. test Dice against the number of labelled patients,
one line per task::

    python -m seg_densenet.sweep_report outputs/scarce_n5 outputs/scarce_n3_n10 --metric test/dice \
        --x data.labelled_patients --group task --out docs/figures/label_scarce.png
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from seg_densenet.errors import SegDenseNetError
from seg_densenet.utils.atomic import atomic_write_text
from seg_densenet.utils.cli import run_cli

DEFAULT_METRIC = "val/dice_best"


def collect_jobs(sweep_dir: Path) -> list[dict]:
    """One dict per finished job: ``{"job", "params": {override: value}, "metrics": {...}}``."""
    jobs = []
    for summary_path in sorted(sweep_dir.glob("*/summary.json"), key=lambda p: _job_key(p.parent.name)):
        job_dir = summary_path.parent
        overrides_path = job_dir / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_path) if overrides_path.is_file() else []
        params = {}
        for item in overrides:
            key, _, value = str(item).partition("=")
            params[key.lstrip("+~")] = value
        summary = json.loads(summary_path.read_text())
        jobs.append({"job": job_dir.name, "params": params, "metrics": summary.get("metrics", {})})
    return jobs


def write_report(sweep_dir: str | Path, metric: str = DEFAULT_METRIC) -> Path:
    """Write ``sweep.csv``, ``sweep.md`` and ``sweep.png`` into ``sweep_dir``; returns the CSV path."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SegDenseNetError(f"{sweep_dir}: sweep folder not found")
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        raise SegDenseNetError(f"{sweep_dir}: no finished job (no */summary.json)")
    params = sorted({k for j in jobs for k in j["params"]})
    swept = [k for k in params if len({j["params"].get(k) for j in jobs}) > 1]
    metric_names = sorted({k for j in jobs for k in j["metrics"]})

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["job", *params, *metric_names])
    for j in jobs:
        writer.writerow(
            [
                j["job"],
                *(j["params"].get(k, "") for k in params),
                *(j["metrics"].get(m, "") for m in metric_names),
            ]
        )
    atomic_write_text(sweep_dir / "sweep.csv", buffer.getvalue())

    ranked = sorted(jobs, key=lambda j: -float(j["metrics"].get(metric, float("-inf"))))
    lines = [
        f"# Sweep {sweep_dir}",
        "",
        f"{len(jobs)} jobs, ranked by `{metric}`.",
        "",
        "| rank | job | " + " | ".join(f"`{k}`" for k in swept or params) + f" | `{metric}` |",
        "|" + " --- |" * (3 + len(swept or params)),
    ]
    for rank, j in enumerate(ranked, 1):
        value = j["metrics"].get(metric)
        shown = f"{value:.4f}" if isinstance(value, int | float) else "-"
        cells = " | ".join(str(j["params"].get(k, "")) for k in swept or params)
        lines.append(f"| {rank} | {j['job']} | {cells} | {shown} |")
    atomic_write_text(sweep_dir / "sweep.md", "\n".join(lines) + "\n")
    _plot(sweep_dir / "sweep.png", jobs, swept or params, metric)
    return sweep_dir / "sweep.csv"


def _plot(path: Path, jobs: list[dict], params: list[str], metric: str) -> None:
    from seg_densenet.utils.figures import new_figure, save_png

    n = max(len(params), 1)
    fig = new_figure(4 * n, 3.2)
    axes = fig.subplots(1, n, squeeze=False)
    for ax, param in zip(axes[0], params or ["job"]):
        xs = [j["params"].get(param, j["job"]) for j in jobs]
        ys = [float(j["metrics"].get(metric, float("nan"))) for j in jobs]
        try:
            xs_num = [float(x) for x in xs]
            ax.scatter(xs_num, ys)
            if len(set(xs_num)) > 1 and min(xs_num) > 0 and max(xs_num) / min(xs_num) >= 10:
                ax.set_xscale("log")
        except ValueError:  # categorical parameter
            ax.scatter([str(x) for x in xs], ys)
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    save_png(fig, path)


def write_lines(sweep_dirs: list[str | Path], metric: str, x: str, group: str, out: str | Path) -> Path:
    """``out`` (PNG): ``metric`` against parameter ``x``, one line per value of parameter ``group``,
    over the finished jobs of ``sweep_dirs``; ``out`` with suffix ``.md``: the same as a table."""
    jobs = [j for d in sweep_dirs for j in collect_jobs(Path(d))]
    table: dict[str, dict[float, float]] = {}
    for j in jobs:
        if x in j["params"] and group in j["params"] and metric in j["metrics"]:
            table.setdefault(j["params"][group], {})[float(j["params"][x])] = float(j["metrics"][metric])
    if not table:
        raise SegDenseNetError(
            f"no finished job in {', '.join(map(str, sweep_dirs))} sets {x}, {group} and {metric}"
        )
    xs = sorted({v for line in table.values() for v in line})
    shown = [f"{v:g}" for v in xs]
    rows = [f"| `{group}` ↓ `{x}` → | " + " | ".join(shown) + " |", "|" + " --- |" * (len(xs) + 1)]
    rows += [
        f"| {name} | " + " | ".join(f"{line[v]:.3f}" if v in line else "-" for v in xs) + " |"
        for name, line in sorted(table.items())
    ]
    out = Path(out)
    atomic_write_text(out.with_suffix(".md"), f"{metric}\n\n" + "\n".join(rows) + "\n")
    from seg_densenet.utils.figures import new_figure, save_png

    fig = new_figure(5, 3.4)
    ax = fig.add_subplot()
    for name, line in sorted(table.items()):
        points = sorted(line.items())
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{group}={name}")
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.set_xticks(xs, shown)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, out)
    return out


def _job_key(name: str):
    return (0, int(name)) if name.isdigit() else (1, name)


class SweepReportCallback(Callback):
    """Hydra callback: writes the sweep report when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if list(sweep_dir.glob("*/summary.json")):
            path = write_report(sweep_dir, config.get("optimized_metric") or DEFAULT_METRIC)
            print(f"sweep report: {path.with_suffix('.md')}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m seg_densenet.sweep_report", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "sweep_dir", nargs="+", help="a multirun folder (multirun/<date>/<time>); several with --x"
    )
    parser.add_argument(
        "--metric", default=DEFAULT_METRIC, help=f"metric to rank by (default {DEFAULT_METRIC})"
    )
    parser.add_argument("--x", help="draw the metric against this parameter (with --group and --out)")
    parser.add_argument("--group", help="one line per value of this parameter")
    parser.add_argument("--out", help="the plot (PNG); its table goes beside it as .md")
    args = parser.parse_args(argv)
    if args.x or args.group or args.out:
        if not (args.x and args.group and args.out):
            parser.error("--x, --group and --out go together")
        path = run_cli(write_lines, args.sweep_dir, args.metric, args.x, args.group, args.out)
        print(f"wrote {path}, {path.with_suffix('.md')}")
        return
    if len(args.sweep_dir) > 1:
        parser.error("one sweep folder, or several with --x, --group and --out")
    path = run_cli(write_report, args.sweep_dir[0], args.metric)
    print(f"wrote {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
