"""The Triton convs' TF32 products round their fp32 operands to nearest, as cuDNN's do.

Triton's TF32 ``tl.dot`` hands the MMA the raw fp32 bits, which it truncates to TF32; cuDNN and
cuBLAS round first (``cvt.rna.tf32.f32``). The kernels round explicitly
(:func:`fusedconvlstm.triton.conv1d.round_to_tf32`): checked here under the interpreter (the
rounding itself, and a conv whose TF32 result equals the convolution of the rounded operands)
and in the code compiled for sm_90 (the rounding's mask is in the PTX).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fusedconvlstm import conv1d_stack
from fusedconvlstm.triton import conv1d as conv_kernels
from fusedconvlstm.triton import conv1d_fused_stack

ROOT = Path(__file__).resolve().parent.parent
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def tf32_rna(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest TF32, ties away from zero (``cvt.rna.tf32.f32``), in plain torch via float64:
    the spacing of TF32 at ``x`` is 2^(e - 10), halves rounded away from zero."""
    d = x.double()
    finite = torch.isfinite(d) & (d != 0)
    e = torch.floor(torch.log2(d.abs().where(finite, torch.ones_like(d))))
    e = e.clamp(min=-126)  # subnormals share the smallest normal exponent's spacing
    ulp = torch.pow(2.0, e - 10)
    q = torch.sign(d) * torch.floor(d.abs() / ulp + 0.5) * ulp
    return torch.where(finite, q, d).float()


@pytest.mark.skipif(not INTERPRETING, reason="the interpreter runs the rounding on CPU tensors")
def test_round_to_tf32_is_round_to_nearest_ties_away():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        ok = i < N
        tl.store(y_ptr + i, conv_kernels.round_to_tf32(tl.load(x_ptr + i, mask=ok)), mask=ok)

    one = torch.tensor(1.0)
    ulp = 2.0**-10
    specials = torch.tensor(
        [
            1.0 + ulp / 2,  # a tie: away from zero, to 1 + ulp
            -(1.0 + ulp / 2),
            1.0 + ulp / 2 - 2.0**-23,  # just below the tie: down
            1.0 + 3 * ulp / 2,  # a tie above an odd TF32 value: away (not to even)
            float(torch.finfo(torch.float32).max),  # rounds past the largest finite: inf
            float("inf"),
            float("-inf"),
            0.0,
            -0.0,
            1e-40,  # subnormal
            float(torch.finfo(torch.float32).tiny),
        ]
    )
    rand = torch.randn(4000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-30, 30, 4000)
    x = torch.cat([specials, rand, one.nextafter(torch.tensor(2.0)).reshape(1)])
    y = torch.empty_like(x)
    kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = tf32_rna(x)
    want[4] = float("inf")  # float64 emulation rounds to 2^128, which the cast to fp32 makes inf too
    assert torch.equal(y, want), (x[y != want][:8], y[y != want][:8], want[y != want][:8])
    out = torch.empty(2)
    bits = torch.tensor([0x7F800001, 0x7FC00000], dtype=torch.int32).view(torch.float32)  # NaN payloads
    kernel[(1,)](bits, out, 2, BLOCK=2)
    assert torch.isnan(out).all()


@pytest.mark.skipif(not INTERPRETING, reason="the interpreter runs the convs on CPU tensors")
def test_tf32_conv_is_the_conv_of_rounded_operands(monkeypatch):
    """With TF32 chosen (as on a GPU where PyTorch allows it), the interpreter's conv equals the
    fp64 convolution of TF32-rounded operands; without the rounding it would equal that of the
    raw operands (the interpreter's dot computes in fp32 whatever the precision)."""
    tf32 = lambda dtype, device, layer: "tf32" if dtype == torch.float32 else "ieee"  # noqa: E731
    monkeypatch.setattr(conv_kernels, "dot_precision", tf32)
    monkeypatch.setattr(conv1d_fused_stack, "dot_precision", tf32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 19, 37, generator=g)
    w = [torch.randn(45, 37, 3, generator=g), torch.randn(23, 45, 3, generator=g)]
    b = [torch.randn(45, generator=g), torch.randn(23, generator=g)]
    pad = [(1, 1), (1, 1)]
    ours = conv1d_stack(x, w, b, padding=pad, backend="triton")

    def f64(round_):
        r = tf32_rna if round_ else (lambda t: t)
        h = r(x).double().transpose(1, 2)
        for i, (wi, bi) in enumerate(zip(w, b)):
            h = F.conv1d(F.pad(h, pad[i]), r(wi).double(), bi.double())
            if i + 1 < len(w):
                h = r(h.float()).double()  # the next layer's input is stored in fp32, then rounded
        return h.transpose(1, 2)

    rounded, raw = f64(True), f64(False)
    err_rounded = ((ours.double() - rounded).abs().max() / rounded.abs().max()).item()
    err_raw = ((ours.double() - raw).abs().max() / raw.abs().max()).item()
    assert err_rounded < 1e-6 and err_raw > 1e-5, (err_rounded, err_raw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the conv tests run the compiled kernels")
def test_tf32_rounding_is_in_the_code_compiled_for_sm90():
    """The forward kernel compiled for sm_90 in fp32 TF32 carries the rounding (``and`` with the
    mask 0xFFFFE000, i.e. -8192); in IEEE it does not."""
    code = """
import re, sys, torch
from triton.runtime.jit import JITFunction
from tests.triton_compile_check import H100, _compile
from fusedconvlstm.calls.conv1d import check_conv1d_stack_args
from fusedconvlstm.triton import conv1d as layer_kernels, conv1d_fused_stack as fused, conv1d_stack as backend

captured = []
JITFunction.run = lambda self, *args, grid, warmup, **kwargs: captured.append((self, args, kwargs))
layer_kernels.gpu_properties = lambda device: H100
w, b, x = [torch.randn(64, 64, 3)], [torch.randn(64)], torch.randn(8, 50, 64)
w_packed, biases = backend._prepare(w, b, None, None)
call = check_conv1d_stack_args(x, None, w, b, [1], [0, 0], [1], "none", None, None, False)
counts = []
for prec in ("tf32", "ieee"):
    layer_kernels.dot_precision = fused.dot_precision = lambda dt, device, layer: prec
    captured.clear()
    backend._stack_forward(x, None, w_packed, biases, call, False)
    fn, args, kwargs = captured[0]
    ptx = _compile(fn, args, kwargs).asm["ptx"]
    counts.append(len(re.findall(r"and\\.b32\\s+%r\\d+, %r\\d+, -8192;", ptx)))
print(fn.fn.__name__, *counts)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    name, tf32, ieee = run.stdout.split()[-3:]
    assert int(tf32) > 0 and int(ieee) == 0, (name, tf32, ieee)
