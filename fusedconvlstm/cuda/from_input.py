"""The forward kernel that computes the input projection itself: each block keeps its units'
``W_ih`` rows resident beside ``W_hh`` and projects step ``t + 1``'s ``x`` while it waits at step
``t``'s barrier. Opt-in (``FUSEDCONVLSTM_LSTM_FWD_KERNEL=input``, unprojected LSTMs, through
:func:`fusedconvlstm.ops.lstm.lstm_layer`) until GPU measurements decide; keeping or deleting it
is this file, its kernel variant in ``csrc/`` and the registration's two functions."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedconvlstm.calls.lstm import LSTMRecurrenceCall
from fusedconvlstm.cuda import persistent_config, persistent_ops  # noqa: F401  (persistent_ops: the schemas)
from fusedconvlstm.cuda.constants import padded_reduction
from fusedconvlstm.cuda.persistent import run_forward
from fusedconvlstm.cuda.persistent_config import DeviceLimits, Layout, preferred_forward_kernel
from fusedconvlstm.cuda.planning import aligned_16, choose, persistent_limits, plan_or_raise
from fusedconvlstm.numerics.precision import accumulation_dtype

_from_input_forward = torch.ops.fusedconvlstm.lstm_persistent_forward_from_input_


def from_input_plan(call: LSTMRecurrenceCall, input_size: int, limits: DeviceLimits | None = None) -> Layout | str:
    """The configuration of the forward kernel that computes the input projection itself
    (kind ``FROM_INPUT``) for ``call`` with inputs of ``input_size`` features, or why it does not
    take the call (whether it is preferred aside: see :func:`from_input_why_not`)."""
    if call.proj_size:
        return "proj_size runs on the precomputed gates (its first step adds W_hh h0 to them)"
    lim = persistent_limits(call, limits)
    return lim if isinstance(lim, str) else choose(call, persistent_config.FROM_INPUT, lim, input_size)


def from_input_why_not(call: LSTMRecurrenceCall, input_size: int) -> str | None:
    """``None`` where ``lstm_layer`` hands the cuda backend the layer's input (the in-kernel
    projection is the preferred forward kernel, ``FUSEDCONVLSTM_LSTM_FWD_KERNEL=input``, and it
    takes the call), else why the projection runs as a GEMM before the recurrence."""
    if preferred_forward_kernel() != "input":
        return f"the preferred forward kernel is {preferred_forward_kernel()!r}, not 'input'"
    plan = from_input_plan(call, input_size)
    return plan if isinstance(plan, str) else None


def lstm_recurrence_from_input_forward(
    x: Tensor,
    w_ih: Tensor,
    bias: Tensor | None,
    w_hh,
    h0,
    c0,
    lengths,
    reverse,
    config: Layout | None = None,
    save_for_backward: bool = True,
    write_y: bool = True,
):
    """Forward of an unprojected layer on the kernel that computes ``x W_ihᵀ + bias`` itself:
    ``(y, h_n, c_n, workspace)``, the workspace that of :func:`lstm_recurrence_persistent_forward`.

    ``x (T, B, I)``; ``w_ih (D * 4H, I)`` and ``bias (D * 4H,)`` (or ``None``) as ``F.linear``
    takes them for the ``D`` recurrences' stacked gates. ``config`` overrides the chosen launch
    configuration (kind ``FROM_INPUT``); raises ``ValueError`` when the call does not fit the kernel.
    """
    T, B, n_in = x.shape
    D, G = len(w_hh), w_hh[0].shape[0]
    call = LSTMRecurrenceCall(T, B, D, G // 4, 0, x.dtype, x.device, lengths is not None, tuple(map(bool, reverse)))
    layout = plan_or_raise(
        call, persistent_config.FROM_INPUT, config, lambda c, limits=None: from_input_plan(c, n_in, limits)
    )
    kpx = padded_reduction(n_in, x.dtype.itemsize)
    x_pad = aligned_16(x if kpx == n_in else torch.nn.functional.pad(x, (0, kpx - n_in)))
    b32 = torch.zeros(D, G, dtype=accumulation_dtype(x.dtype), device=x.device)
    if bias is not None:
        b32 += bias.view(D, G)
    inputs = (x_pad, w_ih.reshape(D, G, n_in).contiguous(), b32)
    return run_forward(
        layout, _from_input_forward, x, (T, B), inputs, w_hh, h0, c0, lengths, reverse, save_for_backward, write_y
    )


def lstm_recurrence_cuda_forward_from_input(
    x, w_ih, bias, w_hh, h0, c0, lengths, reverse, save_for_backward: bool = True, write_y: bool = True
):
    """The cuda backend's forward of a layer from its input (where :func:`from_input_why_not` is
    ``None``): the in-kernel projection; the backward is the recurrence's, then ``F.linear``'s."""
    persistent_config.count_forward_kernel("input")
    saves = dict(save_for_backward=save_for_backward, write_y=write_y)
    return lstm_recurrence_from_input_forward(x, w_ih, bias, w_hh, h0, c0, lengths, reverse, **saves)
