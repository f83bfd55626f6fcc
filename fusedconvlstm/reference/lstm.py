"""Reference backend of ``lstm_recurrence``: a plain PyTorch loop over time, on any device.

Half-precision inputs are computed in float32 and the results rounded back, so the reference is
a ground truth rather than a second low-precision implementation. The backward is
backpropagation through time written out in plain PyTorch; the tests hold it equal to autograd
through ``lstm_recurrence_reference`` and to ``torch.nn.LSTM``'s gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedconvlstm import backends
from fusedconvlstm.calls.lstm import OP, LSTMRecurrenceCall
from fusedconvlstm.numerics.precision import accumulation_dtype


def lstm_recurrence_reference(
    xg: Tensor,
    w_hh: list[Tensor],
    w_hr: list[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Tensor | None,
    reverse: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, h_n, c_n)`` of the recurrences, differentiable with autograd, in ``xg.dtype``."""
    T, B, D, G = xg.shape
    acc = accumulation_dtype(xg.dtype)
    valid_steps = None
    if lengths is not None:
        valid_steps = torch.arange(T, device=xg.device).unsqueeze(1) < lengths.to(xg.device).unsqueeze(0)  # (T, B)
    ys, hs, cs = [], [], []
    for d in range(D):
        h, c = h0[d].to(acc), c0[d].to(acc)
        w = w_hh[d].to(acc)
        w_proj = w_hr[d].to(acc) if w_hr else None
        out: list[Tensor | None] = [None] * T
        for t in reversed(range(T)) if reverse[d] else range(T):
            gates = xg[t, :, d].to(acc) + h @ w.t()
            i, f, g, o = gates.chunk(4, dim=-1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            if w_proj is not None:
                h_new = h_new @ w_proj.t()
            if valid_steps is None:
                h, c, out[t] = h_new, c_new, h_new
            else:
                m = valid_steps[t].unsqueeze(1)
                h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
                out[t] = torch.where(m, h_new, 0)
        ys.append(torch.stack(out))
        hs.append(h)
        cs.append(c)
    y = torch.stack(ys, dim=2).to(xg.dtype)
    return y, torch.stack(hs).to(xg.dtype), torch.stack(cs).to(xg.dtype)


def _forward(xg, w_hh, w_hr, h0, c0, lengths, reverse, save_for_backward=True, write_y=True):
    y, h_n, c_n = lstm_recurrence_reference(xg, w_hh, w_hr, h0, c0, lengths, reverse)
    return (y if write_y else xg.new_empty(0)), h_n, c_n, xg.new_empty(0)


def _workspace_shape(call: LSTMRecurrenceCall):
    return (0,), call.dtype


def _backward(grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse, y, workspace):
    return lstm_recurrence_reference_backward(grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse)


def lstm_recurrence_reference_backward(
    grad_y: Tensor,
    grad_h_n: Tensor,
    grad_c_n: Tensor,
    xg: Tensor,
    w_hh: list[Tensor],
    w_hr: list[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Tensor | None,
    reverse: list[bool],
) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor, Tensor]:
    """Backpropagation through time written out in plain PyTorch (no autograd).

    Op implementations run below the autograd dispatch key, so the reference backward cannot
    differentiate the forward with autograd; this is the textbook BPTT instead, recomputing the
    forward's activations. Returns ``(grad_xg, grad_w_hh, grad_w_hr, grad_h0, grad_c0)``.
    """
    T, B, D, G = xg.shape
    acc = accumulation_dtype(xg.dtype)
    valid_steps = None
    if lengths is not None:
        valid_steps = torch.arange(T, device=xg.device).unsqueeze(1) < lengths.to(xg.device).unsqueeze(0)
    grad_xg = torch.zeros(T, B, D, G, dtype=acc, device=xg.device)
    g_w_hh, g_w_hr, g_h0, g_c0 = [], [], [], []
    for d in range(D):
        w = w_hh[d].to(acc)
        w_proj = w_hr[d].to(acc) if w_hr else None
        order = list(reversed(range(T))) if reverse[d] else list(range(T))
        # Forward again, keeping what the backward needs at each step.
        h, c = h0[d].to(acc), c0[d].to(acc)
        saved = []
        for t in order:
            pre = xg[t, :, d].to(acc) + h @ w.t()
            i, f, g, o = pre.chunk(4, dim=-1)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            c_new = f * c + i * g
            m = o * torch.tanh(c_new)
            h_new = m @ w_proj.t() if w_proj is not None else m
            saved.append((t, h, c, i, f, g, o, c_new, m))
            valid = None if valid_steps is None else valid_steps[t].unsqueeze(1)
            h = h_new if valid is None else torch.where(valid, h_new, h)
            c = c_new if valid is None else torch.where(valid, c_new, c)
        # Backward in the opposite order. dh, dc: gradients w.r.t. the state after the step.
        dh, dc = grad_h_n[d].to(acc), grad_c_n[d].to(acc)
        dw = torch.zeros_like(w)
        dw_proj = torch.zeros_like(w_proj) if w_proj is not None else None
        for t, h_prev, c_prev, i, f, g, o, c_t, m in reversed(saved):
            valid = None if valid_steps is None else valid_steps[t].unsqueeze(1)
            dh_t = dh + grad_y[t, :, d].to(acc)
            if valid is not None:
                dh_t = torch.where(valid, dh_t, 0)
            if w_proj is not None:
                dw_proj += dh_t.t() @ m
                dm = dh_t @ w_proj
            else:
                dm = dh_t
            tc = torch.tanh(c_t)
            dc_t = (dc if valid is None else torch.where(valid, dc, 0)) + dm * o * (1 - tc * tc)
            d_pre = torch.cat(
                [dc_t * g * i * (1 - i), dc_t * c_prev * f * (1 - f), dc_t * i * (1 - g * g), dm * tc * o * (1 - o)],
                dim=-1,
            )
            grad_xg[t, :, d] = d_pre
            dw += d_pre.t() @ h_prev
            dh_prev, dc_prev = d_pre @ w, dc_t * f
            if valid is None:
                dh, dc = dh_prev, dc_prev
            else:  # a masked step passes the state, and so its gradient, through
                dh, dc = torch.where(valid, dh_prev, dh), torch.where(valid, dc_prev, dc)
        g_w_hh.append(dw.to(xg.dtype))
        if dw_proj is not None:
            g_w_hr.append(dw_proj.to(xg.dtype))
        g_h0.append(dh)
        g_c0.append(dc)
    return (
        grad_xg.to(xg.dtype),
        g_w_hh,
        g_w_hr,
        torch.stack(g_h0).to(xg.dtype),
        torch.stack(g_c0).to(xg.dtype),
    )


backends.register_implementation(
    OP,
    "reference",
    why_not=lambda call: None,
    forward=_forward,
    backward=_backward,
    workspace_shape=_workspace_shape,
)
