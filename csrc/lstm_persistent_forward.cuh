// What the forward kernels share (lstm_persistent_forward.cu: cooperative, and the variant that
// projects the input itself; lstm_cluster_forward.cu: the cluster kernel): their parameters, the
// store of a step's staged outputs, and the host side's tensor checks and launch set-up.
#pragma once

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

}  // namespace
}  // namespace persistent
}  // namespace fusedconvlstm
