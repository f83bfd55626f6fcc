"""The Conv1d stack op: schema, argument checks, fake implementation and autograd.

``fusedconvlstm::conv1d_stack`` applies ``L`` dense 1-D convolutions one after the other to
channels-last input ``x`` of shape ``(B, T, C_in)`` and returns ``(B, T_out, C_out)``
(contiguous). Layer ``i`` has an ``nn.Conv1d``-shaped weight ``(C_out_i, C_in_i, k_i)``, an
optional bias, a stride, zero padding ``(left, right)``, a dilation, and an activation applied
after it (``none``, ``relu``, ``gelu`` (erf), ``silu``, ``tanh``).

The op also returns a list of tensors the backend saves for its backward (empty for the
reference, which recomputes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fusedconvlstm import backends

OP = "conv1d_stack"
ACTIVATIONS = ("none", "relu", "gelu", "silu", "tanh")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

backends.register_op(OP, auto_order={"cuda": ("triton",), "cpu": ()})


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

    def out_len(self, t_in: int) -> int:
        """Output length for input length ``t_in`` (``nn.Conv1d``'s formula)."""
        span = self.dilation * (self.kernel_size - 1) + 1
        return (t_in + self.padding[0] + self.padding[1] - span) // self.stride + 1


@dataclass(frozen=True)
class Conv1dStackCall:
    """What a backend needs to know to decide whether it can serve a stack call."""

    batch: int
    seq_len: int
    layers: tuple[ConvLayer, ...]
    dtype: torch.dtype
    device: torch.device

    def out_lens(self) -> list[int]:
        """Sequence length after each layer."""
        lens, t = [], self.seq_len
        for layer in self.layers:
            t = layer.out_len(t)
            lens.append(t)
        return lens


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


def check_conv1d_stack_args(
    x: Tensor,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor | None],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
) -> Conv1dStackCall:
    """Validate the arguments of ``conv1d_stack``; errors name the argument and what it must be."""
    op = "conv1d_stack"
    if not isinstance(x, Tensor) or x.dim() != 3:
        got = f"{x.dim()}-D" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a 3-D channels-last tensor (B, T, C), got {got}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be one of {FLOAT_DTYPES}, got {x.dtype}")
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
    B, T, c_in = x.shape
    layers = []
    t = T
    for i in range(L):
        w = weight[i]
        if not isinstance(w, Tensor) or w.dim() != 3:
            raise ValueError(f"{op}: weight[{i}] must be a 3-D tensor (C_out, C_in, k), got {getattr(w, 'shape', w)}")
        if w.shape[1] != c_in:
            where = "x.shape[2]" if i == 0 else f"weight[{i - 1}].shape[0]"
            raise ValueError(f"{op}: weight[{i}].shape[1] must equal {where} = {c_in}, got {w.shape[1]}")
        for name, t_ in ((f"weight[{i}]", w), (f"bias[{i}]", bias[i])):
            if t_ is None:
                continue
            if t_.dtype != x.dtype:
                raise TypeError(f"{op}: {name} must have the dtype of x ({x.dtype}), got {t_.dtype}")
            if t_.device != x.device:
                raise ValueError(f"{op}: {name} must be on the device of x ({x.device}), got {t_.device}")
        if bias[i] is not None and tuple(bias[i].shape) != (w.shape[0],):
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
                f"receptive field {layer.dilation * (layer.kernel_size - 1) + 1}; x is too short"
            )
        layers.append(layer)
        c_in, t = w.shape[0], t_out
    return Conv1dStackCall(batch=B, seq_len=T, layers=tuple(layers), dtype=x.dtype, device=x.device)


def _resolve(backend: str, call: Conv1dStackCall) -> backends.Implementation:
    return backends.resolve(OP, backend, call, call.device)


def _expand_bias(bias: Sequence[Tensor], has_bias: Sequence[bool]) -> list[Tensor | None]:
    """Per-layer biases (``None`` where a layer has none) from the op's present-only list."""
    if sum(bool(h) for h in has_bias) != len(bias):
        raise ValueError(
            f"conv1d_stack: bias holds {len(bias)} tensors but has_bias marks {sum(bool(h) for h in has_bias)} layers"
        )
    it = iter(bias)
    return [next(it) if h else None for h in has_bias]


# Biases travel as the list of present ones plus a per-layer flag: autograd of custom ops treats a
# list holding None (``Tensor?[]``) as an opaque leaf and would drop the bias gradients.
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
) -> tuple[Tensor, list[Tensor]]:
    per_layer = _expand_bias(bias, has_bias)
    call = check_conv1d_stack_args(x, weight, per_layer, stride, padding, dilation, activation)
    with backends.no_autocast(x):
        return _resolve(backend, call).forward(x, list(weight), per_layer, call)


@_conv1d_stack_op.register_fake
def _(x, weight, bias, has_bias, stride, padding, dilation, activation, backend):
    call = check_conv1d_stack_args(x, weight, _expand_bias(bias, has_bias), stride, padding, dilation, activation)
    impl = _resolve(backend, call)
    y = x.new_empty(call.batch, call.out_lens()[-1], call.layers[-1].out_channels)
    return y, [x.new_empty(shape, dtype=dtype) for shape, dtype in impl.saved_shapes(call)]


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
        return _resolve(backend, call).backward(grad_y, x, list(weight), per_layer, list(saved), call)


@_conv1d_stack_backward_op.register_fake
def _(grad_y, x, weight, bias, has_bias, stride, padding, dilation, activation, saved, backend):
    return torch.empty_like(x), [torch.empty_like(w) for w in weight], [torch.empty_like(b) for b in bias]


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, has_bias, stride, padding, dilation, activation, backend = inputs
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
    return grad_x, grad_w, grad_b, None, None, None, None, None, None


_conv1d_stack_op.register_autograd(_backward, setup_context=_setup_context)


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
    L = len(weight)
    bias = list(bias) if bias is not None else [None] * L
    stride = list(stride) if stride is not None else [1] * L
    dilation = list(dilation) if dilation is not None else [1] * L
    pads = list(padding) if padding is not None else [(0, 0)] * L
    if len(pads) != L:
        raise ValueError(f"conv1d_stack: padding must have one (left, right) pair per layer ({L}), got {len(pads)}")
    flat_padding = [int(p) for pair in pads for p in pair]
    act = ",".join(activation) if activation is not None else ",".join(["none"] * L)
    call = check_conv1d_stack_args(x, weight, bias, stride, flat_padding, dilation, act)
    impl = _resolve(backend, call)
    present = [b for b in bias if b is not None]
    has_bias = [b is not None for b in bias]
    y, _ = _conv1d_stack_op(x, list(weight), present, has_bias, stride, flat_padding, dilation, act, impl.backend)
    return y
