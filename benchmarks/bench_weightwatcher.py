"""Benchmark the lamda_spectra scan against WeightWatcher's ``analyze()`` on the same weights.

Each tool runs in its own child process (at ``--size tiny``, in this process), the two
alternating ``--repeats`` times:

- ``lamda``: ``lamda_spectra.scan(folder, use_cache=False)``, streaming one tensor at a time;
- ``weightwatcher``: ``transformers`` loads the whole model in its stored dtype, then
  ``WeightWatcher(model).analyze()``, which computes every singular value of each layer in
  float64 with SciPy on a CPU (weightwatcher 0.7.7).

Measured: wall time of the whole child (interpreter start and imports included), wall time after
the imports (model loading included for WeightWatcher, shown apart too), and the child's peak RSS.
Agreement: WeightWatcher reports eigenvalues of ``W^T W``, so its ``norm`` is ``||W||_F^2``, its
``spectral_norm`` is ``s_1^2`` and its ``stable_rank`` their ratio. The script compares each with
the scan's values on every module both report.

On the synthetic 2-block Llama-7B checkpoint, one full ``analyze()`` takes many minutes on 2 CPU
cores, so by default (``--ww-layers sample``) WeightWatcher analyses only the first module of
each stored shape of a Llama-shaped checkpoint (q_proj, gate_proj, down_proj), one
``analyze(layers=[id])`` call each. Its time for all 14 modules is then the model loading time
plus each call's time multiplied by the number of modules of that shape (its wall time with
imports gets the same correction), and the agreement covers those 3 modules. ``--ww-layers all`` runs the full ``analyze()`` instead. MiniLM always gets the
full ``analyze()``.

Examples::

    .venv/bin/python benchmarks/bench_weightwatcher.py
    .venv/bin/python benchmarks/bench_weightwatcher.py --models minilm --repeats 5
    .venv/bin/python benchmarks/bench_weightwatcher.py --size tiny --repeats 1
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
METRICS = ("norm", "spectral_norm", "stable_rank")


def lamda_worker(folder: Path) -> dict:
    """Scan ``folder`` without the spectra cache; return timings and per-module metrics."""
    from lamda_spectra.scan import scan

    imported = time.perf_counter()
    table = scan(folder, use_cache=False)
    done = time.perf_counter()
    metrics = {
        row.module: {
            "norm": row.frobenius_norm**2,
            "spectral_norm": row.spectral_norm**2,
            "stable_rank": row.stable_rank,
        }
        for row in table.itertuples()
    }
    return {"import_s": imported - _STARTED, "run_s": done - imported, "load_s": 0.0, "metrics": metrics}


def load_model(folder: Path):
    """Load a checkpoint folder with transformers in its stored dtype, as a WeightWatcher user would."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    loader = transformers.AutoModelForCausalLM if config.model_type == "llama" else transformers.AutoModel
    return loader.from_pretrained(folder, dtype="auto")


def weightwatcher_worker(folder: Path, sample: dict[str, int] | None) -> dict:
    """Analyse ``folder`` with WeightWatcher; ``sample`` maps module names to the counts they stand for."""
    import transformers  # noqa: F401 - part of the import time a WeightWatcher user pays
    import weightwatcher

    imported = time.perf_counter()
    model = load_model(folder)
    watcher = weightwatcher.WeightWatcher(model=model)
    loaded = time.perf_counter()
    if sample is None:
        details = watcher.analyze()
        estimated = time.perf_counter() - imported
    else:
        ids = watcher.describe().set_index("longname")["layer_id"]
        frames, estimated = [], loaded - imported
        for module, count in sample.items():
            started = time.perf_counter()
            frames.append(watcher.analyze(layers=[int(ids[module])]))
            estimated += (time.perf_counter() - started) * count
        import pandas as pd

        details = pd.concat(frames)
    metrics = {row["longname"]: {metric: float(row[metric]) for metric in METRICS} for _, row in details.iterrows()}
    return {
        "import_s": imported - _STARTED,
        "run_s": estimated,
        # The parent adds this to the child's wall time, so that a sampled run's total is estimated too.
        "unmeasured_s": estimated - (time.perf_counter() - imported),
        "load_s": loaded - imported,
        "metrics": metrics,
    }


def common_modules(ours: dict, theirs: dict) -> dict[str, str]:
    """Match our module names to WeightWatcher's, which may lack or add a model prefix."""
    matches = {}
    for module in ours:
        for name in theirs:
            if module == name or module.endswith("." + name) or name.endswith("." + module):
                matches[module] = name
                break
    return matches


def sample_modules(folder: Path) -> dict[str, int]:
    """Return the first module of each stored weight shape and the number of modules of that shape."""
    from lamda_spectra.sources import open_source, select_targets

    weights = open_source(str(folder))
    first, counts = {}, {}
    for target in select_targets(weights, None, None):
        first.setdefault(target.shape, target.module)
        counts[target.shape] = counts.get(target.shape, 0) + 1
    return {module: counts[shape] for shape, module in first.items()}


def run_worker(tool: str, folder: Path, sample: dict | None, work_dir: Path, in_process: bool) -> dict:
    import _common

    if in_process:  # the smoke test's shortcut: imports are then shared and RSS figures overlap
        started = time.perf_counter()
        result = lamda_worker(folder) if tool == "lamda" else weightwatcher_worker(folder, sample)
        wall = time.perf_counter() - started + result.get("unmeasured_s", 0.0)
        return result | {"wall_s": wall, "peak_rss_bytes": _common.peak_rss_bytes()}
    command = [sys.executable, __file__, "--worker", tool, "--folder", str(folder)]
    if sample is not None:
        command += ["--sample", json.dumps(sample)]
    scratch = work_dir / "ww-scratch"  # WeightWatcher may write images or logs into its working folder
    scratch.mkdir(parents=True, exist_ok=True)
    child = _common.run_child(command, cwd=scratch).check(command)
    result = child.json_output()
    return result | {"wall_s": child.wall_s + result.get("unmeasured_s", 0.0), "peak_rss_bytes": child.peak_rss_bytes}


def agreement(ours: dict, theirs: dict) -> dict:
    """Return the max relative difference of each shared metric over the common modules."""
    matches = common_modules(ours, theirs)
    worst = {metric: 0.0 for metric in METRICS}
    for module, name in matches.items():
        for metric in METRICS:
            reference = theirs[name][metric]
            difference = abs(ours[module][metric] - reference) / abs(reference)
            worst[metric] = max(worst[metric], difference)
    return {"common": len(matches), "ours": len(ours), "theirs": len(theirs), "max_rel_diff": worst}


def benchmark_model(name: str, folder: Path, args: argparse.Namespace) -> dict:
    import _common

    sample = sample_modules(folder) if args.ww_layers == "sample" and name.startswith("llama") else None
    runs = {"lamda": [], "weightwatcher": []}
    for index in range(args.repeats):
        print(f"[{name}] run {index + 1}/{args.repeats}, load average {_common.load_average()}", file=sys.stderr, flush=True)
        in_process = args.size == "tiny"
        runs["lamda"].append(run_worker("lamda", folder, None, args.work_dir, in_process))
        runs["weightwatcher"].append(run_worker("weightwatcher", folder, sample, args.work_dir, in_process))
    summary = {
        tool: {
            "wall_s": _common.stats(r["wall_s"] for r in tool_runs),
            "run_s": _common.stats(r["run_s"] for r in tool_runs),
            "load_s": _common.stats(r["load_s"] for r in tool_runs),
            "peak_rss_bytes": _common.stats(r["peak_rss_bytes"] for r in tool_runs),
        }
        for tool, tool_runs in runs.items()
    }
    ours, theirs = runs["lamda"][-1]["metrics"], runs["weightwatcher"][-1]["metrics"]
    return {"model": name, "sample": sample, "tools": summary, "agreement": agreement(ours, theirs)}


def ratio(numerator: dict, denominator: dict) -> str:
    middle = numerator["median"] / denominator["median"]
    if numerator["n"] == 1:
        return f"{middle:.1f}x"
    return f"{middle:.1f}x ({numerator['min'] / denominator['max']:.1f}-{numerator['max'] / denominator['min']:.1f})"


def tables(results: list[dict]) -> str:
    from _common import markdown_table, show

    mib = 1 / 2**20
    speed = markdown_table(
        ["model", "WW / lamda, imports excluded", "WW / lamda, imports included", "WW / lamda peak RSS",
         "lamda s (excl.)", "WW s (excl.)", "WW model load s", "lamda s (incl.)", "WW s (incl.)",
         "lamda peak RSS MB", "WW peak RSS MB"],
        [
            [r["model"], ratio(r["tools"]["weightwatcher"]["run_s"], r["tools"]["lamda"]["run_s"]),
             ratio(r["tools"]["weightwatcher"]["wall_s"], r["tools"]["lamda"]["wall_s"]),
             ratio(r["tools"]["weightwatcher"]["peak_rss_bytes"], r["tools"]["lamda"]["peak_rss_bytes"]),
             show(r["tools"]["lamda"]["run_s"]), show(r["tools"]["weightwatcher"]["run_s"]),
             show(r["tools"]["weightwatcher"]["load_s"]), show(r["tools"]["lamda"]["wall_s"]),
             show(r["tools"]["weightwatcher"]["wall_s"]), show(r["tools"]["lamda"]["peak_rss_bytes"], 0, mib),
             show(r["tools"]["weightwatcher"]["peak_rss_bytes"], 0, mib)]
            for r in results
        ],
    )
    agree = markdown_table(
        ["model", "common modules", "max rel. diff norm = ||W||_F^2", "max rel. diff spectral_norm = s_1^2",
         "max rel. diff stable_rank"],
        [
            [r["model"], f"{r['agreement']['common']} (lamda {r['agreement']['ours']}, WW {r['agreement']['theirs']})"]
            + [f"{r['agreement']['max_rel_diff'][metric]:.1e}" for metric in METRICS]
            for r in results
        ],
    )
    notes = [
        f"- {r['model']}: WeightWatcher timed on {', '.join(f'{m} x{c}' for m, c in r['sample'].items())}; "
        "its time excluding imports is model loading plus each call's time times its count."
        for r in results
        if r["sample"]
    ]
    return "\n\n".join([speed, agree] + (["\n".join(notes)] if notes else []))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Benchmark the lamda_spectra scan against WeightWatcher.")
    parser.add_argument("--size", choices=["full", "tiny"], default="full", help="full checkpoints, or a tiny one for a smoke test")
    parser.add_argument("--models", nargs="+", choices=["minilm", "llama"], default=["minilm", "llama"])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tool (default 3)")
    parser.add_argument("--ww-layers", choices=["sample", "all"], default="sample", help="WeightWatcher on the 7B-shaped checkpoint: one module per shape, or all")
    parser.add_argument("--work-dir", type=Path, help="checkpoints and scratch (default /tmp/lamda_bench)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--worker", choices=["lamda", "weightwatcher"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sample", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "lamda":
        print(json.dumps(lamda_worker(args.folder)))
        return []
    if args.worker == "weightwatcher":
        print(json.dumps(weightwatcher_worker(args.folder, args.sample)))
        return []

    sys.path.insert(0, str(HERE))
    import _common

    args.work_dir = args.work_dir or _common.DEFAULT_WORK_DIR
    env = _common.environment()
    if args.size == "tiny":
        folders = {"llama-tiny-2-blocks": _common.write_llama_checkpoint(_common.LLAMA_TINY, args.work_dir)}
    else:
        folders = {}
        if "minilm" in args.models:
            folders["all-MiniLM-L6-v2"] = _common.minilm_path()
        if "llama" in args.models:
            folders["llama-7b-2-blocks"] = _common.write_llama_checkpoint(_common.LLAMA_7B_2_BLOCKS, args.work_dir)
    results = [benchmark_model(name, folder, args) for name, folder in folders.items()]
    print(tables(results))
    print()
    print(_common.environment_markdown(env) + f"\n- load average at end: {_common.load_average()}")
    print(f"\nRegenerate: `{_common.regenerate_command('bench_weightwatcher.py', sys.argv[1:] if argv is None else argv)}`")
    _common.write_json(args.json, {"environment": env, "results": results})
    return results


if __name__ == "__main__":
    main()
