// CPU kernel of adakv::score (SnapKV observation-window scoring), the reference backend.
//
// Computes, per (batch b, KV head h), fp32 scores [L = N - W] from q_window [B, Hq, W, D] and
// key [B, Hk, N, D]: window logits (causal inside the window, padding keys excluded), fp32
// softmax, aggregate over the W window queries (mean or max), reduce over the G query heads
// of the group (mean or max), then 1-D pooling over the prefix (max / avg / none).
// Parallelised over the B * Hk (b, h) pairs with torch::stable::parallel_for. See docs/semantics.md.

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

template <typename scalar_t>
void score_kernel(const scalar_t* q, const scalar_t* k, const int32_t* key_start, float* out,
                  const ScoreShape& s, float scale, Pooling pooling, int64_t kernel_size,
                  Reduce aggregate, Reduce gqa_reduce) {
  const int64_t G = s.Hq / s.Hk, N = s.N, W = s.W, D = s.D, L = s.L;
  torch::stable::parallel_for(0, s.B * s.Hk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kf(N * D), qt(D), logits(N), agg(L), red(L);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.Hk, h = bh % s.Hk;
      const int64_t ks = key_start ? std::clamp<int64_t>(key_start[b], 0, N) : 0;
      const scalar_t* kb = k + bh * N * D;
      for (int64_t i = 0; i < N * D; ++i) kf[i] = static_cast<float>(kb[i]);
      std::fill(red.begin(), red.end(), 0.0f);
      for (int64_t g = 0; g < G; ++g) {
        std::fill(agg.begin(), agg.end(), 0.0f);
        const scalar_t* qg = q + ((b * s.Hq + h * G + g) * W) * D;
        for (int64_t t = 0; t < W; ++t) {
          const int64_t pos = L + t;  // position of this window query
          if (pos < ks) continue;     // a padding query contributes nothing
          const float inv = window_softmax(qg + t * D, scale, kf.data(), D, ks, pos, qt.data(),
                                           logits.data());
          const int64_t last = std::min(pos + 1, L);  // only prefix columns are scored
          if (aggregate == Reduce::kMean) {
            for (int64_t n = ks; n < last; ++n) agg[n] += logits[n] * inv;
          } else {
            for (int64_t n = ks; n < last; ++n) agg[n] = nan_max(agg[n], logits[n] * inv);
          }
        }
        if (aggregate == Reduce::kMean) {
          for (int64_t n = 0; n < L; ++n) agg[n] /= static_cast<float>(W);
        }
        if (gqa_reduce == Reduce::kMean) {
          for (int64_t n = 0; n < L; ++n) red[n] += agg[n];
        } else {
          for (int64_t n = 0; n < L; ++n) red[n] = g == 0 ? agg[n] : nan_max(red[n], agg[n]);
        }
      }
      if (gqa_reduce == Reduce::kMean) {
        for (int64_t n = 0; n < L; ++n) red[n] /= static_cast<float>(G);
      }
      float* o = out + bh * L;
      const int64_t r = kernel_size / 2;
      for (int64_t n = 0; n < L; ++n) {
        if (pooling == Pooling::kNone) {
          o[n] = red[n];
          continue;
        }
        const int64_t lo = std::max<int64_t>(0, n - r), hi = std::min<int64_t>(L - 1, n + r);
        if (pooling == Pooling::kMax) {
          float m = red[lo];
          for (int64_t j = lo + 1; j <= hi; ++j) m = nan_max(m, red[j]);
          o[n] = m;
        } else {
          float acc = 0.f;
          for (int64_t j = lo; j <= hi; ++j) acc += red[j];
          o[n] = acc / static_cast<float>(kernel_size);
        }
      }
      for (int64_t n = 0; n < std::min(ks, L); ++n) o[n] = -std::numeric_limits<float>::infinity();
    }
  });
}

}  // namespace

Tensor score(const Tensor& q_window, const Tensor& key, int64_t kernel_size,
                 std::string_view pooling, std::string_view aggregate,
                 std::string_view gqa_reduce, const OptTensor& key_start,
                 std::optional<double> scale) {
  const ScoreShape s = validate_score(q_window, key, kernel_size, key_start);
  const Pooling pool = parse_pooling(std::string(pooling));
  const Reduce agg = parse_reduce(std::string(aggregate), "aggregate");
  const Reduce red = parse_reduce(std::string(gqa_reduce), "gqa_reduce");
  check_key_start_range(key_start, s.N);
  Tensor out = new_empty("score", "the scores", q_window, {s.B, s.Hk, s.L}, kFloat);
  if (out.numel() == 0) return out;
  const float sc = static_cast<float>(scale.value_or(1.0 / std::sqrt(static_cast<double>(s.D))));
  const int32_t* ks = ptr<int32_t>(key_start);
  ADAKV_CPU_DTYPE_SWITCH(key.scalar_type(), scalar_t, [&] {
    score_kernel<scalar_t>(ptr<scalar_t>(q_window), ptr<scalar_t>(key), ks,
                           ptr<float>(out), s, sc, pool, kernel_size, agg, red);
  });
  return out;
}

}  // namespace cpu
}  // namespace adakv
