// CUDA kernels of vqfast::quantize_forward and vqfast::quantize_backward.
// Formulas: vqfast/reference/quantize.py; same structure and checks as the CPU
// kernels (csrc/cpu/quantize.cpp).
//
// Forward (all on the current stream):
//   the search of search.cuh with its GATHER epilogue: the warp that finishes a
//     row writes its index, gathers the chosen code into z_q (the unit code for
//     cosine) and adds up (z' - e')^2; each block stores its sum to a buffer.
//     One pass, no N x K matrix, no extra pass over z.
//   loss_kernel          one block sums the per-block buffer in a fixed order
//                        and writes both losses (their values are equal):
//                        deterministic, no float atomics.
//
// Backward:
//   code_term_kernel     (cosine) 1 / max(|e_k|, eps) per code, as the search.
//   grad_z_kernel        one warp per row: the estimator's transpose (identity
//                        or lambda R^T), the commitment term, the cosine chain.
//                        Non-deterministic mode: also atomicAdd of the row's
//                        codebook contribution into a (K, D) fp32/fp64 buffer.
//   deterministic mode:  rows sorted by code (code_groups.cuh), then
//     code_grad_segment_kernel  one warp per code sums its rows in row order.
//   code_grad_finish_kernel     one warp per code: the cosine chain through
//                               e -> e / max(|e|, eps), cast to the dtype.
//
// Row-wise work reads a row's z, e and g from global memory once per pass
// over D (the later passes hit L1). Accumulation in fp32 (fp64 for fp64); all
// element offsets are 64-bit (offset2d). Outputs are poisoned (0xFF bytes:
// NaN, -1) before the kernels run, so a row left unwritten shows.
#include "code_groups.cuh"
#include "search.cuh"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

namespace vqfast {
namespace {

enum Estimator : int64_t { kStraightThrough = 0, kRotation = 1 };

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// commit = codebook_loss = (sum of the per-block squared errors) / numel; one block.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) loss_kernel(const acc_t* __restrict__ block_err, int64_t blocks,
                                                        int64_t numel, acc_t* __restrict__ commit,
                                                        acc_t* __restrict__ codebook_loss) {
  const acc_t total = block_sum_array(block_err, blocks);
  if (threadIdx.x == 0) {
    // As the CPU kernel: the mean in double, then rounded to the loss dtype.
    const acc_t mean = acc_t(double(total) / double(numel));
    *commit = mean;
    *codebook_loss = mean;
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

// One row i (one warp), k = idx[i], g = grad_zq[i]:
//   z' = z s_z, e' = e s_e    (s = 1 / max(|.|, eps) for cosine, else 1)
//   t  = T(g) + (2 g_c / M) (z' - e')
//   grad_z[i] = J(z)^T t      (cosine; t otherwise)
// with T(g) = g (straight-through) or lambda (g - 2 (w.g) w + 2 (q.g) u)
// (rotation; u = z'/|z'|, q = e'/|e'|, w = (u + q)/|u + q|, lambda = |e'|/|z'|).
// ATOMIC: adds the row's codebook contribution -(2 g_b / M) (z' - e') [+ g]
// to cb_acc[k]. Otherwise (cosine) stores s_z to zinv[i] for the segment sum.
// A row whose index is out of range is skipped (its grad_z stays NaN).
template <typename T, int M, bool ROT, bool ATOMIC>
__global__ void __launch_bounds__(kThreads)
    grad_z_kernel(const T* __restrict__ grad_zq, const T* __restrict__ z, const T* __restrict__ codebook,
                  const int64_t* __restrict__ idx, const typename AccOf<T>::type* __restrict__ code_inv,
                  const typename AccOf<T>::type* __restrict__ grad_commit,
                  const typename AccOf<T>::type* __restrict__ grad_codebook_loss, typename AccOf<T>::type numel,
                  bool through_output, int64_t N, int64_t K, int D, T* __restrict__ grad_z,
                  typename AccOf<T>::type* __restrict__ zinv, typename AccOf<T>::type* __restrict__ cb_acc) {
  using acc_t = typename AccOf<T>::type;
  constexpr bool cosine = M == kCosine;
  const acc_t eps = acc_t(kNormEps);
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= N) return;  // warp-uniform; no block-wide synchronisation below
  const int64_t k = idx[row];
  if (k < 0 || k >= K) return;
  const T* zr = z + offset2d(row, 0, D);
  const T* er = codebook + offset2d(k, 0, D);
  const T* gr = grad_zq + offset2d(row, 0, D);
  const acc_t commit_scale = acc_t(2) * *grad_commit / numel;

  acc_t zn_raw = acc_t(0), zs = acc_t(1), es = acc_t(1);
  if constexpr (cosine) {
    zn_raw = sqrt(warp_sq_norm<T, acc_t>(zr, D, lane));
    zs = acc_t(1) / (zn_raw > eps ? zn_raw : eps);
    es = code_inv[k];
    if constexpr (!ATOMIC) {
      if (lane == 0) zinv[row] = zs;
    }
  }
  auto zp = [&](int d) { return cosine ? to_acc(zr[d]) * zs : to_acc(zr[d]); };
  auto ep = [&](int d) { return cosine ? to_acc(er[d]) * es : to_acc(er[d]); };

  // Rotation trick: the row's constants.
  acc_t zn = acc_t(1), en = acc_t(1), wn = acc_t(1), wg = acc_t(0), qg = acc_t(0), lambda = acc_t(1);
  if constexpr (ROT) {
    acc_t zz = acc_t(0), ee = acc_t(0);
    for (int d = lane; d < D; d += 32) {
      const acc_t a = zp(d), b = ep(d);
      zz += a * a;
      ee += b * b;
    }
    zz = warp_sum(zz);
    ee = warp_sum(ee);
    zn = sqrt(zz);
    zn = zn > eps ? zn : eps;
    en = sqrt(ee);
    en = en > eps ? en : eps;
    acc_t ww = acc_t(0), wgs = acc_t(0), qgs = acc_t(0);
    for (int d = lane; d < D; d += 32) {
      const acc_t u = zp(d) / zn, q = ep(d) / en, w = u + q, g = to_acc(gr[d]);
      ww += w * w;
      wgs += w * g;
      qgs += q * g;
    }
    ww = warp_sum(ww);
    wn = sqrt(ww);
    wn = wn > eps ? wn : eps;
    wg = warp_sum(wgs) / wn;
    qg = warp_sum(qgs);
    lambda = en / zn;
  }

  // t_d, the gradient with respect to z'_d.
  auto t_at = [&](int d) {
    const acc_t g = to_acc(gr[d]);
    const acc_t a = zp(d), b = ep(d);
    acc_t t = g;
    if constexpr (ROT) {
      const acc_t u = a / zn, q = b / en, w = (u + q) / wn;
      t = (g - acc_t(2) * wg * w + acc_t(2) * qg * u) * lambda;
    }
    return t + commit_scale * (a - b);
  };

  // Cosine: J(z)^T t = (t - (t.z / |z|^2) z) / |z|, or t / eps when |z| <= eps.
  const bool radial_part = cosine && zn_raw > eps;
  acc_t radial = acc_t(0);
  if (radial_part) {
    acc_t tz = acc_t(0);
    // On the unit vector z / |z| (as the CPU and Triton kernels): (t.z / |z|^2) z leaves a
    // rounding residue that the final / |z| amplifies when |z| is tiny.
    for (int d = lane; d < D; d += 32) tz += t_at(d) * (to_acc(zr[d]) / zn_raw);
    radial = warp_sum(tz);
  }

  const acc_t codebook_scale = ATOMIC ? -acc_t(2) * *grad_codebook_loss / numel : acc_t(0);
  T* out = grad_z + offset2d(row, 0, D);
  acc_t* acc_row = ATOMIC ? cb_acc + offset2d(k, 0, D) : nullptr;
  for (int d = lane; d < D; d += 32) {
    acc_t t = t_at(d);
    if constexpr (cosine) t = radial_part ? (t - radial * (to_acc(zr[d]) / zn_raw)) / zn_raw : t / eps;
    out[d] = from_acc<T>(t);
    if constexpr (ATOMIC) {
      acc_t c = codebook_scale * (zp(d) - ep(d));
      if (through_output) c += to_acc(gr[d]);
      atomicAdd(acc_row + d, c);
    }
  }
}

// keys[i] = idx[i] for the sort, or K (skip) when out of range.
__global__ void __launch_bounds__(kThreads)
    index_keys_kernel(const int64_t* __restrict__ idx, int64_t N, int64_t K, uint32_t* __restrict__ keys) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= N) return;
  const int64_t k = idx[i];
  keys[i] = (k >= 0 && k < K) ? uint32_t(k) : uint32_t(K);
}

// Deterministic codebook gradient: one warp per code k sums, over its rows i
// in increasing order, -(2 g_b / M) (z'_i - e'_k) [+ g_i] into sums[k]
// (fp32/fp64), as the CPU kernel does (two additions per row with g).
template <typename T, int M>
__global__ void __launch_bounds__(kThreads)
    code_grad_segment_kernel(const T* __restrict__ grad_zq, const T* __restrict__ z, const T* __restrict__ codebook,
                             const typename AccOf<T>::type* __restrict__ code_inv,
                             const typename AccOf<T>::type* __restrict__ zinv, const int* __restrict__ order,
                             const int* __restrict__ begin, const typename AccOf<T>::type* __restrict__ grad_codebook_loss,
                             typename AccOf<T>::type numel, bool through_output, int64_t K, int D,
                             typename AccOf<T>::type* __restrict__ sums) {
  using acc_t = typename AccOf<T>::type;
  constexpr bool cosine = M == kCosine;
  const int lane = threadIdx.x & 31;
  const int64_t k = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (k >= K) return;
  const int b = begin[k], e = begin[k + 1];
  const acc_t codebook_scale = -acc_t(2) * *grad_codebook_loss / numel;
  const acc_t es = cosine ? code_inv[k] : acc_t(1);
  const T* er = codebook + offset2d(k, 0, D);
  for (int d0 = 0; d0 < D; d0 += 32 * kSegR) {
    acc_t s[kSegR], ev[kSegR];
#pragma unroll
    for (int r = 0; r < kSegR; ++r) {
      const int d = d0 + r * 32 + lane;
      s[r] = acc_t(0);
      ev[r] = d < D ? to_acc(er[d]) * es : acc_t(0);
    }
    // Unrolled so that several rows' loads are in flight; the additions stay in row order.
#pragma unroll 4
    for (int j = b; j < e; ++j) {
      const int64_t i = order[j];
      const acc_t zs = cosine ? zinv[i] : acc_t(1);
      const T* zr = z + offset2d(i, 0, D);
      const T* gr = grad_zq + offset2d(i, 0, D);
#pragma unroll
      for (int r = 0; r < kSegR; ++r) {
        const int d = d0 + r * 32 + lane;
        if (d < D) {
          s[r] += codebook_scale * (to_acc(zr[d]) * zs - ev[r]);
          if (through_output) s[r] += to_acc(gr[d]);
        }
      }
    }
    acc_t* out = sums + offset2d(k, 0, D);
#pragma unroll
    for (int r = 0; r < kSegR; ++r) {
      const int d = d0 + r * 32 + lane;
      if (d < D) out[d] = s[r];
    }
  }
}

// grad_codebook[k] = J(e_k)^T sums[k] (cosine) or sums[k], in the dtype; one warp per code.
template <typename T, int M>
__global__ void __launch_bounds__(kThreads)
    code_grad_finish_kernel(const typename AccOf<T>::type* __restrict__ sums, const T* __restrict__ codebook,
                            int64_t K, int D, T* __restrict__ grad_codebook) {
  using acc_t = typename AccOf<T>::type;
  const acc_t eps = acc_t(kNormEps);
  const int lane = threadIdx.x & 31;
  const int64_t k = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (k >= K) return;
  const acc_t* v = sums + offset2d(k, 0, D);
  const T* er = codebook + offset2d(k, 0, D);
  T* out = grad_codebook + offset2d(k, 0, D);
  if constexpr (M == kCosine) {
    const acc_t n = sqrt(warp_sq_norm<T, acc_t>(er, D, lane));
    if (n > eps) {
      acc_t ve = acc_t(0);
      for (int d = lane; d < D; d += 32) ve += v[d] * (to_acc(er[d]) / n);
      const acc_t radial = warp_sum(ve);  // on the unit vector, as for grad_z
      for (int d = lane; d < D; d += 32) out[d] = from_acc<T>((v[d] - radial * (to_acc(er[d]) / n)) / n);
    } else {
      for (int d = lane; d < D; d += 32) out[d] = from_acc<T>(v[d] / eps);
    }
  } else {
    for (int d = lane; d < D; d += 32) out[d] = from_acc<T>(v[d]);
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

inline unsigned warp_blocks(int64_t items, const char* what) {  // one warp per item
  const int64_t blocks = (items + kWarps - 1) / kWarps;
  STD_TORCH_CHECK(blocks <= INT_MAX, "vqfast ", what, " (CUDA): too many rows or codes (", items, ")");
  return unsigned(std::max<int64_t>(blocks, 1));
}

void check_cuda_inputs(const char* op, const Tensor& z, const Tensor& codebook, int64_t metric) {
  STD_TORCH_CHECK(z.is_cuda() && codebook.is_cuda(), op, " (CUDA): z and codebook must be CUDA tensors");
  STD_TORCH_CHECK(z.get_device_index() == codebook.get_device_index(), op,
                  ": z and codebook must be on the same device");
  STD_TORCH_CHECK(z.dim() == 2 && codebook.dim() == 2, op, ": z must be (N, D) and codebook (K, D)");
  STD_TORCH_CHECK(z.size(1) == codebook.size(1), op, ": z and codebook differ in D");
  STD_TORCH_CHECK(codebook.size(0) >= 1, op, ": codebook is empty (K = 0)");
  STD_TORCH_CHECK(z.scalar_type() == codebook.scalar_type(), op, ": z and codebook dtypes differ");
  const ScalarType st = z.scalar_type();
  STD_TORCH_CHECK(st == ScalarType::Float || st == ScalarType::Half || st == ScalarType::BFloat16 ||
                      st == ScalarType::Double,
                  op, ": dtype must be float16, bfloat16, float32 or float64");
  STD_TORCH_CHECK(metric >= 0 && metric <= 2, op, ": metric must be 0 (l2), 1 (cosine) or 2 (dot)");
  // Codes and D travel as 32-bit ints inside the kernels (code < K + one tile).
  STD_TORCH_CHECK(codebook.size(0) <= INT_MAX - 1024, op, " (CUDA): K too large (", codebook.size(0), ")");
  STD_TORCH_CHECK(z.size(1) <= INT_MAX - 1024, op, " (CUDA): D too large (", z.size(1), ")");
}

template <typename T, int M>
Tensor search_gather(const Tensor& z, const Tensor& codebook, const Tensor& zq, const Tensor& idx, int64_t N, int K,
                     int D, int32_t device_index, cudaStream_t stream) {
  int64_t* idxp = reinterpret_cast<int64_t*>(idx.data_ptr());
  T* zqp = reinterpret_cast<T*>(zq.data_ptr());
  if (use_vec_loads<T>(z, codebook, D))
    return launch_search<T, M, vec_width<T>(), true>(z, codebook, idxp, nullptr, zqp, N, K, D, device_index, stream);
  return launch_search<T, M, 1, true>(z, codebook, idxp, nullptr, zqp, N, K, D, device_index, stream);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> quantize_forward_cuda(const Tensor& z, const Tensor& codebook,
                                                                 int64_t metric, int64_t estimator,
                                                                 bool through_output) {
  check_cuda_inputs("quantize", z, codebook, metric);
  STD_TORCH_CHECK(estimator == kStraightThrough || estimator == kRotation, "quantize: estimator must be 0 or 1");
  (void)through_output;  // a backward flag: carried by the schema for autograd
  const int32_t device_index = z.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device_index);
  const cudaStream_t stream = current_stream(device_index);

  Tensor zc = torch::stable::contiguous(z);
  Tensor cc = torch::stable::contiguous(codebook);
  const int64_t N = zc.size(0), D = zc.size(1), K = cc.size(0);
  const ScalarType st = zc.scalar_type();
  const ScalarType acc_st = acc_dtype_of(st);
  Tensor zq = device_empty(zc, {N, D}, st);
  Tensor idx = device_empty(zc, {N}, ScalarType::Long);
  Tensor commit = device_empty(zc, {}, acc_st);
  Tensor cb_loss = device_empty(zc, {}, acc_st);
  for (const Tensor* t : {&zq, &idx, &commit, &cb_loss}) poison(*t, stream);
  if (N == 0) {
    torch::stable::fill_(commit, 0.0);
    torch::stable::fill_(cb_loss, 0.0);
    return {zq, idx, commit, cb_loss};
  }

  VQFAST_CUDA_DISPATCH_FLOAT(st, "quantize", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    VQFAST_DISPATCH_METRIC(metric, [&] {
      Tensor block_err = search_gather<scalar_t, M>(zc, cc, zq, idx, N, int(K), int(D), device_index, stream);
      loss_kernel<acc_t><<<1, kThreads, 0, stream>>>(
          reinterpret_cast<const acc_t*>(block_err.data_ptr()), block_err.numel(), std::max<int64_t>(N * D, 1),
          reinterpret_cast<acc_t*>(commit.data_ptr()), reinterpret_cast<acc_t*>(cb_loss.data_ptr()));
      check_launch("loss_kernel");
    });
  });
  return {zq, idx, commit, cb_loss};
}

// A 0-d upstream gradient as a one-element acc-dtype tensor on z's device.
Tensor scalar_on_device(const Tensor& g, const Tensor& like, ScalarType acc_st, const char* name) {
  STD_TORCH_CHECK(g.numel() == 1, "quantize_backward: ", name, " must hold one element");
  return torch::stable::contiguous(
      torch::stable::to(g, acc_st, std::nullopt, like.device(), std::nullopt, false, false, std::nullopt));
}

template <typename T, int M>
void backward_impl(const Tensor& gq, const Tensor& gc, const Tensor& gb, const Tensor& z, const Tensor& codebook,
                   const Tensor& idx, int64_t estimator, bool through_output, bool deterministic, Tensor& grad_z,
                   Tensor& grad_cb, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  constexpr bool cosine = M == kCosine;
  const int64_t N = z.size(0), K = codebook.size(0);
  const int D = int(z.size(1));
  const ScalarType acc_st = acc_dtype_of(z.scalar_type());
  const acc_t numel = acc_t(std::max<int64_t>(N * int64_t(D), 1));
  const auto* gqp = reinterpret_cast<const T*>(gq.data_ptr());
  const auto* zp = reinterpret_cast<const T*>(z.data_ptr());
  const auto* cbp = reinterpret_cast<const T*>(codebook.data_ptr());
  const auto* ip = reinterpret_cast<const int64_t*>(idx.data_ptr());
  const auto* gcp = reinterpret_cast<const acc_t*>(gc.data_ptr());
  const auto* gbp = reinterpret_cast<const acc_t*>(gb.data_ptr());

  Tensor code_inv_buf;
  const acc_t* code_inv = nullptr;
  if constexpr (cosine) {
    code_inv_buf = device_empty(z, {K}, acc_st);
    code_term_kernel<T, kCosine><<<warp_blocks(K, "quantize_backward"), kThreads, 0, stream>>>(
        cbp, K, D, reinterpret_cast<acc_t*>(code_inv_buf.data_ptr()));
    check_launch("code_term_kernel");
    code_inv = reinterpret_cast<const acc_t*>(code_inv_buf.data_ptr());
  }

  // Per-code sums of the rows' contributions, fp32/fp64.
  Tensor sums_buf = device_empty(z, {K, int64_t(D)}, acc_st);
  acc_t* sums = reinterpret_cast<acc_t*>(sums_buf.data_ptr());
  Tensor zinv_buf;
  acc_t* zinv = nullptr;
  if (!deterministic) {
    check_cuda(cudaMemsetAsync(sums, 0, size_t(K) * size_t(D) * sizeof(acc_t), stream), "cudaMemsetAsync");
  } else if (cosine) {
    zinv_buf = device_empty(z, {N}, acc_st);
    zinv = reinterpret_cast<acc_t*>(zinv_buf.data_ptr());
  }

  T* gzp = reinterpret_cast<T*>(grad_z.data_ptr());
  const unsigned row_blocks = warp_blocks(N, "quantize_backward");
  auto launch_rows = [&](auto rot, auto atomic) {
    constexpr bool kRot = decltype(rot)::value, kAtomic = decltype(atomic)::value;
    grad_z_kernel<T, M, kRot, kAtomic><<<row_blocks, kThreads, 0, stream>>>(
        gqp, zp, cbp, ip, code_inv, gcp, gbp, numel, through_output, N, K, D, gzp, zinv, sums);
    check_launch("grad_z_kernel");
  };
  const bool rot = estimator == kRotation;
  if (deterministic) {
    if (rot) launch_rows(std::true_type{}, std::false_type{});
    else launch_rows(std::false_type{}, std::false_type{});
  } else {
    if (rot) launch_rows(std::true_type{}, std::true_type{});
    else launch_rows(std::false_type{}, std::true_type{});
  }

  if (deterministic) {
    STD_TORCH_CHECK(N <= INT_MAX, "quantize_backward (CUDA, deterministic): too many rows (", N, ")");
    Tensor keys = device_empty(z, {N}, ScalarType::Int);
    index_keys_kernel<<<unsigned((N + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        ip, N, K, reinterpret_cast<uint32_t*>(keys.data_ptr()));
    check_launch("index_keys_kernel");
    const gpu::CodeGroups groups = gpu::group_by_code(keys, K, stream);
    code_grad_segment_kernel<T, M><<<warp_blocks(K, "quantize_backward"), kThreads, 0, stream>>>(
        gqp, zp, cbp, code_inv, zinv, reinterpret_cast<const int*>(groups.order.data_ptr()),
        reinterpret_cast<const int*>(groups.begin.data_ptr()), gbp, numel, through_output, K, D, sums);
    check_launch("code_grad_segment_kernel");
  }

  code_grad_finish_kernel<T, M><<<warp_blocks(K, "quantize_backward"), kThreads, 0, stream>>>(
      sums, cbp, K, D, reinterpret_cast<T*>(grad_cb.data_ptr()));
  check_launch("code_grad_finish_kernel");
}

std::tuple<Tensor, Tensor> quantize_backward_cuda(const Tensor& grad_zq, const Tensor& grad_commit,
                                                  const Tensor& grad_codebook_loss, const Tensor& z,
                                                  const Tensor& codebook, const Tensor& idx, int64_t metric,
                                                  int64_t estimator, bool through_output, bool deterministic) {
  check_cuda_inputs("quantize_backward", z, codebook, metric);
  STD_TORCH_CHECK(estimator == kStraightThrough || estimator == kRotation,
                  "quantize_backward: estimator must be 0 or 1");
  STD_TORCH_CHECK(grad_zq.dim() == 2 && grad_zq.size(0) == z.size(0) && grad_zq.size(1) == z.size(1),
                  "quantize_backward: grad_zq must match z");
  STD_TORCH_CHECK(grad_zq.scalar_type() == z.scalar_type(), "quantize_backward: grad_zq dtype must match z");
  STD_TORCH_CHECK(idx.dim() == 1 && idx.size(0) == z.size(0) && idx.scalar_type() == ScalarType::Long,
                  "quantize_backward: indices must be int64 (N,)");
  STD_TORCH_CHECK(grad_zq.is_cuda() && idx.is_cuda() && grad_zq.get_device_index() == z.get_device_index() &&
                      idx.get_device_index() == z.get_device_index(),
                  "quantize_backward (CUDA): grad_zq and indices must be on z's device");
  const int32_t device_index = z.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device_index);
  const cudaStream_t stream = current_stream(device_index);

  Tensor zc = torch::stable::contiguous(z), cc = torch::stable::contiguous(codebook);
  Tensor gq = torch::stable::contiguous(grad_zq), ic = torch::stable::contiguous(idx);
  const ScalarType acc_st = acc_dtype_of(zc.scalar_type());
  Tensor grad_z = device_empty(zc, {zc.size(0), zc.size(1)}, zc.scalar_type());
  Tensor grad_cb = device_empty(cc, {cc.size(0), cc.size(1)}, cc.scalar_type());
  poison(grad_z, stream);
  poison(grad_cb, stream);
  if (zc.size(0) == 0) {
    torch::stable::zero_(grad_cb);
    return {grad_z, grad_cb};
  }
  Tensor gc = scalar_on_device(grad_commit, zc, acc_st, "grad_commit");
  Tensor gb = scalar_on_device(grad_codebook_loss, zc, acc_st, "grad_codebook_loss");
  VQFAST_CUDA_DISPATCH_FLOAT(zc.scalar_type(), "quantize_backward", [&] {
    VQFAST_DISPATCH_METRIC(metric, [&] {
      backward_impl<scalar_t, M>(gq, gc, gb, zc, cc, ic, estimator, through_output, deterministic, grad_z, grad_cb,
                                 stream);
    });
  });
  return {grad_z, grad_cb};
}

}  // namespace
}  // namespace vqfast

STABLE_TORCH_LIBRARY_IMPL(vqfast, CUDA, m) {
  m.impl("quantize_forward", TORCH_BOX(&vqfast::quantize_forward_cuda));
  m.impl("quantize_backward", TORCH_BOX(&vqfast::quantize_backward_cuda));
}
