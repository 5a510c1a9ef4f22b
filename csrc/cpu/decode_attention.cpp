// CPU kernel of adakv::decode_attention(_lse): attention of query [B, Hq, T, D] over the
// head-flattened cache, GQA-aware (query head j reads KV segment b * Hk + j / G).
//
// Query t sees the first seg_len - T + 1 + t rows of its segment (the T newest tokens are
// the segment's last T rows, causal among themselves). One-pass online softmax in fp32.
// Parallel over the B * Hq * T query rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

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
  at::parallel_for(0, s.B * s.Hq * T, 1, [&](int64_t begin, int64_t end) {
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
        const float corr = std::exp(m - m_new), p = std::exp(x - m_new);
        l = l * corr + p;
        for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] * corr + p * static_cast<float>(vr[d]);
        m = m_new;
      }
      const float inv = l > 0.f ? 1.0f / l : 0.0f;
      for (int64_t d = 0; d < D; ++d) out[r * D + d] = static_cast<scalar_t>(acc[d] * inv);
      if (lse) lse[r] = l > 0.f ? m + std::log(l) : -std::numeric_limits<float>::infinity();
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_attention_lse(
    const at::Tensor& query, const at::Tensor& k_flat, const at::Tensor& v_flat,
    const at::Tensor& seg_start, const at::Tensor& seg_len, c10::optional<double> scale) {
  const DecodeShape s = validate_decode(query, k_flat, v_flat, seg_start, seg_len);
  const int32_t* start = seg_start.data_ptr<int32_t>();
  const int32_t* len = seg_len.data_ptr<int32_t>();
  for (int64_t i = 0; i < s.S; ++i) {
    TORCH_CHECK(start[i] >= 0 && len[i] >= 0 && int64_t{start[i]} + len[i] <= s.rows,
                "adakv: segment ", i, " (start ", start[i], ", length ", len[i],
                ") lies outside the ", s.rows, " cache rows");
  }
  at::Tensor out = at::empty_like(query);
  at::Tensor lse = at::empty({s.B, s.Hq, s.T}, query.options().dtype(at::kFloat));
  const float sc = static_cast<float>(scale.value_or(1.0 / std::sqrt(static_cast<double>(s.D))));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "adakv_decode", [&] {
    decode_kernel<scalar_t>(query.data_ptr<scalar_t>(), k_flat.data_ptr<scalar_t>(),
                            v_flat.data_ptr<scalar_t>(), start, len, out.data_ptr<scalar_t>(),
                            lse.data_ptr<float>(), s, sc);
  });
  return {out, lse};
}

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& k_flat,
                            const at::Tensor& v_flat, const at::Tensor& seg_start,
                            const at::Tensor& seg_len, c10::optional<double> scale) {
  return std::get<0>(decode_attention_lse(query, k_flat, v_flat, seg_start, seg_len, scale));
}

}  // namespace cpu
}  // namespace adakv
