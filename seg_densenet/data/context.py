"""2.5D input: each short-axis slice with its neighbours in the stack as extra channels.

With ``context_slices = k`` the network sees slice ``z`` as ``2k + 1`` channels, slices ``z - k .. z + k``
in stack order; at either end of the stack the outermost slice stands in for the missing neighbours
(so the top and bottom slices see one side repeat themselves, which tells them where they lie). Only
slice ``z`` is labelled. One slice alone shows neither where the stack ends nor the neighbouring
anatomy, and at end-systole the most basal slice cuts the valve plane (docs/results.md, "Where RV at
ES loses its Dice"). ``k = 0`` is the plain 2D input, one channel.
"""

from __future__ import annotations

import numpy as np

from seg_densenet.errors import ConfigError


def check_context_slices(context_slices: int) -> int:
    """``data.context_slices`` as an int, checked (``>= 0``); raises :class:`ConfigError` naming the option."""
    if context_slices < 0:
        raise ConfigError(f"data.context_slices: must be >= 0 slices, got {context_slices}")
    return int(context_slices)


def input_channels(context_slices: int) -> int:
    """Channels of the network input for ``context_slices`` neighbours on each side: ``2k + 1``."""
    return 2 * int(context_slices) + 1


def context_indices(start: int, stop: int, n_slices: int, context_slices: int) -> np.ndarray:
    """``(stop - start, 2k + 1)`` slice indices: row ``i`` holds slices ``start + i - k .. start + i + k``,
    clamped to the stack ``[0, n_slices)``."""
    offsets = np.arange(-int(context_slices), int(context_slices) + 1)
    return np.clip(np.arange(start, stop)[:, None] + offsets, 0, n_slices - 1)


def context_stack(
    slices: np.ndarray, context_slices: int, start: int = 0, stop: int | None = None
) -> np.ndarray:
    """Slices ``start:stop`` of a stack ``(S, H, W)`` with their neighbours: ``(n, 2k + 1, H, W)`` float32."""
    stop = slices.shape[0] if stop is None else stop
    index = context_indices(start, stop, slices.shape[0], context_slices)
    return np.asarray(slices[index.ravel()], dtype=np.float32).reshape(*index.shape, *slices.shape[1:])
