"""What the project's benchmark front ends share (``python -m benchmarks.report``,
``python -m benchmarks.plot``): the package's argument parser and its one-line handling of expected
failures (:mod:`fusedconvlstm.cli`), and the results files they read."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable

from fusedconvlstm.cli import ArgumentParser, CLIError, HelpFormatter, run_command

# Where ``fusedconvlstm bench`` writes by default: GPU results (committed) and CPU ones (ignored).
RESULTS_DIRS = (os.path.join("benchmarks", "results"), os.path.join("benchmarks", "results", "cpu"))


def parser(prog: str, doc: str) -> ArgumentParser:
    """An argument parser with the package command line's errors and help (defaults shown)."""
    return ArgumentParser(prog=prog, description=doc, formatter_class=HelpFormatter)


def results_files(paths: list[str]) -> list[str]:
    """The results files named, each checked to exist (a shell glob that matched nothing arrives
    as itself: say so)."""
    for path in paths:
        if not os.path.exists(path) and any(c in path for c in "*?["):
            raise CLIError(f"no file matches {path} (bench writes results files; none there yet?)")
    return paths


def newest_results(root: str = ".") -> str:
    """The newest results file of ``fusedconvlstm bench`` under ``root``'s results folders, by
    the date and time its name starts with (``<date>_<time>_<device>.jsonl``)."""
    found = [os.path.normpath(p) for d in RESULTS_DIRS for p in glob.glob(os.path.join(root, d, "*.jsonl"))]
    if not found:
        raise CLIError(f"no results file in {' or '.join(RESULTS_DIRS)} (run python -m fusedconvlstm bench first)")
    return max(found, key=lambda p: (os.path.basename(p), p))


def main(prog: str, build: Callable[[], ArgumentParser], argv: list[str] | None) -> int:
    """Parse ``argv`` and run the chosen function; expected failures are one line on stderr."""
    args = build().parse_args(argv)
    return run_command(prog, args.func, args)
