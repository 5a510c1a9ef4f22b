// Split-K decode attention kernel (flash-decoding) over either K/V layout, chosen at compile
// time (kPaged): the head-flattened cache k_flat / v_flat [rows, D] (key i of segment s is row
// seg_start[s] + i) or the paged pool k_pages / v_pages [num_pages, P, D] (key i of segment s
// is row page_table[t, i / P] * P + i % P of the pool seen as [num_pages * P, D], table row
// t = s, or t = seg_index[s] with a segment_index). The address computation of a key tile is
// the only difference: a tile (kTileKeys consecutive keys, starting at a multiple of kTileKeys)
// lies in one page when P % kTileKeys == 0, so its rows are contiguous in both layouts (other
// P: one table entry per row). A warp holds the table entries of its tiles in registers, 32
// tiles at a time (lane i: tile 32 b + i), and loads the next 32 when it starts on the current
// ones, so no dependent table read stands between a tile's turn and the issue of its copies.
//
// One CTA = (segment s, split, query-row block mb), blockIdx.x = (s * num_splits + split) *
// num_mblocks + mb, so the CTAs that share a K/V chunk run next to each other. The CTA's query
// rows are rows [mb * kRows, +kRows) of the segment's GT = G * T rows: with G * T <= 16
// (fp16/bf16) every query head of the KV head is in one CTA and each K/V byte is read from HBM
// once. The split covers keys [begin, end) of the segment,
//   chunk = roundup(ceil(len / num_splits), kTileKeys), begin = min(split * chunk, len),
// computed on device from seg_len: the launch shape depends on tensor shapes only (CUDA graphs).
// Warp w streams tiles w, w + 4, ... of the split (kTileKeys rows of K and of V each) through its
// own kStages-deep ring of 16-byte cp.async copies (no CTA barrier inside the key loop), keeps an
// online-softmax state (m, l, O) per query row in fp32, and the 4 warp states are merged in
// shared memory at the end. The result is the final output (num_splits == 1) or a normalised
// fp32 partial plus its base-2 log-sum-exp, merged either by decode_merge.cuh (second launch)
// or, on sm_90 (kCluster), inside the same launch: the num_splits CTAs of a (segment, query
// block) form one thread-block cluster (split innermost in blockIdx.x, cluster rank == split),
// and each CTA pushes its partial, item by item, into the shared memory of the CTA that merges
// that item (distributed shared memory stores), then one cluster barrier, then every CTA merges
// its own items locally (cluster_combine_and_store). One launch, no global workspace.
// On sm_90 the kernel is launched with programmatic stream serialization: it waits for the
// previous kernel of the stream (griddepcontrol.wait) before reading any input, so only its
// launch overlaps that kernel's tail.
// Paged geometry from device memory is clamped, never followed out of bounds: seg_len into
// [0, page_width * P] (0 when the pool is empty), page ids into [0, num_pages); only table
// entries of tiles below seg_len are read. With seg_index (the segment_index argument), each CTA
// loads seg_index[s] once, after griddepcontrol.wait, and reads seg_len and the table at that
// row; a row outside [0, table_rows) (-1: padding; anything else is treated the same, no host
// check is possible) is an empty segment: no seg_len or table read, out 0, lse -inf. The
// query and output rows stay those of segment s.
// Row r sees keys n < n_r = len - T + 1 + (r % T) (causal among the T newest); a row with no
// visible key keeps m = -inf, l = 0 and produces out = 0, lse = -inf (SPEC section 9: the only
// -inf lse). A NaN logit makes l NaN (fmaxf keeps m finite or -inf, exp2f(NaN) = NaN); every
// merge below (warps, cluster, decode_merge.cuh) keeps it NaN: out and lse NaN, never "empty".
#pragma once

#include <cooperative_groups.h>

#include <cstdint>

#include "cuda/decode_params.cuh"
#include "cuda/hopper.cuh"
#include "cuda/mma.cuh"
#include "cuda/softmax_state.cuh"

namespace adakv {
namespace cuda {
namespace decode {

// Two floats -> one 32-bit register of two 16-bit values (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return uint32_t{__half_as_ushort(h.x)} | (uint32_t{__half_as_ushort(h.y)} << 16);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return uint32_t{__bfloat16_as_ushort(h.x)} | (uint32_t{__bfloat16_as_ushort(h.y)} << 16);
}

// Stores 8 consecutive values a[i] * scale (16-B aligned destination): one 16-B store for
// 16-bit types, two for fp32.
template <typename T>
__device__ __forceinline__ void store8(T* dst, const float (&a)[8], float scale) {
  if constexpr (std::is_same_v<T, float>) {
    reinterpret_cast<float4*>(dst)[0] =
        make_float4(a[0] * scale, a[1] * scale, a[2] * scale, a[3] * scale);
    reinterpret_cast<float4*>(dst)[1] =
        make_float4(a[4] * scale, a[5] * scale, a[6] * scale, a[7] * scale);
  } else {
    uint4 u;
    u.x = pack2<T>(a[0] * scale, a[1] * scale);
    u.y = pack2<T>(a[2] * scale, a[3] * scale);
    u.z = pack2<T>(a[4] * scale, a[5] * scale);
    u.w = pack2<T>(a[6] * scale, a[7] * scale);
    *reinterpret_cast<uint4*>(dst) = u;
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// The clamped geometry of segment s (SPEC section 9: starts, lengths, segment_index entries and
// page tables come from device memory and are never trusted). Contiguous: the segment's keys
// are rows [start, start + len) with start in [0, rows] and len in [0, rows - start]. Paged:
// its keys are looked up in table row `row` (of page_table / seg_len), len in
// [0, page_width * P] (0 for an empty pool); with a segment_index, an entry outside
// [0, table_rows) (-1: padding) is an empty segment that reads neither seg_len nor the table
// (row 0 then, never used: len = 0 means no tile and no table entry is touched).
struct SegmentGeometry {
  int64_t start;          // contiguous: first row
  int64_t row;            // paged: table row
  const int32_t* table;   // paged: page_table + row * page_width
  int len;
};

template <bool kPaged>
__device__ __forceinline__ SegmentGeometry segment_geometry(const DecodeParams& p, int s) {
  SegmentGeometry g{0, 0, nullptr, 0};
  if constexpr (kPaged) {
    int64_t row = s;
    bool in_table = true;
    if (p.seg_index != nullptr) {
      row = p.seg_index[s];
      in_table = row >= 0 && row < p.table_rows;
      if (!in_table) row = 0;
    }
    const int64_t cap =
        p.num_pages > 0 && in_table ? static_cast<int64_t>(p.page_width) * p.page_size : 0;
    g.row = row;
    g.table = p.page_table + row * p.page_width;
    g.len = in_table ? static_cast<int>(min(max(static_cast<int64_t>(p.seg_len[row]), int64_t{0}), cap))
                     : 0;
  } else {
    g.start = min(max(static_cast<int64_t>(p.seg_start[s]), int64_t{0}), p.rows);
    g.len = static_cast<int>(
        min(max(static_cast<int64_t>(p.seg_len[s]), int64_t{0}), p.rows - g.start));
  }
  return g;
}

// Cache row of the first key of a tile that lies in one page (or the contiguous layout):
// key0 is a multiple of kTileKeys and P % kTileKeys == 0 (paged), page_id the raw table entry
// of the key's page, clamped into the pool here (bounds).
template <bool kPaged>
__device__ __forceinline__ int64_t tile_row0(const DecodeParams& p, const SegmentGeometry& g,
                                             int key0, int32_t page_id) {
  if constexpr (kPaged) {
    const int slot = p.page_shift >= 0 ? key0 & (p.page_size - 1) : key0 % p.page_size;
    const int64_t page = min(max(static_cast<int64_t>(page_id), int64_t{0}), p.num_pages - 1);
    return page * p.page_size + slot;
  } else {
    return g.start + key0;
  }
}

// The raw table entry of the page holding key `key` of a paged segment (key < len, so the
// entry is inside the segment's row of the table).
__device__ __forceinline__ int32_t page_entry(const DecodeParams& p, const SegmentGeometry& g,
                                              int key) {
  const int pg = p.page_shift >= 0 ? key >> p.page_shift : key / p.page_size;
  return g.table[pg];
}

// Issues the copies of one warp tile: kTileKeys rows of K and V, tile row r from cache row
// row_of(r), into the (swizzled) shared tiles at byte addresses sk / sv. Only the first
// `valid_rows` rows are read; the others are zero-filled.
template <typename Tr, typename T, typename RowOf>
__device__ __forceinline__ void load_tile(uint32_t sk, uint32_t sv, const T* __restrict__ k,
                                          const T* __restrict__ v, RowOf row_of, int valid_rows,
                                          int lane) {
  constexpr int kChunks = Tr::kTileKeys * Tr::kCPR;
  constexpr int D = Tr::kCPR * Tr::kEPC;
#pragma unroll
  for (int it = 0; it < (kChunks + 31) / 32; ++it) {
    const int i = lane + it * 32;
    if (kChunks % 32 == 0 || i < kChunks) {
      const int r = i / Tr::kCPR, c = i % Tr::kCPR;
      const bool ok = r < valid_rows;
      // bounds: only rows < valid_rows (inside the split, hence inside the clamped segment and
      // the cache) are read; the others read nothing (src-size 0) and use the base pointer.
      // Their shared rows are zero-filled: zero K and V keep the masked products finite.
      const int64_t off = ok ? row_of(r) * D + c * Tr::kEPC : 0;
      const uint32_t dst = static_cast<uint32_t>(r * Tr::kCPR + (c ^ (r & Tr::kSwz))) * 16u;
      cp_async_16(sk + dst, k + off, ok ? 16 : 0);
      cp_async_16(sv + dst, v + off, ok ? 16 : 0);
    }
  }
}

// Online-softmax state of one warp's 16 x D query tile on the tensor-core path (m16n8k16
// fragment ownership: this lane holds rows r_lo = lane / 4 and r_lo + 8, and in each 8-column
// block i of O the columns i * 8 + (lane % 4) * 2 + {0, 1}). m: running base-2 max per row,
// l: this lane's part of the row sum until reduce_l() adds the quad's parts.
template <int D>
struct MmaRowState {
  float o[D / 8][4];
  float m_lo, m_hi, l_lo, l_hi;
  __device__ __forceinline__ void reset() {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    m_lo = m_hi = neg_inf();
    l_lo = l_hi = 0.f;
  }
  __device__ __forceinline__ void reduce_l() {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
  }
};

// One 16-key tile of the tensor-core path for one warp: S = Q K^T (Q's A fragment of k-step
// ks from a_frag(ks, a), K / V from the swizzled shared tiles at sk / sv), the scale (base 2)
// and the mask (key n = key0 + column visible to row r_lo iff n < lim_lo, row r_lo + 8 iff
// n < lim_hi), the online softmax update of st, then O += P V (the two S n-tiles in the C
// layout are exactly the A fragment of one k16 step).
template <typename T, int D, typename AFrag>
__device__ __forceinline__ void mma_attend_tile(AFrag a_frag, uint32_t sk, uint32_t sv, int key0,
                                                int lim_lo, int lim_hi, float scale_log2,
                                                MmaRowState<D>& st) {
  constexpr int kCPR = D / 8;
  const int lane = threadIdx.x & 31;
  // ldmatrix source rows: A operand (Q) and V^T (trans) use matrices (rows 0-7 | 8-15) x
  // (chunk 2k | 2k + 1) in the order lo/lo, hi/lo, lo/hi, hi/hi; K uses lo/lo, lo/hi, hi/lo,
  // hi/hi so that registers {0, 1} / {2, 3} are the two 8-key n-tiles.
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_chunk = lane >> 4;
  const int b_row = (lane & 7) + (lane >> 4) * 8, b_chunk = (lane >> 3) & 1;
  const int sw = lane & 7;  // == row & 7 for every source row above
  float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[4], b[4];
    a_frag(ks, a);
    ldmatrix_x4(b, sk + static_cast<uint32_t>(b_row * kCPR + ((2 * ks + b_chunk) ^ sw)) * 16u);
    mma_16816<T>(sc[0], a, b[0], b[1]);
    mma_16816<T>(sc[1], a, b[2], b[3]);
  }
  const int kc = key0 + (lane & 3) * 2;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int n = kc + nt * 8 + e;
      sc[nt][e] = n < lim_lo ? sc[nt][e] * scale_log2 : neg_inf();
      sc[nt][2 + e] = n < lim_hi ? sc[nt][2 + e] * scale_log2 : neg_inf();
    }
  }
  float mx_lo = fmaxf(fmaxf(sc[0][0], sc[0][1]), fmaxf(sc[1][0], sc[1][1]));
  float mx_hi = fmaxf(fmaxf(sc[0][2], sc[0][3]), fmaxf(sc[1][2], sc[1][3]));
  mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
  mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
  mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
  mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
  // a row with no visible key so far keeps m = -inf; subtract 0 then (exp2(-inf) = 0)
  float mu_lo, mu_hi;
  const float c_lo = softmax_rescale(st.m_lo, mx_lo, mu_lo);
  const float c_hi = softmax_rescale(st.m_hi, mx_hi, mu_hi);
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    sc[nt][0] = exp2f(sc[nt][0] - mu_lo);
    sc[nt][1] = exp2f(sc[nt][1] - mu_lo);
    sc[nt][2] = exp2f(sc[nt][2] - mu_hi);
    sc[nt][3] = exp2f(sc[nt][3] - mu_hi);
  }
  st.l_lo = st.l_lo * c_lo + (sc[0][0] + sc[0][1]) + (sc[1][0] + sc[1][1]);
  st.l_hi = st.l_hi * c_hi + (sc[0][2] + sc[0][3]) + (sc[1][2] + sc[1][3]);
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    st.o[i][0] *= c_lo;
    st.o[i][1] *= c_lo;
    st.o[i][2] *= c_hi;
    st.o[i][3] *= c_hi;
  }
  const uint32_t pa[4] = {pack2<T>(sc[0][0], sc[0][1]), pack2<T>(sc[0][2], sc[0][3]),
                          pack2<T>(sc[1][0], sc[1][1]), pack2<T>(sc[1][2], sc[1][3])};
#pragma unroll
  for (int dp = 0; dp < D / 16; ++dp) {
    uint32_t b[4];
    ldmatrix_x4_trans(b, sv + static_cast<uint32_t>(a_row * kCPR + ((2 * dp + a_chunk) ^ sw)) * 16u);
    mma_16816<T>(st.o[2 * dp], pa, b[0], b[1]);
    mma_16816<T>(st.o[2 * dp + 1], pa, b[2], b[3]);
  }
}

// Merge of the kWarps warp states of local row r, dims [d0, d0 + 8): acc = the unnormalised
// merged o, returns (M, L). No warp is skipped (softmax_state.cuh): an empty warp weighs 0, a
// NaN warp (l NaN, m possibly -inf) keeps the row NaN.
template <typename Tr>
__device__ __forceinline__ float2 merge_warp_states(const float* o_s, const float* m_s,
                                                    const float* l_s, int r, int d0,
                                                    float (&acc)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = 0.f;
  return merge_states(
      Tr::kWarps, [&](int w) { return m_s[w * Tr::kRows + r]; },
      [&](int w) { return l_s[w * Tr::kRows + r]; },
      [&](int w, float wgt) {
        const float4* src =
            reinterpret_cast<const float4*>(o_s + (w * Tr::kRows + r) * Tr::kLdO + d0);
        const float4 a = src[0], b = src[1];
        acc[0] += wgt * a.x; acc[1] += wgt * a.y; acc[2] += wgt * a.z; acc[3] += wgt * a.w;
        acc[4] += wgt * b.x; acc[5] += wgt * b.y; acc[6] += wgt * b.z; acc[7] += wgt * b.w;
      });
}

// Cross-warp merge of the per-warp states (o_s [warp][row][kLdO] unnormalised, m_s / l_s
// [warp][row], base-2 max and sum) and the store of the CTA's rows: final output + lse when
// num_splits == 1, else the normalised fp32 partial and its base-2 lse.
template <typename Tr, typename T>
__device__ __forceinline__ void combine_and_store(const DecodeParams& p, const float* o_s,
                                                  const float* m_s, const float* l_s, int s,
                                                  int split, int row_base) {
  constexpr int D = Tr::kCPR * Tr::kEPC;
  constexpr int kGroups = D / 8;  // 8 dims per item: one 16-B store of a 16-bit output
  static_assert(D % 8 == 0, "head dim must be a multiple of 8");
  for (int i = threadIdx.x; i < Tr::kRows * kGroups; i += Tr::kThreads) {
    const int r = i / kGroups, d0 = (i % kGroups) * 8;
    const int rg = row_base + r;
    if (rg >= p.GT) continue;  // padding rows of the last query block
    float acc[8];
    const float2 ML = merge_warp_states<Tr>(o_s, m_s, l_s, r, d0, acc);
    const float M = ML.x, L = ML.y;
    // L == 0 iff no key was visible (out 0, lse -inf); L = NaN: acc is NaN too, out and lse NaN
    const float inv = inv_or_zero(L);
    const int64_t row = static_cast<int64_t>(s) * p.GT + rg;
    if (p.num_splits == 1) {
      store8<T>(static_cast<T*>(p.out) + row * D + d0, acc, inv);
      if (p.lse != nullptr && d0 == 0) p.lse[row] = state_lse2(M, L) * kLn2;
    } else {
      const int64_t prow = static_cast<int64_t>(split) * p.S * p.GT + row;
      store8<float>(p.part_o + prow * D + d0, acc, inv);
      if (d0 == 0) p.part_lse[prow] = state_lse2(M, L);
    }
  }
}

// Cluster path (sm_90): the num_splits CTAs of a (segment, query block) merge their partials
// by pushing them into each other's shared memory. Items are (query row, 4-dim group) pairs of
// the block's real rows, in order; CTA k owns the k-th run of ceil(items / num_splits) of them.
// Each CTA merges its warps into a normalised partial (base-2 lse per row) and stores every item
// of it into the owner's receive area (recv_o[(item - first item of owner) * num_splits +
// split], float4) and its row lse into every CTA's recv_lse[row][split], through distributed
// shared memory; after one cluster barrier (release / acquire) each CTA merges the items it
// owns from its own shared memory by log-sum-exp and writes them out. Remote accesses are
// stores before that barrier only, so no second barrier is needed; the barrier phase armed at
// kernel entry (cluster_arrive_relaxed) guarantees every peer has started before it is written.
// (cluster_arrive_relaxed / cluster_arrive_release / cluster_wait: cuda/hopper.cuh)
template <typename Tr, typename T>
__device__ __forceinline__ void cluster_combine_and_store(const DecodeParams& p, const float* o_s,
                                                          const float* m_s, const float* l_s,
                                                          unsigned char* recv, int s, int split,
                                                          int row_base) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int D = Tr::kCPR * Tr::kEPC;
  constexpr int kGroups = D / 8;
  constexpr int kG4 = D / 4;
  cg::cluster_group cluster = cg::this_cluster();
  float4* recv_o = reinterpret_cast<float4*>(recv);
  float* recv_lse = reinterpret_cast<float*>(recv + Tr::kRecvOBytes);
  const int ns = p.num_splits;  // == cluster size
  const int rows_here = min(Tr::kRows, p.GT - row_base);  // >= 1: grid has no empty block
  const int n_items = rows_here * kG4;
  const int per_owner = (n_items + ns - 1) / ns;
  cluster_wait();  // entry phase: every CTA of the cluster runs, its shared memory may be written
  for (int i = threadIdx.x; i < rows_here * kGroups; i += Tr::kThreads) {
    const int r = i / kGroups, d0 = (i % kGroups) * 8;
    float acc[8];
    const float2 ML = merge_warp_states<Tr>(o_s, m_s, l_s, r, d0, acc);
    const float M = ML.x, L = ML.y;
    const float inv = inv_or_zero(L);  // as in combine_and_store
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int item = r * kG4 + d0 / 4 + h;
      const int owner = item / per_owner;
      float4* dst = cluster.map_shared_rank(recv_o, static_cast<unsigned>(owner)) +
                    (item - owner * per_owner) * ns + split;
      *dst = make_float4(acc[4 * h] * inv, acc[4 * h + 1] * inv, acc[4 * h + 2] * inv,
                         acc[4 * h + 3] * inv);
    }
    // the row's lse goes to every CTA; the row's threads share the ns stores
    const float lse2 = state_lse2(M, L);  // NaN for a NaN partial
    for (int o = i % kGroups; o < ns; o += kGroups) {
      cluster.map_shared_rank(recv_lse, static_cast<unsigned>(o))[r * kMaxCluster + split] = lse2;
    }
  }
  cluster_arrive_release();
  cluster_wait();  // every partial of the cluster has landed in its owner's shared memory

  const int i0 = split * per_owner, i1 = min(n_items, i0 + per_owner);
  for (int item = i0 + threadIdx.x; item < i1; item += Tr::kThreads) {
    const int r = item / kG4, d0 = (item % kG4) * 4;
    const float4* src = recv_o + (item - i0) * ns;
    // A NaN partial (lse NaN, o NaN) is dropped by fmaxf from M but not from the sum:
    // exp2f(NaN - Mu) = NaN, so sum, out and lse become NaN; with M = -inf (no partial saw a
    // finite logit) the weights use 0 instead of M, so empty partials still weigh 0.
    // Each partial is the state (lse, 1, o) (softmax_state.cuh).
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    const float2 ML = merge_states(
        ns, [&](int sp) { return recv_lse[r * kMaxCluster + sp]; }, [](int) { return 1.f; },
        [&](int sp, float w) {
          const float4 x = src[sp];
          acc.x += w * x.x; acc.y += w * x.y; acc.z += w * x.z; acc.w += w * x.w;
        });
    const float M = ML.x, sum = ML.y;
    const float inv = inv_or_zero(sum);
    const int64_t row = static_cast<int64_t>(s) * p.GT + row_base + r;
    T* dst = static_cast<T*>(p.out) + row * D + d0;
    if constexpr (std::is_same_v<T, float>) {
      *reinterpret_cast<float4*>(dst) = make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
    } else {
      *reinterpret_cast<uint2*>(dst) =
          make_uint2(pack2<T>(acc.x * inv, acc.y * inv), pack2<T>(acc.z * inv, acc.w * inv));
    }
    if (p.lse != nullptr && d0 == 0) p.lse[row] = state_lse2(M, sum) * kLn2;
  }
#else
  __trap();  // the launcher uses the cluster path on sm_90 and newer only
#endif
}

template <typename T, int D, bool kCluster, bool kPaged>
__global__ void __launch_bounds__(DecodeTraits<T, D>::kThreads)
    decode_split_kernel(const DecodeParams p) {
  using Tr = DecodeTraits<T, D>;
  constexpr int kWarps = Tr::kWarps, kRows = Tr::kRows, kTileKeys = Tr::kTileKeys;
  constexpr int kStages = Tr::kStages, kCPR = Tr::kCPR, kEPC = Tr::kEPC, kSwz = Tr::kSwz;
  extern __shared__ __align__(128) unsigned char smem[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if constexpr (kCluster) cluster_arrive_relaxed();  // phase waited on before any DSMEM store
  int bid = blockIdx.x;
  int mb, split, s;
  if constexpr (kCluster) {  // (s, mb, split): the splits of one query block form a cluster
    split = bid % p.num_splits;
    bid /= p.num_splits;
    mb = bid % p.num_mblocks;
    s = bid / p.num_mblocks;
  } else {  // (s, split, mb)
    mb = bid % p.num_mblocks;
    bid /= p.num_mblocks;
    split = bid % p.num_splits;
    s = bid / p.num_splits;
  }
  // Programmatic dependent launch: nothing of the previous kernel is read before this point.
  pdl_wait();

  // bounds: the segment geometry comes from device memory, clamped (segment_geometry) so that
  // every row read below lies in [0, rows) (contiguous) or in the pool (paged: page ids
  // clamped into [0, num_pages) in key_row / tile_row0).
  const SegmentGeometry geo = segment_geometry<kPaged>(p, s);
  const int64_t len = geo.len;
  int64_t chunk = (len + p.num_splits - 1) / p.num_splits;
  chunk = (chunk + kTileKeys - 1) / kTileKeys * kTileKeys;
  const int begin = static_cast<int>(min(static_cast<int64_t>(split) * chunk, len));
  const int end = static_cast<int>(min(static_cast<int64_t>(begin) + chunk, len));
  const int n_tiles = (end - begin + kTileKeys - 1) / kTileKeys;
  const int my_tiles = warp < n_tiles ? (n_tiles - warp + kWarps - 1) / kWarps : 0;
  const int row_base = mb * kRows;

  const T* __restrict__ kp = static_cast<const T*>(p.k);
  const T* __restrict__ vp = static_cast<const T*>(p.v);
  unsigned char* ring = smem + Tr::kQBytes;
  const uint32_t ring_addr = smem_u32(ring) + static_cast<uint32_t>(warp * kStages * Tr::kStageBytes);
  constexpr uint32_t kVOffset = Tr::kTileElems * sizeof(T);
  auto tile_key0 = [&](int j) { return begin + (warp + j * kWarps) * kTileKeys; };
  // Cache row of key `key` (< len) of the segment, looked up per row (a tile may straddle
  // pages when P % kTileKeys != 0; for P >= kTileKeys a tile's rows share one table entry, an
  // L1 hit).
  auto key_row = [&](int key) -> int64_t {
    if constexpr (kPaged) {
      int pg, slot;
      if (p.page_shift >= 0) {
        pg = key >> p.page_shift;
        slot = key & (p.page_size - 1);
      } else {
        pg = key / p.page_size;
        slot = key - pg * p.page_size;
      }
      // bounds: key < len <= page_width * P, so the table entry is inside the segment's row of
      // the table; the page id is clamped into the pool
      const int32_t id = page_entry(p, geo, key);
      const int64_t page = min(max(static_cast<int64_t>(id), int64_t{0}), p.num_pages - 1);
      return page * p.page_size + slot;
    } else {
      return geo.start + key;
    }
  };
  // Contiguous, or pages holding whole tiles (P % kTileKeys == 0): one table entry per tile.
  const bool whole_tiles = !kPaged || p.page_size % kTileKeys == 0;
  // The raw table entry of tile j's page (paged, whole tiles; j < my_tiles, so the entry is
  // inside the segment's row of the table).
  auto tile_page_id = [&](int j) -> int32_t {
    if constexpr (kPaged) {
      return page_entry(p, geo, tile_key0(j));
    } else {
      return 0;
    }
  };
  // Paged, whole tiles: the entries of this warp's tiles, kIdBatch at a time in registers (lane
  // i holds the entry of tile b * kIdBatch + i of batch b). Batch b + 1 is loaded when batch b
  // comes into use, kIdBatch tiles before its first entry is needed: a table read one tile
  // ahead still stalled the warp (one tile of compute is shorter than the read's latency).
  constexpr int kIdBatch = 32;
  const bool id_batches = kPaged && whole_tiles;
  auto load_ids = [&](int t0) -> int32_t {
    const int t = t0 + lane;
    return t < my_tiles ? tile_page_id(t) : 0;  // bounds: only tiles of this warp's split
  };
  int32_t ids_cur = id_batches ? load_ids(0) : 0;
  int32_t ids_next = id_batches ? load_ids(kIdBatch) : 0;
  // The raw table entry of tile t, for t = 0, 1, 2, ... in this order (each tile's copies are
  // issued once, in tile order), called by the whole warp (my_tiles is warp-uniform).
  auto page_id_of = [&](int t) -> int32_t {
    if (!id_batches) return 0;
    if (t > 0 && t % kIdBatch == 0) {
      ids_cur = ids_next;
      ids_next = load_ids(t + kIdBatch);
    }
    return __shfl_sync(0xffffffffu, ids_cur, t % kIdBatch);
  };
  auto issue = [&](int j, int32_t page_id) {
    const int key0 = tile_key0(j);
    const uint32_t sk = ring_addr + static_cast<uint32_t>((j % kStages) * Tr::kStageBytes);
    if (whole_tiles) {
      const int64_t row0 = tile_row0<kPaged>(p, geo, key0, page_id);  // page id clamped
      load_tile<Tr>(sk, sk + kVOffset, kp, vp, [=](int r) { return row0 + r; }, end - key0,
                    lane);
    } else {
      load_tile<Tr>(sk, sk + kVOffset, kp, vp, [&](int r) { return key_row(key0 + r); },
                    end - key0, lane);
    }
  };
  // Exclusive key limit of local query row r, clamped into [begin, end] (begin: no key).
  auto row_limit = [&](int r) -> int {
    const int rg = row_base + r;
    if (rg >= p.GT) return begin;
    const int64_t n = len - p.T + 1 + rg % p.T;
    return static_cast<int>(min(max(n, static_cast<int64_t>(begin)), static_cast<int64_t>(end)));
  };

  // Prologue: put kStages - 1 tiles in flight (empty groups keep the group count uniform).
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < my_tiles) issue(st, page_id_of(st));
    cp_async_commit();
  }

  float* o_s = reinterpret_cast<float*>(ring);
  float* m_s = o_s + kWarps * kRows * Tr::kLdO;
  float* l_s = m_s + kWarps * kRows;

  if constexpr (Tr::kMma) {
    static_assert(kSwz == 7 && D % 16 == 0, "mma path needs D >= 64");
    // Q tile [kRows][D] in shared memory (swizzled like K/V), rows past GT zero.
    T* q_s = reinterpret_cast<T*>(smem);
    const T* __restrict__ qp = static_cast<const T*>(p.q);
    for (int i = threadIdx.x; i < kRows * kCPR; i += Tr::kThreads) {
      const int r = i / kCPR, c = i % kCPR, rg = row_base + r;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (rg < p.GT) {
        val = *reinterpret_cast<const uint4*>(qp + (static_cast<int64_t>(s) * p.GT + rg) * D +
                                              c * kEPC);
      }
      *reinterpret_cast<uint4*>(q_s + (r * kCPR + (c ^ (r & kSwz))) * kEPC) = val;
    }
    __syncthreads();

    // Fragment ownership (m16n8k16): this lane holds rows r_lo = lane / 4 and r_lo + 8 and key
    // columns (lane % 4) * 2 + {0, 1} (+ 8) of S, and the same rows of O.
    const int r_lo = lane >> 2;
    const int lim_lo = row_limit(r_lo), lim_hi = row_limit(r_lo + 8);
    // Q's A fragments through ldmatrix (the matrix order of mma_attend_tile)
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_chunk = lane >> 4;
    const int sw = lane & 7;  // == row & 7 (the Q tile is swizzled like K / V)
    const uint32_t q_addr = smem_u32(q_s);

    MmaRowState<D> st;
    st.reset();

    for (int j = 0; j < my_tiles; ++j) {
      if (j + kStages - 1 < my_tiles) issue(j + kStages - 1, page_id_of(j + kStages - 1));
      cp_async_commit();
      cp_async_wait<kStages - 1>();  // this lane's copies of tile j have landed
      __syncwarp();                  // ... and every lane's are visible
      const uint32_t sk = ring_addr + static_cast<uint32_t>((j % kStages) * Tr::kStageBytes);
      const uint32_t sv = sk + kVOffset;

      mma_attend_tile<T, D>(
          [&](int ks, uint32_t (&a)[4]) {
            ldmatrix_x4(a, q_addr + static_cast<uint32_t>(a_row * kCPR + ((2 * ks + a_chunk) ^ sw)) * 16u);
          },
          sk, sv, tile_key0(j), lim_lo, lim_hi, p.scale_log2, st);
      __syncwarp();  // all lanes are done with this stage before it is refilled
    }
    cp_async_wait<0>();
    st.reduce_l();
    float(&o)[D / 8][4] = st.o;
    const float m_lo = st.m_lo, m_hi = st.m_hi, l_lo = st.l_lo, l_hi = st.l_hi;
    __syncthreads();  // every warp is done with the ring: reuse it for the cross-warp merge
    float* ow = o_s + warp * kRows * Tr::kLdO;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const int col = i * 8 + (lane & 3) * 2;
      *reinterpret_cast<float2*>(ow + r_lo * Tr::kLdO + col) = make_float2(o[i][0], o[i][1]);
      *reinterpret_cast<float2*>(ow + (r_lo + 8) * Tr::kLdO + col) = make_float2(o[i][2], o[i][3]);
    }
    if ((lane & 3) == 0) {
      m_s[warp * kRows + r_lo] = m_lo;
      m_s[warp * kRows + r_lo + 8] = m_hi;
      l_s[warp * kRows + r_lo] = l_lo;
      l_s[warp * kRows + r_lo + 8] = l_hi;
    }
  } else {
    // CUDA-core path (fp32, small head dims): lane owns dims d = lane + 32 i; every lane keeps
    // the (warp-uniform) m, l of all kRows rows. One key at a time, warp-reduced dot products.
    constexpr int kDPL = Tr::kDimsPerLane;
    const T* __restrict__ qp = static_cast<const T*>(p.q);
    float q[kRows][kDPL], acc[kRows][kDPL], m[kRows], l[kRows];
    int lim[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int rg = row_base + r;
#pragma unroll
      for (int i = 0; i < kDPL; ++i) {
        const int d = lane + 32 * i;
        q[r][i] = (rg < p.GT && (D % 32 == 0 || d < D))
                      ? to_float(qp[(static_cast<int64_t>(s) * p.GT + rg) * D + d])
                      : 0.f;
        acc[r][i] = 0.f;
      }
      m[r] = neg_inf();
      l[r] = 0.f;
      lim[r] = row_limit(r);
    }
    const T* ring_t = reinterpret_cast<const T*>(ring + warp * kStages * Tr::kStageBytes);
    for (int j = 0; j < my_tiles; ++j) {
      if (j + kStages - 1 < my_tiles) issue(j + kStages - 1, page_id_of(j + kStages - 1));
      cp_async_commit();
      cp_async_wait<kStages - 1>();
      __syncwarp();
      const T* tk = ring_t + (j % kStages) * (2 * Tr::kTileElems);
      const T* tv = tk + Tr::kTileElems;
      const int key0 = tile_key0(j);
      const int nk = min(kTileKeys, end - key0);
      for (int kk = 0; kk < nk; ++kk) {
        float kv[kDPL], vv[kDPL];
#pragma unroll
        for (int i = 0; i < kDPL; ++i) {
          const int d = lane + 32 * i;
          const int idx = kk * D + ((d / kEPC) ^ (kk & kSwz)) * kEPC + d % kEPC;
          const bool ok = D % 32 == 0 || d < D;
          kv[i] = ok ? to_float(tk[idx]) : 0.f;
          vv[i] = ok ? to_float(tv[idx]) : 0.f;
        }
        const int n = key0 + kk;
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float dot = 0.f;
#pragma unroll
          for (int i = 0; i < kDPL; ++i) dot = fmaf(q[r][i], kv[i], dot);
          dot = warp_sum(dot);
          if (n < lim[r]) {  // warp-uniform
            const float x = dot * p.scale_log2;
            // -inf logits weigh 0 even while the running max is still -inf (exp2f(-inf - -inf)
            // would be NaN): the same rule as the tensor-core path and the CPU kernel.
            float mu;
            const float c = softmax_rescale(m[r], x, mu);
            const float pr = exp2f(x - mu);
            l[r] = l[r] * c + pr;
#pragma unroll
            for (int i = 0; i < kDPL; ++i) acc[r][i] = fmaf(pr, vv[i], acc[r][i] * c);
          }
        }
      }
      __syncwarp();
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with the ring: reuse it for the cross-warp merge
    float* ow = o_s + warp * kRows * Tr::kLdO;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int i = 0; i < kDPL; ++i) {
        const int d = lane + 32 * i;
        if (D % 32 == 0 || d < D) ow[r * Tr::kLdO + d] = acc[r][i];
      }
      if (lane == 0) {
        m_s[warp * kRows + r] = m[r];
        l_s[warp * kRows + r] = l[r];
      }
    }
  }
  __syncthreads();
  // The next PDL kernel may start launching; its pdl_wait still waits for all of us.
  pdl_launch_dependents();
  if constexpr (kCluster) {
    cluster_combine_and_store<Tr, T>(p, o_s, m_s, l_s, smem + Tr::kBodyBytes, s, split, row_base);
  } else {
    combine_and_store<Tr, T>(p, o_s, m_s, l_s, s, split, row_base);
  }
}

}  // namespace decode
}  // namespace cuda
}  // namespace adakv
