"""Walking input trees the way users lay them out (symlinked case folders included)."""

from __future__ import annotations

import os
from pathlib import Path


def walk_files(root: Path) -> list[Path]:
    """All files under ``root``, sorted, following symlinked folders (each real folder once)."""
    files, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink cycle or a folder linked twice
            subfolders.clear()
            continue
        seen.add(real)
        files += [Path(folder) / n for n in names if os.path.isfile(os.path.join(folder, n))]
    return sorted(files)
