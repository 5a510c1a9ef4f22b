// Every op schema of torch.ops.adakv, next to the kernels that implement it.
//
//   op                    CPU                    CUDA                    fake (meta)
//   score                 cpu/score.cpp          cuda/score.cu           python/adakv_ops/_fake.py
//   allocate, select      cpu/topk.cpp           cuda/topk.cu            "
//   compact, append_      cpu/cache.cpp          cuda/cache.cu           "
//   decode_attention(_lse) cpu/decode_attention.cpp cuda/decode_attention.cu "
//   evict                 evict.cpp (composite of the four ops above, any device)
//
// Semantics of every argument: docs/semantics.md.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(adakv, m) {
  m.def(
      "score(Tensor q_window, Tensor key, int kernel_size=7, str pooling=\"max\", "
      "str aggregate=\"mean\", str gqa_reduce=\"mean\", Tensor? key_start=None, "
      "float? scale=None) -> Tensor");
  m.def(
      "allocate(Tensor scores, int budget, float floor_alpha=0.2, bool adaptive=True, "
      "str rounding=\"exact\", Tensor? key_start=None) -> Tensor");
  m.def("select(Tensor scores, Tensor budgets, Tensor? key_start=None) -> (Tensor, Tensor)");
  m.def(
      "compact(Tensor key, Tensor value, Tensor kept_idx, Tensor kept_count, Tensor budgets, "
      "int window, int reserve=0, int? rows=None, Tensor? key_start=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "evict(Tensor q_window, Tensor key, Tensor value, int budget, float floor_alpha=0.2, "
      "str pooling=\"max\", int kernel_size=7, str gqa_reduce=\"mean\", bool adaptive=True, "
      "str rounding=\"exact\", int reserve=0, Tensor? key_start=None, "
      "str aggregate=\"mean\", float? scale=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "append_(Tensor(a!) k_flat, Tensor(b!) v_flat, Tensor seg_start, Tensor(c!) seg_len, "
      "Tensor key_new, Tensor value_new, Tensor(d!)? overflow=None) -> ()");
  m.def(
      "decode_attention(Tensor query, Tensor k_flat, Tensor v_flat, Tensor seg_start, "
      "Tensor seg_len, float? scale=None) -> Tensor");
  m.def(
      "decode_attention_lse(Tensor query, Tensor k_flat, Tensor v_flat, Tensor seg_start, "
      "Tensor seg_len, float? scale=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adakv, CPU, m) {
  m.impl("score", &adakv::cpu::score);
  m.impl("allocate", &adakv::cpu::allocate);
  m.impl("select", &adakv::cpu::select);
  m.impl("compact", &adakv::cpu::compact);
  m.impl("append_", &adakv::cpu::append_);
  m.impl("decode_attention", &adakv::cpu::decode_attention);
  m.impl("decode_attention_lse", &adakv::cpu::decode_attention_lse);
}

#ifdef ADAKV_WITH_CUDA
TORCH_LIBRARY_IMPL(adakv, CUDA, m) {
  m.impl("score", &adakv::cuda::score);
  m.impl("allocate", &adakv::cuda::allocate);
  m.impl("select", &adakv::cuda::select);
  m.impl("compact", &adakv::cuda::compact);
  m.impl("append_", &adakv::cuda::append_);
  m.impl("decode_attention", &adakv::cuda::decode_attention);
  m.impl("decode_attention_lse", &adakv::cuda::decode_attention_lse);
}
#endif

// evict has one implementation for every backend: it calls the four stage ops through the
// dispatcher. Its fake kernel (static output size for rounding="exact") is in _fake.py.
TORCH_LIBRARY_IMPL(adakv, CompositeExplicitAutograd, m) {
  m.impl("evict", &adakv::evict);
}
