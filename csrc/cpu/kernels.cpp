// CPU kernels: ATen's parallel_for over planes or column chunks, accumulation in
// at::opmath_type (float for float16/bfloat16), fixed summation order so results
// are deterministic for any thread count.
#include "../ops_impl.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__SSE2__) || defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

// The finiteness checks (all_finite, load_kernel) need IEEE semantics.
#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
#error "csrc/cpu/kernels.cpp must not be built with -ffast-math or -ffinite-math-only"
#endif

namespace terminator {
namespace cpu {
namespace {

// Enough work per task to amortize scheduling (elements or multiply-adds).
constexpr int64_t kGrainWork = 32768;
// Columns processed together while accumulating over the batch: 8192 (32 KB of float
// sums) rather than 1024 gives each sample's rows longer streams for the prefetcher (dot
// backward at B=64, C=36, L=4096: 20.9 -> 19.4 ms, mean of three alternating processes).
constexpr int64_t kColumnChunk = 8192;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, work_per_item));
}

// A shared kernel's gradient sums each channel over the batch, in batch order, one task
// per channel. With fewer channels than kMinKernelTasks the batch is also cut into chunks
// of at least kMinChunkSamples: each chunk is summed by one task and the chunks are added
// in order afterwards, so C·chunks tasks keep the threads busy (with C = 1 one thread did
// all the work). The count depends on B and C only, never on the thread count, so the
// results do not either; with C ≥ kMinKernelTasks there is one chunk, as before.
constexpr int64_t kMinKernelTasks = 32, kMinChunkSamples = 4;

struct BatchChunks {
  int64_t count, size;  // chunk q covers samples [q·size, min(B, (q + 1)·size))
};

BatchChunks shared_batch_chunks(int64_t B, int64_t C) {
  if (C >= kMinKernelTasks || B < 2 * kMinChunkSamples) return {1, B};
  const int64_t wanted = std::min((kMinKernelTasks + C - 1) / C, B / kMinChunkSamples);
  const int64_t size = (B + wanted - 1) / wanted;
  return {(B + size - 1) / size, size};
}

// Calls fn(row, i0, i1) for each piece of the flat range [begin, end) of a
// (rows, cols) matrix that lies inside one row.
template <class Fn>
void for_each_row_piece(int64_t begin, int64_t end, int64_t cols, const Fn& fn) {
  while (begin < end) {
    const int64_t row = begin / cols, i0 = begin % cols;
    const int64_t i1 = std::min(cols, i0 + (end - begin));
    fn(row, i0, i1);
    begin += i1 - i0;
  }
}

// A new contiguous output shaped like `like`. glibc serves 32 MiB or more (its largest
// mmap threshold) from a fresh mapping unless a free heap chunk is big enough, and a
// fresh mapping's first touch faults in 4 KiB pages: at B=64, C=36, L=4096 (38 MB per
// tensor) those faults cost more than dot's arithmetic. Advising transparent huge pages
// on the 2 MiB-aligned interior before anything writes it makes one fault of 512 (a
// 38 MB copy into a fresh tensor: 5.9 -> 2.2 ms; into a reused one: 1.2 ms); on memory
// already resident it changes nothing. Every caller writes all of its output, so nothing
// is committed that would not be anyway. Advice only: a no-op where THP is off, errors
// ignored.
at::Tensor empty_output_like(const at::Tensor& like) {
  auto out = at::empty_like(like, at::MemoryFormat::Contiguous);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const uintptr_t bytes = out.nbytes();
  if (bytes >= (uintptr_t{32} << 20)) {
    const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

#define TERMINATOR_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// ---- vectors -----------------------------------------------------------------

// The target's widest vector registers, and how many there are; the register blockings
// below (tiles, kernel-row groups, tap runs) are sized from the count. A GCC/Clang vector
// wider than the hardware's is lowered through the stack in 16-byte pieces: built for
// AVX2 (-march=znver3) with 64-byte vectors, matmul forward+backward at B=64, C=36, 28×28
// took 55.9 ms and the per-sample 7×7 convolution 34.3 ms; with 32-byte ones 3.5 and
// 5.6 ms (docs/PERFORMANCE.md).
#if defined(__AVX512F__)
constexpr int64_t kVectorBytes = 64, kVectorRegisters = 32;
#elif defined(__AVX__)
constexpr int64_t kVectorBytes = 32, kVectorRegisters = 16;
#elif defined(__aarch64__)
constexpr int64_t kVectorBytes = 16, kVectorRegisters = 32;  // NEON
#else
constexpr int64_t kVectorBytes = 16, kVectorRegisters = 16;  // SSE2, and anything else
#endif

// One vector register of acc_t as a GCC/Clang vector. The weight gradient's loops left
// to the auto-vectorizer ran at 4.6 GMAC/s per core here; written with this, 40-53.
// GCC gives a vector type its element type's alias set, so the casts between acc_t*
// and vector* below are well-defined there.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(kVectorBytes), aligned(alignof(float))));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(kVectorBytes), aligned(alignof(double))));
};
// Values of T in one Vec.
template <typename T>
constexpr int64_t kLanes = sizeof(typename Vec<T>::type) / sizeof(T);

// dst[0, m) = v[0, m) for 0 < m < kLanes: one masked store where the target has them. A
// plain loop here becomes `rep movs` from a stack copy of v, whose start-up took a third
// of the direct 3×3 correlation's time at 28×28 (rows of 16 + 12 floats).
template <typename T>
inline void store_first_lanes(T* dst, typename Vec<T>::type v, int64_t m) {
  // The casts reinterpret v's bits as the intrinsic's type (a value cast: that type is
  // aligned to its size, v's type only to T's).
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << m) - 1), (__m512)v);
  } else {
    _mm512_mask_storeu_pd(dst, static_cast<__mmask8>((1u << m) - 1), (__m512d)v);
  }
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_ps(dst, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(m)), lanes), (__m256)v);
  } else {
    const __m256i lanes = _mm256_setr_epi64x(0, 1, 2, 3);
    _mm256_maskstore_pd(dst, _mm256_cmpgt_epi64(_mm256_set1_epi64x(m), lanes), (__m256d)v);
  }
#else
  for (int64_t t = 0; t < m; ++t) dst[t] = v[t];
#endif
}

// Makes the compiler hold v in a register from here on. A vector loaded once and used by
// several multiply-adds is otherwise folded into each as a memory operand: loaded again
// for every use. It also keeps a product from being fused into a later addition.
template <typename acc_t>  // (not deduced: a deduced type would drop Vec's reduced alignment)
inline void in_register(typename Vec<acc_t>::type& v) {
#if defined(__SSE2__)
  asm("" : "+v"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
}

// Makes the compiler treat v as an unknown value from here on (nothing fused into what
// follows).
inline void opaque(float& v) {
#if defined(__SSE2__)
  asm("" : "+x"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
}

// float16 and bfloat16 as vectors of float (load_widened, store_narrowed). c10::Half
// converts one value per instruction (_cvtsh_ss, _cvtss_sh with F16C) in loops GCC does
// not vectorize: dot, which does little else, ran at half the eager reference's speed in
// float16 (B=64, C=36, 28×28, forward + backward 2.2 ms against 1.0). With F16C a whole
// Vec converts in one instruction, the same hardware conversion (round to nearest even),
// so results are bitwise the same. bfloat16 is a float's upper half: exact to widen, and
// narrowed with c10's rounding (narrow_bits).
// A Vec of float narrowed to 16-bit values: their bits, one lane each.
typedef uint16_t Bits16 __attribute__((vector_size(kVectorBytes / 2)));
// The same lanes at 32 bits: a Vec of float's bits.
typedef uint32_t Bits32 __attribute__((vector_size(kVectorBytes)));

#if defined(__F16C__) && defined(__AVX__)  // (AVX-512 implies AVX)
template <typename scalar_t>
constexpr bool kHalfVectors = std::is_same_v<scalar_t, c10::Half>;

inline Bits16 half_bits(Vec<float>::type v) {
#if defined(__AVX512F__)
  return (Bits16)_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT);
#else
  return (Bits16)_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT);
#endif
}

inline Vec<float>::type load_half(const c10::Half* p) {
#if defined(__AVX512F__)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (Vec<float>::type)_mm512_cvtph_ps(h);
#else
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (Vec<float>::type)_mm256_cvtph_ps(h);
#endif
}
#else
template <typename scalar_t>
constexpr bool kHalfVectors = false;
// Never called where kHalfVectors is false.
inline Bits16 half_bits(Vec<float>::type);
inline Vec<float>::type load_half(const c10::Half*);
#endif

// Whether scalar_t converts to and from float a Vec at a time (narrow_bits, load_widened).
template <typename scalar_t>
constexpr bool kVectorConversion = kHalfVectors<scalar_t> || std::is_same_v<scalar_t, c10::BFloat16>;

// Narrowing a Vec at a time, for the direct convolution's stores (store_tile) and
// convert. Value by value before: A/B at B=64, C=36, 28×28, cold, float16 3×3 forward
// 0.63 -> 0.27 ms, backward 1.02 -> 0.59; bfloat16 0.50 -> 0.39, 0.81 -> 0.72; 7×7
// 10-30 % faster; bitwise the same.
// bfloat16: rounded to nearest even, NaN as 0x7FC0, as c10's round_to_nearest_even;
// float16: the F16C conversion (half_bits).
template <typename scalar_t>
inline Bits16 narrow_bits(Vec<float>::type v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const Bits32 u = (Bits32)v;
    const Bits32 nan = (Bits32)(v != v);  // all ones where v is NaN
    const Bits32 rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    return __builtin_convertvector((rounded & ~nan) | (nan & 0x7FC0u), Bits16);
  } else {
    return half_bits(v);
  }
}

// kLanes<float> values of scalar_t as a Vec of float: bfloat16 exactly (its bits are a
// float's upper half), float16 by F16C as load_half. Intrinsics on x86: GCC lowers the
// generic __builtin_convertvector to AVX-512 in two 256-bit halves, which made the
// bfloat16 matmul forward slower than GCC's own vectorization of the scalar loop.
template <typename scalar_t>
inline Vec<float>::type load_widened(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
#if defined(__AVX512F__)
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return (Vec<float>::type)_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16);
#elif defined(__AVX2__)
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return (Vec<float>::type)_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16);
#elif defined(__SSE2__) && !defined(__AVX__)  // (AVX without AVX2: 32-byte Vecs, generic below)
    const __m128i bits = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return (Vec<float>::type)_mm_unpacklo_epi16(_mm_setzero_si128(), bits);  // bits in the upper halves
#else
    Bits16 bits;
    std::memcpy(&bits, p, sizeof bits);
    return (Vec<float>::type)(__builtin_convertvector(bits, Bits32) << 16);
#endif
  } else {
    return load_half(p);
  }
}

// p[0, kLanes<float>) = v narrowed to scalar_t (narrow_bits).
template <typename scalar_t>
inline void store_narrowed(scalar_t* p, Vec<float>::type v) {
  const Bits16 bits = narrow_bits<scalar_t>(v);
  std::memcpy(p, &bits, sizeof bits);
}

// dst[0, n) = src[0, n) as To: float16 and bfloat16 to and from float a Vec at a time
// (bitwise as one by one), the rest one by one. The bfloat16 rows of the direct
// convolution were copied value by value before: at B=64, C=36, 28×28 its 3×3 forward
// took 0.37-0.40 ms against float16's 0.23-0.27 (A/B in docs/PERFORMANCE.md).
// (A Vec read and written through its pointer, not memcpy: with -mtune=generic, e.g.
// TERMINATOR_MARCH=x86-64-v3, GCC copied memcpy's 32 bytes through the stack in halves.)
template <typename From, typename To>
inline void convert(const From* __restrict__ src, int64_t n, To* __restrict__ dst) {
  int64_t e = 0;
  constexpr int64_t L = kLanes<float>;
  if constexpr (kVectorConversion<From> && std::is_same_v<To, float>) {
    for (; e + L <= n; e += L) *reinterpret_cast<Vec<float>::type*>(dst + e) = load_widened(src + e);
  } else if constexpr (kVectorConversion<To> && std::is_same_v<From, float>) {
    for (; e + L <= n; e += L) {
      store_narrowed(dst + e, *reinterpret_cast<const Vec<float>::type*>(src + e));
    }
  }
  for (; e < n; ++e) dst[e] = static_cast<To>(src[e]);
}

// p[0, m) = the first m lanes of bits (0 < m ≤ lanes): one masked store with AVX-512BW.
template <typename scalar_t>
inline void store_bits(scalar_t* p, Bits16 bits, int64_t m) {
  if (m == int64_t(sizeof(bits) / 2)) {
    std::memcpy(p, &bits, sizeof bits);
    return;
  }
#if defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512F__)
  _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << m) - 1), (__m256i)bits);
#else
  for (int64_t t = 0; t < m; ++t) {
    std::memcpy(p + t, reinterpret_cast<const char*>(&bits) + 2 * t, 2);
  }
#endif
}

// ---- hyperzzw_global, mode="dot" ---------------------------------------------

// y[0, n) = k · z · x, elementwise.
template <typename scalar_t, typename acc_t>
void dot_forward_segment(int64_t n, const scalar_t* __restrict__ k, const scalar_t* __restrict__ z,
                         const scalar_t* __restrict__ x, scalar_t* __restrict__ y) {
  int64_t j = 0;
  if constexpr (kVectorConversion<scalar_t>) {
    for (constexpr int64_t L = kLanes<float>; j + L <= n; j += L) {
      store_narrowed(y + j, load_widened(k + j) * load_widened(z + j) * load_widened(x + j));
    }
  }
  for (; j < n; ++j) {
    y[j] = static_cast<scalar_t>(acc_t(k[j]) * acc_t(z[j]) * acc_t(x[j]));
  }
}

at::Tensor global_dot_forward(const at::Tensor& k, const at::Tensor& z, const at::Tensor& x) {
  auto y = empty_output_like(z);
  const int64_t B = z.size(0), CN = z.size(1) * z.size(2);
  const bool shared = k.size(0) == 1;
  if (y.numel() == 0) return y;
  TERMINATOR_DISPATCH_FLOATING(z.scalar_type(), "global_dot_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.defined() ? x.const_data_ptr<scalar_t>() : zp;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * CN, kGrainWork, [&](int64_t begin, int64_t end) {
      for_each_row_piece(begin, end, CN, [&](int64_t b, int64_t i0, int64_t i1) {
        const int64_t o = b * CN + i0;
        dot_forward_segment<scalar_t, acc_t>(i1 - i0, kp + (shared ? 0 : b * CN) + i0, zp + o,
                                             xp + o, yp + o);
      });
    });
  });
  return y;
}

// One row segment of the dot backward: y = k z x gives dk = gy z x, dz = gy k x,
// dx = gy k z; with x = z (HasX false), dz = 2 gy k z. `dk` receives (Accumulate)
// or is overwritten with gy z x.
template <bool HasX, bool Accumulate, typename scalar_t, typename acc_t>
void dot_backward_segment(int64_t n, const scalar_t* __restrict__ gy, const scalar_t* __restrict__ k,
                          const scalar_t* __restrict__ z, const scalar_t* __restrict__ x,
                          acc_t* __restrict__ dk, scalar_t* __restrict__ gz,
                          scalar_t* __restrict__ gx) {
  int64_t j = 0;
  if constexpr (kVectorConversion<scalar_t>) {  // the same sums, a Vec at a time
    using V = Vec<float>::type;
    for (constexpr int64_t L = kLanes<float>; j + L <= n; j += L) {
      const V g = load_widened(gy + j), kv = load_widened(k + j), zv = load_widened(z + j);
      const V xv = HasX ? load_widened(x + j) : zv;
      const V d = g * zv * xv;
      V* dk_v = reinterpret_cast<V*>(dk + j);
      *dk_v = Accumulate ? *dk_v + d : d;
      if constexpr (HasX) {
        store_narrowed(gz + j, g * kv * xv);
        store_narrowed(gx + j, g * kv * zv);
      } else {
        store_narrowed(gz + j, 2.0f * g * kv * zv);
      }
    }
  }
  for (; j < n; ++j) {
    const acc_t g = gy[j], kv = k[j], zv = z[j];
    const acc_t xv = HasX ? acc_t(x[j]) : zv;
    const acc_t d = g * zv * xv;
    dk[j] = Accumulate ? dk[j] + d : d;
    if constexpr (HasX) {
      gz[j] = static_cast<scalar_t>(g * kv * xv);
      gx[j] = static_cast<scalar_t>(g * kv * zv);
    } else {
      gz[j] = static_cast<scalar_t>(acc_t(2) * g * kv * zv);
    }
  }
}

template <bool HasX, typename scalar_t>
void global_dot_backward_impl(const at::Tensor& gy, const at::Tensor& k, const at::Tensor& z,
                              const at::Tensor& x, at::Tensor& gk, at::Tensor& gz, at::Tensor& gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = z.size(0), CN = z.size(1) * z.size(2);
  const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const scalar_t* xp = HasX ? x.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* gkp = gk.mutable_data_ptr<scalar_t>();
  scalar_t* gzp = gz.mutable_data_ptr<scalar_t>();
  scalar_t* gxp = HasX ? gx.mutable_data_ptr<scalar_t>() : nullptr;
  const bool shared = k.size(0) == 1;
  // Per-sample k: row pieces of the flat (B, CN) range; shared k: column chunks,
  // each summing its batch in order b = 0..B-1 (deterministic for any threads).
  const int64_t rows = shared ? 1 : B;
  at::parallel_for(0, rows * CN, shared ? grain_for(B) : kGrainWork, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(kColumnChunk);
    for_each_row_piece(begin, end, CN, [&](int64_t row, int64_t c0, int64_t c1) {
      for (int64_t s0 = c0; s0 < c1; s0 += kColumnChunk) {
        const int64_t n = std::min(kColumnChunk, c1 - s0);
        const int64_t k_off = row * CN + s0;
        for (int64_t b = shared ? 0 : row; b < (shared ? B : row + 1); ++b) {
          const int64_t o = b * CN + s0;
          auto segment = b == (shared ? 0 : row) ? dot_backward_segment<HasX, false, scalar_t, acc_t>
                                                 : dot_backward_segment<HasX, true, scalar_t, acc_t>;
          segment(n, gyp + o, kp + k_off, zp + o, HasX ? xp + o : nullptr, acc.data(), gzp + o,
                  HasX ? gxp + o : nullptr);
        }
        for (int64_t j = 0; j < n; ++j) gkp[k_off + j] = static_cast<scalar_t>(acc[j]);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> global_dot_backward(const at::Tensor& gy,
                                                                   const at::Tensor& k,
                                                                   const at::Tensor& z,
                                                                   const at::Tensor& x) {
  const bool shared = k.size(0) == 1;
  auto gk = empty_output_like(shared ? k : z);
  auto gz = empty_output_like(z);
  auto gx = x.defined() ? empty_output_like(z) : at::Tensor();
  if (shared && z.size(0) == 0) return {gk.zero_(), gz, gx};
  if (z.numel() == 0) return {gk, gz, gx};
  TERMINATOR_DISPATCH_FLOATING(z.scalar_type(), "global_dot_backward", [&] {
    if (x.defined()) {
      global_dot_backward_impl<true, scalar_t>(gy, k, z, x, gk, gz, gx);
    } else {
      global_dot_backward_impl<false, scalar_t>(gy, k, z, x, gk, gz, gx);
    }
  });
  return {gk, gz, gx};
}

// ---- hyperzzw_global, mode="matmul" -------------------------------------------
//
// Planes up to kMatmulMaxSide on a side are multiplied from L1/L2-resident copies in
// acc_t, Ŵ = k ⊙ z formed while copying and the gradients' elementwise products done
// while storing: one pass over each tensor where ATen's path (matmul_aten.h, used
// beyond) makes a pass per product and GEMM.

constexpr int64_t kMatmulMaxSide = 64;

// A square plane of side S stored flat (row i from i·S), as in the tensor, plus one
// vector of slack. The GEMM works in whole vectors per row: when S is not a multiple
// of the vector width, a row's last vector runs on into the next row (or the slack).
// Those lanes are scratch; how the GEMM orders its stores keeps them out of the result.
// Flat copies in and out vectorize without a tail per row: at 28×28 (two vectors per
// row, the second 12/16 full) copying into rows padded to whole vectors took more time
// than the products themselves.
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
  // start: left to GCC, it zeroed them as an array on the stack with a call to memset and
  // stored them there after the loop before storing them to c, each tile (12 % of the
  // products' time in a perf profile).
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
// at most 8 (12 rows were no faster with AVX-512's 32 registers, below); 6 with 16.
constexpr int64_t kGemmMaxRows = std::min<int64_t>(8, (kVectorRegisters - 3) / 2);

// Rows [i, i + rows) (1 ≤ rows ≤ kGemmMaxRows) of c = A · b, vectors [v, v + 2) (or just
// v, for the last vector of a row with an odd count).
template <typename acc_t>
void gemm_rows(const acc_t* a, int64_t a_row, int64_t a_col, const acc_t* b, int64_t S,
               int64_t i, int64_t rows, int64_t v, bool pair, acc_t* c) {
  constexpr int64_t L = kLanes<acc_t>;
  using Tile = void (*)(const acc_t*, int64_t, int64_t, const acc_t*, int64_t, int64_t, int64_t, acc_t*);
  static constexpr Tile pairs[8] = {gemm_tile<1, 2, acc_t>, gemm_tile<2, 2, acc_t>, gemm_tile<3, 2, acc_t>,
                                    gemm_tile<4, 2, acc_t>, gemm_tile<5, 2, acc_t>, gemm_tile<6, 2, acc_t>,
                                    gemm_tile<7, 2, acc_t>, gemm_tile<8, 2, acc_t>};
  static constexpr Tile singles[8] = {gemm_tile<1, 1, acc_t>, gemm_tile<2, 1, acc_t>, gemm_tile<3, 1, acc_t>,
                                      gemm_tile<4, 1, acc_t>, gemm_tile<5, 1, acc_t>, gemm_tile<6, 1, acc_t>,
                                      gemm_tile<7, 1, acc_t>, gemm_tile<8, 1, acc_t>};
  (pair ? pairs : singles)[rows - 1](a, a_row, a_col, b, S, i, v * L, c);
}

// c = A · b for S × S planes. A row's last vector spills scratch lanes into the first
// vector of the next row (S > L) or into the rows after it (S ≤ L, one vector per row),
// never further, and the last row's into the slack. Groups of vectors go last-first and
// rows in increasing order within a group, so every row's own store of those columns
// comes after any spill into them.
// Row tiles of up to kGemmMaxRows rows × 2 vectors, the rows split evenly. With AVX-512
// (8 rows): 28 rows as 4 × 7 rather than 3 × 8 + 4, whose 4-row tile took 30 % of the
// products' time for 14 % of the rows (in a perf profile; 8 sums barely cover the FMA
// latency); even tiles, backward 2.34 -> 2.26 ms. Against 4-row tiles throughout, 8 rows
// gave forward 1.05 -> 0.78 ms and backward 2.8 -> 2.3 ms at B=64, C=36, 28×28 (A/B in
// alternating processes); 12 was no better.
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
// prefetcher does not follow. Matmul backward at
// B=64, C=36, 28×28: inputs 2.57 -> 2.41 ms (means of six alternating processes); the
// output planes too, 2.14 -> 2.02 ms (ten alternating processes, each pair in both orders).
// Planes up to 64×64 (all the matmul kernel takes) are prefetched whole. A larger plane's
// rows are streams long enough for the hardware prefetcher, and three whole planes ahead
// could push the current ones out of L2.
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

// dst = srcᵀ, written row by row (strided reads, contiguous writes: measured faster
// than the other order, whose strided scalar stores cost as much as a product).
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
    // float16 as before: its per-value conversions kept GCC from fusing the product into
    // the addition, which it does for the other types (and, unstopped, did here).
    if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      if (gu != nullptr) opaque(gz_e);
    }
    gz[e] = static_cast<scalar_t>(gu == nullptr ? gz_e : gz_e + gu[e]);
  }
}

// out[k, e] = Σ_q partial[k, q, e] for chunks q in increasing order (shared_batch_chunks).
template <typename acc_t, typename scalar_t>
void sum_chunks(const acc_t* partial, int64_t kernels, int64_t chunks, int64_t n, scalar_t* out) {
  at::parallel_for(0, kernels, grain_for(chunks * n), [&](int64_t k0, int64_t k1) {
    for (int64_t kk = k0; kk < k1; ++kk) {
      const acc_t* first = partial + kk * chunks * n;
      for (int64_t e = 0; e < n; ++e) {
        acc_t sum = first[e];
        for (int64_t q = 1; q < chunks; ++q) sum += first[q * n + e];
        out[kk * n + e] = static_cast<scalar_t>(sum);
      }
    }
  });
}

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
        if (p + 1 < p1) {  // cold caches, A/B: 0.80 -> 0.72 ms (the output's prefetch does it)
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
    at::parallel_for(0, kernels * chunks.count, grain_for(chunks.size * N * S), [&](int64_t t0, int64_t t1) {
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
          // The next plane this thread visits: the next sample's for a shared k, else the
          // next task's (the next in memory; per-sample k, warm, A/B: 1.50 -> 1.33 ms).
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
          gemm_plane(w_hat.row(0), int64_t(1), S, g, g_u);  // Ŵᵀ · gy
          plane_grads(N, g_what.row(0), x.defined() ? nullptr : g_u.row(0), z_plane, k_plane,
                      g_k.row(0), gzp + p * N);
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

// ---- depthwise "same" cross-correlation, direct ------------------------------
//
// Each plane is first copied, in the accumulation type, into a zero-padded
// buffer, so the inner loops have no bounds and convert nothing: outputs are
// computed a tile of vectors at a time in registers, over every kernel tap.

constexpr int64_t kBlock = 16;

// A plane (H, W) inside a zeroed buffer of `rows` rows and `stride` columns, at (top, left).
struct PaddedPlane {
  int64_t rows, stride, top, left;
};

// Room for a kernel of (Kh, Kw) around an (H, W) plane plus a block of slack per row.
PaddedPlane padded_for(int64_t H, int64_t W, int64_t Kh, int64_t Kw, int64_t top, int64_t left) {
  return {H + Kh - 1, round_up(W + Kw - 1, kBlock) + kBlock, top, left};
}

// Copies an (H, W) plane, converted to acc_t, into its place in a padded buffer whose
// border was zeroed once (only the interior is ever written).
template <typename scalar_t, typename acc_t>
void copy_into_padded(const scalar_t* __restrict__ in, int64_t H, int64_t W, const PaddedPlane& g,
                      acc_t* __restrict__ out) {
  for (int64_t i = 0; i < H; ++i) convert(in + i * W, W, out + (i + g.top) * g.stride + g.left);
}

// Whether all n values are finite: v - v is 0 for a finite v and NaN for an inf or NaN,
// and a NaN survives the sum. Summed as whole vectors (a scalar loop with a flag ran at
// a third of the speed of the weight gradient it guards).
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
// unaligned, most of them split over two cache lines, and were the bottleneck. Each sum
// still adds its taps in (qi, qj) order, so results are bitwise the same. A/B at B=64,
// C=36, 28×28, warm caches, AVX-512: 7×7 forward 0.92 -> 0.65 ms, backward 1.63 -> 1.35;
// 9×9 1.43 -> 0.99, 2.56 -> 2.13; 3×3 0.27 -> 0.25, 0.58 -> 0.55. (An AVX2 build here:
// 7×7 forward 1.30 -> 1.15 ms, 3×3 0.35 -> 0.40.) Columns from W on are computed from the
// padding and not stored. KH, KW > 0 fix the kernel's size at compile time (else Kh, Kw).
//
// WithWeightGrad (a fixed size; the per-sample backward in one pass over grad_y, p being
// grad_y padded and w the flipped kernel): from the same loads of p, also the weight
// gradient's partial sums gw[qi·KW + qj] += x[i + r, j + ...] · p[i + r + qi, j + qj + ...]
// (x's rows x_stride apart, zero from W on). The separate weight-gradient pass
// (weight_grad_plane) loaded p again, unaligned, for every tap: it took half the 3×3
// backward's time. A/B at B=64, C=36, 28×28, warm: 3×3 backward 0.50 -> 0.36 ms; an AVX2
// build 0.71 -> 0.50. 1D, L = 784, 7 taps: 0.49 -> 0.41 ms; an AVX2 build 0.63 -> 0.54
// (9 taps 0.72 -> 0.55).
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
  // always_inline: inlined later, with the weight sums, the 3×3 backward spilled 28 more
  // vectors to the stack than the same loop written out.
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
    // Unrolled, so the accumulators stay in registers (GCC had kept them on the stack) and,
    // for a fixed kernel size, every test on r is decided at compile time. A/B at B=64,
    // C=36, 28×28, warm: 3×3 forward 0.25 -> 0.20 ms, backward 0.57 -> 0.51; 7×7 backward
    // 1.47 -> 1.36; an AVX2 build, 3×3 forward 0.43 -> 0.32. Outputs bitwise the same (a
    // -march=znver3 build's now equal the AVX-512 build's; GCC's tuning for it had split
    // some FMAs of the rolled loop). Not for the forward's single-row tiles (R = 1: 1D planes,
    // a 2D plane's last H mod 4 rows): slower on AVX2 for 1D.
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
#define TERMINATOR_ROW_CASE(N) \
  case N:                      \
    tile = correlate_tile<1, N, scalar_t, acc_t>; \
    break;
        TERMINATOR_ROW_CASE(1) TERMINATOR_ROW_CASE(2) TERMINATOR_ROW_CASE(3)
        TERMINATOR_ROW_CASE(4) TERMINATOR_ROW_CASE(5) TERMINATOR_ROW_CASE(6)
        TERMINATOR_ROW_CASE(7) TERMINATOR_ROW_CASE(8)
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
// KW vectors of p and one of g within kVectorRegisters (32 with AVX-512). Measured against
// one row at a time (backward at B=64, C=36, 28×28, three alternating processes each):
// 5×5 1.56 -> 1.37 ms, 7×7 2.73 -> 2.28, 9×9 3.89 -> 3.36, but 3×3 0.80 -> 0.87, so runs
// of up to 3 taps keep one row at a time.
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
#define TERMINATOR_ROWS_CASE(N)                                                           \
  case N:                                                                                 \
    if constexpr (N <= kMaxRows) {                                                        \
      weight_grad_taps<N, KW, MaskTail>(g, g_stride, pr, stride, H, W, out, gw_stride); \
    }                                                                                     \
    break;
      TERMINATOR_ROWS_CASE(1) TERMINATOR_ROWS_CASE(2) TERMINATOR_ROWS_CASE(3)
      TERMINATOR_ROWS_CASE(4) TERMINATOR_ROWS_CASE(5) TERMINATOR_ROWS_CASE(6)
      TERMINATOR_ROWS_CASE(7) TERMINATOR_ROWS_CASE(8)
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
#define TERMINATOR_TAPS_CASE(N)                                                              \
  case N:                                                                                    \
    weight_grad_tap_run<N, MaskTail>(g, g_stride, p + q0, stride, Kh, H, W, gw + q0, Kw); \
    break;
      TERMINATOR_TAPS_CASE(1) TERMINATOR_TAPS_CASE(2) TERMINATOR_TAPS_CASE(3)
      TERMINATOR_TAPS_CASE(4) TERMINATOR_TAPS_CASE(5) TERMINATOR_TAPS_CASE(6)
      TERMINATOR_TAPS_CASE(7) TERMINATOR_TAPS_CASE(8) TERMINATOR_TAPS_CASE(9)
#undef TERMINATOR_TAPS_CASE
    }
    q0 += n;
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

// sums = the weight gradient of one plane (Kh·Kw values): g's rows `g_stride` apart and
// zero from W on to the next multiple of kBlock, x_pad the padded input plane of
// geometry x_geo. Summed first as whole vectors, whose lanes from W on multiply g's zeros
// by x_pad's values there. That differs from the masked sum only if x_pad holds an inf or
// NaN (0 · inf = NaN), and every value of x_pad meets some g in these sums, so then some
// sum is not finite: only then is x_pad checked (a pass over it per plane, 7 % of the
// 3×3 backward, saved otherwise) and, if it holds one, the masked sums taken.
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

// Correlates every (b, c) plane of `in` with kernel plane (b or 0, c) of `w`;
// `flip` reads w reversed and pads the rest of the kernel before (the input gradient).
at::Tensor correlate_planes(const at::Tensor& in, const at::Tensor& w, bool flip) {
  auto out = empty_output_like(in);
  const int64_t B = in.size(0), C = in.size(1), H = in.size(2), W = in.size(3);
  const int64_t Kh = w.size(2), Kw = w.size(3), K = Kh * Kw;
  const bool shared = w.size(0) == 1;
  const int64_t top = flip ? Kh - 1 - same_pad_before(Kh) : same_pad_before(Kh);
  const int64_t left = flip ? Kw - 1 - same_pad_before(Kw) : same_pad_before(Kw);
  const auto geo = padded_for(H, W, Kh, Kw, top, left);
  if (out.numel() == 0) return out;
  TERMINATOR_DISPATCH_FLOATING(in.scalar_type(), "hyperkernel_conv_direct", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* inp = in.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* outp = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * C, grain_for(H * W * K), [&](int64_t p0, int64_t p1) {
      auto padded = padded_buffer<acc_t>(geo);
      std::vector<acc_t> kernel(K);
      for (int64_t p = p0; p < p1; ++p) {
        const bool finite = load_kernel(wp + (shared ? p % C : p) * K, K, flip, kernel.data());
        copy_into_padded(inp + p * H * W, H, W, geo, padded.data());
        correlate_plane(padded.data(), geo, kernel.data(), finite, Kh, Kw, H, W, outp + p * H * W);
      }
    });
  });
  return out;
}

at::Tensor conv_direct_forward(const at::Tensor& x, const at::Tensor& w) {
  return correlate_planes(x, w, /*flip=*/false);
}

// Tiles of R rows × NV vectors: R·NV sums of the input gradient, R·NV vectors of x, KH·KW
// weight sums and NV vectors of p, within 16 registers for 3×3 with 2 × 1 (14), 32 with
// 4 × 2 (27; A/B against 2 × 2, 3×3 backward 0.39 -> 0.36 ms).
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
__attribute__((noinline)) void backward_plane_fused(const acc_t* p, int64_t stride,
                                                    const acc_t* w, const acc_t* x,
                                                    int64_t x_stride, int64_t H, int64_t W,
                                                    scalar_t* out, acc_t* sums) {
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
    case 3: return call_with_size<1, 3>(fn);
    case 5: return call_with_size<1, 5>(fn);
    case 7: return call_with_size<1, 7>(fn);
    case 9: return call_with_size<1, 9>(fn);
    default: return false;
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
  return {H, W, Kh, Kw,
          padded_for(H, W, Kh, Kw, Kh - 1 - ph, Kw - 1 - pw),
          padded_for(H, W, Kh, Kw, ph, pw),
          PaddedPlane{H, round_up(W, kBlock), 0, 0},
          one_pass_backward(Kh, Kw)};
}

constexpr int64_t kPageBytes = 4096;

// The backward of 1D planes of up to a page (4 KiB) asks for each plane's grad_y and x
// a page ahead of plane p, up to plane p_end (one past the thread's last): the one-pass
// kernel reads such a plane in a burst that runs into the next page before the hardware
// prefetcher, which stops at page boundaries, has fetched it. B=64, C=36, 7 taps, cold
// caches, A/B in alternating processes, backward in ms: L = 784 0.66 -> 0.59 (ten
// processes each; shared kernels 0.66 -> 0.60; 3 and 9 taps 8 and 11 % faster; a plane
// ahead rather than a page 0.62), L = 1024 0.69 -> 0.63. Not for longer planes, whose
// streams the hardware follows (L = 2048 1.39 -> 1.44, L = 4096 4.03 -> 4.20), nor for 2D
// planes (28×28: 3×3 0.49 -> 0.67, 7×7 1.61 -> 1.71); the forward gained nothing clear.
// Always inlined: as a call, GCC took it for one without effects and dropped it (no
// prefetch left in the object code).
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
  for (int64_t at = first; at < last; at += 64) {  // the two tensors alternately, as measured
    __builtin_prefetch(g + at, 0, 2);
    __builtin_prefetch(xs + at, 0, 2);
  }
}

// One thread's buffers for backward_plane.
template <typename acc_t>
struct BackwardBuffers {
  std::vector<acc_t> g_pad, x_pad, x_rows;
  explicit BackwardBuffers(const BackwardGeometry& geo)
      : g_pad(padded_buffer<acc_t>(geo.g)), x_pad(padded_buffer<acc_t>(geo.x)),
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
          buf.g_pad.data(), geo.g.stride, kernel, buf.x_rows.data(), geo.x_rows.stride, H, W,
          gx, sums);
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
// channel (before the tenth session; the same sums, bitwise) was slower even with the
// next plane prefetched. B=64, C=36, 28×28, cold caches, three alternating processes
// each, backward: 3×3 0.74-0.84 -> 0.62-0.65 ms (a copy of its bytes 0.19 ms in both),
// 7×7 1.84-1.91 -> 1.53-1.62 ms.
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

// algo="auto": direct costs H·W·Kh·Kw multiply-adds per plane, the FFT path about
// kFftCostPerPoint · n·log2(n) for n padded points (five transforms for forward +
// backward, plus padding and products), with one constant for each kind of kernel and
// dimensionality: a kernel shared by the batch is transformed once per channel, not once
// per plane, and 1D's direct kernel and transforms cost differently per point (one
// constant fitted to all, 33-34, put 1D's crossover at K ≈ 410 at L=784, where the FFT
// is faster from between K=191 and 255). The constants are from `python
// tools/bench_ops.py --crossover --repeats 21 --budget 6 --warmup 2` (forward +
// backward, direct and fft timed in the same rounds; per-sample and shared kernels at
// 28×28 K 3..28, 64×64 K 5..64, L=784 K 9..784; 2 threads) on the 2-core development
// machine, tenth session, with even FFT sizes (common.h): per group, the median over the
// pairs within 3x of each other of the constant that reproduces the measured time ratio.
// Per-sample 2D 39.7, 39.6, 41.0, 40.3 and 1D 17.0, 17.9, 18.2, 18.5 in four runs;
// shared 2D 28.4, 28.1 and 1D 13.3, 12.9 in two. With them auto ran the faster algorithm
// at every measured size but two, shared 28×28 K=27 and 28, where direct was 2-9 %
// faster. The single constant before (28, fitted in the fourth session on per-sample
// kernels) had gone stale as the direct kernels got faster: it ran the FFT for the 28×28
// global conv (K=28), 1.4-1.5x slower than direct, and direct at L=784 up to K=339, 1.3x
// slower at K=255.
constexpr double kFftCostPerPoint[2][2] = {
    {18.0, 40.0},  // per-sample kernels: 1D, 2D
    {13.0, 28.0},  // shared kernels: 1D, 2D
};

bool prefer_fft(int64_t H, int64_t W, int64_t Kh, int64_t Kw, bool shared_kernel) {
  const int64_t nh = H == 1 ? 1 : good_fft_size(H + Kh - 1 - same_pad_before(Kh));
  const int64_t nw = good_fft_size(W + Kw - 1 - same_pad_before(Kw));
  const double points = double(nh) * double(nw);
  const double direct = double(H) * double(W) * double(Kh) * double(Kw);
  const double per_point = kFftCostPerPoint[shared_kernel ? 1 : 0][H == 1 ? 0 : 1];
  return per_point * points * std::log2(points + 1.0) < direct;
}

struct CpuKernels {
  static constexpr auto prefer_fft = &cpu::prefer_fft;
  static constexpr auto global_dot_forward = &cpu::global_dot_forward;
  static constexpr auto global_dot_backward = &cpu::global_dot_backward;
  static constexpr auto global_matmul_forward = &cpu::global_matmul_forward;
  static constexpr auto global_matmul_backward = &cpu::global_matmul_backward;
  static constexpr auto conv_direct_forward = &cpu::conv_direct_forward;
  static constexpr auto conv_direct_backward = &cpu::conv_direct_backward;
};

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(terminator, CPU, m) { register_impls<cpu::CpuKernels>(m); }

}  // namespace terminator
