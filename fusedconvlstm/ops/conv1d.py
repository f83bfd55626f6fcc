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
from the int64 ``seed`` tensor by a counter-based generator (:mod:`fusedconvlstm.reference.dropout`):
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
from dataclasses import dataclass

import torch
from torch import Tensor

from fusedconvlstm import backends
from fusedconvlstm.ops._autograd import register_autograd
from fusedconvlstm.reference.dropout import draw_seed

OP = "conv1d_stack"
ACTIVATIONS = ("none", "relu", "gelu", "silu", "tanh")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TOKEN_DTYPES = (torch.int32, torch.int64)


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
    # Per conv layer, the dropout rate on its input; () when no layer drops out.
    dropout: tuple[float, ...] = ()

    def dropout_levels(self) -> list[tuple[int, float]]:
        """``(level, p)`` of every layer input with dropout (level ``i`` is layer ``i``'s input)."""
        return [(i, p) for i, p in enumerate(self.dropout) if p > 0]

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

    def out_shape(self) -> tuple[int, int, int]:
        """``(B, T_out, C_out)``, or the gates' ``(T_out, B, N)`` with a projection."""
        t_out = self.out_lens()[-1]
        if self.projection is not None:
            return t_out, self.batch, self.projection.out_channels
        return self.batch, t_out, self.layers[-1].out_channels

    def freeze(self) -> tuple:
        """The call as a tuple of plain values (:func:`thaw_call` reverses it)."""
        return (
            self.batch,
            self.seq_len,
            tuple(_freeze_layer(layer) for layer in self.layers),
            self.dtype,
            self.device.type,
            self.device.index,
            self.vocab_size,
            None if self.projection is None else _freeze_layer(self.projection),
            self.save_for_backward,
            tuple(self.dropout),
        )

    def features(self) -> dict[str, int]:
        """What validation records range over (:mod:`fusedconvlstm.records`)."""
        layers = self.layers
        return {
            "batch": self.batch,
            "seq_len": self.seq_len,
            "num_layers": len(layers),
            "max_channels": max(max(layer.in_channels, layer.out_channels) for layer in layers),
            "max_kernel_size": max(layer.kernel_size for layer in layers),
            "max_stride": max(layer.stride for layer in layers),
            "max_dilation": max(layer.dilation for layer in layers),
            "embedding": int(self.vocab_size > 0),
            "projection": 0 if self.projection is None else self.projection.out_channels,
            "dropout": int(any(self.dropout)),
        }


def _freeze_layer(layer: ConvLayer) -> tuple:
    return (
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        tuple(layer.padding),
        layer.dilation,
        layer.activation,
        layer.has_bias,
        layer.matmul,
    )


def thaw_call(frozen: tuple) -> Conv1dStackCall:
    """The call of :meth:`Conv1dStackCall.freeze`."""
    B, T, layers, dtype, dev_type, dev_index, vocab, projection, save, dropout = frozen
    return Conv1dStackCall(
        B,
        T,
        tuple(ConvLayer(*layer) for layer in layers),
        dtype,
        torch.device(dev_type, dev_index),
        vocab_size=vocab,
        projection=None if projection is None else ConvLayer(*projection),
        save_for_backward=save,
        dropout=tuple(dropout),
    )


backends.register_op(OP, auto_order=("triton",), features=Conv1dStackCall.features, thaw=thaw_call)


def parse_activations(activation: str, num_layers: int) -> list[str]:
    """Split the comma-separated per-layer activation string of the op schema."""
    acts = activation.split(",")
    if len(acts) != num_layers:
        raise ValueError(f"{OP}: activation must name one activation per layer ({num_layers}), got {activation!r}")
    for a in acts:
        if a not in ACTIVATIONS:
            raise ValueError(f"{OP}: activation must be one of {ACTIVATIONS}, got {a!r}")
    return acts


def _check_same(name: str, t: Tensor, dtype: torch.dtype, device: torch.device, ref: str) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{OP}: {name} must have the dtype of {ref} ({dtype}), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{OP}: {name} must be on the device of {ref} ({device}), got {t.device}")


def _check_layer(
    i: int, w: Tensor, b: Tensor | None, stride: int, padding: tuple[int, int], dilation: int, activation: str,
    c_in: int, t: int, x: Tensor, ref: str,
) -> ConvLayer:  # fmt: skip
    """Validate layer ``i`` on an input of ``c_in`` channels and ``t`` steps (``ref`` names the stack's input)."""
    if not isinstance(w, Tensor) or w.dim() != 3:
        raise ValueError(f"{OP}: weight[{i}] must be a 3-D tensor (C_out, C_in, k), got {getattr(w, 'shape', w)}")
    if w.shape[1] != c_in:
        where = {"x": "x.shape[2]", "table": "table.shape[1]"}[ref] if i == 0 else f"weight[{i - 1}].shape[0]"
        raise ValueError(f"{OP}: weight[{i}].shape[1] must equal {where} = {c_in}, got {w.shape[1]}")
    _check_same(f"weight[{i}]", w, x.dtype, x.device, ref)
    if b is not None:
        _check_same(f"bias[{i}]", b, x.dtype, x.device, ref)
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{OP}: bias[{i}] must have shape ({w.shape[0]},), got {tuple(b.shape)}")
    if stride < 1 or dilation < 1:
        raise ValueError(f"{OP}: stride[{i}] and dilation[{i}] must be >= 1, got {stride}, {dilation}")
    if padding[0] < 0 or padding[1] < 0:
        raise ValueError(f"{OP}: padding of layer {i} must be >= 0, got {tuple(padding)}")
    layer = ConvLayer(
        in_channels=c_in,
        out_channels=w.shape[0],
        kernel_size=w.shape[2],
        stride=int(stride),
        padding=(int(padding[0]), int(padding[1])),
        dilation=int(dilation),
        activation=activation,
        has_bias=b is not None,
    )
    if layer.out_len(t) < 1:
        raise ValueError(
            f"{OP}: layer {i} gets {t} time steps (padded {t + sum(layer.padding)}), fewer than its "
            f"receptive field {layer.dilation * (layer.kernel_size - 1) + 1}; {ref} is too short"
        )
    return layer


def _dims(t: object) -> str:
    return f"{t.dim()}-D" if isinstance(t, Tensor) else type(t).__name__


def _check_input(x: Tensor, tokens: Tensor | None) -> tuple[str, int, int, int]:
    """Check the input (``x``, or ``tokens`` and the table ``x``): its name in messages, ``B``, ``T``
    and the first layer's input channels."""
    if tokens is None:
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"{OP}: x must be a 3-D channels-last tensor (B, T, C), got {_dims(x)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{OP}: x must be one of {FLOAT_DTYPES}, got {x.dtype}")
        return "x", *x.shape
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"{OP}: tokens must be a 2-D tensor (B, T) of token ids, got {_dims(tokens)}")
    if tokens.dtype not in TOKEN_DTYPES:
        raise TypeError(f"{OP}: tokens must be one of {TOKEN_DTYPES}, got {tokens.dtype}")
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"{OP}: table must be a 2-D embedding table (V, E), got {_dims(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: table must be one of {FLOAT_DTYPES}, got {x.dtype}")
    if tokens.device != x.device:
        raise ValueError(f"{OP}: tokens must be on the device of table ({x.device}), got {tokens.device}")
    if x.shape[0] == 0:
        raise ValueError(f"{OP}: table must have at least one row")
    return "table", *tokens.shape, x.shape[1]


def _check_projection(
    c_out: int, proj_weight: Tensor | None, proj_bias: Tensor | None, x: Tensor, ref: str
) -> ConvLayer | None:
    """The projection epilogue as a kernel-1 layer (``None`` without ``proj_weight``)."""
    if proj_weight is None:
        if proj_bias is not None:
            raise ValueError(f"{OP}: proj_bias needs proj_weight")
        return None
    if not isinstance(proj_weight, Tensor) or proj_weight.dim() != 2 or proj_weight.shape[1] != c_out:
        raise ValueError(
            f"{OP}: proj_weight must be 2-D (N, {c_out}) (the last layer has {c_out} channels), "
            f"got {getattr(proj_weight, 'shape', type(proj_weight).__name__)}"
        )
    _check_same("proj_weight", proj_weight, x.dtype, x.device, ref)
    if proj_bias is not None:
        _check_same("proj_bias", proj_bias, x.dtype, x.device, ref)
        if tuple(proj_bias.shape) != (proj_weight.shape[0],):
            raise ValueError(f"{OP}: proj_bias must have shape ({proj_weight.shape[0]},), got {tuple(proj_bias.shape)}")
    return ConvLayer(c_out, proj_weight.shape[0], 1, 1, (0, 0), 1, "none", proj_bias is not None, matmul=True)


def _check_dropout(dropout: Sequence[float] | None, seed: Tensor | None, x: Tensor, L: int, ref: str) -> tuple:
    """The per-layer rates (``()`` for none) after checking them and the seed."""
    if dropout is None or len(dropout) == 0:
        return ()
    if len(dropout) != L:
        raise ValueError(f"{OP}: dropout must have one rate per layer ({L}), got {len(dropout)}")
    rates = tuple(float(p) for p in dropout)
    for i, p in enumerate(rates):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{OP}: dropout[{i}] must lie in [0, 1], got {p}")
    if not any(rates):
        return ()
    if seed is None:
        raise ValueError(f"{OP}: dropout needs a seed (an int64 tensor of one element)")
    if not isinstance(seed, Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"{OP}: seed must be an int64 tensor of one element, got {getattr(seed, 'dtype', seed)}")
    if seed.device != x.device:
        raise ValueError(f"{OP}: seed must be on the device of {ref} ({x.device}), got {seed.device}")
    return rates


def check_conv1d_stack_args(
    x: Tensor,
    tokens: Tensor | None,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor | None],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    proj_weight: Tensor | None = None,
    proj_bias: Tensor | None = None,
    save_for_backward: bool = True,
    dropout: Sequence[float] | None = None,
    seed: Tensor | None = None,
) -> Conv1dStackCall:
    """Validate the arguments of ``conv1d_stack``; errors name the argument and what it must be
    (``x`` is called ``table`` when ``tokens`` is given). Token values are checked separately, by
    :func:`check_token_values` (reading them is a device sync)."""
    ref, B, T, c_in = _check_input(x, tokens)
    L = len(weight)
    if L == 0:
        raise ValueError(f"{OP}: weight must hold at least one layer")
    for name, seq, n in (
        ("bias", bias, L),
        ("stride", stride, L),
        ("dilation", dilation, L),
        ("padding", padding, 2 * L),
    ):
        if len(seq) != n:
            raise ValueError(f"{OP}: {name} must have {n} entries for {L} layers, got {len(seq)}")
    layers, t = [], T
    for i, act in enumerate(parse_activations(activation, L)):
        pad = (padding[2 * i], padding[2 * i + 1])
        layers.append(_check_layer(i, weight[i], bias[i], stride[i], pad, dilation[i], act, c_in, t, x, ref))
        c_in, t = layers[-1].out_channels, layers[-1].out_len(t)
    projection = _check_projection(c_in, proj_weight, proj_bias, x, ref)
    rates = _check_dropout(dropout, seed, x, L, ref)
    return Conv1dStackCall(
        B,
        T,
        tuple(layers),
        x.dtype,
        x.device,
        vocab_size=x.shape[0] if tokens is not None else 0,
        projection=projection,
        save_for_backward=bool(save_for_backward),
        dropout=rates,
    )


def check_token_values(tokens: Tensor, vocab_size: int) -> None:
    """Refuse token ids outside ``[0, vocab_size)``.

    On the CPU a ``ValueError`` naming the range. On CUDA, as ``nn.Embedding`` does there, a
    device-side assertion: reading the ids on the host would be a device sync in every forward
    (the host could no longer queue work ahead of the GPU), and a failed assertion stops the
    process's CUDA context at its next sync. Not asserted while a CUDA graph is being captured;
    the Triton kernels read out-of-range ids as zero rows, never out of bounds.
    """
    if tokens.numel() == 0:
        return
    if tokens.is_cuda:
        if not torch.cuda.is_current_stream_capturing():
            lo, hi = torch.aminmax(tokens)
            torch._assert_async((lo >= 0) & (hi < vocab_size), f"{OP}: tokens must lie in [0, {vocab_size})")
        return
    lo, hi = (int(v) for v in torch.aminmax(tokens))
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{OP}: tokens must lie in [0, {vocab_size}) (the table's rows), got ids in [{lo}, {hi}]")


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
    with backends.no_autocast(x):
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
    with backends.no_autocast(x):
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
