// Shared helpers of the CUDA kernels: stable-ABI tensor checks, the current stream, dtype
// dispatch and scalar conversions. Only stable-ABI headers are included (no torch/extension.h):
// the extension then loads into any torch at or above TORCH_TARGET_VERSION, and each file
// compiles in seconds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace fusedconvlstm {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::Long: return "int64";
    case ScalarType::Int: return "int32";
    default: return "an unsupported dtype";
  }
}

// Checks that name a kernel argument and what it must be.
inline void check_cuda_contiguous(const Tensor& t, const Tensor& like, const char* op, const char* name) {
  STD_TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  STD_TORCH_CHECK(t.get_device_index() == like.get_device_index(), op, ": ", name,
                  " must be on the device of the other arguments (cuda:", like.get_device_index(), "), got cuda:",
                  t.get_device_index());
  STD_TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_dtype(const Tensor& t, ScalarType want, const char* op, const char* name) {
  STD_TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", dtype_name(want), ", got ",
                  dtype_name(t.scalar_type()));
}

inline std::string shape_string(const int64_t* sizes, int64_t n) {
  std::string s = "(";
  for (int64_t i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (n == 1 ? ",)" : ")");
}

inline void check_shape(const Tensor& t, std::initializer_list<int64_t> shape, const char* op, const char* name) {
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  int64_t i = 0;
  for (int64_t s : shape) ok = ok && t.size(i++) == s;
  if (!ok) {
    std::vector<int64_t> got(t.dim());
    for (int64_t k = 0; k < t.dim(); ++k) got[k] = t.size(k);
    STD_TORCH_CHECK(false, op, ": ", name, " must have shape ", shape_string(shape.begin(), shape.size()),
                    ", got ", shape_string(got.data(), t.dim()));
  }
}

// The device pointer of an optional (B,) int64 `lengths` tensor, checked; null when absent.
inline const int64_t* optional_lengths(const std::optional<Tensor>& lengths, const Tensor& like, int64_t B,
                                       const char* op) {
  if (!lengths.has_value()) return nullptr;
  check_cuda_contiguous(*lengths, like, op, "lengths");
  check_dtype(*lengths, ScalarType::Long, op, "lengths");
  check_shape(*lengths, {B}, op, "lengths");
  return static_cast<const int64_t*>(lengths->data_ptr());
}

// The accumulation type: float for 16-bit and 32-bit storage, double for double.
inline ScalarType acc_dtype(ScalarType t) { return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

template <typename Fn>
void dispatch_floating(ScalarType t, const char* op, Fn&& fn) {
  switch (t) {
    case ScalarType::Half: fn(__half{}, float{}); break;
    case ScalarType::BFloat16: fn(__nv_bfloat16{}, float{}); break;
    case ScalarType::Float: fn(float{}, float{}); break;
    case ScalarType::Double: fn(double{}, double{}); break;
    default: STD_TORCH_CHECK(false, op, ": dtype must be float16, bfloat16, float32 or float64, got ", dtype_name(t));
  }
}

// Conversions through the CUDA intrinsics (torch builds with __CUDA_NO_HALF_CONVERSIONS__).
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T v) { return static_cast<Acc>(to_float(v)); }
template <>
__device__ __forceinline__ double to_acc<double, double>(double v) { return v; }

template <typename T>
struct FromFloat;
template <>
struct FromFloat<__half> {
  __device__ static __half cvt(float v) { return __float2half_rn(v); }
};
template <>
struct FromFloat<__nv_bfloat16> {
  __device__ static __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct FromFloat<float> {
  __device__ static float cvt(float v) { return v; }
};

template <typename T, typename Acc>
__device__ __forceinline__ T from_acc(Acc v) { return FromFloat<T>::cvt(static_cast<float>(v)); }
template <>
__device__ __forceinline__ double from_acc<double, double>(double v) { return v; }

template <typename Acc>
__device__ __forceinline__ Acc sigmoid(Acc x) { return Acc(1) / (Acc(1) + exp(-x)); }

inline unsigned int grid_for(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < 65535 * 32 ? blocks : 65535 * 32);
}

}  // namespace fusedconvlstm
