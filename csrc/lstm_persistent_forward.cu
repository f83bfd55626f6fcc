// Persistent LSTM recurrence, forward: the whole sequence in one cooperative launch.
//
// Work split. Block (d, bg, u) owns hidden units [u*hs, (u+1)*hs) of recurrence d, all four gates
// of them, for the batch tiles bg, bg + nbg, ... Its slice of W_hh (4*hs rows x H) is loaded into
// shared memory once and stays there for all T steps. Per step and batch tile the block computes
// the 4*hs x bt gate pre-activations h_{t-1} W_hhᵀ on tensor cores (warps split rows x batch
// columns x reduction), adds xg, and runs the cell update for its units; c never leaves the
// block's threads, only h crosses blocks. h goes through a double buffer in global memory
// (h_buf[s % 2] is read at step s, h_buf[(s + 1) % 2] written), so one barrier per step is
// enough: by the time a block writes a buffer again, every block of its group has passed the
// barrier that ended the reads of it. Only the blocks of one (recurrence, batch group) exchange
// h, so each group has its own barrier and independent recurrences never wait on each other.
//
// Shared memory: W slice (4*hs rows), the h tile (bt rows), both K-contiguous with padded rows
// (see lstm_persistent.cuh), then the fp32 partial sums of the wk reduction warps, red[wk][n][m].
// Rows m = gate * hs + unit, so one thread's four gate values for (unit, batch row) sit hs apart
// in a row of red and the pointwise update needs no shuffles. The partial sums are added in a
// fixed order: results are bitwise reproducible. The variant that computes the input projection
// itself (kFromInput) adds, after red, the W_ih slice, one x tile and the fp32 projected gates
// of the block's batch tiles (add_input_projection in lstm_persistent.cuh).
#include "lstm_persistent.cuh"

namespace fusedconvlstm {
namespace persistent {
namespace {

template <typename T>
struct ForwardParams : RecurrenceParams {
  const T* xg;     // (T, B, D, 4H); null where the kernel projects the input itself
  const T* w;      // (D, 4H, H)
  T* h_buf;        // (2, D, B, kp): h_buf[0] holds h0 on entry
  float* c_state;  // (D, B, H): c0 on entry, c_n on exit
  T* y;            // (T, B, D, H); null when only the final state is wanted
  float* ws;       // (T, B, D, 5H): i, f, g, o, c per step (zeros at masked steps); null: not saved
  // The kernel that computes the input projection itself (lstm_persistent_forward_from_input_);
  // null / 0 otherwise.
  const T* x;          // (T, B, kpx): the layer's input, zeros in the padding
  const T* w_ih;       // (D, 4H, I)
  const float* bias;   // (D, 4H): b_ih + b_hh
  int I;
};

constexpr int kMt = kForwardMt;  // 32 rows per warp: 8 units x 4 gates

// A step's staged y and workspace (y_s[idx], ws_s[k * hs * bt + idx], idx = n * hs + jj) of
// batch rows b0 + n and units j0 + jj to global memory at time t: consecutive threads take
// consecutive units of a row (coalesced). Each thread stores the elements idx = tid + e * kThreads
// it staged, so no __syncthreads is needed after its own staging writes.
template <typename T>
__device__ __forceinline__ void store_staged_outputs(const ForwardParams<T>& p, const T* y_s, const float* ws_s, int t,
                                                     int b0, int j0, int hs, int bt, int d) {
  if (p.y == nullptr && p.ws == nullptr) return;  // inference of the final state only
  const int H = p.H, B = p.B;
  const int64_t H5 = 5 * static_cast<int64_t>(H);
  for (int idx = threadIdx.x; idx < hs * bt; idx += kThreads) {
    const int n = idx / hs, j = j0 + (idx - n * hs), b = b0 + n;
    if (j >= H || b >= B) continue;
    const int64_t row = (static_cast<int64_t>(t) * B + b) * p.D + d;
    if (p.y != nullptr) p.y[row * H + j] = y_s[idx];
    if (p.ws != nullptr) {
#pragma unroll
      for (int k = 0; k < 5; ++k) p.ws[row * H5 + k * H + j] = ws_s[k * hs * bt + idx];
    }
  }
}
// (unit, row) elements per thread in the cluster kernel: hs * bt = 64 * nt * wm * wn <= 2048.
constexpr int kClusterElems = 8;
// Of those, the first kClusterPrefetch (lstm_constants.h) have their xg loaded a step ahead
// (while the cluster waits at its barrier): all of them at the reference shape (hs * bt = 512,
// two per thread).

// kFromInput: the kernel computes the input projection itself (xg is null). Each block keeps the
// W_ih slice of its units resident beside the W_hh slice, and projects step s + 1's x for its
// batch tiles while it waits at step s's barrier (x is an input of the launch, not exchanged, so
// it can be read before the other blocks arrive): the projection's products overlap the
// barrier's wait instead of running as a GEMM before the loop. The projected gates stay in fp32
// in shared memory (add_input_projection), so they are never rounded to the input's dtype.
template <typename T, int NT, bool kFromInput>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) lstm_persistent_forward_kernel(const ForwardParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout& l = p.l;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int u = blockIdx.x % l.nu;
  const int bg = (blockIdx.x / l.nu) % p.cfg.nbg;
  const int d = blockIdx.x / (l.nu * p.cfg.nbg);
  const int H = p.H, B = p.B, hs = l.hs, bt = l.bt, kp = l.kp, lda = l.lda, ldr = l.ldr;
  const int j0 = u * hs;
  const int64_t G = 4 * static_cast<int64_t>(H);

  unsigned char* w_s = smem;
  unsigned char* h_s = w_s + l.rows_a * lda;
  float* red = reinterpret_cast<float*>(h_s + bt * lda);
  // kFromInput: the W_ih slice, one x tile, the projected gates of the block's batch tiles.
  unsigned char* wx_s = reinterpret_cast<unsigned char*>(red + p.cfg.wk * bt * ldr);
  unsigned char* x_s = wx_s + l.rows_a * l.ldx;
  float* xproj = reinterpret_cast<float*>(x_s + bt * l.ldx);  // [slot][n][m], rows_a per row n

  load_gate_rows(w_s, lda, p.w + static_cast<int64_t>(d) * G * H, l.rows_a, kp, hs, j0, H, H);
  if constexpr (kFromInput)
    load_gate_rows(wx_s, l.ldx, p.w_ih + static_cast<int64_t>(d) * G * p.I, l.rows_a, l.kpx, hs, j0, H, p.I);

  const int wm = warp % p.cfg.wm, wn = (warp / p.cfg.wm) % p.cfg.wn, wk = warp / (p.cfg.wm * p.cfg.wn);
  const int nks = kp * static_cast<int>(sizeof(T)) / kKStepBytes;
  const int ks0 = wk * nks / p.cfg.wk, ks1 = (wk + 1) * nks / p.cfg.wk;
  const int m0 = wm * 16 * kMt, n0 = wn * 8 * NT;
  const uint32_t a_base = smem_addr(w_s) + m0 * lda;
  const uint32_t b_base = smem_addr(h_s) + n0 * lda;
  float* red_warp = red + wk * bt * ldr;
  const bool rev = (p.reverse_mask >> d) & 1;
  unsigned* counter = p.sync + (d * p.cfg.nbg + bg) * kSyncStride;
  const int64_t buf_stride = static_cast<int64_t>(p.D) * B * kp;
  const int64_t H5 = 5 * static_cast<int64_t>(H);

  // kFromInput: x_t W_ihᵀ + b of step `step` for each of the block's batch tiles, into
  // xproj[slot] (slot: the tile's place among the block's tiles). The wk warps' partial sums go
  // through red (free between one step's cell updates and the next step's products) and are
  // added in a fixed order, as the recurrent product's: bitwise reproducible.
  auto project_inputs = [&](int step) {
    if constexpr (kFromInput) {
      const int nksx = l.kpx * static_cast<int>(sizeof(T)) / kKStepBytes;
      const int ksx0 = wk * nksx / p.cfg.wk, ksx1 = (wk + 1) * nksx / p.cfg.wk;
      const uint32_t ax_base = smem_addr(wx_s) + m0 * l.ldx;
      const uint32_t bx_base = smem_addr(x_s) + n0 * l.ldx;
      const T* x_t = p.x + static_cast<int64_t>(rev ? p.seq_len - 1 - step : step) * B * l.kpx;
      load_rows_async(x_s, l.ldx, x_t, l.kpx, bg * bt, bt, B);
      for (int tile = bg, slot = 0; tile < l.nbt; tile += p.cfg.nbg, ++slot) {
        cp_async_wait_all();
        __syncthreads();  // the x tile (and, before the first step, W_ih) visible; red free again
        warp_tile_to_partial_sums<T, kMt, NT>(red_warp, ldr, ax_base, bx_base, l.ldx, ksx0, ksx1, m0, n0, lane,
                                              p.precise);
        __syncthreads();  // partial sums complete; the x tile is free again
        if (tile + p.cfg.nbg < l.nbt) load_rows_async(x_s, l.ldx, x_t, l.kpx, (tile + p.cfg.nbg) * bt, bt, B);
        float* xp = xproj + slot * bt * l.rows_a;
        for (int idx = tid; idx < bt * l.rows_a; idx += kThreads) {
          const int n = idx / l.rows_a, m = idx - n * l.rows_a;
          const int gate = m / hs, j = j0 + (m - gate * hs);
          float a = red[n * ldr + m];
          for (int kw = 1; kw < p.cfg.wk; ++kw) a += red[kw * bt * ldr + n * ldr + m];
          xp[idx] = a + (j < H ? p.bias[d * G + gate * H + j] : 0.0f);
        }
      }
    }
  };

  // The xg of this thread's first element (first tile, idx = tid) is loaded one step ahead,
  // while the block waits at the barrier, so that global-memory latency is off the critical path
  // of the common case (one element per thread). Other elements load when they are reached.
  const int first_n = tid / hs, first_jj = tid - first_n * hs;
  const bool has_first = tid < hs * bt && j0 + first_jj < H && bg * bt + first_n < B;
  float x_first[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  auto load_first_x = [&](int step) {
    if (kFromInput || !has_first) return;
    const int tt = rev ? p.seq_len - 1 - step : step;
    load_gate_x(x_first, p.xg, (static_cast<int64_t>(tt) * B + bg * bt + first_n) * p.D + d, j0 + first_jj, H);
  };
  load_first_x(0);
  project_inputs(0);

  // The y and workspace of the block's last batch tile of a step are staged in the h tile (free
  // once that tile's partial sums are done: no prefetch follows it) and stored after the
  // barrier's arrive, so that the arrive's fence waits only for the h exchange and the earlier
  // tiles' stores (which drain while later tiles compute), as in the cluster kernel. Where the
  // staging does not fit the h tile (small H, large slices), everything is stored directly.
  const int last_tile = bg + (l.nbt - 1 - bg) / p.cfg.nbg * p.cfg.nbg;
  T* y_s = reinterpret_cast<T*>(h_s);  // [n * hs + jj]
  float* ws_s = reinterpret_cast<float*>(h_s + (hs * bt * static_cast<int>(sizeof(T)) + 15) / 16 * 16);
  const bool defer = (p.y != nullptr || p.ws != nullptr) &&
                     output_staging_bytes(hs, bt, static_cast<int>(sizeof(T))) <= bt * lda;
  auto store_deferred = [&](int t) {
    if (defer) store_staged_outputs(p, y_s, ws_s, t, last_tile * bt, j0, hs, bt, d);
  };

  for (int s = 0; s < p.seq_len; ++s) {
    const int t = rev ? p.seq_len - 1 - s : s;
    const T* h_prev = p.h_buf + (s & 1) * buf_stride + static_cast<int64_t>(d) * B * kp;
    T* h_next = p.h_buf + ((s + 1) & 1) * buf_stride + static_cast<int64_t>(d) * B * kp;
    load_rows_async(h_s, lda, h_prev, kp, bg * bt, bt, B);
    for (int tile = bg; tile < l.nbt; tile += p.cfg.nbg) {
      const bool staged = defer && tile == last_tile;
      cp_async_wait_all();
      __syncthreads();  // h tile (and, at the first step, the W slice) visible to all warps
      warp_tile_to_partial_sums<T, kMt, NT>(red_warp, ldr, a_base, b_base, lda, ks0, ks1, m0, n0, lane, p.precise);
      __syncthreads();  // partial sums complete; the h tile is free again
      // Prefetch the next batch tile's h while this tile's cell update runs.
      if (tile + p.cfg.nbg < l.nbt) load_rows_async(h_s, lda, h_prev, kp, (tile + p.cfg.nbg) * bt, bt, B);

      const int b0 = tile * bt;
      // Where this tile's y and workspace go: element (n, jj) at base + n * row stride + jj, in
      // global memory (row (t, b0 + n, d)) or staged (y_s[idx], ws_s[k * hs * bt + idx]).
      const int64_t out_row = (static_cast<int64_t>(t) * B + b0) * p.D + d;
      T* y_base = p.y == nullptr ? nullptr : staged ? y_s : p.y + out_row * H + j0;
      float* ws_base = p.ws == nullptr ? nullptr : staged ? ws_s : p.ws + out_row * H5 + j0;
      const int64_t y_rows = staged ? hs : static_cast<int64_t>(p.D) * H;
      const int64_t ws_rows = staged ? hs : p.D * H5;
      const int ws_stride = staged ? hs * bt : H;
      for (int idx = tid; idx < hs * bt; idx += kThreads) {
        const int n = idx / hs, jj = idx - n * hs;
        const int j = j0 + jj, b = b0 + n;
        if (j >= H || b >= B) continue;
        const int64_t state = (static_cast<int64_t>(d) * B + b) * H + j;
        const int64_t row = (static_cast<int64_t>(t) * B + b) * p.D + d;  // (t, b, d)
        T* y_out = y_base == nullptr ? nullptr : y_base + n * y_rows + jj;
        float* ws_row = ws_base == nullptr ? nullptr : ws_base + n * ws_rows + jj;
        T* h_out = h_next + static_cast<int64_t>(b) * kp + j;
        const bool valid = p.lengths == nullptr || t < p.lengths[b];
        if (!valid) {
          // Masked step: the state is carried (into the other buffer), the output is zero.
          *h_out = __ldcg(h_prev + static_cast<int64_t>(b) * kp + j);
          if (y_out != nullptr) *y_out = zero_value<T>();
          zero_cell_workspace(ws_row, ws_stride);
          continue;
        }
        float x[4], pre[4];
        if constexpr (kFromInput) {
          const float* xp = xproj + ((tile - bg) / p.cfg.nbg * bt + n) * l.rows_a + jj;
#pragma unroll
          for (int gate = 0; gate < 4; ++gate) x[gate] = xp[gate * hs];
        } else if (tile == bg && idx == tid) {
          for (int gate = 0; gate < 4; ++gate) x[gate] = x_first[gate];
        } else {
          load_gate_x(x, p.xg, row, j, H);
        }
        gate_preactivations(pre, red, n, jj, ldr, hs, bt, p.cfg.wk, x);
        const CellState cell = lstm_cell_update(pre, p.c_state[state]);
        const T h_new = from_acc<T, float>(cell.o * tanhf(cell.c));
        p.c_state[state] = cell.c;
        *h_out = h_new;
        if (y_out != nullptr) *y_out = h_new;
        store_cell_workspace(ws_row, ws_stride, cell);
      }
    }
    // No block reads h after the last step: no barrier there.
    if (s + 1 < p.seq_len) {
      barrier_arrive(counter);
      load_first_x(s + 1);
      store_deferred(t);  // the h tile is rewritten only after the wait's __syncthreads
      project_inputs(s + 1);
      barrier_wait(counter, static_cast<unsigned>(s + 1) * l.nu, s, p.watchdog_ns);
    } else {
      store_deferred(t);  // each thread stores the elements it staged: no __syncthreads needed
    }
  }
}

// The cluster variant (sm_90): the blocks of one (recurrence, batch tile) form a thread-block
// cluster of nu blocks, and h never leaves the chip. Each block keeps the whole h tile of its
// batch rows in shared memory, double-buffered (h_s[s % 2] is read at step s, h_s[(s + 1) % 2]
// written); after its cell update a block writes its own units' columns of the new h into its
// own next buffer, then copies those columns, 16 bytes at a time, into the next buffer of every
// other block of the cluster (distributed shared memory). One cluster barrier per step (arrive
// with release after the copies, wait with acquire before the next step's reads) ends both the
// exchange and the reads of the buffer that the next step overwrites, as the global barrier does
// in the cooperative kernel. h0 comes from h_buf[0] and h_n goes to h_buf[T % 2], as there; the
// last step exchanges nothing, so no block can still be writing into a block that has exited.
// One batch tile per block means each thread owns the same (unit, row) elements at every step:
// their c and lengths stay in registers (the cluster barrier's acquire invalidates L1, so a
// reload would be an L2 round trip per step), and c_n is written once at the end. The step's y
// and workspace go to shared memory first and to global memory between the arrive and the wait:
// the arrive's release (a GPU-scope fence in every thread) then waits only for the exchange, not
// for those stores, which have a whole step to complete before the next arrive.
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, 1) lstm_cluster_forward_kernel(const ForwardParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // launch_clusters refuses devices older than sm_90
#else
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout& l = p.l;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int u = blockIdx.x % l.nu;  // == cluster_rank(): the cluster is nu consecutive blocks
  const int tile = (blockIdx.x / l.nu) % p.cfg.nbg;
  const int d = blockIdx.x / (l.nu * p.cfg.nbg);
  const int H = p.H, B = p.B, hs = l.hs, bt = l.bt, kp = l.kp, lda = l.lda, ldr = l.ldr;
  const int j0 = u * hs, b0 = tile * bt;
  const int64_t G = 4 * static_cast<int64_t>(H);

  unsigned char* w_s = smem;
  unsigned char* h_s = w_s + l.rows_a * lda;  // two buffers of bt rows
  float* red = reinterpret_cast<float*>(h_s + 2 * bt * lda);
  T* y_s = reinterpret_cast<T*>(red + p.cfg.wk * bt * ldr);  // [n * hs + jj]
  float* ws_s = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(y_s) +
                                         (hs * bt * static_cast<int>(sizeof(T)) + 15) / 16 * 16);  // [k][n][jj]

  load_gate_rows(w_s, lda, p.w + static_cast<int64_t>(d) * G * H, l.rows_a, kp, hs, j0, H, H);
  // Buffer 1 starts zero (its padding columns and rows past the batch are never written); buffer
  // 0 takes the h0 tile, zeros past the batch.
  for (int idx = tid; idx < bt * lda / 16; idx += kThreads)
    reinterpret_cast<uint4*>(h_s + bt * lda)[idx] = make_uint4(0u, 0u, 0u, 0u);
  const int64_t buf_stride = static_cast<int64_t>(p.D) * B * kp;
  load_rows_async(h_s, lda, p.h_buf + static_cast<int64_t>(d) * B * kp, kp, b0, bt, B);

  const int wm = warp % p.cfg.wm, wn = (warp / p.cfg.wm) % p.cfg.wn, wk = warp / (p.cfg.wm * p.cfg.wn);
  const int nks = kp * static_cast<int>(sizeof(T)) / kKStepBytes;
  const int ks0 = wk * nks / p.cfg.wk, ks1 = (wk + 1) * nks / p.cfg.wk;
  const int m0 = wm * 16 * kMt, n0 = wn * 8 * NT;
  const uint32_t a_base = smem_addr(w_s) + m0 * lda;
  float* red_warp = red + wk * bt * ldr;
  const bool rev = (p.reverse_mask >> d) & 1;
  // The columns a block sends: its units, up to the padded width (zeros past H).
  const int send_chunks = (min(j0 + hs, kp) - j0) * static_cast<int>(sizeof(T)) / 16;
  const int send_rows = min(bt, B - b0);

  // This thread's elements idx = tid + e * kThreads (e < kClusterElems): c and the length.
  float c_reg[kClusterElems];
  int len_reg[kClusterElems];
#pragma unroll
  for (int e = 0; e < kClusterElems; ++e) {
    const int idx = tid + e * kThreads;
    const int n = idx / hs, j = j0 + (idx - n * hs), b = b0 + n;
    const bool mine = idx < hs * bt && j < H && b < B;
    c_reg[e] = mine ? p.c_state[(static_cast<int64_t>(d) * B + b) * H + j] : 0.0f;
    len_reg[e] = mine && p.lengths != nullptr ? static_cast<int>(p.lengths[b]) : p.seq_len;
  }

  // As in the cooperative kernel, xg is loaded a step ahead, here for each thread's first
  // kClusterPrefetch elements (idx = tid + e * kThreads), so that no global load waits behind
  // the step's products in the common case; further elements load when they are reached.
  float x_pre[kClusterPrefetch][4] = {};
  auto load_first_x = [&](int step) {
    const int tt = rev ? p.seq_len - 1 - step : step;
#pragma unroll
    for (int e = 0; e < kClusterPrefetch; ++e) {
      const int idx = tid + e * kThreads;
      const int n = idx / hs, j = j0 + (idx - n * hs), b = b0 + n;
      if (idx < hs * bt && j < H && b < B)
        load_gate_x(x_pre[e], p.xg, (static_cast<int64_t>(tt) * B + b) * p.D + d, j, H);
    }
  };
  auto store_staged = [&](int t) { store_staged_outputs(p, y_s, ws_s, t, b0, j0, hs, bt, d); };
  load_first_x(0);
  cp_async_wait_all();
  // Every block's buffers are initialised before any block of the cluster writes into them.
  cluster_arrive();
  cluster_wait();

  for (int s = 0; s < p.seq_len; ++s) {
    const int t = rev ? p.seq_len - 1 - s : s;
    const bool last = s + 1 == p.seq_len;
    unsigned char* h_cur = h_s + (s & 1) * bt * lda;
    unsigned char* h_nxt = h_s + ((s + 1) & 1) * bt * lda;
    warp_tile_to_partial_sums<T, kMt, NT>(red_warp, ldr, a_base, smem_addr(h_cur) + n0 * lda, lda, ks0, ks1, m0, n0,
                                          lane, p.precise);
    __syncthreads();  // partial sums complete

    T* h_last = p.h_buf + (p.seq_len & 1) * buf_stride + static_cast<int64_t>(d) * B * kp;
#pragma unroll
    for (int e = 0; e < kClusterElems; ++e) {
      const int idx = tid + e * kThreads;
      const int n = idx / hs, jj = idx - n * hs;
      const int j = j0 + jj, b = b0 + n;
      if (idx >= hs * bt || j >= H || b >= B) continue;
      const int64_t row = (static_cast<int64_t>(t) * B + b) * p.D + d;  // (t, b, d)
      // Staged: y_s[idx], the workspace at ws_s[k * hs * bt + idx] (stride hs * bt).
      T* y_out = y_s + idx;
      float* ws_row = p.ws == nullptr ? nullptr : ws_s + idx;
      T h_new;
      if (t >= len_reg[e]) {
        // Masked step: the state is carried (into the other buffer), the output is zero.
        h_new = reinterpret_cast<const T*>(h_cur + n * lda)[j];
        *y_out = zero_value<T>();
        zero_cell_workspace(ws_row, hs * bt);
      } else {
        float x[4], pre[4];
        if (e < kClusterPrefetch)
          for (int gate = 0; gate < 4; ++gate) x[gate] = x_pre[e][gate];
        else
          load_gate_x(x, p.xg, row, j, H);
        gate_preactivations(pre, red, n, jj, ldr, hs, bt, p.cfg.wk, x);
        const CellState cell = lstm_cell_update(pre, c_reg[e]);
        h_new = from_acc<T, float>(cell.o * tanhf(cell.c));
        c_reg[e] = cell.c;
        *y_out = h_new;
        store_cell_workspace(ws_row, hs * bt, cell);
      }
      if (last) {
        h_last[static_cast<int64_t>(b) * kp + j] = h_new;
        p.c_state[(static_cast<int64_t>(d) * B + b) * H + j] = c_reg[e];  // c_n
      } else {
        reinterpret_cast<T*>(h_nxt + n * lda)[j] = h_new;
      }
    }
    __syncthreads();  // this block's columns of the next buffer and the staged outputs are complete
    if (last) {
      store_staged(t);
      break;
    }
    const uint32_t src = smem_addr(h_nxt) + j0 * static_cast<int>(sizeof(T));
    const int per_peer = send_rows * send_chunks;
    for (int idx = tid; idx < (l.nu - 1) * per_peer; idx += kThreads) {
      const int k = idx / per_peer, rest = idx - k * per_peer;
      const int n = rest / send_chunks, c = rest - n * send_chunks;
      const uint32_t peer = static_cast<uint32_t>(k < u ? k : k + 1);
      const uint32_t off = n * lda + c * 16;
      const uint4 v = *reinterpret_cast<const uint4*>(h_nxt + j0 * static_cast<int>(sizeof(T)) + off);
      st_cluster_16(map_shared_to_rank(src + off, peer), v);
    }
    cluster_arrive();
    store_staged(t);
    load_first_x(s + 1);
    cluster_wait();
  }
#endif
}

// The tensors every forward op takes, checked against the problem; `seq` (named seq_name) is the
// op's sequence input (xg, or x for the kernel that projects the input itself).
void check_forward_tensors(const Problem& pb, const Tensor& seq, const char* seq_name, const Tensor& w_hh,
                           const Tensor& h_buf, const Tensor& c_state, const Tensor& y, const Tensor& workspace,
                           const char* op) {
  const int64_t T = pb.T, B = pb.B, D = pb.D, H = pb.H;
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&w_hh, "w_hh"}, {&h_buf, "h_buf"}, {&y, "y"}})
    check_dtype(*t, pb.dt, op, name);
  check_dtype(c_state, ScalarType::Float, op, "c_state");
  check_dtype(workspace, ScalarType::Float, op, "workspace");
  const std::pair<const Tensor*, const char*> all[] = {{&seq, seq_name}, {&w_hh, "w_hh"}, {&h_buf, "h_buf"},
                                                       {&c_state, "c_state"}, {&y, "y"}, {&workspace, "workspace"}};
  for (auto [t, name] : all) check_cuda_contiguous(*t, seq, op, name);
  check_shape(w_hh, {D, 4 * H, H}, op, "w_hh");
  check_shape(h_buf, {2, D, B, pb.l.kp}, op, "h_buf");
  check_aligned_16(h_buf, op, "h_buf");
  check_shape(c_state, {D, B, H}, op, "c_state");
  // An empty y: only the final state is wanted (h_n and c_n); an empty workspace: the forward
  // saves nothing for a backward.
  if (y.numel() != 0) check_shape(y, {T, B, D, H}, op, "y");
  if (workspace.numel() != 0) check_shape(workspace, {T, B, D, 5 * H}, op, "workspace");
}

// Every forward op after its checks: on seq's device and stream, the shared params (the barrier
// counters `sync` zeroed, or none for the cluster kernel), then launch(params, dtype tag,
// batch-tile tag, device, stream) for the compiled (dtype, nt) pair. `xg` is null for the kernel
// that projects the input itself (its launch sets x, w_ih, bias and I).
template <typename Launch>
void launch_forward(const Problem& pb, const std::optional<Tensor>& lengths, const Tensor* sync, int64_t reverse_mask,
                    bool precise, const Tensor& seq, const Tensor* xg, const Tensor& w_hh, Tensor& h_buf,
                    Tensor& c_state, Tensor& y, Tensor& workspace, const char* op, Launch&& launch) {
  const int device = seq.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  cudaStream_t stream = current_stream(seq);
  const RecurrenceParams common = recurrence_params(pb, lengths, sync, seq, reverse_mask, precise, stream, op);
  dispatch_tile(pb.dt, pb.cfg.nt, [&](auto t_tag, auto nt_tag) {
    using Ts = decltype(t_tag);
    ForwardParams<Ts> p;
    static_cast<RecurrenceParams&>(p) = common;
    p.xg = xg == nullptr ? nullptr : static_cast<const Ts*>(xg->data_ptr());
    p.x = nullptr;
    p.w_ih = nullptr;
    p.bias = nullptr;
    p.I = 0;
    p.w = static_cast<const Ts*>(w_hh.data_ptr());
    p.h_buf = static_cast<Ts*>(h_buf.data_ptr());
    p.c_state = static_cast<float*>(c_state.data_ptr());
    p.y = y.numel() ? static_cast<Ts*>(y.data_ptr()) : nullptr;
    p.ws = workspace.numel() ? static_cast<float*>(workspace.data_ptr()) : nullptr;
    launch(p, t_tag, nt_tag, device, stream);
  });
}

void lstm_persistent_forward_(Tensor xg, Tensor w_hh, std::optional<Tensor> lengths, int64_t reverse_mask, int64_t nt,
                              int64_t wm, int64_t wn, int64_t wk, int64_t nbg, bool precise, Tensor h_buf,
                              Tensor c_state, Tensor y, Tensor workspace, Tensor sync) {
  const char* op = "lstm_persistent_forward_";
  const Problem pb = check_problem(xg, "xg", nt, wm, wn, wk, nbg, precise, /*k_is_4h=*/false, 16 * kMt, 4, op);
  check_forward_tensors(pb, xg, "xg", w_hh, h_buf, c_state, y, workspace, op);
  launch_forward(pb, lengths, &sync, reverse_mask, precise, xg, &xg, w_hh, h_buf, c_state, y, workspace, op,
                 [&](auto& p, auto t_tag, auto nt_tag, int device, cudaStream_t stream) {
                   auto kernel = lstm_persistent_forward_kernel<decltype(t_tag), decltype(nt_tag)::value, false>;
                   launch_cooperative(kernel, p, pb.l, device, stream, op);
                 });
}

void lstm_persistent_forward_from_input_(Tensor x, Tensor w_ih, Tensor bias, Tensor w_hh,
                                         std::optional<Tensor> lengths, int64_t reverse_mask, int64_t nt, int64_t wm,
                                         int64_t wn, int64_t wk, int64_t nbg, bool precise, Tensor h_buf,
                                         Tensor c_state, Tensor y, Tensor workspace, Tensor sync) {
  const char* op = "lstm_persistent_forward_from_input_";
  STD_TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D (T, B, padded input size), got ", x.dim(), "-D");
  STD_TORCH_CHECK(w_ih.dim() == 3 && w_ih.size(1) > 0 && w_ih.size(1) % 4 == 0 && w_ih.size(2) > 0, op,
                  ": w_ih must be 3-D (D, 4H, I) with H > 0 and I > 0");
  const int64_t D = w_ih.size(0), H = w_ih.size(1) / 4, I = w_ih.size(2);
  STD_TORCH_CHECK(I < (int64_t(1) << 20), op, ": the input size must stay below 2^20, got ", I);
  Problem pb = check_problem_sizes(x.size(0), x.size(1), D, H, x.scalar_type(), "x", nt, wm, wn, wk, nbg, precise,
                                   /*k_is_4h=*/false, 16 * kMt, 4, op);
  add_input_projection(pb.l, pb.cfg, I, pb.dt == ScalarType::Float ? 4 : 2);
  check_forward_tensors(pb, x, "x", w_hh, h_buf, c_state, y, workspace, op);
  check_dtype(w_ih, pb.dt, op, "w_ih");
  check_dtype(bias, ScalarType::Float, op, "bias");
  check_cuda_contiguous(w_ih, x, op, "w_ih");
  check_cuda_contiguous(bias, x, op, "bias");
  check_shape(x, {pb.T, pb.B, pb.l.kpx}, op, "x");
  check_aligned_16(x, op, "x");
  check_shape(bias, {D, 4 * H}, op, "bias");
  launch_forward(pb, lengths, &sync, reverse_mask, precise, x, nullptr, w_hh, h_buf, c_state, y, workspace, op,
                 [&](auto& p, auto t_tag, auto nt_tag, int device, cudaStream_t stream) {
                   using Ts = decltype(t_tag);
                   p.x = static_cast<const Ts*>(x.data_ptr());
                   p.w_ih = static_cast<const Ts*>(w_ih.data_ptr());
                   p.bias = static_cast<const float*>(bias.data_ptr());
                   p.I = static_cast<int>(I);
                   auto kernel = lstm_persistent_forward_kernel<Ts, decltype(nt_tag)::value, true>;
                   launch_cooperative(kernel, p, pb.l, device, stream, op);
                 });
}

void lstm_cluster_forward_(Tensor xg, Tensor w_hh, std::optional<Tensor> lengths, int64_t reverse_mask, int64_t nt,
                           int64_t wm, int64_t wn, int64_t wk, bool precise, Tensor h_buf, Tensor c_state, Tensor y,
                           Tensor workspace) {
  const char* op = "lstm_cluster_forward_";
  STD_TORCH_CHECK(xg.dim() == 4 && xg.size(1) > 0, op, ": xg must be 4-D (T, B, D, 4H) with B > 0");
  // One batch tile per cluster: nbg is the number of tiles.
  const int64_t bt = 8 * nt * wn;
  const int64_t nbg = bt > 0 ? (xg.size(1) + bt - 1) / bt : 1;
  const Problem pb =
      check_problem(xg, "xg", nt, wm, wn, wk, nbg, precise, /*k_is_4h=*/false, 16 * kMt, 4, op, /*cluster=*/true);
  check_forward_tensors(pb, xg, "xg", w_hh, h_buf, c_state, y, workspace, op);
  STD_TORCH_CHECK(pb.l.hs * pb.l.bt <= kClusterElems * kThreads, op, ": a block's tile of ", pb.l.hs, " units x ",
                  pb.l.bt, " rows exceeds the ", kClusterElems, " elements per thread the kernel keeps");
  launch_forward(pb, lengths, nullptr, reverse_mask, precise, xg, &xg, w_hh, h_buf, c_state, y, workspace, op,
                 [&](auto& p, auto t_tag, auto nt_tag, int device, cudaStream_t stream) {
                   auto kernel = lstm_cluster_forward_kernel<decltype(t_tag), decltype(nt_tag)::value>;
                   launch_clusters(kernel, p, pb.l, device, stream, op);
                 });
}

// How many clusters of the cluster forward kernel, configured (nt, wm, wn, wk) for a hidden size,
// the device of `like` (whose dtype selects the kernel) holds at once: 0 where it cannot place
// one. The launch plan asks it before choosing the cluster kernel.
int64_t lstm_cluster_max_active_clusters(Tensor like, int64_t hidden_size, int64_t nt, int64_t wm, int64_t wn,
                                         int64_t wk) {
  const char* op = "lstm_cluster_max_active_clusters";
  STD_TORCH_CHECK(like.is_cuda(), op, ": like must be a CUDA tensor (its device is the one asked about)");
  const int64_t bt = 8 * nt * wn;  // one batch tile: the layout of one cluster
  const Problem pb = check_problem_sizes(1, bt > 0 ? bt : 1, 1, hidden_size, like.scalar_type(), "like", nt, wm, wn,
                                         wk, 1, false, /*k_is_4h=*/false, 16 * kMt, 4, op, /*cluster=*/true);
  STD_TORCH_CHECK(pb.l.hs * pb.l.bt <= kClusterElems * kThreads, op, ": a block's tile of ", pb.l.hs, " units x ",
                  pb.l.bt, " rows exceeds the ", kClusterElems, " elements per thread the kernel keeps");
  const int device = like.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  cudaStream_t stream = current_stream(like);
  int64_t clusters = 0;
  dispatch_tile(pb.dt, pb.cfg.nt, [&](auto t_tag, auto nt_tag) {
    auto kernel = lstm_cluster_forward_kernel<decltype(t_tag), decltype(nt_tag)::value>;
    clusters = max_active_clusters(kernel, pb.l, device, stream, op);
  });
  return clusters;
}

}  // namespace
}  // namespace persistent
}  // namespace fusedconvlstm

STABLE_TORCH_LIBRARY_IMPL(fusedconvlstm, CUDA, m) {
  m.impl("lstm_persistent_forward_", TORCH_BOX(&fusedconvlstm::persistent::lstm_persistent_forward_));
  m.impl("lstm_cluster_forward_", TORCH_BOX(&fusedconvlstm::persistent::lstm_cluster_forward_));
  m.impl("lstm_cluster_max_active_clusters",
         TORCH_BOX(&fusedconvlstm::persistent::lstm_cluster_max_active_clusters));
  m.impl("lstm_persistent_forward_from_input_",
         TORCH_BOX(&fusedconvlstm::persistent::lstm_persistent_forward_from_input_));
}
