// CUDA kernels of the score family: placeholder until the CUDA kernels land.
#include "ops.h"
#include "cuda/common.cuh"

#include <c10/util/Exception.h>

namespace adakv {
namespace cuda {

at::Tensor score(const at::Tensor&, const at::Tensor&, int64_t, c10::string_view, c10::string_view,
                 c10::string_view, const OptTensor&, c10::optional<double>) {
  TORCH_CHECK(false, "adakv::score is not implemented for CUDA yet");
}

}  // namespace cuda
}  // namespace adakv
