// The Kernels struct of ops_impl.h for a device whose kernels are the
// per-thread functions of this folder, written once over a `Launcher` that
// knows how to run a kernel over a launch grid:
//
//   cuda/kernels.cu                 CudaLauncher: real <<<grid, block>>> launches
//   tests/cuda_harness/emulate.cpp  EmulatedLauncher: loops over the same grid on CPU
//
// Everything between the ATen tensors and the launches — output allocation,
// empty inputs, dtype dispatch, launch shapes, split reductions — lives here, so
// the host emulation tests it too. A Launcher provides:
//
//   using Guard = ...;                       // constructed from the tensors' device
//   static LaunchLimits limits();
//   static void global_dot_forward(const LaunchConfig&, const GlobalDotForwardParams<T>&);
//   static void global_dot_backward_elementwise(cfg, const GlobalDotBackwardParams<T, A>&);
//   static void global_dot_backward_columns(cfg, const GlobalDotBackwardParams<T, A>&);
//   static void column_sum(cfg, const ColumnSumParams<T, A>&);
//   static void correlate_tiled(cfg, const CorrelateParams<T>&);
//   static void correlate_simple(cfg, const CorrelateParams<T>&);
//   static void weight_grad(cfg, const WeightGradParams<T, A>&);
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <tuple>

#include "../matmul_aten.h"
#include "column_sum.h"
#include "conv_direct.h"
#include "global_dot.h"
#include "hd.h"

namespace terminator {
namespace device {

#define TERMINATOR_DEVICE_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Bytes of the accumulation type (float for float16 / bfloat16).
inline int64_t acc_bytes(at::ScalarType t) { return at::elementSize(at::toOpMathType(t)); }

template <class Launcher>
struct DeviceKernels {
  // ---- hyperzzw_global, mode="dot": k (Bk, C, N), z / x / grad_y (B, C, N) ----

  static at::Tensor global_dot_forward(const at::Tensor& k, const at::Tensor& z,
                                       const at::Tensor& x) {
    auto y = at::empty_like(z);
    if (y.numel() == 0) return y;
    typename Launcher::Guard guard(z.device());
    const int64_t B = z.size(0), CN = z.size(1) * z.size(2);
    const auto cfg = global_dot_forward_launch(B, CN, Launcher::limits());
    TERMINATOR_DEVICE_DISPATCH_FLOATING(z.scalar_type(), "global_dot_forward", [&] {
      GlobalDotForwardParams<scalar_t> p{};
      p.k = k.const_data_ptr<scalar_t>();
      p.z = z.const_data_ptr<scalar_t>();
      p.x = x.defined() ? x.const_data_ptr<scalar_t>() : p.z;
      p.y = y.mutable_data_ptr<scalar_t>();
      p.B = B, p.CN = CN, p.shared_k = k.size(0) == 1;
      Launcher::global_dot_forward(cfg, p);
    });
    return y;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> global_dot_backward(const at::Tensor& gy,
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
    typename Launcher::Guard guard(z.device());
    const auto limits = Launcher::limits();
    const BatchSplit split = shared ? split_batch(B, CN, limits) : BatchSplit{1, 1};
    const auto cfg = global_dot_backward_launch(B, CN, shared, split, limits);
    at::Tensor partial;
    if (split.splits > 1) {
      partial = at::empty({split.splits, CN}, z.options().dtype(at::toOpMathType(z.scalar_type())));
    }
    TERMINATOR_DEVICE_DISPATCH_FLOATING(z.scalar_type(), "global_dot_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      GlobalDotBackwardParams<scalar_t, acc_t> p{};
      p.gy = gy.const_data_ptr<scalar_t>();
      p.k = k.const_data_ptr<scalar_t>();
      p.z = z.const_data_ptr<scalar_t>();
      p.x = has_x ? x.const_data_ptr<scalar_t>() : p.z;
      p.gk = gk.mutable_data_ptr<scalar_t>();
      p.gz = gz.mutable_data_ptr<scalar_t>();
      p.gx = has_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
      p.partial = partial.defined() ? partial.mutable_data_ptr<acc_t>() : nullptr;
      p.B = B, p.CN = CN, p.shared_k = shared, p.has_x = has_x;
      p.splits = split.splits, p.batch_per_split = split.batch_per_split;
      if (!shared) {
        Launcher::global_dot_backward_elementwise(cfg, p);
        return;
      }
      Launcher::global_dot_backward_columns(cfg, p);
      if (split.splits > 1) sum_partials<scalar_t, acc_t>(p.partial, p.gk, split.splits, CN);
    });
    return {gk, gz, gx};
  }

  // ---- depthwise "same" correlation: x / grad_y (B, C, H, W), w (Bk, C, Kh, Kw) ----

  static at::Tensor conv_direct_forward(const at::Tensor& x, const at::Tensor& w) {
    return correlate(x, w, /*flip=*/false);
  }

  static std::tuple<at::Tensor, at::Tensor> conv_direct_backward(const at::Tensor& gy,
                                                                 const at::Tensor& x,
                                                                 const at::Tensor& w) {
    return {conv_direct_input_grad(gy, w), conv_direct_weight_grad(gy, x, w)};
  }

  static at::Tensor conv_direct_input_grad(const at::Tensor& gy, const at::Tensor& w) {
    return correlate(gy, w, /*flip=*/true);
  }

  static at::Tensor conv_direct_weight_grad(const at::Tensor& gy, const at::Tensor& x,
                                            const at::Tensor& w) {
    auto gw = at::empty_like(w);
    const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    const int64_t Kh = w.size(2), Kw = w.size(3);
    const bool shared = w.size(0) == 1;
    if (gw.numel() == 0) return gw;
    if (B == 0) return gw.zero_();  // a shared kernel summed over an empty batch
    typename Launcher::Guard guard(x.device());
    const auto g = weight_grad_geometry(B, C, H, W, Kh, Kw, shared, acc_bytes(x.scalar_type()),
                                        Launcher::limits());
    at::Tensor partial;
    if (g.splits > 1) {
      partial = at::empty({g.splits, g.kernels * g.taps},
                          x.options().dtype(at::toOpMathType(x.scalar_type())));
    }
    TERMINATOR_DEVICE_DISPATCH_FLOATING(x.scalar_type(), "conv_direct_weight_grad", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      WeightGradParams<scalar_t, acc_t> p{};
      p.gy = gy.const_data_ptr<scalar_t>();
      p.x = x.const_data_ptr<scalar_t>();
      p.gw = gw.mutable_data_ptr<scalar_t>();
      p.partial = partial.defined() ? partial.mutable_data_ptr<acc_t>() : nullptr;
      p.B = B, p.C = C, p.H = H, p.W = W, p.Kh = Kh, p.Kw = Kw;
      p.pad_h = (Kh - 1) / 2, p.pad_w = (Kw - 1) / 2;
      p.shared_w = shared;
      p.kernels = g.kernels, p.taps = g.taps, p.splits = g.splits;
      p.batch_per_split = g.batch_per_split, p.items = g.items;
      Launcher::weight_grad(g.launch, p);
      if (g.splits > 1)
        sum_partials<scalar_t, acc_t>(p.partial, p.gw, g.splits, g.kernels * g.taps);
    });
    return gw;
  }

  // ---- hyperzzw_global, mode="matmul": ATen's batched matmul (cuBLAS) ----------
  static at::Tensor global_matmul_forward(const at::Tensor& k, const at::Tensor& z,
                                          const at::Tensor& x) {
    return matmul_forward_aten(k, z, x);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> global_matmul_backward(
      const at::Tensor& grad_y, const at::Tensor& k, const at::Tensor& z, const at::Tensor& x) {
    return matmul_backward_aten(grad_y, k, z, x);
  }

  // algo="auto" on this device: the direct kernel while it fits the shared-memory
  // tile (every 2D kernel up to 15×15), the FFT path beyond. A rule of thumb, not
  // a crossover measured on a GPU (none was available).
  static bool prefer_fft(int64_t H, int64_t W, int64_t Kh, int64_t Kw, bool /*shared_kernel*/) {
    return !correlate_geometry(1, H, W, Kh, Kw, sizeof(float), Launcher::limits()).tiled;
  }

 private:
  // Correlates every plane of `in` with its kernel plane; `flip` = input gradient.
  static at::Tensor correlate(const at::Tensor& in, const at::Tensor& w, bool flip) {
    auto out = at::empty_like(in);
    if (out.numel() == 0) return out;
    typename Launcher::Guard guard(in.device());
    const int64_t B = in.size(0), C = in.size(1), H = in.size(2), W = in.size(3);
    const int64_t Kh = w.size(2), Kw = w.size(3);
    // Forward pads ⌊(K−1)/2⌋ before; the flipped kernel of the input gradient pads the rest.
    const int64_t before_h = (Kh - 1) / 2, before_w = (Kw - 1) / 2;
    const auto g =
        correlate_geometry(B * C, H, W, Kh, Kw, acc_bytes(in.scalar_type()), Launcher::limits());
    TERMINATOR_DEVICE_DISPATCH_FLOATING(in.scalar_type(), "conv_direct_correlate", [&] {
      CorrelateParams<scalar_t> p{};
      p.in = in.const_data_ptr<scalar_t>();
      p.w = w.const_data_ptr<scalar_t>();
      p.out = out.mutable_data_ptr<scalar_t>();
      p.planes = B * C, p.C = C, p.H = H, p.W = W, p.Kh = Kh, p.Kw = Kw;
      p.pad_h = flip ? Kh - 1 - before_h : before_h;
      p.pad_w = flip ? Kw - 1 - before_w : before_w;
      p.shared_w = w.size(0) == 1, p.flip = flip;
      p.tile_h = g.tile_h, p.tile_w = g.tile_w, p.tiles_h = g.tiles_h, p.tiles_w = g.tiles_w;
      p.items = g.items;
      if (g.tiled) {
        Launcher::correlate_tiled(g.launch, p);
      } else {
        Launcher::correlate_simple(g.launch, p);
      }
    });
    return out;
  }

  template <typename scalar_t, typename acc_t>
  static void sum_partials(const acc_t* partial, scalar_t* out, int64_t rows, int64_t cols) {
    ColumnSumParams<scalar_t, acc_t> p{partial, out, rows, cols};
    Launcher::column_sum(column_sum_launch(cols, Launcher::limits()), p);
  }
};

}  // namespace device
}  // namespace terminator
