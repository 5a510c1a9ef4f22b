// CPU kernels of the head-flattened cache: adakv::compact and adakv::append_.
//
// compact: gathers the kept prefix rows (kept_idx, ascending) and the window of every
//   segment s = b * Hk + h of key/value [B, Hk, N, D] into k_flat/v_flat [rows, D]; segment s
//   owns rows [seg_start[s], seg_start[s] + budgets[s] + window + reserve). Parallel over
//   segments; each row is one memcpy of D elements.
// append_: writes key_new/value_new [B, Hk, T, D] at seg_start[s] + seg_len[s] in place and
//   bumps seg_len; every capacity is checked before anything is written.

#include <cstring>

#include "checks.h"
#include "cpu/kernels.h"
#include "ops.h"

namespace adakv {
namespace cpu {

FlatCache compact(const Tensor& key, const Tensor& value, const Tensor& kept_idx,
                  const Tensor& kept_count, const Tensor& budgets, int64_t window,
                  int64_t reserve, std::optional<int64_t> rows, const OptTensor& key_start) {
  validate_compact(key, value, kept_idx, kept_count, budgets, window, reserve, rows, key_start);
  const int64_t B = key.size(0), Hk = key.size(1), N = key.size(2), D = key.size(3);
  const int64_t S = B * Hk, L = N - window;
  check_key_start_range(key_start, N);
  const int32_t* bud = ptr<int32_t>(budgets);
  const int32_t* cnt = ptr<int32_t>(kept_count);
  const int32_t* idx = ptr<int32_t>(kept_idx);
  const int32_t* ks = ptr<int32_t>(key_start);

  Tensor seg_start = new_empty("compact", "seg_start", budgets, {S}, kInt);
  Tensor seg_len = new_empty("compact", "seg_len", budgets, {S}, kInt);
  int32_t* start = ptr<int32_t>(seg_start);
  int32_t* len = ptr<int32_t>(seg_len);
  int64_t total = 0;
  for (int64_t s = 0; s < S; ++s) {
    ADAKV_CHECK(bud[s] >= 0, "adakv: budgets[", s / Hk, ", ", s % Hk, "] = ", bud[s],
                " is negative");
    const int64_t ksb = ks ? ks[s / Hk] : 0;
    start[s] = static_cast<int32_t>(total);
    len[s] = static_cast<int32_t>(compact_segment_len(s, Hk, cnt, idx, L, N, window, ksb, bud[s]));
    total += bud[s] + window + reserve;
    ADAKV_CHECK(total <= std::numeric_limits<int32_t>::max(),
                "adakv: the flat cache would exceed 2^31 - 1 rows");
  }
  const int64_t n_rows = rows.value_or(total);
  ADAKV_CHECK(n_rows >= total, "adakv: rows = ", n_rows,
              " is smaller than the capacity the budgets need (", total, ")");

  Tensor k_flat = new_zeros("compact", "k_flat", key, {n_rows, D}, key.scalar_type());
  Tensor v_flat = new_zeros("compact", "v_flat", value, {n_rows, D}, value.scalar_type());
  const int64_t row_bytes = D * key.element_size();
  const char* kp = static_cast<const char*>(key.data_ptr());
  const char* vp = static_cast<const char*>(value.data_ptr());
  char* kf = static_cast<char*>(k_flat.data_ptr());
  char* vf = static_cast<char*>(v_flat.data_ptr());
  torch::stable::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t ksb = ks ? ks[s / Hk] : 0;
      for_each_compact_row(s, cnt, idx, L, N, ksb, [&](int64_t i, int64_t n) {
        const int64_t dst = start[s] + i;
        copy_bytes(kf + dst * row_bytes, kp + (s * N + n) * row_bytes, row_bytes);
        copy_bytes(vf + dst * row_bytes, vp + (s * N + n) * row_bytes, row_bytes);
      });
    }
  });
  return {k_flat, v_flat, seg_start, seg_len};
}

void append_(const Tensor& k_flat, const Tensor& v_flat, const Tensor& seg_start,
             const Tensor& seg_len, const Tensor& key_new, const Tensor& value_new,
             const OptTensor& overflow) {
  const DecodeShape s = validate_append(k_flat, v_flat, seg_start, seg_len, key_new, value_new,
                                        overflow);
  const int32_t* start = ptr<int32_t>(seg_start);
  int32_t* len = ptr<int32_t>(seg_len);
  // Validate every segment before writing anything: a failed append changes nothing.
  for (int64_t i = 0; i < s.S; ++i) {
    const int64_t cap_end = i + 1 < s.S ? start[i + 1] : s.rows;
    ADAKV_CHECK(start[i] >= 0 && start[i] <= cap_end && cap_end <= s.rows,
                "adakv: seg_start is not a valid partition of the ", s.rows,
                " cache rows at segment ", i);
    ADAKV_CHECK(len[i] >= 0, "adakv: seg_len[", i, "] = ", len[i], " is negative");
    ADAKV_CHECK(start[i] + int64_t{len[i]} + s.T <= cap_end, "adakv: append_ of ", s.T,
                " tokens exceeds the capacity of segment ", i, " (length ", len[i],
                ", capacity ", cap_end - start[i],
                "); grow the cache (more reserve) before appending");
  }
  const int64_t row_bytes = s.D * k_flat.element_size();
  const char* kn = static_cast<const char*>(key_new.data_ptr());
  const char* vn = static_cast<const char*>(value_new.data_ptr());
  char* kf = static_cast<char*>(k_flat.data_ptr());
  char* vf = static_cast<char*>(v_flat.data_ptr());
  torch::stable::parallel_for(0, s.S, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t dst = start[i] + len[i];
      copy_bytes(kf + dst * row_bytes, kn + i * s.T * row_bytes, s.T * row_bytes);
      copy_bytes(vf + dst * row_bytes, vn + i * s.T * row_bytes, s.T * row_bytes);
      len[i] += static_cast<int32_t>(s.T);
    }
  });
}

}  // namespace cpu
}  // namespace adakv
