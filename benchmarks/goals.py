"""The issue's goals and the fast-path verdicts, computed from one results file.

Every ratio divides two configurations of the same interleaved run (see :mod:`benchmarks.measure`),
except the data goal, which sets the loader's slices/s against FC-DenseNet56's training images/s from
the ``train`` suite of the same invocation. A goal whose inputs were not measured says why and has
``met: None``.
"""

from __future__ import annotations

from collections.abc import Mapping

from benchmarks.inference import BF16_CL, RECIPE_MODEL, VOLUME_VARIANTS
from benchmarks.training import BF16, CHANNELS_LAST, PER_LAYER


def _get(results: Mapping, *path: str) -> dict:
    node = results
    for key in path:
        node = node.get(key, {}) if isinstance(node, Mapping) else {}
    return node if isinstance(node, dict) else {}


def _ok(*configs: dict) -> str | None:
    """None when every configuration was measured, else why one was not."""
    for c in configs:
        if c.get("status") != "ok":
            return c.get("reason") or "not run"
    return None


def _speed(a: dict, b: dict) -> float:
    return a["items_per_s"] / b["items_per_s"]


def _memory(a: dict, b: dict) -> float:
    return a["peak_gb"] / b["peak_gb"]


def _added(a: dict, b: dict) -> float:
    return a["added_gb"] / b["added_gb"] if b["added_gb"] else float("nan")


def _goal(
    gid: str, goal: str, measured: str, met: bool | None, note: str = "", setting: str | None = None
) -> dict:
    """A row; ``setting``: where the measurement was not taken at the goal's own setting, what it was
    taken at (``met`` is then None: a verdict at another size would say nothing about the goal)."""
    if setting is not None:
        met, note = None, f"measured at {setting}, not the goal's setting; " + note
    return {"id": gid, "goal": goal, "measured": measured, "met": met, "note": note.strip("; ")}


def _off_setting(config: dict, batch: int, size: int) -> str | None:
    """None when ``config`` ran at ``batch`` and ``size`` x ``size``, else its own setting as text."""
    if config.get("batch") == batch and config.get("size") == [size, size]:
        return None
    return f"batch {config.get('batch')}, {'x'.join(map(str, config.get('size', [])))}"


def _missing(gid: str, goal: str, reason: str) -> dict:
    return _goal(gid, goal, f"not measured: {reason}", None)


def _densenet_speed(dn: Mapping) -> dict:
    """Ours (plain) against torchvision (plain), DenseNet-121 training."""
    tv, ours = dn.get("torchvision plain", {}), dn.get("ours plain", {})
    text = "DenseNet-121 training: ours (plain) at least 1.0x torchvision's speed"
    if reason := _ok(tv, ours):
        return _missing("densenet_speed", text, reason)
    r = _speed(ours, tv)
    return _goal("densenet_speed", text, f"{r:.2f}x", r >= 1.0, setting=_off_setting(tv, 8, 224))


def _densenet_memory(dn: Mapping) -> dict:
    """Ours (memory-efficient) against torchvision (plain), noting torchvision's memory-efficient mode."""
    tv, tv_me = dn.get("torchvision plain", {}), dn.get("torchvision memory-efficient", {})
    ours_me = dn.get("ours memory-efficient", {})
    text = "DenseNet-121 memory-efficient: at most 0.6x torchvision-plain peak memory at no less than 0.8x its speed"
    if reason := _ok(tv, ours_me):
        return _missing("densenet_memory", text, reason)
    m, s = _memory(ours_me, tv), _speed(ours_me, tv)
    note = f"memory added by the step: {_added(ours_me, tv):.2f}x"
    if not _ok(tv_me):
        note += (
            f"; torchvision's memory-efficient mode: {_memory(tv_me, tv):.2f}x memory "
            f"({_added(tv_me, tv):.2f}x added) at {_speed(tv_me, tv):.2f}x speed"
        )
    return _goal(
        "densenet_memory",
        text,
        f"{m:.3f}x memory at {s:.2f}x speed",
        m <= 0.6 and s >= 0.8,
        note,
        _off_setting(tv, 8, 224),
    )


def _dense_unet(seg: Mapping) -> dict:
    """DenseUNet against smp Unet(densenet121): met when any of its variants meets both ratios."""
    smp = seg.get("smp Unet(densenet121)", {})
    smp_nhwc = seg.get("smp Unet(densenet121)" + CHANNELS_LAST, {})
    text = "DenseUNet training: at least 1.3x smp Unet(densenet121) throughput at no more than 0.8x its peak memory"
    # each layout against smp in the same layout: channels_last is a training option of both
    variants = {k: (seg.get(f"DenseUNet {k}", {}), smp) for k in ("plain", "memory-efficient")} | {
        "memory-efficient, channels_last": (
            seg.get(f"DenseUNet memory-efficient{CHANNELS_LAST}", {}),
            smp_nhwc,
        )
    }
    measured = {k: (v, ref) for k, (v, ref) in variants.items() if not _ok(ref, v)}
    if not measured:
        return _missing("dense_unet", text, _ok(smp, variants["plain"][0]) or "not run")
    parts, met = [], False
    for k, (v, ref) in measured.items():
        s, m = _speed(v, ref), _memory(v, ref)
        met |= s >= 1.3 and m <= 0.8
        parts.append(f"{k}: {s:.2f}x speed, {m:.2f}x memory")
    note = "; ".join(
        f"{k}: {_added(v, ref):.2f}x memory added by the step" for k, (v, ref) in measured.items()
    )
    if "memory-efficient, channels_last" in measured:
        note += "; channels_last rows against smp in channels_last"
    return _goal("dense_unet", text, "; ".join(parts), met, note, _off_setting(smp, 8, 224))


def _fc103_memory(fc: Mapping) -> dict:
    """FC-DenseNet103 memory-efficient against plain, noting the naive per-layer concatenation."""
    plain, me = fc.get("FC-DenseNet103 plain", {}), fc.get("FC-DenseNet103 memory-efficient", {})
    text = "FC-DenseNet103 memory-efficient training (224x224, batch 8): at most 50% of its plain peak memory"
    if reason := _ok(plain, me):
        return _missing("fc103_memory", text, reason)
    m = _memory(me, plain)
    note = f"memory added by the step: {_added(me, plain):.2f}x; speed {_speed(me, plain):.2f}x"
    naive = fc.get(f"FC-DenseNet103 plain{PER_LAYER}", {})
    if not _ok(naive):
        note += (
            f"; against plain with per-layer concatenation (the naive implementation, without the shared"
            f" storage that plain mode now has): {_memory(me, naive):.2f}x"
        )
    return _goal("fc103_memory", text, f"{m:.2f}x", m <= 0.5, note, _off_setting(plain, 8, 224))


def _volume_goal(
    volume: Mapping,
    gid: str,
    name: str,
    target: float | None,
    threads: int | None,
    ceiling: Mapping | None = None,
) -> dict:
    """Whole-volume latency of model ``name`` (fastest layout), against ``target`` seconds if given; with
    the suite's ``ceiling``, whether the target is reachable at all on the machine (the physics)."""
    text = f"{name} inference of a 10-slice 256x216 volume on 2 CPU cores, no TTA, model loaded" + (
        f": under {target:g} s" if target else " (reported)"
    )
    variants = {k: volume.get(f"{name} {k}", {}) for k in VOLUME_VARIANTS}
    variants = {
        k: v for k, v in variants.items() if v or k == "eager"
    }  # onnxruntime, bf16: only where they ran
    measured = {k: v for k, v in variants.items() if not _ok(v)}
    if not measured:
        return _missing(gid, text, volume.get(name, {}).get("reason") or _ok(variants["eager"]))
    best = min(v["median_s"] for v in measured.values())
    shape = next(iter(measured.values()))["volume_shape"]
    parts = [f"{v['median_s']:.2f} s {k}" for k, v in measured.items()]
    note = f"volume {shape[0]}x{shape[1]}x{shape[2]} (X, Y, slices), {threads} threads"
    peak = (ceiling or {}).get("fp32", {}).get("gflop_per_s")
    first = next(iter(measured.values()))
    if target and peak and first.get("gflop_per_item"):
        work = first["gflop_per_item"] * first["items_per_call"]  # GFLOP of the whole volume
        need = work / target
        note += f"; {work:.0f} GFLOP per volume: {target:g} s needs {need:.0f} GFLOP/s, fp32 ceiling {peak:.0f} GFLOP/s"
        if need > peak:
            note += f": the physics forbids it on this machine (at 100% of the ceiling {work / peak:.2f} s)"
        else:
            note += f" ({100 * need / peak:.0f}% of it)"
    off = None if shape == [256, 216, 10] else f"{shape[0]}x{shape[1]}x{shape[2]}"
    return _goal(gid, text, ", ".join(parts), (best < target) if target else None, note, off)


def _best(group: Mapping, prefix: str = "") -> tuple[str, dict] | None:
    """The measured configuration of ``group`` (whose name starts with ``prefix``) with most items/s."""
    measured = [
        (n, c) for n, c in group.items() if n.startswith(prefix) and isinstance(c, Mapping) and not _ok(c)
    ]
    return max(measured, key=lambda nc: nc[1]["items_per_s"]) if measured else None


def _off_slice_size(config: Mapping, size: int = 224) -> str | None:
    """None when an inference ``config`` ran on ``size`` x ``size`` slices, else its slice size as text."""
    shape = config.get("size")
    return None if shape == [size, size] else f"{'x'.join(map(str, shape or []))} slices"


def _ceiling_goal(throughput: Mapping, volume: Mapping, ceiling: Mapping) -> dict:
    """Every model's best inference configuration at >= 50 % of the fp32 convolution ceiling."""
    text = (
        "Every model's inference at >= 50% of the machine's fp32 3x3-convolution ceiling (best configuration)"
    )
    peak = ceiling.get("fp32", {}).get("gflop_per_s")
    if not peak:
        return _missing(
            "ceiling_share", text, "no ceiling in the infer suite (measured since the roofline was added)"
        )
    shares, off = {}, None
    for name, group in throughput.items():
        rows = [(n, c) for n, c in group.items() if "bf16" not in n]  # bf16 rows hold against bf16's ceiling
        rows += [(n, c) for n, c in volume.items() if n.startswith(f"{name} ") and "bf16" not in n]
        rated = [
            (c["gflop_per_item"] * c["items_per_s"], n)
            for n, c in rows
            if isinstance(c, Mapping) and not _ok(c) and c.get("gflop_per_item")
        ]
        if rated:
            rate, config = max(rated)
            shares[name] = (100.0 * rate / peak, config)
        off = off or _off_slice_size(group.get("eager", {}))
    if not shares:
        return _missing("ceiling_share", text, "no model row with a FLOP count")
    measured = ", ".join(f"{name} {pct:.0f}% ({config})" for name, (pct, config) in shares.items())
    met = all(pct >= 50.0 for pct, _ in shares.values())
    return _goal("ceiling_share", text, measured, met, f"fp32 ceiling {peak:.0f} GFLOP/s", off)


def _dense_unet_vs_smp_latency(throughput: Mapping) -> dict:
    """Our DenseUNet's latency per slice at <= 0.5x smp Unet(densenet121)'s, each in its fastest configuration."""
    text = (
        "DenseUNet inference latency at most 0.5x smp Unet(densenet121)'s, each in its fastest configuration"
    )
    ours, smp = _best(throughput.get("DenseUNet", {})), _best(throughput.get("smp Unet(densenet121)", {}))
    if ours is None or smp is None:
        return _missing("dense_unet_vs_smp_latency", text, "a model's throughput was not measured")
    ratio = smp[1]["items_per_s"] / ours[1]["items_per_s"]
    note = f"DenseUNet {ours[0]} against smp {smp[0]}; smp's ONNX Runtime path is not measured"
    off = _off_slice_size(ours[1])
    return _goal("dense_unet_vs_smp_latency", text, f"{ratio:.2f}x", ratio <= 0.5, note, off)


def _data_vs_training(loaders: Mapping, crop: int | None, fc: Mapping) -> dict:
    """The loader's slices/s (2 persistent workers, ``crop`` x ``crop``) against FC-DenseNet56's
    training images/s (plain, from the train group ``fc``)."""
    two = loaders.get("2 workers, persistent", {})
    fc56 = fc.get("FC-DenseNet56 plain", {})
    text = "Data: slices/s from the cache with 2 workers at least 10x FC-DenseNet56 training throughput at the same size"
    if reason := _ok(two, fc56):
        return _missing("data_vs_training", text, reason)
    if fc56["size"] != [crop, crop]:
        return _missing("data_vs_training", text, f"sizes differ (data {crop}, training {fc56['size']})")
    r = _speed(two, fc56)
    note = f"{two['items_per_s']:.1f} slices/s against {fc56['items_per_s']:.3f} images/s at {crop}x{crop}"
    off = None if crop >= 128 else f"{crop}x{crop}"  # tiny quick-mode crops say nothing
    return _goal("data_vs_training", text, f"{r:.0f}x", r >= 10, note, off)


def goals(results: Mapping) -> list[dict]:
    """The goals table rows: ``id``, ``goal``, ``measured`` (ratios as text), ``met`` (bool or None), ``note``."""
    dn = _get(results, "suites", "train", "densenet121")
    seg = _get(results, "suites", "train", "segmentation")
    fc = _get(results, "suites", "train", "fc_densenet")
    volume = _get(results, "suites", "infer", "volume")
    throughput = _get(results, "suites", "infer", "throughput")
    ceiling = _get(results, "suites", "infer", "ceiling")
    threads = results.get("threads")
    return [
        _densenet_speed(dn),
        _densenet_memory(dn),
        _dense_unet(seg),
        _fc103_memory(fc),
        _volume_goal(volume, "fc56_volume", "FC-DenseNet56", 1.0, threads, ceiling),
        _volume_goal(volume, "dense_unet_volume", "DenseUNet", 0.35, threads, ceiling),
        _volume_goal(volume, "recipe_volume", RECIPE_MODEL, None, threads, ceiling),
        _ceiling_goal(throughput, volume, ceiling),
        _dense_unet_vs_smp_latency(throughput),
        _data_vs_training(
            _get(results, "suites", "data", "loaders"),
            _get(results, "suites", "data", "plan").get("crop"),
            fc,
        ),
    ]


def _verdict(ratio: float) -> str:
    if ratio >= 1.05:
        return "justified"
    return "no gain" if ratio >= 0.95 else "slower: not kept"


def _memory_verdict(speed: float, memory: float, what: str = "peak memory") -> str:
    """A memory-saving path: kept for at least 10% less memory (``what``: peak or added by the step) at
    no more than 10% less speed, or for speed alone."""
    if memory <= 0.9 and speed >= 0.9 and speed < 1.05:
        return f"justified: {1 - memory:.0%} less {what} for {max(1 - speed, 0):.0%} less speed"
    return _verdict(speed)


def _row(path: str, where: str, measured: str, verdict: str) -> dict:
    """One row of the fast-path table."""
    return {"path": path, "where": where, "measured": measured, "verdict": verdict}


def _inference_layout_rows(throughput: Mapping) -> list[dict]:
    """channels_last and bf16 autocast against eager fp32, inference throughput per model."""
    rows = []
    for name, variants in throughput.items():
        eager = variants.get("eager", {})
        for variant in ("channels_last", "bf16 autocast", BF16_CL):
            v = variants.get(variant, {})
            if reason := _ok(eager, v):
                rows.append(_row(variant, f"inference, {name}", "-", f"not measured: {reason}"))
            else:
                r = _speed(v, eager)
                rows.append(_row(variant, f"inference, {name}", f"{r:.2f}x slices/s", _verdict(r)))
    return rows


def _volume_layout_rows(volume: Mapping) -> list[dict]:
    """channels_last against eager, onnxruntime against torch's fastest fp32 layout, and bf16 channels_last
    against the fastest fp32 path: whole-volume latency, where both sides were measured."""
    rows = []
    for name in ("FC-DenseNet56", "DenseUNet", RECIPE_MODEL):
        eager, cl = volume.get(f"{name} eager", {}), volume.get(f"{name} channels_last", {})
        if not _ok(eager, cl):
            r = eager["median_s"] / cl["median_s"]
            rows.append(_row("channels_last", f"volume latency, {name}", f"{r:.2f}x faster", _verdict(r)))
        ort = volume.get(f"{name} onnxruntime", {})
        torch_best = min((c["median_s"] for c in (eager, cl) if not _ok(c)), default=None)
        if ort and not _ok(ort) and torch_best:
            r = torch_best / ort["median_s"]
            rows.append(
                _row(
                    "onnxruntime (`predict backend=onnxruntime`)",
                    f"volume latency, {name}",
                    f"{r:.2f}x faster than torch's fastest layout",
                    _verdict(r),
                )
            )
        bf16 = volume.get(f"{name} bf16 channels_last", {})
        fp32 = {
            k: c
            for k in ("eager", "channels_last", "onnxruntime")
            if not _ok(c := volume.get(f"{name} {k}", {}))
        }
        if bf16 and not _ok(bf16) and fp32:
            fastest = min(fp32, key=lambda k: fp32[k]["median_s"])
            r = fp32[fastest]["median_s"] / bf16["median_s"]
            rows.append(
                _row(
                    "bf16 channels_last (`predict precision=bf16`)",
                    f"volume latency, {name}",
                    f"{r:.2f}x faster than fp32's fastest ({fastest})",
                    _verdict(r),
                )
            )
    return rows


def _compile_rows(compiled: Mapping) -> list[dict]:
    """``torch.compile`` against eager, inference per model; training is not measured."""
    path = "torch.compile (fuses BN+ReLU)"
    rows = []
    for name, c in compiled.items():
        if c.get("status") == "ok" and not _ok(c.get("eager", {}), c.get("compiled", {})):
            r = _speed(c["compiled"], c["eager"])
            measured = f"{r:.2f}x slices/s (compile {c['compile_s']:.0f} s, excluded)"
            rows.append(_row(path, f"inference, {name}", measured, _verdict(r)))
        elif c.get("status") in ("failed", "skipped"):
            rows.append(_row(path, f"inference, {name}", "-", f"{c['status']}: {c.get('reason', '')}"))
    rows.append(
        _row(
            path,
            "training",
            "-",
            "not measured: compiling the backward pass does not fit the suite's time box on this machine",
        )
    )
    return rows


def _recompute_rows(dn: Mapping) -> list[dict]:
    """Our memory-efficient DenseNet-121 against torchvision's (torch.utils.checkpoint)."""
    tv_me, ours_me = dn.get("torchvision memory-efficient", {}), dn.get("ours memory-efficient", {})
    if _ok(tv_me, ours_me):
        return []
    s, m = _speed(ours_me, tv_me), _memory(ours_me, tv_me)
    return [
        _row(
            "shared concatenation storage + recomputing BN+ReLU in a custom autograd function (ours, as Pleiss et al.) against torch.utils.checkpoint (torchvision)",
            "training, DenseNet-121 memory-efficient",
            f"{s:.2f}x speed, {m:.2f}x peak memory",
            _memory_verdict(s, m),
        )
    ]


def _training_layout_rows(seg: Mapping) -> list[dict]:
    """channels_last against channels-first, segmentation training."""
    rows = []
    for name in ("DenseUNet memory-efficient", "smp Unet(densenet121)"):
        nchw, nhwc = seg.get(name, {}), seg.get(name + CHANNELS_LAST, {})
        if not _ok(nchw, nhwc):
            r = _speed(nhwc, nchw)
            measured = f"{r:.2f}x images/s, {_memory(nhwc, nchw):.2f}x peak memory"
            rows.append(_row("channels_last", f"training, {name}", measured, _verdict(r)))
    return rows


def _recipe_rows(recipe: Mapping) -> list[dict]:
    """The real-heart recipe's training step: channels_last against NCHW, bf16 autocast against fp32
    in each layout (bf16 rows only where the suite ran them: native bf16)."""
    rows = []
    pairs = (
        ("channels_last", "recipe fp32", "recipe fp32" + CHANNELS_LAST),
        ("bf16 autocast", "recipe fp32", "recipe" + BF16),
        ("bf16 autocast", "recipe fp32" + CHANNELS_LAST, "recipe" + BF16 + CHANNELS_LAST),
    )
    for path, base, fast in pairs:
        if not _ok(recipe.get(base, {}), recipe.get(fast, {})):
            r = _speed(recipe[fast], recipe[base])
            measured = f"{r:.2f}x images/s, {_memory(recipe[fast], recipe[base]):.2f}x peak memory"
            rows.append(_row(path, f"training, {fast} against {base}", measured, _verdict(r)))
    return rows


def _shared_storage_rows(dn: Mapping, seg: Mapping) -> list[dict]:
    """Plain mode's shared concatenation storage against concatenating per layer, training."""
    rows = []
    for group, model, where in ((dn, "ours", "DenseNet-121"), (seg, "DenseUNet", "DenseUNet")):
        shared, per_layer = group.get(f"{model} plain", {}), group.get(f"{model} plain{PER_LAYER}", {})
        if not _ok(shared, per_layer):
            s, m = _speed(shared, per_layer), _added(shared, per_layer)
            rows.append(
                _row(
                    "pre-allocated shared concatenation storage (Pleiss et al.) against concatenating per layer",
                    f"training, {where} plain",
                    f"{s:.2f}x speed, {m:.2f}x memory added by the step",
                    _memory_verdict(s, m, "memory added by the step"),
                )
            )
    return rows


def _loader_rows(loaders: Mapping, device: str) -> list[dict]:
    """Persistent workers against restarting them each epoch; pinned memory (GPU only) against none."""
    rows = []
    persistent, restarted = (
        loaders.get("2 workers, persistent", {}),
        loaders.get("2 workers, restarted each epoch", {}),
    )
    if not _ok(persistent, restarted):
        r = _speed(persistent, restarted)
        rows.append(_row("persistent workers", "data, 2 workers", f"{r:.2f}x slices/s", _verdict(r)))
    pinned = loaders.get("2 workers, persistent, pinned memory", {})
    if device == "cuda" and not _ok(persistent, pinned):
        r = _speed(pinned, persistent)
        rows.append(_row("pinned memory", "data, 2 workers", f"{r:.2f}x slices/s", _verdict(r)))
    else:
        rows.append(_row("pinned memory", "data", "-", "not measured: needs a GPU to copy to"))
    return rows


def _cudnn_rows(throughput: Mapping) -> list[dict]:
    """cudnn.benchmark against eager, inference per model measured on a GPU."""
    rows = []
    cudnn = [(n, v) for n, v in throughput.items() if "cudnn.benchmark" in v]
    for name, variants in cudnn:
        if not _ok(variants["eager"], variants["cudnn.benchmark"]):
            r = _speed(variants["cudnn.benchmark"], variants["eager"])
            rows.append(_row("cudnn.benchmark", f"inference, {name}", f"{r:.2f}x", _verdict(r)))
    if not cudnn:
        rows.append(_row("cudnn.benchmark", "GPU", "-", "not measured: no GPU"))
    return rows


def fast_paths(results: Mapping) -> list[dict]:
    """Rows ``fast path``, ``where``, ``measured``, ``verdict`` for each fast path of the issue."""
    device = results.get("machine", {}).get("device", "cpu")
    throughput = _get(results, "suites", "infer", "throughput")
    dn = _get(results, "suites", "train", "densenet121")
    seg = _get(results, "suites", "train", "segmentation")
    return [
        *_inference_layout_rows(throughput),
        *_volume_layout_rows(_get(results, "suites", "infer", "volume")),
        *_compile_rows(_get(results, "suites", "infer", "compile")),
        *_recompute_rows(dn),
        *_training_layout_rows(seg),
        *_recipe_rows(_get(results, "suites", "train", "recipe")),
        *_shared_storage_rows(dn, seg),
        *_loader_rows(_get(results, "suites", "data", "loaders"), device),
        *_cudnn_rows(throughput),
    ]
