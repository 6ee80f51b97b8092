"""Block index (layer) and module type of each module, parsed from its full name.

Transformer checkpoints name the linear layers of their repeated blocks as
``<stack>.<N>.<type>``, where the stack ends in ``layers``, ``layer``, ``h``, ``blocks`` or
``block`` (Llama ``model.layers.3.self_attn.q_proj``, BERT
``encoder.layer.3.attention.self.query``, GPT-2 ``transformer.h.3.attn.c_attn``, GPT-NeoX
``gpt_neox.layers.3.attention.query_key_value``). The report draws one row per block and one
column per module type. Modules outside the repeated blocks (a pooler, a classifier head) go in
an ``other`` row, with their full name as their type.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

OTHER_ROW = "other"

# The first (outermost) block index wins, so T5's "encoder.block.3.layer.0.SelfAttention.q" is
# block 3 of the stack "encoder.block", with type "layer.0.SelfAttention.q".
_BLOCK_PATTERN = re.compile(r"^(?P<stack>(?:.*?\.)?(?:layers|layer|h|blocks|block))\.(?P<index>\d+)\.(?P<kind>.+)$")

# Short labels for the module types of common families, matched against the end of the type
# path; the longest matching key wins, so BERT's "attention.output.dense" is "attn.out" and its
# "output.dense" is "ffn.out".
_KNOWN_LABELS = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "out_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "query": "q",
    "key": "k",
    "value": "v",
    "attention.output.dense": "attn.out",
    "intermediate.dense": "ffn.in",
    "output.dense": "ffn.out",
    "c_attn": "qkv",
    "attn.c_proj": "attn.out",
    "c_fc": "ffn.in",
    "mlp.c_proj": "ffn.out",
    "query_key_value": "qkv",
    "attention.dense": "attn.out",
    "self_attention.dense": "attn.out",
    "dense_h_to_4h": "ffn.in",
    "dense_4h_to_h": "ffn.out",
    "fc1": "fc1",
    "fc2": "fc2",
}

# Column order of the known labels: attention before the MLP, inputs before outputs. Other
# labels follow in order of first appearance.
_LABEL_ORDER = ("q", "k", "v", "qkv", "o", "attn.out", "gate", "up", "ffn.in", "fc1", "down", "ffn.out", "fc2")

# Abbreviations for the parts of a type path that no known label covers.
_PART_ABBREVIATIONS = {
    "self_attn": "attn",
    "self_attention": "attn",
    "attention": "attn",
    "intermediate": "inter",
    "output": "out",
    "SelfAttention": "attn",
    "EncDecAttention": "cross",
    "DenseReluDense": "ffn",
}


@dataclass(frozen=True)
class ModuleSite:
    """The block and module type of one module, parsed from its full name."""

    name: str  # full module name
    stack: str | None  # path of the repeated blocks, e.g. "model.layers"; None outside them
    layer: int | None  # block index inside the stack; None outside the repeated blocks
    kind: str  # module type: the path inside the block, e.g. "self_attn.q_proj"; else the full name


def parse_module_name(name: str) -> ModuleSite:
    """Split a full module name into its stack, block index and module type.

    Args:
        name: full module name, e.g. ``"model.layers.3.self_attn.q_proj"``.

    Returns:
        The :class:`ModuleSite`; ``layer`` and ``stack`` are None for modules outside the
        repeated blocks, whose type is then their full name.
    """
    match = _BLOCK_PATTERN.match(name)
    if match is None:
        return ModuleSite(name=name, stack=None, layer=None, kind=name)
    return ModuleSite(name=name, stack=match["stack"], layer=int(match["index"]), kind=match["kind"])


def short_labels(kinds: Iterable[str]) -> dict[str, str]:
    """Give each module type a short label for figure axes, unique among ``kinds``.

    Known types of common families get their usual names (``q``, ``gate``, ``attn.out``,
    ``ffn.in``...). Any other type gets its shortest dotted suffix that no other type ends with,
    with common parts abbreviated. Types whose labels would still clash keep their full paths.

    Returns:
        Module type to label, in the order of ``kinds`` (duplicates removed).
    """
    kinds = list(dict.fromkeys(kinds))
    labels = {kind: _known_label(kind) for kind in kinds}

    known = [label for label in labels.values() if label is not None]
    clashing = {label for label in known if known.count(label) > 1}
    for kind in kinds:
        if labels[kind] is None or labels[kind] in clashing:
            labels[kind] = _suffix_label(kind, kinds)

    # Two different paths can still abbreviate alike ("attention.x" and "self_attn.x"):
    # those keep their full paths, which are distinct.
    values = list(labels.values())
    return {kind: kind if values.count(label) > 1 else label for kind, label in labels.items()}


def order_labels(labels: Iterable[str]) -> list[str]:
    """Sort type labels for the figure columns: known labels in their usual order, then the rest.

    Checkpoints often list tensors alphabetically, which would put ``attn.out`` before ``q``.
    """
    labels = list(dict.fromkeys(labels))
    known = {label: index for index, label in enumerate(_LABEL_ORDER)}
    return sorted(labels, key=lambda label: known.get(label, len(known)))


def row_labels(sites: Sequence[ModuleSite]) -> dict[tuple[str | None, int | None], str]:
    """Label each block row ``(stack, layer)``; the stack is named only when there are several.

    An encoder-decoder model has two stacks, so its rows read ``encoder 3`` and ``decoder 3``.
    The ``(None, None)`` row of modules outside the blocks is labelled ``other``.
    """
    stacks = list(dict.fromkeys(site.stack for site in sites if site.stack is not None))
    stack_names = _distinct_stack_names(stacks)
    labels: dict[tuple[str | None, int | None], str] = {}
    for site in sites:
        key = (site.stack, site.layer)
        if site.stack is None:
            labels[key] = OTHER_ROW
        elif len(stacks) == 1:
            labels[key] = str(site.layer)
        else:
            labels[key] = f"{stack_names[site.stack]} {site.layer}"
    return labels


def _known_label(kind: str) -> str | None:
    matches = [key for key in _KNOWN_LABELS if kind == key or kind.endswith("." + key)]
    if not matches:
        return None
    return _KNOWN_LABELS[max(matches, key=len)]


def _suffix_label(kind: str, kinds: Sequence[str]) -> str:
    parts = kind.split(".")
    for start in range(len(parts) - 1, -1, -1):
        suffix = ".".join(parts[start:])
        ends_another = any(other != kind and (other == suffix or other.endswith("." + suffix)) for other in kinds)
        if not ends_another:
            return ".".join(_abbreviate(part) for part in parts[start:])
    return kind


def _abbreviate(part: str) -> str:
    if part in _PART_ABBREVIATIONS:
        return _PART_ABBREVIATIONS[part]
    return part.removesuffix("_proj") or part


def _distinct_stack_names(stacks: Sequence[str]) -> dict[str, str]:
    """Drop the dotted parts that all stacks share at their start and end."""
    if len(stacks) < 2:
        return {stack: stack for stack in stacks}
    split = [stack.split(".") for stack in stacks]
    head = 0
    while all(len(parts) > head + 1 and parts[head] == split[0][head] for parts in split):
        head += 1
    tail = 0
    while all(len(parts) > head + tail + 1 and parts[-1 - tail] == split[0][-1 - tail] for parts in split):
        tail += 1
    names = {stack: ".".join(parts[head : len(parts) - tail]) for stack, parts in zip(stacks, split)}
    if len(set(names.values())) < len(stacks):
        return {stack: stack for stack in stacks}
    return names
