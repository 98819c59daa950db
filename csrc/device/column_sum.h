// Second phase of a split reduction: out[j] = Σ_s partial[s, j] for a
// (rows, cols) accumulator matrix, summed in row order s = 0, 1, ... so the
// result does not depend on thread scheduling. One column per thread.
#pragma once

#include "hd.h"

namespace terminator {
namespace device {

template <typename scalar_t, typename acc_t>
struct ColumnSumParams {
  const acc_t* partial;  // (rows, cols)
  scalar_t* out;         // (cols)
  int64_t rows, cols;
};

template <typename scalar_t, typename acc_t>
TERMINATOR_HD inline void column_sum_thread(const ColumnSumParams<scalar_t, acc_t>& p,
                                            const ThreadContext& t) {
  for (int64_t j = t.global_rank(); j < p.cols; j += t.grid_threads()) {
    acc_t sum = acc_t(0);
    for (int64_t s = 0; s < p.rows; ++s) sum += p.partial[s * p.cols + j];
    p.out[j] = static_cast<scalar_t>(sum);
  }
}

inline LaunchConfig column_sum_launch(int64_t cols, const LaunchLimits& limits) {
  return elementwise_launch(cols, 256, limits);
}

}  // namespace device
}  // namespace terminator
