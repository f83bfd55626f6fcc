"""``python -m benchmarks.plot RESULTS... | --newest``: a PNG of speedup against batch size from
results files of ``fusedconvlstm bench`` (needs matplotlib). ``make bench`` runs it on the results
the run just wrote (``--newest``). Run from the repository root, wherever the results were brought
back to."""

from __future__ import annotations

import argparse
import sys

from benchmarks import _cli
from fusedconvlstm.benchmarking import load_records

PROG = "python -m benchmarks.plot"

# What a record needs to be plotted.
PLOT_KEYS = ("op", "pass", "dtype", "backend", "baseline", "batch", "speedup", "device", "commit")


def plot_path(results_path: str) -> str:
    """The PNG beside a results file."""
    return results_path.removesuffix(".jsonl") + ".png"


def plot_speedups(rows: list[dict], out_path: str) -> str:
    """A PNG of speedup against batch size: one panel per (op, pass), one line per dtype,
    backend, baseline, device and commit (records of cases that did not run are left out). Needs matplotlib; run it wherever the results were brought back to."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib (pip install matplotlib)") from exc
    rows = [r for r in rows if r.get("status", "ok") == "ok"]  # crashed cases have no speedup to draw
    panels = sorted({(r["op"], r["pass"]) for r in rows})
    if not panels:
        raise ValueError("no results to plot")
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (op, pass_) in zip(axes.flat, panels):
        sel = [r for r in rows if r["op"] == op and r["pass"] == pass_]

        def line_of(r):  # the cuda LSTM's forward kernel is a line of its own, as is each (device, commit)
            return (
                r["dtype"], r["backend"], r.get("lstm_forward_kernel") or "", r["baseline"],
                r.get("device", ""), str(r.get("commit", ""))[:10],
            )  # fmt: skip

        several = len({(r.get("device", ""), str(r.get("commit", ""))[:10]) for r in rows}) > 1
        for key in sorted({line_of(r) for r in sel}):
            pts = sorted((r["batch"], r["speedup"]) for r in sel if line_of(r) == key)
            backend = f"{key[1]} ({key[2]})" if key[2] else key[1]
            where = f" [{key[4]} {key[5]}]" if several else ""
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} {backend} vs {key[3]}{where}"
            )
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{op} ({pass_})")
        ax.set_xlabel("batch")
        ax.set_ylabel("speedup (baseline time / ours)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    devices = sorted({r["device"] for r in rows})
    commits = sorted({r["commit"][:10] for r in rows})
    fig.suptitle(f"{', '.join(devices)} — commit {', '.join(commits)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def plot(args: argparse.Namespace) -> int:
    """Draw the PNG and print its path."""
    if bool(args.results) == bool(args.newest):
        raise _cli.CLIError("name results files or --newest (one of them)")
    paths = [_cli.newest_results()] if args.newest else _cli.results_files(args.results)
    out = args.out or plot_path(paths[0])
    print(plot_speedups(load_records(paths, required=PLOT_KEYS), out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _cli.parser(PROG, "PNG of speedup against batch size from bench results (needs matplotlib)")
    p.add_argument("results", nargs="*", help="JSON-lines files written by bench")
    p.add_argument(
        "--newest",
        action="store_true",
        help="plot the newest results file in benchmarks/results/ or benchmarks/results/cpu/ (by the date "
        "and time in its name), what the last bench run wrote",
    )
    p.add_argument("--out", help="PNG path (default: the first results file with .png for .jsonl)")
    p.set_defaults(func=plot)
    return p


def main(argv: list[str] | None = None) -> int:
    return _cli.main(PROG, build_parser, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
