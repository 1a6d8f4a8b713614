"""The benchmark suite: its measuring tools, its goal verdicts, and ``--quick`` end to end (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a folder of the repository, not of the installed package
    sys.path.insert(0, str(REPO))

from benchmarks.goals import fast_paths, goals  # noqa: E402
from benchmarks.measure import MemoryMeter, interleave  # noqa: E402
from benchmarks.report import write_docs  # noqa: E402
from seg_densenet.utils.hardware import cpu_has_int8_dot, native_bf16  # noqa: E402

GOAL_IDS = {
    "densenet_speed",
    "densenet_memory",
    "dense_unet",
    "fc103_memory",
    "fc56_volume",
    "dense_unet_volume",
    "recipe_volume",
    "ceiling_share",
    "dense_unet_vs_smp_latency",
    "data_vs_training",
}
linux_only = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak RSS"
)


@linux_only
def test_peak_rss_sees_an_allocation_made_and_freed_inside_the_call():
    meter = MemoryMeter(torch.device("cpu"))
    meter.reset()
    x = torch.ones(50_000_000)  # 200 MB, freed before the peak is read
    del x
    assert meter.peak() - meter.before > 190e6
    meter.reset()  # a fresh reset forgets it
    assert meter.peak() - meter.before < 50e6


def test_interleave_alternates_configurations_and_records_skips_and_failures():
    order: list[str] = []

    def call(name):
        def run():
            order.append(name)
            if name == "broken":
                raise RuntimeError("out of memory\nsecond line")

        return run

    names = ("a", "b", "skipped", "broken")
    results = interleave(
        {n: call(n) for n in names},
        dict.fromkeys(names, 4),
        torch.device("cpu"),
        warmup=1,
        repeats=2,
        skip_check=lambda name, done: "predicted too slow" if name == "skipped" else None,
    )
    assert order == ["a", "b", "broken", "a", "b", "a", "b", "a", "b"]
    # a warm-up round, a memory round, then two timed rounds that measure time only
    assert len(results["a"].cold_s) == 2 and len(results["a"].seconds) == 2
    assert len(results["a"].peak_bytes) == 1
    summary = results["a"].summary()
    assert (
        summary["status"] == "ok" and summary["items_per_s"] > 0 and summary["peak_gb"] >= summary["added_gb"]
    )
    assert results["skipped"].summary() == {
        "status": "skipped",
        "reason": "predicted too slow",
        "items_per_call": 4,
    }
    assert results["broken"].status == "failed" and results["broken"].reason == "RuntimeError: out of memory"


def test_interleave_without_warmup_adds_a_cold_memory_call_before_the_timed_one():
    order: list[str] = []
    calls = {n: (lambda n=n: order.append(n)) for n in ("a", "b")}
    results = interleave(calls, dict.fromkeys(calls, 1), torch.device("cpu"), warmup=0, repeats=1)
    assert order == ["a", "b", "a", "b"]
    assert [len(results["a"].cold_s), len(results["a"].seconds), len(results["a"].peak_bytes)] == [1, 1, 1]


def _config(items_per_s: float, peak_gb: float, batch: int = 8, size: int = 224) -> dict:
    return {
        "status": "ok",
        "batch": batch,
        "size": [size, size],
        "items_per_s": items_per_s,
        "median_s": batch / items_per_s,
        "peak_gb": peak_gb,
        "added_gb": peak_gb - 1.0,
    }


def test_goal_verdicts_follow_the_ratios_and_only_at_the_goals_setting():
    dn = {
        "torchvision plain": _config(1.0, 10.0),
        "ours plain": _config(1.1, 10.0),
        "ours memory-efficient": _config(0.9, 5.5),
    }
    fc = {"FC-DenseNet103 plain": _config(0.1, 10.0), "FC-DenseNet103 memory-efficient": _config(0.08, 6.0)}
    results = {"suites": {"train": {"densenet121": dn, "fc_densenet": fc}}}
    rows = {g["id"]: g for g in goals(results)}
    assert set(rows) == GOAL_IDS
    assert rows["densenet_speed"]["met"] is True and rows["densenet_speed"]["measured"] == "1.10x"
    assert rows["densenet_memory"]["met"] is True  # 0.55x memory at 0.90x speed
    assert rows["fc103_memory"]["met"] is False  # 0.60x > 0.5x
    assert rows["dense_unet"]["met"] is None and rows["dense_unet"]["measured"].startswith("not measured")
    # the same ratios at another batch size give no verdict
    dn["torchvision plain"] = _config(1.0, 10.0, batch=2)
    assert next(g for g in goals(results) if g["id"] == "densenet_speed")["met"] is None


def test_flop_counts_on_the_meta_device_match_the_arithmetic():
    from torch import nn
    from torchvision.models import densenet121

    from benchmarks.roofline import forward_gflop, training_gflop

    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    assert forward_gflop(conv, (2, 16, 20, 20)) == pytest.approx(2 * 2 * 16 * 32 * 9 * 20 * 20 / 1e9)
    # DenseNet-121 at 224x224: 2.87 G multiply-adds (Huang et al.), 2 FLOPs each
    assert forward_gflop(densenet121(), (1, 3, 224, 224)) == pytest.approx(5.67, abs=0.03)
    # the backward pass costs about twice the forward; the model itself is left as it was (no meta weights)
    from seg_densenet.models import DenseUNet

    net = DenseUNet(
        in_channels=1,
        num_classes=4,
        growth_rate=8,
        block_config=(2, 2, 2, 2),
        num_init_features=16,
        decoder_layers=(1, 1, 1, 1, 1),
        decoder_growth_rate=8,
    )
    forward = forward_gflop(net, (2, 1, 64, 64))
    plain = training_gflop(net, (2, 1, 64, 64))
    assert 2.5 * forward < plain < 3.5 * forward
    for m in net.modules():  # memory-efficient layers are counted as the plain network
        if hasattr(m, "memory_efficient"):
            m.memory_efficient = True
    assert training_gflop(net, (2, 1, 64, 64)) == pytest.approx(plain)
    assert next(net.parameters()).device.type == "cpu"


def test_ceiling_is_the_better_layout_and_rows_are_placed_under_it():
    from benchmarks.report import _ceiling_section, _group_table
    from benchmarks.roofline import CeilingPlan, conv_ceiling, place

    ceiling = conv_ceiling(
        torch.device("cpu"), CeilingPlan(batch=1, channels=16, size=16, warmup=0, repeats=1)
    )
    assert ceiling["gflop_per_s"] == max(ceiling["layouts_gflop_per_s"].values()) > 0
    assert place(2.0, 10.0, 40.0) == {"gflop_per_s": 20.0, "pct_of_ceiling": 50.0}
    assert place(None, 10.0, 40.0)["pct_of_ceiling"] is None
    suite_ceiling = {
        "fp32": {**ceiling, "gflop_per_s": 40.0},
        "bf16": {"status": "skipped", "reason": "no bf16"},
    }
    eager = {**_config(10.0, 2.0), "gflop_per_item": 2.0, "seconds": [0.8], "warmup_seconds": [0.9]}
    group = {"eager": eager, "bf16 autocast": {"status": "skipped", "reason": "emulated"}}
    table = _group_table(group, "eager", "slices", suite_ceiling)
    assert "| GFLOP per slice | GFLOP/s | % of ceiling |" in table and "| 2.00 | 20.00 | 50.00 |" in table
    assert "GFLOP" not in _group_table(group, "eager", "slices")  # old results files: no roofline columns
    section = "\n".join(_ceiling_section({"infer": {"ceiling": suite_ceiling}}))
    assert "### Roofline" in section and "| infer |" in section and "skipped: no bf16" in section


def test_ceiling_and_smp_goals():
    volume_shape = {"volume_shape": [256, 216, 10]}
    throughput = {
        "DenseUNet": {"eager": {**_config(20.0, 1.0, batch=2), "gflop_per_item": 7.4}},
        "smp Unet(densenet121)": {
            "eager": {**_config(8.0, 1.0, batch=2), "gflop_per_item": 12.7},
            "bf16 autocast": {**_config(80.0, 1.0, batch=2), "gflop_per_item": 12.7},
        },
    }
    volume = {
        "DenseUNet onnxruntime": {
            **_config(40.0, 1.0, batch=10),
            **volume_shape,
            "gflop_per_item": 8.5,
            "items_per_call": 10,
        }
    }
    results = {
        "threads": 2,
        "suites": {
            "infer": {"throughput": throughput, "volume": volume, "ceiling": {"fp32": {"gflop_per_s": 400.0}}}
        },
    }
    rows = {g["id"]: g for g in goals(results)}
    share = rows["ceiling_share"]
    # DenseUNet's best: ONNX Runtime on the volume (340 GFLOP/s = 85 %); smp's bf16 row is not held to fp32's
    assert (
        "DenseUNet 85% (DenseUNet onnxruntime)" in share["measured"]
        and "smp Unet(densenet121) 25% (eager)" in share["measured"]
    )
    assert share["met"] is False
    # smp at its fastest (bf16 here, 80 slices/s) against DenseUNet's 20: four times our latency
    smp = rows["dense_unet_vs_smp_latency"]
    assert smp["measured"] == "4.00x" and smp["met"] is False and "smp bf16 autocast" in smp["note"]
    assert (
        rows["dense_unet_volume"]["measured"] == "0.25 s onnxruntime"
        and rows["dense_unet_volume"]["met"] is True
    )
    # 85 GFLOP in 0.35 s needs 243 GFLOP/s: 61 % of a 400 GFLOP/s ceiling, beyond a 200 GFLOP/s one
    assert (
        "0.35 s needs 243 GFLOP/s, fp32 ceiling 400 GFLOP/s (61% of it)" in rows["dense_unet_volume"]["note"]
    )
    # a faster bf16 volume: it counts for the latency goal and as a fast path, not against fp32's ceiling
    volume["DenseUNet bf16 channels_last"] = {
        **volume["DenseUNet onnxruntime"],
        **_config(50.0, 1.0, batch=10),
    }
    rows = {g["id"]: g for g in goals(results)}
    assert "DenseUNet 85% (DenseUNet onnxruntime)" in rows["ceiling_share"]["measured"]
    assert rows["dense_unet_volume"]["measured"] == "0.25 s onnxruntime, 0.20 s bf16 channels_last"
    (bf16,) = [r for r in fast_paths(results) if r["path"].startswith("bf16 channels_last")]
    assert (
        bf16["measured"] == "1.25x faster than fp32's fastest (onnxruntime)"
        and bf16["verdict"] == "justified"
    )
    results["suites"]["infer"]["ceiling"]["fp32"]["gflop_per_s"] = 200.0
    note = next(g for g in goals(results) if g["id"] == "dense_unet_volume")["note"]
    assert "the physics forbids it on this machine (at 100% of the ceiling 0.42 s)" in note


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    scratch = tmp_path_factory.mktemp("bench_tmp")  # the run's TMPDIR: no exported model may stay there
    command = [sys.executable, "-m", "benchmarks.run", "--suite", "all", "--quick", "--threads", "1"]
    command += ["--out", str(out), "--docs", str(out / "benchmarks.md")]
    proc = subprocess.run(
        command,
        cwd=REPO,
        env=os.environ | {"OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(scratch.glob("bench-onnx-*")), "the benchmark left its ONNX exports behind"
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("quick_benchmark")  # one worker runs the module fixture once
def test_quick_run_writes_every_suite_to_the_results_file(quick_run):
    (path,) = quick_run.glob("*-quick.json")
    results = json.loads(path.read_text())
    assert path.name == f"{results['machine']['name']}-quick.json"
    assert results["quick"] is True and results["threads"] == 1
    assert {"cpu", "cores", "ram_gb", "torch", "node"} <= set(results["machine"])
    assert len(results["load_average"]["before"]) == 3 and len(results["load_average"]["after"]) == 3
    suites = results["suites"]
    assert set(suites) == {"train", "infer", "data", "scaling"}
    configs = [
        c
        for g in ("densenet121", "segmentation", "fc_densenet", "recipe")
        for c in suites["train"][g].values()
    ]
    configs += list(suites["data"]["loaders"].values()) + list(suites["scaling"]["dense_block"].values())
    for c in configs:
        assert c["status"] == "ok", c
        assert c["items_per_s"] > 0 and c["peak_gb"] >= c["added_gb"] >= 0
    assert {"eager", "channels_last", "bf16 autocast"} <= set(suites["infer"]["throughput"]["FC-DenseNet56"])
    # the roofline: every suite's ceiling, and FLOPs on every model row of the train and infer suites
    for suite in suites.values():
        assert suite["ceiling"]["fp32"]["gflop_per_s"] > 0 and suite["ceiling"]["bf16"]["status"] in (
            "ok",
            "skipped",
        )
    train_rows = [
        c
        for g in ("densenet121", "segmentation", "fc_densenet", "recipe")
        for c in suites["train"][g].values()
    ]
    # the recipe's step in both layouts, and under bf16 autocast exactly where the hardware has bf16
    recipe = suites["train"]["recipe"]
    assert {"recipe fp32", "recipe fp32, channels_last"} <= set(recipe)
    assert ("recipe, bf16 autocast, channels_last" in recipe) == native_bf16("cpu")
    assert all(c["gflop_per_item"] > 0 for c in train_rows)
    assert all(c["gflop_per_item"] > 0 for g in suites["infer"]["throughput"].values() for c in g.values())
    assert results["machine"]["cpu_flags"] is not None
    assert suites["infer"]["volume"]["FC-DenseNet56 eager"]["status"] == "ok"
    for c in suites["infer"]["compile"].values():  # the child either measured or says why not
        assert c["status"] == "ok" or c["reason"]
    assert {c["model"] for c in suites["scaling"]["models"].values()} == {
        "fc_densenet56",
        "fc_densenet67",
        "fc_densenet103",
    }
    assert {g["id"] for g in results["goals"]} == GOAL_IDS
    assert all(g["met"] is None for g in results["goals"])  # tiny sizes: no verdicts
    assert any(r["path"] == "channels_last" for r in results["fast_paths"])
    assert any(r["path"] == "channels_last" and "recipe" in r["where"] for r in results["fast_paths"])


@pytest.mark.slow
@pytest.mark.xdist_group("quick_benchmark")  # one worker runs the module fixture once
def test_quick_run_generates_the_page_and_the_report_regenerates_it(quick_run):
    page = (quick_run / "benchmarks.md").read_text()
    (path,) = quick_run.glob("*-quick.json")
    results = json.loads(path.read_text())
    assert f"`{results['command']}`" in page and "--suite all --quick" in results["command"]
    assert (
        results["machine"]["cpu"] in page and results["machine"]["torch"] in page and results["date"] in page
    )
    assert "shared with other work" in page and "no GPU was lent" in page
    assert "### Roofline" in page and "% of ceiling" in page and "CPU flags:" in page
    for goal in results["goals"]:
        assert goal["goal"] in page
    (plot,) = quick_run.glob("*-scaling.png")
    assert f"]({plot.name})" in page and plot.read_bytes().startswith(b"\x89PNG")
    again = write_docs(quick_run, quick_run / "again.md")  # from the results file alone
    assert again.read_text() == page


def test_memory_saving_path_is_kept_for_less_memory_at_the_same_speed():
    from benchmarks.goals import _memory_verdict

    assert _memory_verdict(0.94, 0.78) == "justified: 22% less peak memory for 6% less speed"
    assert _memory_verdict(0.85, 0.80) == "slower: not kept"
    assert _memory_verdict(0.96, 0.93) == "no gain"
    assert _memory_verdict(1.00, 1.00) == "no gain"
    assert _memory_verdict(1.10, 1.00) == "justified"


def test_interleave_stops_a_slow_configuration_after_its_memory_call():
    order: list[str] = []
    results = interleave(
        {"slow": lambda: order.append("slow")},
        {"slow": 1},
        torch.device("cpu"),
        warmup=2,
        repeats=3,
        max_call_s=0.0,
    )
    assert order == ["slow", "slow"]  # one warm-up call, then straight to the memory call
    slow = results["slow"]
    assert len(slow.peak_bytes) == 1 and len(slow.seconds) == 1 and len(slow.cold_s) == 1
    assert slow.reason.startswith("untimed call's time kept: stopped after 2 call(s)")


@pytest.mark.parametrize(
    ("flags", "bf16", "int8_dot"),
    [
        ("avx2 fma", False, False),
        ("avx512f avx512_vnni", False, True),
        ("avx512_bf16 amx_bf16 amx_int8", True, True),
    ],
)
def test_cpu_flags_decide_the_bf16_and_int8_paths(flags, bf16, int8_dot, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\nbugs\t\t: spectre_v1\n")
    assert native_bf16("cpu", str(cpuinfo)) is bf16
    assert cpu_has_int8_dot(str(cpuinfo)) is int8_dot
    assert not native_bf16("cpu", str(tmp_path / "missing")) and not cpu_has_int8_dot(
        str(tmp_path / "missing")
    )
