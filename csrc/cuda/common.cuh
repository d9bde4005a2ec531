// Device and host helpers shared by the CUDA kernels (csrc/cuda/*.cu): element
// types and conversions, warp and block sums, launch checks, streams, output
// poisoning. Everything is in an anonymous namespace: each .cu file compiles
// its own copy, so no device symbol crosses translation units.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/shim_utils.h>

#include <cstdint>
#include <initializer_list>
#include <optional>

#include "common/distance.h"

namespace vqfast {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int kThreads = 256;  // threads per block of every kernel
constexpr int kWarps = kThreads / 32;
// Kernels with one warp per code that sum that code's rows keep kSegR
// accumulators per lane: 32 * kSegR columns of D per pass over the rows.
constexpr int kSegR = 4;

// ---------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------

// Accumulator: float for half/bfloat16/float, double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// acc_t -> T, rounding to nearest even (as the CPU kernels' scalar_t(x)).
template <typename T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
__device__ __forceinline__ T zero_of();
template <>
__device__ __forceinline__ float zero_of<float>() { return 0.f; }
template <>
__device__ __forceinline__ double zero_of<double>() { return 0.0; }
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __ushort_as_half(0); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __ushort_as_bfloat16(0); }

// 1 / max(|v|, eps) from |v|^2: the cosine normalization scale.
template <typename acc_t>
__device__ __forceinline__ acc_t inv_norm(acc_t sq_norm) {
  return norm_term<kCosine, acc_t>(sq_norm);
}

// ---------------------------------------------------------------------------
// Warp and block sums (fixed order: deterministic)
// ---------------------------------------------------------------------------

// Butterfly sum over the warp; every lane gets the same value (each step adds
// the same two numbers on both lanes).
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum of squares of p[0..D), accumulated in acc_t by one warp; every lane gets it.
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t warp_sq_norm(const T* __restrict__ p, int64_t D, int lane) {
  acc_t sq = acc_t(0);
  for (int64_t d = lane; d < D; d += 32) {
    const acc_t x = to_acc(p[d]);
    sq += x * x;
  }
  return warp_sum(sq);
}

// Sum of v over the kThreads threads of the block, in a fixed order; every
// thread gets the same total. Every thread of the block must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v) {
  __shared__ acc_t s_warp[kWarps];
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x >> 5] = v;
  __syncthreads();
  acc_t s = s_warp[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) s += s_warp[w];
  __syncthreads();  // s_warp may be reused by the next call
  return s;
}

// block_sum, stored to *out by thread 0 (a per-block partial sum).
template <typename acc_t>
__device__ __forceinline__ void block_sum_store(acc_t v, acc_t* __restrict__ out) {
  const acc_t s = block_sum(v);
  if (threadIdx.x == 0) *out = s;
}

// Sum of x[0..n) by one block, in a fixed order (strided per thread, then
// block_sum): how per-block partial sums written by an earlier kernel are
// totalled without float atomics. Every thread gets the total.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum_array(const acc_t* __restrict__ x, int64_t n) {
  acc_t s = acc_t(0);
  for (int64_t i = threadIdx.x; i < n; i += kThreads) s += x[i];
  return block_sum(s);
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, "vqfast ", kernel, " launch failed: ", cudaGetErrorString(err));
}

inline void check_cuda(cudaError_t err, const char* what) {
  STD_TORCH_CHECK(err == cudaSuccess, "vqfast ", what, " failed: ", cudaGetErrorString(err));
}

inline cudaStream_t current_stream(int32_t device_index) {
  void* stream_ptr = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream_ptr));
  return static_cast<cudaStream_t>(stream_ptr);
}

inline int64_t element_size(ScalarType t) {
  switch (t) {
    case ScalarType::Half:
    case ScalarType::BFloat16:
      return 2;
    case ScalarType::Float:
    case ScalarType::Int:
      return 4;
    case ScalarType::Double:
    case ScalarType::Long:
      return 8;
    default:
      STD_TORCH_CHECK(false, "vqfast: unexpected dtype");
  }
  return 0;
}

// Fills a freshly allocated output with 0xFF bytes (NaN for floats, -1 for
// integers), so an element a kernel fails to write is visible.
inline void poison(const Tensor& t, cudaStream_t stream) {
  if (t.numel() == 0) return;
  check_cuda(cudaMemsetAsync(t.data_ptr(), 0xFF, size_t(t.numel() * element_size(t.scalar_type())), stream),
             "cudaMemsetAsync");
}

// An uninitialised CUDA tensor on `like`'s device.
inline Tensor device_empty(const Tensor& like, std::initializer_list<int64_t> sizes, ScalarType dtype) {
  return torch::stable::empty(sizes, dtype, std::nullopt, like.device());
}

inline ScalarType acc_dtype_of(ScalarType t) { return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

// Calls the lambda with `scalar_t` bound to the CUDA type of a floating dtype.
#define VQFAST_CUDA_DISPATCH_FLOAT(dtype, op, ...)                                                         \
  switch (dtype) {                                                                                         \
    case ScalarType::Float: { using scalar_t = float; __VA_ARGS__(); break; }                               \
    case ScalarType::Double: { using scalar_t = double; __VA_ARGS__(); break; }                             \
    case ScalarType::Half: { using scalar_t = __half; __VA_ARGS__(); break; }                               \
    case ScalarType::BFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__(); break; }                    \
    default: STD_TORCH_CHECK(false, op ": unsupported dtype (expected float16/bfloat16/float32/float64)"); \
  }

}  // namespace
}  // namespace vqfast
