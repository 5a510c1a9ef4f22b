// Shared CUDA helpers of the adakv kernels: the CUDA side of the stable-ABI adapter (current
// stream through the C shim, device guard, CUDA error checks), device limits (SMs, shared
// memory), conversions, vector types, static switches (runtime value -> template parameter),
// launch checks, the vector width of row copies and the developer / test overrides read from
// the environment (env_override).
// Like every file in csrc/, this uses PyTorch's stable C++ ABI only (csrc/torch_api.h): no ATen
// or c10 header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>  // aoti_torch_get_current_cuda_stream (USE_CUDA)
#include <torch/csrc/stable/accelerator.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "torch_api.h"

namespace adakv {
namespace cuda {

// RAII: makes a tensor's device current for the op (torch::stable::accelerator::DeviceGuard,
// constructed from t.get_device_index()).
using DeviceGuard = torch::stable::accelerator::DeviceGuard;

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

}  // namespace cuda
}  // namespace adakv

// A CUDA runtime call that must succeed: a failure raises RuntimeError naming the call, the
// CUDA error and where it happened.
#define ADAKV_CUDA_CHECK(EXPR)                                                              \
  do {                                                                                      \
    const cudaError_t adakv_cuda_err_ = (EXPR);                                             \
    if (adakv_cuda_err_ != cudaSuccess)                                                     \
      ::adakv::detail::fail("adakv: CUDA error in ", #EXPR, ": ",                           \
                            cudaGetErrorString(adakv_cuda_err_), " (", __FILE__, ":",       \
                            __LINE__, ")");                                                 \
  } while (0)

// After a <<<...>>> launch: a launch error (bad configuration, no kernel image for the device)
// raises RuntimeError. Asynchronous kernel faults surface at the next synchronising call.
#define ADAKV_LAUNCH_CHECK()                                                                \
  do {                                                                                      \
    const cudaError_t adakv_cuda_err_ = cudaGetLastError();                                 \
    if (adakv_cuda_err_ != cudaSuccess)                                                     \
      ::adakv::detail::fail("adakv: CUDA kernel launch failed: ",                           \
                            cudaGetErrorString(adakv_cuda_err_), " (", __FILE__, ":",       \
                            __LINE__, ")");                                                 \
  } while (0)

namespace adakv {
namespace cuda {

// The current CUDA stream of torch on `device_index` (the C shim: the one stream query of the
// stable ABI; torch::stable has no CUDA stream type at 2.11).
inline cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  ADAKV_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream) == AOTI_TORCH_SUCCESS,
              "adakv: could not get the current CUDA stream of cuda:", device_index);
  return static_cast<cudaStream_t>(stream);
}
inline cudaStream_t current_stream(const Tensor& t) { return current_stream(t.get_device_index()); }

inline int num_sms(int device) {
  int n = 0;
  ADAKV_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A developer / test override of a path, read per call (no device work): NAME=0 forces it off,
// NAME=1 on, anything else (or unset) leaves the default. Used by allocate.cu / select.cu
// (ADAKV_*_CLUSTER) and decode_gemm.cu (ADAKV_DECODE_GEMM_PDL).
enum class EnvOverride { kDefault, kOff, kOn };
inline EnvOverride env_override(const char* name) {
  const char* v = std::getenv(name);
  if (v != nullptr && std::string(v) == "0") return EnvOverride::kOff;
  if (v != nullptr && std::string(v) == "1") return EnvOverride::kOn;
  return EnvOverride::kDefault;
}

// SM count and opt-in shared memory per block, queried once per device (benign race: every
// thread writes the same values). Used by the launchers that size grids / pick a path by them
// (score.cu, value_norm.cu).
struct DeviceInfo {
  int sms;
  int max_smem;
};
inline DeviceInfo device_info(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> sms_cache[kMaxDevices];
  static std::atomic<int> smem_cache[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) {
    int smem = 0;
    ADAKV_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    return {num_sms(device), smem};
  }
  int sms = sms_cache[device].load(std::memory_order_relaxed);
  int smem = smem_cache[device].load(std::memory_order_relaxed);
  if (sms == 0 || smem == 0) {
    sms = num_sms(device);
    ADAKV_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    sms_cache[device].store(sms, std::memory_order_relaxed);
    smem_cache[device].store(smem, std::memory_order_relaxed);
  }
  return {sms, smem};
}

// Opt a kernel into `bytes` of dynamic shared memory (needed above the 48 KiB default).
template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    ADAKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(bytes)));
  }
}

template <int VEC> struct VecType;
template <> struct VecType<16> { using type = uint4; };
template <> struct VecType<8> { using type = uint2; };
template <> struct VecType<4> { using type = uint32_t; };
template <> struct VecType<2> { using type = uint16_t; };

// Row copies (cache.cu, paged.cu): VecType<VEC> is the unsigned type of VEC bytes;
// vector_width is the largest width in bytes dividing the row size and the address of every
// tensor; ADAKV_VEC_SWITCH turns it into the compile-time VEC.
inline int vector_width(int64_t row_bytes, std::initializer_list<const Tensor*> tensors) {
  for (int v : {16, 8, 4}) {
    bool ok = row_bytes % v == 0;
    for (const Tensor* t : tensors) ok = ok && reinterpret_cast<uintptr_t>(t->data_ptr()) % v == 0;
    if (ok) return v;
  }
  return 2;  // every supported dtype has at least 2 bytes per element
}

}  // namespace cuda
}  // namespace adakv

#define ADAKV_VEC_SWITCH(WIDTH, NAME, ...)                      \
  [&] {                                                         \
    switch (WIDTH) {                                            \
      case 16: { constexpr int NAME = 16; return __VA_ARGS__(); } \
      case 8: { constexpr int NAME = 8; return __VA_ARGS__(); }   \
      case 4: { constexpr int NAME = 4; return __VA_ARGS__(); }   \
      default: { constexpr int NAME = 2; return __VA_ARGS__(); }  \
    }                                                           \
  }()

// Static switches: turn a runtime value into a compile-time constant named NAME.
// The K/V dtypes as CUDA types: float, __half, __nv_bfloat16.
#define ADAKV_DTYPE_SWITCH(SCALAR_TYPE, NAME, ...) \
  ADAKV_KV_DTYPE_SWITCH(SCALAR_TYPE, __half, __nv_bfloat16, NAME, __VA_ARGS__)

#define ADAKV_HEADDIM_SWITCH(HEAD_DIM, NAME, OPNAME, ...)                                  \
  [&] {                                                                                    \
    if ((HEAD_DIM) == 64) { constexpr int NAME = 64; return __VA_ARGS__(); }               \
    if ((HEAD_DIM) == 128) { constexpr int NAME = 128; return __VA_ARGS__(); }             \
    if ((HEAD_DIM) == 256) { constexpr int NAME = 256; return __VA_ARGS__(); }             \
    ::adakv::detail::fail("adakv: ", OPNAME, " is not implemented for CUDA with head dim ", \
                          (HEAD_DIM), " (supported: 64, 128, 256)");                       \
  }()

#define ADAKV_BOOL_SWITCH(COND, NAME, ...)                                                 \
  [&] {                                                                                    \
    if (COND) { constexpr bool NAME = true; return __VA_ARGS__(); }                        \
    constexpr bool NAME = false; return __VA_ARGS__();                                     \
  }()
