"""The rank plan: which modules get a LaMDA adapter and of what rank, stored as JSON.

The schema is documented in docs/plan-format.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

PLAN_FORMAT = "lamda-spectra-plan"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ModulePlan:
    """The plan for one linear module."""

    rank: int
    shape: tuple[int, int]  # (d_out, d_in), as the layer computes y = x W^T
    layout: str  # "linear" (weight stored d_out x d_in) or "conv1d" (stored d_in x d_out)
    energy_score: float  # share of the weight's energy in its top-r0 directions
    captured_energy: float  # share of the weight's energy in its top-`rank` directions
    stable_rank: float  # ||W||_F^2 / s_1^2
    frobenius_norm: float  # ||W||_F, checked by apply_plan against the live weights
    spectral_norm: float  # s_1
    singular_values: tuple[float, ...]  # the top singular values, at least `rank` of them


@dataclass(frozen=True)
class Plan:
    """A validated rank plan.

    ``modules`` maps full module names, exactly as ``model.named_modules()`` yields them, to
    their :class:`ModulePlan`, in plan order.
    """

    source: dict[str, Any]  # kind ("folder", "file", "hub"), path or repo_id, revision, model_name
    fingerprint: str  # sha256 hex over each safetensors header plus file sizes
    settings: dict[str, Any]  # every setting that produced the plan (strategy, budget, r0, ...)
    modules: dict[str, ModulePlan]
    tool_version: str = ""
    format: ClassVar[str] = PLAN_FORMAT
    schema_version: ClassVar[int] = SCHEMA_VERSION

    @property
    def ranks(self) -> dict[str, int]:
        """Module name to rank, in plan order (the shape of PEFT's ``rank_pattern``)."""
        return {name: module.rank for name, module in self.modules.items()}

    @property
    def totals(self) -> dict[str, int]:
        """Counts: modules, rank_sum, core_params (sum r^2), pmb_params (sum r*d_out), lora_params."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON atomically; returns the path."""
        raise NotImplementedError


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file, reporting every problem in one :class:`PlanError`."""
    raise NotImplementedError


def plan(
    spectra: pd.DataFrame,
    budget: str | int = "avg:16",
    strategy: str = "energy",
    *,
    r0: int | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
    multiple_of: int = 1,
) -> Plan:
    """Allocate ranks over the modules of a spectra table (as :func:`lamda_spectra.scan` returns)."""
    raise NotImplementedError
