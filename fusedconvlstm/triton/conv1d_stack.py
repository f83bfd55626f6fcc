"""``triton`` backend of the Conv1d stack op ``conv1d_stack`` (with or without its embedding
prologue and projection epilogue).

Forward: either one launch per layer (:mod:`fusedconvlstm.triton.conv1d`) or one launch for the
whole stack (:mod:`fusedconvlstm.triton.conv1d_fused_stack`); :func:`choose_strategy` picks. The
embedding prologue is the first layer's gathered load; the projection epilogue is one more
layer (kernel 1) whose output is written time-major.

Backward: per layer, last to first — the weight and bias gradients (deterministic split
reduction), then the input gradient with the previous layer's activation derivative fused in
its epilogue. The table gradient of the embedding prologue is a deterministic segment sum.

What is saved, and why. The op saves the pre-activation ``z`` of every intermediate layer (and
of the last layer when it has an activation), in the input dtype, and recomputes nothing: the
per-layer forward writes those tensors anyway (they are the next layer's input), the fused
forward writes them instead of its L2 slab, and recomputing them in the backward would cost a
whole forward (a third of the backward's multiply-adds) to save a write that, at the reference
size (batch 256, bf16), is about 32 MB. ``z`` rather than ``act(z)``: the next layer applies the
activation while loading, and the backward needs ``act'(z)``, so one tensor serves both. When no
gradient is needed (``save_for_backward=False``) nothing is saved; a backward handed an empty
list recomputes the forward first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedconvlstm import backends, config
from fusedconvlstm.calls.conv1d import OP, Conv1dStackCall
from fusedconvlstm.numerics.dropout import scale as dropout_scale
from fusedconvlstm.triton import conv1d as layer_kernels
from fusedconvlstm.triton import dropout as triton_dropout
from fusedconvlstm.triton.conv1d_fused_stack import (
    conv1d_stack_fused_forward,
    halo_overhead,
    levels_with_gaps,
    needed_rows,
    plan_fused,
)

STRATEGY_ENV_VAR = config.ENV["conv1d_strategy"]
"""``auto`` (default), ``fused`` or ``layers``: forces the forward strategy (for tests and benchmarks)."""

FUSED_MAX_WIDTH = 1024
FUSED_MAX_HALO_OVERHEAD = 1.25


def _why_not(call: Conv1dStackCall) -> str | None:
    if call.dtype == torch.float64:
        return "float64 is not supported by the Triton kernels (use backend='reference')"
    return None


def _lens(call: Conv1dStackCall) -> list[int]:
    return [call.seq_len] + call.out_lens() + ([call.out_lens()[-1]] if call.projection is not None else [])


def _saved_levels(call: Conv1dStackCall) -> list[int]:
    """Levels (1..L of the layers including the projection) whose pre-activation is saved."""
    layers = call.all_layers()
    levels = list(range(1, len(layers)))
    if layers[-1].activation != "none":
        levels.append(len(layers))
    return levels


def saved_shapes(call: Conv1dStackCall) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the tensors the forward saves (none when no gradient is needed)."""
    if not call.save_for_backward:
        return []
    layers, lens = call.all_layers(), _lens(call)
    return [((call.batch, lens[lv], layers[lv - 1].out_channels), call.dtype) for lv in _saved_levels(call)]


def choose_strategy(call: Conv1dStackCall) -> str:
    """``"fused"`` (one launch) or ``"layers"`` (one launch per layer).

    The rule: fuse when the call has at least two layers, every intermediate layer is at most
    :data:`FUSED_MAX_WIDTH` channels wide, and the halo recompute of the chosen tiling adds at
    most 25 % rows (:data:`FUSED_MAX_HALO_OVERHEAD`). The reference model's stack (whole
    45-step sequences per program: no halo) fuses. ``$FUSEDCONVLSTM_CONV1D_STRATEGY`` overrides.
    """
    forced = config.choice("conv1d_strategy", ("auto", "fused", "layers"), "auto")
    layers = call.all_layers()
    if forced != "auto":
        return forced if len(layers) > 1 else "layers"
    if len(layers) < 2 or max(layer.out_channels for layer in layers[:-1]) > FUSED_MAX_WIDTH:
        return "layers"
    lens = _lens(call)
    plan = plan_fused(layers, lens, call.batch, call.dtype, call.device, call.save_for_backward)
    return "fused" if halo_overhead(layers, lens, plan) <= FUSED_MAX_HALO_OVERHEAD else "layers"


def _prepare(weight: list[Tensor], bias: list[Tensor | None], proj_weight: Tensor | None, proj_bias: Tensor | None):
    """Packed weights and the bias list of all layers, the projection (kernel 1) last."""
    weights = list(weight) + ([proj_weight.unsqueeze(-1)] if proj_weight is not None else [])
    biases = list(bias) + ([proj_bias] if proj_weight is not None else [])
    biases = [b.contiguous() if b is not None else None for b in biases]
    return [layer_kernels.pack_weight(w) for w in weights], biases


def dropout_masks(seed: Tensor | None, call: Conv1dStackCall) -> list[tuple[Tensor, float] | None]:
    """Per layer of ``call.all_layers()``, ``(uint8 keep-mask of its input, scale)`` or ``None``."""
    layers, lens = call.all_layers(), _lens(call)
    drops: list[tuple[Tensor, float] | None] = [None] * len(layers)
    for level, p in call.dropout_levels():
        shape = (call.batch, lens[level], layers[level].in_channels)
        drops[level] = (triton_dropout.keep_mask(seed, level, shape, p), dropout_scale(p))
    return drops


def _drop_kwargs(drop: tuple[Tensor, float] | None) -> dict:
    return {} if drop is None else dict(drop=drop[0], drop_scale=drop[1])


def _stack_forward(
    src: Tensor,
    tokens: Tensor | None,
    w_packed: list[Tensor],
    biases: list[Tensor | None],
    call: Conv1dStackCall,
    save: bool,
    drops: list[tuple[Tensor, float] | None] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Forward of all layers; returns the output (time-major for a projection call) and the
    saved pre-activations (empty unless ``save``); ``drops`` from :func:`dropout_masks` (``None``:
    no dropout)."""
    layers, lens = call.all_layers(), _lens(call)
    drops = drops if drops is not None else [None] * len(layers)
    L, B, dtype, device = len(layers), call.batch, call.dtype, call.device
    c_last = layers[-1].out_channels
    if B == 0:  # nothing to launch (a grid dimension of 0 is not a launch)
        out = torch.empty(call.out_shape(), dtype=dtype, device=device)
        return out, [torch.empty(shape, dtype=dt, device=device) for shape, dt in saved_shapes(call)] if save else []
    if call.projection is not None:
        out = layer_kernels.alloc((lens[-1], B, c_last), dtype, device)
        y = out.transpose(0, 1)
    else:
        out = y = layer_kernels.alloc((B, lens[-1], c_last), dtype, device)
    z_last = None
    if save and layers[-1].activation != "none":
        z_last = layer_kernels.alloc((B, lens[-1], c_last), dtype, device)
    if L > 1 and choose_strategy(call) == "fused":
        inter = None
        if save:
            # The plan conv1d_stack_fused_forward launches with (same arguments).
            gaps = levels_with_gaps(layers, plan_fused(layers, lens, B, src.dtype, device, True))
            shapes = [(B, lens[lv], layers[lv - 1].out_channels) for lv in range(1, L)]
            inter = [
                torch.zeros(shape, dtype=dtype, device=device) if gap else layer_kernels.alloc(shape, dtype, device)
                for shape, gap in zip(shapes, gaps)
            ]
        conv1d_stack_fused_forward(src, tokens, w_packed, biases, layers, lens, y, inter, z_last, drops)
        if inter:
            # The fused kernel computes only the rows the output depends on; the weight gradient
            # of the layer reading a level also visits its unneeded trailing rows (with a zero
            # gradient there), so they must hold finite values, not whatever memory held.
            for lv, need in enumerate(needed_rows(layers, lens)[1:-1], start=1):
                inter[lv - 1][:, need:].zero_()
        saved = (inter or []) + ([z_last] if z_last is not None else [])
        return out, saved
    h = src
    inter = []
    for i, layer in enumerate(layers):
        in_act = layers[i - 1].activation if i > 0 else "none"
        tok = tokens if i == 0 else None
        if i == L - 1:
            layer_kernels.conv1d_layer_forward(
                h, w_packed[i], biases[i], layer, lens[i], y, in_act=in_act, out_act=layer.activation, z=z_last,
                tokens=tok, **_drop_kwargs(drops[i]),
            )  # fmt: skip
        else:
            z = layer_kernels.alloc((B, lens[i + 1], layer.out_channels), dtype, device)
            layer_kernels.conv1d_layer_forward(
                h, w_packed[i], biases[i], layer, lens[i], z, in_act=in_act, tokens=tok, **_drop_kwargs(drops[i])
            )
            inter.append(z)
            h = z
    saved = (inter + ([z_last] if z_last is not None else [])) if save else []
    return out, saved


def _stack_backward(
    grad_out: Tensor,
    src: Tensor,
    tokens: Tensor | None,
    w_packed: list[Tensor],
    biases: list[Tensor | None],
    saved: list[Tensor],
    call: Conv1dStackCall,
    drops: list[tuple[Tensor, float] | None] | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
    """Gradients of all layers: ``(grad of src (x, or the table with tokens), grad_w per layer
    in nn.Conv1d layout, grad_b per layer or None)``; ``drops`` those of the forward."""
    layers, lens = call.all_layers(), _lens(call)
    drops = drops if drops is not None else [None] * len(layers)
    L, B, dtype, device = len(layers), call.batch, call.dtype, call.device
    if B == 0:
        grad_src = torch.zeros_like(src) if tokens is not None else src.new_empty(src.shape)
        grad_w = [layer_kernels.unpack_weight(torch.zeros_like(w)) for w in w_packed]
        return grad_src, grad_w, [torch.zeros_like(b) if b is not None else None for b in biases]
    if not saved:
        _, saved = _stack_forward(src, tokens, w_packed, biases, call, True, drops)
    z = [None] + list(saved[: L - 1]) + ([saved[L - 1]] if layers[-1].activation != "none" else [None])
    g = grad_out.transpose(0, 1) if call.projection is not None else grad_out
    if g.stride(-1) != 1:
        g = g.contiguous()
    if layers[-1].activation != "none":
        g = layer_kernels.activation_grad(g.contiguous(), z[L], layers[-1].activation)
    grad_w: list[Tensor] = [None] * L
    grad_b: list[Tensor | None] = [None] * L
    grad_src = None
    for i in range(L - 1, -1, -1):
        layer = layers[i]
        h = src if i == 0 else z[i]
        in_act = layers[i - 1].activation if i > 0 else "none"
        tok = tokens if i == 0 else None
        dw, db = layer_kernels.conv1d_layer_weight_grad(
            h, g, layer, lens[i], in_act=in_act, tokens=tok, **_drop_kwargs(drops[i])
        )
        grad_w[i] = layer_kernels.unpack_weight(dw).to(dtype)
        grad_b[i] = db.to(dtype) if db is not None else None
        if i > 0:
            dh = layer_kernels.alloc((B, lens[i], layer.in_channels), dtype, device)
            act = layers[i - 1].activation
            layer_kernels.conv1d_layer_input_grad(
                g, w_packed[i], layer, dh, prev_act=act, z_prev=z[i] if act != "none" else None,
                **_drop_kwargs(drops[i]),
            )  # fmt: skip
            g = dh
        elif tokens is not None:
            # fp32 position gradients so the table's segment sums round once.
            dh = layer_kernels.alloc((B, lens[0], layer.in_channels), torch.float32, device)
            layer_kernels.conv1d_layer_input_grad(g, w_packed[0], layer, dh, **_drop_kwargs(drops[0]))
            grad_src = layer_kernels.embedding_grad(dh, tokens, call.vocab_size).to(dtype)
        else:
            grad_src = layer_kernels.alloc((B, lens[0], layer.in_channels), dtype, device)
            layer_kernels.conv1d_layer_input_grad(g, w_packed[0], layer, grad_src, **_drop_kwargs(drops[0]))
    return grad_src, grad_w, grad_b


def describe(call: Conv1dStackCall) -> str:
    """How the forward of ``call`` runs (for ``backends.explain(..., detail=True)``)."""
    layers, lens = call.all_layers(), _lens(call)
    if choose_strategy(call) == "layers":
        return f"{len(layers)} implicit-GEMM launches, one per layer"
    plan = plan_fused(layers, lens, call.batch, call.dtype, call.device, call.save_for_backward)
    where = "saved intermediates" if call.save_for_backward else "an L2 slab per program"
    return (
        f"one fused launch of {len(layers)} layers: {plan.n_work} work items of {plan.tile} output steps "
        f"on {plan.programs} programs, intermediates through {where}"
    )


# --- the op's implementation functions ------------------------------------------------------------


def _forward(x, tokens, weight, bias, proj_weight, proj_bias, seed, call):
    w_packed, biases = _prepare(weight, bias, proj_weight, proj_bias)
    drops = dropout_masks(seed, call)
    return _stack_forward(x, tokens, w_packed, biases, call, call.save_for_backward, drops)


def _backward(grad_y, x, tokens, weight, bias, proj_weight, proj_bias, seed, saved, call):
    w_packed, biases = _prepare(weight, bias, proj_weight, proj_bias)
    drops = dropout_masks(seed, call)
    grad_x, grad_w, grad_b = _stack_backward(grad_y, x, tokens, w_packed, biases, list(saved), call, drops)
    grad_pw = grad_pb = None
    if proj_weight is not None:  # the projection ran as the last (kernel-1) layer
        grad_pw, grad_pb = grad_w.pop().squeeze(-1), grad_b.pop()
    return grad_x, grad_w, [g for g in grad_b if g is not None], grad_pw, grad_pb


backends.register_implementation(
    OP, "triton", why_not=_why_not, forward=_forward, backward=_backward, saved_shapes=saved_shapes, describe=describe
)
