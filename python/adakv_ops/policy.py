"""The eviction policy: which prompt rows each head of a layer keeps (SPEC sections 4 to 6).

One place decides what every method keeps; every eviction site calls it:

* the one-shot prefill of ``adakv_ops.hf`` (flat and paged storage) and ``evict_from``;
* the last chunk of a chunked prefill (``PagedKVStore.finish_prefill``);
* decode-time re-eviction (``max_growth``), where each stored segment is scored on its own.

The policy only *selects*; writing the kept rows is the storage's job (``compact`` into a flat
cache, ``paged_compact_`` into pages). No ``transformers`` dependency.

Methods: ``full`` keeps everything; ``streaming`` the first ``n_sink`` valid prefix tokens and
the most recent ones (StreamingLLM as a score pattern); ``snapkv`` / ``pyramid`` score with the
observation window and keep ``C_l`` per head; ``ada_snapkv`` / ``ada_pyramid`` also allocate
the layer's ``Hk * C_l`` adaptively across heads (Ada-KV). Pyramid methods spread ``budget``
over the layers with :func:`adakv_ops.pyramid_budgets`.

The Ada-KV authors' follow-ups (SPEC section 7; the fp64 oracle and its decisions D1-D13 are
:mod:`adakv_ops.reference_followups`), in their default form (the window always kept, the
budget ``C`` counting prefix tokens only, as every method here):

* ``criticalkv`` / ``ada_criticalkv`` (7.1): the kvpress SnapKV base score (``score`` with
  ``avg`` pooling, kernel 5: mean over the window, pool, mean over the group, D3) and the value
  weight ``n = mean_g || v_i W_o[g] ||_1`` (``value_norm``). Stage 1 forces each head's top
  ``int(0.5 C_h) - W`` prefix tokens by base score (the window occupies the first ``W`` of the
  authors' ``int(0.5 C_h)``), stage 2 fills to the head's budget by ``(score + 1e-4) * n``.
  ``ada_criticalkv`` first marks each head's safeguard (``int(0.2 (C + W)) - W`` prefix
  tokens) and takes the per-head budgets from one global top ``Hk C`` over the layer, marked
  tokens first (``allocate`` with no floor); ``criticalkv`` gives every head ``C``.
* ``defensivekv`` (7.2): the defensive score (``defensive_score``: pooled per window query,
  rescaled to its prefix mass, max over the group and the window, the mean floor) times the
  value weight normalised across the layer's KV heads, the stage-1 floor (the tokens holding
  ``0.9 - window_bias`` of the plain SnapKV mass, clamped, raised to the row's maximum) and one
  global top ``Hk C`` over the layer's prefix tokens with no floor (``allocate`` with
  ``floor_alpha=0``).
* ``layer_defensivekv`` (7.3): the same scores, one global top ``n_layers Hk C`` over every
  layer's prefix tokens, with bounded memory (:class:`adakv_ops.cascade.LayerCascade`: after
  each layer only what can still win is kept, which re-trims earlier layers). Per-layer sizes
  vary with the data (not a static flat-cache size). :meth:`EvictionPolicy.keep_layer`.

Every selection is device work with no host read; the ``[B, H, L]`` ranking tensors are the
only temporaries. Those methods need the layer's values and its ``o_proj`` weight
(:meth:`EvictionPolicy.keep` takes both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops as _ops
from .budgets import pyramid_budgets

__all__ = ["EvictionPolicy", "Kept", "METHODS", "VALUE_METHODS", "streaming_scores"]

CRITICAL_EPS = 1e-4        # SPEC 7.1 stage-2 epsilon
CRITICAL_SAFEGUARD = 0.2   # SPEC 7.1 AdaCriticalKV safeguard share of C + W
DEFENSIVE_MASS = 0.9       # SPEC 7.2 step 5 target mass
FOLLOWUP_KERNEL = 5        # SPEC 7.1 / 7.2 avg_pool1d kernel

METHODS = ("full", "snapkv", "ada_snapkv", "pyramid", "ada_pyramid", "streaming", "criticalkv",
           "ada_criticalkv", "defensivekv", "layer_defensivekv")
#: methods that rank with the value weight (they need ``value`` and ``o_proj_weight``)
VALUE_METHODS = ("criticalkv", "ada_criticalkv", "defensivekv", "layer_defensivekv")
_ADAPTIVE = {"ada_snapkv": True, "ada_pyramid": True, "snapkv": False, "pyramid": False}


def streaming_scores(L: int, ks: Tensor, n_sink: int) -> Tensor:
    """StreamingLLM as a score pattern over ``[..., L]``: the first ``n_sink`` valid tokens
    above everything, then recency; ``ks`` (any shape) is the first valid column, and columns
    before it are ``-inf``."""
    n = torch.arange(L, device=ks.device, dtype=torch.float32)
    rank = n - ks.to(torch.float32).unsqueeze(-1)
    s = torch.where(rank < n_sink, 2.0 * L + n_sink - rank, n)
    return torch.where(rank < 0, torch.full_like(s, float("-inf")), s)


class Kept(NamedTuple):
    """What a layer keeps: ``kept_idx [B, H, L]`` / ``kept_count [B, H]`` as
    :func:`adakv_ops.select` returns them, the per-head ``budgets [B, H]`` (segment capacity of
    a flat cache), the number of window rows ``window`` every head keeps after its prefix
    (``min(window, N - key_start)``) and the layer budget ``C``."""

    kept_idx: Tensor
    kept_count: Tensor
    budgets: Tensor
    window: int
    C: int


@dataclass(frozen=True)
class EvictionPolicy:
    """The settings of a method, and the selection they imply (see the module docstring).

    ``budget`` is the average number of kept prefix tokens per head (window not counted),
    ``window`` the observation window; the rest are passed to ``score`` / ``allocate``."""

    method: str = "ada_snapkv"
    budget: int = 256
    window: int = 32
    alpha: float = 0.2
    pooling: str = "max"
    kernel_size: int = 7
    gqa_reduce: str = "mean"
    aggregate: str = "mean"
    rounding: str = "exact"
    n_sink: int = 4
    pyramid_beta: int = 20
    pyramid_exact_mean: bool = False
    as_written: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"adakv: method must be one of {METHODS}, got {self.method!r}")
        if self.as_written and self.method not in VALUE_METHODS:
            raise ValueError(f"adakv: as_written applies to {VALUE_METHODS}, not "
                             f"{self.method!r}")

    @property
    def needs_queries(self) -> bool:
        """Whether the selection reads the observation-window queries."""
        return self.method not in ("full", "streaming")

    @property
    def needs_values(self) -> bool:
        """Whether the selection reads the layer's values and ``o_proj`` weight."""
        return self.method in VALUE_METHODS

    @property
    def fixed_size(self) -> bool:
        """Whether every head's budget is exactly ``C`` or the layer total is ``H * C``
        (a static flat-cache size): true except for adaptive allocation with official
        rounding."""
        if self.method == "layer_defensivekv":
            return False
        return self.rounding == "exact" or self.method not in ("ada_snapkv", "ada_pyramid")

    @property
    def max_layer_budget(self) -> int:
        """The largest ``C_l`` a layer can get for any prompt (``full``: unbounded, not
        defined): pyramid layers get up to ``2 * budget``."""
        return 2 * self.budget if self.method in ("pyramid", "ada_pyramid") else self.budget

    def layer_budget(self, rank: int, n_layers: int, N: int, W: int) -> int:
        """``C_l`` of the layer of rank ``rank`` among ``n_layers`` evicted layers, for a
        prompt of ``N`` tokens with ``W`` window rows (``full``: ``N``)."""
        if self.method == "full":
            return N
        if self.method in ("pyramid", "ada_pyramid"):
            return pyramid_budgets(self.budget, n_layers, N, W, beta=self.pyramid_beta,
                                   exact_mean=self.pyramid_exact_mean)[rank]
        return self.budget

    def scores(self, q_window: Optional[Tensor], key: Tensor, key_start: Optional[Tensor] = None,
               scale: Optional[float] = None) -> Tensor:
        """``[B, H, N - W]`` float32 scores of the prefix of ``key [B, H, N, D]``
        (``W = q_window.shape[2]``; ``streaming`` takes ``W = min(window, N)`` and needs no
        queries). ``key_start [B]``: first valid column of each row (padding is ``-inf``)."""
        B, H, N, _ = key.shape
        if self.method == "streaming":
            W = q_window.shape[2] if q_window is not None else min(self.window, N)
            ks = (key_start if key_start is not None
                  else torch.zeros(B, device=key.device, dtype=torch.int32))
            return streaming_scores(N - W, ks, self.n_sink).unsqueeze(1).expand(B, H, N - W)
        return _ops.score(q_window, key, kernel_size=self.kernel_size, pooling=self.pooling,
                          aggregate=self.aggregate, gqa_reduce=self.gqa_reduce,
                          key_start=key_start, scale=scale)

    def budgets(self, scores: Tensor, C: int, key_start: Optional[Tensor] = None,
                shards=None) -> Tensor:
        """Per-head budgets ``[B, H]`` int32 for layer budget ``C``; ``shards``
        (:class:`adakv_ops.distributed.HeadShards`): ``scores`` are this rank's heads and the
        budgets are the single-device ones of those heads."""
        if self.method == "streaming":
            B, H, _ = scores.shape
            return torch.full((B, H), C, device=scores.device, dtype=torch.int32)
        return _allocate(scores, C, key_start, shards, floor_alpha=self.alpha,
                         adaptive=_ADAPTIVE[self.method], rounding=self.rounding)

    def keep(self, q_window: Optional[Tensor], key: Tensor, C: int,
             key_start: Optional[Tensor] = None, scale: Optional[float] = None,
             value: Optional[Tensor] = None, o_proj_weight: Optional[Tensor] = None,
             shards=None) -> Kept:
        """The whole selection for ``key [B, H, N, D]`` at layer budget ``C``: scores, budgets,
        top-``budget`` per head; ``full`` keeps every valid row (as its "window"). The
        :data:`VALUE_METHODS` also need ``value [B, H, N, D]`` and the layer's
        ``o_proj_weight [hidden, Hq * D]``. ``shards``
        (:class:`adakv_ops.distributed.HeadShards`, tensor parallelism): the tensors hold this
        rank's heads (``o_proj_weight`` its columns) and the result is the single-device
        selection of those heads (SPEC 8)."""
        B, H, N, _ = key.shape
        dev = key.device
        if self.method == "full":
            z = torch.zeros((B, H), device=dev, dtype=torch.int32)
            return Kept(torch.empty((B, H, 0), device=dev, dtype=torch.int32), z, z, N, N)
        W = q_window.shape[2] if q_window is not None else min(self.window, N)
        if self.needs_values:
            if value is None or o_proj_weight is None:
                raise ValueError(f"adakv: method {self.method!r} needs the layer's values and "
                                 f"o_proj weight")
            if self.method == "layer_defensivekv":
                raise ValueError("adakv: layer_defensivekv selects across layers: use "
                                 "keep_layer() with a LayerCascade")
            if self.method == "defensivekv":
                scores = self.defensive_scores(q_window, key, value, o_proj_weight, C, key_start,
                                               scale, shards)
                Wf, Cs = self._competition(C, W)
                budgets = _allocate(scores, Cs, key_start, shards)
                kept_idx, kept_count = _ops.select(scores, budgets, key_start=key_start)
                return Kept(kept_idx, kept_count, budgets, Wf, Cs)
            return self._keep_critical(q_window, key, value, o_proj_weight, C, key_start, scale,
                                       shards)
        s = self.scores(q_window, key, key_start, scale).contiguous()
        budgets = self.budgets(s, C, key_start, shards)
        kept_idx, kept_count = _ops.select(s, budgets, key_start=key_start)
        return Kept(kept_idx, kept_count, budgets, W, C)

    # -- the follow-up methods (SPEC section 7) -----------------------------------------------
    #
    # Default form: the window is kept outright and the prefix competes for C per head on
    # average. as_written (the authors' code, D6 / D9-D12): every valid column, window
    # included, competes for C + W per head (the window at its row's or the batch's maximum):
    # the selection then runs over all N columns with no fixed window (Kept.window = 0); the
    # scores of an fp16 / bf16 model are computed in its dtype, as the authors' code does
    # (D11, the *_model_dtype helpers below), those of a float32 model in float32.

    def _competition(self, C: int, W: int) -> tuple[int, int]:
        """``(window kept outright, slots per head competed for)``."""
        return (0, C + W) if self.as_written else (W, C)

    def cascade_slots(self, C: int, W: int) -> int:
        """Per-head slots of ``layer_defensivekv``'s :class:`LayerCascade`."""
        return self._competition(C, W)[1]

    def _keep_critical(self, q_window, key, value, o_proj_weight, C, key_start, scale,
                       shards=None) -> Kept:
        B, H, N, _ = key.shape
        W = q_window.shape[2]
        low = _model_dtype_form(self, key, shards)   # the authors' arithmetic (D11)
        if low:
            base = _critical_base_model_dtype(q_window, key, key_start, scale)
        else:
            base = _ops.score(q_window, key, kernel_size=FOLLOWUP_KERNEL, pooling="avg",
                              aggregate="mean", gqa_reduce="mean", key_start=key_start,
                              scale=scale)                                  # [B, H, L]
        Wf, Cs = self._competition(C, W)
        if self.as_written:   # the window columns compete at the row's maximum (D3)
            base = torch.cat([base, _window_columns(base, key_start, N, W, "row", shards)],
                             dim=2)
        if low:   # the stage-2 product in the model's dtype; the rankings in float32 (exact)
            vn = _value_norm_model_dtype(value, o_proj_weight, N - Wf)
            weighted = ((base + CRITICAL_EPS) * vn).float()
            base = base.float()
        else:
            vn = _ops.value_norm(value, o_proj_weight, length=N - Wf)
            weighted = (base + CRITICAL_EPS) * vn
        if self.method == "ada_criticalkv":
            # safeguard: each head's top int(0.2 (C + W)) by base score (the window first)
            marked = max(int((C + W) * CRITICAL_SAFEGUARD) - Wf, 0)
            mark = _top_mask(base, _full(B, H, marked, key), key_start)
            budgets = _allocate(_raise(base, mark), Cs, key_start, shards)
            # stage 1: int(0.5 C_h), C_h with the window (>= the safeguard)
            forced = torch.clamp((budgets + Wf) // 2 - Wf, min=marked).to(torch.int32)
        else:
            budgets = _full(B, H, Cs, key)
            forced = _full(B, H, max(int(0.5 * (C + W)) - Wf, 0), key)
        stage1 = _top_mask(base, forced, key_start)
        rank = _raise(weighted, stage1)
        kept_idx, kept_count = _ops.select(rank, budgets, key_start=key_start)
        return Kept(kept_idx, kept_count, budgets, Wf, Cs)

    def keep_layer(self, cascade, q_window: Tensor, key: Tensor, value: Tensor,
                   o_proj_weight: Tensor, C: int, key_start: Optional[Tensor] = None,
                   scale: Optional[float] = None, shards=None):
        """``layer_defensivekv``: this layer's defensive scores merged into ``cascade`` (a
        :class:`adakv_ops.cascade.LayerCascade` of the prefill). Returns ``(Kept, retrim)``:
        what this layer keeps now, and for every earlier layer of the cascade ``None`` or the
        mask of its retained prefix rows that stay (:meth:`LayerCascade.add`). ``shards``: the
        cascade runs on every rank over all heads' scores (gathered), each rank keeps its own
        heads' part."""
        Wf, Cs = self._competition(C, q_window.shape[2])
        scores = self.defensive_scores(q_window, key, value, o_proj_weight, C, key_start, scale,
                                       shards)
        if shards is None:
            kept_idx, kept_count, retrim = cascade.add(scores, key_start)
        else:
            kept_idx, kept_count, retrim = cascade.add(shards.gather_heads(scores), key_start)
            kept_idx, kept_count = shards.own(kept_idx), shards.own(kept_count)
            retrim = [None if k is None else shards.own(k) for k in retrim]
        return Kept(kept_idx, kept_count, kept_count, Wf, Cs), retrim

    def defensive_scores(self, q_window: Tensor, key: Tensor, value: Tensor,
                         o_proj_weight: Tensor, C: int, key_start: Optional[Tensor] = None,
                         scale: Optional[float] = None, shards=None) -> Tensor:
        """DefensiveKV's ranking scores ``[B, H, L]`` float32 (SPEC 7.2 steps 1-5, default
        form): the defensive score times the normalised value weight, the stage-1 tokens
        raised to the row's maximum; padding columns ``-inf``. ``as_written``: ``[B, H, N]``,
        the window columns at the maximum too, with the authors' ``window_bias`` (the last
        ``W`` prefix columns, averaged over the batch), their batch-wide maximum and their
        clamp ``int(L (1 - r) - W)`` with its negative slice (D9, D10), and, for a 16-bit
        model, their arithmetic in the model's dtype (D11, :func:`_defensive_parts_model_dtype`;
        float32 otherwise)."""
        B, H, N, _ = key.shape
        W = q_window.shape[2]
        L = N - W
        dev = key.device
        ks = _starts(key_start, B, dev)
        col = torch.arange(L, device=dev)
        valid = (col >= ks.view(B, 1, 1))                                  # [B, 1, L]
        neg_inf = torch.tensor(float("-inf"), device=dev)
        has = ks < L                                                        # a valid prefix
        low = _model_dtype_form(self, key, shards)   # the authors' arithmetic (D11)
        if low:
            R, snap, bias = _defensive_parts_model_dtype(q_window, key, value, o_proj_weight,
                                                         ks, scale, valid, has)
            R = torch.where(valid, R, neg_inf.to(R.dtype))
        else:
            R, snap, wmass = _ops.defensive_score(q_window, key, kernel_size=FOLLOWUP_KERNEL,
                                                  key_start=key_start, scale=scale)
            # the value weight normalised across the layer's KV heads (all ranks' heads)
            n = _ops.value_norm(value, o_proj_weight, length=L)
            total = (n if shards is None else shards.gather_heads(n)).sum(dim=1, keepdim=True)
            weight = n / total
            R = torch.where(valid, R * weight, neg_inf)
            if shards is not None:   # the mean over all query heads: each rank's over its own
                wmass = shards.mean_of_ranks(wmass)
            if self.as_written:   # one window_bias for the batch: rows with a prefix (D10)
                bias = (torch.where(has, wmass[:, 1], torch.zeros((), device=dev)).sum()
                        / has.sum().clamp(min=1)).expand(B)
            else:
                bias = wmass[:, 0]
        # stage-1 floor (7.2 step 5; D9): the tokens before the one whose cumulative share of
        # the head's plain SnapKV mass reaches 0.9 - window_bias, at most the clamp
        mass = torch.where(valid, snap, torch.zeros((), device=dev, dtype=snap.dtype))
        share = mass / mass.sum(dim=-1, keepdim=True)
        # descending, ties to the lower token; NaN then padding last (ranked lowest, D2)
        key_ = torch.where(valid, share.float().nan_to_num(nan=-1.0, posinf=2.0),
                           torch.tensor(-2.0, device=dev))
        sorted_share, order = key_.sort(dim=-1, descending=True, stable=True)
        if low:   # the authors' running sum in the model's dtype, NaN carried (a NaN share
            # makes every later running sum NaN, never >= threshold)
            cum = share.gather(-1, order).cumsum(dim=-1)
        else:
            cum = sorted_share.clamp(min=0).cumsum(dim=-1)
        # compared in cum's dtype (the model's in the 16-bit as_written form, like the authors'
        # tensor >= Python float)
        threshold = (DEFENSIVE_MASS - bias).view(B, 1, 1).to(cum.dtype)
        reached = cum >= threshold
        count = torch.where(reached.any(dim=-1), reached.to(torch.int8).argmax(dim=-1),
                            torch.zeros((), device=dev, dtype=torch.int64))  # [B, H]
        L_b, N_b = L - ks, N - ks
        if self.as_written:   # int(L (1 - r) - W), truncated toward zero; may be negative
            num = L_b * (C + W) - W * N_b
            clamp = torch.div(num, N_b.clamp(min=1), rounding_mode="trunc")
        else:
            clamp = torch.clamp(torch.div(L_b * (C + W), N_b.clamp(min=1),
                                          rounding_mode="floor") - W, min=0)
        count = torch.minimum(count, clamp.view(B, 1))
        # sorted[:count], Python slice semantics (a negative count drops the last |count|)
        count = torch.where(count < 0, (L_b.view(B, 1) + count).clamp(min=0), count)
        rank = torch.arange(L, device=dev).view(1, 1, L)
        forced = torch.zeros(B, H, L, device=dev, dtype=torch.bool).scatter(
            -1, order, rank < count.unsqueeze(-1))
        # the row's maximum (the batch's, as_written), NaN ignored (D8); NaN when every
        # score is NaN
        finite = torch.where(R.isnan(), neg_inf, R).amax(dim=(1, 2), keepdim=True)
        real = (~R.isnan() & valid).any(dim=-1).any(dim=-1).view(B, 1, 1)
        if shards is not None:   # over all heads: the maximum is exact in any order
            finite = shards.max(finite)
            real = shards.max(real.to(torch.int32)).to(torch.bool)
        if self.as_written:
            finite = finite.amax(dim=0, keepdim=True).expand(B, 1, 1)
            real = real.any(dim=0, keepdim=True).expand(B, 1, 1)
        top = torch.where(real, finite, torch.tensor(float("nan"), device=dev))
        scores = torch.where(forced, top, R)
        if self.as_written:   # the window columns compete at that maximum
            win = _window_columns(top.view(B, 1, 1).expand(B, H, 1), key_start, N, W, "value")
            scores = torch.cat([scores, win], dim=2)
        return scores.float().contiguous()


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _model_dtype_form(policy: "EvictionPolicy", key: Tensor, shards) -> bool:
    """Whether a follow-up's scores compute in the model's 16-bit dtype (``as_written`` of an
    fp16 / bf16 model, D11); refused under tensor parallelism, whose per-rank sums would round
    differently from one device's."""
    if not (policy.as_written and key.dtype in _LOW_PRECISION):
        return False
    if shards is not None:
        raise NotImplementedError(
            "adakv: the as_written follow-up forms of a 16-bit model score in the model's dtype "
            "(the authors' arithmetic) on one device only; under tensor parallelism use the "
            "default forms or a float32 model")
    return True


def _window_probs_model_dtype(q_window: Tensor, key: Tensor, ks: Tensor,
                              scale: Optional[float], has: Tensor) -> Tensor:
    """The window queries' softmax ``[B, Hq, W, N]`` in the keys' dtype ``cdt`` as the authors'
    code computes it (D1, D11): logits and their matmul in ``cdt``, the softmax over the
    visible keys (valid: from the row starts ``ks [B]``, the window causal) in float32 rounded
    to ``cdt``; rows with no valid prefix (``has`` false: not scored) are zeros."""
    B, H, N, D = key.shape
    Hq, W = q_window.shape[1], q_window.shape[2]
    L, cdt, dev = N - W, key.dtype, key.device
    logits = torch.matmul(q_window.to(cdt),
                          key.repeat_interleave(Hq // H, dim=1).transpose(-1, -2))
    logits = logits * scale if scale is not None else logits / math.sqrt(D)   # [B, Hq, W, N]
    n = torch.arange(N, device=dev).view(1, 1, N)
    t = torch.arange(W, device=dev).view(W, 1)
    visible = (n >= ks.view(B, 1, 1)) & (n <= L + t)                     # [B, W, N]
    logits = logits.masked_fill(~visible.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(cdt)
    return torch.where(has.view(B, 1, 1, 1), probs, torch.zeros((), device=dev, dtype=cdt))


def _pool_valid(x: Tensor, valid: Tensor) -> Tensor:
    """SPEC 7's ``avg_pool1d(kernel 5, padding 2, zeros counted)`` along the last axis of
    ``x [B, R, C, L]`` (in its dtype), each row pooled over its valid prefix only: the padding
    columns (zeros in ``x``) stand for the pool's zero padding, and what the pool spills into
    them is dropped (``valid [B, 1, L]``)."""
    B, R, C, L = x.shape
    k = FOLLOWUP_KERNEL
    pooled = F.avg_pool1d(x.reshape(B * R, C, L), k, stride=1, padding=k // 2,
                          count_include_pad=True).view(B, R, C, L)
    return torch.where(valid.unsqueeze(1), pooled, torch.zeros((), device=x.device,
                                                                 dtype=x.dtype))


def _value_norm_model_dtype(value: Tensor, o_proj_weight: Tensor, length: int) -> Tensor:
    """The value weight ``[B, H, length]`` in the values' 16-bit dtype as the authors' kernel
    computes it (D11): each query head's norm accumulated in float32 (the ``value_norm`` op,
    once per index in the group, not per head) and stored in the dtype, their group mean in
    the dtype."""
    B, H, N, D = value.shape
    hidden = o_proj_weight.shape[0]
    wo = o_proj_weight.view(hidden, H, -1, D)
    per_q = [_ops.value_norm(value, wo[:, :, g].reshape(hidden, H * D).contiguous(),
                             length=length).to(value.dtype)
             for g in range(wo.shape[2])]
    return torch.stack(per_q, dim=2).mean(dim=2)


def _critical_base_model_dtype(q_window: Tensor, key: Tensor, key_start: Optional[Tensor],
                               scale: Optional[float]) -> Tensor:
    """CriticalKV's base score (the kvpress SnapKV, SPEC 7.1) ``[B, H, L]`` in the keys'
    16-bit dtype as the authors' code computes it (D11): the window softmax rounded to the
    dtype, its mean over the window, the pool and the group mean in the dtype; padding
    columns ``-inf``. Equal to ``reference_followups.criticalkv_base_scores_ref`` with
    ``compute_dtype`` the keys' dtype (up to the order inside each reduction)."""
    B, H, N, _ = key.shape
    Hq, W = q_window.shape[1], q_window.shape[2]
    L, dev = N - W, key.device
    ks = _starts(key_start, B, dev)
    valid = torch.arange(L, device=dev) >= ks.view(B, 1, 1)                 # [B, 1, L]
    probs = _window_probs_model_dtype(q_window, key, ks, scale, ks < L)
    agg = probs[..., :L].mean(dim=2)                                   # [B, Hq, L]
    pooled = _pool_valid(agg.unsqueeze(2), valid).view(B, H, Hq // H, L)
    base = pooled.mean(dim=2)
    return torch.where(valid, base, torch.tensor(float("-inf"), device=dev, dtype=base.dtype))


def _defensive_parts_model_dtype(q_window: Tensor, key: Tensor, value: Tensor,
                                 o_proj_weight: Tensor, ks: Tensor,
                                 scale: Optional[float], valid: Tensor, has: Tensor
                                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 1-4 of DefensiveKV (SPEC 7.2) in a 16-bit model's dtype ``cdt`` as the authors'
    code computes them (D11; ``as_written`` only): the window softmax of
    :func:`_window_probs_model_dtype`, pooling, sums, maxima, the mean floor, the value
    weight's normalisation and product in ``cdt`` (the value weight of
    :func:`_value_norm_model_dtype`). Batched over rows and heads (padding columns take no
    part: ``ks [B]`` the row starts, ``valid [B, 1, L]`` their valid prefix columns, ``has [B]``
    the rows with a prefix), so it matches the oracle's per-row low-precision form
    (``reference_followups``, ``as_written=True``) up to the accumulation order inside each
    reduction. Returns
    ``(R [B, H, L]`` after step 4, ``snap [B, H, L]`` the unpooled SnapKV mean,
    ``window_bias [B]`` float64: the authors' batch-wide mean of the window queries' mass on
    the last ``W`` prefix columns over rows with a prefix, rounded to ``cdt``)."""
    B, H, N, D = key.shape
    Hq, W = q_window.shape[1], q_window.shape[2]
    G, L = Hq // H, N - W
    cdt, dev = key.dtype, key.device
    zero = torch.zeros((), device=dev, dtype=cdt)
    P = _window_probs_model_dtype(q_window, key, ks, scale, has)[..., :L]
    base = P.sum(dim=-1, keepdim=True)                                 # step 1
    pooled = _pool_valid(P, valid)                                     # step 2
    tot = pooled.sum(dim=-1, keepdim=True)
    pooled = torch.where(tot > 0, pooled / tot * base, zero)
    R = pooled.view(B, H, G, W, L).amax(dim=2).amax(dim=2)             # step 3
    L_b = (L - ks).clamp(min=1).view(B, 1, 1)
    R_mean = (torch.where(valid, R, zero).float().sum(dim=-1, keepdim=True) / L_b).to(cdt)
    R = torch.maximum(R, R_mean)
    vn = _value_norm_model_dtype(value, o_proj_weight, L)              # step 4
    R = R * (vn / vn.sum(dim=1, keepdim=True))
    snap = P.view(B, H, G, W, L).mean(dim=2).mean(dim=2)               # step 5's SnapKV mean
    # the authors' window_bias: the last W prefix columns (all of a shorter prefix), averaged
    # over every query head and window query of the rows that have a prefix (D10)
    slip = P[..., max(L - W, 0):].sum(dim=-1).float()                  # [B, Hq, W]
    rows = has.to(torch.float32)
    bias = ((slip.sum(dim=(1, 2)) * rows).sum() / (rows.sum() * Hq * W).clamp(min=1))
    bias = bias.to(cdt).to(torch.float64).expand(B)
    return R, snap, bias


def _allocate(scores: Tensor, C: int, key_start: Optional[Tensor], shards=None,
              floor_alpha: float = 0.0, adaptive: bool = True, rounding: str = "exact") -> Tensor:
    """``allocate`` (no floor by default: the follow-ups' global top-k); with ``shards`` over
    every rank's heads (gathered), this rank's heads' budgets returned."""
    full = scores if shards is None else shards.gather_heads(scores)
    b = _ops.allocate(full.contiguous(), C, floor_alpha=floor_alpha, adaptive=adaptive,
                      rounding=rounding, key_start=key_start)
    return b if shards is None else shards.own(b)


def _window_columns(x: Tensor, key_start: Optional[Tensor], N: int, W: int,
                    what: str, shards=None) -> Tensor:
    """The ``W`` window columns ``[B, H, W]`` of an ``as_written`` score: ``what="row"``: the
    maximum over the row's valid prefix scores ``x [B, H, L]`` of all heads (0 when there is
    none, D3); ``"value"``: ``x [B, H, 1]`` itself. Padding columns are ``-inf``."""
    B, H = x.shape[0], x.shape[1]
    L = N - W
    dev = x.device
    if what == "row":
        v = x.amax(dim=(1, 2)) if L > 0 else torch.zeros(B, device=dev)
        if shards is not None:
            v = shards.max(v)
        v = torch.where(torch.isinf(v) & (v < 0), torch.zeros((), device=dev), v)
        v = v.view(B, 1, 1).expand(B, H, W)
    else:
        v = x.expand(B, H, W)
    ks = _starts(key_start, B, dev)
    col = L + torch.arange(W, device=dev)
    return torch.where(col.view(1, 1, W) >= ks.view(B, 1, 1), v,
                       torch.tensor(float("-inf"), device=dev))


def _starts(key_start: Optional[Tensor], B: int, device) -> Tensor:
    """``key_start`` as int64 ``[B]`` (zeros without padding)."""
    if key_start is None:
        return torch.zeros(B, device=device, dtype=torch.int64)
    return key_start.to(torch.int64)


def _full(B: int, H: int, n: int, like: Tensor) -> Tensor:
    return torch.full((B, H), n, device=like.device, dtype=torch.int32)


def _top_mask(scores: Tensor, counts: Tensor, key_start: Optional[Tensor]) -> Tensor:
    """``[B, H, L]`` bool: each head's top ``counts[b, h]`` valid tokens (``select``'s order)."""
    idx, _ = _ops.select(scores.contiguous(), counts.contiguous(), key_start=key_start)
    hit = torch.zeros(scores.shape[0], scores.shape[1], scores.shape[2] + 1,
                      device=scores.device, dtype=torch.bool)
    # kept_idx is -1 filled: those land in the spare last column
    hit.scatter_(-1, torch.where(idx < 0, scores.shape[2], idx).to(torch.int64), True)
    return hit[..., :-1]


def _raise(scores: Tensor, mask: Tensor) -> Tensor:
    """``scores`` with the ``mask``ed tokens above every other (their own order is not needed:
    they are all kept)."""
    return torch.where(mask, torch.tensor(float("inf"), device=scores.device),
                       scores).contiguous()
