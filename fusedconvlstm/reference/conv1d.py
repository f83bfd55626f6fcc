"""Reference backend of ``conv1d_stack``: ``F.conv1d`` layer by layer, on any device.

Half-precision inputs are computed in float32 and rounded back once at the end. The backward
recomputes the forward and applies ``torch.nn.grad.conv1d_input`` / ``conv1d_weight`` layer by
layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedconvlstm import backends
from fusedconvlstm.ops.conv1d import OP, Conv1dStackCall

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


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layers_forward(x: Tensor, weight: list[Tensor], bias: list[Tensor | None], call: Conv1dStackCall):
    """Run the stack in the accumulation dtype on channels-first data, keeping each layer's padded
    input and pre-activation for the backward."""
    acc = _acc_dtype(x.dtype)
    h = x.to(acc).transpose(1, 2)
    kept = []
    for layer, w, b in zip(call.layers, weight, bias):
        padded = F.pad(h, layer.padding)
        z = F.conv1d(padded, w.to(acc), None if b is None else b.to(acc), stride=layer.stride, dilation=layer.dilation)
        kept.append((padded, z))
        h = apply_activation(z, layer.activation)
    return h, kept


def conv1d_stack_reference(x: Tensor, weight: list[Tensor], bias: list[Tensor | None], call: Conv1dStackCall) -> Tensor:
    """The stack on channels-last ``x`` ``(B, T, C)``, returning contiguous ``(B, T_out, C_out)``."""
    h, _ = _layers_forward(x, weight, bias, call)
    return h.transpose(1, 2).to(x.dtype).contiguous()


def conv1d_stack_reference_backward(
    grad_y: Tensor, x: Tensor, weight: list[Tensor], bias: list[Tensor | None], call: Conv1dStackCall
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Gradients of the stack written out with ``torch.nn.grad`` (op implementations run below
    autograd, so they cannot call it): ``(grad_x, grad_weight, grad_bias of present biases)``."""
    acc = _acc_dtype(x.dtype)
    _, kept = _layers_forward(x, weight, bias, call)
    g = grad_y.to(acc).transpose(1, 2)
    grad_w: list[Tensor] = []
    grad_b: list[Tensor] = []
    for layer, w, b, (padded, z) in reversed(list(zip(call.layers, weight, bias, kept))):
        gz = g * activation_grad(z, layer.activation)
        w_acc = w.to(acc)
        grad_w.append(
            torch.nn.grad.conv1d_weight(padded, w.shape, gz, stride=layer.stride, dilation=layer.dilation).to(w.dtype)
        )
        if b is not None:
            grad_b.append(gz.sum(dim=(0, 2)).to(b.dtype))
        g_padded = torch.nn.grad.conv1d_input(padded.shape, w_acc, gz, stride=layer.stride, dilation=layer.dilation)
        g = g_padded[:, :, layer.padding[0] : g_padded.shape[2] - layer.padding[1]]
    return g.transpose(1, 2).to(x.dtype).contiguous(), grad_w[::-1], grad_b[::-1]


def _forward(x, weight, bias, call):
    return conv1d_stack_reference(x, weight, bias, call), []


def _backward(grad_y, x, weight, bias, saved, call):
    return conv1d_stack_reference_backward(grad_y, x, weight, bias, call)


backends.register_implementation(
    OP,
    "reference",
    why_not=lambda call: None,
    forward=_forward,
    backward=_backward,
    saved_shapes=lambda call: [],
)
