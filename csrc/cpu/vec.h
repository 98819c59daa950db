// The CPU kernels' vectors: one register of float or double as a GCC/Clang vector sized by
// the build's target, and float16/bfloat16 converted to and from float a vector at a time.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__) || defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

// The finiteness checks (all_finite, load_kernel) and narrow_bits's NaN test need IEEE
// semantics.
#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__)
#error "csrc/cpu must not be built with -ffast-math or -ffinite-math-only"
#endif

namespace terminator {
namespace cpu {

// The target's widest vector registers, and how many there are; the kernels' register
// blockings (tiles, kernel-row groups, tap runs) are sized from the count. Never wider than
// the hardware's: GCC lowers a wider vector through the stack in 16-byte pieces, many times
// slower (docs/PERFORMANCE.md).
#if defined(__AVX512F__)
inline constexpr int64_t kVectorBytes = 64, kVectorRegisters = 32;
#elif defined(__AVX__)
inline constexpr int64_t kVectorBytes = 32, kVectorRegisters = 16;
#elif defined(__aarch64__)
inline constexpr int64_t kVectorBytes = 16, kVectorRegisters = 32;  // NEON
#else
inline constexpr int64_t kVectorBytes = 16, kVectorRegisters = 16;  // SSE2, and anything else
#endif

// One vector register of acc_t as a GCC/Clang vector: the hot loops are written with it,
// about ten times as fast as the auto-vectorizer made them (docs/PERFORMANCE.md). GCC gives
// a vector type its element type's alias set, so the casts between acc_t* and vector*
// in the kernels are well-defined there.
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
inline constexpr int64_t kLanes = sizeof(typename Vec<T>::type) / sizeof(T);

// dst[0, m) = v[0, m) for 0 < m < kLanes: one masked store where the target has them. A
// plain loop here becomes `rep movs` from a stack copy of v, whose start-up costs more than
// a short row's arithmetic.
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
// not vectorize. With F16C a whole Vec converts in one instruction, the same hardware
// conversion (round to nearest even), so results are bitwise the same. bfloat16 is a
// float's upper half: exact to widen, and narrowed with c10's rounding (narrow_bits).
// A Vec of float narrowed to 16-bit values: their bits, one lane each.
typedef uint16_t Bits16 __attribute__((vector_size(kVectorBytes / 2)));
// The same lanes at 32 bits: a Vec of float's bits.
typedef uint32_t Bits32 __attribute__((vector_size(kVectorBytes)));

#if defined(__F16C__) && defined(__AVX__)  // (AVX-512 implies AVX)
template <typename scalar_t>
inline constexpr bool kHalfVectors = std::is_same_v<scalar_t, c10::Half>;

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
inline constexpr bool kHalfVectors = false;
// Never called where kHalfVectors is false.
inline Bits16 half_bits(Vec<float>::type);
inline Vec<float>::type load_half(const c10::Half*);
#endif

// Whether scalar_t converts to and from float a Vec at a time (narrow_bits, load_widened).
template <typename scalar_t>
inline constexpr bool kVectorConversion =
    kHalfVectors<scalar_t> || std::is_same_v<scalar_t, c10::BFloat16>;

// Narrowing a Vec at a time, for the direct convolution's stores (store_tile) and
// convert: faster than value by value, and bitwise the same (docs/PERFORMANCE.md).
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
    return (Vec<float>::type)_mm_unpacklo_epi16(_mm_setzero_si128(),
                                                bits);  // bits in the upper halves
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
// (bitwise as one by one), the rest one by one. A Vec is read and written through its
// pointer, not memcpy: with -mtune=generic (e.g. TERMINATOR_MARCH=x86-64-v3) GCC copied
// memcpy's 32 bytes through the stack in halves.
template <typename From, typename To>
inline void convert(const From* __restrict__ src, int64_t n, To* __restrict__ dst) {
  int64_t e = 0;
  constexpr int64_t L = kLanes<float>;
  if constexpr (kVectorConversion<From> && std::is_same_v<To, float>) {
    for (; e + L <= n; e += L)
      *reinterpret_cast<Vec<float>::type*>(dst + e) = load_widened(src + e);
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

}  // namespace cpu
}  // namespace terminator
