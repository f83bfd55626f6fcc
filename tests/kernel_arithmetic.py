"""The GPU's arithmetic on the LSTM kernels' data paths, emulated on the CPU.

The Triton interpreter refuses 16-bit dots and evaluates ``exp`` exactly, and the CPU model of the
persistent CUDA kernels (:mod:`tests.persistent_kernel_model`) computes in float64: neither says
whether the kernels' rounding design meets the pass mark in bfloat16 / float16. This module runs
the kernels' recurrences in float64 tensors that hold, at every step, exactly the values the GPU
holds: each value is rounded where the kernel rounds it, and the approximate instructions are
evaluated with the formulas the compiled code uses, their hardware error emulated within its
documented bound.

Persistent CUDA kernels (``csrc/lstm_persistent_{forward,backward}.cu``; the PTX compiled from them
with CUDA 13.0 for sm_80 is what the formulas below follow):

- 16-bit (``T``): ``xg``, ``W_hh`` (the shared-memory slice), ``h`` (exchange buffer, ``y``,
  ``h_n``), ``grad_y``, ``dG`` (exchange buffer and ``dgates``); ``c_n``, ``grad_h0``, ``grad_c0``
  and ``dW_hh`` rounded once at the end (the driver's ``.to(dtype)``, cuBLAS's output);
- ``mma.sync`` products exact, accumulated in fp32 one k-step (16 elements) at a time, the ``wk``
  reduction warps' partial sums added in order in fp32 (:func:`recurrent_product`);
- cell math in fp32, one rounding per instruction, the contractions the compiler made (``c_t =
  fma(c_{t-1}, f, i g)``, ``dc_t = fma(dh o, 1 - tanh² c, dc)``);
- ``sigmoid(x) = rcp.rn(fma(ex2.approx(r), 2^j, 1))`` (``expf``'s range reduction, fused with the
  ``1 +``), ``tanhf`` as ``1 - 2 rcp.approx(ex2.approx(2|x| log2 e) + 1)`` above 0.6 and an odd
  polynomial below; ``ex2.approx.ftz.f32`` within 2 ulp, ``rcp.approx.ftz.f32`` within 1 ulp
  (PTX ISA), the error a fixed pseudo-random function of the argument's bits (``APPROX``).

Triton LSTM kernels (``fusedconvlstm/triton/lstm_kernels.py``, :func:`triton_forward`): 16-bit dot
operands with fp32 accumulation one ``KC`` chunk at a time, ``c`` and the workspace in fp32, ``exp``
lowered to ``ex2.approx.f32(x * log2 e)`` and fp32 division to ``div.full.f32`` (within 2 ulp).

:class:`Design` names the choices a kernel could have made otherwise (``c`` kept in 16 bits, a
16-bit accumulator, a 16-bit ``dL/dc``, a 16-bit workspace); the tests show where each wrong one
fails the pass mark.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

from fusedconvlstm.numerics.recurrence import previous_hidden

F64 = torch.float64
K_STEP = 16  # elements of one mma.m16n8k16 k-step (16-bit operands)
# How the approximate instructions err: "hash" (a pseudo-random error within the bound, a fixed
# function of the argument), "high" / "low" (always the bound's full error, one sign), "exact".
APPROX = "hash"


def _f32_bits(word: int) -> float:
    return struct.unpack("<f", struct.pack("<I", word))[0]


# ---------------------------------------------------------------------------------------------
# Roundings (float64 tensors holding fp32 / 16-bit values)


def f32(x: Tensor) -> Tensor:
    """Round to fp32, to nearest even (every fp32 instruction's result)."""
    return x.float().double()


def f32_rz(x: Tensor) -> Tensor:
    """Round to fp32 toward zero (how tensor cores are measured to normalise their sums)."""
    r = x.float()
    over = r.double().abs() > x.abs()
    r[over] = torch.nextafter(r[over], torch.zeros_like(r[over]))
    return r.double()


def to16(x: Tensor, dtype: torch.dtype) -> Tensor:
    """An fp32 value stored in the 16-bit ``dtype`` (``__float2bfloat16_rn`` / ``__float2half_rn``)."""
    return x.float().to(dtype).double()


def fma32(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """``fma.rn.f32``: the product of two fp32 values is exact in float64, one rounding after the sum."""
    return f32(a * b + c)


def _ulp32(r: Tensor) -> Tensor:
    a = r.float().abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


def _approx(exact: Tensor, arg: Tensor, bound: int, mode: str | None = None) -> Tensor:
    """``exact`` rounded to fp32, then off by at most ``bound`` ulp as ``mode`` (default
    :data:`APPROX`) says: the error of an ``.approx`` instruction at argument ``arg``."""
    mode = APPROX if mode is None else mode
    r = f32(exact)
    if mode == "exact":
        return r
    if mode == "hash":
        bits = arg.float().view(torch.int32).long() & 0xFFFFFFFF
        k = ((bits * 2654435761) % 2**32 >> 16) % (2 * bound + 1) - bound
    else:
        k = torch.full_like(r, bound if mode == "high" else -bound)
    return f32(r + k.double() * _ulp32(r))


def ex2_approx(a: Tensor, mode: str | None = None) -> Tensor:
    """``ex2.approx.ftz.f32``: 2^a within 2 ulp."""
    return _approx(torch.exp2(a), a, 2, mode)


def rcp_approx(a: Tensor, mode: str | None = None) -> Tensor:
    """``rcp.approx.ftz.f32``: 1/a within 1 ulp."""
    return _approx(1.0 / a, a, 1, mode)


def div_full(a: Tensor, b: Tensor, mode: str | None = None) -> Tensor:
    """``div.full.f32`` (Triton's fp32 division): a/b within 2 ulp."""
    return _approx(a / b, b, 2, mode)


# expf's constants as the PTX has them: log2(e)/252 (the clamp), log2(e) split in two.
_L2E_252 = _f32_bits(0x3BBB989D)
_L2E_HI = _f32_bits(0x3FB8AA3B)
_L2E_LO = _f32_bits(0x32A57060)
_TWO_L2E = _f32_bits(0x4038AA3B)
_TANH_SMALL = _f32_bits(0x3F19999A)  # 0.6: below, the polynomial
_TANH_ONE = _f32_bits(0x41102CB4)  # from here tanhf is 1
_TANH_POLY = [_f32_bits(w) for w in (0x3C80F082, 0xBD563CAE, 0x3E085941, 0xBEAAA9ED)]
LOG2E = _f32_bits(0x3FB8AA3B)  # Triton's exp multiplies by log2(e) as an fp32 constant


def cuda_sigmoid(x: Tensor) -> Tensor:
    """``1 / (1 + expf(-x))`` as compiled: expf's range reduction ``2^(y log2 e) = 2^j 2^r``
    (``j = floor(y log2 e)``), ``ex2.approx`` of ``r``, the ``1 +`` fused into the scaling fma,
    then ``rcp.rn``."""
    y = -x
    s = fma32(y, torch.full_like(y, _L2E_252), torch.full_like(y, 0.5)).clamp(0.0, 1.0)
    n = torch.floor(s * 252.0)  # fma.rm(s, 252, 1.5 * 2^23 + 1): the integer part
    j = n - 126.0
    r = fma32(y, torch.full_like(y, _L2E_HI), -j)
    r = fma32(y, torch.full_like(y, _L2E_LO), r)
    v = fma32(ex2_approx(r), torch.exp2(j), torch.ones_like(y))
    return f32(1.0 / v)


def cuda_tanh(x: Tensor) -> Tensor:
    """``tanhf`` as compiled (CUDA 13.0): ``1 - 2 / (2^(2|x| log2 e) + 1)`` with ``ex2.approx`` and
    ``rcp.approx`` from |x| = 0.6, an odd polynomial below."""
    ax = x.abs()
    e = ex2_approx(f32(ax * _TWO_L2E))
    large = fma32(rcp_approx(f32(e + 1.0)), torch.full_like(x, -2.0), torch.ones_like(x))
    large = torch.where(ax >= _TANH_ONE, torch.ones_like(x), large)
    large = torch.copysign(large, x)
    x2 = f32(x * x)
    p = torch.full_like(x, _TANH_POLY[0])
    for coef in _TANH_POLY[1:]:
        p = fma32(p, x2, torch.full_like(x, coef))
    p = fma32(p, x2, torch.zeros_like(x))
    small = fma32(p, x, x)
    return torch.where(ax >= _TANH_SMALL, large, small)


def triton_exp(x: Tensor) -> Tensor:
    """Triton's fp32 ``exp``: ``ex2.approx.f32(x * log2 e)``."""
    return ex2_approx(f32(x * LOG2E))


def triton_sigmoid(x: Tensor) -> Tensor:
    """``fusedconvlstm.triton.elementwise.sigmoid`` on the GPU."""
    one = torch.ones_like(x)
    return div_full(one, f32(1.0 + triton_exp(-x)))


def triton_tanh(x: Tensor) -> Tensor:
    """``fusedconvlstm.triton.elementwise.tanh`` on the GPU (one rounding per operation)."""
    ax = x.abs()
    e = triton_exp(f32(-2.0 * ax))
    large = div_full(f32(1.0 - e), f32(1.0 + e))
    x2 = f32(ax * ax)
    q = f32(2.0 / 15.0 + f32(x2 * f32(-17.0 / 315.0 + f32(x2 * (62.0 / 2835.0)))))
    q = f32(1.0 + f32(x2 * f32(-1.0 / 3.0 + f32(x2 * q))))
    small = f32(ax * q)
    r = torch.where(ax < 0.25, small, large)
    return torch.where(x < 0, -r, r)


# ---------------------------------------------------------------------------------------------
# The design: where the kernels keep what


@dataclass(frozen=True)
class Design:
    """The precision choices of a kernel's data path; the defaults are the kernels'. The tests
    show each other value of ``c_state``, ``accumulate`` ("16"), ``exchange_product`` and
    ``grad_state`` failing the pass mark; ``workspace`` is there to measure what a 16-bit
    workspace would cost (``fp32_rz`` accumulation passes: the hardware's normalisation)."""

    c_state: str = "fp32"  # "16": c rounded to the 16-bit dtype after every step
    accumulate: str = "fp32"  # "fp32_rz": normalised toward zero; "16": the accumulator in 16 bits
    workspace: str = "fp32"  # "16": the saved activations and c in the 16-bit dtype
    exchange_product: str = "fp32"  # "16": h W_hhᵀ rounded to 16 bits before xg is added
    grad_state: str = "fp32"  # "16": the backward's dL/dc rounded to 16 bits after every step


KERNEL = Design()


def _accumulate(x: Tensor, design: Design, dtype: torch.dtype) -> Tensor:
    if design.accumulate == "fp32":
        return f32(x)
    if design.accumulate == "fp32_rz":
        return f32_rz(x)
    return to16(f32(x), dtype)


def recurrent_product(a: Tensor, w: Tensor, wk: int, design: Design, dtype: torch.dtype, chunk: int = K_STEP):
    """``a @ wᵀ`` as the kernels' tensor cores form it: ``a (B, K)``, ``w (N, K)`` 16-bit values;
    each of the ``wk`` reduction warps accumulates its k-steps (``chunk`` elements, exact products)
    in fp32 from zero, then the partial sums are added in order in fp32 (``gate_preactivations``)."""
    K = a.shape[1]
    nks = -(-K // chunk)
    total = None
    for kw in range(wk):
        acc = torch.zeros(a.shape[0], w.shape[0], dtype=F64)
        for ks in range(kw * nks // wk, (kw + 1) * nks // wk):
            k0, k1 = ks * chunk, min((ks + 1) * chunk, K)
            acc = _accumulate(acc + a[:, k0:k1] @ w[:, k0:k1].t(), design, dtype)
        total = acc if total is None else f32(total + acc)
    return total


def _store(x: Tensor, kind: str, dtype: torch.dtype) -> Tensor:
    return to16(x, dtype) if kind == "16" else x


# ---------------------------------------------------------------------------------------------
# The persistent CUDA kernels


def persistent_forward(xg, w_hh, h0, c0, lengths, reverse, dtype, wk=1, design: Design = KERNEL):
    """``lstm_persistent_forward_kernel`` on 16-bit ``dtype`` data: ``(y, h_n, c_n, workspace)``.

    ``xg (T, B, D, 4H)``, ``w_hh (D, 4H, H)``, ``h0``, ``c0 (D, B, H)`` hold ``dtype`` values
    (float64 tensors); ``wk``: the launch's reduction warps. ``c_n`` as the driver returns it
    (rounded to ``dtype``); ``workspace`` fp32 ``[i, f, g, o, c]`` per step."""
    T, B, D, G = xg.shape
    H = G // 4
    y = torch.zeros(T, B, D, H, dtype=F64)
    ws = torch.zeros(T, B, D, 5 * H, dtype=F64)
    h_n, c_n = torch.empty(D, B, H, dtype=F64), torch.empty(D, B, H, dtype=F64)
    for d in range(D):
        h, c = h0[d].clone(), f32(c0[d])
        for s in range(T):
            t = T - 1 - s if reverse[d] else s
            hw = recurrent_product(h, w_hh[d], wk, design, dtype)
            if design.exchange_product == "16":
                hw = to16(hw, dtype)
            pre = f32(hw + xg[t, :, d])
            p_i, p_f, p_g, p_o = pre.split(H, dim=1)
            i, f, g, o = cuda_sigmoid(p_i), cuda_sigmoid(p_f), cuda_tanh(p_g), cuda_sigmoid(p_o)
            c_new = _store(fma32(c, f, f32(i * g)), design.c_state, dtype)
            h_new = to16(f32(o * cuda_tanh(c_new)), dtype)
            valid = torch.ones(B, 1, dtype=torch.bool) if lengths is None else (t < lengths).unsqueeze(1)
            h = torch.where(valid, h_new, h)
            c = torch.where(valid, c_new, c)
            y[t, :, d] = torch.where(valid, h_new, 0.0)
            saved = _store(torch.cat([i, f, g, o, c_new], dim=1), design.workspace, dtype)
            ws[t, :, d] = torch.where(valid, saved, 0.0)
        h_n[d], c_n[d] = h, to16(c, dtype)
    return y, h_n, c_n, ws


def persistent_backward(
    grad_y, grad_h_n, grad_c_n, ws, w_hh, h0, c0, y, lengths, reverse, dtype, wk=1, design: Design = KERNEL
):
    """``lstm_persistent_backward_kernel`` then the driver's ``dW_hh`` GEMM on 16-bit ``dtype``
    data: ``(dgates, dW_hh, grad_h0, grad_c0)`` as the driver returns them (all in ``dtype``).

    ``grad_y (T, B, D, H)``, ``grad_h_n``, ``grad_c_n``, ``h0``, ``c0 (D, B, H)`` hold ``dtype``
    values; ``ws`` and ``y`` the emulated forward's."""
    T, B, D, H = grad_y.shape
    G = 4 * H
    dgates = torch.zeros(T, B, D, G, dtype=F64)
    grad_h0, grad_c0 = torch.empty(D, B, H, dtype=F64), torch.empty(D, B, H, dtype=F64)
    for d in range(D):
        rev = reverse[d]
        w_t = w_hh[d].t()  # (H, 4H): the shared slice holds W_hhᵀ, dh_rec = dG W_hh
        dh_carry, dc = f32(grad_h_n[d]), f32(grad_c_n[d])
        g_prev = torch.zeros(B, G, dtype=F64)
        for s in range(T + 1):
            incoming = f32(recurrent_product(g_prev, w_t, wk, design, dtype) + dh_carry)
            if s == T:
                dh_carry = incoming  # grad_h0
                break
            t = s if rev else T - 1 - s
            valid = torch.ones(B, 1, dtype=torch.bool) if lengths is None else (t < lengths).unsqueeze(1)
            i, f, g, o, c = ws[t, :, d].split(H, dim=1)
            t_prev = t + 1 if rev else t - 1
            if 0 <= t_prev < T:
                c_prev = ws[t_prev, :, d, 4 * H :]
                if rev and lengths is not None:
                    c_prev = torch.where((t_prev < lengths).unsqueeze(1), c_prev, f32(c0[d]))
            else:
                c_prev = f32(c0[d])
            dh = f32(incoming + grad_y[t, :, d])
            tc = cuda_tanh(c)
            dc_t = fma32(f32(dh * o), f32(1.0 - f32(tc * tc)), dc)
            grads = torch.cat(
                [
                    f32(f32(1.0 - i) * f32(i * f32(g * dc_t))),
                    f32(f32(1.0 - f) * f32(f * f32(c_prev * dc_t))),
                    f32(f32(1.0 - f32(g * g)) * f32(i * dc_t)),
                    f32(f32(1.0 - o) * f32(o * f32(dh * tc))),
                ],
                dim=1,
            )
            g_prev = torch.where(valid, to16(grads, dtype), 0.0)
            dgates[t, :, d] = g_prev
            dc = torch.where(valid, _store(f32(dc_t * f), design.grad_state, dtype), dc)
            dh_carry = torch.where(valid, 0.0, incoming)
        grad_h0[d], grad_c0[d] = to16(dh_carry, dtype), to16(dc, dtype)
    prev = previous_hidden(y, h0, lengths, reverse)
    # cuBLAS: 16-bit operands, fp32 accumulation (exact here: its error is far below the output's
    # rounding), the result rounded to dtype.
    dw_hh = to16(f32(torch.einsum("tbdg,tbdp->dgp", dgates, prev)), dtype)
    return dgates, dw_hh, grad_h0, grad_c0


# ---------------------------------------------------------------------------------------------
# The Triton kernels


def triton_forward(xg, w_hh, h0, c0, lengths, reverse, dtype, kc=16, design: Design = KERNEL):
    """``lstm_forward_kernel`` on 16-bit ``dtype`` data: ``(y, h_n, c_n, workspace)``, the
    workspace ``[i, f, g, o, c_{t-1}]`` (fp32) as that kernel saves it; ``kc``: the dot's chunk."""
    T, B, D, G = xg.shape
    H = G // 4
    y = torch.zeros(T, B, D, H, dtype=F64)
    ws = torch.zeros(T, B, D, 5 * H, dtype=F64)
    h_n, c_n = torch.empty(D, B, H, dtype=F64), torch.empty(D, B, H, dtype=F64)
    for d in range(D):
        h, c = h0[d].clone(), f32(c0[d])
        for s in range(T):
            t = T - 1 - s if reverse[d] else s
            hw = recurrent_product(h, w_hh[d], 1, design, dtype, chunk=kc)
            if design.exchange_product == "16":
                hw = to16(hw, dtype)
            pre = f32(hw + xg[t, :, d])
            p_i, p_f, p_g, p_o = pre.split(H, dim=1)
            i, f, g, o = triton_sigmoid(p_i), triton_sigmoid(p_f), triton_tanh(p_g), triton_sigmoid(p_o)
            c_new = _store(f32(f32(f * c) + f32(i * g)), design.c_state, dtype)
            h_new = to16(f32(o * triton_tanh(c_new)), dtype)
            valid = torch.ones(B, 1, dtype=torch.bool) if lengths is None else (t < lengths).unsqueeze(1)
            saved = _store(torch.cat([i, f, g, o, c], dim=1), design.workspace, dtype)
            ws[t, :, d] = saved
            h = torch.where(valid, h_new, h)
            c = torch.where(valid, c_new, c)
            y[t, :, d] = torch.where(valid, h_new, 0.0)
        h_n[d], c_n[d] = h, to16(c, dtype)
    return y, h_n, c_n, ws


def triton_backward(
    grad_y, grad_h_n, grad_c_n, ws, w_hh, h0, y, lengths, reverse, dtype, kc=16, design: Design = KERNEL
):
    """``lstm_backward_kernel`` then ``dW_hh``'s GEMM: ``(dgates, dW_hh, grad_h0, grad_c0)`` in
    ``dtype``; ``dg`` (16-bit) is both the output and the exchange buffer, ``dh``, ``dc`` fp32."""
    T, B, D, H = grad_y.shape
    G = 4 * H
    dgates = torch.zeros(T, B, D, G, dtype=F64)
    grad_h0, grad_c0 = torch.empty(D, B, H, dtype=F64), torch.empty(D, B, H, dtype=F64)
    for d in range(D):
        w_t = w_hh[d].t()
        dh_carry, dc = f32(grad_h_n[d]), f32(grad_c_n[d])
        g_later = torch.zeros(B, G, dtype=F64)
        for s in range(T):
            t = s if reverse[d] else T - 1 - s
            incoming = f32(dh_carry + recurrent_product(g_later, w_t, 1, design, dtype, chunk=kc))
            dh = f32(incoming + grad_y[t, :, d])
            i, f, g, o, c_prev = ws[t, :, d].split(H, dim=1)
            c = f32(f32(f * c_prev) + f32(i * g))
            tc = triton_tanh(c)
            dc_t = f32(dc + f32(f32(dh * o) * f32(1.0 - f32(tc * tc))))
            grads = torch.cat(
                [
                    f32(f32(f32(dc_t * g) * i) * f32(1.0 - i)),
                    f32(f32(f32(dc_t * c_prev) * f) * f32(1.0 - f)),
                    f32(f32(dc_t * i) * f32(1.0 - f32(g * g))),
                    f32(f32(f32(dh * tc) * o) * f32(1.0 - o)),
                ],
                dim=1,
            )
            valid = torch.ones(B, 1, dtype=torch.bool) if lengths is None else (t < lengths).unsqueeze(1)
            g_later = torch.where(valid, to16(grads, dtype), 0.0)
            dgates[t, :, d] = g_later
            dc = torch.where(valid, _store(f32(dc_t * f), design.grad_state, dtype), dc)
            dh_carry = torch.where(valid, 0.0, incoming)
        dh_carry = f32(dh_carry + recurrent_product(g_later, w_t, 1, design, dtype, chunk=kc))
        grad_h0[d], grad_c0[d] = to16(dh_carry, dtype), to16(dc, dtype)
    prev = previous_hidden(y, h0, lengths, reverse)
    dw_hh = to16(f32(torch.einsum("tbdg,tbdp->dgp", dgates, prev)), dtype)
    return dgates, dw_hh, grad_h0, grad_c0
