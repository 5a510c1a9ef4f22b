// The multi-CTA radix select of adakv::allocate (allocate.cu) and of adakv::select for long
// rows (select.cu): one launch per digit, grid = B * Hk * chunks CTAs of kPassThreads threads
// (radix_pass_kernel<PASS, Op, kVec>), and the host side shared by both ops (launch
// parameters, scratch, chunk size, the three launches).
//
// A "group" is the set of score rows [B * Hk, L] fp32 that one select ranks together: a batch
// row of Hk heads (allocate, K = Hk * C) or one segment b * Hk + h (select, K = k). Each CTA
// histograms its chunk of one score row in shared memory and adds it into a global per-row
// histogram (atomics); the last CTA of the group (atomic ticket) sums the group's rows, finds
// the digit (radix_digit, radix_select.cuh) and writes the group's state (prefix, remaining
// rank) for the next launch. Counts are order-independent, so results are deterministic
// although CTAs finish in any order.
//
// Op (AllocatePasses in allocate.cu, SelectPasses in select.cu) supplies what differs:
//   kGroupIsRow           true: a group is one score row (select); false: Hk rows (allocate)
//   task(p, b, row)       GroupTask: whether the group needs a select, its rank, first column
//   start<PASS>(p, task, cs, row)
//                         writes that need no threshold (every CTA, before the digit; groups
//                         with !task.active return after it)
//   after_digit<PASS>(p, b, r0, ghist, bin, rank, dyn_smem)
//                         run by the group's last CTA after the digit (every thread); returns
//                         whether the group's state (prefix, rank) is written for a later launch
// Scratch (histograms, tickets, row state) is one zero-filled tensor per call (torch's
// allocator); no host syncs; launch shapes depend on tensor shapes only (CUDA-graph
// capturable). Stable ABI only (csrc/torch_api.h, cuda/common.cuh).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/radix_select.cuh"

namespace adakv {
namespace cuda {
namespace radix {

constexpr int kPassThreads = 512;       // radix_pass_kernel and the cluster kernels
constexpr int kPassUnroll = 4;          // float4 groups in flight per thread
constexpr int kPassChunkQuantum = kPassThreads * 4;  // chunk sizes are multiples of this
// The digit finder of kPassThreads-thread CTAs (radix_pass_kernel, the cluster kernels): each
// thread owns kBins / kPassThreads = 4 consecutive bins.
using PassFinder = DigitFinder<kPassThreads, kBins / kPassThreads>;

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

// One digit of the radix select, grid = B * Hk * chunks CTAs (see the file comment).
template <int PASS, typename Op, bool kVec>
__global__ void __launch_bounds__(kPassThreads)
radix_pass_kernel(const RadixParams p) {
  constexpr int BPT = kBins / kPassThreads;
  static_assert(BPT == 4, "one uint4 of bins per thread");
  __shared__ uint32_t sh_hist[kBins];
  __shared__ typename PassFinder::TempStorage find_tmp;
  __shared__ bool sh_last;
  extern __shared__ __align__(16) char dyn_smem[];  // Op's

  constexpr bool kRow = Op::kGroupIsRow;
  const int64_t row = blockIdx.x / p.chunks;  // b * Hk + h
  const int64_t b = row / p.Hk;
  const GroupTask task = Op::task(p, b, row);
  const ChunkSlice cs = chunk_slice(p, task.ks);
  const int64_t group = kRow ? row : b;
  const int64_t group_rows = kRow ? 1 : p.Hk;
  const int64_t groups = kRow ? p.rows : p.rows / p.Hk;
  Op::template start<PASS>(p, task, cs, row);
  if (!task.active) return;  // the whole group returns: its tickets are never used
  uint32_t prefix = 0, rank = task.k;
  if (PASS > 0) {
    prefix = p.state[2 * group];
    rank = p.state[2 * group + 1];
  }

  const float* srow = p.scores + row * p.L;
  uint32_t* ghist = p.hist + static_cast<int64_t>(PASS) * p.rows * kBins;
  const int64_t r0 = kRow ? row : b * p.Hk;  // the group's first score row
  const auto add = [&](uint32_t* hist, uint32_t pre, int pass) {
    hist_add_columns<kPassThreads, kPassUnroll, kVec>(hist, srow, p.L, cs.lo, cs.hi, pre, pass);
  };
  // The CTA's histogram into the row's global one; the group's last CTA goes on with the sum
  // of the group's rows (thread t owns bins [4 t, 4 t + 4): one uint4 per score row).
  const auto sum = [&](const uint32_t* hist, uint32_t (&cnt)[BPT]) {
    __syncthreads();
    for (int i = threadIdx.x; i < kBins; i += kPassThreads) {
      const uint32_t v = hist[i];
      if (v) atomicAdd(ghist + row * kBins + i, v);
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      const uint32_t done = atomicAdd(p.ticket + PASS * groups + group, 1u);
      sh_last = done == static_cast<uint32_t>(group_rows * p.chunks - 1);
    }
    __syncthreads();
    if (!sh_last) return false;
    __threadfence();  // acquire: the other CTAs' histogram atomics are visible
    const uint4* gbins = reinterpret_cast<const uint4*>(ghist) + threadIdx.x;
#pragma unroll
    for (int j = 0; j < BPT; ++j) cnt[j] = 0u;
#pragma unroll 4
    for (int64_t r = r0; r < r0 + group_rows; ++r) {
      const uint4 v = __ldcg(gbins + r * (kBins / 4));
      cnt[0] += v.x;
      cnt[1] += v.y;
      cnt[2] += v.z;
      cnt[3] += v.w;
    }
    return true;
  };
  Digit d;
  if (!radix_digit<PassFinder>(find_tmp, sh_hist, PASS, prefix, rank, add, sum, &d))
    return;
  narrow(d, PASS, prefix, rank);
  if (Op::template after_digit<PASS>(p, b, r0, ghist, d.bin, rank, dyn_smem) &&
      threadIdx.x == 0) {
    p.state[2 * group] = prefix;
    p.state[2 * group + 1] = rank;
  }
}

// ---------------------------------------------------------------------------------------------
// host side

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline bool scores_vectorizable(const Tensor& scores, int64_t L) {
  return L % 4 == 0 && reinterpret_cast<uintptr_t>(scores.data_ptr()) % 16 == 0;
}

inline void check_cuda(const Tensor& t, const char* op) {
  ADAKV_CHECK(t.is_cuda(), "adakv: ", op, " CUDA kernel called with a tensor on ",
              device_str(t));
}

// Columns per CTA of the multi-CTA passes: about two CTAs per SM over all rows.
inline int64_t pass_chunk(int64_t rows, int64_t L, int device) {
  const int64_t target = 2 * static_cast<int64_t>(num_sms(device));
  const int64_t per = (rows * L + target - 1) / target;
  return std::clamp<int64_t>(round_up(per, kPassChunkQuantum), kPassChunkQuantum,
                             8 * kPassChunkQuantum);
}

struct PassScratch {
  Tensor buf;
  uint32_t *hist, *ticket, *state, *less, *chunk_counts;
};

// One zero-filled buffer (one memset) for every scratch array of the passes; the histograms
// come first (16-byte aligned uint4 reads). allocate: the per-row `less` counts; select: the
// per-chunk counts.
inline PassScratch make_scratch(const Tensor& like, const char* op, int64_t rows, int64_t groups,
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

// The kPasses launches of radix_pass_kernel (smem: Op's dynamic shared memory, opted in by
// the caller).
template <typename Op, bool kVec>
void launch_passes(const RadixParams& p, size_t smem, cudaStream_t stream) {
  const int64_t grid = p.rows * p.chunks;
  ADAKV_CHECK(grid <= std::numeric_limits<int32_t>::max(), "adakv: scores are too large");
  radix_pass_kernel<0, Op, kVec><<<grid, kPassThreads, smem, stream>>>(p);
  ADAKV_LAUNCH_CHECK();
  radix_pass_kernel<1, Op, kVec><<<grid, kPassThreads, smem, stream>>>(p);
  ADAKV_LAUNCH_CHECK();
  radix_pass_kernel<2, Op, kVec><<<grid, kPassThreads, smem, stream>>>(p);
  ADAKV_LAUNCH_CHECK();
}

}  // namespace radix
}  // namespace cuda
}  // namespace adakv
