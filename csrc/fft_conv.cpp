#include "fft_conv.h"

#include "common.h"

namespace terminator {
namespace {

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

// Zero-pads planes (N, C, h, w) to (N, C, nh, nw), computing in `dtype`.
at::Tensor zero_pad(const at::Tensor& t, const FftGeometry& g, at::ScalarType dtype) {
  auto out = at::zeros({t.size(0), t.size(1), g.nh, g.nw}, t.options().dtype(dtype));
  out.narrow(2, 0, t.size(2)).narrow(3, 0, t.size(3)).copy_(t);
  return out;
}

// Kernel tap (qi, qj) placed at ((qi - ph) mod nh, (qj - pw) mod nw).
at::Tensor spectrum_of_kernel(const at::Tensor& w, const FftGeometry& g, at::ScalarType dtype) {
  auto padded = at::roll(zero_pad(w, g, dtype), {-g.ph, -g.pw}, {2, 3});
  return at::fft_rfftn(padded, at::OptionalIntArrayRef(), g.dims);
}

at::Tensor spectrum(const at::Tensor& t, const FftGeometry& g, at::ScalarType dtype) {
  return at::fft_rfftn(zero_pad(t, g, dtype), at::OptionalIntArrayRef(), g.dims);
}

at::Tensor inverse(const at::Tensor& spec, const FftGeometry& g) {
  return at::fft_irfftn(spec, g.sizes, g.dims);
}

}  // namespace

at::Tensor conv_fft_forward(const at::Tensor& x, const at::Tensor& w) {
  if (x.numel() == 0) return at::zeros_like(x, at::MemoryFormat::Contiguous);
  const auto g = geometry(x, w);
  const auto dtype = compute_dtype(x.scalar_type());
  // y[p] = Σ_q w[q] x[p + q - P]: correlation = product with the conjugate spectrum.
  // conj_physical, not conj(): the lazy conjugate bit was lost under AOTAutograd
  // (opcheck's test_aot_dispatch_dynamic gave the convolution instead).
  auto y_spec = spectrum(x, g, dtype) * at::conj_physical(spectrum_of_kernel(w, g, dtype));
  auto y = inverse(y_spec, g).narrow(2, 0, g.H).narrow(3, 0, g.W);
  return y.to(x.scalar_type()).contiguous();
}

std::tuple<at::Tensor, at::Tensor> conv_fft_backward(const at::Tensor& grad_y,
                                                     const at::Tensor& x,
                                                     const at::Tensor& w) {
  if (x.numel() == 0) {
    return {at::zeros_like(x, at::MemoryFormat::Contiguous),
            at::zeros_like(w, at::MemoryFormat::Contiguous)};
  }
  const auto g = geometry(x, w);
  const auto dtype = compute_dtype(x.scalar_type());
  auto gy_spec = spectrum(grad_y, g, dtype);
  // grad_x[r] = Σ_q w[q] gy[r - q + P]: a true convolution, no conjugate.
  auto grad_x = inverse(gy_spec * spectrum_of_kernel(w, g, dtype), g)
                    .narrow(2, 0, g.H).narrow(3, 0, g.W);
  // grad_w[q] = Σ_p gy[p] x[p + q - P]; a shared kernel sums over the batch in
  // the frequency domain, so only one inverse transform per channel is needed.
  auto w_spec = at::conj_physical(gy_spec) * spectrum(x, g, dtype);
  if (w.size(0) == 1) w_spec = w_spec.sum(0, /*keepdim=*/true);
  auto grad_w = at::roll(inverse(w_spec, g), {g.ph, g.pw}, {2, 3})
                    .narrow(2, 0, g.Kh).narrow(3, 0, g.Kw);
  return {grad_x.to(x.scalar_type()).contiguous(), grad_w.to(w.scalar_type()).contiguous()};
}

}  // namespace terminator
