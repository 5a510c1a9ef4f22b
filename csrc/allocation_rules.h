// Scalar rules of the Ada-KV allocation, shared bit-for-bit by the CPU and CUDA kernels.
//
// Both backends must round identically, so every floating-point step is written out with
// explicit round-to-nearest operations (no fused multiply-add contraction on the GPU).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ADAKV_HD __host__ __device__ __forceinline__
#else
#define ADAKV_HD inline
#endif

namespace adakv {

ADAKV_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  volatile double r = a * b;  // volatile: forbid contraction into an FMA on the host too
  return r;
#endif
}

ADAKV_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  volatile double r = a + b;
  return r;
#endif
}

// max that propagates NaN (like torch.max / max_pool1d): every max reduction of the scores
// (window aggregate, GQA reduce, pooling) uses it, so a NaN score stays NaN on every backend
// whatever the reduction order.
ADAKV_HD float nan_max(float a, float b) { return (a != a || b != b) ? (a + b) : (a < b ? b : a); }

// Safeguarded budget before rounding: x_h = (1 - alpha) * c_h + alpha * C.
ADAKV_HD double safeguarded_budget(int64_t c_h, int64_t C, double alpha) {
  return add_rn(mul_rn(add_rn(1.0, -alpha), static_cast<double>(c_h)),
                mul_rn(alpha, static_cast<double>(C)));
}

// Official Ada-KV rounding: round_half_even((1 - alpha) * c_h + floor(alpha * C)).
ADAKV_HD int64_t official_budget(int64_t c_h, int64_t C, double alpha) {
  const double x = add_rn(mul_rn(add_rn(1.0, -alpha), static_cast<double>(c_h)),
                          floor(mul_rn(alpha, static_cast<double>(C))));
  return static_cast<int64_t>(rint(x));  // default rounding mode: to nearest, ties to even
}

// Map a float32 score to an unsigned key whose ascending order is the descending order of
// the scores: the one total order of every selection (SPEC sections 2 and 9). -0.0 == +0.0;
// every NaN gets the largest key, so NaN ranks lowest, below -inf (ties between NaNs, like all
// ties, go to the lower head, then token, index: the tie-break bits the callers append).
ADAKV_HD uint32_t descending_key(float score) {
  if (score != score) return 0xffffffffu;  // NaN
  if (score == 0.0f) score = 0.0f;  // fold -0.0 into +0.0
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(score);
#else
  static_assert(sizeof(float) == sizeof(uint32_t), "float must be 32 bits");
  __builtin_memcpy(&bits, &score, sizeof(bits));
#endif
  // ascending-order key of the float, then inverted for descending order
  const uint32_t asc = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return ~asc;
}

}  // namespace adakv
