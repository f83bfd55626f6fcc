"""Hypothesis-driven comparisons with ``torch.nn`` over shapes and options (reference backend),
NaN/Inf propagation, zero-size batches and deterministic mode."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis", reason="hypothesis drives these tests (pip install hypothesis)")
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from fusedconvlstm import LSTM, Conv1dStack
from fusedconvlstm.passmark import rel_err
from tests.helpers import within_relative_mark

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@st.composite
def lstm_setups(draw):
    hidden = draw(st.integers(1, 9))
    return (
        dict(
            input_size=draw(st.integers(1, 7)),
            hidden_size=hidden,
            num_layers=draw(st.integers(1, 3)),
            bias=draw(st.booleans()),
            batch_first=draw(st.booleans()),
            bidirectional=draw(st.booleans()),
            proj_size=draw(st.integers(0, hidden - 1)),
        ),
        draw(st.integers(1, 9)),
        draw(st.integers(1, 4)),  # batch 0: test_zero_size_batch_lstm (every drawn example compares values)
        draw(st.booleans()),
        draw(st.booleans()),
    )


def _lstm_inputs(cfg: dict, T: int, B: int, with_hx: bool, packed: bool):
    """A float64 input for an LSTM of ``cfg`` (packed with random lengths when ``packed``) and its
    initial state (``None`` unless ``with_hx``)."""
    shape = (B, T, cfg["input_size"]) if cfg["batch_first"] else (T, B, cfg["input_size"])
    x = torch.randn(shape, dtype=F64)
    D = 2 if cfg["bidirectional"] else 1
    hx = None
    if with_hx:
        P = cfg["proj_size"] or cfg["hidden_size"]
        hx = (
            torch.randn(cfg["num_layers"] * D, B, P, dtype=F64),
            torch.randn(cfg["num_layers"] * D, B, cfg["hidden_size"], dtype=F64),
        )
    if packed:
        lengths = torch.randint(1, T + 1, (B,))
        x = pack_padded_sequence(x, lengths, batch_first=cfg["batch_first"], enforce_sorted=False)
    return x, hx


@SETTINGS
@given(lstm_setups())
def test_lstm_matches_nn_lstm(setup):
    cfg, T, B, with_hx, packed = setup
    ref = nn.LSTM(**cfg, dtype=F64)
    fused = LSTM.from_torch(ref, backend="reference")
    x, hx = _lstm_inputs(cfg, T, B, with_hx, packed)
    o_ref, (h_ref, c_ref) = ref(x, hx)
    o_fus, (h_fus, c_fus) = fused(x, hx)
    if packed:
        o_ref, o_fus = o_ref.data, o_fus.data
    assert o_fus.shape == o_ref.shape and h_fus.shape == h_ref.shape and c_fus.shape == c_ref.shape
    assert o_ref.numel() > 0  # every example compares values
    assert rel_err(o_fus, o_ref, strict=True) < 1e-10
    assert rel_err(h_fus, h_ref, strict=True) < 1e-10 and rel_err(c_fus, c_ref, strict=True) < 1e-10


@pytest.mark.parametrize("with_hx", [False, True])
def test_zero_size_batch_lstm(with_hx):
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=F64)
    fused = LSTM.from_torch(ref, backend="reference")
    x = torch.randn(5, 0, 3, dtype=F64)
    hx = (torch.randn(4, 0, 4, dtype=F64), torch.randn(4, 0, 4, dtype=F64)) if with_hx else None
    o_ref, (h_ref, c_ref) = ref(x, hx)
    o_fus, (h_fus, c_fus) = fused(x, hx)
    assert o_fus.shape == o_ref.shape and h_fus.shape == h_ref.shape and c_fus.shape == c_ref.shape


@st.composite
def conv_setups(draw):
    n = draw(st.integers(1, 3))
    layers = []
    for _ in range(n):
        k = draw(st.integers(1, 5))
        layers.append(
            dict(
                out_channels=draw(st.integers(1, 6)),
                kernel_size=k,
                stride=draw(st.integers(1, 3)),
                padding=draw(st.integers(0, 3)),
                dilation=draw(st.integers(1, 3)),
                bias=draw(st.booleans()),
                act=draw(st.sampled_from([None, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh])),
            )
        )
    # The shortest input the chain takes (one output step), so that every example compares values.
    need = 1
    for spec in reversed(layers):
        span = spec["dilation"] * (spec["kernel_size"] - 1) + 1
        need = max(1, (need - 1) * spec["stride"] + span - 2 * spec["padding"])
    return draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(need, need + 30)), layers


def _chain(c_in: int, layers: list[dict]) -> nn.Sequential:
    """The nn.Conv1d chain (float64) a drawn setup describes."""
    mods, c = [], c_in
    for spec in layers:
        mods.append(
            nn.Conv1d(
                c,
                spec["out_channels"],
                spec["kernel_size"],
                stride=spec["stride"],
                padding=spec["padding"],
                dilation=spec["dilation"],
                bias=spec["bias"],
                dtype=F64,
            )
        )
        if spec["act"] is not None:
            mods.append(spec["act"]())
        c = spec["out_channels"]
    return nn.Sequential(*mods)


@SETTINGS
@given(conv_setups())
def test_conv_stack_matches_nn_conv1d(setup):
    c_in, B, T, layers = setup
    chain = _chain(c_in, layers)
    stack = Conv1dStack.from_torch(chain, backend="reference")
    x = torch.randn(B, c_in, T, dtype=F64)
    try:
        want = chain(x)
    except RuntimeError:
        with pytest.raises(ValueError, match="too short"):
            stack(x)
        return
    got = stack(x)
    assert got.shape == want.shape
    if want.numel():
        assert rel_err(got, want, strict=True) < 1e-10


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_lstm_propagates_nan_and_inf_like_torch(bad):
    ref = nn.LSTM(3, 4, dtype=F64)
    fused = LSTM.from_torch(ref, backend="reference")
    x = torch.randn(5, 2, 3, dtype=F64)
    x[2, 1, 0] = bad
    o_ref, (h_ref, _) = ref(x)
    o_fus, (h_fus, _) = fused(x)
    assert torch.equal(torch.isnan(o_fus), torch.isnan(o_ref))
    assert torch.equal(torch.isinf(o_fus), torch.isinf(o_ref))
    assert torch.equal(torch.isnan(h_fus), torch.isnan(h_ref))
    finite = torch.isfinite(o_ref)
    assert torch.allclose(o_fus[finite], o_ref[finite])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_conv_stack_propagates_nan_and_inf_like_torch(bad):
    chain = nn.Sequential(nn.Conv1d(3, 4, 3, dtype=F64), nn.ReLU(), nn.Conv1d(4, 2, 3, dtype=F64))
    stack = Conv1dStack.from_torch(chain, backend="reference")
    x = torch.randn(2, 3, 12, dtype=F64)
    x[1, 0, 5] = bad
    want, got = chain(x), stack(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))


def test_zero_size_batch_conv_stack():
    chain = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Conv1d(4, 2, 3))
    stack = Conv1dStack.from_torch(chain, backend="reference")
    x = torch.randn(0, 3, 9, requires_grad=True)
    y = stack(x)
    assert y.shape == chain(x).shape == (0, 2, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_deterministic_mode_is_respected():
    """Under torch.use_deterministic_algorithms the reference path runs and repeats bitwise."""
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    fused = LSTM.from_torch(ref, backend="reference")
    x = torch.randn(6, 3, 3)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        outs = []
        for _ in range(2):
            fused.zero_grad()
            o, _ = fused(x)
            o.sum().backward()
            outs.append((o.detach(), [p.grad.clone() for p in fused.parameters()]))
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def _within_twice_torch(got, torch_out, want, dtype=torch.float32) -> bool:
    return within_relative_mark(got, torch_out, want, dtype, slack_eps=4)


@pytest.mark.triton
@settings(max_examples=8, deadline=None, derandomize=True)
@given(conv_setups())
def test_conv_stack_on_triton_matches_nn_conv1d(setup):
    c_in, B, T, layers = setup
    chain = _chain(c_in, layers)
    x = torch.randn(B, c_in, T, dtype=F64)
    want = chain(x)
    stack = Conv1dStack.from_torch(chain, backend="triton").float()
    got, torch_out = stack(x.float()), chain.float()(x.float())
    assert got.shape == want.shape and want.numel() > 0  # every example compares values
    if want.norm() > 0:  # an all-zero output (relu of negatives) is compared exactly
        assert _within_twice_torch(got, torch_out, want)
    else:
        assert got.abs().max() <= 4 * torch.finfo(torch.float32).eps * x.abs().max()


@pytest.mark.triton
@settings(max_examples=8, deadline=None, derandomize=True)
@given(lstm_setups())
def test_lstm_on_triton_matches_nn_lstm(setup):
    cfg, T, B, with_hx, packed = setup
    ref = nn.LSTM(**cfg, dtype=F64)
    x, hx = _lstm_inputs(cfg, T, B, with_hx, packed)
    hx32 = None if hx is None else tuple(h.float() for h in hx)
    want, (h_want, c_want) = ref(x, hx)
    fused = LSTM.from_torch(ref, backend="triton").float()
    got, (h_got, c_got) = fused(x.float(), hx32)  # a tensor's or a PackedSequence's float()
    torch_out, (h_torch, c_torch) = ref.float()(x.float(), hx32)
    if packed:
        want, got, torch_out = want.data, got.data, torch_out.data
    assert got.shape == want.shape and want.numel() > 0  # every example compares values
    assert _within_twice_torch(got, torch_out, want) and _within_twice_torch(h_got, h_torch, h_want)
    assert _within_twice_torch(c_got, c_torch, c_want)
