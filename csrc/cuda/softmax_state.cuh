// Online softmax in the log2 domain, shared by the decode kernels (decode_kernel.cuh: per-warp
// online update and the cross-warp / cluster merges; decode_merge.cuh: the merge of the split
// partials). Device-only helpers, no shapes of their own: a state is (m, l, o) per query row
// with m the running max of the base-2 logits (-inf: nothing seen), l the sum of 2^(x - m) and
// o the (un)normalised weighted sum of values; a normalised partial with base-2 lse is the
// state (lse, 1, o / l).
//
// Rules (SPEC section 9), the same everywhere:
//   * -inf logits weigh 0 even while the max is still -inf: the reference max is 0 then
//     (softmax_ref), so exp2(-inf - 0) = 0 instead of exp2(-inf + inf) = NaN;
//   * m is never NaN (fmaxf drops a NaN), a NaN logit shows in l (and o) as NaN, and every
//     merge keeps it NaN (0 * NaN = NaN): out and lse NaN, never "empty";
//   * l == 0 exactly when no key was visible: out 0, lse -inf.
// score_kernel.cuh keeps its own merge_stat on purpose: it uses the fast ex2.approx and skips
// empty pairs, so moving it here would change its results.
#pragma once

#include <cstdint>

namespace adakv {
namespace cuda {
namespace decode {

constexpr float kLn2 = 0.693147180559945309f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000u); }

// The max the exponentials are taken against: m itself, 0 when nothing was seen (m = -inf).
__device__ __forceinline__ float softmax_ref(float m) { return m == neg_inf() ? 0.f : m; }

// Online update of a running max m by the max x of new logits: m becomes max(m, x), ref gets
// the reference max the new logits are exponentiated against, and the return value is the
// factor 2^(m_old - ref) by which the old l and o are rescaled.
__device__ __forceinline__ float softmax_rescale(float& m, float x, float& ref) {
  const float mn = fmaxf(m, x);
  ref = softmax_ref(mn);
  const float c = exp2f(m - ref);
  m = mn;
  return c;
}

// 1 / l, or 0 for an empty state (l == 0): out 0.
__device__ __forceinline__ float inv_or_zero(float l) { return l == 0.f ? 0.f : 1.f / l; }

// Base-2 log-sum-exp of a state, -inf when empty, NaN for a NaN state.
__device__ __forceinline__ float state_lse2(float m, float l) {
  return l == 0.f ? neg_inf() : m + log2f(l);
}

// Log-sum-exp merge of n states i = (m_of(i), l_of(i), o_i): returns (M, L) of the merged state
// and calls accumulate(i, w_i) with the weight w_i = 2^(m_i - softmax_ref(M)) of each state,
// which adds w_i * o_i to the caller's accumulator (merged o = sum w_i o_i, unnormalised).
// Two passes (max, then weights); fully unrolled when n is a compile-time constant.
template <typename MOf, typename LOf, typename Acc>
__device__ __forceinline__ float2 merge_states(int n, MOf m_of, LOf l_of, Acc accumulate) {
  float M = neg_inf();
#pragma unroll
  for (int i = 0; i < n; ++i) M = fmaxf(M, m_of(i));
  const float Mu = softmax_ref(M);
  float L = 0.f;
#pragma unroll
  for (int i = 0; i < n; ++i) {
    const float w = exp2f(m_of(i) - Mu);  // 0 for an empty state (-inf), NaN for a NaN one
    L += w * l_of(i);
    accumulate(i, w);
  }
  return make_float2(M, L);
}

}  // namespace decode
}  // namespace cuda
}  // namespace adakv
