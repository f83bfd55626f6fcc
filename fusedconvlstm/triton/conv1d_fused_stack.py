"""Triton kernel computing several consecutive Conv1d layers in one launch.

A *work item* is a tile of ``TILE`` output time steps of ``SAMPLES`` consecutive samples. Its
program computes every layer for that tile, one after the other, each layer an implicit GEMM
(:func:`fusedconvlstm.triton.conv1d.conv_tile`) over the rows the next layer will read:

- level ``L`` (the output) has ``R[L] = TILE`` rows per sample, starting at ``tile · TILE``;
- layer ``l`` (level ``l`` → ``l + 1``, kernel ``k``, stride ``s``, dilation ``d``, left padding
  ``p``) needs ``R[l] = (R[l+1] − 1)·s + d·(k − 1) + 1`` rows of level ``l``, starting at
  ``start[l] = start[l+1]·s − p``. Each k = 3 valid layer widens the window by 2 and stride 2
  doubles it: for the reference model a 45-step output tile reads 99 embedding rows. Rows of
  a tile's window that belong to its neighbour (the *halo*) are recomputed, not exchanged.

Where the intermediates live. Triton has no addressable shared memory and cannot slice a
register tile at a row offset, which a conv's shifted reads need. So a layer's output tile is
written to global memory and read back, shifted, by the next layer of the same program, after a
CTA barrier; the buffer is small and was just written, so it is served from L2 (on-chip) and
does not travel to HBM:

- inference (``save_for_backward=False``): each program of a persistent grid owns a *slab*
  holding one work item's intermediate windows, reused for every work item it processes. For
  the reference model a slab is 171 KB in bf16; the kernel compiles to 255 registers at 8 warps
  on sm_90 (``tests/triton_compile_check.py``), so one program is resident per SM and the live
  slabs take 132 × 171 KB ≈ 23 MB of the H100's 50 MB L2. With the LSTM projection the slab
  also holds the last conv's output, 217 KB: the budget per program is a share of the L2
  (:func:`slab_budget_bytes`), not a constant.
- training (``save_for_backward=True``): the backward needs each intermediate pre-activation
  anyway, so the layers write straight into those ``(B, T_l, C_l)`` tensors and read them
  back from there. Programs whose halos overlap write identical values to the shared rows.

Weights (about 1.8 MB for the reference model in bf16) are read from L2 by every program.

The kernel is specialised (``constexpr``) on the layer configuration: kernel sizes, strides,
dilations, paddings, activations, channel counts; lengths and tile sizes are runtime values,
so a new sequence length does not recompile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedconvlstm.calls.conv1d import ConvLayer
from fusedconvlstm.triton import conv1d as layer_kernels
from fusedconvlstm.triton.conv1d import activate, conv_tile, dot_precision


@triton.jit
def _conv1d_stack_fused_kernel(
    src_ptr,
    tok_ptr,
    w_ptrs,
    b_ptrs,
    inter_ptrs,
    y_ptr,
    zl_ptr,
    drop_ptrs,
    B,
    T_LENS,
    R,
    TILE,
    N_TILES,
    N_WORK,
    VOCAB,
    stride_sb,
    stride_st,
    stride_sc,
    stride_tokb,
    stride_tokt,
    stride_yb,
    stride_yt,
    stride_zlb,
    stride_zlt,
    NUM_LAYERS: tl.constexpr,
    CH: tl.constexpr,
    KS: tl.constexpr,
    STRIDES: tl.constexpr,
    DILS: tl.constexpr,
    PADL: tl.constexpr,
    ACTS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PROD: tl.constexpr,
    OFF: tl.constexpr,
    GATHER: tl.constexpr,
    SLAB: tl.constexpr,
    STORE_ZL: tl.constexpr,
    SAMPLES: tl.constexpr,
    SRC_ALIGN: tl.constexpr,
    W_ALIGNS: tl.constexpr,
    Y_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISIONS: tl.constexpr,
    DROPS: tl.constexpr,
    DROP_SCALES: tl.constexpr,
    TAP_INNER: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    for work in range(pid, N_WORK, n_prog):
        b0 = (work // N_TILES) * SAMPLES
        tile = work % N_TILES
        for i in tl.static_range(NUM_LAYERS):
            c_in = CH[i]
            c_out = CH[i + 1]
            r_out = R[i + 1]
            t_out_len = T_LENS[i + 1]
            start_out = tile * TILE * PROD[i + 1] - OFF[i + 1]
            start_in = tile * TILE * PROD[i] - OFF[i]
            n_rows = SAMPLES * r_out
            for m0 in range(0, n_rows, BLOCK_M):
                r = m0 + tl.arange(0, BLOCK_M)
                s_loc = r // r_out
                li = r % r_out
                b = b0 + s_loc
                t = start_out + li
                row_ok = (r < n_rows) & (b < B) & (t >= 0) & (t < t_out_len)
                b64 = b.to(tl.int64)
                for n0 in range(0, c_out, BLOCK_N):
                    cols = n0 + tl.arange(0, BLOCK_N)
                    col_ok = cols < c_out
                    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                    # Elements of constexpr tuples are wrapped in tl.constexpr where Triton 3.6 needs
                    # it (it fails to compile otherwise): strings passed to a jit function ("'str'
                    # object has no attribute 'type'") and the divisor of tl.multiple_of.
                    if i == 0:
                        acc = conv_tile(
                            acc, src_ptr, b64 * stride_sb, t * STRIDES[0] - PADL[0], row_ok, 0, T_LENS[0],
                            stride_st, stride_sc, tok_ptr, b64 * stride_tokb, stride_tokt, VOCAB,
                            w_ptrs[0], cols, col_ok, c_in, c_out, KS[0], DILS[0], "none", GATHER, BLOCK_K,
                            tl.constexpr(PRECISIONS[0]),
                            SRC_ALIGN, W_ALIGNS[0],
                            drop_ptrs[0], b64 * T_LENS[0], tl.constexpr(DROPS[0]), tl.constexpr(DROP_SCALES[0]),
                            TAP_INNER,
                        )  # fmt: skip
                    else:
                        if SLAB:
                            # Slab of level i: (programs, SAMPLES · R[i], c_in), rows from start_in.
                            in_base = (pid.to(tl.int64) * SAMPLES * R[i] + s_loc * R[i]) * c_in
                            origin = start_in
                        else:
                            in_base = b64 * T_LENS[i] * c_in
                            origin = 0
                        acc = conv_tile(
                            acc, inter_ptrs[i - 1], in_base, t * STRIDES[i] - PADL[i], row_ok, origin, T_LENS[i],
                            c_in, 1, tok_ptr, in_base, 0, VOCAB,
                            w_ptrs[i], cols, col_ok, c_in, c_out, KS[i], DILS[i], tl.constexpr(ACTS[i - 1]), False,
                            BLOCK_K, tl.constexpr(PRECISIONS[i]), W_ALIGNS[i - 1], W_ALIGNS[i],
                            drop_ptrs[i], b64 * T_LENS[i], tl.constexpr(DROPS[i]), tl.constexpr(DROP_SCALES[i]),
                            TAP_INNER,
                        )  # fmt: skip
                    if HAS_BIAS[i]:
                        acc += tl.load(b_ptrs[i] + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                    mask = row_ok[:, None] & col_ok[None, :]
                    if i == NUM_LAYERS - 1:
                        if STORE_ZL:
                            zl_off = tl.multiple_of(
                                b64 * stride_zlb + t.to(tl.int64) * stride_zlt, tl.constexpr(W_ALIGNS[i])
                            )
                            tl.store(
                                zl_ptr + zl_off[:, None] + cols[None, :], acc.to(zl_ptr.dtype.element_ty), mask=mask
                            )
                        y_off = tl.multiple_of(b64 * stride_yb + t.to(tl.int64) * stride_yt, Y_ALIGN)
                        y = activate(acc, tl.constexpr(ACTS[i])).to(y_ptr.dtype.element_ty)
                        tl.store(y_ptr + y_off[:, None] + cols[None, :], y, mask=mask)
                    else:
                        if SLAB:
                            out_off = (pid.to(tl.int64) * SAMPLES * r_out + r) * c_out
                        else:
                            out_off = (b64 * t_out_len + t) * c_out
                        out_off = tl.multiple_of(out_off, tl.constexpr(W_ALIGNS[i]))
                        dst = inter_ptrs[i]
                        tl.store(dst + out_off[:, None] + cols[None, :], acc.to(dst.dtype.element_ty), mask=mask)
            # The next layer reads rows other threads of this program just wrote.
            tl.debug_barrier()


# ---------------------------------------------------------------------------------------------
# Planning and launch
# ---------------------------------------------------------------------------------------------

SLAB_BUDGET_BYTES = 192 * 1024
"""Most bytes of intermediate windows per program in inference (slab) mode on the interpreter;
on a GPU the budget follows its L2 (:func:`slab_budget_bytes`)."""

SLAB_L2_FRACTION = 0.6
"""Share of the GPU's L2 the live slabs of all resident programs may take: the slabs are global
scratch that stays fast only while it stays in L2, next to the weights (1.8 MB for the reference
model in bf16), the input rows and the output being written."""

FUSED_KERNEL_REGISTERS = 256
"""Registers per thread the fused kernel is counted at (255 at the reference size on sm_90,
rounded to the allocation unit): what bounds the programs an SM holds."""

MIN_TILE = 16
"""Fewest output steps per tile when tiles are shrunk to give every resident program work."""

SAMPLES_PER_WORK_ITEM = 1
"""Samples per work item. More than one fills the GEMM row tiles better when a sample's window
is short (the reference model's 45 output rows use 45 of a 64-row tile) at the cost of a larger
slab; a tuning knob for the GPU session, exercised by the tests with 2."""


@dataclass(frozen=True)
class FusedPlan:
    """Tiling of one fused-stack launch."""

    tile: int  # output steps per work item
    samples: int  # samples per work item
    rows: tuple[int, ...]  # window rows per sample at each level 0..L
    n_tiles: int
    n_work: int
    programs: int
    slab: bool

    def computed_rows(self) -> int:
        """Rows of every layer's output computed per work item (halos included)."""
        return self.samples * sum(self.rows[1:])


def window_rows(layers: tuple[ConvLayer, ...], tile: int) -> tuple[int, ...]:
    """Rows per sample each level's window needs for a ``tile``-step output tile (levels 0..L)."""
    rows = [tile]
    for layer in reversed(layers):
        span = layer.dilation * (layer.kernel_size - 1) + 1
        rows.append((rows[-1] - 1) * layer.stride + span)
    return tuple(reversed(rows))


def needed_rows(layers: tuple[ConvLayer, ...], lens: list[int]) -> list[int]:
    """Per level (input, each layer's output), how many leading rows the final output depends on."""
    need = [lens[-1]]
    for layer, t in zip(reversed(layers), reversed(lens[:-1])):
        last = (need[0] - 1) * layer.stride - layer.padding[0] + layer.dilation * (layer.kernel_size - 1)
        need.insert(0, max(0, min(t, last + 1)))
    return need


def _slab_bytes(layers, rows, samples, elt) -> int:
    return sum(samples * r * layer.out_channels * elt for layer, r in zip(layers[:-1], rows[1:-1]))


def resident_programs(device: torch.device, num_warps: int) -> int:
    """Programs of a persistent grid of ``num_warps``-warp programs: as many as the GPU holds at once.

    The fused kernel is register-bound: at the reference size it compiles to 255 registers per
    thread (``tests/triton_compile_check.py``), so an SM's register file holds 8 of its warps, one
    8-warp program or two 4-warp ones. Smaller stacks may need fewer registers and fit more; the
    count errs low. The programs never wait for each other (a persistent loop over independent
    work items), so the count only sizes the grid and the slabs: it cannot deadlock. On the
    interpreter a few, so that the persistent loop and the slab reuse are exercised.
    """
    props = layer_kernels.gpu_properties(device)
    if props is None:
        return 3
    warps_per_sm = props.regs_per_multiprocessor // (FUSED_KERNEL_REGISTERS * props.warp_size)
    return max(1, warps_per_sm // num_warps) * props.multi_processor_count


def slab_budget_bytes(device: torch.device, programs: int) -> int:
    """Most bytes of intermediate windows one of ``programs`` resident programs may hold in slab
    mode: :data:`SLAB_L2_FRACTION` of the L2 shared out (H100/H200, 50 MB and 132 programs: about
    233 KiB), :data:`SLAB_BUDGET_BYTES` on the interpreter."""
    props = layer_kernels.gpu_properties(device)
    if props is None:
        return SLAB_BUDGET_BYTES
    return int(SLAB_L2_FRACTION * props.L2_cache_size) // max(programs, 1)


def _work_item_cost(layers: tuple[ConvLayer, ...], rows: tuple[int, ...], samples: int, block_m: int) -> int:
    """Multiply-adds a program issues for one work item: each layer's window rounded up to whole
    ``block_m``-row GEMM tiles (a 45-row window costs as much as a 64-row one)."""
    return sum(
        triton.cdiv(samples * r, block_m) * block_m * layer.kernel_size * layer.in_channels * layer.out_channels
        for layer, r in zip(layers, rows[1:])
    )


def plan_fused(
    layers: tuple[ConvLayer, ...], lens: list[int], batch: int, dtype: torch.dtype, device: torch.device, save: bool
) -> FusedPlan:
    """Choose the output tile.

    The largest tile allowed: the whole output sequence (no halo at all) or, in slab mode when
    its slab exceeds :func:`slab_budget_bytes`, the largest of 256, 128, 64, 32, 16 steps whose
    slab fits. Tiles are balanced: ``t_out`` is split into ``n`` equal tiles (not halved, which
    leaves a short tail: 45 = 22 + 22 + 1), the last one at least half as long where possible.
    When that gives fewer work items than resident programs, more tiles (each at least
    :data:`MIN_TILE` steps) are tried until every program has work, and the count with the
    shortest critical path wins: waves of work items times the cost of one. So a batch just
    short of the programs (128 samples on 132 SMs) keeps whole sequences, while batch 8 splits.
    """
    elt = torch.empty((), dtype=dtype).element_size()
    t_out = lens[-1]
    cfg = fused_block_config(layers, device)
    programs = resident_programs(device, cfg["num_warps"])
    budget = slab_budget_bytes(device, programs)
    samples = max(1, min(SAMPLES_PER_WORK_ITEM, batch))
    groups = triton.cdiv(batch, samples)
    candidates = [t_out] + [c for c in (256, 128, 64, 32, 16) if c < t_out]
    cap = candidates[-1]
    for c in candidates:
        if save or _slab_bytes(layers, window_rows(layers, c), samples, elt) <= budget:
            cap = c
            break
    # The interpreter has no critical path to shorten: there the most tiles tried win, so the CPU
    # tests run several tiles through the persistent loop.
    interpreter = layer_kernels.gpu_properties(device) is None
    n = triton.cdiv(t_out, cap)
    best_n, best_key = n, None
    while True:
        tile = triton.cdiv(t_out, n)
        n_tiles = triton.cdiv(t_out, tile)
        n_work = groups * n_tiles
        span = triton.cdiv(n_work, programs) * _work_item_cost(
            layers, window_rows(layers, tile), samples, cfg["BLOCK_M"]
        )
        # Equal tiles cannot always split t_out evenly (273 = 16 x 17 + 1); a tail under half a
        # tile would cost a whole work item's halo for a few steps, so such counts lose to any other.
        short_tail = 2 * (t_out - (n_tiles - 1) * tile) < tile
        key = (short_tail, span)
        if best_key is None or key < best_key or (interpreter and not short_tail):
            best_n, best_key = n, key
        if n_work >= programs or triton.cdiv(t_out, n + 1) < MIN_TILE:
            break
        n += 1
    tile = triton.cdiv(t_out, best_n)
    n_tiles = triton.cdiv(t_out, tile)
    n_work = groups * n_tiles
    return FusedPlan(
        tile=tile,
        samples=samples,
        rows=window_rows(layers, tile),
        n_tiles=n_tiles,
        n_work=n_work,
        programs=min(n_work, programs),
        slab=not save,
    )


def halo_overhead(layers: tuple[ConvLayer, ...], lens: list[int], plan: FusedPlan) -> float:
    """Rows computed by the fused launch over the rows the output depends on (≥ 1; exactly 1 for
    whole-sequence tiles). Rows the output does not need (a strided last layer skips the trailing
    row of its input) are counted in neither."""
    needed = sum(needed_rows(layers, lens)[1:])
    return plan.n_tiles * sum(min(r, t) for r, t in zip(plan.rows[1:], lens[1:])) / needed


def levels_with_gaps(layers: tuple[ConvLayer, ...], plan: FusedPlan) -> list[bool]:
    """For each intermediate level 1..L-1, whether rows lie between two tiles' windows.

    Tile ``k``'s window of level ``l`` starts at ``k · tile · Π strides[l:]``; when a later layer's
    kernel span is shorter than its stride (kernel 1, stride 2), a window is shorter than that
    spacing and the rows in between belong to no tile: the fused kernel never writes them. The
    output does not depend on them, but the backward visits them (multiplied by zero), so a
    training launch must hand the kernel zeroed buffers for these levels.
    """
    gaps = []
    for lv in range(1, len(layers)):
        spacing = plan.tile * math.prod(layer.stride for layer in layers[lv:])
        gaps.append(plan.n_tiles > 1 and plan.rows[lv] < spacing)
    return gaps


def fused_block_config(layers: tuple[ConvLayer, ...], device: torch.device) -> dict:
    """One tile shape for all layers of the launch."""
    widest = max(layer.out_channels for layer in layers)
    on_gpu = layer_kernels.gpu_properties(device) is not None
    block_n = 16 if widest <= 16 else (32 if widest <= 32 else (128 if on_gpu else 64))
    block_k = 16 if max(layer.in_channels for layer in layers) <= 16 else 32
    block_m = 64
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8 if block_n >= 128 else 4, num_stages=2)


def conv1d_stack_fused_forward(
    src: Tensor,
    tokens: Tensor | None,
    w_packed: list[Tensor],
    bias: list[Tensor | None],
    layers: tuple[ConvLayer, ...],
    lens: list[int],
    y: Tensor,
    intermediates: list[Tensor] | None,
    z_last: Tensor | None,
    drops: list[tuple[Tensor, float] | None] | None = None,
) -> FusedPlan:
    """Run all ``layers`` in one launch.

    ``src`` is ``(B, T, C)`` (any strides) or, with ``tokens``, the embedding table. ``y`` is the
    ``(B, T_out, C_out)`` output view (unit channel stride). ``intermediates`` are the
    contiguous ``(B, T_l, C_l)`` pre-activations of levels 1..L-1 to write (training), or
    ``None`` for inference (slab mode). ``z_last`` receives the last layer's pre-activation.
    ``drops`` holds per layer ``(keep-mask of its input, scale)`` or ``None`` (no dropout).
    """
    B = y.shape[0]
    device = y.device
    save = intermediates is not None
    plan = plan_fused(layers, lens, B, src.dtype, device, save)
    if save:
        inter = tuple(intermediates)
    else:
        inter = tuple(
            layer_kernels.alloc((plan.programs, plan.samples * r, layer.out_channels), src.dtype, device)
            for layer, r in zip(layers[:-1], plan.rows[1:-1])
        )
    L = len(layers)
    prod, off = [1] * (L + 1), [0] * (L + 1)
    for i in range(L - 1, -1, -1):
        prod[i] = prod[i + 1] * layers[i].stride
        off[i] = off[i + 1] * layers[i].stride + layers[i].padding[0]
    if tokens is not None:
        s_b, s_t, s_c = 0, src.stride(0), src.stride(1)
        tok_b, tok_t, vocab = tokens.stride(0), tokens.stride(1), src.shape[0]
    else:
        s_b, s_t, s_c = src.stride()
        tok_b, tok_t, vocab = 0, 0, 0
    drops = list(drops) if drops is not None else [None] * L
    cfg = fused_block_config(layers, device)
    _conv1d_stack_fused_kernel[(plan.programs,)](
        src, tokens if tokens is not None else src, tuple(w_packed),
        tuple(b if b is not None else w for b, w in zip(bias, w_packed)), inter, y,
        z_last if z_last is not None else y, tuple(d[0] if d is not None else y for d in drops),
        B, tuple(lens), plan.rows, plan.tile, plan.n_tiles, plan.n_work, vocab,
        s_b, s_t, s_c, tok_b, tok_t, y.stride(0), y.stride(1),
        z_last.stride(0) if z_last is not None else 0, z_last.stride(1) if z_last is not None else 0,
        NUM_LAYERS=L,
        CH=tuple([layers[0].in_channels] + [layer.out_channels for layer in layers]),
        KS=tuple(layer.kernel_size for layer in layers),
        STRIDES=tuple(layer.stride for layer in layers),
        DILS=tuple(layer.dilation for layer in layers),
        PADL=tuple(layer.padding[0] for layer in layers),
        ACTS=tuple(layer.activation for layer in layers),
        HAS_BIAS=tuple(b is not None for b in bias),
        PROD=tuple(prod), OFF=tuple(off),
        GATHER=tokens is not None, SLAB=not save, STORE_ZL=z_last is not None, SAMPLES=plan.samples,
        SRC_ALIGN=layer_kernels.align(s_b, s_t), W_ALIGNS=tuple(layer_kernels.align(c.out_channels) for c in layers),
        Y_ALIGN=layer_kernels.align(y.stride(0), y.stride(1)),
        PRECISIONS=tuple(dot_precision(y.dtype, device, layer) for layer in layers),
        DROPS=tuple(d is not None for d in drops), DROP_SCALES=tuple(float(d[1]) if d is not None else 1.0 for d in drops),
        TAP_INNER=layer_kernels.tap_inner(),
        **cfg,
    )  # fmt: skip
    return plan
