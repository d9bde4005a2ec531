// Host-side input checks shared by the CPU and CUDA kernels: the second line of
// defence behind the Python validation (vqfast/ops/), so a direct call of the
// op with bad tensors fails with a message instead of reading out of bounds.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

namespace vqfast {

// ema_update_: codebook and embed_avg (K, D), cluster_size (K,), one float32/float64
// dtype, contiguous; z (N, D); indices int64 (N,).
inline void check_ema_inputs(const torch::stable::Tensor& codebook, const torch::stable::Tensor& cluster_size,
                             const torch::stable::Tensor& embed_avg, const torch::stable::Tensor& z,
                             const torch::stable::Tensor& idx) {
  using torch::headeronly::ScalarType;
  STD_TORCH_CHECK(codebook.dim() == 2 && embed_avg.dim() == 2 && cluster_size.dim() == 1 &&
                      embed_avg.size(0) == codebook.size(0) && embed_avg.size(1) == codebook.size(1) &&
                      cluster_size.size(0) == codebook.size(0),
                  "ema_update_: codebook and embed_avg must be (K, D), cluster_size (K,)");
  STD_TORCH_CHECK(codebook.size(0) >= 1, "ema_update_: codebook is empty (K = 0)");
  STD_TORCH_CHECK(codebook.is_contiguous() && embed_avg.is_contiguous() && cluster_size.is_contiguous(),
                  "ema_update_: buffers must be contiguous");
  STD_TORCH_CHECK(z.dim() == 2 && z.size(1) == codebook.size(1), "ema_update_: z must be (N, D)");
  STD_TORCH_CHECK(idx.dim() == 1 && idx.size(0) == z.size(0) && idx.scalar_type() == ScalarType::Long,
                  "ema_update_: indices must be int64 (N,)");
  const ScalarType bt = codebook.scalar_type();
  STD_TORCH_CHECK(bt == ScalarType::Float || bt == ScalarType::Double, "ema_update_: buffers must be float32/float64");
  STD_TORCH_CHECK(cluster_size.scalar_type() == bt && embed_avg.scalar_type() == bt,
                  "ema_update_: codebook, cluster_size and embed_avg must share a dtype");
}

}  // namespace vqfast
