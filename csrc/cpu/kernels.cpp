// CPU kernels: ATen's parallel_for over planes or column chunks, accumulation in
// at::opmath_type (float for float16/bfloat16), fixed summation order so results
// are deterministic for any thread count.
#include "../ops_impl.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace terminator {
namespace cpu {
namespace {

// Enough work per task to amortize scheduling (elements or multiply-adds).
constexpr int64_t kGrainWork = 32768;
// Columns processed together while accumulating over the batch.
constexpr int64_t kColumnChunk = 1024;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, work_per_item));
}

// Calls fn(row, i0, i1) for each piece of the flat range [begin, end) of a
// (rows, cols) matrix that lies inside one row.
template <class Fn>
void for_each_row_piece(int64_t begin, int64_t end, int64_t cols, const Fn& fn) {
  while (begin < end) {
    const int64_t row = begin / cols, i0 = begin % cols;
    const int64_t i1 = std::min(cols, i0 + (end - begin));
    fn(row, i0, i1);
    begin += i1 - i0;
  }
}

#define TERMINATOR_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ---- hyperzzw_global, mode="dot" ---------------------------------------------

at::Tensor global_dot_forward(const at::Tensor& k, const at::Tensor& z, const at::Tensor& x) {
  auto y = at::empty_like(z);
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
        const scalar_t* kr = kp + (shared ? 0 : b * CN);
        const int64_t o = b * CN;
        for (int64_t i = i0; i < i1; ++i) {
          yp[o + i] = static_cast<scalar_t>(acc_t(kr[i]) * acc_t(zp[o + i]) * acc_t(xp[o + i]));
        }
      });
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> global_dot_backward(const at::Tensor& gy,
                                                                   const at::Tensor& k,
                                                                   const at::Tensor& z,
                                                                   const at::Tensor& x) {
  const int64_t B = z.size(0), CN = z.size(1) * z.size(2);
  const bool shared = k.size(0) == 1, has_x = x.defined();
  auto gk = shared ? at::empty_like(k) : at::empty_like(z);
  auto gz = at::empty_like(z);
  auto gx = has_x ? at::empty_like(z) : at::Tensor();
  if (shared && B == 0) return {gk.zero_(), gz, gx};
  if (z.numel() == 0) return {gk, gz, gx};
  TERMINATOR_DISPATCH_FLOATING(z.scalar_type(), "global_dot_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* xp = has_x ? x.const_data_ptr<scalar_t>() : zp;
    scalar_t* gkp = gk.mutable_data_ptr<scalar_t>();
    scalar_t* gzp = gz.mutable_data_ptr<scalar_t>();
    scalar_t* gxp = has_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    // y = k z x: dk = gy z x, dz = gy k x, dx = gy k z; with x = z, dz = 2 gy k z.
    auto element = [&](int64_t o, int64_t ki, acc_t& dk) {
      const acc_t g = gyp[o], kv = kp[ki], zv = zp[o];
      if (has_x) {
        const acc_t xv = xp[o];
        dk = g * zv * xv;
        gzp[o] = static_cast<scalar_t>(g * kv * xv);
        gxp[o] = static_cast<scalar_t>(g * kv * zv);
      } else {
        dk = g * zv * zv;
        gzp[o] = static_cast<scalar_t>(acc_t(2) * g * kv * zv);
      }
    };
    if (!shared) {
      at::parallel_for(0, B * CN, kGrainWork, [&](int64_t begin, int64_t end) {
        for (int64_t o = begin; o < end; ++o) {
          acc_t dk;
          element(o, o, dk);
          gkp[o] = static_cast<scalar_t>(dk);
        }
      });
      return;
    }
    // Shared k: one pass over memory; each column sums its batch in order b = 0..B-1.
    at::parallel_for(0, CN, grain_for(B), [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> acc(kColumnChunk);
      for (int64_t s0 = c0; s0 < c1; s0 += kColumnChunk) {
        const int64_t n = std::min(kColumnChunk, c1 - s0);
        std::fill_n(acc.begin(), n, acc_t(0));
        for (int64_t b = 0; b < B; ++b) {
          const int64_t o = b * CN + s0;
          for (int64_t j = 0; j < n; ++j) {
            acc_t dk;
            element(o + j, s0 + j, dk);
            acc[j] += dk;
          }
        }
        for (int64_t j = 0; j < n; ++j) gkp[s0 + j] = static_cast<scalar_t>(acc[j]);
      }
    });
  });
  return {gk, gz, gx};
}

// ---- depthwise "same" cross-correlation, direct ------------------------------

// out[i, j] = Σ_{qi, qj} w[qi, qj] · in[i + qi - pad_h, j + qj - pad_w] over one
// (H, W) plane, zero outside. `flip` reads w reversed (the input gradient).
template <typename scalar_t, typename acc_t>
void correlate_plane(const scalar_t* in, const scalar_t* w, scalar_t* out, int64_t H,
                     int64_t W, int64_t Kh, int64_t Kw, int64_t pad_h, int64_t pad_w, bool flip,
                     acc_t* row) {
  for (int64_t i = 0; i < H; ++i) {
    std::fill_n(row, W, acc_t(0));
    for (int64_t qi = 0; qi < Kh; ++qi) {
      const int64_t r = i + qi - pad_h;
      if (r < 0 || r >= H) continue;
      const scalar_t* in_row = in + r * W;
      for (int64_t qj = 0; qj < Kw; ++qj) {
        const acc_t wv = flip ? w[(Kh - 1 - qi) * Kw + (Kw - 1 - qj)] : w[qi * Kw + qj];
        const int64_t off = qj - pad_w;
        const int64_t j0 = std::max<int64_t>(0, -off), j1 = std::min<int64_t>(W, W - off);
        for (int64_t j = j0; j < j1; ++j) row[j] += wv * acc_t(in_row[j + off]);
      }
    }
    for (int64_t j = 0; j < W; ++j) out[i * W + j] = static_cast<scalar_t>(row[j]);
  }
}

// gw[qi, qj] += Σ_{i, j} gy[i, j] · x[i + qi - pad_h, j + qj - pad_w] over one plane.
// Each tap keeps a row of partial sums (`partial`, Kw × W) so the inner loop over
// j is a vectorizable multiply-add with no loop-carried sum; a row is reduced
// once per kernel row.
template <typename scalar_t, typename acc_t>
void weight_grad_plane(const scalar_t* gy, const scalar_t* x, acc_t* gw, int64_t H, int64_t W,
                       int64_t Kh, int64_t Kw, int64_t pad_h, int64_t pad_w, acc_t* partial) {
  for (int64_t qi = 0; qi < Kh; ++qi) {
    const int64_t di = qi - pad_h;
    const int64_t i0 = std::max<int64_t>(0, -di), i1 = std::min<int64_t>(H, H - di);
    std::fill_n(partial, Kw * W, acc_t(0));
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* g_row = gy + i * W;
      const scalar_t* x_row = x + (i + di) * W;
      for (int64_t qj = 0; qj < Kw; ++qj) {
        const int64_t dj = qj - pad_w;
        const int64_t j0 = std::max<int64_t>(0, -dj), j1 = std::min<int64_t>(W, W - dj);
        acc_t* p = partial + qj * W;
        for (int64_t j = j0; j < j1; ++j) p[j] += acc_t(g_row[j]) * acc_t(x_row[j + dj]);
      }
    }
    for (int64_t qj = 0; qj < Kw; ++qj) {
      acc_t sum = 0;
      for (int64_t j = 0; j < W; ++j) sum += partial[qj * W + j];
      gw[qi * Kw + qj] += sum;
    }
  }
}

// Correlates every (b, c) plane of `in` with kernel plane (b or 0, c) of `w`.
at::Tensor correlate_planes(const at::Tensor& in, const at::Tensor& w, bool flip) {
  auto out = at::empty_like(in);
  const int64_t B = in.size(0), C = in.size(1), H = in.size(2), W = in.size(3);
  const int64_t Kh = w.size(2), Kw = w.size(3);
  const bool shared = w.size(0) == 1;
  // Forward pads ⌊(K−1)/2⌋ before; the flipped kernel of the input gradient pads the rest.
  const int64_t pad_h = flip ? Kh - 1 - same_pad_before(Kh) : same_pad_before(Kh);
  const int64_t pad_w = flip ? Kw - 1 - same_pad_before(Kw) : same_pad_before(Kw);
  if (out.numel() == 0) return out;
  TERMINATOR_DISPATCH_FLOATING(in.scalar_type(), "hyperkernel_conv_direct", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* inp = in.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* outp = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * C, grain_for(H * W * Kh * Kw), [&](int64_t p0, int64_t p1) {
      std::vector<acc_t> row(W);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t kernel_plane = shared ? p % C : p;
        correlate_plane<scalar_t, acc_t>(inp + p * H * W, wp + kernel_plane * Kh * Kw,
                                         outp + p * H * W, H, W, Kh, Kw, pad_h, pad_w, flip,
                                         row.data());
      }
    });
  });
  return out;
}

at::Tensor conv_direct_forward(const at::Tensor& x, const at::Tensor& w) {
  return correlate_planes(x, w, /*flip=*/false);
}

at::Tensor conv_direct_input_grad(const at::Tensor& gy, const at::Tensor& w) {
  return correlate_planes(gy, w, /*flip=*/true);
}

at::Tensor conv_direct_weight_grad(const at::Tensor& gy, const at::Tensor& x,
                                   const at::Tensor& w) {
  auto gw = at::empty_like(w);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Kh = w.size(2), Kw = w.size(3), K = Kh * Kw;
  const bool shared = w.size(0) == 1;
  const int64_t pad_h = same_pad_before(Kh), pad_w = same_pad_before(Kw);
  if (gw.numel() == 0) return gw;
  TERMINATOR_DISPATCH_FLOATING(x.scalar_type(), "hyperkernel_conv_direct_weight_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
    // A shared kernel's channel c sums planes (0, c), (1, c), ... in that order.
    const int64_t batch_per_kernel = shared ? B : 1;
    const int64_t kernels = shared ? C : B * C;
    at::parallel_for(0, kernels, grain_for(batch_per_kernel * H * W * K), [&](int64_t k0, int64_t k1) {
      std::vector<acc_t> acc(K), partial(Kw * W);
      for (int64_t kp = k0; kp < k1; ++kp) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t b = 0; b < batch_per_kernel; ++b) {
          const int64_t plane = shared ? b * C + kp : kp;
          weight_grad_plane<scalar_t, acc_t>(gyp + plane * H * W, xp + plane * H * W, acc.data(),
                                             H, W, Kh, Kw, pad_h, pad_w, partial.data());
        }
        for (int64_t q = 0; q < K; ++q) gwp[kp * K + q] = static_cast<scalar_t>(acc[q]);
      }
    });
  });
  return gw;
}

// algo="auto": direct costs H·W·Kh·Kw multiply-adds per plane, the FFT path
// about kFftCostPerPoint · n·log2(n) for n padded points (five transforms for
// forward + backward, plus padding and products). The constant is the crossover
// measured with tools/bench_ops.py on the 2-core development machine
// (docs/PERFORMANCE.md).
constexpr double kFftCostPerPoint = 6.0;

bool prefer_fft(int64_t H, int64_t W, int64_t Kh, int64_t Kw) {
  const int64_t nh = H == 1 ? 1 : good_fft_size(H + Kh - 1 - same_pad_before(Kh));
  const int64_t nw = good_fft_size(W + Kw - 1 - same_pad_before(Kw));
  const double points = double(nh) * double(nw);
  const double direct = double(H) * double(W) * double(Kh) * double(Kw);
  return kFftCostPerPoint * points * std::log2(points + 1.0) < direct;
}

struct CpuKernels {
  static constexpr auto prefer_fft = &cpu::prefer_fft;
  static constexpr auto global_dot_forward = &cpu::global_dot_forward;
  static constexpr auto global_dot_backward = &cpu::global_dot_backward;
  static constexpr auto conv_direct_forward = &cpu::conv_direct_forward;
  static constexpr auto conv_direct_input_grad = &cpu::conv_direct_input_grad;
  static constexpr auto conv_direct_weight_grad = &cpu::conv_direct_weight_grad;
};

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(terminator, CPU, m) { register_impls<cpu::CpuKernels>(m); }

}  // namespace terminator
