"""A decode forward for Llama-like attention modules with the rotary embedding fused into the
paged append: :func:`install_rotary_decode` (opt-in; ``Engine(rotary_append=True)``).

Why: in transformers' attention forward a decode step rotates ``q`` and ``k``
(``apply_rotary_pos_emb``) before the cache sees them. Compiled, that is one kernel for ``q``
(RoPE and the layout the decode kernel reads), one for ``k`` (the same for the append), one
copy of ``v`` and the append itself: four launches per layer of ~1-3 us each that move a few
hundred KB (torch.profiler of the engine's step on an H100 at batch 64, 2026-12-07:
0.30 ms of a 9.6 ms step, `benchmarks/results/serve-fork-32k-profile-h100-2026-12-07-night.jsonl`).
``paged_append_rotary_`` does all four in one launch, reading the projections' output in
place (strided views of one fused QKV product).

How: :func:`install_rotary_decode` gives each supported attention module (the classes of
:data:`SUPPORTED`) a subclass whose ``forward`` takes this path when its cache layer is a
paged layer in a decode step (:meth:`~adakv_ops.hf.paged.PagedLayer.rotary_decode_ready`) and
the step is an ordinary one (rotary tables of the head dim, no query recorder, no sliding
window, no logit softcapping); every other call (prefill, a plain cache, another storage) runs
the class's own forward unchanged. The subclass adds no state (state dicts are unchanged);
:func:`uninstall_rotary_decode` gives the modules their class back (do that before pickling
the whole model object: the subclass is made at run time and has no importable name). The
projections, the q/k norms (Qwen3) and ``o_proj`` are the module's own, so fused projections,
routed GEMMs and tensor-parallel hooks apply as in the original forward.

Numerics: the rotation runs in float32 and is rounded once (what ``torch.compile`` makes of
``apply_rotary_pos_emb``; eager transformers rounds each product in the model dtype), so in
half precision a step's K/V may differ from the unfused path by a rounding step.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .registration import _RECORDER

__all__ = ["SUPPORTED", "install_rotary_decode", "uninstall_rotary_decode"]

#: attention classes whose forward is transformers' Llama one (projections, optional q/k norms
#: over the head dim, ``apply_rotary_pos_emb`` with ``rotate_half``, cache update, attention,
#: ``o_proj``); checked by name so that no model module is imported here
SUPPORTED = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")

_SUBCLASSES: dict = {}


def _cache_of(kwargs: dict):
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _fused_step(module: nn.Module, hidden_states: Tensor, kwargs: dict) -> Optional[Tensor]:
    """The attention output of a fused decode step, or ``None`` where the step is not one."""
    cache = _cache_of(kwargs)
    layers = getattr(cache, "layers", None)
    if layers is None or module.layer_idx >= len(layers):
        return None
    layer = layers[module.layer_idx]
    ready = getattr(layer, "rotary_decode_ready", None)
    if ready is None or not ready():
        return None
    # Mistral keeps its window on the config, the others on the module (None: full attention)
    window = getattr(module, "sliding_window",
                     getattr(getattr(module, "config", None), "sliding_window", None))
    if (getattr(module, _RECORDER, None) is not None or window is not None
            or getattr(module, "attn_logit_softcapping", None) is not None):
        return None
    position_embeddings = kwargs.get("position_embeddings")
    if position_embeddings is None or hidden_states.dim() != 3:
        return None
    cos, sin = position_embeddings
    D = module.head_dim
    if cos.dim() != 3 or cos.shape[-1] != D:      # partial rotary, other layouts: not fused
        return None
    B, T, _ = hidden_states.shape
    q = module.q_proj(hidden_states).view(B, T, -1, D)
    k = module.k_proj(hidden_states).view(B, T, -1, D)
    v = module.v_proj(hidden_states).view(B, T, -1, D)
    if getattr(module, "q_norm", None) is not None:
        q, k = module.q_norm(q), module.k_norm(k)
    if cos.dtype != k.dtype:         # e.g. autocast: the op takes float32 or the K/V dtype
        cos, sin = cos.float(), sin.float()
    out = layer.decode_rotary(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cos, sin,
                              module.scaling)
    return module.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class _RotaryDecodeAttention:
    """Mixed in front of a supported attention class (see the module docstring)."""

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        out = None if args else _fused_step(self, hidden_states, kwargs)
        if out is None:
            return super().forward(hidden_states, *args, **kwargs)
        return out, None


def _subclass(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(f"RotaryDecode{cls.__name__}", (_RotaryDecodeAttention, cls), {})
        _SUBCLASSES[cls] = sub
    return sub


def install_rotary_decode(model: nn.Module) -> int:
    """Give every supported attention module of ``model`` the fused decode forward; returns how
    many modules have it (idempotent)."""
    n = 0
    for module in model.modules():
        cls = type(module)
        if issubclass(cls, _RotaryDecodeAttention):
            n += 1
            continue
        if cls.__name__ not in SUPPORTED or not all(
                hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim",
                                             "scaling", "layer_idx")):
            continue
        module.__class__ = _subclass(cls)
        n += 1
    return n


def uninstall_rotary_decode(model: nn.Module) -> int:
    """Undo :func:`install_rotary_decode`; returns how many modules got their class back."""
    n = 0
    for module in model.modules():
        cls = type(module)
        if issubclass(cls, _RotaryDecodeAttention):
            module.__class__ = next(c for c in cls.__mro__[1:]
                                    if not issubclass(c, _RotaryDecodeAttention))
            n += 1
    return n
