"""merge_and_unload and export_peft: hand a trained LaMDA model to code without LaMDA support.

Both express the adapter of a module as a change of its base weight. In the ``x @ M`` form of a
layer (``M`` of shape ``(d_in, d_out)``), the adapter adds ``scaling * A S B``. A ``"principal"``
init also took ``A diag(s) B_0`` out of the original weight, so the change from the original is
``A (scaling S B - diag(s) B_0)``. Because PMA ``A`` is frozen, this change has rank at most
``r`` for either init, and the exported LoRA has exactly the plan's rank per module:
``lora_A = A.T`` with shape ``(r, d_in)`` and ``lora_B`` with shape ``(d_out, r)``.

Other trained modules, such as a task head, go into the PEFT adapter through PEFT's
``modules_to_save``. peft 0.21 stores each such module's ``state_dict`` under
``base_model.model.<module name>.<tensor name>`` and loads it into a ``ModulesToSaveWrapper``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .._io import atomic_directory, atomic_write_text, check_writable_location
from .._text import count_noun
from ..errors import AdapterError, LamdaWarning
from .apply import replace_module
from .checks import SAMPLE_SIZE, linear_module_names, sample_names
from .handle import HANDLE_ATTRIBUTE, find_handle, full_name
from .io import module_state_tensors
from .layer import LamdaLinear

logger = logging.getLogger(__name__)

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
# PeftModel puts the base model under this prefix, in module names and in the adapter file's keys.
PEFT_PREFIX = "base_model.model."
# Modules that peft 0.21 adds under each LoRA target of an nn.Linear or Conv1D. PEFT matches the
# modules_to_save entries against their names too.
LORA_SUBMODULES = (
    "base_layer",
    "lora_dropout",
    "lora_dropout.default",
    "lora_A",
    "lora_A.default",
    "lora_B",
    "lora_B.default",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
)
# The trainable parameters of a LamdaLinear that the exported LoRA factors contain.
ADAPTER_PARAMETERS = ("lamda_S", "lamda_B")


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LaMDA adapter into its base weight and put the plain base layers back.

    The merged weight ``W + scaling * (A S B)^T`` is computed in float32 and stored in the base
    weight's dtype. Base parameters stay frozen, the handle is removed from the model, and
    calling its ``step`` afterwards raises :class:`AdapterError`. Dropout is not part of a merged
    layer, so outputs match the adapted model's in eval mode.

    Returns:
        ``model``, changed in place.

    Raises:
        AdapterError: if ``model`` has no LaMDA adapters.
    """
    handle, prefix = find_handle(model)
    for name, layer in handle.modules.items():
        layer.restore_frozen_rows()
        layer.add_to_base_weight(layer.adapter_delta(), sign=1.0)
        replace_module(model, full_name(prefix, name), layer.base_layer)
    delattr(model.get_submodule(prefix), HANDLE_ATTRIBUTE)
    handle.merged = True
    handle.modules = {}
    logger.info("merged LaMDA adapters into %d base layers", len(handle.plan_names))
    return model


def lora_factors(layer: LamdaLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Express a layer's total change from the original weight as LoRA factors.

    Returns:
        ``(lora_A, lora_B)`` in float32 on the CPU, shapes ``(r, d_in)`` and ``(d_out, r)``, such
        that the change of ``y`` is ``x @ lora_A.T @ lora_B.T``.
    """
    with torch.no_grad():
        change = layer.scaling * layer.lamda_S.double() @ layer.lamda_B.double()
        if layer.principal_values is not None:
            change -= layer.principal_values.double()[:, None] * layer.principal_pmb.double()
        lora_a = layer.lamda_A.double().T
    return lora_a.float().cpu().contiguous(), change.T.float().cpu().contiguous()


def export_peft(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    modules_to_save: list[str] | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the adapters of ``model`` as a standard PEFT LoRA adapter in the folder ``path``.

    ``peft.PeftModel.from_pretrained(base, path)``, with ``base`` a fresh instance of the model
    class that ``model`` was before adaptation (same original weights), then computes what
    ``model`` computes. The folder contains ``adapter_config.json`` (``target_modules`` listing every
    adapted module by full name, ``rank_pattern`` and ``alpha_pattern`` mapping each full name to
    its rank, so PEFT's ``lora_alpha / r`` scaling is 1 and LaMDA's ``scaling`` is folded into
    ``lora_B``) and ``adapter_model.safetensors``. ``fan_in_fan_out`` is set when any target is a
    Conv1D (PEFT warns about and corrects the flag per layer in models that mix both types).

    PEFT wraps every module whose name ends with a ``modules_to_save`` entry (plain string
    suffix, so ``classifier`` also catches ``pre_classifier``), and each wrapped module's weights
    are written. A trainable parameter that is neither in an adapter nor in such a module is not
    in the PEFT adapter: a :class:`LamdaWarning` names it and the ``modules_to_save`` to pass.

    Args:
        model: a model adapted by :func:`apply_plan` or :func:`load_adapter`.
        path: folder to write; created if missing.
        modules_to_save: full names (as ``model.named_modules()`` gives them) of further modules
            to store whole, such as a trained task head; PEFT's ``modules_to_save`` loads them.
        base_model_name_or_path: recorded in the config; defaults to the plan's source.

    Returns:
        The folder's path.

    Raises:
        AdapterError: if ``model`` has no adapters, ``modules_to_save`` is a string or has an
            entry that is not a module of ``model`` or overlaps an adapted module, or PEFT would
            match a module name to the wrong module. Nothing is written then.
        LamdaError: if ``path`` is a file or cannot be written.
    """
    handle, prefix = find_handle(model)
    if isinstance(modules_to_save, str):
        raise AdapterError(f"modules_to_save must be a list of module names, not the string {modules_to_save!r}")
    modules_to_save = list(modules_to_save or [])
    targets = {full_name(prefix, name): layer for name, layer in handle.modules.items()}
    saved, problems = peft_saved_modules(model, list(targets), modules_to_save)
    problems += peft_name_problems(model, list(targets))
    if problems:
        raise AdapterError(f"cannot export to PEFT ({count_noun(len(problems), 'problem')}): " + "; ".join(problems))
    # Check the folder first, so that a bad path raises before any warning about left-out parameters.
    check_writable_location(path, kind="folder")
    warn_unsaved_trainable(model, list(targets), saved)

    tensors = module_state_tensors(model, saved, PEFT_PREFIX)
    ranks, layouts = {}, set()
    for name, layer in targets.items():
        layer.restore_frozen_rows()
        lora_a, lora_b = lora_factors(layer)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora_a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora_b
        ranks[name] = layer.rank
        layouts.add(layer.layout)

    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    source = handle.plan.source
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path or source.get("repo_id") or source.get("path"),
        "revision": source.get("revision"),
        "r": default_rank,
        "lora_alpha": default_rank,
        "target_modules": list(ranks),
        "rank_pattern": ranks,
        "alpha_pattern": ranks,
        "lora_dropout": handle.settings.dropout,
        "fan_in_fan_out": "conv1d" in layouts,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save or None,
        "inference_mode": True,
    }
    with atomic_directory(path) as staging:
        save_file(tensors, str(staging / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        atomic_write_text(staging / PEFT_CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    logger.info("exported %d LaMDA adapters as a PEFT LoRA adapter to %s", len(ranks), path)
    return Path(path)


def peft_name_problems(model: nn.Module, targets: list[str]) -> list[str]:
    """List the targets that PEFT would not resolve to themselves, as peft 0.21 matches names.

    PEFT treats a ``rank_pattern`` key as a regex matched against the end of a module name and
    uses the first key that matches, and it targets every module whose name ends with
    ``"." + target``. Either can pick the wrong module when one full name is a suffix of another.
    """
    problems = []
    # NOTE: names are used as regular expressions, as PEFT uses them; a module name with regex
    # characters (possible only through ModuleDict keys) raises re.error here.
    for name in targets:
        first = next((key for key in targets if re.match(rf"(.*\.)?({key})$", name)), None)
        if first != name:
            problems.append(f"rank_pattern key {first or name} would not resolve to module {name}")
    for name in linear_module_names(model):
        if name in targets:
            continue
        suffix_of = [target for target in targets if name.endswith("." + target)]
        if suffix_of:
            problems.append(f"target {suffix_of[0]} would also make PEFT adapt module {name}")
    return problems


def peft_saved_modules(model: nn.Module, targets: list[str], entries: list[str]) -> tuple[list[str], list[str]]:
    """Find the modules that PEFT wraps for the ``modules_to_save`` entries, as peft 0.21 matches names.

    PEFT wraps every module whose name in the ``PeftModel`` ends with an entry, compared as
    plain strings. It also leaves out of LoRA every target that an entry matches as a whole
    dotted component, so a saved module must not contain an adapted one.

    Returns:
        ``(saved, problems)``: the full names of the modules to write, in module order, and one
        line per entry or module that PEFT would not load as saved.
    """
    modules = dict(model.named_modules())
    # Submodules of an adapted layer turn into LoRA submodules in the PeftModel.
    plain = [name for name in modules if name and not _inside_any(name, targets)]
    peft_only = ["base_model", "base_model.model"]
    peft_only += [f"{PEFT_PREFIX}{target}.{child}" for target in targets for child in LORA_SUBMODULES]

    problems = []
    for entry in entries:
        if entry not in modules:
            problems.append(
                f"modules_to_save entry {entry!r} is not a module of the model; "
                "pass full names as model.named_modules() gives them"
            )
        elif not entry:
            problems.append("modules_to_save entry '' names the whole model; name its trained submodules")
        elif _inside_any(entry, targets):
            problems.append(f"modules_to_save entry {entry} is part of an adapted module; leave it out")
        else:
            clash = next((name for name in peft_only if name.endswith(entry)), None)
            if clash is not None:
                problems.append(f"modules_to_save entry {entry} would also make PEFT wrap its own module {clash}")
            excluded = [target for target in targets if re.match(rf"(^|.*\.){entry}($|\..*)", target)]
            if excluded:
                problems.append(
                    f"modules_to_save entry {entry} matches the adapted module {excluded[0]}, "
                    "which PEFT would then load without its LoRA; save a module that holds no adapter"
                )
    saved = [name for name in plain if any((PEFT_PREFIX + name).endswith(entry) for entry in entries if entry)]
    for name in saved:
        adapted = [target for target in targets if target == name or target.startswith(name + ".")]
        if adapted:
            problems.append(f"PEFT would save module {name}, which contains the adapted module {adapted[0]}")
        nested = [other for other in saved if other.startswith(name + ".")]
        if nested:
            problems.append(f"PEFT would save both module {name} and its submodule {nested[0]}; save only {name}")
    extra = [name for name in saved if name not in entries]
    if extra and not problems:
        logger.info("PEFT also saves %s because their names end with a modules_to_save entry", sample_names(extra))
    return saved, problems


def warn_unsaved_trainable(model: nn.Module, targets: list[str], saved: list[str]) -> None:
    """Warn about trainable parameters that are neither in an adapter nor in a saved module.

    Parameters directly on the root module or inside an adapted layer (such as an unfrozen
    ``base_layer.bias``) cannot go into a PEFT LoRA adapter, so their warning points to
    :func:`merge_and_unload` instead.
    """
    adapter = {f"{target}.{parameter}" for target in targets for parameter in ADAPTER_PARAMETERS}
    storable, other = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or name in adapter or _inside_any(name, saved):
            continue
        owner = name.rpartition(".")[0]
        overlaps = any(target == owner or _inside_any(target, [owner]) for target in targets)
        if owner and not overlaps and not _inside_any(owner, targets):
            storable.append(name)
        else:
            other.append(name)

    if storable:
        owners = list(dict.fromkeys(name.rpartition(".")[0] for name in storable))
        if len(owners) <= SAMPLE_SIZE:
            fix = f"pass modules_to_save={owners!r} to store them"
        else:
            fix = f"pass their {len(owners)} modules ({sample_names(owners)}) as modules_to_save to store them"
        message = (
            f"export_peft leaves out {len(storable)} trainable parameters that are in no LaMDA adapter "
            f"({sample_names(storable)}); {fix}"
        )
        warnings.warn(message, LamdaWarning, stacklevel=3)
    if other:
        message = (
            f"export_peft leaves out {len(other)} trainable parameters that a PEFT LoRA adapter cannot "
            f"store ({sample_names(other)}); call merge_and_unload to keep their trained values"
        )
        warnings.warn(message, LamdaWarning, stacklevel=3)


def _inside_any(name: str, parents: list[str]) -> bool:
    """Return whether ``name`` is a strict descendant of one of the modules in ``parents``."""
    return any(parent and name.startswith(parent + ".") for parent in parents)
