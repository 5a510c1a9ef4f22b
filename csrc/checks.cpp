#include "checks.h"

#include <limits>
#include <vector>

namespace adakv {
namespace {

bool same_shape(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t i = 0; i < a.dim(); ++i)
    if (a.size(i) != b.size(i)) return false;
  return true;
}

bool is_kv_dtype(ScalarType t) {
  return t == kFloat || t == kHalf || t == kBFloat16;
}

// Rank `dim`, and contiguous; with `strided` any strides whose last one is 1 instead (rows of
// contiguous elements: e.g. the heads of one fused projection's output, viewed in place).
void check_tensor(const Tensor& t, const char* name, int64_t dim, bool strided = false) {
  ADAKV_CHECK(t.dim() == dim, "adakv: ", name, " must have ", dim, " dimensions, got shape ",
              shape_str(t));
  if (strided) {
    ADAKV_CHECK(t.size(dim - 1) <= 1 || t.stride(dim - 1) == 1, "adakv: ", name,
                " must have stride 1 in its last dimension, got strides of shape ", shape_str(t),
                " with last stride ", t.stride(dim - 1));
  } else {
    ADAKV_CHECK(t.is_contiguous(), "adakv: ", name, " must be contiguous");
  }
}

void check_kv(const Tensor& t, const char* name, int64_t dim, bool strided = false) {
  check_tensor(t, name, dim, strided);
  ADAKV_CHECK(is_kv_dtype(t.scalar_type()), "adakv: ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_int32(const Tensor& t, const char* name, int64_t dim) {
  check_tensor(t, name, dim);
  ADAKV_CHECK(t.scalar_type() == kInt, "adakv: ", name, " must be int32, got ",
              t.scalar_type());
}

void check_same_device(const Tensor& ref, const Tensor& t, const char* ref_name,
                       const char* name) {
  ADAKV_CHECK(same_device(ref, t), "adakv: ", name, " is on ", device_str(t), " but ",
              ref_name, " is on ", device_str(ref), "; all tensors must be on one device");
}

void check_same_dtype(const Tensor& ref, const Tensor& t, const char* ref_name,
                      const char* name) {
  ADAKV_CHECK(ref.scalar_type() == t.scalar_type(), "adakv: ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
}

void check_key_start(const std::optional<Tensor>& key_start, const Tensor& ref,
                     const char* ref_name, int64_t B) {
  if (!key_start.has_value()) return;
  check_int32(*key_start, "key_start", 1);
  check_same_device(ref, *key_start, ref_name, "key_start");
  ADAKV_CHECK(key_start->size(0) == B, "adakv: key_start must have shape [B] = [", B,
              "], got ", shape_str(*key_start));
}


// A cache as the append / decode validators see it: the tensor the new tokens or queries must
// match (k_flat or k_pages), its segments and head dim, and the names messages give them.
struct CacheView {
  const Tensor& k;
  const char* k_name;   // "k_flat" / "k_pages"
  const char* segs_in;  // holds the segments: "the cache" / "page_table"
  const char* dim_in;   // holds the head dim: "the cache" / "k_pages"
  int64_t S, D, rows;
};

// key_new / value_new [B, Hk, T, D] (+ overflow [S]) of an append into `c`.
// `strided`: key_new / value_new may have any strides whose last one is 1.
DecodeShape validate_new_tokens(const char* op, const CacheView& c, const Tensor& key_new,
                                const Tensor& value_new, const std::optional<Tensor>& overflow,
                                const char* overflow_name, bool strided = false) {
  check_kv(key_new, "key_new [B, Hk, T, D]", 4, strided);
  check_same_device(c.k, key_new, c.k_name, "key_new");
  check_same_dtype(c.k, key_new, c.k_name, "key_new");
  validate_key_value(key_new, value_new, strided);
  DecodeShape s;
  s.B = key_new.size(0);
  s.Hk = key_new.size(1);
  s.Hq = s.Hk;
  s.T = key_new.size(2);
  s.D = key_new.size(3);
  s.rows = c.rows;
  s.S = c.S;
  ADAKV_CHECK(s.T >= 1, "adakv: ", op, " needs at least one new token (T >= 1), got T = ", s.T);
  ADAKV_CHECK(s.B * s.Hk == s.S, "adakv: key_new has B * Hk = ", s.B, " * ", s.Hk, " = ",
              s.B * s.Hk, " segments but ", c.segs_in, " has ", s.S);
  ADAKV_CHECK(c.D == s.D, "adakv: key_new has head dim ", s.D, " but ", c.dim_in, " has ", c.D);
  if (overflow.has_value()) {
    check_int32(*overflow, overflow_name, 1);
    check_same_device(c.k, *overflow, c.k_name, "overflow");
    ADAKV_CHECK(overflow->size(0) == s.S, "adakv: overflow must have shape [", s.S, "], got ",
                shape_str(*overflow));
  }
  return s;
}

// query [B, Hq, T, D] of a decode over `c` (Hk = segments / B).
DecodeShape validate_query(const CacheView& c, const Tensor& query) {
  check_kv(query, "query [B, Hq, T, D]", 4);
  check_same_device(c.k, query, c.k_name, "query");
  check_same_dtype(c.k, query, c.k_name, "query");
  DecodeShape s;
  s.B = query.size(0);
  s.Hq = query.size(1);
  s.T = query.size(2);
  s.D = query.size(3);
  s.rows = c.rows;
  s.S = c.S;
  ADAKV_CHECK(s.B >= 1 && s.S % s.B == 0, "adakv: ", c.segs_in, " has ", s.S,
              " segments, not a multiple of the query batch ", s.B);
  s.Hk = s.S / s.B;
  ADAKV_CHECK(s.Hk >= 1 && s.Hq % s.Hk == 0, "adakv: query heads (", s.Hq,
              ") must be a multiple of KV heads (", s.Hk, " = segments of ", c.segs_in,
              " / batch)");
  ADAKV_CHECK(s.T >= 1, "adakv: query must hold at least one token (T >= 1)");
  ADAKV_CHECK(c.D == s.D, "adakv: query has head dim ", s.D, " but ", c.dim_in, " has ", c.D);
  return s;
}

// kept_idx [B, Hk, N - window] / kept_count [B, Hk] int32 on key's device, window in [0, N].
void validate_kept(const Tensor& key, const Tensor& kept_idx, const Tensor& kept_count,
                   int64_t window, const char* kept_idx_name) {
  const int64_t B = key.size(0), Hk = key.size(1), N = key.size(2);
  ADAKV_CHECK(window >= 0 && window <= N, "adakv: window must be in [0, N = ", N, "], got ",
              window);
  ADAKV_CHECK(window <= std::numeric_limits<int32_t>::max(),
              "adakv: window must be < 2^31, got ", window);
  check_int32(kept_idx, kept_idx_name, 3);
  check_int32(kept_count, "kept_count [B, Hk]", 2);
  check_same_device(key, kept_idx, "key", "kept_idx");
  check_same_device(key, kept_count, "key", "kept_count");
  ADAKV_CHECK(kept_idx.size(0) == B && kept_idx.size(1) == Hk && kept_idx.size(2) == N - window,
              "adakv: kept_idx must have shape [B, Hk, N - window] = [", B, ", ", Hk, ", ",
              N - window, "], got ", shape_str(kept_idx));
  ADAKV_CHECK(kept_count.size(0) == B && kept_count.size(1) == Hk,
              "adakv: kept_count must have shape [B, Hk] = [", B, ", ", Hk, "], got ",
              shape_str(kept_count));
}

// The paged pool as the append / decode validators see it: its batch segments are the table's
// rows, or with segment_index ([S] int32, contiguous, on page_table's device) its S entries,
// each naming a table row (values: check_segment_index_values, CPU only).
CacheView paged_view(const Tensor& k_pages, const Tensor& page_table, const PagedShape& pool,
                     const std::optional<Tensor>& segment_index) {
  if (!segment_index.has_value())
    return CacheView{k_pages, "k_pages", "page_table", "k_pages", pool.S, pool.D,
                     pool.num_pages * pool.P};
  check_int32(*segment_index, "segment_index [B * Hk]", 1);
  check_same_device(page_table, *segment_index, "page_table", "segment_index");
  return CacheView{k_pages, "k_pages", "segment_index", "k_pages", segment_index->size(0),
                   pool.D, pool.num_pages * pool.P};
}

}  // namespace

Pooling parse_pooling(const std::string& s) {
  if (s == "max") return Pooling::kMax;
  if (s == "avg") return Pooling::kAvg;
  if (s == "none") return Pooling::kNone;
  detail::fail("adakv: pooling must be 'max', 'avg' or 'none', got '", s, "'");
}

Reduce parse_reduce(const std::string& s, const char* what) {
  if (s == "mean") return Reduce::kMean;
  if (s == "max") return Reduce::kMax;
  detail::fail("adakv: ", what, " must be 'mean' or 'max', got '", s, "'");
}

Rounding parse_rounding(const std::string& s) {
  if (s == "exact") return Rounding::kExact;
  if (s == "official") return Rounding::kOfficial;
  detail::fail("adakv: rounding must be 'exact' or 'official', got '", s, "'");
}

ScoreShape validate_score(const Tensor& q_window, const Tensor& key,
                          int64_t kernel_size, const std::optional<Tensor>& key_start) {
  check_kv(q_window, "q_window [B, Hq, W, D]", 4);
  check_kv(key, "key [B, Hk, N, D]", 4);
  check_same_device(q_window, key, "q_window", "key");
  check_same_dtype(q_window, key, "q_window", "key");
  ScoreShape s;
  s.B = q_window.size(0);
  s.Hq = q_window.size(1);
  s.W = q_window.size(2);
  s.D = q_window.size(3);
  s.Hk = key.size(1);
  s.N = key.size(2);
  ADAKV_CHECK(key.size(0) == s.B, "adakv: key has batch ", key.size(0), " but q_window has ",
              s.B);
  ADAKV_CHECK(key.size(3) == s.D, "adakv: key has head dim ", key.size(3),
              " but q_window has ", s.D);
  ADAKV_CHECK(s.Hk >= 1 && s.Hq % s.Hk == 0, "adakv: query heads (", s.Hq,
              ") must be a multiple of KV heads (", s.Hk, ")");
  ADAKV_CHECK(s.W >= 1, "adakv: the observation window must hold at least one query, got W = ",
              s.W);
  ADAKV_CHECK(s.W <= s.N, "adakv: window W = ", s.W, " is longer than the prompt N = ", s.N);
  ADAKV_CHECK(kernel_size >= 1 && kernel_size % 2 == 1,
              "adakv: kernel_size must be odd and >= 1, got ", kernel_size);
  check_key_start(key_start, key, "key", s.B);
  s.L = s.N - s.W;
  return s;
}

void validate_key_value(const Tensor& key, const Tensor& value, bool strided) {
  check_kv(value, "value [B, Hk, N, D]", 4, strided);
  check_same_device(key, value, "key", "value");
  check_same_dtype(key, value, "key", "value");
  ADAKV_CHECK(same_shape(key, value), "adakv: value has shape ", shape_str(value),
              " but key has shape ", shape_str(key));
}

void validate_scores(const Tensor& scores, const std::optional<Tensor>& key_start) {
  check_tensor(scores, "scores [B, Hk, L]", 3);
  ADAKV_CHECK(scores.scalar_type() == kFloat, "adakv: scores must be float32, got ",
              scores.scalar_type());
  check_key_start(key_start, scores, "scores", scores.size(0));
}

void validate_budget_args(int64_t budget, double floor_alpha) {
  ADAKV_CHECK(budget >= 0, "adakv: budget must be >= 0, got ", budget);
  ADAKV_CHECK(floor_alpha >= 0.0 && floor_alpha <= 1.0,
              "adakv: floor_alpha must be in [0, 1], got ", floor_alpha);
}

void validate_reserve(int64_t reserve) {
  ADAKV_CHECK(reserve >= 0 && reserve <= std::numeric_limits<int32_t>::max(),
              "adakv: reserve must be in [0, 2^31 - 1], got ", reserve);
}

int64_t flat_cache_rows(int64_t B, int64_t Hk, int64_t budget, int64_t window, int64_t reserve) {
  validate_reserve(reserve);
  ADAKV_CHECK(budget >= 0, "adakv: budget must be >= 0, got ", budget);
  const int64_t per_segment =
      checked_add(checked_add(budget, window, "budget + window"), reserve,
                  "budget + window + reserve");
  const int64_t rows = checked_mul(checked_mul(B, Hk, "B * Hk"), per_segment,
                                   "the flat cache size B * Hk * (budget + window + reserve)");
  ADAKV_CHECK(rows <= std::numeric_limits<int32_t>::max(),
              "adakv: the flat cache would hold B * Hk * (budget + window + reserve) = ", B,
              " * ", Hk, " * (", budget, " + ", window, " + ", reserve, ") = ", rows,
              " rows; at most 2^31 - 1 are supported (lower budget or reserve)");
  return rows;
}

void validate_budgets(const Tensor& budgets, const Tensor& scores) {
  check_int32(budgets, "budgets [B, Hk]", 2);
  check_same_device(scores, budgets, "scores", "budgets");
  ADAKV_CHECK(budgets.size(0) == scores.size(0) && budgets.size(1) == scores.size(1),
              "adakv: budgets must have shape [B, Hk] = [", scores.size(0), ", ",
              scores.size(1), "], got ", shape_str(budgets));
}

void validate_compact(const Tensor& key, const Tensor& value, const Tensor& kept_idx,
                      const Tensor& kept_count, const Tensor& budgets, int64_t window,
                      int64_t reserve, const std::optional<int64_t>& rows,
                      const std::optional<Tensor>& key_start) {
  check_kv(key, "key [B, Hk, N, D]", 4);
  validate_key_value(key, value);
  const int64_t B = key.size(0), Hk = key.size(1);
  validate_kept(key, kept_idx, kept_count, window, "kept_idx [B, Hk, L]");
  validate_reserve(reserve);
  check_int32(budgets, "budgets [B, Hk]", 2);
  check_same_device(key, budgets, "key", "budgets");
  ADAKV_CHECK(budgets.size(0) == B && budgets.size(1) == Hk,
              "adakv: budgets must have shape [B, Hk] = [", B, ", ", Hk, "], got ",
              shape_str(budgets));
  if (rows.has_value()) {
    ADAKV_CHECK(*rows >= 0 && *rows <= std::numeric_limits<int32_t>::max(),
                "adakv: rows must be in [0, 2^31), got ", *rows);
  }
  check_key_start(key_start, key, "key", B);
}

void validate_flat_cache(const Tensor& k_flat, const Tensor& v_flat,
                         const Tensor& seg_start, const Tensor& seg_len) {
  check_kv(k_flat, "k_flat [rows, D]", 2);
  check_kv(v_flat, "v_flat [rows, D]", 2);
  check_same_device(k_flat, v_flat, "k_flat", "v_flat");
  check_same_dtype(k_flat, v_flat, "k_flat", "v_flat");
  ADAKV_CHECK(same_shape(k_flat, v_flat), "adakv: v_flat has shape ", shape_str(v_flat),
              " but k_flat has shape ", shape_str(k_flat));
  ADAKV_CHECK(k_flat.size(0) <= std::numeric_limits<int32_t>::max(),
              "adakv: the flat cache may hold at most 2^31 - 1 rows");
  check_int32(seg_start, "seg_start [B * Hk]", 1);
  check_int32(seg_len, "seg_len [B * Hk]", 1);
  check_same_device(k_flat, seg_start, "k_flat", "seg_start");
  check_same_device(k_flat, seg_len, "k_flat", "seg_len");
  ADAKV_CHECK(seg_start.size(0) == seg_len.size(0), "adakv: seg_start has ", seg_start.size(0),
              " segments but seg_len has ", seg_len.size(0));
}

DecodeShape validate_append(const Tensor& k_flat, const Tensor& v_flat,
                            const Tensor& seg_start, const Tensor& seg_len,
                            const Tensor& key_new, const Tensor& value_new,
                            const std::optional<Tensor>& overflow) {
  validate_flat_cache(k_flat, v_flat, seg_start, seg_len);
  const CacheView c{k_flat, "k_flat", "the cache", "the cache", seg_start.size(0),
                    k_flat.size(1), k_flat.size(0)};
  return validate_new_tokens("append_", c, key_new, value_new, overflow, "overflow [B * Hk]");
}

DecodeShape validate_decode(const Tensor& query, const Tensor& k_flat,
                            const Tensor& v_flat, const Tensor& seg_start,
                            const Tensor& seg_len) {
  validate_flat_cache(k_flat, v_flat, seg_start, seg_len);
  const CacheView c{k_flat, "k_flat", "the cache", "the cache", seg_start.size(0),
                    k_flat.size(1), k_flat.size(0)};
  return validate_query(c, query);
}

// ---- paged storage

PagedShape validate_paged_pool(const Tensor& k_pages, const Tensor& v_pages,
                               const Tensor& page_table, const Tensor& seg_len) {
  check_kv(k_pages, "k_pages [num_pages, P, D]", 3);
  check_kv(v_pages, "v_pages [num_pages, P, D]", 3);
  check_same_device(k_pages, v_pages, "k_pages", "v_pages");
  check_same_dtype(k_pages, v_pages, "k_pages", "v_pages");
  ADAKV_CHECK(same_shape(k_pages, v_pages), "adakv: v_pages has shape ", shape_str(v_pages),
              " but k_pages has shape ", shape_str(k_pages));
  check_int32(page_table, "page_table [S, max_pages]", 2);
  check_int32(seg_len, "seg_len [S]", 1);
  check_same_device(k_pages, page_table, "k_pages", "page_table");
  check_same_device(k_pages, seg_len, "k_pages", "seg_len");
  PagedShape p;
  p.num_pages = k_pages.size(0);
  p.P = k_pages.size(1);
  p.D = k_pages.size(2);
  p.S = page_table.size(0);
  p.width = page_table.size(1);
  ADAKV_CHECK(p.P >= 1, "adakv: k_pages must have a page size P >= 1, got shape ",
              shape_str(k_pages));
  ADAKV_CHECK(p.num_pages <= std::numeric_limits<int32_t>::max(),
              "adakv: k_pages may hold at most 2^31 - 1 pages (int32 page ids), got ",
              p.num_pages);
  ADAKV_CHECK(seg_len.size(0) == p.S, "adakv: page_table has ", p.S,
              " segments (rows) but seg_len has ", seg_len.size(0));
  checked_mul(p.num_pages, p.P, "the page pool num_pages * P");
  checked_mul(p.width, p.P, "the page table's rows width * P");
  return p;
}

PagedShape validate_paged_compact(const Tensor& k_pages, const Tensor& v_pages,
                                  const Tensor& page_table, const Tensor& seg_len,
                                  const Tensor& key, const Tensor& value, const Tensor& kept_idx,
                                  const Tensor& kept_count, int64_t window,
                                  const std::optional<Tensor>& key_start) {
  const PagedShape p = validate_paged_pool(k_pages, v_pages, page_table, seg_len);
  check_kv(key, "key [B, Hk, N, D]", 4);
  validate_key_value(key, value);
  check_same_device(k_pages, key, "k_pages", "key");
  check_same_dtype(k_pages, key, "k_pages", "key");
  const int64_t B = key.size(0), Hk = key.size(1);
  ADAKV_CHECK(key.size(3) == p.D, "adakv: key has head dim ", key.size(3),
              " but k_pages has ", p.D);
  ADAKV_CHECK(B * Hk == p.S, "adakv: key has B * Hk = ", B, " * ", Hk, " = ", B * Hk,
              " segments but page_table has ", p.S, " rows");
  validate_kept(key, kept_idx, kept_count, window, "kept_idx [B, Hk, N - window]");
  check_key_start(key_start, key, "key", B);
  return p;
}

DecodeShape validate_paged_append(const Tensor& k_pages, const Tensor& v_pages,
                                  const Tensor& page_table, const Tensor& seg_len,
                                  const Tensor& key_new, const Tensor& value_new,
                                  const std::optional<Tensor>& overflow,
                                  const std::optional<Tensor>& segment_index, PagedShape& pool) {
  pool = validate_paged_pool(k_pages, v_pages, page_table, seg_len);
  const CacheView c = paged_view(k_pages, page_table, pool, segment_index);
  return validate_new_tokens("paged_append_", c, key_new, value_new, overflow,
                             "overflow [B * Hk]");
}

DecodeShape validate_paged_append_rotary(const Tensor& k_pages, const Tensor& v_pages,
                                         const Tensor& page_table, const Tensor& seg_len,
                                         const Tensor& query, const Tensor& key_new,
                                         const Tensor& value_new, const Tensor& cos,
                                         const Tensor& sin, const std::optional<Tensor>& overflow,
                                         const std::optional<Tensor>& segment_index,
                                         PagedShape& pool) {
  pool = validate_paged_pool(k_pages, v_pages, page_table, seg_len);
  const CacheView c = paged_view(k_pages, page_table, pool, segment_index);
  DecodeShape s = validate_new_tokens("paged_append_rotary_", c, key_new, value_new, overflow,
                                      "overflow [B * Hk]", /*strided=*/true);
  check_kv(query, "query [B, Hq, T, D]", 4, /*strided=*/true);
  check_same_device(k_pages, query, "k_pages", "query");
  check_same_dtype(k_pages, query, "k_pages", "query");
  ADAKV_CHECK(query.size(0) == s.B && query.size(2) == s.T && query.size(3) == s.D,
              "adakv: query has shape ", shape_str(query), " but key_new has shape ",
              shape_str(key_new), "; query must be [B, Hq, T, D] with key_new's B, T and D");
  ADAKV_CHECK(s.Hk >= 1 && query.size(1) % s.Hk == 0, "adakv: query heads (", query.size(1),
              ") must be a multiple of KV heads (", s.Hk, ", at least 1)");
  s.Hq = query.size(1);
  ADAKV_CHECK(s.D % 2 == 0, "adakv: paged_append_rotary_ rotates the two halves of a head "
              "vector, so the head dim must be even, got D = ", s.D);
  const auto check_angle_table = [&](const Tensor& t, const char* name) {
    check_tensor(t, name, 3, /*strided=*/true);
    check_same_device(k_pages, t, "k_pages", name);
    ADAKV_CHECK(t.scalar_type() == kFloat || t.scalar_type() == k_pages.scalar_type(), "adakv: ",
                name, " must be float32 or the K/V dtype ", k_pages.scalar_type(), ", got ",
                t.scalar_type());
    ADAKV_CHECK((t.size(0) == s.B || t.size(0) == 1) && t.size(1) == s.T && t.size(2) == s.D,
                "adakv: ", name, " must have shape [B, T, D] = [", s.B, ", ", s.T, ", ", s.D,
                "] (or [1, T, D]: one row for the whole batch), got ", shape_str(t));
  };
  check_angle_table(cos, "cos [B, T, D]");
  check_angle_table(sin, "sin [B, T, D]");
  check_same_dtype(cos, sin, "cos", "sin");
  ADAKV_CHECK(same_shape(cos, sin), "adakv: sin has shape ", shape_str(sin),
              " but cos has shape ", shape_str(cos));
  return s;
}

RotaryStrides rotary_strides(const Tensor& query, const Tensor& key_new, const Tensor& value_new,
                             const Tensor& cos, const Tensor& sin) {
  RotaryStrides st{};
  for (int d = 0; d < 3; ++d) {
    st.q[d] = query.stride(d);
    st.k[d] = key_new.stride(d);
    st.v[d] = value_new.stride(d);
  }
  st.cos[0] = cos.size(0) == 1 ? 0 : cos.stride(0);
  st.cos[1] = cos.stride(1);
  st.sin[0] = sin.size(0) == 1 ? 0 : sin.stride(0);
  st.sin[1] = sin.stride(1);
  return st;
}

DecodeShape validate_paged_decode(const Tensor& query, const Tensor& k_pages,
                                  const Tensor& v_pages, const Tensor& page_table,
                                  const Tensor& seg_len, const std::optional<Tensor>& segment_index,
                                  PagedShape& pool) {
  pool = validate_paged_pool(k_pages, v_pages, page_table, seg_len);
  return validate_query(paged_view(k_pages, page_table, pool, segment_index), query);
}

void check_paged_rows(const char* op, const int32_t* page_table, const PagedShape& p, int64_t s,
                      int64_t first, int64_t end) {
  if (end <= first) return;
  const int64_t slots = p.width * p.P;  // checked in validate_paged_pool
  ADAKV_CHECK(end <= slots, "adakv: ", op, ": segment ", s, " needs ", end, " rows (",
              (end + p.P - 1) / p.P, " pages of P = ", p.P, ") but page_table has only ",
              p.width, " entries per segment");
  for (int64_t i = first / p.P; i <= (end - 1) / p.P; ++i) {
    const int32_t id = page_table[s * p.width + i];
    ADAKV_CHECK(id >= 0 && id < p.num_pages, "adakv: ", op, ": page_table[", s, ", ", i,
                "] = ", id, " is outside [0, num_pages = ", p.num_pages, ")");
  }
}

void check_paged_unique(const char* op, const int32_t* page_table, const PagedShape& p,
                        const int64_t* len) {
  // owner[id] = 1 + the flat table entry that first used page id (0: unused)
  std::vector<int64_t> owner(static_cast<size_t>(p.num_pages), 0);
  for (int64_t s = 0; s < p.S; ++s) {
    const int64_t n_pages = (len[s] + p.P - 1) / p.P;
    for (int64_t i = 0; i < n_pages; ++i) {
      const int64_t e = s * p.width + i;
      const int32_t id = page_table[e];
      ADAKV_CHECK(owner[id] == 0, "adakv: ", op, ": page ", id, " is used twice in page_table (",
                  "page_table[", (owner[id] - 1) / p.width, ", ", (owner[id] - 1) % p.width,
                  "] and page_table[", s, ", ", i, "]); a page belongs to one segment slot");
      owner[id] = e + 1;
    }
  }
}

void check_segment_index_values(const char* op, const std::optional<Tensor>& segment_index,
                                int64_t table_rows, bool distinct) {
  if (!segment_index.has_value()) return;
  ADAKV_CHECK(segment_index->is_cpu(), "adakv: internal error: segment_index range check on ",
              device_str(*segment_index));
  const int32_t* index = ptr<int32_t>(*segment_index);
  const int64_t n = segment_index->numel();
  for (int64_t i = 0; i < n; ++i) {
    ADAKV_CHECK(index[i] >= -1 && index[i] < table_rows, "adakv: ", op, ": segment_index[", i,
                "] = ", index[i], " is outside [-1, ", table_rows,
                ") (-1: padding; page_table / seg_len have ", table_rows, " rows)");
  }
  if (!distinct) return;
  // first[r] = 1 + the position that first named table row r (0: not yet named)
  std::vector<int64_t> first(static_cast<size_t>(table_rows), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t r = index[i];
    if (r < 0) continue;
    ADAKV_CHECK(first[r] == 0, "adakv: ", op, ": segment_index[", i, "] = ", r,
                " repeats segment_index[", first[r] - 1, "]; the rows of an append must be "
                "distinct (-1 excepted)");
    first[r] = i + 1;
  }
}

ValueNormShape validate_value_norm(const Tensor& value, const Tensor& o_proj_weight,
                                   const std::optional<int64_t>& length) {
  check_kv(value, "value [B, Hk, N, D]", 4);
  check_kv(o_proj_weight, "o_proj_weight [hidden, Hq * D]", 2);
  check_same_device(value, o_proj_weight, "value", "o_proj_weight");
  check_same_dtype(value, o_proj_weight, "value", "o_proj_weight");
  ValueNormShape s;
  s.B = value.size(0);
  s.Hk = value.size(1);
  s.N = value.size(2);
  s.D = value.size(3);
  s.hidden = o_proj_weight.size(0);
  ADAKV_CHECK(s.Hk >= 1, "adakv: value must have at least one KV head (Hk >= 1), got shape ",
              shape_str(value));
  ADAKV_CHECK(s.D >= 1, "adakv: value must have a head dim D >= 1, got shape ",
              shape_str(value));
  const int64_t width = o_proj_weight.size(1);
  s.Hq = width / s.D;
  ADAKV_CHECK(width % s.D == 0 && s.Hq >= 1 && s.Hq % s.Hk == 0,
              "adakv: o_proj_weight must be [hidden, Hq * D] with D = ", s.D,
              " (value's head dim) and Hq a positive multiple of Hk = ", s.Hk, ", got shape ",
              shape_str(o_proj_weight));
  s.length = length.value_or(s.N);
  ADAKV_CHECK(s.length >= 0 && s.length <= s.N, "adakv: length must be in [0, N = ", s.N,
              "], got ", s.length);
  checked_mul(checked_mul(s.B, s.Hk, "B * Hk (value)"), s.length, "B * Hk * length");
  return s;
}

DecodeGemmShape validate_decode_gemm(const Tensor& x, const Tensor& weight,
                                     const std::optional<Tensor>& bias, int64_t split) {
  check_kv(x, "x [M, K]", 2);
  check_kv(weight, "weight [N, K]", 2);
  check_same_device(x, weight, "x", "weight");
  check_same_dtype(x, weight, "x", "weight");
  DecodeGemmShape s{x.size(0), weight.size(0), x.size(1)};
  ADAKV_CHECK(weight.size(1) == s.K, "adakv: weight must be [N, K] with K = ", s.K,
              " (x.size(1)), got shape ", shape_str(weight));
  ADAKV_CHECK(s.M <= 256, "adakv: decode_gemm takes at most 256 rows of x (a decode step), got "
              "x of shape ", shape_str(x), "; use torch.nn.functional.linear for more");
  if (bias.has_value()) {
    check_kv(*bias, "bias [N]", 1);
    check_same_device(x, *bias, "x", "bias");
    check_same_dtype(x, *bias, "x", "bias");
    ADAKV_CHECK(bias->size(0) == s.N, "adakv: bias must have shape [N] = [", s.N, "], got ",
                shape_str(*bias));
  }
  ADAKV_CHECK(split >= 0 && split <= 8, "adakv: split must be in [0, 8] (0: chosen by shape), "
              "got ", split);
  checked_mul(s.M, s.N, "M * N (the output of decode_gemm)");
  return s;
}

void check_key_start_range(const std::optional<Tensor>& key_start, int64_t N) {
  if (!key_start.has_value()) return;
  ADAKV_CHECK(key_start->is_cpu(), "adakv: internal error: key_start range check on ",
              device_str(*key_start));
  const int32_t* p = ptr<int32_t>(*key_start);
  for (int64_t b = 0; b < key_start->numel(); ++b) {
    ADAKV_CHECK(p[b] >= 0 && p[b] <= N, "adakv: key_start[", b, "] = ", p[b],
                " is outside [0, N = ", N, "]");
  }
}

}  // namespace adakv
