"""apply_plan: every check runs before anything changes, and every problem is reported at once."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections import OrderedDict

import pytest
import torch
from test_adapter_helpers import TwoLayer, plan_for
from torch import nn

from lamda_spectra.adapter import LamdaLinear, apply_plan
from lamda_spectra.errors import AdapterError, PlanError
from lamda_spectra.plan import ModulePlan, Plan


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {name: value.clone() for name, value in model.state_dict().items()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "types": {name: type(module) for name, module in model.named_modules()},
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert not any(isinstance(module, LamdaLinear) for module in model.modules())
    assert "lamda_handle" not in model.__dict__
    assert after["requires_grad"] == before["requires_grad"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])


def with_module(plan: Plan, name: str, **changes) -> Plan:
    """Return a copy of ``plan`` with fields of one module changed, skipping ModulePlan's own checks."""
    module = copy.copy(plan.modules[name])
    for field, value in changes.items():
        object.__setattr__(module, field, value)
    return dataclasses.replace(plan, modules={**plan.modules, name: module})


def test_shape_mismatch_rejected():
    plan = plan_for(TwoLayer(d_hidden=40), 4)
    model = TwoLayer(d_hidden=48)
    before = snapshot(model)
    with pytest.raises(AdapterError) as error:
        apply_plan(model, plan, total_steps=10)
    message = str(error.value)
    assert "module up has shape [d_out, d_in] = [48, 24] but the plan says [40, 24]" in message
    assert "module square has shape [d_out, d_in] = [48, 48] but the plan says [40, 40]" in message
    assert "(3 problems)" in message
    assert_untouched(model, before)


def test_norm_mismatch_rejected():
    plan = plan_for(TwoLayer(seed=0), 4)
    model = TwoLayer(seed=1)
    before = snapshot(model)
    with pytest.raises(AdapterError, match=r"module up has Frobenius norm \S+ but the plan says \S+ \(\S+ relative, limit 0.001\): the plan was made for other weights"):
        apply_plan(model, plan, total_steps=10)
    assert_untouched(model, before)


def test_small_norm_difference_accepted():
    model = TwoLayer()
    plan = plan_for(model, 4)
    module = plan.modules["up"]
    plan = with_module(plan, "up", frobenius_norm=module.frobenius_norm * (1 + 5e-4))
    apply_plan(model, plan, total_steps=10)
    assert isinstance(model.up, LamdaLinear)


def test_missing_modules_listed_with_model_sample():
    model = TwoLayer()
    plan = plan_for(model, 4)
    modules = {f"encoder.layer.{i}.dense": plan.modules["square"] for i in range(7)}
    plan = dataclasses.replace(plan, modules={**plan.modules, **modules})
    before = snapshot(model)
    with pytest.raises(AdapterError) as error:
        apply_plan(model, plan, total_steps=10)
    message = str(error.value)
    assert (
        "7 plan modules are not in the model: encoder.layer.0.dense, encoder.layer.1.dense, "
        "encoder.layer.2.dense, encoder.layer.3.dense, encoder.layer.4.dense and 2 more; "
        "the model's linear modules include: up, square, down"
    ) in message
    assert_untouched(model, before)


def test_rank_above_min_dimension_rejected_in_plan_file(tmp_path):
    model = TwoLayer()
    document = plan_for(model, 4).to_dict()
    document["modules"]["down"]["rank"] = 17  # down is 16 x 40
    document["modules"]["down"]["singular_values"] = document["modules"]["down"]["singular_values"] * 5
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(document))
    before = snapshot(model)
    with pytest.raises(PlanError, match=re.escape(f"invalid plan file {path}")) as error:
        apply_plan(model, path, total_steps=10)
    assert "rank 17 exceeds min(d_out, d_in) = 16" in str(error.value)
    assert_untouched(model, before)


def test_rank_above_min_dimension_rejected_in_plan_object():
    model = TwoLayer()
    plan = with_module(plan_for(model, 4), "down", rank=17)
    before = snapshot(model)
    with pytest.raises(AdapterError, match=re.escape("module down has plan rank 17, outside [1, min(d_out, d_in) = 16]")):
        apply_plan(model, plan, total_steps=10)
    assert_untouched(model, before)


class WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(40, 24)
        self.proj = nn.Linear(24, 16)


def test_embedding_target_rejected():
    model = WithEmbedding()
    weight = model.embed.weight.detach()
    plan = plan_for(model, 4)
    norm = float(torch.linalg.vector_norm(weight))
    fake = dataclasses.replace(plan.modules["proj"], shape=(40, 24), frobenius_norm=norm)
    plan = dataclasses.replace(plan, modules={"embed": fake, **plan.modules})
    before = snapshot(model)
    with pytest.raises(AdapterError, match=re.escape(
        "module embed is a torch.nn.modules.sparse.Embedding, not a supported linear layer "
        "(torch.nn.Linear or transformers Conv1D)"
    )):
        apply_plan(model, plan, total_steps=10)
    assert_untouched(model, before)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_quantized_linear_rejected():
    model = nn.Sequential(OrderedDict(proj=nn.Linear(24, 16), act=nn.ReLU(), out=nn.Linear(16, 8)))
    plan = plan_for(model, 4)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(AdapterError) as error:
        apply_plan(quantized, plan, total_steps=10)
    message = str(error.value)
    assert "module proj is a torch.ao.nn.quantized.dynamic.modules.linear.Linear, not a supported linear layer" in message
    assert "module out is a torch.ao.nn.quantized.dynamic.modules.linear.Linear" in message
    assert not any(isinstance(module, LamdaLinear) for module in quantized.modules())


class Int8Linear(nn.Linear):
    """A linear layer holding int8 weights, laid out like bitsandbytes' Linear8bitLt (a Linear subclass)."""

    def __init__(self, source: nn.Linear) -> None:
        super().__init__(source.in_features, source.out_features)
        self.weight = nn.Parameter(source.weight.detach().round().to(torch.int8), requires_grad=False)


def test_linear_subclass_with_int8_weight_rejected():
    model = TwoLayer()
    plan = plan_for(model, 4)
    model.square = Int8Linear(model.square)
    before = snapshot(model)
    with pytest.raises(AdapterError, match=re.escape(
        f"module square is a {__name__}.Int8Linear, not a supported linear layer"
    )):
        apply_plan(model, plan, total_steps=10)
    assert_untouched(model, before)


def test_layout_mismatch_rejected():
    model = TwoLayer()
    plan = with_module(plan_for(model, 4), "up", layout="conv1d")
    with pytest.raises(AdapterError, match="module up is a linear layer but the plan says layout 'conv1d'"):
        apply_plan(model, plan, total_steps=10)


@pytest.mark.parametrize(
    "content",
    ["{not json", json.dumps({"format": "something-else"}), json.dumps([1, 2, 3])],
    ids=["not-json", "wrong-format", "not-an-object"],
)
def test_malformed_plan_file_rejected(tmp_path, content):
    model = TwoLayer()
    path = tmp_path / "plan.json"
    path.write_text(content)
    before = snapshot(model)
    with pytest.raises(PlanError, match=re.escape(str(path))):
        apply_plan(model, path, total_steps=10)
    assert_untouched(model, before)


def test_missing_plan_file_rejected(tmp_path):
    model = TwoLayer()
    with pytest.raises(PlanError, match="not found"):
        apply_plan(model, tmp_path / "absent.json", total_steps=10)


def test_plan_of_wrong_type_rejected():
    with pytest.raises(AdapterError, match="plan must be a lamda_spectra Plan or the path of a plan file, not dict"):
        apply_plan(TwoLayer(), {"up": 4}, total_steps=10)


def test_plan_file_path_accepted(tmp_path):
    model = TwoLayer()
    path = plan_for(model, 4).save(tmp_path / "plan.json")
    handle = apply_plan(model, str(path), total_steps=10)
    assert list(handle.modules) == ["up", "square", "down"]


def test_applying_twice_rejected():
    model = TwoLayer()
    plan = plan_for(model, 4)
    apply_plan(model, plan, total_steps=10)
    before = snapshot(model)
    with pytest.raises(AdapterError, match=re.escape(
        "model already has LaMDA adapters in 3 modules (up, square, down); load a fresh model, "
        "or call merge_and_unload(model) first"
    )):
        apply_plan(model, plan, total_steps=10)
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"freeze_fraction": 1.5, "total_steps": 10}, "freeze_fraction=1.5 must be a number in [0, 1]"),
        ({"total_steps": None}, "total_steps=None: pass the number of optimizer steps of the run"),
        ({"total_steps": -3}, "total_steps=-3 must be a positive integer number of optimizer steps"),
        ({"total_steps": 10, "init": "gaussian"}, "init='gaussian' is not one of 'zero-core', 'principal'"),
        ({"total_steps": 10, "scaling": 0.0}, "scaling=0.0 must be a finite non-zero number"),
        ({"total_steps": 10, "dropout": 1.0}, "dropout=1.0 must be a probability in [0, 1)"),
        ({"total_steps": 10, "adapter_dtype": torch.int8}, "adapter_dtype=torch.int8 must be a floating torch dtype"),
    ],
)
def test_invalid_settings_rejected(options, message):
    model = TwoLayer()
    before = snapshot(model)
    with pytest.raises(AdapterError, match=re.escape(message)):
        apply_plan(model, plan_for(model, 4), **options)
    assert_untouched(model, before)


def test_all_problems_reported_together():
    model = TwoLayer(d_hidden=48)
    plan = plan_for(TwoLayer(d_hidden=40), 4)
    plan = dataclasses.replace(plan, modules={**plan.modules, "missing": plan.modules["up"]})
    with pytest.raises(AdapterError) as error:
        apply_plan(model, plan, freeze_fraction=2.0, total_steps=10)
    message = str(error.value)
    assert message.startswith("cannot apply the plan (5 problems): freeze_fraction=2.0")
    assert "1 plan modules are not in the model: missing" in message
    assert "module down has shape" in message


def test_base_parameters_frozen():
    model = TwoLayer()
    model.extra = nn.Linear(3, 3)
    apply_plan(model, plan_for(model, 2, names=["up"]), total_steps=10)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"up.lamda_S", "up.lamda_B"}
    assert isinstance(model.square, nn.Linear)


def tiny_bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32,
    )
    return BertForSequenceClassification(config)


def test_base_model_prefix_added():
    model = tiny_bert_classifier()
    plan = plan_for(model.bert, 4, names=["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"])
    handle = apply_plan(model, plan, total_steps=10)
    assert list(handle.modules) == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]
    assert handle.plan_names["bert.encoder.layer.1.output.dense"] == "encoder.layer.1.output.dense"
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, LamdaLinear)


def test_base_model_prefix_removed():
    model = tiny_bert_classifier()
    plan = plan_for(model, 4, names=["bert.encoder.layer.0.attention.self.key"])
    bert = model.bert
    handle = apply_plan(bert, plan, total_steps=10)
    assert list(handle.modules) == ["encoder.layer.0.attention.self.key"]


def test_two_plan_names_for_one_module_rejected():
    model = tiny_bert_classifier()
    plan = plan_for(model, 4, names=["bert.encoder.layer.0.attention.self.key"])
    plan = dataclasses.replace(
        plan, modules={**plan.modules, "encoder.layer.0.attention.self.key": plan.modules["bert.encoder.layer.0.attention.self.key"]}
    )
    with pytest.raises(AdapterError, match=re.escape(
        "plan modules bert.encoder.layer.0.attention.self.key and encoder.layer.0.attention.self.key both name "
        "model module bert.encoder.layer.0.attention.self.key"
    )):
        apply_plan(model, plan, total_steps=10)
