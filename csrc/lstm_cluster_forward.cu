// Persistent LSTM recurrence, forward on thread-block clusters (sm_90; opt-in until measured).
// The launch plan (fusedconvlstm/cuda/cluster.py) picks it only where it is preferred
// (FUSEDCONVLSTM_LSTM_FWD_KERNEL=cluster) and the device places its clusters; deleting this
// kernel is this file, that one, and the branches that name them.
#include "lstm_persistent_forward.cuh"

namespace fusedconvlstm {
namespace persistent {
namespace {

// (unit, row) elements per thread in the cluster kernel: hs * bt = 64 * nt * wm * wn <= 2048.
constexpr int kClusterElems = 8;
// Of those, the first kClusterPrefetch (lstm_constants.h) have their xg loaded a step ahead
// (while the cluster waits at its barrier): all of them at the reference shape (hs * bt = 512,
// two per thread).

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
  m.impl("lstm_cluster_forward_", TORCH_BOX(&fusedconvlstm::persistent::lstm_cluster_forward_));
  m.impl("lstm_cluster_max_active_clusters",
         TORCH_BOX(&fusedconvlstm::persistent::lstm_cluster_max_active_clusters));
}
