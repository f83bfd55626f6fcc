"""Reference backend of the Conv1d stack op: ``F.conv1d`` layer by layer, on any device.

Half-precision inputs are computed in float32 and rounded back once at the end. The backward
recomputes the forward and applies ``torch.nn.grad.conv1d_input`` / ``conv1d_weight`` layer by
layer. The embedding prologue is ``F.embedding`` (its backward an ``index_add_``); the projection
epilogue is ``F.linear``. Dropout multiplies a layer's input by the keep-mask of
:mod:`fusedconvlstm.numerics.dropout` (the same masks as the fused backends) and ``1 / (1 − p)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedconvlstm import backends
from fusedconvlstm.calls.conv1d import OP, Conv1dStackCall
from fusedconvlstm.numerics import dropout as philox_dropout
from fusedconvlstm.numerics.precision import accumulation_dtype

_ACTIVATIONS = {
    "none": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def apply_activation(x: Tensor, name: str) -> Tensor:
    """Apply the activation called ``name`` (one of ``ACTIVATIONS``)."""
    return _ACTIVATIONS[name](x)


def activation_grad(z: Tensor, name: str) -> Tensor:
    """Derivative of the activation called ``name`` at the pre-activation ``z``."""
    if name == "none":
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "gelu":
        return 0.5 * (1 + torch.erf(z * 0.5**0.5)) + z * torch.exp(-0.5 * z * z) * (2 * math.pi) ** -0.5
    if name == "silu":
        sig = torch.sigmoid(z)
        return sig * (1 + z * (1 - sig))
    if name == "tanh":
        return 1 - torch.tanh(z) ** 2
    raise ValueError(f"unknown activation {name!r}")


def dropout_factors(seed: Tensor | None, call: Conv1dStackCall, dtype: torch.dtype) -> list[Tensor | None]:
    """Per layer, ``keep-mask / (1 − p)`` of its input, channels-first ``(B, C, T)`` in ``dtype``
    (``None`` without dropout there)."""
    factors: list[Tensor | None] = [None] * len(call.layers)
    lens = [call.seq_len] + call.out_lens()
    for level, p in call.dropout_levels():
        shape = (call.batch, lens[level], call.layers[level].in_channels)
        keep = philox_dropout.keep_mask(seed, level, shape, p)
        factors[level] = (keep.to(dtype) * philox_dropout.scale(p)).transpose(1, 2)
    return factors


def _layers_forward(h: Tensor, weight: list[Tensor], bias: list[Tensor | None], call: Conv1dStackCall, factors):
    """Run the stack on channels-first ``h`` (already in the accumulation dtype), keeping each
    layer's padded input and pre-activation for the backward; ``factors`` from
    :func:`dropout_factors`."""
    acc = h.dtype
    kept = []
    for layer, w, b, f in zip(call.layers, weight, bias, factors):
        if f is not None:
            h = h * f
        padded = F.pad(h, layer.padding)
        z = F.conv1d(padded, w.to(acc), None if b is None else b.to(acc), stride=layer.stride, dilation=layer.dilation)
        kept.append((padded, z))
        h = apply_activation(z, layer.activation)
    return h, kept


def _stack_input(x: Tensor, tokens: Tensor | None, acc: torch.dtype) -> Tensor:
    """The first layer's input, channels-first in ``acc``: ``x``, or with ``tokens`` the table
    ``x``'s rows."""
    h = F.embedding(tokens.long(), x) if tokens is not None else x
    return h.to(acc).transpose(1, 2)


def _layers_backward(g: Tensor, weight: list[Tensor], bias: list[Tensor | None], kept, call: Conv1dStackCall, factors):
    """Back through the layers from ``g`` (channels-first, accumulation dtype): the input's gradient
    (channels-first, accumulation dtype), the weights' and the present biases' gradients."""
    acc = g.dtype
    grad_w: list[Tensor] = []
    grad_b: list[Tensor] = []
    for layer, w, b, (padded, z), f in reversed(list(zip(call.layers, weight, bias, kept, factors))):
        gz = g * activation_grad(z, layer.activation)
        grad_w.append(
            torch.nn.grad.conv1d_weight(padded, w.shape, gz, stride=layer.stride, dilation=layer.dilation).to(w.dtype)
        )
        if b is not None:
            grad_b.append(gz.sum(dim=(0, 2)).to(b.dtype))
        g_padded = torch.nn.grad.conv1d_input(padded.shape, w.to(acc), gz, stride=layer.stride, dilation=layer.dilation)
        g = g_padded[:, :, layer.padding[0] : g_padded.shape[2] - layer.padding[1]]
        if f is not None:
            g = g * f
    return g, grad_w[::-1], grad_b[::-1]


def conv1d_stack_reference(
    x: Tensor,
    tokens: Tensor | None,
    weight: list[Tensor],
    bias: list[Tensor | None],
    proj_weight: Tensor | None,
    proj_bias: Tensor | None,
    call: Conv1dStackCall,
    seed: Tensor | None = None,
    acc: torch.dtype | None = None,
) -> Tensor:
    """The stack on channels-last ``x`` ``(B, T, C)`` (or on ``x[tokens]``), contiguous
    ``(B, T_out, C_out)``; with ``proj_weight``, ``h @ proj_weightᵀ + proj_bias`` time-major
    ``(T_out, B, N)``. Computed in ``acc`` (default: float32 for 16-bit data, else its dtype)."""
    acc = acc or accumulation_dtype(x.dtype)
    factors = dropout_factors(seed, call, acc)
    h, _ = _layers_forward(_stack_input(x, tokens, acc), weight, bias, call, factors)
    if proj_weight is None:
        return h.transpose(1, 2).to(x.dtype).contiguous()
    acc = h.dtype
    gates = F.linear(h.permute(2, 0, 1), proj_weight.to(acc), None if proj_bias is None else proj_bias.to(acc))
    return gates.to(x.dtype).contiguous()


def conv1d_stack_reference_backward(
    grad_y: Tensor,
    x: Tensor,
    tokens: Tensor | None,
    weight: list[Tensor],
    bias: list[Tensor | None],
    proj_weight: Tensor | None,
    proj_bias: Tensor | None,
    call: Conv1dStackCall,
    seed: Tensor | None = None,
    acc: torch.dtype | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor | None, Tensor | None]:
    """Gradients of the stack written out with ``torch.nn.grad`` (op implementations run below
    autograd, so they cannot call it): ``(grad_x, grad_weight, grad_bias of present biases,
    grad_proj_weight or None, grad_proj_bias or None)``. With ``tokens``, ``grad_x`` is the
    table's: the embedding's gradient summed over every position holding the same id. Computed in
    ``acc`` as the forward."""
    acc = acc or accumulation_dtype(x.dtype)
    factors = dropout_factors(seed, call, acc)
    h, kept = _layers_forward(_stack_input(x, tokens, acc), weight, bias, call, factors)
    acc = h.dtype
    g = grad_y.to(acc)
    grad_pw = grad_pb = None
    if proj_weight is None:
        g_h = g.transpose(1, 2)
    else:  # g is (T, B, N), h (B, C, T)
        grad_pw = torch.einsum("tbn,bct->nc", g, h).to(proj_weight.dtype)
        grad_pb = None if proj_bias is None else g.sum(dim=(0, 1)).to(proj_bias.dtype)
        g_h = (g @ proj_weight.to(acc)).permute(1, 2, 0)
    g, grad_w, grad_b = _layers_backward(g_h, weight, bias, kept, call, factors)
    g = g.transpose(1, 2)  # (B, T, C_in)
    if tokens is not None:
        g = torch.zeros(x.shape, dtype=acc, device=x.device).index_add_(
            0, tokens.reshape(-1).long(), g.reshape(-1, x.shape[1])
        )
    return g.to(x.dtype).contiguous(), grad_w, grad_b, grad_pw, grad_pb


def _forward(x, tokens, weight, bias, proj_weight, proj_bias, seed, call):
    return conv1d_stack_reference(x, tokens, weight, bias, proj_weight, proj_bias, call, seed), []


def _backward(grad_y, x, tokens, weight, bias, proj_weight, proj_bias, seed, saved, call):
    return conv1d_stack_reference_backward(grad_y, x, tokens, weight, bias, proj_weight, proj_bias, call, seed)


backends.register_implementation(
    OP, "reference", why_not=lambda call: None, forward=_forward, backward=_backward, saved_shapes=lambda call: []
)
