"""Helpers shared by the tests: assertions on errors (measured by :mod:`fusedconvlstm.passmark`),
random LSTM weights and the conv1d_stack op's opcheck (docs/design.md §3)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedconvlstm import passmark
from fusedconvlstm.benchmarking import capture_graph  # noqa: F401  (the GPU tests capture with it)

# A reference model small enough for the CPU (the tests' ConvLSTMClassifier sizes).
SMALL_MODEL = dict(
    vocab_size=50,
    embedding_dim=8,
    conv_channels=(6, 6, 8),
    kernel_sizes=(3, 3, 3),
    conv_strides=(1, 1, 2),
    hidden_size=5,
    dense_size=4,
)


def assert_close_rel(out: Tensor, ref: Tensor, tol: float, what: str = "output") -> float:
    """Assert that ``out`` has no NaN and its relative error against ``ref`` is at most ``tol``."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    err = passmark.rel_err(out, ref, strict=True)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"
    return err


def assert_pass_mark(out: Tensor, base: Tensor, ref: Tensor, dtype, what: str = "output") -> None:
    """The pass mark (:mod:`fusedconvlstm.passmark`): ``out``'s relative and largest-element errors
    against ``ref`` at most twice ``base``'s (PyTorch's in the same dtype) plus one eps of
    ``dtype``, no NaN where ``ref`` is finite."""
    passmark.assert_passes(out, base, ref, dtype, what)


def within_relative_mark(got: Tensor, base: Tensor, want: Tensor, dtype, slack_eps: float) -> bool:
    """``got``'s relative error against ``want`` within :func:`fusedconvlstm.passmark.bound` of
    ``base``'s, with ``slack_eps`` units of ``dtype``'s eps: the relative half of the pass mark,
    for comparisons whose two sides round differently (autocast casts, bf16 model runs)."""
    base_err = passmark.rel_err(base, want, strict=True)
    return passmark.rel_err(got, want, strict=True) <= passmark.bound(base_err, passmark.eps_of(dtype), slack_eps)


def poison_(t: Tensor) -> Tensor:
    """Fill ``t`` with NaN (for floating tensors) so unwritten elements show up."""
    return t.fill_(float("nan"))


def lstm_weights(D: int, H: int, P: int | None = None, dtype=torch.float64, device="cpu", requires_grad=False):
    """Random recurrent weights ``D × (4H, P)`` with ``nn.LSTM``'s init scale."""
    P = H if P is None else P
    k = H**-0.5
    return [
        (torch.rand(4 * H, P, dtype=dtype, device=device) * 2 - 1).mul_(k).requires_grad_(requires_grad)
        for _ in range(D)
    ]


# Prologue/epilogue combinations of the conv1d_stack op: (tokens, proj_weight, proj_bias) present.
CONV1D_STACK_COMBOS = {
    "plain": (False, False, False),
    "tokens": (True, False, False),
    "projection": (False, True, True),
    "projection-no-bias": (False, True, False),
    "tokens+projection": (True, True, True),
}


def opcheck_conv1d_stack(combo: str, backend: str, dtype=torch.float64, device="cpu", dropout=False) -> None:
    """``torch.library.opcheck`` on ``conv1d_stack`` (inputs requiring grad) and on its backward op
    for a small two-layer stack (activations, stride, padding, dilation, one absent bias) with the
    prologue/epilogue of ``CONV1D_STACK_COMBOS[combo]``, and with ``dropout`` on both layers'
    inputs."""
    with_tokens, with_pw, with_pb = CONV1D_STACK_COMBOS[combo]
    opts = dict(dtype=dtype, device=device)
    x = torch.randn(11, 3, **opts) if with_tokens else torch.randn(2, 13, 3, **opts)
    tokens = torch.randint(0, 11, (2, 13), device=device) if with_tokens else None
    weight = [torch.randn(4, 3, 3, **opts), torch.randn(3, 4, 2, **opts)]
    bias = [torch.randn(4, **opts)]
    pw = torch.randn(8, 3, **opts) if with_pw else None
    pb = torch.randn(8, **opts) if with_pb else None
    hyper = ([True, False], [1, 2], [1, 0, 0, 1], [2, 1], "gelu,tanh")

    def args(requires_grad: bool) -> tuple:
        def leaf(t):
            return t if t is None else t.clone().requires_grad_(requires_grad)

        w, b = [leaf(t) for t in weight], [leaf(t) for t in bias]
        return (leaf(x), tokens, w, b, *hyper, leaf(pw), leaf(pb))

    drop = ([0.3, 0.5], torch.tensor(1234, device=device)) if dropout else ()
    op, backward = torch.ops.fusedconvlstm.conv1d_stack, torch.ops.fusedconvlstm.conv1d_stack_backward
    torch.library.opcheck(op.default, (*args(True), backend, True, *drop))
    y, saved = op(*args(False), backend, True, *drop)
    torch.library.opcheck(backward.default, (torch.randn_like(y), *args(False), saved, backend, *drop))


def exit_and_stderr(main, argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of a command-line ``main(argv)``, SystemExit included."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def write_file(path, text: str) -> str:
    """Write ``text`` to ``path``; its name, for an argument list."""
    path.write_text(text)
    return str(path)
