// Launch-shape heuristic of the split-K decode kernel family (decode_kernel.cuh), shared by the
// contiguous and the paged layout: how many splits of each segment's keys, and whether the
// splits are merged inside one thread-block cluster (sm_90) or by a second launch.
//
// A pure host function of shape numbers and device facts (no tensors, no seg_len: the launch
// shape is fixed for a given set of shapes, so the op can be captured in a CUDA graph).
//   * two-launch path: enough CTAs for kWavesTarget full waves, but no split smaller than one
//     CTA stage (kWarps * kTileKeys keys) of the average segment capacity, at most kMaxSplits;
//   * cluster path (max_cluster >= 2 and allowed): aim at kClusterWaves waves (finer work units
//     even out skewed, Ada-like segment lengths), at most max_cluster splits, and at most
//     max(4, one wave / base CTAs) of them (large clusters in a multi-wave grid schedule badly:
//     measured on an H100 at batch 64, 12-16 splits ran 1.6x slower than 4). Batch 1 of an
//     8-KV-head layer: 16 splits = 128 CTAs. Against forced counts 1-4 on an H100 (2026-12-07,
//     benchmarks/results/paged-h100.md) this choice is within 0.9 points of the best where
//     the heads' lengths spread as Ada's do, and up to 6.5 points behind one split where they
//     are all equal (batch 64 x 1K): the longest head sets the time of one split per segment,
//     so the spread real evictions have decides;
//   * a forced split count (developer override) replaces the choice; the result is clamped to
//     [1, kMaxSplits] and the cluster path is used only when 1 < splits <= max_cluster.
//   Tried and dropped (2026-12-07, benchmarks/results/paged-minsplit-h100-2026-12-07.txt): a
//   shortest split applied on device (a short segment uses fewer of its splits, the rest left
//   empty) to recover the even-heads case. On the cluster path it cost 30 points at batch 64 x
//   1K whether or not the empty CTAs left early: a cluster reserves all its CTAs' slots at
//   once, so one busy CTA per cluster leaves the rest idle; on the two-launch path it was
//   neutral. Also tried and dropped (2026-12-08, benchmarks/results/
//   paged-dealt-h100-2026-12-08.txt): a row-dealt schedule (each batch row's Hk segments,
//   which Ada-KV gives one shared budget, cut on device into Hk x n equal chunks, one CTA each,
//   multi-chunk heads merged by a second launch): +4 points on even heads at batch 64 x 1K,
//   up to 4 points behind these clustered splits with any spread, no gain in the engine.
// And whether the work-balanced kernel (decode_balanced.cuh) replaces the split kernel: where
// it is available (fp16 / bf16 tensor-core instantiations whose shared memory fits the device),
// for at most kRows query rows and kMaxSegments segments, while the int32 tile prefix cannot
// overflow (segments x tiles of the largest clamped segment < 2^31), and only when asked for
// (ADAKV_DECODE_BALANCED=1): measured on an H100 (2026-12-06, benchmarks/results/
// paged-h100.md) at batch 64 x 2K keys per head it was no faster than the split kernel (paged
// equal, contiguous 4.5% slower: its second launch, the per-CTA prefix and the Q loads at each
// piece cost what the split kernel loses to uneven lengths there), and at batch 1 far slower
// (pieces of half a tile).
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>

namespace adakv {
namespace cuda {
namespace decode {

constexpr int64_t kMaxSplits = 128;
constexpr int64_t kWavesTarget = 2;   // two-launch path
constexpr int64_t kClusterWaves = 8;  // cluster path

struct DecodeSplitInputs {
  int64_t base_ctas;           // segments x query-row blocks (CTAs of one split), >= 1
  int64_t avg_cap;             // average segment capacity in keys (shapes only)
  int64_t keys_per_cta_stage;  // kWarps * kTileKeys of the kernel instantiation
  int64_t slots;               // SMs x CTAs per SM (occupancy)
  int64_t max_cluster;         // largest cluster the kernel can run with, 0: none
  bool cluster_allowed;        // ADAKV_DECODE_CLUSTER != 0
  std::optional<int64_t> forced_splits;  // ADAKV_DECODE_SPLITS
};

struct DecodeSplitPlan {
  int64_t num_splits;
  bool use_cluster;
};

inline DecodeSplitPlan plan_decode_splits(const DecodeSplitInputs& in) {
  const int64_t base = std::max<int64_t>(1, in.base_ctas);
  const int64_t stage = std::max<int64_t>(1, in.keys_per_cta_stage);
  const int64_t max_by_len =
      std::max<int64_t>(1, (std::max<int64_t>(0, in.avg_cap) + stage - 1) / stage);
  const bool cluster_ok = in.max_cluster >= 2 && in.cluster_allowed;
  int64_t n;
  if (cluster_ok) {
    n = (kClusterWaves * in.slots + base - 1) / base;
    n = std::min({n, max_by_len, in.max_cluster, std::max<int64_t>(4, in.slots / base)});
  } else {
    n = (kWavesTarget * in.slots + base - 1) / base;
    n = std::min({n, max_by_len, kMaxSplits});
  }
  if (in.forced_splits.has_value()) n = *in.forced_splits;
  n = std::max<int64_t>(1, std::min(n, kMaxSplits));
  return {n, n > 1 && cluster_ok && n <= in.max_cluster};
}

struct DecodeBalanceInputs {
  bool kernel_available;       // balanced instantiation exists and fits this device
  int64_t segments;            // S
  int64_t rows_per_segment;    // G * T
  int64_t max_rows;            // BalancedTraits::kRows
  int64_t max_segments;        // BalancedTraits::kMaxSegments
  int64_t capacity;            // bound of one segment's clamped length, in keys
  int64_t tile_keys;           // BalancedTraits::kTileKeys
  int64_t num_sms;
  std::optional<int64_t> forced;  // ADAKV_DECODE_BALANCED: 0 never, other values when possible
};

inline bool plan_decode_balanced(const DecodeBalanceInputs& in) {
  if (!in.kernel_available || in.segments < 1 || in.rows_per_segment > in.max_rows ||
      in.segments > in.max_segments) {
    return false;
  }
  const int64_t tk = std::max<int64_t>(1, in.tile_keys);
  const int64_t cap_tiles = (std::max<int64_t>(0, in.capacity) + tk - 1) / tk;
  if (cap_tiles > 0 && in.segments > (int64_t{2147483647} - 1) / cap_tiles) return false;
  return in.forced.has_value() && *in.forced != 0;
}

}  // namespace decode
}  // namespace cuda
}  // namespace adakv
