// CPU kernels of the building blocks of the Ada-KV authors' follow-up methods (SPEC 7.1, 7.2):
// adakv::defensive_score (DefensiveKV steps 1-3, with the SnapKV mean and the window masses
// of steps 5 and D10) and adakv::value_norm (the CriticalKV value norm, DefensiveKV step 4).
// The fp64 oracle is python/adakv_ops/reference_followups.py; semantics: docs/semantics.md.
// Not fused yet: the caller multiplies the defensive scores by the normalised value norm and
// applies the stage-1 floor and the allocation.
//
// defensive_score: q_window [B, Hq, W, D], key [B, Hk, N, D] -> scores, snap_mean [B, Hk, L]
// fp32 and window_mass [B, 2] fp32. Per (batch b, KV head h): the window softmax of each of
// the group's G query heads and W window queries, exactly as adakv::score computes it (same
// fp32 loop, so snap_mean equals score(pooling="none", aggregate="mean", gqa_reduce="mean")
// bit for bit); per row, avg_pool1d over the valid prefix (count_include_pad) rescaled to the
// row's prefix mass; the max over the group's heads and the window (nan_max), floored at its
// own mean. Parallelised over the B * Hk (b, h) pairs with torch::stable::parallel_for; the
// window masses are per-pair partial sums reduced per batch row afterwards (no shared writes).
//
// value_norm: value [B, Hk, N, D], o_proj_weight [hidden, Hq * D] -> [B, Hk, length] fp32,
// mean over the group's query heads j of || value[b, h, i] @ W_o[j] ||_1. Tokens in chunks:
// one fp32 torch::stable::matmul [Hk, 1, T, D] @ [Hk, G, D, hidden] per (b, chunk) (the
// temporary [Hk, G, T, hidden] stays below kValueNormChunkFloats), then the abs-sum and the
// group mean in a parallel_for over (h, token). Never materialises [N, hidden] for all tokens.

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "allocation_rules.h"
#include "checks.h"
#include "kernels.h"
#include "ops.h"

namespace adakv {
namespace cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename scalar_t>
void defensive_kernel(const scalar_t* q, const scalar_t* k, const int32_t* key_start,
                      float* scores, float* snap, double* mass, const ScoreShape& s, float scale,
                      int64_t kernel_size) {
  const int64_t G = s.Hq / s.Hk, N = s.N, W = s.W, D = s.D, L = s.L;
  const int64_t r = kernel_size / 2;
  const float kf_size = static_cast<float>(kernel_size);
  torch::stable::parallel_for(0, s.B * s.Hk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kf, qt, p, agg, red, pooled, R;  // sized on the first row with a prefix
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.Hk, h = bh % s.Hk;
      const int64_t ks = key_start ? std::clamp<int64_t>(key_start[b], 0, N) : 0;
      const int64_t Lb = L - ks;  // valid prefix columns [ks, L)
      float* sc = scores + bh * L;
      float* sn = snap + bh * L;
      mass[2 * bh] = mass[2 * bh + 1] = 0.0;
      if (Lb <= 0) {  // no valid prefix: nothing to score, window masses 0
        std::fill(sc, sc + L, kNegInf);
        std::fill(sn, sn + L, kNegInf);
        continue;
      }
      if (p.empty()) {
        kf.resize(N * D);
        qt.resize(D);
        p.resize(N);
        agg.resize(L);
        red.resize(L);
        pooled.resize(L);
        R.resize(L);
      }
      const scalar_t* kb = k + bh * N * D;
      for (int64_t i = ks * D; i < N * D; ++i) kf[i] = static_cast<float>(kb[i]);
      std::fill(red.begin(), red.end(), 0.0f);
      std::fill(R.begin(), R.end(), kNegInf);
      const int64_t slip_lo = std::max(ks, L - W);  // the last W prefix columns (D10)
      double wmass = 0.0, slip = 0.0;
      for (int64_t g = 0; g < G; ++g) {
        std::fill(agg.begin(), agg.end(), 0.0f);
        const scalar_t* qg = q + ((b * s.Hq + h * G + g) * W) * D;
        for (int64_t t = 0; t < W; ++t) {
          const int64_t pos = L + t;  // >= L > ks: every window query is valid here
          // ---- the window softmax of adakv::score (the same helper, csrc/cpu/kernels.h)
          const float inv = window_softmax(qg + t * D, scale, kf.data(), D, ks, pos, qt.data(),
                                           p.data());
          for (int64_t n = ks; n <= pos; ++n) p[n] *= inv;
          // ---- the SnapKV mean (unpooled) and the masses
          double base = 0.0;
          for (int64_t n = ks; n < L; ++n) {
            agg[n] += p[n];
            base += p[n];
          }
          for (int64_t n = L; n <= pos; ++n) wmass += p[n];  // columns [L, N); later ones are 0
          for (int64_t n = slip_lo; n < L; ++n) slip += p[n];
          // ---- avg_pool1d over the valid prefix (zeros outside, divisor kernel_size),
          // rescaled to sum to the row's prefix mass (a row whose pool sums to 0 stays 0, D7)
          double tot = 0.0;
          if (r >= Lb - 1) {  // every tap window covers the whole valid prefix
            const float v = static_cast<float>(base) / kf_size;
            for (int64_t n = ks; n < L; ++n) pooled[n] = v;
            tot = static_cast<double>(v) * static_cast<double>(Lb);
          } else {
            for (int64_t n = ks; n < L; ++n) {
              const int64_t lo = std::max(ks, n - r), hi = std::min(L - 1, n + r);
              float acc = 0.f;
              for (int64_t j = lo; j <= hi; ++j) acc += p[j];
              pooled[n] = acc / kf_size;
              tot += pooled[n];
            }
          }
          if (tot > 0.0) {
            for (int64_t n = ks; n < L; ++n)
              R[n] = nan_max(R[n], static_cast<float>(pooled[n] / tot * base));
          } else {
            for (int64_t n = ks; n < L; ++n) R[n] = nan_max(R[n], 0.0f);
          }
        }
        for (int64_t n = 0; n < L; ++n) agg[n] /= static_cast<float>(W);
        for (int64_t n = 0; n < L; ++n) red[n] += agg[n];
      }
      for (int64_t n = 0; n < L; ++n) red[n] /= static_cast<float>(G);
      // R = max(R, mean of R over the valid prefix)
      double rsum = 0.0;
      for (int64_t n = ks; n < L; ++n) rsum += R[n];
      const float rmean = static_cast<float>(rsum / static_cast<double>(Lb));
      for (int64_t n = 0; n < ks; ++n) sc[n] = sn[n] = kNegInf;
      for (int64_t n = ks; n < L; ++n) {
        sc[n] = nan_max(R[n], rmean);
        sn[n] = red[n];
      }
      mass[2 * bh] = wmass;
      mass[2 * bh + 1] = slip;
    }
  });
}

// Tokens per value_norm chunk: the fp32 temporary [Hk, G, T, hidden] holds at most this many
// values (8 MiB) unless T = kValueNormMinChunk already exceeds it.
constexpr int64_t kValueNormChunkFloats = int64_t{1} << 21;
constexpr int64_t kValueNormMinChunk = 16;

}  // namespace

std::tuple<Tensor, Tensor, Tensor> defensive_score(const Tensor& q_window, const Tensor& key,
                                                   int64_t kernel_size,
                                                   const OptTensor& key_start,
                                                   std::optional<double> scale) {
  const ScoreShape s = validate_score(q_window, key, kernel_size, key_start);
  check_key_start_range(key_start, s.N);
  checked_mul(checked_mul(s.B, s.Hk, "B * Hk"), s.L, "B * Hk * L");
  Tensor scores = new_empty("defensive_score", "the scores", q_window, {s.B, s.Hk, s.L}, kFloat);
  Tensor snap = new_empty("defensive_score", "snap_mean", q_window, {s.B, s.Hk, s.L}, kFloat);
  Tensor window_mass = new_empty("defensive_score", "window_mass", q_window, {s.B, 2}, kFloat);
  if (s.L == 0) {  // W == N: no row has a prefix (nothing to score, masses 0)
    std::fill(ptr<float>(window_mass), ptr<float>(window_mass) + 2 * s.B, 0.0f);
    return {scores, snap, window_mass};
  }
  // per (b, h) partial sums of the two window masses, reduced per batch row below
  Tensor mass_t =
      new_empty("defensive_score", "the window-mass partial sums", q_window, {s.B * s.Hk, 2},
                ScalarType::Double);
  double* mass = ptr<double>(mass_t);
  const float sc = static_cast<float>(scale.value_or(1.0 / std::sqrt(static_cast<double>(s.D))));
  const int32_t* ks = ptr<int32_t>(key_start);
  ADAKV_CPU_DTYPE_SWITCH(key.scalar_type(), scalar_t, [&] {
    defensive_kernel<scalar_t>(ptr<scalar_t>(q_window), ptr<scalar_t>(key), ks,
                               ptr<float>(scores), ptr<float>(snap), mass, s, sc,
                               kernel_size);
  });
  // window_mass[b, c]: the mean over the Hq * W window queries of row b (0 without a prefix)
  float* wm = ptr<float>(window_mass);
  const double queries = static_cast<double>(s.Hq) * static_cast<double>(s.W);
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t c = 0; c < 2; ++c) {
      double acc = 0.0;
      for (int64_t h = 0; h < s.Hk; ++h) acc += mass[2 * (b * s.Hk + h) + c];
      wm[2 * b + c] = static_cast<float>(acc / queries);
    }
  }
  return {scores, snap, window_mass};
}

Tensor value_norm(const Tensor& value, const Tensor& o_proj_weight, bool normalize,
                  std::optional<int64_t> length) {
  const ValueNormShape s = validate_value_norm(value, o_proj_weight, length);
  const int64_t B = s.B, Hk = s.Hk, n_tok = s.length, hidden = s.hidden, G = s.Hq / s.Hk;
  Tensor out = new_empty("value_norm", "the value norms", value, {B, Hk, n_tok}, kFloat);
  if (out.numel() == 0) return out;
  float* o = ptr<float>(out);
  if (hidden == 0) {  // every product is empty: norm 0 (0 / 0 = NaN when normalised)
    std::fill(o, o + out.numel(), 0.0f);
  } else {
    // wo[h, g] = W_o[h G + g] = o_proj_weight[:, (h G + g) D : (h G + g + 1) D]^T [D, hidden]
    // (row j D + d of o_proj_weight^T is wo[j][d]; transpose, not permute: permute needs the
    // torch 2.14 headers)
    Tensor wo = torch::stable::to(o_proj_weight, kFloat);
    wo = torch::stable::contiguous(torch::stable::transpose(wo, 0, 1));  // [Hq * D, hidden]
    wo = torch::stable::reshape(wo, {Hk, G, s.D, hidden});
    const int64_t per_token = checked_mul(s.Hq, hidden, "Hq * hidden (o_proj_weight)");
    const int64_t T = std::min(n_tok, std::max(kValueNormMinChunk,
                                               kValueNormChunkFloats / per_token));
    const float inv_g = 1.0f / static_cast<float>(G);
    for (int64_t b = 0; b < B; ++b) {
      Tensor vb = torch::stable::select(value, 0, b);  // [Hk, N, D]
      for (int64_t i0 = 0; i0 < n_tok; i0 += T) {
        const int64_t n = std::min(T, n_tok - i0);
        Tensor vc = torch::stable::to(torch::stable::narrow(vb, 1, i0, n), kFloat);
        vc = torch::stable::unsqueeze(vc, 1);  // [Hk, 1, n, D]
        // [Hk, G, n, hidden]: products of fp32 copies, accumulated in fp32
        const Tensor prod = torch::stable::contiguous(torch::stable::matmul(vc, wo));
        const float* pr = ptr<float>(prod);
        torch::stable::parallel_for(0, Hk * n, 16, [&](int64_t begin, int64_t end) {
          for (int64_t ht = begin; ht < end; ++ht) {
            const int64_t h = ht / n, t = ht % n;
            float acc_g = 0.f;
            for (int64_t g = 0; g < G; ++g) {
              const float* row = pr + ((h * G + g) * n + t) * hidden;
              // eight partial sums: independent chains the compiler can keep in registers
              float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
              int64_t x = 0;
              for (; x + 8 <= hidden; x += 8)
                for (int u = 0; u < 8; ++u) a[u] += std::fabs(row[x + u]);
              float norm = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
              for (; x < hidden; ++x) norm += std::fabs(row[x]);
              acc_g += norm;
            }
            o[(b * Hk + h) * n_tok + i0 + t] = acc_g * inv_g;
          }
        });
      }
    }
  }
  if (normalize) {  // divide by the sum over the KV heads, no epsilon (0 / 0 = NaN, D8)
    torch::stable::parallel_for(0, B * n_tok, 256, [&](int64_t begin, int64_t end) {
      for (int64_t bi = begin; bi < end; ++bi) {
        const int64_t b = bi / n_tok, i = bi % n_tok;
        float* ob = o + b * Hk * n_tok + i;
        float sum = 0.f;
        for (int64_t h = 0; h < Hk; ++h) sum += ob[h * n_tok];
        for (int64_t h = 0; h < Hk; ++h) ob[h * n_tok] /= sum;
      }
    });
  }
  return out;
}

}  // namespace cpu
}  // namespace adakv
