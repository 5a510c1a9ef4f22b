// CPU kernels of the paged per-head storage (SPEC 3.1, docs/semantics.md "Paged storage").
//
// Pool k_pages / v_pages [num_pages, P, D]; segment s = b * Hk + h owns the pages
// page_table[s, 0..] ([S, width] int32) and holds seg_len[s] ([S] int32) tokens; its token i is
// k_pages[page_table[s, i / P], i % P]. Entries past ceil(seg_len / P) are never read.
//
// paged_compact_: the eviction result (key/value [B, Hk, N, D], kept_idx/kept_count as select
//   returns them, window, key_start) written into the pages, rows in exactly compact's order
//   (for_each_compact_row, cpu/kernels.h); seg_len = compact's seg_len. Parallel over segments,
//   one memcpy per row.
// paged_append_: key_new/value_new [B, Hk, T, D] written at rows seg_len[s] + [0, T), then
//   seg_len += T. Parallel over segments.
// paged_append_rotary_: the same append with key_new rotated by RoPE (rotary.h; cos / sin
//   [B or 1, T, D] of the token's batch row and position), and the query [B, Hq, T, D] rotated
//   into a new contiguous tensor (also for padding segments). Inputs read through their
//   strides (last stride 1). Parallel over segments: segment b * Hk + h also rotates the G
//   query heads h * G .. h * G + G - 1 of row b.
// paged_decode_attention(_lse): decode_attention's math (decode_rows, cpu/kernels.h, parallel
//   over the B * Hq * T query rows) with segment rows read through the page table.
// segment_index [B * Hk] int32 (append, decode; optional): batch segment i (of key_new / query)
//   uses table row r = segment_index[i], page_table[r, :] and seg_len[r], of a table with any
//   number of rows; r == -1 is a padding segment (append: nothing written; decode: out 0, lse
//   -inf). Without it, batch segment i is table row i.
//
// Every data-dependent check (lengths, table width, page ids in range, no page used twice by
// paged_compact_, segment_index values in [-1, rows) and distinct for paged_append_) runs before
// anything is written: a failed call changes nothing. Table rows no batch segment names are
// neither checked nor read.

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"
#include "cpu/kernels.h"
#include "ops.h"
#include "rotary.h"

namespace adakv {
namespace cpu {
namespace {

// Table row of batch segment i: segment_index[i] (-1: padding), or i without an index.
struct SegmentRows {
  const int32_t* index;  // [B * Hk] or nullptr
  int64_t operator()(int64_t i) const { return index != nullptr ? int64_t{index[i]} : i; }
};

// Pool row (page slot) of token n of batch segment s (s's table row is rows(s) >= 0).
struct PagedRow {
  const int32_t* table;
  int64_t width, P;
  SegmentRows rows;
  int64_t operator()(int64_t s, int64_t n) const {
    return int64_t{table[rows(s) * width + n / P]} * P + n % P;
  }
};

// The data-dependent checks of an append of s.T tokens to the batch segments (paged_append_,
// paged_append_rotary_), before anything is written: segment_index values in [-1, rows) and
// distinct (so no two batch segments write one table row: the parallel loops have no race),
// then each named row's length, table width and page ids. (overflow is the CUDA kernels'
// report; the CPU raises instead and leaves it as it is.)
void check_append_segments(const char* op, const OptTensor& segment_index, const int32_t* table,
                           const int32_t* len, const PagedShape& p, const DecodeShape& s,
                           const SegmentRows& rows) {
  check_segment_index_values(op, segment_index, p.S, /*distinct=*/true);
  for (int64_t i = 0; i < s.S; ++i) {
    const int64_t r = rows(i);
    if (r < 0) continue;  // padding
    ADAKV_CHECK(len[r] >= 0, "adakv: ", op, ": seg_len[", r, "] = ", len[r], " is negative");
    ADAKV_CHECK(int64_t{len[r]} + s.T <= p.width * p.P, "adakv: ", op, " of ", s.T,
                " tokens exceeds the page_table of segment ", r, " (length ", len[r], ", ",
                p.width, " pages of P = ", p.P, " = ", p.width * p.P,
                " rows); give the segment more pages before appending");
    check_paged_rows(op, table, p, r, len[r], int64_t{len[r]} + s.T);
  }
}

}  // namespace

void paged_compact_(const Tensor& k_pages, const Tensor& v_pages, const Tensor& page_table,
                    const Tensor& seg_len, const Tensor& key, const Tensor& value,
                    const Tensor& kept_idx, const Tensor& kept_count, int64_t window,
                    const OptTensor& key_start) {
  const PagedShape p = validate_paged_compact(k_pages, v_pages, page_table, seg_len, key, value,
                                              kept_idx, kept_count, window, key_start);
  const int64_t Hk = key.size(1), N = key.size(2), L = N - window;
  check_key_start_range(key_start, N);
  const int32_t* cnt = ptr<int32_t>(kept_count);
  const int32_t* idx = ptr<int32_t>(kept_idx);
  const int32_t* ks = ptr<int32_t>(key_start);
  const int32_t* table = ptr<int32_t>(page_table);
  std::vector<int64_t> len(static_cast<size_t>(p.S));
  for (int64_t s = 0; s < p.S; ++s) {
    const int64_t ksb = ks ? ks[s / Hk] : 0;
    len[s] = compact_segment_len(s, Hk, cnt, idx, L, N, window, ksb, /*budget=*/-1);
    check_paged_rows("paged_compact_", table, p, s, 0, len[s]);
  }
  check_paged_unique("paged_compact_", table, p, len.data());

  int32_t* out_len = ptr<int32_t>(seg_len);
  const PagedRow row{table, p.width, p.P, SegmentRows{nullptr}};
  const int64_t row_bytes = p.D * key.element_size();
  const char* kp = static_cast<const char*>(key.data_ptr());
  const char* vp = static_cast<const char*>(value.data_ptr());
  char* kd = static_cast<char*>(k_pages.data_ptr());
  char* vd = static_cast<char*>(v_pages.data_ptr());
  torch::stable::parallel_for(0, p.S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t ksb = ks ? ks[s / Hk] : 0;
      for_each_compact_row(s, cnt, idx, L, N, ksb, [&](int64_t i, int64_t n) {
        const int64_t dst = row(s, i);
        copy_bytes(kd + dst * row_bytes, kp + (s * N + n) * row_bytes, row_bytes);
        copy_bytes(vd + dst * row_bytes, vp + (s * N + n) * row_bytes, row_bytes);
      });
      out_len[s] = static_cast<int32_t>(len[s]);
    }
  });
}

void paged_append_(const Tensor& k_pages, const Tensor& v_pages, const Tensor& page_table,
                   const Tensor& seg_len, const Tensor& key_new, const Tensor& value_new,
                   const OptTensor& overflow, const OptTensor& segment_index) {
  PagedShape p;
  const DecodeShape s = validate_paged_append(k_pages, v_pages, page_table, seg_len, key_new,
                                              value_new, overflow, segment_index, p);
  const int32_t* table = ptr<int32_t>(page_table);
  int32_t* len = ptr<int32_t>(seg_len);
  const SegmentRows rows{ptr<int32_t>(segment_index)};
  check_append_segments("paged_append_", segment_index, table, len, p, s, rows);
  const PagedRow row{table, p.width, p.P, rows};
  const int64_t row_bytes = s.D * k_pages.element_size();
  const char* kn = static_cast<const char*>(key_new.data_ptr());
  const char* vn = static_cast<const char*>(value_new.data_ptr());
  char* kd = static_cast<char*>(k_pages.data_ptr());
  char* vd = static_cast<char*>(v_pages.data_ptr());
  torch::stable::parallel_for(0, s.S, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = rows(i);
      if (r < 0) continue;
      for (int64_t t = 0; t < s.T; ++t) {
        const int64_t dst = row(i, len[r] + t);
        copy_bytes(kd + dst * row_bytes, kn + (i * s.T + t) * row_bytes, row_bytes);
        copy_bytes(vd + dst * row_bytes, vn + (i * s.T + t) * row_bytes, row_bytes);
      }
      len[r] += static_cast<int32_t>(s.T);
    }
  });
}

Tensor paged_append_rotary_(const Tensor& k_pages, const Tensor& v_pages,
                            const Tensor& page_table, const Tensor& seg_len, const Tensor& query,
                            const Tensor& key_new, const Tensor& value_new, const Tensor& cos,
                            const Tensor& sin, const OptTensor& overflow,
                            const OptTensor& segment_index) {
  const char* op = "paged_append_rotary_";
  PagedShape p;
  const DecodeShape s = validate_paged_append_rotary(k_pages, v_pages, page_table, seg_len, query,
                                                     key_new, value_new, cos, sin, overflow,
                                                     segment_index, p);
  const int32_t* table = ptr<int32_t>(page_table);
  int32_t* len = ptr<int32_t>(seg_len);
  const SegmentRows rows{ptr<int32_t>(segment_index)};
  check_append_segments(op, segment_index, table, len, p, s, rows);
  Tensor q_out =
      new_empty(op, "the rotated query", query, {s.B, s.Hq, s.T, s.D}, query.scalar_type());
  const PagedRow row{table, p.width, p.P, rows};
  const int64_t G = s.Hq / s.Hk, T = s.T, D = s.D, half = D / 2;
  const RotaryStrides st = rotary_strides(query, key_new, value_new, cos, sin);
  ADAKV_CPU_DTYPE_SWITCH(query.scalar_type(), scalar_t, [&] {
    const auto run = [&](const auto* cos_p, const auto* sin_p) {
      // x [D] rotated by the angles of (batch row b, token t) into out [D]
      const auto rotate = [&](const scalar_t* x, int64_t b, int64_t t, scalar_t* out) {
        const auto* c = cos_p + b * st.cos[0] + t * st.cos[1];
        const auto* sn = sin_p + b * st.sin[0] + t * st.sin[1];
        for (int64_t i = 0; i < half; ++i) {
          const RotatedPair r = rotate_pair(
              static_cast<float>(x[i]), static_cast<float>(x[i + half]),
              static_cast<float>(c[i]), static_cast<float>(sn[i]),
              static_cast<float>(c[i + half]), static_cast<float>(sn[i + half]));
          out[i] = static_cast<scalar_t>(r.lo);
          out[i + half] = static_cast<scalar_t>(r.hi);
        }
      };
      const scalar_t* q = ptr<scalar_t>(query);
      const scalar_t* kn = ptr<scalar_t>(key_new);
      const scalar_t* vn = ptr<scalar_t>(value_new);
      scalar_t* qo = ptr<scalar_t>(q_out);
      scalar_t* kd = ptr<scalar_t>(k_pages);
      scalar_t* vd = ptr<scalar_t>(v_pages);
      // (D == 0: no element to touch, and no pointer arithmetic on the empty tensors' null
      // data; the lengths still advance, as paged_append_'s do)
      torch::stable::parallel_for(0, s.S, 16, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / s.Hk, h = i % s.Hk;
          for (int64_t t = 0; t < T && D > 0; ++t) {
            for (int64_t g = h * G; g < (h + 1) * G; ++g) {
              rotate(q + b * st.q[0] + g * st.q[1] + t * st.q[2], b, t,
                     qo + ((b * s.Hq + g) * T + t) * D);
            }
          }
          const int64_t r = rows(i);
          if (r < 0) continue;  // padding: the query is rotated, nothing stored
          for (int64_t t = 0; t < T && D > 0; ++t) {
            const int64_t dst = row(i, len[r] + t);
            rotate(kn + b * st.k[0] + h * st.k[1] + t * st.k[2], b, t, kd + dst * D);
            const scalar_t* v = vn + b * st.v[0] + h * st.v[1] + t * st.v[2];
            std::copy(v, v + D, vd + dst * D);
          }
          len[r] += static_cast<int32_t>(T);
        }
      });
    };
    if (cos.scalar_type() == kFloat) {
      run(ptr<float>(cos), ptr<float>(sin));
    } else {
      run(ptr<scalar_t>(cos), ptr<scalar_t>(sin));
    }
  });
  return q_out;
}

std::tuple<Tensor, Tensor> paged_decode_attention_lse(
    const Tensor& query, const Tensor& k_pages, const Tensor& v_pages, const Tensor& page_table,
    const Tensor& seg_len, std::optional<double> scale, const OptTensor& segment_index) {
  PagedShape p;
  const DecodeShape s =
      validate_paged_decode(query, k_pages, v_pages, page_table, seg_len, segment_index, p);
  const int32_t* table = ptr<int32_t>(page_table);
  const int32_t* len = ptr<int32_t>(seg_len);
  const SegmentRows rows{ptr<int32_t>(segment_index)};
  check_segment_index_values("paged_decode_attention", segment_index, p.S, /*distinct=*/false);
  for (int64_t i = 0; i < s.S; ++i) {
    const int64_t r = rows(i);
    if (r < 0) continue;  // padding
    ADAKV_CHECK(len[r] >= 0 && len[r] <= p.width * p.P, "adakv: paged_decode_attention: seg_len[",
                r, "] = ", len[r], " is outside [0, max_pages * P = ", p.width, " * ", p.P,
                " = ", p.width * p.P, "]");
    check_paged_rows("paged_decode_attention", table, p, r, 0, len[r]);
  }
  // The length of every batch segment (0 for padding): seg_len itself without an index.
  std::vector<int32_t> batch_len;
  if (segment_index.has_value()) {
    batch_len.resize(static_cast<size_t>(s.S));
    for (int64_t i = 0; i < s.S; ++i) batch_len[i] = rows(i) < 0 ? 0 : len[rows(i)];
    len = batch_len.data();
  }
  Tensor out = new_empty("paged_decode_attention", "the output", query, {s.B, s.Hq, s.T, s.D},
                         query.scalar_type());
  Tensor lse = new_empty("paged_decode_attention", "the log-sum-exp", query, {s.B, s.Hq, s.T},
                         kFloat);
  const float sc = decode_scale(scale, s.D);
  const PagedRow row{table, p.width, p.P, rows};
  ADAKV_CPU_DTYPE_SWITCH(query.scalar_type(), scalar_t, [&] {
    decode_rows<scalar_t>(ptr<scalar_t>(query), ptr<scalar_t>(k_pages), ptr<scalar_t>(v_pages),
                          len, row, ptr<scalar_t>(out), ptr<float>(lse), s, sc);
  });
  return {out, lse};
}

Tensor paged_decode_attention(const Tensor& query, const Tensor& k_pages, const Tensor& v_pages,
                              const Tensor& page_table, const Tensor& seg_len,
                              std::optional<double> scale, const OptTensor& segment_index) {
  return std::get<0>(paged_decode_attention_lse(query, k_pages, v_pages, page_table, seg_len,
                                                scale, segment_index));
}

}  // namespace cpu
}  // namespace adakv
