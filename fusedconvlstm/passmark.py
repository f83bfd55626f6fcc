"""The pass mark: one rule for every comparison with the float64 reference (docs/design.md §3).

A tensor of ours passes when, against the float64 reference ``ref`` and beside ``base``, what
PyTorch (cuDNN on a GPU) computes on the same inputs:

- its relative error ``‖out − ref‖ / ‖ref‖`` is at most ``2 × base's + eps(dtype)``;
- its largest element error ``max |out − ref| / max |ref|`` is at most ``2 × base's + 2 eps(dtype)``
  (so a local error cannot hide in a norm: one element in a thousand off by a few percent fails);
- it has no NaN or infinity where ``ref`` is finite.

``eps(dtype)`` is one unit of the dtype's epsilon (``torch.finfo(dtype).eps``): the slack for a
baseline whose error is itself at the rounding level. The largest element of n rounding errors is
a noisier statistic than their norm, so its slack is two units: on the CPU the Triton LSTM's
float32 tests (interpreter) measured norm errors within 0.56 of the one-unit mark and largest
element errors up to 1.05 of a one-unit mark (3.3 eps against PyTorch's 1.1 eps, a projected
output), 0.79 of the two-unit one. ``check``, ``bench`` and the tests all use
:func:`mark` (or :func:`assert_passes`); nothing else states a tolerance against PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

# Our error may be at most FACTOR times the baseline's, plus SLACK_EPS units of the dtype's eps.
FACTOR = 2.0
SLACK_EPS = 1.0
# The largest element error: the same factor, two units of eps.
MAX_SLACK_EPS = 2.0


def _finite_pair(out: Tensor, ref: Tensor) -> tuple[Tensor, Tensor] | None:
    """``out`` and ``ref`` in float64 on the CPU where ``ref`` is finite; ``None`` where ``out`` is
    not finite at such a position (or the shapes differ)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        return None
    keep = torch.isfinite(ref)
    out, ref = out[keep], ref[keep]
    if not bool(torch.isfinite(out).all()):
        return None
    return out, ref


def rel_err(out: Tensor, ref: Tensor, *, strict: bool = False) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64 (the absolute norm ``‖out − ref‖`` where ``ref`` is zero).

    By default the pass mark's rule: over the positions where ``ref`` is finite, and ``inf`` where
    ``out`` has a NaN or an infinity at one of them (or the shapes differ).

    ``strict=True``: over every element, and ``nan`` where either tensor has a NaN or an infinity
    anywhere (or the shapes differ), so that every comparison with the result is false. The tests
    use it: they also compare two results of their own (two all-NaN tensors must not agree, as they
    would with the positions where ``ref`` is not finite left out) and assert that results differ
    (a NaN must not count as a difference, as ``inf`` would).
    """
    if strict:
        out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
        if out.shape != ref.shape or not (bool(torch.isfinite(out).all()) and bool(torch.isfinite(ref).all())):
            return math.nan
    else:
        pair = _finite_pair(out, ref)
        if pair is None:
            return math.inf
        out, ref = pair
    num, denom = float((out - ref).norm()), float(ref.norm())
    return num / denom if denom > 0 else num


def max_err(out: Tensor, ref: Tensor) -> float:
    """``max |out − ref| / max |ref|`` in float64 over the positions where ``ref`` is finite;
    ``inf`` where ``out`` has NaN or infinity there."""
    pair = _finite_pair(out, ref)
    if pair is None:
        return math.inf
    out, ref = pair
    if out.numel() == 0:
        return 0.0
    num, denom = float((out - ref).abs().max()), float(ref.abs().max())
    return num / denom if denom > 0 else num


def eps_of(dtype: torch.dtype | str) -> float:
    """One unit of the dtype's epsilon (``"bf16"``, ``"fp16"``, ``"fp32"`` or a torch dtype)."""
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}[dtype]
    return float(torch.finfo(dtype).eps)


def bound(base_err: float, eps: float, slack_eps: float = SLACK_EPS) -> float:
    """What our relative error may reach beside a baseline error of ``base_err`` (``slack_eps``
    units of ``eps`` on top of :data:`FACTOR` times it; a caller that allows more says why)."""
    return FACTOR * base_err + slack_eps * eps


def max_bound(base_max_err: float, eps: float) -> float:
    """What our largest element error may reach beside the baseline's ``base_max_err``."""
    return FACTOR * base_max_err + MAX_SLACK_EPS * eps


@dataclass(frozen=True)
class TensorMark:
    """One tensor judged: our errors and the baseline's, norm and largest element."""

    name: str
    err: float
    base_err: float
    max_err: float
    base_max_err: float
    eps: float

    @property
    def tolerance(self) -> float:
        return bound(self.base_err, self.eps)

    @property
    def max_tolerance(self) -> float:
        return max_bound(self.base_max_err, self.eps)

    @property
    def passed(self) -> bool:
        """Within both marks; an infinite error (NaN, or a tensor missing on our side or the
        baseline's) never passes, whatever the baseline's."""
        finite = math.isfinite(self.err) and math.isfinite(self.max_err)
        return finite and self.err <= self.tolerance and self.max_err <= self.max_tolerance

    @property
    def ratio(self) -> float:
        """How close to the mark: the larger of ``err / tolerance`` and ``max_err / max_tolerance``
        (above 1: failed; ``inf`` for NaN)."""
        return max(self.err / self.tolerance, self.max_err / self.max_tolerance)

    def describe(self) -> str:
        verdict = "passes" if self.passed else "FAILS"
        return (
            f"{self.name}: rel err {self.err:.3g} vs baseline {self.base_err:.3g} (mark {self.tolerance:.3g}), "
            f"max element err {self.max_err:.3g} vs {self.base_max_err:.3g} (mark {self.max_tolerance:.3g}): {verdict}"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def mark(out: Tensor | None, base: Tensor | None, ref: Tensor | None, dtype, name: str = "output") -> TensorMark:
    """Judge ``out`` (ours) against ``ref`` (float64) beside ``base`` (PyTorch's on the same inputs)
    with the slack of ``dtype`` (ours). A tensor missing on one side only (a gradient not computed)
    fails: its errors are ``inf``; missing on every side, it passes with errors 0."""
    if out is None or base is None or ref is None:
        both_none = out is None and base is None and ref is None
        e = 0.0 if both_none else math.inf
        be = 0.0 if both_none or (base is not None and ref is not None) else math.inf
        if base is not None and ref is not None:
            return TensorMark(name, e, rel_err(base, ref), e, max_err(base, ref), eps_of(dtype))
        return TensorMark(name, e, be, e, be, eps_of(dtype))
    return TensorMark(name, rel_err(out, ref), rel_err(base, ref), max_err(out, ref), max_err(base, ref), eps_of(dtype))


def mark_all(
    outs: Sequence[Tensor | None],
    bases: Sequence[Tensor | None],
    refs: Sequence[Tensor | None],
    dtype,
    names: Sequence[str] | None = None,
) -> list[TensorMark]:
    """:func:`mark` per tensor (ours, the baseline's and the reference's in the same order)."""
    if not len(outs) == len(bases) == len(refs):
        raise ValueError(
            f"pass mark: {len(outs)} tensors of ours, {len(bases)} of the baseline, {len(refs)} references"
        )
    names = list(names) if names is not None else [f"tensor {i}" for i in range(len(refs))]
    return [mark(o, b, r, dtype, n) for o, b, r, n in zip(outs, bases, refs, names)]


def worst(marks: Sequence[TensorMark]) -> TensorMark:
    """The tensor closest to (or furthest past) its mark."""
    if not marks:
        raise ValueError("pass mark: no tensors to judge")
    return max(marks, key=lambda m: m.ratio if not math.isnan(m.ratio) else math.inf)


def all_pass(marks: Sequence[TensorMark]) -> bool:
    return bool(marks) and all(m.passed for m in marks)


def assert_passes(out: Tensor, base: Tensor, ref: Tensor, dtype, name: str = "output") -> TensorMark:
    """Assert that ``out`` passes the mark (shapes equal, no NaN where ``ref`` is finite)."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    m = mark(out, base, ref, dtype, name)
    assert m.passed, m.describe()
    return m
