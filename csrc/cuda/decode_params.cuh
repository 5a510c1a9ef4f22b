// Parameters and compile-time traits of the decode_attention kernels (decode_kernel.cuh: the
// split-K attention kernel, decode_balanced.cuh: the work-balanced schedule, decode_merge.cuh:
// the log-sum-exp merges of their partials), for
// both K/V layouts (contiguous k_flat [rows, D] + seg_start, or paged k_pages [num_pages, P, D]
// + page_table [S, page_width]), and the one host launcher of that kernel family
// (launch_decode, defined in decode_attention.cu, called by decode_attention.cu and paged.cu).
//
// Problem view: query [B, Hq, T, D] is read as [S, GT, D] with S = B * Hk segments and
// GT = G * T query rows per segment (row r = g * T + t of segment s = b * Hk + h is query head
// j = h * G + g, token t): the GT rows of a KV head are contiguous, so are their outputs.
// Paged layout with seg_index: segment s reads table row seg_index[s] (of table_rows rows;
// outside [0, table_rows), -1 for padding: an empty segment); its outputs stay row s.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"

namespace adakv {
namespace cuda {
namespace decode {

struct DecodeParams {
  const void* __restrict__ q;          // [S, GT, D] query dtype
  const void* __restrict__ k;          // [rows, D]
  const void* __restrict__ v;          // [rows, D]
  // [S] (contiguous layout, S >= 1: never null); nullptr selects the paged layout, whose
  // page_table may be null as well (an empty table: 0 rows or 0 entries, never read)
  const int32_t* __restrict__ seg_start;
  const int32_t* __restrict__ seg_len;    // [S], or [table_rows] read through seg_index
  // Paged layout (seg_start == nullptr): k / v are [num_pages * P, D], key i of segment s is
  // row page_table[t * page_width + i / P] * P + i % P with table row t = s, or t = seg_index[s]
  // (any P >= 1; each key row is looked up on its own, so a tile may straddle pages;
  // shift/mask when P is a power of two).
  const int32_t* __restrict__ page_table;  // [table_rows, page_width] (paged layout)
  const int32_t* __restrict__ seg_index;   // [S] table row of each segment, or nullptr (row s)
  int64_t table_rows;                  // rows of page_table / seg_len (paged; S without seg_index)
  int64_t num_pages;
  int page_width;                      // table entries per segment (page_width * P < 2^31)
  int page_size;                       // P
  int page_shift;                      // log2(P) when P is a power of two, else -1
  void* __restrict__ out;              // [S, GT, D] query dtype (num_splits == 1 or cluster merge)
  float* __restrict__ lse;             // [S, GT] natural log, or nullptr (num_splits == 1)
  float* __restrict__ part_o;          // [num_splits, S, GT, D] fp32, normalised (num_splits > 1)
  float* __restrict__ part_lse;        // [num_splits, S, GT] base-2 lse of each partial
  // Work-balanced path (decode_balanced.cuh): part_o / part_lse are [S + total_warps, GT, D] /
  // [S + total_warps, GT] (piece slots), tile_prefix [S + 1] receives the tile prefix.
  int32_t* __restrict__ tile_prefix;
  int64_t total_warps;
  int64_t rows;                        // cache rows (bounds for seg_start / seg_len; paged: unused)
  int S, GT, T;
  int num_splits, num_mblocks;
  float scale_log2;                    // softmax scale * log2(e): logits are kept in base 2
};

struct MergeParams {
  const float* __restrict__ part_o;    // [num_splits, n_rows, D]
  const float* __restrict__ part_lse;  // [num_splits, n_rows] base 2, -inf for an empty partial
  void* __restrict__ out;              // [n_rows, D] query dtype
  float* __restrict__ lse;             // [n_rows] natural log, or nullptr
  int64_t n_rows;                      // S * GT
  int num_splits;
  // balanced merge (decode_balanced_merge_kernel): the tile prefix [S + 1], the warps, S, GT
  const int32_t* __restrict__ tile_prefix;
  int64_t total_warps;
  int64_t S, GT;
};

// Largest cluster the launcher asks for (16 needs the non-portable cluster-size attribute).
constexpr int kMaxCluster = 16;

// Compile-time shape of one CTA of the split kernel.
//   * kMma: fp16/bf16 with D >= 64 use mma.sync m16n8k16 (fp32 accumulate) for Q.K^T and P.V,
//     with a 16-row query tile (kRows) shared by the 4 warps; fp32 (the test path) and the small
//     head dims 8/16/32 use a plain CUDA-core path (one lane per head dim, warp reductions).
//   * Each warp streams its own key tiles (kTileKeys rows of K and V) through a kStages-deep
//     cp.async ring in shared memory; warp w takes tiles w, w + 4, w + 8, ... of the split.
template <typename T, int D>
struct DecodeTraits {
  static constexpr bool kIsFloat = std::is_same_v<T, float>;
  static constexpr bool kMma = !kIsFloat && D >= 64;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = kMma ? 16 : 8;        // query rows per CTA (grid dim "mblock")
  static constexpr int kTileKeys = kMma ? 16 : 8;    // keys per warp per pipeline stage
  static constexpr int kEPC = 16 / static_cast<int>(sizeof(T));  // elements per 16-B chunk
  static constexpr int kCPR = D / kEPC;              // 16-B chunks per K/V row
  static_assert(D % kEPC == 0, "a K/V row must be a whole number of 16-byte chunks");
  // XOR swizzle of 16-B chunks within a row (chunk c of row r lives at c ^ (r & kSwz)):
  // 8 consecutive rows read at one logical chunk hit 8 different 16-B bank groups.
  static constexpr int kSwz = (kCPR >= 8 ? 8 : kCPR) - 1;
  static constexpr int kTileElems = kTileKeys * D;   // one K (or V) tile
  static constexpr int kStageBytes = 2 * kTileElems * static_cast<int>(sizeof(T));
  static constexpr int kStages = kStageBytes <= 8192 ? 3 : 2;
  static constexpr int kDimsPerLane = (D + 31) / 32; // CUDA-core path: dims d = lane + 32 i
  // Shared memory: [Q tile (mma path)] [ring: warp x stage x {K, V} x tile] ; the ring is
  // reused after the key loop for the cross-warp merge: o [warp][row][kLdO] + m, l [warp][row].
  static constexpr int kLdO = D + 4;                 // fp32 row stride (16-B aligned, fewer conflicts)
  static constexpr int kQBytes = kMma ? kRows * D * static_cast<int>(sizeof(T)) : 0;
  static constexpr int kRingBytes = kWarps * kStages * kStageBytes;
  static constexpr int kMergeBytes = (kWarps * kRows * kLdO + 2 * kWarps * kRows) * 4;
  static constexpr int kBodyBytes = kQBytes + (kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes);
  static constexpr int kSmemBytes = kBodyBytes;  // split kernel without clusters
  // Cluster path (sm_90, decode_kernel.cuh): a receive area after the body, written by the
  // cluster's CTAs: float4 partials of the (row, 4-dim group) items this CTA merges (at most
  // ceil(kRows * D / 4 / n) * n <= kRows * D / 4 + kMaxCluster of them) and the base-2 lse of
  // every row from every CTA [kRows][kMaxCluster]. Apart from the ring, so that peers still in
  // their key loop can be written.
  static constexpr int kRecvOBytes = (kRows * (D / 4) + kMaxCluster) * 16;
  static constexpr int kRecvBytes = kRecvOBytes + kRows * kMaxCluster * 4;
  static constexpr int kClusterSmemBytes = kBodyBytes + kRecvBytes;
  static_assert(kBodyBytes % 16 == 0, "receive area must stay 16-B aligned");
  static_assert(kQBytes % 128 == 0, "ring must stay 128-B aligned");
};

// Launches the decode kernel family for p on the current stream of `query`'s device (the
// caller holds a DeviceGuard; query's dtype is the K/V dtype): p.q, k, v, seg_start (the
// contiguous layout) or seg_start = nullptr and page_table (+ seg_index, table_rows, num_pages,
// page_width, page_shift), seg_len, out, lse, rows, T and scale_log2 are filled by the caller;
// S (segments of query: the grid, not the table's rows) and GT (query rows per segment) are
// range-checked and stored here; num_splits, num_mblocks and the partial buffers are chosen
// here (decode_heuristics.h; the two-launch merge's workspace comes from torch's allocator).
// `avg_cap` is the average segment capacity in keys (shapes only, never seg_len), `op` names
// the op in errors. head_dim: see check_decode_head_dim.
void launch_decode(DecodeParams& p, const Tensor& query, int64_t S, int64_t GT,
                   int64_t head_dim, int64_t avg_cap, const char* op);
// Rejects a head dim the kernels are not built for (ADAKV_DECODE_HEADDIM_SWITCH's error).
void check_decode_head_dim(int64_t head_dim);

}  // namespace decode
}  // namespace cuda
}  // namespace adakv

// Head dims the CUDA decode kernels are built for. 64 / 128 / 256 are the tuned sizes (tensor
// cores for fp16/bf16); 8 / 16 / 32 run the CUDA-core path (small test models).
#define ADAKV_DECODE_HEADDIM_SWITCH(HEAD_DIM, NAME, ...)                                     \
  [&] {                                                                                      \
    switch (HEAD_DIM) {                                                                      \
      case 8: { constexpr int NAME = 8; return __VA_ARGS__(); }                              \
      case 16: { constexpr int NAME = 16; return __VA_ARGS__(); }                            \
      case 32: { constexpr int NAME = 32; return __VA_ARGS__(); }                            \
      case 64: { constexpr int NAME = 64; return __VA_ARGS__(); }                            \
      case 128: { constexpr int NAME = 128; return __VA_ARGS__(); }                          \
      case 256: { constexpr int NAME = 256; return __VA_ARGS__(); }                          \
      default:                                                                               \
        ::adakv::detail::fail("adakv: decode_attention is not implemented for CUDA with head " \
                              "dim ", (HEAD_DIM), " (supported: 8, 16, 32, 64, 128, 256)");  \
    }                                                                                        \
  }()
