// hyperkernel_conv, algo="direct", backward: the input and weight gradients of the
// depthwise "same" cross-correlation, for shared and per-sample kernels.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "conv_direct.h"
#include "kernels.h"
#include "parallel.h"
#include "vec.h"

namespace terminator {
namespace cpu {
namespace {

// Whether all n values are finite: v - v is 0 for a finite v and NaN for an inf or NaN,
// and a NaN survives the sum. Summed as whole vectors: a scalar loop with a flag is slow
// next to the weight gradient it guards.
template <typename acc_t>
bool all_finite(const acc_t* v, int64_t n) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = kLanes<acc_t>;
  V vector_sum = {};
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const V a = *reinterpret_cast<const V*>(v + j);
    vector_sum += a - a;
  }
  acc_t sum = 0;
  for (; j < n; ++j) sum += v[j] - v[j];
  for (int64_t t = 0; t < L; ++t) sum += vector_sum[t];
  return sum == acc_t(0);
}

// gw[a·gw_stride + q] += Σ_{i<H, j<W} g[i, j] · p[i + a, j + q] for KH kernel rows a and
// KW taps q at once. Input rows are walked once: each vector of p is loaded once for the
// KH rows of g it meets, and each vector of g once for the KW taps (KH·KW independent
// sums keep the FMA units busy). g's rows (stride g_stride, a multiple of kBlock) are
// zero from W on, so with a finite p whole vectors can be summed; `MaskTail` (p holds an
// inf or NaN) keeps lanes from W on out of the sums instead, since 0 · inf is NaN where
// the reference has no product at all.
template <int KH, int KW, bool MaskTail, typename acc_t>
void weight_grad_taps(const acc_t* __restrict__ g, int64_t g_stride, const acc_t* __restrict__ p,
                      int64_t stride, int64_t H, int64_t W, acc_t* __restrict__ gw,
                      int64_t gw_stride) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = kLanes<acc_t>;
  static_assert(kBlock % L == 0, "g's row stride must hold whole vectors");
  const int64_t full = MaskTail ? W / L * L : round_up(W, L);  // columns summed as vectors
  V acc[KH][KW] = {};
  acc_t tail[KH][KW] = {};
  for (int64_t r = 0; r < H + KH - 1; ++r) {  // rows of p; row r meets g's rows r - a
    const acc_t* p_row = p + r * stride;
    const int64_t a0 = std::max<int64_t>(0, r - (H - 1)), a1 = std::min<int64_t>(KH - 1, r);
    for (int64_t j = 0; j < full; j += L) {
      V pv[KW];
      for (int q = 0; q < KW; ++q) pv[q] = *reinterpret_cast<const V*>(p_row + j + q);
      for (int a = 0; a < KH; ++a) {
        if (a < a0 || a > a1) continue;
        const V gv = *reinterpret_cast<const V*>(g + (r - a) * g_stride + j);
        for (int q = 0; q < KW; ++q) acc[a][q] += gv * pv[q];
      }
    }
    for (int64_t j = full; MaskTail && j < W; ++j) {
      for (int64_t a = a0; a <= a1; ++a) {
        for (int q = 0; q < KW; ++q) tail[a][q] += g[(r - a) * g_stride + j] * p_row[j + q];
      }
    }
  }
  for (int a = 0; a < KH; ++a) {
    for (int q = 0; q < KW; ++q) {
      acc_t sum = tail[a][q];
      for (int64_t t = 0; t < L; ++t) sum += acc[a][q][t];
      gw[a * gw_stride + q] += sum;
    }
  }
}

// Taps of one kernel row summed in one pass: KW sums and KW vectors of p in registers.
constexpr int64_t kMaxTapRun = kVectorRegisters >= 32 ? 9 : 6;

// Kernel rows in groups of as many as the registers hold for runs of KW taps: KH·KW sums,
// KW vectors of p and one of g within kVectorRegisters (32 with AVX-512). Faster than one
// row at a time from 5×5 on, slower for 3×3, so runs of up to 3 taps keep one row at a time
// (docs/PERFORMANCE.md).
template <int KW, bool MaskTail, typename acc_t>
void weight_grad_tap_run(const acc_t* g, int64_t g_stride, const acc_t* p, int64_t stride,
                         int64_t Kh, int64_t H, int64_t W, acc_t* gw, int64_t gw_stride) {
  constexpr int64_t kMaxRows =
      KW <= 3 ? 1 : std::clamp<int64_t>((kVectorRegisters - 4 - KW) / KW, 1, 8);
  for (int64_t qi0 = 0; qi0 < Kh;) {
    const int64_t rows = std::min(kMaxRows, Kh - qi0);
    const acc_t* pr = p + qi0 * stride;
    acc_t* out = gw + qi0 * gw_stride;
    switch (rows) {
#define TERMINATOR_ROWS_CASE(N)                                                         \
  case N:                                                                               \
    if constexpr (N <= kMaxRows) {                                                      \
      weight_grad_taps<N, KW, MaskTail>(g, g_stride, pr, stride, H, W, out, gw_stride); \
    }                                                                                   \
    break;
      // clang-format off
      TERMINATOR_ROWS_CASE(1)
      TERMINATOR_ROWS_CASE(2)
      TERMINATOR_ROWS_CASE(3)
      TERMINATOR_ROWS_CASE(4)
      TERMINATOR_ROWS_CASE(5)
      TERMINATOR_ROWS_CASE(6)
      TERMINATOR_ROWS_CASE(7)
      TERMINATOR_ROWS_CASE(8)
      // clang-format on
#undef TERMINATOR_ROWS_CASE
    }
    qi0 += rows;
  }
}

// gw[qi, qj] += Σ_{i<H, j<W} g[i, j] · p[i + qi, j + qj] for a padded plane p, in runs of
// at most kMaxTapRun taps of every kernel row.
template <bool MaskTail, typename acc_t>
void weight_grad_padded(const acc_t* g, int64_t g_stride, const acc_t* p, int64_t stride,
                        int64_t Kh, int64_t Kw, int64_t H, int64_t W, acc_t* gw) {
  for (int64_t q0 = 0; q0 < Kw;) {
    const int64_t n = Kw - q0 > kMaxTapRun ? kMaxTapRun - 1 : Kw - q0;
    switch (n) {
#define TERMINATOR_TAPS_CASE(N)                                                           \
  case N:                                                                                 \
    weight_grad_tap_run<N, MaskTail>(g, g_stride, p + q0, stride, Kh, H, W, gw + q0, Kw); \
    break;
      // clang-format off
      TERMINATOR_TAPS_CASE(1)
      TERMINATOR_TAPS_CASE(2)
      TERMINATOR_TAPS_CASE(3)
      TERMINATOR_TAPS_CASE(4)
      TERMINATOR_TAPS_CASE(5)
      TERMINATOR_TAPS_CASE(6)
      TERMINATOR_TAPS_CASE(7)
      TERMINATOR_TAPS_CASE(8)
      TERMINATOR_TAPS_CASE(9)
      // clang-format on
#undef TERMINATOR_TAPS_CASE
    }
    q0 += n;
  }
}

// sums = the weight gradient of one plane (Kh·Kw values): g's rows `g_stride` apart and
// zero from W on to the next multiple of kBlock, x_pad the padded input plane of
// geometry x_geo. Summed first as whole vectors, whose lanes from W on multiply g's zeros
// by x_pad's values there. That differs from the masked sum only if x_pad holds an inf or
// NaN (0 · inf = NaN), and every value of x_pad meets some g in these sums, so then some
// sum is not finite: only then is x_pad checked (a pass over it per plane, saved
// otherwise) and, if it holds one, the masked sums taken.
template <typename acc_t>
void weight_grad_plane(const acc_t* g, int64_t g_stride, const std::vector<acc_t>& x_pad,
                       const PaddedPlane& x_geo, int64_t Kh, int64_t Kw, int64_t H, int64_t W,
                       acc_t* sums) {
  const int64_t K = Kh * Kw;
  std::fill(sums, sums + K, acc_t(0));
  weight_grad_padded<false, acc_t>(g, g_stride, x_pad.data(), x_geo.stride, Kh, Kw, H, W, sums);
  if (!all_finite(sums, K) && !all_finite(x_pad.data(), int64_t(x_pad.size()))) {
    std::fill(sums, sums + K, acc_t(0));
    weight_grad_padded<true, acc_t>(g, g_stride, x_pad.data(), x_geo.stride, Kh, Kw, H, W, sums);
  }
}

// Tiles of R rows × NV vectors: R·NV sums of the input gradient, R·NV vectors of x, KH·KW
// weight sums and NV vectors of p, within 16 registers for 3×3 with 2 × 1 (14), 32 with
// 4 × 2 (27).
constexpr int kFusedRows = kVectorRegisters >= 32 ? 4 : 2;
constexpr int kFusedVectors = kVectorRegisters >= 32 ? 2 : 1;
// Kernels of one row (1D): 1 × NV tiles, 3·NV + KW registers (21 for 9 taps with NV = 4,
// 15 with NV = 2). With 1 × 2 tiles the 1D one-pass backward was no faster: too few
// independent sums per tile.
constexpr int kFusedRowVectors = kVectorRegisters >= 32 ? 4 : 2;

// One plane of the per-sample backward (correlate_tile WithWeightGrad): the input
// gradient into out, the weight gradient into sums[KH·KW] (the gradient of w, not of
// the flipped kernel). p: grad_y padded for the flipped kernel; x: rows x_stride apart,
// zero from W on. Not inlined: inside the caller's loop GCC spilled the sums.
template <int KH, int KW, typename scalar_t, typename acc_t>
__attribute__((noinline)) void backward_plane_fused(const acc_t* p, int64_t stride, const acc_t* w,
                                                    const acc_t* x, int64_t x_stride, int64_t H,
                                                    int64_t W, scalar_t* out, acc_t* sums) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = kLanes<acc_t>;
  // A kernel of one row shares no loads between rows: tiles of one row, wider.
  constexpr int NV = KH == 1 ? kFusedRowVectors : kFusedVectors;
  constexpr int kRows = KH == 1 ? 1 : kFusedRows;
  const int64_t vectors = (W + L - 1) / L;
  V gw[KH * KW] = {};
  auto row_tiles = [&](int64_t i, auto rows) {
    constexpr int R = decltype(rows)::value;
    int64_t v = 0;
    for (; v + NV <= vectors; v += NV) {
      correlate_tile<R, NV, scalar_t, acc_t, KH, KW, /*WithWeightGrad=*/true>(
          p, stride, w, KH, KW, i, v * L, W, out, x, x_stride, gw);
    }
    for (; v < vectors; ++v) {
      correlate_tile<R, 1, scalar_t, acc_t, KH, KW, /*WithWeightGrad=*/true>(
          p, stride, w, KH, KW, i, v * L, W, out, x, x_stride, gw);
    }
  };
  int64_t i = 0;
  for (; i + kRows <= H; i += kRows) row_tiles(i, std::integral_constant<int, kRows>{});
  for (; i < H; ++i) row_tiles(i, std::integral_constant<int, 1>{});
  // x shifted against p by (qi, qj) is tap (KH - 1 - qi, KW - 1 - qj) of w's gradient.
  for (int q = 0; q < KH * KW; ++q) {
    acc_t sum = 0;
    for (int64_t t = 0; t < L; ++t) sum += gw[q][t];
    sums[KH * KW - 1 - q] = sum;
  }
}

template <int KH, int KW, typename Fn>
bool call_with_size(const Fn& fn) {
  fn(std::integral_constant<int, KH>{}, std::integral_constant<int, KW>{});
  return true;
}

// The kernel sizes whose two gradients are taken in one pass (backward_plane_fused): 3×3,
// and one row (1D) of 3 to 9 taps. Kernels with more taps leave too few registers, next
// to their sums, for tiles that pay for their loads (5×5: 25 sums). Calls
// fn(integral_constant KH, integral_constant KW) for such a size and returns true;
// returns false for any other. The one list of these sizes.
template <typename Fn>
bool with_one_pass_size(int64_t Kh, int64_t Kw, const Fn& fn) {
  if (Kh == 3 && Kw == 3) return call_with_size<3, 3>(fn);
  if (Kh != 1) return false;
  switch (Kw) {
    case 3:
      return call_with_size<1, 3>(fn);
    case 5:
      return call_with_size<1, 5>(fn);
    case 7:
      return call_with_size<1, 7>(fn);
    case 9:
      return call_with_size<1, 9>(fn);
    default:
      return false;
  }
}

bool one_pass_backward(int64_t Kh, int64_t Kw) {
  return with_one_pass_size(Kh, Kw, [](auto, auto) {});
}

// Where the backward keeps one plane: grad_y padded for the flipped kernel (its rows,
// read from (top, left), are zero from W on, as the weight gradient needs), x padded
// for the weight gradient, and for one_pass_backward sizes x in rows zero from W on.
struct BackwardGeometry {
  int64_t H, W, Kh, Kw;
  PaddedPlane g, x, x_rows;
  bool fused;
};

BackwardGeometry backward_geometry(const at::Tensor& x, const at::Tensor& w) {
  const int64_t H = x.size(2), W = x.size(3), Kh = w.size(2), Kw = w.size(3);
  const int64_t ph = same_pad_before(Kh), pw = same_pad_before(Kw);
  return {H,
          W,
          Kh,
          Kw,
          padded_for(H, W, Kh, Kw, Kh - 1 - ph, Kw - 1 - pw),
          padded_for(H, W, Kh, Kw, ph, pw),
          PaddedPlane{H, round_up(W, kBlock), 0, 0},
          one_pass_backward(Kh, Kw)};
}

constexpr int64_t kPageBytes = 4096;

// The backward of 1D planes of up to a page (4 KiB) asks for each plane's grad_y and x
// a page ahead of plane p, up to plane p_end (one past the thread's last): the one-pass
// kernel reads such a plane in a burst that runs into the next page before the hardware
// prefetcher, which stops at page boundaries, has fetched it. Prefetching a page ahead pays
// for such planes only: not for longer ones, whose streams the hardware follows, nor for 2D
// planes, nor in the forward; see docs/PERFORMANCE.md. Always inlined: as a call, GCC took
// it for one without effects and dropped it (no prefetch left in the object code).
template <typename scalar_t>
[[gnu::always_inline]] inline void prefetch_backward_inputs(const BackwardGeometry& geo,
                                                            const scalar_t* gy, const scalar_t* x,
                                                            int64_t p, int64_t p_end) {
  if (geo.H != 1) return;
  const int64_t plane_bytes = geo.W * int64_t(sizeof(scalar_t));
  if (plane_bytes > kPageBytes) return;
  // Bytes [first, last) of each tensor: plane p's, a page on, within the thread's planes.
  const int64_t first = p * plane_bytes + kPageBytes;
  const int64_t last = std::min((p + 1) * plane_bytes + kPageBytes, p_end * plane_bytes);
  const char* g = reinterpret_cast<const char*>(gy);
  const char* xs = reinterpret_cast<const char*>(x);
  for (int64_t at = first; at < last; at += 64) {  // the two tensors alternately
    __builtin_prefetch(g + at, 0, 2);
    __builtin_prefetch(xs + at, 0, 2);
  }
}

// One thread's buffers for backward_plane.
template <typename acc_t>
struct BackwardBuffers {
  std::vector<acc_t> g_pad, x_pad, x_rows;
  explicit BackwardBuffers(const BackwardGeometry& geo)
      : g_pad(padded_buffer<acc_t>(geo.g)),
        x_pad(padded_buffer<acc_t>(geo.x)),
        x_rows(geo.fused ? padded_buffer<acc_t>(geo.x_rows) : std::vector<acc_t>()) {}
};

// The gradients of one plane: its weight gradient into sums[Kh·Kw] and, if gx is given,
// its input gradient. kernel: w's plane flipped, `finite` whether every tap is.
template <typename scalar_t, typename acc_t>
void backward_plane(const scalar_t* gy, const scalar_t* x, const acc_t* kernel, bool finite,
                    const BackwardGeometry& geo, BackwardBuffers<acc_t>& buf, scalar_t* gx,
                    acc_t* sums) {
  const int64_t H = geo.H, W = geo.W, Kh = geo.Kh, Kw = geo.Kw;
  copy_into_padded(gy, H, W, geo.g, buf.g_pad.data());
  bool have_weight_grad = false;
  if (gx != nullptr && geo.fused && finite) {
    copy_into_padded(x, H, W, geo.x_rows, buf.x_rows.data());
    with_one_pass_size(Kh, Kw, [&](auto kh, auto kw) {
      backward_plane_fused<decltype(kh)::value, decltype(kw)::value>(
          buf.g_pad.data(), geo.g.stride, kernel, buf.x_rows.data(), geo.x_rows.stride, H, W, gx,
          sums);
    });
    // Every inf or NaN in x or grad_y makes some of these sums non-finite; the padding
    // then needs the reading of weight_grad_plane (NUMERICS.md).
    have_weight_grad = all_finite(sums, Kh * Kw);
  } else if (gx != nullptr) {
    correlate_plane(buf.g_pad.data(), geo.g, kernel, finite, Kh, Kw, H, W, gx);
  }
  if (!have_weight_grad) {
    copy_into_padded(x, H, W, geo.x, buf.x_pad.data());
    const acc_t* g = buf.g_pad.data() + geo.g.top * geo.g.stride + geo.g.left;
    weight_grad_plane(g, geo.g.stride, buf.x_pad, geo.x, Kh, Kw, H, W, sums);
  }
}

// Weight-gradient sums held at once by a shared kernel's backward: 1 MB of float32.
constexpr int64_t kMaxPlaneSums = int64_t{1} << 18;

// A shared kernel's gradients, plane by plane in memory order as for per-sample kernels
// (both gradients from one padded copy of grad_y), a slab of samples at a time whose
// planes' weight-gradient sums are kept and then added into each channel's sum in batch
// order, in the chunks of shared_batch_chunks, so the result does not depend on the
// thread count. The planes of one channel lie C planes apart; walking them channel by
// channel is slower, even with the next plane prefetched (docs/PERFORMANCE.md).
std::tuple<at::Tensor, at::Tensor> shared_kernel_backward(const at::Tensor& gy, const at::Tensor& x,
                                                          const at::Tensor& w) {
  const auto geo = backward_geometry(x, w);
  auto gx = empty_output_like(gy);
  auto gw = at::empty_like(w);
  const int64_t B = x.size(0), C = x.size(1), N = geo.H * geo.W, K = geo.Kh * geo.Kw;
  if (gw.numel() == 0) return {gx, gw};
  TERMINATOR_DISPATCH_FLOATING(x.scalar_type(), "hyperkernel_conv_direct_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
    std::vector<acc_t> kernels(C * K);  // flipped, one per channel
    std::vector<char> finite(C);
    for (int64_t c = 0; c < C; ++c) {
      finite[c] = load_kernel(wp + c * K, K, /*flip=*/true, kernels.data() + c * K);
    }
    const BatchChunks chunks = shared_batch_chunks(B, C);
    const int64_t slab = std::max<int64_t>(1, kMaxPlaneSums / (C * K));
    std::vector<acc_t> plane_sums(std::min(B, slab) * C * K);
    // [c][chunk][tap], the layout sum_chunks adds up.
    std::vector<acc_t> chunk_sums(C * chunks.count * K, acc_t(0));
    for (int64_t b0 = 0; b0 < B; b0 += slab) {
      const int64_t b1 = std::min(B, b0 + slab);
      at::parallel_for(b0 * C, b1 * C, grain_for(2 * N * K), [&](int64_t p0, int64_t p1) {
        BackwardBuffers<acc_t> buf(geo);
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t c = p % C;
          prefetch_backward_inputs(geo, gyp, xp, p, p1);
          backward_plane(gyp + p * N, xp + p * N, kernels.data() + c * K, finite[c] != 0, geo, buf,
                         gxp + p * N, plane_sums.data() + (p - b0 * C) * K);
        }
      });
      at::parallel_for(0, C, grain_for((b1 - b0) * K), [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t b = b0; b < b1; ++b) {
            acc_t* sum = chunk_sums.data() + (c * chunks.count + b / chunks.size) * K;
            const acc_t* plane = plane_sums.data() + ((b - b0) * C + c) * K;
            for (int64_t q = 0; q < K; ++q) sum[q] += plane[q];
          }
        }
      });
    }
    sum_chunks(chunk_sums.data(), C, chunks.count, K, gwp);
  });
  return {gx, gw};
}

}  // namespace

// Both gradients. Per-sample kernels: one task per plane does both from a single padded
// copy of grad_y (read from memory once, not twice); for one_pass_backward sizes in one
// pass over it.
std::tuple<at::Tensor, at::Tensor> conv_direct_backward(const at::Tensor& gy, const at::Tensor& x,
                                                        const at::Tensor& w) {
  if (w.size(0) == 1) return shared_kernel_backward(gy, x, w);
  const auto geo = backward_geometry(x, w);
  auto gx = empty_output_like(gy);
  auto gw = at::empty_like(w);
  const int64_t B = x.size(0), C = x.size(1), N = geo.H * geo.W, K = geo.Kh * geo.Kw;
  if (gx.numel() == 0) return {gx, gw};
  TERMINATOR_DISPATCH_FLOATING(x.scalar_type(), "hyperkernel_conv_direct_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * C, grain_for(2 * N * K), [&](int64_t p0, int64_t p1) {
      BackwardBuffers<acc_t> buf(geo);
      std::vector<acc_t> kernel(K), sums(K);
      for (int64_t p = p0; p < p1; ++p) {
        const bool finite = load_kernel(wp + p * K, K, /*flip=*/true, kernel.data());
        prefetch_backward_inputs(geo, gyp, xp, p, p1);
        backward_plane(gyp + p * N, xp + p * N, kernel.data(), finite, geo, buf, gxp + p * N,
                       sums.data());
        for (int64_t q = 0; q < K; ++q) gwp[p * K + q] = static_cast<scalar_t>(sums[q]);
      }
    });
  });
  return {gx, gw};
}

}  // namespace cpu
}  // namespace terminator
