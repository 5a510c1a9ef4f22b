"""The part of an evicted (full-attention) cache layer that does not depend on its storage.

:class:`EvictedLayer` is a ``transformers`` ``CacheLayerMixin``. It owns the protocol with the
attention function (``update`` posts the layer in the model's mailbox, the attention function
claims it with an identity check on ``key``), the prompt flow (one-shot or chunked), the host
accounting of decode tokens (``prepare_decode`` for compiled forwards) and the settings. The
storage subclasses (:class:`adakv_ops.hf.flat.FlatLayer`,
:class:`adakv_ops.hf.paged.PagedLayer`) only write and read rows:

* ``_store_prompt(q_window, key, value, key_start, scale)``: evict a whole prompt
  ``[B, H, N, D]`` (the one :class:`adakv_ops.policy.EvictionPolicy` decides what is kept);
* ``_hold_chunk(key, value)`` -> the prompt so far as ``[B, H, N, D]`` (chunk-major chunked
  prefill: the layer keeps the prompt's full K/V until the last chunk);
* ``_make_room(T)``, ``_append(key, value)``, ``_decode_attention(query, scale)``;
* ``_snapshot`` / ``_restore``, ``nbytes``, ``evicted``.

Prompt flow. A forward into a layer that holds no evicted cache is part of the prompt.
``PrefillControl.final`` (set by :meth:`AdaKVCache.prefill`; ``True`` otherwise, e.g. in
``generate``) says whether it is the prompt's last chunk. A one-shot prompt (final, nothing
held) is attended by the original attention with the model's mask and evicted straight from
the forward's K/V; chunks are held, attended by the original attention over the prompt so far
(``get_mask_sizes`` reports its length), and the last one is evicted from the held prompt with
the last ``window`` queries of all chunks: the kept sets are the one-shot ones.

Prefill orders (``PrefillControl.layer_major``). Chunk-major (the model runs chunk after chunk,
every layer holds its prompt until the last chunk): chunks are held by the storage
(``_hold_chunk``: pages, or a growing ``torch.cat``). Layer-major (the cache runs one decoder
layer's chunks at a time, see ``AdaKVCache.prefill``): the layer holds its chunks in one
contiguous ``[B, Hk, N, D]`` K and V buffer of its own, allocated at its first chunk for the
whole prompt (``PrefillControl.prompt_len``) and dropped once it is evicted; ``update``
returns views ``[:, :, :held + n]`` of it, and the last chunk evicts from the whole buffer
through the one-shot path (``_evict_prompt`` -> ``_store_prompt``), so the raw prompt never
enters the storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from .. import ops as _ops
from ..cascade import LayerCascade, true_positions
from ..policy import EvictionPolicy, Kept
from ..store import chunk_attention
from .registration import is_compiling, key_start_from_mask, mark_static, o_proj_weight

__all__ = ["EvictedLayer", "LayerSettings", "PrefillControl"]

INT32_MAX = 2**31 - 1  # every row index / segment start / page index is int32


@dataclass(frozen=True)
class LayerSettings:
    """What every evicted layer of one cache shares (frozen after construction)."""

    policy: EvictionPolicy
    per_query_head: bool
    reserve: int
    max_growth: Optional[int]
    n_full_layers: int
    storage: str
    page_size: int
    num_pages: Optional[int]
    max_batch: Optional[int] = None
    max_seq_len: Optional[int] = None  # fixes the paged tables' width (AdaKVCache docstring)
    shards: Optional[object] = None   # adakv_ops.distributed.HeadShards (tensor parallelism)

    def __getattr__(self, name):  # method, budget, window, alpha, ... read through
        if name != "policy" and "policy" in self.__dict__:
            return getattr(self.__dict__["policy"], name)
        raise AttributeError(name)


@dataclass
class PrefillControl:
    """Set by :meth:`AdaKVCache.prefill` around each chunk's forward."""

    final: bool = True
    lower_right: bool = False  # chunks attend with causal_lower_right (no mask was built)
    prompt_len: int = 0        # layer-major prefill in flight: its N (the buffers' length)
    adding: bool = False      # the forward prefills new batch rows into an evicted cache
    chunk_queries: dict = field(default_factory=dict)  # layer_idx -> last window queries
    cascade: Optional[tuple] = None  # layer_defensivekv: (LayerCascade, layers so far)

    @property
    def layer_major(self) -> bool:
        """One layer's chunks at a time, held in the layer's own buffer."""
        return self.prompt_len > 0


def _chunk_attention(query: Tensor, key: Tensor, value: Tensor, scale) -> tuple[Tensor, None]:
    """A chunk's causal attention over the prompt so far (``store.chunk_attention``: no mask,
    no K/V repeated over the GQA group), returned like the transformers attention functions:
    ``([B, n, Hq, D], None)``."""
    return chunk_attention(query, key, value, scale), None


class EvictedLayer(CacheLayerMixin):
    """One full-attention layer, evicted with the cache's policy (storage in the subclass).

    Host state: ``seen`` (logical length: prompt incl. padding + appended tokens), ``budget``
    (this layer's ``C_l``), ``window`` (``W`` used at prefill), ``n_heads`` (segments per
    row), ``held`` (prompt tokens held by a chunked prefill, 0 otherwise).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, settings: LayerSettings, layer_idx: int, full_rank: int, mailbox: dict,
                 control: PrefillControl):
        super().__init__()
        self.settings = settings
        self.layer_idx = layer_idx
        self.full_rank = full_rank
        self._mailbox = mailbox
        self._control = control
        self._clear()

    def _clear(self) -> None:
        self.seen = 0
        self.held = 0
        self.budget: Optional[int] = None
        self.window: Optional[int] = None
        self.n_heads: Optional[int] = None
        self._batch: Optional[int] = None
        self._scale: Optional[float] = None
        self._pending = None      # (key, value, chunked) of the prompt forward in flight
        self._o_proj: Optional[Tensor] = None   # the o_proj weight seen at prefill
        self._kept_window = 0     # layer_defensivekv: rows kept outright after the prefix
        self._prepaid = 0
        self.n_grow = 0
        self.n_reevict = 0
        self.keys = self.values = None
        self.qbuf: Optional[Tensor] = None
        self._prompt_buf: Optional[tuple[Tensor, Tensor]] = None   # layer-major: raw K, V
        self._clear_storage()

    # -- CacheLayerMixin ----------------------------------------------------------------------

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Prompt (chunks): the prompt held so far plus the new tokens, like DynamicLayer. After
        # eviction a window over the new tokens only: constant while decoding and unused by
        # the AdaKV path.
        return self.held + query_length, 0

    def reset(self) -> None:
        if self._mailbox.get(self.layer_idx) is self:
            del self._mailbox[self.layer_idx]  # an unclaimed prefill entry goes too
        self._control.chunk_queries.pop(self.layer_idx, None)
        self._clear()
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("AdaKVCache does not support crop; use snapshot()/restore()")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("AdaKVCache does not support beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("AdaKVCache does not support batch expansion")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("AdaKVCache does not support batch selection")

    def offload(self):
        raise NotImplementedError("AdaKVCache does not support offloading")

    # -- the mailbox protocol -----------------------------------------------------------------

    def _check_claimed(self) -> None:
        """Raise if the K/V posted by ``update`` were never attended by the AdaKV attention
        function (e.g. after :func:`restore_attention`, or with a model whose attention
        implementation was switched away from ``adakv_*``). Going on would treat the next
        tokens as the prompt and silently drop the real one."""
        posted = self._mailbox.get(self.layer_idx) is self
        if self._pending is None and not posted:
            return
        if posted:
            del self._mailbox[self.layer_idx]
        if self._pending is None:  # a decode step's entry: its attention ran elsewhere
            raise RuntimeError(
                f"adakv: layer {self.layer_idx}: the tokens appended by the last update() were "
                f"never attended by the adakv attention function (was restore_attention() "
                f"called, or the model's attention implementation changed?); its output was "
                f"not computed from this cache. Switch back to the adakv_* implementation (a "
                f"new AdaKVCache(model, ...) does) or reset the cache")
        raise RuntimeError(
            f"adakv: layer {self.layer_idx}: the prefill K/V posted by update() was never "
            f"claimed by the adakv attention function, so the prompt was not evicted (was "
            f"restore_attention() called, or the model's attention implementation changed "
            f"after AdaKVCache was built?). The cache is unusable: call cache.reset() and "
            f"prefill again with the adakv_* attention implementation")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_claimed()
        if not self.evicted or self._control.adding:
            n = key_states.shape[-2]
            if self._control.final and self.held == 0:
                key, value = key_states, value_states          # one-shot prompt
                self._pending = (key, value, False)
            else:
                key, value = self._hold(key_states, value_states)
                self.held += n
                self._pending = (key, value, True)
            self.seen += n
            self._mailbox[self.layer_idx] = self
            return key, value
        self._account(key_states.shape[-2])
        self._append(key_states, value_states)
        self._mailbox[self.layer_idx] = self
        return self.keys, self.values

    def _owns(self, key) -> bool:
        if self._pending is not None:
            return key is self._pending[0]
        return key is self.keys

    def _attend(self, module, query, key, value, attention_mask, original, kwargs):
        """The attention of the forward ``update`` just served (called by the attention
        function once it has claimed this layer)."""
        scale = kwargs.get("scaling")
        if self._pending is not None:
            k, v, chunked = self._pending
            self._pending = None
            if chunked and self._control.lower_right:
                out = _chunk_attention(query, key, value, scale)
            else:
                out = original(module, query, key, value, attention_mask, **kwargs)
            B, _, N, _ = k.shape
            W = min(self.settings.window, N)
            if chunked:
                qs = self._control.chunk_queries
                prev = qs.get(self.layer_idx)
                q = query if prev is None else torch.cat([prev, query], dim=2)
                qs[self.layer_idx] = q[:, :, max(q.shape[2] - self.settings.window, 0):]
                if not self._control.final:
                    return out
                q_window = qs.pop(self.layer_idx)[:, :, -W:]
            else:
                q_window = query[:, :, N - W:]
            self._evict_prompt(q_window, k, v, key_start_from_mask(attention_mask, B, N), scale,
                               o_proj_weight(module))
            return out
        if getattr(module, "attn_logit_softcapping", None) is not None:
            raise NotImplementedError("adakv: attention logit softcapping is not supported")
        q = query.contiguous()
        out = self._decode_attention(q, scale)
        self._after_decode(q)
        return out.transpose(1, 2), None

    def _evict_prompt(self, q_window: Tensor, key: Tensor, value: Tensor,
                      key_start: Optional[Tensor], scale,
                      o_proj: Optional[Tensor] = None) -> None:
        """Evict the whole prompt ``key``/``value [B, Hk, N, D]`` of this layer with the window
        queries ``q_window [B, Hq, W, D]`` (the last ``W = min(window, N)`` prompt tokens);
        ``o_proj``: the attention module's output projection weight (the methods that weigh
        values need it)."""
        s = self.settings
        B, Hk, N, D = key.shape
        Hq, W = q_window.shape[1], q_window.shape[2]
        H = Hq if s.per_query_head else Hk
        self.n_heads = H
        self._batch = B + (self._batch or 0) if self._control.adding else B
        key, value = self._expand(key), self._expand(value)
        C = s.policy.layer_budget(self.full_rank, s.n_full_layers, N, W)
        q_window = q_window.contiguous()
        if s.policy.needs_values and o_proj is None:
            raise ValueError(f"adakv: method {s.method!r} needs the o_proj weight of layer "
                             f"{self.layer_idx}'s attention module (no o_proj found)")
        self._o_proj = o_proj
        self._store_prompt(q_window, key, value, key_start, C, scale)
        self.budget, self.window, self._scale = C, W, scale
        self.held = 0
        self._prompt_buf = None       # layer-major: the raw prompt goes with the forward
        self._after_prompt(q_window)

    def _hold(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Hold a prompt chunk ``[B, Hk, n, D]``; returns the prompt so far. Chunk-major: the
        storage's ``_hold_chunk``. Layer-major: the layer's contiguous buffer (see the module
        docstring), no copy of the prompt so far and no page."""
        if not self._control.layer_major:
            return self._hold_chunk(key, value)
        B, H, n, D = key.shape
        a = self.held
        if self._prompt_buf is None:
            if a != 0:
                raise RuntimeError(f"adakv: layer {self.layer_idx}: a layer-major chunk after "
                                   f"{a} tokens held elsewhere")
            N = self._control.prompt_len
            self._prompt_buf = (key.new_empty((B, H, N, D)),
                                value.new_empty((B, H, N, value.shape[-1])))
        kb, vb = self._prompt_buf
        if kb.shape[:2] != (B, H) or a + n > kb.shape[2]:
            raise RuntimeError(f"adakv: layer {self.layer_idx}: a chunk [{B}, {H}, {n}, {D}] "
                               f"after {a} tokens does not fit the layer-major prompt buffer "
                               f"{list(kb.shape)}")
        kb[:, :, a:a + n].copy_(key)
        vb[:, :, a:a + n].copy_(value)
        return kb[:, :, :a + n], vb[:, :, :a + n]

    def _expand(self, x: Tensor) -> Tensor:
        if self.settings.per_query_head and x.shape[1] != self.n_heads:
            x = x.repeat_interleave(self.n_heads // x.shape[1], dim=1)
        return x.contiguous()

    # -- host accounting of decode tokens -----------------------------------------------------

    def _account(self, T: int) -> None:
        if self._prepaid:
            if self._prepaid != T:
                raise RuntimeError(f"adakv: prepare_decode({self._prepaid}) was called but the "
                                   f"forward appends {T} tokens")
            self._prepaid = 0
            return
        if is_compiling():
            raise RuntimeError("adakv: call cache.prepare_decode(T) before each compiled forward "
                               "(growth and re-eviction run outside compiled code)")
        self._make_room(T)
        self.seen += T

    def _prepare(self, T: int, room_made: bool = False) -> None:
        """Account ``T`` tokens before a forward; ``room_made``: the storage already holds
        room for them (the paged cache reserves every layer at once)."""
        self._check_claimed()
        if not self.evicted:
            return
        if self._prepaid:
            raise RuntimeError("adakv: prepare_decode called twice without a forward in between")
        if not room_made:
            self._make_room(T)
        self.seen += T
        self._prepaid = T

    # -- storage hooks (subclasses) -----------------------------------------------------------

    @property
    def evicted(self) -> bool:
        raise NotImplementedError

    def _clear_storage(self) -> None:
        raise NotImplementedError

    def _hold_chunk(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _store_prompt(self, q_window, key, value, key_start, C, scale) -> None:
        raise NotImplementedError

    def _keep(self, q_window, key, value, key_start, C, scale) -> Kept:
        """The policy's selection for a prompt ``key``/``value [B, H, N, D]`` of this layer.
        ``layer_defensivekv``: merged into the prefill's cascade, whose re-trims of the earlier
        layers are applied here, before this layer writes (so the rows held never exceed the
        final cache plus this layer's prompt)."""
        p = self.settings.policy
        if p.method == "layer_defensivekv":
            ctl = self._control
            if self.full_rank == 0 or ctl.cascade is None:
                slots = p.cascade_slots(C, q_window.shape[2])
                ctl.cascade = (LayerCascade(self.settings.n_full_layers, slots), [])
            cascade, earlier = ctl.cascade
            kept, retrim = p.keep_layer(cascade, q_window, key, value, self._o_proj, C,
                                        key_start, scale, shards=self.settings.shards)
            self._kept_window = kept.window
            rows = self._prefill_rows()
            for layer, keep in zip(earlier, retrim):
                if keep is not None:
                    layer._retrim(keep, rows)
            earlier.append(self)
            if len(earlier) == self.settings.n_full_layers:
                ctl.cascade = None
            return kept
        return p.keep(q_window if p.needs_queries else None, key, C, key_start=key_start,
                      scale=scale, value=value if p.needs_values else None,
                      o_proj_weight=self._o_proj, shards=self.settings.shards)

    def _gather_segments(self, Nmax: int, lens: Tensor, pad: Tensor,
                         rows: Optional[list] = None) -> tuple[Tensor, Tensor]:
        """The stored segments (of batch rows ``rows``, default all) right-aligned into
        ``[B', H, Nmax, D]`` K and V (segment ``s`` has ``lens[s]`` rows and
        ``pad[s] = Nmax - lens[s]`` zero rows in front)."""
        raise NotImplementedError

    def _prefill_rows(self) -> Optional[list]:
        """The batch rows of the prompt being evicted (``None``: the whole batch)."""
        return None

    def _seg_lens(self, rows: Optional[list] = None) -> Tensor:
        """``seg_len`` of the segments of batch rows ``rows`` (default all), batch-major."""
        raise NotImplementedError

    def _retrim(self, keep: Tensor, rows: Optional[list] = None) -> None:
        """Keep only the prefix rows ``keep [B', H, w]`` (over each segment's prefix rows, in
        ascending token order) of the segments of batch rows ``rows`` (default all); the
        window rows stay. Layer-DefensiveKV's cascade calls it on earlier layers."""
        lens = self._seg_lens(rows).to(torch.int64)
        Bp, H, w = keep.shape
        W = self._kept_window         # the rows kept outright after the prefix (0: as_written)
        Nmax = int(lens.max())                                         # one host read
        pad = Nmax - lens
        kp, vp = self._gather_segments(Nmax, lens, pad, rows)
        L = max(Nmax - W, 0)
        # the kept rows' right-aligned columns, ascending, -1 filled (select's format)
        pos = true_positions(keep)[..., :L]
        cols = torch.where(pos < w, pad.view(Bp, H, 1) + pos, torch.full_like(pos, -1))
        kept_idx = torch.full((Bp, H, L), -1, device=keep.device, dtype=torch.int32)
        kept_idx[..., :cols.shape[-1]] = cols.to(torch.int32)
        kept_count = keep.sum(dim=-1).to(torch.int32)
        ks_row = pad.view(Bp, H).amin(dim=1).to(torch.int32).contiguous()
        self._store_reevicted(kp, vp, Kept(kept_idx, kept_count, kept_count, W, self.budget),
                              ks_row, rows)

    def _window_queries(self, rows: Optional[list] = None) -> Tensor:
        """The last ``window`` queries of batch rows ``rows`` (default all), ``[B', Hq, W, D]``."""
        return self.qbuf

    def _store_reevicted(self, key, value, kept, key_start, rows: Optional[list] = None) -> None:
        """Replace the stored segments by ``kept`` of the right-aligned ``key``/``value``."""
        raise NotImplementedError

    # -- decode-time re-eviction (max_growth) -------------------------------------------------

    def _after_prompt(self, q_window: Tensor) -> None:
        s = self.settings
        self.qbuf = None
        if s.max_growth is not None:
            B, Hq, W, D = q_window.shape
            qbuf = q_window.new_zeros((B, Hq, s.window, D))
            qbuf[:, :, s.window - W:] = q_window
            self.qbuf = qbuf
            mark_static(qbuf)

    def _after_decode(self, q: Tensor) -> None:
        if self.qbuf is None:
            return
        T, Wb = q.shape[2], self.qbuf.shape[2]
        if T >= Wb:
            self.qbuf.copy_(q[:, :, T - Wb:])
        else:
            self.qbuf.copy_(torch.cat([self.qbuf[:, :, T:], q], dim=2))

    def _reevict(self, seg_len: Tensor, rows: Optional[list] = None,
                 budget: Optional[int] = None) -> bool:
        """Evict again from the stored segments (of batch rows ``rows``, default all;
        ``seg_len`` holds their lengths) with the same policy: the segments are right-aligned
        into ``[B', H, N', D]`` (per-segment left padding), each scored on its own with the
        last ``window`` queries (the ring ``qbuf``), then budgets / select per row at this
        layer's budget, and the kept rows replace the segments (rows are independent: a row
        re-evicted with others keeps what it keeps alone). One host read (the shortest and
        longest segment) per re-eviction, never per step. Returns False (nothing done) when a
        segment is shorter than the window. ``budget``: the rows' ``C`` (default the layer's).
        """
        s = self.settings
        policy = s.policy
        B, H = (self._batch if rows is None else len(rows)), self.n_heads
        S = B * H
        lens = seg_len.to(torch.int64)
        ext = torch.stack([-lens.min(), lens.max()])
        if s.shards is not None:   # every rank re-evicts at the same shape (its heads differ)
            ext = s.shards.max(ext)
        neg_min, Nmax = ext.tolist()                                   # one host read
        Nmin = -neg_min
        W, C = s.window, (self.budget if budget is None else budget)
        if Nmin < W:
            return False  # a segment shorter than the window (tiny prompt, big append)
        L = Nmax - W
        pad = Nmax - lens                                              # [S]
        kp, vp = self._gather_segments(Nmax, lens, pad, rows)
        ks_seg = pad.to(torch.int32)                                   # per-segment padding
        D = kp.shape[-1]
        if policy.needs_queries:
            qb = self._window_queries(rows)
            Hq = qb.shape[1]
            q = qb.reshape(S, Hq // H, W, D)
        else:
            q = None
        scores = policy.scores(q, kp.reshape(S, 1, Nmax, D), key_start=ks_seg,
                               scale=self._scale).reshape(B, H, L)
        ks_row = ks_seg.view(B, H).amin(dim=1).contiguous()
        if s.shards is not None:   # the row's padding as on one device: over all heads
            ks_row = s.shards.min(ks_row)
        budgets = policy.budgets(scores.contiguous(), C, key_start=ks_row, shards=s.shards)
        # A head never keeps more prefix tokens than it has (its padding columns are -inf).
        finite = (L - ks_seg.view(B, H)).clamp(min=0)
        budgets = torch.minimum(budgets, finite).contiguous()
        kept_idx, kept_count = _ops.select(scores.contiguous(), budgets, key_start=ks_row)
        self._store_reevicted(kp, vp, Kept(kept_idx, kept_count, budgets, W, C), ks_row, rows)
        self.n_reevict += 1
        return True

    def _make_room(self, T: int) -> None:
        raise NotImplementedError

    def _append(self, key: Tensor, value: Tensor) -> None:
        raise NotImplementedError

    def _decode_attention(self, query: Tensor, scale) -> Tensor:
        raise NotImplementedError

    def ensure(self, num_tokens: int) -> None:
        """Make room now for ``num_tokens`` more tokens (fixed addresses afterwards)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError

    def segment_lengths(self) -> list[int]:
        """Lengths of the layer's segments, batch-major (``b * H + h``)."""
        raise NotImplementedError

    def segment_kv(self, s: int) -> tuple[Tensor, Tensor]:
        """The valid rows ``[len, D]`` of segment ``s`` (``b * H + h``), for inspection."""
        raise NotImplementedError

    # -- the decode step's two ops (public: custom loops, tests) ------------------------------

    def append(self, key_states: Tensor, value_states: Tensor) -> None:
        """Append ``[B, Hk, T, D]`` new tokens in place (the device op only: the host
        accounting is ``cache.prepare_decode(T)``'s)."""
        self._append(key_states, value_states)

    def attend(self, query: Tensor, scale: Optional[float] = None) -> Tensor:
        """Decode attention of ``query [B, Hq, T, D]`` over the layer (its ``T`` newest rows
        are the query tokens, causal among themselves) -> ``[B, Hq, T, D]``."""
        return self._decode_attention(query.contiguous(), scale)
