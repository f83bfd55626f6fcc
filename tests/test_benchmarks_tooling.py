"""The project's benchmark tooling outside the package (``benchmarks/``): the front ends
``python -m benchmarks.report`` and ``python -m benchmarks.plot`` fail in one line as the package's
command line does, the plot draws what the results hold, ``make bench`` plots what bench just
wrote, and the package imports nothing from ``benchmarks/``."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import _cli, plot, report
from fusedconvlstm.cli import main as package_main
from tests.helpers import exit_and_stderr, write_file

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(commit="c", device="d", torch="t", cuda=None, cudnn=None, triton=None)
PNG = b"\x89PNG\r\n\x1a\n"
FRONT_ENDS = {"report": report.main, "plot": plot.main}


def _run(front_end: str, argv: list[str], capsys) -> tuple[int, str]:
    return exit_and_stderr(FRONT_ENDS[front_end], argv, capsys)


def _plottable(**kw) -> dict:
    record = dict(op="lstm", dtype="fp32", backend="reference", baseline="b", batch=1, speedup=1.0)
    record.update({"pass": "fwd", "device": "cpu", "commit": "c"}, **kw)
    return record


@pytest.mark.parametrize(
    "front_end,make_argv,message",
    [
        ("report", lambda d: [str(d / "missing.jsonl")], "No such file or directory"),
        ("plot", lambda d: [str(d / "missing.jsonl")], "No such file or directory"),
        ("plot", lambda d: [write_file(d / "empty.jsonl", "")], "no records (the file is empty)"),
        ("report", lambda d: [write_file(d / "empty.jsonl", "\n")], "no records (the file is empty)"),
        ("report", lambda d: [write_file(d / "bad.jsonl", "not json\n")], "bad.jsonl:1: not a JSON line"),
        ("plot", lambda d: [write_file(d / "other.jsonl", '{"a": 1}\n')], "other.jsonl:1: not a bench record"),
        ("report", lambda d: [str(d / "*.jsonl")], "no file matches"),
        ("report", lambda d: [], "the following arguments are required: results"),
        ("report", lambda d: [write_file(d / "r.jsonl", "{}\n"), "--issues", "x"], "argument --issues: invalid int"),
        ("plot", lambda d: [], "name results files or --newest"),
        ("plot", lambda d: [write_file(d / "r.jsonl", "{}\n"), "--newest"], "name results files or --newest"),
    ],
)
def test_expected_failures_are_one_line_on_stderr(front_end, make_argv, message, tmp_path, capsys):
    code, err = _run(front_end, make_argv(tmp_path), capsys)
    assert code not in (0, None)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert lines[0].startswith(f"python -m benchmarks.{front_end}: error: ")


def test_plot_newest_without_results_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = _run("plot", ["--newest"], capsys)
    assert code == 1 and "no results file in benchmarks/results" in err and len(err.strip().splitlines()) == 1


def test_a_missing_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    argv = [write_file(tmp_path / "r.jsonl", json.dumps(_plottable()) + "\n")]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    code, err = _run("plot", argv, capsys)
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "pip install matplotlib" in err


def test_the_traceback_is_one_variable_away(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDCONVLSTM_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        report.main([str(tmp_path / "missing.jsonl")])


def test_help_is_plain_text_and_shows_defaults(capsys):
    for name, front_end in FRONT_ENDS.items():
        with pytest.raises(SystemExit) as exit_:
            front_end(["--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert "``" not in out and f"python -m benchmarks.{name}" in out
        assert "default" in out and "default: None" not in out
    with pytest.raises(SystemExit):
        report.main(["--help"])
    assert "speed targets" in capsys.readouterr().out


def test_the_report_runs_as_a_module_from_the_repository_root():
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.report", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "usage: python -m benchmarks.report" in run.stdout, run.stderr


def test_plot_from_results(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "r.jsonl"
    assert package_main(["bench", "--ops", "conv1d_stack", "--batches", "1", "2", "--out", str(out)]) == 0
    png = tmp_path / "r.png"
    assert plot.main([str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG


def test_make_bench_plots_what_bench_just_wrote(tmp_path, monkeypatch, capsys):
    """``make bench``: bench writes its results (on the CPU under benchmarks/results/cpu/), then
    ``benchmarks.plot --newest`` draws the PNG beside them."""
    pytest.importorskip("matplotlib")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: bench times it")
    monkeypatch.chdir(tmp_path)
    older = tmp_path / "benchmarks" / "results" / "2020-01-01_000000_nvidia-h100.jsonl"
    older.parent.mkdir(parents=True)
    older.write_text(json.dumps(_plottable()) + "\n")
    assert package_main(["bench", "--ops", "conv1d_stack", "--batches", "1", "--repeats", "1"]) == 0
    (results,) = (tmp_path / "benchmarks" / "results" / "cpu").glob("*.jsonl")
    capsys.readouterr()
    assert plot.main(["--newest"]) == 0
    assert results.with_suffix(".png").read_bytes()[:8] == PNG
    assert capsys.readouterr().out.strip() == str(results.with_suffix(".png").relative_to(tmp_path))
    assert not older.with_suffix(".png").exists()


def test_newest_results_goes_by_the_date_in_the_name(tmp_path):
    gpu, cpu = tmp_path / _cli.RESULTS_DIRS[0], tmp_path / _cli.RESULTS_DIRS[1]
    cpu.mkdir(parents=True)
    for path in (gpu / "2026-03-01_120000_nvidia-h100_core.jsonl", cpu / "2026-02-01_090000_cpu.jsonl"):
        path.write_text("{}\n")
    assert _cli.newest_results(str(tmp_path)).endswith("2026-03-01_120000_nvidia-h100_core.jsonl")
    (cpu / "2026-03-02_080000_cpu.jsonl").write_text("{}\n")
    assert _cli.newest_results(str(tmp_path)).endswith("2026-03-02_080000_cpu.jsonl")


def test_make_bench_runs_the_plot_step_after_bench():
    if shutil.which("make") is None:
        pytest.skip("no make here")
    run = subprocess.run(["make", "-n", "bench"], cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in run.stdout.splitlines() if " -m fusedconvlstm bench" in line or "benchmarks.plot" in line]
    assert len(lines) == 2 and "-m fusedconvlstm bench" in lines[0] and "-m benchmarks.plot --newest" in lines[1]


@pytest.fixture
def plot_labels(monkeypatch) -> list:
    """The label of every line the plot draws, in order."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    labels = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(
        matplotlib.axes.Axes, "plot", lambda ax, *a, **k: labels.append(k.get("label")) or original(ax, *a, **k)
    )
    return labels


def test_plot_draws_each_lstm_forward_kernel_as_its_own_line(tmp_path, plot_labels):
    labels = plot_labels
    base = dict(ENV, op="lstm", dtype="bf16", backend="cuda", baseline="cudnn_fp16", seq=45, hidden=512)
    base["pass"] = "fwd"
    rows = [
        dict(base, batch=b, speedup=s, lstm_forward_kernel=k)
        for k, s in (("cooperative", 1.5), ("cluster", 2.0))
        for b in (64, 256)
    ]
    plot.plot_speedups(rows, str(tmp_path / "p.png"))
    lines = [lab for lab in labels if lab]
    assert sorted(lines) == ["bf16 cuda (cluster) vs cudnn_fp16", "bf16 cuda (cooperative) vs cudnn_fp16"]


def test_plot_draws_one_line_per_device_and_commit(tmp_path, plot_labels):
    labels = plot_labels
    base = dict(ENV, op="lstm", dtype="bf16", backend="cuda", baseline="cudnn_fp16", seq=45, hidden=512)
    base["pass"] = "fwd"
    rows = [
        dict(base, batch=b, speedup=1.5, device=dev, commit=commit)
        for dev, commit in (("NVIDIA H100", "aaaa"), ("NVIDIA H200", "aaaa"), ("NVIDIA H100", "bbbb"))
        for b in (64, 256)
    ]
    rows.append(dict(base, batch=8, device="NVIDIA H100", commit="aaaa", status="crashed"))  # no speedup
    plot.plot_speedups(rows, str(tmp_path / "p.png"))
    lines = sorted(lab for lab in labels if lab)
    assert lines == [
        "bf16 cuda vs cudnn_fp16 [NVIDIA H100 aaaa]",
        "bf16 cuda vs cudnn_fp16 [NVIDIA H100 bbbb]",
        "bf16 cuda vs cudnn_fp16 [NVIDIA H200 aaaa]",
    ]


def test_the_package_imports_nothing_from_benchmarks():
    """The package is the library: project tooling in benchmarks/ may use it, never the reverse
    (benchmarks/ is not in the wheel)."""
    offenders = []
    for path in sorted((ROOT / "fusedconvlstm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "benchmarks"]
    assert not offenders


# The pytest-benchmark suite (benchmarks/test_bench_ops.py, make bench-suite).


def test_the_cpu_suite_times_the_lstm_conv_stack_and_model_against_torch_at_small_sizes():
    from benchmarks import _timing

    cases = _timing.cases(torch.device("cpu"))
    assert {(c["op"], c["pass_"]) for c in cases} == {
        ("lstm", "fwd"),
        ("lstm", "fwd+bwd"),
        ("conv1d_stack", "fwd"),
        ("conv1d_stack", "fwd+bwd"),
        ("model_inference", "fwd"),
    }
    assert all(c["backend"] == "auto" and c["baseline"] == "torch_cpu_fp32" for c in cases)
    assert max(c["batch"] for c in cases) <= 8 and _timing.hidden_of(torch.device("cpu")) <= 128
    ids = [_timing.case_id(c) for c in cases]
    assert len(set(ids)) == len(ids)


class _FakeBenchmark:
    """What the suite uses of pytest-benchmark's fixture; records what was timed."""

    def __init__(self):
        self.extra_info, self.group, self.timed = {}, None, []

    def pedantic(self, fn, rounds, iterations=1, warmup_rounds=0):
        self.timed.append(rounds)
        for _ in range(warmup_rounds + rounds * iterations):
            fn()


def _lstm_case():
    from benchmarks import _timing

    return next(c for c in _timing.cases(torch.device("cpu")) if c["op"] == "lstm" and c["pass_"] == "fwd")


def test_a_suite_case_is_checked_on_the_pass_mark_then_timed():
    from benchmarks import _timing

    bench = _FakeBenchmark()
    _timing.check_then_time(bench, _lstm_case(), "ours", torch.device("cpu"))
    assert bench.timed == [_timing.CPU_ROUNDS] and bench.group == _timing.case_id(_lstm_case())
    info = bench.extra_info
    assert info["side"] == "ours" and info["op"] == "lstm" and info["pass"] == "fwd"
    assert info["err_within_2x_baseline"] is True and info["errors"][0]["name"] == "output"
    json.dumps(info)  # pytest-benchmark writes it into its JSON


def test_a_suite_case_past_the_pass_mark_is_not_timed(monkeypatch):
    from benchmarks import _timing
    from fusedconvlstm import passmark

    case = _lstm_case()
    _timing._checked.clear()
    pair, marks = _timing.checked_pair(case, torch.device("cpu"))
    bad = passmark.TensorMark("output", 0.5, 1e-6, 0.5, 1e-6, passmark.eps_of("fp32"))
    monkeypatch.setattr(_timing, "_checked", [_timing._checked[0], pair, [bad]])
    bench = _FakeBenchmark()
    with pytest.raises(AssertionError, match="past the pass mark, not timed"):
        _timing.check_then_time(bench, case, "baseline", torch.device("cpu"))
    assert bench.timed == [] and bench.extra_info["err_within_2x_baseline"] is False


def test_gpu_rounds_record_cuda_event_milliseconds(monkeypatch):
    """On a GPU each pytest-benchmark round is one timing by the package's CUDA-event timer, whose
    milliseconds go to extra_info (pytest-benchmark's own stats are the rounds' wall clock)."""
    from benchmarks import _timing

    values = iter([3.0, 1.0, 2.0, 5.0, 4.0])
    monkeypatch.setattr(_timing, "round_timer", lambda dev, mode: lambda fn: (fn(), next(values))[1])
    bench, calls = _FakeBenchmark(), []
    _timing.time_with_cuda_events(bench, lambda: calls.append(1), torch.device("cuda"), rounds=5)
    info = bench.extra_info
    assert len(calls) == 5 and info["cuda_event_ms"] == [3.0, 1.0, 2.0, 5.0, 4.0] and info["median_ms"] == 3.0
    assert info["timing"]["mode"] == "events" and "not the kernel" in info["timing"]["pytest_benchmark_stats"]


def test_make_bench_suite_writes_pytest_benchmark_json_where_git_ignores_it():
    if shutil.which("make") is None:
        pytest.skip("no make here")
    run = subprocess.run(["make", "-n", "bench-suite"], cwd=ROOT, capture_output=True, text=True, check=True)
    (line,) = [x for x in run.stdout.splitlines() if "pytest benchmarks" in x]
    (json_path,) = [a.split("=", 1)[1] for a in line.split() if a.startswith("--benchmark-json=")]
    ignored = subprocess.run(["git", "check-ignore", "-q", json_path], cwd=ROOT)
    assert ignored.returncode == 0, f"{json_path} must be ignored by git"
    assert "make bench-suite" in (ROOT / ".ci" / "run").read_text().splitlines()
    makefile = (ROOT / "Makefile").read_text()
    assert "pytest-benchmark" in next(x for x in makefile.splitlines() if x.startswith("TEST_TOOLS"))


def test_plain_pytest_collects_the_tests_only():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    extras = config["project"]["optional-dependencies"]
    assert all(any(d.startswith("pytest-benchmark") for d in extras[k]) for k in ("bench", "test", "dev"))
