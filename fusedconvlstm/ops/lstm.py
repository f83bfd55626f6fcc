"""The LSTM recurrence op: schema, argument checks, fake implementation and autograd.

``fusedconvlstm::lstm_recurrence`` runs ``D`` independent LSTM recurrences over the same time
axis, each given its gate pre-activations ``xg`` (the input projection ``x W_ihᵀ + b_ih + b_hh``,
computed outside the recurrence as one GEMM) and its recurrent weights. ``D`` covers both
directions of a bidirectional layer (``reverse=[False, True]``) and several LSTMs reading one
input (``reverse=[False, False]``, the reference model's pair).

Layouts (time-major, torch gate order i, f, g, o):

====================  =======================  ==========================================
argument              shape                    notes
====================  =======================  ==========================================
``xg``                ``(T, B, D, 4H)``        pre-activations, biases included
``w_hh[d]``           ``(4H, P)``              ``P = H``, or ``proj_size`` with ``w_hr``
``w_hr[d]``           ``(P, H)``               empty list without projection
``h0``, ``c0``        ``(D, B, P)``, ``(D, B, H)``
``lengths``           ``(B,)`` integer          steps ``t >= lengths[b]`` leave the state
                                               unchanged and output zeros
output ``y``          ``(T, B, D, P)``         ``y.view(T, B, D * P)`` is ``nn.LSTM``'s; empty
                                               with ``write_y=False`` and nothing saved for a
                                               backward (only the final state is wanted: the
                                               kernels then store no per-step output)
``h_n``, ``c_n``      like ``h0``, ``c0``
``workspace``         backend-defined          saved for the backward; empty with
                                               ``save_for_backward=False`` (the wrapper
                                               passes that when no gradient is needed)
====================  =======================  ==========================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fusedconvlstm import backends
from fusedconvlstm.calls.lstm import (
    OP,
    LSTMRecurrenceBackend,
    LSTMRecurrenceCall,
    check_lstm_recurrence_args,
    thaw_call,
)
from fusedconvlstm.numerics.precision import no_autocast
from fusedconvlstm.ops._autograd import register_autograd

backends.register_op(
    OP,
    auto_order=("cuda", "triton"),
    features=LSTMRecurrenceCall.features,
    thaw=thaw_call,
    interface=LSTMRecurrenceBackend,
)


def _resolve(backend: str, call: LSTMRecurrenceCall) -> backends.Implementation:
    return backends.resolve(OP, backend, call, call.device)


@torch.library.custom_op("fusedconvlstm::lstm_recurrence", mutates_args=())
def _lstm_recurrence_op(
    xg: Tensor,
    w_hh: Sequence[Tensor],
    w_hr: Sequence[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Tensor | None,
    reverse: Sequence[bool],
    backend: str,
    save_for_backward: bool = True,
    write_y: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    call = check_lstm_recurrence_args(xg, w_hh, w_hr, h0, c0, lengths, reverse, save_for_backward)
    impl = _resolve(backend, call)
    with no_autocast(xg):
        return impl.forward(
            xg,
            list(w_hh),
            list(w_hr),
            h0,
            c0,
            lengths,
            list(reverse),
            save_for_backward=call.save_for_backward,
            write_y=_writes_y(call, write_y),
        )


def _writes_y(call: LSTMRecurrenceCall, write_y: bool) -> bool:
    """Whether the forward stores ``y``: when asked for, and always when a backward will read it."""
    return bool(write_y) or call.save_for_backward


def _workspace_shape(impl: backends.Implementation, call: LSTMRecurrenceCall):
    """The backend's workspace, or an empty one when the forward saves nothing."""
    shape, dtype = impl.workspace_shape(call)
    return (shape if call.save_for_backward else (0,)), dtype


def _fake_outputs(backend: str, call: LSTMRecurrenceCall, like: Tensor, h0: Tensor, c0: Tensor, write_y: bool):
    """``(y, h_n, c_n, workspace)`` of the recurrence ops' fake implementations."""
    impl = _resolve(backend, call)
    T, B, D, P = call.seq_len, call.batch, call.num_recurrences, h0.shape[2]
    ws_shape, ws_dtype = _workspace_shape(impl, call)
    return (
        like.new_empty((T, B, D, P) if _writes_y(call, write_y) else (0,)),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        like.new_empty(ws_shape, dtype=ws_dtype),
    )


@_lstm_recurrence_op.register_fake
def _(xg, w_hh, w_hr, h0, c0, lengths, reverse, backend, save_for_backward=True, write_y=True):
    call = check_lstm_recurrence_args(xg, w_hh, w_hr, h0, c0, lengths, reverse, save_for_backward)
    return _fake_outputs(backend, call, xg, h0, c0, write_y)


@torch.library.custom_op("fusedconvlstm::lstm_recurrence_backward", mutates_args=())
def _lstm_recurrence_backward_op(
    grad_y: Tensor,
    grad_h_n: Tensor,
    grad_c_n: Tensor,
    xg: Tensor,
    w_hh: Sequence[Tensor],
    w_hr: Sequence[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Tensor | None,
    reverse: Sequence[bool],
    y: Tensor,
    workspace: Tensor,
    backend: str,
) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor, Tensor]:
    call = check_lstm_recurrence_args(xg, w_hh, w_hr, h0, c0, lengths, reverse)
    impl = _resolve(backend, call)
    with no_autocast(xg):
        no_workspace = workspace.numel() == 0 and math.prod(impl.workspace_shape(call)[0]) > 0
        no_y = y.numel() == 0 and call.seq_len * call.batch > 0
        if no_workspace or no_y:
            # The forward saved nothing (it ran without a gradient in view): recompute it (the
            # kernels are deterministic, so this is the forward that ran).
            y, _, _, workspace = impl.forward(
                xg, list(w_hh), list(w_hr), h0, c0, lengths, list(reverse), save_for_backward=True, write_y=True
            )
        return impl.backward(
            grad_y, grad_h_n, grad_c_n, xg, list(w_hh), list(w_hr), h0, c0, lengths, list(reverse), y, workspace
        )


@_lstm_recurrence_backward_op.register_fake
def _(grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse, y, workspace, backend):
    return (
        torch.empty_like(xg),
        [torch.empty_like(w) for w in w_hh],
        [torch.empty_like(w) for w in w_hr],
        torch.empty_like(h0),
        torch.empty_like(c0),
    )


def _setup_context(ctx, inputs, output) -> None:
    xg, w_hh, w_hr, h0, c0, lengths, reverse, backend, *_ = inputs
    y, _, _, workspace = output
    ctx.save_for_backward(xg, h0, c0, y, workspace, *w_hh, *w_hr)
    ctx.num_recurrences = len(w_hh)
    ctx.has_proj = len(w_hr) > 0
    ctx.lengths = lengths
    ctx.reverse = list(reverse)
    ctx.backend = backend


def _recurrence_backward(ctx, grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, y, workspace):
    """The backward op of a recurrence whose forward saved ``y`` and ``workspace`` (``ctx``: its
    lengths, directions and backend); ``xg`` may be a stand-in of the right shape."""
    if y.numel() == 0:  # the forward stored no y (only the final state was wanted): nothing flows from it
        T, B, D = xg.shape[0], xg.shape[1], len(w_hh)
        grad_y = xg.new_zeros(T, B, D, h0.shape[2])
    return _lstm_recurrence_backward_op(
        grad_y.contiguous(),
        grad_h_n.contiguous(),
        grad_c_n.contiguous(),
        xg,
        w_hh,
        w_hr,
        h0,
        c0,
        ctx.lengths,
        ctx.reverse,
        y,
        workspace,
        ctx.backend,
    )


def _backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_workspace):
    xg, h0, c0, y, workspace, *weights = ctx.saved_tensors
    D = ctx.num_recurrences
    w_hh, w_hr = weights[:D], weights[D:]
    grads = _recurrence_backward(ctx, grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, y, workspace)
    return *grads, None, None, None, None, None


register_autograd(_lstm_recurrence_op, _backward, _setup_context)


def lstm_recurrence(
    xg: Tensor,
    w_hh: Sequence[Tensor],
    h0: Tensor | None = None,
    c0: Tensor | None = None,
    *,
    w_hr: Sequence[Tensor] = (),
    lengths: Tensor | None = None,
    reverse: Sequence[bool] | None = None,
    backend: str = "auto",
    return_sequence: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Run ``D`` LSTM recurrences on precomputed gate pre-activations.

    Args:
        xg: ``(T, B, D, 4H)`` gate pre-activations (``x W_ihᵀ + b_ih + b_hh``), gate order i, f, g, o.
        w_hh: ``D`` recurrent weights ``(4H, P)``.
        h0, c0: initial states ``(D, B, P)`` and ``(D, B, H)``; zeros when ``None``.
        w_hr: ``D`` projection weights ``(P, H)`` (``nn.LSTM``'s ``proj_size``), or empty.
        lengths: ``(B,)`` valid lengths; later steps keep the state and output zeros.
        reverse: per recurrence, whether it runs from the last step to the first.
        backend: ``"auto"``, ``"torch"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        return_sequence: ``False`` when only the final state is wanted: ``y`` is ``None`` and,
            where no gradient is needed, the kernels store no per-step output.

    Returns:
        ``(y, h_n, c_n)`` with ``y`` of shape ``(T, B, D, P)`` (``None`` without ``return_sequence``).
    """
    if not isinstance(xg, Tensor) or xg.dim() != 4:
        got = f"{xg.dim()}-D" if isinstance(xg, Tensor) else type(xg).__name__
        raise ValueError(f"lstm_recurrence: xg must be a 4-D tensor (T, B, D, 4*H), got {got}")
    _, B, D, G = xg.shape
    H = G // 4
    P = w_hr[0].shape[0] if len(w_hr) else H
    if h0 is None:
        h0 = xg.new_zeros(D, B, P)
    if c0 is None:
        c0 = xg.new_zeros(D, B, H)
    if reverse is None:
        reverse = [False] * D
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (xg, h0, c0, *w_hh, *w_hr))
    call = check_lstm_recurrence_args(xg, w_hh, w_hr, h0, c0, lengths, reverse, save)
    name = backends.backend_for_op(OP, backend, call, call.device)
    y, h_n, c_n, _ = _lstm_recurrence_op(
        xg, list(w_hh), list(w_hr), h0, c0, lengths, [bool(r) for r in reverse], name, save, bool(return_sequence)
    )
    return (y if return_sequence else None), h_n, c_n


# ---------------------------------------------------------------------------------------------
# A layer from its input: the input projection and the recurrence


def _gates_like(x: Tensor, D: int, G: int) -> Tensor:
    """A ``(T, B, D, G)`` stand-in for ``xg`` where the kernel formed it itself: the recurrence's
    checks and backward read only its shape, dtype and device (one element, expanded)."""
    return x.new_zeros(()).expand(x.shape[0], x.shape[1], D, G)


@torch.library.custom_op("fusedconvlstm::lstm_recurrence_from_input", mutates_args=())
def _lstm_from_input_op(
    x: Tensor,
    w_ih: Tensor,
    b: Tensor | None,
    w_hh: Sequence[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Tensor | None,
    reverse: Sequence[bool],
    backend: str,
    save_for_backward: bool = True,
    write_y: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    G = w_hh[0].shape[0]
    call = check_lstm_recurrence_args(
        _gates_like(x, len(w_hh), G), w_hh, [], h0, c0, lengths, reverse, save_for_backward
    )
    impl = _resolve(backend, call)
    with no_autocast(x):
        return impl.forward_from_input(
            x,
            w_ih,
            b,
            list(w_hh),
            h0,
            c0,
            lengths,
            list(reverse),
            save_for_backward=call.save_for_backward,
            write_y=_writes_y(call, write_y),
        )


@_lstm_from_input_op.register_fake
def _(x, w_ih, b, w_hh, h0, c0, lengths, reverse, backend, save_for_backward=True, write_y=True):
    G = w_hh[0].shape[0]
    call = check_lstm_recurrence_args(
        _gates_like(x, len(w_hh), G), w_hh, [], h0, c0, lengths, reverse, save_for_backward
    )
    return _fake_outputs(backend, call, x, h0, c0, write_y)


def _setup_from_input(ctx, inputs, output) -> None:
    x, w_ih, b, w_hh, h0, c0, lengths, reverse, backend, *_ = inputs
    y, _, _, workspace = output
    ctx.save_for_backward(x, w_ih, h0, c0, y, workspace, *w_hh)
    ctx.has_bias = b is not None
    ctx.lengths = lengths
    ctx.reverse = list(reverse)
    ctx.backend = backend


def _backward_from_input(ctx, grad_y, grad_h_n, grad_c_n, _grad_workspace):
    x, w_ih, h0, c0, y, workspace, *w_hh = ctx.saved_tensors
    T, B, n_in = x.shape
    D, G = len(w_hh), w_hh[0].shape[0]
    grad_xg, grad_w_hh, _, grad_h0, grad_c0 = _recurrence_backward(
        ctx, grad_y, grad_h_n, grad_c_n, _gates_like(x, D, G), w_hh, [], h0, c0, y, workspace
    )
    # The input projection's backward, as F.linear's: dx = dG W_ih, dW_ih = dGᵀ x, db = Σ dG.
    dg = grad_xg.reshape(T * B, D * G)
    grad_x = (dg @ w_ih).view(T, B, n_in)
    grad_w_ih = dg.t() @ x.reshape(T * B, n_in)
    grad_b = dg.sum(0) if ctx.has_bias else None
    return grad_x, grad_w_ih, grad_b, grad_w_hh, grad_h0, grad_c0, None, None, None, None, None


register_autograd(_lstm_from_input_op, _backward_from_input, _setup_from_input)


def _from_input_backend(backend: str, call: LSTMRecurrenceCall, input_size: int) -> str | None:
    """The backend that takes this layer from its input (computing ``x W_ihᵀ`` inside its
    recurrence kernel), or ``None``: the projection is then one GEMM before ``lstm_recurrence``.
    Only a backend that offers it and says it takes the call (the cuda backend, where its
    in-kernel projection is the preferred forward kernel) does; under ``torch.compile`` the GEMM
    is always used (the choice reads the environment and the device)."""
    if call.proj_size or torch.compiler.is_compiling():
        return None
    impl = _resolve(backend, call)
    why_not = impl.get("from_input_why_not")
    if why_not is None or impl.get("forward_from_input") is None or why_not(call, input_size) is not None:
        return None
    return impl.backend


def lstm_layer(
    x: Tensor,
    w_ih: Tensor,
    b: Tensor | None,
    w_hh: Sequence[Tensor],
    h0: Tensor,
    c0: Tensor,
    *,
    w_hr: Sequence[Tensor] = (),
    lengths: Tensor | None = None,
    reverse: Sequence[bool],
    backend: str = "auto",
    return_sequence: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """One LSTM layer of ``D`` recurrences from its input: ``F.linear(x, w_ih, b)`` and
    :func:`lstm_recurrence`, or where the backend computes the projection inside its kernel
    (see ``_from_input_backend``) one call that does both.

    ``x (T, B, I)``; ``w_ih (D * 4H, I)`` and ``b (D * 4H,)`` (or ``None``) the recurrences'
    stacked input weights and summed biases. The rest as :func:`lstm_recurrence`.
    """
    D, G = len(w_hh), w_hh[0].shape[0]
    T, B = x.shape[0], x.shape[1]
    if not w_hr and x.dim() == 3 and w_ih.dim() == 2 and w_ih.shape == (D * G, x.shape[2]):
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_ih, b, h0, c0, *w_hh))
        call = check_lstm_recurrence_args(_gates_like(x, D, G), w_hh, [], h0, c0, lengths, reverse, save)
        name = _from_input_backend(backend, call, x.shape[2])
        if name is not None:
            y, h_n, c_n, _ = _lstm_from_input_op(
                x, w_ih, b, list(w_hh), h0, c0, lengths, [bool(r) for r in reverse], name, save, bool(return_sequence)
            )
            return (y if return_sequence else None), h_n, c_n
    xg = torch.nn.functional.linear(x, w_ih, b).view(T, B, D, G)
    return lstm_recurrence(
        xg, w_hh, h0, c0, w_hr=w_hr, lengths=lengths, reverse=reverse, backend=backend, return_sequence=return_sequence
    )


def resolve_lstm_backend(backend: str, call: LSTMRecurrenceCall) -> str:
    """The backend name ``backend`` resolves to for ``call`` (raises if a named one cannot serve)."""
    return _resolve(backend, call).backend
