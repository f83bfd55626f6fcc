"""The LSTM kernels' 16-bit arithmetic against the pass mark, on the CPU (:mod:`tests.kernel_arithmetic`).

The persistent CUDA kernels and the Triton kernels, their roundings and approximate instructions
emulated, run forward and backward on bfloat16 / float16 data; every output, final state and
gradient must pass the project's pass mark against the float64 reference, beside the reference
backend run in the same dtype (fp32 math between 16-bit inputs and outputs: a stricter baseline
than cuDNN, which also rounds ``h`` every step). Random inputs alone do not tell a good design
from a bad one (the 16-bit rounding of the outputs dominates every error), so two regimes where
the design shows are added, each with the wrong designs that fail there: a state that stagnates
in 16 bits (forget gate 1, ``c`` or ``dL/dc`` summing increments below half its 16-bit ulp) and
a recurrent product that ``xg`` nearly cancels; a random long memory (forget gate near 1) besides.
"""

from __future__ import annotations

import math

import pytest
import torch

from fusedconvlstm import passmark
from fusedconvlstm.reference.lstm import lstm_recurrence_reference
from tests import kernel_arithmetic as ka

F64 = torch.float64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = ("y", "h_n", "c_n", "grad_xg", "grad_w_hh", "grad_h0", "grad_c0")
REVERSE = [False, True]


def _run_cuda(xg, w, h0, c0, grads, lengths, dtype, design):
    y, h_n, c_n, ws = ka.persistent_forward(xg, w, h0, c0, lengths, REVERSE, dtype, wk=2, design=design)
    back = ka.persistent_backward(*grads, ws, w, h0, c0, y, lengths, REVERSE, dtype, wk=2, design=design)
    return [y, h_n, c_n, *back]


def _run_triton(xg, w, h0, c0, grads, lengths, dtype, design):
    y, h_n, c_n, ws = ka.triton_forward(xg, w, h0, c0, lengths, REVERSE, dtype, kc=16, design=design)
    back = ka.triton_backward(*grads, ws, w, h0, y, lengths, REVERSE, dtype, kc=16, design=design)
    return [y, h_n, c_n, *back]


KERNELS = {"cuda": _run_cuda, "triton": _run_triton}


def _inputs(T, B, H, dtype, seed, f_bias=0.0):
    """Random inputs of two recurrences (forward, reversed) as ``dtype`` values in float64
    tensors: ``xg, w, h0, c0`` and the upstream gradients ``(grad_y, grad_h_n, grad_c_n)``."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=F64, generator=g)).to(dtype).double()

    xg = torch.randn(T, B, 2, 4 * H, dtype=F64, generator=g)
    xg[..., H : 2 * H] += f_bias
    xg = xg.to(dtype).double()
    w = ((torch.rand(2, 4 * H, H, dtype=F64, generator=g) * 2 - 1) * H**-0.5).to(dtype).double()
    h0, c0 = rnd(2, B, H, scale=0.5), rnd(2, B, H, scale=0.5)
    grads = (rnd(T, B, 2, H), rnd(2, B, H), rnd(2, B, H))
    return xg, w, h0, c0, grads


def _reference(xg, w, h0, c0, grads, lengths, dtype):
    """The reference backend's ``(y, h_n, c_n)`` and gradients of ``(xg, w_hh, h0, c0)`` in ``dtype``."""
    leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in (xg, w, h0, c0)]
    outs = lstm_recurrence_reference(leaves[0], list(leaves[1].unbind(0)), [], leaves[2], leaves[3], lengths, REVERSE)
    torch.autograd.backward(outs, [t.to(dtype) for t in grads])
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def _marks(kernel, dtype, inputs, lengths, design=ka.KERNEL):
    ours = KERNELS[kernel](*inputs, lengths, dtype, design)
    ref = _reference(*inputs, lengths, F64)
    base = _reference(*inputs, lengths, dtype)
    return passmark.mark_all(ours, base, ref, dtype, NAMES)


def _assert_all_pass(marks):
    failed = [m.describe() for m in marks if not m.passed]
    assert not failed, "\n".join(failed)


def _lengths(B, T, seed):
    lengths = torch.randint(0, T + 1, (B,), generator=torch.Generator().manual_seed(seed))
    lengths[0], lengths[1] = T, 0
    return lengths


# (T, B, H, lengths): H not a multiple of the 16-element k-step, padded batch rows, lengths with
# empty and full rows.
SHAPES = [(5, 3, 20, False), (7, 9, 37, True), (12, 16, 64, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-H{}{}".format(*s[:3], "-lengths" * s[3]))
def test_emulated_kernel_passes_the_mark_on_random_inputs(kernel, dtype, shape):
    T, B, H, with_lengths = shape
    dt = DTYPES[dtype]
    lengths = _lengths(B, T, H) if with_lengths else None
    _assert_all_pass(_marks(kernel, dt, _inputs(T, B, H, dt, seed=T * H), lengths))


# A long memory: the forget gate's pre-activation 5 above the others' (f ~ 0.99), so c sums
# dozens of increments far below its own magnitude.
LONG = dict(T=48, B=8, H=16, f_bias=5.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_emulated_kernel_passes_the_mark_with_a_long_memory(kernel, dtype):
    dt = DTYPES[dtype]
    inputs = _inputs(LONG["T"], LONG["B"], LONG["H"], dt, seed=1, f_bias=LONG["f_bias"])
    _assert_all_pass(_marks(kernel, dt, inputs, _lengths(LONG["B"], LONG["T"], 1)))


def _stagnating(T, B, H, dtype, seed, gradient=False):
    """A cell that remembers: f = 1 to fp32 precision and input-gate increments ``i g`` about 0.6
    of half a 16-bit ulp of c in [4, 8) (i ~ 1.25 eps): fp32 sums them, a 16-bit c drops them all
    (it stagnates), a relative error of ~T eps. ``gradient``: c small instead, and dL/dc in [4, 8)
    summing increments of a few eps (``grad_y``, ``grad_h_n`` scaled by eps): the same for the
    backward's dc."""
    xg, w, h0, c0, grads = _inputs(T, B, H, dtype, seed)
    eps = torch.finfo(dtype).eps
    xg = 0.5 * xg
    xg[..., :H] += math.log(1.25 * eps)
    xg[..., H : 2 * H] += 12.0
    xg[..., 2 * H : 3 * H] += 2.0
    grad_y, grad_h_n, grad_c_n = grads
    if gradient:
        grads = (eps * grad_y, eps * grad_h_n, (4.0 + grad_c_n.abs()).clamp(max=7.0))
    else:
        c0 = (4.0 + c0.abs()).clamp(max=7.0)
    return xg.to(dtype).double(), w, h0, c0.to(dtype).double(), tuple(g.to(dtype).double() for g in grads)


STAGNATING = dict(T=32, B=8, H=16)


@pytest.mark.parametrize("gradient", [False, True], ids=["c", "dc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_emulated_kernel_passes_the_mark_where_a_state_stagnates_in_16_bits(kernel, dtype, gradient):
    dt = DTYPES[dtype]
    for seed in range(2):
        _assert_all_pass(_marks(kernel, dt, _stagnating(*STAGNATING.values(), dt, seed, gradient), None))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wrong", ["c_state", "grad_state"])
def test_a_16_bit_cell_state_or_its_gradient_fails_where_it_stagnates(dtype, wrong):
    dt = DTYPES[dtype]
    for seed in range(2):
        for kernel in KERNELS:
            inputs = _stagnating(*STAGNATING.values(), dt, seed, gradient=wrong == "grad_state")
            marks = _marks(kernel, dt, inputs, None, ka.Design(**{wrong: "16"}))
            assert not passmark.all_pass(marks), f"{kernel}, seed {seed}: {wrong} in 16 bits passes"


def _cancelling(B, H, dtype, seed, scale=64.0):
    """One step whose recurrent product, ~``scale`` in magnitude, ``xg`` cancels to within the
    product's 16-bit rounding: the gates see ``h0 W_hhᵀ - round16(h0 W_hhᵀ)`` plus a small part."""
    xg, w, h0, c0, grads = _inputs(1, B, H, dtype, seed)
    w = (w * scale).to(dtype).double()
    h0 = torch.sign(h0) * 0.5 + h0 * 0.5
    h0 = h0.to(dtype).double()
    product = torch.einsum("dbk,dgk->bdg", h0, w)  # (B, D, 4H)
    xg = (-product.unsqueeze(0)).to(dtype).double() + (0.25 * xg).to(dtype).double()
    return xg.to(dtype).double(), w, h0, c0, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_emulated_kernel_passes_the_mark_on_a_cancelling_product(kernel, dtype):
    """Also with the tensor cores' sums normalised toward zero (as measured on V100 to H100), not
    to nearest."""
    dt = DTYPES[dtype]
    for design in (ka.KERNEL, ka.Design(accumulate="fp32_rz")):
        _assert_all_pass(_marks(kernel, dt, _cancelling(8, 40, dt, seed=2), None, design))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wrong", ["accumulate", "exchange_product"])
def test_a_16_bit_product_fails_on_a_cancelling_product(dtype, wrong):
    dt = DTYPES[dtype]
    design = ka.Design(**{wrong: "16"})
    for kernel in KERNELS:
        marks = _marks(kernel, dt, _cancelling(8, 40, dt, seed=2), None, design)
        assert not passmark.all_pass(marks), f"{kernel}: the cancelling case does not tell {design}"


def test_emulated_math_functions_within_their_documented_error():
    """The emulated activations' relative error, in units of 2^-23, over [-12, 12] in every error
    mode: the compiled sigmoid within 3 (expf's 2 ulp, the fma's and rcp.rn's roundings), tanhf
    within 3 (2 documented, the emulation's worst cases stacking one more); Triton's, whose ``exp``
    rounds ``x log2 e`` to fp32 first (an error growing with |x|), within 10 and 7."""
    x = torch.linspace(-12, 12, 20001, dtype=F64).float().double()
    bounds = [
        (ka.cuda_sigmoid, torch.sigmoid, 3),
        (ka.cuda_tanh, torch.tanh, 3),
        (ka.triton_sigmoid, torch.sigmoid, 10),
        (ka.triton_tanh, torch.tanh, 7),
    ]
    try:
        for mode in ("hash", "high", "low"):
            ka.APPROX = mode
            for fn, exact, bound in bounds:
                want = exact(x)
                err = ((fn(x) - want).abs() / want.abs().clamp(min=1e-30)).max().item() * 2**23
                assert err <= bound, f"{fn.__name__} ({mode}): {err:.2f} x 2^-23"
    finally:
        ka.APPROX = "hash"
    assert math.isclose(ka._L2E_HI + ka._L2E_LO, math.log2(math.e), rel_tol=1e-15)
