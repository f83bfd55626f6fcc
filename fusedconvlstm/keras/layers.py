"""Single Keras layers as this package's modules: an :class:`~fusedconvlstm.LSTM` from a Keras
LSTM's ``get_weights()`` and a :class:`~fusedconvlstm.Conv1dStack` from Conv1D layers'.

No file is read here (no h5py); the arrays may come from Keras itself or from anywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fusedconvlstm.keras.errors import KerasImportError
from fusedconvlstm.keras.layouts import (
    as_tensor,
    check_recurrent_activation,
    conv1d_weight_from_keras,
    lstm_weights_from_keras,
)
from fusedconvlstm.nn import LSTM, Conv1dStack

_KERAS_PADDING = ("valid", "same", "causal")
_KERAS_ACTIVATIONS = {"linear": "none", None: "none", "relu": "relu", "tanh": "tanh", "swish": "silu", "silu": "silu"}


def lstm_from_keras_weights(
    weights: Sequence[Any],
    layout: str = "auto",
    recurrent_activation: str = "sigmoid",
    batch_first: bool = True,
    backend: str = "auto",
    device=None,
    dtype=None,
) -> LSTM:
    """An LSTM holding a Keras LSTM layer's weights (``layer.get_weights()``:
    ``[kernel, recurrent_kernel, bias]``).

    ``layout``: ``"cudnn"`` for Keras 2 ``CuDNNLSTM`` (bias ``(8H,)``), ``"standard"`` for
    Keras ``LSTM``, ``"auto"`` to tell them by the bias. A ``recurrent_activation`` other than
    ``"sigmoid"`` is refused. ``batch_first`` defaults to Keras's ``(B, T, C)``. See
    :mod:`fusedconvlstm.keras.layouts` for the layouts.
    """
    weights = list(weights)
    if len(weights) not in (2, 3):
        raise KerasImportError(
            f"lstm_from_keras_weights: weights must be [kernel, recurrent_kernel] or [kernel, recurrent_kernel, "
            f"bias] (a Keras layer's get_weights()), got {len(weights)} arrays"
        )
    check_recurrent_activation(recurrent_activation, "lstm_from_keras_weights")
    params = lstm_weights_from_keras(*weights, layout=layout)
    D, H = params["weight_ih_l0"].shape[1], params["weight_hh_l0"].shape[1]
    module = LSTM(
        D, H, bias="bias_ih_l0" in params, batch_first=batch_first, backend=backend, device=device, dtype=dtype
    )
    module.load_state_dict(params)
    return module


def conv1d_stack_from_keras_weights(
    weights: Sequence[Sequence[Any]],
    strides: int | Sequence[int] = 1,
    padding: str | Sequence[str] = "valid",
    dilation: int | Sequence[int] = 1,
    activation: str | Sequence[str] = "linear",
    channels_last: bool = True,
    backend: str = "auto",
    device=None,
    dtype=None,
) -> Conv1dStack:
    """A stack holding Keras Conv1D layers' weights: ``weights[i]`` is layer ``i``'s
    ``get_weights()`` (``[kernel (k, in, out)]`` or ``[kernel, bias]``).

    ``strides``, ``padding`` (``"valid"``, ``"same"``, ``"causal"``), ``dilation`` and
    ``activation`` (Keras names: ``"linear"``, ``"relu"``, ``"tanh"``, ``"swish"``) are the
    layers' Keras arguments, one value for all or one per layer. ``channels_last`` defaults to
    Keras's ``(B, T, C)``.
    """
    layers = [list(w) for w in weights]
    n = len(layers)
    if n == 0:
        raise KerasImportError("conv1d_stack_from_keras_weights: weights must hold at least one layer")
    strides, padding = _per_layer(strides, "strides", n), _per_layer(padding, "padding", n)
    dilation, activation = _per_layer(dilation, "dilation", n), _per_layer(activation, "activation", n)
    ws, bs, pads, acts = [], [], [], []
    for i, layer in enumerate(layers):
        w, b = _conv_layer_weights(i, layer, ws[-1].shape[0] if ws else None)
        pads.append(_torch_padding(padding[i], w.shape[2], int(dilation[i])))
        acts.append(_torch_activation(activation[i]))
        ws.append(w)
        bs.append(b)
    stack = Conv1dStack(
        ws[0].shape[1],
        [w.shape[0] for w in ws],
        kernel_size=[w.shape[2] for w in ws],
        stride=[int(s) for s in strides],
        padding=pads,
        dilation=[int(d) for d in dilation],
        bias=[b is not None for b in bs],
        activation=acts,
        channels_last=channels_last,
        backend=backend,
        device=device,
        dtype=dtype,
    )
    with torch.no_grad():
        for conv, w, b in zip(stack.layers, ws, bs):
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
    return stack


def _per_layer(value: Any, name: str, n: int) -> list:
    """One value per layer: ``value`` itself if it is a list or tuple of ``n``, else ``n`` copies."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"conv1d_stack_from_keras_weights: {name} must have one entry per layer ({n})")
        return list(value)
    return [value] * n


def _conv_layer_weights(i: int, layer: list[Any], c_in: int | None) -> tuple[Tensor, Tensor | None]:
    """Torch weight and bias (``None`` without one) of Conv1D layer ``i``, checked to read the
    ``c_in`` channels the layer before writes (any number for the first)."""
    if len(layer) not in (1, 2):
        raise KerasImportError(
            f"conv1d_stack_from_keras_weights: weights[{i}] must be [kernel] or [kernel, bias], got {len(layer)} arrays"
        )
    w = conv1d_weight_from_keras(layer[0])
    if c_in is not None and w.shape[1] != c_in:
        raise KerasImportError(
            f"conv1d_stack_from_keras_weights: weights[{i}] kernel reads {w.shape[1]} channels but the layer "
            f"before gives {c_in}"
        )
    b = as_tensor(layer[1], f"weights[{i}] bias") if len(layer) == 2 else None
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise KerasImportError(
            f"conv1d_stack_from_keras_weights: weights[{i}] bias must be ({w.shape[0]},), got {tuple(b.shape)}"
        )
    return w, b


def _torch_padding(padding: str, kernel_size: int, dilation: int) -> tuple[int, int] | str:
    """Conv1dStack's padding for a Keras ``padding`` name: ``causal`` pads the left only."""
    if padding not in _KERAS_PADDING:
        raise ValueError(f"conv1d_stack_from_keras_weights: padding must be one of {_KERAS_PADDING}, got {padding!r}")
    return {"valid": (0, 0), "causal": (dilation * (kernel_size - 1), 0)}.get(padding, "same")


def _torch_activation(activation: str | None) -> str:
    if activation not in _KERAS_ACTIVATIONS:
        raise ValueError(
            f"conv1d_stack_from_keras_weights: activation must be one of "
            f"{sorted(a for a in _KERAS_ACTIVATIONS if a)}, got {activation!r}"
        )
    return _KERAS_ACTIVATIONS[activation]
