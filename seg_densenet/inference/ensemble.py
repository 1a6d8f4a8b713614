"""Several trained networks predicting as one: their softmax averaged, as nnU-Net averages its folds.

The members see the same preprocessed slices, so their checkpoints must agree on what prediction
depends on: the task, the label set, the number of input channels and the preprocessing (normalisation,
clipping, pixel grid). :func:`check_members` says which file differs in what.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from seg_densenet.data.labels import LabelSet
from seg_densenet.data.preprocess import preprocessor_from_record
from seg_densenet.errors import CheckpointError


class Ensemble(nn.Module):
    """Networks whose class probabilities are averaged.

    The output is the logarithm of the mean softmax, so that its softmax (what the predictor takes)
    is that mean. ``min_size``: the largest of the members' smallest input sizes.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one network")
        self.members = nn.ModuleList(members)
        self.min_size = max(getattr(m, "min_size", 1) for m in members)

    def forward(self, x: Tensor) -> Tensor:
        total = None
        for member in self.members:
            probs = member(x).float().softmax(1)
            total = probs if total is None else total + probs
        mean = total / len(self.members)
        return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()


def prediction_settings(record: dict) -> dict:
    """What a checkpoint's predictions depend on besides its weights (its ``seg_densenet`` record)."""
    return {
        "task": record.get("task"),
        "label set": LabelSet.from_record(record).structures,
        "input channels": (record.get("model") or {}).get("in_channels"),
        "preprocessing": preprocessor_from_record(record.get("data") or {}),
    }


def check_members(paths: Sequence[str | Path], records: Sequence[dict]) -> None:
    """Raise :class:`CheckpointError` naming the first checkpoint whose prediction settings differ from
    the first checkpoint's."""
    reference = prediction_settings(records[0])
    for path, record in zip(paths[1:], records[1:]):
        for what, value in prediction_settings(record).items():
            if value != reference[what]:
                raise CheckpointError(
                    f"{path}: cannot be averaged with {paths[0]}: its {what} differs "
                    f"({value} against {reference[what]})"
                )
