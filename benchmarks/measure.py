"""Timing and peak memory shared by the suites: interleaved rounds, peak RSS / CUDA peak, machine facts.

Time and memory are measured on separate calls, because on the CPU each needs its own allocator setting:

* Peak memory is the process's peak resident set size (``VmHWM``), reset before the call by writing "5"
  to ``/proc/self/clear_refs`` after freed heap memory is handed back to the OS (``malloc_trim``).
  For these calls glibc's mmap threshold is pinned at 128 KiB, so that every large tensor is mapped
  and unmapped on its own: RSS then follows the live tensors, and freed memory cannot hide inside a peak.
* Timed calls run with the thresholds where glibc's own adaptive setting settles in a training loop
  (mmap threshold 32 MiB, its 64-bit maximum; trim threshold twice that), so freed tensors are reused
  from the heap as in a user's process. With the 128 KiB pin every large tensor would instead cost a
  fresh mapping and its page faults: a DenseUNet training step took 6.6 s instead of 4.6 s, and
  allocation-heavy code (the memory-efficient paths) was slowed the most.

On a GPU the peak is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from seg_densenet.utils import hardware

GB = 1e9


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MEMORY_MMAP_THRESHOLD = 128 * 1024
STEADY_MMAP_THRESHOLD = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc


def set_malloc_mode(memory: bool) -> bool:
    """glibc's thresholds for a memory call (``memory=True``: every large tensor mapped on its own) or a
    timed call (the adaptive setting's steady state); False where not glibc (nothing changed)."""
    mmap = MEMORY_MMAP_THRESHOLD if memory else STEADY_MMAP_THRESHOLD
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 * mmap))
    except (OSError, AttributeError):
        return False


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


class MemoryMeter:
    """Peak memory of one call on ``device``: :meth:`reset` before, :meth:`peak` after (bytes).

    ``before`` is what was already in use at the reset (the models, their gradients and optimizer
    state, everything else in the process), so ``peak - before`` is what the call itself added.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before = 0

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the reset below still works
            pass
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self.before = _proc_status_kb("VmRSS") * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status_kb("VmHWM") * 1024


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that a wall-clock interval covers it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measurement:
    """Calls of one configuration: seconds, peak bytes and added bytes per measured call.

    ``items``: images or slices one call processes. ``status``: ``ok``, ``skipped`` or ``failed``
    (``reason`` says why). ``cold_s``: the untimed calls (warm-up, then the memory call).
    """

    items: int
    seconds: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    added_bytes: list[int] = field(default_factory=list)
    cold_s: list[float] = field(default_factory=list)
    status: str = "ok"
    reason: str = ""
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-ready: median seconds per call, items/s, peak and added memory (GB, max over calls)."""
        out = {"status": self.status, **self.settings, "items_per_call": self.items}
        if self.reason:
            out["reason"] = self.reason
        if self.seconds:
            median = statistics.median(self.seconds)
            out |= {
                "seconds": [round(s, 4) for s in self.seconds],
                "warmup_seconds": [round(s, 4) for s in self.cold_s],
                "median_s": round(median, 4),
                "items_per_s": round(self.items / median, 4),
                "peak_gb": round(max(self.peak_bytes) / GB, 4),
                "added_gb": round(max(self.added_bytes) / GB, 4),
            }
        return out


SkipCheck = Callable[[str, dict[str, Measurement]], str | None]


# Untimed calls (warm-up, memory) on the CPU run in this thread, whose malloc arena is its own: the
# heap chunks that timed calls free in the main thread's arena cannot be reused there, which would hide
# allocations from the resident set size.
_UNTIMED_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="untimed")


def _measured_call(
    call: Callable[[], object],
    result: Measurement,
    device: torch.device,
    meter: MemoryMeter,
    *,
    memory_round: bool,
    timed: bool,
    in_thread: bool,
) -> float | None:
    """Run ``call`` once and record in ``result`` its seconds (timed or untimed) and, in the memory round,
    its peak and added bytes; returns the seconds, or None when it raised (``result`` is then ``failed``).
    ``in_thread``: untimed CPU calls run in :data:`_UNTIMED_THREAD`."""
    cpu = device.type == "cpu"
    if cpu:  # untimed calls too run under the memory setting, so the heap keeps no freed tensors
        set_malloc_mode(memory=not timed)
    if memory_round:
        meter.reset()
    synchronize(device)
    start = time.perf_counter()
    try:
        if cpu and not timed and in_thread:
            _UNTIMED_THREAD.submit(call).result()
        else:
            call()
        synchronize(device)
    except Exception as err:  # recorded, not raised: one broken configuration must not end the suite
        result.status, result.reason = (
            "failed",
            f"{type(err).__name__}: {str(err).splitlines()[0][:200]}",
        )
        return None
    finally:
        if cpu:
            set_malloc_mode(memory=False)
    seconds = time.perf_counter() - start
    if memory_round:
        peak = meter.peak()
        result.peak_bytes.append(peak)
        result.added_bytes.append(max(peak - meter.before, 0))
    (result.seconds if timed else result.cold_s).append(seconds)
    return seconds


def _stop(result: Measurement, seconds: float, max_call_s: float) -> None:
    """Say in ``result`` why its configuration gets no further rounds after a call of ``seconds``."""
    if not result.seconds:  # no timed call: keep the last call's time rather than none
        result.seconds.append(result.cold_s.pop())
        result.reason = "untimed call's time kept: "
    result.reason += f"stopped after {len(result.seconds) + len(result.cold_s)} call(s): one took {seconds:.0f} s > {max_call_s:.0f} s"


def interleave(
    calls: dict[str, Callable[[], object]],
    items: dict[str, int],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    max_call_s: float = float("inf"),
    skip_check: SkipCheck | None = None,
    settings: dict[str, dict] | None = None,
    untimed_in_thread: bool = True,
) -> dict[str, Measurement]:
    """Run the calls in turn, round after round (A, B, A, B, ...), so that background load hits all alike.

    ``warmup`` unmeasured rounds come first, then one round that measures peak memory (on the CPU
    with the allocator set for it, see the module docstring), then ``repeats`` timed rounds. Warm
    calls are measured because a first call at a new input size also allocates one-time state
    (oneDNN primitives and scratchpads). With ``warmup=0`` the memory call is the cold first call.
    ``skip_check(name, done)``, asked before a configuration's first call with the measurements so far,
    returns a reason to skip it (a prediction from smaller configurations) or None. A configuration whose
    call took longer than ``max_call_s`` gets no further rounds, except its memory call (without a timed
    call the last untimed call gives the time; ``reason`` says so). A call that raises marks its
    configuration ``failed`` with the error's first line. ``untimed_in_thread=False`` keeps the untimed
    calls in the calling thread (DataLoader workers must be started and stopped from one thread).
    """
    meter = MemoryMeter(device)
    results = {name: Measurement(items[name], settings=(settings or {}).get(name, {})) for name in calls}
    stopped: set[str] = set()
    rushed: set[str] = set()  # a warm-up call took too long: straight to the memory call, then stop
    for round_index in range(warmup + 1 + repeats):
        for name, call in calls.items():
            result = results[name]
            if name in stopped or result.status != "ok" or (name in rushed and round_index < warmup):
                continue
            if round_index == 0 and skip_check is not None:
                reason = skip_check(name, results)
                if reason:
                    result.status, result.reason = "skipped", reason
                    continue
            seconds = _measured_call(
                call,
                result,
                device,
                meter,
                memory_round=round_index == warmup,
                timed=round_index > warmup,
                in_thread=untimed_in_thread,
            )
            if seconds is None:
                continue
            if seconds > max_call_s and round_index < warmup:
                rushed.add(name)
            elif seconds > max_call_s or name in rushed:
                stopped.add(name)
                _stop(result, seconds, max_call_s)
    return results


def summaries(results: dict[str, Measurement]) -> dict[str, dict]:
    return {name: m.summary() for name, m in results.items()}


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (runnable processes; this machine has ``os.cpu_count()`` cores)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown-cpu"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# the CPU features that decide which kernels run: vector width, fused multiply-add, int8 and bf16 units
CPU_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)


def cpu_flags() -> list[str]:
    """Which of :data:`CPU_FLAGS` the CPU reports in ``/proc/cpuinfo`` (empty where it cannot be read)."""
    present = hardware.cpu_flags()
    return [flag for flag in CPU_FLAGS if flag in present]


def machine_info(device: torch.device) -> dict:
    """The machine a run measured: name (the results file stem), CPU, cores, RAM, library versions."""
    import segmentation_models_pytorch as smp
    import torchvision

    cpu = _cpu_model()
    try:
        ram_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1)
    except (ValueError, OSError):
        ram_gb = None
    info = {
        "node": platform.node(),
        "cpu": cpu,
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "ram_gb": ram_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "smp": smp.__version__,
        "device": device.type,
    }
    accelerator = cpu
    if device.type == "cuda":
        accelerator = torch.cuda.get_device_name(device)
        info["gpu"] = accelerator
        info["cuda"] = torch.version.cuda
    info["name"] = f"{device.type}-{_slug(platform.node())}-{_slug(accelerator)}"
    return info
