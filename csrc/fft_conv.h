// "Same" depthwise cross-correlation through real FFTs, written with ATen ops so
// that it runs on every device (MKL or pocketfft on CPU, cuFFT on CUDA).
//
// Planes are (N, C, H, W); 1D data comes in with H = 1. Zero padding to
// n >= S + ⌈(K−1)/2⌉ per dim (rounded up to a size with factors 2, 3, 5, 7) is
// exactly enough to keep the circular wrap-around out of the S outputs.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace terminator {

// x (B, C, H, W), w (Bk, C, Kh, Kw) with Bk in {1, B} -> y (B, C, H, W).
// With `w_scale` (B, C, Kh, Kw) defined the kernel is w ⊙ w_scale, formed while
// padding (the global conv mode's Ŵ = k ⊙ z).
at::Tensor conv_fft_forward(const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& w_scale = at::Tensor());

// Gradients of conv_fft_forward: (grad_x (B,C,H,W), grad of the kernel): the
// kernel is w, or w ⊙ w_scale (then its gradient is (B, C, Kh, Kw)).
std::tuple<at::Tensor, at::Tensor> conv_fft_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const at::Tensor& w,
                                                     const at::Tensor& w_scale = at::Tensor());

}  // namespace terminator
