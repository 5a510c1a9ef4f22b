"""Flat (head-flattened, contiguous) storage of an evicted layer: ``storage="flat"``.

The layout of ``adakv_ops.compact`` (docs/semantics.md): ``k_flat``/``v_flat [rows, D]`` and
``seg_start``/``seg_len [B * H]`` int32, each segment with room for ``C_h + W + reserve`` rows.
The batch is fixed at prefill; growth repacks every segment (one vectorised copy, amortised by
doubling). It is the layout of the offline evaluation and of fixed-batch decoding; the paged
storage (:mod:`adakv_ops.hf.paged`) is the one sequences can join and leave.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import ops as _ops
from .layer import INT32_MAX, EvictedLayer
from .registration import mark_static

__all__ = ["FlatLayer"]


class FlatLayer(EvictedLayer):
    """An evicted layer in the flat layout. Tensors after prefill: ``k_flat``/``v_flat
    [rows, D]``, ``seg_start``/``seg_len [B * H]`` int32. Host counters: ``free`` (smallest
    remaining reserve of its segments), ``reserve_total``."""

    def _clear_storage(self) -> None:
        self.k_flat = self.v_flat = self.seg_start = self.seg_len = None
        self._held_kv = None
        self.free = 0
        self.reserve_total = 0

    @property
    def evicted(self) -> bool:
        """Whether the layer holds a flat cache (prefill done)."""
        return self.k_flat is not None

    # -- prompt -------------------------------------------------------------------------------

    def _hold_chunk(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        if self._held_kv is None:
            self._held_kv = (key, value)
        else:
            k, v = self._held_kv
            self._held_kv = (torch.cat([k, key], dim=2), torch.cat([v, value], dim=2))
        return self._held_kv

    def _check_rows(self, S: int, C: int, W: int, R: int, what: str = "budget") -> None:
        """The flat cache of this layer, ``S * (C + W + R)`` rows, must fit the int32 row index
        (checked before anything is allocated; Python ints never wrap)."""
        R_name = "max_growth" if self.settings.max_growth is not None else "reserve"
        rows = S * (C + W + R)
        if rows > INT32_MAX:
            raise ValueError(
                f"adakv: layer {self.layer_idx}: the flat cache would hold segments * ({what} + "
                f"window + {R_name}) = {S} * ({C} + {W} + {R}) = {rows} rows; at most 2^31 - 1 "
                f"are supported (lower budget, window or {R_name}, or the batch)")

    def _store_prompt(self, q_window, key, value, key_start, C, scale) -> None:
        s = self.settings
        B, H, N, _ = key.shape
        R = s.max_growth if s.max_growth is not None else s.reserve
        if s.method == "full":
            self._check_rows(B * H, N, 0, R, "the prompt length N")
        else:
            self._check_rows(B * H, C, q_window.shape[2], R)
        kept = self._keep(q_window, key, value, key_start, C, scale)
        self._held_kv = None
        self._compact(key, value, kept, R, key_start)
        self.free = self.reserve_total = R

    def _compact(self, key, value, kept, R: int, key_start) -> None:
        """The flat cache of ``kept`` with ``R`` rows of reserve per segment (a static size
        when the policy's budgets sum to ``H * C``)."""
        B, H = key.shape[0], key.shape[1]
        prefix = 0 if self.settings.method == "full" else kept.C   # full keeps its rows as W
        # a static size when the budgets sum to H * C; under tensor parallelism a rank's heads
        # get a data-dependent share of the layer's H * C
        fixed = self.settings.policy.fixed_size and self.settings.shards is None
        rows = B * H * (prefix + kept.window + R) if fixed else None
        self._set_flat(*_ops.compact(key.contiguous(), value.contiguous(), kept.kept_idx,
                                     kept.kept_count, kept.budgets, kept.window, reserve=R,
                                     rows=rows, key_start=key_start))

    def _set_flat(self, k_flat, v_flat, seg_start, seg_len) -> None:
        self.k_flat, self.v_flat, self.seg_start, self.seg_len = k_flat, v_flat, seg_start, seg_len
        self.keys, self.values = k_flat, v_flat
        mark_static(k_flat, v_flat, seg_start, seg_len)

    # -- decode -------------------------------------------------------------------------------

    def _append(self, key: Tensor, value: Tensor) -> None:
        """``adakv_ops.append_`` of ``[B, Hk, T, D]`` new tokens (no host bookkeeping)."""
        _ops.append_(self.k_flat, self.v_flat, self.seg_start, self.seg_len, self._expand(key),
                     self._expand(value))

    def _decode_attention(self, query: Tensor, scale) -> Tensor:
        """``adakv_ops.decode_attention`` of ``query [B, Hq, T, D]`` -> ``[B, Hq, T, D]``."""
        return _ops.decode_attention(query, self.k_flat, self.v_flat, self.seg_start,
                                     self.seg_len, scale=scale)

    def _make_room(self, T: int) -> None:
        """Make room for ``T`` tokens in every segment (eager): re-evict (``max_growth``) or
        grow, then account them in ``free``."""
        if self.free < T:
            if self.settings.max_growth is not None and self._reevict(self.seg_len):
                self.free = self.reserve_total = self.settings.max_growth
            if self.free < T:
                need = max(T - self.free, 1)
                g = max(self.reserve_total, need)  # amortised: double the reserve
                if self.k_flat.shape[0] + self.seg_start.numel() * g > INT32_MAX:
                    g = need  # doubling would pass the int32 row limit: grow just enough
                self._grow(g)
        self.free -= T

    def ensure(self, num_tokens: int) -> None:
        if self.evicted and self.free < num_tokens and self.settings.max_growth is None:
            self._grow(num_tokens - self.free)

    def _grow(self, g: int) -> None:
        """Add ``g`` rows of reserve to every segment: one vectorised repack."""
        S = self.seg_start.numel()
        rows, D = self.k_flat.shape
        # Never compute a wrapped capacity: the grown cache and every segment's reserve must
        # stay int32 row counts (seg_start is int32).
        if g < 0 or rows + S * g > INT32_MAX or self.reserve_total + g > INT32_MAX:
            raise RuntimeError(
                f"adakv: layer {self.layer_idx}: growing the cache by {g} rows of reserve per "
                f"segment would give {rows} + {S} * {g} = {rows + S * g} rows (reserve "
                f"{self.reserve_total + g} per segment); at most 2^31 - 1 are supported "
                f"(generate fewer tokens, or use max_growth to re-evict instead of growing)")
        dev = self.k_flat.device
        r = torch.arange(rows, device=dev, dtype=torch.int32)
        seg_of_row = torch.searchsorted(self.seg_start, r, right=True) - 1
        dest = r.to(torch.int64) + seg_of_row.to(torch.int64) * g
        k_new = self.k_flat.new_zeros((rows + S * g, D))
        v_new = self.v_flat.new_zeros((rows + S * g, D))
        k_new.index_copy_(0, dest, self.k_flat)
        v_new.index_copy_(0, dest, self.v_flat)
        seg_start = self.seg_start + torch.arange(S, device=dev, dtype=torch.int32) * g
        self._set_flat(k_new, v_new, seg_start.contiguous(), self.seg_len)
        self.free += g
        self.reserve_total += g
        self.n_grow += 1

    # -- re-eviction --------------------------------------------------------------------------

    def _gather_segments(self, Nmax: int, lens: Tensor, pad: Tensor,
                         rows: Optional[list] = None) -> tuple[Tensor, Tensor]:
        assert rows is None, "the flat layout re-evicts its whole batch"
        S = lens.numel()
        D = self.k_flat.shape[1]
        cols = torch.arange(Nmax, device=lens.device, dtype=torch.int64)
        valid = cols.unsqueeze(0) >= pad.unsqueeze(1)                  # [S, Nmax]
        src = self.seg_start.to(torch.int64).unsqueeze(1) + cols.unsqueeze(0) - pad.unsqueeze(1)
        src = torch.where(valid, src, torch.zeros_like(src)).view(-1)
        keep = valid.view(S, Nmax, 1)
        B, H = self._batch, self.n_heads
        kp = (self.k_flat.index_select(0, src).view(S, Nmax, D) * keep).view(B, H, Nmax, D)
        vp = (self.v_flat.index_select(0, src).view(S, Nmax, D) * keep).view(B, H, Nmax, D)
        return kp, vp

    def _store_reevicted(self, key, value, kept, key_start, rows: Optional[list] = None) -> None:
        s = self.settings
        self._compact(key, value, kept, s.max_growth if s.max_growth is not None else self.free,
                      key_start)

    def _seg_lens(self, rows: Optional[list] = None) -> Tensor:
        assert rows is None, "the flat layout holds one batch"
        return self.seg_len

    # -- inspection / snapshot ----------------------------------------------------------------

    def nbytes(self) -> int:
        if self.k_flat is None:
            return 0
        return self.k_flat.nbytes + self.v_flat.nbytes

    def segment_lengths(self) -> list[int]:
        return [] if self.seg_len is None else self.seg_len.tolist()

    def segment_kv(self, s: int) -> tuple[Tensor, Tensor]:
        a, n = int(self.seg_start[s]), int(self.seg_len[s])
        return self.k_flat[a:a + n], self.v_flat[a:a + n]

    def _snapshot(self):
        self._check_claimed()
        if self.k_flat is None:
            raise RuntimeError("adakv: snapshot() before the prompt was processed")
        return (self.k_flat, self.v_flat, self.seg_start, self.seg_len, self.seg_len.clone(),
                None if self.qbuf is None else (self.qbuf, self.qbuf.clone()),
                self.seen, self.free, self.reserve_total, self.budget)

    def _restore(self, st) -> None:
        k, v, ss, sl_ref, sl_val, qb, seen, free, rtot, budget = st
        sl_ref.copy_(sl_val)
        if k is not self.k_flat or sl_ref is not self.seg_len:
            self._set_flat(k, v, ss, sl_ref)
        if qb is not None:
            qb[0].copy_(qb[1])
            self.qbuf = qb[0]
        self.seen, self.free, self.reserve_total, self.budget = seen, free, rtot, budget
        self._pending, self._prepaid = None, 0
