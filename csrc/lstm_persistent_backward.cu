// Persistent LSTM recurrence, backward: the whole reverse-time sweep in one cooperative launch.
//
// Per step (walking each recurrence opposite to its forward direction), for hidden unit j and
// batch row b:  dh = dh_rec + dh_carry + grad_y[t],  dc_t = dc + dh o (1 - tanh² c_t),  the four
// gate-pre-activation gradients dG_t (they are grad_xg), dc <- dc_t f, and for the next step
// dh_rec = dG_t · W_hh[:, j]. That product needs all 4H columns of dG_t, so dG (not dh) is what
// crosses blocks: block (d, bg, u) keeps the columns W_hh[:, u*hs : (u+1)*hs] (transposed, hs rows
// x 4H) in shared memory for the whole sweep, writes its units' dG_t into a double buffer
// (g_buf[(s + 1) % 2]) and, after the group barrier, reads the whole dG_t tile of its batch rows
// from g_buf[s % 2]. dh_carry holds dL/dh that skipped masked steps (lengths); dc and dh_carry
// stay with the thread that owns (unit, row). Step s = T is a final half step: it only forms
// dh_rec from dG_0 and leaves grad_h0 = dh_rec + dh_carry in dh_carry.
//
// No atomics touch the results: partial sums of the reduction warps are added in a fixed order,
// so the gradients are bitwise reproducible. dW_hh = Σ_t dG_tᵀ h_{t-1} is one batched GEMM after
// this kernel (fusedconvlstm.numerics.recurrence.recurrent_weight_grads).
#include "lstm_persistent.cuh"

namespace fusedconvlstm {
namespace persistent {
namespace {

template <typename T>
struct BackwardParams : RecurrenceParams {
  const T* grad_y;  // (T, B, D, H)
  const float* ws;  // (T, B, D, 5H) from the forward: i, f, g, o, c
  const float* c0;  // (D, B, H)
  const T* w;       // (D, 4H, H)
  float* dh_carry;  // (D, B, H): grad_h_n on entry, grad_h0 on exit
  float* dc;        // (D, B, H): grad_c_n on entry, grad_c0 on exit
  T* dgates;        // (T, B, D, 4H)
  T* g_buf;         // (2, D, B, kp): zero on entry
};

constexpr int kMt = kBackwardMt;  // 16 units per warp row

// What the cell backward of (t, b, d, j) reads besides the recurrent part: grad_y, the saved
// activations and c_t, and c_{t-1}.
struct StepInputs {
  float grad_y, i, f, g, o, c, c_prev;
};

template <typename T>
__device__ __forceinline__ StepInputs load_step_inputs(const BackwardParams<T>& p, bool rev, int t, int b, int d,
                                                       int j) {
  const int64_t H5 = 5 * static_cast<int64_t>(p.H);
  const int64_t row = (static_cast<int64_t>(t) * p.B + b) * p.D + d;
  const float* ws_row = p.ws + row * H5 + j;
  StepInputs in;
  in.grad_y = to_float(p.grad_y[row * p.H + j]);
  in.i = ws_row[0];
  in.f = ws_row[p.H];
  in.g = ws_row[2 * p.H];
  in.o = ws_row[3 * p.H];
  in.c = ws_row[4 * p.H];
  // c_{t-1}: the previous step of this recurrence, or c0 where the recurrence started (t = 0,
  // t = T - 1 reversed, or a reversed row's last valid step).
  const int t_prev = rev ? t + 1 : t - 1;
  bool from_ws = t_prev >= 0 && t_prev < p.seq_len;
  if (from_ws && rev && p.lengths != nullptr) from_ws = t_prev < p.lengths[b];
  in.c_prev = from_ws ? p.ws[((static_cast<int64_t>(t_prev) * p.B + b) * p.D + d) * H5 + 4 * p.H + j]
                      : p.c0[(static_cast<int64_t>(d) * p.B + b) * p.H + j];
  return in;
}

template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) lstm_persistent_backward_kernel(const BackwardParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout& l = p.l;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int u = blockIdx.x % l.nu;
  const int bg = (blockIdx.x / l.nu) % p.cfg.nbg;
  const int d = blockIdx.x / (l.nu * p.cfg.nbg);
  const int H = p.H, B = p.B, hs = l.hs, bt = l.bt, kp = l.kp, lda = l.lda, ldr = l.ldr;
  const int j0 = u * hs;
  const int G = 4 * H;

  unsigned char* w_s = smem;
  unsigned char* g_s = w_s + l.rows_a * lda;
  float* red = reinterpret_cast<float*>(g_s + bt * lda);

  // Shared row jj, column k = W_hh[k, j0 + jj]: the transpose of this block's columns, so both
  // mma operands are k-contiguous. Consecutive threads take consecutive units (coalesced reads).
  const T* w_d = p.w + static_cast<int64_t>(d) * G * H;
  for (int idx = tid; idx < l.rows_a * kp; idx += kThreads) {
    const int k = idx / hs, jj = idx - k * hs;
    const int j = j0 + jj;
    T v = zero_value<T>();
    if (j < H && k < G) v = w_d[static_cast<int64_t>(k) * H + j];
    reinterpret_cast<T*>(w_s + jj * lda)[k] = v;
  }

  const int wm = warp % p.cfg.wm, wn = (warp / p.cfg.wm) % p.cfg.wn, wk = warp / (p.cfg.wm * p.cfg.wn);
  const int nks = kp * static_cast<int>(sizeof(T)) / kKStepBytes;
  const int ks0 = wk * nks / p.cfg.wk, ks1 = (wk + 1) * nks / p.cfg.wk;
  const int m0 = wm * 16 * kMt, n0 = wn * 8 * NT;
  const uint32_t a_base = smem_addr(w_s) + m0 * lda;
  const uint32_t b_base = smem_addr(g_s) + n0 * lda;
  float* red_warp = red + wk * bt * ldr;
  const bool rev = (p.reverse_mask >> d) & 1;
  unsigned* counter = p.sync + (d * p.cfg.nbg + bg) * kSyncStride;
  const int64_t buf_stride = static_cast<int64_t>(p.D) * B * kp;
  const int n_steps = p.seq_len;

  // The inputs of this thread's first element (first tile, idx = tid) are loaded one step ahead,
  // while the block waits at the barrier (see the forward kernel).
  const int first_n = tid / hs, first_jj = tid - first_n * hs;
  const bool has_first = tid < hs * bt && j0 + first_jj < H && bg * bt + first_n < B;
  StepInputs first_in{};
  auto load_first = [&](int step) {
    if (!has_first) return;
    first_in = load_step_inputs(p, rev, rev ? step : n_steps - 1 - step, bg * bt + first_n, d, j0 + first_jj);
  };
  load_first(0);

  // dG of the block's last batch tile of a step goes to the exchange buffer at once and to
  // dgates (grad_xg, read by no block) after the barrier's arrive: it is staged in the dG tile
  // (free once that tile's products are done), so the arrive's fence waits only for the exchange
  // (as in the forward kernels).
  const int last_tile = bg + (l.nbt - 1 - bg) / p.cfg.nbg * p.cfg.nbg;
  T* dg_s = reinterpret_cast<T*>(g_s);  // [gate * hs * bt + n * hs + jj]
  const bool defer = 4 * hs * bt * static_cast<int>(sizeof(T)) <= bt * lda;
  auto store_deferred = [&](int t) {
    if (!defer) return;
    const int b0 = last_tile * bt;
    for (int idx = tid; idx < hs * bt; idx += kThreads) {
      const int n = idx / hs, j = j0 + (idx - n * hs), b = b0 + n;
      if (j >= H || b >= B) continue;
      T* dg = p.dgates + ((static_cast<int64_t>(t) * B + b) * p.D + d) * G + j;
#pragma unroll
      for (int gate = 0; gate < 4; ++gate) dg[gate * H] = dg_s[gate * hs * bt + idx];
    }
  };

  for (int s = 0; s <= n_steps; ++s) {
    const bool last = s == n_steps;
    const int t = rev ? s : n_steps - 1 - s;  // the forward's order, walked back
    const T* g_prev = p.g_buf + (s & 1) * buf_stride + static_cast<int64_t>(d) * B * kp;
    T* g_next = p.g_buf + ((s + 1) & 1) * buf_stride + static_cast<int64_t>(d) * B * kp;
    load_rows_async(g_s, lda, g_prev, kp, bg * bt, bt, B);
    for (int tile = bg; tile < l.nbt; tile += p.cfg.nbg) {
      cp_async_wait_all();
      __syncthreads();
      warp_tile_to_partial_sums<T, kMt, NT>(red_warp, ldr, a_base, b_base, lda, ks0, ks1, m0, n0, lane, p.precise);
      __syncthreads();
      if (tile + p.cfg.nbg < l.nbt) load_rows_async(g_s, lda, g_prev, kp, (tile + p.cfg.nbg) * bt, bt, B);

      const int b0 = tile * bt;
      // Where this tile's dG goes besides the exchange: dgates row (t, b0 + n, d), or staged.
      const bool staged = defer && tile == last_tile;
      // (None at the final half step, which writes no dG: there t is past the sequence.)
      T* dg_base = last     ? nullptr
                   : staged ? dg_s
                            : p.dgates + ((static_cast<int64_t>(t) * B + b0) * p.D + d) * G + j0;
      const int64_t dg_rows = staged ? hs : static_cast<int64_t>(p.D) * G;
      const int dg_gates = staged ? hs * bt : H;
      for (int idx = tid; idx < hs * bt; idx += kThreads) {
        const int n = idx / hs, jj = idx - n * hs;
        const int j = j0 + jj, b = b0 + n;
        if (j >= H || b >= B) continue;
        const float* r = red + n * ldr + jj;
        float dh_rec = r[0];
        for (int kw = 1; kw < p.cfg.wk; ++kw) dh_rec += r[kw * bt * ldr];
        const int64_t state = (static_cast<int64_t>(d) * B + b) * H + j;
        const float incoming = dh_rec + p.dh_carry[state];
        if (last) {
          p.dh_carry[state] = incoming;  // grad_h0; dc already holds grad_c0
          continue;
        }
        T* dg = dg_base + n * dg_rows + jj;
        T* g_out = g_next + static_cast<int64_t>(b) * kp + j;
        const bool valid = p.lengths == nullptr || t < p.lengths[b];
        if (!valid) {
          // A masked step passes dL/dh and dL/dc through unchanged; its dG is zero (and must be
          // written: the buffer still holds the dG of two steps ago).
          p.dh_carry[state] = incoming;
#pragma unroll
          for (int gate = 0; gate < 4; ++gate) {
            dg[gate * dg_gates] = zero_value<T>();
            g_out[gate * H] = zero_value<T>();
          }
          continue;
        }
        const StepInputs in = tile == bg && idx == tid ? first_in : load_step_inputs(p, rev, t, b, d, j);
        const float i = in.i, f = in.f, g = in.g, o = in.o, c = in.c, c_prev = in.c_prev;
        const float dh = incoming + in.grad_y;
        const float tc = tanhf(c);
        const float dc_t = p.dc[state] + dh * o * (1.0f - tc * tc);
        const float grads[4] = {dc_t * g * i * (1.0f - i), dc_t * c_prev * f * (1.0f - f),
                                dc_t * i * (1.0f - g * g), dh * tc * o * (1.0f - o)};
#pragma unroll
        for (int gate = 0; gate < 4; ++gate) {
          const T v = from_acc<T, float>(grads[gate]);
          dg[gate * dg_gates] = v;
          g_out[gate * H] = v;
        }
        p.dc[state] = dc_t * f;
        p.dh_carry[state] = 0.0f;
      }
    }
    if (!last) {
      barrier_arrive(counter);
      if (s + 1 < n_steps) load_first(s + 1);
      store_deferred(t);  // the dG tile is rewritten only after the wait's __syncthreads
      barrier_wait(counter, static_cast<unsigned>(s + 1) * l.nu, s, p.watchdog_ns, p.poll_ns);
    }
  }
}

void lstm_persistent_backward_(Tensor grad_y, Tensor workspace, Tensor c0, Tensor w_hh, std::optional<Tensor> lengths,
                               int64_t reverse_mask, int64_t nt, int64_t wm, int64_t wn, int64_t wk, int64_t nbg,
                               bool precise, Tensor dh_carry, Tensor dc, Tensor dgates, Tensor g_buf, Tensor sync) {
  const char* op = "lstm_persistent_backward_";
  const Problem pb = check_problem(dgates, "dgates", nt, wm, wn, wk, nbg, precise, /*k_is_4h=*/true, 16 * kMt, 1, op);
  const int64_t T = pb.T, B = pb.B, D = pb.D, H = pb.H;
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&grad_y, "grad_y"}, {&w_hh, "w_hh"}, {&g_buf, "g_buf"}})
    check_dtype(*t, pb.dt, op, name);
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&workspace, "workspace"}, {&c0, "c0"},
                         {&dh_carry, "dh_carry"}, {&dc, "dc"}})
    check_dtype(*t, ScalarType::Float, op, name);
  const std::pair<const Tensor*, const char*> all[] = {
      {&grad_y, "grad_y"}, {&workspace, "workspace"}, {&c0, "c0"}, {&w_hh, "w_hh"},
      {&dh_carry, "dh_carry"}, {&dc, "dc"}, {&dgates, "dgates"}, {&g_buf, "g_buf"}};
  for (auto [t, name] : all) check_cuda_contiguous(*t, dgates, op, name);
  check_shape(grad_y, {T, B, D, H}, op, "grad_y");
  check_shape(workspace, {T, B, D, 5 * H}, op, "workspace");
  check_shape(w_hh, {D, 4 * H, H}, op, "w_hh");
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&c0, "c0"}, {&dh_carry, "dh_carry"}, {&dc, "dc"}})
    check_shape(*t, {D, B, H}, op, name);
  check_shape(g_buf, {2, D, B, pb.l.kp}, op, "g_buf");
  check_aligned_16(g_buf, op, "g_buf");

  const int device = dgates.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  cudaStream_t stream = current_stream(dgates);
  const RecurrenceParams common = recurrence_params(pb, lengths, &sync, dgates, reverse_mask, precise, stream, op);
  dispatch_tile(pb.dt, pb.cfg.nt, [&](auto t_tag, auto nt_tag) {
    using Ts = decltype(t_tag);
    BackwardParams<Ts> p;
    static_cast<RecurrenceParams&>(p) = common;
    p.grad_y = static_cast<const Ts*>(grad_y.data_ptr());
    p.ws = static_cast<const float*>(workspace.data_ptr());
    p.c0 = static_cast<const float*>(c0.data_ptr());
    p.w = static_cast<const Ts*>(w_hh.data_ptr());
    p.dh_carry = static_cast<float*>(dh_carry.data_ptr());
    p.dc = static_cast<float*>(dc.data_ptr());
    p.dgates = static_cast<Ts*>(dgates.data_ptr());
    p.g_buf = static_cast<Ts*>(g_buf.data_ptr());
    launch_cooperative(lstm_persistent_backward_kernel<Ts, decltype(nt_tag)::value>, p, pb.l, device, stream, op);
  });
}

}  // namespace
}  // namespace persistent
}  // namespace fusedconvlstm

STABLE_TORCH_LIBRARY_IMPL(fusedconvlstm, CUDA, m) {
  m.impl("lstm_persistent_backward_", TORCH_BOX(&fusedconvlstm::persistent::lstm_persistent_backward_));
}
