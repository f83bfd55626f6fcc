"""The project's speed targets judged on results files (``python -m benchmarks.report``).

Records here are made up for the test (they are inputs, not measurements): the report must say
met / not met / not measured from them, never invent a number, judge only the latest clean commit
on the target's GPU, per shape against the fastest baseline, count a crash and a missing or failed
error check as failures, and meet a bound only beyond the noise.
"""

from __future__ import annotations

import json

from benchmarks import report
from benchmarks.targets import TARGETS, Target, evaluate, judged_rows, markdown

H100 = "NVIDIA H100 80GB HBM3"


def _record(**kw) -> dict:
    base = dict(
        commit="abc1234",
        device=H100,
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
        status="ok",
        timestamp="2026-12-01T10:00:00+00:00",
        baseline_kernels=["RNN_blockPersist_fp_LSTM<__half, float, 4, 4>"],
    )
    base["pass"] = kw.pop("pass_", "fwd")
    base.update(kw)
    # Tight rounds unless told: percentiles 1% either side of the medians.
    m, b = base["median_ms"], base["baseline_median_ms"]
    if m is not None and "percentiles_ms" not in kw:
        base["percentiles_ms"] = {"p10": 0.99 * m, "p50": m, "p90": 1.01 * m}
    if b is not None and "baseline_percentiles_ms" not in kw:
        base["baseline_percentiles_ms"] = {"p10": 0.99 * b, "p50": b, "p90": 1.01 * b}
    return base


def _target(start: str) -> Target:
    return next(t for t in TARGETS if t.what.startswith(start))


PERSISTENT = "fwd bf16 >= 1.5x cuDNN fp16 (persistent)"


def test_speedup_targets_met_missed_and_not_measured():
    t = _target(PERSISTENT)
    rows = [
        (_record(batch=8, median_ms=0.15, speedup=1.2), "a.jsonl"),
        (_record(batch=64, median_ms=0.09, speedup=2.0), "a.jsonl"),
    ]
    verdicts = evaluate(rows, [t])
    assert [(v.record["batch"], v.value, v.met) for v in verdicts] == [(64, 2.0, True), (8, 1.2, False)]
    (none,) = evaluate([(_record(batch=256), "a.jsonl")], [t])  # batch 256 is not this target's
    assert none.record is None and none.value is None and none.met is None and none.case() == "not measured"


def test_a_result_past_the_error_mark_or_without_its_error_field_fails():
    t = _target(PERSISTENT)
    (v,) = evaluate([(_record(speedup=5.0, err_within_2x_baseline=False), "a.jsonl")], [t])
    assert v.met is False and "error past the pass mark" in markdown([v])
    no_field = _record(speedup=5.0)
    del no_field["err_within_2x_baseline"]
    (v,) = evaluate([(no_field, "a.jsonl")], [t])
    assert v.met is False and "no error field" in v.note


def test_a_crashed_or_refused_case_is_a_failure_not_unmeasured():
    t = _target(PERSISTENT)
    crashed = _record(status="crashed", error="RuntimeError: illegal memory access", median_ms=None,
                      baseline_median_ms=None, speedup=None, err_within_2x_baseline=False)  # fmt: skip
    (v,) = evaluate([(crashed, "a.jsonl")], [t])
    assert v.met is False and v.value is None and "crashed: RuntimeError" in v.note
    # A crash at a shape fails it even where another baseline's record there is fast.
    (v,) = evaluate([(crashed, "a.jsonl"), (_record(baseline="cudnn_fp16", speedup=3.0), "a.jsonl")], [t])
    assert v.met is False
    # The baseline not running here is not ours to fail: the shape is not measured.
    gone = dict(crashed, status="baseline_unavailable")
    (v,) = evaluate([(gone, "a.jsonl")], [t])
    assert v.met is None and v.record is None


def test_only_the_latest_clean_commit_per_device_is_judged():
    t = _target(PERSISTENT)
    rows = [
        (_record(commit="old1234", speedup=3.0, timestamp="2026-11-01T00:00:00+00:00"), "a.jsonl"),
        (_record(commit="new5678", median_ms=0.15, speedup=1.2), "b.jsonl"),
        (_record(commit="new5678-dirty", speedup=9.0, timestamp="2026-12-24T00:00:00+00:00"), "c.jsonl"),
        (_record(commit="unknown", speedup=9.0, timestamp="2026-12-25T00:00:00+00:00"), "d.jsonl"),
    ]
    (v,) = evaluate(rows, [t])
    assert v.record["commit"] == "new5678" and v.met is False  # the favourable rows do not count
    kept, notes = judged_rows(rows)
    assert [r["commit"] for r, _ in kept] == ["new5678"]
    assert "left out 2 record(s) of an unknown or dirty commit" in notes
    assert "left out 1 record(s) of older commits" in notes


def test_an_h200_record_never_counts_for_an_h100_target():
    t = _target(PERSISTENT)
    (v,) = evaluate([(_record(device="NVIDIA H200", speedup=3.0), "a.jsonl")], [t])
    assert v.record is None and v.met is None
    (v,) = evaluate([(_record(device="NVIDIA H100 NVL", speedup=3.0, median_ms=0.06), "a.jsonl")], [t])
    assert v.met is True


def test_each_shape_is_judged_against_its_fastest_listed_baseline():
    t = _target("fwd bf16 >= 3x cuDNN 16-bit")
    rows = [
        (_record(batch=256, baseline="cudnn_fp16", median_ms=1.0, baseline_median_ms=4.0, speedup=4.0), "a"),
        (_record(batch=256, baseline="cudnn_bf16", median_ms=1.0, baseline_median_ms=2.5, speedup=2.5), "a"),
    ]
    (v,) = evaluate(rows, [t])
    assert v.record["baseline"] == "cudnn_bf16" and v.value == 2.5 and v.met is False


def test_compile_target_needs_every_mode_and_takes_the_fastest():
    t = _target("inference >= 2x the fastest torch.compile mode")
    common = dict(op="model_inference", backend="auto", batch=256, median_ms=1.0)
    default = _record(baseline="torch_compile_bf16", baseline_median_ms=3.0, speedup=3.0, **common)
    overhead = _record(baseline="torch_compile_reduce_overhead_fp16", baseline_median_ms=2.5, speedup=2.5, **common)
    autotune = _record(baseline="torch_compile_max_autotune_bf16", baseline_median_ms=1.5, speedup=1.5, **common)
    (v,) = evaluate([(default, "a"), (overhead, "a")], [t])
    assert v.met is None and "incomplete: no torch_compile_max_autotune_bf16" in v.note
    (v,) = evaluate([(default, "a"), (overhead, "a"), (autotune, "a")], [t])
    assert v.record["baseline"] == "torch_compile_max_autotune_bf16" and v.met is False


def test_a_bound_is_met_only_beyond_the_noise():
    t = _target(PERSISTENT)
    noisy = _record(
        median_ms=0.1,
        baseline_median_ms=0.16,
        speedup=1.6,
        percentiles_ms={"p10": 0.08, "p50": 0.1, "p90": 0.12},
        baseline_percentiles_ms={"p10": 0.15, "p50": 0.16, "p90": 0.17},
    )
    (v,) = evaluate([(noisy, "a.jsonl")], [t])
    assert v.value == 1.6 and v.margin == 0.15 / 0.12 and v.met is False and "within noise" in v.note
    # Without percentiles the spread stands in; without either the noise is unknown: not met.
    old = _record(median_ms=0.1, baseline_median_ms=0.2, speedup=2.0, spread=0.1)
    del old["percentiles_ms"], old["baseline_percentiles_ms"]
    (v,) = evaluate([(old, "a.jsonl")], [t])
    assert abs(v.margin - 2.0 / 1.1) < 1e-12 and v.met is True
    del old["spread"]
    (v,) = evaluate([(old, "a.jsonl")], [t])
    assert v.met is False and "noise unknown" in v.note


def test_latency_targets_are_judged_on_their_timing_mode():
    step = _target("fwd per-step latency")
    assert step.timing == "graph"
    graph = {"mode": "graph", "rounds": 5}
    (fast,) = evaluate([(_record(seq=1000, median_ms=1.2, timing=graph), "r.jsonl")], [step])
    assert abs(fast.value - 1.2) < 1e-12 and fast.met  # 1.2 ms over 1000 steps
    (slow,) = evaluate([(_record(seq=45, median_ms=0.09, timing=graph), "r.jsonl")], [step])
    assert abs(slow.value - 2.0) < 1e-12 and slow.met is False
    (events,) = evaluate([(_record(seq=1000, median_ms=1.2), "r.jsonl")], [step])
    assert events.record is None  # timed with do_bench: not this target's measure
    latency = _target("batch-1 latency")
    assert latency.timing == "wallclock"


def test_ratio_partner_matches_device_commit_and_kernel():
    pair = _target("the pair <= 1.2x the time of one LSTM")
    rows = [(_record(op="lstm", median_ms=0.10), "r.jsonl"), (_record(op="lstm_pair", median_ms=0.11), "r.jsonl")]
    (v,) = evaluate(rows, [pair])
    assert abs(v.value - 1.1) < 1e-12 and v.met
    (missing,) = evaluate([rows[1], (_record(op="lstm", batch=8), "r.jsonl")], [pair])
    assert missing.value is None and missing.met is None and "no matching lstm cuda" in missing.note
    other_kernel = _record(op="lstm", median_ms=0.10, forward_kernel_preferred="cluster")
    (v,) = evaluate([rows[1], (other_kernel, "r.jsonl")], [pair])
    assert v.value is None


def test_report_command_prints_every_target_and_only_numbers_from_the_files(tmp_path, capsys):
    path = tmp_path / "2026-12-01_h100.jsonl"
    rec = _record(batch=64, median_ms=0.0857, speedup=1.75, baseline_median_ms=0.15)
    path.write_text(json.dumps(rec) + "\n")
    assert report.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert f"judged: {H100} at commit abc1234" in out
    lines = [line for line in out.splitlines() if line.startswith("| 3 ")]
    assert len(lines) >= 6 and all(str(path) in line for line in lines if "1.75x" in line)
    assert sum("1.75x" in line for line in out.splitlines()) == 1  # the one record, once
    assert out.count("not measured") == len(TARGETS) - 1
    assert report.main([str(path), "--issues", "6"]) == 0
    assert "| 3 " not in capsys.readouterr().out


def test_every_target_is_well_formed():
    kinds = {"speedup", "step_us", "ratio"}
    for t in TARGETS:
        assert t.kind in kinds and t.bound > 0 and t.batches and t.dtypes and t.seqs, t
        assert (t.kind == "ratio") == (t.versus is not None), t
        assert t.timing in ("events", "graph", "wallclock") and t.device
        assert all(any(b in t.baselines for b in grp) for grp in t.required), t


def test_a_persistent_baseline_is_verified_by_its_kernels():
    t = _target(PERSISTENT)
    stepwise = _record(speedup=2.0, baseline_kernels=["elemWiseRNNcell<__half>", "sm90_xmma_gemm_f16f16"])
    (v,) = evaluate([(stepwise, "a.jsonl")], [t])
    assert v.met is None and "baseline not verified persist" in v.note
    (v,) = evaluate([(_record(speedup=2.0, baseline_kernels=None), "a.jsonl")], [t])
    assert v.met is None and "no kernels recorded" in v.note
    (v,) = evaluate([(_record(speedup=2.0), "a.jsonl")], [t])
    assert v.met is True
