// adakv::evict: score -> allocate -> select -> compact, the main entry point.
//
// One pipeline for every backend: `evict_pipeline` runs the four stages of one backend
// directly (not through the dispatcher, so a stage's error message reaches the caller on every
// torch the stable ABI supports). This file is compiled into both libraries: the CPU one
// defines cpu::evict, the CUDA one (ADAKV_CUDA_LIBRARY) cuda::evict. With rounding="exact"
// the flat cache has B * Hk * (C + W + reserve) rows whatever the data, so no stage needs a
// host sync and the output size is static.
#include <string>

#include "checks.h"
#include "ops.h"

namespace adakv {
namespace {

struct Stages {
  decltype(&cpu::score) score;
  decltype(&cpu::allocate) allocate;
  decltype(&cpu::select) select;
  decltype(&cpu::compact) compact;
};

FlatCache evict_pipeline(const Stages& stage, const Tensor& q_window, const Tensor& key,
                         const Tensor& value, int64_t budget, double floor_alpha,
                         std::string_view pooling, int64_t kernel_size,
                         std::string_view gqa_reduce, bool adaptive, std::string_view rounding,
                         int64_t reserve, const OptTensor& key_start, std::string_view aggregate,
                         std::optional<double> scale) {
  const ScoreShape s = validate_score(q_window, key, kernel_size, key_start);
  validate_key_value(key, value);
  validate_budget_args(budget, floor_alpha);
  const bool exact = parse_rounding(std::string(rounding)) == Rounding::kExact;
  // The static cache size, checked before any stage runs (SPEC section 9).
  std::optional<int64_t> rows;
  if (exact) rows = flat_cache_rows(s.B, s.Hk, budget, s.W, reserve);
  else validate_reserve(reserve);

  const Tensor scores =
      stage.score(q_window, key, kernel_size, pooling, aggregate, gqa_reduce, key_start, scale);
  const Tensor budgets = stage.allocate(scores, budget, floor_alpha, adaptive, rounding, key_start);
  auto [kept_idx, kept_count] = stage.select(scores, budgets, key_start);
  return stage.compact(key, value, kept_idx, kept_count, budgets, s.W, reserve, rows, key_start);
}

}  // namespace

#ifdef ADAKV_CUDA_LIBRARY
#define ADAKV_BACKEND cuda
#else
#define ADAKV_BACKEND cpu
#endif

FlatCache ADAKV_BACKEND::evict(const Tensor& q_window, const Tensor& key, const Tensor& value,
                               int64_t budget, double floor_alpha, std::string_view pooling,
                               int64_t kernel_size, std::string_view gqa_reduce, bool adaptive,
                               std::string_view rounding, int64_t reserve,
                               const OptTensor& key_start, std::string_view aggregate,
                               std::optional<double> scale) {
  const Stages stages{&ADAKV_BACKEND::score, &ADAKV_BACKEND::allocate, &ADAKV_BACKEND::select,
                      &ADAKV_BACKEND::compact};
  return evict_pipeline(stages, q_window, key, value, budget, floor_alpha, pooling, kernel_size,
                        gqa_reduce, adaptive, rounding, reserve, key_start, aggregate, scale);
}

}  // namespace adakv
