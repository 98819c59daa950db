#include "fft_conv.h"

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
  auto [buffer, window] = padded_buffer(scale.size(0), w.size(1), g.Kh, g.Kw, 0, 0, g,
                                        w.options().dtype(dtype));
  if (dtype == w.scalar_type()) {
    at::mul_out(window, w, scale);
  } else {
    window.copy_(w.to(dtype) * scale.to(dtype));
  }
  return rfft(buffer, g);
}

at::Tensor crop(const at::Tensor& t, int64_t top, int64_t left, int64_t h, int64_t w,
                at::ScalarType dtype) {
  return t.narrow(2, top, h).narrow(3, left, w).to(dtype).contiguous();
}

}  // namespace

at::Tensor conv_fft_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale) {
  if (x.numel() == 0) return at::zeros_like(x, at::MemoryFormat::Contiguous);
  const auto g = geometry(x, w);
  const auto dtype = compute_dtype(x.scalar_type());
  // y[p] = Σ_q w[q] x[p + q - P]: correlation = product with the conjugate spectrum.
  // Conjugated in place (conj_physical_): a lazy conj() bit was dropped under
  // AOTAutograd (opcheck's test_aot_dispatch_dynamic gave the convolution instead).
  auto spec = spectrum_at(x, g.ph, g.pw, g, dtype);
  auto w_spec = kernel_spectrum(w, w_scale, g, dtype);
  spec.mul_(at::conj_physical_(w_spec));
  return crop(irfft(spec, g), 0, 0, g.H, g.W, x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> conv_fft_backward(const at::Tensor& grad_y,
                                                     const at::Tensor& x, const at::Tensor& w,
                                                     const at::Tensor& w_scale) {
  const bool shared = !w_scale.defined() && w.size(0) == 1;
  const auto w_shape = w_scale.defined()
                           ? std::vector<int64_t>{w_scale.size(0), w.size(1), w.size(2), w.size(3)}
                           : w.sizes().vec();
  if (x.numel() == 0) {
    return {at::zeros_like(x, at::MemoryFormat::Contiguous),
            at::zeros(w_shape, w.options())};
  }
  const auto g = geometry(x, w);
  const auto dtype = compute_dtype(x.scalar_type());
  auto gy_spec = spectrum_at(grad_y, 0, 0, g, dtype);
  // grad_w[q] = Σ_p gy[p] x[p + q - P]: correlation of x with gy, first K entries;
  // a shared kernel sums over the batch before the (then single) inverse transform.
  auto w_spec = spectrum_at(x, g.ph, g.pw, g, dtype).mul_(at::conj_physical(gy_spec));
  if (shared) w_spec = w_spec.sum(0, /*keepdim=*/true);
  auto grad_w = crop(irfft(w_spec, g), 0, 0, g.Kh, g.Kw, w.scalar_type());
  w_spec.reset();
  // grad_x[r] = Σ_q w[q] gy[r - q + P]: a true convolution, read at offset P.
  gy_spec.mul_(kernel_spectrum(w, w_scale, g, dtype));
  auto grad_x = crop(irfft(gy_spec, g), g.ph, g.pw, g.H, g.W, x.scalar_type());
  return {grad_x, grad_w};
}

}  // namespace terminator
