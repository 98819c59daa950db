// Host emulation of the CUDA kernels, for machines without a GPU.
//
// EmulatedLauncher runs the very per-thread functions that cuda/kernels.cu
// launches (csrc/device/*.h) over the very launch grid that
// device/device_kernels.h computes, with emulated block / thread indices:
// every block runs on its own, its threads one after another through each
// phase, and a barrier (__syncthreads() on the GPU) is the end of a phase. Shared
// memory is a per-block buffer filled with NaN bytes before each block, so a read
// of a cell no thread wrote shows up in the results.
//
// It registers, in the namespace terminator_emulated (never terminator):
//   - the four public ops with terminator's schema, as Ops<DeviceKernels<EmulatedLauncher>>
//     (exactly the C++ the CUDA backend runs, minus the CUDA launches);
//   - the five Kernels functions on their own (planes in, planes out);
//   - knobs: set_limits / reset_limits (shrink the launch limits so small inputs
//     take the paths of large ones), launch_log / clear_launch_log (which kernels
//     ran), correlate_plan / weight_grad_plan (launch shapes without running).
//
// Built by tests/test_cuda_kernels.py with torch.utils.cpp_extension.load.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <vector>

#include "device/device_kernels.h"
#include "ops_impl.h"

namespace terminator {
namespace emulation {
namespace {

using namespace terminator::device;

// What a CUDA launch may use on sm_80 / sm_90 without opting in to more.
constexpr int64_t kMaxThreadsPerBlock = 1024;
constexpr int64_t kMaxStaticSharedBytes = 48 * 1024;

LaunchLimits& current_limits() {
  static LaunchLimits limits = default_limits();
  return limits;
}

std::vector<std::string>& launch_log() {
  static std::vector<std::string> log;
  return log;
}

struct NoGuard {
  explicit NoGuard(const at::Device&) {}
};

void check_launch(const char* name, const LaunchConfig& cfg) {
  const Index3& b = cfg.block;
  const int64_t threads = b.x * b.y * b.z;
  TORCH_CHECK(b.x >= 1 && b.y >= 1 && b.z >= 1 && threads <= kMaxThreadsPerBlock, name,
              ": invalid block (", b.x, ", ", b.y, ", ", b.z, ")");
  TORCH_CHECK(b.x <= 1024 && b.y <= 1024 && b.z <= 64, name, ": block dims over CUDA's limits");
  TORCH_CHECK(cfg.grid.x >= 1 && cfg.grid.x <= kMaxGridX && cfg.grid.y == 1 && cfg.grid.z == 1,
              name, ": invalid grid (", cfg.grid.x, ", ", cfg.grid.y, ", ", cfg.grid.z, ")");
  TORCH_CHECK(cfg.shared_bytes >= 0 && cfg.shared_bytes <= kMaxStaticSharedBytes, name, ": ",
              cfg.shared_bytes, " bytes of shared memory");
  launch_log().emplace_back(name);
}

// The threads of one block, in rank order (threadIdx.x fastest).
std::vector<ThreadContext> block_threads(const LaunchConfig& cfg, int64_t block) {
  std::vector<ThreadContext> threads;
  threads.reserve(cfg.block.x * cfg.block.y * cfg.block.z);
  for (int64_t z = 0; z < cfg.block.z; ++z) {
    for (int64_t y = 0; y < cfg.block.y; ++y) {
      for (int64_t x = 0; x < cfg.block.x; ++x) {
        ThreadContext t;
        t.block = {block, 0, 0};
        t.thread = {x, y, z};
        t.block_dim = cfg.block;
        t.grid_dim = cfg.grid;
        threads.push_back(t);
      }
    }
  }
  return threads;
}

// A kernel without barriers: every thread of every block, once.
template <class Fn>
void run_threads(const char* name, const LaunchConfig& cfg, const Fn& fn) {
  check_launch(name, cfg);
  for (int64_t block = 0; block < cfg.grid.x; ++block) {
    for (const auto& t : block_threads(cfg, block)) fn(t);
  }
}

// Per-block shared memory, NaN-filled (all bits set) at the start of each block.
template <typename acc_t>
struct SharedMemory {
  std::vector<acc_t> cells;
  explicit SharedMemory(const LaunchConfig& cfg)
      : cells(static_cast<size_t>(ceil_div(cfg.shared_bytes, sizeof(acc_t)))) {}
  acc_t* reset() {
    if (!cells.empty()) std::memset(cells.data(), 0xFF, cells.size() * sizeof(acc_t));
    return cells.data();
  }
};

// A kernel with barriers: `block_fn(threads, shared)` runs one block's phases.
template <typename acc_t, class BlockFn>
void run_blocks(const char* name, const LaunchConfig& cfg, const BlockFn& block_fn) {
  check_launch(name, cfg);
  SharedMemory<acc_t> shared(cfg);
  for (int64_t block = 0; block < cfg.grid.x; ++block) {
    const auto threads = block_threads(cfg, block);
    block_fn(threads, shared.reset());
  }
}

template <class Fn>
void each_thread(const std::vector<ThreadContext>& threads, const Fn& fn) {
  for (const auto& t : threads) fn(t);
}

struct EmulatedLauncher {
  using Guard = NoGuard;

  static LaunchLimits limits() { return current_limits(); }

  template <typename scalar_t>
  static void global_dot_forward(const LaunchConfig& cfg,
                                 const GlobalDotForwardParams<scalar_t>& p) {
    run_threads("global_dot_forward", cfg, [&](const ThreadContext& t) {
      global_dot_forward_thread<scalar_t, at::opmath_type<scalar_t>>(p, t);
    });
  }

  template <typename scalar_t, typename acc_t>
  static void global_dot_backward_elementwise(const LaunchConfig& cfg,
                                              const GlobalDotBackwardParams<scalar_t, acc_t>& p) {
    run_threads("global_dot_backward_elementwise", cfg,
                [&](const ThreadContext& t) { global_dot_backward_elementwise_thread(p, t); });
  }

  template <typename scalar_t, typename acc_t>
  static void global_dot_backward_columns(const LaunchConfig& cfg,
                                          const GlobalDotBackwardParams<scalar_t, acc_t>& p) {
    run_threads("global_dot_backward_columns", cfg,
                [&](const ThreadContext& t) { global_dot_backward_columns_thread(p, t); });
  }

  template <typename scalar_t, typename acc_t>
  static void column_sum(const LaunchConfig& cfg, const ColumnSumParams<scalar_t, acc_t>& p) {
    run_threads("column_sum", cfg, [&](const ThreadContext& t) { column_sum_thread(p, t); });
  }

  // Mirrors correlate_tiled_kernel in cuda/kernels.cu.
  template <typename scalar_t>
  static void correlate_tiled(const LaunchConfig& cfg, const CorrelateParams<scalar_t>& p) {
    using acc_t = at::opmath_type<scalar_t>;
    run_blocks<acc_t>("correlate_tiled", cfg, [&](const auto& threads, acc_t* shared) {
      for (int64_t item = threads[0].block.x; item < p.items; item += cfg.grid.x) {
        each_thread(threads,
                    [&](const ThreadContext& t) { correlate_tile_load(p, t, item, shared); });
        each_thread(threads,
                    [&](const ThreadContext& t) { correlate_tile_compute(p, t, item, shared); });
      }
    });
  }

  template <typename scalar_t>
  static void correlate_simple(const LaunchConfig& cfg, const CorrelateParams<scalar_t>& p) {
    run_threads("correlate_simple", cfg, [&](const ThreadContext& t) {
      correlate_simple_thread<scalar_t, at::opmath_type<scalar_t>>(p, t);
    });
  }

  // Mirrors weight_grad_kernel in cuda/kernels.cu.
  template <typename scalar_t, typename acc_t>
  static void weight_grad(const LaunchConfig& cfg, const WeightGradParams<scalar_t, acc_t>& p) {
    run_blocks<acc_t>("weight_grad", cfg, [&](const auto& threads, acc_t* shared) {
      const int64_t block_threads = threads[0].block_threads();
      for (int64_t item = threads[0].block.x; item < p.items; item += cfg.grid.x) {
        each_thread(threads,
                    [&](const ThreadContext& t) { weight_grad_accumulate(p, t, item, shared); });
        for (int64_t stride = block_threads / 2; stride > 0; stride /= 2) {
          each_thread(threads,
                      [&](const ThreadContext& t) { block_reduce_step(t, stride, shared); });
        }
        each_thread(threads,
                    [&](const ThreadContext& t) { weight_grad_store(p, t, item, shared); });
      }
    });
  }
};

using EmulatedKernels = DeviceKernels<EmulatedLauncher>;
using EmulatedOps = Ops<EmulatedKernels>;

// ---- the Kernels functions as ops (planes in, planes out) ------------------------

void check_planes(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous CPU tensor of rank ", dim, ", got ", t.sizes());
}

at::Tensor or_empty(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

at::Tensor global_dot_forward_op(const at::Tensor& k, const at::Tensor& z,
                                 const std::optional<at::Tensor>& x) {
  check_planes(k, "k", 3), check_planes(z, "z", 3);
  if (x) check_planes(*x, "x", 3);
  return EmulatedKernels::global_dot_forward(k, z, x.value_or(at::Tensor()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> global_dot_backward_op(
    const at::Tensor& gy, const at::Tensor& k, const at::Tensor& z,
    const std::optional<at::Tensor>& x) {
  check_planes(gy, "grad_y", 3), check_planes(k, "k", 3), check_planes(z, "z", 3);
  if (x) check_planes(*x, "x", 3);
  auto [gk, gz, gx] = EmulatedKernels::global_dot_backward(gy, k, z, x.value_or(at::Tensor()));
  return {gk, gz, or_empty(gx, z)};
}

at::Tensor conv_direct_forward_op(const at::Tensor& x, const at::Tensor& w) {
  check_planes(x, "x", 4), check_planes(w, "w", 4);
  return EmulatedKernels::conv_direct_forward(x, w);
}

at::Tensor conv_direct_input_grad_op(const at::Tensor& gy, const at::Tensor& w) {
  check_planes(gy, "grad_y", 4), check_planes(w, "w", 4);
  return EmulatedKernels::conv_direct_input_grad(gy, w);
}

at::Tensor conv_direct_weight_grad_op(const at::Tensor& gy, const at::Tensor& x,
                                      const at::Tensor& w) {
  check_planes(gy, "grad_y", 4), check_planes(x, "x", 4), check_planes(w, "w", 4);
  return EmulatedKernels::conv_direct_weight_grad(gy, x, w);
}

// ---- knobs -------------------------------------------------------------------------

void set_limits(int64_t max_blocks, int64_t shared_budget, int64_t target_threads) {
  TORCH_CHECK(max_blocks >= 1 && shared_budget >= 0 && target_threads >= 1,
              "set_limits: max_blocks >= 1, shared_budget >= 0, target_threads >= 1");
  current_limits() = LaunchLimits{max_blocks, shared_budget, target_threads};
}

void reset_limits() { current_limits() = default_limits(); }

std::vector<std::string> get_launch_log() { return launch_log(); }

void clear_launch_log() { launch_log().clear(); }

std::vector<int64_t> config_fields(const LaunchConfig& cfg) {
  return {cfg.grid.x, cfg.block.x, cfg.block.y, cfg.block.z, cfg.shared_bytes};
}

// [tiled, grid.x, block.x, block.y, block.z, shared_bytes, tile_h, tile_w, items]
// for the default (CUDA) limits.
std::vector<int64_t> correlate_plan(int64_t planes, int64_t H, int64_t W, int64_t Kh, int64_t Kw,
                                    int64_t acc_bytes) {
  const auto g = correlate_geometry(planes, H, W, Kh, Kw, acc_bytes, default_limits());
  std::vector<int64_t> out{g.tiled ? 1 : 0};
  for (int64_t v : config_fields(g.launch)) out.push_back(v);
  out.insert(out.end(), {g.tile_h, g.tile_w, g.items});
  return out;
}

// [splits, grid.x, block.x, block.y, block.z, shared_bytes, batch_per_split, items]
std::vector<int64_t> weight_grad_plan(int64_t B, int64_t C, int64_t H, int64_t W, int64_t Kh,
                                      int64_t Kw, bool shared, int64_t acc_bytes) {
  const auto g = weight_grad_geometry(B, C, H, W, Kh, Kw, shared, acc_bytes, default_limits());
  std::vector<int64_t> out{g.splits};
  for (int64_t v : config_fields(g.launch)) out.push_back(v);
  out.insert(out.end(), {g.batch_per_split, g.items});
  return out;
}

}  // namespace
}  // namespace emulation

TORCH_LIBRARY(terminator_emulated, m) {
  using namespace emulation;
  // The public ops, same schema as TORCH_LIBRARY(terminator) in csrc/terminator.cpp.
  m.def("hyperzzw_global(Tensor k, Tensor z, Tensor? x, str mode) -> Tensor",
        &EmulatedOps::hyperzzw_global);
  m.def(
      "hyperzzw_global_backward(Tensor grad_y, Tensor k, Tensor z, Tensor? x, str mode)"
      " -> (Tensor, Tensor, Tensor)",
      &EmulatedOps::hyperzzw_global_backward);
  m.def("hyperkernel_conv(Tensor x, Tensor w, str algo) -> Tensor", &EmulatedOps::hyperkernel_conv);
  m.def(
      "hyperkernel_conv_backward(Tensor grad_y, Tensor x, Tensor w, str algo)"
      " -> (Tensor, Tensor)",
      &EmulatedOps::hyperkernel_conv_backward);
  // The Kernels functions of ops_impl.h.
  m.def("global_dot_forward(Tensor k, Tensor z, Tensor? x) -> Tensor", &global_dot_forward_op);
  m.def(
      "global_dot_backward(Tensor grad_y, Tensor k, Tensor z, Tensor? x)"
      " -> (Tensor, Tensor, Tensor)",
      &global_dot_backward_op);
  m.def("conv_direct_forward(Tensor x, Tensor w) -> Tensor", &conv_direct_forward_op);
  m.def("conv_direct_input_grad(Tensor grad_y, Tensor w) -> Tensor", &conv_direct_input_grad_op);
  m.def("conv_direct_weight_grad(Tensor grad_y, Tensor x, Tensor w) -> Tensor",
        &conv_direct_weight_grad_op);
  // Knobs.
  m.def("set_limits(int max_blocks, int shared_budget, int target_threads) -> ()", &set_limits);
  m.def("reset_limits() -> ()", &reset_limits);
  m.def("launch_log() -> str[]", &get_launch_log);
  m.def("clear_launch_log() -> ()", &clear_launch_log);
  m.def("correlate_plan(int planes, int H, int W, int Kh, int Kw, int acc_bytes) -> int[]",
        &correlate_plan);
  m.def(
      "weight_grad_plan(int B, int C, int H, int W, int Kh, int Kw, bool shared,"
      " int acc_bytes) -> int[]",
      &weight_grad_plan);
}

}  // namespace terminator
