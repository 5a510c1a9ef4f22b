"""Slow fp64 reference of the Ada-KV authors' follow-up methods (SPEC section 7, issue 14).

CriticalKV and AdaCriticalKV (SPEC 7.1), DefensiveKV (7.2) and Layer-DefensiveKV (7.3), written
for clarity (Python loops over batch rows and heads, float64 arithmetic, stable sorts); the
oracle the future CPU/CUDA kernels are tested against. Not for a serving path.

Conventions are those of :mod:`adakv_ops.reference`: batch ``B``, query heads ``Hq``, KV heads
``Hk``, ``G = Hq // Hk`` (query head ``j`` reads KV head ``j // G``), window ``W`` (the last
``W`` prompt tokens, taken from ``q_window``), prompt ``N``, prefix ``L = N - W``, optional
left padding ``key_start [B]`` (valid tokens of row ``b``: ``[ks_b, N)``; ``N_b = N - ks_b``,
``L_b = L - ks_b``, valid window ``[max(ks_b, L), N)``). Every ranking uses the library's total
order (:func:`adakv_ops.reference._stable_desc_order`): higher first, ties to the lower layer,
then the lower head, then the lower token; NaN lowest (below ``-inf``).

Budget unit. ``C`` is this library's budget: prefix tokens per KV head on average, window not
counted. kvpress keeps ``int(N (1 - r))`` slots per head *window included*, so the same memory
is ``C + W`` slots per head (SPEC 7). Every selection here returns the kept columns over all
``N`` positions (prefix and window), ascending, ``-1`` filled; ``kept_count`` includes the
window. A row with ``N_b <= C + W`` evicts nothing (every head keeps its ``N_b`` valid tokens;
the library's rule, SPEC 2 step 6).

Sources read (for understanding; no code copied): FFY0/DefensiveKV @ 9251b95
(``kvpress/presses/efficient_defensivekv_press.py``, ``efficient_layer_defensivekv_press.py``,
``efficient_ada_scorer_press.py``, ``efficient_ada_global_scorer_press.py``,
``kvpress/ops/vw_norm.py``) and FFY0/AdaKV-in-NVIDIA-kvpress branch ``criticalkv`` @ 88f5b1f
(``kvpress/presses/criticalkv_press.py``, ``snapkv_press.py``, ``scorer_press.py``).

Decisions where SPEC section 7 is silent (each with its evidence)
----------------------------------------------------------------------------------------------
D1  Window softmax (all methods). Logits of the ``W`` window queries against all ``N`` keys,
    window block causal (query ``t`` at position ``L + t`` sees keys ``<= L + t``), padding keys
    excluded, softmax over the visible keys, then only the prefix columns are used. This is
    SPEC section 1 and exactly the authors' ``compute_window_attention`` (``triu`` mask with
    ``diagonal = q_len - window + 1``, softmax over all ``q_len`` keys, slice ``[..., :-W]``).
    Scale ``1/sqrt(D)`` unless given. float64 here; the authors cast the probabilities to the
    model dtype (bf16) -- reproduced by ``defensive_scores_ref(as_written=True)`` and by the
    CriticalKV functions' ``compute_dtype`` (D11).
D2  Padding (an extension: the authors' code has none). Each batch row is computed on its own
    valid slice ``[ks_b, N)`` exactly as if it were an unpadded prompt of ``N_b`` tokens
    (pooling, the rescale sum, the mean floor, the normalisations and the stage-1 clamp all see
    only valid columns), so a padded row gives the same kept set as that row alone. Padding
    columns score ``-inf`` and are never candidates. Coupling across batch rows exists only in
    ``as_written`` DefensiveKV (D10).
D3  CriticalKV base score (7.1): mean over the window queries per query head, ``avg_pool1d``
    (kernel 5, padding 2, zeros counted) per query head, then the mean over the group: the
    kvpress ``SnapKVPress.score`` order. Both reductions are linear, so this equals
    ``reference.score_ref(pooling="avg", kernel_size=5)`` up to rounding (tested). The window
    columns get the maximum over the row's valid prefix scores of all heads (0 when the row
    has no valid prefix); kvpress takes ``scores.max()`` over the whole batch -- identical for
    ``B = 1``, the only batch size its adaptive press supports (next point).
D4  AdaCriticalKV counts are per batch row. The authors' ``head_budgets`` is accumulated over
    the flattened batch (a ``[Hk]`` vector summing to ``B Hk (C + W)``), which is only
    meaningful for ``B = 1``; per row is what the method means.
D5  CriticalKV stage sizes. Uniform stage 1: ``int(first_stage_ratio * (C + W))`` (the authors'
    ``int((1 - r) q_len 0.5)``); adaptive safeguard ``int((C + W) * alpha)`` (Python float, as
    ``int(n_kept * alpha_safeguard)``); adaptive stage 1 ``int(C_h * 0.5)`` evaluated in float32
    (the authors multiply an int64 tensor by a Python float). The safeguard and stage-1 tokens
    are *forced*: the authors mark them with ``finfo.max`` and the marks survive the stage-2
    product ``(finfo.max + eps) * n`` unless ``n == 0``; here they are forced unconditionally.
    Since the safeguard and stage 1 are both prefixes of one per-head ranking by base score,
    the forced set is that ranking's first ``max(n_safe, int(0.5 C_h))`` tokens. Stage 2 fills
    each head to ``C_h`` (``C + W`` uniform) with the other tokens ranked by
    ``(score + 1e-4) * n`` (``n`` over all ``N`` tokens, window included, as kvpress passes all
    values).
D6  CriticalKV default vs ``as_written``. ``as_written`` is SPEC 7.1 literally: the window
    competes with its row-max base score, so on ties with the natural maximum (order: lower
    token first) or when stage 1 is smaller than ``W`` (``C < W``) window tokens can fall to
    stage 2 and be evicted. Default: the window ranks above every prefix token in every stage
    (what the authors' padding comment "use max score to make sure the window is not pruned"
    intends) and is always kept; safeguard and stage-1 counts are unchanged (the window
    occupies the first of them). The two agree whenever the literal run keeps the window and
    ranks it first.
D7  DefensiveKV rescale (7.2 step 2): a pooled row whose sum is 0 (its prefix mass is 0)
    stays 0 instead of 0/0.
D8  DefensiveKV value weight (7.2 step 4): ``n`` over the prefix values only (the authors pass
    ``values[..., :-W, :]``), divided by its sum over the layer's KV heads with no epsilon; a
    token whose norm is 0 in every head gives 0/0 = NaN, which ranks lowest. The maximum used
    for forced tokens and the window ignores NaN (``torch.max`` would propagate it).
D9  DefensiveKV stage-1 floor (7.2 step 5). ``count`` = index of the first sorted position
    whose cumulative normalised mass is ``>= 0.9 - window_bias`` (the authors'
    ``argmax(cumsum >= threshold)``: 0 when none is), ties in the sort by lower token.
    Clamp: SPEC's ``int(L (1 - r)) - W`` with ``1 - r = (C + W) / N``, computed exactly in
    integers: default ``max(0, floor(L_b (C + W) / N_b) - W)``; ``as_written`` the authors'
    ``int(L (1 - r) - W)`` (truncation toward zero) and, when that is negative, their Python
    slice ``sorted[:k]`` with ``k < 0`` (forces all but the last ``|k|`` tokens: a short-prompt
    slip reproduced, not fixed by default). The clamp itself uses ``L`` where ``N`` was
    probably meant (``q_len`` is re-bound to the prefix length inside ``vwl1norm``); SPEC writes
    ``L`` so both modes keep it. With a float ``r`` the authors' product can land one lower
    when ``L (1 - r)`` is within rounding of an integer; here ``r`` is never materialised.
    Forced tokens get the maximum score over the row's heads (default) or over the whole
    batch (``as_written``, their ``scores.max().item()``); the window columns get the same
    value (their ``F.pad``).
D10 ``window_bias``. Default (the intended quantity): the mean, over the row's query heads
    and window queries, of each window query's mass on the window columns. ``as_written`` (the
    slip): the mass on the last ``W`` *prefix* columns (the slice ``[..., -W:]`` taken after
    ``[..., :-W]``; all prefix columns when ``L_b < W``), averaged over the whole batch, heads
    and queries (rows with no valid prefix are left out of that mean). Default averages per
    batch row so that a row's result does not depend on its batch.
D11 ``as_written`` DefensiveKV computes in bf16 as the authors do (logits and the matmul in
    bf16, softmax in float32 rounded to bf16, pooling / sums / max / mean floor / cumsum in bf16,
    the value norm accumulated in float32 and stored in bf16 like their Triton kernel, the
    threshold compared in bf16 as torch promotes a Python float). Accumulation order inside
    those ops is the CPU's, so it reproduces the authors' arithmetic, not a GPU run bit for
    bit. ``compute_dtype`` overrides the dtype (e.g. float64 to isolate the logic slips).
    CriticalKV's functions take ``compute_dtype`` too (default float64): in a 16-bit model's
    dtype the kvpress base score computes as above (logits, the softmax rounded to the dtype,
    the means over the window and the group and the pool in it), the value norm as above,
    and the stage-2 product ``(score + eps) * n`` in it; the library's ``as_written``
    CriticalKV forms of a 16-bit model use that arithmetic.
D12 DefensiveKV allocation (7.2 step 6) and Layer-DefensiveKV (7.3). ``as_written``: one
    global top ``n_layers Hk (C + W)`` over every valid column of every layer (window inside
    the competition at its layer's maximum, no per-layer minimum, a window or a whole segment
    can be dropped), ties to the lower layer (their ``torch.stack`` is layer-major), then head,
    then token. Default: every head's valid window (``min(W, N_b)`` tokens) is kept outright,
    and the prefix tokens of all layers compete for the remaining ``n_layers Hk C`` slots under
    the same order; stage-1 forced tokens keep their *layer's* maximum (they are not forced
    across layers: forcing them would make the allocation uniform whenever every head's floor
    saturates its clamp). A segment is therefore never empty (it holds its window) unless its
    row has no valid token at all. Whenever the literal run keeps every window, both forms
    select the same tokens. ``n_layers = 1`` is DefensiveKV.
D13 Bounded Layer-DefensiveKV (7.3): layers arrive one at a time; after each, only the current
    top ``K`` candidates are retained (``K = n_layers Hk C`` prefix candidates plus the windows
    seen so far, ``n_layers Hk (C + W)`` candidates in ``as_written``), which re-trims earlier
    layers. Exact: a candidate outside the top ``K`` of what has been seen already has ``K``
    candidates above it, which stay, so it cannot be in the final top ``K``; and by induction the
    retained set is the top ``K`` of everything seen. Candidates held after a step never exceed
    ``n_layers Hk (C + W)``; while a layer is merged at most one layer's candidates more.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .reference import _fail, _key_start_list, _stable_desc_order

__all__ = [
    "criticalkv_base_scores_ref",
    "value_norm_ref",
    "criticalkv_select_ref",
    "ada_criticalkv_select_ref",
    "criticalkv_ref",
    "defensive_stage1_count_ref",
    "defensive_scores_ref",
    "defensive_select_ref",
    "defensive_allocate_ref",
    "layer_defensive_select_ref",
    "layer_defensive_allocate_ref",
    "layer_defensive_bounded_ref",
    "defensivekv_ref",
    "LayerKept",
    "CascadeStats",
]

CRITICAL_EPS = 1e-4  # SPEC 7.1 stage-2 epsilon
FIRST_STAGE_RATIO = 0.5  # SPEC 7.1 stage-1 share
SAFEGUARD_ALPHA = 0.2  # SPEC 7.1 AdaCriticalKV safeguard
DEFENSIVE_MASS = 0.9  # SPEC 7.2 step 5 target cumulative mass
POOL_KERNEL = 5  # SPEC 7.1 / 7.2 avg_pool1d kernel


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        _fail(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_qk(q_window: torch.Tensor, key: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    _check_float("q_window", q_window)
    _check_float("key", key)
    if q_window.dim() != 4:
        _fail(f"q_window must be 4-D [B, Hq, W, D], got shape {tuple(q_window.shape)}")
    if key.dim() != 4:
        _fail(f"key must be 4-D [B, Hk, N, D], got shape {tuple(key.shape)}")
    B, Hq, W, D = q_window.shape
    Bk, Hk, N, Dk = key.shape
    if B != Bk or D != Dk:
        _fail(f"q_window {tuple(q_window.shape)} and key {tuple(key.shape)}: "
              "batch or head dim differ")
    if Hk == 0 or Hq % Hk != 0:
        _fail(f"Hq={Hq} must be a positive multiple of Hk={Hk}")
    if not 1 <= W <= N:
        _fail(f"window W={W} must satisfy 1 <= W <= N={N}")
    return B, Hq, Hk, W, N, D


def _check_value(value: torch.Tensor, key: torch.Tensor) -> None:
    _check_float("value", value)
    if tuple(value.shape) != tuple(key.shape):
        _fail(f"value shape {tuple(value.shape)} must equal key shape {tuple(key.shape)}")


def _check_o_proj(o_proj_weight: torch.Tensor, Hq: int, D: int) -> int:
    _check_float("o_proj_weight", o_proj_weight)
    if o_proj_weight.dim() != 2 or o_proj_weight.shape[1] != Hq * D:
        _fail(f"o_proj_weight must be [hidden, Hq * D] = [hidden, {Hq * D}], "
              f"got {tuple(o_proj_weight.shape)}")
    return int(o_proj_weight.shape[0])


def _check_budget(C: int, W: int) -> None:
    if isinstance(C, bool) or not isinstance(C, int) or C < 0:
        _fail(f"budget C must be an int >= 0, got {C!r}")
    if isinstance(W, bool) or not isinstance(W, int) or W < 1:
        _fail(f"window W must be an int >= 1, got {W!r}")


def _compute_dtype(compute_dtype: Optional[torch.dtype],
                   default: torch.dtype = torch.float64) -> torch.dtype:
    """The arithmetic dtype of a score (D11): ``compute_dtype`` or ``default``, a float dtype."""
    cdt = compute_dtype if compute_dtype is not None else default
    if not isinstance(cdt, torch.dtype) or not cdt.is_floating_point:
        _fail(f"compute_dtype must be a floating dtype, got {cdt!r}")
    return cdt


def _ks(key_start: Optional[torch.Tensor], B: int, N: int) -> list[int]:
    if key_start is not None:
        if not isinstance(key_start, torch.Tensor) or key_start.is_floating_point() \
                or key_start.dtype == torch.bool or key_start.is_complex():
            _fail("key_start must be an integer tensor [B]")
    return _key_start_list(key_start, B, N)


def _check_scores(name: str, scores: torch.Tensor, W: int) -> tuple[int, int, int]:
    _check_float(name, scores)
    if scores.dim() != 3:
        _fail(f"{name} must be 3-D [B, Hk, N], got shape {tuple(scores.shape)}")
    B, Hk, N = scores.shape
    if Hk == 0:
        _fail(f"{name} must have Hk >= 1")
    if not 1 <= W <= N:
        _fail(f"window W={W} must satisfy 1 <= W <= N={N}")
    return B, Hk, N


def _scale_logits(logits: torch.Tensor, D: int, scale: Optional[float]) -> torch.Tensor:
    if scale is not None:
        return logits * scale
    return logits / math.sqrt(D) if D > 0 else logits  # D = 0: every logit is 0


# ----------------------------------------------------------------------------------------------
# shared pieces: window softmax of one row, value norm, orders


def _row_window_probs(q_row: torch.Tensor, k_row: torch.Tensor, W: int, G: int,
                      scale: Optional[float], cdt: torch.dtype) -> torch.Tensor:
    """Softmax of the ``W`` window queries ``q_row [Hq, W, D]`` over the valid keys
    ``k_row [Hk, N_b, D]`` of one row (D1): ``[Hq, W, N_b]`` in ``cdt``. Requires ``N_b > W``
    (every window query valid). float64: softmax in float64; a lower ``cdt``: logits in ``cdt``
    and the softmax in float32 rounded to ``cdt`` (the authors' bf16 path)."""
    Hq, _, D = q_row.shape
    N_b = k_row.shape[1]
    L_b = N_b - W
    q = q_row.to(cdt)
    k = k_row.to(cdt).repeat_interleave(G, dim=0)  # [Hq, N_b, D]
    logits = _scale_logits(torch.matmul(q, k.transpose(-1, -2)), D, scale)  # [Hq, W, N_b]
    n = torch.arange(N_b).view(1, N_b)
    t = torch.arange(W).view(W, 1)
    visible = n <= L_b + t  # [W, N_b]: prefix all visible, window causal
    logits = logits.masked_fill(~visible, float("-inf"))
    if cdt == torch.float64:
        return torch.softmax(logits, dim=-1)
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(cdt)


def _row_value_norm(v_row: torch.Tensor, wo: torch.Tensor, G: int,
                    cdt: torch.dtype) -> torch.Tensor:
    """``n [Hk, n_tok]`` of one row (SPEC 7.1): mean over the group's query heads ``j`` of
    ``|| v_i @ wo[j] ||_1``, ``wo [Hq, D, hidden]``. float64: all in float64. A lower ``cdt``
    (the authors' Triton kernel): products of ``cdt`` inputs accumulated in float32, each norm
    stored in ``cdt``, the group mean in ``cdt``."""
    Hk, n_tok, _ = v_row.shape
    acc = torch.float64 if cdt == torch.float64 else torch.float32
    per_q = []
    for j in range(Hk * G):
        h = j // G
        prod = v_row[h].to(cdt).to(acc) @ wo[j].to(cdt).to(acc)  # [n_tok, hidden]
        per_q.append(prod.abs().sum(dim=-1).to(cdt))
    if not per_q:
        return torch.zeros(Hk, n_tok, dtype=cdt)
    return torch.stack(per_q).view(Hk, G, n_tok).mean(dim=1)


def _wo_heads(o_proj_weight: torch.Tensor, Hq: int, D: int) -> torch.Tensor:
    """``o_proj.weight^T`` viewed as ``[Hq, D, hidden]``: ``wo[j]`` maps head ``j``'s output to
    the hidden state (``o_proj(x) = x @ weight^T``)."""
    hidden = o_proj_weight.shape[0]
    return o_proj_weight.transpose(0, 1).reshape(Hq, D, hidden)


def _order_asc_ties(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``idx`` (token indices) ranked by ``values[idx]`` in the total order, ties to the lower
    token index (``idx`` is sorted ascending first)."""
    idx = torch.sort(idx).values
    return idx[_stable_desc_order(values[idx])]


def _tiered_order(values: torch.Tensor, tier: torch.Tensor) -> torch.Tensor:
    """Indices of 1-D ``values`` by tier (higher first), then the total order within a tier."""
    order = _stable_desc_order(values)
    return order[torch.sort(-tier[order], stable=True).indices]


def _kept_tensors(kept: list[list[torch.Tensor]], N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-head kept column lists -> ``kept_idx [B, H, N]`` int32 ascending, ``-1``
    filled, and ``kept_count [B, H]`` int32."""
    B, H = len(kept), (len(kept[0]) if kept else 0)
    kept_idx = torch.full((B, H, N), -1, dtype=torch.int32)
    kept_count = torch.zeros(B, H, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            cols = torch.sort(kept[b][h].long()).values
            kept_idx[b, h, : cols.numel()] = cols.to(torch.int32)
            kept_count[b, h] = cols.numel()
    return kept_idx, kept_count


# ----------------------------------------------------------------------------------------------
# 7.1 CriticalKV


def criticalkv_base_scores_ref(
    q_window: torch.Tensor,
    key: torch.Tensor,
    key_start: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    kernel_size: int = POOL_KERNEL,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The kvpress SnapKV base score of CriticalKV (SPEC 7.1; D1, D2, D3): float64 ``[B, Hk, N]``.

    ``q_window [B, Hq, W, D]``, ``key [B, Hk, N, D]``. Per query head: window softmax (D1),
    mean over the ``W`` window queries, ``avg_pool1d(kernel_size, padding kernel_size // 2,
    count_include_pad)`` along the prefix; then the mean over the group. Prefix columns hold
    that score, the valid window columns the maximum over the row's valid prefix scores of all
    heads (0 when there is none), padding columns ``-inf``. ``compute_dtype`` (default
    float64): a lower one computes as the authors' kvpress code does in a model of that dtype
    (D11: logits in it, the softmax in float32 rounded to it, the means and the pool in it)."""
    B, Hq, Hk, W, N, D = _check_qk(q_window, key)
    if kernel_size < 1 or kernel_size % 2 == 0:
        _fail(f"kernel_size must be odd and >= 1, got {kernel_size}")
    cdt = _compute_dtype(compute_dtype)
    ks = _ks(key_start, B, N)
    G, L = Hq // Hk, N - W
    out = torch.full((B, Hk, N), float("-inf"), dtype=torch.float64)
    for b in range(B):
        L_b = L - ks[b]
        row_max = 0.0
        if L_b > 0:
            probs = _row_window_probs(q_window[b], key[b, :, ks[b]:], W, G, scale, cdt)
            agg = probs[..., :L_b].mean(dim=1)  # [Hq, L_b]: mean over the window queries
            pooled = F.avg_pool1d(agg.unsqueeze(1), kernel_size, stride=1,
                                  padding=kernel_size // 2, count_include_pad=True).squeeze(1)
            base = pooled.view(Hk, G, L_b).mean(dim=1).double()  # [Hk, L_b]: mean over the group
            out[b, :, ks[b]:L] = base
            row_max = float(base.max())
        out[b, :, max(ks[b], L):] = row_max
    return out


def value_norm_ref(value: torch.Tensor, o_proj_weight: torch.Tensor,
                   compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """CriticalKV value weight (SPEC 7.1): float64 ``[B, Hk, N]``,
    ``n[b, h, i] = mean over the group's query heads j of || value[b, h, i] @ W_o[j] ||_1`` with
    ``W_o = o_proj_weight^T`` viewed as ``[Hq, D, hidden]``.

    ``value [B, Hk, N, D]``, ``o_proj_weight [hidden, Hq * D]`` (``Hq = o_proj_weight.shape[1]
    // D``, a multiple of ``Hk``). Not normalised. ``compute_dtype`` (default float64): a lower
    one as the authors' kernel computes (:func:`_row_value_norm`)."""
    _check_float("value", value)
    _check_float("o_proj_weight", o_proj_weight)
    if value.dim() != 4:
        _fail(f"value must be 4-D [B, Hk, N, D], got shape {tuple(value.shape)}")
    B, Hk, N, D = value.shape
    if o_proj_weight.dim() != 2 or D == 0 or o_proj_weight.shape[1] % D != 0:
        _fail(f"o_proj_weight must be [hidden, Hq * D] with D={D}, "
              f"got {tuple(o_proj_weight.shape)}")
    Hq = o_proj_weight.shape[1] // D
    if Hk == 0 or Hq % Hk != 0:
        _fail(f"o_proj_weight gives Hq={Hq}, which must be a positive multiple of Hk={Hk}")
    cdt = _compute_dtype(compute_dtype)
    wo = _wo_heads(o_proj_weight, Hq, D)   # _row_value_norm casts to cdt (exact to float64)
    out = torch.empty(B, Hk, N, dtype=torch.float64)
    for b in range(B):
        out[b] = _row_value_norm(value[b], wo, Hq // Hk, cdt)
    return out


def _critical_head_order(base_h: torch.Tensor, n_win: int, as_written: bool) -> torch.Tensor:
    """One head's ranking by base score over its valid columns (local indices, window = the last
    ``n_win``): the total order; default puts the window first (D6)."""
    n = base_h.numel()
    if as_written:
        return _stable_desc_order(base_h)
    tier = torch.zeros(n, dtype=torch.long)
    tier[n - n_win:] = 1
    return _tiered_order(base_h, tier)


def _critical_fill(order_h: torch.Tensor, n_forced: int, budget: int, base_h: torch.Tensor,
                   vn_h: torch.Tensor, eps: float, cdt: torch.dtype) -> torch.Tensor:
    """Forced = ``order_h[:n_forced]``; the rest of ``budget`` by ``(score + eps) * n``
    (computed in ``cdt``)."""
    forced = order_h[:n_forced]
    key2 = ((base_h.to(cdt) + eps) * vn_h.to(cdt)).double()
    rest = _order_asc_ties(key2, order_h[n_forced:])
    return torch.cat([forced, rest[: max(0, budget - n_forced)]])


def _check_critical(base_scores, vnorm, C, W, key_start):
    B, Hk, N = _check_scores("base_scores", base_scores, W)
    _check_float("vnorm", vnorm)
    if tuple(vnorm.shape) != (B, Hk, N):
        _fail(f"vnorm must have the shape of base_scores {(B, Hk, N)}, got {tuple(vnorm.shape)}")
    _check_budget(C, W)
    return B, Hk, N, _ks(key_start, B, N)


def criticalkv_select_ref(
    base_scores: torch.Tensor,
    vnorm: torch.Tensor,
    C: int,
    W: int,
    key_start: Optional[torch.Tensor] = None,
    as_written: bool = False,
    eps: float = CRITICAL_EPS,
    first_stage_ratio: float = FIRST_STAGE_RATIO,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform CriticalKV selection (SPEC 7.1; D5, D6): ``(kept_idx [B, Hk, N] int32,
    kept_count [B, Hk] int32)``, window included.

    ``base_scores``, ``vnorm [B, Hk, N]`` (:func:`criticalkv_base_scores_ref`,
    :func:`value_norm_ref`). Each head keeps ``C + W``: stage 1 forces its top
    ``int(first_stage_ratio (C + W))`` by base score (default: window first and the whole window
    forced), stage 2 fills the rest by ``(score + eps) * n``, computed in ``compute_dtype``
    (default float64)."""
    B, Hk, N, ks = _check_critical(base_scores, vnorm, C, W, key_start)
    cdt = _compute_dtype(compute_dtype)
    L = N - W
    kept: list[list[torch.Tensor]] = []
    for b in range(B):
        N_b = N - ks[b]
        n_win = N - max(ks[b], L)
        row = []
        for h in range(Hk):
            if N_b <= C + W:
                row.append(torch.arange(ks[b], N))
                continue
            base_h = base_scores[b, h, ks[b]:].double()
            vn_h = vnorm[b, h, ks[b]:].double()
            order_h = _critical_head_order(base_h, n_win, as_written)
            n_first = int(first_stage_ratio * (C + W))
            n_forced = n_first if as_written else max(n_first, n_win)
            row.append(_critical_fill(order_h, n_forced, C + W, base_h, vn_h, eps, cdt) + ks[b])
        kept.append(row)
    return _kept_tensors(kept, N)


def ada_criticalkv_select_ref(
    base_scores: torch.Tensor,
    vnorm: torch.Tensor,
    C: int,
    W: int,
    key_start: Optional[torch.Tensor] = None,
    as_written: bool = False,
    alpha: float = SAFEGUARD_ALPHA,
    eps: float = CRITICAL_EPS,
    first_stage_ratio: float = FIRST_STAGE_RATIO,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaCriticalKV selection (SPEC 7.1; D4, D5, D6): ``(kept_idx [B, Hk, N] int32,
    kept_count [B, Hk] int32)``, window included; ``kept_count`` = the per-head budgets ``C_h``,
    which sum to ``Hk (C + W)`` in every evicted row.

    Per row: each head's top ``n_safe = int((C + W) alpha)`` base scores (default: and its
    window) are marked; one global top ``Hk (C + W)`` over all heads, marked tokens first, then
    base score, gives ``C_h``; stage 1 forces each head's top ``max(marked, int(0.5 C_h))`` by
    base score; stage 2 fills to ``C_h`` by ``(score + eps) * n`` (in ``compute_dtype``,
    default float64)."""
    B, Hk, N, ks = _check_critical(base_scores, vnorm, C, W, key_start)
    cdt = _compute_dtype(compute_dtype)
    if not 0.0 <= alpha <= 1.0:
        _fail(f"alpha must be in [0, 1], got {alpha}")
    L = N - W
    n_safe = int((C + W) * alpha)
    kept: list[list[torch.Tensor]] = []
    for b in range(B):
        N_b = N - ks[b]
        n_win = N - max(ks[b], L)
        if N_b <= C + W:
            kept.append([torch.arange(ks[b], N) for _ in range(Hk)])
            continue
        base = base_scores[b, :, ks[b]:].double()  # [Hk, N_b]
        vn = vnorm[b, :, ks[b]:].double()
        orders = [_critical_head_order(base[h], n_win, as_written) for h in range(Hk)]
        n_marked = n_safe if as_written else max(n_safe, n_win)
        marked = torch.zeros(Hk, N_b, dtype=torch.long)
        for h in range(Hk):
            marked[h, orders[h][:n_marked]] = 1
        winners = _tiered_order(base.reshape(-1), marked.reshape(-1))[: Hk * (C + W)]
        c_h = torch.bincount(winners // N_b, minlength=Hk).tolist()
        row = []
        for h in range(Hk):
            n_first = int((torch.tensor(c_h[h], dtype=torch.int64) * first_stage_ratio)
                          .to(torch.int64))  # float32 product, as the authors' code
            n_forced = max(n_marked, n_first)
            row.append(_critical_fill(orders[h], n_forced, c_h[h], base[h], vn[h], eps, cdt)
                       + ks[b])
        kept.append(row)
    return _kept_tensors(kept, N)


def criticalkv_ref(
    q_window: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    o_proj_weight: torch.Tensor,
    C: int,
    adaptive: bool = True,
    key_start: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    as_written: bool = False,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CriticalKV end to end: base score, value norm, then :func:`ada_criticalkv_select_ref`
    (``adaptive``) or :func:`criticalkv_select_ref`, all in ``compute_dtype`` (default
    float64; a 16-bit model's dtype reproduces the authors' arithmetic, D11)."""
    B, Hq, Hk, W, N, D = _check_qk(q_window, key)
    _check_value(value, key)
    _check_o_proj(o_proj_weight, Hq, D)
    base = criticalkv_base_scores_ref(q_window, key, key_start, scale,
                                      compute_dtype=compute_dtype)
    vn = value_norm_ref(value, o_proj_weight, compute_dtype=compute_dtype)
    sel = ada_criticalkv_select_ref if adaptive else criticalkv_select_ref
    return sel(base, vn, C, W, key_start, as_written, compute_dtype=compute_dtype)


# ----------------------------------------------------------------------------------------------
# 7.2 DefensiveKV scores


def defensive_stage1_count_ref(ave_row: torch.Tensor, threshold: float, clamp: int
                               ) -> tuple[int, torch.Tensor]:
    """Stage-1 floor of one head (SPEC 7.2 step 5; D9): ``(count, forced token indices)``.

    ``ave_row [L_b]`` (the unpooled SnapKV mean, any float dtype: the arithmetic stays in that
    dtype) is normalised to sum 1 and sorted descending (total order); ``count`` = the index of
    the first position whose cumulative mass is ``>= threshold`` (0 if none is), then
    ``min(count, clamp)``. The forced tokens are ``sorted[:count]`` with Python slice semantics
    (a negative ``count``, possible only through a negative ``clamp``, drops the last
    ``|count|`` tokens, as in the authors' code)."""
    normalized = ave_row / ave_row.sum()
    order = _stable_desc_order(normalized)
    reached = torch.cumsum(normalized[order], dim=0) >= threshold  # compared in ave's dtype
    hits = torch.nonzero(reached)
    count = int(hits[0, 0]) if hits.numel() else 0
    count = min(count, clamp)
    return count, order[:count]


def _stage1_clamp(L_b: int, N_b: int, C: int, W: int, as_written: bool) -> int:
    """SPEC's ``int(L (1 - r)) - W`` with ``1 - r = (C + W) / N`` (D9), exact."""
    if as_written:
        return int(Fraction(L_b * (C + W) - W * N_b, N_b))  # int(): truncation toward zero
    return max(0, (L_b * (C + W)) // N_b - W)


def _nan_max(x: torch.Tensor) -> float:
    v = x[~torch.isnan(x)]
    return float(v.max()) if v.numel() else float("nan")


def defensive_scores_ref(
    q_window: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    o_proj_weight: torch.Tensor,
    C: int,
    key_start: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    as_written: bool = False,
    compute_dtype: Optional[torch.dtype] = None,
    kernel_size: int = POOL_KERNEL,
    return_parts: bool = False,
):
    """DefensiveKV scores of one layer (SPEC 7.2 steps 1-5; D1, D2, D7-D11): float64
    ``[B, Hk, N]`` (prefix columns: the defensive score with the stage-1 tokens raised to the
    maximum; valid window columns: that maximum; padding: ``-inf``).

    ``q_window [B, Hq, W, D]``, ``key``/``value [B, Hk, N, D]``, ``o_proj_weight
    [hidden, Hq * D]``, ``C`` the library budget (only the stage-1 clamp uses it). Per row:
    1. ``base[g, t]`` = window query ``t``'s prefix mass;
    2. each query's prefix row ``avg_pool1d(kernel 5, padding 2, zeros counted)``, rescaled to
       sum to ``base[g, t]``;
    3. ``R`` = max over the group's query heads, then over the window; ``R = max(R, mean R)``
       per head over its valid prefix;
    4. ``R *= n / sum over KV heads of n`` (prefix value norms, no epsilon);
    5. the first ``count`` tokens of the per-head normalised unpooled mean attention get the
       maximum (``0.9 - window_bias`` threshold, clamp ``int(L (1 - r)) - W``).
    ``as_written``: the authors' ``window_bias`` slip, batch-wide ``window_bias`` and maximum,
    their negative-clamp slice, and bf16 arithmetic (``compute_dtype`` overrides the dtype;
    default float64 normally, bfloat16 with ``as_written``). ``return_parts``: also return a
    dict of intermediates (``R``: scores after step 4, before the floor; ``weight``: the
    step-4 factor ``n / sum n``; ``count``, ``clamp``, ``window_bias``, ``threshold``, ``max``,
    ``forced``)."""
    B, Hq, Hk, W, N, D = _check_qk(q_window, key)
    _check_value(value, key)
    _check_o_proj(o_proj_weight, Hq, D)
    _check_budget(C, W)
    if kernel_size < 1 or kernel_size % 2 == 0:
        _fail(f"kernel_size must be odd and >= 1, got {kernel_size}")
    cdt = _compute_dtype(compute_dtype, torch.bfloat16 if as_written else torch.float64)
    ks = _ks(key_start, B, N)
    G, L = Hq // Hk, N - W
    wo = _wo_heads(o_proj_weight, Hq, D)

    # steps 1-4 and the window masses, per row on its valid slice (D2)
    rows: dict[int, dict] = {}
    for b in range(B):
        L_b, N_b = L - ks[b], N - ks[b]
        if L_b <= 0:
            continue  # no valid prefix: nothing to score (the row keeps everything)
        probs = _row_window_probs(q_window[b], key[b, :, ks[b]:], W, G, scale, cdt)
        P = probs[..., :L_b]  # [Hq, W, L_b]
        base = P.sum(dim=-1, keepdim=True)  # step 1
        pooled = F.avg_pool1d(P, kernel_size, stride=1, padding=kernel_size // 2,
                              count_include_pad=True)  # step 2 (channels = window queries)
        tot = pooled.sum(dim=-1, keepdim=True)
        pooled = torch.where(tot > 0, pooled / tot * base, torch.zeros((), dtype=cdt))  # D7
        R = pooled.view(Hk, G, W, L_b).amax(dim=1).amax(dim=1)  # step 3: group, then window
        R = torch.maximum(R, R.mean(dim=-1, keepdim=True))
        vn = _row_value_norm(value[b, :, ks[b]:L], wo, G, cdt)  # step 4 (prefix values)
        weight = vn / vn.sum(dim=0, keepdim=True)
        R = R * weight
        ave = P.view(Hk, G, W, L_b).mean(dim=1).mean(dim=1)  # step 5: unpooled SnapKV mean
        rows[b] = dict(
            R=R, ave=ave, L_b=L_b, N_b=N_b, weight=weight,
            wmass=probs[..., L_b:].sum(dim=-1),  # intended: mass on the window columns
            wmass_slip=P[..., -W:].sum(dim=-1),  # as written: last W prefix columns
        )

    if as_written and rows:  # D10, D9: one window_bias and one maximum for the whole batch
        wb_all = float(torch.stack([r["wmass_slip"] for r in rows.values()]).mean())
        max_all = _nan_max(torch.cat([r["R"].reshape(-1) for r in rows.values()]).double())

    out = torch.full((B, Hk, N), float("-inf"), dtype=torch.float64)
    parts = dict(R=out.clone(), weight=torch.zeros(B, Hk, N, dtype=torch.float64),
                 count=torch.zeros(B, Hk, dtype=torch.long),
                 clamp=torch.zeros(B, dtype=torch.long),
                 window_bias=torch.full((B,), float("nan"), dtype=torch.float64),
                 threshold=torch.full((B,), float("nan"), dtype=torch.float64),
                 max=torch.zeros(B, dtype=torch.float64),
                 forced=torch.zeros(B, Hk, N, dtype=torch.bool))
    for b in range(B):
        if b not in rows:
            out[b, :, max(ks[b], L):] = max_all if (as_written and rows) else 0.0
            continue
        r = rows[b]
        wb = wb_all if as_written else float(r["wmass"].mean())
        m = max_all if as_written else _nan_max(r["R"].double())
        threshold = DEFENSIVE_MASS - wb
        clamp = _stage1_clamp(r["L_b"], r["N_b"], C, W, as_written)
        R = r["R"].double()
        parts["R"][b, :, ks[b]:L] = R
        parts["weight"][b, :, ks[b]:L] = r["weight"].double()
        scores = R.clone()
        for h in range(Hk):
            count, forced = defensive_stage1_count_ref(r["ave"][h], threshold, clamp)
            scores[h, forced] = m
            parts["count"][b, h] = count
            parts["forced"][b, h, forced + ks[b]] = True
        out[b, :, ks[b]:L] = scores
        out[b, :, L:] = m
        parts["clamp"][b] = clamp
        parts["window_bias"][b] = wb
        parts["threshold"][b] = threshold
        parts["max"][b] = m
    return (out, parts) if return_parts else out


# ----------------------------------------------------------------------------------------------
# 7.2 step 6 / 7.3 allocation over one or all layers


class LayerKept(NamedTuple):
    """Kept columns of every layer: ``kept_idx [n_layers, B, Hk, N]`` int32 (ascending, ``-1``
    filled, window included), ``kept_count [n_layers, B, Hk]`` int32."""

    kept_idx: torch.Tensor
    kept_count: torch.Tensor


class CascadeStats(NamedTuple):
    """Candidates the bounded cascade held, per batch row: ``held[b][l]`` after layer ``l`` was
    merged and trimmed (retained prefix candidates plus the windows seen, default; retained
    candidates, ``as_written``), ``in_flight[b][l]`` while layer ``l`` was merged (before the
    trim), and the ``bound`` ``n_layers Hk (C + W)``."""

    held: list[list[int]]
    in_flight: list[list[int]]
    bound: int


def _layer_columns(N: int, W: int, ks_b: int,
                   as_written: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidate columns, always-kept columns) of one row (D12)."""
    L = N - W
    if as_written:
        return torch.arange(ks_b, N), torch.arange(0)
    return torch.arange(ks_b, max(ks_b, L)), torch.arange(max(ks_b, L), N)


def _check_layers(layer_scores: Sequence[torch.Tensor], C: int, W: int):
    if len(layer_scores) == 0:
        _fail("layer_scores must hold at least one layer")
    shape = None
    for i, s in enumerate(layer_scores):
        _check_scores(f"layer_scores[{i}]", s, W)
        if shape is not None and tuple(s.shape) != shape:
            _fail(f"layer_scores[{i}] has shape {tuple(s.shape)}, layer 0 has {shape}")
        shape = tuple(s.shape)
    _check_budget(C, W)
    return shape


def _slots(n_layers: int, Hk: int, C: int, W: int, as_written: bool) -> int:
    """Competed slots per batch row (D12)."""
    return n_layers * Hk * (C + W) if as_written else n_layers * Hk * C


def _assemble(n_layers: int, B: int, Hk: int, N: int, W: int, ks: list[int], as_written: bool,
              winners: list[list[tuple[int, int, int]]]) -> LayerKept:
    """``winners[b]`` = list of (layer, head, column) won; adds the always-kept windows."""
    kept_idx = torch.full((n_layers, B, Hk, N), -1, dtype=torch.int32)
    kept_count = torch.zeros(n_layers, B, Hk, dtype=torch.int32)
    for b in range(B):
        _, fixed = _layer_columns(N, W, ks[b], as_written)
        cols = [[[int(c) for c in fixed] for _ in range(Hk)] for _ in range(n_layers)]
        for layer, h, c in winners[b]:
            cols[layer][h].append(c)
        for layer in range(n_layers):
            for h in range(Hk):
                cs = sorted(cols[layer][h])
                kept_idx[layer, b, h, : len(cs)] = torch.tensor(cs, dtype=torch.int32)
                kept_count[layer, b, h] = len(cs)
    return LayerKept(kept_idx, kept_count)


def layer_defensive_select_ref(
    layer_scores: Sequence[torch.Tensor],
    C: int,
    W: int,
    key_start: Optional[torch.Tensor] = None,
    as_written: bool = False,
) -> LayerKept:
    """Layer-DefensiveKV selection, unbounded (SPEC 7.3; D12): one global top-k per batch row
    over every layer's heads, all layers' scores at hand.

    ``layer_scores``: ``n_layers`` tensors ``[B, Hk, N]`` (:func:`defensive_scores_ref` of each
    layer). Default: every head keeps its valid window, and the valid prefix tokens of all
    layers compete for ``n_layers Hk C`` slots. ``as_written``: every valid column of every layer
    competes for ``n_layers Hk (C + W)`` slots. Order: score, then lower layer, head, token."""
    B, Hk, N = _check_layers(layer_scores, C, W)
    n_layers = len(layer_scores)
    ks = _ks(key_start, B, N)
    K = _slots(n_layers, Hk, C, W, as_written)
    winners = []
    for b in range(B):
        cand, _ = _layer_columns(N, W, ks[b], as_written)
        n_c = cand.numel()
        flat = torch.stack([s[b][:, cand].double() for s in layer_scores]).reshape(-1)
        top = _stable_desc_order(flat)[:K]  # layer-major flattening: the total order
        winners.append([(int(i) // (Hk * n_c), (int(i) // n_c) % Hk, int(cand[int(i) % n_c]))
                        for i in top])
    return _assemble(n_layers, B, Hk, N, W, ks, as_written, winners)


def layer_defensive_allocate_ref(
    layer_scores: Sequence[torch.Tensor],
    C: int,
    W: int,
    key_start: Optional[torch.Tensor] = None,
    as_written: bool = False,
) -> torch.Tensor:
    """Per-layer, per-head counts ``[n_layers, B, Hk]`` int32 (window included) of
    :func:`layer_defensive_select_ref`; they sum to ``n_layers Hk (C + W)`` per evicted row."""
    return layer_defensive_select_ref(layer_scores, C, W, key_start, as_written).kept_count


def defensive_select_ref(
    scores: torch.Tensor,
    C: int,
    W: int,
    key_start: Optional[torch.Tensor] = None,
    as_written: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DefensiveKV selection of one layer (SPEC 7.2 step 6; D12): one global top
    ``Hk (C + W)`` per row over all heads, window included, no alpha floor, no rounding (the
    window kept outright by default). ``(kept_idx [B, Hk, N] int32, kept_count [B, Hk] int32)``."""
    kept = layer_defensive_select_ref([scores], C, W, key_start, as_written)
    return kept.kept_idx[0], kept.kept_count[0]


def defensive_allocate_ref(
    scores: torch.Tensor,
    C: int,
    W: int,
    key_start: Optional[torch.Tensor] = None,
    as_written: bool = False,
) -> torch.Tensor:
    """Per-head counts ``[B, Hk]`` int32 (window included) of :func:`defensive_select_ref`;
    they sum to ``Hk (C + W)`` in every evicted row."""
    return defensive_select_ref(scores, C, W, key_start, as_written)[1]


def layer_defensive_bounded_ref(
    layer_scores: Iterable[torch.Tensor],
    n_layers: int,
    C: int,
    W: int,
    key_start: Optional[torch.Tensor] = None,
    as_written: bool = False,
) -> tuple[LayerKept, CascadeStats]:
    """Layer-DefensiveKV with bounded memory (SPEC 7.3; D13): the same result as
    :func:`layer_defensive_select_ref`, with the layers consumed one at a time from an iterable
    (a generator works: a layer is read only after the previous one was trimmed).

    Per batch row it keeps a candidate list ordered by (layer, head, column); each new layer's
    candidates are appended, and the list is cut back to its top ``K`` in the total order
    (``K`` = the slots of :func:`layer_defensive_select_ref` for ``n_layers`` layers), which
    re-trims the earlier layers. Returns ``(LayerKept, CascadeStats)``."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        _fail(f"n_layers must be an int >= 1, got {n_layers!r}")
    _check_budget(C, W)
    held: list[list[int]] = []
    in_flight: list[list[int]] = []
    state = None  # per row: (layer, head, column, score) of the retained candidates
    ks: list[int] = []
    shape = None
    seen = 0
    for layer, s in enumerate(layer_scores):
        if layer >= n_layers:
            _fail(f"layer_scores yielded more than n_layers={n_layers} layers")
        _check_scores(f"layer_scores[{layer}]", s, W)
        if shape is None:
            shape = tuple(s.shape)
            B, Hk, N = shape
            ks = _ks(key_start, B, N)
            K = _slots(n_layers, Hk, C, W, as_written)
            empty = torch.zeros(0, dtype=torch.long)
            state = [(empty, empty, empty, torch.zeros(0, dtype=torch.float64)) for _ in range(B)]
            held = [[] for _ in range(B)]
            in_flight = [[] for _ in range(B)]
        elif tuple(s.shape) != shape:
            _fail(f"layer_scores[{layer}] has shape {tuple(s.shape)}, layer 0 has {shape}")
        for b in range(B):
            cand, fixed = _layer_columns(N, W, ks[b], as_written)
            n_c = cand.numel()
            lay, head, col, val = state[b]
            new_head = torch.arange(Hk).repeat_interleave(n_c)
            new_col = cand.repeat(Hk)
            new_val = s[b][:, cand].double().reshape(-1)  # head-major: (head, column) order
            lay = torch.cat([lay, torch.full((Hk * n_c,), layer, dtype=torch.long)])
            head = torch.cat([head, new_head])
            col = torch.cat([col, new_col])
            val = torch.cat([val, new_val])
            windows_before = layer * Hk * fixed.numel()
            in_flight[b].append(lay.numel() + windows_before + Hk * fixed.numel())
            keep = torch.sort(_stable_desc_order(val)[:K]).values  # stays (layer, head, col) sorted
            state[b] = (lay[keep], head[keep], col[keep], val[keep])
            held[b].append(keep.numel() + (layer + 1) * Hk * fixed.numel())
        seen = layer + 1
    if seen != n_layers:
        _fail(f"layer_scores yielded {seen} layers, expected n_layers={n_layers}")
    winners = [[(int(a), int(h), int(c)) for a, h, c in zip(st[0], st[1], st[2])] for st in state]
    kept = _assemble(n_layers, B, Hk, N, W, ks, as_written, winners)
    return kept, CascadeStats(held, in_flight, n_layers * Hk * (C + W))


def defensivekv_ref(
    q_window: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    o_proj_weight: torch.Tensor,
    C: int,
    key_start: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    as_written: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DefensiveKV end to end: :func:`defensive_scores_ref` then :func:`defensive_select_ref`."""
    W = q_window.shape[2] if q_window.dim() == 4 else 0
    s = defensive_scores_ref(q_window, key, value, o_proj_weight, C, key_start, scale, as_written)
    return defensive_select_ref(s, C, W, key_start, as_written)

