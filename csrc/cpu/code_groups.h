// Rows grouped by their code: a stable counting sort of the indices.
//
// Per-code sums (the codebook gradient, the EMA statistics) are then taken code
// by code in row order, in parallel over codes with no atomics, so the result
// is bit-identical whatever the thread count: the deterministic mode is free
// on the CPU, and it is the only mode here.
#pragma once

#include <cstdint>
#include <vector>

namespace vqfast {
namespace cpu {

struct CodeGroups {
  std::vector<int64_t> begin;  // rows of code k are order[begin[k] .. begin[k+1])
  std::vector<int64_t> order;  // row ids, ascending within each code
};

// `keep(i)` false drops row i (non-finite rows in the EMA update).
template <typename Keep>
CodeGroups group_by_code(const int64_t* idx, int64_t N, int64_t K, Keep&& keep) {
  CodeGroups g;
  g.begin.assign(static_cast<size_t>(K + 1), 0);
  for (int64_t i = 0; i < N; ++i)
    if (keep(i)) ++g.begin[idx[i] + 1];
  for (int64_t k = 0; k < K; ++k) g.begin[k + 1] += g.begin[k];
  g.order.resize(static_cast<size_t>(g.begin[K]));
  std::vector<int64_t> next(g.begin.begin(), g.begin.end() - 1);
  for (int64_t i = 0; i < N; ++i)
    if (keep(i)) g.order[next[idx[i]]++] = i;
  return g;
}

inline CodeGroups group_by_code(const int64_t* idx, int64_t N, int64_t K) {
  return group_by_code(idx, N, K, [](int64_t) { return true; });
}

}  // namespace cpu
}  // namespace vqfast
