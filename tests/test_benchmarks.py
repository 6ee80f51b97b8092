"""Smoke tests of the benchmark scripts at their tiny sizes, so that the scripts keep working.

They check the shape of each script's results and the accuracy figures that have a contract
(energy scores within 1e-4, shared metrics within 1e-4 relative), never timings.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str, monkeypatch):
    """Import ``benchmarks/<name>.py`` as a module (the folder is not a package)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules.
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_common_stats_and_energy(monkeypatch):
    common = load_script("_common", monkeypatch)

    summary = common.stats([3.0, 1.0, 2.0])
    scores = common.energy_scores([3.0, 2.0, 1.0], 14.0, [1, 2, 5])

    assert summary == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert common.show(summary) == "2.00 (1.00-3.00)"
    assert scores.tolist() == pytest.approx([9 / 14, 13 / 14, 1.0], abs=1e-15)


def test_common_child_peak_rss(monkeypatch):
    common = load_script("_common", monkeypatch)
    command = [sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('{}')"]

    child = common.run_child(command).check(command)

    assert child.json_output() == {}
    assert child.peak_rss_bytes > 200 * 2**20


def test_common_child_rss_excludes_parent(monkeypatch):
    common = load_script("_common", monkeypatch)
    parent_memory = bytearray(400 * 2**20)
    # Write to every page so that the parent's RSS really grows.
    parent_memory[::4096] = b"x" * len(parent_memory[::4096])
    command = [sys.executable, "-c", "pass"]

    child = common.run_child(command).check(command)

    assert child.peak_rss_bytes < 100 * 2**20
    del parent_memory


def test_common_child_exit_code(monkeypatch):
    common = load_script("_common", monkeypatch)
    command = [sys.executable, "-c", "import sys; sys.exit(3)"]

    child = common.run_child(command)

    assert child.returncode == 3
    with pytest.raises(RuntimeError, match="exited with 3"):
        child.check(command)


def test_bench_scan_tiny(tmp_path, monkeypatch):
    bench = load_script("bench_scan", monkeypatch)

    results = bench.main(["--size", "tiny", "--repeats", "1", "--work-dir", str(tmp_path)])

    (result,) = results
    assert result["modules"] == 14
    assert set(result["accuracy"]) == {"lamda-plan", "torch.linalg.svd", "torch.linalg.svdvals"}
    assert result["accuracy"]["lamda-plan"]["modules"] == 14
    assert result["accuracy"]["lamda-plan"]["energy_error_max"] < 1e-4
    assert result["accuracy"]["lamda-plan"]["value_rel_error_max"] < 1e-3
    assert result["cold_rss_bytes"]["median"] > 0


def test_bench_weightwatcher_tiny(tmp_path, monkeypatch):
    pytest.importorskip("weightwatcher")
    bench = load_script("bench_weightwatcher", monkeypatch)
    monkeypatch.chdir(tmp_path)

    results = bench.main(["--size", "tiny", "--repeats", "1", "--work-dir", str(tmp_path)])

    (result,) = results
    assert result["agreement"]["common"] == 3
    for metric, difference in result["agreement"]["max_rel_diff"].items():
        assert difference < 1e-4, metric


def test_bench_init_tiny(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    bench = load_script("bench_init", monkeypatch)

    results = bench.main(["--size", "tiny", "--repeats", "1", "--work-dir", str(tmp_path)])

    assert [r["model"] for r in results] == ["bert-tiny", "llama"]
    for result in results:
        assert set(result["methods"]) == {"lamda-principal", "pissa", "pissa_niter_4"}
        ours = result["methods"]["lamda-principal"]["accuracy"]
        assert ours["preservation"] < 1e-5
        assert ours["principal"] < 1e-3
        assert result["methods"]["pissa"]["accuracy"]["preservation"] < 1e-5


def test_bench_machine_tiny(tmp_path, monkeypatch):
    bench = load_script("bench_machine", monkeypatch)

    result = bench.main(["--size", "tiny", "--repeats", "1", "--work-dir", str(tmp_path)])

    assert result["matmul_gflops"]["median"] > 0
    assert result["copy_gbytes"]["median"] > 0
    assert result["file_read_gbytes"]["median"] > 0
    assert result["method_gflop"] > 0
    assert result["bound_s"] > 0
