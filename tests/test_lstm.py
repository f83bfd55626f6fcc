"""``fusedconvlstm.LSTM`` and the ``lstm_recurrence`` op on the reference backend, against
``torch.nn.LSTM`` in float64; state-dict compatibility; opcheck/gradcheck; argument errors."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedconvlstm
from fusedconvlstm import LSTM, lstm_recurrence
from fusedconvlstm.passmark import rel_err
from tests.helpers import lstm_weights, within_relative_mark

F64 = torch.float64
TOL64 = 1e-10  # float64 end to end: only summation order differs from nn.LSTM


def _pair(input_size=5, hidden=6, **kw):
    ref = nn.LSTM(input_size, hidden, dtype=F64, **kw)
    return ref, LSTM.from_torch(ref, backend="reference")


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _compare_forward_backward(ref, fused, x, hx=None, out_of=lambda o: o):
    x_ref = x.detach().clone().requires_grad_()
    x_fused = x.detach().clone().requires_grad_()
    hx_ref = None if hx is None else tuple(h.detach().clone().requires_grad_() for h in hx)
    hx_fused = None if hx is None else tuple(h.detach().clone().requires_grad_() for h in hx)
    o_ref, (h_ref, c_ref) = ref(x_ref, hx_ref)
    o_fus, (h_fus, c_fus) = fused(x_fused, hx_fused)
    o_ref, o_fus = out_of(o_ref), out_of(o_fus)
    for name, a, b in (("output", o_fus, o_ref), ("h_n", h_fus, h_ref), ("c_n", c_fus, c_ref)):
        assert a.shape == b.shape, name
        assert rel_err(a, b, strict=True) < TOL64, name
    # Backward through everything, with random cotangents.
    go, gh, gc = torch.randn_like(o_ref), torch.randn_like(h_ref), torch.randn_like(c_ref)
    ((o_ref * go).sum() + (h_ref * gh).sum() + (c_ref * gc).sum()).backward()
    ((o_fus * go).sum() + (h_fus * gh).sum() + (c_fus * gc).sum()).backward()
    assert rel_err(x_fused.grad, x_ref.grad, strict=True) < TOL64, "grad input"
    if hx is not None:
        for k in range(2):
            assert rel_err(hx_fused[k].grad, hx_ref[k].grad, strict=True) < TOL64, f"grad hx[{k}]"
    g_ref, g_fus = _grads(ref), _grads(fused)
    assert g_ref.keys() == g_fus.keys()
    for n in g_ref:
        assert rel_err(g_fus[n], g_ref[n], strict=True) < TOL64, f"grad {n}"


OPTIONS = list(
    itertools.product(
        [1, 2],  # num_layers
        [True, False],  # bias
        [False, True],  # batch_first
        [False, True],  # bidirectional
        [0, 3],  # proj_size
    )
)


@pytest.mark.parametrize("num_layers,bias,batch_first,bidirectional,proj_size", OPTIONS)
def test_lstm_matches_torch_every_option(num_layers, bias, batch_first, bidirectional, proj_size):
    ref, fused = _pair(
        num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional, proj_size=proj_size
    )
    T, B = 7, 3
    x = torch.randn((B, T, 5) if batch_first else (T, B, 5), dtype=F64)
    D = 2 if bidirectional else 1
    P = proj_size or 6
    hx = (torch.randn(num_layers * D, B, P, dtype=F64), torch.randn(num_layers * D, B, 6, dtype=F64))
    _compare_forward_backward(ref, fused, x)
    _compare_forward_backward(ref, fused, x, hx)


def test_lstm_unbatched_input():
    ref, fused = _pair(num_layers=2, bidirectional=True)
    x = torch.randn(7, 5, dtype=F64)
    hx = (torch.randn(4, 6, dtype=F64), torch.randn(4, 6, dtype=F64))
    _compare_forward_backward(ref, fused, x)
    _compare_forward_backward(ref, fused, x, hx)


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_packed_sequence(enforce_sorted, bidirectional):
    ref, fused = _pair(num_layers=2, bidirectional=bidirectional)
    T, B = 9, 5
    lengths = torch.tensor([9, 7, 7, 4, 1]) if enforce_sorted else torch.tensor([4, 9, 1, 7, 7])
    x = torch.randn(T, B, 5, dtype=F64)
    D = 2 if bidirectional else 1
    hx = (torch.randn(2 * D, B, 6, dtype=F64), torch.randn(2 * D, B, 6, dtype=F64))
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    o_ref, (h_ref, c_ref) = ref(packed, hx)
    o_fus, (h_fus, c_fus) = fused(packed, hx)
    assert torch.equal(o_fus.batch_sizes, o_ref.batch_sizes)
    assert rel_err(o_fus.data, o_ref.data, strict=True) < TOL64
    assert rel_err(h_fus, h_ref, strict=True) < TOL64 and rel_err(c_fus, c_ref, strict=True) < TOL64
    # Gradients through the packed path.
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    for mod, xx in ((ref, x1), (fused, x2)):
        out, (h, _) = mod(pack_padded_sequence(xx, lengths, enforce_sorted=enforce_sorted), hx)
        padded, _ = pad_packed_sequence(out)
        (padded.square().sum() + h.sum()).backward()
    assert rel_err(x2.grad, x1.grad, strict=True) < TOL64
    for n, g in _grads(ref).items():
        assert rel_err(_grads(fused)[n], g, strict=True) < TOL64, n


def test_lstm_dropout_between_layers_matches_torch_rng():
    """In training, dropout between layers draws the same masks as nn.LSTM on the CPU."""
    ref, fused = _pair(num_layers=3, dropout=0.4)
    ref.train()
    fused.train()
    x = torch.randn(6, 4, 5, dtype=F64)
    torch.manual_seed(11)
    o_ref, _ = ref(x)
    torch.manual_seed(11)
    o_fus, _ = fused(x)
    assert rel_err(o_fus, o_ref, strict=True) < TOL64
    # Evaluation mode switches dropout off.
    ref.eval()
    fused.eval()
    assert rel_err(fused(x)[0], ref(x)[0], strict=True) < TOL64


def test_lstm_batch_of_zero_returns_empty_like_torch():
    ref, fused = _pair()
    x = torch.randn(4, 0, 5, dtype=F64)
    o_ref, (h_ref, _) = ref(x)
    o_fus, (h_fus, _) = fused(x)
    assert o_fus.shape == o_ref.shape and h_fus.shape == h_ref.shape


def test_state_dict_round_trips_both_ways():
    ref = nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3)
    fused = LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3)
    assert ref.state_dict().keys() == fused.state_dict().keys()
    fused.load_state_dict(ref.state_dict())
    back = nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3)
    back.load_state_dict(fused.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(4, 2, 5)
    assert torch.allclose(LSTM.from_torch(ref)(x)[0], ref(x)[0], atol=1e-6)


def test_from_torch_keeps_config_and_parameter_layout():
    ref = nn.LSTM(5, 6, num_layers=2, bias=False, batch_first=True, dropout=0.2, bidirectional=True, proj_size=2)
    fused = LSTM.from_torch(ref, backend="reference")
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [[p.shape for p in g] for g in fused.all_weights] == [[p.shape for p in g] for g in ref.all_weights]
    for attr in (
        "input_size",
        "hidden_size",
        "num_layers",
        "bias",
        "batch_first",
        "dropout",
        "bidirectional",
        "proj_size",
    ):
        assert getattr(fused, attr) == getattr(ref, attr), attr
    assert fused.backend == "reference"
    assert repr(fused) == repr(ref)[:-1] + ", backend='reference')"


def test_default_init_matches_nn_lstm_distribution():
    torch.manual_seed(3)
    a = nn.LSTM(8, 16)
    torch.manual_seed(3)
    b = LSTM(8, 16)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: m(torch.randn(3, 2, 4, 5)), "2D or 3D"),
        (lambda m: m(torch.randn(3, 2, 4)), "input_size"),
        (lambda m: m(torch.randn(3, 2, 5, dtype=torch.float32)), "dtype"),
        (lambda m: m(torch.randn(0, 2, 5, dtype=F64)), "at least one time step"),
        (
            lambda m: m(
                torch.randn(3, 2, 5, dtype=F64), (torch.randn(1, 3, 6, dtype=F64), torch.randn(1, 2, 6, dtype=F64))
            ),
            r"hx\[0\]",
        ),
        (
            lambda m: m(
                torch.randn(3, 2, 5, dtype=F64), (torch.randn(1, 2, 6, dtype=F64), torch.randn(1, 2, 7, dtype=F64))
            ),
            r"hx\[1\]",
        ),
        (lambda m: m(torch.randn(3, 2, 5, dtype=F64), torch.randn(1, 2, 6, dtype=F64)), "tuple"),
        (
            lambda m: m(torch.randn(3, 2, 5, dtype=F64), (torch.randn(2, 6, dtype=F64), torch.randn(2, 6, dtype=F64))),
            "3-D",
        ),
        (lambda m: m([1, 2, 3]), "Tensor or PackedSequence"),
    ],
)
def test_lstm_bad_input_errors_name_the_argument(call, match):
    _, fused = _pair()
    with pytest.raises((ValueError, TypeError), match=match):
        call(fused)


def test_lstm_integer_input_is_told_to_become_floating_point():
    """Never the advice to convert the model to an integer dtype."""
    _, fused = _pair()
    with pytest.raises(TypeError, match="floating-point") as err:
        fused(torch.ones(3, 2, 5, dtype=torch.int64))
    assert "model.to(torch.int64)" not in str(err.value)
    assert f"input.to({fused.weight_ih_l0.dtype})" in str(err.value)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"backend": "cudnn"}, "backend must be one of"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"dropout": 1.5}, "dropout must be a number in"),
        ({"proj_size": 4}, "proj_size must be smaller than hidden_size"),
        ({"proj_size": -1}, "proj_size must be a positive integer or zero"),
    ],
)
def test_lstm_bad_constructor_arguments(kwargs, match):
    args = {"input_size": 4, "hidden_size": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        LSTM(**args)


# ---- the op itself ------------------------------------------------------------------------------


def _op_args(T=5, B=3, D=2, H=4, P=None, lengths=None, dtype=F64, requires_grad=False):
    P = P or H
    xg = torch.randn(T, B, D, 4 * H, dtype=dtype, requires_grad=requires_grad)
    w_hh = lstm_weights(D, H, P, dtype=dtype, requires_grad=requires_grad)
    w_hr = [(0.5 * torch.randn(P, H, dtype=dtype)).requires_grad_(requires_grad) for _ in range(D)] if P != H else []
    h0 = torch.randn(D, B, P, dtype=dtype, requires_grad=requires_grad)
    c0 = torch.randn(D, B, H, dtype=dtype, requires_grad=requires_grad)
    return xg, w_hh, w_hr, h0, c0, lengths


@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("proj", [False, True])
def test_lstm_recurrence_gradcheck_reference(with_lengths, proj):
    lengths = torch.tensor([5, 2, 0]) if with_lengths else None
    xg, w_hh, w_hr, h0, c0, lengths = _op_args(
        T=4 if not with_lengths else 5, H=3, P=2 if proj else None, lengths=lengths, requires_grad=True
    )

    def f(xg, h0, c0, *w):
        D = len(w_hh)
        y, h, c = lstm_recurrence(
            xg, w[:D], h0, c0, w_hr=w[D:], lengths=lengths, reverse=[False, True], backend="reference"
        )
        return y, h, c

    assert torch.autograd.gradcheck(f, (xg, h0, c0, *w_hh, *w_hr))


def test_lstm_recurrence_opcheck_reference():
    for lengths in (None, torch.tensor([5, 3, 1])):
        xg, w_hh, w_hr, h0, c0, _ = _op_args(lengths=lengths, requires_grad=True)
        torch.library.opcheck(
            torch.ops.fusedconvlstm.lstm_recurrence.default,
            (xg, w_hh, w_hr, h0, c0, lengths, [False, True], "reference"),
        )


def test_lstm_recurrence_lengths_mask_outputs_and_state():
    lengths = torch.tensor([5, 2, 0])
    xg, w_hh, _, h0, c0, _ = _op_args(lengths=lengths)
    y, h_n, c_n = lstm_recurrence(xg, w_hh, h0, c0, lengths=lengths, reverse=[False, True], backend="reference")
    mask = (torch.arange(5).unsqueeze(1) < lengths).unsqueeze(-1).unsqueeze(-1)
    assert torch.all(y.masked_select(~mask.expand_as(y)) == 0)
    # Row 2 has length 0: both recurrences keep their initial state.
    assert torch.equal(h_n[:, 2], h0[:, 2]) and torch.equal(c_n[:, 2], c0[:, 2])
    # Row 1 (length 2) equals running the recurrence on its two valid steps alone.
    y1, h1, c1 = lstm_recurrence(xg[:2, 1:2], w_hh, h0[:, 1:2], c0[:, 1:2], reverse=[False, True], backend="reference")
    assert rel_err(h_n[:, 1:2], h1, strict=True) < TOL64 and rel_err(y[:2, 1:2], y1, strict=True) < TOL64


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(xg=a["xg"][0]), "xg must be a 4-D"),
        (lambda a: a.update(xg=a["xg"].to(torch.int32)), "xg must be one of"),
        (lambda a: a.update(xg=a["xg"][..., :-1]), r"4\*hidden_size"),
        (lambda a: a.update(w_hh=a["w_hh"][:1]), "one weight per recurrence"),
        (lambda a: a.update(w_hh=[a["w_hh"][0], a["w_hh"][1][:, :-1]]), r"w_hh\[1\] must have shape"),
        (lambda a: a.update(w_hh=[a["w_hh"][0], a["w_hh"][1].float()]), r"w_hh\[1\] must have the dtype"),
        (lambda a: a.update(h0=a["h0"][:, :2]), "h0 must have shape"),
        (lambda a: a.update(c0=a["c0"].float()), "c0 must have the dtype"),
        (lambda a: a.update(lengths=torch.tensor([1, 2])), "lengths must be a 1-D tensor of batch size"),
        (lambda a: a.update(lengths=torch.tensor([1.0, 2.0, 3.0])), "lengths must be int32 or int64"),
        (lambda a: a.update(lengths=torch.tensor([1, 9, 3])), r"lengths must lie in \[0, 5\]"),
        (lambda a: a.update(reverse=[False]), "reverse must have one entry"),
    ],
)
def test_lstm_recurrence_bad_arguments(mutate, match):
    xg, w_hh, _, h0, c0, _ = _op_args()
    args = dict(xg=xg, w_hh=w_hh, h0=h0, c0=c0, lengths=None, reverse=[False, True])
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        lstm_recurrence(
            args["xg"],
            args["w_hh"],
            args["h0"],
            args["c0"],
            lengths=args["lengths"],
            reverse=args["reverse"],
            backend="reference",
        )


def test_lstm_recurrence_rejects_empty_sequence():
    with pytest.raises(ValueError, match="at least one time step"):
        lstm_recurrence(torch.randn(0, 2, 1, 8), lstm_weights(1, 2, dtype=torch.float32))


def test_lstm_module_runs_under_torch_compile_fullgraph():
    ref, fused = _pair(num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 6, 5, dtype=F64)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    out, (h, c) = compiled(x)
    o_ref, (h_ref, c_ref) = ref(x)
    assert (
        rel_err(out, o_ref, strict=True) < TOL64
        and rel_err(h, h_ref, strict=True) < TOL64
        and rel_err(c, c_ref, strict=True) < TOL64
    )


def test_named_backend_that_cannot_serve_raises_with_reason():
    _, fused = _pair()
    fused.backend = "cuda"
    with pytest.raises(fusedconvlstm.BackendUnavailableError, match="backend='cuda' cannot serve"):
        fused(torch.randn(3, 2, 5, dtype=F64))


def test_lstm_recurrence_backward_opcheck_reference():
    lengths = torch.tensor([5, 3, 1])
    xg, w_hh, w_hr, h0, c0, _ = _op_args(lengths=lengths, P=2)
    y, h_n, c_n, ws = torch.ops.fusedconvlstm.lstm_recurrence(
        xg, w_hh, w_hr, h0, c0, lengths, [False, True], "reference"
    )
    grads = (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n))
    torch.library.opcheck(
        torch.ops.fusedconvlstm.lstm_recurrence_backward.default,
        (*grads, xg, w_hh, w_hr, h0, c0, lengths, [False, True], y, ws, "reference"),
    )


def _nn_lstm_under_cpu_bf16_autocast(ref: nn.LSTM, x: torch.Tensor):
    """``ref(x)`` under CPU bf16 autocast, where nn.LSTM runs oneDNN's bf16 LSTM. On a CPU whose
    oneDNN has no bf16 LSTM primitive (no AVX-512 BF16 / AMX) torch itself raises; then the same
    computation spelled out: input and weights rounded to bf16, float32 arithmetic, results in
    bf16 (the dtypes nn.LSTM gives where the primitive exists)."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ref(x)
    except RuntimeError as exc:
        if "primitive descriptor" not in str(exc):
            raise
    rounded = copy.deepcopy(ref)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16))
        o, (h, c) = rounded(x.to(torch.bfloat16).float())
    return o.to(torch.bfloat16), (h.to(torch.bfloat16), c.to(torch.bfloat16))


def test_lstm_under_cpu_autocast_behaves_like_nn_lstm():
    ref = nn.LSTM(5, 6, num_layers=2, batch_first=True)
    fused = LSTM.from_torch(ref, backend="reference")
    x = torch.randn(3, 7, 5)
    o_ref, (h_ref, c_ref) = _nn_lstm_under_cpu_bf16_autocast(ref, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_fus, (h_fus, c_fus) = fused(x)
    assert (o_fus.dtype, h_fus.dtype, c_fus.dtype) == (o_ref.dtype, h_ref.dtype, c_ref.dtype) == (torch.bfloat16,) * 3
    ref64 = LSTM.from_torch(ref.double(), backend="reference")
    want, _ = ref64(x.double())
    assert within_relative_mark(o_fus, o_ref, want, torch.bfloat16, slack_eps=4)
    o_fus.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fused.parameters())


def test_stepwise_forward_without_gradients_writes_no_workspace():
    """The step-wise driver (on CPU tensors: the cell ops' CPU implementations) with
    save_for_backward=False returns an empty workspace and the same results."""
    from fusedconvlstm.cuda import lstm as cuda_lstm

    lengths = torch.tensor([5, 2, 4])
    xg, w_hh, _, h0, c0, _ = _op_args(lengths=lengths)
    runs = [
        cuda_lstm.lstm_recurrence_stepwise_forward(xg, w_hh, [], h0, c0, lengths, [False, True], save_for_backward=s)
        for s in (False, True)
    ]
    assert runs[0][3].numel() == 0 and runs[1][3].numel() > 0
    assert all(torch.equal(a, b) for a, b in zip(runs[0][:3], runs[1][:3]))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_forward_without_gradients_saves_no_workspace_and_backward_recomputes(backend):
    """With no gradient in view the forward writes no workspace; a backward handed that empty
    workspace recomputes it and gives the usual gradients."""
    dtype = F64 if backend == "reference" else torch.float32
    lengths = torch.tensor([5, 2, 4])
    xg, w_hh, _, h0, c0, _ = _op_args(lengths=lengths, dtype=dtype)
    rev = [False, True]
    op, op_bw = torch.ops.fusedconvlstm.lstm_recurrence, torch.ops.fusedconvlstm.lstm_recurrence_backward
    y, h_n, c_n, ws = op(xg, w_hh, [], h0, c0, lengths, rev, backend, False)
    assert ws.numel() == 0
    y2, h2, c2, ws_saved = op(xg, w_hh, [], h0, c0, lengths, rev, backend, True)
    assert torch.equal(y, y2) and torch.equal(h_n, h2) and torch.equal(c_n, c2)
    grads = (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n))
    got = op_bw(*grads, xg, w_hh, [], h0, c0, lengths, rev, y, ws, backend)
    want = op_bw(*grads, xg, w_hh, [], h0, c0, lengths, rev, y, ws_saved, backend)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert torch.equal(a, b)


def test_wrapper_saves_workspace_only_when_a_gradient_is_needed(monkeypatch):
    seen = []
    real = torch.ops.fusedconvlstm.lstm_recurrence.default

    xg, w_hh, _, h0, c0, _ = _op_args()
    import fusedconvlstm.ops.lstm as ops_lstm

    monkeypatch.setattr(ops_lstm, "_lstm_recurrence_op", lambda *a: seen.append(a[8]) or real(*a))  # save_for_backward
    lstm_recurrence(xg, w_hh, h0, c0, reverse=[False, True], backend="reference")
    with torch.no_grad():
        lstm_recurrence(xg.requires_grad_(), w_hh, h0, c0, reverse=[False, True], backend="reference")
    lstm_recurrence(xg, w_hh, h0, c0, reverse=[False, True], backend="reference")
    assert seen == [False, False, True]


def test_autocast_dtype_follows_nn_lstm_per_device(monkeypatch):
    """nn.LSTM under CUDA autocast runs cuDNN in float16 whatever the autocast dtype; on the CPU it
    takes the autocast dtype; float64 is never cast."""
    from types import SimpleNamespace

    from fusedconvlstm.nn import lstm as lstm_module
    from fusedconvlstm.numerics import precision

    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type: True)
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: torch.bfloat16)

    def tensor_on(device_type, dtype=torch.float32):
        return SimpleNamespace(device=torch.device(device_type), dtype=dtype, is_floating_point=lambda: True)

    assert lstm_module.lstm_autocast_dtype(tensor_on("cuda")) == torch.float16
    assert lstm_module.lstm_autocast_dtype(tensor_on("cpu")) == torch.bfloat16
    assert precision.autocast_dtype(tensor_on("cuda")) == torch.bfloat16  # the convs: the autocast dtype
    assert lstm_module.lstm_autocast_dtype(tensor_on("cuda", torch.float64)) is None


# ---- only the final state --------------------------------------------------------------------

FINAL_STATE_BACKENDS = [
    "reference",
    pytest.param("triton", marks=pytest.mark.triton),
]


@pytest.mark.parametrize("backend", FINAL_STATE_BACKENDS)
@pytest.mark.parametrize("proj", [False, True], ids=["plain", "proj"])
def test_return_sequence_false_gives_the_same_final_state_and_writes_no_output(backend, proj, monkeypatch):
    """``return_sequence=False``: ``y`` is None, h_n and c_n are those of the full call bit for
    bit; without a gradient in view the backend is asked not to store y (and stores none);
    with one, the gradients through h_n and c_n are those of the full call."""
    import fusedconvlstm.ops.lstm as ops_lstm

    dtype = F64 if backend == "reference" else torch.float32
    lengths = torch.tensor([5, 2, 0])
    xg, w_hh, w_hr, h0, c0, _ = _op_args(P=2 if proj else None, dtype=dtype)
    kw = dict(w_hr=w_hr, lengths=lengths, reverse=[False, True], backend=backend)
    _, h_full, c_full = lstm_recurrence(xg, w_hh, h0, c0, **kw)
    outputs = []
    real = ops_lstm._lstm_recurrence_op
    monkeypatch.setattr(ops_lstm, "_lstm_recurrence_op", lambda *a: outputs.append(real(*a)) or outputs[-1])
    y, h_n, c_n = lstm_recurrence(xg, w_hh, h0, c0, return_sequence=False, **kw)
    assert y is None and outputs[-1][0].numel() == 0
    assert torch.equal(h_n, h_full) and torch.equal(c_n, c_full)

    leaves = [t.detach().requires_grad_() for t in (xg, h0, c0, *w_hh, *w_hr)]
    D = len(w_hh)

    def grads(return_sequence):
        _, h, c = lstm_recurrence(
            leaves[0],
            leaves[3 : 3 + D],
            leaves[1],
            leaves[2],
            **dict(kw, w_hr=leaves[3 + D :]),
            return_sequence=return_sequence,
        )
        return torch.autograd.grad((h * 1.5).sum() + c.sum(), leaves)

    for a, b in zip(grads(False), grads(True)):
        assert torch.equal(a, b)


def test_a_backward_after_a_forward_that_stored_nothing_recomputes_it():
    """The op called directly without saving (``save_for_backward=False``, ``write_y=False``) on
    inputs that need gradients: its backward recomputes the forward and the gradients are right."""
    xg, w_hh, _, h0, c0, _ = _op_args(requires_grad=True)
    op = torch.ops.fusedconvlstm.lstm_recurrence
    y, h_n, c_n, ws = op(xg, w_hh, [], h0, c0, None, [False, True], "reference", False, False)
    assert y.numel() == 0 and ws.numel() == 0
    got = torch.autograd.grad(h_n.sum() + c_n.sum(), (xg, h0, c0, *w_hh))
    _, h_ref, c_ref = lstm_recurrence(xg, w_hh, h0, c0, reverse=[False, True], backend="reference")
    want = torch.autograd.grad(h_ref.sum() + c_ref.sum(), (xg, h0, c0, *w_hh))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_final_state_only_on_fake_tensors_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    xg, w_hh, _, h0, c0, _ = _op_args()
    op = torch.ops.fusedconvlstm.lstm_recurrence
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (xg, *w_hh, h0, c0)]
        y, h_n, _, _ = op(fake[0], fake[1:3], [], fake[3], fake[4], None, [False, True], "reference", False, False)
        assert tuple(y.shape) == (0,) and tuple(h_n.shape) == tuple(h0.shape)
    torch.library.opcheck(op.default, (xg, w_hh, [], h0, c0, None, [False, True], "reference", False, False))
