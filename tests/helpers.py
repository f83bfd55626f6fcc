"""Helpers shared by the tests: error measures and the float64 reference (DESIGN.md §3)."""

from __future__ import annotations

import torch
from torch import Tensor


def rel_err(out: Tensor, ref: Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64 (0 when both are zero)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm()
    num = (out - ref).norm()
    if denom == 0:
        return float(num)
    return float(num / denom)


def assert_close_rel(out: Tensor, ref: Tensor, tol: float, what: str = "output") -> float:
    """Assert that ``out`` has no NaN and its relative error against ``ref`` is at most ``tol``."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"
    return err


def poison_(t: Tensor) -> Tensor:
    """Fill ``t`` with NaN (for floating tensors) so unwritten elements show up."""
    return t.fill_(float("nan"))


def lstm_weights(D: int, H: int, P: int | None = None, dtype=torch.float64, device="cpu", requires_grad=False):
    """Random recurrent weights ``D × (4H, P)`` with ``nn.LSTM``'s init scale."""
    P = H if P is None else P
    k = H**-0.5
    return [
        (torch.rand(4 * H, P, dtype=dtype, device=device) * 2 - 1).mul_(k).requires_grad_(requires_grad)
        for _ in range(D)
    ]
