// CPU kernel of adakv::decode_gemm: y [M, N] = x [M, K] weight [N, K]^T (+ bias [N]), each
// output a float32 dot product over k in order, rounded once to x's dtype (fp32 / fp16 / bf16).
// The reference the CUDA kernel (cuda/decode_gemm.cu) is tested against and what opcheck runs;
// a model on the CPU keeps torch's linear (adakv_ops.gemm.linear). Parallelised over
// the M * N outputs with torch::stable::parallel_for. Semantics: docs/semantics.md.

#include <cstdint>

#include "checks.h"
#include "ops.h"

namespace adakv {
namespace cpu {

Tensor decode_gemm(const Tensor& x, const Tensor& weight, const OptTensor& bias, int64_t split) {
  const DecodeGemmShape s = validate_decode_gemm(x, weight, bias, split);
  ADAKV_CHECK(x.is_cpu(), "adakv: decode_gemm (CPU) needs CPU tensors, got ", device_str(x));
  Tensor y = new_empty("decode_gemm", "the output", x, {s.M, s.N}, x.scalar_type());
  if (s.M == 0 || s.N == 0) return y;
  ADAKV_CPU_DTYPE_SWITCH(x.scalar_type(), scalar_t, [&] {
    const scalar_t* xp = ptr<scalar_t>(x);
    const scalar_t* wp = ptr<scalar_t>(weight);
    const scalar_t* bp = bias.has_value() ? ptr<scalar_t>(*bias) : nullptr;
    scalar_t* yp = ptr<scalar_t>(y);
    torch::stable::parallel_for(0, s.M * s.N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t m = t / s.N, n = t - m * s.N;
        const scalar_t* xr = xp + m * s.K;
        const scalar_t* wr = wp + n * s.K;
        float acc = 0.f;
        for (int64_t k = 0; k < s.K; ++k)
          acc += static_cast<float>(xr[k]) * static_cast<float>(wr[k]);
        if (bp != nullptr) acc += static_cast<float>(bp[n]);
        yp[t] = static_cast<scalar_t>(acc);
      }
    });
  });
  return y;
}

}  // namespace cpu
}  // namespace adakv
