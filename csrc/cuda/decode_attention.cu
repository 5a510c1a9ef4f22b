// CUDA kernels of the decode_attention family: placeholder until the CUDA kernels land.
#include "ops.h"

#include <c10/util/Exception.h>

namespace adakv {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> decode_attention_lse(const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::optional<double>) {
  TORCH_CHECK(false, "adakv::decode_attention is not implemented for CUDA yet");
}
at::Tensor decode_attention(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, c10::optional<double>) {
  TORCH_CHECK(false, "adakv::decode_attention is not implemented for CUDA yet");
}

}  // namespace cuda
}  // namespace adakv
