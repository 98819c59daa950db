// The Kar optimizers' step over every parameter in one call (terminator/optim.py): the
// per-parameter ATen calls of the same step cost more than its arithmetic.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/variable.h>

#include <cmath>

#include "layers.h"

namespace terminator {
namespace cpu {
namespace {

template <typename T>
inline T sign_of(T v) {  // ATen's sign: 0 for 0 and NaN
  return static_cast<T>((T(0) < v) - (v < T(0)));
}

// ATen's lerp(m, g, w) as its vector kernel computes it: m + w·(g − m) for |w| < 0.5, else
// g + (w − 1)·(g − m), each as one fused multiply-add.
template <typename T>
inline T lerp_to(T m, T g, T coeff, bool small) {
  return std::fma(coeff, g - m, small ? m : g);
}

// K running means, fixed at compile time (K = 0: the k given).
template <typename T, int K>
void kar_step_impl(T* __restrict__ p, const T* __restrict__ g, T* const* means, const double* betas,
                   int k, T alpha, int64_t n) {
  if (K > 0) k = K;
  T coeff[8];
  bool small[8];
  for (int j = 0; j < k; ++j) {
    const T w = static_cast<T>(1.0 - betas[j]);
    small[j] = std::abs(w) < T(0.5);
    coeff[j] = small[j] ? w : w - T(1);
  }
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    const T ge = g[e];
    T direction = sign_of(ge);
    for (int j = 0; j < k; ++j) direction += sign_of(means[j][e]);
    p[e] = std::fma(direction, alpha, p[e]);
    for (int j = 0; j < k; ++j) means[j][e] = lerp_to(means[j][e], ge, coeff[j], small[j]);
  }
}

// The same step in ATen operations, for what the loop above does not take.
void kar_step_aten(const at::Tensor& p, const at::Tensor& g, at::TensorList means, int64_t count,
                   int64_t i, double lr, at::ArrayRef<double> betas) {
  auto direction = g.sign();
  for (size_t j = 0; j < betas.size(); ++j) direction.add_(means[j * count + i].sign());
  const_cast<at::Tensor&>(p).add_(direction, -lr);
  for (size_t j = 0; j < betas.size(); ++j)
    const_cast<at::Tensor&>(means[j * count + i]).lerp_(g, 1.0 - betas[j]);
}

bool loop_takes(const at::Tensor& t, const at::Tensor& p) {
  return t.device().is_cpu() && t.scalar_type() == p.scalar_type() && t.is_contiguous() &&
         t.sizes() == p.sizes();
}

}  // namespace

void kar_step_(at::TensorList params, at::TensorList grads, at::TensorList means,
               at::TensorList steps, double lr, at::ArrayRef<double> betas) {
  const int64_t count = static_cast<int64_t>(params.size());
  const int k = static_cast<int>(betas.size());
  TORCH_CHECK_VALUE(
      static_cast<int64_t>(grads.size()) == count && static_cast<int64_t>(steps.size()) == count,
      "grads and steps must hold one tensor per parameter (", count, ")");
  TORCH_CHECK_VALUE(k <= 8, "at most 8 betas, got ", k);
  TORCH_CHECK_VALUE(static_cast<int64_t>(means.size()) == k * count,
                    "means must hold len(betas) * len(params) = ", k * count, " tensors, got ",
                    means.size());
  for (int64_t i = 0; i < count; ++i) {
    const auto& p = params[i];
    const auto& g = grads[i];
    TORCH_CHECK_VALUE(g.sizes() == p.sizes(), "grads[", i, "] must have params[", i, "]'s shape");
    bool fast = (p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble) &&
                loop_takes(p, p) && loop_takes(g, p);
    for (int j = 0; j < k; ++j) {
      TORCH_CHECK_VALUE(means[j * count + i].sizes() == p.sizes(), "means[", j * count + i,
                        "] must have params[", i, "]'s shape");
      fast = fast && loop_takes(means[j * count + i], p);
    }
    if (!fast) {
      kar_step_aten(p, g, means, count, i, lr, betas);
    } else {
      AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "kar_step_", [&] {
        scalar_t* m[8];
        for (int j = 0; j < k; ++j) m[j] = means[j * count + i].data_ptr<scalar_t>();
        const auto alpha = static_cast<scalar_t>(-lr);
        auto* pd = p.data_ptr<scalar_t>();
        const auto* gd = g.data_ptr<scalar_t>();
        if (k == 2)
          kar_step_impl<scalar_t, 2>(pd, gd, m, betas.data(), k, alpha, p.numel());
        else if (k == 1)
          kar_step_impl<scalar_t, 1>(pd, gd, m, betas.data(), k, alpha, p.numel());
        else
          kar_step_impl<scalar_t, 0>(pd, gd, m, betas.data(), k, alpha, p.numel());
      });
    }
    // Written through data pointers, so their version counters are bumped here (as an
    // in-place ATen op's are): the kernel caches and autograd see the new values.
    torch::autograd::impl::bump_version(p);
    for (int j = 0; j < k; ++j) torch::autograd::impl::bump_version(means[j * count + i]);
    const auto& step = steps[i];
    if (step.device().is_cpu() && step.scalar_type() == at::kFloat && step.numel() == 1) {
      *step.data_ptr<float>() += 1.0f;
      torch::autograd::impl::bump_version(step);
    } else
      const_cast<at::Tensor&>(step).add_(1);
  }
}

}  // namespace cpu
}  // namespace terminator
