"""The LaMDA adapter layer: a frozen linear layer plus a low-rank path ``x -> x A S B``.

With the base weight ``W`` of shape ``(d_out, d_in)`` and ``U, S, Vh = torch.linalg.svd(W)``:

- PMA ``A = Vh[:r].T``, shape ``(d_in, r)``: a buffer, frozen for the whole run;
- core ``S``, shape ``(r, r)``: trainable;
- PMB ``B = U[:, :r].T``, shape ``(r, d_out)``: trainable until the freezing schedule has frozen
  its rows, leading rows (largest singular values) first.

The forward pass computes ``y = base(x) + scaling * (((dropout(x) @ A) @ S) @ B)``. Because
``A`` never requires grad, autograd keeps only the ``(n, r)`` products ``x @ A`` and
``x @ A @ S`` for backward, never the ``(n, d_in)`` input: this is where LaMDA saves activation
memory over LoRA, whose trainable ``A`` makes autograd keep ``x``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

LAYOUTS = ("linear", "conv1d")


def layout_of(module: nn.Module) -> str | None:
    """Return ``"linear"`` or ``"conv1d"`` for a supported layer, ``None`` for anything else.

    Only exact types count: a subclass may compute something else from its weight (for example
    the output projection of ``nn.MultiheadAttention``, or a quantized linear layer).
    """
    if type(module) is nn.Linear:
        return "linear"
    # transformers is an optional dependency, and a model with a Conv1D layer has already imported it.
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if conv1d is not None and type(module) is conv1d:
        return "conv1d"
    return None


def weight_matrix(module: nn.Module, layout: str) -> torch.Tensor:
    """Return the base weight as a ``(d_out, d_in)`` matrix (a transposed view for Conv1D)."""
    return module.weight.T if layout == "conv1d" else module.weight


class _FreezeLeadingRowsGrad(torch.autograd.Function):
    """Identity on the PMB whose backward zeroes the gradient of its first ``k`` rows.

    Frozen rows then add nothing to gradient norms (clipping) or to the optimizer's moments.
    The rows are also restored after each optimizer step, because momentum and weight decay
    move them even with a zero gradient.
    """

    @staticmethod
    def forward(ctx, pmb: torch.Tensor, k: int) -> torch.Tensor:
        ctx.k = k
        return pmb.view_as(pmb)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone()
        grad[: ctx.k] = 0
        return grad, None


class LamdaLinear(nn.Module):
    """A frozen ``nn.Linear`` or transformers ``Conv1D`` with a LaMDA adapter.

    Build it with :func:`lamda_spectra.apply_plan` (from a plan) or :meth:`from_factors`. The
    base layer is kept as ``base_layer``, so its parameters appear in ``state_dict`` as
    ``<name>.base_layer.weight`` and ``<name>.base_layer.bias``.

    Attributes:
        base_layer: the wrapped layer; its weight is the residual ``W - U_r diag(s_r) Vh_r`` after
            a ``"principal"`` initialisation.
        lamda_A: PMA buffer, ``(d_in, r)``.
        lamda_S: trainable core, ``(r, r)``.
        lamda_B: PMB parameter, ``(r, d_out)``.
        principal_values: ``(r,)`` singular values moved out of the base weight by a
            ``"principal"`` initialisation (``None`` otherwise).
        principal_pmb: ``(r, d_out)`` PMB at that initialisation (``None`` otherwise). With
            ``lamda_A`` and ``principal_values`` it gives the part subtracted from the base
            weight, which loading and PEFT export need.
        frozen_rows: number of leading PMB rows frozen by the schedule.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        layout: str,
        pma: torch.Tensor,
        core: torch.Tensor,
        pmb: torch.Tensor,
        *,
        init: str,
        scaling: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        self.init = init
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("lamda_A", pma)
        self.lamda_S = nn.Parameter(core)
        self.lamda_B = nn.Parameter(pmb)
        self.register_buffer("principal_values", None)
        self.register_buffer("principal_pmb", None)
        # Values of the frozen PMB rows at the time they froze; rows >= frozen_rows are unused.
        self.register_buffer("pmb_frozen_values", None, persistent=False)
        self.frozen_rows = 0

    @property
    def rank(self) -> int:
        return self.lamda_S.shape[0]

    @property
    def in_features(self) -> int:
        return self.lamda_A.shape[0]

    @property
    def out_features(self) -> int:
        return self.lamda_B.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute ``base(x) + scaling * (((dropout(x) @ A) @ S) @ B)``.

        Args:
            x: ``(..., d_in)`` input in the base layer's dtype.

        Returns:
            ``(..., d_out)`` output in the base layer's dtype; the adapter path runs in the
            adapter's dtype and is cast back before the sum.
        """
        result = self.base_layer(x)

        # Adapter path in the adapter dtype: only the (..., r) products are kept for backward.
        hidden = self.dropout(x.to(self.lamda_A.dtype)) @ self.lamda_A
        hidden = hidden @ self.lamda_S
        hidden = hidden @ self._pmb_for_forward()
        if self.scaling != 1.0:
            hidden = hidden * self.scaling
        return result + hidden.to(result.dtype)

    def _pmb_for_forward(self) -> torch.Tensor:
        pmb = self.lamda_B
        if 0 < self.frozen_rows < self.rank and pmb.requires_grad and torch.is_grad_enabled():
            return _FreezeLeadingRowsGrad.apply(pmb, self.frozen_rows)
        return pmb

    def adapter_delta(self) -> torch.Tensor:
        """Return the adapter's product ``scaling * A @ S @ B``, shape ``(d_in, d_out)``, in float32."""
        with torch.no_grad():
            return self.scaling * (self.lamda_A.float() @ self.lamda_S.float() @ self.lamda_B.float())

    def principal_part(self) -> torch.Tensor | None:
        """Return ``A diag(s) B_0``, the ``(d_in, d_out)`` product a ``"principal"`` init took from the base weight."""
        if self.principal_values is None:
            return None
        with torch.no_grad():
            return (self.lamda_A.float() * self.principal_values.float()) @ self.principal_pmb.float()

    def add_to_base_weight(self, product: torch.Tensor, sign: float) -> None:
        """Add ``sign * product`` (shape ``(d_in, d_out)``) to the base weight, computing in float32."""
        weight = self.base_layer.weight
        change = product if self.layout == "conv1d" else product.T
        with torch.no_grad():
            updated = weight.float() + sign * change.to(weight.device)
            weight.copy_(updated.to(weight.dtype))

    def freeze_rows(self, count: int) -> bool:
        """Freeze the first ``count`` PMB rows at their current values.

        Rows frozen earlier are restored first, so an optimizer step that moved them is undone.
        When every row is frozen the PMB stops requiring grad and drops its gradient.

        Returns:
            ``True`` if this call froze the last row.
        """
        self.restore_frozen_rows()
        count = min(count, self.rank)
        if count <= self.frozen_rows:
            return False
        pmb = self.lamda_B
        if count == self.rank:
            self.frozen_rows = count
            self.pmb_frozen_values = None
            pmb.requires_grad_(False)
            pmb.grad = None
            return True
        if self.pmb_frozen_values is None:
            self.pmb_frozen_values = torch.empty_like(pmb, requires_grad=False)
        with torch.no_grad():
            self.pmb_frozen_values[self.frozen_rows : count] = pmb[self.frozen_rows : count]
        self.frozen_rows = count
        return False

    def restore_frozen_rows(self) -> None:
        """Write the frozen PMB rows back to their values at freeze time."""
        if 0 < self.frozen_rows < self.rank:
            with torch.no_grad():
                self.lamda_B[: self.frozen_rows] = self.pmb_frozen_values[: self.frozen_rows]

    @classmethod
    def from_factors(
        cls,
        base_layer: nn.Module,
        pma: torch.Tensor,
        core: torch.Tensor,
        pmb: torch.Tensor,
        *,
        init: str,
        scaling: float = 1.0,
        dropout: float = 0.0,
        principal_values: torch.Tensor | None = None,
        principal_pmb: torch.Tensor | None = None,
    ) -> LamdaLinear:
        """Wrap ``base_layer`` with given factors, leaving its weight untouched.

        Args:
            base_layer: an ``nn.Linear`` or ``Conv1D``; the factors move to its device.
            pma: ``(d_in, r)``; core: ``(r, r)``; pmb: ``(r, d_out)``. Copies of them, in the dtype
                of ``pma`` (the adapter dtype), become the layer's factors.
            principal_values, principal_pmb: ``(r,)`` and ``(r, d_out)`` for a ``"principal"`` init.
        """
        device = base_layer.weight.device

        def own_copy(tensor: torch.Tensor) -> torch.Tensor:
            # A fresh contiguous copy: the caller's tensors (or one factor and another) may share memory.
            return tensor.detach().to(device=device, dtype=pma.dtype).clone(memory_format=torch.contiguous_format)

        layer = cls(
            base_layer,
            layout_of(base_layer),
            own_copy(pma),
            own_copy(core),
            own_copy(pmb),
            init=init,
            scaling=scaling,
            dropout=dropout,
        )
        if principal_values is not None:
            layer.principal_values = own_copy(principal_values)
            layer.principal_pmb = own_copy(principal_pmb)
        return layer

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, layout={self.layout}, init={self.init}, scaling={self.scaling}, "
            f"frozen_rows={self.frozen_rows}"
        )
