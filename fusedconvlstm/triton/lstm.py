"""``triton`` backend of ``lstm_recurrence``: the whole time loop inside one kernel launch.

Launch modes (one kernel, :mod:`fusedconvlstm.triton.lstm_kernels`, serves all three):

``"single"``
    One program owns every hidden unit of a 16-row batch tile: no cross-program exchange and
    no grid barrier. Used for small hidden sizes (``H <= 64``) and always under the Triton
    interpreter (``TRITON_INTERPRET=1``), where programs run one after another and a spin
    barrier would never be released.
``"persistent"``
    Hidden units are split into slices of ``BLOCK_H``; each program keeps its part of ``W_hh``
    on-chip for all steps, ``h`` is exchanged through global memory and the programs of one
    recurrence and batch group meet at one grid barrier per step. The kernel is compiled first,
    then the grid is sized from its registers / shared memory and the device's limits
    (:mod:`fusedconvlstm.triton.persistent`) and launched cooperatively.
``"stepped"``
    The persistent decomposition with one launch per step instead of the barrier. Not chosen
    automatically: it lets the interpreter exercise the multi-program indexing, and on a GPU
    it is a reference for the persistent mode (same arithmetic, so bitwise equal results).

The backward runs the same decomposition in reverse time and writes the pre-activation
gradients (which are ``grad_xg``); ``dW_hh`` is one GEMM after the loop
(:func:`fusedconvlstm.numerics.recurrence.recurrent_weight_grads`). No atomics touch data, so results are
bitwise reproducible.

``proj_size`` runs as an unprojected recurrence on ``W_hh W_hr`` with the projection one GEMM
after the loop (:mod:`fusedconvlstm.numerics.projection`, shared with the cuda backend).

Precision: ``h`` and the dot operands are in the input dtype, accumulation, ``c`` and the gate
math in float32. Float32 dots use TF32 when cuDNN's RNNs do (``torch.backends.cudnn.rnn``), as
``nn.LSTM`` on cuDNN does, and IEEE float32 otherwise; IEEE float32 runs only in the
single-program mode (the persistent kernels' IEEE dots spill registers: the backend refuses those
calls with the reason, and ``auto`` takes another).

Triton is imported only when a kernel runs, so the package imports without it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fusedconvlstm import backends, config
from fusedconvlstm.calls.lstm import OP, LSTMRecurrenceCall
from fusedconvlstm.numerics.projection import with_projection
from fusedconvlstm.numerics.recurrence import fp32_recurrence_allows_tf32, recurrent_weight_grads, reverse_mask

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Largest hidden size for which one program holds the whole W_hh (4H × H) on-chip.
SINGLE_PROGRAM_MAX_HIDDEN = 64
_MIN_DOT = 16  # tl.dot needs every dimension >= 16
_BLOCK_H_CHOICES = (16, 32, 64)
# Reduction chunk of the recurrent dots: bounds the operand fragments live in registers (the
# whole weight tile stays in shared memory).
_K_CHUNK = 64
# (kernel, block_b) -> (num_warps, k_chunk) of the persistent mode. Chosen from ptxas's register
# and spill counts for sm_90 (bf16 and fp32, H = 512 and 320, 16 units per program; see
# persistent_kernels_compiled and persistent.ptxas_resources) under both Triton 3.6 and 3.8: no
# spills there, 80 to 255 registers per thread (the block-16 backward spilled at 4 warps under
# 3.6, hence 8). Odd sizes such as H = 100 at block 32 still spill a few dozen bytes. Not yet
# tuned for time on a GPU.
_PERSISTENT_TILES = {
    ("forward", 16): (4, 128),
    ("forward", 32): (4, 64),
    ("backward", 16): (8, 128),
    ("backward", 32): (4, 128),
}
# Shared memory a persistent kernel needs beyond its W_hh tile (layout-conversion scratch of the
# dots; ptxas reports 4 KiB in the forward and 8 KiB in the backward at H = 512).
_PERSISTENT_SMEM_SCRATCH = 8 * 1024

_last_persistent_launch: dict[str, object] = {}
# Persistent grid sizing per (kernel, constexprs, call shape, device): compiling and reading the
# kernel's resources once, not at every launch.
_persistent_sizing: dict[tuple, tuple[LaunchPlan, dict[str, object]]] = {}


@dataclass(frozen=True)
class LaunchPlan:
    """How a recurrence is decomposed into programs and launched.

    ``mode`` is ``"single"``, ``"persistent"`` or ``"stepped"``; ``block_h`` hidden units and
    ``block_b`` batch rows form one program's tile; a batch group of ``rows_per_group`` rows
    (a multiple of ``block_b``) is walked tile by tile; ``n_bgroups`` groups cover the batch.
    The recurrent dots reduce in chunks of ``k_chunk`` hidden units (a power of two); the
    reduction is padded to a multiple of it (:func:`reduction_pad`).
    """

    mode: str
    block_h: int
    block_b: int
    num_warps: int
    n_bgroups: int
    rows_per_group: int
    k_chunk: int = 64

    def n_slices(self, hidden: int) -> int:
        """Programs that share one recurrence and batch group (one per slice of hidden units)."""
        return -(-hidden // self.block_h)

    def grid(self, num_recurrences: int, hidden: int) -> int:
        """Number of programs launched."""
        return num_recurrences * self.n_bgroups * self.n_slices(hidden)


def _interpreting() -> bool:
    return config.current().triton_interpret


def _pow2_at_least(n: int, least: int = _MIN_DOT) -> int:
    p = least
    while p < n:
        p *= 2
    return p


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _k_chunk(hidden: int, chunk: int = _K_CHUNK) -> int:
    return min(_pow2_at_least(hidden), chunk)


def reduction_pad(hidden: int, k_chunk: int) -> int:
    """The recurrent dots' reduction length per gate: ``hidden`` rounded up to whole chunks."""
    return _cdiv(hidden, k_chunk) * k_chunk


def _batch_tiling(batch: int, block_b: int, n_bgroups: int) -> tuple[int, int]:
    """``(n_bgroups, rows_per_group)`` with groups of whole tiles and no empty group."""
    n_bgroups = max(1, min(n_bgroups, _cdiv(batch, block_b)))
    rows = _cdiv(_cdiv(batch, n_bgroups), block_b) * block_b
    return _cdiv(batch, rows), rows


def _persistent_block_b(batch: int) -> int:
    """Batch rows per tile of the persistent mode: 16 for batches of at most 16, else 32."""
    return _MIN_DOT if batch <= _MIN_DOT else 2 * _MIN_DOT


def single_program_plan(batch: int, hidden: int) -> LaunchPlan:
    """One program per 16-row batch tile, owning all ``hidden`` units."""
    h_pad = _pow2_at_least(hidden)
    block_b = _MIN_DOT
    n_bgroups, rows = _batch_tiling(batch, block_b, _cdiv(batch, block_b))
    return LaunchPlan("single", h_pad, block_b, 8 if h_pad >= 64 else 4, n_bgroups, rows, _k_chunk(hidden))


# Exact float32 dots (TF32 off for cuDNN's RNNs) lower to FMA loops that spill tens of KB per
# thread in the persistent kernels (ptxas for sm_90 at H = 512, 32-row tiles: ~30 KB of spill
# stores forward, ~9 KB backward), and tf32x3 needs twice the shared memory of an H100 SM: the
# persistent mode refuses them; the single-program mode (H <= 64) runs them.
EXACT_FP32_REFUSAL = (
    "exact float32 products (TF32 disabled for cuDNN's RNNs) spill registers in the persistent Triton "
    "kernels: allow TF32 (torch.backends.cudnn.rnn.fp32_precision = 'tf32', PyTorch's default), or use the "
    "cuda backend, which runs them as 3xTF32"
)


def persistent_block_h(call: LSTMRecurrenceCall) -> int | str:
    """Hidden units per program in the persistent mode, or why that mode cannot run.

    The smallest slice whose programs (one per slice and recurrence) fit on the device's SMs,
    one each: every compiled kernel fits at least once per SM, so this grid is always
    co-resident; batch groups are added at launch from the compiled kernel's resources. The
    program's part of W_hh (``4 * block_h * H`` elements), with the prefetch buffers of
    :func:`pipeline_stages`, must fit in an SM's shared memory.
    """
    from fusedconvlstm.triton.persistent import device_limits

    if call.dtype == torch.float32 and _dot_precision(call.dtype) == "ieee":
        return EXACT_FP32_REFUSAL
    H, D = call.hidden_size, call.num_recurrences
    index = call.device.index if call.device.index is not None else torch.cuda.current_device()
    limits = device_limits(index)
    # The reduction as the widest chunk of any persistent tile pads it.
    h_pad = max(reduction_pad(H, _k_chunk(H, k_chunk)) for _, k_chunk in _PERSISTENT_TILES.values())
    elem = torch.empty(0, dtype=call.dtype).element_size()
    # Software pipelining (pipeline_stages) adds a buffer per stage beyond the first for one batch
    # tile of the dots' left operand: h rows (forward) or the 4 gates' gradients (backward, the larger).
    stages = pipeline_stages()
    block_b = _persistent_block_b(call.batch)
    prefetch = (stages - 1) * block_b * 4 * h_pad * elem
    for block_h in _BLOCK_H_CHOICES:
        programs = D * _cdiv(H, block_h)
        if programs > limits.multiprocessor_count:
            continue
        w_bytes = 4 * block_h * h_pad * elem
        if w_bytes + prefetch + _PERSISTENT_SMEM_SCRATCH > limits.shared_memory_per_block_optin:
            staged = f", {prefetch} bytes of prefetch buffers ({config.ENV['triton_lstm_stages']}={stages})"
            return (
                f"the recurrent weights do not fit on-chip: each of {programs} programs would hold "
                f"{w_bytes} bytes of W_hh (4 x {block_h} x {h_pad} {call.dtype}){staged if prefetch else ''} and "
                f"about {_PERSISTENT_SMEM_SCRATCH} bytes of scratch, more than the "
                f"{limits.shared_memory_per_block_optin} bytes of shared memory of an SM"
            )
        return block_h
    return (
        f"hidden_size {H} with {D} recurrence(s) needs at least {D * _cdiv(H, _BLOCK_H_CHOICES[-1])} "
        f"co-resident programs of {_BLOCK_H_CHOICES[-1]} hidden units, more than the "
        f"{limits.multiprocessor_count} SMs of {call.device}"
    )


def use_single_program(call: LSTMRecurrenceCall) -> bool:
    """Whether a call runs in the single-program mode (small hidden sizes, the interpreter)."""
    return _interpreting() or call.device.type != "cuda" or call.hidden_size <= SINGLE_PROGRAM_MAX_HIDDEN


def plan_launch(call: LSTMRecurrenceCall, kernel: str = "forward") -> LaunchPlan:
    """The launch plan of ``kernel`` (``"forward"`` / ``"backward"``) for ``call``.

    A persistent plan's batch groups are sized at launch, from the compiled kernel.
    """
    if use_single_program(call):
        return single_program_plan(call.batch, call.hidden_size)
    block_h = persistent_block_h(call)
    if isinstance(block_h, str):
        raise backends.BackendUnavailableError(f"{OP}: backend='triton' cannot serve this call: {block_h}")
    block_b = _persistent_block_b(call.batch)
    num_warps, k_chunk = _PERSISTENT_TILES[kernel, block_b]
    n_bgroups, rows = _batch_tiling(call.batch, block_b, 1)
    return LaunchPlan("persistent", block_h, block_b, num_warps, n_bgroups, rows, _k_chunk(call.hidden_size, k_chunk))


def stepped_plan(batch: int, hidden: int, block_h: int = _MIN_DOT, block_b: int = _MIN_DOT, n_bgroups: int = 1):
    """A multi-program plan run one launch per step (tests, and a reference for the persistent mode)."""
    n_bgroups, rows = _batch_tiling(batch, block_b, n_bgroups)
    return LaunchPlan("stepped", block_h, block_b, 4, n_bgroups, rows, _k_chunk(hidden))


def _why_not(call: LSTMRecurrenceCall) -> str | None:
    # proj_size: the kernels run the unprojected form of the call (same H, numerics.projection).
    if call.dtype not in SUPPORTED_DTYPES:
        return f"dtype {call.dtype} is not supported (float16, bfloat16, float32); use backend='reference'"
    if call.dtype == torch.bfloat16 and _interpreting():
        return "the Triton interpreter computes bfloat16 tl.dot incorrectly; run bfloat16 on a GPU"
    if use_single_program(call):
        return None
    block_h = persistent_block_h(call)
    return block_h if isinstance(block_h, str) else None


def _workspace_shape(call: LSTMRecurrenceCall):
    return (call.seq_len, call.batch, call.num_recurrences, 5 * call.hidden_size), torch.float32


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the launches write; tests replace it to NaN-poison them."""
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "tf32"  # ignored for half-precision operands
    return "tf32" if fp32_recurrence_allows_tf32() else "ieee"


PIPELINE_STAGES = ("1", "2")


def pipeline_stages() -> int:
    """Triton's ``num_stages`` for the kernels' launches: ``FUSEDCONVLSTM_TRITON_LSTM_STAGES``, 1 by default.

    A switch the GPU session times both ways (``scripts/gpu_session.sh switches``), unmeasured so
    far. With 1 the loads of ``h`` (forward) or of the gate gradients (backward) are plain loads.
    With 2, Triton's pipeliner turns them into asynchronous copies (where rows are 16-byte aligned)
    and prefetches the next batch tile's rows while the current tile computes. It pipelines only
    the innermost loop, the batch tiles of one step: no load of a step is issued before the
    previous step's grid barrier, and every copy is waited for before the step's own barrier (both
    checked on the compiled code, ``tests/test_triton_lstm.py``).

    The prefetch buffers cost shared memory: fewer programs fit an SM (the grid is sized from the
    compiled kernel), and a call whose kernels no longer fit is refused (:func:`persistent_block_h`;
    in bf16 with 32-row tiles the backward fits up to H = 512; a third stage would fit no backward
    at H = 512). Compiled for sm_90 at 2 stages with lengths, the bf16 forward spills 44 to 48
    bytes (H = 512, 32-row tiles, Triton 3.6 and 3.8); without lengths, or in fp16, it does not.
    """
    return int(config.choice("triton_lstm_stages", PIPELINE_STAGES, "1"))


def _lengths_arg(lengths: Tensor | None, device: torch.device) -> Tensor:
    if lengths is None:
        return torch.empty(1, dtype=torch.int32, device=device)  # never read (HAS_LENGTHS=False)
    return lengths.to(device=device, dtype=torch.int32)


def _launch(
    kernel, plan: LaunchPlan, call_args: dict, D: int, H: int, T: int, B: int, device: torch.device, with_finish: bool
) -> None:
    """Launch ``kernel`` over all ``T`` steps according to ``plan`` (``finish``: the backward's last pass)."""
    persistent = plan.mode == "persistent"
    n_slices = plan.n_slices(H)
    meta = dict(
        H_PAD=reduction_pad(H, plan.k_chunk),
        KC=plan.k_chunk,
        BLOCK_H=plan.block_h,
        BLOCK_B=plan.block_b,
        USE_GRID_BARRIER=persistent and n_slices > 1,
        H_CACHE=".cg" if persistent else "",  # exchanged data must come from L2, not a stale L1
        num_warps=plan.num_warps,
        num_stages=pipeline_stages(),
    )
    if persistent:
        meta["launch_cooperative_grid"] = True
        plan = _size_persistent_grid(kernel, plan, call_args, meta, D, H, B, device, with_finish)
    counters = torch.zeros(D * plan.n_bgroups, dtype=torch.int32, device=device)
    args = dict(call_args, bar_ptr=counters, n_bgroups=plan.n_bgroups, rows_per_group=plan.rows_per_group)
    grid = (plan.grid(D, H),)
    if plan.mode == "stepped":
        for s in range(T):
            extra = {"finish": 0} if with_finish else {}
            kernel[grid](**args, step_begin=s, step_end=s + 1, **extra, **meta)
        if with_finish:
            kernel[grid](**args, step_begin=T, step_end=T, finish=1, **meta)
    else:
        extra = {"finish": 1} if with_finish else {}
        kernel[grid](**args, step_begin=0, step_end=T, **extra, **meta)


def _size_persistent_grid(kernel, plan, call_args, meta, D, H, B, device, with_finish) -> LaunchPlan:
    """Compile ``kernel``, then give it as many batch groups as stay co-resident."""
    from triton.runtime.errors import OutOfResources

    from fusedconvlstm.triton.persistent import co_resident_programs

    dtypes = tuple(str(v.dtype) for v in call_args.values() if isinstance(v, Tensor))
    # The constexpr flags; of T only how Triton specializes an integer (== 1, a multiple of 16),
    # so a new sequence length does not compile again, also not inside a CUDA-graph capture.
    flags = tuple(sorted((k, v) for k, v in call_args.items() if k.isupper() and len(k) > 1))
    T = call_args["T"]
    key = (kernel.fn.__name__, tuple(sorted(meta.items())), flags, dtypes, plan, D, H, B, T == 1, T % 16 == 0)
    key += (str(device),)
    if key not in _persistent_sizing:
        # The grid size and batch tiling are runtime scalars (not specialized), so this compiles
        # the very kernel the launch runs.
        probe = dict(call_args, bar_ptr=torch.zeros(D, dtype=torch.int32, device=device))
        probe.update(n_bgroups=1, rows_per_group=plan.rows_per_group, step_begin=0, step_end=0)
        if with_finish:
            probe["finish"] = 0
        try:
            compiled = kernel.warmup(**probe, **meta, grid=(1,))
            capacity = co_resident_programs(compiled, device)
        except OutOfResources as exc:  # more shared memory than an SM has, found when it loads
            raise backends.BackendUnavailableError(
                f"{OP}: backend='triton' cannot serve this call: the persistent kernel does not fit an SM ({exc})"
            ) from exc
        per_group = D * plan.n_slices(H)
        if per_group > capacity:
            raise backends.BackendUnavailableError(
                f"{OP}: backend='triton' cannot serve this call: the persistent kernel needs {per_group} "
                f"co-resident programs but {device} holds {capacity} ({compiled.n_regs} registers/thread, "
                f"{compiled.metadata.shared} bytes of shared memory, {compiled.metadata.num_warps} warps)"
            )
        n_bgroups, rows = _batch_tiling(B, plan.block_b, capacity // per_group)
        sized = replace(plan, n_bgroups=n_bgroups, rows_per_group=rows)
        info = dict(
            kernel=kernel.fn.__name__,
            grid=sized.grid(D, H),
            capacity=capacity,
            n_regs=compiled.n_regs,
            n_spills=compiled.n_spills,
            shared=compiled.metadata.shared,
            num_warps=compiled.metadata.num_warps,
            plan=sized,
        )
        _persistent_sizing[key] = (sized, info)
    sized, info = _persistent_sizing[key]
    _last_persistent_launch.clear()
    _last_persistent_launch.update(info)
    return sized


def last_persistent_launch() -> dict[str, object]:
    """Grid, co-resident capacity and compiled resources of the last persistent launch (diagnostics)."""
    return dict(_last_persistent_launch)


def _call_of(xg: Tensor, lengths: Tensor | None, reverse: list[bool]) -> LSTMRecurrenceCall:
    T, B, D, G = xg.shape
    return LSTMRecurrenceCall(T, B, D, G // 4, 0, xg.dtype, xg.device, lengths is not None, tuple(reverse))


def lstm_forward(
    xg: Tensor,
    w_hh: list[Tensor],
    h0: Tensor,
    c0: Tensor,
    lengths: Tensor | None,
    reverse: list[bool],
    plan: LaunchPlan | None = None,
    save_for_backward: bool = True,
    write_y: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward of ``D`` recurrences in one launch: ``(y, h_n, c_n, workspace)`` (op layouts).

    Without ``save_for_backward`` the workspace is empty and the kernel writes none; without
    ``write_y`` neither is ``y`` (only the final state is wanted).
    """
    from fusedconvlstm.triton.lstm_kernels import lstm_forward_kernel

    T, B, D, G = xg.shape
    H = G // 4
    dtype, device = xg.dtype, xg.device
    y = _alloc((T, B, D, H) if write_y else (0,), dtype, device)
    h_state = _alloc((2, D, B, H), dtype, device)  # double-buffered by step parity
    h_state[0].copy_(h0)
    c_state = _alloc((D, B, H), torch.float32, device)
    c_state.copy_(c0)
    workspace = _alloc((T, B, D, 5 * H) if save_for_backward else (0,), torch.float32, device)
    if B > 0:
        plan = plan or plan_launch(_call_of(xg, lengths, reverse))
        call_args = dict(
            xg_ptr=xg.contiguous(),
            w_ptr=torch.stack(w_hh),
            len_ptr=_lengths_arg(lengths, device),
            y_ptr=y if write_y else h_state,  # never written without WRITE_Y
            h_ptr=h_state,
            c_ptr=c_state,
            # Never written without SAVE_WS; the kernel still needs a pointer.
            ws_ptr=workspace if save_for_backward else c_state,
            T=T,
            B=B,
            D=D,
            H=H,
            reverse_mask=reverse_mask(reverse),
            HAS_LENGTHS=lengths is not None,
            DOT_PRECISION=_dot_precision(dtype),
            SAVE_WS=save_for_backward,
            WRITE_Y=write_y,
        )
        _launch(lstm_forward_kernel, plan, call_args, D, H, T, B, device, with_finish=False)
    return y, h_state[T % 2].clone(), c_state.to(dtype), workspace


def lstm_backward(
    grad_y: Tensor,
    grad_h_n: Tensor,
    grad_c_n: Tensor,
    w_hh: list[Tensor],
    h0: Tensor,
    lengths: Tensor | None,
    reverse: list[bool],
    y: Tensor,
    workspace: Tensor,
    plan: LaunchPlan | None = None,
) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
    """Backward of :func:`lstm_forward`: ``(grad_xg, grad_w_hh, grad_h0, grad_c0)``."""
    from fusedconvlstm.triton.lstm_kernels import lstm_backward_kernel

    T, B, D, H = y.shape
    dtype, device = y.dtype, y.device
    dgates = _alloc((T, B, D, 4 * H), dtype, device)
    dh = _alloc((D, B, H), torch.float32, device)
    dh.copy_(grad_h_n)
    dc = _alloc((D, B, H), torch.float32, device)
    dc.copy_(grad_c_n)
    lengths_dev = _lengths_arg(lengths, device)
    if B > 0:
        call = LSTMRecurrenceCall(T, B, D, H, 0, dtype, device, lengths is not None, tuple(reverse))
        plan = plan or plan_launch(call, "backward")
        call_args = dict(
            grad_y_ptr=grad_y.contiguous(),
            ws_ptr=workspace,
            w_ptr=torch.stack(w_hh),
            len_ptr=lengths_dev,
            dg_ptr=dgates,
            dh_ptr=dh,
            dc_ptr=dc,
            T=T,
            B=B,
            D=D,
            H=H,
            reverse_mask=reverse_mask(reverse),
            HAS_LENGTHS=lengths is not None,
            DOT_PRECISION=_dot_precision(dtype),
        )
        _launch(lstm_backward_kernel, plan, call_args, D, H, T, B, device, with_finish=True)
    else:
        dgates.zero_()
    grad_w_hh = recurrent_weight_grads(dgates, y, h0, None if lengths is None else lengths_dev, reverse)
    return dgates, grad_w_hh, dh.to(dtype), dc.to(dtype)


def _forward(xg, w_hh, w_hr, h0, c0, lengths, reverse, save_for_backward=True, write_y=True):
    return lstm_forward(xg, w_hh, h0, c0, lengths, reverse, save_for_backward=save_for_backward, write_y=write_y)


def _backward(grad_y, grad_h_n, grad_c_n, xg, w_hh, w_hr, h0, c0, lengths, reverse, y, workspace):
    grad_xg, grad_w_hh, grad_h0, grad_c0 = lstm_backward(
        grad_y, grad_h_n, grad_c_n, w_hh, h0, lengths, reverse, y, workspace
    )
    return grad_xg, grad_w_hh, [], grad_h0, grad_c0


def cell_outputs(workspace: Tensor) -> Tensor:
    """``o tanh(c)`` of every step from the workspace ``[i, f, g, o, c_{t-1}]`` (for ``proj_size``)."""
    H = workspace.shape[-1] // 5
    i, f, g, o, c_prev = workspace.split(H, dim=-1)
    return o * torch.tanh(f * c_prev + i * g)


_projected_forward, _projected_backward = with_projection(_forward, _backward, cell_outputs)

backends.register_implementation(
    OP,
    "triton",
    why_not=_why_not,
    forward=_projected_forward,
    backward=_projected_backward,
    workspace_shape=_workspace_shape,
)


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def persistent_kernels_compiled(
    dtype: torch.dtype,
    hidden: int,
    batch: int,
    block_h: int = _BLOCK_H_CHOICES[0],
    cc: int = 90,
    dot_precision: str | None = None,
    num_stages: int = 1,
) -> dict[str, object]:
    """The persistent forward and backward kernels as a launch of this call shape on compute
    capability ``cc`` would compile them (lengths and grid barrier on), compiled ahead of time
    with no GPU: see :func:`fusedconvlstm.triton.persistent.compile_ahead`. ``dot_precision``: the
    float32 dots' (``"tf32"``, ``"ieee"``, ``"tf32x3"``); TF32 by default, the only one the
    persistent mode runs in float32 (see :data:`EXACT_FP32_REFUSAL`). ``num_stages``: Triton's
    software pipelining (see :func:`pipeline_stages`).
    """
    from fusedconvlstm.triton.lstm_kernels import lstm_backward_kernel, lstm_forward_kernel
    from fusedconvlstm.triton.persistent import compile_ahead

    t = "*" + _TRITON_TYPES[dtype]
    pointers = {
        "forward": dict(
            xg_ptr=t, w_ptr=t, len_ptr="*i32", y_ptr=t, h_ptr=t, c_ptr="*fp32", ws_ptr="*fp32", bar_ptr="*i32"
        ),
        "backward": dict(
            grad_y_ptr=t,
            ws_ptr="*fp32",
            w_ptr=t,
            len_ptr="*i32",
            dg_ptr=t,
            dh_ptr="*fp32",
            dc_ptr="*fp32",
            bar_ptr="*i32",
        ),
    }
    kernels = {"forward": lstm_forward_kernel, "backward": lstm_backward_kernel}
    block_b = _persistent_block_b(batch)
    out = {}
    for name, fn in kernels.items():
        num_warps, k_chunk = _PERSISTENT_TILES[name, block_b]
        k_chunk = _k_chunk(hidden, k_chunk)
        constexprs = dict(
            H_PAD=reduction_pad(hidden, k_chunk),
            KC=k_chunk,
            BLOCK_H=block_h,
            BLOCK_B=block_b,
            HAS_LENGTHS=True,
            USE_GRID_BARRIER=True,
            H_CACHE=".cg",
            DOT_PRECISION=dot_precision or "tf32",
        )
        if name == "forward":
            constexprs.update(SAVE_WS=True, WRITE_Y=True)
        signature = {arg: pointers[name].get(arg, "constexpr" if arg in constexprs else "i32") for arg in fn.arg_names}
        divisible = list(pointers[name]) + (["H"] if hidden % 16 == 0 else [])
        out[name] = compile_ahead(fn, signature, constexprs, divisible, num_warps, cc, num_stages)
    return out
