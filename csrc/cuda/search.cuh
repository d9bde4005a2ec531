// The CUDA nearest-code search, shared by vqfast::nearest_code
// (nearest_code.cu) and the quantize forward (quantize.cu): for each row of
// z (N, D), the index of the nearest row of codebook (K, D), without ever
// forming the N x K distance matrix.
//
// Structure (all on the current stream; launch_search below):
//   code_term_kernel     one warp per code: norm_term<M>(|e_k|^2) -> (K,) buffer
//                        (skipped for the dot metric, whose code term is 0).
//   nearest_code_kernel  an SGEMM-shaped tile loop fused with the argmin.
//   merge_kernel         only when the codes were split across blockIdx.y.
// Each finishes its rows with finish_row: the distance for nearest_code, or
// (GATHER, the quantize forward) the gathered code into z_q and the squared
// error, summed per block into a buffer that the caller reduces.
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
// split; the GATHER epilogue runs at the same place, one warp per row. With
// GATHER false every kernel is the plain nearest_code search (the epilogue is
// `if constexpr`'d away). All element offsets are 64-bit (offset2d).

#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "common.cuh"

namespace vqfast {
namespace {

static_assert(kThreads == 256, "the search kernel is a 16 x 16 thread grid");
constexpr int kBK = 8;  // width of one slice of D

// ---------------------------------------------------------------------------
// Tiles
// ---------------------------------------------------------------------------

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

// Finishes one row of the search, one warp per row (`best_*`: the row's
// winner). nearest_code (GATHER false): computes the row term and writes the
// index and the distance; returns 0. quantize (GATHER true): writes the index
// and the chosen code into zq (the unit code for cosine, the code itself,
// bit for bit, otherwise) and returns this lane's share of the squared error
// sum_d (z'_d - e'_d)^2, with z', e' normalized for cosine; no distance.
template <typename T, int M, bool GATHER>
__device__ __forceinline__ typename AccOf<T>::type finish_row(
    const T* __restrict__ z, const T* __restrict__ codebook, const typename AccOf<T>::type* __restrict__ code_term,
    int64_t row, int D, typename AccOf<T>::type best_score, int best_index, int lane, int64_t* __restrict__ out_index,
    typename AccOf<T>::type* __restrict__ out_dist, T* __restrict__ zq) {
  using acc_t = typename AccOf<T>::type;
  if constexpr (!GATHER) {
    acc_t row_term = acc_t(0);
    if (M != kDot) row_term = norm_term<M, acc_t>(warp_sq_norm<T, acc_t>(z + offset2d(row, 0, D), D, lane));
    if (lane == 0) {
      out_index[row] = best_index;
      out_dist[row] = finalize_distance<M, acc_t>(best_score, row_term);
    }
    return acc_t(0);
  } else {
    const T* zr = z + offset2d(row, 0, D);
    const T* er = codebook + offset2d(best_index, 0, D);
    T* out = zq + offset2d(row, 0, D);
    acc_t err = acc_t(0);
    if constexpr (M == kCosine) {
      const acc_t zscale = inv_norm(warp_sq_norm<T, acc_t>(zr, D, lane));
      const acc_t escale = code_term[best_index];  // 1 / max(|e|, eps)
      for (int d = lane; d < D; d += 32) {
        const acc_t e = to_acc(er[d]) * escale;
        const acc_t diff = to_acc(zr[d]) * zscale - e;
        err += diff * diff;
        out[d] = from_acc<T>(e);
      }
    } else {
      for (int d = lane; d < D; d += 32) {
        const T e = er[d];
        const acc_t diff = to_acc(zr[d]) - to_acc(e);
        err += diff * diff;
        out[d] = e;
      }
    }
    if (lane == 0) out_index[row] = best_index;
    return err;
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
// part_score == nullptr: one split, finish the rows here (finish_row: write
// out_index / out_dist, or with GATHER out_index / zq and the block's squared
// error to block_err[blockIdx.x]). Otherwise write the block's (score, index)
// per row to part_*[y * N + row].
// VEC > 1 (vectorised loads) requires D % VEC == 0 and both base pointers
// aligned to VEC elements; VEC == 1 works for any D and alignment.
template <typename T, int M, int VEC, bool GATHER>
__global__ void __launch_bounds__(kThreads, 2)
    nearest_code_kernel(const T* __restrict__ z, const T* __restrict__ codebook,
                        const typename AccOf<T>::type* __restrict__ code_term, int64_t N, int K, int D,
                        int tiles_per_split, int64_t* __restrict__ out_index,
                        typename AccOf<T>::type* __restrict__ out_dist,
                        typename AccOf<T>::type* __restrict__ part_score, int* __restrict__ part_index,
                        T* __restrict__ zq, typename AccOf<T>::type* __restrict__ block_err) {
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

  // Finalize: one warp per row writes the outputs (finish_row).
  const int lane = tid & 31;
  acc_t err = acc_t(0);  // GATHER: this lane's share of the block's squared error
  for (int r = tid >> 5; r < BM; r += kWarps) {
    const int64_t row = row0 + r;
    if (row >= N) break;
    err += finish_row<T, M, GATHER>(z, codebook, code_term, row, D, s_best_score[r], s_best_index[r], lane,
                                    out_index, out_dist, zq);
  }
  if constexpr (GATHER) block_sum_store(err, block_err + blockIdx.x);
}

// Merges the splits' partials of one row (one warp per row) and finishes the
// row (finish_row; with GATHER, the block's squared error to block_err[blockIdx.x]).
template <typename T, int M, bool GATHER>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const T* __restrict__ z, const T* __restrict__ codebook,
                 const typename AccOf<T>::type* __restrict__ code_term,
                 const typename AccOf<T>::type* __restrict__ part_score, const int* __restrict__ part_index,
                 int splits, int64_t N, int D, int64_t* __restrict__ out_index,
                 typename AccOf<T>::type* __restrict__ out_dist, T* __restrict__ zq,
                 typename AccOf<T>::type* __restrict__ block_err) {
  using acc_t = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  acc_t err = acc_t(0);
  if (row < N) {  // warp-uniform
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
    err = finish_row<T, M, GATHER>(z, codebook, code_term, row, D, s, idx, lane, out_index, out_dist, zq);
  }
  if constexpr (GATHER) block_sum_store(err, block_err + blockIdx.x);
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

// Vectorised loads (VEC = vec_width<T>()) when D is a multiple of the vector
// and both base pointers are aligned to a whole vector.
template <typename T>
bool use_vec_loads(const Tensor& z, const Tensor& codebook, int64_t D) {
  constexpr int VEC = vec_width<T>();
  constexpr uintptr_t kAlign = sizeof(T) * VEC;
  return D % VEC == 0 && reinterpret_cast<uintptr_t>(z.data_ptr()) % kAlign == 0 &&
         reinterpret_cast<uintptr_t>(codebook.data_ptr()) % kAlign == 0;
}

// Runs the search on contiguous z (N >= 1 rows) and codebook (K >= 1 codes).
// GATHER false (nearest_code): writes out_index and out_dist (zq unused);
// returns an undefined tensor. GATHER true (quantize): writes out_index and zq
// (out_dist unused) and returns the per-block squared-error sums (acc dtype),
// one per block of whichever kernel finished the rows, for the caller to
// reduce in a fixed order.
template <typename T, int M, int VEC, bool GATHER>
Tensor launch_search(const Tensor& z, const Tensor& codebook, int64_t* out_index,
                     typename AccOf<T>::type* out_dist, T* zq, int64_t N, int K, int D, int32_t device_index,
                     cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  using Cfg = TileCfg<acc_t>;
  const ScalarType acc_dtype = std::is_same_v<acc_t, double> ? ScalarType::Double : ScalarType::Float;
  const T* zp = reinterpret_cast<const T*>(z.data_ptr());
  const T* cbp = reinterpret_cast<const T*>(codebook.data_ptr());

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
  const int64_t merge_blocks = (N + kWarps - 1) / kWarps;

  // GATHER: one squared-error sum per block of the kernel that finishes the rows.
  Tensor block_err_buf;
  acc_t* bep = nullptr;
  if constexpr (GATHER) {
    block_err_buf = torch::stable::empty({splits > 1 ? merge_blocks : row_blocks}, acc_dtype, std::nullopt,
                                         z.device());
    bep = reinterpret_cast<acc_t*>(block_err_buf.data_ptr());
  }

  const dim3 grid{static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits), 1u};
  nearest_code_kernel<T, M, VEC, GATHER><<<grid, kThreads, 0, stream>>>(zp, cbp, ctp, N, K, D, tiles_per_split,
                                                                        out_index, out_dist, psp, pip, zq, bep);
  check_launch("nearest_code_kernel");

  if (splits > 1) {
    STD_TORCH_CHECK(merge_blocks <= INT_MAX, "vqfast nearest_code: too many rows (", N, ")");
    merge_kernel<T, M, GATHER><<<unsigned(merge_blocks), kThreads, 0, stream>>>(
        zp, cbp, ctp, psp, pip, splits, N, D, out_index, out_dist, zq, bep);
    check_launch("merge_kernel");
  }
  return block_err_buf;
}

}  // namespace
}  // namespace vqfast
