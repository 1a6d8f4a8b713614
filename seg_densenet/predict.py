"""Prediction to NIfTI: ``python -m seg_densenet.predict ckpt=PATH input=PATH output=DIR [options]``.

``input`` is one NIfTI file, a folder of them, or an ACDC-layout tree (ground-truth files ``*_gt``
and earlier predictions are skipped). The output mirrors the input's tree; each mask is
``<stem>_pred.nii.gz``: uint8, the input's exact shape, affine and header geometry. The training
preprocessing (intensity normalisation, in-plane resampling) is applied and undone; slices are
predicted ``batch_size`` at a time, and the inverse mapping runs on the same slice chunks, so memory
stays bounded by the chunk, not the volume. Every file is written atomically.

Volumes stored with the slice axis first or second are predicted with it moved last (see
:func:`slice_axis`) and the outputs moved back. Test-time augmentation (``tta``) averages the softmax
over only those in-plane symmetries of the square that the checkpoint's training augmentation
produced (see :func:`tta_transforms`): a network never trained on flipped hearts is not asked to
segment one.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from scipy import ndimage

from seg_densenet import config as _config  # noqa: F401  (registers the ${sd.repo_root:} resolver)
from seg_densenet.checkpoint import load_model
from seg_densenet.data.labels import LabelSet
from seg_densenet.data.nifti import Volume, load_volume, save_volume
from seg_densenet.data.preprocess import GridMeta, Preprocessor
from seg_densenet.errors import ConfigError, DataError, SegDenseNetError
from seg_densenet.utils.atomic import atomic_path
from seg_densenet.utils.cli import check_overrides, run_cli
from seg_densenet.utils.files import walk_files

log = logging.getLogger("seg_densenet.predict")

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# ground truth, our own outputs, and the 4D cine files of the original ACDC release
SKIP_MARKERS = ("_gt", "_pred", "_uncertainty", "_probs", "_4d")
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
SLICE_SPACING_RATIO = 1.5
"""How much larger (x) than both in-plane spacings a voxel axis's spacing must be to count as the slice axis."""


@dataclasses.dataclass(frozen=True)
class Dihedral:
    """A symmetry of the square acting on slices ``(..., H, W)``: an optional transpose (swap H and W),
    then ``k`` quarter turns counterclockwise as displayed (``torch.rot90``'s sense, and albumentations'
    sense of a positive angle). The eight of them are the dihedral group D4."""

    k: int = 0
    transpose: bool = False

    @property
    def name(self) -> str:
        return _DIHEDRAL_NAMES[self]

    def __matmul__(self, other: Dihedral) -> Dihedral:
        """``self`` applied after ``other`` (T R^k T = R^-k)."""
        turns = self.k - other.k if self.transpose else self.k + other.k
        return Dihedral(turns % 4, self.transpose != other.transpose)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The transform of ``(..., H, W)``; a quarter turn or a transpose gives ``(..., W, H)``."""
        if self.transpose:
            x = x.transpose(-2, -1)
        return torch.rot90(x, self.k, dims=(-2, -1)) if self.k else x

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`apply`: ``invert(apply(x)) == x`` exactly."""
        x = torch.rot90(x, -self.k, dims=(-2, -1)) if self.k else x
        return x.transpose(-2, -1) if self.transpose else x


IDENTITY, ROT90, ROT180, ROT270 = (Dihedral(k) for k in range(4))
TRANSPOSE, VFLIP, ANTITRANSPOSE, HFLIP = (Dihedral(k, True) for k in range(4))
_DIHEDRAL_NAMES = {
    IDENTITY: "identity", HFLIP: "hflip", VFLIP: "vflip", ROT180: "rot180",
    ROT90: "rot90", ROT270: "rot270", TRANSPOSE: "transpose", ANTITRANSPOSE: "antitranspose",
}
D4 = tuple(_DIHEDRAL_NAMES)  # in this order: tta=true uses the first four, shapes kept
FLIPS = D4[:4]
# albumentations transforms whose output covers in-plane symmetries, and containers that pick one child
_SYMMETRY_TRANSFORMS = {
    "HorizontalFlip": {HFLIP}, "VerticalFlip": {VFLIP}, "Transpose": {TRANSPOSE},
    "RandomRotate90": {ROT90, ROT180, ROT270}, "D4": set(D4), "SquareSymmetry": set(D4),
}
# rotation transforms: (argument, its default range in degrees, whether a single number x means (-x, x))
_ROTATIONS = {
    "Affine": ("rotate", (0.0, 0.0), False), "Rotate": ("limit", (-90.0, 90.0), True),
    "SafeRotate": ("limit", (-90.0, 90.0), True), "ShiftScaleRotate": ("rotate_limit", (-45.0, 45.0), True),
}
_ONE_OF = ("OneOf", "OneOrOther")


def tta_transforms(augmentation: Mapping | None) -> list[Dihedral]:
    """The in-plane symmetries (of :data:`D4`, in its order, identity first) that a training augmentation
    can produce: a checkpoint's ``record["data"]["augmentation"]``, the albumentations ``Compose`` config
    as a plain dict (``_target_``, ``transforms``, ``p``), or ``None``.

    A flip or transpose counts when its transform is listed with ``p > 0``; a quarter turn when a
    rotation range (``Affine.rotate``, ``Rotate.limit``, ``ShiftScaleRotate.rotate_limit``) reaches its
    angle, or ``RandomRotate90`` / ``D4`` is listed. Each listed transform runs at most once, so a
    composition counts only when its parts come from different transforms in the list (horizontal and
    vertical flip give the 180° turn; a ±90° range alone does not).
    """
    reachable = _reachable(augmentation)
    return [g for g in D4 if g in reachable]


def _reachable(entry) -> set[Dihedral]:
    if not isinstance(entry, Mapping) or float(entry.get("p", 1.0)) <= 0:
        return {IDENTITY}
    name = str(entry.get("_target_", "")).rsplit(".", 1)[-1]
    if "transforms" in entry:
        children = [_reachable(child) for child in entry["transforms"] or []]
        if name in _ONE_OF or (name == "SomeOf" and entry.get("n", 1) == 1):
            return set().union({IDENTITY}, *children)
        reachable = {IDENTITY}
        for child in children:  # the pipeline's order: a later transform acts after the earlier ones
            reachable = {g @ h for g in child for h in reachable}
        return reachable
    if name in _ROTATIONS:
        key, default, symmetric = _ROTATIONS[name]
        value = entry.get(key, default)
        if isinstance(value, (int, float)):  # albumentations: (-x, x) for the limits, exactly x for Affine
            value = (-abs(value), abs(value)) if symmetric else (value, value)
        low, high = (float(v) for v in value)
        return {IDENTITY} | {Dihedral(k) for k in (1, 2, 3) if _range_reaches(low, high, 90.0 * k)}
    return {IDENTITY} | _SYMMETRY_TRANSFORMS.get(name, set())


def _range_reaches(low: float, high: float, angle: float) -> bool:
    """Whether ``[low, high]`` degrees holds an angle equal to ``angle`` modulo 360."""
    return math.ceil((low - angle) / 360.0) <= math.floor((high - angle) / 360.0)


def select_tta(tta: bool | str, augmentation: Mapping | None) -> list[Dihedral]:
    """The TTA transforms for ``tta`` (false | true | d4) and a checkpoint's training augmentation:
    false: the identity; true: those of identity, hflip, vflip, rot180 the training covered (slice
    shapes kept, at most 4 passes); d4: every symmetry it covered, quarter turns and transposes too."""
    tta = _tta_mode(tta)
    if tta is False:
        return [IDENTITY]
    covered = tta_transforms(augmentation)
    chosen = covered if tta == "d4" else [g for g in covered if g in FLIPS]
    if covered == [IDENTITY]:
        log.info("tta: checkpoint trained with no in-plane flips or rotations; tta=%s is a single pass",
                 str(tta).lower())
        return chosen
    left_out = [g.name for g in covered if g not in chosen]
    log.info("tta: %d pass(es) over the training augmentation's symmetries: %s%s", len(chosen),
             ", ".join(g.name for g in chosen), f"; tta=d4 adds {', '.join(left_out)}" if left_out else "")
    return chosen


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_inputs(input_path: str | Path, cine: bool = False) -> tuple[Path, list[Path]]:
    """The input root and the image files under it (sorted); ``*_gt``/``*_pred`` files are skipped, and
    so are ACDC's ``*_4d`` cine series unless ``cine`` (their ED and ES frames are files of their own)."""
    root = Path(input_path)
    if root.is_file():
        return root.parent, [root]
    if not root.is_dir():
        raise DataError(f"{root}: input not found")
    skip = tuple(m for m in SKIP_MARKERS if not (cine and m == "_4d"))
    files = [  # walk_files returns them sorted
        p for p in walk_files(root)
        if p.name.endswith(NIFTI_SUFFIXES) and not nifti_stem(p).endswith(skip)
    ]
    if not files:
        raise DataError(f"{root}: no NIfTI images (*.nii.gz, *.nii) found")
    return root, files


def preprocessor_from_record(data_cfg: dict) -> Preprocessor:
    """The training preprocessing, without the training crop (models take any size, so a whole
    slice is predicted and nothing outside a crop is lost)."""
    settings = data_cfg.get("preprocessing", data_cfg)
    fields = {f.name for f in dataclasses.fields(Preprocessor)} - {"crop_size"}
    return Preprocessor(**{k: settings[k] for k in fields if k in settings})


class Predictor:
    """A trained network with its preprocessing; predicts label maps of whole volumes.

    keep_probs: also return the class probabilities on the input grid. tta_transforms: the in-plane
    symmetries whose softmax is averaged (each applied to the slices, and inverted on the
    probabilities); :func:`select_tta` picks them from a checkpoint's training augmentation.
    mc_samples: number of MC-dropout passes (0: dropout off); their mean is the prediction and its
    entropy the uncertainty.
    channels_last: run the network in channels-last layout (NHWC), 1.2-1.3x the slices/s of NCHW for
    every model on the benchmark CPU (docs/benchmarks.md, fast paths).
    """

    def __init__(self, model: torch.nn.Module, preprocessor: Preprocessor, *, device: str = "cpu",
                 precision: str = "32", batch_size: int = 16, tta_transforms: Sequence[Dihedral] = (IDENTITY,),
                 mc_samples: int = 0, postprocess: str | None = None, num_classes: int = 4, keep_probs: bool = False,
                 memory_budget_mb: float | None = None, channels_last: bool = True):
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
    def _probabilities(self, slices: torch.Tensor) -> torch.Tensor:
        """Softmax ``(B, C, H, W)`` float32 of slices ``(B, 1, H, W)``, averaged over TTA and MC passes."""
        passes = max(self.mc_samples, 1)
        total = None
        for _ in range(passes):
            for transform in self.tta_transforms:
                x = transform.apply(slices).contiguous(memory_format=self.memory_format)
                with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                    logits = self.model(x)
                probs = transform.invert(logits.float().softmax(1))
                total = probs if total is None else total + probs
        return total / (passes * len(self.tta_transforms))

    def predict(self, volume: Volume, progress: Progress | None = None, task=None) -> dict[str, np.ndarray]:
        """``{"labels": (X, Y, Z) uint8, "probs": (C, X, Y, Z) float32 (if kept), "entropy": (X, Y, Z)}``.

        The arrays have the input's axis order whichever axis holds the slices (:func:`slice_axis`): a
        volume stored slices-first is predicted with the slice axis moved last, and moved back.
        """
        axis = slice_axis(volume)
        if axis == 2:
            return self._predict_slices_last(volume, progress, task)
        order = (*(a for a in range(3) if a != axis), axis)
        log.info("%s: slices along voxel axis %d (shape %s, spacing %s mm); predicted with that axis last",
                 volume.path or "volume", axis, volume.shape, tuple(round(s, 3) for s in volume.spacing))
        result = self._predict_slices_last(permute_axes(volume, order), progress, task)
        back = tuple(int(a) for a in np.argsort(order))
        return {
            key: np.ascontiguousarray(value.transpose(back if value.ndim == 3 else (0, *(a + 1 for a in back))))
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
        batch_size = self.slices_within_budget(*image.shape[1:])
        probs_out = np.zeros((self.num_classes, X, Y, n_slices), dtype=np.float32) if self.keep_probs else None
        entropy = np.zeros((X, Y, n_slices), dtype=np.float32) if self.mc_samples else None
        for start in range(0, n_slices, batch_size):
            stop = min(start + batch_size, n_slices)
            chunk = torch.from_numpy(image[start:stop, None]).to(self.device)
            try:
                probs = self._probabilities(chunk).cpu().numpy()[(..., *window)]
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if "memory" not in str(err).lower():
                    raise
                raise SegDenseNetError(
                    f"{volume.path}: out of memory predicting {stop - start} slices of {image.shape[1:]} at once; "
                    f"lower batch_size (now {batch_size}) or set memory_budget_mb"
                ) from err
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


    def slices_within_budget(self, height: int, width: int) -> int:
        """Slices per forward pass: ``batch_size``, lowered so that the measured memory of one slice's
        pass (network, softmax, inverse mapping) times the batch stays within ``memory_budget_mb``."""
        if not self.memory_budget_mb:
            return self.batch_size
        key = (height, width)
        if key not in self._slice_bytes:
            self._slice_bytes[key] = self._measure_slice_bytes(height, width)
        fits = int(self.memory_budget_mb * 2**20 // self._slice_bytes[key])
        batch = max(1, min(self.batch_size, fits))
        if batch < self.batch_size:
            log.info("memory budget %.0f MB: %d slice(s) of %dx%d per pass", self.memory_budget_mb, batch, height, width)
        return batch

    def _measure_slice_bytes(self, height: int, width: int) -> int:
        """Peak extra memory (bytes) of predicting one slice, measured once per in-plane size."""
        x = torch.zeros(1, 1, height, width, device=self.device)
        # a first, unmeasured pass: one-time allocations (kernel workspaces, thread pools) are not per slice
        self._probabilities(x)
        # what the chunk keeps besides the network: probabilities, their inverse mapping, labels
        floor = height * width * 4 * (3 * self.num_classes + 2)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self._probabilities(x)
            return max(torch.cuda.max_memory_allocated(self.device) - base, floor)
        status = Path("/proc/self/status")
        if not status.is_file():
            return floor
        _release_free_heap()  # so that the pass's growth is not hidden in memory freed by the first pass
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _proc_status_kb("VmRSS")
        self._probabilities(x)
        return max((_proc_status_kb("VmHWM") - base) * 1024, floor)


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


def slice_axis(volume: Volume) -> int:
    """The voxel axis (0, 1 or 2) that runs through the slices of a short-axis stack.

    The axis of the largest header spacing if it is at least :data:`SLICE_SPACING_RATIO` times both
    others (slice gaps of 5-10 mm against 1-2 mm pixels); else the axis with at most half the voxels
    of both others (headers of redistributed data may say 1 mm everywhere); else 2, the ``(X, Y, Z)``
    convention.
    """
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    axis = int(np.argmax(spacing))
    if spacing[axis] >= SLICE_SPACING_RATIO * np.delete(spacing, axis).max():
        return axis
    shape = np.asarray(volume.shape[:3])
    axis = int(np.argmin(shape))
    if 2 * shape[axis] <= np.delete(shape, axis).min():
        return axis
    return 2


def permute_axes(volume: Volume, order: Sequence[int]) -> Volume:
    """``volume`` with voxel axes reordered (new axis ``i`` = old axis ``order[i]``) in the same world
    geometry: the data transposed (a view), the affine's columns and the header's shape and zooms
    permuted alike."""
    order = [int(a) for a in order]
    data = volume.data.transpose(order)
    affine = np.array(volume.affine, dtype=np.float64)
    affine[:, :3] = affine[:, order]
    header = volume.header.copy()
    header.set_data_shape(data.shape)
    header.set_zooms(tuple(volume.spacing[a] for a in order))
    return dataclasses.replace(volume, data=data, affine=affine, header=header)


def _chunk_meta(meta: GridMeta, n: int) -> GridMeta:
    return dataclasses.replace(
        meta, original_shape=(*meta.original_shape[:2], n), resampled_shape=(*meta.resampled_shape[:2], n)
    )


def largest_connected_components(labels: np.ndarray) -> np.ndarray:
    """Keep, for every structure, only its largest 3D connected component (26-connectivity)."""
    out = np.zeros_like(labels)
    structure = np.ones((3, 3, 3), dtype=bool)
    for value in np.unique(labels):
        if value == 0:
            continue
        components, n = ndimage.label(labels == value, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[components == sizes.argmax()] = value
    return out


def build_predictor(ckpt: str | Path, *, device: str = "auto", tta: bool | str = False, backend: str = "torch",
                    **options) -> tuple[Predictor, dict]:
    """The :class:`Predictor` of a segmentation checkpoint (its network and training preprocessing)
    with ``options`` (see :class:`Predictor`); returns ``(predictor, checkpoint record)``.

    tta: false | true | d4 (see :func:`select_tta`), limited to what the checkpoint was trained with.
    backend: torch | onnxruntime | auto (:mod:`seg_densenet.backends`).
    """
    from seg_densenet.backends import OnnxRuntimeModel, cached_onnx, resolve_backend

    model, record = load_model(ckpt)
    if record.get("task") != "segment":
        raise SegDenseNetError(f"{ckpt}: a {record.get('task')} checkpoint, not a segmentation model")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    backend = resolve_backend(backend, device, str(options.get("precision", "32")), options.get("mc_samples", 0))
    if backend == "onnxruntime":
        model = OnnxRuntimeModel(cached_onnx(ckpt), min_size=getattr(model, "min_size", 1),
                                 threads=torch.get_num_threads())
        options["channels_last"] = False  # the graph takes NCHW arrays
    data_cfg = record.get("data") or {}
    predictor = Predictor(
        model, preprocessor_from_record(data_cfg), device=device,
        num_classes=LabelSet.from_record(record).num_classes,
        tta_transforms=select_tta(tta, data_cfg.get("augmentation")), **options,
    )
    return predictor, record


def _tta_mode(tta) -> bool | str:
    """``tta`` as False, True or "d4"; the strings "true" and "false" count too (a quoted YAML value)."""
    if isinstance(tta, str) and tta.lower() in ("true", "false", "d4"):
        return {"true": True, "false": False}.get(tta.lower(), "d4")
    if tta is None or isinstance(tta, bool):
        return bool(tta)
    raise ConfigError(f"tta={tta}: valid values are false, true, d4")


def predict_tree(ckpt: str | Path, input: str | Path, output: str | Path, *, tta: bool | str = False,
                 postprocess: str | None = None, mc_samples: int = 0, save_probs: bool = False,
                 device: str = "auto", precision: str = "32", batch_size: int = 16,
                 memory_budget_mb: float | None = None, channels_last: bool = True, cine: bool = False,
                 cine_frames: Sequence[int] | None = None, backend: str = "torch") -> list[Path]:
    """Predict every image under ``input`` into ``output`` (mirroring the tree); returns the masks written.

    A 4D cine series ``(X, Y, Z, T)`` (given directly, or found in a tree with ``cine=True``) becomes a 4D
    mask, with its volume-time curves, ED/ES and the cycle's indices beside it (:mod:`seg_densenet.cine`;
    ``cine_frames=[ED, ES]`` names the frames instead of finding them).
    """
    root, files = find_inputs(input, cine=cine)
    output = Path(output)
    targets = [output / f.parent.relative_to(root) / f"{nifti_stem(f)}_pred.nii.gz" for f in files]
    inputs = {f.resolve() for f in files}
    for target in targets:
        if target.resolve() in inputs:
            raise SegDenseNetError(f"{target}: output path is an input file; refusing to overwrite it")
    predictor, record = build_predictor(
        ckpt, device=device, precision=precision, batch_size=batch_size, tta=tta, mc_samples=mc_samples,
        postprocess=postprocess, keep_probs=save_probs, memory_budget_mb=memory_budget_mb,
        channels_last=channels_last, backend=backend,
    )
    structures = LabelSet.from_record(record).structures
    written = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns) as progress:
        for src, target in zip(files, targets):
            volume = load_volume(src, allow_4d=True)
            stem = nifti_stem(target)[: -len("_pred")]
            if volume.data.ndim == 4:
                written.append(_predict_cine(predictor, volume, target, target.with_name(stem), cine_frames, progress,
                                             structures))
                continue
            task = progress.add_task(f"{src.name}", total=volume.shape[slice_axis(volume)])
            result = predictor.predict(volume, progress, task)
            save_volume(target, result["labels"], volume, dtype=np.uint8)
            if "entropy" in result:
                save_volume(target.with_name(f"{stem}_uncertainty.nii.gz"), result["entropy"], volume, dtype=np.float32)
            if "probs" in result:
                _save_probabilities(target.with_name(f"{stem}_probs.nii.gz"), result["probs"], volume)
            written.append(target)
    log.info("wrote %d prediction(s) under %s", len(written), output)
    return written


def _predict_cine(predictor: Predictor, volume: Volume, target: Path, stem: Path,
                  cine_frames: Sequence[int] | None, progress: Progress, structures: dict[str, int]) -> Path:
    """Segment every frame of a 4D series into ``target`` (a 4D mask) and its cycle reports into
    ``<stem>_volumes.csv`` etc. beside it; ``structures``: the checkpoint's label set."""
    from seg_densenet import cine

    n_frames = volume.data.shape[3]
    first = cine.frame(volume, 0)
    task = progress.add_task(f"{volume.path.name} ({n_frames} frames)", total=first.shape[slice_axis(first)] * n_frames)
    labels = np.stack([predictor.predict(cine.frame(volume, t), progress, task)["labels"] for t in range(n_frames)], -1)
    save_volume(target, labels, volume, dtype=np.uint8)
    curves = cine.volume_curves(labels, volume.spacing, structures)
    ed, es = cine.ed_es_frames(curves["LV"], cine_frames)
    summary = cine.cycle_summary(curves, ed, es, named=cine_frames is not None)
    cine.write_cycle_reports(stem, curves, summary)
    log.info("%s: %d frames, ED frame %d, ES frame %d (%s), LVEF %.1f %%", volume.path, n_frames,
             summary["ED_frame"], summary["ES_frame"], summary["chosen_by"], summary["LV_EF_pct"])
    return target


def _save_probabilities(path: Path, probs: np.ndarray, reference: Volume) -> None:
    """Class probabilities as a 4D NIfTI ``(X, Y, Z, C)`` float32 in the reference geometry."""
    import nibabel as nib

    header = reference.header.copy()
    header.set_data_dtype(np.float32)
    img = nib.Nifti1Image(np.moveaxis(probs, 0, -1).astype(np.float32), reference.affine, header=header)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    run_cli(
        predict_tree, cfg.ckpt, cfg.input, cfg.output, tta=cfg.tta, postprocess=cfg.postprocess,
        mc_samples=cfg.mc_samples, save_probs=cfg.save_probs, device=cfg.device, precision=str(cfg.precision),
        batch_size=cfg.batch_size, memory_budget_mb=cfg.memory_budget_mb, channels_last=cfg.channels_last,
        cine=cfg.cine, cine_frames=cfg.cine_frames, backend=cfg.backend,
    )


def main() -> None:
    check_overrides("predict")
    _hydra_main()


if __name__ == "__main__":
    main()
