// The ops as the dispatcher sees them, written once for every device. Each
// backend supplies a `Kernels` struct with the device-specific pieces:
//
//   // k (Bk, C, N), z / x / grad_y (B, C, N), contiguous; x undefined = "x is z".
//   static at::Tensor global_dot_forward(k, z, x);
//   static std::tuple<Tensor, Tensor, Tensor> global_dot_backward(grad_y, k, z, x);
//       // -> (grad_k (Bk, C, N), grad_z, grad_x or undefined)
//   // k (Bk, C, S, S), z / x / grad_y (B, C, S, S), contiguous; x undefined = "x is z".
//   static at::Tensor global_matmul_forward(k, z, x);       // -> (B, C, S, S)
//   static std::tuple<Tensor, Tensor, Tensor> global_matmul_backward(grad_y, k, z, x);
//       // -> (grad_k (Bk, C, S, S), grad_z, grad_x or undefined); matmul_aten.h
//       // serves any device
//   // x / grad_y (B, C, H, W), w (Bk, C, Kh, Kw), contiguous.
//   static at::Tensor conv_direct_forward(x, w);
//   static std::tuple<Tensor, Tensor> conv_direct_backward(grad_y, x, w);
//       // -> (grad_x (B, C, H, W), grad_w like w)
//   // algo="auto": whether the FFT path beats the direct kernel on this device, for
//   // planes (H, W) and kernels (Kh, Kw), one kernel for the whole batch or one per sample.
//   static bool prefer_fft(int64_t H, int64_t W, int64_t Kh, int64_t Kw, bool shared_kernel);
//
// cpu/register.cpp (with cpu/kernels.h) and cuda/kernels.cu instantiate these templates.
#pragma once

#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "common.h"
#include "fft_conv.h"
#include "matmul_aten.h"

namespace terminator {

enum class ConvAlgo { Auto, Direct, Fft };

inline ConvAlgo parse_algo(c10::string_view algo) {
  if (algo == "auto") return ConvAlgo::Auto;
  if (algo == "direct") return ConvAlgo::Direct;
  if (algo == "fft") return ConvAlgo::Fft;
  TORCH_CHECK_VALUE(false, "algo must be one of 'auto', 'direct', 'fft', got '", std::string(algo),
                    "'");
}

// An op's result in its final shape without autograd view tracking: callers modify
// outputs in place (relu_, +=), which autograd refuses on a view.
inline at::Tensor as_output(const at::Tensor& t, c10::IntArrayRef sizes) {
  return t.is_contiguous() ? at::_unsafe_view(t, sizes) : t.reshape(sizes).contiguous();
}

// Gradient of a kernel shaped like `like` (C,*K) / (1,C,*K) / (B,C,*K) from planes.
inline at::Tensor kernel_grad_like(const at::Tensor& grad_planes, const at::Tensor& like) {
  return as_output(grad_planes, like.sizes());
}

template <class Kernels>
struct Ops {
  // w4 (Bk, C, Kh, Kw): Bk = 1 is one kernel for the whole batch, which the FFT path
  // transforms once per channel rather than once per plane.
  static bool use_fft(ConvAlgo algo, const at::Tensor& x4, const at::Tensor& w4) {
    if (algo == ConvAlgo::Auto) {
      return Kernels::prefer_fft(x4.size(2), x4.size(3), w4.size(2), w4.size(3), w4.size(0) == 1);
    }
    return algo == ConvAlgo::Fft;
  }

  // mode="conv": Ŵ = k ⊙ z differs per sample even when k is shared.
  static bool global_conv_uses_fft(const at::Tensor& u4) {
    const int64_t H = u4.size(2), W = u4.size(3);
    return Kernels::prefer_fft(H, W, H, W, /*shared_kernel=*/false);
  }

  // ---- hyperkernel_conv ---------------------------------------------------
  static at::Tensor conv_planes(const at::Tensor& x4, const at::Tensor& w4, ConvAlgo algo) {
    if (use_fft(algo, x4, w4)) return conv_fft_forward(x4, w4);
    return Kernels::conv_direct_forward(x4, w4);
  }

  static std::tuple<at::Tensor, at::Tensor> conv_planes_backward(const at::Tensor& gy4,
                                                                 const at::Tensor& x4,
                                                                 const at::Tensor& w4,
                                                                 ConvAlgo algo) {
    if (use_fft(algo, x4, w4)) return conv_fft_backward(gy4, x4, w4);
    return Kernels::conv_direct_backward(gy4, x4, w4);
  }

  static at::Tensor hyperkernel_conv(const at::Tensor& x, const at::Tensor& w,
                                     c10::string_view algo) {
    const auto a = parse_algo(algo);
    check_conv_args(x, w);
    const int64_t d = spatial_dims(x);
    auto y4 = conv_planes(activation_planes(x), kernel_planes(w, d), a);
    return as_output(y4, x.sizes());
  }

  static std::tuple<at::Tensor, at::Tensor> hyperkernel_conv_backward(const at::Tensor& grad_y,
                                                                      const at::Tensor& x,
                                                                      const at::Tensor& w,
                                                                      c10::string_view algo) {
    const auto a = parse_algo(algo);
    check_conv_args(x, w);
    check_same_device_dtype(grad_y, "grad_y", x, "x");
    TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "grad_y must have the shape of x ",
                      shape_str(x.sizes()), ", got ", shape_str(grad_y.sizes()));
    const int64_t d = spatial_dims(x);
    auto [gx4, gw4] = conv_planes_backward(activation_planes(grad_y), activation_planes(x),
                                           kernel_planes(w, d), a);
    return {as_output(gx4, x.sizes()), kernel_grad_like(gw4, w)};
  }

  // ---- hyperzzw_global ----------------------------------------------------
  static at::Tensor hyperzzw_global(const at::Tensor& k, const at::Tensor& z,
                                    const std::optional<at::Tensor>& x, c10::string_view mode) {
    const auto m = parse_mode(mode);
    const int64_t kb = check_global_args(k, z, x, m);
    const int64_t d = spatial_dims(z), B = z.size(0), C = z.size(1);
    const auto k4 = kernel_planes(k, d);  // (Bk, C, H, W)
    const auto z4 = activation_planes(z);
    const int64_t N = z4.size(2) * z4.size(3);
    const auto x4 = x.has_value() ? activation_planes(*x) : at::Tensor();
    switch (m) {
      case GlobalMode::Dot: {
        auto y = Kernels::global_dot_forward(k4.view({kb, C, N}), z4.view({B, C, N}),
                                             x4.defined() ? x4.view({B, C, N}) : x4);
        return as_output(y, z.sizes());
      }
      case GlobalMode::Matmul:
        return as_output(Kernels::global_matmul_forward(k4, z4, x4), z.sizes());
      case GlobalMode::Conv: {
        const auto& u4 = x4.defined() ? x4 : z4;  // what Ŵ acts on
        // The FFT path forms Ŵ = k ⊙ z while padding; the direct kernel needs it whole.
        auto y4 = global_conv_uses_fft(u4) ? conv_fft_forward(u4, k4, z4)
                                           : Kernels::conv_direct_forward(u4, k4 * z4);
        return as_output(y4, z.sizes());
      }
    }
    TORCH_INTERNAL_ASSERT(false, "unreachable");
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> hyperzzw_global_backward(
      const at::Tensor& grad_y, const at::Tensor& k, const at::Tensor& z,
      const std::optional<at::Tensor>& x, c10::string_view mode) {
    const auto m = parse_mode(mode);
    const int64_t kb = check_global_args(k, z, x, m);
    check_same_device_dtype(grad_y, "grad_y", z, "z");
    TORCH_CHECK_VALUE(grad_y.sizes() == z.sizes(), "grad_y must have the shape of z ",
                      shape_str(z.sizes()), ", got ", shape_str(grad_y.sizes()));
    const int64_t d = spatial_dims(z), B = z.size(0), C = z.size(1);
    const auto k4 = kernel_planes(k, d);
    const auto z4 = activation_planes(z);
    const int64_t N = z4.size(2) * z4.size(3);
    const auto x4 = x.has_value() ? activation_planes(*x) : at::Tensor();
    const auto gy4 = activation_planes(grad_y);
    at::Tensor gk, gz, gx;  // kernel planes / activation planes; gx undefined when x is z
    if (m == GlobalMode::Dot) {
      std::tie(gk, gz, gx) =
          Kernels::global_dot_backward(gy4.view({B, C, N}), k4.view({kb, C, N}), z4.view({B, C, N}),
                                       x4.defined() ? x4.view({B, C, N}) : x4);
    } else if (m == GlobalMode::Matmul) {
      std::tie(gk, gz, gx) = Kernels::global_matmul_backward(gy4, k4, z4, x4);
    } else {
      // conv: y = conv(x, Ŵ) with Ŵ = k ⊙ z; first the gradients of Ŵ and x, then the
      // chain rule through the elementwise product.
      const auto dtype = compute_dtype(z.scalar_type());
      const auto u4 = x4.defined() ? x4 : z4;  // what Ŵ acts on
      auto [g_u, g_what] = global_conv_uses_fft(u4)
                               ? conv_fft_backward(gy4, u4, k4, z4)
                               : conv_planes_backward(gy4, u4, k4 * z4, ConvAlgo::Direct);
      std::tie(gk, gz, gx) =
          grads_through_product(g_what.to(dtype), g_u.to(dtype), k4, z4, x4.defined());
    }
    return {kernel_grad_like(gk, k), as_output(gz, z.sizes()),
            gx.defined() ? as_output(gx, z.sizes()) : at::empty({0}, z.options())};
  }
};

// Registers the four ops of Ops<Kernels> for one dispatch key:
//   TORCH_LIBRARY_IMPL(terminator, CPU, m) { register_impls<cpu::CpuKernels>(m); }
template <class Kernels>
void register_impls(torch::Library& m) {
  m.impl("hyperzzw_global", &Ops<Kernels>::hyperzzw_global);
  m.impl("hyperzzw_global_backward", &Ops<Kernels>::hyperzzw_global_backward);
  m.impl("hyperkernel_conv", &Ops<Kernels>::hyperkernel_conv);
  m.impl("hyperkernel_conv_backward", &Ops<Kernels>::hyperkernel_conv_backward);
}

}  // namespace terminator
