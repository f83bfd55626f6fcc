"""Helpers shared by the tests of the ``cuda`` LSTM backend (``test_cuda_lstm_*.py``): a call's
description, random op inputs, the float64 reference with its gradients, and the argument lists
of the persistent and cluster ops (on the CPU or on a GPU)."""

from __future__ import annotations

import shutil

import torch

from fusedconvlstm.calls.lstm import LSTMRecurrenceCall
from fusedconvlstm.cuda import lstm as cuda_lstm
from fusedconvlstm.cuda import persistent_config as pc
from fusedconvlstm.cuda.constants import SYNC_STRIDE, padded_reduction
from fusedconvlstm.numerics.recurrence import reverse_mask
from fusedconvlstm.passmark import rel_err
from fusedconvlstm.reference.lstm import lstm_recurrence_reference
from tests.helpers import lstm_weights

CAN_BUILD = shutil.which("nvcc") is not None and torch.version.cuda is not None
F64 = torch.float64
HALF_DTYPES = (torch.float16, torch.bfloat16)


def recurrence_call(T=5, B=3, D=1, H=8, P=0, dtype=torch.float32, device="cpu", lengths=False, reverse=None):
    """The description of a recurrence call the dispatch decides on (small sizes by default)."""
    return LSTMRecurrenceCall(
        seq_len=T,
        batch=B,
        num_recurrences=D,
        hidden_size=H,
        proj_size=P,
        dtype=dtype,
        device=torch.device(device),
        has_lengths=lengths,
        reverse=tuple(reverse or [False] * D),
    )


def op_inputs(T, B, D, H, dtype=F64, device="cpu", lengths=None, seed=0):
    """Random ``(xg, w_hh, h0, c0, lengths)`` of the recurrence op, drawn in float64 and rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    xg = torch.randn(T, B, D, 4 * H, dtype=F64, generator=g).to(dtype=dtype, device=device)
    w = [w.to(dtype=dtype, device=device) for w in lstm_weights(D, H, dtype=F64)]
    h0 = (0.5 * torch.randn(D, B, H, dtype=F64, generator=g)).to(dtype=dtype, device=device)
    c0 = (0.5 * torch.randn(D, B, H, dtype=F64, generator=g)).to(dtype=dtype, device=device)
    return xg, w, h0, c0, lengths


def reference_forward_backward(xg, w, h0, c0, lengths, reverse, gy, ghn, gcn):
    """float64 outputs and gradients of the recurrence, by autograd through the reference loop."""
    ins = [t.detach().double().cpu().requires_grad_() for t in (xg, h0, c0, *w)]
    lens = None if lengths is None else lengths.cpu()
    y, hn, cn = lstm_recurrence_reference(ins[0], ins[3:], [], ins[1], ins[2], lens, reverse)
    grads = torch.autograd.grad((y, hn, cn), ins, (gy.double().cpu(), ghn.double().cpu(), gcn.double().cpu()))
    g_xg, g_h0, g_c0, *g_w = grads
    return (y, hn, cn), (g_xg, g_w, g_h0, g_c0)


def persistent_forward_args(T, B, D, H, dtype=F64, lengths=None, reverse=(False, True), device="cpu"):
    xg, w, h0, c0, _ = op_inputs(T, B, D, H, dtype, device)
    acc = F64 if dtype == F64 else torch.float32
    layout = pc.make_layout("forward", 1, 1, 1, 8, 1, B, D, H, torch.float32 if dtype == F64 else dtype)
    h_buf = torch.zeros(2, D, B, padded_reduction(H, dtype.itemsize), dtype=dtype, device=device)
    h_buf[0, :, :, :H] = h0
    return (
        xg,
        torch.stack(w),
        lengths,
        reverse_mask(list(reverse)),
        *layout.args,
        False,
        h_buf,
        c0.to(acc).clone(),
        torch.empty(T, B, D, H, dtype=dtype, device=device),
        torch.empty(T, B, D, 5 * H, dtype=acc, device=device),
        torch.empty(D * layout.nbg * SYNC_STRIDE, dtype=torch.int32, device=device),
    )


def cluster_forward_args(fwd_args, config=(1, 1, 1, 8)):
    """Cluster-op arguments from persistent-forward-op arguments (fresh outputs, same inputs)."""
    xg, w_hh, lengths, mask, *_, h_buf, c, y, ws, _sync = fwd_args
    return (
        xg,
        w_hh,
        lengths,
        mask,
        *config,
        False,
        h_buf.clone(),
        c.clone(),
        torch.empty_like(y),
        torch.empty_like(ws),
    )


def persistent_backward_args(fwd_args, lengths=None):
    """Backward-op arguments matching forward-op arguments ``fwd_args`` (after the forward ran)."""
    xg, w_hh, _, mask, *_ = fwd_args
    T, B, D, G = xg.shape
    H, dtype, dev = G // 4, xg.dtype, xg.device
    acc = F64 if dtype == F64 else torch.float32
    layout = pc.make_layout("backward", 1, 1, 1, 8, 1, B, D, H, torch.float32 if dtype == F64 else dtype)
    return (
        torch.randn(T, B, D, H, dtype=F64).to(dtype=dtype, device=dev),
        fwd_args[13],
        torch.randn(D, B, H, dtype=acc, device=dev),
        w_hh,
        lengths,
        mask,
        *layout.args,
        False,
        torch.randn(D, B, H, dtype=acc, device=dev),
        torch.randn(D, B, H, dtype=acc, device=dev),
        torch.empty(T, B, D, G, dtype=dtype, device=dev),
        torch.zeros(2, D, B, padded_reduction(G, dtype.itemsize), dtype=dtype, device=dev),
        torch.empty(D * layout.nbg * SYNC_STRIDE, dtype=torch.int32, device=dev),
    )


def check_persistent_and_stepwise_combine(shape, lengths, dtype, device, forward_tol, backward_tol) -> None:
    """The persistent and step-wise paths share one workspace: each backward, given the other
    forward's outputs and workspace, gives the other's gradients, and the forwards agree (within
    the tolerances). ``shape`` is ``(T, B, D, H)``; recurrence 1 runs reversed."""
    T, B, D, H = shape
    xg, w, h0, c0, _ = op_inputs(T, B, D, H, dtype, device)
    rev = [False, True]
    p = cuda_lstm.lstm_recurrence_persistent_forward(xg, w, [], h0, c0, lengths, rev)
    s = cuda_lstm.lstm_recurrence_stepwise_forward(xg, w, [], h0, c0, lengths, rev)
    assert rel_err(p[3], s[3], strict=True) < forward_tol and rel_err(p[0], s[0], strict=True) < forward_tol
    grads = [torch.randn_like(t) for t in p[:3]]
    gp = cuda_lstm.lstm_recurrence_persistent_backward(*grads, xg, w, [], h0, c0, lengths, rev, s[0], s[3])
    gs = cuda_lstm.lstm_recurrence_stepwise_backward(*grads, xg, w, [], h0, c0, lengths, rev, p[0], p[3])
    for a, b in zip((gp[0], *gp[1], gp[3], gp[4]), (gs[0], *gs[1], gs[3], gs[4])):
        assert rel_err(a, b, strict=True) < backward_tol
