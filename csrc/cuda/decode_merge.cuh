// Log-sum-exp merge of the split partials of decode_kernel.cuh (both K/V layouts: the
// partials do not depend on it), merge math from softmax_state.cuh.
//
// One warp per query row (n_rows = S * G * T), 4 rows per 128-thread CTA; lane owns dims
// lane * 4 + 128 i (16-byte fp32 loads). out = sum_i w_i o_i / sum_i w_i with
// w_i = 2^(lse_i - max_i lse_i) (partials are normalised, lse_i base 2, -inf when empty);
// lse = (max + log2(sum w)) * ln 2. A row whose every partial is empty gets out 0, lse -inf.
// A NaN partial (lse_i and o_i NaN: a NaN logit) is left out of the max by fmaxf but not of
// the sum (w_i = NaN), so the row's out and lse are NaN (SPEC section 9), even when every other
// partial is empty (the max is then -inf and the weights use 0 in its place).
#pragma once

#include <cstdint>

#include "cuda/decode_kernel.cuh"  // pack2
#include "cuda/softmax_state.cuh"

namespace adakv {
namespace cuda {
namespace decode {

constexpr int kMergeThreads = 128;
constexpr int kMergeRowsPerCta = kMergeThreads / 32;

// Stores 4 consecutive values (fp32: 16 B, 16-bit: 8 B).
template <typename T>
__device__ __forceinline__ void store4(T* dst, float4 a) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float4*>(dst) = a;
  } else {
    *reinterpret_cast<uint2*>(dst) = make_uint2(pack2<T>(a.x, a.y), pack2<T>(a.z, a.w));
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kMergeThreads) decode_merge_kernel(const MergeParams p) {
  static_assert(D % 4 == 0, "head dim must be a multiple of 4");
  constexpr int kIters = (D + 127) / 128;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeRowsPerCta + (threadIdx.x >> 5);
  if (row >= p.n_rows) return;  // bounds: grid rounds n_rows up to whole CTAs

  // Each partial is the state (part_lse, 1, part_o) (softmax_state.cuh).
  float4 acc[kIters];
#pragma unroll
  for (int it = 0; it < kIters; ++it) acc[it] = make_float4(0.f, 0.f, 0.f, 0.f);
  const float2 ML = merge_states(
      p.num_splits, [&](int sp) { return p.part_lse[sp * p.n_rows + row]; },
      [](int) { return 1.f; },
      [&](int sp, float w) {  // w: 0 for an empty partial, NaN for a NaN one
        const int64_t prow = sp * p.n_rows + row;
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
          const int d = lane * 4 + it * 128;
          if (D % 128 == 0 || d < D) {
            const float4 x = *reinterpret_cast<const float4*>(p.part_o + prow * D + d);
            acc[it].x += w * x.x;
            acc[it].y += w * x.y;
            acc[it].z += w * x.z;
            acc[it].w += w * x.w;
          }
        }
      });
  const float M = ML.x, sum = ML.y;
  const float inv = inv_or_zero(sum);
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int d = lane * 4 + it * 128;
    if (D % 128 == 0 || d < D) {
      store4<T>(static_cast<T*>(p.out) + row * D + d,
                make_float4(acc[it].x * inv, acc[it].y * inv, acc[it].z * inv, acc[it].w * inv));
    }
  }
  if (lane == 0 && p.lse != nullptr) p.lse[row] = state_lse2(M, sum) * kLn2;
}

}  // namespace decode
}  // namespace cuda
}  // namespace adakv
