// CPU kernel of adakv::decode_attention(_lse): attention of query [B, Hq, T, D] over the
// head-flattened cache, GQA-aware (query head j reads KV segment b * Hk + j / G).
//
// Query t sees the first seg_len - T + 1 + t rows of its segment (the T newest tokens are
// the segment's last T rows, causal among themselves). One-pass online softmax in fp32.
// Parallel over the B * Hq * T query rows. The row loop is decode_rows (cpu/kernels.h), shared
// with the paged decode (cpu/paged.cpp); here row n of segment s is flat row seg_start[s] + n.

#include "checks.h"
#include "cpu/kernels.h"
#include "ops.h"

namespace adakv {
namespace cpu {
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
  const float sc = decode_scale(scale, s.D);
  auto row = [start](int64_t seg, int64_t n) { return int64_t{start[seg]} + n; };
  ADAKV_CPU_DTYPE_SWITCH(query.scalar_type(), scalar_t, [&] {
    decode_rows<scalar_t>(ptr<scalar_t>(query), ptr<scalar_t>(k_flat), ptr<scalar_t>(v_flat),
                          len, row, ptr<scalar_t>(out), ptr<float>(lse), s, sc);
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
