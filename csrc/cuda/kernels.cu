// CUDA kernels: thin __global__ wrappers around the per-thread functions of
// csrc/device/, launched by CudaLauncher; the host side (allocation, dtype
// dispatch, launch shapes) is device/device_kernels.h, shared with the host
// emulation in tests/cuda_harness/. Accumulation in at::opmath_type (float for
// float16 / bfloat16); no atomics, so every result is deterministic.
//
// Every launch: device guard (DeviceKernels), the current stream, a launch
// check; empty tensors return before any launch.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../device/device_kernels.h"
#include "../ops_impl.h"

namespace terminator {
namespace cuda {
namespace {

using namespace terminator::device;

// Every block of these kernels has at most 256 threads.
constexpr int kMaxThreadsPerBlock = 256;

__device__ inline ThreadContext this_thread() {
  ThreadContext t;
  t.block = {blockIdx.x, blockIdx.y, blockIdx.z};
  t.thread = {threadIdx.x, threadIdx.y, threadIdx.z};
  t.block_dim = {blockDim.x, blockDim.y, blockDim.z};
  t.grid_dim = {gridDim.x, gridDim.y, gridDim.z};
  return t;
}

// Dynamic shared memory, viewed as the accumulation type.
template <typename acc_t>
__device__ inline acc_t* shared_memory() {
  extern __shared__ __align__(16) unsigned char terminator_shared[];
  return reinterpret_cast<acc_t*>(terminator_shared);
}

// ---- kernels -------------------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    global_dot_forward_kernel(const GlobalDotForwardParams<scalar_t> p) {
  global_dot_forward_thread<scalar_t, at::opmath_type<scalar_t>>(p, this_thread());
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    global_dot_backward_elementwise_kernel(const GlobalDotBackwardParams<scalar_t, acc_t> p) {
  global_dot_backward_elementwise_thread(p, this_thread());
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    global_dot_backward_columns_kernel(const GlobalDotBackwardParams<scalar_t, acc_t> p) {
  global_dot_backward_columns_thread(p, this_thread());
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    column_sum_kernel(const ColumnSumParams<scalar_t, acc_t> p) {
  column_sum_thread(p, this_thread());
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    correlate_tiled_kernel(const CorrelateParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* shared = shared_memory<acc_t>();
  const ThreadContext t = this_thread();
  for (int64_t item = t.block.x; item < p.items; item += t.grid_dim.x) {
    correlate_tile_load(p, t, item, shared);
    __syncthreads();
    correlate_tile_compute(p, t, item, shared);
    __syncthreads();  // the next item overwrites the tile
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    correlate_simple_kernel(const CorrelateParams<scalar_t> p) {
  correlate_simple_thread<scalar_t, at::opmath_type<scalar_t>>(p, this_thread());
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreadsPerBlock)
    weight_grad_kernel(const WeightGradParams<scalar_t, acc_t> p) {
  acc_t* shared = shared_memory<acc_t>();
  const ThreadContext t = this_thread();
  for (int64_t item = t.block.x; item < p.items; item += t.grid_dim.x) {
    weight_grad_accumulate(p, t, item, shared);
    __syncthreads();
    for (int64_t stride = t.block_threads() / 2; stride > 0; stride /= 2) {
      block_reduce_step(t, stride, shared);
      __syncthreads();
    }
    weight_grad_store(p, t, item, shared);
    __syncthreads();  // the next item overwrites shared[0]
  }
}

// ---- launcher --------------------------------------------------------------------

dim3 to_dim3(const Index3& i) {
  return dim3(static_cast<unsigned>(i.x), static_cast<unsigned>(i.y), static_cast<unsigned>(i.z));
}

struct CudaLauncher {
  using Guard = c10::cuda::CUDAGuard;

  static LaunchLimits limits() { return default_limits(); }

  // Launches `kernel` with `cfg` on the current stream and checks the launch.
  template <typename Params>
  static void launch(void (*kernel)(const Params), const LaunchConfig& cfg, const Params& p) {
    TORCH_INTERNAL_ASSERT(cfg.block.x * cfg.block.y * cfg.block.z <= kMaxThreadsPerBlock,
                          "block of ", cfg.block.x * cfg.block.y * cfg.block.z, " threads");
    TORCH_INTERNAL_ASSERT(cfg.grid.x >= 1 && cfg.grid.x <= kMaxGridX, "grid of ", cfg.grid.x,
                          " blocks");
    kernel<<<to_dim3(cfg.grid), to_dim3(cfg.block), static_cast<size_t>(cfg.shared_bytes),
             c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  static void global_dot_forward(const LaunchConfig& cfg,
                                 const GlobalDotForwardParams<scalar_t>& p) {
    launch(global_dot_forward_kernel<scalar_t>, cfg, p);
  }

  template <typename scalar_t, typename acc_t>
  static void global_dot_backward_elementwise(const LaunchConfig& cfg,
                                              const GlobalDotBackwardParams<scalar_t, acc_t>& p) {
    launch(global_dot_backward_elementwise_kernel<scalar_t, acc_t>, cfg, p);
  }

  template <typename scalar_t, typename acc_t>
  static void global_dot_backward_columns(const LaunchConfig& cfg,
                                          const GlobalDotBackwardParams<scalar_t, acc_t>& p) {
    launch(global_dot_backward_columns_kernel<scalar_t, acc_t>, cfg, p);
  }

  template <typename scalar_t, typename acc_t>
  static void column_sum(const LaunchConfig& cfg, const ColumnSumParams<scalar_t, acc_t>& p) {
    launch(column_sum_kernel<scalar_t, acc_t>, cfg, p);
  }

  template <typename scalar_t>
  static void correlate_tiled(const LaunchConfig& cfg, const CorrelateParams<scalar_t>& p) {
    launch(correlate_tiled_kernel<scalar_t>, cfg, p);
  }

  template <typename scalar_t>
  static void correlate_simple(const LaunchConfig& cfg, const CorrelateParams<scalar_t>& p) {
    launch(correlate_simple_kernel<scalar_t>, cfg, p);
  }

  template <typename scalar_t, typename acc_t>
  static void weight_grad(const LaunchConfig& cfg, const WeightGradParams<scalar_t, acc_t>& p) {
    launch(weight_grad_kernel<scalar_t, acc_t>, cfg, p);
  }
};

struct CudaKernels {
  using Impl = DeviceKernels<CudaLauncher>;
  static constexpr auto global_dot_forward = &Impl::global_dot_forward;
  static constexpr auto global_dot_backward = &Impl::global_dot_backward;
  static constexpr auto global_matmul_forward = &Impl::global_matmul_forward;
  static constexpr auto global_matmul_backward = &Impl::global_matmul_backward;
  static constexpr auto conv_direct_forward = &Impl::conv_direct_forward;
  static constexpr auto conv_direct_backward = &Impl::conv_direct_backward;
  static constexpr auto prefer_fft = &Impl::prefer_fft;
};

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(terminator, CUDA, m) { register_impls<cuda::CudaKernels>(m); }

}  // namespace terminator
