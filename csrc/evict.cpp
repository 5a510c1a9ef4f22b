// adakv::evict: score -> allocate -> select -> compact, the main entry point.
//
// Backend independent: each stage is called through the dispatcher and runs on the inputs'
// device. With rounding="exact" the flat cache has B * Hk * (C + W + reserve) rows whatever
// the data, so no stage needs a host sync and the output size is static.
#include <ATen/core/dispatch/Dispatcher.h>

#include "checks.h"
#include "ops.h"

namespace adakv {
namespace {

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

}  // namespace

FlatCache evict(const at::Tensor& q_window, const at::Tensor& key, const at::Tensor& value,
                int64_t budget, double floor_alpha, c10::string_view pooling,
                int64_t kernel_size, c10::string_view gqa_reduce, bool adaptive,
                c10::string_view rounding, int64_t reserve, const OptTensor& key_start,
                c10::string_view aggregate, c10::optional<double> scale) {
  const ScoreShape s = validate_score(q_window, key, kernel_size, key_start);
  validate_key_value(key, value);
  TORCH_CHECK(budget >= 0, "adakv: budget must be >= 0, got ", budget);
  TORCH_CHECK(reserve >= 0, "adakv: reserve must be >= 0, got ", reserve);
  const bool exact = parse_rounding(std::string(rounding)) == Rounding::kExact;

  static auto score_op = op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                                       c10::string_view, c10::string_view, c10::string_view,
                                       const OptTensor&, c10::optional<double>)>("adakv::score");
  static auto allocate_op = op<at::Tensor(const at::Tensor&, int64_t, double, bool,
                                          c10::string_view, const OptTensor&)>("adakv::allocate");
  static auto select_op = op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const OptTensor&)>("adakv::select");
  static auto compact_op = op<FlatCache(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                        c10::optional<int64_t>, const OptTensor&)>(
      "adakv::compact");

  const at::Tensor scores = score_op.call(q_window, key, kernel_size, pooling, aggregate,
                                          gqa_reduce, key_start, scale);
  const at::Tensor budgets =
      allocate_op.call(scores, budget, floor_alpha, adaptive, rounding, key_start);
  auto [kept_idx, kept_count] = select_op.call(scores, budgets, key_start);
  c10::optional<int64_t> rows;
  if (exact) rows = s.B * s.Hk * (budget + s.W + reserve);
  return compact_op.call(key, value, kept_idx, kept_count, budgets, s.W, reserve, rows,
                         key_start);
}

}  // namespace adakv
