// Launch-shape heuristic of the decode GEMM (decode_gemm.cu): the token tile and the split-K
// factor of y[M, N] = x[M, K] W[N, K]^T at decode sizes (M <= 256 rows, N and K in the
// thousands).
//
// Pure host functions of shape numbers and device facts (the launch shape is fixed for a set
// of shapes, so the op can be captured in a CUDA graph):
//   * token tile: the smallest of 32, 64, 128, 256 that holds M (the wgmma N of the kernel);
//   * split: the CTAs of one 128-row weight tile, each streaming 1 / split of K, that reduce
//     their partial tiles through distributed shared memory (one cluster of `split` CTAs): the
//     largest power of two <= kDecodeGemmMaxSplit whose tiles * split CTAs fit in one wave of
//     slots[split] (the CTAs resident at once with clusters of that size:
//     cudaOccupancyMaxActiveClusters x split; clusters live inside one GPC, so on an H100
//     clusters of 4 and 8 fit fewer CTAs than the SM count suggests), with at least
//     kMinBlocksPerSplit 64-wide K blocks per CTA. Measured on an H100 (2026-12-07,
//     benchmarks/results/decode-gemm-h100.md, forced splits 1 / 2 / 4 / 8 for the
//     Llama-3.1-8B projections at 64 / 128 / 256 rows): the rule's split is the fastest one
//     within 2 points of the copy bandwidth for every shape but o_proj at 64 rows (3 points
//     behind split 2). Splits of 3, 5, 6, 7 are not used (non-power-of-two clusters packed
//     worse: qkv at 128 rows, split 5 ran at 48% of the copy bandwidth against 67% for 4). Examples (two CTAs per SM up to 128 rows): o_proj
//     [4096, 4096] (32 tiles) and down [4096, 14336] -> 4, qkv [6144, 4096] (48 tiles) -> 4,
//     gate_up [28672, 4096] and the LM head -> 1.
//   * a forced split (the op's `split` argument, for sweeps) replaces the choice, clamped to
//     [1, min(kDecodeGemmMaxSplit, k_blocks)] and to a cluster size that can run.
#pragma once

#include <algorithm>
#include <cstdint>

namespace adakv {
namespace cuda {

constexpr int kDecodeGemmMaxRows = 256;
constexpr int kDecodeGemmBlockF = 128;  // weight rows per CTA
constexpr int kDecodeGemmBlockK = 64;   // K per pipeline stage
constexpr int kDecodeGemmMaxSplit = 8;  // portable cluster size

inline int decode_gemm_token_tile(int64_t M) {
  return M <= 32 ? 32 : M <= 64 ? 64 : M <= 128 ? 128 : 256;
}

inline int decode_gemm_split(int64_t tiles, int64_t k_blocks,
                             const int (&slots)[kDecodeGemmMaxSplit + 1], int64_t forced_split) {
  constexpr int64_t kMinBlocksPerSplit = 4;
  tiles = std::max<int64_t>(1, tiles);
  k_blocks = std::max<int64_t>(1, k_blocks);
  const int64_t max_split = std::min<int64_t>(kDecodeGemmMaxSplit, k_blocks);
  if (forced_split > 0) {
    int64_t s = std::min<int64_t>(forced_split, max_split);
    while (s > 1 && slots[s] <= 0) --s;
    return static_cast<int>(s);
  }
  int choice = 1;
  for (int64_t s = 2; s <= max_split; s *= 2) {
    if (k_blocks / s < kMinBlocksPerSplit || slots[s] <= 0 || tiles * s > slots[s]) break;
    choice = static_cast<int>(s);
  }
  return choice;
}

}  // namespace cuda
}  // namespace adakv
