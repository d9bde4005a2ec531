#pragma once
// The nearest-codebook search engine shared by the CPU ops (nearest_code,
// quantize): search() finds each row's code and hands finished row blocks to
// an op-specific epilogue while they are still in cache.
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

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <string>
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
namespace cpu {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int64_t kRowBlock = 128;   // rows per task: the 128 x 512 fp32 tile is 256 KiB, L2-resident
constexpr int64_t kCodeBlock = 512;  // codes per BLAS call
constexpr int64_t kSmallD = 16;
constexpr int kLanes = 16;     // two AVX2 / one AVX-512 register of fp32 scores per row
constexpr int kMicroRows = 4;  // small-D micro-kernel: 4 x 16 accumulators stay in registers

// Calls the lambda with `scalar_t` bound to the C++ type of a floating dtype.
#define VQFAST_CPU_DISPATCH_FLOAT(dtype, op, ...)                                                  \
  switch (dtype) {                                                                                \
    case ScalarType::Float: { using scalar_t = float; __VA_ARGS__(); break; }                      \
    case ScalarType::Double: { using scalar_t = double; __VA_ARGS__(); break; }                    \
    case ScalarType::Half: { using scalar_t = torch::headeronly::Half; __VA_ARGS__(); break; }     \
    case ScalarType::BFloat16: { using scalar_t = torch::headeronly::BFloat16; __VA_ARGS__(); break; } \
    default: STD_TORCH_CHECK(false, op ": unsupported dtype (expected float16/bfloat16/float32/float64)"); \
  }

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_scalar = typename Acc<T>::type;

// Raw memory as a strided CPU tensor (no copy, no ownership).
inline Tensor view_of(void* data, std::initializer_list<int64_t> sizes, std::initializer_list<int64_t> strides,
               ScalarType dtype) {
  return torch::stable::from_blob(data, sizes, strides, torch::stable::Device(torch::headeronly::DeviceType::CPU),
                                  dtype);
}

// out (m, n) = a (m, k) @ b (k, n) into a preallocated tile, through the
// dispatcher: the stable ABI has matmul but no out= variant, and allocating a
// result per tile would cost more than small tiles compute.
inline void mm_out(const Tensor& a, const Tensor& b, Tensor& out) {
  std::array<StableIValue, 3> stack{torch::stable::detail::from(a), torch::stable::detail::from(b),
                                    torch::stable::detail::from(out)};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher("aten::mm", "out", stack.data(), TORCH_ABI_VERSION));
  (void)torch::stable::detail::to<Tensor>(stack[0]);
}

// The BLAS that torch itself loaded (MKL or OpenBLAS export the Fortran
// symbols), looked up at run time: a direct call skips the ~5 us of tensor
// wrapping and dispatch per tile, which is 10-20% of a 128 x 512 x 64 tile.
// Absent (or VQFAST_CPU_GEMM=dispatcher), tiles go through mm_out instead.
template <typename acc_t>
using fortran_gemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const acc_t*,
                                const acc_t*, const int*, const acc_t*, const int*, const acc_t*, acc_t*, const int*);

template <typename acc_t>
fortran_gemm_t<acc_t> fortran_gemm() {
  static const fortran_gemm_t<acc_t> fn = reinterpret_cast<fortran_gemm_t<acc_t>>(
      dlsym(RTLD_DEFAULT, std::is_same_v<acc_t, double> ? "dgemm_" : "sgemm_"));
  const char* force = std::getenv("VQFAST_CPU_GEMM");
  return (force && std::string(force) == "dispatcher") ? nullptr : fn;
}

// tile (rows, n) row-major = zrows (rows, D) @ codes (n, D)^T, both row-major.
template <typename acc_t>
void dot_tile(const acc_t* zrows, int64_t rows, const acc_t* codes, int64_t n, int64_t D, acc_t* tile,
              fortran_gemm_t<acc_t> gemm, ScalarType acc_dtype) {
  if (gemm != nullptr) {
    // Column-major view: tile^T (n, rows) = codes (n, D) [stored as (D, n)^T] @ zrows^T (D, rows).
    const int m = int(n), nn = int(rows), k = int(D), lda = int(D), ldb = int(D), ldc = int(n);
    const acc_t one = 1, zero = 0;
    gemm("T", "N", &m, &nn, &k, &one, codes, &lda, zrows, &ldb, &zero, tile, &ldc);
    return;
  }
  Tensor zt = view_of(const_cast<acc_t*>(zrows), {rows, D}, {D, 1}, acc_dtype);
  Tensor ct = view_of(const_cast<acc_t*>(codes), {D, n}, {1, D}, acc_dtype);  // the codes, transposed
  Tensor out = view_of(tile, {rows, n}, {n, 1}, acc_dtype);
  mm_out(zt, ct, out);
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

// The codebook in the accumulation type, prepared once per call: row-major
// (K, D), transposed (D, K) for the small-D kernel, and the per-code terms.
template <typename acc_t>
struct PreparedCodebook {
  int64_t K = 0, D = 0;
  std::vector<acc_t> rows, cols, code;
};

template <int M, typename scalar_t, typename acc_t = typename Acc<scalar_t>::type>
PreparedCodebook<acc_t> prepare_codebook(const scalar_t* cb, int64_t K, int64_t D) {
  PreparedCodebook<acc_t> p;
  p.K = K;
  p.D = D;
  p.rows.resize(static_cast<size_t>(K * D));
  p.code.resize(static_cast<size_t>(K));
  if (D <= kSmallD) p.cols.resize(static_cast<size_t>(K * D));
  torch::stable::parallel_for(0, K, 256, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      acc_t* row = p.rows.data() + offset2d(k, 0, D);
      load_rows(cb + offset2d(k, 0, D), 1, D, row);
      p.code[k] = norm_term<M, acc_t>(sq_norm(row, D));
      if (!p.cols.empty())
        for (int64_t d = 0; d < D; ++d) p.cols[offset2d(d, k, K)] = row[d];
    }
  });
  return p;
}

// Runs the search over z (N, D) and calls
//   epilogue(r0, rows, zrows, index, score)
// once per finished block of rows, with the rows in the accumulation type
// (still cache-hot), their chosen codes and winning scores. Every row reaches
// the epilogue exactly once; blocks may arrive from any thread.
template <int M, typename scalar_t, typename acc_t, typename Epilogue>
void search(const scalar_t* z, int64_t N, const PreparedCodebook<acc_t>& cb, ScalarType acc_dtype,
            Epilogue&& epilogue) {
  const int64_t K = cb.K, D = cb.D;
  const bool small_d = D <= kSmallD;
  const fortran_gemm_t<acc_t> gemm = fortran_gemm<acc_t>();

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
    int64_t win_index[kRowBlock];
    acc_t win_score[kRowBlock];
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
            small_d_block<M, acc_t>(zpad, rr, D, cb.cols.data(), K, cb.code.data(), k0,
                                    std::min(kCodeBlock, c_end - k0), best.data() + r);
        }
      } else if (c_begin < c_end) {
        for (int64_t k0 = c_begin; k0 < c_end; k0 += kCodeBlock) {
          const int64_t n = std::min(kCodeBlock, c_end - k0);
          dot_tile(zblk.data(), rows, cb.rows.data() + offset2d(k0, 0, D), n, D, tile.data(), gemm, acc_dtype);
          for (int64_t r = 0; r < rows; ++r)
            fold<M, acc_t>(tile.data() + r * n, cb.code.data() + k0, n, int32_t(k0), best[r]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        auto [bs, bi] = merge_lanes(best[r]);
        if (splits > 1) {
          part_score[offset2d(split, r0 + r, N)] = bs;
          part_index[offset2d(split, r0 + r, N)] = bi;
          continue;
        }
        if (bi < 0) std::tie(bs, bi) = scan_row<M, acc_t>(zblk.data() + r * D, cb.rows.data(), cb.code.data(), K, D);
        win_index[r] = bi;
        win_score[r] = bs;
      }
      if (splits == 1) epilogue(r0, rows, static_cast<const acc_t*>(zblk.data()), win_index, win_score);
    }
  });
  if (splits == 1) return;
  // splits > 1 only when N < threads * kRowBlock: merging serially is cheap.
  std::vector<acc_t> zrow(D);
  for (int64_t i = 0; i < N; ++i) {
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
    if (bi < 0) std::tie(bs, bi) = scan_row<M, acc_t>(zrow.data(), cb.rows.data(), cb.code.data(), K, D);
    epilogue(i, int64_t(1), static_cast<const acc_t*>(zrow.data()), &bi, &bs);
  }
}

}  // namespace cpu
}  // namespace vqfast

namespace vqfast {
namespace cpu {

template <typename acc_t>
constexpr ScalarType acc_scalar_type() {
  return std::is_same_v<acc_t, double> ? ScalarType::Double : ScalarType::Float;
}

// Second line of defence: Python validated already (vqfast/ops/validation.py).
inline void check_search_inputs(const char* op, const Tensor& z, const Tensor& codebook, int64_t metric) {
  STD_TORCH_CHECK(z.dim() == 2 && codebook.dim() == 2, op, ": z must be (N, D) and codebook (K, D)");
  STD_TORCH_CHECK(z.size(1) == codebook.size(1), op, ": z and codebook differ in D");
  STD_TORCH_CHECK(codebook.size(0) >= 1, op, ": codebook is empty (K = 0)");
  STD_TORCH_CHECK(codebook.size(0) < (int64_t(1) << 31), op, ": K must be below 2^31");
  STD_TORCH_CHECK(z.scalar_type() == codebook.scalar_type(), op, ": z and codebook dtypes differ");
  STD_TORCH_CHECK(metric >= 0 && metric <= 2, op, ": metric must be 0 (l2), 1 (cosine) or 2 (dot)");
}

}  // namespace cpu
}  // namespace vqfast
