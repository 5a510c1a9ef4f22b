// CUDA kernels of the cache family: placeholder until the CUDA kernels land.
#include "ops.h"

#include <c10/util/Exception.h>

namespace adakv {
namespace cuda {

FlatCache compact(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, int64_t, int64_t, c10::optional<int64_t>, const OptTensor&) {
  TORCH_CHECK(false, "adakv::compact is not implemented for CUDA yet");
}
void append_(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
             const at::Tensor&, const at::Tensor&, const OptTensor&) {
  TORCH_CHECK(false, "adakv::append_ is not implemented for CUDA yet");
}

}  // namespace cuda
}  // namespace adakv
