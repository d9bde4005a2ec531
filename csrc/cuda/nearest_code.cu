// CUDA kernel of vqfast::nearest_code: for each row of z (N, D), the index of
// the nearest row of codebook (K, D) and its distance, without ever forming the
// N x K distance matrix. The search itself (tiling, tie rule, split path) is
// in search.cuh, shared with the quantize forward; this file is the op.
#include "search.cuh"

#include <climits>
#include <cstdint>
#include <optional>
#include <tuple>

namespace vqfast {
namespace {

template <typename T>
void dispatch_metric(int64_t metric, const Tensor& z, const Tensor& codebook, const Tensor& out_index,
                     const Tensor& out_dist, int64_t N, int K, int D, int32_t device_index, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  int64_t* idxp = reinterpret_cast<int64_t*>(out_index.data_ptr());
  acc_t* distp = reinterpret_cast<acc_t*>(out_dist.data_ptr());
  const bool vec = use_vec_loads<T>(z, codebook, D);
  // The macro pastes the lambda into each case, where M is a constexpr int.
  VQFAST_DISPATCH_METRIC(metric, [&] {
    if (vec) {
      launch_search<T, M, vec_width<T>(), false>(z, codebook, idxp, distp, nullptr, N, K, D, device_index, stream);
    } else {
      launch_search<T, M, 1, false>(z, codebook, idxp, distp, nullptr, N, K, D, device_index, stream);
    }
  });
}

std::tuple<Tensor, Tensor> nearest_code_cuda(Tensor z, Tensor codebook, int64_t metric) {
  STD_TORCH_CHECK(z.is_cuda() && codebook.is_cuda(), "vqfast nearest_code (CUDA): z and codebook must be CUDA tensors");
  STD_TORCH_CHECK(z.get_device_index() == codebook.get_device_index(),
                  "vqfast nearest_code: z and codebook must be on the same device");
  STD_TORCH_CHECK(z.dim() == 2 && codebook.dim() == 2, "vqfast nearest_code: z and codebook must be 2-D");
  STD_TORCH_CHECK(z.is_contiguous() && codebook.is_contiguous(),
                  "vqfast nearest_code: z and codebook must be contiguous");
  const ScalarType dtype = z.scalar_type();
  STD_TORCH_CHECK(codebook.scalar_type() == dtype, "vqfast nearest_code: z and codebook must have the same dtype");
  STD_TORCH_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Half || dtype == ScalarType::BFloat16 ||
                      dtype == ScalarType::Double,
                  "vqfast nearest_code: dtype must be float16, bfloat16, float32 or float64");
  STD_TORCH_CHECK(metric >= 0 && metric <= 2, "vqfast nearest_code: metric must be 0 (l2), 1 (cosine) or 2 (dot)");

  const int64_t N = z.size(0);
  const int64_t D = z.size(1);
  const int64_t K = codebook.size(0);
  STD_TORCH_CHECK(codebook.size(1) == D, "vqfast nearest_code: z and codebook must have the same dimension");
  STD_TORCH_CHECK(K >= 1, "vqfast nearest_code: the codebook is empty");
  // Codes and D travel as 32-bit ints inside the kernel (code < K + one tile).
  STD_TORCH_CHECK(K <= INT_MAX - 1024, "vqfast nearest_code (CUDA): K too large (", K, ")");
  STD_TORCH_CHECK(D <= INT_MAX - 1024, "vqfast nearest_code (CUDA): D too large (", D, ")");

  const int32_t device_index = z.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device_index);

  const ScalarType acc_dtype = acc_dtype_of(dtype);
  Tensor out_index = torch::stable::empty({N}, ScalarType::Long, std::nullopt, z.device());
  Tensor out_dist = torch::stable::empty({N}, acc_dtype, std::nullopt, z.device());
  if (N == 0) return std::make_tuple(out_index, out_dist);

  const cudaStream_t stream = current_stream(device_index);
  const int Ki = int(K), Di = int(D);
  switch (dtype) {
    case ScalarType::Float:
      dispatch_metric<float>(metric, z, codebook, out_index, out_dist, N, Ki, Di, device_index, stream);
      break;
    case ScalarType::Half:
      dispatch_metric<__half>(metric, z, codebook, out_index, out_dist, N, Ki, Di, device_index, stream);
      break;
    case ScalarType::BFloat16:
      dispatch_metric<__nv_bfloat16>(metric, z, codebook, out_index, out_dist, N, Ki, Di, device_index, stream);
      break;
    default:
      dispatch_metric<double>(metric, z, codebook, out_index, out_dist, N, Ki, Di, device_index, stream);
      break;
  }
  return std::make_tuple(out_index, out_dist);
}

}  // namespace
}  // namespace vqfast

STABLE_TORCH_LIBRARY_IMPL(vqfast, CUDA, m) { m.impl("nearest_code", TORCH_BOX(&vqfast::nearest_code_cuda)); }
