// Registers the ops for the CPU dispatch key: the HyperZ·Z·W ops (ops_impl.h over the
// kernels of kernels.h) and the network's layers and the optimizer step (layers.h).
#include <torch/library.h>

#include "../ops_impl.h"
#include "kernels.h"
#include "layers.h"

namespace terminator {

TORCH_LIBRARY_IMPL(terminator, CPU, m) {
  register_impls<cpu::CpuKernels>(m);
  m.impl("pointwise", &cpu::pointwise);
  m.impl("pointwise_backward", &cpu::pointwise_backward);
  m.impl("standardize", &cpu::standardize);
  m.impl("standardize_backward", &cpu::standardize_backward);
  m.impl("rgu", &cpu::rgu);
  m.impl("rgu_backward", &cpu::rgu_backward);
  m.impl("local_kernel", &cpu::local_kernel);
  m.impl("local_kernel_backward", &cpu::local_kernel_backward);
  m.impl("hyper_interaction", &cpu::hyper_interaction);
  m.impl("hyper_interaction_backward", &cpu::hyper_interaction_backward);
  m.impl("kar_step_", &cpu::kar_step_);
}

}  // namespace terminator
