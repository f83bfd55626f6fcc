"""Launch configurations of the persistent LSTM kernels: what fits a device, and which to take.

A configuration ``(nt, wm, wn, wk, nbg)`` is described in :mod:`fusedconvlstm.cuda.persistent_ops`.
:func:`make_layout` mirrors ``make_layout`` in ``csrc/lstm_persistent.cuh`` (the kernels check
the same numbers again and refuse what does not fit). :func:`choose_config` enumerates every
configuration that fits — the recurrent-weight slice, one batch tile and the partial sums in
shared memory, the whole grid co-resident — and ranks them with :func:`estimated_step_cycles`,
a rough model of one time step (an estimate, not a measurement: it is to be calibrated on a
GPU). ``FUSEDCONVLSTM_LSTM_FWD_CONFIG`` / ``FUSEDCONVLSTM_LSTM_BWD_CONFIG`` (``"nt,wm,wn,wk,nbg"``)
force a configuration, for tuning sweeps.

The forward also has a cluster variant (kind :data:`CLUSTER`, sm_90): the blocks of one
(recurrence, batch tile) form a thread-block cluster and exchange ``h`` in distributed shared
memory with the hardware's cluster barrier, so the grid needs no co-residency (clusters never
wait on each other) but a cluster holds at most 16 blocks and each block two ``h`` tiles.
``FUSEDCONVLSTM_LSTM_FWD_KERNEL`` (``cooperative``, the default, or ``cluster``) selects which
forward kernel the cuda backend prefers; the default stays cooperative until a GPU measurement
says which is faster where. ``FUSEDCONVLSTM_LSTM_CLUSTER_CONFIG`` (``"nt,wm,wn,wk"``) forces the
cluster kernel's configuration.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fusedconvlstm import config
from fusedconvlstm.cuda.constants import (
    BACKWARD_MMA_ROWS,
    FORWARD_MMA_ROWS,
    K_STEP_BYTES,
    MAX_CLUSTER_BLOCKS,
    MIN_BLOCKS_PER_SM,
    ROW_PAD_BYTES,
    THREADS,
    padded_reduction,
)

WARPS = THREADS // 32
KINDS = ("forward", "backward")
CLUSTER = "forward_cluster"  # the forward on thread-block clusters
FROM_INPUT = "forward_from_input"  # the cooperative forward computing x W_ihᵀ itself
_OVERRIDE_FIELD = {
    "forward": "lstm_forward_config",
    "backward": "lstm_backward_config",
    CLUSTER: "lstm_cluster_config",
    FROM_INPUT: "lstm_input_config",
}
ENV_OVERRIDE = {kind: config.ENV[field] for kind, field in _OVERRIDE_FIELD.items()}
FORWARD_KERNEL_ENV = config.ENV["lstm_forward_kernel"]
# "input": the cooperative kernel that also computes the input projection (where a layer's
# input, not its precomputed gates, reaches the backend: fusedconvlstm.ops.lstm.lstm_layer).
FORWARD_KERNELS = ("cooperative", "cluster", "input")
# Forward: a warp row of two m16 tiles = 8 units x 4 gates; backward: one m16 tile of units.
_ROWS_PER_WARP = {
    "forward": 16 * FORWARD_MMA_ROWS,
    "backward": 16 * BACKWARD_MMA_ROWS,
    CLUSTER: 16 * FORWARD_MMA_ROWS,
    FROM_INPUT: 16 * FORWARD_MMA_ROWS,
}
_ROWS_PER_UNIT = {"forward": 4, "backward": 1, CLUSTER: 4, FROM_INPUT: 4}
# h (or dG) tiles held in shared memory: the cluster kernel double-buffers its exchanged h.
_STATE_TILES = {"forward": 1, "backward": 1, CLUSTER: 2, FROM_INPUT: 1}


_FORWARD_KERNEL_COUNTERS: list[collections.Counter[str]] = []


@contextlib.contextmanager
def counting_forward_kernels() -> Iterator[collections.Counter[str]]:
    """How many forward calls each kernel of the cuda backend serves inside the block
    (``cluster``, ``cooperative``, ``input``, ``stepwise``): what a benchmark record or a check
    row says it ran. Nothing is counted where no block asks."""
    counter: collections.Counter[str] = collections.Counter()
    _FORWARD_KERNEL_COUNTERS.append(counter)
    try:
        yield counter
    finally:  # by identity: two counters with the same counts compare equal
        _FORWARD_KERNEL_COUNTERS[:] = [c for c in _FORWARD_KERNEL_COUNTERS if c is not counter]


def count_forward_kernel(name: str) -> None:
    """One forward call served by kernel ``name`` (for :func:`counting_forward_kernels`)."""
    for counter in _FORWARD_KERNEL_COUNTERS:
        counter[name] += 1


def preferred_forward_kernel() -> str:
    """The persistent forward kernel tried first: ``$FUSEDCONVLSTM_LSTM_FWD_KERNEL``, ``cooperative`` by default."""
    return config.choice("lstm_forward_kernel", FORWARD_KERNELS, "cooperative")


def warp_splits():
    """Every ``(nt, wm, wn, wk)`` the kernels compile: batch tile widths 1 and 4, the 8 warps split
    in powers of two."""
    for nt in (1, 4):
        for wm in (1, 2, 4, 8):
            for wn in (1, 2, 4, 8):
                if WARPS % (wm * wn) == 0:
                    yield nt, wm, wn, WARPS // (wm * wn)


@contextlib.contextmanager
def preferring_forward_kernel(name: str | None):
    """The forward kernel ``name`` preferred inside the block (as ``FUSEDCONVLSTM_LSTM_FWD_KERNEL=name``),
    restored after (``None``: unchanged)."""
    if name is not None and name not in FORWARD_KERNELS:
        raise ValueError(f"the forward kernel must be one of {FORWARD_KERNELS}, got {name!r}")
    if name is None:
        yield
        return
    with config.override(lstm_forward_kernel=name):
        yield


@dataclass(frozen=True)
class DeviceLimits:
    """What a device offers the persistent kernels."""

    sm_count: int
    smem_per_block: int  # opt-in maximum of dynamic shared memory per block
    smem_per_sm: int
    capability: tuple[int, int]
    reserved_smem_per_block: int = 1024  # the runtime's share per resident block (sm_80+)

    @property
    def max_cluster_blocks(self) -> int:
        """The largest thread-block cluster the device launches (0: no clusters before sm_90)."""
        return MAX_CLUSTER_BLOCKS if self.capability >= (9, 0) else 0

    @classmethod
    def of(cls, device: torch.device) -> DeviceLimits:
        """The limits of a CUDA device (cached per device)."""
        return _device_limits(torch.device(device).index or 0)


@functools.cache
def _device_limits(index: int) -> DeviceLimits:
    p = torch.cuda.get_device_properties(index)
    optin = getattr(p, "shared_memory_per_block_optin", p.shared_memory_per_block)
    return DeviceLimits(p.multi_processor_count, optin, p.shared_memory_per_multiprocessor, (p.major, p.minor))


# Published limits, for choosing and testing configurations without the device at hand.
H100_SXM = DeviceLimits(sm_count=132, smem_per_block=232448, smem_per_sm=233472, capability=(9, 0))
A100 = DeviceLimits(sm_count=108, smem_per_block=166912, smem_per_sm=167936, capability=(8, 0))


@dataclass(frozen=True)
class Layout:
    """A configuration and the sizes it implies for one call."""

    kind: str
    nt: int
    wm: int
    wn: int
    wk: int
    nbg: int
    hs: int  # hidden units per block
    bt: int  # batch rows per tile
    nu: int  # blocks per (recurrence, batch group): one barrier group
    nbt: int  # batch tiles
    kp: int  # padded reduction length (elements)
    smem: int  # dynamic shared memory per block (bytes)
    grid: int
    kpx: int = 0  # FROM_INPUT: the padded input length (elements) of x and the W_ih slice

    @property
    def input_tiles(self) -> int:
        """FROM_INPUT: the batch tiles a block projects per step (csrc's input_projection_tiles)."""
        return -(-self.nbt // self.nbg)

    @property
    def args(self) -> tuple[int, ...]:
        """The configuration as the kind's op takes it: ``(nt, wm, wn, wk, nbg)``, or
        ``(nt, wm, wn, wk)`` for the cluster kernel (one batch tile per cluster)."""
        if self.kind == CLUSTER:
            return self.nt, self.wm, self.wn, self.wk
        return self.nt, self.wm, self.wn, self.wk, self.nbg

    def blocks_per_sm(self, limits: DeviceLimits) -> int:
        """How many such blocks one SM holds (shared memory and the launch bounds)."""
        # __launch_bounds__(THREADS, MIN_BLOCKS_PER_SM) asks ptxas for at most 128 registers so that
        # two blocks fit; it is a minimum, not a cap. Three could fit if a compiler ever used fewer
        # than ~80 registers; counting two keeps the co-residency check conservative (a smaller
        # grid than possible, never a larger).
        most = 1 if self.kind == CLUSTER else MIN_BLOCKS_PER_SM
        return min(most, limits.smem_per_sm // (self.smem + limits.reserved_smem_per_block))

    def why_not_fits(self, limits: DeviceLimits) -> str | None:
        """``None`` if the kernel can launch it (shared memory per block, and a co-resident grid
        for the cooperative kernels or a cluster the device forms for the cluster kernel), else why."""
        if self.smem > limits.smem_per_block:
            return f"{self.smem} bytes of shared memory per block, the device allows {limits.smem_per_block}"
        if self.nbg > self.nbt:
            return f"nbg {self.nbg} exceeds the {self.nbt} batch tiles"
        if self.kind == CLUSTER:
            if self.nu > limits.max_cluster_blocks:
                return f"clusters of {self.nu} blocks, the device forms clusters of at most {limits.max_cluster_blocks}"
            return None
        capacity = limits.sm_count * self.blocks_per_sm(limits)
        if self.grid > capacity:
            return f"{self.grid} blocks, of which the device holds {capacity} at once"
        return None

    def fits(self, limits: DeviceLimits) -> bool:
        """Whether the kernel can launch it (see :meth:`why_not_fits`)."""
        return self.why_not_fits(limits) is None

    def describe(self) -> str:
        """A one-line summary for ``backends.explain``."""
        if self.kind == FROM_INPUT:
            return (
                f"{self.grid} blocks ({self.hs} units x {self.bt}-row batch tiles, {self.nbg} batch group(s), W_ih and "
                f"W_hh slices resident, x W_ihᵀ of step t + 1 computed during step t's barrier), "
                f"{self.smem // 1024} KiB shared memory, config nt={self.nt} wm={self.wm} wn={self.wn} wk={self.wk} "
                f"nbg={self.nbg}"
            )
        if self.kind == CLUSTER:
            return (
                f"{self.grid} blocks in clusters of {self.nu} ({self.hs} units x a {self.bt}-row batch tile each, "
                f"{self.nbt} cluster(s) per recurrence, h exchanged in distributed shared memory), "
                f"{self.smem // 1024} KiB shared memory, config nt={self.nt} wm={self.wm} wn={self.wn} wk={self.wk}"
            )
        return (
            f"{self.grid} blocks ({self.hs} units x {self.bt}-row batch tiles, {self.nbg} batch group(s), "
            f"{-(-self.nbt // self.nbg)} tile(s) per block per step), {self.smem // 1024} KiB shared memory, "
            f"config nt={self.nt} wm={self.wm} wn={self.wn} wk={self.wk} nbg={self.nbg}"
        )


def element_bytes(dtype: torch.dtype) -> int:
    """Bytes of one operand element in the kernels (float32 runs as TF32 in 32-bit registers)."""
    if dtype in (torch.float16, torch.bfloat16):
        return 2
    if dtype == torch.float32:
        return 4
    raise ValueError(f"the persistent kernels take float16, bfloat16 or float32, got {dtype}")


def output_staging_bytes(hs: int, bt: int, eb: int) -> int:
    """Shared memory for one step's staged y (``hs x bt`` elements of ``eb`` bytes, padded to 16
    bytes) and workspace (``5 x hs x bt`` floats): csrc's ``output_staging_bytes``."""
    return -(-hs * bt * eb // 16) * 16 + 5 * hs * bt * 4


def make_layout(
    kind: str,
    nt: int,
    wm: int,
    wn: int,
    wk: int,
    nbg: int | None,
    batch: int,
    recurrences: int,
    hidden: int,
    dtype,
    input_size: int = 0,
) -> Layout:
    """The sizes of configuration ``(nt, wm, wn, wk, nbg)`` for a call (``csrc``'s ``make_layout``).
    The cluster kind runs one batch tile per cluster: its ``nbg`` is the number of batch tiles
    (pass ``None``). The FROM_INPUT kind needs ``input_size`` (csrc's ``add_input_projection``)."""
    if kind not in _ROWS_PER_WARP:
        raise ValueError(f"kind must be one of {tuple(_ROWS_PER_WARP)}, got {kind!r}")
    if nt not in (1, 4):
        raise ValueError(f"nt must be 1 or 4 (the compiled batch tile widths), got {nt}")
    if wm * wn * wk != WARPS or any(v <= 0 or v & (v - 1) for v in (wm, wn, wk)):
        raise ValueError(f"wm * wn * wk must be {WARPS} with powers of two, got {wm} * {wn} * {wk}")
    if kind == CLUSTER:
        bt = 8 * nt * wn
        if nbg not in (None, -(-batch // bt)):
            raise ValueError(f"the cluster kernel runs one batch tile per cluster: nbg must be None, got {nbg}")
        nbg = -(-batch // bt)
    if nbg < 1:
        raise ValueError(f"nbg must be >= 1, got {nbg}")
    eb = element_bytes(dtype)
    rows_a = _ROWS_PER_WARP[kind] * wm
    hs = rows_a // _ROWS_PER_UNIT[kind]
    bt = 8 * nt * wn
    k = 4 * hidden if kind == "backward" else hidden
    kp = padded_reduction(k, eb)
    lda = kp * eb + ROW_PAD_BYTES
    ldr = rows_a + 4
    smem = rows_a * lda + _STATE_TILES[kind] * bt * lda + wk * bt * ldr * 4
    if kind == CLUSTER:  # the step's y and workspace, staged
        smem += output_staging_bytes(hs, bt, eb)
    nu = -(-hidden // hs)
    nbt = -(-batch // bt)
    kpx = 0
    if kind == FROM_INPUT:  # the W_ih slice, one x tile, the projected gates of each tile
        if input_size <= 0:
            raise ValueError(f"the {FROM_INPUT} kind needs input_size > 0, got {input_size}")
        kpx = padded_reduction(input_size, eb)
        ldx = kpx * eb + ROW_PAD_BYTES
        smem += (rows_a + bt) * ldx + -(-nbt // nbg) * bt * rows_a * 4
    return Layout(kind, nt, wm, wn, wk, nbg, hs, bt, nu, nbt, kp, smem, recurrences * nbg * nu, kpx)


def estimated_step_cycles(layout: Layout, limits: DeviceLimits, dtype: torch.dtype, precise: bool = False) -> float:
    """A rough cost of one time step in SM cycles (an estimate to rank configurations).

    Per batch tile a warp runs ``ceil(k_steps / wk)`` k-steps, each bounded below by the latency
    of a dependent mma chain and above by issue of its ``MT x NT`` mma and ldmatrix; the SM's
    tensor pipes bound all warps of the blocks sharing it. Then the cell update, the tiles of a
    block in sequence, the first tile's L2 round trip and the barrier. The L2 traffic of all
    blocks reading their h (or dG) tiles is a second lower bound.
    """
    if layout.kind == CLUSTER:
        return _estimated_cluster_step_cycles(layout, limits, dtype, precise)
    eb = element_bytes(dtype)
    blocks_on_sm = -(-layout.grid // limits.sm_count)
    pointwise = -(-(layout.hs * layout.bt) // THREADS) * 160.0
    tile = _warp_tile_cycles(layout, dtype, precise, blocks_on_sm) + pointwise + 120.0
    tiles_per_block = -(-layout.nbt // layout.nbg)
    if layout.kind == FROM_INPUT:
        # The input tile's product and its reduction, counted in full: how much of it the
        # barrier's wait hides is what a measurement has to say.
        x_tile = _warp_tile_cycles(layout, dtype, precise, blocks_on_sm, layout.kpx) + pointwise + 120.0
        tile += x_tile
    compute = tiles_per_block * tile + 800.0 + 1200.0
    l2_bytes = layout.grid * tiles_per_block * layout.bt * (layout.kp + layout.kpx) * eb
    l2_cycles = l2_bytes / 3000.0  # ~5 TB/s at ~1.7 GHz
    return max(compute, l2_cycles)


def _warp_tile_cycles(
    layout: Layout, dtype: torch.dtype, precise: bool, blocks_on_sm: int, k: int | None = None
) -> float:
    """One batch tile's GEMM on one block (estimate): the longer of one warp's dependent mma chain
    and the SM's tensor pipes shared by ``blocks_on_sm`` blocks. ``k``: the padded reduction
    length (the layout's ``kp`` by default)."""
    eb = element_bytes(dtype)
    mt = _ROWS_PER_WARP[layout.kind] // 16
    k_steps = (layout.kp if k is None else k) * eb // K_STEP_BYTES
    ks_warp = -(-k_steps // layout.wk)
    mma_per_kstep = mt * layout.nt * (3 if precise else 1)
    ld_per_kstep = mt + max(1, layout.nt // 2)
    warp_cycles = ks_warp * max(24.0, 2.0 * mma_per_kstep + 1.0 * ld_per_kstep)
    pipe_cycles = blocks_on_sm * WARPS * ks_warp * mma_per_kstep * 4.0 / 4.0
    return max(warp_cycles, pipe_cycles)


def _estimated_cluster_step_cycles(layout: Layout, limits: DeviceLimits, dtype: torch.dtype, precise: bool) -> float:
    """The cluster kernel's step (estimate): one block per SM, one batch tile, the exchange of
    the block's h columns to the other ``nu - 1`` blocks (16-byte stores to distributed shared
    memory, ~32 bytes per cycle per SM) and the cluster barrier; clusters beyond what the device
    holds at once (at most ``sm_count // nu``) run in later waves, each a whole sequence."""
    eb = element_bytes(dtype)
    pointwise = -(-(layout.hs * layout.bt) // THREADS) * 160.0
    exchange = (layout.nu - 1) * layout.bt * layout.hs * eb / 32.0
    step = _warp_tile_cycles(layout, dtype, precise, 1) + pointwise + exchange + 120.0 + 500.0
    clusters = layout.grid // layout.nu
    waves = -(-clusters // max(1, limits.sm_count // layout.nu))
    return waves * step


def _parse_override(kind: str) -> tuple[int, ...] | None:
    text = getattr(config.current(), _OVERRIDE_FIELD[kind])
    if not text:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    fields = "nt,wm,wn,wk" if kind == CLUSTER else "nt,wm,wn,wk,nbg"
    if len(values) != fields.count(",") + 1:
        raise ValueError(f"{ENV_OVERRIDE[kind]} must be '{fields}', got {text!r}")
    return values + ((None,) if kind == CLUSTER else ())


def choose_config(
    kind: str,
    batch: int,
    recurrences: int,
    hidden: int,
    dtype: torch.dtype,
    limits: DeviceLimits,
    precise: bool = False,
    input_size: int = 0,
) -> Layout | str:
    """The configuration to launch for a call, or a sentence saying why none fits
    (``input_size``: the FROM_INPUT kind's)."""
    override = _parse_override(kind)
    if override is not None:
        layout = make_layout(kind, *override, batch, recurrences, hidden, dtype, input_size)
        reason = layout.why_not_fits(limits)
        if reason is not None:
            given = ",".join(str(v) for v in override if v is not None)
            raise ValueError(f"{ENV_OVERRIDE[kind]}={given} does not fit this call: {reason}")
        return layout
    if kind == CLUSTER:
        return _choose_cluster(batch, recurrences, hidden, dtype, limits, precise)
    return _choose(kind, batch, recurrences, hidden, dtype, limits, precise, input_size)


@functools.lru_cache(maxsize=1024)
def _choose_cluster(
    batch: int, recurrences: int, hidden: int, dtype: torch.dtype, limits: DeviceLimits, precise: bool
) -> Layout | str:
    if limits.max_cluster_blocks == 0:
        return f"thread-block clusters need compute capability 9.0 or newer, got {limits.capability}"
    best, best_key, fewest = None, None, None
    for nt, wm, wn, wk in warp_splits():
        layout = make_layout(CLUSTER, nt, wm, wn, wk, None, batch, recurrences, hidden, dtype)
        if layout.smem <= limits.smem_per_block and (fewest is None or layout.nu < fewest.nu):
            fewest = layout
        if not layout.fits(limits):
            continue
        key = (estimated_step_cycles(layout, limits, dtype, precise), layout.grid, layout.smem)
        if best_key is None or key < best_key:
            best, best_key = layout, key
    if best is not None:
        return best
    if fewest is None:
        return f"hidden size {hidden} does not fit the cluster kernel: no tile fits {limits.smem_per_block} bytes"
    return (
        f"hidden size {hidden} does not fit the cluster kernel: the widest W_hh slice that fits shared memory "
        f"({fewest.hs} units) needs clusters of {fewest.nu} blocks, the device forms at most {limits.max_cluster_blocks}"
    )


@functools.lru_cache(maxsize=1024)
def _choose(
    kind: str,
    batch: int,
    recurrences: int,
    hidden: int,
    dtype: torch.dtype,
    limits: DeviceLimits,
    precise: bool,
    input_size: int = 0,
) -> Layout | str:
    best, best_key = None, None
    smallest_smem, fewest_blocks = None, None  # for the message when nothing fits
    for nt, wm, wn, wk in warp_splits():
        base = make_layout(kind, nt, wm, wn, wk, 1, batch, recurrences, hidden, dtype, input_size)
        # The FROM_INPUT kind's shared memory shrinks with more batch groups (fewer projected
        # tiles per block): its smallest is at one tile per block.
        least = (
            base
            if kind != FROM_INPUT
            else make_layout(kind, nt, wm, wn, wk, base.nbt, batch, recurrences, hidden, dtype, input_size)
        )
        if smallest_smem is None or least.smem < smallest_smem:
            smallest_smem = least.smem
        if least.smem > limits.smem_per_block:
            continue
        if fewest_blocks is None or base.grid < fewest_blocks.grid:
            fewest_blocks = base
        # Only the numbers of tiles per block that differ are worth trying.
        for per_block in sorted({-(-base.nbt // g) for g in range(1, base.nbt + 1)}):
            nbg = -(-base.nbt // per_block)
            layout = make_layout(kind, nt, wm, wn, wk, nbg, batch, recurrences, hidden, dtype, input_size)
            if not layout.fits(limits):
                continue
            cost = estimated_step_cycles(layout, limits, dtype, precise)
            key = (cost, layout.grid, layout.smem)
            if best_key is None or key < best_key:
                best, best_key = layout, key
    if best is not None:
        return best
    if smallest_smem is not None and smallest_smem > limits.smem_per_block:
        return (
            f"hidden size {hidden} does not fit the {kind} kernel: its smallest tile needs {smallest_smem} bytes of "
            f"shared memory per block, the device allows {limits.smem_per_block}"
        )
    capacity = limits.sm_count * fewest_blocks.blocks_per_sm(limits)
    return (
        f"the {kind} kernel cannot keep {recurrences} recurrence(s) of hidden size {hidden} resident: its "
        f"smallest grid is {fewest_blocks.grid} blocks of {fewest_blocks.smem} bytes of shared memory, of which the "
        f"device holds {capacity} at once"
    )
