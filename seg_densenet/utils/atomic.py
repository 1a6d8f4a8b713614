"""Atomic file writes: write to a temporary file beside the target, then rename.

A process killed mid-write leaves at most a hidden ``.<name>.tmp-*`` file, never a truncated target.
A write that the machine refuses (disk full, read-only file system, no permission) removes its
temporary file and raises :class:`~seg_densenet.errors.StorageError`: one line naming the target and
what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from seg_densenet.errors import StorageError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _suffixes(path: Path) -> str:
    # keep compound suffixes (".nii.gz") so libraries that infer the format from the name still work
    return "".join(path.suffixes)


def free_mb(path: str | os.PathLike) -> float:
    """Free space (MB) on the file system that holds ``path`` or its nearest existing folder."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            return shutil.disk_usage(folder).free / 1e6
    return float("nan")


def storage_error(
    exc: OSError, path: str | os.PathLike, option: str = "output=", need_mb: float | None = None
) -> StorageError | None:
    """The one-line :class:`StorageError` for a refused write of ``path``, telling the user to free space
    or to choose another ``option``; ``None`` for an error that is not a refusal of the machine."""
    if exc.errno in DISK_FULL:
        free = free_mb(path)
        if need_mb is not None:
            return StorageError(
                f"{path}: disk full: it needs {need_mb:.1f} MB and its file system has {free:.1f} MB "
                f"free: free {max(need_mb - free, 0.1):.1f} MB there or choose another {option}"
            )
        return StorageError(
            f"{path}: disk full ({free:.1f} MB free on its file system): free space there or "
            f"choose another {option}"
        )
    if exc.errno == errno.EROFS:
        return StorageError(f"{path}: the file system is read-only: choose another {option}")
    if exc.errno in NOT_WRITABLE:
        return StorageError(f"{path}: no permission to write there: choose another {option}")
    return None


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, option: str = "output=", need_mb: float | None = None
) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is renamed onto ``path``.

    An ``OSError`` of a full disk, a read-only file system or a missing permission, raised while
    creating the folder, inside the ``with`` block or at the rename, becomes a :class:`StorageError`
    that names the setting to change (``option``) and, when the caller knows the size (``need_mb``),
    how many MB to free; the temporary file is removed either way.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=_suffixes(path), dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        # mkstemp creates 0600; give the file the permissions a plain open() would (umask applied)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        refused = storage_error(exc, path, option, need_mb)
        if refused is None:
            raise
        raise refused from exc
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str, option: str = "output=") -> None:
    """Write ``text`` to ``path`` atomically (``option``: see :func:`atomic_path`)."""
    with atomic_path(path, option) as tmp:
        tmp.write_text(text)


def refuse_overwrite_of_inputs(output: str | os.PathLike, inputs: list[str | os.PathLike]) -> None:
    """Raise if ``output`` resolves to one of ``inputs`` (a prediction must never replace its input)."""
    from seg_densenet.errors import SegDenseNetError

    out = Path(output).resolve()
    for src in inputs:
        if Path(src).resolve() == out:
            raise SegDenseNetError(
                f"{output}: output path is the same as an input file; refusing to overwrite it"
            )
