"""Plain-PyTorch implementations of the persistent-kernel ops (the contract the CUDA kernels follow).

See :mod:`fusedconvlstm.cuda.persistent_ops` for the semantics. The time loop calls the cell
ops' reference update (:mod:`fusedconvlstm.cuda.cell_cpu`), so the math is the step-wise
path's by construction; what these functions add is the persistent ops' buffer contract (the
padded h double buffer, the state tensors updated in place), which is what the driver in
:mod:`fusedconvlstm.cuda.persistent` must get right. The recurrent product is accumulated in float32
(float64 for float64 tensors), as the kernels' tensor-core accumulators do. The launch
configuration is checked for consistency and otherwise ignored. Float64 is accepted here (the
CUDA kernels refuse it) so the driver can be tested tightly on the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedconvlstm.cuda import cell_cpu as _cell
from fusedconvlstm.cuda.constants import MAX_CLUSTER_BLOCKS, padded_reduction
from fusedconvlstm.numerics.precision import accumulation_dtype


def _check(op: str, t: Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype}, got {t.dtype}")


def _check_config(op: str, nt: int, wm: int, wn: int, wk: int, nbg: int) -> None:
    if nt not in (1, 4):
        raise ValueError(f"{op}: nt must be 1 or 4, got {nt}")
    if wm * wn * wk != 8 or any(v <= 0 or v & (v - 1) for v in (wm, wn, wk)):
        raise ValueError(f"{op}: wm * wn * wk must be 8 with powers of two, got {wm} * {wn} * {wk}")
    if nbg < 1:
        raise ValueError(f"{op}: nbg must be >= 1, got {nbg}")


def lstm_persistent_forward_(
    xg: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None,
    reverse_mask: int,
    nt: int,
    wm: int,
    wn: int,
    wk: int,
    nbg: int,
    precise: bool,
    h_buf: Tensor,
    c_state: Tensor,
    y: Tensor,
    workspace: Tensor,
    sync: Tensor,
) -> None:
    """The whole forward recurrence, in place (see the ops module)."""
    op = "lstm_persistent_forward_"
    T, B, D, G = xg.shape
    H = G // 4
    _check_config(op, nt, wm, wn, wk, nbg)
    _check_forward_buffers(op, (T, B, D, H), xg.dtype, w_hh, h_buf, c_state, y, workspace)
    _forward_loop(xg, w_hh, lengths, reverse_mask, h_buf, c_state, y, workspace)


def _check_forward_buffers(op, sizes, dtype, w_hh, h_buf, c_state, y, workspace) -> None:
    """The weights and state buffers both forward ops take, for ``sizes = (T, B, D, H)``."""
    T, B, D, H = sizes
    acc = accumulation_dtype(dtype)
    _check(op, w_hh, "w_hh", (D, 4 * H, H), dtype)
    _check(op, h_buf, "h_buf", (2, D, B, padded_reduction(H, dtype.itemsize)), dtype)
    _check(op, c_state, "c_state", (D, B, H), acc)
    if y.numel():  # empty: only the final state is wanted
        _check(op, y, "y", (T, B, D, H), dtype)
    if workspace.numel():  # empty: the forward saves nothing for a backward
        _check(op, workspace, "workspace", (T, B, D, 5 * H), acc)


def _forward_loop(xg, w_hh, lengths, reverse_mask, h_buf, c_state, y, workspace) -> None:
    """The time loop of both forward ops; ``xg`` is in the weights' dtype or (projected in the
    kernel) in the accumulation dtype."""
    T, H = xg.shape[0], w_hh.shape[2]
    acc = accumulation_dtype(w_hh.dtype)
    h = h_buf[0, :, :, :H].clone()
    w_t = w_hh.to(acc).transpose(1, 2)
    for step in range(T):
        hh = torch.bmm(h.to(acc), w_t)
        _cell.lstm_cell_forward_(hh, xg, h, c_state, y, workspace, lengths, step, reverse_mask)
    h_buf[T % 2, :, :, :H] = h


def lstm_persistent_forward_from_input_(
    x: Tensor,
    w_ih: Tensor,
    bias: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None,
    reverse_mask: int,
    nt: int,
    wm: int,
    wn: int,
    wk: int,
    nbg: int,
    precise: bool,
    h_buf: Tensor,
    c_state: Tensor,
    y: Tensor,
    workspace: Tensor,
    sync: Tensor,
) -> None:
    """The forward that computes ``xg = x W_ihᵀ + bias`` itself, kept in the accumulation dtype
    (the kernel's fp32 shared memory), then the same loop (see the ops module)."""
    op = "lstm_persistent_forward_from_input_"
    if x.dim() != 3 or w_ih.dim() != 3:
        raise ValueError(f"{op}: x must be 3-D (T, B, kpx) and w_ih 3-D (D, 4H, I)")
    T, B, kpx = x.shape
    D, G, n_in = w_ih.shape
    H = G // 4
    acc = accumulation_dtype(x.dtype)
    _check_config(op, nt, wm, wn, wk, nbg)
    _check(op, x, "x", (T, B, padded_reduction(n_in, x.dtype.itemsize)), x.dtype)
    _check(op, w_ih, "w_ih", (D, G, n_in), x.dtype)
    _check(op, bias, "bias", (D, G), acc)
    _check_forward_buffers(op, (T, B, D, H), x.dtype, w_hh, h_buf, c_state, y, workspace)
    xg = torch.einsum("tbi,dgi->tbdg", x[..., :n_in].to(acc), w_ih.to(acc)) + bias
    _forward_loop(xg, w_hh, lengths, reverse_mask, h_buf, c_state, y, workspace)


def lstm_cluster_forward_(
    xg: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None,
    reverse_mask: int,
    nt: int,
    wm: int,
    wn: int,
    wk: int,
    precise: bool,
    h_buf: Tensor,
    c_state: Tensor,
    y: Tensor,
    workspace: Tensor,
) -> None:
    """The cluster kernel's forward: the persistent forward's contract without the barrier
    counters (one batch tile per cluster; see the ops module)."""
    B, H = xg.shape[1], xg.shape[3] // 4
    if wm > 0 and -(-H // (8 * wm)) > MAX_CLUSTER_BLOCKS:  # as the CUDA op refuses it
        raise ValueError(
            f"lstm_cluster_forward_: the cluster kernel needs {-(-H // (8 * wm))} blocks per cluster (hidden size "
            f"{H} in slices of {8 * wm} units); at most {MAX_CLUSTER_BLOCKS} form a cluster"
        )
    nbg = max(1, -(-B // (8 * nt * wn))) if nt > 0 and wn > 0 else 1
    sync = torch.empty(0, dtype=torch.int32)
    lstm_persistent_forward_(
        xg, w_hh, lengths, reverse_mask, nt, wm, wn, wk, nbg, precise, h_buf, c_state, y, workspace, sync
    )


def lstm_persistent_backward_(
    grad_y: Tensor,
    workspace: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    lengths: Tensor | None,
    reverse_mask: int,
    nt: int,
    wm: int,
    wn: int,
    wk: int,
    nbg: int,
    precise: bool,
    dh_carry: Tensor,
    dc: Tensor,
    dgates: Tensor,
    g_buf: Tensor,
    sync: Tensor,
) -> None:
    """The whole reverse-time sweep, in place (see the ops module)."""
    op = "lstm_persistent_backward_"
    T, B, D, G = dgates.shape
    H = G // 4
    acc = accumulation_dtype(dgates.dtype)
    _check_config(op, nt, wm, wn, wk, nbg)
    _check(op, grad_y, "grad_y", (T, B, D, H), dgates.dtype)
    _check(op, workspace, "workspace", (T, B, D, 5 * H), acc)
    _check(op, c0, "c0", (D, B, H), acc)
    _check(op, w_hh, "w_hh", (D, G, H), dgates.dtype)
    for name, t in (("dh_carry", dh_carry), ("dc", dc)):
        _check(op, t, name, (D, B, H), acc)
    _check(op, g_buf, "g_buf", (2, D, B, padded_reduction(G, dgates.dtype.itemsize)), dgates.dtype)
    w = w_hh.to(acc)
    dh_rec = torch.zeros(D, B, H, dtype=acc, device=dgates.device)
    dgates_step = dgates.new_empty(D, B, G)
    for step in range(T):
        _cell.lstm_cell_backward_(
            dh_rec, grad_y, workspace, c0, dh_carry, dc, dgates, dgates_step, lengths, step, reverse_mask
        )
        dh_rec = torch.bmm(dgates_step.to(acc), w)
    dh_carry += dh_rec
