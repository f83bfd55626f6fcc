"""Reference backend of the Conv1d stack ops: ``F.conv1d`` layer by layer, on any device.

Half-precision inputs are computed in float32 and rounded back once at the end. The backward
recomputes the forward and applies ``torch.nn.grad.conv1d_input`` / ``conv1d_weight`` layer by
layer. The embedding prologue is ``F.embedding``; the projection epilogue is ``F.linear``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedconvlstm import backends
from fusedconvlstm.ops.conv1d import OP, OP_EMBEDDING, OP_PROJECTION, Conv1dStackCall

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


def _layers_forward(h: Tensor, weight: list[Tensor], bias: list[Tensor | None], call: Conv1dStackCall):
    """Run the stack on channels-first ``h`` (already in the accumulation dtype), keeping each
    layer's padded input and pre-activation for the backward."""
    acc = h.dtype
    kept = []
    for layer, w, b in zip(call.layers, weight, bias):
        padded = F.pad(h, layer.padding)
        z = F.conv1d(padded, w.to(acc), None if b is None else b.to(acc), stride=layer.stride, dilation=layer.dilation)
        kept.append((padded, z))
        h = apply_activation(z, layer.activation)
    return h, kept


def _channels_first(x: Tensor) -> Tensor:
    return x.to(_acc_dtype(x.dtype)).transpose(1, 2)


def conv1d_stack_reference(x: Tensor, weight: list[Tensor], bias: list[Tensor | None], call: Conv1dStackCall) -> Tensor:
    """The stack on channels-last ``x`` ``(B, T, C)``, returning contiguous ``(B, T_out, C_out)``."""
    h, _ = _layers_forward(_channels_first(x), weight, bias, call)
    return h.transpose(1, 2).to(x.dtype).contiguous()


def _layers_backward(g: Tensor, weight: list[Tensor], bias: list[Tensor | None], kept, call: Conv1dStackCall):
    """Back through the layers from ``g`` (channels-first, accumulation dtype): the input's gradient
    (channels-first, accumulation dtype), the weights' and the present biases' gradients."""
    acc = g.dtype
    grad_w: list[Tensor] = []
    grad_b: list[Tensor] = []
    for layer, w, b, (padded, z) in reversed(list(zip(call.layers, weight, bias, kept))):
        gz = g * activation_grad(z, layer.activation)
        grad_w.append(
            torch.nn.grad.conv1d_weight(padded, w.shape, gz, stride=layer.stride, dilation=layer.dilation).to(w.dtype)
        )
        if b is not None:
            grad_b.append(gz.sum(dim=(0, 2)).to(b.dtype))
        g_padded = torch.nn.grad.conv1d_input(padded.shape, w.to(acc), gz, stride=layer.stride, dilation=layer.dilation)
        g = g_padded[:, :, layer.padding[0] : g_padded.shape[2] - layer.padding[1]]
    return g, grad_w[::-1], grad_b[::-1]


def conv1d_stack_reference_backward(
    grad_y: Tensor, x: Tensor, weight: list[Tensor], bias: list[Tensor | None], call: Conv1dStackCall
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Gradients of the stack written out with ``torch.nn.grad`` (op implementations run below
    autograd, so they cannot call it): ``(grad_x, grad_weight, grad_bias of present biases)``."""
    _, kept = _layers_forward(_channels_first(x), weight, bias, call)
    g, grad_w, grad_b = _layers_backward(grad_y.to(kept[0][1].dtype).transpose(1, 2), weight, bias, kept, call)
    return g.transpose(1, 2).to(x.dtype).contiguous(), grad_w, grad_b


def conv1d_stack_embedding_reference(
    tokens: Tensor, table: Tensor, weight: list[Tensor], bias: list[Tensor | None], call: Conv1dStackCall
) -> Tensor:
    """``conv1d_stack_reference(F.embedding(tokens, table), ...)``: ``(B, T_out, C_out)``."""
    h, _ = _layers_forward(_channels_first(F.embedding(tokens.long(), table)), weight, bias, call)
    return h.transpose(1, 2).to(table.dtype).contiguous()


def conv1d_stack_embedding_reference_backward(
    grad_y: Tensor, tokens: Tensor, table: Tensor, weight: list[Tensor], bias: list[Tensor | None], call
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``(grad_table, grad_weight, grad_bias of present biases)``; the table's gradient sums the
    embedding's gradient over every position holding the same id."""
    _, kept = _layers_forward(_channels_first(F.embedding(tokens.long(), table)), weight, bias, call)
    g, grad_w, grad_b = _layers_backward(grad_y.to(kept[0][1].dtype).transpose(1, 2), weight, bias, kept, call)
    grad_table = torch.zeros(table.shape, dtype=g.dtype, device=g.device)
    grad_table.index_add_(0, tokens.reshape(-1).long(), g.transpose(1, 2).reshape(-1, table.shape[1]))
    return grad_table.to(table.dtype), grad_w, grad_b


def conv1d_stack_projection_reference(
    x: Tensor,
    weight: list[Tensor],
    bias: list[Tensor | None],
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    call: Conv1dStackCall,
) -> Tensor:
    """The stack then ``h @ proj_weightᵀ + proj_bias``, returned time-major ``(T_out, B, N)``."""
    h, _ = _layers_forward(_channels_first(x), weight, bias, call)
    acc = h.dtype
    gates = F.linear(h.permute(2, 0, 1), proj_weight.to(acc), None if proj_bias is None else proj_bias.to(acc))
    return gates.to(x.dtype).contiguous()


def conv1d_stack_projection_reference_backward(
    grad_gates: Tensor,
    x: Tensor,
    weight: list[Tensor],
    bias: list[Tensor | None],
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    call: Conv1dStackCall,
):
    """``(grad_x, grad_weight, grad_bias of present biases, grad_proj_weight, grad_proj_bias or None)``."""
    h, kept = _layers_forward(_channels_first(x), weight, bias, call)
    acc = h.dtype
    gg = grad_gates.to(acc)  # (T, B, N)
    h_tb = h.permute(2, 0, 1)  # (T, B, C)
    grad_pw = torch.einsum("tbn,tbc->nc", gg, h_tb).to(proj_weight.dtype)
    grad_pb = None if proj_bias is None else gg.sum(dim=(0, 1)).to(proj_bias.dtype)
    g_h = (gg @ proj_weight.to(acc)).permute(1, 2, 0)  # (B, C, T)
    g, grad_w, grad_b = _layers_backward(g_h, weight, bias, kept, call)
    return g.transpose(1, 2).to(x.dtype).contiguous(), grad_w, grad_b, grad_pw, grad_pb


def _forward(x, weight, bias, call):
    return conv1d_stack_reference(x, weight, bias, call), []


def _backward(grad_y, x, weight, bias, saved, call):
    return conv1d_stack_reference_backward(grad_y, x, weight, bias, call)


def _embedding_forward(tokens, table, weight, bias, call):
    return conv1d_stack_embedding_reference(tokens, table, weight, bias, call), []


def _embedding_backward(grad_y, tokens, table, weight, bias, saved, call):
    return conv1d_stack_embedding_reference_backward(grad_y, tokens, table, weight, bias, call)


def _projection_forward(x, weight, bias, proj_weight, proj_bias, call):
    return conv1d_stack_projection_reference(x, weight, bias, proj_weight, proj_bias, call), []


def _projection_backward(grad_gates, x, weight, bias, proj_weight, proj_bias, saved, call):
    return conv1d_stack_projection_reference_backward(grad_gates, x, weight, bias, proj_weight, proj_bias, call)


for _op, _fns in (
    (OP, (_forward, _backward)),
    (OP_EMBEDDING, (_embedding_forward, _embedding_backward)),
    (OP_PROJECTION, (_projection_forward, _projection_backward)),
):
    backends.register_implementation(
        _op, "reference", why_not=lambda call: None, forward=_fns[0], backward=_fns[1], saved_shapes=lambda call: []
    )
