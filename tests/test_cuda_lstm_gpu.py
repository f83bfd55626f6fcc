"""The ``cuda`` LSTM kernels on a GPU (``gpu`` marker).

The persistent kernels against the float64 reference and against cuDNN (``torch.nn.LSTM``) in
float32 / float16 / bfloat16 — a result passes when its relative error is at most twice cuDNN's
on the same inputs (docs/design.md §3) — for every module option, odd sizes, every launch
configuration that fits, NaN-poisoned outputs, bitwise determinism, opcheck, CUDA-graph capture;
the step-wise cell kernels against their CPU implementations; the cluster forward kernel (sm_90)
and the forward that computes the input projection itself. The cuDNN comparators of these tests
are checked on the CPU first (those two tests have no ``gpu`` marker).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedconvlstm
from fusedconvlstm import passmark
from fusedconvlstm.cuda import cluster as cuda_cluster
from fusedconvlstm.cuda import from_input as cuda_from_input
from fusedconvlstm.cuda import lstm as cuda_lstm
from fusedconvlstm.cuda import persistent as cuda_persistent
from fusedconvlstm.cuda import persistent_config as pc
from fusedconvlstm.cuda.constants import SYNC_STRIDE, padded_reduction
from fusedconvlstm.numerics.recurrence import reverse_mask
from fusedconvlstm.passmark import rel_err
from tests.cuda_lstm_helpers import (
    F64,
    HALF_DTYPES,
    check_persistent_and_stepwise_combine,
    cluster_forward_args,
    op_inputs,
    persistent_backward_args,
    persistent_forward_args,
    recurrence_call,
    reference_forward_backward,
)
from tests.helpers import assert_pass_mark, capture_graph, lstm_weights, poison_

# =============================================================================================
# The cuDNN comparators, checked on the CPU


def _cudnn_recurrence(xg, w, h0, c0, lengths, reverse, gy, ghn, gcn):
    """The recurrence as ``nn.LSTM`` computes it (cuDNN on CUDA tensors) in ``xg``'s dtype: an
    ``nn.LSTM`` without biases whose input is ``xg`` laid out as ``(T, B, D·4H)`` and whose input
    weights pick each direction's slice by an identity (products by 1 and sums of zeros: exact in
    any dtype where the input GEMM is IEEE), with ``W_hh`` as given, packed by ``lengths``. cuDNN
    takes no empty sequence: a row of length 0 gets its exact result (``y`` 0, the final state the
    initial one, its gradient passed through). The same outputs and gradients as
    :func:`reference_forward_backward`, the same-dtype error the pass mark compares ours with.
    Forward direction first, then the reversed one: ``reverse`` is ``[False]`` or ``[False, True]``."""
    T, B, D, G = xg.shape
    H = G // 4
    assert list(reverse) == [False, True][:D], reverse
    if lengths is not None and bool((lengths == 0).any()):
        keep = (lengths.cpu() > 0).nonzero().flatten().to(xg.device)
        (y_k, hn_k, cn_k), (gx_k, g_w, gh0_k, gc0_k) = _cudnn_recurrence(
            xg[:, keep], w, h0[:, keep], c0[:, keep], lengths[keep.to(lengths.device)], reverse,
            gy[:, keep], ghn[:, keep], gcn[:, keep],
        )  # fmt: skip
        y, g_x = xg.new_zeros(T, B, D, H), torch.zeros_like(xg)
        hn, cn, g_h0, g_c0 = h0.detach().clone(), c0.detach().clone(), ghn.to(h0).clone(), gcn.to(c0).clone()
        y[:, keep], g_x[:, keep] = y_k, gx_k
        hn[:, keep], cn[:, keep], g_h0[:, keep], g_c0[:, keep] = hn_k, cn_k, gh0_k, gc0_k
        return (y, hn, cn), (g_x, g_w, g_h0, g_c0)
    lstm = nn.LSTM(D * G, H, bias=False, bidirectional=D == 2).to(device=xg.device, dtype=xg.dtype)
    with torch.no_grad():
        eye = torch.eye(G, dtype=xg.dtype, device=xg.device)
        for d, suffix in enumerate(["", "_reverse"][:D]):
            w_ih = torch.zeros(G, D * G, dtype=xg.dtype, device=xg.device)
            w_ih[:, d * G : (d + 1) * G] = eye
            getattr(lstm, f"weight_ih_l0{suffix}").copy_(w_ih)
            getattr(lstm, f"weight_hh_l0{suffix}").copy_(w[d])
    x = xg.detach().reshape(T, B, D * G).clone().requires_grad_()
    hx = tuple(t.detach().clone().requires_grad_() for t in (h0, c0))
    inp = x if lengths is None else pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
    out, (hn, cn) = lstm(inp, hx)
    if lengths is not None:
        out = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)[0]
    y = out.view(T, B, D, H)
    weights = [getattr(lstm, f"weight_hh_l0{s}") for s in ["", "_reverse"][:D]]
    grads = torch.autograd.grad((y, hn, cn), [x, *hx, *weights], (gy.to(y), ghn.to(hn), gcn.to(cn)))
    g_x, g_h0, g_c0, *g_w = grads
    return (y.detach(), hn.detach(), cn.detach()), (g_x.view(T, B, D, G), g_w, g_h0, g_c0)


def _cudnn_from_input(x, w_ih, bias, w_hh, h0, c0, lengths):
    """The forward of a (bidirectional when ``len(w_hh) == 2``) LSTM layer from its input as
    ``nn.LSTM`` computes it (cuDNN on CUDA tensors) in ``x``'s dtype: ``w_ih`` ``(D·4H, I)`` and
    ``bias`` ``(D·4H)`` split per direction (``bias_hh`` zero), packed by ``lengths``; a row of
    length 0 gets its exact result (``y`` 0, the final state the initial one). ``(y (T, B, D, H),
    h_n, c_n)``."""
    T, B, _ = x.shape
    D, G = len(w_hh), w_hh[0].shape[0]
    H = G // 4
    if lengths is not None and bool((lengths == 0).any()):
        keep = (lengths.cpu() > 0).nonzero().flatten().to(x.device)
        y_k, hn_k, cn_k = _cudnn_from_input(
            x[:, keep], w_ih, bias, w_hh, h0[:, keep], c0[:, keep], lengths[keep.to(lengths.device)]
        )
        y, hn, cn = x.new_zeros(T, B, D, H), h0.clone(), c0.clone()
        y[:, keep], hn[:, keep], cn[:, keep] = y_k, hn_k, cn_k
        return y, hn, cn
    lstm = nn.LSTM(x.shape[2], H, bidirectional=D == 2).to(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        for d, suffix in enumerate(["", "_reverse"][:D]):
            getattr(lstm, f"weight_ih_l0{suffix}").copy_(w_ih[d * G : (d + 1) * G])
            getattr(lstm, f"weight_hh_l0{suffix}").copy_(w_hh[d])
            getattr(lstm, f"bias_ih_l0{suffix}").copy_(bias[d * G : (d + 1) * G])
            getattr(lstm, f"bias_hh_l0{suffix}").zero_()
        inp = x if lengths is None else pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
        out, (hn, cn) = lstm(inp, (h0, c0))
        if lengths is not None:
            out = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)[0]
    return out.view(T, B, D, H), hn, cn


def test_cudnn_from_input_comparator_is_the_layer():
    """The input-projection comparator of the GPU tests, checked on the CPU in float64 against
    the op's own float64 result (bidirectional, lengths with an empty row)."""
    T, B, D, H, n_in = 5, 6, 2, 8, 7
    x = torch.randn(T, B, n_in, dtype=F64)
    w_ih, bias = 0.3 * torch.randn(D * 4 * H, n_in, dtype=F64), 0.1 * torch.randn(D * 4 * H, dtype=F64)
    w_hh = [0.3 * torch.randn(4 * H, H, dtype=F64) for _ in range(D)]
    h0, c0 = torch.randn(D, B, H, dtype=F64), torch.randn(D, B, H, dtype=F64)
    lengths = torch.tensor([5, 0, 3, 1, 5, 2])
    want = cuda_from_input.lstm_recurrence_from_input_forward(x, w_ih, bias, w_hh, h0, c0, lengths, [False, True])
    got = _cudnn_from_input(x, w_ih, bias, w_hh, h0, c0, lengths)
    for name, a, b in zip(("y", "h_n", "c_n"), got, want):
        assert a.shape == b.shape and rel_err(a, b, strict=True) < 1e-12, name


def test_cudnn_recurrence_comparator_is_the_recurrence():
    """The comparator of the GPU tests, checked here on the CPU in float64: nn.LSTM with identity
    input weights computes the op's recurrence (bidirectional, packed lengths, gradients)."""
    T, B, D, H = 6, 6, 2, 7
    lengths = torch.tensor([6, 1, 3, 0, 6, 2])
    xg, w, h0, c0, _ = op_inputs(T, B, D, H, F64)
    gy, ghn, gcn = torch.randn(T, B, D, H, dtype=F64), torch.randn_like(h0), torch.randn_like(c0)
    want = reference_forward_backward(xg, w, h0, c0, lengths, [False, True], gy, ghn, gcn)
    got = _cudnn_recurrence(xg, w, h0, c0, lengths, [False, True], gy, ghn, gcn)
    (y, hn, cn), (gx, gw, gh0, gc0) = got
    (y_r, hn_r, cn_r), (gx_r, gw_r, gh0_r, gc0_r) = want
    valid = (torch.arange(T).unsqueeze(1) < lengths).view(T, B, 1, 1)
    pairs = [("y", y, torch.where(valid, y_r, 0)), ("h_n", hn, hn_r), ("c_n", cn, cn_r)]
    pairs += [("grad_xg", torch.where(valid, gx, 0), torch.where(valid, gx_r, 0)), ("grad_h0", gh0, gh0_r)]
    pairs += [("grad_c0", gc0, gc0_r)] + [(f"grad_w_hh[{d}]", gw[d], gw_r[d]) for d in range(D)]
    for name, a, b in pairs:
        assert rel_err(a, b, strict=True) < 1e-12, name


# =============================================================================================
# GPU: the persistent kernels


def _check_against_cudnn(ours: dict, cudnn: dict, ref: dict, dtype, context: str):
    """Every tensor within the pass mark of cuDNN's (docs/design.md §3, fusedconvlstm.passmark)."""
    marks = [passmark.mark(ours[name], cudnn[name], ref_val, dtype, name) for name, ref_val in ref.items()]
    assert all(m.passed for m in marks), f"{context}: " + "; ".join(m.describe() for m in marks if not m.passed)


def _run_module(module, x, hx, gy, ghn, gcn, packed_lengths=None):
    """Forward + backward of an LSTM module; returns outputs and all gradients by name."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    hx = None if hx is None else tuple(h.detach().clone().requires_grad_() for h in hx)
    inp = x if packed_lengths is None else pack_padded_sequence(x, packed_lengths, enforce_sorted=False)
    out, (hn, cn) = module(inp, hx)
    if packed_lengths is not None:
        out = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=x.shape[0])[0]
    loss = (out * gy.to(out)).sum() + (hn * ghn.to(hn)).sum() + (cn * gcn.to(cn)).sum()
    loss.backward()
    res = {"output": out.detach(), "h_n": hn.detach(), "c_n": cn.detach(), "grad_x": x.grad}
    if hx is not None:
        res["grad_h0"], res["grad_c0"] = hx[0].grad, hx[1].grad
    for name, p in module.named_parameters():
        res[f"grad_{name}"] = p.grad
    return res


def _three_way(
    dtype,
    input_size,
    hidden,
    T,
    B,
    *,
    num_layers=1,
    bidirectional=False,
    batch_first=False,
    with_hx=False,
    lengths=None,
    proj_size=0,
    seed=0,
):
    """Our cuda module, cuDNN's nn.LSTM in ``dtype`` and nn.LSTM in float64 on the CPU, on the
    same (rounded) weights and inputs; returns the three result dicts."""
    torch.manual_seed(seed)
    opts = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, proj_size=proj_size)
    base = nn.LSTM(input_size, hidden, **opts)
    base = base.to(dtype).to(F64)  # weights exactly representable in dtype
    ref = base
    cudnn = nn.LSTM(input_size, hidden, **opts)
    cudnn.load_state_dict(base.state_dict())
    cudnn = cudnn.to(device="cuda", dtype=dtype)
    ours = fusedconvlstm.LSTM.from_torch(cudnn, backend="cuda")
    D = 2 if bidirectional else 1
    shape = (B, T, input_size) if batch_first else (T, B, input_size)
    x = torch.randn(shape, dtype=F64).to(dtype).to(F64)
    P = proj_size or hidden
    hx = None
    if with_hx:
        hx = tuple((0.5 * torch.randn(num_layers * D, B, n, dtype=F64)).to(dtype).to(F64) for n in (P, hidden))
    gy = torch.randn((T, B, D * P) if not batch_first else (B, T, D * P), dtype=F64)
    ghn, gcn = torch.randn(num_layers * D, B, P, dtype=F64), torch.randn(num_layers * D, B, hidden, dtype=F64)
    to_dev = lambda t: None if t is None else t.to(device="cuda", dtype=dtype)  # noqa: E731
    hx_dev = None if hx is None else tuple(map(to_dev, hx))
    r_ref = _run_module(ref, x, hx, gy, ghn, gcn, lengths)
    r_cudnn = _run_module(cudnn, to_dev(x), hx_dev, to_dev(gy), to_dev(ghn), to_dev(gcn), lengths)
    r_ours = _run_module(ours, to_dev(x), hx_dev, to_dev(gy), to_dev(ghn), to_dev(gcn), lengths)
    return r_ours, r_cudnn, r_ref


@pytest.fixture
def persistent_only(monkeypatch):
    """Make the step-wise path unusable, so a test proves the persistent kernels served it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the step-wise path ran where the persistent kernel was expected")

    monkeypatch.setattr(cuda_lstm, "lstm_recurrence_stepwise_forward", refuse)
    monkeypatch.setattr(cuda_lstm, "lstm_recurrence_stepwise_backward", refuse)


GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


MODULE_CASES = [
    # id, input_size, hidden, T, B, options
    ("base", 24, 100, 7, 3, {}),
    ("batch1_T1", 16, 320, 1, 1, {}),
    ("batch129_bidir", 32, 512, 7, 129, {"bidirectional": True}),
    ("long_T1000", 16, 100, 1000, 3, {}),
    ("hx_batch_first_2layers", 20, 64, 9, 5, {"with_hx": True, "batch_first": True, "num_layers": 2}),
    ("bidir_hx", 12, 48, 6, 4, {"with_hx": True, "bidirectional": True}),
    ("reference_model_shape", 512, 512, 45, 64, {}),
    (
        "proj_bidir_hx_2layers",
        24,
        100,
        7,
        5,
        {"proj_size": 40, "bidirectional": True, "with_hx": True, "num_layers": 2},
    ),
    ("proj_reference_shape", 512, 512, 45, 64, {"proj_size": 256}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_gpu_module_within_twice_cudnn_error(dtype, case, persistent_only):
    _check_module_case(dtype, case, "")


def _check_module_case(dtype, case, context):
    name, input_size, hidden, T, B, opts = case
    ours, cudnn, ref = _three_way(dtype, input_size, hidden, T, B, **opts)
    _check_against_cudnn(ours, cudnn, ref, dtype, f"{context}{name} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("proj_size", [0, 16])
def test_gpu_packed_sequence_lengths(dtype, bidirectional, proj_size, persistent_only):
    lengths = torch.tensor([7, 1, 5, 7, 3])
    ours, cudnn, ref = _three_way(
        dtype, 10, 40, 7, 5, bidirectional=bidirectional, with_hx=True, lengths=lengths, proj_size=proj_size
    )
    _check_against_cudnn(ours, cudnn, ref, dtype, f"packed bidirectional={bidirectional} proj={proj_size} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_two_parallel_lstms_in_one_launch(dtype, persistent_only):
    _check_parallel_pair(dtype)


def _check_parallel_pair(dtype):
    """Two LSTMs on one input through ``parallel_lstm`` (one launch) against cuDNN and float64."""
    torch.manual_seed(1)
    T, B, n_in, H = 45, 8, 64, 128
    bases = [nn.LSTM(n_in, H).to(dtype).to(F64) for _ in range(2)]
    x = torch.randn(T, B, n_in, dtype=F64).to(dtype).to(F64)
    grads = [torch.randn(T, B, H, dtype=F64) for _ in range(2)]
    results = {}
    for kind in ("ref", "cudnn", "ours"):
        mods = []
        for b in bases:
            m = nn.LSTM(n_in, H)
            m.load_state_dict(b.state_dict())
            mods.append(m.to(F64) if kind == "ref" else m.to(device="cuda", dtype=dtype))
        if kind == "ours":
            mods = [fusedconvlstm.LSTM.from_torch(m, backend="cuda") for m in mods]
        xin = (x if kind == "ref" else x.to(device="cuda", dtype=dtype)).clone().requires_grad_()
        if kind == "ours":
            outs = [o for o, _ in fusedconvlstm.parallel_lstm(mods, xin)]
        else:
            outs = [m(xin)[0] for m in mods]
        loss = sum((o * g.to(o)).sum() for o, g in zip(outs, grads))
        loss.backward()
        res = {f"out{k}": o.detach() for k, o in enumerate(outs)}
        res["grad_x"] = xin.grad
        for k, m in enumerate(mods):
            for name, p in m.named_parameters():
                res[f"grad{k}_{name}"] = p.grad
        results[kind] = res
    _check_against_cudnn(results["ours"], results["cudnn"], results["ref"], dtype, f"parallel {dtype}")


@pytest.mark.gpu
def test_gpu_fp32_without_tf32_runs_3xtf32_within_twice_cudnn_fp32(persistent_only):
    rnn = torch.backends.cudnn.rnn
    saved = rnn.fp32_precision
    try:
        rnn.fp32_precision = "ieee"
        assert "3xTF32" in cuda_lstm.describe(recurrence_call(B=6, H=96, device="cuda"))
        ours, cudnn, ref = _three_way(torch.float32, 20, 96, 30, 6, bidirectional=True)
        _check_against_cudnn(ours, cudnn, ref, torch.float32, "fp32 ieee")
    finally:
        rnn.fp32_precision = saved


def _all_fitting_layouts(kind, B, D, H, dtype):
    out = []
    for nt, wm, wn, wk in pc.warp_splits():
        base = pc.make_layout(kind, nt, wm, wn, wk, 1, B, D, H, dtype)
        for nbg in sorted({1, base.nbt}):
            lay = pc.make_layout(kind, nt, wm, wn, wk, nbg, B, D, H, dtype)
            if lay.fits(pc.DeviceLimits.of(torch.device("cuda"))):
                out.append(lay)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_every_launch_configuration_matches_the_reference(dtype):
    """Each (nt, wm, wn, wk, nbg) that fits runs the same math: each within the pass mark of
    cuDNN's error in the same dtype on the same inputs (:func:`_cudnn_recurrence`), per tensor."""
    T, B, D, H = 6, 37, 2, 100
    lengths = torch.tensor([6, 1, 3] + [6] * 34, device="cuda")
    reverse = [False, True]
    xg, w, h0, c0, _ = op_inputs(T, B, D, H, dtype, "cuda")
    gy = torch.randn(T, B, D, H, device="cuda", dtype=dtype)
    ghn, gcn = torch.randn_like(h0), torch.randn_like(c0)
    (y_r, hn_r, cn_r), (gxg_r, gw_r, gh0_r, gc0_r) = reference_forward_backward(
        xg, w, h0, c0, lengths, reverse, gy, ghn, gcn
    )
    (y_c, hn_c, cn_c), (gxg_c, gw_c, gh0_c, gc0_c) = _cudnn_recurrence(xg, w, h0, c0, lengths, reverse, gy, ghn, gcn)
    fwd_layouts = _all_fitting_layouts("forward", B, D, H, dtype)
    bwd_layouts = _all_fitting_layouts("backward", B, D, H, dtype)
    assert len(fwd_layouts) > 10 and len(bwd_layouts) > 10
    for lay in fwd_layouts:
        y, hn, cn, ws = cuda_lstm.lstm_recurrence_persistent_forward(xg, w, [], h0, c0, lengths, reverse, config=lay)
        for name, a, c, r in (("y", y, y_c, y_r), ("h_n", hn, hn_c, hn_r), ("c_n", cn, cn_c, cn_r)):
            assert_pass_mark(a, c, r, dtype, f"forward {lay.args}: {name}")
    for lay in bwd_layouts:
        gxg, gw, _, gh0, gc0 = cuda_lstm.lstm_recurrence_persistent_backward(
            gy, ghn, gcn, xg, w, [], h0, c0, lengths, reverse, y, ws, config=lay
        )
        triples = [("grad_xg", gxg, gxg_c, gxg_r), ("grad_h0", gh0, gh0_c, gh0_r), ("grad_c0", gc0, gc0_c, gc0_r)]
        triples += [(f"grad_w_hh[{d}]", gw[d], gw_c[d], gw_r[d]) for d in range(D)]
        for name, a, c, r in triples:
            assert_pass_mark(a, c, r, dtype, f"backward {lay.args}: {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_kernels_write_every_output_element(dtype):
    """NaN-poisoned outputs and exchange buffers: every element is written (zeros where masked)."""
    T, B, D, H = 5, 11, 2, 72
    lengths = torch.tensor([5, 0, 2, 5, 1, 5, 5, 3, 4, 5, 5], device="cuda")
    reverse = [False, True]
    xg, w, h0, c0, _ = op_inputs(T, B, D, H, dtype, "cuda")
    fwd = pc.choose_config("forward", B, D, H, dtype, pc.DeviceLimits.of(torch.device("cuda")))
    kp = padded_reduction(H, dtype.itemsize)
    h_buf = torch.zeros(2, D, B, kp, dtype=dtype, device="cuda")
    h_buf[0, ..., :H] = h0
    poison_(h_buf[1, ..., :H])  # written in full at step 0 (valid rows and carried ones)
    c = c0.float().clone()
    y = poison_(torch.empty(T, B, D, H, dtype=dtype, device="cuda"))
    ws = poison_(torch.empty(T, B, D, 5 * H, device="cuda"))
    sync = torch.empty(D * fwd.nbg * SYNC_STRIDE, dtype=torch.int32, device="cuda")
    mask = reverse_mask(reverse)
    torch.ops.fusedconvlstm.lstm_persistent_forward_(
        xg, torch.stack(w), lengths, mask, *fwd.args, False, h_buf, c, y, ws, sync
    )
    for name, t in (("y", y), ("workspace", ws), ("h_buf", h_buf), ("c", c)):
        assert not torch.isnan(t).any(), f"forward left NaN in {name}"
    assert torch.count_nonzero(h_buf[..., H:]) == 0, "the padding of h_buf must stay zero"
    valid = (torch.arange(T, device="cuda").unsqueeze(1) < lengths).view(T, B, 1, 1)
    assert torch.all(torch.where(valid, 0, y) == 0) and torch.all(torch.where(valid, 0, ws) == 0)

    bwd = pc.choose_config("backward", B, D, H, dtype, pc.DeviceLimits.of(torch.device("cuda")))
    g_buf = torch.zeros(2, D, B, padded_reduction(4 * H, dtype.itemsize), dtype=dtype, device="cuda")
    poison_(g_buf[1, ..., : 4 * H])
    dgates = poison_(torch.empty(T, B, D, 4 * H, dtype=dtype, device="cuda"))
    dh, dc = torch.randn(D, B, H, device="cuda"), torch.randn(D, B, H, device="cuda")
    sync = torch.empty(D * bwd.nbg * SYNC_STRIDE, dtype=torch.int32, device="cuda")
    torch.ops.fusedconvlstm.lstm_persistent_backward_(
        torch.randn(T, B, D, H, device="cuda", dtype=dtype),
        ws,
        c0.float(),
        torch.stack(w),
        lengths,
        mask,
        *bwd.args,
        False,
        dh,
        dc,
        dgates,
        g_buf,
        sync,
    )
    for name, t in (("dgates", dgates), ("g_buf", g_buf), ("dh_carry", dh), ("dc", dc)):
        assert not torch.isnan(t).any(), f"backward left NaN in {name}"
    assert torch.all(torch.where(valid, 0, dgates) == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_bitwise_deterministic(dtype, persistent_only):
    torch.manual_seed(3)
    m = fusedconvlstm.LSTM(64, 256, bidirectional=True, backend="cuda").to(device="cuda", dtype=dtype)
    x = torch.randn(45, 96, 64, device="cuda", dtype=dtype)
    gy = torch.randn(45, 96, 512, device="cuda", dtype=dtype)
    runs = []
    for _ in range(3):
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out, (hn, cn) = m(xi)
        ((out * gy).sum() + hn.sum() + cn.sum()).backward()
        runs.append([out, hn, cn, xi.grad] + [p.grad for p in m.parameters()])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("poll_ns", ["64", "1000"])
def test_gpu_barrier_poll_back_off_gives_bitwise_the_same_results(poll_ns, persistent_only, monkeypatch):
    """FUSEDCONVLSTM_BARRIER_POLL_NS (relaxed polls with a back-off, a switch the GPU session
    times both ways) changes how the persistent kernels wait at their barriers, never what they
    compute: forward and backward equal the default's bit for bit."""
    torch.manual_seed(3)
    m = fusedconvlstm.LSTM(64, 256, bidirectional=True, backend="cuda").to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(45, 96, 64, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(45, 96, 512, device="cuda", dtype=torch.bfloat16)

    def run():
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out, (hn, cn) = m(xi)
        ((out * gy).sum() + hn.sum() + cn.sum()).backward()
        return [out, hn, cn, xi.grad] + [p.grad for p in m.parameters()]

    default = run()
    monkeypatch.setenv("FUSEDCONVLSTM_BARRIER_POLL_NS", poll_ns)
    for a, b in zip(default, run()):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_opcheck(dtype):
    T, B, D, H = 4, 5, 2, 24
    xg, w, h0, c0, _ = op_inputs(T, B, D, H, dtype, "cuda")
    xg.requires_grad_()
    for lengths in (None, torch.tensor([4, 2, 1, 4, 3], device="cuda")):
        torch.library.opcheck(
            torch.ops.fusedconvlstm.lstm_recurrence.default, (xg, w, [], h0, c0, lengths, [False, True], "cuda")
        )
    fwd = persistent_forward_args(T, B, D, H, dtype=dtype, device="cuda")
    torch.library.opcheck(torch.ops.fusedconvlstm.lstm_persistent_forward_.default, fwd)
    torch.ops.fusedconvlstm.lstm_persistent_forward_(*fwd)
    torch.library.opcheck(torch.ops.fusedconvlstm.lstm_persistent_backward_.default, persistent_backward_args(fwd))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_cuda_graph_capture(dtype, persistent_only):
    torch.manual_seed(4)
    m = fusedconvlstm.LSTM(32, 128, bidirectional=True, backend="cuda").to(device="cuda", dtype=dtype)
    x_static = torch.randn(20, 16, 32, device="cuda", dtype=dtype)
    with torch.no_grad():
        graph, (out_static, (hn_static, cn_static)) = capture_graph(lambda: m(x_static))
    x_new = torch.randn_like(x_static)
    x_static.copy_(x_new)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        out, (hn, cn) = m(x_new)
    assert torch.equal(out_static, out) and torch.equal(hn_static, hn) and torch.equal(cn_static, cn)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_with_lengths_on_the_device(persistent_only):
    """Lengths on the device capture and replay; lengths on the host get an error naming them
    (a host-to-device copy cannot be captured)."""
    torch.manual_seed(5)
    T, B, H = 9, 6, 64
    xg = torch.randn(T, B, 2, 4 * H, device="cuda", dtype=torch.bfloat16)
    w_hh = [0.1 * torch.randn(4 * H, H, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    lengths = torch.tensor([9, 1, 4, 9, 7, 2], device="cuda")

    def step():
        return fusedconvlstm.lstm_recurrence(xg, w_hh, lengths=lengths, reverse=[False, True], backend="cuda")

    graph, (y_static, hn_static, cn_static) = capture_graph(step)
    xg.copy_(torch.randn_like(xg))
    graph.replay()
    torch.cuda.synchronize()
    y, hn, cn = step()
    assert torch.equal(y_static, y) and torch.equal(hn_static, hn) and torch.equal(cn_static, cn)

    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="lengths must be on cuda"), torch.cuda.graph(graph):
        fusedconvlstm.lstm_recurrence(xg, w_hh, lengths=lengths.cpu(), reverse=[False, True], backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_large_batch_many_tiles_per_block(dtype, persistent_only):
    ours, cudnn, ref = _three_way(dtype, 16, 64, 3, 4096)
    _check_against_cudnn(ours, cudnn, ref, dtype, f"batch 4096 {dtype}")


@pytest.mark.gpu
def test_gpu_persistent_and_stepwise_combine_and_agree():
    lengths = torch.tensor([9, 4, 1, 9, 6, 2], device="cuda")
    check_persistent_and_stepwise_combine((9, 6, 2, 80), lengths, torch.bfloat16, "cuda", 2e-2, 3e-2)


@pytest.mark.gpu
def test_gpu_kernel_refuses_a_grid_that_cannot_be_resident():
    # 16 recurrences x 64 unit slices of 8 = 1024 blocks of ~50 KiB: shared memory alone allows at
    # most 4 per SM (528 on an H100), whatever the register count (at 64 registers or fewer the
    # 512 blocks of 8 recurrences would fit 4 per SM and launch).
    T, B, D, H = 2, 8, 16, 512
    args = list(persistent_forward_args(T, B, D, H, dtype=torch.bfloat16, reverse=[False] * D, device="cuda"))
    args[4:9] = [1, 1, 1, 8, 1]
    with pytest.raises(RuntimeError, match="co-resident blocks"):
        torch.ops.fusedconvlstm.lstm_persistent_forward_(*args)
    args[4:9] = [1, 1, 1, 8, 0]
    with pytest.raises(RuntimeError, match="nbg must be >= 1"):
        torch.ops.fusedconvlstm.lstm_persistent_forward_(*args)
    args[4:9] = [1, 1, 1, 8, 1]
    args[0] = args[0].double()
    with pytest.raises(RuntimeError, match="float64 runs on the step-wise kernels"):
        torch.ops.fusedconvlstm.lstm_persistent_forward_(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, F64], ids=str)
def test_gpu_stepwise_cell_kernels_match_their_cpu_implementations(dtype):
    T, B, D, H = 4, 5, 2, 13
    lengths = torch.tensor([4, 2, 0, 3, 1])
    mask = reverse_mask([False, True])
    acc = F64 if dtype == F64 else torch.float32
    g = torch.Generator().manual_seed(5)
    xg = torch.randn(T, B, D, 4 * H, generator=g).to(dtype)
    ws_fwd = {}
    for device in ("cpu", "cuda"):
        h = torch.randn(D, B, H, generator=torch.Generator().manual_seed(6)).to(dtype)
        c = torch.randn(D, B, H, generator=torch.Generator().manual_seed(7)).to(acc)
        y = torch.zeros(T, B, D, H, dtype=dtype)
        ws = torch.zeros(T, B, D, 5 * H, dtype=acc)
        tensors = [t.to(device) for t in (xg, h, c, y, ws)]
        for step in range(T):
            hh = torch.randn(D, B, 4 * H, generator=torch.Generator().manual_seed(100 + step)).to(acc).to(device)
            torch.ops.fusedconvlstm.lstm_cell_forward_(hh, tensors[0], *tensors[1:], lengths.to(device), step, mask)
        ws_fwd[device] = [t.cpu() for t in tensors[1:]]
    tol = {F64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    for a, b in zip(ws_fwd["cpu"], ws_fwd["cuda"]):
        assert rel_err(b, a, strict=True) < tol
    outs = {}
    for device in ("cpu", "cuda"):
        gen = torch.Generator().manual_seed(8)
        dh_rec = torch.randn(D, B, H, generator=gen).to(acc)
        grad_y = torch.randn(T, B, D, H, generator=gen).to(dtype)
        c0 = torch.randn(D, B, H, generator=gen).to(dtype)
        dh_carry, dc = torch.randn(D, B, H, generator=gen).to(acc), torch.randn(D, B, H, generator=gen).to(acc)
        dgates, dstep = torch.zeros(T, B, D, 4 * H, dtype=dtype), torch.zeros(D, B, 4 * H, dtype=dtype)
        tensors = [t.to(device) for t in (dh_rec, grad_y, ws_fwd["cpu"][3], c0, dh_carry, dc, dgates, dstep)]
        for step in range(T):
            torch.ops.fusedconvlstm.lstm_cell_backward_(*tensors, lengths.to(device), step, mask)
        outs[device] = [t.cpu() for t in tensors[4:]]
    for a, b in zip(outs["cpu"], outs["cuda"]):
        assert rel_err(b, a, strict=True) < tol


# ---------------------------------------------------------------------------------------------
# GPU: the cluster forward kernel (sm_90)


def _needs_clusters():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread-block clusters need compute capability 9.0")


@pytest.fixture
def cluster_forward(monkeypatch, persistent_only):
    """Prefer the cluster forward kernel and make the cooperative forward unusable, so a test
    proves the cluster kernel served it."""
    _needs_clusters()
    monkeypatch.setenv(pc.FORWARD_KERNEL_ENV, "cluster")

    def refuse(*args, **kwargs):
        raise AssertionError("the cooperative forward ran where the cluster kernel was expected")

    monkeypatch.setattr(cuda_persistent, "_persistent_forward", refuse)


def _all_fitting_cluster_layouts(B, D, H, dtype):
    limits = pc.DeviceLimits.of(torch.device("cuda"))
    out = []
    for nt, wm, wn, wk in pc.warp_splits():
        lay = pc.make_layout(pc.CLUSTER, nt, wm, wn, wk, None, B, D, H, dtype)
        if lay.fits(limits):
            out.append(lay)
    return out


# fp32 at H = 512 has no cluster layout (16-unit slices would need clusters of 32):
# test_cuda_lstm_config.py checks that refusal.
CLUSTER_SHAPES = [
    pytest.param(dtype, *shape, id=f"{str(dtype).removeprefix('torch.')}-{'x'.join(map(str, shape))}")
    for shape in ((6, 37, 2, 100), (5, 11, 2, 72), (3, 9, 1, 512))
    for dtype in GPU_DTYPES
    if not (dtype == torch.float32 and shape[3] == 512)
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, T, B, D, H", CLUSTER_SHAPES)
def test_gpu_cluster_forward_every_configuration_matches_the_reference(dtype, T, B, D, H):
    """Every cluster configuration that fits (clusters of 1 to 16 blocks), lengths with empty and
    full rows, a reversed recurrence: within the pass mark of cuDNN on the same gates, every output element
    written (NaN-poisoned buffers), the padding of h_buf left zero."""
    _needs_clusters()
    lengths = torch.tensor(([T, 0, 2, T, 1] * B)[:B], device="cuda")
    reverse = [False, True][:D]
    xg, w, h0, c0, _ = op_inputs(T, B, D, H, dtype, "cuda")
    gy = torch.randn(T, B, D, H, device="cuda", dtype=dtype)
    ghn, gcn = torch.randn_like(h0), torch.randn_like(c0)
    (y_r, hn_r, cn_r), _ = reference_forward_backward(xg, w, h0, c0, lengths, reverse, gy, ghn, gcn)
    (y_c, hn_c, cn_c), _ = _cudnn_recurrence(xg, w, h0, c0, lengths, reverse, gy, ghn, gcn)
    layouts = _all_fitting_cluster_layouts(B, D, H, dtype)
    assert layouts
    assert H == 512 or len({lay.nu for lay in layouts}) > 1  # clusters of several sizes
    kp, mask = padded_reduction(H, dtype.itemsize), reverse_mask(reverse)
    valid = (torch.arange(T, device="cuda").unsqueeze(1) < lengths).view(T, B, 1, 1)
    for lay in layouts:
        h_buf = torch.zeros(2, D, B, kp, dtype=dtype, device="cuda")
        h_buf[0, ..., :H] = h0
        if T % 2:  # h_n lands in h_buf[1]: every element of it must be written
            poison_(h_buf[1, ..., :H])
        c = c0.float().clone()
        y = poison_(torch.empty(T, B, D, H, dtype=dtype, device="cuda"))
        ws = poison_(torch.empty(T, B, D, 5 * H, device="cuda"))
        torch.ops.fusedconvlstm.lstm_cluster_forward_(
            xg, torch.stack(w), lengths, mask, *lay.args, False, h_buf, c, y, ws
        )
        for name, t in (("y", y), ("workspace", ws), ("h_n", h_buf[T % 2, ..., :H]), ("c", c)):
            assert not torch.isnan(t).any(), f"{lay.args}: NaN left in {name}"
        assert torch.count_nonzero(h_buf[..., H:]) == 0, f"{lay.args}: the padding of h_buf must stay zero"
        assert torch.all(torch.where(valid, 0, y) == 0) and torch.all(torch.where(valid, 0, ws) == 0)
        for name, a, b, r in (("y", y, y_c, y_r), ("h_n", h_buf[T % 2, ..., :H], hn_c, hn_r), ("c_n", c, cn_c, cn_r)):
            assert_pass_mark(a, b, r, dtype, f"cluster {lay.args}: {name}")


CLUSTER_MODULE_CASES = [
    ("reference_model_shape", 512, 512, 45, 64, {}),
    ("batch1", 512, 512, 20, 1, {}),
    (
        "bidir_hx_batch_first_2layers",
        20,
        96,
        9,
        5,
        {"with_hx": True, "batch_first": True, "bidirectional": True, "num_layers": 2},
    ),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", CLUSTER_MODULE_CASES, ids=[c[0] for c in CLUSTER_MODULE_CASES])
def test_gpu_cluster_module_within_twice_cudnn_error(dtype, case, cluster_forward):
    _check_module_case(dtype, case, "cluster ")


@pytest.mark.gpu
def test_gpu_cluster_packed_lengths_and_parallel_pair(cluster_forward):
    lengths = torch.tensor([7, 1, 5, 7, 3])
    ours, cudnn, ref = _three_way(torch.bfloat16, 10, 40, 7, 5, bidirectional=True, with_hx=True, lengths=lengths)
    _check_against_cudnn(ours, cudnn, ref, torch.bfloat16, "cluster packed bidirectional")
    _check_parallel_pair(torch.bfloat16)


@pytest.mark.gpu
def test_gpu_cluster_forward_bitwise_deterministic_and_graph_capture(cluster_forward):
    torch.manual_seed(6)
    m = fusedconvlstm.LSTM(64, 512, backend="cuda").to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(45, 64, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        runs = [m(x) for _ in range(3)]
        for out, (hn, cn) in runs[1:]:
            assert torch.equal(out, runs[0][0]) and torch.equal(hn, runs[0][1][0]) and torch.equal(cn, runs[0][1][1])
        graph, (out_static, _) = capture_graph(lambda: m(x))
    x_new = torch.randn_like(x)
    x.copy_(x_new)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        assert torch.equal(out_static, m(x_new)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["cooperative", "cluster"])
def test_gpu_final_state_only_matches_the_full_forward(kernel, monkeypatch):
    """The reference pair at inference with ``return_sequence=False``: the kernels store no y
    and h_n, c_n equal the full forward's bit for bit (lengths, one reversed recurrence)."""
    if kernel == "cluster":
        _needs_clusters()
    monkeypatch.setenv(pc.FORWARD_KERNEL_ENV, kernel)
    T, B, D, H = 45, 64, 2, 512
    g = torch.Generator(device="cuda").manual_seed(9)
    xg = torch.randn(T, B, D, 4 * H, device="cuda", dtype=torch.bfloat16, generator=g)
    w = [w.to(device="cuda", dtype=torch.bfloat16) for w in lstm_weights(D, H)]
    lengths = torch.randint(1, T + 1, (B,), device="cuda", generator=g)
    with torch.no_grad(), pc.counting_forward_kernels() as served:
        _, h_full, c_full = fusedconvlstm.lstm_recurrence(xg, w, lengths=lengths, reverse=[False, True], backend="cuda")
        y, h_n, c_n = fusedconvlstm.lstm_recurrence(
            xg, w, lengths=lengths, reverse=[False, True], backend="cuda", return_sequence=False
        )
    assert served[kernel] == 2
    assert y is None and torch.equal(h_n, h_full) and torch.equal(c_n, c_full)


@pytest.mark.gpu
def test_gpu_check_command_names_the_cluster_forward_row(monkeypatch):
    _needs_clusters()
    from fusedconvlstm import validate

    case = [c for c in validate.default_cases() if c.op == "lstm" and "reference model" in c.name]
    rows = []
    for kernel in ("cooperative", "cluster"):
        monkeypatch.setenv(pc.FORWARD_KERNEL_ENV, kernel)
        rows += validate.check_cases(case, torch.device("cuda"), [torch.bfloat16], only=["cuda"])
    assert [r.backend for r in rows] == ["cuda", "cuda (cluster forward)"]
    assert all(r.passed for r in rows), validate.format_table(rows)


@pytest.mark.gpu
def test_gpu_cluster_kernel_opcheck_and_refusals():
    _needs_clusters()
    fwd = persistent_forward_args(4, 5, 2, 24, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.fusedconvlstm.lstm_cluster_forward_.default, cluster_forward_args(fwd))
    # H = 512 in 8-unit slices: clusters of 64 blocks.
    args = list(
        cluster_forward_args(persistent_forward_args(2, 8, 1, 512, torch.bfloat16, reverse=[False], device="cuda"))
    )
    with pytest.raises(RuntimeError, match="at most 16 form a cluster"):
        torch.ops.fusedconvlstm.lstm_cluster_forward_(*args)


# =============================================================================================
# GPU: the forward that computes the input projection itself


@pytest.fixture
def input_forward(monkeypatch, persistent_only):
    """Prefer the in-kernel input projection and make the other forward kernels unusable, so a
    test proves that it served (the backward stays the persistent one)."""
    monkeypatch.setenv(pc.FORWARD_KERNEL_ENV, "input")

    def refuse(*args, **kwargs):
        raise AssertionError("a forward on precomputed gates ran where the in-kernel projection was expected")

    monkeypatch.setattr(cuda_persistent, "_persistent_forward", refuse)
    monkeypatch.setattr(cuda_cluster, "cluster_forward_op", refuse)


INPUT_MODULE_CASES = [c for c in MODULE_CASES if "proj_size" not in c[5]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", INPUT_MODULE_CASES, ids=[c[0] for c in INPUT_MODULE_CASES])
def test_gpu_input_projection_in_kernel_within_twice_cudnn_error(dtype, case, input_forward):
    _check_module_case(dtype, case, "in-kernel projection ")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_input_projection_in_kernel_packed_and_parallel(dtype, input_forward):
    lengths = torch.tensor([7, 1, 5, 7, 3])
    ours, cudnn, ref = _three_way(dtype, 10, 40, 7, 5, bidirectional=True, with_hx=True, lengths=lengths)
    _check_against_cudnn(ours, cudnn, ref, dtype, f"in-kernel projection packed {dtype}")
    _check_parallel_pair(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_input_projection_every_configuration_matches_the_reference(dtype):
    # Every fitting launch configuration (1-9 tiles per block, padded units, I padded past a
    # k-step): outputs and final states within the pass mark of cuDNN's error in the same dtype
    # (nn.LSTM with these weights); the workspace, which cuDNN has no counterpart of, against
    # float64 with a tolerance from the dtype.
    T, B, D, H, n_in = 5, 70, 2, 40, 37
    limits = pc.DeviceLimits.of(torch.device("cuda"))
    torch.manual_seed(3)
    x = torch.randn(T, B, n_in).to(dtype)
    w_ih = (0.3 * torch.randn(D * 4 * H, n_in)).to(dtype)
    bias = (0.1 * torch.randn(D * 4 * H)).to(dtype)
    w_hh = [(0.3 * torch.randn(4 * H, H)).to(dtype) for _ in range(D)]
    h0, c0 = torch.randn(D, B, H).to(dtype), torch.randn(D, B, H).to(dtype)
    lengths = torch.randint(0, T + 1, (B,))
    f64 = [t.double() for t in (x, w_ih, bias, h0, c0)]
    want = cuda_from_input.lstm_recurrence_from_input_forward(
        *f64[:3], [w.double() for w in w_hh], *f64[3:], lengths, [False, True]
    )
    cudnn = _cudnn_from_input(
        *(t.cuda() for t in (x, w_ih, bias)), [w.cuda() for w in w_hh], h0.cuda(), c0.cuda(), lengths
    )
    tol = {torch.float32: 5e-3, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    tried = 0
    for nt, wm, wn, wk in pc.warp_splits():
        base = pc.make_layout(pc.FROM_INPUT, nt, wm, wn, wk, 1, B, D, H, dtype, input_size=n_in)
        for nbg in range(1, base.nbt + 1):
            lay = pc.make_layout(pc.FROM_INPUT, nt, wm, wn, wk, nbg, B, D, H, dtype, input_size=n_in)
            if not lay.fits(limits):
                continue
            tried += 1
            dev = [t.cuda() for t in (x, w_ih, bias, h0, c0, lengths)]
            got = cuda_from_input.lstm_recurrence_from_input_forward(
                dev[0], dev[1], dev[2], [w.cuda() for w in w_hh], dev[3], dev[4], dev[5], [False, True], config=lay
            )
            for name, a, c, b in zip(("y", "h_n", "c_n"), got, cudnn, want):
                assert_pass_mark(a, c, b, dtype, f"{lay.args}: {name}")
            assert rel_err(got[3].cpu(), want[3], strict=True) < tol, (
                f"{lay.args}: workspace {rel_err(got[3].cpu(), want[3], strict=True):.2e}"
            )
    assert tried > 10


@pytest.mark.gpu
def test_gpu_input_projection_deterministic_opcheck_and_graph_capture(input_forward):
    from fusedconvlstm.ops.lstm import _lstm_from_input_op

    torch.manual_seed(4)
    lstm = fusedconvlstm.LSTM(64, 96, bidirectional=True, backend="cuda").cuda().to(torch.bfloat16)
    x = torch.randn(9, 5, 64, device="cuda", dtype=torch.bfloat16)
    with pc.counting_forward_kernels() as served:
        first = lstm(x)[0]
    assert served["input"] >= 1
    assert torch.equal(first, lstm(x)[0])
    w, b, w_hh, _ = lstm._layer_weights(0)
    h0 = torch.zeros(2, 5, 96, device="cuda", dtype=torch.bfloat16)
    args = (x, w.detach(), b.detach(), [t.detach() for t in w_hh], h0, h0.clone(), None, [False, True], "cuda")
    torch.library.opcheck(_lstm_from_input_op, args, {"save_for_backward": True, "write_y": True})
    graph, static_x = torch.cuda.CUDAGraph(), x.clone()
    with torch.no_grad():
        lstm(static_x)  # warm-up outside the capture
        with torch.cuda.graph(graph):
            out = lstm(static_x)[0]
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    with torch.no_grad():
        assert torch.equal(out, lstm(static_x)[0])
