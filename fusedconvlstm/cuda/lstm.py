"""``cuda`` backend of ``lstm_recurrence``: the persistent kernels, and the step-wise path beside them.

Both run the same cell math with the same workspace (``[i, f, g, o, c]`` per step in float32,
:mod:`fusedconvlstm.cuda.cell_ops`), so a forward of one and a backward of the other combine:

- **persistent** (``csrc/lstm_persistent_*.cu``, :mod:`fusedconvlstm.cuda.persistent_ops`): one
  launch runs all ``T`` steps of all ``D`` recurrences, the recurrent weights resident in shared
  memory, one barrier per step; one more launch runs the reverse-time sweep. Three forward
  kernels: cooperative (the default), cluster (sm_90, ``h`` exchanged in distributed shared
  memory) and one that computes the input projection itself (for :func:`fusedconvlstm.ops.lstm.lstm_layer`);
  ``FUSEDCONVLSTM_LSTM_FWD_KERNEL`` picks the first choice until GPU measurements decide.
- **step-wise** (``csrc/lstm_cell.cu``): per step a cuBLAS GEMM and one fused pointwise kernel,
  for what the persistent kernels do not take (float64, sizes that do not fit the device).

16-bit data runs on tensor cores with fp32 accumulation; float32 runs TF32 where PyTorch lets
cuDNN's LSTM do so, 3xTF32 otherwise. ``proj_size`` runs unprojected on ``W_hh W_hr``
(:mod:`fusedconvlstm.numerics.projection`). ``backends.explain(..., detail=True)`` says which
kernel serves a call. The driver only calls ops, so on CPU tensors it runs their CPU
implementations, which is how it is tested without a GPU. docs/design.md §2 has the kernels'
decomposition.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from fusedconvlstm import backends
from fusedconvlstm.calls.lstm import OP, LSTMRecurrenceCall
from fusedconvlstm.cuda import cell_ops, persistent_config, persistent_ops  # noqa: F401  (the kernel ops' schemas)
from fusedconvlstm.cuda.constants import SYNC_STRIDE, padded_reduction
from fusedconvlstm.cuda.persistent_config import DeviceLimits, Layout, preferred_forward_kernel
from fusedconvlstm.numerics.precision import accumulation_dtype, product_unrounded
from fusedconvlstm.numerics.projection import with_projection
from fusedconvlstm.numerics.recurrence import fp32_recurrence_allows_tf32, recurrent_weight_grads, reverse_mask

_cell_forward = torch.ops.fusedconvlstm.lstm_cell_forward_
_cell_backward = torch.ops.fusedconvlstm.lstm_cell_backward_
_persistent_forward = torch.ops.fusedconvlstm.lstm_persistent_forward_
_cluster_forward = torch.ops.fusedconvlstm.lstm_cluster_forward_
_persistent_backward = torch.ops.fusedconvlstm.lstm_persistent_backward_
_from_input_forward = torch.ops.fusedconvlstm.lstm_persistent_forward_from_input_
_cluster_max_active = torch.ops.fusedconvlstm.lstm_cluster_max_active_clusters

PERSISTENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _why_not(call: LSTMRecurrenceCall) -> str | None:
    return None  # the device and the extension are checked by the registry; both paths take any size


def _workspace_shape(call: LSTMRecurrenceCall):
    acc = accumulation_dtype(call.dtype)
    return (call.seq_len, call.batch, call.num_recurrences, 5 * call.hidden_size), acc


def _lengths_on(lengths: Tensor | None, device: torch.device) -> Tensor | None:
    return None if lengths is None else lengths.to(device=device, dtype=torch.int64, non_blocking=True)


def _precise(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and not fp32_recurrence_allows_tf32()


# ---------------------------------------------------------------------------------------------
# Which path serves a call


def _limits_for(call: LSTMRecurrenceCall, limits: DeviceLimits | None) -> DeviceLimits | str:
    if limits is not None:
        return limits
    if call.device.type != "cuda":
        return f"the persistent kernels run on CUDA devices, got {call.device.type}"
    return DeviceLimits.of(call.device)


def _refusal(call: LSTMRecurrenceCall) -> str | None:
    # A call with proj_size runs the kernels on its unprojected form (same H, ops.lstm_projection).
    if call.dtype not in PERSISTENT_DTYPES:
        return f"the persistent kernels take float16, bfloat16 or float32, got {call.dtype}"
    if call.num_recurrences > 62:
        return f"the persistent kernels take at most 62 recurrences per call, got {call.num_recurrences}"
    return None


def _choose(call: LSTMRecurrenceCall, kind: str, lim: DeviceLimits, input_size: int = 0) -> Layout | str:
    return persistent_config.choose_config(
        kind, call.batch, call.num_recurrences, call.hidden_size, call.dtype, lim, _precise(call.dtype), input_size
    )


def cluster_plan(call: LSTMRecurrenceCall, limits: DeviceLimits | None = None) -> Layout | str:
    """The cluster forward kernel's configuration for ``call``, or why it does not take it: besides
    the published limits, the device itself must place a cluster of that many blocks
    (:func:`max_active_clusters`), which a part with fewer SMs per GPC may not."""
    lim = _limits_for(call, limits)
    reason = _refusal(call) or (lim if isinstance(lim, str) else None)
    if reason is not None:
        return reason
    plan = _choose(call, persistent_config.CLUSTER, lim)
    if isinstance(plan, Layout):
        placed = max_active_clusters(call.device, call.dtype, call.hidden_size, plan)
        if isinstance(placed, str):
            return placed
        if placed == 0:
            return (
                f"the device cannot place a cluster of {plan.nu} blocks with {plan.smem} bytes of shared memory "
                f"each (cudaOccupancyMaxActiveClusters is 0 for config nt={plan.nt} wm={plan.wm} wn={plan.wn} "
                f"wk={plan.wk})"
            )
    return plan


def max_active_clusters(device: torch.device, dtype: torch.dtype, hidden_size: int, layout: Layout) -> int | str | None:
    """How many clusters of the cluster forward kernel in ``layout``'s configuration ``device``
    holds at once (``cudaOccupancyMaxActiveClusters``; 0: it cannot place one), a sentence where
    the query itself refuses, or ``None`` where no device can be asked (a CPU call, no CUDA here)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _max_active_clusters(index, dtype, hidden_size, layout.args)


@functools.lru_cache(maxsize=256)
def _max_active_clusters(index: int, dtype: torch.dtype, hidden_size: int, args: tuple[int, ...]) -> int | str:
    like = torch.empty(0, dtype=dtype, device=torch.device("cuda", index))
    try:
        return int(_cluster_max_active(like, hidden_size, *args))
    except (RuntimeError, NotImplementedError) as e:
        return f"the device's cluster occupancy query refused: {e}"


def persistent_plan(call: LSTMRecurrenceCall, kind: str, limits: DeviceLimits | None = None) -> Layout | str:
    """The persistent kernel's launch configuration for ``call`` (``kind`` ``"forward"`` or
    ``"backward"``), or why the persistent kernel does not take it. ``limits`` defaults to those
    of ``call.device``. For the forward, the cluster kernel's configuration where it is the
    preferred kernel (:func:`preferred_forward_kernel`) and fits, else the cooperative kernel's."""
    lim = _persistent_limits(call, limits)
    if isinstance(lim, str):
        return lim
    if kind == "forward" and preferred_forward_kernel() == "cluster":
        plan = cluster_plan(call, lim)
        if isinstance(plan, Layout):
            return plan
    return _choose(call, kind, lim)


def _persistent_limits(call: LSTMRecurrenceCall, limits: DeviceLimits | None) -> DeviceLimits | str:
    """The device limits a persistent kernel plans with, or why no persistent kernel takes ``call``."""
    reason = _refusal(call)
    if reason is not None:
        return reason
    lim = _limits_for(call, limits)
    if isinstance(lim, str):
        return lim
    if lim.capability < (8, 0):
        return f"the persistent kernels need compute capability 8.0 or newer, got {lim.capability}"
    return lim


def from_input_plan(call: LSTMRecurrenceCall, input_size: int, limits: DeviceLimits | None = None) -> Layout | str:
    """The configuration of the forward kernel that computes the input projection itself
    (kind ``FROM_INPUT``) for ``call`` with inputs of ``input_size`` features, or why it does not
    take the call (whether it is preferred aside: see :func:`from_input_why_not`)."""
    if call.proj_size:
        return "proj_size runs on the precomputed gates (its first step adds W_hh h0 to them)"
    lim = _persistent_limits(call, limits)
    return lim if isinstance(lim, str) else _choose(call, persistent_config.FROM_INPUT, lim, input_size)


def from_input_why_not(call: LSTMRecurrenceCall, input_size: int) -> str | None:
    """``None`` where ``lstm_layer`` hands the cuda backend the layer's input (the in-kernel
    projection is the preferred forward kernel, ``FUSEDCONVLSTM_LSTM_FWD_KERNEL=input``, and it
    takes the call), else why the projection runs as a GEMM before the recurrence."""
    if preferred_forward_kernel() != "input":
        return f"the preferred forward kernel is {preferred_forward_kernel()!r}, not 'input'"
    plan = from_input_plan(call, input_size)
    return plan if isinstance(plan, str) else None


def persistent_why_not(
    call: LSTMRecurrenceCall, kind: str = "forward", limits: DeviceLimits | None = None
) -> str | None:
    """``None`` if the persistent ``kind`` kernel serves ``call``, else the reason it does not."""
    plan = persistent_plan(call, kind, limits)
    return plan if isinstance(plan, str) else None


def _kernel_name(plan: Layout | str) -> str:
    """The forward kernel a plan runs: ``"cluster"``, ``"cooperative"`` or (a refusal) ``"stepwise"``."""
    if isinstance(plan, str):
        return "stepwise"
    return "cluster" if plan.kind == persistent_config.CLUSTER else "cooperative"


def forward_kernel_name(call: LSTMRecurrenceCall, limits: DeviceLimits | None = None) -> str:
    """Which forward kernel serves ``call``: ``"cluster"``, ``"cooperative"`` or ``"stepwise"``."""
    return _kernel_name(persistent_plan(call, "forward", limits))


def describe(call: LSTMRecurrenceCall, limits: DeviceLimits | None = None) -> str:
    """Which kernels the cuda backend runs for ``call``, forward and backward (for ``explain``)."""
    parts = []
    for kind in persistent_config.KINDS:
        plan = persistent_plan(call, kind, limits)
        if isinstance(plan, str):
            parts.append(f"{kind}: step-wise kernels (cuBLAS GEMM + fused cell kernel per step), because {plan}")
            continue
        precision = ""
        if call.dtype == torch.float32:
            precision = ", 3xTF32" if _precise(call.dtype) else ", TF32"
        name = "cluster kernel" if plan.kind == persistent_config.CLUSTER else "persistent kernel"
        text = f"{kind}: {name}{precision}, {plan.describe()}"
        if kind == "forward" and plan.kind != persistent_config.CLUSTER and preferred_forward_kernel() == "cluster":
            text += f" (the preferred cluster kernel does not take it: {cluster_plan(call, limits)})"
        parts.append(text)
    if call.proj_size:
        parts.append(f"proj_size {call.proj_size}: the recurrence on W_hh W_hr, the projection one GEMM after it")
    return "; ".join(parts)


def _call_of(xg: Tensor, w_hr: list[Tensor], lengths: Tensor | None, reverse: list[bool]) -> LSTMRecurrenceCall:
    T, B, D, G = xg.shape
    return LSTMRecurrenceCall(
        seq_len=T,
        batch=B,
        num_recurrences=D,
        hidden_size=G // 4,
        proj_size=w_hr[0].shape[0] if w_hr else 0,
        dtype=xg.dtype,
        device=xg.device,
        has_lengths=lengths is not None,
        reverse=tuple(bool(r) for r in reverse),
    )


def _require_unprojected(proj_size: int) -> None:
    """The drivers run unprojected recurrences; the registered implementation removes the
    projection first (:mod:`fusedconvlstm.numerics.projection`)."""
    if proj_size:
        raise ValueError("lstm_recurrence: the cuda drivers run unprojected recurrences (w_hr must be empty)")


def _plan_or_raise(call: LSTMRecurrenceCall, kind: str, config: Layout | None, input_size: int = 0) -> Layout:
    _require_unprojected(call.proj_size)
    if config is not None:
        return config

    def plan_of(call, limits=None):
        if kind == persistent_config.FROM_INPUT:
            return from_input_plan(call, input_size, limits)
        return persistent_plan(call, kind, limits)

    if call.device.type == "cuda":
        plan = plan_of(call)
    else:
        # CPU tensors run the ops' CPU implementations (tests of this driver), float64 included:
        # any valid configuration does; take the one an H100 would get.
        if call.dtype not in PERSISTENT_DTYPES:
            call = dataclasses.replace(call, dtype=torch.float32)
        plan = plan_of(call, persistent_config.H100_SXM)
    if isinstance(plan, str):
        raise ValueError(f"lstm_recurrence: the persistent {kind} kernel cannot serve this call: {plan}")
    return plan


# ---------------------------------------------------------------------------------------------
# Persistent path


def lstm_recurrence_persistent_forward(
    xg,
    w_hh,
    w_hr,
    h0,
    c0,
    lengths,
    reverse,
    config: Layout | None = None,
    save_for_backward: bool = True,
    write_y: bool = True,
):
    """Forward on the persistent kernel: ``(y, h_n, c_n, workspace)``.

    ``config`` (a :class:`~fusedconvlstm.cuda.persistent_config.Layout`) overrides the chosen
    launch configuration; raises ``ValueError`` when the call does not fit the kernel. Without
    ``write_y`` (only the final state is wanted) ``y`` is empty and the kernel stores none.
    """
    layout = _plan_or_raise(_call_of(xg, w_hr, lengths, reverse), "forward", config)
    inputs = (xg.contiguous(),)
    return _run_forward(layout, xg, xg.shape[:2], inputs, w_hh, h0, c0, lengths, reverse, save_for_backward, write_y)


def _run_forward(layout, like, tb, inputs, w_hh, h0, c0, lengths, reverse, save_for_backward, write_y):
    """A persistent forward op of ``layout``'s kind on its sequence ``inputs`` (``(xg,)``, or
    ``(x, w_ih, bias)`` for FROM_INPUT): the state buffers around it, ``(y, h_n, c_n, workspace)``."""
    (T, B), D, H = tb, len(w_hh), w_hh[0].shape[1]
    acc = accumulation_dtype(like.dtype)
    h_buf = like.new_zeros(2, D, B, padded_reduction(H, like.dtype.itemsize))
    h_buf[0, :, :, :H] = h0
    c = c0.to(acc, copy=True).contiguous()
    y = like.new_empty((T, B, D, H) if write_y else (0,))
    workspace = like.new_empty((T, B, D, 5 * H) if save_for_backward else (0,), dtype=acc)
    common = (torch.stack(w_hh).contiguous(), _lengths_on(lengths, like.device), reverse_mask(reverse))
    if layout.kind == persistent_config.CLUSTER:
        _cluster_forward(*inputs, *common, *layout.args, _precise(like.dtype), h_buf, c, y, workspace)
    else:
        op = _from_input_forward if layout.kind == persistent_config.FROM_INPUT else _persistent_forward
        sync = torch.empty(D * layout.nbg * SYNC_STRIDE, dtype=torch.int32, device=like.device)
        op(*inputs, *common, *layout.args, _precise(like.dtype), h_buf, c, y, workspace, sync)
    return y, h_buf[T % 2, :, :, :H].contiguous(), c.to(like.dtype), workspace


def _aligned_16(t: Tensor) -> Tensor:
    """``t`` contiguous at a 16-byte aligned address (the kernels read it in 16-byte copies)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def lstm_recurrence_from_input_forward(
    x: Tensor,
    w_ih: Tensor,
    bias: Tensor | None,
    w_hh,
    h0,
    c0,
    lengths,
    reverse,
    config: Layout | None = None,
    save_for_backward: bool = True,
    write_y: bool = True,
):
    """Forward of an unprojected layer on the kernel that computes ``x W_ihᵀ + bias`` itself:
    ``(y, h_n, c_n, workspace)``, the workspace that of :func:`lstm_recurrence_persistent_forward`.

    ``x (T, B, I)``; ``w_ih (D * 4H, I)`` and ``bias (D * 4H,)`` (or ``None``) as ``F.linear``
    takes them for the ``D`` recurrences' stacked gates. ``config`` overrides the chosen launch
    configuration (kind ``FROM_INPUT``); raises ``ValueError`` when the call does not fit the kernel.
    """
    T, B, n_in = x.shape
    D, G = len(w_hh), w_hh[0].shape[0]
    call = LSTMRecurrenceCall(T, B, D, G // 4, 0, x.dtype, x.device, lengths is not None, tuple(map(bool, reverse)))
    layout = _plan_or_raise(call, persistent_config.FROM_INPUT, config, n_in)
    kpx = padded_reduction(n_in, x.dtype.itemsize)
    x_pad = _aligned_16(x if kpx == n_in else torch.nn.functional.pad(x, (0, kpx - n_in)))
    b32 = torch.zeros(D, G, dtype=accumulation_dtype(x.dtype), device=x.device)
    if bias is not None:
        b32 += bias.view(D, G)
    inputs = (x_pad, w_ih.reshape(D, G, n_in).contiguous(), b32)
    return _run_forward(layout, x, (T, B), inputs, w_hh, h0, c0, lengths, reverse, save_for_backward, write_y)


def lstm_recurrence_persistent_backward(
    grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse, y, workspace, config: Layout | None = None
):
    """Backward on the persistent kernel: ``(grad_xg, grad_w_hh, [], grad_h0, grad_c0)``.

    The reverse-time sweep is one launch; ``dW_hh`` is one batched GEMM after it.
    """
    T, B, D, G = xg.shape
    layout = _plan_or_raise(_call_of(xg, w_hr, lengths, reverse), "backward", config)
    acc = accumulation_dtype(xg.dtype)
    dh_carry = grad_h_n.to(acc, copy=True).contiguous()
    dc = grad_c_n.to(acc, copy=True).contiguous()
    dgates = xg.new_empty(T, B, D, G)
    g_buf = xg.new_zeros(2, D, B, padded_reduction(G, xg.dtype.itemsize))
    sync = torch.empty(D * layout.nbg * SYNC_STRIDE, dtype=torch.int32, device=xg.device)
    lengths_dev = _lengths_on(lengths, xg.device)
    _persistent_backward(
        grad_y.contiguous(),
        workspace.contiguous(),
        c0.to(acc).contiguous(),
        torch.stack(w_hh).contiguous(),
        lengths_dev,
        reverse_mask(reverse),
        *layout.args,
        _precise(xg.dtype),
        dh_carry,
        dc,
        dgates,
        g_buf,
        sync,
    )
    grad_w_hh = recurrent_weight_grads(dgates, y, h0, lengths_dev, reverse)
    return dgates, grad_w_hh, [], dh_carry.to(xg.dtype), dc.to(xg.dtype)


# ---------------------------------------------------------------------------------------------
# Step-wise path (the baseline)


def lstm_recurrence_stepwise_forward(
    xg, w_hh, w_hr, h0, c0, lengths, reverse, save_for_backward: bool = True, write_y: bool = True
):
    """Forward of the step-wise recurrence: ``(y, h_n, c_n, workspace)`` (``y`` empty without
    ``write_y``)."""
    _require_unprojected(len(w_hr))
    T, B, D, G = xg.shape
    H = G // 4
    xg = xg.contiguous()
    w_t = torch.stack(w_hh).transpose(1, 2)  # (D, H, 4H): h @ W_hhᵀ as a batched GEMM
    h = h0.contiguous().clone()
    c = c0.to(accumulation_dtype(xg.dtype)).contiguous().clone()
    y = xg.new_empty((T, B, D, H) if write_y else (0,))
    workspace = xg.new_empty((T, B, D, 5 * H) if save_for_backward else (0,), dtype=accumulation_dtype(xg.dtype))
    hh = xg.new_empty(D, B, G, dtype=accumulation_dtype(xg.dtype))
    lengths = _lengths_on(lengths, xg.device)
    mask = reverse_mask(reverse)
    for step in range(T):
        product_unrounded(h, w_t, hh.dtype, out=hh)  # h W_hhᵀ unrounded, as the persistent kernels
        _cell_forward(hh, xg, h, c, y, workspace, lengths, step, mask)
    return y, h, c.to(xg.dtype), workspace


def lstm_recurrence_stepwise_backward(
    grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse, y, workspace
):
    """Backward of the step-wise recurrence: ``(grad_xg, grad_w_hh, [], grad_h0, grad_c0)``."""
    _require_unprojected(len(w_hr))
    T, B, D, G = xg.shape
    acc = accumulation_dtype(xg.dtype)
    w = torch.stack(w_hh)  # (D, 4H, H): dgates @ W_hh as a batched GEMM
    dh_rec = h0.new_zeros(h0.shape, dtype=acc)
    dh_carry = grad_h_n.to(acc).contiguous().clone()
    dc = grad_c_n.to(acc).contiguous().clone()
    dgates = xg.new_empty(T, B, D, G)
    dgates_step = xg.new_empty(D, B, G)
    grad_y = grad_y.contiguous()
    lengths_dev = _lengths_on(lengths, xg.device)
    mask = reverse_mask(reverse)
    c0 = c0.contiguous()
    for step in range(T):
        _cell_backward(dh_rec, grad_y, workspace, c0, dh_carry, dc, dgates, dgates_step, lengths_dev, step, mask)
        product_unrounded(dgates_step, w, dh_rec.dtype, out=dh_rec)
    grad_h0 = (dh_rec + dh_carry).to(xg.dtype)
    grad_w_hh = recurrent_weight_grads(dgates, y, h0, lengths_dev, reverse)
    return dgates, grad_w_hh, [], grad_h0, dc.to(xg.dtype)


# ---------------------------------------------------------------------------------------------
# The registered implementation


def lstm_recurrence_cuda_forward(
    xg, w_hh, w_hr, h0, c0, lengths, reverse, save_for_backward: bool = True, write_y: bool = True
):
    """The cuda backend's forward: persistent where it applies, else step-wise."""
    call = _call_of(xg, w_hr, lengths, reverse)
    plan = persistent_plan(call, "forward")
    persistent_config.FORWARD_KERNELS_SERVED[_kernel_name(plan)] += 1
    saves = dict(save_for_backward=save_for_backward, write_y=write_y)
    if isinstance(plan, str):
        return lstm_recurrence_stepwise_forward(xg, w_hh, w_hr, h0, c0, lengths, reverse, **saves)
    return lstm_recurrence_persistent_forward(xg, w_hh, w_hr, h0, c0, lengths, reverse, config=plan, **saves)


def lstm_recurrence_cuda_backward(grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse, y, workspace):
    """The cuda backend's backward: persistent where it applies, else step-wise."""
    args = (grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse, y, workspace)
    plan = persistent_plan(_call_of(xg, w_hr, lengths, reverse), "backward")
    if isinstance(plan, str):
        return lstm_recurrence_stepwise_backward(*args)
    return lstm_recurrence_persistent_backward(*args, config=plan)


def cell_outputs(workspace: Tensor) -> Tensor:
    """``o tanh(c)`` of every step from the workspace ``[i, f, g, o, c]`` (for ``proj_size``)."""
    H = workspace.shape[-1] // 5
    return workspace[..., 3 * H : 4 * H] * torch.tanh(workspace[..., 4 * H :])


_forward, _backward = with_projection(lstm_recurrence_cuda_forward, lstm_recurrence_cuda_backward, cell_outputs)


def lstm_recurrence_cuda_forward_from_input(
    x, w_ih, bias, w_hh, h0, c0, lengths, reverse, save_for_backward: bool = True, write_y: bool = True
):
    """The cuda backend's forward of a layer from its input (where :func:`from_input_why_not` is
    ``None``): the in-kernel projection; the backward is the recurrence's, then ``F.linear``'s."""
    persistent_config.FORWARD_KERNELS_SERVED["input"] += 1
    saves = dict(save_for_backward=save_for_backward, write_y=write_y)
    return lstm_recurrence_from_input_forward(x, w_ih, bias, w_hh, h0, c0, lengths, reverse, **saves)


backends.register_implementation(
    OP,
    "cuda",
    why_not=_why_not,
    forward=_forward,
    backward=_backward,
    workspace_shape=_workspace_shape,
    describe=describe,
    forward_from_input=lstm_recurrence_cuda_forward_from_input,
    from_input_why_not=from_input_why_not,
)
