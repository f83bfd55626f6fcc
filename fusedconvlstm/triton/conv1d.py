"""Triton kernels for one dense Conv1d layer on channels-last ``(B, T, C)`` data, forward and backward.

Every kernel is an implicit GEMM: a static loop over the ``k`` taps shifts the row index and
masks what falls into the zero padding, so no im2col buffer is ever written.

- forward: ``z[b, t, n] = bias[n] + Σ_j Σ_c h[b, t·s − p + j·d, c] · W[j, c, n]``, then
  ``y = act(z)``. GEMM with M = B·T_out rows, N = C_out, K = k·C_in.
- input gradient (the transposed conv): ``dh[b, u, c] = Σ_j Σ_n dz[b, (u + p − j·d) / s, n] · W[j, c, n]``
  over the taps where the division is exact. Rows are grouped by phase ``u mod s`` (one grid
  axis), so a program visits only the taps that reach its rows: no multiply-adds on zero rows
  for strided layers.
- weight and bias gradients: ``dW[j, c, n] = Σ_{b,t} h[b, t·s − p + j·d, c] · dz[b, t, n]`` and
  ``db[n] = Σ_{b,t} dz[b, t, n]``. The reduction over the B·T_out rows is cut into a fixed number
  of contiguous chunks; each program writes its own fp32 partial and the partials are summed in
  a fixed order afterwards. No atomics: the gradients are bitwise reproducible run to run.

Weights are packed tap-major, ``(k, C_in, C_out)`` (``w.permute(2, 1, 0)``), so a K-tile of
the GEMM is a contiguous slab and the C_out axis is the contiguous one.

The channel counts are ``constexpr``: a runtime ``C_in`` of 100 or 200 is known to Triton only
as "not a multiple of 16", and the masks ``ks < C_IN`` then split every load into 2-byte pieces
that the compiler does not pipeline (no ``cp.async``). Constants cost one compile per layer shape.

Activations between layers: a layer's kernel applies the *previous* layer's activation while it
loads its input (``IN_ACT``). Only the pre-activation ``z`` of each intermediate layer is written,
and that one tensor serves the next layer's forward, its weight gradient, and the activation
derivative in the backward (so a backward needs no post-activation copy). Every supported
activation maps 0 to 0, so applying it to the zero padding keeps it zero.

Dropout on a layer's input is applied the same way, as the layer loads it: ``act(z) · m · scale``
with the level's uint8 keep-mask ``m`` (:mod:`fusedconvlstm.triton.dropout`), in the forward and
in the weight gradient; the input gradient multiplies by ``m · scale`` in its epilogue. Neither
the dropped-out tensor nor (with a seed) the mask needs to be kept for the backward.

Accumulation is fp32 for fp16/bf16/fp32 inputs; fp32 inputs use TF32 tensor cores where PyTorch
allows it for a cuDNN convolution (its default) and IEEE fp32 otherwise and on the CPU
interpreter (:func:`dot_precision`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedconvlstm import config
from fusedconvlstm.calls.conv1d import ConvLayer
from fusedconvlstm.numerics.precision import fp32_allows_tf32
from fusedconvlstm.triton.elementwise import tanh

# ---------------------------------------------------------------------------------------------
# Products


@triton.jit
def round_to_tf32(x):
    """fp32 ``x`` rounded to the nearest TF32 value (10 mantissa bits), ties away from zero: what
    ``cvt.rna.tf32.f32`` gives, and how cuDNN and cuBLAS feed fp32 operands to TF32 tensor cores.
    Triton's TF32 dot passes the raw fp32 bits, which the MMA truncates. NaN stays NaN; a value
    that rounds past the largest finite float becomes infinity, as the instruction's does."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def dot_rounded(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` at ``PRECISION`` (``tl.dot``'s input precision): TF32 operands rounded to
    nearest first (:func:`round_to_tf32`), as cuDNN's TF32 convolutions round them."""
    if PRECISION == "tf32":
        a = round_to_tf32(a)
        b = round_to_tf32(b)
    return tl.dot(a, b, acc, input_precision=PRECISION)


# ---------------------------------------------------------------------------------------------
# Activations (fp32 in, fp32 out)
# ---------------------------------------------------------------------------------------------


@triton.jit
def activate(v, ACT: tl.constexpr):
    """``ACT`` (``none``, ``relu``, ``gelu`` (erf), ``silu``, ``tanh``) of fp32 ``v``."""
    if ACT == "relu":
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) is NaN, as in torch
    elif ACT == "gelu":
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == "silu":
        v = v * tl.sigmoid(v)
    elif ACT == "tanh":
        v = tanh(v)
    return v


@triton.jit
def activation_derivative(z, ACT: tl.constexpr):
    """Derivative of ``ACT`` at fp32 pre-activation ``z`` (``none`` gives 1)."""
    if ACT == "relu":
        d = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == "gelu":
        d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == "silu":
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == "tanh":
        t = tanh(z)
        d = 1.0 - t * t
    else:
        d = tl.full(z.shape, 1.0, tl.float32)
    return d


# ---------------------------------------------------------------------------------------------
# The implicit-GEMM main loop, shared by the per-layer and the fused-stack kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def conv_tile(
    acc,
    src_ptr,
    row_base,
    t_in0,
    row_ok,
    t_origin,
    T_SRC,
    stride_st,
    stride_sc,
    tok_ptr,
    tok_base,
    stride_tokt,
    VOCAB,
    w_ptr,
    cols,
    col_ok,
    C_IN,
    C_OUT,
    KSIZE: tl.constexpr,
    DIL: tl.constexpr,
    IN_ACT: tl.constexpr,
    GATHER: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    W_ALIGN: tl.constexpr,
    drop_ptr,
    drop_row,
    DROP: tl.constexpr,
    DROP_SCALE: tl.constexpr,
    TAP_INNER: tl.constexpr,
):
    """Accumulate one ``[BLOCK_M, BLOCK_N]`` output tile of a conv layer into fp32 ``acc``.

    Row ``r`` of the tile reads input time ``t_in0[r] + j·DIL`` for tap ``j``; a time outside
    ``[0, T_SRC)`` is zero padding. Its input row lives at ``src_ptr + row_base[r] +
    (t − t_origin)·stride_st``; with ``GATHER`` it is instead row ``tokens[tok_base[r] +
    t·stride_tokt]`` of the embedding table at ``src_ptr`` (``stride_st`` its row stride).
    ``w_ptr`` points at the layer's packed ``(k, C_in, C_out)`` weight; ``cols`` are the tile's
    output channels. ``ROW_ALIGN`` and ``W_ALIGN`` (elements) divide every input row offset and
    ``C_OUT``: Triton only learns divisibility by 16 from the arguments, and without these hints
    a 100-channel row would be read two bytes at a time. With ``DROP`` the input is multiplied by
    ``DROP_SCALE`` times its keep-mask, element ``(drop_row[r] + t)·C_IN + c`` of ``drop_ptr``
    (``drop_row = b·T_SRC``: the mask is indexed by logical position, wherever the rows live).
    """
    if TAP_INNER:
        # Channel chunks outside, taps inside (a switch the GPU session times against the default):
        # every tap's rows (and token ids) first, then each chunk over all taps.
        t_ins, oks, bases = (), (), ()
        for j in tl.static_range(KSIZE):
            t_in, ok, base = _tap_rows(
                j, t_in0, row_ok, row_base, t_origin, T_SRC, stride_st, tok_ptr, tok_base, stride_tokt, VOCAB,
                DIL, GATHER, ROW_ALIGN,
            )  # fmt: skip
            t_ins, oks, bases = t_ins + (t_in,), oks + (ok,), bases + (base,)
        for c0 in range(0, C_IN, BLOCK_K):
            for j in tl.static_range(KSIZE):
                acc = _tap_chunk(
                    acc, j, c0, t_ins[j], oks[j], bases[j], src_ptr, stride_sc, w_ptr, cols, col_ok, C_IN, C_OUT,
                    IN_ACT, BLOCK_K, PRECISION, W_ALIGN, drop_ptr, drop_row, DROP, DROP_SCALE,
                )  # fmt: skip
    else:
        for j in tl.static_range(KSIZE):
            t_in, ok, base = _tap_rows(
                j, t_in0, row_ok, row_base, t_origin, T_SRC, stride_st, tok_ptr, tok_base, stride_tokt, VOCAB,
                DIL, GATHER, ROW_ALIGN,
            )  # fmt: skip
            for c0 in range(0, C_IN, BLOCK_K):
                acc = _tap_chunk(
                    acc, j, c0, t_in, ok, base, src_ptr, stride_sc, w_ptr, cols, col_ok, C_IN, C_OUT, IN_ACT, BLOCK_K,
                    PRECISION, W_ALIGN, drop_ptr, drop_row, DROP, DROP_SCALE,
                )  # fmt: skip
    return acc


@triton.jit
def _tap_rows(
    j, t_in0, row_ok, row_base, t_origin, T_SRC, stride_st, tok_ptr, tok_base, stride_tokt, VOCAB,
    DIL: tl.constexpr, GATHER: tl.constexpr, ROW_ALIGN: tl.constexpr,
):  # fmt: skip
    """Tap ``j``'s input time of each row, whether it is inside the input, and the row's offset."""
    t_in = t_in0 + j * DIL
    ok = row_ok & (t_in >= 0) & (t_in < T_SRC)
    if GATHER:
        tok = tl.load(tok_ptr + tok_base + t_in.to(tl.int64) * stride_tokt, mask=ok, other=0).to(tl.int64)
        # Ids outside the table read as zero rows rather than out of bounds (the op checks
        # them on the host; this guards the launch that skipped the check).
        ok = ok & (tok >= 0) & (tok < VOCAB)
        base = tok * stride_st
    else:
        base = row_base + (t_in - t_origin).to(tl.int64) * stride_st
    base = tl.multiple_of(base, ROW_ALIGN)
    return t_in, ok, base


@triton.jit
def _tap_chunk(
    acc, j, c0, t_in, ok, base, src_ptr, stride_sc, w_ptr, cols, col_ok, C_IN, C_OUT, IN_ACT: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, W_ALIGN: tl.constexpr, drop_ptr, drop_row, DROP: tl.constexpr,
    DROP_SCALE: tl.constexpr,
):  # fmt: skip
    """``acc`` plus tap ``j``'s product over input channels ``[c0, c0 + BLOCK_K)``."""
    ks = c0 + tl.arange(0, BLOCK_K)
    k_ok = ks < C_IN
    a_ok = ok[:, None] & k_ok[None, :]
    a = tl.load(src_ptr + base[:, None] + ks[None, :] * stride_sc, mask=a_ok, other=0.0)
    if IN_ACT != "none" or DROP:
        a = activate(a.to(tl.float32), IN_ACT)
        if DROP:
            m_off = (drop_row + t_in.to(tl.int64)) * C_IN
            keep = tl.load(drop_ptr + m_off[:, None] + ks[None, :], mask=a_ok, other=0)
            a = a * (keep.to(tl.float32) * DROP_SCALE)
        a = a.to(src_ptr.dtype.element_ty)
    w_row = tl.multiple_of((j * C_IN + ks) * C_OUT, W_ALIGN)
    w = tl.load(w_ptr + w_row[:, None] + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    return dot_rounded(a, w, acc, PRECISION)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _conv1d_forward_kernel(
    src_ptr,
    tok_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    z_ptr,
    drop_ptr,
    M,
    T_IN,
    T_OUT,
    VOCAB,
    stride_sb,
    stride_st,
    stride_sc,
    stride_tokb,
    stride_tokt,
    stride_yb,
    stride_yt,
    stride_zb,
    stride_zt,
    PAD_L,
    C_IN: tl.constexpr,
    C_OUT: tl.constexpr,
    KSIZE: tl.constexpr,
    STRIDE: tl.constexpr,
    DIL: tl.constexpr,
    IN_ACT: tl.constexpr,
    OUT_ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_Z: tl.constexpr,
    GATHER: tl.constexpr,
    DROP: tl.constexpr,
    DROP_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    W_ALIGN: tl.constexpr,
    OUT_ALIGN: tl.constexpr,
    TAP_INNER: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    b = (rows // T_OUT).to(tl.int64)
    t = rows % T_OUT
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C_OUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = conv_tile(
        acc, src_ptr, b * stride_sb, t * STRIDE - PAD_L, row_ok, 0, T_IN, stride_st, stride_sc,
        tok_ptr, b * stride_tokb, stride_tokt, VOCAB, w_ptr, cols, col_ok, C_IN, C_OUT,
        KSIZE, DIL, IN_ACT, GATHER, BLOCK_K, PRECISION, ROW_ALIGN, W_ALIGN, drop_ptr, b * T_IN, DROP, DROP_SCALE,
        TAP_INNER,
    )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if STORE_Z:
        z_off = tl.multiple_of(b * stride_zb + t.to(tl.int64) * stride_zt, OUT_ALIGN)
        tl.store(z_ptr + z_off[:, None] + cols[None, :], acc.to(z_ptr.dtype.element_ty), mask=mask)
    y_off = tl.multiple_of(b * stride_yb + t.to(tl.int64) * stride_yt, OUT_ALIGN)
    tl.store(y_ptr + y_off[:, None] + cols[None, :], activate(acc, OUT_ACT).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv1d_input_grad_kernel(
    dz_ptr,
    w_ptr,
    zp_ptr,
    dh_ptr,
    drop_ptr,
    ROWS,
    PHASE_ROWS,
    T_IN,
    T_OUT,
    stride_dzb,
    stride_dzt,
    stride_zpb,
    stride_zpt,
    stride_dhb,
    stride_dht,
    PAD_L,
    C_IN: tl.constexpr,
    C_OUT: tl.constexpr,
    KSIZE: tl.constexpr,
    STRIDE: tl.constexpr,
    DIL: tl.constexpr,
    PREV_ACT: tl.constexpr,
    DROP: tl.constexpr,
    DROP_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    DZ_ALIGN: tl.constexpr,
    W_ALIGN: tl.constexpr,
    OUT_ALIGN: tl.constexpr,
):
    # Program (m, n, q) computes rows u = q + STRIDE·i of phase q, for PHASE_ROWS = ceil(T_IN / STRIDE)
    # values of i per sample; tap j reaches phase q iff STRIDE divides q + PAD_L − j·DIL.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    q = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b = (rows // PHASE_ROWS).to(tl.int64)
    i = rows % PHASE_ROWS
    u = q + STRIDE * i
    row_ok = (rows < ROWS) & (u < T_IN)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C_IN
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(KSIZE):
        off = q + PAD_L - j * DIL
        if off % STRIDE == 0:
            # Exact division: floor and truncation agree, also for negative off.
            t = i + off // STRIDE
            ok = row_ok & (t >= 0) & (t < T_OUT)
            base = tl.multiple_of(b * stride_dzb + t.to(tl.int64) * stride_dzt, DZ_ALIGN)
            for n0 in range(0, C_OUT, BLOCK_K):
                ns = n0 + tl.arange(0, BLOCK_K)
                n_ok = ns < C_OUT
                a = tl.load(dz_ptr + base[:, None] + ns[None, :], mask=ok[:, None] & n_ok[None, :], other=0.0)
                w_col = tl.multiple_of((j * C_IN + cols) * C_OUT, W_ALIGN)
                w = tl.load(w_ptr + w_col[None, :] + ns[:, None], mask=n_ok[:, None] & col_ok[None, :], other=0.0)
                acc = dot_rounded(a, w, acc, PRECISION)
    mask = row_ok[:, None] & col_ok[None, :]
    if DROP:
        m_off = (b * T_IN + u.to(tl.int64)) * C_IN
        keep = tl.load(drop_ptr + m_off[:, None] + cols[None, :], mask=mask, other=0)
        acc = acc * (keep.to(tl.float32) * DROP_SCALE)
    if PREV_ACT != "none":
        zp_off = tl.multiple_of(b * stride_zpb + u.to(tl.int64) * stride_zpt, OUT_ALIGN)
        zp = tl.load(zp_ptr + zp_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc = acc * activation_derivative(zp, PREV_ACT)
    dh_off = tl.multiple_of(b * stride_dhb + u.to(tl.int64) * stride_dht, OUT_ALIGN)
    tl.store(dh_ptr + dh_off[:, None] + cols[None, :], acc.to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv1d_weight_grad_kernel(
    src_ptr,
    tok_ptr,
    dz_ptr,
    dw_ptr,
    db_ptr,
    drop_ptr,
    M,
    T_IN,
    T_OUT,
    VOCAB,
    ROWS_PER_SPLIT,
    stride_sb,
    stride_st,
    stride_sc,
    stride_tokb,
    stride_tokt,
    stride_dzb,
    stride_dzt,
    PAD_L,
    C_IN: tl.constexpr,
    C_OUT: tl.constexpr,
    KSIZE: tl.constexpr,
    STRIDE: tl.constexpr,
    DIL: tl.constexpr,
    IN_ACT: tl.constexpr,
    GATHER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROP: tl.constexpr,
    DROP_SCALE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    DZ_ALIGN: tl.constexpr,
):
    # Program (c, n, split·KSIZE + j) reduces rows [split·ROWS_PER_SPLIT, ...) of tap j into
    # the fp32 partial dw[split, j, c-tile, n-tile]; the (j = 0, c = 0) programs also reduce db.
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_js = tl.program_id(2)
    j = pid_js % KSIZE
    split = pid_js // KSIZE
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C_IN
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < C_OUT
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        do_bias = (j == 0) & (pid_c == 0)
    else:
        do_bias = False
    r_start = split * ROWS_PER_SPLIT
    r_end = tl.minimum(M, r_start + ROWS_PER_SPLIT)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_ok = rows < r_end
        b = (rows // T_OUT).to(tl.int64)
        t = rows % T_OUT
        t_in = t * STRIDE - PAD_L + j * DIL
        in_ok = r_ok & (t_in >= 0) & (t_in < T_IN)
        if GATHER:
            tok = tl.load(tok_ptr + b * stride_tokb + t_in.to(tl.int64) * stride_tokt, mask=in_ok, other=0)
            tok = tok.to(tl.int64)
            in_ok = in_ok & (tok >= 0) & (tok < VOCAB)
            base = tok * stride_st
        else:
            base = b * stride_sb + t_in.to(tl.int64) * stride_st
        base = tl.multiple_of(base, ROW_ALIGN)
        h_ok = c_ok[:, None] & in_ok[None, :]
        h_t = tl.load(src_ptr + base[None, :] + cs[:, None] * stride_sc, mask=h_ok, other=0.0)
        if IN_ACT != "none" or DROP:
            h_t = activate(h_t.to(tl.float32), IN_ACT)
            if DROP:
                m_off = (b * T_IN + t_in.to(tl.int64)) * C_IN
                keep = tl.load(drop_ptr + m_off[None, :] + cs[:, None], mask=h_ok, other=0)
                h_t = h_t * (keep.to(tl.float32) * DROP_SCALE)
            h_t = h_t.to(src_ptr.dtype.element_ty)
        g_off = tl.multiple_of(b * stride_dzb + t.to(tl.int64) * stride_dzt, DZ_ALIGN)
        g = tl.load(dz_ptr + g_off[:, None] + ns[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = dot_rounded(h_t, g, acc, PRECISION)
    dw_off = ((split * KSIZE + j) * C_IN + cs).to(tl.int64) * C_OUT
    tl.store(dw_ptr + dw_off[:, None] + ns[None, :], acc, mask=c_ok[:, None] & n_ok[None, :])
    if do_bias:
        # A second pass over the (L2-resident) dz rows, by these programs only: summing inside
        # the main loop would break the wgmma pipeline of all of them.
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(r_start, r_end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            r_ok = rows < r_end
            g_off = (rows // T_OUT).to(tl.int64) * stride_dzb + (rows % T_OUT).to(tl.int64) * stride_dzt
            g_off = tl.multiple_of(g_off, DZ_ALIGN)
            g = tl.load(dz_ptr + g_off[:, None] + ns[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            db_acc += tl.sum(g.to(tl.float32), axis=0)
        tl.store(db_ptr + split * C_OUT + ns, db_acc, mask=n_ok)


@triton.jit
def _activation_grad_kernel(g_ptr, z_ptr, out_ptr, N, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * activation_derivative(z, ACT)).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _segment_sum(start_a, v_a, start_b, v_b):
    # Segmented scan: a run restarts where its start flag is set. A where, not a multiply by the
    # flag, so an inf or NaN in one segment does not leak into the next.
    return start_a | start_b, tl.where(start_b, v_b, v_a + v_b)


@triton.jit
def _embedding_grad_chunk_kernel(
    dh_ptr, order_ptr, ids_ptr, out_ptr, head_ptr, tail_ptr, N, E, VOCAB, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr
):
    # Pass 1 of the embedding gradient. ids are the token ids sorted stably, order[p] the
    # position that held ids[p]. Program c sums, per run of equal ids, the rows of sorted
    # positions [c·CHUNK, (c+1)·CHUNK). A run that lies inside the chunk goes straight to its
    # gradient row (no other program touches that row); a run crossing the chunk's edges leaves
    # the partial of its piece: head[c] for a run that began in an earlier chunk, tail[c] for one
    # that begins here and goes on. Pass 2 adds those up.
    c = tl.program_id(0)
    es = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = es < E
    i = tl.arange(0, CHUNK)
    p = c * CHUNK + i
    ok = p < N
    cur = tl.load(ids_ptr + p, mask=ok, other=-1)
    prv = tl.load(ids_ptr + p - 1, mask=ok & (p > 0), other=-1)
    nxt = tl.load(ids_ptr + p + 1, mask=p + 1 < N, other=-1)
    before = tl.load(ids_ptr + c * CHUNK - 1, mask=c > 0, other=-1)
    row = tl.load(order_ptr + p, mask=ok, other=0).to(tl.int64)
    v = tl.load(dh_ptr + row[:, None] * E + es[None, :], mask=ok[:, None] & e_ok[None, :], other=0.0)
    start = tl.broadcast_to(((cur != prv) | (i == 0))[:, None], (CHUNK, BLOCK_E))
    _, seg = tl.associative_scan((start, v), 0, _segment_sum)
    # seg at the last position of a run's piece in this chunk is that piece's sum.
    piece_end = ok & ((cur != nxt) | (i == CHUNK - 1))
    began_here = cur != before
    run_ends = cur != nxt
    valid = (cur >= 0) & (cur < VOCAB)
    whole = (piece_end & began_here & run_ends & valid)[:, None] & e_ok[None, :]
    tl.store(out_ptr + cur.to(tl.int64)[:, None] * E + es[None, :], seg, mask=whole)
    part = c.to(tl.int64) * E + es[None, :] + 0 * i[:, None]
    tl.store(head_ptr + part, seg, mask=(piece_end & ~began_here)[:, None] & e_ok[None, :])
    tl.store(tail_ptr + part, seg, mask=(piece_end & began_here & ~run_ends)[:, None] & e_ok[None, :])


@triton.jit
def _embedding_grad_runs_kernel(
    ids_ptr, out_ptr, head_ptr, tail_ptr, N, E, VOCAB, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr
):
    # Pass 2: program c owns the run that begins in chunk c and goes on past it (if any) and
    # writes its gradient row: tail[c], then the heads of the chunks the run covers, BLOCK_P
    # chunks at a time (tl.sum reduces in a fixed order). A run's chunks are consecutive, and
    # chunk k > c continues it iff ids[k·CHUNK] is its id (the ids are sorted).
    c = tl.program_id(0)
    es = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = es < E
    last = tl.minimum(c * CHUNK + CHUNK, N) - 1
    cur = tl.load(ids_ptr + last)
    nxt = tl.load(ids_ptr + last + 1, mask=last + 1 < N, other=-1)
    before = tl.load(ids_ptr + c * CHUNK - 1, mask=c > 0, other=-1)
    if (nxt == cur) & (before != cur) & (cur >= 0) & (cur < VOCAB):
        acc = tl.load(tail_ptr + c.to(tl.int64) * E + es, mask=e_ok, other=0.0)
        k0 = c + 1
        more = nxt == cur
        while more:
            ks = k0 + tl.arange(0, BLOCK_P)
            first = ks.to(tl.int64) * CHUNK
            in_run = tl.load(ids_ptr + first, mask=first < N, other=-1) == cur
            heads = tl.load(
                head_ptr + ks.to(tl.int64)[:, None] * E + es[None, :], mask=in_run[:, None] & e_ok[None, :], other=0.0
            )
            acc += tl.sum(heads, axis=0)
            more = tl.sum(in_run.to(tl.int32), axis=0) == BLOCK_P
            k0 += BLOCK_P
        tl.store(out_ptr + cur.to(tl.int64) * E + es, acc, mask=e_ok)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def alloc(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialised buffer for a kernel to fill; the tests replace it with a NaN-filled one to
    check that every element gets written."""
    return torch.empty(shape, dtype=dtype, device=device)


TAP_ORDERS = ("outer", "inner")


def tap_inner() -> bool:
    """Whether the forward conv tiles loop over taps inside the channel chunks
    (``FUSEDCONVLSTM_CONV1D_TAP_ORDER=inner``) instead of outside them (``outer``, the default): a
    switch the GPU session times both ways."""
    return config.choice("conv1d_tap_order", TAP_ORDERS, "outer") == "inner"


def dot_precision(dtype: torch.dtype, device: torch.device, layer: ConvLayer) -> str:
    """``tl.dot``'s input precision for ``layer``: TF32 for fp32 on CUDA where PyTorch allows it
    for the same operation (a cuDNN convolution, TF32 by default; a matmul for the projection,
    IEEE by default), else IEEE fp32. The kernels round TF32 operands to nearest
    (:func:`dot_rounded`), as cuDNN and cuBLAS do."""
    if dtype != torch.float32 or device.type != "cuda":
        return "ieee"
    return "tf32" if fp32_allows_tf32("matmul" if layer.matmul else "conv") else "ieee"


def align(*values: int) -> int:
    """Largest power of two up to 16 dividing every value (offsets in elements): the alignment
    hint of rows laid out with these strides."""
    a = 16
    while a > 1 and any(v % a for v in values):
        a //= 2
    return a


def gpu_properties(device: torch.device):
    """CUDA device properties of ``device`` (``torch.cuda.get_device_properties``), or ``None`` off
    a GPU (the CPU interpreter). Every tiling heuristic of the conv1d kernels sees the device
    through this function only, so the tests and ``tests/triton_compile_check.py`` can plan for an
    H100 without one."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device)


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def gemm_config(device: torch.device, m: int, n: int, k: int) -> dict:
    """Tile sizes and launch parameters for an ``m × n × k`` implicit GEMM.

    A fixed heuristic (no autotuning: it would compile every candidate at first call); the tile
    widths follow the channel counts so small layers do not waste most of a tile.
    """
    block_n = _pow2_clamp(n, 16, 128)
    block_k = _pow2_clamp(k, 16, 64)
    block_m = 128 if (gpu_properties(device) is not None and m >= 8192 and block_n >= 64) else 64
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    if block_m * block_n >= 128 * 128:
        block_k = min(block_k, 32)  # a 128x128x64 tile spills registers on sm_90 (ptxas -v)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=3)


def pack_weight(w: Tensor) -> Tensor:
    """``(C_out, C_in, k)`` to the kernels' tap-major ``(k, C_in, C_out)``, contiguous."""
    # A known fp32-only cost, layout kept on purpose: with C_out contiguous the forward GEMM's B
    # operand is N-major. sm_90 wgmma reads MN-major operands for 16-bit types only; in TF32 both
    # must be K-major, so Triton fills the weight tile with 4-byte copies instead of 16-byte ones
    # (``cp.async`` widths in tests/triton_compile_check.py with DTYPE=float32; the weight-gradient
    # kernel's M-major h and N-major dz likewise). bf16/fp16, the targets, are not affected.
    return w.permute(2, 1, 0).contiguous()


def unpack_weight(w_packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_weight` (a contiguous copy)."""
    return w_packed.permute(2, 1, 0).contiguous()


def _strides3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def conv1d_layer_forward(
    src: Tensor,
    w_packed: Tensor,
    bias: Tensor | None,
    layer: ConvLayer,
    t_in: int,
    y: Tensor,
    *,
    in_act: str = "none",
    out_act: str = "none",
    z: Tensor | None = None,
    tokens: Tensor | None = None,
    drop: Tensor | None = None,
    drop_scale: float = 1.0,
) -> None:
    """One layer: ``y = out_act(conv(in_act(src)) + bias)``, and ``z`` (pre-activation) if given;
    with ``drop`` (the input level's uint8 keep-mask ``(B, T_in, C_in)``) the input is
    ``in_act(src) · drop · drop_scale``.

    ``src`` is ``(B, T_in, C_in)`` with any strides, or the embedding table ``(V, C_in)`` when
    ``tokens`` ``(B, T_in)`` is given. ``y`` and ``z`` are ``(B, T_out, C_out)`` views with unit
    channel stride (``y`` may be a transposed view of a time-major buffer).
    """
    B, t_out = y.shape[0], y.shape[1]
    M = B * t_out
    cfg = gemm_config(y.device, M, layer.out_channels, layer.in_channels)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(layer.out_channels, cfg["BLOCK_N"]))
    if tokens is not None:
        s_b, s_t, s_c = 0, src.stride(0), src.stride(1)
        tok_b, tok_t, vocab = tokens.stride(0), tokens.stride(1), src.shape[0]
    else:
        (s_b, s_t, s_c), tok_b, tok_t, vocab = _strides3(src), 0, 0, 0
    _conv1d_forward_kernel[grid](
        src, tokens if tokens is not None else src, w_packed, bias if bias is not None else w_packed, y,
        z if z is not None else y, drop if drop is not None else y,
        M, t_in, t_out, vocab,
        s_b, s_t, s_c, tok_b, tok_t, y.stride(0), y.stride(1),
        z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
        layer.padding[0], C_IN=layer.in_channels, C_OUT=layer.out_channels,
        KSIZE=layer.kernel_size, STRIDE=layer.stride, DIL=layer.dilation, IN_ACT=in_act, OUT_ACT=out_act,
        HAS_BIAS=bias is not None, STORE_Z=z is not None, GATHER=tokens is not None,
        DROP=drop is not None, DROP_SCALE=float(drop_scale),
        PRECISION=dot_precision(w_packed.dtype, y.device, layer), ROW_ALIGN=align(s_b, s_t),
        W_ALIGN=align(layer.out_channels), OUT_ALIGN=align(*y.stride()[:2], *(z.stride()[:2] if z is not None else ())),
        TAP_INNER=tap_inner(),
        **cfg,
    )  # fmt: skip


def conv1d_layer_input_grad(
    dz: Tensor,
    w_packed: Tensor,
    layer: ConvLayer,
    dh: Tensor,
    *,
    prev_act: str = "none",
    z_prev: Tensor | None = None,
    drop: Tensor | None = None,
    drop_scale: float = 1.0,
) -> None:
    """``dh = conv_transpose(dz) · prev_act'(z_prev)``: the gradient at the layer's input, through
    the previous layer's activation when ``prev_act`` is not ``none`` (and through the input's
    dropout, ``· drop · drop_scale``, with ``drop``).

    ``dz`` ``(B, T_out, C_out)`` and ``dh``, ``z_prev`` ``(B, T_in, C_in)`` have unit channel stride.
    """
    B, t_in = dh.shape[0], dh.shape[1]
    t_out = dz.shape[1]
    phase_rows = triton.cdiv(t_in, layer.stride)
    rows = B * phase_rows
    cfg = gemm_config(dh.device, rows, layer.in_channels, layer.out_channels)
    grid = (
        triton.cdiv(rows, cfg["BLOCK_M"]),
        triton.cdiv(layer.in_channels, cfg["BLOCK_N"]),
        min(layer.stride, t_in),
    )
    zp = z_prev if z_prev is not None else dh
    _conv1d_input_grad_kernel[grid](
        dz, w_packed, zp, dh, drop if drop is not None else dh, rows, phase_rows, t_in, t_out,
        dz.stride(0), dz.stride(1), zp.stride(0), zp.stride(1), dh.stride(0), dh.stride(1), layer.padding[0],
        C_IN=layer.in_channels, C_OUT=layer.out_channels,
        KSIZE=layer.kernel_size, STRIDE=layer.stride, DIL=layer.dilation, PREV_ACT=prev_act,
        DROP=drop is not None, DROP_SCALE=float(drop_scale),
        PRECISION=dot_precision(w_packed.dtype, dh.device, layer), DZ_ALIGN=align(*dz.stride()[:2]),
        W_ALIGN=align(layer.out_channels), OUT_ALIGN=align(*dh.stride()[:2], *zp.stride()[:2]), **cfg,
    )  # fmt: skip


def weight_grad_splits(device: torch.device, tiles: int, rows: int, block_r: int) -> int:
    """How many fixed row chunks the weight-gradient reduction uses: enough programs to fill the
    GPU (two per SM), each chunk at least 8 row blocks long. A function of the shapes only, so a
    given problem always reduces in the same order."""
    props = gpu_properties(device)
    if props is None:
        return 1 if rows <= 4 * block_r else 2  # the interpreter: exercise both paths, cheaply
    sms = props.multi_processor_count
    want = triton.cdiv(2 * sms, max(tiles, 1))
    return max(1, min(want, triton.cdiv(rows, 8 * block_r), 64))


def conv1d_layer_weight_grad(
    src: Tensor,
    dz: Tensor,
    layer: ConvLayer,
    t_in: int,
    *,
    in_act: str = "none",
    tokens: Tensor | None = None,
    splits: int | None = None,
    drop: Tensor | None = None,
    drop_scale: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """Packed fp32 ``(k, C_in, C_out)`` weight gradient and fp32 bias gradient (``None`` without
    bias) of one layer, from its input ``src`` (as in :func:`conv1d_layer_forward`, ``drop`` too)
    and ``dz``."""
    B, t_out = dz.shape[0], dz.shape[1]
    M = B * t_out
    device = dz.device
    block_c = _pow2_clamp(layer.in_channels, 16, 64)
    block_n = _pow2_clamp(layer.out_channels, 16, 128)
    block_r = 32 if gpu_properties(device) is None else 64
    tiles = triton.cdiv(layer.in_channels, block_c) * triton.cdiv(layer.out_channels, block_n) * layer.kernel_size
    if splits is None:
        splits = weight_grad_splits(device, tiles, M, block_r)
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_r) * block_r
    splits = triton.cdiv(M, rows_per_split)
    dw = alloc((splits, layer.kernel_size, layer.in_channels, layer.out_channels), torch.float32, device)
    db = alloc((splits, layer.out_channels), torch.float32, device) if layer.has_bias else None
    if tokens is not None:
        s_b, s_t, s_c = 0, src.stride(0), src.stride(1)
        tok_b, tok_t, vocab = tokens.stride(0), tokens.stride(1), src.shape[0]
    else:
        (s_b, s_t, s_c), tok_b, tok_t, vocab = _strides3(src), 0, 0, 0
    grid = (
        triton.cdiv(layer.in_channels, block_c),
        triton.cdiv(layer.out_channels, block_n),
        splits * layer.kernel_size,
    )
    _conv1d_weight_grad_kernel[grid](
        src, tokens if tokens is not None else src, dz, dw, db if db is not None else dw,
        drop if drop is not None else dz, M, t_in, t_out, vocab, rows_per_split,
        s_b, s_t, s_c, tok_b, tok_t, dz.stride(0), dz.stride(1), layer.padding[0],
        C_IN=layer.in_channels, C_OUT=layer.out_channels, KSIZE=layer.kernel_size, STRIDE=layer.stride,
        DIL=layer.dilation, IN_ACT=in_act, GATHER=tokens is not None, HAS_BIAS=db is not None,
        DROP=drop is not None, DROP_SCALE=float(drop_scale), BLOCK_C=block_c, BLOCK_N=block_n, BLOCK_R=block_r,
        PRECISION=dot_precision(dz.dtype, device, layer), ROW_ALIGN=align(s_b, s_t), DZ_ALIGN=align(*dz.stride()[:2]),
        num_warps=4, num_stages=3,
    )  # fmt: skip
    # torch.sum over a fixed leading axis reduces in a fixed order: deterministic.
    dw = dw[0] if splits == 1 else dw.sum(0)
    if db is not None:
        db = db[0] if splits == 1 else db.sum(0)
    return dw, db


def activation_grad(g: Tensor, z: Tensor, act: str) -> Tensor:
    """``g · act'(z)`` (elementwise; ``g`` and ``z`` contiguous of one shape), in ``g``'s dtype."""
    out = alloc(g.shape, g.dtype, g.device)
    n = g.numel()
    block = 1024
    _activation_grad_kernel[(triton.cdiv(n, block),)](g, z, out, n, ACT=act, BLOCK=block)
    return out


EMBEDDING_GRAD_CHUNK = 64
"""Sorted positions per program in the embedding gradient's first pass (a power of two)."""

EMBEDDING_GRAD_BLOCK_P = 32
"""Chunk partials the second pass adds per step (a power of two)."""


def embedding_grad(dh: Tensor, tokens: Tensor, vocab: int) -> Tensor:
    """fp32 ``(vocab, E)`` gradient of an embedding table from fp32 ``dh`` ``(B, T, E)`` at the
    positions of ``tokens`` ``(B, T)``. Rows no token uses are zero.

    Deterministic without atomics, and parallel however often an id repeats (left padding makes
    id 0 most of the positions): the positions, sorted by id on the device, are cut into chunks
    of :data:`EMBEDDING_GRAD_CHUNK`; pass 1 sums each run of equal ids inside a chunk, pass 2 adds
    the pieces of the runs that cross chunks, in chunk order. Every sum has a fixed order, so
    the result is bitwise the same run to run."""
    E = dh.shape[-1]
    dh = dh.reshape(-1, E).contiguous()
    ids, order = torch.sort(tokens.reshape(-1), stable=True)
    out = torch.zeros((vocab, E), dtype=torch.float32, device=dh.device)
    n = ids.numel()
    if n == 0:
        return out
    chunk, block_p = EMBEDDING_GRAD_CHUNK, EMBEDDING_GRAD_BLOCK_P
    chunks = triton.cdiv(n, chunk)
    # One partial per chunk and side; only the slots pass 1 writes are read.
    head = alloc((chunks, E), torch.float32, dh.device)
    tail = alloc((chunks, E), torch.float32, dh.device)
    block_e = _pow2_clamp(E, 16, 32)
    grid = (chunks, triton.cdiv(E, block_e))
    _embedding_grad_chunk_kernel[grid](dh, order, ids, out, head, tail, n, E, vocab, CHUNK=chunk, BLOCK_E=block_e)
    _embedding_grad_runs_kernel[grid](ids, out, head, tail, n, E, vocab, CHUNK=chunk, BLOCK_P=block_p, BLOCK_E=block_e)
    return out
