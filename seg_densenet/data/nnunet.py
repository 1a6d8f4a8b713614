"""nnU-Net's raw dataset layout, the format most segmentation datasets are shared in (Isensee et al.,
nnU-Net v2, ``nnUNet_raw/DatasetXXX_NAME``)::

    DIR/dataset.json                         channel_names, labels, file_ending (numTraining, ...)
    DIR/imagesTr/<case>_0000<file_ending>    the image (one file per channel: _0000, _0001, ...)
    DIR/labelsTr/<case><file_ending>         its label map

``dataset.json`` gives the classes: ``"labels": {"background": 0, "LV": 1, ...}`` (nnU-Net v1's
``{"0": "background", "1": "LV"}`` is read too), whose names become ``data.structures`` through the
``${sd.nnunet_structures:DIR}`` config resolver (``conf/data/nnunet.yaml``). Each labelled image is one
case with one frame (phase ``all``): the split is by case, as nnU-Net's own is, so two frames of one
patient stored as two cases may fall into different folds. Single-channel NIfTI only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from seg_densenet.data.acdc import Case, Frame
from seg_densenet.data.labels import NO_PHASE
from seg_densenet.errors import DataError

NIFTI_ENDINGS = (".nii.gz", ".nii")


def read_dataset_json(root: str | Path) -> dict:
    """``root/dataset.json`` checked: one channel, labels named 0..n with background 0, a NIfTI ending.

    Returns ``{"structures": [names by value 1..n], "file_ending": str}``. Raises :class:`DataError`
    naming the file and the problem.
    """
    path = Path(root) / "dataset.json"
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(
            f"{path}: not found (an nnU-Net raw dataset folder has dataset.json, imagesTr/, labelsTr/)"
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(spec, Mapping):
        raise DataError(f"{path}: expected a JSON object")
    channels = spec.get("channel_names", spec.get("modality"))
    if not isinstance(channels, Mapping) or len(channels) != 1:
        raise DataError(f"{path}: channel_names {channels}: seg_densenet segments single-channel images")
    ending = spec.get("file_ending", ".nii.gz")
    if ending not in NIFTI_ENDINGS:
        raise DataError(f"{path}: file_ending {ending!r}: only NIfTI ({', '.join(NIFTI_ENDINGS)}) is read")
    return {"structures": _structures(path, spec.get("labels")), "file_ending": ending}


def _structures(path: Path, labels) -> list[str]:
    if not isinstance(labels, Mapping) or not labels:
        raise DataError(f"{path}: labels must map class names to values, got {labels!r}")
    if all(str(k).isdigit() for k in labels):  # nnU-Net v1: {"0": "background", "1": "LV"}
        labels = {name: int(value) for value, name in labels.items()}
    if any(isinstance(v, list | tuple) for v in labels.values()):
        raise DataError(f"{path}: region-based labels (lists of values) are not supported")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in labels.values()):
        raise DataError(f"{path}: label values must be integers, got {dict(labels)}")
    by_value = {int(v): str(k) for k, v in labels.items()}
    if len(by_value) != len(labels) or sorted(by_value) != list(range(len(labels))) or 0 not in by_value:
        raise DataError(
            f"{path}: labels must have the values 0..{len(labels) - 1} (0 background), got {dict(labels)}"
        )
    return [by_value[v] for v in range(1, len(by_value))]


def nnunet_structures(root: str) -> list[str]:
    """The structure names of the dataset at ``root`` in class-value order (the config resolver)."""
    return read_dataset_json(root)["structures"]


@dataclass(frozen=True)
class NnUNetLayout:
    """The nnU-Net raw layout (``data.layout: {format: nnunet}``)."""

    format: str = "nnunet"
    images: str = "imagesTr"
    labels: str = "labelsTr"

    @classmethod
    def from_config(cls, cfg: Mapping) -> NnUNetLayout:
        unknown = sorted(set(cfg) - set(cls.__dataclass_fields__))
        if unknown:
            raise DataError(
                f"data.layout: unknown key(s) {unknown} for format nnunet; known: "
                f"{sorted(cls.__dataclass_fields__)}"
            )
        return cls(**dict(cfg))

    def pairs(self, root: str | Path) -> list[tuple[str, Path, Path]]:
        """``(case, image, label)`` for every label map under ``labelsTr``, sorted by case; the image
        (``imagesTr/<case>_0000<ending>``) may be missing."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found")
        ending = read_dataset_json(root)["file_ending"]
        label_dir = root / self.labels
        if not label_dir.is_dir():
            raise DataError(f"{label_dir}: folder not found (nnU-Net's label maps, <case>{ending})")
        labels = sorted(
            p for p in label_dir.iterdir() if p.name.endswith(ending) and not p.name.startswith(".")
        )
        if not labels:
            raise DataError(f"{label_dir}: no label maps <case>{ending} found")
        names = [label.name[: -len(ending)] for label in labels]
        return [
            (name, root / self.images / f"{name}_0000{ending}", label) for name, label in zip(names, labels)
        ]

    def discover(self, root: str | Path, errors: list[tuple[str, str]] | None = None) -> list[Case]:
        """One case per label map under ``labelsTr``, sorted by name, with its ``_0000`` image; a case
        whose image is missing raises :class:`DataError` naming the file (or, with ``errors``, is
        appended there and left out)."""
        cases = []
        for name, image, label in self.pairs(root):
            if not image.is_file():
                message = f"{image}: file not found (the image of label map {label.name})"
                if errors is None:
                    raise DataError(message)
                errors.append((name, message))
                continue
            frame = Frame(case=name, phase=NO_PHASE, index=0, image=image, label=label)
            cases.append(Case(name=name, folder=label.parent, group=None, frames={NO_PHASE: frame}))
        return cases
