// Shared by every backend: argument checks (one place, same messages as the
// Python wrapper) and small layout helpers. Nothing here is CPU- or CUDA-specific.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/irange.h>

#include <string>
#include <tuple>

namespace terminator {

// Shapes and dtypes printed as Python prints them, so both sides' messages match.
inline std::string shape_str(c10::IntArrayRef sizes) {
  std::string out = "(";
  for (const auto i : c10::irange(sizes.size())) {
    out += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return out + (sizes.size() == 1 ? ",)" : ")");
}

inline std::string dtype_str(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

// Activations are (B, C, *S) with S = (L,) or (H, W).
inline int64_t spatial_dims(const at::Tensor& t) { return t.dim() - 2; }

// Raw torch.ops calls can pass None for a Tensor argument: an undefined tensor.
inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), name, " must be a torch.Tensor, got NoneType");
}

inline void check_floating(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  const auto dtype = t.scalar_type();
  TORCH_CHECK_VALUE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      name,
      " must be a floating-point tensor (float32, float64, float16 or "
      "bfloat16), got ",
      dtype_str(t.scalar_type()));
}

inline void check_activation(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  TORCH_CHECK_VALUE(t.dim() == 3 || t.dim() == 4, name,
                    " must have shape (B, C, L) or (B, C, H, W), got ", shape_str(t.sizes()));
  check_floating(t, name);
}

inline void check_same_device_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref,
                                    const char* ref_name) {
  check_defined(t, name);
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the same device as ", ref_name,
                    " (", ref.device(), "), got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), name, " must have the same dtype as ",
                    ref_name, " (", dtype_str(ref.scalar_type()), "), got ",
                    dtype_str(t.scalar_type()));
}

// A kernel for activations `x` (B, C, *S) is (C, *K), (1, C, *K) or (B, C, *K).
// Returns its batch size: 1 for a shared kernel, B for per-sample kernels.
inline int64_t check_kernel(const at::Tensor& kernel, const char* name, const at::Tensor& x,
                            const char* x_name, bool full_size) {
  check_floating(kernel, name);
  check_same_device_dtype(kernel, name, x, x_name);
  const int64_t d = spatial_dims(x);
  const int64_t B = x.size(0), C = x.size(1);
  const bool batched = kernel.dim() == x.dim();
  TORCH_CHECK_VALUE(batched || kernel.dim() == x.dim() - 1, name,
                    " must have shape (C, *K), "
                    "(1, C, *K) or (B, C, *K) with ",
                    d, " spatial dim(s) like ", x_name, " ", shape_str(x.sizes()), ", got ",
                    shape_str(kernel.sizes()));
  const int64_t kb = batched ? kernel.size(0) : 1;
  TORCH_CHECK_VALUE(kb == 1 || kb == B, name, " batch size must be 1 or B=", B, " (", x_name, " ",
                    shape_str(x.sizes()), "), got ", shape_str(kernel.sizes()));
  const int64_t off = batched ? 1 : 0;
  TORCH_CHECK_VALUE(kernel.size(off) == C, name, " must have C=", C, " channels like ", x_name, " ",
                    shape_str(x.sizes()), ", got ", shape_str(kernel.sizes()));
  for (const auto i : c10::irange(d)) {
    const int64_t k = kernel.size(off + 1 + i), s = x.size(2 + i);
    if (full_size) {
      TORCH_CHECK_VALUE(k == s, name, " must have the spatial size of ", x_name, " ",
                        shape_str(x.sizes()), ", got ", shape_str(kernel.sizes()));
    } else {
      TORCH_CHECK_VALUE(k >= 1 && k <= s, name,
                        " spatial size must be between 1 and the input "
                        "size ",
                        shape_str(x.sizes().slice(2)), " in every dim, got ",
                        shape_str(kernel.sizes()));
    }
  }
  return kb;
}

enum class GlobalMode { Dot, Matmul, Conv };

inline GlobalMode parse_mode(c10::string_view mode) {
  if (mode == "dot") return GlobalMode::Dot;
  if (mode == "matmul") return GlobalMode::Matmul;
  if (mode == "conv") return GlobalMode::Conv;
  TORCH_CHECK_VALUE(false, "mode must be one of 'dot', 'matmul', 'conv', got '", std::string(mode),
                    "'");
}

// Checks hyperzzw_global's arguments; returns the kernel's batch size (1 or B).
inline int64_t check_global_args(const at::Tensor& k, const at::Tensor& z,
                                 const std::optional<at::Tensor>& x, GlobalMode mode) {
  check_activation(z, "z");
  if (x.has_value()) {
    check_same_device_dtype(*x, "x", z, "z");
    TORCH_CHECK_VALUE(x->sizes() == z.sizes(), "x must have the shape of z ", shape_str(z.sizes()),
                      ", got ", shape_str(x->sizes()));
  }
  if (mode == GlobalMode::Matmul) {
    TORCH_CHECK_VALUE(z.dim() == 4 && z.size(2) == z.size(3),
                      "mode='matmul' needs square 2D "
                      "activations z (B, C, H, W) with H == W, got ",
                      shape_str(z.sizes()));
  }
  return check_kernel(k, "k", z, "z", /*full_size=*/true);
}

// Checks hyperkernel_conv's arguments; returns the kernel's batch size (1 or B).
inline int64_t check_conv_args(const at::Tensor& x, const at::Tensor& w) {
  check_activation(x, "x");
  return check_kernel(w, "w", x, "x", /*full_size=*/false);
}

// Kernel (C,*K) / (1,C,*K) / (B,C,*K) -> contiguous (Bk, C, Kh, Kw).
inline at::Tensor kernel_planes(const at::Tensor& kernel, int64_t data_dim) {
  at::Tensor k = kernel.dim() == data_dim + 1 ? kernel.unsqueeze(0) : kernel;
  if (data_dim == 1) k = k.unsqueeze(2);
  return k.contiguous();
}

// Activation (B,C,*S) -> contiguous (B, C, H, W).
inline at::Tensor activation_planes(const at::Tensor& x) {
  return (x.dim() == 3 ? x.unsqueeze(2) : x).contiguous();
}

// Smallest even n >= m whose only prime factors are 2, 3, 5 and 7: fast FFT sizes (1
// for m <= 1). Even, because a real transform of even length runs as a complex one of
// half the length, much faster than an odd one (docs/PERFORMANCE.md).
inline int64_t good_fft_size(int64_t m) {
  if (m <= 1) return 1;
  for (int64_t n = m + m % 2;; n += 2) {
    int64_t r = n;
    for (int64_t p : {2, 3, 5, 7}) {
      while (r % p == 0) r /= p;
    }
    if (r == 1) return n;
  }
}

// "same" cross-correlation pads ⌊(K−1)/2⌋ before (PyTorch's padding="same").
inline int64_t same_pad_before(int64_t kernel_size) { return (kernel_size - 1) / 2; }

// float16 / bfloat16 are computed in float32; float32 and float64 in themselves.
inline at::ScalarType compute_dtype(at::ScalarType t) { return at::toOpMathType(t); }

// The chain rule through Ŵ = k ⊙ z of y = op(Ŵ, u), u = x or z when x is absent: from
// gŴ and gu (B, C, *S) in compute_dtype, the gradients of k (Bk, C, *S) (summed over the
// batch when Bk = 1), z and x (undefined when x is z), in z's dtype and contiguous.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> grads_through_product(
    const at::Tensor& g_what, const at::Tensor& g_u, const at::Tensor& k4, const at::Tensor& z4,
    bool has_x) {
  const auto dtype = g_what.scalar_type();
  auto gk = g_what * z4.to(dtype);
  if (k4.size(0) == 1) gk = gk.sum(0, /*keepdim=*/true);
  auto gz = g_what * k4.to(dtype);
  if (!has_x) gz = gz + g_u;
  const auto out = z4.scalar_type();
  return {gk.to(out).contiguous(), gz.to(out).contiguous(),
          has_x ? g_u.to(out).contiguous() : at::Tensor()};
}

}  // namespace terminator
