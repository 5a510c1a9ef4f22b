// CUDA kernels of adakv::allocate (Ada-KV budget allocation). Integer outputs are identical to
// the CPU kernel (csrc/cpu/topk.cpp) on every input.
//
// allocate(scores [B, Hk, L] fp32) -> budgets [B, Hk] int32
//   Per batch row b (a "group" of Hk score rows): the K-th best key, K = Hk * C, over the
//   valid columns [ks_b, L) of all heads (the radix select of radix_select.cuh); head h's count
//   c_h = its keys better than the threshold plus its share of the equal ones (taken in head
//   order), then the safeguard and the exact (largest remainder) or official rounding of
//   allocation_rules.h (allocate_finish). Rows that are not evicted get C.
//   * Multi-CTA (radix_passes.cuh with AllocatePasses): grid = B * Hk * chunks CTAs of
//     kPassThreads threads, one launch per digit; the last CTA of the row also accumulates the
//     per-head "less" counts and, after the last digit, runs allocate_finish. Counts are
//     order-independent, so results are deterministic although CTAs finish in any order.
//   * sm_90, Hk <= 256, Hk * L <= 2^17 (the default there): the same digits in ONE launch, one
//     thread-block cluster (16 CTAs on an H100) per batch row, histograms summed through
//     distributed shared memory (allocate_cluster_kernel); no scratch, no memset.
//     ADAKV_ALLOCATE_CLUSTER=0 / 1 turns it off / on at any size (tests).
//
// Order (SPEC sections 2 and 9): every comparison of scores is a comparison of
// descending_key(score): higher score first, -0.0 == +0.0, every NaN last (key 0xffffffff,
// below -inf), ties to the lower head, then the lower token. No path compares floats directly.
// Columns outside [ks_b, L) are excluded by their column index (radix_select.cuh).
// No host syncs; launch shapes depend on tensor shapes only (CUDA-graph capturable). Stable ABI
// only (csrc/torch_api.h, cuda/common.cuh).

#include <cooperative_groups.h>
#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string_view>

#include "allocation_rules.h"
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

constexpr int kClusterMaxHk = 256;   // more heads: the multi-launch passes
constexpr int64_t kClusterMaxRowElems = int64_t{1} << 17;  // Hk * L per batch row

// Whether batch row b needs a radix select and its rank: rows with L_b > C (C >= 1 and
// adaptive, the host handles the rest), K = Hk * C < Hk * L_b.
__device__ __forceinline__ GroupTask allocate_task(const RadixParams& p, int64_t b) {
  GroupTask t;
  t.ks = clamp_start(p.key_start, b, p.L);
  const int Lb = p.L - t.ks;
  t.active = Lb > p.C;
  t.k = static_cast<uint32_t>(p.C * p.Hk);
  return t;
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

// Final step of allocate for row b, run by one CTA: per-head counts c_h, safeguard and
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

// ---------------------------------------------------------------------------------------------
// multi-CTA passes: allocate's part of radix_pass_kernel (radix_passes.cuh)

struct AllocatePasses {
  static constexpr bool kGroupIsRow = false;  // a group is a batch row of Hk score rows

  __device__ __forceinline__ static GroupTask task(const RadixParams& p, int64_t b, int64_t /*row*/) {
    return allocate_task(p, b);
  }

  // Rows that are not evicted get C (written once, by the first CTA of head 0).
  template <int PASS>
  __device__ __forceinline__ static void start(const RadixParams& p, const GroupTask& task, const ChunkSlice& cs,
                               int64_t row) {
    const int64_t b = row / p.Hk;
    const int h = static_cast<int>(row % p.Hk);
    if (!task.active && PASS == 0 && h == 0 && cs.chunk == 0)
      for (int i = threadIdx.x; i < p.Hk; i += kPassThreads)
        p.out[b * p.Hk + i] = static_cast<int32_t>(p.C);
  }

  // Per head: keys of the lower bins are below the threshold (all taken, accumulated in
  // p.less over the digits); last digit: keys of the threshold's bin are equal to it, then
  // allocate_finish. dyn_smem: AllocateSmem.
  template <int PASS>
  __device__ __forceinline__ static bool after_digit(const RadixParams& p, int64_t b, int64_t r0,
                                     const uint32_t* ghist, int bin, uint32_t rank,
                                     char* dyn_smem) {
    constexpr int BPT = 4;  // bins per thread
    const uint4* gbins = reinterpret_cast<const uint4*>(ghist) + threadIdx.x;
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
      allocate_finish(p, b, rank, sm);
      return false;  // done: no later launch
    }
    return true;
  }
};

// ---------------------------------------------------------------------------------------------
// allocate in one launch (sm_90): one thread-block cluster per batch row

// Dynamic shared memory of allocate_cluster_kernel: local histogram, this CTA's slice of the
// cluster-summed histogram, per-head counts of this CTA (less / equal to the threshold), and
// the AllocateSmem of the finishing CTA.
__host__ __device__ constexpr size_t cluster_alloc_smem(int Hk) {
  return 2 * kBins * sizeof(uint32_t) + 2 * static_cast<size_t>(Hk) * sizeof(uint32_t) +
         static_cast<size_t>(Hk) * (sizeof(double) + 2 * sizeof(uint32_t));
}

// grid = B * cs CTAs, cluster = cs CTAs (one batch row each). CTA `r` of the cluster owns the
// float4 groups [r * per, (r + 1) * per) of the row's Hk x ceil(L / 4) groups. Per digit
// (radix_select with ClusterSum): the CTA histograms its keys that match the prefix in shared
// memory, the histograms are summed over the cluster and every CTA finds the same digit. After
// the last digit the threshold key and the number of equal keys to take are known; one more
// sweep counts per head the keys below / equal to it, and CTA 0 sums those over the cluster
// and runs allocate_finish. Same result as the multi-launch passes (counts are
// order-independent), one launch, no scratch.
template <bool kVec>
__global__ void __launch_bounds__(kPassThreads)
allocate_cluster_kernel(const RadixParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  __shared__ typename PassFinder::TempStorage find_tmp;
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
  const GroupTask task = allocate_task(p, b);  // same for every head of row b
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

  // The CTA's float4 groups of the row's heads (cs divides kBins: a power of two <= 16).
  const auto add = [&](uint32_t* h_local, uint32_t prefix, int pass) {
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
          hist_add4(h_local, key[u], col[u], task.ks, p.L, prefix, pass);
      }
    }
  };
  uint32_t prefix = 0, rank = task.k;
  radix_select<PassFinder>(find_tmp, hist, prefix, rank, add,
                                  ClusterSum<kPassThreads, cg::cluster_group>{cluster, tot, cs,
                                                                             rank_in});

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

// Cluster size of allocate_cluster_kernel on this device (a power of two; 0: not available).
int allocate_cluster_size(int device) {
  return config_once_per_device(device, [](int device) {
    return pow2_cluster_size(device, kPassThreads, cluster_alloc_smem(kClusterMaxHk), kClusterMax,
                             allocate_cluster_kernel<true>, allocate_cluster_kernel<false>);
  });
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
  p.scores = ptr<float>(scores);
  p.key_start = ptr<int32_t>(key_start);
  p.out = ptr<int32_t>(out);
  p.C = C;
  p.alpha = floor_alpha;
  p.Hk = static_cast<int>(Hk);
  p.official = round == Rounding::kOfficial;
  // sm_90: one launch, one thread-block cluster per batch row, for rows of at most
  // kClusterMaxRowElems scores (one cluster's SMs stream longer rows slower than the
  // multi-launch passes: H100, Hk 8, B 1: 23 vs 31 us at L 8K, 37 vs 31 us at 32K, 88 vs 35 us
  // at 128K). ADAKV_ALLOCATE_CLUSTER=0 / 1: off / on at any length (tests); more than
  // kClusterMaxHk heads always take the multi-launch passes.
  const EnvOverride cl_env = env_override("ADAKV_ALLOCATE_CLUSTER");
  const int cs = (Hk <= kClusterMaxHk && cl_env != EnvOverride::kOff &&
                  (cl_env == EnvOverride::kOn || Hk * L <= kClusterMaxRowElems))
                     ? allocate_cluster_size(scores.get_device_index())
                     : 0;
  if (cs >= 2) {
    ADAKV_CHECK(B * cs <= std::numeric_limits<int32_t>::max(), "adakv: scores are too large");
    ADAKV_BOOL_SWITCH(scores_vectorizable(scores, L), kVec, [&] {
      launch_ex(allocate_cluster_kernel<kVec>, B * cs, kPassThreads,
                cluster_alloc_smem(static_cast<int>(Hk)), stream, LaunchOpts{cs, false}, p);
    });
    return out;
  }
  p.chunk = static_cast<int>(pass_chunk(B * Hk, L, scores.get_device_index()));
  p.chunks = static_cast<int>((L + p.chunk - 1) / p.chunk);
  PassScratch scratch = make_scratch(scores, "allocate", B * Hk, B, p.chunks, /*allocate=*/true);
  p.hist = scratch.hist;
  p.ticket = scratch.ticket;
  p.state = scratch.state;
  p.less = scratch.less;
  // AllocateSmem: [Hk] doubles and 2 x [Hk] uint32 (<= 64 KB for Hk <= 4096)
  const size_t smem = static_cast<size_t>(Hk) * (sizeof(double) + 2 * sizeof(uint32_t));
  ADAKV_BOOL_SWITCH(scores_vectorizable(scores, L), kVec, [&] {
    set_smem(radix_pass_kernel<0, AllocatePasses, kVec>, smem);
    set_smem(radix_pass_kernel<1, AllocatePasses, kVec>, smem);
    set_smem(radix_pass_kernel<2, AllocatePasses, kVec>, smem);
    launch_passes<AllocatePasses, kVec>(p, smem, stream);
  });
  return out;
}

}  // namespace cuda
}  // namespace adakv
