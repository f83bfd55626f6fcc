"""Keras weight layouts to torch's (docs/design.md §1): pure tensor conversions, no files.

A Conv1D kernel ``(k, in, out)`` becomes ``permute(2, 1, 0)``; a Dense kernel ``(in, out)``
becomes ``.T``; a standard LSTM computes ``x @ K + h @ R + b`` with gates i, f, c, o, so
``W_ih = K.T``, ``W_hh = R.T``, ``b_ih = b``, ``b_hh = 0``; a ``CuDNNLSTM`` handed cuDNN each
gate's slice of its kernels flattened as stored, so per gate ``W_ih = K[:, gH:(g+1)H].reshape(H, D)``
(a reshape, not a transpose), ``W_hh = R[:, gH:(g+1)H]`` as is, and its ``(8H,)`` bias is ``b_ih``
then ``b_hh``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from fusedconvlstm.keras.errors import KerasImportError

LSTM_LAYOUTS = ("auto", "cudnn", "standard")


def as_tensor(a: Any, what: str) -> Tensor:
    """``a`` (an array or a tensor) as a float32 CPU tensor; ``what`` names it in the error."""
    if isinstance(a, Tensor):
        return a.detach().to("cpu", torch.float32)
    try:
        return torch.from_numpy(np.array(a, dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be an array or a tensor, got {type(a).__name__}") from e


def conv1d_weight_from_keras(kernel: Any) -> Tensor:
    """Torch ``nn.Conv1d`` weight ``(out, in, k)`` from a Keras Conv1D kernel ``(k, in, out)``.

    Keras computes a cross-correlation like torch, so there is no flip.
    """
    k = as_tensor(kernel, "Conv1D kernel")
    if k.dim() != 3:
        raise KerasImportError(f"a Conv1D kernel must be 3-D (kernel_size, in, out), got shape {tuple(k.shape)}")
    return k.permute(2, 1, 0).contiguous()


def dense_weight_from_keras(kernel: Any) -> Tensor:
    """Torch ``nn.Linear`` weight ``(out, in)`` from a Keras Dense kernel ``(in, out)``."""
    k = as_tensor(kernel, "Dense kernel")
    if k.dim() != 2:
        raise KerasImportError(f"a Dense kernel must be 2-D (in, out), got shape {tuple(k.shape)}")
    return k.t().contiguous()


def lstm_weights_from_keras(
    kernel: Any, recurrent_kernel: Any, bias: Any | None = None, layout: str = "auto"
) -> dict[str, Tensor]:
    """``nn.LSTM`` parameters (``weight_ih_l0``, ``weight_hh_l0`` and, with a bias,
    ``bias_ih_l0``, ``bias_hh_l0``) from a Keras LSTM's ``kernel (D, 4H)``,
    ``recurrent_kernel (H, 4H)`` and ``bias``.

    ``layout`` is ``"cudnn"`` (Keras 2 ``CuDNNLSTM``, bias ``(8H,)``), ``"standard"`` (Keras
    ``LSTM``, bias ``(4H,)`` or none) or ``"auto"`` (decided by the bias: ``8H`` is cuDNN's).
    Both use the gate order i, f, c, o, which is torch's i, f, g, o.
    """
    if layout not in LSTM_LAYOUTS:
        raise ValueError(f"layout must be one of {LSTM_LAYOUTS}, got {layout!r}")
    K = as_tensor(kernel, "LSTM kernel")
    R = as_tensor(recurrent_kernel, "LSTM recurrent_kernel")
    if K.dim() != 2 or K.shape[1] % 4 != 0:
        raise KerasImportError(f"an LSTM kernel must be (input_size, 4 * units), got shape {tuple(K.shape)}")
    H = K.shape[1] // 4
    if tuple(R.shape) != (H, 4 * H):
        raise KerasImportError(
            f"an LSTM recurrent_kernel must be (units, 4 * units) = {(H, 4 * H)} for a kernel of shape "
            f"{tuple(K.shape)}, got {tuple(R.shape)}"
        )
    b = None if bias is None else as_tensor(bias, "LSTM bias")
    if b is not None and (b.dim() != 1 or b.shape[0] not in (4 * H, 8 * H)):
        raise KerasImportError(
            f"an LSTM bias must be (4 * units,) = ({4 * H},) or, for CuDNNLSTM, (8 * units,) = ({8 * H},); "
            f"got {tuple(b.shape)}"
        )
    if layout == "auto":
        layout = "cudnn" if b is not None and b.shape[0] == 8 * H else "standard"
    if layout == "cudnn":
        return _cudnn_lstm_weights(K, R, b)
    return _standard_lstm_weights(K, R, b)


def _cudnn_lstm_weights(K: Tensor, R: Tensor, b: Tensor | None) -> dict[str, Tensor]:
    D, H = K.shape[0], K.shape[1] // 4
    if b is None or b.shape[0] != 8 * H:
        got = "none" if b is None else tuple(b.shape)
        raise KerasImportError(f"a CuDNNLSTM bias must be (8 * units,) = ({8 * H},), got {got}")
    # cuDNN received each gate's (D, H) slice flattened in storage order and read it as its
    # own row-major (H, D) matrix: a reshape of the slice, not its transpose.
    w_ih = torch.cat([K[:, g * H : (g + 1) * H].reshape(H, D) for g in range(4)])
    # The recurrent slices (H, H) were handed over the same way, which for a square slice
    # read as (H_out, H_in) is the slice itself.
    w_hh = torch.cat([R[:, g * H : (g + 1) * H] for g in range(4)])
    return {
        "weight_ih_l0": w_ih.contiguous(),
        "weight_hh_l0": w_hh.contiguous(),
        "bias_ih_l0": b[: 4 * H].clone(),
        "bias_hh_l0": b[4 * H :].clone(),
    }


def _standard_lstm_weights(K: Tensor, R: Tensor, b: Tensor | None) -> dict[str, Tensor]:
    H = K.shape[1] // 4
    if b is not None and b.shape[0] != 4 * H:
        raise KerasImportError(f"a standard LSTM bias must be (4 * units,) = ({4 * H},), got {tuple(b.shape)}")
    out = {"weight_ih_l0": K.t().contiguous(), "weight_hh_l0": R.t().contiguous()}
    if b is not None:
        out["bias_ih_l0"] = b.clone()
        out["bias_hh_l0"] = torch.zeros_like(b)
    return out


def check_recurrent_activation(activation: str | None, where: str) -> None:
    """Refuse a Keras LSTM whose gates are not the exact sigmoid torch's LSTM computes."""
    if activation is not None and activation != "sigmoid":
        raise KerasImportError(
            f"{where} has recurrent_activation={activation!r}; torch's LSTM (and this package's) computes the "
            "gates with the exact sigmoid, so its outputs would differ. Only recurrent_activation='sigmoid' "
            "can be imported (Keras 2 defaulted to 'hard_sigmoid': retrain or fine-tune with 'sigmoid')."
        )
