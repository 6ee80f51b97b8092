"""The MiniLM fine-tuning example, run briefly on the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_minilm.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("finetune_minilm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_trains_freezes_and_exports(example, tmp_path):
    at_freeze: dict[tuple[str, int], torch.Tensor] = {}
    changed_after_freeze = []

    def record(step, handle):
        for name, module in handle.modules.items():
            for row in range(module.frozen_rows):
                if (name, row) not in at_freeze:
                    at_freeze[name, row] = module.lamda_B[row].detach().clone()
                elif not torch.equal(module.lamda_B[row], at_freeze[name, row]):
                    changed_after_freeze.append((step, name, row))

    result = example.main(["--quick", "--output", str(tmp_path)], on_step=record)

    losses = result["losses"]
    assert len(losses) == 30
    assert statistics.mean(losses[-5:]) < 0.7 * statistics.mean(losses[:5])
    handle = result["handle"]
    assert len(handle.modules) == 36
    assert handle.finished
    assert len(at_freeze) == sum(module.rank for module in handle.modules.values())
    assert changed_after_freeze == []
    for (name, row), value in at_freeze.items():
        assert torch.equal(handle.modules[name].lamda_B[row], value)
    assert result["peft_relative_error"] < 1e-5
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "lamda" / "lamda_adapter.json").is_file()
