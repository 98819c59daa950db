// Hyper interaction and hyper-channel interaction: x gated by scores of a high-level y,
//   out = x ⊙ sigmoid(s_c ⊙ s_s),  s_c[c] = k_c[c]·mean_n(y[c])²,  s_s[n] = k_s[n]·mean_c(y[:,
//   n])²,
// with s_s = 1 when there is no k_s (hyper-channel interaction). One sample at a time.
#include "layer_math.h"
#include "layers.h"

namespace terminator {
namespace cpu {
namespace {

// The scores of one sample y (C, N): s_c (C) and, with k_s, s_s (N); the means y_c, y_s too.
template <typename T>
void scores(const T* y, int64_t C, int64_t N, const T* kc, const T* ks, T* yc, T* sc, T* ys,
            T* ss) {
  for (int64_t c = 0; c < C; ++c) {
    const T* r = y + c * N;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t n = 0; n < N; ++n) s += r[n];
    yc[c] = s / T(N);
    sc[c] = kc[c] * yc[c] * yc[c];
  }
  if (!ks) return;
  std::fill(ys, ys + N, T(0));
  for (int64_t c = 0; c < C; ++c) {
    const T* r = y + c * N;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) ys[n] += r[n];
  }
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) {
    ys[n] /= T(C);
    ss[n] = ks[n] * ys[n] * ys[n];
  }
}

template <typename T>
void forward_impl(const at::Tensor& y_, const at::Tensor& x_, const at::Tensor& kc_,
                  const at::Tensor& ks_, at::Tensor& out_) {
  const int64_t B = y_.size(0), C = y_.size(1), N = y_.numel() / std::max<int64_t>(1, B * C);
  const T *y = y_.data_ptr<T>(), *x = x_.data_ptr<T>(), *kc = kc_.data_ptr<T>();
  const T* ks = ks_.defined() ? ks_.data_ptr<T>() : nullptr;
  T* out = out_.data_ptr<T>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> yc(C), sc(C), ys(N), ss(N, T(1));
    for (int64_t b = b0; b < b1; ++b) {
      scores(y + b * C * N, C, N, kc, ks, yc.data(), sc.data(), ys.data(), ss.data());
      for (int64_t c = 0; c < C; ++c) {
        const T* xr = x + (b * C + c) * N;
        T* o = out + (b * C + c) * N;
        const T s = sc[c];
        map_row(N, o, xr, ss.data(), [s](auto xv, auto sv) { return xv * sigmoid(s * sv); });
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& g_, const at::Tensor& y_, const at::Tensor& x_, bool x_is_y,
                   const at::Tensor& kc_, const at::Tensor& ks_, at::Tensor& gy_, at::Tensor& gx_,
                   at::Tensor& gkc_, at::Tensor& gks_) {
  const int64_t B = y_.size(0), C = y_.size(1), N = y_.numel() / std::max<int64_t>(1, B * C);
  const T *g = g_.data_ptr<T>(), *y = y_.data_ptr<T>(), *x = x_.data_ptr<T>(),
          *kc = kc_.data_ptr<T>();
  const T* ks = ks_.defined() ? ks_.data_ptr<T>() : nullptr;
  T* gy = gy_.data_ptr<T>();
  T* gx = x_is_y ? nullptr : gx_.data_ptr<T>();
  const int64_t slot = C + (ks ? N : 0);
  const Chunks ch = sample_chunks(B);
  std::vector<T> slots(ch.count * slot, T(0));
  for_each_chunk(ch, B, [&](int64_t q, int64_t b0, int64_t b1) {
    std::vector<T> yc(C), sc(C), ys(N), ss(N, T(1)), g_sc(C), g_ss(N), gt(N);
    T* acc = slots.data() + q * slot;
    for (int64_t b = b0; b < b1; ++b) {
      scores(y + b * C * N, C, N, kc, ks, yc.data(), sc.data(), ys.data(), ss.data());
      std::fill(g_ss.begin(), g_ss.end(), T(0));
      T* gyb = gy + b * C * N;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t r = (b * C + c) * N;
        const T s = sc[c];
        T* gxr = x_is_y ? gyb + c * N : gx + r;  // x is y: its direct gradient starts y's
        T gs = 0;
        map_row(N, gt.data(), ss.data(), [s](auto sv) { return sigmoid(s * sv); });
#pragma omp simd reduction(+ : gs)
        for (int64_t n = 0; n < N; ++n) {
          const T sg = gt[n];
          gxr[n] = g[r + n] * sg;
          gt[n] = g[r + n] * x[r + n] * sg * (T(1) - sg);
          gs += gt[n] * ss[n];
        }
        g_sc[c] = gs;
        if (ks) {
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) g_ss[n] += gt[n] * s;
        }
      }
      // s_c = k_c·y_c², y_c the row mean: every element of row c gets g_sc·2k_c·y_c / N.
      for (int64_t c = 0; c < C; ++c) {
        acc[c] += g_sc[c] * yc[c] * yc[c];
        const T d = g_sc[c] * T(2) * kc[c] * yc[c] / T(N);
        T* row = gyb + c * N;
        if (x_is_y) {
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) row[n] += d;
        } else {
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) row[n] = d;
        }
      }
      if (ks) {
        // s_s = k_s·y_s², y_s the column mean: every element of column n gets g_ss·2k_s·y_s / C.
        for (int64_t n = 0; n < N; ++n) {
          acc[C + n] += g_ss[n] * ys[n] * ys[n];
          gt[n] = g_ss[n] * T(2) * ks[n] * ys[n] / T(C);
        }
        for (int64_t c = 0; c < C; ++c) {
          T* row = gyb + c * N;
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) row[n] += gt[n];
        }
      }
    }
  });
  std::vector<T> total(slot);
  sum_slots(slots, ch.count, slot, total.data());
  std::memcpy(gkc_.data_ptr<T>(), total.data(), C * sizeof(T));
  if (ks) std::memcpy(gks_.data_ptr<T>(), total.data() + C, N * sizeof(T));
}

// y, x (B, C, *S); k_c (1, C); k_s (1, *S) or undefined.
void check_args(const at::Tensor& y, const at::Tensor& x, const at::Tensor& kc,
                const at::Tensor& ks) {
  check_layer_activation(y, "y");
  if (x.defined()) check_like(x, "x", y, "y");
  check_dtype_device(kc, "k_c", y, "y");
  TORCH_CHECK_VALUE(kc.dim() == 2 && kc.size(0) == 1 && kc.size(1) == y.size(1),
                    "k_c must have shape (1, ", y.size(1), "), got ", shape_str(kc.sizes()));
  if (ks.defined()) {
    check_dtype_device(ks, "k_s", y, "y");
    TORCH_CHECK_VALUE(
        ks.dim() == y.dim() - 1 && ks.size(0) == 1 && ks.sizes().slice(1) == y.sizes().slice(2),
        "k_s must have shape (1, *S) with S = ", shape_str(y.sizes().slice(2)), ", got ",
        shape_str(ks.sizes()));
  }
}

at::Tensor opt(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

}  // namespace

at::Tensor hyper_interaction(const at::Tensor& y_, const std::optional<at::Tensor>& x_,
                             const at::Tensor& kc_, const std::optional<at::Tensor>& ks_) {
  const auto x0 = opt(x_), ks = opt(ks_);
  check_args(y_, x0, kc_, ks);
  const auto y = y_.contiguous();
  const auto x = x0.defined() ? x0 : y;
  const auto kc = kc_.contiguous();
  auto out = at::empty_like(y, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "hyper_interaction",
                             [&] { forward_impl<scalar_t>(y, x, kc, ks, out); });
  return out;
}

std::vector<at::Tensor> hyper_interaction_backward(const at::Tensor& grad_, const at::Tensor& y_,
                                                   const std::optional<at::Tensor>& x_,
                                                   const at::Tensor& kc_,
                                                   const std::optional<at::Tensor>& ks_) {
  const auto x0 = opt(x_), ks = opt(ks_);
  check_args(y_, x0, kc_, ks);
  check_like(grad_, "grad", y_, "y");
  const auto y = y_.contiguous();
  const auto grad = grad_.contiguous();
  const bool x_is_y = !x0.defined();
  const auto x = x_is_y ? y : x0;
  const auto kc = kc_.contiguous();
  auto gy = at::empty_like(y, at::MemoryFormat::Contiguous);
  auto gx = x_is_y ? at::empty({0}, y.options()) : at::empty_like(x, at::MemoryFormat::Contiguous);
  auto gkc = at::empty_like(kc);
  auto gks = ks.defined() ? at::empty_like(ks) : at::empty({0}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "hyper_interaction_backward", [&] {
    backward_impl<scalar_t>(grad, y, x, x_is_y, kc, ks, gy, gx, gkc, gks);
  });
  return {gy, gx, gkc, gks};
}

}  // namespace cpu
}  // namespace terminator
