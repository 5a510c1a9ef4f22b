// Declarations of every adakv kernel, per backend. The schemas and the registration of these
// functions live in one place: csrc/bindings.cpp. Semantics: docs/semantics.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace adakv {

using OptTensor = c10::optional<at::Tensor>;
using FlatCache = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

#define ADAKV_DECLARE_BACKEND_OPS                                                              \
  at::Tensor score(const at::Tensor& q_window, const at::Tensor& key, int64_t kernel_size,     \
                   c10::string_view pooling, c10::string_view aggregate,                       \
                   c10::string_view gqa_reduce, const OptTensor& key_start,                    \
                   c10::optional<double> scale);                                               \
  at::Tensor allocate(const at::Tensor& scores, int64_t budget, double floor_alpha,            \
                      bool adaptive, c10::string_view rounding, const OptTensor& key_start);   \
  std::tuple<at::Tensor, at::Tensor> select(const at::Tensor& scores, const at::Tensor& budgets, \
                                            const OptTensor& key_start);                       \
  FlatCache compact(const at::Tensor& key, const at::Tensor& value, const at::Tensor& kept_idx, \
                    const at::Tensor& kept_count, const at::Tensor& budgets, int64_t window,   \
                    int64_t reserve, c10::optional<int64_t> rows, const OptTensor& key_start); \
  void append_(const at::Tensor& k_flat, const at::Tensor& v_flat, const at::Tensor& seg_start, \
               const at::Tensor& seg_len, const at::Tensor& key_new,                           \
               const at::Tensor& value_new, const OptTensor& overflow);                        \
  std::tuple<at::Tensor, at::Tensor> decode_attention_lse(                                      \
      const at::Tensor& query, const at::Tensor& k_flat, const at::Tensor& v_flat,             \
      const at::Tensor& seg_start, const at::Tensor& seg_len, c10::optional<double> scale);    \
  at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& k_flat,               \
                              const at::Tensor& v_flat, const at::Tensor& seg_start,           \
                              const at::Tensor& seg_len, c10::optional<double> scale);

namespace cpu {
ADAKV_DECLARE_BACKEND_OPS
}  // namespace cpu

namespace cuda {
ADAKV_DECLARE_BACKEND_OPS
}  // namespace cuda

#undef ADAKV_DECLARE_BACKEND_OPS

// Backend-independent composite: score -> allocate -> select -> compact through the
// dispatcher (so each stage runs on the inputs' device).
FlatCache evict(const at::Tensor& q_window, const at::Tensor& key, const at::Tensor& value,
                int64_t budget, double floor_alpha, c10::string_view pooling,
                int64_t kernel_size, c10::string_view gqa_reduce, bool adaptive,
                c10::string_view rounding, int64_t reserve, const OptTensor& key_start,
                c10::string_view aggregate, c10::optional<double> scale);

}  // namespace adakv
