"""The persistent LSTM kernels' index arithmetic, fragment layouts and barrier protocol, checked on
the CPU through a line-by-line model (:mod:`tests.persistent_kernel_model`) against the reference
op, for launch configurations that cover every code path: one and several batch tiles per block
(prefetch of the next tile), several batch groups, padded hidden units and batch rows, both operand
widths (16-bit and TF32 layouts), reversed recurrences and lengths with empty and full rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedconvlstm.cuda import persistent_config as pc
from fusedconvlstm.cuda import persistent_cpu as ref
from fusedconvlstm.cuda.constants import padded_reduction
from fusedconvlstm.numerics.recurrence import reverse_mask
from tests import persistent_kernel_model as km
from tests.helpers import lstm_weights

F64 = torch.float64
T, B, D, H = 4, 27, 2, 20
LENGTHS = [4, 0, 2, 4, 1, 3, 4, 4, 4, 2, 4, 1, 4, 4, 3, 4, 4, 4, 0, 4, 4, 2, 4, 4, 4, 4, 3]
REVERSE = [False, True]
DTYPE_OF_WIDTH = {2: torch.bfloat16, 4: torch.float32}

# (nt, wm, wn, wk, nbg): chosen so that B = 27 gives 1-4 tiles per block and H = 20 leaves padded units.
FORWARD_CONFIGS = [(1, 1, 1, 8, 1), (1, 1, 1, 8, 2), (4, 2, 1, 4, 1), (1, 2, 4, 1, 1), (4, 1, 2, 4, 1), (1, 8, 1, 1, 1)]
# (nt, wm, wn, wk) of the cluster kernel: clusters of 3, 2 and 1 blocks (H = 20 in slices of 8, 16,
# 32 and 64 units, the last two wider than the padded row), 1-4 batch tiles with a partial last one.
CLUSTER_CONFIGS = [(1, 1, 1, 8), (1, 1, 2, 4), (4, 1, 2, 4), (1, 2, 4, 1), (4, 2, 1, 4), (1, 4, 2, 1), (1, 8, 1, 1)]
BACKWARD_CONFIGS = [
    (1, 1, 1, 8, 1),
    (1, 1, 1, 8, 2),
    (4, 1, 2, 4, 1),
    (1, 2, 2, 2, 1),
    (1, 2, 1, 4, 4),
    (1, 8, 1, 1, 1),
]


def _cute_index(shape, stride, coord) -> int:
    """A CuTe layout (nested shape / stride tuples) applied to a flat coordinate (colexicographic)."""
    if isinstance(shape, int):
        return coord * stride
    out = 0
    for s, d in zip(shape, stride):
        size = _size(s)
        out += _cute_index(s, d, coord % size)
        coord //= size
    return out


def _size(shape) -> int:
    return shape if isinstance(shape, int) else int(np.prod([_size(s) for s in shape]))


# CUTLASS cute/atom/mma_traits_sm80.hpp: (thread, value) -> column-major index of the operand.
_CUTE = {
    2: {  # SM80_16x8x16_F32{BF16,F16}..._TN: A (M16, K16), B (N8, K16), C (M16, N8)
        "a": (((4, 8), (2, 2, 2)), ((32, 1), (16, 8, 128)), 16),
        "b": (((4, 8), (2, 2)), ((16, 1), (8, 64)), 8),
    },
    1: {  # SM80_16x8x8_F32TF32TF32F32_TN: A (M16, K8), B (N8, K8)
        "a": (((4, 8), (2, 2)), ((16, 1), (8, 64)), 16),
        "b": (((4, 8), 2), ((8, 1), 32), 8),
    },
}
_CUTE_C = (((4, 8), (2, 2)), ((32, 1), (16, 8)), 16)


@pytest.mark.parametrize("words", [2, 1], ids=["m16n8k16", "m16n8k8_tf32"])
def test_model_fragment_tables_match_cutlass(words):
    frag = km.fragment_coords(words)
    for operand in ("a", "b"):
        (tshape, vshape), (tstride, vstride), rows = _CUTE[words][operand]
        first, second = frag[operand]
        regs = first.shape[0]
        for lane in range(32):
            for reg in range(regs):
                for e in range(words):
                    idx = _cute_index(tshape, tstride, lane) + _cute_index(vshape, vstride, e + words * reg)
                    # A: (m, k) from m + 16 k; B: (n, k) from n + 8 k, the model gives (k, n)
                    got = (first[reg, lane, e], second[reg, lane, e])
                    want = (idx % rows, idx // rows) if operand == "a" else (idx // rows, idx % rows)
                    assert got == want, (operand, lane, reg, e)
    (tshape, vshape), (tstride, vstride), rows = _CUTE_C
    for lane in range(32):
        for i in range(4):
            idx = _cute_index(tshape, tstride, lane) + _cute_index(vshape, vstride, i)
            assert (frag["c"][0][lane, i], frag["c"][1][lane, i]) == (idx % rows, idx // rows)


def _problem(kind, cfg, eb, lengths, shape=(T, B, D, H), reverse=REVERSE):
    if kind == pc.CLUSTER:
        cfg = (*cfg, None)
    t, b, d, h = shape
    layout = pc.make_layout(kind, *cfg, b, d, h, DTYPE_OF_WIDTH[eb])
    return km.Problem(t, b, d, h, eb, layout, lengths, reverse_mask(reverse))


def _inputs(seed, shape=(T, B, D, H)):
    t, b, d, h = shape
    g = torch.Generator().manual_seed(seed)
    xg = torch.randn(t, b, d, 4 * h, dtype=F64, generator=g)
    torch.manual_seed(seed)
    w = torch.stack(lstm_weights(d, h, dtype=F64))
    h0 = 0.5 * torch.randn(d, b, h, dtype=F64, generator=g)
    c0 = 0.5 * torch.randn(d, b, h, dtype=F64, generator=g)
    return xg, w, h0, c0


def _reference_forward(xg, w, h0, c0, lengths, reverse=REVERSE):
    t, b, d, h = xg.shape[0], xg.shape[1], xg.shape[2], xg.shape[3] // 4
    h_buf = torch.zeros(2, d, b, padded_reduction(h, F64.itemsize), dtype=F64)
    h_buf[0, :, :, :h] = h0
    c = c0.clone()
    y = torch.empty(t, b, d, h, dtype=F64)
    ws = torch.empty(t, b, d, 5 * h, dtype=F64)
    sync = torch.empty(d * km.SYNC_STRIDE, dtype=torch.int32)
    ref.lstm_persistent_forward_(xg, w, lengths, reverse_mask(reverse), 1, 1, 1, 8, 1, False, h_buf, c, y, ws, sync)
    return y, h_buf[t % 2, :, :, :h], c, ws


def _reference_backward(grad_y, ws, c0, w, grad_h_n, grad_c_n, lengths, reverse=REVERSE):
    """``(dgates, grad_h0, grad_c0)`` of the reference backward op."""
    t, b, d, h = grad_y.shape
    dh, dc = grad_h_n.clone(), grad_c_n.clone()
    dgates = torch.empty(t, b, d, 4 * h, dtype=F64)
    g_buf = torch.zeros(2, d, b, padded_reduction(4 * h, F64.itemsize), dtype=F64)
    sync = torch.empty(d * km.SYNC_STRIDE, dtype=torch.int32)
    ref.lstm_persistent_backward_(
        grad_y, ws, c0, w, lengths, reverse_mask(reverse), 1, 1, 1, 8, 1, False, dh, dc, dgates, g_buf, sync
    )
    return dgates, dh, dc


def _close(model: np.ndarray, reference: torch.Tensor, name: str) -> None:
    assert not np.isnan(model).any(), f"{name}: NaN (an element never written, or an unwritten byte read)"
    np.testing.assert_allclose(model, reference.numpy(), rtol=1e-11, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("eb", [2, 4], ids=["16bit", "tf32"])
@pytest.mark.parametrize("cfg", FORWARD_CONFIGS, ids=str)
@pytest.mark.parametrize("with_lengths", [True, False], ids=["lengths", "full"])
def test_forward_kernel_model_matches_reference(cfg, eb, with_lengths):
    lengths = LENGTHS if with_lengths else None
    _check_forward_model(km.run_forward, "forward", (T, B, D, H), eb, cfg, lengths, REVERSE, 1, range(2))


@pytest.mark.parametrize("eb", [2, 4], ids=["16bit", "tf32"])
@pytest.mark.parametrize("cfg", BACKWARD_CONFIGS, ids=str)
@pytest.mark.parametrize("with_lengths", [True, False], ids=["lengths", "full"])
def test_backward_kernel_model_matches_reference(cfg, eb, with_lengths):
    lengths = torch.tensor(LENGTHS) if with_lengths else None
    xg, w, h0, c0 = _inputs(2)
    _, _, _, ws = _reference_forward(xg, w, h0, c0, lengths)
    g = torch.Generator().manual_seed(3)
    grad_y = torch.randn(T, B, D, H, dtype=F64, generator=g)
    grad_h_n, grad_c_n = torch.randn(D, B, H, dtype=F64, generator=g), torch.randn(D, B, H, dtype=F64, generator=g)
    want = _reference_backward(grad_y, ws, c0, w, grad_h_n, grad_c_n, lengths)
    p = _problem("backward", cfg, eb, None if lengths is None else lengths.numpy())
    for seed in range(2):
        got = km.run_backward(
            p, grad_y.numpy(), ws.numpy(), c0.numpy(), w.numpy(), grad_h_n.numpy(), grad_c_n.numpy(), seed
        )
        for name, a, b in zip(("dgates", "grad_h0", "grad_c0"), got, want):
            _close(a, b, name)


def test_forward_kernel_model_without_workspace():
    """``save_for_backward=False``: a null workspace; the outputs are unchanged."""
    lengths = torch.tensor(LENGTHS)
    xg, w, h0, c0 = _inputs(4)
    want = _reference_forward(xg, w, h0, c0, lengths)
    p = _problem("forward", (1, 1, 1, 8, 2), 2, lengths.numpy())
    got = km.run_forward(p, xg.numpy(), w.numpy(), h0.numpy(), c0.numpy(), 0, save_workspace=False)
    assert got[3] is None
    for name, a, b in zip(("y", "h_n", "c_n"), got[:3], want[:3]):
        _close(a, b, name)


@pytest.mark.parametrize("eb", [2, 4], ids=["16bit", "tf32"])
@pytest.mark.parametrize("cfg", CLUSTER_CONFIGS, ids=str)
@pytest.mark.parametrize("with_lengths", [True, False], ids=["lengths", "full"])
def test_cluster_forward_kernel_model_matches_reference(cfg, eb, with_lengths):
    lengths = LENGTHS if with_lengths else None
    # Three interleavings of the blocks and of the remote stores.
    _check_forward_model(km.run_cluster_forward, pc.CLUSTER, (T, B, D, H), eb, cfg, lengths, REVERSE, 5, range(3))


def test_cluster_forward_kernel_model_without_workspace():
    lengths = torch.tensor(LENGTHS)
    xg, w, h0, c0 = _inputs(6)
    want = _reference_forward(xg, w, h0, c0, lengths)
    p = _problem(pc.CLUSTER, (1, 1, 1, 8), 2, lengths.numpy())
    got = km.run_cluster_forward(p, xg.numpy(), w.numpy(), h0.numpy(), c0.numpy(), 0, save_workspace=False)
    assert got[3] is None
    for name, a, b in zip(("y", "h_n", "c_n"), got[:3], want[:3]):
        _close(a, b, name)


def test_backward_kernel_model_defers_the_last_tiles_dgates():
    """The backward's last batch tile of a step stages its dG in the dG tile and stores dgates
    after the arrive: the model takes that path (2 tiles per block, lengths) and matches."""
    shape, cfg, lengths = (3, 40, 2, 20), (1, 1, 1, 8, 3), [3, 0, 2] + [3] * 30 + [1] * 7
    xg, w, h0, c0 = _inputs(9, shape)
    _, _, _, ws = _reference_forward(xg, w, h0, c0, torch.tensor(lengths), REVERSE)
    g = torch.Generator().manual_seed(10)
    grad_y = torch.randn(3, 40, 2, 20, dtype=F64, generator=g)
    grad_h_n, grad_c_n = torch.randn(2, 40, 20, dtype=F64, generator=g), torch.randn(2, 40, 20, dtype=F64, generator=g)
    want = _reference_backward(grad_y, ws, c0, w, grad_h_n, grad_c_n, torch.tensor(lengths), REVERSE)
    p = _problem("backward", cfg, 2, np.array(lengths), shape, REVERSE)
    before = km.DEFERRED_STORES["backward"]
    got = km.run_backward(p, grad_y.numpy(), ws.numpy(), c0.numpy(), w.numpy(), grad_h_n.numpy(), grad_c_n.numpy(), 4)
    assert km.DEFERRED_STORES["backward"] - before == p.layout.grid * shape[0]
    for name, a, b in zip(("dgates", "grad_h0", "grad_c0"), got, want):
        _close(a, b, name)


@pytest.mark.parametrize(
    "cfg, eb, outputs",
    [
        ((1, 1, 1, 8, 2), 2, "y+ws"),
        ((1, 2, 1, 4, 3), 2, "y+ws"),
        ((1, 2, 1, 4, 3), 4, "y+ws"),
        ((1, 1, 1, 8, 1), 4, "y"),
        ((1, 2, 1, 4, 3), 2, "none"),
    ],
    ids=str,
)
def test_forward_kernel_model_defers_the_last_tiles_stores(cfg, eb, outputs, monkeypatch):
    """Where the staging fits the h tile (H = 192 in slices of 8 or 16 units), the cooperative
    kernel stages its last batch tile's y and workspace there and stores them after the arrive:
    the model takes that path (counted) and stays equal to the reference, with 1-3 tiles per
    block, lengths, both directions, and with y or the workspace absent."""
    calls = []
    original = km.store_staged
    monkeypatch.setattr(km, "store_staged", lambda *a: calls.append(1) or original(*a))
    shape, lengths = (3, 40, 2, 192), [3, 0, 2] + [3] * 30 + [1] * 7
    save, write_y = outputs == "y+ws", outputs != "none"
    xg, w, h0, c0 = _inputs(8, shape)
    want = _reference_forward(xg, w, h0, c0, torch.tensor(lengths), REVERSE)
    p = _problem("forward", cfg, eb, np.array(lengths), shape, REVERSE)
    got = km.run_forward(p, xg.numpy(), w.numpy(), h0.numpy(), c0.numpy(), 3, save_workspace=save, write_y=write_y)
    assert len(calls) == (p.layout.grid * shape[0] if write_y or save else 0)
    for name, a, b, present in zip(("y", "h_n", "c_n", "workspace"), got, want, (write_y, True, True, save)):
        if present:
            _close(a, b, f"{cfg} {eb}: {name}")
        else:
            assert a is None


@pytest.mark.parametrize("kind", ["forward", pc.CLUSTER])
def test_forward_kernel_models_with_only_the_final_state(kind):
    """A null ``y`` and workspace (inference of the last state only): h_n and c_n unchanged."""
    lengths = torch.tensor(LENGTHS)
    xg, w, h0, c0 = _inputs(7)
    want = _reference_forward(xg, w, h0, c0, lengths)
    cfg = (1, 1, 1, 8, 2) if kind == "forward" else (1, 1, 1, 8)
    p = _problem(kind, cfg, 2, lengths.numpy())
    run = km.run_forward if kind == "forward" else km.run_cluster_forward
    got = run(p, xg.numpy(), w.numpy(), h0.numpy(), c0.numpy(), 0, save_workspace=False, write_y=False)
    assert got[0] is None and got[3] is None
    for name, a, b in zip(("h_n", "c_n"), got[1:3], want[1:3]):
        _close(a, b, name)


def test_cluster_kernel_model_notices_a_missing_step_barrier():
    """Without the per-step cluster wait, some interleaving reads a peer's h before it lands (or
    after the next step overwrote it): the model must see a wrong result, else its passes above
    would prove nothing about the barrier."""
    xg, w, h0, c0 = _inputs(7)
    want = _reference_forward(xg, w, h0, c0, None)
    p = _problem(pc.CLUSTER, (1, 1, 1, 8), 2, None)  # clusters of 3 blocks
    assert p.layout.nu == 3
    wrong = 0
    for seed in range(4):
        got = km.run_cluster_forward(p, xg.numpy(), w.numpy(), h0.numpy(), c0.numpy(), seed, step_barrier=False)
        wrong += not np.allclose(got[0], want[0].numpy(), rtol=1e-9, atol=1e-12)
    assert wrong > 0


@st.composite
def _random_problems(draw, kind):
    """A small problem and a launch configuration of ``kind``: sizes below, at and past the tile
    edges, one or two recurrences in either direction, lengths with empty and full rows."""
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 20)), draw(st.integers(1, 2)), draw(st.integers(1, 40)))
    eb = draw(st.sampled_from([2, 4]))
    nt, wm, wn = draw(st.sampled_from([1, 4])), draw(st.sampled_from([1, 2, 4, 8])), draw(st.sampled_from([1, 2, 4]))
    if wm * wn > 8:
        wn = 8 // wm
    cfg = (nt, wm, wn, 8 // (wm * wn))
    if kind != pc.CLUSTER:  # the cooperative kernels take any number of batch groups up to the tiles
        cfg = (*cfg, draw(st.integers(1, -(-shape[1] // (8 * nt * wn)))))
    lengths = None
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, shape[0]), min_size=shape[1], max_size=shape[1]))
    reverse = draw(st.lists(st.booleans(), min_size=shape[2], max_size=shape[2]))
    return shape, eb, cfg, lengths, reverse, draw(st.integers(0, 2**16))


_RANDOM = settings(max_examples=40, deadline=None, derandomize=True)


@_RANDOM
@given(_random_problems("forward"))
def test_forward_kernel_model_on_random_problems(problem):
    *args, seed = problem
    _check_forward_model(km.run_forward, "forward", *args, seed, [seed])


@_RANDOM
@given(_random_problems(pc.CLUSTER))
def test_cluster_forward_kernel_model_on_random_problems(problem):
    *args, seed = problem
    _check_forward_model(km.run_cluster_forward, pc.CLUSTER, *args, seed, [seed])


def _check_forward_model(run, kind, shape, eb, cfg, lengths, reverse, input_seed, interleavings):
    """A forward kernel's model on inputs drawn from ``input_seed``, once per interleaving seed,
    against the reference op."""
    lengths = None if lengths is None else torch.tensor(lengths)
    xg, w, h0, c0 = _inputs(input_seed, shape)
    want = _reference_forward(xg, w, h0, c0, lengths, reverse)
    p = _problem(kind, cfg, eb, None if lengths is None else lengths.numpy(), shape, reverse)
    if kind == pc.CLUSTER:
        assert p.layout.nbg == p.layout.nbt  # one batch tile per cluster
    for seed in interleavings:
        got = run(p, xg.numpy(), w.numpy(), h0.numpy(), c0.numpy(), seed)
        for name, a, b in zip(("y", "h_n", "c_n", "workspace"), got, want):
            _close(a, b, f"{kind} {shape} {cfg}: {name}")


@_RANDOM
@given(_random_problems("backward"))
def test_backward_kernel_model_on_random_problems(problem):
    shape, eb, cfg, lengths, reverse, seed = problem
    lengths = None if lengths is None else torch.tensor(lengths)
    xg, w, h0, c0 = _inputs(seed, shape)
    _, _, _, ws = _reference_forward(xg, w, h0, c0, lengths, reverse)
    t, b, d, h = shape
    g = torch.Generator().manual_seed(seed + 1)
    grad_y = torch.randn(t, b, d, h, dtype=F64, generator=g)
    grad_h_n, grad_c_n = torch.randn(d, b, h, dtype=F64, generator=g), torch.randn(d, b, h, dtype=F64, generator=g)
    want = _reference_backward(grad_y, ws, c0, w, grad_h_n, grad_c_n, lengths, reverse)
    p = _problem("backward", cfg, eb, None if lengths is None else lengths.numpy(), shape, reverse)
    got = km.run_backward(
        p, grad_y.numpy(), ws.numpy(), c0.numpy(), w.numpy(), grad_h_n.numpy(), grad_c_n.numpy(), seed
    )
    for name, a, b_ in zip(("dgates", "grad_h0", "grad_c0"), got, want):
        _close(a, b_, f"backward {shape} {cfg}: {name}")


def test_kernel_constants_header_is_generated_from_python():
    """The kernels' constants come from ``csrc/lstm_constants.h``, generated from
    :mod:`fusedconvlstm.cuda.constants` (which the model, the planner and the drivers read): the
    committed header must be exactly what the Python side generates."""
    from pathlib import Path

    from fusedconvlstm.cuda import constants

    header = Path(__file__).resolve().parent.parent / constants.HEADER
    assert header.read_text() == constants.header_text(), "run: python fusedconvlstm/cuda/constants.py"
    for name in ("kThreads", "kKStepBytes", "kSyncStride", "kMaxClusterBlocks", "kClusterPrefetch"):
        assert f"constexpr int {name} = " in constants.header_text()
    assert km.THREADS == constants.THREADS and km.CLUSTER_PREFETCH == constants.CLUSTER_PREFETCH


def test_no_kernel_source_redefines_a_generated_constant():
    """A constant of the generated header is defined nowhere else in ``csrc/`` (a second
    definition would be a compile error in the same namespace, or a silent shadow in another)."""
    from pathlib import Path

    from fusedconvlstm.cuda import constants

    csrc = Path(__file__).resolve().parent.parent / "csrc"
    for src in sorted(p for p in csrc.glob("*.cu*") if p.name != "lstm_constants.h"):
        text = src.read_text()
        for name in constants._CPP_NAMES.values():
            assert f"constexpr int {name} =" not in text, (
                f"{src.name} defines {name}: edit fusedconvlstm/cuda/constants.py"
            )


# =============================================================================================
# The forward that computes the input projection itself


def _check_from_input_model(shape, n_in, eb, cfg, lengths, reverse, input_seed, interleavings):
    """The in-kernel projection's model (``x`` padded to the kernel's ``kpx``, NaN-free) against
    the reference op that forms ``xg = x W_ihᵀ + b`` first."""
    t, b, d, h = shape
    lengths = None if lengths is None else torch.tensor(lengths)
    g = torch.Generator().manual_seed(input_seed + 7)
    x = torch.randn(t, b, n_in, dtype=F64, generator=g)
    w_ih = 0.4 * torch.randn(d, 4 * h, n_in, dtype=F64, generator=g)
    bias = 0.2 * torch.randn(d, 4 * h, dtype=F64, generator=g)
    _, w, h0, c0 = _inputs(input_seed, shape)
    xg = torch.einsum("tbi,dgi->tbdg", x, w_ih) + bias
    want = _reference_forward(xg, w, h0, c0, lengths, reverse)
    layout = pc.make_layout(pc.FROM_INPUT, *cfg, b, d, h, DTYPE_OF_WIDTH[eb], input_size=n_in)
    p = km.Problem(t, b, d, h, eb, layout, None if lengths is None else lengths.numpy(), reverse_mask(reverse), n_in)
    x_pad = np.zeros((t, b, layout.kpx))
    x_pad[..., :n_in] = x.numpy()
    for seed in interleavings:
        got = km.run_forward_from_input(p, x_pad, w_ih.numpy(), bias.numpy(), w.numpy(), h0.numpy(), c0.numpy(), seed)
        for name, a, want_a in zip(("y", "h_n", "c_n", "workspace"), got, want):
            _close(a, want_a, f"from input {shape} I={n_in} {cfg}: {name}")


@pytest.mark.parametrize("eb", [2, 4], ids=["16bit", "tf32"])
@pytest.mark.parametrize("cfg", FORWARD_CONFIGS, ids=str)
@pytest.mark.parametrize("n_in", [20, 37], ids=lambda i: f"I{i}")
def test_forward_from_input_kernel_model_matches_reference(cfg, eb, n_in):
    # I = 37 pads x and the W_ih rows past a whole k-step; I = 20 with H = 20 is the square case.
    _check_from_input_model((T, B, D, H), n_in, eb, cfg, LENGTHS, REVERSE, 3, range(2))


def test_forward_from_input_layout_holds_every_tile_of_a_block():
    # Shared memory: the cooperative kernel's, then the W_ih slice and one x tile in rows of
    # ldx bytes, then 4 hs x bt projected gates (fp32) per batch tile of a block.
    base = pc.make_layout("forward", 1, 1, 1, 8, 2, 27, 2, 20, torch.bfloat16)
    lay = pc.make_layout(pc.FROM_INPUT, 1, 1, 1, 8, 2, 27, 2, 20, torch.bfloat16, input_size=37)
    ldx = 48 * 2 + 16
    assert lay.kpx == 48 and lay.input_tiles == 2
    assert lay.smem == base.smem + (32 + 8) * ldx + 2 * 8 * 32 * 4
    assert (lay.hs, lay.bt, lay.nu, lay.nbt, lay.grid) == (base.hs, base.bt, base.nu, base.nbt, base.grid)
    with pytest.raises(ValueError, match="input_size"):
        pc.make_layout(pc.FROM_INPUT, 1, 1, 1, 8, 2, 27, 2, 20, torch.bfloat16)


@_RANDOM
@given(_random_problems("forward"), st.integers(1, 40))
def test_forward_from_input_kernel_model_on_random_problems(problem, n_in):
    *args, seed = problem
    shape, eb, cfg, lengths, reverse = args
    _check_from_input_model(shape, n_in, eb, cfg, lengths, reverse, seed, [seed])
