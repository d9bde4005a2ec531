// quantize forward and backward on the CPU. Formulas: vqfast/reference/quantize.py.
//
// Forward: the search of search.h, with an epilogue that gathers each row's
// code into z_q and accumulates the squared error while the row block is in
// cache: one pass, no N x K matrix, no N x D temporary beyond z_q.
// Backward: one parallel pass over rows for grad_z, and one over codes for the
// codebook gradient, which sums each code's rows in row order (code_groups.h),
// so it is deterministic whatever the thread count.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/code_groups.h"
#include "cpu/search.h"

namespace vqfast {
namespace cpu {
namespace {

enum Estimator : int64_t { kStraightThrough = 0, kRotation = 1 };

template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t D) {
  acc_t s = 0;
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

template <typename acc_t>
acc_t clamp_eps(acc_t n) {
  return n > acc_t(kNormEps) ? n : acc_t(kNormEps);
}

// v <- J(x)^T v for x -> x / max(||x||, eps); `x` is the raw vector.
template <typename acc_t>
void normalize_backward(const acc_t* x, acc_t* v, int64_t D) {
  const acc_t n = std::sqrt(dot(x, x, D));
  if (n > acc_t(kNormEps)) {
    // Projected on the unit vector x / n, not as (v.x / n^2) x: for tiny |x| the rounding of
    // n * n against x.x would leave a radial residue that the final / n amplifies.
    acc_t radial = acc_t(0);
    for (int64_t d = 0; d < D; ++d) radial += v[d] * (x[d] / n);
    for (int64_t d = 0; d < D; ++d) v[d] = (v[d] - radial * (x[d] / n)) / n;
  } else {
    for (int64_t d = 0; d < D; ++d) v[d] /= acc_t(kNormEps);
  }
}

// The codebook as the loss sees it: e' = e (l2, dot) or e / max(||e||, eps) (cosine).
template <typename scalar_t, typename acc_t>
std::vector<acc_t> loss_codebook(const scalar_t* cb, int64_t K, int64_t D, bool cosine) {
  std::vector<acc_t> ep(static_cast<size_t>(K * D));
  torch::stable::parallel_for(0, K, 256, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      acc_t* row = ep.data() + offset2d(k, 0, D);
      load_rows(cb + offset2d(k, 0, D), 1, D, row);
      if (cosine) {
        const acc_t inv = acc_t(1) / clamp_eps(std::sqrt(dot(row, row, D)));
        for (int64_t d = 0; d < D; ++d) row[d] *= inv;
      }
    }
  });
  return ep;
}

template <typename scalar_t>
acc_scalar<scalar_t> read_scalar(const Tensor& t) {
  using acc_t = acc_scalar<scalar_t>;
  return t.scalar_type() == ScalarType::Double ? acc_t(*static_cast<const double*>(t.const_data_ptr()))
                                               : acc_t(*static_cast<const float*>(t.const_data_ptr()));
}

template <typename scalar_t, int M>
void forward_impl(const Tensor& z, const Tensor& codebook, Tensor& zq, Tensor& idx, acc_scalar<scalar_t>& sq_err) {
  using acc_t = acc_scalar<scalar_t>;
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  const auto* cbp = static_cast<const scalar_t*>(codebook.const_data_ptr());
  auto prepared = prepare_codebook<M>(cbp, K, D);
  const auto ep = loss_codebook<scalar_t, acc_t>(cbp, K, D, M == kCosine);
  auto* zq_out = static_cast<scalar_t*>(zq.mutable_data_ptr());
  auto* idx_out = idx.mutable_data_ptr<int64_t>();
  // One partial sum per row block, added in block order: deterministic.
  std::vector<acc_t> partial(static_cast<size_t>((N + kRowBlock - 1) / kRowBlock), acc_t(0));
  search<M>(static_cast<const scalar_t*>(z.const_data_ptr()), N, prepared, acc_scalar_type<acc_t>(),
            [&](int64_t r0, int64_t rows, const acc_t* zrows, const int64_t* index, const acc_t*) {
              acc_t block = 0;
              for (int64_t r = 0; r < rows; ++r) {
                const int64_t k = index[r];
                const acc_t* zr = zrows + r * D;
                const acc_t* er = ep.data() + offset2d(k, 0, D);
                const acc_t zscale = M == kCosine ? acc_t(1) / clamp_eps(std::sqrt(dot(zr, zr, D))) : acc_t(1);
                scalar_t* out = zq_out + offset2d(r0 + r, 0, D);
                for (int64_t d = 0; d < D; ++d) {
                  const acc_t diff = zr[d] * zscale - er[d];
                  block += diff * diff;
                  // l2/dot copy the code exactly; cosine writes the unit code.
                  out[d] = M == kCosine ? scalar_t(er[d]) : cbp[offset2d(k, d, D)];
                }
                idx_out[r0 + r] = k;
              }
              partial[r0 / kRowBlock] += block;
            });
  sq_err = 0;
  for (acc_t p : partial) sq_err += p;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> quantize_forward_cpu(const Tensor& z, const Tensor& codebook,
                                                                int64_t metric, int64_t estimator,
                                                                bool through_output) {
  check_search_inputs("quantize", z, codebook, metric);
  STD_TORCH_CHECK(estimator == kStraightThrough || estimator == kRotation, "quantize: estimator must be 0 or 1");
  (void)through_output;  // a backward flag: carried by the schema for autograd
  Tensor zc = torch::stable::contiguous(z);
  Tensor cc = torch::stable::contiguous(codebook);
  const int64_t N = zc.size(0), D = zc.size(1);
  const ScalarType st = zc.scalar_type();
  const ScalarType acc_st = st == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  Tensor zq = torch::stable::new_empty(zc, {N, D});
  Tensor idx = torch::stable::new_empty(zc, {N}, ScalarType::Long);
  torch::stable::fill_(zq, std::numeric_limits<double>::quiet_NaN());  // poison: every row must be written
  torch::stable::fill_(idx, -1.0);
  double total = 0;
  if (N > 0) {
    VQFAST_CPU_DISPATCH_FLOAT(st, "quantize", [&] {
      VQFAST_DISPATCH_METRIC(metric, [&] {
        acc_scalar<scalar_t> s = 0;
        forward_impl<scalar_t, M>(zc, cc, zq, idx, s);
        total = double(s);
      });
    });
  }
  const double mean = N > 0 ? total / double(N * D) : 0.0;
  Tensor commit = torch::stable::new_empty(zc, {}, acc_st);
  Tensor cb_loss = torch::stable::new_empty(zc, {}, acc_st);
  torch::stable::fill_(commit, mean);
  torch::stable::fill_(cb_loss, mean);
  return {zq, idx, commit, cb_loss};
}

template <typename scalar_t, int M>
void backward_impl(const Tensor& grad_zq, acc_scalar<scalar_t> gc, acc_scalar<scalar_t> gb, const Tensor& z,
                   const Tensor& codebook, const Tensor& idx, int64_t estimator, bool through_output,
                   Tensor& grad_z, Tensor& grad_cb) {
  using acc_t = acc_scalar<scalar_t>;
  constexpr bool cosine = M == kCosine;
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  const auto* zp = static_cast<const scalar_t*>(z.const_data_ptr());
  const auto* gqp = static_cast<const scalar_t*>(grad_zq.const_data_ptr());
  const auto* cbp = static_cast<const scalar_t*>(codebook.const_data_ptr());
  const auto* ip = idx.const_data_ptr<int64_t>();
  auto* gz_out = static_cast<scalar_t*>(grad_z.mutable_data_ptr());
  auto* gcb_out = static_cast<scalar_t*>(grad_cb.mutable_data_ptr());
  const auto ep = loss_codebook<scalar_t, acc_t>(cbp, K, D, cosine);
  const acc_t m = acc_t(std::max<int64_t>(N * D, 1));
  const acc_t commit_scale = acc_t(2) * gc / m, codebook_scale = -acc_t(2) * gb / m;

  // z' of row i (normalized for cosine) into `out`; returns nothing, raw row in `raw`.
  auto load_z = [&](int64_t i, acc_t* raw, acc_t* out) {
    load_rows(zp + offset2d(i, 0, D), 1, D, raw);
    const acc_t s = cosine ? acc_t(1) / clamp_eps(std::sqrt(dot(raw, raw, D))) : acc_t(1);
    for (int64_t d = 0; d < D; ++d) out[d] = raw[d] * s;
  };

  torch::stable::parallel_for(0, N, 64, [&](int64_t b, int64_t e) {
    std::vector<acc_t> raw(D), zr(D), g(D), t(D), u(D), q(D), w(D);
    for (int64_t i = b; i < e; ++i) {
      const acc_t* er = ep.data() + offset2d(ip[i], 0, D);
      load_z(i, raw.data(), zr.data());
      load_rows(gqp + offset2d(i, 0, D), 1, D, g.data());
      if (estimator == kRotation) {
        // lambda R^T g with R = I - 2 w w^T + 2 q u^T, lambda = ||e'|| / ||z'||.
        const acc_t zn = clamp_eps(std::sqrt(dot(zr.data(), zr.data(), D)));
        const acc_t en = clamp_eps(std::sqrt(dot(er, er, D)));
        for (int64_t d = 0; d < D; ++d) {
          u[d] = zr[d] / zn;
          q[d] = er[d] / en;
          w[d] = u[d] + q[d];
        }
        const acc_t wn = clamp_eps(std::sqrt(dot(w.data(), w.data(), D)));
        for (int64_t d = 0; d < D; ++d) w[d] /= wn;
        const acc_t wg = dot(w.data(), g.data(), D), qg = dot(q.data(), g.data(), D), lambda = en / zn;
        for (int64_t d = 0; d < D; ++d) t[d] = (g[d] - acc_t(2) * wg * w[d] + acc_t(2) * qg * u[d]) * lambda;
      } else {
        t = g;
      }
      for (int64_t d = 0; d < D; ++d) t[d] += commit_scale * (zr[d] - er[d]);
      if (cosine) normalize_backward(raw.data(), t.data(), D);
      scalar_t* out = gz_out + offset2d(i, 0, D);
      for (int64_t d = 0; d < D; ++d) out[d] = scalar_t(t[d]);
    }
  });

  const CodeGroups groups = group_by_code(ip, N, K);
  torch::stable::parallel_for(0, K, 16, [&](int64_t b, int64_t e) {
    std::vector<acc_t> raw(D), zr(D), sum(D), g(D);
    for (int64_t k = b; k < e; ++k) {
      std::fill(sum.begin(), sum.end(), acc_t(0));
      const acc_t* er = ep.data() + offset2d(k, 0, D);
      for (int64_t j = groups.begin[k]; j < groups.begin[k + 1]; ++j) {
        const int64_t i = groups.order[j];
        load_z(i, raw.data(), zr.data());
        for (int64_t d = 0; d < D; ++d) sum[d] += codebook_scale * (zr[d] - er[d]);
        if (through_output) {
          load_rows(gqp + offset2d(i, 0, D), 1, D, g.data());
          for (int64_t d = 0; d < D; ++d) sum[d] += g[d];
        }
      }
      if (cosine) {
        load_rows(cbp + offset2d(k, 0, D), 1, D, raw.data());
        normalize_backward(raw.data(), sum.data(), D);
      }
      scalar_t* out = gcb_out + offset2d(k, 0, D);
      for (int64_t d = 0; d < D; ++d) out[d] = scalar_t(sum[d]);
    }
  });
}

std::tuple<Tensor, Tensor> quantize_backward_cpu(const Tensor& grad_zq, const Tensor& grad_commit,
                                                 const Tensor& grad_codebook_loss, const Tensor& z,
                                                 const Tensor& codebook, const Tensor& idx, int64_t metric,
                                                 int64_t estimator, bool through_output, bool deterministic) {
  check_search_inputs("quantize_backward", z, codebook, metric);
  STD_TORCH_CHECK(grad_zq.dim() == 2 && grad_zq.size(0) == z.size(0) && grad_zq.size(1) == z.size(1),
                  "quantize_backward: grad_zq must match z");
  STD_TORCH_CHECK(grad_zq.scalar_type() == z.scalar_type(), "quantize_backward: grad_zq dtype must match z");
  STD_TORCH_CHECK(idx.dim() == 1 && idx.size(0) == z.size(0) && idx.scalar_type() == ScalarType::Long,
                  "quantize_backward: indices must be int64 (N,)");
  (void)deterministic;  // always deterministic on the CPU (code_groups.h)
  Tensor zc = torch::stable::contiguous(z), cc = torch::stable::contiguous(codebook);
  Tensor gq = torch::stable::contiguous(grad_zq), ic = torch::stable::contiguous(idx);
  Tensor grad_z = torch::stable::new_empty(zc, {zc.size(0), zc.size(1)});
  Tensor grad_cb = torch::stable::new_empty(cc, {cc.size(0), cc.size(1)});
  if (zc.size(0) == 0) {
    torch::stable::zero_(grad_cb);
    return {grad_z, grad_cb};
  }
  Tensor gc = torch::stable::contiguous(grad_commit), gb = torch::stable::contiguous(grad_codebook_loss);
  VQFAST_CPU_DISPATCH_FLOAT(zc.scalar_type(), "quantize_backward", [&] {
    VQFAST_DISPATCH_METRIC(metric, [&] {
      backward_impl<scalar_t, M>(gq, read_scalar<scalar_t>(gc), read_scalar<scalar_t>(gb), zc, cc, ic, estimator,
                                 through_output, grad_z, grad_cb);
    });
  });
  return {grad_z, grad_cb};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(vqfast, CPU, m) {
  m.impl("quantize_forward", TORCH_BOX(&quantize_forward_cpu));
  m.impl("quantize_backward", TORCH_BOX(&quantize_backward_cpu));
}

}  // namespace cpu
}  // namespace vqfast
