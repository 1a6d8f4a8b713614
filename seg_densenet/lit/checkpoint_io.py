"""Checkpoints written the way every other output is (:func:`~seg_densenet.utils.atomic.atomic_path`).

A checkpoint that cannot be stored (disk full, read-only folder) leaves the previous checkpoints as
they were and stops training with one line naming the file, the megabytes to free, and how to resume
(``ckpt_path=last`` in the same run folder).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from seg_densenet.errors import StorageError
from seg_densenet.utils.atomic import atomic_path

RESUME = "the last good checkpoint is kept: resume with ckpt_path=last in the same run folder"


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` for local files: serialise in memory, write beside the target, rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        try:
            with (
                atomic_path(path, option="hydra.run.dir=", need_mb=len(data) / 1e6) as tmp,
                open(tmp, "wb") as f,
            ):
                f.write(data)
        except StorageError as exc:
            raise StorageError(f"{exc}; {RESUME}") from exc

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)
