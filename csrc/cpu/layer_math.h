// Building blocks of the network's layer kernels (pointwise.cpp, standardize.cpp, rgu.cpp,
// local_kernel.cpp): elementwise math that GCC vectorizes, channel mixing of one sample's
// (C, N) planes, per-row standardization, and deterministic partial sums over the batch.
// Planes are row-major (rows, N). float and double only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "../common.h"
#include "vec.h"

namespace terminator {
namespace cpu {

// ---- argument checks (the Python wrappers check the same) -------------------------

inline void check_dtype_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                               const char* ref_name) {
  check_defined(t, name);
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the same device as ", ref_name,
                    " (", ref.device(), "), got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), name, " must have the same dtype as ",
                    ref_name, " (", dtype_str(ref.scalar_type()), "), got ",
                    dtype_str(t.scalar_type()));
}

// (B, C, *S) with at least one spatial dim, float32 or float64 (other dtypes run the
// layers' reference compositions).
inline void check_layer_activation(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  TORCH_CHECK_VALUE(t.dim() >= 3, name,
                    " must have shape (B, C, *S) with at least one spatial dim, got ",
                    shape_str(t.sizes()));
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                    " must be float32 or float64 for the fused layer kernels, got ",
                    dtype_str(t.scalar_type()));
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  check_dtype_device(t, name, ref, ref_name);
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ",
                    shape_str(ref.sizes()), ", got ", shape_str(t.sizes()));
}

// ---- elementwise math -----------------------------------------------------------
// float: branch-free approximations (a few ulp; erf as ATen's vectorized CPU erf, within
// 1.5e-7), written once for a float and for a vector register of floats (Vec<float>) so that
// the rows run them a register at a time (map_row): GCC does not reliably vectorize them
// from scalar loops (on some targets its PRE turns the clamps into branches). double: the C
// library.

// Vec<float>'s type without its alignment attribute, which template arguments drop.
typedef float FloatVec __attribute__((vector_size(kVectorBytes)));

// The integer of a float's size, or the vector of them of a float vector's size.
template <typename V>
struct FloatBits {
  using type = int32_t;
};
template <>
struct FloatBits<FloatVec> {
  typedef int32_t type __attribute__((vector_size(kVectorBytes)));
};
template <typename V>
using float_bits_t = typename FloatBits<V>::type;

template <typename V>
inline constexpr bool kFloatLike = std::is_same_v<V, float> || std::is_same_v<V, FloatVec>;

template <typename V>
inline float_bits_t<V> as_bits(V x) {
  return __builtin_bit_cast(float_bits_t<V>, x);
}
template <typename V>
inline V from_bits(float_bits_t<V> i) {
  return __builtin_bit_cast(V, i);
}
// c ? a : b per lane (a scalar c for float); no branch for vectors.
template <typename V>
inline V pick(decltype(V{} < V{}) c, V a, V b) {
  return c ? a : b;
}

template <typename V, std::enable_if_t<kFloatLike<V>, int> = 0>
inline V exp_(V x) {
  const V zero{};
  x = pick<V>(x < zero - 87.33654f, zero - 87.33654f, x);  // std::max, NaN kept
  x = pick<V>(zero + 88.72284f < x, zero + 88.72284f, x);  // std::min
  // x = n·ln2 + r with n an integer: adding 1.5·2^23 rounds to one (no floor, which
  // GCC does not vectorize without -fno-trapping-math), and its low bits are n.
  constexpr float kShift = 12582912.0f;
  const V shifted = x * 1.44269504088896341f + kShift;
  const V n = shifted - kShift;
  const float_bits_t<V> n_bits = as_bits(shifted) - __builtin_bit_cast(int32_t, kShift);
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two parts
  V p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * from_bits<V>((n_bits + 127) << 23);
}
inline double exp_(double x) { return std::exp(x); }

template <typename V, std::enable_if_t<kFloatLike<V>, int> = 0>
inline V erf_(V x) {
  const V a = from_bits<V>(as_bits(x) & 0x7fffffff);  // |x|
  const V t = 1.0f / (1.0f + 0.3275911f * a);
  V p = V{} + 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const V y = 1.0f - p * t * exp_(-a * a);
  return from_bits<V>(as_bits(y) | (as_bits(x) & int32_t(0x80000000)));  // copysign(y, x)
}
inline double erf_(double x) { return std::erf(x); }

// The scalar type of V: T itself, or a float vector's element.
template <typename V>
using scalar_of_t = std::conditional_t<std::is_same_v<V, FloatVec>, float, V>;

// GELU (exact, with erf) and its derivative, as torch.nn.functional.gelu.
template <typename V>
inline V gelu(V x) {
  using T = scalar_of_t<V>;
  return T(0.5) * x * (T(1) + erf_(x * T(M_SQRT1_2)));
}
template <typename V>
inline V gelu_grad(V x) {
  using T = scalar_of_t<V>;
  const V cdf = T(0.5) * (T(1) + erf_(x * T(M_SQRT1_2)));
  const V pdf = exp_(T(-0.5) * x * x) * T(0.5 * M_2_SQRTPI * M_SQRT1_2);
  return cdf + x * pdf;
}

template <typename V>
inline V sigmoid(V x) {
  using T = scalar_of_t<V>;
  return T(1) / (T(1) + exp_(-x));
}

// ---- channel mixing of one sample ------------------------------------------------

// One vector register of T (vec.h), loaded and stored unaligned.
template <typename T>
struct Simd {
  static constexpr int64_t kLanes = cpu::kLanes<T>;
  using type = typename Vec<T>::type;
  static type load(const T* p) { return *reinterpret_cast<const type*>(p); }
  static void store(T* p, type v) { *reinterpret_cast<type*>(p) = v; }
  static type splat(T v) { return v - type{}; }  // v − 0 is v exactly, so this is a broadcast
};

// y[j] = f(a[j]) or f(a[j], b[j]) for j in [0, n), with f generic over a value and a vector
// register: float rows a register at a time, then the tail (and double rows) value by value.
// y may be a or b.
template <typename T, typename F>
inline void map_row(int64_t n, T* y, const T* a, F f) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + Simd<T>::kLanes <= n; j += Simd<T>::kLanes)
      Simd<T>::store(y + j, f(Simd<T>::load(a + j)));
  }
  for (; j < n; ++j) y[j] = f(a[j]);
}
template <typename T, typename F>
inline void map_row(int64_t n, T* y, const T* a, const T* b, F f) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + Simd<T>::kLanes <= n; j += Simd<T>::kLanes)
      Simd<T>::store(y + j, f(Simd<T>::load(a + j), Simd<T>::load(b + j)));
  }
  for (; j < n; ++j) y[j] = f(a[j], b[j]);
}

// Columns [n, n + V·lanes) of y rows [o, o + R) from x with row stride ldx (R ≤ 6, V ≤ 2):
// the register tile of mix.
template <typename T, int R, int V>
__attribute__((always_inline)) inline void mix_tile(const T* __restrict__ w, int64_t ldw,
                                                    const T* __restrict__ b,
                                                    const T* __restrict__ x, int64_t ldx,
                                                    int64_t cin, T* __restrict__ y, int64_t ldy,
                                                    bool accumulate) {
  using S = Simd<T>;
  using Vt = typename S::type;
  constexpr int64_t L = S::kLanes;
  Vt acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = S::splat(b ? b[r] : T(0));
  for (int64_t i = 0; i < cin; ++i) {
    Vt xv[V];
    for (int v = 0; v < V; ++v) xv[v] = S::load(x + i * ldx + v * L);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vt wv = S::splat(w[r * ldw + i]);
      for (int v = 0; v < V; ++v) acc[r][v] += wv * xv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      T* yr = y + r * ldy + v * L;
      S::store(yr, accumulate ? S::load(yr) + acc[r][v] : acc[r][v]);
    }
}

// Rows [o, cout) of a column block, in tiles of 6, 4 and 2 rows, then a last row alone.
template <typename T, int V>
__attribute__((always_inline)) inline void mix_columns(const T* w, int64_t ldw, const T* b,
                                                       const T* x, int64_t ldx, int64_t cin,
                                                       int64_t cout, T* y, int64_t ldy,
                                                       bool accumulate) {
  int64_t o = 0;
  // With 16 vector registers (AVX2) a 6×2 tile keeps 12 sums in flight, enough to cover the
  // multiply-adds' latency (docs/PERFORMANCE.md).
  if constexpr (kVectorRegisters < 32 && V == 2) {
    for (; o + 6 <= cout; o += 6)
      mix_tile<T, 6, V>(w + o * ldw, ldw, b ? b + o : nullptr, x, ldx, cin, y + o * ldy, ldy,
                        accumulate);
  }
  for (; o + 4 <= cout; o += 4)
    mix_tile<T, 4, V>(w + o * ldw, ldw, b ? b + o : nullptr, x, ldx, cin, y + o * ldy, ldy,
                      accumulate);
  for (; o + 2 <= cout; o += 2)
    mix_tile<T, 2, V>(w + o * ldw, ldw, b ? b + o : nullptr, x, ldx, cin, y + o * ldy, ldy,
                      accumulate);
  for (; o < cout; ++o)
    mix_tile<T, 1, V>(w + o * ldw, ldw, b ? b + o : nullptr, x, ldx, cin, y + o * ldy, ldy,
                      accumulate);
}

// y (Cout, N) = w (Cout, Cin) · x (Cin, N) [+ b (Cout)]; with accumulate, y += w·x [+ b].
// ldw is w's row stride (a column slice of a wider matrix has ldw > Cin). Columns go in
// blocks of two vectors, then one, then a last partial vector through a zero-padded copy.
// Products with large matrices (multiply-adds per column) and enough work in all go to
// ATen's BLAS, faster there than the register tiles below; smaller ones are bound by memory
// and by the cost of the call.
constexpr int64_t kBlasMinProduct = 48 * 48, kBlasMinWork = int64_t{1} << 20;
inline bool use_blas(int64_t cin, int64_t cout, int64_t N) {
  return cin * cout >= kBlasMinProduct && cin * cout * N >= kBlasMinWork;
}

template <typename T>
at::Tensor matrix_view(const T* p, int64_t rows, int64_t cols, int64_t row_stride,
                       int64_t col_stride = 1) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {row_stride, col_stride},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

template <typename T>
void mix(const T* __restrict__ w, const T* __restrict__ b, const T* __restrict__ x, int64_t cin,
         int64_t cout, int64_t N, T* __restrict__ y, bool accumulate = false, int64_t ldw = -1) {
  if (ldw < 0) ldw = cin;
  if (use_blas(cin, cout, N)) {
    auto Y = matrix_view(y, cout, N, N);
    const auto W = matrix_view(w, cout, cin, ldw), X = matrix_view(x, cin, N, N);
    if (b) {
      const auto bias = matrix_view(b, cout, N, 1, 0);
      if (accumulate)
        Y.add_(bias);
      else
        Y.copy_(bias);
      Y.addmm_(W, X);
    } else if (accumulate) {
      Y.addmm_(W, X);
    } else {
      at::mm_out(Y, W, X);
    }
    return;
  }
  constexpr int64_t L = Simd<T>::kLanes;
  int64_t n = 0;
  for (; n + 2 * L <= N; n += 2 * L)
    mix_columns<T, 2>(w, ldw, b, x + n, N, cin, cout, y + n, N, accumulate);
  for (; n + L <= N; n += L)
    mix_columns<T, 1>(w, ldw, b, x + n, N, cin, cout, y + n, N, accumulate);
  const int64_t rest = N - n;
  if (rest == 0) return;
  thread_local std::vector<T> xt, yt;  // reused: this runs once per call of mix
  xt.assign(cin * L, T(0));
  yt.assign(cout * L, T(0));
  for (int64_t i = 0; i < cin; ++i) std::memcpy(&xt[i * L], x + i * N + n, rest * sizeof(T));
  if (accumulate)
    for (int64_t o = 0; o < cout; ++o) std::memcpy(&yt[o * L], y + o * N + n, rest * sizeof(T));
  mix_columns<T, 1>(w, ldw, b, xt.data(), L, cin, cout, yt.data(), L, accumulate);
  for (int64_t o = 0; o < cout; ++o) std::memcpy(y + o * N + n, &yt[o * L], rest * sizeof(T));
}

// Sum of a vector's lanes, in lane order.
template <typename T>
inline T lane_sum(typename Simd<T>::type v) {
  T s = 0;
  for (int64_t l = 0; l < Simd<T>::kLanes; ++l) s += v[l];
  return s;
}

// gw[o0..o0+R, i0..i0+Q] += Σ_n gy[o, n]·x[i, n]: R·Q sums in vectors over n, then the tail.
template <typename T, int R, int Q>
__attribute__((always_inline)) inline void weight_grad_tile(const T* __restrict__ gy,
                                                            const T* __restrict__ x, int64_t N,
                                                            T* __restrict__ gw, int64_t ldw) {
  using S = Simd<T>;
  using Vt = typename S::type;
  constexpr int64_t L = S::kLanes;
  Vt acc[R][Q];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < Q; ++q) acc[r][q] = S::splat(T(0));
  int64_t n = 0;
  for (; n + L <= N; n += L) {
    Vt xv[Q];
    for (int q = 0; q < Q; ++q) xv[q] = S::load(x + q * N + n);
    for (int r = 0; r < R; ++r) {
      const Vt g = S::load(gy + r * N + n);
      for (int q = 0; q < Q; ++q) acc[r][q] += g * xv[q];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < Q; ++q) {
      T s = lane_sum<T>(acc[r][q]);
      for (int64_t m = n; m < N; ++m) s += gy[r * N + m] * x[q * N + m];
      gw[r * ldw + q] += s;
    }
}

// gw (Cout, Cin) += gy (Cout, N) · x (Cin, N)ᵀ; gb (Cout) += row sums of gy (if gb).
template <typename T>
void accumulate_weight_grad(const T* __restrict__ gy, const T* __restrict__ x, int64_t cin,
                            int64_t cout, int64_t N, T* __restrict__ gw, T* __restrict__ gb,
                            int64_t ldw = -1) {
  if (ldw < 0) ldw = cin;
  int64_t o = 0;
  if (use_blas(cin, cout, N)) {
    matrix_view(gw, cout, cin, ldw)
        .addmm_(matrix_view(gy, cout, N, N), matrix_view(x, N, cin, 1, N));
    o = cout;  // only the bias sums below
  }
  for (; o + 4 <= cout; o += 4) {
    int64_t i = 0;
    for (; i + 2 <= cin; i += 2)
      weight_grad_tile<T, 4, 2>(gy + o * N, x + i * N, N, gw + o * ldw + i, ldw);
    for (; i < cin; ++i) weight_grad_tile<T, 4, 1>(gy + o * N, x + i * N, N, gw + o * ldw + i, ldw);
  }
  for (; o < cout; ++o) {
    int64_t i = 0;
    for (; i + 2 <= cin; i += 2)
      weight_grad_tile<T, 1, 2>(gy + o * N, x + i * N, N, gw + o * ldw + i, ldw);
    for (; i < cin; ++i) weight_grad_tile<T, 1, 1>(gy + o * N, x + i * N, N, gw + o * ldw + i, ldw);
  }
  if (gb) {
    using S = Simd<T>;
    constexpr int64_t L = S::kLanes;
    for (int64_t r = 0; r < cout; ++r) {
      const T* g = gy + r * N;
      auto acc = S::splat(T(0));
      int64_t n = 0;
      for (; n + L <= N; n += L) acc += S::load(g + n);
      T s = lane_sum<T>(acc);
      for (; n < N; ++n) s += g[n];
      gb[r] += s;
    }
  }
}

// wt (Cin, Cout) = w (Cout, Cin)ᵀ, to mix gradients back: gx = wᵀ·gy.
template <typename T>
std::vector<T> transposed(const T* w, int64_t cout, int64_t cin, int64_t ldw = -1) {
  if (ldw < 0) ldw = cin;
  std::vector<T> wt(cout * cin);
  for (int64_t o = 0; o < cout; ++o)
    for (int64_t i = 0; i < cin; ++i) wt[i * cout + o] = w[o * ldw + i];
  return wt;
}

// A std::vector whose resize leaves new values uninitialized: scratch planes that are
// written before they are read skip the zero fill.
template <typename T>
struct DefaultInit : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = DefaultInit<U>;
  };
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... A>
  void construct(U* p, A&&... a) {
    ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
};
template <typename T>
using Scratch = std::vector<T, DefaultInit<T>>;

// ---- deterministic batch reductions ----------------------------------------------
// Work is cut into fixed chunks of samples (independent of the thread count); each chunk
// sums into its own slot, and the slots are added in order afterwards, so results do not
// depend on the thread count.

struct Chunks {
  int64_t count, size;
};

inline Chunks sample_chunks(int64_t B) {  // at most 16 chunks
  const int64_t size = std::max<int64_t>(1, (B + 15) / 16);
  return {(B + size - 1) / size, size};
}

// Chunks of samples that run as one block plane (C, nb·N), the samples' planes side by
// side: about min_columns columns or more each, equal in size and, where the batch allows, a
// multiple of 4 in number, so that 1, 2 or 4 threads get the same work; fixed by B and N only.
inline Chunks block_chunks(int64_t B, int64_t N, int64_t min_columns = 256) {
  int64_t count = std::max<int64_t>(1, B * N / std::max<int64_t>(1, min_columns));
  count = std::min<int64_t>((count + 3) / 4 * 4, std::max<int64_t>(1, B));
  const int64_t size = (B + count - 1) / count;
  return {(B + size - 1) / size, size};
}

// planes (nb, C, N) ↔ a block plane (C, nb·N).
template <typename T>
void to_block(const T* planes, int64_t nb, int64_t C, int64_t N, T* block) {
  for (int64_t j = 0; j < nb; ++j)
    for (int64_t c = 0; c < C; ++c)
      std::memcpy(block + c * nb * N + j * N, planes + (j * C + c) * N, N * sizeof(T));
}
template <typename T>
void from_block(const T* block, int64_t nb, int64_t C, int64_t N, T* planes) {
  for (int64_t j = 0; j < nb; ++j)
    for (int64_t c = 0; c < C; ++c)
      std::memcpy(planes + (j * C + c) * N, block + c * nb * N + j * N, N * sizeof(T));
}

// Samples whose planes of N columns run side by side as one block: enough for 256 columns.
inline int64_t block_samples(int64_t N) {
  return std::max<int64_t>(1, (256 + N - 1) / std::max<int64_t>(1, N));
}

// Samples per block when a chunk of `samples` samples is cut into equal blocks of about
// block_samples(N) (a leftover block of one short plane runs at a fraction of the speed).
inline int64_t equal_block_samples(int64_t samples, int64_t N) {
  const int64_t blocks = std::max<int64_t>(1, samples / block_samples(N));
  return (samples + blocks - 1) / blocks;
}

// fn(chunk, b0, b1) for every chunk, in parallel.
template <class Fn>
void for_each_chunk(const Chunks& ch, int64_t B, const Fn& fn) {
  at::parallel_for(0, ch.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(c, c * ch.size, std::min(B, (c + 1) * ch.size));
  });
}

// Sums slots (count, n) into out (n), in slot order.
template <typename T>
void sum_slots(const std::vector<T>& slots, int64_t count, int64_t n, T* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = T(0);
  for (int64_t c = 0; c < count; ++c)
    for (int64_t j = 0; j < n; ++j) out[j] += slots[c * n + j];
}

// ---- instance standardization of one plane ---------------------------------------
// y = (x - mean) · rstd over N values; returns rstd. Biased variance, as instance_norm.

template <typename T>
T standardize_row(const T* x, int64_t N, T eps, T* y, T* mean_out = nullptr) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t n = 0; n < N; ++n) s += x[n];
  const T mean = s / T(N);
  if (mean_out) *mean_out = mean;
  T v = 0;
#pragma omp simd reduction(+ : v)
  for (int64_t n = 0; n < N; ++n) v += (x[n] - mean) * (x[n] - mean);
  const T rstd = T(1) / std::sqrt(v / T(N) + eps);
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) y[n] = (x[n] - mean) * rstd;
  return rstd;
}

// Gradient through y = standardize(x): gx = rstd·(gy − mean(gy) − y·mean(gy·y)).
template <typename T>
void standardize_row_backward(const T* gy, const T* __restrict__ y, T rstd, int64_t N, T* gx) {
  T sg = 0, sgy = 0;
#pragma omp simd reduction(+ : sg, sgy)
  for (int64_t n = 0; n < N; ++n) {
    sg += gy[n];
    sgy += gy[n] * y[n];
  }
  const T mg = sg / T(N), mgy = sgy / T(N);
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) gx[n] = rstd * (gy[n] - mg - y[n] * mgy);
}

}  // namespace cpu
}  // namespace terminator
