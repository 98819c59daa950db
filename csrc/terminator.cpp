// The schema of every op, forward and backward. Kernels live in cpu/ and cuda/;
// fake kernels and autograd are registered from Python (terminator/ops/_library.py).
#include <torch/library.h>

TORCH_LIBRARY(terminator, m) {
  // y = (k ⊙ z) ⊗ x with ⊗ = mode ∈ {dot, matmul, conv}; x = None means x = z.
  m.def("hyperzzw_global(Tensor k, Tensor z, Tensor? x, str mode) -> Tensor");
  // Returns (grad_k, grad_z, grad_x); grad_x is empty (0 elements) when x is None,
  // and grad_z then carries both of z's roles.
  m.def("hyperzzw_global_backward(Tensor grad_y, Tensor k, Tensor z, Tensor? x, str mode)"
        " -> (Tensor, Tensor, Tensor)");
  // Depthwise "same" cross-correlation of x with a shared or per-sample kernel w.
  m.def("hyperkernel_conv(Tensor x, Tensor w, str algo) -> Tensor");
  // Returns (grad_x, grad_w).
  m.def("hyperkernel_conv_backward(Tensor grad_y, Tensor x, Tensor w, str algo)"
        " -> (Tensor, Tensor)");
}
