"""Measure this machine's limits and compare the scan of the 2-block Llama-7B checkpoint with them.

Measured, each the median of ``--repeats`` runs with min and max:

- matmul: ``torch.mm`` of two float32 ``n x n`` matrices (``n = 4096``), ``2 n^3`` flops per call;
- memory copy: ``dst.copy_(src)`` of a 1 GiB float32 tensor, reported as bytes copied per second
  (each byte is read once and written once);
- file read: the checkpoint's ``model.safetensors`` read with ``readinto`` into a preallocated
  buffer, after one untimed read that puts it in the page cache;
- the scan: ``lamda_spectra.scan(folder, use_cache=False)`` in this process (no Python start-up),
  and once more under ``torch.profiler`` with ``with_flops=True`` to count the method's
  floating-point work and the CPU time of each torch operator. The profiler counts the flops of
  matrix products (mm, addmm, bmm; in-place addmm_ is counted here from its shapes) only, not of
  QR or eigensolvers.

Lower bound for a scan = target bytes read at memory-copy speed + counted flops at matmul speed.
A real scan also reads every byte from the file, upcasts it to float32 and runs QR and small
eigensolves, so the bound is loose by construction. The ratio shows how far above it the scan runs.

Extrapolation to Llama-2-7B (32 blocks with the same shapes): the 2-block figures times 16, since
every block holds the same 7 weights. The cost per weight depends on its spectrum (the number of
Krylov iterations), so real weights may take longer or shorter. The figure assumes page-cache
reads; reading 12.9 GB of bfloat16 target weights from a cold disk adds that size divided by the
disk's read speed, which this script does not measure.

Examples::

    .venv/bin/python benchmarks/bench_machine.py
    .venv/bin/python benchmarks/bench_machine.py --size tiny --repeats 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import markdown_table, show, stats  # noqa: E402

from lamda_spectra.scan import scan  # noqa: E402
from lamda_spectra.sources import open_source, select_targets  # noqa: E402
from lamda_spectra.spectra import compute_spectrum  # noqa: E402

SIZES = {
    # matmul side, copy bytes, checkpoint
    "full": (4096, 2**30, _common.LLAMA_7B_2_BLOCKS),
    "tiny": (256, 2**24, _common.LLAMA_TINY),
}
BLOCKS_7B = 32


def time_calls(function, repeats: int) -> list[float]:
    """Call ``function`` once untimed, then ``repeats`` times; return each call's seconds."""
    function()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return seconds


def matmul_gflops(n: int, repeats: int) -> dict:
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    return stats(2 * n**3 / s / 1e9 for s in time_calls(lambda: torch.mm(a, b, out=out), repeats))


def copy_gbytes(size: int, repeats: int) -> dict:
    source = torch.ones(size // 4)
    target = torch.empty_like(source)
    return stats(size / s / 1e9 for s in time_calls(lambda: target.copy_(source), repeats))


def file_read_gbytes(path: Path, repeats: int) -> dict:
    size = path.stat().st_size
    buffer = np.empty(size, dtype=np.uint8)

    def read() -> None:
        with open(path, "rb", buffering=0) as handle:
            view = memoryview(buffer)
            while view:
                count = handle.readinto(view)
                if not count:
                    break
                view = view[count:]

    return stats(size / s / 1e9 for s in time_calls(read, repeats))


def profile_method(folder: Path) -> tuple[int, int, dict[str, float]]:
    """Run the scan's method on every target under the profiler.

    Returns:
        ``(flops, target bytes read, seconds of self CPU time per torch operator)``.
    """
    weights = open_source(str(folder))
    flops, stored_bytes, operators = 0, 0, {}
    for target in select_targets(weights, None, None):
        stored = weights.read(target.tensor)
        stored_bytes += stored.numel() * stored.element_size()
        matrix = stored.float()
        del stored
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True, record_shapes=True
        ) as profile:
            compute_spectrum(matrix, min(64, *matrix.shape))
        for event in profile.key_averages(group_by_input_shape=True):
            flops += event.flops or _inplace_addmm_flops(event)
            operators[event.key] = operators.get(event.key, 0.0) + event.self_cpu_time_total / 1e6
    return flops, stored_bytes, operators


def _inplace_addmm_flops(event) -> int:
    """Count ``2 m k n`` flops per call of ``addmm_``, which the profiler (torch 2.13) leaves at 0."""
    if event.key != "aten::addmm_" or len(event.input_shapes) < 3:
        return 0
    (m, k), (_, n) = event.input_shapes[1], event.input_shapes[2]
    return 2 * m * k * n * event.count


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Measure the machine's limits and the scan's distance from them.")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full sizes, or tiny ones for a smoke test")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (default 3)")
    parser.add_argument("--work-dir", type=Path, default=_common.DEFAULT_WORK_DIR, help="checkpoint folder (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    env = _common.environment()
    n, copy_size, shape = SIZES[args.size]
    folder = _common.write_llama_checkpoint(shape, args.work_dir)
    print(f"[machine] load average {_common.load_average()}", file=sys.stderr, flush=True)
    matmul = matmul_gflops(n, args.repeats)
    copy = copy_gbytes(copy_size, args.repeats)
    read = file_read_gbytes(folder / "model.safetensors", args.repeats)
    print(f"[machine] scans next, load average {_common.load_average()}", file=sys.stderr, flush=True)
    scan_times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        scan(folder, use_cache=False)
        scan_times.append(time.perf_counter() - started)
    scan_s = stats(scan_times)
    flops, stored_bytes, operators = profile_method(folder)

    bound_read = stored_bytes / (copy["median"] * 1e9)
    bound_flops = flops / (matmul["median"] * 1e9)
    bound = bound_read + bound_flops
    result = {
        "matmul_gflops": matmul,
        "copy_gbytes": copy,
        "file_read_gbytes": read,
        "checkpoint_bytes": (folder / "model.safetensors").stat().st_size,
        "target_bytes": stored_bytes,
        "method_gflop": flops / 1e9,
        "scan_s": scan_s,
        "bound_read_s": bound_read,
        "bound_flops_s": bound_flops,
        "bound_s": bound,
        "blocks": shape.layers,
        "operator_s": dict(sorted(operators.items(), key=lambda item: -item[1])),
    }
    print(tables(result, n, args.size))
    print()
    print(_common.environment_markdown(env) + f"\n- load average at end: {_common.load_average()}")
    print(f"\nRegenerate: `{_common.regenerate_command('bench_machine.py', sys.argv[1:] if argv is None else argv)}`")
    _common.write_json(args.json, {"environment": env, "result": result})
    return result


def tables(r: dict, n: int, size: str) -> str:
    limits = markdown_table(
        ["measurement", "median (min-max)"],
        [
            [f"float32 torch.mm {n}^3, GFLOP/s", show(r["matmul_gflops"], 1)],
            ["memory copy (torch copy_), GB/s copied", show(r["copy_gbytes"], 2)],
            [f"file read from page cache ({r['checkpoint_bytes'] / 1e9:.2f} GB), GB/s", show(r["file_read_gbytes"], 2)],
        ],
    )
    scale = BLOCKS_7B / r["blocks"]
    bound = markdown_table(
        ["quantity", f"{r['blocks']} blocks", "32 blocks (x16, estimate)"],
        [
            ["target bytes read (bfloat16), GB", f"{r['target_bytes'] / 1e9:.2f}", f"{r['target_bytes'] * scale / 1e9:.1f}"],
            ["method matmul work, GFLOP", f"{r['method_gflop']:.3g}", f"{r['method_gflop'] * scale:.3g}"],
            ["bound: bytes at copy speed, s", f"{r['bound_read_s']:.2f}", f"{r['bound_read_s'] * scale:.1f}"],
            ["bound: flops at matmul speed, s", f"{r['bound_flops_s']:.2f}", f"{r['bound_flops_s'] * scale:.1f}"],
            ["lower bound, s", f"{r['bound_s']:.2f}", f"{r['bound_s'] * scale:.1f}"],
            ["scan (in process, no cache), s", show(r["scan_s"]), f"{r['scan_s']['median'] * scale:.0f}"],
            ["scan / lower bound", f"{r['scan_s']['median'] / r['bound_s']:.1f}x", ""],
        ],
    )
    total = sum(r["operator_s"].values())
    operators = markdown_table(
        ["torch operator (profiled method run)", "self CPU s", "share"],
        [[name, f"{seconds:.2f}", f"{seconds / total:.0%}"] for name, seconds in list(r["operator_s"].items())[:8]],
    )
    return f"{limits}\n\n{bound}\n\n{operators}"


if __name__ == "__main__":
    main()
