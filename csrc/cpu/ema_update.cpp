// EMA codebook update on the CPU, in place. Formulas: vqfast/reference/ema.py.
//
// One grouping of the rows by code (code_groups.h), then one parallel pass over
// codes computes the batch count and sum, the EMA of both, and - after the
// total count is known - the smoothed codebook rows. Rows with a non-finite
// value are skipped. Deterministic whatever the thread count.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cmath>
#include <vector>

#include "common/checks.h"
#include "cpu/code_groups.h"
#include "cpu/search.h"

namespace vqfast {
namespace cpu {
namespace {

// torch.lerp's formula, so the buffers match torch's own EMA bit for bit.
template <typename T>
T lerp(T a, T b, T w) {
  return w < T(0.5) ? a + w * (b - a) : b - (b - a) * (T(1) - w);
}

template <typename buf_t, typename scalar_t>
void ema_impl(Tensor& codebook, Tensor& cluster_size, Tensor& embed_avg, const Tensor& z, const Tensor& idx,
              double decay, double eps) {
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  const auto* zp = static_cast<const scalar_t*>(z.const_data_ptr());
  const auto* ip = idx.const_data_ptr<int64_t>();
  auto* cb = static_cast<buf_t*>(codebook.mutable_data_ptr());
  auto* cs = static_cast<buf_t*>(cluster_size.mutable_data_ptr());
  auto* ea = static_cast<buf_t*>(embed_avg.mutable_data_ptr());
  const buf_t w = buf_t(1.0 - decay);

  std::vector<char> finite(static_cast<size_t>(N));
  torch::stable::parallel_for(0, N, 1024, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      bool ok = true;
      for (int64_t d = 0; d < D; ++d) ok &= std::isfinite(float(zp[offset2d(i, d, D)]));
      finite[i] = ok;
    }
  });
  const CodeGroups groups = group_by_code(ip, N, K, [&](int64_t i) { return finite[i] != 0; });

  torch::stable::parallel_for(0, K, 16, [&](int64_t b, int64_t e) {
    std::vector<buf_t> sum(D);
    for (int64_t k = b; k < e; ++k) {
      std::fill(sum.begin(), sum.end(), buf_t(0));
      for (int64_t j = groups.begin[k]; j < groups.begin[k + 1]; ++j) {
        const scalar_t* row = zp + offset2d(groups.order[j], 0, D);
        for (int64_t d = 0; d < D; ++d) sum[d] += buf_t(row[d]);
      }
      cs[k] = lerp(cs[k], buf_t(groups.begin[k + 1] - groups.begin[k]), w);
      buf_t* avg = ea + offset2d(k, 0, D);
      for (int64_t d = 0; d < D; ++d) avg[d] = lerp(avg[d], sum[d], w);
    }
  });
  buf_t n = 0;
  for (int64_t k = 0; k < K; ++k) n += cs[k];
  const buf_t denom = n + buf_t(K) * buf_t(eps);
  torch::stable::parallel_for(0, K, 64, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const buf_t smoothed = (cs[k] + buf_t(eps)) / denom * n;
      for (int64_t d = 0; d < D; ++d) cb[offset2d(k, d, D)] = ea[offset2d(k, d, D)] / smoothed;
    }
  });
}

void ema_update_cpu(Tensor& codebook, Tensor& cluster_size, Tensor& embed_avg, const Tensor& z, const Tensor& idx,
                    double decay, double eps) {
  check_ema_inputs(codebook, cluster_size, embed_avg, z, idx);
  const ScalarType bt = codebook.scalar_type();
  Tensor zc = torch::stable::contiguous(z), ic = torch::stable::contiguous(idx);
  VQFAST_CPU_DISPATCH_FLOAT(zc.scalar_type(), "ema_update_", [&] {
    if (bt == ScalarType::Double) ema_impl<double, scalar_t>(codebook, cluster_size, embed_avg, zc, ic, decay, eps);
    else ema_impl<float, scalar_t>(codebook, cluster_size, embed_avg, zc, ic, decay, eps);
  });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(vqfast, CPU, m) { m.impl("ema_update_", TORCH_BOX(&ema_update_cpu)); }

}  // namespace cpu
}  // namespace vqfast
