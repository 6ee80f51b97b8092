"""Checks run before any module is wrapped: does the plan fit this model, are the settings valid.

Every check returns a list of one-line problems instead of raising, so that the caller can
report all of them in one :class:`AdapterError` and leave the model untouched.
"""

from __future__ import annotations

import logging
import math
from numbers import Real

import torch
from torch import nn

from ..plan import ModulePlan, Plan
from .initializers import INITIALIZERS
from .layer import LAYOUTS, layout_of, weight_matrix
from .schedule import schedule_problems

logger = logging.getLogger(__name__)

# Relative difference allowed between a module's live Frobenius norm and the plan's.
NORM_RTOL = 1e-3
# Number of names an error message lists before it ends with "and N more".
SAMPLE_SIZE = 5


def sample_names(names: list[str], size: int = SAMPLE_SIZE) -> str:
    """Join up to ``size`` names, with a count of the rest."""
    shown = ", ".join(names[:size])
    if len(names) > size:
        shown += f" and {len(names) - size} more"
    return shown


def linear_module_names(model: nn.Module) -> list[str]:
    """Return the names of the model's supported linear layers, in module order."""
    return [name for name, module in model.named_modules() if layout_of(module) is not None]


def settings_problems(
    *, init: object, scaling: object, dropout: object, freeze_fraction: object, total_steps: object, adapter_dtype: object
) -> list[str]:
    """List what is wrong with the adapter settings of :func:`lamda_spectra.apply_plan`."""
    problems = []
    if init not in INITIALIZERS:
        problems.append(f"init={init!r} is not one of {', '.join(map(repr, INITIALIZERS))}")
    if not _is_number(scaling) or not math.isfinite(scaling) or scaling == 0:
        problems.append(f"scaling={scaling!r} must be a finite non-zero number")
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        problems.append(f"dropout={dropout!r} must be a probability in [0, 1)")
    if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
        problems.append(f"adapter_dtype={adapter_dtype!r} must be a floating torch dtype such as torch.float32")
    problems += schedule_problems(freeze_fraction, total_steps)
    return problems


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def resolve_module_names(model: nn.Module, plan_names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Map plan module names to the model's module names.

    A name is used as is when the model has it. Otherwise, for a transformers model with a task
    head, the name is tried with the model's ``base_model_prefix`` added (a plan made from a
    ``BertModel`` checkpoint names ``encoder.layer.0...`` while ``BertForSequenceClassification``
    has ``bert.encoder.layer.0...``) or removed (the reverse case).

    Returns:
        ``(resolved, missing)``: plan name to model name for every name found, and the plan
        names found in neither form.
    """
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    resolved, missing = {}, []
    for name in plan_names:
        candidates = [name]
        if prefix:
            candidates.append(f"{prefix}.{name}")
            if name.startswith(prefix + "."):
                candidates.append(name[len(prefix) + 1 :])
        found = next((candidate for candidate in candidates if candidate in modules), None)
        if found is None:
            missing.append(name)
        else:
            resolved[name] = found
    renamed = [name for name, found in resolved.items() if found != name]
    if renamed:
        logger.info("resolved %d plan module names through base_model_prefix %r", len(renamed), prefix)
    return resolved, missing


def module_problems(name: str, module: nn.Module, module_plan: ModulePlan) -> list[str]:
    """List the ways one model module does not fit its plan entry (type, dtype, shape, rank, norm)."""
    layout = layout_of(module)
    if layout is None:
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        return [f"module {name} is a {kind}, not a supported linear layer (torch.nn.Linear or transformers Conv1D)"]
    weight = module.weight
    if not weight.dtype.is_floating_point:
        return [f"module {name} has a {weight.dtype} weight; only floating-point weights can be adapted"]
    if module_plan.layout not in LAYOUTS or module_plan.layout != layout:
        return [f"module {name} is a {layout} layer but the plan says layout {module_plan.layout!r}"]

    d_out, d_in = weight_matrix(module, layout).shape
    plan_shape = tuple(module_plan.shape)
    if plan_shape != (d_out, d_in):
        return [f"module {name} has shape [d_out, d_in] = [{d_out}, {d_in}] but the plan says {list(plan_shape)}"]

    problems = []
    rank = module_plan.rank
    if not isinstance(rank, int) or not 1 <= rank <= min(d_out, d_in):
        problems.append(f"module {name} has plan rank {rank!r}, outside [1, min(d_out, d_in) = {min(d_out, d_in)}]")
    norm = float(torch.linalg.vector_norm(weight.detach(), dtype=torch.float64))
    expected = float(module_plan.frobenius_norm)
    if not math.isfinite(norm):
        problems.append(f"module {name} has non-finite weights (Frobenius norm {norm})")
    elif not math.isclose(norm, expected, rel_tol=NORM_RTOL, abs_tol=1e-12):
        difference = abs(norm - expected) / max(abs(expected), 1e-12)
        problems.append(
            f"module {name} has Frobenius norm {norm:.6g} but the plan says {expected:.6g} "
            f"({difference:.2e} relative, limit {NORM_RTOL:g}): the plan was made for other weights"
        )
    return problems


def plan_problems(model: nn.Module, plan: Plan) -> tuple[dict[str, str], list[str]]:
    """Check every plan module against the model.

    Returns:
        ``(targets, problems)``: plan name to model module name for each module found, and every
        problem found, one line each.
    """
    resolved, missing = resolve_module_names(model, list(plan.modules))
    problems = [] if plan.modules else ["the plan has no modules"]
    if missing:
        available = linear_module_names(model)
        problems.append(
            f"{len(missing)} plan modules are not in the model: {sample_names(missing)}; "
            f"the model's linear modules include: {sample_names(available) or 'none'}"
        )

    seen: dict[str, str] = {}
    modules = dict(model.named_modules())
    for plan_name, model_name in resolved.items():
        if model_name in seen:
            problems.append(f"plan modules {seen[model_name]} and {plan_name} both name model module {model_name}")
            continue
        seen[model_name] = plan_name
        problems += module_problems(model_name, modules[model_name], plan.modules[plan_name])
    return resolved, problems
