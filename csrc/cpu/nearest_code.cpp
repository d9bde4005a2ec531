// Nearest-codebook search on the CPU.
//
// The faiss recipe: the distance matrix is never formed. Rows are split into
// blocks of kRowBlock, one block per task of torch's OpenMP pool; each task
// walks the codebook in blocks of kCodeBlock codes, has BLAS compute the
// (rows x codes) dot-product tile into a thread-local buffer that stays in L2,
// and folds it into a running (score, index) per row in the same pass
// (csrc/common/distance.h). Extra memory: one tile per thread plus a
// transposed fp32 copy of the codebook, whatever N is.
//
// Small D (<= kSmallD) is compute-light per element, so a BLAS call per tile
// would cost more than the arithmetic: that path computes the dots directly
// from a (D, K) transposed codebook, vectorised across codes.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <array>
#include <limits>
#include <tuple>
#include <vector>

#include "common/distance.h"

namespace vqfast {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int64_t kRowBlock = 128;   // rows per task: 128 x kCodeBlock fp32 = 256 KiB tile
constexpr int64_t kCodeBlock = 512;  // codes per BLAS call
constexpr int64_t kSmallD = 16;
constexpr int64_t kSmallCodeBlock = 256;  // register/L1-sized strip for the small-D path

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// Calls the dense matmul through the dispatcher into a preallocated tile:
// out (m, n) = a (m, k) @ b (k, n). The stable ABI has matmul but no out=
// variant, and allocating per tile would cost more than small tiles compute.
void mm_out(const Tensor& a, const Tensor& b, Tensor& out) {
  std::array<StableIValue, 3> stack{torch::stable::detail::from(a), torch::stable::detail::from(b),
                                    torch::stable::detail::from(out)};
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher("aten::mm", "out", stack.data(), TORCH_ABI_VERSION));
  (void)torch::stable::detail::to<Tensor>(stack[0]);
}

// Wraps raw memory as a strided CPU tensor (no copy, no ownership).
Tensor view_of(void* data, std::initializer_list<int64_t> sizes,
               std::initializer_list<int64_t> strides, ScalarType dtype) {
  return torch::stable::from_blob(data, sizes, strides,
                                  torch::stable::Device(torch::headeronly::DeviceType::CPU), dtype);
}

template <typename scalar_t, typename acc_t>
void load_row(const scalar_t* src, int64_t D, acc_t* dst) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]);
}

template <typename acc_t>
acc_t sq_norm(const acc_t* v, int64_t D) {
  acc_t s = 0;
  for (int64_t d = 0; d < D; ++d) s += v[d] * v[d];
  return s;
}

// Folds one row of a score strip into the row's running best. A vectorisable
// min pass first; the index search runs only when the strip can win.
template <typename acc_t>
void fold_strip(const acc_t* s, int64_t n, int64_t k0, acc_t& best, int64_t& best_idx) {
  acc_t m = std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < n; ++j) m = s[j] < m ? s[j] : m;
  if (!(m < best) && best_idx >= 0 && best == best) return;  // cannot win (incl. all-NaN strip)
  for (int64_t j = 0; j < n; ++j) {
    if (better(s[j], k0 + j, best, best_idx)) {
      best = s[j];
      best_idx = k0 + j;
    }
  }
}

template <typename scalar_t, int M>
void search(const scalar_t* z, const scalar_t* cb, int64_t N, int64_t K, int64_t D, int64_t* out_idx,
            typename Acc<scalar_t>::type* out_dist, ScalarType acc_dtype) {
  using acc_t = typename Acc<scalar_t>::type;
  const bool small_d = D <= kSmallD;

  // Codebook in the accumulation type, and the per-code terms. Small D keeps
  // it transposed (D, K) so the inner loop runs unit-stride across codes.
  std::vector<acc_t> cbf(static_cast<size_t>(K * D));
  std::vector<acc_t> code(static_cast<size_t>(K));
  torch::stable::parallel_for(0, K, 256, [&](int64_t b, int64_t e) {
    std::vector<acc_t> row(D);
    for (int64_t k = b; k < e; ++k) {
      load_row(cb + offset2d(k, 0, D), D, row.data());
      code[k] = norm_term<M, acc_t>(sq_norm(row.data(), D));
      for (int64_t d = 0; d < D; ++d) {
        if (small_d) cbf[offset2d(d, k, K)] = row[d];
        else cbf[offset2d(k, 0, D)+d] = row[d];
      }
    }
  });

  const int64_t row_blocks = (N + kRowBlock - 1) / kRowBlock;
  torch::stable::parallel_for(0, row_blocks, 1, [&](int64_t rb_begin, int64_t rb_end) {
    std::vector<acc_t> zblk(static_cast<size_t>(kRowBlock * D));
    std::vector<acc_t> tile(static_cast<size_t>(kRowBlock * (small_d ? kSmallCodeBlock : kCodeBlock)));
    std::vector<acc_t> best(kRowBlock);
    std::vector<int64_t> best_idx(kRowBlock);
    for (int64_t rb = rb_begin; rb < rb_end; ++rb) {
      const int64_t r0 = rb * kRowBlock;
      const int64_t rows = std::min(kRowBlock, N - r0);
      for (int64_t r = 0; r < rows; ++r) {
        load_row(z + offset2d(r0 + r, 0, D), D, zblk.data() + r * D);
        best[r] = std::numeric_limits<acc_t>::infinity();
        best_idx[r] = -1;
      }
      if (small_d) {
        for (int64_t k0 = 0; k0 < K; k0 += kSmallCodeBlock) {
          const int64_t n = std::min(kSmallCodeBlock, K - k0);
          for (int64_t r = 0; r < rows; ++r) {
            acc_t* s = tile.data();
            const acc_t* zr = zblk.data() + r * D;
            for (int64_t j = 0; j < n; ++j) s[j] = 0;
            for (int64_t d = 0; d < D; ++d) {
              const acc_t zd = zr[d];
              const acc_t* c = cbf.data() + offset2d(d, k0, K);
              for (int64_t j = 0; j < n; ++j) s[j] += zd * c[j];
            }
            const acc_t* ck = code.data() + k0;
            for (int64_t j = 0; j < n; ++j) s[j] = score<M, acc_t>(s[j], ck[j]);
            fold_strip(s, n, k0, best[r], best_idx[r]);
          }
        }
      } else {
        Tensor zt = view_of(zblk.data(), {rows, D}, {D, 1}, acc_dtype);
        for (int64_t k0 = 0; k0 < K; k0 += kCodeBlock) {
          const int64_t n = std::min(kCodeBlock, K - k0);
          // (D, n) view of codes k0..k0+n: the transposed codebook block.
          Tensor ct = view_of(cbf.data() + offset2d(k0, 0, D), {D, n}, {1, D}, acc_dtype);
          Tensor out = view_of(tile.data(), {rows, n}, {n, 1}, acc_dtype);
          mm_out(zt, ct, out);
          const acc_t* ck = code.data() + k0;
          for (int64_t r = 0; r < rows; ++r) {
            acc_t* s = tile.data() + r * n;
            for (int64_t j = 0; j < n; ++j) s[j] = score<M, acc_t>(s[j], ck[j]);
            fold_strip(s, n, k0, best[r], best_idx[r]);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t row = norm_term<M, acc_t>(sq_norm(zblk.data() + r * D, D));
        out_idx[r0 + r] = best_idx[r];
        out_dist[r0 + r] = finalize_distance<M, acc_t>(best[r], row);
      }
    }
  });
}

template <typename scalar_t>
void search_dtype(const Tensor& z, const Tensor& cb, int64_t metric, Tensor& idx, Tensor& dist) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t N = z.size(0), D = z.size(1), K = cb.size(0);
  const ScalarType acc_dtype = std::is_same_v<acc_t, double> ? ScalarType::Double : ScalarType::Float;
  const auto* zp = static_cast<const scalar_t*>(z.const_data_ptr());
  const auto* cp = static_cast<const scalar_t*>(cb.const_data_ptr());
  auto* ip = idx.mutable_data_ptr<int64_t>();
  auto* dp = static_cast<acc_t*>(dist.mutable_data_ptr());
  VQFAST_DISPATCH_METRIC(metric, [&] { search<scalar_t, M>(zp, cp, N, K, D, ip, dp, acc_dtype); });
}

std::tuple<Tensor, Tensor> nearest_code_cpu(const Tensor& z, const Tensor& codebook, int64_t metric) {
  STD_TORCH_CHECK(z.dim() == 2 && codebook.dim() == 2, "nearest_code: z must be (N, D) and codebook (K, D)");
  STD_TORCH_CHECK(z.size(1) == codebook.size(1), "nearest_code: z and codebook differ in D");
  STD_TORCH_CHECK(codebook.size(0) >= 1, "nearest_code: codebook is empty (K = 0)");
  STD_TORCH_CHECK(z.scalar_type() == codebook.scalar_type(), "nearest_code: z and codebook dtypes differ");
  STD_TORCH_CHECK(metric >= 0 && metric <= 2, "nearest_code: metric must be 0 (l2), 1 (cosine) or 2 (dot)");
  Tensor zc = torch::stable::contiguous(z);
  Tensor cc = torch::stable::contiguous(codebook);
  const int64_t N = zc.size(0);
  const ScalarType st = zc.scalar_type();
  const ScalarType out_st = st == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  Tensor idx = torch::stable::new_empty(zc, {N}, ScalarType::Long);
  Tensor dist = torch::stable::new_empty(zc, {N}, out_st);
  if (N == 0) return {idx, dist};
  switch (st) {
    case ScalarType::Float: search_dtype<float>(zc, cc, metric, idx, dist); break;
    case ScalarType::Double: search_dtype<double>(zc, cc, metric, idx, dist); break;
    case ScalarType::Half: search_dtype<torch::headeronly::Half>(zc, cc, metric, idx, dist); break;
    case ScalarType::BFloat16: search_dtype<torch::headeronly::BFloat16>(zc, cc, metric, idx, dist); break;
    default: STD_TORCH_CHECK(false, "nearest_code: unsupported dtype (expected float16/bfloat16/float32/float64)");
  }
  return {idx, dist};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(vqfast, CPU, m) { m.impl("nearest_code", TORCH_BOX(&nearest_code_cpu)); }

}  // namespace vqfast
