// The recursive gated unit, r = W_y(GELU(IN(W_k u ⊙ W_q(W_v u))) + P), a block of samples
// at a time (their planes side by side, in cache); the backward recomputes the forward's
// intermediates.
#include <torch/library.h>

#include "layer_math.h"
#include "layers.h"

namespace terminator {
namespace cpu {
namespace {

constexpr double kInstanceEps = 1e-5;

// The forward of a block of nb samples (planes (C, M), M = nb·N) up to e = GELU(n) + P;
// keeps a, v, q, n and the rstd of every (channel, sample) row.
template <typename T>
struct RguBlock {
  int64_t C, N, nb, M;
  Scratch<T> a, v, q, n, e, rstd;
  RguBlock(int64_t C_, int64_t N_, int64_t nb_)
      : C(C_),
        N(N_),
        nb(nb_),
        M(nb_ * N_),
        a(C * M),
        v(C * M),
        q(C * M),
        n(C * M),
        e(C * M),
        rstd(C * nb) {}

  void forward(const T* u, const T* wk, const T* bk, const T* wv, const T* bv, const T* wq,
               const T* bq, const T* p) {
    mix(wk, bk, u, C, C, M, a.data());
    mix(wv, bv, u, C, C, M, v.data());
    mix(wq, bq, v.data(), C, C, M, q.data());
    for (int64_t c = 0; c < C; ++c) {
      T* nc = n.data() + c * M;
      const T* ac = a.data() + c * M;
      const T* qc = q.data() + c * M;
#pragma omp simd
      for (int64_t j = 0; j < M; ++j) nc[j] = ac[j] * qc[j];
      for (int64_t s = 0; s < nb; ++s) {
        T* seg = nc + s * N;
        rstd[c * nb + s] = standardize_row(seg, N, T(kInstanceEps), seg);
        T* ec = e.data() + c * M + s * N;
        map_row(N, ec, seg, p, [](auto sv, auto pv) { return gelu(sv) + pv; });
      }
    }
  }
};

// u (B, C, *S); four (C, C) mixers with (C) biases; the bias map of shape S.
void check_rgu(const at::Tensor& u, const std::vector<at::Tensor>& w) {
  check_layer_activation(u, "u");
  const int64_t C = u.size(1);
  const char* names[9] = {"w_k", "b_k", "w_v", "b_v", "w_q", "b_q", "w_y", "b_y", "bias_map"};
  for (int i = 0; i < 8; ++i) {
    check_dtype_device(w[i], names[i], u, "u");
    const bool ok = i % 2 == 0 ? w[i].dim() == 2 && w[i].size(0) == C && w[i].size(1) == C
                               : w[i].dim() == 1 && w[i].size(0) == C;
    TORCH_CHECK_VALUE(ok, names[i], " must have shape ", i % 2 == 0 ? "(C, C)" : "(C,)",
                      " with C=", C, ", got ", shape_str(w[i].sizes()));
  }
  check_dtype_device(w[8], "bias_map", u, "u");
  TORCH_CHECK_VALUE(w[8].sizes() == u.sizes().slice(2),
                    "bias_map must have the spatial shape of u ", shape_str(u.sizes().slice(2)),
                    ", got ", shape_str(w[8].sizes()));
}

std::vector<at::Tensor> contiguous_all(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

template <typename T>
void rgu_forward_impl(const at::Tensor& u, const std::vector<at::Tensor>& w, at::Tensor& r) {
  const int64_t B = u.size(0), C = u.size(1), N = u.numel() / std::max<int64_t>(1, B * C);
  const T *wk = w[0].data_ptr<T>(), *bk = w[1].data_ptr<T>(), *wv = w[2].data_ptr<T>(),
          *bv = w[3].data_ptr<T>(), *wq = w[4].data_ptr<T>(), *bq = w[5].data_ptr<T>(),
          *wy = w[6].data_ptr<T>(), *by = w[7].data_ptr<T>(), *p = w[8].data_ptr<T>();
  const T* ud = u.data_ptr<T>();
  T* rd = r.data_ptr<T>();
  const int64_t per = block_samples(N);
  at::parallel_for(0, (B + per - 1) / per, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t b0 = q * per, nb = std::min(B, b0 + per) - b0;
      RguBlock<T> s(C, N, nb);
      Scratch<T> in(nb > 1 ? C * s.M : 0), out(nb > 1 ? C * s.M : 0);
      if (nb > 1) to_block(ud + b0 * C * N, nb, C, N, in.data());
      s.forward(nb > 1 ? in.data() : ud + b0 * C * N, wk, bk, wv, bv, wq, bq, p);
      mix(wy, by, s.e.data(), C, C, s.M, nb > 1 ? out.data() : rd + b0 * C * N);
      if (nb > 1) from_block(out.data(), nb, C, N, rd + b0 * C * N);
    }
  });
}

template <typename T>
void rgu_backward_impl(const at::Tensor& gr, const at::Tensor& u, const std::vector<at::Tensor>& w,
                       at::Tensor& gu, std::vector<at::Tensor>& gw) {
  const int64_t B = u.size(0), C = u.size(1), N = u.numel() / std::max<int64_t>(1, B * C);
  const T *wk = w[0].data_ptr<T>(), *bk = w[1].data_ptr<T>(), *wv = w[2].data_ptr<T>(),
          *bv = w[3].data_ptr<T>(), *wq = w[4].data_ptr<T>(), *bq = w[5].data_ptr<T>(),
          *wy = w[6].data_ptr<T>(), *p = w[8].data_ptr<T>();
  const auto wkt = transposed(wk, C, C), wvt = transposed(wv, C, C), wqt = transposed(wq, C, C),
             wyt = transposed(wy, C, C);
  const T* ud = u.data_ptr<T>();
  const T* gd = gr.data_ptr<T>();
  T* gud = gu.data_ptr<T>();
  // Per chunk: gWk gbk gWv gbv gWq gbq gWy gby gP.
  const int64_t CC = C * C;
  const int64_t offs[10] = {0,
                            CC,
                            CC + C,
                            2 * CC + C,
                            2 * CC + 2 * C,
                            3 * CC + 2 * C,
                            3 * CC + 3 * C,
                            4 * CC + 3 * C,
                            4 * CC + 4 * C,
                            4 * CC + 4 * C + N};
  const int64_t slot = offs[9];
  const Chunks ch = sample_chunks(B);
  std::vector<T> slots(ch.count * slot, T(0));
  for_each_chunk(ch, B, [&](int64_t c, int64_t c0, int64_t c1) {
    const int64_t per = equal_block_samples(c1 - c0, N);
    for (int64_t b0 = c0; b0 < c1; b0 += per) {
      const int64_t nb = std::min(c1, b0 + per) - b0;
      RguBlock<T> s(C, N, nb);
      const int64_t M = s.M;
      // One sample's planes are used where they are; several are copied side by side.
      Scratch<T> ubv(nb > 1 ? C * M : 0), grv(nb > 1 ? C * M : 0), gubv(nb > 1 ? C * M : 0);
      Scratch<T> ge(C * M), gq(C * M), gv(C * M), ga(C * M);
      T* acc = slots.data() + c * slot;
      const T* ub = nb > 1 ? ubv.data() : ud + b0 * C * N;
      const T* grb = nb > 1 ? grv.data() : gd + b0 * C * N;
      T* gub = nb > 1 ? gubv.data() : gud + b0 * C * N;
      if (nb > 1) {
        to_block(ud + b0 * C * N, nb, C, N, ubv.data());
        to_block(gd + b0 * C * N, nb, C, N, grv.data());
      }
      s.forward(ub, wk, bk, wv, bv, wq, bq, p);
      accumulate_weight_grad(grb, s.e.data(), C, C, M, acc + offs[6], acc + offs[7]);
      mix(wyt.data(), static_cast<const T*>(nullptr), grb, C, C, M, ge.data());
      T* gp = acc + offs[8];
      for (int64_t cc = 0; cc < C; ++cc)
        for (int64_t sm = 0; sm < nb; ++sm) {
          const T* gec = ge.data() + cc * M + sm * N;
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) gp[j] += gec[j];
        }
      for (int64_t cc = 0; cc < C; ++cc) {
        T* gec = ge.data() + cc * M;  // becomes the gradient of n, then of g
        const T* nc = s.n.data() + cc * M;
        map_row(M, gec, gec, nc, [](auto gv, auto nv) { return gv * gelu_grad(nv); });
        for (int64_t sm = 0; sm < nb; ++sm)
          standardize_row_backward(gec + sm * N, nc + sm * N, s.rstd[cc * nb + sm], N,
                                   gec + sm * N);
        const T* ac = s.a.data() + cc * M;
        const T* qc = s.q.data() + cc * M;
        T* gac = ga.data() + cc * M;
        T* gqc = gq.data() + cc * M;
#pragma omp simd
        for (int64_t j = 0; j < M; ++j) {
          gac[j] = gec[j] * qc[j];
          gqc[j] = gec[j] * ac[j];
        }
      }
      accumulate_weight_grad(gq.data(), s.v.data(), C, C, M, acc + offs[4], acc + offs[5]);
      mix(wqt.data(), static_cast<const T*>(nullptr), gq.data(), C, C, M, gv.data());
      accumulate_weight_grad(gv.data(), ub, C, C, M, acc + offs[2], acc + offs[3]);
      accumulate_weight_grad(ga.data(), ub, C, C, M, acc + offs[0], acc + offs[1]);
      mix(wkt.data(), static_cast<const T*>(nullptr), ga.data(), C, C, M, gub);
      mix(wvt.data(), static_cast<const T*>(nullptr), gv.data(), C, C, M, gub, /*accumulate=*/true);
      if (nb > 1) from_block(gub, nb, C, N, gud + b0 * C * N);
    }
  });
  std::vector<T> total(slot);
  sum_slots(slots, ch.count, slot, total.data());
  for (int i = 0; i < 9; ++i) {
    std::memcpy(gw[i].data_ptr<T>(), total.data() + offs[i], (offs[i + 1] - offs[i]) * sizeof(T));
  }
}

}  // namespace

at::Tensor rgu(const at::Tensor& u_, const at::Tensor& wk, const at::Tensor& bk,
               const at::Tensor& wv, const at::Tensor& bv, const at::Tensor& wq,
               const at::Tensor& bq, const at::Tensor& wy, const at::Tensor& by,
               const at::Tensor& p) {
  check_rgu(u_, {wk, bk, wv, bv, wq, bq, wy, by, p});
  const auto u = u_.contiguous();
  const auto w = contiguous_all({wk, bk, wv, bv, wq, bq, wy, by, p});
  auto r = at::empty_like(u, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "rgu", [&] { rgu_forward_impl<scalar_t>(u, w, r); });
  return r;
}

std::vector<at::Tensor> rgu_backward(const at::Tensor& gr_, const at::Tensor& u_,
                                     const at::Tensor& wk, const at::Tensor& bk,
                                     const at::Tensor& wv, const at::Tensor& bv,
                                     const at::Tensor& wq, const at::Tensor& bq,
                                     const at::Tensor& wy, const at::Tensor& by,
                                     const at::Tensor& p) {
  check_rgu(u_, {wk, bk, wv, bv, wq, bq, wy, by, p});
  check_like(gr_, "grad_r", u_, "u");
  const auto u = u_.contiguous();
  const auto gr = gr_.contiguous();
  const auto w = contiguous_all({wk, bk, wv, bv, wq, bq, wy, by, p});
  auto gu = at::empty_like(u, at::MemoryFormat::Contiguous);
  std::vector<at::Tensor> grads;
  for (const auto& t : w) grads.push_back(at::empty_like(t));
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "rgu_backward",
                             [&] { rgu_backward_impl<scalar_t>(gr, u, w, gu, grads); });
  grads.insert(grads.begin(), gu);
  return grads;
}

}  // namespace cpu
}  // namespace terminator
