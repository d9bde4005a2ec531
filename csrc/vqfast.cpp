// Every vqfast op schema, in one place. Kernels register per dispatch key in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels and autograd live in Python
// (vqfast/ops/).
//
// Built against torch's stable ABI (torch/csrc/stable), so one build serves
// every torch from 2.10 on and compiles in a fraction of the ATen time.
#include <Python.h>

#include <torch/csrc/stable/library.h>

extern "C" {
// An empty module: importing vqfast._C loads this library, which runs the
// registration initialisers below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

STABLE_TORCH_LIBRARY(vqfast, m) {
  // z: (N, D) contiguous; codebook: (K, D) contiguous, same floating dtype.
  // metric: 0 = l2 (squared), 1 = cosine (1 - cos), 2 = dot (negative inner product).
  // Returns indices int64 (N,) and distances (N,) float32, float64 for float64 input.
  m.def("nearest_code(Tensor z, Tensor codebook, int metric) -> (Tensor, Tensor)");

  // Fused quantize (vqfast/reference/quantize.py). estimator: 0 = straight-through,
  // 1 = rotation trick; the forward carries the backward's flags for autograd.
  // Returns z_q (N, D), indices (N,), commit_loss and codebook_loss (0-d).
  m.def(
      "quantize_forward(Tensor z, Tensor codebook, int metric, int estimator, bool through_output)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  // Returns grad_z (N, D) and grad_codebook (K, D).
  m.def(
      "quantize_backward(Tensor grad_zq, Tensor grad_commit, Tensor grad_codebook_loss, Tensor z,"
      " Tensor codebook, Tensor indices, int metric, int estimator, bool through_output,"
      " bool deterministic) -> (Tensor, Tensor)");

  // Multi-stage (residual) search, all Q stages in one pass over z
  // (vqfast/reference/residual.py): codebooks (Q, K, D) contiguous, z's dtype. Stage q picks the
  // code of codebooks[q] nearest (by metric) to the residual r_q, where r_0 = z and
  // r_{q+1} = r_q - codebooks[q][i_q], the residual kept in the accumulation dtype (fp32; fp64
  // for fp64) between stages. Returns indices int64 (N, Q) and distances (N, Q), the distance of
  // r_q to its chosen code (float32, float64 for float64 input). Not differentiable.
  m.def("residual_nearest_code(Tensor z, Tensor codebooks, int metric) -> (Tensor, Tensor)");

  // EMA codebook update in place (vqfast/reference/ema.py): codebook and embed_avg (K, D),
  // cluster_size (K,), one float dtype; z (N, D); indices int64 (N,).
  m.def(
      "ema_update_(Tensor(a!) codebook, Tensor(b!) cluster_size, Tensor(c!) embed_avg, Tensor z,"
      " Tensor indices, float decay, float eps) -> ()");
}
