"""What differs between the torch releases the package declares (2.11 on), and their Tritons.

- The ops' autograd registration: a backward written for the full schema returns one gradient
  per input autograd received, however many defaulted arguments the call passed (torch before
  2.14 refuses any other count).
- Triton before 3.7 runs its interpreter only with numpy < 2.4: the triton backend says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from fusedconvlstm import backends
from fusedconvlstm.ops._autograd import register_autograd


@torch.library.custom_op("fusedconvlstm_test::weighted_sum", mutates_args=())
def weighted_sum(x: Tensor, ws: Sequence[Tensor], scale: float = 1.0, square: bool = False) -> Tensor:
    out = sum((w * x for w in ws), torch.zeros_like(x)) * scale
    return out * out if square else out


def _setup(ctx, inputs, output):
    x, ws, scale, square = inputs  # every schema argument, defaults filled in
    ctx.save_for_backward(x, *ws)
    ctx.scale, ctx.square = scale, square


def _backward(ctx, grad):
    x, *ws = ctx.saved_tensors
    total = sum(ws, torch.zeros_like(x)) * ctx.scale
    if ctx.square:
        grad = grad * 2 * total * x
    return grad * total, [grad * x * ctx.scale for _ in ws], None, None


register_autograd(weighted_sum, _backward, _setup)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"scale": 1.0}, {"scale": 2.0}, {"square": False}, {"scale": 1.0, "square": False}, {"square": True}],
    ids=["none", "scale-default", "scale", "square-default", "both-default", "square"],
)
def test_backward_matches_the_inputs_passed(kwargs):
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    weighted_sum(x, ws, **kwargs).sum().backward()
    got = [x.grad, *(w.grad for w in ws)]
    x2, ws2 = x.detach().requires_grad_(), [w.detach().requires_grad_() for w in ws]
    weighted_sum._init_fn(x2, ws2, **kwargs).sum().backward()  # the same function, torch's autograd
    for a, b in zip(got, [x2.grad, *(w.grad for w in ws2)]):
        torch.testing.assert_close(a, b)


def test_gradcheck_through_the_registration():
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: weighted_sum(a, [b], 0.5, True), (x, w))


def test_a_backward_of_the_wrong_length_is_refused():
    @torch.library.custom_op("fusedconvlstm_test::short_backward", mutates_args=())
    def short_backward(x: Tensor, scale: float = 1.0) -> Tensor:
        return x * scale

    register_autograd(short_backward, lambda ctx, g: (g,), lambda ctx, inputs, output: None)
    with pytest.raises(RuntimeError, match="returned 1 gradients for 2 arguments"):
        short_backward(torch.ones(2, requires_grad=True)).sum().backward()


def test_a_gradient_for_an_argument_autograd_did_not_receive_is_refused():
    @torch.library.custom_op("fusedconvlstm_test::grad_for_default", mutates_args=())
    def grad_for_default(x: Tensor, bias: Tensor | None = None) -> Tensor:
        return x.clone()

    register_autograd(grad_for_default, lambda ctx, g: (g, g), lambda ctx, inputs, output: None)
    with pytest.raises(RuntimeError, match="did not receive"):
        grad_for_default(torch.ones(2, requires_grad=True)).sum().backward()


@pytest.mark.parametrize(
    ("triton", "numpy", "refused"),
    [((3, 6), (2, 4), True), ((3, 6), (2, 3), False), ((3, 7), (2, 4), False), ((), (2, 4), False)],
)
def test_triton_interpreter_with_a_numpy_it_cannot_use_is_refused_with_a_reason(monkeypatch, triton, numpy, refused):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_version", {"triton": triton, "numpy": numpy}.get)
    backends._triton_interpreter_why_not.cache_clear()
    try:
        why = backends.backend_why_not("triton", torch.device("cpu"))
    finally:
        backends._triton_interpreter_why_not.cache_clear()
    assert (why is not None and "numpy < 2.4" in why) == refused
