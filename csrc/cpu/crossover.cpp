// algo="auto": whether the FFT path beats the direct kernel on the CPU (prefer_fft).
#include <cmath>
#include <cstdint>

#include "../common.h"
#include "kernels.h"

namespace terminator {
namespace cpu {
namespace {

// algo="auto": direct costs H·W·Kh·Kw multiply-adds per plane, the FFT path about
// kFftCostPerPoint · n·log2(n) for n padded points (five transforms for forward +
// backward, plus padding and products), with one constant for each kind of kernel and
// dimensionality: a kernel shared by the batch is transformed once per channel, not once
// per plane, and 1D's direct kernel and transforms cost differently per point. The
// constants are fitted by `python tools/bench_ops.py --crossover` (forward + backward of
// both algorithms timed in the same rounds); docs/PERFORMANCE.md has the measurements.
constexpr double kFftCostPerPoint[2][2] = {
    {18.0, 40.0},  // per-sample kernels: 1D, 2D
    {13.0, 28.0},  // shared kernels: 1D, 2D
};

}  // namespace

bool prefer_fft(int64_t H, int64_t W, int64_t Kh, int64_t Kw, bool shared_kernel) {
  const int64_t nh = H == 1 ? 1 : good_fft_size(H + Kh - 1 - same_pad_before(Kh));
  const int64_t nw = good_fft_size(W + Kw - 1 - same_pad_before(Kw));
  const double points = double(nh) * double(nw);
  const double direct = double(H) * double(W) * double(Kh) * double(Kw);
  const double per_point = kFftCostPerPoint[shared_kernel ? 1 : 0][H == 1 ? 0 : 1];
  return per_point * points * std::log2(points + 1.0) < direct;
}

}  // namespace cpu
}  // namespace terminator
