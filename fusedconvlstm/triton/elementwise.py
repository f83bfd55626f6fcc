"""Element-wise math shared by the Triton kernels (fp32 in, fp32 out)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    """The logistic function."""
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    """tanh without libdevice (which does not run under the interpreter)."""
    # (1 - e) / (1 + e) with e = exp(-2|x|) loses relative accuracy near 0 (1 - e cancels), so
    # small arguments use the Taylor series, whose next term is below float32 rounding at 0.25.
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    large = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    r = tl.where(ax < 0.25, small, large)
    return tl.where(x < 0, -r, r)
