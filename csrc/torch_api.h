// The one place where adakv meets torch: PyTorch's stable C++ ABI (torch/csrc/stable and
// torch/headeronly) and nothing else, so one binary loads on every torch from
// TORCH_TARGET_VERSION (2.11) on. No ATen or c10 header may be included anywhere in csrc/.
//
// What this header gives the kernels:
//   * Tensor / OptTensor / ScalarType and the dtype constants (kFloat, kHalf, ...);
//   * ADAKV_CHECK(cond, msg...): throws std::runtime_error (RuntimeError in Python) with the
//     message alone (STD_TORCH_CHECK would prepend the C++ function, file and line);
//   * shape_str / device_str for messages;
//   * checked size arithmetic (checked_mul / checked_add) whose overflow names the argument;
//   * new_empty / new_zeros: allocation on a tensor's device (the C shim's empty_strided, one
//     direct call) whose failure names the op, the buffer and its size in bytes (SPEC 9);
//   * typed data pointers ptr<T>(t);
//   * ADAKV_KV_DTYPE_SWITCH: the header-only dtype dispatch over the three K/V dtypes, with the
//     C++ types of each backend (torch::headeronly::Half on the CPU, __half on CUDA).
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace adakv {

using Tensor = torch::stable::Tensor;
using OptTensor = std::optional<Tensor>;
using ScalarType = torch::headeronly::ScalarType;

inline constexpr ScalarType kFloat = ScalarType::Float;
inline constexpr ScalarType kHalf = ScalarType::Half;
inline constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
inline constexpr ScalarType kInt = ScalarType::Int;
inline constexpr ScalarType kLong = ScalarType::Long;

namespace detail {
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw std::runtime_error(os.str());
}
}  // namespace detail

// Every failed check raises RuntimeError with exactly this message (it starts with "adakv:").
#define ADAKV_CHECK(cond, ...)                             \
  do {                                                     \
    if (!(cond)) ::adakv::detail::fail(__VA_ARGS__);       \
  } while (0)

inline std::string shape_str(const Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int64_t i = 0; i < t.dim(); ++i) os << (i ? ", " : "") << t.size(i);
  os << "]";
  return os.str();
}

inline std::string device_str(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device_index());
  return "device type " + std::to_string(static_cast<int>(t.device().type()));
}

inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.is_cpu() == b.is_cpu() && a.is_cuda() == b.is_cuda() &&
         (a.is_cpu() || a.get_device_index() == b.get_device_index());
}

inline size_t dtype_size(ScalarType t) {
  switch (t) {
    case ScalarType::Float: case ScalarType::Int: return 4;
    case ScalarType::Half: case ScalarType::BFloat16: return 2;
    case ScalarType::Long: case ScalarType::Double: return 8;
    default: detail::fail("adakv: internal error: unexpected dtype ", t);
  }
}

// a * b and a + b for non-negative sizes, or a clear error naming `what` (never a wrapped
// integer). `what` reads as the argument or the quantity the user can change.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  ADAKV_CHECK(a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, &r), "adakv: ", what,
              " is too large: ", a, " * ", b, " overflows int64");
  return r;
}
inline int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  ADAKV_CHECK(a >= 0 && b >= 0 && !__builtin_add_overflow(a, b, &r), "adakv: ", what,
              " is too large: ", a, " + ", b, " overflows int64");
  return r;
}

// A new tensor on `like`'s device. The byte count is checked for overflow first, and an
// allocation failure (out of memory) is reported with the op, the buffer and the bytes.
inline Tensor new_tensor(const char* op, const char* what, const Tensor& like,
                         std::initializer_list<int64_t> sizes, ScalarType dtype, bool zero) {
  int64_t bytes = static_cast<int64_t>(dtype_size(dtype));
  for (int64_t s : sizes) {
    ADAKV_CHECK(s >= 0, "adakv: ", op, ": ", what, " would have a negative size ", s);
    ADAKV_CHECK(!__builtin_mul_overflow(bytes, s, &bytes), "adakv: ", op, ": ", what,
                " would need more than 2^63 bytes");
  }
  // The C shim's empty_strided, not torch::stable::new_empty: that one is a boxed dispatcher
  // round trip (torch_call_dispatcher), several microseconds per call on a decode step's
  // latency; this is one direct call into ATen.
  const std::vector<int64_t> shape(sizes);
  std::vector<int64_t> strides(shape.size());
  int64_t stride = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= shape[i] > 1 ? shape[i] : 1;
  }
  int32_t device_type = 0, device_index = 0;
  ADAKV_CHECK(aoti_torch_get_device_type(like.get(), &device_type) == AOTI_TORCH_SUCCESS &&
                  aoti_torch_get_device_index(like.get(), &device_index) == AOTI_TORCH_SUCCESS,
              "adakv: ", op, ": cannot read the device of ", what);
  const int32_t shim_dtype =
      torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
  AtenTensorHandle handle = nullptr;
  if (aoti_torch_empty_strided(static_cast<int64_t>(shape.size()), shape.data(), strides.data(),
                               shim_dtype, device_type, device_index,
                               &handle) != AOTI_TORCH_SUCCESS) {
    detail::fail("adakv: ", op, ": could not allocate ", bytes, " bytes for ", what, " on ",
                 device_str(like), " (out of memory?)");
  }
  Tensor t(handle);
  if (zero) {
    ADAKV_CHECK(aoti_torch_zero_(t.get()) == AOTI_TORCH_SUCCESS, "adakv: ", op,
                ": zero-filling ", what, " failed");
  }
  return t;
}
inline Tensor new_empty(const char* op, const char* what, const Tensor& like,
                        std::initializer_list<int64_t> sizes, ScalarType dtype) {
  return new_tensor(op, what, like, sizes, dtype, /*zero=*/false);
}
inline Tensor new_zeros(const char* op, const char* what, const Tensor& like,
                        std::initializer_list<int64_t> sizes, ScalarType dtype) {
  return new_tensor(op, what, like, sizes, dtype, /*zero=*/true);
}

template <typename T>
inline T* ptr(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}
template <typename T>
inline T* ptr(const OptTensor& t) {
  return t.has_value() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

}  // namespace adakv

// Header-only dtype dispatch over the K/V dtypes: binds NAME to the backend's C++ type for
// SCALAR_TYPE and calls the lambda in __VA_ARGS__.
#define ADAKV_KV_DTYPE_SWITCH(SCALAR_TYPE, HALF_T, BF16_T, NAME, ...)                         \
  [&] {                                                                                        \
    switch (SCALAR_TYPE) {                                                                     \
      case ::adakv::kFloat: { using NAME = float; return __VA_ARGS__(); }                      \
      case ::adakv::kHalf: { using NAME = HALF_T; return __VA_ARGS__(); }                      \
      case ::adakv::kBFloat16: { using NAME = BF16_T; return __VA_ARGS__(); }                  \
      default: ::adakv::detail::fail("adakv: unsupported dtype ", SCALAR_TYPE);              \
    }                                                                                          \
  }()

#define ADAKV_CPU_DTYPE_SWITCH(SCALAR_TYPE, NAME, ...)                                         \
  ADAKV_KV_DTYPE_SWITCH(SCALAR_TYPE, ::torch::headeronly::Half, ::torch::headeronly::BFloat16, \
                        NAME, __VA_ARGS__)
