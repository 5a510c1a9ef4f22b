// CUDA kernels of the paged per-head K/V storage (SPEC section 3.1): adakv::paged_compact_,
// paged_append_, paged_append_rotary_, paged_decode_attention(_lse).
//
// Layout: k_pages / v_pages [num_pages, P, D] (fp32 / fp16 / bf16); segment s = b * Hk + h owns
// the pages page_table[s, 0 .. width) ([S, width] int32) and holds seg_len[s] ([S] int32)
// tokens; token i lives at k_pages[page_table[s, i / P], i % P]. Entries past
// ceil(seg_len / P) are never read (they may be -1).
//
// paged_compact_(k_pages!, v_pages!, page_table, seg_len!, key, value [B, Hk, N, D],
//                kept_idx [B, Hk, N - W], kept_count [B, Hk], W, key_start [B]?)
//   The rows of `compact` (kept prefix in kept_idx order, then the window [max(ks, N - W), N)),
//   written through the table; seg_len[s] = kept + window rows, clamped to width * P.
//   paged_compact_kernel: grid = S x ceil(N / 32) CTAs of 8 warps, one warp per 4 consecutive
//   destination tokens of one segment; lanes split the 16-B (or narrower: vector_width) vectors
//   of the K and V rows. The first CTA of a segment writes its seg_len.
// paged_append_(k_pages!, v_pages!, page_table, seg_len!, key_new, value_new [B, Hk, T, D],
//               overflow [B * Hk]?, segment_index [B * Hk]?)
//   Batch segment i = b * Hk + h of key_new uses table row r = i, or r = segment_index[i]
//   (then page_table / seg_len may have any row count S_tab). Token t goes to position
//   seg_len[r] + t, then seg_len[r] += T. A segment that would pass width * P, or whose pages
//   for the new positions have an id outside [0, num_pages), writes nothing, keeps seg_len and
//   sets overflow[i] = 1 (when given), as append_ does. r == -1 (padding) writes nothing; any
//   other r outside [0, S_tab) is treated as padding (no table or seg_len access) and sets
//   overflow[i] = 2. Rows named twice: the caller's contract is distinct rows (the CPU
//   raises); on CUDA the two CTAs race on seg_len[r] and the row's slots, but each writes only
//   positions it checked against the length it read: in bounds, result unspecified.
//   paged_append_kernel: one CTA per batch segment (up to 256 threads): thread 0 reads the
//   table row and its length, the CTA checks the pages it will write (__syncthreads_or),
//   thread 0 publishes the decision, then the threads copy the T rows of K and V with vectors.
// paged_append_rotary_(k_pages!, v_pages!, page_table, seg_len!, query [B, Hq, T, D], key_new,
//                      value_new [B, Hk, T, D], cos, sin [B or 1, T, D], overflow?,
//                      segment_index?) -> query rotated [B, Hq, T, D]
//   paged_append_ of key_new rotated by RoPE (rotary.h), and the query rotated into a new
//   contiguous tensor (every segment, padding and overflowed ones too): the decode step's
//   RoPE, K/V layout copies and append in one launch. Inputs are read through their strides
//   (last stride 1), so the heads of a fused QKV projection are read in place.
//   paged_append_rotary_kernel: one CTA per batch segment b * Hk + h (up to 256 threads):
//   the append's start as in paged_append_kernel (begin_append), then one loop over element
//   pairs (i, i + D / 2) of the G query heads and of the key of each token, values copied
//   alongside the key pairs. Scalar loads: a step moves a few hundred KB; the launch and
//   the dependent reads of the segment's row, length and page are its cost.
// paged_decode_attention(_lse)(query [B, Hq, T, D], k_pages, v_pages, page_table, seg_len,
//                              scale?, segment_index [B * Hk]?)
//                              -> out [B, Hq, T, D] (, lse [B, Hq, T] fp32)
//   decode_attention's semantics, run by the same split-K kernel family with paged addressing
//   (decode_kernel.cuh, kPaged; launch_decode in decode_attention.cu). Any P >= 1: each key
//   row is looked up in the table on its own (shift/mask for a power of two). With
//   segment_index, batch segment s reads table row segment_index[s]; a row outside
//   [0, S_tab) (-1: padding) is an empty segment: out 0, lse -inf, nothing read.
//
// Host checks: everything that needs no device data (dtypes, shapes, devices, contiguity, page
// size, overflow of sizes, segment_index dtype / length / device): checks.h's validate_paged_*
// (shared with the CPU backend, same messages) plus the CUDA limits (device, int32 grid / key
// ranges). Device data is never followed out of bounds: seg_len, kept_count, kept_idx and
// key_start are clamped, segment_index values outside [0, S_tab) are padding, page ids outside
// [0, num_pages) are skipped (compact, append_) or clamped into the pool (decode: then the
// result for that segment is garbage but in bounds; the CPU backend rejects such tables). No
// host synchronisation; every kernel runs on torch's current stream. Stable ABI only
// (csrc/torch_api.h, cuda/common.cuh).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/decode_params.cuh"
#include "ops.h"
#include "rotary.h"

namespace adakv {
namespace cuda {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// ---------------------------------------------------------------------------------------------
// host checks

// The CUDA-only checks on top of checks.h's validate_paged_* (shared with the CPU backend):
// device, segment counts (the table's rows and the batch segments: grid size) and the
// per-segment capacity min(width * P, 2^31 - 1) (seg_len is int32).
int64_t cuda_pool_checks(const char* op, const Tensor& k_pages, const PagedShape& ps,
                         int64_t batch_segments) {
  ADAKV_CHECK(k_pages.is_cuda(), "adakv: ", op, " CUDA kernel called with k_pages on ",
              device_str(k_pages));
  ADAKV_CHECK(ps.S <= kInt32Max && batch_segments <= kInt32Max, "adakv: ", op, ": ",
              std::max(ps.S, batch_segments), " segments; at most 2^31 - 1 are supported");
  return std::min(ps.width * ps.P, kInt32Max);  // width * P checked by validate_paged_pool
}

// ---------------------------------------------------------------------------------------------
// paged_compact_

constexpr int kCopyThreads = 256;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerCta = kCopyThreads / 32 * kRowsPerWarp;

struct PagedCompactParams {
  const char* key;            // [S, N, D]
  const char* value;          // [S, N, D]
  const int32_t* kept_idx;    // [S, L]
  const int32_t* kept_count;  // [S]
  const int32_t* key_start;   // [B] or nullptr
  char* k_pages;              // [num_pages, P, D]
  char* v_pages;
  const int32_t* page_table;  // [S, width]
  int32_t* seg_len;           // [S]
  int64_t S, N, L, window, Hk;
  int64_t P, width, num_pages, cap;
  int64_t blocks_per_seg;     // CTAs per segment, >= 1
  int64_t row_bytes;
};

template <int VEC>
__global__ void __launch_bounds__(kCopyThreads) paged_compact_kernel(const PagedCompactParams p) {
  using V = typename VecType<VEC>::type;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t s = static_cast<int64_t>(blockIdx.x) / p.blocks_per_seg;
  const int64_t blk = static_cast<int64_t>(blockIdx.x) - s * p.blocks_per_seg;
  // bounds: key_start clamped to [0, N], kept_count to [0, L] (compact's rules, no budget);
  // the window [win_from, win_from + win) lies in [0, N)
  const int64_t ks =
      p.key_start ? min(max(static_cast<int64_t>(p.key_start[s / p.Hk]), int64_t{0}), p.N) : 0;
  const int64_t kept = min(max(static_cast<int64_t>(p.kept_count[s]), int64_t{0}), p.L);
  const int64_t win_from = max(ks, p.L);
  const int64_t win = min(p.window, p.N - ks);
  // bounds: len <= cap <= width * P, so every table slot below is inside row s of the table
  const int64_t len = min(kept + win, p.cap);
  if (blk == 0 && threadIdx.x == 0) p.seg_len[s] = static_cast<int32_t>(len);

  const int64_t i0 = (blk * (kCopyThreads / 32) + warp) * kRowsPerWarp;
  if (i0 >= len) return;  // warp-uniform
  int64_t src[kRowsPerWarp], dst[kRowsPerWarp];  // rows of key / of the pool, -1: none
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t i = i0 + j;
    src[j] = dst[j] = -1;
    if (i >= len) continue;
    const int64_t page = p.page_table[s * p.width + i / p.P];
    if (page < 0 || page >= p.num_pages) continue;  // bounds: a bad page id is not followed
    int64_t n;
    if (i < kept) {
      // bounds: kept_idx clamped to [0, L) (kept > 0 implies L > 0)
      n = min(max(static_cast<int64_t>(p.kept_idx[s * p.L + i]), int64_t{0}), p.L - 1);
    } else {
      // bounds: i - kept < win, so n < N
      n = min(win_from + (i - kept), p.N - 1);
    }
    src[j] = s * p.N + n;
    dst[j] = page * p.P + i % p.P;
  }
  const int64_t nvec = p.row_bytes / VEC;
  const V* key = reinterpret_cast<const V*>(p.key);
  const V* value = reinterpret_cast<const V*>(p.value);
  V* kp = reinterpret_cast<V*>(p.k_pages);
  V* vp = reinterpret_cast<V*>(p.v_pages);
  for (int64_t it = lane; it < 2 * nvec; it += 32) {
    const bool is_v = it >= nvec;
    const int64_t v = is_v ? it - nvec : it;
    const V* in = is_v ? value : key;
    V* out = is_v ? vp : kp;
    V val[kRowsPerWarp];
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) val[j] = src[j] >= 0 ? __ldg(in + src[j] * nvec + v) : V{};
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j)
      if (dst[j] >= 0) out[dst[j] * nvec + v] = val[j];
  }
}

// ---------------------------------------------------------------------------------------------
// paged_append_

// Overflow flag values (overflow[i], batch segment i; sticky: never cleared by the kernel).
constexpr int32_t kOverflowCapacity = 1;      // the table cannot hold the append
constexpr int32_t kOverflowSegmentIndex = 2;  // segment_index[i] outside [-1, table_rows)

struct PagedAppendParams {
  char* k_pages;              // [num_pages, P, D]
  char* v_pages;
  const int32_t* page_table;  // [table_rows, width]
  int32_t* seg_len;           // [table_rows]
  const int32_t* seg_index;   // [S] table row of each batch segment, or nullptr (row i)
  const char* key_new;        // [S, T, D]
  const char* value_new;
  int32_t* overflow;          // [S] or nullptr
  int64_t S, table_rows, T, P, width, num_pages, cap;
  int64_t row_bytes;
};

// The start of an append CTA (paged_append_kernel, paged_append_rotary_kernel), run by every
// thread of the CTA of batch segment s: resolves its table row, checks the pages its T new
// rows land on, advances seg_len when they can take them, else flags overflow. Returns whether
// the rows are to be written (block-uniform), with the row and its length before the append.
// Only thread 0 reads segment_index[s] and reads and writes seg_len[row]; the others use
// sh_row / sh_len.
__device__ bool begin_append(const PagedAppendParams& p, int64_t s, int64_t& row_out,
                             int64_t& len_out) {
  __shared__ int64_t sh_row, sh_len;
  if (threadIdx.x == 0) {
    const int64_t r = p.seg_index != nullptr ? static_cast<int64_t>(p.seg_index[s]) : s;
    // bounds: a row outside [0, table_rows) is padding: no seg_len or table access below
    const bool in_table = r >= 0 && r < p.table_rows;
    if (!in_table && r != -1 && p.overflow != nullptr) p.overflow[s] = kOverflowSegmentIndex;
    sh_row = in_table ? r : -1;
    sh_len = in_table ? p.seg_len[r] : 0;
  }
  __syncthreads();
  const int64_t row = sh_row, len = sh_len;
  if (row < 0) return false;  // padding (block-uniform): nothing written, no length changed
  // bounds: the new positions [len, len + T) lie in [0, cap], cap <= width * P
  bool ok = len >= 0 && len + p.T <= p.cap;
  int bad = 0;
  if (ok) {
    const int64_t first = len / p.P, last = (len + p.T - 1) / p.P;  // table slots written
    for (int64_t pg = first + threadIdx.x; pg <= last; pg += blockDim.x) {
      const int32_t id = p.page_table[row * p.width + pg];
      bad |= id < 0 || id >= p.num_pages;
    }
  }
  ok = ok && !__syncthreads_or(bad);  // block-uniform; also orders the reads of sh_* above
  if (threadIdx.x == 0) {
    if (ok) {
      p.seg_len[row] = static_cast<int32_t>(len + p.T);  // <= cap < 2^31
    } else if (p.overflow != nullptr) {
      p.overflow[s] = kOverflowCapacity;
    }
  }
  row_out = row;
  len_out = len;
  return ok;
}

template <int VEC>
__global__ void paged_append_kernel(const PagedAppendParams p) {
  using V = typename VecType<VEC>::type;
  const int64_t s = blockIdx.x;  // batch segment: rows of key_new / value_new, overflow[s]
  int64_t row = 0, len = 0;
  if (!begin_append(p, s, row, len)) return;
  const int64_t nvec = p.row_bytes / VEC;
  const int64_t per_token = 2 * nvec;
  const V* kn = reinterpret_cast<const V*>(p.key_new);
  const V* vn = reinterpret_cast<const V*>(p.value_new);
  V* kp = reinterpret_cast<V*>(p.k_pages);
  V* vp = reinterpret_cast<V*>(p.v_pages);
  for (int64_t it = threadIdx.x; it < p.T * per_token; it += blockDim.x) {
    const int64_t t = it / per_token;
    const int64_t rem = it - t * per_token;
    const bool is_v = rem >= nvec;
    const int64_t v = is_v ? rem - nvec : rem;
    const int64_t pos = len + t;
    const int64_t page = p.page_table[row * p.width + pos / p.P];  // checked above
    const int64_t src = (s * p.T + t) * nvec + v;
    const int64_t out = (page * p.P + pos % p.P) * nvec + v;
    if (is_v) {
      vp[out] = __ldg(vn + src);
    } else {
      kp[out] = __ldg(kn + src);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// paged_append_rotary_

constexpr int kRotaryMaxThreads = 256;

struct PagedAppendRotaryParams {
  PagedAppendParams append;  // its key_new / value_new / row_bytes are not used
  const char* query;         // [B, Hq, T, D], strides stride.q (last 1)
  const char* key_new;       // [B, Hk, T, D], stride.k
  const char* value_new;     // [B, Hk, T, D], stride.v
  const char* cos;           // [B or 1, T, D], stride.cos (batch stride 0 for one row)
  const char* sin;
  char* q_out;               // [B, Hq, T, D] contiguous
  int64_t Hk, G, D;
  RotaryStrides stride;      // of query, key_new, value_new, cos, sin (in elements)
};

// Elements i and i + D / 2 of x rotated by the angle rows c / sn into out (rotary.h).
template <typename scalar_t, typename angle_t>
__device__ __forceinline__ void rotate_pair_into(const scalar_t* x, const angle_t* c,
                                                 const angle_t* sn, int64_t i, int64_t half,
                                                 scalar_t* out) {
  const RotatedPair r =
      rotate_pair(to_float(x[i]), to_float(x[i + half]), to_float(c[i]), to_float(sn[i]),
                  to_float(c[i + half]), to_float(sn[i + half]));
  out[i] = from_float<scalar_t>(r.lo);
  out[i + half] = from_float<scalar_t>(r.hi);
}

// One CTA per batch segment s = b * Hk + h: begin_append (the segment's row and the pages of
// its T new rows), then one loop whose items are element pairs (i, i + D / 2): the G query
// heads of the segment x T tokens (always: also for padding and overflowed segments), then,
// when the rows are written, the key (rotated) and value (copied) of each of the T tokens.
template <typename scalar_t, typename angle_t>
__global__ void __launch_bounds__(kRotaryMaxThreads)
    paged_append_rotary_kernel(const PagedAppendRotaryParams p) {
  const int64_t s = blockIdx.x;
  const int64_t b = s / p.Hk, h = s - b * p.Hk;
  const int64_t T = p.append.T, G = p.G, D = p.D, half = D / 2;
  int64_t row = 0, len = 0;
  const bool write = begin_append(p.append, s, row, len);
  const scalar_t* query = reinterpret_cast<const scalar_t*>(p.query);
  const scalar_t* key_new = reinterpret_cast<const scalar_t*>(p.key_new);
  const scalar_t* value_new = reinterpret_cast<const scalar_t*>(p.value_new);
  const angle_t* cos_rows = reinterpret_cast<const angle_t*>(p.cos);
  const angle_t* sin_rows = reinterpret_cast<const angle_t*>(p.sin);
  scalar_t* q_out = reinterpret_cast<scalar_t*>(p.q_out);
  scalar_t* k_pages = reinterpret_cast<scalar_t*>(p.append.k_pages);
  scalar_t* v_pages = reinterpret_cast<scalar_t*>(p.append.v_pages);
  const int64_t q_items = T * G * half;
  const int64_t items = q_items + (write ? T * half : 0);
  for (int64_t it = threadIdx.x; it < items; it += blockDim.x) {
    const bool is_q = it < q_items;
    const int64_t k = is_q ? it : it - q_items;
    const int64_t i = k % half;
    const int64_t t = is_q ? k / half / G : k / half;
    const angle_t* c = cos_rows + b * p.stride.cos[0] + t * p.stride.cos[1];
    const angle_t* sn = sin_rows + b * p.stride.sin[0] + t * p.stride.sin[1];
    if (is_q) {
      const int64_t hq = h * G + (k / half) % G;
      rotate_pair_into(query + b * p.stride.q[0] + hq * p.stride.q[1] + t * p.stride.q[2], c, sn,
                       i, half, q_out + ((b * p.Hk * G + hq) * T + t) * D);
    } else {
      const int64_t pos = len + t;
      // checked by begin_append: in the table row, page id in [0, num_pages)
      const int64_t page = p.append.page_table[row * p.append.width + pos / p.append.P];
      const int64_t out = (page * p.append.P + pos % p.append.P) * D;
      rotate_pair_into(key_new + b * p.stride.k[0] + h * p.stride.k[1] + t * p.stride.k[2], c, sn,
                       i, half, k_pages + out);
      const scalar_t* v = value_new + b * p.stride.v[0] + h * p.stride.v[1] + t * p.stride.v[2];
      v_pages[out + i] = v[i];
      v_pages[out + i + half] = v[i + half];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// paged decode

// The fields of PagedAppendParams that begin_append reads (pool, table, lengths, segment index,
// overflow flags, sizes): the part both append launchers fill alike.
PagedAppendParams append_target(const Tensor& k_pages, const Tensor& v_pages,
                                const Tensor& page_table, const Tensor& seg_len,
                                const OptTensor& overflow, const OptTensor& segment_index,
                                const PagedShape& ps, const DecodeShape& sh, int64_t cap) {
  PagedAppendParams p{};
  p.k_pages = static_cast<char*>(k_pages.data_ptr());
  p.v_pages = static_cast<char*>(v_pages.data_ptr());
  p.page_table = ptr<int32_t>(page_table);
  p.seg_len = ptr<int32_t>(seg_len);
  p.seg_index = ptr<int32_t>(segment_index);
  p.overflow = ptr<int32_t>(overflow);
  p.S = sh.S;
  p.table_rows = ps.S;
  p.T = sh.T;
  p.P = ps.P;
  p.width = ps.width;
  p.num_pages = ps.num_pages;
  p.cap = cap;
  return p;
}

// Threads of an append CTA: one per work item, whole warps, in [32, max_threads].
int append_threads(int64_t items, int max_threads) {
  return static_cast<int>(std::clamp<int64_t>((items + 31) / 32 * 32, 32, max_threads));
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

std::tuple<Tensor, OptTensor> paged_decode_impl(const Tensor& query, const Tensor& k_pages,
                                                const Tensor& v_pages, const Tensor& page_table,
                                                const Tensor& seg_len,
                                                std::optional<double> scale,
                                                const OptTensor& segment_index, bool want_lse) {
  const char* op = "paged_decode_attention";
  PagedShape ps;
  const DecodeShape sh =
      validate_paged_decode(query, k_pages, v_pages, page_table, seg_len, segment_index, ps);
  cuda_pool_checks(op, k_pages, ps, sh.S);
  const int64_t B = sh.B, Hq = sh.Hq, Hk = sh.Hk, T = sh.T, D = sh.D;
  ADAKV_CHECK(ps.width * ps.P <= kInt32Max, "adakv: ", op, ": max_pages * P = ", ps.width,
              " * ", ps.P, " keys per segment; at most 2^31 - 1 are supported");
  decode::check_decode_head_dim(D);
  const DeviceGuard guard(query.get_device_index());
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));

  const Tensor out = new_empty(op, "the output", query, {B, Hq, T, D}, query.scalar_type());
  OptTensor lse;
  if (want_lse) lse = new_empty(op, "the log-sum-exp", query, {B, Hq, T}, kFloat);
  if (out.numel() == 0) return {out, lse};  // Hq == 0: nothing to compute
  ADAKV_CHECK(aligned16(query) && (ps.num_pages == 0 || (aligned16(k_pages) && aligned16(v_pages))),
              "adakv: ", op, " is not implemented for CUDA on tensors whose data is not "
              "16-byte aligned (query / k_pages / v_pages views with an odd storage offset)");

  decode::DecodeParams p{};
  p.q = query.data_ptr();
  p.k = k_pages.data_ptr();
  p.v = v_pages.data_ptr();
  p.seg_start = nullptr;
  p.seg_len = ptr<int32_t>(seg_len);
  p.page_table = ptr<int32_t>(page_table);
  p.seg_index = ptr<int32_t>(segment_index);
  p.table_rows = ps.S;
  p.num_pages = ps.num_pages;
  p.page_width = static_cast<int>(ps.width);  // width * P < 2^31
  p.page_size = static_cast<int>(ps.P);  // P <= width * P < 2^31
  int shift = 0;
  while ((int64_t{1} << shift) < ps.P) ++shift;
  p.page_shift = (int64_t{1} << shift) == ps.P ? shift : -1;
  p.out = out.data_ptr();
  p.lse = ptr<float>(lse);
  p.rows = ps.num_pages * ps.P;
  p.T = static_cast<int>(T);  // T <= GT, range-checked by launch_decode
  p.scale_log2 = static_cast<float>(sc * 1.4426950408889634);
  // Average capacity of a batch segment, from shapes only: the table width, or the pool shared
  // by the sh.S batch segments when that is smaller (distinct table rows own distinct pages, so
  // together they hold at most num_pages * P keys; padding segments hold none). With
  // segment_index the table's row count S_tab plays no part: a batch may name a few rows of a
  // large table, or pad a small one.
  const int64_t pool_share = (checked_mul(ps.num_pages, ps.P, "num_pages * P") + sh.S - 1) / sh.S;
  const int64_t avg_cap = std::min(ps.width * ps.P, pool_share);
  decode::launch_decode(p, query, sh.S, checked_mul(Hq / Hk, T, "G * T"), D, avg_cap, op);
  return {out, lse};
}

}  // namespace

void paged_compact_(const Tensor& k_pages, const Tensor& v_pages, const Tensor& page_table,
                    const Tensor& seg_len, const Tensor& key, const Tensor& value,
                    const Tensor& kept_idx, const Tensor& kept_count, int64_t window,
                    const OptTensor& key_start) {
  const char* op = "paged_compact_";
  const PagedShape ps = validate_paged_compact(k_pages, v_pages, page_table, seg_len, key, value,
                                               kept_idx, kept_count, window, key_start);
  const int64_t cap = cuda_pool_checks(op, k_pages, ps, ps.S);
  const DeviceGuard guard(k_pages.get_device_index());
  const int64_t N = key.size(2);
  if (ps.S == 0) return;
  const int64_t blocks_per_seg = std::max<int64_t>(1, (N + kRowsPerCta - 1) / kRowsPerCta);
  const int64_t grid = checked_mul(ps.S, blocks_per_seg, "B * Hk * ceil(N / 32)");
  ADAKV_CHECK(grid <= kInt32Max, "adakv: ", op, " is not implemented for CUDA at this size (",
              ps.S, " segments x ", N, " tokens)");
  PagedCompactParams p{};
  p.key = static_cast<const char*>(key.data_ptr());
  p.value = static_cast<const char*>(value.data_ptr());
  p.kept_idx = ptr<int32_t>(kept_idx);
  p.kept_count = ptr<int32_t>(kept_count);
  p.key_start = ptr<int32_t>(key_start);
  p.k_pages = static_cast<char*>(k_pages.data_ptr());
  p.v_pages = static_cast<char*>(v_pages.data_ptr());
  p.page_table = ptr<int32_t>(page_table);
  p.seg_len = ptr<int32_t>(seg_len);
  p.S = ps.S;
  p.N = N;
  p.L = N - window;
  p.window = window;
  p.Hk = key.size(1);
  p.P = ps.P;
  p.width = ps.width;
  p.num_pages = ps.num_pages;
  p.cap = cap;
  p.blocks_per_seg = blocks_per_seg;
  p.row_bytes = ps.D * static_cast<int64_t>(k_pages.element_size());
  // D == 0: seg_len is still written, the copy loops are empty (any width divides 0 bytes)
  const int width = vector_width(p.row_bytes, {&key, &value, &k_pages, &v_pages});
  ADAKV_VEC_SWITCH(width, VEC, [&] {
    paged_compact_kernel<VEC>
        <<<static_cast<unsigned>(grid), kCopyThreads, 0, current_stream(k_pages)>>>(p);
    ADAKV_LAUNCH_CHECK();
  });
}

void paged_append_(const Tensor& k_pages, const Tensor& v_pages, const Tensor& page_table,
                   const Tensor& seg_len, const Tensor& key_new, const Tensor& value_new,
                   const OptTensor& overflow, const OptTensor& segment_index) {
  const char* op = "paged_append_";
  PagedShape ps;
  const DecodeShape sh = validate_paged_append(k_pages, v_pages, page_table, seg_len, key_new,
                                               value_new, overflow, segment_index, ps);
  const int64_t cap = cuda_pool_checks(op, k_pages, ps, sh.S);
  const int64_t T = sh.T;
  const DeviceGuard guard(k_pages.get_device_index());
  if (sh.S == 0) return;  // no batch segment (B * Hk == 0)
  PagedAppendParams p =
      append_target(k_pages, v_pages, page_table, seg_len, overflow, segment_index, ps, sh, cap);
  p.key_new = static_cast<const char*>(key_new.data_ptr());
  p.value_new = static_cast<const char*>(value_new.data_ptr());
  p.row_bytes = ps.D * static_cast<int64_t>(k_pages.element_size());
  const int width = vector_width(p.row_bytes, {&k_pages, &v_pages, &key_new, &value_new});
  // One thread per vector of the T rows of K and V, at most 256 per CTA.
  const int threads = append_threads(checked_mul(T, 2 * (p.row_bytes / width), "T * D"), 256);
  ADAKV_VEC_SWITCH(width, VEC, [&] {
    paged_append_kernel<VEC>
        <<<static_cast<unsigned>(sh.S), threads, 0, current_stream(k_pages)>>>(p);
    ADAKV_LAUNCH_CHECK();
  });
}

Tensor paged_append_rotary_(const Tensor& k_pages, const Tensor& v_pages,
                            const Tensor& page_table, const Tensor& seg_len, const Tensor& query,
                            const Tensor& key_new, const Tensor& value_new, const Tensor& cos,
                            const Tensor& sin, const OptTensor& overflow,
                            const OptTensor& segment_index) {
  const char* op = "paged_append_rotary_";
  PagedShape ps;
  const DecodeShape sh = validate_paged_append_rotary(k_pages, v_pages, page_table, seg_len,
                                                      query, key_new, value_new, cos, sin,
                                                      overflow, segment_index, ps);
  const int64_t cap = cuda_pool_checks(op, k_pages, ps, sh.S);
  const DeviceGuard guard(k_pages.get_device_index());
  const Tensor q_out =
      new_empty(op, "the rotated query", query, {sh.B, sh.Hq, sh.T, sh.D}, query.scalar_type());
  if (sh.S == 0) return q_out;  // no batch segment (B == 0)
  PagedAppendRotaryParams p{};
  p.append =
      append_target(k_pages, v_pages, page_table, seg_len, overflow, segment_index, ps, sh, cap);
  p.query = static_cast<const char*>(query.data_ptr());
  p.key_new = static_cast<const char*>(key_new.data_ptr());
  p.value_new = static_cast<const char*>(value_new.data_ptr());
  p.cos = static_cast<const char*>(cos.data_ptr());
  p.sin = static_cast<const char*>(sin.data_ptr());
  p.q_out = static_cast<char*>(q_out.data_ptr());
  p.Hk = sh.Hk;
  p.G = sh.Hq / sh.Hk;
  p.D = sh.D;
  p.stride = rotary_strides(query, key_new, value_new, cos, sin);
  // One thread per element pair of the segment's query heads and key, at most 256 per CTA.
  const int threads = append_threads(
      checked_mul(sh.T, checked_mul(p.G + 1, sh.D / 2, "(G + 1) * D"), "T * G * D"),
      kRotaryMaxThreads);
  const bool float_angles = cos.scalar_type() == kFloat;
  ADAKV_DTYPE_SWITCH(query.scalar_type(), scalar_t, [&] {
    const auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(sh.S), threads, 0, current_stream(k_pages)>>>(p);
      ADAKV_LAUNCH_CHECK();
    };
    if (float_angles) {
      launch(paged_append_rotary_kernel<scalar_t, float>);
    } else {
      launch(paged_append_rotary_kernel<scalar_t, scalar_t>);
    }
  });
  return q_out;
}

std::tuple<Tensor, Tensor> paged_decode_attention_lse(const Tensor& query, const Tensor& k_pages,
                                                      const Tensor& v_pages,
                                                      const Tensor& page_table,
                                                      const Tensor& seg_len,
                                                      std::optional<double> scale,
                                                      const OptTensor& segment_index) {
  auto [out, lse] = paged_decode_impl(query, k_pages, v_pages, page_table, seg_len, scale,
                                      segment_index, /*want_lse=*/true);
  return {out, *lse};
}

Tensor paged_decode_attention(const Tensor& query, const Tensor& k_pages, const Tensor& v_pages,
                              const Tensor& page_table, const Tensor& seg_len,
                              std::optional<double> scale, const OptTensor& segment_index) {
  return std::get<0>(paged_decode_impl(query, k_pages, v_pages, page_table, seg_len, scale,
                                       segment_index, /*want_lse=*/false));
}

}  // namespace cuda
}  // namespace adakv
