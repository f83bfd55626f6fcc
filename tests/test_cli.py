"""The command line: env, check and bench run and report what they should."""

from __future__ import annotations

import json

import pytest

from fusedconvlstm.cli import main

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
    assert "lstm forward   cluster kernel preferred" in capsys.readouterr().out
    monkeypatch.setenv("FUSEDCONVLSTM_LSTM_FWD_KERNEL", "fast")
    assert main(["env"]) == 0
    assert "INVALID FUSEDCONVLSTM_LSTM_FWD_KERNEL='fast'" in capsys.readouterr().out


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


def test_plot_from_results(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "r.jsonl"
    assert main(["bench", "--ops", "conv1d_stack", "--batches", "1", "2", "--out", str(out)]) == 0
    png = tmp_path / "r.png"
    assert main(["plot", str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
