// CPU kernel of adakv::decode_attention(_lse): attention of query [B, Hq, T, D] over the
// head-flattened cache, GQA-aware (query head j reads KV segment b * Hk + j / G).
//
// Query t sees the first seg_len - T + 1 + t rows of its segment (the T newest tokens are
// the segment's last T rows, causal among themselves). One-pass online softmax in fp32.
// Parallel over the B * Hq * T query rows.

#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace adakv {
namespace cpu {
namespace {

template <typename scalar_t>
void decode_kernel(const scalar_t* q, const scalar_t* kf, const scalar_t* vf,
                   const int32_t* start, const int32_t* len, scalar_t* out, float* lse,
                   const DecodeShape& s, float scale) {
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
        const scalar_t* kr = kf + (start[seg] + n) * D;
        const scalar_t* vr = vf + (start[seg] + n) * D;
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

}  // namespace

std::tuple<Tensor, Tensor> decode_attention_lse(
    const Tensor& query, const Tensor& k_flat, const Tensor& v_flat,
    const Tensor& seg_start, const Tensor& seg_len, std::optional<double> scale) {
  const DecodeShape s = validate_decode(query, k_flat, v_flat, seg_start, seg_len);
  const int32_t* start = ptr<int32_t>(seg_start);
  const int32_t* len = ptr<int32_t>(seg_len);
  for (int64_t i = 0; i < s.S; ++i) {
    ADAKV_CHECK(start[i] >= 0 && len[i] >= 0 && int64_t{start[i]} + len[i] <= s.rows,
                "adakv: segment ", i, " (start ", start[i], ", length ", len[i],
                ") lies outside the ", s.rows, " cache rows");
  }
  Tensor out = new_empty("decode_attention", "the output", query, {s.B, s.Hq, s.T, s.D},
                         query.scalar_type());
  Tensor lse = new_empty("decode_attention", "the log-sum-exp", query, {s.B, s.Hq, s.T}, kFloat);
  const float sc = static_cast<float>(scale.value_or(1.0 / std::sqrt(static_cast<double>(s.D))));
  ADAKV_CPU_DTYPE_SWITCH(query.scalar_type(), scalar_t, [&] {
    decode_kernel<scalar_t>(ptr<scalar_t>(query), ptr<scalar_t>(k_flat),
                            ptr<scalar_t>(v_flat), start, len, ptr<scalar_t>(out),
                            ptr<float>(lse), s, sc);
  });
  return {out, lse};
}

Tensor decode_attention(const Tensor& query, const Tensor& k_flat,
                            const Tensor& v_flat, const Tensor& seg_start,
                            const Tensor& seg_len, std::optional<double> scale) {
  return std::get<0>(decode_attention_lse(query, k_flat, v_flat, seg_start, seg_len, scale));
}

}  // namespace cpu
}  // namespace adakv
