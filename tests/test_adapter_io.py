"""save_adapter / load_adapter round trips, merge_and_unload, and export to PEFT LoRA."""

from __future__ import annotations

import copy
import json
import warnings
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_adapter_helpers import TwoLayer, plan_for, relative_error
from torch import nn

from lamda_spectra.adapter import LamdaLinear, apply_plan, export_peft, load_adapter, merge_and_unload, save_adapter
from lamda_spectra.errors import AdapterError, LamdaError, LamdaWarning


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    return GPT2Model(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()


def gpt2_inputs() -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def run(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    output = model(inputs)
    return (output if isinstance(output, torch.Tensor) else output.last_hidden_state).detach()


CASES = {
    "linear": (TwoLayer, lambda: torch.randn(6, 24, generator=torch.Generator().manual_seed(0))),
    "conv1d": (tiny_gpt2, gpt2_inputs),
}


def trained(original: nn.Module, inputs: torch.Tensor, init: str, steps: int = 3, **options) -> nn.Module:
    """Adapt a copy of ``original`` and train it a few steps, so cores and PMBs are far from their init."""
    model = copy.deepcopy(original)
    options = {"total_steps": 6, "freeze_fraction": 1.0, **options}
    handle = apply_plan(model, plan_for(model, 3), init=init, **options)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        run_output = model(inputs)
        output = run_output if isinstance(run_output, torch.Tensor) else run_output.last_hidden_state
        (output - 0.5).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        handle.step(optimizer)
    return model.eval()


@pytest.mark.parametrize("init", ["zero-core", "principal"])
@pytest.mark.parametrize("case", list(CASES))
def test_save_load_round_trip(tmp_path, case, init):
    factory, make_inputs = CASES[case]
    original, inputs = factory(), make_inputs()
    model = trained(original, inputs, init)
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["lamda_adapter.json", "lamda_adapter.safetensors"]

    fresh = copy.deepcopy(original)
    handle = load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    assert relative_error(run(fresh, inputs), run(model, inputs)) < 1e-6
    assert handle.steps_done == 3
    assert handle.frozen_rows() == model.lamda_handle.frozen_rows()
    for name, layer in handle.modules.items():
        saved = model.lamda_handle.modules[name]
        assert torch.equal(layer.lamda_B, saved.lamda_B)
        assert layer.lamda_B.requires_grad == saved.lamda_B.requires_grad
        assert torch.equal(layer.base_layer.weight, saved.base_layer.weight)


@pytest.mark.parametrize("init", ["zero-core", "principal"])
def test_save_load_bfloat16_model(tmp_path, init):
    original, inputs = TwoLayer().to(torch.bfloat16), CASES["linear"][1]().to(torch.bfloat16)
    model = trained(original, inputs, init)
    save_adapter(model, tmp_path / "adapter")
    fresh = copy.deepcopy(original)
    load_adapter(fresh, tmp_path / "adapter")
    assert fresh.up.base_layer.weight.dtype == torch.bfloat16
    assert fresh.up.lamda_S.dtype == torch.float32
    assert torch.equal(run(fresh.eval(), inputs), run(model, inputs))


def test_load_continues_schedule(tmp_path):
    original, inputs = TwoLayer(), CASES["linear"][1]()
    model = trained(original, inputs, "zero-core", steps=2, total_steps=8, freeze_fraction=0.5)
    save_adapter(model, tmp_path / "adapter")
    fresh = copy.deepcopy(original)
    handle = load_adapter(fresh, tmp_path / "adapter")
    assert handle.settings.total_steps == 8
    assert handle.settings.freeze_fraction == 0.5
    # Rank 3 over T_f = 4 steps: row j freezes after ceil(4 (j + 1) / 3) = 2, 3, 4 steps.
    assert fresh.up.frozen_rows == 1
    frozen = fresh.up.lamda_B[:1].detach().clone()
    optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.5)
    fresh(inputs).square().mean().backward()
    optimizer.step()
    handle.step(optimizer)
    assert torch.equal(fresh.up.lamda_B[:1], frozen)
    assert fresh.up.frozen_rows == 2


def test_save_load_modules_to_save(tmp_path):
    original, inputs = TwoLayer(), CASES["linear"][1]()
    model = copy.deepcopy(original)
    apply_plan(model, plan_for(model, 2, names=["up", "square"]), total_steps=10)
    model.down.requires_grad_(True)
    with torch.no_grad():
        model.down.weight.mul_(3.0)
    save_adapter(model, tmp_path / "adapter", modules_to_save=["down"])
    fresh = copy.deepcopy(original)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh.down.weight, model.down.weight)
    assert fresh.down.weight.requires_grad
    assert torch.equal(run(fresh, inputs), run(model, inputs))


def test_save_warns_about_unsaved_trainable_module(tmp_path):
    model = TwoLayer()
    apply_plan(model, plan_for(model, 2, names=["up", "square"]), total_steps=10)
    model.down.requires_grad_(True)

    with pytest.warns(LamdaWarning, match=r"leaves out 1 trainable parameter that no LaMDA adapter holds \(down.weight\)"):
        save_adapter(model, tmp_path / "unsaved")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_adapter(model, tmp_path / "saved", modules_to_save=["down"])


@pytest.mark.parametrize("write", [save_adapter, export_peft])
def test_write_to_file_fails_first(tmp_path, write):
    model = TwoLayer()
    apply_plan(model, plan_for(model, 2, names=["up", "square"]), total_steps=10)
    model.down.requires_grad_(True)  # would be warned about if the write went ahead
    existing = tmp_path / "notes.txt"
    existing.write_text("precious")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(LamdaError, match=r"notes.txt: it is a file; move it or choose another output folder"):
            write(model, existing)

    assert existing.read_text() == "precious"


def test_save_without_adapters_writes_nothing(tmp_path):
    with pytest.raises(AdapterError, match="TwoLayer has no LaMDA adapters; call lamda_spectra.apply_plan or load_adapter first"):
        save_adapter(TwoLayer(), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_save_unknown_module_to_save_writes_nothing(tmp_path):
    model = TwoLayer()
    apply_plan(model, plan_for(model, 2), total_steps=10)
    with pytest.raises(AdapterError, match="modules_to_save names modules that are not in the model: head"):
        save_adapter(model, tmp_path / "adapter", modules_to_save=["head"])
    assert not (tmp_path / "adapter").exists()


@pytest.fixture
def saved_adapter(tmp_path):
    original = TwoLayer()
    model = copy.deepcopy(original)
    apply_plan(model, plan_for(model, 2), init="principal", total_steps=10)
    return original, save_adapter(model, tmp_path / "adapter")


def assert_not_adapted(model: nn.Module, original: nn.Module) -> None:
    assert not any(isinstance(module, LamdaLinear) for module in model.modules())
    assert "lamda_handle" not in model.__dict__
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))


def test_load_onto_other_weights_rejected(saved_adapter):
    original, folder = saved_adapter
    other = TwoLayer(seed=5)
    before = copy.deepcopy(other)
    with pytest.raises(AdapterError, match=r"cannot load the adapter in .* \(3 problems\): module up has Frobenius norm"):
        load_adapter(other, folder)
    assert_not_adapted(other, before)


def test_load_missing_folder_rejected(tmp_path):
    with pytest.raises(AdapterError, match="lamda_adapter.json not found; pass a folder written by save_adapter"):
        load_adapter(TwoLayer(), tmp_path / "absent")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda config: "{broken", "is not valid JSON"),
        (lambda config: json.dumps({**config, "format": "peft"}), "is not a LaMDA adapter config"),
        (lambda config: json.dumps({**config, "schema_version": 9}), "has schema_version 9"),
        (lambda config: json.dumps({k: v for k, v in config.items() if k != "plan"}), "lacks the keys plan"),
        (lambda config: json.dumps({**config, "steps_done": -1}), "has steps_done=-1"),
        (lambda config: json.dumps({**config, "settings": {**config["settings"], "init": "lora"}}), "init='lora' is not one of"),
        (lambda config: json.dumps({**config, "plan": {**config["plan"], "modules": {}}}), "invalid plan"),
    ],
    ids=["not-json", "format", "schema", "no-plan", "steps", "init", "plan"],
)
def test_malformed_config_rejected(saved_adapter, edit, message):
    original, folder = saved_adapter
    config_file = folder / "lamda_adapter.json"
    config_file.write_text(edit(json.loads(config_file.read_text())))
    model = copy.deepcopy(original)
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, folder)
    assert_not_adapted(model, original)


def test_missing_and_misshapen_tensors_rejected(saved_adapter):
    original, folder = saved_adapter
    tensors = load_file(folder / "lamda_adapter.safetensors")
    del tensors["up.lamda_S"]
    tensors["down.lamda_B"] = torch.zeros(3, 16)
    save_file(tensors, folder / "lamda_adapter.safetensors")
    model = copy.deepcopy(original)
    with pytest.raises(AdapterError) as error:
        load_adapter(model, folder)
    message = str(error.value)
    assert "tensor up.lamda_S is missing" in message
    assert "tensor down.lamda_B has shape [3, 16], expected [2, 16]" in message
    assert_not_adapted(model, original)


def test_truncated_tensor_file_rejected(saved_adapter):
    original, folder = saved_adapter
    weights = folder / "lamda_adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    model = copy.deepcopy(original)
    with pytest.raises(AdapterError, match="is not a readable safetensors file"):
        load_adapter(model, folder)
    assert_not_adapted(model, original)


def test_load_onto_adapted_model_rejected(saved_adapter):
    original, folder = saved_adapter
    model = copy.deepcopy(original)
    load_adapter(model, folder)
    with pytest.raises(AdapterError, match="model already has LaMDA adapters"):
        load_adapter(model, folder)


@pytest.mark.parametrize("init", ["zero-core", "principal"])
@pytest.mark.parametrize("case", list(CASES))
def test_merge_and_unload_matches(case, init):
    factory, make_inputs = CASES[case]
    original, inputs = factory(), make_inputs()
    model = trained(original, inputs, init)
    expected = run(model, inputs)
    assert relative_error(expected, run(original, inputs)) > 1e-3  # training changed the outputs

    merge_and_unload(model)
    assert relative_error(run(model, inputs), expected) < 1e-5
    assert "lamda_handle" not in model.__dict__
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    assert list(model.state_dict()) == list(original.state_dict())


def test_merge_without_adapters_rejected():
    with pytest.raises(AdapterError, match="has no LaMDA adapters"):
        merge_and_unload(TwoLayer())


def load_peft(base: nn.Module, folder) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, folder).eval()


@pytest.mark.parametrize("init", ["zero-core", "principal"])
@pytest.mark.parametrize("case", list(CASES))
def test_export_peft_matches(tmp_path, case, init):
    factory, make_inputs = CASES[case]
    original, inputs = factory(), make_inputs()
    model = trained(original, inputs, init, scaling=1.5)
    export_peft(model, tmp_path / "peft")

    reloaded = load_peft(copy.deepcopy(original), tmp_path / "peft")
    assert relative_error(run(reloaded, inputs), run(model, inputs)) < 1e-5


def test_export_peft_config_and_ranks(tmp_path):
    original = tiny_gpt2()
    model = copy.deepcopy(original)
    ranks = {"h.0.attn.c_attn": 3, "h.0.mlp.c_fc": 5, "h.1.attn.c_proj": 3}
    apply_plan(model, plan_for(model, ranks), init="principal", total_steps=10)
    export_peft(model, tmp_path / "peft", base_model_name_or_path="org/tiny-gpt2")

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["target_modules"] == list(ranks)
    assert config["rank_pattern"] == ranks
    assert config["alpha_pattern"] == ranks
    assert config["fan_in_fan_out"] is True
    assert config["base_model_name_or_path"] == "org/tiny-gpt2"
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    # A "principal" adapter exports at the plan's rank, not twice that.
    assert tensors["base_model.model.h.0.mlp.c_fc.lora_A.weight"].shape == (5, 32)
    assert tensors["base_model.model.h.0.mlp.c_fc.lora_B.weight"].shape == (128, 5)
    assert len(tensors) == 6


def tiny_classifier(kind: str = "bert") -> nn.Module:
    """A one-layer sequence classifier with random weights (hidden size 32, 2 labels)."""
    from transformers import BertConfig, BertForSequenceClassification, DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    if kind == "distilbert":
        config = DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_position_embeddings=32)
        return DistilBertForSequenceClassification(config).eval()
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32,
    )
    return BertForSequenceClassification(config).eval()


def with_trained_head(original: nn.Module, body: str, heads: list[str]) -> nn.Module:
    """Adapt a copy of ``original``'s ``body`` and unfreeze and change its ``heads``, as fine-tuning would."""
    model = copy.deepcopy(original)
    apply_plan(model, plan_for(model.get_submodule(body), 4), total_steps=10)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.lamda_handle.modules.values():
            layer.lamda_S.copy_(0.1 * torch.randn(layer.lamda_S.shape, generator=generator))
        for name in heads:
            head = model.get_submodule(name).requires_grad_(True)
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
    return model


def test_export_peft_with_task_head(tmp_path):
    original = tiny_classifier()
    model = with_trained_head(original, "bert", ["classifier"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", LamdaWarning)
        export_peft(model, tmp_path / "peft", modules_to_save=["classifier"])

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert torch.equal(tensors["base_model.model.classifier.weight"], model.classifier.weight)
    ids = gpt2_inputs()
    reloaded = load_peft(copy.deepcopy(original), tmp_path / "peft")
    logits = model(ids).logits.detach()
    assert relative_error(logits, original(ids).logits.detach()) > 1e-2  # the head and adapters changed them
    assert torch.allclose(reloaded(ids).logits.detach(), logits, rtol=0, atol=1e-5)


def test_export_peft_unsaved_head_warns(tmp_path):
    original = tiny_classifier()
    model = with_trained_head(original, "bert", ["classifier"])
    expected = (
        r"export_peft leaves out 2 trainable parameters that are in no LaMDA adapter "
        r"\(classifier.weight, classifier.bias\); pass modules_to_save=\['classifier'\] to store them"
    )
    with pytest.warns(LamdaWarning, match=expected):
        export_peft(model, tmp_path / "peft")

    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert not [key for key in tensors if "classifier" in key]
    ids = gpt2_inputs()
    reloaded = load_peft(copy.deepcopy(original), tmp_path / "peft")
    assert relative_error(reloaded(ids).logits.detach(), model(ids).logits.detach()) > 1e-2


def test_export_peft_saves_suffix_matches(tmp_path):
    # PEFT matches modules_to_save entries as plain suffixes: "classifier" also wraps "pre_classifier".
    original = tiny_classifier("distilbert")
    model = with_trained_head(original, "distilbert", ["pre_classifier", "classifier"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", LamdaWarning)
        export_peft(model, tmp_path / "peft", modules_to_save=["classifier"])

    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert torch.equal(tensors["base_model.model.pre_classifier.weight"], model.pre_classifier.weight)
    ids = gpt2_inputs()
    reloaded = load_peft(copy.deepcopy(original), tmp_path / "peft")
    assert torch.allclose(reloaded(ids).logits.detach(), model(ids).logits.detach(), rtol=0, atol=1e-5)


class Headed(nn.Module):
    """An adapted ``body``, a ``layer`` whose name ends ``body.base_layer``, and a two-part ``head``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.scale = nn.Parameter(torch.ones(()))
        self.body = nn.Linear(8, 8)
        self.layer = nn.Linear(8, 8)
        self.head = nn.Sequential(OrderedDict(dense=nn.Linear(8, 8), out=nn.Linear(8, 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.head(self.layer(self.body(x)))


@pytest.mark.parametrize(
    ("modules_to_save", "message"),
    [
        ("head", r"modules_to_save must be a list of module names, not the string 'head'"),
        (["missing"], r"modules_to_save entry 'missing' is not a module of the model; pass full names"),
        ([""], r"modules_to_save entry '' names the whole model; name its trained submodules"),
        (["body"], r"modules_to_save entry body matches the adapted module body, which PEFT would then load"),
        (["body.base_layer"], r"modules_to_save entry body.base_layer is part of an adapted module"),
        (["layer"], r"modules_to_save entry layer would also make PEFT wrap its own module base_model.model.body.base_layer"),
        (["head", "head.out"], r"PEFT would save both module head and its submodule head.out; save only head"),
    ],
    ids=["string", "missing", "root", "adapted", "inside-adapted", "lora-suffix", "nested"],
)
def test_export_peft_modules_to_save_rejected(tmp_path, modules_to_save, message):
    model = Headed()
    apply_plan(model, plan_for(model, 2, names=["body"]), total_steps=10)
    with pytest.raises(AdapterError, match=message):
        export_peft(model, tmp_path / "peft", modules_to_save=modules_to_save)
    assert not (tmp_path / "peft").exists()


def test_export_peft_unstorable_parameters_warn(tmp_path):
    model = Headed()
    apply_plan(model, plan_for(model, 2, names=["body"]), total_steps=10)
    model.scale.requires_grad_(True)
    model.body.base_layer.bias.requires_grad_(True)
    expected = (
        r"export_peft leaves out 2 trainable parameters that a PEFT LoRA adapter cannot store "
        r"\(scale, body.base_layer.bias\); call merge_and_unload to keep their trained values"
    )
    with pytest.warns(LamdaWarning, match=expected):
        export_peft(model, tmp_path / "peft")


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.block = nn.Sequential(OrderedDict(fc=nn.Linear(8, 8)))


def test_export_peft_ambiguous_names_rejected(tmp_path):
    model = Nested()
    apply_plan(model, plan_for(model, 2, names=["fc"]), total_steps=10)
    with pytest.raises(AdapterError, match="target fc would also make PEFT adapt module block.fc"):
        export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_export_peft_without_adapters_writes_nothing(tmp_path):
    with pytest.raises(AdapterError, match="has no LaMDA adapters"):
        export_peft(TwoLayer(), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
