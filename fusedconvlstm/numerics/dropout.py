"""Counter-based dropout masks: the reference (pure PyTorch) of what the Triton kernels draw.

A fused kernel cannot draw from PyTorch's generator, and a backward must see the forward's mask
without storing it. So a fused dropout is a function of a *seed* (an int64 tensor drawn from
PyTorch's generator once per call, see :func:`draw_seed`) and of each element's position:

- element ``i`` (row-major index into a ``(B, T, C)`` level) of dropout stream ``level`` has the
  64-bit counter ``offset = i + level · 2⁴⁸`` (``level`` tells apart the masks of one call);
- ``r = Philox4x32-10(counter = (offset mod 2³², offset div 2³², 0, 0), key = (seed mod 2³²,
  seed div 2³²))``, first output word: exactly Triton's ``tl.randint(seed, offset)``;
- the element is kept when ``r ≥ threshold(p) = round(p · 2³²)``, with probability
  ``1 − p`` up to 2⁻³², and a kept element is scaled by ``1 / (1 − p)`` as ``F.dropout`` does.

The masks are bitwise the same on every backend and device (:func:`keep_mask` here, the
Triton kernel in :mod:`fusedconvlstm.triton.dropout`), so the float64 reference checks a fused
training step with dropout exactly as one without. Counters are 64-bit: levels of up to 2⁴⁸
elements.
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
LEVEL_SHIFT = 48
SEED_HIGH = 2**62
"""Seeds are drawn in ``[0, 2⁶²)``."""


def threshold(p: float) -> int:
    """Drop an element whose 32-bit draw is below this: ``round(p · 2³²)`` (``p`` in ``[0, 1)``)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout threshold: p must lie in [0, 1), got {p}")
    return min(int(round(p * 2**32)), _M32)


def scale(p: float) -> float:
    """The factor kept elements are multiplied by: ``1 / (1 − p)``, and 0 for ``p = 1``."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _mul_hi_lo(a: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``a · x`` for 32-bit ``a`` and int64 ``x`` holding 32-bit
    values, without int64 overflow (``x`` is split into 16-bit halves)."""
    p_lo = a * (x & 0xFFFF)
    mid = a * (x >> 16) + (p_lo >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox(seed: Tensor, offset: Tensor) -> Tensor:
    """First 32-bit word of Philox4x32-10 at counters ``offset`` (int64) under key ``seed`` (int64
    scalar tensor), as an int64 tensor of values in ``[0, 2³²)``: ``tl.randint(seed, offset)``."""
    c0, c1 = offset & _M32, (offset >> 32) & _M32
    c2 = c3 = torch.zeros_like(offset)
    k0, k1 = seed.reshape(()) & _M32, (seed.reshape(()) >> 32) & _M32
    for _ in range(ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0


def keep_mask(seed: Tensor, level: int, shape: tuple[int, ...], p: float) -> Tensor:
    """The bool keep-mask of dropout stream ``level`` over a contiguous tensor of ``shape``, on
    ``seed``'s device: element ``i`` is kept when its draw is at least :func:`threshold`."""
    if p >= 1.0:
        return torch.zeros(shape, dtype=torch.bool, device=seed.device)
    n = 1
    for s in shape:
        n *= s
    offset = torch.arange(n, dtype=torch.int64, device=seed.device) + (level << LEVEL_SHIFT)
    return (philox(seed.to(torch.int64), offset) >= threshold(p)).reshape(shape)


def draw_seed(device: torch.device | str) -> Tensor:
    """A fresh seed from PyTorch's generator of ``device`` (so ``torch.manual_seed`` reproduces
    it), kept on ``device``: no host sync, and a CUDA graph replay draws a new one."""
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device=device)


def dropout(x: Tensor, p: float, seed: Tensor | None = None, level: int = 0) -> Tensor:
    """``F.dropout(x, p, training=True)`` with the mask of stream ``level`` of ``seed`` (drawn by
    :func:`draw_seed` when not given) over ``x``'s row-major positions: the elements a fused op
    given the same seed drops at that level. Differentiable (a product with a constant)."""
    if p == 0:
        return x
    if seed is None:
        seed = draw_seed(x.device)
    keep = keep_mask(seed, level, tuple(x.shape), min(float(p), 1.0))
    return x * (keep.to(x.dtype) * scale(p))
