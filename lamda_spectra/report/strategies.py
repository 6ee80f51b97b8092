"""Rank allocations of every strategy at the plan's budget, from the same spectra, and their figure."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..plan import plan as make_plan
from ..errors import LamdaError
from ..plan import Plan
from .names import OTHER_ROW
from .style import LABEL_SIZE, TICK_SIZE, TITLE_SIZE, new_figure, tick_step, wrap_title
from .tables import ModuleGrid

logger = logging.getLogger(__name__)

STRATEGIES = ("uniform", "energy", "waterfill")
STRATEGY_STYLES = {
    "uniform": {"color": "grey", "linestyle": "--", "marker": "s"},
    "energy": {"color": "tab:blue", "linestyle": "-", "marker": "o"},
    "waterfill": {"color": "tab:orange", "linestyle": "-", "marker": "^"},
}
# Up to this many layers the figure uses grouped bars; above it, lines.
MAX_BAR_ROWS = 16


def allocate_strategies(plan: Plan, spectra: pd.DataFrame) -> dict[str, Plan | str]:
    """Re-plan the same modules with every strategy at the plan's budget and rank bounds.

    Only the cached singular values in ``spectra`` are used, so no SVD runs.

    Returns:
        Strategy name to its plan, or to the one-line error that strategy raised (for example
        a budget that is infeasible under its rounding).
    """
    settings = plan.settings
    planned = spectra[spectra["module"].isin(set(plan.modules))].reset_index(drop=True)
    planned.attrs = dict(spectra.attrs)
    results: dict[str, Plan | str] = {}
    for name in STRATEGIES:
        try:
            results[name] = make_plan(
                planned,
                budget=settings["budget"],
                strategy=name,
                r0=settings.get("r0"),
                min_rank=settings.get("min_rank", 1),
                max_rank=settings.get("max_rank"),
                multiple_of=settings.get("multiple_of", 1),
            )
        except LamdaError as err:
            logger.warning("strategy %s left out of the comparison: %s", name, err)
            results[name] = str(err)
    return results


def strategies_figure(grid: ModuleGrid, allocations: dict[str, Plan | str], settings: dict, model: str) -> Figure:
    """Plot per layer the rank sum and the mean captured energy that each strategy gives."""
    rows = grid.rows
    width = min(16.0, max(7.0, 0.11 * len(rows) + 4.0))
    figure = new_figure(width, 6.4)
    rank_ax, energy_ax = figure.subplots(2, 1, sharex=True)
    row_of = dict(zip(grid.table["module"], grid.table["row"]))

    notes = []
    plotted = [(name, result) for name, result in allocations.items() if isinstance(result, Plan)]
    for index, (name, result) in enumerate(plotted):
        per_row = _per_row(result, row_of, rows)
        captured = float(np.mean([module.captured_energy for module in result.modules.values()]))
        ours = " (this plan)" if name == settings.get("strategy") else ""
        label = f"{name}{ours}: rank sum {result.totals['rank_sum']}, mean captured energy {captured:.3f}"
        _plot(rank_ax, per_row["rank"], index, len(plotted), name, label)
        _plot(energy_ax, per_row["captured_energy"], index, len(plotted), name, None)
    for name, result in allocations.items():
        if isinstance(result, str):
            notes.append(f"{name} failed: {result}")

    rank_ax.set_ylabel("rank sum over the layer's modules", fontsize=LABEL_SIZE)
    energy_ax.set_ylabel("mean captured energy\n(share of $||W||_F^2$)", fontsize=LABEL_SIZE)
    energy_ax.set_ylim(0.0, 1.02)
    energy_ax.set_xlabel("layer (block index)", fontsize=LABEL_SIZE)
    for ax in (rank_ax, energy_ax):
        ax.tick_params(labelsize=TICK_SIZE)
        ax.grid(True, axis="y", linewidth=0.4, alpha=0.5)
    step = tick_step(len(rows), width * 72 * 0.8 / max(len(rows), 1), label_points=TICK_SIZE * 3.5)
    ticks = [i for i, row in enumerate(rows) if i % step == 0 or row == OTHER_ROW]
    energy_ax.set_xticks(ticks, [rows[i] for i in ticks])
    rank_ax.set_ylim(bottom=0)
    # Below the panels, where it cannot hide a bar or a line.
    figure.legend(fontsize=TICK_SIZE + 1, loc="outside lower center", ncols=1)

    title = (
        f"Rank per layer of {model} under each strategy for budget {settings.get('budget')}\n"
        f"r0 = {settings.get('r0')}; the same spectra, so no new SVD"
    )
    if notes:
        title += "\n" + "; ".join(notes)
    figure.suptitle(wrap_title(title, width, TITLE_SIZE), fontsize=TITLE_SIZE)
    return figure


def _per_row(result: Plan, row_of: dict[str, str], rows: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "row": [row_of[name] for name in result.modules],
            "rank": [module.rank for module in result.modules.values()],
            "captured_energy": [module.captured_energy for module in result.modules.values()],
        }
    )
    return frame.groupby("row").agg({"rank": "sum", "captured_energy": "mean"}).reindex(rows)


def _plot(ax: Axes, values: pd.Series, index: int, count: int, name: str, label: str | None) -> None:
    """Grouped bars for a few layers, lines with markers for many."""
    style = STRATEGY_STYLES.get(name, {})
    positions = np.arange(len(values))
    if len(values) <= MAX_BAR_ROWS:
        width = 0.8 / max(count, 1)
        offset = (index - (count - 1) / 2) * width
        ax.bar(positions + offset, values.to_numpy(), width=width, color=style.get("color"), label=label)
        return
    # The "other" row is no layer, so no line leads to it: it gets its marker alone.
    blocks = len(values) - int(values.index[-1] == OTHER_ROW)
    ax.plot(
        positions[:blocks],
        values.to_numpy()[:blocks],
        color=style.get("color"),
        linestyle=style.get("linestyle"),
        marker=style.get("marker"),
        markersize=3,
        linewidth=1.2,
        label=label,
    )
    if blocks < len(values):
        ax.plot(positions[blocks:], values.to_numpy()[blocks:], color=style.get("color"), marker=style.get("marker"))
