// How the CPU kernels split their work over ATen's threads, so that results do not depend on
// the thread count, and how they allocate their outputs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace terminator {
namespace cpu {

// Enough work per task to amortize scheduling (elements or multiply-adds).
inline constexpr int64_t kGrainWork = 32768;

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, work_per_item));
}

// A shared kernel's gradient sums each channel over the batch, in batch order, one task
// per channel. With fewer channels than kMinKernelTasks the batch is also cut into chunks
// of at least kMinChunkSamples: each chunk is summed by one task and the chunks are added
// in order afterwards (sum_chunks), so C·chunks tasks keep the threads busy even for C = 1.
// The count depends on B and C only, never on the thread count, so the results do not
// either; with C ≥ kMinKernelTasks there is one chunk.
inline constexpr int64_t kMinKernelTasks = 32, kMinChunkSamples = 4;

struct BatchChunks {
  int64_t count, size;  // chunk q covers samples [q·size, min(B, (q + 1)·size))
};

inline BatchChunks shared_batch_chunks(int64_t B, int64_t C) {
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

// A new contiguous output shaped like `like`. glibc serves 32 MiB or more from a fresh
// mapping, whose first touch faults in 4 KiB pages, which can cost more than a light op's
// arithmetic; advising transparent huge pages on the 2 MiB-aligned interior before anything
// writes it makes one fault of 512 (docs/PERFORMANCE.md). Every caller writes all of its
// output, so nothing is committed that would not be anyway. Advice only: a no-op where THP
// is off, errors ignored.
inline at::Tensor empty_output_like(const at::Tensor& like) {
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

}  // namespace cpu
}  // namespace terminator
