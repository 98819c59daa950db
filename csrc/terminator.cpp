// The schema of every op, forward and backward. Kernels live in cpu/ and cuda/;
// fake kernels and autograd are registered from Python (terminator/ops/_library.py for the
// HyperZ·Z·W ops, terminator/ops/_network.py for the network's layers).
#include <torch/library.h>

TORCH_LIBRARY(terminator, m) {
  // y = (k ⊙ z) ⊗ x with ⊗ = mode ∈ {dot, matmul, conv}; x = None means x = z.
  m.def("hyperzzw_global(Tensor k, Tensor z, Tensor? x, str mode) -> Tensor");
  // Returns (grad_k, grad_z, grad_x); grad_x is empty (0 elements) when x is None,
  // and grad_z then carries both of z's roles.
  m.def(
      "hyperzzw_global_backward(Tensor grad_y, Tensor k, Tensor z, Tensor? x, str mode)"
      " -> (Tensor, Tensor, Tensor)");
  // Depthwise "same" cross-correlation of x with a shared or per-sample kernel w.
  m.def("hyperkernel_conv(Tensor x, Tensor w, str algo) -> Tensor");
  // Returns (grad_x, grad_w).
  m.def(
      "hyperkernel_conv_backward(Tensor grad_y, Tensor x, Tensor w, str algo)"
      " -> (Tensor, Tensor)");

  // ---- the network's layers (CPU kernels; other devices run the reference composition) ----
  // y = weight · cat(xs) + bias, a 1×1 convolution over inputs concatenated along channels.
  m.def("pointwise(Tensor[] xs, Tensor weight, Tensor? bias) -> Tensor");
  // Returns (grad_xs, grad_weight, grad_bias (empty without bias)).
  m.def(
      "pointwise_backward(Tensor grad_y, Tensor[] xs, Tensor weight, bool has_bias)"
      " -> (Tensor[], Tensor, Tensor)");
  // y = act((x - mean)·rstd) + bias per channel, batch statistics for batch_channels (or the
  // running ones without use_batch_stats), instance statistics for the others. Returns
  // (y, stats (2, B, C): the mean and rstd used, moments (2, len(batch_channels)): the
  // batch channels' batch mean and variance, for the caller's running statistics).
  m.def(
      "standardize(Tensor x, Tensor batch_channels, Tensor? running_mean, Tensor? running_var,"
      " bool use_batch_stats, float eps, bool gelu, Tensor? bias) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_bias (empty without bias)).
  m.def(
      "standardize_backward(Tensor grad_y, Tensor x, Tensor stats, Tensor batch_channels,"
      " bool use_batch_stats, bool gelu, bool has_bias) -> (Tensor, Tensor)");
  // The recursive gated unit W_y(GELU(IN(W_k u ⊙ W_q(W_v u))) + P).
  m.def(
      "rgu(Tensor u, Tensor w_k, Tensor b_k, Tensor w_v, Tensor b_v, Tensor w_q, Tensor b_q,"
      " Tensor w_y, Tensor b_y, Tensor bias_map) -> Tensor");
  // Returns the gradients of u and of every weight, in argument order.
  m.def(
      "rgu_backward(Tensor grad_r, Tensor u, Tensor w_k, Tensor b_k, Tensor w_v, Tensor b_v,"
      " Tensor w_q, Tensor b_q, Tensor w_y, Tensor b_y, Tensor bias_map) -> Tensor[]");
  // The local slow net: context-dependent kernels (B or 1, C, *kernel_size) from u.
  m.def(
      "local_kernel(Tensor u, int[] kernel_size, bool batch_context, Tensor coords,"
      " Tensor[] filter_w, Tensor[] filter_b, Tensor[] linear_w, Tensor[] linear_b, Tensor out_w,"
      " Tensor out_b, Tensor bias_map, Tensor alpha, Tensor beta, Tensor reduce_w, Tensor reduce_b,"
      " Tensor fc_w, Tensor fc_b, Tensor[] gate_w, Tensor[] gate_b) -> Tensor");
  // Returns the gradients of u and of every weight after coords, in argument order.
  m.def(
      "local_kernel_backward(Tensor g_kernel, Tensor u, int[] kernel_size, bool batch_context,"
      " Tensor coords, Tensor[] filter_w, Tensor[] filter_b, Tensor[] linear_w, Tensor[] linear_b,"
      " Tensor out_w, Tensor out_b, Tensor bias_map, Tensor alpha, Tensor beta, Tensor reduce_w,"
      " Tensor reduce_b, Tensor fc_w, Tensor fc_b, Tensor[] gate_w, Tensor[] gate_b) -> Tensor[]");
  // x ⊙ sigmoid(s_c ⊙ s_s) with s_c = k_c ⊙ mean_S(y)², s_s = k_s ⊙ mean_C(y)² (s_s = 1 without
  // k_s); x = None means x = y.
  m.def("hyper_interaction(Tensor y, Tensor? x, Tensor k_c, Tensor? k_s) -> Tensor");
  // Returns (grad_y, grad_x (empty when x is None), grad_k_c, grad_k_s (empty without k_s)).
  m.def(
      "hyper_interaction_backward(Tensor grad, Tensor y, Tensor? x, Tensor k_c, Tensor? k_s) -> "
      "Tensor[]");

  // ---- the optimizer (CPU kernel; other devices and dtypes run ATen's foreach ops) ----
  // One Kar step over every parameter (terminator/optim.py); means[j·P + i] is parameter
  // i's running mean with betas[j]; steps[i] += 1.
  m.def(
      "kar_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] means, Tensor(c!)[] steps,"
      " float lr, float[] betas) -> ()");
}
