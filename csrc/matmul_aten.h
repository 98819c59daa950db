// hyperzzw_global, mode="matmul", through ATen's batched matmul: the CUDA kernels
// (cuBLAS) and the CPU kernels for planes too large for their fused kernel use it.
#pragma once

#include <tuple>

#include "common.h"

namespace terminator {

// y = (k ⊙ z) @ x per plane, computed in compute_dtype (float32 for float16/bfloat16):
// k4 (Bk, C, S, S), z4 / x4 (B, C, S, S), contiguous; x4 undefined means x is z.
inline at::Tensor matmul_forward_aten(const at::Tensor& k4, const at::Tensor& z4,
                                      const at::Tensor& x4) {
  const auto dtype = compute_dtype(z4.scalar_type());
  auto y = at::matmul(k4.to(dtype) * z4.to(dtype), x4.defined() ? x4.to(dtype) : z4.to(dtype));
  return y.to(z4.scalar_type()).contiguous();
}

// -> (grad_k (Bk, C, S, S), grad_z, grad_x or undefined when x is z).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> matmul_backward_aten(const at::Tensor& gy4,
                                                                           const at::Tensor& k4,
                                                                           const at::Tensor& z4,
                                                                           const at::Tensor& x4) {
  const auto dtype = compute_dtype(z4.scalar_type());
  const auto u4 = (x4.defined() ? x4 : z4).to(dtype);  // what Ŵ acts on
  const auto gy = gy4.to(dtype);
  const auto g_what = at::matmul(gy, u4.transpose(-1, -2));
  const auto g_u = at::matmul((k4.to(dtype) * z4.to(dtype)).transpose(-1, -2), gy);
  return grads_through_product(g_what, g_u, k4, z4, x4.defined());
}

}  // namespace terminator
