// CUDA kernel of vqfast::nearest_code: for each row of z (N, D), the index of
// the nearest row of codebook (K, D) and its distance, without ever forming the
// N x K distance matrix.
//
// Structure (all on the current stream):
//   code_term_kernel     one warp per code: norm_term<M>(|e_k|^2) -> (K,) buffer
//                        (skipped for the dot metric, whose code term is 0).
//   nearest_code_kernel  an SGEMM-shaped tile loop fused with the argmin.
//   merge_kernel         only when the codes were split across blockIdx.y.
//
// Tiling of nearest_code_kernel (fp32 accumulation for half/bf16/float):
//   256 threads as a 16 x 16 grid (tx = lane & 15 picks codes, ty picks rows).
//   A block owns BM = 128 rows of z and sweeps its code range in tiles of
//   BN = 128 codes; each tile is a BM x BN x D product computed in BK = 8 wide
//   slices of D. Per slice, the z tile (BM x BK) and the codebook tile
//   (BN x BK) are read from global memory with one 16-byte (float, double) or
//   8-byte (half, bf16) vector per thread and operand when D and the pointers
//   allow it, else element by element; consecutive threads read consecutive
//   parts of a row (coalesced). They are converted to the accumulator type and
//   stored transposed (k-major) in shared memory, each k-row padded by 16
//   bytes so that the transposing stores are bank-conflict free. Each thread
//   accumulates a TM x TN = 8 x 8 register micro-tile: rows ty*8..ty*8+7 and
//   codes tx*4..tx*4+3 and 64+tx*4..64+tx*4+3 (two 16-byte groups, so the 16
//   threads of a half-warp read 256 contiguous bytes with LDS.128: no
//   conflicts; the row operands are half-warp broadcasts): 64 FFMA per 4
//   LDS.128. Shared memory is double buffered and the next slice is loaded
//   into registers while the current one is multiplied (one __syncthreads per
//   slice); the (tile, slice) loop is flattened so this runs across tile
//   borders. BK = 8 keeps D = 8 free of padding work. 128 registers per
//   thread (__launch_bounds__(256, 2): two blocks, 16 warps per SM, no
//   spills); to fit, each thread's running best lives in its own column of
//   shared memory and the code terms are read when a tile is scored. For
//   double the shape is halved (BM = BN = 64, TM = TN = 4).
//
// Argmin and exact ties: after each code tile, a thread scores its TM x TN
// dot products with score<M> and folds them into a per-row running best with
// `better`, visiting its codes in increasing index order, so each thread holds
// exactly the result of an index-ordered scan over its own codes (the scan is
// seeded with (NaN, first code of the thread), which gives the same result
// and lets the compiler drop better()'s integer tests there; see fold_tile). The 16 threads sharing a
// row (one half-warp) are then combined by a shuffle butterfly with
// better_merge, which lets the lower-index partial act as the incumbent: the
// merge is order independent and reproduces the single index-ordered scan
// (lowest index on equal scores, NaN loses, an all-NaN row gets the first
// code). Split partials are merged the same way.
//
// Row terms (|z|^2, 1/max(|z|,eps)) only enter finalize_distance, so they are
// computed once per row at the end (one warp per row, reading the row from
// global memory) in the main kernel, or in merge_kernel when the codes were
// split. All element offsets are 64-bit (offset2d).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/shim_utils.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <tuple>

#include "common/distance.h"

namespace vqfast {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int kThreads = 256;  // 16 x 16 thread grid
constexpr int kBK = 8;         // width of one slice of D
constexpr int kWarps = kThreads / 32;

// ---------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T zero_of();
template <>
__device__ __forceinline__ float zero_of<float>() { return 0.f; }
template <>
__device__ __forceinline__ double zero_of<double>() { return 0.0; }
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __ushort_as_half(0); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __ushort_as_bfloat16(0); }

// Tile shape per accumulator type. VN accumulators fill 16 bytes.
template <typename acc_t>
struct TileCfg {
  static constexpr int VN = 16 / int(sizeof(acc_t));  // 4 float, 2 double
  static constexpr int TM = 2 * VN;                   // rows per thread
  static constexpr int TN = 2 * VN;                   // codes per thread
  static constexpr int BM = 16 * TM;                  // rows per block
  static constexpr int BN = 16 * TN;                  // codes per tile
  static constexpr int PAD = VN;                      // 16 bytes per smem k-row
  static_assert(BM == BN, "z and codebook tiles share the load mapping");
};

// Elements per global load on the vectorised path: 16 bytes for float and
// double, 8 bytes for half/bfloat16, so that a BK slice of one row is 2 or 4
// vectors and each thread loads one vector of z and one of the codebook.
template <typename T>
constexpr int vec_width() {
  return sizeof(T) == 2 ? 4 : 16 / int(sizeof(T));
}

template <typename acc_t, int VN>
struct alignas(16) VecN {
  acc_t v[VN];
};

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// ---------------------------------------------------------------------------
// Warp helpers
// ---------------------------------------------------------------------------

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum of squares of p[0..D), accumulated in acc_t by one warp; every lane gets it.
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t warp_sq_norm(const T* __restrict__ p, int64_t D, int lane) {
  acc_t sq = acc_t(0);
  for (int64_t d = lane; d < D; d += 32) {
    const acc_t x = to_acc(p[d]);
    sq += x * x;
  }
  return warp_sum(sq);
}

// Butterfly over groups of `width` consecutive lanes (a power of two <= 32):
// afterwards every lane of a group holds the group's better_merge of (s, i).
template <typename acc_t, int width>
__device__ __forceinline__ void butterfly_merge(acc_t& s, int& i) {
#pragma unroll
  for (int off = width / 2; off > 0; off >>= 1) {
    const acc_t os = __shfl_xor_sync(0xffffffffu, s, off);
    const int oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (better_merge<acc_t>(os, int64_t(oi), s, int64_t(i))) {
      s = os;
      i = oi;
    }
  }
}

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

// code_term[k] = norm_term<M>(|e_k|^2); one warp per code.
template <typename T, int M>
__global__ void __launch_bounds__(kThreads) code_term_kernel(const T* __restrict__ codebook, int64_t K, int64_t D,
                                                             typename AccOf<T>::type* __restrict__ code_term) {
  using acc_t = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t k = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (k >= K) return;
  const acc_t sq = warp_sq_norm<T, acc_t>(codebook + offset2d(k, 0, D), D, lane);
  if (lane == 0) code_term[k] = norm_term<M, acc_t>(sq);
}

// See the comment at the top. Grid: (ceil(N / BM), splits). Block y searches
// code tiles [y * tiles_per_split, min(num_tiles, (y + 1) * tiles_per_split)).
// part_score == nullptr: one split, write out_index / out_dist directly.
// Otherwise write the block's (score, index) per row to part_*[y * N + row].
// VEC > 1 (vectorised loads) requires D % VEC == 0 and both base pointers
// aligned to VEC elements; VEC == 1 works for any D and alignment.
template <typename T, int M, int VEC>
__global__ void __launch_bounds__(kThreads, 2)
    nearest_code_kernel(const T* __restrict__ z, const T* __restrict__ codebook,
                        const typename AccOf<T>::type* __restrict__ code_term, int64_t N, int K, int D,
                        int tiles_per_split, int64_t* __restrict__ out_index,
                        typename AccOf<T>::type* __restrict__ out_dist,
                        typename AccOf<T>::type* __restrict__ part_score, int* __restrict__ part_index) {
  using acc_t = typename AccOf<T>::type;
  using Cfg = TileCfg<acc_t>;
  constexpr int VN = Cfg::VN, TM = Cfg::TM, TN = Cfg::TN, BM = Cfg::BM, BN = Cfg::BN;
  constexpr int PAD = Cfg::PAD;
  // Global -> shared mapping of one operand's BM x BK slice: KQ vectors of VEC
  // elements per row; vector v = tid + l * kThreads (l < LV) is row v / KQ,
  // columns (v % KQ) * VEC + [0, VEC). Consecutive threads read consecutive
  // vectors of a row (coalesced), and the transposed shared stores are
  // conflict free thanks to PAD.
  constexpr int KQ = kBK / VEC;
  constexpr int LV = BM * KQ / kThreads;        // vectors per thread per operand
  constexpr int ROW_STEP = kThreads / KQ;        // rows between a thread's vectors
  static_assert(kBK % VEC == 0 && LV >= 1 && LV * kThreads == BM * KQ, "load mapping");
  using Vec = VecN<acc_t, VN>;
  using P = Pack<T, VEC>;

  __shared__ __align__(16) acc_t As[2][kBK][BM + PAD];  // z slice, k-major
  __shared__ __align__(16) acc_t Bs[2][kBK][BN + PAD];  // codebook slice, k-major
  // Each thread's running best for its TM rows, in its own column of shared
  // memory (conflict free, no synchronisation) rather than in 2*TM registers,
  // which go to the accumulators and the prefetch instead.
  __shared__ acc_t s_run_score[TM][kThreads];
  __shared__ int s_run_index[TM][kThreads];
  __shared__ acc_t s_best_score[BM];
  __shared__ int s_best_index[BM];

  const int tid = threadIdx.x;
  const int tx = tid & 15;  // code group
  const int ty = tid >> 4;  // row group
  const int64_t row0 = int64_t(blockIdx.x) * BM;

  const int num_tiles = (K + BN - 1) / BN;
  const int num_chunks = max(1, (D + kBK - 1) / kBK);  // D == 0: one slice of zeros
  const int t_begin = blockIdx.y * tiles_per_split;
  const int t_end = min(num_tiles, t_begin + tiles_per_split);  // host guarantees t_begin < t_end

  const int lq = (tid % KQ) * VEC;  // first column of this thread's vectors
  const int lr = tid / KQ;          // first row of this thread's vectors
  unsigned z_rows_valid = 0;
#pragma unroll
  for (int l = 0; l < LV; ++l)
    if (row0 + lr + l * ROW_STEP < N) z_rows_valid |= 1u << l;

  // The prefetch is not wrapped in `if (has_next)`: past the end (!live) or
  // out of range, vectors just read as zero. That keeps the loads ahead of the
  // multiply of the current slice rather than sunk into a branch behind it.
  // With D % VEC == 0 a vector is either entirely inside its row or past it.
  P ra[LV], rb[LV];
  const int64_t row_step = int64_t(ROW_STEP) * D;  // elements between a thread's rows
  const int64_t z_base = offset2d(row0 + lr, lq, D);
  auto load_slice = [&](int t, int c, bool live) {
    const int d = c * kBK + lq;
    const bool dv = live && d < D;
    const int64_t z_off = z_base + c * kBK;
    const int64_t cb_off = offset2d(int64_t(t) * BN + lr, d, D);
#pragma unroll
    for (int l = 0; l < LV; ++l) {
      if (dv && ((z_rows_valid >> l) & 1u)) {
        ra[l] = *reinterpret_cast<const P*>(z + z_off + l * row_step);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) ra[l].v[e] = zero_of<T>();
      }
      if (dv && t * BN + lr + l * ROW_STEP < K) {
        rb[l] = *reinterpret_cast<const P*>(codebook + cb_off + l * row_step);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) rb[l].v[e] = zero_of<T>();
      }
    }
  };
  auto store_slice = [&](int buf) {
#pragma unroll
    for (int l = 0; l < LV; ++l)
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        As[buf][lq + e][lr + l * ROW_STEP] = to_acc(ra[l].v[e]);
        Bs[buf][lq + e][lr + l * ROW_STEP] = to_acc(rb[l].v[e]);
      }
  };
  // Tile-relative code of this thread's j-th column: two 16-byte groups, increasing in j.
  auto code_of = [&](int j) { return (j < VN) ? tx * VN + j : BN / 2 + tx * VN + (j - VN); };

  acc_t acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = acc_t(0);

  // Running best, seeded with (NaN, first code of this thread) rather than
  // better()'s "none yet" (bi < 0). The scan gives the same result either way:
  // the first code replaces a NaN incumbent unless its own score is NaN, in
  // which case the first code is what the scan keeps anyway (only the NaN's
  // payload can differ, and the distance is NaN regardless). The seed makes
  // 0 <= bi <= code hold at every fold below, which lets the compiler drop
  // better()'s integer tests ("none yet", index tie-break) from the fold.
  // A thread whose first code is past K has no codes at all and keeps -1.
  const int first_code = t_begin * BN + code_of(0);
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    s_run_score[i][tid] = std::numeric_limits<acc_t>::quiet_NaN();
    s_run_index[i][tid] = first_code < K ? first_code : -1;
  }

  // Folds the finished tile t into the running best. Each row's codes are
  // visited in increasing index order (code_of is increasing and tiles
  // ascend): the index-ordered scan that `better` is defined for. Full tiles
  // (every code < K) skip the bounds test; only a ragged last tile needs it.
  // The code terms are read here (L1/L2 hits, once per tile) rather than held
  // in registers across the tile.
  auto fold_tile = [&](int t, auto full_tile) {
    constexpr bool kFull = decltype(full_tile)::value;
    acc_t cterm[TN];
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int code = t * BN + code_of(j);
      cterm[j] = (M != kDot && (kFull || code < K)) ? code_term[code] : acc_t(0);
    }
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      acc_t bs = s_run_score[i][tid];
      int bi = s_run_index[i][tid];
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int code = t * BN + code_of(j);
        if (kFull || code < K) {
          // code < K, so this thread's first code is < K too: bi is that seed
          // or a code taken earlier in this scan.
          __builtin_assume(bi >= 0 && bi <= code);
          const acc_t s = score<M, acc_t>(acc[i][j], cterm[j]);
          if (better<acc_t>(s, int64_t(code), bs, int64_t(bi))) {
            bs = s;
            bi = code;
          }
        }
        acc[i][j] = acc_t(0);
      }
      s_run_score[i][tid] = bs;
      s_run_index[i][tid] = bi;
    }
  };

  int t = t_begin, c = 0, buf = 0;
  load_slice(t, c, true);
  store_slice(0);
  __syncthreads();

  // One iteration per (tile, slice); block-uniform control flow throughout.
  for (;;) {
    int nc = c + 1, nt = t;
    if (nc == num_chunks) {
      nc = 0;
      ++nt;
    }
    const bool has_next = nt < t_end;
    load_slice(nt, nc, has_next);  // in flight while this slice is multiplied

#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      acc_t a[TM], b[TN];
#pragma unroll
      for (int v = 0; v < TM / VN; ++v) {
        const Vec va = *reinterpret_cast<const Vec*>(&As[buf][k][ty * TM + v * VN]);
#pragma unroll
        for (int e = 0; e < VN; ++e) a[v * VN + e] = va.v[e];
      }
      const Vec vb0 = *reinterpret_cast<const Vec*>(&Bs[buf][k][tx * VN]);
      const Vec vb1 = *reinterpret_cast<const Vec*>(&Bs[buf][k][BN / 2 + tx * VN]);
#pragma unroll
      for (int e = 0; e < VN; ++e) {
        b[e] = vb0.v[e];
        b[VN + e] = vb1.v[e];
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }

    if (nc == 0) {  // tile t is complete
      if ((t + 1) * BN <= K) {
        fold_tile(t, std::true_type{});
      } else {
        fold_tile(t, std::false_type{});
      }
    }

    if (!has_next) break;
    store_slice(buf ^ 1);
    __syncthreads();
    buf ^= 1;
    t = nt;
    c = nc;
  }

  // Combine the 16 threads (one half-warp, tx = 0..15) that share each row.
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    acc_t bs = s_run_score[i][tid];
    int bi = s_run_index[i][tid];
    butterfly_merge<acc_t, 16>(bs, bi);
    if (tx == 0) {
      s_best_score[ty * TM + i] = bs;
      s_best_index[ty * TM + i] = bi;
    }
  }
  __syncthreads();

  if (part_score != nullptr) {
    for (int r = tid; r < BM; r += kThreads) {
      const int64_t row = row0 + r;
      if (row < N) {
        part_score[offset2d(blockIdx.y, row, N)] = s_best_score[r];
        part_index[offset2d(blockIdx.y, row, N)] = s_best_index[r];
      }
    }
    return;
  }

  // Finalize: one warp per row computes the row term and writes the outputs.
  const int lane = tid & 31;
  for (int r = tid >> 5; r < BM; r += kWarps) {
    const int64_t row = row0 + r;
    if (row >= N) break;
    acc_t row_term = acc_t(0);
    if (M != kDot) row_term = norm_term<M, acc_t>(warp_sq_norm<T, acc_t>(z + offset2d(row, 0, D), D, lane));
    if (lane == 0) {
      out_index[row] = s_best_index[r];
      out_dist[row] = finalize_distance<M, acc_t>(s_best_score[r], row_term);
    }
  }
}

// Merges the splits' partials of one row (one warp per row) and finalizes.
template <typename T, int M>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const T* __restrict__ z, const typename AccOf<T>::type* __restrict__ part_score,
                 const int* __restrict__ part_index, int splits, int64_t N, int D,
                 int64_t* __restrict__ out_index, typename AccOf<T>::type* __restrict__ out_dist) {
  using acc_t = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= N) return;
  acc_t s = acc_t(0);
  int idx = -1;
  for (int p = lane; p < splits; p += 32) {
    const acc_t ps = part_score[offset2d(p, row, N)];
    const int pi = part_index[offset2d(p, row, N)];
    if (better_merge<acc_t>(ps, int64_t(pi), s, int64_t(idx))) {
      s = ps;
      idx = pi;
    }
  }
  butterfly_merge<acc_t, 32>(s, idx);
  acc_t row_term = acc_t(0);
  if (M != kDot) row_term = norm_term<M, acc_t>(warp_sq_norm<T, acc_t>(z + offset2d(row, 0, D), D, lane));
  if (lane == 0) {
    out_index[row] = idx;
    out_dist[row] = finalize_distance<M, acc_t>(s, row_term);
  }
}

// How many ways to split the code tiles over blockIdx.y: with few row blocks,
// enough splits to reach about target_blocks blocks (every split non-empty).
struct SplitPlan {
  int splits;
  int tiles_per_split;
};

inline SplitPlan plan_splits(int64_t row_blocks, int num_tiles, int64_t target_blocks) {
  SplitPlan plan{1, num_tiles};
  if (row_blocks < target_blocks && num_tiles > 1) {
    int64_t want = (target_blocks + row_blocks - 1) / row_blocks;
    want = std::min<int64_t>(std::min<int64_t>(want, num_tiles), 65535);
    plan.tiles_per_split = int((num_tiles + want - 1) / want);
    plan.splits = (num_tiles + plan.tiles_per_split - 1) / plan.tiles_per_split;
  }
  return plan;
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, "vqfast ", kernel, " launch failed: ", cudaGetErrorString(err));
}

template <typename T, int M, int VEC>
void launch_nearest_code(const Tensor& z, const Tensor& codebook, const Tensor& out_index,
                         const Tensor& out_dist, int64_t N, int K, int D, ScalarType acc_dtype,
                         int32_t device_index, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  using Cfg = TileCfg<acc_t>;
  const T* zp = reinterpret_cast<const T*>(z.data_ptr());
  const T* cbp = reinterpret_cast<const T*>(codebook.data_ptr());
  int64_t* idxp = reinterpret_cast<int64_t*>(out_index.data_ptr());
  acc_t* distp = reinterpret_cast<acc_t*>(out_dist.data_ptr());

  // Per-code terms (none for the dot metric).
  Tensor code_term_buf;
  const acc_t* ctp = nullptr;
  if constexpr (M != kDot) {
    code_term_buf = torch::stable::empty({int64_t(K)}, acc_dtype, std::nullopt, z.device());
    acc_t* p = reinterpret_cast<acc_t*>(code_term_buf.data_ptr());
    const unsigned blocks = unsigned((int64_t(K) + kWarps - 1) / kWarps);
    code_term_kernel<T, M><<<blocks, kThreads, 0, stream>>>(cbp, K, D, p);
    check_launch("code_term_kernel");
    ctp = p;
  }

  const int64_t row_blocks = (N + Cfg::BM - 1) / Cfg::BM;
  const int num_tiles = (K + Cfg::BN - 1) / Cfg::BN;
  STD_TORCH_CHECK(row_blocks <= INT_MAX, "vqfast nearest_code: too many rows (", N, ")");

  // Few row blocks: split the code tiles over blockIdx.y so the GPU fills up
  // (about two waves' worth of blocks), then merge the partials.
  int sms = 0;
  {
    const cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_index);
    STD_TORCH_CHECK(err == cudaSuccess, "vqfast nearest_code: cudaDeviceGetAttribute failed: ",
                    cudaGetErrorString(err));
  }
  const SplitPlan plan = plan_splits(row_blocks, num_tiles, 2 * int64_t(std::max(sms, 1)));
  const int splits = plan.splits;
  const int tiles_per_split = plan.tiles_per_split;

  Tensor part_score_buf, part_index_buf;
  acc_t* psp = nullptr;
  int* pip = nullptr;
  if (splits > 1) {
    part_score_buf = torch::stable::empty({int64_t(splits), N}, acc_dtype, std::nullopt, z.device());
    part_index_buf = torch::stable::empty({int64_t(splits), N}, ScalarType::Int, std::nullopt, z.device());
    psp = reinterpret_cast<acc_t*>(part_score_buf.data_ptr());
    pip = reinterpret_cast<int*>(part_index_buf.data_ptr());
  }

  const dim3 grid{static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits), 1u};
  nearest_code_kernel<T, M, VEC><<<grid, kThreads, 0, stream>>>(zp, cbp, ctp, N, K, D, tiles_per_split, idxp,
                                                                distp, psp, pip);
  check_launch("nearest_code_kernel");

  if (splits > 1) {
    const unsigned blocks = unsigned((N + kWarps - 1) / kWarps);
    merge_kernel<T, M><<<blocks, kThreads, 0, stream>>>(zp, psp, pip, splits, N, D, idxp, distp);
    check_launch("merge_kernel");
  }
}

template <typename T>
void dispatch_metric(int64_t metric, const Tensor& z, const Tensor& codebook, const Tensor& out_index,
                     const Tensor& out_dist, int64_t N, int K, int D, ScalarType acc_dtype, int32_t device_index,
                     cudaStream_t stream) {
  // Vectorised loads when every row start is aligned to a whole vector.
  constexpr int VEC = vec_width<T>();
  constexpr uintptr_t kAlign = sizeof(T) * VEC;
  const bool vec = D % VEC == 0 && reinterpret_cast<uintptr_t>(z.data_ptr()) % kAlign == 0 &&
                   reinterpret_cast<uintptr_t>(codebook.data_ptr()) % kAlign == 0;
  // The macro pastes the lambda into each case, where M is a constexpr int.
  VQFAST_DISPATCH_METRIC(metric, [&] {
    if (vec) {
      launch_nearest_code<T, M, VEC>(z, codebook, out_index, out_dist, N, K, D, acc_dtype, device_index, stream);
    } else {
      launch_nearest_code<T, M, 1>(z, codebook, out_index, out_dist, N, K, D, acc_dtype, device_index, stream);
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

  const ScalarType acc_dtype = dtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  Tensor out_index = torch::stable::empty({N}, ScalarType::Long, std::nullopt, z.device());
  Tensor out_dist = torch::stable::empty({N}, acc_dtype, std::nullopt, z.device());
  if (N == 0) return std::make_tuple(out_index, out_dist);

  void* stream_ptr = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream_ptr));
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);

  const int Ki = int(K), Di = int(D);
  switch (dtype) {
    case ScalarType::Float:
      dispatch_metric<float>(metric, z, codebook, out_index, out_dist, N, Ki, Di, acc_dtype, device_index, stream);
      break;
    case ScalarType::Half:
      dispatch_metric<__half>(metric, z, codebook, out_index, out_dist, N, Ki, Di, acc_dtype, device_index, stream);
      break;
    case ScalarType::BFloat16:
      dispatch_metric<__nv_bfloat16>(metric, z, codebook, out_index, out_dist, N, Ki, Di, acc_dtype, device_index,
                                     stream);
      break;
    default:
      dispatch_metric<double>(metric, z, codebook, out_index, out_dist, N, Ki, Di, acc_dtype, device_index, stream);
      break;
  }
  return std::make_tuple(out_index, out_dist);
}

}  // namespace
}  // namespace vqfast

STABLE_TORCH_LIBRARY_IMPL(vqfast, CUDA, m) { m.impl("nearest_code", TORCH_BOX(&vqfast::nearest_code_cuda)); }
