// Every op schema of torch.ops.adakv, next to the kernels that implement it.
//
//   op                    CPU                    CUDA                    fake (meta)
//   score                 cpu/score.cpp          cuda/score.cu           python/adakv_ops/_fake.py
//   allocate              cpu/topk.cpp           cuda/allocate.cu        "
//   select                cpu/topk.cpp           cuda/select.cu          "
//   compact, append_      cpu/cache.cpp          cuda/cache.cu           "
//   decode_attention(_lse) cpu/decode_attention.cpp cuda/decode_attention.cu "
//   evict                 evict.cpp (the four stages above, per backend)
//   paged_*               cpu/paged.cpp          cuda/paged.cu (+ the decode kernel family)
//                         (paged_append_rotary_: the RoPE formula of both in rotary.h)
//   defensive_score       cpu/followups.cpp      cuda/score.cu           "
//   value_norm            cpu/followups.cpp      cuda/value_norm.cu      "
//   decode_gemm           cpu/gemm.cpp           cuda/decode_gemm.cu     "
//   (the last two: building blocks of SPEC 7.1 / 7.2; python/adakv_ops/_composite.py holds
//   torch-op versions, registered for CUDA only when _C_cuda is not loaded)
//
// Everything goes through PyTorch's stable ABI (csrc/torch_api.h), so one binary serves every
// torch from 2.11 on. The file is compiled into both libraries: _C (schemas, CPU kernels) and,
// with ADAKV_CUDA_LIBRARY, _C_cuda (the CUDA kernels, loaded only on a CUDA build of torch).
// Semantics of every argument: docs/semantics.md.

#include "ops.h"

#ifndef ADAKV_CUDA_LIBRARY
STABLE_TORCH_LIBRARY(adakv, m) {
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
  // Paged per-head storage (SPEC 3.1): k_pages / v_pages [num_pages, P, D]; segment s owns the
  // pages page_table[s, 0..], its token i lives at page page_table[s, i / P], slot i % P.
  // segment_index [B * Hk] int32 (append, decode): batch segment i uses table row
  // segment_index[i] (-1: padding) instead of row i; the tables may then have any row count.
  m.def(
      "paged_compact_(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor page_table, "
      "Tensor(c!) seg_len, Tensor key, Tensor value, Tensor kept_idx, Tensor kept_count, "
      "int window, Tensor? key_start=None) -> ()");
  m.def(
      "paged_append_(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor page_table, "
      "Tensor(c!) seg_len, Tensor key_new, Tensor value_new, Tensor(d!)? overflow=None, "
      "Tensor? segment_index=None) -> ()");
  // paged_append_ of key_new rotated by RoPE (rotate_half convention, csrc/rotary.h), in the
  // same kernel that rotates the query: returns the rotated query [B, Hq, T, D] (contiguous).
  // query / key_new / value_new / cos / sin may be strided views (last stride 1).
  m.def(
      "paged_append_rotary_(Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor page_table, "
      "Tensor(c!) seg_len, Tensor query, Tensor key_new, Tensor value_new, Tensor cos, "
      "Tensor sin, Tensor(d!)? overflow=None, Tensor? segment_index=None) -> Tensor");
  m.def(
      "paged_decode_attention(Tensor query, Tensor k_pages, Tensor v_pages, Tensor page_table, "
      "Tensor seg_len, float? scale=None, Tensor? segment_index=None) -> Tensor");
  m.def(
      "paged_decode_attention_lse(Tensor query, Tensor k_pages, Tensor v_pages, "
      "Tensor page_table, Tensor seg_len, float? scale=None, Tensor? segment_index=None) "
      "-> (Tensor, Tensor)");
  // The authors' follow-up methods (SPEC 7.1, 7.2): DefensiveKV steps 1-3 plus the SnapKV mean
  // and the window masses of step 5 -> (scores, snap_mean, window_mass); the CriticalKV value
  // norm (DefensiveKV step 4).
  m.def(
      "defensive_score(Tensor q_window, Tensor key, int kernel_size=5, Tensor? key_start=None, "
      "float? scale=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "value_norm(Tensor value, Tensor o_proj_weight, bool normalize=False, int? length=None) "
      "-> Tensor");
  // The GEMM of a decode step's projections (at most 256 rows of x): y = x weight^T + bias.
  m.def("decode_gemm(Tensor x, Tensor weight, Tensor? bias=None, int split=0) -> Tensor");
}

#define ADAKV_BACKEND_KEY CPU
#define ADAKV_BACKEND cpu
#else
#define ADAKV_BACKEND_KEY CUDA
#define ADAKV_BACKEND cuda
#endif

// Fake (meta) kernels of every op: python/adakv_ops/_fake.py.
STABLE_TORCH_LIBRARY_IMPL(adakv, ADAKV_BACKEND_KEY, m) {
  m.impl("score", TORCH_BOX(&adakv::ADAKV_BACKEND::score));
  m.impl("allocate", TORCH_BOX(&adakv::ADAKV_BACKEND::allocate));
  m.impl("select", TORCH_BOX(&adakv::ADAKV_BACKEND::select));
  m.impl("compact", TORCH_BOX(&adakv::ADAKV_BACKEND::compact));
  m.impl("evict", TORCH_BOX(&adakv::ADAKV_BACKEND::evict));
  m.impl("append_", TORCH_BOX(&adakv::ADAKV_BACKEND::append_));
  m.impl("decode_attention", TORCH_BOX(&adakv::ADAKV_BACKEND::decode_attention));
  m.impl("decode_attention_lse", TORCH_BOX(&adakv::ADAKV_BACKEND::decode_attention_lse));
  m.impl("paged_compact_", TORCH_BOX(&adakv::ADAKV_BACKEND::paged_compact_));
  m.impl("paged_append_", TORCH_BOX(&adakv::ADAKV_BACKEND::paged_append_));
  m.impl("paged_append_rotary_", TORCH_BOX(&adakv::ADAKV_BACKEND::paged_append_rotary_));
  m.impl("paged_decode_attention", TORCH_BOX(&adakv::ADAKV_BACKEND::paged_decode_attention));
  m.impl("paged_decode_attention_lse",
         TORCH_BOX(&adakv::ADAKV_BACKEND::paged_decode_attention_lse));
  m.impl("defensive_score", TORCH_BOX(&adakv::ADAKV_BACKEND::defensive_score));
  m.impl("value_norm", TORCH_BOX(&adakv::ADAKV_BACKEND::value_norm));
  m.impl("decode_gemm", TORCH_BOX(&adakv::ADAKV_BACKEND::decode_gemm));
}
