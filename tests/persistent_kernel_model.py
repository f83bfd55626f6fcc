"""A CPU model of the persistent LSTM kernels (``csrc/lstm_persistent_*.cu``), line by line.

The kernels were written without a GPU. This model runs their index arithmetic in float64 so the
tests can hold it against the reference op (:mod:`fusedconvlstm.cuda.persistent_cpu`):

- shared memory is addressed in bytes with the kernels' layout (W slice and h / dG tile in rows
  of ``lda`` bytes, then the fp32 partial sums); it starts as NaN, so a read of a byte the kernel
  never wrote (row padding, a missed chunk) poisons the result. Every ldmatrix / cp.async address
  is checked for 16-byte alignment and for staying inside its region and inside ``layout.smem``;
- ``ldmatrix`` gives lane ``l`` the 4-byte word ``l % 4`` of row ``l / 4`` of matrix ``i``, whose
  eight row addresses come from lanes ``8i .. 8i + 7`` (PTX ISA, ldmatrix);
- ``mma.sync`` rebuilds its A, B operands and scatters C with the fragment tables of the PTX ISA
  (m16n8k16 for 16-bit types, m16n8k8 for TF32), written here independently of the kernels'
  addressing (:func:`fragment_coords`; the tests check them against CUTLASS's cute layouts);
- global memory is flat arrays indexed with the kernels' pointer arithmetic, bounds-checked;
- blocks are generators that a seeded scheduler interleaves at random between their sync
  points; a cp.async copy lands at its issue or at its wait (random), and a block waiting at its
  group barrier resumes only once the counter reaches its target. A double-buffer hazard then
  shows up as a wrong result, a miscounted barrier as a deadlock.

Products are exact (no TF32 or bf16 rounding): the model checks where data goes, not rounding.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from fusedconvlstm.cuda.constants import CLUSTER_PREFETCH, K_STEP_BYTES, SYNC_STRIDE, THREADS
from fusedconvlstm.cuda.persistent_config import Layout, output_staging_bytes

WARPS = THREADS // 32


# ---------------------------------------------------------------------------------------------
# Warp-level instructions


def fragment_coords(words: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """PTX ISA fragment tables of ``mma.m16n8k16`` (``words == 2``: two 16-bit elements per
    32-bit register) and ``mma.m16n8k8 .tf32`` (``words == 1``), as index arrays.

    ``a``: (4 regs, 32 lanes, words) -> (row m, col k) of the 16 x K operand A;
    ``b``: (2 regs, 32 lanes, words) -> (k, n) of the K x 8 operand B;
    ``c``: (32 lanes, 4) -> (m, n) of the 16 x 8 accumulator.
    """
    lane = np.arange(32)[None, :, None]
    e = np.arange(words)[None, None, :]
    g, t = lane // 4, lane % 4
    reg_a = np.arange(4)[:, None, None]
    reg_b = np.arange(2)[:, None, None]
    a_row = g + 8 * (reg_a % 2) + 0 * e
    if words == 2:  # a0: (g, 2t..2t+1), a1: (g+8, ..), a2: (g, 2t+8..), a3: (g+8, 2t+8..)
        a_col = 2 * t + e + 8 * (reg_a // 2)
        b_k = 2 * t + e + 8 * reg_b  # b0: k = 2t..2t+1, b1: k = 2t+8..; n = g
    else:  # tf32: a0: (g, t), a1: (g+8, t), a2: (g, t+4), a3: (g+8, t+4); b0: k = t, b1: k = t+4
        a_col = t + 4 * (reg_a // 2) + 0 * e
        b_k = t + 4 * reg_b + 0 * e
    b_n = g + 0 * reg_b + 0 * e
    lane_c = np.arange(32)[:, None]
    i = np.arange(4)[None, :]
    c_row = lane_c // 4 + 8 * (i // 2)
    c_col = 2 * (lane_c % 4) + i % 2
    return {"a": (a_row, a_col), "b": (b_k, b_n), "c": (c_row, c_col)}


_FRAGMENTS = {w: fragment_coords(w) for w in (1, 2)}


def mma(acc: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """``acc (32, 4) += A B`` with A from registers ``a (4, 32, words)``, B from ``b (2, 32, words)``."""
    words = a.shape[-1]
    frag = _FRAGMENTS[words]
    k = 8 * words
    A = np.full((16, k), np.nan)
    A[frag["a"]] = a
    B = np.full((k, 8), np.nan)
    B[frag["b"]] = b
    acc += (A @ B)[frag["c"]]


class SharedMemory:
    """One block's dynamic shared memory: the operand region (W slice, then the h / dG tile) in
    elements of ``eb`` bytes, then the fp32 partial sums; byte offsets as in the kernels."""

    def __init__(self, layout: Layout, eb: int, rows_a: int, lda: int, ldr: int, tiles: int = 1):
        self.eb, self.lda = eb, lda
        self.tile_offset = rows_a * lda  # h_s / g_s (``tiles`` of them: 2 for the cluster kernel)
        self.red_offset = self.tile_offset + tiles * layout.bt * lda
        assert self.red_offset % 16 == 0, "the partial sums must start 16-byte aligned"
        self.nbytes = layout.smem
        red_bytes = layout.wk * layout.bt * ldr * 4
        assert self.red_offset + red_bytes <= self.nbytes, "the kernel addresses more than layout.smem"
        self.ops = np.full(self.red_offset // eb, np.nan)
        self.red = np.full(red_bytes // 4, np.nan)

    def ops_index(self, byte_offsets: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Element indices of byte offsets that must lie in the operand sub-region [lo, hi)."""
        byte_offsets = np.asarray(byte_offsets)
        assert np.all(byte_offsets % self.eb == 0), "misaligned element"
        assert np.all((byte_offsets >= lo) & (byte_offsets < hi)), "shared-memory access outside its region"
        return byte_offsets // self.eb

    def ldmatrix(self, addrs: np.ndarray, num: int) -> np.ndarray:
        """``ldmatrix.sync.aligned.m8n8.x{num}.shared.b16``: (num, 32 lanes, words) registers."""
        words = 4 // self.eb
        per_row = 16 // self.eb
        lane = np.arange(32)
        regs = np.empty((num, 32, words))
        for i in range(num):
            rows = np.asarray(addrs[8 * i : 8 * i + 8])
            assert np.all(rows % 16 == 0), "ldmatrix row address not 16-byte aligned"
            first = self.ops_index(rows, 0, self.red_offset)
            self.ops_index(rows + 16 - self.eb, 0, self.red_offset)
            mat = self.ops[first[:, None] + np.arange(per_row)]  # (8 rows, 16 bytes)
            regs[i] = mat[(lane // 4)[:, None], (lane % 4)[:, None] * words + np.arange(words)]
        return regs


def warp_mma(smem: SharedMemory, acc: np.ndarray, a_base: int, b_base: int, ks0: int, ks1: int) -> None:
    """Port of ``warp_mma`` (lstm_persistent.cuh): acc (MT, NT, 32, 4)."""
    MT, NT = acc.shape[:2]
    lda = ldb = smem.lda
    lane = np.arange(32)
    a_lane = a_base + (lane & 15) * lda + (lane >> 4) * 16
    b_lane = b_base + ((lane & 7) + ((lane >> 4) << 3)) * ldb + ((lane >> 3) & 1) * 16
    for ks in range(ks0, ks1):
        koff = ks * K_STEP_BYTES
        a = [smem.ldmatrix(a_lane + mt * 16 * lda + koff, 4) for mt in range(MT)]
        b = [None] * NT
        if NT == 1:
            b[0] = smem.ldmatrix((b_lane + koff)[:16], 2)  # .x2 reads the addresses of lanes 0-15
        else:
            for nt in range(0, NT, 2):
                r = smem.ldmatrix(b_lane + nt * 8 * ldb + koff, 4)
                b[nt], b[nt + 1] = r[0:2], r[2:4]
        for mt in range(MT):
            for nt in range(NT):
                mma(acc[mt, nt], a[mt], b[nt])


def tile_to_partial_sums(
    ops: SharedMemory, red: SharedMemory, warps, MT: int, NT: int, b_base: int, bt: int, ldr: int
) -> None:
    """Port of ``warp_tile_to_partial_sums`` for every warp of a block: A is the weight slice at
    the start of ``ops``, B the ``bt``-row tile at ``b_base`` (rows of ``ops.lda`` bytes); the
    partial sums go to ``red.red`` (``warps``: each warp's ``(m0, n0, wk, ks0, ks1)``)."""
    lda = ops.lda
    written = np.zeros(red.red.size, dtype=bool)
    for m0, n0, wk, ks0, ks1 in warps:
        acc = np.zeros((MT, NT, 32, 4))
        warp_mma(ops, acc, m0 * lda, b_base + n0 * lda, ks0, ks1)
        store_accumulators(red, wk * bt * ldr, ldr, acc, m0, n0, written)


def store_accumulators(
    smem: SharedMemory, red_warp: int, ldr: int, acc: np.ndarray, m0: int, n0: int, written: np.ndarray
) -> None:
    """Port of ``store_accumulators``; ``written`` flags each partial sum so two warps writing the
    same one in a tile is caught."""
    MT, NT = acc.shape[:2]
    lane = np.arange(32)[:, None]
    e = np.arange(4)[None, :]
    g, q = lane >> 2, lane & 3
    for mt in range(MT):
        for nt in range(NT):
            m = m0 + mt * 16 + g + (e >> 1) * 8
            n = n0 + nt * 8 + q * 2 + (e & 1)
            idx = red_warp + n * ldr + m
            assert np.all((idx >= 0) & (idx < smem.red.size)), "partial sum outside red"
            assert not written[idx].any(), "two stores to one partial sum in a tile"
            written[idx] = True
            smem.red[idx] = acc[mt, nt]


# ---------------------------------------------------------------------------------------------
# Global memory and the block scheduler


class Global:
    """A flat global buffer with bounds-checked element access (the kernels' pointer arithmetic)."""

    def __init__(self, array: np.ndarray):
        self.a = np.array(array, dtype=np.float64).reshape(-1)

    def _check(self, idx):
        idx = np.asarray(idx)
        assert np.all((idx >= 0) & (idx < self.a.size)), "global access out of bounds"
        return idx

    def __getitem__(self, idx):
        return self.a[self._check(idx)]

    def __setitem__(self, idx, value):
        self.a[self._check(idx)] = value


class AsyncCopy:
    """``load_rows_async``: rows [row0, row0 + rows) of a (rows_total x kp) global matrix into the
    tile region (rows of lda bytes), 16 bytes per copy, zeros past rows_total; lands now or at
    ``wait`` (``cp.async.wait_all``), chosen at random."""

    def __init__(
        self,
        smem: SharedMemory,
        src: Global,
        src_off: int,
        kp: int,
        row0: int,
        rows: int,
        rows_total: int,
        rng: np.random.Generator,
        dst_offset: int | None = None,
    ):
        eb = smem.eb
        chunks = kp * eb // 16
        idx = np.arange(rows * chunks)
        r, c = idx // chunks, idx % chunks
        row = row0 + r
        inside = row < rows_total
        g = src_off + np.where(inside, row, 0) * kp + c * (16 // eb)
        assert np.all((g * eb) % 16 == 0), "cp.async source not 16-byte aligned"
        dst = (smem.tile_offset if dst_offset is None else dst_offset) + r * smem.lda + c * 16
        assert np.all(dst % 16 == 0), "cp.async destination not 16-byte aligned"
        self.dst = smem.ops_index(dst[:, None] + eb * np.arange(16 // eb), smem.tile_offset, smem.red_offset)
        self.src = g[:, None] + np.arange(16 // eb)
        self.inside = inside[:, None]
        self.smem, self.global_ = smem, src
        self.done = False
        if rng.random() < 0.5:
            self.land()

    def land(self):
        if not self.done:
            self.smem.ops[self.dst] = np.where(self.inside, self.global_[self.src], 0.0)
            self.done = True


def run_blocks(blocks: list, counters: np.ndarray, rng: np.random.Generator) -> None:
    """Runs block generators interleaved at random. A generator yields ``None`` at a point where
    others may run, or ``(counter, target)`` to wait until ``counters[counter] >= target``."""
    waiting: dict[int, tuple[int, int]] = {}
    active = dict(enumerate(blocks))
    while active:
        ready = [b for b in active if b not in waiting or counters[waiting[b][0]] >= waiting[b][1]]
        assert ready, f"deadlock: every live block waits at its barrier ({waiting})"
        b = ready[rng.integers(len(ready))]
        waiting.pop(b, None)
        try:
            request = next(active[b])
        except StopIteration:
            del active[b]
            continue
        if request is not None:
            waiting[b] = request


# ---------------------------------------------------------------------------------------------
# The kernels


@dataclass
class Problem:
    """Sizes and launch configuration of one call, as the kernels see them."""

    T: int
    B: int
    D: int
    H: int
    eb: int  # operand element bytes: 2 (fp16 / bf16) or 4 (fp32 as TF32)
    layout: Layout
    lengths: np.ndarray | None
    reverse_mask: int
    I: int = 0  # noqa: E741 -- the input size of the kernel that projects the input itself

    def block_coords(self, bid: int) -> tuple[int, int, int]:
        lay = self.layout
        return bid % lay.nu, (bid // lay.nu) % lay.nbg, bid // (lay.nu * lay.nbg)

    def warp_split(self, warp: int, nks: int, rows_per_warp: int, nt: int):
        lay = self.layout
        wm, wn, wk = warp % lay.wm, (warp // lay.wm) % lay.wn, warp // (lay.wm * lay.wn)
        return wm * rows_per_warp, wn * 8 * nt, wk, wk * nks // lay.wk, (wk + 1) * nks // lay.wk


def _block_shape(p: Problem, rows_per_warp: int):
    lay = p.layout
    rows_a = rows_per_warp * lay.wm
    lda = lay.kp * p.eb + 16
    ldr = rows_a + 4
    return rows_a, lda, ldr


def tile_elements(hs: int, bt: int, j0: int, b0: int, H: int, B: int):
    """The kernels' cell-update loop over a tile: element ``idx = n * hs + jj`` is unit
    ``j = j0 + jj`` of batch row ``b = b0 + n``; those past ``H`` or ``B`` are skipped.
    Returns ``(idx, n, jj, j, b)`` of the rest."""
    idx = np.arange(hs * bt)
    n, jj = idx // hs, idx % hs
    j, b = j0 + jj, b0 + n
    keep = (j < H) & (b < B)
    return idx[keep], n[keep], jj[keep], j[keep], b[keep]


def load_gate_rows(
    smem: SharedMemory,
    p: Problem,
    mem: dict[str, Global],
    rows_a: int,
    lda: int,
    j0: int,
    d: int,
    name: str = "w",
    K: int | None = None,  # noqa: N803 -- the kernel's name
    kp: int | None = None,
):
    """Port of ``load_gate_rows``: the forward kernels' weight slice (``mem[name]``, 4H x K per
    recurrence: W_hh by default, W_ih with ``K = I``) into shared memory (padded to ``kp``)."""
    H, hs = p.H, p.layout.hs
    K = H if K is None else K
    kp = p.layout.kp if kp is None else kp
    idx = np.arange(rows_a * kp)
    m, k = idx // kp, idx % kp
    gate = m // hs
    j = j0 + (m - gate * hs)
    inside = (j < H) & (k < K)
    src = d * 4 * H * K + (gate * H + np.where(inside, j, 0)) * K + np.where(inside, k, 0)
    smem.ops[smem.ops_index(m * lda + k * p.eb, 0, smem.tile_offset)] = np.where(inside, mem[name][src], 0.0)


def _staging(smem: SharedMemory, bt: int, lda: int, rows: int, per_row: int) -> np.ndarray:
    """The staging of a step's outputs inside the h / dG tile region: a ``(rows, per_row)`` view
    of ``smem.ops``, one slot per staged value. The whole tile is NaN-poisoned first (nothing
    may read it as an operand again this step), and a copy that lands in the tile before the
    staged values are read back overwrites them, as it would in the kernel."""
    tile = smem.ops_index(smem.tile_offset + np.arange(0, bt * lda, smem.eb), 0, smem.red_offset)
    assert rows * per_row <= tile.size, "the staging does not fit the tile region"
    smem.ops[tile] = np.nan
    return smem.ops[tile[0] : tile[0] + rows * per_row].reshape(rows, per_row)


def forward_block(bid: int, p: Problem, mem: dict[str, Global], counters: np.ndarray, rng: np.random.Generator):
    """``lstm_persistent_forward_kernel`` for block ``bid`` (a generator, see :func:`run_blocks`)."""
    lay = p.layout
    MT, NT = 2, lay.nt
    u, bg, d = p.block_coords(bid)
    H, B, hs, bt, kp = p.H, p.B, lay.hs, lay.bt, lay.kp
    rows_a, lda, ldr = _block_shape(p, 16 * MT)
    assert rows_a == 4 * hs
    j0 = u * hs
    G = 4 * H
    smem = SharedMemory(lay, p.eb, rows_a, lda, ldr)
    load_gate_rows(smem, p, mem, rows_a, lda, j0, d)

    nks = kp * p.eb // K_STEP_BYTES
    warps = [p.warp_split(w, nks, 16 * MT, NT) for w in range(WARPS)]
    rev = bool((p.reverse_mask >> d) & 1)
    counter = (d * lay.nbg + bg) * SYNC_STRIDE
    buf_stride = p.D * B * kp

    # The kernel that projects the input itself (x in mem, no xg): after red, the W_ih slice and
    # one x tile (rows of ldx bytes: smem_x, its own operand region), then the projected gates
    # of the block's tiles (xproj[slot][n][m], fp32).
    from_input = "x" in mem
    if from_input:
        ldx = lay.kpx * p.eb + 16
        smem_x = SharedMemory(lay, p.eb, rows_a, ldx, ldr)
        xproj = np.full(lay.input_tiles * bt * rows_a, np.nan)
        assert smem.red_offset + smem.red.size * 4 + smem_x.red_offset + xproj.size * 4 == lay.smem, (
            "the kernel's shared memory is not the layout's"
        )
        load_gate_rows(smem_x, p, mem, rows_a, ldx, j0, d, "w_ih", p.I, lay.kpx)
        nksx = lay.kpx * p.eb // K_STEP_BYTES
        warps_x = [p.warp_split(w, nksx, 16 * MT, NT) for w in range(WARPS)]

    def project_inputs(step):
        """The kernel's ``project_inputs``: x_t W_ihᵀ + b of each of the block's tiles into xproj."""
        tt = p.T - 1 - step if rev else step
        x_t = tt * B * lay.kpx
        copy = AsyncCopy(smem_x, mem["x"], x_t, lay.kpx, bg * bt, bt, B, rng)
        for slot, tile in enumerate(range(bg, lay.nbt, lay.nbg)):
            copy.land()
            yield None
            tile_to_partial_sums(smem_x, smem, warps_x, MT, NT, smem_x.tile_offset, bt, ldr)
            yield None
            if tile + lay.nbg < lay.nbt:
                copy = AsyncCopy(smem_x, mem["x"], x_t, lay.kpx, (tile + lay.nbg) * bt, bt, B, rng)
            idx = np.arange(bt * rows_a)
            n, m = idx // rows_a, idx % rows_a
            gate = m // hs
            j = j0 + (m - gate * hs)
            a = smem.red[n * ldr + m].copy()
            for kw in range(1, lay.wk):
                a += smem.red[kw * bt * ldr + n * ldr + m]
            bias = np.where(j < H, mem["bias"][d * G + gate * H + np.minimum(j, H - 1)], 0.0)
            xproj[slot * bt * rows_a + idx] = a + bias

    tid = np.arange(THREADS)
    first_n, first_jj = tid // hs, tid % hs
    has_first = (tid < hs * bt) & (j0 + first_jj < H) & (bg * bt + first_n < B)
    x_first = np.zeros((THREADS, 4))

    def load_first_x(step):
        if from_input:
            return
        tt = p.T - 1 - step if rev else step
        row = (tt * B + bg * bt + first_n[has_first]) * p.D + d
        x_row = row * G + j0 + first_jj[has_first]
        for gt in range(4):
            x_first[has_first, gt] = mem["xg"][x_row + gt * H]

    load_first_x(0)
    if from_input:
        yield from project_inputs(0)
    # The last batch tile's y and workspace are staged in the h tile and stored after the arrive
    # (when the staging fits the tile region), as the kernel's store_deferred.
    last_tile = bg + (lay.nbt - 1 - bg) // lay.nbg * lay.nbg
    defer = ("y" in mem or "ws" in mem) and output_staging_bytes(hs, bt, p.eb) <= bt * lda
    deferred = None
    for s in range(p.T):
        t = p.T - 1 - s if rev else s
        h_prev = (s & 1) * buf_stride + d * B * kp
        h_next = ((s + 1) & 1) * buf_stride + d * B * kp
        copy = AsyncCopy(smem, mem["h_buf"], h_prev, kp, bg * bt, bt, B, rng)
        yield None
        for tile in range(bg, lay.nbt, lay.nbg):
            staged = defer and tile == last_tile
            copy.land()  # cp_async_wait_all + __syncthreads
            yield None
            tile_to_partial_sums(smem, smem, warps, MT, NT, smem.tile_offset, bt, ldr)
            if tile + lay.nbg < lay.nbt:
                copy = AsyncCopy(smem, mem["h_buf"], h_prev, kp, (tile + lay.nbg) * bt, bt, B, rng)

            b0 = tile * bt
            idx, n, jj, j, b = tile_elements(hs, bt, j0, b0, H, B)
            state = (d * B + b) * H + j
            row = (t * B + b) * p.D + d
            y_out = row * H + j
            ws_row = row * 5 * H + j
            h_out = h_next + b * kp + j
            valid = np.ones(b.shape, dtype=bool) if p.lengths is None else t < p.lengths[b]

            inv = ~valid
            mem["h_buf"][h_out[inv]] = mem["h_buf"][h_prev + b[inv] * kp + j[inv]]
            if staged:
                # The staging overwrites the h tile: nothing may read it again this step.
                staging = _staging(smem, bt, lda, 6, hs * bt)
                y_s, ws_s = staging[0], staging[1:]
                y_s[idx[inv]], ws_s[:, idx[inv]] = 0.0, 0.0
                deferred = (row.copy(), j.copy(), idx.copy(), y_s, ws_s)
            if "y" in mem and not staged:  # p.y null: only the final state is wanted
                mem["y"][y_out[inv]] = 0.0
            if "ws" in mem and not staged:
                for kk in range(5):
                    mem["ws"][ws_row[inv] + kk * H] = 0.0

            idx, n, jj, j, state, row, y_out, ws_row, h_out = (
                a[valid] for a in (idx, n, jj, j, state, row, y_out, ws_row, h_out)
            )
            x_row = row * G + j
            first = (tile == bg) & (idx < THREADS)  # idx == tid: each thread's first element
            assert from_input or np.all(has_first[idx[first]]), "a first element whose xg was not prefetched"
            r = n * ldr + jj
            pre = np.empty((4, idx.size))
            for gt in range(4):
                a = smem.red[r + gt * hs].copy()
                for kw in range(1, lay.wk):
                    a += smem.red[r + kw * bt * ldr + gt * hs]
                if from_input:
                    slot = (tile - bg) // lay.nbg
                    x = xproj[(slot * bt + n) * rows_a + gt * hs + jj]
                else:
                    x = mem["xg"][x_row + gt * H]
                    x[first] = x_first[idx[first], gt]
                pre[gt] = a + x
            i_g, f_g, g_g = 1 / (1 + np.exp(-pre[0])), 1 / (1 + np.exp(-pre[1])), np.tanh(pre[2])
            o_g = 1 / (1 + np.exp(-pre[3]))
            c_new = f_g * mem["c_state"][state] + i_g * g_g
            h_new = o_g * np.tanh(c_new)
            mem["c_state"][state] = c_new
            mem["h_buf"][h_out] = h_new
            if staged:
                deferred[3][idx] = h_new
                for kk, v in enumerate((i_g, f_g, g_g, o_g, c_new)):
                    deferred[4][kk, idx] = v
            else:
                if "y" in mem:
                    mem["y"][y_out] = h_new
                if "ws" in mem:
                    for kk, v in enumerate((i_g, f_g, g_g, o_g, c_new)):
                        mem["ws"][ws_row + kk * H] = v
            yield None
        if s + 1 < p.T:  # no barrier after the last step
            counters[counter] += 1  # barrier_arrive
            yield None
            load_first_x(s + 1)
            if defer and deferred is not None:
                store_staged(mem, H, *deferred)  # store_deferred
                yield None
            if from_input:
                yield from project_inputs(s + 1)
            yield (counter, (s + 1) * lay.nu)  # barrier_wait
        elif defer and deferred is not None:
            store_staged(mem, H, *deferred)


def store_staged(mem: dict[str, Global], H: int, row, j, idx, y_s, ws_s) -> None:
    """Port of the cluster kernel's ``store_staged``: a step's staged y and workspace (``y_s[idx]``,
    ``ws_s[k, idx]``) to global memory at rows ``row = (t, b, d)``, units ``j``."""
    if "y" in mem:
        mem["y"][row * H + j] = y_s[idx]
    if "ws" in mem:
        for kk in range(5):
            mem["ws"][row * 5 * H + kk * H + j] = ws_s[kk, idx]


def cluster_forward_block(
    bid: int,
    p: Problem,
    mem: dict[str, Global],
    smems: list[SharedMemory],
    counters: np.ndarray,
    rng: np.random.Generator,
    step_barrier: bool = True,
):
    """``lstm_cluster_forward_kernel`` for block ``bid``; ``smems`` holds every block's shared
    memory (the cluster's distributed shared memory) and ``counters[c]`` models cluster ``c``'s
    barrier. A store to another block lands at its issue or at the arrive (release) that publishes
    it, chosen at random; a missing or misplaced barrier then shows up as a wrong result
    (``step_barrier=False`` drops the per-step wait, for the test that the model notices)."""
    lay = p.layout
    MT, NT = 2, lay.nt
    u, tile, d = p.block_coords(bid)
    H, B, hs, bt, kp = p.H, p.B, lay.hs, lay.bt, lay.kp
    rows_a, lda, ldr = _block_shape(p, 16 * MT)
    j0, b0, G = u * hs, tile * bt, 4 * H
    smem = smems[bid]
    cluster = bid // lay.nu
    load_gate_rows(smem, p, mem, rows_a, lda, j0, d)
    buf = [smem.tile_offset, smem.tile_offset + bt * lda]
    smem.ops[buf[1] // p.eb : (buf[1] + bt * lda) // p.eb] = 0.0
    buf_stride = p.D * B * kp
    copy = AsyncCopy(smem, mem["h_buf"], d * B * kp, kp, b0, bt, B, rng, dst_offset=buf[0])

    nks = kp * p.eb // K_STEP_BYTES
    warps = [p.warp_split(w, nks, 16 * MT, NT) for w in range(WARPS)]
    rev = bool((p.reverse_mask >> d) & 1)
    send_chunks = (min(j0 + hs, kp) - j0) * p.eb // 16
    send_rows = min(bt, B - b0)

    # Each thread's first CLUSTER_PREFETCH elements (idx < CLUSTER_PREFETCH * THREADS) have their
    # xg loaded a step ahead.
    pre_idx = np.arange(CLUSTER_PREFETCH * THREADS)
    first_n, first_jj = pre_idx // hs, pre_idx % hs
    has_first = (pre_idx < hs * bt) & (j0 + first_jj < H) & (b0 + first_n < B)
    x_first = np.zeros((pre_idx.size, 4))

    def load_first_x(step):
        tt = p.T - 1 - step if rev else step
        row = (tt * B + b0 + first_n[has_first]) * p.D + d
        for gt in range(4):
            x_first[has_first, gt] = mem["xg"][row * G + j0 + first_jj[has_first] + gt * H]

    # Each thread's elements are the same at every step: their c and lengths stay in registers.
    elems = np.arange(hs * bt)
    e_n, e_j = elems // hs, j0 + elems % hs
    mine = (e_j < H) & (b0 + e_n < B)
    c_reg = np.zeros(hs * bt)
    c_reg[mine] = mem["c_state"][(d * B + b0 + e_n[mine]) * H + e_j[mine]]
    len_reg = np.full(hs * bt, p.T)
    if p.lengths is not None:
        len_reg[mine] = p.lengths[b0 + e_n[mine]]

    load_first_x(0)
    copy.land()
    counters[cluster] += 1  # cluster_arrive
    yield (cluster, lay.nu)  # cluster_wait: every block initialised
    for s in range(p.T):
        t = p.T - 1 - s if rev else s
        last = s + 1 == p.T
        cur, nxt = buf[s & 1], buf[(s + 1) & 1]
        tile_to_partial_sums(smem, smem, warps, MT, NT, cur, bt, ldr)
        yield None

        idx, n, jj, j, b = tile_elements(hs, bt, j0, b0, H, B)
        state = (d * B + b) * H + j
        row = (t * B + b) * p.D + d
        # The step's outputs are staged in shared memory (NaN: an element the loop misses shows)
        # and stored to global memory after the arrive: y_s[idx], ws_s[k, idx].
        y_s = np.full(hs * bt, np.nan)
        ws_s = np.full((5, hs * bt), np.nan)
        valid = t < len_reg[idx]
        h_new = np.empty(b.shape)
        inv = ~valid
        h_new[inv] = smem.ops[smem.ops_index(cur + n[inv] * lda + j[inv] * p.eb, cur, cur + bt * lda)]
        y_s[idx[inv]] = 0.0
        ws_s[:, idx[inv]] = 0.0
        v = valid
        first = idx[v] < CLUSTER_PREFETCH * THREADS
        assert np.all(has_first[idx[v][first]]), "a prefetched element whose xg was not loaded"
        r = n[v] * ldr + jj[v]
        pre = np.empty((4, int(v.sum())))
        for gt in range(4):
            a = smem.red[r + gt * hs].copy()
            for kw in range(1, lay.wk):
                a += smem.red[r + kw * bt * ldr + gt * hs]
            x = mem["xg"][row[v] * G + j[v] + gt * H]
            x[first] = x_first[idx[v][first], gt]
            pre[gt] = a + x
        i_g, f_g, g_g = 1 / (1 + np.exp(-pre[0])), 1 / (1 + np.exp(-pre[1])), np.tanh(pre[2])
        o_g = 1 / (1 + np.exp(-pre[3]))
        c_new = f_g * c_reg[idx[v]] + i_g * g_g
        h_new[v] = o_g * np.tanh(c_new)
        c_reg[idx[v]] = c_new
        y_s[idx[v]] = h_new[v]
        for kk, val in enumerate((i_g, f_g, g_g, o_g, c_new)):
            ws_s[kk, idx[v]] = val
        staged = (row, j, idx, y_s, ws_s)
        if last:
            mem["h_buf"][(p.T & 1) * buf_stride + d * B * kp + b * kp + j] = h_new
            mem["c_state"][state] = c_reg[idx]  # c_n, once
            yield None  # __syncthreads
            store_staged(mem, H, *staged)
            break
        smem.ops[smem.ops_index(nxt + n * lda + j * p.eb, nxt, nxt + bt * lda)] = h_new
        yield None  # __syncthreads: this block's columns of the next buffer and the staging complete

        deferred = []
        per_row = 16 // p.eb
        for peer in range(lay.nu):
            if peer == u:
                continue
            target = smems[cluster * lay.nu + peer]
            for nn in range(send_rows):
                for c in range(send_chunks):
                    off = nxt + nn * lda + j0 * p.eb + c * 16
                    assert off % 16 == 0, "a 16-byte cluster store off its alignment"
                    src = smem.ops_index(off + p.eb * np.arange(per_row), nxt, nxt + bt * lda)
                    dst = target.ops_index(off + p.eb * np.arange(per_row), nxt, nxt + bt * lda)
                    values = smem.ops[src].copy()
                    if rng.random() < 0.5:
                        target.ops[dst] = values
                    else:
                        deferred.append((target, dst, values))
        yield None
        for target, dst, values in deferred:  # cluster_arrive (release) publishes the stores
            target.ops[dst] = values
        counters[cluster] += 1
        yield None
        store_staged(mem, H, *staged)
        load_first_x(s + 1)
        yield (cluster, (s + 2) * lay.nu) if step_barrier else None  # cluster_wait


# How often the backward model took its deferred-store path (tests check that they exercise it).
DEFERRED_STORES: Counter = Counter()


def backward_block(bid: int, p: Problem, mem: dict[str, Global], counters: np.ndarray, rng: np.random.Generator):
    """``lstm_persistent_backward_kernel`` for block ``bid`` (a generator, see :func:`run_blocks`)."""
    lay = p.layout
    MT, NT = 1, lay.nt
    u, bg, d = p.block_coords(bid)
    H, B, hs, bt, kp = p.H, p.B, lay.hs, lay.bt, lay.kp
    rows_a, lda, ldr = _block_shape(p, 16 * MT)
    assert rows_a == hs
    j0 = u * hs
    G = 4 * H
    T = p.T
    smem = SharedMemory(lay, p.eb, rows_a, lda, ldr)

    idx = np.arange(rows_a * kp)
    k, jj = idx // hs, idx % hs
    j = j0 + jj
    inside = (j < H) & (k < G)
    src = d * G * H + np.where(inside, k, 0) * H + np.where(inside, j, 0)
    smem.ops[smem.ops_index(jj * lda + k * p.eb, 0, smem.tile_offset)] = np.where(inside, mem["w"][src], 0.0)

    nks = kp * p.eb // K_STEP_BYTES
    warps = [p.warp_split(w, nks, 16 * MT, NT) for w in range(WARPS)]
    rev = bool((p.reverse_mask >> d) & 1)
    counter = (d * lay.nbg + bg) * SYNC_STRIDE
    buf_stride = p.D * B * kp
    H5 = 5 * H

    def load_step_inputs(t, b, j):
        row = (t * B + b) * p.D + d
        ws_row = row * H5 + j
        out = {"grad_y": mem["grad_y"][row * H + j]}
        for kk, name in enumerate("ifgoc"):
            out[name] = mem["ws"][ws_row + kk * H]
        t_prev = t + 1 if rev else t - 1
        from_ws = np.full(b.shape, 0 <= t_prev < T)
        if from_ws.any() and rev and p.lengths is not None:
            from_ws = t_prev < p.lengths[b]
        c_prev = np.empty(b.shape)
        c_prev[from_ws] = mem["ws"][((t_prev * B + b[from_ws]) * p.D + d) * H5 + 4 * H + j[from_ws]]
        c_prev[~from_ws] = mem["c0"][(d * B + b[~from_ws]) * H + j[~from_ws]]
        out["c_prev"] = c_prev
        return out

    tid = np.arange(THREADS)
    first_n, first_jj = tid // hs, tid % hs
    has_first = (tid < hs * bt) & (j0 + first_jj < H) & (bg * bt + first_n < B)
    first_in: dict[str, np.ndarray] = {}

    def load_first(step):
        t = step if rev else T - 1 - step
        got = load_step_inputs(t, bg * bt + first_n[has_first], j0 + first_jj[has_first])
        for name, v in got.items():
            first_in.setdefault(name, np.full(THREADS, np.nan))[has_first] = v

    load_first(0)
    # The last batch tile's dG is staged in the dG tile and stored to dgates after the arrive
    # (the kernel's store_deferred); the exchange buffer gets it at once.
    last_tile = bg + (lay.nbt - 1 - bg) // lay.nbg * lay.nbg
    defer = 4 * hs * bt * p.eb <= bt * lda
    deferred = None
    for s in range(T + 1):
        last = s == T
        t = s if rev else T - 1 - s
        g_prev = (s & 1) * buf_stride + d * B * kp
        g_next = ((s + 1) & 1) * buf_stride + d * B * kp
        copy = AsyncCopy(smem, mem["g_buf"], g_prev, kp, bg * bt, bt, B, rng)
        yield None
        for tile in range(bg, lay.nbt, lay.nbg):
            staged = defer and tile == last_tile and not last
            copy.land()
            yield None
            tile_to_partial_sums(smem, smem, warps, MT, NT, smem.tile_offset, bt, ldr)
            if tile + lay.nbg < lay.nbt:
                copy = AsyncCopy(smem, mem["g_buf"], g_prev, kp, (tile + lay.nbg) * bt, bt, B, rng)

            b0 = tile * bt
            idx, n, jj, j, b = tile_elements(hs, bt, j0, b0, H, B)
            r = n * ldr + jj
            dh_rec = smem.red[r].copy()
            for kw in range(1, lay.wk):
                dh_rec += smem.red[r + kw * bt * ldr]
            state = (d * B + b) * H + j
            incoming = dh_rec + mem["dh_carry"][state]
            if last:
                mem["dh_carry"][state] = incoming
                yield None
                continue
            row = (t * B + b) * p.D + d
            dg = row * G + j
            g_out = g_next + b * kp + j
            valid = np.ones(b.shape, dtype=bool) if p.lengths is None else t < p.lengths[b]

            inv = ~valid
            mem["dh_carry"][state[inv]] = incoming[inv]
            if staged:
                # The staging overwrites the dG tile: nothing may read it again this step.
                dg_s = _staging(smem, bt, lda, 4, hs * bt)
                dg_s[:, idx[inv]] = 0.0
                deferred = (row.copy(), j.copy(), idx.copy(), dg_s)
            for gt in range(4):
                if not staged:
                    mem["dgates"][dg[inv] + gt * H] = 0.0
                mem["g_buf"][g_out[inv] + gt * H] = 0.0

            idx, b, j, state, dg, g_out, incoming = (a[valid] for a in (idx, b, j, state, dg, g_out, incoming))
            first = (tile == bg) & (idx < THREADS)
            assert np.all(has_first[idx[first]]), "a first element whose inputs were not prefetched"
            inp = load_step_inputs(t, b, j)
            for name in inp:
                inp[name][first] = first_in[name][idx[first]]
            i_g, f_g, g_g, o_g, c, c_prev = (inp[name] for name in ("i", "f", "g", "o", "c", "c_prev"))
            dh = incoming + inp["grad_y"]
            tc = np.tanh(c)
            dc_t = mem["dc"][state] + dh * o_g * (1 - tc * tc)
            grads = (
                dc_t * g_g * i_g * (1 - i_g),
                dc_t * c_prev * f_g * (1 - f_g),
                dc_t * i_g * (1 - g_g * g_g),
                dh * tc * o_g * (1 - o_g),
            )
            for gt in range(4):
                if staged:
                    deferred[3][gt, idx] = grads[gt]
                else:
                    mem["dgates"][dg + gt * H] = grads[gt]
                mem["g_buf"][g_out + gt * H] = grads[gt]
            mem["dc"][state] = dc_t * f_g
            mem["dh_carry"][state] = 0.0
            yield None
        if not last:
            counters[counter] += 1
            yield None
            if s + 1 < T:
                load_first(s + 1)
            if defer and deferred is not None:  # store_deferred
                DEFERRED_STORES["backward"] += 1
                d_row, d_j, d_idx, dg_s = deferred
                for gt in range(4):
                    mem["dgates"][d_row * G + d_j + gt * H] = dg_s[gt, d_idx]
                deferred = None
                yield None
            yield (counter, (s + 1) * lay.nu)


# ---------------------------------------------------------------------------------------------
# Drivers: the ops' buffer contracts


def _forward_memory(p: Problem, xg, w_hh, h0, c0, save_workspace: bool, write_y: bool) -> dict[str, Global]:
    """The forward ops' global buffers: inputs, ``h_buf`` holding ``h0``, NaN-poisoned outputs
    (no ``y`` without ``write_y``, no ``ws`` without ``save_workspace``: the null pointers)."""
    T, B, D, H = p.T, p.B, p.D, p.H
    h_buf = np.zeros((2, D, B, p.layout.kp))
    h_buf[0, :, :, :H] = h0
    mem = {
        "xg": Global(xg),
        "w": Global(w_hh),
        "h_buf": Global(h_buf),
        "c_state": Global(c0),
    }
    if write_y:
        mem["y"] = Global(np.full((T, B, D, H), np.nan))
    if save_workspace:
        mem["ws"] = Global(np.full((T, B, D, 5 * H), np.nan))
    return mem


def _forward_results(p: Problem, mem: dict[str, Global]):
    T, B, D, H = p.T, p.B, p.D, p.H
    h_buf = mem["h_buf"].a.reshape(2, D, B, p.layout.kp)
    assert np.all(h_buf[..., H:] == 0), "the padding of h_buf must stay zero"
    ws = mem["ws"].a.reshape(T, B, D, 5 * H) if "ws" in mem else None
    y = mem["y"].a.reshape(T, B, D, H) if "y" in mem else None
    return y, h_buf[T % 2, :, :, :H], mem["c_state"].a.reshape(D, B, H), ws


def run_forward(p: Problem, xg, w_hh, h0, c0, seed: int, save_workspace: bool = True, write_y: bool = True):
    """The forward op on the model: ``(y or None, h_n, c_n, workspace or None)`` as numpy arrays.

    ``xg (T, B, D, 4H)``, ``w_hh (D, 4H, H)``, ``h0``, ``c0 (D, B, H)``.
    """
    mem = _forward_memory(p, xg, w_hh, h0, c0, save_workspace, write_y)
    rng = np.random.default_rng(seed)
    counters = np.zeros(p.D * p.layout.nbg * SYNC_STRIDE, dtype=np.int64)
    run_blocks([forward_block(b, p, mem, counters, rng) for b in range(p.layout.grid)], counters, rng)
    return _forward_results(p, mem)


def run_forward_from_input(p: Problem, x, w_ih, bias, w_hh, h0, c0, seed: int, save_workspace: bool = True):
    """The forward op that projects the input itself, on the model, as :func:`run_forward`:
    ``x (T, B, kpx)`` (zeros in the padding), ``w_ih (D, 4H, I)``, ``bias (D, 4H)``."""
    mem = _forward_memory(p, np.zeros(1), w_hh, h0, c0, save_workspace, True)
    del mem["xg"]
    mem.update(x=Global(x), w_ih=Global(w_ih), bias=Global(bias))
    rng = np.random.default_rng(seed)
    counters = np.zeros(p.D * p.layout.nbg * SYNC_STRIDE, dtype=np.int64)
    run_blocks([forward_block(b, p, mem, counters, rng) for b in range(p.layout.grid)], counters, rng)
    return _forward_results(p, mem)


def run_cluster_forward(
    p: Problem,
    xg,
    w_hh,
    h0,
    c0,
    seed: int,
    save_workspace: bool = True,
    step_barrier: bool = True,
    write_y: bool = True,
):
    """The cluster forward op on the model, as :func:`run_forward`."""
    lay = p.layout
    mem = _forward_memory(p, xg, w_hh, h0, c0, save_workspace, write_y)
    rows_a, lda, ldr = _block_shape(p, 32)
    smems = [SharedMemory(lay, p.eb, rows_a, lda, ldr, tiles=2) for _ in range(lay.grid)]
    rng = np.random.default_rng(seed)
    assert lay.grid % lay.nu == 0, "the grid must be whole clusters"
    counters = np.zeros(lay.grid // lay.nu, dtype=np.int64)
    blocks = [cluster_forward_block(b, p, mem, smems, counters, rng, step_barrier) for b in range(lay.grid)]
    run_blocks(blocks, counters, rng)
    return _forward_results(p, mem)


def run_backward(p: Problem, grad_y, workspace, c0, w_hh, grad_h_n, grad_c_n, seed: int):
    """The backward op on the model: ``(dgates, grad_h0, grad_c0)`` as numpy arrays."""
    T, B, D, H, kp = p.T, p.B, p.D, p.H, p.layout.kp
    mem = {
        "grad_y": Global(grad_y),
        "ws": Global(workspace),
        "c0": Global(c0),
        "w": Global(w_hh),
        "dh_carry": Global(grad_h_n),
        "dc": Global(grad_c_n),
        "dgates": Global(np.full((T, B, D, 4 * H), np.nan)),
        "g_buf": Global(np.zeros((2, D, B, kp))),
    }
    rng = np.random.default_rng(seed)
    counters = np.zeros(D * p.layout.nbg * SYNC_STRIDE, dtype=np.int64)
    run_blocks([backward_block(b, p, mem, counters, rng) for b in range(p.layout.grid)], counters, rng)
    g_buf = mem["g_buf"].a.reshape(2, D, B, kp)
    assert np.all(g_buf[..., 4 * H :] == 0), "the padding of g_buf must stay zero"
    return (
        mem["dgates"].a.reshape(T, B, D, 4 * H),
        mem["dh_carry"].a.reshape(D, B, H),
        mem["dc"].a.reshape(D, B, H),
    )
