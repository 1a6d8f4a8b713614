"""The predictor: a trained network with its training preprocessing, predicting label maps of whole
volumes chunk by chunk over slices (memory bounded by the chunk), with optional TTA, MC dropout and
largest-connected-component post-processing; :func:`build_predictor` makes one from a checkpoint."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from seg_densenet.checkpoint import load_model
from seg_densenet.config_checks import AUTO_SCALE, SCALE_LIMITS
from seg_densenet.data.context import context_stack, input_channels
from seg_densenet.data.heart_size import heart_size, zoom_into_band
from seg_densenet.data.labels import LabelSet
from seg_densenet.data.nifti import Volume
from seg_densenet.data.preprocess import GridMeta, Preprocessor, preprocessor_from_record
from seg_densenet.errors import ConfigError, SegDenseNetError
from seg_densenet.inference.ensemble import Ensemble, check_members
from seg_densenet.inference.geometry import permute_axes, slice_axis
from seg_densenet.inference.postprocess import largest_connected_components
from seg_densenet.inference.tta import IDENTITY, Dihedral, select_tta
from seg_densenet.utils.hardware import native_bf16

log = logging.getLogger("seg_densenet.predict")

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
AUTO_SCALE_LIMITS = (0.5, 2.0)
"""The largest zoom out and in that ``auto_scale`` applies to a volume."""


class Predictor:
    """A trained network with its preprocessing; predicts label maps of whole volumes.

    keep_probs: also return the class probabilities on the input grid. tta_transforms: the in-plane
    symmetries whose softmax is averaged (each applied to the slices, and inverted on the
    probabilities); :func:`select_tta` picks them from a checkpoint's training augmentation.
    mc_samples: number of MC-dropout passes (0: dropout off); their mean is the prediction and its
    entropy the uncertainty.
    channels_last: run the network in channels-last layout (NHWC), 1.2-1.3x the slices/s of NCHW for
    every model on the benchmark CPU (docs/benchmarks.md, fast paths).
    scales: in-plane zoom factors whose softmax is averaged too (``(1.0,)``: the slices as they are); a
    slice is resized by each (bilinear), predicted, and its probabilities resized back.
    auto_scale: ``(low, high)`` percentiles of the training heart sizes ``heart_size`` (a checkpoint
    record's, :mod:`seg_densenet.data.heart_size`), or ``None``. Each volume is first predicted in one
    plain pass, its heart measured, and, if it lies outside that band, every scale is multiplied by
    the zoom that brings it to the nearer edge (within :data:`AUTO_SCALE_LIMITS`): a scanner with
    other pixels than the training data's meets the network at the scale it learned.
    context_slices: the checkpoint's 2.5D input, ``k`` neighbouring slices on each side as channels
    (:mod:`seg_densenet.data.context`; a checkpoint record's ``data.context_slices``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocessor: Preprocessor,
        *,
        device: str = "cpu",
        precision: str = "32",
        batch_size: int = 16,
        tta_transforms: Sequence[Dihedral] = (IDENTITY,),
        mc_samples: int = 0,
        postprocess: str | None = None,
        num_classes: int = 4,
        keep_probs: bool = False,
        memory_budget_mb: float | None = None,
        channels_last: bool = True,
        scales: Sequence[float] = (1.0,),
        auto_scale: Sequence[float] | None = None,
        heart_size: dict | None = None,
        context_slices: int = 0,
    ):
        if str(precision) not in PRECISIONS:
            raise ConfigError(f"precision={precision}: valid values are {', '.join(PRECISIONS)}")
        if postprocess not in (None, "none", "lcc"):
            raise ConfigError(f"postprocess={postprocess}: valid values are null, lcc")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be at least 1")
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format).eval()
        self.preprocessor = preprocessor
        self.autocast_dtype = PRECISIONS[str(precision)]
        self.batch_size = batch_size
        self.tta_transforms = tuple(tta_transforms) or (IDENTITY,)
        self.scales = tuple(float(scale) for scale in scales) or (1.0,)
        low, high = SCALE_LIMITS
        if not all(low <= scale <= high for scale in self.scales):
            raise ConfigError(f"scales={list(scales)}: zoom factors must lie between {low:g} and {high:g}")
        self.auto_scale = _check_band(auto_scale)
        self.heart_size = heart_size
        self.context_slices = int(context_slices)
        if self.auto_scale is not None and not heart_size:
            log.warning(
                "auto_scale: the checkpoint records no training heart sizes (saved before they were kept); off"
            )
            self.auto_scale = None
        self.mc_samples = int(mc_samples)
        self.postprocess = postprocess if postprocess != "none" else None
        self.num_classes = num_classes
        self.keep_probs = keep_probs
        self.memory_budget_mb = memory_budget_mb
        self._slice_bytes: dict[tuple[int, int], int] = {}
        if self.mc_samples:
            if not hasattr(self.model, "enable_mc_dropout"):
                raise ConfigError(f"mc_samples={mc_samples}: {type(model).__name__} has no MC-dropout switch")
            self.model.enable_mc_dropout(True)

    @torch.inference_mode()
    def _probabilities(
        self,
        slices: torch.Tensor,
        scales: Sequence[float] | None = None,
        transforms: Sequence[Dihedral] | None = None,
    ) -> torch.Tensor:
        """Softmax ``(B, C, H, W)`` float32 of slices ``(B, 2k + 1, H, W)`` (each with its ``k =
        context_slices`` neighbours on each side), averaged over TTA and MC passes
        and ``scales`` (default: the predictor's) with ``transforms`` (default: its TTA)."""
        scales = self.scales if scales is None else tuple(scales)
        transforms = self.tta_transforms if transforms is None else tuple(transforms)
        passes = max(self.mc_samples, 1)
        size = slices.shape[-2:]
        min_size = getattr(self.model, "min_size", 1)
        total = None
        for _ in range(passes):
            for scale in scales:
                zoomed = (
                    slices
                    if scale == 1
                    else F.interpolate(
                        slices,
                        size=[max(min_size, round(n * scale)) for n in size],
                        mode="bilinear",
                        align_corners=False,
                        antialias=scale < 1,  # zooming out: no aliasing of fine structure
                    )
                )
                for transform in transforms:
                    x = transform.apply(zoomed).contiguous(memory_format=self.memory_format)
                    with torch.autocast(
                        self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
                    ):
                        logits = self.model(x)
                    probs = transform.invert(logits.float().softmax(1))
                    if scale != 1:
                        probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
                    total = probs if total is None else total + probs
        return total / (passes * len(scales) * len(transforms))

    def predict(self, volume: Volume, progress: Progress | None = None, task=None) -> dict[str, np.ndarray]:
        """``{"labels": (X, Y, Z) uint8, "probs": (C, X, Y, Z) float32 (if kept), "entropy": (X, Y, Z)}``.

        The arrays have the input's axis order whichever axis holds the slices (:func:`slice_axis`): a
        volume stored slices-first is predicted with the slice axis moved last, and moved back.
        """
        axis = slice_axis(volume)
        if axis == 2:
            return self._predict_slices_last(volume, progress, task)
        order = (*(a for a in range(3) if a != axis), axis)
        log.info(
            "%s: slices along voxel axis %d (shape %s, spacing %s mm); predicted with that axis last",
            volume.path or "volume",
            axis,
            volume.shape,
            tuple(round(s, 3) for s in volume.spacing),
        )
        result = self._predict_slices_last(permute_axes(volume, order), progress, task)
        back = tuple(int(a) for a in np.argsort(order))
        return {
            key: np.ascontiguousarray(
                value.transpose(back if value.ndim == 3 else (0, *(a + 1 for a in back)))
            )
            for key, value in result.items()
        }

    def _predict_slices_last(self, volume: Volume, progress: Progress | None, task) -> dict[str, np.ndarray]:
        """:meth:`predict` of a volume ``(X, Y, Z)`` with Z the slices; works chunk by chunk over
        slices: resampling is in-plane only, so each chunk inverts exactly."""
        image, meta = self.preprocessor.forward(volume)
        image, window = pad_to_min_size(image, getattr(self.model, "min_size", 1))
        n_slices = image.shape[0]
        X, Y, _ = meta.original_shape
        labels = np.zeros((X, Y, n_slices), dtype=np.uint8)
        scales = self.scales
        first_pass = None  # auto_scale's plain pass, reused when the prediction is that same pass
        if self.auto_scale is not None:
            # kept whole (S, C, H, W) only without a memory budget: a budget bounds memory, not passes
            plain = self.scales == (1.0,) and self.tta_transforms == (IDENTITY,) and not self.mc_samples
            plain = plain and not self.memory_budget_mb
            zoom, first_pass = self.heart_zoom(image, window, volume.path or "volume", keep=plain)
            scales = tuple(float(np.clip(zoom * scale, *SCALE_LIMITS)) for scale in self.scales)
            if scales != (1.0,):
                first_pass = None
        batch_size = self.slices_within_budget(*image.shape[1:], scales=scales)
        probs_out = (
            np.zeros((self.num_classes, X, Y, n_slices), dtype=np.float32) if self.keep_probs else None
        )
        entropy = np.zeros((X, Y, n_slices), dtype=np.float32) if self.mc_samples else None
        for start in range(0, n_slices, batch_size):
            stop = min(start + batch_size, n_slices)
            probs = (
                first_pass[start:stop]
                if first_pass is not None
                else self._chunk_probabilities(image, start, stop, volume.path, batch_size, scales)
            )
            probs = probs.cpu().numpy()[(..., *window)]
            chunk_meta = _chunk_meta(meta, stop - start)
            probs_xyz = self.preprocessor.invert(probs, chunk_meta)  # (C, X, Y, b)
            labels[..., start:stop] = probs_xyz.argmax(0).astype(np.uint8)
            if probs_out is not None:
                probs_out[..., start:stop] = probs_xyz
            if entropy is not None:
                p = np.clip(probs_xyz, 1e-8, 1.0)
                entropy[..., start:stop] = -(p * np.log(p)).sum(0)
            if progress is not None:
                progress.advance(task, stop - start)
        if self.postprocess == "lcc":
            labels = largest_connected_components(labels)
        out = {"labels": labels}
        if probs_out is not None:
            out["probs"] = probs_out
        if entropy is not None:
            out["entropy"] = entropy
        return out

    def _chunk_probabilities(
        self,
        image: np.ndarray,
        start: int,
        stop: int,
        name,
        batch_size: int,
        scales: Sequence[float] | None = None,
        transforms: Sequence[Dihedral] | None = None,
    ) -> torch.Tensor:
        """:meth:`_probabilities` of slices ``image[start:stop]`` (with their neighbours in ``image``);
        running out of memory is one line naming the file ``name`` and the batch size to lower."""
        chunk = torch.from_numpy(context_stack(image, self.context_slices, start, stop)).to(self.device)
        try:
            return self._probabilities(chunk, scales, transforms)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if "memory" not in str(err).lower():
                raise
            raise SegDenseNetError(
                f"{name}: out of memory predicting {stop - start} slices of {image.shape[1:]} at once; "
                f"lower batch_size (now {batch_size}) or set memory_budget_mb"
            ) from err

    def heart_zoom(
        self, image: np.ndarray, window: tuple[slice, slice] | None, name: str, keep: bool = False
    ) -> tuple[float, torch.Tensor | None]:
        """The ``auto_scale`` zoom of preprocessed slices ``(S, H, W)``: one plain pass (no TTA, scale 1),
        the largest connected component of each structure, its heart size (pixels) against the band of
        training sizes; with ``keep`` also that pass's probabilities ``(S, C, H, W)``, else ``None``.
        ``window``: the ``(h, w)`` part of the slices that is the image (not padding)."""
        window = window or (slice(None), slice(None))
        batch_size = self.slices_within_budget(*image.shape[1:], scales=(1.0,))
        labels, kept = [], []
        for start in range(0, image.shape[0], batch_size):
            stop = min(start + batch_size, image.shape[0])
            probs = self._chunk_probabilities(image, start, stop, name, batch_size, (1.0,), (IDENTITY,))
            labels.append(probs.argmax(1).to(torch.uint8).cpu().numpy()[(..., *window)])
            if keep:
                kept.append(probs)
        size = heart_size(largest_connected_components(np.concatenate(labels)))
        zoom = zoom_into_band(size, self.heart_size, self.auto_scale, AUTO_SCALE_LIMITS)
        if size is None:
            log.info("%s: auto_scale found no heart in a first pass; scale kept", name)
        elif zoom != 1:
            log.info(
                "%s: heart %.0f px across, outside the training sizes' percentiles %g-%g: slices zoomed by %.2f",
                name, size, *self.auto_scale, zoom,
            )  # fmt: skip
        return zoom, torch.cat(kept) if keep else None

    def slices_within_budget(self, height: int, width: int, scales: Sequence[float] | None = None) -> int:
        """Slices per forward pass: ``batch_size``, lowered so that the measured memory of one slice's
        pass (network, softmax, inverse mapping) at ``scales`` (default: the predictor's) times the
        batch stays within ``memory_budget_mb``."""
        if not self.memory_budget_mb:
            return self.batch_size
        scales = self.scales if scales is None else tuple(scales)
        key = (height, width, scales)
        if key not in self._slice_bytes:
            self._slice_bytes[key] = self._measure_slice_bytes(height, width, scales)
        fits = int(self.memory_budget_mb * 2**20 // self._slice_bytes[key])
        batch = max(1, min(self.batch_size, fits))
        if batch < self.batch_size:
            log.info(
                "memory budget %.0f MB: %d slice(s) of %dx%d per pass",
                self.memory_budget_mb,
                batch,
                height,
                width,
            )
        return batch

    def _measure_slice_bytes(self, height: int, width: int, scales: Sequence[float] | None = None) -> int:
        """Peak extra memory (bytes) of predicting one slice at ``scales`` (default: the predictor's),
        measured once per in-plane size and scales."""
        x = torch.zeros(1, input_channels(self.context_slices), height, width, device=self.device)
        # a first, unmeasured pass: one-time allocations (kernel workspaces, thread pools) are not per slice
        self._probabilities(x, scales)
        # what the chunk keeps besides the network: probabilities, their inverse mapping, labels
        floor = height * width * 4 * (3 * self.num_classes + 2)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self._probabilities(x, scales)
            return max(torch.cuda.max_memory_allocated(self.device) - base, floor)
        status = Path("/proc/self/status")
        if not status.is_file():
            return floor
        _release_free_heap()  # so that the pass's growth is not hidden in memory freed by the first pass
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _proc_status_kb("VmRSS")
        self._probabilities(x, scales)
        return max((_proc_status_kb("VmHWM") - base) * 1024, floor)


def _check_band(band: Sequence[float] | None) -> tuple[float, float] | None:
    """``auto_scale`` as a ``(low, high)`` pair, by the config check's rule (:data:`AUTO_SCALE`)."""
    if band is None:
        return None
    check, expected = AUTO_SCALE
    if not check(list(band)):
        raise ConfigError(f"auto_scale={list(band)}: expected {expected}, or null")
    return float(band[0]), float(band[1])


def pad_to_min_size(image: np.ndarray, min_size: int) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Centre-pad slices ``(S, H, W)`` to at least ``min_size`` on H and W with their minimum value.

    The networks take H, W >= their ``min_size`` (32 for the DenseUNet); a smaller image (a 20x20
    thumbnail, a single voxel) gets a background border instead of an error. Returns the padded slices
    and the ``(h, w)`` slices that cut the original window back out of any ``(..., H', W')`` output.
    """
    pads = [max(0, min_size - n) for n in image.shape[1:]]
    window = tuple(slice(p // 2, p // 2 + n) for p, n in zip(pads, image.shape[1:]))
    if not any(pads):
        return image, window
    fill = float(image.min()) if image.size else 0.0
    widths = ((0, 0), *((p // 2, p - p // 2) for p in pads))
    return np.pad(image, widths, mode="constant", constant_values=fill), window


def _release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; nothing elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _chunk_meta(meta: GridMeta, n: int) -> GridMeta:
    return dataclasses.replace(
        meta, original_shape=(*meta.original_shape[:2], n), resampled_shape=(*meta.resampled_shape[:2], n)
    )


def build_predictor(
    ckpt: str | Path | Sequence[str | Path],
    *,
    device: str = "auto",
    tta: bool | str = False,
    backend: str = "auto",
    precision: str = "auto",
    **options,
) -> tuple[Predictor, dict]:
    """The :class:`Predictor` of a segmentation checkpoint (its network and training preprocessing)
    with ``options`` (see :class:`Predictor`); returns ``(predictor, checkpoint record)``.

    ckpt: one checkpoint, or a list of them: an :class:`~seg_densenet.inference.ensemble.Ensemble`
    averaging their softmax (the record is the first one's, with ``ensemble``: the files).
    tta: false | true | d4 (see :func:`select_tta`), limited to what the checkpoint was trained with
    (every member, for an ensemble).
    backend: torch | onnxruntime | auto (:mod:`seg_densenet.backends`).
    precision: 32 | bf16 | 16 | auto (bf16 where the CPU or GPU runs it natively, else 32; resolved before
    the backend, so ``backend=auto`` keeps such machines on torch). The defaults, auto and auto, give
    the fastest path measured: bf16 channels_last on AMX CPUs, ONNX Runtime fp32 on other CPUs
    (docs/benchmarks.md), at the same Dice (docs/results.md).
    """
    from seg_densenet.backends import OnnxRuntimeModel, cached_onnx, resolve_backend

    paths = [ckpt] if isinstance(ckpt, (str, Path)) else list(ckpt)
    if not paths:
        raise ConfigError("ckpt: give a checkpoint file, or a list of them for an ensemble")
    models, records = zip(*(load_model(path) for path in paths))
    for path, record in zip(paths, records):
        if record.get("task") != "segment":
            raise SegDenseNetError(f"{path}: a {record.get('task')} checkpoint, not a segmentation model")
    check_members(paths, records)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if str(precision) == "auto":  # bf16 where the hardware runs it (parity: docs/results.md)
        precision = "bf16" if native_bf16(torch.device(device).type) else "32"
    backend = resolve_backend(
        backend, device, str(precision), options.get("mc_samples", 0), options.get("memory_budget_mb")
    )
    if backend == "onnxruntime":
        models = [
            OnnxRuntimeModel(
                cached_onnx(path), min_size=getattr(model, "min_size", 1), threads=torch.get_num_threads()
            )
            for path, model in zip(paths, models)
        ]
        options["channels_last"] = False  # the graph takes NCHW arrays
    data_cfg = records[0].get("data") or {}
    predictor = Predictor(
        models[0] if len(models) == 1 else Ensemble(models),
        preprocessor_from_record(data_cfg),
        device=device,
        num_classes=LabelSet.from_record(records[0]).num_classes,
        tta_transforms=select_tta(
            tta, *((record.get("data") or {}).get("augmentation") for record in records)
        ),
        heart_size=records[0].get("heart_size"),
        context_slices=int(data_cfg.get("context_slices") or 0),
        precision=str(precision),
        **options,
    )
    record = records[0] if len(paths) == 1 else {**records[0], "ensemble": [str(path) for path in paths]}
    return predictor, record
