"""The LSTM recurrence op's call: what a backend needs to know about it, and the argument checks.

:mod:`fusedconvlstm.ops.lstm` documents the op; backends receive an :class:`LSTMRecurrenceCall`
(the checked arguments' shapes and options) and decide from it whether they can serve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

OP = "lstm_recurrence"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LSTMRecurrenceCall:
    """What a backend needs to know to decide whether it can serve a recurrence call."""

    seq_len: int
    batch: int
    num_recurrences: int
    hidden_size: int
    proj_size: int  # 0 without projection
    dtype: torch.dtype
    device: torch.device
    has_lengths: bool
    reverse: tuple[bool, ...]
    # False when no gradient will be asked for: backends then write no workspace.
    save_for_backward: bool = True

    def freeze(self) -> tuple:
        """The call as a tuple of plain values (:func:`thaw_call` reverses it)."""
        return (
            self.seq_len,
            self.batch,
            self.num_recurrences,
            self.hidden_size,
            self.proj_size,
            self.dtype,
            self.device.type,
            self.device.index,
            self.has_lengths,
            tuple(self.reverse),
            self.save_for_backward,
        )

    def features(self) -> dict[str, int]:
        """What validation records range over (:mod:`fusedconvlstm.records`)."""
        return {
            "seq_len": self.seq_len,
            "batch": self.batch,
            "hidden_size": self.hidden_size,
            "proj_size": self.proj_size,
            "num_recurrences": self.num_recurrences,
            "reversed": sum(self.reverse),
            "has_lengths": int(self.has_lengths),
        }


def thaw_call(frozen: tuple) -> LSTMRecurrenceCall:
    """The call of :meth:`LSTMRecurrenceCall.freeze`."""
    T, B, D, H, P, dtype, dev_type, dev_index, has_lengths, reverse, save = frozen
    return LSTMRecurrenceCall(T, B, D, H, P, dtype, torch.device(dev_type, dev_index), has_lengths, reverse, save)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.device.type == "meta"


def check_lstm_recurrence_args(
    xg: Tensor,
    w_hh: Sequence[Tensor],
    w_hr: Sequence[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Tensor | None,
    reverse: Sequence[bool],
    save_for_backward: bool = True,
) -> LSTMRecurrenceCall:
    """Validate the arguments of ``lstm_recurrence``; errors name the argument and what it must be."""
    op = "lstm_recurrence"
    if not isinstance(xg, Tensor) or xg.dim() != 4:
        got = f"{xg.dim()}-D" if isinstance(xg, Tensor) else type(xg).__name__
        raise ValueError(f"{op}: xg must be a 4-D tensor (T, B, D, 4*H), got {got}")
    T, B, D, G = xg.shape
    if xg.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: xg must be one of {FLOAT_DTYPES}, got {xg.dtype}")
    if G % 4 != 0 or G == 0:
        raise ValueError(f"{op}: xg.shape[3] must be 4*hidden_size > 0, got {G}")
    if T == 0:
        raise ValueError(f"{op}: xg must hold at least one time step, got sequence length 0")
    H = G // 4
    if len(reverse) != D:
        raise ValueError(f"{op}: reverse must have one entry per recurrence (xg.shape[2] = {D}), got {len(reverse)}")
    if len(w_hh) != D:
        raise ValueError(f"{op}: w_hh must hold one weight per recurrence ({D}), got {len(w_hh)}")
    if len(w_hr) not in (0, D):
        raise ValueError(f"{op}: w_hr must be empty or hold one weight per recurrence ({D}), got {len(w_hr)}")
    P = w_hr[0].shape[0] if len(w_hr) else H

    def same(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if _shape(t) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {_shape(t)}")
        if t.dtype != xg.dtype:
            raise TypeError(f"{op}: {name} must have the dtype of xg ({xg.dtype}), got {t.dtype}")
        if t.device != xg.device:
            raise ValueError(f"{op}: {name} must be on the device of xg ({xg.device}), got {t.device}")

    for d in range(D):
        same(f"w_hh[{d}]", w_hh[d], (G, P))
        if len(w_hr):
            same(f"w_hr[{d}]", w_hr[d], (P, H))
    same("h0", h0, (D, B, P))
    same("c0", c0, (D, B, H))
    if lengths is not None:
        if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.shape[0] != B:
            got = _shape(lengths) if isinstance(lengths, Tensor) else type(lengths).__name__
            raise ValueError(f"{op}: lengths must be a 1-D tensor of batch size ({B},), got {got}")
        if lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: lengths must be int32 or int64, got {lengths.dtype}")
        if lengths.device.type not in ("cpu", xg.device.type):
            raise ValueError(f"{op}: lengths must be on the CPU or on {xg.device}, got {lengths.device}")
        if lengths.device.type == "cpu" and xg.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError(
                f"{op}: lengths must be on {xg.device} while a CUDA graph is being captured (a copy from the "
                "host cannot be captured), got a CPU tensor"
            )
        if lengths.device.type == "cpu" and lengths.numel() and not _is_fake(lengths):
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 0 or hi > T:
                raise ValueError(f"{op}: lengths must lie in [0, {T}] (the sequence length), got [{lo}, {hi}]")
    return LSTMRecurrenceCall(
        seq_len=T,
        batch=B,
        num_recurrences=D,
        hidden_size=H,
        proj_size=P if len(w_hr) else 0,
        dtype=xg.dtype,
        device=xg.device,
        has_lengths=lengths is not None,
        reverse=tuple(bool(r) for r in reverse),
        save_for_backward=bool(save_for_backward),
    )


@runtime_checkable
class LSTMRecurrenceBackend(Protocol):
    """What a backend provides for ``lstm_recurrence`` (checked when it registers).

    ``why_not(call)`` is ``None`` where it can serve ``call``, else why not. ``forward(xg, w_hh,
    w_hr, h0, c0, lengths, reverse, save_for_backward, write_y) -> (y, h_n, c_n, workspace)``,
    ``backward(grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse, y,
    workspace) -> (grad_xg, grad_w_hh list, grad_w_hr list, grad_h0, grad_c0)`` and
    ``workspace_shape(call)``. Optional: ``describe(call)`` (how it would serve, for
    ``explain(detail=True)``), and together ``forward_from_input(x, w_ih, b, w_hh, ...)`` with
    ``from_input_why_not(call, input_size)`` for a forward that computes the input projection.
    """

    op: str
    backend: str

    def why_not(self, call: LSTMRecurrenceCall) -> str | None: ...
    def forward(self, *args): ...
    def backward(self, *args): ...
    def workspace_shape(self, call: LSTMRecurrenceCall): ...
