#include "fft_conv.h"

#include <algorithm>

#include "common.h"

namespace terminator {
namespace {

// The input sits at offset P = ⌊(K−1)/2⌋ inside its zero-padded buffer and the
// kernel at offset 0, so the circular correlation's first S entries are the
// "same" correlation; n >= S + K − 1 − P keeps every wrapped term in the zeros.
struct FftGeometry {
  int64_t H, W, Kh, Kw, ph, pw, nh, nw;
  std::vector<int64_t> dims, sizes;  // FFT dims and their padded sizes
};

FftGeometry geometry(const at::Tensor& x, const at::Tensor& w) {
  FftGeometry g;
  g.H = x.size(2), g.W = x.size(3), g.Kh = w.size(2), g.Kw = w.size(3);
  g.ph = same_pad_before(g.Kh), g.pw = same_pad_before(g.Kw);
  g.nh = g.H == 1 ? 1 : good_fft_size(g.H + g.Kh - 1 - g.ph);
  g.nw = good_fft_size(g.W + g.Kw - 1 - g.pw);
  if (g.nh == 1) {
    g.dims = {3}, g.sizes = {g.nw};
  } else {
    g.dims = {2, 3}, g.sizes = {g.nh, g.nw};
  }
  return g;
}

// A zeroed (N, C, nh, nw) buffer in `dtype` and the (h, w) window of it at (top, left).
std::pair<at::Tensor, at::Tensor> padded_buffer(int64_t n, int64_t c, int64_t h, int64_t w,
                                                int64_t top, int64_t left, const FftGeometry& g,
                                                const at::TensorOptions& options) {
  auto buffer = at::zeros({n, c, g.nh, g.nw}, options);
  auto window = buffer.narrow(2, top, h).narrow(3, left, w);
  return {buffer, window};
}

at::Tensor rfft(const at::Tensor& padded, const FftGeometry& g) {
  return at::fft_rfftn(padded, at::OptionalIntArrayRef(), g.dims);
}

at::Tensor irfft(const at::Tensor& spectrum, const FftGeometry& g) {
  return at::fft_irfftn(spectrum, g.sizes, g.dims);
}

// Spectrum of planes t (N, C, h, w) placed at (top, left).
at::Tensor spectrum_at(const at::Tensor& t, int64_t top, int64_t left, const FftGeometry& g,
                       at::ScalarType dtype) {
  auto [buffer, window] = padded_buffer(t.size(0), t.size(1), t.size(2), t.size(3), top, left, g,
                                        t.options().dtype(dtype));
  window.copy_(t);
  return rfft(buffer, g);
}

// Spectrum of the kernel w, or of w ⊙ scale (broadcast over the batch) written
// straight into the padded buffer: the Ŵ = k ⊙ z of the global conv mode is
// never materialized on its own.
at::Tensor kernel_spectrum(const at::Tensor& w, const at::Tensor& scale, const FftGeometry& g,
                           at::ScalarType dtype) {
  if (!scale.defined()) return spectrum_at(w, 0, 0, g, dtype);
  auto [buffer, window] =
      padded_buffer(scale.size(0), w.size(1), g.Kh, g.Kw, 0, 0, g, w.options().dtype(dtype));
  if (dtype == w.scalar_type()) {
    at::mul_out(window, w, scale);
  } else {
    window.copy_(w.to(dtype) * scale.to(dtype));
  }
  return rfft(buffer, g);
}

// The conjugate of kernel_spectrum, conjugated in place (conj_physical_): a lazy conj()
// bit was dropped under AOTAutograd (opcheck's test_aot_dispatch_dynamic gave the
// convolution instead of the correlation).
at::Tensor conj_kernel_spectrum(const at::Tensor& w, const at::Tensor& scale, const FftGeometry& g,
                                at::ScalarType dtype) {
  auto spec = kernel_spectrum(w, scale, g, dtype);
  at::conj_physical_(spec);
  return spec;
}

// Samples per batch chunk: each chunk's padded buffers and spectra stay near kChunkBytes,
// so the FFT path's memory does not grow with the batch and stays under eager's; chunks
// this small stay in cache and are no slower (docs/PERFORMANCE.md).
constexpr int64_t kChunkBytes = int64_t(1) << 20;

int64_t batch_chunk(int64_t channels, const FftGeometry& g, at::ScalarType dtype) {
  const int64_t per_sample = channels * g.nh * (g.nw / 2 + 1) * 2 * at::elementSize(dtype);
  return std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, per_sample));
}

// Samples [b0, b0 + n) of a per-sample tensor; a tensor shared over the batch (size 1
// there) or an undefined one as it is.
at::Tensor samples(const at::Tensor& t, int64_t b0, int64_t n) {
  return t.defined() && t.size(0) != 1 ? t.narrow(0, b0, n) : t;
}

// The (h, w) window at (top, left) of planes t.
at::Tensor window(const at::Tensor& t, int64_t top, int64_t left, int64_t h, int64_t w) {
  return t.narrow(2, top, h).narrow(3, left, w);
}

}  // namespace

at::Tensor conv_fft_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale) {
  if (x.numel() == 0) return at::zeros_like(x, at::MemoryFormat::Contiguous);
  const auto g = geometry(x, w);
  const auto dtype = compute_dtype(x.scalar_type());
  const int64_t B = x.size(0), chunk = batch_chunk(x.size(1), g, dtype);
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  // A kernel shared over the batch (and not scaled per sample) is transformed once.
  const bool one_kernel = w.size(0) == 1 && !w_scale.defined();
  const auto shared_spec = one_kernel ? conj_kernel_spectrum(w, w_scale, g, dtype) : at::Tensor();
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    // y[p] = Σ_q w[q] x[p + q - P]: correlation = product with the conjugate spectrum.
    auto spec = spectrum_at(x.narrow(0, b0, n), g.ph, g.pw, g, dtype);
    spec.mul_(one_kernel
                  ? shared_spec
                  : conj_kernel_spectrum(samples(w, b0, n), samples(w_scale, b0, n), g, dtype));
    y.narrow(0, b0, n).copy_(window(irfft(spec, g), 0, 0, g.H, g.W));
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor> conv_fft_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const at::Tensor& w,
                                                     const at::Tensor& w_scale) {
  const bool shared = !w_scale.defined() && w.size(0) == 1;
  const auto w_shape = w_scale.defined()
                           ? std::vector<int64_t>{w_scale.size(0), w.size(1), w.size(2), w.size(3)}
                           : w.sizes().vec();
  if (x.numel() == 0) {
    return {at::zeros_like(x, at::MemoryFormat::Contiguous), at::zeros(w_shape, w.options())};
  }
  const auto g = geometry(x, w);
  const auto dtype = compute_dtype(x.scalar_type());
  const int64_t B = x.size(0), chunk = batch_chunk(x.size(1), g, dtype);
  auto grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto grad_w = at::empty(w_shape, w.options());
  const auto shared_spec = shared ? kernel_spectrum(w, w_scale, g, dtype) : at::Tensor();
  at::Tensor grad_w_spec;  // a shared kernel's gradient spectrum, summed chunk by chunk
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t n = std::min(chunk, B - b0);
    auto gy_spec = spectrum_at(grad_y.narrow(0, b0, n), 0, 0, g, dtype);
    // grad_w[q] = Σ_p gy[p] x[p + q - P]: correlation of x with gy, first K entries;
    // a shared kernel sums over the batch (in chunk order) before a single inverse
    // transform at the end.
    auto w_spec =
        spectrum_at(x.narrow(0, b0, n), g.ph, g.pw, g, dtype).mul_(at::conj_physical(gy_spec));
    if (shared) {
      auto chunk_sum = w_spec.sum(0, /*keepdim=*/true);
      grad_w_spec = grad_w_spec.defined() ? grad_w_spec.add_(chunk_sum) : chunk_sum;
    } else {
      grad_w.narrow(0, b0, n).copy_(window(irfft(w_spec, g), 0, 0, g.Kh, g.Kw));
    }
    w_spec.reset();
    // grad_x[r] = Σ_q w[q] gy[r - q + P]: a true convolution, read at offset P.
    gy_spec.mul_(shared ? shared_spec
                        : kernel_spectrum(samples(w, b0, n), samples(w_scale, b0, n), g, dtype));
    grad_x.narrow(0, b0, n).copy_(window(irfft(gy_spec, g), g.ph, g.pw, g.H, g.W));
  }
  if (shared) grad_w.copy_(window(irfft(grad_w_spec, g), 0, 0, g.Kh, g.Kw));
  return {grad_x, grad_w};
}

}  // namespace terminator
