"""Command-line entry points: ``lamda-plan`` and ``lamda-report``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import __version__
from ._io import check_writable_location
from .allocation import STRATEGIES, Budget, check_budget
from .errors import LamdaError, UsageError
from .plan import plan as make_plan
from .scan import DEFAULT_TOP_K, scan, write_spectra_csv
from .sources import open_source, select_targets

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Stream a checkpoint's linear weights, compute their singular-value spectra, and write a LaMDA++
rank plan (plan.json), a spectra table (spectra.csv) and a spectra report.
"""

EPILOG = """\
examples:
  lamda-plan meta-llama/Llama-2-7b-hf --budget avg:16
  lamda-plan ./my-model --budget params:2M --strategy waterfill -o plans/my-model.json
  lamda-plan ./model.safetensors --target q_proj --target v_proj --budget 512

exit codes: 0 success, 1 failure (input, weights or output), 2 usage error (options).
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lamda-plan",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="local folder (model.safetensors or model.safetensors.index.json with shards), "
        "a single .safetensors file, or a Hugging Face Hub repo id org/name",
    )
    parser.add_argument("--revision", help="Hub branch, tag or commit hash (repo ids only; default: main)")

    budget = parser.add_argument_group("rank budget")
    budget.add_argument(
        "--budget",
        default="avg:16",
        help="rank budget: N = sum of ranks over all target modules; avg:N = average rank per "
        "module; params:N = trainable core parameters sum(r^2), with K/M/G suffixes "
        "(default: %(default)s)",
    )
    budget.add_argument(
        "--strategy",
        choices=sorted(STRATEGIES),
        default="energy",
        help="energy: rank proportional to each module's energy score (LaMDA++); waterfill: "
        "greedy over all normalized singular values, maximizing captured energy; uniform: the "
        "base rank everywhere (plain LaMDA) (default: %(default)s)",
    )
    budget.add_argument(
        "--r0",
        type=_positive_int,
        help="base rank r0 of the energy score, in singular directions (default: the average rank "
        "the budget implies)",
    )
    budget.add_argument("--min-rank", type=_positive_int, default=1, help="smallest rank of any module (default: 1)")
    budget.add_argument(
        "--max-rank",
        type=_positive_int,
        help="largest rank of any module (default: 4x the average rank), never above min(d_in, d_out)",
    )
    budget.add_argument(
        "--multiple-of", type=_positive_int, default=1, help="make every rank a multiple of this (default: 1)"
    )

    selection = parser.add_argument_group("module selection")
    selection.add_argument(
        "--target",
        action="append",
        metavar="PATTERN",
        help="module-name suffix (q_proj, attention.self.query) or regex over full module names; "
        "repeat to add more (default: every linear projection inside the repeated blocks)",
    )
    selection.add_argument(
        "--exclude", action="append", metavar="PATTERN", help="module-name suffix or regex to leave out; repeatable"
    )
    selection.add_argument(
        "--skip-unsupported",
        action="store_true",
        help="skip quantized or packed weights (int8, uint8, fp8, 4-bit) with a warning instead of failing",
    )
    selection.add_argument(
        "--skip-nonfinite", action="store_true", help="skip weights holding NaN or Inf with a warning instead of failing"
    )

    spectrum = parser.add_argument_group("spectrum")
    spectrum.add_argument(
        "--top-k",
        type=_positive_int,
        help=f"singular values to compute per module (default: the larger of the max rank and {DEFAULT_TOP_K})",
    )
    spectrum.add_argument(
        "--full-spectrum", action="store_true", help="keep every singular value (slower; enables effective rank)"
    )
    spectrum.add_argument("--device", default="cpu", help="where the SVDs run: cpu or cuda (default: %(default)s)")
    spectrum.add_argument(
        "--cache-dir",
        type=Path,
        help="spectra cache folder (default: $LAMDA_SPECTRA_CACHE or ~/.cache/lamda_spectra)",
    )
    spectrum.add_argument("--no-cache", action="store_true", help="neither read nor write the spectra cache")

    output = parser.add_argument_group("output")
    output.add_argument(
        "-o",
        "--output",
        type=Path,
        help="plan file path; spectra.csv is written beside it (default: reports/<model-name>/plan.json)",
    )
    output.add_argument("--name", help="model name used in default output paths and titles (default: from MODEL)")
    output.add_argument(
        "--report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the spectra report (PNG figures, CSV tables, index.html) (default: on)",
    )
    output.add_argument("--report-dir", type=Path, help="report folder (default: the plan's folder)")
    output.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    output.add_argument("--json", action="store_true", help="print a machine-readable summary as JSON on stdout")
    output.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def plan_main(argv: Sequence[str] | None = None) -> int:
    """Run ``lamda-plan``; returns the process exit code."""
    args = build_plan_parser().parse_args(argv)
    return run_command("lamda-plan", _plan_command, args)


def report_main(argv: Sequence[str] | None = None) -> int:
    """Run ``lamda-report``; returns the process exit code."""
    from .report import main

    return main(argv)


def run_command(prog: str, command, args: argparse.Namespace) -> int:
    """Call ``command(args)``, turning errors into one stderr line and an exit code."""
    if args.debug:
        logging.basicConfig(level=logging.DEBUG, format=f"{prog}: %(name)s: %(message)s")
    try:
        with _warnings_as_lines(prog, quiet=args.quiet):
            return command(args)
    except LamdaError as err:
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - last resort: keep the one-line contract
        if args.debug:
            raise
        print(
            f"{prog}: error: unexpected {type(err).__name__}: {_one_line(err)} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


@contextlib.contextmanager
def _warnings_as_lines(prog: str, *, quiet: bool) -> Iterator[None]:
    """Print each warning as one ``prog: warning: ...`` line (or drop it when quiet)."""

    def show(message, category, filename, lineno, file=None, line=None):
        if not quiet:
            print(f"{prog}: warning: {_one_line(message)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


def _plan_command(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.revision is not None and Path(args.model).exists():
        raise UsageError(f"--revision applies to Hub repo ids only, but {args.model} is a local path")

    weights = open_source(args.model, revision=args.revision)
    targets = select_targets(weights, args.target, args.exclude, skip_unsupported=args.skip_unsupported)
    # Fail on a bad budget or bad rank bounds before any SVD runs.
    check_budget(
        [min(module.shape) for module in targets],
        args.budget,
        r0=args.r0,
        min_rank=args.min_rank,
        max_rank=args.max_rank,
        multiple_of=args.multiple_of,
        names=[module.module for module in targets],
    )
    top_k = args.top_k or _default_top_k(args, len(targets))

    name = args.name or weights.model_name
    plan_path = args.output or Path("reports") / name / "plan.json"
    spectra_path = plan_path.with_name("spectra.csv")
    report_dir = args.report_dir or plan_path.parent
    check_writable_location(plan_path)
    if args.report:
        check_writable_location(report_dir / "index.html")

    with _progress_bar(len(targets), enabled=not (args.quiet or args.json)) as progress:
        spectra = scan(
            weights,
            target=args.target,
            exclude=args.exclude,
            top_k=top_k,
            full_spectrum=args.full_spectrum,
            device=args.device,
            cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
            skip_unsupported=args.skip_unsupported,
            skip_nonfinite=args.skip_nonfinite,
            progress=progress,
        )
    spectra.attrs["source"]["model_name"] = name
    result = make_plan(
        spectra,
        budget=args.budget,
        strategy=args.strategy,
        r0=args.r0,
        min_rank=args.min_rank,
        max_rank=args.max_rank,
        multiple_of=args.multiple_of,
    )

    result.save(plan_path)
    write_spectra_csv(spectra, spectra_path)
    written = {"plan": str(plan_path), "spectra": str(spectra_path)}
    if args.report:
        from .report import report as write_report

        write_report(result, spectra, report_dir)
        written["report"] = str(report_dir)

    summary = _summary(result, spectra, written, time.perf_counter() - started)
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        print(_summary_table(summary))
    return 0


def _default_top_k(args: argparse.Namespace, n_modules: int) -> int:
    """Singular values to compute: enough for the largest rank any strategy may give a module."""
    if args.max_rank is not None:
        return max(args.max_rank, DEFAULT_TOP_K)
    average = Budget.parse(args.budget).average_rank(n_modules)
    return max(4 * round(average), DEFAULT_TOP_K)


@contextlib.contextmanager
def _progress_bar(total: int, *, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None lets tqdm hide the bar when stderr is not a terminal.
    with tqdm(total=total, unit="module", disable=None if enabled else True, file=sys.stderr, dynamic_ncols=True) as bar:

        def advance(done: int, total: int, module: str) -> None:
            bar.set_postfix_str(module[-48:], refresh=False)
            bar.update(done - bar.n)

        yield advance


def _summary(result, spectra, written: dict, seconds: float) -> dict:
    ranks = np.array(list(result.ranks.values()))
    totals = result.totals
    return {
        "model": result.source.get("model_name"),
        "strategy": result.settings.get("strategy"),
        "budget": result.settings.get("budget"),
        "modules": totals["modules"],
        "rank_min": int(ranks.min()),
        "rank_median": float(np.median(ranks)),
        "rank_max": int(ranks.max()),
        "rank_sum": totals["rank_sum"],
        "core_params": totals["core_params"],
        "pmb_params": totals["pmb_params"],
        "lora_params": totals["lora_params"],
        "spectra_computed": spectra.attrs.get("computed", 0),
        "spectra_cached": spectra.attrs.get("cached", 0),
        "wall_seconds": round(seconds, 3),
        "written": written,
    }


def _summary_table(summary: dict) -> str:
    ratio = summary["lora_params"] / max(summary["core_params"], 1)
    lines = [
        f"model        {summary['model']}  ({summary['modules']} modules, strategy {summary['strategy']}, "
        f"budget {summary['budget']})",
        f"rank         min {summary['rank_min']}  median {summary['rank_median']:g}  max {summary['rank_max']}  "
        f"sum {summary['rank_sum']}",
        f"trainable    core {summary['core_params']:,} (sum r^2)  + PMB {summary['pmb_params']:,} until frozen",
        f"LoRA         {summary['lora_params']:,} at the same ranks ({ratio:.1f}x the core)",
        f"wall time    {summary['wall_seconds']:.1f} s  ({summary['spectra_computed']} spectra computed, "
        f"{summary['spectra_cached']} from cache)",
    ]
    lines += [f"wrote        {path}" for path in summary["written"].values()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(plan_main())
