// The local slow net (SlowNetL): per-sample hyper-kernels (C, *K) from a context u.
//
//   pooled = adaptive_avg_pool(u, K)                      (C, Nk)
//   ctx    = GELU(W_f (W_r pooled + b_r) + b_f)           (H, Nk)   ("batch": pooled averaged)
//   s_i    = sin(W_Fi · coords + b_Fi), i = 0..L          (H, Nk)   shared by the samples
//   h_0 = s_0;  for i = 1..L:
//     pre  = s_i ⊙ (W_li h_{i-1} + b_li) + P              P (Nk) broadcast over units
//     h_i  = (α_i pre + β_i pre / max(‖pre‖, 1e-12)) ⊙ (W_gi ctx + b_gi)   ‖·‖ over Nk per unit
//   kernel = W_o h_L + b_o                                (C, Nk)
//
// Planes are (units, positions) with the positions of a block of samples side by side, so
// every product is one channel mix over the block. The backward recomputes the forward.
// W_r and W_f have no nonlinearity between them: they run as one product (W_f W_r) pooled, H×C
// instead of H×C and H×H per position, and their gradients follow from that product's.
#include "layer_math.h"
#include "layers.h"

namespace terminator {
namespace cpu {
namespace {

constexpr double kNormalizeEps = 1e-12;

// Rows [start, end) of an adaptive average pool from S to K (as PyTorch computes them).
inline int64_t pool_start(int64_t i, int64_t S, int64_t K) { return (i * S) / K; }
inline int64_t pool_end(int64_t i, int64_t S, int64_t K) { return ((i + 1) * S + K - 1) / K; }

struct Geometry {
  int64_t B, C, H, L, Nk, d;
  std::vector<int64_t> S, K;  // input and kernel sizes, 1 or 2 dims
  int64_t N;                  // input positions
};

// The bins [start, end) of an adaptive average pool from S to K, and their sizes.
struct Bins {
  std::vector<int64_t> start, end;
  Bins(int64_t S, int64_t K) : start(K), end(K) {
    for (int64_t i = 0; i < K; ++i) start[i] = pool_start(i, S, K), end[i] = pool_end(i, S, K);
  }
  int64_t size(int64_t i) const { return end[i] - start[i]; }
};

// Σ p[0..n): vectorized for long bins; a plain loop for short ones (MNIST-1D's are 4-6 long),
// where a vector reduction's setup costs more than the sum.
template <typename T>
inline T bin_sum(const T* p, int64_t n) {
  T s = 0;
  if (n >= 16) {
#pragma omp simd reduction(+ : s)
    for (int64_t q = 0; q < n; ++q) s += p[q];
  } else {
    for (int64_t q = 0; q < n; ++q) s += p[q];
  }
  return s;
}

// pooled (C, Nk) of one sample's planes u (C, N): the rows of a bin summed first (vectorized
// over the row; a bin of one row, as every bin in 1D, is read where it is), then the columns
// of each bin.
template <typename T>
void pool(const Geometry& g, const T* u, T* pooled) {
  const int64_t Sh = g.d == 2 ? g.S[0] : 1, Sw = g.S.back();
  const int64_t Kh = g.d == 2 ? g.K[0] : 1, Kw = g.K.back();
  const Bins rows_of(Sh, Kh), cols_of(Sw, Kw);
  std::vector<T> rows(Sw);
  for (int64_t c = 0; c < g.C; ++c) {
    const T* uc = u + c * g.N;
    for (int64_t i = 0; i < Kh; ++i) {
      const T* row = uc + rows_of.start[i] * Sw;
      if (rows_of.size(i) > 1) {
        std::fill(rows.begin(), rows.end(), T(0));
        for (int64_t r = rows_of.start[i]; r < rows_of.end[i]; ++r) {
          const T* ur = uc + r * Sw;
#pragma omp simd
          for (int64_t q = 0; q < Sw; ++q) rows[q] += ur[q];
        }
        row = rows.data();
      }
      for (int64_t j = 0; j < Kw; ++j) {
        const T s = bin_sum(row + cols_of.start[j], cols_of.size(j));
        pooled[c * g.Nk + i * Kw + j] = s / T(rows_of.size(i) * cols_of.size(j));
      }
    }
  }
}

// gu (C, N) = the pool's gradient for g_pooled (C, Nk), scaled (bins may overlap). A bin of
// one row adds into it directly; taller bins add a row of column sums to each of their rows.
template <typename T>
void pool_backward(const Geometry& g, const T* g_pooled, T scale, T* gu) {
  const int64_t Sh = g.d == 2 ? g.S[0] : 1, Sw = g.S.back();
  const int64_t Kh = g.d == 2 ? g.K[0] : 1, Kw = g.K.back();
  const Bins rows_of(Sh, Kh), cols_of(Sw, Kw);
  std::fill(gu, gu + g.C * g.N, T(0));
  std::vector<T> cols(Sw);
  for (int64_t c = 0; c < g.C; ++c) {
    T* gc = gu + c * g.N;
    for (int64_t i = 0; i < Kh; ++i) {
      const bool one_row = rows_of.size(i) == 1;
      T* target = one_row ? gc + rows_of.start[i] * Sw : cols.data();
      if (!one_row) std::fill(cols.begin(), cols.end(), T(0));
      for (int64_t j = 0; j < Kw; ++j) {
        const T v = g_pooled[c * g.Nk + i * Kw + j] * scale / T(rows_of.size(i) * cols_of.size(j));
        for (int64_t q = cols_of.start[j]; q < cols_of.end[j]; ++q) target[q] += v;
      }
      if (one_row) continue;
      for (int64_t r = rows_of.start[i]; r < rows_of.end[i]; ++r) {
        T* gr = gc + r * Sw;
#pragma omp simd
        for (int64_t q = 0; q < Sw; ++q) gr[q] += cols[q];
      }
    }
  }
}

// Parameter pointers, in the op's argument order.
template <typename T>
struct Params {
  const T* coords;                      // (Nk, d)
  std::vector<const T*> fw, fb;         // filters: (H, d), (H), L + 1 of each
  std::vector<const T*> lw, lb;         // hidden linears: (H, H), (H), L
  const T *ow, *ob, *p, *alpha, *beta;  // (C, H), (C), (Nk), (L, H), (L, H)
  const T *rw, *rb, *cw, *cb;           // context reduce (H, C), (H); fc (H, H), (H)
  std::vector<const T*> gw, gb;         // gates: (H, H), (H), L
};

// What the forward of a block of samples keeps: per layer the pre-normalization values,
// the normalized-and-scaled values n and the gates; the hidden states h; per unit and
// sample the norm's divisor. Planes (H, M) with M = samples·Nk. h_0 and layer 1's linear
// are the same for every sample: they are read from Shared, and h[0], lin[0] stay empty.
template <typename T>
struct Trace {
  Scratch<T> c2, ctx;
  std::vector<Scratch<T>> h;                  // h_0..h_L
  std::vector<Scratch<T>> lin, pre, n, gate;  // layers 1..L
  std::vector<Scratch<T>> denom;              // layers 1..L, (H, samples)
  Trace(const Geometry& g, int64_t samples) {
    const int64_t M = samples * g.Nk;
    for (auto* v : {&c2, &ctx}) v->resize(g.H * M);
    h.resize(g.L + 1);
    for (auto* layers : {&lin, &pre, &n, &gate, &denom}) layers->resize(g.L);
    for (int64_t i = 0; i < g.L; ++i) {
      if (i > 0) lin[i].resize(g.H * M);
      h[i + 1].resize(g.H * M);
      for (auto* v : {&pre[i], &n[i], &gate[i]}) v->resize(g.H * M);
      denom[i].resize(g.H * samples);
    }
  }
};

// The filters' sines s_i (H, Nk) and their pre-activations a_i, shared by all samples.
template <typename T>
void filter_sines(const Geometry& g, const Params<T>& P, std::vector<std::vector<T>>& a,
                  std::vector<std::vector<T>>& s) {
  a.assign(g.L + 1, std::vector<T>(g.H * g.Nk));
  s = a;
  for (int64_t i = 0; i <= g.L; ++i) {
    for (int64_t u = 0; u < g.H; ++u) {
      for (int64_t k = 0; k < g.Nk; ++k) {
        T v = P.fb[i][u];
        for (int64_t j = 0; j < g.d; ++j) v += P.fw[i][u * g.d + j] * P.coords[k * g.d + j];
        a[i][u * g.Nk + k] = v;
        s[i][u * g.Nk + k] = std::sin(v);
      }
    }
  }
}

// What every block shares: the sines s_i, h_0's first linear and the bias map, tiled over
// `samples` samples, (H, M) and (M); the context's two linears as one, W_f W_r (H, C) and
// W_f b_r + b_f (H).
template <typename T>
struct Shared {
  std::vector<std::vector<T>> s;
  std::vector<T> s0, lin1, p;  // s0: s_0 untiled, (H, Nk)
  std::vector<T> ctx_w, ctx_b;
  Shared(const Geometry& g, const Params<T>& P, const std::vector<std::vector<T>>& sines,
         int64_t samples) {
    const int64_t Nk = g.Nk, M = samples * Nk;
    auto tile = [&](const T* plane, int64_t rows) {
      std::vector<T> out(rows * M);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < samples; ++j)
          std::memcpy(&out[r * M + j * Nk], plane + r * Nk, Nk * sizeof(T));
      return out;
    };
    for (const auto& si : sines) s.push_back(tile(si.data(), g.H));
    s0 = sines[0];
    std::vector<T> l1(g.H * Nk);
    mix(P.lw[0], P.lb[0], sines[0].data(), g.H, g.H, Nk, l1.data());
    lin1 = tile(l1.data(), g.H);
    p = tile(P.p, 1);
    ctx_w.assign(g.H * g.C, T(0));
    ctx_b.assign(P.cb, P.cb + g.H);
    for (int64_t o = 0; o < g.H; ++o)
      for (int64_t i = 0; i < g.H; ++i) {
        const T f = P.cw[o * g.H + i];
        ctx_b[o] += f * P.rb[i];
        for (int64_t c = 0; c < g.C; ++c) ctx_w[o * g.C + c] += f * P.rw[i * g.C + c];
      }
  }
};

// The forward of a block of `nb` context planes `pooled` (C, nb·Nk) into kernels
// (C, nb·Nk), recording `t`; kernel == nullptr records `t` only (the backward's recompute).
template <typename T>
void block_forward(const Geometry& g, const Params<T>& P, const Shared<T>& sh, int64_t nb,
                   const T* pooled, Trace<T>& t, T* kernel) {
  const int64_t H = g.H, Nk = g.Nk, M = nb * Nk, ld = sh.p.size();
  mix(sh.ctx_w.data(), sh.ctx_b.data(), pooled, g.C, H, M, t.c2.data());
  map_row(H * M, t.ctx.data(), t.c2.data(), [](auto v) { return gelu(v); });
  for (int64_t i = 1; i <= g.L; ++i) {
    // h_0 is shared, so is its first linear: layer 1 reads it from sh (row stride ld).
    if (i > 1) mix(P.lw[i - 1], P.lb[i - 1], t.h[i - 1].data(), H, H, M, t.lin[i - 1].data());
    const T* lin = i == 1 ? sh.lin1.data() : t.lin[i - 1].data();
    const int64_t ldl = i == 1 ? ld : M;
    mix(P.gw[i - 1], P.gb[i - 1], t.ctx.data(), H, H, M, t.gate[i - 1].data());
    for (int64_t u = 0; u < H; ++u) {
      const T* su = &sh.s[i][u * ld];
      const T* lu = lin + u * ldl;
      T* pu = &t.pre[i - 1][u * M];
      T* nu = &t.n[i - 1][u * M];
      const T* gu = &t.gate[i - 1][u * M];
      T* hu = &t.h[i][u * M];
      const T a = P.alpha[(i - 1) * H + u], b = P.beta[(i - 1) * H + u];
#pragma omp simd
      for (int64_t k = 0; k < M; ++k) pu[k] = su[k] * lu[k] + sh.p[k];
      for (int64_t j = 0; j < nb; ++j) {
        T sq = 0;
#pragma omp simd reduction(+ : sq)
        for (int64_t k = j * Nk; k < (j + 1) * Nk; ++k) sq += pu[k] * pu[k];
        const T den = std::max(std::sqrt(sq), T(kNormalizeEps));
        t.denom[i - 1][u * nb + j] = den;
        const T scale = a + b / den;
#pragma omp simd
        for (int64_t k = j * Nk; k < (j + 1) * Nk; ++k) {
          nu[k] = scale * pu[k];
          hu[k] = nu[k] * gu[k];
        }
      }
    }
  }
  if (kernel != nullptr) mix(P.ow, P.ob, t.h[g.L].data(), H, g.C, M, kernel);
}

// Gradient slots of one chunk of samples, in the op's gradient order after u.
template <typename T>
struct Grads {
  std::vector<std::vector<T>> fs;  // g of s_i (H·Nk), L + 1: turned into filter grads at the end
  std::vector<std::vector<T>> lw, lb;  // L
  std::vector<T> ow, ob, p, alpha, beta;
  std::vector<T> ctx_w, ctx_b;         // of W_f W_r and W_f b_r + b_f: (H, C), (H)
  std::vector<std::vector<T>> gw, gb;  // L
  Grads(const Geometry& g) {
    const int64_t H = g.H;
    fs.assign(g.L + 1, std::vector<T>(H * g.Nk, T(0)));
    lw.assign(g.L, std::vector<T>(H * H, T(0)));
    lb.assign(g.L, std::vector<T>(H, T(0)));
    gw = lw;
    gb = lb;
    ow.assign(g.C * H, T(0));
    ob.assign(g.C, T(0));
    p.assign(g.Nk, T(0));
    alpha.assign(g.L * H, T(0));
    beta = alpha;
    ctx_w.assign(H * g.C, T(0));
    ctx_b.assign(H, T(0));
  }
  void add(const Grads& o) {
    auto acc = [](std::vector<T>& a, const std::vector<T>& b) {
      for (size_t j = 0; j < a.size(); ++j) a[j] += b[j];
    };
    for (size_t i = 0; i < fs.size(); ++i) acc(fs[i], o.fs[i]);
    for (size_t i = 0; i < lw.size(); ++i) {
      acc(lw[i], o.lw[i]);
      acc(lb[i], o.lb[i]);
      acc(gw[i], o.gw[i]);
      acc(gb[i], o.gb[i]);
    }
    for (auto [a, b] : {std::pair{&ow, &o.ow},
                        {&ob, &o.ob},
                        {&p, &o.p},
                        {&alpha, &o.alpha},
                        {&beta, &o.beta},
                        {&ctx_w, &o.ctx_w},
                        {&ctx_b, &o.ctx_b}})
      acc(*a, *b);
  }
};

// Adds the segments of `plane` (rows, nb·Nk) into `out` (rows, Nk).
template <typename T>
void add_segments(const T* plane, int64_t rows, int64_t nb, int64_t Nk, T* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < nb; ++j) {
      const T* src = plane + r * nb * Nk + j * Nk;
      T* dst = out + r * Nk;
#pragma omp simd
      for (int64_t k = 0; k < Nk; ++k) dst[k] += src[k];
    }
}

// The backward of a block: g_kernel (C, nb·Nk) → parameter gradients (into G) and the
// gradient of the context planes g_pooled (C, nb·Nk).
template <typename T>
void block_backward(const Geometry& g, const Params<T>& P, const Shared<T>& sh,
                    const std::vector<std::vector<T>>& wt, int64_t nb, const T* pooled,
                    const Trace<T>& t, const T* g_kernel, Grads<T>& G, T* g_pooled) {
  const int64_t H = g.H, Nk = g.Nk, L = g.L, M = nb * Nk, ld = sh.p.size();
  // wt: transposed weights: [0] output (H, C), [1..L] linears, [L+1..2L] gates, [2L+1] the
  // context's W_f W_r (C, H)
  Scratch<T> gh(H * M), g_pre(H * M), g_gate(H * M), g_lin(H * M), g_s(H * M);
  std::vector<T> g_ctx(H * M, T(0));
  accumulate_weight_grad(g_kernel, t.h[L].data(), H, g.C, M, G.ow.data(), G.ob.data());
  mix(wt[0].data(), static_cast<const T*>(nullptr), g_kernel, g.C, H, M, gh.data());
  for (int64_t i = L; i >= 1; --i) {
    const auto& pre = t.pre[i - 1];
    const auto& n = t.n[i - 1];
    const auto& gate = t.gate[i - 1];
    const T* lin = i == 1 ? sh.lin1.data() : t.lin[i - 1].data();
    const int64_t ldl = i == 1 ? ld : M;
    for (int64_t u = 0; u < H; ++u) {
      const T* ghu = &gh[u * M];
      const T* nu = &n[u * M];
      const T* gtu = &gate[u * M];
      const T* pu = &pre[u * M];
      T* ggu = &g_gate[u * M];
      T* gpu = &g_pre[u * M];
      const T a = P.alpha[(i - 1) * H + u], b = P.beta[(i - 1) * H + u];
      // g_n = gh ⊙ gate; n = α pre + β q with q = pre / den.
#pragma omp simd
      for (int64_t k = 0; k < M; ++k) {
        ggu[k] = ghu[k] * nu[k];
        gpu[k] = ghu[k] * gtu[k];
      }
      T ga = 0, gb = 0;
      for (int64_t j = 0; j < nb; ++j) {
        const T den = t.denom[i - 1][u * nb + j], inv = T(1) / den;
        T sp = 0;
#pragma omp simd reduction(+ : sp)
        for (int64_t k = j * Nk; k < (j + 1) * Nk; ++k) sp += gpu[k] * pu[k];
        ga += sp;
        gb += sp * inv;
        // g_pre = α g_n + (β g_n − q·(q·β g_n)) / den, or β g_n / den where the norm was clamped
        const T qg = b * sp * inv * inv;  // (q·β g_n), q = pre·inv
        const T proj = den <= T(kNormalizeEps) ? T(0) : qg * inv;
        const T scale = a + b * inv;
#pragma omp simd
        for (int64_t k = j * Nk; k < (j + 1) * Nk; ++k) gpu[k] = scale * gpu[k] - proj * pu[k];
      }
      G.alpha[(i - 1) * H + u] += ga;
      G.beta[(i - 1) * H + u] += gb;
    }
    // gate = W_g ctx + b_g
    accumulate_weight_grad(g_gate.data(), t.ctx.data(), H, H, M, G.gw[i - 1].data(),
                           G.gb[i - 1].data());
    mix(wt[L + i].data(), static_cast<const T*>(nullptr), g_gate.data(), H, H, M, g_ctx.data(),
        /*accumulate=*/true);
    // pre = s_i ⊙ lin + P
    for (int64_t u = 0; u < H; ++u) {
      const T* gpu = &g_pre[u * M];
      const T* lu = lin + u * ldl;
      const T* su = &sh.s[i][u * ld];
      T* glu = &g_lin[u * M];
      T* gsu = &g_s[u * M];
#pragma omp simd
      for (int64_t k = 0; k < M; ++k) {
        gsu[k] = gpu[k] * lu[k];
        glu[k] = gpu[k] * su[k];
      }
    }
    add_segments(g_s.data(), H, nb, Nk, G.fs[i].data());
    std::vector<T> gp(M, T(0));
    for (int64_t u = 0; u < H; ++u) {
      const T* gpu = &g_pre[u * M];
#pragma omp simd
      for (int64_t k = 0; k < M; ++k) gp[k] += gpu[k];
    }
    add_segments(gp.data(), 1, nb, Nk, G.p.data());
    // lin = W_l h_{i-1} + b_l
    if (i > 1) {
      accumulate_weight_grad(g_lin.data(), t.h[i - 1].data(), H, H, M, G.lw[i - 1].data(),
                             G.lb[i - 1].data());
      mix(wt[i].data(), static_cast<const T*>(nullptr), g_lin.data(), H, H, M, gh.data());
    } else {
      // h_0 = s_0 is the same for every sample: its products run once over the samples' sum.
      std::vector<T> g_lin1(H * Nk, T(0)), g_h0(H * Nk);
      add_segments(g_lin.data(), H, nb, Nk, g_lin1.data());
      accumulate_weight_grad(g_lin1.data(), sh.s0.data(), H, H, Nk, G.lw[0].data(), G.lb[0].data());
      mix(wt[1].data(), static_cast<const T*>(nullptr), g_lin1.data(), H, H, Nk, g_h0.data());
      add_segments(g_h0.data(), H, 1, Nk, G.fs[0].data());  // h_0 = s_0
    }
  }
  // ctx = GELU(c2), c2 = (W_f W_r) pooled + (W_f b_r + b_f)
  Scratch<T> g_c2(H * M);
  map_row(H * M, g_c2.data(), g_ctx.data(), t.c2.data(),
          [](auto gv, auto cv) { return gv * gelu_grad(cv); });
  accumulate_weight_grad(g_c2.data(), pooled, g.C, H, M, G.ctx_w.data(), G.ctx_b.data());
  mix(wt[2 * L + 1].data(), static_cast<const T*>(nullptr), g_c2.data(), H, g.C, M, g_pooled);
}

// The gradients of W_r, b_r, W_f, b_f from those of the product W_f W_r (gp, (H, C)) and of
// W_f b_r + b_f (gs, (H)): c1 = W_r pooled + b_r, so g_W_f = Σ g_c2 c1ᵀ = gp W_rᵀ + gs b_rᵀ,
// g_c1 = W_fᵀ g_c2, so g_W_r = W_fᵀ gp and g_b_r = W_fᵀ gs; g_b_f = gs.
template <typename T>
void context_grads(const Geometry& g, const Params<T>& P, const std::vector<T>& gp,
                   const std::vector<T>& gs, T* g_rw, T* g_rb, T* g_cw, T* g_cb) {
  const int64_t H = g.H, C = g.C;
  for (int64_t o = 0; o < H; ++o) {
    g_cb[o] = gs[o];
    for (int64_t i = 0; i < H; ++i) {
      T v = gs[o] * P.rb[i];
      for (int64_t c = 0; c < C; ++c) v += gp[o * C + c] * P.rw[i * C + c];
      g_cw[o * H + i] = v;
    }
  }
  for (int64_t i = 0; i < H; ++i) {
    T vb = 0;
    for (int64_t c = 0; c < C; ++c) g_rw[i * C + c] = T(0);
    for (int64_t o = 0; o < H; ++o) {
      const T f = P.cw[o * H + i];
      vb += f * gs[o];
      for (int64_t c = 0; c < C; ++c) g_rw[i * C + c] += f * gp[o * C + c];
    }
    g_rb[i] = vb;
  }
}

template <typename T>
Params<T> params_of(const std::vector<at::Tensor>& w, int64_t L) {
  // w: coords, fw[L+1], fb[L+1], lw[L], lb[L], ow, ob, p, alpha, beta, rw, rb, cw, cb, gw[L], gb[L]
  Params<T> P;
  size_t j = 0;
  P.coords = w[j++].data_ptr<T>();
  for (int64_t i = 0; i <= L; ++i) P.fw.push_back(w[j++].data_ptr<T>());
  for (int64_t i = 0; i <= L; ++i) P.fb.push_back(w[j++].data_ptr<T>());
  for (int64_t i = 0; i < L; ++i) P.lw.push_back(w[j++].data_ptr<T>());
  for (int64_t i = 0; i < L; ++i) P.lb.push_back(w[j++].data_ptr<T>());
  P.ow = w[j++].data_ptr<T>();
  P.ob = w[j++].data_ptr<T>();
  P.p = w[j++].data_ptr<T>();
  P.alpha = w[j++].data_ptr<T>();
  P.beta = w[j++].data_ptr<T>();
  P.rw = w[j++].data_ptr<T>();
  P.rb = w[j++].data_ptr<T>();
  P.cw = w[j++].data_ptr<T>();
  P.cb = w[j++].data_ptr<T>();
  for (int64_t i = 0; i < L; ++i) P.gw.push_back(w[j++].data_ptr<T>());
  for (int64_t i = 0; i < L; ++i) P.gb.push_back(w[j++].data_ptr<T>());
  return P;
}

// Every weight's shape, from u (B, C, *S), kernel_size, and H = the hidden width.
void check_local_kernel(const at::Tensor& u, at::IntArrayRef kernel_size,
                        const std::vector<at::Tensor>& w, int64_t L) {
  check_layer_activation(u, "u");
  const int64_t d = u.dim() - 2, C = u.size(1);
  TORCH_CHECK_VALUE(static_cast<int64_t>(kernel_size.size()) == d, "kernel_size must have ", d,
                    " entries like u's spatial dims, got ", kernel_size.size());
  int64_t Nk = 1;
  for (int64_t i = 0; i < d; ++i) {
    TORCH_CHECK_VALUE(kernel_size[i] >= 1 && kernel_size[i] <= u.size(2 + i),
                      "kernel_size must be between 1 and u's spatial size in every dim, got ",
                      kernel_size[i], " for ", u.size(2 + i));
    Nk *= kernel_size[i];
  }
  TORCH_CHECK_VALUE(L >= 1 && static_cast<int64_t>(w.size()) == 6 * L + 12,
                    "a MAGNet with L hidden layers takes L + 1 filters and L linears and gates");
  for (size_t i = 0; i < w.size(); ++i) check_dtype_device(w[i], "local kernel weight", u, "u");
  const int64_t H = w[1].size(0);
  auto expect = [&](size_t i, std::vector<int64_t> shape, const char* what) {
    TORCH_CHECK_VALUE(w[i].sizes() == c10::IntArrayRef(shape), what, " must have shape ",
                      shape_str(shape), ", got ", shape_str(w[i].sizes()));
  };
  size_t j = 0;
  expect(j++, {Nk, d}, "coords");
  for (int64_t i = 0; i <= L; ++i) expect(j++, {H, d}, "filter_w");
  for (int64_t i = 0; i <= L; ++i) expect(j++, {H}, "filter_b");
  for (int64_t i = 0; i < L; ++i) expect(j++, {H, H}, "linear_w");
  for (int64_t i = 0; i < L; ++i) expect(j++, {H}, "linear_b");
  expect(j++, {C, H}, "out_w");
  expect(j++, {C}, "out_b");
  expect(j++, {Nk}, "bias_map");
  expect(j++, {L, H}, "alpha");
  expect(j++, {L, H}, "beta");
  expect(j++, {H, C}, "reduce_w");
  expect(j++, {H}, "reduce_b");
  expect(j++, {H, H}, "fc_w");
  expect(j++, {H}, "fc_b");
  for (int64_t i = 0; i < L; ++i) expect(j++, {H, H}, "gate_w");
  for (int64_t i = 0; i < L; ++i) expect(j++, {H}, "gate_b");
}

Geometry geometry(const at::Tensor& u, at::IntArrayRef kernel_size,
                  const std::vector<at::Tensor>& w, int64_t L) {
  check_local_kernel(u, kernel_size, w, L);
  Geometry g;
  g.B = u.size(0);
  g.C = u.size(1);
  g.d = u.dim() - 2;
  for (int64_t i = 0; i < g.d; ++i) {
    g.S.push_back(u.size(2 + i));
    g.K.push_back(kernel_size[i]);
  }
  g.N = 1;
  g.Nk = 1;
  for (int64_t i = 0; i < g.d; ++i) {
    g.N *= g.S[i];
    g.Nk *= g.K[i];
  }
  g.L = L;
  g.H = w[1].size(0);
  return g;
}

// Pooled context planes: per sample (B, C, Nk), or their batch mean (1, C, Nk).
template <typename T>
std::vector<T> pooled_contexts(const Geometry& g, const T* u, bool batch_context) {
  std::vector<T> pooled(g.B * g.C * g.Nk);
  at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) pool(g, u + b * g.C * g.N, pooled.data() + b * g.C * g.Nk);
  });
  if (!batch_context) return pooled;
  std::vector<T> mean(g.C * g.Nk, T(0));
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t j = 0; j < g.C * g.Nk; ++j) mean[j] += pooled[b * g.C * g.Nk + j];
  for (auto& v : mean) v /= T(g.B);
  return mean;
}

template <typename T>
void local_kernel_impl(const at::Tensor& u, const Geometry& g, const std::vector<at::Tensor>& w,
                       bool batch_context, at::Tensor& kernel) {
  const auto P = params_of<T>(w, g.L);
  std::vector<std::vector<T>> a, s;
  filter_sines(g, P, a, s);
  const auto pooled = pooled_contexts(g, u.data_ptr<T>(), batch_context);
  const int64_t G = batch_context ? 1 : g.B;
  const Chunks ch = block_chunks(G, g.Nk);
  const Shared<T> sh(g, P, s, ch.size);
  T* out = kernel.data_ptr<T>();
  const int64_t plane = g.C * g.Nk;
  for_each_chunk(ch, G, [&](int64_t, int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    Trace<T> t(g, nb);
    Scratch<T> in(nb * plane), res(nb * plane);
    to_block(pooled.data() + b0 * plane, nb, g.C, g.Nk, in.data());
    block_forward(g, P, sh, nb, in.data(), t, res.data());
    from_block(res.data(), nb, g.C, g.Nk, out + b0 * plane);
  });
}

template <typename T>
void local_kernel_backward_impl(const at::Tensor& gk_, const at::Tensor& u, const Geometry& g,
                                const std::vector<at::Tensor>& w, bool batch_context,
                                std::vector<at::Tensor>& grads) {
  const auto P = params_of<T>(w, g.L);
  const int64_t H = g.H, L = g.L, Nk = g.Nk;
  std::vector<std::vector<T>> a, s;
  filter_sines(g, P, a, s);
  std::vector<std::vector<T>> wt;
  wt.push_back(transposed(P.ow, g.C, H));
  for (int64_t i = 0; i < L; ++i) wt.push_back(transposed(P.lw[i], H, H));
  for (int64_t i = 0; i < L; ++i) wt.push_back(transposed(P.gw[i], H, H));
  const auto pooled = pooled_contexts(g, u.data_ptr<T>(), batch_context);
  const int64_t G = batch_context ? 1 : g.B;
  const Chunks ch = block_chunks(G, g.Nk);
  const Shared<T> sh(g, P, s, ch.size);
  wt.push_back(transposed(sh.ctx_w.data(), H, g.C));
  const T* gk = gk_.data_ptr<T>();
  const int64_t plane = g.C * Nk;
  std::vector<T> g_pooled(G * plane);
  std::vector<Grads<T>> slots(ch.count, Grads<T>(g));
  for_each_chunk(ch, G, [&](int64_t q, int64_t b0, int64_t b1) {
    const int64_t nb = b1 - b0;
    Trace<T> t(g, nb);
    Scratch<T> in(nb * plane), gin(nb * plane), gout(nb * plane);
    to_block(pooled.data() + b0 * plane, nb, g.C, Nk, in.data());
    to_block(gk + b0 * plane, nb, g.C, Nk, gin.data());
    block_forward<T>(g, P, sh, nb, in.data(), t, nullptr);
    block_backward(g, P, sh, wt, nb, in.data(), t, gin.data(), slots[q], gout.data());
    from_block(gout.data(), nb, g.C, Nk, g_pooled.data() + b0 * plane);
  });
  Grads<T> G_ = slots[0];
  for (int64_t q = 1; q < ch.count; ++q) G_.add(slots[q]);
  // Filters: the gradient of a_i is that of s_i times cos(a_i); W_Fi and b_Fi follow from it.
  auto gu = grads[0].data_ptr<T>();
  at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* gp = batch_context ? g_pooled.data() : g_pooled.data() + b * plane;
      pool_backward(g, gp, batch_context ? T(1) / T(g.B) : T(1), gu + b * g.C * g.N);
    }
  });
  size_t j = 1;
  for (int64_t i = 0; i <= L; ++i) {
    T* gfw = grads[j + i].data_ptr<T>();
    T* gfb = grads[j + L + 1 + i].data_ptr<T>();
    for (int64_t uu = 0; uu < H; ++uu) {
      T sb = 0;
      std::vector<T> sw(g.d, T(0));
      for (int64_t k = 0; k < Nk; ++k) {
        const T ga = G_.fs[i][uu * Nk + k] * std::cos(a[i][uu * Nk + k]);
        sb += ga;
        for (int64_t e = 0; e < g.d; ++e) sw[e] += ga * P.coords[k * g.d + e];
      }
      gfb[uu] = sb;
      for (int64_t e = 0; e < g.d; ++e) gfw[uu * g.d + e] = sw[e];
    }
  }
  j += 2 * (L + 1);
  auto put = [&](const std::vector<T>& v) {
    std::memcpy(grads[j++].data_ptr<T>(), v.data(), v.size() * sizeof(T));
  };
  for (int64_t i = 0; i < L; ++i) put(G_.lw[i]);
  for (int64_t i = 0; i < L; ++i) put(G_.lb[i]);
  put(G_.ow);
  put(G_.ob);
  put(G_.p);
  put(G_.alpha);
  put(G_.beta);
  context_grads(g, P, G_.ctx_w, G_.ctx_b, grads[j].data_ptr<T>(), grads[j + 1].data_ptr<T>(),
                grads[j + 2].data_ptr<T>(), grads[j + 3].data_ptr<T>());
  j += 4;
  for (int64_t i = 0; i < L; ++i) put(G_.gw[i]);
  for (int64_t i = 0; i < L; ++i) put(G_.gb[i]);
}

std::vector<at::Tensor> weights_list(const at::Tensor& coords, at::TensorList fw, at::TensorList fb,
                                     at::TensorList lw, at::TensorList lb, const at::Tensor& ow,
                                     const at::Tensor& ob, const at::Tensor& p,
                                     const at::Tensor& alpha, const at::Tensor& beta,
                                     const at::Tensor& rw, const at::Tensor& rb,
                                     const at::Tensor& cw, const at::Tensor& cb, at::TensorList gw,
                                     at::TensorList gb) {
  std::vector<at::Tensor> w{coords.contiguous()};
  for (auto list : {fw, fb, lw, lb})
    for (const auto& t : list) w.push_back(t.contiguous());
  for (const auto& t : {ow, ob, p, alpha, beta, rw, rb, cw, cb}) w.push_back(t.contiguous());
  for (auto list : {gw, gb})
    for (const auto& t : list) w.push_back(t.contiguous());
  return w;
}

}  // namespace

at::Tensor local_kernel(const at::Tensor& u_, at::IntArrayRef kernel_size, bool batch_context,
                        const at::Tensor& coords, at::TensorList fw, at::TensorList fb,
                        at::TensorList lw, at::TensorList lb, const at::Tensor& ow,
                        const at::Tensor& ob, const at::Tensor& p, const at::Tensor& alpha,
                        const at::Tensor& beta, const at::Tensor& rw, const at::Tensor& rb,
                        const at::Tensor& cw, const at::Tensor& cb, at::TensorList gw,
                        at::TensorList gb) {
  const auto u = u_.contiguous();
  const int64_t L = lw.size();
  const auto w =
      weights_list(coords, fw, fb, lw, lb, ow, ob, p, alpha, beta, rw, rb, cw, cb, gw, gb);
  const auto g = geometry(u, kernel_size, w, L);
  std::vector<int64_t> sizes{batch_context ? 1 : g.B, g.C};
  for (auto k : g.K) sizes.push_back(k);
  auto kernel = at::empty(sizes, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "local_kernel",
                             [&] { local_kernel_impl<scalar_t>(u, g, w, batch_context, kernel); });
  return kernel;
}

std::vector<at::Tensor> local_kernel_backward(
    const at::Tensor& g_kernel, const at::Tensor& u_, at::IntArrayRef kernel_size,
    bool batch_context, const at::Tensor& coords, at::TensorList fw, at::TensorList fb,
    at::TensorList lw, at::TensorList lb, const at::Tensor& ow, const at::Tensor& ob,
    const at::Tensor& p, const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& rw,
    const at::Tensor& rb, const at::Tensor& cw, const at::Tensor& cb, at::TensorList gw,
    at::TensorList gb) {
  const auto u = u_.contiguous();
  const int64_t L = lw.size();
  const auto w =
      weights_list(coords, fw, fb, lw, lb, ow, ob, p, alpha, beta, rw, rb, cw, cb, gw, gb);
  const auto g = geometry(u, kernel_size, w, L);
  check_dtype_device(g_kernel, "g_kernel", u, "u");
  std::vector<int64_t> kshape{batch_context ? 1 : g.B, g.C};
  for (auto k : g.K) kshape.push_back(k);
  TORCH_CHECK_VALUE(g_kernel.sizes() == c10::IntArrayRef(kshape),
                    "g_kernel must have the kernel's shape ", shape_str(kshape), ", got ",
                    shape_str(g_kernel.sizes()));
  std::vector<at::Tensor> grads{at::empty_like(u)};
  for (size_t i = 1; i < w.size(); ++i) grads.push_back(at::empty_like(w[i]));
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "local_kernel_backward", [&] {
    local_kernel_backward_impl<scalar_t>(g_kernel.contiguous(), u, g, w, batch_context, grads);
  });
  return grads;
}

}  // namespace cpu
}  // namespace terminator
