"""How ``adakv_ops.hf`` hooks into ``transformers`` (and nothing else).

* :data:`CACHE_KWARG` / :func:`cache_kwarg`: the name of the cache argument of ``generate()`` and
  the model forward (``cache=`` since transformers 5.24, ``past_key_values=`` before).
* The attention function ``"adakv_<orig>"`` (registered with ``AttentionInterface``, the
  original mask function under the same name with ``AttentionMaskInterface``) and the per-model
  mailbox through which a cache layer's ``update`` hands itself to the attention call that
  follows: :func:`install` switches a model instance to it, :func:`restore_attention` back.
* :class:`QueryRecorder`: the last window queries of every layer, for ``evict_from``.

No model class is patched; a plain cache on the same model runs the original attention.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Optional

import torch
from torch import Tensor
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

__all__ = ["CACHE_KWARG", "QueryRecorder", "attention_modules", "cache_kwarg", "install",
           "key_start_from_mask", "o_proj_weight", "original_attn_implementation",
           "restore_attention", "tensor_parallel_group"]

SUPPORTED_ORIGINALS = ("sdpa", "eager")
_PREFIX = "adakv_"
MAILBOX = "_adakv_mailbox"
_RECORDER = "_adakv_query_recorder"

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


def is_compiling() -> bool:
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
        box = getattr(module, MAILBOX, None)
        layer = box.pop(module.layer_idx, None) if box is not None else None
        original = _original_attention(orig, module)
        if layer is None or not layer._owns(key):
            return original(module, query, key, value, attention_mask, **kwargs)
        return layer._attend(module, query, key, value, attention_mask, original, kwargs)

    adakv_attention.__name__ = f"adakv_attention_{orig}"
    adakv_attention.__qualname__ = adakv_attention.__name__
    return adakv_attention


_REGISTERED: set = set()


class _MaskSwitch:
    """Whether the adakv mask function builds masks. A plain attribute, not a ContextVar:
    torch.compile traces (and guards on) it in every supported torch; prefill is not
    reentrant across threads on one model anyway."""

    skip = False


@contextlib.contextmanager
def skip_prompt_masks():
    """Within this context the ``adakv_*`` mask function builds no mask (returns ``None``).
    Used by a chunked prefill of unpadded prompts on models whose every layer is evicted: the
    chunk attention applies its causal offset itself (``causal_lower_right``), so the model
    need not materialise a ``[B, 1, n, N]`` mask per chunk."""
    before = _MaskSwitch.skip
    _MaskSwitch.skip = True
    try:
        yield
    finally:
        _MaskSwitch.skip = before


def _make_mask_fn(original):
    def adakv_mask(*args, **kwargs):
        if _MaskSwitch.skip:
            return None
        return original(*args, **kwargs)

    adakv_mask.__name__ = f"adakv_{getattr(original, '__name__', 'mask')}"
    return adakv_mask


def _register(orig: str) -> str:
    name = _PREFIX + orig
    if name not in _REGISTERED:
        AttentionInterface.register(name, _make_attention_fn(orig))
        # The original mask function (sdpa_mask / eager_mask), unchanged outside
        # skip_prompt_masks().
        AttentionMaskInterface.register(name, _make_mask_fn(ALL_MASK_ATTENTION_FUNCTIONS[orig]))
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


def o_proj_weight(module) -> Optional[Tensor]:
    """The output projection weight ``[hidden, Hq * D]`` of an attention module (``o_proj`` in
    every supported family), or ``None``."""
    proj = getattr(module, "o_proj", None)
    w = getattr(proj, "weight", None)
    if hasattr(w, "to_local"):       # a tensor-parallel DTensor: this rank's columns
        w = w.to_local()
    return w if isinstance(w, torch.Tensor) else None


def tensor_parallel_group(model):
    """The process group of a model loaded with transformers' tensor parallelism (its
    ``o_proj`` weights are DTensors on a 1-D device mesh), or ``None``."""
    for m in attention_modules(model):
        w = getattr(getattr(m, "o_proj", None), "weight", None)
        mesh = getattr(w, "device_mesh", None)
        if mesh is not None and mesh.size() > 1:
            return mesh.get_group()
        return None
    return None


def attention_modules(model):
    for m in model.modules():
        if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "num_key_value_groups"):
            yield m


def key_start_from_mask(mask, B: int, N: int) -> Optional[Tensor]:
    """``[B]`` int32 first attended key of the last query row of a 4-D mask (left padding)."""
    if not isinstance(mask, Tensor) or mask.dim() != 4 or mask.shape[-1] < N:
        return None
    last = mask[:, 0, -1, mask.shape[-1] - N:]
    valid = last if last.dtype == torch.bool else last == 0
    ks = valid.to(torch.float32).argmax(-1).to(torch.int32)  # first attended column
    if ks.shape[0] != B:
        ks = ks.expand(B)
    return ks.contiguous()


def install(model) -> tuple[str, dict]:
    """Switch ``model`` (the instance) to ``"adakv_<orig>"`` and give every attention module
    the model's one mailbox. Returns ``(orig, mailbox)``; idempotent."""
    orig = original_attn_implementation(model)
    if orig not in SUPPORTED_ORIGINALS:
        raise ValueError(f"adakv: the model's attention implementation must be one of "
                         f"{SUPPORTED_ORIGINALS} (got {orig!r}); load it with "
                         f"attn_implementation='sdpa' or 'eager'")
    impl = _register(orig)
    if model.config._attn_implementation != impl:
        model.set_attn_implementation(impl)
    mailbox = None
    for m in attention_modules(model):
        mailbox = mailbox if mailbox is not None else getattr(m, MAILBOX, None)
    mailbox = {} if mailbox is None else mailbox
    for m in attention_modules(model):
        if getattr(m, MAILBOX, None) is not mailbox:
            setattr(m, MAILBOX, mailbox)
    return orig, mailbox


def mark_static(*tensors: Tensor) -> None:
    if not is_compiling():
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
        install(model)
        self.window = window
        self.windows: dict[int, Tensor] = {}
        self._modules = list(attention_modules(model))

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


