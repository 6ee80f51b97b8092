"""Benchmark the ``lamda-plan`` scan against per-matrix ``torch.linalg.svd`` and ``svdvals``.

For each model the script measures:

- ``lamda-plan MODEL --no-report --json`` as a child process: wall time (Python start-up and
  imports included), the scan's own wall time from its JSON summary, and peak RSS. A cold run
  gets a fresh ``--cache-dir``; the warm run after it reuses that folder, so it computes no SVD.
  Each round runs cold, warm, then the per-matrix baselines below, ``--repeats`` rounds in all,
  so that load from other processes on the machine affects every tool alike.
- ``torch.linalg.svd`` and ``torch.linalg.svdvals`` in float32 on the same weights, each upcast
  and transposed to the tall orientation before the clock starts. Reading the weights is not
  timed, which favours these baselines. When a model has weights whose smaller side exceeds
  1024, only the first module of each tall shape is timed, and its median is multiplied by the
  number of modules of that shape. The cost of an exact SVD depends on the shape and hardly on
  the values. Otherwise every module is timed.
- Energy-score errors ``|E(r0) - E_ref(r0)|`` with ``E(r0) = sum_{i<r0} s_i^2 / ||W||_F^2`` and
  relative errors of the top 64 singular values, each against a float64 reference (see
  ``_common.reference_singular_values``). ``lamda-plan``'s values come from its spectra.csv.

Models: the real all-MiniLM-L6-v2 (36 modules) and a synthetic bfloat16 checkpoint of 2
Llama-2-7B blocks (14 modules, about 0.8 GB, written once under ``--work-dir``).
``--size tiny`` replaces both by a 2-block Llama-shaped checkpoint with hidden size 128.

Examples::

    .venv/bin/python benchmarks/bench_scan.py
    .venv/bin/python benchmarks/bench_scan.py --models llama --repeats 5
    .venv/bin/python benchmarks/bench_scan.py --size tiny --repeats 1 --json out.json
    .venv/bin/python benchmarks/bench_scan.py --models llama --device cuda   # not yet run on a GPU
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import LLAMA_7B_2_BLOCKS, LLAMA_TINY, markdown_table, show, stats  # noqa: E402

from lamda_spectra.scan import read_spectra_csv  # noqa: E402
from lamda_spectra.sources import open_source, select_targets  # noqa: E402

# Base ranks at which energy scores are compared: the default plan's r0 (avg:16) and the other
# ranks a plan may give a module, up to the default top_k of 64.
R0_VALUES = (1, 4, 8, 16, 32, 64)
TOP_VALUES = 64
# Largest smaller side at which every module is timed instead of one per shape.
TIME_EVERY_MODULE_MAX_DIM = 1024


def model_folders(size: str, models: list[str], work_dir: Path) -> dict[str, Path]:
    """Return benchmark name to checkpoint folder, writing synthetic checkpoints when missing."""
    if size == "tiny":
        return {"llama-tiny-2-blocks": _common.write_llama_checkpoint(LLAMA_TINY, work_dir)}
    folders = {}
    if "minilm" in models:
        folders["all-MiniLM-L6-v2"] = _common.minilm_path()
    if "llama" in models:
        folders["llama-7b-2-blocks"] = _common.write_llama_checkpoint(LLAMA_7B_2_BLOCKS, work_dir)
    return folders


def plan_command(folder: Path, cache_dir: Path, output: Path, device: str) -> list[str]:
    return [
        sys.executable, "-m", "lamda_spectra.cli", str(folder), "--device", device,
        "--no-report", "--json", "--cache-dir", str(cache_dir), "-o", str(output / "plan.json"),
    ]


ROUTINES = {
    "torch.linalg.svd": lambda matrix: torch.linalg.svd(matrix, full_matrices=False)[1],
    "torch.linalg.svdvals": torch.linalg.svdvals,
}


def lamda_plan_round(name: str, folder: Path, scratch: Path, device: str) -> dict:
    """Run ``lamda-plan`` cold (fresh cache folder) then warm (same folder); return both runs."""
    shutil.rmtree(scratch, ignore_errors=True)
    runs = {}
    for phase in ("cold", "warm"):
        command = plan_command(folder, scratch / "cache", scratch / phase, device)
        child = _common.run_child(command, cwd=_common.ROOT).check(command)
        summary = child.json_output()
        expected = "spectra_computed" if phase == "cold" else "spectra_cached"
        if summary[expected] != summary["modules"]:
            raise RuntimeError(f"{phase} run of {name} has {summary}; expected every spectrum {expected}")
        runs[phase] = {"wall_s": child.wall_s, "tool_s": summary["wall_seconds"], "peak_rss_bytes": child.peak_rss_bytes}
    return runs


def timed_targets(targets) -> tuple[list, dict]:
    """Choose the modules to time and the count each one stands for."""
    def tall(target):
        return tuple(sorted(target.shape, reverse=True))

    if max(min(target.shape) for target in targets) <= TIME_EVERY_MODULE_MAX_DIM:
        return list(targets), {target.module: 1 for target in targets}
    chosen, counts = {}, {}
    for target in targets:
        chosen.setdefault(tall(target), target)
        counts[tall(target)] = counts.get(tall(target), 0) + 1
    return list(chosen.values()), {target.module: counts[shape] for shape, target in chosen.items()}


def per_matrix_round(weights, chosen, seconds: dict, values: dict, device: str) -> None:
    """Time each routine once on each chosen module, appending to ``seconds`` and keeping the values."""
    for target in chosen:
        matrix = _common.tall_matrix(weights, target).to(device)
        for routine, function in ROUTINES.items():
            _synchronize(device)
            started = time.perf_counter()
            result = function(matrix)
            _synchronize(device)
            seconds[routine][target.module].append(time.perf_counter() - started)
            values[routine][target.module] = result.double().cpu().numpy()
        del matrix


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def per_matrix_totals(seconds: dict, counts: dict, repeats: int) -> dict:
    """Sum the per-module medians (and mins, maxes), each times the count of modules of its shape."""
    totals = {}
    for routine, by_module in seconds.items():
        per_module = {module: stats(times) for module, times in by_module.items()}
        totals[routine] = {
            key: sum(summary[key] * counts[module] for module, summary in per_module.items())
            for key in ("median", "min", "max")
        } | {"n": repeats}
    return totals


def errors_against(reference: dict, values: dict, energies: dict | None = None) -> dict:
    """Return the max energy-score errors and top-value relative error over the modules in ``values``.

    ``energies`` gives each module's total energy ``||W||_F^2``; without it a module's own
    values (then a full spectrum) give the total.
    """
    energy_error = np.zeros(len(R0_VALUES))
    value_error = 0.0
    for module, found in values.items():
        exact = reference[module]
        exact_scores = _common.energy_scores(exact, float(np.sum(exact**2)), R0_VALUES)
        total = energies[module] if energies is not None else float(np.sum(found**2))
        scores = _common.energy_scores(found, total, R0_VALUES)
        energy_error = np.maximum(energy_error, np.abs(scores - exact_scores))
        k = min(TOP_VALUES, len(found), len(exact))
        top = exact[:k]
        relative = np.abs(found[:k] - top) / np.where(top > 0, top, 1.0)
        value_error = max(value_error, float(relative.max()))
    return {
        "modules": len(values),
        "energy_error_r16": float(energy_error[R0_VALUES.index(16)]),
        "energy_error_max": float(energy_error.max()),
        "value_rel_error_max": value_error,
    }


def measure_accuracy(spectra_csv: Path, reference: dict, values: dict) -> tuple[dict, list[str]]:
    """Compare lamda-plan's spectra.csv and the per-matrix values with the reference.

    Returns:
        ``(errors per tool, the spectrum methods lamda-plan used)``.
    """
    spectra = read_spectra_csv(spectra_csv)
    methods = sorted(set(spectra["method"]))
    spectra = spectra.set_index("module")
    lamda_values = {module: np.asarray(spectra.at[module, "singular_values"]) for module in reference}
    lamda_energy = {module: float(spectra.at[module, "frobenius_norm"]) ** 2 for module in reference}
    accuracy = {"lamda-plan": errors_against(reference, lamda_values, lamda_energy)}
    for routine, routine_values in values.items():
        accuracy[routine] = errors_against(reference, routine_values)
    return accuracy, methods


def benchmark_model(name: str, folder: Path, args: argparse.Namespace) -> dict:
    weights = open_source(str(folder))
    targets = select_targets(weights, None, None)
    largest = max(t.shape[0] * t.shape[1] for t in targets)
    print(f"[{name}] {len(targets)} modules, load average {_common.load_average()}", file=sys.stderr, flush=True)

    chosen, counts = timed_targets(targets)
    # The first call of each routine pays one-off set-up costs (threads, LAPACK workspace queries).
    for function in ROUTINES.values():
        function(torch.randn(64, 32, device=args.device))
    runs = {"cold": [], "warm": []}
    seconds = {routine: {target.module: [] for target in chosen} for routine in ROUTINES}
    values = {routine: {} for routine in ROUTINES}
    # Rounds interleave the tools, so that load from other processes affects them alike.
    for index in range(args.repeats):
        scratch = args.work_dir / "runs" / name / str(index)
        for phase, run in lamda_plan_round(name, folder, scratch, args.device).items():
            runs[phase].append(run)
        per_matrix_round(weights, chosen, seconds, values, args.device)
        print(f"[{name}] round {index + 1}/{args.repeats} done, load average {_common.load_average()}", file=sys.stderr, flush=True)
    reference = {
        t.module: _common.reference_singular_values(weights, t, args.work_dir, args.reference) for t in targets
    }

    accuracy, methods = measure_accuracy(scratch / "cold" / "spectra.csv", reference, values)
    return {
        "model": name,
        "modules": len(targets),
        "checkpoint_bytes": sum(path.stat().st_size for path in weights.files),
        "rss_bound_bytes": 4 * largest * 4 + 600 * 2**20,
        "cold_wall_s": stats(r["wall_s"] for r in runs["cold"]),
        "warm_wall_s": stats(r["wall_s"] for r in runs["warm"]),
        "cold_tool_s": stats(r["tool_s"] for r in runs["cold"]),
        "warm_tool_s": stats(r["tool_s"] for r in runs["warm"]),
        "cold_rss_bytes": stats(r["peak_rss_bytes"] for r in runs["cold"]),
        "warm_rss_bytes": stats(r["peak_rss_bytes"] for r in runs["warm"]),
        "per_matrix_s": per_matrix_totals(seconds, counts, args.repeats),
        "per_matrix_timed": [target.module for target in chosen],
        "per_matrix_counts": counts,
        "accuracy": accuracy,
        "methods": methods,
    }


def ratio(numerator: dict, denominator: dict) -> str:
    """Format ``numerator / denominator`` as the ratio of medians, with the worst and best pairing."""
    middle = numerator["median"] / denominator["median"]
    digits = 1 if middle >= 10 else 2
    if numerator["n"] == 1 and denominator["n"] == 1:
        return f"{middle:.{digits}f}x"
    low, high = numerator["min"] / denominator["max"], numerator["max"] / denominator["min"]
    return f"{middle:.{digits}f}x ({low:.{digits}f}-{high:.{digits}f})"


def tables(results: list[dict]) -> str:
    mib = 1 / 2**20
    speed = markdown_table(
        ["model", "modules", "svd / lamda-plan cold", "svdvals / lamda-plan cold", "lamda-plan cold s",
         "scan in tool s", "lamda-plan warm s", "svd s", "svdvals s"],
        [
            [r["model"], r["modules"], ratio(r["per_matrix_s"]["torch.linalg.svd"], r["cold_wall_s"]),
             ratio(r["per_matrix_s"]["torch.linalg.svdvals"], r["cold_wall_s"]), show(r["cold_wall_s"]),
             show(r["cold_tool_s"]), show(r["warm_wall_s"]), show(r["per_matrix_s"]["torch.linalg.svd"], 1),
             show(r["per_matrix_s"]["torch.linalg.svdvals"], 1)]
            for r in results
        ],
    )
    memory = markdown_table(
        ["model", "checkpoint MB", "peak RSS cold MB", "peak RSS warm MB", "bound 4 x largest fp32 + 600 MB"],
        [
            [r["model"], f"{r['checkpoint_bytes'] * mib:.0f}", show(r["cold_rss_bytes"], 0, mib),
             show(r["warm_rss_bytes"], 0, mib), f"{r['rss_bound_bytes'] * mib:.0f}"]
            for r in results
        ],
    )
    accuracy = markdown_table(
        ["model", "method", "modules checked", "max energy error r0=16", "max energy error r0<=64",
         "max rel. error top-64 values"],
        [
            [r["model"], method, a["modules"], f"{a['energy_error_r16']:.1e}", f"{a['energy_error_max']:.1e}",
             f"{a['value_rel_error_max']:.1e}"]
            for r in results
            for method, a in r["accuracy"].items()
        ],
    )
    notes = []
    for r in results:
        if len(r["per_matrix_timed"]) < r["modules"]:
            counted = ", ".join(f"{module} x{r['per_matrix_counts'][module]}" for module in r["per_matrix_timed"])
            notes.append(f"- {r['model']}: per-matrix times are medians on {counted}, multiplied by those counts.")
        notes.append(f"- {r['model']}: lamda-plan methods used: {', '.join(r['methods'])}.")
    return "\n\n".join([speed, memory, accuracy, "\n".join(notes)])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Benchmark lamda-plan against per-matrix torch.linalg.svd.")
    parser.add_argument("--size", choices=["full", "tiny"], default="full", help="full checkpoints, or tiny ones for a smoke test")
    parser.add_argument("--models", nargs="+", choices=["minilm", "llama"], default=["minilm", "llama"])
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (default 3)")
    parser.add_argument("--work-dir", type=Path, default=_common.DEFAULT_WORK_DIR, help="checkpoints, references and scratch (default %(default)s)")
    parser.add_argument("--reference", choices=_common.REFERENCE_METHODS, default="gram", help="float64 reference routine (default gram)")
    parser.add_argument("--device", default="cpu", help="where lamda-plan and the per-matrix SVDs run: cpu or cuda (default cpu)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    env = _common.environment()
    results = [benchmark_model(name, folder, args) for name, folder in model_folders(args.size, args.models, args.work_dir).items()]
    print(tables(results))
    print()
    print(_common.environment_markdown(env) + f"\n- load average at end: {_common.load_average()}")
    print(f"\nRegenerate: `{_common.regenerate_command('bench_scan.py', sys.argv[1:] if argv is None else argv)}`")
    _common.write_json(args.json, {"environment": env, "results": results})
    return results


if __name__ == "__main__":
    main()
