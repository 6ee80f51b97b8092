"""Helpers shared by the adapter tests: plans built from a model's own weights, and toy models."""

from __future__ import annotations

import math

import torch
from torch import nn

from lamda_spectra.adapter.layer import layout_of, weight_matrix
from lamda_spectra.plan import ModulePlan, Plan


def plan_for(model: nn.Module, ranks: int | dict[str, int], *, names: list[str] | None = None) -> Plan:
    """Build a plan for ``model``'s linear layers from its live weights (exact float64 spectra).

    ``ranks`` is one rank for every module or a mapping from module name to rank. ``names``
    restricts the plan to those modules (default: the keys of ``ranks``, else every linear layer).
    """
    if names is None and isinstance(ranks, dict):
        names = list(ranks)
    modules = {}
    for name, module in model.named_modules():
        layout = layout_of(module)
        if layout is None or (names is not None and name not in names):
            continue
        weight = weight_matrix(module, layout).detach().double()
        values = torch.linalg.svdvals(weight)
        rank = ranks if isinstance(ranks, int) else ranks[name]
        energy = float(torch.sum(values**2))
        captured = float(torch.sum(values[:rank] ** 2)) / energy
        modules[name] = ModulePlan(
            rank=rank,
            shape=(int(weight.shape[0]), int(weight.shape[1])),
            layout=layout,
            energy_score=captured,
            captured_energy=captured,
            stable_rank=energy / float(values[0]) ** 2,
            frobenius_norm=math.sqrt(energy),
            spectral_norm=float(values[0]),
            singular_values=tuple(float(v) for v in values[: max(rank, 1)]),
        )
    return Plan(
        source={"kind": "folder", "path": "in-memory", "model_name": type(model).__name__},
        fingerprint="0" * 64,
        settings={"strategy": "uniform" if isinstance(ranks, int) else "energy", "budget": "test"},
        modules=modules,
    )


class TwoLayer(nn.Module):
    """A square and a non-square linear layer with a nonlinearity between them."""

    def __init__(self, d_in: int = 24, d_hidden: int = 40, d_out: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(d_in, d_hidden)
        self.square = nn.Linear(d_hidden, d_hidden)
        self.down = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.square(torch.tanh(self.up(x)))))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Return ``||actual - expected|| / ||expected||`` computed in float64."""
    actual, expected = actual.double(), expected.double()
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))
