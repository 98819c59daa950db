// Channel mixers (1×1 convolutions): y = Σ_j w[:, cols_j] · x_j + b over a list of
// inputs, so a concatenation of branches is never materialized.
#include "layer_math.h"
#include "layers.h"

namespace terminator {
namespace cpu {
namespace {

// Column offset of each input's channels in w, and the total.
std::vector<int64_t> column_offsets(at::TensorList xs) {
  std::vector<int64_t> offs{0};
  for (const auto& x : xs) offs.push_back(offs.back() + x.size(1));
  return offs;
}

// Several inputs whose whole mix goes to BLAS are first copied side by side, (Σ C_j, M),
// so that one product runs over all of them: a product per input (K = C_j) is far below
// BLAS's speed and rereads y once per input.
inline bool gather_inputs(size_t inputs, int64_t cin, int64_t cout, int64_t M) {
  return inputs > 1 && use_blas(cin, cout, M);
}

// Rows offs[j].. of block (Σ C_j, nb·N) = samples [s, s + nb) of xs[j], as to_block.
template <typename T>
void gather_block(const std::vector<at::Tensor>& xs, const std::vector<int64_t>& offs, int64_t s,
                  int64_t nb, int64_t N, T* block) {
  for (size_t j = 0; j < xs.size(); ++j) {
    const int64_t cin = offs[j + 1] - offs[j];
    to_block(xs[j].data_ptr<T>() + s * cin * N, nb, cin, N, block + offs[j] * nb * N);
  }
}

template <typename T>
void pointwise_impl(const std::vector<at::Tensor>& xs, const std::vector<int64_t>& offs,
                    const at::Tensor& w, const T* b, at::Tensor& y) {
  const int64_t B = y.size(0), cout = y.size(1), N = y.numel() / std::max<int64_t>(1, B * cout);
  const int64_t ldw = offs.back();
  const T* wd = w.data_ptr<T>();
  T* yd = y.data_ptr<T>();
  const int64_t per = block_samples(N);
  const Chunks ch{(B + per - 1) / per, per};
  for_each_chunk(ch, B, [&](int64_t, int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0, M = nb * N;
    std::vector<T> xb, yb(nb > 1 ? cout * M : 0);
    T* out = nb > 1 ? yb.data() : yd + b0 * cout * N;
    if (gather_inputs(xs.size(), ldw, cout, M)) {
      xb.resize(ldw * M);
      gather_block(xs, offs, b0, nb, N, xb.data());
      mix(wd, b, xb.data(), ldw, cout, M, out);
      if (nb > 1) from_block(out, nb, cout, N, yd + b0 * cout * N);
      return;
    }
    for (size_t j = 0; j < xs.size(); ++j) {
      const int64_t cin = offs[j + 1] - offs[j];
      const T* in = xs[j].data_ptr<T>() + b0 * cin * N;
      if (nb > 1) {
        xb.resize(cin * M);
        to_block(in, nb, cin, N, xb.data());
        in = xb.data();
      }
      mix(wd + offs[j], j == 0 ? b : static_cast<const T*>(nullptr), in, cin, cout, M, out,
          /*accumulate=*/j > 0, ldw);
    }
    if (nb > 1) from_block(out, nb, cout, N, yd + b0 * cout * N);
  });
}

template <typename T>
void pointwise_backward_impl(const at::Tensor& gy, const std::vector<at::Tensor>& xs,
                             const std::vector<int64_t>& offs, const at::Tensor& w,
                             std::vector<at::Tensor>& gxs, at::Tensor& gw, T* gb) {
  const int64_t B = gy.size(0), cout = gy.size(1), N = gy.numel() / std::max<int64_t>(1, B * cout);
  const int64_t ldw = offs.back();
  const T* gyd = gy.data_ptr<T>();
  const auto wt = transposed(w.data_ptr<T>(), cout, ldw);  // (ldw, cout)
  const int64_t slot = cout * ldw + cout;
  // Chunks of samples for the weight gradient's sums; within one, blocks of short planes.
  const Chunks ch = sample_chunks(B);
  std::vector<T> slots(ch.count * slot, T(0));
  for_each_chunk(ch, B, [&](int64_t c, int64_t b0, int64_t b1) {
    T* acc = slots.data() + c * slot;
    const int64_t per_block = equal_block_samples(b1 - b0, N);
    std::vector<T> gyb, xb, gxb;
    for (int64_t s = b0; s < b1; s += per_block) {
      const int64_t per = std::min(b1, s + per_block) - s, M = per * N;
      const T* g = gyd + s * cout * N;
      if (per > 1) {
        gyb.resize(cout * M);
        to_block(g, per, cout, N, gyb.data());
        g = gyb.data();
      }
      if (gather_inputs(xs.size(), ldw, cout, M)) {
        xb.resize(ldw * M);
        gxb.resize(ldw * M);
        gather_block(xs, offs, s, per, N, xb.data());
        mix(wt.data(), static_cast<const T*>(nullptr), g, cout, ldw, M, gxb.data());
        for (size_t j = 0; j < xs.size(); ++j) {
          const int64_t cin = offs[j + 1] - offs[j];
          from_block(gxb.data() + offs[j] * M, per, cin, N, gxs[j].data_ptr<T>() + s * cin * N);
        }
        accumulate_weight_grad(g, xb.data(), ldw, cout, M, acc, acc + cout * ldw, ldw);
        continue;
      }
      for (size_t j = 0; j < xs.size(); ++j) {
        const int64_t cin = offs[j + 1] - offs[j];
        const T* x = xs[j].data_ptr<T>() + s * cin * N;
        T* gx = gxs[j].data_ptr<T>() + s * cin * N;
        if (per > 1) {
          xb.resize(cin * M);
          gxb.resize(cin * M);
          to_block(x, per, cin, N, xb.data());
          x = xb.data();
        }
        mix(wt.data() + offs[j] * cout, static_cast<const T*>(nullptr), g, cout, cin, M,
            per > 1 ? gxb.data() : gx);
        if (per > 1) from_block(gxb.data(), per, cin, N, gx);
        accumulate_weight_grad(g, x, cin, cout, M, acc + offs[j],
                               j == 0 ? acc + cout * ldw : static_cast<T*>(nullptr), ldw);
      }
    }
  });
  std::vector<T> total(slot);
  sum_slots(slots, ch.count, slot, total.data());
  std::memcpy(gw.data_ptr<T>(), total.data(), cout * ldw * sizeof(T));
  if (gb) std::memcpy(gb, total.data() + cout * ldw, cout * sizeof(T));
}

// xs (B, C_j, *S), alike but for C_j; w (C_out, Σ C_j); b (C_out) or undefined.
void check_pointwise(at::TensorList xs, const at::Tensor& w, const at::Tensor& b) {
  TORCH_CHECK_VALUE(!xs.empty(), "xs must hold at least one tensor");
  check_layer_activation(xs[0], "xs[0]");
  int64_t channels = 0;
  for (size_t j = 0; j < xs.size(); ++j) {
    const std::string name = "xs[" + std::to_string(j) + "]";
    check_dtype_device(xs[j], name.c_str(), xs[0], "xs[0]");
    TORCH_CHECK_VALUE(xs[j].dim() == xs[0].dim() && xs[j].size(0) == xs[0].size(0) &&
                          xs[j].sizes().slice(2) == xs[0].sizes().slice(2),
                      name, " must have the batch and spatial sizes of xs[0] ",
                      shape_str(xs[0].sizes()), ", got ", shape_str(xs[j].sizes()));
    channels += xs[j].size(1);
  }
  check_dtype_device(w, "weight", xs[0], "xs[0]");
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == channels, "weight must have shape (C_out, ",
                    channels, "), got ", shape_str(w.sizes()));
  if (b.defined()) {
    check_dtype_device(b, "bias", xs[0], "xs[0]");
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == w.size(0), "bias must have shape (", w.size(0),
                      ",), got ", shape_str(b.sizes()));
  }
}

std::vector<at::Tensor> contiguous_list(at::TensorList xs) {
  std::vector<at::Tensor> out;
  for (const auto& x : xs) out.push_back(x.contiguous());
  return out;
}

}  // namespace

at::Tensor pointwise(at::TensorList xs_, const at::Tensor& w_,
                     const std::optional<at::Tensor>& b_) {
  check_pointwise(xs_, w_, b_.has_value() ? *b_ : at::Tensor());
  const auto xs = contiguous_list(xs_);
  const auto offs = column_offsets(xs);
  const auto w = w_.contiguous();
  auto sizes = xs[0].sizes().vec();
  sizes[1] = w.size(0);
  auto y = at::empty(sizes, xs[0].options());
  const auto b = b_.has_value() ? b_->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "pointwise", [&] {
    pointwise_impl<scalar_t>(xs, offs, w, b.defined() ? b.data_ptr<scalar_t>() : nullptr, y);
  });
  return y;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> pointwise_backward(
    const at::Tensor& gy_, at::TensorList xs_, const at::Tensor& w_, bool has_bias) {
  check_pointwise(xs_, w_, at::Tensor());
  check_dtype_device(gy_, "grad_y", xs_[0], "xs[0]");
  TORCH_CHECK_VALUE(gy_.dim() == xs_[0].dim() && gy_.size(0) == xs_[0].size(0) &&
                        gy_.size(1) == w_.size(0) &&
                        gy_.sizes().slice(2) == xs_[0].sizes().slice(2),
                    "grad_y must have shape (B, C_out, *S) = (", xs_[0].size(0), ", ", w_.size(0),
                    ", ...), got ", shape_str(gy_.sizes()));
  const auto xs = contiguous_list(xs_);
  const auto offs = column_offsets(xs);
  const auto w = w_.contiguous();
  const auto gy = gy_.contiguous();
  std::vector<at::Tensor> gxs;
  for (const auto& x : xs) gxs.push_back(at::empty_like(x));
  auto gw = at::empty_like(w);
  auto gb = has_bias ? at::empty({w.size(0)}, w.options()) : at::empty({0}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "pointwise_backward", [&] {
    pointwise_backward_impl<scalar_t>(gy, xs, offs, w, gxs, gw,
                                      has_bias ? gb.data_ptr<scalar_t>() : nullptr);
  });
  return {gxs, gw, gb};
}

}  // namespace cpu
}  // namespace terminator
