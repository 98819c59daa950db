// Depthwise "same" cross-correlation, direct: the padded planes and register tiles shared by
// the forward (conv_direct.cpp) and the backward (conv_direct_backward.cpp). Each plane is
// first copied, in the accumulation type, into a zero-padded buffer, so the inner loops have
// no bounds and convert nothing: outputs are computed a tile of vectors at a time in
// registers, over every kernel tap.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace terminator {
namespace cpu {

inline constexpr int64_t kBlock = 16;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A plane (H, W) inside a zeroed buffer of `rows` rows and `stride` columns, at (top, left).
struct PaddedPlane {
  int64_t rows, stride, top, left;
};

// Room for a kernel of (Kh, Kw) around an (H, W) plane plus a block of slack per row.
inline PaddedPlane padded_for(int64_t H, int64_t W, int64_t Kh, int64_t Kw, int64_t top,
                              int64_t left) {
  return {H + Kh - 1, round_up(W + Kw - 1, kBlock) + kBlock, top, left};
}

// Copies an (H, W) plane, converted to acc_t, into its place in a padded buffer whose
// border was zeroed once (only the interior is ever written).
template <typename scalar_t, typename acc_t>
void copy_into_padded(const scalar_t* __restrict__ in, int64_t H, int64_t W, const PaddedPlane& g,
                      acc_t* __restrict__ out) {
  for (int64_t i = 0; i < H; ++i) convert(in + i * W, W, out + (i + g.top) * g.stride + g.left);
}

// A zeroed buffer for planes of geometry g.
template <typename acc_t>
std::vector<acc_t> padded_buffer(const PaddedPlane& g) {
  return std::vector<acc_t>(g.rows * g.stride, acc_t(0));
}

// Stores rows [i, i + R), columns [j, min(j + NV·L, W)) of out (rows W apart) from the
// tile's sums; columns from W on were computed from padding and are not stored.
template <int R, int NV, typename acc_t, typename scalar_t>
inline void store_tile(const typename Vec<acc_t>::type (&acc)[R][NV], int64_t i, int64_t j,
                       int64_t W, scalar_t* __restrict__ out) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = kLanes<acc_t>;
  const int64_t n = std::min<int64_t>(NV * L, W - j);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    scalar_t* o = out + (i + r) * W + j;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const int64_t m = std::min<int64_t>(L, n - v * L);  // columns of this vector to store
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (m == L) {
          *reinterpret_cast<V*>(o + v * L) = acc[r][v];
        } else if (m > 0) {
          store_first_lanes(o + v * L, acc[r][v], m);
        }
        continue;
      }
      if constexpr (kVectorConversion<scalar_t> && std::is_same_v<acc_t, float>) {
        if (m > 0) store_bits(o + v * L, narrow_bits<scalar_t>(acc[r][v]), m);
        continue;
      }
      for (int64_t t = 0; t < m; ++t) o[v * L + t] = static_cast<scalar_t>(acc[r][v][t]);
    }
  }
}

// Rows [i, i + R) and columns [j, j + NV·L) of out[i, j] = Σ_{qi, qj} w[qi, qj] ·
// p[i + qi, j + qj] for a padded plane p: R·NV vector sums side by side (independent
// chains hide the FMA latency). Each vector of p is loaded once for every output row it
// meets (row s of p serves rows s - qi), rather than once per tap and row: the loads are
// unaligned, most of them split over two cache lines, and are the bottleneck
// (docs/PERFORMANCE.md). Each sum still adds its taps in (qi, qj) order. Columns from W on
// are computed from the padding and not stored. KH, KW > 0 fix the kernel's size at compile
// time (else Kh, Kw).
//
// WithWeightGrad (a fixed size; the per-sample backward in one pass over grad_y, p being
// grad_y padded and w the flipped kernel): from the same loads of p, also the weight
// gradient's partial sums gw[qi·KW + qj] += x[i + r, j + ...] · p[i + r + qi, j + qj + ...]
// (x's rows x_stride apart, zero from W on), where the separate weight-gradient pass
// (weight_grad_plane) loads p again, unaligned, for every tap (docs/PERFORMANCE.md).
template <int R, int NV, typename scalar_t, typename acc_t, int KH = 0, int KW = 0,
          bool WithWeightGrad = false>
void correlate_tile(const acc_t* __restrict__ p, int64_t stride, const acc_t* __restrict__ w,
                    int64_t Kh_, int64_t Kw_, int64_t i, int64_t j, int64_t W,
                    scalar_t* __restrict__ out, const acc_t* __restrict__ x = nullptr,
                    int64_t x_stride = 0, typename Vec<acc_t>::type* __restrict__ gw = nullptr) {
  static_assert(!WithWeightGrad || (KH > 0 && KW > 0), "the one-pass backward has a fixed size");
  const int64_t Kh = KH > 0 ? KH : Kh_, Kw = KW > 0 ? KW : Kw_;
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = kLanes<acc_t>;
  V acc[R][NV] = {};
  V xv[R][NV];  // x's vectors under the tile (WithWeightGrad only)
  if constexpr (WithWeightGrad) {
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < NV; ++v) {
        xv[r][v] = *reinterpret_cast<const V*>(x + (i + r) * x_stride + j + v * L);
      }
    }
  }
  // Row s of p, shifted by qj, for every output row r it serves (tap (s - r, qj)).
  // always_inline: inlined later, with the weight sums, the 3×3 backward spilled vectors to
  // the stack that the same loop written out keeps in registers.
  auto tap = [&](int64_t s, int64_t qj) __attribute__((always_inline)) {
    const acc_t* row = p + (i + s) * stride + j + qj;
    V pv[NV];
    for (int v = 0; v < NV; ++v) {
      pv[v] = *reinterpret_cast<const V*>(row + v * L);
      // Feeds up to 2·min(R, KH) FMAs here; GCC would fold it into each as a memory operand.
      if constexpr (WithWeightGrad) in_register<acc_t>(pv[v]);
    }
    for (int r = 0; r < R; ++r) {
      if (s - r < 0 || s - r >= Kh) continue;
      const acc_t wv = w[(s - r) * Kw + qj];
      for (int v = 0; v < NV; ++v) {
        acc[r][v] += wv * pv[v];
        if constexpr (WithWeightGrad) gw[(s - r) * Kw + qj] += xv[r][v] * pv[v];
      }
    }
  };
  if constexpr (R == 1 && !WithWeightGrad) {
    for (int64_t s = 0; s < Kh; ++s) {
      for (int64_t qj = 0; qj < Kw; ++qj) tap(s, qj);
    }
  } else {
    // Unrolled, so the accumulators stay in registers (rolled, GCC keeps them on the stack)
    // and, for a fixed kernel size, every test on r is decided at compile time. Not for the
    // forward's single-row tiles (R = 1: 1D planes, a 2D plane's last H mod 4 rows): slower
    // on AVX2 for 1D (docs/PERFORMANCE.md).
#pragma GCC unroll 16
    for (int64_t s = 0; s < R + Kh - 1; ++s) {
#pragma GCC unroll 16
      for (int64_t qj = 0; qj < Kw; ++qj) tap(s, qj);
    }
  }
  store_tile<R, NV, acc_t>(acc, i, j, W, out);
}

// out[i, j] = Σ_{qi, qj} w[qi, qj] · p[i + qi, j + qj] for a padded plane p (row stride
// at least round_up(W, L) + Kw - 1): 4 rows × 2 vectors per tile where there are 4 rows,
// single rows up to 8 vectors wide (1D planes) elsewhere.
template <typename scalar_t, typename acc_t, int KH = 0, int KW = 0>
void correlate_padded(const acc_t* p, int64_t stride, const acc_t* w, int64_t Kh, int64_t Kw,
                      int64_t H, int64_t W, scalar_t* out) {
  constexpr int64_t L = kLanes<acc_t>;
  const int64_t vectors = (W + L - 1) / L;
  int64_t i = 0;
  for (; i + 4 <= H; i += 4) {
    for (int64_t v = 0; v < vectors; v += 2) {
      if (vectors - v >= 2) {
        correlate_tile<4, 2, scalar_t, acc_t, KH, KW>(p, stride, w, Kh, Kw, i, v * L, W, out);
      } else {
        correlate_tile<4, 1, scalar_t, acc_t, KH, KW>(p, stride, w, Kh, Kw, i, v * L, W, out);
      }
    }
  }
  for (; i < H; ++i) {
    for (int64_t v = 0; v < vectors; v += 8) {
      decltype(&correlate_tile<1, 1, scalar_t, acc_t>) tile = nullptr;
      switch (std::min<int64_t>(8, vectors - v)) {
#define TERMINATOR_ROW_CASE(N)                    \
  case N:                                         \
    tile = correlate_tile<1, N, scalar_t, acc_t>; \
    break;
        // clang-format off
        TERMINATOR_ROW_CASE(1)
        TERMINATOR_ROW_CASE(2)
        TERMINATOR_ROW_CASE(3)
        TERMINATOR_ROW_CASE(4)
        TERMINATOR_ROW_CASE(5)
        TERMINATOR_ROW_CASE(6)
        TERMINATOR_ROW_CASE(7)
        TERMINATOR_ROW_CASE(8)
        // clang-format on
#undef TERMINATOR_ROW_CASE
      }
      tile(p, stride, w, Kh, Kw, i, v * L, W, out, nullptr, 0, nullptr);
    }
  }
}

// The same sum over only the taps that meet the plane itself, for a kernel with a NaN or
// Inf: "zero outside the input" then has two readings, and this is the one that skips the
// taps hanging over the border (multiplying them by the padding gives 0 · inf = NaN, as
// F.conv's explicit padding does; docs/NUMERICS.md allows either). Rare, so plain loops.
template <typename scalar_t, typename acc_t>
void correlate_valid_taps(const acc_t* p, const PaddedPlane& g, const acc_t* w, int64_t Kh,
                          int64_t Kw, int64_t H, int64_t W, scalar_t* out) {
  for (int64_t i = 0; i < H; ++i) {
    for (int64_t j = 0; j < W; ++j) {
      acc_t acc = 0;
      for (int64_t qi = 0; qi < Kh; ++qi) {
        const int64_t r = i + qi - g.top;
        if (r < 0 || r >= H) continue;
        for (int64_t qj = 0; qj < Kw; ++qj) {
          const int64_t c = j + qj - g.left;
          if (c < 0 || c >= W) continue;
          acc += w[qi * Kw + qj] * p[(i + qi) * g.stride + j + qj];
        }
      }
      out[i * W + j] = static_cast<scalar_t>(acc);
    }
  }
}

// Reads kernel plane w (K taps, reversed with `flip`) into `kernel` in acc_t; returns
// whether every tap is finite.
template <typename scalar_t, typename acc_t>
bool load_kernel(const scalar_t* w, int64_t K, bool flip, acc_t* kernel) {
  bool finite = true;
  for (int64_t q = 0; q < K; ++q) {
    kernel[q] = acc_t(w[flip ? K - 1 - q : q]);
    finite = finite && std::isfinite(kernel[q]);
  }
  return finite;
}

// One output plane from a padded input plane; a kernel with an inf or NaN tap takes
// the loop that skips the taps over the padding.
template <typename scalar_t, typename acc_t>
void correlate_plane(const acc_t* padded, const PaddedPlane& geo, const acc_t* kernel, bool finite,
                     int64_t Kh, int64_t Kw, int64_t H, int64_t W, scalar_t* out) {
  if (finite && Kh == 3 && Kw == 3) {  // fully unrolled; 5×5 and 7×7 were slower that way
    correlate_padded<scalar_t, acc_t, 3, 3>(padded, geo.stride, kernel, Kh, Kw, H, W, out);
  } else if (finite) {
    correlate_padded(padded, geo.stride, kernel, Kh, Kw, H, W, out);
  } else {
    correlate_valid_taps(padded, geo, kernel, Kh, Kw, H, W, out);
  }
}

}  // namespace cpu
}  // namespace terminator
