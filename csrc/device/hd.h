// What every device kernel needs, written so that it compiles both with nvcc
// (as __host__ __device__ code) and with the host compiler alone.
//
// Every kernel's per-thread work is a TERMINATOR_HD function that takes the
// thread's coordinates as a plain ThreadContext instead of reading blockIdx /
// threadIdx itself. cuda/kernels.cu fills the context from the CUDA builtins;
// tests/cuda_harness/emulate.cpp fills it from loops over the same launch grid,
// so the kernel logic runs (and is tested) on a machine without a GPU.
//
// Conventions: every grid is one-dimensional (grid.x only, at most
// kMaxGridX blocks); a kernel whose work does not fit loops over "items"
// item = block.x, block.x + grid.x, ... . All sizes and offsets are int64_t.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define TERMINATOR_HD __host__ __device__
#else
#define TERMINATOR_HD
#endif

namespace terminator {
namespace device {

// CUDA's limit on gridDim.x.
constexpr int64_t kMaxGridX = 2147483647;

struct Index3 {
  int64_t x = 0, y = 0, z = 0;
};

// The coordinates one CUDA thread sees: blockIdx, threadIdx, blockDim, gridDim.
struct ThreadContext {
  Index3 block, thread, block_dim, grid_dim;

  // Linear thread index inside the block (threadIdx.x fastest).
  TERMINATOR_HD int64_t rank() const {
    return thread.x + block_dim.x * (thread.y + block_dim.y * thread.z);
  }
  TERMINATOR_HD int64_t block_threads() const { return block_dim.x * block_dim.y * block_dim.z; }
  // Grid-stride loops over a flat range: start and stride.
  TERMINATOR_HD int64_t global_rank() const { return block.x * block_threads() + rank(); }
  TERMINATOR_HD int64_t grid_threads() const { return grid_dim.x * block_threads(); }
};

// What a launch needs: grid and block shape, dynamic shared memory in bytes.
struct LaunchConfig {
  Index3 grid{1, 1, 1};
  Index3 block{1, 1, 1};
  int64_t shared_bytes = 0;
};

// Knobs of the launch-shape choices. The CUDA backend uses default_limits();
// the host emulation shrinks them to drive small inputs through the code paths
// that large inputs take (grid-stride loops, split reductions, fallbacks).
struct LaunchLimits {
  int64_t max_blocks = kMaxGridX;     // cap on grid.x; work beyond it loops
  int64_t shared_budget = 16 * 1024;  // bytes of shared memory a tiled kernel may use
  int64_t target_threads = 1 << 17;   // parallelism a split reduction aims for
};

TERMINATOR_HD inline LaunchLimits default_limits() { return LaunchLimits{}; }

TERMINATOR_HD inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
TERMINATOR_HD inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
TERMINATOR_HD inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
TERMINATOR_HD inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return min64(max64(v, lo), hi);
}

// Smallest power of two >= n (n >= 1).
TERMINATOR_HD inline int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// A one-dimensional grid of `threads`-thread blocks covering `work` items, one
// item per thread, capped at limits.max_blocks (the kernel then grid-strides).
inline LaunchConfig elementwise_launch(int64_t work, int64_t threads, const LaunchLimits& limits) {
  LaunchConfig cfg;
  cfg.block.x = threads;
  cfg.grid.x = clamp64(ceil_div(work, threads), 1, min64(limits.max_blocks, kMaxGridX));
  return cfg;
}

// A one-dimensional grid with one block per item, capped at limits.max_blocks
// (each block then loops over items block.x, block.x + grid.x, ...).
inline int64_t item_blocks(int64_t items, const LaunchLimits& limits) {
  return clamp64(items, 1, min64(limits.max_blocks, kMaxGridX));
}

}  // namespace device
}  // namespace terminator
