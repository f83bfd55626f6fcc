"""Reference backend of ``conv1d_stack``: ``F.conv1d`` layer by layer, on any device.

Half-precision inputs are computed in float32 and rounded back once at the end. The backward
differentiates the same computation with autograd (recomputing the forward).
"""

from __future__ import annotations

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


def conv1d_stack_reference(x: Tensor, weight: list[Tensor], bias: list[Tensor | None], call: Conv1dStackCall) -> Tensor:
    """The stack on channels-last ``x`` ``(B, T, C)``, returning contiguous ``(B, T_out, C_out)``."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(acc).transpose(1, 2)
    for layer, w, b in zip(call.layers, weight, bias):
        h = F.pad(h, layer.padding)
        h = F.conv1d(h, w.to(acc), None if b is None else b.to(acc), stride=layer.stride, dilation=layer.dilation)
        h = apply_activation(h, layer.activation)
    return h.transpose(1, 2).to(x.dtype).contiguous()


def _forward(x, weight, bias, call):
    return conv1d_stack_reference(x, weight, bias, call), []


def _backward(grad_y, x, weight, bias, saved, call):
    present = [b for b in bias if b is not None]
    inputs = [t.detach().requires_grad_() for t in (x, *weight, *present)]
    x_, *rest = inputs
    w_ = rest[: len(weight)]
    it = iter(rest[len(weight) :])
    b_ = [next(it) if b is not None else None for b in bias]
    with torch.enable_grad():
        y = conv1d_stack_reference(x_, w_, b_, call)
        grads = torch.autograd.grad(y, inputs, grad_y)
    return grads[0], list(grads[1 : 1 + len(weight)]), list(grads[1 + len(weight) :])


backends.register_implementation(
    OP,
    "reference",
    why_not=lambda call: None,
    forward=_forward,
    backward=_backward,
    saved_shapes=lambda call: [],
)
