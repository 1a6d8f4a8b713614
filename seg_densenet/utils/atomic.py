"""Atomic file writes: write to a temporary file beside the target, then rename.

A process killed mid-write leaves at most a hidden ``.<name>.tmp-*`` file, never a truncated target.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _suffixes(path: Path) -> str:
    # keep compound suffixes (".nii.gz") so libraries that infer the format from the name still work
    return "".join(path.suffixes)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=_suffixes(path), dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600; give the file the permissions a plain open() would (umask applied)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def refuse_overwrite_of_inputs(output: str | os.PathLike, inputs: list[str | os.PathLike]) -> None:
    """Raise if ``output`` resolves to one of ``inputs`` (a prediction must never replace its input)."""
    from seg_densenet.errors import SegDenseNetError

    out = Path(output).resolve()
    for src in inputs:
        if Path(src).resolve() == out:
            raise SegDenseNetError(f"{output}: output path is the same as an input file; refusing to overwrite it")
