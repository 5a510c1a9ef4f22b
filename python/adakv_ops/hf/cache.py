"""The Hugging Face ``Cache``: :class:`AdaKVCache` (settings, layers, prefill, snapshots).

The attention hook lives in :mod:`.registration`, the per-layer protocol in :mod:`.layer`, the
two storages in :mod:`.flat` and :mod:`.paged`, what is kept in :mod:`adakv_ops.policy`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .._checks import is_int
from ..distributed import HeadShards
from ..policy import METHODS, VALUE_METHODS, EvictionPolicy
from .flat import FlatLayer
from .layer import INT32_MAX, EvictedLayer, LayerSettings, PrefillControl
from .paged import PagedLayer, PagedPool
from .registration import (attention_modules, cache_kwarg, install, o_proj_weight,
                           skip_prompt_masks, tensor_parallel_group)

__all__ = ["AdaKVCache", "CacheSnapshot", "ORDERS", "STORAGES", "generate_chunked"]

STORAGES = ("paged", "flat")
#: ``AdaKVCache.prefill(order=...)``: layer-major where supported, layer-major, chunk-major.
ORDERS = ("auto", "layer", "chunk")


def _chunk_size(N: int, chunk_size) -> int:
    """``chunk_size`` checked (``None``: the whole prompt)."""
    if chunk_size is None:
        chunk_size = N
    if not is_int(chunk_size, 1):
        raise ValueError(f"adakv: chunk_size must be None or an int >= 1, got "
                         f"{chunk_size!r}")
    return chunk_size


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Whether token ids may have ``dtype``: an integer type (not bool, float or complex)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_prompt(model, input_ids, attention_mask=None) -> None:
    """A prompt's ``input_ids`` (and ``attention_mask``) checked before any model work: a
    ``[B, N]`` integer tensor with ``N >= 1`` and every id an embedding row (on CUDA an id out
    of range would fail inside the embedding kernel as a device-side assert, which ends the
    process's CUDA context); one device read of the ids' min and max per prompt."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"adakv: input_ids must be a [B, N] integer tensor, got "
                        f"{type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"adakv: input_ids must be [B, N] with N >= 1, got "
                         f"{list(input_ids.shape)}")
    if not is_integer_dtype(input_ids.dtype):
        raise TypeError(f"adakv: input_ids must be an integer tensor, got {input_ids.dtype}")
    # the config's vocabulary (with tensor parallelism the embedding module may be a shard)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    if input_ids.numel():
        lo, hi = (int(x) for x in torch.aminmax(input_ids))
        if lo < 0 or hi >= vocab:
            raise ValueError(f"adakv: input_ids must be token ids in [0, {vocab}), got values "
                             f"in [{lo}, {hi}]")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor)
                                       or attention_mask.shape != input_ids.shape):
        shape = (list(attention_mask.shape) if isinstance(attention_mask, Tensor)
                 else type(attention_mask).__name__)
        raise ValueError(f"adakv: attention_mask must have input_ids' shape "
                         f"{list(input_ids.shape)}, got {shape}")


def _decoder_glue(model) -> tuple[Any, list[str]]:
    """``(decoder, missing)``: the model's decoder (``get_decoder()``, else ``model.model``)
    and what a layer-major prefill needs of it and of the model that is missing."""
    inner = None
    get = getattr(model, "get_decoder", None)
    if callable(get):
        try:
            inner = get()
        except Exception:  # noqa: BLE001 - a model without one: fall back to .model
            inner = None
    if inner is None or inner is model:
        inner = getattr(model, "model", None)
    if inner is None:
        return None, ["model.model"]
    missing = [f"model.model.{n}" for n in ("embed_tokens", "layers", "rotary_emb", "norm")
               if getattr(inner, n, None) is None]
    if getattr(model, "lm_head", None) is None:
        missing.append("model.lm_head")
    return inner, missing


def _params(fn) -> set:
    """The parameter names of ``fn`` (through decorators' ``__wrapped__``)."""
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return set()


def _causal_lm_output(logits: Tensor, cache) -> CausalLMOutputWithPast:
    """The model's output type with ``logits`` (and the cache under the field this
    transformers has)."""
    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    extra = {n: cache for n in ("cache", "past_key_values") if n in names}
    return CausalLMOutputWithPast(logits=logits, **extra)


@dataclass
class CacheSnapshot:
    """State recorded by :meth:`AdaKVCache.snapshot` (opaque; pass it to ``restore``)."""

    layers: list
    store: Optional[list]
    owner: Any
    rows: tuple = ()      # the batch's identity: (store, its sequences) paged, (batch,) flat


class AdaKVCache(Cache):
    """A ``transformers`` Cache that evicts each full-attention layer with ``adakv_ops``.

    Args:
        model: the (text) causal LM, e.g. ``LlamaForCausalLM``, ``MistralForCausalLM``,
            ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``Gemma3ForCausalLM``; its attention
            implementation must be ``"sdpa"`` or ``"eager"`` (what prefill and every non-AdaKV
            cache keep using).
        method: ``"ada_snapkv"`` (default), ``"snapkv"``, ``"ada_pyramid"``, ``"pyramid"``,
            ``"streaming"`` (first ``n_sink`` tokens + most recent), the Ada-KV authors'
            follow-ups ``"criticalkv"``, ``"ada_criticalkv"`` and ``"defensivekv"`` (value-aware,
            SPEC section 7; :mod:`adakv_ops.policy`; not with ``max_growth`` yet) or ``"full"``
            (no eviction, flat layout).
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
        tensor_parallel: an :class:`adakv_ops.distributed.HeadShards` for a model whose heads
            are split across ranks; default: detected from a model loaded with transformers'
            tensor parallelism (``tp_plan="auto"``, its ``o_proj`` weights DTensors), whose
            tensor-parallel group then allocates across all ranks' heads exactly as one device
            (SPEC 8); each rank's cache holds its own heads.
        as_written: the follow-up methods as the authors' code runs them (the window competes
            for ``budget + window`` slots per head, their ``window_bias`` and clamp, and
            their arithmetic in a 16-bit model's dtype; for comparison,
            docs/followups.md); default: the fixed forms.
        storage: ``"paged"`` (default): every evicted layer in one per-head paged store
            (:mod:`adakv_ops.store`), pages handed out on the host, a chunk-major prefill keeps
            the prompt in pages until its last chunk (layer-major: in the layer's own buffer,
            see :meth:`prefill`); ``"flat"``: the head-flattened contiguous
            layout (one tensor per layer, repacked to grow). Same kept sets, same outputs.
        page_size: ``P`` rows per page (paged storage; 64 by measurement, see docs/store.md).
        num_pages: pool size in pages (paged storage). ``None``: sized at the first prompt and
            doubled when it runs out (new pool address; fix it for CUDA graphs or call
            :meth:`ensure_capacity` before capturing).
        max_batch: sequence slots of the paged store (``None``: the first prompt's batch, grown
            by doubling when :meth:`prefill` adds rows). Fixing it keeps every table at one
            address while rows are added.
        max_seq_len: the most tokens (prompt + generated) of one sequence (paged storage). It
            fixes the page-table width at ``ceil(max_seq_len / page_size) + 1`` pages per
            segment (a segment never holds more rows than its sequence has tokens), so the
            tables keep one shape and address for the cache's life: a compiled decode step
            then never meets a new table shape (``None``: the tables start 16 pages wide and
            double when a segment needs more, a new shape each time). A segment that would
            need more pages raises a ``RuntimeError`` naming it.
    """

    def __init__(self, model, method: str = "ada_snapkv", budget: int = 256, window: int = 32,
                 alpha: Optional[float] = None, *, pooling: str = "max", kernel_size: int = 7,
                 gqa_reduce: str = "mean", rounding: str = "exact", per_query_head: bool = False,
                 reserve: int = 64, max_growth: Optional[int] = None, n_sink: int = 4,
                 pyramid_beta: int = 20, pyramid_exact_mean: bool = False,
                 as_written: bool = False, tensor_parallel=None,
                 storage: str = "paged", page_size: int = 64, num_pages: Optional[int] = None,
                 max_batch: Optional[int] = None, max_seq_len: Optional[int] = None):
        # every constructor argument but the model: a side cache (PrefillJob) is built alike
        self._arguments = {k: v for k, v in locals().items()
                           if k not in ("self", "model", "__class__")}
        if method not in METHODS:
            raise ValueError(f"adakv: method must be one of {METHODS}, got {method!r}")
        # Every size-like argument, up front (SPEC section 9): an int in a range that keeps
        # every derived row count within int32; the message names the argument and its range.
        for name, val, lo in (("budget", budget, 0), ("window", window, 1), ("reserve", reserve, 0),
                              ("n_sink", n_sink, 0), ("kernel_size", kernel_size, 1),
                              ("pyramid_beta", pyramid_beta, 1)):
            if not is_int(val, lo, INT32_MAX):
                raise ValueError(f"adakv: {name} must be an int in [{lo}, 2^31 - 1], "
                                 f"got {val!r}")
        if storage not in STORAGES:
            raise ValueError(f"adakv: storage must be one of {STORAGES}, got {storage!r}")
        for name, val in (("page_size", page_size), ("num_pages", num_pages),
                          ("max_batch", max_batch), ("max_seq_len", max_seq_len)):
            if val is None and name != "page_size":
                continue
            if not is_int(val, 1, INT32_MAX):
                raise ValueError(f"adakv: {name} must be an int in [1, 2^31 - 1], got {val!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"adakv: kernel_size must be odd, got {kernel_size}")
        if alpha is None:
            alpha = 0.5 if per_query_head else 0.2
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"adakv: alpha must be in [0, 1], got {alpha!r}")
        if max_growth is not None:
            if method == "full":
                raise ValueError("adakv: max_growth (re-eviction) needs an evicting method")
            if method in VALUE_METHODS:
                raise NotImplementedError(f"adakv: max_growth (re-eviction) with {method!r} is "
                                          f"not supported yet (docs/hf.md)")
            if not is_int(max_growth, window, INT32_MAX):
                raise ValueError(f"adakv: max_growth must be an int in [window ({window}), "
                                 f"2^31 - 1], got {max_growth!r}")
        # One segment's capacity (budget + window + reserve) is an int32 row count; a pyramid
        # layer may get up to 2 * budget.
        grow = max_growth if max_growth is not None else reserve
        grow_name = "max_growth" if max_growth is not None else "reserve"
        top = EvictionPolicy(method=method, budget=budget).max_layer_budget
        if method != "full" and top + window + grow > INT32_MAX:
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

        shards = tensor_parallel
        if shards is None:
            group = tensor_parallel_group(model)
            shards = HeadShards(group) if group is not None else None
        Hq_all = config.num_attention_heads
        Hk_all = getattr(config, "num_key_value_heads", None) or Hq_all
        if shards is not None:
            shards.check_heads(Hq_all, Hk_all)
        orig, mailbox = install(model)
        self.settings = LayerSettings(
            policy=EvictionPolicy(
                method=method, budget=budget, window=window, alpha=float(alpha),
                pooling=pooling, kernel_size=kernel_size, gqa_reduce=gqa_reduce,
                rounding=rounding, n_sink=n_sink, pyramid_beta=pyramid_beta,
                pyramid_exact_mean=pyramid_exact_mean, as_written=bool(as_written)),
            per_query_head=bool(per_query_head), reserve=reserve, max_growth=max_growth,
            n_full_layers=max(n_full, 1), storage=storage, page_size=page_size,
            num_pages=num_pages, max_batch=max_batch, max_seq_len=max_seq_len, shards=shards)
        self._control = PrefillControl()
        self.pool = None
        if storage == "paged":
            Hq, Hk = Hq_all, Hk_all
            D = getattr(config, "head_dim", None) or config.hidden_size // Hq
            if shards is not None:      # this rank's heads
                Hq, Hk = shards.check_heads(Hq, Hk)
            self.pool = PagedPool(self.settings, max(n_full, 1), Hq if per_query_head else Hk, D)
        layers = []
        rank = 0
        for i, t in enumerate(layer_types):
            if t == "full_attention":
                if storage == "paged":
                    layers.append(PagedLayer(self.settings, i, rank, mailbox, self._control,
                                             self.pool))
                else:
                    layers.append(FlatLayer(self.settings, i, rank, mailbox, self._control))
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
    def adakv_layers(self) -> list[EvictedLayer]:
        """The evicted (full-attention) layers, in model order."""
        return [l for l in self.layers if isinstance(l, EvictedLayer)]

    @property
    def layer_budgets(self) -> dict[int, Optional[int]]:
        """``{layer_idx: C_l}`` of the evicted layers (``None`` before prefill)."""
        return {l.layer_idx: l.budget for l in self.adakv_layers}

    def kv_bytes(self) -> int:
        """Bytes held by K/V storage, all layers (flat caches incl. reserve + sliding caches)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, EvictedLayer):
                total += layer.nbytes()
            elif getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def get_query_offset(self, layer_idx: int = 0) -> int:
        # Matches EvictedLayer.get_mask_sizes: the mask of an evicted layer covers the new tokens
        # (offset 0); during a chunked prefill the queries follow the prompt held so far.
        if layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], EvictedLayer):
            return self.layers[layer_idx].held
        return super().get_query_offset(layer_idx)

    # -- decode helpers for compiled / CUDA-graph loops ---------------------------------------

    def check_claimed(self) -> None:
        """Raise ``RuntimeError`` if a layer's prefill was posted but never evicted (see
        :meth:`EvictedLayer._check_claimed`); every later use of the cache checks this too."""
        for layer in self.adakv_layers:
            layer._check_claimed()

    def prepare_decode(self, num_tokens: int = 1) -> None:
        """Account ``num_tokens`` new tokens per evicted layer *before* the forward (eager):
        grows or re-evicts where needed. Required before every compiled forward; optional
        (and harmless) before an eager one."""
        pool = self.pool
        if pool is not None and pool.store is not None and pool.seqs \
                and self.settings.max_growth is None \
                and all(l.evicted for l in self.adakv_layers):
            # paged, no re-eviction: one reservation (and host advance) for every layer, one
            # vectorised pass instead of one per layer
            self.check_claimed()
            if any(l._prepaid for l in self.adakv_layers):
                raise RuntimeError("adakv: prepare_decode called twice without a forward in "
                                   "between")
            st, seqs = pool.store, pool.seqs
            pool.call(lambda: st.reserve(seqs, num_tokens))
            st.advance(None, seqs, num_tokens)
            for layer in self.adakv_layers:
                layer._prepare(num_tokens, room_made=True)
            return
        for layer in self.adakv_layers:
            layer._prepare(num_tokens)

    def ensure_capacity(self, num_tokens: int) -> None:
        """Grow every evicted layer now so ``num_tokens`` more tokens fit without growing
        (fixed tensor addresses for a CUDA-graph decode loop; re-eviction mode is already
        fixed-size)."""
        if not is_int(num_tokens, 0):
            raise ValueError(f"adakv: num_tokens must be an int >= 0, got {num_tokens!r}")
        self.check_claimed()
        for layer in self.adakv_layers:
            layer.ensure(num_tokens)

    # -- question-agnostic reuse --------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                chunk_size: Optional[int] = None, order: str = "auto", **kwargs):
        """Prefill (and evict) a prompt without generating; returns the model output of the last
        chunk (logits of the last position only). Positions follow generate's convention (left
        padding).

        ``chunk_size``: run the prompt ``chunk_size`` tokens at a time (``None``, or
        ``>= N``: in one forward, whatever ``order`` says). Each evicted layer holds the
        prompt's full K/V until its last chunk, attends each chunk over the prompt so far, and
        is evicted after its last chunk with the last ``window`` queries: the kept sets, the
        rows and the logits are those of a one-shot prefill, and activation memory is bounded
        by the chunk.

        ``order`` (chunked prompts only; :meth:`prefill_order` tells which one runs):

        * ``"layer"`` (layer-major): the cache runs the decoder itself, one layer at a time:
          the hidden states of the whole prompt ``[B, N, hidden]`` are one buffer updated in
          place, each layer runs all its chunks (SDPA with ``causal_lower_right``) and is
          evicted before the next one starts. Only one layer holds its raw prompt at a time, in
          a contiguous ``[B, Hk, N, D]`` K and V buffer (never in pages): peak memory is about
          the hidden states + one layer's K/V + one chunk's activations. Needs an unpadded
          prompt (``attention_mask`` ``None`` or all ones), an ``"sdpa"`` model whose every
          layer is evicted (no sliding-window layers, no logit soft-capping) with the standard
          decoder glue (``model.model`` / ``get_decoder()`` with ``embed_tokens``, ``layers``,
          ``rotary_emb``, ``norm``; ``model.lm_head``; no ``final_logit_softcapping``), and
          no forward ``kwargs`` but ``position_ids``; otherwise ``ValueError`` says why.
        * ``"chunk"`` (chunk-major): each chunk runs through the whole model (its forward, with
          the model's mask; ``causal_lower_right`` where the layer-major conditions on the
          prompt and the attention hold): every layer holds the prompt (in pages with paged
          storage) until the last chunk.
        * ``"auto"`` (default): ``"layer"`` where supported, else ``"chunk"``.

        On a cache that already holds sequences (paged storage, a model without sliding
        layers), the rows are *added* to its batch as new sequences, each
        with its own length and no padding kept (prompts prefilled one at a time into one
        store): batch row ``b`` of the cache is the ``b``-th prompt row ever prefilled. The
        logical length (``get_seq_length``) becomes the longest prompt; decode forwards must
        then pass each row's ``position_ids`` (or an attention mask left-padded to that
        length)."""
        units = self._prefill_units(input_ids, attention_mask, chunk_size, order, kwargs)
        while True:
            try:
                next(units)
            except StopIteration as done:
                return done.value

    def _prefill_units(self, input_ids: Tensor, attention_mask: Optional[Tensor],
                       chunk_size: Optional[int], order: str, kwargs: dict):
        """:meth:`prefill` as a generator: runs one unit of work per ``next`` and yields its
        cost (:meth:`prefill_unit_costs`, the same list in the same order); returns the output.
        Its prefill state (``_prompt``) stays open between units, so only this cache's own
        decode must wait for the end: a :class:`~adakv_ops.hf.join.PrefillJob` runs it on a
        side cache while the cache decodes. The caller sets the grad mode around each
        ``next`` (a ``no_grad`` held across a ``yield`` would leak into the caller)."""
        model = self._model()
        check_prompt(model, input_ids, attention_mask)
        adding = self.get_seq_length() != 0
        if adding:
            if self.pool is None or self.pool.store is None:
                raise RuntimeError("adakv: prefill() needs an empty cache (adding rows to a "
                                   "filled one needs storage='paged')")
            if len(self.adakv_layers) != len(self.layers):
                raise NotImplementedError("adakv: adding rows to a filled cache is not "
                                          "supported with sliding-window layers")
        N = input_ids.shape[1]
        chunk_size = _chunk_size(N, chunk_size)
        kwargs = dict(kwargs)
        pos = kwargs.pop("position_ids", None)
        how, lower_right = self._plan(model, N, attention_mask, chunk_size, order, kwargs)
        if pos is None and attention_mask is not None:
            pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        with self._prompt(input_ids.shape[0], adding, lower_right, N if how == "layer" else 0):
            if how == "layer":
                out = yield from self._prefill_layer_major(model, input_ids, pos, chunk_size)
            else:
                out = yield from self._prefill_chunk_major(model, input_ids, attention_mask,
                                                           pos, chunk_size, lower_right,
                                                           kwargs)
        self.check_claimed()
        return out

    def prefill_unit_costs(self, num_tokens: int, attention_mask: Optional[Tensor] = None,
                           chunk_size: Optional[int] = None, order: str = "auto",
                           **kwargs) -> list[int]:
        """The units :meth:`prefill` runs a prompt of ``num_tokens`` tokens in, in order, each
        as its cost in token-layers (tokens x decoder layers they pass; nothing is run): one
        unit of ``N L`` for a one-forward prompt, one of ``n L`` per chunk of ``n`` tokens
        (chunk-major), one of ``n`` per chunk of each layer (layer-major). A
        :class:`~adakv_ops.hf.join.PrefillJob` runs them one at a time; a serving step spends
        a budget of them."""
        how = self.prefill_order(num_tokens, attention_mask, chunk_size, order, **kwargs)
        c = _chunk_size(num_tokens, chunk_size)
        L = self._model().config.get_text_config(decoder=True).num_hidden_layers
        chunks = [min(a + c, num_tokens) - a for a in range(0, num_tokens, c)]
        if how == "one-shot":
            return [num_tokens * L]
        if how == "chunk":
            return [n * L for n in chunks]
        return [n for _ in range(L) for n in chunks]

    def prefill_order(self, num_tokens: int, attention_mask: Optional[Tensor] = None,
                      chunk_size: Optional[int] = None, order: str = "auto", **kwargs) -> str:
        """How :meth:`prefill` runs a prompt of ``num_tokens`` tokens with these arguments
        (nothing is run): ``"one-shot"`` (one forward: ``chunk_size`` ``None`` or
        ``>= num_tokens``), ``"layer"`` or ``"chunk"``. Raises ``ValueError`` where
        ``prefill`` would (bad ``chunk_size`` or ``order``, ``order="layer"`` unsupported).
        The serving engine sizes its admission with it."""
        chunk_size = _chunk_size(num_tokens, chunk_size)
        kwargs.pop("position_ids", None)
        return self._plan(self._model(), num_tokens, attention_mask, chunk_size, order,
                          kwargs)[0]

    def _model(self):
        model = self._model_ref()
        if model is None:
            raise RuntimeError("adakv: the model of this cache was garbage-collected")
        return model

    def _plan(self, model, N: int, attention_mask: Optional[Tensor], chunk_size: int,
              order: str, kwargs: dict) -> tuple[str, bool]:
        """``(how, lower_right)``: ``how`` in ``"one-shot"``, ``"layer"``, ``"chunk"``;
        ``lower_right``: the chunks attend with ``causal_lower_right`` and no mask."""
        if order not in ORDERS:
            raise ValueError(f"adakv: order must be one of {ORDERS}, got {order!r}")
        if chunk_size >= N:
            return "one-shot", False
        # Chunks of unpadded prompts on an sdpa model whose every layer is evicted (no sliding
        # layers, no logit soft-capping) attend with causal_lower_right and the model builds
        # no [B, 1, n, N] mask per chunk (one host read of the mask, at prefill).
        why = self._lower_right_blocker(model, attention_mask)
        lower_right = why is None
        if why is None:
            why = self._layer_major_blocker(model, kwargs)
        if order == "layer" and why is not None:
            raise ValueError(f"adakv: order='layer' (layer-major chunked prefill) is not "
                             f"supported here: {why}; use order='chunk' (or 'auto', which "
                             f"picks it)")
        return ("chunk" if order == "chunk" or why is not None else "layer"), lower_right

    def _lower_right_blocker(self, model, attention_mask) -> Optional[str]:
        """Why the chunks cannot attend with ``causal_lower_right`` (``None``: they can)."""
        if self.original_implementation != "sdpa":
            return (f"the model's original attention is {self.original_implementation!r}, "
                    f"not 'sdpa'")
        if len(self.adakv_layers) != len(self.layers):
            return ("the model has sliding-window layers (transformers' own layers, which the "
                    "model's forward drives)")
        for m in attention_modules(model):
            if getattr(m, "attn_logit_softcapping", None) is not None:
                return "the model's attention uses logit soft-capping"
            if getattr(m, "sliding_window", None) is not None:
                return "the model's attention has a sliding window"
        if attention_mask is not None and not bool(attention_mask.all()):
            return ("the prompt is padded (attention_mask has zeros; padded chunks attend "
                    "with the model's mask, which its own forward builds)")
        return None

    def _layer_major_blocker(self, model, kwargs: dict) -> Optional[str]:
        """Why the cache cannot run the decoder layer by layer itself (``None``: it can)."""
        inner, missing = _decoder_glue(model)
        if missing:
            return (f"the model lacks the standard decoder glue ({', '.join(missing)}; "
                    f"needed: model.model or get_decoder() with embed_tokens, layers, "
                    f"rotary_emb, norm, and model.lm_head)")
        cfg = model.config.get_text_config(decoder=True)
        if getattr(cfg, "final_logit_softcapping", None) is not None:
            return "the model soft-caps its final logits"
        if getattr(cfg, "use_bidirectional_attention", False):
            return "the model's attention is bidirectional"
        if len(inner.layers[:cfg.num_hidden_layers]) != len(self.layers):
            return (f"the decoder has {len(inner.layers[:cfg.num_hidden_layers])} layers, the "
                    f"cache {len(self.layers)}")
        if kwargs:
            return (f"forward arguments {sorted(kwargs)} were given (layer-major takes only "
                    f"position_ids)")
        return None

    @contextlib.contextmanager
    def _prompt(self, rows: int, adding: bool, lower_right: bool, layer_major_len: int):
        """Set up (and always undo) the prefill state both orders share: the rows being added
        to a filled paged cache, the control flags, the layers' logical lengths."""
        ctl = self._control
        seen = [l.seen for l in self.adakv_layers]
        if adding:
            self.check_claimed()
            self.pool.rows = self.pool.add(rows)
            ctl.adding = True
            for l in self.adakv_layers:
                l.seen = 0
        ctl.lower_right = lower_right
        ctl.prompt_len = layer_major_len
        try:
            yield
        finally:
            ctl.final = True
            ctl.lower_right = False
            ctl.prompt_len = 0
            ctl.chunk_queries.clear()
            for l in self.adakv_layers:      # a prefill that raised keeps no prompt buffer
                l._prompt_buf = None
            if adding:
                ctl.adding = False
                self.pool.rows = None
                for l, n in zip(self.adakv_layers, seen):
                    l.seen = max(n, l.seen)

    def _prefill_chunk_major(self, model, input_ids, attention_mask, pos, chunk_size: int,
                             lower_right: bool, kwargs: dict):
        """Each chunk through the model's forward (one-shot: a single chunk); a generator
        (:meth:`_prefill_units`)."""
        N = input_ids.shape[1]
        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        out = None
        for a in range(0, N, chunk_size):
            b = min(a + chunk_size, N)
            self._control.final = b == N
            with skip_prompt_masks() if lower_right else contextlib.nullcontext():
                out = model(input_ids=input_ids[:, a:b],
                            attention_mask=None if attention_mask is None
                            else attention_mask[:, :b],
                            position_ids=None if pos is None else pos[..., a:b],
                            **cache_kwarg(self, model), use_cache=True, logits_to_keep=1,
                            **kwargs)
            yield (b - a) * n_layers
        return out

    def _prefill_layer_major(self, model, input_ids: Tensor, pos: Optional[Tensor],
                             chunk_size: int):
        """Layer by layer: every chunk of a decoder layer, then the next layer (the layer
        evicts after its last chunk). ``h [B, N, hidden]``, the hidden states of the whole
        prompt, is updated in place: chunk ``[a, b)`` of a layer reads its own rows of ``h``
        and the layer's held K/V, exactly what it reads in the chunk-major order, so every
        chunk computes the same values. Returns an output with ``.logits`` of the last
        position (``logits_to_keep=1``); a generator (:meth:`_prefill_units`): one unit per
        chunk of a layer."""
        inner, _ = _decoder_glue(model)
        cfg = model.config.get_text_config(decoder=True)
        N = input_ids.shape[1]
        ctl = self._control
        h = inner.embed_tokens(input_ids)
        if pos is None:                      # the model's default: the prompt starts at 0
            pos = torch.arange(N, device=h.device).unsqueeze(0)
        rope = inner.rotary_emb
        typed = "layer_type" in _params(rope.forward)     # Gemma 3: one RoPE per layer type
        types = getattr(cfg, "layer_types", None)
        rotary: dict = {}                    # (layer type, a) -> (cos, sin), shared by layers
        for i, layer in enumerate(inner.layers[:cfg.num_hidden_layers]):
            takes = _params(layer.forward)
            cache = cache_kwarg(self, layer)
            kind = types[i] if typed else None
            for a in range(0, N, chunk_size):
                b = min(a + chunk_size, N)
                ctl.final = b == N
                x, p = h[:, a:b], pos[..., a:b]
                if (kind, a) not in rotary:
                    rotary[kind, a] = rope(x, p, kind) if typed else rope(x, position_ids=p)
                kw = dict(attention_mask=None, position_ids=p, use_cache=True,
                          position_embeddings=rotary[kind, a], **cache)
                if "cache_position" in takes:       # transformers < 5.2x decoder layers
                    kw["cache_position"] = torch.arange(a, b, device=h.device)
                y = layer(x, **kw)
                h[:, a:b] = y[0] if isinstance(y, tuple) else y
                yield b - a
        # the final norm over the last chunk's rows, as the model's forward applies it to its
        # last chunk (a norm of the last row alone rounds differently on some CPU builds:
        # torch 2.13 under tensor parallelism), then the head of the last position
        last = (N - 1) // chunk_size * chunk_size
        logits = model.lm_head(inner.norm(h[:, last:].contiguous())[:, -1:])
        return _causal_lm_output(logits, self)

    def _side_cache(self) -> "AdaKVCache":
        """A new cache of the same model and settings whose sequences go into this cache's
        page store (:class:`~adakv_ops.hf.join.PrefillJob`)."""
        if self.pool is None:
            raise NotImplementedError("adakv: a prefill job needs storage='paged'")
        if len(self.adakv_layers) != len(self.layers):
            raise NotImplementedError("adakv: a prefill job is not supported with "
                                      "sliding-window layers")
        side = type(self)(self._model(), **self._arguments)
        side.pool.parent = self.pool
        return side

    def _adopt(self, side: "AdaKVCache") -> list[int]:
        """The sequences a finished prefill put in ``side`` (:meth:`_side_cache`) join this
        cache's batch as its last rows, pages untouched; returns their batch rows."""
        self.check_claimed()
        side.check_claimed()
        seqs = list(side.pool.seqs)
        rows = self.pool.adopt(side.pool)
        for mine, theirs in zip(self.adakv_layers, side.adakv_layers):
            mine._adopt(theirs, seqs)
        return rows

    @property
    def batch_size(self) -> int:
        """Rows of the cache's batch (0 before the first prompt)."""
        if self.pool is not None:
            return len(self.pool.seqs)
        layer = self.adakv_layers[0] if self.adakv_layers else None
        return (layer._batch or 0) if layer is not None else 0

    def remove_rows(self, rows) -> None:
        """Batch rows ``rows`` leave the cache (paged storage; a model without sliding
        layers): their pages go back to the free list at once, the other rows keep their rows
        and pages untouched and keep their order (row ``i`` of the next forwards is the
        ``i``-th remaining one). With the last row gone the cache is empty again (its store is
        kept for the next prompt). Continuous batching: rows join with :meth:`prefill` and
        leave here, between decode steps."""
        if self.pool is None:
            raise NotImplementedError("adakv: remove_rows needs storage='paged'")
        B, rows = self._batch_rows("remove_rows", rows)
        if len(set(rows)) != len(rows):
            raise ValueError(f"adakv: repeated row in {rows}")
        self.check_claimed()
        keep = [i for i in range(B) if i not in set(rows)]
        for layer in self.adakv_layers:
            layer._keep_rows(keep)
        self.pool.remove(rows)

    def _batch_rows(self, op: str, rows) -> tuple[int, list[int]]:
        """``(batch size, rows as a list)`` for an op on batch rows of a paged cache without
        sliding layers; a bad row raises naming the valid range."""
        if len(self.adakv_layers) != len(self.layers):
            raise NotImplementedError(f"adakv: {op} is not supported with sliding-window layers")
        B = self.batch_size
        rows = [rows] if isinstance(rows, int) else list(rows)
        for r in rows:
            if not is_int(r, 0, B - 1):
                raise ValueError(f"adakv: rows must be batch rows in [0, {B}), got {r!r}")
        return B, rows

    def fork_rows(self, rows) -> list[int]:
        """Copies of batch rows ``rows`` join the batch as new rows at the end (returned), each
        in pages of its own: the same kept rows, lengths and positions as its source, so it
        decodes exactly as the source does until their inputs differ (parallel sampling from
        one prompt; a benchmark filling a batch from a few real prefills). Paged storage, a
        model without sliding layers; a full pool raises ``OutOfPages`` (rows forked before
        it stay)."""
        if self.pool is None or self.pool.store is None:
            raise NotImplementedError("adakv: fork_rows needs storage='paged' and a filled cache")
        B, rows = self._batch_rows("fork_rows", rows)
        self.check_claimed()
        try:
            self.pool.fork(rows)
        finally:
            n = len(self.pool.seqs) - B          # forked before an OutOfPages, if any
            for layer in self.adakv_layers:
                layer._fork_rows(rows[:n])
        return list(range(B, B + n))

    def compress(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
        """:meth:`prefill` of an empty cache (the question-agnostic use: compress a context
        once, ask many questions)."""
        if self.get_seq_length() != 0:
            raise RuntimeError("adakv: compress() needs an empty cache")
        return self.prefill(input_ids, attention_mask, **kwargs)

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
        scales = {m.layer_idx: getattr(m, "scaling", None) for m in attention_modules(model)}
        o_projs = {m.layer_idx: o_proj_weight(m) for m in attention_modules(model)}
        for i, (layer, src) in enumerate(zip(self.layers, full_cache.layers)):
            if not isinstance(layer, EvictedLayer):
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
            layer._evict_prompt(q[:, :, q.shape[2] - W:], key.contiguous(), value.contiguous(),
                                ks, scales.get(i), o_projs.get(i))

    def snapshot(self) -> CacheSnapshot:
        """Record the current state (cheap: segment lengths are cloned, tensors referenced)."""
        states = []
        for layer in self.layers:
            if isinstance(layer, EvictedLayer):
                states.append(layer._snapshot())
            else:
                states.append((layer.keys, layer.values, getattr(layer, "cumulative_length", None),
                               layer.is_initialized))
        store = None
        if self.pool is not None and self.pool.store is not None:
            store = [self.pool.store.snapshot(q) for q in self.pool.seqs]
        return CacheSnapshot(layers=states, store=store, owner=weakref.ref(self),
                             rows=self._rows_identity())

    def _rows_identity(self) -> tuple:
        """What a snapshot's rows must still be for ``restore``: the page store and its
        sequences in row order (paged), the batch size (flat)."""
        if self.pool is not None:
            st = self.pool.store     # (by weak reference: a snapshot keeps no pages alive)
            return (None if st is None else weakref.ref(st), tuple(self.pool.seqs))
        return (self.batch_size,)

    def restore(self, snap: CacheSnapshot) -> None:
        """Put the cache back to ``snap`` (e.g. drop an answer appended after compression).
        The batch must hold the rows it held then: a row that joined, left or was forked
        since, or a ``reset()``, makes it raise before anything changes."""
        if snap.owner() is not self:
            raise ValueError("adakv: snapshot of another cache")
        if snap.rows != self._rows_identity():
            raise ValueError("adakv: restore: the cache's batch rows changed since the snapshot "
                             "(a row joined, left or was forked, or the cache was reset); a "
                             "snapshot restores only the batch it recorded")
        if snap.store is not None:
            for q, st in zip(self.pool.seqs, snap.store):
                self.pool.store.check_restorable(q, st)     # all rows checked before any change
            for q, st in zip(self.pool.seqs, snap.store):
                self.pool.store.restore(q, st)
        for layer, st in zip(self.layers, snap.layers):
            if isinstance(layer, EvictedLayer):
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
        if self.pool is not None:
            self.pool.reset()
        self._control.final = True
        self._control.chunk_queries.clear()

    def __repr__(self):
        s = self.settings
        return (f"AdaKVCache(method={s.method!r}, budget={s.budget}, window={s.window}, "
                f"alpha={s.alpha}, storage={s.storage!r}, layers={len(self.layers)}, "
                f"evicted={len(self.adakv_layers)})")


@torch.no_grad()
def generate_chunked(model, cache: AdaKVCache, input_ids: Tensor,
                     attention_mask: Optional[Tensor] = None, *, prefill_chunk_size: int,
                     max_new_tokens: int, **generate_kwargs) -> Tensor:
    """Greedy ``model.generate`` whose prompt is prefilled in chunks of ``prefill_chunk_size``
    tokens (:meth:`AdaKVCache.prefill`: one-shot kept sets, activations bounded by the
    chunk). Returns what ``model.generate(input_ids, attention_mask, cache=..., do_sample=False,
    max_new_tokens=...)`` returns with a one-shot prefill: the prompt followed by the new tokens.

    Why not ``generate(prefill_chunk_size=...)``: transformers' chunk loop gives the cache no
    sign of which forward ends the prompt, and Ada-KV must score the prompt once it is whole.
    With it, :class:`AdaKVCache` evicts after the first chunk and appends the later ones as
    continuations (like a question after ``compress``): it works, but keeps other rows."""
    if generate_kwargs.get("do_sample") or generate_kwargs.get("num_beams", 1) != 1:
        raise NotImplementedError("adakv: generate_chunked is greedy (do_sample=False, "
                                  "num_beams=1)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"adakv: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    out = cache.prefill(input_ids, attention_mask, chunk_size=prefill_chunk_size)
    first = out.logits[:, -1:].argmax(-1).to(input_ids.dtype)
    ids = torch.cat([input_ids, first], dim=1)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((ids.shape[0], 1))],
                                   dim=1)
    if max_new_tokens == 1:
        return ids
    return model.generate(input_ids=ids, attention_mask=attention_mask, **cache_kwarg(cache),
                          do_sample=False, max_new_tokens=max_new_tokens - 1, **generate_kwargs)
