"""Checkpoint sources: local folders, single files, sharded indexes and Hub repo ids, read lazily.

Nothing here loads a whole model: headers are parsed with ``safetensors.safe_open`` and each
tensor is materialised only when :meth:`WeightSource.read` asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

LAYOUTS = ("linear", "conv1d")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it."""

    name: str  # tensor name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: "F32", "BF16", "F16", "I8", "U8", "F8_E4M3", ...
    file: Path


@dataclass(frozen=True)
class Target:
    """One linear module whose weight the scan analyses.

    ``shape`` is always ``(d_out, d_in)`` as the layer computes ``y = x W^T``; for a GPT-2 style
    ``Conv1D`` (``layout == "conv1d"``) the stored tensor is ``(d_in, d_out)``.
    """

    module: str  # full module name as model.named_modules() yields it: tensor name minus ".weight"
    tensor: str
    shape: tuple[int, int]
    layout: Literal["linear", "conv1d"]
    dtype: str


@dataclass
class WeightSource:
    """A resolved, validated checkpoint."""

    source: str  # what the user passed (path or repo id)
    kind: Literal["folder", "file", "hub"]
    repo_id: str | None
    revision: str | None  # for the Hub: the resolved commit hash
    root: Path  # folder that holds the files (snapshot folder for the Hub)
    files: list[Path]  # safetensors files, in index order
    tensors: dict[str, TensorInfo]
    config: dict | None  # parsed config.json, when present
    model_name: str  # short name for output folders, e.g. "Llama-2-7b-hf"
    fingerprint: str  # sha256 hex over each safetensors header plus file sizes

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor with ``safe_open``, in its stored dtype, on the CPU."""
        raise NotImplementedError


def open_source(model: str, revision: str | None = None) -> WeightSource:
    """Resolve ``model`` to a validated :class:`WeightSource`.

    ``model`` is a folder (``model.safetensors`` or ``model.safetensors.index.json``), a single
    ``.safetensors`` file, or a Hub repo id ``org/name`` resolved through ``huggingface_hub``
    (only ``config.json``, the index and the shards; the cache and ``HF_HUB_OFFLINE`` honoured).

    Raises:
        SourceError: missing path, repo not in the offline cache, Git LFS pointer, truncated file
            (expected and actual bytes), corrupt header, missing shards (all listed), or an index
            entry whose tensor is absent from its shard.
    """
    raise NotImplementedError


def select_targets(
    source: WeightSource,
    target: list[str] | None = None,
    exclude: list[str] | None = None,
    *,
    skip_unsupported: bool = False,
) -> list[Target]:
    """Pick the linear modules to scan, in natural module order (layer numbers compared as numbers).

    ``target``/``exclude`` entries are module-name suffixes (``q_proj``, ``attention.self.query``)
    or, when they contain regex metacharacters, a regex searched in the full module name.

    Raises:
        SourceError: no module matched (the message lists a sample of available linear modules).
        SpectrumError: a quantized or packed weight is selected, unless ``skip_unsupported``.
    """
    raise NotImplementedError
