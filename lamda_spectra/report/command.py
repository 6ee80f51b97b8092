"""The ``lamda-report`` command: redraw a report from a saved plan, or compare two plans."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .. import __version__

DESCRIPTION = """\
Redraw the spectra report (PNG figures, modules.csv, spectra.csv, index.html) of a saved plan
from its spectra table, or draw the rank maps of two plans side by side with their difference.
No SVD runs: everything comes from the plan and spectra.csv.
"""

EPILOG = """\
examples:
  lamda-report reports/all-MiniLM-L6-v2/plan.json
  lamda-report runs/a/plan.json --spectra runs/a/spectra.csv -o runs/a/report
  lamda-report --compare runs/energy/plan.json runs/waterfill/plan.json -o runs/compare

The spectra plots show every singular value when the scan ran with lamda-plan --full-spectrum,
and otherwise the top values it computed (their titles say which).

exit codes: 0 success, 1 failure (input or output), 2 usage error (options).
"""


def build_parser() -> argparse.ArgumentParser:
    """Build the ``lamda-report`` parser."""
    # Imported here because the package imports this module, and a module-level import of the
    # cli would load it before ``python -m lamda_spectra.cli`` runs it.
    from ..cli import OneLineArgumentParser

    parser = OneLineArgumentParser(
        prog="lamda-report",
        description=DESCRIPTION,
        epilog=EPILOG,
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lamda-report``; returns the process exit code (0, 1 on failure, 2 on usage errors)."""
    from ..cli import parse_arguments, run_command

    args = parse_arguments(build_parser(), argv, check=_check_arguments)
    if isinstance(args, int):
        return args
    return run_command("lamda-report", _report_command, args)


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.plan is None) == (args.compare is None):
        parser.error("give either PLAN or --compare PLAN_A PLAN_B")
    if args.compare is not None and args.spectra is not None:
        parser.error("--spectra applies to a single PLAN, not to --compare")


def _report_command(args: argparse.Namespace) -> int:
    from . import compare, report

    if args.compare is not None:
        plan_a, plan_b = args.compare
        written = compare(plan_a, plan_b, args.output_dir or plan_a.parent)
    else:
        spectra = args.spectra or args.plan.with_name("spectra.csv")
        written = report(args.plan, spectra, args.output_dir or args.plan.parent)
    if not args.quiet:
        for path in written:
            print(f"wrote {path}")
    return 0
