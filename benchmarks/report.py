"""``python -m benchmarks.report RESULTS...``: the project's speed targets (:mod:`benchmarks.targets`)
judged on results files of ``fusedconvlstm bench``, as a Markdown table that cites the file of each
figure. Run from the repository root."""

from __future__ import annotations

import argparse
import sys

from benchmarks import _cli
from benchmarks.targets import TARGETS, evaluate, judged_rows, markdown
from fusedconvlstm.benchmarking import load_records

PROG = "python -m benchmarks.report"


def report(args: argparse.Namespace) -> int:
    """Print which records were judged, then every target's verdict per shape."""
    rows = []
    for path in _cli.results_files(args.results):
        rows += [(r, path) for r in load_records([path])]
    targets = [t for t in TARGETS if not args.issues or t.issue in args.issues]
    for note in judged_rows(rows)[1]:
        print(f"- {note}")
    print()
    print(markdown(evaluate(rows, targets)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser(PROG, "the project's speed targets judged on bench results (a Markdown table)")
    p.add_argument("results", nargs="+", help="JSON-lines files written by bench or benchmarks/bench_conv1d_stack.py")
    p.add_argument("--issues", type=int, nargs="+", metavar="N", help="only these issues' targets (default: all)")
    p.set_defaults(func=report)
    return p


def main(argv: list[str] | None = None) -> int:
    return _cli.main(PROG, build_parser, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
