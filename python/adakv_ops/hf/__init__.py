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

No model class is patched (the one opt-in exception: ``Engine(rotary_append=True)`` gives the
attention modules a fused decode forward, :mod:`adakv_ops.hf.rotary_decode`). The constructor
does three things to the *model instance*:

1. registers the attention function ``"adakv_<orig>"`` with ``AttentionInterface`` and the
   original implementation's mask function under the same name with ``AttentionMaskInterface``
   (``<orig>`` is the model's implementation before, ``"sdpa"`` or ``"eager"``), and switches
   the model to it with ``model.set_attn_implementation("adakv_<orig>")``;
2. gives every attention module a ``_adakv_mailbox`` dict (one per model, shared by all its
   layers and by every AdaKVCache built on that model);
3. builds one cache layer per decoder layer: :class:`EvictedLayer` (``PagedLayer`` or
   ``FlatLayer``) for full-attention layers,
   ``transformers``' own ``DynamicSlidingWindowLayer`` for sliding-window layers (Gemma 3),
   which keep their bounded cache and are never evicted.

How the attention function reaches the cache (the only link between the two): in
transformers 5 an attention layer calls ``cache.update(k, v, layer_idx)`` (its cache argument,
``past_key_values`` before 5.24) and then
``attention_interface(module, query, key, value, mask, ...)``. ``EvictedLayer.update`` puts
itself into the model's mailbox under its layer index; the attention function pops
``module._adakv_mailbox[module.layer_idx]`` and uses the AdaKV path only if an entry is there
*and* ``key`` is the very tensor that update returned (identity check, so a stale entry can
never capture another cache's call). Otherwise (a ``DynamicCache``, a ``StaticCache``, no
cache, a sliding layer) it calls the original implementation unchanged, with the mask the
original mask function built: a plain cache on the same model behaves exactly as before.
:func:`restore_attention` switches the model back to its original implementation.

Per full-attention layer (:class:`EvictedLayer`; storage ``"paged"`` by default, one
:class:`adakv_ops.store.PagedKVStore` for all layers, or ``"flat"``, the head-flattened
contiguous layout; what is kept is decided by one :class:`adakv_ops.policy.EvictionPolicy`):

* One-shot prefill (the layer holds nothing; e.g. ``generate``'s first forward): ``update``
  returns the forward's K/V; the attention function runs the original attention (sdpa/eager,
  the model's causal + padding mask), then the policy selects (score -> budgets -> select) with
  the last ``W`` queries and the storage writes the kept rows (``paged_compact_`` into pages /
  ``compact``); nothing full-length survives the layer's forward. ``key_start`` (left padding)
  is read from the 4-D mask the model passed (last query row: first attended column); padding
  is never stored.
* Chunked prefill (:meth:`AdaKVCache.prefill` with ``chunk_size``; any chunk sizes): the layer
  holds the prompt's full K/V until the last chunk; each chunk attends over the prompt so far
  (the original attention with the model's mask, or, for unpadded prompts on
  all-full-attention sdpa models, SDPA with ``causal_lower_right``, no materialised mask and
  no K/V copy over the GQA group); after the last chunk the prompt is evicted with the last
  ``W`` queries of all chunks: the kept sets are the one-shot ones (tested for every method,
  family and storage). Two orders (``order=``): layer-major (``"layer"``, the default where
  supported: unpadded prompts on those models) runs one decoder layer's chunks at a time over
  the prompt's hidden states, so one layer at a time holds its raw prompt, in a contiguous
  buffer of its own (never in pages); chunk-major (``"chunk"``) runs each chunk through the
  model, every layer holding the prompt (in pages) until the last chunk.
  :func:`generate_chunked` is greedy ``generate`` with such a prefill. ``prefill`` on a filled
  paged cache adds its rows as new sequences (prompts prefilled one at a time into one store).
* Decode / continuation (``T >= 1`` new tokens): ``update`` appends in place
  (``paged_append_`` / ``append_``); the attention function runs ``paged_decode_attention`` /
  ``decode_attention`` (the ``T`` new queries causal among themselves) and returns
  ``[B, T, Hq, D]`` like sdpa. The mask is not read.
* ``get_seq_length()`` is the logical length (prompt including padding + appended tokens; the
  longest prompt when rows were added one at a time). ``get_mask_sizes`` / ``get_query_offset``
  report the held prompt during a chunked prefill and a window over the ``T`` new tokens at
  offset 0 after eviction (a tiny mask of constant shape while decoding, ignored).
* Growth never reads the device: paged storage hands out pages on the host (the store keeps
  every segment's length and pages); flat storage repacks with twice the reserve before an
  append would overflow (one vectorised copy).
* Re-eviction (``max_growth=M``): when an append would pass ``C_l + window + M`` rows, the
  stored segments are gathered right-aligned into ``[B, H, N', D]``, scored each on its own with
  the last ``window`` queries (a ring buffer) and evicted again with the same policy; one host
  read per re-eviction, never per step.

``torch.compile`` / CUDA graphs: the append + attention of a decode step is one graph
(``fullgraph=True``). Host bookkeeping stays outside: call ``cache.prepare_decode(T)`` (eager)
before each compiled forward, and ``cache.ensure_capacity(n)`` once (pages / rows for ``n``
tokens ahead) so no tensor moves inside a CUDA-graph loop. ``generate()`` needs neither.

Question-agnostic use (compress a context once, ask several questions)::

    cache.compress(context_ids, attention_mask)       # prefill + eviction, no generation
    with cache.reuse():                                # snapshot ... restore
        out = model.generate(input_ids=context_plus_question, attention_mask=mask,
                             cache=cache, max_new_tokens=32)
    # the compressed context is back exactly as it was; ask the next question

Restoring resets lengths (and, paged, returns the answer's pages to the free list; flat puts
back the tensors if the answer grew or re-evicted them; a paged snapshot cannot be restored
after a re-eviction). Limits: the question part of a batch must not contain padding; beam
search, ``crop`` and offloading are not supported; ``generate(prefill_chunk_size=...)`` gives
the cache no sign of the prompt's end, so only the first chunk is scored (use
:func:`generate_chunked`).

Exact semantics of the ops: ``docs/semantics.md``; user guide: ``docs/hf.md``.
"""

from .cache import ORDERS, STORAGES, AdaKVCache, CacheSnapshot, generate_chunked
from .flat import FlatLayer
from .join import PrefillJob
from .layer import EvictedLayer
from .paged import PagedLayer
from .registration import (CACHE_KWARG, QueryRecorder, cache_kwarg, original_attn_implementation,
                           restore_attention)
from ..policy import METHODS

#: Every evicted layer is an :class:`EvictedLayer` (``FlatLayer`` or ``PagedLayer``).
AdaKVLayer = EvictedLayer

__all__ = ["AdaKVCache", "AdaKVLayer", "CACHE_KWARG", "CacheSnapshot", "EvictedLayer",
           "FlatLayer", "METHODS", "ORDERS", "PagedLayer", "PrefillJob", "QueryRecorder",
           "STORAGES", "cache_kwarg", "generate_chunked", "original_attn_implementation",
           "restore_attention"]
