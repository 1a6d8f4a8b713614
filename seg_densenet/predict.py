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

import logging
from collections.abc import Sequence
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from seg_densenet import config as _config  # noqa: F401  (registers the ${sd.repo_root:} resolver)
from seg_densenet.data.labels import LabelSet
from seg_densenet.data.nifti import Volume, load_volume, save_volume
from seg_densenet.errors import DataError, SegDenseNetError
from seg_densenet.inference.geometry import permute_axes, slice_axis
from seg_densenet.inference.postprocess import largest_connected_components
from seg_densenet.inference.predictor import (
    Predictor,
    build_predictor,
    pad_to_min_size,
    preprocessor_from_record,
)
from seg_densenet.inference.tta import (
    D4,
    FLIPS,
    HFLIP,
    IDENTITY,
    ROT90,
    ROT180,
    VFLIP,
    Dihedral,
    select_tta,
    tta_transforms,
)
from seg_densenet.utils.atomic import atomic_path
from seg_densenet.utils.cli import check_overrides, run_cli
from seg_densenet.utils.files import walk_files

# the inference API stays importable from here (its parts live in seg_densenet/inference/)
__all__ = [
    "D4", "FLIPS", "HFLIP", "IDENTITY", "ROT90", "ROT180", "VFLIP", "Dihedral", "Predictor", "build_predictor",
    "find_inputs", "largest_connected_components", "nifti_stem", "pad_to_min_size", "permute_axes",
    "predict_tree", "preprocessor_from_record", "select_tta", "slice_axis", "tta_transforms",
]  # fmt: skip

log = logging.getLogger("seg_densenet.predict")

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# ground truth, our own outputs, and the 4D cine files of the original ACDC release
SKIP_MARKERS = ("_gt", "_pred", "_uncertainty", "_probs", "_4d")


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
        p for p in walk_files(root) if p.name.endswith(NIFTI_SUFFIXES) and not nifti_stem(p).endswith(skip)
    ]
    if not files:
        raise DataError(f"{root}: no NIfTI images (*.nii.gz, *.nii) found")
    return root, files


def predict_tree(
    ckpt: str | Path | Sequence[str | Path],
    input: str | Path,
    output: str | Path,
    *,
    tta: bool | str = False,
    postprocess: str | None = None,
    mc_samples: int = 0,
    save_probs: bool = False,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 16,
    memory_budget_mb: float | None = None,
    channels_last: bool = True,
    cine: bool = False,
    cine_frames: Sequence[int] | None = None,
    backend: str = "auto",
    scales: Sequence[float] = (1.0,),
    auto_scale: Sequence[float] | None = None,
) -> list[Path]:
    """Predict every image under ``input`` into ``output`` (mirroring the tree); returns the masks written.

    A 4D cine series ``(X, Y, Z, T)`` (given directly, or found in a tree with ``cine=True``) becomes a 4D
    mask, with its volume-time curves, ED/ES and the cycle's indices beside it (:mod:`seg_densenet.cine`;
    ``cine_frames=[ED, ES]`` names the frames instead of finding them).
    """
    root, files = find_inputs(input, cine=cine)
    output = Path(output)
    targets = _output_paths(root, files, output)
    predictor, record = build_predictor(
        ckpt,
        device=device,
        precision=precision,
        batch_size=batch_size,
        tta=tta,
        mc_samples=mc_samples,
        postprocess=postprocess,
        keep_probs=save_probs,
        memory_budget_mb=memory_budget_mb,
        channels_last=channels_last,
        backend=backend,
        scales=scales,
        auto_scale=auto_scale,
    )
    structures = LabelSet.from_record(record).structures
    written = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns) as progress:
        for src, target in zip(files, targets):
            volume = load_volume(src, allow_4d=True)
            stem = nifti_stem(target)[: -len("_pred")]
            if volume.data.ndim == 4:
                series = target.with_name(stem)  # the curves' and indices' file stem
                written.append(
                    _predict_cine(predictor, volume, target, series, cine_frames, progress, structures)
                )
                continue
            task = progress.add_task(f"{src.name}", total=volume.shape[slice_axis(volume)])
            _save_prediction(predictor.predict(volume, progress, task), volume, target, stem)
            written.append(target)
    log.info("wrote %d prediction(s) under %s", len(written), output)
    return written


def _output_paths(root: Path, files: Sequence[Path], output: Path) -> list[Path]:
    """``output/<relative folder>/<stem>_pred.nii.gz`` for each input; refuses a path that is an input."""
    targets = [output / f.parent.relative_to(root) / f"{nifti_stem(f)}_pred.nii.gz" for f in files]
    inputs = {f.resolve() for f in files}
    for target in targets:
        if target.resolve() in inputs:
            raise SegDenseNetError(f"{target}: output path is an input file; refusing to overwrite it")
    return targets


def _save_prediction(result: dict, volume: Volume, target: Path, stem: str) -> None:
    """The mask at ``target``; the uncertainty and probability maps beside it when ``result`` has them."""
    save_volume(target, result["labels"], volume, dtype=np.uint8)
    if "entropy" in result:
        uncertainty = target.with_name(f"{stem}_uncertainty.nii.gz")
        save_volume(uncertainty, result["entropy"], volume, dtype=np.float32)
    if "probs" in result:
        _save_probabilities(target.with_name(f"{stem}_probs.nii.gz"), result["probs"], volume)


def _predict_cine(
    predictor: Predictor,
    volume: Volume,
    target: Path,
    stem: Path,
    cine_frames: Sequence[int] | None,
    progress: Progress,
    structures: dict[str, int],
) -> Path:
    """Segment every frame of a 4D series into ``target`` (a 4D mask) and its cycle reports into
    ``<stem>_volumes.csv`` etc. beside it; ``structures``: the checkpoint's label set."""
    from seg_densenet import cine

    n_frames = volume.data.shape[3]
    first = cine.frame(volume, 0)
    task = progress.add_task(
        f"{volume.path.name} ({n_frames} frames)", total=first.shape[slice_axis(first)] * n_frames
    )
    labels = np.stack(
        [predictor.predict(cine.frame(volume, t), progress, task)["labels"] for t in range(n_frames)], -1
    )
    save_volume(target, labels, volume, dtype=np.uint8)
    curves = cine.volume_curves(labels, volume.spacing, structures)
    ed, es = cine.ed_es_frames(curves["LV"], cine_frames)
    summary = cine.cycle_summary(curves, ed, es, named=cine_frames is not None)
    cine.write_cycle_reports(stem, curves, summary)
    log.info(
        "%s: %d frames, ED frame %d, ES frame %d (%s), LVEF %.1f %%",
        volume.path,
        n_frames,
        summary["ED_frame"],
        summary["ES_frame"],
        summary["chosen_by"],
        summary["LV_EF_pct"],
    )
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
        predict_tree,
        cfg.ckpt,
        cfg.input,
        cfg.output,
        tta=cfg.tta,
        postprocess=cfg.postprocess,
        mc_samples=cfg.mc_samples,
        save_probs=cfg.save_probs,
        device=cfg.device,
        precision=str(cfg.precision),
        batch_size=cfg.batch_size,
        memory_budget_mb=cfg.memory_budget_mb,
        channels_last=cfg.channels_last,
        cine=cfg.cine,
        cine_frames=cfg.cine_frames,
        backend=cfg.backend,
        scales=list(cfg.scales),
        auto_scale=None if cfg.auto_scale is None else list(cfg.auto_scale),
    )


def main() -> None:
    check_overrides("predict")
    _hydra_main()


if __name__ == "__main__":
    main()
