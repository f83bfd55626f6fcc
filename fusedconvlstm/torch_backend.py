"""The ``torch`` backend: PyTorch's own kernels (cuDNN on NVIDIA GPUs, oneDNN / MKL on the CPU).

It is what ``backend="auto"`` runs wherever no validation record enables a hand-written kernel
(:func:`fusedconvlstm.backends.auto_choice`), and what the package's modules are measured against.

**At the module level** (what the modules call when the dispatcher answers ``"torch"``, see
:func:`fusedconvlstm.backends.module_backend`):

- :func:`lstm` runs ``torch._VF.lstm`` with a module's own flat weights, as ``nn.LSTM.forward``
  does (packed and padded input, bidirectional, layers, ``proj_size``, and ``nn.LSTM``'s
  inter-layer dropout drawn from PyTorch's generator): the results are ``nn.LSTM``'s, bit for bit.
- :func:`conv_chain` runs the stack as a chain of ``F.conv1d`` (channels-first, as ``nn.Conv1d``)
  with the stack's activations, and its dropout between layers with the package's counter-based
  masks (:mod:`fusedconvlstm.numerics.dropout`, the masks every backend draws for one seed);
  autograd differentiates it, so the backward is aten's too.

**At the op level** (``conv1d_stack(..., backend="torch")``, ``lstm_recurrence(...)``):

- ``conv1d_stack`` is ``F.embedding`` (the embedding prologue), the ``F.conv1d`` chain and
  ``F.linear`` (the projection epilogue) in the data's dtype, and its backward aten's convolution
  and GEMM gradients (``torch.nn.grad``), recomputing the forward.
- ``lstm_recurrence`` takes precomputed gate pre-activations, which no aten kernel does (cuDNN
  and oneDNN take the input and ``W_ih``): a call of the op itself runs step by step on aten ops
  (the reference's formulation, halves computed in float32). The modules never take that path
  under ``torch``: they hold the input and every weight and call :func:`lstm`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from fusedconvlstm import backends
from fusedconvlstm.calls import conv1d as conv_call
from fusedconvlstm.calls import lstm as lstm_call
from fusedconvlstm.numerics import dropout as philox_dropout
from fusedconvlstm.reference import conv1d as reference_conv1d
from fusedconvlstm.reference import lstm as reference_lstm

# --- module level --------------------------------------------------------------------------------


def lstm(
    input: Tensor | PackedSequence,  # noqa: A002
    hx: tuple[Tensor, Tensor],
    flat_weights: Sequence[Tensor],
    *,
    bias: bool,
    num_layers: int,
    dropout: float,
    training: bool,
    bidirectional: bool,
    batch_first: bool,
) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
    """``nn.LSTM.forward`` on ``input`` with ``flat_weights`` (``nn.LSTM``'s ``_flat_weights``
    order: per layer and direction ``w_ih, w_hh[, b_ih, b_hh][, w_hr]``).

    ``hx``: ``(h_0, c_0)``, batched (``(L·D, B, ·)``) and in the caller's batch order (for packed
    input the original order, as ``nn.LSTM`` takes it). Batched or packed input only; the module
    adds and removes the batch dimension of unbatched input.
    """
    h0, c0 = hx
    weights = list(flat_weights)
    if isinstance(input, PackedSequence):
        data, batch_sizes, sorted_indices, unsorted_indices = input
        if sorted_indices is not None:
            h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)
        out, h_n, c_n = torch._VF.lstm(
            data, batch_sizes, (h0, c0), weights, bias, num_layers, float(dropout), training, bidirectional
        )
        if unsorted_indices is not None:
            h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
        return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)
    out, h_n, c_n = torch._VF.lstm(
        input, (h0, c0), weights, bias, num_layers, float(dropout), training, bidirectional, batch_first
    )
    return out, (h_n, c_n)


def conv_chain(
    x: Tensor,
    weight: Sequence[Tensor],
    bias: Sequence[Tensor | None],
    stride: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilation: Sequence[int],
    activation: Sequence[str],
    dropout: Sequence[float] | None = None,
    seed: Tensor | None = None,
) -> Tensor:
    """The stack on channels-first ``x`` ``(B, C, T)`` as ``nn.Conv1d`` layers compute it,
    differentiable by autograd; returns ``(B, C_out, T_out)``.

    ``dropout[i]`` (training) is the rate on layer ``i``'s input, its mask the counter-based
    one of level ``i`` of ``seed`` over the channels-last ``(B, T, C)`` positions, as the op
    draws it (:mod:`fusedconvlstm.numerics.dropout`).
    """
    h = x
    for i, (w, b, s, (left, right), d, act) in enumerate(zip(weight, bias, stride, padding, dilation, activation)):
        p = dropout[i] if dropout else 0.0
        if p > 0:
            B, C, T = h.shape
            keep = philox_dropout.keep_mask(seed, i, (B, T, C), min(p, 1.0)).transpose(1, 2)
            h = h * (keep.to(h.dtype) * philox_dropout.scale(p))
        if left == right:  # nn.Conv1d's symmetric padding: the same aten call
            h = F.conv1d(h, w, b, stride=s, padding=left, dilation=d)
        else:
            h = F.conv1d(F.pad(h, (left, right)), w, b, stride=s, dilation=d)
        h = reference_conv1d.apply_activation(h, act)
    return h


# --- op level ------------------------------------------------------------------------------------


def _conv_forward(x, tokens, weight, bias, proj_weight, proj_bias, seed, call):
    y = reference_conv1d.conv1d_stack_reference(
        x, tokens, weight, bias, proj_weight, proj_bias, call, seed, acc=x.dtype
    )
    return y, []


def _conv_backward(grad_y, x, tokens, weight, bias, proj_weight, proj_bias, seed, saved, call):
    return reference_conv1d.conv1d_stack_reference_backward(
        grad_y, x, tokens, weight, bias, proj_weight, proj_bias, call, seed, acc=x.dtype
    )


def _conv_describe(call) -> str:
    return "torch's F.conv1d chain (cuDNN / oneDNN) in the data's dtype, F.embedding and F.linear around it"


backends.register_implementation(
    conv_call.OP,
    backends.TORCH,
    why_not=lambda call: None,
    forward=_conv_forward,
    backward=_conv_backward,
    saved_shapes=lambda call: [],
    describe=_conv_describe,
)


def _lstm_describe(call) -> str:
    return (
        "torch.lstm (cuDNN / oneDNN) with the module's own weights where a module holds them "
        "(fusedconvlstm.LSTM, ParallelLSTM, ConvLSTMClassifier); a call of the gate-level op itself "
        "runs step by step on aten ops (no aten kernel takes precomputed gates)"
    )


backends.register_implementation(
    lstm_call.OP,
    backends.TORCH,
    why_not=lambda call: None,
    forward=reference_lstm._forward,
    backward=reference_lstm._backward,
    workspace_shape=reference_lstm._workspace_shape,
    describe=_lstm_describe,
)
