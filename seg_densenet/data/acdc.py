"""Finding cases in an ACDC-style folder tree and loading their image/label pairs.

The default layout is ACDC's::

    <root>/patientNNN/patientNNN_frameMM.nii.gz      image of frame MM
    <root>/patientNNN/patientNNN_frameMM_gt.nii.gz   its label map
    <root>/patientNNN/Info.cfg                       "ED: 1", "ES: 12", "Group: DCM", ...

Other datasets (M&Ms converted to per-frame files, in-house data) are read by changing
:class:`Layout`: the case-folder glob, the image file pattern, the label suffix, and a label mapping
from the source's label values to ACDC's (0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity).
Geometry (affine, spacing) is never assumed: it comes from each file's header and travels with the
loaded :class:`~seg_densenet.data.nifti.Volume`.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seg_densenet.data.labels import ACDC, PHASES
from seg_densenet.data.nifti import Volume, check_label_values, load_volume
from seg_densenet.errors import DataError

#: Diagnosis groups of ACDC, in the order used for classification labels.
GROUPS = ("NOR", "DCM", "HCM", "MINF", "RV")


@dataclass(frozen=True)
class Layout:
    """Where a dataset keeps its files.

    case_glob: glob for case folders under the root (``"patient*"``; ``"*"`` for names like ``A1D0Q7``).
    image_pattern: image file name inside a case folder; ``{case}`` is the folder name and ``{frame}``
        the frame number (format specs such as ``{frame:02d}`` are allowed).
    label_suffix: inserted before ``.nii.gz`` to name the label map (``"_gt"``).
    info_file: per-case ``key: value`` file giving ED/ES frame numbers and the group; ``None`` if absent.
    frames: fixed ``{"ED": 1, "ES": 2}`` frame numbers for data without an info file; when ``None``
        the frames come from the info file, which is then required.
    """

    case_glob: str = "patient*"
    image_pattern: str = "{case}_frame{frame:02d}.nii.gz"
    label_suffix: str = "_gt"
    info_file: str | None = "Info.cfg"
    frames: Mapping[str, int] | None = None

    @classmethod
    def from_config(cls, cfg: Layout | Mapping | None) -> Layout:
        """Build from a config mapping (unknown keys are an error); ``None`` gives the ACDC layout;
        ``format: nnunet`` gives nnU-Net's raw layout (:class:`~seg_densenet.data.nnunet.NnUNetLayout`)."""
        if cfg is None:
            return cls()
        if isinstance(cfg, Layout) or hasattr(cfg, "discover"):
            return cfg
        cfg = dict(cfg)
        kind = cfg.pop("format", "acdc")
        if kind == "nnunet":
            from seg_densenet.data.nnunet import NnUNetLayout

            return NnUNetLayout.from_config({"format": kind, **cfg})
        if kind != "acdc":
            raise DataError(f"data.layout.format: {kind!r}; valid: acdc, nnunet")
        unknown = sorted(set(cfg) - set(cls.__dataclass_fields__))
        if unknown:
            raise DataError(
                f"data.layout: unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}"
            )
        if cfg.get("frames") is not None:
            cfg["frames"] = {str(k): int(v) for k, v in dict(cfg["frames"]).items()}
        return cls(**cfg)

    def image_name(self, case: str, frame: int) -> str:
        return self.image_pattern.format(case=case, frame=frame)

    def label_name(self, case: str, frame: int) -> str:
        name = self.image_name(case, frame)
        for ext in (".nii.gz", ".nii"):
            if name.endswith(ext):
                return name[: -len(ext)] + self.label_suffix + ext
        raise DataError(f"data.layout.image_pattern: {self.image_pattern!r} must end with .nii.gz or .nii")

    def pattern_glob(self, case: str) -> str:
        """The image pattern with every field except ``{case}`` replaced by ``*`` (for error messages)."""
        parts = []
        for literal, name, _spec, _conv in string.Formatter().parse(self.image_pattern):
            parts.append(literal)
            if name is not None:
                parts.append(case if name == "case" else "*")
        return "".join(parts)


@dataclass(frozen=True)
class Frame:
    """One annotated cardiac phase of a case: the image file and its label map."""

    case: str
    phase: str  # "ED" or "ES"
    index: int  # frame number in the file names
    image: Path
    label: Path

    @property
    def name(self) -> str:
        """``"patient001_ED"``: the case and phase, used as the sample id."""
        return f"{self.case}_{self.phase}"


@dataclass(frozen=True)
class Case:
    """A patient: its folder, diagnosis group (``None`` if unknown), info fields and frames by phase."""

    name: str
    folder: Path
    group: str | None
    info: dict = field(default_factory=dict)
    frames: dict[str, Frame] = field(default_factory=dict)

    @property
    def group_index(self) -> int | None:
        """Index of the group in :data:`GROUPS`, ``None`` if unknown or not an ACDC group."""
        return GROUPS.index(self.group) if self.group in GROUPS else None


def read_info_cfg(path: str | Path) -> dict:
    """Parse a ``key: value`` info file (ACDC's ``Info.cfg``); numbers become int or float.

    Blank lines and lines without a colon are ignored; missing optional fields (Height, Weight, ...)
    are simply absent from the result.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"{path}: cannot read info file ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: info file is not text") from exc
    info: dict = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            continue
        info[key.strip()] = _parse_value(value.strip())
    return info


def _parse_value(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def discover_cases(
    root: str | Path, layout: Layout | Mapping | None = None, errors: list[tuple[str, str]] | None = None
) -> list[Case]:
    """List the cases under ``root`` sorted by name, with the ED and ES frames of each.

    Only folders matching ``layout.case_glob`` that hold at least one file matching the image
    pattern count as cases. Raises :class:`DataError` if ``root`` is missing, no case is found, an
    info file needed for ED/ES is missing or lacks them, or an expected image or label file is absent;
    with an ``errors`` list, a bad case is appended to it as ``(name, message)`` and left out instead.
    """
    layout = Layout.from_config(layout)
    if not isinstance(layout, Layout):  # another dataset format (nnU-Net's raw layout)
        return layout.discover(root, errors)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    cases = []
    for folder in sorted(p for p in root.glob(layout.case_glob) if p.is_dir()):
        if not any(folder.glob(layout.pattern_glob(folder.name))):
            continue
        try:
            cases.append(_read_case(folder, layout))
        except DataError as exc:
            if errors is None:
                raise
            errors.append((folder.name, str(exc)))
    if not cases:
        raise DataError(
            f"{root}: no cases found (expected folders {layout.case_glob!r} holding files "
            f"{layout.pattern_glob('<case>')!r})"
        )
    return cases


def _read_case(folder: Path, layout: Layout) -> Case:
    info: dict = {}
    info_path = folder / layout.info_file if layout.info_file else None
    if info_path is not None and info_path.is_file():
        info = read_info_cfg(info_path)
    if layout.frames is not None:
        frame_numbers = dict(layout.frames)
    else:
        if info_path is None or not info_path.is_file():
            raise DataError(
                f"{info_path or folder}: info file not found; it is needed for the ED/ES frame numbers"
            )
        missing = [p for p in PHASES if not isinstance(info.get(p), int)]
        if missing:
            raise DataError(f"{info_path}: missing or non-integer field(s) {missing}")
        frame_numbers = {p: info[p] for p in PHASES}
    frames = {}
    for phase, index in frame_numbers.items():
        image = folder / layout.image_name(folder.name, index)
        label = folder / layout.label_name(folder.name, index)
        for path in (image, label):
            if not path.is_file():
                raise DataError(f"{path}: file not found ({phase} frame {index} of case {folder.name})")
        frames[phase] = Frame(case=folder.name, phase=phase, index=index, image=image, label=label)
    group = info.get("Group")
    return Case(
        name=folder.name,
        folder=folder,
        group=str(group) if group is not None else None,
        info=info,
        frames=frames,
    )


def load_frame(frame: Frame, label_mapping: Mapping[int, int] | None = None) -> tuple[Volume, Volume]:
    """Load a frame's image and label map, checked as a pair, with labels mapped to class values.

    ``label_mapping``: source value -> class value (``None``: the files hold ACDC's class values).
    Returns ``(image, label)``: image ``(X, Y, Z)`` float32, label ``(X, Y, Z)`` int64 class values,
    both carrying the header geometry. Raises :class:`DataError` naming the file if either is
    unreadable, not 3D or not finite, if their shapes differ, or if the label map holds a value the
    mapping does not cover.
    """
    mapping = {int(k): int(v) for k, v in (label_mapping or ACDC.identity_mapping).items()}
    image = load_volume(frame.image)
    label = load_volume(frame.label, label=True)
    if image.shape != label.shape:
        raise DataError(
            f"{frame.label}: label shape {label.shape} differs from image shape {image.shape} ({frame.image.name})"
        )
    apply_label_mapping(label, mapping)
    return image, label


def apply_label_mapping(label: Volume, mapping: Mapping[int, int]) -> Volume:
    """``label`` (in place) with every value replaced by ``mapping[value]``; a value the mapping does not
    cover raises :class:`DataError` naming the file."""
    check_label_values(label, mapping)
    label.data = map_labels(label.data, mapping)
    return label


def map_labels(labels: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Replace each source value by ``mapping[value]`` (a lookup table; values must be covered)."""
    if all(k == v for k, v in mapping.items()):
        return labels
    table = np.zeros(max(mapping) + 1, dtype=labels.dtype)
    for src, dst in mapping.items():
        table[src] = dst
    return table[labels]
