"""The Conv1d stack op: schema, argument checks, fake implementation and autograd.

``fusedconvlstm::conv1d_stack`` applies ``L`` dense 1-D convolutions one after the other to
channels-last input ``x`` of shape ``(B, T, C_in)`` and returns ``(B, T_out, C_out)``
(contiguous). Layer ``i`` has an ``nn.Conv1d``-shaped weight ``(C_out_i, C_in_i, k_i)``, an
optional bias, a stride, zero padding ``(left, right)``, a dilation, and an activation applied
after it (``none``, ``relu``, ``gelu`` (erf), ``silu``, ``tanh``).

Two optional arguments extend the stack at either end, alone or together:

- ``tokens`` ``(B, T)`` (int32/int64): an embedding prologue. ``x`` is then the embedding table
  ``(V, E)`` and the first layer reads ``x[tokens]`` directly, so a backend need not write the
  ``(B, T, E)`` embedding; ``x``'s gradient is the table's.
- ``proj_weight`` ``(N, C_out)`` and optional ``proj_bias`` ``(N,)``: a projection epilogue (an
  LSTM input projection: ``N = D * 4H`` for ``D`` LSTMs reading the stack,
  ``proj_weight = cat(W_ih)``, ``proj_bias = cat(b_ih + b_hh)``). The op then returns the gate
  pre-activations **time-major**, ``(T_out, B, N)``: ``gates.view(T_out, B, D, 4H)`` is
  ``lstm_recurrence``'s ``xg`` with no copy.

Dropout (training): ``dropout[i]`` is the rate applied to layer ``i``'s input (for ``i = 0``
the input or the gathered embedding rows, else the previous layer's activated output), drawn
from the int64 ``seed`` tensor by a counter-based generator (:mod:`fusedconvlstm.numerics.dropout`):
the op stays a pure function of its arguments, every backend draws bitwise the same masks, and
the backward draws them again instead of storing them. Kept elements are scaled by
``1 / (1 − p)``, as ``F.dropout`` does. An empty list (or all zeros) is no dropout.

The op also returns a list of tensors the backend saves for its backward (empty for the
reference, which recomputes). ``save_for_backward=False`` (what the Python wrappers pass when no
gradient is needed) lets a backend skip writing them; a backward given an empty list recomputes.

Biases travel as the list of present ones plus a per-layer flag: autograd of custom ops treats a
list holding None (``Tensor?[]``) as an opaque leaf and would drop the bias gradients. For the
same reason the backward op returns the projection's gradients as a list (``[]``, ``[grad_pw]``
or ``[grad_pw, grad_pb]``) rather than ``Tensor?`` outputs.

A backend implementation provides ``forward(x, tokens, weight, bias, proj_weight, proj_bias,
seed, call) -> (y, saved)``, ``backward(grad_y, x, tokens, weight, bias, proj_weight, proj_bias,
seed, saved, call) -> (grad_x, grad_weight list, grad_bias list (present biases), grad_proj_weight or None,
grad_proj_bias or None)`` and ``saved_shapes(call)``; ``bias`` is per layer (``None`` where a
layer has none) and ``call`` is the :class:`Conv1dStackCall`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusedconvlstm import backends
from fusedconvlstm.calls.conv1d import (
    OP,
    Conv1dStackBackend,
    Conv1dStackCall,
    check_conv1d_stack_args,
    check_token_values,
    thaw_call,
)
from fusedconvlstm.numerics.dropout import draw_seed
from fusedconvlstm.numerics.precision import no_autocast
from fusedconvlstm.ops._autograd import register_autograd

backends.register_op(
    OP, auto_order=("triton",), features=Conv1dStackCall.features, thaw=thaw_call, interface=Conv1dStackBackend
)


def _resolve(backend: str, call: Conv1dStackCall) -> backends.Implementation:
    return backends.resolve(OP, backend, call, call.device)


def _expand(present: Sequence[Tensor], flags: Sequence[bool]) -> list[Tensor | None]:
    """Per-slot tensors (``None`` where a flag is false) from the list of the present ones."""
    it = iter(present)
    return [next(it) if f else None for f in flags]


def _call(
    x, tokens, weight, bias, has_bias, stride, padding, dilation, activation, proj_weight, proj_bias, save=True,
    dropout=None, seed=None,
):  # fmt: skip
    """The per-layer biases and the checked call of the op's arguments."""
    if sum(map(bool, has_bias)) != len(bias):
        raise ValueError(f"{OP}: bias holds {len(bias)} tensors but has_bias marks {sum(map(bool, has_bias))} layers")
    per_layer = _expand(bias, has_bias)
    call = check_conv1d_stack_args(
        x, tokens, weight, per_layer, stride, padding, dilation, activation, proj_weight, proj_bias, save, dropout, seed
    )
    return per_layer, call


@torch.library.custom_op("fusedconvlstm::conv1d_stack", mutates_args=())
def _conv1d_stack_op(
    x: Tensor,
    tokens: Tensor | None,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor],
    has_bias: Sequence[bool],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    proj_weight: Tensor | None,
    proj_bias: Tensor | None,
    backend: str,
    save_for_backward: bool = True,
    dropout: Sequence[float] | None = None,
    seed: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    per_layer, call = _call(
        x, tokens, weight, bias, has_bias, stride, padding, dilation, activation, proj_weight, proj_bias,
        save_for_backward, dropout, seed,
    )  # fmt: skip
    if tokens is not None:
        check_token_values(tokens, call.vocab_size)
    impl = _resolve(backend, call)
    with no_autocast(x):
        return impl.forward(x, tokens, list(weight), per_layer, proj_weight, proj_bias, seed, call)


@_conv1d_stack_op.register_fake
def _(
    x, tokens, weight, bias, has_bias, stride, padding, dilation, activation, proj_weight, proj_bias, backend,
    save_for_backward=True, dropout=None, seed=None,
):  # fmt: skip
    _, call = _call(
        x, tokens, weight, bias, has_bias, stride, padding, dilation, activation, proj_weight, proj_bias,
        save_for_backward, dropout, seed,
    )  # fmt: skip
    saved = [x.new_empty(shape, dtype=dtype) for shape, dtype in _resolve(backend, call).saved_shapes(call)]
    return x.new_empty(call.out_shape()), saved


@torch.library.custom_op("fusedconvlstm::conv1d_stack_backward", mutates_args=())
def _conv1d_stack_backward_op(
    grad_y: Tensor,
    x: Tensor,
    tokens: Tensor | None,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor],
    has_bias: Sequence[bool],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    proj_weight: Tensor | None,
    proj_bias: Tensor | None,
    saved: Sequence[Tensor],
    backend: str,
    dropout: Sequence[float] | None = None,
    seed: Tensor | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    per_layer, call = _call(
        x, tokens, weight, bias, has_bias, stride, padding, dilation, activation, proj_weight, proj_bias, True,
        dropout, seed,
    )  # fmt: skip
    impl = _resolve(backend, call)
    with no_autocast(x):
        grad_x, grad_w, grad_b, grad_pw, grad_pb = impl.backward(
            grad_y, x, tokens, list(weight), per_layer, proj_weight, proj_bias, seed, list(saved), call
        )
    grad_proj = [g for g in (grad_pw, grad_pb) if g is not None]
    return grad_x, grad_w, grad_b, grad_proj


@_conv1d_stack_backward_op.register_fake
def _(
    grad_y, x, tokens, weight, bias, has_bias, stride, padding, dilation, activation, proj_weight, proj_bias, saved,
    backend, dropout=None, seed=None,
):  # fmt: skip
    grad_proj = [torch.empty_like(p) for p in (proj_weight, proj_bias) if p is not None]
    return torch.empty_like(x), [torch.empty_like(w) for w in weight], [torch.empty_like(b) for b in bias], grad_proj


def _setup_context(ctx, inputs, output) -> None:
    x, tokens, weight, bias, has_bias, stride, padding, dilation, activation, proj_weight, proj_bias = inputs[:11]
    dropout, seed = (list(inputs[13:15]) + [None, None])[:2]
    optional = (tokens, proj_weight, proj_bias, seed)
    ctx.has_optional = [t is not None for t in optional]
    ctx.save_for_backward(x, *[t for t in optional if t is not None], *weight, *bias, *output[1])
    ctx.counts = (sum(ctx.has_optional), len(weight), len(bias))
    ctx.hyper = (list(has_bias), list(stride), list(padding), list(dilation), activation)
    ctx.backend = inputs[11]
    ctx.dropout = list(dropout) if dropout is not None else None


def _backward(ctx, grad_y, _grad_saved):
    n_opt, n_w, n_b = ctx.counts
    x, *rest = ctx.saved_tensors
    tokens, proj_weight, proj_bias, seed = _expand(rest[:n_opt], ctx.has_optional)
    weight, bias, saved = rest[n_opt : n_opt + n_w], rest[n_opt + n_w : n_opt + n_w + n_b], rest[n_opt + n_w + n_b :]
    grad_x, grad_w, grad_b, grad_proj = _conv1d_stack_backward_op(
        grad_y.contiguous(), x, tokens, weight, bias, *ctx.hyper, proj_weight, proj_bias, saved, ctx.backend,
        ctx.dropout, seed,
    )  # fmt: skip
    grad_pw, grad_pb = (grad_proj + [None, None])[:2]
    return grad_x, None, grad_w, grad_b, None, None, None, None, None, grad_pw, grad_pb, None, None, None, None


register_autograd(_conv1d_stack_op, _backward, _setup_context)


# --- Python wrappers -----------------------------------------------------------------------------


def _stack(
    x: Tensor,
    tokens: Tensor | None,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor | None] | None,
    proj_weight: Tensor | None,
    proj_bias: Tensor | None,
    stride: Sequence[int] | None,
    padding: Sequence[tuple[int, int]] | None,
    dilation: Sequence[int] | None,
    activation: Sequence[str] | None,
    backend: str,
    dropout: Sequence[float] | None = None,
    seed: Tensor | None = None,
) -> Tensor:
    """The op with per-layer defaults filled in and ``auto`` resolved (so that the op, its fake and
    its backward agree on one backend); asks the backend to save only when a gradient can flow,
    and draws a seed from PyTorch's generator when dropout is on and none was given."""
    call, args, bias, dropout, seed = _prepare(
        x, tokens, weight, bias, proj_weight, proj_bias, stride, padding, dilation, activation, dropout, seed
    )
    name = backends.backend_for_op(OP, backend, call, x.device)
    present, has_bias = [b for b in bias if b is not None], [b is not None for b in bias]
    y, _ = _conv1d_stack_op(
        x, tokens, list(weight), present, has_bias, *args, proj_weight, proj_bias, name, call.save_for_backward,
        dropout, seed if dropout is not None else None,
    )  # fmt: skip
    return y


def _prepare(x, tokens, weight, bias, proj_weight, proj_bias, stride, padding, dilation, activation, dropout, seed):
    """``(call, schema arguments, per-layer biases, dropout rates or None, seed)`` of a wrapper's
    arguments, defaults filled in."""
    L = len(weight)
    bias = list(bias) if bias is not None else [None] * L
    pads = list(padding) if padding is not None else [(0, 0)] * L
    if len(pads) != L:
        raise ValueError(f"{OP}: padding must have one (left, right) pair per layer ({L}), got {len(pads)}")
    args = (
        list(stride) if stride is not None else [1] * L,
        [int(p) for pair in pads for p in pair],
        list(dilation) if dilation is not None else [1] * L,
        ",".join(activation) if activation is not None else ",".join(["none"] * L),
    )
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, *weight, *bias, proj_weight, proj_bias)
    )
    dropout = [float(p) for p in dropout] if dropout is not None and any(dropout) else None
    if dropout is not None and seed is None:
        seed = draw_seed(x.device)
    call = check_conv1d_stack_args(x, tokens, weight, bias, *args, proj_weight, proj_bias, save, dropout, seed)
    return call, args, bias, dropout, seed


def stack_call(
    x: Tensor,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor | None] | None = None,
    *,
    tokens: Tensor | None = None,
    proj_weight: Tensor | None = None,
    proj_bias: Tensor | None = None,
    stride: Sequence[int] | None = None,
    padding: Sequence[tuple[int, int]] | None = None,
    dilation: Sequence[int] | None = None,
    activation: Sequence[str] | None = None,
    dropout: Sequence[float] | None = None,
    seed: Tensor | None = None,
    backend: str = "auto",
) -> Conv1dStackCall:
    """The checked :class:`Conv1dStackCall` of a wrapper's arguments (``x`` is the table with
    ``tokens``), for a module asking :func:`fusedconvlstm.backends.module_backend` which backend
    serves it; ``seed`` must be given with dropout. ``backend`` is ignored (the modules pass their
    op options whole)."""
    if dropout is not None and any(dropout) and seed is None:
        raise ValueError(f"{OP}: stack_call needs the seed of its dropout")
    return _prepare(
        x, tokens, weight, bias, proj_weight, proj_bias, stride, padding, dilation, activation, dropout, seed
    )[0]


def conv1d_stack(
    x: Tensor,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor | None] | None = None,
    *,
    stride: Sequence[int] | None = None,
    padding: Sequence[tuple[int, int]] | None = None,
    dilation: Sequence[int] | None = None,
    activation: Sequence[str] | None = None,
    backend: str = "auto",
    dropout: Sequence[float] | None = None,
    seed: Tensor | None = None,
) -> Tensor:
    """Apply a stack of Conv1d layers to channels-last ``x`` of shape ``(B, T, C_in)``.

    Args:
        x: input ``(B, T, C_in)``.
        weight: per layer ``(C_out, C_in, k)``, as ``nn.Conv1d.weight``.
        bias: per layer ``(C_out,)`` or ``None``; all ``None`` when omitted.
        stride, dilation: per layer, default 1.
        padding: per layer ``(left, right)`` zero padding, default ``(0, 0)``.
        activation: per layer, applied after it; default ``"none"``.
        backend: ``"auto"``, ``"torch"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        dropout: per layer, the dropout rate on that layer's input (training); none by default.
            A fused backend applies it as it reads the layer's input, with masks drawn from
            ``seed`` (module docstring).
        seed: int64 tensor of one element on ``x``'s device; drawn from PyTorch's generator
            when dropout is on and it is not given (so ``torch.manual_seed`` reproduces a call).

    Returns:
        ``(B, T_out, C_out)``, contiguous.

    :func:`conv1d_stack_embedding`, :func:`conv1d_stack_projection` and
    :func:`conv1d_stack_embedding_projection` are the same op with an embedding gather before the
    first layer, an LSTM input projection after the last, or both.
    """
    return _stack(x, None, weight, bias, None, None, stride, padding, dilation, activation, backend, dropout, seed)


def conv1d_stack_embedding(
    tokens: Tensor,
    table: Tensor,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor | None] | None = None,
    *,
    stride: Sequence[int] | None = None,
    padding: Sequence[tuple[int, int]] | None = None,
    dilation: Sequence[int] | None = None,
    activation: Sequence[str] | None = None,
    backend: str = "auto",
    dropout: Sequence[float] | None = None,
    seed: Tensor | None = None,
) -> Tensor:
    """``conv1d_stack(F.embedding(tokens, table), ...)`` without writing the embedding.

    ``tokens`` are ids ``(B, T)``, int32 or int64, each in ``[0, V)``; ``table`` is ``(V, E)``
    (``nn.Embedding.weight``) and gets a gradient. The rest is as :func:`conv1d_stack`; returns
    ``(B, T_out, C_out)``, contiguous.
    """
    return _stack(
        table, tokens, weight, bias, None, None, stride, padding, dilation, activation, backend, dropout, seed
    )


def conv1d_stack_projection(
    x: Tensor,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor | None] | None = None,
    proj_weight: Tensor | None = None,
    proj_bias: Tensor | None = None,
    *,
    stride: Sequence[int] | None = None,
    padding: Sequence[tuple[int, int]] | None = None,
    dilation: Sequence[int] | None = None,
    activation: Sequence[str] | None = None,
    backend: str = "auto",
    dropout: Sequence[float] | None = None,
    seed: Tensor | None = None,
) -> Tensor:
    """The stack followed by an LSTM input projection, returned time-major.

    ``proj_weight`` is ``(N, C_out)`` (for ``D`` LSTMs reading the stack,
    ``cat([lstm.weight_ih_l0 ...])``), ``proj_bias`` ``(N,)`` or ``None`` (for LSTMs,
    ``cat([lstm.bias_ih_l0 + lstm.bias_hh_l0 ...])``); the rest is as :func:`conv1d_stack`.
    Returns the gates ``(T_out, B, N)``, contiguous: ``gates.view(T_out, B, D, 4 * H)`` is the
    ``xg`` of :func:`fusedconvlstm.lstm_recurrence`.
    """
    if proj_weight is None:
        raise ValueError(f"{OP}: proj_weight must be given")
    return _stack(
        x, None, weight, bias, proj_weight, proj_bias, stride, padding, dilation, activation, backend, dropout, seed
    )


def conv1d_stack_embedding_projection(
    tokens: Tensor,
    table: Tensor,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor | None] | None,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    *,
    stride: Sequence[int] | None = None,
    padding: Sequence[tuple[int, int]] | None = None,
    dilation: Sequence[int] | None = None,
    activation: Sequence[str] | None = None,
    backend: str = "auto",
    dropout: Sequence[float] | None = None,
    seed: Tensor | None = None,
) -> Tensor:
    """Token ids to LSTM gates in one op: ``F.linear(conv1d_stack(F.embedding(tokens, table), ...),
    proj_weight, proj_bias)``, time-major ``(T_out, B, N)``, with neither the embedding nor the
    stack's output written.

    Arguments as :func:`conv1d_stack_embedding` and :func:`conv1d_stack_projection`; the table,
    the layers and the projection all get gradients.
    """
    return _stack(
        table,
        tokens,
        weight,
        bias,
        proj_weight,
        proj_bias,
        stride,
        padding,
        dilation,
        activation,
        backend,
        dropout,
        seed,
    )
