"""The rank plan: which modules get a LaMDA adapter and of what rank, stored as JSON.

The schema is documented in docs/plan-format.md. :func:`plan` builds a :class:`Plan` from a
spectra table, :meth:`Plan.save` writes it, and :func:`load_plan` reads it back after checking
every field.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np
import pandas as pd

from ._io import atomic_write_text
from .allocation import STRATEGIES, Budget, allocate
from .errors import PlanError

logger = logging.getLogger(__name__)

PLAN_FORMAT = "lamda-spectra-plan"
SCHEMA_VERSION = 1
LAYOUTS = ("linear", "conv1d")

# Keys of the spectra table's attrs that are scan settings and go into the plan settings. Run
# statistics such as the counts of computed and cached spectra stay out, so that a plan does not
# depend on the state of the cache.
SCAN_SETTINGS = ("top_k", "full_spectrum", "target", "exclude", "skip_unsupported", "skip_nonfinite")
_FINGERPRINT_PATTERN = re.compile(r"[0-9a-f]{64}")
_TOP_LEVEL_KEYS = ("format", "schema_version", "tool_version", "source", "fingerprint", "settings", "totals", "modules")
_TOTALS_KEYS = ("modules", "rank_sum", "core_params", "pmb_params", "lora_params")


@dataclass(frozen=True)
class ModulePlan:
    """The plan for one linear module; it validates itself when built.

    Raises:
        PlanError: a field is out of range (the message lists every problem).
    """

    rank: int
    shape: tuple[int, int]  # (d_out, d_in), as the layer computes y = x W^T
    layout: str  # "linear" (weight stored d_out x d_in) or "conv1d" (stored d_in x d_out)
    energy_score: float  # share of the weight's energy in its top-r0 directions
    captured_energy: float  # share of the weight's energy in its top-`rank` directions
    stable_rank: float  # ||W||_F^2 / s_1^2; 0 for an all-zero weight
    frobenius_norm: float  # ||W||_F, checked by apply_plan against the live weights
    spectral_norm: float  # s_1
    singular_values: tuple[float, ...]  # the top singular values, at least `rank` of them

    def __post_init__(self) -> None:
        problems = _module_problems({field.name: getattr(self, field.name) for field in dataclasses.fields(self)})
        if problems:
            raise PlanError(f"invalid module plan: {'; '.join(problems)}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        object.__setattr__(self, "singular_values", tuple(float(value) for value in self.singular_values))
        for name in _FRACTION_FIELDS:
            object.__setattr__(self, name, min(1.0, max(0.0, float(getattr(self, name)))))
        for name in _NONNEGATIVE_FIELDS:
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        """Return the module's JSON entry: fields in declaration order, tuples as lists."""
        entry = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            entry[field.name] = list(value) if isinstance(value, tuple) else value
        return entry


@dataclass(frozen=True)
class Plan:
    """A validated rank plan.

    ``modules`` maps full module names, exactly as ``model.named_modules()`` yields them, to
    their :class:`ModulePlan`, in plan order. An empty ``tool_version`` is replaced by the
    installed version of lamda-spectra.

    Raises:
        PlanError: a field is invalid (the message lists every problem).
    """

    source: dict[str, Any]  # kind ("folder", "file", "hub"), path or repo_id, revision, model_name
    fingerprint: str  # sha256 hex over each safetensors header plus file sizes; "" when unknown
    settings: dict[str, Any]  # every setting that produced the plan (strategy, budget, r0, ...)
    modules: dict[str, ModulePlan]
    tool_version: str = ""
    format: ClassVar[str] = PLAN_FORMAT
    schema_version: ClassVar[int] = SCHEMA_VERSION

    def __post_init__(self) -> None:
        problems = _plan_problems(self.source, self.fingerprint, self.settings, self.tool_version)
        if not isinstance(self.modules, Mapping) or not self.modules:
            problems.append("modules must be a non-empty mapping of module names to ModulePlan")
        else:
            for name, module in self.modules.items():
                if not isinstance(name, str) or not name:
                    problems.append(f"module name {name!r} is not a non-empty string")
                if not isinstance(module, ModulePlan):
                    problems.append(f"module {name!r} is a {type(module).__name__}, not a ModulePlan")
        if problems:
            raise PlanError(f"invalid plan: {'; '.join(problems)}")
        # Copies, so that later changes to the caller's dicts do not reach the plan.
        object.__setattr__(self, "source", dict(self.source))
        object.__setattr__(self, "settings", dict(self.settings))
        object.__setattr__(self, "modules", dict(self.modules))
        if not self.tool_version:
            object.__setattr__(self, "tool_version", tool_version())

    @property
    def ranks(self) -> dict[str, int]:
        """Module name to rank, in plan order (the shape of PEFT's ``rank_pattern``)."""
        return {name: module.rank for name, module in self.modules.items()}

    @property
    def totals(self) -> dict[str, int]:
        """Counts: modules, rank_sum, core_params (sum r^2), pmb_params (sum r*d_out), lora_params."""
        return _totals(self.modules.values())

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as the JSON document that :meth:`save` writes (see docs/plan-format.md)."""
        return {
            "format": PLAN_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "tool_version": self.tool_version,
            "source": _sorted_keys(self.source),
            "fingerprint": self.fingerprint,
            "settings": _sorted_keys(self.settings),
            "totals": self.totals,
            "modules": {name: module.to_dict() for name, module in self.modules.items()},
        }

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """Build a plan from its JSON document.

        Raises:
            PlanError: the document is invalid; the message lists every problem.
        """
        problems = _document_problems(data)
        if problems:
            raise PlanError(f"invalid plan: {'; '.join(problems)}")
        return _plan_from_document(data)

    def to_json(self) -> str:
        """Return the plan file's text. The same plan always gives the same bytes."""
        return _format_json(self.to_dict()) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON atomically; returns the path.

        Raises:
            LamdaError: the folder cannot be created or written.
        """
        written = atomic_write_text(path, self.to_json())
        logger.info("wrote plan for %d modules to %s", len(self.modules), written)
        return written


def tool_version() -> str:
    """Return the version of lamda-spectra, or ``"0+unknown"`` when it cannot be found."""
    import lamda_spectra

    version = getattr(lamda_spectra, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version("lamda-spectra")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _totals(modules) -> dict[str, int]:
    modules = list(modules)
    return {
        "modules": len(modules),
        "rank_sum": sum(m.rank for m in modules),
        "core_params": sum(m.rank * m.rank for m in modules),
        "pmb_params": sum(m.rank * m.shape[0] for m in modules),
        "lora_params": sum(m.rank * (m.shape[0] + m.shape[1]) for m in modules),
    }


# ----------------------------------------------------------------------------------------------
# Validation. Each check returns a list of problems, so that one error can report all of them.

_FRACTION_FIELDS = ("energy_score", "captured_energy")
# Energy shares computed by summing p_i can land a few ulps outside [0, 1]; within this margin
# they are accepted and clipped.
_ROUNDING = 1e-9
_NONNEGATIVE_FIELDS = ("stable_rank", "frobenius_norm", "spectral_norm")
_MODULE_KEYS = tuple(
    field.name
    for field in dataclasses.fields(ModulePlan)
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _module_problems(entry: Mapping[str, Any]) -> list[str]:
    """Check one module's fields (from a ModulePlan or a JSON entry) and list what is wrong.

    A key missing from ``entry`` is reported once as missing and not checked further.
    """
    problems = [f"missing key {key!r}" for key in _MODULE_KEYS if key not in entry]
    shape = entry.get("shape")
    shape_ok = isinstance(shape, (list, tuple)) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)
    if "shape" in entry and not shape_ok:
        problems.append(f"shape {shape!r} is not two positive integers [d_out, d_in]")

    rank = entry.get("rank")
    if "rank" in entry and (not _is_int(rank) or rank < 1):
        problems.append(f"rank {rank!r} is not a positive integer")
    elif shape_ok and _is_int(rank) and rank > min(shape):
        problems.append(f"rank {rank} exceeds min(d_out, d_in) = {min(shape)}")

    if "layout" in entry and entry["layout"] not in LAYOUTS:
        problems.append(f"layout {entry['layout']!r} is not one of {', '.join(LAYOUTS)}")
    for name in _FRACTION_FIELDS:
        if name in entry and not (_is_number(entry[name]) and -_ROUNDING <= entry[name] <= 1.0 + _ROUNDING):
            problems.append(f"{name} {entry[name]!r} is not a number in [0, 1]")
    for name in _NONNEGATIVE_FIELDS:
        if name in entry and not (_is_number(entry[name]) and entry[name] >= 0.0):
            problems.append(f"{name} {entry[name]!r} is not a finite non-negative number")
    if "singular_values" in entry:
        problems += _singular_value_problems(entry["singular_values"], rank, shape if shape_ok else None)
    return problems


def _singular_value_problems(values: Any, rank: Any, shape: Any) -> list[str]:
    if not isinstance(values, (list, tuple)) or not all(_is_number(v) and v >= 0 for v in values):
        return ["singular_values is not a list of finite non-negative numbers"]
    problems = []
    if any(later > earlier for earlier, later in zip(values, values[1:])):
        problems.append("singular_values are not in descending order")
    if _is_int(rank) and len(values) < rank:
        problems.append(f"singular_values holds {len(values)} values, fewer than rank {rank}")
    if shape is not None and len(values) > min(shape):
        problems.append(f"singular_values holds {len(values)} values, more than min(d_out, d_in) = {min(shape)}")
    return problems


def _plan_problems(source: Any, fingerprint: Any, settings: Any, version: Any) -> list[str]:
    problems = []
    if not isinstance(source, Mapping) or not all(isinstance(key, str) for key in source):
        problems.append("source is not an object with string keys")
    if not isinstance(fingerprint, str) or not (fingerprint == "" or _FINGERPRINT_PATTERN.fullmatch(fingerprint)):
        problems.append(f"fingerprint {fingerprint!r} is not 64 lowercase hex digits (or empty when unknown)")
    if not isinstance(settings, Mapping) or not all(isinstance(key, str) for key in settings):
        problems.append("settings is not an object with string keys")
    else:
        problems += _settings_problems(settings)
    if not isinstance(version, str):
        problems.append(f"tool_version {version!r} is not a string")
    for name, value in (("source", source), ("settings", settings)):
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as err:
            problems.append(f"{name} cannot be stored as JSON: {err}")
    return problems


def _settings_problems(settings: Mapping[str, Any]) -> list[str]:
    """Check the settings that the allocation reads, where present."""
    problems = []
    strategy = settings.get("strategy")
    if strategy is not None and strategy not in STRATEGIES:
        problems.append(f"settings.strategy {strategy!r} is not one of {', '.join(sorted(STRATEGIES))}")
    for name in ("r0", "min_rank", "max_rank", "multiple_of"):
        value = settings.get(name)
        if value is not None and (not _is_int(value) or value < 1):
            problems.append(f"settings.{name} {value!r} is not a positive integer")
    return problems


def _document_problems(data: Any) -> list[str]:
    """List every problem of a plan document: top-level keys, then modules, then totals."""
    if not isinstance(data, dict):
        return [f"the document is a JSON {type(data).__name__}, not an object"]
    problems = [f"missing key {key!r}" for key in _TOP_LEVEL_KEYS if key not in data]
    problems += [f"unknown key {key!r}" for key in data if key not in _TOP_LEVEL_KEYS]
    if "format" in data and data["format"] != PLAN_FORMAT:
        problems.append(f"format is {data['format']!r}, expected {PLAN_FORMAT!r}")
    version = data.get("schema_version")
    if "schema_version" in data and not (_is_int(version) and version == SCHEMA_VERSION):
        # Other fields may mean something else in another schema version, so stop here.
        problems.append(
            f"schema_version {version!r} is not supported by lamda-spectra {tool_version()} "
            f"(it reads version {SCHEMA_VERSION}); use the lamda-spectra version that wrote the plan"
        )
        return problems
    problems += _plan_problems(
        data.get("source", {}), data.get("fingerprint", ""), data.get("settings", {}), data.get("tool_version", "")
    )
    if "modules" in data:
        module_problems = _modules_problems(data["modules"])
        problems += module_problems
        # Totals are only comparable once every module entry is valid.
        if "totals" in data and not module_problems:
            problems += _totals_problems(data["totals"], data["modules"])
    return problems


def _modules_problems(modules: Any) -> list[str]:
    if not isinstance(modules, dict) or not modules:
        return ["modules is not a non-empty object of module names to entries"]
    known = {field.name for field in dataclasses.fields(ModulePlan)}
    problems = []
    for name, entry in modules.items():
        if not name:
            problems.append("a module name is empty")
        if not isinstance(entry, dict):
            problems.append(f"module {name!r}: the entry is not an object")
            continue
        issues = _module_problems(entry) + [f"unknown key {key!r}" for key in entry if key not in known]
        problems += [f"module {name!r}: {issue}" for issue in issues]
    return problems


def _totals_problems(totals: Any, modules: dict) -> list[str]:
    if not isinstance(totals, dict):
        return ["totals is not an object"]
    expected = _totals(_plan_from_modules(modules).values())
    problems = [f"totals is missing {key!r}" for key in _TOTALS_KEYS if key not in totals]
    problems += [f"totals has unknown key {key!r}" for key in totals if key not in _TOTALS_KEYS]
    for key in _TOTALS_KEYS:
        if key in totals and not (_is_int(totals[key]) and totals[key] == expected[key]):
            problems.append(f"totals.{key} is {totals[key]!r} but the modules give {expected[key]}")
    return problems


def _plan_from_modules(modules: dict) -> dict[str, ModulePlan]:
    return {name: ModulePlan(**entry) for name, entry in modules.items()}


def _plan_from_document(data: dict) -> Plan:
    return Plan(
        source=data["source"],
        fingerprint=data["fingerprint"],
        settings=data["settings"],
        modules=_plan_from_modules(data["modules"]),
        tool_version=data["tool_version"],
    )


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file, reporting every problem in one :class:`PlanError`.

    Raises:
        PlanError: the file is missing, unreadable or not JSON, or its content is invalid: wrong
            format name, unsupported schema version, missing or unknown keys, bad module entries
            (each named) or totals that disagree with the modules.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"plan file {path} not found; check the path or create the plan with lamda-plan") from None
    except IsADirectoryError:
        raise PlanError(_folder_message(path)) from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise PlanError(f"cannot read plan file {path}: {reason}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise PlanError(
            f"plan file {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            "regenerate it with lamda-plan"
        ) from err
    problems = _document_problems(data)
    if problems:
        raise PlanError(f"invalid plan file {path}: {'; '.join(problems)}; fix it or regenerate it with lamda-plan")
    return _plan_from_document(data)


def _folder_message(path: Path) -> str:
    """Describe a folder passed as a plan file, pointing at the plan.json inside it if there is one."""
    inside = path / "plan.json"
    if inside.is_file():
        return f"plan file {path} is a folder, not a file; pass {inside}"
    return f"plan file {path} is a folder, not a file; pass the plan.json that lamda-plan wrote"


# ----------------------------------------------------------------------------------------------
# Planning from a spectra table.

_TABLE_COLUMNS = ("module", "layout", "d_out", "d_in", "frobenius_norm", "spectral_norm", "stable_rank", "singular_values")


def plan(
    spectra: pd.DataFrame,
    budget: str | int | Budget = "avg:16",
    strategy: str = "energy",
    *,
    r0: int | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
    multiple_of: int = 1,
) -> Plan:
    """Allocate ranks over the modules of a spectra table (as :func:`lamda_spectra.scan` returns).

    Args:
        spectra: one row per module with the columns that lamda_spectra.scan documents; its
            ``attrs`` give the plan's source, fingerprint and scan settings.
        budget: ``"4096"`` (sum of ranks), ``"avg:16"`` (average rank per module) or
            ``"params:2M"`` (trainable core parameters ``sum r^2``; K, M, G suffixes).
        strategy: ``"energy"`` (LaMDA++), ``"waterfill"`` or ``"uniform"``; see
            :mod:`lamda_spectra.allocation`.
        r0: base rank of the energy score; default: the average rank the budget implies.
        min_rank: smallest rank of any module.
        max_rank: largest rank of any module (default 4x the average rank); each module is also
            capped at ``min(d_out, d_in)``.
        multiple_of: every rank is a multiple of this.

    Returns:
        A validated :class:`Plan` with the modules in table order.

    Raises:
        UsageError: invalid budget, strategy or rank bounds, an infeasible budget, or too few
            singular values in the table for the strategy (rescan with a larger ``top_k``).
        PlanError: ``spectra`` is not a DataFrame, lacks columns or contains invalid values
            (every problem listed).
    """
    if not isinstance(spectra, pd.DataFrame):
        hint = f"; call plan(scan({str(spectra)!r}), ...)" if isinstance(spectra, (str, Path)) else ""
        raise PlanError(
            f"plan() takes the spectra table that lamda_spectra.scan returns, not a {type(spectra).__name__}{hint}"
        )
    budget = Budget.parse(budget)
    rows = _table_rows(spectra)
    normalized = [_normalized_spectrum(row) for row in rows]
    allocation = allocate(
        normalized,
        [min(row["d_out"], row["d_in"]) for row in rows],
        budget,
        strategy,
        r0=r0,
        min_rank=min_rank,
        max_rank=max_rank,
        multiple_of=multiple_of,
        names=[row["module"] for row in rows],
    )

    modules = {}
    for row, p, rank, score in zip(rows, normalized, allocation.ranks, allocation.energy_scores):
        modules[row["module"]] = ModulePlan(
            rank=rank,
            shape=(row["d_out"], row["d_in"]),
            layout=row["layout"],
            energy_score=score,
            captured_energy=min(1.0, float(np.sum(p[:rank]))),
            stable_rank=row["stable_rank"],
            frobenius_norm=row["frobenius_norm"],
            spectral_norm=row["spectral_norm"],
            singular_values=tuple(float(s) for s in row["singular_values"][: max(rank, allocation.r0)]),
        )

    settings = {
        "strategy": strategy,
        "budget": budget.text,
        "budget_kind": budget.kind,
        "budget_value": budget.value,
        "r0": allocation.r0,
        "min_rank": allocation.min_rank,
        "max_rank": allocation.max_rank,
        "multiple_of": allocation.multiple_of,
    }
    settings.update({key: _json_value(spectra.attrs[key]) for key in SCAN_SETTINGS if key in spectra.attrs})
    result = Plan(
        source=_json_value(spectra.attrs.get("source") or {}),
        fingerprint=_table_fingerprint(spectra),
        settings=settings,
        modules=modules,
    )
    totals = result.totals
    logger.info(
        "%s plan for %d modules at budget %s: rank sum %d, core parameters %d",
        strategy, totals["modules"], budget.text, totals["rank_sum"], totals["core_params"],
    )
    return result


def _table_rows(spectra: pd.DataFrame) -> list[dict[str, Any]]:
    """Read and check the table's rows, raising one PlanError that lists every problem."""
    missing = [column for column in _TABLE_COLUMNS if column not in spectra.columns]
    if missing:
        raise PlanError(f"cannot plan from the spectra table: missing columns {', '.join(missing)}")
    if spectra.empty:
        raise PlanError("cannot plan from an empty spectra table; check the scan's target modules")

    rows, problems = [], []
    duplicates = sorted(set(spectra["module"][spectra["module"].duplicated()]))
    if duplicates:
        problems.append(f"module names appear more than once: {', '.join(map(str, duplicates))}")
    for record in spectra[list(_TABLE_COLUMNS)].to_dict("records"):
        row, issues = _table_row(record)
        rows.append(row)
        problems += [f"module {record['module']!r}: {issue}" for issue in issues]
    if problems:
        raise PlanError(f"cannot plan from the spectra table: {'; '.join(problems)}")
    return rows


def _table_row(record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    row, issues = dict(record), []
    values = record["singular_values"]
    if isinstance(values, str):  # as spectra.csv stores them
        values = values.split()
    try:
        row["singular_values"] = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        row["singular_values"] = np.zeros(0)
        issues.append("singular_values is not a list of numbers")

    values = row["singular_values"]
    if not (np.all(np.isfinite(values)) and np.all(values >= 0)):
        issues.append("singular_values contains negative or non-finite values")
    elif np.any(np.diff(values) > 0):
        issues.append("singular_values are not in descending order")
    for name in ("d_out", "d_in"):
        if not (_is_int(record[name]) and record[name] > 0):
            issues.append(f"{name} {record[name]!r} is not a positive integer")
        else:
            row[name] = int(record[name])

    for name in ("frobenius_norm", "spectral_norm"):
        if not (_is_number(record[name]) and record[name] >= 0):
            issues.append(f"{name} {record[name]!r} is not a finite non-negative number")

    # The scan stores NaN as the stable rank of an all-zero weight; the plan stores 0.
    stable_rank = record["stable_rank"]
    if _is_number(record["spectral_norm"]) and record["spectral_norm"] == 0:
        row["stable_rank"] = 0.0
    elif not (_is_number(stable_rank) and stable_rank >= 0):
        issues.append(f"stable_rank {stable_rank!r} is not a finite non-negative number")

    if not issues and len(values) == 0:
        issues.append("singular_values is empty")
    return row, issues


def _normalized_spectrum(row: dict[str, Any]) -> np.ndarray:
    """``p_i = s_i^2 / ||W||_F^2``, all zeros for an all-zero weight."""
    frobenius_sq = float(row["frobenius_norm"]) ** 2
    values = row["singular_values"]
    if frobenius_sq <= 0.0:
        return np.zeros_like(values)
    return values**2 / frobenius_sq


def _table_fingerprint(spectra: pd.DataFrame) -> str:
    """Return the weights fingerprint from the table's attrs, else from its fingerprint column."""
    fingerprint = spectra.attrs.get("fingerprint")
    if fingerprint:
        return str(fingerprint)
    if "fingerprint" not in spectra.columns:
        return ""
    distinct = sorted({str(value) for value in spectra["fingerprint"].dropna()})
    if len(distinct) > 1:
        raise PlanError(
            f"the spectra table mixes {len(distinct)} weights fingerprints; plan one checkpoint at a time"
        )
    return distinct[0] if distinct else ""


# ----------------------------------------------------------------------------------------------
# JSON output.


def _json_value(value: Any) -> Any:
    """Convert numpy scalars, tuples and paths to plain JSON values, recursively."""
    if isinstance(value, Mapping):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_value(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_sorted_keys(item) for item in value]
    return value


def _format_json(value: Any, indent: str = "") -> str:
    """Format like ``json.dumps(indent=2)``, but keep lists of numbers or strings on one line."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(key)}: {_format_json(item, inner)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        items = [inner + _format_json(item, inner) for item in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return json.dumps(value, allow_nan=False)
