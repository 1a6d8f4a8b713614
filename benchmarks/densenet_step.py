"""Training-step speed and peak memory of DenseNet-121 on the CPU: torchvision vs seg_densenet.

One step is forward, cross-entropy, backward and an SGD update. The four configurations (torchvision
plain, torchvision memory-efficient, ours plain, ours memory-efficient) run interleaved in one process
after a warm-up, so background load hits them alike. Peak memory per step is the process's peak resident
set size (VmHWM), reset before the step by writing "5" to /proc/self/clear_refs after returning freed
heap memory to the OS (malloc_trim), so one configuration's leftovers do not count for the next.
By default glibc's mmap threshold is fixed at 128 KiB: every large tensor is then mapped and unmapped on
its own, so RSS follows the live tensors; with glibc's adaptive threshold (``--adaptive-malloc``) freed
tensors stay in the heap and the peak of a configuration depends on which ran before it.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/densenet_step.py --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import time

import torch
import torchvision

from seg_densenet.models.densenet import densenet121


def _fix_mmap_threshold(nbytes: int) -> None:
    M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes)
    except (OSError, AttributeError):
        print("not glibc: mmap threshold left as it is")


def _reset_peak_rss() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the reset below still works
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM in /proc/self/status")


def _set_memory_efficient(model: torch.nn.Module, value: bool) -> None:
    # Both implementations read the flag at run time from each dense layer (ours also per transition).
    for m in model.modules():
        if hasattr(m, "memory_efficient"):
            m.memory_efficient = value


def _step(model, optimizer, x, y) -> float:
    """One training step; returns seconds."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per configuration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adaptive-malloc", action="store_true", help="keep glibc's adaptive mmap threshold")
    args = parser.parse_args()
    if not args.adaptive_malloc:
        _fix_mmap_threshold(128 * 1024)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    reference = torchvision.models.densenet121(weights=None).train()
    ours = densenet121().train()
    ours.load_state_dict(reference.state_dict())
    optimizers = {id(m): torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in (reference, ours)}
    configs = {
        "torchvision plain": (reference, False),
        "torchvision mem-eff": (reference, True),
        "ours plain": (ours, False),
        "ours mem-eff": (ours, True),
    }
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    times: dict[str, list[float]] = {name: [] for name in configs}
    peaks: dict[str, list[float]] = {name: [] for name in configs}
    for repeat in range(args.warmup + args.repeats):
        for name, (model, memory_efficient) in configs.items():
            _set_memory_efficient(model, memory_efficient)
            _reset_peak_rss()
            seconds = _step(model, optimizers[id(model)], x, y)
            peak = _peak_rss_gb()
            if repeat >= args.warmup:
                times[name].append(seconds)
                peaks[name].append(peak)

    base_speed = args.batch / statistics.median(times["torchvision plain"])
    base_peak = max(peaks["torchvision plain"])
    malloc = "adaptive" if args.adaptive_malloc else "fixed 128 KiB"
    print(
        f"DenseNet-121 training step, batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, "
        f"median of {args.repeats} steps after {args.warmup} warm-up, glibc mmap threshold {malloc}"
    )
    print(f"{'configuration':<22}{'img/s':>8}{'peak RSS GB':>13}{'speed ratio':>13}{'memory ratio':>14}")
    for name in configs:
        speed = args.batch / statistics.median(times[name])
        peak = max(peaks[name])
        print(f"{name:<22}{speed:>8.2f}{peak:>13.2f}{speed / base_speed:>13.2f}{peak / base_peak:>14.2f}")


if __name__ == "__main__":
    main()
