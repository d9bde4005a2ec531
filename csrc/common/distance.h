// Distance epilogue and tie rule shared by the CPU and CUDA kernels.
//
// Every kernel computes dot products z.e for a tile and then calls these
// functions, so the CPU tests exercise exactly the arithmetic the GPU runs.
//
// The search minimises a per-code *score* that differs from the final distance
// by a per-row constant (which cannot change the argmin), so the inner loop
// never touches the row's norm:
//   l2:     score = |e|^2 - 2 z.e          distance = max(score + |z|^2, 0)
//   cosine: score = -(z.e) / max(|e|,eps)  distance = 1 + score / max(|z|,eps)
//   dot:    score = -(z.e)                 distance = score
// eps = 1e-12 as in torch.nn.functional.normalize. |e|^2 (l2) or 1/max(|e|,eps)
// (cosine) is the per-code term `code`, computed once per call by code_term.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define VQ_HD __host__ __device__ __forceinline__
#else
#define VQ_HD inline
#endif

namespace vqfast {

enum Metric : int { kL2 = 0, kCosine = 1, kDot = 2 };

constexpr double kNormEps = 1e-12;

// Per-code term folded into the score: |e|^2 for l2, 1/max(|e|,eps) for
// cosine, 0 for dot. The row term (|z|^2 or 1/max(|z|,eps)) is the same
// function of the row's squared norm.
template <int M, typename acc_t>
VQ_HD acc_t norm_term(acc_t sq_norm) {
  if (M == kL2) return sq_norm;
  if (M == kCosine) {
    acc_t n = sqrt(sq_norm);
    return acc_t(1) / (n > acc_t(kNormEps) ? n : acc_t(kNormEps));
  }
  return acc_t(0);
}

// Also instantiated on SIMD vector types by the CPU kernel (hence dot + dot,
// which equals 2 * dot exactly, rather than a scalar constant).
template <int M, typename T>
VQ_HD T score(T dot, T code) {
  if (M == kL2) return code - (dot + dot);
  if (M == kCosine) return -dot * code;
  return -dot;
}

template <int M, typename acc_t>
VQ_HD acc_t finalize_distance(acc_t best_score, acc_t row) {
  if (M == kL2) {
    acc_t d = best_score + row;
    // The expanded form can dip below zero through cancellation; NaN stays NaN.
    return d < acc_t(0) ? acc_t(0) : d;
  }
  if (M == kCosine) return acc_t(1) + best_score * row;
  return best_score;
}

// Does candidate (s, i) beat the incumbent (bs, bi)?  bi < 0 means "none yet".
// Ties go to the lower index, as torch.argmin does; a NaN score loses to any
// number, so a NaN code never hides a finite one, and a row that is NaN
// everywhere still gets an in-range index (the first code).
template <typename acc_t>
VQ_HD bool better(acc_t s, int64_t i, acc_t bs, int64_t bi) {
  if (bi < 0) return true;
  if (s < bs) return true;
  if (s == bs) return i < bi;
  return bs != bs && s == s;
}

// Combines two partial results, each the outcome of an index-ordered scan with
// `better` over disjoint sets of codes (threads of a tile, split-K blocks, CPU
// chunks): should (s, i) replace (bs, bi)? i < 0 / bi < 0 mean "no candidate".
// The lower-index partial always plays the incumbent, so the result is what one
// scan over the union in index order gives (including "first code" when every
// score is NaN), whatever order or tree the partials are merged in.
template <typename acc_t>
VQ_HD bool better_merge(acc_t s, int64_t i, acc_t bs, int64_t bi) {
  if (i < 0) return false;
  if (bi < 0) return true;
  return i < bi ? !better(bs, bi, s, i) : better(s, i, bs, bi);
}

// Element offsets into row-major (rows, cols) buffers are formed in 64 bits:
// N*K and N*D pass 2^31 at sizes people run (N=262144, K=16384).
VQ_HD int64_t offset2d(int64_t row, int64_t col, int64_t row_stride) {
  return row * row_stride + col;
}

// Calls f.template operator()<M>() with the metric as a compile-time constant,
// so each metric's inner loop is specialised (and vectorised) separately.
#define VQFAST_DISPATCH_METRIC(metric, ...)                                   \
  [&] {                                                                       \
    switch (metric) {                                                         \
      case ::vqfast::kL2: { constexpr int M = ::vqfast::kL2; return __VA_ARGS__(); }         \
      case ::vqfast::kCosine: { constexpr int M = ::vqfast::kCosine; return __VA_ARGS__(); } \
      default: { constexpr int M = ::vqfast::kDot; return __VA_ARGS__(); }                   \
    }                                                                         \
  }()

}  // namespace vqfast
