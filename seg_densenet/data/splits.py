"""Patient-level train/validation/test splits: stratified k-fold, deterministic from a seed.

Patients (never slices) are dealt into ``n_folds`` folds stratified by diagnosis group; fold ``fold``
is the test set (``fold="all"``: none, every patient trains or validates, for the model to deploy). Of
the remaining patients a ``val_fraction``, again stratified, is the validation set and the rest train. The same ``seed``, ``fold`` and ``n_folds`` always give the same split, so
the classification pretraining stage, which uses the same split, never sees a test patient.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from seg_densenet.errors import ConfigError, DataError
from seg_densenet.utils.atomic import atomic_write_text

ALL_FOLDS = "all"
"""``data.fold`` that holds out no test fold: the final model of a recipe trains on every patient."""


def make_split(
    patients: Iterable[tuple[str, str | None]],
    fold: int | str = 0,
    n_folds: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict:
    """Split ``(name, group)`` pairs (group ``None`` if unknown) into train/val/test name lists.

    Returns ``{"seed", "fold", "n_folds", "val_fraction", "train", "val", "test"}`` with sorted names.
    """
    groups = dict(patients)
    if not 2 <= n_folds <= len(groups):
        raise ConfigError(f"data.n_folds: need 2 <= n_folds <= {len(groups)} patients, got {n_folds}")
    if fold != ALL_FOLDS and not (isinstance(fold, int) and 0 <= fold < n_folds):
        raise ConfigError(f"data.fold: need 0 <= fold < n_folds = {n_folds} or {ALL_FOLDS!r}, got {fold!r}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"data.val_fraction: need 0 <= val_fraction < 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    ordered = _stratified_order(groups, rng)
    # dealing the stratum-ordered list round-robin spreads every group evenly over the folds
    test = [name for i, name in enumerate(ordered) if i % n_folds == fold]  # none for fold=all
    test_set = set(test)
    rest = _stratified_order({n: g for n, g in groups.items() if n not in test_set}, rng)
    # systematic sampling over the stratum-ordered list: round(N * f) patients, proportional per group
    # (rounded, not floored, so that a small dataset still gets a validation patient)
    val = [
        name for i, name in enumerate(rest) if int((i + 1) * val_fraction + 0.5) > int(i * val_fraction + 0.5)
    ]
    val_set = set(val)
    train = [name for name in rest if name not in val_set]
    return {
        "seed": seed,
        "fold": fold,
        "n_folds": n_folds,
        "val_fraction": val_fraction,
        "train": sorted(train),
        "val": sorted(val),
        "test": sorted(test),
    }


def labelled_subset(train: list[str], groups: dict[str, str | None], n: int, seed: int = 0) -> list[str]:
    """``n`` of the ``train`` patients whose segmentations are used when labels are scarce, spread over the
    diagnosis groups in proportion (systematic sampling over the stratum-ordered list, seeded).

    The same ``(train, seed)`` gives the same patients, and a larger ``n`` keeps every patient of a
    smaller one only by chance: each ``n`` is its own draw, as in a label-scarce study.
    """
    if not 1 <= n <= len(train):
        raise ConfigError(
            f"data.labelled_patients={n}: must be between 1 and the {len(train)} training patients"
        )
    ordered = _stratified_order({name: groups.get(name) for name in train}, np.random.default_rng(seed + 1))
    step = len(ordered) / n
    return sorted(ordered[int(i * step)] for i in range(n))


def _stratified_order(groups: dict[str, str | None], rng: np.random.Generator) -> list[str]:
    """Names grouped by stratum (sorted group names, unknown last), shuffled within each stratum."""
    strata: dict[str, list[str]] = {}
    for name in sorted(groups):
        strata.setdefault(groups[name] if groups[name] is not None else "\uffff", []).append(name)
    ordered = []
    for key in sorted(strata):
        names = strata[key]
        ordered.extend(names[i] for i in rng.permutation(len(names)))
    return ordered


def save_split(path: str | Path, split: dict) -> Path:
    """Write ``split`` as JSON (atomically); returns the path."""
    path = Path(path)
    atomic_write_text(path, json.dumps(split, indent=2) + "\n")
    return path


def load_split(path: str | Path) -> dict:
    """Read a split written by :func:`save_split`."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read split file ({exc})") from exc
    if not all(k in split for k in ("train", "val", "test")):
        raise DataError(f"{path}: split file lacks one of the keys train/val/test")
    return split


def split_patients(path: str | Path, subset: str) -> set[str]:
    """The patient names of list ``subset`` (``train``, ``val`` or ``test``) of a saved split."""
    content = load_split(Path(path).expanduser())
    lists = [k for k, v in content.items() if isinstance(v, list)]
    if subset not in lists:
        raise ConfigError(f"subset={subset}: {path} has the patient lists {', '.join(lists)}")
    if not content[subset]:
        held_out = " (fold all: every patient trained)" if content.get("fold") == ALL_FOLDS else ""
        raise DataError(f"{path}: the {subset} list is empty{held_out}")
    return {str(name) for name in content[subset]}
