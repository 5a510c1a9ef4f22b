// CUDA kernels of adakv::allocate and adakv::select (Ada-KV budget allocation and segmented
// top-k). Integer outputs are identical to the CPU kernels (csrc/cpu/topk.cpp) on every input.
//
// Both ops find a threshold with an MSD radix select over the 32-bit order keys
// adakv::descending_key(score) (ascending key = better score): three digits of 11, 11 and 10
// bits, most significant first. The K-th smallest key v* (1-based K) splits the candidates
// into "less" (< v*, all taken) and "equal" (== v*, the first `need` in tie-break order taken).
//
// allocate(scores [B, Hk, L] fp32) -> budgets [B, Hk] int32
//   Per batch row b (a "group" of Hk score rows): K = Hk * C over the valid columns
//   [ks_b, L) of all heads. Multi-CTA: grid = B * Hk * chunks CTAs of kPassThreads threads,
//   one launch per digit (radix_pass_kernel<PASS>). Each CTA histograms its chunk of one head
//   in shared memory and adds it into a global per-head histogram; the last CTA of the row
//   (atomic ticket) picks the digit, accumulates the per-head "less" counts and writes the
//   row state (prefix, remaining rank) for the next launch. After the last digit it splits the
//   equal keys over the heads in head order, applies the safeguard and the exact
//   (largest remainder) or official rounding of allocation_rules.h, and writes the budgets.
//   Rows that are not evicted get C. Counts are order-independent, so results are
//   deterministic although CTAs finish in any order.
//   sm_90, Hk <= 256, Hk * L <= 2^17 (the default there): the same digits in ONE launch, one
//   thread-block cluster (16 CTAs on an H100) per batch row, histograms summed through
//   distributed shared memory (allocate_cluster_kernel); no scratch, no memset.
//   ADAKV_ALLOCATE_CLUSTER=0 / 1 turns it off / on at any size (tests).
//
// select(scores [B, Hk, L], budgets [B, Hk]) -> kept_idx [B, Hk, L], kept_count [B, Hk]
//   Per segment s = b * Hk + h: k = clamp(budgets[s], 0, L_b); threshold of the k-th key, then
//   an ordered stream compaction (one CTA per segment, block-wide scan of the
//   (#less, #equal) counts per tile) writes the kept token indices ascending, then -1.
//   * L <= select_smem_max_L() (default 32768, env ADAKV_SELECT_SMEM_MAX_L overrides it for
//     tests) and the row fits in shared memory: one kernel (select_smem_kernel), one CTA of
//     1024 threads per segment keeps the segment's keys in shared memory and runs the three
//     digit passes and the compaction on them.
//   * sm_90 and L >= 16384 (the default there): one launch, one thread-block cluster (16 CTAs
//     on an H100) per segment: the digit passes with histograms summed through distributed
//     shared memory, then an ordered compaction of each CTA's columns at the offsets of the
//     CTAs before it (select_cluster_kernel). ADAKV_SELECT_CLUSTER=0 / 1 turns it off / on for
//     every length (tests).
//   * longer rows: grid = B * Hk * chunks CTAs of 512 threads for every launch. The three digit
//     passes (radix_pass_kernel, as in allocate with groups of one row; pass 0 also writes the
//     -1 tail and the segments that need no threshold, k == 0 or k == L_b), then
//     select_count_kernel (keys below / equal to the threshold per chunk) and
//     select_write_kernel (each chunk compacted at the offset given by the chunks before it).
//
// Order (SPEC sections 2 and 9): every comparison of scores is a comparison of
// descending_key(score) (allocation_rules.h, shared with the CPU kernels): higher score first,
// -0.0 == +0.0, every NaN last (key 0xffffffff, below -inf), ties to the lower head, then the
// lower token. No path compares floats directly. Columns outside the valid range [ks_b, L)
// (before key_start, and the padding of the last float4 group) are excluded by their column
// index wherever keys are counted or written (hist_add4, compact_columns, select_count_kernel,
// the per-CTA counts of the cluster kernels), never by a sentinel value: whatever placeholder
// key such a column holds (kUnusedKey) can neither be selected nor displace a real column, NaN
// and -inf included.
//
// Scratch (histograms, tickets, row state) is one zero-filled tensor per call (torch's
// allocator); no host syncs; launch shapes depend on tensor shapes only (CUDA-graph
// capturable). Stable ABI only (csrc/torch_api.h, cuda/common.cuh).

#include <cooperative_groups.h>
#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <string_view>
#include <tuple>

#include "allocation_rules.h"
#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/launch.cuh"
#include "ops.h"

namespace adakv {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// radix digits

constexpr int kBins = 2048;  // 11-bit digits (the last one has 10 bits)
constexpr int kPasses = 3;

__host__ __device__ constexpr int digit_shift(int pass) { return pass == 0 ? 21 : pass == 1 ? 10 : 0; }
__host__ __device__ constexpr uint32_t digit_mask(int pass) { return pass == 2 ? 0x3FFu : 0x7FFu; }
// Bits fixed by the previous digits.
__host__ __device__ constexpr uint32_t high_mask(int pass) {
  return pass == 0 ? 0u : pass == 1 ? 0xFFE00000u : 0xFFFFFC00u;
}

constexpr int kPassThreads = 512;       // radix_pass_kernel
constexpr int kPassUnroll = 4;          // float4 groups in flight per thread
constexpr int kPassChunkQuantum = kPassThreads * 4;  // chunk sizes are multiples of this
constexpr int kSmemThreads = 1024;      // select_smem_kernel
constexpr int kSmemItems = 8;
constexpr int kWriteItems = 8;          // select_write_kernel (kPassThreads threads)

// Placeholder key of a column past L (float4 padding) or of an unloaded group: never compared,
// counted or written (every use filters by column index first, see the file comment). 0 is a
// register-free constant (0xffffffff costs select_count_kernel a register spill).
constexpr uint32_t kUnusedKey = 0u;

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

// Block-wide: given each thread's counts of bins [tid * BPT, tid * BPT + BPT), finds the bin
// holding the rank-th smallest candidate (1-based rank) and the count of candidates in lower
// bins. The single thread that owns it writes *bin / *before; the caller initialises them and
// synchronises afterwards.
template <int BLOCK, int BPT>
struct BinFinder {
  using Scan = PairScan<BLOCK>;
  using TempStorage = typename Scan::TempStorage;

  __device__ static void run(TempStorage& tmp, const uint32_t (&cnt)[BPT], uint32_t rank,
                             int* bin, uint32_t* before) {
    uint32_t local = 0;
#pragma unroll
    for (int j = 0; j < BPT; ++j) local += cnt[j];
    uint32_t excl, unused0, unused1, unused2;
    Scan::run(tmp, local, 0u, excl, unused0, unused1, unused2);
    const uint32_t target = rank - 1;
    if (rank >= 1 && excl <= target && target - excl < local) {
#pragma unroll
      for (int j = 0; j < BPT; ++j) {
        if (target - excl < cnt[j]) {
          *bin = static_cast<int>(threadIdx.x) * BPT + j;
          *before = excl;
          break;
        }
        excl += cnt[j];
      }
    }
  }
};

__device__ __forceinline__ int clamp_start(const int32_t* key_start, int64_t b, int hi) {
  if (key_start == nullptr) return 0;
  // bounds: key_start comes from device memory; clamp to [0, hi]
  return min(max(key_start[b], 0), hi);
}

// ---------------------------------------------------------------------------------------------
// ordered compaction (select)

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

// ---------------------------------------------------------------------------------------------
// multi-CTA digit passes (allocate; select for long rows)

struct RadixParams {
  const float* scores;        // [B, Hk, L]
  const int32_t* key_start;   // [B] or nullptr
  const int32_t* budgets;     // select: [B * Hk]
  int32_t* out;               // allocate: budgets [B * Hk]
  int32_t* kept_idx;          // select: [B * Hk, L]
  int32_t* kept_count;        // select: [B * Hk]
  uint32_t* hist;             // [kPasses][B * Hk][kBins], zeroed
  uint32_t* ticket;           // [kPasses][groups], zeroed
  uint32_t* state;            // [groups][2]: prefix, remaining rank (final: threshold, need)
  uint32_t* less;             // allocate: [B * Hk] keys below the prefix so far, zeroed
  uint32_t* chunk_counts;     // select: [B * Hk][chunks][2] keys < / == threshold per chunk
  int64_t rows;               // B * Hk
  int L;                      // < 2^30, so column arithmetic fits in int
  int chunk;                  // columns per CTA, a multiple of kPassChunkQuantum
  int chunks;                 // CTAs per score row
  int Hk;
  int64_t C;                  // allocate: budget
  double alpha;               // allocate: floor_alpha
  bool official;              // allocate: rounding
};

struct GroupTask {
  bool active;
  uint32_t k;  // allocate: 1-based rank of the threshold key; select: kept count
  int ks;      // first valid column
};

// Whether group g needs a radix select and its rank. allocate: rows with L_b > C (C >= 1 and
// adaptive, the host handles the rest), K = Hk * C < Hk * L_b. select: 0 < k < L_b.
template <bool kSelect>
__device__ __forceinline__ GroupTask group_task(const RadixParams& p, int64_t b, int64_t row) {
  GroupTask t;
  t.ks = clamp_start(p.key_start, b, p.L);
  const int Lb = p.L - t.ks;
  if constexpr (kSelect) {
    const int k = min(max(p.budgets[row], 0), Lb);  // bounds: budgets clamped to [0, L_b]
    t.active = k > 0 && k < Lb;
    t.k = static_cast<uint32_t>(k);
  } else {
    t.active = Lb > p.C;
    t.k = static_cast<uint32_t>(p.C * p.Hk);
  }
  return t;
}

// The CTA's slice of a score row: chunk index, score row (b * Hk + h) and columns
// [lo, hi) = the chunk within the valid columns [ks, L) (empty when lo >= hi).
struct ChunkSlice {
  int chunk, c_begin, c_end, lo, hi;
  int64_t row;
};

__device__ __forceinline__ ChunkSlice chunk_slice(const RadixParams& p, int ks) {
  ChunkSlice c;
  c.chunk = static_cast<int>(blockIdx.x % p.chunks);
  c.row = blockIdx.x / p.chunks;
  c.c_begin = c.chunk * p.chunk;
  c.c_end = min(p.L - c.c_begin, p.chunk) + c.c_begin;
  c.lo = max(c.c_begin, ks);
  c.hi = c.c_end;
  return c;
}

// Shared memory of the allocate epilogue (dynamic, [Hk] each).
struct AllocateSmem {
  double* frac;     // fractional parts of the safeguarded budgets
  uint32_t* less;   // keys below the threshold per head (this pass, then the total)
  uint32_t* eq;     // keys equal to the threshold per head (last pass)
};

__device__ __forceinline__ AllocateSmem allocate_smem(char* smem, int Hk) {
  AllocateSmem a;
  a.frac = reinterpret_cast<double*>(smem);
  a.less = reinterpret_cast<uint32_t*>(smem + sizeof(double) * Hk);
  a.eq = a.less + Hk;
  return a;
}

// Final step of allocate for row b, run by the last CTA: per-head counts c_h, safeguard and
// rounding. sm.less / sm.eq hold the row's totals; `need` equal keys are taken in head order.
__device__ void allocate_finish(const RadixParams& p, int64_t b, uint32_t need,
                                const AllocateSmem& sm) {
  using Reduce = cub::BlockReduce<long long, kPassThreads>;
  __shared__ typename Reduce::TempStorage reduce_tmp;
  __shared__ long long sh_floors;
  const int Hk = p.Hk;
  uint32_t* count = sm.less;  // becomes c_h in place
  if (threadIdx.x == 0) {
    uint32_t rem = need;
    for (int h = 0; h < Hk; ++h) {
      const uint32_t take = min(sm.eq[h], rem);
      rem -= take;
      count[h] += take;
    }
  }
  __syncthreads();
  int32_t* out = p.out + b * Hk;
  if (p.official) {
    for (int h = threadIdx.x; h < Hk; h += kPassThreads)
      out[h] = static_cast<int32_t>(official_budget(count[h], p.C, p.alpha));
    return;
  }
  long long floors = 0;
  for (int h = threadIdx.x; h < Hk; h += kPassThreads) {
    const double x = safeguarded_budget(count[h], p.C, p.alpha);
    const double f = floor(x);
    sm.frac[h] = x - f;
    floors += static_cast<long long>(f);
  }
  floors = Reduce(reduce_tmp).Sum(floors);
  if (threadIdx.x == 0) sh_floors = floors;
  __syncthreads();
  const long long K = p.C * Hk;
  const long long R = min(max(K - sh_floors, 0LL), static_cast<long long>(Hk));
  // Largest remainder: head h gets a unit iff fewer than R heads precede it in the order
  // (fraction descending, head ascending): the CPU's greedy loop picks exactly those.
  for (int h = threadIdx.x; h < Hk; h += kPassThreads) {
    const double fh = sm.frac[h];
    long long rank = 0;
    for (int g = 0; g < Hk; ++g) rank += (sm.frac[g] > fh || (sm.frac[g] == fh && g < h)) ? 1 : 0;
    const double f = floor(safeguarded_budget(count[h], p.C, p.alpha));
    out[h] = static_cast<int32_t>(static_cast<long long>(f) + (rank < R ? 1 : 0));
  }
}

// One digit of the radix select, grid = B * Hk * chunks CTAs. Select, pass 0 also writes the
// parts of kept_idx that need no threshold: -1 at positions >= k, and whole rows of segments
// that keep nothing or every valid column (positions [c_begin, c_end) of its chunk).
template <int PASS, bool kSelect, bool kVec>
__global__ void __launch_bounds__(kPassThreads)
radix_pass_kernel(const RadixParams p) {
  constexpr int BPT = kBins / kPassThreads;
  using Finder = BinFinder<kPassThreads, BPT>;
  __shared__ uint32_t sh_hist[kBins];
  __shared__ typename Finder::TempStorage find_tmp;
  __shared__ int sh_bin;
  __shared__ uint32_t sh_before;
  __shared__ bool sh_last;
  extern __shared__ __align__(16) char dyn_smem[];  // allocate: AllocateSmem

  const int64_t row = blockIdx.x / p.chunks;  // b * Hk + h
  const int64_t b = row / p.Hk;
  const int h = static_cast<int>(row % p.Hk);
  const GroupTask task = group_task<kSelect>(p, b, row);
  const ChunkSlice cs = chunk_slice(p, task.ks);
  const int64_t group = kSelect ? row : b;
  const int64_t group_rows = kSelect ? 1 : p.Hk;
  const int64_t groups = kSelect ? p.rows : p.rows / p.Hk;
  if constexpr (kSelect && PASS == 0) {
    int32_t* out = p.kept_idx + row * p.L;
    const int k = static_cast<int>(task.k);
    for (int i = cs.c_begin + threadIdx.x; i < cs.c_end; i += kPassThreads) {
      if (i >= k) {
        out[i] = -1;
      } else if (!task.active) {
        out[i] = task.ks + i;  // k == L_b: every valid column, in order
      }
    }
    if (cs.chunk == 0 && threadIdx.x == 0) p.kept_count[row] = k;
  }
  if (!task.active) {
    if constexpr (!kSelect) {
      if (PASS == 0 && h == 0 && cs.chunk == 0)
        for (int i = threadIdx.x; i < p.Hk; i += kPassThreads)
          p.out[b * p.Hk + i] = static_cast<int32_t>(p.C);
    }
    return;  // the whole group returns: its tickets are never used
  }
  uint32_t prefix = 0, rank = task.k;
  if (PASS > 0) {
    prefix = p.state[2 * group];
    rank = p.state[2 * group + 1];
  }

  for (int i = threadIdx.x; i < kBins; i += kPassThreads) sh_hist[i] = 0;
  __syncthreads();
  const float* srow = p.scores + row * p.L;
  if (cs.lo < cs.hi) {
    const int g_end = (cs.hi + 3) >> 2;  // float4 groups [lo / 4, ceil(hi / 4))
    for (int g0 = (cs.lo >> 2) + threadIdx.x; g0 < g_end; g0 += kPassThreads * kPassUnroll) {
      uint32_t key[kPassUnroll][4];
#pragma unroll
      for (int u = 0; u < kPassUnroll; ++u) {
        const int g = g0 + u * kPassThreads;
        if (g < g_end) load_keys4<kVec>(srow, 4 * g, p.L, key[u]);
      }
#pragma unroll
      for (int u = 0; u < kPassUnroll; ++u) {
        const int g = g0 + u * kPassThreads;
        if (g < g_end) hist_add4(sh_hist, key[u], 4 * g, cs.lo, cs.hi, prefix, PASS);
      }
    }
  }
  __syncthreads();

  uint32_t* ghist = p.hist + static_cast<int64_t>(PASS) * p.rows * kBins;
  for (int i = threadIdx.x; i < kBins; i += kPassThreads) {
    const uint32_t v = sh_hist[i];
    if (v) atomicAdd(ghist + row * kBins + i, v);
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const uint32_t done = atomicAdd(p.ticket + PASS * groups + group, 1u);
    sh_last = done == static_cast<uint32_t>(group_rows * p.chunks - 1);
  }
  __syncthreads();
  if (!sh_last) return;
  __threadfence();  // acquire: the other CTAs' histogram atomics are visible

  // Last CTA of the group: total histogram of the group's rows, digit of the rank-th key.
  // Thread t owns bins [4 t, 4 t + 4) (one uint4 per score row).
  const int64_t r0 = kSelect ? row : b * p.Hk;
  static_assert(BPT == 4, "one uint4 of bins per thread");
  const uint4* gbins = reinterpret_cast<const uint4*>(ghist) + threadIdx.x;
  uint32_t cnt[BPT] = {0u, 0u, 0u, 0u};
#pragma unroll 4
  for (int64_t r = r0; r < r0 + group_rows; ++r) {
    const uint4 v = __ldcg(gbins + r * (kBins / 4));
    cnt[0] += v.x;
    cnt[1] += v.y;
    cnt[2] += v.z;
    cnt[3] += v.w;
  }
  if (threadIdx.x == 0) {
    sh_bin = 0;
    sh_before = 0;
  }
  __syncthreads();
  Finder::run(find_tmp, cnt, rank, &sh_bin, &sh_before);
  __syncthreads();
  const int bin = sh_bin;
  const uint32_t new_rank = rank - sh_before;
  const uint32_t new_prefix = prefix | (static_cast<uint32_t>(bin) << digit_shift(PASS));

  if constexpr (!kSelect) {
    // Per head: keys of the lower bins are below the threshold (all taken); last pass: keys of
    // the threshold's bin are equal to it.
    const AllocateSmem sm = allocate_smem(dyn_smem, p.Hk);
    for (int hh = threadIdx.x; hh < p.Hk; hh += kPassThreads) sm.less[hh] = 0;
    __syncthreads();
    const int lane = threadIdx.x % 32;
    const int first = static_cast<int>(threadIdx.x) * BPT;
#pragma unroll 8
    for (int hh = 0; hh < p.Hk; ++hh) {
      const uint4 v = __ldcg(gbins + (r0 + hh) * (kBins / 4));
      const uint32_t c4[4] = {v.x, v.y, v.z, v.w};
      uint32_t part = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        part += first + j < bin ? c4[j] : 0u;
        if (PASS == kPasses - 1 && first + j == bin) sm.eq[hh] = c4[j];
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
      if (lane == 0 && part) atomicAdd(sm.less + hh, part);
    }
    __syncthreads();
    for (int hh = threadIdx.x; hh < p.Hk; hh += kPassThreads) {
      const uint32_t total = p.less[r0 + hh] + sm.less[hh];
      if (PASS == kPasses - 1) {
        sm.less[hh] = total;
      } else {
        p.less[r0 + hh] = total;
      }
    }
    if (PASS == kPasses - 1) {
      __syncthreads();
      allocate_finish(p, b, new_rank, sm);
      return;
    }
  }
  if (threadIdx.x == 0) {
    p.state[2 * group] = new_prefix;
    p.state[2 * group + 1] = new_rank;
  }
}

// select, long rows, after the passes: keys below / equal to the threshold in each chunk.
template <bool kVec>
__global__ void __launch_bounds__(kPassThreads)
select_count_kernel(const RadixParams p) {
  __shared__ typename PairScan<kPassThreads>::TempStorage tmp;
  const int64_t row = blockIdx.x / p.chunks;
  const GroupTask task = group_task<true>(p, row / p.Hk, row);
  if (!task.active) return;
  const ChunkSlice cs = chunk_slice(p, task.ks);
  const uint32_t thr = p.state[2 * row];
  const float* srow = p.scores + row * p.L;
  uint32_t nl = 0, ne = 0;
  const int g_end = (cs.hi + 3) >> 2;
  for (int g0 = (cs.lo >> 2) + threadIdx.x; g0 < g_end; g0 += kPassThreads * kPassUnroll) {
    uint32_t key[kPassUnroll][4];
#pragma unroll
    for (int u = 0; u < kPassUnroll; ++u) {
      const int g = g0 + u * kPassThreads;
      key[u][0] = key[u][1] = key[u][2] = key[u][3] = kUnusedKey;  // g >= g_end: never counted
      if (g < g_end) load_keys4<kVec>(srow, 4 * g, p.L, key[u]);
    }
#pragma unroll
    for (int u = 0; u < kPassUnroll; ++u) {
      const int g = g0 + u * kPassThreads;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = 4 * g + j;
        const bool valid = g < g_end && c >= cs.lo && c < cs.hi;
        nl += (valid && key[u][j] < thr) ? 1u : 0u;
        ne += (valid && key[u][j] == thr) ? 1u : 0u;
      }
    }
  }
  uint32_t unused0, unused1, tl, te;
  PairScan<kPassThreads>::run(tmp, nl, ne, unused0, unused1, tl, te);
  if (threadIdx.x == 0) {
    uint32_t* cc = p.chunk_counts + 2 * (row * p.chunks + cs.chunk);
    cc[0] = tl;
    cc[1] = te;
  }
}

// select, long rows: ordered compaction of each chunk, offset by the counts of the chunks
// before it.
template <bool kVec>
__global__ void __launch_bounds__(kPassThreads)
select_write_kernel(const RadixParams p) {
  __shared__ typename PairScan<kPassThreads>::TempStorage tmp;
  const int64_t row = blockIdx.x / p.chunks;
  const GroupTask task = group_task<true>(p, row / p.Hk, row);
  if (!task.active) return;
  const ChunkSlice cs = chunk_slice(p, task.ks);
  const uint32_t thr = p.state[2 * row];
  const uint32_t need = min(p.state[2 * row + 1], task.k);
  uint32_t pl = 0, pe = 0;
  const uint32_t* cc = p.chunk_counts + 2 * row * p.chunks;
  for (int c = threadIdx.x; c < cs.chunk; c += kPassThreads) {
    pl += cc[2 * c];
    pe += cc[2 * c + 1];
  }
  uint32_t unused0, unused1, base_less, base_eq;
  PairScan<kPassThreads>::run(tmp, pl, pe, unused0, unused1, base_less, base_eq);
  __syncthreads();  // tmp is reused below
  if (cs.lo >= cs.hi) return;
  compact_columns<kPassThreads, kWriteItems, false, kVec>(
      tmp, nullptr, p.scores + row * p.L, p.L, cs.lo, cs.hi, thr, need, task.k, base_less,
      base_eq, p.kept_idx + row * p.L);
}

// ---------------------------------------------------------------------------------------------
// select, rows that fit in shared memory: one CTA per segment does everything

struct SelectParams {
  const float* scores;       // [B, Hk, L]
  const int32_t* key_start;  // [B] or nullptr
  const int32_t* budgets;    // [B * Hk]
  int32_t* kept_idx;         // [B, Hk, L]
  int32_t* kept_count;       // [B * Hk]
  int L;                     // < 2^30
  int Hk;
};

// Dynamic shared memory: the segment's keys by column (roundup4(L) words) and the histogram.
template <bool kVec>
__global__ void __launch_bounds__(kSmemThreads)
select_smem_kernel(const SelectParams p) {
  constexpr int BLOCK = kSmemThreads;
  constexpr int BPT = kBins / BLOCK;
  using Finder = BinFinder<BLOCK, BPT>;
  __shared__ typename PairScan<BLOCK>::TempStorage tmp;
  __shared__ int sh_bin;
  __shared__ uint32_t sh_before;
  extern __shared__ __align__(16) char dyn_smem[];

  const int64_t s = blockIdx.x;
  const int L = p.L;
  const int ks = clamp_start(p.key_start, s / p.Hk, L);
  const int Lb = L - ks;
  const int k = min(max(p.budgets[s], 0), Lb);  // bounds: budgets clamped to [0, L_b]
  int32_t* out = p.kept_idx + s * L;
  const float* srow = p.scores + s * L;

  for (int i = k + threadIdx.x; i < L; i += BLOCK) out[i] = -1;
  if (threadIdx.x == 0) p.kept_count[s] = k;
  if (k == 0) return;
  if (k == Lb) {  // keep every valid column
    for (int i = threadIdx.x; i < Lb; i += BLOCK) out[i] = ks + i;
    return;
  }

  // Columns are visited in float4 groups starting at the group holding ks.
  const int g_begin = ks >> 2, g_end = (L + 3) >> 2;
  uint32_t* keys = reinterpret_cast<uint32_t*>(dyn_smem);  // [4 * g_end], by column
  uint32_t* hist = keys + 4 * g_end;                          // [kBins]
  for (int g = g_begin + threadIdx.x; g < g_end; g += BLOCK) {
    uint32_t key[4];
    load_keys4<kVec>(srow, 4 * g, L, key);
    reinterpret_cast<uint4*>(keys)[g] = make_uint4(key[0], key[1], key[2], key[3]);
  }
  uint32_t prefix = 0, rank = static_cast<uint32_t>(k);
#pragma unroll 1
  for (int pass = 0; pass < kPasses; ++pass) {
    for (int i = threadIdx.x; i < kBins; i += BLOCK) hist[i] = 0;
    if (threadIdx.x == 0) {
      sh_bin = 0;
      sh_before = 0;
    }
    __syncthreads();  // also orders the key stores of the load above
    for (int g = g_begin + threadIdx.x; g < g_end; g += BLOCK) {
      const uint4 v = reinterpret_cast<const uint4*>(keys)[g];
      const uint32_t key[4] = {v.x, v.y, v.z, v.w};
      hist_add4(hist, key, 4 * g, ks, L, prefix, pass);
    }
    __syncthreads();
    uint32_t cnt[BPT];
#pragma unroll
    for (int j = 0; j < BPT; ++j) cnt[j] = hist[threadIdx.x * BPT + j];
    Finder::run(tmp, cnt, rank, &sh_bin, &sh_before);
    __syncthreads();
    prefix |= static_cast<uint32_t>(sh_bin) << digit_shift(pass);
    rank -= sh_before;
    __syncthreads();  // sh_bin / hist / tmp are reused by the next pass
  }
  compact_columns<BLOCK, kSmemItems, true, kVec>(tmp, keys, srow, L, ks, L, prefix,
                                                 min(rank, static_cast<uint32_t>(k)),
                                                 static_cast<uint32_t>(k), 0u, 0u, out);
}

// ---------------------------------------------------------------------------------------------
// allocate in one launch (sm_90): one thread-block cluster per batch row

constexpr int kClusterMax = 16;      // largest cluster asked for (non-portable above 8)
constexpr int kClusterMaxHk = 256;   // more heads: the multi-launch passes
constexpr int64_t kClusterMaxRowElems = int64_t{1} << 17;  // allocate: Hk * L per batch row

// Dynamic shared memory of allocate_cluster_kernel: local histogram, this CTA's slice of the
// cluster-summed histogram, per-head counts of this CTA (less / equal to the threshold), and
// the AllocateSmem of the finishing CTA.
__host__ __device__ constexpr size_t cluster_alloc_smem(int Hk) {
  return 2 * kBins * sizeof(uint32_t) + 2 * static_cast<size_t>(Hk) * sizeof(uint32_t) +
         static_cast<size_t>(Hk) * (sizeof(double) + 2 * sizeof(uint32_t));
}

// grid = B * cs CTAs, cluster = cs CTAs (one batch row each). CTA `r` of the cluster owns the
// float4 groups [r * per, (r + 1) * per) of the row's Hk x ceil(L / 4) groups. Per digit: the
// CTA histograms its keys that match the prefix in shared memory; cluster barrier; CTA r sums
// bins [r * kBins / cs, +kBins / cs) over the cluster (distributed shared memory) into its
// slice; cluster barrier; every CTA gathers the summed histogram and finds the same digit
// (identical inputs, identical result: no broadcast needed). After the last digit the threshold
// key and the number of equal keys to take are known; one more sweep counts per head the keys
// below / equal to it, and CTA 0 sums those over the cluster and runs allocate_finish. Same
// result as the multi-launch passes (counts are order-independent), one launch, no scratch.
template <bool kVec>
__global__ void __launch_bounds__(kPassThreads)
allocate_cluster_kernel(const RadixParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int BPT = kBins / kPassThreads;
  using Finder = BinFinder<kPassThreads, BPT>;
  __shared__ typename Finder::TempStorage find_tmp;
  __shared__ int sh_bin;
  __shared__ uint32_t sh_before;
  extern __shared__ __align__(16) char dyn_smem[];
  uint32_t* hist = reinterpret_cast<uint32_t*>(dyn_smem);
  uint32_t* tot = hist + kBins;
  uint32_t* hless = tot + kBins;
  uint32_t* heq = hless + p.Hk;
  const AllocateSmem fin = allocate_smem(reinterpret_cast<char*>(heq + p.Hk), p.Hk);

  cg::cluster_group cluster = cg::this_cluster();
  const int cs = static_cast<int>(cluster.num_blocks());
  const int rank_in = static_cast<int>(cluster.block_rank());
  const int64_t b = blockIdx.x / cs;
  const GroupTask task = group_task<false>(p, b, b * p.Hk);  // same for every head of row b
  if (!task.active) {  // uniform over the cluster: every CTA returns, no barrier is pending
    if (rank_in == 0)
      for (int i = threadIdx.x; i < p.Hk; i += kPassThreads)
        p.out[b * p.Hk + i] = static_cast<int32_t>(p.C);
    return;
  }
  const int g4 = (p.L + 3) >> 2;  // float4 groups per head row
  const int64_t total = static_cast<int64_t>(p.Hk) * g4;
  const int64_t per = (total + cs - 1) / cs;
  const int64_t my_lo = min(total, rank_in * per), my_hi = min(total, my_lo + per);
  const float* rows = p.scores + b * p.Hk * static_cast<int64_t>(p.L);
  const int bins_per = kBins / cs;  // cs divides kBins (a power of two <= 16)

  uint32_t prefix = 0, rank = task.k;
#pragma unroll 1
  for (int pass = 0; pass < kPasses; ++pass) {
    for (int i = threadIdx.x; i < kBins; i += kPassThreads) hist[i] = 0;
    __syncthreads();
    for (int64_t i0 = my_lo + threadIdx.x; i0 < my_hi; i0 += kPassThreads * kPassUnroll) {
      uint32_t key[kPassUnroll][4];
      int col[kPassUnroll];
      const float* src[kPassUnroll];
#pragma unroll
      for (int u = 0; u < kPassUnroll; ++u) {
        const int64_t i = i0 + u * kPassThreads;
        const int h = static_cast<int>(i / g4);
        col[u] = 4 * static_cast<int>(i - static_cast<int64_t>(h) * g4);
        src[u] = rows + static_cast<int64_t>(h) * p.L;
        if (i < my_hi) load_keys4<kVec>(src[u], col[u], p.L, key[u]);
      }
#pragma unroll
      for (int u = 0; u < kPassUnroll; ++u) {
        if (i0 + u * kPassThreads < my_hi)
          hist_add4(hist, key[u], col[u], task.ks, p.L, prefix, pass);
      }
    }
    cluster.sync();  // every CTA's histogram of this digit is complete
    for (int j = threadIdx.x; j < bins_per; j += kPassThreads) {
      const int bin = rank_in * bins_per + j;
      uint32_t sum = 0;
#pragma unroll
      for (int q = 0; q < kClusterMax; ++q)
        if (q < cs) sum += cluster.map_shared_rank(hist, static_cast<unsigned>(q))[bin];
      tot[bin] = sum;
    }
    cluster.sync();  // every slice of the summed histogram is complete
    uint32_t cnt[BPT];
    {
      const int first = static_cast<int>(threadIdx.x) * BPT;  // BPT consecutive bins, one owner
      const uint4 v = *reinterpret_cast<const uint4*>(
          cluster.map_shared_rank(tot, static_cast<unsigned>(first / bins_per)) + first);
      cnt[0] = v.x;
      cnt[1] = v.y;
      cnt[2] = v.z;
      cnt[3] = v.w;
    }
    if (threadIdx.x == 0) {
      sh_bin = 0;
      sh_before = 0;
    }
    __syncthreads();
    Finder::run(find_tmp, cnt, rank, &sh_bin, &sh_before);
    __syncthreads();
    prefix |= static_cast<uint32_t>(sh_bin) << digit_shift(pass);
    rank -= sh_before;
    // tot is rewritten only after the next digit's first cluster barrier, which every CTA
    // reaches after its gather above; hist is no longer read by any peer.
  }

  // prefix = the threshold key; rank = equal keys to take (in head, then column order).
  for (int i = threadIdx.x; i < p.Hk; i += kPassThreads) {
    hless[i] = 0;
    heq[i] = 0;
  }
  __syncthreads();
  for (int64_t i = my_lo + threadIdx.x; i < my_hi; i += kPassThreads) {
    const int h = static_cast<int>(i / g4);
    const int c = 4 * static_cast<int>(i - static_cast<int64_t>(h) * g4);
    uint32_t key[4];
    load_keys4<kVec>(rows + static_cast<int64_t>(h) * p.L, c, p.L, key);
    uint32_t nl = 0, ne = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (c + j >= task.ks && c + j < p.L) {
        nl += key[j] < prefix ? 1u : 0u;
        ne += key[j] == prefix ? 1u : 0u;
      }
    }
    if (nl) atomicAdd(hless + h, nl);
    if (ne) atomicAdd(heq + h, ne);
  }
  cluster.sync();  // every CTA's per-head counts are complete
  if (rank_in == 0) {
    for (int h = threadIdx.x; h < p.Hk; h += kPassThreads) {
      uint32_t l = 0, e = 0;
      for (int q = 0; q < cs; ++q) {
        l += cluster.map_shared_rank(hless, static_cast<unsigned>(q))[h];
        e += cluster.map_shared_rank(heq, static_cast<unsigned>(q))[h];
      }
      fin.less[h] = l;
      fin.eq[h] = e;
    }
  }
  cluster.sync();  // CTA 0 has read every peer: the others may exit
  if (rank_in != 0) return;
  __syncthreads();
  allocate_finish(p, b, rank, fin);
#else
  __trap();  // launched on sm_90 and newer only
#endif
}

// ---------------------------------------------------------------------------------------------
// select in one launch (sm_90): one thread-block cluster per segment

// Shorter rows: the one-CTA shared-memory kernel (H100, 8 segments: 13 us at L 8K against 23 us
// for the cluster kernel; at 32K 37 against 25 us, at 128K the multi-launch path 37 against 35).
constexpr int64_t kSelectClusterMinL = 16384;

// Shared memory of select_cluster_kernel: local histogram, this CTA's slice of the summed
// histogram (dynamic), and this CTA's (less, equal) counts of its columns (static).
constexpr size_t kClusterSelectSmem = 2 * kBins * sizeof(uint32_t);

// grid = S * cs CTAs, cluster = cs CTAs (one segment each). CTA r owns the columns
// [r * per, (r + 1) * per) of the segment's row (per a multiple of 4). The threshold key of the
// k-th best valid column is found digit by digit as in allocate_cluster_kernel; then each CTA
// counts its keys below / equal to it, gets the counts of the CTAs before it through
// distributed shared memory, and compacts its columns in order (compact_columns) at those
// offsets. The -1 tail, rows that keep nothing or every valid column, and kept_count are
// written as in the multi-launch path. One launch, no scratch.
template <bool kVec>
__global__ void __launch_bounds__(kPassThreads)
select_cluster_kernel(const RadixParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int BPT = kBins / kPassThreads;
  using Finder = BinFinder<kPassThreads, BPT>;
  __shared__ typename PairScan<kPassThreads>::TempStorage scan_tmp;
  __shared__ int sh_bin;
  __shared__ uint32_t sh_before;
  __shared__ uint32_t sh_cnt[2];
  extern __shared__ __align__(16) char dyn_smem[];
  uint32_t* hist = reinterpret_cast<uint32_t*>(dyn_smem);
  uint32_t* tot = hist + kBins;

  cg::cluster_group cluster = cg::this_cluster();
  const int cs = static_cast<int>(cluster.num_blocks());
  const int rank_in = static_cast<int>(cluster.block_rank());
  const int64_t row = blockIdx.x / cs;
  const int64_t b = row / p.Hk;
  const GroupTask task = group_task<true>(p, b, row);
  const int per = (((p.L + cs - 1) / cs) + 3) / 4 * 4;
  const int c_begin = min(p.L, rank_in * per), c_end = min(p.L, c_begin + per);
  const int lo = max(c_begin, task.ks), hi = c_end;
  int32_t* out = p.kept_idx + row * p.L;
  const float* srow = p.scores + row * p.L;
  const int k = static_cast<int>(task.k);
  for (int i = c_begin + threadIdx.x; i < c_end; i += kPassThreads) {
    if (i >= k) {
      out[i] = -1;
    } else if (!task.active) {
      out[i] = task.ks + i;  // k == L_b: every valid column, in order
    }
  }
  if (rank_in == 0 && threadIdx.x == 0) p.kept_count[row] = k;
  if (!task.active) return;  // uniform over the cluster: no barrier is pending

  const int bins_per = kBins / cs;
  uint32_t prefix = 0, rank = task.k;
#pragma unroll 1
  for (int pass = 0; pass < kPasses; ++pass) {
    for (int i = threadIdx.x; i < kBins; i += kPassThreads) hist[i] = 0;
    __syncthreads();
    if (lo < hi) {
      const int g_end = (hi + 3) >> 2;
      for (int g0 = (lo >> 2) + threadIdx.x; g0 < g_end; g0 += kPassThreads * kPassUnroll) {
        uint32_t key[kPassUnroll][4];
#pragma unroll
        for (int u = 0; u < kPassUnroll; ++u) {
          const int g = g0 + u * kPassThreads;
          if (g < g_end) load_keys4<kVec>(srow, 4 * g, p.L, key[u]);
        }
#pragma unroll
        for (int u = 0; u < kPassUnroll; ++u) {
          const int g = g0 + u * kPassThreads;
          if (g < g_end) hist_add4(hist, key[u], 4 * g, lo, hi, prefix, pass);
        }
      }
    }
    cluster.sync();  // every CTA's histogram of this digit is complete
    for (int j = threadIdx.x; j < bins_per; j += kPassThreads) {
      const int bin = rank_in * bins_per + j;
      uint32_t sum = 0;
#pragma unroll
      for (int q = 0; q < kClusterMax; ++q)
        if (q < cs) sum += cluster.map_shared_rank(hist, static_cast<unsigned>(q))[bin];
      tot[bin] = sum;
    }
    cluster.sync();  // every slice of the summed histogram is complete
    uint32_t cnt[BPT];
    {
      const int first = static_cast<int>(threadIdx.x) * BPT;
      const uint4 v = *reinterpret_cast<const uint4*>(
          cluster.map_shared_rank(tot, static_cast<unsigned>(first / bins_per)) + first);
      cnt[0] = v.x;
      cnt[1] = v.y;
      cnt[2] = v.z;
      cnt[3] = v.w;
    }
    if (threadIdx.x == 0) {
      sh_bin = 0;
      sh_before = 0;
    }
    __syncthreads();
    Finder::run(scan_tmp, cnt, rank, &sh_bin, &sh_before);
    __syncthreads();
    prefix |= static_cast<uint32_t>(sh_bin) << digit_shift(pass);
    rank -= sh_before;
  }
  const uint32_t thr = prefix, need = rank;

  // This CTA's keys below / equal to the threshold, then the counts of the CTAs before it.
  uint32_t nl = 0, ne = 0;
  if (lo < hi) {
    const int g_end = (hi + 3) >> 2;
    for (int g = (lo >> 2) + threadIdx.x; g < g_end; g += kPassThreads) {
      uint32_t key[4];
      load_keys4<kVec>(srow, 4 * g, p.L, key);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = 4 * g + j;
        if (c >= lo && c < hi) {
          nl += key[j] < thr ? 1u : 0u;
          ne += key[j] == thr ? 1u : 0u;
        }
      }
    }
  }
  uint32_t el, ee, tl, te;
  __syncthreads();  // scan_tmp is free again
  PairScan<kPassThreads>::run(scan_tmp, nl, ne, el, ee, tl, te);
  if (threadIdx.x == 0) {
    sh_cnt[0] = tl;
    sh_cnt[1] = te;
  }
  cluster.sync();  // every CTA's counts are written
  uint32_t run_less = 0, run_eq = 0;
  for (int q = 0; q < rank_in; ++q) {
    const uint32_t* c = cluster.map_shared_rank(sh_cnt, static_cast<unsigned>(q));
    run_less += c[0];
    run_eq += c[1];
  }
  cluster.sync();  // every CTA has read its predecessors: the counts may go away
  __syncthreads();
  if (lo < hi)
    compact_columns<kPassThreads, /*IPT=*/8, false, kVec>(
        scan_tmp, nullptr, srow, p.L, lo, hi, thr, need, static_cast<uint32_t>(k), run_less,
        run_eq, out);
#else
  __trap();  // launched on sm_90 and newer only
#endif
}

// ---------------------------------------------------------------------------------------------
// host helpers

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

bool scores_vectorizable(const Tensor& scores, int64_t L) {
  return L % 4 == 0 && reinterpret_cast<uintptr_t>(scores.data_ptr()) % 16 == 0;
}

// Columns per CTA of the multi-CTA passes: about two CTAs per SM over all rows.
int64_t pass_chunk(int64_t rows, int64_t L, int device) {
  const int64_t target = 2 * static_cast<int64_t>(num_sms(device));
  const int64_t per = (rows * L + target - 1) / target;
  return std::clamp<int64_t>(round_up(per, kPassChunkQuantum), kPassChunkQuantum,
                             8 * kPassChunkQuantum);
}

int64_t select_smem_max_L() {
  if (const char* env = std::getenv("ADAKV_SELECT_SMEM_MAX_L")) return std::atoll(env);
  return 32768;
}

struct PassScratch {
  Tensor buf;
  uint32_t *hist, *ticket, *state, *less, *chunk_counts;
};

// One zero-filled buffer (one memset) for every scratch array of the passes; the histograms
// come first (16-byte aligned uint4 reads).
PassScratch make_scratch(const Tensor& like, const char* op, int64_t rows, int64_t groups,
                         int64_t chunks, bool allocate) {
  const int64_t n_hist = checked_mul(int64_t{kPasses} * kBins, rows, "B * Hk");
  const int64_t n_ticket = kPasses * groups;
  const int64_t n_state = 2 * groups;
  const int64_t n_row = allocate ? rows : 0;
  const int64_t n_chunk = allocate ? 0 : checked_mul(2 * rows, chunks, "B * Hk * L");
  const int64_t n = checked_add(
      checked_add(checked_add(n_hist, n_ticket, "B * Hk"), n_state + n_row, "B * Hk"), n_chunk,
      "B * Hk * L");
  PassScratch s{new_zeros(op, "the radix-select scratch", like, {n}, kInt)};
  uint32_t* base = ptr<uint32_t>(s.buf);
  s.hist = base;
  s.ticket = s.hist + n_hist;
  s.state = s.ticket + n_ticket;
  s.less = s.state + n_state;
  s.chunk_counts = s.less + n_row;
  return s;
}

template <bool kSelect, bool kVec>
void launch_passes(const RadixParams& p, size_t smem, cudaStream_t stream) {
  const int64_t grid = p.rows * p.chunks;
  ADAKV_CHECK(grid <= std::numeric_limits<int32_t>::max(), "adakv: scores are too large");
  radix_pass_kernel<0, kSelect, kVec><<<grid, kPassThreads, smem, stream>>>(p);
  ADAKV_LAUNCH_CHECK();
  radix_pass_kernel<1, kSelect, kVec><<<grid, kPassThreads, smem, stream>>>(p);
  ADAKV_LAUNCH_CHECK();
  radix_pass_kernel<2, kSelect, kVec><<<grid, kPassThreads, smem, stream>>>(p);
  ADAKV_LAUNCH_CHECK();
}

// Cluster size of allocate_cluster_kernel / select_cluster_kernel on this device (a power of
// two; 0: not available: device or binary older than sm_90, or no cluster of 2 fits).
// Configured once per device.
int allocate_cluster_size(int device) {
  return config_once_per_device(device, [](int device) {
    return pow2_cluster_size(device, kPassThreads, cluster_alloc_smem(kClusterMaxHk), kClusterMax,
                             allocate_cluster_kernel<true>, allocate_cluster_kernel<false>);
  });
}

int select_cluster_size(int device) {
  return config_once_per_device(device, [](int device) {
    return pow2_cluster_size(device, kPassThreads, kClusterSelectSmem, kClusterMax,
                             select_cluster_kernel<true>, select_cluster_kernel<false>);
  });
}

void check_cuda(const Tensor& t, const char* op) {
  ADAKV_CHECK(t.is_cuda(), "adakv: ", op, " CUDA kernel called with a tensor on ",
              device_str(t));
}

}  // namespace

Tensor allocate(const Tensor& scores, int64_t budget, double floor_alpha, bool adaptive,
                std::string_view rounding, const OptTensor& key_start) {
  validate_scores(scores, key_start);
  validate_budget_args(budget, floor_alpha);
  const Rounding round = parse_rounding(std::string(rounding));
  check_cuda(scores, "allocate");
  const DeviceGuard guard(scores.get_device_index());
  const int64_t B = scores.size(0), Hk = scores.size(1), L = scores.size(2);
  // Sizes (SPEC section 9), checked before any kernel: the radix rank K = Hk * budget and the
  // counts (<= Hk * L) are uint32 on the device, K and every budget written (<= K) are int32;
  // L < 2^30 keeps column arithmetic in int.
  ADAKV_CHECK(L < (int64_t{1} << 30), "adakv: allocate is not implemented for CUDA with L >= 2^30");
  ADAKV_CHECK(Hk * L < (int64_t{1} << 32), "adakv: allocate (CUDA): Hk * L must be < 2^32, got ",
              Hk, " * ", L);
  ADAKV_CHECK(budget <= std::numeric_limits<int32_t>::max() / std::max<int64_t>(Hk, 1),
              "adakv: allocate (CUDA): budget * Hk must fit in int32, got budget ", budget,
              " with Hk = ", Hk);
  ADAKV_CHECK(Hk <= 4096, "adakv: allocate is not implemented for CUDA with more than 4096 KV "
              "heads, got ", Hk);
  const int64_t C = budget;
  // No row is evicted (or every evicted row gets 0 = C): budgets = C without a kernel.
  if (!adaptive || C == 0 || L <= C || B * Hk == 0) {
    Tensor full = new_empty("allocate", "budgets", scores, {B, Hk}, kInt);
    if (B * Hk > 0) torch::stable::fill_(full, static_cast<double>(C));  // exact: C < 2^31
    return full;
  }

  Tensor out = new_empty("allocate", "budgets", scores, {B, Hk}, kInt);
  const cudaStream_t stream = current_stream(scores);
  RadixParams p{};
  p.rows = B * Hk;
  p.L = static_cast<int>(L);
  // sm_90: one launch, one thread-block cluster per batch row, for rows of at most
  // kClusterMaxRowElems scores (one cluster's SMs stream longer rows slower than the
  // multi-launch passes: H100, Hk 8, B 1: 23 vs 31 us at L 8K, 37 vs 31 us at 32K, 88 vs 35 us
  // at 128K). ADAKV_ALLOCATE_CLUSTER=0 / 1: off / on at any length (tests); more than
  // kClusterMaxHk heads always take the multi-launch passes.
  const char* cl_env = std::getenv("ADAKV_ALLOCATE_CLUSTER");
  const bool cl_off = cl_env != nullptr && std::string(cl_env) == "0";
  const bool cl_force = cl_env != nullptr && std::string(cl_env) == "1";
  const int cs = (Hk <= kClusterMaxHk && !cl_off && (cl_force || Hk * L <= kClusterMaxRowElems))
                     ? allocate_cluster_size(scores.get_device_index())
                     : 0;
  if (cs >= 2) {
    ADAKV_CHECK(B * cs <= std::numeric_limits<int32_t>::max(), "adakv: scores are too large");
    p.scores = ptr<float>(scores);
    p.key_start = ptr<int32_t>(key_start);
    p.out = ptr<int32_t>(out);
    p.C = C;
    p.alpha = floor_alpha;
    p.Hk = static_cast<int>(Hk);
    p.official = round == Rounding::kOfficial;
    ADAKV_BOOL_SWITCH(scores_vectorizable(scores, L), kVec, [&] {
      launch_ex(allocate_cluster_kernel<kVec>, B * cs, kPassThreads,
                cluster_alloc_smem(static_cast<int>(Hk)), stream, LaunchOpts{cs, false}, p);
    });
    return out;
  }
  p.chunk = static_cast<int>(pass_chunk(B * Hk, L, scores.get_device_index()));
  p.chunks = static_cast<int>((L + p.chunk - 1) / p.chunk);
  PassScratch scratch = make_scratch(scores, "allocate", B * Hk, B, p.chunks, /*allocate=*/true);
  p.scores = ptr<float>(scores);
  p.key_start = ptr<int32_t>(key_start);
  p.out = ptr<int32_t>(out);
  p.hist = scratch.hist;
  p.ticket = scratch.ticket;
  p.state = scratch.state;
  p.less = scratch.less;
  p.C = C;
  p.alpha = floor_alpha;
  p.Hk = static_cast<int>(Hk);
  p.official = round == Rounding::kOfficial;
  // AllocateSmem: [Hk] doubles and 2 x [Hk] uint32 (<= 64 KB for Hk <= 4096)
  const size_t smem = static_cast<size_t>(Hk) * (sizeof(double) + 2 * sizeof(uint32_t));
  ADAKV_BOOL_SWITCH(scores_vectorizable(scores, L), kVec, [&] {
    set_smem(radix_pass_kernel<0, false, kVec>, smem);
    set_smem(radix_pass_kernel<1, false, kVec>, smem);
    set_smem(radix_pass_kernel<2, false, kVec>, smem);
    launch_passes<false, kVec>(p, smem, stream);
  });
  return out;
}

std::tuple<Tensor, Tensor> select(const Tensor& scores, const Tensor& budgets,
                                  const OptTensor& key_start) {
  validate_scores(scores, key_start);
  validate_budgets(budgets, scores);
  check_cuda(scores, "select");
  const DeviceGuard guard(scores.get_device_index());
  const int64_t B = scores.size(0), Hk = scores.size(1), L = scores.size(2);
  ADAKV_CHECK(L < (int64_t{1} << 30), "adakv: select is not implemented for CUDA with L >= 2^30");
  const int64_t S = B * Hk;
  Tensor kept_idx = new_empty("select", "kept_idx", scores, {B, Hk, L}, kInt);
  if (S == 0 || L == 0)  // nothing to select: kept_count is 0
    return {kept_idx, new_zeros("select", "kept_count", scores, {B, Hk}, kInt)};
  Tensor kept_count = new_empty("select", "kept_count", scores, {B, Hk}, kInt);
  ADAKV_CHECK(S <= std::numeric_limits<int32_t>::max(), "adakv: select: B * Hk = ", S,
              " segments; at most 2^31 - 1 are supported");

  const cudaStream_t stream = current_stream(scores);
  const bool vec = scores_vectorizable(scores, L);
  // sm_90: one launch, one thread-block cluster per segment, when a segment row is long enough
  // to keep the cluster busy (ADAKV_SELECT_CLUSTER=0: the paths below; =1: any length).
  const char* cl_env = std::getenv("ADAKV_SELECT_CLUSTER");
  const bool cl_off = cl_env != nullptr && std::string(cl_env) == "0";
  const bool cl_force = cl_env != nullptr && std::string(cl_env) == "1";
  const int cs = cl_off ? 0 : select_cluster_size(scores.get_device_index());
  if (cs >= 2 && (cl_force || L >= kSelectClusterMinL)) {
    ADAKV_CHECK(S * cs <= std::numeric_limits<int32_t>::max(), "adakv: select: too many segments");
    RadixParams p{};
    p.rows = S;
    p.L = static_cast<int>(L);
    p.scores = ptr<float>(scores);
    p.key_start = ptr<int32_t>(key_start);
    p.budgets = ptr<int32_t>(budgets);
    p.kept_idx = ptr<int32_t>(kept_idx);
    p.kept_count = ptr<int32_t>(kept_count);
    p.Hk = static_cast<int>(Hk);
    ADAKV_BOOL_SWITCH(vec, kVec, [&] {
      launch_ex(select_cluster_kernel<kVec>, S * cs, kPassThreads, kClusterSelectSmem, stream,
                LaunchOpts{cs, false}, p);
    });
    return {kept_idx, kept_count};
  }
  int max_smem = 0;
  ADAKV_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        scores.get_device_index()));
  const size_t smem = static_cast<size_t>(round_up(L, 4) + kBins) * sizeof(uint32_t);
  // (the static shared memory of select_smem_kernel is a few hundred bytes)
  if (L <= select_smem_max_L() && smem + 1024 <= static_cast<size_t>(max_smem)) {
    SelectParams sp{};
    sp.scores = ptr<float>(scores);
    sp.key_start = ptr<int32_t>(key_start);
    sp.budgets = ptr<int32_t>(budgets);
    sp.kept_idx = ptr<int32_t>(kept_idx);
    sp.kept_count = ptr<int32_t>(kept_count);
    sp.L = static_cast<int>(L);
    sp.Hk = static_cast<int>(Hk);
    ADAKV_BOOL_SWITCH(vec, kVec, [&] {
      auto kernel = select_smem_kernel<kVec>;
      set_smem(kernel, smem);
      kernel<<<S, kSmemThreads, smem, stream>>>(sp);
      ADAKV_LAUNCH_CHECK();
    });
    return {kept_idx, kept_count};
  }

  RadixParams p{};
  p.rows = S;
  p.L = static_cast<int>(L);
  p.chunk = static_cast<int>(pass_chunk(S, L, scores.get_device_index()));
  p.chunks = static_cast<int>((L + p.chunk - 1) / p.chunk);
  PassScratch scratch = make_scratch(scores, "select", S, S, p.chunks, /*allocate=*/false);
  p.scores = ptr<float>(scores);
  p.key_start = ptr<int32_t>(key_start);
  p.budgets = ptr<int32_t>(budgets);
  p.kept_idx = ptr<int32_t>(kept_idx);
  p.kept_count = ptr<int32_t>(kept_count);
  p.hist = scratch.hist;
  p.ticket = scratch.ticket;
  p.state = scratch.state;
  p.chunk_counts = scratch.chunk_counts;
  p.Hk = static_cast<int>(Hk);
  const int64_t grid = S * p.chunks;
  ADAKV_BOOL_SWITCH(vec, kVec, [&] {
    launch_passes<true, kVec>(p, 0, stream);
    select_count_kernel<kVec><<<grid, kPassThreads, 0, stream>>>(p);
    ADAKV_LAUNCH_CHECK();
    select_write_kernel<kVec><<<grid, kPassThreads, 0, stream>>>(p);
    ADAKV_LAUNCH_CHECK();
  });
  return {kept_idx, kept_count};
}

}  // namespace cuda
}  // namespace adakv
