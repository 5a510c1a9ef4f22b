// Log-sum-exp merge of the partials of the decode kernel family (both K/V layouts: the partials
// do not depend on it), merge math from softmax_state.cuh: the split partials of
// decode_kernel.cuh (decode_merge_kernel) and the pieces of the work-balanced kernel of
// decode_balanced.cuh (decode_balanced_merge_kernel: its segments may have many pieces, merged
// lane-parallel); one accumulator and store (MergedRow) for both.
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

// One query row's merged output, accumulated by one warp: lane owns dims lane * 4 + 128 i
// (16-byte fp32 loads of the partials). add(w, o) adds w times a partial's fp32 row; store()
// writes out = acc / sum (0 for an empty row: sum 0) in the query dtype and the natural-log
// lse of the merged state (M, sum) (softmax_state.cuh rules: -inf empty, NaN stays NaN).
template <int D>
struct MergedRow {
  static_assert(D % 4 == 0, "head dim must be a multiple of 4");
  static constexpr int kIters = (D + 127) / 128;
  float4 acc[kIters];
  __device__ __forceinline__ MergedRow() {
#pragma unroll
    for (int it = 0; it < kIters; ++it) acc[it] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  __device__ __forceinline__ void add(float w, const float* o, int lane) {
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
  }
  template <typename T>
  __device__ __forceinline__ void store(T* out, float* lse, float M, float sum, int lane) const {
    const float inv = inv_or_zero(sum);
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int d = lane * 4 + it * 128;
      if (D % 128 == 0 || d < D) {
        store4<T>(out + d, make_float4(acc[it].x * inv, acc[it].y * inv, acc[it].z * inv,
                                       acc[it].w * inv));
      }
    }
    if (lane == 0 && lse != nullptr) *lse = state_lse2(M, sum) * kLn2;
  }
};

// One warp per query row (n_rows = S * G * T), 4 rows per 128-thread CTA; each split's
// partial is the state (part_lse, 1, part_o) (softmax_state.cuh).
template <typename T, int D>
__global__ void __launch_bounds__(kMergeThreads) decode_merge_kernel(const MergeParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeRowsPerCta + (threadIdx.x >> 5);
  if (row >= p.n_rows) return;  // bounds: grid rounds n_rows up to whole CTAs
  const int lane = threadIdx.x & 31;
  MergedRow<D> m;
  const float2 ML = merge_states(
      p.num_splits, [&](int sp) { return p.part_lse[sp * p.n_rows + row]; },
      [](int) { return 1.f; },
      [&](int sp, float w) {  // w: 0 for an empty partial, NaN for a NaN one
        m.add(w, p.part_o + (sp * p.n_rows + row) * D, lane);
      });
  m.template store<T>(static_cast<T*>(p.out) + row * D, p.lse != nullptr ? p.lse + row : nullptr,
                      ML.x, ML.y, lane);
}

// The merge of the work-balanced kernel (decode_balanced.cuh): query row (s, r) of segment s
// merges the pieces of the warps u in [warp_of(P_s), warp_of(P_{s+1} - 1)] that hold tiles
// (slot s + u of part_o [slots][GT][D] / part_lse [slots][GT]); a warp in that range with an
// empty tile range (fewer tiles than warps) wrote nothing and is skipped. An empty segment
// (P_s == P_{s+1}) gets out 0, lse -inf. A segment may have many pieces (up to one per warp):
// lane l takes pieces l, l + 32, ... for the max and the weights (warp reductions), then every
// lane adds each piece's row with its weight shuffled from its lane; merge_states' rules
// (fmaxf drops a NaN lse from the max, its weight exp2(NaN) keeps the row NaN). Launched with
// programmatic dependent launch: waits for the balanced kernel (and its prefix P in
// tile_prefix) before reading.
template <typename T, int D>
__global__ void __launch_bounds__(kMergeThreads) decode_balanced_merge_kernel(const MergeParams p) {
  pdl_wait();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeRowsPerCta + (threadIdx.x >> 5);
  if (row >= p.n_rows) return;  // bounds: grid rounds n_rows up to whole CTAs
  const int lane = threadIdx.x & 31;
  const int64_t s = row / p.GT, r = row % p.GT;
  const int64_t total = p.tile_prefix[p.S], lo = p.tile_prefix[s], hi = p.tile_prefix[s + 1];
  const int64_t W = p.total_warps;
  int64_t u0 = 0, n = 0;
  if (hi > lo) {
    u0 = balanced_warp_of(lo, total, W);
    n = balanced_warp_of(hi - 1, total, W) - u0 + 1;
  }
  auto written = [&](int64_t u) { return u * total / W < (u + 1) * total / W; };
  auto piece_lse = [&](int64_t u) { return p.part_lse[(s + u) * p.GT + r]; };
  float M = neg_inf();
  for (int64_t i = lane; i < n; i += 32) {
    if (written(u0 + i)) M = fmaxf(M, piece_lse(u0 + i));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
  const float Mu = softmax_ref(M);
  float L = 0.f;
  MergedRow<D> m;
  for (int64_t base = 0; base < n; base += 32) {
    const int64_t i = base + lane;
    const float w = i < n && written(u0 + i) ? exp2f(piece_lse(u0 + i) - Mu) : 0.f;
    L += w;
    const int cnt = static_cast<int>(n - base < 32 ? n - base : 32);
    for (int j = 0; j < cnt; ++j) {
      const float wj = __shfl_sync(0xffffffffu, w, j);
      const int64_t u = u0 + base + j;
      if (written(u)) m.add(wj, p.part_o + ((s + u) * p.GT + r) * D, lane);  // warp-uniform
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) L += __shfl_xor_sync(0xffffffffu, L, o);
  m.template store<T>(static_cast<T*>(p.out) + row * D, p.lse != nullptr ? p.lse + row : nullptr,
                      M, L, lane);
}

}  // namespace decode
}  // namespace cuda
}  // namespace adakv
