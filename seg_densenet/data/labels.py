"""The classes of a segmentation dataset: the one source of label facts.

A dataset's config lists its structures in class-value order (``data.structures``; ACDC:
``[RV, MYO, LV]``, so RV is 1, MYO 2 and LV 3); class 0 is background. A list, not a mapping, so that
a dataset's yaml replaces the structures of the config it inherits instead of merging with them. Files
that code structures differently are mapped to these values by ``data.label_mapping`` (source value ->
class value; M&Ms: ``{1: 3, 2: 2, 3: 1}``).
Everything else reads a :class:`LabelSet`: the number of classes of the model, the metrics a training
run logs (``val/dice_<name>``), the checkpoint's record, evaluation, prediction's clinical indices and
the overlays.

Clinical indices apply where their structures exist: LV volumes and ejection fraction need ``LV``, the
RV's need ``RV``, myocardial mass needs ``MYO`` (names as ACDC spells them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from seg_densenet.errors import ConfigError

ACDC_STRUCTURES: dict[str, int] = {"RV": 1, "MYO": 2, "LV": 3}
"""ACDC's class values: 1 right-ventricle cavity, 2 left-ventricle myocardium, 3 left-ventricle cavity."""

PHASES: tuple[str, ...] = ("ED", "ES")
"""The cardiac phases an ``Info.cfg`` names and the reports summarise (any other frame is ``"other"``)."""

NO_PHASE = "all"
"""The phase of a frame in a dataset without phases (nnU-Net's raw layout: one image per case)."""


def report_phases(found: Iterable[str]) -> tuple[str, ...]:
    """The phases a report summarises: ED and ES when the frames have them, else every phase found (``all``
    for a dataset without phases)."""
    found = list(dict.fromkeys(found))
    return PHASES if any(p in PHASES for p in found) else tuple(found)


BACKGROUND = "background"

# structure each clinical index needs (evaluation/clinical.py computes them)
INDEX_STRUCTURES: dict[str, str] = {
    "LV_EDV_ml": "LV",
    "LV_ESV_ml": "LV",
    "LV_EF_pct": "LV",
    "RV_EDV_ml": "RV",
    "RV_ESV_ml": "RV",
    "RV_EF_pct": "RV",
    "MYO_mass_g": "MYO",
}


@dataclass(frozen=True)
class LabelSet:
    """Structures and their class values 1..n (0 is background).

    ``structures``: name -> class value, e.g. ``{"RV": 1, "MYO": 2, "LV": 3}``.
    """

    structures: dict[str, int]

    @classmethod
    def from_config(
        cls, structures: Sequence[str] | Mapping[str, int] | None, option: str = "data.structures"
    ) -> LabelSet:
        """A label set from a config list of names in class-value order (or a name -> value mapping;
        ``None``: ACDC's), checked: non-empty, names distinct and not ``background``, values exactly 1..n.
        Raises :class:`ConfigError` naming ``option``."""
        if structures is None:
            return cls(dict(ACDC_STRUCTURES))
        if isinstance(structures, Sequence) and not isinstance(structures, str):
            structures = {name: value for value, name in enumerate(structures, start=1)}
        if not isinstance(structures, Mapping) or not structures:
            raise ConfigError(
                f"{option}: expected structure names mapped to class values 1..n, got {structures!r}"
            )
        names = [str(n) for n in structures]
        if any(not n or n.lower() == BACKGROUND for n in names) or len({n.lower() for n in names}) != len(
            names
        ):
            raise ConfigError(
                f"{option}: names must be distinct, non-empty and not '{BACKGROUND}', got {names}"
            )
        values = structures.values()
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise ConfigError(f"{option}: class values must be integers, got {dict(structures)}")
        if sorted(values) != list(range(1, len(names) + 1)):
            raise ConfigError(
                f"{option}: class values must be 1..{len(names)} (0 is background), got {dict(structures)}"
            )
        return cls({str(n): int(v) for n, v in sorted(structures.items(), key=lambda item: item[1])})

    @classmethod
    def from_record(cls, record: Mapping) -> LabelSet:
        """The label set a checkpoint was trained with (``record["data"]["structures"]``; ACDC's for
        checkpoints written before label sets were recorded)."""
        return cls.from_config((record.get("data") or {}).get("structures"), "checkpoint data.structures")

    @property
    def num_classes(self) -> int:
        """Background plus the structures."""
        return len(self.structures) + 1

    @property
    def class_names(self) -> list[str]:
        """Names by class value: ``["background", "RV", "MYO", "LV"]``."""
        return [BACKGROUND, *self.structures]

    @property
    def metric_names(self) -> dict[str, int]:
        """Lower-case names for metric keys (``val/dice_rv``) -> class value."""
        return {name.lower(): value for name, value in self.structures.items()}

    @property
    def identity_mapping(self) -> dict[int, int]:
        """``{v: v}`` for every class value: the label mapping of files coded like the label set."""
        return {v: v for v in range(self.num_classes)}


def indices_for(structures: Iterable[str]) -> list[str]:
    """The clinical indices (keys of :data:`INDEX_STRUCTURES`, in report order) that ``structures`` allow."""
    present = set(structures)
    return [index for index, needs in INDEX_STRUCTURES.items() if needs in present]


ACDC = LabelSet(dict(ACDC_STRUCTURES))
"""The label set of ACDC (and of the synthetic phantom)."""


def num_classes(structures: Sequence[str] | None) -> int:
    """``data.num_classes`` from ``data.structures`` (the ``sd.num_classes`` config resolver)."""
    return LabelSet.from_config(structures).num_classes
