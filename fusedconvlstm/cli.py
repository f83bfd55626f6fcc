"""Command line of fusedconvlstm (python -m fusedconvlstm, or the fusedconvlstm script):
env (versions, GPU, backends), check (every backend against float64), bench (our layers timed
against torch.nn, JSON lines) and train (the reference model on review text)."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

# Set to 1 to see the traceback of an error the command line otherwise reports in one line.
TRACEBACK_ENV = "FUSEDCONVLSTM_TRACEBACK"


class CLIError(Exception):
    """An expected failure of a command (a bad file, a bad argument): one line on stderr and a
    non-zero exit, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default where the help text does not already say it:
    ``(default: X)``, ``(default: off)`` for a flag, ``(default: none)`` for an option that is
    not used unless given."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or not action.option_strings or action.default is argparse.SUPPRESS:
            return help_text
        if action.nargs == 0:
            default = "off" if action.default in (False, None) else "on"
        elif action.default is None:
            default = "none"
        else:
            default = "%(default)s"
        return f"{help_text} (default: {default})".strip()


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
    invalid = []
    backend_line = _backend_env_line()
    if backend_line.startswith("INVALID"):
        invalid.append(backends.ENV_VAR)
    print(f"backend        {backend_line}")
    kernel_line = _forward_kernel_line()
    if kernel_line.startswith("INVALID"):
        invalid.append("FUSEDCONVLSTM_LSTM_FWD_KERNEL")
    print(f"lstm forward   {kernel_line}")
    print()
    devices = [torch.device("cuda")] if torch.cuda.is_available() else []
    devices.append(torch.device("cpu"))
    for device in devices:
        for name in backends.BACKENDS:
            reason = backends.backend_why_not(name, device)
            ops = [op for op in backends.registered_ops() if backends.implementation(op, name) is not None]
            state = "available" if reason is None else f"unavailable: {reason}"
            print(f"{device.type:4s} {name:9s}  {state}")
            if reason is None:
                print(f"{'':15s}ops: {', '.join(ops) or 'none yet'}")
    _print_auto_choices(devices)
    if invalid:
        print(f"\ninvalid settings: {', '.join(invalid)} (see above)", file=sys.stderr)
        return 1
    return 0


def _backend_env_line() -> str:
    """What ``backend="auto"`` means here: ``$FUSEDCONVLSTM_BACKEND`` when set (checked)."""
    from fusedconvlstm import backends, config

    given = config.current().backend
    choices = ", ".join((*backends.BACKENDS, backends.AUTO))
    if not given:
        return (
            f"auto: torch's kernels, or a kernel a validation record enables (below) ({backends.ENV_VAR} unset; "
            f"one of {choices})"
        )
    try:
        backends.requested_backend(backends.AUTO)
    except ValueError:
        return (
            f"INVALID {backends.ENV_VAR}={given!r} (one of {choices}): every call that does not name a "
            "backend will raise"
        )
    return f"{given}, from {backends.ENV_VAR}, wherever code does not name a backend"


def _forward_kernel_line() -> str:
    """Which persistent forward kernel the cuda LSTM prefers, and how to change it."""
    from fusedconvlstm import config
    from fusedconvlstm.cuda.persistent_config import FORWARD_KERNEL_ENV, FORWARD_KERNELS, preferred_forward_kernel

    try:
        name = preferred_forward_kernel()
    except ValueError:
        given = config.current().lstm_forward_kernel
        return (
            f"INVALID {FORWARD_KERNEL_ENV}={given!r} (one of {', '.join(FORWARD_KERNELS)}): cuda LSTM calls will raise"
        )
    others = " or ".join(k for k in FORWARD_KERNELS if k != name)
    return (
        f"{name} kernel preferred by the cuda backend, of the {len(FORWARD_KERNELS)} persistent forward kernels "
        f"{', '.join(FORWARD_KERNELS)} ({FORWARD_KERNEL_ENV}={others} for another)"
    )


def _print_auto_choices(devices: list[torch.device]) -> None:
    """What ``backend="auto"`` picks for the reference shapes, and why, with the records read."""
    from fusedconvlstm import records, validate

    print()
    print(f"records        shipped {records.SHIPPED_PATH} ({len(records.read_file(records.SHIPPED_PATH))})")
    user = records.user_records_path()
    print(f"{'':15s}user {user} ({len(records.read_file(user))}; `check --record` adds to it)")
    for device in devices:
        print(f"auto on {device.type}:")
        for line in validate.auto_lines(device):
            print(f"  {line}")


def _write_records(args: argparse.Namespace, rows: list, device: torch.device) -> None:
    """``check --record``: the records the rows support (see :func:`fusedconvlstm.validate.records_from_check`)."""
    from fusedconvlstm import records, validate
    from fusedconvlstm.benchmarking import load_records

    if device.type != "cuda":
        print("\n--record: nothing to record off a GPU (auto runs torch's kernels there)")
        return
    bench_rows = load_records(args.bench) if args.bench else []
    new = validate.records_from_check(rows, device, bench_rows)
    if not new:
        print("\n--record: no row of a cuda or triton kernel to record")
        return
    path = records.append_user_records(new)
    print(f"\n--record: {len(new)} record(s) written to {path}")
    for r in new:
        verdict = "correct" if r.correct else "WRONG"
        speed = {True: "faster than cuDNN", False: "NOT faster than cuDNN", None: "speed unknown"}[r.faster]
        print(f"  {r.op} {r.backend} {r.arch} {r.dtype} {dict((k, lo) for k, lo, _ in r.range)}: {verdict}, {speed}")
    if any(r.faster is None for r in new):
        print(
            "  auto picks a kernel only where a record says correct and faster: time these shapes with "
            "`fusedconvlstm bench` on this GPU, then rerun `check --record --bench RESULTS.jsonl`"
        )


def cmd_check(args: argparse.Namespace) -> int:
    """Run each available backend against the float64 reference; non-zero exit on any failure."""
    from fusedconvlstm.validate import check_cases, default_cases, format_table

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA GPU here (torch.cuda.is_available() is False)")
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
    if args.record:
        _write_records(args, rows, device)
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Time the backends against the cuDNN reference (see :mod:`fusedconvlstm.benchmarking`)."""
    from fusedconvlstm.benchmarking import main_bench

    return main_bench(args)


def cmd_train(args: argparse.Namespace) -> int:
    """Train the reference model on review text (see :mod:`fusedconvlstm.train`)."""
    from fusedconvlstm.train import run

    run(args)
    return 0


def _package_version() -> str:
    from fusedconvlstm._version import __version__

    return __version__


def _non_negative_float(text: str) -> float:
    """An argparse type: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


EPILOG = f"""Expected failures (a missing or malformed file, a bad argument, a missing optional package)
print one line on stderr and exit non-zero; {TRACEBACK_ENV}=1 shows the traceback instead."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the command line."""
    from fusedconvlstm import BACKENDS, backends
    from fusedconvlstm.benchmarking import COMPILE_MODES, DTYPES, FLASHRNN_BACKENDS, OPS, TIMING_MODES, default_help
    from fusedconvlstm.cuda.persistent_config import FORWARD_KERNELS
    from fusedconvlstm.train import positive_int

    parser = ArgumentParser(prog="fusedconvlstm", description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{env,check,bench,train}")

    def command(name: str, help: str, description: str | None = None, epilog: str | None = None):  # noqa: A002
        return sub.add_parser(
            name, help=help, description=description or help, epilog=epilog, formatter_class=HelpFormatter
        )

    p = command("env", "versions, GPU, and which backends can run here (non-zero exit on an invalid setting)")
    p.set_defaults(func=cmd_env)

    p = command("check", "every available backend against the float64 reference (non-zero exit on a failure)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=["float32", "float16", "bfloat16", "float64"],
        help="default: float32 float16 bfloat16 on a GPU, float32 on the CPU",
    )
    p.add_argument("--backends", nargs="+", choices=list(BACKENDS), help="only these backends (default: every one)")
    p.add_argument("--quick", action="store_true", help="one case per op (default: every case)")
    p.add_argument(
        "--record",
        action="store_true",
        help="on a GPU, write what this run verified (per kernel, architecture, dtype and case shape) to the "
        "user's validation records: correct or wrong, and faster than cuDNN only from --bench results "
        "(auto runs a kernel only where a record says both)",
    )
    p.add_argument(
        "--bench",
        nargs="+",
        metavar="RESULTS",
        help="with --record: JSON-lines files of `fusedconvlstm bench` on this GPU, the speed evidence",
    )
    p.set_defaults(func=cmd_check)

    p = command(
        "bench",
        "time the backends against cuDNN and torch.compile; write JSON lines",
        epilog="Without a GPU the cases run on the CPU at small sizes: numbers that say nothing about GPU "
        "speed, written to benchmarks/results/cpu/ (not meant to be committed) unless --out is given.",
    )
    p.add_argument(
        "--ops",
        nargs="+",
        choices=list(OPS),
        help=default_help("ops"),
    )
    p.add_argument(
        "--backends",
        nargs="+",
        choices=[backends.AUTO, *BACKENDS],
        help="only these of ours (default: every one that serves a case)",
    )
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help=default_help("dtypes"))
    p.add_argument("--batches", nargs="+", type=positive_int, help=default_help("batches"))
    p.add_argument("--seqs", nargs="+", type=positive_int, help="sequence lengths of the lstm cases (default: 45)")
    p.add_argument(
        "--passes",
        nargs="+",
        choices=["fwd", "fwd+bwd"],
        help=default_help("passes", " with --ops; fwd fwd+bwd on the CPU without --ops"),
    )
    p.add_argument("--hidden", type=positive_int, help="hidden and input size of the lstm cases (default: 512)")
    p.add_argument(
        "--repeats",
        type=positive_int,
        help="rounds per case, one timing per side each, the sides alternating; their spread is the noise "
        "(default and minimum on a GPU: 5; default on the CPU: 5)",
    )
    p.add_argument(
        "--timing",
        choices=list(TIMING_MODES),
        default="events",
        help="on a GPU: CUDA events around do_bench (events), CUDA-graph replays of both sides (graph, forward "
        "cases), or back-to-back calls by the wall clock as a user waits for them (wallclock)",
    )
    p.add_argument(
        "--out",
        help="JSON-lines file (default: benchmarks/results/<date>_<gpu>.jsonl on a GPU, "
        "benchmarks/results/cpu/<date>_<cpu>.jsonl on the CPU)",
    )
    p.add_argument(
        "--include-reference",
        action="store_true",
        help="also time the reference and torch backends on a GPU (default: not)",
    )
    p.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile baselines (default: timed on a GPU)"
    )
    p.add_argument(
        "--compile-modes",
        nargs="+",
        choices=list(COMPILE_MODES),
        help="torch.compile modes of the reference-model baselines (default: default reduce-overhead; "
        "max-autotune compiles for minutes)",
    )
    p.add_argument(
        "--flashrnn",
        nargs="+",
        choices=list(FLASHRNN_BACKENDS),
        help="also time the lstm cases against these FlashRNN kernels (needs pip install flashrnn; cuda_fused "
        "compiles for minutes at its first call) (default: none)",
    )
    p.add_argument(
        "--lstm-forward-kernels",
        nargs="+",
        choices=list(FORWARD_KERNELS),
        help="time the lstm cases on the cuda backend with each of these persistent forward kernels preferred "
        "(records name the kernel that served) (default: the preferred one only)",
    )
    p.add_argument(
        "--time-budget",
        type=_non_negative_float,
        metavar="SECONDS",
        help="start no new case after this many seconds, for GPU leases (default: no limit)",
    )
    p.set_defaults(func=cmd_bench)

    from fusedconvlstm.train import DESCRIPTION, add_arguments
    from fusedconvlstm.train import EPILOG as TRAIN_EPILOG

    p = command(
        "train",
        "train the reference model on review text (fine-food reviews or a fastText file)",
        description=DESCRIPTION,
        epilog=TRAIN_EPILOG,
    )
    add_arguments(p)
    p.set_defaults(func=cmd_train)
    return parser


def _one_line(exc: BaseException) -> str:
    """An expected failure in one line."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or exc}: {exc.filename}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def run_command(name: str, func, args: argparse.Namespace) -> int:
    """``func(args)``, its expected failures one line on stderr (``NAME: error: ...``) and a
    non-zero exit; ``$FUSEDCONVLSTM_TRACEBACK`` set: the traceback instead."""
    from fusedconvlstm.backends import BackendUnavailableError

    try:
        return func(args)
    except (CLIError, OSError, ImportError, ValueError, BackendUnavailableError) as exc:
        if os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0"):
            raise
        print(f"{name}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """Run the command line: expected failures become one line on stderr and a non-zero exit."""
    args = build_parser().parse_args(argv)
    return run_command(f"fusedconvlstm {args.command}", args.func, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
