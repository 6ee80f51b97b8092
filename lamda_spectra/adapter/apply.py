"""apply_plan: turn a pretrained model into a LaMDA model by wrapping the modules a plan names."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .._text import count_noun
from ..errors import AdapterError
from ..plan import Plan, load_plan
from ..spectra import top_svd
from .checks import plan_problems, sample_names, settings_problems
from .handle import HANDLE_ATTRIBUTE, AdapterSettings, LamdaHandle
from .initializers import INITIALIZERS
from .layer import LamdaLinear, layout_of, weight_matrix

logger = logging.getLogger(__name__)


def apply_plan(
    model: nn.Module,
    plan: Plan | str | os.PathLike,
    *,
    init: str = "zero-core",
    scaling: float = 1.0,
    dropout: float = 0.0,
    freeze_fraction: float = 0.3,
    total_steps: int | None = None,
    adapter_dtype: torch.dtype = torch.float32,
) -> LamdaHandle:
    """Wrap every module of ``plan`` in ``model`` with a LaMDA adapter of the plan's rank.

    Everything is checked before the model changes: first the settings, then every plan module.
    Each must exist and be an ``nn.Linear`` or transformers ``Conv1D`` with a floating-point
    weight. Its shape must be the plan's ``[d_out, d_in]`` (Conv1D stores the transpose), its
    rank within ``[1, min(d_out, d_in)]``, and its Frobenius norm within 1e-3 relative of the
    plan's. Any problem raises one :class:`AdapterError` listing all of them, and nothing is
    changed.

    Then the model changes in place: every parameter it has is frozen (``requires_grad=False``),
    each plan module is replaced by a :class:`LamdaLinear` (initialised from the top-``r`` SVD of
    its live weight, on the weight's device), and the returned handle is stored as
    ``model.lamda_handle``. A plan name missing from the model is also tried with the model's
    ``base_model_prefix`` added or removed, so a plan of a ``BertModel`` checkpoint fits
    ``BertForSequenceClassification``.

    Args:
        model: the model to adapt, in any floating dtype and on any device.
        plan: a :class:`Plan` or the path of a plan file.
        init: ``"zero-core"`` (core 0; outputs at step 0 equal the original exactly) or
            ``"principal"`` (core ``diag(s) / scaling``; the base weight becomes the residual).
        scaling: factor on the adapter path.
        dropout: dropout probability on the adapter path's input (training only).
        freeze_fraction: share of ``total_steps`` over which the PMB rows freeze, in [0, 1].
        total_steps: optimizer steps of the whole run; required unless ``freeze_fraction`` is 0.
        adapter_dtype: dtype of PMA, core and PMB (float32 by default, also for bfloat16 models).

    Returns:
        The :class:`LamdaHandle`; call ``handle.step(optimizer)`` after every optimizer step.

    Raises:
        PlanError: if ``plan`` is a path to a file that is missing or invalid.
        AdapterError: if ``model`` already has LaMDA adapters, a setting is invalid, or the plan
            does not fit the model.
    """
    if isinstance(plan, (str, os.PathLike)):
        plan = load_plan(Path(plan))
    elif not isinstance(plan, Plan):
        raise AdapterError(f"plan must be a lamda_spectra Plan or the path of a plan file, not {type(plan).__name__}")
    check_not_adapted(model)

    problems = settings_problems(
        init=init,
        scaling=scaling,
        dropout=dropout,
        freeze_fraction=freeze_fraction,
        total_steps=total_steps,
        adapter_dtype=adapter_dtype,
    )
    targets, fit_problems = plan_problems(model, plan)
    problems += fit_problems
    if problems:
        raise AdapterError(f"cannot apply the plan ({count_noun(len(problems), 'problem')}): " + "; ".join(problems))

    settings = AdapterSettings(init, float(scaling), float(dropout), float(freeze_fraction), total_steps, adapter_dtype)
    # Every SVD runs before the first change, so a failing one leaves the model as it was.
    factors = {}
    for plan_name, model_name in targets.items():
        base = model.get_submodule(model_name)
        factors[model_name] = top_svd(weight_matrix(base, layout_of(base)).detach(), plan.modules[plan_name].rank)

    model.requires_grad_(False)
    modules = {}
    for model_name, (U, S, Vh) in factors.items():
        base = model.get_submodule(model_name)
        layer = INITIALIZERS[init](base, U, S, Vh, dtype=adapter_dtype, scaling=settings.scaling, dropout=settings.dropout)
        replace_module(model, model_name, layer)
        modules[model_name] = layer
    logger.info("wrapped %d modules with LaMDA adapters (init %s)", len(modules), init)
    return attach_handle(model, plan, settings, modules, {v: k for k, v in targets.items()})


def attach_handle(
    model: nn.Module,
    plan: Plan,
    settings: AdapterSettings,
    modules: dict[str, LamdaLinear],
    plan_names: dict[str, str],
    steps_done: int = 0,
) -> LamdaHandle:
    """Build the handle for freshly wrapped modules and store it as ``model.lamda_handle``."""
    handle = LamdaHandle(plan, settings, modules, plan_names, steps_done)
    setattr(model, HANDLE_ATTRIBUTE, handle)
    return handle


def check_not_adapted(model: nn.Module) -> None:
    """Raise :class:`AdapterError` if ``model`` already contains LaMDA adapters."""
    adapted = [name for name, module in model.named_modules() if isinstance(module, LamdaLinear)]
    if adapted:
        raise AdapterError(
            f"model already has LaMDA adapters in {len(adapted)} modules ({sample_names(adapted)}); "
            "load a fresh model, or call merge_and_unload(model) first"
        )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
