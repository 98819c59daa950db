// hyperzzw_global, mode="matmul": y = (k ⊙ z) · x per plane, and its gradients. Planes up
// to kMatmulMaxSide on a side are multiplied from L1/L2-resident copies in acc_t, Ŵ = k ⊙ z
// formed while copying and the gradients' elementwise products done while storing: one pass
// over each tensor where ATen's path (matmul_aten.h, used beyond) makes a pass per product
// and GEMM.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../matmul_aten.h"
#include "kernels.h"
#include "parallel.h"
#include "vec.h"

namespace terminator {
namespace cpu {
namespace {

constexpr int64_t kMatmulMaxSide = 64;

// A square plane of side S stored flat (row i from i·S), as in the tensor, plus one
// vector of slack. The GEMM works in whole vectors per row: when S is not a multiple
// of the vector width, a row's last vector runs on into the next row (or the slack).
// Those lanes are scratch; how the GEMM orders its stores keeps them out of the result.
// Flat copies in and out vectorize without a tail per row; copies into rows padded to
// whole vectors cost more than the products at 28×28 (docs/PERFORMANCE.md).
template <typename acc_t>
struct SquarePlane {
  int64_t S;
  std::vector<acc_t> data;
  explicit SquarePlane(int64_t side) : S(side), data(side * side + kLanes<acc_t>, acc_t(0)) {}
  acc_t* row(int64_t i) { return data.data() + i * S; }
  const acc_t* row(int64_t i) const { return data.data() + i * S; }
};

// Rows [i, i + R), vectors [j, j + NV·L) of c = A · b with A(i, p) = a[i·a_row + p·a_col]
// (A transposed: a_row = 1, a_col = S); b's and c's rows S apart. Stores go row by row
// in increasing order, so lanes that run past a row's end into the next are overwritten
// by that row's own store later (see gemm_plane).
template <int R, int NV, typename acc_t>
void gemm_tile(const acc_t* __restrict__ a, int64_t a_row, int64_t a_col,
               const acc_t* __restrict__ b, int64_t S, int64_t i, int64_t j,
               acc_t* __restrict__ c) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = kLanes<acc_t>;
  // Every loop over r and v unrolled at once, so that the sums are registers from the
  // start: left to GCC, they lived in an array on the stack, zeroed with memset.
  V acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  }
  for (int64_t p = 0; p < S; ++p) {
    V bv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const V*>(b + p * S + j + v * L);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const acc_t av = a[(i + r) * a_row + p * a_col];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(c + (i + r) * S + j + v * L) = acc[r][v];
  }
}

// Rows in one GEMM tile: R × 2 sums, 2 vectors of b and a broadcast of A in registers,
// at most 8 (more were no faster with AVX-512's 32 registers); 6 with 16.
constexpr int64_t kGemmMaxRows = std::min<int64_t>(8, (kVectorRegisters - 3) / 2);

// Rows [i, i + rows) (1 ≤ rows ≤ kGemmMaxRows) of c = A · b, vectors [v, v + 2) (or just
// v, for the last vector of a row with an odd count).
template <typename acc_t>
void gemm_rows(const acc_t* a, int64_t a_row, int64_t a_col, const acc_t* b, int64_t S, int64_t i,
               int64_t rows, int64_t v, bool pair, acc_t* c) {
  constexpr int64_t L = kLanes<acc_t>;
  using Tile =
      void (*)(const acc_t*, int64_t, int64_t, const acc_t*, int64_t, int64_t, int64_t, acc_t*);
  static constexpr Tile pairs[8] = {gemm_tile<1, 2, acc_t>, gemm_tile<2, 2, acc_t>,
                                    gemm_tile<3, 2, acc_t>, gemm_tile<4, 2, acc_t>,
                                    gemm_tile<5, 2, acc_t>, gemm_tile<6, 2, acc_t>,
                                    gemm_tile<7, 2, acc_t>, gemm_tile<8, 2, acc_t>};
  static constexpr Tile singles[8] = {gemm_tile<1, 1, acc_t>, gemm_tile<2, 1, acc_t>,
                                      gemm_tile<3, 1, acc_t>, gemm_tile<4, 1, acc_t>,
                                      gemm_tile<5, 1, acc_t>, gemm_tile<6, 1, acc_t>,
                                      gemm_tile<7, 1, acc_t>, gemm_tile<8, 1, acc_t>};
  (pair ? pairs : singles)[rows - 1](a, a_row, a_col, b, S, i, v * L, c);
}

// c = A · b for S × S planes. A row's last vector spills scratch lanes into the first
// vector of the next row (S > L) or into the rows after it (S ≤ L, one vector per row),
// never further, and the last row's into the slack. Groups of vectors go last-first and
// rows in increasing order within a group, so every row's own store of those columns
// comes after any spill into them.
// Row tiles of up to kGemmMaxRows rows × 2 vectors, the rows split evenly (28 rows as 4 × 7,
// not 3 × 8 + 4): a short tile has too few sums to cover the FMA latency (docs/PERFORMANCE.md).
template <typename acc_t>
void gemm_plane(const acc_t* a, int64_t a_row, int64_t a_col, const SquarePlane<acc_t>& b,
                SquarePlane<acc_t>& c) {
  constexpr int64_t L = kLanes<acc_t>;
  const int64_t S = b.S, vectors = (S + L - 1) / L, tiles = (S + kGemmMaxRows - 1) / kGemmMaxRows;
  for (int64_t v = (vectors - 1) / 2 * 2; v >= 0; v -= 2) {
    for (int64_t t = 0, i = 0; t < tiles; ++t) {
      const int64_t rows = (S - i) / (tiles - t);
      gemm_rows(a, a_row, a_col, b.row(0), S, i, rows, v, vectors - v >= 2, c.row(0));
      i += rows;
    }
  }
}

// Asks for n values at p to be brought into cache (ForWrite: owned, ready to be
// written), a plane ahead, by the matmul kernels: their stores come in a burst after a
// plane's products, each missing the cache on its own, and a shared kernel's gradient
// visits planes (0, c), (1, c), ..., which lie C planes apart, a pattern the hardware
// prefetcher does not follow (docs/PERFORMANCE.md). Planes up to 64×64 (all the matmul
// kernel takes) are prefetched whole. A larger plane's rows are streams long enough for the
// hardware prefetcher, and three whole planes ahead could push the current ones out of L2.
constexpr int64_t kPrefetchMaxValues = 64 * 64;

template <bool ForWrite = false, typename T>
void prefetch(const T* p, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < n; i += kLine) __builtin_prefetch(p + i, ForWrite ? 1 : 0);
}

template <typename scalar_t, typename acc_t>
void load_plane(const scalar_t* __restrict__ src, SquarePlane<acc_t>& dst) {
  convert(src, dst.S * dst.S, dst.row(0));
}

// dst = k ⊙ z
template <typename scalar_t, typename acc_t>
void load_product(const scalar_t* __restrict__ k, const scalar_t* __restrict__ z,
                  SquarePlane<acc_t>& dst) {
  acc_t* __restrict__ out = dst.row(0);
  int64_t e = 0;
  if constexpr (kVectorConversion<scalar_t>) {
    for (constexpr int64_t L = kLanes<float>; e + L <= dst.S * dst.S; e += L) {
      *reinterpret_cast<Vec<float>::type*>(out + e) = load_widened(k + e) * load_widened(z + e);
    }
  }
  for (; e < dst.S * dst.S; ++e) out[e] = acc_t(k[e]) * acc_t(z[e]);
}

// dst = srcᵀ, written row by row (strided reads, contiguous writes: faster than the other
// order, whose strided scalar stores cost as much as a product).
template <typename scalar_t, typename acc_t>
void load_transposed(const scalar_t* __restrict__ src, SquarePlane<acc_t>& dst) {
  const int64_t S = dst.S;
  for (int64_t j = 0; j < S; ++j) {
    acc_t* __restrict__ out = dst.row(j);
    for (int64_t i = 0; i < S; ++i) out[i] = acc_t(src[i * S + j]);
  }
}

template <typename scalar_t, typename acc_t>
void store_plane(const SquarePlane<acc_t>& src, scalar_t* __restrict__ dst) {
  convert(src.row(0), src.S * src.S, dst);
}

// One plane's elementwise gradients from gŴ: gk_sum += gŴ ⊙ z and gz = gŴ ⊙ k, plus gu
// where u is z (gu not null).
template <typename scalar_t, typename acc_t>
void plane_grads(int64_t N, const acc_t* __restrict__ gw, const acc_t* __restrict__ gu,
                 const scalar_t* __restrict__ z, const scalar_t* __restrict__ k,
                 acc_t* __restrict__ gk_sum, scalar_t* __restrict__ gz) {
  int64_t e = 0;
  if constexpr (kVectorConversion<scalar_t>) {
    using V = Vec<float>::type;
    for (constexpr int64_t L = kLanes<float>; e + L <= N; e += L) {
      const V gw_v = *reinterpret_cast<const V*>(gw + e);
      *reinterpret_cast<V*>(gk_sum + e) += gw_v * load_widened(z + e);
      V gz_v = gw_v * load_widened(k + e);
      if (gu != nullptr) {
        // float16: rounded, then added, as its tail below; bfloat16 fused like float.
        if constexpr (kHalfVectors<scalar_t>) in_register<float>(gz_v);
        gz_v += *reinterpret_cast<const V*>(gu + e);
      }
      store_narrowed(gz + e, gz_v);
    }
  }
  for (; e < N; ++e) {
    gk_sum[e] += gw[e] * acc_t(z[e]);
    acc_t gz_e = gw[e] * acc_t(k[e]);
    // float16: the product rounded, then added, as in the vector loop above; GCC fuses the
    // two for the other types.
    if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      if (gu != nullptr) opaque(gz_e);
    }
    gz[e] = static_cast<scalar_t>(gu == nullptr ? gz_e : gz_e + gu[e]);
  }
}

}  // namespace

at::Tensor global_matmul_forward(const at::Tensor& k, const at::Tensor& z, const at::Tensor& x) {
  const int64_t B = z.size(0), C = z.size(1), S = z.size(2);
  if (S > kMatmulMaxSide) return matmul_forward_aten(k, z, x);
  auto y = empty_output_like(z);
  if (y.numel() == 0) return y;
  const bool shared = k.size(0) == 1;
  TERMINATOR_DISPATCH_FLOATING(z.scalar_type(), "global_matmul_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.defined() ? x.const_data_ptr<scalar_t>() : zp;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t N = S * S;
    at::parallel_for(0, B * C, grain_for(N * S), [&](int64_t p0, int64_t p1) {
      SquarePlane<acc_t> w_hat(S), u(S), out(S);
      for (int64_t p = p0; p < p1; ++p) {
        if (p + 1 < p1) {  // the next plane; the output's prefetch is the one that pays
          prefetch(zp + (p + 1) * N, N);
          prefetch(xp + (p + 1) * N, N);
          prefetch</*ForWrite=*/true>(yp + (p + 1) * N, N);
        }
        load_product(kp + (shared ? p % C : p) * N, zp + p * N, w_hat);
        load_plane(xp + p * N, u);
        gemm_plane(w_hat.row(0), S, int64_t(1), u, out);
        store_plane(out, yp + p * N);
      }
    });
  });
  return y;
}

// y = Ŵ · u with Ŵ = k ⊙ z (u = x, or z when x is absent) gives gŴ = gy · uᵀ,
// gu = Ŵᵀ · gy, then gk = gŴ ⊙ z (summed over the batch for a shared k, in batch
// order, so the result is the same for any thread count), gz = gŴ ⊙ k (+ gu when u is z).
std::tuple<at::Tensor, at::Tensor, at::Tensor> global_matmul_backward(const at::Tensor& gy,
                                                                      const at::Tensor& k,
                                                                      const at::Tensor& z,
                                                                      const at::Tensor& x) {
  const int64_t B = z.size(0), C = z.size(1), S = z.size(2);
  if (S > kMatmulMaxSide) return matmul_backward_aten(gy, k, z, x);
  const bool shared = k.size(0) == 1;
  auto gk = empty_output_like(k);
  auto gz = empty_output_like(z);
  auto gx = x.defined() ? empty_output_like(z) : at::Tensor();
  if (gk.numel() == 0) return {gk, gz, gx};
  if (z.numel() == 0) return {gk.zero_(), gz, gx};  // a shared k with B = 0
  TERMINATOR_DISPATCH_FLOATING(z.scalar_type(), "global_matmul_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* up = x.defined() ? x.const_data_ptr<scalar_t>() : zp;
    scalar_t* gkp = gk.mutable_data_ptr<scalar_t>();
    scalar_t* gzp = gz.mutable_data_ptr<scalar_t>();
    scalar_t* gxp = x.defined() ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t N = S * S;
    // A shared kernel's channel c sums planes (0, c), (1, c), ... in that order, in batch
    // chunks when there are few channels (shared_batch_chunks).
    const BatchChunks chunks = shared ? shared_batch_chunks(B, C) : BatchChunks{1, 1};
    const int64_t kernels = shared ? C : B * C;
    std::vector<acc_t> partial(chunks.count > 1 ? kernels * chunks.count * N : 0);
    at::parallel_for(0, kernels * chunks.count, grain_for(chunks.size * N * S),
                     [&](int64_t t0, int64_t t1) {
                       SquarePlane<acc_t> w_hat(S), u_t(S), g(S), g_what(S), g_u(S), g_k(S);
                       for (int64_t task = t0; task < t1; ++task) {
                         const int64_t kk = task / chunks.count, chunk = task % chunks.count;
                         const int64_t b0 = chunk * chunks.size;
                         const int64_t b1 = shared ? std::min(B, b0 + chunks.size) : 1;
                         const scalar_t* __restrict__ k_plane = kp + kk * N;
                         std::fill(g_k.data.begin(), g_k.data.end(), acc_t(0));
                         for (int64_t b = b0; b < b1; ++b) {
                           const int64_t p = shared ? b * C + kk : kk;
                           const scalar_t* __restrict__ z_plane = zp + p * N;
                           // The next plane this thread visits: the next sample's for a shared k,
                           // else the next task's (the next in memory).
                           const int64_t next_plane =
                               shared ? (b + 1 < b1 ? p + C : -1) : (task + 1 < t1 ? p + 1 : -1);
                           if (next_plane >= 0) {
                             const int64_t next = next_plane * N;
                             for (const scalar_t* t : {zp, up, gyp}) prefetch(t + next, N);
                             prefetch</*ForWrite=*/true>(gzp + next, N);
                             if (gxp != nullptr) prefetch</*ForWrite=*/true>(gxp + next, N);
                           }
                           load_product(k_plane, z_plane, w_hat);
                           load_transposed(up + p * N, u_t);
                           load_plane(gyp + p * N, g);
                           gemm_plane(g.row(0), S, int64_t(1), u_t, g_what);  // gy · uᵀ
                           gemm_plane(w_hat.row(0), int64_t(1), S, g, g_u);   // Ŵᵀ · gy
                           plane_grads(N, g_what.row(0), x.defined() ? nullptr : g_u.row(0),
                                       z_plane, k_plane, g_k.row(0), gzp + p * N);
                           if (x.defined()) store_plane(g_u, gxp + p * N);
                         }
                         if (chunks.count == 1) {
                           store_plane(g_k, gkp + kk * N);
                         } else {
                           std::copy(g_k.row(0), g_k.row(0) + N, partial.data() + task * N);
                         }
                       }
                     });
    if (chunks.count > 1) sum_chunks(partial.data(), kernels, chunks.count, N, gkp);
  });
  return {gk, gz, gx};
}

}  // namespace cpu
}  // namespace terminator
