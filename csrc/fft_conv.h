// "Same" depthwise cross-correlation through real FFTs, written with ATen ops so
// that it runs on every device (pocketfft on CPU, cuFFT on CUDA).
//
// Planes are (N, C, H, W); 1D data comes in with H = 1. Zero padding to
// n >= S + ⌈(K−1)/2⌉ per dim is exactly enough to keep the circular wrap-around
// out of the S outputs; the kernel is placed circularly shifted by -⌊(K−1)/2⌋
// so the output is the first S entries of the inverse transform.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace terminator {

// x (B, C, H, W), w (Bk, C, Kh, Kw) with Bk in {1, B} -> y (B, C, H, W).
at::Tensor conv_fft_forward(const at::Tensor& x, const at::Tensor& w);

// Gradients of conv_fft_forward: (grad_x (B,C,H,W), grad_w (Bk,C,Kh,Kw)).
std::tuple<at::Tensor, at::Tensor> conv_fft_backward(const at::Tensor& grad_y,
                                                     const at::Tensor& x,
                                                     const at::Tensor& w);

}  // namespace terminator
