"""Fake (meta) kernels of every adakv op, so the ops trace under torch.compile.

Output shapes follow docs/semantics.md. Sizes that depend on data (compact without ``rows``,
evict with ``rounding="official"``) become unbacked symbolic sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT32_MAX = 2**31 - 1


def _check(cond, msg) -> None:
    """``torch._check`` with an ``adakv:`` message (RuntimeError, like the C++ checks); works on
    plain Python bools and on symbolic sizes (a guard) alike."""
    torch._check(cond, lambda: msg if isinstance(msg, str) else msg())


def _check_reserve(reserve) -> None:
    _check(0 <= reserve <= INT32_MAX, lambda: f"adakv: reserve must be in [0, 2^31 - 1], got {reserve}")


def _check_budget(budget) -> None:
    _check(budget >= 0, lambda: f"adakv: budget must be >= 0, got {budget}")


def _flat_cache_rows(B, Hk, budget, window, reserve):
    """B * Hk * (budget + window + reserve), checked like csrc/checks.cpp flat_cache_rows:
    reserve in [0, 2^31 - 1], budget >= 0, rows <= 2^31 - 1 (never a wrapped size; Python ints
    cannot wrap, and the bound is checked before the size is used)."""
    _check_reserve(reserve)
    _check_budget(budget)
    rows = B * Hk * (budget + window + reserve)
    _check(rows <= INT32_MAX, lambda: (
        f"adakv: the flat cache would hold B * Hk * (budget + window + reserve) = {B} * {Hk} * "
        f"({budget} + {window} + {reserve}) = {rows} rows; at most 2^31 - 1 are supported "
        f"(lower budget or reserve)"))
    return rows


def _flat_rows(n_rows_hint):
    ctx = torch.library.get_ctx()
    return ctx.new_dynamic_size() if n_rows_hint is None else n_rows_hint


def _window_shape(q_window, key, kernel_size):
    """The checks of validate_score that need no data (score, defensive_score): (B, Hk, N, W)."""
    torch._check(q_window.dim() == 4 and key.dim() == 4, lambda: "adakv: q_window and key must be 4-D")
    B, Hk, N, _ = key.shape
    W = q_window.shape[2]
    _check(W >= 1, lambda: f"adakv: the observation window must hold at least one query, got W = {W}")
    _check(W <= N, lambda: f"adakv: window W = {W} is longer than the prompt N = {N}")
    _check(kernel_size >= 1 and kernel_size % 2 == 1,
           lambda: f"adakv: kernel_size must be odd and >= 1, got {kernel_size}")
    return B, Hk, N, W


@torch.library.register_fake("adakv::score")
def _score_fake(q_window, key, kernel_size=7, pooling="max", aggregate="mean",
                gqa_reduce="mean", key_start=None, scale=None):
    B, Hk, N, W = _window_shape(q_window, key, kernel_size)
    return q_window.new_empty((B, Hk, N - W), dtype=torch.float32)


@torch.library.register_fake("adakv::allocate")
def _allocate_fake(scores, budget, floor_alpha=0.2, adaptive=True, rounding="exact", key_start=None):
    _check_budget(budget)
    _check(0.0 <= floor_alpha <= 1.0, lambda: f"adakv: floor_alpha must be in [0, 1], got {floor_alpha}")
    return scores.new_empty(scores.shape[:2], dtype=torch.int32)


@torch.library.register_fake("adakv::select")
def _select_fake(scores, budgets, key_start=None):
    return (scores.new_empty(scores.shape, dtype=torch.int32),
            scores.new_empty(scores.shape[:2], dtype=torch.int32))


def _flat_cache(key: Tensor, rows, n_segments):
    D = key.shape[-1]
    return (key.new_empty((rows, D)), key.new_empty((rows, D)),
            key.new_empty((n_segments,), dtype=torch.int32),
            key.new_empty((n_segments,), dtype=torch.int32))


@torch.library.register_fake("adakv::compact")
def _compact_fake(key, value, kept_idx, kept_count, budgets, window, reserve=0, rows=None,
                  key_start=None):
    B, Hk, N = key.shape[:3]
    _check(0 <= window <= N, lambda: f"adakv: window must be in [0, N = {N}], got {window}")
    _check_reserve(reserve)
    if rows is not None:
        _check(0 <= rows <= INT32_MAX, lambda: f"adakv: rows must be in [0, 2^31), got {rows}")
    return _flat_cache(key, _flat_rows(rows), B * Hk)


@torch.library.register_fake("adakv::evict")
def _evict_fake(q_window, key, value, budget, floor_alpha=0.2, pooling="max", kernel_size=7,
                gqa_reduce="mean", adaptive=True, rounding="exact", reserve=0, key_start=None,
                aggregate="mean", scale=None):
    B, Hk = key.shape[:2]
    W = q_window.shape[2]
    N = key.shape[2]
    _check(W >= 1, lambda: f"adakv: the observation window must hold at least one query, got W = {W}")
    _check(W <= N, lambda: f"adakv: window W = {W} is longer than the prompt N = {N}")
    _check(kernel_size >= 1 and kernel_size % 2 == 1,
           lambda: f"adakv: kernel_size must be odd and >= 1, got {kernel_size}")
    _check(0.0 <= floor_alpha <= 1.0, lambda: f"adakv: floor_alpha must be in [0, 1], got {floor_alpha}")
    if rounding == "exact":
        rows = _flat_cache_rows(B, Hk, budget, W, reserve)
    else:
        _check_budget(budget)
        _check_reserve(reserve)
        rows = None
    return _flat_cache(key, _flat_rows(rows), B * Hk)


@torch.library.register_fake("adakv::append_")
def _append_fake(k_flat, v_flat, seg_start, seg_len, key_new, value_new, overflow=None):
    return None


@torch.library.register_fake("adakv::decode_attention")
def _decode_fake(query, k_flat, v_flat, seg_start, seg_len, scale=None):
    return torch.empty_like(query)


@torch.library.register_fake("adakv::decode_attention_lse")
def _decode_lse_fake(query, k_flat, v_flat, seg_start, seg_len, scale=None):
    return torch.empty_like(query), query.new_empty(query.shape[:3], dtype=torch.float32)


@torch.library.register_fake("adakv::paged_compact_")
def _paged_compact_fake(k_pages, v_pages, page_table, seg_len, key, value, kept_idx, kept_count,
                        window, key_start=None):
    N = key.shape[2]
    _check(0 <= window <= N, lambda: f"adakv: window must be in [0, N = {N}], got {window}")
    return None


@torch.library.register_fake("adakv::paged_append_")
def _paged_append_fake(k_pages, v_pages, page_table, seg_len, key_new, value_new, overflow=None,
                       segment_index=None):
    return None


@torch.library.register_fake("adakv::paged_append_rotary_")
def _paged_append_rotary_fake(k_pages, v_pages, page_table, seg_len, query, key_new, value_new,
                              cos, sin, overflow=None, segment_index=None):
    return query.new_empty(query.shape)      # contiguous, whatever query's strides


@torch.library.register_fake("adakv::paged_decode_attention")
def _paged_decode_fake(query, k_pages, v_pages, page_table, seg_len, scale=None,
                       segment_index=None):
    return torch.empty_like(query)


@torch.library.register_fake("adakv::paged_decode_attention_lse")
def _paged_decode_lse_fake(query, k_pages, v_pages, page_table, seg_len, scale=None,
                           segment_index=None):
    return torch.empty_like(query), query.new_empty(query.shape[:3], dtype=torch.float32)


@torch.library.register_fake("adakv::defensive_score")
def _defensive_score_fake(q_window, key, kernel_size=5, key_start=None, scale=None):
    B, Hk, N, W = _window_shape(q_window, key, kernel_size)
    scores = q_window.new_empty((B, Hk, N - W), dtype=torch.float32)
    return scores, torch.empty_like(scores), q_window.new_empty((B, 2), dtype=torch.float32)


@torch.library.register_fake("adakv::value_norm")
def _value_norm_fake(value, o_proj_weight, normalize=False, length=None):
    _check(value.dim() == 4, lambda: f"adakv: value [B, Hk, N, D] must have 4 dimensions, got "
                                     f"shape {list(value.shape)}")
    _check(o_proj_weight.dim() == 2, lambda: f"adakv: o_proj_weight [hidden, Hq * D] must have 2 "
                                             f"dimensions, got shape {list(o_proj_weight.shape)}")
    B, Hk, N, D = value.shape
    _check(Hk >= 1, lambda: f"adakv: value must have at least one KV head (Hk >= 1), got shape "
                            f"{list(value.shape)}")
    _check(D >= 1, lambda: f"adakv: value must have a head dim D >= 1, got shape {list(value.shape)}")
    width = o_proj_weight.shape[1]
    _check(width % D == 0 and width // D >= 1 and (width // D) % Hk == 0, lambda: (
        f"adakv: o_proj_weight must be [hidden, Hq * D] with D = {D} (value's head dim) and Hq a "
        f"positive multiple of Hk = {Hk}, got shape {list(o_proj_weight.shape)}"))
    n = N if length is None else length
    _check(0 <= n <= N, lambda: f"adakv: length must be in [0, N = {N}], got {n}")
    return value.new_empty((B, Hk, n), dtype=torch.float32)


@torch.library.register_fake("adakv::decode_gemm")
def _decode_gemm_fake(x, weight, bias=None, split=0):
    _check(x.dim() == 2, lambda: f"adakv: x [M, K] must have 2 dimensions, got shape {list(x.shape)}")
    _check(weight.dim() == 2, lambda: f"adakv: weight [N, K] must have 2 dimensions, got shape "
                                      f"{list(weight.shape)}")
    _check(x.dtype == weight.dtype, lambda: f"adakv: weight has dtype {weight.dtype} but x has "
                                            f"dtype {x.dtype}")
    M, K = x.shape
    N = weight.shape[0]
    _check(weight.shape[1] == K, lambda: f"adakv: weight must be [N, K] with K = {K} "
                                         f"(x.size(1)), got shape {list(weight.shape)}")
    _check(M <= 256, lambda: f"adakv: decode_gemm takes at most 256 rows of x (a decode step), "
                             f"got x of shape {list(x.shape)}")
    if bias is not None:
        _check(bias.dim() == 1 and bias.shape[0] == N,
               lambda: f"adakv: bias must have shape [N] = [{N}], got {list(bias.shape)}")
    _check(0 <= split <= 8, lambda: f"adakv: split must be in [0, 8] (0: chosen by shape), got {split}")
    return x.new_empty((M, N))
