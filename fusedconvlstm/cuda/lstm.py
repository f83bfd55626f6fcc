"""``cuda`` backend of ``lstm_recurrence``: a cuBLAS GEMM and one fused pointwise kernel per step.

This is the simple, correct baseline: per step, ``hh = h_{t-1} W_hhᵀ`` for all recurrences is one
batched GEMM and ``lstm_cell_forward_`` (``csrc/lstm_cell.cu``) applies the gates, updates ``c``
and ``h`` in place and saves what the backward needs. The backward walks time back with
``lstm_cell_backward_`` and one GEMM per step for ``dh_{t-1}``; ``dW_hh`` is one batched GEMM
after the loop. The driver only calls ops, so on CPU tensors it runs the cell ops' CPU
implementations, which is how CI tests it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedconvlstm import backends
from fusedconvlstm.ops.lstm import OP, LSTMRecurrenceCall, recurrent_weight_grads
from fusedconvlstm.ops.lstm_cell import reverse_mask

_cell_forward = torch.ops.fusedconvlstm.lstm_cell_forward_
_cell_backward = torch.ops.fusedconvlstm.lstm_cell_backward_


def _why_not(call: LSTMRecurrenceCall) -> str | None:
    if call.proj_size:
        return "proj_size is not supported by the step-wise kernel (use backend='reference')"
    return None


def _workspace_shape(call: LSTMRecurrenceCall):
    acc = torch.float64 if call.dtype == torch.float64 else torch.float32
    return (call.seq_len, call.batch, call.num_recurrences, 5 * call.hidden_size), acc


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lengths_on(lengths: Tensor | None, device: torch.device) -> Tensor | None:
    return None if lengths is None else lengths.to(device=device, dtype=torch.int64, non_blocking=True)


def lstm_recurrence_stepwise_forward(xg, w_hh, w_hr, h0, c0, lengths, reverse):
    """Forward of the step-wise recurrence: ``(y, h_n, c_n, workspace)``."""
    T, B, D, G = xg.shape
    H = G // 4
    xg = xg.contiguous()
    w_t = torch.stack(w_hh).transpose(1, 2)  # (D, H, 4H): h @ W_hhᵀ as a batched GEMM
    h = h0.contiguous().clone()
    c = c0.to(_acc(xg.dtype)).contiguous().clone()
    y = xg.new_empty(T, B, D, H)
    workspace = xg.new_empty(T, B, D, 5 * H, dtype=_acc(xg.dtype))
    hh = xg.new_empty(D, B, G)
    lengths = _lengths_on(lengths, xg.device)
    mask = reverse_mask(reverse)
    for step in range(T):
        torch.bmm(h, w_t, out=hh)
        _cell_forward(hh, xg, h, c, y, workspace, lengths, step, mask)
    return y, h, c.to(xg.dtype), workspace


def lstm_recurrence_stepwise_backward(
    grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse, y, workspace
):
    """Backward of the step-wise recurrence: ``(grad_xg, grad_w_hh, [], grad_h0, grad_c0)``."""
    T, B, D, G = xg.shape
    acc = _acc(xg.dtype)
    w = torch.stack(w_hh)  # (D, 4H, H): dgates @ W_hh as a batched GEMM
    dh_rec = h0.new_zeros(h0.shape)
    dh_carry = grad_h_n.to(acc).contiguous().clone()
    dc = grad_c_n.to(acc).contiguous().clone()
    dgates = xg.new_empty(T, B, D, G)
    dgates_step = xg.new_empty(D, B, G)
    grad_y = grad_y.contiguous()
    lengths_dev = _lengths_on(lengths, xg.device)
    mask = reverse_mask(reverse)
    c0 = c0.contiguous()
    for step in range(T):
        _cell_backward(dh_rec, grad_y, workspace, c0, dh_carry, dc, dgates, dgates_step, lengths_dev, step, mask)
        torch.bmm(dgates_step, w, out=dh_rec)
    grad_h0 = (dh_rec.to(acc) + dh_carry).to(xg.dtype)
    grad_w_hh = recurrent_weight_grads(dgates, y, h0, lengths_dev, reverse)
    return dgates, grad_w_hh, [], grad_h0, dc.to(xg.dtype)


backends.register_implementation(
    OP,
    "cuda",
    why_not=_why_not,
    forward=lstm_recurrence_stepwise_forward,
    backward=lstm_recurrence_stepwise_backward,
    workspace_shape=_workspace_shape,
)
