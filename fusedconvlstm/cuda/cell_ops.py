"""Kernel-level ops of the step-wise LSTM: the fused pointwise cell update and its backward.

These are the building blocks of the ``cuda`` backend's step-wise recurrence (a cuBLAS GEMM per
step, then one fused pointwise kernel). They update buffers in place. The CUDA implementations
live in ``csrc/lstm_cell.cu``; the CPU implementations in :mod:`fusedconvlstm.cuda.cell_cpu`
define the contract in plain PyTorch and let the step-wise driver be tested without a GPU.

For recurrence ``d`` of ``D`` at driver step ``step``, the time index is
``t = T - 1 - step`` when bit ``d`` of ``reverse_mask`` is set and ``t = step`` otherwise (in the
backward the opposite, since it walks time backwards). A batch row ``b`` is *valid* at ``t`` when
``lengths`` is ``None`` or ``t < lengths[b]``.

``lstm_cell_forward_(hh, xg, h, c, y, workspace, lengths, step, reverse_mask)``:
    ``hh (D, B, 4H)`` is ``h_{t-1} W_hhᵀ`` from the GEMM, in the accumulation dtype (float32;
    float64 for float64), not rounded to a 16-bit dtype; ``xg (T, B, D, 4H)`` the pre-activations.
    Valid rows: gates ``i, f, g, o`` from ``xg[t, :, d] + hh[d]``; ``c = f c + i g`` and
    ``h = o tanh(c)`` written to the state ``h (D, B, H)``, ``c (D, B, H)`` (float32), to
    ``y[t, :, d]`` (an empty ``y`` is not written: only the final state is wanted) and, with
    the activations, to ``workspace[t, :, d] = [i, f, g, o, c]``
    (float32, ``(T, B, D, 5H)``; an empty workspace is not written, for forwards that save
    nothing). Masked rows keep the state and write zeros to ``y`` and ``workspace``.

``lstm_cell_backward_(dh_rec, grad_y, workspace, c0, dh_carry, dc, dgates, dgates_step, lengths,
step, reverse_mask)``:
    ``dh_rec (D, B, H)`` is ``dgates_{t+1} W_hh`` from the GEMM (accumulation dtype, as ``hh``) and ``dh_carry`` (float32) the
    part of ``dL/dh_t`` that skipped masked steps. Valid rows: ``dh = dh_rec + dh_carry +
    grad_y[t, :, d]``; the pre-activation gradients go to ``dgates[t, :, d]`` and
    ``dgates_step[d]``, ``dc`` (float32) becomes ``dL/dc_{t-1}``, ``dh_carry`` becomes 0. Masked
    rows: ``dh_carry += dh_rec``, ``dc`` unchanged, zero gate gradients.
"""

from __future__ import annotations

import torch

from fusedconvlstm.cuda import cell_cpu as _reference_cell

_LIB = torch.library.Library("fusedconvlstm", "FRAGMENT")
_LIB.define(
    "lstm_cell_forward_(Tensor hh, Tensor xg, Tensor(a!) h, Tensor(b!) c, Tensor(c!) y, "
    "Tensor(d!) workspace, Tensor? lengths, int step, int reverse_mask) -> ()"
)
_LIB.define(
    "lstm_cell_backward_(Tensor dh_rec, Tensor grad_y, Tensor workspace, Tensor c0, "
    "Tensor(a!) dh_carry, Tensor(b!) dc, Tensor(c!) dgates, Tensor(d!) dgates_step, Tensor? lengths, "
    "int step, int reverse_mask) -> ()"
)


@torch.library.register_fake("fusedconvlstm::lstm_cell_forward_", lib=_LIB)
def _(hh, xg, h, c, y, workspace, lengths, step, reverse_mask):
    return None


@torch.library.register_fake("fusedconvlstm::lstm_cell_backward_", lib=_LIB)
def _(dh_rec, grad_y, workspace, c0, dh_carry, dc, dgates, dgates_step, lengths, step, reverse_mask):
    return None


torch.library.impl("fusedconvlstm::lstm_cell_forward_", "cpu", _reference_cell.lstm_cell_forward_, lib=_LIB)
torch.library.impl("fusedconvlstm::lstm_cell_backward_", "cpu", _reference_cell.lstm_cell_backward_, lib=_LIB)
