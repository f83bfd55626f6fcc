"""``fusedconvlstm.benchmarking``: what its records say (commit, pass mark), how cases are planned
(torch.compile modes, FlashRNN baselines, the time budget of a GPU lease), and that the FlashRNN
baseline computes ``nn.LSTM`` (checked on FlashRNN's own pure-PyTorch kernel on the CPU)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from torch import nn

from benchmarks.plot import PLOT_KEYS
from fusedconvlstm import benchmarking, passmark
from fusedconvlstm.benchmarking import BenchRecord, compile_mode_of, compiled_baseline_name, plan
from fusedconvlstm.cli import build_parser
from fusedconvlstm.passmark import rel_err

F64 = torch.float64
ENV = dict(commit="c", device="d", torch="t", cuda=None, cudnn=None, triton=None)
CASE = dict(op="lstm", backend="cuda", baseline="cudnn_fp16", batch=8, seq=45, hidden=512, pass_="fwd")


def test_record_derives_medians_speedup_and_the_pass_mark():
    rec = BenchRecord.measured(ENV, ([2.0, 4.0, 3.0], [9.0, 6.0]), (1e-3, 1e-3), dtype="bf16", **CASE)
    assert (rec.median_ms, rec.baseline_median_ms, rec.speedup) == (3.0, 7.5, 2.5)
    assert rec.err_within_2x_baseline
    eps = torch.finfo(torch.bfloat16).eps
    worse = BenchRecord.measured(ENV, ([1.0], [1.0]), (2e-3 + 4 * eps + 1e-6, 1e-3), dtype="bf16", **CASE)
    assert not worse.err_within_2x_baseline
    assert '"pass": "fwd"' in worse.to_json()


def test_record_spread_is_the_larger_swing_of_the_two_sides():
    rec = BenchRecord.measured(ENV, ([2.0, 4.0, 3.0], [6.0, 6.0, 6.3]), (1e-3, 1e-3), dtype="bf16", **CASE)
    # (p90 - p10) / p50: p10 = 2.2, p90 = 3.8 of ours, linear between ranks.
    assert rec.spread == pytest.approx((3.8 - 2.2) / 3.0)
    assert rec.percentiles_ms == pytest.approx({"p10": 2.2, "p50": 3.0, "p90": 3.8})
    assert rec.baseline_percentiles_ms == pytest.approx({"p10": 6.0, "p50": 6.0, "p90": 6.24})
    assert '"spread": ' in rec.to_json()


def test_model_case_label_says_tokens_fed_and_lstm_steps():
    """The model is fed MODEL_TOKENS tokens; its LSTMs see the record's seq steps."""
    cases = plan(["model_inference", "lstm"], ["fp32"], [8], [45], ["fwd"], torch.device("cpu"), False)
    labels = {c["op"]: benchmarking.case_label(c) for c in cases}
    assert f"tokens={benchmarking.MODEL_TOKENS} (LSTM T=45)" in labels["model_inference"]
    assert " T=45 " in labels["lstm"] and "tokens" not in labels["lstm"]


def test_load_records_names_the_file_and_line_of_what_is_wrong(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"op": "lstm"}\n\n')
    assert benchmarking.load_records([good]) == [{"op": "lstm"}]
    with pytest.raises(ValueError, match="good.jsonl:1: not a bench record \\(no speedup\\)"):
        benchmarking.load_records([good], required=("op", "speedup"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: no records"):
        benchmarking.load_records([good, empty])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"op": "lstm"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not a results record"):
        benchmarking.load_records([bad])


def test_commit_comes_from_the_environment_where_git_cannot_tell(monkeypatch):
    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, args[0])

    monkeypatch.setattr(benchmarking.subprocess, "run", no_git)
    monkeypatch.setenv(benchmarking.COMMIT_ENV, "0123abcd")
    assert benchmarking.source_commit() == "0123abcd"
    monkeypatch.delenv(benchmarking.COMMIT_ENV)
    assert benchmarking.source_commit() == "unknown"


def test_compile_baseline_names_round_trip():
    assert benchmarking.COMPILE_MODES == ("default", "reduce-overhead", "max-autotune")
    for mode in benchmarking.COMPILE_MODES:
        name = compiled_baseline_name("cudnn_bf16", mode)
        assert name.startswith("torch_compile") and name.endswith("_bf16")
        assert compile_mode_of(name) == mode
    assert compile_mode_of("cudnn_bf16") is None
    with pytest.raises(ValueError, match="compile mode"):
        compiled_baseline_name("cudnn_bf16", "fast")


def test_plan_adds_compile_and_flashrnn_baselines_only_on_a_gpu(monkeypatch):
    args = (["lstm", "model_inference"], ["bf16"], [8], [45], ["fwd"])
    cpu = plan(*args, torch.device("cpu"), False, ("default", "max-autotune"), ("cuda_fused",))
    assert cpu and {c["baseline"] for c in cpu} == {"torch_cpu_bf16"}

    # What a GPU machine would plan (which backends serve CUDA tensors is asked per case).
    monkeypatch.setattr(benchmarking, "_serving_backends", lambda *a: ["cuda"])
    gpu = plan(*args, torch.device("cuda"), False, ("default", "max-autotune"), ("cuda_fused",))
    by_op = {op: {c["baseline"] for c in gpu if c["op"] == op} for op in ("lstm", "model_inference")}
    assert by_op["lstm"] == {"cudnn_fp16", "cudnn_bf16", "flashrnn_cuda_fused"}
    assert by_op["model_inference"] == {
        "cudnn_fp16",
        "cudnn_bf16",
        "torch_compile_fp16",
        "torch_compile_bf16",
        "torch_compile_max_autotune_fp16",
        "torch_compile_max_autotune_bf16",
    }
    flash = [c for c in gpu if c["baseline"] == "flashrnn_cuda_fused"]
    assert all(c["base_dtype"] == torch.bfloat16 for c in flash)


def test_time_budget_stops_before_the_next_case(tmp_path, capsys):
    argv = ["bench", "--ops", "conv1d_stack", "--batches", "1", "2", "--no-compile", "--time-budget", "0"]
    args = build_parser().parse_args([*argv, "--out", str(tmp_path / "r.jsonl")])
    assert benchmarking.main_bench(args) == 1  # nothing was timed
    assert "time budget of 0 s spent: 2 case(s) not run" in capsys.readouterr().out
    assert not (tmp_path / "r.jsonl").exists()


def test_flashrnn_baseline_maps_nn_lstm_weights():
    pytest.importorskip("flashrnn")
    torch.manual_seed(3)
    ref = nn.LSTM(12, 16, batch_first=True, dtype=F64)
    flash = benchmarking.FlashRNNLSTM(ref, "vanilla", F64)  # FlashRNN's pure-PyTorch kernel
    x = torch.randn(3, 5, 12, dtype=F64, requires_grad=True)
    y, (h, c) = flash(x)
    y_ref, (h_ref, c_ref) = ref(x)
    for got, want in ((y, y_ref), (h, h_ref), (c, c_ref)):
        assert got.shape == want.shape and rel_err(got, want, strict=True) < 1e-12
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    assert rel_err(gx, gx_ref, strict=True) < 1e-12


def test_flashrnn_baseline_refuses_what_it_does_not_map():
    pytest.importorskip("flashrnn")
    with pytest.raises(benchmarking.BaselineUnavailable, match="one batch_first unidirectional layer"):
        benchmarking.FlashRNNLSTM(nn.LSTM(4, 4, bidirectional=True, batch_first=True), "vanilla", F64)


class _DoubleGrad(torch.autograd.Function):
    """Identity forward, twice the gradient backward: a kernel right in the forward only."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_training_check_compares_every_gradient_not_only_outputs():
    torch.manual_seed(7)
    ref64 = nn.Linear(6, 4, dtype=F64)
    ours, base = nn.Linear(6, 4), nn.Linear(6, 4)
    for m in (ours, base):
        m.load_state_dict(ref64.state_dict())
    x = torch.randn(5, 6)
    rot = benchmarking._Rotating(lambda: (x.clone().requires_grad_(), x.clone().requires_grad_(), x), 0)

    def check(run_ours):
        pair = benchmarking._finish(
            run_ours,
            lambda a, b, c: [base(b)],
            lambda a, b, c: [ref64(c.double())],
            rot,
            True,
            ([ours], [base], [ref64]),
            grad_input=True,
        )
        return pair.errors()

    right = check(lambda a, b, c: [ours(a)])
    assert [m.name for m in right] == ["output", "grad input", "grad param 0", "grad param 1"]
    assert all(m.passed and m.err < 1e-6 and m.base_err < 1e-6 for m in right)
    wrong_input_grad = {m.name: m for m in check(lambda a, b, c: [ours(_DoubleGrad.apply(a))])}
    # the output is right; only the input gradient is not, and it fails on its own
    assert wrong_input_grad["output"].passed and not wrong_input_grad["grad input"].passed
    assert wrong_input_grad["grad input"].err > 0.5
    wrong_weight_grad = check(lambda a, b, c: [_DoubleGrad.apply(ours(a))])
    assert passmark.worst(wrong_weight_grad).err > 0.5 and not passmark.all_pass(wrong_weight_grad)


def test_plan_times_each_preferred_lstm_forward_kernel_against_the_first_baseline(monkeypatch):
    monkeypatch.setattr(benchmarking, "_serving_backends", lambda *a: ["cuda", "triton"])
    kernels = ("cooperative", "cluster")
    cases = plan(
        ["lstm", "model_inference"], ["bf16"], [64], [45], ["fwd"], torch.device("cuda"), False, (), (), kernels
    )
    lstm_cuda = [(c["baseline"], c["forward_kernel"]) for c in cases if c["op"] == "lstm" and c["backend"] == "cuda"]
    assert lstm_cuda == [("cudnn_fp16", "cooperative"), ("cudnn_fp16", "cluster")]
    others = [c for c in cases if c["op"] != "lstm" or c["backend"] != "cuda"]
    assert others and all(c["forward_kernel"] is None for c in others)
    args = build_parser().parse_args(["bench", "--lstm-forward-kernels", "cooperative", "cluster"])
    assert args.lstm_forward_kernels == ["cooperative", "cluster"]


def test_preferred_forward_kernel_is_set_for_a_case_and_restored(monkeypatch):
    from fusedconvlstm.cuda import lstm as cuda_lstm
    from fusedconvlstm.cuda import persistent_config as pc
    from fusedconvlstm.cuda import planning as cuda_planning
    from tests.helpers import lstm_weights

    monkeypatch.delenv(pc.FORWARD_KERNEL_ENV, raising=False)
    monkeypatch.setattr(cuda_planning, "limits_for", lambda call, limits: pc.H100_SXM)
    xg = torch.randn(3, 2, 1, 4 * 16)
    w = [w.float() for w in lstm_weights(1, 16)]
    h0 = c0 = torch.zeros(1, 2, 16)
    for name in ("cluster", "cooperative"):
        with pc.preferring_forward_kernel(name), pc.counting_forward_kernels() as served:
            cuda_lstm.lstm_recurrence_cuda_forward(xg, w, [], h0, c0, None, [False])
        assert dict(served) == {name: 1}
        assert pc.FORWARD_KERNEL_ENV not in os.environ
    with pc.counting_forward_kernels() as served:
        cuda_lstm.lstm_recurrence_cuda_forward(
            xg.double(), [t.double() for t in w], [], h0.double(), c0.double(), None, [False]
        )
    assert dict(served) == {"stepwise": 1}


def test_plan_times_only_the_backends_asked_for(monkeypatch):
    monkeypatch.setattr(benchmarking, "_serving_backends", lambda *a: ["cuda", "triton"])
    args = (["lstm"], ["bf16"], [64], [45], ["fwd"], torch.device("cuda"), False, (), (), ("cluster",))
    cases = plan(*args, ("cuda",))
    assert {c["backend"] for c in cases} == {"cuda"}
    assert [(c["baseline"], c["forward_kernel"]) for c in cases] == [("cudnn_fp16", "cluster")]
    assert {c["backend"] for c in plan(*args)} == {"cuda", "triton"}


def test_record_judges_each_tensor_not_the_max_over_tensors():
    """One tensor past its own mark fails the record though our worst error is below the
    baseline's worst (a bad tensor cannot hide behind the baseline's worst one)."""
    eps = passmark.eps_of("bf16")
    marks = [
        passmark.TensorMark("output", 0.05, 0.04, 0.05, 0.04, eps),  # the baseline's worst: 4%
        passmark.TensorMark("grad input", 0.03, 1e-3, 0.03, 1e-3, eps),  # 30x the baseline's
    ]
    rec = BenchRecord.measured(ENV, ([1.0], [2.0]), marks, dtype="bf16", **CASE)
    assert max(m.err for m in marks) <= 2 * max(m.base_err for m in marks)  # the old rule: passed
    assert rec.err_within_2x_baseline is False
    assert (rec.max_rel_err, rec.baseline_max_rel_err) == (0.03, 1e-3)  # the worst tensor's pair
    assert [e["passed"] for e in rec.errors] == [True, False]


class _FakeTimer:
    """Scripted round timings: each call of a side returns that side's next value, and the
    order of the calls is kept."""

    def __init__(self, ours, base):
        self.values = {"ours": list(ours), "base": list(base)}
        self.calls = []

    def __call__(self, fn):
        side = fn()
        self.calls.append(side)
        return self.values[side].pop(0)


def test_rounds_interleave_the_sides_and_store_percentiles():
    timer = _FakeTimer([5.0, 1.0, 2.0, 4.0, 3.0, 9.0], [10.0, 12.0, 11.0, 13.0, 14.0, 10.0])
    ours_ms, base_ms = benchmarking.time_pair_ms(lambda: "ours", lambda: "base", torch.device("cpu"), 6, timer=timer)
    # Ours first in even rounds, the baseline first in odd ones: each side goes first as often.
    assert timer.calls == ["ours", "base", "base", "ours"] * 3
    assert ours_ms == [5.0, 1.0, 2.0, 4.0, 3.0, 9.0] and base_ms == [10.0, 12.0, 11.0, 13.0, 14.0, 10.0]
    rec = BenchRecord.measured(ENV, (ours_ms, base_ms), (1e-3, 1e-3), dtype="fp32", **CASE)
    assert rec.percentiles_ms == pytest.approx({"p10": 1.5, "p50": 3.5, "p90": 7.0})
    assert rec.median_ms == 3.5 and rec.speedup == pytest.approx(11.5 / 3.5)
    assert rec.repeats_ms == ours_ms


def _cpu_case(op, pass_="fwd", batch=2, seq=3):
    (case,) = [
        c for c in plan([op], ["fp32"], [batch], [seq], [pass_], torch.device("cpu"), False) if c["backend"] == "auto"
    ]
    return case


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_lstm_baseline_runs_in_the_mode_of_the_pass(pass_):
    """A forward case runs nn.LSTM in eval mode (no reserve space for a backward), a training
    step in training mode; ours the same."""
    case = _cpu_case("lstm", pass_)
    seen = []
    hook = nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: seen.append((type(m).__name__, m.training)) if isinstance(m, nn.LSTM) else None
    )
    try:
        pair = benchmarking.build_pair(case, torch.device("cpu"), hidden=8)
        pair.baseline()
    finally:
        hook.remove()
    train = pass_ == "fwd+bwd"
    assert seen == [("LSTM", train)]
    assert pair.baseline_mode["training"] is train


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_conv_baseline_reads_its_own_layout_without_copies(pass_):
    case = _cpu_case("conv1d_stack", pass_)
    pair = benchmarking.build_pair(case, torch.device("cpu"), hidden=512)
    first = []
    hook = nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: first.append(args[0]) if isinstance(m, nn.Conv1d) and not first else None
    )
    try:
        pair.baseline()
    finally:
        hook.remove()
    (x,) = first
    assert x.shape == (2, 100, 100) and x.is_contiguous() and x.dtype == torch.float32
    assert pair.baseline_mode["cudnn_benchmark"] is True
    marks = pair.errors()
    assert marks and all(m.passed for m in marks)
    if pass_ == "fwd+bwd":  # each side's input is a leaf with its gradient, judged like the rest
        (grad_input,) = [m for m in marks if m.name == "grad input"]
        assert 0 < grad_input.err < 1e-5 and 0 < grad_input.base_err < 1e-5


def test_cudnn_benchmark_is_on_for_a_gpu_case_and_restored():
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        with benchmarking._CudnnBenchmark(True):
            assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cudnn.benchmark is False
        with benchmarking._CudnnBenchmark(False):
            assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = saved


def test_run_case_writes_a_self_describing_record(monkeypatch):
    monkeypatch.setenv("FUSEDCONVLSTM_LSTM_FWD_CONFIG", "1,2,3")
    case = _cpu_case("lstm", "fwd+bwd")
    first = []

    def timer(fn):  # ours is timed first in round 0: 2 ms, the baseline 3 ms
        fn()
        first.append(fn) if not first else None
        return 2.0 if fn is first[0] else 3.0

    rec = benchmarking.run_case(case, torch.device("cpu"), ENV, 8, 5, timer=timer)
    d = __import__("json").loads(rec.to_json())
    assert d["status"] == "ok" and d["speedup"] == 1.5 and d["repeats_ms"] == [2.0] * 5
    assert d["percentiles_ms"] == {"p10": 2.0, "p50": 2.0, "p90": 2.0}
    assert d["timing"]["rounds"] == 5 and d["timing"]["interleaved"] is True
    s = d["settings"]
    assert s["driver"] is None and s["sm_clock_mhz"] is None and s["power_limit_w"] is None  # the CPU
    assert {"tf32_matmul", "tf32_cudnn", "cudnn_benchmark", "cudnn_deterministic"} <= set(s)
    assert s["env"] == {"FUSEDCONVLSTM_LSTM_FWD_CONFIG": "1,2,3"}
    assert d["served"] == ["lstm_recurrence:torch"]  # what auto resolved to on the CPU
    assert d["baseline_mode"]["training"] is True and d["baseline_dtype"] == "float32"
    names = [e["name"] for e in d["errors"]]
    assert names[:2] == ["output", "grad input"] and len(names) == 2 + 4  # and the 4 parameters
    assert d["err_within_2x_baseline"] is True and d["baseline_kernels"] is None and d["timestamp"]


def test_a_crashed_case_is_written_as_a_failed_record(tmp_path, monkeypatch, capsys):
    def crash(case, *a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setattr(benchmarking, "run_case", crash)
    out = tmp_path / "r.jsonl"
    args = build_parser().parse_args(["bench", "--ops", "conv1d_stack", "--batches", "1", "--out", str(out)])
    assert benchmarking.main_bench(args) == 1
    (row,) = [__import__("json").loads(line) for line in out.read_text().splitlines()]
    assert row["status"] == "crashed" and "illegal memory access" in row["error"]
    assert "median_ms" not in row and "speedup" not in row and row["err_within_2x_baseline"] is False
    assert benchmarking.load_records([out], required=PLOT_KEYS) == [row]  # a record, not timed
    assert row["op"] == "conv1d_stack" and row["batch"] == 1 and row["pass"] == "fwd"
    assert "1 case(s) did not run to the end" in capsys.readouterr().out


def test_timing_modes_are_checked_and_recorded():
    with pytest.raises(ValueError, match="timing mode"):
        benchmarking.round_timer(torch.device("cpu"), "fastest")
    gpu = benchmarking.timing_settings(torch.device("cuda"), "events", 5)
    assert gpu["warmup"] == 25 and gpu["rep"] == 100 and gpu["l2_flush"] is True
    wall = benchmarking.timing_settings(torch.device("cuda"), "wallclock", 5)
    assert wall["calls_per_round"] == benchmarking.CALLS_PER_ROUND and wall["l2_flush"] is False
    case = dict(_cpu_case("lstm", "fwd+bwd"))
    with pytest.raises(ValueError, match="graph timing"):
        benchmarking.run_case(case, torch.device("cpu"), ENV, 8, 5, timing="graph")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_model_train_step_runs_autocast_and_an_optimizer_step(dtype):
    """A training step as a user's: float32 parameters (under autocast for 16-bit), forward,
    backward and an Adam step on both sides; the error check compares gradients before any step."""
    (case,) = [
        c
        for c in plan(["model_train_step"], [dtype], [2], [45], ["fwd+bwd"], torch.device("cpu"), False)
        if c["backend"] == "auto"
    ]
    pair = benchmarking.build_pair(case, torch.device("cpu"), hidden=512)
    mode = pair.baseline_mode
    assert mode["optimizer"] == "Adam" and mode["training"] is True
    assert mode["autocast"] == (None if dtype == "fp32" else "bfloat16")
    marks = pair.errors()
    assert marks[0].name == "output" and all(m.passed for m in marks), [m.describe() for m in marks]
    for side, mods in zip((pair.ours, pair.baseline), pair.modules):
        (model,) = mods
        before = {k: v.clone() for k, v in model.state_dict().items()}
        side()
        after = model.state_dict()
        assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())
        assert any(not torch.equal(before[k], after[k]) for k in before)  # the optimizer stepped


def test_record_names_how_each_backend_served():
    """``served`` and ``launch``: the backend that served our side and its own account of how (the
    cuda LSTM's launch configuration on a GPU; torch's path here)."""
    (case,) = plan(["lstm"], ["fp32"], [2], [3], ["fwd"], torch.device("cpu"), True, only_backends=("torch",))
    rec = benchmarking.run_case(case, torch.device("cpu"), ENV, 8, 1, timer=lambda fn: (fn(), 1.0)[1])
    assert rec.served == ["lstm_recurrence:torch"]
    assert set(rec.launch) == {"lstm_recurrence:torch"} and "torch.lstm" in rec.launch["lstm_recurrence:torch"]
