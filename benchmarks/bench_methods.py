"""Compare per-matrix spectrum methods on Llama-2-7B-shaped float32 matrices.

Methods, each asked for the top ``--k`` singular values (default 64) of one float32 matrix:

- ``torch.linalg.svd`` and ``torch.linalg.svdvals``, called on the matrix as it is stored, so the
  wide 4096 x 11008 matrix pays the wide-matrix cost of torch's exact routines;
- ``gram eigvalsh``: ``torch.linalg.eigvalsh`` of the float32 Gram matrix of the smaller side;
- ``torch.svd_lowrank``: ``q=k``, ``niter=4``;
- ``lamda_spectra``: :func:`lamda_spectra.spectra.compute_spectrum` with ``k``, automatic method
  (the route it took is shown next to it).

Matrices: q_proj 4096 x 4096, gate_proj 11008 x 4096 and down_proj 4096 x 11008 from
``synthetic_weight`` in ``benchmarks/_common.py``, the weights of ``bench_scan.py``'s synthetic
Llama checkpoint (a Gaussian bulk plus decaying spikes). A Gaussian 4096 x 4096 matrix adds a
flat spectrum, the slowest case for Krylov methods. ``--size tiny`` uses 1152 and 3096 instead
of 4096 and 11008, for a smoke test.

Time: median (min-max) of ``--repeats`` runs; the methods take turns in each round so that load
from other processes hits them alike. ``--clock wall`` (the default) measures elapsed time.
``--clock cpu`` measures this process's CPU time instead: with ``--threads 1`` it is the cost of
each method even on a machine shared with other jobs, where elapsed times of multi-threaded
runs grow several-fold and unevenly. Errors: the largest ``|E(r0) - E_ref(r0)|`` over
``r0 = 1..k`` with ``E(r0) = sum_{i<r0} s_i^2 / ||W||_F^2``, and the largest relative error of
the top ``k`` values, both against ``torch.linalg.svdvals`` in float64 on the tall orientation.

Examples::

    .venv/bin/python benchmarks/bench_methods.py
    .venv/bin/python benchmarks/bench_methods.py --size tiny --repeats 1
    .venv/bin/python benchmarks/bench_methods.py --threads 1 --clock cpu
    .venv/bin/python benchmarks/bench_methods.py --methods lamda_spectra,torch.svd_lowrank --json out.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import markdown_table, show, stats  # noqa: E402

from lamda_spectra.spectra import compute_spectrum  # noqa: E402


@dataclass(frozen=True)
class MatrixCase:
    """One benchmark matrix: its name, shape and how to build it."""

    name: str
    d_out: int
    d_in: int
    kind: str  # a synthetic_weight module name ("q_proj", ...) or "gaussian"


SIZES = {
    "full": (4096, 11008),
    "tiny": (1152, 3096),
}


def cases(size: str) -> list[MatrixCase]:
    """Return the benchmark matrices for ``--size``."""
    hidden, intermediate = SIZES[size]
    return [
        MatrixCase(f"q_proj {hidden}x{hidden}", hidden, hidden, "q_proj"),
        MatrixCase(f"gate_proj {intermediate}x{hidden}", intermediate, hidden, "gate_proj"),
        MatrixCase(f"down_proj {hidden}x{intermediate}", hidden, intermediate, "down_proj"),
        MatrixCase(f"gaussian {hidden}x{hidden}", hidden, hidden, "gaussian"),
    ]


def build(case: MatrixCase, seed: int) -> torch.Tensor:
    """Return the float32 matrix of ``case``."""
    if case.kind == "gaussian":
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(case.d_out, case.d_in, generator=generator) * 0.02
    return _common.synthetic_weight(case.d_out, case.d_in, case.kind, seed=seed).contiguous()


def gram_eigvalsh(matrix: torch.Tensor, k: int) -> np.ndarray:
    tall = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T
    eigenvalues = torch.linalg.eigvalsh(tall.T @ tall)
    return eigenvalues.flip(0)[:k].clamp_min(0.0).sqrt().double().numpy()


def svd_lowrank(matrix: torch.Tensor, k: int) -> np.ndarray:
    torch.manual_seed(0)
    return torch.svd_lowrank(matrix, q=k, niter=4)[1].double().numpy()


def ours(matrix: torch.Tensor, k: int) -> tuple[np.ndarray, float, str]:
    spectrum = compute_spectrum(matrix, k)
    return spectrum.singular_values, spectrum.frobenius_sq, spectrum.method


# Each returns the top k values, or (values, ||W||_F^2, route) when it computes its own energy.
METHODS: dict[str, Callable[[torch.Tensor, int], object]] = {
    "torch.linalg.svd": lambda m, k: torch.linalg.svd(m, full_matrices=False)[1][:k].double().numpy(),
    "torch.linalg.svdvals": lambda m, k: torch.linalg.svdvals(m)[:k].double().numpy(),
    "gram eigvalsh": gram_eigvalsh,
    "torch.svd_lowrank": svd_lowrank,
    "lamda_spectra": ours,
}


def reference(matrix: torch.Tensor) -> tuple[np.ndarray, float]:
    """Return every singular value (float64 svdvals of the tall orientation) and ``||W||_F^2``."""
    tall = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T
    tall = tall.to(torch.float64)
    return torch.linalg.svdvals(tall).numpy(), float(torch.sum(tall * tall))


def errors(values: np.ndarray, total: float, exact: np.ndarray, exact_total: float, k: int) -> tuple[float, float]:
    """Return the largest energy-score error over r0 = 1..k and the largest relative value error."""
    ranks = range(1, k + 1)
    energy = _common.energy_scores(values, total, ranks)
    exact_energy = _common.energy_scores(exact, exact_total, ranks)
    relative = np.abs(np.asarray(values[:k]) - exact[:k]) / exact[:k]
    return float(np.max(np.abs(energy - exact_energy))), float(np.max(relative))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def bench_case(case: MatrixCase, methods: list[str], k: int, repeats: int, seed: int, clock: str) -> list[dict]:
    """Time every method on one matrix and measure its errors; one result row per method."""
    now = CLOCKS[clock]
    matrix = build(case, seed)
    started = time.perf_counter()
    exact, exact_total = reference(matrix)
    print(f"{case.name}: float64 reference in {time.perf_counter() - started:.1f} s", file=sys.stderr)

    times: dict[str, list[float]] = {name: [] for name in methods}
    outputs: dict[str, object] = {}
    for round_index in range(repeats):
        for name in methods:
            started = now()
            outputs[name] = METHODS[name](matrix, k)
            times[name].append(now() - started)
            print(f"  round {round_index + 1}: {name} {times[name][-1]:.2f} s", file=sys.stderr)

    rows = []
    for name in methods:
        output = outputs[name]
        values, total, route = output if isinstance(output, tuple) else (output, exact_total, "")
        energy_error, value_error = errors(np.asarray(values), total, exact, exact_total, k)
        rows.append(
            {
                "matrix": case.name,
                "method": name,
                "route": route,
                "time_s": stats(times[name]),
                "max_energy_error": energy_error,
                "max_value_rel_error": value_error,
            }
        )
    return rows


def table(rows: list[dict], clock: str) -> str:
    """Format the result rows as a markdown table, with the speed-up over torch.linalg.svd."""
    svd_time = {row["matrix"]: row["time_s"]["median"] for row in rows if row["method"] == "torch.linalg.svd"}
    body = []
    for row in rows:
        baseline = svd_time.get(row["matrix"])
        speedup = f"{baseline / row['time_s']['median']:.1f}x" if baseline else "-"
        method = f"{row['method']} ({row['route']})" if row["route"] else row["method"]
        body.append(
            [
                row["matrix"],
                method,
                show(row["time_s"]),
                speedup,
                f"{row['max_energy_error']:.1e}",
                f"{row['max_value_rel_error']:.1e}",
            ]
        )
    headers = ["matrix", "method", f"{clock} time s, median (min-max)", "vs svd", "max energy error",
               "max rel. value error"]
    return markdown_table(headers, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare per-matrix spectrum methods on 7B-shaped matrices.")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="matrix sizes (default: full)")
    parser.add_argument("--k", type=int, default=64, help="singular values per matrix (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method and matrix (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random matrices (default: 1)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="time to report: elapsed (wall) or this process's CPU time (cpu) (default: wall)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated methods to run (default: all of {', '.join(METHODS)})",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        parser.error(f"unknown methods {', '.join(unknown)}; choose from {', '.join(METHODS)}")

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    rows = []
    # threadpoolctl also limits the BLAS pool that torch's LAPACK calls may use.
    with threadpool_limits(args.threads):
        env = _common.environment()
        for case in cases(args.size):
            rows += bench_case(case, methods, args.k, args.repeats, args.seed, args.clock)

    print(f"Command: `{_common.regenerate_command('bench_methods.py', sys.argv[1:] if argv is None else argv)}`\n")
    print(_common.environment_markdown(env) + "\n")
    print(table(rows, args.clock))
    _common.write_json(args.json, {"environment": env, "settings": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
