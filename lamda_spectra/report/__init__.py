"""The spectra report: figures and tables that show where each layer's energy lives and where the budget went.

:func:`report` writes, into one folder and all at once (staged in a temporary folder first):

==========================  ======================================================================
spectra.png                 ``s_i / s_1`` against ``i`` per module type, one line per layer
cumulative_energy.png       captured energy ``sum_{j<=k} p_j`` against ``k``, with r0 and the ranks
energy_heatmap.png          layers x module types, energy score per module
rank_map.png                layers x module types, allocated rank per module
strategies.png              rank sum per layer under the uniform, energy and waterfill strategies
modules.csv                 one row per module: every plan and spectrum field
spectra.csv                 the spectra table, as the scan writes it
index.html                  all of the above on one self-contained page
==========================  ======================================================================

:func:`compare` writes ``rank_map_compare.png`` and ``rank_map_compare.csv`` for two plans.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from .._io import atomic_directory, atomic_write_bytes, atomic_write_text
from ..errors import LamdaError, ReportError
from ..plan import Plan
from ..scan import write_spectra_csv
from .figures import cumulative_energy_figure, spectra_figure
from .heatmaps import compare_rank_maps, energy_heatmap, rank_map
from .html import index_html
from .strategies import allocate_strategies, strategies_figure
from .style import png_bytes
from .tables import (
    check_same_weights,
    compare_grid,
    module_grid,
    modules_csv_text,
    read_plan,
    read_spectra,
    warn_if_other_weights,
)

__all__ = ["REPORT_FILES", "COMPARE_FILES", "report", "compare"]

logger = logging.getLogger(__name__)

REPORT_FILES = (
    "spectra.png",
    "cumulative_energy.png",
    "energy_heatmap.png",
    "rank_map.png",
    "strategies.png",
    "modules.csv",
    "spectra.csv",
    "index.html",
)
COMPARE_FILES = ("rank_map_compare.png", "rank_map_compare.csv")

_CAPTIONS = {
    "spectra.png": "singular values divided by the largest, per module type; colour gives the layer.",
    "cumulative_energy.png": "share of each weight's energy captured by its top k directions; the dashed "
    "line is the base rank r0 and the dots are the allocated ranks.",
    "energy_heatmap.png": "energy score E (share of the energy in the top r0 directions) per module.",
    "rank_map.png": "rank allocated to each module by this plan.",
    "strategies.png": "rank sum and mean captured energy per layer that each strategy gives for this budget.",
}


def report(
    plan: Plan | str | os.PathLike, spectra: pd.DataFrame | str | os.PathLike, out_dir: str | os.PathLike
) -> list[Path]:
    """Write the spectra report of a plan into ``out_dir``.

    Every input is checked and every file is rendered in a temporary folder beside ``out_dir``
    before any file moves into place, so a failure leaves ``out_dir`` as it was.

    Args:
        plan: a :class:`~lamda_spectra.plan.Plan`, or the path of a plan file.
        spectra: the spectra table of the same weights (as :func:`lamda_spectra.scan` returns
            it), or the path of its spectra.csv.
        out_dir: report folder; created if missing. Files with the names in
            :data:`REPORT_FILES` are replaced, other files are kept.

    Returns:
        The written paths, in the order of :data:`REPORT_FILES`.

    Raises:
        ReportError: the plan file is not a plan, the spectra table lacks columns or comes from
            other weights, or ``out_dir`` cannot be written.
    """
    if not isinstance(plan, Plan):
        plan = read_plan(plan)
    spectra, origin = read_spectra(spectra)
    check_same_weights(plan, spectra, origin)
    grid = module_grid(plan, spectra)
    # A "$" would start mathtext in the figure titles.
    model = str(plan.source.get("model_name") or "model").replace("$", r"\$")
    r0 = int(plan.settings.get("r0") or 0)

    # Staging first: an unwritable folder fails before any drawing.
    with _staging(out_dir) as staging:
        figures = {
            "spectra.png": spectra_figure(grid, model),
            "cumulative_energy.png": cumulative_energy_figure(grid, model, r0),
            "energy_heatmap.png": energy_heatmap(grid, model, r0),
            "rank_map.png": rank_map(grid, model, plan.settings, plan.totals["rank_sum"]),
            "strategies.png": strategies_figure(grid, allocate_strategies(plan, spectra), plan.settings, model),
        }
        images = {name: (png_bytes(figure), _CAPTIONS[name]) for name, figure in figures.items()}
        for name, (png, _) in images.items():
            atomic_write_bytes(staging / name, png)
        atomic_write_text(staging / "modules.csv", modules_csv_text(grid))
        write_spectra_csv(spectra, staging / "spectra.csv")
        atomic_write_text(staging / "index.html", index_html(plan, grid, images))
    logger.info("wrote the report of %s into %s", model, out_dir)
    return [Path(out_dir) / name for name in REPORT_FILES]


def compare(
    plan_a: Plan | str | os.PathLike, plan_b: Plan | str | os.PathLike, out_dir: str | os.PathLike
) -> list[Path]:
    """Draw the rank maps of two plans side by side with their difference ``B - A``.

    Writes ``rank_map_compare.png`` and ``rank_map_compare.csv`` (module, layer, type,
    ``rank_a``, ``rank_b``, ``difference``) into ``out_dir``, all at once. Plans of different
    weights (different fingerprints) are still compared, with a :class:`LamdaWarning`.

    Returns:
        The written paths, in the order of :data:`COMPARE_FILES`.

    Raises:
        ReportError: a plan file is not a plan, the plans share no module, or ``out_dir`` cannot
            be written.
    """
    names = []
    plans = []
    labels = []
    for letter, plan in zip("AB", (plan_a, plan_b)):
        if isinstance(plan, Plan):
            plans.append(plan)
            names.append(_describe(plan))
            labels.append(f"plan {letter}")
        else:
            plans.append(read_plan(plan))
            names.append(f"{_describe(plans[-1])} ({_short_path(plan)})")
            labels.append(f"plan {letter} ({_short_path(plan)})")
    warn_if_other_weights(*plans, *labels)
    grid = compare_grid(*plans)
    table = grid.table[["module", "row", "type", "label", "rank_a", "rank_b", "difference"]]

    with _staging(out_dir) as staging:
        atomic_write_bytes(staging / COMPARE_FILES[0], png_bytes(compare_rank_maps(grid, *names)))
        atomic_write_text(staging / COMPARE_FILES[1], table.to_csv(index=False))
    return [Path(out_dir) / name for name in COMPARE_FILES]


def _short_path(path: str | os.PathLike) -> str:
    return "/".join(Path(path).parts[-2:])


def _describe(plan: Plan) -> str:
    settings = plan.settings
    return f"{settings.get('strategy')}, budget {settings.get('budget')}"


@contextlib.contextmanager
def _staging(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder whose files move into ``out_dir`` when the block succeeds."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ReportError(f"report folder {path} exists and is not a folder; choose another output folder")
    with contextlib.ExitStack() as stack:
        try:
            staging = stack.enter_context(atomic_directory(path))
        except LamdaError as err:
            raise ReportError(f"cannot write the report into {path}: {err}") from err
        yield staging
