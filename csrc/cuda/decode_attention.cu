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
//   * num_splits > 1 on sm_90 (the default there): the splits of a query block are one
//     thread-block cluster (at most 16 CTAs) and merge their partials through distributed shared
//     memory in the same launch (each CTA stores its partial's pieces into the CTAs that merge
//     them, one cluster barrier, local merges): one kernel, no workspace; the cluster kernel has
//     a receive area of DecodeTraits::kRecvBytes on top. Elsewhere (or ADAKV_DECODE_CLUSTER=0):
//     fp32 partials (a workspace from torch's allocator) merged by log-sum-exp in a second,
//     tiny kernel (one warp per query row).
//   * sm_90: launched with programmatic dependent launch (the kernel waits for the previous one
//     before reading anything), so its launch overlaps the previous kernel's tail.
//   * ADAKV_DECODE_BALANCED=1 (fp16 / bf16, D >= 64, G * T <= 16, <= 2048 segments): the
//     work-balanced schedule instead (decode_balanced.cuh: the key tiles of all segments split
//     evenly over the warps of a persistent grid, pieces merged by
//     decode_balanced_merge_kernel); decode_heuristics.h (plan_decode_balanced) says when it
//     can run and why it is not the default.
// The launcher (decode::launch_decode, declared in decode_params.cuh) is shared with the paged
// layout (paged.cu): it picks the split plan (decode_heuristics.h) and instantiates the kernel
// with contiguous (row = seg_start[s] + i) or paged (row = page_table[t, i / P] * P + i % P,
// table row t = s or segment_index[s]) addressing; the rest of the kernel, the cluster merge and
// the two-launch merge are the same.
// No host synchronisation; device-side segment geometry is clamped into [0, rows).
// lse follows SPEC section 9: -inf only for a row that sees no key; a NaN logit (in any split)
// makes the row's lse NaN, so a NaN output never looks like an empty segment.
// Stable ABI only (csrc/torch_api.h, cuda/common.cuh).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/decode_balanced.cuh"
#include "cuda/decode_heuristics.h"
#include "cuda/decode_kernel.cuh"
#include "cuda/decode_merge.cuh"
#include "cuda/decode_params.cuh"
#include "cuda/launch.cuh"
#include "ops.h"

namespace adakv {
namespace cuda {
namespace {

using decode::DecodeParams;
using decode::DecodeTraits;
using decode::MergeParams;

// Per (kernel instantiation, device), configured once: the occupancy of the split kernel (CTAs
// per SM), the largest thread-block cluster it can run with (0: no cluster path: device or
// binary older than sm_90, or no cluster of 2 fits), and whether programmatic dependent launch
// is used (sm_90 binaries). Host-side attribute / occupancy calls only, cached by
// config_once_per_device (launch.cuh): no stream work, no sync.
struct KernelConfig {
  int occ = 0;
  int max_cluster = 0;
  bool pdl = false;
};

template <typename T, int D, bool kPaged>
KernelConfig kernel_config(int device) {
  return config_once_per_device(device, [](int device) {
    using Tr = DecodeTraits<T, D>;
    auto plain = decode::decode_split_kernel<T, D, false, kPaged>;
    auto clustered = decode::decode_split_kernel<T, D, true, kPaged>;
    KernelConfig kc;
    ADAKV_CUDA_CHECK(cudaFuncSetAttribute(plain, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        Tr::kSmemBytes));
    ADAKV_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&kc.occ, plain, Tr::kThreads, Tr::kSmemBytes));
    kc.occ = std::max(kc.occ, 1);
    cudaFuncAttributes fa{};
    ADAKV_CUDA_CHECK(cudaFuncGetAttributes(&fa, clustered));
    int major = 0;
    ADAKV_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    if (major >= 9 && fa.binaryVersion >= 90) {
      kc.pdl = true;
      ADAKV_CUDA_CHECK(cudaFuncSetAttribute(clustered, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          Tr::kClusterSmemBytes));
      ADAKV_CUDA_CHECK(
          cudaFuncSetAttribute(clustered, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
      cudaLaunchConfig_t cfg{};
      cfg.gridDim = dim3(decode::kMaxCluster, 1, 1);
      cfg.blockDim = dim3(Tr::kThreads, 1, 1);
      cfg.dynamicSmemBytes = Tr::kClusterSmemBytes;
      int size = 0;
      ADAKV_CUDA_CHECK(cudaOccupancyMaxPotentialClusterSize(&size, clustered, &cfg));
      size = std::min(size, decode::kMaxCluster);
      kc.max_cluster = size >= 2 ? size : 0;
    }
    return kc;
  });
}

// The work-balanced kernel of an instantiation on a device, configured once: whether it can run
// there (its shared memory fits the device's opt-in limit), CTAs per SM, and whether
// programmatic dependent launch is used (sm_90 binaries).
template <typename T, int D>
constexpr bool balanced_instantiated() {
  return !std::is_same_v<T, float> && (D == 64 || D == 128 || D == 256);
}

template <typename T, int D, bool kPaged>
KernelConfig balanced_config(int device) {
  return config_once_per_device(device, [](int device) {
    KernelConfig kc;  // occ == 0: not available
    if constexpr (balanced_instantiated<T, D>()) {
      using Tr = decode::BalancedTraits<T, D>;
      auto kernel = decode::decode_balanced_kernel<T, D, kPaged>;
      int optin = 0, major = 0;
      ADAKV_CUDA_CHECK(
          cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
      ADAKV_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
      if (optin >= Tr::kSmemBytes) {
        ADAKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            Tr::kSmemBytes));
        ADAKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&kc.occ, kernel,
                                                                       Tr::kThreads, Tr::kSmemBytes));
        cudaFuncAttributes fa{};
        ADAKV_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
        kc.pdl = major >= 9 && fa.binaryVersion >= 90;
      }
    }
    return kc;
  });
}

// Developer / test overrides (read per call, no device work): ADAKV_DECODE_SPLITS=n forces n
// splits; ADAKV_DECODE_CLUSTER=0 forces the two-launch merge for num_splits > 1;
// ADAKV_DECODE_BALANCED=0 / 1 turns the work-balanced kernel off / on wherever it can run.
std::optional<int64_t> env_int(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::strtoll(v, nullptr, 10);
}

// The work-balanced kernel + its merge (decode_balanced.cuh, decode_merge.cuh).
template <typename T, int D, bool kPaged>
void launch_balanced(DecodeParams& p, const Tensor& query, const KernelConfig& kc,
                     const char* op) {
  if constexpr (balanced_instantiated<T, D>()) {
    using Tr = decode::BalancedTraits<T, D>;
    const int device = query.get_device_index();
    const int64_t S = p.S, GT = p.GT;
    const int64_t grid = static_cast<int64_t>(num_sms(device)) * kc.occ;
    const int64_t warps = grid * Tr::kWarps;
    const int64_t slots = S + warps;
    const Tensor part_o =
        new_empty(op, "the balanced partials", query, {slots * GT, int64_t{D}}, kFloat);
    const Tensor part_lse = new_empty(op, "the balanced log-sum-exps", query, {slots * GT}, kFloat);
    const Tensor prefix = new_empty(op, "the tile prefix", query, {S + 1}, kInt);
    p.part_o = ptr<float>(part_o);
    p.part_lse = ptr<float>(part_lse);
    p.tile_prefix = ptr<int32_t>(prefix);
    p.total_warps = warps;
    p.num_splits = 1;
    p.num_mblocks = 1;
    const cudaStream_t stream = current_stream(query);
    launch_ex(decode::decode_balanced_kernel<T, D, kPaged>, grid, Tr::kThreads, Tr::kSmemBytes,
              stream, LaunchOpts{0, kc.pdl}, p);
    MergeParams mp{};
    mp.part_o = p.part_o;
    mp.part_lse = p.part_lse;
    mp.out = p.out;
    mp.lse = p.lse;
    mp.n_rows = S * GT;
    mp.num_splits = 1;
    mp.tile_prefix = p.tile_prefix;
    mp.total_warps = warps;
    mp.S = S;
    mp.GT = GT;
    const int64_t merge_grid =
        (mp.n_rows + decode::kMergeRowsPerCta - 1) / decode::kMergeRowsPerCta;
    launch_ex(decode::decode_balanced_merge_kernel<T, D>, merge_grid, decode::kMergeThreads, 0,
              stream, LaunchOpts{0, kc.pdl}, mp);
  }
}

template <typename T, int D, bool kPaged>
void launch_decode_t(DecodeParams& p, const Tensor& query, int64_t avg_cap, const char* op) {
  using Tr = DecodeTraits<T, D>;
  const int device = query.get_device_index();
  const int64_t S = p.S;
  const int64_t GT = p.GT;
  if constexpr (balanced_instantiated<T, D>()) {
    using Bt = decode::BalancedTraits<T, D>;
    const KernelConfig bc = balanced_config<T, D, kPaged>(device);
    decode::DecodeBalanceInputs bi;
    // paged: the balanced kernel reads a tile's 16 rows from one page (P % 16 == 0)
    bi.kernel_available = bc.occ >= 1 && (!kPaged || p.page_size % Bt::kTileKeys == 0);
    bi.segments = S;
    bi.rows_per_segment = GT;
    bi.max_rows = Bt::kRows;
    bi.max_segments = Bt::kMaxSegments;
    bi.capacity = kPaged ? static_cast<int64_t>(p.page_width) * p.page_size : p.rows;
    bi.tile_keys = Bt::kTileKeys;
    bi.num_sms = num_sms(device);
    bi.forced = env_int("ADAKV_DECODE_BALANCED");
    if (decode::plan_decode_balanced(bi)) {
      launch_balanced<T, D, kPaged>(p, query, bc, op);
      return;
    }
  }
  const int64_t num_mblocks = (GT + Tr::kRows - 1) / Tr::kRows;
  const int64_t base_ctas = S * num_mblocks;

  const KernelConfig kc = kernel_config<T, D, kPaged>(device);
  decode::DecodeSplitInputs in;
  in.base_ctas = base_ctas;
  in.avg_cap = avg_cap;
  in.keys_per_cta_stage = Tr::kWarps * Tr::kTileKeys;
  in.slots = static_cast<int64_t>(num_sms(device)) * kc.occ;
  in.max_cluster = kc.max_cluster;
  const std::optional<int64_t> cluster_env = env_int("ADAKV_DECODE_CLUSTER");
  in.cluster_allowed = !cluster_env.has_value() || *cluster_env != 0;
  in.forced_splits = env_int("ADAKV_DECODE_SPLITS");
  const decode::DecodeSplitPlan plan = decode::plan_decode_splits(in);
  const int64_t num_splits = plan.num_splits;
  const bool use_cluster = plan.use_cluster;
  const int64_t grid = base_ctas * num_splits;
  ADAKV_CHECK(grid <= std::numeric_limits<int32_t>::max() && GT <= std::numeric_limits<int32_t>::max() / 2,
              "adakv: ", op, " is not implemented for CUDA at this size (", S,
              " segments x ", GT, " query rows per segment)");

  p.part_o = nullptr;
  p.part_lse = nullptr;
  p.num_splits = static_cast<int>(num_splits);
  p.num_mblocks = static_cast<int>(num_mblocks);

  const cudaStream_t stream = current_stream(query);
  if (use_cluster) {
    launch_ex(decode::decode_split_kernel<T, D, true, kPaged>, grid, Tr::kThreads,
              Tr::kClusterSmemBytes, stream, LaunchOpts{static_cast<int>(num_splits), kc.pdl}, p);
    return;
  }
  OptTensor part_o, part_lse;  // alive until the launches below are enqueued
  if (num_splits > 1) {
    part_o = new_empty(op, "the split partials", query, {num_splits, S * GT, int64_t{D}}, kFloat);
    part_lse = new_empty(op, "the split log-sum-exps", query, {num_splits, S * GT}, kFloat);
    p.part_o = ptr<float>(part_o);
    p.part_lse = ptr<float>(part_lse);
  }
  launch_ex(decode::decode_split_kernel<T, D, false, kPaged>, grid, Tr::kThreads, Tr::kSmemBytes,
            stream, LaunchOpts{0, kc.pdl}, p);

  if (num_splits > 1) {
    MergeParams mp;
    mp.part_o = p.part_o;
    mp.part_lse = p.part_lse;
    mp.out = p.out;
    mp.lse = p.lse;
    mp.n_rows = S * GT;
    mp.num_splits = p.num_splits;
    const int64_t merge_grid = (mp.n_rows + decode::kMergeRowsPerCta - 1) / decode::kMergeRowsPerCta;
    decode::decode_merge_kernel<T, D>
        <<<static_cast<unsigned>(merge_grid), decode::kMergeThreads, 0, stream>>>(mp);
    ADAKV_LAUNCH_CHECK();
  }
}

bool aligned16(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// out, and lse when want_lse.
std::tuple<Tensor, OptTensor> decode_impl(const Tensor& query, const Tensor& k_flat,
                                          const Tensor& v_flat, const Tensor& seg_start,
                                          const Tensor& seg_len, std::optional<double> scale,
                                          bool want_lse) {
  const DecodeShape sh = validate_decode(query, k_flat, v_flat, seg_start, seg_len);
  ADAKV_CHECK(query.is_cuda(), "adakv: decode_attention (CUDA) got query on ",
              device_str(query));
  const DeviceGuard guard(query.get_device_index());
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(sh.D));

  const Tensor out = new_empty("decode_attention", "the output", query,
                               {sh.B, sh.Hq, sh.T, sh.D}, query.scalar_type());
  OptTensor lse;
  if (want_lse)
    lse = new_empty("decode_attention", "the log-sum-exp", query, {sh.B, sh.Hq, sh.T}, kFloat);
  decode::check_decode_head_dim(sh.D);
  if (out.numel() == 0) return {out, lse};  // Hq == 0: nothing to compute
  ADAKV_CHECK(aligned16(query) && (sh.rows == 0 || (aligned16(k_flat) && aligned16(v_flat))),
              "adakv: decode_attention is not implemented for CUDA on tensors whose data is "
              "not 16-byte aligned (query / k_flat / v_flat views with an odd storage offset)");
  DecodeParams p{};
  p.q = query.data_ptr();
  p.k = k_flat.data_ptr();
  p.v = v_flat.data_ptr();
  p.seg_start = ptr<int32_t>(seg_start);
  p.seg_len = ptr<int32_t>(seg_len);
  p.page_table = nullptr;
  p.out = out.data_ptr();
  p.lse = ptr<float>(lse);
  p.rows = sh.rows;
  p.T = static_cast<int>(sh.T);
  p.scale_log2 = static_cast<float>(sc * 1.4426950408889634);
  const int64_t avg_cap = (sh.rows + sh.S - 1) / sh.S;
  decode::launch_decode(p, query, sh.S, (sh.Hq / sh.Hk) * sh.T, sh.D, avg_cap, "decode_attention");
  return {out, lse};
}

}  // namespace

namespace decode {

void check_decode_head_dim(int64_t head_dim) {
  ADAKV_DECODE_HEADDIM_SWITCH(head_dim, kHeadDim, [&] { (void)kHeadDim; });
}

void launch_decode(DecodeParams& p, const Tensor& query, int64_t S, int64_t GT,
                   int64_t head_dim, int64_t avg_cap, const char* op) {
  // grid = S * ceil(GT / kRows) * num_splits CTAs must fit int32 (checked again with the
  // chosen split count below); p.S / p.GT are int on the device.
  ADAKV_CHECK(S >= 1 && S <= std::numeric_limits<int32_t>::max() &&
                  GT <= std::numeric_limits<int32_t>::max() / 2,
              "adakv: ", op, " is not implemented for CUDA at this size (", S,
              " segments x ", GT, " query rows per segment)");
  p.S = static_cast<int>(S);
  p.GT = static_cast<int>(GT);
  ADAKV_DECODE_HEADDIM_SWITCH(head_dim, kHeadDim, [&] {
    ADAKV_DTYPE_SWITCH(query.scalar_type(), scalar_t, [&] {
      ADAKV_BOOL_SWITCH(p.seg_start == nullptr, kPaged, [&] {
        launch_decode_t<scalar_t, kHeadDim, kPaged>(p, query, avg_cap, op);
      });
    });
  });
}

}  // namespace decode

std::tuple<Tensor, Tensor> decode_attention_lse(const Tensor& query, const Tensor& k_flat,
                                                const Tensor& v_flat, const Tensor& seg_start,
                                                const Tensor& seg_len,
                                                std::optional<double> scale) {
  auto [out, lse] =
      decode_impl(query, k_flat, v_flat, seg_start, seg_len, scale, /*want_lse=*/true);
  return {out, *lse};
}

Tensor decode_attention(const Tensor& query, const Tensor& k_flat, const Tensor& v_flat,
                        const Tensor& seg_start, const Tensor& seg_len,
                        std::optional<double> scale) {
  return std::get<0>(
      decode_impl(query, k_flat, v_flat, seg_start, seg_len, scale, /*want_lse=*/false));
}

}  // namespace cuda
}  // namespace adakv
