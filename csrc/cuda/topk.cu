// CUDA kernels of the topk family: placeholder until the CUDA kernels land.
#include "ops.h"

#include <c10/util/Exception.h>

namespace adakv {
namespace cuda {

at::Tensor allocate(const at::Tensor&, int64_t, double, bool, c10::string_view, const OptTensor&) {
  TORCH_CHECK(false, "adakv::allocate is not implemented for CUDA yet");
}
std::tuple<at::Tensor, at::Tensor> select(const at::Tensor&, const at::Tensor&, const OptTensor&) {
  TORCH_CHECK(false, "adakv::select is not implemented for CUDA yet");
}

}  // namespace cuda
}  // namespace adakv
