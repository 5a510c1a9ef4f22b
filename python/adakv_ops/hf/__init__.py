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

from .cache import STORAGES, AdaKVCache, CacheSnapshot, generate_chunked
from .flat import FlatLayer
from .layer import EvictedLayer
from .paged import PagedLayer
from .registration import (CACHE_KWARG, QueryRecorder, cache_kwarg, original_attn_implementation,
                           restore_attention)
from ..policy import METHODS

#: Every evicted layer is an :class:`EvictedLayer` (``FlatLayer`` or ``PagedLayer``).
AdaKVLayer = EvictedLayer

__all__ = ["AdaKVCache", "AdaKVLayer", "CACHE_KWARG", "CacheSnapshot", "EvictedLayer",
           "FlatLayer", "METHODS", "PagedLayer", "QueryRecorder", "STORAGES", "cache_kwarg",
           "generate_chunked", "original_attn_implementation", "restore_attention"]
