// Host-side launch helpers of the CUDA kernels: one launcher for thread-block clusters and
// programmatic dependent launch (launch_ex, cudaLaunchKernelEx with the attributes built from
// LaunchOpts by launch_attrs), launch configuration cached once per device
// (config_once_per_device), the largest usable power-of-two cluster of a kernel on a device
// (pow2_cluster_size) and how many CTAs of a kernel clusters of a given size keep resident
// (cluster_resident_ctas).
// Used by decode_attention.cu (split / balanced decode kernels: clusters, PDL), by
// allocate.cu / select.cu (the one-launch cluster kernels) and by decode_gemm.cu (clusters, PDL,
// its occupancy per cluster size). Host code only, no device work
// besides the launch itself; stable ABI only (cuda/common.cuh).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <type_traits>

#include "cuda/common.cuh"

namespace adakv {
namespace cuda {

// Launch attributes of launch_ex. cluster > 0: thread-block clusters of `cluster` CTAs along x
// (the grid a multiple of it); pdl: programmatic stream serialization (the kernel waits for
// its predecessor with griddepcontrol.wait before reading anything, so its launch overlaps the
// predecessor's tail).
struct LaunchOpts {
  int cluster = 0;
  bool pdl = false;
};

// The launch attributes of `opts` written to `attrs`; returns how many (at most 2).
inline unsigned launch_attrs(cudaLaunchAttribute (&attrs)[2], LaunchOpts opts) {
  unsigned n = 0;
  if (opts.cluster > 0) {
    attrs[n].id = cudaLaunchAttributeClusterDimension;
    attrs[n].val.clusterDim.x = static_cast<unsigned>(opts.cluster);
    attrs[n].val.clusterDim.y = 1;
    attrs[n].val.clusterDim.z = 1;
    ++n;
  }
  if (opts.pdl) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  return n;
}

// kernel<<<grid, block, smem, stream>>>(args...) through cudaLaunchKernelEx with the
// attributes of `opts`; a launch error raises RuntimeError (ADAKV_CUDA_CHECK).
template <typename Kernel, typename... Args>
void launch_ex(Kernel kernel, int64_t grid, int block, size_t smem, cudaStream_t stream,
               LaunchOpts opts, const Args&... args) {
  cudaLaunchAttribute attrs[2];
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(grid), 1, 1);
  cfg.blockDim = dim3(static_cast<unsigned>(block), 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attrs;
  cfg.numAttrs = launch_attrs(attrs, opts);
  ADAKV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
}

// How many CTAs of `kernel` (block threads, smem bytes of dynamic shared memory, already opted
// in) are resident at once when it is launched in clusters of `cluster` CTAs:
// cudaOccupancyMaxActiveClusters x cluster (clusters live inside one GPC, so this can be fewer
// than CTAs per SM x SMs). 0 when the device cannot run that cluster size (the query's error
// is cleared, not raised). Host query, no stream work; call it through config_once_per_device.
template <typename Kernel>
int cluster_resident_ctas(Kernel kernel, int block, size_t smem, int cluster) {
  LaunchOpts opts;
  opts.cluster = cluster;
  cudaLaunchAttribute attrs[2];
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(cluster), 1, 1);
  cfg.blockDim = dim3(static_cast<unsigned>(block), 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = attrs;
  cfg.numAttrs = launch_attrs(attrs, opts);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return clusters * cluster;
}

constexpr int kMaxCachedDevices = 64;

// make(device) once per device for each instantiation of the caller (every distinct Make type,
// e.g. each lambda, has its own cache), under a lock; devices past kMaxCachedDevices are
// configured on every call. Host-side attribute / occupancy calls only: no stream work.
template <typename Make>
auto config_once_per_device(int device, Make make) {
  using Config = std::invoke_result_t<Make, int>;
  static std::mutex mu;
  static Config cache[kMaxCachedDevices];
  static bool ready[kMaxCachedDevices] = {};
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  std::lock_guard<std::mutex> lock(mu);
  if (cacheable && ready[device]) return cache[device];
  const Config c = make(device);
  if (cacheable) {
    cache[device] = c;
    ready[device] = true;
  }
  return c;
}

// The largest power-of-two cluster size <= max_cluster that `kernel` can run with on `device`
// (block threads, smem bytes of dynamic shared memory per CTA); 0 when there is none: a device
// or a binary older than sm_90, or no cluster of 2 fits. Opts `kernel` and its other variants
// `more` (e.g. the unvectorised instantiation) into non-portable cluster sizes and `smem` bytes
// of dynamic shared memory. Call it through config_once_per_device.
template <typename Kernel, typename... More>
int pow2_cluster_size(int device, int block, size_t smem, int max_cluster, Kernel kernel,
                      More... more) {
  int major = 0;
  ADAKV_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  cudaFuncAttributes fa{};
  ADAKV_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
  if (major < 9 || fa.binaryVersion < 90) return 0;
  const auto opt_in = [&](auto k) {
    ADAKV_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    set_smem(k, smem);
  };
  opt_in(kernel);
  (opt_in(more), ...);
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(max_cluster), 1, 1);
  cfg.blockDim = dim3(static_cast<unsigned>(block), 1, 1);
  cfg.dynamicSmemBytes = smem;
  int max_size = 0;
  ADAKV_CUDA_CHECK(cudaOccupancyMaxPotentialClusterSize(&max_size, kernel, &cfg));
  int size = 1;
  while (size * 2 <= std::min(max_size, max_cluster)) size *= 2;
  return size < 2 ? 0 : size;
}

}  // namespace cuda
}  // namespace adakv
