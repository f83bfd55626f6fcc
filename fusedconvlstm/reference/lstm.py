"""Reference backend of ``lstm_recurrence``: a plain PyTorch loop over time, on any device.

Half-precision inputs are computed in float32 and the results rounded back, so the reference is
a ground truth rather than a second low-precision implementation. The backward differentiates
the same loop with autograd (recomputing the forward), so it is correct by construction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedconvlstm import backends
from fusedconvlstm.ops.lstm import OP, LSTMRecurrenceCall


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    acc = _acc_dtype(xg.dtype)
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


def _forward(xg, w_hh, w_hr, h0, c0, lengths, reverse):
    y, h_n, c_n = lstm_recurrence_reference(xg, w_hh, w_hr, h0, c0, lengths, reverse)
    return y, h_n, c_n, xg.new_empty(0)


def _workspace_shape(call: LSTMRecurrenceCall):
    return (0,), call.dtype


def _backward(grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse, y, workspace):
    inputs = [t.detach().requires_grad_() for t in (xg, h0, c0, *w_hh, *w_hr)]
    xg_, h0_, c0_, *weights = inputs
    D = len(w_hh)
    with torch.enable_grad():
        outs = lstm_recurrence_reference(xg_, weights[:D], weights[D:], h0_, c0_, lengths, reverse)
        grads = torch.autograd.grad(outs, inputs, (grad_y, grad_h_n, grad_c_n), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    g_xg, g_h0, g_c0, *g_w = grads
    return g_xg, g_w[:D], g_w[D:], g_h0, g_c0


backends.register_implementation(
    OP,
    "reference",
    why_not=lambda call: None,
    forward=_forward,
    backward=_backward,
    workspace_shape=_workspace_shape,
)
