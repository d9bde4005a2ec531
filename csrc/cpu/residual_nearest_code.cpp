// residual_nearest_code on the CPU: all Q stages of a residual search fused
// into one pass over z (vqfast/reference/residual.py is the definition).
//
// A task owns a block of rows. It loads them once into a residual buffer in the
// accumulation type, then for each stage runs search.h's block search against
// that stage's codebook, writes the stage's indices and distances, and
// subtracts the chosen codes from the residual in place. The residual never
// leaves the thread (nor, at kRowBlock x D, its L2), against Q round trips of an
// (N, D) residual through memory for Q separate nearest_code calls. All Q
// codebooks are prepared (fp32 copy, transposed copy for small D, code terms)
// once, before the parallel loop.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <limits>
#include <tuple>
#include <vector>

#include "cpu/search.h"

namespace vqfast {
namespace cpu {
namespace {

// Rows per task: kRowBlock when there are enough rows to feed every thread,
// fewer when N is small. Splitting codes across tasks, as the single-stage
// search does, would need a merge between stages; smaller row blocks need none.
int64_t residual_rows_per_task(int64_t N) {
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
  const int64_t even = (N + threads - 1) / threads;
  return std::max<int64_t>(kMicroRows, std::min<int64_t>(kRowBlock, even));
}

template <typename scalar_t, int M>
void residual_nearest_code_impl(const Tensor& z, const Tensor& codebooks, Tensor& idx, Tensor& dist) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t N = z.size(0), D = z.size(1), Q = codebooks.size(0), K = codebooks.size(1);
  const auto* zp = static_cast<const scalar_t*>(z.const_data_ptr());
  const auto* cbp = static_cast<const scalar_t*>(codebooks.const_data_ptr());
  std::vector<PreparedCodebook<acc_t>> stages;
  stages.reserve(static_cast<size_t>(Q));
  for (int64_t q = 0; q < Q; ++q) stages.push_back(prepare_codebook<M>(cbp + q * K * D, K, D));
  auto* out_idx = idx.mutable_data_ptr<int64_t>();
  auto* out_dist = static_cast<acc_t*>(dist.mutable_data_ptr());
  const fortran_gemm_t<acc_t> gemm = fortran_gemm<acc_t>();
  const ScalarType acc_dtype = acc_scalar_type<acc_t>();
  const int64_t block = residual_rows_per_task(N);
  const int64_t blocks = (N + block - 1) / block;

  torch::stable::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<acc_t> residual(static_cast<size_t>(block * D));
    BlockScratch<acc_t> scratch(D);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t r0 = b * block;
      const int64_t rows = std::min(block, N - r0);
      load_rows(zp + offset2d(r0, 0, D), rows, D, residual.data());
      for (int64_t q = 0; q < Q; ++q) {
        const PreparedCodebook<acc_t>& cb = stages[static_cast<size_t>(q)];
        search_block<M, acc_t>(residual.data(), rows, cb, 0, K, scratch, gemm, acc_dtype);
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* res = residual.data() + r * D;
          const auto [bs, bi] = row_winner<M, acc_t>(scratch.best[r], res, cb);
          out_idx[offset2d(r0 + r, q, Q)] = bi;
          out_dist[offset2d(r0 + r, q, Q)] = finalize_distance<M, acc_t>(bs, norm_term<M, acc_t>(sq_norm(res, D)));
          const acc_t* code = cb.rows.data() + offset2d(bi, 0, D);
          for (int64_t d = 0; d < D; ++d) res[d] -= code[d];
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor> residual_nearest_code_cpu(const Tensor& z, const Tensor& codebooks, int64_t metric) {
  // Second line of defence: Python validated already (vqfast/ops/residual.py).
  STD_TORCH_CHECK(z.dim() == 2 && codebooks.dim() == 3, "residual_nearest_code: z must be (N, D) and codebooks (Q, K, D)");
  STD_TORCH_CHECK(z.size(1) == codebooks.size(2), "residual_nearest_code: z and codebooks differ in D");
  STD_TORCH_CHECK(codebooks.size(0) >= 1 && codebooks.size(1) >= 1, "residual_nearest_code: codebooks is empty (Q = 0 or K = 0)");
  STD_TORCH_CHECK(codebooks.size(1) < (int64_t(1) << 31), "residual_nearest_code: K must be below 2^31");
  STD_TORCH_CHECK(z.scalar_type() == codebooks.scalar_type(), "residual_nearest_code: z and codebooks dtypes differ");
  STD_TORCH_CHECK(metric >= 0 && metric <= 2, "residual_nearest_code: metric must be 0 (l2), 1 (cosine) or 2 (dot)");
  Tensor zc = torch::stable::contiguous(z);
  Tensor cc = torch::stable::contiguous(codebooks);
  const int64_t N = zc.size(0), Q = cc.size(0);
  const ScalarType st = zc.scalar_type();
  // Poisoned (-1 / NaN) so an entry the kernel fails to write cannot pass as an answer.
  Tensor idx = torch::stable::new_empty(zc, {N, Q}, ScalarType::Long);
  Tensor dist = torch::stable::new_empty(zc, {N, Q}, st == ScalarType::Double ? ScalarType::Double : ScalarType::Float);
  torch::stable::fill_(idx, -1.0);
  torch::stable::fill_(dist, std::numeric_limits<double>::quiet_NaN());
  if (N == 0) return {idx, dist};
  VQFAST_CPU_DISPATCH_FLOAT(st, "residual_nearest_code", [&] {
    VQFAST_DISPATCH_METRIC(metric, [&] { residual_nearest_code_impl<scalar_t, M>(zc, cc, idx, dist); });
  });
  return {idx, dist};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(vqfast, CPU, m) { m.impl("residual_nearest_code", TORCH_BOX(&residual_nearest_code_cpu)); }

}  // namespace cpu
}  // namespace vqfast
