"""The issues' speed targets judged on results files (``fusedconvlstm report``).

Records here are made up for the test (they are inputs, not measurements): the report must say
met / not met / not measured from them, never invent a number, and refuse a fast result whose
error misses the pass mark.
"""

from __future__ import annotations

import json

from fusedconvlstm import cli
from fusedconvlstm.targets import TARGETS, Target, evaluate, markdown


def _record(**kw) -> dict:
    base = dict(
        commit="abc1234",
        op="lstm",
        backend="cuda",
        baseline="cudnn_fp16",
        dtype="bf16",
        batch=64,
        seq=45,
        hidden=512,
        median_ms=0.09,
        baseline_median_ms=0.18,
        speedup=2.0,
        max_rel_err=1e-3,
        err_within_2x_baseline=True,
    )
    base["pass"] = kw.pop("pass_", "fwd")
    base.update(kw)
    return base


def _target(what: str) -> Target:
    return next(t for t in TARGETS if t.what == what)


def test_speedup_targets_met_missed_and_not_measured():
    t = _target("fwd bf16 >= 1.5x cuDNN fp16 (persistent)")
    rows = [(_record(batch=8, speedup=1.2), "a.jsonl"), (_record(batch=64, speedup=2.0), "a.jsonl")]
    verdicts = evaluate(rows, [t])
    assert [(v.record["batch"], v.value, v.met) for v in verdicts] == [(8, 1.2, False), (64, 2.0, True)]
    (none,) = evaluate([(_record(batch=256), "a.jsonl")], [t])  # batch 256 is not this target's
    assert none.record is None and none.value is None and none.met is None and none.case() == "not measured"


def test_a_result_past_the_error_mark_meets_nothing():
    t = _target("fwd bf16 >= 1.5x cuDNN fp16 (persistent)")
    (v,) = evaluate([(_record(speedup=5.0, err_within_2x_baseline=False), "a.jsonl")], [t])
    assert v.met is False and "error past 2x" in markdown([v])


def test_step_latency_and_ratio_targets():
    step = _target("fwd per-step latency <= 1.5 us")
    (fast,) = evaluate([(_record(seq=1000, median_ms=1.2), "r.jsonl")], [step])
    assert abs(fast.value - 1.2) < 1e-12 and fast.met  # 1.2 ms over 1000 steps
    (slow,) = evaluate([(_record(seq=45, median_ms=0.09), "r.jsonl")], [step])
    assert abs(slow.value - 2.0) < 1e-12 and slow.met is False

    pair = _target("the pair <= 1.2x the time of one LSTM")
    rows = [(_record(op="lstm", median_ms=0.10), "r.jsonl"), (_record(op="lstm_pair", median_ms=0.11), "r.jsonl")]
    (v,) = evaluate(rows, [pair])
    assert abs(v.value - 1.1) < 1e-12 and v.met
    # The partner must be the same case (dtype, batch, seq, pass, baseline, commit): none here.
    (missing,) = evaluate([rows[1], (_record(op="lstm", batch=8), "r.jsonl")], [pair])
    assert missing.record is None


def test_report_command_prints_every_target_and_only_numbers_from_the_files(tmp_path, capsys):
    path = tmp_path / "2026-12-01_h100.jsonl"
    rec = _record(batch=64, speedup=1.75)
    path.write_text(json.dumps(rec) + "\n")
    assert cli.main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| 3 ")]
    assert len(lines) >= 6 and all(str(path) in line for line in lines if "1.75x" in line)
    assert sum("1.75x" in line for line in out.splitlines()) == 1  # the one record, once
    # The record is judged by two targets (the batch-64 speedup and the per-step latency: 2 us).
    assert "| 2us |" not in out and "2 us" in out
    assert out.count("not measured") == len(TARGETS) - 2
    assert cli.main(["report", str(path), "--issues", "6"]) == 0
    assert "| 3 " not in capsys.readouterr().out


def test_every_target_is_well_formed():
    kinds = {"speedup", "step_us", "ratio"}
    for t in TARGETS:
        assert t.kind in kinds and t.bound > 0 and t.batches and t.dtypes and t.seqs, t
        assert (t.kind == "ratio") == (t.versus is not None), t
