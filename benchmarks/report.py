"""docs/benchmarks.md and the scaling plots, generated from the results files.

``python -m benchmarks.report [--results DIR] [--docs PATH]`` rewrites the page from every
``DIR/*.json`` without measuring anything (``python -m benchmarks.run`` does this after each run).
Results of ``--quick`` runs are smoke tests and are left out when full results exist.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path

from benchmarks.goals import fast_paths, goals
from benchmarks.measure import CPU_FLAGS
from benchmarks.roofline import place
from seg_densenet.utils.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOCS = REPO / "docs" / "benchmarks.md"

METHOD = """\
Each comparison runs in one process with its configurations interleaved (A, B, A, B, ...) after the
stated warm-up rounds, so background load hits all of them alike; speed is the median over the measured
calls (images/s, slices/s), and ratios always divide two configurations of the same interleaved run.
Time and memory come from separate calls of the same run: after the warm-up rounds one round
measures memory, then the timed rounds follow (the *calls* column counts untimed + timed calls). On
the CPU the untimed calls run in a worker thread under the memory setting below, so that heap memory
freed by the timed calls (in the main thread's malloc arena) cannot be reused unseen by a later
memory call. Peak memory on the
CPU is the process's peak resident set size (`VmHWM`), reset before the call through
`/proc/self/clear_refs`, with glibc's mmap threshold pinned at 128 KiB so that freed tensors go back to
the OS at once; *added* is the peak minus the resident memory just before the call (what the step
itself needed: activations, gradients, workspace). Timed calls run with the thresholds glibc's adaptive
setting reaches in a training loop (mmap 32 MiB, trim 64 MiB), as in a user's process: under the
128 KiB pin every large tensor costs a fresh mapping and its page faults, which slowed a DenseUNet step
by 40 % and the allocation-heavy memory-efficient paths the most. On a GPU the peak is
`torch.cuda.max_memory_allocated`. Configurations predicted to take longer than the suite's limit per
call, or to need more memory, are skipped and listed with the prediction. Steps of the FC-DenseNets
take half a minute to a minute on this machine, so they run one cold memory call and one timed call each
(their goal is a memory ratio).
"""


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2g}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ceiling_for(config_name: str, ceiling: Mapping | None) -> float | None:
    """The ceiling a row is held against: bf16's for bf16 rows where it was measured, else fp32's."""
    if not ceiling:
        return None
    kind = "bf16" if "bf16" in config_name and ceiling.get("bf16", {}).get("status") == "ok" else "fp32"
    return ceiling.get(kind, {}).get("gflop_per_s")


def _group_table(group: Mapping, reference: str | None, unit: str, ceiling: Mapping | None = None) -> str:
    """One row per configuration; ratios against ``reference`` (a configuration of the same group); with
    the suite's ``ceiling`` (:mod:`benchmarks.roofline`), each row's GFLOP/s and share of it."""
    ref = group.get(reference, {}) if reference else {}
    ref_ok = ref.get("status") == "ok"
    configs = {n: c for n, c in group.items() if isinstance(c, Mapping) and "status" in c}
    roofline = ceiling is not None and any(c.get("gflop_per_item") for c in configs.values())
    rows = []
    for name, c in configs.items():
        flops = []
        if roofline:
            placed = place(c.get("gflop_per_item"), c.get("items_per_s"), _ceiling_for(name, ceiling))
            flops = [c.get("gflop_per_item"), placed["gflop_per_s"], placed["pct_of_ceiling"]]
        if c["status"] != "ok":
            rows.append([name, *["-"] * 7, *flops, f"{c['status']}: {c.get('reason', '')}"])
            continue
        speed = c["items_per_s"] / ref["items_per_s"] if ref_ok else None
        memory = c["peak_gb"] / ref["peak_gb"] if ref_ok else None
        calls = f"{len(c['warmup_seconds'])} + {len(c['seconds'])}"
        rows.append(
            [
                name,
                c["items_per_s"],
                c["median_s"],
                c["peak_gb"],
                c["added_gb"],
                speed,
                memory,
                calls,
                *flops,
                c.get("reason", ""),
            ]
        )
    header = [
        "configuration",
        f"{unit}/s",
        "median s",
        "peak GB",
        "added GB",
        "speed ratio",
        "memory ratio",
        "warm-up + measured",
        *([f"GFLOP per {unit[:-1]}", "GFLOP/s", "% of ceiling"] if roofline else []),
        "note",
    ]
    return _table(header, rows)


def _ceiling_section(suites: Mapping) -> list[str]:
    """Each suite's ceiling, measured before its rows: GFLOP/s of one large 3x3 convolution."""
    rows = []
    for name, suite in suites.items():
        c = suite.get("ceiling")
        if not c:
            continue
        fp32, bf16 = c["fp32"], c.get("bf16", {})
        layouts = fp32["layouts_gflop_per_s"]
        shape = (
            f"{fp32['batch']}x{fp32['channels']}x{fp32['size']}x{fp32['size']}, {fp32['channels']} filters"
        )
        bf16_text = (
            bf16["gflop_per_s"]
            if bf16.get("status") == "ok"
            else f"{bf16.get('status')}: {bf16.get('reason', '')}"
        )
        rows.append([name, shape, layouts.get("NCHW"), layouts.get("NHWC"), fp32["gflop_per_s"], bf16_text])
    if not rows:
        return []
    return [
        "",
        "### Roofline",
        "",
        "Before its rows, each suite measures the machine's ceiling under the same load: GFLOP/s of a "
        "large 3x3 convolution (`benchmarks/roofline.py`), fp32 in both layouts (the better is the ceiling) "
        "and bf16 where the hardware has it. The tables below give each row's FLOPs per item "
        "(`torch.utils.flop_counter` on the `meta` device; a multiply-add is 2 FLOPs; training: forward and "
        "backward of the plain network), its GFLOP/s and its share of the ceiling.",
        "",
        _table(
            [
                "suite",
                "convolution (batch x channels x H x W)",
                "fp32 NCHW GFLOP/s",
                "fp32 NHWC GFLOP/s",
                "fp32 ceiling",
                "bf16 ceiling",
            ],
            rows,
        ),
    ]


def _scaling_panels(scaling: Mapping) -> list[tuple[str, dict, str]]:
    """The plot's three columns: (title, configurations, x-axis key of the configurations)."""
    block = scaling.get("dense_block", {})
    models = scaling.get("models", {})
    plan = scaling.get("plan", {})
    return [
        ("dense block length (layers)", {n: c for n, c in block.items()}, "layers"),
        (
            f"FC-DenseNet depth at {plan.get('depth_size')}x{plan.get('depth_size')}",
            {n: c for n, c in models.items() if f" {plan.get('depth_size')}x" in n},
            "depth",
        ),
        (
            f"{plan.get('size_model')}: image size (pixels)",
            {n: c for n, c in models.items() if n.startswith(str(plan.get("size_model")) + " ")},
            "pixels",
        ),
    ]


def _reference_curve(ax, xs: list, added_gb: float, mode: str) -> None:
    """Memory over block lengths ``xs`` (layers, ascending), through ``added_gb`` (GB) at the longest:
    c*L^2 for ``plain`` (stores every concatenation), else c*L (new maps only)."""
    power = 2 if mode == "plain" else 1
    scale = added_gb / xs[-1] ** power
    fine = [xs[0] + (xs[-1] - xs[0]) * i / 50 for i in range(51)]
    label = "reference c*L^2" if power == 2 else "reference c*L"
    ax.plot(
        fine,
        [scale * x**power for x in fine],
        ":",
        color="grey" if power == 2 else "black",
        label=label,
    )


def _plot_panel(top, bottom, title: str, configs: Mapping, key: str) -> None:
    """Memory added (GB, ``top``) and step time (s, ``bottom``) against ``key``, plain and memory-efficient."""
    for mode, style in (("plain", "o-"), ("memory-efficient", "s-")):
        points = sorted(
            (c[key], c) for n, c in configs.items() if n.endswith(mode) and c.get("status") == "ok"
        )
        if not points:
            continue
        xs = [p[0] for p in points]
        top.plot(xs, [p[1]["added_gb"] for p in points], style, label=mode)
        bottom.plot(xs, [p[1]["median_s"] for p in points], style, label=mode)
        if key == "layers" and len(points) > 1:
            _reference_curve(top, xs, points[-1][1]["added_gb"], mode)
    top.set_title(title, fontsize=10)
    top.set_ylabel("memory added by a training step (GB)")
    bottom.set_ylabel("step time (s)")
    bottom.set_xlabel(key)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def scaling_plot(results: Mapping, path: Path) -> Path | None:
    """Memory and step time against dense-block length, model depth and image size (PNG at ``path``)."""
    scaling = results.get("suites", {}).get("scaling")
    if not scaling:
        return None
    from seg_densenet.utils.figures import new_figure, save_png

    fig = new_figure(13, 7.5)
    axes = fig.subplots(2, 3)
    for col, (title, configs, key) in enumerate(_scaling_panels(scaling)):
        _plot_panel(axes[0, col], axes[1, col], title, configs, key)
    fig.suptitle(
        f"Training-step memory and time, plain against memory-efficient ({results['machine']['name']})"
    )
    save_png(fig, path, dpi=90)
    return path


def _run_facts(results: Mapping, metas: Mapping[str, Mapping]) -> list[str]:
    """The bullet list: command, date, machine, software, threads, load and caveats of the run."""
    m = results["machine"]
    load = results.get("load_average", {})
    commands = {meta.get("command", results["command"]) for meta in metas.values()}
    total = sum(meta.get("wall_s", 0.0) for meta in metas.values())
    out = [f"- Command: {', then '.join(f'`{c}`' for c in sorted(commands))}"]
    out.append(f"- Date: {results['date']} (wall time of the suites below: {total / 60:.1f} min)")
    machine = f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM"
    if m.get("gpu"):
        machine += f"; GPU {m['gpu']} (CUDA {m.get('cuda')})"
    if "cpu_flags" in m:
        machine += f"; CPU flags: {', '.join(m['cpu_flags']) or 'none of those listed'}"
        machine += f" (of {', '.join(CPU_FLAGS)})"
    out.append(f"- Machine: {machine}; node `{m['node']}`; {m['os']}")
    out.append(
        f"- Software: Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, smp {m['smp']}"
    )
    out.append(
        f"- Threads: `torch.set_num_threads({results['threads']})`; device `{m['device']}`; suites: {', '.join(results['suites'])}"
    )
    out.append(
        f"- Load average (1, 5, 15 min) before: {load.get('before')}, after: {load.get('after')}. "
        "The machine was shared with other work during the run, so absolute speeds are low and noisy; "
        "the ratios come from interleaved configurations and are the figures to read."
    )
    if m["device"] != "cuda":
        out.append(
            "- GPU figures are not measured: no GPU was lent for this run. `--device cuda` runs the same suites "
            "with `torch.cuda.synchronize`, `torch.cuda.max_memory_allocated`, `cudnn.benchmark` and pinned memory."
        )
    if results.get("quick"):
        out.append("- **Quick mode** (tiny sizes, a smoke test): the numbers say nothing about speed.")
    return out


def _runs_table(results: Mapping, metas: Mapping[str, Mapping]) -> str:
    """One row per suite: its command, date, wall time and load average."""
    runs = [
        [
            name,
            f"`{meta.get('command', results['command'])}`",
            meta.get("date"),
            meta.get("wall_s"),
            str(meta.get("load_average", {}).get("before")),
            str(meta.get("load_average", {}).get("after")),
        ]
        for name, meta in metas.items()
    ]
    return _table(["suite", "command", "date", "wall s", "load before", "load after"], runs)


def _goals_section(results: Mapping) -> list[str]:
    """The goals table (:func:`benchmarks.goals.goals`)."""
    met_text = {True: "met", False: "**not met**", None: "-"}
    rows = [[g["goal"], g["measured"], met_text[g["met"]], g["note"]] for g in goals(results)]
    return ["", "### Goals", "", _table(["goal", "measured", "met", "note"], rows)]


def _fast_paths_section(results: Mapping) -> list[str]:
    """The fast-path verdicts (:func:`benchmarks.goals.fast_paths`) and the rule they follow."""
    rows = [[r["path"], r["where"], r["measured"], r["verdict"]] for r in fast_paths(results)]
    return [
        "",
        "### Fast paths",
        "",
        "Kept only where the numbers justify them: at least 1.05x faster, or, for a memory-saving path, at least 10% less peak memory for at most 10% less speed.",
        "",
        _table(["fast path", "where", "measured", "verdict"], rows),
    ]


# (title, group of the train suite, reference configuration of the group)
TRAINING_GROUPS = (
    ("DenseNet-121", "densenet121", "torchvision plain"),
    ("Segmentation", "segmentation", "smp Unet(densenet121)"),
    ("FC-DenseNet", "fc_densenet", "FC-DenseNet103 plain"),
    ("Real-heart recipe (`experiment=acdc_recipe_cpu`: its model, batch and crop)", "recipe", "recipe fp32"),
)


def _training_section(t: Mapping) -> list[str]:
    """The train suite: one table per group of models."""
    plan = t["plan"]
    out = ["", "### Training step", ""]
    out.append(
        f"One step = forward, cross-entropy, backward, SGD update. DenseNet-121: batch {plan['batch']}, "
        f"{plan['size']}x{plan['size']}, 3 channels, 1000 classes, same weights; segmentation: 1 channel, 4 classes."
    )
    for title, group, reference in TRAINING_GROUPS:
        if group not in t:  # a results file from before the group existed
            continue
        out += [
            "",
            f"{title} (ratios against {reference}):",
            "",
            _group_table(t[group], reference, "images", t.get("ceiling")),
        ]
    return out


def _compile_table(compiled: Mapping) -> str:
    """One row per model: compile time and eager against compiled slices/s."""
    rows = []
    for name, c in compiled.items():
        if c.get("status") == "ok":
            e, k = c["eager"], c["compiled"]
            rows.append(
                [
                    name,
                    c["compile_s"],
                    e["items_per_s"],
                    k["items_per_s"],
                    k["items_per_s"] / e["items_per_s"],
                    "ok",
                ]
            )
        else:
            rows.append([name, "-", "-", "-", "-", f"{c['status']}: {c.get('reason', '')}"])
    return _table(["model", "compile s", "eager slices/s", "compiled slices/s", "ratio", "status"], rows)


def _inference_section(i: Mapping) -> list[str]:
    """The infer suite: throughput per model, whole-volume latency, ``torch.compile``."""
    plan = i["plan"]
    out = ["", "### Inference", ""]
    out.append(
        f"Eval mode under `torch.inference_mode`; slices/s on batches of {plan['batch']} slices of "
        f"{plan['size']}x{plan['size']}; ratios against fp32 eager. CPU has native bf16: {i.get('cpu_native_bf16', '-')}."
    )
    for name, group in i["throughput"].items():
        out += ["", f"{name}:", "", _group_table(group, "eager", "slices", i.get("ceiling"))]
    shape = plan["volume_shape"]
    out += [
        "",
        f"Whole volume ({shape[0]}x{shape[1]} in-plane, {shape[2]} slices) through `Predictor.predict` "
        "(preprocessing, network, inverse mapping; no TTA; model loading excluded):",
        "",
        _group_table(i["volume"], None, "slices", i.get("ceiling")),
    ]
    out += ["", "`torch.compile` (child process, time-boxed; compile time excluded from slices/s):", ""]
    out.append(_compile_table(i["compile"]))
    return out


def _data_section(d: Mapping) -> list[str]:
    """The data suite: one epoch of the training loader per worker setting."""
    plan = d["plan"]
    out = ["", "### Data", ""]
    out.append(
        f"`SegmentationDataModule.train_dataloader()` over a {plan['patients']}-patient synthetic phantom, "
        f"crop {plan['crop']}x{plan['crop']}, batch {plan['batch']}, augmentation `{d['augmentation']}`, from "
        f"the filled cache (filling it took {d['cache_fill_s']:.1f} s); one call = one epoch. Ratios against 0 workers."
    )
    return out + ["", _group_table(d["loaders"], "0 workers", "slices")]


def _scaling_section(s: Mapping, docs_path: Path, plot: Path | None) -> list[str]:
    """The scaling tables, with ``plot`` linked relative to the page at ``docs_path``."""
    plan = s["plan"]
    out = ["", "### Scaling", ""]
    out.append(
        f"Training steps at batch {plan['batch']} (dense block: batch {plan['block_batch']}, "
        f"{plan['block_size']}x{plan['block_size']}, 48 input maps, k=16). The plain dense block stores "
        "every layer's concatenation and BN output, so its memory grows with the square of its length; "
        "the memory-efficient one stores only the new maps and grows linearly. Whole FC-DenseNets mix "
        "block lengths and widths, and all memory grows linearly with the pixel count."
    )
    if plot is not None:
        rel = os.path.relpath(plot, docs_path.parent)
        out += ["", f"![scaling]({rel})"]
    out += ["", "Dense block:", "", _group_table(s["dense_block"], None, "images")]
    out += ["", "FC-DenseNets:", "", _group_table(s["models"], None, "images")]
    return out


def _machine_section(results: Mapping, docs_path: Path, plot: Path | None) -> str:
    """One results file's part of the page: the run, its goals and fast paths, then each suite's tables."""
    metas = {name: suite.get("meta", {}) for name, suite in results["suites"].items()}
    out = [f"## {results['machine']['name']}", "", *_run_facts(results, metas)]
    out += ["", _runs_table(results, metas)]
    out += _goals_section(results) + _fast_paths_section(results) + _ceiling_section(results["suites"])
    suites = results["suites"]
    if "train" in suites:
        out += _training_section(suites["train"])
    if "infer" in suites:
        out += _inference_section(suites["infer"])
    if "data" in suites:
        out += _data_section(suites["data"])
    if "scaling" in suites:
        out += _scaling_section(suites["scaling"], docs_path, plot)
    return "\n".join(out)


def render(results_list: list[Mapping], docs_path: Path, plots: list[Path | None]) -> str:
    head = [
        "# Benchmarks",
        "",
        "<!-- generated by `python -m benchmarks.run` (or `python -m benchmarks.report`) from "
        "benchmarks/results/*.json: do not edit by hand -->",
        "",
        "Run: `python -m benchmarks.run --suite all|train|infer|data|scaling [--device cpu|cuda] [--quick]`; "
        "results go to `benchmarks/results/<machine>.json` and this page is regenerated from them "
        "(`python -m benchmarks.report` rewrites it without measuring).",
        "",
        METHOD,
    ]
    sections = [_machine_section(r, docs_path, p) for r, p in zip(results_list, plots)]
    return "\n".join(head) + "\n" + "\n\n".join(sections) + "\n"


def load_results(results_dir: Path) -> list[dict]:
    """Every results file in ``results_dir``; quick-mode ones only when there is nothing else."""
    found = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    full = [r for r in found if not r.get("quick")]
    return full or found


def write_docs(results_dir: Path = RESULTS, docs_path: Path = DOCS) -> Path:
    """Plots next to the results files, then the page at ``docs_path``; returns ``docs_path``."""
    results_list = load_results(results_dir)
    plots = [
        scaling_plot(
            r, results_dir / f"{r['machine']['name']}{'-quick' if r.get('quick') else ''}-scaling.png"
        )
        for r in results_list
    ]
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(docs_path, render(results_list, docs_path, plots))
    return docs_path


def main() -> None:
    parser = argparse.ArgumentParser(description="Regenerate docs/benchmarks.md from the results files.")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--docs", type=Path, default=DOCS)
    args = parser.parse_args()
    print(write_docs(args.results, args.docs))


if __name__ == "__main__":
    main()
