"""The Conv1d stack ops: schemas, argument checks, fake implementations and autograd.

``fusedconvlstm::conv1d_stack`` applies ``L`` dense 1-D convolutions one after the other to
channels-last input ``x`` of shape ``(B, T, C_in)`` and returns ``(B, T_out, C_out)``
(contiguous). Layer ``i`` has an ``nn.Conv1d``-shaped weight ``(C_out_i, C_in_i, k_i)``, an
optional bias, a stride, zero padding ``(left, right)``, a dilation, and an activation applied
after it (``none``, ``relu``, ``gelu`` (erf), ``silu``, ``tanh``).

Two ops extend the stack at either end:

- ``fusedconvlstm::conv1d_stack_embedding`` takes token ids ``(B, T)`` and an embedding table
  ``(V, E)`` instead of ``x``: the stack's first layer reads ``table[tokens]`` directly, so a
  backend need not write the ``(B, T, E)`` embedding; its backward returns the table's gradient.
- ``fusedconvlstm::conv1d_stack_projection`` multiplies the stack's output by ``proj_weight``
  ``(N, C_out)`` and adds ``proj_bias`` ``(N,)`` (an LSTM input projection: ``N = D * 4H`` for
  ``D`` LSTMs reading the stack, ``proj_weight = cat(W_ih)``, ``proj_bias = cat(b_ih + b_hh)``),
  and returns the gate pre-activations **time-major**, ``(T_out, B, N)``:
  ``gates.view(T_out, B, D, 4H)`` is ``lstm_recurrence``'s ``xg`` with no copy.

Every op also returns a list of tensors the backend saves for its backward (empty for the
reference, which recomputes). ``save_for_backward=False`` (what the Python wrappers pass when no
gradient is needed) lets a backend skip writing them; a backward given an empty list recomputes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fusedconvlstm import backends

OP = "conv1d_stack"
OP_EMBEDDING = "conv1d_stack_embedding"
OP_PROJECTION = "conv1d_stack_projection"
ACTIVATIONS = ("none", "relu", "gelu", "silu", "tanh")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TOKEN_DTYPES = (torch.int32, torch.int64)

for _op in (OP, OP_EMBEDDING, OP_PROJECTION):
    backends.register_op(_op, auto_order={"cuda": ("triton",), "cpu": ()})


@dataclass(frozen=True)
class ConvLayer:
    """Hyper-parameters of one layer of a stack (weights aside)."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: tuple[int, int]
    dilation: int
    activation: str
    has_bias: bool
    # A linear projection written as a kernel-1 layer (the projection epilogue): fp32 follows
    # PyTorch's matmul TF32 setting rather than the convolution one.
    matmul: bool = False

    def out_len(self, t_in: int) -> int:
        """Output length for input length ``t_in`` (``nn.Conv1d``'s formula)."""
        span = self.dilation * (self.kernel_size - 1) + 1
        return (t_in + self.padding[0] + self.padding[1] - span) // self.stride + 1


@dataclass(frozen=True)
class Conv1dStackCall:
    """What a backend needs to know to decide whether it can serve a stack call.

    ``vocab_size > 0`` marks an embedding-prologue call (the input is token ids into a
    ``(vocab_size, layers[0].in_channels)`` table); ``projection`` (a kernel-1 layer) marks a
    projection-epilogue call. ``save_for_backward`` is false when no gradient will be asked for.
    """

    batch: int
    seq_len: int
    layers: tuple[ConvLayer, ...]
    dtype: torch.dtype
    device: torch.device
    vocab_size: int = 0
    projection: ConvLayer | None = None
    save_for_backward: bool = True

    def out_lens(self) -> list[int]:
        """Sequence length after each conv layer."""
        lens, t = [], self.seq_len
        for layer in self.layers:
            t = layer.out_len(t)
            lens.append(t)
        return lens

    def all_layers(self) -> tuple[ConvLayer, ...]:
        """The conv layers followed by the projection (as a kernel-1 layer) if there is one."""
        return self.layers + ((self.projection,) if self.projection is not None else ())


def parse_activations(activation: str, num_layers: int) -> list[str]:
    """Split the comma-separated per-layer activation string of the op schema."""
    acts = activation.split(",")
    if len(acts) != num_layers:
        raise ValueError(
            f"conv1d_stack: activation must name one activation per layer ({num_layers}), got {activation!r}"
        )
    for a in acts:
        if a not in ACTIVATIONS:
            raise ValueError(f"conv1d_stack: activation must be one of {ACTIVATIONS}, got {a!r}")
    return acts


def _check_same(op: str, name: str, t: Tensor, dtype: torch.dtype, device: torch.device, ref: str) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have the dtype of {ref} ({dtype}), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} must be on the device of {ref} ({device}), got {t.device}")


def _check_layers(
    op: str,
    seq_len: int,
    c_in: int,
    dtype: torch.dtype,
    device: torch.device,
    ref: str,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor | None],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
) -> tuple[ConvLayer, ...]:
    """Validate the per-layer arguments against an input of ``seq_len`` steps and ``c_in`` channels."""
    L = len(weight)
    if L == 0:
        raise ValueError(f"{op}: weight must hold at least one layer")
    for name, seq, n in (
        ("bias", bias, L),
        ("stride", stride, L),
        ("dilation", dilation, L),
        ("padding", padding, 2 * L),
    ):
        if len(seq) != n:
            raise ValueError(f"{op}: {name} must have {n} entries for {L} layers, got {len(seq)}")
    acts = parse_activations(activation, L)
    layers = []
    t = seq_len
    for i in range(L):
        w = weight[i]
        if not isinstance(w, Tensor) or w.dim() != 3:
            raise ValueError(f"{op}: weight[{i}] must be a 3-D tensor (C_out, C_in, k), got {getattr(w, 'shape', w)}")
        if w.shape[1] != c_in:
            where = {"x": "x.shape[2]", "table": "table.shape[1]"}[ref] if i == 0 else f"weight[{i - 1}].shape[0]"
            raise ValueError(f"{op}: weight[{i}].shape[1] must equal {where} = {c_in}, got {w.shape[1]}")
        _check_same(op, f"weight[{i}]", w, dtype, device, ref)
        if bias[i] is not None:
            _check_same(op, f"bias[{i}]", bias[i], dtype, device, ref)
            if tuple(bias[i].shape) != (w.shape[0],):
                raise ValueError(f"{op}: bias[{i}] must have shape ({w.shape[0]},), got {tuple(bias[i].shape)}")
        if stride[i] < 1 or dilation[i] < 1:
            raise ValueError(f"{op}: stride[{i}] and dilation[{i}] must be >= 1, got {stride[i]}, {dilation[i]}")
        if padding[2 * i] < 0 or padding[2 * i + 1] < 0:
            raise ValueError(f"{op}: padding of layer {i} must be >= 0, got {tuple(padding[2 * i : 2 * i + 2])}")
        layer = ConvLayer(
            in_channels=c_in,
            out_channels=w.shape[0],
            kernel_size=w.shape[2],
            stride=int(stride[i]),
            padding=(int(padding[2 * i]), int(padding[2 * i + 1])),
            dilation=int(dilation[i]),
            activation=acts[i],
            has_bias=bias[i] is not None,
        )
        t_out = layer.out_len(t)
        if t_out < 1:
            raise ValueError(
                f"{op}: layer {i} gets {t} time steps (padded {t + sum(layer.padding)}), fewer than its "
                f"receptive field {layer.dilation * (layer.kernel_size - 1) + 1}; {ref} is too short"
            )
        layers.append(layer)
        c_in, t = w.shape[0], t_out
    return tuple(layers)


def check_conv1d_stack_args(
    x: Tensor,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor | None],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    save_for_backward: bool = True,
) -> Conv1dStackCall:
    """Validate the arguments of ``conv1d_stack``; errors name the argument and what it must be."""
    op = OP
    if not isinstance(x, Tensor) or x.dim() != 3:
        got = f"{x.dim()}-D" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a 3-D channels-last tensor (B, T, C), got {got}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be one of {FLOAT_DTYPES}, got {x.dtype}")
    B, T, c_in = x.shape
    layers = _check_layers(op, T, c_in, x.dtype, x.device, "x", weight, bias, stride, padding, dilation, activation)
    return Conv1dStackCall(B, T, layers, x.dtype, x.device, save_for_backward=bool(save_for_backward))


def check_conv1d_stack_embedding_args(
    tokens: Tensor,
    table: Tensor,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor | None],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    save_for_backward: bool = True,
) -> Conv1dStackCall:
    """Validate the arguments of ``conv1d_stack_embedding`` (token values are checked separately)."""
    op = OP_EMBEDDING
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        got = f"{tokens.dim()}-D" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"{op}: tokens must be a 2-D tensor (B, T) of token ids, got {got}")
    if tokens.dtype not in TOKEN_DTYPES:
        raise TypeError(f"{op}: tokens must be one of {TOKEN_DTYPES}, got {tokens.dtype}")
    if not isinstance(table, Tensor) or table.dim() != 2:
        got = f"{table.dim()}-D" if isinstance(table, Tensor) else type(table).__name__
        raise ValueError(f"{op}: table must be a 2-D embedding table (V, E), got {got}")
    if table.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: table must be one of {FLOAT_DTYPES}, got {table.dtype}")
    if tokens.device != table.device:
        raise ValueError(f"{op}: tokens must be on the device of table ({table.device}), got {tokens.device}")
    if table.shape[0] == 0:
        raise ValueError(f"{op}: table must have at least one row")
    B, T = tokens.shape
    layers = _check_layers(
        op, T, table.shape[1], table.dtype, table.device, "table", weight, bias, stride, padding, dilation, activation
    )
    return Conv1dStackCall(
        B, T, layers, table.dtype, table.device, vocab_size=table.shape[0], save_for_backward=bool(save_for_backward)
    )


def check_conv1d_stack_projection_args(
    x: Tensor,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor | None],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    save_for_backward: bool = True,
) -> Conv1dStackCall:
    """Validate the arguments of ``conv1d_stack_projection``."""
    op = OP_PROJECTION
    call = check_conv1d_stack_args(x, weight, bias, stride, padding, dilation, activation, save_for_backward)
    c_out = call.layers[-1].out_channels
    if not isinstance(proj_weight, Tensor) or proj_weight.dim() != 2 or proj_weight.shape[1] != c_out:
        raise ValueError(
            f"{op}: proj_weight must be 2-D (N, {c_out}) (the last layer has {c_out} channels), "
            f"got {getattr(proj_weight, 'shape', type(proj_weight).__name__)}"
        )
    _check_same(op, "proj_weight", proj_weight, x.dtype, x.device, "x")
    if proj_bias is not None:
        _check_same(op, "proj_bias", proj_bias, x.dtype, x.device, "x")
        if tuple(proj_bias.shape) != (proj_weight.shape[0],):
            raise ValueError(f"{op}: proj_bias must have shape ({proj_weight.shape[0]},), got {tuple(proj_bias.shape)}")
    projection = ConvLayer(c_out, proj_weight.shape[0], 1, 1, (0, 0), 1, "none", proj_bias is not None, matmul=True)
    return Conv1dStackCall(
        call.batch,
        call.seq_len,
        call.layers,
        x.dtype,
        x.device,
        projection=projection,
        save_for_backward=call.save_for_backward,
    )


def check_token_values(tokens: Tensor, vocab_size: int) -> None:
    """Raise if a token id lies outside ``[0, vocab_size)`` (reads the ids: a device sync on CUDA).

    Skipped while a CUDA graph is being captured; the Triton kernels then read out-of-range ids as
    zero rows instead of reading out of bounds.
    """
    if tokens.numel() == 0 or (tokens.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = (int(v) for v in torch.aminmax(tokens))
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{OP_EMBEDDING}: tokens must lie in [0, {vocab_size}) (the table's rows), got ids in [{lo}, {hi}]"
        )


def _resolve(op: str, backend: str, call: Conv1dStackCall) -> backends.Implementation:
    return backends.resolve(op, backend, call, call.device)


def _saved_fakes(impl: backends.Implementation, call: Conv1dStackCall, like: Tensor) -> list[Tensor]:
    return [like.new_empty(shape, dtype=dtype) for shape, dtype in impl.saved_shapes(call)]


def _expand_bias(bias: Sequence[Tensor], has_bias: Sequence[bool], op: str = OP) -> list[Tensor | None]:
    """Per-layer biases (``None`` where a layer has none) from the op's present-only list."""
    if sum(bool(h) for h in has_bias) != len(bias):
        raise ValueError(
            f"{op}: bias holds {len(bias)} tensors but has_bias marks {sum(bool(h) for h in has_bias)} layers"
        )
    it = iter(bias)
    return [next(it) if h else None for h in has_bias]


# Biases travel as the list of present ones plus a per-layer flag: autograd of custom ops treats a
# list holding None (``Tensor?[]``) as an opaque leaf and would drop the bias gradients.

# --- conv1d_stack --------------------------------------------------------------------------------


@torch.library.custom_op("fusedconvlstm::conv1d_stack", mutates_args=())
def _conv1d_stack_op(
    x: Tensor,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor],
    has_bias: Sequence[bool],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    backend: str,
    save_for_backward: bool = True,
) -> tuple[Tensor, list[Tensor]]:
    per_layer = _expand_bias(bias, has_bias)
    call = check_conv1d_stack_args(x, weight, per_layer, stride, padding, dilation, activation, save_for_backward)
    with backends.no_autocast(x):
        return _resolve(OP, backend, call).forward(x, list(weight), per_layer, call)


@_conv1d_stack_op.register_fake
def _(x, weight, bias, has_bias, stride, padding, dilation, activation, backend, save_for_backward=True):
    per_layer = _expand_bias(bias, has_bias)
    call = check_conv1d_stack_args(x, weight, per_layer, stride, padding, dilation, activation, save_for_backward)
    y = x.new_empty(call.batch, call.out_lens()[-1], call.layers[-1].out_channels)
    return y, _saved_fakes(_resolve(OP, backend, call), call, x)


@torch.library.custom_op("fusedconvlstm::conv1d_stack_backward", mutates_args=())
def _conv1d_stack_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor],
    has_bias: Sequence[bool],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    saved: Sequence[Tensor],
    backend: str,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    per_layer = _expand_bias(bias, has_bias)
    call = check_conv1d_stack_args(x, weight, per_layer, stride, padding, dilation, activation)
    with backends.no_autocast(x):
        return _resolve(OP, backend, call).backward(grad_y, x, list(weight), per_layer, list(saved), call)


@_conv1d_stack_backward_op.register_fake
def _(grad_y, x, weight, bias, has_bias, stride, padding, dilation, activation, saved, backend):
    return torch.empty_like(x), [torch.empty_like(w) for w in weight], [torch.empty_like(b) for b in bias]


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, has_bias, stride, padding, dilation, activation, backend, *_ = inputs
    _, saved = output
    ctx.save_for_backward(x, *weight, *bias, *saved)
    ctx.counts = (len(weight), len(bias))
    ctx.hyper = (list(has_bias), list(stride), list(padding), list(dilation), activation, backend)


def _backward(ctx, grad_y, _grad_saved):
    n_w, n_b = ctx.counts
    x, *rest = ctx.saved_tensors
    weight, bias, saved = rest[:n_w], rest[n_w : n_w + n_b], rest[n_w + n_b :]
    has_bias, stride, padding, dilation, activation, backend = ctx.hyper
    grad_x, grad_w, grad_b = _conv1d_stack_backward_op(
        grad_y.contiguous(), x, weight, bias, has_bias, stride, padding, dilation, activation, saved, backend
    )
    return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


_conv1d_stack_op.register_autograd(_backward, setup_context=_setup_context)


# --- conv1d_stack_embedding ----------------------------------------------------------------------


@torch.library.custom_op("fusedconvlstm::conv1d_stack_embedding", mutates_args=())
def _conv1d_stack_embedding_op(
    tokens: Tensor,
    table: Tensor,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor],
    has_bias: Sequence[bool],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    backend: str,
    save_for_backward: bool = True,
) -> tuple[Tensor, list[Tensor]]:
    per_layer = _expand_bias(bias, has_bias, OP_EMBEDDING)
    call = check_conv1d_stack_embedding_args(
        tokens, table, weight, per_layer, stride, padding, dilation, activation, save_for_backward
    )
    check_token_values(tokens, call.vocab_size)
    with backends.no_autocast(table):
        return _resolve(OP_EMBEDDING, backend, call).forward(tokens, table, list(weight), per_layer, call)


@_conv1d_stack_embedding_op.register_fake
def _(tokens, table, weight, bias, has_bias, stride, padding, dilation, activation, backend, save_for_backward=True):
    per_layer = _expand_bias(bias, has_bias, OP_EMBEDDING)
    call = check_conv1d_stack_embedding_args(
        tokens, table, weight, per_layer, stride, padding, dilation, activation, save_for_backward
    )
    y = table.new_empty(call.batch, call.out_lens()[-1], call.layers[-1].out_channels)
    return y, _saved_fakes(_resolve(OP_EMBEDDING, backend, call), call, table)


@torch.library.custom_op("fusedconvlstm::conv1d_stack_embedding_backward", mutates_args=())
def _conv1d_stack_embedding_backward_op(
    grad_y: Tensor,
    tokens: Tensor,
    table: Tensor,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor],
    has_bias: Sequence[bool],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    saved: Sequence[Tensor],
    backend: str,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    per_layer = _expand_bias(bias, has_bias, OP_EMBEDDING)
    call = check_conv1d_stack_embedding_args(tokens, table, weight, per_layer, stride, padding, dilation, activation)
    impl = _resolve(OP_EMBEDDING, backend, call)
    with backends.no_autocast(table):
        return impl.backward(grad_y, tokens, table, list(weight), per_layer, list(saved), call)


@_conv1d_stack_embedding_backward_op.register_fake
def _(grad_y, tokens, table, weight, bias, has_bias, stride, padding, dilation, activation, saved, backend):
    return torch.empty_like(table), [torch.empty_like(w) for w in weight], [torch.empty_like(b) for b in bias]


def _embedding_setup_context(ctx, inputs, output) -> None:
    tokens, table, weight, bias, has_bias, stride, padding, dilation, activation, backend, *_ = inputs
    _, saved = output
    ctx.save_for_backward(tokens, table, *weight, *bias, *saved)
    ctx.counts = (len(weight), len(bias))
    ctx.hyper = (list(has_bias), list(stride), list(padding), list(dilation), activation, backend)


def _embedding_backward(ctx, grad_y, _grad_saved):
    n_w, n_b = ctx.counts
    tokens, table, *rest = ctx.saved_tensors
    weight, bias, saved = rest[:n_w], rest[n_w : n_w + n_b], rest[n_w + n_b :]
    has_bias, stride, padding, dilation, activation, backend = ctx.hyper
    grad_table, grad_w, grad_b = _conv1d_stack_embedding_backward_op(
        grad_y.contiguous(), tokens, table, weight, bias, has_bias, stride, padding, dilation, activation, saved,
        backend,
    )  # fmt: skip
    return None, grad_table, grad_w, grad_b, None, None, None, None, None, None, None


_conv1d_stack_embedding_op.register_autograd(_embedding_backward, setup_context=_embedding_setup_context)


# --- conv1d_stack_projection ---------------------------------------------------------------------


@torch.library.custom_op("fusedconvlstm::conv1d_stack_projection", mutates_args=())
def _conv1d_stack_projection_op(
    x: Tensor,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor],
    has_bias: Sequence[bool],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    backend: str,
    save_for_backward: bool = True,
) -> tuple[Tensor, list[Tensor]]:
    per_layer = _expand_bias(bias, has_bias, OP_PROJECTION)
    call = check_conv1d_stack_projection_args(
        x, weight, per_layer, stride, padding, dilation, activation, proj_weight, proj_bias, save_for_backward
    )
    impl = _resolve(OP_PROJECTION, backend, call)
    with backends.no_autocast(x):
        return impl.forward(x, list(weight), per_layer, proj_weight, proj_bias, call)


@_conv1d_stack_projection_op.register_fake
def _(
    x, weight, bias, has_bias, stride, padding, dilation, activation, proj_weight, proj_bias, backend,
    save_for_backward=True,
):  # fmt: skip
    per_layer = _expand_bias(bias, has_bias, OP_PROJECTION)
    call = check_conv1d_stack_projection_args(
        x, weight, per_layer, stride, padding, dilation, activation, proj_weight, proj_bias, save_for_backward
    )
    gates = x.new_empty(call.out_lens()[-1], call.batch, call.projection.out_channels)
    return gates, _saved_fakes(_resolve(OP_PROJECTION, backend, call), call, x)


@torch.library.custom_op("fusedconvlstm::conv1d_stack_projection_backward", mutates_args=())
def _conv1d_stack_projection_backward_op(
    grad_gates: Tensor,
    x: Tensor,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor],
    has_bias: Sequence[bool],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    saved: Sequence[Tensor],
    backend: str,
) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor, list[Tensor]]:
    per_layer = _expand_bias(bias, has_bias, OP_PROJECTION)
    call = check_conv1d_stack_projection_args(
        x, weight, per_layer, stride, padding, dilation, activation, proj_weight, proj_bias
    )
    impl = _resolve(OP_PROJECTION, backend, call)
    with backends.no_autocast(x):
        grad_x, grad_w, grad_b, grad_pw, grad_pb = impl.backward(
            grad_gates, x, list(weight), per_layer, proj_weight, proj_bias, list(saved), call
        )
    # A Tensor? output is not allowed: the projection bias's gradient travels as a 0- or 1-list.
    return grad_x, grad_w, grad_b, grad_pw, [] if grad_pb is None else [grad_pb]


@_conv1d_stack_projection_backward_op.register_fake
def _(
    grad_gates, x, weight, bias, has_bias, stride, padding, dilation, activation, proj_weight, proj_bias, saved,
    backend,
):  # fmt: skip
    return (
        torch.empty_like(x),
        [torch.empty_like(w) for w in weight],
        [torch.empty_like(b) for b in bias],
        torch.empty_like(proj_weight),
        [] if proj_bias is None else [torch.empty_like(proj_bias)],
    )


def _projection_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, has_bias, stride, padding, dilation, activation, proj_weight, proj_bias, backend, *_ = inputs
    _, saved = output
    proj_bias_list = [] if proj_bias is None else [proj_bias]
    ctx.save_for_backward(x, proj_weight, *proj_bias_list, *weight, *bias, *saved)
    ctx.counts = (len(weight), len(bias), len(proj_bias_list))
    ctx.hyper = (list(has_bias), list(stride), list(padding), list(dilation), activation, backend)


def _projection_backward(ctx, grad_gates, _grad_saved):
    n_w, n_b, n_pb = ctx.counts
    x, proj_weight, *rest = ctx.saved_tensors
    proj_bias, rest = (rest[0] if n_pb else None), rest[n_pb:]
    weight, bias, saved = rest[:n_w], rest[n_w : n_w + n_b], rest[n_w + n_b :]
    has_bias, stride, padding, dilation, activation, backend = ctx.hyper
    grad_x, grad_w, grad_b, grad_pw, grad_pb = _conv1d_stack_projection_backward_op(
        grad_gates.contiguous(), x, weight, bias, has_bias, stride, padding, dilation, activation, proj_weight,
        proj_bias, saved, backend,
    )  # fmt: skip
    grad_proj_bias = grad_pb[0] if n_pb else None
    return grad_x, grad_w, grad_b, None, None, None, None, None, grad_pw, grad_proj_bias, None, None


_conv1d_stack_projection_op.register_autograd(_projection_backward, setup_context=_projection_setup_context)


# --- Python wrappers -----------------------------------------------------------------------------


def _stack_args(
    num_layers: int,
    bias: Sequence[Tensor | None] | None,
    stride: Sequence[int] | None,
    padding: Sequence[tuple[int, int]] | None,
    dilation: Sequence[int] | None,
    activation: Sequence[str] | None,
    op: str,
) -> tuple[list, list[int], list[int], list[int], str]:
    L = num_layers
    bias = list(bias) if bias is not None else [None] * L
    stride = list(stride) if stride is not None else [1] * L
    dilation = list(dilation) if dilation is not None else [1] * L
    pads = list(padding) if padding is not None else [(0, 0)] * L
    if len(pads) != L:
        raise ValueError(f"{op}: padding must have one (left, right) pair per layer ({L}), got {len(pads)}")
    flat_padding = [int(p) for pair in pads for p in pair]
    act = ",".join(activation) if activation is not None else ",".join(["none"] * L)
    return bias, stride, flat_padding, dilation, act


def _present(bias: Sequence[Tensor | None]) -> tuple[list[Tensor], list[bool]]:
    return [b for b in bias if b is not None], [b is not None for b in bias]


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
) -> Tensor:
    """Apply a stack of Conv1d layers to channels-last ``x`` of shape ``(B, T, C_in)``.

    Args:
        x: input ``(B, T, C_in)``.
        weight: per layer ``(C_out, C_in, k)``, as ``nn.Conv1d.weight``.
        bias: per layer ``(C_out,)`` or ``None``; all ``None`` when omitted.
        stride, dilation: per layer, default 1.
        padding: per layer ``(left, right)`` zero padding, default ``(0, 0)``.
        activation: per layer, applied after it; default ``"none"``.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``(B, T_out, C_out)``, contiguous.
    """
    bias, stride, padding_, dilation, act = _stack_args(len(weight), bias, stride, padding, dilation, activation, OP)
    save = _needs_grad(x, *weight, *bias)
    call = check_conv1d_stack_args(x, weight, bias, stride, padding_, dilation, act, save)
    impl = _resolve(OP, backend, call)
    present, has_bias = _present(bias)
    y, _ = _conv1d_stack_op(x, list(weight), present, has_bias, stride, padding_, dilation, act, impl.backend, save)
    return y


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
) -> Tensor:
    """``conv1d_stack(F.embedding(tokens, table), ...)`` without writing the embedding.

    Args:
        tokens: token ids ``(B, T)``, int32 or int64, each in ``[0, V)``.
        table: embedding table ``(V, E)`` (``nn.Embedding.weight``); gets a gradient.
        weight, bias, stride, padding, dilation, activation, backend: as :func:`conv1d_stack`.

    Returns:
        ``(B, T_out, C_out)``, contiguous.
    """
    bias, stride, padding_, dilation, act = _stack_args(
        len(weight), bias, stride, padding, dilation, activation, OP_EMBEDDING
    )
    save = _needs_grad(table, *weight, *bias)
    call = check_conv1d_stack_embedding_args(tokens, table, weight, bias, stride, padding_, dilation, act, save)
    impl = _resolve(OP_EMBEDDING, backend, call)
    present, has_bias = _present(bias)
    y, _ = _conv1d_stack_embedding_op(
        tokens, table, list(weight), present, has_bias, stride, padding_, dilation, act, impl.backend, save
    )
    return y


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
) -> Tensor:
    """The stack followed by an LSTM input projection, returned time-major.

    Args:
        x, weight, bias, stride, padding, dilation, activation, backend: as :func:`conv1d_stack`.
        proj_weight: ``(N, C_out)``; for ``D`` LSTMs reading the stack, ``cat([lstm.weight_ih_l0 ...])``.
        proj_bias: ``(N,)`` or ``None``; for LSTMs, ``cat([lstm.bias_ih_l0 + lstm.bias_hh_l0 ...])``.

    Returns:
        gates ``(T_out, B, N)``, contiguous: ``gates.view(T_out, B, D, 4 * H)`` is the ``xg`` of
        :func:`fusedconvlstm.lstm_recurrence`.
    """
    if proj_weight is None:
        raise ValueError(f"{OP_PROJECTION}: proj_weight must be given")
    bias, stride, padding_, dilation, act = _stack_args(
        len(weight), bias, stride, padding, dilation, activation, OP_PROJECTION
    )
    save = _needs_grad(x, *weight, *bias, proj_weight, proj_bias)
    call = check_conv1d_stack_projection_args(
        x, weight, bias, stride, padding_, dilation, act, proj_weight, proj_bias, save
    )
    impl = _resolve(OP_PROJECTION, backend, call)
    present, has_bias = _present(bias)
    gates, _ = _conv1d_stack_projection_op(
        x, list(weight), present, has_bias, stride, padding_, dilation, act, proj_weight, proj_bias, impl.backend, save
    )
    return gates
