// Kernels of adakv::score and adakv::defensive_score (CUDA). The launchers and the algorithm
// overview are in score.cu.
//
// Row numbering. The G * W window queries of KV head (b, h) are the contiguous rows
// q_window[b, h*G : (h+1)*G, :, :] = [G * W, D]. Inside the kernels query (g, t) gets the padded
// row index rp = g * Wp + t, where Wp = W rounded up to 16 on the tensor-core path (so that
// every 16-row mma tile belongs to one query head g) and Wp = W on the SIMT path. Rows with
// t >= W, rows past R_pad = G * Wp and padding queries (L + t < key_start) are "invalid": the
// combine kernel gives them (m, 1/l) = (+inf, 0), so they contribute exactly 0 in pass 2.
//
// Logits are kept in the log2 domain: x = (q . k) * scale * log2(e), p = 2^(x - m) / l.
//
// defensive_score (template flag kDef) runs the same passes with more row statistics. Notation:
// ks = key_start of the batch row, r = the pooling radius min(kernel_size / 2, L - 1),
// e_j = 2^(x_j - m) (so p_j = e_j / l), and for a prefix key j in [ks, L) its pooling coverage
// c_j = min(L - 1, j + r) - max(ks, j - r) + 1 (how many of the row's pooled columns read it).
//   pass 1   per row slot, besides the running max m, four sums of e rescaled with it:
//            pre = sum over the valid prefix keys [ks, L), win = over the window keys [L, N),
//            tot = sum_j c_j e_j over the prefix (so the pooled row sums to tot / (l kernel_size)
//            before anything is pooled), slip = over the last W prefix keys [max(ks, L - W), L).
//            Tiles whose keys all have c_j = 2r + 1, outside slip (interior tiles), add the tile
//            sum to pre and (2r + 1) times it to tot; the others classify key by key.
//   combine  per row: (m, 1/l) with l = pre + win as for score, and in `drow` the pooled row's
//            factor c_row = pre / (tot l) (0 when tot is not > 0: D7; so that c_row * sum of e
//            over a pooling window = pooled / sum(pooled) * prefix mass), the window mass win / l
//            and the slip mass slip / l.
//   pass 2   tiles of kBN keys overlapping by 2 r keys (a halo of r on each side of the tile's
//            kBN - 2 r output columns), so every pooling window of an output column lies in its
//            tile: e of every (row, key) staged in shared memory, then per output column
//            snap_mean = sum over the rows of e / l (the unpooled SnapKV mean, / W / G) and
//            R = max over the rows of c_row * (sum of the 2 r + 1 taps). R before its floor goes
//            to `out`, its sum over the chunk's valid columns to `rsum`.
//   finish   R = max(R, mean of R over [ks, L)) in place, -inf on padding columns, and the
//            window masses [B, 2] (mean over the Hq * W rows of a batch row, 0 without a prefix).
// A row whose prefix windows all cover the whole valid prefix (r = L - 1, `pool_whole`) has the
// same pooled value on every column, base / L_b: c_row holds it and pass 2 reads no halo.
#pragma once

#include <cstdint>

#include "allocation_rules.h"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/simt_tile.cuh"

namespace adakv {
namespace cuda {
namespace score_detail {

constexpr int kThreads = 256;    // every kernel of the family
constexpr int kBN = 64;          // keys per tile, tensor-core path
constexpr int kRowBlock = 128;   // query rows per row block: 4 row warps x 32 rows
constexpr int kSimtRows = kSimtTile;  // SIMT path: rows x keys per tile (simt_tile.cuh)
constexpr int kSimtKeys = kSimtTile;
constexpr int kPoolTile = 1024;  // outputs per CTA of the pooling / defensive finish kernels
// defensive_score pass 2: the largest pooling radius a key tile carries as halo (so at least
// kBN - 2 * 16 = 32 output columns per 64-key tile), and the row stride (floats) of the staged
// probability tile (kBN + 8: float2 stores of an mma fragment hit 32 distinct banks).
constexpr int kMaxDefRadius = 16;
constexpr int kPStride = kBN + 8;
static_assert(kThreads == kSimtThreads, "the SIMT tile is computed by the family's CTAs");
static_assert(kThreads % kBN == 0 && kThreads % kSimtKeys == 0, "row quarters of pass 2");

struct ScoreParams {
  const void* q;               // q_window [B, Hq, W, D]
  const void* k;               // key [B, Hk, N, D]
  const int32_t* key_start;    // [B] or nullptr
  float2* partial;             // pass 1 -> combine: [BH][nchunk1][R_stride] (max, sum) log2
  float2* rowstat;             // combine -> pass 2: [BH][R_stride] (max, 1 / sum)
  float* pre;                  // pass 2 -> pool: [BH][L] pre-pool scores
  float* out;                  // [BH][L] final scores (defensive: R, floored by the finish)
  int B, Hq, Hk, G, W, Wp, N, L, D;
  int R_pad;                   // G * Wp rows in use
  int R_stride;                // row stride of partial / rowstat
  int nrb;                     // row blocks of kRowBlock rows (tensor-core path)
  int chunk;                   // pass 1: keys per CTA (multiple of the key tile)
  int chunk2;                  // pass 2: output columns per CTA (score: chunk)
  int nchunk1, nchunk2;        // CTAs per (b, h) in pass 1 (over N keys) / pass 2 (over L)
  float scale_log2;            // scale * log2(e)
  int pool_radius;             // pooling: min(kernel_size / 2, L) taps on each side
                               // (defensive: min(kernel_size / 2, L - 1))
  float pool_divisor;          // avg pooling divides by kernel_size (padded zeros count)
  bool pool_max;
  bool pool_smem;              // pooling window fits in shared memory
  bool direct;                 // no pooling: pass 2 writes `out` (with the -inf padding)
  int pool_tiles;              // CTAs per (b, h) of the pooling / defensive finish kernel
  // defensive_score only (kDef kernels; the header comment above)
  int pool_halo;               // pass 2: keys read on each side of a tile's outputs (0 or r)
  bool pool_whole;             // r = L - 1: every pooling window covers the valid prefix
  float4* dpartial;            // pass 1 -> combine: [BH][nchunk1][R_stride] (pre, win, tot, slip)
  float4* drow;                // combine -> pass 2, finish: [BH][R_stride] (c_row, window mass,
                               //   slip mass, 0); zeros for invalid rows
  double* rsum;                // pass 2 -> finish: [BH][nchunk2] sum of R over valid columns
  float* snap;                 // [BH][L] snap_mean output
  float* wmass;                // [B][2] window_mass output
};

template <bool kMax>
__device__ __forceinline__ float reduce_op(float a, float b) {
  return kMax ? fmaxf(a, b) : a + b;
}

__device__ __forceinline__ int clamped_key_start(const ScoreParams& p, int b) {
  // bounds: key_start values are clamped into [0, N] (no host check on CUDA).
  return p.key_start != nullptr ? min(max(p.key_start[b], 0), p.N) : 0;
}

// Online merge of (max, sum) pairs in the log2 domain; (-inf, 0) is the empty pair.
__device__ __forceinline__ void merge_stat(float& m, float& l, float m2, float l2) {
  if (m2 == -INFINITY) return;
  const float mn = fmaxf(m, m2);
  l = l * fast_exp2(m - mn) + l2 * fast_exp2(m2 - mn);
  m = mn;
}

// The same merge for four sums sharing one max (defensive_score: pre, win, tot, slip).
__device__ __forceinline__ void merge_stat(float& m, float4& l, float m2, float4 l2) {
  if (m2 == -INFINITY) return;
  const float mn = fmaxf(m, m2);
  const float a = fast_exp2(m - mn), c = fast_exp2(m2 - mn);
  l.x = l.x * a + l2.x * c;
  l.y = l.y * a + l2.y * c;
  l.z = l.z * a + l2.z * c;
  l.w = l.w * a + l2.w * c;
  m = mn;
}

// Sum of one double per thread over a kThreads block, in one fixed order (every CTA summing the
// same values gets the same bits). Block-wide; `red` [kThreads] is free again on return.
__device__ __forceinline__ double block_sum(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const double total = red[0];
  __syncthreads();
  return total;
}

// ------------------------------------------------------------------------------------------
// Tensor-core path (fp16 / bf16, D in {64, 128, 256}).

template <int D, bool kDef = false, bool kPass2 = false>
struct MmaCfg {
  // cp.async ring of K tiles. The defensive kernels hold more per-row state (pass 1: four sums
  // per slot; pass 2: the staged probability tile) and use fewer stages, so that two CTAs still
  // fit one SM at D <= 128 (r_alloc = 128: pass 1 100 KiB, pass 2 103.5 KiB).
  static constexpr int kStages = D <= 128 ? (kDef ? (kPass2 ? 2 : 3) : 4) : 2;
  // A fragments (Q) held in registers across the key tiles (the defensive kernels need those
  // 64 registers at D = 128 for their extra state: they reload Q from shared memory per k-step)
  static constexpr bool kQRegs = kDef ? D <= 64 : D <= 128;
  static constexpr int kKSteps = D / 16;
  static constexpr int kChunksPerRow = D / 8;        // 16-byte chunks per row
  static constexpr int kMinBlocks = D <= 128 ? 2 : 1;
  static constexpr size_t kTileBytes = static_cast<size_t>(kBN) * D * 2;

  static constexpr size_t q_bytes(int r_alloc) { return static_cast<size_t>(r_alloc) * D * 2; }
  static constexpr size_t k_offset(int r_alloc) { return q_bytes(r_alloc); }
  static constexpr size_t x_offset(int r_alloc) { return q_bytes(r_alloc) + kStages * kTileBytes; }
  // pass 1: per row and per owner thread (8 owners per row) the running max and 1 sum (score) or
  // 4 sums (defensive); pass 2: per-row (max, 1/sum) + per-16-row-tile column partials (score),
  // or per-row (max, 1/sum, c_row) + the staged probability tile [r_alloc][kPStride] + the
  // [2][4][kBN] row-quarter partials (defensive).
  static constexpr size_t smem_bytes(int r_alloc) {
    const size_t r = static_cast<size_t>(r_alloc);
    if constexpr (!kPass2) return x_offset(r_alloc) + r * 8 * (kDef ? 5 : 2) * 4;
    if constexpr (!kDef) return x_offset(r_alloc) + r * 8 + (r / 16) * kBN * 4;
    return x_offset(r_alloc) + r * 3 * 4 + r * kPStride * 4 + 2 * (kThreads / kBN) * kBN * 4;
  }
};

// grid: BH * nchunk CTAs (pass 1: nchunk1 chunks of N keys, pass 2: nchunk2 chunks of L keys),
// kThreads threads = 8 warps: warp w computes rows [32 * (w % 4), +32) of each row block against
// keys [32 * (w / 4), +32) of each 64-key tile with mma.m16n8k16. kDef: the defensive_score
// variant of each pass (the header comment).
template <typename T, int D, bool kPass2, bool kAggMax, bool kGqaMax, bool kDef = false>
__global__ void __launch_bounds__(kThreads, MmaCfg<D>::kMinBlocks)
    score_mma_kernel(const ScoreParams p) {
  using Cfg = MmaCfg<D, kDef, kPass2>;
  constexpr int kS = Cfg::kStages;
  constexpr int kCPR = Cfg::kChunksPerRow;
  constexpr int kSums = kDef ? 4 : 1;  // pass 1: sums per row slot
  extern __shared__ __align__(128) unsigned char smem[];

  const int nchunk = kPass2 ? p.nchunk2 : p.nchunk1;
  const int BH = p.B * p.Hk;
  // Pass 2 walks the (b, h, chunk) space backwards: the K tiles pass 1 read last are the ones
  // still in L2.
  const int lin = kPass2 ? BH * nchunk - 1 - static_cast<int>(blockIdx.x)
                         : static_cast<int>(blockIdx.x);
  const int bh = lin / nchunk;
  const int chunk_id = lin - bh * nchunk;
  const int b = bh / p.Hk;
  const int h = bh - b * p.Hk;
  const int ks = clamped_key_start(p, b);
  const int n_end = kPass2 ? p.L : p.N;  // columns this pass covers: [0, n_end)
  // Tile `it` reads keys [c0 - halo + it * step, + kBN). Score (halo 0, step kBN): the chunk's
  // keys. Defensive pass 2: the tile's outputs are its step = kBN - 2 halo columns
  // [c0 + it * step, + step), and it reads halo = r keys on both sides of them, so that every
  // pooling window of an output lies in the tile.
  const int halo = (kDef && kPass2) ? p.pool_halo : 0;
  const int step = kBN - 2 * halo;
  const int c0 = chunk_id * (kPass2 ? p.chunk2 : p.chunk);
  const int c1 = min(c0 + (kPass2 ? p.chunk2 : p.chunk), n_end);
  const int ntiles = (c1 - c0 + step - 1) / step;  // >= 1: nchunk = ceil(n_end / chunk)
  // Keys the loader copies: [0, ld_hi), the rest is zero-filled (and masked): the chunk's own
  // keys, or with a halo every prefix key.
  const int ld_hi = (kDef && kPass2) ? p.L : c1;
  const int r_alloc = p.nrb * kRowBlock;

  const T* qg = static_cast<const T*>(p.q) +
                (static_cast<int64_t>(b) * p.Hq + static_cast<int64_t>(h) * p.G) * p.W * D;
  const T* kg = static_cast<const T*>(p.k) + static_cast<int64_t>(bh) * p.N * D;

  const uint32_t qs_base = smem_u32(smem);
  const uint32_t ks_base = smem_u32(smem + Cfg::k_offset(r_alloc));
  float* xs = reinterpret_cast<float*>(smem + Cfg::x_offset(r_alloc));

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int rw = warp & 3;   // row warp
  const int kw = warp >> 2;  // key warp
  const int rl = lane >> 2;  // row inside an 8-row half of an mma tile
  const int cl = lane & 3;   // column pair inside an 8-column mma tile

  // ---- prologue: Q rows (group 0 of cp.async), per-row state, first K tiles
  for (int c = tid; c < r_alloc * kCPR; c += kThreads) {
    const int rp = c / kCPR, ch = c % kCPR;
    const int g = rp / p.Wp, t = rp - g * p.Wp;
    const bool valid = rp < p.R_pad && t < p.W;
    // bounds: g * W + t < G * W rows of this group; invalid rows are zero-filled, not read.
    const T* src = valid ? qg + static_cast<int64_t>(g * p.W + t) * D + ch * 8 : qg;
    cp_async_16(qs_base + swizzle_offset<D>(rp, ch), src, valid ? 16 : 0);
  }
  if constexpr (kPass2) {
    for (int r = tid; r < r_alloc; r += kThreads) {
      // bounds: rowstat / drow hold R_stride >= R_pad rows per (b, h); rows past R_pad are
      // invalid.
      const int64_t o = static_cast<int64_t>(bh) * p.R_stride + r;
      const float2 v = r < p.R_pad ? p.rowstat[o] : make_float2(INFINITY, 0.f);
      xs[r] = v.x;
      xs[r_alloc + r] = v.y;
      if constexpr (kDef) xs[2 * r_alloc + r] = r < p.R_pad ? p.drow[o].x : 0.f;
    }
  } else {
    for (int i = tid; i < r_alloc * 8; i += kThreads) {
      xs[i] = -INFINITY;
#pragma unroll
      for (int k = 1; k <= kSums; ++k) xs[k * r_alloc * 8 + i] = 0.f;
    }
  }

  // K tile loader: thread tid copies chunk (tid % kCPR) of rows tid / kCPR + i * kRowsPerPass;
  // kRowsPerPass is a multiple of 8, so the swizzle (row % 8) is the same for every i.
  constexpr int kRowsPerPass = kThreads / kCPR;
  constexpr int kPasses = kBN / kRowsPerPass;
  static_assert(kRowsPerPass % 8 == 0 && kBN % kRowsPerPass == 0, "K tile loader shape");
  const int ld_row = tid / kCPR;
  const uint32_t ld_soff = swizzle_offset<D>(ld_row, tid % kCPR);
  const T* ld_src = kg + static_cast<int64_t>(ld_row) * D + (tid % kCPR) * 8;
  auto load_tile = [&](int tile, int stage) {
    const int n0 = c0 - halo + tile * step;
    if (n0 + kBN <= ks) return;  // only padding keys: never used
    const uint32_t base = ks_base + stage * static_cast<uint32_t>(Cfg::kTileBytes) + ld_soff;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int n = n0 + ld_row + i * kRowsPerPass;
      // bounds: keys outside [0, ld_hi) (past the chunk / pass range, or before key 0 in a
      // halo) are zero-filled, not read; ld_hi <= N.
      const bool valid = n >= 0 && n < ld_hi;
      cp_async_16(base + i * kRowsPerPass * D * 2,
                  valid ? ld_src + static_cast<int64_t>(n0 + i * kRowsPerPass) * D : kg,
                  valid ? 16 : 0);
    }
  };

#pragma unroll
  for (int s = 0; s < kS - 1; ++s) {
    if (s < ntiles) load_tile(s, s);
    cp_async_commit();
  }

  // ldmatrix offsets (mma.cuh); the B rows of this key warp start at key kw * 32.
  uint32_t a_off[4], b_off[4];
  ldsm_a_offsets<D>(a_off, lane);
  ldsm_b_offsets<D>(b_off, lane);
#pragma unroll
  for (int c = 0; c < 4; ++c) b_off[c] += static_cast<uint32_t>(kw * 32) * D * 2;
  auto load_a = [&](uint32_t (&a)[4], int row0, int kk) {
    ldmatrix_x4(a, qs_base + row0 * D * 2 + a_off[kk & 3] + (kk >> 2) * 128);
  };

  uint32_t afrag[Cfg::kQRegs ? 2 : 1][Cfg::kQRegs ? Cfg::kKSteps : 1][4];

  // Defensive pass 1: keys in [slip_lo, L) add to slip; a tile of keys inside [ks + r, int_hi)
  // is interior (all visible to every row, in the prefix, outside slip, c_j = 2 r + 1).
  const int r_pool = kDef ? p.pool_radius : 0;
  const int slip_lo = max(ks, p.L - p.W);
  const int int_hi = min(slip_lo, p.L - r_pool);
  const float cover_full = static_cast<float>(2 * r_pool + 1);
  float racc = 0.f;  // defensive pass 2, threads < kBN: this CTA's sum of R over valid columns

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<kS - 2>();
    __syncthreads();  // tile `it` visible to all; stage (it - 1) % kS free again
    {
      const int nt = it + kS - 1;
      if (nt < ntiles) load_tile(nt, nt % kS);
      cp_async_commit();
    }
    const int n0 = c0 - halo + it * step;
    const uint32_t kbase = ks_base + (it % kS) * static_cast<uint32_t>(Cfg::kTileBytes);
    const bool skip = n0 + kBN <= ks;  // every key is padding (uniform over the CTA)
    // Element masks are needed only where a key is padding, past the pass range (or before key
    // 0), or (pass 1) a window key that some query does not see yet.
    const bool masked = kPass2 ? (n0 < ks || n0 + kBN > p.L) : (n0 < ks || n0 + kBN - 1 > p.L);
    const bool interior = kDef && !kPass2 && n0 >= ks + r_pool && n0 + kBN <= int_hi;

    for (int rb = 0; rb < p.nrb; ++rb) {
      const int wrow0 = rb * kRowBlock + rw * 32;
      if (wrow0 >= p.R_pad) continue;  // warp-uniform: no valid row in this warp
      if constexpr (Cfg::kQRegs) {
        if (p.nrb > 1 || it == 0) {
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int kk = 0; kk < Cfg::kKSteps; ++kk) load_a(afrag[i][kk], wrow0 + i * 16, kk);
        }
      }
      if (skip) continue;

      float acc[2][4][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
      for (int kk = 0; kk < Cfg::kKSteps; ++kk) {
        uint32_t bfr[2][4];
#pragma unroll
        for (int jp = 0; jp < 2; ++jp)
          ldmatrix_x4(bfr[jp], kbase + b_off[kk & 3] + (kk >> 2) * 128 + jp * 16 * D * 2);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          uint32_t a[4];
          if constexpr (Cfg::kQRegs) {
#pragma unroll
            for (int e = 0; e < 4; ++e) a[e] = afrag[i][kk][e];
          } else {
            load_a(a, wrow0 + i * 16, kk);
          }
#pragma unroll
          for (int j = 0; j < 4; ++j)
            mma_16816<T>(acc[i][j], a, bfr[j >> 1][(j & 1) * 2], bfr[j >> 1][(j & 1) * 2 + 1]);
        }
      }

      const int ncol0 = n0 + kw * 32 + cl * 2;  // key of acc[.][j][e] is ncol0 + 8 j + (e & 1)
      if constexpr (!kPass2) {
        // Online (max, sums) per row over this thread's 8 keys of the tile; the slot
        // [row][kw * 4 + cl] is owned by this thread alone.
        float* st_m = xs;
        float* st_l = xs + r_alloc * 8;  // score: the sum; defensive: pre, then win, tot, slip
        // t of the first row of each of this warp's two 16-row tiles (Wp is a multiple of 16).
        int t_w0 = 0, t_w1 = 0;
        if (masked) {
          t_w0 = wrow0 % p.Wp;
          t_w1 = t_w0 + 16 >= p.Wp ? t_w0 + 16 - p.Wp : t_w0 + 16;
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int rp = wrow0 + i * 16 + hf * 8 + rl;
            const int row_hi = p.L + (i == 0 ? t_w0 : t_w1) + hf * 8 + rl;  // last key it sees
            float tmax = -INFINITY;
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                float& s = acc[i][j][hf * 2 + e];  // acc becomes the log2-domain logit
                s *= p.scale_log2;
                if (masked) {
                  const int n = ncol0 + j * 8 + e;
                  s = (n >= ks && n <= row_hi) ? s : -INFINITY;
                }
                tmax = fmaxf(tmax, s);
              }
            const int slot = rp * 8 + kw * 4 + cl;
            const float m_old = st_m[slot];
            const float m_new = fmaxf(m_old, tmax);
            if (m_new != -INFINITY) {
              const float corr = fast_exp2(m_old - m_new);
              if constexpr (!kDef) {
                float l = st_l[slot] * corr;
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                  for (int e = 0; e < 2; ++e) l += fast_exp2(acc[i][j][hf * 2 + e] - m_new);
                st_l[slot] = l;
              } else {
                float* st_w = st_l + r_alloc * 8;
                float* st_t = st_w + r_alloc * 8;
                float* st_s = st_t + r_alloc * 8;
                float pre = st_l[slot] * corr, win = st_w[slot] * corr;
                float tot = st_t[slot] * corr, slip = st_s[slot] * corr;
                if (interior) {
                  float sum = 0.f;
#pragma unroll
                  for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) sum += fast_exp2(acc[i][j][hf * 2 + e] - m_new);
                  pre += sum;
                  tot = fmaf(cover_full, sum, tot);
                } else {
#pragma unroll
                  for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                      // masked keys have e = 0 (m_new is finite), whatever class they fall in
                      const float ev = fast_exp2(acc[i][j][hf * 2 + e] - m_new);
                      const int n = ncol0 + j * 8 + e;
                      if (n < p.L) {
                        const int cover = min(p.L - 1, n + r_pool) - max(ks, n - r_pool) + 1;
                        pre += ev;
                        tot = fmaf(static_cast<float>(cover), ev, tot);
                        if (n >= slip_lo) slip += ev;
                      } else {
                        win += ev;
                      }
                    }
                }
                st_l[slot] = pre;
                st_w[slot] = win;
                st_t[slot] = tot;
                st_s[slot] = slip;
              }
              st_m[slot] = m_new;
            }
          }
        }
      } else if constexpr (!kDef) {
        // p = 2^(x - m) / l, folded over the rows (window queries) of each 16-row tile.
        const float* rs_m = xs;
        const float* rs_il = xs + r_alloc;
        float* red = xs + 2 * r_alloc;
        float v[16];  // index i * 8 + j * 2 + e
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int rp = wrow0 + i * 16 + hf * 8 + rl;
            const float mr = rs_m[rp], il = rs_il[rp];
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                float pr = fast_exp2(fmaf(acc[i][j][hf * 2 + e], p.scale_log2, -mr)) * il;
                if (masked) {
                  const int n = ncol0 + j * 8 + e;
                  pr = (n >= ks && n < p.L) ? pr : 0.f;
                }
                const int k = i * 8 + j * 2 + e;
                v[k] = hf == 0 ? pr : reduce_op<kAggMax>(v[k], pr);
              }
          }
        }
        // Reduce over the 8 row lanes (lane bits 2..4) with a transposing butterfly: after
        // three steps lane holds tile i = bit 4, columns 8 * ((lane >> 2) & 3) + 2 cl + {0, 1}.
        float w[8];
        {
          const bool up = lane & 16;
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            const float keep = up ? v[q + 8] : v[q];
            const float send = up ? v[q] : v[q + 8];
            w[q] = reduce_op<kAggMax>(keep, __shfl_xor_sync(0xffffffffu, send, 16));
          }
        }
        float x4[4];
        {
          const bool up = lane & 8;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const float keep = up ? w[q + 4] : w[q];
            const float send = up ? w[q] : w[q + 4];
            x4[q] = reduce_op<kAggMax>(keep, __shfl_xor_sync(0xffffffffu, send, 8));
          }
        }
        float y[2];
        {
          const bool up = lane & 4;
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const float keep = up ? x4[q + 2] : x4[q];
            const float send = up ? x4[q] : x4[q + 2];
            y[q] = reduce_op<kAggMax>(keep, __shfl_xor_sync(0xffffffffu, send, 4));
          }
        }
        const int mt = (wrow0 >> 4) + ((lane >> 4) & 1);
        const int col = kw * 32 + ((lane >> 2) & 3) * 8 + cl * 2;
        *reinterpret_cast<float2*>(red + mt * kBN + col) = make_float2(y[0], y[1]);
      } else {
        // Defensive: e = 2^(x - m) of the valid prefix keys [ks, L) (0 elsewhere), staged per
        // row for the pooling below. Row stride kPStride: the float2 stores of a warp hit 32
        // distinct banks per half-warp.
        const float* rs_m = xs;
        float* pb = xs + 3 * r_alloc;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int rp = wrow0 + i * 16 + hf * 8 + rl;  // < r_alloc
            const float mr = rs_m[rp];
            float* prow = pb + rp * kPStride + kw * 32 + cl * 2;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              float ev[2];
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                ev[e] = fast_exp2(fmaf(acc[i][j][hf * 2 + e], p.scale_log2, -mr));
                if (masked) {
                  const int n = ncol0 + j * 8 + e;
                  ev[e] = (n >= ks && n < p.L) ? ev[e] : 0.f;
                }
              }
              *reinterpret_cast<float2*>(prow + j * 8) = make_float2(ev[0], ev[1]);
            }
          }
        }
      }
    }

    if constexpr (kPass2 && !kDef) {
      __syncthreads();  // red complete; the next write to red follows the next loop-top barrier
      if (tid < kBN) {
        const int n = n0 + tid;
        if (n < p.L) {
          float val = 0.f;
          if (!skip) {
            const float* red = xs + 2 * r_alloc;
            const int mpg = p.Wp >> 4;  // 16-row tiles per query head
            for (int g = 0; g < p.G; ++g) {
              float a = 0.f;
              for (int q = 0; q < mpg; ++q)
                a = reduce_op<kAggMax>(a, red[(g * mpg + q) * kBN + tid]);
              if (!kAggMax) a = a / static_cast<float>(p.W);
              val = g == 0 ? a : reduce_op<kGqaMax>(val, a);
            }
            if (!kGqaMax) val = val / static_cast<float>(p.G);
          }
          const int64_t o = static_cast<int64_t>(bh) * p.L + n;
          if (p.direct) {
            p.out[o] = n < ks ? -INFINITY : val;
          } else {
            p.pre[o] = val;
          }
        }
      }
    }
    if constexpr (kPass2 && kDef) {
      // Pooling and the reductions over the rows. Thread (q, c): column c of the tile, rows
      // q, q + 4, ... (a warp: one row set, 32 consecutive columns: conflict-free reads).
      __syncthreads();  // the staged tile is complete
      constexpr int kQuarters = kThreads / kBN;
      const float* rs_il = xs + r_alloc;
      const float* rs_c = xs + 2 * r_alloc;
      const float* pb = xs + 3 * r_alloc;
      float* part = xs + 3 * r_alloc + r_alloc * kPStride;  // [2][kQuarters][kBN]
      const int c = tid % kBN, q = tid / kBN;
      const int n = n0 + c;
      // an output column of this tile and chunk (n >= c0 >= 0 and n < c1 <= L)
      const bool out_col = c >= halo && c < halo + step && n < c1;
      float rmax = 0.f, psum = 0.f;  // every valid row's pooled value is >= 0 (or NaN)
      if (!skip && out_col) {
        for (int rp = q; rp < p.R_pad; rp += kQuarters) {
          const float il = rs_il[rp];
          if (il == 0.f) continue;  // invalid row (combine): no contribution at all
          // bounds: c - halo >= 0 and c + halo < kBN, so the taps stay in the row
          const float* e = pb + rp * kPStride + c;
          psum = fmaf(e[0], il, psum);
          const float cr = rs_c[rp];
          if (cr > 0.f) {  // cr == 0: the pooled row sums to 0 or NaN (D7), contributes 0
            float taps = 1.f;  // pool_whole: cr is the row's pooled value on every column
            if (!p.pool_whole) {
              taps = 0.f;
              for (int y = -halo; y <= halo; ++y) taps += e[y];
            }
            rmax = nan_max(rmax, taps * cr);
          }
        }
      }
      part[q * kBN + c] = rmax;
      part[(kQuarters + q) * kBN + c] = psum;
      __syncthreads();  // part complete; rewritten after the next loop-top barrier
      if (tid < kBN && out_col) {  // q == 0, c == tid
        float rv = part[c], sv = part[kQuarters * kBN + c];
#pragma unroll
        for (int qq = 1; qq < kQuarters; ++qq) {
          rv = nan_max(rv, part[qq * kBN + c]);
          sv += part[(kQuarters + qq) * kBN + c];
        }
        const int64_t o = static_cast<int64_t>(bh) * p.L + n;
        p.snap[o] = n < ks ? -INFINITY : sv / static_cast<float>(p.W) / static_cast<float>(p.G);
        p.out[o] = rv;  // R before its mean floor (defensive_finish_kernel)
        if (n >= ks) racc += rv;
      }
    }
  }
  cp_async_wait<0>();

  if constexpr (!kPass2) {
    __syncthreads();
    const float* st_m = xs;
    const float* st_l = xs + r_alloc * 8;
    const int64_t o = (static_cast<int64_t>(bh) * p.nchunk1 + chunk_id) * p.R_stride;
    for (int r = tid; r < p.R_pad; r += kThreads) {
      float m = -INFINITY;
      if constexpr (!kDef) {
        float l = 0.f;
#pragma unroll
        for (int s = 0; s < 8; ++s) merge_stat(m, l, st_m[r * 8 + s], st_l[r * 8 + s]);
        p.partial[o + r] = make_float2(m, l);
      } else {
        const int S = r_alloc * 8;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int s = 0; s < 8; ++s) {
          const int i = r * 8 + s;
          merge_stat(m, x, st_m[i], make_float4(st_l[i], st_l[S + i], st_l[2 * S + i],
                                                st_l[3 * S + i]));
        }
        p.partial[o + r] = make_float2(m, x.x + x.y);
        p.dpartial[o + r] = x;
      }
    }
  }
  if constexpr (kPass2 && kDef) {
    float* part = xs + 3 * r_alloc + r_alloc * kPStride;
    __syncthreads();  // the last tile's reads of `part` are done
    if (tid < kBN) part[tid] = racc;
    __syncthreads();
    if (tid == 0) {
      double sum = 0.0;
      for (int i = 0; i < kBN; ++i) sum += part[i];
      p.rsum[static_cast<int64_t>(bh) * p.nchunk2 + chunk_id] = sum;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Combine: per (b, h) and row, merge the nchunk1 partial (max, sum) pairs and write
// (max, 1/sum), or (+inf, 0) for invalid rows. grid: BH * ceil(R_pad / 32) CTAs of
// kCombineThreads; lane = row of a 32-row group, warp w merges chunks w, w + 16, ... (loads
// unrolled so that several are in flight), then warp 0 merges the 16 warps.
// kDef: the four defensive sums are merged with the same weights (l = pre + win), and `drow`
// gets (c_row, window mass, slip mass, 0), zeros for invalid rows.
constexpr int kCombineThreads = 512;

template <bool kDef>
__global__ void __launch_bounds__(kCombineThreads) score_combine_kernel(const ScoreParams p) {
  constexpr int kWarps = kCombineThreads / 32;
  __shared__ float2 sh[kWarps][32];
  __shared__ float4 shx[kDef ? kWarps : 1][32];
  const int groups = (p.R_pad + 31) / 32;
  const int bh = blockIdx.x / groups;
  const int r = (blockIdx.x - bh * groups) * 32 + (threadIdx.x & 31);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int b = bh / p.Hk;
  const int ks = clamped_key_start(p, b);
  float m = -INFINITY, l = 0.f;
  float4 x = make_float4(0.f, 0.f, 0.f, 0.f);  // kDef: (pre, win, tot, slip)
  if (r < p.R_pad) {  // bounds: rows < R_pad <= R_stride, chunks < nchunk1
    const int64_t o = static_cast<int64_t>(bh) * p.nchunk1 * p.R_stride + r;
#pragma unroll 4
    for (int c = warp; c < p.nchunk1; c += kWarps) {
      const int64_t oc = o + static_cast<int64_t>(c) * p.R_stride;
      const float2 v = p.partial[oc];
      if constexpr (kDef) {
        merge_stat(m, x, v.x, p.dpartial[oc]);
      } else {
        merge_stat(m, l, v.x, v.y);
      }
    }
  }
  sh[warp][lane] = make_float2(m, l);
  if constexpr (kDef) shx[warp][lane] = x;
  __syncthreads();
  if (warp == 0 && r < p.R_pad) {
    for (int w = 1; w < kWarps; ++w) {
      if constexpr (kDef) {
        merge_stat(m, x, sh[w][lane].x, shx[w][lane]);
      } else {
        merge_stat(m, l, sh[w][lane].x, sh[w][lane].y);
      }
    }
    if constexpr (kDef) l = x.x + x.y;  // every visible key is a prefix or a window key
    const int g = r / p.Wp, t = r - g * p.Wp;
    const bool valid = t < p.W && p.L + t >= ks && l > 0.f;
    const int64_t o = static_cast<int64_t>(bh) * p.R_stride + r;
    p.rowstat[o] = valid ? make_float2(m, 1.0f / l) : make_float2(INFINITY, 0.f);
    if constexpr (kDef) {
      float4 d = make_float4(0.f, 0.f, 0.f, 0.f);
      if (valid) {
        const float il = 1.0f / l;
        d.y = x.y * il;  // mass on the window keys
        d.z = x.w * il;  // mass on the last W prefix keys
        // pooled / sum(pooled) * prefix mass = taps * pre / (tot l), for a row whose pooled sum
        // tot / l is > 0 (D7: otherwise the row contributes 0); with pool_whole every column's
        // pooled value is (pre / l) / L_b (tot = L_b pre > 0 implies L_b >= 1).
        if (x.z > 0.f) {
          d.x = p.pool_whole ? x.x * il / static_cast<float>(p.L - ks) : x.x / (x.z * l);
        }
      }
      p.drow[o] = d;
    }
  }
}

// ------------------------------------------------------------------------------------------
// defensive_score, last stage: R = max(R, mean of R over the valid prefix) in place and -inf on
// padding columns; the CTA of (h = 0, tile 0) also writes the batch row's window masses.
// grid: BH * pool_tiles CTAs of kThreads, kPoolTile columns each.
__global__ void __launch_bounds__(kThreads, 4) defensive_finish_kernel(const ScoreParams p) {
  __shared__ double red[kThreads];
  const int bh = blockIdx.x / p.pool_tiles;
  const int tile = blockIdx.x - bh * p.pool_tiles;
  const int b = bh / p.Hk, h = bh - b * p.Hk;
  const int ks = clamped_key_start(p, b);
  const int Lb = p.L - ks;  // valid prefix columns [ks, L)
  const int tid = threadIdx.x;
  // The mean of R: the pass-2 chunk sums (bounds: nchunk2 per (b, h)), added in one fixed order,
  // the same in every CTA of this head.
  double acc = 0.0;
  for (int c = tid; c < p.nchunk2; c += kThreads)
    acc += p.rsum[static_cast<int64_t>(bh) * p.nchunk2 + c];
  const double total = block_sum(acc, red);
  const float mean = Lb > 0 ? static_cast<float>(total / static_cast<double>(Lb)) : 0.f;
  float* out = p.out + static_cast<int64_t>(bh) * p.L;
  for (int i = tid; i < kPoolTile; i += kThreads) {
    const int n = tile * kPoolTile + i;
    if (n >= p.L) break;
    out[n] = n < ks ? -INFINITY : nan_max(out[n], mean);
  }
  if (h == 0 && tile == 0) {  // uniform over the CTA
    // window masses of batch row b: mean over its Hq * W window queries (invalid rows hold 0)
    double wsum = 0.0, ssum = 0.0;
    for (int i = tid; i < p.Hk * p.R_pad; i += kThreads) {
      const int hh = i / p.R_pad, r = i - hh * p.R_pad;
      // bounds: (b, hh) < BH, r < R_pad <= R_stride
      const float4 d = p.drow[static_cast<int64_t>(b * p.Hk + hh) * p.R_stride + r];
      wsum += d.y;
      ssum += d.z;
    }
    const double w = block_sum(wsum, red);
    const double s = block_sum(ssum, red);
    if (tid == 0) {
      const double queries = static_cast<double>(p.Hq) * static_cast<double>(p.W);
      p.wmass[2 * b] = Lb > 0 ? static_cast<float>(w / queries) : 0.f;
      p.wmass[2 * b + 1] = Lb > 0 ? static_cast<float>(s / queries) : 0.f;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Pooling over the prefix axis + the -inf padding mask. grid: BH * pool_tiles CTAs, each
// kPoolTile outputs; the window halo is staged in shared memory when it fits.
__global__ void __launch_bounds__(kThreads) score_pool_kernel(const ScoreParams p) {
  extern __shared__ float buf[];
  const int bh = blockIdx.x / p.pool_tiles;
  const int tile = blockIdx.x - bh * p.pool_tiles;
  const int b = bh / p.Hk;
  const int ks = clamped_key_start(p, b);
  const int r = p.pool_radius;
  const int L = p.L;
  const int n0 = tile * kPoolTile;
  const float* src = p.pre + static_cast<int64_t>(bh) * L;
  float* dst = p.out + static_cast<int64_t>(bh) * L;
  const float fill = p.pool_max ? -INFINITY : 0.f;  // out-of-range taps: ignored / zero
  if (p.pool_smem) {
    const int lo = n0 - r;
    for (int i = threadIdx.x; i < kPoolTile + 2 * r; i += kThreads) {
      const int n = lo + i;
      buf[i] = (n >= 0 && n < L) ? src[n] : fill;  // bounds: only [0, L) is read
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < kPoolTile; i += kThreads) {
    const int n = n0 + i;
    if (n >= L) break;
    float val = -INFINITY;
    if (n >= ks) {
      float acc = p.pool_max ? -INFINITY : 0.f;
      for (int j = -r; j <= r; ++j) {
        float x;
        if (p.pool_smem) {
          x = buf[i + r + j];
        } else {
          const int nj = n + j;
          x = (nj >= 0 && nj < L) ? src[nj] : fill;
        }
        acc = p.pool_max ? nan_max(acc, x) : acc + x;  // NaN propagates (allocation_rules.h)
      }
      val = p.pool_max ? acc : acc / p.pool_divisor;
    }
    dst[n] = val;
  }
}

// ------------------------------------------------------------------------------------------
// SIMT path (fp32 inputs, any head dim, or shapes whose Q block does not fit shared memory):
// the same three stages with FFMA tiles of kSimtRows x kSimtKeys (simt_tile.cuh). Correctness
// path.

struct SimtSmem {
  SimtTileSmem t;
  float s[kSimtRows][kSimtKeys + 1];
};

// acc[ii][jj] = q[row0 + 4 ty + ii] . k[n0 + tx + 16 jj] (ty = tid / 16, tx = tid % 16);
// rows >= R_pad and keys outside [0, n_hi) read as zero. Block-wide (simt_dot_tile).
template <typename T>
__device__ __forceinline__ void simt_tile(const ScoreParams& p, const T* qg, const T* kg,
                                          int row0, int n0, int n_hi, SimtSmem& sm,
                                          float (&acc)[4][4]) {
  simt_dot_tile(qg, p.D, row0, p.R_pad, kg, p.D, n0, 0, n_hi, p.D, sm.t, acc);
}

// Pass 1: grid BH * nchunk1; per row block, 4 threads per row keep a running (max, sum)
// (kDef: (max, pre, win, tot, slip), the header comment).
template <typename T, bool kDef = false>
__global__ void __launch_bounds__(kThreads) score_simt_pass1_kernel(const ScoreParams p) {
  __shared__ SimtSmem sm;
  const int bh = blockIdx.x / p.nchunk1;
  const int chunk_id = blockIdx.x - bh * p.nchunk1;
  const int b = bh / p.Hk, h = bh - b * p.Hk;
  const int ks = clamped_key_start(p, b);
  const int c0 = chunk_id * p.chunk;
  const int c1 = min(c0 + p.chunk, p.N);
  const T* qg = static_cast<const T*>(p.q) +
                (static_cast<int64_t>(b) * p.Hq + static_cast<int64_t>(h) * p.G) * p.W * p.D;
  const T* kg = static_cast<const T*>(p.k) + static_cast<int64_t>(bh) * p.N * p.D;
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int my_row = tid >> 2, quarter = tid & 3;
  const int r_pool = kDef ? p.pool_radius : 0;
  const int slip_lo = max(ks, p.L - p.W);
  for (int row0 = 0; row0 < p.R_pad; row0 += kSimtRows) {
    float m = -INFINITY, l = 0.f;
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);  // kDef: (pre, win, tot, slip)
    for (int n0 = c0; n0 < c1; n0 += kSimtKeys) {
      if (n0 + kSimtKeys <= ks) continue;  // uniform: only padding keys
      float acc[4][4];
      simt_tile(p, qg, kg, row0, n0, c1, sm, acc);
#pragma unroll
      for (int ii = 0; ii < 4; ++ii) {
        const int rp = row0 + ty * 4 + ii;
        const int row_hi = p.L + rp % p.W;
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int n = n0 + tx + 16 * jj;
          const bool ok = n >= ks && n <= row_hi && n < c1;
          sm.s[ty * 4 + ii][tx + 16 * jj] = ok ? acc[ii][jj] * p.scale_log2 : -INFINITY;
        }
      }
      __syncthreads();
      float tm = -INFINITY;
      for (int j = 0; j < kSimtKeys / 4; ++j) tm = fmaxf(tm, sm.s[my_row][quarter * 16 + j]);
      const float mn = fmaxf(m, tm);
      if (mn != -INFINITY) {
        const float corr = fast_exp2(m - mn);
        if constexpr (!kDef) {
          l *= corr;
          for (int j = 0; j < kSimtKeys / 4; ++j)
            l += fast_exp2(sm.s[my_row][quarter * 16 + j] - mn);
        } else {
          x.x *= corr;
          x.y *= corr;
          x.z *= corr;
          x.w *= corr;
          for (int j = 0; j < kSimtKeys / 4; ++j) {
            const float ev = fast_exp2(sm.s[my_row][quarter * 16 + j] - mn);  // 0 if masked
            const int n = n0 + quarter * 16 + j;
            if (n < p.L) {
              const int cover = min(p.L - 1, n + r_pool) - max(ks, n - r_pool) + 1;
              x.x += ev;
              x.z = fmaf(static_cast<float>(cover), ev, x.z);
              if (n >= slip_lo) x.w += ev;
            } else {
              x.y += ev;
            }
          }
        }
        m = mn;
      }
      __syncthreads();  // s is rewritten by the next tile
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
      if constexpr (!kDef) {
        const float l2 = __shfl_xor_sync(0xffffffffu, l, off);
        merge_stat(m, l, m2, l2);
      } else {
        float4 x2;
        x2.x = __shfl_xor_sync(0xffffffffu, x.x, off);
        x2.y = __shfl_xor_sync(0xffffffffu, x.y, off);
        x2.z = __shfl_xor_sync(0xffffffffu, x.z, off);
        x2.w = __shfl_xor_sync(0xffffffffu, x.w, off);
        merge_stat(m, x, m2, x2);
      }
    }
    const int rp = row0 + my_row;
    if (quarter == 0 && rp < p.R_pad) {
      const int64_t o = (static_cast<int64_t>(bh) * p.nchunk1 + chunk_id) * p.R_stride + rp;
      if constexpr (!kDef) {
        p.partial[o] = make_float2(m, l);
      } else {
        p.partial[o] = make_float2(m, x.x + x.y);
        p.dpartial[o] = x;
      }
    }
  }
}

// Pass 2: grid BH * nchunk2; dynamic shared memory agg[G][kSimtKeys]. Thread (c, part)
// aggregates column c over the rows of the query heads g with g % 4 == part, in t order.
template <typename T, bool kAggMax, bool kGqaMax>
__global__ void __launch_bounds__(kThreads) score_simt_pass2_kernel(const ScoreParams p) {
  __shared__ SimtSmem sm;
  extern __shared__ float agg[];
  const int bh = blockIdx.x / p.nchunk2;
  const int chunk_id = blockIdx.x - bh * p.nchunk2;
  const int b = bh / p.Hk, h = bh - b * p.Hk;
  const int ks = clamped_key_start(p, b);
  const int c0 = chunk_id * p.chunk2;
  const int c1 = min(c0 + p.chunk2, p.L);
  const T* qg = static_cast<const T*>(p.q) +
                (static_cast<int64_t>(b) * p.Hq + static_cast<int64_t>(h) * p.G) * p.W * p.D;
  const T* kg = static_cast<const T*>(p.k) + static_cast<int64_t>(bh) * p.N * p.D;
  const float2* rs = p.rowstat + static_cast<int64_t>(bh) * p.R_stride;
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int col = tid % kSimtKeys, part = tid / kSimtKeys;
  for (int n0 = c0; n0 < c1; n0 += kSimtKeys) {
    const bool skip = n0 + kSimtKeys <= ks;
    if (!skip) {
      for (int i = tid; i < p.G * kSimtKeys; i += kThreads) agg[i] = 0.f;
      for (int row0 = 0; row0 < p.R_pad; row0 += kSimtRows) {
        float acc[4][4];
        simt_tile(p, qg, kg, row0, n0, c1, sm, acc);  // ends with a barrier: agg init visible
#pragma unroll
        for (int ii = 0; ii < 4; ++ii) {
          const int rp = row0 + ty * 4 + ii;
          const float2 st = rp < p.R_pad ? rs[rp] : make_float2(INFINITY, 0.f);
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            const int n = n0 + tx + 16 * jj;
            const float pr = fast_exp2(fmaf(acc[ii][jj], p.scale_log2, -st.x)) * st.y;
            sm.s[ty * 4 + ii][tx + 16 * jj] = (n >= ks && n < c1) ? pr : 0.f;
          }
        }
        __syncthreads();
        for (int r = 0; r < kSimtRows; ++r) {
          const int rp = row0 + r;
          if (rp >= p.R_pad) break;
          const int g = rp / p.W;
          if (g % 4 != part) continue;
          agg[g * kSimtKeys + col] = reduce_op<kAggMax>(agg[g * kSimtKeys + col], sm.s[r][col]);
        }
        __syncthreads();
      }
    }
    if (tid < kSimtKeys) {
      const int n = n0 + tid;
      if (n < c1) {
        float val = 0.f;
        if (!skip) {
          for (int g = 0; g < p.G; ++g) {
            float a = agg[g * kSimtKeys + tid];
            if (!kAggMax) a = a / static_cast<float>(p.W);
            val = g == 0 ? a : reduce_op<kGqaMax>(val, a);
          }
          if (!kGqaMax) val = val / static_cast<float>(p.G);
        }
        const int64_t o = static_cast<int64_t>(bh) * p.L + n;
        if (p.direct) {
          p.out[o] = n < ks ? -INFINITY : val;
        } else {
          p.pre[o] = val;
        }
      }
    }
    __syncthreads();  // agg is reset by the next tile
  }
}

// Defensive pass 2 on the SIMT path: grid BH * nchunk2. Key tiles of kSimtKeys overlapping by
// 2 halo (outputs [c0 + u step, + step), step = kSimtKeys - 2 halo), per row block e = 2^(x - m)
// staged in sm.s, then thread (q, c) pools column c over the rows q, q + 4, ... of the block
// (the mma kernel's kDef pass 2, same arithmetic), accumulating across the row blocks.
template <typename T>
__global__ void __launch_bounds__(kThreads) defensive_simt_pass2_kernel(const ScoreParams p) {
  constexpr int kQuarters = kThreads / kSimtKeys;
  __shared__ SimtSmem sm;
  __shared__ float part[2][kQuarters][kSimtKeys];
  const int bh = blockIdx.x / p.nchunk2;
  const int chunk_id = blockIdx.x - bh * p.nchunk2;
  const int b = bh / p.Hk, h = bh - b * p.Hk;
  const int ks = clamped_key_start(p, b);
  const int halo = p.pool_halo;
  const int step = kSimtKeys - 2 * halo;
  const int c0 = chunk_id * p.chunk2;
  const int c1 = min(c0 + p.chunk2, p.L);
  const T* qg = static_cast<const T*>(p.q) +
                (static_cast<int64_t>(b) * p.Hq + static_cast<int64_t>(h) * p.G) * p.W * p.D;
  const T* kg = static_cast<const T*>(p.k) + static_cast<int64_t>(bh) * p.N * p.D;
  const float2* rs = p.rowstat + static_cast<int64_t>(bh) * p.R_stride;
  const float4* dr = p.drow + static_cast<int64_t>(bh) * p.R_stride;
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int c = tid % kSimtKeys, q = tid / kSimtKeys;
  float racc = 0.f;  // threads < kSimtKeys: this CTA's sum of R over valid columns
  for (int t0 = c0; t0 < c1; t0 += step) {  // outputs [t0, t0 + step), keys [t0 - halo, +64)
    const int n0 = t0 - halo;
    const bool skip = n0 + kSimtKeys <= ks;
    const int n = n0 + c;
    const bool out_col = c >= halo && c < halo + step && n < c1;  // then 0 <= n < L
    float rmax = 0.f, psum = 0.f;
    if (!skip) {
      for (int row0 = 0; row0 < p.R_pad; row0 += kSimtRows) {
        float acc[4][4];
        // keys outside [0, L) read as zero (and are masked below)
        simt_tile(p, qg, kg, row0, n0, p.L, sm, acc);
#pragma unroll
        for (int ii = 0; ii < 4; ++ii) {
          const int rp = row0 + ty * 4 + ii;
          const float mr = rp < p.R_pad ? rs[rp].x : INFINITY;
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            const int nk = n0 + tx + 16 * jj;
            const float ev = fast_exp2(fmaf(acc[ii][jj], p.scale_log2, -mr));
            sm.s[ty * 4 + ii][tx + 16 * jj] = (nk >= ks && nk < p.L) ? ev : 0.f;
          }
        }
        __syncthreads();
        if (out_col) {
          for (int r = q; r < kSimtRows; r += kQuarters) {
            const int rp = row0 + r;
            if (rp >= p.R_pad) break;
            const float il = rs[rp].y;
            if (il == 0.f) continue;  // invalid row (combine)
            // bounds: c - halo >= 0 and c + halo < kSimtKeys
            const float* e = &sm.s[r][c];
            psum = fmaf(e[0], il, psum);
            const float cr = dr[rp].x;
            if (cr > 0.f) {
              float taps = 1.f;
              if (!p.pool_whole) {
                taps = 0.f;
                for (int y = -halo; y <= halo; ++y) taps += e[y];
              }
              rmax = nan_max(rmax, taps * cr);
            }
          }
        }
        __syncthreads();  // s is rewritten by the next row block
      }
    }
    part[0][q][c] = rmax;
    part[1][q][c] = psum;
    __syncthreads();
    if (tid < kSimtKeys && out_col) {  // q == 0, c == tid
      float rv = part[0][0][c], sv = part[1][0][c];
#pragma unroll
      for (int qq = 1; qq < kQuarters; ++qq) {
        rv = nan_max(rv, part[0][qq][c]);
        sv += part[1][qq][c];
      }
      const int64_t o = static_cast<int64_t>(bh) * p.L + n;
      p.snap[o] = n < ks ? -INFINITY : sv / static_cast<float>(p.W) / static_cast<float>(p.G);
      p.out[o] = rv;
      if (n >= ks) racc += rv;
    }
    __syncthreads();  // part is rewritten by the next tile
  }
  if (tid < kSimtKeys) part[0][0][tid] = racc;
  __syncthreads();
  if (tid == 0) {
    double sum = 0.0;
    for (int i = 0; i < kSimtKeys; ++i) sum += part[0][0][i];
    p.rsum[static_cast<int64_t>(bh) * p.nchunk2 + chunk_id] = sum;
  }
}

}  // namespace score_detail
}  // namespace cuda
}  // namespace adakv
