"""The one pass mark (docs/design.md §3) and ``check`` judging with it."""

from __future__ import annotations

import math

import pytest
import torch

from fusedconvlstm import passmark, validate

F64 = torch.float64


def _draw(n=4096, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, generator=gen, dtype=F64)
    base = ref.to(torch.bfloat16).double()  # the baseline: the reference rounded once to bf16
    return ref, base


def test_twice_the_baseline_plus_one_eps_passes_and_more_fails():
    ref, base = _draw()
    eps = passmark.eps_of(torch.bfloat16)
    e_base = passmark.rel_err(base, ref)
    # ours: the baseline's error scaled, so its norm error is a known multiple of the baseline's
    for scale, want in ((2.0, True), (2.0 + 1.5 * eps / e_base, False)):
        ours = ref + scale * (base - ref)
        m = passmark.mark(ours, base, ref, torch.bfloat16)
        assert m.err == pytest.approx(scale * e_base)
        assert m.passed is want, m.describe()
    assert passmark.bound(1e-3, eps) == 2e-3 + eps


def test_one_bad_element_fails_though_the_norm_passes():
    ref, base = _draw()
    ours = base.clone()
    ours[17] += 0.05 * ref.abs().max()  # one element in 4096 off by 5% of the largest
    m = passmark.mark(ours, base, ref, torch.bfloat16)
    assert m.err <= m.tolerance  # the norm alone would let it through
    assert m.max_err > m.max_tolerance and not m.passed


def test_nan_where_the_reference_is_finite_fails_and_is_inf():
    ref, base = _draw()
    ours = base.clone()
    ours[3] = float("nan")
    assert passmark.rel_err(ours, ref) == math.inf and passmark.max_err(ours, ref) == math.inf
    m = passmark.mark(ours, base, ref, torch.bfloat16)
    assert not m.passed and m.ratio == math.inf
    assert m.to_dict()["err"] is None and m.to_dict()["passed"] is False
    # Where the reference itself is not finite, that position is left out.
    ref2, ours2 = ref.clone(), base.clone()
    ref2[3] = ours2[3] = float("inf")
    assert passmark.mark(ours2, base, ref2, torch.bfloat16).passed


def test_strict_rel_err_is_nan_for_any_non_finite_element():
    """``strict=True`` (the tests' measure): every element counts and nothing non-finite compares,
    where the pass mark's rule leaves out the positions where the reference is not finite."""
    ref, base = _draw()
    assert passmark.rel_err(base, ref, strict=True) == passmark.rel_err(base, ref)
    both_nan = torch.full_like(ref, float("nan"))
    assert passmark.rel_err(both_nan, both_nan) == 0.0  # nothing finite in ref: nothing compared
    assert math.isnan(passmark.rel_err(both_nan, both_nan, strict=True))
    ours = base.clone()
    ours[3] = float("inf")
    assert passmark.rel_err(ours, ref) == math.inf and math.isnan(passmark.rel_err(ours, ref, strict=True))
    assert math.isnan(passmark.rel_err(ref, ours, strict=True))
    assert math.isnan(passmark.rel_err(base[:1], ref, strict=True))  # no broadcasting


def test_a_tensor_missing_on_one_side_fails():
    ref, base = _draw()
    assert not passmark.mark(None, base, ref, torch.float32).passed
    assert not passmark.mark(base, None, ref, torch.float32).passed  # no baseline: nothing to judge by
    assert passmark.mark(None, None, None, torch.float32).passed
    with pytest.raises(ValueError, match="2 tensors of ours"):
        passmark.mark_all([ref, ref], [ref], [ref], torch.float32)


def test_worst_is_the_tensor_nearest_its_mark():
    ref, base = _draw()
    marks = passmark.mark_all([base, ref + 1.9 * (base - ref)], [base, base], [ref, ref], "bf16", ["a", "b"])
    assert passmark.worst(marks).name == "b" and passmark.all_pass(marks)


def test_check_rows_fail_on_any_tensor_and_report_the_worst(monkeypatch):
    """``check`` on the CPU: the torch backend is torch itself (error equal to torch's: passes);
    a backend one element of whose input gradient is off fails, on that tensor."""
    (case,) = [c for c in validate.default_cases(quick=True) if c.op == "lstm"]
    rows = list(validate.check_cases([case], torch.device("cpu"), [torch.float32], only=["torch"]))
    assert rows and all(r.passed and r.all_passed for r in rows), validate.format_table(rows)
    real_run = validate._run

    def one_bad_element(module, x, channels_last_torch, seed):
        outs = real_run(module, x, channels_last_torch, seed)
        if isinstance(module, validate.LSTM):
            outs[3] = outs[3].clone()
            outs[3].view(-1)[5] += 0.05 * outs[3].abs().max()
        return outs

    monkeypatch.setattr(validate, "_run", one_bad_element)
    (bad,) = validate.check_cases([case], torch.device("cpu"), [torch.float32], only=["torch"])
    assert not bad.passed and bad.worst == "grad input"
    assert bad.max_elem_err > bad.max_elem_tolerance
    assert "FAIL" in validate.format_table([bad])
