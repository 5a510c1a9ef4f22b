// Work-balanced decode attention (a persistent, stream-K style schedule of the decode kernel
// family) for either K/V layout (kPaged: the paged pool, else the head-flattened cache), fp16 /
// bf16 on tensor cores, G * T <= 16 query rows per segment.
//
// Why: the split kernel (decode_kernel.cuh) gives every segment the same number of splits, so
// with Ada-KV's skewed per-head lengths its CTAs do very different amounts of work and the last
// wave runs on a few SMs (batch 64 x 2K keys per head: 83% of the copy bandwidth paged, 89%
// contiguous on an H200). Here the work is cut by tiles, not by segments: with
// n_s = ceil(len_s / 16) key tiles in segment s and the prefix P_s = n_0 + ... + n_{s-1}, the
// total P_S tiles are split evenly over the Wt = gridDim.x * kWarps warps of a persistent grid
// (SMs x CTAs per SM): warp u takes the global tiles [u P_S / Wt, (u + 1) P_S / Wt), which may
// start inside one segment and cross into the next ones. Every warp is independent (no CTA
// barrier after the prefix): it streams its tiles through its own kStages-deep cp.async ring
// (the page-table entry of a tile loaded one tile ahead of its copies), keeps one online-softmax
// state (mma_attend_tile, the split kernel's tile step) and flushes it as a normalised fp32
// partial with its base-2 lse whenever a *piece* ends (its last tile in a segment): piece
// (u, s) goes to workspace slot s + u (unique: along the global tile order, every piece boundary
// advances s or u). The Q fragments of a segment are loaded into registers when a piece starts.
// decode_merge.cuh (decode_balanced_merge_kernel, a second launch with programmatic dependent
// launch) merges each segment's pieces, warps u in [warp_of(P_s), warp_of(P_{s+1} - 1)] with
// warp_of(t) = ceil((t + 1) Wt / P_S) - 1, by log-sum-exp into the output.
//
// Prefix: every CTA computes P in shared memory (each thread loads the clamped geometry of up to
// kSegsPerThread consecutive segments with all loads in flight, then one block-wide scan) and
// keeps each segment's length and table row / start next to it, so the walk over segments reads
// no global metadata; CTA 0 also writes P to the workspace for the merge. Launch shape: shapes
// and device only (CUDA graphs). Bounds: the geometry is clamped exactly as in the split kernel
// (segment_geometry), page ids clamped into the pool, Q rows >= G * T never read, and the
// launcher guarantees S <= kMaxSegments and S * ceil(capacity / 16) < 2^31 (int32 prefix).
// Semantics (masking, -inf / NaN rules, T > 1 causality) are the split kernel's: row r of a
// segment sees keys n < len - T + 1 + (r % T); an empty segment gets out 0, lse -inf.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/decode_kernel.cuh"

namespace adakv {
namespace cuda {
namespace decode {

template <typename T, int D>
struct BalancedTraits {
  static_assert(!std::is_same_v<T, float> && (D == 64 || D == 128 || D == 256),
                "the balanced path is the tensor-core path (fp16 / bf16, D in {64, 128, 256})");
  static constexpr int kWarps = D <= 128 ? 8 : 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = 16;                   // mma rows: G * T <= kRows
  static constexpr int kTileKeys = 16;
  static constexpr int kEPC = 8;                     // 16-bit elements per 16-B chunk
  static constexpr int kCPR = D / kEPC;
  static constexpr int kSwz = 7;
  static constexpr int kTileElems = kTileKeys * D;
  static constexpr int kStageBytes = 2 * kTileElems * 2;  // K + V tile
  static constexpr int kStages = kStageBytes <= 8192 ? 3 : 2;
  static constexpr int kRingBytes = kWarps * kStages * kStageBytes;
  static constexpr int kMaxSegments = 2048;
  static constexpr int kSegsPerThread = (kMaxSegments + kThreads - 1) / kThreads;
  // shared memory: ring | prefix [kMaxSegments + 1] (+ pad) | len [kMaxSegments] |
  // row or start [kMaxSegments] | stage descriptors [kWarps][kStages] int4
  static constexpr int kPrefixBytes = ((kMaxSegments + 1) * 4 + 15) / 16 * 16;
  static constexpr int kSegBytes = kMaxSegments * 4;
  static constexpr int kMetaBytes = kWarps * kStages * 16;
  static constexpr int kSmemBytes = kRingBytes + kPrefixBytes + 2 * kSegBytes + kMetaBytes;
  static_assert(kRingBytes % 16 == 0 && kSegBytes % 16 == 0, "16-B aligned regions");
};

// Warp holding global tile t when `total` tiles are split over `warps` warps as above.
__host__ __device__ __forceinline__ int64_t balanced_warp_of(int64_t t, int64_t total,
                                                             int64_t warps) {
  return ((t + 1) * warps + total - 1) / total - 1;
}

// Block-wide: the tile prefix pre[0..S], each segment's clamped length and its table row
// (paged) or first row (contiguous), in shared memory. Ends with __syncthreads.
template <typename Tr, bool kPaged>
__device__ __forceinline__ void balanced_prefix(const DecodeParams& p, int32_t* pre,
                                                int32_t* seg_len_s, int32_t* seg_at_s,
                                                int32_t* scratch) {
  constexpr int K = Tr::kSegsPerThread;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int s0 = tid * K;
  int tiles[K];
  int sum = 0;
#pragma unroll
  for (int i = 0; i < K; ++i) {  // all loads of the thread in flight together
    const int s = s0 + i;
    tiles[i] = 0;
    if (s < p.S) {
      const SegmentGeometry g = segment_geometry<kPaged>(p, s);
      seg_len_s[s] = g.len;
      // paged: the table row (< table_rows <= 2^31); contiguous: start (< 2^31, seg_start is
      // int32 and clamped into [0, rows])
      seg_at_s[s] = static_cast<int32_t>(kPaged ? g.row : g.start);
      tiles[i] = (g.len + Tr::kTileKeys - 1) / Tr::kTileKeys;
    }
    sum += tiles[i];
  }
  // inclusive scan of the per-thread sums: warp shuffles, then the warp totals
  int incl = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int x = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += x;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  int base = 0;
#pragma unroll
  for (int w = 0; w < Tr::kWarps; ++w) base += w < warp ? scratch[w] : 0;
  int run = base + incl - sum;  // exclusive prefix of this thread's first segment
  if (tid == 0) pre[0] = 0;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    run += tiles[i];
    if (s0 + i < p.S) pre[s0 + i + 1] = run;
  }
  __syncthreads();
}

// Largest s in [0, S) with pre[s] <= t, for 0 <= t < pre[S] (so segment s holds tile t and is
// not empty).
__device__ __forceinline__ int balanced_segment_of(const int32_t* pre, int S, int t) {
  int lo = 0, hi = S;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (pre[mid] <= t) lo = mid; else hi = mid;
  }
  return lo;
}

// Stage descriptor of an issued tile: segment, first key, segment length, flags
// (bit 0: the first tile of a piece, bit 1: the last).
struct TileDesc {
  int s, key0, len, flags;
};

template <typename T, int D, bool kPaged>
__global__ void __launch_bounds__(BalancedTraits<T, D>::kThreads, 1)
    decode_balanced_kernel(const DecodeParams p) {
  using Tr = BalancedTraits<T, D>;
  constexpr int kStages = Tr::kStages, kTileKeys = Tr::kTileKeys;
  extern __shared__ __align__(128) unsigned char smem[];
  int32_t* pre = reinterpret_cast<int32_t*>(smem + Tr::kRingBytes);
  int32_t* seg_len_s = reinterpret_cast<int32_t*>(smem + Tr::kRingBytes + Tr::kPrefixBytes);
  int32_t* seg_at_s = seg_len_s + Tr::kMaxSegments;
  int4* meta_all = reinterpret_cast<int4*>(smem + Tr::kRingBytes + Tr::kPrefixBytes +
                                           2 * Tr::kSegBytes);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Programmatic dependent launch: nothing of the previous kernel is read before this point.
  pdl_wait();
  // the ring is free until the walk starts: the scan's scratch lives there
  balanced_prefix<Tr, kPaged>(p, pre, seg_len_s, seg_at_s, reinterpret_cast<int32_t*>(smem));
  if (blockIdx.x == 0) {
    for (int i = threadIdx.x; i <= p.S; i += Tr::kThreads) p.tile_prefix[i] = pre[i];
  }
  const int64_t total = pre[p.S];
  const int64_t u = static_cast<int64_t>(blockIdx.x) * Tr::kWarps + warp;
  const int64_t n_warps = p.total_warps;
  const int t0 = static_cast<int>(u * total / n_warps);
  const int t1 = static_cast<int>((u + 1) * total / n_warps);
  const int n = t1 - t0;

  if (n > 0) {
    const T* __restrict__ kp = static_cast<const T*>(p.k);
    const T* __restrict__ vp = static_cast<const T*>(p.v);
    const T* __restrict__ qp = static_cast<const T*>(p.q);
    const uint32_t ring_addr =
        smem_u32(smem) + static_cast<uint32_t>(warp * kStages * Tr::kStageBytes);
    constexpr uint32_t kVOffset = Tr::kTileElems * sizeof(T);
    int4* meta = meta_all + warp * kStages;

    // Look-up cursor (warp-uniform): segment cs holds tiles [c_lo, c_hi) of the global order.
    int cs = balanced_segment_of(pre, p.S, t0);
    int c_lo = pre[cs], c_hi = pre[cs + 1];
    // the tile looked up next: its descriptor and (paged) its table entry, loaded one tile
    // before its copies are issued
    TileDesc nd{};
    int32_t n_id = 0;
    auto lookup = [&](int t) {
      if (t >= c_hi) {  // next non-empty segment
        cs = balanced_segment_of(pre, p.S, t);
        c_lo = pre[cs];
        c_hi = pre[cs + 1];
      }
      nd.s = cs;
      nd.key0 = (t - c_lo) * kTileKeys;
      nd.len = seg_len_s[cs];
      nd.flags = (t == t0 || t == c_lo ? 1 : 0) | (t == t1 - 1 || t == c_hi - 1 ? 2 : 0);
      if constexpr (kPaged) {
        // bounds: key0 < len <= page_width * P: the entry lies in the segment's table row
        const int64_t row = seg_at_s[cs];
        SegmentGeometry g{0, row, p.page_table + row * p.page_width, nd.len};
        n_id = page_entry(p, g, nd.key0);
      }
    };
    // Issue the copies of the looked-up tile into stage `stage` and record its descriptor.
    auto issue = [&](int stage) {
      const uint32_t sk = ring_addr + static_cast<uint32_t>(stage * Tr::kStageBytes);
      SegmentGeometry g{seg_at_s[nd.s], 0, nullptr, nd.len};  // start (contiguous)
      const int64_t row0 = tile_row0<kPaged>(p, g, nd.key0, n_id);  // page id clamped
      // bounds: rows >= len - key0 are zero-filled, not read (load_tile)
      load_tile<Tr>(sk, sk + kVOffset, kp, vp, [=](int r) { return row0 + r; },
                    nd.len - nd.key0, lane);
      if (lane == 0) meta[stage] = make_int4(nd.s, nd.key0, nd.len, nd.flags);
    };

    lookup(t0);
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) {
      if (st < n) {
        issue(st);
        if (st + 1 < n) lookup(t0 + st + 1);
      }
      cp_async_commit();
    }

    const int r_lo = lane >> 2;
    MmaRowState<D> acc;
    uint32_t qa[D / 16][4];
    int lim_lo = 0, lim_hi = 0;
    for (int j = 0; j < n; ++j) {
      if (j + kStages - 1 < n) {
        issue((j + kStages - 1) % kStages);
        if (j + kStages < n) lookup(t0 + j + kStages);
      }
      cp_async_commit();
      cp_async_wait<kStages - 1>();  // this lane's copies of tile j have landed
      __syncwarp();                  // ... every lane's are visible, and so is its descriptor
      const int4 d = meta[j % kStages];
      const int s = d.x, key0 = d.y, len = d.z, flags = d.w;
      if (flags & 1) {  // a piece starts: Q of segment s into registers, a fresh state
        const T* q = qp + static_cast<int64_t>(s) * p.GT * D;
        const int c0 = (lane & 3) * 2;
        const bool lo_ok = r_lo < p.GT, hi_ok = r_lo + 8 < p.GT;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
          // A fragment of m16n8k16: {row r_lo | r_lo + 8} x {cols c0, c0 + 1 | + 8}
          const int col = ks * 16 + c0;
          qa[ks][0] = lo_ok ? *reinterpret_cast<const uint32_t*>(q + r_lo * D + col) : 0u;
          qa[ks][1] = hi_ok ? *reinterpret_cast<const uint32_t*>(q + (r_lo + 8) * D + col) : 0u;
          qa[ks][2] = lo_ok ? *reinterpret_cast<const uint32_t*>(q + r_lo * D + col + 8) : 0u;
          qa[ks][3] = hi_ok ? *reinterpret_cast<const uint32_t*>(q + (r_lo + 8) * D + col + 8) : 0u;
        }
        // row r sees keys n < len - T + 1 + (r % T); rows >= GT see none
        auto limit = [&](int r) -> int {
          if (r >= p.GT) return 0;
          return max(len - p.T + 1 + r % p.T, 0);
        };
        lim_lo = limit(r_lo);
        lim_hi = limit(r_lo + 8);
        acc.reset();
      }
      const uint32_t sk = ring_addr + static_cast<uint32_t>((j % kStages) * Tr::kStageBytes);
      mma_attend_tile<T, D>(
          [&](int ks, uint32_t (&a)[4]) {
            a[0] = qa[ks][0]; a[1] = qa[ks][1]; a[2] = qa[ks][2]; a[3] = qa[ks][3];
          },
          sk, sk + kVOffset, key0, lim_lo, lim_hi, p.scale_log2, acc);
      if (flags & 2) {  // the piece ends: its normalised partial and base-2 lse, slot s + u
        // (the state is not used again: the next tile starts a piece and resets it)
        MmaRowState<D>& fin = acc;
        fin.reduce_l();
        const int64_t slot = static_cast<int64_t>(s) + u;
        const float inv_lo = inv_or_zero(fin.l_lo), inv_hi = inv_or_zero(fin.l_hi);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = r_lo + 8 * h;
          if (r < p.GT) {
            const float inv = h ? inv_hi : inv_lo;
            float* dst = p.part_o + (slot * p.GT + r) * D + (lane & 3) * 2;
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
              *reinterpret_cast<float2*>(dst + i * 8) =
                  make_float2(fin.o[i][2 * h] * inv, fin.o[i][2 * h + 1] * inv);
            }
            if ((lane & 3) == 0) {
              p.part_lse[slot * p.GT + r] =
                  h ? state_lse2(fin.m_hi, fin.l_hi) : state_lse2(fin.m_lo, fin.l_lo);
            }
          }
        }
      }
      __syncwarp();  // all lanes are done with this stage before it is refilled
    }
    cp_async_wait<0>();
  }
  // The merge kernel may start launching; its pdl_wait still waits for all of us.
  pdl_launch_dependents();
}

}  // namespace decode
}  // namespace cuda
}  // namespace adakv
