// The radix select shared by adakv::allocate (allocate.cu) and adakv::select (select.cu):
// digit constants, key loads, per-CTA histograms, block scans, the ONE routine that finds a
// digit (radix_digit: histogram -> the digit holding the rank-th key and the count before it)
// and the ordered compaction of select.
//
// Keys: adakv::descending_key(score) (allocation_rules.h, shared with the CPU kernels;
// ascending key = better score, -0.0 == +0.0, every NaN last). The K-th smallest key v*
// (1-based K) is found by an MSD radix select in kPasses digits of 11, 11 and 10 bits, most
// significant first: per digit, the histogram of the candidates' digit among the keys that
// match the prefix fixed so far, then the bin holding the rank-th candidate. After the last
// digit, prefix = v* and rank = the number of keys equal to v* to take (in tie-break order).
//
// radix_digit is block-wide (every thread of the CTA calls it) and parameterised by how the
// histogram of the CTA's candidates is added (Add) and summed over the CTAs that share the
// select (Sum):
//   * LocalSum: one CTA holds every candidate (select_smem_kernel);
//   * ClusterSum: the CTAs of a thread-block cluster, through distributed shared memory
//     (allocate_cluster_kernel, select_cluster_kernel; sm_90);
//   * global atomics and a last-CTA ticket, one digit per launch (radix_pass_kernel,
//     radix_passes.cuh).
// radix_select runs all kPasses digits in one CTA / cluster.
//
// Columns outside the valid range [lo, hi) (before key_start, the padding of the last float4
// group) are excluded by their column index wherever keys are counted or written (hist_add4,
// compact_columns, the callers' counts), never by a sentinel value: whatever placeholder key
// such a column holds (kUnusedKey) can neither be selected nor displace a real column.
#pragma once

#include <cstdint>

#include "allocation_rules.h"
#include "cuda/common.cuh"

namespace adakv {
namespace cuda {
namespace radix {

// ---------------------------------------------------------------------------------------------
// digits and keys

constexpr int kBins = 2048;  // 11-bit digits (the last one has 10 bits)
constexpr int kPasses = 3;

__host__ __device__ constexpr int digit_shift(int pass) { return pass == 0 ? 21 : pass == 1 ? 10 : 0; }
__host__ __device__ constexpr uint32_t digit_mask(int pass) { return pass == 2 ? 0x3FFu : 0x7FFu; }
// Bits fixed by the previous digits.
__host__ __device__ constexpr uint32_t high_mask(int pass) {
  return pass == 0 ? 0u : pass == 1 ? 0xFFE00000u : 0xFFFFFC00u;
}

// Placeholder key of a column past L (float4 padding) or of an unloaded group: never compared,
// counted or written (every use filters by column index first, see the file comment). 0 is a
// register-free constant (0xffffffff costs select_count_kernel a register spill).
constexpr uint32_t kUnusedKey = 0u;

// Largest thread-block cluster asked for (non-portable above 8) by the cluster kernels.
constexpr int kClusterMax = 16;

// First valid column of batch row b: key_start[b] clamped to [0, hi] (0 without key_start).
__device__ __forceinline__ int clamp_start(const int32_t* key_start, int64_t b, int hi) {
  if (key_start == nullptr) return 0;
  // bounds: key_start comes from device memory; clamp to [0, hi]
  return min(max(key_start[b], 0), hi);
}

// Loads the 4 keys of columns [c, c + 4) of a score row (c a multiple of 4). kVec: the row is
// 16-byte aligned and L % 4 == 0, so the whole group is in bounds whenever c < L.
// bounds: without kVec only columns < L are read.
template <bool kVec>
__device__ __forceinline__ void load_keys4(const float* __restrict__ row, int c, int L,
                                           uint32_t (&key)[4]) {
  if constexpr (kVec) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(row + c));
    key[0] = descending_key(v.x);
    key[1] = descending_key(v.y);
    key[2] = descending_key(v.z);
    key[3] = descending_key(v.w);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      key[j] = c + j < L ? descending_key(__ldg(row + c + j)) : kUnusedKey;
  }
}

// Loads the keys of columns [4 * g, 4 * g + 4) from shared memory (kSmem: keys by column) or
// from the score row.
template <bool kSmem, bool kVec>
__device__ __forceinline__ void fetch_keys4(const uint32_t* skeys, const float* srow, int g,
                                            int L, uint32_t (&key)[4]) {
  if constexpr (kSmem) {
    const uint4 v = reinterpret_cast<const uint4*>(skeys)[g];
    key[0] = v.x;
    key[1] = v.y;
    key[2] = v.z;
    key[3] = v.w;
  } else {
    load_keys4<kVec>(srow, 4 * g, L, key);
  }
}

// ---------------------------------------------------------------------------------------------
// histograms

// Adds the keys of columns [c, c + 4) that lie in [lo, hi) and match the prefix to the shared
// histogram of digit `pass`. Equal neighbouring digits (score plateaus) are merged into one
// atomic.
__device__ __forceinline__ void hist_add4(uint32_t* hist, const uint32_t (&key)[4], int c,
                                          int lo, int hi, uint32_t prefix, int pass) {
  const uint32_t hmask = high_mask(pass);
  const int shift = digit_shift(pass);
  const uint32_t dmask = digit_mask(pass);
  int cur = -1;
  uint32_t n = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (c + j >= lo && c + j < hi && (key[j] & hmask) == prefix) {
      const int bin = static_cast<int>((key[j] >> shift) & dmask);
      if (bin == cur) {
        ++n;
      } else {
        if (n) atomicAdd(hist + cur, n);
        cur = bin;
        n = 1;
      }
    }
  }
  if (n) atomicAdd(hist + cur, n);
}

// Block-wide: adds the keys of the columns [lo, hi) of one score row to the shared histogram
// of digit `pass` (UNROLL float4 groups in flight per thread).
template <int BLOCK, int UNROLL, bool kVec>
__device__ __forceinline__ void hist_add_columns(uint32_t* hist, const float* srow, int L, int lo,
                                                 int hi, uint32_t prefix, int pass) {
  if (lo >= hi) return;
  const int g_end = (hi + 3) >> 2;  // float4 groups [lo / 4, ceil(hi / 4))
  for (int g0 = (lo >> 2) + threadIdx.x; g0 < g_end; g0 += BLOCK * UNROLL) {
    uint32_t key[UNROLL][4];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int g = g0 + u * BLOCK;
      if (g < g_end) load_keys4<kVec>(srow, 4 * g, L, key[u]);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int g = g0 + u * BLOCK;
      if (g < g_end) hist_add4(hist, key[u], 4 * g, lo, hi, prefix, pass);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// block scans

// Block-wide exclusive scan of a pair of counts (warp shuffles, then the warp totals through
// shared memory). Also returns the block totals. The caller synchronises before reusing tmp.
template <int BLOCK>
struct PairScan {
  static constexpr int kWarps = BLOCK / 32;
  struct TempStorage {
    uint2 warp[kWarps];
  };

  __device__ static void run(TempStorage& tmp, uint32_t a, uint32_t b, uint32_t& excl_a,
                             uint32_t& excl_b, uint32_t& total_a, uint32_t& total_b) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    uint32_t ia = a, ib = b;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t xa = __shfl_up_sync(0xffffffffu, ia, o);
      const uint32_t xb = __shfl_up_sync(0xffffffffu, ib, o);
      if (lane >= o) {
        ia += xa;
        ib += xb;
      }
    }
    if (lane == 31) tmp.warp[warp] = make_uint2(ia, ib);
    __syncthreads();
    uint32_t wa = 0, wb = 0, ta = 0, tb = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const uint2 v = tmp.warp[w];
      if (w < warp) {
        wa += v.x;
        wb += v.y;
      }
      ta += v.x;
      tb += v.y;
    }
    excl_a = wa + ia - a;
    excl_b = wb + ib - b;
    total_a = ta;
    total_b = tb;
  }
};

// ---------------------------------------------------------------------------------------------
// the digit

// A digit of the select: the bin holding the rank-th candidate and the candidates in lower bins.
struct Digit {
  int bin;
  uint32_t before;
};

// Fixes digit `pass` = d: prefix gains the digit, rank becomes the rank within its bin.
__device__ __forceinline__ void narrow(const Digit& d, int pass, uint32_t& prefix,
                                       uint32_t& rank) {
  prefix |= static_cast<uint32_t>(d.bin) << digit_shift(pass);
  rank -= d.before;
}

// Block-wide: given each thread's counts of bins [tid * BPT, tid * BPT + BPT) of the total
// histogram, the digit of the rank-th smallest candidate (1-based rank), the same in every
// thread. The single thread that owns the bin publishes it through tmp ({0, 0} if no bin holds
// the rank). Ends with a barrier: tmp and the histogram may be reused after it.
template <int BLOCK, int BPT>
struct DigitFinder {
  static constexpr int kBlock = BLOCK;
  static constexpr int kBinsPerThread = BPT;
  using Scan = PairScan<BLOCK>;
  struct TempStorage {
    typename Scan::TempStorage scan;
    int bin;
    uint32_t before;
  };

  __device__ static Digit run(TempStorage& tmp, const uint32_t (&cnt)[BPT], uint32_t rank) {
    // Ordered before the owner's write below by the scan's barrier; every reader of the
    // previous digit has passed a barrier of the caller since.
    if (threadIdx.x == 0) {
      tmp.bin = 0;
      tmp.before = 0;
    }
    uint32_t local = 0;
#pragma unroll
    for (int j = 0; j < BPT; ++j) local += cnt[j];
    uint32_t excl, unused0, unused1, unused2;
    Scan::run(tmp.scan, local, 0u, excl, unused0, unused1, unused2);
    const uint32_t target = rank - 1;
    if (rank >= 1 && excl <= target && target - excl < local) {
#pragma unroll
      for (int j = 0; j < BPT; ++j) {
        if (target - excl < cnt[j]) {
          tmp.bin = static_cast<int>(threadIdx.x) * BPT + j;
          tmp.before = excl;
          break;
        }
        excl += cnt[j];
      }
    }
    __syncthreads();
    return Digit{tmp.bin, tmp.before};
  }
};

// One digit of the radix select, block-wide: zeroes hist (kBins words of shared memory),
// add(hist, prefix, pass) adds the CTA's candidates, sum(hist, cnt) gives each thread its BPT
// bins [tid * BPT, +BPT) of the histogram summed over every CTA of the select (after the
// barriers that takes) and returns false, in every thread alike, where this CTA does not take
// part in the digit (then *d is not written); Finder (a DigitFinder) picks the digit. The single routine
// behind every path: select_smem_kernel, the cluster kernels (through radix_select) and
// radix_pass_kernel.
template <typename Finder, typename Add, typename Sum>
__device__ __forceinline__ bool radix_digit(typename Finder::TempStorage& tmp, uint32_t* hist,
                                            int pass, uint32_t prefix, uint32_t rank, Add&& add,
                                            Sum&& sum, Digit* d) {
  for (int i = threadIdx.x; i < kBins; i += Finder::kBlock) hist[i] = 0;
  __syncthreads();
  add(hist, prefix, pass);
  uint32_t cnt[Finder::kBinsPerThread];
  if (!sum(hist, cnt)) return false;
  *d = Finder::run(tmp, cnt, rank);
  return true;
}

// Every digit in one CTA or cluster: prefix (0 on entry) becomes the threshold key v*, rank (K
// on entry) the number of keys equal to v* to take.
template <typename Finder, typename Add, typename Sum>
__device__ __forceinline__ void radix_select(typename Finder::TempStorage& tmp, uint32_t* hist,
                                             uint32_t& prefix, uint32_t& rank, Add&& add,
                                             Sum&& sum) {
#pragma unroll 1
  for (int pass = 0; pass < kPasses; ++pass) {
    Digit d;
    radix_digit<Finder>(tmp, hist, pass, prefix, rank, add, sum, &d);
    narrow(d, pass, prefix, rank);
  }
}

// Sum of radix_digit where the CTA's histogram is the total (one CTA holds every candidate).
template <int BPT>
struct LocalSum {
  __device__ __forceinline__ bool operator()(const uint32_t* hist, uint32_t (&cnt)[BPT]) const {
    __syncthreads();
#pragma unroll
    for (int j = 0; j < BPT; ++j) cnt[j] = hist[threadIdx.x * BPT + j];
    return true;
  }
};

// Sum of radix_digit over the CTAs of a thread-block cluster (sm_90; Cluster is
// cooperative_groups::cluster_group, cs CTAs, a power of two dividing kBins): after a cluster
// barrier CTA r sums bins [r * kBins / cs, +kBins / cs) of every CTA's histogram (distributed
// shared memory) into its slice of tot ([kBins] words of shared memory); after a second barrier
// every thread gathers its 4 consecutive bins from the CTA that owns them. Every CTA gets the
// same totals, so all find the same digit (no broadcast). tot is rewritten only after the next
// digit's first cluster barrier, which every CTA reaches after its gather; the histograms are
// no longer read by any peer after the second barrier.
template <int BLOCK, typename Cluster>
struct ClusterSum {
  Cluster& cluster;
  uint32_t* tot;
  int cs;       // CTAs in the cluster
  int rank_in;  // this CTA's rank in it

  __device__ __forceinline__ bool operator()(uint32_t* hist, uint32_t (&cnt)[4]) const {
    const int bins_per = kBins / cs;
    cluster.sync();  // every CTA's histogram of this digit is complete
    for (int j = threadIdx.x; j < bins_per; j += BLOCK) {
      const int bin = rank_in * bins_per + j;
      uint32_t sum = 0;
#pragma unroll
      for (int q = 0; q < kClusterMax; ++q)
        if (q < cs) sum += cluster.map_shared_rank(hist, static_cast<unsigned>(q))[bin];
      tot[bin] = sum;
    }
    cluster.sync();  // every slice of the summed histogram is complete
    const int first = static_cast<int>(threadIdx.x) * 4;  // 4 consecutive bins, one owner
    const uint4 v = *reinterpret_cast<const uint4*>(
        cluster.map_shared_rank(tot, static_cast<unsigned>(first / bins_per)) + first);
    cnt[0] = v.x;
    cnt[1] = v.y;
    cnt[2] = v.z;
    cnt[3] = v.w;
    return true;
  }
};

// ---------------------------------------------------------------------------------------------
// ordered compaction (select)

// Block-wide ordered compaction of the columns [lo, hi) of one segment (threshold key thr, the
// first `need` keys equal to thr are kept, k kept in all). run_less / run_eq: keys below /
// equal to thr in the segment's columns before lo. A kept column goes to position
// #less before it + min(#equal before it, need), so kept columns come out ascending.
// Columns are processed in tiles of BLOCK * IPT, each thread IPT consecutive ones.
template <int BLOCK, int IPT, bool kSmem, bool kVec>
__device__ void compact_columns(typename PairScan<BLOCK>::TempStorage& tmp,
                                const uint32_t* skeys, const float* srow, int L, int lo, int hi,
                                uint32_t thr, uint32_t need, uint32_t k, uint32_t run_less,
                                uint32_t run_eq, int32_t* out) {
  static_assert(IPT % 4 == 0, "items per thread are float4 groups");
  const uint32_t less_total = k - need;
  const int g_end = (hi + 3) >> 2;
  for (int g_tile = lo >> 2; g_tile < g_end; g_tile += BLOCK * (IPT / 4)) {
    if (run_less >= less_total && run_eq >= need) break;  // uniform: all kept columns written
    const int g_first = g_tile + static_cast<int>(threadIdx.x) * (IPT / 4);
    uint32_t key[IPT];
#pragma unroll
    for (int u = 0; u < IPT / 4; ++u) {
      uint32_t k4[4] = {kUnusedKey, kUnusedKey, kUnusedKey, kUnusedKey};
      if (g_first + u < g_end) fetch_keys4<kSmem, kVec>(skeys, srow, g_first + u, L, k4);
#pragma unroll
      for (int j = 0; j < 4; ++j) key[4 * u + j] = k4[j];
    }
    const int c0 = 4 * g_first;
    uint32_t nl = 0, ne = 0;
#pragma unroll
    for (int j = 0; j < IPT; ++j) {
      const bool valid = c0 + j >= lo && c0 + j < hi;
      nl += (valid && key[j] < thr) ? 1u : 0u;
      ne += (valid && key[j] == thr) ? 1u : 0u;
    }
    uint32_t excl_l, excl_e, agg_l, agg_e;
    PairScan<BLOCK>::run(tmp, nl, ne, excl_l, excl_e, agg_l, agg_e);
    uint32_t l = run_less + excl_l;
    uint32_t e = run_eq + excl_e;
#pragma unroll
    for (int j = 0; j < IPT; ++j) {
      const int c = c0 + j;
      if (c < lo || c >= hi) continue;
      uint32_t pos = 0xffffffffu;
      if (key[j] < thr) {
        pos = l + min(e, need);
        ++l;
      } else if (key[j] == thr) {
        if (e < need) pos = l + e;
        ++e;
      }
      if (pos < k) out[pos] = c;  // bounds: pos < k <= L
    }
    run_less += agg_l;
    run_eq += agg_e;
    __syncthreads();  // tmp is reused by the next tile
  }
}

}  // namespace radix
}  // namespace cuda
}  // namespace adakv
