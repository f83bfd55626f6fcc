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
#include "lstm_persistent_forward.cuh"

namespace fusedconvlstm {
namespace persistent {
namespace {


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
      barrier_wait(counter, static_cast<unsigned>(s + 1) * l.nu, s, p.watchdog_ns, p.poll_ns);
    } else {
      store_deferred(t);  // each thread stores the elements it staged: no __syncthreads needed
    }
  }
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

}  // namespace
}  // namespace persistent
}  // namespace fusedconvlstm

STABLE_TORCH_LIBRARY_IMPL(fusedconvlstm, CUDA, m) {
  m.impl("lstm_persistent_forward_", TORCH_BOX(&fusedconvlstm::persistent::lstm_persistent_forward_));
  m.impl("lstm_persistent_forward_from_input_",
         TORCH_BOX(&fusedconvlstm::persistent::lstm_persistent_forward_from_input_));
}
