"""Measure the activation memory autograd keeps for backward, and the optimizer's state memory."""

from __future__ import annotations

import itertools
from typing import Callable, TypeVar

import torch
from torch import nn

T = TypeVar("T")


def saved_activation_bytes(model: nn.Module, forward: Callable[[], T]) -> tuple[int, T]:
    """Run ``forward()`` and count the bytes of the tensors autograd saves for backward.

    Each storage counts once, however many saved tensors view it, and storages of the
    model's parameters and buffers do not count: they stay in memory whether or not a backward
    follows. The count is exact and does not depend on the allocator, so two adapter methods can
    be compared deterministically.

    Args:
        model: the model whose parameters and buffers are excluded.
        forward: a function running the forward pass with autograd enabled.

    Returns:
        ``(bytes, output of forward())``.
    """
    persistent = {tensor.untyped_storage().data_ptr() for tensor in itertools.chain(model.parameters(), model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in persistent:
            saved[pointer] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    return sum(saved.values()), output


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Return the bytes of every tensor in the optimizer's per-parameter state."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
