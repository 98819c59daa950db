// The network's layer kernels (terminator::pointwise, standardize, rgu, local_kernel and
// their backward ops), registered for the CPU in register.cpp. float and double; shapes as
// terminator/ops/__init__.py documents them.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace terminator {
namespace cpu {

at::Tensor rgu(const at::Tensor& u, const at::Tensor& wk, const at::Tensor& bk,
               const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wq,
               const at::Tensor& bq, const at::Tensor& wy, const at::Tensor& by,
               const at::Tensor& p);
std::vector<at::Tensor> rgu_backward(const at::Tensor& gr, const at::Tensor& u,
                                     const at::Tensor& wk, const at::Tensor& bk,
                                     const at::Tensor& wv, const at::Tensor& bv,
                                     const at::Tensor& wq, const at::Tensor& bq,
                                     const at::Tensor& wy, const at::Tensor& by,
                                     const at::Tensor& p);
at::Tensor pointwise(at::TensorList xs, const at::Tensor& w, const std::optional<at::Tensor>& b);
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> pointwise_backward(const at::Tensor& gy,
                                                                               at::TensorList xs,
                                                                               const at::Tensor& w,
                                                                               bool has_bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> standardize(
    const at::Tensor& x, const at::Tensor& batch_channels,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool use_batch_stats, double eps, bool gelu_act, const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor> standardize_backward(const at::Tensor& gy, const at::Tensor& x,
                                                        const at::Tensor& stats,
                                                        const at::Tensor& batch_channels,
                                                        bool use_batch, bool gelu_act,
                                                        bool has_bias);
at::Tensor local_kernel(const at::Tensor& u, at::IntArrayRef kernel_size, bool batch_context,
                        const at::Tensor& coords, at::TensorList fw, at::TensorList fb,
                        at::TensorList lw, at::TensorList lb, const at::Tensor& ow,
                        const at::Tensor& ob, const at::Tensor& p, const at::Tensor& alpha,
                        const at::Tensor& beta, const at::Tensor& rw, const at::Tensor& rb,
                        const at::Tensor& cw, const at::Tensor& cb, at::TensorList gw,
                        at::TensorList gb);
std::vector<at::Tensor> local_kernel_backward(
    const at::Tensor& g_kernel, const at::Tensor& u, at::IntArrayRef kernel_size,
    bool batch_context, const at::Tensor& coords, at::TensorList fw, at::TensorList fb,
    at::TensorList lw, at::TensorList lb, const at::Tensor& ow, const at::Tensor& ob,
    const at::Tensor& p, const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& rw,
    const at::Tensor& rb, const at::Tensor& cw, const at::Tensor& cb, at::TensorList gw,
    at::TensorList gb);
at::Tensor hyper_interaction(const at::Tensor& y, const std::optional<at::Tensor>& x,
                             const at::Tensor& kc, const std::optional<at::Tensor>& ks);
std::vector<at::Tensor> hyper_interaction_backward(const at::Tensor& grad, const at::Tensor& y,
                                                   const std::optional<at::Tensor>& x,
                                                   const at::Tensor& kc,
                                                   const std::optional<at::Tensor>& ks);

// One Kar step: p ← p − lr·(sign(g) + Σ_j sign(m_j)), m_j ← lerp(m_j, g, 1 − β_j), step += 1;
// means[j·P + i] is parameter i's running mean j.
void kar_step_(at::TensorList params, at::TensorList grads, at::TensorList means,
               at::TensorList steps, double lr, at::ArrayRef<double> betas);

}  // namespace cpu
}  // namespace terminator
