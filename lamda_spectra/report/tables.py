"""The report's inputs: load a plan and its spectra table, check they match, join them per module."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from .._text import count_noun
from ..errors import LamdaError, LamdaWarning, ReportError
from ..plan import Plan, load_plan
from ..scan import SPECTRA_COLUMNS, read_spectra_csv
from .names import OTHER_ROW, order_labels, parse_module_name, row_labels, short_labels

logger = logging.getLogger(__name__)

# Plan fields copied into the module table, in this column order.
_PLAN_FIELDS = ("rank", "energy_score", "captured_energy", "stable_rank", "frobenius_norm", "spectral_norm")
# Spectra fields that the plan does not hold.
_SPECTRA_FIELDS = ("tensor", "layout", "d_out", "d_in", "dtype", "effective_rank", "n_values", "full", "method")


@dataclass(frozen=True)
class ModuleGrid:
    """The modules of one plan, joined with their spectra and placed on a block x type grid.

    ``table`` has one row per module, in plan order, with the columns ``module``, ``row`` (block
    label: the layer index, or ``other``), ``stack``, ``layer``, ``type`` (path inside the block),
    ``label`` (short type label), the plan fields, the spectrum fields, the parameter counts
    ``core_params`` (r^2), ``pmb_params`` (r * d_out) and ``lora_params`` (r * (d_in + d_out)),
    and ``singular_values`` (float64 arrays).
    """

    table: pd.DataFrame
    rows: list[str]  # block labels, top to bottom; "other" last when present
    columns: list[str]  # type labels, left to right (see names.order_labels)
    types: dict[str, str]  # type label to type path

    def matrix(self, column: str) -> np.ndarray:
        """Return ``table[column]`` as a float ``(len(rows), len(columns))`` array, NaN where no module is."""
        values = np.full((len(self.rows), len(self.columns)), np.nan)
        row_index = {row: i for i, row in enumerate(self.rows)}
        column_index = {label: j for j, label in enumerate(self.columns)}
        column_values = self.table[column].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
        for row, label, value in zip(self.table["row"], self.table["label"], column_values):
            values[row_index[row], column_index[label]] = value
        return values

    @property
    def block_rows(self) -> list[str]:
        """Block labels without the ``other`` row."""
        return [row for row in self.rows if row != OTHER_ROW]


def read_plan(path: str | os.PathLike) -> Plan:
    """Load a plan file for a report.

    Raises:
        ReportError: the file is missing, unreadable or not a valid plan.
    """
    try:
        return load_plan(path)
    except (LamdaError, OSError) as err:
        message = str(err)
        if str(path) not in message:
            message = f"{path} is not a readable lamda-spectra plan: {message}"
        raise ReportError(message) from err


def read_spectra(spectra: pd.DataFrame | str | os.PathLike) -> tuple[pd.DataFrame, str]:
    """Return the spectra table and a name for it in messages (its path, or "spectra table").

    Raises:
        ReportError: the file cannot be read or the table lacks columns (all of them named).
    """
    if isinstance(spectra, pd.DataFrame):
        origin = "the spectra table"
        missing = [column for column in SPECTRA_COLUMNS if column not in spectra.columns]
        if missing:
            raise ReportError(
                f"{origin} is missing columns {', '.join(missing)}; pass the table that lamda_spectra.scan returns"
            )
        return spectra, origin
    try:
        return read_spectra_csv(spectra), str(spectra)
    except LamdaError as err:
        raise ReportError(str(err)) from err


def check_same_weights(plan: Plan, spectra: pd.DataFrame, origin: str) -> None:
    """Raise ReportError unless the plan and the spectra table come from the same weights.

    Both carry the weights fingerprint, and every planned module must have a spectrum.
    """
    fingerprints = sorted({value for value in spectra["fingerprint"].dropna().astype(str) if value})
    if not plan.fingerprint or not fingerprints:
        # A plan built from a table without a fingerprint stores "" (unknown): only the module
        # names can be compared then.
        logger.warning("cannot check that %s and the plan come from the same weights: no fingerprint", origin)
    elif fingerprints != [plan.fingerprint]:
        found = ", ".join(value[:12] for value in fingerprints) or "none"
        raise ReportError(
            f"{origin} comes from other weights than the plan (fingerprint {found} against "
            f"{plan.fingerprint[:12]}); pass the spectra.csv written with this plan"
        )
    missing = [name for name in plan.modules if name not in set(spectra["module"])]
    if missing:
        sample = ", ".join(missing[:3])
        raise ReportError(
            f"{origin} has no spectrum for {count_noun(len(missing), 'planned module')} (for example {sample}); "
            "pass the spectra.csv written with this plan, or rerun lamda-plan"
        )


def warn_if_other_weights(plan_a: Plan, plan_b: Plan, label_a: str, label_b: str) -> None:
    """Warn with a :class:`LamdaWarning` when two compared plans come from different weights.

    Rank differences between plans of different checkpoints mix the effect of the weights with
    that of the settings. A plan with an unknown fingerprint (``""``) cannot be checked, which is
    only logged.
    """
    if not plan_a.fingerprint or not plan_b.fingerprint:
        logger.warning("cannot check that %s and %s come from the same weights: no fingerprint", label_a, label_b)
    elif plan_a.fingerprint != plan_b.fingerprint:
        message = (
            f"{label_a} comes from {describe_source(plan_a.source)} (fingerprint {plan_a.fingerprint[:12]}) and "
            f"{label_b} from {describe_source(plan_b.source)} (fingerprint {plan_b.fingerprint[:12]}), "
            "so this comparison is across different weights"
        )
        # stacklevel 3 points at the caller of report.compare.
        warnings.warn(message, LamdaWarning, stacklevel=3)


def describe_source(source: dict) -> str:
    """Name a plan's checkpoint: Hub repo id (with ``@revision``), else path, else model name."""
    if source.get("repo_id"):
        revision = source.get("revision")
        return f"{source['repo_id']}@{revision}" if revision else str(source["repo_id"])
    return str(source.get("path") or source.get("model_name") or "an unknown checkpoint")


def place_modules(names: list[str]) -> ModuleGrid:
    """Place modules on the block x type grid; the table holds only the placement columns."""
    sites = [parse_module_name(name) for name in names]
    rows_by_site = row_labels(sites)
    labels = short_labels(site.kind for site in sites)
    table = pd.DataFrame(
        {
            "module": [site.name for site in sites],
            "row": [rows_by_site[(site.stack, site.layer)] for site in sites],
            "stack": [site.stack for site in sites],
            "layer": pd.array([site.layer for site in sites], dtype="Int64"),
            "type": [site.kind for site in sites],
            "label": [labels[site.kind] for site in sites],
        }
    )
    return ModuleGrid(
        table=table,
        rows=_ordered_rows(sites, rows_by_site),
        columns=order_labels(table["label"]),
        types={label: kind for kind, label in labels.items()},
    )


def module_grid(plan: Plan, spectra: pd.DataFrame) -> ModuleGrid:
    """Join the plan and its spectra per module and place each module on the block x type grid.

    Rows of ``spectra`` for modules the plan does not hold are left out.
    """
    grid = place_modules(list(plan.modules))
    by_module = spectra.set_index("module")
    records = []
    for name, module in plan.modules.items():
        spectrum = by_module.loc[name]
        record = {field: getattr(module, field) for field in _PLAN_FIELDS}
        record.update({field: spectrum[field] for field in _SPECTRA_FIELDS})
        d_out, d_in = module.shape
        record["core_params"] = module.rank**2
        record["pmb_params"] = module.rank * d_out
        record["lora_params"] = module.rank * (d_in + d_out)
        record["singular_values"] = np.asarray(spectrum["singular_values"], dtype=np.float64)
        records.append(record)
    table = pd.concat([grid.table, pd.DataFrame.from_records(records)], axis=1)
    return replace(grid, table=table)


def compare_grid(plan_a: Plan, plan_b: Plan) -> ModuleGrid:
    """Place the modules of two plans on one grid with columns ``rank_a``, ``rank_b`` and ``difference``.

    A module missing from one plan has a missing rank there and no difference.

    Raises:
        ReportError: the plans share no module.
    """
    if not set(plan_a.modules) & set(plan_b.modules):
        raise ReportError(
            f"the two plans share no module (for example {next(iter(plan_a.modules), '-')} against "
            f"{next(iter(plan_b.modules), '-')}); compare plans of the same model"
        )
    names = list(dict.fromkeys([*plan_a.modules, *plan_b.modules]))
    grid = place_modules(names)
    table = grid.table.copy()
    table["rank_a"] = pd.array([_rank(plan_a, name) for name in names], dtype="Int64")
    table["rank_b"] = pd.array([_rank(plan_b, name) for name in names], dtype="Int64")
    table["difference"] = table["rank_b"] - table["rank_a"]
    return replace(grid, table=table)


def _rank(plan: Plan, name: str) -> int | None:
    module = plan.modules.get(name)
    return None if module is None else module.rank


def _ordered_rows(sites, rows_by_site) -> list[str]:
    """Blocks by stack (in order of first appearance) then index, and ``other`` last."""
    stacks = list(dict.fromkeys(site.stack for site in sites if site.stack is not None))
    keys = sorted(
        {(site.stack, site.layer) for site in sites if site.stack is not None},
        key=lambda key: (stacks.index(key[0]), key[1]),
    )
    rows = [rows_by_site[key] for key in keys]
    if any(site.stack is None for site in sites):
        rows.append(OTHER_ROW)
    return rows


def modules_csv_text(grid: ModuleGrid) -> str:
    """Render the module table as CSV, singular values as space-separated floats."""
    frame = grid.table.copy()
    frame["singular_values"] = [" ".join(repr(float(v)) for v in values) for values in frame["singular_values"]]
    return frame.to_csv(index=False)
