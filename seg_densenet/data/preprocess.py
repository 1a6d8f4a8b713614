"""Preprocessing of short-axis volumes and its inverse.

``Preprocessor.forward`` takes a loaded volume ``(X, Y, Z)`` to the network's grid, slices first:
``(S, H, W)`` with ``S = Z``, ``H = X``, ``W = Y``. The steps, in order:

1. intensity normalisation over the whole volume: clip to percentiles (default 0.5/99.5, which
   tames the bright outliers MRI is full of), then ``"zscore"`` (zero mean, unit std), ``"minmax"``
   (to [0, 1]) or ``"none"``;
2. optional in-plane resampling to ``target_spacing`` mm (linear for images, nearest for labels;
   the slice axis is left alone because slice gaps of 5-10 mm are not worth interpolating);
3. optional centre crop / pad in-plane to ``crop_size`` (pad value: the volume's minimum, i.e.
   background-like).

``Preprocessor.invert`` maps a prediction made on that grid back to the input's ``(X, Y, Z)`` grid
(undo crop/pad, then resample back: nearest for label maps, linear for probabilities), so it can be
saved with the input's affine. Everything ``invert`` needs is in the :class:`GridMeta` that
``forward`` returns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from seg_densenet.data.nifti import Volume
from seg_densenet.errors import ConfigError

NORMALIZATIONS = ("zscore", "minmax", "none")


@dataclass(frozen=True)
class GridMeta:
    """How a volume was mapped to the preprocessed grid (all shapes in the input's axis order).

    original_shape: ``(X, Y, Z)`` of the input; original_spacing: its voxel size (mm).
    resampled_shape: ``(X', Y', Z)`` after resampling; spacing: ``(sx, sy, sz)`` mm of the output grid.
    shift: ``(dx, dy)``: resampled index ``i`` lands at output index ``i + shift`` (negative = crop).
    out_shape: ``(H, W)`` in-plane size of the output; affine: the input's ``(4, 4)`` affine.
    """

    original_shape: tuple[int, int, int]
    original_spacing: tuple[float, float, float]
    resampled_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    shift: tuple[int, int]
    out_shape: tuple[int, int]
    affine: tuple[tuple[float, ...], ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GridMeta:
        return cls(
            original_shape=tuple(d["original_shape"]),
            original_spacing=tuple(d["original_spacing"]),
            resampled_shape=tuple(d["resampled_shape"]),
            spacing=tuple(d["spacing"]),
            shift=tuple(d["shift"]),
            out_shape=tuple(d["out_shape"]),
            affine=tuple(tuple(r) for r in d["affine"]),
        )


@dataclass(frozen=True)
class Preprocessor:
    """Intensity normalisation, in-plane resampling and crop/pad (see the module docstring).

    normalization: ``"zscore"``, ``"minmax"`` or ``"none"``.
    percentiles: ``(low, high)`` clipping percentiles applied before normalising; ``None``: no clip.
    target_spacing: in-plane ``(sx, sy)`` mm to resample to; ``None`` keeps the input grid.
    crop_size: in-plane ``(H, W)`` of the output; ``None`` keeps the (resampled) size.
    """

    normalization: str = "zscore"
    percentiles: tuple[float, float] | None = (0.5, 99.5)
    target_spacing: tuple[float, float] | None = None
    crop_size: tuple[int, int] | None = None

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"data.normalization: {self.normalization!r} is not one of {NORMALIZATIONS}")
        # Hydra passes lists; keep hashable tuples so the settings hash is stable
        for name in ("percentiles", "target_spacing", "crop_size"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
                if len(value) != 2:
                    raise ConfigError(f"data.{name}: expected two values, got {list(value)}")
        if self.percentiles is not None and not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ConfigError(f"data.percentiles: need 0 <= low < high <= 100, got {list(self.percentiles)}")
        if self.target_spacing is not None and min(self.target_spacing) <= 0:
            raise ConfigError(f"data.target_spacing: must be positive mm, got {list(self.target_spacing)}")
        if self.crop_size is not None and min(self.crop_size) <= 0:
            raise ConfigError(f"data.crop_size: must be positive, got {list(self.crop_size)}")

    def settings_hash(self) -> str:
        """A short hash of the settings (part of the cache key)."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def forward(self, volume: Volume) -> tuple[np.ndarray, GridMeta]:
        """Preprocess an image volume ``(X, Y, Z)``; returns ``((S, H, W) float32, meta)``."""
        meta = self.grid_meta(volume)
        data = normalize_intensity(volume.data, self.normalization, self.percentiles)
        data = _resample(data, meta.resampled_shape, order=1)
        data = place(data, meta.out_shape, meta.shift, fill=float(data.min()) if data.size else 0.0)
        return np.ascontiguousarray(data.transpose(2, 0, 1), dtype=np.float32), meta

    def forward_label(self, labels: np.ndarray, meta: GridMeta) -> np.ndarray:
        """Map a label map ``(X, Y, Z)`` onto the grid of ``meta``; returns ``(S, H, W)`` int64."""
        if tuple(labels.shape) != meta.original_shape:
            raise ValueError(f"label shape {labels.shape} differs from the image shape {meta.original_shape}")
        data = _resample(labels, meta.resampled_shape, order=0)
        data = place(data, meta.out_shape, meta.shift, fill=0)
        return np.ascontiguousarray(data.transpose(2, 0, 1), dtype=np.int64)

    def invert(self, prediction: np.ndarray, meta: GridMeta) -> np.ndarray:
        """Map a prediction on the preprocessed grid back to the input's grid.

        prediction: ``(S, H, W)`` integer label map, or ``(S, C, H, W)`` float class probabilities.
        Returns ``(X, Y, Z)`` labels (nearest-neighbour resampling) or ``(C, X, Y, Z)`` probabilities
        (linear resampling; the area outside the crop gets probability 1 for class 0).
        """
        prediction = np.asarray(prediction)
        n_slices = meta.original_shape[2]
        if prediction.ndim == 3 and prediction.shape == (n_slices, *meta.out_shape):
            data = prediction.transpose(1, 2, 0)  # (H, W, S) = (X', Y', Z)
            data = place(data, meta.resampled_shape[:2], (-meta.shift[0], -meta.shift[1]), fill=0)
            return _resample(data, meta.original_shape, order=0)
        if (
            prediction.ndim == 4
            and prediction.shape[0] == n_slices
            and prediction.shape[2:] == meta.out_shape
        ):
            probs = prediction.astype(np.float32).transpose(1, 2, 3, 0)  # (C, X', Y', Z)
            shift = (-meta.shift[0], -meta.shift[1])
            out = []
            for c, channel in enumerate(probs):
                channel = place(channel, meta.resampled_shape[:2], shift, fill=1.0 if c == 0 else 0.0)
                out.append(_resample(channel, meta.original_shape, order=1))
            return np.stack(out)
        raise ValueError(
            f"prediction shape {prediction.shape} does not match the preprocessed grid "
            f"(S, H, W) = {(n_slices, *meta.out_shape)} or (S, C, H, W)"
        )

    def grid_meta(self, volume: Volume) -> GridMeta:
        """The grid mapping for ``volume`` (shapes and spacing only; no voxel is read)."""
        shape = tuple(int(n) for n in volume.shape)
        spacing = tuple(float(s) for s in volume.spacing)
        if self.target_spacing is None:
            resampled = shape
            new_spacing = spacing
        else:
            # the in-plane extent (n * spacing) is kept; the size rounds, so the kept spacing is exact
            resampled = tuple(
                max(1, round(n * s / t)) for n, s, t in zip(shape[:2], spacing[:2], self.target_spacing)
            )
            resampled = (*resampled, shape[2])
            new_spacing = tuple(n * s / m for n, s, m in zip(shape, spacing, resampled))
        out_shape = tuple(self.crop_size) if self.crop_size is not None else resampled[:2]
        shift = center_shift(resampled[:2], out_shape)
        return GridMeta(
            original_shape=shape,
            original_spacing=spacing,
            resampled_shape=resampled,
            spacing=new_spacing,
            shift=shift,
            out_shape=out_shape,
            affine=tuple(tuple(float(v) for v in row) for row in np.asarray(volume.affine)),
        )


def normalize_intensity(data: np.ndarray, method: str, percentiles: Sequence[float] | None) -> np.ndarray:
    """Clip ``data`` to its ``percentiles`` and normalise it over the whole volume (float32)."""
    data = np.asarray(data, dtype=np.float32)
    if percentiles is not None and data.size:
        low, high = np.percentile(data, percentiles)
        data = np.clip(data, low, high)
    if method == "zscore":
        # a constant volume (empty scan) stays zero rather than dividing by zero
        return ((data - data.mean()) / max(float(data.std()), 1e-8)).astype(np.float32)
    if method == "minmax":
        low, high = float(data.min()), float(data.max())
        return ((data - low) / max(high - low, 1e-8)).astype(np.float32)
    return data


def center_shift(
    size: Sequence[int], out_size: Sequence[int], center: Sequence[float] | None = None
) -> tuple[int, ...]:
    """Per-axis shift that puts ``center`` (default: the array centre) at the centre of ``out_size``.

    Use with :func:`place`. When the output is larger on an axis and ``center`` is the array centre,
    this pads evenly (the extra pixel after); a crop never reaches outside the array.
    """
    shifts = []
    for i, (n, m) in enumerate(zip(size, out_size)):
        if center is None or m >= n:
            shifts.append((m - n) // 2)  # pad: even split; crop: centred
        else:
            start = int(round(center[i] - m / 2))
            shifts.append(-min(max(start, 0), n - m))
    return tuple(shifts)


def place(data: np.ndarray, out_size: Sequence[int], shift: Sequence[int], fill: float = 0) -> np.ndarray:
    """Copy ``data`` into a new array of size ``out_size`` on its leading axes, index ``i -> i + shift``.

    Positive shifts pad, negative shifts crop; the trailing axes are kept. ``place(place(a, s, d), a.shape,
    -d)`` gives back ``a`` wherever the first call kept it.
    """
    n_axes = len(out_size)
    out = np.full((*out_size, *data.shape[n_axes:]), fill, dtype=data.dtype)
    src, dst = [], []
    for n, m, d in zip(data.shape, out_size, shift):
        lo, hi = max(0, -d), min(n, m - d)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo + d, hi + d))
    out[tuple(dst)] = data[tuple(src)]
    return out


def _resample(data: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resample the leading axes of ``data`` to ``shape`` (scipy zoom; pixel edges stay aligned)."""
    if tuple(data.shape[: len(shape)]) == tuple(shape):
        return data
    factors = [m / n for m, n in zip(shape, data.shape)] + [1.0] * (data.ndim - len(shape))
    # grid_mode=True scales the pixel grid's extent (n * spacing), not the first-to-last centre distance,
    # which is what keeps the physical spacing exact
    return ndimage.zoom(data, factors, order=order, mode="nearest", grid_mode=True)


def preprocessor_from_record(data_cfg: dict) -> Preprocessor:
    """The training preprocessing, without the training crop (models take any size, so a whole
    slice is predicted and nothing outside a crop is lost)."""
    settings = data_cfg.get("preprocessing", data_cfg)
    fields = {f.name for f in dataclasses.fields(Preprocessor)} - {"crop_size"}
    return Preprocessor(**{k: settings[k] for k in fields if k in settings})
