"""Fake (meta) kernels of every adakv op, so the ops trace under torch.compile.

Output shapes follow docs/semantics.md. Sizes that depend on data (compact without ``rows``,
evict with ``rounding="official"``) become unbacked symbolic sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _flat_rows(n_rows_hint):
    ctx = torch.library.get_ctx()
    return ctx.new_dynamic_size() if n_rows_hint is None else n_rows_hint


@torch.library.register_fake("adakv::score")
def _score_fake(q_window, key, kernel_size=7, pooling="max", aggregate="mean",
                gqa_reduce="mean", key_start=None, scale=None):
    torch._check(q_window.dim() == 4 and key.dim() == 4, lambda: "adakv: q_window and key must be 4-D")
    B, Hk, N, _ = key.shape
    W = q_window.shape[2]
    return q_window.new_empty((B, Hk, N - W), dtype=torch.float32)


@torch.library.register_fake("adakv::allocate")
def _allocate_fake(scores, budget, floor_alpha=0.2, adaptive=True, rounding="exact", key_start=None):
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
    B, Hk = key.shape[:2]
    return _flat_cache(key, _flat_rows(rows), B * Hk)


@torch.library.register_fake("adakv::evict")
def _evict_fake(q_window, key, value, budget, floor_alpha=0.2, pooling="max", kernel_size=7,
                gqa_reduce="mean", adaptive=True, rounding="exact", reserve=0, key_start=None,
                aggregate="mean", scale=None):
    B, Hk = key.shape[:2]
    W = q_window.shape[2]
    rows = B * Hk * (budget + W + reserve) if rounding == "exact" else None
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
