"""``proj_size`` on backends whose kernels run unprojected recurrences (``numerics.projection``).

CPU (CI): the projection wrapped around every path of the cuda backend's driver (step-wise,
cooperative, cluster; on the ops' CPU implementations) against autograd through the float64
reference loop with ``w_hr``: outputs and every gradient (``xg``, ``w_hh``, ``w_hr``, ``h0``,
``c0``), with both directions, lengths (0 included) and initial states; random problems by
hypothesis; ``h_n`` equal to the last step's output bit for bit; the registered cuda
implementation serving projections; and in float16 / bfloat16 the error against float64 set
beside the error of a loop that rounds like cuDNN (``h`` and ``r`` in the dtype every step).
The Triton backend's projected calls are in ``test_triton_lstm.py``; the GPU runs against cuDNN
in ``test_cuda_lstm_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedconvlstm import backends
from fusedconvlstm.calls.lstm import LSTMRecurrenceCall
from fusedconvlstm.cuda import lstm as cuda_lstm
from fusedconvlstm.cuda import persistent_config as pc
from fusedconvlstm.cuda import planning as cuda_planning
from fusedconvlstm.numerics.projection import with_projection
from fusedconvlstm.passmark import rel_err
from fusedconvlstm.reference.lstm import lstm_recurrence_reference

F64 = torch.float64
PATHS = ("stepwise", "cooperative", "cluster")


def _inputs(T, B, D, H, P, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=F64, generator=g)).to(dtype)

    xg = rnd(T, B, D, 4 * H)
    w_hh = [rnd(4 * H, P, scale=H**-0.5) for _ in range(D)]
    w_hr = [rnd(P, H, scale=H**-0.5) for _ in range(D)]
    h0, c0 = rnd(D, B, P, scale=0.5), rnd(D, B, H, scale=0.5)
    cot = (rnd(T, B, D, P), rnd(D, B, P), rnd(D, B, H))
    return xg, w_hh, w_hr, h0, c0, cot


def _reference(xg, w_hh, w_hr, h0, c0, lengths, reverse, cot):
    """float64 outputs and gradients by autograd through the reference loop."""
    D = len(w_hh)
    leaves = [t.detach().double().requires_grad_() for t in (xg, h0, c0, *w_hh, *w_hr)]
    out = lstm_recurrence_reference(
        leaves[0], leaves[3 : 3 + D], leaves[3 + D :], leaves[1], leaves[2], lengths, reverse
    )
    g = torch.autograd.grad(out, leaves, [c.double() for c in cot])
    return _named(out, g[0], g[3 : 3 + D], g[3 + D :], g[1], g[2])


def _named(out, g_xg, g_w_hh, g_w_hr, g_h0, g_c0):
    named = {"y": out[0], "h_n": out[1], "c_n": out[2], "grad_xg": g_xg, "grad_h0": g_h0, "grad_c0": g_c0}
    named.update({f"grad_w_hh[{d}]": w for d, w in enumerate(g_w_hh)})
    named.update({f"grad_w_hr[{d}]": w for d, w in enumerate(g_w_hr)})
    return named


def _driver(path: str):
    kind = "stepwise" if path == "stepwise" else "persistent"
    return with_projection(
        getattr(cuda_lstm, f"lstm_recurrence_{kind}_forward"),
        getattr(cuda_lstm, f"lstm_recurrence_{kind}_backward"),
        cuda_lstm.cell_outputs,
    )


def _run(forward, backward, xg, w_hh, w_hr, h0, c0, lengths, reverse, cot):
    y, h_n, c_n, ws = forward(xg, w_hh, w_hr, h0, c0, lengths, reverse)
    g_xg, g_w_hh, g_w_hr, g_h0, g_c0 = backward(*cot, xg, w_hh, w_hr, h0, c0, lengths, reverse, y, ws)
    return _named((y, h_n, c_n), g_xg, g_w_hh, g_w_hr, g_h0, g_c0)


CASES = [
    # T, B, D, H, P, lengths, reverse
    (5, 3, 1, 7, 3, None, [False]),
    (6, 4, 2, 5, 2, [6, 3, 1, 0], [False, True]),
    (4, 2, 2, 9, 4, [2, 4], [True, True]),
    (1, 1, 1, 3, 1, None, [True]),
    (3, 5, 2, 16, 8, [0, 0, 3, 1, 2], [True, False]),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("T, B, D, H, P, lengths, reverse", CASES)
def test_projection_on_every_driver_path_matches_the_reference(path, T, B, D, H, P, lengths, reverse):
    lengths = None if lengths is None else torch.tensor(lengths)
    args = _inputs(T, B, D, H, P, seed=T * 10 + B)
    xg, w_hh, w_hr, h0, c0, cot = args
    with pc.preferring_forward_kernel(None if path == "stepwise" else path):
        ours = _run(*_driver(path), xg, w_hh, w_hr, h0, c0, lengths, reverse, cot)
    ref = _reference(xg, w_hh, w_hr, h0, c0, lengths, reverse, cot)
    for name, r in ref.items():
        assert ours[name].shape == r.shape, name
        assert rel_err(ours[name], r, strict=True) < 1e-12, f"{path} {name}: {rel_err(ours[name], r, strict=True):.3g}"
    if lengths is not None:
        past = torch.arange(T).unsqueeze(1) >= lengths.unsqueeze(0)
        assert torch.all(ours["y"][past] == 0)


@st.composite
def _cases(draw):
    T, B, D = draw(st.integers(1, 5)), draw(st.integers(1, 7)), draw(st.integers(1, 3))
    H = draw(st.integers(2, 20))
    P = draw(st.integers(1, H - 1))
    lengths = draw(st.none() | st.lists(st.integers(0, T), min_size=B, max_size=B))
    reverse = draw(st.lists(st.booleans(), min_size=D, max_size=D))
    return T, B, D, H, P, lengths, reverse, draw(st.sampled_from(PATHS))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(_cases())
def test_projection_on_random_problems(case):
    T, B, D, H, P, lengths, reverse, path = case
    lengths = None if lengths is None else torch.tensor(lengths)
    xg, w_hh, w_hr, h0, c0, cot = _inputs(T, B, D, H, P, seed=T + 7 * B + 31 * H + P)
    with pc.preferring_forward_kernel(None if path == "stepwise" else path):
        ours = _run(*_driver(path), xg, w_hh, w_hr, h0, c0, lengths, reverse, cot)
    ref = _reference(xg, w_hh, w_hr, h0, c0, lengths, reverse, cot)
    for name, r in ref.items():
        assert rel_err(ours[name], r, strict=True) < 1e-11, f"{case}: {name} {rel_err(ours[name], r, strict=True):.3g}"


def test_h_n_is_the_last_steps_output_bit_for_bit():
    T, B, D, H, P = 5, 4, 2, 12, 5
    lengths = torch.tensor([5, 2, 0, 4])
    xg, w_hh, w_hr, h0, c0, _ = _inputs(T, B, D, H, P, dtype=torch.float32)
    forward, _ = _driver("cooperative")
    y, h_n, _, _ = forward(xg, w_hh, w_hr, h0, c0, lengths, [False, True])
    for b, n in enumerate(lengths.tolist()):
        if n == 0:
            assert torch.equal(h_n[:, b], h0[:, b])  # nothing ran: the state is h0
        else:
            assert torch.equal(h_n[0, b], y[n - 1, b, 0]) and torch.equal(h_n[1, b], y[0, b, 1])


@pytest.mark.parametrize("path", PATHS)
def test_final_state_does_not_depend_on_what_is_stored(path):
    """h_n with y stored (training), with y and the workspace stored, and with neither (inference
    of the final state only) are the same bits, and equal y at each row's last step."""
    T, B, D, H, P = 8, 3, 2, 40, 16
    lengths = torch.tensor([8, 0, 5])
    xg, w_hh, w_hr, h0, c0, _ = _inputs(T, B, D, H, P, dtype=torch.float32, seed=11)
    forward, _ = _driver(path)
    with pc.preferring_forward_kernel(None if path == "stepwise" else path):
        runs = [
            forward(xg, w_hh, w_hr, h0, c0, lengths, [False, True], save_for_backward=s, write_y=y)
            for s, y in ((True, True), (False, True), (False, False))
        ]
    for _, h_n, c_n, _ in runs[1:]:
        assert torch.equal(h_n, runs[0][1]) and torch.equal(c_n, runs[0][2])
    y, h_n = runs[0][0], runs[0][1]
    assert torch.equal(h_n[0, 0], y[7, 0, 0]) and torch.equal(h_n[0, 2], y[4, 2, 0])
    assert torch.equal(h_n[1, 0], y[0, 0, 1]) and torch.equal(h_n[:, 1], h0[:, 1])  # length 0 keeps h0


def test_calls_without_projection_go_straight_to_the_kernels():
    seen = []

    def forward(*args, save_for_backward=True, write_y=True):
        seen.append(("forward", args[2]))
        return "forward result"

    def backward(*args):
        seen.append(("backward", args[5]))
        return "backward result"

    f, b = with_projection(forward, backward, cell_outputs=None)
    assert f(None, None, [], None, None, None, None) == "forward result"
    assert b(None, None, None, None, None, [], None, None, None, None, None, None) == "backward result"
    assert seen == [("forward", []), ("backward", [])]


def _rounding_like_cudnn(xg, w_hh, w_hr, h0, c0, dtype):
    """A float32 loop on ``dtype`` weights that rounds ``r`` and ``h`` to ``dtype`` every step (as
    cuDNN's projected LSTM feeds them back): the error a 16-bit implementation is held to."""
    T, _, D, _ = xg.shape
    ys = []
    for d in range(D):
        h, c, out = h0[d].float(), c0[d].float(), []
        for t in range(T):
            gates = xg[t, :, d].float() + h @ w_hh[d].float().t()
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            r = (torch.sigmoid(o) * torch.tanh(c)).to(dtype).float()
            h = (r @ w_hr[d].float().t()).to(dtype).float()
            out.append(h)
        ys.append(torch.stack(out))
    return torch.stack(ys, dim=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16_bit_projection_error_is_that_of_rounding_h_every_step(dtype):
    """The reparametrized recurrence rounds W_hh W_hr and r where cuDNN rounds h: its output
    error against float64 stays within 1.5x of a loop that rounds like cuDNN."""
    T, B, D, H, P = 24, 8, 2, 96, 48
    xg, w_hh, w_hr, h0, c0, _ = _inputs(T, B, D, H, P, dtype=dtype, seed=3)
    forward, _ = _driver("cooperative")
    y, *_ = forward(xg, w_hh, w_hr, h0, c0, None, [False, False])
    ref = lstm_recurrence_reference(
        *(t.double() for t in (xg,)),
        [w.double() for w in w_hh],
        [w.double() for w in w_hr],
        h0.double(),
        c0.double(),
        None,
        [False, False],
    )[0]
    baseline = _rounding_like_cudnn(xg, w_hh, w_hr, h0, c0, dtype)
    assert rel_err(y, ref, strict=True) <= 1.5 * rel_err(baseline, ref, strict=True)


def test_registered_cuda_implementation_serves_projections(monkeypatch):
    """The cuda backend's registered functions take w_hr (here on CPU tensors, the ops' CPU
    implementations, with H100 limits so the persistent path is planned)."""
    monkeypatch.setattr(cuda_planning, "limits_for", lambda call, limits: pc.H100_SXM)
    impl = backends.implementation("lstm_recurrence", "cuda")
    T, B, D, H, P = 4, 3, 2, 10, 4
    call = LSTMRecurrenceCall(T, B, D, H, P, torch.float32, torch.device("cuda"), True, (False, True))
    assert impl.why_not(call) is None
    assert "proj_size 4" in cuda_lstm.describe(call, pc.H100_SXM)
    assert cuda_lstm.persistent_plan(call, "forward", pc.H100_SXM) == cuda_lstm.persistent_plan(
        LSTMRecurrenceCall(T, B, D, H, 0, torch.float32, torch.device("cuda"), True, (False, True)),
        "forward",
        pc.H100_SXM,
    )
    lengths = torch.tensor([4, 0, 2])
    xg, w_hh, w_hr, h0, c0, cot = _inputs(T, B, D, H, P, dtype=torch.float32)
    with pc.counting_forward_kernels() as served:
        ours = _run(impl.functions["forward"], impl.functions["backward"], xg, w_hh, w_hr, h0, c0, lengths, [0, 1], cot)
    assert sum(served.values()) == 1
    ref = _reference(xg, w_hh, w_hr, h0, c0, lengths, [False, True], cot)
    for name, r in ref.items():
        assert rel_err(ours[name], r, strict=True) < 1e-5, name
