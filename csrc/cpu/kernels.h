// The CPU kernels, one op family per file: ATen's parallel_for over planes or column chunks,
// accumulation in at::opmath_type (float for float16/bfloat16), fixed summation order so
// results are deterministic for any thread count. CpuKernels is the Kernels struct of
// ops_impl.h, registered for the CPU in register.cpp; shapes as ops_impl.h gives them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdint>
#include <tuple>

#define TERMINATOR_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace terminator {
namespace cpu {

// global_dot.cpp: mode="dot". k (Bk, C, N), z / x / gy (B, C, N); x undefined is "x is z".
at::Tensor global_dot_forward(const at::Tensor& k, const at::Tensor& z, const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor, at::Tensor> global_dot_backward(const at::Tensor& gy,
                                                                   const at::Tensor& k,
                                                                   const at::Tensor& z,
                                                                   const at::Tensor& x);

// global_matmul.cpp: mode="matmul". k (Bk, C, S, S), z / x / gy (B, C, S, S).
at::Tensor global_matmul_forward(const at::Tensor& k, const at::Tensor& z, const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor, at::Tensor> global_matmul_backward(const at::Tensor& gy,
                                                                      const at::Tensor& k,
                                                                      const at::Tensor& z,
                                                                      const at::Tensor& x);

// conv_direct.cpp, conv_direct_backward.cpp: depthwise "same" cross-correlation, direct.
// x / gy (B, C, H, W), w (Bk, C, Kh, Kw).
at::Tensor conv_direct_forward(const at::Tensor& x, const at::Tensor& w);
std::tuple<at::Tensor, at::Tensor> conv_direct_backward(const at::Tensor& gy, const at::Tensor& x,
                                                        const at::Tensor& w);

// crossover.cpp: algo="auto"'s choice between the direct kernel and the FFT path.
bool prefer_fft(int64_t H, int64_t W, int64_t Kh, int64_t Kw, bool shared_kernel);

struct CpuKernels {
  static constexpr auto prefer_fft = &cpu::prefer_fft;
  static constexpr auto global_dot_forward = &cpu::global_dot_forward;
  static constexpr auto global_dot_backward = &cpu::global_dot_backward;
  static constexpr auto global_matmul_forward = &cpu::global_matmul_forward;
  static constexpr auto global_matmul_backward = &cpu::global_matmul_backward;
  static constexpr auto conv_direct_forward = &cpu::conv_direct_forward;
  static constexpr auto conv_direct_backward = &cpu::conv_direct_backward;
};

}  // namespace cpu
}  // namespace terminator
