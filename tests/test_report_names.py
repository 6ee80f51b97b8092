"""Layer index and module type parsed from full module names, and their short labels."""

import pytest

from lamda_spectra.report.names import (
    OTHER_ROW,
    ModuleSite,
    order_labels,
    parse_module_name,
    row_labels,
    short_labels,
)

LLAMA_TYPES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
BERT_TYPES = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]
GPT2_TYPES = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
NEOX_TYPES = ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]


@pytest.mark.parametrize(
    ("name", "stack", "layer", "kind"),
    [
        ("model.layers.3.self_attn.q_proj", "model.layers", 3, "self_attn.q_proj"),
        ("model.layers.31.mlp.down_proj", "model.layers", 31, "mlp.down_proj"),
        ("encoder.layer.3.attention.self.query", "encoder.layer", 3, "attention.self.query"),
        ("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer", 0, "attention.output.dense"),
        ("encoder.layer.5.output.dense", "encoder.layer", 5, "output.dense"),
        ("encoder.layer.5.intermediate.dense", "encoder.layer", 5, "intermediate.dense"),
        ("transformer.h.3.attn.c_attn", "transformer.h", 3, "attn.c_attn"),
        ("transformer.h.3.mlp.c_proj", "transformer.h", 3, "mlp.c_proj"),
        ("h.11.attn.c_proj", "h", 11, "attn.c_proj"),
        ("gpt_neox.layers.3.attention.query_key_value", "gpt_neox.layers", 3, "attention.query_key_value"),
        ("transformer.blocks.7.ffn.up_proj", "transformer.blocks", 7, "ffn.up_proj"),
        ("blocks.0.attn.qkv", "blocks", 0, "attn.qkv"),
        # The outer block index wins over an inner one.
        ("encoder.block.2.layer.1.DenseReluDense.wi", "encoder.block", 2, "layer.1.DenseReluDense.wi"),
    ],
)
def test_parse_block_modules(name, stack, layer, kind):
    assert parse_module_name(name) == ModuleSite(name=name, stack=stack, layer=layer, kind=kind)


@pytest.mark.parametrize("name", ["pooler.dense", "lm_head", "score", "model.layers.mlp", "model.h.x.attn"])
def test_parse_other_modules(name):
    site = parse_module_name(name)
    assert site.layer is None
    assert site.stack is None
    assert site.kind == name


def test_labels_llama():
    assert list(short_labels(LLAMA_TYPES).values()) == ["q", "k", "v", "o", "gate", "up", "down"]


def test_labels_bert_dense_types_differ():
    labels = short_labels(BERT_TYPES)
    assert labels == {
        "attention.self.query": "q",
        "attention.self.key": "k",
        "attention.self.value": "v",
        "attention.output.dense": "attn.out",
        "intermediate.dense": "ffn.in",
        "output.dense": "ffn.out",
    }


def test_labels_gpt2_projections_differ():
    assert short_labels(GPT2_TYPES) == {
        "attn.c_attn": "qkv",
        "attn.c_proj": "attn.out",
        "mlp.c_fc": "ffn.in",
        "mlp.c_proj": "ffn.out",
    }


def test_labels_gpt_neox():
    assert list(short_labels(NEOX_TYPES).values()) == ["qkv", "attn.out", "ffn.in", "ffn.out"]


def test_labels_unknown_types_use_shortest_unique_suffix():
    labels = short_labels(["mixer.in_proj", "mixer.out_proj", "attn.proj", "mlp.proj", "pooler.dense"])
    assert labels == {
        "mixer.in_proj": "in",
        "mixer.out_proj": "o",
        "attn.proj": "attn.proj",
        "mlp.proj": "mlp.proj",
        "pooler.dense": "dense",
    }


def test_labels_other_module_beside_block_types():
    labels = short_labels([*BERT_TYPES, "pooler.dense"])
    assert labels["pooler.dense"] == "pooler.dense"
    assert labels["output.dense"] == "ffn.out"


def test_labels_known_clash_falls_back_to_suffix():
    labels = short_labels(["self_attn.q_proj", "attention.self.query"])
    assert labels == {"self_attn.q_proj": "q", "attention.self.query": "query"}


def test_labels_fall_back_to_full_path_on_clash():
    labels = short_labels(["attention.x", "self_attn.x"])
    assert labels == {"attention.x": "attention.x", "self_attn.x": "self_attn.x"}


def test_row_labels_single_stack():
    sites = [parse_module_name(name) for name in ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj", "lm_head"]]
    assert row_labels(sites) == {("model.layers", 0): "0", ("model.layers", 1): "1", (None, None): OTHER_ROW}


def test_row_labels_encoder_decoder():
    sites = [
        parse_module_name("model.encoder.layers.0.self_attn.q_proj"),
        parse_module_name("model.decoder.layers.0.self_attn.q_proj"),
    ]
    assert row_labels(sites) == {("model.encoder.layers", 0): "encoder 0", ("model.decoder.layers", 0): "decoder 0"}


def test_order_labels_alphabetical_bert():
    alphabetical = sorted(BERT_TYPES)
    labels = short_labels(alphabetical)
    assert order_labels(labels[kind] for kind in alphabetical) == ["q", "k", "v", "attn.out", "ffn.in", "ffn.out"]


def test_order_labels_unknown_last_in_given_order():
    assert order_labels(["wo", "pooler.dense", "down", "wi", "q"]) == ["q", "down", "wo", "pooler.dense", "wi"]
