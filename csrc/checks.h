// Argument validation shared by the CPU and CUDA kernels of every adakv op.
//
// Each validate_* function checks ranks, dtypes, devices, contiguity, matching sizes and
// option strings (everything that needs no device data) and returns the problem sizes.
// Data-dependent checks (key_start range, capacities) live in the CPU kernels only: on CUDA
// they would need a host sync, so CUDA kernels clamp instead (docs/semantics.md).
#pragma once


#include <string>

#include "torch_api.h"

namespace adakv {

enum class Pooling { kNone, kMax, kAvg };
enum class Reduce { kMean, kMax };
enum class Rounding { kExact, kOfficial };

Pooling parse_pooling(const std::string& s);
Reduce parse_reduce(const std::string& s, const char* what);
Rounding parse_rounding(const std::string& s);

struct ScoreShape { int64_t B, Hq, Hk, W, N, D, L; };
struct DecodeShape { int64_t B, Hq, Hk, T, D, rows, S; };

ScoreShape validate_score(const Tensor& q_window, const Tensor& key,
                          int64_t kernel_size, const std::optional<Tensor>& key_start);
// value matches key (dtype, device, shape); contiguous, or with `strided` any strides whose
// last one is 1.
void validate_key_value(const Tensor& key, const Tensor& value, bool strided = false);
// scores [B, Hk, L] fp32; returns {B, Hk, L} via out-params.
void validate_scores(const Tensor& scores, const std::optional<Tensor>& key_start);
// budget >= 0 and 0 <= floor_alpha <= 1 (allocate on every backend).
void validate_budget_args(int64_t budget, double floor_alpha);
void validate_budgets(const Tensor& budgets, const Tensor& scores);
void validate_compact(const Tensor& key, const Tensor& value, const Tensor& kept_idx,
                      const Tensor& kept_count, const Tensor& budgets, int64_t window,
                      int64_t reserve, const std::optional<int64_t>& rows,
                      const std::optional<Tensor>& key_start);
void validate_flat_cache(const Tensor& k_flat, const Tensor& v_flat,
                         const Tensor& seg_start, const Tensor& seg_len);
DecodeShape validate_append(const Tensor& k_flat, const Tensor& v_flat,
                            const Tensor& seg_start, const Tensor& seg_len,
                            const Tensor& key_new, const Tensor& value_new,
                            const std::optional<Tensor>& overflow);
DecodeShape validate_decode(const Tensor& query, const Tensor& k_flat,
                            const Tensor& v_flat, const Tensor& seg_start,
                            const Tensor& seg_len);

// reserve in [0, 2^31) (every op that takes one).
void validate_reserve(int64_t reserve);
// Rows of the flat cache with exact rounding, B * Hk * (budget + window + reserve), checked
// for overflow and against the int32 row index; the error names the arguments.
int64_t flat_cache_rows(int64_t B, int64_t Hk, int64_t budget, int64_t window, int64_t reserve);

// ---- paged per-head storage (SPEC 3.1, docs/semantics.md "Paged storage")
// Pool k_pages / v_pages [num_pages, P, D], page_table [S, width] int32, seg_len [S] int32.
struct PagedShape { int64_t num_pages, P, D, S, width; };

// Shapes, dtypes, devices and contiguity of the pool and its metadata (no device data read).
PagedShape validate_paged_pool(const Tensor& k_pages, const Tensor& v_pages,
                               const Tensor& page_table, const Tensor& seg_len);
// paged_compact_: the pool, plus compact's checks of key/value/kept_idx/kept_count/window/
// key_start (no budgets); S = B * Hk. Returns the pool shape.
PagedShape validate_paged_compact(const Tensor& k_pages, const Tensor& v_pages,
                                  const Tensor& page_table, const Tensor& seg_len,
                                  const Tensor& key, const Tensor& value, const Tensor& kept_idx,
                                  const Tensor& kept_count, int64_t window,
                                  const std::optional<Tensor>& key_start);
// The batch segments of paged_append_ / paged_decode_attention(_lse) are the S = B * Hk
// segments of key_new / query; segment i uses table row i, or with segment_index ([S] int32,
// contiguous, on page_table's device) row segment_index[i] (-1: padding) of a table with any
// number of rows pool.S. DecodeShape::S is the batch segment count, `pool` the table's shape.
//
// paged_append_: key_new/value_new [B, Hk, T, D], T >= 1, B * Hk == S (page_table rows, or the
// length of segment_index), overflow [B * Hk] int32 (indexed by batch segment).
DecodeShape validate_paged_append(const Tensor& k_pages, const Tensor& v_pages,
                                  const Tensor& page_table, const Tensor& seg_len,
                                  const Tensor& key_new, const Tensor& value_new,
                                  const std::optional<Tensor>& overflow,
                                  const std::optional<Tensor>& segment_index, PagedShape& pool);
// paged_append_rotary_: paged_append_'s checks, with key_new / value_new of any strides whose
// last one is 1; plus query [B, Hq, T, D] (the same strides rule, key_new's dtype, B, T and D,
// Hq a multiple of Hk >= 1), D even, cos / sin [B or 1, T, D] of one dtype (float32 or the
// K/V dtype), same shape, the same strides rule. DecodeShape::Hq is query's head count.
DecodeShape validate_paged_append_rotary(const Tensor& k_pages, const Tensor& v_pages,
                                         const Tensor& page_table, const Tensor& seg_len,
                                         const Tensor& query, const Tensor& key_new,
                                         const Tensor& value_new, const Tensor& cos,
                                         const Tensor& sin, const std::optional<Tensor>& overflow,
                                         const std::optional<Tensor>& segment_index,
                                         PagedShape& pool);
// The element strides paged_append_rotary_'s kernels read its inputs with (the last stride of
// each is 1): query / key_new / value_new by (batch, head, token), cos / sin by (batch, token),
// the batch stride 0 for a one-row table [1, T, D].
struct RotaryStrides {
  int64_t q[3], k[3], v[3], cos[2], sin[2];
};
RotaryStrides rotary_strides(const Tensor& query, const Tensor& key_new, const Tensor& value_new,
                             const Tensor& cos, const Tensor& sin);
// paged_decode_attention(_lse): query [B, Hq, T, D], S % B == 0, Hq % (S / B) == 0, T >= 1
// (S: page_table rows, or the length of segment_index). DecodeShape::rows is num_pages * P
// (the slots of the pool).
DecodeShape validate_paged_decode(const Tensor& query, const Tensor& k_pages,
                                  const Tensor& v_pages, const Tensor& page_table,
                                  const Tensor& seg_len, const std::optional<Tensor>& segment_index,
                                  PagedShape& pool);

// Data-dependent (CPU only; host pointers): rows [first, end) of segment s must lie in its page
// table (end <= width * P) and every page holding one of them must be in [0, num_pages). The
// error names `op`, the segment and the entry. first < end, first >= 0.
void check_paged_rows(const char* op, const int32_t* page_table, const PagedShape& p, int64_t s,
                      int64_t first, int64_t end);
// Data-dependent (CPU only): no page id appears twice among the pages holding rows
// [0, len[s]) of all segments (two segments sharing a page, or one page listed twice).
// Call after check_paged_rows has validated every id.
void check_paged_unique(const char* op, const int32_t* page_table, const PagedShape& p,
                        const int64_t* len);

// Data-dependent (CPU only): every segment_index value lies in [-1, table_rows) (-1: a padding
// segment) and, with `distinct` (paged_append_), no row >= 0 appears twice. The error names `op`,
// the position and the value. Nothing without a segment_index.
void check_segment_index_values(const char* op, const std::optional<Tensor>& segment_index,
                                int64_t table_rows, bool distinct);

// ---- the follow-up methods' building blocks (SPEC 7.1, 7.2; docs/semantics.md)
// defensive_score validates with validate_score (same arguments as score).
//
// value_norm: value [B, Hk, N, D] (Hk >= 1, D >= 1), o_proj_weight [hidden, Hq * D] of value's
// dtype and device with Hq a positive multiple of Hk, length in [0, N] (default N);
// B * Hk * length checked for overflow.
struct ValueNormShape { int64_t B, Hk, N, D, Hq, hidden, length; };
ValueNormShape validate_value_norm(const Tensor& value, const Tensor& o_proj_weight,
                                   const std::optional<int64_t>& length);

// ---- decode_gemm: x [M, K] and weight [N, K] of one dtype (fp32 / fp16 / bf16) and device,
// contiguous, 0 <= M <= 256 (kDecodeGemmMaxRows), bias [N] or none (same dtype and device),
// split in [0, 8] (0: the heuristic's choice).
struct DecodeGemmShape { int64_t M, N, K; };
DecodeGemmShape validate_decode_gemm(const Tensor& x, const Tensor& weight,
                                     const std::optional<Tensor>& bias, int64_t split);

// Data-dependent: key_start values in [0, N] (CPU only).
void check_key_start_range(const std::optional<Tensor>& key_start, int64_t N);

}  // namespace adakv
