"""Kernel-level ops of the persistent LSTM recurrence (one launch for all time steps).

The CUDA implementations live in ``csrc/lstm_persistent_forward.cu`` and
``csrc/lstm_persistent_backward.cu``; :mod:`fusedconvlstm.cuda.persistent_cpu` implements
the same contract in plain PyTorch on the CPU, so the drivers in :mod:`fusedconvlstm.cuda.persistent` are
tested without a GPU. Both ops update buffers in place and return nothing. Their math and
workspace are the step-wise cell ops' (:mod:`fusedconvlstm.cuda.cell_ops`), so a forward of one
path and a backward of the other combine freely.

Launch configuration (``nt, wm, wn, wk, nbg``, chosen by :mod:`fusedconvlstm.cuda.persistent_config`):
a block of 8 warps owns ``hs`` hidden units of one recurrence and runs batch tiles of ``bt`` rows;
the warps split as ``wm`` (units) x ``wn`` (batch columns, ``nt`` mma tiles of 8 each) x ``wk``
(reduction). ``nbg`` groups of blocks split the batch tiles; each (recurrence, group) has its own
barrier. ``precise`` (float32 only) runs 3xTF32 products (about fp32 accuracy) instead of TF32.
The CUDA kernels refuse a configuration that does not fit the device (shared memory, co-resident
blocks) with a message; they never launch a grid whose blocks cannot all be resident.

Padded buffers: ``kp`` is the reduction length rounded up to 32 bytes (16 elements of a 16-bit
type, 8 floats): ``H`` in the forward, ``4H`` in the backward.

``lstm_persistent_forward_(xg, w_hh, lengths, reverse_mask, nt, wm, wn, wk, nbg, precise, h_buf,
c_state, y, workspace, sync)``:
    ``xg (T, B, D, 4H)``, ``w_hh (D, 4H, H)`` (the ``D`` weights stacked), ``lengths (B,)`` int64
    or ``None``, ``reverse_mask`` the bit mask of reversed recurrences. In/out:
    ``h_buf (2, D, B, kp)`` (dtype of ``xg``) holds ``h0`` in ``h_buf[0, ..., :H]`` and zeros in
    the padding on entry, ``h_n`` in ``h_buf[T % 2, ..., :H]`` on exit; ``c_state (D, B, H)``
    float32 holds ``c0`` on entry, ``c_n`` on exit. Out: ``y (T, B, D, H)`` (empty: not written,
    only the final state is wanted) and ``workspace (T, B, D, 5H)`` float32 (``[i, f, g, o, c]``
    per step, zeros at masked steps; empty: not written);
    ``sync`` int32 (at least ``D * nbg * 32``) is scratch for the barrier counters.

``lstm_cluster_forward_(xg, w_hh, lengths, reverse_mask, nt, wm, wn, wk, precise, h_buf, c_state, y,
workspace)``:
    the forward on thread-block clusters (sm_90, ``csrc/lstm_cluster_forward.cu``): the same
    contract as ``lstm_persistent_forward_``, without ``nbg`` (one batch tile per cluster) and
    without ``sync`` (the barrier is the cluster's). A cluster is the ``nu = ceil(H / hs)`` blocks
    of one (recurrence, batch tile), at most 16; they exchange ``h`` in distributed shared memory.

``lstm_persistent_forward_from_input_(x, w_ih, bias, w_hh, lengths, reverse_mask, nt, wm, wn, wk, nbg,
precise, h_buf, c_state, y, workspace, sync)``:
    the cooperative forward computing the input projection itself: the contract of
    ``lstm_persistent_forward_`` with ``xg = x W_ihᵀ + bias`` formed inside the kernel (in float32,
    never rounded to the input's dtype) instead of passed in. ``x (T, B, kpx)`` (the layer's
    input, ``kpx`` the input size ``I`` padded like ``kp``, zeros in the padding), ``w_ih
    (D, 4H, I)`` in ``x``'s dtype, ``bias (D, 4H)`` float32 (``b_ih + b_hh``). Each block keeps its
    units' ``W_ih`` rows resident beside ``W_hh`` and projects step ``t + 1``'s ``x`` while it waits
    at step ``t``'s barrier.

``lstm_persistent_backward_(grad_y, workspace, c0, w_hh, lengths, reverse_mask, nt, wm, wn, wk,
nbg, precise, dh_carry, dc, dgates, g_buf, sync)``:
    ``grad_y (T, B, D, H)``, ``workspace`` from the forward, ``c0 (D, B, H)`` float32. In/out:
    ``dh_carry`` float32 holds ``grad_h_n`` on entry and ``grad_h0`` on exit; ``dc`` float32
    ``grad_c_n`` on entry, ``grad_c0`` on exit. Out: ``dgates (T, B, D, 4H)`` (= ``grad_xg``,
    zeros at masked steps). ``g_buf (2, D, B, kp)`` (dtype of ``grad_y``) must be zero on entry;
    ``sync`` as in the forward.
"""

from __future__ import annotations

import torch

from fusedconvlstm.cuda import persistent_cpu

_LIB = torch.library.Library("fusedconvlstm", "FRAGMENT")
_LIB.define(
    "lstm_persistent_forward_(Tensor xg, Tensor w_hh, Tensor? lengths, int reverse_mask, int nt, int wm, int wn, "
    "int wk, int nbg, bool precise, Tensor(a!) h_buf, Tensor(b!) c_state, Tensor(c!) y, Tensor(d!) workspace, "
    "Tensor(e!) sync) -> ()"
)
_LIB.define(
    "lstm_cluster_forward_(Tensor xg, Tensor w_hh, Tensor? lengths, int reverse_mask, int nt, int wm, int wn, "
    "int wk, bool precise, Tensor(a!) h_buf, Tensor(b!) c_state, Tensor(c!) y, Tensor(d!) workspace) -> ()"
)
_LIB.define(
    "lstm_persistent_forward_from_input_(Tensor x, Tensor w_ih, Tensor bias, Tensor w_hh, Tensor? lengths, "
    "int reverse_mask, int nt, int wm, int wn, int wk, int nbg, bool precise, Tensor(a!) h_buf, Tensor(b!) c_state, "
    "Tensor(c!) y, Tensor(d!) workspace, Tensor(e!) sync) -> ()"
)
_LIB.define(
    "lstm_persistent_backward_(Tensor grad_y, Tensor workspace, Tensor c0, Tensor w_hh, Tensor? lengths, "
    "int reverse_mask, int nt, int wm, int wn, int wk, int nbg, bool precise, Tensor(a!) dh_carry, Tensor(b!) dc, "
    "Tensor(c!) dgates, Tensor(d!) g_buf, Tensor(e!) sync) -> ()"
)

# A query, not a kernel: how many clusters of the cluster forward kernel (configured ``nt, wm, wn,
# wk`` for ``hidden_size``, the kernel of ``like``'s dtype) the device of ``like`` holds at once
# (``cudaOccupancyMaxActiveClusters``; 0: it cannot place one). The launch plan asks it before it
# chooses the cluster kernel (:func:`fusedconvlstm.cuda.cluster.cluster_plan`). CUDA only.
_LIB.define("lstm_cluster_max_active_clusters(Tensor like, int hidden_size, int nt, int wm, int wn, int wk) -> int")

OPS = (
    "lstm_persistent_forward_",
    "lstm_cluster_forward_",
    "lstm_persistent_forward_from_input_",
    "lstm_persistent_backward_",
)


@torch.library.register_fake("fusedconvlstm::lstm_persistent_forward_", lib=_LIB)
def _(xg, w_hh, lengths, reverse_mask, nt, wm, wn, wk, nbg, precise, h_buf, c_state, y, workspace, sync):
    return None


@torch.library.register_fake("fusedconvlstm::lstm_cluster_forward_", lib=_LIB)
def _(xg, w_hh, lengths, reverse_mask, nt, wm, wn, wk, precise, h_buf, c_state, y, workspace):
    return None


@torch.library.register_fake("fusedconvlstm::lstm_persistent_forward_from_input_", lib=_LIB)
def _(x, w_ih, bias, w_hh, lengths, reverse_mask, nt, wm, wn, wk, nbg, precise, h_buf, c_state, y, workspace, sync):
    return None


@torch.library.register_fake("fusedconvlstm::lstm_persistent_backward_", lib=_LIB)
def _(
    grad_y, workspace, c0, w_hh, lengths, reverse_mask, nt, wm, wn, wk, nbg, precise, dh_carry, dc, dgates, g_buf, sync
):
    return None


torch.library.impl("fusedconvlstm::lstm_persistent_forward_", "cpu", persistent_cpu.lstm_persistent_forward_, lib=_LIB)
torch.library.impl("fusedconvlstm::lstm_cluster_forward_", "cpu", persistent_cpu.lstm_cluster_forward_, lib=_LIB)
torch.library.impl(
    "fusedconvlstm::lstm_persistent_forward_from_input_",
    "cpu",
    persistent_cpu.lstm_persistent_forward_from_input_,
    lib=_LIB,
)
torch.library.impl(
    "fusedconvlstm::lstm_persistent_backward_", "cpu", persistent_cpu.lstm_persistent_backward_, lib=_LIB
)
