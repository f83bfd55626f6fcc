"""``cuda`` backend of ``lstm_recurrence``: the persistent kernels, and the step-wise path beside them.

Both run the same cell math with the same workspace (``[i, f, g, o, c]`` per step in float32,
:mod:`fusedconvlstm.cuda.cell_ops`), so a forward of one and a backward of the other combine:

- **persistent** (``csrc/lstm_persistent_*.cu``, :mod:`fusedconvlstm.cuda.persistent_ops`): one
  launch runs all ``T`` steps of all ``D`` recurrences, the recurrent weights resident in shared
  memory, one barrier per step; one more launch runs the reverse-time sweep. Three forward
  kernels: cooperative (the default), cluster (sm_90, ``h`` exchanged in distributed shared
  memory) and one that computes the input projection itself (for :func:`fusedconvlstm.ops.lstm.lstm_layer`);
  ``FUSEDCONVLSTM_LSTM_FWD_KERNEL`` picks the first choice until GPU measurements decide.
- **step-wise** (``csrc/lstm_cell.cu``): per step a cuBLAS GEMM and one fused pointwise kernel,
  for what the persistent kernels do not take (float64, sizes that do not fit the device).

16-bit data runs on tensor cores with fp32 accumulation; float32 runs TF32 where PyTorch lets
cuDNN's LSTM do so, 3xTF32 otherwise. ``proj_size`` runs unprojected on ``W_hh W_hr``
(:mod:`fusedconvlstm.numerics.projection`). ``backends.explain(..., detail=True)`` says which
kernel serves a call. The driver only calls ops, so on CPU tensors it runs their CPU
implementations, which is how it is tested without a GPU. docs/design.md §2 has the kernels'
decomposition.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedconvlstm import backends
from fusedconvlstm.calls.lstm import OP, LSTMRecurrenceCall
from fusedconvlstm.cuda import cell_ops, persistent_config, persistent_ops  # noqa: F401  (the kernel ops' schemas)
from fusedconvlstm.cuda.cluster import cluster_plan
from fusedconvlstm.cuda.from_input import from_input_why_not, lstm_recurrence_cuda_forward_from_input
from fusedconvlstm.cuda.persistent import (
    kernel_name,
    lstm_recurrence_persistent_backward,
    lstm_recurrence_persistent_forward,
    persistent_plan,
)
from fusedconvlstm.cuda.persistent_config import DeviceLimits, preferred_forward_kernel
from fusedconvlstm.cuda.planning import call_of, lengths_on, precise, require_unprojected
from fusedconvlstm.numerics.precision import accumulation_dtype, product_unrounded
from fusedconvlstm.numerics.projection import with_projection
from fusedconvlstm.numerics.recurrence import recurrent_weight_grads, reverse_mask

_cell_forward = torch.ops.fusedconvlstm.lstm_cell_forward_

_cell_backward = torch.ops.fusedconvlstm.lstm_cell_backward_


def _why_not(call: LSTMRecurrenceCall) -> str | None:
    return None  # the device and the extension are checked by the registry; both paths take any size


def _workspace_shape(call: LSTMRecurrenceCall):
    acc = accumulation_dtype(call.dtype)
    return (call.seq_len, call.batch, call.num_recurrences, 5 * call.hidden_size), acc


def describe(call: LSTMRecurrenceCall, limits: DeviceLimits | None = None) -> str:
    """Which kernels the cuda backend runs for ``call``, forward and backward (for ``explain``)."""
    parts = []
    for kind in persistent_config.KINDS:
        plan = persistent_plan(call, kind, limits)
        if isinstance(plan, str):
            parts.append(f"{kind}: step-wise kernels (cuBLAS GEMM + fused cell kernel per step), because {plan}")
            continue
        precision = ""
        if call.dtype == torch.float32:
            precision = ", 3xTF32" if precise(call.dtype) else ", TF32"
        name = "cluster kernel" if plan.kind == persistent_config.CLUSTER else "persistent kernel"
        text = f"{kind}: {name}{precision}, {plan.describe()}"
        if kind == "forward" and plan.kind != persistent_config.CLUSTER and preferred_forward_kernel() == "cluster":
            text += f" (the preferred cluster kernel does not take it: {cluster_plan(call, limits)})"
        parts.append(text)
    if call.proj_size:
        parts.append(f"proj_size {call.proj_size}: the recurrence on W_hh W_hr, the projection one GEMM after it")
    return "; ".join(parts)


def lstm_recurrence_stepwise_forward(
    xg, w_hh, w_hr, h0, c0, lengths, reverse, save_for_backward: bool = True, write_y: bool = True
):
    """Forward of the step-wise recurrence: ``(y, h_n, c_n, workspace)`` (``y`` empty without
    ``write_y``)."""
    require_unprojected(len(w_hr))
    T, B, D, G = xg.shape
    H = G // 4
    xg = xg.contiguous()
    w_t = torch.stack(w_hh).transpose(1, 2)  # (D, H, 4H): h @ W_hhᵀ as a batched GEMM
    h = h0.contiguous().clone()
    c = c0.to(accumulation_dtype(xg.dtype)).contiguous().clone()
    y = xg.new_empty((T, B, D, H) if write_y else (0,))
    workspace = xg.new_empty((T, B, D, 5 * H) if save_for_backward else (0,), dtype=accumulation_dtype(xg.dtype))
    hh = xg.new_empty(D, B, G, dtype=accumulation_dtype(xg.dtype))
    lengths = lengths_on(lengths, xg.device)
    mask = reverse_mask(reverse)
    for step in range(T):
        product_unrounded(h, w_t, hh.dtype, out=hh)  # h W_hhᵀ unrounded, as the persistent kernels
        _cell_forward(hh, xg, h, c, y, workspace, lengths, step, mask)
    return y, h, c.to(xg.dtype), workspace


def lstm_recurrence_stepwise_backward(
    grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse, y, workspace
):
    """Backward of the step-wise recurrence: ``(grad_xg, grad_w_hh, [], grad_h0, grad_c0)``."""
    require_unprojected(len(w_hr))
    T, B, D, G = xg.shape
    acc = accumulation_dtype(xg.dtype)
    w = torch.stack(w_hh)  # (D, 4H, H): dgates @ W_hh as a batched GEMM
    dh_rec = h0.new_zeros(h0.shape, dtype=acc)
    dh_carry = grad_h_n.to(acc).contiguous().clone()
    dc = grad_c_n.to(acc).contiguous().clone()
    dgates = xg.new_empty(T, B, D, G)
    dgates_step = xg.new_empty(D, B, G)
    grad_y = grad_y.contiguous()
    lengths_dev = lengths_on(lengths, xg.device)
    mask = reverse_mask(reverse)
    c0 = c0.contiguous()
    for step in range(T):
        _cell_backward(dh_rec, grad_y, workspace, c0, dh_carry, dc, dgates, dgates_step, lengths_dev, step, mask)
        product_unrounded(dgates_step, w, dh_rec.dtype, out=dh_rec)
    grad_h0 = (dh_rec + dh_carry).to(xg.dtype)
    grad_w_hh = recurrent_weight_grads(dgates, y, h0, lengths_dev, reverse)
    return dgates, grad_w_hh, [], grad_h0, dc.to(xg.dtype)


def lstm_recurrence_cuda_forward(
    xg, w_hh, w_hr, h0, c0, lengths, reverse, save_for_backward: bool = True, write_y: bool = True
):
    """The cuda backend's forward: persistent where it applies, else step-wise."""
    call = call_of(xg, w_hr, lengths, reverse)
    plan = persistent_plan(call, "forward")
    persistent_config.count_forward_kernel(kernel_name(plan))
    saves = dict(save_for_backward=save_for_backward, write_y=write_y)
    if isinstance(plan, str):
        return lstm_recurrence_stepwise_forward(xg, w_hh, w_hr, h0, c0, lengths, reverse, **saves)
    return lstm_recurrence_persistent_forward(xg, w_hh, w_hr, h0, c0, lengths, reverse, config=plan, **saves)


def lstm_recurrence_cuda_backward(grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse, y, workspace):
    """The cuda backend's backward: persistent where it applies, else step-wise."""
    args = (grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse, y, workspace)
    plan = persistent_plan(call_of(xg, w_hr, lengths, reverse), "backward")
    if isinstance(plan, str):
        return lstm_recurrence_stepwise_backward(*args)
    return lstm_recurrence_persistent_backward(*args, config=plan)


def cell_outputs(workspace: Tensor) -> Tensor:
    """``o tanh(c)`` of every step from the workspace ``[i, f, g, o, c]`` (for ``proj_size``)."""
    H = workspace.shape[-1] // 5
    return workspace[..., 3 * H : 4 * H] * torch.tanh(workspace[..., 4 * H :])


_forward, _backward = with_projection(lstm_recurrence_cuda_forward, lstm_recurrence_cuda_backward, cell_outputs)


backends.register_implementation(
    OP,
    "cuda",
    why_not=_why_not,
    forward=_forward,
    backward=_backward,
    workspace_shape=_workspace_shape,
    describe=describe,
    forward_from_input=lstm_recurrence_cuda_forward_from_input,
    from_input_why_not=from_input_why_not,
)
