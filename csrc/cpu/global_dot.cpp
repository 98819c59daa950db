// hyperzzw_global, mode="dot": y = k ⊙ z ⊙ x, elementwise, and its gradients.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "vec.h"

namespace terminator {
namespace cpu {
namespace {

// Columns processed together while accumulating over the batch: 8192 (32 KB of float
// sums) gives each sample's rows streams long enough for the prefetcher (docs/PERFORMANCE.md).
constexpr int64_t kColumnChunk = 8192;

// y[0, n) = k · z · x, elementwise.
template <typename scalar_t, typename acc_t>
void dot_forward_segment(int64_t n, const scalar_t* __restrict__ k, const scalar_t* __restrict__ z,
                         const scalar_t* __restrict__ x, scalar_t* __restrict__ y) {
  int64_t j = 0;
  if constexpr (kVectorConversion<scalar_t>) {
    for (constexpr int64_t L = kLanes<float>; j + L <= n; j += L) {
      store_narrowed(y + j, load_widened(k + j) * load_widened(z + j) * load_widened(x + j));
    }
  }
  for (; j < n; ++j) {
    y[j] = static_cast<scalar_t>(acc_t(k[j]) * acc_t(z[j]) * acc_t(x[j]));
  }
}

// One row segment of the dot backward: y = k z x gives dk = gy z x, dz = gy k x,
// dx = gy k z; with x = z (HasX false), dz = 2 gy k z. `dk` receives (Accumulate)
// or is overwritten with gy z x.
template <bool HasX, bool Accumulate, typename scalar_t, typename acc_t>
void dot_backward_segment(int64_t n, const scalar_t* __restrict__ gy,
                          const scalar_t* __restrict__ k, const scalar_t* __restrict__ z,
                          const scalar_t* __restrict__ x, acc_t* __restrict__ dk,
                          scalar_t* __restrict__ gz, scalar_t* __restrict__ gx) {
  int64_t j = 0;
  if constexpr (kVectorConversion<scalar_t>) {  // the same sums, a Vec at a time
    using V = Vec<float>::type;
    for (constexpr int64_t L = kLanes<float>; j + L <= n; j += L) {
      const V g = load_widened(gy + j), kv = load_widened(k + j), zv = load_widened(z + j);
      const V xv = HasX ? load_widened(x + j) : zv;
      const V d = g * zv * xv;
      V* dk_v = reinterpret_cast<V*>(dk + j);
      *dk_v = Accumulate ? *dk_v + d : d;
      if constexpr (HasX) {
        store_narrowed(gz + j, g * kv * xv);
        store_narrowed(gx + j, g * kv * zv);
      } else {
        store_narrowed(gz + j, 2.0f * g * kv * zv);
      }
    }
  }
  for (; j < n; ++j) {
    const acc_t g = gy[j], kv = k[j], zv = z[j];
    const acc_t xv = HasX ? acc_t(x[j]) : zv;
    const acc_t d = g * zv * xv;
    dk[j] = Accumulate ? dk[j] + d : d;
    if constexpr (HasX) {
      gz[j] = static_cast<scalar_t>(g * kv * xv);
      gx[j] = static_cast<scalar_t>(g * kv * zv);
    } else {
      gz[j] = static_cast<scalar_t>(acc_t(2) * g * kv * zv);
    }
  }
}

template <bool HasX, typename scalar_t>
void global_dot_backward_impl(const at::Tensor& gy, const at::Tensor& k, const at::Tensor& z,
                              const at::Tensor& x, at::Tensor& gk, at::Tensor& gz, at::Tensor& gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = z.size(0), CN = z.size(1) * z.size(2);
  const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const scalar_t* xp = HasX ? x.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* gkp = gk.mutable_data_ptr<scalar_t>();
  scalar_t* gzp = gz.mutable_data_ptr<scalar_t>();
  scalar_t* gxp = HasX ? gx.mutable_data_ptr<scalar_t>() : nullptr;
  const bool shared = k.size(0) == 1;
  // Per-sample k: row pieces of the flat (B, CN) range; shared k: column chunks,
  // each summing its batch in order b = 0..B-1 (deterministic for any threads).
  const int64_t rows = shared ? 1 : B;
  at::parallel_for(0, rows * CN, shared ? grain_for(B) : kGrainWork,
                   [&](int64_t begin, int64_t end) {
                     std::vector<acc_t> acc(kColumnChunk);
                     for_each_row_piece(begin, end, CN, [&](int64_t row, int64_t c0, int64_t c1) {
                       for (int64_t s0 = c0; s0 < c1; s0 += kColumnChunk) {
                         const int64_t n = std::min(kColumnChunk, c1 - s0);
                         const int64_t k_off = row * CN + s0;
                         for (int64_t b = shared ? 0 : row; b < (shared ? B : row + 1); ++b) {
                           const int64_t o = b * CN + s0;
                           auto segment = b == (shared ? 0 : row)
                                              ? dot_backward_segment<HasX, false, scalar_t, acc_t>
                                              : dot_backward_segment<HasX, true, scalar_t, acc_t>;
                           segment(n, gyp + o, kp + k_off, zp + o, HasX ? xp + o : nullptr,
                                   acc.data(), gzp + o, HasX ? gxp + o : nullptr);
                         }
                         for (int64_t j = 0; j < n; ++j)
                           gkp[k_off + j] = static_cast<scalar_t>(acc[j]);
                       }
                     });
                   });
}

}  // namespace

at::Tensor global_dot_forward(const at::Tensor& k, const at::Tensor& z, const at::Tensor& x) {
  auto y = empty_output_like(z);
  const int64_t B = z.size(0), CN = z.size(1) * z.size(2);
  const bool shared = k.size(0) == 1;
  if (y.numel() == 0) return y;
  TERMINATOR_DISPATCH_FLOATING(z.scalar_type(), "global_dot_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.defined() ? x.const_data_ptr<scalar_t>() : zp;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * CN, kGrainWork, [&](int64_t begin, int64_t end) {
      for_each_row_piece(begin, end, CN, [&](int64_t b, int64_t i0, int64_t i1) {
        const int64_t o = b * CN + i0;
        dot_forward_segment<scalar_t, acc_t>(i1 - i0, kp + (shared ? 0 : b * CN) + i0, zp + o,
                                             xp + o, yp + o);
      });
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> global_dot_backward(const at::Tensor& gy,
                                                                   const at::Tensor& k,
                                                                   const at::Tensor& z,
                                                                   const at::Tensor& x) {
  const bool shared = k.size(0) == 1;
  auto gk = empty_output_like(shared ? k : z);
  auto gz = empty_output_like(z);
  auto gx = x.defined() ? empty_output_like(z) : at::Tensor();
  if (shared && z.size(0) == 0) return {gk.zero_(), gz, gx};
  if (z.numel() == 0) return {gk, gz, gx};
  TERMINATOR_DISPATCH_FLOATING(z.scalar_type(), "global_dot_backward", [&] {
    if (x.defined()) {
      global_dot_backward_impl<true, scalar_t>(gy, k, z, x, gk, gz, gx);
    } else {
      global_dot_backward_impl<false, scalar_t>(gy, k, z, x, gk, gz, gx);
    }
  });
  return {gk, gz, gx};
}

}  // namespace cpu
}  // namespace terminator
