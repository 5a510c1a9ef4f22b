// CUDA kernel of adakv::decode_gemm, the GEMM of a decode step's projections (docs/semantics.md):
//
//   x [M, K], weight [N, K], bias [N] or none -> y [M, N] = x weight^T + bias, M <= 256,
//   fp16 / bf16, fp32 accumulation; sm_90 (Hopper) only.
//
// Why a GEMM of our own: at decode M is the batch (64-256 rows) and every weight byte is read
// once per step, so a step's GEMMs should stream their weights at the copy bandwidth; cuBLAS
// reads the 8B model's o_proj / qkv / down at 57-71% of it at M = 128 on an H200 (32-48 output
// tiles of 128 rows for 132 SMs). Status (benchmarks/results/decode-gemm-h100.md): correct and
// deterministic, but on an H100 it beats cuBLAS only for down_proj and the LM head at M = 64
// (87% / 95% of the copy bandwidth against 84% / 91%) and loses elsewhere (o_proj at M = 128:
// 56% against 73%), so nothing uses it by default (Engine(decode_gemm=True) opts in).
//
// Layout: "swap AB": the weight rows are the MMA's M side (64 per consumer warpgroup), the
// tokens its N side (token tile NT = 32 / 64 / 128 / 256, decode_gemm_heuristics.h), so a CTA
// computes the transposed tile y^T[128 weight rows, NT tokens] and any M up to 256 fits one tile.
//   grid     ceil(N / 128) weight tiles x split CTAs; the split CTAs of a tile form one thread-
//            block cluster and stream 1 / split of K each (split-K for shapes with few tiles).
//   block    288 threads: warps 0-7 are two consumer warpgroups (64 weight rows x NT tokens
//            each, fp32 accumulators in registers: NT / 2 per thread), warp 8 the producer (one
//            thread issues the TMA loads). NT <= 128: two CTAs per SM (a ~96 KiB ring each);
//            NT = 256: one (a ~192 KiB ring, 128 accumulators per thread).
//   mainloop a ring of stages in shared memory, each the weight tile [128, 64] and the x tile
//            [NT, 64] (TMA, 128-byte swizzle; rows past N or M and columns past K arrive as
//            zeros), a full / empty mbarrier pair per stage; per stage 4 wgmma m64nNTk16 per
//            consumer with one wgmma group kept in flight. x is read from L2 by every tile
//            (evict-last policy), the weights once (evict-first).
//   PDL      launched as a programmatic dependent: the producer issues the first stages' weight
//            loads before griddepcontrol.wait (weights never depend on the previous kernel), the
//            x loads and every global write after it; once its mainloop is done a CTA lets the
//            next kernel launch (measured +2 to +6 points of the copy bandwidth).
//   epilogue the consumers store their fp32 tiles to shared memory (the ring, free by then),
//            one cluster barrier; CTA r of the cluster sums the r-th share of the tile's
//            (token, 4-row group) units over the cluster's CTAs (distributed shared memory, in
//            rank order: deterministic), adds the bias, rounds once and writes y (8-byte stores
//            along N); a second cluster barrier keeps every CTA's shared memory alive until its
//            peers have read it.
// Launch shapes depend on tensor shapes only, everything runs on the current stream, no host
// sync (CUDA-graph safe). K = 0: y = bias (or zeros) by a fill kernel.

#include <cuda.h>  // CUtensorMap and the cuTensorMapEncodeTiled prototype (fetched at run time)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <type_traits>

#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/decode_gemm_heuristics.h"
#include "cuda/hopper.cuh"
#include "cuda/launch.cuh"
#include "cuda/mma.cuh"  // smem_u32
#include "ops.h"

namespace adakv {
namespace cuda {
namespace dg_detail {

constexpr int kConsumerThreads = 256;            // warps 0-7: two consumer warpgroups
constexpr int kThreads = kConsumerThreads + 32;  // + warp 8: the producer
constexpr int kBlockF = kDecodeGemmBlockF;       // 128 weight rows
constexpr int kBlockK = kDecodeGemmBlockK;       // 64: one 128-byte swizzled row per stage
constexpr int kRedPitch = kBlockF + 4;           // fp32 tile row pitch: conflict-free stores

// Token tiles up to 128 run two CTAs per SM (a ring of ~96 KiB each, <= 113 registers per
// thread): the next kernel's CTAs can start streaming their weights while this one finishes
// (PDL), and clusters pack twice as densely. A 256-token tile needs 128 accumulators per
// thread: one CTA per SM with a ~192 KiB ring.
template <int NT>
struct DgCfg {
  static constexpr int kCtasPerSm = NT <= 128 ? 2 : 1;
  static constexpr int kRingBudget = NT <= 128 ? 100 * 1024 : 200 * 1024;
  static constexpr int kWBytes = kBlockF * kBlockK * 2;
  static constexpr int kXBytes = NT * kBlockK * 2;
  static constexpr int kStageBytes = kWBytes + kXBytes;
  static constexpr int kStages = std::min(8, kRingBudget / kStageBytes);
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kRedBytes = NT * kRedPitch * 4;
  static constexpr int kDataBytes = std::max(kRingBytes, kRedBytes);
  // + barriers, + slack to align the dynamic shared memory to 1024 bytes (the swizzle atom)
  static constexpr int kSmem = kDataBytes + 2 * kStages * 8 + 1024;
  static_assert(kStageBytes % 1024 == 0 && kWBytes % 1024 == 0, "1024-byte aligned tiles");
  static_assert(kStages >= 3, "at least a triple buffer");
};

struct DgParams {
  void* y;             // [M, N]
  const void* bias;    // [N] or nullptr
  int M, N;
  int k_blocks;        // ceil(K / 64)
  int split;           // CTAs per tile (the cluster size)
};

template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, DgCfg<NT>::kCtasPerSm)
    decode_gemm_kernel(const __grid_constant__ CUtensorMap tmap_w,
                       const __grid_constant__ CUtensorMap tmap_x, const DgParams p) {
#if ADAKV_HOPPER_MMA
  using Cfg = DgCfg<NT>;
  constexpr int kStages = Cfg::kStages;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;  // shared address of the ring / fp32 tile
  unsigned char* const base_ptr = smem_raw + (base - raw);
  const uint32_t full_bar = base + Cfg::kDataBytes;  // kStages barriers of 8 bytes
  const uint32_t empty_bar = full_bar + kStages * 8;

  const int tid = threadIdx.x;
  const int wg = tid >> 7;  // 0, 1: consumers; 2: the producer warp
  const int tile = blockIdx.x / p.split;
  const int rank = blockIdx.x - tile * p.split;  // == the cluster rank (clusters along x)
  const int f0 = tile * kBlockF;
  const int kb0 = static_cast<int>(static_cast<int64_t>(rank) * p.k_blocks / p.split);
  const int kb1 = static_cast<int>(static_cast<int64_t>(rank + 1) * p.k_blocks / p.split);
  const int nkb = kb1 - kb0;

  if (tid == kConsumerThreads) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full_bar + 8 * s, 1);
      mbar_init(empty_bar + 8 * s, 2);  // one arrival per consumer warpgroup
    }
    mbar_fence_init();
  }
  __syncthreads();

  float acc[NT / 2];
#pragma unroll
  for (int i = 0; i < NT / 2; ++i) acc[i] = 0.f;

  if (wg == 2) {
    if (tid == kConsumerThreads) {
      const uint64_t keep = l2_evict_last(), stream = l2_evict_first();
      const int pre = min(kStages, nkb);
      // Weights first: they do not depend on the previous kernel of the stream.
      for (int i = 0; i < pre; ++i) {
        const uint32_t stage = base + i * Cfg::kStageBytes;
        mbar_expect_tx(full_bar + 8 * i, Cfg::kStageBytes);
        tma_load_2d(stage, &tmap_w, full_bar + 8 * i, (kb0 + i) * kBlockK, f0, stream);
      }
      pdl_wait();
      for (int i = 0; i < pre; ++i) {
        const uint32_t stage = base + i * Cfg::kStageBytes;
        tma_load_2d(stage + Cfg::kWBytes, &tmap_x, full_bar + 8 * i, (kb0 + i) * kBlockK, 0, keep);
      }
      for (int i = pre; i < nkb; ++i) {
        const int s = i % kStages;
        const uint32_t stage = base + s * Cfg::kStageBytes;
        mbar_wait(empty_bar + 8 * s, ((i / kStages) - 1) & 1);
        mbar_expect_tx(full_bar + 8 * s, Cfg::kStageBytes);
        tma_load_2d(stage, &tmap_w, full_bar + 8 * s, (kb0 + i) * kBlockK, f0, stream);
        tma_load_2d(stage + Cfg::kWBytes, &tmap_x, full_bar + 8 * s, (kb0 + i) * kBlockK, 0, keep);
      }
    }
  } else {
    const int c = wg;  // consumer: weight rows [64 c, 64 c + 64) of the tile
    for (int i = 0; i < nkb; ++i) {
      const int s = i % kStages;
      const uint32_t stage = base + s * Cfg::kStageBytes;
      mbar_wait(full_bar + 8 * s, (i / kStages) & 1);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockK / 16; ++kk) {
        const uint64_t a = smem_desc_sw128(stage + c * 64 * 128 + kk * 32);
        const uint64_t b = smem_desc_sw128(stage + Cfg::kWBytes + kk * 32);
        wgmma_m64k16<NT, kBf16>(acc, a, b);
      }
      wgmma_commit();
      wgmma_wait<1>();  // the previous stage's MMAs are done: hand its buffers back
      if (i > 0 && (tid & 127) == 0) mbar_arrive(empty_bar + 8 * ((i - 1) % kStages));
    }
    wgmma_wait<0>();
    fence_regs(acc);
  }
  __syncthreads();  // every stage consumed: the ring becomes the fp32 tile
  // Every weight byte of this CTA has arrived: the next kernel may start launching (its CTAs
  // stream their first weight stages next to this one's epilogue; its pdl_wait still waits
  // for all of this grid).
  pdl_launch_dependents();

  float* red = reinterpret_cast<float*>(base_ptr);  // [NT tokens][kRedPitch]
  if (wg < 2) {
    const int t = tid & 127, warp = t >> 5, lane = t & 31;
    const int row = wg * 64 + 16 * warp + (lane >> 2);
#pragma unroll
    for (int i = 0; i < NT / 2; ++i) {
      const int r = row + 8 * ((i >> 1) & 1);
      const int col = 8 * (i >> 2) + 2 * (lane & 3) + (i & 1);
      red[col * kRedPitch + r] = acc[i];
    }
  }
  pdl_wait();  // y may reuse memory the previous kernel still read
  cluster_sync();

  // Reduction over the cluster: units (token, 4 weight rows), CTA `rank` owns the rank-th share.
  const int units = p.M * (kBlockF / 4);
  const int u0 = static_cast<int>(static_cast<int64_t>(rank) * units / p.split);
  const int u1 = static_cast<int>(static_cast<int64_t>(rank + 1) * units / p.split);
  T* const y = static_cast<T*>(p.y);
  const T* const bias = static_cast<const T*>(p.bias);
  for (int u = u0 + tid; u < u1; u += kThreads) {
    const int tok = u / (kBlockF / 4);
    const int r4 = (u - tok * (kBlockF / 4)) * 4;
    const uint32_t addr = smem_u32(red + tok * kRedPitch + r4);
    // every peer's load issued before the first add: one DSMEM round trip per unit
    float4 part[kDecodeGemmMaxSplit];
#pragma unroll
    for (int q = 0; q < kDecodeGemmMaxSplit; ++q)
      if (q < p.split) part[q] = ld_cluster_f32x4(cluster_peer_addr(addr, static_cast<uint32_t>(q)));
    float4 v = part[0];
#pragma unroll
    for (int q = 1; q < kDecodeGemmMaxSplit; ++q) {
      if (q < p.split) {
        v.x += part[q].x;
        v.y += part[q].y;
        v.z += part[q].z;
        v.w += part[q].w;
      }
    }
    const int f = f0 + r4;
    const float o[4] = {v.x, v.y, v.z, v.w};
    T* const dst = y + static_cast<int64_t>(tok) * p.N + f;
    if (f + 4 <= p.N && (p.N & 3) == 0) {
      T packed[4];
#pragma unroll
      for (int j = 0; j < 4; ++j)
        packed[j] = from_float<T>(bias ? o[j] + to_float(bias[f + j]) : o[j]);
      *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(packed);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (f + j < p.N) dst[j] = from_float<T>(bias ? o[j] + to_float(bias[f + j]) : o[j]);
    }
  }
  cluster_sync();  // peers may still read this CTA's tile
#endif
}

// K = 0: y[m, n] = bias[n] (or 0). grid ceil(M * N / 256).
template <typename T>
__global__ void decode_gemm_fill_kernel(T* y, const T* bias, int64_t M, int64_t N) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (t >= M * N) return;
  y[t] = bias ? bias[t % N] : from_float<T>(0.f);
}

// cuTensorMapEncodeTiled of the driver, fetched once through the runtime (no libcuda link).
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encode_tiled() {
  static std::once_flag once;
  static EncodeTiled fn = nullptr;
  static cudaError_t err = cudaSuccess;
  static cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSuccess;
  std::call_once(once, [] {
    void* f = nullptr;
    err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                           &status);
    fn = reinterpret_cast<EncodeTiled>(f);
  });
  ADAKV_CUDA_CHECK(err);
  ADAKV_CHECK(fn != nullptr && status == cudaDriverEntryPointSuccess,
              "adakv: decode_gemm (CUDA) needs cuTensorMapEncodeTiled from the CUDA driver "
              "(driver 12.0 or newer)");
  return fn;
}

// A 2-D tensor map of a row-major [rows, cols] b16 matrix, boxes of [box_rows, 64], 128-byte
// swizzle, out-of-bounds elements read as zeros.
CUtensorMap tensor_map_2d(const void* data, bool bf16, int64_t rows, int64_t cols,
                          int box_rows, const char* what) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * 2};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBlockK), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode_tiled()(
      &map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
      const_cast<void*>(data), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  ADAKV_CHECK(r == CUDA_SUCCESS, "adakv: decode_gemm (CUDA): cuTensorMapEncodeTiled failed for ",
              what, " (CUresult ", static_cast<int>(r), ")");
  return map;
}

// CTAs of decode_gemm_kernel<T, NT> resident at once per cluster size s (slots[s], s = 1..8):
// cudaOccupancyMaxActiveClusters x s, or CTAs per SM x SMs for s = 1. Queried once per device.
struct DgSlots {
  int slots[kDecodeGemmMaxSplit + 1];
};

template <typename T, int NT>
DgSlots decode_gemm_slots(int device) {
  return config_once_per_device(device, [](int dev) {
    using Cfg = DgCfg<NT>;
    auto kernel = decode_gemm_kernel<T, NT>;
    set_smem(kernel, Cfg::kSmem);
    DgSlots r{};
    int per_sm = 0;
    ADAKV_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, Cfg::kSmem));
    r.slots[0] = 0;
    r.slots[1] = std::max(1, per_sm) * num_sms(dev);
    for (int s = 2; s <= kDecodeGemmMaxSplit; ++s)  // 0: cannot run (the split rule skips it)
      r.slots[s] = cluster_resident_ctas(kernel, kThreads, Cfg::kSmem, s);
    return r;
  });
}

template <typename T, int NT>
void launch_decode_gemm(const Tensor& x, const Tensor& weight, DgParams p, int64_t K,
                        int64_t forced_split, cudaStream_t stream) {
  using Cfg = DgCfg<NT>;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  const int64_t tiles = ceil_div(p.N, kBlockF);
  const DgSlots slots = decode_gemm_slots<T, NT>(x.get_device());
  p.split = decode_gemm_split(tiles, p.k_blocks, slots.slots, forced_split);
  ADAKV_CHECK(tiles * p.split < std::numeric_limits<int>::max(),
              "adakv: decode_gemm (CUDA) grid too large");
  const CUtensorMap tw = tensor_map_2d(weight.data_ptr(), kBf16, p.N, K, kBlockF, "weight");
  const CUtensorMap tx = tensor_map_2d(x.data_ptr(), kBf16, p.M, K, NT, "x");
  auto kernel = decode_gemm_kernel<T, NT>;
  set_smem(kernel, Cfg::kSmem);
  LaunchOpts opts;
  opts.cluster = p.split > 1 ? p.split : 0;
  // programmatic dependent launch unless ADAKV_DECODE_GEMM_PDL=0 (a developer A/B switch)
  opts.pdl = env_override("ADAKV_DECODE_GEMM_PDL") != EnvOverride::kOff;
  launch_ex(kernel, tiles * p.split, kThreads, Cfg::kSmem, stream, opts, tw, tx, p);
}

}  // namespace dg_detail

Tensor decode_gemm(const Tensor& x, const Tensor& weight, const OptTensor& bias, int64_t split) {
  using namespace dg_detail;
  const DecodeGemmShape s = validate_decode_gemm(x, weight, bias, split);
  ADAKV_CHECK(x.is_cuda(), "adakv: decode_gemm (CUDA) needs CUDA tensors, got ", device_str(x));
  ADAKV_CHECK(x.scalar_type() == kHalf || x.scalar_type() == kBFloat16,
              "adakv: decode_gemm (CUDA) needs float16 or bfloat16 x and weight, got ",
              x.scalar_type());
  const DeviceGuard guard(x.get_device_index());
  const int device = x.get_device();
  int major = 0;
  ADAKV_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  ADAKV_CHECK(major == 9,
              "adakv: decode_gemm (CUDA) runs on sm_90 (Hopper) GPUs only; this device has "
              "compute capability ", major, ".x (use torch.nn.functional.linear)");
  ADAKV_CHECK(s.K % 8 == 0,
              "adakv: decode_gemm (CUDA) needs K (x.size(1)) to be a multiple of 8 (16-byte rows "
              "for TMA), got K = ", s.K);
  ADAKV_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0,
              "adakv: decode_gemm (CUDA) needs x and weight 16-byte aligned");
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  ADAKV_CHECK(s.N < kIntMax / 2 && s.K < kIntMax / 2,
              "adakv: decode_gemm (CUDA) sizes exceed the 32-bit index range: weight ",
              shape_str(weight));
  Tensor y = new_empty("decode_gemm", "the output", x, {s.M, s.N}, x.scalar_type());
  if (s.M == 0 || s.N == 0) return y;
  cudaStream_t stream = current_stream(x);
  if (s.K == 0) {
    const int64_t blocks = ceil_div(s.M * s.N, 256);
    ADAKV_CHECK(blocks < kIntMax, "adakv: decode_gemm (CUDA) output too large for one launch");
    ADAKV_DTYPE_SWITCH(x.scalar_type(), T, [&] {
      decode_gemm_fill_kernel<T><<<static_cast<int>(blocks), 256, 0, stream>>>(
          ptr<T>(y), ptr<T>(bias), s.M, s.N);
      ADAKV_LAUNCH_CHECK();
    });
    return y;
  }
  DgParams p{};
  p.y = y.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.M = static_cast<int>(s.M);
  p.N = static_cast<int>(s.N);
  p.k_blocks = static_cast<int>(ceil_div(s.K, kBlockK));
  auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    switch (decode_gemm_token_tile(s.M)) {
      case 32: launch_decode_gemm<T, 32>(x, weight, p, s.K, split, stream); break;
      case 64: launch_decode_gemm<T, 64>(x, weight, p, s.K, split, stream); break;
      case 128: launch_decode_gemm<T, 128>(x, weight, p, s.K, split, stream); break;
      default: launch_decode_gemm<T, 256>(x, weight, p, s.K, split, stream); break;
    }
  };
  if (x.scalar_type() == kBFloat16) {
    run(std::type_identity<__nv_bfloat16>{});
  } else {
    run(std::type_identity<__half>{});
  }
  return y;
}

}  // namespace cuda
}  // namespace adakv
