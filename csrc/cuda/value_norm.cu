// CUDA kernels of adakv::value_norm, the CriticalKV value norm (SPEC 7.1, DefensiveKV step 4;
// docs/semantics.md `value_norm`):
//
//   value [B, Hk, N, D], o_proj_weight [hidden, Hq * D] -> out [B, Hk, length] fp32,
//   out[b, h, i] = (1 / G) sum_{g < G} sum_{o < hidden} | sum_d value[b, h, i, d] W[o, (h G + g) D + d] |
//
// i.e. per (b, h) the GEMM P_g = V_h [length, D] x W_g^T [D, hidden] of each of the group's G
// query heads, with an L1-norm epilogue: the [length, hidden] products are never written.
//
// Tensor-core kernel (fp16 / bf16, D in {64, 128, 256}, 16-byte aligned value and weight):
//   grid     B * Hk * ceil(length / kM) CTAs (consecutive CTAs share (b, h): the W_o slices they
//            stream stay in L2), kVnThreads = 8 warps.
//   A        the CTA's kM value rows x D, loaded once (cp.async, swizzled like every K / Q tile
//            of the family: mma.cuh swizzle_offset) and kept in shared memory for the whole CTA:
//            reused by all G query heads and all hidden tiles.
//   B        the W_o rows [o0, o0 + kN) x columns [(h G + g) D, + D) of query head g: exactly the
//            mma "col" operand layout ([n][k] rows), streamed through a kStages-deep cp.async
//            ring over the U = G * ceil(hidden / kN) tiles (g outer, hidden tile inner).
//   compute  warp (wm, wn) owns rows [64 wm, +64) x columns [kWTN wn, +kWTN) of each tile:
//            K = D in D / 16 k-steps of ldmatrix_x4 (A, B) + mma.m16n8k16 (fp32 accumulate).
//   epilogue per tile, each thread adds |acc| of its columns into one register per row it owns
//            (2 kMT rows), then zeroes acc: the row sums accumulate in registers across every
//            hidden tile and every query head. At the end: quad shuffles (the 4 lanes of a row),
//            the kWarpsN column warps through shared memory (the B ring, free by then), * 1 / G.
//   sizes    D = 64:  kM 256, kN 128, warp tile 64 x 64, 4 stages:  96 KiB shared
//            D = 128: kM 256, kN 128, warp tile 64 x 64, 3 stages: 160 KiB
//            D = 256: kM 128, kN 128, warp tile 64 x 32, 2 stages: 192 KiB
//            one CTA per SM (acc[4][8][4] + fragments: ~200 registers per thread). L2 -> SM
//            traffic per flop is 1 / kM bytes (every CTA streams all of W_h).
// Other inputs (fp32, other head dims, misaligned views) take the SIMT kernel: FFMA tiles of 64
// tokens x 64 hidden rows (simt_tile.cuh), the same row sums; a correctness path.
//
// normalize=True: a second kernel divides every token's norms by their sum over the Hk KV
// heads (in h order, as the CPU kernel; no epsilon: 0 / 0 = NaN, D8). A separate launch because
// the heads of a token are different CTAs: B * Hk * length floats read and written once more.
//
// Rows past `length` are zero-filled (never read) and not written; W_o rows past `hidden` are
// zero-filled, their products exactly 0. hidden = 0: every norm 0. Launch shapes depend on tensor
// shapes only, everything runs on the current stream, no host sync (CUDA-graph safe).
// Cost (Llama-3.1-8B layer, Hq 32, Hk 8, D 128, hidden 4096, length 32K, bf16): 1.1 TFLOP of
// mma.sync, the same as the layer's o_proj GEMM; value 64 MiB and W_o 32 MiB read from HBM once.

#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/simt_tile.cuh"
#include "ops.h"

namespace adakv {
namespace cuda {
namespace vn_detail {

constexpr int kVnThreads = 256;  // 8 warps, both kernels

struct VnParams {
  const void* value;   // [B, Hk, N, D]
  const void* weight;  // o_proj_weight [hidden, Hq * D]
  float* out;          // [B, Hk, length]
  int Hk, G, N, D, hidden, length;
  int64_t ldw;         // row stride of the weight: Hq * D elements
  int mtiles;          // CTAs per (b, h): ceil(length / rows per CTA)
  float inv_g;         // 1 / G
};

template <int D>
struct VnCfg {
  static constexpr int kM = D <= 128 ? 256 : 128;  // value rows (tokens) per CTA
  static constexpr int kN = 128;                   // W_o rows (hidden) per B tile
  static constexpr int kWarpsM = kM / 64;          // warp tile: 64 rows
  static constexpr int kWarpsN = (kVnThreads / 32) / kWarpsM;
  static constexpr int kWTN = kN / kWarpsN;        // columns per warp: 64 or 32
  static constexpr int kMT = 4;                    // 16-row m tiles per warp
  static constexpr int kNT = kWTN / 8;             // 8-column n tiles per warp
  static constexpr int kStages = D == 64 ? 4 : (D == 128 ? 3 : 2);
  static constexpr int kKSteps = D / 16;
  static constexpr int kCPR = D / 8;               // 16-byte chunks per row
  static constexpr size_t kABytes = static_cast<size_t>(kM) * D * 2;
  static constexpr size_t kBBytes = static_cast<size_t>(kN) * D * 2;
  static constexpr size_t kSmem = kABytes + kStages * kBBytes;
  static_assert(kWarpsM * kWarpsN * 32 == kVnThreads && kNT % 2 == 0, "warp layout");
  static_assert(kVnThreads % kCPR == 0 && (kVnThreads / kCPR) % 8 == 0, "loader layout");
  static_assert((kM * kCPR) % kVnThreads == 0 && (kN * kCPR) % kVnThreads == 0, "loader");
  // the epilogue's column-warp partials [kWarpsN][kM] reuse the B ring
  static_assert(static_cast<size_t>(kWarpsN) * kM * 4 <= kStages * kBBytes, "epilogue");
};

template <typename T, int D>
__global__ void __launch_bounds__(kVnThreads, 1) value_norm_mma_kernel(const VnParams p) {
  using Cfg = VnCfg<D>;
  constexpr int kS = Cfg::kStages;
  constexpr int kCPR = Cfg::kCPR;
  constexpr int kRowsPerPass = kVnThreads / kCPR;  // a multiple of 8: one swizzle per thread
  extern __shared__ __align__(128) unsigned char smem[];

  const int bh = blockIdx.x / p.mtiles;
  const int mtile = blockIdx.x - bh * p.mtiles;
  const int h = bh % p.Hk;
  const int i0 = mtile * Cfg::kM;
  const int ntiles_n = (p.hidden + Cfg::kN - 1) / Cfg::kN;
  const int U = p.G * ntiles_n;  // B tiles: u = g * ntiles_n + hidden tile
  const T* vb = static_cast<const T*>(p.value) + static_cast<int64_t>(bh) * p.N * D;
  const T* wh = static_cast<const T*>(p.weight) + static_cast<int64_t>(h) * p.G * D;

  const uint32_t a_base = smem_u32(smem);
  const uint32_t b_base = a_base + static_cast<uint32_t>(Cfg::kABytes);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp / Cfg::kWarpsN;  // rows [64 wm, +64)
  const int wn = warp % Cfg::kWarpsN;  // columns [kWTN wn, +kWTN)
  const int rl = lane >> 2;            // row inside an 8-row half of an m tile
  const int cl = lane & 3;             // column pair inside an n tile

  // Loaders: thread tid copies chunk tid % kCPR of rows tid / kCPR + j * kRowsPerPass.
  const int ld_row = tid / kCPR, ld_ch = tid % kCPR;
  const uint32_t ld_soff = swizzle_offset<D>(ld_row, ld_ch);
  auto load_a = [&] {
#pragma unroll
    for (int j = 0; j < Cfg::kM / kRowsPerPass; ++j) {
      const int row = ld_row + j * kRowsPerPass;
      const int i = i0 + row;
      const bool valid = i < p.length;  // bounds: value rows [0, length), length <= N
      // swizzle_offset<D>(row, ld_ch) == ld_soff + (row - ld_row) * D * 2 (row % 8 unchanged)
      cp_async_16(a_base + ld_soff + j * kRowsPerPass * D * 2,
                  valid ? vb + static_cast<int64_t>(i) * D + ld_ch * 8 : vb, valid ? 16 : 0);
    }
  };
  auto load_b = [&](int u, int stage) {
    const int g = u / ntiles_n;
    const int o0 = (u - g * ntiles_n) * Cfg::kN;
    const T* src = wh + static_cast<int64_t>(g) * D + ld_ch * 8;
    const uint32_t dst = b_base + stage * static_cast<uint32_t>(Cfg::kBBytes) + ld_soff;
#pragma unroll
    for (int j = 0; j < Cfg::kN / kRowsPerPass; ++j) {
      const int row = ld_row + j * kRowsPerPass;
      const int o = o0 + row;
      // bounds: W_o rows [0, hidden), columns (h G + g) D + [0, D) < Hq D
      const bool valid = o < p.hidden;
      cp_async_16(dst + j * kRowsPerPass * D * 2,
                  valid ? src + static_cast<int64_t>(o) * p.ldw : wh, valid ? 16 : 0);
    }
  };

  // cp.async groups: 0 = A + B tile 0, then one per B tile.
  load_a();
  if (U > 0) load_b(0, 0);
  cp_async_commit();
#pragma unroll
  for (int s = 1; s < kS - 1; ++s) {
    if (s < U) load_b(s, s);
    cp_async_commit();
  }

  uint32_t a_off[4], b_off[4];
  ldsm_a_offsets<D>(a_off, lane);
  ldsm_b_offsets<D>(b_off, lane);
  const uint32_t a_warp = a_base + static_cast<uint32_t>(wm * 64) * D * 2;
  const uint32_t b_warp = static_cast<uint32_t>(wn * Cfg::kWTN) * D * 2;

  float rsum[Cfg::kMT][2];  // |.| sums of rows 64 wm + 16 mt + 8 hf + rl over this thread's columns
#pragma unroll
  for (int mt = 0; mt < Cfg::kMT; ++mt) rsum[mt][0] = rsum[mt][1] = 0.f;

  for (int u = 0; u < U; ++u) {
    cp_async_wait<kS - 2>();
    __syncthreads();  // tile u (and A) visible to all; stage (u - 1) % kS free again
    {
      const int nu = u + kS - 1;
      if (nu < U) load_b(nu, nu % kS);
      cp_async_commit();
    }
    const uint32_t bs = b_base + (u % kS) * static_cast<uint32_t>(Cfg::kBBytes) + b_warp;

    float acc[Cfg::kMT][Cfg::kNT][4];
#pragma unroll
    for (int mt = 0; mt < Cfg::kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < Cfg::kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

#pragma unroll
    for (int kk = 0; kk < Cfg::kKSteps; ++kk) {
      const uint32_t koff = (kk >> 2) * 128;
      uint32_t bfr[Cfg::kNT / 2][4];
#pragma unroll
      for (int jp = 0; jp < Cfg::kNT / 2; ++jp)
        ldmatrix_x4(bfr[jp], bs + b_off[kk & 3] + koff + jp * 16 * D * 2);
#pragma unroll
      for (int mt = 0; mt < Cfg::kMT; ++mt) {
        uint32_t a[4];
        ldmatrix_x4(a, a_warp + mt * 16 * D * 2 + a_off[kk & 3] + koff);
#pragma unroll
        for (int nt = 0; nt < Cfg::kNT; ++nt)
          mma_16816<T>(acc[mt][nt], a, bfr[nt >> 1][(nt & 1) * 2], bfr[nt >> 1][(nt & 1) * 2 + 1]);
      }
    }
    // L1 epilogue: acc[mt][nt][2 hf + e] is row 16 mt + 8 hf + rl, column 8 nt + 2 cl + e.
    // Columns past `hidden` (the zero-filled W rows of the last hidden tile) are left out by
    // index, not trusted to be 0: an inf value times a zero-filled weight is NaN.
    const int col0 = (u % ntiles_n) * Cfg::kN + wn * Cfg::kWTN + 2 * cl;
    const bool full = (u % ntiles_n + 1) * Cfg::kN <= p.hidden;
#pragma unroll
    for (int mt = 0; mt < Cfg::kMT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float s = 0.f;
#pragma unroll
        for (int nt = 0; nt < Cfg::kNT; ++nt) {
          const int c = col0 + 8 * nt;
          if (full || c < p.hidden) s += fabsf(acc[mt][nt][2 * hf]);
          if (full || c + 1 < p.hidden) s += fabsf(acc[mt][nt][2 * hf + 1]);
        }
        rsum[mt][hf] += s;
      }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the B ring: it holds the partials now

  float* red = reinterpret_cast<float*>(smem + Cfg::kABytes);  // [kWarpsN][kM]
#pragma unroll
  for (int mt = 0; mt < Cfg::kMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float v = rsum[mt][hf];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      if (cl == 0) red[wn * Cfg::kM + wm * 64 + mt * 16 + hf * 8 + rl] = v;
    }
  __syncthreads();
  for (int row = tid; row < Cfg::kM; row += kVnThreads) {
    const int i = i0 + row;
    if (i < p.length) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < Cfg::kWarpsN; ++w) v += red[w * Cfg::kM + row];
      p.out[static_cast<int64_t>(bh) * p.length + i] = v * p.inv_g;
    }
  }
}

// SIMT path: grid B * Hk * ceil(length / kSimtTile), 64 tokens per CTA, 64 W_o rows per tile.
template <typename T>
__global__ void __launch_bounds__(kVnThreads) value_norm_simt_kernel(const VnParams p) {
  static_assert(kVnThreads == kSimtThreads, "the SIMT tile's block");
  __shared__ SimtTileSmem sm;
  const int bh = blockIdx.x / p.mtiles;
  const int mtile = blockIdx.x - bh * p.mtiles;
  const int h = bh % p.Hk;
  const int i0 = mtile * kSimtTile;
  const T* vb = static_cast<const T*>(p.value) + static_cast<int64_t>(bh) * p.N * p.D;
  const T* wh = static_cast<const T*>(p.weight) + static_cast<int64_t>(h) * p.G * p.D;
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  float rs[4] = {0.f, 0.f, 0.f, 0.f};  // tokens i0 + 4 ty + ii
  for (int g = 0; g < p.G; ++g) {
    for (int o0 = 0; o0 < p.hidden; o0 += kSimtTile) {
      float acc[4][4];
      // bounds: value rows [0, length), W_o rows [0, hidden) with columns (h G + g) D + [0, D)
      simt_dot_tile(vb, p.D, i0, p.length, wh + static_cast<int64_t>(g) * p.D, p.ldw, o0, 0,
                    p.hidden, p.D, sm, acc);
      // columns past `hidden` read as zero weights: left out by index (inf x 0 is NaN)
#pragma unroll
      for (int ii = 0; ii < 4; ++ii)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
          if (o0 + tx + 16 * jj < p.hidden) rs[ii] += fabsf(acc[ii][jj]);
    }
  }
#pragma unroll
  for (int ii = 0; ii < 4; ++ii) {
#pragma unroll
    for (int off = 1; off < 16; off <<= 1) rs[ii] += __shfl_xor_sync(0xffffffffu, rs[ii], off);
    const int i = i0 + ty * 4 + ii;
    if (tx == 0 && i < p.length) p.out[static_cast<int64_t>(bh) * p.length + i] = rs[ii] * p.inv_g;
  }
}

// normalize=True: out[b, h, i] /= sum over h' of out[b, h', i]. grid ceil(B * length / 256).
__global__ void __launch_bounds__(kVnThreads) value_norm_normalize_kernel(float* out, int64_t B,
                                                                          int Hk, int64_t length) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kVnThreads + threadIdx.x;
  if (t >= B * length) return;
  const int64_t b = t / length, i = t - b * length;
  float* o = out + b * Hk * length + i;  // bounds: b < B, i < length, heads < Hk
  float sum = 0.f;
  for (int h = 0; h < Hk; ++h) sum += o[h * length];
  for (int h = 0; h < Hk; ++h) o[h * length] /= sum;
}

// The norms of every (b, h, token) on the chosen path.
template <typename T>
void run_value_norm(const VnParams& p, bool use_mma, int grid, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (use_mma) {
      ADAKV_HEADDIM_SWITCH(p.D, kD, "value_norm", [&] {
        auto kernel = value_norm_mma_kernel<T, kD>;
        set_smem(kernel, VnCfg<kD>::kSmem);
        kernel<<<grid, kVnThreads, VnCfg<kD>::kSmem, stream>>>(p);
        ADAKV_LAUNCH_CHECK();
      });
      return;
    }
  }
  value_norm_simt_kernel<T><<<grid, kVnThreads, 0, stream>>>(p);
  ADAKV_LAUNCH_CHECK();
}

}  // namespace vn_detail

Tensor value_norm(const Tensor& value, const Tensor& o_proj_weight, bool normalize,
                  std::optional<int64_t> length) {
  using namespace vn_detail;
  const ValueNormShape s = validate_value_norm(value, o_proj_weight, length);
  ADAKV_CHECK(value.is_cuda(), "adakv: value_norm (CUDA) needs CUDA tensors, got ",
              device_str(value));
  const DeviceGuard guard(value.get_device_index());
  Tensor out = new_empty("value_norm", "the value norms", value, {s.B, s.Hk, s.length}, kFloat);
  if (out.numel() == 0) return out;

  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  const int64_t G = s.Hq / s.Hk;
  // int32 indices inside the kernels: tokens (+ one CTA tile), hidden rows (+ one B tile),
  // the B tile counter G * ceil(hidden / 128); every element offset is int64.
  ADAKV_CHECK(s.N < kIntMax / 2 && s.hidden < kIntMax / 2 && s.D < kIntMax &&
                  G * ceil_div(s.hidden, 128) < kIntMax,
              "adakv: value_norm (CUDA) sizes exceed the 32-bit index range: value ",
              shape_str(value), ", o_proj_weight ", shape_str(o_proj_weight));
  const DeviceInfo dev = device_info(value.get_device());
  cudaStream_t stream = current_stream(value);

  VnParams p{};
  p.value = value.data_ptr();
  p.weight = o_proj_weight.data_ptr();
  p.out = ptr<float>(out);
  p.Hk = static_cast<int>(s.Hk);
  p.G = static_cast<int>(G);
  p.N = static_cast<int>(s.N);
  p.D = static_cast<int>(s.D);
  p.hidden = static_cast<int>(s.hidden);
  p.length = static_cast<int>(s.length);
  p.ldw = s.Hq * s.D;
  p.inv_g = 1.0f / static_cast<float>(G);

  // Path choice (shapes, dtype, alignment and device only).
  const bool half_dtype = value.scalar_type() == kHalf || value.scalar_type() == kBFloat16;
  const bool aligned = reinterpret_cast<uintptr_t>(value.data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(o_proj_weight.data_ptr()) % 16 == 0;
  size_t smem = 0;
  int rows_per_cta = kSimtTile;
  if (s.D == 64 || s.D == 128 || s.D == 256) {
    ADAKV_HEADDIM_SWITCH(s.D, kD, "value_norm", [&] {
      smem = VnCfg<kD>::kSmem;
      rows_per_cta = VnCfg<kD>::kM;
    });
  }
  const bool use_mma = half_dtype && aligned && smem > 0 &&
                       smem <= static_cast<size_t>(dev.max_smem);
  if (!use_mma) rows_per_cta = kSimtTile;
  const int64_t mtiles = ceil_div(s.length, rows_per_cta);
  ADAKV_CHECK(s.B * s.Hk * mtiles < kIntMax,
              "adakv: value_norm (CUDA) sizes exceed the 32-bit grid range: B * Hk * "
              "ceil(length / ", rows_per_cta, ") = ", s.B * s.Hk * mtiles);
  p.mtiles = static_cast<int>(mtiles);
  const int grid = static_cast<int>(s.B * s.Hk * mtiles);

  ADAKV_DTYPE_SWITCH(value.scalar_type(), T, [&] { run_value_norm<T>(p, use_mma, grid, stream); });

  if (normalize) {
    const int64_t blocks = ceil_div(s.B * s.length, kVnThreads);
    ADAKV_CHECK(blocks < kIntMax, "adakv: value_norm (CUDA) sizes exceed the 32-bit grid range");
    value_norm_normalize_kernel<<<static_cast<int>(blocks), kVnThreads, 0, stream>>>(
        p.out, s.B, p.Hk, s.length);
    ADAKV_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace cuda
}  // namespace adakv
