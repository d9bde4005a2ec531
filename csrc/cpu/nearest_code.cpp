// Nearest-codebook search on the CPU.
//
// The faiss recipe: the distance matrix is never formed. Work is split into
// (row block x code range) tasks on torch's OpenMP pool. A task walks its codes
// in blocks of kCodeBlock, has BLAS compute the (rows x codes) dot-product tile
// into a thread-local buffer sized for L2, and folds it into a running best per
// row in the same pass. Extra memory: one tile per thread, an fp32 copy of the
// codebook, and per-task partial results, whatever N is.
//
// The fold is lane-wise: each row keeps kLanes running (score, index) pairs,
// lane l seeing codes l, l+kLanes, ... in increasing order, so a strict `<`
// keeps the lowest index within a lane and the compare/blend vectorises. The
// lanes are merged at the end with `better` (csrc/common/distance.h), which
// restores the exact lowest-index tie rule across lanes.
//
// Small D (<= kSmallD) has too little arithmetic per score for a BLAS call per
// tile to pay off; that path is a register micro-kernel (kMicroRows rows x
// kLanes codes) over a (D, K) transposed codebook, with the same fold.
//
// Hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked
// at load time (target_clones), so one build is fast on every x86 machine.
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
#include <type_traits>
#include <vector>

#include "common/distance.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VQ_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VQ_CPU_CLONES
#endif

namespace vqfast {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int64_t kRowBlock = 128;   // rows per task: the 128 x 512 fp32 tile is 256 KiB, L2-resident
constexpr int64_t kCodeBlock = 512;  // codes per BLAS call
constexpr int64_t kSmallD = 16;
constexpr int kLanes = 16;     // two AVX2 / one AVX-512 register of fp32 scores per row
constexpr int kMicroRows = 4;  // small-D micro-kernel: 4 x 16 accumulators stay in registers

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// out (m, n) = a (m, k) @ b (k, n) into a preallocated tile, through the
// dispatcher: the stable ABI has matmul but no out= variant, and allocating a
// result per tile would cost more than small tiles compute.
void mm_out(const Tensor& a, const Tensor& b, Tensor& out) {
  std::array<StableIValue, 3> stack{torch::stable::detail::from(a), torch::stable::detail::from(b),
                                    torch::stable::detail::from(out)};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher("aten::mm", "out", stack.data(), TORCH_ABI_VERSION));
  (void)torch::stable::detail::to<Tensor>(stack[0]);
}

// Raw memory as a strided CPU tensor (no copy, no ownership).
Tensor view_of(void* data, std::initializer_list<int64_t> sizes, std::initializer_list<int64_t> strides,
               ScalarType dtype) {
  return torch::stable::from_blob(data, sizes, strides, torch::stable::Device(torch::headeronly::DeviceType::CPU),
                                  dtype);
}

template <typename acc_t>
struct Lanes {
  acc_t score[kLanes];
  int32_t index[kLanes];  // K < 2^31 (checked); int32 keeps the blend as wide as the scores

  void reset() {
    for (int l = 0; l < kLanes; ++l) {
      score[l] = std::numeric_limits<acc_t>::infinity();
      index[l] = -1;
    }
  }
};

// Folds scores of codes k0 .. k0+n-1 (dots in `dot`, per-code terms in `code`)
// into the lanes. The loop body is branch-free so it vectorises.
template <int M, typename acc_t>
VQ_CPU_CLONES void fold(const acc_t* __restrict dot, const acc_t* __restrict code, int64_t n, int32_t k0,
                        Lanes<acc_t>& __restrict best) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t s = score<M, acc_t>(dot[j + l], code[j + l]);
      const bool win = s < best.score[l];
      best.score[l] = win ? s : best.score[l];
      best.index[l] = win ? int32_t(k0 + j + l) : best.index[l];
    }
  }
  for (; j < n; ++j) {
    const int l = int(j % kLanes);
    const acc_t s = score<M, acc_t>(dot[j], code[j]);
    if (s < best.score[l]) {
      best.score[l] = s;
      best.index[l] = int32_t(k0 + j);
    }
  }
}

// Small-D micro-kernel: dots of kMicroRows rows against codes k0 .. k0+n-1 of
// the transposed codebook cbt (D, K), folded straight from registers.
template <int M, typename acc_t>
VQ_CPU_CLONES void small_d_block(const acc_t* __restrict zrows, int64_t rows, int64_t D,
                                 const acc_t* __restrict cbt, int64_t K, const acc_t* __restrict code, int64_t k0,
                                 int64_t n, Lanes<acc_t>* __restrict best) {
  acc_t dots[kMicroRows][kLanes];
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int r = 0; r < kMicroRows; ++r)
      for (int l = 0; l < kLanes; ++l) dots[r][l] = 0;
    for (int64_t d = 0; d < D; ++d) {
      const acc_t* c = cbt + offset2d(d, k0 + j, K);
      for (int r = 0; r < kMicroRows; ++r) {
        const acc_t zd = zrows[r * D + d];
        for (int l = 0; l < kLanes; ++l) dots[r][l] += zd * c[l];
      }
    }
    for (int r = 0; r < rows; ++r) fold<M, acc_t>(dots[r], code + k0 + j, kLanes, int32_t(k0 + j), best[r]);
  }
  if (j < n) {  // tail: fewer than kLanes codes
    const int64_t t = n - j;
    for (int r = 0; r < rows; ++r) {
      acc_t tail[kLanes];
      for (int64_t l = 0; l < t; ++l) {
        acc_t acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += zrows[r * D + d] * cbt[offset2d(d, k0 + j + l, K)];
        tail[l] = acc;
      }
      fold<M, acc_t>(tail, code + k0 + j, t, int32_t(k0 + j), best[r]);
    }
  }
}

template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* src, int64_t rows, int64_t D, acc_t* dst) {
  for (int64_t i = 0; i < rows * D; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

template <typename acc_t>
acc_t sq_norm(const acc_t* v, int64_t D) {
  acc_t s = 0;
  for (int64_t d = 0; d < D; ++d) s += v[d] * v[d];
  return s;
}

// Merges the lanes into one (score, index) with the exact tie rule. Lanes only
// ever accept scores that beat +inf, so a row whose scores are all NaN or +inf
// has no lane set; `better` then picks its answer among code 0's score and
// the rest, which the caller resolves with a plain scan (rare, O(K D)).
template <typename acc_t>
std::pair<acc_t, int64_t> merge_lanes(const Lanes<acc_t>& best) {
  acc_t bs = std::numeric_limits<acc_t>::infinity();
  int64_t bi = -1;
  for (int l = 0; l < kLanes; ++l)
    if (best.index[l] >= 0 && better(best.score[l], int64_t(best.index[l]), bs, bi)) {
      bs = best.score[l];
      bi = best.index[l];
    }
  return {bs, bi};
}

// Scan for rows with no finite-or-(-inf) score: the `better` order over all codes.
template <int M, typename acc_t>
std::pair<acc_t, int64_t> scan_row(const acc_t* zr, const acc_t* cb_rows, const acc_t* code, int64_t K,
                                   int64_t D) {
  acc_t bs = 0;
  int64_t bi = -1;
  for (int64_t k = 0; k < K; ++k) {
    acc_t dot = 0;
    for (int64_t d = 0; d < D; ++d) dot += zr[d] * cb_rows[offset2d(k, d, D)];
    const acc_t s = score<M, acc_t>(dot, code[k]);
    if (better(s, k, bs, bi)) {
      bs = s;
      bi = k;
    }
  }
  return {bs, bi};
}

template <typename scalar_t, int M>
void search(const scalar_t* z, const scalar_t* cb, int64_t N, int64_t K, int64_t D, int64_t* out_idx,
            typename Acc<scalar_t>::type* out_dist, ScalarType acc_dtype) {
  using acc_t = typename Acc<scalar_t>::type;
  const bool small_d = D <= kSmallD;

  // Codebook in the accumulation type (row-major, and transposed (D, K) for
  // the small-D kernel) and the per-code terms.
  std::vector<acc_t> cbf(static_cast<size_t>(K * D));
  std::vector<acc_t> cbt(small_d ? static_cast<size_t>(K * D) : 0);
  std::vector<acc_t> code(static_cast<size_t>(K));
  torch::stable::parallel_for(0, K, 256, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      acc_t* row = cbf.data() + offset2d(k, 0, D);
      load_rows(cb + offset2d(k, 0, D), 1, D, row);
      code[k] = norm_term<M, acc_t>(sq_norm(row, D));
      if (small_d)
        for (int64_t d = 0; d < D; ++d) cbt[offset2d(d, k, K)] = row[d];
    }
  });

  // Tasks: row blocks x code splits. Splitting codes keeps every thread busy
  // when N is small (a single row block); partial bests merge in code order.
  const int64_t row_blocks = (N + kRowBlock - 1) / kRowBlock;
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
  const int64_t code_blocks = (K + kCodeBlock - 1) / kCodeBlock;
  const int64_t splits = std::min(code_blocks, std::max<int64_t>(1, (threads + row_blocks - 1) / row_blocks));
  const int64_t blocks_per_split = (code_blocks + splits - 1) / splits;
  std::vector<acc_t> part_score(splits > 1 ? static_cast<size_t>(splits * N) : 0);
  std::vector<int64_t> part_index(splits > 1 ? static_cast<size_t>(splits * N) : 0);

  torch::stable::parallel_for(0, row_blocks * splits, 1, [&](int64_t t_begin, int64_t t_end) {
    std::vector<acc_t> zblk(static_cast<size_t>(kRowBlock * D));
    std::vector<acc_t> tile(small_d ? 0 : static_cast<size_t>(kRowBlock * kCodeBlock));
    std::vector<Lanes<acc_t>> best(kRowBlock);
    for (int64_t task = t_begin; task < t_end; ++task) {
      const int64_t rb = task / splits, split = task % splits;
      const int64_t r0 = rb * kRowBlock;
      const int64_t rows = std::min(kRowBlock, N - r0);
      const int64_t c_begin = split * blocks_per_split * kCodeBlock;
      const int64_t c_end = std::min(K, (split + 1) * blocks_per_split * kCodeBlock);
      load_rows(z + offset2d(r0, 0, D), rows, D, zblk.data());
      for (int64_t r = 0; r < rows; ++r) best[r].reset();
      if (small_d) {
        for (int64_t r = 0; r < rows; r += kMicroRows) {
          const int64_t rr = std::min<int64_t>(kMicroRows, rows - r);
          acc_t zpad[kMicroRows * kSmallD] = {};  // short row groups read zeros, not past the block
          std::copy(zblk.data() + r * D, zblk.data() + (r + rr) * D, zpad);
          for (int64_t k0 = c_begin; k0 < c_end; k0 += kCodeBlock)
            small_d_block<M, acc_t>(zpad, rr, D, cbt.data(), K, code.data(), k0,
                                    std::min(kCodeBlock, c_end - k0), best.data() + r);
        }
      } else if (c_begin < c_end) {
        Tensor zt = view_of(zblk.data(), {rows, D}, {D, 1}, acc_dtype);
        for (int64_t k0 = c_begin; k0 < c_end; k0 += kCodeBlock) {
          const int64_t n = std::min(kCodeBlock, c_end - k0);
          Tensor ct = view_of(cbf.data() + offset2d(k0, 0, D), {D, n}, {1, D}, acc_dtype);  // codes, transposed
          Tensor out = view_of(tile.data(), {rows, n}, {n, 1}, acc_dtype);
          mm_out(zt, ct, out);
          for (int64_t r = 0; r < rows; ++r)
            fold<M, acc_t>(tile.data() + r * n, code.data() + k0, n, int32_t(k0), best[r]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        auto [bs, bi] = merge_lanes(best[r]);
        if (bi < 0 && splits == 1) std::tie(bs, bi) = scan_row<M, acc_t>(zblk.data() + r * D, cbf.data(), code.data(), K, D);
        if (splits > 1) {
          part_score[offset2d(split, r0 + r, N)] = bs;
          part_index[offset2d(split, r0 + r, N)] = bi;
        } else {
          out_idx[r0 + r] = bi;
          out_dist[r0 + r] = finalize_distance<M, acc_t>(bs, norm_term<M, acc_t>(sq_norm(zblk.data() + r * D, D)));
        }
      }
    }
  });
  if (splits == 1) return;
  std::vector<acc_t> zrow(D);
  for (int64_t i = 0; i < N; ++i) {  // splits > 1 only when N < threads * kRowBlock: cheap
    acc_t bs = 0;
    int64_t bi = -1;
    for (int64_t s = 0; s < splits; ++s) {
      const int64_t pi = part_index[offset2d(s, i, N)];
      if (pi >= 0 && better(part_score[offset2d(s, i, N)], pi, bs, bi)) {
        bs = part_score[offset2d(s, i, N)];
        bi = pi;
      }
    }
    load_rows(z + offset2d(i, 0, D), 1, D, zrow.data());
    if (bi < 0) std::tie(bs, bi) = scan_row<M, acc_t>(zrow.data(), cbf.data(), code.data(), K, D);
    out_idx[i] = bi;
    out_dist[i] = finalize_distance<M, acc_t>(bs, norm_term<M, acc_t>(sq_norm(zrow.data(), D)));
  }
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
  STD_TORCH_CHECK(codebook.size(0) < (int64_t(1) << 31), "nearest_code: K must be below 2^31");
  STD_TORCH_CHECK(z.scalar_type() == codebook.scalar_type(), "nearest_code: z and codebook dtypes differ");
  STD_TORCH_CHECK(metric >= 0 && metric <= 2, "nearest_code: metric must be 0 (l2), 1 (cosine) or 2 (dot)");
  Tensor zc = torch::stable::contiguous(z);
  Tensor cc = torch::stable::contiguous(codebook);
  const int64_t N = zc.size(0);
  const ScalarType st = zc.scalar_type();
  const ScalarType out_st = st == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  // Poisoned (-1 / NaN) so a row the kernel fails to write cannot pass as an answer.
  // One pass over N values: nothing next to the N x K x D search.
  Tensor idx = torch::stable::new_empty(zc, {N}, ScalarType::Long);
  Tensor dist = torch::stable::new_empty(zc, {N}, out_st);
  torch::stable::fill_(idx, -1.0);
  torch::stable::fill_(dist, std::numeric_limits<double>::quiet_NaN());
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
