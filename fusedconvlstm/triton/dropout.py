"""Dropout masks in Triton: bitwise those of :mod:`fusedconvlstm.numerics.dropout`.

One element-wise kernel writes a level's uint8 keep-mask from the call's seed; the conv kernels
then read it where they read that level (forward and weight gradient: ``act(z) · m · scale``
as they load; input gradient: ``· m · scale`` in the epilogue), so the backward uses the
forward's mask without storing it: it is drawn again from the same seed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedconvlstm.numerics.dropout import LEVEL_SHIFT, threshold


@triton.jit(do_not_specialize=["BASE", "THRESH"])
def _keep_mask_kernel(seed_ptr, out_ptr, N, BASE, THRESH, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    seed = tl.load(seed_ptr)
    r = tl.randint(seed, offs + BASE)
    keep = r.to(tl.uint32, bitcast=True) >= THRESH.to(tl.uint32)
    tl.store(out_ptr + offs, keep.to(tl.uint8), mask=ok)


def keep_mask(seed: Tensor, level: int, shape: tuple[int, ...], p: float) -> Tensor:
    """uint8 keep-mask (1 = kept) of dropout stream ``level`` over a contiguous ``shape``."""
    out = torch.empty(shape, dtype=torch.uint8, device=seed.device)
    n = out.numel()
    if p >= 1.0:
        return out.zero_()
    if n:
        block = 1024
        _keep_mask_kernel[(triton.cdiv(n, block),)](seed, out, n, level << LEVEL_SHIFT, threshold(p), BLOCK=block)
    return out
