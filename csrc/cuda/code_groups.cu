// group_by_code (code_groups.cuh): CUB's stable radix sort of (key, row id)
// pairs on the low bits that hold [0, K], then each code's first position by a
// binary search over the sorted keys (one thread per code; no atomics, no scan).
#include "code_groups.cuh"

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <climits>

#include "common.cuh"

namespace vqfast {
namespace {

__global__ void __launch_bounds__(kThreads) iota_kernel(int* __restrict__ out, int n) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) out[i] = int(i);
}

// begin[k] = first position of a key >= k in sorted_keys[0, n), for k in [0, K].
__global__ void __launch_bounds__(kThreads)
    segment_begin_kernel(const uint32_t* __restrict__ sorted_keys, int n, int64_t K, int* __restrict__ begin) {
  const int64_t k = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (k > K) return;
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (int64_t(sorted_keys[mid]) < k) lo = mid + 1;
    else hi = mid;
  }
  begin[k] = lo;
}

inline unsigned blocks_for(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

}  // namespace

namespace gpu {

CodeGroups group_by_code(const Tensor& keys, int64_t K, cudaStream_t stream) {
  const int64_t N = keys.numel();
  STD_TORCH_CHECK(N <= INT_MAX, "vqfast group_by_code (CUDA): too many rows (", N, ")");
  STD_TORCH_CHECK(K >= 1 && K < INT_MAX, "vqfast group_by_code (CUDA): K out of range (", K, ")");
  CodeGroups g;
  g.order = device_empty(keys, {N}, ScalarType::Int);
  g.begin = device_empty(keys, {K + 1}, ScalarType::Int);
  int* begin = reinterpret_cast<int*>(g.begin.data_ptr());
  if (N == 0) {
    check_cuda(cudaMemsetAsync(begin, 0, size_t(K + 1) * sizeof(int), stream), "cudaMemsetAsync");
    return g;
  }
  const int n = int(N);
  Tensor row_ids = device_empty(keys, {N}, ScalarType::Int);
  Tensor sorted_keys = device_empty(keys, {N}, ScalarType::Int);
  int* ids = reinterpret_cast<int*>(row_ids.data_ptr());
  iota_kernel<<<blocks_for(N), kThreads, 0, stream>>>(ids, n);
  check_launch("iota_kernel");

  const auto* keys_in = reinterpret_cast<const uint32_t*>(keys.data_ptr());
  auto* keys_out = reinterpret_cast<uint32_t*>(sorted_keys.data_ptr());
  int* order = reinterpret_cast<int*>(g.order.data_ptr());
  const int end_bit = 32 - __builtin_clz(uint32_t(K));  // bits of K, the largest key
  size_t temp_bytes = 0;
  check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in, keys_out, ids, order, n, 0, end_bit,
                                             stream),
             "cub::DeviceRadixSort::SortPairs (size query)");
  Tensor temp = device_empty(keys, {int64_t(std::max<size_t>(temp_bytes, 1))}, ScalarType::Byte);
  check_cuda(cub::DeviceRadixSort::SortPairs(temp.data_ptr(), temp_bytes, keys_in, keys_out, ids, order, n, 0,
                                             end_bit, stream),
             "cub::DeviceRadixSort::SortPairs");
  check_launch("cub::DeviceRadixSort::SortPairs");

  segment_begin_kernel<<<blocks_for(K + 1), kThreads, 0, stream>>>(keys_out, n, K, begin);
  check_launch("segment_begin_kernel");
  return g;
}

}  // namespace gpu
}  // namespace vqfast
