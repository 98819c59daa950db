// hyperkernel_conv, algo="direct", forward: depthwise "same" cross-correlation of each
// plane with its kernel, shared or per sample (the tiles are in conv_direct.h).
#include "conv_direct.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../common.h"
#include "kernels.h"
#include "parallel.h"

namespace terminator {
namespace cpu {
namespace {

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

}  // namespace

at::Tensor conv_direct_forward(const at::Tensor& x, const at::Tensor& w) {
  return correlate_planes(x, w, /*flip=*/false);
}

}  // namespace cpu
}  // namespace terminator
