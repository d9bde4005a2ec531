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
// The fold is lane-wise: each row keeps kVecs SIMD registers of running (score, index) pairs,
// each lane seeing every (lanes-per-row)-th code in increasing order, so a strict `<`
// keeps the lowest index within a lane and the compare/blend vectorises. The
// lanes are merged at the end with `better` (csrc/common/distance.h), which
// restores the exact lowest-index tie rule across lanes.
//
// Small D (<= kSmallD) has too little arithmetic per score for a BLAS call per
// tile to pay off; that path is a register micro-kernel (kMicroRows rows x
// one lane group of codes) over a (D, K) transposed codebook, with the same fold.
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
#include <cstring>
#include <string>
#include <array>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
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
constexpr int64_t kCodeBlock = 512;  // codes per BLAS call, at most
// The code block's fp32 slice (codes x D) is capped at 128 KiB, so block,
// 256 KiB tile and row block share a 512 KiB L2 at large D as well.
constexpr int64_t kCodeBlockFloats = 32768;

inline int64_t code_block_for(int64_t D) {
  return std::max<int64_t>(64, std::min<int64_t>(kCodeBlock, kCodeBlockFloats / std::max<int64_t>(D, 1) / 16 * 16));
}
constexpr int64_t kSmallD = 16;
constexpr int kMicroRows = 2;  // small-D micro-kernel: 2 rows x 16 codes of dots, scores and indices fit in 16 ymm registers

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

// SIMD through GCC vector types, one 32-byte (AVX2 ymm) register each: 8 float
// or 4 double scores, with their code indices in an integer type of the same
// width so one compare mask blends both. (Wider generic vectors compile to
// poor code where the target's registers are narrower.) Each row keeps kVecs
// such registers, for instruction-level parallelism.
template <typename acc_t>
struct Simd;
template <>
struct Simd<float> {
  typedef float v __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
  static constexpr int width = 8;
};
template <>
struct Simd<double> {
  typedef double v __attribute__((vector_size(32)));
  typedef int64_t i __attribute__((vector_size(32)));
  static constexpr int width = 4;
};

constexpr int kVecs = 2;

// A row's running best, kept as plain arrays (no over-aligned members, so any
// allocation holds it) and moved in and out of registers with unaligned loads.
template <typename acc_t>
struct Lanes {
  using V = typename Simd<acc_t>::v;
  using I = typename Simd<acc_t>::i;
  using index_t = std::remove_reference_t<decltype(std::declval<I&>()[0])>;
  static constexpr int width = Simd<acc_t>::width;
  static constexpr int count = kVecs * width;  // lanes per row
  acc_t score[count];
  index_t index[count];  // first code of the winning group (+ lane = code); -1: none beat +inf yet

  void reset() {
    for (int l = 0; l < count; ++l) {
      score[l] = std::numeric_limits<acc_t>::infinity();
      index[l] = -1;
    }
  }
  void load(V* bs, I* bi) const {
    for (int v = 0; v < kVecs; ++v) {
      std::memcpy(&bs[v], score + v * width, sizeof(V));
      std::memcpy(&bi[v], index + v * width, sizeof(I));
    }
  }
  void store(const V* bs, const I* bi) {
    for (int v = 0; v < kVecs; ++v) {
      std::memcpy(score + v * width, &bs[v], sizeof(V));
      std::memcpy(index + v * width, &bi[v], sizeof(I));
    }
  }
};

template <typename T>
inline __attribute__((always_inline)) T load_vec(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));  // unaligned load
  return v;
}

// One step of the lane-wise running argmin: lane e of register v takes the
// code of the current group (first code `group`, broadcast in a register)
// when its score is strictly lower, so a lane keeps its lowest index on ties
// and NaN never wins. Lanes record the group's first code; the lane's own
// offset (v * width + e) is added back when the lanes are merged. A compare
// and two blends.
template <int M, typename acc_t>
inline __attribute__((always_inline)) void fold_step(typename Simd<acc_t>::v dot, typename Simd<acc_t>::v code,
                                                     typename Simd<acc_t>::i group, typename Simd<acc_t>::v& bs,
                                                     typename Simd<acc_t>::i& bi) {
  using I = typename Simd<acc_t>::i;
  const auto s = score<M>(dot, code);
  const I win = s < bs;
  bs = win ? s : bs;
  bi = win ? group : bi;
}

template <typename acc_t>
inline __attribute__((always_inline)) typename Simd<acc_t>::i broadcast_group(int64_t first_code) {
  using I = typename Simd<acc_t>::i;
  using elem_t = std::remove_reference_t<decltype(std::declval<I&>()[0])>;
  return I{} + static_cast<elem_t>(first_code);
}

// Scalar update of lane `l` with code k = group + l (tails shorter than a group).
template <int M, typename acc_t>
inline void fold_one(acc_t dot, acc_t code, int64_t group, int l, Lanes<acc_t>& best) {
  const acc_t s = score<M>(dot, code);
  if (s < best.score[l]) {
    best.score[l] = s;
    best.index[l] = group;
  }
}

// Folds scores of codes k0 .. k0+n-1 (dots in `dot`, per-code terms in `code`)
// into the lanes: code k0 + g*count + v*width + e goes to lane (v, e).
template <int M, typename acc_t>
VQ_CPU_CLONES void fold(const acc_t* __restrict dot, const acc_t* __restrict code, int64_t n, int64_t k0,
                        Lanes<acc_t>& __restrict best) {
  using V = typename Simd<acc_t>::v;
  constexpr int W = Lanes<acc_t>::width, G = Lanes<acc_t>::count;
  V bs[kVecs];
  typename Simd<acc_t>::i bi[kVecs];
  best.load(bs, bi);
  int64_t j = 0;
  for (; j + G <= n; j += G) {
    const auto group = broadcast_group<acc_t>(k0 + j);
    for (int v = 0; v < kVecs; ++v)
      fold_step<M, acc_t>(load_vec<V>(dot + j + v * W), load_vec<V>(code + j + v * W), group, bs[v], bi[v]);
  }
  best.store(bs, bi);
  for (int64_t t = j; t < n; ++t) fold_one<M, acc_t>(dot[t], code[t], k0 + j, int(t - j), best);
}

// Small-D micro-kernel: dots of kMicroRows rows against codes k0 .. k0+n-1 of
// the transposed codebook cbt (D, K), folded straight from registers.
template <int M, typename acc_t>
VQ_CPU_CLONES void small_d_block(const acc_t* __restrict zrows, int64_t rows, int64_t D,
                                 const acc_t* __restrict cbt, int64_t K, const acc_t* __restrict code, int64_t k0,
                                 int64_t n, Lanes<acc_t>* __restrict best) {
  using V = typename Simd<acc_t>::v;
  constexpr int W = Lanes<acc_t>::width, G = Lanes<acc_t>::count;
  V bs[kMicroRows][kVecs];
  typename Simd<acc_t>::i bi[kMicroRows][kVecs];
  for (int r = 0; r < kMicroRows; ++r) best[r < rows ? r : 0].load(bs[r], bi[r]);
  int64_t j = 0;
  for (; j + G <= n; j += G) {
    V dots[kMicroRows][kVecs] = {};
    for (int64_t d = 0; d < D; ++d) {
      const acc_t* c = cbt + offset2d(d, k0 + j, K);
      for (int v = 0; v < kVecs; ++v) {
        const V cv = load_vec<V>(c + v * W);
        for (int r = 0; r < kMicroRows; ++r) dots[r][v] += zrows[r * D + d] * cv;
      }
    }
    const auto group = broadcast_group<acc_t>(k0 + j);
    for (int v = 0; v < kVecs; ++v) {
      const V cterm = load_vec<V>(code + k0 + j + v * W);
      for (int r = 0; r < kMicroRows; ++r) fold_step<M, acc_t>(dots[r][v], cterm, group, bs[r][v], bi[r][v]);
    }
  }
  for (int r = 0; r < rows; ++r) best[r].store(bs[r], bi[r]);
  for (int64_t t = j; t < n; ++t)  // tail: fewer than a lane group of codes
    for (int r = 0; r < rows; ++r) {
      acc_t acc = 0;
      for (int64_t d = 0; d < D; ++d) acc += zrows[r * D + d] * cbt[offset2d(d, k0 + t, K)];
      fold_one<M, acc_t>(acc, code[k0 + t], k0 + j, int(t - j), best[r]);
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
  for (int l = 0; l < Lanes<acc_t>::count; ++l) {
    if (best.index[l] < 0) continue;
    const int64_t k = int64_t(best.index[l]) + l;  // the group's first code + the lane's offset
    if (better(best.score[l], k, bs, bi)) {
      bs = best.score[l];
      bi = k;
    }
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

// Per-thread scratch of the block search: the dot-product tile and each row's lanes.
template <typename acc_t>
struct BlockScratch {
  std::vector<acc_t> tile;
  std::vector<Lanes<acc_t>> best;
  explicit BlockScratch(int64_t D)
      : tile(D <= kSmallD ? 0 : static_cast<size_t>(kRowBlock * kCodeBlock)), best(kRowBlock) {}
};

// Codes per step of the block search: the BLAS tile's width, or the micro-kernel's span.
inline int64_t search_code_block(int64_t D) { return D <= kSmallD ? kCodeBlock : code_block_for(D); }

// Searches codes [c_begin, c_end) of cb for a block of rows (rows <= kRowBlock,
// accumulation type, row-major (rows, D)), leaving each row's running best in
// scratch.best[r] (merge_lanes / row_winner turn it into an answer). The unit
// of work of search() and of the fused multi-stage search (residual_nearest_code.cpp).
template <int M, typename acc_t>
void search_block(const acc_t* zblk, int64_t rows, const PreparedCodebook<acc_t>& cb, int64_t c_begin,
                  int64_t c_end, BlockScratch<acc_t>& scratch, fortran_gemm_t<acc_t> gemm, ScalarType acc_dtype) {
  const int64_t K = cb.K, D = cb.D;
  Lanes<acc_t>* best = scratch.best.data();
  for (int64_t r = 0; r < rows; ++r) best[r].reset();
  if (D <= kSmallD) {
    for (int64_t r = 0; r < rows; r += kMicroRows) {
      const int64_t rr = std::min<int64_t>(kMicroRows, rows - r);
      acc_t zpad[kMicroRows * kSmallD] = {};  // short row groups read zeros, not past the block
      std::copy(zblk + r * D, zblk + (r + rr) * D, zpad);
      for (int64_t k0 = c_begin; k0 < c_end; k0 += kCodeBlock)
        small_d_block<M, acc_t>(zpad, rr, D, cb.cols.data(), K, cb.code.data(), k0,
                                std::min(kCodeBlock, c_end - k0), best + r);
    }
    return;
  }
  const int64_t cblock = code_block_for(D);
  for (int64_t k0 = c_begin; k0 < c_end; k0 += cblock) {
    const int64_t n = std::min(cblock, c_end - k0);
    dot_tile(zblk, rows, cb.rows.data() + offset2d(k0, 0, D), n, D, scratch.tile.data(), gemm, acc_dtype);
    for (int64_t r = 0; r < rows; ++r) fold<M, acc_t>(scratch.tile.data() + r * n, cb.code.data() + k0, n, k0, best[r]);
  }
}

// A row's answer over all K codes from its lanes: the rare row with no lane set
// (every score NaN or +inf) falls back to the exact scan.
template <int M, typename acc_t>
std::pair<acc_t, int64_t> row_winner(const Lanes<acc_t>& best, const acc_t* zrow, const PreparedCodebook<acc_t>& cb) {
  auto win = merge_lanes(best);
  if (win.second < 0) win = scan_row<M, acc_t>(zrow, cb.rows.data(), cb.code.data(), cb.K, cb.D);
  return win;
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
  const fortran_gemm_t<acc_t> gemm = fortran_gemm<acc_t>();

  // Tasks: row blocks x code splits. Splitting codes keeps every thread busy
  // when N is small (a single row block); partial bests merge in code order.
  const int64_t row_blocks = (N + kRowBlock - 1) / kRowBlock;
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
  const int64_t cblock = search_code_block(D);
  const int64_t code_blocks = (K + cblock - 1) / cblock;
  const int64_t splits = std::min(code_blocks, std::max<int64_t>(1, (threads + row_blocks - 1) / row_blocks));
  const int64_t blocks_per_split = (code_blocks + splits - 1) / splits;
  std::vector<acc_t> part_score(splits > 1 ? static_cast<size_t>(splits * N) : 0);
  std::vector<int64_t> part_index(splits > 1 ? static_cast<size_t>(splits * N) : 0);

  torch::stable::parallel_for(0, row_blocks * splits, 1, [&](int64_t t_begin, int64_t t_end) {
    std::vector<acc_t> zblk(static_cast<size_t>(kRowBlock * D));
    BlockScratch<acc_t> scratch(D);
    int64_t win_index[kRowBlock];
    acc_t win_score[kRowBlock];
    for (int64_t task = t_begin; task < t_end; ++task) {
      const int64_t rb = task / splits, split = task % splits;
      const int64_t r0 = rb * kRowBlock;
      const int64_t rows = std::min(kRowBlock, N - r0);
      const int64_t c_begin = split * blocks_per_split * cblock;
      const int64_t c_end = std::min(K, (split + 1) * blocks_per_split * cblock);
      load_rows(z + offset2d(r0, 0, D), rows, D, zblk.data());
      search_block<M, acc_t>(zblk.data(), rows, cb, c_begin, c_end, scratch, gemm, acc_dtype);
      for (int64_t r = 0; r < rows; ++r) {
        if (splits > 1) {
          auto [bs, bi] = merge_lanes(scratch.best[r]);
          part_score[offset2d(split, r0 + r, N)] = bs;
          part_index[offset2d(split, r0 + r, N)] = bi;
          continue;
        }
        std::tie(win_score[r], win_index[r]) = row_winner<M, acc_t>(scratch.best[r], zblk.data() + r * D, cb);
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
