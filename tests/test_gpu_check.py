"""The GPU check script (scripts/gpu_check.sh): its CPU dry run, end to end, and the offline wheelhouse plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_on_the_cpu_and_writes_one_results_file(tmp_path, synthetic_root):
    out = tmp_path / "out"
    env = os.environ | {
        "OUT": str(out),
        "PYTHON": sys.executable,
        "GPU_CHECK_INSTALL": "0",
        "GPU_CHECK_BENCH_SUITE": "data",  # the whole quick suite is tested in test_benchmarks.py
    }
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", str(synthetic_root)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["ok"] and result["device"] == "cpu"
    steps = result["steps"]
    assert list(steps) == ["cuda_tests", "benchmark", "train"]
    # the CUDA cases are selected and skip cleanly without a GPU; nothing else runs
    assert steps["cuda_tests"]["counts"]["skipped"] >= 3 and "passed" not in steps["cuda_tests"]["counts"]
    assert steps["benchmark"]["suites"] == ["data"] and Path(steps["benchmark"]["results_file"]).is_file()
    assert 0 <= steps["train"]["metrics"]["test/dice"] <= 1 and (out / "run" / "summary.json").is_file()
    assert "gpu_check (cpu): cuda_tests ok, benchmark ok, train ok | fold 0: " in proc.stdout


def test_gpu_check_without_data_says_so():
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "--dry-run needs DATA_DIR" in proc.stderr


def test_wheelhouse_plan_holds_the_closure_and_leaves_torch_out_on_request():
    def plan(*args: str) -> list[str]:
        command = [sys.executable, "scripts/wheelhouse.py", "--dry-run", "--python", "3.12", *args]
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [line.split("==")[0] for line in proc.stdout.splitlines()[1:]]

    everything = plan("--extras", "export", "dev")
    # runtime, export and test dependencies, transitively (omegaconf and antlr4 come through hydra-core)
    for name in ("torch", "hydra-core", "omegaconf", "antlr4-python3-runtime", "albumentations", "nibabel",
                 "onnxruntime", "pytest", "pytorch-lightning"):  # fmt: skip
        assert name in everything, name
    assert "seg-densenet" not in everything  # built from the checkout instead
    assert "aiohttp" in everything  # an extra a requirement asks for: pytorch-lightning needs fsspec[http]
    without = plan("--extras", "export", "--no-torch")
    assert "torch" not in without and "torchvision" not in without and "nibabel" in without
    assert not any(name.startswith("nvidia-") for name in without)
    assert plan("--only", "nibabel", "hydra-core") == ["hydra-core", "nibabel"]
