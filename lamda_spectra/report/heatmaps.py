"""Block x module-type heatmaps: energy scores, allocated ranks, and two plans compared."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

from .names import OTHER_ROW
from .style import LABEL_SIZE, MISSING_COLOR, TICK_SIZE, TITLE_SIZE, new_figure, tick_step, wrap_title
from .tables import ModuleGrid

CELL_WIDTH = 0.62  # inches per module-type column
MAX_CELL_HEIGHT = 0.42  # inches per block row
MIN_CELL_HEIGHT = 0.11
GRID_HEIGHT = 11.0  # inches the rows share before they shrink to MIN_CELL_HEIGHT
MAX_VALUE_SIZE = 8.0  # font size of cell annotations, in points
MIN_VALUE_SIZE = 5.5  # below this (8 pixels at 110 dpi), annotations are left out
# Rows below this count get a horizontal colour bar: a vertical one would be too short to read.
VERTICAL_COLORBAR_ROWS = 8


@dataclass(frozen=True)
class Heatmap:
    """One panel: a values grid with its colour scale and annotation format."""

    values: np.ndarray  # (rows, columns); NaN where no module is
    title: str
    cmap: Colormap
    norm: Normalize
    format_value: Callable[[float], str]  # text of a cell's annotation
    colorbar_label: str


def energy_heatmap(grid: ModuleGrid, model: str, r0: int) -> Figure:
    """Draw each module's energy score ``E = sum_{i<=r0} p_i`` on the block x type grid."""
    values = grid.matrix("energy_score")
    panel = Heatmap(
        values=values,
        title="",
        cmap=_with_missing("magma"),
        norm=_data_range(values),
        format_value="{:.2f}".format,
        colorbar_label=f"energy score E: share of $||W||_F^2$ in the top r0 = {r0} directions",
    )
    title = f"Energy score per module of {model} (r0 = {r0})"
    return _draw(grid, [panel], title)


def rank_map(grid: ModuleGrid, model: str, settings: dict, rank_sum: int) -> Figure:
    """Draw each module's allocated rank on the block x type grid."""
    values = grid.matrix("rank")
    panel = Heatmap(
        values=values,
        title="",
        cmap=_with_missing("viridis"),
        norm=_data_range(values),
        format_value="{:.0f}".format,
        colorbar_label="allocated rank r (adapter dimensions)",
    )
    title = (
        f"Allocated rank per module of {model}\nstrategy {settings.get('strategy')}, "
        f"budget {settings.get('budget')}, rank sum {rank_sum} over {len(grid.table)} modules"
    )
    return _draw(grid, [panel], title)


def compare_rank_maps(grid: ModuleGrid, name_a: str, name_b: str) -> Figure:
    """Draw the rank maps of two plans side by side and their difference ``B - A``."""
    rank_a = grid.matrix("rank_a")
    rank_b = grid.matrix("rank_b")
    difference = grid.matrix("difference")
    ranks = _data_range(np.concatenate([rank_a, rank_b]))
    # A symmetric scale keeps zero white even when every change has the same sign.
    spread = max(float(np.nanmax(np.abs(difference))) if np.isfinite(difference).any() else 0.0, 1.0)
    panels = [
        Heatmap(rank_a, f"A: {name_a}", _with_missing("viridis"), ranks, "{:.0f}".format, "rank r"),
        Heatmap(rank_b, f"B: {name_b}", _with_missing("viridis"), ranks, "{:.0f}".format, "rank r"),
        Heatmap(
            difference,
            "B - A",
            _with_missing("RdBu_r"),
            TwoSlopeNorm(0.0, -spread, spread),
            _signed,
            "rank difference (B - A)",
        ),
    ]
    changed = int(np.sum(np.isfinite(difference) & (difference != 0)))
    title = f"Rank maps compared: {changed} of {int(np.isfinite(difference).sum())} shared modules change rank"
    return _draw(grid, panels, title)


def _data_range(values: np.ndarray) -> Normalize:
    """Spread the colours over the values present: the cells carry the numbers, the colours the contrast."""
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    return Normalize(low, high)


def _signed(value: float) -> str:
    return f"{value:+.0f}" if value else "0"


def _with_missing(name: str) -> Colormap:
    return matplotlib.colormaps[name].with_extremes(bad=MISSING_COLOR)


def _draw(grid: ModuleGrid, panels: list[Heatmap], title: str) -> Figure:
    """Lay out the panels side by side, then annotate the cells at a size that fits them."""
    n_rows, n_columns = len(grid.rows), len(grid.columns)
    cell_height = min(MAX_CELL_HEIGHT, max(MIN_CELL_HEIGHT, GRID_HEIGHT / n_rows))
    vertical = n_rows >= VERTICAL_COLORBAR_ROWS
    panel_width = n_columns * CELL_WIDTH + (2.2 if vertical else 1.0)
    width = max(5.5, len(panels) * panel_width + 0.4)
    height = n_rows * cell_height + (2.2 if vertical else 3.0)
    figure = new_figure(width, height)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]

    for ax, panel in zip(axes, panels):
        _draw_panel(figure, ax, grid, panel, vertical=vertical, row_points=cell_height * 72)

    notes = []
    if np.isnan(panels[0].values).any():
        notes.append("grey: no module of this type in the block")
    figure.draw_without_rendering()
    skipped = [_annotate(figure, ax, panel) for ax, panel in zip(axes, panels)]
    if any(skipped):
        notes.append("values left out because the cells are too small (see modules.csv)")
    full_title = title + ("\n" + "; ".join(notes) if notes else "")
    figure.suptitle(wrap_title(full_title, width, TITLE_SIZE), fontsize=TITLE_SIZE)
    return figure


def _draw_panel(
    figure: Figure, ax: Axes, grid: ModuleGrid, panel: Heatmap, *, vertical: bool, row_points: float
) -> None:
    image = ax.imshow(
        np.ma.masked_invalid(panel.values), cmap=panel.cmap, norm=panel.norm, aspect="auto", interpolation="nearest"
    )
    if panel.title:
        ax.set_title(panel.title, fontsize=LABEL_SIZE + 1)

    # Module types along x: turned labels when the longest does not fit its column.
    ax.set_xticks(range(len(grid.columns)), grid.columns, fontsize=TICK_SIZE)
    longest = max(len(label) for label in grid.columns)
    if longest * TICK_SIZE * 0.6 > CELL_WIDTH * 72 * 0.9:
        ax.tick_params(axis="x", labelrotation=40)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    ax.set_xlabel("module type", fontsize=LABEL_SIZE)

    # Blocks along y: every step-th label, so labels never overlap; "other" always labelled.
    # The layout takes some height for margins, so a row ends up a little under row_points.
    step = tick_step(len(grid.rows), 0.85 * row_points)
    ticks = [i for i, row in enumerate(grid.rows) if i % step == 0 or row == OTHER_ROW]
    ax.set_yticks(ticks, [grid.rows[i] for i in ticks], fontsize=TICK_SIZE)
    ax.set_ylabel("layer (block index)", fontsize=LABEL_SIZE)
    if OTHER_ROW in grid.rows and len(grid.rows) > 1:
        ax.axhline(len(grid.rows) - 1.5, color="black", linewidth=1.2)

    colorbar = figure.colorbar(
        image,
        ax=ax,
        location="right" if vertical else "bottom",
        fraction=0.08 if vertical else 0.12,
        shrink=1.0 if vertical else 0.9,
        pad=0.02,
    )
    colorbar.set_label(panel.colorbar_label, fontsize=TICK_SIZE)
    colorbar.ax.tick_params(labelsize=TICK_SIZE)


def _annotate(figure: Figure, ax: Axes, panel: Heatmap) -> bool:
    """Write each value in its cell; returns True when the cells are too small and nothing is written."""
    n_rows, n_columns = panel.values.shape
    box = ax.get_window_extent()
    points_per_pixel = 72 / figure.dpi
    cell_height = box.height * points_per_pixel / n_rows
    cell_width = box.width * points_per_pixel / n_columns
    texts = [panel.format_value(value) for value in panel.values[np.isfinite(panel.values)]]
    chars = max((len(text) for text in texts), default=1)
    size = min(MAX_VALUE_SIZE, 0.6 * cell_height, 0.85 * cell_width / (0.6 * chars))
    if size < MIN_VALUE_SIZE:
        return True

    for (i, j), value in np.ndenumerate(panel.values):
        if not math.isfinite(value):
            continue
        red, green, blue, _ = panel.cmap(panel.norm(value))
        luminance = 0.299 * red + 0.587 * green + 0.114 * blue
        ax.text(
            j,
            i,
            panel.format_value(value),
            ha="center",
            va="center",
            fontsize=size,
            color="black" if luminance > 0.5 else "white",
            clip_on=True,
        )
    return False
