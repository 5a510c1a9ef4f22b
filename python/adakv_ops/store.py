"""Paged per-head KV store (SPEC 3.1, issue 12): pages, tables, lengths, growth, snapshots.

No ``transformers`` dependency: a model integration (``adakv_ops.hf``, storage="paged") or a serving
engine drives it. Full description: ``docs/store.md``.

Layout
------
One pool for all layers: ``k_pages``, ``v_pages [num_pages, P, D]`` (``P = page_size``). A
*sequence* takes a slot ``q``; its KV head ``h`` is the *segment* ``s = q * Hk + h`` of every
layer. Per layer ``l`` the device holds ``page_table[l] [max_segments, width]`` int32 and
``seg_len[l] [max_segments]`` int32; segment ``s``'s token ``i`` lives at
``k_pages[page_table[l][s, i // P], i % P]``. Table entries past ``ceil(seg_len / P)`` are 0
(ignored by the ops). Pages are handed out on the host (a free list) and the host mirrors every
segment's length and page list, so decode never reads the device: the only device->host read is
``kept_count`` (one ``[Hk]`` tensor) per layer in :meth:`PagedKVStore.finish_prefill`.

Life of a sequence
------------------
``seq = store.add_sequence()``; per layer and prompt chunk ``prefill_chunk`` (append the
chunk's K/V into transient pages) and ``prefill_attention`` (the chunk's causal attention over
the prompt so far); after the last chunk ``finish_prefill`` (score + evict exactly as the
one-shot ``adakv_ops.evict`` / ``compact`` path, keep only the kept rows, free the transient
pages). Decode: ``reserve(seqs, T)`` (host: pages for the next ``T`` tokens in every layer),
``append(l, seqs, k, v)``, ``attend(l, seqs, q)``. ``snapshot`` / ``restore`` for
compress-once / ask-many. ``free_sequence`` gives every page back; nobody else's pages move.

Out of pages: :class:`OutOfPages` (a ``RuntimeError``) is raised by the host-side admission
check, before any device work, and leaves the store unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops as _ops
from ._checks import is_int
from .policy import METHODS, EvictionPolicy, Kept, streaming_scores  # noqa: F401 (re-exported)
from .staging import to_device  # noqa: F401 (re-exported: the host -> device copies)

__all__ = ["PagedKVStore", "OutOfPages", "StoreSnapshot", "METHODS", "have_paged_ops"]

_INT32_MAX = 2**31 - 1


def chunk_attention(query: Tensor, key: Tensor, value: Tensor,
                    scale: Optional[float] = None) -> Tensor:
    """A prompt chunk's causal attention over the prompt so far, without a materialised mask:
    ``query [B, Hq, n, D]`` sits at positions ``N - n + t`` of ``key`` / ``value [B, Hk, N, D]``
    (``causal_lower_right``, which SDPA runs on its flash / memory-efficient kernels). Returns
    ``[B, n, Hq, D]`` (the Hugging Face attention layout).

    GQA without repeating K/V over the group (``repeat_interleave`` would copy the prompt so
    far ``G`` times): one SDPA call per group member ``g`` on the query heads ``g, G + g,
    2G + g, ...``, which read KV heads ``0, 1, 2, ...`` (query head ``j`` reads KV head
    ``j // G``, the Hugging Face order), written back interleaved. (SDPA's ``enable_gqa``
    would do the same in one call, but some backends serve it with the math kernel, which
    materialises the ``[n, N]`` scores.)"""
    from torch.nn.attention.bias import causal_lower_right

    B, Hq, n, _ = query.shape
    Hk, N, Dv = key.shape[1], key.shape[2], value.shape[-1]
    G = Hq // Hk
    mask = causal_lower_right(n, N)
    if G == 1:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).contiguous()
    out = query.new_empty((B, n, Hk, G, Dv))          # head k * G + g at [..., k, g, :]
    for g in range(G):
        out[:, :, :, g] = F.scaled_dot_product_attention(
            query[:, g::G], key, value, attn_mask=mask, scale=scale).transpose(1, 2)
    return out.view(B, n, Hq, Dv)


def have_paged_ops() -> bool:
    """Whether the paged ops (``torch.ops.adakv.paged_*``) are registered."""
    ns = getattr(torch.ops, "adakv", None)
    return ns is not None and all(
        hasattr(ns, n) for n in ("paged_compact_", "paged_append_", "paged_decode_attention"))


class OutOfPages(RuntimeError):
    """Not enough free pages for a request. Raised before any device work; the store is left
    unchanged. ``needed`` / ``free`` are page counts."""

    def __init__(self, needed: int, free: int, what: str):
        self.needed, self.free = needed, free
        super().__init__(f"adakv: out of pages: {what} needs {needed} more page(s), "
                         f"{free} free (free a sequence or build the store with more pages)")


@dataclass
class StoreSnapshot:
    """What :meth:`PagedKVStore.snapshot` records: per layer and head the length and the number
    of pages held. Cheap (host integers only); the rows themselves are never copied (appends
    only write past the recorded lengths)."""

    seq_id: int
    generation: int
    epochs: Tuple[int, ...]
    lens: Tuple[Tuple[int, ...], ...]       # [layer][head]
    n_pages: Tuple[Tuple[int, ...], ...]    # [layer][head]
    compressed: Tuple[bool, ...]


@dataclass
class _Seq:
    generation: int
    # per layer: has finish_prefill run (True) or is the segment content the raw prompt (False)
    compressed: List[bool] = field(default_factory=list)
    # per layer: bumped by finish_prefill (a snapshot from before it is invalid)
    epoch: List[int] = field(default_factory=list)


class PagedKVStore:
    """Per-head paged K/V storage for ``num_layers`` layers of ``num_kv_heads`` KV heads.

    Args:
        num_layers, num_kv_heads (``Hk``), head_dim (``D``).
        page_size: ``P`` rows per page (default 64).
        num_pages: pool size (shared by all layers, K and V each ``[num_pages, P, D]``).
        dtype, device: of the pages (fp32 / fp16 / bf16).
        max_pages_per_segment: page-table width. ``None``: the table starts narrow and doubles
            (one device copy, new address) when a segment needs more pages; an int fixes it
            (static addresses, e.g. for CUDA graphs) and a longer segment is an error.
        max_sequences: sequence slots. ``None``: start at 4 and double when full (new table
            addresses); an int fixes it.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, page_size: int = 64,
                 num_pages: int, dtype: torch.dtype = torch.float32, device="cpu",
                 max_pages_per_segment: Optional[int] = None,
                 max_sequences: Optional[int] = None):
        for name, v, lo in (("num_layers", num_layers, 1), ("num_kv_heads", num_kv_heads, 1),
                            ("head_dim", head_dim, 1), ("page_size", page_size, 1),
                            ("num_pages", num_pages, 1)):
            if not is_int(v, lo, _INT32_MAX):
                raise ValueError(f"{name} must be an int in [{lo}, 2^31 - 1], got {v!r}")
        for name, v in (("max_pages_per_segment", max_pages_per_segment),
                        ("max_sequences", max_sequences)):
            if v is not None and not is_int(v, 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be fp32 / fp16 / bf16, got {dtype}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size, self.num_pages = page_size, num_pages
        self.dtype, self.device = dtype, torch.device(device)
        self._fixed_width = max_pages_per_segment is not None
        self._fixed_slots = max_sequences is not None
        self.k_pages = torch.zeros((num_pages, page_size, head_dim), dtype=dtype,
                                   device=self.device)
        self.v_pages = torch.zeros_like(self.k_pages)
        # free list: a stack, lowest page index handed out first
        self._free: List[int] = list(range(num_pages - 1, -1, -1))
        self._peak = 0
        self._width = max_pages_per_segment if self._fixed_width else min(num_pages, 16)
        self._slots = max_sequences if self._fixed_slots else 4
        S = self._slots * num_kv_heads
        self.page_table: List[Tensor] = [
            torch.zeros((S, self._width), dtype=torch.int32, device=self.device)
            for _ in range(num_layers)]
        self.seg_len: List[Tensor] = [torch.zeros(S, dtype=torch.int32, device=self.device)
                                      for _ in range(num_layers)]
        # host mirrors: page list and length of every segment of every layer
        self._pages: List[List[List[int]]] = [[[] for _ in range(S)] for _ in range(num_layers)]
        # lengths and capacities (pages * P) as [layer, segment] arrays: a decode step's
        # accounting of a batch is one vectorised operation over every layer, not a Python loop
        # over segments (row l is layer l's view)
        self._len = np.zeros((num_layers, S), dtype=np.int64)
        self._cap = np.zeros((num_layers, S), dtype=np.int64)
        self._seqs: Dict[int, _Seq] = {}
        self._live = np.zeros(self._slots, dtype=bool)     # slot -> live sequence
        self._generation = 0

    # -- accounting ----------------------------------------------------------------------------

    @property
    def pages_free(self) -> int:
        return len(self._free)

    @property
    def pages_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def peak_pages_used(self) -> int:
        """The most pages held at once since the store was built or :meth:`reset_peak`
        (measured after every hand-out)."""
        return self._peak

    def reset_peak(self) -> None:
        self._peak = self.pages_used

    def _note_peak(self) -> None:
        self._peak = max(self._peak, self.pages_used)

    @property
    def bytes_per_page(self) -> int:
        """K and V bytes of one page."""
        return 2 * self.page_size * self.head_dim * self.k_pages.element_size()

    @property
    def sequences(self) -> List[int]:
        return sorted(self._seqs)

    @property
    def max_sequences(self) -> int:
        return self._slots

    @property
    def table_width(self) -> int:
        return self._width

    def pages_held(self, seq_id: int) -> int:
        """Pages held by the sequence, all layers and heads."""
        self._check_seq(seq_id)
        return sum(len(self._pages[l][s]) for l in range(self.num_layers)
                   for s in self._segs(seq_id))

    def pages_in_layer(self, layer: int, seq_ids: Optional[Sequence[int]] = None) -> int:
        """Pages held in ``layer`` by ``seq_ids`` (default: every live sequence)."""
        seq_ids = self.sequences if seq_ids is None else self._check_seqs(seq_ids)
        return sum(len(self._pages[layer][s]) for q in seq_ids for s in self._segs(q))

    def bytes_held(self, seq_id: int) -> int:
        """K/V bytes held by the sequence (its pages, all layers)."""
        return self.pages_held(seq_id) * self.bytes_per_page

    def lengths(self, layer: int, seq_id: int) -> List[int]:
        """Host copy of the sequence's per-head lengths in ``layer`` (no device read)."""
        self._check_seq(seq_id)
        return [int(self._len[layer][s]) for s in self._segs(seq_id)]

    def is_compressed(self, layer: int, seq_id: int) -> bool:
        self._check_seq(seq_id)
        return self._seqs[seq_id].compressed[layer]

    def segment_kv(self, layer: int, seq_id: int, head: int) -> Tuple[Tensor, Tensor]:
        """The valid rows ``[len, D]`` of one segment, gathered from its pages (a copy; for
        inspection and tests)."""
        self._check_seq(seq_id)
        s = seq_id * self.num_kv_heads + head
        n, pages = self._len[layer][s], self._pages[layer][s]
        idx = torch.tensor(pages, dtype=torch.int64, device=self.device)
        k = self.k_pages.index_select(0, idx).reshape(-1, self.head_dim)[:n]
        v = self.v_pages.index_select(0, idx).reshape(-1, self.head_dim)[:n]
        return k, v

    # -- sequences -----------------------------------------------------------------------------

    def add_sequence(self) -> int:
        """Take a free sequence slot (lowest first) and return its id. Holds no page yet."""
        free_slots = [q for q in range(self._slots) if q not in self._seqs]
        if not free_slots:
            if self._fixed_slots:
                raise RuntimeError(f"adakv: all {self._slots} sequence slots are in use "
                                   f"(max_sequences={self._slots})")
            self._grow(slots=2 * self._slots)
            free_slots = [q for q in range(self._slots) if q not in self._seqs]
        q = free_slots[0]
        self._live[q] = True
        self._generation += 1
        self._seqs[q] = _Seq(self._generation, [False] * self.num_layers, [0] * self.num_layers)
        return q

    def free_sequence(self, seq_id: int) -> None:
        """Give every page of the sequence back; its lengths become 0 and table rows 0."""
        self._check_seq(seq_id)
        segs = list(self._segs(seq_id))
        for l in range(self.num_layers):
            for s in segs:
                self._release(self._pages[l][s])
                self._set_pages(l, s, [])
                self._len[l][s] = 0
            r0, r1 = segs[0], segs[-1] + 1
            self.page_table[l][r0:r1].zero_()
            self.seg_len[l][r0:r1].zero_()
        del self._seqs[seq_id]
        self._live[seq_id] = False

    def fork_sequence(self, seq_id: int) -> int:
        """A new sequence holding a copy of ``seq_id``'s rows in every layer and head (lengths,
        eviction state), in pages of its own: appends to either never touch the other. Host
        hand-out of as many pages as ``seq_id`` holds, then one device copy of those pages
        (K and V). All-or-nothing: :class:`OutOfPages` (store unchanged) if they do not fit.
        Returns the new sequence id (the lowest free slot)."""
        self._check_seq(seq_id)
        src = list(self._segs(seq_id))
        need = sum(len(self._pages[l][s]) for l in range(self.num_layers) for s in src)
        if need > len(self._free):
            raise OutOfPages(need, len(self._free), f"forking sequence {seq_id}")
        q = self.add_sequence()          # may add slots: tables are read after it
        dst = list(self._segs(q))
        old: List[int] = []
        new: List[int] = []
        for l in range(self.num_layers):
            for s, d in zip(src, dst):
                pages = [self._free.pop() for _ in self._pages[l][s]]
                old += self._pages[l][s]
                new += pages
                self._set_pages(l, d, pages)
                self._len[l][d] = self._len[l][s]
            self._push_rows(l, dst)
            self.seg_len[l][dst[0]:dst[-1] + 1].copy_(self.seg_len[l][src[0]:src[-1] + 1])
        self._note_peak()
        if new:
            o = torch.tensor(old, dtype=torch.int64).to(self.device, non_blocking=True)
            n = torch.tensor(new, dtype=torch.int64).to(self.device, non_blocking=True)
            for pool in (self.k_pages, self.v_pages):
                pool.index_copy_(0, n, pool.index_select(0, o))
        st = self._seqs[seq_id]
        self._seqs[q].compressed = list(st.compressed)
        return q

    # -- page hand-out (host only) -------------------------------------------------------------

    def reserve(self, seq_ids: Sequence[int], T: int, layers: Optional[Sequence[int]] = None
                ) -> int:
        """Hand out pages so that every segment of ``seq_ids`` can take ``T`` more tokens in
        every layer of ``layers`` (default all). Host work (one vectorised test over the
        layers and segments; a Python loop only over the segments that need pages) plus one
        small host->device copy of the changed table rows per layer (no device read).
        All-or-nothing: raises :class:`OutOfPages` (store unchanged) if the free list is too
        short. Returns the number of pages handed out."""
        seq_ids = self._check_seqs(seq_ids)
        if not is_int(T, 0):
            raise ValueError(f"T must be an int >= 0, got {T!r}")
        lay = self._layer_array(layers)
        P = self.page_size
        width = self._width
        idx = self._seg_array(seq_ids)
        lens = self._len[np.ix_(lay, idx)]
        longest = int(lens.max()) if lens.size else 0
        if T > _INT32_MAX - longest:
            raise ValueError(f"adakv: reserving T={T} more tokens would make a segment "
                             f"{longest} + {T} rows long; at most 2^31 - 1 are supported")
        li, si = np.nonzero(lens + T > self._cap[np.ix_(lay, idx)])   # segments needing pages
        if li.size == 0:
            return 0
        L_, S_ = lay[li], idx[si]                       # grouped by layer (row-major nonzero)
        have = self._cap[L_, S_] // P                   # pages held (cap = pages * P)
        want = -(-(lens[li, si] + T) // P)
        n = want - have
        needed = int(n.sum())
        if needed > len(self._free):
            raise OutOfPages(needed, len(self._free),
                             f"reserving {T} token(s) for sequence(s) {list(seq_ids)}")
        self._ensure_width(max(width, int(want.max())))
        # hand out: the free list is a stack (pop order = reversed tail)
        take = self._free[len(self._free) - needed:][::-1]
        del self._free[len(self._free) - needed:]
        self._note_peak()
        ends = np.cumsum(n)
        starts = ends - n
        for l, s_, a, e in zip(L_.tolist(), S_.tolist(), starts.tolist(), ends.tolist()):
            self._pages[l][s_].extend(take[a:e])
        self._cap[L_, S_] = want * P
        # device tables: only the new entries, one scatter per touched layer
        rep = np.repeat(np.arange(li.size), n)
        cols = have[rep] + (np.arange(needed) - starts[rep])
        vals = np.asarray(take, dtype=np.int32)
        lay_of = L_[rep]
        bounds = np.flatnonzero(np.diff(lay_of)) + 1
        for part in np.split(np.arange(needed), bounds):
            l = int(lay_of[part[0]])
            at = (to_device(torch.from_numpy(S_[rep[part]]), self.device),
                  to_device(torch.from_numpy(cols[part]), self.device))
            self.page_table[l].index_put_(at, to_device(torch.from_numpy(vals[part]),
                                                        self.device))
        return needed

    # -- decode --------------------------------------------------------------------------------

    def batch_table(self, layer: int, seq_ids: Sequence[int], pad_to: Optional[int] = None
                    ) -> Tuple[Tensor, Tensor]:
        """``(page_table [B' * Hk, width], seg_len [B' * Hk])`` of ``seq_ids`` in that order,
        for the paged ops. A contiguous ascending run of slots gives views (``append`` through
        them updates the store); any other set gives gathered copies. ``pad_to`` (``>= B``)
        appends empty sequences (table 0, length 0: output 0) for a fixed batch bucket."""
        return self._batch(layer, self._check_seqs(seq_ids), pad_to)[:2]

    def _batch(self, layer: int, seq_ids: List[int], pad_to: Optional[int] = None
               ) -> Tuple[Tensor, Tensor, bool]:
        Hk = self.num_kv_heads
        B = len(seq_ids)
        Bp = B if pad_to is None else pad_to
        if Bp < B:
            raise ValueError(f"pad_to={pad_to} < {B} sequences")
        q0 = seq_ids[0]
        if Bp == B and list(seq_ids) == list(range(q0, q0 + B)):
            return (self.page_table[layer][q0 * Hk:(q0 + B) * Hk],
                    self.seg_len[layer][q0 * Hk:(q0 + B) * Hk], True)
        idx = self.segment_index(seq_ids)
        table = self.page_table[layer].index_select(0, idx)
        sl = self.seg_len[layer].index_select(0, idx)
        if Bp > B:
            table = torch.cat([table, table.new_zeros(((Bp - B) * Hk, table.shape[1]))])
            sl = torch.cat([sl, sl.new_zeros((Bp - B) * Hk)])
        return table, sl, False

    def _indexed(self, layer: int, seq_ids: List[int], pad_to: Optional[int] = None
                 ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """``(page_table, seg_len, segment_index)`` for the indexed paged ops: views of a
        contiguous ascending run of slots (index ``None``), else the whole tables and the
        batch's segment index (``-1`` for ``pad_to`` rows): no gather, no scatter back."""
        Hk = self.num_kv_heads
        B = len(seq_ids)
        q0 = seq_ids[0]
        if (pad_to is None or pad_to == B) and list(seq_ids) == list(range(q0, q0 + B)):
            return (self.page_table[layer][q0 * Hk:(q0 + B) * Hk],
                    self.seg_len[layer][q0 * Hk:(q0 + B) * Hk], None)
        return self.page_table[layer], self.seg_len[layer], self.segment_index(seq_ids, pad_to)

    def append(self, layer: int, seq_ids: Sequence[int], k_new: Tensor, v_new: Tensor) -> None:
        """Append ``k_new``, ``v_new [B, Hk, T, D]`` (row ``b`` = ``seq_ids[b]``) at the end of
        every segment of ``layer``. Pages missing for these ``T`` tokens are handed out first
        (``reserve`` of this layer; :class:`OutOfPages` before any device work)."""
        seq_ids = self._check_seqs(seq_ids)
        self._check_kv(k_new, v_new, len(seq_ids), "k_new")
        T = k_new.shape[2]
        self.reserve(seq_ids, T, layers=[layer])
        self.append_reserved(layer, seq_ids, k_new, v_new)
        self.advance(layer, seq_ids, T)

    def append_reserved(self, layer: int, seq_ids: Sequence[int], k_new: Tensor,
                        v_new: Tensor) -> None:
        """The device half of :meth:`append`: ``paged_append_`` only, no host bookkeeping and no
        page hand-out (the caller ran ``reserve`` and runs or ran ``advance``). For a
        contiguous ascending run of slots it is pure tensor work on views of the store's
        tables (traceable by ``torch.compile``, capturable in a CUDA graph)."""
        table, sl, idx = self._indexed(layer, list(seq_ids))
        _ops.paged_append_(self.k_pages, self.v_pages, table, sl, k_new.contiguous(),
                           v_new.contiguous(), segment_index=idx)

    def advance(self, layer: Optional[int], seq_ids: Sequence[int], T: int) -> None:
        """The host half of :meth:`append`: the host lengths of the sequences' segments in
        ``layer`` (``None``: every layer) grow by ``T`` (their pages must be there:
        ``reserve``)."""
        idx = self._seg_array(seq_ids)
        lay = self._layer_array(None if layer is None else [layer])
        at = np.ix_(lay, idx)
        n = self._len[at] + T
        if (n > self._cap[at]).any():
            raise RuntimeError(f"adakv: advance by {T} tokens past the pages reserved for "
                               f"sequence(s) {list(seq_ids)} in layer {layer} (call reserve "
                               f"first)")
        self._len[at] = n

    def attend(self, layer: int, seq_ids: Sequence[int], query: Tensor,
               scale: Optional[float] = None, pad_to: Optional[int] = None) -> Tensor:
        """``paged_decode_attention`` of ``query [B, Hq, T, D]`` over the sequences' segments
        of ``layer`` (the ``T`` newest tokens, already appended, are the query tokens: causal
        among themselves). Returns ``[B, Hq, T, D]``."""
        seq_ids = self._check_seqs(seq_ids)
        B = len(seq_ids)
        if query.dim() != 4 or query.shape[0] != B:
            raise ValueError(f"query must be [B={B}, Hq, T, D], got {tuple(query.shape)}")
        if pad_to is not None and pad_to < B:
            raise ValueError(f"pad_to={pad_to} < {B} sequences")
        table, sl, idx = self._indexed(layer, seq_ids, pad_to)
        q = query.contiguous()
        if pad_to is not None and pad_to > B:
            q = torch.cat([q, q.new_zeros((pad_to - B,) + tuple(q.shape[1:]))])
        out = _ops.paged_decode_attention(q, self.k_pages, self.v_pages, table, sl, scale,
                                          segment_index=idx)
        return out[:B]

    # -- chunked prefill -----------------------------------------------------------------------

    def prefill_chunk(self, layer: int, seq_id: int, k_chunk: Tensor, v_chunk: Tensor) -> None:
        """Append a prompt chunk ``k_chunk``, ``v_chunk [1, Hk, n, D]`` (full K/V, after RoPE)
        to the sequence's segments of ``layer`` (transient pages until ``finish_prefill``)."""
        self._check_seq(seq_id)
        if self._seqs[seq_id].compressed[layer]:
            raise RuntimeError(f"adakv: layer {layer} of sequence {seq_id} was already evicted "
                               f"(finish_prefill); use append() for decode tokens")
        self.append(layer, [seq_id], k_chunk, v_chunk)

    def prompt_kv(self, layer: int, seq_ids) -> Tuple[Tensor, Tensor]:
        """The whole prompt so far of one sequence (an int) or of several (a list, all with the
        same prompt length) in ``layer``, as contiguous ``[B, Hk, N, D]`` K and V (gathered
        from the pages: a copy of ``2 * B * Hk * N * D`` elements)."""
        seq_ids = self._check_seqs(seq_ids)
        segs = [s for q in seq_ids for s in self._segs(q)]
        lens = {int(self._len[layer][s]) for s in segs}
        if len(lens) != 1 or any(self._seqs[q].compressed[layer] for q in seq_ids):
            raise RuntimeError(f"adakv: layer {layer} of sequence(s) {seq_ids} holds no raw "
                               f"prompt of one length (already evicted, or lengths differ)")
        N = lens.pop()
        B, Hk, D, P = len(seq_ids), self.num_kv_heads, self.head_dim, self.page_size
        npg = -(-N // P)
        idx = self._batch(layer, seq_ids)[0][:, :npg].reshape(-1).to(torch.int64)
        k = self.k_pages.index_select(0, idx).view(B, Hk, npg * P, D)[:, :, :N]
        v = self.v_pages.index_select(0, idx).view(B, Hk, npg * P, D)[:, :, :N]
        return k.contiguous(), v.contiguous()

    def prefill_attention(self, layer: int, seq_id: int, q_chunk: Tensor,
                          scale: Optional[float] = None, impl: str = "sdpa") -> Tensor:
        """Causal attention of the newest chunk ``q_chunk [1, Hq, n, D]`` over the prompt so
        far (its chunk already appended with ``prefill_chunk``): query ``t`` sits at position
        ``N - n + t`` and sees keys ``<= N - n + t``. Returns ``[1, Hq, n, D]``.

        ``impl="sdpa"``: gather the prompt K/V (``prompt_kv``) and call torch SDPA with the
        causal offset (cost per chunk: a copy of the whole prompt so far, so ``O(N^2 / n)``
        copied over a prompt). ``impl="paged"``: ``paged_decode_attention`` straight over the
        pages (its ``T`` newest tokens are causal among themselves: exactly this mask)."""
        if impl == "paged":
            return self.attend(layer, [seq_id], q_chunk, scale=scale)
        if impl != "sdpa":
            raise ValueError(f"impl must be 'sdpa' or 'paged', got {impl!r}")
        k, v = self.prompt_kv(layer, seq_id)
        n, N = q_chunk.shape[2], k.shape[2]
        Hq, Hk = q_chunk.shape[1], self.num_kv_heads
        if Hq % Hk or n > N:
            raise ValueError(f"q_chunk [1, Hq, n, D] needs Hq % {Hk} == 0 and n <= {N}")
        return chunk_attention(q_chunk, k, v, scale).transpose(1, 2)

    def finish_prefill(self, layer: int, seq_id: int, q_window: Optional[Tensor] = None, *,
                       method: str = "ada_snapkv", budget: Optional[int] = None,
                       window: Optional[int] = None, alpha: float = 0.2,
                       pooling: str = "max", kernel_size: int = 7, gqa_reduce: str = "mean",
                       aggregate: str = "mean", rounding: str = "exact", n_sink: int = 4,
                       pyramid_beta: int = 20, pyramid_exact_mean: bool = False,
                       layer_budget: Optional[int] = None, scale: Optional[float] = None,
                       o_proj_weight: Optional[Tensor] = None,
                       as_written: bool = False) -> Dict[str, object]:
        """Score and evict the sequence's prompt in ``layer``, exactly as the one-shot path.

        ``q_window [1, Hq, W, D]``: the last ``W = min(window, N)`` prompt queries (after RoPE;
        not needed for ``full`` / ``streaming``, which then take ``W = min(window, N)``).
        ``method`` and the settings are those of ``AdaKVCache`` (one
        :class:`adakv_ops.policy.EvictionPolicy` decides for both): ``full`` keeps all ``N``;
        ``streaming`` the first ``n_sink`` prefix tokens + most recent (``budget`` prefix
        tokens) + window; ``snapkv`` / ``ada_snapkv`` / ``pyramid`` / ``ada_pyramid`` run
        ``score -> allocate -> select`` (pyramid: ``budget`` spread over the store's layers by
        ``pyramid_budgets``; ``layer_budget`` overrides ``C_l``); ``criticalkv`` /
        ``ada_criticalkv`` / ``defensivekv`` also weigh the values and need the layer's
        ``o_proj_weight [hidden, Hq * D]`` (``as_written``: the authors' forms). The kept rows
        are then written
        with ``paged_compact_`` (:meth:`write_kept`) into fresh pages; the transient prompt
        pages are freed first (the prompt was gathered into a contiguous copy), so this never
        needs more pages than the prompt held. One device->host read (``kept_count``).
        Returns ``{"budget": C_l, "window": W, "lengths": [per head]}``."""
        self._check_seq(seq_id)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        key, value = self.prompt_kv(layer, seq_id)
        N = key.shape[2]
        if N == 0:
            raise RuntimeError(f"adakv: finish_prefill of sequence {seq_id} layer {layer} "
                               f"before any prompt chunk")
        if q_window is not None:
            q_window = q_window.contiguous()
            W = q_window.shape[2]
            if window is not None and W != min(window, N):
                raise ValueError(f"q_window has W={W} queries, expected min(window={window}, "
                                 f"N={N}) = {min(window, N)}")
        elif method in ("full", "streaming"):
            if window is None and method == "streaming":
                raise ValueError("streaming needs window= (or q_window)")
            W = min(window if window is not None else N, N)
        else:
            raise ValueError(f"method {method!r} needs q_window")
        if method != "full" and budget is None and layer_budget is None:
            raise ValueError(f"method {method!r} needs budget=")
        policy = EvictionPolicy(
            method=method, budget=budget if budget is not None else 0, window=W, alpha=alpha,
            pooling=pooling, kernel_size=kernel_size, gqa_reduce=gqa_reduce,
            aggregate=aggregate, rounding=rounding, n_sink=n_sink, pyramid_beta=pyramid_beta,
            pyramid_exact_mean=pyramid_exact_mean, as_written=as_written)
        if policy.method == "layer_defensivekv":
            raise ValueError("adakv: layer_defensivekv selects across layers; finish_prefill "
                             "evicts one layer (use AdaKVCache)")
        C = (layer_budget if layer_budget is not None and method != "full"
             else policy.layer_budget(layer, self.num_layers, N, W))
        kept = policy.keep(q_window if policy.needs_queries else None, key, C, scale=scale,
                           value=value if policy.needs_values else None,
                           o_proj_weight=o_proj_weight)
        lens = self.write_kept(layer, [seq_id], key, value, kept)
        return {"budget": kept.C, "window": W, "lengths": lens}

    def write_kept(self, layer: int, seq_ids: Sequence[int], key: Tensor, value: Tensor,
                   kept: Kept, key_start: Optional[Tensor] = None,
                   host_key_start: Optional[Sequence[int]] = None) -> List[int]:
        """Make the sequences' segments of ``layer`` hold exactly the eviction result ``kept``
        of ``key``, ``value [B, Hk, N, D]`` (row ``b`` = ``seq_ids[b]``; ``key_start [B]``
        left padding): any rows they held are dropped (their pages freed first: the source is
        ``key`` / ``value``, never the pages), pages are handed out for
        ``kept_count + min(window, N - key_start)`` rows per head and ``paged_compact_`` writes
        them. One device->host read (``kept_count``, and ``key_start`` unless
        ``host_key_start`` gives it). Raises :class:`OutOfPages` (store unchanged) when the
        free list plus the freed pages are too short. Returns the new lengths, per segment."""
        seq_ids = self._check_seqs(seq_ids)
        B, Hk, N, _ = key.shape
        if B != len(seq_ids) or Hk != self.num_kv_heads:
            raise ValueError(f"key must be [B={len(seq_ids)}, Hk={self.num_kv_heads}, N, D], "
                             f"got {tuple(key.shape)}")
        counts = kept.kept_count.reshape(-1)
        if key_start is not None and host_key_start is None:
            both = torch.cat([counts.to(torch.int64), key_start.reshape(-1).to(torch.int64)])
            host = both.tolist()                          # the one device->host read
            counts_h, ks_h = host[:B * Hk], host[B * Hk:]
        else:
            counts_h = counts.tolist()                    # the one device->host read
            ks_h = list(host_key_start) if host_key_start is not None else [0] * B
        segs = [s for q in seq_ids for s in self._segs(q)]
        new_lens = [c + min(kept.window, N - ks_h[i // Hk]) for i, c in enumerate(counts_h)]
        P = self.page_size
        want = [-(-n // P) for n in new_lens]
        freed = sum(len(self._pages[layer][s]) for s in segs)
        if sum(want) > len(self._free) + freed:
            raise OutOfPages(sum(want) - freed, len(self._free),
                             f"the kept rows of sequence(s) {seq_ids} in layer {layer}")
        self._ensure_width(max(want))
        for s in segs:
            self._release(self._pages[layer][s])
            self._set_pages(layer, s, [])
        for s, n in zip(segs, want):
            self._set_pages(layer, s, [self._free.pop() for _ in range(n)])
        self._note_peak()
        self._push_rows(layer, segs)
        table, sl, is_view = self._batch(layer, seq_ids)
        _ops.paged_compact_(self.k_pages, self.v_pages, table, sl, key.contiguous(),
                            value.contiguous(), kept.kept_idx.contiguous(),
                            kept.kept_count.contiguous(), kept.window, key_start)
        if not is_view:
            self.seg_len[layer].index_copy_(0, self.segment_index(seq_ids).long(), sl)
        for s, n in zip(segs, new_lens):
            self._len[layer][s] = n
        for q in seq_ids:
            st = self._seqs[q]
            st.compressed[layer] = True
            st.epoch[layer] += 1
        return new_lens

    def grow_pool(self, num_pages: int) -> None:
        """Enlarge the pool to ``num_pages`` pages (one device copy of the pool; ``k_pages`` /
        ``v_pages`` get new addresses, tables and page indices stay valid)."""
        if not is_int(num_pages, self.num_pages + 1):
            raise ValueError(f"num_pages must be an int > {self.num_pages}, got {num_pages!r}")
        if num_pages > _INT32_MAX:
            raise ValueError(f"num_pages must be <= 2^31 - 1, got {num_pages}")
        shape = (num_pages, self.page_size, self.head_dim)
        for name in ("k_pages", "v_pages"):
            old = getattr(self, name)
            new = old.new_zeros(shape)
            new[:self.num_pages] = old
            setattr(self, name, new)
        self._free[:0] = range(num_pages - 1, self.num_pages - 1, -1)   # handed out last
        self.num_pages = num_pages

    # -- snapshots -----------------------------------------------------------------------------

    def snapshot(self, seq_id: int) -> StoreSnapshot:
        """Record the sequence's lengths and page counts (host integers, no device work)."""
        self._check_seq(seq_id)
        st = self._seqs[seq_id]
        segs = list(self._segs(seq_id))
        return StoreSnapshot(
            seq_id, st.generation, tuple(st.epoch),
            tuple(tuple(int(self._len[l][s]) for s in segs) for l in range(self.num_layers)),
            tuple(tuple(len(self._pages[l][s]) for s in segs) for l in range(self.num_layers)),
            tuple(st.compressed))

    def check_restorable(self, seq_id: int, snap: StoreSnapshot) -> None:
        """Raise (changing nothing) unless :meth:`restore` of ``snap`` into ``seq_id`` is valid:
        the same sequence (not a later owner of its slot), not evicted again since."""
        self._check_seq(seq_id)
        st = self._seqs[seq_id]
        if snap.seq_id != seq_id or snap.generation != st.generation:
            raise ValueError(f"adakv: snapshot of another sequence (or of a freed slot) "
                             f"restored into sequence {seq_id}")
        if tuple(st.epoch) != snap.epochs:
            raise ValueError("adakv: the sequence was evicted again (finish_prefill) after "
                             "the snapshot; it cannot be restored")

    def restore(self, seq_id: int, snap: StoreSnapshot) -> None:
        """Put the sequence back to ``snap``: lengths restored (device ``seg_len`` too), pages
        handed out after the snapshot go back to the free list. Valid any number of times while
        the sequence lives and no ``finish_prefill`` ran on it since the snapshot."""
        self.check_restorable(seq_id, snap)
        st = self._seqs[seq_id]
        segs = list(self._segs(seq_id))
        for l in range(self.num_layers):
            for s, n, npg in zip(segs, snap.lens[l], snap.n_pages[l]):
                pages = self._pages[l][s]
                if len(pages) < npg or self._len[l][s] < n:
                    raise RuntimeError("adakv: inconsistent snapshot (segment shrank)")
                self._release(pages[npg:])
                self._set_pages(l, s, pages[:npg])
                self._len[l][s] = n
            self._push_rows(l, segs)
            r0 = segs[0]
            self.seg_len[l][r0:r0 + len(segs)].copy_(
                torch.tensor(snap.lens[l], dtype=torch.int32), non_blocking=True)
        st.compressed = list(snap.compressed)

    # -- internals -----------------------------------------------------------------------------

    def _segs(self, seq_id: int) -> range:
        Hk = self.num_kv_heads
        return range(seq_id * Hk, (seq_id + 1) * Hk)

    def _set_pages(self, layer: int, s: int, pages: List[int]) -> None:
        self._pages[layer][s] = pages
        self._cap[layer][s] = len(pages) * self.page_size

    def _seg_array(self, seq_ids: Sequence[int]) -> np.ndarray:
        """The segment indices of ``seq_ids`` (in order) as an int64 array."""
        Hk = self.num_kv_heads
        q = np.asarray(seq_ids, dtype=np.int64)
        return (q[:, None] * Hk + np.arange(Hk, dtype=np.int64)[None, :]).reshape(-1)

    def segment_index(self, seq_ids: Sequence[int], pad_to: Optional[int] = None) -> Tensor:
        """The table rows of ``seq_ids``' segments in order (``q * Hk + h``), then ``-1`` for
        the segments of ``pad_to - B`` padding sequences: ``[max(B, pad_to) * Hk]`` int32 on the
        store's device (the ``segment_index`` of the paged ops; ``index_select`` takes it as
        well when there is no padding)."""
        idx = self._seg_array(seq_ids)
        if pad_to is not None and pad_to > len(seq_ids):
            idx = np.concatenate([idx, np.full((pad_to - len(seq_ids)) * self.num_kv_heads, -1)])
        return to_device(torch.from_numpy(idx.astype(np.int32)), self.device)

    def _ensure_width(self, width: int) -> None:
        """Tables at least ``width`` pages wide (doubling, capped at the pool), before any
        page is handed out; with a fixed width, a ``RuntimeError`` naming it."""
        if width <= self._width:
            return
        if self._fixed_width:
            raise RuntimeError(
                f"adakv: a segment would need {width} pages, more than "
                f"max_pages_per_segment={self._width} ({width * self.page_size} tokens)")
        self._grow(width=min(max(width, 2 * self._width), self.num_pages))

    def _check_seq(self, seq_id) -> None:
        if not isinstance(seq_id, int) or seq_id not in self._seqs:
            raise KeyError(f"adakv: no live sequence {seq_id!r} (live: {self.sequences})")

    def _check_seqs(self, seq_ids) -> List[int]:
        seq_ids = [seq_ids] if isinstance(seq_ids, int) else list(seq_ids)
        if not seq_ids:
            raise ValueError("adakv: empty list of sequences")
        # vectorised for the common case (a decode batch of hundreds, every layer, every step);
        # anything unusual is checked one by one for the precise error
        a = np.asarray(seq_ids)
        if a.dtype.kind != "i" or a.ndim != 1 or int(a.min()) < 0 \
                or int(a.max()) >= self._live.size or not self._live[a].all():
            for q in seq_ids:
                self._check_seq(q)
        if np.unique(a).size != a.size:
            raise ValueError(f"adakv: repeated sequence in {seq_ids}")
        return seq_ids

    def _layer_array(self, layers: Optional[Sequence[int]]) -> np.ndarray:
        if layers is None:
            return np.arange(self.num_layers, dtype=np.int64)
        lay = np.asarray(list(layers), dtype=np.int64).reshape(-1)
        if lay.size and (int(lay.min()) < 0 or int(lay.max()) >= self.num_layers):
            raise ValueError(f"adakv: layers must be in [0, {self.num_layers}), got "
                             f"{lay.tolist()}")
        return lay

    def _check_kv(self, k: Tensor, v: Tensor, B: int, name: str) -> None:
        want = (B, self.num_kv_heads)
        if k.dim() != 4 or tuple(k.shape[:2]) != want or k.shape[3] != self.head_dim \
                or k.shape != v.shape or k.shape[2] < 1:
            raise ValueError(f"{name} and its values must both be [B={B}, Hk="
                             f"{self.num_kv_heads}, T>=1, D={self.head_dim}], got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise ValueError(f"{name} dtype {k.dtype} / {v.dtype} != store dtype {self.dtype}")

    def _release(self, pages: List[int]) -> None:
        # reversed so the next hand-out takes them back in the same order
        self._free.extend(reversed(pages))

    def _push_rows(self, layer: int, segs: Sequence[int]) -> None:
        """Copy the host page lists of ``segs`` into the device table (one host->device copy
        from a fresh pageable tensor, ``non_blocking``: no stream sync)."""
        segs = list(segs)
        host = np.zeros((len(segs), self._width), dtype=np.int32)
        for i, s in enumerate(segs):
            p = self._pages[layer][s]
            host[i, :len(p)] = p
        rows = to_device(torch.from_numpy(host), self.device)
        table = self.page_table[layer]
        if segs == list(range(segs[0], segs[0] + len(segs))):
            table[segs[0]:segs[0] + len(segs)].copy_(rows)
        else:
            idx = to_device(torch.tensor(segs, dtype=torch.int64), self.device)
            table.index_copy_(0, idx, rows)

    def _grow(self, width: Optional[int] = None, slots: Optional[int] = None) -> None:
        """Widen the tables and / or add sequence slots (new device tensors: addresses change;
        host decision, before any op runs)."""
        width = self._width if width is None else width
        slots = self._slots if slots is None else slots
        Hk = self.num_kv_heads
        S_old, S = self._slots * Hk, slots * Hk
        for l in range(self.num_layers):
            t = torch.zeros((S, width), dtype=torch.int32, device=self.device)
            t[:S_old, :self._width] = self.page_table[l]
            sl = torch.zeros(S, dtype=torch.int32, device=self.device)
            sl[:S_old] = self.seg_len[l]
            self.page_table[l], self.seg_len[l] = t, sl
            self._pages[l].extend([] for _ in range(S - S_old))
        grow = np.zeros((self.num_layers, S - S_old), dtype=np.int64)
        self._len = np.concatenate([self._len, grow], axis=1)
        self._cap = np.concatenate([self._cap, grow], axis=1)
        self._live = np.concatenate([self._live, np.zeros(slots - self._slots, dtype=bool)])
        self._width, self._slots = width, slots

    def __repr__(self):
        return (f"PagedKVStore(layers={self.num_layers}, Hk={self.num_kv_heads}, "
                f"D={self.head_dim}, P={self.page_size}, pages={self.pages_used}/"
                f"{self.num_pages} used, sequences={self.sequences})")
