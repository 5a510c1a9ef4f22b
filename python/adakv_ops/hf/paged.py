"""Paged per-head storage of the evicted layers: ``storage="paged"`` (the default).

All evicted layers of one cache share one :class:`adakv_ops.store.PagedKVStore`
(:class:`PagedPool`): one page pool, one page table and one length per segment (sequence x
head) and layer, pages handed out on the host. Batch row ``b`` is the store's sequence ``b``.
A layer's prompt is evicted with ``PagedKVStore.write_kept``; a chunk-major prefill holds the
raw prompt in pages until its last chunk (SPEC 3.1; a layer-major one holds it in the layer's
own contiguous buffer, :mod:`adakv_ops.hf.layer`, and never in pages); decode appends with
``paged_append_`` and attends with ``paged_decode_attention``. Pages for a decode step are
handed out by the host (``prepare_decode`` / the eager ``update``), so the compiled step is
pure tensor work on fixed tensors (after ``ensure_capacity``).

Pool size: ``num_pages`` pages of ``page_size`` rows; ``None`` sizes it at the first prompt
and doubles it when a request would run out (one device copy; the pool gets a new address,
so pass ``num_pages`` or call ``ensure_capacity`` before capturing CUDA graphs).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .. import ops as _ops
from ..store import OutOfPages, PagedKVStore, to_device
from .layer import INT32_MAX, EvictedLayer
from .registration import mark_static

__all__ = ["PagedLayer", "PagedPool"]


class PagedPool:
    """The one store of a cache's evicted layers, created at the first prompt."""

    def __init__(self, settings, n_layers: int, heads: int, head_dim: int,
                 parent: Optional["PagedPool"] = None):
        self.settings = settings
        #: a side cache's pool (:class:`~adakv_ops.hf.join.PrefillJob`): it opens the parent's
        #: store (creating it on the parent's first use) and takes its sequences there
        self.parent = parent
        self.n_layers, self.heads, self.head_dim = n_layers, heads, head_dim
        self.store: Optional[PagedKVStore] = None
        self.seqs: list[int] = []
        self.rows: Optional[list[int]] = None
        self._marked = None
        self._run: Optional[tuple[int, int]] = None     # slot_run(), set on every change
        self._index: Optional[Tensor] = None
        self._row_slots: Optional[Tensor] = None
        # batch-size buckets (a fixed decode shape across joins and leaves): the forward has
        # `bucket` rows, the batch then pad rows whose segment_index entries are -1 (no
        # storage: the paged ops write nothing for them and output 0)
        self.bucket: Optional[int] = None

    def open(self, B: int, rows_per_segment: int, dtype, device) -> PagedKVStore:
        """The store (built for ``B`` sequences on first use). A forward's batch must be the
        cache's, or the rows being added (:meth:`AdaKVCache.prefill` on a non-empty cache)."""
        if self.store is None and self.parent is not None:
            if self.parent.store is None:
                self.parent.open(0, rows_per_segment, dtype, device)
            self.store = self.parent.store
        if self.store is None:
            s = self.settings
            P = s.page_size
            pages = s.num_pages
            if pages is None:  # auto: every segment of every layer at the given size, + 1/8
                per_seg = -(-max(rows_per_segment, 1) // P)
                pages = max(B, 1) * self.heads * self.n_layers * per_seg
                pages = min(pages + pages // 8 + 1, INT32_MAX)
            # max_batch fixes the slots (tables never move); None: the store doubles them
            slots = None if s.max_batch is None else max(s.max_batch, B)
            # max_seq_len fixes the table width: no segment holds more rows than its
            # sequence has tokens (+ 1 page: a partly filled first page is not assumed)
            width = None if s.max_seq_len is None else \
                min(-(-s.max_seq_len // P) + 1, INT32_MAX)
            self.store = PagedKVStore(self.n_layers, self.heads, self.head_dim, page_size=P,
                                      num_pages=pages, dtype=dtype, device=device,
                                      max_sequences=slots, max_pages_per_segment=width)
            self.seqs = [self.store.add_sequence() for _ in range(B)]
            self.rows = None
            self._membership_changed()
            self.mark()
        elif not self.seqs:            # every row left: the store is reused for a new batch
            if self.settings.max_batch is not None and B > self.store.max_sequences:
                raise RuntimeError(f"adakv: a batch of {B} does not fit max_batch="
                                   f"{self.store.max_sequences}")
            self.seqs = [self.store.add_sequence() for _ in range(B)]
            self._membership_changed()
        elif B != len(self.active()):
            raise ValueError(f"adakv: the cache holds a batch of {len(self.seqs)} sequences; a "
                             f"forward with batch {B} cannot use it (reset() first)")
        return self.store

    def slot_run(self) -> Optional[tuple[int, int]]:
        """``(first, end)`` segment rows of the batch when its sequences are consecutive slots
        in batch order (the tables can be viewed), else ``None`` (gathered)."""
        return self._run

    def segment_index(self) -> Tensor:
        """The batch's segment rows of the store's tables, then ``-1`` per pad row's segment:
        ``[rows * H]`` int32 on the device, the ``segment_index`` of the paged ops (one tensor
        per batch membership: a fixed address between joins and leaves)."""
        return self._index

    def set_bucket(self, bucket: Optional[int]) -> None:
        """Decode forwards carry ``bucket`` rows (>= the batch): the batch, then pad rows
        (their outputs are 0 and meaningless; they hold no page). ``None``: exactly the
        batch. Every bucketed forward uses the segment index (even a full bucket), so it
        compiles once per bucket."""
        B = len(self.seqs)
        if bucket is not None and bucket < B:
            raise ValueError(f"adakv: bucket {bucket} < the batch of {B} rows")
        if bucket == self.bucket:
            return
        self.bucket = bucket
        self._membership_changed()

    def row_slots(self) -> Optional[Tensor]:
        """The store slot of every forward row, pad rows ``max_sequences`` (the spare row of
        the layers' per-slot buffers): ``[rows]`` int64 on the device, re-eviction mode only
        (``None`` otherwise)."""
        return self._row_slots

    def _membership_changed(self) -> None:
        # computed here, eagerly: compiled forwards only read them (no guard flips after a call)
        q = self.seqs
        self._row_slots = None
        if q and self.store is not None and self.settings.max_growth is not None:
            pads = (self.bucket or len(q)) - len(q)
            self._row_slots = to_device(torch.tensor(q + [self.store.max_sequences] * pads,
                                                     dtype=torch.int64), self.store.device)
            mark_static(self._row_slots)
        if self.bucket is not None and q:
            self._run = None
            self._index = self.store.segment_index(q, pad_to=self.bucket)
            mark_static(self._index)
            return
        ok = bool(q) and q == list(range(q[0], q[0] + len(q)))
        self._run = (q[0] * self.heads, (q[-1] + 1) * self.heads) if ok else None
        self._index = None
        if self._run is None and q and self.store is not None:
            self._index = self.store.segment_index(q)
            mark_static(self._index)

    def remove(self, rows: list[int]) -> None:
        """Batch rows ``rows`` leave: their sequences' pages go back to the free list."""
        for i in rows:
            self.store.free_sequence(self.seqs[i])
        drop = set(rows)
        self.seqs = [q for i, q in enumerate(self.seqs) if i not in drop]
        self._membership_changed()

    def fork(self, rows: list[int]) -> list[int]:
        """New batch rows (``len(seqs) ..``), row ``i`` of them a copy of batch row
        ``rows[i]`` in pages of its own (``PagedKVStore.fork_sequence``)."""
        st = self.store
        if self.settings.max_batch is not None and \
                st.max_sequences - len(self.seqs) < len(rows):
            raise RuntimeError(f"adakv: the cache holds {len(self.seqs)} of max_batch="
                               f"{st.max_sequences} sequences; {len(rows)} more do not fit")
        new = []
        try:
            for r in rows:
                src = self.seqs[r]
                new.append(self.call(lambda: st.fork_sequence(src)))
        finally:
            self.seqs.extend(new)
            self._membership_changed()
            self.mark()
        return new

    def adopt(self, side: "PagedPool") -> list[int]:
        """The sequences of ``side`` (a side pool over this pool's store, not in a prefill)
        become this pool's last batch rows, pages untouched; ``side`` is left empty and
        detached. Returns their batch rows."""
        if side.store is not self.store:
            raise RuntimeError("adakv: the prefill job's sequences are in a page store this "
                               "cache no longer uses (it was reset() while the job ran): "
                               "they cannot join its batch; cancel() the job")
        if side.rows is not None or self.rows is not None:
            raise RuntimeError("adakv: only a finished prefill of a side cache over this "
                               "cache's store can join its batch")
        first = len(self.seqs)
        self.seqs.extend(side.seqs)
        side.seqs, side.store, side._marked = [], None, None
        side._membership_changed()
        self._membership_changed()
        self.mark()
        return list(range(first, len(self.seqs)))

    def drop(self) -> None:
        """Every sequence of this pool leaves, its pages back to the free list (a side pool's
        cancel)."""
        if self.store is not None:
            self.remove(list(range(len(self.seqs))))

    def active(self) -> list[int]:
        """The sequences of the forward in flight: the rows being added, or the batch."""
        return self.seqs if self.rows is None else self.rows

    def add(self, n: int) -> list[int]:
        """Take ``n`` more sequences (batch rows ``len(seqs) ..``) for a prefill of new rows."""
        st = self.store
        if self.settings.max_batch is not None and \
                st.max_sequences - len(self.seqs) < n:
            raise RuntimeError(f"adakv: the cache holds {len(self.seqs)} of max_batch="
                               f"{st.max_sequences} sequences; {n} more do not fit")
        new = [st.add_sequence() for _ in range(n)]
        self.seqs.extend(new)
        self._membership_changed()
        self.mark()
        return new

    def call(self, fn: Callable):
        """Run a store request; with an auto-sized pool, grow it (doubling) when it runs out."""
        while True:
            try:
                return fn()
            except OutOfPages as e:
                if self.settings.num_pages is not None:
                    raise
                st = self.store
                want = max(2 * st.num_pages, st.num_pages + e.needed - e.free)
                if st.num_pages + e.needed - e.free > INT32_MAX:
                    raise
                st.grow_pool(min(want, INT32_MAX))
            finally:
                self.mark()

    def mark(self) -> None:
        """Fixed addresses for torch.compile: the pool and every table (again only after they
        were reallocated: pool growth, wider tables, more slots)."""
        st = self.store
        if st is None:
            return
        now = (st.k_pages, st.v_pages, st.page_table[0], st.seg_len[0])
        if self._marked is None or any(a is not b for a, b in zip(now, self._marked)):
            mark_static(st.k_pages, st.v_pages, *st.page_table, *st.seg_len)
            self._marked = now

    def reset(self) -> None:
        self.store = None
        self._marked = None
        self.seqs = []
        self.rows = None
        self.bucket = None
        self._membership_changed()


class PagedLayer(EvictedLayer):
    """An evicted layer stored as the ``full_rank``-th layer of the cache's paged store.

    Re-eviction mode (``max_growth``) keeps its state per store slot, so every sequence has its
    own schedule (it re-evicts exactly when it would alone, whoever joined or left): ``qbuf
    [slots + 1, Hq, window, D]`` (the last ``window`` queries of each slot; the spare last row
    takes the pad rows' writes), ``free [slots]`` (tokens left before the slot's segments pass
    ``C + window + max_growth`` rows) and ``slot_budget [slots]`` (its ``C``)."""

    def __init__(self, settings, layer_idx, full_rank, mailbox, control, pool: PagedPool):
        self.pool = pool
        super().__init__(settings, layer_idx, full_rank, mailbox, control)

    def _clear_storage(self) -> None:
        self._evicted = False
        self.free: Optional[np.ndarray] = None
        self.slot_budget: Optional[np.ndarray] = None

    @property
    def evicted(self) -> bool:
        return self._evicted

    @property
    def store(self) -> PagedKVStore:
        return self.pool.store

    def _views(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``(page_table, seg_len, index)`` for this layer's paged ops. Rows that are a run of
        consecutive slots: views ``[B * H, ...]`` of the store's own tensors (``index``
        None). Otherwise (rows left the batch, or a bucket with pad rows): the whole tables
        and the pool's ``segment_index`` (no gather, the ops write the store in place)."""
        r = self.full_rank
        table, seg_len = self.store.page_table[r], self.store.seg_len[r]
        run = self.pool.slot_run()
        if run is None:
            return table, seg_len, self.pool.segment_index()
        a, b = run
        if a == 0 and b == seg_len.shape[0]:
            return table, seg_len, None
        return table[a:b], seg_len[a:b], None

    # -- prompt -------------------------------------------------------------------------------

    def _hold_chunk(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        if self.settings.per_query_head:
            raise NotImplementedError("adakv: chunked prefill with per_query_head=True needs "
                                      "storage='flat'")
        B, _, n, _ = key.shape
        st = self.pool.open(B, self.held + n, key.dtype, key.device)
        seqs = self.pool.active()
        self.pool.call(lambda: st.reserve(seqs, n, layers=[self.full_rank]))
        st.append_reserved(self.full_rank, seqs, key, value)
        st.advance(self.full_rank, seqs, n)
        return st.prompt_kv(self.full_rank, seqs)

    def _store_prompt(self, q_window, key, value, key_start, C, scale) -> None:
        s = self.settings
        B, H, N, _ = key.shape
        # pages are handed out as tokens come: the reserve only sizes an automatic pool
        R = s.max_growth if s.max_growth is not None else min(s.reserve, s.page_size)
        prefix = N if s.method == "full" else min(C, N)
        st = self.pool.open(B, prefix + q_window.shape[2] + R, key.dtype, key.device)
        kept = self._keep(q_window, key, value, key_start, C, scale)
        rows = self.pool.active()
        self.pool.call(lambda: st.write_kept(self.full_rank, rows, key, value, kept, key_start))
        self._evicted = True
        self.keys, self.values = st.k_pages, st.v_pages

    # -- decode -------------------------------------------------------------------------------

    def _make_room(self, T: int) -> None:
        s = self.settings
        st, seqs = self.store, self.pool.seqs
        if s.max_growth is not None:
            slots = np.asarray(seqs, dtype=np.int64)
            due = np.flatnonzero(self.free[slots] < T).tolist()      # batch rows
            # a row re-evicts once each of its segments holds a window (as alone)
            due = [r for r in due if min(st.lengths(self.full_rank, seqs[r])) >= s.window]
            for C in sorted({int(self.slot_budget[seqs[r]]) for r in due}):
                rows = [r for r in due if int(self.slot_budget[seqs[r]]) == C]
                if self._reevict(self._rows_tables(rows)[1], rows, C):
                    self.free[slots[rows]] = s.max_growth
            self.free[slots] -= T
        self.pool.call(lambda: st.reserve(seqs, T, layers=[self.full_rank]))
        st.advance(self.full_rank, seqs, T)

    def _rows_tables(self, rows: Optional[list] = None) -> tuple[Tensor, Tensor]:
        """``(page_table [B' * H, width], seg_len [B' * H])`` of batch rows ``rows`` (default
        all), gathered (re-eviction reads them whole)."""
        seqs = self.pool.seqs if rows is None else [self.pool.seqs[r] for r in rows]
        idx = self.store.segment_index(seqs)
        r = self.full_rank
        return (self.store.page_table[r].index_select(0, idx),
                self.store.seg_len[r].index_select(0, idx))

    def _seg_lens(self, rows: Optional[list] = None) -> Tensor:
        return self._rows_tables(rows)[1]

    def _prefill_rows(self) -> Optional[list]:
        if self.pool.rows is None:
            return None
        n = len(self.pool.seqs)
        return list(range(n - len(self.pool.rows), n))

    def _slot_index(self, rows: Optional[list] = None) -> Tensor:
        seqs = self.pool.seqs if rows is None else [self.pool.seqs[r] for r in rows]
        return to_device(torch.tensor(seqs, dtype=torch.int64), self.store.device)

    def _ensure_slot_state(self, Hq: int, D: int, dtype, device) -> None:
        """Per-slot re-eviction buffers for every slot of the store (grown with its slots)."""
        n = self.store.max_sequences + 1
        if self.qbuf is not None and self.qbuf.shape[0] == n:
            return
        qbuf = torch.zeros((n, Hq, self.settings.window, D), dtype=dtype, device=device)
        free = np.zeros(n - 1, dtype=np.int64)
        budget = np.zeros(n - 1, dtype=np.int64)
        if self.qbuf is not None:
            m = min(self.qbuf.shape[0], n) - 1
            qbuf[:m] = self.qbuf[:m]
            free[:m], budget[:m] = self.free[:m], self.slot_budget[:m]
        self.qbuf, self.free, self.slot_budget = qbuf, free, budget
        mark_static(qbuf)

    def _after_prompt(self, q_window: Tensor) -> None:
        s = self.settings
        if s.max_growth is None:
            self.qbuf = None
            return
        B, Hq, W, D = q_window.shape
        self._ensure_slot_state(Hq, D, q_window.dtype, q_window.device)
        seqs = self.pool.active()
        w = q_window.new_zeros((B, Hq, s.window, D))
        w[:, :, s.window - W:] = q_window
        idx = to_device(torch.tensor(seqs, dtype=torch.int64), q_window.device)
        self.qbuf.index_copy_(0, idx, w)
        self.free[seqs] = s.max_growth
        self.slot_budget[seqs] = self.budget

    def _after_decode(self, q: Tensor) -> None:
        if self.qbuf is None:
            return
        idx = self.pool.row_slots()
        T, Wb = q.shape[2], self.qbuf.shape[2]
        if T >= Wb:
            new = q[:, :, T - Wb:]
        else:
            new = torch.cat([self.qbuf.index_select(0, idx)[:, :, T:], q], dim=2)
        self.qbuf.index_copy_(0, idx, new.contiguous())

    def _window_queries(self, rows: Optional[list] = None) -> Tensor:
        return self.qbuf.index_select(0, self._slot_index(rows))

    def ensure(self, num_tokens: int) -> None:
        if self.evicted:
            st, seqs = self.store, self.pool.seqs
            self.pool.call(lambda: st.reserve(seqs, num_tokens, layers=[self.full_rank]))

    def _append(self, key: Tensor, value: Tensor) -> None:
        st = self.store
        table, seg_len, idx = self._views()
        _ops.paged_append_(st.k_pages, st.v_pages, table, seg_len, self._expand(key),
                           self._expand(value), segment_index=idx)
        self.keys, self.values = st.k_pages, st.v_pages

    def rotary_decode_ready(self) -> bool:
        """Whether :meth:`decode_rotary` can serve this layer's next forward: a decode step of
        an evicted layer (not a prompt being added), one stored head per KV head."""
        return (self.is_initialized and self.evicted and not self._control.adding
                and not self.settings.per_query_head)

    def decode_rotary(self, query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor,
                      scale) -> Tensor:
        """A decode step of this layer from the un-rotated ``query [B, Hq, T, D]``, ``key``,
        ``value [B, Hk, T, D]`` (strided views are read in place) and the model's rotary
        ``cos``, ``sin [B, T, D]``: ``paged_append_rotary_`` (RoPE, the append) then the paged
        decode attention; what ``update`` + the attention function compute on the rotated
        tensors (:mod:`adakv_ops.hf.rotary_decode`). Returns ``[B, Hq, T, D]``."""
        self._check_claimed()
        self._account(key.shape[-2])
        st = self.store
        table, seg_len, idx = self._views()
        q = _ops.paged_append_rotary_(st.k_pages, st.v_pages, table, seg_len, query, key, value,
                                      cos, sin, segment_index=idx)
        self.keys, self.values = st.k_pages, st.v_pages
        out = self._decode_attention(q, scale)
        self._after_decode(q)
        return out

    def _decode_attention(self, query: Tensor, scale) -> Tensor:
        st = self.store
        table, seg_len, idx = self._views()
        return _ops.paged_decode_attention(query, st.k_pages, st.v_pages, table, seg_len,
                                           scale=scale, segment_index=idx)

    # -- re-eviction --------------------------------------------------------------------------

    def _gather_segments(self, Nmax: int, lens: Tensor, pad: Tensor,
                         rows: Optional[list] = None) -> tuple[Tensor, Tensor]:
        st = self.store
        P, D = st.page_size, st.head_dim
        table = self._rows_tables(rows)[0].to(torch.int64)
        S = lens.numel()
        cols = torch.arange(Nmax, device=lens.device, dtype=torch.int64)
        i = cols.unsqueeze(0) - pad.unsqueeze(1)                       # row in the segment
        valid = i >= 0
        i = i.clamp(min=0)
        src = table.gather(1, torch.div(i, P, rounding_mode="floor")) * P + i % P
        src = torch.where(valid, src, torch.zeros_like(src)).view(-1)
        keep = valid.view(S, Nmax, 1)
        B, H = (self._batch if rows is None else len(rows)), self.n_heads
        kp = (st.k_pages.view(-1, D).index_select(0, src).view(S, Nmax, D) * keep)
        vp = (st.v_pages.view(-1, D).index_select(0, src).view(S, Nmax, D) * keep)
        return kp.view(B, H, Nmax, D), vp.view(B, H, Nmax, D)

    def _store_reevicted(self, key, value, kept, key_start, rows: Optional[list] = None) -> None:
        st = self.store
        seqs = self.pool.seqs if rows is None else [self.pool.seqs[r] for r in rows]
        self.pool.call(lambda: st.write_kept(self.full_rank, seqs, key.contiguous(),
                                             value.contiguous(), kept, key_start))
        self.keys, self.values = st.k_pages, st.v_pages

    # -- inspection / snapshot ----------------------------------------------------------------

    def nbytes(self) -> int:
        """K/V bytes of the pages this layer holds."""
        st = self.store
        if st is None:
            return 0
        return st.pages_in_layer(self.full_rank) * st.bytes_per_page

    def _fork_rows(self, rows: list[int]) -> None:
        """Batch rows ``rows`` are copied to new rows at the end (the pool copies the pages)."""
        if self.qbuf is not None and rows:
            _, Hq, _, D = self.qbuf.shape
            self._ensure_slot_state(Hq, D, self.qbuf.dtype, self.qbuf.device)
            src = [self.pool.seqs[r] for r in rows]
            new = self.pool.seqs[len(self.pool.seqs) - len(rows):]
            dev = self.qbuf.device
            self.qbuf.index_copy_(0, to_device(torch.tensor(new), dev),
                                  self.qbuf.index_select(0, to_device(torch.tensor(src), dev)))
            self.free[new] = self.free[src]
            self.slot_budget[new] = self.slot_budget[src]
        self._batch += len(rows)

    def _adopt(self, side: "PagedLayer", seqs: list[int]) -> None:
        """Sequences ``seqs`` (store slots), prefilled by ``side`` (the same layer of a side
        cache over this layer's store), joined the pool's batch as its last rows: this layer's
        state becomes what a prefill of added rows leaves (the prompt's layer budget, window,
        scale and kept window; per-slot re-eviction state copied)."""
        if not side.evicted:
            raise RuntimeError(f"adakv: layer {self.layer_idx}: the side prefill did not evict")
        if not self.is_initialized:
            self.dtype, self.device, self.is_initialized = side.dtype, side.device, True
        self._batch = (self._batch or 0) + side._batch
        self.seen = max(self.seen, side.seen)
        self.n_heads, self.budget, self.window = side.n_heads, side.budget, side.window
        self._scale, self._o_proj = side._scale, side._o_proj
        self._kept_window = side._kept_window
        self._evicted = True
        self.keys, self.values = self.store.k_pages, self.store.v_pages
        if side.qbuf is not None:
            _, Hq, _, D = side.qbuf.shape
            self._ensure_slot_state(Hq, D, side.qbuf.dtype, side.qbuf.device)
            idx = to_device(torch.tensor(seqs, dtype=torch.int64), side.qbuf.device)
            self.qbuf.index_copy_(0, idx, side.qbuf.index_select(0, idx))
            self.free[seqs] = side.free[seqs]
            self.slot_budget[seqs] = side.slot_budget[seqs]

    def _keep_rows(self, keep: list[int]) -> None:
        """Only batch rows ``keep`` stay (the pool frees the others' pages; the per-slot
        re-eviction state of the others is simply not read any more)."""
        self._batch = len(keep)
        if not keep:
            self._clear()

    def segment_lengths(self) -> list[int]:
        """Host lengths of this layer's segments, batch-major (no device read)."""
        st = self.store
        if st is None:
            return []
        return [n for q in self.pool.seqs for n in st.lengths(self.full_rank, q)]

    def segment_kv(self, s: int) -> tuple[Tensor, Tensor]:
        H = self.pool.heads
        return self.store.segment_kv(self.full_rank, self.pool.seqs[s // H], s % H)

    def _snapshot(self):
        self._check_claimed()
        if not self._evicted:
            raise RuntimeError("adakv: snapshot() before the prompt was processed")
        return (None if self.qbuf is None else (self.qbuf, self.qbuf.clone()),
                self.seen, None if self.free is None else self.free.copy(), self.budget,
                None if self.slot_budget is None else self.slot_budget.copy())

    def _restore(self, st) -> None:
        qb, seen, free, budget, slot_budget = st
        if qb is not None:
            qb[0].copy_(qb[1])
            self.qbuf = qb[0]
        self.seen, self.budget = seen, budget
        self.free = None if free is None else free.copy()
        self.slot_budget = None if slot_budget is None else slot_budget.copy()
        self._pending, self._prepaid = None, 0
        self.keys, self.values = self.store.k_pages, self.store.v_pages
