// The LSTM cell's fused pointwise update, forward and backward, for the step-wise recurrence
// (one cuBLAS GEMM per step, then one of these kernels). Semantics and layouts are specified in
// fusedconvlstm/cuda/cell_ops.py; fusedconvlstm/cuda/cell_cpu.py is the same contract in
// PyTorch and the tests hold the two equal.
//
// One thread per (recurrence d, batch row b, hidden unit j): it reads the four gate
// pre-activations of unit j (columns j, H+j, 2H+j, 3H+j of the row), so the cell update needs no
// communication between threads. Gate math and c are in float (double for double tensors), and so
// are the GEMM results hh and dh_rec: cuBLAS writes its fp32 accumulators without rounding them
// to a 16-bit dtype, as the persistent kernels keep theirs.
#include "common.cuh"

namespace fusedconvlstm {
namespace {

struct StepIndex {
  int64_t d, b, j, t;
  bool valid;
};

// Which element a thread owns and the time index its recurrence is at. The forward walks a
// recurrence in its own direction; the backward walks it back.
__device__ __forceinline__ StepIndex step_index(int64_t idx, int64_t T, int64_t B, int64_t H, int64_t step,
                                                int64_t reverse_mask, bool backward, const int64_t* lengths) {
  StepIndex s;
  s.j = idx % H;
  s.b = (idx / H) % B;
  s.d = idx / (H * B);
  const bool reversed = (reverse_mask >> s.d) & 1;
  const bool forward_order = backward ? reversed : !reversed;
  s.t = forward_order ? step : T - 1 - step;
  s.valid = lengths == nullptr || s.t < lengths[s.b];
  return s;
}

template <typename T, typename Acc>
__global__ void lstm_cell_forward_kernel(const Acc* __restrict__ hh, const T* __restrict__ xg, T* __restrict__ h,
                                         Acc* __restrict__ c, T* __restrict__ y, Acc* __restrict__ ws,
                                         const int64_t* __restrict__ lengths, int64_t seq_len, int64_t B, int64_t D,
                                         int64_t H, int64_t step, int64_t reverse_mask) {
  const int64_t total = D * B * H;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const StepIndex s = step_index(idx, seq_len, B, H, step, reverse_mask, false, lengths);
    const int64_t row = (s.t * B + s.b) * D + s.d;  // (t, b, d) row of xg, y and ws
    T* y_out = y == nullptr ? nullptr : y + row * H + s.j;
    Acc* ws_row = ws == nullptr ? nullptr : ws + row * 5 * H + s.j;
    if (!s.valid) {
      if (y_out != nullptr) *y_out = from_acc<T, Acc>(Acc(0));
      if (ws != nullptr)
        for (int k = 0; k < 5; ++k) ws_row[k * H] = Acc(0);
      continue;
    }
    const T* x_row = xg + row * 4 * H + s.j;
    const Acc* hh_row = hh + (s.d * B + s.b) * 4 * H + s.j;
    const Acc i = sigmoid(to_acc<Acc>(x_row[0]) + hh_row[0]);
    const Acc f = sigmoid(to_acc<Acc>(x_row[H]) + hh_row[H]);
    const Acc g = tanh(to_acc<Acc>(x_row[2 * H]) + hh_row[2 * H]);
    const Acc o = sigmoid(to_acc<Acc>(x_row[3 * H]) + hh_row[3 * H]);
    const int64_t state = (s.d * B + s.b) * H + s.j;
    const Acc c_new = f * c[state] + i * g;
    const T h_new = from_acc<T, Acc>(o * tanh(c_new));
    c[state] = c_new;
    h[state] = h_new;
    if (y_out != nullptr) *y_out = h_new;  // null when only the final state is wanted
    if (ws != nullptr) {  // null when the forward saves nothing for a backward
      ws_row[0] = i;
      ws_row[H] = f;
      ws_row[2 * H] = g;
      ws_row[3 * H] = o;
      ws_row[4 * H] = c_new;
    }
  }
}

template <typename T, typename Acc>
__global__ void lstm_cell_backward_kernel(const Acc* __restrict__ dh_rec, const T* __restrict__ grad_y,
                                          const Acc* __restrict__ ws, const T* __restrict__ c0,
                                          Acc* __restrict__ dh_carry, Acc* __restrict__ dc, T* __restrict__ dgates,
                                          T* __restrict__ dgates_step, const int64_t* __restrict__ lengths,
                                          int64_t seq_len, int64_t B, int64_t D, int64_t H, int64_t step,
                                          int64_t reverse_mask) {
  const int64_t total = D * B * H;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const StepIndex s = step_index(idx, seq_len, B, H, step, reverse_mask, true, lengths);
    const int64_t row = (s.t * B + s.b) * D + s.d;
    const int64_t state = (s.d * B + s.b) * H + s.j;
    T* dg_row = dgates + row * 4 * H + s.j;
    T* dg_step = dgates_step + (s.d * B + s.b) * 4 * H + s.j;
    const Acc incoming = dh_rec[state] + dh_carry[state];
    if (!s.valid) {
      // A masked step passes dL/dh and dL/dc through unchanged (the state skipped it).
      dh_carry[state] = incoming;
      for (int k = 0; k < 4; ++k) {
        dg_row[k * H] = from_acc<T, Acc>(Acc(0));
        dg_step[k * H] = from_acc<T, Acc>(Acc(0));
      }
      continue;
    }
    const Acc* ws_row = ws + row * 5 * H + s.j;
    const Acc i = ws_row[0], f = ws_row[H], g = ws_row[2 * H], o = ws_row[3 * H], c = ws_row[4 * H];
    // c_{t-1}: the previous step of this recurrence, or c0 where the recurrence started here.
    const bool reversed = (reverse_mask >> s.d) & 1;
    const int64_t t_prev = reversed ? s.t + 1 : s.t - 1;
    bool from_ws = t_prev >= 0 && t_prev < seq_len;
    if (from_ws && reversed && lengths != nullptr) from_ws = t_prev < lengths[s.b];
    const Acc c_prev = from_ws ? ws[((t_prev * B + s.b) * D + s.d) * 5 * H + 4 * H + s.j] : to_acc<Acc>(c0[state]);

    const Acc dh = incoming + to_acc<Acc>(grad_y[row * H + s.j]);
    const Acc tc = tanh(c);
    const Acc dc_t = dc[state] + dh * o * (Acc(1) - tc * tc);
    const Acc d_i = dc_t * g * i * (Acc(1) - i);
    const Acc d_f = dc_t * c_prev * f * (Acc(1) - f);
    const Acc d_g = dc_t * i * (Acc(1) - g * g);
    const Acc d_o = dh * tc * o * (Acc(1) - o);
    const Acc grads[4] = {d_i, d_f, d_g, d_o};
    for (int k = 0; k < 4; ++k) {
      const T v = from_acc<T, Acc>(grads[k]);
      dg_row[k * H] = v;
      dg_step[k * H] = v;
    }
    dc[state] = dc_t * f;
    dh_carry[state] = Acc(0);
  }
}

constexpr int kCellThreads = 256;  // the pointwise kernels' block size

void lstm_cell_forward_(Tensor hh, Tensor xg, Tensor h, Tensor c, Tensor y, Tensor workspace,
                        std::optional<Tensor> lengths, int64_t step, int64_t reverse_mask) {
  const char* op = "lstm_cell_forward_";
  STD_TORCH_CHECK(xg.dim() == 4, op, ": xg must be 4-D (T, B, D, 4H)");
  const int64_t T = xg.size(0), B = xg.size(1), D = xg.size(2), H = xg.size(3) / 4;
  STD_TORCH_CHECK(xg.size(3) == 4 * H, op, ": xg.shape[3] must be a multiple of 4");
  STD_TORCH_CHECK(step >= 0 && step < T, op, ": step must lie in [0, ", T, "), got ", step);
  const ScalarType dt = xg.scalar_type();
  const ScalarType acc = acc_dtype(dt);
  const std::pair<const Tensor*, const char*> same_dtype[] = {{&h, "h"}, {&y, "y"}};
  for (auto [t, name] : same_dtype) check_dtype(*t, dt, op, name);
  check_dtype(hh, acc, op, "hh");
  check_dtype(c, acc, op, "c");
  check_dtype(workspace, acc, op, "workspace");
  const std::pair<const Tensor*, const char*> all[] = {{&hh, "hh"}, {&xg, "xg"}, {&h, "h"}, {&c, "c"},
                                                       {&y, "y"},   {&workspace, "workspace"}};
  for (auto [t, name] : all) check_cuda_contiguous(*t, xg, op, name);
  check_shape(hh, {D, B, 4 * H}, op, "hh");
  check_shape(h, {D, B, H}, op, "h");
  check_shape(c, {D, B, H}, op, "c");
  // An empty y: only the final state is wanted; an empty workspace: nothing saved for a backward.
  if (y.numel() != 0) check_shape(y, {T, B, D, H}, op, "y");
  if (workspace.numel() != 0) check_shape(workspace, {T, B, D, 5 * H}, op, "workspace");
  const int64_t* len = optional_lengths(lengths, xg, B, op);
  const int64_t total = D * B * H;
  if (total == 0) return;
  torch::stable::accelerator::DeviceGuard guard(xg.get_device_index());
  cudaStream_t stream = current_stream(xg);
  dispatch_floating(dt, op, [&](auto t_tag, auto acc_tag) {
    using Ts = decltype(t_tag);
    using Acc = decltype(acc_tag);
    lstm_cell_forward_kernel<Ts, Acc><<<grid_for(total, kCellThreads), kCellThreads, 0, stream>>>(
        static_cast<const Acc*>(hh.data_ptr()), static_cast<const Ts*>(xg.data_ptr()), static_cast<Ts*>(h.data_ptr()),
        static_cast<Acc*>(c.data_ptr()), y.numel() ? static_cast<Ts*>(y.data_ptr()) : nullptr, workspace.numel() ? static_cast<Acc*>(workspace.data_ptr()) : nullptr,
        len, T, B, D, H, step, reverse_mask);
  });
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

void lstm_cell_backward_(Tensor dh_rec, Tensor grad_y, Tensor workspace, Tensor c0, Tensor dh_carry, Tensor dc,
                         Tensor dgates, Tensor dgates_step, std::optional<Tensor> lengths, int64_t step,
                         int64_t reverse_mask) {
  const char* op = "lstm_cell_backward_";
  STD_TORCH_CHECK(dgates.dim() == 4, op, ": dgates must be 4-D (T, B, D, 4H)");
  const int64_t T = dgates.size(0), B = dgates.size(1), D = dgates.size(2), H = dgates.size(3) / 4;
  STD_TORCH_CHECK(dgates.size(3) == 4 * H, op, ": dgates.shape[3] must be a multiple of 4");
  STD_TORCH_CHECK(step >= 0 && step < T, op, ": step must lie in [0, ", T, "), got ", step);
  const ScalarType dt = dgates.scalar_type();
  const ScalarType acc = acc_dtype(dt);
  const std::pair<const Tensor*, const char*> same_dtype[] = {
      {&grad_y, "grad_y"}, {&c0, "c0"}, {&dgates_step, "dgates_step"}};
  for (auto [t, name] : same_dtype) check_dtype(*t, dt, op, name);
  const std::pair<const Tensor*, const char*> acc_args[] = {
      {&dh_rec, "dh_rec"}, {&workspace, "workspace"}, {&dh_carry, "dh_carry"}, {&dc, "dc"}};
  for (auto [t, name] : acc_args) check_dtype(*t, acc, op, name);
  const std::pair<const Tensor*, const char*> all[] = {
      {&dh_rec, "dh_rec"}, {&grad_y, "grad_y"}, {&workspace, "workspace"}, {&c0, "c0"},
      {&dh_carry, "dh_carry"}, {&dc, "dc"}, {&dgates, "dgates"}, {&dgates_step, "dgates_step"}};
  for (auto [t, name] : all) check_cuda_contiguous(*t, dgates, op, name);
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&dh_rec, "dh_rec"}, {&c0, "c0"}, {&dh_carry, "dh_carry"}, {&dc, "dc"}})
    check_shape(*t, {D, B, H}, op, name);
  check_shape(grad_y, {T, B, D, H}, op, "grad_y");
  check_shape(workspace, {T, B, D, 5 * H}, op, "workspace");
  check_shape(dgates_step, {D, B, 4 * H}, op, "dgates_step");
  const int64_t* len = optional_lengths(lengths, dgates, B, op);
  const int64_t total = D * B * H;
  if (total == 0) return;
  torch::stable::accelerator::DeviceGuard guard(dgates.get_device_index());
  cudaStream_t stream = current_stream(dgates);
  dispatch_floating(dt, op, [&](auto t_tag, auto acc_tag) {
    using Ts = decltype(t_tag);
    using Acc = decltype(acc_tag);
    lstm_cell_backward_kernel<Ts, Acc><<<grid_for(total, kCellThreads), kCellThreads, 0, stream>>>(
        static_cast<const Acc*>(dh_rec.data_ptr()), static_cast<const Ts*>(grad_y.data_ptr()),
        static_cast<const Acc*>(workspace.data_ptr()), static_cast<const Ts*>(c0.data_ptr()),
        static_cast<Acc*>(dh_carry.data_ptr()), static_cast<Acc*>(dc.data_ptr()), static_cast<Ts*>(dgates.data_ptr()),
        static_cast<Ts*>(dgates_step.data_ptr()), len, T, B, D, H, step, reverse_mask);
  });
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace fusedconvlstm

STABLE_TORCH_LIBRARY_IMPL(fusedconvlstm, CUDA, m) {
  m.impl("lstm_cell_forward_", TORCH_BOX(&fusedconvlstm::lstm_cell_forward_));
  m.impl("lstm_cell_backward_", TORCH_BOX(&fusedconvlstm::lstm_cell_backward_));
}
