"""Recurrence helpers the LSTM backends share: the reversed-recurrence bit mask, the TF32 rule of
an fp32 recurrence, and the recurrent weights' gradient from the outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusedconvlstm.numerics.precision import fp32_allows_tf32


def reverse_mask(reverse: Sequence[bool]) -> int:
    """The bit mask of reversed recurrences that the kernels take (bit ``d`` for recurrence ``d``)."""
    return sum(1 << d for d, r in enumerate(reverse) if r)


def fp32_recurrence_allows_tf32() -> bool:
    """Whether an fp32 recurrence may use TF32: the flag that governs ``nn.LSTM`` on cuDNN
    (:func:`fusedconvlstm.numerics.precision.fp32_allows_tf32` for ``"rnn"``)."""
    return fp32_allows_tf32("rnn")


def previous_hidden(y: Tensor, h0: Tensor, lengths: Tensor | None, reverse: Sequence[bool]) -> Tensor:
    """``h_{t-1}`` as seen by each step: ``(T, B, D, P)`` from the outputs ``y`` and ``h0``.

    A forward recurrence's step ``t`` saw ``y[t-1]`` (``h0`` at ``t = 0``). A reversed one saw
    ``y[t+1]``, or ``h0`` where ``t + 1`` is past the row's length (it started there). Backends
    use this for ``dW_hh = Σ_t dgates_tᵀ h_{t-1}`` after their reverse-time loop.
    """
    T = y.shape[0]
    prev = torch.empty_like(y)
    for d, rev in enumerate(reverse):
        if rev:
            prev[T - 1, :, d] = h0[d]
            prev[: T - 1, :, d] = y[1:, :, d]
            if lengths is not None:
                starts = torch.arange(1, T + 1, device=y.device).unsqueeze(1) >= lengths.to(y.device).unsqueeze(0)
                prev[:, :, d] = torch.where(starts.unsqueeze(-1), h0[d].unsqueeze(0), prev[:, :, d])
        else:
            prev[0, :, d] = h0[d]
            prev[1:, :, d] = y[: T - 1, :, d]
    return prev


def recurrent_weight_grads(
    dgates: Tensor, y: Tensor, h0: Tensor, lengths: Tensor | None, reverse: Sequence[bool]
) -> list[Tensor]:
    """``dW_hh[d] = Σ_{t,b} dgates[t, b, d]ᵀ h_{t-1}[b, d]`` as one batched GEMM over ``d``."""
    prev = previous_hidden(y, h0, lengths, reverse)
    # Separate tensors, not views of one: a custom op's outputs must not alias each other.
    return [g.clone() for g in torch.einsum("tbdg,tbdp->dgp", dgates, prev).unbind(0)]
