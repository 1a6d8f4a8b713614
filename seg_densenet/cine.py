"""Whole cine stacks: a 4D short-axis series ``(X, Y, Z, T)`` segmented frame by frame, its volume-time
curves, end-diastole and end-systole from the LV cavity curve, and the clinical indices of the cycle.

ED is the frame of largest LV cavity and ES the frame of smallest (the ACDC convention of Bernard et al.,
IEEE TMI 2018, applied to the predicted curve), unless the user names the frames. Volumes, EF and
myocardial mass come from :mod:`seg_densenet.evaluation.clinical`, as in the evaluation reports.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from seg_densenet.data.nifti import Volume
from seg_densenet.errors import ConfigError
from seg_densenet.evaluation.clinical import indices_from_volumes, structure_volumes_ml
from seg_densenet.utils.atomic import atomic_write_text


def frame(volume: Volume, t: int) -> Volume:
    """Frame ``t`` (0-based) of a 4D ``volume`` as a 3D volume with the same geometry."""
    return dataclasses.replace(volume, data=np.ascontiguousarray(volume.data[..., t]))


def volume_curves(
    labels: np.ndarray, spacing: Sequence[float], structures: Mapping[str, int]
) -> dict[str, np.ndarray]:
    """``{structure: (T,) ml}`` of a 4D label map ``(X, Y, Z, T)`` with voxel ``spacing`` (mm);
    ``structures``: name -> class value (the checkpoint's label set, which must have an ``LV``: ED and ES
    come from its curve)."""
    if "LV" not in structures:
        raise ConfigError(
            f"cine: ED and ES come from the LV cavity's volume curve; the model's labels {list(structures)} have no LV"
        )
    per_frame = [
        structure_volumes_ml(labels[..., t], spacing[:3], structures) for t in range(labels.shape[-1])
    ]
    return {name: np.array([v[name] for v in per_frame]) for name in structures}


def ed_es_frames(lv_ml: np.ndarray, named: Sequence[int] | None = None) -> tuple[int, int]:
    """``(ED, ES)`` as 0-based frame indexes: the largest and the smallest LV cavity (the first of ties),
    or ``named`` ``[ED, ES]`` given as 1-based frame numbers (ACDC's ``Info.cfg`` numbering)."""
    n = len(lv_ml)
    if named is not None:
        if len(named) != 2 or not all(isinstance(f, int) and 1 <= f <= n for f in named):
            raise ConfigError(f"cine_frames={list(named)}: must be [ED, ES], frame numbers from 1 to {n}")
        return named[0] - 1, named[1] - 1
    return int(np.argmax(lv_ml)), int(np.argmin(lv_ml))


def cycle_summary(curves: dict[str, np.ndarray], ed: int, es: int, named: bool) -> dict:
    """ED/ES (1-based), how they were chosen, and the clinical indices at those frames (ml, %, g)."""
    indices = indices_from_volumes(
        {k: float(v[ed]) for k, v in curves.items()}, {k: float(v[es]) for k, v in curves.items()}
    )
    return {
        "frames": len(curves["LV"]),
        "ED_frame": ed + 1,
        "ES_frame": es + 1,
        "chosen_by": "user (cine_frames)"
        if named
        else "LV cavity volume curve (largest = ED, smallest = ES)",
        **{k: round(v, 3) for k, v in indices.items()},
    }


def write_cycle_reports(stem_path: Path, curves: dict[str, np.ndarray], summary: dict) -> list[Path]:
    """``<stem>_volumes.csv`` (one row per frame), ``<stem>_volumes.png`` and ``<stem>_cine.json``."""
    csv_path = stem_path.with_name(stem_path.name + "_volumes.csv")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["frame", *(f"{name}_ml" for name in curves), "phase"])
    for t in range(summary["frames"]):
        phase = "ED" if t + 1 == summary["ED_frame"] else "ES" if t + 1 == summary["ES_frame"] else ""
        writer.writerow([t + 1, *(f"{curve[t]:.3f}" for curve in curves.values()), phase])
    atomic_write_text(csv_path, buffer.getvalue())
    json_path = stem_path.with_name(stem_path.name + "_cine.json")
    atomic_write_text(json_path, json.dumps(summary, indent=2) + "\n")
    png_path = stem_path.with_name(stem_path.name + "_volumes.png")
    _plot(png_path, curves, summary)
    return [csv_path, png_path, json_path]


def _plot(path: Path, curves: dict[str, np.ndarray], summary: dict) -> None:
    from seg_densenet.utils.figures import new_figure, save_png

    frames = np.arange(1, summary["frames"] + 1)
    fig = new_figure(6, 3.5)
    ax = fig.add_subplot()
    for name, colour in (("LV", "tab:red"), ("RV", "tab:blue")):
        if name in curves:
            ax.plot(frames, curves[name], marker="o", ms=3, color=colour, label=f"{name} cavity")
    for key, style in (("ED_frame", "--"), ("ES_frame", ":")):
        ax.axvline(summary[key], color="black", ls=style, lw=1, label=f"{key[:2]} (frame {summary[key]})")
    ax.set_xlabel("frame")
    ax.set_ylabel("volume (ml)")
    ax.set_title(
        ", ".join(
            f"{name}EF {summary[f'{name}_EF_pct']:.1f} %"
            for name in ("LV", "RV")
            if f"{name}_EF_pct" in summary
        )
    )
    ax.legend(fontsize=8)
    save_png(fig, path)
