// Building blocks of the persistent LSTM kernels (lstm_persistent_forward.cu,
// lstm_persistent_backward.cu): warp-level tensor-core GEMM on shared-memory tiles, async tile
// loads, the per-group spin barrier and the launch configuration both kernels share.
//
// The contract of the two ops (argument layouts, what each buffer holds before and after) is in
// fusedconvlstm/cuda/persistent_ops.py; the launch configuration is chosen in Python
// (fusedconvlstm/cuda/persistent_config.py, which mirrors shared_memory_bytes() below) and
// checked here.
//
// Tile conventions. One "k-step" is 32 bytes of the reduction axis: 16 elements of a 16-bit
// type (mma.m16n8k16) or 8 floats (mma.m16n8k8 with TF32 operands). Operand A (M x K) and
// operand B stored as N x K are both K-contiguous rows in shared memory with a row stride of
// (padded K bytes + 16): the extra 16 bytes shift consecutive rows by four banks, so the eight
// 16-byte row reads of one ldmatrix phase hit distinct banks. The same ldmatrix addressing serves
// both element widths: for 32-bit data an 8x8 b16 matrix is an 8x4 float matrix, and the b16
// pair a thread receives is exactly the float the TF32 fragment layout assigns to it.
#pragma once

#include "common.cuh"
#include "lstm_constants.h"  // kThreads, kKStepBytes, kSyncStride, ...: generated from Python

#include <cstdlib>
#include <type_traits>

namespace fusedconvlstm {
namespace persistent {

constexpr int kWarps = kThreads / 32;
// The barrier watchdog, off by default: a correct kernel can wait at a barrier for any length of
// time (under compute-sanitizer, a debugger's breakpoint, a GPU time-shared with other
// processes), and a trap poisons the CUDA context of the whole process, so no finite default is
// safe. FUSEDCONVLSTM_BARRIER_TIMEOUT_S=<seconds> turns it on: a group barrier that waits longer
// then means co-residency broke (it cannot in a cooperative launch) or a bug, and the kernel traps
// instead of hanging (for test runs that must end).
constexpr unsigned long long kWatchdogNs = 0;
constexpr const char* kWatchdogEnv = "FUSEDCONVLSTM_BARRIER_TIMEOUT_S";
// How the barrier polls, a switch for GPU measurement (off until measured): 0 (default) polls
// with an acquire load each time; FUSEDCONVLSTM_BARRIER_POLL_NS=<ns> polls with relaxed loads,
// sleeping <ns> (__nanosleep) between polls, and orders the observed arrival with one fence.
constexpr const char* kPollEnv = "FUSEDCONVLSTM_BARRIER_POLL_NS";
constexpr unsigned kMaxPollNs = 1000000;  // __nanosleep's own limit is about 1 ms

// Launch configuration: per-warp tile MT x NT mma tiles (MT fixed per kernel, NT a template
// parameter), warps split as wm (rows) x wn (batch columns) x wk (reduction), the batch split
// into nbg groups of tiles, each group of blocks synchronising on its own barrier.
struct Config {
  int nt, wm, wn, wk, nbg;
};

// Sizes derived from a configuration: units per block (hs), batch rows per tile (bt), blocks per
// group (nu), batch tiles (nbt), padded reduction length (kp, elements), smem bytes.
// kpx, ldx: the padded input length and row stride of the kernel that computes the input
// projection itself (add_input_projection; zero otherwise).
// smem is 64-bit: at large H it exceeds 2^31 (and must then fail the device's limit check, not
// wrap around to a size that passes it); every other field of a layout that fits is small.
struct Layout {
  int hs, bt, nu, nbt, kp, lda, rows_a, ldr;
  int64_t smem;
  int grid;
  int kpx, ldx;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// m_rows_per_warp: 32 for the forward (two m16 tiles: 8 units x 4 gates), 16 for the backward
// (one m16 tile of units). rows_per_unit: 4 for the forward (gates), 1 for the backward.
// The staging of one step's outputs in shared memory, stored to global memory after the
// barrier's arrive (the cluster kernel's own area; the cooperative kernel's h tile, for its last
// batch tile): y (hs x bt elements, padded to 16 bytes), then the workspace (5 x hs x bt floats).
__host__ __device__ inline int64_t output_staging_bytes(int64_t hs, int64_t bt, int64_t elem_bytes) {
  return (hs * bt * elem_bytes + 15) / 16 * 16 + 5 * hs * bt * 4;
}

// h_tiles: batch tiles of the exchanged state held in shared memory: 1, or 2 for the cluster
// kernel's double buffer (which also stages its outputs).
inline Layout make_layout(const Config& c, int64_t B, int64_t D, int64_t H, int64_t K, int elem_bytes,
                          int m_rows_per_warp, int rows_per_unit, int h_tiles = 1) {
  Layout l;
  l.rows_a = m_rows_per_warp * c.wm;
  l.hs = l.rows_a / rows_per_unit;
  l.bt = 8 * c.nt * c.wn;
  l.nu = static_cast<int>((H + l.hs - 1) / l.hs);
  l.nbt = static_cast<int>((B + l.bt - 1) / l.bt);
  l.kp = static_cast<int>(round_up(K, kKStepBytes / elem_bytes));
  l.lda = l.kp * elem_bytes + kRowPadBytes;
  l.ldr = l.rows_a + 4;  // 4 floats of padding: see store_accumulators
  l.smem = int64_t(l.rows_a) * l.lda + int64_t(h_tiles) * l.bt * l.lda + int64_t(c.wk) * l.bt * l.ldr * 4;
  if (h_tiles == 2) l.smem += output_staging_bytes(l.hs, l.bt, elem_bytes);
  l.grid = static_cast<int>(D * c.nbg * l.nu);
  l.kpx = l.ldx = 0;
  return l;
}

// The forward that computes the input projection x W_ihᵀ itself: after the layout above, the
// W_ih slice (rows_a rows of ldx bytes, resident), one x tile (bt rows) and the projected gates
// of each of the block's batch tiles (fp32, [tile][n][m], rows_a per batch row), which a step's
// cell update reads and the wait at the previous step's barrier fills.
__host__ __device__ inline int input_projection_tiles(const Layout& l, const Config& c) {
  return (l.nbt + c.nbg - 1) / c.nbg;
}

inline void add_input_projection(Layout& l, const Config& c, int64_t I, int elem_bytes) {
  l.kpx = static_cast<int>(round_up(I, kKStepBytes / elem_bytes));
  l.ldx = l.kpx * elem_bytes + kRowPadBytes;
  l.smem += int64_t(l.rows_a + l.bt) * l.ldx + int64_t(input_projection_tiles(l, c)) * l.bt * l.rows_a * 4;
}

// ---------------------------------------------------------------------------------------------
// Device helpers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t& r0, uint32_t& r1, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(addr));
}

// 16-byte global -> shared copy that bypasses L1 (.cg): the source rows were written by other
// blocks since this SM last read them, and L1 is not coherent across SMs. src_bytes = 0 fills
// the 16 bytes with zeros (rows past the batch).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

template <typename T>
struct MmaOp;

template <>
struct MmaOp<__nv_bfloat16> {
  __device__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct MmaOp<__half> {
  __device__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct MmaOp<float> {  // TF32 operands (bit patterns already rounded by to_tf32), fp32 accumulation
  __device__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Round-to-nearest TF32 (the mma itself would truncate the low mantissa bits).
__device__ __forceinline__ uint32_t to_tf32(uint32_t x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(__uint_as_float(x)));
  return r;
}

// x = big + small with both TF32: the "3xTF32" split that recovers ~fp32 accuracy.
__device__ __forceinline__ void split_tf32(uint32_t x, uint32_t& big, uint32_t& small) {
  big = to_tf32(x);
  small = to_tf32(__float_as_uint(__uint_as_float(x) - __uint_as_float(big)));
}

// acc[mt][nt] += A[rows a_base + 16 mt ..] . B[rows b_base + 8 nt ..]^T over k-steps [ks0, ks1).
// a_base / b_base: shared addresses of the warp's first A row and first B row (k = 0).
// For float, `precise` selects 3xTF32 (~fp32 accuracy, three mma per tile) over plain TF32.
template <typename T, int MT, int NT>
__device__ __forceinline__ void warp_mma(float (&acc)[MT][NT][4], uint32_t a_base, int lda, uint32_t b_base, int ldb,
                                         int ks0, int ks1, int lane, bool precise) {
  static_assert(NT == 1 || NT % 2 == 0, "NT must be 1 or even (B fragments load two n-tiles at a time)");
  // ldmatrix.x4 for A: lanes 0-15 give rows 0-15 of the first 16 bytes of the k-step, lanes
  // 16-31 the same rows 16 bytes further: registers come back as a0 (rows 0-7, low k),
  // a1 (rows 8-15, low k), a2 (rows 0-7, high k), a3 (rows 8-15, high k).
  const uint32_t a_lane = a_base + (lane & 15) * lda + (lane >> 4) * 16;
  // ldmatrix for B (stored N x K): lanes 0-7 rows n 0-7 low k, 8-15 the same rows high k
  // (b0, b1); with .x4, lanes 16-31 the next n-tile.
  const uint32_t b_lane = b_base + ((lane & 7) + ((lane >> 4) << 3)) * ldb + ((lane >> 3) & 1) * 16;
#pragma unroll 2
  for (int ks = ks0; ks < ks1; ++ks) {
    const uint32_t koff = ks * kKStepBytes;
    uint32_t a[MT][4];
    uint32_t b[NT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3], a_lane + mt * 16 * lda + koff);
    if constexpr (NT == 1) {
      ldmatrix_x2(b[0][0], b[0][1], b_lane + koff);
    } else {
#pragma unroll
      for (int nt = 0; nt < NT; nt += 2)
        ldmatrix_x4(b[nt][0], b[nt][1], b[nt + 1][0], b[nt + 1][1], b_lane + nt * 8 * ldb + koff);
    }
    if constexpr (std::is_same_v<T, float>) {
      if (precise) {
        uint32_t a_small[MT][4], b_small[NT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int q = 0; q < 4; ++q) split_tf32(a[mt][q], a[mt][q], a_small[mt][q]);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int q = 0; q < 2; ++q) split_tf32(b[nt][q], b[nt][q], b_small[nt][q]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            // small products first: they are the ones the big product would absorb
            MmaOp<float>::run(acc[mt][nt], a_small[mt], b[nt][0], b[nt][1]);
            MmaOp<float>::run(acc[mt][nt], a[mt], b_small[nt][0], b_small[nt][1]);
            MmaOp<float>::run(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
          }
        continue;
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int q = 0; q < 4; ++q) a[mt][q] = to_tf32(a[mt][q]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int q = 0; q < 2; ++q) b[nt][q] = to_tf32(b[nt][q]);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) MmaOp<T>::run(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
  }
}

// Accumulator fragments -> red[n][m] (fp32, row stride ldr = rows + 4). Thread (g = lane/4,
// q = lane%4) holds rows g and g + 8, columns 2q and 2q + 1 of each 16x8 tile. With ldr = 4 mod 32
// (rows is a multiple of 32 in the forward) or 20 mod 32 (16 mod 32 in the backward), the 32
// stores of one instruction fall in distinct banks (8q + g).
template <int MT, int NT>
__device__ __forceinline__ void store_accumulators(float* red, int ldr, const float (&acc)[MT][NT][4], int m0, int n0,
                                                   int lane) {
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + mt * 16 + g + (e >> 1) * 8;
        const int n = n0 + nt * 8 + q * 2 + (e & 1);
        red[n * ldr + m] = acc[mt][nt][e];
      }
}

// One batch tile's partial products of a warp: acc = A . B^T over k-steps [ks0, ks1) (see
// warp_mma), stored to the warp's slice of the fp32 partial sums (see store_accumulators).
template <typename T, int MT, int NT>
__device__ __forceinline__ void warp_tile_to_partial_sums(float* red_warp, int ldr, uint32_t a_base, uint32_t b_base,
                                                          int lda, int ks0, int ks1, int m0, int n0, int lane,
                                                          bool precise) {
  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
  warp_mma<T, MT, NT>(acc, a_base, lda, b_base, lda, ks0, ks1, lane, precise);
  store_accumulators<MT, NT>(red_warp, ldr, acc, m0, n0, lane);
}

// Rows [row0, row0 + rows) of a (rows_total x kp) global matrix into shared memory (row stride
// lda bytes) with 16-byte async copies; rows past rows_total are zero-filled. One commit group.
template <typename T>
__device__ __forceinline__ void load_rows_async(unsigned char* dst, int lda, const T* src, int kp, int row0, int rows,
                                                int rows_total) {
  const int chunks = kp * static_cast<int>(sizeof(T)) / 16;
  for (int idx = threadIdx.x; idx < rows * chunks; idx += kThreads) {
    const int r = idx / chunks, c = idx - r * chunks;
    const int row = row0 + r;
    const bool inside = row < rows_total;
    const T* g = src + static_cast<int64_t>(inside ? row : 0) * kp + c * (16 / static_cast<int>(sizeof(T)));
    cp_async_16(smem_addr(dst + r * lda + c * 16), g, inside ? 16 : 0);
  }
  cp_async_commit();
}

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned ld_relaxed(const unsigned* p) {
  unsigned v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}

// Thread-block cluster primitives (sm_90): the address of the same shared-memory byte in block
// `rank` of the cluster, a 16-byte store there, and the cluster barrier split into its arrive
// (release: this thread's shared-memory writes, local and remote, become visible to the cluster)
// and its wait (acquire). Every thread of every block of the cluster takes part in the barrier, so
// it also orders the threads of one block. Only the cluster kernel calls them, and its body is
// compiled for sm_90 and newer only.
__device__ __forceinline__ uint32_t map_shared_to_rank(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
__device__ __forceinline__ void st_cluster_16(uint32_t addr, const uint4& v) {
  asm volatile("st.shared::cluster.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
               : "memory");
}
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }

// Barrier of the blocks that exchange state (one recurrence, one batch group), split in two so
// that a block can load the next step's inputs between announcing its arrival and waiting for
// the others. The counter is monotonic, so it never needs resetting inside the launch; after
// step s it reaches (s + 1) * blocks. The __syncthreads + __threadfence before the increment
// publish every write of this block (the same protocol as cooperative groups' grid sync);
// readers then load the exchanged rows through L2 (cp.async.cg / __ldcg), never from a stale L1
// line. Thread 0 issues nothing between its fence and its increment, so its own loads of the
// next step's inputs (issued after barrier_arrive) never delay the arrival.
__device__ __forceinline__ void barrier_arrive(unsigned* counter) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(counter, 1u);
  }
}

// With poll_ns != 0 thread 0 polls with relaxed loads and sleeps poll_ns between polls; the
// __threadfence after the loop then makes the observed arrival an acquire (fence-based
// synchronization with the arrivals' fence + atomicAdd), so the exchanged rows are read after it.
__device__ __forceinline__ void barrier_wait(unsigned* counter, unsigned target, int step,
                                             unsigned long long watchdog_ns, unsigned poll_ns) {
  if (threadIdx.x == 0) {
    auto arrived = [&]() { return (poll_ns == 0 ? ld_acquire(counter) : ld_relaxed(counter)) >= target; };
    if (!arrived()) {
      const unsigned long long start = global_timer_ns();
      while (!arrived()) {
        if (poll_ns != 0) __nanosleep(poll_ns);
        if (watchdog_ns != 0 && global_timer_ns() - start > watchdog_ns) {
          printf("fusedconvlstm persistent LSTM: block %d waited more than %llu ns at the barrier of step %d "
                 "(counter %u, target %u); trapping instead of hanging (FUSEDCONVLSTM_BARRIER_TIMEOUT_S)\n",
                 blockIdx.x, watchdog_ns, step, ld_acquire(counter), target);
          __trap();
        }
      }
    }
    __threadfence();
  }
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ T zero_value() {
  return FromFloat<T>::cvt(0.0f);
}

// The forward kernels' weight slices: rows gate * H + j0 + unit of recurrence d's weights (w_d,
// 4H x K: W_hh with K = H, W_ih with K = the input size) -> shared row gate * hs + unit (rows of
// lda bytes); zero rows past H and zero columns past K, so padded units produce finite junk that
// is never stored and padded k contributes nothing.
template <typename T>
__device__ __forceinline__ void load_gate_rows(unsigned char* w_s, int lda, const T* w_d, int rows_a, int kp, int hs,
                                               int j0, int H, int K) {
  for (int idx = threadIdx.x; idx < rows_a * kp; idx += kThreads) {
    const int m = idx / kp, k = idx - m * kp;
    const int gate = m / hs, j = j0 + (m - gate * hs);
    T v = zero_value<T>();
    if (j < H && k < K) v = w_d[(static_cast<int64_t>(gate) * H + j) * K + k];
    reinterpret_cast<T*>(w_s + m * lda)[k] = v;
  }
}

// The forward cell update of one (unit, batch row) from its four gate pre-activations: the
// gates and the new c (fp32), as the step-wise cell kernel computes them.
struct CellState {
  float i, f, g, o, c;
};

__device__ __forceinline__ CellState lstm_cell_update(const float (&pre)[4], float c_prev) {
  CellState s;
  s.i = sigmoid(pre[0]);
  s.f = sigmoid(pre[1]);
  s.g = tanhf(pre[2]);
  s.o = sigmoid(pre[3]);
  s.c = s.f * c_prev + s.i * s.g;
  return s;
}

// The four gate values of xg for (row = (t, b, d), unit j): xg is (T, B, D, 4H).
template <typename T>
__device__ __forceinline__ void load_gate_x(float (&x)[4], const T* xg, int64_t row, int j, int H) {
  const T* x_row = xg + row * 4 * static_cast<int64_t>(H) + j;
#pragma unroll
  for (int gate = 0; gate < 4; ++gate) x[gate] = to_float(x_row[gate * H]);
}

// One step's workspace entry [i, f, g, o, c] (stride H); null when the forward saves nothing.
__device__ __forceinline__ void store_cell_workspace(float* ws_row, int H, const CellState& s) {
  if (ws_row == nullptr) return;
  ws_row[0] = s.i;
  ws_row[H] = s.f;
  ws_row[2 * H] = s.g;
  ws_row[3 * H] = s.o;
  ws_row[4 * H] = s.c;
}

__device__ __forceinline__ void zero_cell_workspace(float* ws_row, int H) {
  if (ws_row == nullptr) return;
#pragma unroll
  for (int k = 0; k < 5; ++k) ws_row[k * H] = 0.0f;
}

// The four gate pre-activations of (unit jj, batch column n): the wk partial sums of red added
// in a fixed order (bitwise reproducible), plus x (the gate's xg value).
__device__ __forceinline__ void gate_preactivations(float (&pre)[4], const float* red, int n, int jj, int ldr, int hs,
                                                    int bt, int wk, const float (&x)[4]) {
  const float* r = red + n * ldr + jj;
#pragma unroll
  for (int gate = 0; gate < 4; ++gate) {
    float a = r[gate * hs];
    for (int kw = 1; kw < wk; ++kw) a += r[kw * bt * ldr + gate * hs];
    pre[gate] = a + x[gate];
  }
}

// ---------------------------------------------------------------------------------------------
// Host helpers

// Kernel-independent checks of a configuration (the shapes are checked by each op).
inline void check_config(const Config& c, const char* op) {
  STD_TORCH_CHECK(c.nt == 1 || c.nt == 4, op, ": nt must be 1 or 4 (the compiled batch tile widths), got ", c.nt);
  const bool pow2 = c.wm > 0 && c.wn > 0 && c.wk > 0 && !(c.wm & (c.wm - 1)) && !(c.wn & (c.wn - 1)) &&
                    !(c.wk & (c.wk - 1));
  STD_TORCH_CHECK(pow2 && c.wm * c.wn * c.wk == kWarps, op, ": wm * wn * wk must be ", kWarps,
                  " with powers of two, got ", c.wm, " * ", c.wn, " * ", c.wk);
  STD_TORCH_CHECK(c.nbg >= 1, op, ": nbg must be >= 1, got ", c.nbg);
}

// What both persistent kernels take besides their own tensors.
struct RecurrenceParams {
  const int64_t* lengths;  // (B,) or null
  unsigned* sync;          // barrier counters, zeroed before the launch
  int seq_len, B, D, H;
  int64_t reverse_mask;
  Layout l;
  Config cfg;
  bool precise;
  unsigned long long watchdog_ns;  // 0: no watchdog
  unsigned poll_ns;                // 0: acquire-load polls; else relaxed polls with this back-off
};

// The barrier watchdog: FUSEDCONVLSTM_BARRIER_TIMEOUT_S seconds if set (0: off), else off.
inline unsigned long long watchdog_ns_from_env(const char* op) {
  const char* text = std::getenv(kWatchdogEnv);
  if (text == nullptr || *text == '\0') return kWatchdogNs;
  char* end = nullptr;
  const double seconds = std::strtod(text, &end);
  STD_TORCH_CHECK(end != text && *end == '\0' && seconds >= 0 && seconds < 1e9, op, ": ", kWatchdogEnv,
                  " must be a number of seconds >= 0 (0: no watchdog), got '", text, "'");
  return static_cast<unsigned long long>(seconds * 1e9);
}

// The barrier's poll back-off: FUSEDCONVLSTM_BARRIER_POLL_NS nanoseconds if set, else 0 (acquire
// loads, no back-off).
inline unsigned poll_ns_from_env(const char* op) {
  const char* text = std::getenv(kPollEnv);
  if (text == nullptr || *text == '\0') return 0;
  char* end = nullptr;
  const long long ns = std::strtoll(text, &end, 10);
  STD_TORCH_CHECK(end != text && *end == '\0' && ns >= 0 && ns <= static_cast<long long>(kMaxPollNs), op, ": ", kPollEnv,
                  " must be a whole number of nanoseconds in [0, ", kMaxPollNs, "] (0: no back-off), got '", text,
                  "'");
  return static_cast<unsigned>(ns);
}

// cp.async reads 16-byte chunks: a buffer that is a view at an odd offset would fault.
inline void check_aligned_16(const Tensor& t, const char* op, const char* name) {
  STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
                  " must be 16-byte aligned (it is read with 16-byte async copies); pass a fresh tensor, not an "
                  "offset view");
}

// The sizes, dtype and launch layout of a persistent call, checked once for both ops. `seq` is the
// (T, B, D, 4H) tensor of the op (xg forward, dgates backward); `k` the reduction length of one
// step's GEMM and `m_rows`, `k_split` the kernel's tile parameters for make_layout.
struct Problem {
  int64_t T, B, D, H;
  ScalarType dt;
  Config cfg;
  Layout l;
};

// check_problem of a call whose sizes come from elsewhere than one (T, B, D, 4H) tensor: `seq`
// names the tensor whose dtype `dt` is and that T and B come from.
inline Problem check_problem_sizes(int64_t T, int64_t B, int64_t D, int64_t H, ScalarType dt, const char* seq_name,
                                   int64_t nt, int64_t wm, int64_t wn, int64_t wk, int64_t nbg, bool precise,
                                   bool k_is_4h, int m_rows, int k_split, const char* op, bool cluster = false) {
  Problem p;
  p.T = T, p.B = B, p.D = D, p.H = H;
  STD_TORCH_CHECK(p.T > 0 && p.B > 0, op, ": ", seq_name, " must have T > 0 and B > 0, got ", p.T, " and ", p.B);
  STD_TORCH_CHECK(p.D >= 1 && p.D <= 62, op, ": the number of recurrences must lie in [1, 62], got ", p.D);
  STD_TORCH_CHECK(p.T < (int64_t(1) << 31) && p.B < (int64_t(1) << 31) && p.H < (int64_t(1) << 20), op,
                  ": sizes out of range (T and B below 2^31, H below 2^20)");
  p.dt = dt;
  STD_TORCH_CHECK(p.dt == ScalarType::Half || p.dt == ScalarType::BFloat16 || p.dt == ScalarType::Float, op, ": ",
                  seq_name, " must be float16, bfloat16 or float32, got ", dtype_name(p.dt),
                  " (float64 runs on the step-wise kernels)");
  p.cfg = Config{static_cast<int>(nt), static_cast<int>(wm), static_cast<int>(wn), static_cast<int>(wk),
                 static_cast<int>(nbg)};
  check_config(p.cfg, op);
  const int elem = p.dt == ScalarType::Float ? 4 : 2;
  p.l = make_layout(p.cfg, p.B, p.D, p.H, k_is_4h ? 4 * p.H : p.H, elem, m_rows, k_split, cluster ? 2 : 1);
  STD_TORCH_CHECK(p.cfg.nbg <= p.l.nbt, op, ": nbg (", p.cfg.nbg, ") must not exceed the number of batch tiles (",
                  p.l.nbt, ")");
  STD_TORCH_CHECK(!cluster || p.cfg.nbg == p.l.nbt, op, ": the cluster kernel runs one batch tile per cluster: nbg (",
                  p.cfg.nbg, ") must equal the number of batch tiles (", p.l.nbt, ")");
  STD_TORCH_CHECK(!cluster || p.l.nu <= kMaxClusterBlocks, op, ": the cluster kernel needs ", p.l.nu,
                  " blocks per cluster (hidden size ", p.H, " in slices of ", p.l.hs, " units); at most ",
                  kMaxClusterBlocks, " form a cluster: use more units per block (wm) or the cooperative kernel");
  STD_TORCH_CHECK(p.T * p.l.nu < (int64_t(1) << 32), op, ": T * blocks per group must stay below 2^32");
  STD_TORCH_CHECK(!precise || p.dt == ScalarType::Float, op, ": precise (3xTF32) applies to float32 only");
  return p;
}

inline Problem check_problem(const Tensor& seq, const char* seq_name, int64_t nt, int64_t wm, int64_t wn, int64_t wk,
                             int64_t nbg, bool precise, bool k_is_4h, int m_rows, int k_split, const char* op,
                             bool cluster = false) {
  STD_TORCH_CHECK(seq.dim() == 4, op, ": ", seq_name, " must be 4-D (T, B, D, 4H), got ", seq.dim(), "-D");
  const int64_t H = seq.size(3) / 4;
  STD_TORCH_CHECK(H > 0 && seq.size(3) == 4 * H, op, ": ", seq_name, ".shape[3] must be 4 * hidden_size > 0, got ",
                  seq.size(3));
  return check_problem_sizes(seq.size(0), seq.size(1), seq.size(2), H, seq.scalar_type(), seq_name, nt, wm, wn, wk,
                             nbg, precise, k_is_4h, m_rows, k_split, op, cluster);
}

// Checks `lengths` and `sync`, zeroes the barrier counters on `stream` and fills the shared params.
// `sync` is null for the cluster kernel, whose barrier is the hardware's.
inline RecurrenceParams recurrence_params(const Problem& pb, const std::optional<Tensor>& lengths, const Tensor* sync,
                                          const Tensor& like, int64_t reverse_mask, bool precise, cudaStream_t stream,
                                          const char* op) {
  RecurrenceParams r;
  r.sync = nullptr;
  if (sync != nullptr) {
    check_dtype(*sync, ScalarType::Int, op, "sync");
    check_cuda_contiguous(*sync, like, op, "sync");
    const int64_t counters = pb.D * pb.cfg.nbg * kSyncStride;
    STD_TORCH_CHECK(sync->numel() >= counters, op, ": sync must hold at least ", counters, " int32 counters, got ",
                    sync->numel());
    r.sync = static_cast<unsigned*>(sync->data_ptr());
  }
  r.lengths = optional_lengths(lengths, like, pb.B, op);
  r.seq_len = static_cast<int>(pb.T);
  r.B = static_cast<int>(pb.B);
  r.D = static_cast<int>(pb.D);
  r.H = static_cast<int>(pb.H);
  r.reverse_mask = reverse_mask;
  r.l = pb.l;
  r.cfg = pb.cfg;
  r.precise = precise;
  r.watchdog_ns = watchdog_ns_from_env(op);
  r.poll_ns = poll_ns_from_env(op);
  if (sync != nullptr) STD_CUDA_CHECK(cudaMemsetAsync(sync->data_ptr(), 0, sync->numel() * sizeof(int32_t), stream));
  return r;
}

// Calls launch(T{}, std::integral_constant<int, NT>{}) for the compiled (dtype, batch tile) pairs.
template <typename Launch>
void dispatch_tile(ScalarType dt, int nt, Launch&& launch) {
  auto by_nt = [&](auto t_tag) {
    if (nt == 1)
      launch(t_tag, std::integral_constant<int, 1>{});
    else
      launch(t_tag, std::integral_constant<int, 4>{});
  };
  switch (dt) {
    case ScalarType::Half: by_nt(__half{}); break;
    case ScalarType::BFloat16: by_nt(__nv_bfloat16{}); break;
    default: by_nt(float{}); break;
  }
}

// Refuses a configuration whose shared memory exceeds the device's opt-in maximum (naming
// `instead`, what serves otherwise), then sets that maximum and the largest carveout on `kernel`.
// The device's maximum, not this call's size: the attribute is per function and process wide, so
// another thread's smaller call could otherwise lower it between this set and the launch. The
// occupancy queries after it assume the largest carveout.
template <typename Kernel>
void set_shared_memory_attributes(Kernel kernel, const Layout& l, int device, const char* op, const char* instead) {
  int smem_optin = 0;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  STD_TORCH_CHECK(l.smem <= static_cast<int64_t>(smem_optin), op, ": the configuration needs ", l.smem,
                  " bytes of shared memory per block, the device allows ", smem_optin, "; use a smaller tile (or ",
                  instead, ")");
  STD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin));
  STD_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
}

// Launches `kernel` cooperatively (all blocks co-resident, which the spin barriers rely on),
// after checking that the configuration fits the device; refuses with a sentence otherwise.
template <typename Params>
void launch_cooperative(void (*kernel)(Params), const Params& params, const Layout& l, int device, cudaStream_t stream,
                        const char* op) {
  int coop = 0, sms = 0;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  STD_TORCH_CHECK(coop, op, ": device cuda:", device, " does not support cooperative launches");
  set_shared_memory_attributes(kernel, l, device, op, "the step-wise kernels");
  int per_sm = 0;
  STD_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, static_cast<size_t>(l.smem)));
  STD_TORCH_CHECK(per_sm > 0 && l.grid <= per_sm * sms, op, ": the configuration needs ", l.grid,
                  " co-resident blocks, the device holds ", per_sm * sms, " (", per_sm, " per SM x ", sms,
                  " SMs) at ", l.smem, " bytes of shared memory each; use fewer batch groups or larger tiles "
                  "(or the step-wise kernels)");
  void* args[] = {const_cast<Params*>(&params)};
  STD_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(l.grid), dim3(kThreads), args,
                                             static_cast<size_t>(l.smem), stream));
}

// The launch of `kernel` in clusters of `l.nu` blocks (sm_90), after the checks every cluster
// launch needs (a device and a build with sm_90 code, the shared memory) and the kernel's
// attributes; `attr` is the storage of the cluster-dimension attribute `cfg` points to. Refuses
// with a sentence what the device cannot launch.
template <typename Params>
cudaLaunchConfig_t prepare_cluster_launch(void (*kernel)(Params), const Layout& l, int device, cudaStream_t stream,
                                          cudaLaunchAttribute (&attr)[1], const char* op) {
  int major = 0;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  STD_TORCH_CHECK(major >= 9, op, ": thread-block clusters need compute capability 9.0 or newer; device cuda:", device,
                  " has ", major, ".x (use the cooperative kernel)");
  // The code the driver picked for this device must come from sm_90 or newer: compiled for an
  // older architecture (a build whose TORCH_CUDA_ARCH_LIST has neither sm_90 code nor PTX of it)
  // the kernel's body is a trap.
  cudaFuncAttributes fa;
  STD_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
  STD_TORCH_CHECK(fa.ptxVersion >= 90, op, ": this build has no sm_90 code for device cuda:", device,
                  " (the kernel was compiled for compute_", fa.ptxVersion,
                  "); rebuild with TORCH_CUDA_ARCH_LIST including 9.0a or 9.0+PTX, or use the cooperative kernel");
  set_shared_memory_attributes(kernel, l, device, op, "the cooperative kernel");
  if (l.nu > 8) STD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(l.nu);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(l.grid);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(l.smem);
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// How many clusters of `l.nu` blocks of `kernel` the device holds at once
// (cudaOccupancyMaxActiveClusters): 0 where it cannot place one at all (a harvested die or a
// part whose GPCs hold fewer SMs than the cluster needs, too much shared memory per SM), which
// the launch plan asks before it chooses the cluster kernel. Refuses what prepare_cluster_launch
// refuses.
template <typename Params>
int max_active_clusters(void (*kernel)(Params), const Layout& l, int device, cudaStream_t stream, const char* op) {
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t cfg = prepare_cluster_launch(kernel, l, device, stream, attr, op);
  int clusters = 0;
  STD_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg));
  return clusters;
}

// Launches `kernel` in clusters of `l.nu` blocks (sm_90): the blocks of a cluster are co-scheduled
// by the hardware, and clusters never wait on each other, so the grid needs no co-residency.
// Refuses with a sentence what the device cannot schedule (the launch plan asks
// max_active_clusters first, so a call the cuda backend plans does not reach that refusal).
template <typename Params>
void launch_clusters(void (*kernel)(Params), const Params& params, const Layout& l, int device, cudaStream_t stream,
                     const char* op) {
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t cfg = prepare_cluster_launch(kernel, l, device, stream, attr, op);
  int clusters = 0;
  STD_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg));
  STD_TORCH_CHECK(clusters > 0, op, ": device cuda:", device, " cannot schedule a cluster of ", l.nu, " blocks with ",
                  l.smem, " bytes of shared memory each (use the cooperative kernel)");
  STD_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, params));
}

}  // namespace persistent
}  // namespace fusedconvlstm
