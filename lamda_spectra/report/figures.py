"""Per-module-type line plots: normalized spectra and cumulative energy, one line per block."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .names import OTHER_ROW
from .style import (
    LABEL_SIZE,
    OTHER_COLOR,
    TICK_SIZE,
    TITLE_SIZE,
    depth_colormap,
    depth_norm,
    new_figure,
    panel_grid,
    tick_step,
    wrap_title,
)
from .tables import ModuleGrid

PANEL_WIDTH = 3.3  # inches
PANEL_HEIGHT = 2.7
# Normalized singular values below this are not drawn. Such values are usually rounding noise
# of a low-rank weight, and a log axis down to 1e-16 would squeeze every other spectrum.
MIN_RATIO = 1e-6
R0_COLOR = "crimson"


def spectra_figure(grid: ModuleGrid, model: str) -> Figure:
    """Plot ``s_i / s_1`` against ``i`` on log axes: one panel per module type, one line per block."""
    figure, axes = _panels(grid)
    clipped = False
    for ax, label in zip(axes, grid.columns):
        modules = grid.table[grid.table["label"] == label]
        lines, colors = [], []
        for row, values in zip(modules["row"], modules["singular_values"]):
            if len(values) == 0 or values[0] <= 0:
                continue
            ratios = values / values[0]
            clipped = clipped or bool((ratios < MIN_RATIO).any())
            ratios = ratios[ratios >= MIN_RATIO]
            lines.append(np.column_stack([np.arange(1, len(ratios) + 1), ratios]))
            colors.append(_row_color(grid, row))
        _add_lines(ax, lines, colors, log_y=True)
        _label_panel(ax, grid, label, "index i (1 = largest)", "$s_i / s_1$ (ratio)")

    notes = [_coverage_note(grid)]
    if clipped:
        notes.append(f"ratios below {MIN_RATIO:g} are not drawn")
    title = f"Normalized singular values of {model}, one line per layer\n" + "; ".join(notes)
    _finish(figure, axes, grid, title)
    return figure


def cumulative_energy_figure(grid: ModuleGrid, model: str, r0: int) -> Figure:
    """Plot the captured energy ``sum_{j<=k} p_j`` against ``k``, with ``r0`` and each allocated rank marked."""
    figure, axes = _panels(grid)
    for ax, label in zip(axes, grid.columns):
        modules = grid.table[grid.table["label"] == label]
        lines, colors, marks = [], [], []
        for module in modules.itertuples():
            if module.frobenius_norm <= 0 or len(module.singular_values) == 0:
                continue
            shares = np.cumsum(module.singular_values**2) / module.frobenius_norm**2
            lines.append(np.column_stack([np.arange(1, len(shares) + 1), shares]))
            colors.append(_row_color(grid, module.row))
            marks.append((module.rank, module.captured_energy))
        _add_lines(ax, lines, colors, log_y=False)
        if marks:
            ranks, captured = zip(*marks)
            ax.scatter(ranks, captured, c=colors, s=16, edgecolors="black", linewidths=0.5, zorder=3)
        ax.axvline(r0, color=R0_COLOR, linestyle="--", linewidth=1.0)
        ax.set_ylim(0.0, 1.02)
        _label_panel(ax, grid, label, "rank k (log scale)", "captured energy (share)")

    # Below the panels, where it cannot hide a curve.
    figure.legend(
        handles=[
            Line2D([], [], color=R0_COLOR, linestyle="--", label=f"base rank r0 = {r0}"),
            Line2D([], [], color="grey", marker="o", markeredgecolor="black", linestyle="", label="allocated rank"),
        ],
        fontsize=LABEL_SIZE,
        loc="outside lower center",
        ncols=2,
    )
    # No spaces inside $...$: wrap_title breaks lines at spaces.
    title = (
        f"Captured energy $\\Sigma_{{j\\leq k}}p_j$ of {model}, one line per layer\n"
        f"$p_j=s_j^2/||W||_F^2$; {_coverage_note(grid)}"
    )
    _finish(figure, axes, grid, title)
    return figure


def _panels(grid: ModuleGrid) -> tuple[Figure, list[Axes]]:
    n_rows, n_columns = panel_grid(len(grid.columns))
    figure = new_figure(PANEL_WIDTH * n_columns + 1.2, PANEL_HEIGHT * n_rows + 1.0)
    axes = list(figure.subplots(n_rows, n_columns, squeeze=False).flat)
    for ax in axes[len(grid.columns) :]:
        ax.remove()
    return figure, axes[: len(grid.columns)]


def _row_color(grid: ModuleGrid, row: str):
    if row == OTHER_ROW:
        return OTHER_COLOR
    return depth_colormap()(depth_norm(len(grid.block_rows))(grid.block_rows.index(row)))


def _add_lines(ax: Axes, lines: list[np.ndarray], colors: list, *, log_y: bool) -> None:
    # One LineCollection per panel keeps 128 layers x 4096 values fast to draw.
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    if not lines:
        ax.text(0.5, 0.5, "no spectrum (all-zero weights)", ha="center", va="center", transform=ax.transAxes)
        return
    ax.add_collection(LineCollection(lines, colors=colors, linewidths=0.9, alpha=0.85))
    ax.autoscale_view()


def _label_panel(ax: Axes, grid: ModuleGrid, label: str, xlabel: str, ylabel: str) -> None:
    kind = grid.types[label]
    title = label if kind == label else f"{label}  ({kind})"
    ax.set_title(title, fontsize=LABEL_SIZE + 1)
    ax.set_xlabel(xlabel, fontsize=LABEL_SIZE)
    ax.set_ylabel(ylabel, fontsize=LABEL_SIZE)
    ax.tick_params(which="both", labelsize=TICK_SIZE)
    ax.grid(True, which="major", linewidth=0.4, alpha=0.5)


def _coverage_note(grid: ModuleGrid) -> str:
    """Say whether the lines hold every singular value or only the top ones the scan computed."""
    other = f"; {OTHER_COLOR} lines: modules outside the layers" if OTHER_ROW in grid.rows else ""
    return _values_note(grid) + other


def _values_note(grid: ModuleGrid) -> str:
    full = grid.table["full"].astype(bool)
    if full.all():
        return "every singular value (full spectrum)"
    kept = grid.table.loc[~full, "n_values"]
    counts = f"{int(kept.min())}" if kept.min() == kept.max() else f"{int(kept.min())} to {int(kept.max())}"
    scope = "" if not full.any() else f" for {int((~full).sum())} of {len(full)} modules"
    return f"top {counts} singular values only{scope}: rerun lamda-plan with --full-spectrum to plot them all"


def _finish(figure: Figure, axes: list[Axes], grid: ModuleGrid, title: str) -> None:
    """Add the depth colour bar (one band per layer) and the title."""
    blocks = grid.block_rows
    if blocks:
        mappable = ScalarMappable(norm=depth_norm(len(blocks)), cmap=depth_colormap())
        colorbar = figure.colorbar(mappable, ax=axes, fraction=0.03, pad=0.01, aspect=40)
        height_points = figure.get_figheight() * 72 * 0.8
        step = tick_step(len(blocks), height_points / len(blocks))
        ticks = list(range(0, len(blocks), step))
        colorbar.set_ticks(ticks, labels=[blocks[i] for i in ticks])
        colorbar.minorticks_off()
        colorbar.set_label("layer (block index)", fontsize=LABEL_SIZE)
        colorbar.ax.tick_params(labelsize=TICK_SIZE)
    figure.suptitle(wrap_title(title, figure.get_figwidth(), TITLE_SIZE), fontsize=TITLE_SIZE)
