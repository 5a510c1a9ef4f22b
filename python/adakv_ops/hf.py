"""Hugging Face ``transformers`` (5.x) integration: :class:`AdaKVCache`.

```python
from adakv_ops.hf import AdaKVCache
cache = AdaKVCache(model, method="ada_snapkv", budget=256, window=32, alpha=0.2)
out = model.generate(**inputs, cache=cache, max_new_tokens=64, do_sample=False)
cache.kv_bytes()   # bytes held by K/V storage, all layers
```

The cache argument is named ``cache=`` (of ``generate()`` and of the model forward) since
transformers 5.24; ``past_key_values=cache`` works too and is the only name on 5.0 .. 5.23
(on >= 5.24 it emits a FutureWarning: removal is announced for 6.0 in ``generate()`` and for
5.40 in the model forward). Code that must run on the whole range can write
``**cache_kwarg(cache)`` (``{"cache": cache}`` or ``{"past_key_values": cache}``, whichever the
installed transformers takes; :data:`CACHE_KWARG` is the name), as the library's own calls do.
The cache works the same whichever name the caller used.

No model class is patched. The constructor does three things to the *model instance*:

1. registers the attention function ``"adakv_<orig>"`` with ``AttentionInterface`` and the
   original implementation's mask function under the same name with ``AttentionMaskInterface``
   (``<orig>`` is the model's implementation before, ``"sdpa"`` or ``"eager"``), and switches
   the model to it with ``model.set_attn_implementation("adakv_<orig>")``;
2. gives every attention module a ``_adakv_mailbox`` dict (one per model, shared by all its
   layers and by every AdaKVCache built on that model);
3. builds one cache layer per decoder layer: :class:`AdaKVLayer` for full-attention layers,
   ``transformers``' own ``DynamicSlidingWindowLayer`` for sliding-window layers (Gemma 3),
   which keep their bounded cache and are never evicted.

How the attention function reaches the cache (the only link between the two): in
transformers 5 an attention layer calls ``cache.update(k, v, layer_idx)`` (its cache argument,
``past_key_values`` before 5.24) and then
``attention_interface(module, query, key, value, mask, ...)``. ``AdaKVLayer.update`` puts
itself into the model's mailbox under its layer index; the attention function pops
``module._adakv_mailbox[module.layer_idx]`` and uses the AdaKV path only if an entry is there
*and* ``key`` is the very tensor that update returned (identity check, so a stale entry can
never capture another cache's call). Otherwise (a ``DynamicCache``, a ``StaticCache``, no
cache, a sliding layer) it calls the original implementation unchanged, with the mask the
original mask function built: a plain cache on the same model behaves exactly as before.
:func:`restore_attention` switches the model back to its original implementation.

Per full-attention layer:

* Prefill (the layer is empty): ``update`` returns the full K/V; the attention function runs
  the original attention (sdpa/eager, with the model's causal + padding mask), then
  ``adakv_ops.evict(query[:, :, -W:], key, value, C_l, ...)`` (or ``select`` + ``compact`` for
  ``streaming``, ``compact`` alone for ``full``) builds the head-flattened cache and the full
  K/V are dropped (nothing full-length survives the layer's forward). ``key_start`` (left
  padding, ``[B]`` int32) is read from the 4-D mask the model passed (last query row: first
  attended column), without a host sync; no mask means no padding.
* Decode / continuation (``T >= 1`` new tokens): ``update`` appends in place with
  ``adakv_ops.append_`` and returns the flat ``(k_flat, v_flat)``; the attention function runs
  ``adakv_ops.decode_attention`` (the ``T`` new queries attend causally among themselves) and
  returns ``[B, T, Hq, D]`` like sdpa. The mask is not read (padding was dropped at eviction).
* ``get_seq_length()`` is the logical length (prompt + appended tokens, padding included, the
  length of generate's attention mask), so positions continue from the real prompt length.
  ``get_mask_sizes`` reports a window over the ``T`` new tokens only, at offset 0 (and
  ``get_query_offset`` 0): the mask the model builds for an evicted layer is tiny, has a
  constant shape while decoding (no recompilation), and is ignored by the AdaKV path.
* Growth: every append knows ``T`` on the host; the layer keeps a host count ``free`` of the
  smallest remaining reserve of its segments (exactly ``reserve`` after eviction, minus the
  tokens appended since). Before an append would overflow, the cache is repacked with twice
  the reserve in one vectorised copy (``searchsorted`` + ``index_copy_``, no loop over heads,
  no device read). The decode hot path never reads device data.
* Re-eviction (``max_growth=M``): segments get ``M`` rows of reserve instead; when an append
  would pass ``budget + window + M`` the layer is evicted again from its flat cache with the
  same ops (per-segment scoring of the segments right-aligned into a padded
  ``[B, H, N', D]`` tensor with the last ``window`` queries, which the layer keeps in a ring
  buffer; then ``allocate`` / ``select`` / ``compact``), so long generations stay at
  ``B * H * (C_l + window + M)`` rows per layer. This costs one host read (the longest
  segment) per re-eviction, never per step.

``torch.compile`` / CUDA graphs: the append + attention of a decode step is one graph (no
break, ``fullgraph=True``). ``update`` keeps its host bookkeeping (growth, re-eviction,
lengths) outside compiled code: before calling a compiled forward, call
``cache.prepare_decode(T)`` (eager; it grows or re-evicts if needed and accounts the ``T``
tokens); ``cache.ensure_capacity(n)`` pre-grows for ``n`` tokens so tensor addresses stay fixed
for a CUDA-graph loop. ``generate()`` runs eagerly and needs neither.

Question-agnostic use (compress a context once, ask several questions)::

    cache.compress(context_ids, attention_mask)       # prefill + eviction, no generation
    with cache.reuse():                                # snapshot ... restore
        out = model.generate(input_ids=context_plus_question, attention_mask=mask,
                             cache=cache, max_new_tokens=32)
    # the compressed context is back exactly as it was; ask the next question

Continuations are appended in place, so restoring resets the segment lengths and the logical
length (and puts back the tensors if the answer made the cache grow or re-evict; sliding
layers are restored from references, as their update never writes in place). Limits: the
question part of a batch must not contain padding (left-pad the *context*, and give every row
a question of the same token length); beam search, ``crop`` and chunked prefill are not
supported (the whole prompt must be in the first forward to be scored).

Exact semantics of the ops: ``docs/semantics.md``; user guide: ``docs/hf.md``.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from . import ops as _ops
from .budgets import pyramid_budgets
from .store import streaming_scores

__all__ = ["AdaKVCache", "AdaKVLayer", "CACHE_KWARG", "CacheSnapshot", "METHODS", "QueryRecorder",
           "cache_kwarg", "restore_attention", "original_attn_implementation"]

METHODS = ("full", "snapkv", "ada_snapkv", "pyramid", "ada_pyramid", "streaming")
_ADAPTIVE = {"ada_snapkv": True, "ada_pyramid": True, "snapkv": False, "pyramid": False}
_SUPPORTED_ORIGINALS = ("sdpa", "eager")
_PREFIX = "adakv_"
_MAILBOX = "_adakv_mailbox"
_RECORDER = "_adakv_query_recorder"
_INT32_MAX = 2**31 - 1  # every row index / segment start of the flat cache is int32


# ---------------------------------------------------------------------------------------------
# the name of the cache argument


def _transformers_names_it_cache() -> bool:
    """True where ``generate()`` and the model forward take the cache as ``cache=``
    (transformers >= 5.24; up to 5.23 only ``past_key_values=`` exists). Detected from
    ``transformers.generation.utils.ALL_CACHE_NAMES`` (the names generate looks the cache up
    under: ``"cache"`` since 5.24, ``"past_key_values"`` before), with the version as fallback."""
    try:
        from transformers.generation.utils import ALL_CACHE_NAMES
        return "cache" in ALL_CACHE_NAMES
    except ImportError:  # pragma: no cover - not seen in 5.0 .. 5.24
        import transformers
        from packaging.version import Version
        return Version(transformers.__version__).release >= (5, 24)


#: ``"cache"`` on transformers >= 5.24, ``"past_key_values"`` before.
CACHE_KWARG = "cache" if _transformers_names_it_cache() else "past_key_values"


def cache_kwarg(cache, model=None) -> dict:
    """The keyword argument that hands ``cache`` to ``model.generate()`` or to the model forward
    under the installed transformers' name: ``{"cache": cache}`` on transformers >= 5.24 (where
    ``past_key_values=`` still works but emits a FutureWarning), ``{"past_key_values": cache}``
    on 5.0 .. 5.23 (which do not know ``cache=``)::

        model.generate(**inputs, **cache_kwarg(cache), max_new_tokens=64)

    ``model`` (optional, for forward calls): if its ``forward`` declares ``past_key_values`` but
    not ``cache`` (custom / remote-code models not yet renamed), ``past_key_values`` is used."""
    name = CACHE_KWARG
    if model is not None and name == "cache":
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            params = {}
        if "past_key_values" in params and "cache" not in params:
            name = "past_key_values"
    return {name: cache}


# ---------------------------------------------------------------------------------------------
# attention / mask functions


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _original_attention(orig: str, module: torch.nn.Module):
    if orig == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"adakv: no eager_attention_forward next to {type(module).__name__}")
        return fn
    return ALL_ATTENTION_FUNCTIONS[orig]


def _make_attention_fn(orig: str):
    def adakv_attention(module, query, key, value, attention_mask, **kwargs):
        recorder = getattr(module, _RECORDER, None)
        if recorder is not None:
            recorder._record(module.layer_idx, query)
        box = getattr(module, _MAILBOX, None)
        layer = box.pop(module.layer_idx, None) if box is not None else None
        original = _original_attention(orig, module)
        if layer is None or not layer._owns(key):
            return original(module, query, key, value, attention_mask, **kwargs)
        return layer._attend(module, query, key, value, attention_mask, original, kwargs)

    adakv_attention.__name__ = f"adakv_attention_{orig}"
    adakv_attention.__qualname__ = adakv_attention.__name__
    return adakv_attention


_REGISTERED: set = set()


def _register(orig: str) -> str:
    name = _PREFIX + orig
    if name not in _REGISTERED:
        AttentionInterface.register(name, _make_attention_fn(orig))
        # The original mask function, unchanged: sdpa_mask / eager_mask.
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[orig])
        _REGISTERED.add(name)
    return name


def original_attn_implementation(model) -> str:
    """The attention implementation AdaKVCache delegates to for ``model`` (``sdpa``/``eager``)."""
    impl = model.config._attn_implementation or "sdpa"
    return impl[len(_PREFIX):] if impl.startswith(_PREFIX) else impl


def restore_attention(model) -> None:
    """Switch ``model`` back to its original attention implementation (undo the constructor)."""
    impl = model.config._attn_implementation or ""
    if impl.startswith(_PREFIX):
        model.set_attn_implementation(impl[len(_PREFIX):])


def _attention_modules(model):
    for m in model.modules():
        if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "num_key_value_groups"):
            yield m


def _key_start_from_mask(mask, B: int, N: int) -> Optional[Tensor]:
    """``[B]`` int32 first attended key of the last query row of a 4-D mask (left padding)."""
    if not isinstance(mask, Tensor) or mask.dim() != 4 or mask.shape[-1] < N:
        return None
    last = mask[:, 0, -1, mask.shape[-1] - N:]
    valid = last if last.dtype == torch.bool else last == 0
    ks = valid.to(torch.float32).argmax(-1).to(torch.int32)  # first attended column
    if ks.shape[0] != B:
        ks = ks.expand(B)
    return ks.contiguous()


def _mark_static(*tensors: Tensor) -> None:
    if not _is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


# ---------------------------------------------------------------------------------------------
# query recorder (evict a cache that was filled elsewhere)


class QueryRecorder(contextlib.AbstractContextManager):
    """Record the last ``window`` post-RoPE queries of every attention layer while a model runs
    with any cache (e.g. a ``DynamicCache``), for :meth:`AdaKVCache.evict_from`.

    ``with QueryRecorder(model, window=32) as rec: model(...)``; then ``rec.windows[i]`` is the
    ``[B, Hq, min(window, tokens seen), D]`` query tensor of layer ``i`` (successive forwards
    are concatenated, so a context followed by a question gives the question-aware window).
    Like :class:`AdaKVCache`, it switches the model instance to the ``adakv_*`` attention
    implementation (which delegates to the original one); nothing else changes.
    """

    def __init__(self, model, window: int = 32):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"adakv: window must be an int >= 1, got {window!r}")
        orig = original_attn_implementation(model)
        if orig not in _SUPPORTED_ORIGINALS:
            raise ValueError(f"adakv: the model's attention implementation must be one of "
                             f"{_SUPPORTED_ORIGINALS} (got {orig!r})")
        impl = _register(orig)
        if model.config._attn_implementation != impl:
            model.set_attn_implementation(impl)
        self.window = window
        self.windows: dict[int, Tensor] = {}
        self._modules = list(_attention_modules(model))

    def _record(self, layer_idx: int, query: Tensor) -> None:
        prev = self.windows.get(layer_idx)
        q = query.detach() if prev is None else torch.cat([prev, query.detach()], dim=2)
        self.windows[layer_idx] = q[:, :, max(q.shape[2] - self.window, 0):]

    def clear(self) -> None:
        self.windows = {}

    def __enter__(self):
        for m in self._modules:
            setattr(m, _RECORDER, self)
        return self

    def __exit__(self, *exc):
        for m in self._modules:
            if getattr(m, _RECORDER, None) is self:
                delattr(m, _RECORDER)
        return None


# ---------------------------------------------------------------------------------------------
# settings and snapshot


@dataclass(frozen=True)
class _Settings:
    method: str
    budget: int
    window: int
    alpha: float
    pooling: str
    kernel_size: int
    gqa_reduce: str
    rounding: str
    per_query_head: bool
    reserve: int
    max_growth: Optional[int]
    n_sink: int
    pyramid_beta: int
    pyramid_exact_mean: bool
    n_full_layers: int


@dataclass
class CacheSnapshot:
    """State recorded by :meth:`AdaKVCache.snapshot` (opaque; pass it to ``restore``)."""

    layers: list
    owner: Any


# ---------------------------------------------------------------------------------------------
# full-attention layer


class AdaKVLayer(CacheLayerMixin):
    """One full-attention layer: the head-flattened cache of ``adakv_ops`` (docs/semantics.md).

    Tensors after prefill: ``k_flat``/``v_flat [rows, D]``, ``seg_start``/``seg_len [B * H]``
    int32 (``H`` = KV heads, or query heads with ``per_query_head``). Host counters: ``seen``
    (logical length), ``free`` (smallest remaining reserve), ``reserve_total``, ``budget``
    (this layer's ``C_l``), ``window`` (``W`` used at prefill).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, settings: _Settings, layer_idx: int, full_rank: int, mailbox: dict):
        super().__init__()
        self.settings = settings
        self.layer_idx = layer_idx
        self.full_rank = full_rank
        self._mailbox = mailbox
        self._clear()

    def _clear(self) -> None:
        self.k_flat = self.v_flat = self.seg_start = self.seg_len = None
        self.keys = self.values = None
        self.qbuf: Optional[Tensor] = None
        self.seen = 0
        self.free = 0
        self.reserve_total = 0
        self.budget: Optional[int] = None
        self.window: Optional[int] = None
        self.n_heads: Optional[int] = None
        self._batch: Optional[int] = None
        self._scale: Optional[float] = None
        self._pending = None
        self._prepaid = 0
        self.n_grow = 0
        self.n_reevict = 0

    # -- CacheLayerMixin ----------------------------------------------------------------------

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # A window over the new tokens only: constant while decoding; unused by the AdaKV path
        # (at prefill the layer is empty and this is exactly DynamicLayer's answer).
        return query_length, 0

    def reset(self) -> None:
        if self._mailbox.get(self.layer_idx) is self:
            del self._mailbox[self.layer_idx]  # an unclaimed prefill entry goes too
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

    # -- update -------------------------------------------------------------------------------

    @property
    def evicted(self) -> bool:
        """Whether the layer holds a flat cache (prefill done)."""
        return self.k_flat is not None

    def _check_claimed(self) -> None:
        """Raise if the prefill K/V posted by ``update`` was never evicted (the AdaKV attention
        function never claimed the mailbox entry: e.g. after :func:`restore_attention`, or with
        a model whose attention implementation was switched away from ``adakv_*``). Going on
        would treat the next tokens as the prompt and silently drop the real one."""
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
        if self.k_flat is None:
            # Prefill: keep the full K/V until the attention function evicts them.
            self._pending = (key_states, value_states)
            self.seen += key_states.shape[-2]
            self._mailbox[self.layer_idx] = self
            return key_states, value_states
        self._account(key_states.shape[-2])
        self.append(key_states, value_states)
        self._mailbox[self.layer_idx] = self
        return self.k_flat, self.v_flat

    def _owns(self, key) -> bool:
        if self._pending is not None:
            return key is self._pending[0]
        return key is self.k_flat

    def _expand(self, x: Tensor) -> Tensor:
        if self.settings.per_query_head and x.shape[1] != self.n_heads:
            x = x.repeat_interleave(self.n_heads // x.shape[1], dim=1)
        return x.contiguous()

    def append(self, key_states: Tensor, value_states: Tensor) -> None:
        """``adakv_ops.append_`` of ``[B, Hk, T, D]`` new tokens (no host bookkeeping)."""
        _ops.append_(self.k_flat, self.v_flat, self.seg_start, self.seg_len,
                     self._expand(key_states), self._expand(value_states))

    def attend(self, query: Tensor, scale: Optional[float] = None) -> Tensor:
        """``adakv_ops.decode_attention`` of ``query [B, Hq, T, D]`` -> ``[B, Hq, T, D]``."""
        return _ops.decode_attention(query.contiguous(), self.k_flat, self.v_flat, self.seg_start,
                                     self.seg_len, scale=scale)

    # -- host bookkeeping ---------------------------------------------------------------------

    def _account(self, T: int) -> None:
        if self._prepaid:
            if self._prepaid != T:
                raise RuntimeError(f"adakv: prepare_decode({self._prepaid}) was called but the "
                                   f"forward appends {T} tokens")
            self._prepaid = 0
            return
        if _is_compiling():
            raise RuntimeError("adakv: call cache.prepare_decode(T) before each compiled forward "
                               "(growth and re-eviction run outside compiled code)")
        self._reserve(T)

    def _reserve(self, T: int) -> None:
        """Make room for ``T`` tokens in every segment (eager), then account them."""
        if self.free < T:
            if self.settings.max_growth is not None:
                self._reevict()
            if self.free < T:
                need = max(T - self.free, 1)
                g = max(self.reserve_total, need)  # amortised: double the reserve
                if self.k_flat.shape[0] + self.seg_start.numel() * g > _INT32_MAX:
                    g = need  # doubling would pass the int32 row limit: grow just enough
                self._grow(g)
        self.free -= T
        self.seen += T

    def _prepare(self, T: int) -> None:
        self._check_claimed()
        if self.k_flat is None:
            return
        if self._prepaid:
            raise RuntimeError("adakv: prepare_decode called twice without a forward in between")
        self._reserve(T)
        self._prepaid = T

    def _check_rows(self, S: int, C: int, W: int, R: int, what: str = "budget") -> None:
        """The flat cache of this layer, ``S * (C + W + R)`` rows, must fit the int32 row index
        (checked before anything is allocated; Python ints never wrap)."""
        s = self.settings
        R_name = "max_growth" if s.max_growth is not None else "reserve"
        rows = S * (C + W + R)
        if rows > _INT32_MAX:
            raise ValueError(
                f"adakv: layer {self.layer_idx}: the flat cache would hold segments * ({what} + "
                f"window + {R_name}) = {S} * ({C} + {W} + {R}) = {rows} rows; at most 2^31 - 1 "
                f"are supported (lower budget, window or {R_name}, or the batch)")

    def _grow(self, g: int) -> None:
        """Add ``g`` rows of reserve to every segment: one vectorised repack."""
        S = self.seg_start.numel()
        rows, D = self.k_flat.shape
        # Never compute a wrapped capacity: the grown cache and every segment's reserve must
        # stay int32 row counts (seg_start is int32).
        if g < 0 or rows + S * g > _INT32_MAX or self.reserve_total + g > _INT32_MAX:
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

    def _set_flat(self, k_flat, v_flat, seg_start, seg_len) -> None:
        self.k_flat, self.v_flat, self.seg_start, self.seg_len = k_flat, v_flat, seg_start, seg_len
        self.keys, self.values = k_flat, v_flat
        _mark_static(k_flat, v_flat, seg_start, seg_len)

    # -- eviction -----------------------------------------------------------------------------

    def _layer_budget(self, N: int, W: int) -> int:
        s = self.settings
        if s.method in ("pyramid", "ada_pyramid"):
            return pyramid_budgets(s.budget, s.n_full_layers, N, W, beta=s.pyramid_beta,
                                   exact_mean=s.pyramid_exact_mean)[self.full_rank]
        return s.budget

    def _attend(self, module, query, key, value, attention_mask, original, kwargs):
        scale = kwargs.get("scaling")
        if self._pending is not None:
            k, v = self._pending
            self._pending = None
            out = original(module, query, key, value, attention_mask, **kwargs)
            B, _, N, _ = k.shape
            W = min(self.settings.window, N)
            self._evict_prefill(query[:, :, N - W:], k, v,
                                _key_start_from_mask(attention_mask, B, N), scale)
            return out
        if getattr(module, "attn_logit_softcapping", None) is not None:
            raise NotImplementedError("adakv: attention logit softcapping is not supported")
        q = query.contiguous()
        out = self.attend(q, scale)
        if self.qbuf is not None:
            self._push_queries(q)
        return out.transpose(1, 2), None

    def _evict_prefill(self, q_window: Tensor, key: Tensor, value: Tensor,
                       ks: Optional[Tensor], scale) -> None:
        """Evict the full ``key``/``value [B, Hk, N, D]`` of this layer with the window
        queries ``q_window [B, Hq, W, D]`` (the last ``W = min(window, N)`` prompt tokens)."""
        s = self.settings
        B, Hk, N, D = key.shape
        Hq = q_window.shape[1]
        W = q_window.shape[2]
        q_window = q_window.contiguous()
        H = Hq if s.per_query_head else Hk
        self.n_heads, self._batch = H, B
        key, value = self._expand(key), self._expand(value)
        R = s.max_growth if s.max_growth is not None else s.reserve
        if s.method == "full":
            C = N
            self._check_rows(B * H, N, 0, R, "the prompt length N")
            z = torch.zeros((B, H), device=key.device, dtype=torch.int32)
            flat = _ops.compact(key, value, torch.empty((B, H, 0), device=key.device,
                                                        dtype=torch.int32),
                                z, z, N, reserve=R, rows=B * H * (N + R), key_start=ks)
        elif s.method == "streaming":
            C = s.budget
            self._check_rows(B * H, C, W, R)
            ks0 = ks if ks is not None else torch.zeros(B, device=key.device, dtype=torch.int32)
            scores = streaming_scores(N - W, ks0, s.n_sink).unsqueeze(1).expand(B, H, N - W)
            budgets = torch.full((B, H), C, device=key.device, dtype=torch.int32)
            kept_idx, kept_count = _ops.select(scores.contiguous(), budgets, key_start=ks)
            flat = _ops.compact(key, value, kept_idx, kept_count, budgets, W, reserve=R,
                                rows=B * H * (C + W + R), key_start=ks)
        else:
            C = self._layer_budget(N, W)
            self._check_rows(B * H, C, W, R)
            flat = _ops.evict(q_window, key, value, C, floor_alpha=s.alpha, pooling=s.pooling,
                              kernel_size=s.kernel_size, gqa_reduce=s.gqa_reduce,
                              adaptive=_ADAPTIVE[s.method], rounding=s.rounding, reserve=R,
                              key_start=ks, scale=scale)
        self._set_flat(*flat)
        self.budget, self.window, self._scale = C, W, scale
        self.free = self.reserve_total = R
        if s.max_growth is not None:
            qbuf = q_window.new_zeros((B, Hq, s.window, D))
            qbuf[:, :, s.window - W:] = q_window
            self.qbuf = qbuf
            _mark_static(qbuf)

    def _push_queries(self, q: Tensor) -> None:
        T, Wb = q.shape[2], self.qbuf.shape[2]
        if T >= Wb:
            self.qbuf.copy_(q[:, :, T - Wb:])
        else:
            self.qbuf.copy_(torch.cat([self.qbuf[:, :, T:], q], dim=2))

    def _reevict(self) -> None:
        """Evict again from the flat cache (same ops): segments right-aligned into
        ``[B, H, N', D]`` (per-segment left padding), scored per segment with the last
        ``window`` queries, then allocate / select / compact at this layer's budget."""
        s = self.settings
        B, H = self._batch, self.n_heads
        S = B * H
        D = self.k_flat.shape[1]
        dev = self.k_flat.device
        lens = self.seg_len.to(torch.int64)
        # one host read per re-eviction (never per step)
        Nmin, Nmax = torch.stack([lens.min(), lens.max()]).tolist()
        W = s.window
        C = self.budget
        R = s.max_growth
        if Nmin < W:
            return  # a segment shorter than the window (tiny prompt, big append): grow instead
        L = Nmax - W
        cols = torch.arange(Nmax, device=dev, dtype=torch.int64)
        pad = Nmax - lens                                              # [S]
        valid = cols.unsqueeze(0) >= pad.unsqueeze(1)                  # [S, Nmax]
        src = self.seg_start.to(torch.int64).unsqueeze(1) + cols.unsqueeze(0) - pad.unsqueeze(1)
        src = torch.where(valid, src, torch.zeros_like(src)).view(-1)
        keep = valid.view(S, Nmax, 1)
        kp = (self.k_flat.index_select(0, src).view(S, Nmax, D) * keep).view(B, H, Nmax, D)
        vp = (self.v_flat.index_select(0, src).view(S, Nmax, D) * keep).view(B, H, Nmax, D)
        ks_seg = pad.to(torch.int32)                                   # per-segment padding
        if s.method == "streaming":
            scores = streaming_scores(L, ks_seg.view(B, H), s.n_sink).contiguous()
        else:
            Hq = self.qbuf.shape[1]
            q = self.qbuf.reshape(B * H, Hq // H, W, D)
            scores = _ops.score(q, kp.reshape(S, 1, Nmax, D), kernel_size=s.kernel_size,
                                pooling=s.pooling, gqa_reduce=s.gqa_reduce, key_start=ks_seg,
                                scale=self._scale).view(B, H, L)
        ks_row = ks_seg.view(B, H).amin(dim=1).contiguous()
        if s.method in ("streaming", "snapkv", "pyramid"):
            budgets = torch.full((B, H), C, device=dev, dtype=torch.int32)
        else:
            budgets = _ops.allocate(scores, C, floor_alpha=s.alpha, adaptive=True,
                                    rounding=s.rounding, key_start=ks_row)
        # A head never keeps more prefix tokens than it has (its padding columns are -inf).
        finite = (L - ks_seg.view(B, H)).clamp(min=0)
        budgets = torch.minimum(budgets, finite).contiguous()
        kept_idx, kept_count = _ops.select(scores, budgets, key_start=ks_row)
        rows = S * (C + W + R) if s.rounding == "exact" or s.method in (
            "streaming", "snapkv", "pyramid") else None
        flat = _ops.compact(kp.contiguous(), vp.contiguous(), kept_idx, kept_count, budgets, W,
                            reserve=R, rows=rows, key_start=ks_row)
        self._set_flat(*flat)
        self.free = self.reserve_total = R
        self.n_reevict += 1

    # -- inspection / snapshot ----------------------------------------------------------------

    def nbytes(self) -> int:
        if self.k_flat is None:
            return 0
        return self.k_flat.nbytes + self.v_flat.nbytes

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


# ---------------------------------------------------------------------------------------------
# the cache


class AdaKVCache(Cache):
    """A ``transformers`` Cache that evicts each full-attention layer with ``adakv_ops``.

    Args:
        model: the (text) causal LM, e.g. ``LlamaForCausalLM``, ``MistralForCausalLM``,
            ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``Gemma3ForCausalLM``; its attention
            implementation must be ``"sdpa"`` or ``"eager"`` (what prefill and every non-AdaKV
            cache keep using).
        method: ``"ada_snapkv"`` (default), ``"snapkv"``, ``"ada_pyramid"``, ``"pyramid"``,
            ``"streaming"`` (first ``n_sink`` tokens + most recent) or ``"full"`` (no eviction,
            flat layout).
        budget: ``C``, the average number of kept prefix tokens per head (window not counted);
            pyramid methods spread it over the full-attention layers
            (``adakv_ops.pyramid_budgets``).
        window: ``W``, observation window (the last ``W`` prompt tokens, always kept).
        alpha: Ada-KV safeguard fraction; default 0.2 (0.5 with ``per_query_head``).
        pooling, kernel_size, gqa_reduce, rounding: passed to ``adakv_ops.evict``.
        per_query_head: one segment per query head (K/V expanded to ``Hq`` heads before
            eviction, ``G = 1``; the official non-GQA mode, ``G`` times the memory).
        reserve: rows of decode reserve per segment after eviction (doubled on demand).
        max_growth: enable decode-time re-eviction: segments get ``max_growth`` rows of
            reserve and are evicted again (same ops) whenever one would pass
            ``budget + window + max_growth`` tokens. Must be ``>= window``.
        n_sink: attention sinks kept by ``"streaming"``.
        pyramid_beta, pyramid_exact_mean: pyramid schedule (see ``pyramid_budgets``).
    """

    def __init__(self, model, method: str = "ada_snapkv", budget: int = 256, window: int = 32,
                 alpha: Optional[float] = None, *, pooling: str = "max", kernel_size: int = 7,
                 gqa_reduce: str = "mean", rounding: str = "exact", per_query_head: bool = False,
                 reserve: int = 64, max_growth: Optional[int] = None, n_sink: int = 4,
                 pyramid_beta: int = 20, pyramid_exact_mean: bool = False):
        if method not in METHODS:
            raise ValueError(f"adakv: method must be one of {METHODS}, got {method!r}")
        # Every size-like argument, up front (SPEC section 9): an int in a range that keeps
        # every derived row count within int32; the message names the argument and its range.
        for name, val, lo in (("budget", budget, 0), ("window", window, 1), ("reserve", reserve, 0),
                              ("n_sink", n_sink, 0), ("kernel_size", kernel_size, 1),
                              ("pyramid_beta", pyramid_beta, 1)):
            if not isinstance(val, int) or isinstance(val, bool) or not lo <= val <= _INT32_MAX:
                raise ValueError(f"adakv: {name} must be an int in [{lo}, 2^31 - 1], "
                                 f"got {val!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"adakv: kernel_size must be odd, got {kernel_size}")
        if alpha is None:
            alpha = 0.5 if per_query_head else 0.2
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"adakv: alpha must be in [0, 1], got {alpha!r}")
        if max_growth is not None:
            if method == "full":
                raise ValueError("adakv: max_growth (re-eviction) needs an evicting method")
            if (not isinstance(max_growth, int) or isinstance(max_growth, bool)
                    or not window <= max_growth <= _INT32_MAX):
                raise ValueError(f"adakv: max_growth must be an int in [window ({window}), "
                                 f"2^31 - 1], got {max_growth!r}")
        # One segment's capacity (budget + window + reserve) is an int32 row count; a pyramid
        # layer may get up to 2 * budget.
        grow = max_growth if max_growth is not None else reserve
        grow_name = "max_growth" if max_growth is not None else "reserve"
        top = 2 * budget if method in ("pyramid", "ada_pyramid") else budget
        if method != "full" and top + window + grow > _INT32_MAX:
            raise ValueError(
                f"adakv: budget + window + {grow_name} = {top} + {window} + {grow} = "
                f"{top + window + grow} rows per segment"
                f"{' (pyramid layers get up to 2 * budget)' if top != budget else ''}; "
                f"at most 2^31 - 1 are supported (lower budget, window or {grow_name})")

        config = model.config.get_text_config(decoder=True)
        n_layers = config.num_hidden_layers
        layer_types = getattr(config, "layer_types", None)
        if layer_types is None:
            if getattr(config, "sliding_window", None) is not None:
                layer_types = ["sliding_attention"] * n_layers
            elif getattr(config, "attention_chunk_size", None) is not None:
                layer_types = ["chunked_attention"] * n_layers
            else:
                layer_types = ["full_attention"] * n_layers
        layer_types = list(layer_types)[:n_layers]
        for t in layer_types:
            if t not in ("full_attention", "sliding_attention", "chunked_attention"):
                raise NotImplementedError(f"adakv: layer type {t!r} is not supported")
        n_full = sum(t == "full_attention" for t in layer_types)

        orig = original_attn_implementation(model)
        if orig not in _SUPPORTED_ORIGINALS:
            raise ValueError(f"adakv: the model's attention implementation must be one of "
                             f"{_SUPPORTED_ORIGINALS} (got {orig!r}); load it with "
                             f"attn_implementation='sdpa' or 'eager'")
        impl = _register(orig)
        if model.config._attn_implementation != impl:
            model.set_attn_implementation(impl)
        mailbox = None
        for m in _attention_modules(model):
            mailbox = mailbox if mailbox is not None else getattr(m, _MAILBOX, None)
        mailbox = {} if mailbox is None else mailbox
        for m in _attention_modules(model):
            if getattr(m, _MAILBOX, None) is not mailbox:
                setattr(m, _MAILBOX, mailbox)

        self.settings = _Settings(
            method=method, budget=budget, window=window, alpha=float(alpha), pooling=pooling,
            kernel_size=kernel_size, gqa_reduce=gqa_reduce, rounding=rounding,
            per_query_head=bool(per_query_head), reserve=reserve, max_growth=max_growth,
            n_sink=n_sink, pyramid_beta=pyramid_beta, pyramid_exact_mean=pyramid_exact_mean,
            n_full_layers=max(n_full, 1))
        layers = []
        rank = 0
        for i, t in enumerate(layer_types):
            if t == "full_attention":
                layers.append(AdaKVLayer(self.settings, i, rank, mailbox))
                rank += 1
            else:
                w = (config.sliding_window if t == "sliding_attention"
                     else config.attention_chunk_size)
                layers.append(DynamicSlidingWindowLayer(sliding_window=w))
        super().__init__(layers=layers)
        self.original_implementation = orig
        self._model_ref = weakref.ref(model)

    # -- convenience attributes ---------------------------------------------------------------

    @property
    def method(self) -> str:
        return self.settings.method

    @property
    def budget(self) -> int:
        return self.settings.budget

    @property
    def window(self) -> int:
        return self.settings.window

    @property
    def adakv_layers(self) -> list[AdaKVLayer]:
        """The evicted (full-attention) layers, in model order."""
        return [l for l in self.layers if isinstance(l, AdaKVLayer)]

    @property
    def layer_budgets(self) -> dict[int, Optional[int]]:
        """``{layer_idx: C_l}`` of the evicted layers (``None`` before prefill)."""
        return {l.layer_idx: l.budget for l in self.adakv_layers}

    def kv_bytes(self) -> int:
        """Bytes held by K/V storage, all layers (flat caches incl. reserve + sliding caches)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, AdaKVLayer):
                total += layer.nbytes()
            elif getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def get_query_offset(self, layer_idx: int = 0) -> int:
        # Matches AdaKVLayer.get_mask_sizes: the mask of an evicted layer covers the new tokens.
        if layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], AdaKVLayer):
            return 0
        return super().get_query_offset(layer_idx)

    # -- decode helpers for compiled / CUDA-graph loops ---------------------------------------

    def check_claimed(self) -> None:
        """Raise ``RuntimeError`` if a layer's prefill was posted but never evicted (see
        :meth:`AdaKVLayer._check_claimed`); every later use of the cache checks this too."""
        for layer in self.adakv_layers:
            layer._check_claimed()

    def prepare_decode(self, num_tokens: int = 1) -> None:
        """Account ``num_tokens`` new tokens per evicted layer *before* the forward (eager):
        grows or re-evicts where needed. Required before every compiled forward; optional
        (and harmless) before an eager one."""
        for layer in self.adakv_layers:
            layer._prepare(num_tokens)

    def ensure_capacity(self, num_tokens: int) -> None:
        """Grow every evicted layer now so ``num_tokens`` more tokens fit without growing
        (fixed tensor addresses for a CUDA-graph decode loop; re-eviction mode is already
        fixed-size)."""
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 0:
            raise ValueError(f"adakv: num_tokens must be an int >= 0, got {num_tokens!r}")
        self.check_claimed()
        for layer in self.adakv_layers:
            if layer.evicted and layer.free < num_tokens and layer.settings.max_growth is None:
                layer._grow(num_tokens - layer.free)

    # -- question-agnostic reuse --------------------------------------------------------------

    @torch.no_grad()
    def compress(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
        """Prefill (and evict) a context without generating; returns the model output (logits of
        the last position only). Positions follow generate's convention (left padding)."""
        model = self._model_ref()
        if model is None:
            raise RuntimeError("adakv: the model of this cache was garbage-collected")
        if self.get_seq_length() != 0:
            raise RuntimeError("adakv: compress() needs an empty cache")
        if attention_mask is not None and "position_ids" not in kwargs:
            pos = attention_mask.long().cumsum(-1) - 1
            kwargs["position_ids"] = pos.masked_fill(attention_mask == 0, 0)
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    **cache_kwarg(self, model), use_cache=True, logits_to_keep=1, **kwargs)
        self.check_claimed()
        return out

    @torch.no_grad()
    def evict_from(self, full_cache: Cache, query_windows: dict, attention_mask=None) -> None:
        """Fill this (empty) cache by evicting a full cache that was filled elsewhere, e.g. a
        ``DynamicCache`` after a plain forward: each full-attention layer runs the same eviction
        as at prefill, with ``query_windows[i]`` (``[B, Hq, W', D]`` post-RoPE queries of the
        last prompt tokens, see :class:`QueryRecorder`; the last ``min(window, N)`` are used).
        Sliding layers are shared by reference (their update never writes in place).
        ``attention_mask [B, N]`` (1 = token) marks left padding. ``full_cache`` is not modified,
        so one prefill can be evicted with many methods/budgets."""
        model = self._model_ref()
        if model is None:
            raise RuntimeError("adakv: the model of this cache was garbage-collected")
        if self.get_seq_length() != 0:
            raise RuntimeError("adakv: evict_from() needs an empty cache")
        if len(full_cache.layers) != len(self.layers):
            raise ValueError(f"adakv: full cache has {len(full_cache.layers)} layers, this cache "
                             f"{len(self.layers)}")
        scales = {m.layer_idx: getattr(m, "scaling", None) for m in _attention_modules(model)}
        for i, (layer, src) in enumerate(zip(self.layers, full_cache.layers)):
            if not isinstance(layer, AdaKVLayer):
                if getattr(src, "is_initialized", False):
                    layer.lazy_initialization(src.keys, src.values)
                    layer.keys, layer.values = src.keys, src.values
                    if hasattr(src, "cumulative_length"):
                        layer.cumulative_length = src.cumulative_length
                continue
            key, value = src.keys, src.values
            if key is None or key.dim() != 4:
                raise ValueError(f"adakv: layer {i} of the full cache holds no [B, H, N, D] keys")
            if i not in query_windows:
                raise ValueError(f"adakv: no query window for layer {i}")
            B, _, N, _ = key.shape
            q = query_windows[i]
            W = min(self.settings.window, N)
            if q.dim() != 4 or q.shape[0] != B or q.shape[2] < W:
                raise ValueError(f"adakv: query window of layer {i} has shape {tuple(q.shape)}; "
                                 f"need [{B}, Hq, >= {W}, D]")
            ks = None
            if attention_mask is not None:
                if attention_mask.shape != (B, N):
                    raise ValueError(f"adakv: attention_mask must be [{B}, {N}], got "
                                     f"{tuple(attention_mask.shape)}")
                ks = (attention_mask != 0).to(torch.float32).argmax(-1).to(torch.int32)
                ks = ks.to(key.device).contiguous()
            layer.lazy_initialization(key, value)
            layer.seen = N
            layer._evict_prefill(q[:, :, q.shape[2] - W:], key.contiguous(), value.contiguous(),
                                 ks, scales.get(i))

    def snapshot(self) -> CacheSnapshot:
        """Record the current state (cheap: segment lengths are cloned, tensors referenced)."""
        states = []
        for layer in self.layers:
            if isinstance(layer, AdaKVLayer):
                states.append(layer._snapshot())
            else:
                states.append((layer.keys, layer.values, getattr(layer, "cumulative_length", None),
                               layer.is_initialized))
        return CacheSnapshot(layers=states, owner=weakref.ref(self))

    def restore(self, snap: CacheSnapshot) -> None:
        """Put the cache back to ``snap`` (e.g. drop an answer appended after compression)."""
        if snap.owner() is not self:
            raise ValueError("adakv: snapshot of another cache")
        for layer, st in zip(self.layers, snap.layers):
            if isinstance(layer, AdaKVLayer):
                layer._restore(st)
            else:
                layer.keys, layer.values, cum, layer.is_initialized = st
                if cum is not None:
                    layer.cumulative_length = cum

    @contextlib.contextmanager
    def reuse(self):
        """``with cache.reuse(): ...`` snapshot on entry, restore on exit."""
        snap = self.snapshot()
        try:
            yield self
        finally:
            self.restore(snap)

    def reset(self):
        for layer in self.layers:
            layer.reset()

    def __repr__(self):
        s = self.settings
        return (f"AdaKVCache(method={s.method!r}, budget={s.budget}, window={s.window}, "
                f"alpha={s.alpha}, layers={len(self.layers)}, evicted={len(self.adakv_layers)})")
