"""On-disk cache of preprocessed volumes, so that epochs after the first decode no NIfTI.

Each frame (image + label map) is preprocessed once (normalised and resampled, not cropped: the
training crop is a cheap slice taken later) and stored under ``cache_dir`` as::

    <case>_<phase>-<key>.image.npy   (S, H, W) float32
    <case>_<phase>-<key>.mask.npy    (S, H, W) uint8, ACDC label values
    <case>_<phase>-<key>.json        GridMeta and the label centre; written last, marks the entry complete

The key hashes the source files (resolved path, size, mtime) and the preprocessing and label-mapping
settings, so editing a file or a setting makes a new entry instead of reusing a stale one. Every file
is written atomically; a crash leaves no half-written entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seg_densenet.data.acdc import Frame, load_frame
from seg_densenet.data.labels import ACDC
from seg_densenet.data.preprocess import GridMeta, Preprocessor
from seg_densenet.errors import DataError
from seg_densenet.utils.atomic import atomic_path, atomic_write_text


@dataclass(frozen=True)
class CachedVolume:
    """A cached, preprocessed frame.

    name: ``"patient001_ED"``; meta: the grid mapping (``meta.spacing`` is the cached grid's mm);
    label_center: ``(h, w)`` centre of mass of the foreground labels in the cached grid, ``None`` if
    the label map is empty (used to centre training crops on the heart).
    """

    name: str
    image_path: Path
    mask_path: Path
    meta: GridMeta
    label_center: tuple[float, float] | None
    n_slices: int

    def load(self, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(image (S, H, W) float32, mask (S, H, W) uint8)``, memory-mapped by default."""
        mode = "r" if mmap else None
        return np.load(self.image_path, mmap_mode=mode), np.load(self.mask_path, mmap_mode=mode)


class VolumeCache:
    """Preprocess frames on first use and serve them from ``cache_dir`` afterwards.

    ``hits`` and ``misses`` count how many :meth:`get` calls were served from disk and how many had
    to read the NIfTI files.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        preprocessor: Preprocessor,
        label_mapping: Mapping[int, int] | None = None,
    ):
        self.cache_dir = Path(cache_dir)
        self.preprocessor = preprocessor
        self.label_mapping = {int(k): int(v) for k, v in (label_mapping or ACDC.identity_mapping).items()}
        self.hits = 0
        self.misses = 0

    def key(self, frame: Frame) -> str:
        """Hash of the source files' identity and the settings (16 hex digits)."""
        parts = []
        for path in (frame.image, frame.label):
            try:
                st = path.stat()
            except OSError as exc:
                raise DataError(f"{path}: file not found") from exc
            parts.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
        parts.append(self.preprocessor.settings_hash())
        parts.append(sorted(self.label_mapping.items()))
        return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]

    def get(self, frame: Frame) -> CachedVolume:
        """The cached entry for ``frame``, preprocessing and writing it first if needed."""
        stem = self.cache_dir / f"{frame.name}-{self.key(frame)}"
        meta_path = stem.with_name(stem.name + ".json")
        image_path = stem.with_name(stem.name + ".image.npy")
        mask_path = stem.with_name(stem.name + ".mask.npy")
        if meta_path.is_file() and image_path.is_file() and mask_path.is_file():
            self.hits += 1
            return _entry_from_json(frame.name, image_path, mask_path, json.loads(meta_path.read_text()))
        self.misses += 1
        image_vol, label_vol = load_frame(frame, self.label_mapping)
        image, meta = self.preprocessor.forward(image_vol)
        mask = self.preprocessor.forward_label(label_vol.data, meta).astype(np.uint8)
        record = {"meta": meta.to_dict(), "label_center": _label_center(mask), "n_slices": int(mask.shape[0])}
        for path, array in ((image_path, image), (mask_path, mask)):
            with atomic_path(path, option="data.cache_dir=") as tmp:
                np.save(tmp, array)
        atomic_write_text(meta_path, json.dumps(record), option="data.cache_dir=")
        return _entry_from_json(frame.name, image_path, mask_path, record)


def _label_center(mask: np.ndarray) -> list[float] | None:
    """Mean ``(h, w)`` position of foreground pixels of an ``(S, H, W)`` mask, ``None`` if empty."""
    _, hs, ws = np.nonzero(mask)
    if hs.size == 0:
        return None
    return [float(hs.mean()), float(ws.mean())]


def _entry_from_json(name: str, image_path: Path, mask_path: Path, record: dict) -> CachedVolume:
    center = record["label_center"]
    return CachedVolume(
        name=name,
        image_path=image_path,
        mask_path=mask_path,
        meta=GridMeta.from_dict(record["meta"]),
        label_center=tuple(center) if center is not None else None,
        n_slices=int(record["n_slices"]),
    )
