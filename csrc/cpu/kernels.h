// CPU-internal building blocks shared by the contiguous (cache.cpp, decode_attention.cpp) and
// the paged (paged.cpp) kernels, so both layouts run literally the same row order and the same
// softmax math:
//   * compact_segment_len / for_each_compact_row: which source tokens a segment stores, in
//     which order (kept prefix in kept_idx order, then the window), and how many;
//   * window_softmax: one window query's softmax (score and defensive_score);
//   * decode_rows: the one-pass online-softmax decode over the rows of every segment, with the
//     address of row n of segment s given by a functor `row(s, n) -> row index` into K/V.
// Only the CPU library (_C) includes this header.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "checks.h"

namespace adakv {
namespace cpu {

// The window softmax of one observation-window query (SPEC section 1), shared by the score
// and defensive_score kernels so both run literally the same fp32 arithmetic: q_row [D] (the
// query, scaled by `scale` into qt [D]) against the fp32 keys kf [N, D], visible columns
// [ks, pos]; leaves exp(logit - max) in p[ks..pos] and returns 1 / (their sum).
template <typename scalar_t>
inline float window_softmax(const scalar_t* q_row, float scale, const float* kf, int64_t D,
                            int64_t ks, int64_t pos, float* qt, float* p) {
  for (int64_t d = 0; d < D; ++d) qt[d] = static_cast<float>(q_row[d]) * scale;
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t n = ks; n <= pos; ++n) {
    const float* kn = kf + n * D;
    float acc = 0.f;
    for (int64_t d = 0; d < D; ++d) acc += qt[d] * kn[d];
    p[n] = acc;
    mx = std::max(mx, acc);
  }
  float sum = 0.f;
  for (int64_t n = ks; n <= pos; ++n) {
    p[n] = std::exp(p[n] - mx);
    sum += p[n];
  }
  return 1.0f / sum;
}

// memcpy of n bytes; nothing for n == 0 (a D = 0 tensor has a null data pointer, and memcpy
// with a null pointer is undefined even for 0 bytes: UBSan flags it).
inline void copy_bytes(char* dst, const char* src, int64_t n) {
  if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n));
}

// Checks kept_count[s] (and its kept_idx entries) and returns the segment length
// kept_count + min(window, N - ksb). budget < 0: no budget bound (paged_compact_).
inline int64_t compact_segment_len(int64_t s, int64_t Hk, const int32_t* cnt, const int32_t* idx,
                                   int64_t L, int64_t N, int64_t window, int64_t ksb,
                                   int64_t budget) {
  if (budget >= 0) {
    ADAKV_CHECK(cnt[s] >= 0 && cnt[s] <= budget && cnt[s] <= L, "adakv: kept_count[", s / Hk,
                ", ", s % Hk, "] = ", cnt[s], " is outside [0, min(budget = ", budget,
                ", L = ", L, ")]");
  } else {
    ADAKV_CHECK(cnt[s] >= 0 && cnt[s] <= L, "adakv: kept_count[", s / Hk, ", ", s % Hk, "] = ",
                cnt[s], " is outside [0, L = ", L, "]");
  }
  for (int64_t i = 0; i < cnt[s]; ++i) {
    const int32_t n = idx[s * L + i];
    ADAKV_CHECK(n >= ksb && n < L, "adakv: kept_idx[", s / Hk, ", ", s % Hk, ", ", i, "] = ", n,
                " is outside the valid prefix [", ksb, ", ", L, ")");
  }
  return cnt[s] + std::min<int64_t>(window, N - ksb);
}

// Calls emit(i, n) for every stored row i of segment s, in storage order: source token n.
template <typename Emit>
inline void for_each_compact_row(int64_t s, const int32_t* cnt, const int32_t* idx, int64_t L,
                                 int64_t N, int64_t ksb, Emit&& emit) {
  int64_t i = 0;
  for (int64_t k = 0; k < cnt[s]; ++k) emit(i++, static_cast<int64_t>(idx[s * L + k]));
  for (int64_t n = std::max(ksb, L); n < N; ++n) emit(i++, n);
}

// Decode attention of q [B, Hq, T, D] over segments of len[s] rows; row n of segment s is row
// row(s, n) of kf / vf ([*, D]). Query t sees the first len - T + 1 + t rows. Parallel over the
// B * Hq * T query rows; fp32 online softmax (docs/semantics.md, "Inputs nobody should trust").
template <typename scalar_t, typename RowFn>
void decode_rows(const scalar_t* q, const scalar_t* kf, const scalar_t* vf, const int32_t* len,
                 RowFn row, scalar_t* out, float* lse, const DecodeShape& s, float scale) {
  const int64_t G = s.Hq / s.Hk, T = s.T, D = s.D;
  torch::stable::parallel_for(0, s.B * s.Hq * T, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qt(D), acc(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r % T, j = (r / T) % s.Hq, b = r / (T * s.Hq);
      const int64_t seg = b * s.Hk + j / G;
      const int64_t n_valid = int64_t{len[seg]} - T + 1 + t;
      for (int64_t d = 0; d < D; ++d) qt[d] = static_cast<float>(q[r * D + d]) * scale;
      std::fill(acc.begin(), acc.end(), 0.0f);
      float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
      for (int64_t n = 0; n < n_valid; ++n) {
        const int64_t rw = row(seg, n);
        const scalar_t* kr = kf + rw * D;
        const scalar_t* vr = vf + rw * D;
        float x = 0.f;
        for (int64_t d = 0; d < D; ++d) x += qt[d] * static_cast<float>(kr[d]);
        const float m_new = std::max(m, x);
        // A -inf logit has weight 0 (even while the running max is still -inf, where
        // exp(-inf - -inf) would be NaN); a NaN logit makes p, l and the output NaN.
        constexpr float kNegInf = -std::numeric_limits<float>::infinity();
        const float corr = m == kNegInf ? 0.0f : std::exp(m - m_new);
        const float p = x == kNegInf ? 0.0f : std::exp(x - m_new);
        l = l * corr + p;
        for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] * corr + p * static_cast<float>(vr[d]);
        m = m_new;
      }
      // l == 0: the row sees no key, or only -inf logits (masked keys, weight 0): output 0,
      // lse -inf, the empty-row marker. A NaN or +inf logit makes l NaN: NaN output and lse.
      // NaN values alone make the output NaN with the logits' finite lse.
      const float inv = l == 0.f ? 0.0f : 1.0f / l;
      for (int64_t d = 0; d < D; ++d) out[r * D + d] = static_cast<scalar_t>(acc[d] * inv);
      if (lse) lse[r] = l == 0.f ? -std::numeric_limits<float>::infinity() : m + std::log(l);
    }
  });
}

// The default decode scale 1 / sqrt(D).
inline float decode_scale(std::optional<double> scale, int64_t D) {
  return static_cast<float>(scale.value_or(1.0 / std::sqrt(static_cast<double>(D))));
}

}  // namespace cpu
}  // namespace adakv
