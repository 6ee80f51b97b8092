"""Checkpoint sources: local folders, single files, sharded indexes and Hub repo ids, read lazily.

Nothing here loads a whole model. :func:`open_source` reads only the JSON header of each
safetensors file, and :meth:`WeightSource.read` materialises one tensor at a time through
``safetensors.safe_open``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.utils import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError, safe_open

from ._text import count_noun
from .errors import LamdaWarning, SourceError, SpectrumError, UsageError

logger = logging.getLogger(__name__)

LAYOUTS = ("linear", "conv1d")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# Dtypes whose stored values are the matrix entries. Any other dtype means packed or quantized values.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

# Last name component of the linear projections scanned by default, per architecture family.
DEFAULT_PROJECTIONS = frozenset(
    {
        # Llama, Mistral, Qwen
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        # BERT
        "query", "key", "value", "dense",
        # GPT-2 (Conv1D)
        "c_attn", "c_proj", "c_fc",
        # GPT-NeoX, Falcon
        "query_key_value", "dense_h_to_4h", "dense_4h_to_h",
        # OPT, CLIP, Phi and others
        "fc1", "fc2",
    }
)  # fmt: skip

# transformers' Conv1D stores its weight as (d_in, d_out). These model types use it for the
# modules below; others reuse the names with nn.Linear (GPTBigCode's c_attn, for example).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_PROJECTIONS = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})

# Tensors beside or instead of ``<module>.weight`` that mark a quantized or packed layer:
# bitsandbytes 4-bit and 8-bit, GPTQ/AWQ, compressed-tensors and FP8 scales.
_QUANTIZATION_TENSOR = re.compile(
    r"^(?P<module>.+)\.("
    r"weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)"
    r"|SCB|weight_format|weight_scale|weight_scale_inv|weight_packed|weight_shape"
    r"|qweight|qzeros|scales|g_idx)$"
)
_PACKED_WEIGHT_SUFFIXES = (".qweight", ".weight_packed")

# Matched against a module's last name component. A match is an embedding or a norm, never a target.
_EMBEDDING = re.compile(r"(^|_)embed(_tokens|_in|_positions)?$|embeddings?$|^(wte|wpe|shared|relative_attention_bias)$")
_NORM = re.compile(r"norm|^ln(_|$)", re.IGNORECASE)

# A target or exclude entry with any of these characters is a regex. A '.' alone keeps it a suffix.
_REGEX_METACHARACTERS = frozenset("^$*+?{}[]|()\\")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_LFS_POINTER_PREFIX = b"version https://git-lfs"
# safetensors 0.8 rejects headers above 100 MB ("header too large") too.
_MAX_HEADER_BYTES = 100_000_000
_SAMPLE_SIZE = 8


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
    files: list[Path]  # safetensors files; an index's shards sorted by name, digit runs as numbers
    tensors: dict[str, TensorInfo]
    config: dict | None  # parsed config.json, when present
    model_name: str  # short name for output folders, e.g. "Llama-2-7b-hf"
    fingerprint: str  # sha256 hex over each safetensors header plus file sizes

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor with ``safe_open``, in its stored dtype, on the CPU.

        The file is opened and closed again for every call. An open handle keeps its memory map
        alive, and every page a read touches would then stay resident until the handle closes.

        Args:
            name: tensor name as stored, e.g. ``"model.layers.0.mlp.up_proj.weight"``.

        Returns:
            The tensor with its stored shape and dtype.

        Raises:
            SourceError: the name is not in this checkpoint, or safetensors cannot read it.
        """
        info = self.tensors.get(name)
        if info is None:
            raise SourceError(f"tensor {name} is not in {self.source}; pick a name from WeightSource.tensors")
        try:
            with safe_open(str(info.file), framework="pt") as handle:
                return handle.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise SourceError(f"cannot read tensor {name} from {info.file}: {err}; download the file again") from err


@dataclass(frozen=True)
class _Header:
    """The parsed header of one safetensors file, plus what the fingerprint needs."""

    raw: bytes  # header JSON bytes exactly as stored
    size: int  # file size in bytes
    tensors: dict[str, TensorInfo]


def open_source(
    model: str, revision: str | None = None, *, cache_dir: str | Path | None = None
) -> WeightSource:
    """Resolve ``model`` to a validated :class:`WeightSource`.

    ``model`` is a folder (``model.safetensors`` or ``model.safetensors.index.json``), a single
    ``.safetensors`` file, or a Hub repo id ``org/name`` resolved through ``huggingface_hub``
    (only ``config.json``, the index and the shards; the cache and ``HF_HUB_OFFLINE`` honoured).
    A local path wins over a repo id of the same spelling. Every header is checked before any
    tensor is read.

    Args:
        model: local path or Hub repo id.
        revision: Hub branch, tag or commit hash (default ``main``); only for repo ids.
        cache_dir: Hugging Face cache folder (default: ``HF_HUB_CACHE``).

    Returns:
        The resolved source; for the Hub, ``revision`` holds the commit hash.

    Raises:
        SourceError: missing path, repo not in the offline cache, Git LFS pointer, truncated file
            (expected and actual bytes), corrupt header, missing shards (all listed), or an index
            entry whose tensor is absent from its shard.
        UsageError: ``revision`` given for a local path.
    """
    path = Path(model).expanduser()
    if path.exists():
        if revision is not None:
            raise UsageError(f"--revision {revision} applies to Hub repo ids only, but {model} is a local path")
        return _open_local(model, path)
    if _looks_like_repo_id(model):
        return _open_hub(model, revision, cache_dir)
    raise SourceError(
        f"model path {model} does not exist; pass a model folder, a .safetensors file or a Hub repo id org/name"
    )


def _looks_like_repo_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and not model.endswith((".safetensors", ".json"))


def _open_local(model: str, path: Path) -> WeightSource:
    # abspath instead of resolve: a Hub cache file links to a blob named by its hash, and the
    # link's own name and folder are what the suffix check and the model name need.
    path = Path(os.path.abspath(path))
    if path.is_dir():
        kind, root = "folder", path
        files, tensors, headers = _load_weights(_find_weights(path))
        model_name = path.name
    elif path.name.endswith(".safetensors.index.json"):
        kind, root = "folder", path.parent
        files, tensors, headers = _load_weights(path)
        model_name = root.name
    elif path.suffix == ".safetensors":
        kind, root = "file", path.parent
        files, tensors, headers = _load_weights(path)
        model_name = root.name if path.stem == "model" else path.stem
    else:
        raise SourceError(
            f"{path} is not a .safetensors file or a model folder; pass a folder, a .safetensors file or a Hub repo id"
        )
    return WeightSource(
        source=model,
        kind=kind,
        repo_id=None,
        revision=None,
        root=root,
        files=files,
        tensors=tensors,
        config=_read_config(root),
        model_name=model_name,
        fingerprint=_fingerprint(headers),
    )


def _find_weights(folder: Path) -> Path:
    """Return the index or single file that describes the weights in ``folder``."""
    for name in (INDEX_FILE, SINGLE_FILE):
        candidate = folder / name
        # A dangling Hub cache link is not a file but must reach _read_header for a clear error.
        if candidate.is_file() or candidate.is_symlink():
            return candidate
    others = sorted(item.name for item in folder.glob("*.safetensors"))
    if others:
        raise SourceError(
            f"{folder} has no {SINGLE_FILE} or {INDEX_FILE} but contains {', '.join(others)}; "
            "pass the path of the file to scan"
        )
    raise SourceError(
        f"{folder} contains no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); "
        "pass a folder saved with safe_serialization=True, or convert the weights to safetensors"
    )


def _open_hub(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> WeightSource:
    # Two requests: the index first, then exactly the shards it names. A pattern such as
    # "*.safetensors" would also fetch any other safetensors export in the repo, such as a
    # consolidated single-file copy of the same weights.
    first = _snapshot(repo_id, revision, [CONFIG_FILE, INDEX_FILE], cache_dir)
    commit = first.name
    if (first / INDEX_FILE).is_file():
        shards = sorted(set(_read_index(first / INDEX_FILE).values()), key=_natural_key)
        patterns = [CONFIG_FILE, INDEX_FILE, *shards]
    else:
        patterns = [CONFIG_FILE, SINGLE_FILE]
    root = _snapshot(repo_id, commit, patterns, cache_dir)
    if not any((root / name).is_file() or (root / name).is_symlink() for name in (INDEX_FILE, SINGLE_FILE)):
        raise SourceError(
            f"Hub repo {repo_id} (commit {commit}) has no {SINGLE_FILE} or {INDEX_FILE}; "
            "download the safetensors file you want and pass its path"
        )
    files, tensors, headers = _load_weights(_find_weights(root))
    return WeightSource(
        source=repo_id,
        kind="hub",
        repo_id=repo_id,
        revision=commit,
        root=root,
        files=files,
        tensors=tensors,
        config=_read_config(root),
        model_name=repo_id.split("/")[-1],
        fingerprint=_fingerprint(headers),
    )


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], cache_dir: str | Path | None) -> Path:
    """Fetch ``patterns`` of a Hub repo into the cache and return its snapshot folder."""
    label = f"Hub repo {repo_id} (revision {revision or 'main'})"
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache_dir)
    except GatedRepoError as err:
        raise SourceError(f"{label} is gated; accept its terms on the Hub and log in with `hf auth login`") from err
    except RepositoryNotFoundError as err:
        raise SourceError(
            f"{label} was not found on the Hub or needs a login; check the id, or log in with `hf auth login`"
        ) from err
    except RevisionNotFoundError as err:
        raise SourceError(f"{label}: revision {revision} does not exist; pass a branch, tag or commit hash") from err
    except LocalEntryNotFoundError as err:
        raise SourceError(_not_cached_message(label, err, cache_dir)) from err
    except HFValidationError as err:
        raise SourceError(f"{repo_id} is neither a local path nor a valid Hub repo id: {_first_line(err)}") from err
    except HfHubHTTPError as err:
        raise SourceError(f"{label} could not be fetched: {_first_line(err)}; check the network or the id") from err
    logger.info("resolved %s to %s", label, folder)
    return Path(folder)


def _not_cached_message(label: str, err: LocalEntryNotFoundError, cache_dir: str | Path | None) -> str:
    cache = cache_dir or hub_constants.HF_HUB_CACHE
    # Matched by name because older huggingface_hub releases lack this class.
    if type(err).__name__ == "IncompleteSnapshotError":
        return f"{label} is only partly in the local cache {cache}: {_first_line(err)}"
    if hub_constants.HF_HUB_OFFLINE:
        return (
            f"{label} is not in the local Hugging Face cache {cache} and HF_HUB_OFFLINE=1 blocks downloads; "
            "download it once online (unset HF_HUB_OFFLINE) or pass a local folder"
        )
    return (
        f"{label} is not in the local cache {cache} and the Hub could not be reached; "
        "check the network connection or pass a local folder"
    )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_weights(path: Path) -> tuple[list[Path], dict[str, TensorInfo], list[_Header]]:
    """Read and validate the headers of a single file or of every shard an index names."""
    if not path.name.endswith(".index.json"):
        header = _read_header(path)
        return [path], header.tensors, [header]

    weight_map = _read_index(path)
    folder = path.parent
    shard_names = sorted(set(weight_map.values()), key=_natural_key)
    missing = [name for name in shard_names if not (folder / name).is_file()]
    if missing:
        raise SourceError(
            f"{path} names {len(missing)} shard(s) missing from {folder}: {', '.join(missing)}; "
            "download the missing shards"
        )

    files = [folder / name for name in shard_names]
    headers = {name: _read_header(folder / name) for name in shard_names}
    absent = [(tensor, shard) for tensor, shard in weight_map.items() if tensor not in headers[shard].tensors]
    if absent:
        tensor, shard = absent[0]
        more = f" ({count_noun(len(absent) - 1, 'more tensor')} absent)" if len(absent) > 1 else ""
        raise SourceError(
            f"{path} maps tensor {tensor} to shard {shard}, which does not contain it{more}; "
            "the index and shards do not belong together, download them again"
        )
    tensors = {tensor: headers[shard].tensors[tensor] for tensor, shard in weight_map.items()}
    return files, tensors, [headers[name] for name in shard_names]


def _read_index(path: Path) -> dict[str, str]:
    """Return the ``weight_map`` (tensor name to shard file name) of a safetensors index."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SourceError(f"{path} is not valid JSON ({err}); download the index again") from err
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    valid = (
        isinstance(weight_map, dict)
        and weight_map
        and all(isinstance(key, str) and isinstance(value, str) for key, value in weight_map.items())
    )
    if not valid:
        raise SourceError(
            f'{path} has no valid "weight_map" object of tensor names to shard files; download the index again'
        )
    for shard in set(weight_map.values()):
        shard_path = Path(shard)
        if shard_path.is_absolute() or ".." in shard_path.parts:
            raise SourceError(f"{path} names shard {shard} outside its folder; download the index again")
    return weight_map


def _read_header(path: Path) -> _Header:
    """Parse one safetensors header and check the file against it before any tensor is read.

    The file starts with an 8-byte little-endian header length, then the JSON header, then the
    tensor data, and must end exactly where the last tensor's ``data_offsets`` end.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            start = handle.read(len(_LFS_POINTER_PREFIX))
            if start == _LFS_POINTER_PREFIX:
                raise SourceError(
                    f"{path} is a Git LFS pointer file, not the weights; "
                    "run `git lfs pull` in its repository or download the file again"
                )
            if size < 8:
                raise SourceError(f"{path} is truncated: expected at least 8 bytes, found {size}; download it again")
            header_length = int.from_bytes(start[:8], "little")
            if not 0 < header_length <= _MAX_HEADER_BYTES:
                raise _corrupt(path, f"header length {header_length} is invalid")
            if 8 + header_length > size:
                raise SourceError(
                    f"{path} is truncated: expected at least {8 + header_length} bytes, found {size}; download it again"
                )
            handle.seek(8)
            raw = handle.read(header_length)
    except OSError as err:
        reason = err.strerror or str(err)
        raise SourceError(f"cannot read {path}: {reason}; check that the file exists and is readable") from err

    tensors, data_end = _parse_header(path, raw)
    expected = 8 + header_length + data_end
    if size < expected:
        raise SourceError(f"{path} is truncated: expected {expected} bytes, found {size}; download it again")
    if size > expected:
        raise _corrupt(path, f"expected {expected} bytes from the header, found {size}")
    _check_with_safetensors(path)
    return _Header(raw=raw, size=size, tensors=tensors)


def _parse_header(path: Path, raw: bytes) -> tuple[dict[str, TensorInfo], int]:
    """Return the tensors a header describes and the end offset of the data they cover."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"header is not valid JSON: {err}") from err
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")

    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not _is_tensor_entry(entry):
            raise _corrupt(path, f"entry for tensor {name} lacks a valid dtype, shape or data_offsets")
        tensors[name] = TensorInfo(name=name, shape=tuple(entry["shape"]), dtype=entry["dtype"], file=path)
        data_end = max(data_end, entry["data_offsets"][1])
    return tensors, data_end


def _is_tensor_entry(entry: object) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(dim, int) and dim >= 0 for dim in shape):
        return False
    if not isinstance(offsets, list) or len(offsets) != 2:
        return False
    return all(isinstance(offset, int) for offset in offsets) and 0 <= offsets[0] <= offsets[1]


def _check_with_safetensors(path: Path) -> None:
    # safetensors also checks what the JSON alone does not show: offsets that overlap or leave
    # gaps, and sizes that disagree with shape and dtype. Opening only maps the file.
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as err:
        raise _corrupt(path, str(err)) from err


def _corrupt(path: Path, reason: str) -> SourceError:
    return SourceError(f"{path} has a corrupt safetensors header ({reason}); download the file again")


def _read_config(root: Path) -> dict | None:
    path = root / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SourceError(f"{path} is not valid JSON ({err}); download it again or remove it") from err
    if not isinstance(config, dict):
        raise SourceError(f"{path} is not a JSON object; download it again or remove it")
    return config


def _fingerprint(headers: list[_Header]) -> str:
    # Names and folders stay out, so a copied or moved checkpoint keeps its fingerprint.
    digest = hashlib.sha256()
    for header in headers:
        digest.update(header.raw)
        digest.update(header.size.to_bytes(8, "little"))
    return digest.hexdigest()


def _natural_key(name: str) -> list[str | int]:
    """Sort key that compares digit runs as numbers, so ``layers.2`` precedes ``layers.10``."""
    # re.split with a capture group alternates text and digits, so equal positions share a type.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def select_targets(
    source: WeightSource,
    target: list[str] | None = None,
    exclude: list[str] | None = None,
    *,
    skip_unsupported: bool = False,
) -> list[Target]:
    """Pick the linear modules to scan, in natural module order (layer numbers compared as numbers).

    Without ``target``, the default is every 2-D ``.weight`` inside a numbered block (a name
    component such as ``layers.3`` or ``h.3``) whose last component is in
    :data:`DEFAULT_PROJECTIONS`. With ``target``, any 2-D weight that is not an embedding or a
    norm may match, ``lm_head`` included. ``target``/``exclude`` entries are module-name
    suffixes at a dot boundary (``q_proj``, ``attention.self.query``) or, when they contain
    regex metacharacters other than ``.``, a regex searched in the full module name.

    Args:
        source: an opened checkpoint.
        target: entries that select modules; ``None`` or empty for the default projections.
        exclude: entries that remove modules from the selection.
        skip_unsupported: skip quantized or packed weights with a :class:`LamdaWarning`.

    Returns:
        The targets; ``shape`` is ``(d_out, d_in)`` for both layouts.

    Raises:
        SourceError: no module matched (the message lists a sample of available linear modules).
        SpectrumError: a quantized or packed weight is selected, unless ``skip_unsupported``, or
            every selected weight is unsupported.
        UsageError: a target or exclude entry is an invalid regex or empty.
    """
    candidates = _linear_candidates(source)
    if target:
        target_matchers = _compile_matchers(target, "--target")
        selected = [module for module in candidates if _matches_any(module, target_matchers)]
    else:
        selected = [module for module in candidates if _is_default_projection(module)]
    if exclude:
        exclude_matchers = _compile_matchers(exclude, "--exclude")
        selected = [module for module in selected if not _matches_any(module, exclude_matchers)]
    if not selected:
        raise SourceError(_no_match_message(source, candidates, target, exclude))

    quantized_modules = _quantized_modules(source)
    targets: list[Target] = []
    unsupported: list[str] = []
    for module in sorted(selected, key=_natural_key):
        info = candidates[module]
        problem = _unsupported_reason(module, info, quantized_modules)
        if problem is None:
            targets.append(_make_target(module, info, source.config))
        else:
            unsupported.append(f"module {module} has a quantized or packed weight ({problem})")

    if unsupported and not skip_unsupported:
        more = f" ({count_noun(len(unsupported) - 1, 'more module')} like it)" if len(unsupported) > 1 else ""
        raise SpectrumError(
            f"{unsupported[0]}{more}; dequantize the checkpoint to float32/float16/bfloat16 "
            "or pass --skip-unsupported to skip such modules"
        )
    for problem in unsupported:
        warnings.warn(f"{problem}; skipped", LamdaWarning, stacklevel=2)
    if not targets:
        raise SpectrumError(
            f"every selected module in {source.source} is quantized or packed "
            f"({count_noun(len(unsupported), 'module')}); "
            "dequantize the checkpoint to float32/float16/bfloat16"
        )
    return targets


def _linear_candidates(source: WeightSource) -> dict[str, TensorInfo]:
    """Map each module with a 2-D weight, except embeddings and norms, to that weight's tensor."""
    candidates: dict[str, TensorInfo] = {}
    for name, info in source.tensors.items():
        if len(info.shape) != 2:
            continue
        if name.endswith(".weight"):
            module = name[: -len(".weight")]
        elif name.endswith(_PACKED_WEIGHT_SUFFIXES):
            # GPTQ, AWQ and compressed-tensors store no ".weight". Keeping the module lets the
            # selection report it as packed instead of silently finding nothing.
            module = name.rsplit(".", 1)[0]
        else:
            continue
        last = module.rsplit(".", 1)[-1]
        if _EMBEDDING.search(last) or _NORM.search(last):
            continue
        if module not in candidates or name.endswith(".weight"):
            candidates[module] = info
    return candidates


def _is_default_projection(module: str) -> bool:
    *parents, last = module.split(".")
    return last in DEFAULT_PROJECTIONS and any(part.isdigit() for part in parents)


def _compile_matchers(entries: list[str], option: str) -> list[Callable[[str], bool]]:
    matchers: list[Callable[[str], bool]] = []
    for entry in entries:
        if not entry:
            raise UsageError(f"{option} entries must not be empty; pass a module-name suffix or a regex")
        if _REGEX_METACHARACTERS.isdisjoint(entry):
            matchers.append(lambda module, suffix=entry: module == suffix or module.endswith("." + suffix))
            continue
        try:
            pattern = re.compile(entry)
        except re.error as err:
            raise UsageError(
                f"{option} {entry!r} is not a valid regular expression ({err}); "
                "fix it or pass a plain module-name suffix"
            ) from err
        matchers.append(lambda module, pattern=pattern: pattern.search(module) is not None)
    return matchers


def _matches_any(module: str, matchers: list[Callable[[str], bool]]) -> bool:
    return any(matcher(module) for matcher in matchers)


def _no_match_message(
    source: WeightSource, candidates: dict[str, TensorInfo], target: list[str] | None, exclude: list[str] | None
) -> str:
    if not candidates:
        return f"{source.source} contains no 2-D linear weights outside embeddings and norms; nothing to scan"
    # One example per layer-independent pattern, so the sample shows different kinds of module.
    examples: dict[str, str] = {}
    for module in sorted(candidates, key=_natural_key):
        examples.setdefault(re.sub(r"\.\d+(?=\.|$)", ".N", module), module)
    sample = ", ".join(list(examples.values())[:_SAMPLE_SIZE])
    selection = f"--target {' '.join(target)}" if target else "the default projections"
    if exclude:
        selection += f" minus --exclude {' '.join(exclude)}"
    return (
        f"no linear module in {source.source} matched {selection}; "
        f"{count_noun(len(candidates), 'linear module')} in the checkpoint, for example: {sample}"
    )


def _quantized_modules(source: WeightSource) -> dict[str, str]:
    """Map each module that has quantization tensors to one of those tensor names."""
    found: dict[str, str] = {}
    for name in source.tensors:
        match = _QUANTIZATION_TENSOR.match(name)
        if match:
            found.setdefault(match["module"], name)
    return found


def _unsupported_reason(module: str, info: TensorInfo, quantized_modules: dict[str, str]) -> str | None:
    if info.dtype not in FLOAT_DTYPES:
        return f"{info.name} has dtype {info.dtype}"
    if module in quantized_modules:
        return f"{info.name} has dtype {info.dtype} and quantization tensor {quantized_modules[module]}"
    return None


def _make_target(module: str, info: TensorInfo, config: dict | None) -> Target:
    rows, columns = info.shape
    if _uses_conv1d(module, config):
        return Target(module, info.name, (columns, rows), "conv1d", info.dtype)
    return Target(module, info.name, (rows, columns), "linear", info.dtype)


def _uses_conv1d(module: str, config: dict | None) -> bool:
    if module.rsplit(".", 1)[-1] not in CONV1D_PROJECTIONS:
        return False
    model_type = config.get("model_type") if config else None
    # Without a model_type, the GPT-2 module names are the only evidence of the layout, so they decide.
    return model_type is None or model_type in CONV1D_MODEL_TYPES
