// CUDA kernels of adakv::score (SnapKV observation-window scores, docs/semantics.md `score`)
// and adakv::defensive_score (the DefensiveKV scores of SPEC 7.2 steps 1-3, with the SnapKV mean
// and the window masses; docs/semantics.md `defensive_score`): one kernel family.
//
//   q_window [B, Hq, W, D], key [B, Hk, N, D] (fp32 / fp16 / bf16), key_start [B] int32
//   -> score: scores [B, Hk, L = N - W] fp32
//   -> defensive_score: scores, snap_mean [B, Hk, L] fp32, window_mass [B, 2] fp32
//
// Per KV head (b, h) the R = G * W window queries of its group are one [R, D] block. Softmax
// needs the row max / sum over all N keys before any probability can be aggregated, so K is
// streamed twice (four launches, all on the current stream, no host sync):
//
//   1. pass 1   grid = B * Hk * nchunk1 CTAs, each a chunk of `chunk` keys (a few 64-key
//               tiles, cp.async ring): S = Q K^T on tensor cores (mma.m16n8k16, fp32
//               accumulate, Q fragments kept in registers for D <= 128), masked (padding keys,
//               causal window); per row an online (max, sum 2^(x - max)) -> partial workspace.
//   2. combine  grid = B * Hk * ceil(G * Wp / 32) CTAs: merge the partials of every row ->
//               (max, 1 / sum); invalid rows (window padding rows, padding queries) get
//               (+inf, 0) and contribute exactly 0 in pass 2.
//   3. pass 2   grid = B * Hk * nchunk2 CTAs over the L prefix keys, walked in the reverse
//               order of pass 1 (the K tiles pass 1 read last are still in L2): recompute S,
//               p = 2^(x - m) / l, aggregate over the W window queries of each query head
//               (mean / max: a transposing warp butterfly over the rows of each 16-row mma
//               tile, then a per-column loop over the tiles), reduce over the G heads
//               (mean / max) -> pre-pool fp32 column scores.
//   4. pool     grid = B * Hk * ceil(L / 1024) CTAs: max / avg pooling over the prefix axis
//               (halo in shared memory) and -inf on padding columns. Skipped when there is no
//               pooling (pooling == "none" or kernel_size == 1): pass 2 then writes the output.
//
// defensive_score runs the same four stages with the kDef variants (score_kernel.cuh's header
// comment has the arithmetic): pass 1 also keeps, per row, the sums of the softmax numerators
// over the prefix, over the window, over the last W prefix keys and over the prefix weighted
// by each key's pooling coverage; the combine turns them into the rescale factor of each row's
// pooled probabilities and the row's window masses; pass 2 pools each window query's
// probabilities (tiles of 64 keys overlapping by 2 r: the pooling windows of a tile's outputs lie
// in it) and reduces with max over the rows (and the plain mean: snap_mean); the last stage
// (`defensive_finish_kernel`, instead of the pool kernel) floors R at its mean over the valid
// prefix and writes the window masses. Memory: the three outputs plus workspaces of
// O(B Hk (nchunk1 + 1) G Wp) floats: the [Hq, W, N] probabilities are never materialised.
// Limitation: the pooling radius r = min(kernel_size / 2, L - 1) must be <= kMaxDefRadius (16:
// kernel_size <= 33), unless r = L - 1 (every window covers the whole prefix); otherwise a clear
// "not implemented for CUDA" error (adakv_ops.defensive_score then uses the torch-op version).
//
// Tensor-core path: fp16 / bf16 with D in {64, 128, 256} (ADAKV_HEADDIM_SWITCH), 16-byte
// aligned inputs, and a Q block that fits in shared memory. Everything else (fp32, other head
// dims, very large G * W, misaligned views) takes the SIMT path with the same four stages
// (FFMA tiles; a correctness path), so score never raises "not implemented" on CUDA.
//
// Cost (Llama-3.1-8B layer, B = 1, Hq = 32, Hk = 8, D = 128, W = 32, N = 128K, bf16): K is
// 268 MB, read twice from HBM at most (pass 2 partly hits L2); QK^T is 2 x 34 GFLOP on mma.sync.
// Stable ABI only (csrc/torch_api.h, cuda/common.cuh); workspaces come from torch's allocator
// (adakv::new_empty on the query's device).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>

#include "checks.h"
#include "cuda/common.cuh"
#include "cuda/score_kernel.cuh"
#include "ops.h"

namespace adakv {
namespace cuda {
namespace {

using score_detail::kBN;
using score_detail::kMaxDefRadius;
using score_detail::kPoolTile;
using score_detail::kRowBlock;
using score_detail::kSimtKeys;
using score_detail::kThreads;
using score_detail::MmaCfg;
using score_detail::ScoreParams;

// Keys per CTA: about 4 CTAs per SM over the whole grid (2 resident per SM on the tensor-core
// path), 4..16 tiles per CTA so that the Q block each CTA loads (as many bytes as 2 K tiles
// at G * W = 128) is amortised over several K tiles.
int pick_chunk(int64_t n_keys, int64_t bh, int tile, int sms) {
  const int64_t tiles = ceil_div(n_keys, tile);
  int64_t per_cta = ceil_div(tiles * bh, 4 * static_cast<int64_t>(sms));
  per_cta = std::clamp<int64_t>(per_cta, 4, 16);
  per_cta = std::min<int64_t>(per_cta, std::max<int64_t>(tiles, 1));
  return static_cast<int>(per_cta * tile);
}

template <typename T, int D, bool kAggMax, bool kGqaMax>
void launch_mma_pass2(const ScoreParams& p, size_t smem, cudaStream_t stream) {
  auto kernel = score_detail::score_mma_kernel<T, D, true, kAggMax, kGqaMax, false>;
  set_smem(kernel, smem);
  kernel<<<p.B * p.Hk * p.nchunk2, kThreads, smem, stream>>>(p);
  ADAKV_LAUNCH_CHECK();
}

template <typename T, bool kAggMax, bool kGqaMax>
void launch_simt_pass2(const ScoreParams& p, cudaStream_t stream) {
  auto kernel = score_detail::score_simt_pass2_kernel<T, kAggMax, kGqaMax>;
  const size_t smem = static_cast<size_t>(p.G) * kSimtKeys * sizeof(float);
  if (smem + sizeof(score_detail::SimtSmem) > 48 * 1024) {
    ADAKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<p.B * p.Hk * p.nchunk2, kThreads, smem, stream>>>(p);
  ADAKV_LAUNCH_CHECK();
}

template <bool kDef>
void launch_combine(const ScoreParams& p, cudaStream_t stream) {
  score_detail::score_combine_kernel<kDef><<<p.B * p.Hk * ((p.R_pad + 31) / 32),
                                             score_detail::kCombineThreads, 0, stream>>>(p);
  ADAKV_LAUNCH_CHECK();
}

// pass 1 -> combine -> pass 2 on the tensor-core path (fp16 / bf16) or the SIMT path.
template <typename T>
void run_passes(const ScoreParams& p, bool use_mma, size_t smem1, size_t smem2, bool agg_max,
                bool gqa_max, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (use_mma) {
      ADAKV_HEADDIM_SWITCH(p.D, kD, "score", [&] {
        auto pass1 = score_detail::score_mma_kernel<T, kD, false, false, false, false>;
        set_smem(pass1, smem1);
        pass1<<<p.B * p.Hk * p.nchunk1, kThreads, smem1, stream>>>(p);
        ADAKV_LAUNCH_CHECK();
        launch_combine<false>(p, stream);
        ADAKV_BOOL_SWITCH(agg_max, kAggMax, [&] {
          ADAKV_BOOL_SWITCH(gqa_max, kGqaMax, [&] {
            launch_mma_pass2<T, kD, kAggMax, kGqaMax>(p, smem2, stream);
          });
        });
      });
      return;
    }
  }
  score_detail::score_simt_pass1_kernel<T, false>
      <<<p.B * p.Hk * p.nchunk1, kThreads, 0, stream>>>(p);
  ADAKV_LAUNCH_CHECK();
  launch_combine<false>(p, stream);
  ADAKV_BOOL_SWITCH(agg_max, kAggMax, [&] {
    ADAKV_BOOL_SWITCH(gqa_max, kGqaMax, [&] { launch_simt_pass2<T, kAggMax, kGqaMax>(p, stream); });
  });
}

// defensive_score: pass 1 -> combine -> pass 2 of the kDef kernels, on the tensor-core path
// (fp16 / bf16) or the SIMT path.
template <typename T>
void run_defensive_passes(const ScoreParams& p, bool use_mma, size_t smem1, size_t smem2,
                          cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (use_mma) {
      ADAKV_HEADDIM_SWITCH(p.D, kD, "defensive_score", [&] {
        auto pass1 = score_detail::score_mma_kernel<T, kD, false, false, false, true>;
        set_smem(pass1, smem1);
        pass1<<<p.B * p.Hk * p.nchunk1, kThreads, smem1, stream>>>(p);
        ADAKV_LAUNCH_CHECK();
        launch_combine<true>(p, stream);
        auto pass2 = score_detail::score_mma_kernel<T, kD, true, false, false, true>;
        set_smem(pass2, smem2);
        pass2<<<p.B * p.Hk * p.nchunk2, kThreads, smem2, stream>>>(p);
        ADAKV_LAUNCH_CHECK();
      });
      return;
    }
  }
  score_detail::score_simt_pass1_kernel<T, true>
      <<<p.B * p.Hk * p.nchunk1, kThreads, 0, stream>>>(p);
  ADAKV_LAUNCH_CHECK();
  launch_combine<true>(p, stream);
  score_detail::defensive_simt_pass2_kernel<T><<<p.B * p.Hk * p.nchunk2, kThreads, 0, stream>>>(p);
  ADAKV_LAUNCH_CHECK();
}

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

// Sizes every kernel of the family indexes with 32-bit ints (per-launch offsets are int64).
void check_index_range(const ScoreShape& s, const char* op) {
  const int64_t G = s.Hq / s.Hk;
  ADAKV_CHECK(s.N < kIntMax / 2 && s.B * s.Hk * s.Hq < kIntMax && G * (s.W + 16) < kIntMax / 4,
              "adakv: ", op, " (CUDA) sizes exceed the 32-bit index range");
  ADAKV_CHECK(s.D >= 1, "adakv: ", op, " (CUDA) needs a head dim D >= 1, got D = ", s.D);
}

// The shape fields of the kernel parameters and the logit scale (both ops).
ScoreParams shape_params(const ScoreShape& s, const Tensor& q_window, const Tensor& key,
                         const OptTensor& key_start, std::optional<double> scale) {
  ScoreParams p{};
  p.q = q_window.data_ptr();
  p.k = key.data_ptr();
  p.key_start = ptr<int32_t>(key_start);
  p.B = static_cast<int>(s.B);
  p.Hq = static_cast<int>(s.Hq);
  p.Hk = static_cast<int>(s.Hk);
  p.G = static_cast<int>(s.Hq / s.Hk);
  p.W = static_cast<int>(s.W);
  p.N = static_cast<int>(s.N);
  p.L = static_cast<int>(s.L);
  p.D = static_cast<int>(s.D);
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(s.D));
  p.scale_log2 = static_cast<float>(sc * 1.4426950408889634);  // * log2(e)
  return p;
}

// Rows of the Q block on the tensor-core path: G * Wp16 padded rows in row blocks of kRowBlock.
int64_t mma_row_alloc(const ScoreShape& s) {
  const int64_t Wp16 = ceil_div(s.W, 16) * 16;
  return ceil_div(s.Hq / s.Hk * Wp16, kRowBlock) * kRowBlock;
}

// Inputs the tensor-core path takes (dtype, head dim, 16-byte alignment for cp.async; a
// contiguous view at an odd element offset takes the SIMT path). Shared memory is checked by the
// caller.
bool mma_inputs(const ScoreShape& s, const Tensor& q_window, const Tensor& key) {
  const bool half_dtype = key.scalar_type() == kHalf || key.scalar_type() == kBFloat16;
  const bool mma_dim = s.D == 64 || s.D == 128 || s.D == 256;
  const bool aligned = reinterpret_cast<uintptr_t>(q_window.data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(key.data_ptr()) % 16 == 0;
  return half_dtype && mma_dim && aligned;
}

// Row layout and pass-1 chunks of the chosen path.
void set_layout(ScoreParams& p, const ScoreShape& s, bool use_mma, int sms) {
  const int64_t G = s.Hq / s.Hk, BH = s.B * s.Hk;
  if (use_mma) {
    const int64_t Wp16 = ceil_div(s.W, 16) * 16;
    const int64_t r_alloc = mma_row_alloc(s);
    p.Wp = static_cast<int>(Wp16);
    p.R_pad = static_cast<int>(G * Wp16);
    p.nrb = static_cast<int>(r_alloc / kRowBlock);
    p.R_stride = static_cast<int>(r_alloc);
    p.chunk = pick_chunk(s.N, BH, kBN, sms);
  } else {
    p.Wp = p.W;
    p.R_pad = static_cast<int>(G * s.W);
    p.nrb = 0;
    p.R_stride = p.R_pad;
    p.chunk = pick_chunk(s.N, BH, kSimtKeys, sms);
  }
  p.nchunk1 = static_cast<int>(ceil_div(s.N, p.chunk));
}

// Grid sizes and workspace offsets after the chunking (both ops).
void check_grid(const ScoreParams& p, const ScoreShape& s, const char* op) {
  const int64_t BH = s.B * s.Hk;
  const int64_t max_ctas_per_head =
      std::max<int64_t>({p.nchunk1, p.nchunk2, ceil_div(s.L, kPoolTile)});
  ADAKV_CHECK(BH * max_ctas_per_head < kIntMax &&
                  BH * p.nchunk1 * static_cast<int64_t>(p.R_stride) < kIntMax,
              "adakv: ", op, " (CUDA) sizes exceed the 32-bit index range");
}

}  // namespace

Tensor score(const Tensor& q_window, const Tensor& key, int64_t kernel_size,
             std::string_view pooling, std::string_view aggregate, std::string_view gqa_reduce,
             const OptTensor& key_start, std::optional<double> scale) {
  const ScoreShape s = validate_score(q_window, key, kernel_size, key_start);
  const Pooling pool = parse_pooling(std::string(pooling));
  const Reduce agg = parse_reduce(std::string(aggregate), "aggregate");
  const Reduce red = parse_reduce(std::string(gqa_reduce), "gqa_reduce");
  ADAKV_CHECK(q_window.is_cuda(), "adakv: score (CUDA) needs CUDA tensors, got ",
              device_str(q_window));
  const DeviceGuard guard(q_window.get_device_index());

  Tensor out = new_empty("score", "scores", q_window, {s.B, s.Hk, s.L}, kFloat);
  if (out.numel() == 0) return out;

  const int64_t G = s.Hq / s.Hk;
  const int64_t BH = s.B * s.Hk;
  check_index_range(s, "score");

  const DeviceInfo dev = device_info(q_window.get_device());
  const size_t max_smem = static_cast<size_t>(dev.max_smem);
  cudaStream_t stream = current_stream(q_window);

  ScoreParams p = shape_params(s, q_window, key, key_start, scale);
  // A window wider than the prefix sees the same taps as one of radius L (any odd size is
  // accepted; avg pooling still divides by kernel_size).
  const int64_t radius = std::min<int64_t>(kernel_size / 2, s.L);
  p.pool_radius = static_cast<int>(radius);
  p.pool_divisor = static_cast<float>(kernel_size);
  p.pool_max = pool == Pooling::kMax;
  p.direct = pool == Pooling::kNone || kernel_size == 1;

  // Path choice (shapes and device only).
  size_t smem1 = 0, smem2 = 0;
  if (s.D == 64 || s.D == 128 || s.D == 256) {
    const int r_alloc = static_cast<int>(mma_row_alloc(s));
    ADAKV_HEADDIM_SWITCH(s.D, kD, "score", [&] {
      smem1 = MmaCfg<kD, false, false>::smem_bytes(r_alloc);
      smem2 = MmaCfg<kD, false, true>::smem_bytes(r_alloc);
    });
  }
  const bool use_mma = mma_inputs(s, q_window, key) && std::max(smem1, smem2) <= max_smem;
  if (!use_mma) {
    ADAKV_CHECK(static_cast<size_t>(G) * kSimtKeys * sizeof(float) +
                        sizeof(score_detail::SimtSmem) <= max_smem,
                "adakv: score is not implemented for CUDA with ", G,
                " query heads per KV head on this path (shared memory)");
  }
  set_layout(p, s, use_mma, dev.sms);
  p.chunk2 = p.chunk;
  p.nchunk2 = static_cast<int>(ceil_div(s.L, p.chunk2));
  check_grid(p, s, "score");

  // Workspaces (caching allocator; every element read is written first).
  const Tensor partial = new_empty("score", "the pass-1 workspace", q_window,
                                   {BH * p.nchunk1 * p.R_stride * 2}, kFloat);
  const Tensor rowstat =
      new_empty("score", "the row statistics", q_window, {BH * p.R_stride * 2}, kFloat);
  OptTensor pre;
  p.partial = reinterpret_cast<float2*>(ptr<float>(partial));
  p.rowstat = reinterpret_cast<float2*>(ptr<float>(rowstat));
  p.out = ptr<float>(out);
  if (!p.direct) {
    pre = new_empty("score", "the pre-pooling scores", q_window, {BH * s.L}, kFloat);
    p.pre = ptr<float>(pre);
  }

  const bool agg_max = agg == Reduce::kMax;
  const bool gqa_max = red == Reduce::kMax;
  ADAKV_DTYPE_SWITCH(key.scalar_type(), T, [&] {
    run_passes<T>(p, use_mma, smem1, smem2, agg_max, gqa_max, stream);
  });

  if (!p.direct) {
    const int64_t r = radius;
    const size_t pool_smem_bytes = static_cast<size_t>(kPoolTile + 2 * r) * sizeof(float);
    p.pool_smem = pool_smem_bytes <= 48 * 1024;
    p.pool_tiles = static_cast<int>(ceil_div(s.L, kPoolTile));
    score_detail::score_pool_kernel<<<p.B * p.Hk * p.pool_tiles, kThreads,
                                      p.pool_smem ? pool_smem_bytes : 0, stream>>>(p);
    ADAKV_LAUNCH_CHECK();
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor> defensive_score(const Tensor& q_window, const Tensor& key,
                                                   int64_t kernel_size,
                                                   const OptTensor& key_start,
                                                   std::optional<double> scale) {
  const ScoreShape s = validate_score(q_window, key, kernel_size, key_start);
  ADAKV_CHECK(q_window.is_cuda(), "adakv: defensive_score (CUDA) needs CUDA tensors, got ",
              device_str(q_window));
  const DeviceGuard guard(q_window.get_device_index());

  // The outputs first: an impossible size is a clear allocation error before any work.
  Tensor scores =
      new_empty("defensive_score", "the scores", q_window, {s.B, s.Hk, s.L}, kFloat);
  Tensor snap = new_empty("defensive_score", "snap_mean", q_window, {s.B, s.Hk, s.L}, kFloat);
  Tensor window_mass =
      new_empty("defensive_score", "window_mass", q_window, {s.B, 2}, kFloat);
  if (s.B == 0) return {scores, snap, window_mass};
  cudaStream_t stream = current_stream(q_window);
  if (s.L == 0) {  // W == N: no row has a prefix (nothing to score, masses 0)
    ADAKV_CUDA_CHECK(cudaMemsetAsync(window_mass.data_ptr(), 0,
                                     static_cast<size_t>(s.B) * 2 * sizeof(float), stream));
    return {scores, snap, window_mass};
  }

  const int64_t BH = s.B * s.Hk;
  check_index_range(s, "defensive_score");
  // The pooling radius: a window reaching past both ends of the prefix reads the same taps as
  // one of radius L - 1 (every column's window covers the whole valid prefix: pool_whole).
  const int64_t radius = std::min<int64_t>(kernel_size / 2, s.L - 1);
  const bool whole = radius == s.L - 1;
  ADAKV_CHECK(whole || radius <= kMaxDefRadius,
              "adakv: defensive_score is not implemented for CUDA with kernel_size = ",
              kernel_size, " on a prefix of L = ", s.L, " tokens (pooling radius ", radius,
              " > ", kMaxDefRadius, "; adakv_ops.defensive_score falls back to torch ops)");

  const DeviceInfo dev = device_info(q_window.get_device());
  const size_t max_smem = static_cast<size_t>(dev.max_smem);

  ScoreParams p = shape_params(s, q_window, key, key_start, scale);
  p.pool_radius = static_cast<int>(radius);
  p.pool_whole = whole;
  p.pool_halo = whole ? 0 : static_cast<int>(radius);
  p.pool_divisor = static_cast<float>(kernel_size);  // cancels out (header of score_kernel.cuh)

  size_t smem1 = 0, smem2 = 0;
  if (s.D == 64 || s.D == 128 || s.D == 256) {
    const int r_alloc = static_cast<int>(mma_row_alloc(s));
    ADAKV_HEADDIM_SWITCH(s.D, kD, "defensive_score", [&] {
      smem1 = MmaCfg<kD, true, false>::smem_bytes(r_alloc);
      smem2 = MmaCfg<kD, true, true>::smem_bytes(r_alloc);
    });
  }
  // The SIMT kernels use static shared memory only (< 48 KiB whatever the shapes).
  const bool use_mma = mma_inputs(s, q_window, key) && std::max(smem1, smem2) <= max_smem;
  set_layout(p, s, use_mma, dev.sms);
  // Pass 2: tiles of kBN (kSimtKeys) keys carry step = tile - 2 halo output columns each.
  const int step2 = (use_mma ? kBN : kSimtKeys) - 2 * p.pool_halo;
  p.chunk2 = pick_chunk(s.L, BH, step2, dev.sms);
  p.nchunk2 = static_cast<int>(ceil_div(s.L, p.chunk2));
  p.pool_tiles = static_cast<int>(ceil_div(s.L, kPoolTile));
  check_grid(p, s, "defensive_score");

  // Workspaces (caching allocator; every element read is written first: partial / dpartial by
  // pass 1 for every (b, h, chunk, row < R_pad), rowstat / drow by the combine for every row
  // < R_pad, rsum by pass 2 for every (b, h, chunk)).
  const int64_t rows1 = BH * p.nchunk1 * p.R_stride;
  const Tensor partial =
      new_empty("defensive_score", "the pass-1 workspace", q_window, {rows1 * 2}, kFloat);
  const Tensor dpartial =
      new_empty("defensive_score", "the pass-1 sums", q_window, {rows1 * 4}, kFloat);
  const Tensor rowstat = new_empty("defensive_score", "the row statistics", q_window,
                                   {BH * p.R_stride * 2}, kFloat);
  const Tensor drow = new_empty("defensive_score", "the row masses", q_window,
                                {BH * p.R_stride * 4}, kFloat);
  const Tensor rsum = new_empty("defensive_score", "the pass-2 sums", q_window,
                                {BH * p.nchunk2}, ScalarType::Double);
  p.partial = reinterpret_cast<float2*>(ptr<float>(partial));
  p.dpartial = reinterpret_cast<float4*>(ptr<float>(dpartial));
  p.rowstat = reinterpret_cast<float2*>(ptr<float>(rowstat));
  p.drow = reinterpret_cast<float4*>(ptr<float>(drow));
  p.rsum = ptr<double>(rsum);
  p.out = ptr<float>(scores);
  p.snap = ptr<float>(snap);
  p.wmass = ptr<float>(window_mass);

  ADAKV_DTYPE_SWITCH(key.scalar_type(), T, [&] {
    run_defensive_passes<T>(p, use_mma, smem1, smem2, stream);
  });
  score_detail::defensive_finish_kernel<<<p.B * p.Hk * p.pool_tiles, kThreads, 0, stream>>>(p);
  ADAKV_LAUNCH_CHECK();
  return {scores, snap, window_mass};
}

}  // namespace cuda
}  // namespace adakv
