"""Triton kernels of the LSTM recurrence: forward and reverse-time backward, time loop inside the kernel.

One kernel serves both launch modes (see :mod:`fusedconvlstm.triton.lstm`):

- *persistent*: the hidden units of one recurrence are split into slices of ``BLOCK_H`` units;
  program ``(d, batch group, slice)`` owns all four gates of its units for the rows of its batch
  group and keeps its part of ``W_hh`` in registers / shared memory for every step. Only ``h``
  (forward) or the gate gradients (backward) cross programs, through global memory, followed by
  one grid barrier per step among the programs of the same ``(d, batch group)``.
- *single program*: ``BLOCK_H`` covers every hidden unit, so one slice exists and a CTA barrier
  replaces the grid barrier. This is what the interpreter runs in CI: the step math is the same
  code as the persistent mode's.

Programs are numbered ``pid = (d * n_bgroups + bgroup) * n_slices + slice``. Each program walks
the ``BLOCK_B``-row tiles of its batch group inside every step.

The recurrent dots reduce over ``H_PAD`` (``H`` rounded up to whole ``KC`` chunks) per gate; the
weights stay on-chip as a tuple of ``KC``-row chunks, so one chunk's operand fragments are in
registers at a time.

Layouts (all contiguous): ``xg (T, B, D, 4H)``, ``w (D, 4H, H)``, ``y (T, B, D, H)``,
``h (2, D, B, H)`` (h state, double-buffered by step parity), ``c (D, B, H)`` float32,
``ws (T, B, D, 5H)`` float32 holding the activated gates ``i, f, g, o`` and ``c_{t-1}`` of every
step (so the backward recomputes ``c_t`` without reading a neighbouring step).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fusedconvlstm.triton.elementwise import sigmoid, tanh

# Scalars that change between calls without changing the code: not specialized, so one compiled
# kernel serves every batch size and sequence length (the persistent launcher compiles once,
# reads the kernel's resources, then sizes the grid with these).
_RUNTIME_SCALARS = ["T", "B", "reverse_mask", "n_bgroups", "rows_per_group", "step_begin", "step_end", "finish"]


@triton.jit
def _lstm_cell_forward(pre_i, pre_f, pre_g, pre_o, c_prev):
    """Gate activations, ``c_t`` and ``h_t`` from pre-activations (float32)."""
    i = sigmoid(pre_i)
    f = sigmoid(pre_f)
    g = tanh(pre_g)
    o = sigmoid(pre_o)
    c = f * c_prev + i * g
    h = o * tanh(c)
    return i, f, g, o, c, h


@triton.jit
def _lstm_cell_backward(dh, dc, i, f, g, o, c_prev):
    """Pre-activation gradients and ``dL/dc_{t-1}`` from ``dL/dh_t``, ``dL/dc_t`` (float32)."""
    c = f * c_prev + i * g
    tc = tanh(c)
    dc_t = dc + dh * o * (1.0 - tc * tc)
    d_i = dc_t * g * i * (1.0 - i)
    d_f = dc_t * c_prev * f * (1.0 - f)
    d_g = dc_t * i * (1.0 - g * g)
    d_o = dh * tc * o * (1.0 - o)
    return d_i, d_f, d_g, d_o, dc_t * f


@triton.jit
def _split_gates(x, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Split ``(BLOCK_B, 4 * BLOCK_H)`` with column ``unit * 4 + gate`` into the four gates."""
    x = tl.reshape(x, (BLOCK_B, BLOCK_H, 2, 2))
    even, odd = tl.split(x)  # gates (0, 2) and (1, 3)
    x_i, x_g = tl.split(even)
    x_f, x_o = tl.split(odd)
    return x_i, x_f, x_g, x_o


@triton.jit
def _load_weight_chunks(
    w_base, n_off, n_mask, m_stride, H, H_PAD: tl.constexpr, KC: tl.constexpr, N_CHUNKS: tl.constexpr
):
    """A weight tile ``(N_CHUNKS * KC, N)`` as a tuple of ``(KC, N)`` chunks along its reduction axis.

    Reduction index ``m`` stands for gate vector column ``(m // H_PAD) * H + m % H_PAD`` (padding
    columns load as zero); element ``[m, n]`` is at ``w_base + column * m_stride + n_off[n]``.
    Chunks keep each dot's operands small: Triton keeps the whole tile in shared memory across
    the time loop and only one chunk's fragments in registers at a time.
    """
    chunks = ()
    for c in tl.static_range(N_CHUNKS):
        # A chunk never straddles two gates (KC divides H_PAD): its columns are contiguous.
        j = (c * KC) % H_PAD + tl.arange(0, KC)
        col = (c * KC // H_PAD) * H + j
        w = tl.load(
            w_base + col[:, None] * m_stride + n_off[None, :], mask=(j < H)[:, None] & n_mask[None, :], other=0.0
        )
        chunks = chunks + (w,)
    return chunks


@triton.jit
def _rows_dot(
    row_ptr,
    row_mask,
    w_chunks,
    acc,
    H,
    H_PAD: tl.constexpr,
    KC: tl.constexpr,
    N_CHUNKS: tl.constexpr,
    CACHE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``acc + A @ W`` where row ``r`` of ``A`` is the vector at ``row_ptr[r]`` (columns as above)."""
    for c in tl.static_range(N_CHUNKS):
        j = (c * KC) % H_PAD + tl.arange(0, KC)
        col = (c * KC // H_PAD) * H + j
        a = tl.load(
            row_ptr[:, None] + col[None, :],
            mask=row_mask[:, None] & (j < H)[None, :],
            other=0.0,
            cache_modifier=CACHE,
        )
        acc = tl.dot(a, w_chunks[c], acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _program_coords(H, n_bgroups, BLOCK_H: tl.constexpr):
    n_slices = tl.cdiv(H, BLOCK_H)
    pid = tl.program_id(0)
    group = pid // n_slices  # d * n_bgroups + bgroup: the programs that exchange h each step
    slice_id = pid % n_slices
    d = group // n_bgroups
    bgroup = group % n_bgroups
    return d, bgroup, slice_id, group, n_slices


@triton.jit
def _grid_barrier(counter_ptr, n_programs, is_master):
    """Wait until the ``n_programs`` programs sharing ``counter_ptr`` have all arrived.

    Epoch scheme (as in cooperative groups' grid sync): the master adds ``2**31 - (n - 1)``, the
    others 1, so once everyone has arrived the counter grew by exactly ``2**31``: its top bit
    flipped and its low bits are back where they were. A program waits for the top bit to differ
    from the value it saw when arriving, so the same zero-initialised counter serves every step
    without a reset. Needs ``n_programs >= 2`` and every program co-resident.
    """
    # All threads' stores of this step happen before the (single-thread) release below.
    tl.debug_barrier()
    inc = tl.where(is_master, 2147483647 - n_programs + 2, 1)
    arrived = tl.atomic_add(counter_ptr, inc, sem="release", scope="gpu")
    now = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while (arrived ^ now) >= 0:
        now = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _end_of_step(bar_ptr, group, n_slices, slice_id, USE_GRID_BARRIER: tl.constexpr):
    if USE_GRID_BARRIER:
        _grid_barrier(bar_ptr + group, n_slices, slice_id == 0)
    else:
        # One program per group: only the threads of this CTA read what it wrote.
        tl.debug_barrier()


@triton.jit(do_not_specialize=_RUNTIME_SCALARS)
def lstm_forward_kernel(
    xg_ptr,
    w_ptr,
    len_ptr,
    y_ptr,
    h_ptr,
    c_ptr,
    ws_ptr,
    bar_ptr,
    T,
    B,
    D,
    H,
    reverse_mask,
    n_bgroups,
    rows_per_group,
    step_begin,
    step_end,
    H_PAD: tl.constexpr,
    KC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    USE_GRID_BARRIER: tl.constexpr,
    H_CACHE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SAVE_WS: tl.constexpr,
    WRITE_Y: tl.constexpr,
):
    """Steps ``[step_begin, step_end)`` of the forward recurrence (see the module docstring).
    Without ``WRITE_Y`` (only the final state is wanted) ``y_ptr`` is never written."""
    d, bgroup, slice_id, group, n_slices = _program_coords(H, n_bgroups, BLOCK_H)
    rev = (reverse_mask >> d) & 1

    u = slice_id * BLOCK_H + tl.arange(0, BLOCK_H)  # the hidden units this program owns
    u_mask = u < H

    # This program's W_hh rows, transposed, as the right operand of h_{t-1} @ W_hhᵀ: column
    # unit * 4 + gate, so that one dot computes all four gates of the owned units. Loaded once,
    # kept on-chip for every step.
    n = tl.arange(0, 4 * BLOCK_H)
    n_unit = slice_id * BLOCK_H + n // 4
    w_base = w_ptr + d.to(tl.int64) * 4 * H * H
    w_chunks = _load_weight_chunks(w_base, ((n % 4) * H + n_unit) * H, n_unit < H, 1, H, H_PAD, KC, H_PAD // KC)

    state_stride = D * B * H
    row_begin = bgroup * rows_per_group
    for s in range(step_begin, step_end):
        t = s + rev * (T - 1 - 2 * s)
        h_src = h_ptr + (s % 2) * state_stride + d * B * H
        h_dst = h_ptr + ((s + 1) % 2) * state_stride + d * B * H
        for r0 in range(row_begin, row_begin + rows_per_group, BLOCK_B):
            rows = r0 + tl.arange(0, BLOCK_B)
            r_mask = rows < B
            m_own = r_mask[:, None] & u_mask[None, :]

            hw = tl.zeros((BLOCK_B, 4 * BLOCK_H), dtype=tl.float32)
            hw = _rows_dot(h_src + rows * H, r_mask, w_chunks, hw, H, H_PAD, KC, H_PAD // KC, H_CACHE, DOT_PRECISION)
            hw_i, hw_f, hw_g, hw_o = _split_gates(hw, BLOCK_B, BLOCK_H)

            xrow = (((t * B + rows) * D + d).to(tl.int64) * 4 * H)[:, None] + u[None, :]
            pre_i = hw_i + tl.load(xg_ptr + xrow, mask=m_own, other=0.0).to(tl.float32)
            pre_f = hw_f + tl.load(xg_ptr + xrow + H, mask=m_own, other=0.0).to(tl.float32)
            pre_g = hw_g + tl.load(xg_ptr + xrow + 2 * H, mask=m_own, other=0.0).to(tl.float32)
            pre_o = hw_o + tl.load(xg_ptr + xrow + 3 * H, mask=m_own, other=0.0).to(tl.float32)

            own = (d * B + rows)[:, None] * H + u[None, :]
            c_prev = tl.load(c_ptr + own, mask=m_own, other=0.0)
            i, f, g, o, c_new, h_new = _lstm_cell_forward(pre_i, pre_f, pre_g, pre_o, c_prev)

            if SAVE_WS:  # off when the forward saves nothing for a backward
                wrow = (((t * B + rows) * D + d).to(tl.int64) * 5 * H)[:, None] + u[None, :]
                tl.store(ws_ptr + wrow, i, mask=m_own)
                tl.store(ws_ptr + wrow + H, f, mask=m_own)
                tl.store(ws_ptr + wrow + 2 * H, g, mask=m_own)
                tl.store(ws_ptr + wrow + 3 * H, o, mask=m_own)
                tl.store(ws_ptr + wrow + 4 * H, c_prev, mask=m_own)

            h_out = h_new.to(h_ptr.dtype.element_ty)
            yrow = (((t * B + rows) * D + d).to(tl.int64) * H)[:, None] + u[None, :]
            if HAS_LENGTHS:
                # Steps past a row's length keep its state and output zeros.
                valid = (t < tl.load(len_ptr + rows, mask=r_mask, other=0))[:, None]
                h_keep = tl.load(h_src + rows[:, None] * H + u[None, :], mask=m_own, other=0.0)
                if WRITE_Y:
                    tl.store(y_ptr + yrow, tl.where(valid, h_out, 0.0), mask=m_own)
                tl.store(h_dst + rows[:, None] * H + u[None, :], tl.where(valid, h_out, h_keep), mask=m_own)
                tl.store(c_ptr + own, tl.where(valid, c_new, c_prev), mask=m_own)
            else:
                if WRITE_Y:
                    tl.store(y_ptr + yrow, h_out, mask=m_own)
                tl.store(h_dst + rows[:, None] * H + u[None, :], h_out, mask=m_own)
                tl.store(c_ptr + own, c_new, mask=m_own)
        _end_of_step(bar_ptr, group, n_slices, slice_id, USE_GRID_BARRIER)


@triton.jit(do_not_specialize=_RUNTIME_SCALARS)
def lstm_backward_kernel(
    grad_y_ptr,
    ws_ptr,
    w_ptr,
    len_ptr,
    dg_ptr,
    dh_ptr,
    dc_ptr,
    bar_ptr,
    T,
    B,
    D,
    H,
    reverse_mask,
    n_bgroups,
    rows_per_group,
    step_begin,
    step_end,
    finish,
    H_PAD: tl.constexpr,
    KC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    USE_GRID_BARRIER: tl.constexpr,
    H_CACHE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Steps ``[step_begin, step_end)`` of the reverse-time backward, then (``finish``) ``dL/dh_0``.

    ``dg (T, B, D, 4H)`` receives the pre-activation gradients and doubles as the exchange
    buffer: step ``t``'s ``dL/dh_{t-1}`` for the owned units is ``dg_t @ W_hh[:, units]``, a
    reduction over all ``4H`` gate rows, which other programs wrote before the last barrier.
    ``dh (D, B, H)`` float32 holds the part of ``dL/dh`` carried past masked steps (``dL/dh_n``
    on entry, ``dL/dh_0`` on exit), ``dc (D, B, H)`` float32 ``dL/dc`` (``dL/dc_n`` → ``dL/dc_0``).
    """
    d, bgroup, slice_id, group, n_slices = _program_coords(H, n_bgroups, BLOCK_H)
    rev = (reverse_mask >> d) & 1

    u = slice_id * BLOCK_H + tl.arange(0, BLOCK_H)
    u_mask = u < H

    # W_hh[:, units] for dg @ W_hh (row gate * H_PAD + j holds W_hh row gate * H + j), loaded
    # once and kept on-chip for every step.
    w_base = w_ptr + d.to(tl.int64) * 4 * H * H
    w_chunks = _load_weight_chunks(w_base, u, u_mask, H, H, H_PAD, KC, 4 * H_PAD // KC)

    row_begin = bgroup * rows_per_group
    for s in range(step_begin, step_end):
        t = s + (1 - rev) * (T - 1 - 2 * s)  # each recurrence's own steps, last one first
        t_later = t + 1 - 2 * rev  # the step processed before this one (its successor in time)
        for r0 in range(row_begin, row_begin + rows_per_group, BLOCK_B):
            rows = r0 + tl.arange(0, BLOCK_B)
            r_mask = rows < B
            m_own = r_mask[:, None] & u_mask[None, :]

            dh_rec = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            dg_later = dg_ptr + ((t_later * B + rows) * D + d).to(tl.int64) * 4 * H
            dh_rec = _rows_dot(
                dg_later, r_mask & (s > 0), w_chunks, dh_rec, H, H_PAD, KC, 4 * H_PAD // KC, H_CACHE, DOT_PRECISION
            )

            own = (d * B + rows)[:, None] * H + u[None, :]
            incoming = tl.load(dh_ptr + own, mask=m_own, other=0.0) + dh_rec
            dc = tl.load(dc_ptr + own, mask=m_own, other=0.0)
            yrow = (((t * B + rows) * D + d).to(tl.int64) * H)[:, None] + u[None, :]
            dh = incoming + tl.load(grad_y_ptr + yrow, mask=m_own, other=0.0).to(tl.float32)

            wrow = (((t * B + rows) * D + d).to(tl.int64) * 5 * H)[:, None] + u[None, :]
            i = tl.load(ws_ptr + wrow, mask=m_own, other=0.0)
            f = tl.load(ws_ptr + wrow + H, mask=m_own, other=0.0)
            g = tl.load(ws_ptr + wrow + 2 * H, mask=m_own, other=0.0)
            o = tl.load(ws_ptr + wrow + 3 * H, mask=m_own, other=0.0)
            c_prev = tl.load(ws_ptr + wrow + 4 * H, mask=m_own, other=0.0)
            d_i, d_f, d_g, d_o, dc_prev = _lstm_cell_backward(dh, dc, i, f, g, o, c_prev)

            grow = (((t * B + rows) * D + d).to(tl.int64) * 4 * H)[:, None] + u[None, :]
            out_ty = dg_ptr.dtype.element_ty
            if HAS_LENGTHS:
                # A masked step passed h and c through: its gates get no gradient, dc is kept and
                # dL/dh travels on to the step before it.
                valid = (t < tl.load(len_ptr + rows, mask=r_mask, other=0))[:, None]
                tl.store(dg_ptr + grow, tl.where(valid, d_i, 0.0).to(out_ty), mask=m_own)
                tl.store(dg_ptr + grow + H, tl.where(valid, d_f, 0.0).to(out_ty), mask=m_own)
                tl.store(dg_ptr + grow + 2 * H, tl.where(valid, d_g, 0.0).to(out_ty), mask=m_own)
                tl.store(dg_ptr + grow + 3 * H, tl.where(valid, d_o, 0.0).to(out_ty), mask=m_own)
                tl.store(dc_ptr + own, tl.where(valid, dc_prev, dc), mask=m_own)
                tl.store(dh_ptr + own, tl.where(valid, 0.0, incoming), mask=m_own)
            else:
                tl.store(dg_ptr + grow, d_i.to(out_ty), mask=m_own)
                tl.store(dg_ptr + grow + H, d_f.to(out_ty), mask=m_own)
                tl.store(dg_ptr + grow + 2 * H, d_g.to(out_ty), mask=m_own)
                tl.store(dg_ptr + grow + 3 * H, d_o.to(out_ty), mask=m_own)
                tl.store(dc_ptr + own, dc_prev, mask=m_own)
                tl.store(dh_ptr + own, tl.zeros_like(incoming), mask=m_own)
        _end_of_step(bar_ptr, group, n_slices, slice_id, USE_GRID_BARRIER)

    if finish != 0:
        # dL/dh_0 = what was carried + the first step's gate gradients through W_hh. Those were
        # written by every program of the group before the last step's barrier (a launch launched
        # after the steps when the steps run one launch each).
        t_first = rev * (T - 1)
        for r0 in range(row_begin, row_begin + rows_per_group, BLOCK_B):
            rows = r0 + tl.arange(0, BLOCK_B)
            r_mask = rows < B
            m_own = r_mask[:, None] & u_mask[None, :]
            dh_rec = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            dg_first = dg_ptr + ((t_first * B + rows) * D + d).to(tl.int64) * 4 * H
            dh_rec = _rows_dot(
                dg_first, r_mask, w_chunks, dh_rec, H, H_PAD, KC, 4 * H_PAD // KC, H_CACHE, DOT_PRECISION
            )
            own = (d * B + rows)[:, None] * H + u[None, :]
            tl.store(dh_ptr + own, tl.load(dh_ptr + own, mask=m_own, other=0.0) + dh_rec, mask=m_own)
