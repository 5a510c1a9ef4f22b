// Log-sum-exp merge of the partials of the decode kernel family (both K/V layouts: the partials
// do not depend on it), merge math from softmax_state.cuh: the split partials of
// decode_kernel.cuh (decode_merge_kernel) and the pieces of the work-balanced kernel of
// decode_balanced.cuh (decode_balanced_merge_kernel: its segments may have many pieces, merged
// lane-parallel).
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

#include "cuda/decode_balanced.cuh"  // balanced_warp_of
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

// Merges the n normalised partials of one query row (lse_of(i): base-2 lse, -inf for an empty
// one; o_of(i): its fp32 row of D values, or nullptr for a partial that was never written,
// which must then have lse -inf) into out (the query dtype) and *lse (natural log; lse may be
// null). One warp per row; lane owns dims lane * 4 + 128 i.
template <typename T, int D, typename LseOf, typename OOf>
__device__ __forceinline__ void merge_partial_row(int n, LseOf lse_of, OOf o_of, T* out,
                                                  float* lse) {
  static_assert(D % 4 == 0, "head dim must be a multiple of 4");
  constexpr int kIters = (D + 127) / 128;
  const int lane = threadIdx.x & 31;
  // Each partial is the state (lse, 1, o) (softmax_state.cuh).
  float4 acc[kIters];
#pragma unroll
  for (int it = 0; it < kIters; ++it) acc[it] = make_float4(0.f, 0.f, 0.f, 0.f);
  const float2 ML = merge_states(
      n, lse_of, [](int) { return 1.f; },
      [&](int i, float w) {  // w: 0 for an empty partial, NaN for a NaN one
        const float* o = o_of(i);
        if (o == nullptr) return;  // never written: lse -inf, weight 0
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
          const int d = lane * 4 + it * 128;
          if (D % 128 == 0 || d < D) {
            const float4 x = *reinterpret_cast<const float4*>(o + d);
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
      store4<T>(out + d,
                make_float4(acc[it].x * inv, acc[it].y * inv, acc[it].z * inv, acc[it].w * inv));
    }
  }
  if (lane == 0 && lse != nullptr) *lse = state_lse2(M, sum) * kLn2;
}

template <typename T, int D>
__global__ void __launch_bounds__(kMergeThreads) decode_merge_kernel(const MergeParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeRowsPerCta + (threadIdx.x >> 5);
  if (row >= p.n_rows) return;  // bounds: grid rounds n_rows up to whole CTAs
  merge_partial_row<T, D>(
      p.num_splits, [&](int sp) { return p.part_lse[sp * p.n_rows + row]; },
      [&](int sp) -> const float* { return p.part_o + (sp * p.n_rows + row) * D; },
      static_cast<T*>(p.out) + row * D, p.lse != nullptr ? p.lse + row : nullptr);
}

// The merge of the work-balanced kernel (decode_balanced.cuh): query row (s, r) of segment s
// merges the pieces of the warps u in [warp_of(P_s), warp_of(P_{s+1} - 1)] that hold tiles
// (slot s + u of part_o [slots][GT][D] / part_lse [slots][GT]); a warp in that range with an
// empty tile range (fewer tiles than warps) wrote nothing and is skipped. An empty segment
// (P_s == P_{s+1}) gets out 0, lse -inf. Launched with programmatic dependent launch: waits for
// the balanced kernel (and its prefix P in tile_prefix) before reading.
template <typename T, int D>
__global__ void __launch_bounds__(kMergeThreads) decode_balanced_merge_kernel(const MergeParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeRowsPerCta + (threadIdx.x >> 5);
  if (row >= p.n_rows) return;  // bounds: grid rounds n_rows up to whole CTAs
  const int64_t s = row / p.GT, r = row % p.GT;
  const int64_t total = p.tile_prefix[p.S], lo = p.tile_prefix[s], hi = p.tile_prefix[s + 1];
  const int64_t W = p.total_warps;
  int64_t u0 = 0, n = 0;
  if (hi > lo) {
    u0 = balanced_warp_of(lo, total, W);
    n = balanced_warp_of(hi - 1, total, W) - u0 + 1;
  }
  auto written = [&](int64_t u) { return u * total / W < (u + 1) * total / W; };
  // Pieces in parallel over the lanes (a segment may have many: up to one per warp): lane l
  // takes pieces l, l + 32, ...; the max and the weight sum are warp reductions, then every
  // lane adds each piece's o (its dims) with the piece's weight shuffled from its lane. The
  // rules of merge_states (softmax_state.cuh): M = fmaxf over the lse (a NaN is dropped from the
  // max but its weight exp2(NaN) = NaN keeps the row NaN), weights against softmax_ref(M).
  constexpr int kIters = (D + 127) / 128;
  const int lane = threadIdx.x & 31;
  float M = neg_inf();
  for (int64_t i = lane; i < n; i += 32) {
    const int64_t u = u0 + i;
    if (written(u)) M = fmaxf(M, p.part_lse[(s + u) * p.GT + r]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
  const float Mu = softmax_ref(M);
  float L = 0.f;
  float4 acc[kIters];
#pragma unroll
  for (int it = 0; it < kIters; ++it) acc[it] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int64_t base = 0; base < n; base += 32) {
    const int64_t i = base + lane;
    const bool mine = i < n && written(u0 + i);
    const float w = mine ? exp2f(p.part_lse[(s + u0 + i) * p.GT + r] - Mu) : 0.f;
    L += w;
    const int cnt = static_cast<int>(n - base < 32 ? n - base : 32);
    for (int j = 0; j < cnt; ++j) {
      const float wj = __shfl_sync(0xffffffffu, w, j);
      const int64_t u = u0 + base + j;
      if (!written(u)) continue;  // never written: weight 0, nothing read
      const float* o = p.part_o + ((s + u) * p.GT + r) * D;
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int d = lane * 4 + it * 128;
        if (D % 128 == 0 || d < D) {
          const float4 x = *reinterpret_cast<const float4*>(o + d);
          acc[it].x += wj * x.x;
          acc[it].y += wj * x.y;
          acc[it].z += wj * x.z;
          acc[it].w += wj * x.w;
        }
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) L += __shfl_xor_sync(0xffffffffu, L, o);
  const float inv = inv_or_zero(L);
  T* out = static_cast<T*>(p.out) + row * D;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int d = lane * 4 + it * 128;
    if (D % 128 == 0 || d < D) {
      store4<T>(out + d,
                make_float4(acc[it].x * inv, acc[it].y * inv, acc[it].z * inv, acc[it].w * inv));
    }
  }
  if (lane == 0 && p.lse != nullptr) p.lse[row] = state_lse2(M, L) * kLn2;
}

}  // namespace decode
}  // namespace cuda
}  // namespace adakv
