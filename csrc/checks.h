// Argument validation shared by the CPU and CUDA kernels of every adakv op.
//
// Each validate_* function checks ranks, dtypes, devices, contiguity, matching sizes and
// option strings (everything that needs no device data) and returns the problem sizes.
// Data-dependent checks (key_start range, capacities) live in the CPU kernels only: on CUDA
// they would need a host sync, so CUDA kernels clamp instead (docs/semantics.md).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <string>

namespace adakv {

enum class Pooling { kNone, kMax, kAvg };
enum class Reduce { kMean, kMax };
enum class Rounding { kExact, kOfficial };

Pooling parse_pooling(const std::string& s);
Reduce parse_reduce(const std::string& s, const char* what);
Rounding parse_rounding(const std::string& s);

struct ScoreShape { int64_t B, Hq, Hk, W, N, D, L; };
struct DecodeShape { int64_t B, Hq, Hk, T, D, rows, S; };

ScoreShape validate_score(const at::Tensor& q_window, const at::Tensor& key,
                          int64_t kernel_size, const c10::optional<at::Tensor>& key_start);
void validate_key_value(const at::Tensor& key, const at::Tensor& value);
// scores [B, Hk, L] fp32; returns {B, Hk, L} via out-params.
void validate_scores(const at::Tensor& scores, const c10::optional<at::Tensor>& key_start);
// budget >= 0 and 0 <= floor_alpha <= 1 (allocate on every backend).
void validate_budget_args(int64_t budget, double floor_alpha);
void validate_budgets(const at::Tensor& budgets, const at::Tensor& scores);
void validate_compact(const at::Tensor& key, const at::Tensor& value, const at::Tensor& kept_idx,
                      const at::Tensor& kept_count, const at::Tensor& budgets, int64_t window,
                      int64_t reserve, const c10::optional<int64_t>& rows,
                      const c10::optional<at::Tensor>& key_start);
void validate_flat_cache(const at::Tensor& k_flat, const at::Tensor& v_flat,
                         const at::Tensor& seg_start, const at::Tensor& seg_len);
DecodeShape validate_append(const at::Tensor& k_flat, const at::Tensor& v_flat,
                            const at::Tensor& seg_start, const at::Tensor& seg_len,
                            const at::Tensor& key_new, const at::Tensor& value_new,
                            const c10::optional<at::Tensor>& overflow);
DecodeShape validate_decode(const at::Tensor& query, const at::Tensor& k_flat,
                            const at::Tensor& v_flat, const at::Tensor& seg_start,
                            const at::Tensor& seg_len);

// Data-dependent: key_start values in [0, N] (CPU only).
void check_key_start_range(const c10::optional<at::Tensor>& key_start, int64_t N);

}  // namespace adakv
