#!/usr/bin/env bash
# The project's GPU check: trains experiment=acdc_denseunet trainer=gpu on fold 0 of the lent ACDC copy
# for a stated number of minutes on a lent CUDA machine and prints the fold-0 figures.
#
# Here, once (CPU machine):  make gpu-bundle
#   .whl/      the Python 3.12 wheels the device lacks (hydra-core, albumentations, smp, nibabel, ...)
#   .gpu_data/ the ACDC copy packed to 8-bit levels (45 MiB; benchmarks/gpu_bundle.py)
# There, one device run (carry [".whl", ".gpu_data"], timeout_s = 60 * (MINUTES + 4)):
#   bash benchmarks/gpu_check.sh 8
# Extra arguments after MINUTES are Hydra overrides (e.g. model.memory_efficient=false).
# Everything it writes goes to $OUT (the device tool's folder) or /tmp/gpu_check.
set -euo pipefail
minutes=${1:-8}
shift || true
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__, 'cuda', torch.version.cuda)"
root=.gpu_data/acdc/training
[ -d "$root" ] || root=../shared/data/acdc/training
# the experiment's 60 epochs, with max_time as the hard stop of the stated budget
python3 -m seg_densenet.train experiment=acdc_denseunet trainer=gpu \
    data.root="$root" data.cache_dir=/tmp/gpu_cache data.num_workers=8 \
    "+trainer.max_time=00:00:$(printf %02d "$minutes"):00" \
    callbacks.progress_bar=null hydra.run.dir="$out/run" "$@" 2>&1 | tee "$out/train.log"
python3 - "$out/run" <<'PY'
import json, sys
summary = json.load(open(f"{sys.argv[1]}/summary.json"))
m = summary["metrics"]
keys = ["val/dice_best", "test/dice", "test/dice_rv", "test/dice_myo", "test/dice_lv", "test/hd95"]
print("GPU check, fold 0:", ", ".join(f"{k} {m[k]:.4f}" for k in keys if k in m),
      f"| wall {summary['wall_time_s']:.0f} s")
PY
