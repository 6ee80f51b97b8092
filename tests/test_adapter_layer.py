"""LamdaLinear: initialisation from the SVD, the forward formula, dtypes, Conv1D, saved activations."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from checkpoints import matrix_with_singular_values
from test_adapter_helpers import TwoLayer, plan_for, relative_error
from torch import nn

from lamda_spectra.adapter import LamdaLinear, apply_plan
from lamda_spectra.adapter.memory import saved_activation_bytes


def adapted(model: nn.Module, rank: int = 4, **options) -> nn.Module:
    model = copy.deepcopy(model)
    options.setdefault("total_steps", 10)
    apply_plan(model, plan_for(model, rank), **options)
    return model


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    return GPT2Model(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4)).eval()


def tiny_bert(dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32,
    )
    return BertModel(config).to(dtype).eval()


def test_zero_core_outputs_equal_original_exactly():
    model = TwoLayer()
    x = torch.randn(7, 24)
    wrapped = adapted(model, init="zero-core")
    assert isinstance(wrapped.square, LamdaLinear)
    assert torch.equal(wrapped(x), model(x))


@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_principal_outputs_within_1e_5(scaling):
    model = TwoLayer()
    x = torch.randn(7, 24)
    wrapped = adapted(model, init="principal", scaling=scaling)
    assert relative_error(wrapped(x).detach(), model(x).detach()) < 1e-5


def test_factors_match_known_spectrum():
    values = [9.0, 7.0, 5.0, 3.0, 2.0, 1.0]
    model = nn.Sequential(OrderedDict(proj=nn.Linear(12, 10, bias=False)))
    with torch.no_grad():
        model.proj.weight.copy_(matrix_with_singular_values(10, 12, values, seed=3))
    original = model.proj.weight.detach().double().clone()
    wrapped = adapted(model, rank=3, init="principal", scaling=2.0)
    layer = wrapped.proj

    A, S, B = layer.lamda_A.double(), layer.lamda_S.double(), layer.lamda_B.double()
    assert A.shape == (12, 3)
    assert S.shape == (3, 3)
    assert B.shape == (3, 10)
    assert not isinstance(layer.lamda_A, nn.Parameter)
    assert torch.allclose(A.T @ A, torch.eye(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(B @ B.T, torch.eye(3, dtype=torch.float64), atol=1e-5)
    # The core is diag(s) / scaling, and the base keeps W minus the top-3 part.
    assert torch.allclose(S, torch.diag(torch.tensor([4.5, 3.5, 2.5], dtype=torch.float64)), atol=1e-5)
    top3 = (A * torch.tensor([9.0, 7.0, 5.0], dtype=torch.float64)) @ B
    assert torch.allclose(layer.base_layer.weight.double(), original - top3.T, atol=1e-5)
    assert torch.allclose(torch.linalg.svdvals(layer.base_layer.weight.double())[:3], torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), atol=1e-5)


def test_forward_matches_formula():
    model = TwoLayer()
    wrapped = adapted(model, rank=5, scaling=0.5)
    layer = wrapped.up
    torch.manual_seed(1)
    with torch.no_grad():
        layer.lamda_S.normal_()
        layer.lamda_B.normal_()
    x = torch.randn(3, 4, 24)
    expected = layer.base_layer(x) + 0.5 * (((x @ layer.lamda_A) @ layer.lamda_S) @ layer.lamda_B)
    assert torch.allclose(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_only_core_and_pmb_train():
    wrapped = adapted(TwoLayer())
    trainable = sorted(name for name, p in wrapped.named_parameters() if p.requires_grad)
    assert trainable == [f"{m}.lamda_{f}" for m in ("down", "square", "up") for f in ("B", "S")]
    assert "up.lamda_A" in dict(wrapped.named_buffers())


def test_dropout_only_in_training():
    wrapped = adapted(TwoLayer(), dropout=0.5)
    with torch.no_grad():
        wrapped.up.lamda_S.fill_(1.0)
    x = torch.randn(5, 24)
    wrapped.eval()
    assert torch.equal(wrapped(x), wrapped(x))
    wrapped.train()
    torch.manual_seed(0)
    first = wrapped(x)
    torch.manual_seed(1)
    assert not torch.equal(first, wrapped(x))


@pytest.mark.parametrize("init", ["zero-core", "principal"])
def test_conv1d_layers(init):
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = model(ids).last_hidden_state
    wrapped = adapted(model, rank=3, init=init)
    layer = wrapped.h[0].attn.c_attn
    assert isinstance(layer, LamdaLinear) and layer.layout == "conv1d"
    assert layer.lamda_A.shape == (32, 3)
    assert layer.lamda_B.shape == (3, 96)
    actual = wrapped(ids).last_hidden_state
    if init == "zero-core":
        assert torch.equal(actual, expected)
    else:
        assert relative_error(actual.detach(), expected.detach()) < 1e-5


def test_bfloat16_model_with_float32_adapter():
    model = tiny_bert(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = model(ids).last_hidden_state
    wrapped = adapted(model, rank=4)
    layer = wrapped.encoder.layer[0].attention.self.query
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lamda_S.dtype == torch.float32
    assert layer.lamda_A.dtype == torch.float32
    output = wrapped(ids).last_hidden_state
    assert output.dtype == torch.bfloat16
    assert torch.equal(output, expected)
    output.float().square().mean().backward()
    assert layer.lamda_S.grad is not None
    assert layer.lamda_S.grad.dtype == torch.float32


def test_bfloat16_model_principal_init():
    model = tiny_bert(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = model(ids).last_hidden_state
    wrapped = adapted(model, rank=4, init="principal")
    # The residual is stored in bfloat16, so agreement is at bfloat16 precision (8 mantissa bits).
    assert relative_error(wrapped(ids).last_hidden_state.detach(), expected.detach()) < 2e-2


def test_bfloat16_adapter_dtype():
    wrapped = adapted(TwoLayer(), adapter_dtype=torch.bfloat16)
    assert wrapped.up.lamda_S.dtype == torch.bfloat16
    assert wrapped.up.lamda_A.dtype == torch.bfloat16
    assert wrapped(torch.randn(2, 24)).dtype == torch.float32


def lora_layer(base: nn.Linear, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = nn.Sequential(OrderedDict(proj=copy.deepcopy(base)))
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"]))


def test_saved_activations_smaller_than_lora():
    torch.manual_seed(0)
    n, d_in, d_out, rank = 32, 64, 48, 4
    base = nn.Linear(d_in, d_out)
    x = torch.randn(n, d_in, requires_grad=True)
    lamda = adapted(nn.Sequential(OrderedDict(proj=base)), rank=rank)
    lora = lora_layer(base, rank)

    lamda_bytes, _ = saved_activation_bytes(lamda, lambda: lamda(x))
    lora_bytes, _ = saved_activation_bytes(lora, lambda: lora(x))
    # LaMDA keeps x @ A and x @ A @ S (n x r each); LoRA keeps x (n x d_in) and x @ A (n x r).
    assert lamda_bytes == 2 * n * rank * 4
    assert lora_bytes == (n * d_in + n * rank) * 4

    # Once the PMB is frozen, only x @ A is kept (for the core's gradient).
    lamda.proj.freeze_rows(rank)
    frozen_bytes, _ = saved_activation_bytes(lamda, lambda: lamda(x))
    assert frozen_bytes == n * rank * 4


def test_saved_activations_smaller_than_lora_in_bert():
    from peft import LoraConfig, get_peft_model

    model = tiny_bert()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    lamda = adapted(model, rank=4)
    names = [name for name in dict(lamda.lamda_handle.modules)]
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=4, target_modules=names))
    lamda_bytes, _ = saved_activation_bytes(lamda, lambda: lamda(ids).last_hidden_state)
    lora_bytes, _ = saved_activation_bytes(lora, lambda: lora(ids).last_hidden_state)
    assert lamda_bytes < lora_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_apply_after_moving_to_cuda():
    model = TwoLayer().to("cuda")
    x = torch.randn(7, 24, device="cuda")
    wrapped = adapted(model, init="principal")
    assert wrapped.up.lamda_A.device.type == "cuda"
    assert relative_error(wrapped(x).detach(), model(x).detach()) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_move_to_cuda_after_apply():
    model = TwoLayer()
    x = torch.randn(7, 24)
    wrapped = adapted(model, init="principal").to("cuda")
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    wrapped(x.to("cuda")).square().mean().backward()
    optimizer.step()
    wrapped.lamda_handle.step(optimizer)
    assert wrapped.up.frozen_rows == 1
    assert wrapped.up.pmb_frozen_values.device.type == "cuda"
