"""Typed Python wrappers of ``torch.ops.adakv``.

Each wrapper calls the registered op (so it works in eager mode, under ``torch.compile`` and
in CUDA graphs) and documents shapes and dtypes. The exact semantics of every argument are in
``docs/semantics.md``; the op schemas are in ``csrc/bindings.cpp``.

Shapes: batch ``B``, query heads ``Hq``, KV heads ``Hk`` (``Hq % Hk == 0``, query head ``j``
reads KV head ``j // (Hq // Hk)``), window ``W``, prompt ``N``, prefix ``L = N - W``, head dim
``D``, segments ``S = B * Hk`` (segment ``s = b * Hk + h``).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

FlatCache = Tuple[Tensor, Tensor, Tensor, Tensor]

# What the C++ checks accept for each integer argument (the message of an int64-overflowing
# Python int, which the op schema cannot even convert, quotes the same range).
_INT_RANGES = {
    "budget": "[0, 2^31 - 1] (and budget * Hk <= 2^31 - 1)",
    "reserve": "[0, 2^31 - 1]",
    "rows": "[0, 2^31)",
    "window": "[0, N]",
    "kernel_size": "odd values >= 1",
    "length": "[0, N]",
}


def _check_ints(**args) -> None:
    """Validation only: a Python int outside int64 would fail in the schema with a message
    that names no range ("Expected a value of type 'int' ... found type 'int'"); raise the
    ``adakv:`` RuntimeError the C++ checks give for an out-of-range value instead."""
    for name, v in args.items():
        if isinstance(v, int) and not -(2**63) <= v < 2**63:
            raise RuntimeError(f"adakv: {name} must be in {_INT_RANGES[name]}, got {v} "
                               f"(outside int64)")


def score(q_window: Tensor, key: Tensor, kernel_size: int = 7, pooling: str = "max",
          aggregate: str = "mean", gqa_reduce: str = "mean",
          key_start: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """SnapKV observation-window scores.

    Args:
        q_window: ``[B, Hq, W, D]`` the last ``W`` queries (after RoPE); fp32/fp16/bf16.
        key: ``[B, Hk, N, D]`` keys (after RoPE), same dtype.
        kernel_size: odd pooling width; pooling: ``"max"``, ``"avg"`` or ``"none"``.
        aggregate: over window queries, ``"mean"`` or ``"max"``.
        gqa_reduce: over the query heads of a KV group, ``"mean"`` or ``"max"``.
        key_start: ``[B]`` int32 first non-padding position per row (left padding).
        scale: logit scale, default ``1 / sqrt(D)``.

    Returns:
        ``[B, Hk, L]`` float32 scores; padding columns are ``-inf``.
    """
    _check_ints(kernel_size=kernel_size)
    return torch.ops.adakv.score(q_window, key, kernel_size, pooling, aggregate, gqa_reduce,
                                 key_start, scale)


def defensive_score(q_window: Tensor, key: Tensor, kernel_size: int = 5,
                    key_start: Optional[Tensor] = None,
                    scale: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """DefensiveKV scores before the value weight (SPEC 7.2 steps 1-3), with the plain SnapKV
    mean and the window masses that its stage-1 floor (step 5) needs.

    On CUDA the native kernel (the score kernel family, ``csrc/cuda/score.cu``) pools with a
    radius ``min(kernel_size // 2, N - W - 1)`` of at most 16, or one covering the whole prefix;
    this wrapper runs other CUDA calls (``kernel_size > 33`` on a longer prefix) through the
    torch-op version ``adakv_ops._composite.defensive_score`` (same semantics).

    Args:
        q_window: ``[B, Hq, W, D]`` the last ``W`` queries (after RoPE); fp32/fp16/bf16.
        key: ``[B, Hk, N, D]`` keys (after RoPE), same dtype.
        kernel_size: odd ``avg_pool1d`` width (``count_include_pad``), default 5 (the authors').
        key_start: ``[B]`` int32 first non-padding position per row (left padding).
        scale: logit scale, default ``1 / sqrt(D)``.

    Returns:
        ``(scores, snap_mean, window_mass)``: ``scores [B, Hk, L]`` float32, per window query
        the prefix row pooled over the row's valid prefix and rescaled to its prefix mass, the
        max over the group's query heads and the window, then ``max(R, mean R)``;
        ``snap_mean [B, Hk, L]`` float32, the unpooled mean over the group and the window
        (equal to :func:`score` with ``pooling="none"``, mean/mean); padding columns of both
        ``-inf``, and a row with no valid prefix token all ``-inf``. ``window_mass [B, 2]``
        float32: per row the mean over its ``Hq * W`` window queries of the mass on the window
        columns ``[L, N)`` (``[:, 0]``, the intended ``window_bias``) and on the last ``W``
        prefix columns (``[:, 1]``, the authors' slip; average it over rows to reproduce
        them); 0 for a row with no valid prefix. The value weight (:func:`value_norm` with
        ``normalize=True, length=L``) and the stage-1 floor are the caller's.
    """
    _check_ints(kernel_size=kernel_size)
    if q_window.is_cuda and not _native_defensive_radius(q_window, key, kernel_size):
        from . import _composite
        return _composite.defensive_score(q_window, key, kernel_size, key_start, scale)
    return torch.ops.adakv.defensive_score(q_window, key, kernel_size, key_start, scale)


# The largest pooling radius the CUDA defensive_score kernels carry as a halo per key tile
# (csrc/cuda/score_kernel.cuh, kMaxDefRadius).
_CUDA_MAX_DEFENSIVE_RADIUS = 16


def _native_defensive_radius(q_window: Tensor, key: Tensor, kernel_size: int) -> bool:
    """Whether the CUDA kernel of ``defensive_score`` takes this pooling (shapes only; a
    malformed call goes to the op, whose checks give the error)."""
    if q_window.dim() != 4 or key.dim() != 4 or not isinstance(kernel_size, int) or \
            kernel_size < 1:
        return True
    L = key.shape[2] - q_window.shape[2]
    if L <= 0:
        return True
    r = min(kernel_size // 2, L - 1)
    return r == L - 1 or r <= _CUDA_MAX_DEFENSIVE_RADIUS


def value_norm(value: Tensor, o_proj_weight: Tensor, normalize: bool = False,
               length: Optional[int] = None) -> Tensor:
    """CriticalKV value norm (SPEC 7.1; DefensiveKV step 4). On CUDA a tensor-core GEMM with an
    L1 epilogue (``csrc/cuda/value_norm.cu``; fp16/bf16, head dim 64/128/256) that never writes
    the ``[length, hidden]`` products; fp32 and other head dims on a CUDA-core path.

    ``out[b, h, i]`` = mean over the group's query heads ``j`` of
    ``|| value[b, h, i] @ W_o[j] ||_1`` with ``W_o = o_proj_weight^T`` viewed as
    ``[Hq, D, hidden]`` (products accumulated in float32).

    Args:
        value: ``[B, Hk, N, D]``; fp32/fp16/bf16.
        o_proj_weight: ``[hidden, Hq * D]`` (the attention output projection's weight), same
            dtype; ``Hq`` must be a positive multiple of ``Hk``.
        normalize: divide each token's norms by their sum over the ``Hk`` KV heads (no epsilon:
            a token whose norm is 0 in every head gives NaN).
        length: only tokens ``[0, length)`` (default ``N``; e.g. ``L`` for the prefix).

    Returns:
        ``[B, Hk, length]`` float32.
    """
    _check_ints(length=length)
    return torch.ops.adakv.value_norm(value, o_proj_weight, normalize, length)


def allocate(scores: Tensor, budget: int, floor_alpha: float = 0.2, adaptive: bool = True,
             rounding: str = "exact", key_start: Optional[Tensor] = None) -> Tensor:
    """Ada-KV per-head budgets ``[B, Hk]`` int32 from ``scores [B, Hk, L]`` float32.

    ``budget`` is the average per-head budget ``C`` (window not counted). With
    ``rounding="exact"`` every evicted row's budgets sum to ``Hk * C``; ``"official"``
    reproduces the official code's per-head rounding. ``adaptive=False`` gives ``C`` for
    every head (SnapKV). Rows with no more than ``C`` valid prefix tokens are not evicted and
    get ``C`` per head.
    """
    _check_ints(budget=budget)
    return torch.ops.adakv.allocate(scores, budget, floor_alpha, adaptive, rounding, key_start)


def select(scores: Tensor, budgets: Tensor,
           key_start: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Segmented top-k: per (b, h) the top ``min(budgets[b, h], valid)`` prefix tokens.

    Returns ``kept_idx [B, Hk, L]`` int32 (kept token indices ascending, then ``-1``) and
    ``kept_count [B, Hk]`` int32. Ties go to the lower token index.
    """
    return torch.ops.adakv.select(scores, budgets, key_start)


def compact(key: Tensor, value: Tensor, kept_idx: Tensor, kept_count: Tensor, budgets: Tensor,
            window: int, reserve: int = 0, rows: Optional[int] = None,
            key_start: Optional[Tensor] = None) -> FlatCache:
    """Gather kept prefix tokens and the window into the head-flattened cache.

    Segment ``s`` gets capacity ``budgets[s] + window + reserve``. ``rows`` fixes the total
    number of rows (static shape; default: the sum of capacities, which needs a host sync on
    CUDA). Returns ``(k_flat [rows, D], v_flat [rows, D], seg_start [S], seg_len [S])``.
    """
    _check_ints(window=window, reserve=reserve, rows=rows)
    return torch.ops.adakv.compact(key, value, kept_idx, kept_count, budgets, window, reserve,
                                   rows, key_start)


def evict(q_window: Tensor, key: Tensor, value: Tensor, budget: int, floor_alpha: float = 0.2,
          pooling: str = "max", kernel_size: int = 7, gqa_reduce: str = "mean",
          adaptive: bool = True, rounding: str = "exact", reserve: int = 0,
          key_start: Optional[Tensor] = None, aggregate: str = "mean",
          scale: Optional[float] = None) -> FlatCache:
    """Score, allocate, select and compact in one call: the main entry point.

    Args:
        q_window: ``[B, Hq, W, D]``; key, value: ``[B, Hk, N, D]`` (same dtype, after RoPE).
        budget: average kept prefix tokens per KV head ``C``.
        floor_alpha: Ada-KV safeguard fraction (``0.2`` with GQA, ``0.5`` without).
        adaptive: ``False`` gives uniform SnapKV budgets.
        rounding: ``"exact"`` (static output size) or ``"official"``.
        reserve: extra rows per segment for in-place decode appends.
        key_start: ``[B]`` int32 left-padding offsets.

    Returns:
        ``(k_flat, v_flat, seg_start, seg_len)``; with exact rounding
        ``k_flat.shape[0] == B * Hk * (budget + W + reserve)``.
    """
    _check_ints(budget=budget, kernel_size=kernel_size, reserve=reserve)
    return torch.ops.adakv.evict(q_window, key, value, budget, floor_alpha, pooling,
                                 kernel_size, gqa_reduce, adaptive, rounding, reserve,
                                 key_start, aggregate, scale)


def append_(k_flat: Tensor, v_flat: Tensor, seg_start: Tensor, seg_len: Tensor,
            key_new: Tensor, value_new: Tensor, overflow: Optional[Tensor] = None) -> None:
    """Append ``key_new``/``value_new [B, Hk, T, D]`` to every segment, in place.

    Mutates ``k_flat``, ``v_flat``, ``seg_len`` (and ``overflow``). On CPU an append past a
    segment's capacity raises before anything is written; on CUDA that segment is left
    unchanged and ``overflow[s]`` is set to 1. With the environment variable ``ADAKV_DEBUG=1``
    the CUDA overflow flags are checked after every call (a host sync).
    """
    _append_with_flags(torch.ops.adakv.append_,
                       (k_flat, v_flat, seg_start, seg_len, key_new, value_new), seg_len,
                       overflow, k_flat.is_cuda, "append_ overflowed the capacity of segments")


# The CUDA overflow flag of a segment whose segment_index value lies outside [-1, page_table
# rows) (csrc/cuda/paged.cu); 1 flags a segment the capacity / page table cannot hold.
_OVERFLOW_SEGMENT_INDEX = 2


def _append_with_flags(op, args, seg_len: Tensor, overflow: Optional[Tensor], is_cuda: bool,
                       what: str, segment_index: Optional[Tensor] = None):
    """``op(*args, overflow[, segment_index])``, returning what the op returns; with
    ``ADAKV_DEBUG=1`` on CUDA and no ``overflow`` given, the op gets a flag tensor (one per
    batch segment: per ``seg_len`` row, or per ``segment_index`` entry) that is checked after
    the call (a host sync): a segment whose ``segment_index`` value was out of range raises
    ``adakv: ... segment_index ...``, any other flagged segment ``adakv: <what> [segments]``.
    Shared by ``append_``, ``paged_append_`` and ``paged_append_rotary_``."""
    tail = () if segment_index is None else (segment_index,)
    if overflow is None and is_cuda and os.environ.get("ADAKV_DEBUG") == "1":
        segments = seg_len if segment_index is None else segment_index
        flags = torch.zeros_like(segments, dtype=torch.int32)
        result = op(*args, flags, *tail)
        bad_index = torch.nonzero(flags == _OVERFLOW_SEGMENT_INDEX).flatten().tolist()
        if bad_index:
            rows = args[2].shape[0]  # page_table
            raise RuntimeError(
                f"adakv: {op.__name__}: segment_index values outside [-1, {rows}) (the rows of "
                f"page_table) at batch segments {bad_index}: "
                f"{segment_index[bad_index].tolist()}; nothing written for them")
        bad = torch.nonzero(flags).flatten().tolist()
        if bad:
            raise RuntimeError(f"adakv: {what} {bad}")
        return result
    return op(*args, overflow, *tail)


def decode_attention(query: Tensor, k_flat: Tensor, v_flat: Tensor, seg_start: Tensor,
                     seg_len: Tensor, scale: Optional[float] = None,
                     return_lse: bool = False):
    """Attention of ``query [B, Hq, T, D]`` over the flat cache (GQA-aware).

    The ``T`` query tokens are the segment's ``T`` newest tokens (already appended) and
    attend causally among themselves. Returns ``out [B, Hq, T, D]`` (query dtype), and with
    ``return_lse=True`` also ``lse [B, Hq, T]`` float32 (natural log; ``-inf`` for an empty
    segment, whose output is 0).
    """
    if return_lse:
        return torch.ops.adakv.decode_attention_lse(query, k_flat, v_flat, seg_start, seg_len,
                                                    scale)
    return torch.ops.adakv.decode_attention(query, k_flat, v_flat, seg_start, seg_len, scale)


# ----------------------------------------------------------------------------------------------
# paged per-head storage (SPEC 3.1, docs/semantics.md "Paged storage")
#
# Pool ``k_pages``/``v_pages [num_pages, P, D]``; segment ``s`` owns the pages
# ``page_table[s, 0..]`` (``[S, max_pages]`` int32) and holds ``seg_len[s]`` tokens (``[S]``
# int32); its token ``i`` is ``k_pages[page_table[s, i // P], i % P]``. Entries past
# ``ceil(seg_len / P)`` are ignored (may hold -1). Freeing pages is host-side (no op).
# ``segment_index [B * Hk]`` int32 (append, decode): batch segment ``i`` uses table row
# ``segment_index[i]`` (``-1``: padding) instead of row ``i``; the tables may then have any
# number of rows (a store's slots, the batch a subset of them plus pad rows).


def paged_compact_(k_pages: Tensor, v_pages: Tensor, page_table: Tensor, seg_len: Tensor,
                   key: Tensor, value: Tensor, kept_idx: Tensor, kept_count: Tensor,
                   window: int, key_start: Optional[Tensor] = None) -> None:
    """Write the eviction result into pages, in place (the paged ``compact``).

    Args:
        k_pages, v_pages: ``[num_pages, P, D]`` pool (dtype of ``key``), mutated.
        page_table: ``[B * Hk, max_pages]`` int32; must list ``ceil(seg_len / P)`` distinct
            in-range pages per segment (no page shared between segments).
        seg_len: ``[B * Hk]`` int32, overwritten with ``kept_count + min(window, N - ks_b)``.
        key, value: ``[B, Hk, N, D]``; kept_idx ``[B, Hk, N - window]`` and kept_count
            ``[B, Hk]`` as :func:`select` returns them; key_start ``[B]`` left padding.

    Segment rows are exactly :func:`compact`'s (kept prefix in ``kept_idx`` order, then the
    window); only rows ``[0, seg_len)`` are written. On CPU bad metadata raises before
    anything is written; CUDA skips rows it cannot place (docs/semantics.md).
    """
    _check_ints(window=window)
    torch.ops.adakv.paged_compact_(k_pages, v_pages, page_table, seg_len, key, value, kept_idx,
                                   kept_count, window, key_start)


def paged_append_(k_pages: Tensor, v_pages: Tensor, page_table: Tensor, seg_len: Tensor,
                  key_new: Tensor, value_new: Tensor, overflow: Optional[Tensor] = None,
                  segment_index: Optional[Tensor] = None) -> None:
    """Append ``key_new``/``value_new [B, Hk, T, D]`` to every paged segment, in place.

    Token ``t`` of segment ``s`` goes to row ``seg_len[s] + t``; then ``seg_len[s] += T``. The
    caller must have given each segment enough pages first (the host knows ``T``). On CPU a
    segment whose table is too short (or points outside the pool) raises before anything is
    written; on CUDA that segment is left unchanged and ``overflow[s]`` (``[B * Hk]`` int32)
    is set to 1. With ``ADAKV_DEBUG=1`` the CUDA overflow flags are checked after every call
    (a sync).

    ``segment_index`` (``[B * Hk]`` int32, on the tables' device): batch segment ``i`` appends
    to table row ``r = segment_index[i]`` (``page_table[r]``, ``seg_len[r] += T``) of tables
    with any number of rows; ``r == -1`` is a padding segment (nothing written, no length
    changed), and the rows of one call must be distinct. Rows no entry names are untouched.
    The CPU raises for a value outside ``[-1, rows)`` or a repeated row (before writing); CUDA
    treats an out-of-range value as padding and sets ``overflow[i] = 2`` (a repeated row is
    the caller's error there: in bounds, result unspecified). ``overflow`` stays indexed by
    batch segment.
    """
    _append_with_flags(torch.ops.adakv.paged_append_,
                       (k_pages, v_pages, page_table, seg_len, key_new, value_new), seg_len,
                       overflow, k_pages.is_cuda, "paged_append_ overflowed the page tables of "
                       "segments", segment_index)


def paged_append_rotary_(k_pages: Tensor, v_pages: Tensor, page_table: Tensor, seg_len: Tensor,
                         query: Tensor, key_new: Tensor, value_new: Tensor, cos: Tensor,
                         sin: Tensor, overflow: Optional[Tensor] = None,
                         segment_index: Optional[Tensor] = None) -> Tensor:
    """:func:`paged_append_` of ``key_new`` rotated by RoPE, and ``query`` rotated: the
    decode step's rotary embedding, layout copies and append in one kernel. Returns the
    rotated query ``[B, Hq, T, D]`` (contiguous) for :func:`paged_decode_attention`.

    The rotation is transformers' ``apply_rotary_pos_emb`` (``rotate_half``: the halves of a
    head vector rotate against each other; Llama, Mistral, Qwen2, Qwen3) with ``cos``, ``sin``
    ``[B, T, D]`` as the model's rotary embedding returns them (``[1, T, D]``: one row for the
    whole batch), computed in float32 and rounded once. ``query [B, Hq, T, D]``, ``key_new``,
    ``value_new [B, Hk, T, D]``, ``cos`` and ``sin`` may be strided views (last stride 1): the
    heads of a fused QKV projection are read in place. ``D`` must be even; ``cos`` / ``sin``
    float32 or the K/V dtype. Every other argument, the overflow flags and the padding rows
    of ``segment_index`` are :func:`paged_append_`'s; the query is rotated for every batch
    row, padding ones included.
    """
    return _append_with_flags(torch.ops.adakv.paged_append_rotary_,
                              (k_pages, v_pages, page_table, seg_len, query, key_new, value_new,
                               cos, sin), seg_len, overflow, k_pages.is_cuda,
                              "paged_append_rotary_ overflowed the page tables of segments",
                              segment_index)


def paged_decode_attention(query: Tensor, k_pages: Tensor, v_pages: Tensor, page_table: Tensor,
                           seg_len: Tensor, scale: Optional[float] = None,
                           return_lse: bool = False, segment_index: Optional[Tensor] = None):
    """:func:`decode_attention` over paged storage (same semantics, same results).

    ``query [B, Hq, T, D]``; ``page_table [S, max_pages]``, ``seg_len [S]`` with
    ``S = B * Hk``. ``seg_len`` may be 0 (an unused slot of a batch bucket: output 0, lse
    ``-inf``). Returns ``out [B, Hq, T, D]`` and with ``return_lse=True`` also
    ``lse [B, Hq, T]`` float32.

    ``segment_index`` (``[B * Hk]`` int32, on the tables' device): batch segment ``i`` (query
    heads of ``b = i // Hk``, KV head ``i % Hk``) reads table row ``segment_index[i]`` of
    tables with any number of rows, so the result equals decoding over
    ``page_table[segment_index]``, ``seg_len[segment_index]``; ``-1`` marks a padding segment
    (output 0, lse ``-inf``). Rows may repeat. The CPU raises for a value outside
    ``[-1, rows)``; CUDA treats it as padding.
    """
    if return_lse:
        return torch.ops.adakv.paged_decode_attention_lse(query, k_pages, v_pages, page_table,
                                                          seg_len, scale, segment_index)
    return torch.ops.adakv.paged_decode_attention(query, k_pages, v_pages, page_table, seg_len,
                                                  scale, segment_index)
