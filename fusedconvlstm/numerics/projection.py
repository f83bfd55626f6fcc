"""``proj_size`` for recurrence backends whose kernels run unprojected LSTMs.

With a projection (``nn.LSTM``'s ``proj_size = P < H``) a step is

    gates_t = xg_t + W_hh h_{t-1},   r_t = o_t ⊙ tanh(c_t)   (H values),   h_t = W_hr r_t   (P values).

A persistent kernel splits the hidden units across blocks; each block computes its units' part of
``r_t``, but every ``h_t`` value needs all of ``r_t``, so a projected step would need two grid
synchronizations (exchange ``r``, project, exchange ``h``). Instead the recurrence runs on ``r``:

    gates_t = xg_t + W_eff r_{t-1}   with   W_eff = W_hh W_hr   (4H × H),

an ordinary unprojected LSTM with one exchange per step, and ``y = r W_hrᵀ`` is one GEMM over
all steps after the loop. The first step of each row sees ``h0``, not a projected ``r``: its
``W_hh h0`` is added to ``xg`` at that step (``t = 0``, or for a reversed recurrence the row's
last valid step) and the inner recurrence starts from ``r = 0``. A row of length 0 keeps ``h0``.

This is the same function as ``nn.LSTM``'s, rounded differently: the 16-bit dtypes round
``W_eff`` and ``r`` (where cuDNN rounds ``h``) and the first step's pre-activations once more.
The inner recurrence's resident weights are ``4H × H`` instead of ``4H × P``: a call fits a
kernel exactly when the same call without projection does.

The backward needs ``r``; it is recomputed from the workspace (``r = o tanh(c)`` from the saved
gates and cell states, by a function of the backend that knows its layout; zero past each row's
length), so the workspace is the inner one. With PyTorch's ``tanh`` that is the forward's ``r``
for the CUDA kernels (``tanhf``) and within an ulp of it for Triton's (its own ``tanh``).
Gradients, per recurrence (``dG`` the gate gradients, ``dW_eff`` the inner recurrent weight
gradient, both from the inner backward)::

    dW_hh = dW_eff W_hrᵀ + dG_{t0}ᵀ h0
    dW_hr = W_hhᵀ dW_eff + Σ_t dy_tᵀ r_t + dh_nᵀ r_n
    dh0   = dG_{t0} W_hh   (+ dh_n for rows of length 0)

with the inner backward given ``dy W_hr`` and ``dh_n W_hr`` for its outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fusedconvlstm.numerics.precision import accumulation_dtype, product_unrounded


def _first_steps(T: int, B: int, lengths: Tensor | None, reverse: bool, device: torch.device) -> Tensor:
    """``(B,)`` time index of each row's first step (0, or the last valid step when reversed).
    Rows of length 0 get 0: no step is valid there, so what is added at it is never read.
    Lengths past ``T`` (not checked on the device) count as ``T``, as the kernels treat them."""
    if not reverse:
        return torch.zeros(B, dtype=torch.long, device=device)
    if lengths is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=device)
    return (lengths.to(dtype=torch.long) - 1).clamp_(0, T - 1)


def _last_steps(T: int, B: int, lengths: Tensor | None, reverse: bool, device: torch.device) -> Tensor:
    """``(B,)`` time index of each row's last step, where ``h_n`` comes from."""
    return _first_steps(T, B, lengths, not reverse, device)


def _rows(t: Tensor, idx: Tensor) -> Tensor:
    """``t[idx[b], b]`` for every row ``b``: ``t`` is ``(T, B, ...)``."""
    return t[idx, torch.arange(idx.shape[0], device=idx.device)]


def _effective_weights(w_hh: list[Tensor], w_hr: list[Tensor]) -> list[Tensor]:
    """``W_eff = W_hh W_hr`` per recurrence, in the weights' dtype (computed in the accumulation dtype)."""
    acc = accumulation_dtype(w_hh[0].dtype)
    return [(wh.to(acc) @ wr.to(acc)).to(wh.dtype) for wh, wr in zip(w_hh, w_hr)]


def _effective_input(xg: Tensor, w_hh: list[Tensor], h0: Tensor, lengths, reverse) -> Tensor:
    """``xg`` with ``W_hh h0`` added at each row's first step (a copy)."""
    T, B, D, _ = xg.shape
    acc = accumulation_dtype(xg.dtype)
    xg_eff = xg.clone()
    for d in range(D):
        t0 = _first_steps(T, B, lengths, reverse[d], xg.device)
        start = _rows(xg[:, :, d], t0).to(acc) + h0[d].to(acc) @ w_hh[d].to(acc).t()
        xg_eff[t0, torch.arange(B, device=xg.device), d] = start.to(xg.dtype)
    return xg_eff


def _empty_rows(lengths: Tensor | None) -> Tensor | None:
    """``(B, 1)`` mask of the rows of length 0 (they keep ``h0``), or ``None`` without lengths."""
    return None if lengths is None else (lengths == 0).unsqueeze(1)


def _valid_outputs(r: Tensor, lengths: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``r`` in ``dtype``, zero at steps past each row's length (as the recurrence outputs it)."""
    if lengths is not None:
        T = r.shape[0]
        valid = torch.arange(T, device=r.device).unsqueeze(1) < lengths.unsqueeze(0)
        r = torch.where(valid[:, :, None, None], r, 0)
    return r.to(dtype)


def with_projection(
    forward: Callable, backward: Callable, cell_outputs: Callable[[Tensor], Tensor]
) -> tuple[Callable, Callable]:
    """A backend's ``(forward, backward)`` that also serve ``w_hr``, from ones that do not.

    ``cell_outputs(workspace)`` gives ``o tanh(c)`` of every step ``(T, B, D, H)`` in float32
    from the backend's workspace (any value past a row's length). Calls without a projection go
    straight to ``forward`` / ``backward``; the workspace is theirs in both cases."""

    def projected_forward(xg, w_hh, w_hr, h0, c0, lengths, reverse, save_for_backward=True, write_y=True):
        saves = dict(save_for_backward=save_for_backward, write_y=write_y)
        if not w_hr:
            return forward(xg, w_hh, w_hr, h0, c0, lengths, reverse, **saves)
        T, B, D, G = xg.shape
        lengths = None if lengths is None else lengths.to(xg.device)
        xg_eff, w_eff = _effective_input(xg, w_hh, h0, lengths, reverse), _effective_weights(w_hh, w_hr)
        r0 = xg.new_zeros(D, B, G // 4)
        y_r, r_n, c_n, workspace = forward(xg_eff, w_eff, [], r0, c0, lengths, reverse, **saves)
        w_hr_t = torch.stack(w_hr).transpose(1, 2)  # (D, H, P)
        # h_n from the final r in every mode, so that it does not depend on whether y is stored
        # (inference with return_sequence=False equals training bit for bit) ...
        h_n = torch.bmm(r_n, w_hr_t)
        empty = _empty_rows(lengths)
        if not write_y:  # only the final state is wanted
            y = y_r
        else:
            y = torch.einsum("tbdh,dhp->tbdp", y_r, w_hr_t).contiguous()
            # ... and written into y at each row's last step, so that it equals that output (rows
            # of length 0 have r_n = 0, so there it writes the zero y already holds).
            rows = torch.arange(B, device=xg.device)
            for d in range(D):
                y[_last_steps(T, B, lengths, reverse[d], xg.device), rows, d] = h_n[d]
        if empty is not None:
            h_n = torch.where(empty, h0, h_n)
        return y, h_n, c_n, workspace

    def projected_backward(grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse, y, workspace):
        if not w_hr:
            return backward(grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse, y, workspace)
        T, B, D, G = xg.shape
        dtype, acc = xg.dtype, accumulation_dtype(xg.dtype)
        lengths = None if lengths is None else lengths.to(xg.device)
        w_eff = _effective_weights(w_hh, w_hr)
        y_r = _valid_outputs(cell_outputs(workspace), lengths, dtype)
        w_hr_s = torch.stack(w_hr)  # (D, P, H)
        empty = _empty_rows(lengths)
        grad_r_n = torch.bmm(grad_h_n, w_hr_s)
        if empty is not None:
            grad_r_n = torch.where(empty, 0, grad_r_n)
        grad_y_r = torch.einsum("tbdp,dph->tbdh", grad_y, w_hr_s)
        r0 = xg.new_zeros(D, B, G // 4)
        # The inner backward reads its gate values from the workspace and takes xg for its shape
        # and dtype only, so the forward's xg stands in for the one with W_hh h0 added (a copy).
        dgates, grad_w_eff, _, _, grad_c0 = backward(
            grad_y_r, grad_r_n, grad_c_n, xg, w_eff, [], r0, c0, lengths, reverse, y_r, workspace
        )
        grad_w_hh, grad_w_hr, grad_h0 = [], [], []
        for d in range(D):
            wh, wr, dw_eff = w_hh[d].to(acc), w_hr[d].to(acc), grad_w_eff[d].to(acc)
            dg0 = _rows(dgates[:, :, d], _first_steps(T, B, lengths, reverse[d], xg.device)).to(acc)
            r_n = _rows(y_r[:, :, d], _last_steps(T, B, lengths, reverse[d], xg.device)).to(acc)
            grad_w_hh.append((dw_eff @ wr.t() + dg0.t() @ h0[d].to(acc)).to(dtype))
            # Σ_t dy_tᵀ r_t over all steps and rows, accumulated without a 16-bit rounding.
            gy, r = grad_y[:, :, d].reshape(T * B, -1), y_r[:, :, d].reshape(T * B, -1)
            outputs = product_unrounded(gy.t(), r, acc)
            grad_w_hr.append((wh.t() @ dw_eff + outputs + grad_h_n[d].to(acc).t() @ r_n).to(dtype))
            dh0 = dg0 @ wh
            if empty is not None:
                dh0 = torch.where(empty, grad_h_n[d].to(acc), dh0)
            grad_h0.append(dh0.to(dtype))
        return dgates, grad_w_hh, grad_w_hr, torch.stack(grad_h0), grad_c0

    return projected_forward, projected_backward
