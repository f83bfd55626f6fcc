"""The cooperative persistent kernels' drivers: one launch for all time steps forward (or the
cluster kernel where it is preferred and fits, :mod:`fusedconvlstm.cuda.cluster`), one for the
reverse-time sweep, and which configuration serves a call."""

from __future__ import annotations

import torch

from fusedconvlstm.calls.lstm import LSTMRecurrenceCall
from fusedconvlstm.cuda import cluster, persistent_config, persistent_ops  # noqa: F401  (persistent_ops: the schemas)
from fusedconvlstm.cuda.constants import SYNC_STRIDE, padded_reduction
from fusedconvlstm.cuda.persistent_config import DeviceLimits, Layout, preferred_forward_kernel
from fusedconvlstm.cuda.planning import (
    call_of,
    choose,
    lengths_on,
    persistent_limits,
    plan_or_raise,
    precise,
)
from fusedconvlstm.numerics.precision import accumulation_dtype
from fusedconvlstm.numerics.recurrence import recurrent_weight_grads, reverse_mask

_persistent_forward = torch.ops.fusedconvlstm.lstm_persistent_forward_

_persistent_backward = torch.ops.fusedconvlstm.lstm_persistent_backward_


def persistent_plan(call: LSTMRecurrenceCall, kind: str, limits: DeviceLimits | None = None) -> Layout | str:
    """The persistent kernel's launch configuration for ``call`` (``kind`` ``"forward"`` or
    ``"backward"``), or why the persistent kernel does not take it. ``limits`` defaults to those
    of ``call.device``. For the forward, the cluster kernel's configuration where it is the
    preferred kernel (:func:`preferred_forward_kernel`) and fits, else the cooperative kernel's."""
    lim = persistent_limits(call, limits)
    if isinstance(lim, str):
        return lim
    if kind == "forward" and preferred_forward_kernel() == "cluster":
        plan = cluster.cluster_plan(call, lim)
        if isinstance(plan, Layout):
            return plan
    return choose(call, kind, lim)


def persistent_why_not(
    call: LSTMRecurrenceCall, kind: str = "forward", limits: DeviceLimits | None = None
) -> str | None:
    """``None`` if the persistent ``kind`` kernel serves ``call``, else the reason it does not."""
    plan = persistent_plan(call, kind, limits)
    return plan if isinstance(plan, str) else None


def kernel_name(plan: Layout | str) -> str:
    """The forward kernel a plan runs: ``"cluster"``, ``"cooperative"`` or (a refusal) ``"stepwise"``."""
    if isinstance(plan, str):
        return "stepwise"
    return "cluster" if plan.kind == persistent_config.CLUSTER else "cooperative"


def forward_kernel_name(call: LSTMRecurrenceCall, limits: DeviceLimits | None = None) -> str:
    """Which forward kernel serves ``call``: ``"cluster"``, ``"cooperative"`` or ``"stepwise"``."""
    return kernel_name(persistent_plan(call, "forward", limits))


def lstm_recurrence_persistent_forward(
    xg,
    w_hh,
    w_hr,
    h0,
    c0,
    lengths,
    reverse,
    config: Layout | None = None,
    save_for_backward: bool = True,
    write_y: bool = True,
):
    """Forward on the persistent kernel: ``(y, h_n, c_n, workspace)``.

    ``config`` (a :class:`~fusedconvlstm.cuda.persistent_config.Layout`) overrides the chosen
    launch configuration; raises ``ValueError`` when the call does not fit the kernel. Without
    ``write_y`` (only the final state is wanted) ``y`` is empty and the kernel stores none.
    """
    layout = plan_or_raise(call_of(xg, w_hr, lengths, reverse), "forward", config, _planner("forward"))
    inputs = (xg.contiguous(),)
    return run_forward(
        layout,
        _persistent_forward,
        xg,
        xg.shape[:2],
        inputs,
        w_hh,
        h0,
        c0,
        lengths,
        reverse,
        save_for_backward,
        write_y,
    )


def run_forward(layout, op, like, tb, inputs, w_hh, h0, c0, lengths, reverse, save_for_backward, write_y):
    """The persistent forward ``op`` (the cluster kernel's where ``layout`` is one) on its
    sequence ``inputs`` (``(xg,)``, or ``(x, w_ih, bias)`` for the in-kernel projection): the
    state buffers around it, ``(y, h_n, c_n, workspace)``."""
    (T, B), D, H = tb, len(w_hh), w_hh[0].shape[1]
    acc = accumulation_dtype(like.dtype)
    h_buf = like.new_zeros(2, D, B, padded_reduction(H, like.dtype.itemsize))
    h_buf[0, :, :, :H] = h0
    c = c0.to(acc, copy=True).contiguous()
    y = like.new_empty((T, B, D, H) if write_y else (0,))
    workspace = like.new_empty((T, B, D, 5 * H) if save_for_backward else (0,), dtype=acc)
    common = (torch.stack(w_hh).contiguous(), lengths_on(lengths, like.device), reverse_mask(reverse))
    if layout.kind == persistent_config.CLUSTER:  # the hardware cluster barrier: no counters
        cluster.cluster_forward_op(*inputs, *common, *layout.args, precise(like.dtype), h_buf, c, y, workspace)
    else:
        sync = torch.empty(D * layout.nbg * SYNC_STRIDE, dtype=torch.int32, device=like.device)
        op(*inputs, *common, *layout.args, precise(like.dtype), h_buf, c, y, workspace, sync)
    return y, h_buf[T % 2, :, :, :H].contiguous(), c.to(like.dtype), workspace


def lstm_recurrence_persistent_backward(
    grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse, y, workspace, config: Layout | None = None
):
    """Backward on the persistent kernel: ``(grad_xg, grad_w_hh, [], grad_h0, grad_c0)``.

    The reverse-time sweep is one launch; ``dW_hh`` is one batched GEMM after it.
    """
    T, B, D, G = xg.shape
    layout = plan_or_raise(call_of(xg, w_hr, lengths, reverse), "backward", config, _planner("backward"))
    acc = accumulation_dtype(xg.dtype)
    dh_carry = grad_h_n.to(acc, copy=True).contiguous()
    dc = grad_c_n.to(acc, copy=True).contiguous()
    dgates = xg.new_empty(T, B, D, G)
    g_buf = xg.new_zeros(2, D, B, padded_reduction(G, xg.dtype.itemsize))
    sync = torch.empty(D * layout.nbg * SYNC_STRIDE, dtype=torch.int32, device=xg.device)
    lengths_dev = lengths_on(lengths, xg.device)
    _persistent_backward(
        grad_y.contiguous(),
        workspace.contiguous(),
        c0.to(acc).contiguous(),
        torch.stack(w_hh).contiguous(),
        lengths_dev,
        reverse_mask(reverse),
        *layout.args,
        precise(xg.dtype),
        dh_carry,
        dc,
        dgates,
        g_buf,
        sync,
    )
    grad_w_hh = recurrent_weight_grads(dgates, y, h0, lengths_dev, reverse)
    return dgates, grad_w_hh, [], dh_carry.to(xg.dtype), dc.to(xg.dtype)


def _planner(kind: str):
    return lambda call, limits=None: persistent_plan(call, kind, limits)
