"""The PMB freezing schedule: its formula, frozen rows that never change, released optimizer state."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from test_adapter_helpers import TwoLayer, plan_for

from lamda_spectra.adapter import FreezeSchedule, apply_plan
from lamda_spectra.adapter.memory import optimizer_state_bytes
from lamda_spectra.errors import AdapterError, LamdaWarning


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("total_steps", [1, 7, 40, 101])
@pytest.mark.parametrize("rank", [1, 3, 16])
def test_frozen_rows_follow_ceil_formula(fraction, total_steps, rank):
    schedule = FreezeSchedule(fraction, total_steps)
    freeze_steps = round(fraction * total_steps)
    for steps_done in range(total_steps + 2):
        expected = sum(1 for j in range(rank) if math.ceil((j + 1) * freeze_steps / rank) <= steps_done)
        assert schedule.frozen_rows(rank, steps_done) == expected


def test_freeze_steps_rounding():
    assert FreezeSchedule(0.3, 10).freeze_steps == 3
    assert FreezeSchedule(0.25, 10).freeze_steps == 2  # round() takes 2.5 to the even 2
    assert FreezeSchedule(0.0, None).freeze_steps == 0
    assert FreezeSchedule(0.3, 10).freeze_step_of_row(4, 0) == 1
    assert FreezeSchedule(0.3, 10).freeze_step_of_row(4, 3) == 3


@pytest.mark.parametrize(
    ("fraction", "total_steps", "message"),
    [
        (1.5, 100, "freeze_fraction=1.5 must be a number in [0, 1]"),
        (-0.1, 100, "freeze_fraction=-0.1 must be a number in [0, 1]"),
        ("0.3", 100, "freeze_fraction='0.3' must be a number in [0, 1]"),
        (0.3, None, "total_steps=None: pass the number of optimizer steps"),
        (0.3, 0, "total_steps=0 must be a positive integer"),
        (0.3, 12.5, "total_steps=12.5 must be a positive integer"),
    ],
)
def test_invalid_schedule_rejected(fraction, total_steps, message):
    with pytest.raises(AdapterError, match="invalid PMB freezing schedule") as error:
        FreezeSchedule(fraction, total_steps)
    assert message in str(error.value)


def train_steps(model, handle, optimizer, steps, on_step=None):
    torch.manual_seed(0)
    x = torch.randn(16, 24)
    for step in range(1, steps + 1):
        loss = (model(x) - 1.0).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        handle.step(optimizer)
        if on_step is not None:
            on_step(step)


@pytest.mark.parametrize("init", ["zero-core", "principal"])
def test_frozen_rows_bit_identical_under_adamw(init):
    model = TwoLayer()
    total_steps, rank = 20, 4
    handle = apply_plan(model, plan_for(model, rank), init=init, total_steps=total_steps, freeze_fraction=0.5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-2, betas=(0.9, 0.999), weight_decay=0.5)
    at_freeze: dict[tuple[str, int], torch.Tensor] = {}
    first_values = {name: m.lamda_B.detach().clone() for name, m in handle.modules.items()}

    def check(step):
        for name, module in handle.modules.items():
            for row in range(module.frozen_rows):
                key = (name, row)
                if key not in at_freeze:
                    assert handle.schedule.freeze_step_of_row(rank, row) == step
                    at_freeze[key] = module.lamda_B[row].detach().clone()
                assert torch.equal(module.lamda_B[row], at_freeze[key]), (name, row, step)

    train_steps(model, handle, optimizer, total_steps, on_step=check)
    assert len(at_freeze) == 3 * rank
    for name, module in handle.modules.items():
        # Rows really trained before freezing (weight decay alone moves them).
        assert not torch.equal(module.lamda_B.detach(), first_values[name])
        assert not module.lamda_B.requires_grad


def test_frozen_rows_get_no_gradient():
    model = TwoLayer()
    handle = apply_plan(model, plan_for(model, 4), init="principal", total_steps=8, freeze_fraction=1.0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    train_steps(model, handle, optimizer, 2)  # 2 steps of 8 over rank 4: one row frozen
    assert model.up.frozen_rows == 1
    (model(torch.randn(3, 24)).square().sum()).backward()
    assert torch.count_nonzero(model.up.lamda_B.grad[0]) == 0
    assert torch.count_nonzero(model.up.lamda_B.grad[1:]) > 0


def test_optimizer_state_released_when_pmb_frozen():
    model = TwoLayer()
    handle = apply_plan(model, plan_for(model, 4), total_steps=10, freeze_fraction=0.3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sizes = []
    train_steps(model, handle, optimizer, 10, on_step=lambda step: sizes.append(optimizer_state_bytes(optimizer)))

    pmb = sum(m.lamda_B.numel() for m in handle.modules.values())
    core = sum(m.lamda_S.numel() for m in handle.modules.values())
    # AdamW keeps two float32 moments per element plus a step scalar per parameter.
    assert sizes[0] == 2 * 4 * (pmb + core) + 6 * 4
    assert sizes[-1] == 2 * 4 * core + 3 * 4
    assert all(module.lamda_B not in optimizer.state for module in handle.modules.values())
    assert handle.finished


def test_trainable_parameter_counts():
    model = TwoLayer()  # up 24 -> 40, square 40 -> 40, down 40 -> 16
    handle = apply_plan(model, plan_for(model, 4), total_steps=8, freeze_fraction=0.5)
    cores = 3 * 16
    assert handle.trainable_parameters == cores + 4 * (40 + 40 + 16)
    assert handle.trainable_parameters_after_schedule == cores
    assert handle.lora_parameters == 4 * (24 + 40 + 40 + 40 + 40 + 16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, handle, optimizer, 2)  # T_f = 4: row j frozen after j + 1 steps
    assert handle.frozen_rows() == {"up": (2, 4), "square": (2, 4), "down": (2, 4)}
    assert handle.trainable_parameters == cores + 2 * (40 + 40 + 16)


def test_zero_fraction_freezes_pmb_at_start():
    model = TwoLayer()
    handle = apply_plan(model, plan_for(model, 4), freeze_fraction=0.0)
    assert handle.finished
    assert not model.up.lamda_B.requires_grad
    assert model.up.lamda_S.requires_grad
    assert handle.trainable_parameters == handle.trainable_parameters_after_schedule


def test_step_without_optimizer_warns_once():
    model = TwoLayer()
    handle = apply_plan(model, plan_for(model, 2), total_steps=4, freeze_fraction=0.5)
    handle.step()
    with pytest.warns(LamdaWarning, match=r"call handle.step\(optimizer\) to release it"):
        handle.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle.step()
    assert handle.finished


def test_callback_runs_schedule_in_trainer(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from lamda_spectra.adapter import LamdaCallback

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32,
    )
    model = BertForSequenceClassification(config)
    handle = apply_plan(model, plan_for(model, 4, names=["bert.encoder.layer.0.attention.self.query"]), total_steps=6)
    data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.tensor(i % 2)} for i in range(24)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[LamdaCallback(handle)])
    trainer.train()
    assert handle.steps_done == 6
    assert handle.finished
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert model.bert.encoder.layer[0].attention.self.query.lamda_B not in inner.state


def test_callback_warns_on_step_mismatch(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from lamda_spectra.adapter import LamdaCallback

    model = TwoLayer()
    handle = apply_plan(model, plan_for(model, 2), total_steps=10)
    state = TrainerState(max_steps=12)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    with pytest.warns(LamdaWarning, match="pass total_steps=12 to apply_plan"):
        LamdaCallback(handle).on_train_begin(args, state, TrainerControl())


def test_step_after_merge_rejected():
    from lamda_spectra.adapter import merge_and_unload

    model = TwoLayer()
    handle = apply_plan(model, plan_for(model, 2), total_steps=10)
    merge_and_unload(model)
    with pytest.raises(AdapterError, match="merged by merge_and_unload"):
        handle.step()


def test_schedule_survives_deepcopy():
    model = TwoLayer()
    handle = apply_plan(model, plan_for(model, 4), total_steps=8, freeze_fraction=1.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1, weight_decay=0.1)
    train_steps(model, handle, optimizer, 2)
    clone = copy.deepcopy(model)
    frozen = clone.up.lamda_B[:1].detach().clone()
    clone_optimizer = torch.optim.AdamW([p for p in clone.parameters() if p.requires_grad], lr=1e-1, weight_decay=0.1)
    train_steps(clone, clone.lamda_handle, clone_optimizer, 1)
    assert torch.equal(clone.up.lamda_B[:1], frozen)
    assert clone.lamda_handle.steps_done == 3
    assert handle.steps_done == 2
