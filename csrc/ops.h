// Declarations of every adakv kernel, per backend. The schemas and the registration of these
// functions live in one place: csrc/bindings.cpp. Semantics: docs/semantics.md.
#pragma once

#include <string_view>
#include <tuple>

#include "torch_api.h"

namespace adakv {

using FlatCache = std::tuple<Tensor, Tensor, Tensor, Tensor>;

#define ADAKV_DECLARE_BACKEND_OPS                                                              \
  Tensor score(const Tensor& q_window, const Tensor& key, int64_t kernel_size,     \
                   std::string_view pooling, std::string_view aggregate,                       \
                   std::string_view gqa_reduce, const OptTensor& key_start,                    \
                   std::optional<double> scale);                                               \
  Tensor allocate(const Tensor& scores, int64_t budget, double floor_alpha,            \
                      bool adaptive, std::string_view rounding, const OptTensor& key_start);   \
  std::tuple<Tensor, Tensor> select(const Tensor& scores, const Tensor& budgets, \
                                            const OptTensor& key_start);                       \
  FlatCache compact(const Tensor& key, const Tensor& value, const Tensor& kept_idx, \
                    const Tensor& kept_count, const Tensor& budgets, int64_t window,   \
                    int64_t reserve, std::optional<int64_t> rows, const OptTensor& key_start); \
  void append_(const Tensor& k_flat, const Tensor& v_flat, const Tensor& seg_start, \
               const Tensor& seg_len, const Tensor& key_new,                           \
               const Tensor& value_new, const OptTensor& overflow);                        \
  std::tuple<Tensor, Tensor> decode_attention_lse(                                      \
      const Tensor& query, const Tensor& k_flat, const Tensor& v_flat,             \
      const Tensor& seg_start, const Tensor& seg_len, std::optional<double> scale);    \
  Tensor decode_attention(const Tensor& query, const Tensor& k_flat,               \
                              const Tensor& v_flat, const Tensor& seg_start,           \
                              const Tensor& seg_len, std::optional<double> scale);    \
  /* score -> allocate -> select -> compact of this backend (evict.cpp) */                     \
  FlatCache evict(const Tensor& q_window, const Tensor& key, const Tensor& value,              \
                  int64_t budget, double floor_alpha, std::string_view pooling,                \
                  int64_t kernel_size, std::string_view gqa_reduce, bool adaptive,             \
                  std::string_view rounding, int64_t reserve, const OptTensor& key_start,      \
                  std::string_view aggregate, std::optional<double> scale);                   \
  /* paged per-head storage (SPEC 3.1) */                                                      \
  void paged_compact_(const Tensor& k_pages, const Tensor& v_pages, const Tensor& page_table,  \
                      const Tensor& seg_len, const Tensor& key, const Tensor& value,           \
                      const Tensor& kept_idx, const Tensor& kept_count, int64_t window,        \
                      const OptTensor& key_start);                                             \
  void paged_append_(const Tensor& k_pages, const Tensor& v_pages, const Tensor& page_table,   \
                     const Tensor& seg_len, const Tensor& key_new, const Tensor& value_new,    \
                     const OptTensor& overflow, const OptTensor& segment_index);               \
  /* paged_append_ of RoPE-rotated keys; returns the rotated query [B, Hq, T, D] */             \
  Tensor paged_append_rotary_(const Tensor& k_pages, const Tensor& v_pages,                    \
                              const Tensor& page_table, const Tensor& seg_len,                 \
                              const Tensor& query, const Tensor& key_new,                      \
                              const Tensor& value_new, const Tensor& cos, const Tensor& sin,   \
                              const OptTensor& overflow, const OptTensor& segment_index);      \
  std::tuple<Tensor, Tensor> paged_decode_attention_lse(                                       \
      const Tensor& query, const Tensor& k_pages, const Tensor& v_pages,                       \
      const Tensor& page_table, const Tensor& seg_len, std::optional<double> scale,            \
      const OptTensor& segment_index);                                                         \
  Tensor paged_decode_attention(const Tensor& query, const Tensor& k_pages,                    \
                                const Tensor& v_pages, const Tensor& page_table,               \
                                const Tensor& seg_len, std::optional<double> scale,            \
                                const OptTensor& segment_index);                               \
  /* the building blocks of the authors' follow-up methods (SPEC 7.1, 7.2): cpu/followups.cpp, */ \
  /* cuda/score.cu (defensive_score, with the score kernel family) and cuda/value_norm.cu.    */ \
  /* defensive_score returns (scores, snap_mean, window_mass).                                */ \
  std::tuple<Tensor, Tensor, Tensor> defensive_score(const Tensor& q_window, const Tensor& key,  \
                                                     int64_t kernel_size,                        \
                                                     const OptTensor& key_start,                 \
                                                     std::optional<double> scale);               \
  Tensor value_norm(const Tensor& value, const Tensor& o_proj_weight, bool normalize,          \
                    std::optional<int64_t> length);                                         \
  /* the GEMM of a decode step's projections: y = x weight^T + bias, x at most 256 rows */     \
  Tensor decode_gemm(const Tensor& x, const Tensor& weight, const OptTensor& bias,             \
                     int64_t split);

namespace cpu {
ADAKV_DECLARE_BACKEND_OPS
}  // namespace cpu

namespace cuda {
ADAKV_DECLARE_BACKEND_OPS
}  // namespace cuda

#undef ADAKV_DECLARE_BACKEND_OPS

}  // namespace adakv
