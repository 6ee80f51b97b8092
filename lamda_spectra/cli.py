"""Command-line entry points: ``lamda-plan`` and ``lamda-report``.

This module imports only the standard library and light project modules, so ``--help``,
``--version`` and usage errors return without loading torch, numpy or pandas. The commands
import the scan, plan and report modules when they run, inside :func:`run_command`, so a
Ctrl-C during those imports is reported like any other interruption. The package itself loads
its exports on first use (see ``lamda_spectra/__init__.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, NoReturn, Sequence

from . import __version__
from ._io import StagedWrites, check_writable_location
from ._text import count_noun
from .errors import LamdaError, UsageError

logger = logging.getLogger(__name__)

# Copies of allocation.STRATEGIES' keys and scan.DEFAULT_TOP_K, because importing those modules
# loads numpy and torch just to print --help. tests/test_cli.py checks that the copies match.
STRATEGY_NAMES = ("energy", "uniform", "waterfill")
DEFAULT_TOP_K = 64

PLAN_DESCRIPTION = """\
Stream a checkpoint's linear weights, compute their singular-value spectra, and write a LaMDA++
rank plan (plan.json), a spectra table (spectra.csv) and a spectra report.
"""

PLAN_EPILOG = """\
examples:
  lamda-plan meta-llama/Llama-2-7b-hf --budget avg:16
  lamda-plan ./my-model --budget params:2M --strategy waterfill -o plans/my-model.json
  lamda-plan ./model.safetensors --target q_proj --target v_proj --budget 512

exit codes: 0 success, 1 failure (input, weights or output), 2 usage error (options).
"""


REPORT_DESCRIPTION = """\
Redraw the spectra report (PNG figures, modules.csv, spectra.csv, index.html) of a saved plan
from its spectra table, or draw the rank maps of two plans side by side with their difference.
No SVD runs: everything comes from the plan and spectra.csv.
"""

REPORT_EPILOG = """\
examples:
  lamda-report reports/all-MiniLM-L6-v2/plan.json
  lamda-report runs/a/plan.json --spectra runs/a/spectra.csv -o runs/a/report
  lamda-report --compare runs/energy/plan.json runs/waterfill/plan.json -o runs/compare

The spectra plots show every singular value when the scan ran with lamda-plan --full-spectrum,
and otherwise the top values it computed (their titles say which).

exit codes: 0 success, 1 failure (input or output), 2 usage error (options).
"""


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argument parser that reports a usage error as one stderr line instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def parse_arguments(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None,
) -> argparse.Namespace | int:
    """Parse ``argv``; returns the namespace, or the exit code when argparse ends the command.

    argparse ends the command after ``--help`` and ``--version`` (exit code 0) and on a usage
    error (exit code 2). Both entry points return that code instead of raising SystemExit.

    Args:
        parser: the command's parser.
        argv: the arguments without the program name; ``None`` reads ``sys.argv``.
        check: called with the parser and the namespace for rules argparse cannot express; it
            reports a violation through ``parser.error``.
    """
    try:
        args = parser.parse_args(argv)
        if check is not None:
            check(parser, args)
    except SystemExit as exit:
        if exit.code is None:
            return 0
        return exit.code if isinstance(exit.code, int) else 2
    return args


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_plan_parser() -> argparse.ArgumentParser:
    """Build the ``lamda-plan`` parser."""
    parser = OneLineArgumentParser(
        prog="lamda-plan",
        description=PLAN_DESCRIPTION,
        epilog=PLAN_EPILOG,
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
        choices=STRATEGY_NAMES,
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
        help="plan file path; spectra.csv is written beside it (default: reports/<model-name>/plan.json). "
        "Existing files with these names, and the report's, are replaced",
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


def build_report_parser() -> argparse.ArgumentParser:
    """Build the ``lamda-report`` parser."""
    parser = OneLineArgumentParser(
        prog="lamda-report",
        description=REPORT_DESCRIPTION,
        epilog=REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("plan", nargs="?", type=Path, help="plan file written by lamda-plan (plan.json)")
    parser.add_argument(
        "--spectra",
        type=Path,
        metavar="SPECTRA_CSV",
        help="spectra table of the same weights (default: spectra.csv beside the plan)",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("PLAN_A", "PLAN_B"),
        help="draw the rank maps of two plans side by side with their difference B - A "
        "(writes rank_map_compare.png and rank_map_compare.csv)",
    )
    parser.add_argument(
        "-o",
        "--output-dir",
        type=Path,
        help="report folder (default: the folder of PLAN, or of PLAN_A with --compare)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def plan_main(argv: Sequence[str] | None = None) -> int:
    """Run ``lamda-plan``; returns the process exit code."""
    args = parse_arguments(build_plan_parser(), argv)
    if isinstance(args, int):
        return args
    return run_command("lamda-plan", _plan_command, args)


def report_main(argv: Sequence[str] | None = None) -> int:
    """Run ``lamda-report``; returns the process exit code (0, 1 on failure, 2 on usage errors)."""
    args = parse_arguments(build_report_parser(), argv, check=_check_report_arguments)
    if isinstance(args, int):
        return args
    return run_command("lamda-report", _report_command, args)


def _check_report_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.plan is None) == (args.compare is None):
        parser.error("give either PLAN or --compare PLAN_A PLAN_B")
    if args.compare is not None and args.spectra is not None:
        parser.error("--spectra applies to a single PLAN, not to --compare")


def _report_command(args: argparse.Namespace) -> int:
    from .report import compare, report

    out_dir = args.output_dir or (args.compare[0] if args.compare is not None else args.plan).parent
    try:
        if args.compare is not None:
            written = compare(*args.compare, out_dir)
        else:
            written = report(args.plan, args.spectra or args.plan.with_name("spectra.csv"), out_dir)
    except OSError as err:  # A full disk or an exceeded quota can still fail the writes.
        raise LamdaError(
            f"cannot write the report into {out_dir}: {err.strerror or err}; nothing was written, "
            "free some space or choose another output folder"
        ) from err
    if not args.quiet:
        for path in written:
            print(f"wrote {path}")
    return 0


def run_command(prog: str, command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Call ``command(args)``, turning errors into one stderr line and an exit code.

    Returns:
        The command's exit code; :attr:`LamdaError.exit_code` after a LamdaError, 130 after
        Ctrl-C and 1 after any other exception.
    """
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
        if args.debug:
            traceback.print_exc()
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


def _one_line(err: BaseException | Warning | str) -> str:
    return " ".join(str(err).split())


@contextlib.contextmanager
def _warnings_as_lines(prog: str, *, quiet: bool) -> Iterator[None]:
    """Print each distinct warning once as one ``prog: warning: ...`` line (or drop it when quiet).

    The same warning can come twice because the command selects the target modules before the
    scan, which selects them again. Lines go through ``tqdm.write`` so that a warning raised
    during the scan does not break the progress bar.
    """
    printed: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = f"{prog}: warning: {_one_line(message)}"
        if quiet or text in printed:
            return
        printed.add(text)
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


class OutputPaths(NamedTuple):
    """Output paths of one ``lamda-plan`` run."""

    plan: Path
    spectra: Path  # spectra.csv beside the plan
    report_dir: Path | None  # None with --no-report


def _output_paths(args: argparse.Namespace, name: str) -> OutputPaths:
    plan_path = args.output or Path("reports") / name / "plan.json"
    report_dir = (args.report_dir or plan_path.parent) if args.report else None
    return OutputPaths(plan_path, plan_path.with_name("spectra.csv"), report_dir)


def _check_outputs(args: argparse.Namespace, outputs: OutputPaths) -> None:
    """Reject output paths that cannot be written, before the scan starts.

    Raises:
        LamdaError: a path names a folder where a file must go (or the other way round), two
            outputs share a path, or a folder cannot be created or written.
    """
    if args.output is not None and args.output.is_dir():
        raise LamdaError(
            f"output path {args.output} is a folder, but -o takes the plan file path; "
            f"pass for example -o {args.output / 'plan.json'}"
        )
    if outputs.plan.name == outputs.spectra.name:
        raise LamdaError(
            f"output path {outputs.plan} is where the spectra table goes; choose another plan file name"
        )
    check_writable_location(outputs.plan)
    check_writable_location(outputs.spectra)
    if outputs.report_dir is None:
        return

    from .report import REPORT_FILES

    check_writable_location(outputs.report_dir, kind="folder")
    if outputs.report_dir.absolute() == outputs.plan.parent.absolute() and outputs.plan.name in REPORT_FILES:
        raise LamdaError(
            f"output path {outputs.plan} is where the report writes its {outputs.plan.name}; "
            "choose another plan file name or pass --report-dir"
        )
    for name in REPORT_FILES:
        check_writable_location(outputs.report_dir / name)


def _plan_command(args: argparse.Namespace) -> int:
    from .allocation import check_budget
    from .plan import plan as make_plan
    from .scan import scan
    from .sources import open_source, select_targets

    started = time.perf_counter()
    if args.revision is not None and Path(args.model).exists():
        raise UsageError(f"--revision applies to Hub repo ids only, but {args.model} is a local path")

    # Check the output paths as soon as they are known, before anything is downloaded or computed.
    # The default path needs the model name, which comes from opening the source.
    outputs = _output_paths(args, args.name) if args.output is not None or args.name is not None else None
    if outputs is not None:
        _check_outputs(args, outputs)
    weights = open_source(args.model, revision=args.revision)
    name = args.name or weights.model_name
    if outputs is None:
        outputs = _output_paths(args, name)
        _check_outputs(args, outputs)

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
    written = _write_outputs(outputs, result, spectra)

    summary = _summary(result, spectra, written, time.perf_counter() - started)
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        print(_summary_table(summary))
    return 0


def _write_outputs(outputs: OutputPaths, result, spectra) -> dict[str, str]:
    """Write the plan, the spectra table and the report all together, or none of them."""
    from .scan import write_spectra_csv

    try:
        with StagedWrites() as staged:
            result.save(staged.folder(outputs.plan.parent) / outputs.plan.name)
            write_spectra_csv(spectra, staged.folder(outputs.spectra.parent) / outputs.spectra.name)
            if outputs.report_dir is not None:
                from .report import report as write_report

                write_report(result, spectra, staged.folder(outputs.report_dir))
    except OSError as err:  # A full disk or an exceeded quota can still fail the writes.
        raise LamdaError(
            f"cannot write the outputs beside {outputs.plan}: {err.strerror or err}; nothing was written, "
            "free some space or choose another output path"
        ) from err
    written = {"plan": str(outputs.plan), "spectra": str(outputs.spectra)}
    if outputs.report_dir is not None:
        written["report"] = str(outputs.report_dir)
    return written


def _default_top_k(args: argparse.Namespace, n_modules: int) -> int:
    """Singular values to compute: enough for the largest rank any strategy may give a module."""
    from .allocation import Budget

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
    ranks = list(result.ranks.values())
    totals = result.totals
    return {
        "model": result.source.get("model_name"),
        "strategy": result.settings.get("strategy"),
        "budget": result.settings.get("budget"),
        "modules": totals["modules"],
        "rank_min": min(ranks),
        "rank_median": float(statistics.median(ranks)),
        "rank_max": max(ranks),
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
        f"model        {summary['model']}  ({count_noun(summary['modules'], 'module')}, "
        f"strategy {summary['strategy']}, budget {summary['budget']})",
        f"rank         min {summary['rank_min']}  median {summary['rank_median']:g}  max {summary['rank_max']}  "
        f"sum {summary['rank_sum']}",
        f"trainable    core {summary['core_params']:,} (sum r^2)  + PMB {summary['pmb_params']:,} until frozen",
        f"LoRA         {summary['lora_params']:,} at the same ranks ({ratio:.1f}x the core)",
        f"wall time    {summary['wall_seconds']:.1f} s  "
        f"({count_noun(summary['spectra_computed'], 'spectrum', 'spectra')} computed, "
        f"{summary['spectra_cached']} from cache)",
    ]
    lines += [f"wrote        {path}" for path in summary["written"].values()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(plan_main())
