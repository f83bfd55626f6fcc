"""The drivers of the ``cuda`` LSTM backend (persistent, with the cooperative or the cluster
forward, and step-wise) against the float64 reference, outputs and every gradient, on the ops'
CPU implementations with CPU tensors; what the paths share (workspace, unrounded products,
final-state-only forwards)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedconvlstm import backends
from fusedconvlstm.cuda import cluster as cuda_cluster
from fusedconvlstm.cuda import lstm as cuda_lstm
from fusedconvlstm.cuda import persistent_config as pc
from fusedconvlstm.cuda import planning as cuda_planning
from fusedconvlstm.passmark import rel_err
from tests.cuda_lstm_helpers import (
    F64,
    HALF_DTYPES,
    check_persistent_and_stepwise_combine,
    op_inputs,
    reference_forward_backward,
)

CPU_CASES = [
    # T, B, D, H, lengths, reverse
    (5, 3, 1, 7, None, [False]),
    (6, 4, 2, 5, [6, 3, 1, 0], [False, True]),
    (4, 2, 2, 9, [2, 4], [False, False]),
    (1, 1, 1, 3, None, [True]),
]


@pytest.mark.parametrize("path", ["stepwise", "persistent"])
@pytest.mark.parametrize("T, B, D, H, lengths, reverse", CPU_CASES)
def test_drivers_match_reference_on_cpu(path, T, B, D, H, lengths, reverse):
    lengths = None if lengths is None else torch.tensor(lengths)
    xg, w, h0, c0, _ = op_inputs(T, B, D, H, F64)
    forward = getattr(cuda_lstm, f"lstm_recurrence_{path}_forward")
    backward = getattr(cuda_lstm, f"lstm_recurrence_{path}_backward")
    y, hn, cn, ws = forward(xg, w, [], h0, c0, lengths, reverse)
    gy, ghn, gcn = torch.randn_like(y), torch.randn_like(hn), torch.randn_like(cn)
    (y_r, hn_r, cn_r), (gxg_r, gw_r, gh0_r, gc0_r) = reference_forward_backward(
        xg, w, h0, c0, lengths, reverse, gy, ghn, gcn
    )
    for name, out, ref in (("y", y, y_r), ("h_n", hn, hn_r), ("c_n", cn, cn_r)):
        assert rel_err(out, ref, strict=True) < 1e-12, name
    gxg, gw, _, gh0, gc0 = backward(gy, ghn, gcn, xg, w, [], h0, c0, lengths, reverse, y, ws)
    for name, out, ref in (("grad_xg", gxg, gxg_r), ("grad_h0", gh0, gh0_r), ("grad_c0", gc0, gc0_r)):
        assert rel_err(out, ref, strict=True) < 1e-12, name
    for d in range(D):
        assert rel_err(gw[d], gw_r[d], strict=True) < 1e-12, f"grad_w_hh[{d}]"


@pytest.mark.parametrize("T, B, D, H, lengths, reverse", CPU_CASES)
def test_cluster_driver_matches_reference_on_cpu(monkeypatch, T, B, D, H, lengths, reverse):
    """The driver with the cluster kernel preferred: it calls the cluster op (its CPU
    implementation here) and its results are the reference's."""
    monkeypatch.setenv(pc.FORWARD_KERNEL_ENV, "cluster")
    calls = []
    original = cuda_cluster.cluster_forward_op
    monkeypatch.setattr(cuda_cluster, "cluster_forward_op", lambda *a: calls.append(a[4:8]) or original(*a))
    lengths = None if lengths is None else torch.tensor(lengths)
    xg, w, h0, c0, _ = op_inputs(T, B, D, H, F64)
    y, hn, cn, _ = cuda_lstm.lstm_recurrence_persistent_forward(xg, w, [], h0, c0, lengths, reverse)
    assert len(calls) == 1
    gy, ghn, gcn = torch.randn_like(y), torch.randn_like(hn), torch.randn_like(cn)
    (y_r, hn_r, cn_r), _ = reference_forward_backward(xg, w, h0, c0, lengths, reverse, gy, ghn, gcn)
    for name, out, ref in (("y", y, y_r), ("h_n", hn, hn_r), ("c_n", cn, cn_r)):
        assert rel_err(out, ref, strict=True) < 1e-12, name


@st.composite
def _driver_cases(draw):
    T, B, D, H = draw(st.integers(1, 6)), draw(st.integers(1, 9)), draw(st.integers(1, 3)), draw(st.integers(1, 24))
    lengths = draw(st.none() | st.lists(st.integers(0, T), min_size=B, max_size=B))
    reverse = draw(st.lists(st.booleans(), min_size=D, max_size=D))
    return T, B, D, H, lengths, reverse, draw(st.sampled_from(["stepwise", "cooperative", "cluster"]))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(_driver_cases())
def test_drivers_match_reference_on_random_problems(case):
    """Each path of the cuda backend's driver (on the ops' CPU implementations) over random
    sizes, directions and lengths: outputs and every gradient against the float64 reference."""
    T, B, D, H, lengths, reverse, path = case
    lengths = None if lengths is None else torch.tensor(lengths)
    xg, w, h0, c0, _ = op_inputs(T, B, D, H, F64, seed=T * 100 + B * 10 + H)
    kind = "stepwise" if path == "stepwise" else "persistent"
    with pc.preferring_forward_kernel(None if path == "stepwise" else path):
        forward = getattr(cuda_lstm, f"lstm_recurrence_{kind}_forward")
        backward = getattr(cuda_lstm, f"lstm_recurrence_{kind}_backward")
        y, hn, cn, ws = forward(xg, w, [], h0, c0, lengths, reverse)
        gy, ghn, gcn = torch.randn_like(y), torch.randn_like(hn), torch.randn_like(cn)
        gxg, gw, _, gh0, gc0 = backward(gy, ghn, gcn, xg, w, [], h0, c0, lengths, reverse, y, ws)
    (y_r, hn_r, cn_r), (gxg_r, gw_r, gh0_r, gc0_r) = reference_forward_backward(
        xg, w, h0, c0, lengths, reverse, gy, ghn, gcn
    )
    pairs = [("y", y, y_r), ("h_n", hn, hn_r), ("c_n", cn, cn_r), ("grad_xg", gxg, gxg_r)]
    pairs += [("grad_h0", gh0, gh0_r), ("grad_c0", gc0, gc0_r)] + [
        (f"grad_w_hh[{d}]", gw[d], gw_r[d]) for d in range(D)
    ]
    for name, out, ref in pairs:
        assert rel_err(out, ref, strict=True) < 1e-12, f"{path} {case[:4]}: {name}"


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_stepwise_path_adds_the_unrounded_product_as_the_persistent_path_does(dtype):
    """16-bit step-wise recurrence: h W_hhᵀ and dgates W_hh reach the cell kernels in float32, as
    in the persistent kernels, so both paths compute the same values (on the ops' CPU
    implementations; a product rounded to 16 bits first would differ by about its roundoff)."""
    lengths = torch.tensor([6, 2, 5, 0])
    xg, w, h0, c0, _ = op_inputs(6, 4, 2, 24, dtype, seed=3)
    rev = [False, True]
    p = cuda_lstm.lstm_recurrence_persistent_forward(xg, w, [], h0, c0, lengths, rev)
    s = cuda_lstm.lstm_recurrence_stepwise_forward(xg, w, [], h0, c0, lengths, rev)
    for a, b in zip(p, s):
        assert torch.equal(a, b)
    grads = [torch.randn(t.shape, dtype=F64).to(dtype) for t in p[:3]]
    gp = cuda_lstm.lstm_recurrence_persistent_backward(*grads, xg, w, [], h0, c0, lengths, rev, p[0], p[3])
    gs = cuda_lstm.lstm_recurrence_stepwise_backward(*grads, xg, w, [], h0, c0, lengths, rev, s[0], s[3])
    for a, b in zip((gp[0], *gp[1], gp[3], gp[4]), (gs[0], *gs[1], gs[3], gs[4])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", ["stepwise", "cooperative", "cluster"])
def test_final_state_only_stores_no_output_and_keeps_the_state(path, monkeypatch):
    """``write_y=False`` (``return_sequence=False`` at inference) on every path of the registered
    implementation, with and without a projection: ``y`` is empty (the kernels get an empty
    buffer) and h_n, c_n are the full call's bit for bit (on the ops' CPU implementations)."""
    if path != "stepwise":
        monkeypatch.setattr(cuda_planning, "limits_for", lambda call, limits: pc.H100_SXM)
    impl = backends.implementation("lstm_recurrence", "cuda")
    lengths = torch.tensor([5, 0, 3])
    with pc.preferring_forward_kernel(None if path == "stepwise" else path):
        for P in (None, 3):
            xg, w, h0, c0, _ = op_inputs(5, 3, 2, 8, torch.float32)
            w_hr = [] if P is None else [torch.randn(P, 8) * 0.3 for _ in range(2)]
            w = w if P is None else [torch.randn(32, P) * 0.3 for _ in range(2)]
            h0 = h0 if P is None else h0[..., :P].contiguous()
            args = (xg, w, w_hr, h0, c0, lengths, [False, True])
            full = impl.forward(*args, save_for_backward=False, write_y=True)
            last = impl.forward(*args, save_for_backward=False, write_y=False)
            assert last[0].numel() == 0 and full[0].numel() > 0
            assert torch.equal(last[1], full[1]) and torch.equal(last[2], full[2])


def test_persistent_and_stepwise_share_their_workspace_on_cpu():
    lengths = torch.tensor([5, 2, 4])
    check_persistent_and_stepwise_combine((5, 3, 2, 6), lengths, torch.float32, "cpu", 1e-6, 1e-5)
