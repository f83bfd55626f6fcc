"""The Conv1d stack op's call: what a backend needs to know about it, and the argument checks.

:mod:`fusedconvlstm.ops.conv1d` documents the op; backends receive a :class:`Conv1dStackCall`
(the checked arguments' shapes and options) and decide from it whether they can serve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

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


@runtime_checkable
class Conv1dStackBackend(Protocol):
    """What a backend provides for ``conv1d_stack`` (checked when it registers).

    ``why_not(call)`` is ``None`` where it can serve ``call``, else why not. ``forward(x, tokens,
    weight, bias, proj_weight, proj_bias, seed, call) -> (y, saved)``, ``backward(grad_y, x,
    tokens, weight, bias, proj_weight, proj_bias, seed, saved, call) -> (grad_x, grad_weight list,
    grad_bias list, grad_proj_weight, grad_proj_bias)`` and ``saved_shapes(call)``. Optional:
    ``describe(call)`` (how it would serve, for ``explain(detail=True)``).
    """

    op: str
    backend: str

    def why_not(self, call: Conv1dStackCall) -> str | None: ...
    def forward(self, *args): ...
    def backward(self, *args): ...
    def saved_shapes(self, call: Conv1dStackCall): ...
