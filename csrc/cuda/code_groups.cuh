// Rows grouped by their code on the GPU: a stable sort of the row ids by code,
// the CUDA counterpart of csrc/cpu/code_groups.h.
//
// Per-code sums (the codebook gradient in deterministic mode, the EMA
// statistics) then walk each code's rows in increasing row order, one warp per
// code, with no float atomics: bit-identical from run to run. The sort is
// CUB's radix sort (stable, deterministic), instantiated once, in
// code_groups.cu.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include <torch/csrc/stable/tensor.h>

namespace vqfast {
namespace gpu {

struct CodeGroups {
  torch::stable::Tensor order;  // (N,) int32 row ids, ascending within each code; skipped rows last
  torch::stable::Tensor begin;  // (K + 1,) int32: rows of code k are order[begin[k] .. begin[k+1])
};

// keys: (N,) int32 on the GPU, N < 2^31, each key in [0, K]; key K drops the
// row (a non-finite row in the EMA, an out-of-range index). Runs on `stream`.
CodeGroups group_by_code(const torch::stable::Tensor& keys, int64_t K, cudaStream_t stream);

}  // namespace gpu
}  // namespace vqfast
