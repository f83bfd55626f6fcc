"""Plain-PyTorch implementations of the cell ops (the contract ``csrc/lstm_cell.cu`` follows).

See :mod:`fusedconvlstm.cuda.cell_ops` for the semantics. The math runs in float32 (float64 for
float64 tensors), as in the CUDA kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedconvlstm.numerics.precision import accumulation_dtype


def _time_index(step: int, T: int, reversed_: bool, backward: bool) -> int:
    # The forward walks each recurrence in its own direction; the backward walks it back.
    forward_order = not reversed_ if not backward else reversed_
    return step if forward_order else T - 1 - step


def _check_accumulation(op: str, name: str, t: Tensor, acc: torch.dtype) -> None:
    """The GEMM results arrive unrounded, in the accumulation dtype (as the CUDA kernels check)."""
    if t.dtype != acc:
        raise TypeError(f"{op}: {name} must be {acc} (the GEMM's accumulation dtype), got {t.dtype}")


def _valid_rows(lengths: Tensor | None, t: int, batch: int, device: torch.device) -> Tensor:
    if lengths is None:
        return torch.ones(batch, 1, dtype=torch.bool, device=device)
    return (t < lengths.to(device)).unsqueeze(1)


def lstm_cell_forward_(
    hh: Tensor,
    xg: Tensor,
    h: Tensor,
    c: Tensor,
    y: Tensor,
    workspace: Tensor,
    lengths: Tensor | None,
    step: int,
    reverse_mask: int,
) -> None:
    """One step of the pointwise forward for all recurrences, in place (see the ops module)."""
    T, B, D, G = xg.shape
    acc = accumulation_dtype(xg.dtype)
    _check_accumulation("lstm_cell_forward_", "hh", hh, acc)
    for d in range(D):
        t = _time_index(step, T, bool(reverse_mask >> d & 1), backward=False)
        valid = _valid_rows(lengths, t, B, xg.device)
        pre = xg[t, :, d].to(acc) + hh[d].to(acc)
        i, f, g, o = pre.chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c[d].to(acc) + i * g
        h_new = o * torch.tanh(c_new)
        c[d] = torch.where(valid, c_new.to(c.dtype), c[d])
        h[d] = torch.where(valid, h_new.to(h.dtype), h[d])
        if y.numel():  # empty when only the final state is wanted
            y[t, :, d] = torch.where(valid, h_new, 0).to(y.dtype)
        if workspace.numel():  # empty when the forward saves nothing for a backward
            workspace[t, :, d] = torch.where(valid, torch.cat([i, f, g, o, c_new], dim=-1), 0).to(workspace.dtype)


def lstm_cell_backward_(
    dh_rec: Tensor,
    grad_y: Tensor,
    workspace: Tensor,
    c0: Tensor,
    dh_carry: Tensor,
    dc: Tensor,
    dgates: Tensor,
    dgates_step: Tensor,
    lengths: Tensor | None,
    step: int,
    reverse_mask: int,
) -> None:
    """One step of the pointwise backward for all recurrences, in place (see the ops module)."""
    T, B, D, G = dgates.shape
    H = G // 4
    acc = accumulation_dtype(dgates.dtype)
    _check_accumulation("lstm_cell_backward_", "dh_rec", dh_rec, acc)
    for d in range(D):
        rev = bool(reverse_mask >> d & 1)
        t = _time_index(step, T, rev, backward=True)
        valid = _valid_rows(lengths, t, B, dgates.device)
        i, f, g, o, c = workspace[t, :, d].to(acc).split(H, dim=-1)
        t_prev = t + 1 if rev else t - 1
        if 0 <= t_prev < T:
            c_prev = workspace[t_prev, :, d, 4 * H :].to(acc)
            if rev:  # a reversed recurrence starts at its last valid step, from c0
                c_prev = torch.where(_valid_rows(lengths, t_prev, B, c0.device), c_prev, c0[d].to(acc))
        else:
            c_prev = c0[d].to(acc)
        incoming = dh_rec[d].to(acc) + dh_carry[d].to(acc)
        dh = incoming + grad_y[t, :, d].to(acc)
        tc = torch.tanh(c)
        dc_t = dc[d].to(acc) + dh * o * (1 - tc * tc)
        d_pre = torch.cat(
            [
                dc_t * g * i * (1 - i),
                dc_t * c_prev * f * (1 - f),
                dc_t * i * (1 - g * g),
                dh * tc * o * (1 - o),
            ],
            dim=-1,
        )
        d_pre = torch.where(valid, d_pre, 0)
        dgates[t, :, d] = d_pre.to(dgates.dtype)
        dgates_step[d] = d_pre.to(dgates_step.dtype)
        dc[d] = torch.where(valid, dc_t * f, dc[d].to(acc)).to(dc.dtype)
        dh_carry[d] = torch.where(valid, 0, incoming).to(dh_carry.dtype)
