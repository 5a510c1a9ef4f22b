// Shared CUDA helpers of the adakv kernels: dtype mapping, conversions, vector types,
// static switches (runtime value -> template parameter) and launch checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace adakv {
namespace cuda {

// The device type of each supported torch dtype.
template <typename T> struct DeviceType;
template <> struct DeviceType<float> { using type = float; };
template <> struct DeviceType<c10::Half> { using type = __half; };
template <> struct DeviceType<c10::BFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 16 bytes: the width of one vector load/store per thread.
struct alignas(16) Vec16 { uint4 raw; };
template <typename T> constexpr int kElemsPer16B = 16 / sizeof(T);

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int num_sms(int device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

}  // namespace cuda
}  // namespace adakv

// Static switches: turn a runtime value into a compile-time constant named NAME.
#define ADAKV_DTYPE_SWITCH(SCALAR_TYPE, NAME, ...)                                        \
  [&] {                                                                                    \
    switch (SCALAR_TYPE) {                                                                 \
      case at::kFloat: { using NAME = float; return __VA_ARGS__(); }                       \
      case at::kHalf: { using NAME = __half; return __VA_ARGS__(); }                       \
      case at::kBFloat16: { using NAME = __nv_bfloat16; return __VA_ARGS__(); }            \
      default: TORCH_CHECK(false, "adakv: unsupported dtype ", SCALAR_TYPE);               \
    }                                                                                      \
  }()

#define ADAKV_HEADDIM_SWITCH(HEAD_DIM, NAME, OPNAME, ...)                                  \
  [&] {                                                                                    \
    if ((HEAD_DIM) == 64) { constexpr int NAME = 64; return __VA_ARGS__(); }               \
    if ((HEAD_DIM) == 128) { constexpr int NAME = 128; return __VA_ARGS__(); }             \
    if ((HEAD_DIM) == 256) { constexpr int NAME = 256; return __VA_ARGS__(); }             \
    TORCH_CHECK(false, "adakv: ", OPNAME, " is not implemented for CUDA with head dim ",   \
                (HEAD_DIM), " (supported: 64, 128, 256)");                                 \
  }()

#define ADAKV_BOOL_SWITCH(COND, NAME, ...)                                                 \
  [&] {                                                                                    \
    if (COND) { constexpr bool NAME = true; return __VA_ARGS__(); }                        \
    constexpr bool NAME = false; return __VA_ARGS__();                                     \
  }()

#define ADAKV_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
