#!/usr/bin/env bash
# The project's GPU check, one script for any CUDA machine, offline included (issues 15 and 16):
#   1. the CUDA tests (pytest -m cuda: memory-efficient dense layers under bf16 autocast, parity with
#      plain mode, on the GPU);
#   2. python -m benchmarks.run --device cuda --quick (every suite at tiny sizes: a smoke test);
#   3. experiment=acdc_denseunet trainer=gpu on fold 0 of a local ACDC-layout folder for MINUTES minutes,
#      then its fold-0 test figures.
# Everything goes to $OUT (or /tmp/gpu_check): one results file, gpu_check.json (each step's status,
# seconds and figures), beside the logs. Default MINUTES=4: the whole check ends within 8 minutes.
#
#   bash scripts/gpu_check.sh [MINUTES] [hydra overrides for the training ...]
#   bash scripts/gpu_check.sh --dry-run DATA_DIR   # the same steps on the CPU at tiny sizes (tested)
# Environment: OUT, PYTHON (default python3), GPU_CHECK_DATA, GPU_CHECK_INSTALL=0 (no offline install),
# GPU_CHECK_BENCH_SUITE (default all).
#
# Packages: a machine without this project's dependencies installs them offline first, from
#   wheelhouse/ (make wheelhouse: every wheel, `pip install --no-index --find-links wheelhouse
#   -e '.[dev]'` there), or .whl/ (make gpu-bundle: the few packages the lent GPU machine lacks,
#   unpacked into /tmp/site beside its own torch). Data: DATA_DIR, else .gpu_data/acdc/training (the
#   lent copy packed by make gpu-bundle), else ../shared/data/acdc/training.
# On the lent device: carry [".whl", ".gpu_data"], timeout_s = 60 * (MINUTES + 4).
set -uo pipefail
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
    dry_run=1
    shift
fi
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
if [ $dry_run = 1 ]; then
    data=${1:?--dry-run needs DATA_DIR, an ACDC-layout folder (e.g. a generated phantom)}
    shift
    minutes=1
else
    minutes=${1:-4}
    shift || true
    data=${GPU_CHECK_DATA:-}
    for candidate in .gpu_data/acdc/training ../shared/data/acdc/training; do
        [ -z "$data" ] && [ -d "$candidate" ] && data=$candidate
    done
    [ -n "$data" ] || { echo "gpu_check: no data (set GPU_CHECK_DATA or run make gpu-bundle)" >&2; exit 2; }
fi
install=${GPU_CHECK_INSTALL:-1}   # 0: use the packages as installed
if [ "$install" = 1 ] && [ -d wheelhouse ] && ! $python -c "import seg_densenet, hydra, albumentations, pytest" 2>/dev/null; then
    $python -m pip install -q --no-index --find-links wheelhouse -e '.[dev]' || exit 2
elif [ "$install" = 1 ] && [ -d .whl ]; then
    $python -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/* || exit 2
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}

steps=()
step() {  # step NAME COMMAND...: run it, log to $out/NAME.log, record status and seconds
    local name=$1 start rc
    shift
    start=$(date +%s)
    "$@" > "$out/$name.log" 2>&1
    rc=$?
    steps+=("$name $rc $(( $(date +%s) - start ))")
    echo "gpu_check: $name exit $rc in $(( $(date +%s) - start )) s (log $out/$name.log)"
}

if [ $dry_run = 1 ]; then
    device=cpu
    train_args=(trainer=cpu data.crop_size=[64,64] data.augment_margin=0 data.batch_size=2 data.num_workers=0
                model.growth_rate=4 "model.block_config=[1,1,1,1]" model.num_init_features=8
                "model.decoder_layers=[1,1,1,1,0]" model.decoder_growth_rate=4
                trainer.max_epochs=1 ++trainer.limit_train_batches=2 data.cache_dir="$out/cache")
else
    device=cuda
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
    train_args=(trainer=gpu data.num_workers=8 data.cache_dir=/tmp/gpu_cache)
fi
step cuda_tests $python -m pytest -q -m cuda -p no:cacheprovider tests/test_densenet.py
step benchmark $python -m benchmarks.run --device $device --quick --suite "${GPU_CHECK_BENCH_SUITE:-all}" \
    --out "$out/bench" --docs "$out/bench/benchmarks.md"
# the experiment's schedule, with max_time as the hard stop of the stated budget
step train $python -m seg_densenet.train experiment=acdc_denseunet data.root="$data" \
    "+trainer.max_time=00:00:$(printf %02d "$minutes"):00" callbacks.progress_bar=null \
    hydra.run.dir="$out/run" "${train_args[@]}" "$@"

$python - "$out" "$device" "$minutes" "${steps[@]}" <<'PY'
import json, re, sys
from pathlib import Path

out, device, minutes, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
result = {"device": device, "training_minutes": minutes, "steps": {}}
gpu = out / "gpu.txt"
if gpu.is_file():
    result["gpu"] = gpu.read_text().strip()
for line in steps:
    name, rc, seconds = line.split()
    log = (out / f"{name}.log").read_text(errors="replace").strip().splitlines()
    result["steps"][name] = {"status": "ok" if rc == "0" else "failed", "exit": int(rc), "seconds": int(seconds),
                             "last_line": log[-1] if log else ""}
tests = result["steps"]["cuda_tests"]
counts = re.findall(r"(\d+) (passed|failed|skipped|error)", tests["last_line"])
tests["counts"] = {kind: int(n) for n, kind in counts}
bench = sorted((out / "bench").glob("*.json"))
if bench:
    data = json.loads(bench[-1].read_text())
    result["steps"]["benchmark"]["results_file"] = str(bench[-1])
    result["steps"]["benchmark"]["suites"] = sorted(data.get("suites", {}))
summary = out / "run" / "summary.json"
if summary.is_file():
    s = json.loads(summary.read_text())
    keys = ("val/dice_best", "test/dice", "test/dice_rv", "test/dice_myo", "test/dice_lv", "test/hd95")
    result["steps"]["train"]["metrics"] = {k: s["metrics"][k] for k in keys if k in s["metrics"]}
    result["steps"]["train"]["wall_time_s"] = s["wall_time_s"]
result["ok"] = all(step["status"] == "ok" for step in result["steps"].values())
(out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
metrics = result["steps"]["train"].get("metrics", {})
print(f"gpu_check ({device}): " + ", ".join(f"{n} {s['status']}" for n, s in result["steps"].items())
      + " | fold 0: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f" -> {out / 'gpu_check.json'}")
sys.exit(0 if result["ok"] else 1)
PY
