// Kernels of adakv::score (CUDA). The launcher and the algorithm overview are in score.cu.
//
// Row numbering. The G * W window queries of KV head (b, h) are the contiguous rows
// q_window[b, h*G : (h+1)*G, :, :] = [G * W, D]. Inside the kernels query (g, t) gets the padded
// row index rp = g * Wp + t, where Wp = W rounded up to 16 on the tensor-core path (so that
// every 16-row mma tile belongs to one query head g) and Wp = W on the SIMT path. Rows with
// t >= W, rows past R_pad = G * Wp and padding queries (L + t < key_start) are "invalid": the
// combine kernel gives them (m, 1/l) = (+inf, 0), so they contribute exactly 0 in pass 2.
//
// Logits are kept in the log2 domain: x = (q . k) * scale * log2(e), p = 2^(x - m) / l.
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
static_assert(kThreads == kSimtThreads, "the SIMT tile is computed by the family's CTAs");
constexpr int kPoolTile = 1024;  // outputs per CTA of the pooling kernel

struct ScoreParams {
  const void* q;               // q_window [B, Hq, W, D]
  const void* k;               // key [B, Hk, N, D]
  const int32_t* key_start;    // [B] or nullptr
  float2* partial;             // pass 1 -> combine: [BH][nchunk1][R_stride] (max, sum) log2
  float2* rowstat;             // combine -> pass 2: [BH][R_stride] (max, 1 / sum)
  float* pre;                  // pass 2 -> pool: [BH][L] pre-pool scores
  float* out;                  // [BH][L] final scores
  int B, Hq, Hk, G, W, Wp, N, L, D;
  int R_pad;                   // G * Wp rows in use
  int R_stride;                // row stride of partial / rowstat
  int nrb;                     // row blocks of kRowBlock rows (tensor-core path)
  int chunk;                   // keys per CTA (multiple of the key tile)
  int nchunk1, nchunk2;        // CTAs per (b, h) in pass 1 (over N keys) / pass 2 (over L)
  float scale_log2;            // scale * log2(e)
  int pool_radius;             // pooling: min(kernel_size / 2, L) taps on each side
  float pool_divisor;          // avg pooling divides by kernel_size (padded zeros count)
  bool pool_max;
  bool pool_smem;              // pooling window fits in shared memory
  bool direct;                 // no pooling: pass 2 writes `out` (with the -inf padding)
  int pool_tiles;              // CTAs per (b, h) of the pooling kernel
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

// ------------------------------------------------------------------------------------------
// Tensor-core path (fp16 / bf16, D in {64, 128, 256}).

template <int D>
struct MmaCfg {
  static constexpr int kStages = D <= 128 ? 4 : 2;  // cp.async ring of K tiles
  static constexpr bool kQRegs = D <= 128;           // A fragments (Q) held in registers
  static constexpr int kKSteps = D / 16;
  static constexpr int kChunksPerRow = D / 8;        // 16-byte chunks per row
  static constexpr int kMinBlocks = D <= 128 ? 2 : 1;
  static constexpr size_t kTileBytes = static_cast<size_t>(kBN) * D * 2;

  static constexpr size_t q_bytes(int r_alloc) { return static_cast<size_t>(r_alloc) * D * 2; }
  static constexpr size_t k_offset(int r_alloc) { return q_bytes(r_alloc); }
  static constexpr size_t x_offset(int r_alloc) { return q_bytes(r_alloc) + kStages * kTileBytes; }
  // pass 1: running (max, sum) per row and per owner thread (8 owners per row);
  // pass 2: per-row (max, 1/sum) + per-16-row-tile column partials.
  static constexpr size_t smem_bytes(int r_alloc, bool pass2) {
    return x_offset(r_alloc) +
           (pass2 ? static_cast<size_t>(r_alloc) * 8 + static_cast<size_t>(r_alloc / 16) * kBN * 4
                  : static_cast<size_t>(r_alloc) * 8 * 8);
  }
};

// grid: BH * nchunk CTAs (pass 1: nchunk1 chunks of N keys, pass 2: nchunk2 chunks of L keys),
// kThreads threads = 8 warps: warp w computes rows [32 * (w % 4), +32) of each row block against
// keys [32 * (w / 4), +32) of each 64-key tile with mma.m16n8k16.
template <typename T, int D, bool kPass2, bool kAggMax, bool kGqaMax>
__global__ void __launch_bounds__(kThreads, MmaCfg<D>::kMinBlocks)
    score_mma_kernel(const ScoreParams p) {
  using Cfg = MmaCfg<D>;
  constexpr int kS = Cfg::kStages;
  constexpr int kCPR = Cfg::kChunksPerRow;
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
  const int n_end = kPass2 ? p.L : p.N;  // keys this pass reads: [0, n_end)
  const int c0 = chunk_id * p.chunk;
  const int c1 = min(c0 + p.chunk, n_end);
  const int ntiles = (c1 - c0 + kBN - 1) / kBN;  // >= 1: nchunk = ceil(n_end / chunk)
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
      // bounds: rowstat holds R_stride >= R_pad rows per (b, h); rows past R_pad are invalid.
      const float2 v = r < p.R_pad ? p.rowstat[static_cast<int64_t>(bh) * p.R_stride + r]
                                   : make_float2(INFINITY, 0.f);
      xs[r] = v.x;
      xs[r_alloc + r] = v.y;
    }
  } else {
    for (int i = tid; i < r_alloc * 8; i += kThreads) {
      xs[i] = -INFINITY;
      xs[r_alloc * 8 + i] = 0.f;
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
    const int n0 = c0 + tile * kBN;
    if (n0 + kBN <= ks) return;  // only padding keys: never used
    const uint32_t base = ks_base + stage * static_cast<uint32_t>(Cfg::kTileBytes) + ld_soff;
    const T* src = ld_src + static_cast<int64_t>(n0) * D;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int n = n0 + ld_row + i * kRowsPerPass;
      const bool valid = n < c1;  // bounds: keys past the chunk / pass range are zero-filled
      cp_async_16(base + i * kRowsPerPass * D * 2, valid ? src + i * kRowsPerPass * D : kg,
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

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<kS - 2>();
    __syncthreads();  // tile `it` visible to all; stage (it - 1) % kS free again
    {
      const int nt = it + kS - 1;
      if (nt < ntiles) load_tile(nt, nt % kS);
      cp_async_commit();
    }
    const int n0 = c0 + it * kBN;
    const uint32_t kbase = ks_base + (it % kS) * static_cast<uint32_t>(Cfg::kTileBytes);
    const bool skip = n0 + kBN <= ks;  // every key is padding (uniform over the CTA)
    // Element masks are needed only where a key is padding, past the pass range, or (pass 1)
    // a window key that some query does not see yet.
    const bool masked = kPass2 ? (n0 < ks || n0 + kBN > p.L) : (n0 < ks || n0 + kBN - 1 > p.L);

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
        // Online (max, sum) per row over this thread's 8 keys of the tile; the slot
        // [row][kw * 4 + cl] is owned by this thread alone.
        float* st_m = xs;
        float* st_l = xs + r_alloc * 8;
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
              float l = st_l[slot] * fast_exp2(m_old - m_new);
#pragma unroll
              for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) l += fast_exp2(acc[i][j][hf * 2 + e] - m_new);
              st_m[slot] = m_new;
              st_l[slot] = l;
            }
          }
        }
      } else {
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
      }
    }

    if constexpr (kPass2) {
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
  }
  cp_async_wait<0>();

  if constexpr (!kPass2) {
    __syncthreads();
    const float* st_m = xs;
    const float* st_l = xs + r_alloc * 8;
    float2* dst = p.partial + (static_cast<int64_t>(bh) * p.nchunk1 + chunk_id) * p.R_stride;
    for (int r = tid; r < p.R_pad; r += kThreads) {
      float m = -INFINITY, l = 0.f;
#pragma unroll
      for (int s = 0; s < 8; ++s) merge_stat(m, l, st_m[r * 8 + s], st_l[r * 8 + s]);
      dst[r] = make_float2(m, l);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Combine: per (b, h) and row, merge the nchunk1 partial (max, sum) pairs and write
// (max, 1/sum), or (+inf, 0) for invalid rows. grid: BH * ceil(R_pad / 32) CTAs of
// kCombineThreads; lane = row of a 32-row group, warp w merges chunks w, w + 16, ... (loads
// unrolled so that several are in flight), then warp 0 merges the 16 warps.
constexpr int kCombineThreads = 512;

__global__ void __launch_bounds__(kCombineThreads) score_combine_kernel(const ScoreParams p) {
  constexpr int kWarps = kCombineThreads / 32;
  __shared__ float2 sh[kWarps][32];
  const int groups = (p.R_pad + 31) / 32;
  const int bh = blockIdx.x / groups;
  const int r = (blockIdx.x - bh * groups) * 32 + (threadIdx.x & 31);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int b = bh / p.Hk;
  const int ks = clamped_key_start(p, b);
  float m = -INFINITY, l = 0.f;
  if (r < p.R_pad) {  // bounds: rows < R_pad <= R_stride, chunks < nchunk1
    const float2* src = p.partial + static_cast<int64_t>(bh) * p.nchunk1 * p.R_stride + r;
#pragma unroll 4
    for (int c = warp; c < p.nchunk1; c += kWarps) {
      const float2 v = src[static_cast<int64_t>(c) * p.R_stride];
      merge_stat(m, l, v.x, v.y);
    }
  }
  sh[warp][lane] = make_float2(m, l);
  __syncthreads();
  if (warp == 0 && r < p.R_pad) {
    for (int w = 1; w < kWarps; ++w) merge_stat(m, l, sh[w][lane].x, sh[w][lane].y);
    const int g = r / p.Wp, t = r - g * p.Wp;
    const bool valid = t < p.W && p.L + t >= ks && l > 0.f;
    p.rowstat[static_cast<int64_t>(bh) * p.R_stride + r] =
        valid ? make_float2(m, 1.0f / l) : make_float2(INFINITY, 0.f);
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

// Pass 1: grid BH * nchunk1; per row block, 4 threads per row keep a running (max, sum).
template <typename T>
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
  for (int row0 = 0; row0 < p.R_pad; row0 += kSimtRows) {
    float m = -INFINITY, l = 0.f;
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
        l *= fast_exp2(m - mn);
        for (int j = 0; j < kSimtKeys / 4; ++j) l += fast_exp2(sm.s[my_row][quarter * 16 + j] - mn);
        m = mn;
      }
      __syncthreads();  // s is rewritten by the next tile
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
      const float l2 = __shfl_xor_sync(0xffffffffu, l, off);
      merge_stat(m, l, m2, l2);
    }
    const int rp = row0 + my_row;
    if (quarter == 0 && rp < p.R_pad) {
      p.partial[(static_cast<int64_t>(bh) * p.nchunk1 + chunk_id) * p.R_stride + rp] =
          make_float2(m, l);
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
  const int c0 = chunk_id * p.chunk;
  const int c1 = min(c0 + p.chunk, p.L);
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

}  // namespace score_detail
}  // namespace cuda
}  // namespace adakv
