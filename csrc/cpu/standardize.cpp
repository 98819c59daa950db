// Standardization per channel, then optionally GELU and a scalar bias:
//   y = act((x − mean) · rstd) + bias,  act = GELU or identity,
// with batch statistics (over B and N) for the channels listed in `batch_channels` and
// instance statistics (over N, per sample) for the others: BatchStandardization,
// InstanceStandardization and G-IBS are all this op.
#include "layer_math.h"
#include "layers.h"

namespace terminator {
namespace cpu {
namespace {

// Per channel: -1 for instance statistics, else its slot in the running statistics.
std::vector<int64_t> channel_slots(const at::Tensor& batch_channels, int64_t C) {
  TORCH_CHECK_VALUE(batch_channels.dim() == 1 && !at::isFloatingType(batch_channels.scalar_type()),
                    "batch_channels must be a 1D tensor of channel indices, got ",
                    shape_str(batch_channels.sizes()), " ",
                    dtype_str(batch_channels.scalar_type()));
  std::vector<int64_t> slot(C, -1);
  const auto idx = batch_channels.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < idx.numel(); ++j) {
    TORCH_CHECK_VALUE(p[j] >= 0 && p[j] < C && slot[p[j]] < 0,
                      "batch_channels must list distinct channels in [0, ", C, "), got ", p[j],
                      " at ", j);
    slot[p[j]] = j;
  }
  return slot;
}

// Per batch channel: the mean over (B, N), then the mean square deviation, in two passes
// of deterministic chunked sums (accumulated in double).
template <typename T>
void batch_moments(const T* x, int64_t B, int64_t C, int64_t N, const std::vector<int64_t>& slot,
                   std::vector<double>& mean, std::vector<double>& var) {
  const Chunks ch = sample_chunks(B);
  std::vector<double> slots(ch.count * C);
  for (int pass = 0; pass < 2; ++pass) {
    std::fill(slots.begin(), slots.end(), 0.0);
    for_each_chunk(ch, B, [&](int64_t q, int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t c = 0; c < C; ++c) {
          if (slot[c] < 0) continue;
          const T* row = x + (b * C + c) * N;
          T s = 0;
          if (pass == 0) {
#pragma omp simd reduction(+ : s)
            for (int64_t n = 0; n < N; ++n) s += row[n];
          } else {
            const T m = T(mean[c]);
#pragma omp simd reduction(+ : s)
            for (int64_t n = 0; n < N; ++n) s += (row[n] - m) * (row[n] - m);
          }
          slots[q * C + c] += double(s);
        }
      }
    });
    auto& out = pass == 0 ? mean : var;
    for (int64_t c = 0; c < C; ++c) {
      double s = 0;
      for (int64_t q = 0; q < ch.count; ++q) s += slots[q * C + c];
      out[c] = s / double(B * N);
    }
  }
}

template <typename T>
void standardize_impl(const at::Tensor& x_, const std::vector<int64_t>& slot,
                      const at::Tensor& running_mean, const at::Tensor& running_var, bool use_batch,
                      double eps, bool gelu_act, const at::Tensor& bias, at::Tensor& y_,
                      at::Tensor& stats_, at::Tensor& moments_) {
  const int64_t B = x_.size(0), C = x_.size(1), N = x_.numel() / std::max<int64_t>(1, B * C);
  const T* x = x_.data_ptr<T>();
  T* y = y_.data_ptr<T>();
  T* stats = stats_.data_ptr<T>();  // (2, B, C): mean, rstd
  const T b_add = bias.defined() ? bias.item<T>() : T(0);
  std::vector<double> mean(C, 0.0), var(C, 0.0);
  if (use_batch) {
    batch_moments(x, B, C, N, slot, mean, var);
    const int64_t nb = moments_.size(1);
    T* moments = moments_.data_ptr<T>();  // (2, nb): the batch channels' mean and variance
    for (int64_t c = 0; c < C; ++c) {
      if (slot[c] < 0) continue;
      moments[slot[c]] = T(mean[c]);
      moments[nb + slot[c]] = T(var[c]);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      if (slot[c] < 0) continue;
      mean[c] = double(running_mean.data_ptr<T>()[slot[c]]);
      var[c] = double(running_var.data_ptr<T>()[slot[c]]);
    }
  }
  at::parallel_for(0, B * C, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, N)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) {
                       const int64_t c = r % C;
                       const T* xr = x + r * N;
                       T* yr = y + r * N;
                       T m, rstd;
                       if (slot[c] < 0) {
                         rstd = standardize_row(xr, N, T(eps), yr, &m);
                       } else {
                         m = T(mean[c]);
                         rstd = T(1.0 / std::sqrt(var[c] + eps));
#pragma omp simd
                         for (int64_t n = 0; n < N; ++n) yr[n] = (xr[n] - m) * rstd;
                       }
                       if (gelu_act) {
                         map_row(N, yr, yr, [b_add](auto v) { return gelu(v) + b_add; });
                       } else if (b_add != T(0)) {
#pragma omp simd
                         for (int64_t n = 0; n < N; ++n) yr[n] += b_add;
                       }
                       stats[r] = m;
                       stats[B * C + r] = rstd;
                     }
                   });
}

template <typename T>
void standardize_backward_impl(const at::Tensor& gy_, const at::Tensor& x_,
                               const at::Tensor& stats_, const std::vector<int64_t>& slot,
                               bool use_batch, bool gelu_act, at::Tensor& gx_, T* gbias) {
  const int64_t B = x_.size(0), C = x_.size(1), N = x_.numel() / std::max<int64_t>(1, B * C);
  const T* x = x_.data_ptr<T>();
  const T* gy = gy_.data_ptr<T>();
  const T* stats = stats_.data_ptr<T>();
  T* gx = gx_.data_ptr<T>();
  // Pass 1, per sample: the gradient of x̂ (kept in gx); instance channels finish here;
  // batch channels (with batch statistics) sum Σ g and Σ g·x̂ per chunk; Σ gy for the bias.
  const Chunks ch = sample_chunks(B);
  const int64_t slot_size = 2 * C + 1;
  std::vector<double> slots(ch.count * slot_size, 0.0);
  for_each_chunk(ch, B, [&](int64_t q, int64_t b0, int64_t b1) {
    double* acc = slots.data() + q * slot_size;
    std::vector<T> xhat(N);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t r = b * C + c;
        const T* xr = x + r * N;
        const T* gr = gy + r * N;
        T* g = gx + r * N;
        const T m = stats[r], rstd = stats[B * C + r];
        double sg = 0;  // the bias's gradient sums every value of gy: float32 rows lose digits
#pragma omp simd reduction(+ : sg)
        for (int64_t n = 0; n < N; ++n) {
          xhat[n] = (xr[n] - m) * rstd;
          sg += double(gr[n]);
        }
        acc[2 * C] += sg;
        if (gelu_act) {
          map_row(N, g, gr, xhat.data(), [](auto gv, auto xv) { return gv * gelu_grad(xv); });
        } else {
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) g[n] = gr[n];
        }
        if (slot[c] < 0) {
          standardize_row_backward(g, xhat.data(), rstd, N, g);
        } else if (use_batch) {
          T s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
          for (int64_t n = 0; n < N; ++n) {
            s1 += g[n];
            s2 += g[n] * xhat[n];
          }
          acc[c] += double(s1);
          acc[C + c] += double(s2);
        } else {
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) g[n] *= rstd;
        }
      }
    }
  });
  std::vector<double> total(slot_size, 0.0);
  for (int64_t q = 0; q < ch.count; ++q)
    for (int64_t j = 0; j < slot_size; ++j) total[j] += slots[q * slot_size + j];
  if (gbias) *gbias = T(total[2 * C]);
  if (!use_batch) return;
  // Pass 2: batch channels, gx = rstd·(g − mean(g) − x̂·mean(g·x̂)) over (B, N).
  const double count = double(B * N);
  at::parallel_for(0, B * C, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, N)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) {
                       const int64_t c = r % C;
                       if (slot[c] < 0) continue;
                       const T m = stats[r], rstd = stats[B * C + r];
                       const T m1 = T(total[c] / count), m2 = T(total[C + c] / count);
                       const T* xr = x + r * N;
                       T* g = gx + r * N;
#pragma omp simd
                       for (int64_t n = 0; n < N; ++n)
                         g[n] = rstd * (g[n] - m1 - (xr[n] - m) * rstd * m2);
                     }
                   });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> standardize(
    const at::Tensor& x_, const at::Tensor& batch_channels,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool use_batch_stats, double eps, bool gelu_act, const std::optional<at::Tensor>& bias) {
  check_layer_activation(x_, "x");
  const auto x = x_.contiguous();
  const int64_t B = x.size(0), C = x.size(1);
  const auto slot = channel_slots(batch_channels, C);
  const bool has_running = running_mean.has_value() && running_mean->defined();
  const int64_t nb = batch_channels.size(0);
  for (const auto& [t, name] :
       {std::pair{running_mean, "running_mean"}, {running_var, "running_var"}}) {
    if (!t.has_value() || !t->defined()) continue;
    check_dtype_device(*t, name, x, "x");
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == nb, name, " must have shape (", nb, ",), got ",
                      shape_str(t->sizes()));
  }
  TORCH_CHECK_VALUE(has_running == (running_var.has_value() && running_var->defined()),
                    "running_mean and running_var must both be given or both be None");
  if (bias.has_value() && bias->defined()) {
    check_dtype_device(*bias, "bias", x, "x");
    TORCH_CHECK_VALUE(bias->dim() == 0, "bias must be a scalar tensor, got shape ",
                      shape_str(bias->sizes()));
  }
  TORCH_CHECK_VALUE(!(use_batch_stats || !has_running) || nb == 0 ||
                        B * (x.numel() / std::max<int64_t>(1, B * C)) > 1,
                    "batch standardization needs more than one value per channel, got x ",
                    shape_str(x.sizes()));
  const bool use_batch = use_batch_stats || !has_running;
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto stats = at::empty({2, B, C}, x.options());
  auto moments = at::zeros({2, batch_channels.size(0)}, x.options());
  const at::Tensor rm = has_running ? running_mean->contiguous() : at::Tensor();
  const at::Tensor rv = has_running ? running_var->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "standardize", [&] {
    standardize_impl<scalar_t>(x, slot, rm, rv, use_batch, eps, gelu_act, b, y, stats, moments);
  });
  return {y, stats, moments};
}

std::tuple<at::Tensor, at::Tensor> standardize_backward(const at::Tensor& gy_, const at::Tensor& x_,
                                                        const at::Tensor& stats,
                                                        const at::Tensor& batch_channels,
                                                        bool use_batch, bool gelu_act,
                                                        bool has_bias) {
  check_layer_activation(x_, "x");
  check_like(gy_, "grad_y", x_, "x");
  check_dtype_device(stats, "stats", x_, "x");
  TORCH_CHECK_VALUE(stats.dim() == 3 && stats.size(0) == 2 && stats.size(1) == x_.size(0) &&
                        stats.size(2) == x_.size(1),
                    "stats must have shape (2, B, C) = (2, ", x_.size(0), ", ", x_.size(1),
                    "), got ", shape_str(stats.sizes()));
  const auto x = x_.contiguous();
  const auto gy = gy_.contiguous();
  const auto slot = channel_slots(batch_channels, x.size(1));
  auto gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto gb = has_bias ? at::empty({}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "standardize_backward", [&] {
    standardize_backward_impl<scalar_t>(gy, x, stats.contiguous(), slot, use_batch, gelu_act, gx,
                                        has_bias ? gb.data_ptr<scalar_t>() : nullptr);
  });
  return {gx, gb};
}

}  // namespace cpu
}  // namespace terminator
