"""Figures for the training and data reports: matplotlib's object API on an Agg canvas (no pyplot, no GUI backend,
no global state), saved atomically."""

from __future__ import annotations

from pathlib import Path

from minidpo.files import atomic_path


def figure(ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: Path) -> Path:
    """Write `fig` as a PNG at `path`: a reader (or a crash) never sees half a PNG."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
