// nearest_code on the CPU: the search engine of search.h with an epilogue that
// writes each row's index and distance.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <limits>
#include <tuple>

#include "cpu/search.h"

namespace vqfast {
namespace cpu {
namespace {

template <typename scalar_t, int M>
void nearest_code_impl(const Tensor& z, const Tensor& codebook, Tensor& idx, Tensor& dist) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  const auto* zp = static_cast<const scalar_t*>(z.const_data_ptr());
  auto prepared = prepare_codebook<M>(static_cast<const scalar_t*>(codebook.const_data_ptr()), K, D);
  auto* out_idx = idx.mutable_data_ptr<int64_t>();
  auto* out_dist = static_cast<acc_t*>(dist.mutable_data_ptr());
  search<M>(zp, N, prepared, acc_scalar_type<acc_t>(),
            [&](int64_t r0, int64_t rows, const acc_t* zrows, const int64_t* index, const acc_t* score) {
              for (int64_t r = 0; r < rows; ++r) {
                out_idx[r0 + r] = index[r];
                out_dist[r0 + r] = finalize_distance<M, acc_t>(score[r], norm_term<M, acc_t>(sq_norm(zrows + r * D, D)));
              }
            });
}

std::tuple<Tensor, Tensor> nearest_code_cpu(const Tensor& z, const Tensor& codebook, int64_t metric) {
  check_search_inputs("nearest_code", z, codebook, metric);
  Tensor zc = torch::stable::contiguous(z);
  Tensor cc = torch::stable::contiguous(codebook);
  const int64_t N = zc.size(0);
  const ScalarType st = zc.scalar_type();
  // Poisoned (-1 / NaN) so a row the kernel fails to write cannot pass as an answer.
  // One pass over N values: nothing next to the N x K x D search.
  Tensor idx = torch::stable::new_empty(zc, {N}, ScalarType::Long);
  Tensor dist = torch::stable::new_empty(zc, {N}, st == ScalarType::Double ? ScalarType::Double : ScalarType::Float);
  torch::stable::fill_(idx, -1.0);
  torch::stable::fill_(dist, std::numeric_limits<double>::quiet_NaN());
  if (N == 0) return {idx, dist};
  VQFAST_CPU_DISPATCH_FLOAT(st, "nearest_code", [&] {
    VQFAST_DISPATCH_METRIC(metric, [&] { nearest_code_impl<scalar_t, M>(zc, cc, idx, dist); });
  });
  return {idx, dist};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(vqfast, CPU, m) { m.impl("nearest_code", TORCH_BOX(&nearest_code_cpu)); }

}  // namespace cpu
}  // namespace vqfast
