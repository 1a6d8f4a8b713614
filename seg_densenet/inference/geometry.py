"""Where the slices of a short-axis stack lie among a volume's voxel axes, and moving them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from seg_densenet.data.nifti import Volume

SLICE_SPACING_RATIO = 1.5
"""How much larger (x) than both in-plane spacings a voxel axis's spacing must be to count as the slice axis."""


def slice_axis(volume: Volume) -> int:
    """The voxel axis (0, 1 or 2) that runs through the slices of a short-axis stack.

    The axis of the largest header spacing if it is at least :data:`SLICE_SPACING_RATIO` times both
    others (slice gaps of 5-10 mm against 1-2 mm pixels); else the axis with at most half the voxels
    of both others (headers of redistributed data may say 1 mm everywhere); else 2, the ``(X, Y, Z)``
    convention.
    """
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    axis = int(np.argmax(spacing))
    if spacing[axis] >= SLICE_SPACING_RATIO * np.delete(spacing, axis).max():
        return axis
    shape = np.asarray(volume.shape[:3])
    axis = int(np.argmin(shape))
    if 2 * shape[axis] <= np.delete(shape, axis).min():
        return axis
    return 2


def permute_axes(volume: Volume, order: Sequence[int]) -> Volume:
    """``volume`` with voxel axes reordered (new axis ``i`` = old axis ``order[i]``) in the same world
    geometry: the data transposed (a view), the affine's columns and the header's shape and zooms
    permuted alike."""
    order = [int(a) for a in order]
    data = volume.data.transpose(order)
    affine = np.array(volume.affine, dtype=np.float64)
    affine[:, :3] = affine[:, order]
    header = volume.header.copy()
    header.set_data_shape(data.shape)
    header.set_zooms(tuple(volume.spacing[a] for a in order))
    return dataclasses.replace(volume, data=data, affine=affine, header=header)
