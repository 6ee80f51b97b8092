"""save_adapter / load_adapter: store trained LaMDA adapters apart from the base model, and rebuild them.

An adapter folder contains two files:

- ``lamda_adapter.json``: format name, schema version, the adapter settings, the optimizer steps
  done so far, per plan module its model module name, rank and layout, and the whole plan (as
  :meth:`Plan.to_dict` gives it);
- ``lamda_adapter.safetensors``: per plan module ``<plan name>.lamda_A`` (PMA), ``.lamda_S``
  (core), ``.lamda_B`` (PMB) and, for a ``"principal"`` init, ``.principal_values`` and
  ``.principal_pmb``, from which the base weight's residual is recomputed; and the whole state
  of every module in ``modules_to_save`` (a task head trained along), keyed
  ``modules_to_save.<module name>.<tensor name>``.

Tensors are keyed by plan module name, so an adapter trained on ``BertForSequenceClassification``
loads onto the same class, and the plan's names resolve as in :func:`apply_plan`.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .._io import atomic_directory, atomic_write_text, check_writable_location
from .._text import count_noun
from ..errors import AdapterError, LamdaWarning, PlanError
from ..plan import Plan
from .apply import attach_handle, check_not_adapted, replace_module
from .checks import plan_problems, sample_names, settings_problems
from .handle import AdapterSettings, LamdaHandle, find_handle, full_name
from .initializers import subtract_principal_part
from .layer import LamdaLinear

logger = logging.getLogger(__name__)

ADAPTER_FORMAT = "lamda-spectra-adapter"
ADAPTER_SCHEMA_VERSION = 1
CONFIG_FILE = "lamda_adapter.json"
WEIGHTS_FILE = "lamda_adapter.safetensors"
FACTOR_NAMES = ("lamda_A", "lamda_S", "lamda_B")
PRINCIPAL_NAMES = ("principal_values", "principal_pmb")
SAVED_MODULE_PREFIX = "modules_to_save."


def save_adapter(model: nn.Module, path: str | os.PathLike, *, modules_to_save: list[str] | None = None) -> Path:
    """Write the LaMDA adapters of ``model`` (not its base weights) to the folder ``path``.

    The folder's two files appear together or not at all; other files in it are kept.

    Args:
        model: a model adapted by :func:`apply_plan` or :func:`load_adapter`.
        path: folder to write; created if missing.
        modules_to_save: names (in ``model``) of further modules to store whole, such as a task
            head that was unfrozen and trained along with the adapters.

    Returns:
        The folder's path.

    Raises:
        AdapterError: if ``model`` has no LaMDA adapters or lacks a module of ``modules_to_save``.
        LamdaError: if the folder cannot be written.
    """
    from .. import __version__  # imported here because the package imports this module

    handle, prefix = find_handle(model)
    modules_to_save = list(modules_to_save or [])
    tensors = module_state_tensors(model, modules_to_save, SAVED_MODULE_PREFIX)
    # Check the folder first, so that a bad path raises before any warning about left-out parameters.
    check_writable_location(path, kind="folder")
    _warn_unsaved_trainable(model, [full_name(prefix, name) for name in handle.modules], modules_to_save)
    modules = {}
    for name, layer in handle.modules.items():
        layer.restore_frozen_rows()
        plan_name = handle.plan_names[name]
        modules[plan_name] = {"module": name, "rank": layer.rank, "layout": layer.layout}
        for attribute in FACTOR_NAMES + PRINCIPAL_NAMES:
            value = getattr(layer, attribute)
            if value is not None:
                tensors[f"{plan_name}.{attribute}"] = value.detach().cpu().contiguous()
    config = {
        "format": ADAPTER_FORMAT,
        "schema_version": ADAPTER_SCHEMA_VERSION,
        "tool_version": __version__,
        "settings": handle.settings.to_json(),
        "steps_done": handle.steps_done,
        "modules": modules,
        "modules_to_save": modules_to_save,
        "plan": handle.plan.to_dict(),
    }
    with atomic_directory(path) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        atomic_write_text(staging / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    logger.info("saved %d LaMDA adapters to %s", len(modules), path)
    return Path(path)


def _warn_unsaved_trainable(model: nn.Module, adapted: list[str], saved: list[str]) -> None:
    """Warn about trainable parameters that neither an adapter nor a saved module holds.

    A task head unfrozen next to the adapters is the usual case: without ``modules_to_save`` a
    reloaded model would get the head's initial weights back.
    """
    adapter = {f"{name}.{parameter}" for name in adapted for parameter in ("lamda_S", "lamda_B")}
    left_out = [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
        and name not in adapter
        and not any(not module or name.startswith(module + ".") for module in saved)
    ]
    if left_out:
        warnings.warn(
            f"save_adapter leaves out {count_noun(len(left_out), 'trainable parameter')} that no LaMDA adapter "
            f"holds ({sample_names(left_out)}); pass their modules as modules_to_save to store them",
            LamdaWarning,
            stacklevel=3,
        )


def load_adapter(model: nn.Module, path: str | os.PathLike) -> LamdaHandle:
    """Wrap a freshly loaded base model with the adapters saved in ``path`` by :func:`save_adapter`.

    The base model must hold the weights the plan was made for: the same checks as in
    :func:`apply_plan` run first, and nothing changes if one fails. The result computes what
    the saved model computed, for either init, and its schedule continues from the saved step.
    Modules saved through ``modules_to_save`` get their saved state and are left trainable.

    Returns:
        The :class:`LamdaHandle`, also stored as ``model.lamda_handle``.

    Raises:
        AdapterError: if a file is missing or malformed, the model already has adapters, or the
            adapters do not fit the model.
    """
    folder = Path(path)
    config = read_config(folder)
    settings = settings_from_json(config["settings"], folder / CONFIG_FILE)
    plan = plan_from_config(config["plan"], folder / CONFIG_FILE)
    check_not_adapted(model)

    targets, problems = plan_problems(model, plan)
    tensors = read_tensors(folder / WEIGHTS_FILE)
    problems += tensor_problems(config, plan.modules, tensors, settings.init)
    problems += saved_module_problems(model, config["modules_to_save"], tensors)
    if problems:
        raise AdapterError(f"cannot load the adapter in {folder} ({count_noun(len(problems), 'problem')}): " + "; ".join(problems))

    model.requires_grad_(False)
    modules = {}
    for plan_name, model_name in targets.items():
        layer = _rebuild_layer(model.get_submodule(model_name), plan_name, tensors, settings)
        replace_module(model, model_name, layer)
        modules[model_name] = layer
    for name in config["modules_to_save"]:
        module = model.get_submodule(name)
        module.load_state_dict(saved_module_state(tensors, name))
        module.requires_grad_(True)
    plan_names = {model_name: plan_name for plan_name, model_name in targets.items()}
    logger.info("loaded %d LaMDA adapters from %s", len(modules), folder)
    return attach_handle(model, plan, settings, modules, plan_names, steps_done=config["steps_done"])


def _rebuild_layer(base: nn.Module, plan_name: str, tensors: dict, settings: AdapterSettings) -> LamdaLinear:
    def factor(attribute: str) -> torch.Tensor | None:
        value = tensors.get(f"{plan_name}.{attribute}")
        return None if value is None else value.to(settings.adapter_dtype)

    layer = LamdaLinear.from_factors(
        base,
        *(factor(attribute) for attribute in FACTOR_NAMES),
        init=settings.init,
        scaling=settings.scaling,
        dropout=settings.dropout,
        principal_values=factor("principal_values"),
        principal_pmb=factor("principal_pmb"),
    )
    if layer.principal_values is not None:
        subtract_principal_part(layer)
    return layer


def read_config(folder: Path) -> dict:
    """Read and check ``lamda_adapter.json`` in ``folder``."""
    file = folder / CONFIG_FILE
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{file} not found; pass a folder written by save_adapter") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{file} is not valid JSON ({err}); save the adapter again") from err
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{file} is not a LaMDA adapter config (format must be {ADAPTER_FORMAT!r})")
    if config.get("schema_version") != ADAPTER_SCHEMA_VERSION:
        raise AdapterError(
            f"{file} has schema_version {config.get('schema_version')!r}; this version of lamda_spectra "
            f"reads schema_version {ADAPTER_SCHEMA_VERSION}"
        )
    missing = [key for key in ("settings", "steps_done", "modules", "modules_to_save", "plan") if key not in config]
    if missing:
        raise AdapterError(f"{file} lacks the keys {', '.join(missing)}; save the adapter again")
    steps_done = config["steps_done"]
    if not isinstance(steps_done, int) or isinstance(steps_done, bool) or steps_done < 0:
        raise AdapterError(f"{file} has steps_done={steps_done!r}; expected a non-negative integer")
    saved = config["modules_to_save"]
    if not isinstance(saved, list) or not all(isinstance(name, str) and name for name in saved):
        raise AdapterError(f"{file} has modules_to_save={saved!r}; expected a list of module names")
    return config


def settings_from_json(values: object, file: Path) -> AdapterSettings:
    """Rebuild and validate :class:`AdapterSettings` from the config's ``settings`` object."""
    fields = set(AdapterSettings.__dataclass_fields__)
    if not isinstance(values, dict) or set(values) != fields:
        raise AdapterError(f"{file}: settings must have exactly the keys {', '.join(sorted(fields))}")
    values = dict(values)
    dtype = getattr(torch, str(values["adapter_dtype"]), None)
    values["adapter_dtype"] = dtype if isinstance(dtype, torch.dtype) else values["adapter_dtype"]
    problems = settings_problems(**values)
    if problems:
        raise AdapterError(f"{file}: invalid settings: " + "; ".join(problems))
    return AdapterSettings(**values)


def plan_from_config(document: object, file: Path) -> Plan:
    """Rebuild and validate the plan stored in the config."""
    try:
        return Plan.from_dict(document)
    except PlanError as err:
        raise AdapterError(f"{file}: {err}; save the adapter again") from err


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Load the adapter's safetensors file onto the CPU."""
    if not file.is_file():
        raise AdapterError(f"{file} not found; pass a folder written by save_adapter")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{file} is not a readable safetensors file ({err}); save the adapter again") from err


def tensor_problems(config: dict, plan_modules: dict, tensors: dict[str, torch.Tensor], init: str) -> list[str]:
    """List missing, extra or misshapen adapter tensors, comparing with the plan's ranks and shapes."""
    problems = []
    if set(config["modules"]) != set(plan_modules):
        problems.append("the config's modules differ from the plan's modules")
    expected_names = FACTOR_NAMES + (PRINCIPAL_NAMES if init == "principal" else ())
    expected = set()
    for plan_name, module_plan in plan_modules.items():
        d_out, d_in = module_plan.shape
        rank = module_plan.rank
        shapes = {
            "lamda_A": (d_in, rank),
            "lamda_S": (rank, rank),
            "lamda_B": (rank, d_out),
            "principal_values": (rank,),
            "principal_pmb": (rank, d_out),
        }
        for attribute in expected_names:
            key = f"{plan_name}.{attribute}"
            expected.add(key)
            if key not in tensors:
                problems.append(f"tensor {key} is missing")
            elif tuple(tensors[key].shape) != shapes[attribute]:
                problems.append(f"tensor {key} has shape {list(tensors[key].shape)}, expected {list(shapes[attribute])}")
    extra = sorted(key for key in set(tensors) - expected if not key.startswith(SAVED_MODULE_PREFIX))
    if extra:
        problems.append(f"unexpected tensors {', '.join(extra[:5])}")
    return problems



def module_state_tensors(model: nn.Module, names: list[str], key_prefix: str) -> dict[str, torch.Tensor]:
    """Collect the ``state_dict`` of each named module as ``<key_prefix><name>.<tensor name>``.

    Raises:
        AdapterError: if a name is not a module of ``model`` (all such names listed).
    """
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise AdapterError(
            f"modules_to_save names modules that are not in the model: {', '.join(missing)}; "
            "pass full names as model.named_modules() gives them"
        )
    tensors = {}
    for name in names:
        for key, value in modules[name].state_dict().items():
            tensors[f"{key_prefix}{name}.{key}"] = value.detach().cpu().contiguous()
    return tensors


def saved_module_state(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Return the saved ``state_dict`` of module ``name``."""
    prefix = f"{SAVED_MODULE_PREFIX}{name}."
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


def saved_module_problems(model: nn.Module, names: list[str], tensors: dict[str, torch.Tensor]) -> list[str]:
    """List saved modules missing from ``model`` or whose saved state does not fit it."""
    modules = dict(model.named_modules())
    problems = []
    for name in names:
        if name not in modules:
            problems.append(f"saved module {name} is not in the model")
            continue
        expected = {key: tuple(value.shape) for key, value in modules[name].state_dict().items()}
        saved = {key: tuple(value.shape) for key, value in saved_module_state(tensors, name).items()}
        if saved != expected:
            problems.append(f"saved module {name} has tensors {saved} but the model's module has {expected}")
    return problems
