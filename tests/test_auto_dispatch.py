"""``backend="auto"``: torch's own kernels on the CPU (the modules bit for bit ``torch.nn``), and on
a CUDA device a hand-written kernel only where a validation record covers the call; a refusal or
missing evidence goes to the ``torch`` backend, with the reason in ``backends.explain``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from fusedconvlstm import LSTM, Conv1dStack, backends, conv1d_stack, records, torch_backend, validate
from fusedconvlstm.backends import Implementation
from fusedconvlstm.calls.conv1d import check_conv1d_stack_args
from fusedconvlstm.calls.lstm import LSTMRecurrenceCall, check_lstm_recurrence_args
from fusedconvlstm.models import ConvLSTMClassifier
from fusedconvlstm.ops.lstm import resolve_lstm_backend
from fusedconvlstm.passmark import rel_err
from tests.helpers import SMALL_MODEL as SMALL
from tests.helpers import lstm_weights

F64 = torch.float64


def _lstm_call(T=45, B=8, H=512, dtype=torch.bfloat16, device="cuda"):
    return LSTMRecurrenceCall(T, B, 1, H, 0, dtype, torch.device(device), False, (False,), True)


def _conv_call():
    x = torch.randn(2, 9, 3)
    w = [torch.randn(4, 3, 3)]
    return check_conv1d_stack_args(x, None, w, [None], [1], [0, 0], [1], "none")


@pytest.fixture
def records_dir(tmp_path, monkeypatch):
    """An empty user records directory."""
    monkeypatch.setenv(records.CACHE_ENV, str(tmp_path))
    return tmp_path


@pytest.fixture
def fake_gpu(monkeypatch, records_dir):
    """A machine whose 'cuda' backend can serve every call on an sm_90 device (no GPU needed):
    what auto then does is up to the records."""
    monkeypatch.setattr(records, "arch_of", lambda device: "sm_90")
    real = backends.backend_why_not
    monkeypatch.setattr(
        backends, "backend_why_not", lambda name, device: None if name == "cuda" else real(name, device)
    )
    served: dict[str, str | None] = {"why_not": None}
    fake = Implementation("lstm_recurrence", "cuda", lambda call: served["why_not"], {})
    monkeypatch.setitem(backends._REGISTRY["lstm_recurrence"], "cuda", fake)
    return served


def _record(faster=True, correct=True, arch="sm_90", dtype="bfloat16", batch=(8, 64), **rng):
    bounds = dict(seq_len=[45, 45], batch=list(batch), hidden_size=[512, 512], proj_size=[0, 0])
    bounds.update(num_recurrences=[1, 2], reversed=[0, 1], has_lengths=[0, 1])
    bounds.update(rng)
    return records.Record.from_json(
        dict(
            op="lstm_recurrence",
            backend="cuda",
            arch=arch,
            dtype=dtype,
            range=bounds,
            correct=correct,
            faster=faster,
            source="test",
        ),
        "test",
    )


# --- the CPU: torch's kernels --------------------------------------------------------------------


def test_auto_on_cpu_resolves_to_torch_for_both_ops():
    xg = torch.randn(3, 2, 1, 8)
    w = lstm_weights(1, 2, dtype=torch.float32)
    call = check_lstm_recurrence_args(xg, w, [], torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), None, [False])
    assert resolve_lstm_backend("auto", call) == "torch"
    assert backends.resolve("conv1d_stack", "auto", _conv_call(), torch.device("cpu")).backend == "torch"
    reasons = backends.explain("lstm_recurrence", call, torch.device("cpu"))
    assert reasons["auto"].startswith("torch: on cpu torch's own kernels")


def test_the_shipped_records_are_a_list_of_records():
    with open(records.SHIPPED_PATH) as f:
        assert isinstance(json.load(f), list)
    records.read_file(records.SHIPPED_PATH)  # every entry parses


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(num_layers=2, bidirectional=True, batch_first=True),
        dict(num_layers=2, dropout=0.4),
        dict(proj_size=3, bidirectional=True),
        dict(bias=False, batch_first=True),
    ],
)
def test_lstm_under_auto_on_cpu_is_bitwise_nn_lstm(kw):
    """Outputs, final states and every gradient, padded, unbatched and packed input, training
    (nn.LSTM's own inter-layer dropout, drawn from the same generator state) and inference."""
    ref = nn.LSTM(5, 6, **kw)
    ours = LSTM.from_torch(ref)
    assert ours.backend == "auto"
    x = torch.randn(4, 3, 5)
    lengths = torch.tensor([4, 2, 3]) if not ref.batch_first else torch.tensor([3, 1, 2, 2])
    packed = pack_padded_sequence(x, lengths, batch_first=ref.batch_first, enforce_sorted=False)
    unbatched = x[0] if ref.batch_first else x[:, 0]
    for training in (True, False):
        ref.train(training)
        ours.train(training)
        for inp in (x, packed, unbatched):
            results = []
            for m in (ref, ours):
                m.zero_grad(set_to_none=True)
                torch.manual_seed(7)
                out, (h, c) = m(inp)
                data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
                (data.sum() + 2 * h.sum() + 3 * c.sum()).backward()
                results.append([data, h, c] + [p.grad for p in m.parameters()])
            for a, b in zip(*results):
                assert torch.equal(a, b)


def test_lstm_under_auto_takes_the_torch_path_and_named_backends_keep_the_op(monkeypatch):
    ref = nn.LSTM(4, 5)
    ours = LSTM.from_torch(ref)
    x = torch.randn(3, 2, 4)
    calls = []
    real = torch_backend.lstm
    monkeypatch.setattr(torch_backend, "lstm", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours(x)
    assert calls == [1]
    ours.backend = "reference"
    out, _ = ours(x)
    assert calls == [1] and rel_err(out, ref(x)[0], strict=True) < 1e-5
    ours.backend = "auto"
    monkeypatch.setenv(backends.ENV_VAR, "reference")  # the environment still replaces auto
    ours(x)
    assert calls == [1]


def test_conv_stack_under_auto_on_cpu_is_bitwise_the_conv_chain():
    chain = nn.Sequential(
        nn.Conv1d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(6, 6, 3, dilation=2),
        nn.GELU(),
        nn.Conv1d(6, 5, 3, stride=2),
    )
    stack = Conv1dStack.from_torch(chain)
    x = torch.randn(2, 4, 20)
    results = []
    for m in (chain, stack):
        xx = x.clone().requires_grad_()
        y = m(xx)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        results.append([y, xx.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_conv_stack_dropout_under_auto_draws_the_masks_of_the_op():
    """The torch path's dropout between layers is the package's counter-based dropout: the same
    generator state gives the masks the op draws (the reference backend, float64)."""
    stack = Conv1dStack(3, [4, 5], kernel_size=3, activation="relu", dropout=0.5, dtype=F64).train()
    x = torch.randn(2, 17, 3, dtype=F64)
    torch.manual_seed(3)
    got = stack(x)
    stack.backend = "reference"
    torch.manual_seed(3)
    want = stack(x)
    assert rel_err(got, want, strict=True) < 1e-13
    assert rel_err(got, stack.eval()(x), strict=True) > 1e-3


def test_conv_stack_op_on_the_torch_backend_matches_the_reference():
    x = torch.randn(2, 13, 3, dtype=F64, requires_grad=True)
    w = [torch.randn(4, 3, 3, dtype=F64, requires_grad=True), torch.randn(5, 4, 2, dtype=F64, requires_grad=True)]
    b = [torch.randn(4, dtype=F64, requires_grad=True), None]
    kw = dict(stride=[1, 2], padding=[(1, 0), (0, 0)], activation=["silu", "none"], dropout=[0.2, 0.3])
    seed = torch.tensor(5)
    outs = []
    for backend in ("torch", "reference"):
        y = conv1d_stack(x, w, b, backend=backend, seed=seed, **kw)
        outs.append([y, *torch.autograd.grad(y.square().sum(), [x, *w, b[0]])])
    for a, r in zip(*outs):
        assert rel_err(a, r, strict=True) < 1e-13
    assert torch.autograd.gradcheck(lambda x: conv1d_stack(x, w, b, backend="torch", seed=seed, **kw), (x,))


def test_model_under_auto_on_cpu_is_bitwise_its_twin():
    """Inference and a training step (the embedding dropout with the package's masks, as the twin
    draws them by default): outputs and every gradient."""
    model = ConvLSTMClassifier(**SMALL)
    twin = model.to_reference()
    tokens = torch.randint(0, 50, (3, 20))
    for training in (True, False):
        results = []
        for m in (model.train(training), twin.train(training)):
            m.zero_grad(set_to_none=True)
            torch.manual_seed(11)
            out = m(tokens)
            out.sum().backward()
            results.append([out] + [p.grad for p in m.parameters()])
        for a, b in zip(*results):
            assert torch.equal(a, b)


def test_parallel_lstm_under_auto_is_each_nn_lstm():
    from fusedconvlstm import parallel_lstm

    refs = [nn.LSTM(4, 5, batch_first=True) for _ in range(2)]
    ours = [LSTM.from_torch(r) for r in refs]
    x = torch.randn(3, 6, 4)
    for (out, (h, c)), ref in zip(parallel_lstm(ours, x), refs):
        o_ref, (h_ref, c_ref) = ref(x)
        assert torch.equal(out, o_ref) and torch.equal(h, h_ref) and torch.equal(c, c_ref)


def test_flatten_parameters_runs_after_every_move_and_leaves_cpu_weights_alone(monkeypatch):
    lstm = LSTM(6, 5, num_layers=2, bidirectional=True, proj_size=3)
    before = [w.data_ptr() for w in lstm._flat_weights]
    calls = []
    monkeypatch.setattr(LSTM, "flatten_parameters", lambda self: calls.append(self))
    lstm.double()
    lstm.to(torch.float32)
    assert calls == [lstm, lstm]
    monkeypatch.undo()
    lstm.flatten_parameters()  # CPU weights: no cuDNN buffer
    assert [w.data_ptr() for w in lstm._flat_weights] != before  # .double() and back made new tensors
    ptrs = [w.data_ptr() for w in lstm._flat_weights]
    lstm.flatten_parameters()
    assert [w.data_ptr() for w in lstm._flat_weights] == ptrs


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{}, {"num_layers": 2, "bidirectional": True}, {"proj_size": 16}])
def test_gpu_torch_path_uses_flat_weights_like_nn_lstm(kw):
    """On a GPU the torch path hands cuDNN weights that are already one flat buffer: no repacking
    warning, and the results of nn.LSTM with the same weights bit for bit."""
    import warnings

    ref = nn.LSTM(24, 32, batch_first=True, **kw).cuda()
    ours = LSTM(24, 32, batch_first=True, **kw)
    ours.load_state_dict(ref.state_dict())
    ours.cuda()
    storages = {w.untyped_storage().data_ptr() for w in ours._flat_weights}
    assert len(storages) == 1
    x = torch.randn(5, 7, 24, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, (h, c) = ours(x)
    out_ref, (h_ref, c_ref) = ref(x)
    assert torch.equal(out, out_ref) and torch.equal(h, h_ref) and torch.equal(c, c_ref)


def test_modules_under_auto_compile_fullgraph():
    """Under torch.compile the choice is made once while tracing; a forward that records
    gradients runs the torch backend's gate-level op (AOT autograd cannot trace aten's LSTM
    backward), one without gradients torch.lstm itself."""
    ref = nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True, dtype=F64)
    ours = LSTM.from_torch(ref)
    x = torch.randn(3, 4, 5, dtype=F64)
    torch._dynamo.reset()
    out, (h, c) = torch.compile(ours, fullgraph=True, backend="aot_eager")(x)
    o_ref, (h_ref, c_ref) = ref(x)
    assert (
        rel_err(out, o_ref, strict=True) < 1e-12
        and rel_err(h, h_ref, strict=True) < 1e-12
        and rel_err(c, c_ref, strict=True) < 1e-12
    )
    out.sum().backward()
    torch._dynamo.reset()
    with torch.no_grad():
        out, _ = torch.compile(ours, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(out, o_ref.detach())
    chain = nn.Sequential(nn.Conv1d(4, 6, 3, padding=1), nn.Tanh(), nn.Conv1d(6, 5, 3))
    stack = Conv1dStack.from_torch(chain)
    xc = torch.randn(2, 4, 11)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(stack, fullgraph=True, backend="aot_eager")(xc), chain(xc))


# --- a CUDA device: kernels only under a validation record ---------------------------------------


def test_unrecorded_cuda_call_under_auto_goes_to_torch(fake_gpu):
    name, why = backends.auto_choice("lstm_recurrence", _lstm_call(), torch.device("cuda"))
    assert name == "torch"
    assert "no validation record covers cuda's lstm_recurrence on sm_90 bfloat16" in why
    cuda = torch.device("cuda")
    assert backends.module_backend("lstm_recurrence", "auto", cuda, _lstm_call) == "torch"
    # Named, the kernel still runs (here: resolves) as before.
    assert backends.module_backend("lstm_recurrence", "cuda", cuda, _lstm_call) == "cuda"


def test_a_record_enables_the_kernel_for_its_covered_range_only(fake_gpu):
    records.append_user_records([_record()])
    cuda = torch.device("cuda")
    assert backends.auto_choice("lstm_recurrence", _lstm_call(B=8), cuda)[0] == "cuda"
    assert backends.auto_choice("lstm_recurrence", _lstm_call(B=64), cuda)[0] == "cuda"
    explained = backends.explain("lstm_recurrence", _lstm_call(B=8), cuda)["auto"]
    assert explained.startswith("cuda: validated on sm_90 bfloat16")
    for other in (_lstm_call(B=65), _lstm_call(T=46), _lstm_call(H=256), _lstm_call(dtype=torch.float16)):
        name, why = backends.auto_choice("lstm_recurrence", other, cuda)
        assert name == "torch" and "no validation record covers" in why


def test_a_record_of_another_architecture_does_not_count(fake_gpu):
    records.append_user_records([_record(arch="sm_80")])
    assert backends.auto_choice("lstm_recurrence", _lstm_call(), torch.device("cuda"))[0] == "torch"


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        (dict(faster=None), "speed is unknown"),
        (dict(faster=False), "slower than torch"),
        (dict(correct=False, faster=True), "wrong"),
    ],
)
def test_a_record_without_both_verdicts_enables_nothing(fake_gpu, kw, words):
    records.append_user_records([_record(**kw)])
    name, why = backends.auto_choice("lstm_recurrence", _lstm_call(), torch.device("cuda"))
    assert name == "torch" and words in why


def test_a_wrong_verdict_wins_over_a_good_one(fake_gpu):
    records.append_user_records([_record(), _record(correct=False, batch=(1, 8))])
    assert backends.auto_choice("lstm_recurrence", _lstm_call(B=8), torch.device("cuda"))[0] == "torch"
    assert backends.auto_choice("lstm_recurrence", _lstm_call(B=9), torch.device("cuda"))[0] == "cuda"


def test_a_refusal_goes_to_torch_with_the_reason(fake_gpu):
    records.append_user_records([_record()])
    fake_gpu["why_not"] = "the persistent kernel needs 300 KiB of shared memory, the device has 228"
    explained = backends.explain("lstm_recurrence", _lstm_call(), torch.device("cuda"))
    assert explained["auto"].startswith("torch: cuda refuses: the persistent kernel needs 300 KiB")
    assert backends.resolve("lstm_recurrence", "auto", _lstm_call(), torch.device("cuda")).backend == "torch"


def test_user_records_are_keyed_by_package_version_and_build(records_dir, monkeypatch):
    path = records.user_records_path()
    assert path.startswith(str(records_dir)) and records.package_version() in path
    assert records.build_key() in path
    monkeypatch.setattr(records, "build_key", lambda: "otherbuild")
    assert records.user_records_path() != path


def test_a_malformed_records_file_is_an_error_naming_it(records_dir):
    path = records.user_records_path()
    with open(path, "w") as f:
        json.dump([{"op": "lstm_recurrence"}], f)
    with pytest.raises(records.RecordError, match="needs backend"):
        records.all_records()


# --- check --record, env, bench ------------------------------------------------------------------


def _check_row(backend, passed=True, batch=64, dtype="bfloat16"):
    from fusedconvlstm.validate import CheckResult

    feats = LSTMRecurrenceCall(45, batch, 1, 512, 0, torch.bfloat16, torch.device("cuda"), False, (False,)).features()
    return CheckResult(
        op="lstm",
        case="T45 B64 I512 H512 (reference model)",
        backend=backend,
        dtype=dtype,
        max_rel_err=1e-3 if passed else 1.0,
        torch_rel_err=1e-3,
        tolerance=2e-2,
        worst="output",
        call_op="lstm_recurrence",
        backend_name=backend,
        features=feats,
    )


def _bench_row(speedup, pass_="fwd", batch=64, device="FAKE GPU"):
    return dict(
        op="lstm", backend="cuda", dtype="bf16", batch=batch, seq=45, hidden=512, device=device, pass_=pass_,
        baseline="cudnn_fp16", speedup=speedup, err_within_2x_baseline=True, **{"pass": pass_},
    )  # fmt: skip


@pytest.fixture
def gpu_name(monkeypatch):
    monkeypatch.setattr(records, "arch_of", lambda device: "sm_90")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FAKE GPU")


def test_check_records_only_what_it_verified_and_speed_stays_unknown_without_bench(gpu_name):
    rows = [_check_row("cuda"), _check_row("triton", passed=False), _check_row("torch"), _check_row("reference")]
    got = {r.backend: r for r in validate.records_from_check(rows, torch.device("cuda"))}
    assert set(got) == {"cuda", "triton"}  # torch's and the reference's rows need no record
    assert got["cuda"].correct and got["cuda"].faster is None and not got["cuda"].enables
    assert not got["triton"].correct and got["triton"].faster is None
    assert dict((k, (lo, hi)) for k, lo, hi in got["cuda"].range)["batch"] == (64, 64)
    assert validate.records_from_check(rows, torch.device("cpu")) == []


def test_check_with_bench_results_records_the_speed(gpu_name):
    cuda = torch.device("cuda")
    faster = validate.records_from_check([_check_row("cuda")], cuda, [_bench_row(1.4), _bench_row(1.2, "fwd+bwd")])
    assert faster[0].faster is True and faster[0].enables
    slower = validate.records_from_check([_check_row("cuda")], cuda, [_bench_row(1.4), _bench_row(0.8, "fwd+bwd")])
    assert slower[0].faster is False
    # A timing of another batch or another GPU says nothing about this record.
    elsewhere = [_bench_row(1.4, batch=8), _bench_row(1.4, device="OTHER GPU")]
    assert validate.records_from_check([_check_row("cuda")], cuda, elsewhere)[0].faster is None


def test_records_from_check_enable_auto_for_exactly_that_shape(fake_gpu, gpu_name):
    new = validate.records_from_check([_check_row("cuda")], torch.device("cuda"), [_bench_row(1.4)])
    records.append_user_records(new)
    cuda = torch.device("cuda")
    assert backends.auto_choice("lstm_recurrence", _lstm_call(B=64), cuda)[0] == "cuda"
    assert backends.auto_choice("lstm_recurrence", _lstm_call(B=63), cuda)[0] == "torch"


def test_env_prints_what_auto_picks_for_the_reference_shapes_and_why(capsys, records_dir):
    from fusedconvlstm.cli import main

    main(["env"])
    out = capsys.readouterr().out
    assert "auto on cpu:" in out
    assert "lstm_recurrence LSTM 512->512 T=45 B=8 float32: torch (on cpu torch's own kernels" in out
    assert "conv1d_stack    five convs B=64 T=100 float32: torch (" in out


def test_bench_on_the_cpu_times_every_drop_in_case_under_auto():
    from fusedconvlstm.benchmarking import plan

    cases = plan(
        ["lstm", "conv1d_stack", "model_inference", "model_train_step"], ["fp32"], [8, 64], [45],
        ["fwd", "fwd+bwd"], torch.device("cpu"), False, (), (), (), ("auto",),
    )  # fmt: skip
    got = {(c["op"], c["pass_"], c["batch"]) for c in cases}
    assert all(c["backend"] == "auto" and c["baseline"] == "torch_cpu_fp32" for c in cases)
    for batch in (8, 64):
        assert {("lstm", "fwd", batch), ("lstm", "fwd+bwd", batch)} <= got
    assert {("conv1d_stack", "fwd", 64), ("model_inference", "fwd", 64), ("model_train_step", "fwd+bwd", 64)} <= got


def test_cpu_timing_interleaves_the_two_sides():
    from fusedconvlstm.benchmarking import time_pair_ms

    order = []
    ours, base = time_pair_ms(lambda: order.append("a"), lambda: order.append("b"), torch.device("cpu"), 2)
    assert len(ours) == len(base) == 2
    runs = "".join(order)
    assert "ab" in runs and "ba" in runs and abs(runs.count("a") - runs.count("b")) <= 1
