"""Triton backend of the Conv1d stack op (``fusedconvlstm/triton/conv1d*.py``).

Every check compares against an ``F.conv1d`` chain in float64 and passes when the kernel's
relative error is at most twice that of the same chain run by PyTorch in the kernel's dtype on
the same inputs (docs/design.md §3), for the output and every gradient. Outputs and all buffers the
backend allocates are NaN-poisoned first (fixture below), so an element left unwritten fails.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` in fp32 and fp16 at small sizes; on a
GPU the same tests run on CUDA and add bf16, and the tests marked ``gpu`` run the reference
model's full size.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from fusedconvlstm import BackendUnavailableError, Conv1dStack, lstm_recurrence  # noqa: E402
from fusedconvlstm.calls.conv1d import ConvLayer, check_conv1d_stack_args  # noqa: E402
from fusedconvlstm.numerics import dropout as philox_dropout  # noqa: E402
from fusedconvlstm.ops.conv1d import (  # noqa: E402
    conv1d_stack,
    conv1d_stack_embedding,
    conv1d_stack_embedding_projection,
    conv1d_stack_projection,
)
from fusedconvlstm.passmark import rel_err  # noqa: E402
from fusedconvlstm.reference.conv1d import apply_activation  # noqa: E402
from fusedconvlstm.triton import conv1d as layer_kernels  # noqa: E402
from fusedconvlstm.triton import conv1d_fused_stack  # noqa: E402
from fusedconvlstm.triton import conv1d_stack as triton_stack  # noqa: E402
from fusedconvlstm.triton import dropout as triton_dropout  # noqa: E402
from tests.conftest import HAS_GPU, TRITON_INTERPRET  # noqa: E402
from tests.helpers import CONV1D_STACK_COMBOS, assert_pass_mark, opcheck_conv1d_stack  # noqa: E402

pytestmark = pytest.mark.triton

F64 = torch.float64
ON_GPU = HAS_GPU and not TRITON_INTERPRET
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TRITON_TESTS_FOLLOW_THE_GPU = True  # every test here runs on DEVICE (tests/conftest.py)
# The interpreter's bf16 tl.dot is wrong: bf16 only on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@pytest.fixture(autouse=True)
def _poisoned_buffers(monkeypatch):
    """Every buffer the backend allocates starts as NaN."""
    monkeypatch.setattr(
        layer_kernels, "alloc", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device)
    )


@pytest.fixture(params=["layers", "fused"])
def strategy(request, monkeypatch):
    monkeypatch.setenv(triton_stack.STRATEGY_ENV_VAR, request.param)
    return request.param


# --- a stack described by per-layer specs ----------------------------------------------------------


def _pair(p, k, s, d):
    if p == "same":
        total = d * (k - 1)
        return total // 2, total - total // 2
    if p == "valid":
        return 0, 0
    return (p, p) if isinstance(p, int) else tuple(p)


class Stack:
    """Random float64 parameters of a stack from specs ``(c_out, k, stride, padding, dilation,
    bias, activation)``, and the same stack computed by PyTorch's F.conv1d in any dtype."""

    def __init__(self, c_in, specs, proj_out=0, proj_bias=True, dropout=None, seed=None):
        self.specs = specs
        # Dropout on each layer's input (the op's ``dropout``/``seed``); the chain applies the
        # reference masks of the same seed.
        self.drop = dict(dropout=dropout, seed=seed) if dropout else {}
        self.weights, self.biases = [], []
        c = c_in
        for c_out, k, _, _, _, b, _ in specs:
            self.weights.append(torch.randn(c_out, c, k, dtype=F64, device=DEVICE) / math.sqrt(c * k))
            self.biases.append(torch.randn(c_out, dtype=F64, device=DEVICE) if b else None)
            c = c_out
        self.proj_weight = torch.randn(proj_out, c, dtype=F64, device=DEVICE) / math.sqrt(c) if proj_out else None
        self.proj_bias = torch.randn(proj_out, dtype=F64, device=DEVICE) if proj_out and proj_bias else None
        self.kwargs = dict(
            stride=[s[2] for s in specs],
            padding=[_pair(s[3], s[1], s[2], s[4]) for s in specs],
            dilation=[s[4] for s in specs],
            activation=[s[6] for s in specs],
        )

    def params(self):
        """Differentiable parameters in a fixed order (absent biases skipped)."""
        out = list(self.weights) + [b for b in self.biases if b is not None]
        if self.proj_weight is not None:
            out += [self.proj_weight] + ([self.proj_bias] if self.proj_bias is not None else [])
        return out

    def split(self, ps):
        L = len(self.weights)
        w, rest = ps[:L], ps[L:]
        it = iter(rest)
        b = [next(it) if bb is not None else None for bb in self.biases]
        pw = next(it) if self.proj_weight is not None else None
        pb = next(it) if self.proj_bias is not None else None
        return w, b, pw, pb

    def torch_chain(self, h_btc, ps):
        """PyTorch's own computation in the dtype of its arguments (channels-first chain)."""
        w, b, pw, pb = self.split(ps)
        h = h_btc.transpose(1, 2)
        for i, (wi, bi, s, pad, d, act) in enumerate(
            zip(w, b, self.kwargs["stride"], self.kwargs["padding"], self.kwargs["dilation"], self.kwargs["activation"])
        ):
            if self.drop:
                h = philox_dropout.dropout(h.transpose(1, 2), self.drop["dropout"][i], self.drop["seed"], i).transpose(
                    1, 2
                )
            h = apply_activation(F.conv1d(F.pad(h, pad), wi, bi, stride=s, dilation=d), act)
        if pw is not None:
            return F.linear(h.permute(2, 0, 1), pw, pb)  # time-major (T, B, N)
        return h.transpose(1, 2)


def _leaves(ts, dtype):
    return [t.detach().to(dtype).clone().requires_grad_() for t in ts]


def _grads(out, leaves, grad_out):
    return torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


def _compare(name, ours, torch_same, ref, dtype):
    """The pass mark (docs/design.md §3): our error against the float64 reference within twice
    PyTorch's in the same dtype plus one eps, the largest element too, no NaN."""
    assert not torch.isnan(ours).any(), f"{name}: NaN (an element left unwritten?)"
    assert_pass_mark(ours, torch_same, ref, dtype, name)
    return rel_err(ours, ref, strict=True)


def _check_stack_op(stack, x, dtype, *, tokens=None, grad=True):
    """Run ``stack`` on ``x`` (or on ``tokens`` with table ``x``) with the triton backend in
    ``dtype``, with PyTorch in ``dtype`` and in float64; compare the output and all gradients."""

    def run(backend, dt, use_op):
        leaves = _leaves([x, *stack.params()], dt)
        xx, ps = leaves[0], leaves[1:]
        w, b, pw, pb = stack.split(ps)
        with torch.set_grad_enabled(grad):
            if not use_op:
                h = F.embedding(tokens, xx) if tokens is not None else xx
                out = stack.torch_chain(h, ps)
            elif tokens is not None and pw is not None:
                out = conv1d_stack_embedding_projection(
                    tokens, xx, w, b, pw, pb, backend=backend, **stack.kwargs, **stack.drop
                )
            elif tokens is not None:
                out = conv1d_stack_embedding(tokens, xx, w, b, backend=backend, **stack.kwargs, **stack.drop)
            elif pw is not None:
                out = conv1d_stack_projection(xx, w, b, pw, pb, backend=backend, **stack.kwargs, **stack.drop)
            else:
                out = conv1d_stack(xx, w, b, backend=backend, **stack.kwargs, **stack.drop)
        return out, leaves

    ref, ref_leaves = run(None, F64, False)
    same, same_leaves = run(None, dtype, False)
    ours, our_leaves = run("triton", dtype, True)
    assert ours.is_contiguous()
    _compare("output", ours, same, ref, dtype)
    if not grad:
        return
    g = torch.randn_like(ref)
    names = ["x" if tokens is None else "table"] + [f"param[{i}]" for i in range(len(stack.params()))]
    for name, a, b_, r in zip(
        names, _grads(ours, our_leaves, g), _grads(same, same_leaves, g), _grads(ref, ref_leaves, g)
    ):
        _compare(f"grad {name}", a, b_, r, dtype)


# --- every layer option, one launch per layer --------------------------------------------------------

LAYER_SPECS = {
    # (c_out, k, stride, padding, dilation, bias, activation). Odd channel counts, at least a
    # dozen: a bias gradient with a handful of elements makes the 2x error ratio a coin toss.
    "k1": [(13, 1, 1, 0, 1, True, "none")],
    "k3-same-relu": [(14, 3, 1, "same", 1, False, "relu")],
    "k5-s2-pad2-gelu": [(15, 5, 2, 2, 1, True, "gelu")],
    "k3-s3-asym-d2-silu": [(13, 3, 3, (2, 1), 2, True, "silu")],
    "k5-valid-d2-tanh": [(11, 5, 1, "valid", 2, False, "tanh")],
    # Activations between layers run in the next layer's load (and its backward's epilogue).
    "gelu-into-tanh": [(14, 3, 2, (1, 0), 1, True, "gelu"), (13, 3, 1, "same", 2, True, "tanh")],
    "silu-into-relu": [(16, 5, 3, 2, 1, False, "silu"), (12, 1, 1, 0, 1, True, "relu")],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYER_SPECS))
def test_layer_options_match_torch(name, dtype, monkeypatch):
    monkeypatch.setenv(triton_stack.STRATEGY_ENV_VAR, "layers")
    stack = Stack(5, LAYER_SPECS[name])
    x = torch.randn(3, 23, 5, dtype=F64, device=DEVICE)
    _check_stack_op(stack, x, dtype)


def test_non_contiguous_input_and_batch_one(monkeypatch):
    monkeypatch.setenv(triton_stack.STRATEGY_ENV_VAR, "layers")
    stack = Stack(5, LAYER_SPECS["gelu-into-tanh"])
    x = torch.randn(1, 5, 50, dtype=F64, device=DEVICE).transpose(1, 2)[:, ::2]  # (1, 25, 5), strided in T and C
    assert not x.is_contiguous()
    _check_stack_op(stack, x, torch.float32)


# --- the fused stack -----------------------------------------------------------------------------------

FUSED_SPECS = {
    # The reference model's shape, narrowed: five k=3 valid layers, the last stride 2, no activations.
    "reference-like": [(13, 3, 1, 0, 1, True, "none")] * 2
    + [(15, 3, 1, 0, 1, True, "none")] * 2
    + [(16, 3, 2, 0, 1, True, "none")],
    # Padding inside the stack (zero rows at the tile windows' edges), dilation, activations.
    "mixed": [
        (14, 3, 1, (1, 1), 1, True, "relu"),
        (13, 3, 2, (2, 0), 2, False, "gelu"),
        (15, 1, 1, 0, 1, True, "silu"),
        (12, 5, 1, "same", 1, True, "tanh"),
    ],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("name", list(FUSED_SPECS))
def test_fused_stack_matches_torch(name, training, dtype, monkeypatch):
    monkeypatch.setenv(triton_stack.STRATEGY_ENV_VAR, "fused")
    stack = Stack(5, FUSED_SPECS[name])
    x = torch.randn(2, 91, 5, dtype=F64, device=DEVICE)
    call = check_conv1d_stack_args(
        x.to(dtype), None, [w.to(dtype) for w in stack.weights],
        [b.to(dtype) if b is not None else None for b in stack.biases], stack.kwargs["stride"],
        [p for pair in stack.kwargs["padding"] for p in pair], stack.kwargs["dilation"],
        ",".join(stack.kwargs["activation"]), save_for_backward=training,
    )  # fmt: skip
    layers, lens = call.all_layers(), [call.seq_len] + call.out_lens()
    plan = conv1d_fused_stack.plan_fused(layers, lens, call.batch, dtype, DEVICE, training)
    if not ON_GPU:
        # The test sizes make the interpreter run several tiles (halos recomputed) through a
        # persistent loop (more work items than programs), and the inference slab is reused.
        assert plan.n_tiles > 1 and plan.n_work > plan.programs and plan.slab == (not training)
    _check_stack_op(stack, x, dtype, grad=training)


def test_fused_training_with_unneeded_trailing_rows(monkeypatch):
    """A strided last layer leaves trailing rows of the saved intermediates that the output does
    not depend on, which the fused kernel does not compute; the backward still visits them (with
    zero gradient), so they must not hold garbage (here: the NaN poison)."""
    monkeypatch.setenv(triton_stack.STRATEGY_ENV_VAR, "fused")
    specs = [(6, 3, 1, 0, 1, True, "none"), (6, 3, 1, 0, 1, True, "none"), (7, 3, 2, 0, 1, True, "none")]
    stack = Stack(4, specs)
    x = torch.randn(2, 20, 4, dtype=F64, device=DEVICE)  # 20 -> 18 -> 16 -> 7: rows 15 and 17 unneeded
    layers = tuple(
        ConvLayer(c_in, c_out, k, s, (0, 0), 1, "none", True) for c_in, (c_out, k, s, *_) in zip([4, 6, 6], specs)
    )
    assert triton_stack.needed_rows(layers, [20, 18, 16, 7]) == [19, 17, 15, 7]
    _check_stack_op(stack, x, torch.float32, grad=True)


def test_fused_training_with_rows_between_tile_windows(monkeypatch):
    """A layer whose kernel span is shorter than its stride (kernel 1, stride 2) skips a row at
    each boundary between two tiles' windows: no tile computes it. The backward multiplies it by
    zero (gelu' of it in the input gradient, the weight gradient of the layer reading it), so it
    must not hold garbage (here: the NaN poison)."""
    monkeypatch.setenv(triton_stack.STRATEGY_ENV_VAR, "fused")
    stack = Stack(4, [(6, 3, 1, 0, 1, True, "gelu"), (5, 1, 1, 0, 1, True, "tanh"), (7, 1, 2, 0, 1, True, "none")])
    x = torch.randn(1, 81, 4, dtype=F64, device=DEVICE)  # 81 -> 79 -> 79 -> 40: two tiles of 20
    layers = tuple(
        ConvLayer(c_in, c_out, k, s, (0, 0), 1, "none", True)
        for c_in, c_out, k, s in [(4, 6, 3, 1), (6, 5, 1, 1), (5, 7, 1, 2)]
    )
    plan = conv1d_fused_stack.plan_fused(layers, [81, 79, 79, 40], 1, torch.float32, DEVICE, True)
    if not ON_GPU:
        assert plan.n_tiles > 1 and conv1d_fused_stack.levels_with_gaps(layers, plan) == [True, True]
    _check_stack_op(stack, x, torch.float32, grad=True)


# --- dropout ---------------------------------------------------------------------------------------------


def test_mask_kernel_draws_the_reference_masks():
    """The Triton mask kernel and the PyTorch Philox give bitwise the same masks (levels > 0 put
    bits in the counter's high word), and keep about 1 - p of the elements."""
    seed = torch.randint(0, philox_dropout.SEED_HIGH, (), device=DEVICE)
    for level, p, shape in [(0, 0.25, (3, 41, 37)), (2, 0.5, (2, 33, 64)), (5, 0.9, (1, 7, 300)), (1, 1.0, (2, 3, 4))]:
        ours = triton_dropout.keep_mask(seed, level, shape, p)
        ref = philox_dropout.keep_mask(seed, level, shape, p)
        assert ours.dtype == torch.uint8 and torch.equal(ours.bool(), ref), (level, p)
        n = ref.numel()
        assert abs(ref.float().mean().item() - (1 - p)) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12, (level, p)


DROPOUT_SPECS = {
    # Dropout on the input (or the gathered embedding), between activated layers, through padding,
    # stride and dilation; one layer without.
    "mixed": (FUSED_SPECS["mixed"], [0.3, 0.5, 0.0, 0.2]),
    "reference-like": (FUSED_SPECS["reference-like"], [0.25, 0.0, 0.0, 0.0, 0.0]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("combo", ["plain", "tokens+projection"])
@pytest.mark.parametrize("name", list(DROPOUT_SPECS))
def test_dropout_matches_torch_with_the_same_masks(name, combo, dtype, strategy):
    """Output and every gradient against the float64 chain that applies the reference masks of
    the same seed: the kernels drop exactly the reference's elements, forward and backward."""
    _check_dropout_stack(name, combo, dtype)


def _check_dropout_stack(name: str, combo: str, dtype: torch.dtype) -> None:
    """The stack of ``DROPOUT_SPECS[name]`` with its dropout, as ``combo`` (tokens, projection)."""
    specs, rates = DROPOUT_SPECS[name]
    seed = torch.randint(0, philox_dropout.SEED_HIGH, (), device=DEVICE)
    with_tokens, with_proj, _ = CONV1D_STACK_COMBOS[combo]
    stack = Stack(5, specs, proj_out=24 if with_proj else 0, dropout=rates, seed=seed)
    if with_tokens:
        tokens = torch.randint(0, 37, (3, 47), device=DEVICE)
        _check_stack_op(stack, torch.randn(37, 5, dtype=F64, device=DEVICE), dtype, tokens=tokens)
    else:
        _check_stack_op(stack, torch.randn(3, 47, 5, dtype=F64, device=DEVICE), dtype)


def test_dropout_is_a_function_of_the_seed(strategy):
    stack = Stack(5, FUSED_SPECS["mixed"])
    x = torch.randn(2, 40, 5, device=DEVICE)
    w, b = [t.float() for t in stack.weights], [t.float() if t is not None else None for t in stack.biases]
    rates = [0.5, 0.5, 0.5, 0.5]

    def run(seed):
        return conv1d_stack(x, w, b, backend="triton", dropout=rates, seed=seed, **stack.kwargs)

    s1, s2 = torch.tensor(7, device=DEVICE), torch.tensor(8, device=DEVICE)
    assert torch.equal(run(s1), run(s1)) and not torch.equal(run(s1), run(s2))
    # Without a seed one is drawn from PyTorch's generator: manual_seed reproduces the call.
    torch.manual_seed(3)
    a = conv1d_stack(x, w, b, backend="triton", dropout=rates, **stack.kwargs)
    torch.manual_seed(3)
    assert torch.equal(a, conv1d_stack(x, w, b, backend="triton", dropout=rates, **stack.kwargs))
    # All-zero rates are no dropout at all.
    plain = conv1d_stack(x, w, b, backend="triton", **stack.kwargs)
    assert torch.equal(plain, conv1d_stack(x, w, b, backend="triton", dropout=[0.0] * 4, **stack.kwargs))


@pytest.mark.parametrize("training", [True, False], ids=["train", "inference"])
def test_fused_stack_several_samples_per_work_item(training, monkeypatch):
    monkeypatch.setenv(triton_stack.STRATEGY_ENV_VAR, "fused")
    monkeypatch.setattr(conv1d_fused_stack, "SAMPLES_PER_WORK_ITEM", 2)
    stack = Stack(5, FUSED_SPECS["mixed"])
    x = torch.randn(3, 61, 5, dtype=F64, device=DEVICE)  # the second pair of samples is a single one
    _check_stack_op(stack, x, torch.float32, grad=training)


def test_auto_strategy_rule():
    meta = dict(dtype=torch.bfloat16, device="meta")
    chans = [100, 200, 200, 256, 256, 512]
    w = [torch.empty(c_out, c_in, 3, **meta) for c_in, c_out in zip(chans, chans[1:])]
    x = torch.empty(256, 100, 100, **meta)
    call = check_conv1d_stack_args(x, None, w, [None] * 5, [1, 1, 1, 1, 2], [0] * 10, [1] * 5, ",".join(["none"] * 5))
    assert triton_stack.choose_strategy(call) == "fused"
    # The reference model's output tile is its whole 45-step sequence: no halo.
    lens = [100, 98, 96, 94, 92, 45]
    plan = conv1d_fused_stack.plan_fused(call.all_layers(), lens, 256, torch.bfloat16, torch.device("cpu"), False)
    assert plan.tile == 45 and plan.rows == (99, 97, 95, 93, 91, 45)
    assert conv1d_fused_stack.halo_overhead(call.all_layers(), lens, plan) == 1.0
    # One layer, or an intermediate wider than the limit, runs per layer.
    one = check_conv1d_stack_args(x, None, w[:1], [None], [1], [0, 0], [1], "none")
    assert triton_stack.choose_strategy(one) == "layers"
    wide = [torch.empty(2048, 100, 3, **meta), torch.empty(8, 2048, 3, **meta)]
    wide_call = check_conv1d_stack_args(x, None, wide, [None, None], [1, 1], [0] * 4, [1, 1], "none,none")
    assert triton_stack.choose_strategy(wide_call) == "layers"


# What the plan reads of an H100 (torch.cuda.get_device_properties); an H200 has the same.
H100 = SimpleNamespace(multi_processor_count=132, L2_cache_size=50 * 2**20, regs_per_multiprocessor=65536, warp_size=32)


def _reference_call(batch, training, embedding_projection=False):
    """The reference model's stack call (bf16, T = 100) on meta tensors, optionally from token ids
    to the gates of both LSTMs (the 512 -> 4096 projection)."""
    meta = dict(dtype=torch.bfloat16, device="meta")
    chans = [100, 200, 200, 256, 256, 512]
    w = [torch.empty(c_out, c_in, 3, **meta) for c_in, c_out in zip(chans, chans[1:])]
    hyper = ([1, 1, 1, 1, 2], [0] * 10, [1] * 5, ",".join(["none"] * 5))
    if embedding_projection:
        tokens = torch.zeros(batch, 100, dtype=torch.int64, device="meta")
        table, pw = torch.empty(20_000, 100, **meta), torch.empty(4096, 512, **meta)
        return check_conv1d_stack_args(table, tokens, w, [None] * 5, *hyper, pw, None, training)
    return check_conv1d_stack_args(
        torch.empty(batch, 100, 100, **meta), None, w, [None] * 5, *hyper, None, None, training
    )


@pytest.mark.parametrize("embedding_projection", [False, True], ids=["stack", "tokens-to-gates"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("batch", [128, 256, 1024, 2048])
def test_reference_model_fuses_whole_sequences_on_an_h100(batch, training, embedding_projection, monkeypatch):
    """With an H100's SM count, registers and L2: the fused kernel (8 warps, 255 registers) has one
    program per SM, so batch 128 and 256 are about one and two waves of whole sequences; and with
    the projection the inference slab (levels 1..5, 217 KB in bf16) fits the L2 share."""
    monkeypatch.setattr(layer_kernels, "gpu_properties", lambda device: H100)
    call = _reference_call(batch, training, embedding_projection)
    layers, lens = call.all_layers(), triton_stack._lens(call)
    plan = conv1d_fused_stack.plan_fused(layers, lens, batch, call.dtype, call.device, training)
    assert (plan.tile, plan.n_tiles, plan.n_work, plan.programs) == (45, 1, batch, min(batch, 132))
    assert conv1d_fused_stack.halo_overhead(layers, lens, plan) == 1.0
    assert triton_stack.choose_strategy(call) == "fused"


def test_fused_plan_on_an_h100(monkeypatch):
    monkeypatch.setattr(layer_kernels, "gpu_properties", lambda device: H100)
    cuda = torch.device("cuda")  # only looked at through gpu_properties
    assert conv1d_fused_stack.resident_programs(cuda, 8) == 132
    assert conv1d_fused_stack.resident_programs(cuda, 4) == 264
    # 60 % of the 50 MiB L2 over 132 programs.
    assert conv1d_fused_stack.slab_budget_bytes(cuda, 132) == 238_312
    # A small batch leaves SMs idle with whole sequences: two balanced tiles (23 + 22), not the
    # halving's 22 + 22 + 1, and still within the halo limit.
    call = _reference_call(8, False)
    layers, lens = call.all_layers(), triton_stack._lens(call)
    plan = conv1d_fused_stack.plan_fused(layers, lens, 8, call.dtype, call.device, False)
    assert (plan.tile, plan.n_tiles, plan.programs) == (23, 2, 16)
    assert 1.0 < conv1d_fused_stack.halo_overhead(layers, lens, plan) <= triton_stack.FUSED_MAX_HALO_OVERHEAD
    assert triton_stack.choose_strategy(call) == "fused"
    # Any length, batch 1 (the most tiles): tiles of at least 16 steps, the last at least half a tile.
    for t_in in range(33, 700, 7):
        call = dataclasses.replace(call, seq_len=t_in, batch=1)
        layers, lens = call.all_layers(), triton_stack._lens(call)
        plan = conv1d_fused_stack.plan_fused(layers, lens, 1, call.dtype, call.device, False)
        tail = lens[-1] - (plan.n_tiles - 1) * plan.tile
        assert plan.tile >= min(conv1d_fused_stack.MIN_TILE, lens[-1]) and 2 * tail >= plan.tile, (t_in, plan)
        assert plan.n_tiles * plan.tile >= lens[-1] > (plan.n_tiles - 1) * plan.tile


# --- embedding prologue, projection epilogue ----------------------------------------------------------

OP_SPECS = [(16, 3, 1, 0, 1, True, "silu"), (7, 3, 2, (2, 1), 2, False, "none")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embedding_op_matches_torch(dtype, strategy):
    stack = Stack(5, OP_SPECS)
    table = torch.randn(11, 5, dtype=F64, device=DEVICE)
    tokens = torch.randint(0, 11, (3, 40), device=DEVICE)[:, ::2]  # non-contiguous ids, (3, 20)
    tokens[0, :6] = 0  # a run of one id, as left padding gives
    _check_stack_op(stack, table, dtype, tokens=tokens)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_projection_op_matches_torch(dtype, strategy):
    stack = Stack(5, OP_SPECS, proj_out=24)
    x = torch.randn(3, 25, 5, dtype=F64, device=DEVICE)
    _check_stack_op(stack, x, dtype)


@pytest.mark.parametrize("proj_bias", [True, False], ids=["proj-bias", "no-proj-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embedding_projection_op_matches_torch(dtype, proj_bias, strategy):
    """Token ids to gates (the reference model's fused path) against F.embedding -> F.conv1d
    chain -> F.linear: gates and the gradients of the table, the layers and the projection."""
    stack = Stack(5, OP_SPECS, proj_out=24, proj_bias=proj_bias)
    table = torch.randn(11, 5, dtype=F64, device=DEVICE)
    tokens = torch.randint(0, 11, (3, 21), device=DEVICE, dtype=torch.int32)
    tokens[1, :7] = 3  # a run of one id
    _check_stack_op(stack, table, dtype, tokens=tokens)


def test_projection_gates_feed_the_lstm_recurrence():
    """gates.view(T, B, D, 4H) is lstm_recurrence's xg: two LSTMs on the stack's output."""
    H, D = 4, 2
    stack = Stack(5, OP_SPECS)
    lstms = [torch.nn.LSTM(7, H, dtype=F64, device=DEVICE) for _ in range(D)]
    pw = torch.cat([m.weight_ih_l0 for m in lstms]).detach()
    pb = torch.cat([m.bias_ih_l0 + m.bias_hh_l0 for m in lstms]).detach()
    x = torch.randn(2, 21, 5, dtype=F64, device=DEVICE)
    with torch.no_grad():
        gates = conv1d_stack_projection(
            x.float(), [w.float() for w in stack.weights], [b.float() if b is not None else None for b in stack.biases],
            pw.float(), pb.float(), backend="triton", **stack.kwargs,
        )  # fmt: skip
        T, B = gates.shape[:2]
        y, h_n, _ = lstm_recurrence(
            gates.double().view(T, B, D, 4 * H), [m.weight_hh_l0.detach() for m in lstms], backend="reference"
        )
        h = stack.torch_chain(x, stack.params()).transpose(0, 1)  # (T, B, 7)
        for d, m in enumerate(lstms):
            ref_y, (ref_h, _) = m(h)
            assert rel_err(y[:, :, d], ref_y, strict=True) < 1e-5 and rel_err(h_n[d], ref_h[0], strict=True) < 1e-5


# --- gradients are deterministic; recompute when nothing was saved ----------------------------------


def test_gradients_are_bitwise_reproducible(strategy):
    stack = Stack(5, OP_SPECS)
    table = torch.randn(13, 5, dtype=torch.float32, device=DEVICE, requires_grad=True)
    tokens = torch.randint(0, 13, (3, 60), device=DEVICE)
    tokens[torch.rand(3, 60, device=DEVICE) < 0.9] = 0  # id 0 runs over several chunks of the table gradient
    ps = _leaves(stack.params(), torch.float32)
    w, b, _, _ = stack.split(ps)
    runs = []
    for _ in range(2):
        y = conv1d_stack_embedding(tokens, table, w, b, backend="triton", **stack.kwargs)
        runs.append(torch.autograd.grad(y, [table, *ps], torch.ones_like(y)))
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("chunk, block_p", [(64, 32), (4, 2)], ids=["default-chunks", "tiny-chunks"])
def test_embedding_grad_of_a_heavily_repeated_id(chunk, block_p, monkeypatch):
    """Left padding makes one id most of the positions: its run crosses many chunks of the
    two-pass table gradient. Against float64, at most 2x the error of PyTorch's own fp32 sum, and
    bitwise the same twice. Tiny chunks make the second pass loop over many partials."""
    monkeypatch.setattr(layer_kernels, "EMBEDDING_GRAD_CHUNK", chunk)
    monkeypatch.setattr(layer_kernels, "EMBEDDING_GRAD_BLOCK_P", block_p)
    V, T, E = (11, 70, 20) if chunk == 64 else (11, 30, 37)  # 37 channels: two column blocks
    tokens = torch.randint(1, V - 1, (3, T), device=DEVICE)
    tokens[torch.rand(3, T, device=DEVICE) < 0.9] = 0
    tokens[2, 10:14] = 3  # a short run inside one chunk
    assert (tokens == 0).sum() > 2 * chunk
    dh = torch.randn(3, T, E, device=DEVICE)

    def table_grad(d):
        return torch.zeros(V, E, dtype=d.dtype, device=DEVICE).index_add_(0, tokens.reshape(-1), d.reshape(-1, E))

    ours = layer_kernels.embedding_grad(dh, tokens, V)
    _compare("table grad", ours, table_grad(dh), table_grad(dh.double()), torch.float32)
    assert torch.equal(ours[V - 1], torch.zeros(E, device=DEVICE))  # an unused id's row
    assert torch.equal(ours, layer_kernels.embedding_grad(dh, tokens, V))


def test_weight_grad_split_reduction_matches_one_chunk():
    from fusedconvlstm.calls.conv1d import ConvLayer

    layer = ConvLayer(6, 5, 3, 2, (1, 1), 1, "none", True)
    x = torch.randn(3, 61, 6, device=DEVICE)
    dz = torch.randn(3, layer.out_len(61), 5, device=DEVICE)
    dw1, db1 = layer_kernels.conv1d_layer_weight_grad(x, dz, layer, 61, splits=1)
    dw3, db3 = layer_kernels.conv1d_layer_weight_grad(x, dz, layer, 61, splits=3)
    assert rel_err(dw3, dw1, strict=True) < 1e-6 and rel_err(db3, db1, strict=True) < 1e-6


def test_backward_without_saved_tensors_recomputes():
    stack = Stack(5, FUSED_SPECS["mixed"])
    x = torch.randn(2, 30, 5, device=DEVICE)
    w = [t.float() for t in stack.weights]
    present = [t.float() for t in stack.biases if t is not None]
    has_bias = [t is not None for t in stack.biases]
    pads = [p for pair in stack.kwargs["padding"] for p in pair]
    hyper = (has_bias, stack.kwargs["stride"], pads, stack.kwargs["dilation"], ",".join(stack.kwargs["activation"]))
    op, bwd = torch.ops.fusedconvlstm.conv1d_stack, torch.ops.fusedconvlstm.conv1d_stack_backward
    y, saved = op(x, None, w, present, *hyper, None, None, "triton", True)
    y_nosave, nothing = op(x, None, w, present, *hyper, None, None, "triton", False)
    assert len(saved) == 4 and nothing == [] and torch.equal(y, y_nosave)
    g = torch.randn_like(y)
    with_saved = bwd(g, x, None, w, present, *hyper, None, None, saved, "triton")
    recomputed = bwd(g, x, None, w, present, *hyper, None, None, [], "triton")
    assert with_saved[3] == [] and recomputed[3] == []
    for a, b in zip([with_saved[0], *with_saved[1], *with_saved[2]], [recomputed[0], *recomputed[1], *recomputed[2]]):
        assert torch.equal(a, b)


def test_zero_size_batch_and_nan_propagation(strategy):
    stack = Stack(5, FUSED_SPECS["mixed"], proj_out=8)
    w, b = [t.float() for t in stack.weights], [t.float() if t is not None else None for t in stack.biases]
    x = torch.randn(0, 30, 5, device=DEVICE, requires_grad=True)
    y = conv1d_stack(x, w, b, backend="triton", **stack.kwargs)
    y.sum().backward()
    assert y.shape[0] == 0 and x.grad.shape == x.shape
    gates = conv1d_stack_projection(x, w, b, stack.proj_weight.float(), None, backend="triton", **stack.kwargs)
    assert gates.shape[1] == 0
    # A NaN (or inf) in the input reaches the same outputs as in PyTorch, through relu too.
    x = torch.randn(2, 30, 5, device=DEVICE)
    x[1, 7, 2], x[0, 20, 1] = math.nan, math.inf
    stack.proj_weight = stack.proj_bias = None
    with torch.no_grad():
        ours = conv1d_stack(x, w, b, backend="triton", **stack.kwargs)
        want = stack.torch_chain(x, [t.float() for t in stack.params()])
    assert torch.equal(torch.isnan(ours), torch.isnan(want)) and torch.equal(torch.isinf(ours), torch.isinf(want))


# --- opcheck ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("combo", list(CONV1D_STACK_COMBOS))
def test_opcheck_triton(combo):
    """The op and its backward op in every prologue/epilogue combination (the reference backend's
    opcheck is in test_conv1d_stack.py)."""
    opcheck_conv1d_stack(combo, "triton", torch.float32, DEVICE)


# --- inference fold --------------------------------------------------------------------------------------


def test_fold_equals_the_unfolded_stack():
    stack = Conv1dStack(5, [8, 8, 12, 12, 16], kernel_size=3, stride=[1, 1, 1, 1, 2], dtype=F64, device=DEVICE)
    folded = stack.fold()
    assert len(folded.layers) == 1
    conv = folded.layers[0]
    assert (conv.kernel_size, conv.stride, conv.dilation) == ((11,), (2,), (1,))
    for T in (11, 12, 40):
        x = torch.randn(3, T, 5, dtype=F64, device=DEVICE)
        assert rel_err(folded(x), stack(x), strict=True) < 1e-12
    # Padding inside the chain, an activation or a dropout stop a run; the rest folds.
    mixed = Conv1dStack(
        4, [5, 6, 7, 3, 2], kernel_size=[3, 2, 5, 1, 3], stride=[2, 3, 1, 1, 1], dilation=[2, 1, 3, 1, 1],
        padding=[(1, 2), 0, 0, 1, 0], activation=["none", "none", "relu", "none", "none"],
        dropout=[0.0, 0.0, 0.0, 0.5, 0.0], bias=[True, False, False, True, False], dtype=F64, device=DEVICE,
    ).eval()  # fmt: skip
    folded = mixed.fold()
    assert [c.kernel_size[0] for c in folded.layers] == [40, 1, 3]
    x = torch.randn(2, 90, 4, dtype=F64, device=DEVICE)
    assert rel_err(folded(x), mixed(x), strict=True) < 1e-12


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fold_on_triton_within_rounding(dtype):
    stack = Conv1dStack(5, [8, 8, 12, 12, 16], kernel_size=3, stride=[1, 1, 1, 1, 2], dtype=F64, device=DEVICE)
    x = torch.randn(2, 41, 5, dtype=F64, device=DEVICE)
    with torch.no_grad():
        ref = stack(x)
        folded = stack.fold().to(dtype)
        unfolded = stack.to(dtype)
        unfolded.backend = folded.backend = "triton"
        y_unfolded = unfolded(x.to(dtype))
        y_folded = folded(x.to(dtype))
    # Folding changes the order of the sums, not the math: within the pass mark of the stack's.
    assert_pass_mark(y_folded, y_unfolded, ref, dtype, "folded stack")


_TF32_PROBE = """
import sys, torch
from fusedconvlstm.calls.conv1d import ConvLayer
from fusedconvlstm.triton.conv1d import dot_precision
exec(sys.argv[1])
conv = ConvLayer(4, 4, 3, 1, (0, 0), 1, "none", True)
proj = ConvLayer(4, 4, 1, 1, (0, 0), 1, "none", True, matmul=True)
cuda = torch.device("cuda")  # only the device type is looked at: no GPU needed
print(dot_precision(torch.float32, cuda, conv), dot_precision(torch.float32, cuda, proj))
"""


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("", "tf32 ieee"),  # PyTorch's defaults: TF32 for cuDNN convs, IEEE for matmuls
        ("torch.backends.cudnn.allow_tf32 = False", "ieee ieee"),
        ("torch.backends.cuda.matmul.allow_tf32 = True", "tf32 tf32"),
        # The new API: the legacy allow_tf32 getters raise after these, so they must not be read.
        ("torch.backends.cudnn.rnn.fp32_precision = 'ieee'", "tf32 ieee"),
        ("torch.backends.cudnn.conv.fp32_precision = 'ieee'", "ieee ieee"),
        ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "tf32 tf32"),
        ("torch.backends.fp32_precision = 'ieee'; torch.backends.cudnn.conv.fp32_precision = 'tf32'", "tf32 ieee"),
        ("torch.backends.cudnn.conv.fp32_precision = 'none'", "ieee ieee"),  # all inherit: IEEE
    ],
)
def test_fp32_dot_precision_follows_pytorch_flags(flags, expected):
    """fp32 TF32 follows the flag PyTorch applies to the same op, set through either API (in a
    subprocess: the flags are process-wide and the legacy getters cannot always be restored)."""
    if "fp32_precision" in flags and not hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", _TF32_PROBE, flags], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == expected.split()


# --- errors ------------------------------------------------------------------------------------------------


def test_triton_refuses_float64_by_name_and_auto_serves_it():
    x = torch.randn(2, 9, 3, dtype=F64, device=DEVICE)
    w = [torch.randn(4, 3, 3, dtype=F64, device=DEVICE)]
    with pytest.raises(BackendUnavailableError, match="float64"):
        conv1d_stack(x, w, backend="triton")
    assert conv1d_stack(x, w).shape == (2, 7, 4)


def test_embedding_rejects_out_of_range_ids():
    table = torch.randn(5, 3, device=DEVICE)
    w = [torch.randn(4, 3, 3, device=DEVICE)]
    if DEVICE.type == "cuda":
        # A device-side assertion (as nn.Embedding's), which ends the CUDA context: in a child process.
        code = (
            "import torch; from fusedconvlstm import conv1d_stack_embedding as f; "
            "t = torch.randn(5, 3, device='cuda'); w = [torch.randn(4, 3, 3, device='cuda')]; "
            "f(torch.tensor([[0, 1, 5, 2]], device='cuda'), t, w, backend='triton'); torch.cuda.synchronize()"
        )
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert run.returncode != 0 and "assert" in run.stderr.lower(), run.stderr[-2000:]
        # In range, the same call runs.
        conv1d_stack_embedding(torch.tensor([[0, 1, 4, 2]], device=DEVICE), table, w, backend="triton")
    else:
        with pytest.raises(ValueError, match=r"tokens must lie in \[0, 5\)"):
            conv1d_stack_embedding(torch.tensor([[0, 1, 5, 2]], device=DEVICE), table, w, backend="triton")
    with pytest.raises(TypeError, match="tokens must be one of"):
        conv1d_stack_embedding(torch.zeros(1, 4, device=DEVICE), table, w, backend="triton")


def test_projection_checks_its_weight():
    x = torch.randn(2, 9, 3, device=DEVICE)
    w = [torch.randn(4, 3, 3, device=DEVICE)]
    with pytest.raises(ValueError, match=r"proj_weight must be 2-D \(N, 4\)"):
        conv1d_stack_projection(x, w, None, torch.randn(8, 5, device=DEVICE))
    with pytest.raises(ValueError, match=r"proj_bias must have shape \(8,\)"):
        conv1d_stack_projection(x, w, None, torch.randn(8, 4, device=DEVICE), torch.randn(7, device=DEVICE))


# --- GPU: bf16 and the reference model's full size -----------------------------------------------------

REFERENCE_SPECS = [(200, 3, 1, 0, 1, True, "none")] * 2 + [(256, 3, 1, 0, 1, True, "none")] * 2
REFERENCE_SPECS += [(512, 3, 2, 0, 1, True, "none")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_reference_model_stack_full_size(dtype, strategy):
    stack = Stack(100, REFERENCE_SPECS)
    x = torch.randn(256, 100, 100, dtype=F64, device=DEVICE)
    _check_stack_op(stack, x, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reference_model_embedding_and_projection_full_size(dtype, strategy):
    stack = Stack(100, REFERENCE_SPECS)
    table = torch.randn(20_000, 100, dtype=F64, device=DEVICE)
    tokens = torch.randint(0, 20_000, (256, 100), device=DEVICE)
    tokens[:, :30] = 0  # left padding: one long run of id 0 for the table gradient
    _check_stack_op(stack, table, dtype, tokens=tokens)
    proj = Stack(100, REFERENCE_SPECS, proj_out=4096)
    _check_stack_op(proj, torch.randn(256, 100, 100, dtype=F64, device=DEVICE), dtype)
    _check_stack_op(proj, table, dtype, tokens=tokens)  # token ids to gates: the model's fused path


@pytest.mark.gpu
def test_reference_model_inference_fused_matches_training_path(monkeypatch):
    """The slab (inference) and saved-intermediate (training) paths of the fused kernel, and the
    per-layer path, agree at full size: a race between a layer's writes and the next layer's
    reads in the fused kernel would show up here."""
    stack = Stack(100, REFERENCE_SPECS)
    x = torch.randn(256, 100, 100, device=DEVICE, dtype=torch.bfloat16)
    w = [t.bfloat16() for t in stack.weights]
    b = [t.bfloat16() for t in stack.biases]
    outs = []
    for strat, grad in (("fused", False), ("fused", True), ("layers", False)):
        monkeypatch.setenv(triton_stack.STRATEGY_ENV_VAR, strat)
        ww = [t.clone().requires_grad_(grad) for t in w]
        outs.append(conv1d_stack(x, ww, b, backend="triton", **stack.kwargs).detach())
    assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[0], outs[2], strict=True) < 1e-2


@pytest.mark.gpu
def test_reference_model_gradients_bitwise_reproducible(strategy):
    """At full size the weight-gradient reduction splits over many programs: still no atomics,
    so two backward passes agree to the bit (also the embedding table's gradient)."""
    stack = Stack(100, REFERENCE_SPECS)
    table = torch.randn(20_000, 100, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.randint(0, 20_000, (256, 100), device=DEVICE)
    tokens[:, :30] = 0
    ps = _leaves(stack.params(), torch.bfloat16)
    w, b, _, _ = stack.split(ps)
    g = torch.randn(256, 45, 512, device=DEVICE, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        y = conv1d_stack_embedding(tokens, table, w, b, backend="triton", **stack.kwargs)
        runs.append(torch.autograd.grad(y, [table, *ps], g))
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


# --- the kernels compile for an H100 (checked here without a GPU) ----------------------------------------


@pytest.mark.skipif(ON_GPU, reason="on a GPU every kernel is compiled and run by the other tests")
def test_kernels_compile_for_sm90():
    """The interpreter never runs Triton's compiler: compile every kernel specialization of the
    reference model's forward and backward for sm_90 in a subprocess without the interpreter."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not (bundled.exists() or shutil.which("ptxas")):
        pytest.skip("no ptxas (Triton's NVIDIA backend) to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "tests.triton_compile_check"], cwd=root, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "_conv1d_stack_fused_kernel" in out.stdout and "FAIL" not in out.stdout


@pytest.mark.parametrize("combo", ["plain", "tokens+projection"])
@pytest.mark.parametrize("name", ["mixed", "reference-like"])
def test_tap_inner_loop_order_matches_torch(name, combo, strategy, monkeypatch):
    """FUSEDCONVLSTM_CONV1D_TAP_ORDER=inner (channel chunks outside, taps inside: a switch the GPU
    session times both ways) computes the same stack: output and every gradient within the pass
    mark of the float64 chain, per-layer and fused launches, with dropout, tokens and projection."""
    monkeypatch.setenv("FUSEDCONVLSTM_CONV1D_TAP_ORDER", "inner")
    assert layer_kernels.tap_inner()
    _check_dropout_stack(name, combo, torch.float32)


def test_tap_order_setting_is_checked(monkeypatch):
    assert not layer_kernels.tap_inner()  # the default: taps outside
    monkeypatch.setenv("FUSEDCONVLSTM_CONV1D_TAP_ORDER", "outer")
    assert not layer_kernels.tap_inner()
    monkeypatch.setenv("FUSEDCONVLSTM_CONV1D_TAP_ORDER", "sideways")
    with pytest.raises(ValueError, match="FUSEDCONVLSTM_CONV1D_TAP_ORDER must be one of"):
        layer_kernels.tap_inner()
