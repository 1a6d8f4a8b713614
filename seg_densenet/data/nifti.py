"""Reading and writing NIfTI volumes with validation.

Arrays are kept in nibabel's voxel order, ``(X, Y, Z)`` for a short-axis stack (Z = slices), and the
affine and header travel with them so that predictions are written back in the input's geometry.
Every problem with a file raises :class:`~seg_densenet.errors.DataError` naming the file.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from seg_densenet.errors import DataError
from seg_densenet.utils.atomic import atomic_path


@dataclass
class Volume:
    """A 3D volume with its geometry.

    data: ``(X, Y, Z)`` array; affine: ``(4, 4)`` voxel-to-world (mm); header: the source header.
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size ``(sx, sy, sz)`` in mm, from the header."""
        zooms = self.header.get_zooms()[:3]
        return tuple(float(z) for z in zooms)  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)


def load_volume(path: str | Path, *, label: bool = False, allow_4d: bool = False) -> Volume:
    """Load a 3D NIfTI volume, checking that it is readable, 3D and finite.

    A 4D array whose last axis has length 1 is squeezed to 3D; with ``allow_4d`` a cine series
    ``(X, Y, Z, T)`` loads as it is (see :mod:`seg_densenet.cine`). Images load as float32, label maps
    as int64 (non-integer label values are an error).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        raw = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    except (FileNotFoundError, nib.filebasedimages.ImageFileError) as exc:
        # removed between the check above and the read: nibabel then raises either
        if isinstance(exc, FileNotFoundError) or not path.is_file():
            raise DataError(f"{path}: file not found (removed while it was being read)") from exc
        raise DataError(f"{path}: not a NIfTI file ({_first_line(exc)})") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read NIfTI data ({_first_line(exc)})") from exc
    if raw.ndim == 4 and raw.shape[3] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3 and not (allow_4d and raw.ndim == 4):
        raise DataError(
            f"{path}: expected a 3D volume (X, Y, Z), got a {raw.ndim}D array of shape {raw.shape}"
        )
    if label:
        if not np.issubdtype(raw.dtype, np.integer):
            if not np.all(np.isfinite(raw)) or not np.array_equal(raw, np.round(raw)):
                raise DataError(f"{path}: label map holds non-integer or non-finite values")
        data = raw.astype(np.int64)
    else:
        data = raw.astype(np.float32)
        if not np.all(np.isfinite(data)):
            n_bad = int((~np.isfinite(data)).sum())
            raise DataError(f"{path}: {n_bad} NaN or infinite voxel(s)")
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header, path=path)


def check_label_values(volume: Volume, allowed: set[int] | list[int]) -> None:
    """Raise if the label map holds values outside ``allowed``."""
    found = set(np.unique(volume.data).tolist())
    extra = sorted(found - set(allowed))
    if extra:
        raise DataError(
            f"{volume.path}: label values {extra} are outside the configured mapping {sorted(allowed)}"
        )


def save_volume(path: str | Path, data: np.ndarray, reference: Volume, dtype=np.uint8) -> Path:
    """Write ``data`` atomically with the reference volume's affine and header geometry.

    The header is copied from the reference (so qform/sform codes, pixdim and orientation match);
    only the data type changes.
    """
    path = Path(path)
    if tuple(data.shape) != tuple(reference.data.shape):
        raise DataError(f"{path}: array shape {data.shape} differs from the reference {reference.data.shape}")
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), reference.affine, header=header)
    img.set_qform(reference.header.get_qform(), code=int(reference.header["qform_code"]))
    img.set_sform(reference.header.get_sform(), code=int(reference.header["sform_code"]))
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
