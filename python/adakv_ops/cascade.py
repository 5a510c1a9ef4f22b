"""Layer-DefensiveKV's one budget across layers, with bounded memory (SPEC 7.3, decision D13).

One global top ``K = n_layers * H * C`` per batch row over the prefix tokens of every layer's
heads (each head keeps its window outright, so no segment is ever empty), in the library's
total order: higher score first; ties to the lower layer, then head, then token; NaN lowest.
The layers arrive one at a time (the forward evicts layer after layer); after each one only the
current top ``K`` is retained, which re-trims the earlier layers. That is exact: a candidate
outside the top ``K`` of what has been seen already has ``K`` candidates above it, which stay,
so it cannot be in the final top ``K`` (the fp64 oracle is
:func:`adakv_ops.reference_followups.layer_defensive_bounded_ref`; tested equal to the
unbounded global top-k). So the rows held never exceed the final cache (``K`` prefix rows
plus the windows) while a layer is evicted, plus that layer's own full K/V, which the forward
holds anyway.

:class:`LayerCascade` does the ranking only (device work, one host read per layer for the width
of the retained score rows); the storage applies what it returns (the new layer's kept
columns, and for each earlier layer which of its retained prefix rows stay). No
``transformers`` dependency.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import ops as _ops

__all__ = ["LayerCascade", "top_k_mask", "true_positions"]


def true_positions(mask: Tensor) -> Tensor:
    """The positions of the ``True`` entries of each row of ``mask [..., w]``, ascending and
    left-aligned, the rest of the row filled with ``w`` (int64)."""
    w = mask.shape[-1]
    idx = torch.arange(w, device=mask.device)
    return torch.where(mask, idx, torch.full_like(idx, w)).sort(dim=-1).values


def top_k_mask(scores: Tensor, candidate: Tensor, k: int) -> Tensor:
    """``[B, M]`` bool: per row the top ``k`` of the ``candidate`` entries of ``scores [B, M]``
    in the library's order (higher first, NaN lowest, ties to the lower position), on the
    ``select`` kernel (the same radix select and order keys as every other selection).

    The candidates of each row are packed, in order, to the row's end, and the columns before
    them are ``select``'s excluded ``key_start`` columns: positions are kept, so ties still go to
    the lower position, and a non-candidate can never displace a candidate (whatever its
    value, NaN included). No sort, no host read."""
    B, M = scores.shape
    dev = scores.device
    m = candidate.sum(dim=1)                                     # [B] candidates per row
    pos = (M - m).unsqueeze(1) + candidate.cumsum(dim=1) - 1     # packed column of each one
    dest = torch.where(candidate, pos, torch.full_like(pos, M))  # M: a spare column
    packed = torch.full((B, M + 1), float("-inf"), device=dev, dtype=torch.float32)
    packed.scatter_(1, dest, scores.float())
    src = torch.full((B, M + 1), M, device=dev, dtype=torch.int64)
    src.scatter_(1, dest, torch.arange(M, device=dev).expand(B, M))
    budgets = torch.full((B, 1), min(k, M), device=dev, dtype=torch.int32)
    idx, _ = _ops.select(packed[:, :M].contiguous().view(B, 1, M), budgets,
                         key_start=(M - m).to(torch.int32))
    idx = idx.view(B, M).to(torch.int64)
    hit = idx >= 0
    out = torch.zeros(B, M + 1, device=dev, dtype=torch.bool)
    out.scatter_(1, torch.where(hit, src.gather(1, idx.clamp(min=0)), M), hit)
    return out[:, :M]


@dataclass
class _Retained:
    """One layer's retained prefix candidates: ``scores [B, H, w]`` left-aligned in ascending
    token order, ``count [B, H]`` of them valid."""

    scores: Tensor
    count: Tensor


@dataclass
class LayerCascade:
    """The running global top-``K`` of one prefill (see the module docstring).

    ``n_layers``: the evicted layers of the model; ``budget``: ``C`` (prefix tokens per head
    on average over all layers and heads)."""

    n_layers: int
    budget: int
    layers: List[_Retained] = field(default_factory=list)

    def add(self, scores: Tensor, key_start: Optional[Tensor] = None
            ) -> Tuple[Tensor, Tensor, List[Optional[Tensor]]]:
        """Merge the next layer's prefix scores ``[B, H, L]`` (padding columns before
        ``key_start [B]`` are not candidates) and trim to the top ``K``.

        Returns ``(kept_idx [B, H, L] int32, kept_count [B, H] int32, retrim)``: the new
        layer's kept prefix columns (ascending, ``-1`` filled; ``select``'s format), and for
        every earlier layer either ``None`` (nothing of it dropped) or ``keep [B, H, w]`` bool
        over its retained rows in ascending token order (the rows to keep)."""
        if len(self.layers) >= self.n_layers:
            raise RuntimeError(f"adakv: the cascade got more than n_layers={self.n_layers} layers")
        B, H, L = scores.shape
        dev = scores.device
        col = torch.arange(L, device=dev)
        ks = (key_start.to(torch.int64).view(B, 1, 1) if key_start is not None
              else torch.zeros(B, 1, 1, device=dev, dtype=torch.int64))
        new_valid = (col >= ks).expand(B, H, L)
        vals = [r.scores.reshape(B, -1) for r in self.layers] + [scores.reshape(B, -1)]
        valid = [(torch.arange(r.scores.shape[2], device=dev) < r.count.unsqueeze(-1))
                 .reshape(B, -1) for r in self.layers] + [new_valid.reshape(B, -1)]
        v = torch.cat(vals, dim=1).float()               # [B, M], (layer, head, token) order
        ok = torch.cat(valid, dim=1)
        M = v.shape[1]
        K = self.n_layers * H * self.budget
        survive = ok if K >= M else top_k_mask(v, ok, K)
        keeps, dropped = [], []
        off = 0
        for r in self.layers:
            w = r.scores.shape[2]
            keep = survive[:, off:off + H * w].view(B, H, w)
            dropped.append((ok[:, off:off + H * w] & ~survive[:, off:off + H * w]).any())
            off += H * w
            keeps.append(keep)
        keep_new = survive[:, off:].view(B, H, L)
        kept_count = keep_new.sum(dim=-1).to(torch.int32)
        pos = true_positions(keep_new)
        kept_idx = torch.where(pos < L, pos, torch.full_like(pos, -1)).to(torch.int32)
        # one host read: the new layer's row width and which earlier layers lost rows
        top = kept_count.max() if kept_count.numel() else torch.zeros((), device=dev)
        host = torch.stack([top.to(torch.int64)] + [d.to(torch.int64) for d in dropped]).tolist()
        width, lost = host[0], host[1:]
        retrim: List[Optional[Tensor]] = []
        for r, keep, changed in zip(self.layers, keeps, lost):
            if changed:
                self._shrink(r, keep)
            retrim.append(keep if changed else None)
        take = kept_idx[..., :width].clamp(min=0).to(torch.int64)
        self.layers.append(_Retained(scores.gather(-1, take).contiguous(), kept_count))
        return kept_idx.contiguous(), kept_count, retrim

    @staticmethod
    def _shrink(r: _Retained, keep: Tensor) -> None:
        """Keep only the rows ``keep`` of ``r`` (left-aligned again, same width)."""
        w = r.scores.shape[2]
        pos = true_positions(keep)
        r.count = keep.sum(dim=-1).to(torch.int32)
        r.scores = r.scores.gather(-1, pos.clamp(max=w - 1) if w else pos).contiguous()
