// CUDA kernel of vqfast::ema_update_, in place. Formulas: vqfast/reference/ema.py;
// same structure and checks as the CPU kernel (csrc/cpu/ema_update.cpp).
//
// Always deterministic: the op's schema has no deterministic flag and the
// stable ABI does not expose torch.are_deterministic_algorithms_enabled(), so
// the batch statistics are always summed in a fixed order (rows sorted by
// code, each code's rows in row order); the sort costs little next to the
// search that produced the indices. On the current stream:
//   ema_keys_kernel      one warp per row: its code, or K (skip) when the row
//                        holds a NaN/Inf or its index is out of range.
//   group_by_code        stable CUB radix sort of the rows by code (code_groups.cu).
//   ema_code_kernel      one warp per code: the batch count and sum of its rows,
//                        in row order, and the EMA (torch.lerp's formula) of
//                        cluster_size and embed_avg.
//   ema_total_kernel     one block: n = sum_k cluster_size[k], in a fixed order.
//   ema_codebook_kernel  one warp per code: codebook = embed_avg / Laplace-smoothed
//                        cluster_size.
// Sums in the buffers' dtype (float32 or float64); 64-bit offsets.
#include "code_groups.cuh"
#include "common/checks.h"
#include "common.cuh"

#include <climits>
#include <cstdint>

namespace vqfast {
namespace {

// torch.lerp's formula, so the buffers follow torch's own EMA.
template <typename T>
__device__ __forceinline__ T lerp(T a, T b, T w) {
  return w < T(0.5) ? a + w * (b - a) : b - (b - a) * (T(1) - w);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ema_keys_kernel(const T* __restrict__ z, const int64_t* __restrict__ idx, int64_t N, int D, int64_t K,
                    uint32_t* __restrict__ keys) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= N) return;  // warp-uniform
  const T* zr = z + offset2d(row, 0, D);
  bool finite = true;
  for (int d = lane; d < D; d += 32) finite &= bool(isfinite(to_acc(zr[d])));
  finite = __all_sync(0xffffffffu, finite);
  if (lane == 0) {
    const int64_t k = idx[row];
    keys[row] = (finite && k >= 0 && k < K) ? uint32_t(k) : uint32_t(K);
  }
}

template <typename T, typename buf_t>
__global__ void __launch_bounds__(kThreads)
    ema_code_kernel(const T* __restrict__ z, const int* __restrict__ order, const int* __restrict__ begin, int64_t K,
                    int D, buf_t w, buf_t* __restrict__ cluster_size, buf_t* __restrict__ embed_avg) {
  const int lane = threadIdx.x & 31;
  const int64_t k = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (k >= K) return;
  const int b = begin[k], e = begin[k + 1];
  if (lane == 0) cluster_size[k] = lerp(cluster_size[k], buf_t(e - b), w);
  buf_t* avg = embed_avg + offset2d(k, 0, D);
  for (int d0 = 0; d0 < D; d0 += 32 * kSegR) {
    buf_t s[kSegR];
#pragma unroll
    for (int r = 0; r < kSegR; ++r) s[r] = buf_t(0);
    // Unrolled so that several rows' loads are in flight; the additions stay in row order.
#pragma unroll 4
    for (int j = b; j < e; ++j) {
      const T* zr = z + offset2d(order[j], 0, D);
#pragma unroll
      for (int r = 0; r < kSegR; ++r) {
        const int d = d0 + r * 32 + lane;
        if (d < D) s[r] += buf_t(to_acc(zr[d]));
      }
    }
#pragma unroll
    for (int r = 0; r < kSegR; ++r) {
      const int d = d0 + r * 32 + lane;
      if (d < D) avg[d] = lerp(avg[d], s[r], w);
    }
  }
}

template <typename buf_t>
__global__ void __launch_bounds__(kThreads)
    ema_total_kernel(const buf_t* __restrict__ cluster_size, int64_t K, buf_t* __restrict__ total) {
  const buf_t n = block_sum_array(cluster_size, K);
  if (threadIdx.x == 0) *total = n;
}

// One warp per code: codebook[k] = embed_avg[k] / ((N_k + eps) / (n + K eps) * n).
template <typename buf_t>
__global__ void __launch_bounds__(kThreads)
    ema_codebook_kernel(const buf_t* __restrict__ cluster_size, const buf_t* __restrict__ embed_avg,
                        const buf_t* __restrict__ total, int64_t K, int D, buf_t eps, buf_t* __restrict__ codebook) {
  const int lane = threadIdx.x & 31;
  const int64_t k = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (k >= K) return;
  const buf_t n = *total;
  const buf_t smoothed = (cluster_size[k] + eps) / (n + buf_t(K) * eps) * n;
  const buf_t* avg = embed_avg + offset2d(k, 0, D);
  buf_t* out = codebook + offset2d(k, 0, D);
  for (int d = lane; d < D; d += 32) out[d] = avg[d] / smoothed;
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

template <typename T, typename buf_t>
void ema_impl(Tensor& codebook, Tensor& cluster_size, Tensor& embed_avg, const Tensor& z, const Tensor& idx,
              double decay, double eps, cudaStream_t stream) {
  const int64_t N = z.size(0), K = codebook.size(0);
  const int D = int(z.size(1));
  const ScalarType bt = codebook.scalar_type();
  auto* cb = reinterpret_cast<buf_t*>(codebook.data_ptr());
  auto* cs = reinterpret_cast<buf_t*>(cluster_size.data_ptr());
  auto* ea = reinterpret_cast<buf_t*>(embed_avg.data_ptr());

  Tensor keys = device_empty(z, {N}, ScalarType::Int);
  if (N > 0) {
    ema_keys_kernel<T><<<unsigned((N + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(z.data_ptr()), reinterpret_cast<const int64_t*>(idx.data_ptr()), N, D, K,
        reinterpret_cast<uint32_t*>(keys.data_ptr()));
    check_launch("ema_keys_kernel");
  }
  const gpu::CodeGroups groups = gpu::group_by_code(keys, K, stream);

  const unsigned code_blocks = unsigned((K + kWarps - 1) / kWarps);  // one warp per code
  ema_code_kernel<T, buf_t><<<code_blocks, kThreads, 0, stream>>>(
      reinterpret_cast<const T*>(z.data_ptr()), reinterpret_cast<const int*>(groups.order.data_ptr()),
      reinterpret_cast<const int*>(groups.begin.data_ptr()), K, D, buf_t(1.0 - decay), cs, ea);
  check_launch("ema_code_kernel");

  Tensor total = device_empty(z, {1}, bt);
  buf_t* totalp = reinterpret_cast<buf_t*>(total.data_ptr());
  ema_total_kernel<buf_t><<<1, kThreads, 0, stream>>>(cs, K, totalp);
  check_launch("ema_total_kernel");

  ema_codebook_kernel<buf_t><<<code_blocks, kThreads, 0, stream>>>(cs, ea, totalp, K, D, buf_t(eps), cb);
  check_launch("ema_codebook_kernel");
}

void ema_update_cuda(Tensor& codebook, Tensor& cluster_size, Tensor& embed_avg, const Tensor& z, const Tensor& idx,
                     double decay, double eps) {
  check_ema_inputs(codebook, cluster_size, embed_avg, z, idx);
  const ScalarType bt = codebook.scalar_type();
  const int32_t device_index = codebook.get_device_index();
  for (const Tensor* t : std::initializer_list<const Tensor*>{&codebook, &cluster_size, &embed_avg, &z, &idx})
    STD_TORCH_CHECK(t->is_cuda() && t->get_device_index() == device_index,
                    "ema_update_ (CUDA): all tensors must be on the codebook's CUDA device");
  STD_TORCH_CHECK(codebook.size(0) >= 1, "ema_update_: codebook is empty (K = 0)");
  STD_TORCH_CHECK(codebook.size(0) < INT_MAX && codebook.size(1) <= INT_MAX - 1024,
                  "ema_update_ (CUDA): K or D too large");
  STD_TORCH_CHECK(z.size(0) <= INT_MAX, "ema_update_ (CUDA): too many rows (", z.size(0), ")");
  torch::stable::accelerator::DeviceGuard guard(device_index);
  const cudaStream_t stream = current_stream(device_index);
  Tensor zc = torch::stable::contiguous(z), ic = torch::stable::contiguous(idx);
  VQFAST_CUDA_DISPATCH_FLOAT(zc.scalar_type(), "ema_update_", [&] {
    if (bt == ScalarType::Double)
      ema_impl<scalar_t, double>(codebook, cluster_size, embed_avg, zc, ic, decay, eps, stream);
    else
      ema_impl<scalar_t, float>(codebook, cluster_size, embed_avg, zc, ic, decay, eps, stream);
  });
}

}  // namespace
}  // namespace vqfast

STABLE_TORCH_LIBRARY_IMPL(vqfast, CUDA, m) { m.impl("ema_update_", TORCH_BOX(&vqfast::ema_update_cuda)); }
