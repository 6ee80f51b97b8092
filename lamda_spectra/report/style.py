"""Shared figure settings: resolution, fonts, depth colours, panel grids, PNG encoding.

Figures are built as :class:`matplotlib.figure.Figure` objects and rendered with the Agg
canvas, so the report never touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import io
import math
import textwrap

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, Colormap
from matplotlib.figure import Figure

DPI = 110
TITLE_SIZE = 11
LABEL_SIZE = 9
TICK_SIZE = 8
DEPTH_CMAP = "viridis"
OTHER_COLOR = "black"  # modules outside the repeated blocks
MISSING_COLOR = "#e6e6e6"  # grid cells with no module


def new_figure(width: float, height: float) -> Figure:
    """Create a constrained-layout figure of ``width`` x ``height`` inches with its own Agg canvas."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure) -> bytes:
    """Render ``figure`` as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def depth_colormap() -> Colormap:
    return matplotlib.colormaps[DEPTH_CMAP]


def depth_norm(n_blocks: int) -> BoundaryNorm:
    """Return a norm with one colour band per block index ``0 .. n_blocks - 1``."""
    n_blocks = max(n_blocks, 1)
    return BoundaryNorm(np.arange(-0.5, n_blocks + 0.5), depth_colormap().N)


def panel_grid(n_panels: int, max_columns: int = 4) -> tuple[int, int]:
    """Return rows and columns for ``n_panels`` panels, balanced so the last row is not nearly empty."""
    n_panels = max(n_panels, 1)
    n_rows = math.ceil(n_panels / max_columns)
    return n_rows, math.ceil(n_panels / n_rows)


def tick_step(n_items: int, item_points: float, label_points: float = TICK_SIZE * 1.8) -> int:
    """Label every ``step``-th of ``n_items`` evenly spaced items so tick labels do not overlap.

    Args:
        n_items: number of positions along the axis.
        item_points: distance between neighbouring positions, in points.
        label_points: space one tick label needs along the axis, in points.
    """
    if n_items <= 1 or item_points <= 0:
        return 1
    step = math.ceil(label_points / item_points)
    # Round up to 1, 2, 4, 5, 8, 10, 16, 20... so labels fall on round layer numbers.
    for nice in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100):
        if nice >= step:
            return nice
    return step


def wrap_title(text: str, width: float, font_size: float) -> str:
    """Wrap each line of ``text`` to fit ``width`` inches at ``font_size`` points."""
    # An average character of the default sans-serif font is about 0.55 em wide.
    chars = max(int(width * 72 / (0.55 * font_size)), 20)
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))
