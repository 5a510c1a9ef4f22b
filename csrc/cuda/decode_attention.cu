// CUDA kernels of adakv::decode_attention(_lse): attention of query [B, Hq, T, D] over the
// head-flattened cache k_flat / v_flat [rows, D] (segments s = b * Hk + h given by seg_start /
// seg_len [S] int32), GQA-aware: query head j of row b reads segment b * Hk + j / G; query t sees
// the first seg_len - T + 1 + t rows of its segment. Output [B, Hq, T, D] in the query dtype,
// lse [B, Hq, T] fp32 (natural log; -inf and out 0 when no row is visible).
//
// Parallelisation (split-K flash-decoding, decode_kernel.cuh + decode_merge.cuh):
//   * grid = S segments x num_splits x ceil(G * T / kRows) query blocks, 128 threads (4 warps);
//     all G * T query rows of a KV head share one CTA (fp16/bf16, G * T <= 16), so each K/V
//     byte is read from HBM once; warps stream 16-key tiles through cp.async rings and run
//     mma.sync m16n8k16 (fp32 accumulate) for Q.K^T and P.V with an online softmax.
//   * num_splits comes from shapes only (segments, average capacity rows / S, SM count,
//     occupancy: about 2 waves of CTAs, at least 64 keys of average capacity per split), never
//     from seg_len, so the launch shape is fixed and the op can be captured in a CUDA graph.
//     Each split covers ceil(len / num_splits) keys of its segment, computed on device.
//   * num_splits > 1: fp32 partials (at::empty workspace) merged by log-sum-exp in a second,
//     tiny kernel (one warp per query row).
// No host synchronisation; device-side segment geometry is clamped into [0, rows).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/decode_kernel.cuh"
#include "cuda/decode_merge.cuh"
#include "cuda/decode_params.cuh"
#include "ops.h"

namespace adakv {
namespace cuda {
namespace {

using decode::DecodeParams;
using decode::DecodeTraits;
using decode::MergeParams;

constexpr int kMaxDevices = 64;
constexpr int64_t kMaxSplits = 128;
constexpr int kWavesTarget = 2;

// Raises the dynamic shared-memory limit of the split kernel once per device and returns its
// occupancy (CTAs per SM). Host-side attribute calls only: no stream work, no sync.
template <typename T, int D>
int split_kernel_occupancy(int device) {
  using Tr = DecodeTraits<T, D>;
  static std::atomic<int> cache[kMaxDevices];  // 0 = not configured yet
  if (device >= 0 && device < kMaxDevices) {
    const int occ = cache[device].load(std::memory_order_relaxed);
    if (occ > 0) return occ;
  }
  auto kernel = decode::decode_split_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Tr::kSmemBytes));
  int occ = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, Tr::kThreads, Tr::kSmemBytes));
  occ = std::max(occ, 1);
  if (device >= 0 && device < kMaxDevices) cache[device].store(occ, std::memory_order_relaxed);
  return occ;
}

template <typename T, int D>
void launch_decode(const DecodeShape& sh, const at::Tensor& query, const at::Tensor& k_flat,
                   const at::Tensor& v_flat, const at::Tensor& seg_start,
                   const at::Tensor& seg_len, at::Tensor& out, float* lse, double scale) {
  using Tr = DecodeTraits<T, D>;
  const int device = query.get_device();
  const int64_t S = sh.S;
  const int64_t GT = (sh.Hq / sh.Hk) * sh.T;
  const int64_t num_mblocks = (GT + Tr::kRows - 1) / Tr::kRows;
  const int64_t base_ctas = S * num_mblocks;

  // Splits from shapes only: enough CTAs for kWavesTarget full waves, but no split smaller
  // than one CTA stage (kWarps * kTileKeys keys) of the average segment capacity.
  const int occ = split_kernel_occupancy<T, D>(device);
  const int64_t target_ctas = int64_t{kWavesTarget} * num_sms(device) * occ;
  const int64_t avg_cap = (sh.rows + S - 1) / S;
  const int64_t keys_per_cta_stage = Tr::kWarps * Tr::kTileKeys;
  const int64_t max_by_len = std::max<int64_t>(1, (avg_cap + keys_per_cta_stage - 1) / keys_per_cta_stage);
  int64_t num_splits = (target_ctas + base_ctas - 1) / base_ctas;
  num_splits = std::max<int64_t>(1, std::min({num_splits, max_by_len, kMaxSplits}));
  const int64_t grid = base_ctas * num_splits;
  TORCH_CHECK(grid <= std::numeric_limits<int32_t>::max() && GT <= std::numeric_limits<int32_t>::max() / 2,
              "adakv: decode_attention is not implemented for CUDA at this size (", S,
              " segments x ", GT, " query rows per segment)");

  DecodeParams p;
  p.q = query.data_ptr();
  p.k = k_flat.data_ptr();
  p.v = v_flat.data_ptr();
  p.seg_start = seg_start.data_ptr<int32_t>();
  p.seg_len = seg_len.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse;
  p.part_o = nullptr;
  p.part_lse = nullptr;
  p.rows = sh.rows;
  p.S = static_cast<int>(S);
  p.GT = static_cast<int>(GT);
  p.T = static_cast<int>(sh.T);
  p.num_splits = static_cast<int>(num_splits);
  p.num_mblocks = static_cast<int>(num_mblocks);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  at::Tensor part_o, part_lse;
  if (num_splits > 1) {
    const auto f32 = query.options().dtype(at::kFloat);
    part_o = at::empty({num_splits, S * GT, int64_t{D}}, f32);
    part_lse = at::empty({num_splits, S * GT}, f32);
    p.part_o = part_o.data_ptr<float>();
    p.part_lse = part_lse.data_ptr<float>();
  }

  const cudaStream_t stream = current_stream();
  decode::decode_split_kernel<T, D>
      <<<static_cast<unsigned>(grid), Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  ADAKV_LAUNCH_CHECK();

  if (num_splits > 1) {
    MergeParams mp;
    mp.part_o = p.part_o;
    mp.part_lse = p.part_lse;
    mp.out = p.out;
    mp.lse = lse;
    mp.n_rows = S * GT;
    mp.num_splits = p.num_splits;
    const int64_t merge_grid = (mp.n_rows + decode::kMergeRowsPerCta - 1) / decode::kMergeRowsPerCta;
    decode::decode_merge_kernel<T, D>
        <<<static_cast<unsigned>(merge_grid), decode::kMergeThreads, 0, stream>>>(mp);
    ADAKV_LAUNCH_CHECK();
  }
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

std::tuple<at::Tensor, at::Tensor> decode_impl(const at::Tensor& query, const at::Tensor& k_flat,
                                               const at::Tensor& v_flat,
                                               const at::Tensor& seg_start,
                                               const at::Tensor& seg_len,
                                               c10::optional<double> scale, bool want_lse) {
  const DecodeShape sh = validate_decode(query, k_flat, v_flat, seg_start, seg_len);
  TORCH_CHECK(query.is_cuda(), "adakv: decode_attention (CUDA) got query on ", query.device());
  const c10::cuda::CUDAGuard guard(query.device());
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(sh.D));

  at::Tensor out = at::empty_like(query);
  at::Tensor lse = want_lse ? at::empty({sh.B, sh.Hq, sh.T}, query.options().dtype(at::kFloat))
                            : at::Tensor();
  ADAKV_DECODE_HEADDIM_SWITCH(sh.D, kHeadDim, [&] {
    if (out.numel() == 0) return;  // Hq == 0: nothing to compute
    TORCH_CHECK(aligned16(query) && (sh.rows == 0 || (aligned16(k_flat) && aligned16(v_flat))),
                "adakv: decode_attention is not implemented for CUDA on tensors whose data is "
                "not 16-byte aligned (query / k_flat / v_flat views with an odd storage offset)");
    ADAKV_DTYPE_SWITCH(query.scalar_type(), scalar_t, [&] {
      launch_decode<scalar_t, kHeadDim>(sh, query, k_flat, v_flat, seg_start, seg_len, out,
                                        want_lse ? lse.data_ptr<float>() : nullptr, sc);
    });
  });
  return {out, lse};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_attention_lse(
    const at::Tensor& query, const at::Tensor& k_flat, const at::Tensor& v_flat,
    const at::Tensor& seg_start, const at::Tensor& seg_len, c10::optional<double> scale) {
  return decode_impl(query, k_flat, v_flat, seg_start, seg_len, scale, /*want_lse=*/true);
}

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& k_flat,
                            const at::Tensor& v_flat, const at::Tensor& seg_start,
                            const at::Tensor& seg_len, c10::optional<double> scale) {
  return std::get<0>(
      decode_impl(query, k_flat, v_flat, seg_start, seg_len, scale, /*want_lse=*/false));
}

}  // namespace cuda
}  // namespace adakv
