// CUDA kernel of vqfast::residual_nearest_code: all Q stages of a residual
// (multi-stage) nearest-code search in one launch. For z (N, D) and codebooks
// (Q, K, D), stage q picks the code of codebooks[q] nearest to the residual r_q
// (r_0 = z, r_{q+1} = r_q - codebooks[q][i_q]), with the metric, score/distance
// split, NaN rule and lowest-index tie rule of nearest_code (csrc/common/distance.h:
// score, better, better_merge, finalize_distance). Formulas:
// vqfast/reference/residual.py.
//
// Structure: code_term_kernel (search.cuh) fills the per-code terms of all Q*K
// codes at once (none for dot); then residual_nearest_code_kernel, one block per
// BM rows, runs the Q stages back to back:
//   * the block's residual tile (BM x D, acc_t = fp32, fp64 for fp64) is loaded
//     from z once into dynamic shared memory and stays there for all stages;
//   * per stage, the block sweeps codebooks[q] in BN-code tiles, each a
//     BM x BN x D product in kBK-wide slices of D: the residual slice is copied
//     shared -> shared into k-major As, the code slice is read from global
//     memory into k-major Bs (converted to acc_t), and each thread of the
//     16 x 16 grid accumulates a TM x TN register micro-tile (rows ty*TM + i,
//     codes j*16 + tx). After a tile, each thread folds its scores into a
//     per-row running best with `better`, visiting its codes in increasing
//     index order, and at the end of the stage the 16 threads sharing a row
//     (one half-warp) combine with butterfly_merge (order independent, the
//     lowest index wins ties, NaN loses, an all-NaN row gets code 0);
//   * one warp per row then writes (index, distance) of stage q, the distance
//     from |r_q|^2 summed over the shared residual in a fixed order (warp_sum),
//     and subtracts the chosen code from the residual in shared memory.
// Nothing but z (once), the codebooks, their code terms and the outputs touches
// global memory.
//
// Wide rows: when BM x D x sizeof(acc_t) exceeds the device's opt-in shared
// memory per block (fp32: D > ~880 on H100, ~630 on A100; fp64 half that), the
// same kernel keeps the residual tile in a global scratch buffer instead (each
// block only touches its own BM rows, so no cross-block traffic; the data stays
// hot in L1/L2). The kernel addresses the residual through a generic pointer,
// so both placements run the same code.
//
// All element offsets into z, the codebooks, the outputs and the scratch are
// 64-bit (offset2d, int64(q) * K * D).
#include "search.cuh"

#include <climits>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

namespace vqfast {
namespace {

// 64 rows x 64 codes per tile, 4 x 4 per thread of the 16 x 16 grid. Smaller
// than the single-stage search's 128 x 128: the residual tile shares the SM's
// shared memory, and at Q = 8 the per-stage finish (one warp per row) must stay
// a small share of the work.
constexpr int kResBM = 64;
constexpr int kResBN = 64;
constexpr int kResTM = kResBM / 16;
constexpr int kResTN = kResBN / 16;
static_assert(kThreads == 256, "the residual kernel is a 16 x 16 thread grid");

template <typename T, int M>
__global__ void __launch_bounds__(kThreads)
    residual_nearest_code_kernel(const T* __restrict__ z, const T* __restrict__ codebooks,
                                 const typename AccOf<T>::type* __restrict__ code_term, int64_t N, int Q, int K,
                                 int D, typename AccOf<T>::type* __restrict__ scratch,
                                 int64_t* __restrict__ out_index, typename AccOf<T>::type* __restrict__ out_dist) {
  using acc_t = typename AccOf<T>::type;
  constexpr int BM = kResBM, BN = kResBN, TM = kResTM, TN = kResTN;
  // Row stride = 4 (mod 32) words: the slice stores (k = e % 8, m = e / 8 over a
  // warp) hit 32 distinct banks.
  __shared__ __align__(16) acc_t As[kBK][BM + 4];
  __shared__ __align__(16) acc_t Bs[kBK][BN + 4];
  __shared__ acc_t s_best_score[BM];
  __shared__ int s_best_index[BM];
  extern __shared__ __align__(16) unsigned char s_dynamic[];

  const int tid = threadIdx.x;
  const int tx = tid & 15;  // code group
  const int ty = tid >> 4;  // row group
  const int lane = tid & 31;
  const int64_t row0 = int64_t(blockIdx.x) * BM;
  // The residual tile: BM rows of D, row-major; shared memory, or this block's
  // rows of the global scratch when it does not fit (scratch != nullptr).
  acc_t* resid = scratch != nullptr ? scratch + offset2d(blockIdx.x, 0, int64_t(BM) * D)
                                    : reinterpret_cast<acc_t*>(s_dynamic);

  // r_0 = z; rows past N are 0 (never written out).
  for (int64_t e = tid; e < int64_t(BM) * D; e += kThreads) {
    const int64_t m = e / D;
    resid[e] = row0 + m < N ? to_acc(z[offset2d(row0, 0, D) + e]) : acc_t(0);
  }
  __syncthreads();

  const int num_tiles = (K + BN - 1) / BN;
  const int num_chunks = (D + kBK - 1) / kBK;

  for (int q = 0; q < Q; ++q) {
    const T* __restrict__ cb = codebooks + int64_t(q) * K * D;
    const acc_t* __restrict__ cterm = code_term + int64_t(q) * K;

    // Running best per row of this thread; bi < 0: none yet (better's rule).
    acc_t bs[TM];
    int bi[TM];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      bs[i] = std::numeric_limits<acc_t>::quiet_NaN();
      bi[i] = -1;
    }

    for (int t = 0; t < num_tiles; ++t) {
      acc_t acc[TM][TN];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = acc_t(0);

      for (int c = 0; c < num_chunks; ++c) {
        const int d0 = c * kBK;
        // BM x kBK residual slice and BN x kBK code slice: element e of the slice
        // is row e / kBK, column e % kBK (consecutive threads, consecutive columns).
#pragma unroll
        for (int e = tid; e < BM * kBK; e += kThreads) {
          const int m = e / kBK, k = e % kBK, d = d0 + k;
          As[k][m] = d < D ? resid[offset2d(m, d, D)] : acc_t(0);
        }
#pragma unroll
        for (int e = tid; e < BN * kBK; e += kThreads) {
          const int n = e / kBK, k = e % kBK, d = d0 + k;
          const int code = t * BN + n;
          Bs[k][n] = (d < D && code < K) ? to_acc(cb[offset2d(code, d, D)]) : acc_t(0);
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < kBK; ++k) {
          // Scalar shared loads (16-byte vector loads made ptxas spill here): the
          // row operands are half-warp broadcasts, the codes 16 consecutive words.
          acc_t a[TM], b[TN];
#pragma unroll
          for (int i = 0; i < TM; ++i) a[i] = As[k][ty * TM + i];
#pragma unroll
          for (int j = 0; j < TN; ++j) b[j] = Bs[k][j * 16 + tx];
#pragma unroll
          for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
        }
        __syncthreads();  // As/Bs are overwritten by the next slice
      }

      // Fold the tile: this thread's codes t*BN + j*16 + tx increase with j (and t).
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int code = t * BN + j * 16 + tx;
        if (code < K) {
          const acc_t ct = M != kDot ? cterm[code] : acc_t(0);
#pragma unroll
          for (int i = 0; i < TM; ++i) {
            const acc_t s = score<M, acc_t>(acc[i][j], ct);
            if (better<acc_t>(s, int64_t(code), bs[i], int64_t(bi[i]))) {
              bs[i] = s;
              bi[i] = code;
            }
          }
        }
      }
    }

    // Combine the 16 threads (one half-warp) sharing each row.
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      butterfly_merge<acc_t, 16>(bs[i], bi[i]);
      if (tx == 0) {
        s_best_score[ty * TM + i] = bs[i];
        s_best_index[ty * TM + i] = bi[i];
      }
    }
    __syncthreads();

    // Finish stage q, one warp per row: outputs, then r_{q+1} = r_q - e_{i_q}.
    for (int m = tid >> 5; m < BM; m += kWarps) {
      const int64_t row = row0 + m;
      if (row >= N) break;  // warp-uniform; later rows of the block are past N too
      acc_t* r = resid + offset2d(m, 0, D);
      const int best = s_best_index[m];  // >= 0: K >= 1 and every code has a candidate
      if (M != kDot) {
        acc_t sq = acc_t(0);
        for (int d = lane; d < D; d += 32) sq += r[d] * r[d];
        sq = warp_sum(sq);
        if (lane == 0) out_dist[offset2d(row, q, Q)] = finalize_distance<M, acc_t>(s_best_score[m], norm_term<M, acc_t>(sq));
      } else if (lane == 0) {
        out_dist[offset2d(row, q, Q)] = s_best_score[m];
      }
      if (lane == 0) out_index[offset2d(row, q, Q)] = best;
      const T* __restrict__ e = cb + offset2d(best, 0, D);
      for (int d = lane; d < D; d += 32) r[d] -= to_acc(e[d]);
    }
    __syncthreads();  // the residual and s_best_* are read by the next stage
  }
}

template <typename T, int M>
void launch_residual(const Tensor& z, const Tensor& codebooks, const Tensor& out_index, const Tensor& out_dist,
                     int64_t N, int Q, int K, int D, int32_t device_index, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  const ScalarType acc_dtype = std::is_same_v<acc_t, double> ? ScalarType::Double : ScalarType::Float;
  const T* zp = reinterpret_cast<const T*>(z.data_ptr());
  const T* cbp = reinterpret_cast<const T*>(codebooks.data_ptr());
  const int64_t QK = int64_t(Q) * K;

  Tensor code_term_buf;
  const acc_t* ctp = nullptr;
  if constexpr (M != kDot) {
    code_term_buf = torch::stable::empty({QK}, acc_dtype, std::nullopt, z.device());
    acc_t* p = reinterpret_cast<acc_t*>(code_term_buf.data_ptr());
    const int64_t blocks = (QK + kWarps - 1) / kWarps;
    STD_TORCH_CHECK(blocks <= INT_MAX, "vqfast residual_nearest_code (CUDA): too many codes (", QK, ")");
    code_term_kernel<T, M><<<unsigned(blocks), kThreads, 0, stream>>>(cbp, QK, D, p);
    check_launch("code_term_kernel (residual_nearest_code)");
    ctp = p;
  }

  const int64_t row_blocks = (N + kResBM - 1) / kResBM;
  STD_TORCH_CHECK(row_blocks <= INT_MAX, "vqfast residual_nearest_code (CUDA): too many rows (", N, ")");

  // The residual tile in shared memory when it fits next to the static tiles,
  // else in a global scratch buffer (same kernel, see the header).
  int max_optin = 0;
  check_cuda(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_index),
             "cudaDeviceGetAttribute");
  auto kernel = residual_nearest_code_kernel<T, M>;
  cudaFuncAttributes attr{};
  check_cuda(cudaFuncGetAttributes(&attr, kernel), "cudaFuncGetAttributes (residual_nearest_code_kernel)");
  const int64_t resid_bytes = int64_t(kResBM) * D * int64_t(sizeof(acc_t));
  const bool in_shared = resid_bytes + int64_t(attr.sharedSizeBytes) <= int64_t(max_optin);
  Tensor scratch_buf;
  acc_t* scratch = nullptr;
  size_t dyn_bytes = 0;
  if (in_shared) {
    dyn_bytes = size_t(resid_bytes);
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dyn_bytes)),
               "cudaFuncSetAttribute (residual_nearest_code_kernel)");
  } else {
    scratch_buf = torch::stable::empty({row_blocks * kResBM, int64_t(D)}, acc_dtype, std::nullopt, z.device());
    scratch = reinterpret_cast<acc_t*>(scratch_buf.data_ptr());
  }

  kernel<<<unsigned(row_blocks), kThreads, dyn_bytes, stream>>>(
      zp, cbp, ctp, N, Q, K, D, scratch, reinterpret_cast<int64_t*>(out_index.data_ptr()),
      reinterpret_cast<acc_t*>(out_dist.data_ptr()));
  check_launch("residual_nearest_code_kernel");
}

template <typename T>
void dispatch_metric(int64_t metric, const Tensor& z, const Tensor& codebooks, const Tensor& out_index,
                     const Tensor& out_dist, int64_t N, int Q, int K, int D, int32_t device_index,
                     cudaStream_t stream) {
  VQFAST_DISPATCH_METRIC(metric, [&] {
    launch_residual<T, M>(z, codebooks, out_index, out_dist, N, Q, K, D, device_index, stream);
  });
}

std::tuple<Tensor, Tensor> residual_nearest_code_cuda(Tensor z, Tensor codebooks, int64_t metric) {
  STD_TORCH_CHECK(z.is_cuda() && codebooks.is_cuda(),
                  "vqfast residual_nearest_code (CUDA): z and codebooks must be CUDA tensors");
  STD_TORCH_CHECK(z.get_device_index() == codebooks.get_device_index(),
                  "vqfast residual_nearest_code: z and codebooks must be on the same device");
  STD_TORCH_CHECK(z.dim() == 2, "vqfast residual_nearest_code: z must be 2-D (N, D)");
  STD_TORCH_CHECK(codebooks.dim() == 3, "vqfast residual_nearest_code: codebooks must be 3-D (Q, K, D)");
  STD_TORCH_CHECK(z.is_contiguous() && codebooks.is_contiguous(),
                  "vqfast residual_nearest_code: z and codebooks must be contiguous");
  const ScalarType dtype = z.scalar_type();
  STD_TORCH_CHECK(codebooks.scalar_type() == dtype,
                  "vqfast residual_nearest_code: z and codebooks must have the same dtype");
  STD_TORCH_CHECK(dtype == ScalarType::Float || dtype == ScalarType::Half || dtype == ScalarType::BFloat16 ||
                      dtype == ScalarType::Double,
                  "vqfast residual_nearest_code: dtype must be float16, bfloat16, float32 or float64");
  STD_TORCH_CHECK(metric >= 0 && metric <= 2,
                  "vqfast residual_nearest_code: metric must be 0 (l2), 1 (cosine) or 2 (dot)");

  const int64_t N = z.size(0);
  const int64_t D = z.size(1);
  const int64_t Q = codebooks.size(0);
  const int64_t K = codebooks.size(1);
  STD_TORCH_CHECK(codebooks.size(2) == D,
                  "vqfast residual_nearest_code: z and codebooks must have the same dimension");
  STD_TORCH_CHECK(Q == 0 || K >= 1, "vqfast residual_nearest_code: the codebooks are empty (K = 0)");
  // Codes, stages and D travel as 32-bit ints inside the kernel (code < K + one tile).
  STD_TORCH_CHECK(K <= INT_MAX - 1024, "vqfast residual_nearest_code (CUDA): K too large (", K, ")");
  STD_TORCH_CHECK(D <= INT_MAX / kResBM, "vqfast residual_nearest_code (CUDA): D too large (", D, ")");
  STD_TORCH_CHECK(Q <= INT_MAX, "vqfast residual_nearest_code (CUDA): Q too large (", Q, ")");

  const int32_t device_index = z.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device_index);

  const ScalarType acc_dtype = acc_dtype_of(dtype);
  Tensor out_index = torch::stable::empty({N, Q}, ScalarType::Long, std::nullopt, z.device());
  Tensor out_dist = torch::stable::empty({N, Q}, acc_dtype, std::nullopt, z.device());
  if (N == 0 || Q == 0) return std::make_tuple(out_index, out_dist);

  const cudaStream_t stream = current_stream(device_index);
  // Poisoned: an element the kernel fails to write shows up (index -1, NaN).
  poison(out_index, stream);
  poison(out_dist, stream);
  const int Qi = int(Q), Ki = int(K), Di = int(D);
  switch (dtype) {
    case ScalarType::Float:
      dispatch_metric<float>(metric, z, codebooks, out_index, out_dist, N, Qi, Ki, Di, device_index, stream);
      break;
    case ScalarType::Half:
      dispatch_metric<__half>(metric, z, codebooks, out_index, out_dist, N, Qi, Ki, Di, device_index, stream);
      break;
    case ScalarType::BFloat16:
      dispatch_metric<__nv_bfloat16>(metric, z, codebooks, out_index, out_dist, N, Qi, Ki, Di, device_index,
                                     stream);
      break;
    default:
      dispatch_metric<double>(metric, z, codebooks, out_index, out_dist, N, Qi, Ki, Di, device_index, stream);
      break;
  }
  return std::make_tuple(out_index, out_dist);
}

}  // namespace
}  // namespace vqfast

STABLE_TORCH_LIBRARY_IMPL(vqfast, CUDA, m) {
  m.impl("residual_nearest_code", TORCH_BOX(&vqfast::residual_nearest_code_cuda));
}
