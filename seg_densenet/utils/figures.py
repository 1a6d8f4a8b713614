"""PNG figures without pyplot: a :class:`~matplotlib.figure.Figure` on the Agg canvas, saved atomically.

No display and no global figure state (``pyplot``'s current figure, ``matplotlib.use``) are involved, so
plots can be drawn from any thread or process, and a killed write never leaves a truncated PNG.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from seg_densenet.utils.atomic import atomic_path


def new_figure(width: float, height: float) -> Figure:
    """A ``width`` x ``height`` inch figure with constrained layout, drawn on the Agg canvas."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path, dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` as PNG, atomically."""
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
