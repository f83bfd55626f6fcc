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
// fixed order: results are bitwise reproducible.
#include "lstm_persistent.cuh"

namespace fusedconvlstm {
namespace persistent {
namespace {

template <typename T>
struct ForwardParams : RecurrenceParams {
  const T* xg;     // (T, B, D, 4H)
  const T* w;      // (D, 4H, H)
  T* h_buf;        // (2, D, B, kp): h_buf[0] holds h0 on entry
  float* c_state;  // (D, B, H): c0 on entry, c_n on exit
  T* y;            // (T, B, D, H)
  float* ws;       // (T, B, D, 5H): i, f, g, o, c per step (zeros at masked steps); null: not saved
};

constexpr int kMt = 2;  // 32 rows per warp: 8 units x 4 gates

template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, 2) lstm_persistent_forward_kernel(const ForwardParams<T> p) {
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

  // W_hh rows gate * H + j0 + unit -> shared row gate * hs + unit; zero rows past H and zero
  // columns past H, so padded units produce finite junk that is never stored and padded k
  // contributes nothing.
  const T* w_d = p.w + static_cast<int64_t>(d) * G * H;
  for (int idx = tid; idx < l.rows_a * kp; idx += kThreads) {
    const int m = idx / kp, k = idx - m * kp;
    const int gate = m / hs, j = j0 + (m - gate * hs);
    T v = zero_value<T>();
    if (j < H && k < H) v = w_d[(static_cast<int64_t>(gate) * H + j) * H + k];
    reinterpret_cast<T*>(w_s + m * lda)[k] = v;
  }

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

  // The xg of this thread's first element (first tile, idx = tid) is loaded one step ahead,
  // while the block waits at the barrier, so that global-memory latency is off the critical path
  // of the common case (one element per thread). Other elements load when they are reached.
  const int first_n = tid / hs, first_jj = tid - first_n * hs;
  const bool has_first = tid < hs * bt && j0 + first_jj < H && bg * bt + first_n < B;
  float x_first[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  auto load_first_x = [&](int step) {
    if (!has_first) return;
    const int tt = rev ? p.seq_len - 1 - step : step;
    const int64_t row = (static_cast<int64_t>(tt) * B + bg * bt + first_n) * p.D + d;
    const T* x_row = p.xg + row * G + j0 + first_jj;
#pragma unroll
    for (int gate = 0; gate < 4; ++gate) x_first[gate] = to_float(x_row[gate * H]);
  };
  load_first_x(0);

  for (int s = 0; s < p.seq_len; ++s) {
    const int t = rev ? p.seq_len - 1 - s : s;
    const T* h_prev = p.h_buf + (s & 1) * buf_stride + static_cast<int64_t>(d) * B * kp;
    T* h_next = p.h_buf + ((s + 1) & 1) * buf_stride + static_cast<int64_t>(d) * B * kp;
    load_rows_async(h_s, lda, h_prev, kp, bg * bt, bt, B);
    for (int tile = bg; tile < l.nbt; tile += p.cfg.nbg) {
      cp_async_wait_all();
      __syncthreads();  // h tile (and, at the first step, the W slice) visible to all warps
      float acc[kMt][NT][4];
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
      warp_mma<T, kMt, NT>(acc, a_base, lda, b_base, lda, ks0, ks1, lane, p.precise);
      store_accumulators<kMt, NT>(red_warp, ldr, acc, m0, n0, lane);
      __syncthreads();  // partial sums complete; the h tile is free again
      // Prefetch the next batch tile's h while this tile's cell update runs.
      if (tile + p.cfg.nbg < l.nbt) load_rows_async(h_s, lda, h_prev, kp, (tile + p.cfg.nbg) * bt, bt, B);

      const int b0 = tile * bt;
      for (int idx = tid; idx < hs * bt; idx += kThreads) {
        const int n = idx / hs, jj = idx - n * hs;
        const int j = j0 + jj, b = b0 + n;
        if (j >= H || b >= B) continue;
        const int64_t state = (static_cast<int64_t>(d) * B + b) * H + j;
        const int64_t row = (static_cast<int64_t>(t) * B + b) * p.D + d;  // (t, b, d)
        T* y_out = p.y + row * H + j;
        float* ws_row = p.ws == nullptr ? nullptr : p.ws + row * H5 + j;
        T* h_out = h_next + static_cast<int64_t>(b) * kp + j;
        const bool valid = p.lengths == nullptr || t < p.lengths[b];
        if (!valid) {
          // Masked step: the state is carried (into the other buffer), the output is zero.
          *h_out = __ldcg(h_prev + static_cast<int64_t>(b) * kp + j);
          *y_out = zero_value<T>();
          if (ws_row != nullptr) {
#pragma unroll
            for (int k = 0; k < 5; ++k) ws_row[k * H] = 0.0f;
          }
          continue;
        }
        const T* x_row = p.xg + row * G + j;
        const bool first = tile == bg && idx == tid;
        const float* r = red + n * ldr + jj;
        float pre[4];
#pragma unroll
        for (int gate = 0; gate < 4; ++gate) {
          float a = r[gate * hs];
          for (int kw = 1; kw < p.cfg.wk; ++kw) a += r[kw * bt * ldr + gate * hs];
          pre[gate] = a + (first ? x_first[gate] : to_float(x_row[gate * H]));
        }
        const float i = sigmoid(pre[0]), f = sigmoid(pre[1]), g = tanhf(pre[2]), o = sigmoid(pre[3]);
        const float c_new = f * p.c_state[state] + i * g;
        const T h_new = from_acc<T, float>(o * tanhf(c_new));
        p.c_state[state] = c_new;
        *h_out = h_new;
        *y_out = h_new;
        if (ws_row != nullptr) {  // null when the forward saves nothing for a backward
          ws_row[0] = i;
          ws_row[H] = f;
          ws_row[2 * H] = g;
          ws_row[3 * H] = o;
          ws_row[4 * H] = c_new;
        }
      }
    }
    // No block reads h after the last step: no barrier there.
    if (s + 1 < p.seq_len) {
      barrier_arrive(counter);
      load_first_x(s + 1);
      barrier_wait(counter, static_cast<unsigned>(s + 1) * l.nu, s, p.watchdog_ns);
    }
  }
}

void lstm_persistent_forward_(Tensor xg, Tensor w_hh, std::optional<Tensor> lengths, int64_t reverse_mask, int64_t nt,
                              int64_t wm, int64_t wn, int64_t wk, int64_t nbg, bool precise, Tensor h_buf,
                              Tensor c_state, Tensor y, Tensor workspace, Tensor sync) {
  const char* op = "lstm_persistent_forward_";
  const Problem pb = check_problem(xg, "xg", nt, wm, wn, wk, nbg, precise, /*k_is_4h=*/false, 16 * kMt, 4, op);
  const int64_t T = pb.T, B = pb.B, D = pb.D, H = pb.H;
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&w_hh, "w_hh"}, {&h_buf, "h_buf"}, {&y, "y"}})
    check_dtype(*t, pb.dt, op, name);
  check_dtype(c_state, ScalarType::Float, op, "c_state");
  check_dtype(workspace, ScalarType::Float, op, "workspace");
  const std::pair<const Tensor*, const char*> all[] = {{&xg, "xg"}, {&w_hh, "w_hh"}, {&h_buf, "h_buf"},
                                                       {&c_state, "c_state"}, {&y, "y"}, {&workspace, "workspace"}};
  for (auto [t, name] : all) check_cuda_contiguous(*t, xg, op, name);
  check_shape(w_hh, {D, 4 * H, H}, op, "w_hh");
  check_shape(h_buf, {2, D, B, pb.l.kp}, op, "h_buf");
  check_aligned_16(h_buf, op, "h_buf");
  check_shape(c_state, {D, B, H}, op, "c_state");
  check_shape(y, {T, B, D, H}, op, "y");
  // An empty workspace: the forward saves nothing for a backward.
  if (workspace.numel() != 0) check_shape(workspace, {T, B, D, 5 * H}, op, "workspace");

  const int device = xg.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  cudaStream_t stream = current_stream(xg);
  const RecurrenceParams common = recurrence_params(pb, lengths, sync, xg, reverse_mask, precise, stream, op);
  dispatch_tile(pb.dt, pb.cfg.nt, [&](auto t_tag, auto nt_tag) {
    using Ts = decltype(t_tag);
    ForwardParams<Ts> p;
    static_cast<RecurrenceParams&>(p) = common;
    p.xg = static_cast<const Ts*>(xg.data_ptr());
    p.w = static_cast<const Ts*>(w_hh.data_ptr());
    p.h_buf = static_cast<Ts*>(h_buf.data_ptr());
    p.c_state = static_cast<float*>(c_state.data_ptr());
    p.y = static_cast<Ts*>(y.data_ptr());
    p.ws = workspace.numel() ? static_cast<float*>(workspace.data_ptr()) : nullptr;
    launch_cooperative(lstm_persistent_forward_kernel<Ts, decltype(nt_tag)::value>, p, pb.l, device, stream, op);
  });
}

}  // namespace
}  // namespace persistent
}  // namespace fusedconvlstm

STABLE_TORCH_LIBRARY_IMPL(fusedconvlstm, CUDA, m) {
  m.impl("lstm_persistent_forward_", TORCH_BOX(&fusedconvlstm::persistent::lstm_persistent_forward_));
}
