"""Command line: ``python -m fusedconvlstm {env,check,bench,plot,train}`` (also the ``fusedconvlstm`` script)."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch


def cmd_env(args: argparse.Namespace) -> int:
    """Print versions, the GPU and, per op, which backend can run here (or why not)."""
    from fusedconvlstm import _extension, backends
    from fusedconvlstm.benchmarking import environment

    env = environment()
    print(f"fusedconvlstm  {_package_version()}  (commit {env['commit']})")
    print(f"python         {platform.python_version()}")
    print(f"torch          {env['torch']}  (CUDA {env['cuda'] or 'none'}, cuDNN {env['cudnn'] or 'none'})")
    print(f"triton         {env['triton'] or 'not installed'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(
                f"gpu {i}          {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
            )
    else:
        print("gpu            none (torch.cuda.is_available() is False)")
    info = _extension.build_info()
    if info:
        print(
            f"extension      built with torch {info['torch_version']}, CUDA {info['cuda_version']}, "
            f"stable ABI >= {info['torch_target_version']}, archs {info['arch_list']}"
        )
    stale = _extension.stale_reason()
    if stale:
        print(f"extension      STALE: {stale}")
    print(f"lstm forward   {_forward_kernel_line()}")
    print()
    devices = [torch.device("cuda")] if torch.cuda.is_available() else []
    devices.append(torch.device("cpu"))
    for device in devices:
        for name in backends.BACKENDS:
            reason = backends.backend_why_not(name, device)
            ops = [op for op in backends.registered_ops() if name in backends._REGISTRY[op]]
            state = "available" if reason is None else f"unavailable: {reason}"
            print(f"{device.type:4s} {name:9s}  {state}")
            if reason is None:
                print(f"{'':15s}ops: {', '.join(ops) or 'none yet'}")
    return 0


def _forward_kernel_line() -> str:
    """Which persistent forward kernel the cuda LSTM prefers, and how to change it."""
    from fusedconvlstm.cuda.persistent_config import FORWARD_KERNEL_ENV, FORWARD_KERNELS, preferred_forward_kernel

    try:
        name = preferred_forward_kernel()
    except ValueError:
        given = os.environ[FORWARD_KERNEL_ENV].strip()
        return (
            f"INVALID {FORWARD_KERNEL_ENV}={given!r} (one of {', '.join(FORWARD_KERNELS)}): cuda LSTM calls will raise"
        )
    other = "cluster" if name == "cooperative" else "cooperative"
    return f"{name} kernel preferred by the cuda backend ({FORWARD_KERNEL_ENV}={other} for the other)"


def cmd_check(args: argparse.Namespace) -> int:
    """Run each available backend against the float64 reference; non-zero exit on any failure."""
    from fusedconvlstm.validate import check_cases, default_cases, format_table

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    default_dtypes = ["float32", "float16", "bfloat16"] if device.type == "cuda" else ["float32"]
    dtypes = [getattr(torch, d) for d in (args.dtypes or default_dtypes)]
    print(
        f"checking on {device} in {', '.join(str(d).removeprefix('torch.') for d in dtypes)} "
        "(fresh random inputs; float64 torch modules on the CPU are the reference)",
        flush=True,
    )
    rows = []
    for row in check_cases(default_cases(quick=args.quick), device, dtypes, only=args.backends):
        rows.append(row)
        print(
            f"  {row.op:13s} {row.backend:9s} {row.dtype:9s} {row.case}: {'PASS' if row.passed else 'FAIL'}", flush=True
        )
    print()
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    if not rows:
        print("\nno backend could run any case")
        return 1
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Time the backends against the cuDNN reference (see :mod:`fusedconvlstm.benchmarking`)."""
    from fusedconvlstm.benchmarking import main_bench

    return main_bench(args)


def cmd_plot(args: argparse.Namespace) -> int:
    """Plot speedup against batch size from results files."""
    from fusedconvlstm.benchmarking import load_records, plot_speedups

    out = args.out or args.results[0].removesuffix(".jsonl") + ".png"
    print(plot_speedups(load_records(args.results), out))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """The issues' speed targets judged on results files (see :mod:`fusedconvlstm.targets`)."""
    import json

    from fusedconvlstm.targets import TARGETS, evaluate, markdown

    rows = []
    for path in args.results:
        with open(path) as f:
            rows += [(json.loads(line), path) for line in f if line.strip()]
    targets = [t for t in TARGETS if not args.issues or t.issue in args.issues]
    print(markdown(evaluate(rows, targets)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train the reference model on review text (see :mod:`fusedconvlstm.train`)."""
    from fusedconvlstm.train import run

    run(args)
    return 0


def _package_version() -> str:
    from fusedconvlstm import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the command line."""
    from fusedconvlstm import BACKENDS, backends
    from fusedconvlstm.benchmarking import COMPILE_MODES, DTYPES, FLASHRNN_BACKENDS, OPS
    from fusedconvlstm.cuda.persistent_config import FORWARD_KERNELS

    parser = argparse.ArgumentParser(prog="fusedconvlstm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env", help="versions, GPU, and which backends can run here")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("check", help="every available backend against the float64 reference")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--backends", nargs="+", choices=list(BACKENDS), help="only these backends")
    p.add_argument("--quick", action="store_true", help="one case per op")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("bench", help="time the backends against cuDNN and torch.compile; write JSON lines")
    p.add_argument("--ops", nargs="+", choices=list(OPS))
    p.add_argument("--backends", nargs="+", choices=[backends.AUTO, *BACKENDS], help="only these of ours")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    p.add_argument("--batches", nargs="+", type=int)
    p.add_argument("--seqs", nargs="+", type=int, help="sequence lengths of the lstm cases (default 45)")
    p.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"])
    p.add_argument("--hidden", type=int, help="hidden and input size of the lstm cases (default 512)")
    p.add_argument("--out", help="JSON-lines file (default on a GPU: benchmarks/results/<date>_<gpu>.jsonl)")
    p.add_argument("--include-reference", action="store_true", help="also time the reference backend on a GPU")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument(
        "--compile-modes",
        nargs="+",
        choices=list(COMPILE_MODES),
        help="torch.compile modes of the reference-model baselines (default: default; max-autotune compiles for minutes)",
    )
    p.add_argument(
        "--flashrnn",
        nargs="+",
        choices=list(FLASHRNN_BACKENDS),
        help="also time the lstm cases against these FlashRNN kernels (needs `pip install flashrnn`; cuda_fused "
        "compiles for minutes at its first call)",
    )
    p.add_argument(
        "--lstm-forward-kernels",
        nargs="+",
        choices=list(FORWARD_KERNELS),
        help="time the lstm cases on the cuda backend with each of these persistent forward kernels preferred "
        "(records name the kernel that served)",
    )
    p.add_argument(
        "--time-budget", type=float, metavar="SECONDS", help="start no new case after this many seconds (GPU leases)"
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plot", help="PNG of speedup against batch size from bench results (needs matplotlib)")
    p.add_argument("results", nargs="+", help="JSON-lines files written by bench")
    p.add_argument("--out", help="PNG path (default: beside the first results file)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("report", help="the issues' speed targets judged on bench results (a Markdown table)")
    p.add_argument("results", nargs="+", help="JSON-lines files written by bench or benchmarks/bench_conv1d_stack.py")
    p.add_argument("--issues", type=int, nargs="+", metavar="N", help="only these issues' targets")
    p.set_defaults(func=cmd_report)

    from fusedconvlstm.train import add_arguments

    p = sub.add_parser("train", help="train the reference model on review text (fine-food reviews or a fastText file)")
    add_arguments(p)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
