// Direct depthwise "same" cross-correlation, per thread.
//
// Planes are (B·C, H, W) (1D data has H = 1); kernels (Bk·C, Kh, Kw) with Bk = 1
// (shared over the batch: plane p uses kernel p mod C) or B (plane p uses kernel p).
//
//   correlate:   out[i, j] = Σ_{qi, qj} w[qi, qj] · in[i + qi − pad_h, j + qj − pad_w]
//                (zero outside). The forward pass uses pad = ⌊(K−1)/2⌋; the input
//                gradient reads w flipped (`flip`) with pad = K − 1 − ⌊(K−1)/2⌋.
//   weight grad: gw[kp, qi, qj] = Σ_{planes of kp} Σ_{i, j} gy[i, j] · x[i + di, j + dj]
//                with di = qi − pad_h, dj = qj − pad_w.
//
// Kernels that share memory inside a block are split into phases, each a
// TERMINATOR_HD function run by every thread of the block; the CUDA kernel puts
// __syncthreads() between phases, the host emulation runs all threads through
// one phase before starting the next.
#pragma once

#include "global_dot.h"  // BatchSplit, split_batch
#include "hd.h"

namespace terminator {
namespace device {

constexpr int64_t kTileThreads = 256;  // threads per tiled block
constexpr int64_t kWeightGradMaxThreads = 256;

// ---- correlate: forward and input gradient ------------------------------------

template <typename scalar_t>
struct CorrelateParams {
  const scalar_t* in;  // (planes, H, W)
  const scalar_t* w;   // (kernels, Kh, Kw)
  scalar_t* out;       // (planes, H, W)
  int64_t planes, C, H, W, Kh, Kw, pad_h, pad_w;
  bool shared_w, flip;
  // Tiled path: the output is cut into tile_h × tile_w tiles; item = one tile
  // of one plane, items = planes · tiles_h · tiles_w.
  int64_t tile_h, tile_w, tiles_h, tiles_w, items;
};

template <typename scalar_t>
TERMINATOR_HD inline int64_t kernel_plane_of(const CorrelateParams<scalar_t>& p, int64_t plane) {
  return p.shared_w ? plane % p.C : plane;
}

// Tap q = qi·Kw + qj of the kernel as the correlation reads it.
template <typename scalar_t>
TERMINATOR_HD inline const scalar_t& kernel_tap(const CorrelateParams<scalar_t>& p,
                                                const scalar_t* w, int64_t q) {
  return w[p.flip ? p.Kh * p.Kw - 1 - q : q];
}

struct CorrelateGeometry {
  bool tiled;
  int64_t tile_h, tile_w, tiles_h, tiles_w, items;
  LaunchConfig launch;
};

// Shared memory of one tile: the input halo (tile_h + Kh − 1) × (tile_w + Kw − 1)
// followed by the kernel (Kh × Kw), in the accumulation type.
TERMINATOR_HD inline int64_t correlate_tile_elements(int64_t tile_h, int64_t tile_w, int64_t Kh,
                                                     int64_t Kw) {
  return (tile_h + Kh - 1) * (tile_w + Kw - 1) + Kh * Kw;
}

// Tiles of up to 256 outputs, as wide as the rows allow (32 columns in 2D,
// 256 for 1D data); tiled when the tile fits limits.shared_budget, else one
// thread per output reading global memory.
inline CorrelateGeometry correlate_geometry(int64_t planes, int64_t H, int64_t W, int64_t Kh,
                                            int64_t Kw, int64_t acc_bytes,
                                            const LaunchLimits& limits) {
  CorrelateGeometry g{};
  g.tile_w = min64(H == 1 ? kTileThreads : 32, next_pow2(W));
  g.tile_h = min64(kTileThreads / g.tile_w, next_pow2(H));
  const int64_t shared_bytes = correlate_tile_elements(g.tile_h, g.tile_w, Kh, Kw) * acc_bytes;
  g.tiled = shared_bytes <= limits.shared_budget;
  if (g.tiled) {
    g.tiles_h = ceil_div(H, g.tile_h);
    g.tiles_w = ceil_div(W, g.tile_w);
    g.items = planes * g.tiles_h * g.tiles_w;
    g.launch.block = {g.tile_w, g.tile_h, 1};
    g.launch.grid.x = item_blocks(g.items, limits);
    g.launch.shared_bytes = shared_bytes;
  } else {
    g.tiles_h = g.tiles_w = g.items = 0;
    g.launch = elementwise_launch(planes * H * W, kElementwiseThreads, limits);
  }
  return g;
}

struct TileOrigin {
  int64_t plane, row0, col0;  // the tile's first output row and column
};

template <typename scalar_t>
TERMINATOR_HD inline TileOrigin correlate_tile_origin(const CorrelateParams<scalar_t>& p,
                                                      int64_t item) {
  const int64_t per_plane = p.tiles_h * p.tiles_w;
  const int64_t r = item % per_plane;
  return {item / per_plane, (r / p.tiles_w) * p.tile_h, (r % p.tiles_w) * p.tile_w};
}

// Phase 1: the block copies the tile's input halo (zero outside the plane) and
// the kernel (flipped if p.flip) into shared memory.
template <typename scalar_t, typename acc_t>
TERMINATOR_HD inline void correlate_tile_load(const CorrelateParams<scalar_t>& p,
                                              const ThreadContext& t, int64_t item, acc_t* shared) {
  const TileOrigin o = correlate_tile_origin(p, item);
  const int64_t halo_h = p.tile_h + p.Kh - 1, halo_w = p.tile_w + p.Kw - 1;
  const int64_t halo = halo_h * halo_w, taps = p.Kh * p.Kw;
  const scalar_t* in = p.in + o.plane * p.H * p.W;
  for (int64_t idx = t.rank(); idx < halo; idx += t.block_threads()) {
    const int64_t r = o.row0 - p.pad_h + idx / halo_w;
    const int64_t c = o.col0 - p.pad_w + idx % halo_w;
    const bool inside = r >= 0 && r < p.H && c >= 0 && c < p.W;
    shared[idx] = inside ? acc_t(in[r * p.W + c]) : acc_t(0);
  }
  const scalar_t* w = p.w + kernel_plane_of(p, o.plane) * taps;
  for (int64_t q = t.rank(); q < taps; q += t.block_threads()) {
    shared[halo + q] = acc_t(kernel_tap(p, w, q));
  }
}

// Phase 2: thread (x, y) of the block computes output (row0 + y, col0 + x).
template <typename scalar_t, typename acc_t>
TERMINATOR_HD inline void correlate_tile_compute(const CorrelateParams<scalar_t>& p,
                                                 const ThreadContext& t, int64_t item,
                                                 const acc_t* shared) {
  const TileOrigin o = correlate_tile_origin(p, item);
  const int64_t i = o.row0 + t.thread.y, j = o.col0 + t.thread.x;
  if (i >= p.H || j >= p.W) return;
  const int64_t halo_w = p.tile_w + p.Kw - 1;
  const acc_t* w = shared + (p.tile_h + p.Kh - 1) * halo_w;
  acc_t sum = acc_t(0);
  for (int64_t qi = 0; qi < p.Kh; ++qi) {
    const acc_t* row = shared + (t.thread.y + qi) * halo_w + t.thread.x;
    for (int64_t qj = 0; qj < p.Kw; ++qj) sum += w[qi * p.Kw + qj] * row[qj];
  }
  p.out[(o.plane * p.H + i) * p.W + j] = static_cast<scalar_t>(sum);
}

// Fallback for kernels whose tile does not fit shared memory: one output per
// thread, grid-stride over planes · H · W, reading global memory.
template <typename scalar_t, typename acc_t>
TERMINATOR_HD inline void correlate_simple_thread(const CorrelateParams<scalar_t>& p,
                                                  const ThreadContext& t) {
  const int64_t HW = p.H * p.W, n = p.planes * HW, taps = p.Kh * p.Kw;
  for (int64_t o = t.global_rank(); o < n; o += t.grid_threads()) {
    const int64_t plane = o / HW, i = (o % HW) / p.W, j = o % p.W;
    const scalar_t* in = p.in + plane * HW;
    const scalar_t* w = p.w + kernel_plane_of(p, plane) * taps;
    acc_t sum = acc_t(0);
    for (int64_t qi = 0; qi < p.Kh; ++qi) {
      const int64_t r = i + qi - p.pad_h;
      if (r < 0 || r >= p.H) continue;
      for (int64_t qj = 0; qj < p.Kw; ++qj) {
        const int64_t c = j + qj - p.pad_w;
        if (c < 0 || c >= p.W) continue;
        sum += acc_t(kernel_tap(p, w, qi * p.Kw + qj)) * acc_t(in[r * p.W + c]);
      }
    }
    p.out[o] = static_cast<scalar_t>(sum);
  }
}

// ---- weight gradient -------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct WeightGradParams {
  const scalar_t* gy;  // (B·C, H, W)
  const scalar_t* x;   // (B·C, H, W)
  scalar_t* gw;        // (kernels, Kh, Kw)
  acc_t* partial;      // (splits, kernels · taps) when splits > 1, else null
  int64_t B, C, H, W, Kh, Kw, pad_h, pad_w;
  bool shared_w;
  // kernels = C (shared) or B·C; taps = Kh·Kw. A shared kernel's batch is cut
  // into `splits` slices of batch_per_split samples. One block reduces one
  // item = (split, kernel plane, tap): items = splits · kernels · taps.
  int64_t kernels, taps, splits, batch_per_split, items;
};

struct WeightGradGeometry {
  int64_t kernels, taps, splits, batch_per_split, items;
  LaunchConfig launch;
};

inline WeightGradGeometry weight_grad_geometry(int64_t B, int64_t C, int64_t H, int64_t W,
                                               int64_t Kh, int64_t Kw, bool shared_w,
                                               int64_t acc_bytes, const LaunchLimits& limits) {
  WeightGradGeometry g{};
  g.kernels = shared_w ? C : B * C;
  g.taps = Kh * Kw;
  // A power of two (the tree reduction halves it), at most one thread per term.
  const int64_t threads = clamp64(next_pow2(H * W), 32, kWeightGradMaxThreads);
  const BatchSplit split =
      shared_w ? split_batch(B, g.kernels * g.taps * threads, limits) : BatchSplit{1, 1};
  g.splits = split.splits;
  g.batch_per_split = split.batch_per_split;
  g.items = g.splits * g.kernels * g.taps;
  g.launch.block.x = threads;
  g.launch.grid.x = item_blocks(g.items, limits);
  g.launch.shared_bytes = threads * acc_bytes;
  return g;
}

struct WeightGradItem {
  int64_t split, kernel, tap;
};

template <typename scalar_t, typename acc_t>
TERMINATOR_HD inline WeightGradItem weight_grad_item(const WeightGradParams<scalar_t, acc_t>& p,
                                                     int64_t item) {
  const int64_t rest = item / p.taps;
  return {rest / p.kernels, rest % p.kernels, item % p.taps};
}

// Phase 1: each thread sums a strided share of the item's terms into shared[rank].
template <typename scalar_t, typename acc_t>
TERMINATOR_HD inline void weight_grad_accumulate(const WeightGradParams<scalar_t, acc_t>& p,
                                                 const ThreadContext& t, int64_t item,
                                                 acc_t* shared) {
  const WeightGradItem it = weight_grad_item(p, item);
  const int64_t di = it.tap / p.Kw - p.pad_h, dj = it.tap % p.Kw - p.pad_w;
  // Outputs (i, j) whose input (i + di, j + dj) lies inside the plane.
  const int64_t i0 = max64(0, -di), i1 = min64(p.H, p.H - di);
  const int64_t j0 = max64(0, -dj), j1 = min64(p.W, p.W - dj);
  const int64_t rows = max64(0, i1 - i0), cols = max64(0, j1 - j0), area = rows * cols;
  int64_t b0 = 0, nb = 1;
  if (p.shared_w) {
    b0 = it.split * p.batch_per_split;
    nb = max64(0, min64(p.B, b0 + p.batch_per_split) - b0);
  }
  const int64_t count = nb * area;
  acc_t sum = acc_t(0);
  for (int64_t r = t.rank(); r < count; r += t.block_threads()) {
    const int64_t b = r / area, rem = r % area;
    const int64_t i = i0 + rem / cols, j = j0 + rem % cols;
    const int64_t plane = p.shared_w ? (b0 + b) * p.C + it.kernel : it.kernel;
    const int64_t base = plane * p.H * p.W;
    sum += acc_t(p.gy[base + i * p.W + j]) * acc_t(p.x[base + (i + di) * p.W + (j + dj)]);
  }
  shared[t.rank()] = sum;
}

// Phase 2, once per stride = threads/2, threads/4, ..., 1: a fixed-order tree sum.
template <typename acc_t>
TERMINATOR_HD inline void block_reduce_step(const ThreadContext& t, int64_t stride, acc_t* shared) {
  const int64_t r = t.rank();
  if (r < stride) shared[r] += shared[r + stride];
}

// Phase 3: thread 0 stores the item's sum (to gw, or to its slice's partial row).
template <typename scalar_t, typename acc_t>
TERMINATOR_HD inline void weight_grad_store(const WeightGradParams<scalar_t, acc_t>& p,
                                            const ThreadContext& t, int64_t item,
                                            const acc_t* shared) {
  if (t.rank() != 0) return;
  if (p.splits == 1) {
    p.gw[item] = static_cast<scalar_t>(shared[0]);  // item = kernel · taps + tap
  } else {
    p.partial[item] = shared[0];  // row `split`, column kernel · taps + tap
  }
}

}  // namespace device
}  // namespace terminator
