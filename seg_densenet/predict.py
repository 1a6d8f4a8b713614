"""Prediction to NIfTI: ``python -m seg_densenet.predict ckpt=PATH input=PATH output=DIR [options]``.

``input`` is one NIfTI file, a folder of them, or an ACDC-layout tree (ground-truth files ``*_gt``
and earlier predictions are skipped). The output mirrors the input's tree; each mask is
``<stem>_pred.nii.gz``: uint8, the input's exact shape, affine and header geometry. The training
preprocessing (intensity normalisation, in-plane resampling) is applied and undone; slices are
predicted ``batch_size`` at a time, and the inverse mapping runs on the same slice chunks, so memory
stays bounded by the chunk, not the volume. Every file is written atomically.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from scipy import ndimage

from seg_densenet import config as _config  # noqa: F401  (registers the ${sd.repo_root:} resolver)
from seg_densenet.checkpoint import load_model
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


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_inputs(input_path: str | Path) -> tuple[Path, list[Path]]:
    """The input root and the image files under it (sorted); ``*_gt``/``*_pred`` files are skipped."""
    root = Path(input_path)
    if root.is_file():
        return root.parent, [root]
    if not root.is_dir():
        raise DataError(f"{root}: input not found")
    files = [  # walk_files returns them sorted
        p for p in walk_files(root)
        if p.name.endswith(NIFTI_SUFFIXES) and not nifti_stem(p).endswith(SKIP_MARKERS)
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

    keep_probs: also return the class probabilities on the input grid. tta: average softmax over the identity and the two in-plane flips. mc_samples: number of MC-dropout
    passes (0: dropout off); their mean is the prediction and its entropy the uncertainty.
    channels_last: run the network in channels-last layout (NHWC), 1.2-1.3x the slices/s of NCHW for
    every model on the benchmark CPU (docs/benchmarks.md, fast paths).
    """

    def __init__(self, model: torch.nn.Module, preprocessor: Preprocessor, *, device: str = "cpu",
                 precision: str = "32", batch_size: int = 16, tta: bool = False, mc_samples: int = 0,
                 postprocess: str | None = None, num_classes: int = 4, keep_probs: bool = False,
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
        self.tta = tta
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
        flips = [(), (-1,), (-2,)] if self.tta else [()]
        slices = slices.contiguous(memory_format=self.memory_format)
        total = None
        for _ in range(passes):
            for dims in flips:
                x = slices.flip(dims).contiguous(memory_format=self.memory_format) if dims else slices
                with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                    logits = self.model(x)
                probs = logits.float().softmax(1)
                probs = probs.flip(dims) if dims else probs
                total = probs if total is None else total + probs
        return total / (passes * len(flips))

    def predict(self, volume: Volume, progress: Progress | None = None, task=None) -> dict[str, np.ndarray]:
        """``{"labels": (X, Y, Z) uint8, "probs": (C, X, Y, Z) float32 (if kept), "entropy": (X, Y, Z)}``.

        Works chunk by chunk over slices: resampling is in-plane only, so each chunk inverts exactly.
        """
        image, meta = self.preprocessor.forward(volume)
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
                probs = self._probabilities(chunk).cpu().numpy()
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


def build_predictor(ckpt: str | Path, *, device: str = "auto", **options) -> tuple[Predictor, dict]:
    """The :class:`Predictor` of a segmentation checkpoint (its network and training preprocessing)
    with ``options`` (see :class:`Predictor`); returns ``(predictor, checkpoint record)``."""
    model, record = load_model(ckpt)
    if record.get("task") != "segment":
        raise SegDenseNetError(f"{ckpt}: a {record.get('task')} checkpoint, not a segmentation model")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    predictor = Predictor(
        model, preprocessor_from_record(record.get("data", {})), device=device,
        num_classes=len(record.get("class_names", [])) or 4, **options,
    )
    return predictor, record


def predict_tree(ckpt: str | Path, input: str | Path, output: str | Path, *, tta: bool = False,
                 postprocess: str | None = None, mc_samples: int = 0, save_probs: bool = False,
                 device: str = "auto", precision: str = "32", batch_size: int = 16,
                 memory_budget_mb: float | None = None, channels_last: bool = True) -> list[Path]:
    """Predict every image under ``input`` into ``output`` (mirroring the tree); returns the masks written."""
    root, files = find_inputs(input)
    output = Path(output)
    targets = [output / f.parent.relative_to(root) / f"{nifti_stem(f)}_pred.nii.gz" for f in files]
    inputs = {f.resolve() for f in files}
    for target in targets:
        if target.resolve() in inputs:
            raise SegDenseNetError(f"{target}: output path is an input file; refusing to overwrite it")
    predictor, _ = build_predictor(
        ckpt, device=device, precision=precision, batch_size=batch_size, tta=tta, mc_samples=mc_samples,
        postprocess=postprocess, keep_probs=save_probs, memory_budget_mb=memory_budget_mb,
        channels_last=channels_last,
    )
    written = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns) as progress:
        for src, target in zip(files, targets):
            volume = load_volume(src)
            task = progress.add_task(f"{src.name}", total=volume.shape[2])
            result = predictor.predict(volume, progress, task)
            save_volume(target, result["labels"], volume, dtype=np.uint8)
            stem = nifti_stem(target)[: -len("_pred")]
            if "entropy" in result:
                save_volume(target.with_name(f"{stem}_uncertainty.nii.gz"), result["entropy"], volume, dtype=np.float32)
            if "probs" in result:
                _save_probabilities(target.with_name(f"{stem}_probs.nii.gz"), result["probs"], volume)
            written.append(target)
    log.info("wrote %d prediction(s) under %s", len(written), output)
    return written


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
    )


def main() -> None:
    check_overrides("predict")
    _hydra_main()


if __name__ == "__main__":
    main()
