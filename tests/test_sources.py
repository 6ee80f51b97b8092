"""Tests for lamda_spectra.sources: resolving checkpoints, validating headers and picking targets."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lamda_spectra.errors import LamdaWarning, SourceError, SpectrumError, UsageError
from lamda_spectra.sources import WeightSource, open_source, select_targets
from tests.checkpoints import (
    minilm_path,
    write_bert,
    write_gpt2,
    write_hub_cache,
    write_known_spectra,
    write_llama,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_PROJECTIONS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A sharded two-layer Llama in bfloat16, written once for the module and never modified."""
    return write_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.fixture
def llama_copy(llama_dir, tmp_path) -> Path:
    """A private copy of the sharded Llama that a test may damage."""
    return Path(shutil.copytree(llama_dir, tmp_path / "tiny-llama"))


def module_names(targets) -> list[str]:
    return [target.module for target in targets]


def linear_modules(model) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    if config is not None:
        (path.parent / "config.json").write_text(json.dumps(config))
    return path


def header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


@pytest.fixture
def offline_hub(monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported; pin the constant too,
    # in case something imported it earlier, so no test can try the network.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# Real weights and synthetic layouts


def test_minilm_targets_all_36_projections():
    source = open_source(str(minilm_path()))
    targets = select_targets(source)

    expected = {f"encoder.layer.{layer}.{suffix}" for layer in range(6) for suffix in BERT_PROJECTIONS}
    assert len(targets) == 36
    assert set(module_names(targets)) == expected
    assert "encoder.layer.0.attention.self.query" in module_names(targets)
    assert not any(name.startswith("pooler") for name in module_names(targets))
    assert all(target.layout == "linear" and target.dtype == "F32" for target in targets)
    by_module = {target.module: target for target in targets}
    assert by_module["encoder.layer.3.intermediate.dense"].shape == (1536, 384)
    assert by_module["encoder.layer.3.output.dense"].shape == (384, 1536)
    assert by_module["encoder.layer.3.output.dense"].tensor == "encoder.layer.3.output.dense.weight"


def test_minilm_source_fields():
    folder = minilm_path()
    source = open_source(str(folder))

    assert source.kind == "folder"
    assert source.repo_id is None
    assert source.revision is None
    assert source.root == folder
    assert source.files == [folder / "model.safetensors"]
    assert source.config["model_type"] == "bert"
    assert source.model_name == folder.name
    assert len(source.fingerprint) == 64


def test_sharded_llama_matches_named_modules(llama_dir):
    from transformers import AutoModelForCausalLM

    source = open_source(str(llama_dir))
    targets = select_targets(source)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)

    assert len(source.files) > 1
    assert all(path.parent == llama_dir for path in source.files)
    assert len(targets) == 14
    assert set(module_names(targets)) == linear_modules(model) - {"lm_head"}
    assert all(target.layout == "linear" and target.dtype == "BF16" for target in targets)
    modules = dict(model.named_modules())
    for target in targets:
        layer = modules[target.module]
        assert target.shape == (layer.out_features, layer.in_features), target.module


def test_sharded_llama_read_exact_values(llama_dir):
    from transformers import AutoModelForCausalLM

    source = open_source(str(llama_dir))
    state = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).state_dict()
    for target in select_targets(source):
        weight = source.read(target.tensor)
        assert weight.dtype == torch.bfloat16
        assert torch.equal(weight, state[target.tensor]), target.tensor


def test_read_returns_stored_values(tmp_path):
    values = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    halves = torch.linspace(-2, 2, 6, dtype=torch.float16).reshape(2, 3)
    path = save_tensors(tmp_path / "m" / "model.safetensors", {"a.weight": values, "b.weight": halves})
    source = open_source(str(path.parent))

    read_values = source.read("a.weight")
    read_halves = source.read("b.weight")
    assert read_values.dtype == torch.float32
    assert torch.equal(read_values, values)
    assert read_halves.dtype == torch.float16
    assert torch.equal(read_halves, halves)


def test_read_unknown_tensor(llama_dir):
    source = open_source(str(llama_dir))
    with pytest.raises(SourceError, match=r"tensor model\.layers\.9\.mlp\.up_proj\.weight is not in"):
        source.read("model.layers.9.mlp.up_proj.weight")


def test_gpt2_conv1d_layout_transposed(tmp_path):
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    folder = write_gpt2(tmp_path / "gpt2")
    source = open_source(str(folder))
    targets = select_targets(source)
    model = GPT2LMHeadModel.from_pretrained(folder)
    conv_layers = {name: module for name, module in model.named_modules() if isinstance(module, Conv1D)}

    assert set(module_names(targets)) == set(conv_layers)
    assert len(targets) == 8
    for target in targets:
        layer = conv_layers[target.module]
        assert target.layout == "conv1d"
        # Conv1D keeps nx = d_in and nf = d_out, and stores its weight as (d_in, d_out).
        assert target.shape == (layer.nf, layer.nx), target.module
        assert tuple(source.tensors[target.tensor].shape) == (layer.nx, layer.nf)
    by_module = {target.module: target for target in targets}
    assert by_module["transformer.h.0.attn.c_attn"].shape == (144, 48)
    assert by_module["transformer.h.0.mlp.c_fc"].shape == (192, 48)
    assert by_module["transformer.h.0.mlp.c_proj"].shape == (48, 192)


def test_gpt2_names_without_config_are_conv1d(tmp_path):
    folder = write_gpt2(tmp_path / "gpt2")
    (folder / "config.json").unlink()
    targets = select_targets(open_source(str(folder)))

    assert {target.layout for target in targets} == {"conv1d"}


def test_c_attn_of_other_model_type_is_linear(tmp_path):
    path = save_tensors(
        tmp_path / "bigcode" / "model.safetensors",
        {"transformer.h.0.attn.c_attn.weight": torch.zeros(96, 32)},
        config={"model_type": "gpt_bigcode"},
    )
    (target,) = select_targets(open_source(str(path.parent)))

    assert target.layout == "linear"
    assert target.shape == (96, 32)


def test_bert_targets_exclude_pooler(tmp_path):
    from transformers import BertModel

    folder = write_bert(tmp_path / "bert")
    targets = select_targets(open_source(str(folder)))
    model = BertModel.from_pretrained(folder)

    assert len(targets) == 12
    assert set(module_names(targets)) == linear_modules(model) - {"pooler.dense"}


def test_natural_order_compares_numbers(tmp_path):
    spectra = {f"model.layers.{layer}.mlp.up_proj": (4, 3, [1.0]) for layer in (10, 2, 1, 0)}
    folder = write_known_spectra(tmp_path / "known", spectra)
    targets = select_targets(open_source(str(folder)))

    assert module_names(targets) == [f"model.layers.{layer}.mlp.up_proj" for layer in (0, 1, 2, 10)]


def test_order_independent_of_shard_layout(tmp_path):
    one_file = write_llama(tmp_path / "one", max_shard_size=None)
    sharded = write_llama(tmp_path / "sharded", max_shard_size="20KB")

    assert len(open_source(str(sharded)).files) > len(open_source(str(one_file)).files)
    assert module_names(select_targets(open_source(str(one_file)))) == module_names(
        select_targets(open_source(str(sharded)))
    )


# Single files and model names


def test_single_file_named_model_uses_folder_name(tmp_path):
    path = tmp_path / "my-bert" / "model.safetensors"
    path.parent.mkdir()
    shutil.copyfile(minilm_path() / "model.safetensors", path)
    source = open_source(str(path))

    assert source.kind == "file"
    assert source.files == [path.resolve()]
    assert source.model_name == "my-bert"
    assert len(select_targets(source)) == 36


def test_single_file_other_stem_and_sibling_config(tmp_path):
    folder = write_gpt2(tmp_path / "gpt2")
    path = folder / "weights-v2.safetensors"
    (folder / "model.safetensors").rename(path)
    source = open_source(str(path))

    assert source.model_name == "weights-v2"
    assert source.config["model_type"] == "gpt2"
    assert {target.layout for target in select_targets(source)} == {"conv1d"}


def test_relative_folder_path(llama_dir, monkeypatch):
    monkeypatch.chdir(llama_dir)
    source = open_source(".")

    assert source.model_name == "tiny-llama"
    assert source.root == llama_dir


def test_linked_file_keeps_link_name(tmp_path):
    blob = tmp_path / "blobs" / "4d7a214614ab2935"
    blob.parent.mkdir()
    shutil.copyfile(minilm_path() / "model.safetensors", blob)
    link = tmp_path / "snapshot" / "model.safetensors"
    link.parent.mkdir()
    link.symlink_to(blob)
    source = open_source(str(link))

    assert source.files == [link]
    assert source.model_name == "snapshot"
    assert len(select_targets(source)) == 36


def test_index_file_path_opens_shards(llama_dir):
    source = open_source(str(llama_dir / "model.safetensors.index.json"))

    assert source.kind == "folder"
    assert source.model_name == "tiny-llama"
    assert len(select_targets(source)) == 14


def test_revision_with_local_path(llama_dir):
    with pytest.raises(UsageError, match=r"--revision main applies to Hub repo ids only"):
        open_source(str(llama_dir), revision="main")


# Target and exclude


@pytest.mark.parametrize(
    ("target", "exclude", "expected"),
    [
        (["q_proj"], None, ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
        (["self_attn.q_proj"], None, ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
        (["model.layers.1.mlp.down_proj"], None, ["model.layers.1.mlp.down_proj"]),
        (["lm_head"], None, ["lm_head"]),
        ([r"layers\.1\..*(up|down)_proj$"], None, ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]),
        (
            ["q_proj", "v_proj"],
            [r"layers\.0\."],
            ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"],
        ),
    ],
)
def test_target_and_exclude_select(llama_dir, target, exclude, expected):
    targets = select_targets(open_source(str(llama_dir)), target=target, exclude=exclude)

    assert module_names(targets) == expected


def test_exclude_suffix_from_default(llama_dir):
    targets = select_targets(open_source(str(llama_dir)), exclude=["down_proj", "self_attn.k_proj"])

    assert len(targets) == 10
    assert not any(name.endswith(("down_proj", "k_proj")) for name in module_names(targets))


def test_suffix_matches_only_whole_components(llama_dir):
    # "proj" is the end of "q_proj" but not a whole name component, so nothing matches.
    message = r"no linear module in .* matched --target proj; 15 linear modules in the checkpoint"
    with pytest.raises(SourceError, match=message):
        select_targets(open_source(str(llama_dir)), target=["proj"])


def test_no_match_lists_sample(llama_dir):
    with pytest.raises(SourceError) as caught:
        select_targets(open_source(str(llama_dir)), target=["embed_tokens"])
    message = str(caught.value)

    assert "matched --target embed_tokens" in message
    assert "model.layers.0.self_attn.q_proj" in message
    assert "lm_head" in message
    assert "embed_tokens" not in message.split("for example:")[1]
    assert "\n" not in message


def test_exclude_everything(llama_dir):
    with pytest.raises(SourceError, match=r"matched the default projections minus --exclude .\*; 15 linear modules"):
        select_targets(open_source(str(llama_dir)), exclude=[".*"])


def test_invalid_target_regex(llama_dir):
    with pytest.raises(UsageError, match=r"--target 'layers\.\(' is not a valid regular expression"):
        select_targets(open_source(str(llama_dir)), target=["layers.("])


# Hub repo ids through a laid-out cache


def test_hub_repo_resolves_from_cache(llama_dir, tmp_path, offline_hub):
    write_hub_cache(tmp_path / "hub", "org/tiny-llama", llama_dir, commit=COMMIT_A)
    source = open_source("org/tiny-llama", cache_dir=tmp_path / "hub")
    local = open_source(str(llama_dir))

    assert source.kind == "hub"
    assert source.repo_id == "org/tiny-llama"
    assert source.revision == COMMIT_A
    assert source.root.name == COMMIT_A
    assert source.model_name == "tiny-llama"
    assert source.config["model_type"] == "llama"
    assert source.fingerprint == local.fingerprint
    assert module_names(select_targets(source)) == module_names(select_targets(local))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(source.read(name), local.read(name))


def test_hub_revision_by_hash_and_ref(llama_dir, tmp_path, offline_hub):
    bert = write_bert(tmp_path / "bert")
    cache = tmp_path / "hub"
    write_hub_cache(cache, "org/model", llama_dir, commit=COMMIT_A, ref="v1")
    write_hub_cache(cache, "org/model", bert, commit=COMMIT_B, ref="main")

    assert open_source("org/model", cache_dir=cache).revision == COMMIT_B
    assert open_source("org/model", revision="main", cache_dir=cache).config["model_type"] == "bert"
    assert open_source("org/model", revision=COMMIT_A, cache_dir=cache).config["model_type"] == "llama"
    assert open_source("org/model", revision="v1", cache_dir=cache).revision == COMMIT_A


def test_hub_repo_not_in_offline_cache(tmp_path, offline_hub):
    with pytest.raises(SourceError) as caught:
        open_source("org/absent", cache_dir=tmp_path / "hub")
    message = str(caught.value)

    assert message.startswith("Hub repo org/absent (revision main) is not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE=1 blocks downloads" in message
    assert "download it once online (unset HF_HUB_OFFLINE) or pass a local folder" in message
    assert "\n" not in message


def test_hub_unknown_revision_offline(llama_dir, tmp_path, offline_hub):
    write_hub_cache(tmp_path / "hub", "org/tiny-llama", llama_dir, commit=COMMIT_A)
    with pytest.raises(SourceError, match=r"Hub repo org/tiny-llama \(revision v9\) is not in the local"):
        open_source("org/tiny-llama", revision="v9", cache_dir=tmp_path / "hub")


def test_hub_snapshot_missing_shard(llama_dir, tmp_path, offline_hub):
    snapshot = write_hub_cache(tmp_path / "hub", "org/tiny-llama", llama_dir, commit=COMMIT_A)
    (snapshot / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(SourceError, match=r"names 1 shard\(s\) missing from .*: model-00002-of-00005\.safetensors"):
        open_source("org/tiny-llama", cache_dir=tmp_path / "hub")


def test_hub_resolution_reads_environment(llama_dir, tmp_path):
    # A fresh interpreter, so huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE at import.
    write_hub_cache(tmp_path / "hub", "org/tiny-llama", llama_dir, commit=COMMIT_A)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    script = (
        "import json\n"
        "from lamda_spectra.sources import open_source, select_targets\n"
        "source = open_source('org/tiny-llama')\n"
        "print(json.dumps([source.revision, str(source.root), len(select_targets(source))]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stderr
    revision, root, count = json.loads(result.stdout.strip().splitlines()[-1])
    assert revision == COMMIT_A
    assert Path(root).parent.parent == tmp_path / "hub" / "models--org--tiny-llama"
    assert count == 14


# Bad input


def test_missing_path():
    with pytest.raises(SourceError, match=r"^model path no/such/folder/here does not exist; pass a model folder"):
        open_source("no/such/folder/here")


def test_missing_safetensors_file():
    with pytest.raises(SourceError, match=r"^model path org/weights\.safetensors does not exist"):
        open_source("org/weights.safetensors")


def test_git_lfs_pointer(tmp_path):
    folder = tmp_path / "lfs"
    folder.mkdir()
    (folder / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        "size 90868376\n"
    )
    message = r"model\.safetensors is a Git LFS pointer file, not the weights; run `git lfs pull`"
    with pytest.raises(SourceError, match=message):
        open_source(str(folder))


def test_git_lfs_pointer_shard(llama_copy):
    (llama_copy / "model-00003-of-00005.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(SourceError, match=r"model-00003-of-00005\.safetensors is a Git LFS pointer file"):
        open_source(str(llama_copy))


def test_truncated_file_reports_bytes(tmp_path):
    path = write_bert(tmp_path / "bert") / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    expected, actual = len(data), len(data) - 100
    message = rf"model\.safetensors is truncated: expected {expected} bytes, found {actual};"
    with pytest.raises(SourceError, match=message):
        open_source(str(path.parent))


def test_truncated_inside_header(tmp_path):
    path = write_bert(tmp_path / "bert") / "model.safetensors"
    length = header_length(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SourceError, match=rf"truncated: expected at least {8 + length} bytes, found 100;"):
        open_source(str(path.parent))


def test_file_shorter_than_length_prefix(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(SourceError, match=r"tiny\.safetensors is truncated: expected at least 8 bytes, found 3;"):
        open_source(str(path))


def framed(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """Return safetensors file bytes: the header length (``len(header)`` unless given), header, data."""
    return (len(header) if length is None else length).to_bytes(8, "little") + header + data


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (framed(b"{}", length=10**12), r"header length 1000000000000 is invalid"),
        (framed(b"{}", length=0), r"header length 0 is invalid"),
        (framed(b"{nope"), r"header is not valid JSON"),
        (framed(b"[1,2]"), r"header is not a JSON object"),
        (
            framed(b'{"w": {"dtype": "F32", "shape": [2, 2]}}', bytes(16)),
            r"entry for tensor w lacks a valid dtype, shape or data_offsets",
        ),
        (
            framed(b'{"w": {"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 16]}}', bytes(16)),
            r"entry for tensor w lacks a valid dtype, shape or data_offsets",
        ),
    ],
    ids=["huge-length", "zero-length", "not-json", "not-object", "no-offsets", "negative-dim"],
)
def test_corrupt_header(tmp_path, content, reason):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(SourceError, match=rf"bad\.safetensors has a corrupt safetensors header \({reason}"):
        open_source(str(path))


def test_offsets_disagree_with_shape(tmp_path):
    # The file size matches the offsets, but 2 x 2 float32 values need 16 bytes, not 12.
    header = b'{"w.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}'
    path = tmp_path / "bad.safetensors"
    path.write_bytes(framed(header, bytes(12)))
    message = r"bad\.safetensors has a corrupt safetensors header \(.*\); download the file again"
    with pytest.raises(SourceError, match=message):
        open_source(str(path))


def test_bytes_after_last_tensor(tmp_path):
    path = write_bert(tmp_path / "bert") / "model.safetensors"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes() + b"extra")
    message = rf"corrupt safetensors header \(expected {size} bytes from the header, found {size + 5}\)"
    with pytest.raises(SourceError, match=message):
        open_source(str(path.parent))


def test_index_lists_all_missing_shards(llama_copy):
    (llama_copy / "model-00002-of-00005.safetensors").unlink()
    (llama_copy / "model-00005-of-00005.safetensors").unlink()
    with pytest.raises(SourceError) as caught:
        open_source(str(llama_copy))
    message = str(caught.value)

    assert "model.safetensors.index.json names 2 shard(s) missing from" in message
    assert "model-00002-of-00005.safetensors, model-00005-of-00005.safetensors" in message
    assert message.endswith("download the missing shards")


def test_index_tensor_absent_from_shard(llama_copy):
    index_path = llama_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "model-00001-of-00005.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        SourceError,
        match=r"maps tensor model\.layers\.0\.mlp\.up_proj\.weight to shard model-00001-of-00005\.safetensors, "
        r"which does not contain it;",
    ):
        open_source(str(llama_copy))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", r"is not valid JSON"),
        ('{"metadata": {}}', r'has no valid "weight_map" object'),
        ('{"weight_map": {"a.weight": 3}}', r'has no valid "weight_map" object'),
        (
            '{"weight_map": {"a.weight": "../elsewhere.safetensors"}}',
            r"names shard \.\./elsewhere\.safetensors outside its folder",
        ),
    ],
    ids=["not-json", "no-weight-map", "shard-not-string", "shard-outside"],
)
def test_malformed_index(tmp_path, text, reason):
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(SourceError, match=rf"model\.safetensors\.index\.json {reason}"):
        open_source(str(folder))


def test_folder_with_other_safetensors(tmp_path):
    save_tensors(tmp_path / "m" / "adapter.safetensors", {"a.weight": torch.zeros(2, 2)})
    save_tensors(tmp_path / "m" / "base.safetensors", {"a.weight": torch.zeros(2, 2)})
    with pytest.raises(
        SourceError,
        match=r"has no model\.safetensors or model\.safetensors\.index\.json but contains adapter\.safetensors, "
        r"base\.safetensors; pass the path of the file to scan",
    ):
        open_source(str(tmp_path / "m"))


def test_folder_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"empty contains no safetensors weights"):
        open_source(str(tmp_path / "empty"))


def test_corrupt_config(llama_copy):
    (llama_copy / "config.json").write_text("{")
    with pytest.raises(SourceError, match=r"config\.json is not valid JSON"):
        open_source(str(llama_copy))


# Dtypes and quantized weights


def test_float_dtypes_supported(tmp_path):
    tensors = {
        f"model.layers.{index}.mlp.up_proj.weight": torch.ones(4, 3, dtype=dtype)
        for index, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16, torch.float64))
    }
    path = save_tensors(tmp_path / "m" / "model.safetensors", tensors)
    targets = select_targets(open_source(str(path.parent)))

    assert [target.dtype for target in targets] == ["F32", "F16", "BF16", "F64"]


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (
            {"model.layers.0.self_attn.q_proj.weight": torch.ones(8, 8, dtype=torch.int8)},
            r"module model\.layers\.0\.self_attn\.q_proj has a quantized or packed weight \(.*weight has dtype I8\)",
        ),
        (
            {"model.layers.0.self_attn.q_proj.weight": torch.ones(8, 8).to(torch.float8_e4m3fn)},
            r"q_proj has a quantized or packed weight \(.*weight has dtype F8_E4M3\)",
        ),
        (
            {
                "model.layers.0.self_attn.q_proj.weight": torch.ones(32, 1, dtype=torch.uint8),
                "model.layers.0.self_attn.q_proj.weight.absmax": torch.ones(2),
            },
            r"q_proj has a quantized or packed weight \(.*weight has dtype U8\)",
        ),
        (
            {
                "model.layers.0.self_attn.q_proj.weight": torch.ones(8, 8, dtype=torch.float16),
                "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4": torch.ones(
                    4, dtype=torch.uint8
                ),
            },
            r"weight has dtype F16 and quantization tensor model\.layers\.0\.self_attn\.q_proj\.weight\.quant_state",
        ),
        (
            {
                "model.layers.0.self_attn.q_proj.qweight": torch.ones(1, 8, dtype=torch.int32),
                "model.layers.0.self_attn.q_proj.scales": torch.ones(1, 8, dtype=torch.float16),
            },
            r"q_proj has a quantized or packed weight \(model\.layers\.0\.self_attn\.q_proj\.qweight has dtype I32\)",
        ),
    ],
    ids=["int8", "fp8", "nf4-absmax", "float-with-quant-state", "gptq-qweight"],
)
def test_quantized_weight_rejected(tmp_path, tensors, message):
    tensors = {**tensors, "model.layers.0.self_attn.k_proj.weight": torch.ones(8, 8)}
    path = save_tensors(tmp_path / "q" / "model.safetensors", tensors)
    with pytest.raises(SpectrumError, match=message + r".*; dequantize the checkpoint .* or pass --skip-unsupported"):
        select_targets(open_source(str(path.parent)))


def test_quantized_weight_skipped_with_warning(tmp_path):
    tensors = {
        "model.layers.0.self_attn.q_proj.weight": torch.ones(8, 8, dtype=torch.int8),
        "model.layers.0.self_attn.q_proj.SCB": torch.ones(8),
        "model.layers.0.self_attn.k_proj.weight": torch.ones(8, 8),
    }
    path = save_tensors(tmp_path / "q" / "model.safetensors", tensors)
    message = r"^module model\.layers\.0\.self_attn\.q_proj has a quantized or packed weight \(.*dtype I8.*\); skipped$"
    with pytest.warns(LamdaWarning, match=message):
        targets = select_targets(open_source(str(path.parent)), skip_unsupported=True)

    assert module_names(targets) == ["model.layers.0.self_attn.k_proj"]


def test_all_targets_quantized_even_when_skipping(tmp_path):
    path = save_tensors(
        tmp_path / "q" / "model.safetensors", {"model.layers.0.mlp.up_proj.weight": torch.ones(8, 8, dtype=torch.int8)}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LamdaWarning)
        with pytest.raises(SpectrumError, match=r"every selected module in .* is quantized or packed \(1 module\)"):
            select_targets(open_source(str(path.parent)), skip_unsupported=True)


def test_unselected_quantized_weight_ignored(tmp_path):
    tensors = {
        "lm_head.weight": torch.ones(8, 8, dtype=torch.int8),
        "model.layers.0.mlp.up_proj.weight": torch.ones(8, 8),
    }
    path = save_tensors(tmp_path / "q" / "model.safetensors", tensors)

    assert module_names(select_targets(open_source(str(path.parent)))) == ["model.layers.0.mlp.up_proj"]


# Fingerprint


def test_fingerprint_definition(llama_dir):
    source = open_source(str(llama_dir))
    digest = hashlib.sha256()
    for path in source.files:
        data = path.read_bytes()
        digest.update(data[8 : 8 + int.from_bytes(data[:8], "little")])
        digest.update(len(data).to_bytes(8, "little"))

    assert source.fingerprint == digest.hexdigest()


def test_fingerprint_stable_across_copies(llama_dir, tmp_path):
    copy = Path(shutil.copytree(llama_dir, tmp_path / "elsewhere" / "renamed"))
    original = open_source(str(llama_dir))

    assert open_source(str(llama_dir)).fingerprint == original.fingerprint
    assert open_source(str(copy)).fingerprint == original.fingerprint


def test_fingerprint_changes_with_shape(tmp_path):
    first = save_tensors(tmp_path / "a" / "model.safetensors", {"l.0.fc1.weight": torch.zeros(4, 6)})
    second = save_tensors(tmp_path / "b" / "model.safetensors", {"l.0.fc1.weight": torch.zeros(6, 4)})
    same = save_tensors(tmp_path / "c" / "model.safetensors", {"l.0.fc1.weight": torch.zeros(4, 6)})

    assert open_source(str(first.parent)).fingerprint != open_source(str(second.parent)).fingerprint
    assert open_source(str(first.parent)).fingerprint == open_source(str(same.parent)).fingerprint


def test_weight_source_is_plain_data(llama_dir):
    source = open_source(str(llama_dir))

    assert isinstance(source, WeightSource)
    assert all(info.file in source.files for info in source.tensors.values())
    assert "lm_head.weight" in source.tensors
