// CPU kernels of adakv::allocate and adakv::select (Ada-KV budget allocation and segmented
// top-k), the reference backend.
//
// allocate: per batch row, the global top Hk * C of the [Hk, L] scores under the total order
//   (score desc, head asc, token asc), per-head counts c_h, the safeguard
//   (1 - alpha) * c_h + alpha * C and exact (largest remainder) or official rounding.
//   Output budgets [B, Hk] int32. Parallel over batch rows.
// select: per segment (b, h), the top min(C_h, L_b) tokens under (score desc, token asc),
//   written in ascending token order into kept_idx [B, Hk, L] (rest -1), and kept_count.
//   Parallel over segments.
// Both use std::nth_element on 64-bit keys (score key << 32 | tie-break index), O(L) per row.

#include <algorithm>
#include <vector>

#include "allocation_rules.h"
#include "checks.h"
#include "ops.h"

namespace adakv {
namespace cpu {
namespace {

inline uint64_t order_key(float score, uint32_t tiebreak) {
  return (static_cast<uint64_t>(descending_key(score)) << 32) | tiebreak;
}

}  // namespace

Tensor allocate(const Tensor& scores, int64_t budget, double floor_alpha, bool adaptive,
                    std::string_view rounding, const OptTensor& key_start) {
  validate_scores(scores, key_start);
  validate_budget_args(budget, floor_alpha);
  const Rounding round = parse_rounding(std::string(rounding));
  const int64_t B = scores.size(0), Hk = scores.size(1), L = scores.size(2);
  ADAKV_CHECK(Hk * L < (int64_t{1} << 32), "adakv: Hk * L must be < 2^32");
  ADAKV_CHECK(budget <= std::numeric_limits<int32_t>::max() / std::max<int64_t>(Hk, 1),
              "adakv: budget * Hk must fit in int32, got budget ", budget);
  // key_start may exceed L (a row whose valid tokens all lie in the window).
  check_key_start_range(key_start, std::numeric_limits<int32_t>::max());
  Tensor out = new_empty("allocate", "the budgets", scores, {B, Hk}, kInt);
  const float* sc = ptr<float>(scores);
  const int32_t* ks = ptr<int32_t>(key_start);
  int32_t* o = ptr<int32_t>(out);
  const int64_t C = budget;
  torch::stable::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys;
    std::vector<int64_t> count(Hk);
    std::vector<double> x(Hk);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = ks ? std::min<int64_t>(ks[b], L) : 0;
      const int64_t Lb = L - start;
      int32_t* ob = o + b * Hk;
      if (Lb <= C || !adaptive) {
        std::fill(ob, ob + Hk, static_cast<int32_t>(C));
        continue;
      }
      keys.clear();
      for (int64_t h = 0; h < Hk; ++h) {
        const float* row = sc + (b * Hk + h) * L;
        for (int64_t n = start; n < L; ++n) keys.push_back(order_key(row[n], h * L + n));
      }
      const int64_t K = Hk * C;
      std::fill(count.begin(), count.end(), 0);
      if (K > 0) {
        std::nth_element(keys.begin(), keys.begin() + (K - 1), keys.end());
        for (int64_t i = 0; i < K; ++i) count[(keys[i] & 0xffffffffu) / L] += 1;
      }
      if (round == Rounding::kOfficial) {
        for (int64_t h = 0; h < Hk; ++h)
          ob[h] = static_cast<int32_t>(official_budget(count[h], C, floor_alpha));
        continue;
      }
      int64_t floors = 0;
      for (int64_t h = 0; h < Hk; ++h) {
        x[h] = safeguarded_budget(count[h], C, floor_alpha);
        const double f = std::floor(x[h]);
        ob[h] = static_cast<int32_t>(f);
        floors += static_cast<int64_t>(f);
        x[h] -= f;  // fractional part
      }
      // Largest remainder: R units to the heads with the largest fractional parts, ties to the
      // lower head index. R is in [0, Hk] whatever the rounding of the fractions.
      int64_t R = std::clamp<int64_t>(K - floors, 0, Hk);
      for (; R > 0; --R) {
        int64_t best = -1;
        for (int64_t h = 0; h < Hk; ++h) {
          if (x[h] < 0) continue;  // already got its unit
          if (best < 0 || x[h] > x[best]) best = h;
        }
        ob[best] += 1;
        x[best] = -1.0;
      }
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> select(const Tensor& scores, const Tensor& budgets,
                                          const OptTensor& key_start) {
  validate_scores(scores, key_start);
  validate_budgets(budgets, scores);
  const int64_t B = scores.size(0), Hk = scores.size(1), L = scores.size(2);
  // key_start may exceed L (a row whose valid tokens all lie in the window).
  check_key_start_range(key_start, std::numeric_limits<int32_t>::max());
  const int32_t* bud = ptr<int32_t>(budgets);
  for (int64_t s = 0; s < B * Hk; ++s)
    ADAKV_CHECK(bud[s] >= 0, "adakv: budgets must be >= 0, got budgets[", s / Hk, ", ", s % Hk,
                "] = ", bud[s]);
  Tensor kept_idx = new_empty("select", "kept_idx", scores, {B, Hk, L}, kInt);
  Tensor kept_count = new_empty("select", "kept_count", scores, {B, Hk}, kInt);
  const float* sc = ptr<float>(scores);
  const int32_t* ks = ptr<int32_t>(key_start);
  int32_t* idx = ptr<int32_t>(kept_idx);
  int32_t* cnt = ptr<int32_t>(kept_count);
  torch::stable::parallel_for(0, B * Hk, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys;
    for (int64_t s = begin; s < end; ++s) {
      const int64_t start = ks ? std::min<int64_t>(ks[s / Hk], L) : 0;
      const int64_t Lb = std::max<int64_t>(0, L - start);
      const int64_t k = std::min<int64_t>(bud[s], Lb);
      const float* row = sc + s * L;
      int32_t* out = idx + s * L;
      keys.clear();
      for (int64_t n = start; n < L; ++n) keys.push_back(order_key(row[n], n));
      if (k > 0 && k < Lb) std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end());
      for (int64_t i = 0; i < k; ++i) out[i] = static_cast<int32_t>(keys[i] & 0xffffffffu);
      std::sort(out, out + k);
      std::fill(out + k, out + L, -1);
      cnt[s] = static_cast<int32_t>(k);
    }
  });
  return {kept_idx, kept_count};
}

}  // namespace cpu
}  // namespace adakv
