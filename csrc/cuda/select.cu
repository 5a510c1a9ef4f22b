// CUDA kernels of adakv::select (segmented top-k). Integer outputs are identical to the CPU
// kernel (csrc/cpu/topk.cpp) on every input.
//
// select(scores [B, Hk, L], budgets [B, Hk]) -> kept_idx [B, Hk, L], kept_count [B, Hk]
//   Per segment s = b * Hk + h: k = clamp(budgets[s], 0, L_b); the threshold of the k-th best
//   key over the valid columns [ks_b, L) (the radix select of radix_select.cuh), then an
//   ordered stream compaction (block-wide scan of the (#less, #equal) counts per tile,
//   compact_columns) writes the kept token indices ascending, then -1.
//   * L <= select_smem_max_L() (default 32768, env ADAKV_SELECT_SMEM_MAX_L overrides it for
//     tests) and the row fits in shared memory: one kernel (select_smem_kernel), one CTA of
//     1024 threads per segment keeps the segment's keys in shared memory and runs the three
//     digits and the compaction on them.
//   * sm_90 and L >= 16384 (the default there): one launch, one thread-block cluster (16 CTAs
//     on an H100) per segment: the digits with histograms summed through distributed shared
//     memory, then an ordered compaction of each CTA's columns at the offsets of the CTAs
//     before it (select_cluster_kernel). ADAKV_SELECT_CLUSTER=0 / 1 turns it off / on for
//     every length (tests).
//   * longer rows: grid = B * Hk * chunks CTAs of 512 threads for every launch. The three
//     digit launches (radix_passes.cuh with SelectPasses: groups of one row; pass 0 also writes
//     the -1 tail and the segments that need no threshold, k == 0 or k == L_b), then
//     select_count_kernel (keys below / equal to the threshold per chunk) and
//     select_write_kernel (each chunk compacted at the offset given by the chunks before it).
//
// Order (SPEC sections 2 and 9): every comparison of scores is a comparison of
// descending_key(score): higher score first, -0.0 == +0.0, every NaN last (key 0xffffffff,
// below -inf), ties to the lower token. No path compares floats directly. Columns outside
// [ks_b, L) are excluded by their column index (radix_select.cuh, and the counts here).
// No host syncs; launch shapes depend on tensor shapes only (CUDA-graph capturable). Stable ABI
// only (csrc/torch_api.h, cuda/common.cuh).

#include <cooperative_groups.h>

#include <cstdlib>
#include <limits>
#include <tuple>

#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/launch.cuh"
#include "cuda/radix_passes.cuh"
#include "cuda/radix_select.cuh"
#include "ops.h"

namespace adakv {
namespace cuda {
namespace {

using namespace radix;

constexpr int kSmemThreads = 1024;      // select_smem_kernel
constexpr int kSmemItems = 8;
constexpr int kWriteItems = 8;          // select_write_kernel (kPassThreads threads)

// Whether segment `row` needs a radix select (0 < k < L_b) and its kept count k.
__device__ __forceinline__ GroupTask select_task(const RadixParams& p, int64_t b, int64_t row) {
  GroupTask t;
  t.ks = clamp_start(p.key_start, b, p.L);
  const int Lb = p.L - t.ks;
  const int k = min(max(p.budgets[row], 0), Lb);  // bounds: budgets clamped to [0, L_b]
  t.active = k > 0 && k < Lb;
  t.k = static_cast<uint32_t>(k);
  return t;
}

// The parts of kept_idx that need no threshold, for the columns [c_begin, c_end) of segment
// `row` (the CTA's share): -1 at positions >= k, and the whole row of a segment that keeps
// every valid column (k == L_b; nothing more for k == 0). Block-wide (BLOCK threads).
template <int BLOCK>
__device__ __forceinline__ void write_untouched(const RadixParams& p, const GroupTask& task,
                                                int64_t row, int c_begin, int c_end) {
  int32_t* out = p.kept_idx + row * p.L;
  const int k = static_cast<int>(task.k);
  for (int i = c_begin + threadIdx.x; i < c_end; i += BLOCK) {
    if (i >= k) {
      out[i] = -1;
    } else if (!task.active) {
      out[i] = task.ks + i;  // k == L_b: every valid column, in order
    }
  }
}

// ---------------------------------------------------------------------------------------------
// long rows: select's part of radix_pass_kernel (radix_passes.cuh), then count and write

struct SelectPasses {
  static constexpr bool kGroupIsRow = true;  // a group is one segment

  __device__ __forceinline__ static GroupTask task(const RadixParams& p, int64_t b, int64_t row) {
    return select_task(p, b, row);
  }

  // Pass 0: the -1 tail, segments that keep nothing or every valid column, kept_count.
  template <int PASS>
  __device__ __forceinline__ static void start(const RadixParams& p, const GroupTask& task, const ChunkSlice& cs,
                               int64_t row) {
    if constexpr (PASS == 0) {
      write_untouched<kPassThreads>(p, task, row, cs.c_begin, cs.c_end);
      if (cs.chunk == 0 && threadIdx.x == 0) p.kept_count[row] = static_cast<int>(task.k);
    }
  }

  // The state of every digit is kept: after the last one it is (threshold, need), read by
  // select_count_kernel and select_write_kernel.
  template <int PASS>
  __device__ __forceinline__ static bool after_digit(const RadixParams&, int64_t, int64_t, const uint32_t*, int,
                                     uint32_t, char*) {
    return true;
  }
};

// select, long rows, after the passes: keys below / equal to the threshold in each chunk.
template <bool kVec>
__global__ void __launch_bounds__(kPassThreads)
select_count_kernel(const RadixParams p) {
  __shared__ typename PairScan<kPassThreads>::TempStorage tmp;
  const int64_t row = blockIdx.x / p.chunks;
  const GroupTask task = select_task(p, row / p.Hk, row);
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
  const GroupTask task = select_task(p, row / p.Hk, row);
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
// rows that fit in shared memory: one CTA per segment does everything

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
  using Finder = DigitFinder<BLOCK, BPT>;
  __shared__ typename Finder::TempStorage tmp;
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
  // (the first digit's barrier after zeroing the histogram also orders the key stores above)
  const auto add = [&](uint32_t* h, uint32_t prefix, int pass) {
    for (int g = g_begin + threadIdx.x; g < g_end; g += BLOCK) {
      const uint4 v = reinterpret_cast<const uint4*>(keys)[g];
      const uint32_t key[4] = {v.x, v.y, v.z, v.w};
      hist_add4(h, key, 4 * g, ks, L, prefix, pass);
    }
  };
  uint32_t prefix = 0, rank = static_cast<uint32_t>(k);
  radix_select<Finder>(tmp, hist, prefix, rank, add, LocalSum<BPT>{});
  compact_columns<BLOCK, kSmemItems, true, kVec>(tmp.scan, keys, srow, L, ks, L, prefix,
                                                 min(rank, static_cast<uint32_t>(k)),
                                                 static_cast<uint32_t>(k), 0u, 0u, out);
}

// ---------------------------------------------------------------------------------------------
// one launch (sm_90): one thread-block cluster per segment

// Shorter rows: the one-CTA shared-memory kernel (H100, 8 segments: 13 us at L 8K against 23 us
// for the cluster kernel; at 32K 37 against 25 us, at 128K the multi-launch path 37 against 35).
constexpr int64_t kSelectClusterMinL = 16384;

// Shared memory of select_cluster_kernel: local histogram, this CTA's slice of the summed
// histogram (dynamic), and this CTA's (less, equal) counts of its columns (static).
constexpr size_t kClusterSelectSmem = 2 * kBins * sizeof(uint32_t);

// grid = S * cs CTAs, cluster = cs CTAs (one segment each). CTA r owns the columns
// [r * per, (r + 1) * per) of the segment's row (per a multiple of 4). The threshold key of the
// k-th best valid column is found digit by digit (radix_select with ClusterSum, as in
// allocate_cluster_kernel); then each CTA counts its keys below / equal to it, gets the counts
// of the CTAs before it through distributed shared memory, and compacts its columns in order
// (compact_columns) at those offsets. The -1 tail, rows that keep nothing or every valid
// column, and kept_count are written as in the multi-launch path. One launch, no scratch.
template <bool kVec>
__global__ void __launch_bounds__(kPassThreads)
select_cluster_kernel(const RadixParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  __shared__ typename PassFinder::TempStorage tmp;
  __shared__ uint32_t sh_cnt[2];
  extern __shared__ __align__(16) char dyn_smem[];
  uint32_t* hist = reinterpret_cast<uint32_t*>(dyn_smem);
  uint32_t* tot = hist + kBins;

  cg::cluster_group cluster = cg::this_cluster();
  const int cs = static_cast<int>(cluster.num_blocks());
  const int rank_in = static_cast<int>(cluster.block_rank());
  const int64_t row = blockIdx.x / cs;
  const int64_t b = row / p.Hk;
  const GroupTask task = select_task(p, b, row);
  const int per = (((p.L + cs - 1) / cs) + 3) / 4 * 4;
  const int c_begin = min(p.L, rank_in * per), c_end = min(p.L, c_begin + per);
  const int lo = max(c_begin, task.ks), hi = c_end;
  int32_t* out = p.kept_idx + row * p.L;
  const float* srow = p.scores + row * p.L;
  const int k = static_cast<int>(task.k);
  write_untouched<kPassThreads>(p, task, row, c_begin, c_end);
  if (rank_in == 0 && threadIdx.x == 0) p.kept_count[row] = k;
  if (!task.active) return;  // uniform over the cluster: no barrier is pending

  const auto add = [&](uint32_t* h, uint32_t prefix, int pass) {
    hist_add_columns<kPassThreads, kPassUnroll, kVec>(h, srow, p.L, lo, hi, prefix, pass);
  };
  uint32_t prefix = 0, rank = task.k;
  radix_select<PassFinder>(tmp, hist, prefix, rank, add,
                                  ClusterSum<kPassThreads, cg::cluster_group>{cluster, tot, cs,
                                                                             rank_in});
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
  __syncthreads();  // tmp is free again
  PairScan<kPassThreads>::run(tmp.scan, nl, ne, el, ee, tl, te);
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
        tmp.scan, nullptr, srow, p.L, lo, hi, thr, need, static_cast<uint32_t>(k), run_less,
        run_eq, out);
#else
  __trap();  // launched on sm_90 and newer only
#endif
}

// ---------------------------------------------------------------------------------------------
// host helpers

int64_t select_smem_max_L() {
  if (const char* env = std::getenv("ADAKV_SELECT_SMEM_MAX_L")) return std::atoll(env);
  return 32768;
}

// Cluster size of select_cluster_kernel on this device (a power of two; 0: not available).
int select_cluster_size(int device) {
  return config_once_per_device(device, [](int device) {
    return pow2_cluster_size(device, kPassThreads, kClusterSelectSmem, kClusterMax,
                             select_cluster_kernel<true>, select_cluster_kernel<false>);
  });
}

}  // namespace

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
  const EnvOverride cl_env = env_override("ADAKV_SELECT_CLUSTER");
  const int cs = cl_env == EnvOverride::kOff ? 0 : select_cluster_size(scores.get_device_index());
  RadixParams p{};  // the cluster kernel and the multi-CTA passes
  p.rows = S;
  p.L = static_cast<int>(L);
  p.scores = ptr<float>(scores);
  p.key_start = ptr<int32_t>(key_start);
  p.budgets = ptr<int32_t>(budgets);
  p.kept_idx = ptr<int32_t>(kept_idx);
  p.kept_count = ptr<int32_t>(kept_count);
  p.Hk = static_cast<int>(Hk);
  if (cs >= 2 && (cl_env == EnvOverride::kOn || L >= kSelectClusterMinL)) {
    ADAKV_CHECK(S * cs <= std::numeric_limits<int32_t>::max(), "adakv: select: too many segments");
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

  p.chunk = static_cast<int>(pass_chunk(S, L, scores.get_device_index()));
  p.chunks = static_cast<int>((L + p.chunk - 1) / p.chunk);
  PassScratch scratch = make_scratch(scores, "select", S, S, p.chunks, /*allocate=*/false);
  p.hist = scratch.hist;
  p.ticket = scratch.ticket;
  p.state = scratch.state;
  p.chunk_counts = scratch.chunk_counts;
  const int64_t grid = S * p.chunks;
  ADAKV_BOOL_SWITCH(vec, kVec, [&] {
    launch_passes<SelectPasses, kVec>(p, 0, stream);
    select_count_kernel<kVec><<<grid, kPassThreads, 0, stream>>>(p);
    ADAKV_LAUNCH_CHECK();
    select_write_kernel<kVec><<<grid, kPassThreads, 0, stream>>>(p);
    ADAKV_LAUNCH_CHECK();
  });
  return {kept_idx, kept_count};
}

}  // namespace cuda
}  // namespace adakv
