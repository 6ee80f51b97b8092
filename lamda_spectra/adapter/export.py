"""merge_and_unload and export_peft: hand a trained LaMDA model to code without LaMDA support.

Both express the adapter of a module as a change of its base weight. In the ``x @ M`` form of a
layer (``M`` of shape ``(d_in, d_out)``), the adapter adds ``scaling * A S B``. A ``"principal"``
init also took ``A diag(s) B_0`` out of the original weight, so the change from the original is
``A (scaling S B - diag(s) B_0)``. Because PMA ``A`` is frozen, this change has rank at most
``r`` for either init, and the exported LoRA has exactly the plan's rank per module:
``lora_A = A.T`` with shape ``(r, d_in)`` and ``lora_B`` with shape ``(d_out, r)``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .._io import atomic_directory, atomic_write_text
from ..errors import AdapterError
from .apply import replace_module
from .checks import linear_module_names
from .handle import HANDLE_ATTRIBUTE, find_handle, full_name
from .io import module_state_tensors
from .layer import LamdaLinear

logger = logging.getLogger(__name__)

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


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

    Args:
        model: a model adapted by :func:`apply_plan` or :func:`load_adapter`.
        path: folder to write; created if missing.
        modules_to_save: names (in ``model``) of further modules to store whole, such as a
            trained task head; PEFT's ``modules_to_save`` loads them.
        base_model_name_or_path: recorded in the config; defaults to the plan's source.

    Returns:
        The folder's path.

    Raises:
        AdapterError: if ``model`` has no adapters or lacks a module of ``modules_to_save``,
            or PEFT would match a module name to the wrong module.
    """
    handle, prefix = find_handle(model)
    modules_to_save = list(modules_to_save or [])
    tensors = module_state_tensors(model, modules_to_save, "base_model.model.")
    ranks, layouts = {}, set()
    for name, layer in handle.modules.items():
        name = full_name(prefix, name)
        layer.restore_frozen_rows()
        lora_a, lora_b = lora_factors(layer)
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b
        ranks[name] = layer.rank
        layouts.add(layer.layout)
    check_peft_name_matching(model, ranks)

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


def check_peft_name_matching(model: nn.Module, ranks: dict[str, int]) -> None:
    """Check that PEFT resolves each full module name to itself, as peft 0.21 matches names.

    PEFT treats a ``rank_pattern`` key as a regex matched against the end of a module name and
    uses the first key that matches, and it targets every module whose name ends with
    ``"." + target``. Either can pick the wrong module when one full name is a suffix of another.
    """
    problems = []
    for name in ranks:
        first = next((key for key in ranks if re.match(rf"(.*\.)?({key})$", name)), None)
        if first != name:
            problems.append(f"rank_pattern key {first or name} would not resolve to module {name}")
    for name in linear_module_names(model):
        if name in ranks:
            continue
        suffix_of = [target for target in ranks if name.endswith("." + target)]
        if suffix_of:
            problems.append(f"target {suffix_of[0]} would also make PEFT adapt module {name}")
    if problems:
        raise AdapterError("cannot export to PEFT, module names are ambiguous: " + "; ".join(problems))
