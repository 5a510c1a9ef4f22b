// CUDA kernels of the head-flattened cache: adakv::compact and adakv::append_.
//
// compact(key, value [B, Hk, N, D], kept_idx [B, Hk, L], kept_count, budgets [B, Hk])
//     -> k_flat, v_flat [rows, D], seg_start, seg_len [S = B * Hk]
//   1. compact_layout_kernel, one CTA of 256 threads: capacities
//      cap_s = budgets[s] + window + reserve, seg_start = exclusive prefix sum (int64 carry over
//      tiles of 256 segments), seg_len = kept_count + min(window, N - ks), and the total number
//      of rows (read back with one host sync only when `rows` is not given, as documented).
//   2. compact_gather_kernel: one warp per kRowsPerWarp consecutive destination rows (8 warps
//      per CTA); the warp finds the row's segment with a 32-ary search over seg_start, then
//      copies the K and V rows with 16-byte vectors (lanes split the 2 * D * elem / 16 vectors
//      of K and V) or writes zeros past seg_len: every row of k_flat / v_flat is written once,
//      no separate memset.
// append_(k_flat, v_flat, seg_start, seg_len, key_new, value_new [B, Hk, T, D], overflow)
//   One CTA per segment: thread 0 reads seg_len / capacity, publishes the destination through
//   shared memory and bumps seg_len (or flags the overflow), then the CTA copies the T rows of K
//   and V with 16-byte vectors. One tiny launch per decode step.
//
// Copies are byte copies of whole rows, so the kernels do not depend on the dtype; the vector
// width (16, 8, 4 or 2 bytes) is the largest that divides the row size and every base pointer.
// Every value read from device memory (budgets, kept_count, kept_idx, key_start, seg_start,
// seg_len) is clamped so that no write leaves its segment and no read leaves key / value.
// Sizes (SPEC section 9): window and reserve are checked on the host (< 2^31 each); the
// device prefix sum of the capacities saturates (it cannot wrap whatever the budgets), and the
// host rejects a total above 2^31 - 1 rows before allocating anything.
// Stable ABI only (csrc/torch_api.h, cuda/common.cuh).
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <limits>
#include <string>

#include "checks.h"
#include "cuda/common.cuh"
#include "ops.h"

namespace adakv {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// compact

constexpr int kLayoutThreads = 256;
constexpr int kGatherThreads = 256;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerCta = kGatherThreads / 32 * kRowsPerWarp;

struct CompactParams {
  const char* key;            // [B, Hk, N, D]
  const char* value;          // [B, Hk, N, D]
  const int32_t* kept_idx;    // [B, Hk, L]
  const int32_t* kept_count;  // [B * Hk]
  const int32_t* budgets;     // [B * Hk]
  const int32_t* key_start;   // [B] or nullptr
  char* k_flat;               // [rows, D]
  char* v_flat;               // [rows, D]
  int32_t* seg_start;         // [S]
  int32_t* seg_len;           // [S]
  int64_t* total;             // [1] sum of capacities
  int64_t S;
  int64_t rows;               // < 0: not given (layout kernel); the gather kernel gets it
  int64_t N, L, window, reserve;
  int64_t row_bytes;
  int Hk;
};

// Clamped per-segment quantities shared by both kernels.
struct SegmentContent {
  int64_t kept;      // kept prefix rows, in [0, min(budget, L)]
  int64_t win_from;  // first window position, max(ks, L)
  int64_t win;       // window rows, min(window, N - ks)
};

__device__ __forceinline__ SegmentContent segment_content(const CompactParams& p, int64_t s) {
  SegmentContent c;
  // bounds: key_start clamped to [0, N]; budgets to >= 0; kept_count to [0, min(budget, L)]
  const int64_t ks =
      p.key_start ? min(max(static_cast<int64_t>(p.key_start[s / p.Hk]), int64_t{0}), p.N) : 0;
  const int64_t bud = max(static_cast<int64_t>(p.budgets[s]), int64_t{0});
  c.kept = min(max(static_cast<int64_t>(p.kept_count[s]), int64_t{0}), min(bud, p.L));
  c.win_from = max(ks, p.L);
  c.win = min(p.window, p.N - ks);
  return c;
}

// The running sum of the capacities saturates here: each capacity is < 2^33 (budget, window and
// reserve are each < 2^31), a tile adds < 2^41, so carry + a tile never wraps int64 whatever
// the budgets; any total above 2^31 - 1 is rejected by the host.
constexpr long long kCarrySaturation = 1LL << 62;

__global__ void __launch_bounds__(kLayoutThreads) compact_layout_kernel(const CompactParams p) {
  using Scan = cub::BlockScan<long long, kLayoutThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  const int64_t limit = p.rows >= 0 ? p.rows : std::numeric_limits<int32_t>::max();
  long long carry = 0;
  for (int64_t base = 0; base < p.S; base += kLayoutThreads) {
    const int64_t s = base + threadIdx.x;
    long long cap = 0;
    if (s < p.S) cap = max(static_cast<long long>(p.budgets[s]), 0LL) + p.window + p.reserve;
    long long excl, agg;
    Scan(scan_tmp).ExclusiveSum(cap, excl, agg);
    if (s < p.S) {
      // bounds: the segment [start, end) lies in [0, rows); the last one ends at rows
      const int64_t start = min(static_cast<int64_t>(carry + excl), limit);
      const int64_t end =
          (s == p.S - 1 && p.rows >= 0) ? limit : min(static_cast<int64_t>(carry + excl + cap), limit);
      const SegmentContent c = segment_content(p, s);
      p.seg_start[s] = static_cast<int32_t>(start);
      p.seg_len[s] = static_cast<int32_t>(min(c.kept + c.win, end - start));
    }
    carry = min(carry + agg, kCarrySaturation);  // bounds: never wraps (see kCarrySaturation)
    __syncthreads();  // scan_tmp is reused by the next tile
  }
  if (threadIdx.x == 0) *p.total = carry;
}

// Last segment s with seg_start[s] <= r (seg_start is non-decreasing, seg_start[0] = 0 <= r):
// 32-ary search, every lane returns the same s.
__device__ __forceinline__ int64_t find_segment(const int32_t* seg_start, int64_t S, int64_t r) {
  const int lane = threadIdx.x % 32;
  int64_t lo = 0, n = S;  // answer in [lo, lo + n)
  while (n > 1) {
    const int64_t step = (n + 31) / 32;
    const int64_t off = lane * step;
    const bool ok = off < n && seg_start[lo + off] <= r;  // lane 0 always true
    const unsigned mask = __ballot_sync(0xffffffffu, ok) | 1u;
    const int j = 31 - __clz(mask);
    lo += j * step;
    n = min(step, n - j * step);
  }
  return lo;
}

template <int VEC>
__global__ void __launch_bounds__(kGatherThreads) compact_gather_kernel(const CompactParams p) {
  using V = typename VecType<VEC>::type;
  const int lane = threadIdx.x % 32;
  const int64_t r0 =
      (static_cast<int64_t>(blockIdx.x) * (kGatherThreads / 32) + threadIdx.x / 32) * kRowsPerWarp;
  if (r0 >= p.rows) return;  // warp-uniform
  const int64_t nvec = p.row_bytes / VEC;
  const V* key = reinterpret_cast<const V*>(p.key);
  const V* value = reinterpret_cast<const V*>(p.value);
  V* kf = reinterpret_cast<V*>(p.k_flat);
  V* vf = reinterpret_cast<V*>(p.v_flat);

  // Source row (in units of rows of key / value) of each destination row, -1 for zeros.
  int64_t src[kRowsPerWarp];
  int64_t s = find_segment(p.seg_start, p.S, r0);
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t r = r0 + j;
    src[j] = -1;
    if (r >= p.rows) continue;
    while (s + 1 < p.S && p.seg_start[s + 1] <= r) ++s;
    const int64_t i = r - p.seg_start[s];
    const int64_t len = p.seg_len[s];  // <= capacity (layout kernel)
    if (i < 0 || i >= len) continue;
    const SegmentContent c = segment_content(p, s);
    int64_t n;
    if (i < c.kept) {
      // bounds: kept_idx clamped to [0, L)
      n = min(max(static_cast<int64_t>(p.kept_idx[s * p.L + i]), int64_t{0}), p.L - 1);
    } else {
      // bounds: i - kept < win, so n < N
      n = min(c.win_from + (i - c.kept), p.N - 1);
    }
    src[j] = s * p.N + n;
  }
  for (int64_t it = lane; it < 2 * nvec; it += 32) {
    const bool is_v = it >= nvec;
    const int64_t v = is_v ? it - nvec : it;
    const V* in = is_v ? value : key;
    V* out = is_v ? vf : kf;
    V val[kRowsPerWarp];
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      if (src[j] >= 0) {
        val[j] = __ldg(in + src[j] * nvec + v);
      } else {
        val[j] = V{};
      }
    }
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j)
      if (r0 + j < p.rows) out[(r0 + j) * nvec + v] = val[j];
  }
}

// ---------------------------------------------------------------------------------------------
// append_

struct AppendParams {
  char* k_flat;               // [rows, D]
  char* v_flat;               // [rows, D]
  const int32_t* seg_start;   // [S]
  int32_t* seg_len;           // [S]
  const char* key_new;        // [B, Hk, T, D] = [S, T, D]
  const char* value_new;      // [S, T, D]
  int32_t* overflow;          // [S] or nullptr
  int64_t S, rows, T;
  int64_t row_bytes;
};

template <int VEC>
__global__ void append_kernel(const AppendParams p) {
  using V = typename VecType<VEC>::type;
  __shared__ int64_t sh_dst;  // first destination row, -1: overflow
  const int64_t s = blockIdx.x;
  if (threadIdx.x == 0) {
    // Only this thread reads and writes seg_len[s]: the other threads use sh_dst.
    const int64_t start = p.seg_start[s];
    const int64_t end = s + 1 < p.S ? static_cast<int64_t>(p.seg_start[s + 1]) : p.rows;
    const int64_t len = p.seg_len[s];
    // bounds: the new rows [start + len, start + len + T) lie in [start, end) within [0, rows)
    const bool ok =
        start >= 0 && start <= end && end <= p.rows && len >= 0 && start + len + p.T <= end;
    if (ok) {
      sh_dst = start + len;
      p.seg_len[s] = static_cast<int32_t>(len + p.T);
    } else {
      sh_dst = -1;
      if (p.overflow != nullptr) p.overflow[s] = 1;
    }
  }
  __syncthreads();
  const int64_t dst = sh_dst;
  if (dst < 0) return;
  const int64_t nvec = p.row_bytes / VEC;
  const int64_t per_token = 2 * nvec;
  const V* kn = reinterpret_cast<const V*>(p.key_new);
  const V* vn = reinterpret_cast<const V*>(p.value_new);
  V* kf = reinterpret_cast<V*>(p.k_flat);
  V* vf = reinterpret_cast<V*>(p.v_flat);
  for (int64_t it = threadIdx.x; it < p.T * per_token; it += blockDim.x) {
    const int64_t t = it / per_token;
    const int64_t rem = it - t * per_token;
    const bool is_v = rem >= nvec;
    const int64_t v = is_v ? rem - nvec : rem;
    const int64_t src = (s * p.T + t) * nvec + v;
    const int64_t out = (dst + t) * nvec + v;
    if (is_v) {
      vf[out] = __ldg(vn + src);
    } else {
      kf[out] = __ldg(kn + src);
    }
  }
}

void check_cuda(const Tensor& t, const char* op, const char* name) {
  ADAKV_CHECK(t.is_cuda(), "adakv: ", op, " CUDA kernel called with ", name, " on ",
              device_str(t));
}

}  // namespace

FlatCache compact(const Tensor& key, const Tensor& value, const Tensor& kept_idx,
                  const Tensor& kept_count, const Tensor& budgets, int64_t window,
                  int64_t reserve, std::optional<int64_t> rows, const OptTensor& key_start) {
  // window in [0, min(N, 2^31)), reserve in [0, 2^31), rows in [0, 2^31) (validate_reserve and
  // the other checks of validate_compact).
  validate_compact(key, value, kept_idx, kept_count, budgets, window, reserve, rows, key_start);
  check_cuda(key, "compact", "key");
  const DeviceGuard guard(key.get_device_index());
  const int64_t B = key.size(0), Hk = key.size(1), N = key.size(2), D = key.size(3);
  const int64_t S = checked_mul(B, Hk, "B * Hk"), L = N - window;
  ADAKV_CHECK(S <= std::numeric_limits<int32_t>::max(), "adakv: compact: B * Hk = ", B, " * ",
              Hk, " = ", S, " segments; at most 2^31 - 1 are supported");
  // Every capacity budgets[s] + window + reserve is < 3 * 2^31 (no int64 wrap on the device).
  checked_add(window, reserve, "window + reserve");
  const cudaStream_t stream = current_stream(key);

  Tensor seg_start = new_empty("compact", "seg_start", budgets, {S}, kInt);
  Tensor seg_len = new_empty("compact", "seg_len", budgets, {S}, kInt);
  Tensor total = new_empty("compact", "the row count", budgets, {1}, kLong);
  CompactParams p{};
  p.key = static_cast<const char*>(key.data_ptr());
  p.value = static_cast<const char*>(value.data_ptr());
  p.kept_idx = ptr<int32_t>(kept_idx);
  p.kept_count = ptr<int32_t>(kept_count);
  p.budgets = ptr<int32_t>(budgets);
  p.key_start = ptr<int32_t>(key_start);
  p.seg_start = ptr<int32_t>(seg_start);
  p.seg_len = ptr<int32_t>(seg_len);
  p.total = ptr<int64_t>(total);
  p.S = S;
  p.rows = rows.has_value() ? *rows : -1;
  p.N = N;
  p.L = L;
  p.window = window;
  p.reserve = reserve;
  p.row_bytes = D * static_cast<int64_t>(key.element_size());
  p.Hk = static_cast<int>(Hk);
  if (S > 0) {
    compact_layout_kernel<<<1, kLayoutThreads, 0, stream>>>(p);
    ADAKV_LAUNCH_CHECK();
  }

  int64_t n_rows;
  if (rows.has_value()) {
    n_rows = *rows;
  } else {
    // The one documented host sync: the output size depends on the budgets.
    n_rows = 0;
    if (S > 0) {
      ADAKV_CUDA_CHECK(cudaMemcpyAsync(&n_rows, p.total, sizeof(int64_t),
                                       cudaMemcpyDeviceToHost, stream));
      ADAKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    ADAKV_CHECK(n_rows >= 0 && n_rows <= std::numeric_limits<int32_t>::max(),
                "adakv: compact: the flat cache would hold sum(budgets + window + reserve) = ",
                n_rows >= (int64_t{1} << 62) ? std::string(">= 2^62")
                                             : std::to_string(n_rows),
                " rows; at most 2^31 - 1 are supported (lower the budgets, window or reserve)");
  }
  // rows but no segment to own them: all zeros
  const bool zero_fill = S == 0;
  Tensor k_flat = zero_fill ? new_zeros("compact", "k_flat", key, {n_rows, D}, key.scalar_type())
                            : new_empty("compact", "k_flat", key, {n_rows, D}, key.scalar_type());
  Tensor v_flat = zero_fill
                      ? new_zeros("compact", "v_flat", value, {n_rows, D}, value.scalar_type())
                      : new_empty("compact", "v_flat", value, {n_rows, D}, value.scalar_type());
  if (n_rows == 0 || D == 0 || zero_fill) return {k_flat, v_flat, seg_start, seg_len};
  p.k_flat = static_cast<char*>(k_flat.data_ptr());
  p.v_flat = static_cast<char*>(v_flat.data_ptr());
  p.rows = n_rows;
  const int width = vector_width(p.row_bytes, {&key, &value, &k_flat, &v_flat});
  const int64_t grid = (n_rows + kRowsPerCta - 1) / kRowsPerCta;  // <= 2^26 (n_rows < 2^31)
  ADAKV_VEC_SWITCH(width, VEC, [&] {
    compact_gather_kernel<VEC><<<static_cast<unsigned>(grid), kGatherThreads, 0, stream>>>(p);
    ADAKV_LAUNCH_CHECK();
  });
  return {k_flat, v_flat, seg_start, seg_len};
}

void append_(const Tensor& k_flat, const Tensor& v_flat, const Tensor& seg_start,
             const Tensor& seg_len, const Tensor& key_new, const Tensor& value_new,
             const OptTensor& overflow) {
  const DecodeShape s = validate_append(k_flat, v_flat, seg_start, seg_len, key_new, value_new,
                                        overflow);
  check_cuda(k_flat, "append_", "k_flat");
  const DeviceGuard guard(k_flat.get_device_index());
  if (s.S == 0) return;
  ADAKV_CHECK(s.S <= std::numeric_limits<int32_t>::max(), "adakv: append_: ", s.S,
              " segments; at most 2^31 - 1 are supported");
  AppendParams p{};
  p.k_flat = static_cast<char*>(k_flat.data_ptr());
  p.v_flat = static_cast<char*>(v_flat.data_ptr());
  p.seg_start = ptr<int32_t>(seg_start);
  p.seg_len = ptr<int32_t>(seg_len);
  p.key_new = static_cast<const char*>(key_new.data_ptr());
  p.value_new = static_cast<const char*>(value_new.data_ptr());
  p.overflow = ptr<int32_t>(overflow);
  p.S = s.S;
  p.rows = s.rows;
  p.T = s.T;
  p.row_bytes = s.D * static_cast<int64_t>(k_flat.element_size());
  const int width = vector_width(p.row_bytes, {&k_flat, &v_flat, &key_new, &value_new});
  // One thread per vector of the T rows of K and V, at most 256 per CTA.
  const int64_t items = s.T * 2 * (p.row_bytes / width);
  const int threads = static_cast<int>(std::clamp<int64_t>((items + 31) / 32 * 32, 32, 256));
  ADAKV_VEC_SWITCH(width, VEC, [&] {
    append_kernel<VEC><<<static_cast<unsigned>(s.S), threads, 0, current_stream(k_flat)>>>(p);
    ADAKV_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace adakv
