"""Singular-value spectra of weight matrices, and the metrics derived from them.

Conventions: a weight ``W`` has shape ``(d_out, d_in)`` and ``U, S, Vh = torch.linalg.svd(W)``.
The LaMDA adapter maps these factors as PMA ``A = Vh[:r].T``, core ``diag(S[:r])`` (or zero) and
PMB ``B = U[:, :r].T``. The normalized spectrum is ``p_i = S_i**2 / ||W||_F**2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Part of every cache key: bump it when a change to the methods below changes their results.
METHOD_VERSION = "reference-1"


@dataclass(frozen=True)
class Spectrum:
    """The top singular values of one weight and its total energy."""

    singular_values: np.ndarray  # float64, descending; top k, or all min(d_out, d_in) when full
    frobenius_sq: float  # ||W||_F^2, accumulated in float64
    shape: tuple[int, int]  # (d_out, d_in)
    method: str  # "exact", "krylov" or "gram": which routine produced the values
    full: bool  # True when singular_values holds all min(d_out, d_in) values

    @property
    def normalized(self) -> np.ndarray:
        """The normalized spectrum ``p_i = s_i^2 / ||W||_F^2`` (zeros for an all-zero weight)."""
        if self.frobenius_sq <= 0.0:
            return np.zeros_like(self.singular_values)
        return self.singular_values**2 / self.frobenius_sq


def compute_spectrum(
    weight: torch.Tensor, k: int, *, full: bool = False, device: str | torch.device | None = None, seed: int = 0
) -> Spectrum:
    """Compute the top ``k`` singular values of ``weight`` (all of them when ``full``).

    Args:
        weight: ``(d_out, d_in)`` matrix in any floating dtype; it is upcast to float32 or float64.
        k: number of leading singular values wanted; capped at ``min(d_out, d_in)``.
        full: return every singular value.
        device: where to compute (default: the weight's device).
        seed: seed of the random start block, so results are reproducible.

    Returns:
        A :class:`Spectrum` whose values are within 1e-3 relative of an exact float64 SVD and
        whose energy scores are within 1e-4 absolute.
    """
    # NOTE: reference implementation (exact float64 SVD); slow on large matrices.
    matrix = weight.to(device=device or weight.device, dtype=torch.float64)
    values = torch.linalg.svdvals(matrix).cpu().numpy()
    frobenius_sq = float(torch.sum(matrix * matrix).item())
    n_values = len(values) if full else min(k, len(values))
    return Spectrum(
        singular_values=values[:n_values].copy(),
        frobenius_sq=frobenius_sq,
        shape=(int(weight.shape[0]), int(weight.shape[1])),
        method="exact",
        full=n_values == len(values),
    )


def top_svd(weight: torch.Tensor, r: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compute the leading ``r`` singular triplets of ``weight`` on its own device.

    Returns:
        ``(U, S, Vh)`` in float32 with shapes ``(d_out, r)``, ``(r,)`` and ``(r, d_in)``, as the
        first ``r`` columns/values/rows of ``torch.linalg.svd(weight)`` would be.
    """
    # NOTE: reference implementation (exact float64 SVD); slow on large matrices.
    U, S, Vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    return U[:, :r].float(), S[:r].float(), Vh[:r].float()


def energy_score(spectrum: Spectrum, r0: int) -> float:
    """Share of the weight's energy in its top-``r0`` directions: ``sum_{i<r0} p_i``."""
    return float(np.sum(spectrum.normalized[:r0]))


def spectrum_metrics(spectrum: Spectrum) -> dict[str, float]:
    """Compute spectral norm, Frobenius norm, stable rank and entropy effective rank.

    The effective rank ``exp(-sum p_i log p_i)`` needs every singular value, so it is NaN unless
    ``spectrum.full``. The stable rank ``||W||_F^2 / s_1^2`` is NaN for an all-zero weight.
    """
    s1 = float(spectrum.singular_values[0]) if len(spectrum.singular_values) else 0.0
    frobenius_sq = spectrum.frobenius_sq
    effective_rank = math.nan
    if spectrum.full and frobenius_sq > 0.0:
        p = spectrum.normalized
        p = p[p > 0]
        effective_rank = float(np.exp(-np.sum(p * np.log(p))))
    return {
        "spectral_norm": s1,
        "frobenius_norm": math.sqrt(frobenius_sq),
        "stable_rank": frobenius_sq / s1**2 if s1 > 0 else math.nan,
        "effective_rank": effective_rank,
    }
