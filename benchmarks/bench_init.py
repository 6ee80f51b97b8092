"""Benchmark LaMDA's principal initialisation against PEFT's PiSSA initialisations.

Three initialisations of the same modules at the same ranks (an ``energy`` plan at ``--budget``):

- ``lamda-principal``: ``apply_plan(model, plan, init="principal")``, whose top-``r`` factors
  come from ``lamda_spectra.spectra.top_svd``;
- ``pissa``: PEFT ``LoraConfig(init_lora_weights="pissa")``, a full float32 ``torch.linalg.svd``
  of every weight;
- ``pissa_niter_4``: PEFT ``init_lora_weights="pissa_niter_4"``, ``torch.svd_lowrank`` with
  ``q = r`` and 4 subspace iterations.

Each run is a child process (at ``--size tiny``, a call in this process) that builds the model, resets its peak RSS (``/proc/self/clear_refs``)
and times the initialisation alone. The methods alternate, ``--repeats`` times. Reported: init
wall time, the peak RSS the init adds over the built model, and per module, against a float64
reference (eigendecomposition of the float64 Gram matrix of the weight's smaller side, cached
under ``--work-dir``):

- preservation error ``||W - W_res - D||_F / ||W||_F``, with ``W_res`` the residual base weight
  and ``D`` the adapter's initial product: the model's output change at step 0;
- principal error ``||D - U_r S_r Vh_r||_F / ||U_r S_r Vh_r||_F`` against the exact top-``r``
  part, which is ``||W - W_res - U_r S_r Vh_r||`` whenever the preservation error is zero;
- subspace error: the sine of the largest principal angle between the adapter's top-``r`` left
  (and right) singular subspace and the exact one, the larger of the two.

Models: the real all-MiniLM-L6-v2 (36 modules) and a Llama-shaped model (hidden 2048,
intermediate 5632, 4 layers; 28 modules) whose projections are replaced by the synthetic weights
of ``_common.synthetic_weight`` (a Gaussian bulk plus a decaying head). ``--size tiny`` runs a
tiny BERT and a tiny Llama.

Examples::

    .venv/bin/python benchmarks/bench_init.py
    .venv/bin/python benchmarks/bench_init.py --models llama --repeats 5
    .venv/bin/python benchmarks/bench_init.py --size tiny --repeats 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import LlamaShape, markdown_table, show, stats  # noqa: E402

from lamda_spectra.adapter import apply_plan  # noqa: E402
from lamda_spectra.plan import load_plan, plan  # noqa: E402

METHODS = ("lamda-principal", "pissa", "pissa_niter_4")
LLAMA_SHAPES = {"full": LlamaShape(hidden=2048, intermediate=5632, layers=4), "tiny": _common.LLAMA_TINY}
MODELS = {"full": ("minilm", "llama"), "tiny": ("bert-tiny", "llama")}


def build_model(model: str, size: str) -> nn.Module:
    """Build a model in float32; every build of the same model is identical."""
    torch.manual_seed(0)
    if model == "minilm":
        from transformers import BertModel

        return BertModel.from_pretrained(_common.minilm_path()).float()
    if model == "bert-tiny":
        from transformers import BertConfig, BertModel

        return BertModel(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128))
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = LLAMA_SHAPES[size]
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=max(1, shape.hidden // 128),
        num_key_value_heads=max(1, shape.hidden // 128),
        tie_word_embeddings=False,
    )
    network = LlamaForCausalLM(config)
    with torch.no_grad():
        for seed, name in enumerate(target_names(network), start=1):
            weight = network.get_submodule(name).weight
            weight.copy_(_common.synthetic_weight(*weight.shape, name, seed=seed))
    return network


def target_names(model: nn.Module) -> list[str]:
    """Return the linear layers inside the repeated blocks."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and (".layer." in name or ".layers." in name)
    ]


def exact_factors(weight: torch.Tensor, k: int) -> dict:
    """Return every singular value and the top-``k`` singular vectors of ``weight``, in float64.

    The values and one side's vectors come from ``eigh`` of the float64 Gram matrix of the smaller
    side; the other side's vectors are ``W v_i / s_i``.
    """
    matrix = weight.detach().double()
    tall = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T
    eigenvalues, vectors = torch.linalg.eigh(tall.T @ tall)
    values = eigenvalues.clamp_min(0.0).sqrt().flip(0)
    small_side = vectors.flip(1)[:, :k]
    large_side = (tall @ small_side) / values[:k]
    if tall is matrix:
        left, right = large_side, small_side
    else:
        left, right = small_side, large_side
    return {"S": values, "U": left, "V": right}


def reference(model_key: str, size: str, work_dir: Path, budget: str) -> tuple[Path, Path]:
    """Compute (once) the float64 reference factors and the energy plan; return their paths."""
    folder = work_dir / "init" / f"{model_key}-{size}"
    factors_path, plan_path = folder / "reference.pt", folder / f"plan-{budget.replace(':', '-')}.json"
    if factors_path.is_file() and plan_path.is_file():
        return factors_path, plan_path
    network = build_model(model_key, size)
    factors, rows = {}, []
    for name in target_names(network):
        weight = network.get_submodule(name).weight
        exact = exact_factors(weight, min(64, *weight.shape))
        factors[name] = exact
        values = exact["S"].numpy()
        rows.append(
            {
                "module": name,
                "layout": "linear",
                "d_out": int(weight.shape[0]),
                "d_in": int(weight.shape[1]),
                "frobenius_norm": float(np.sqrt(np.sum(values**2))),
                "spectral_norm": float(values[0]),
                "stable_rank": float(np.sum(values**2) / values[0] ** 2),
                "singular_values": values,
            }
        )
    table = pd.DataFrame(rows)
    table.attrs["source"] = {"kind": "folder", "path": "in-memory", "model_name": model_key}
    folder.mkdir(parents=True, exist_ok=True)
    plan(table, budget=budget, strategy="energy").save(plan_path)
    torch.save(factors, factors_path)
    return factors_path, plan_path


def initialise(method: str, network: nn.Module, rank_plan) -> nn.Module:
    """Initialise the adapters of ``method`` in place (PEFT returns a wrapper model)."""
    if method == "lamda-principal":
        apply_plan(network, rank_plan, init="principal", freeze_fraction=0.0)
        return network
    from peft import LoraConfig, get_peft_model

    ranks = rank_plan.ranks
    default = int(np.bincount(list(ranks.values())).argmax())
    config = LoraConfig(
        r=default,
        lora_alpha=default,
        rank_pattern=ranks,
        alpha_pattern=ranks,
        target_modules=list(ranks),
        lora_dropout=0.0,
        init_lora_weights=method,
    )
    return get_peft_model(network, config)


def adapter_parts(method: str, network: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(W_res, D, left factor (d_out, r), right factor (d_in, r))`` of one adapted module."""
    if method == "lamda-principal":
        layer = network.get_submodule(name)
        return layer.base_layer.weight, layer.adapter_delta().T, layer.lamda_B.T, layer.lamda_A
    layer = network.base_model.model.get_submodule(name)
    return (
        layer.base_layer.weight,
        layer.get_delta_weight("default"),
        layer.lora_B["default"].weight,
        layer.lora_A["default"].weight.T,
    )


def sine_largest_angle(exact: torch.Tensor, factor: torch.Tensor) -> float:
    """Return the sine of the largest principal angle between the column spaces (float64)."""
    basis, _ = torch.linalg.qr(factor.detach().double())
    cosines = torch.linalg.svdvals(exact.T @ basis)
    return float(torch.sqrt(torch.clamp(1.0 - cosines.min() ** 2, min=0.0)))


def accuracy(method: str, network: nn.Module, originals: dict, factors: dict, ranks: dict) -> dict:
    """Return the max over modules of each error described in the module docstring."""
    worst = {"preservation": 0.0, "principal": 0.0, "subspace": 0.0}
    for name, original in originals.items():
        residual, delta, left, right = (t.detach().double() for t in adapter_parts(method, network, name))
        exact, r = factors[name], ranks[name]
        top = (exact["U"][:, :r] * exact["S"][:r]) @ exact["V"][:, :r].T
        worst["preservation"] = max(worst["preservation"], float((original - residual - delta).norm() / original.norm()))
        worst["principal"] = max(worst["principal"], float((delta - top).norm() / top.norm()))
        subspace = max(sine_largest_angle(exact["U"][:, :r], left), sine_largest_angle(exact["V"][:, :r], right))
        worst["subspace"] = max(worst["subspace"], subspace)
    return worst


def worker(method: str, model_key: str, size: str, factors_path: Path, plan_path: Path, measure_accuracy: bool) -> dict:
    rank_plan = load_plan(plan_path)
    network = build_model(model_key, size)
    originals = {}
    if measure_accuracy:
        originals = {name: network.get_submodule(name).weight.detach().double().clone() for name in rank_plan.ranks}
    before = _common.current_rss_bytes()
    reset = _common.reset_peak_rss()
    started = time.perf_counter()
    network = initialise(method, network, rank_plan)
    seconds = time.perf_counter() - started
    result = {
        "init_s": seconds,
        "init_extra_rss_bytes": _common.peak_rss_bytes() - before if reset else None,
        "peak_rss_bytes": _common.peak_rss_bytes(),
    }
    if measure_accuracy:
        result["accuracy"] = accuracy(method, network, originals, torch.load(factors_path), rank_plan.ranks)
    return result


def benchmark_model(model_key: str, args: argparse.Namespace) -> dict:
    factors_path, plan_path = reference(model_key, args.size, args.work_dir, args.budget)
    runs = {method: [] for method in METHODS}
    for index in range(args.repeats):
        print(f"[{model_key}] run {index + 1}/{args.repeats}, load average {_common.load_average()}", file=sys.stderr, flush=True)
        for method in METHODS:
            command = [
                sys.executable, __file__, "--size", args.size, "--worker", method, "--worker-model", model_key,
                "--factors", str(factors_path), "--plan", str(plan_path),
            ]
            last = index == args.repeats - 1
            if args.size == "tiny":  # in-process to keep the smoke test short; RSS figures then overlap
                runs[method].append(worker(method, model_key, args.size, factors_path, plan_path, last))
                continue
            if last:
                command.append("--accuracy")
            runs[method].append(_common.run_child(command, cwd=_common.ROOT).check(command).json_output())
    ranks = load_plan(plan_path).ranks
    return {
        "model": model_key,
        "modules": len(ranks),
        "rank_sum": sum(ranks.values()),
        "ranks": f"{min(ranks.values())}-{max(ranks.values())}",
        "methods": {
            method: {
                "init_s": stats(r["init_s"] for r in method_runs),
                "init_extra_rss_bytes": stats(r["init_extra_rss_bytes"] or 0 for r in method_runs),
                "accuracy": method_runs[-1]["accuracy"],
            }
            for method, method_runs in runs.items()
        },
    }


def tables(results: list[dict]) -> str:
    mib = 1 / 2**20
    rows = []
    for r in results:
        ours = r["methods"]["lamda-principal"]["init_s"]
        for method, m in r["methods"].items():
            a = m["accuracy"]
            rows.append(
                [r["model"], f"{r['modules']} ({r['ranks']}, sum {r['rank_sum']})", method,
                 f"{m['init_s']['median'] / ours['median']:.2f}x", show(m["init_s"]),
                 show(m["init_extra_rss_bytes"], 0, mib), f"{a['preservation']:.1e}", f"{a['principal']:.1e}",
                 f"{a['subspace']:.1e}"]
            )
    return markdown_table(
        ["model", "modules (ranks, sum)", "init", "time / lamda-principal", "init s", "init extra peak RSS MB",
         "max preservation error", "max principal error", "max subspace sin"],
        rows,
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Benchmark LaMDA's principal init against PEFT's PiSSA inits.")
    parser.add_argument("--size", choices=["full", "tiny"], default="full", help="full models, or tiny ones for a smoke test")
    parser.add_argument("--models", nargs="+", choices=["minilm", "llama"], default=["minilm", "llama"], help="models at --size full")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each initialisation (default 3)")
    parser.add_argument("--budget", default="avg:16", help="rank budget of the energy plan (default avg:16)")
    parser.add_argument("--work-dir", type=Path, default=_common.DEFAULT_WORK_DIR, help="references and plans (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-model", help=argparse.SUPPRESS)
    parser.add_argument("--factors", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--accuracy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.worker_model, args.size, args.factors, args.plan, args.accuracy)))
        return []

    env = _common.environment()
    models = MODELS["tiny"] if args.size == "tiny" else [m for m in MODELS["full"] if m in args.models]
    results = [benchmark_model(model_key, args) for model_key in models]
    print(tables(results))
    print()
    print(_common.environment_markdown(env) + f"\n- load average at end: {_common.load_average()}")
    print(f"\nRegenerate: `{_common.regenerate_command('bench_init.py', sys.argv[1:] if argv is None else argv)}`")
    _common.write_json(args.json, {"environment": env, "results": results})
    return results


if __name__ == "__main__":
    main()
