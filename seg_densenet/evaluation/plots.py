"""PNG figures of an evaluation: Dice box plots, Bland-Altman plots and contour overlays.

Figures are built with :mod:`seg_densenet.utils.figures` (the Agg canvas, never pyplot; atomic writes).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from seg_densenet.data.labels import report_phases
from seg_densenet.utils.figures import new_figure, save_png


def dice_boxplot(metric_rows: Sequence[dict], structures: Sequence[str], path: Path) -> None:
    """Box plot of the per-frame Dice of every structure at ED and ES."""
    phases = report_phases(r["phase"] for r in metric_rows)
    fig = new_figure(1.6 * len(structures) * len(phases) + 1.5, 4.0)
    ax = fig.add_subplot()
    data, names = [], []
    for s in structures:
        for phase in phases:
            values = [r["dice"] for r in metric_rows if r["structure"] == s and r["phase"] == phase]
            data.append(values)
            names.append(f"{s}\n{phase}")
    ax.boxplot(data, tick_labels=names, showmeans=True)
    ax.set_ylabel("Dice")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Dice per structure and phase")
    save_png(fig, path)


def bland_altman(pred: Sequence[float], gt: Sequence[float], name: str, unit: str, path: Path) -> None:
    """Bland-Altman plot: difference ``pred - gt`` against the mean of both, with bias and ±1.96 SD lines."""
    pred_arr, gt_arr = np.asarray(pred, float), np.asarray(gt, float)
    keep = np.isfinite(pred_arr) & np.isfinite(gt_arr)
    pred_arr, gt_arr = pred_arr[keep], gt_arr[keep]
    mean, diff = (pred_arr + gt_arr) / 2.0, pred_arr - gt_arr
    fig = new_figure(5.0, 4.0)
    ax = fig.add_subplot()
    ax.scatter(mean, diff, s=16, alpha=0.8)
    if diff.size:
        bias = diff.mean()
        sd = diff.std(ddof=1) if diff.size > 1 else 0.0
        ax.axhline(bias, color="k", label=f"bias {bias:.2f}")
        for sign in (-1, 1):
            ax.axhline(bias + sign * 1.96 * sd, color="k", linestyle="--")
        ax.legend(loc="best", fontsize=8, title=f"LoA ±{1.96 * sd:.2f}", title_fontsize=8)
    ax.set_xlabel(f"mean of prediction and ground truth ({unit})")
    ax.set_ylabel(f"prediction - ground truth ({unit})")
    ax.set_title(f"Bland-Altman: {name} (n={diff.size})")
    ax.grid(alpha=0.3)
    save_png(fig, path)


STRUCTURE_COLOURS = {"RV": "#1f77ff", "MYO": "#2ca02c", "LV": "#ff2020"}
"""One colour per structure in the overlays (RV blue, myocardium green, LV red); others cycle below."""
_OTHER_COLOURS = ("#ff7f0e", "#9467bd", "#17becf", "#e377c2")


def structure_colours(labels: Mapping[str, int]) -> dict[str, str]:
    """``{structure: colour}``: the fixed colours of :data:`STRUCTURE_COLOURS`, then a cycle for others."""
    others = iter(_OTHER_COLOURS * (1 + len(labels)))
    return {name: STRUCTURE_COLOURS.get(name) or next(others) for name in labels}


def overlay_montage(
    image: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    labels: Mapping[str, int],
    title: str,
    path: Path,
    n_slices: int = 3,
) -> None:
    """Mid short-axis slices of ``image``, each structure in its own colour: the prediction as a filled
    translucent region, the ground truth as a contour line on top.

    image: ``(X, Y, Z)`` float; gt, pred: ``(X, Y, Z)`` integer label maps. The slices are spread over
    the middle of the ground truth's extent along Z (or of the stack if the ground truth is empty).
    """
    panels = [(image, gt, pred, f"slice {z}", z) for z in _mid_slices(gt, n_slices)]
    save_png(_overlay_figure(panels, labels, title), path)


def overlay_image(
    image: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    labels: Mapping[str, int],
    title: str,
    n_slices: int = 3,
) -> np.ndarray:
    """:func:`overlay_montage` as an ``(H, W, 3)`` uint8 RGB array (for TensorBoard)."""
    panels = [(image, gt, pred, f"slice {z}", z) for z in _mid_slices(gt, n_slices)]
    fig = _overlay_figure(panels, labels, title, panel_size=2.4)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def overlay_strip(
    phases: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    labels: Mapping[str, int],
    title: str,
    n_slices: int = 2,
) -> bytes:
    """PNG bytes of one case's strip: ``n_slices`` mid slices of each phase (``{"ED": (image, gt, pred)}``),
    coloured as :func:`overlay_montage`."""
    panels = [
        (image, gt, pred, f"{phase} slice {z}", z)
        for phase, (image, gt, pred) in phases.items()
        for z in _mid_slices(gt, n_slices)
    ]
    fig = _overlay_figure(panels, labels, title, panel_size=2.4)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def _overlay_figure(panels, labels: Mapping[str, int], title: str, panel_size: float = 3.2) -> Figure:
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Patch

    colours = structure_colours(labels)
    fig = new_figure(panel_size * len(panels), panel_size + 0.6)
    for i, (image, gt, pred, caption, z) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        # transpose: arrays are (X, Y) and imshow draws rows as the vertical axis
        ax.imshow(image[:, :, z].T, cmap="gray", origin="lower")
        fill = np.zeros((*gt.shape[:2][::-1], 4), dtype=np.float32)
        for name, value in labels.items():
            fill[(pred[:, :, z] == value).T] = to_rgba(colours[name], alpha=0.4)
        ax.imshow(fill, origin="lower", interpolation="nearest")
        for name, value in labels.items():
            plane = (gt[:, :, z] == value).T.astype(np.float32)
            if plane.any():
                ax.contour(plane, levels=[0.5], colors=colours[name], linewidths=1.2)
        ax.set_title(caption, fontsize=9)
        ax.set_axis_off()
    handles = [
        Patch(facecolor=to_rgba(colours[name], 0.4), edgecolor=colours[name], label=name) for name in labels
    ]
    handles += [Line2D([], [], color="white", lw=0, label="fill: prediction, line: ground truth")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def _mid_slices(gt: np.ndarray, n: int) -> list[int]:
    occupied = np.flatnonzero(gt.reshape(-1, gt.shape[2]).any(axis=0))
    lo, hi = (occupied[0], occupied[-1]) if occupied.size else (0, gt.shape[2] - 1)
    # quantiles inside the extent, e.g. 25/50/75 % for three slices
    positions = np.linspace(lo, hi, n + 2)[1:-1] if hi > lo else np.full(n, lo)
    return sorted({int(round(p)) for p in positions})[:n] or [int(lo)]
