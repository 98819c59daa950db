// hyperzzw_global, mode="dot", per thread: y = k ⊙ z ⊙ x over (B, C·N) rows,
// k (Bk, C·N) with Bk = 1 (shared) or B, x = z when has_x is false.
//
// Backward: dk = gy z x, dz = gy k x, dx = gy k z (x = z: dz = 2 gy k z).
// A shared k sums dk over the batch without atomics: each thread owns a column
// and walks a slice of the batch in order b = b0, b0+1, ...; with more than one
// slice ("split") the slices' partial sums go to an accumulator matrix that
// column_sum.h adds up in slice order. Results depend only on the shapes.
#pragma once

#include "hd.h"

namespace terminator {
namespace device {

constexpr int64_t kElementwiseThreads = 256;

template <typename scalar_t>
struct GlobalDotForwardParams {
  const scalar_t* k;
  const scalar_t* z;
  const scalar_t* x;  // == z when x is None
  scalar_t* y;
  int64_t B, CN;
  bool shared_k;
};

template <typename scalar_t, typename acc_t>
TERMINATOR_HD inline void global_dot_forward_thread(const GlobalDotForwardParams<scalar_t>& p,
                                                    const ThreadContext& t) {
  const int64_t n = p.B * p.CN;
  for (int64_t i = t.global_rank(); i < n; i += t.grid_threads()) {
    const int64_t ki = p.shared_k ? i % p.CN : i;
    p.y[i] = static_cast<scalar_t>(acc_t(p.k[ki]) * acc_t(p.z[i]) * acc_t(p.x[i]));
  }
}

inline LaunchConfig global_dot_forward_launch(int64_t B, int64_t CN, const LaunchLimits& limits) {
  return elementwise_launch(B * CN, kElementwiseThreads, limits);
}

template <typename scalar_t, typename acc_t>
struct GlobalDotBackwardParams {
  const scalar_t* gy;
  const scalar_t* k;
  const scalar_t* z;
  const scalar_t* x;  // == z when has_x is false
  scalar_t* gk;       // (Bk, C·N)
  scalar_t* gz;
  scalar_t* gx;    // null when has_x is false
  acc_t* partial;  // (splits, C·N) when shared_k and splits > 1, else null
  int64_t B, CN;
  bool shared_k, has_x;
  int64_t splits, batch_per_split;  // shared_k: the batch cut into slices
};

// Element o (flat index into (B, C·N)) with kernel value index ki: writes
// gz[o] (and gx[o]) and returns dk.
template <typename scalar_t, typename acc_t>
TERMINATOR_HD inline acc_t global_dot_backward_element(
    const GlobalDotBackwardParams<scalar_t, acc_t>& p, int64_t o, int64_t ki) {
  const acc_t g = acc_t(p.gy[o]), kv = acc_t(p.k[ki]), zv = acc_t(p.z[o]);
  if (p.has_x) {
    const acc_t xv = acc_t(p.x[o]);
    p.gz[o] = static_cast<scalar_t>(g * kv * xv);
    p.gx[o] = static_cast<scalar_t>(g * kv * zv);
    return g * zv * xv;
  }
  p.gz[o] = static_cast<scalar_t>(acc_t(2) * g * kv * zv);
  return g * zv * zv;
}

// Per-sample k: one element per thread, grid-stride over B·C·N.
template <typename scalar_t, typename acc_t>
TERMINATOR_HD inline void global_dot_backward_elementwise_thread(
    const GlobalDotBackwardParams<scalar_t, acc_t>& p, const ThreadContext& t) {
  const int64_t n = p.B * p.CN;
  for (int64_t o = t.global_rank(); o < n; o += t.grid_threads()) {
    p.gk[o] = static_cast<scalar_t>(global_dot_backward_element(p, o, o));
  }
}

// Shared k: one (slice, column) pair per thread, grid-stride over splits·C·N.
template <typename scalar_t, typename acc_t>
TERMINATOR_HD inline void global_dot_backward_columns_thread(
    const GlobalDotBackwardParams<scalar_t, acc_t>& p, const ThreadContext& t) {
  const int64_t n = p.splits * p.CN;
  for (int64_t idx = t.global_rank(); idx < n; idx += t.grid_threads()) {
    const int64_t s = idx / p.CN, col = idx % p.CN;
    const int64_t b0 = s * p.batch_per_split, b1 = min64(p.B, b0 + p.batch_per_split);
    acc_t dk = acc_t(0);
    for (int64_t b = b0; b < b1; ++b) dk += global_dot_backward_element(p, b * p.CN + col, col);
    if (p.splits == 1) {
      p.gk[col] = static_cast<scalar_t>(dk);
    } else {
      p.partial[idx] = dk;
    }
  }
}

// How the batch of a shared-k backward is sliced: enough (slice, column)
// threads to reach limits.target_threads, never more slices than samples.
struct BatchSplit {
  int64_t splits, batch_per_split;
};

inline BatchSplit split_batch(int64_t B, int64_t columns, const LaunchLimits& limits) {
  const int64_t want = clamp64(ceil_div(limits.target_threads, max64(columns, 1)), 1, max64(B, 1));
  const int64_t per = ceil_div(max64(B, 1), want);
  return {ceil_div(max64(B, 1), per), per};
}

inline LaunchConfig global_dot_backward_launch(int64_t B, int64_t CN, bool shared_k,
                                               const BatchSplit& split,
                                               const LaunchLimits& limits) {
  const int64_t work = shared_k ? split.splits * CN : B * CN;
  return elementwise_launch(work, kElementwiseThreads, limits);
}

}  // namespace device
}  // namespace terminator
