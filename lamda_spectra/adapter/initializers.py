"""Initialisations of a LaMDA adapter from the top-``r`` SVD of the live base weight.

Each initialiser receives the base layer and ``U, S, Vh`` (float32, shapes ``(d_out, r)``, ``(r,)``,
``(r, d_in)``) and returns the wrapped :class:`LamdaLinear`. Every one of them sets PMA
``A = Vh.T`` and PMB ``B = U.T``; they differ in the core and in what happens to the base weight.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .layer import LamdaLinear


def _init_zero_core(
    base: nn.Module, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, *, dtype: torch.dtype, **options
) -> LamdaLinear:
    """Zero core: the base weight is untouched, so outputs at step 0 equal the original model's exactly."""
    rank = S.shape[0]
    core = torch.zeros(rank, rank, dtype=dtype, device=S.device)
    return LamdaLinear.from_factors(base, Vh.T.to(dtype), core, U.T.to(dtype), init="zero-core", **options)


def _init_principal(
    base: nn.Module, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, *, dtype: torch.dtype, **options
) -> LamdaLinear:
    """Principal core ``diag(s) / scaling``; the base weight becomes the residual ``W - U_r diag(s_r) Vh_r``.

    Dividing by ``scaling`` makes the adapter put back exactly what was removed, so outputs at
    step 0 equal the original model's up to rounding (within 1e-5 relative in float32).
    """
    scaling = options.get("scaling", 1.0)
    core = torch.diag(S / scaling).to(dtype)
    layer = LamdaLinear.from_factors(
        base,
        Vh.T.to(dtype),
        core,
        U.T.to(dtype),
        init="principal",
        principal_values=S.to(dtype),
        principal_pmb=U.T.to(dtype),
        **options,
    )
    subtract_principal_part(layer)
    return layer


def subtract_principal_part(layer: LamdaLinear) -> None:
    """Turn the base weight into the residual ``W - A diag(s) B_0`` of a ``"principal"`` init.

    :func:`lamda_spectra.load_adapter` calls this on a fresh base weight with the saved factors,
    which reproduces the trained model's residual bit for bit on the same device.
    """
    layer.add_to_base_weight(layer.principal_part(), sign=-1.0)


INITIALIZERS: dict[str, Callable[..., LamdaLinear]] = {
    "zero-core": _init_zero_core,
    "principal": _init_principal,
}
