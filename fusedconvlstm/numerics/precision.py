"""Precision rules every backend follows: the accumulation dtype, when fp32 may use TF32 (as
PyTorch decides for the op a kernel stands in for), products kept unrounded, autocast off inside."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in for ``dtype`` data: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Whether this torch's mm / bmm take ``out_dtype`` (CUDA, 16-bit operands, float32 result); read
# once, not per call (the step-wise recurrence calls product_unrounded every step).
_OUT_DTYPE = {mm: hasattr(getattr(torch.ops.aten, mm.__name__), "dtype_out") for mm in (torch.mm, torch.bmm)}


def product_unrounded(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None):
    """``a @ b`` (``mm`` for 2-D, ``bmm`` for 3-D operands) returned in ``dtype`` (an
    accumulation dtype), the product not rounded to the operands' 16-bit dtype first: on CUDA
    cuBLAS writes its float32 accumulators (``out_dtype``), elsewhere the operands are converted."""
    mm = torch.mm if a.dim() == 2 else torch.bmm
    if a.dtype == dtype:
        return mm(a, b, out=out)
    if a.is_cuda and _OUT_DTYPE[mm]:
        return mm(a, b, out_dtype=dtype, out=out)
    return mm(a.to(dtype), b.to(dtype), out=out)


def fp32_allows_tf32(op: str) -> bool:
    """Whether PyTorch lets an fp32 ``op`` on CUDA use TF32: ``"rnn"`` (cuDNN's RNNs, TF32 by
    default), ``"conv"`` (cuDNN's convolutions, TF32 by default) or ``"matmul"`` (cuBLAS, IEEE by
    default). Kernels that stand in for that op follow the same flag.

    The most specific ``fp32_precision`` that is not ``"none"`` (inherit) decides, as in PyTorch:
    the op's own, then ``torch.backends.cudnn``'s (CUDA's as a whole), then ``torch.backends``';
    all ``"none"`` is IEEE. The legacy ``allow_tf32`` getters raise once the new API has been used
    (``cudnn.rnn.fp32_precision = "ieee"`` alone is enough), so only a torch without
    ``fp32_precision`` reads them.
    """
    if op not in ("rnn", "conv", "matmul"):
        raise ValueError(f"fp32_allows_tf32: unknown op {op!r} (expected 'rnn', 'conv' or 'matmul')")
    op_scope = torch.backends.cuda.matmul if op == "matmul" else getattr(torch.backends.cudnn, op, None)
    scopes = (op_scope, torch.backends.cudnn, torch.backends)
    precisions = [getattr(scope, "fp32_precision", None) for scope in scopes]
    for precision in precisions:
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    if any(p is not None for p in precisions):
        return False
    return bool(torch.backends.cuda.matmul.allow_tf32 if op == "matmul" else torch.backends.cudnn.allow_tf32)


def no_autocast(t: torch.Tensor) -> torch.autocast:
    """A context in which autocast is off on ``t``'s device: backends compute in the dtypes they
    were given, and autocast must not recast the torch ops inside them."""
    return torch.autocast(t.device.type, enabled=False)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs ``x``'s device in, or ``None`` when autocast is off there or does
    not cast ``x`` (autocast leaves float64 and non-float tensors alone)."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return None
