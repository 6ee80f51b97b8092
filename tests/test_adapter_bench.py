"""Smoke test of benchmarks/bench_adapter.py at its tiny size, so the script keeps working."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_adapter.py"


@pytest.mark.slow
def test_tiny_benchmark_runs(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_adapter", BENCH)
    bench = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules.
    monkeypatch.setitem(sys.modules, "bench_adapter", bench)
    spec.loader.exec_module(bench)

    results = bench.main(["--size", "tiny", "--steps", "1", "--warmup", "0", "--json", str(tmp_path / "out.json")])

    assert [(r["model"], r["method"]) for r in results] == [
        (model, method) for model in ("bert-tiny", "llama") for method in ("lora", "lamda", "lamda-frozen")
    ]
    assert (tmp_path / "out.json").is_file()
    for model in ("bert-tiny", "llama"):
        by_method = {r["method"]: r for r in results if r["model"] == model}
        assert by_method["lamda"]["saved_activation_bytes"] < by_method["lora"]["saved_activation_bytes"]
        assert by_method["lamda-frozen"]["saved_activation_bytes"] < by_method["lamda"]["saved_activation_bytes"]
        assert by_method["lamda-frozen"]["trainable_params"] < by_method["lamda"]["trainable_params"]
        assert by_method["lamda"]["trainable_params"] < by_method["lora"]["trainable_params"]
        assert by_method["lamda-frozen"]["optimizer_state_bytes"] < by_method["lamda"]["optimizer_state_bytes"]
