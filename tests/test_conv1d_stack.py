"""``fusedconvlstm.Conv1dStack`` and the ``conv1d_stack`` op on the reference backend, against
chains of ``torch.nn.Conv1d`` in float64 (with the embedding prologue and projection epilogue:
``F.embedding`` before, ``F.linear`` after); opcheck/gradcheck; argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusedconvlstm import Conv1dStack, conv1d_stack, conv1d_stack_embedding_projection
from fusedconvlstm.numerics import dropout as philox_dropout
from fusedconvlstm.passmark import rel_err
from tests.helpers import CONV1D_STACK_COMBOS, opcheck_conv1d_stack, within_relative_mark

F64 = torch.float64
TOL64 = 1e-10
ACT_MODULES = {"none": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _torch_chain(c_in, specs, dtype=F64):
    """An nn.Sequential of Conv1d (+ activation) from (c_out, k, stride, padding, dilation, bias, act)."""
    mods = []
    for c_out, k, s, p, d, b, act in specs:
        mods.append(nn.Conv1d(c_in, c_out, k, stride=s, padding=p, dilation=d, bias=b, dtype=dtype))
        if act != "none":
            mods.append(ACT_MODULES[act]())
        c_in = c_out
    return nn.Sequential(*mods)


def _check_module_against_chain(chain, stack, x_cf):
    """x_cf is (B, C, T); the stack takes whatever layout it was built for."""
    x_ref = x_cf.detach().clone().requires_grad_()
    x_in = x_cf.detach().clone()
    if stack.channels_last:
        x_in = x_in.transpose(1, 2).contiguous()
    x_in.requires_grad_()
    y_ref = chain(x_ref)
    y = stack(x_in)
    y_cf = y.transpose(1, 2) if stack.channels_last else y
    assert y_cf.shape == y_ref.shape
    assert rel_err(y_cf, y_ref, strict=True) < TOL64
    gy = torch.randn_like(y_ref)
    (y_ref * gy).sum().backward()
    (y_cf * gy).sum().backward()
    gx = x_in.grad.transpose(1, 2) if stack.channels_last else x_in.grad
    assert rel_err(gx, x_ref.grad, strict=True) < TOL64, "grad x"
    convs = [m for m in chain if isinstance(m, nn.Conv1d)]
    for i, (mine, theirs) in enumerate(zip(stack.layers, convs)):
        assert rel_err(mine.weight.grad, theirs.weight.grad, strict=True) < TOL64, f"grad weight[{i}]"
        if theirs.bias is not None:
            assert rel_err(mine.bias.grad, theirs.bias.grad, strict=True) < TOL64, f"grad bias[{i}]"


LAYER_SPECS = [
    # (c_out, k, stride, padding, dilation, bias, activation)
    [(7, 3, 1, 0, 1, True, "none")],
    [(5, 1, 1, 0, 1, False, "relu")],
    [(6, 5, 2, 2, 1, True, "gelu"), (4, 3, 3, 1, 2, False, "silu")],
    [(6, 3, 1, "same", 2, True, "tanh"), (3, 4, 1, "same", 1, True, "none")],
    [(6, 3, 1, "valid", 1, True, "none"), (8, 3, 1, 0, 1, True, "none"), (5, 3, 2, 0, 1, True, "relu")],
]


@pytest.mark.parametrize("specs", LAYER_SPECS, ids=lambda s: "-".join(f"k{x[1]}s{x[2]}p{x[3]}d{x[4]}{x[6]}" for x in s))
@pytest.mark.parametrize("channels_last", [True, False])
def test_stack_matches_nn_conv1d_chain(specs, channels_last):
    chain = _torch_chain(3, specs)
    stack = Conv1dStack.from_torch(chain, channels_last=channels_last, backend="reference")
    for T in (11, 16):
        for B in (1, 3):
            for m in list(chain.parameters()) + list(stack.parameters()):
                m.grad = None
            _check_module_against_chain(chain, stack, torch.randn(B, 3, T, dtype=F64))


def test_constructor_matches_from_torch_layout():
    stack = Conv1dStack(
        4,
        [6, 6, 2],
        kernel_size=[3, 5, 1],
        stride=[1, 2, 1],
        padding=[0, (1, 3), "valid"],
        dilation=[2, 1, 1],
        bias=[True, False, True],
        activation="relu",
        dtype=F64,
    )
    assert stack.activations == ["relu", "relu", "none"]
    assert stack.paddings == [(0, 0), (1, 3), (0, 0)]
    x = torch.randn(2, 20, 4, dtype=F64)
    y = stack(x)
    ref = x.transpose(1, 2)
    for layer, conv in enumerate(stack.layers):
        ref = torch.nn.functional.pad(ref, stack.paddings[layer])
        ref = torch.nn.functional.conv1d(ref, conv.weight, conv.bias, stride=conv.stride, dilation=conv.dilation)
        if layer < 2:
            ref = torch.relu(ref)
    assert rel_err(y, ref.transpose(1, 2), strict=True) < TOL64


def test_reference_model_stack_shapes():
    stack = Conv1dStack(100, [200, 200, 256, 256, 512], kernel_size=3, stride=[1, 1, 1, 1, 2])
    assert sum(p.numel() for p in stack.parameters()) == 60_200 + 120_200 + 153_856 + 196_864 + 393_728
    assert stack(torch.randn(2, 100, 100)).shape == (2, 45, 512)


def test_unbatched_input():
    chain = _torch_chain(3, LAYER_SPECS[2])
    stack = Conv1dStack.from_torch(chain, backend="reference")
    x = torch.randn(3, 17, dtype=F64)
    assert rel_err(stack(x), chain(x), strict=True) < TOL64


def test_non_contiguous_input():
    chain = _torch_chain(3, LAYER_SPECS[4])
    stack = Conv1dStack.from_torch(chain, channels_last=True, backend="reference")
    x_btc = torch.randn(2, 3, 30, dtype=F64).transpose(1, 2)[:, ::2]  # (B, T, C), strided in T
    assert not x_btc.is_contiguous()
    assert rel_err(stack(x_btc), chain(x_btc.transpose(1, 2)).transpose(1, 2), strict=True) < TOL64


def test_dropout_between_layers_in_training_only():
    chain = nn.Sequential(nn.Conv1d(3, 4, 3, dtype=F64), nn.ReLU(), nn.Dropout(0.5), nn.Conv1d(4, 2, 3, dtype=F64))
    stack = Conv1dStack.from_torch(chain, backend="reference")
    assert stack.dropouts == [0.5, 0.0] and stack.activations == ["relu", "none"]
    x = torch.randn(2, 3, 12, dtype=F64)
    stack.eval()
    chain.eval()
    assert rel_err(stack(x), chain(x), strict=True) < TOL64
    stack.train()
    torch.manual_seed(5)
    y1 = stack(x)
    torch.manual_seed(5)
    assert torch.equal(stack(x), y1)
    assert rel_err(y1, chain(x), strict=True) > 1e-3
    # Dropout sits between the layers: with p = 1 the last layer sees zeros and returns its bias.
    stack.dropouts = [1.0, 0.0]
    y = stack(x)
    assert torch.equal(y, stack.layers[1].bias.view(1, 2, 1).expand_as(y))


def test_from_torch_refuses_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="groups=2"):
        Conv1dStack.from_torch(nn.Sequential(nn.Conv1d(4, 4, 3, groups=2)))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        Conv1dStack.from_torch(nn.Sequential(nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect")))
    with pytest.raises(ValueError, match=r"modules\[1\] \(LayerNorm\)"):
        Conv1dStack.from_torch(nn.Sequential(nn.Conv1d(4, 4, 3), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="before any Conv1d"):
        Conv1dStack.from_torch(nn.Sequential(nn.ReLU(), nn.Conv1d(4, 4, 3)))
    with pytest.raises(ValueError, match=r"modules\[1\] \(GELU\)"):
        Conv1dStack.from_torch(nn.Sequential(nn.Conv1d(4, 4, 3), nn.GELU(approximate="tanh")))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"out_channels": []}, "at least one layer"),
        ({"kernel_size": [3, 3, 3]}, "kernel_size must be a single value or have one entry per layer"),
        ({"activation": "swish"}, "activation must be one of"),
        ({"dropout": 2.0}, r"dropout must lie in \[0, 1\]"),
        ({"padding": "same", "stride": 2}, "padding='same' is not supported for strided"),
        ({"padding": -1}, "padding must be"),
        ({"backend": "fast"}, "backend must be one of"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = {"in_channels": 3, "out_channels": [4, 5]} | kwargs
    with pytest.raises(ValueError, match=match):
        Conv1dStack(**args)


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(2, 3, 4, 5), "2-D .* or 3-D"),
        (torch.randn(2, 10, 4), "must have 3 channels"),
        (torch.randn(2, 4, 3), r"4 time steps \(shape \(2, 4, 3\)\), fewer than the 5 this stack needs"),
        (torch.randn(2, 10, 3, dtype=F64), r"input dtype \(torch.float64\) does not match weight dtype"),
        (torch.ones(2, 10, 3, dtype=torch.int64), r"floating-point tensor, got torch.int64"),
    ],
)
def test_forward_errors(x, match):
    stack = Conv1dStack(3, [4, 5], kernel_size=3)
    with pytest.raises((ValueError, TypeError), match=match):
        stack(x)


@pytest.mark.parametrize("channels_last", [True, False])
def test_wrong_layout_error_shows_the_shape_passed_and_the_fix(channels_last):
    stack = Conv1dStack(10, [8], kernel_size=3, channels_last=channels_last)
    given = (3, 10, 100) if channels_last else (3, 100, 10)
    with pytest.raises(ValueError) as err:
        stack(torch.randn(*given))
    message = str(err.value)
    assert f"got shape {given}" in message
    assert f"channels_last={not channels_last}" in message


def test_dtype_error_says_how_to_convert_input_or_module():
    stack = Conv1dStack(3, [4], kernel_size=3)
    with pytest.raises(
        ValueError, match=r"input.to\(torch.float32\), or convert the module: stack.to\(torch.float64\)"
    ):
        stack(torch.randn(2, 10, 3, dtype=F64))


def test_min_length_is_the_shortest_input_the_stack_takes():
    stack = Conv1dStack(4, [4, 4, 4, 4, 4], kernel_size=3, stride=[1, 1, 1, 1, 2], padding=[0, 1, 0, 0, 0])
    n = stack.min_length()
    assert stack(torch.randn(1, n, 4)).shape[1] == 1
    with pytest.raises(ValueError, match=f"fewer than the {n} this stack needs"):
        stack(torch.randn(1, n - 1, 4))


def _op_inputs(requires_grad=False):
    x = torch.randn(2, 9, 3, dtype=F64, requires_grad=requires_grad)
    w = [
        torch.randn(4, 3, 3, dtype=F64, requires_grad=requires_grad),
        torch.randn(2, 4, 2, dtype=F64, requires_grad=requires_grad),
    ]
    b = [torch.randn(4, dtype=F64, requires_grad=requires_grad), None]
    return x, w, b


@pytest.mark.parametrize("dropout", [False, True], ids=["", "dropout"])
@pytest.mark.parametrize("combo", list(CONV1D_STACK_COMBOS))
def test_conv1d_stack_opcheck_reference(combo, dropout):
    opcheck_conv1d_stack(combo, "reference", dropout=dropout)


def test_conv1d_stack_gradcheck_reference():
    x, w, b = _op_inputs(requires_grad=True)

    def f(x, w0, w1, b0):
        return conv1d_stack(
            x,
            [w0, w1],
            [b0, None],
            stride=[1, 2],
            padding=[(1, 0), (0, 1)],
            dilation=[2, 1],
            activation=["silu", "relu"],
            backend="reference",
        )

    assert torch.autograd.gradcheck(f, (x, w[0], w[1], b[0]))


EP_SPECS = [(6, 3, 1, (1, 0), 2, True, "gelu"), (5, 3, 2, 0, 1, False, "tanh")]


def _embedding_projection_inputs(V=13, E=4, N=12, B=3, T=19):
    """tokens (B, T) with repeated ids, and float64 leaves: table, weights, present biases, proj W and b."""
    tokens = torch.randint(0, V, (B, T))
    tokens[0, :5] = 0  # a run of one id, as left padding gives
    leaves = [torch.randn(V, E, dtype=F64)]
    c = E
    for c_out, k, *_ in EP_SPECS:
        leaves.append(torch.randn(c_out, c, k, dtype=F64) / (c * k) ** 0.5)
        c = c_out
    leaves += [torch.randn(c_out, dtype=F64) for c_out, _, _, _, _, b, _ in EP_SPECS if b]
    leaves += [torch.randn(N, c, dtype=F64) / c**0.5, torch.randn(N, dtype=F64)]
    return tokens, [t.requires_grad_() for t in leaves]


def _embedding_projection(tokens, table, w0, w1, b0, pw, pb):
    return conv1d_stack_embedding_projection(
        tokens,
        table,
        [w0, w1],
        [b0, None],
        pw,
        pb,
        stride=[s[2] for s in EP_SPECS],
        padding=[s[3] if isinstance(s[3], tuple) else (s[3], s[3]) for s in EP_SPECS],
        dilation=[s[4] for s in EP_SPECS],
        activation=[s[6] for s in EP_SPECS],
        backend="reference",
    )


def test_embedding_projection_matches_embedding_conv_chain_linear():
    """Token ids to gates against F.embedding -> nn.Conv1d chain -> F.linear, time-major, with the
    gradients of the table, every weight and bias and the projection's weight and bias."""
    tokens, leaves = _embedding_projection_inputs()
    table, w0, w1, b0, pw, pb = leaves
    emb = nn.Embedding.from_pretrained(table.detach().clone(), freeze=False)
    convs = _torch_chain(table.shape[1], [(c, k, s, 0, d, b, act) for c, k, s, _, d, b, act in EP_SPECS])
    conv0, conv1 = (m for m in convs if isinstance(m, nn.Conv1d))
    with torch.no_grad():
        conv0.weight.copy_(w0)
        conv0.bias.copy_(b0)
        conv1.weight.copy_(w1)
    proj = nn.Linear(pw.shape[1], pw.shape[0], dtype=F64)
    with torch.no_grad():
        proj.weight.copy_(pw)
        proj.bias.copy_(pb)
    # Layer 0 pads (1, 0): a chain with the padding written as F.pad around the first conv.
    h = F.pad(emb(tokens).transpose(1, 2), (1, 0))
    ref = proj(convs(h).permute(2, 0, 1))  # (T_out, B, N)
    out = _embedding_projection(tokens, *leaves)
    assert out.shape == ref.shape == (7, 3, 12) and out.is_contiguous()
    assert rel_err(out, ref, strict=True) < TOL64
    g = torch.randn_like(ref)
    ours = torch.autograd.grad(out, leaves, g)
    theirs = torch.autograd.grad(ref, [emb.weight, conv0.weight, conv1.weight, conv0.bias, proj.weight, proj.bias], g)
    for name, a, b in zip(["table", "weight[0]", "weight[1]", "bias[0]", "proj_weight", "proj_bias"], ours, theirs):
        assert rel_err(a, b, strict=True) < TOL64, f"grad {name}"


def test_embedding_projection_gradcheck_reference():
    tokens, leaves = _embedding_projection_inputs(V=5, E=3, N=4, B=2, T=11)
    assert torch.autograd.gradcheck(lambda *ps: _embedding_projection(tokens, *ps), leaves)


def test_embedding_projection_errors_name_the_table():
    tokens, (table, w0, w1, b0, pw, pb) = _embedding_projection_inputs()
    with pytest.raises(ValueError, match=r"weight\[0\].shape\[1\] must equal table.shape\[1\] = 3, got 4"):
        _embedding_projection(tokens, table[:, :3], w0, w1, b0, pw, pb)
    with pytest.raises(TypeError, match=r"proj_weight must have the dtype of table"):
        _embedding_projection(tokens, table, w0, w1, b0, pw.float(), pb)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 13\)"):
        _embedding_projection(tokens + 1, table, w0, w1, b0, pw, pb)
    with pytest.raises(ValueError, match="proj_bias needs proj_weight"):
        _embedding_projection(tokens, table, w0, w1, b0, None, pb)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(x=a["x"][0]), "x must be a 3-D"),
        (lambda a: a.update(w=[a["w"][0][:, :2]] + a["w"][1:]), r"weight\[0\].shape\[1\] must equal x.shape\[2\]"),
        (
            lambda a: a.update(w=a["w"][:1] + [a["w"][1][:, :3]]),
            r"weight\[1\].shape\[1\] must equal weight\[0\].shape\[0\]",
        ),
        (lambda a: a.update(b=[a["b"][0][:3], None]), r"bias\[0\] must have shape"),
        (lambda a: a.update(b=[a["b"][0].float(), None]), r"bias\[0\] must have the dtype of x"),
        (lambda a: a.update(b=[None]), "bias must have 2 entries"),
    ],
)
def test_conv1d_stack_op_errors(mutate, match):
    x, w, b = _op_inputs()
    args = dict(x=x, w=w, b=b)
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        conv1d_stack(args["x"], args["w"], args["b"], backend="reference")


def test_stack_compiles_fullgraph():
    chain = _torch_chain(3, LAYER_SPECS[2])
    stack = Conv1dStack.from_torch(chain, channels_last=True, backend="reference")
    x = torch.randn(2, 17, 3, dtype=F64)
    y = torch.compile(stack, fullgraph=True, backend="aot_eager")(x)
    assert rel_err(y, chain(x.transpose(1, 2)).transpose(1, 2), strict=True) < TOL64


def test_stack_under_cpu_autocast_behaves_like_nn_conv1d():
    chain = _torch_chain(3, LAYER_SPECS[2], dtype=torch.float32)
    stack = Conv1dStack.from_torch(chain, backend="reference")
    x = torch.randn(2, 3, 17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = chain(x), stack(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    want = chain.double()(x.double())
    assert within_relative_mark(y, y_ref, want, torch.bfloat16, slack_eps=4)


# --- dropout -------------------------------------------------------------------------------------------


def test_philox_matches_the_published_answer_and_keeps_one_minus_p():
    """Philox4x32-10 at counter 0 under key 0 is 0x6627e8d5 (the Random123 known answer); masks
    keep about 1 - p of the elements, and levels and seeds give independent masks."""
    assert int(philox_dropout.philox(torch.tensor(0), torch.tensor([0]))[0]) == 0x6627E8D5
    seed = torch.tensor(2024)
    for p in (0.1, 0.5, 0.75):
        keep = philox_dropout.keep_mask(seed, 0, (64, 100, 25), p)
        n = keep.numel()
        assert abs(keep.float().mean().item() - (1 - p)) <= 4 * (p * (1 - p) / n) ** 0.5
    a, b = philox_dropout.keep_mask(seed, 0, (4096,), 0.5), philox_dropout.keep_mask(seed, 1, (4096,), 0.5)
    c = philox_dropout.keep_mask(torch.tensor(2025), 0, (4096,), 0.5)
    for other in (b, c):  # agreement of independent fair coins: 1/2 +- 4 sigma
        assert abs((a == other).float().mean().item() - 0.5) < 4 * (0.25 / 4096) ** 0.5


def test_op_dropout_is_the_masked_chain():
    """The reference op with dropout equals the nn.Conv1d chain with each layer's input multiplied
    by its mask and 1 / (1 - p), output and gradients."""
    x, w, b = _op_inputs(requires_grad=True)
    seed = torch.tensor(99)
    rates = [0.4, 0.25]
    y = conv1d_stack(
        x, w, b, stride=[1, 2], padding=[(1, 0), (0, 1)], activation=["gelu", "tanh"], dropout=rates, seed=seed
    )
    xr, w0, w1, b0 = (t.detach().clone().requires_grad_() for t in (x, w[0], w[1], b[0]))
    h = philox_dropout.dropout(xr, rates[0], seed, 0)
    h = F.gelu(F.conv1d(F.pad(h.transpose(1, 2), (1, 0)), w0, b0))
    h = philox_dropout.dropout(h.transpose(1, 2), rates[1], seed, 1).transpose(1, 2)
    want = torch.tanh(F.conv1d(F.pad(h, (0, 1)), w1, stride=2)).transpose(1, 2)
    assert rel_err(y, want, strict=True) < TOL64
    g = torch.randn_like(want)
    ours = torch.autograd.grad(y, [x, w[0], w[1], b[0]], g)
    ref = torch.autograd.grad(want, [xr, w0, w1, b0], g)
    for a, r in zip(ours, ref):
        assert rel_err(a, r, strict=True) < TOL64
    # Dropping everything at the second layer leaves its (absent) bias: zeros.
    y1 = conv1d_stack(x, w, b, stride=[1, 2], padding=[(1, 0), (0, 1)], dropout=[0.0, 1.0], seed=seed)
    assert torch.equal(y1, torch.zeros_like(y1))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dropout=[0.5]), "dropout must have one rate per layer"),
        (dict(dropout=[0.5, 1.5]), r"dropout\[1\] must lie in \[0, 1\]"),
        (dict(dropout=[0.5, 0.0], seed=torch.tensor(3.0)), "seed must be an int64 tensor of one element"),
        (dict(dropout=[0.5, 0.0], seed=torch.tensor([1, 2])), "seed must be an int64 tensor of one element"),
        (dict(dropout=[0.5, 0.0], seed=torch.tensor(3, device="meta")), "seed must be on the device of x"),
    ],
)
def test_dropout_errors_name_the_argument(kwargs, match):
    x, w, b = _op_inputs()
    with pytest.raises(ValueError, match=match):
        conv1d_stack(x, w, b, **kwargs)
    # The op itself also refuses dropout without a seed (the wrappers draw one).
    has_bias = [t is not None for t in b]
    with pytest.raises(ValueError, match="dropout needs a seed"):
        torch.ops.fusedconvlstm.conv1d_stack(
            x, None, w, [t for t in b if t is not None], has_bias, [1, 1], [0] * 4, [1, 1], "none,none", None, None,
            "reference", True, [0.5, 0.0], None,
        )  # fmt: skip


def test_module_dropout_runs_inside_the_op():
    """Conv1dStack in training: dropout between layers is the op's (the masked chain), one after
    the last layer is F.dropout; in evaluation none."""
    stack = Conv1dStack(
        3, [4, 5, 2], kernel_size=3, activation="relu", dropout=[0.5, 0.3, 0.0], channels_last=False, dtype=F64
    )
    x = torch.randn(2, 3, 20, dtype=F64)
    torch.manual_seed(4)
    y = stack(x)
    torch.manual_seed(4)
    seed = philox_dropout.draw_seed("cpu")
    h = x
    for i, conv in enumerate(stack.layers):
        if i > 0:
            h = philox_dropout.dropout(h.transpose(1, 2), stack.dropouts[i - 1], seed, i).transpose(1, 2)
        h = conv(h)
        if i < 2:
            h = F.relu(h)
    assert rel_err(y, h, strict=True) < TOL64
    stack.eval()
    assert rel_err(stack(x), _chain_of(stack)(x), strict=True) < TOL64


def _chain_of(stack):
    mods = []
    for conv, act in zip(stack.layers, stack.activations):
        mods += [conv] + ([ACT_MODULES[act]()] if act != "none" else [])
    return nn.Sequential(*mods)


def test_stack_with_dropout_compiles_fullgraph_and_matches_eager():
    """The seed draw and the op trace into one graph; the same generator state gives the same masks."""
    stack = Conv1dStack(3, [4, 5], kernel_size=3, activation="gelu", dropout=0.5, dtype=F64).train()
    x = torch.randn(2, 17, 3, dtype=F64)
    compiled = torch.compile(stack, fullgraph=True, backend="aot_eager")
    torch.manual_seed(6)
    got = compiled(x)
    torch.manual_seed(6)
    assert rel_err(got, stack(x), strict=True) < TOL64
    assert rel_err(got, stack.eval()(x), strict=True) > 1e-3
