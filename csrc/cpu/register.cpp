// Registers the ops (ops_impl.h, over the kernels of kernels.h) for the CPU dispatch key.
#include "../ops_impl.h"
#include "kernels.h"

#include <torch/library.h>

namespace terminator {

TORCH_LIBRARY_IMPL(terminator, CPU, m) { register_impls<cpu::CpuKernels>(m); }

}  // namespace terminator
