"""Test-time augmentation over the in-plane symmetries of the square (the dihedral group D4), limited
to those a checkpoint's training augmentation produced: a network never trained on flipped hearts is
not asked to segment one."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping

import torch

from seg_densenet.errors import ConfigError

log = logging.getLogger("seg_densenet.predict")


@dataclasses.dataclass(frozen=True)
class Dihedral:
    """A symmetry of the square acting on slices ``(..., H, W)``: an optional transpose (swap H and W),
    then ``k`` quarter turns counterclockwise as displayed (``torch.rot90``'s sense, and albumentations'
    sense of a positive angle). The eight of them are the dihedral group D4."""

    k: int = 0
    transpose: bool = False

    @property
    def name(self) -> str:
        return _DIHEDRAL_NAMES[self]

    def __matmul__(self, other: Dihedral) -> Dihedral:
        """``self`` applied after ``other`` (T R^k T = R^-k)."""
        turns = self.k - other.k if self.transpose else self.k + other.k
        return Dihedral(turns % 4, self.transpose != other.transpose)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The transform of ``(..., H, W)``; a quarter turn or a transpose gives ``(..., W, H)``."""
        if self.transpose:
            x = x.transpose(-2, -1)
        return torch.rot90(x, self.k, dims=(-2, -1)) if self.k else x

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`apply`: ``invert(apply(x)) == x`` exactly."""
        x = torch.rot90(x, -self.k, dims=(-2, -1)) if self.k else x
        return x.transpose(-2, -1) if self.transpose else x


IDENTITY, ROT90, ROT180, ROT270 = (Dihedral(k) for k in range(4))
TRANSPOSE, VFLIP, ANTITRANSPOSE, HFLIP = (Dihedral(k, True) for k in range(4))
_DIHEDRAL_NAMES = {
    IDENTITY: "identity",
    HFLIP: "hflip",
    VFLIP: "vflip",
    ROT180: "rot180",
    ROT90: "rot90",
    ROT270: "rot270",
    TRANSPOSE: "transpose",
    ANTITRANSPOSE: "antitranspose",
}
D4 = tuple(_DIHEDRAL_NAMES)  # in this order: tta=true uses the first four, shapes kept
FLIPS = D4[:4]
# albumentations transforms whose output covers in-plane symmetries, and containers that pick one child
_SYMMETRY_TRANSFORMS = {
    "HorizontalFlip": {HFLIP},
    "VerticalFlip": {VFLIP},
    "Transpose": {TRANSPOSE},
    "RandomRotate90": {ROT90, ROT180, ROT270},
    "D4": set(D4),
    "SquareSymmetry": set(D4),
}
# rotation transforms: (argument, its default range in degrees, whether a single number x means (-x, x))
_ROTATIONS = {
    "Affine": ("rotate", (0.0, 0.0), False),
    "Rotate": ("limit", (-90.0, 90.0), True),
    "SafeRotate": ("limit", (-90.0, 90.0), True),
    "ShiftScaleRotate": ("rotate_limit", (-45.0, 45.0), True),
}
_ONE_OF = ("OneOf", "OneOrOther")


def tta_transforms(augmentation: Mapping | None) -> list[Dihedral]:
    """The in-plane symmetries (of :data:`D4`, in its order, identity first) that a training augmentation
    can produce: a checkpoint's ``record["data"]["augmentation"]``, the albumentations ``Compose`` config
    as a plain dict (``_target_``, ``transforms``, ``p``), or ``None``.

    A flip or transpose counts when its transform is listed with ``p > 0``; a quarter turn when a
    rotation range (``Affine.rotate``, ``Rotate.limit``, ``ShiftScaleRotate.rotate_limit``) reaches its
    angle, or ``RandomRotate90`` / ``D4`` is listed. Each listed transform runs at most once, so a
    composition counts only when its parts come from different transforms in the list (horizontal and
    vertical flip give the 180° turn; a ±90° range alone does not).
    """
    reachable = _reachable(augmentation)
    return [g for g in D4 if g in reachable]


def _reachable(entry) -> set[Dihedral]:
    if not isinstance(entry, Mapping) or float(entry.get("p", 1.0)) <= 0:
        return {IDENTITY}
    name = str(entry.get("_target_", "")).rsplit(".", 1)[-1]
    if "transforms" in entry:
        children = [_reachable(child) for child in entry["transforms"] or []]
        if name in _ONE_OF or (name == "SomeOf" and entry.get("n", 1) == 1):
            return set().union({IDENTITY}, *children)
        reachable = {IDENTITY}
        for child in children:  # the pipeline's order: a later transform acts after the earlier ones
            reachable = {g @ h for g in child for h in reachable}
        return reachable
    if name in _ROTATIONS:
        key, default, symmetric = _ROTATIONS[name]
        value = entry.get(key, default)
        if isinstance(value, (int, float)):  # albumentations: (-x, x) for the limits, exactly x for Affine
            value = (-abs(value), abs(value)) if symmetric else (value, value)
        low, high = (float(v) for v in value)
        return {IDENTITY} | {Dihedral(k) for k in (1, 2, 3) if _range_reaches(low, high, 90.0 * k)}
    return {IDENTITY} | _SYMMETRY_TRANSFORMS.get(name, set())


def _range_reaches(low: float, high: float, angle: float) -> bool:
    """Whether ``[low, high]`` degrees holds an angle equal to ``angle`` modulo 360."""
    return math.ceil((low - angle) / 360.0) <= math.floor((high - angle) / 360.0)


def select_tta(tta: bool | str, *augmentations: Mapping | None) -> list[Dihedral]:
    """The TTA transforms for ``tta`` (false | true | d4) and a checkpoint's training augmentation
    (several for an ensemble: the symmetries every member was trained with):
    false: the identity; true: those of identity, hflip, vflip, rot180 the training covered (slice
    shapes kept, at most 4 passes); d4: every symmetry it covered, quarter turns and transposes too."""
    tta = tta_mode(tta)
    if tta is False:
        return [IDENTITY]
    each = [tta_transforms(augmentation) for augmentation in augmentations or (None,)]
    covered = [g for g in each[0] if all(g in other for other in each[1:])]
    chosen = covered if tta == "d4" else [g for g in covered if g in FLIPS]
    if covered == [IDENTITY]:
        log.info(
            "tta: checkpoint trained with no in-plane flips or rotations; tta=%s is a single pass",
            str(tta).lower(),
        )
        return chosen
    left_out = [g.name for g in covered if g not in chosen]
    log.info(
        "tta: %d pass(es) over the training augmentation's symmetries: %s%s",
        len(chosen),
        ", ".join(g.name for g in chosen),
        f"; tta=d4 adds {', '.join(left_out)}" if left_out else "",
    )
    return chosen


def tta_mode(tta) -> bool | str:
    """``tta`` as False, True or "d4"; the strings "true" and "false" count too (a quoted YAML value)."""
    if isinstance(tta, str) and tta.lower() in ("true", "false", "d4"):
        return {"true": True, "false": False}.get(tta.lower(), "d4")
    if tta is None or isinstance(tta, bool):
        return bool(tta)
    raise ConfigError(f"tta={tta}: valid values are false, true, d4")
