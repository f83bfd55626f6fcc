"""The scripts of a GPU lease (``scripts/gpu_prepare.sh``, ``scripts/gpu_session.sh``): they parse,
and the session's stages that need no GPU run here as they will there, so a lease is not spent
finding a broken script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fusedconvlstm import _extension

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("gpu_prepare.sh", "gpu_session.sh", "sanitize.sh")


def _session(out: Path, *stages: str, timeout: int) -> subprocess.CompletedProcess:
    """``scripts/gpu_session.sh STAGES`` with results to ``out``; its ``python3`` is the one
    running these tests, as on the GPU machine it is the only one."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env = dict(os.environ, PATH=path, OUT=str(out), FUSEDCONVLSTM_COMMIT="0123abc")
    script = str(ROOT / "scripts" / "gpu_session.sh")
    return subprocess.run(["bash", script, *stages], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    run = subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_session_prep_uses_the_carried_build_and_returns_a_summary_and_logs(tmp_path):
    if _extension.unavailable_reason() is not None or _extension.stale_reason() is not None:
        pytest.skip("no current build of the extension here to carry")
    out = tmp_path / "out"
    run = _session(out, "prep", timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = (out / "summary.txt").read_text()
    assert "prep: carried extension loads and matches the sources" in summary
    assert "== env: ok" in summary and "commit 0123abc" in summary
    # What comes back from a lease: at most 8 files, the logs folded into one archive.
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.txt"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"logs/prep_check.log", "logs/env.log"} <= set(tar.getnames())


def test_session_refuses_an_unknown_stage(tmp_path):
    out = tmp_path / "out"
    run = _session(out, "benchmark-everything", timeout=60)
    assert run.returncode == 2
    assert "unknown stage benchmark-everything" in (out / "summary.txt").read_text()


def test_session_bench_calls_parse_as_bench_arguments():
    """Every ``bench NAME SECONDS ARGS`` of gpu_session.sh is a valid ``fusedconvlstm bench`` call."""
    import re
    import shlex

    from fusedconvlstm.cli import build_parser

    text = (ROOT / "scripts" / "gpu_session.sh").read_text().replace("\\\n", " ")
    calls = re.findall(r'^\s*(?:[A-Z0-9_]+=\S+ )?bench (bench_\w+) (?:\d+|"\$\w+") (.+)$', text, flags=re.M)
    assert {name for name, _ in calls} >= {"bench_core", "bench_cluster", "bench_more", "bench_flashrnn"}
    assert {name for name, _ in calls} >= {"bench_poll_off", "bench_poll_64", "bench_taps_outer", "bench_taps_inner"}
    for name, args in calls:
        args = re.sub(r'"\$OUT/[^"]*"', "out.jsonl", args)
        parsed = build_parser().parse_args(["bench", *shlex.split(args)])
        assert parsed.out == "out.jsonl", name


def test_session_records_stage_is_a_valid_check_record_call():
    """The records stage runs ``fusedconvlstm check --record`` with arguments check accepts, its
    cache directory under $OUT (so the records come back), and the core results as evidence."""
    import re
    import shlex

    from fusedconvlstm.cli import build_parser

    text = (ROOT / "scripts" / "gpu_session.sh").read_text().replace("\\\n", " ")
    (call,) = re.findall(r"^\s*run records \d+ env (\S+) \$PY -m fusedconvlstm (check .+)$", text, flags=re.M)
    env, args = call
    assert env == 'FUSEDCONVLSTM_CACHE_DIR="$OUT/records"'
    args = args.replace('${core:+--bench "$core"}', "--bench core.jsonl")
    parsed = build_parser().parse_args(shlex.split(args))
    assert parsed.record and parsed.bench == ["core.jsonl"] and set(parsed.backends) == {"cuda", "triton"}
    assert "records) stage_records ;;" in text


def test_setup_says_what_it_is_doing(tmp_path):
    """``make setup`` on a fresh machine: each step announced, pip's output not silenced."""
    if shutil.which("make") is None:
        pytest.skip("no make here")
    run = subprocess.run(
        ["make", "-n", "setup", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    lines = run.stdout.splitlines()
    installs = [line for line in lines if "pip install" in line]
    assert installs and not any("-q" in line.split() for line in installs), installs
    steps = [line for line in lines if line.startswith("echo") and "[setup" in line]
    assert [f"[setup {i}/4]" in step for i, step in enumerate(steps, 1)] == [True] * 4, steps


def test_session_times_each_switch_both_ways():
    """The switches stage runs the same bench cases each way of each switch."""
    import re

    text = (ROOT / "scripts" / "gpu_session.sh").read_text().replace("\\\n", " ")
    for variable, values in (
        ("FUSEDCONVLSTM_BARRIER_POLL_NS", ["0", "64"]),
        ("FUSEDCONVLSTM_CONV1D_TAP_ORDER", ["outer", "inner"]),
        ("FUSEDCONVLSTM_TRITON_LSTM_STAGES", ["1", "2"]),
    ):
        runs = re.findall(rf"^\s*{variable}=(\w+) bench bench_\w+ \d+ (.+) --out ", text, flags=re.M)
        assert [value for value, _ in runs] == values, variable
        assert runs[0][1] == runs[1][1], f"{variable}: both ways must time the same cases"
    assert "switches) stage_switches ;;" in text
