"""The eviction policy: which prompt rows each head of a layer keeps (SPEC sections 4 to 6).

One place decides what every method keeps; every eviction site calls it:

* the one-shot prefill of ``adakv_ops.hf`` (flat and paged storage) and ``evict_from``;
* the last chunk of a chunked prefill (``PagedKVStore.finish_prefill``);
* decode-time re-eviction (``max_growth``), where each stored segment is scored on its own.

The policy only *selects*; writing the kept rows is the storage's job (``compact`` into a flat
cache, ``paged_compact_`` into pages). No ``transformers`` dependency.

Methods: ``full`` keeps everything; ``streaming`` the first ``n_sink`` valid prefix tokens and
the most recent ones (StreamingLLM as a score pattern); ``snapkv`` / ``pyramid`` score with the
observation window and keep ``C_l`` per head; ``ada_snapkv`` / ``ada_pyramid`` also allocate
the layer's ``Hk * C_l`` adaptively across heads (Ada-KV). Pyramid methods spread ``budget``
over the layers with :func:`adakv_ops.pyramid_budgets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import ops as _ops
from .budgets import pyramid_budgets

__all__ = ["EvictionPolicy", "Kept", "METHODS", "streaming_scores"]

METHODS = ("full", "snapkv", "ada_snapkv", "pyramid", "ada_pyramid", "streaming")
_ADAPTIVE = {"ada_snapkv": True, "ada_pyramid": True, "snapkv": False, "pyramid": False}


def streaming_scores(L: int, ks: Tensor, n_sink: int) -> Tensor:
    """StreamingLLM as a score pattern over ``[..., L]``: the first ``n_sink`` valid tokens
    above everything, then recency; ``ks`` (any shape) is the first valid column, and columns
    before it are ``-inf``."""
    n = torch.arange(L, device=ks.device, dtype=torch.float32)
    rank = n - ks.to(torch.float32).unsqueeze(-1)
    s = torch.where(rank < n_sink, 2.0 * L + n_sink - rank, n)
    return torch.where(rank < 0, torch.full_like(s, float("-inf")), s)


class Kept(NamedTuple):
    """What a layer keeps: ``kept_idx [B, H, L]`` / ``kept_count [B, H]`` as
    :func:`adakv_ops.select` returns them, the per-head ``budgets [B, H]`` (segment capacity of
    a flat cache), the number of window rows ``window`` every head keeps after its prefix
    (``min(window, N - key_start)``) and the layer budget ``C``."""

    kept_idx: Tensor
    kept_count: Tensor
    budgets: Tensor
    window: int
    C: int


@dataclass(frozen=True)
class EvictionPolicy:
    """The settings of a method, and the selection they imply (see the module docstring).

    ``budget`` is the average number of kept prefix tokens per head (window not counted),
    ``window`` the observation window; the rest are passed to ``score`` / ``allocate``."""

    method: str = "ada_snapkv"
    budget: int = 256
    window: int = 32
    alpha: float = 0.2
    pooling: str = "max"
    kernel_size: int = 7
    gqa_reduce: str = "mean"
    aggregate: str = "mean"
    rounding: str = "exact"
    n_sink: int = 4
    pyramid_beta: int = 20
    pyramid_exact_mean: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"adakv: method must be one of {METHODS}, got {self.method!r}")

    @property
    def needs_queries(self) -> bool:
        """Whether the selection reads the observation-window queries."""
        return self.method not in ("full", "streaming")

    @property
    def fixed_size(self) -> bool:
        """Whether every head's budget is exactly ``C`` or the layer total is ``H * C``
        (a static flat-cache size): true except for adaptive allocation with official
        rounding."""
        return self.rounding == "exact" or self.method in ("streaming", "snapkv", "pyramid")

    @property
    def max_layer_budget(self) -> int:
        """The largest ``C_l`` a layer can get for any prompt (``full``: unbounded, not
        defined): pyramid layers get up to ``2 * budget``."""
        return 2 * self.budget if self.method in ("pyramid", "ada_pyramid") else self.budget

    def layer_budget(self, rank: int, n_layers: int, N: int, W: int) -> int:
        """``C_l`` of the layer of rank ``rank`` among ``n_layers`` evicted layers, for a
        prompt of ``N`` tokens with ``W`` window rows (``full``: ``N``)."""
        if self.method == "full":
            return N
        if self.method in ("pyramid", "ada_pyramid"):
            return pyramid_budgets(self.budget, n_layers, N, W, beta=self.pyramid_beta,
                                   exact_mean=self.pyramid_exact_mean)[rank]
        return self.budget

    def scores(self, q_window: Optional[Tensor], key: Tensor, key_start: Optional[Tensor] = None,
               scale: Optional[float] = None) -> Tensor:
        """``[B, H, N - W]`` float32 scores of the prefix of ``key [B, H, N, D]``
        (``W = q_window.shape[2]``; ``streaming`` takes ``W = min(window, N)`` and needs no
        queries). ``key_start [B]``: first valid column of each row (padding is ``-inf``)."""
        B, H, N, _ = key.shape
        if self.method == "streaming":
            W = q_window.shape[2] if q_window is not None else min(self.window, N)
            ks = (key_start if key_start is not None
                  else torch.zeros(B, device=key.device, dtype=torch.int32))
            return streaming_scores(N - W, ks, self.n_sink).unsqueeze(1).expand(B, H, N - W)
        return _ops.score(q_window, key, kernel_size=self.kernel_size, pooling=self.pooling,
                          aggregate=self.aggregate, gqa_reduce=self.gqa_reduce,
                          key_start=key_start, scale=scale)

    def budgets(self, scores: Tensor, C: int, key_start: Optional[Tensor] = None) -> Tensor:
        """Per-head budgets ``[B, H]`` int32 for layer budget ``C``."""
        if self.method == "streaming":
            B, H, _ = scores.shape
            return torch.full((B, H), C, device=scores.device, dtype=torch.int32)
        return _ops.allocate(scores, C, floor_alpha=self.alpha, adaptive=_ADAPTIVE[self.method],
                             rounding=self.rounding, key_start=key_start)

    def keep(self, q_window: Optional[Tensor], key: Tensor, C: int,
             key_start: Optional[Tensor] = None, scale: Optional[float] = None) -> Kept:
        """The whole selection for ``key [B, H, N, D]`` at layer budget ``C``: scores, budgets,
        top-``budget`` per head; ``full`` keeps every valid row (as its "window")."""
        B, H, N, _ = key.shape
        dev = key.device
        if self.method == "full":
            z = torch.zeros((B, H), device=dev, dtype=torch.int32)
            return Kept(torch.empty((B, H, 0), device=dev, dtype=torch.int32), z, z, N, N)
        W = q_window.shape[2] if q_window is not None else min(self.window, N)
        s = self.scores(q_window, key, key_start, scale).contiguous()
        budgets = self.budgets(s, C, key_start)
        kept_idx, kept_count = _ops.select(s, budgets, key_start=key_start)
        return Kept(kept_idx, kept_count, budgets, W, C)
