"""The ``triton`` backend of ``lstm_recurrence`` (``fusedconvlstm/triton/lstm.py``).

On the CPU under ``TRITON_INTERPRET=1`` (float32 / float16, small sizes, the single-program mode
and the multi-program decomposition launched step by step); on a GPU (marked ``gpu``) the
persistent mode at the reference model's size. Every result is compared with the float64
reference; the pass mark is twice the error of PyTorch computing the same thing in the same dtype
on the same inputs (docs/design.md §3), measured in the test.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fusedconvlstm import LSTM, BackendUnavailableError, backends, lstm_recurrence, parallel_lstm
from fusedconvlstm.calls.lstm import LSTMRecurrenceCall, check_lstm_recurrence_args
from fusedconvlstm.passmark import rel_err
from fusedconvlstm.reference import lstm as reference_lstm
from fusedconvlstm.triton import lstm as triton_lstm
from fusedconvlstm.triton import persistent
from tests.helpers import assert_pass_mark, capture_graph, lstm_weights

pytestmark = pytest.mark.triton
# On a GPU machine (no interpreter) the tests written for CPU tensors run on CUDA tensors, the
# compiled kernels (tests/conftest.py would skip them otherwise): see _follow_the_gpu.
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
TRITON_TESTS_FOLLOW_THE_GPU = True
# The Triton LSTM's software pipelining, a switch the GPU session times both ways.
STAGES_ENV = "FUSEDCONVLSTM_TRITON_LSTM_STAGES"


@pytest.fixture(autouse=True)
def _follow_the_gpu(request):
    """Where the module follows the GPU, a test not marked ``gpu`` creates its tensors there
    (``torch.set_default_device``), and float32 recurrences run IEEE (cuDNN's RNN flag), as the
    tight float32 bounds here assume; their sizes run the single-program mode, which takes IEEE."""
    if not ON_GPU or request.node.get_closest_marker("gpu") is not None:
        yield
        return
    rnn = torch.backends.cudnn.rnn
    saved = rnn.fp32_precision
    rnn.fp32_precision = "ieee"
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(None)
        rnn.fp32_precision = saved


F64 = torch.float64


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-fill every buffer the Triton launches allocate, so an unwritten element shows up."""

    def alloc(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))

    monkeypatch.setattr(triton_lstm, "_alloc", alloc)


@pytest.fixture
def torch_in_dtype(monkeypatch):
    """The reference loop computing in the inputs' own dtype: PyTorch's error at that precision."""

    def run(xg, w_hh, h0, c0, lengths, reverse, w_hr=()):
        with monkeypatch.context() as m:
            m.setattr(reference_lstm, "accumulation_dtype", lambda dtype: dtype)
            return reference_lstm.lstm_recurrence_reference(xg, w_hh, list(w_hr), h0, c0, lengths, reverse)

    return run


def _op_inputs(T, B, D, H, lengths=None, device=None):
    """Float64 inputs of the op and cotangents for its outputs (fresh random values)."""
    xg = torch.randn(T, B, D, 4 * H, dtype=F64, device=device)
    w_hh = lstm_weights(D, H, device=device or torch.get_default_device())
    h0 = torch.randn(D, B, H, dtype=F64, device=device)
    c0 = torch.randn(D, B, H, dtype=F64, device=device)
    cot = (
        torch.randn(T, B, D, H, dtype=F64, device=device),
        torch.randn(D, B, H, dtype=F64, device=device),
        torch.randn(D, B, H, dtype=F64, device=device),
    )
    return xg, w_hh, h0, c0, lengths, cot


def _forward_backward(fn, xg, w_hh, h0, c0, cot, dtype, w_hr=()):
    """Outputs and gradients (xg, each w_hh, h0, c0, and each w_hr where given) of ``fn`` run on
    ``dtype`` copies of the inputs; ``fn(xg, w_hh, h0, c0)``, or ``fn(xg, w_hh, h0, c0, w_hr)``."""
    D = len(w_hh)
    leaves = [t.detach().to(dtype).requires_grad_() for t in (xg, h0, c0, *w_hh, *w_hr)]
    xg_, h0_, c0_, *w_ = leaves
    y, h_n, c_n = fn(xg_, w_[:D], h0_, c0_, *([w_[D:]] if w_hr else []))
    loss = sum((o.double() * g).sum() for o, g in zip((y, h_n, c_n), cot))
    grads = torch.autograd.grad(loss, leaves)
    g_xg, g_h0, g_c0, *g_w = grads
    named = {"y": y, "h_n": h_n, "c_n": c_n, "grad_xg": g_xg, "grad_h0": g_h0, "grad_c0": g_c0}
    named.update({f"grad_w_hh[{d}]": g for d, g in enumerate(g_w[:D])})
    named.update({f"grad_w_hr[{d}]": g for d, g in enumerate(g_w[D:])})
    return named


def loop_like_cudnn(xg, w_hh, h0, c0, lengths, reverse):
    """The recurrence as cuDNN computes it in a 16-bit dtype: products accumulated and the cell
    computed in float32, ``h`` rounded to the input's dtype at every step (it is stored and fed
    to the next step's GEMM in that dtype), ``c`` kept in float32. A stricter comparator than the
    reference loop with its accumulation lowered to 16 bits (``torch_in_dtype``)."""
    T, B, D, _ = xg.shape
    dt, f32 = xg.dtype, torch.float32
    valid = None if lengths is None else torch.arange(T, device="cpu")[:, None] < torch.as_tensor(lengths).cpu()[None]
    ys, hs, cs = [], [], []
    for d in range(D):
        h, c, w = h0[d], c0[d].to(f32), w_hh[d].to(f32)
        out = [None] * T
        for t in reversed(range(T)) if reverse[d] else range(T):
            i, f, g, o = (xg[t, :, d].to(f32) + h.to(f32) @ w.t()).chunk(4, dim=-1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = (torch.sigmoid(o) * torch.tanh(c_new)).to(dt)
            if valid is None:
                h, c, out[t] = h_new, c_new, h_new
            else:
                m = valid[t].to(xg.device).unsqueeze(1)
                h, c, out[t] = torch.where(m, h_new, h), torch.where(m, c_new, c), torch.where(m, h_new, 0)
        ys.append(torch.stack(out))
        hs.append(h)
        cs.append(c)
    return torch.stack(ys, dim=2), torch.stack(hs), torch.stack(cs).to(dt)


def test_loop_like_cudnn_is_the_stricter_comparator(torch_in_dtype):
    """fp16 with lengths and a reversed direction: the cuDNN-like loop's error against float64 is
    below the 16-bit-accumulation loop's, and the Triton kernels stay within twice it."""
    T, B, D, H, reverse, lengths = OP_CASES["bidir-lengths"]
    lengths = torch.tensor(lengths)
    xg, w_hh, h0, c0, _, cot = _op_inputs(T, B, D, H)
    fp16 = torch.float16
    ref = _forward_backward(
        lambda x, w, h, c: lstm_recurrence(x, w, h, c, lengths=lengths, reverse=reverse, backend="reference"),
        xg, w_hh, h0, c0, cot, F64,
    )  # fmt: skip
    like = _forward_backward(lambda *a: loop_like_cudnn(*a, lengths, reverse), xg, w_hh, h0, c0, cot, fp16)
    lp = _forward_backward(lambda *a: torch_in_dtype(*a, lengths, reverse), xg, w_hh, h0, c0, cot, fp16)
    assert rel_err(like["y"], ref["y"], strict=True) < rel_err(lp["y"], ref["y"], strict=True)
    ours = _forward_backward(
        lambda x, w, h, c: lstm_recurrence(x, w, h, c, lengths=lengths, reverse=reverse, backend="triton"),
        xg, w_hh, h0, c0, cot, fp16,
    )  # fmt: skip
    _check_against_reference(ours, like, ref, "fp16 against the cuDNN-like loop")


def _check_against_reference(ours, torch_lp, ref, context=""):
    """Every tensor within the pass mark (docs/design.md §3) of PyTorch's in the same dtype."""
    for name, r in ref.items():
        assert not torch.isnan(ours[name]).any(), f"{context} {name}: NaN (an element was not written)"
        assert_pass_mark(ours[name], torch_lp[name], r, ours[name].dtype, f"{context} {name}")


OP_CASES = {
    # T, B, D, H, reverse, lengths
    "uni-h40": (7, 3, 1, 40, [False], None),
    "bidir-b1-h64-t16": (16, 1, 2, 64, [False, True], None),
    "bidir-lengths": (9, 5, 2, 24, [False, True], [9, 1, 4, 0, 6]),
    "parallel-pair": (5, 3, 2, 16, [False, False], None),
    "t1-lengths": (1, 3, 2, 16, [False, True], [1, 0, 1]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(OP_CASES), ids=list(OP_CASES))
def test_op_matches_float64_reference(case, dtype, poisoned, torch_in_dtype):
    T, B, D, H, reverse, lengths = OP_CASES[case]
    lengths = None if lengths is None else torch.tensor(lengths)
    xg, w_hh, h0, c0, lengths, cot = _op_inputs(T, B, D, H, lengths)

    def op(backend):
        return lambda x, w, h, c: lstm_recurrence(x, w, h, c, lengths=lengths, reverse=reverse, backend=backend)

    ref = _forward_backward(op("reference"), xg, w_hh, h0, c0, cot, F64)
    ours = _forward_backward(op("triton"), xg, w_hh, h0, c0, cot, dtype)
    torch_lp = _forward_backward(
        lambda x, w, h, c: torch_in_dtype(x, w, h, c, lengths, reverse), xg, w_hh, h0, c0, cot, dtype
    )
    _check_against_reference(ours, torch_lp, ref, case)
    if lengths is not None:
        # Steps past a row's length output exactly zero.
        past = torch.arange(T).unsqueeze(1) >= lengths.unsqueeze(0)
        assert torch.all(ours["y"][past] == 0)


PROJECTED_CASES = {
    # T, B, D, H, P, reverse, lengths
    "uni-h40-p16": (6, 3, 1, 40, 16, [False], None),
    "bidir-lengths-h24-p5": (7, 5, 2, 24, 5, [False, True], [7, 1, 4, 0, 6]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(PROJECTED_CASES), ids=list(PROJECTED_CASES))
def test_projected_op_matches_float64_reference(case, dtype, poisoned, torch_in_dtype):
    """proj_size: the kernels run the recurrence on W_hh W_hr (numerics.projection); outputs and
    every gradient, w_hr's included, against float64."""
    T, B, D, H, P, reverse, lengths = PROJECTED_CASES[case]
    lengths = None if lengths is None else torch.tensor(lengths)
    xg = torch.randn(T, B, D, 4 * H, dtype=F64)
    w_hh, w_hr = lstm_weights(D, H, P=P, device=xg.device), [torch.randn(P, H, dtype=F64) * H**-0.5 for _ in range(D)]
    h0, c0 = torch.randn(D, B, P, dtype=F64), torch.randn(D, B, H, dtype=F64)
    cot = [torch.randn(T, B, D, P, dtype=F64), torch.randn(D, B, P, dtype=F64), torch.randn(D, B, H, dtype=F64)]

    def op(backend):
        return lambda x, wh, h, c, wr: lstm_recurrence(
            x, wh, h, c, w_hr=wr, lengths=lengths, reverse=reverse, backend=backend
        )

    def run(fn, dt):
        return _forward_backward(fn, xg, w_hh, h0, c0, cot, dt, w_hr=w_hr)

    ref = run(op("reference"), F64)
    ours = run(op("triton"), dtype)
    torch_lp = run(lambda x, wh, h, c, wr: torch_in_dtype(x, wh, h, c, lengths, reverse, w_hr=wr), dtype)
    _check_against_reference(ours, torch_lp, ref, case)


def test_multi_program_decomposition_matches_reference(poisoned):
    """The persistent mode's indexing (3 unit slices, 2 batch groups), one launch per step."""
    T, B, D, H = 4, 17, 2, 40
    lengths = torch.randint(0, T + 1, (B,))
    xg, w_hh, h0, c0, _, (gy, gh, gc) = _op_inputs(T, B, D, H)
    reverse = [True, False]
    plan = triton_lstm.stepped_plan(B, H, block_h=16, block_b=16, n_bgroups=2)
    assert plan.n_slices(H) == 3 and plan.n_bgroups == 2
    f32 = [t.float() for t in (xg, h0, c0, gy, gh, gc)]
    w32 = [w.float() for w in w_hh]
    y, h_n, c_n, ws = triton_lstm.lstm_forward(f32[0], w32, f32[1], f32[2], lengths, reverse, plan=plan)
    g_xg, g_w, g_h0, g_c0 = triton_lstm.lstm_backward(*f32[3:], w32, f32[1], lengths, reverse, y, ws, plan=plan)
    ref_out = reference_lstm.lstm_recurrence_reference(xg, w_hh, [], h0, c0, lengths, reverse)
    ref_grad = reference_lstm.lstm_recurrence_reference_backward(gy, gh, gc, xg, w_hh, [], h0, c0, lengths, reverse)
    pairs = {
        "y": (y, ref_out[0]),
        "h_n": (h_n, ref_out[1]),
        "c_n": (c_n, ref_out[2]),
        "grad_xg": (g_xg, ref_grad[0]),
        "grad_w_hh[0]": (g_w[0], ref_grad[1][0]),
        "grad_w_hh[1]": (g_w[1], ref_grad[1][1]),
        "grad_h0": (g_h0, ref_grad[3]),
        "grad_c0": (g_c0, ref_grad[4]),
    }
    for name, (out, ref) in pairs.items():
        assert not torch.isnan(out).any(), name
        # float32 end to end: a few roundings per step over 4 steps.
        assert rel_err(out, ref, strict=True) < 2e-6, f"{name}: {rel_err(out, ref, strict=True):.3g}"


def _module_case(dtype, **kw):
    ref = nn.LSTM(5, kw.pop("hidden", 24), dtype=F64, **kw)
    low = copy.deepcopy(ref).to(dtype)
    return ref, low, LSTM.from_torch(low, backend="triton")


def _module_run(module, x, hx, dtype, packed_lengths=None):
    x = x.detach().to(dtype).requires_grad_()
    hx = None if hx is None else tuple(h.detach().to(dtype).requires_grad_() for h in hx)
    lengths = None if packed_lengths is None else torch.as_tensor(packed_lengths).cpu()  # packing wants CPU lengths
    inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, (h_n, c_n) = module(inp, hx)
    if packed_lengths is not None:
        out, _ = pad_packed_sequence(out)
    torch.manual_seed(1)  # the same cotangents for every module
    loss = sum((o.double() * torch.randn(o.shape, dtype=F64)).sum() for o in (out, h_n, c_n))
    loss.backward()
    res = {"output": out, "h_n": h_n, "c_n": c_n, "grad_x": x.grad}
    if hx is not None:
        res.update(grad_h0=hx[0].grad, grad_c0=hx[1].grad)
    res.update({f"grad_{n}": p.grad for n, p in module.named_parameters()})
    return res


MODULE_CASES = {
    "batch_first-h0": dict(batch_first=True, with_hx=True),
    "bidirectional-2layers": dict(bidirectional=True, num_layers=2, with_hx=True),
    "packed-bidirectional": dict(bidirectional=True, packed=True),
    "proj-bidirectional-2layers-h0": dict(bidirectional=True, num_layers=2, proj_size=7, with_hx=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(MODULE_CASES), ids=list(MODULE_CASES))
def test_module_matches_torch_lstm(case, dtype):
    opts = dict(MODULE_CASES[case])
    with_hx, packed = opts.pop("with_hx", False), opts.pop("packed", False)
    ref, low, fused = _module_case(dtype, **opts)
    T, B = 8, 3
    D = 2 if ref.bidirectional else 1
    x = torch.randn((B, T, 5) if ref.batch_first else (T, B, 5), dtype=F64)
    hx = None
    if with_hx:
        sizes = (ref.proj_size or 24, 24)
        hx = tuple(torch.randn(ref.num_layers * D, B, n, dtype=F64) for n in sizes)
    lengths = torch.tensor([5, 8, 2]) if packed else None
    expect = _module_run(ref, x, hx, F64, lengths)
    torch_lp = _module_run(low, x, hx, dtype, lengths)
    ours = _module_run(fused, x, hx, dtype, lengths)
    _check_against_reference(ours, torch_lp, expect, case)


def test_parallel_lstm_pair_matches_two_torch_lstms():
    """Two LSTMs reading one input, in one recurrence launch (the reference model's pair)."""
    dtype = torch.float32
    refs = [nn.LSTM(5, 32, batch_first=True, dtype=F64) for _ in range(2)]
    lows = [copy.deepcopy(r).to(dtype) for r in refs]
    fused = [LSTM.from_torch(m, backend="triton") for m in lows]
    x = torch.randn(3, 6, 5, dtype=F64)
    outs = parallel_lstm(fused, x.to(dtype))
    for k in range(2):
        out, (h, c) = outs[k]
        o_ref, (h_ref, c_ref) = refs[k](x)
        o_low, (h_low, c_low) = lows[k](x.to(dtype))
        for name, a, b, r in (("output", out, o_low, o_ref), ("h_n", h, h_low, h_ref), ("c_n", c, c_low, c_ref)):
            assert_pass_mark(a, b, r, dtype, f"lstm {k} {name}")


def test_non_contiguous_inputs_give_the_contiguous_result():
    T, B, D, H = 5, 3, 2, 20
    xg, w_hh, h0, c0, _, (gy, gh, gc) = _op_inputs(T, B, D, H)
    xg, h0, c0, gy = (t.float() for t in (xg, h0, c0, gy))
    w_hh = [w.float() for w in w_hh]
    # The same values behind strided views: (B, T) swapped storage, every other column, transposes.
    xg_nc = xg.transpose(0, 1).contiguous().transpose(0, 1)
    w_nc = [torch.stack([w, w], dim=-1)[..., 0] for w in w_hh]
    h0_nc, c0_nc = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (h0, c0))
    gy_nc = gy.transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(t.is_contiguous() for t in (xg_nc, *w_nc, h0_nc, c0_nc, gy_nc))
    reverse = [False, True]
    out = triton_lstm.lstm_forward(xg, w_hh, h0, c0, None, reverse)
    out_nc = triton_lstm.lstm_forward(xg_nc, w_nc, h0_nc, c0_nc, None, reverse)
    for a, b in zip(out, out_nc):
        assert torch.equal(a, b)
    grads = triton_lstm.lstm_backward(gy, gh.float(), gc.float(), w_hh, h0, None, reverse, out[0], out[3])
    grads_nc = triton_lstm.lstm_backward(gy_nc, gh.float(), gc.float(), w_nc, h0_nc, None, reverse, out[0], out[3])
    for a, b in zip((grads[0], *grads[1], *grads[2:]), (grads_nc[0], *grads_nc[1], *grads_nc[2:])):
        assert torch.equal(a, b)


def test_runs_are_bitwise_reproducible():
    T, B, D, H = 6, 3, 2, 16
    xg, w_hh, h0, c0, lengths, cot = _op_inputs(T, B, D, H, torch.tensor([6, 2, 4]))

    def op(x, w, h, c):
        return lstm_recurrence(x, w, h, c, lengths=lengths, reverse=[False, True], backend="triton")

    first = _forward_backward(op, xg, w_hh, h0, c0, cot, torch.float32)
    second = _forward_backward(op, xg, w_hh, h0, c0, cot, torch.float32)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_opcheck():
    T, B, D, H = 4, 3, 2, 16
    for lengths in (None, torch.tensor([4, 1, 3])):
        xg, w_hh, h0, c0, _, _ = _op_inputs(T, B, D, H)
        args = [t.float().requires_grad_() for t in (xg, *w_hh, h0, c0)]
        torch.library.opcheck(
            torch.ops.fusedconvlstm.lstm_recurrence.default,
            (args[0], args[1 : 1 + D], [], args[-2], args[-1], lengths, [False, True], "triton"),
        )


def _call(**kw) -> LSTMRecurrenceCall:
    base = dict(
        seq_len=5,
        batch=3,
        num_recurrences=1,
        hidden_size=8,
        proj_size=0,
        dtype=torch.float32,
        device=torch.device("cpu"),
        has_lengths=False,
        reverse=(False,),
    )
    base.update(kw)
    return LSTMRecurrenceCall(**base)


def test_refuses_what_it_does_not_fuse():
    xg = torch.randn(3, 2, 1, 16)
    with pytest.raises(BackendUnavailableError, match="float64"):
        lstm_recurrence(xg.double(), lstm_weights(1, 4, device=xg.device), backend="triton")
    if not ON_GPU:
        with pytest.raises(BackendUnavailableError, match="interpreter computes bfloat16"):
            w = lstm_weights(1, 4, dtype=torch.bfloat16, device=xg.device)
            lstm_recurrence(xg.bfloat16(), w, backend="triton")
    call = check_lstm_recurrence_args(
        xg.double(),
        lstm_weights(1, 4, device=xg.device),
        [],
        torch.zeros(1, 2, 4, dtype=F64),
        torch.zeros(1, 2, 4, dtype=F64),
        None,
        [False],
    )
    assert "float64" in backends.explain("lstm_recurrence", call, xg.device)["triton"]


def test_workspace_shape_is_what_the_forward_returns():
    T, B, D, H = 3, 2, 2, 16
    xg, w_hh, h0, c0, _, _ = _op_inputs(T, B, D, H)
    *_, ws = triton_lstm.lstm_forward(xg.float(), [w.float() for w in w_hh], h0.float(), c0.float(), None, [0, 1])
    shape, dtype = triton_lstm._workspace_shape(_call(seq_len=T, batch=B, num_recurrences=D, hidden_size=H))
    assert tuple(ws.shape) == shape and ws.dtype == dtype


# --- launch planning (no GPU needed: the device limits are given) -------------------------------

H100 = persistent.DeviceLimits(
    multiprocessor_count=132,
    regs_per_multiprocessor=65536,
    max_threads_per_multiprocessor=2048,
    shared_memory_per_multiprocessor=233472,
    shared_memory_per_block_optin=232448,
    warp_size=32,
)


def test_programs_per_sm_follows_each_limit():
    # registers: 128/thread x 128 threads = 16 Ki of 64 Ki -> 4; shared memory: 80 KiB -> 2.
    assert persistent.programs_per_sm(128, 4, 80 * 1024, H100) == 2
    assert persistent.programs_per_sm(128, 4, 0, H100) == 4
    assert persistent.programs_per_sm(255, 8, 0, H100) == 1  # 255 rounds up to 256 per thread
    assert persistent.programs_per_sm(32, 4, 0, H100) == 16  # threads: 2048 / 128
    assert persistent.programs_per_sm(32, 1, 0, H100) == 32  # the CTA limit
    assert persistent.programs_per_sm(64, 4, 240 * 1024, H100) == 0  # over the opt-in maximum


def test_persistent_plan_from_device_limits(monkeypatch):
    monkeypatch.setattr(persistent, "device_limits", lambda index: H100)
    monkeypatch.delenv("TRITON_INTERPRET")
    cuda = torch.device("cuda", 0)
    # The reference model's pair: 2 x 512 / 16 = 64 programs, each with 4 x 16 x 512 bf16 = 64 KiB.
    pair = _call(num_recurrences=2, hidden_size=512, batch=256, dtype=torch.bfloat16, device=cuda)
    assert triton_lstm._why_not(pair) is None
    for kernel in ("forward", "backward"):
        plan = triton_lstm.plan_launch(pair, kernel)
        assert plan.mode == "persistent" and plan.block_h == 16 and plan.n_slices(512) == 32
    # 2 x 2048 in float32 needs 32-unit slices (128 programs) of 4 x 32 x 2048 x 4 bytes: refused.
    big = _call(num_recurrences=2, hidden_size=2048, device=cuda)
    assert "do not fit on-chip" in triton_lstm._why_not(big)
    with pytest.raises(BackendUnavailableError, match="do not fit on-chip"):
        triton_lstm.plan_launch(big)
    assert "co-resident" in triton_lstm._why_not(_call(num_recurrences=2, hidden_size=8192, device=cuda))
    # 2 x 896 in float32: 4 x 16 x 896 x 4 = 224 KiB of W_hh fits the 227 KiB opt-in, but not with
    # the dots' scratch beside it (the compiled kernel would fail to load).
    assert "and about 8192 bytes of scratch" in triton_lstm._why_not(
        _call(num_recurrences=2, hidden_size=896, device=cuda)
    )
    assert triton_lstm.plan_launch(_call(hidden_size=64, device=cuda)).mode == "single"


def test_pipelined_plan_keeps_room_for_the_prefetch_buffers(monkeypatch):
    """With FUSEDCONVLSTM_TRITON_LSTM_STAGES=2 a program also holds a batch tile of the dots' left
    operand per extra stage (the backward's, 4 gates wide, is the larger): a call whose kernels
    would no longer load is refused up front, with the setting named, not in the backward."""
    monkeypatch.setattr(persistent, "device_limits", lambda index: H100)
    monkeypatch.delenv("TRITON_INTERPRET")
    cuda = torch.device("cuda", 0)
    pair = _call(num_recurrences=2, hidden_size=512, batch=256, dtype=torch.bfloat16, device=cuda)
    wider = dataclasses.replace(pair, hidden_size=576)  # reduction padded to 640: 80 KiB of W_hh
    fp32 = dataclasses.replace(pair, dtype=torch.float32)  # 128 KiB of W_hh
    monkeypatch.setattr(triton_lstm, "fp32_recurrence_allows_tf32", lambda: True)
    assert [triton_lstm._why_not(c) for c in (pair, wider, fp32)] == [None] * 3
    monkeypatch.setenv(STAGES_ENV, "2")
    # 64 KiB of W_hh + 128 KiB of prefetch (4 x 32 x 512 x 2 bytes) + scratch: fits 227 KiB.
    assert triton_lstm._why_not(pair) is None
    assert triton_lstm.plan_launch(pair, "backward").block_h == 16
    for call in (wider, fp32):  # 160 and 256 KiB of prefetch buffers
        assert f"bytes of prefetch buffers ({STAGES_ENV}=2)" in triton_lstm._why_not(call)
    with pytest.raises(BackendUnavailableError, match="prefetch buffers"):
        triton_lstm.plan_launch(wider, "forward")
    # 16-row tiles (batch <= 16) halve the buffers.
    assert triton_lstm._why_not(dataclasses.replace(wider, batch=16)) is None


def test_persistent_grid_is_sized_from_the_compiled_kernel(monkeypatch):
    """Batch groups fill what the compiled kernel leaves co-resident; a kernel that cannot hold even
    one group is refused. (The compile and the device query are stand-ins here.)"""
    warmups = []

    class Kernel:
        fn = type("fn", (), {"__name__": "lstm_forward_kernel"})

        def warmup(self, grid, **kwargs):
            warmups.append(kwargs)
            meta = type("meta", (), {"shared": 69632, "num_warps": 4})
            return type("compiled", (), {"n_regs": 96, "n_spills": 0, "metadata": meta})

    capacity = {"value": 264}
    monkeypatch.setattr(persistent, "co_resident_programs", lambda compiled, device: capacity["value"])
    monkeypatch.setattr(triton_lstm, "_persistent_sizing", {})
    plan = triton_lstm.LaunchPlan("persistent", 16, 32, 4, 1, 256, 64)
    args = dict(len_ptr=torch.empty(1, dtype=torch.int32), xg_ptr=torch.empty(1), T=45, HAS_LENGTHS=False)
    cpu = torch.device("cpu")
    # 2 x 512 / 16 = 64 programs per batch group; 264 co-resident -> 4 groups of 64 rows.
    sized = triton_lstm._size_persistent_grid(Kernel(), plan, args, {"BLOCK_B": 32}, 2, 512, 256, cpu, False)
    assert (sized.n_bgroups, sized.rows_per_group, sized.grid(2, 512)) == (4, 64, 256)
    assert warmups[0]["n_bgroups"] == 1 and warmups[0]["step_end"] == 0
    info = triton_lstm.last_persistent_launch()
    assert info["grid"] == 256 <= info["capacity"] and info["plan"] == sized
    # Cached: no second compile for the same call, nor for a sequence length Triton specializes
    # alike (neither 1 nor a multiple of 16); one that it specializes otherwise compiles again.
    triton_lstm._size_persistent_grid(Kernel(), plan, args, {"BLOCK_B": 32}, 2, 512, 256, cpu, False)
    triton_lstm._size_persistent_grid(Kernel(), plan, dict(args, T=77), {"BLOCK_B": 32}, 2, 512, 256, cpu, False)
    assert len(warmups) == 1
    triton_lstm._size_persistent_grid(Kernel(), plan, dict(args, T=48), {"BLOCK_B": 32}, 2, 512, 256, cpu, False)
    assert len(warmups) == 2
    # A small batch never gets empty groups.
    small = triton_lstm._size_persistent_grid(Kernel(), plan, args, {"BLOCK_B": 32}, 2, 512, 40, cpu, False)
    assert small.n_bgroups * small.rows_per_group >= 40 and small.n_bgroups == 2
    capacity["value"] = 40
    with pytest.raises(BackendUnavailableError, match="needs 64 co-resident programs but cpu holds 40"):
        triton_lstm._size_persistent_grid(Kernel(), plan, args, {"BLOCK_B": 16}, 2, 512, 256, cpu, False)


def test_exact_fp32_is_refused_by_the_persistent_mode_not_spilled(monkeypatch):
    """IEEE float32 dots spill tens of KB per thread in the persistent kernels (the compile check
    below runs TF32, the only float32 mode they take); the single-program mode still runs them."""
    monkeypatch.setattr(persistent, "device_limits", lambda index: H100)
    monkeypatch.delenv("TRITON_INTERPRET")
    cuda = torch.device("cuda", 0)
    pair = _call(num_recurrences=2, hidden_size=512, batch=256, dtype=torch.float32, device=cuda)
    monkeypatch.setattr(triton_lstm, "fp32_recurrence_allows_tf32", lambda: True)
    assert triton_lstm._why_not(pair) is None
    monkeypatch.setattr(triton_lstm, "fp32_recurrence_allows_tf32", lambda: False)
    assert "exact float32" in triton_lstm._why_not(pair)
    with pytest.raises(BackendUnavailableError, match="exact float32"):
        triton_lstm.plan_launch(pair, "backward")
    assert triton_lstm._why_not(_call(hidden_size=48, device=cuda)) is None  # single program
    assert triton_lstm._why_not(dataclasses.replace(pair, dtype=torch.bfloat16)) is None


def test_persistent_kernel_that_does_not_fit_an_sm_is_refused_not_raised(monkeypatch):
    """Triton finds out of shared memory only when the binary loads: that is a refusal of the
    backend (auto takes another), not an error from inside Triton."""
    from triton.runtime.errors import OutOfResources

    class Kernel:
        fn = type("fn", (), {"__name__": "lstm_backward_kernel"})

        def warmup(self, grid, **kwargs):
            raise OutOfResources(240 * 1024, 232448, "shared memory")

    monkeypatch.setattr(triton_lstm, "_persistent_sizing", {})
    plan = triton_lstm.LaunchPlan("persistent", 16, 32, 4, 1, 256, 64)
    args = dict(len_ptr=torch.empty(1, dtype=torch.int32), T=45, HAS_LENGTHS=False)
    with pytest.raises(BackendUnavailableError, match="does not fit an SM"):
        triton_lstm._size_persistent_grid(Kernel(), plan, args, {}, 2, 512, 256, torch.device("cpu"), True)


def test_co_resident_programs_take_the_drivers_count_when_it_is_smaller(monkeypatch):
    meta = type("meta", (), {"shared": 69632, "num_warps": 4})
    compiled = type("compiled", (), {"n_regs": 96, "metadata": meta, "function": 0, "_init_handles": lambda self: None})
    monkeypatch.setattr(persistent, "device_limits", lambda index: H100)
    calculator = persistent.programs_per_sm(96, 4, 69632, H100) * H100.multiprocessor_count
    for driver, want in ((None, calculator), (1, H100.multiprocessor_count), (99, calculator)):
        monkeypatch.setattr(persistent, "driver_programs_per_sm", lambda function, threads, shared, n=driver: n)
        assert persistent.co_resident_programs(compiled(), torch.device("cuda", 0)) == want


@pytest.mark.parametrize(
    "dtype, batch",
    [("bfloat16", 8), ("bfloat16", 256), ("float32", 256)],
    ids=["bf16-block16", "bf16-block32", "fp32-tf32-block32"],
)
def test_persistent_kernels_compile_for_hopper_without_spills(dtype, batch):
    """The persistent kernels compiled ahead of time for sm_90 (no GPU needed): no register spills,
    shared memory within an H100's. Runs outside the interpreter, which cannot compile. float32
    runs TF32 there (exact float32 is refused: see above)."""
    code = (
        "import json, torch; from fusedconvlstm.triton.lstm import persistent_kernels_compiled as k; "
        "from fusedconvlstm.triton.persistent import ptxas_resources as r; "
        f"print(json.dumps({{n: r(c) for n, c in k(torch.{dtype}, 512, {batch}).items()}}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    for kernel, res in json.loads(run.stdout.strip().splitlines()[-1]).items():
        assert res["spill_stores"] == 0 and res["spill_loads"] == 0, (kernel, res)
        assert res["registers"] <= 255 and res["shared"] <= H100.shared_memory_per_block_optin, (kernel, res)


def test_pipeline_stages_reach_every_launch_and_are_checked(monkeypatch):
    """FUSEDCONVLSTM_TRITON_LSTM_STAGES (a switch the GPU session times both ways) is the
    num_stages of the forward and backward launches; a value outside 1..4 fails the call."""
    from fusedconvlstm.triton import lstm_kernels

    seen = []

    class Recording:
        def __init__(self, kernel):
            self.kernel, self.fn = kernel, kernel.fn

        def __getitem__(self, grid):
            def launch(**kwargs):
                seen.append((self.fn.__name__, kwargs["num_stages"]))
                return self.kernel[grid](**kwargs)

            return launch

    for name in ("lstm_forward_kernel", "lstm_backward_kernel"):
        monkeypatch.setattr(lstm_kernels, name, Recording(getattr(lstm_kernels, name)))
    xg, w_hh, h0, c0, _, cot = _op_inputs(3, 2, 2, 16)
    _forward_backward(_op("triton"), xg, w_hh, h0, c0, cot, torch.float32)
    monkeypatch.setenv(STAGES_ENV, "2")
    _forward_backward(_op("triton"), xg, w_hh, h0, c0, cot, torch.float32)
    assert seen == [("lstm_forward_kernel", 1), ("lstm_backward_kernel", 1)] + [
        ("lstm_forward_kernel", 2),
        ("lstm_backward_kernel", 2),
    ]
    for bad in ("0", "3", "two"):
        monkeypatch.setenv(STAGES_ENV, bad)
        with pytest.raises(ValueError, match=f"{STAGES_ENV} must be one of .*got '{bad}'"):
            _forward_backward(_op("triton"), xg, w_hh, h0, c0, cot, torch.float32)


def _enclosing_loop(lines: list[str], inner: int) -> tuple[int, int]:
    """``(first, last)`` line of the outermost ``scf.for`` of a TTGIR listing that holds line ``inner``."""

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    for first, line in enumerate(lines[:inner]):
        if "scf.for" in line:
            last = next(
                j
                for j in range(first + 1, len(lines))
                if indent(lines[j]) == indent(line) and lines[j].lstrip()[:1] == "}"
            )
            if last > inner:
                return first, last
    raise AssertionError("no scf.for holds the grid barrier")


@pytest.mark.parametrize("batch", [256, 8], ids=["block32", "block16"])
def test_pipelined_kernels_prefetch_only_between_two_barriers(batch, tmp_path):
    """With FUSEDCONVLSTM_TRITON_LSTM_STAGES=2 (compiled for sm_90, no GPU needed) Triton turns the
    loads of exchanged rows into asynchronous copies. They must stay inside one step: the step loop
    itself not pipelined (no copy before it, no values carried across its iterations: a load of
    step t+1 hoisted above step t's barrier would read rows other programs have not written yet),
    every copy of a step waited for before the CTA barrier that precedes the grid barrier's arrive,
    and every copy past L1 (``.cg``: another SM wrote the rows). Shared memory within an H100's.
    (Spills are the timing's to weigh: not checked here.)"""
    code = (
        "import json, sys, torch; from fusedconvlstm.triton import lstm; from fusedconvlstm.triton.persistent "
        f"import ptxas_resources; k = lstm.persistent_kernels_compiled(torch.bfloat16, 512, {batch}, num_stages=2); "
        "[open(f'{sys.argv[1]}/{n}.ttgir', 'w').write(c.asm['ttgir']) for n, c in k.items()]; "
        "print(json.dumps({n: ptxas_resources(c) for n, c in k.items()}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for kernel, res in json.loads(run.stdout.strip().splitlines()[-1]).items():
        assert res["registers"] <= 255 and res["shared"] <= H100.shared_memory_per_block_optin, (kernel, res)
        lines = (tmp_path / f"{kernel}.ttgir").read_text().splitlines()
        arrive = next(i for i, line in enumerate(lines) if "tt.atomic_rmw" in line)
        first, last = _enclosing_loop(lines, arrive)
        assert "iter_args" not in lines[first], f"{kernel}: the step loop carries values (pipelined?)"
        # The CTA barrier before the arrive (spelled gpu.barrier in Triton 3.6, ttg.barrier in 3.8).
        cta = max(i for i in range(first, arrive) if re.search(r"\b(gpu|ttg)\.barrier\b", lines[i]))
        copies = [i for i, line in enumerate(lines) if "async_copy_global_to_local" in line]
        in_step = [i for i in copies if first < i < last]
        assert in_step, f"{kernel}: num_stages=2 pipelined no load (nothing for the switch to time)"
        assert not [i for i in copies if i < first], f"{kernel}: a copy issued before the step loop"
        assert max(in_step) < cta, f"{kernel}: a copy issued after the step's barrier"
        assert any("async_wait" in lines[i] and "num = 0" in lines[i] for i in range(max(in_step), cta)), (
            f"{kernel}: the step's copies are not all waited for before its barrier"
        )
        assert all("cacheModifier = cg" in lines[i] for i in copies), f"{kernel}: a copy through L1"


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("", True),  # PyTorch's default for cuDNN's RNNs
        ("torch.backends.cudnn.allow_tf32 = False", False),
        ("torch.backends.cudnn.rnn.fp32_precision = 'ieee'", False),
        # All inherit (IEEE); the legacy allow_tf32 getter raises here, so it must not be read.
        ("torch.backends.cudnn.conv.fp32_precision = 'ieee'; torch.backends.cudnn.rnn.fp32_precision = 'none'", False),
    ],
)
def test_fp32_tf32_rule_follows_pytorch_flags(flags, expected):
    """In a subprocess: the flags are process-wide and the legacy getters cannot always be restored."""
    if "fp32_precision" in flags and not hasattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    code = f"import torch; from fusedconvlstm.numerics.recurrence import fp32_recurrence_allows_tf32 as f; {flags or 'pass'}; print(f())"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == str(expected)


def test_interpreter_and_cpu_use_the_single_program_mode():
    plan = triton_lstm.plan_launch(_call(hidden_size=200, batch=40))
    assert plan.mode == "single" and plan.n_slices(200) == 1 and plan.n_bgroups == 3


# --- GPU -----------------------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture
def fp32_ieee():
    """float32 recurrences in IEEE float32 (cuDNN's and this backend's), not TF32, for tight bounds."""
    rnn = torch.backends.cudnn.rnn
    old = rnn.fp32_precision
    rnn.fp32_precision = "ieee"
    yield
    rnn.fp32_precision = old


def _gpu_case(T, B, D, H, lengths=None):
    return _op_inputs(T, B, D, H, lengths, device="cuda")


def _cudnn_run(xg, w_hh, h0, c0, cot, dtype):
    """The same recurrences through cuDNN: ``nn.LSTM``'s kernel with ``W_ih = I`` and no bias.

    Feeding ``xg`` through an identity input weight is exact in every dtype used here, so the
    difference to the reference is cuDNN's recurrence alone; gradients reach ``w_hh`` directly.
    """
    G = xg.shape[-1]
    eye = torch.eye(G, dtype=dtype, device=xg.device)

    def fn(x, w, h, c):
        ys, hs, cs = [], [], []
        for d in range(len(w)):
            hx = (h[d : d + 1].contiguous(), c[d : d + 1].contiguous())
            # train=True (dropout is 0): cuDNN has a backward only in training mode.
            y, hn, cn = torch._VF.lstm(x[:, :, d].contiguous(), hx, [eye, w[d]], False, 1, 0.0, True, False, False)
            ys.append(y)
            hs.append(hn[0])
            cs.append(cn[0])
        return torch.stack(ys, 2), torch.stack(hs), torch.stack(cs)

    return _forward_backward(fn, xg, w_hh, h0, c0, cot, dtype)


def _op(backend, lengths=None, reverse=(False, False)):
    return lambda x, w, h, c: lstm_recurrence(x, w, h, c, lengths=lengths, reverse=list(reverse), backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("T,B", [(45, 8), (45, 64), (100, 64), (100, 256)])
def test_gpu_persistent_matches_reference_and_cudnn(T, B, dtype):
    # float32 in TF32, ours and cuDNN's alike (PyTorch's default for cuDNN's RNNs): the persistent
    # mode refuses exact float32 (test_exact_fp32_is_refused_by_the_persistent_mode_not_spilled).
    D, H = 2, 512
    xg, w_hh, h0, c0, _, cot = _gpu_case(T, B, D, H)
    ours = _forward_backward(_op("triton"), xg, w_hh, h0, c0, cot, dtype)
    info = triton_lstm.last_persistent_launch()
    assert info["plan"].mode == "persistent" and info["grid"] <= info["capacity"]
    ref = _forward_backward(_op("reference"), xg, w_hh, h0, c0, cot, F64)
    try:
        cudnn = _cudnn_run(xg, w_hh, h0, c0, cot, dtype)
    except RuntimeError as e:  # a cuDNN without a bfloat16 LSTM; anything else is a failure
        if dtype != torch.bfloat16:
            raise
        pytest.skip(f"cuDNN cannot run this LSTM in {dtype}: {e}")
    _check_against_reference(ours, cudnn, ref, f"T={T} B={B} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("H", [48, 512], ids=["single-h48", "persistent-h512"])
def test_gpu_lengths_bidirectional(H, dtype, poisoned, fp32_ieee):
    T, B, D = 45, 24, 2
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    xg, w_hh, h0, c0, _, cot = _gpu_case(T, B, D, H)
    reverse = (False, True)
    if dtype == torch.float32 and H > triton_lstm.SINGLE_PROGRAM_MAX_HIDDEN:
        with pytest.raises(BackendUnavailableError, match="exact float32"):
            _forward_backward(_op("triton", lengths, reverse), xg, w_hh, h0, c0, cot, dtype)
        return
    ours = _forward_backward(_op("triton", lengths, reverse), xg, w_hh, h0, c0, cot, dtype)
    ref = _forward_backward(_op("reference", lengths, reverse), xg, w_hh, h0, c0, cot, F64)
    lp = _forward_backward(
        lambda x, w, h, c: loop_like_cudnn(x, w, h, c, lengths, list(reverse)), xg, w_hh, h0, c0, cot, dtype
    )
    _check_against_reference(ours, lp, ref, f"H={H} {dtype}")


@pytest.mark.gpu
def test_gpu_persistent_equals_stepped_launches_bitwise():
    """The grid barrier's correctness: one persistent launch equals one launch per step, same tiling."""
    T, B, D, H = 45, 64, 2, 512
    xg, w_hh, h0, c0, _, (gy, gh, gc) = _gpu_case(T, B, D, H)
    xg, h0, c0, gy, gh, gc = (t.bfloat16() for t in (xg, h0, c0, gy, gh, gc))
    w = [t.bfloat16() for t in w_hh]
    reverse = [False, True]
    out = triton_lstm.lstm_forward(xg, w, h0, c0, None, reverse)
    stepped = dataclasses.replace(triton_lstm.last_persistent_launch()["plan"], mode="stepped")
    out_s = triton_lstm.lstm_forward(xg, w, h0, c0, None, reverse, plan=stepped)
    for a, b in zip(out, out_s):
        assert torch.equal(a, b)
    grads = triton_lstm.lstm_backward(gy, gh, gc, w, h0, None, reverse, out[0], out[3])
    stepped = dataclasses.replace(triton_lstm.last_persistent_launch()["plan"], mode="stepped")
    grads_s = triton_lstm.lstm_backward(gy, gh, gc, w, h0, None, reverse, out[0], out[3], plan=stepped)
    for a, b in zip((grads[0], *grads[1], *grads[2:]), (grads_s[0], *grads_s[1], *grads_s[2:])):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_pipelined_loads_give_bitwise_the_same_results(monkeypatch):
    """FUSEDCONVLSTM_TRITON_LSTM_STAGES=2 (asynchronous copies that prefetch the next batch tile,
    a switch the GPU session times both ways) changes how rows reach the dots, not the arithmetic:
    the persistent forward and backward equal the default's bit for bit, at a batch of several
    tiles per batch group (where the prefetch acts)."""
    T, B, D, H = 45, 512, 2, 512
    xg, w_hh, h0, c0, lengths, cot = _gpu_case(T, B, D, H, torch.randint(1, 46, (B,)))
    op = _op("triton", lengths, (False, True))
    default = _forward_backward(op, xg, w_hh, h0, c0, cot, torch.bfloat16)
    monkeypatch.setenv(STAGES_ENV, "2")
    piped = _forward_backward(op, xg, w_hh, h0, c0, cot, torch.bfloat16)
    plan = triton_lstm.last_persistent_launch()["plan"]
    assert plan.mode == "persistent" and plan.rows_per_group > plan.block_b, plan
    for name in default:
        assert torch.equal(default[name], piped[name]), name


@pytest.mark.gpu
def test_gpu_deterministic():
    T, B, D, H = 45, 64, 2, 512
    xg, w_hh, h0, c0, lengths, cot = _gpu_case(T, B, D, H, torch.randint(1, 46, (64,)))
    op = _op("triton", lengths, (False, True))
    first = _forward_backward(op, xg, w_hh, h0, c0, cot, torch.bfloat16)
    second = _forward_backward(op, xg, w_hh, h0, c0, cot, torch.bfloat16)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.gpu
def test_gpu_final_state_only_matches_the_full_forward():
    """Without WRITE_Y (only the final state, no workspace) the persistent kernel's h_n, c_n
    equal the full forward's bit for bit."""
    T, B, D, H = 45, 64, 2, 512
    xg, w_hh, h0, c0, lengths, _ = _gpu_case(T, B, D, H, torch.randint(1, 46, (64,)))
    xg, h0, c0 = (t.bfloat16() for t in (xg, h0, c0))
    w = [t.bfloat16() for t in w_hh]
    full = triton_lstm.lstm_forward(xg, w, h0, c0, lengths, [False, True], save_for_backward=False)
    last = triton_lstm.lstm_forward(xg, w, h0, c0, lengths, [False, True], save_for_backward=False, write_y=False)
    assert triton_lstm.last_persistent_launch()["plan"].mode == "persistent"
    assert last[0].numel() == 0 and torch.equal(last[1], full[1]) and torch.equal(last[2], full[2])


@pytest.mark.gpu
def test_gpu_grid_is_co_resident():
    T, B, D, H = 10, 256, 2, 512
    xg, w_hh, h0, c0, _, _ = _gpu_case(T, B, D, H)
    triton_lstm.lstm_forward(xg.bfloat16(), [w.bfloat16() for w in w_hh], h0.bfloat16(), c0.bfloat16(), None, [0, 0])
    info = triton_lstm.last_persistent_launch()
    limits = persistent.device_limits(torch.cuda.current_device())
    per_sm = persistent.programs_per_sm(info["n_regs"], info["num_warps"], info["shared"], limits)
    # The calculator's count, or the driver's where that is smaller (co_resident_programs).
    sms = limits.multiprocessor_count
    assert per_sm >= 1 and sms <= info["capacity"] <= per_sm * sms and info["capacity"] % sms == 0
    plan = info["plan"]
    assert D * plan.n_slices(H) <= info["grid"] <= info["capacity"]
    assert plan.n_bgroups * plan.rows_per_group >= B
    assert info["n_spills"] == 0, f"the persistent kernel spills registers: {info}"


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    T, B, D, H = 45, 64, 2, 512
    xg, w_hh, h0, c0, _, (gy, gh, gc) = _gpu_case(T, B, D, H)
    xg, h0, c0, gy, gh, gc = (t.bfloat16() for t in (xg, h0, c0, gy, gh, gc))
    w = [t.bfloat16() for t in w_hh]
    reverse = [False, True]

    def step():
        y, h_n, c_n, ws = triton_lstm.lstm_forward(xg, w, h0, c0, None, reverse)
        g_xg, g_w, g_h0, g_c0 = triton_lstm.lstm_backward(gy, gh, gc, w, h0, None, reverse, y, ws)
        return y, h_n, c_n, g_xg, *g_w, g_h0, g_c0

    eager = step()  # also compiles the kernels, outside the capture
    graph, captured = capture_graph(step)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)
    xg.copy_(torch.randn_like(xg))  # new values in the captured buffer: the replay follows them
    graph.replay()
    fresh = step()
    for a, b in zip(fresh, captured):
        assert torch.equal(a, b)
