"""The benchmark suite: ``python -m benchmarks.run --suite all|train|infer|data|scaling [--device cpu|cuda] [--quick]``.

Suites: ``train`` (training step: DenseNet-121 against torchvision, segmentation networks against smp,
plain and memory-efficient), ``infer`` (slices/s and whole-volume latency; channels_last, bf16,
torch.compile), ``data`` (loader slices/s from the cache), ``scaling`` (memory and time against depth and
image size). Results go to ``<out>/<machine>.json`` (``-quick`` appended in quick mode); running one suite
replaces only its part of an existing file. docs/benchmarks.md is then regenerated from the results.
``--quick`` runs every suite at tiny sizes as a smoke test (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks import data_loading, inference, roofline, scaling, training
from benchmarks.goals import fast_paths, goals
from benchmarks.measure import load_average, machine_info
from benchmarks.report import DOCS, RESULTS, write_docs
from seg_densenet.utils.atomic import atomic_write_text

SUITES = ("train", "infer", "data", "scaling")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("all", *SUITES), default="all")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one call each: a smoke test")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results files and plots")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the generated page")
    return parser.parse_args(argv)


def _run_suite(name: str, plan_key: str, device: torch.device, threads: int, log) -> dict:
    if name == "train":
        return training.run(training.PLANS[plan_key], device, log)
    if name == "infer":
        return inference.run(inference.PLANS[plan_key], device, threads, log)
    if name == "data":
        return data_loading.run(data_loading.PLANS[plan_key], device, log)
    return scaling.run(scaling.PLANS[plan_key], device, log)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device on this machine")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    # The imports' half a million objects never become garbage: frozen, they are left out of the
    # gc.collect() before every measured call (0.4 s each on a 2-core EPYC, now microseconds).
    gc.freeze()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the infer suite measures it against off
    plan_key = "quick" if args.quick else ("cuda" if device.type == "cuda" else "full")
    machine = machine_info(device)
    path = args.out / f"{machine['name']}{'-quick' if args.quick else ''}.json"
    results: dict = {"suites": {}}
    if args.suite != "all" and path.exists():
        results = json.loads(path.read_text())  # keep the other suites' results
    command = shlex.join(["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    results |= {
        "schema": 1,
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "threads": args.threads,
        "quick": args.quick,
        "load_average": {"before": load_average()},
    }
    begin = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - begin:7.1f} s] {message}", file=sys.stderr, flush=True)

    for name in SUITES if args.suite == "all" else (args.suite,):
        start, load = time.perf_counter(), load_average()
        log(f"{name}: the machine's ceiling (a large 3x3 convolution) ...")
        ceiling = roofline.measure(device, plan_key)  # under the load the suite's rows will see
        suite = _run_suite(name, plan_key, device, args.threads, log)
        suite["ceiling"] = ceiling
        suite["meta"] = {
            "command": command,
            "wall_s": round(time.perf_counter() - start, 1),
            "date": results["date"],
            "load_average": {"before": load, "after": load_average()},
        }
        results["suites"][name] = suite
        log(f"{name} done in {suite['meta']['wall_s']:.0f} s")
    results["wall_s"] = round(time.perf_counter() - begin, 1)
    results["load_average"]["after"] = load_average()
    results["goals"] = goals(results)
    results["fast_paths"] = fast_paths(results)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=1) + "\n")
    docs = write_docs(args.out, args.docs)
    log(f"wrote {path} and {docs}")
    return path


if __name__ == "__main__":
    main()
