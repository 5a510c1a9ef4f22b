// The rotation of rotary position embeddings (RoPE) in the convention of transformers'
// `rotate_half` (Llama, Mistral, Qwen2, Qwen3: the two halves of a head vector are rotated
// against each other, not interleaved pairs). For a head vector x [D] (D even, h = D / 2) and
// the cos / sin rows [D] of its position, for i < h:
//   out[i]     = x[i]     * cos[i]     - x[i + h] * sin[i]
//   out[i + h] = x[i + h] * cos[i + h] + x[i]     * sin[i + h]
// in fp32 (one rounding to the output dtype by the caller). The one definition of the formula,
// shared by the CPU kernel (cpu/paged.cpp) and the CUDA kernel (cuda/paged.cu) of
// paged_append_rotary_.
#pragma once

#if defined(__CUDACC__)
#define ADAKV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ADAKV_HOST_DEVICE inline
#endif

namespace adakv {

struct RotatedPair {
  float lo, hi;  // out[i], out[i + D / 2]
};

ADAKV_HOST_DEVICE RotatedPair rotate_pair(float x_lo, float x_hi, float cos_lo, float sin_lo,
                                          float cos_hi, float sin_hi) {
  return {x_lo * cos_lo - x_hi * sin_lo, x_hi * cos_hi + x_lo * sin_hi};
}

}  // namespace adakv
