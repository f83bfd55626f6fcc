"""What the cuda LSTM's kernels share before a launch: which calls a persistent kernel takes, the
device limits it plans with, its precision, and the driver's call of a set of tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from fusedconvlstm.calls.lstm import LSTMRecurrenceCall
from fusedconvlstm.cuda import persistent_config
from fusedconvlstm.cuda.persistent_config import DeviceLimits, Layout
from fusedconvlstm.numerics.recurrence import fp32_recurrence_allows_tf32

PERSISTENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def lengths_on(lengths: Tensor | None, device: torch.device) -> Tensor | None:
    return None if lengths is None else lengths.to(device=device, dtype=torch.int64, non_blocking=True)


def precise(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and not fp32_recurrence_allows_tf32()


def limits_for(call: LSTMRecurrenceCall, limits: DeviceLimits | None) -> DeviceLimits | str:
    if limits is not None:
        return limits
    if call.device.type != "cuda":
        return f"the persistent kernels run on CUDA devices, got {call.device.type}"
    return DeviceLimits.of(call.device)


def refusal(call: LSTMRecurrenceCall) -> str | None:
    # A call with proj_size runs the kernels on its unprojected form (same H, numerics.projection).
    if call.dtype not in PERSISTENT_DTYPES:
        return f"the persistent kernels take float16, bfloat16 or float32, got {call.dtype}"
    if call.num_recurrences > 62:
        return f"the persistent kernels take at most 62 recurrences per call, got {call.num_recurrences}"
    return None


def choose(call: LSTMRecurrenceCall, kind: str, lim: DeviceLimits, input_size: int = 0) -> Layout | str:
    return persistent_config.choose_config(
        kind, call.batch, call.num_recurrences, call.hidden_size, call.dtype, lim, precise(call.dtype), input_size
    )


def persistent_limits(call: LSTMRecurrenceCall, limits: DeviceLimits | None) -> DeviceLimits | str:
    """The device limits a persistent kernel plans with, or why no persistent kernel takes ``call``."""
    reason = refusal(call)
    if reason is not None:
        return reason
    lim = limits_for(call, limits)
    if isinstance(lim, str):
        return lim
    if lim.capability < (8, 0):
        return f"the persistent kernels need compute capability 8.0 or newer, got {lim.capability}"
    return lim


def call_of(xg: Tensor, w_hr: list[Tensor], lengths: Tensor | None, reverse: list[bool]) -> LSTMRecurrenceCall:
    T, B, D, G = xg.shape
    return LSTMRecurrenceCall(
        seq_len=T,
        batch=B,
        num_recurrences=D,
        hidden_size=G // 4,
        proj_size=w_hr[0].shape[0] if w_hr else 0,
        dtype=xg.dtype,
        device=xg.device,
        has_lengths=lengths is not None,
        reverse=tuple(bool(r) for r in reverse),
    )


def require_unprojected(proj_size: int) -> None:
    """The drivers run unprojected recurrences; the registered implementation removes the
    projection first (:mod:`fusedconvlstm.numerics.projection`)."""
    if proj_size:
        raise ValueError("lstm_recurrence: the cuda drivers run unprojected recurrences (w_hr must be empty)")


def aligned_16(t: Tensor) -> Tensor:
    """``t`` contiguous at a 16-byte aligned address (the kernels read it in 16-byte copies)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def plan_or_raise(
    call: LSTMRecurrenceCall, kind: str, config: Layout | None, plan_of: Callable[..., Layout | str]
) -> Layout:
    """``config``, else ``plan_of(call)``'s launch configuration of the ``kind`` kernel, raising
    where it refuses the call. CPU tensors (tests of the drivers, which then run the kernel ops'
    CPU implementations) plan as an H100 would, float64 as float32."""
    require_unprojected(call.proj_size)
    if config is not None:
        return config
    if call.device.type == "cuda":
        plan = plan_of(call)
    else:
        # CPU tensors run the ops' CPU implementations (tests of this driver), float64 included:
        # any valid configuration does; take the one an H100 would get.
        if call.dtype not in PERSISTENT_DTYPES:
            call = dataclasses.replace(call, dtype=torch.float32)
        plan = plan_of(call, persistent_config.H100_SXM)
    if isinstance(plan, str):
        raise ValueError(f"lstm_recurrence: the persistent {kind} kernel cannot serve this call: {plan}")
    return plan
