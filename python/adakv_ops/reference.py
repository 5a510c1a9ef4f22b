"""Slow, plain-PyTorch reference of the adakv_ops algorithms (tests and benchmarks only).

Every function here implements docs/semantics.md literally, written for clarity rather than
speed: explicit masks, ``torch.softmax`` in float64, ``torch.nn.functional.max_pool1d`` /
``avg_pool1d``, Python loops over batch rows and segments, stable sorts for the total order.
It is the oracle the C++/CUDA ops are tested against; do not use it on a serving path.

Conventions (see docs/semantics.md): batch ``B``, query heads ``Hq``, KV heads ``Hk``,
``G = Hq // Hk`` (query head ``j`` reads KV head ``j // G``), window ``W``, prompt length ``N``,
prefix length ``L = N - W``, segment ``s = b * Hk + h``. ``key_start [B]`` (int32, optional) is
the first non-padding position of each batch row (left padding).

Total order used by every selection and ranking (``allocate``'s global top-k, ``select``'s
per-head top-k): higher score first; on equal scores the lower head index, then the lower token
index. NaN ranks LOWEST: below every number, ``-inf`` included (all NaNs are equal to each other
and, like every tie, go to the lower head, then the lower token index); ``-0.0 == +0.0``. This
is the rule of the C++/CUDA kernels (``csrc/allocation_rules.h``, ``descending_key``) and of
docs/semantics.md ("Inputs nobody should trust"). :func:`_stable_desc_order` implements it
explicitly (it does not rely on where a sort happens to put NaN): flattening a ``[Hk, L]`` row
head-major and taking that order yields exactly the total order above.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .budgets import pyramid_budgets, uniform_budgets  # noqa: F401  (re-exported)

__all__ = [
    "score_ref",
    "allocate_ref",
    "select_ref",
    "compact_ref",
    "evict_ref",
    "append_ref",
    "decode_attention_ref",
    "attention_over_segments_ref",
    "kept_positions_ref",
    "segments_ref",
    "paged_segments_ref",
    "paged_compact_ref",
    "paged_append_ref",
    "rotary_ref",
    "paged_append_rotary_ref",
    "paged_decode_attention_ref",
    "pyramid_budgets",
    "uniform_budgets",
]


# ----------------------------------------------------------------------------------------------
# small helpers


def _fail(msg: str) -> None:
    raise RuntimeError(msg)


def _key_start_list(key_start: Optional[torch.Tensor], B: int, N: int) -> list[int]:
    """key_start as a Python list, validated to lie in [0, N]."""
    if key_start is None:
        return [0] * B
    if key_start.dim() != 1 or key_start.numel() != B:
        _fail(f"key_start must have shape [B]={B}, got {tuple(key_start.shape)}")
    ks = [int(x) for x in key_start.tolist()]
    for x in ks:
        if not 0 <= x <= N:
            _fail(f"key_start value {x} out of range [0, {N}]")
    return ks


def _check_option(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(f"{name} must be one of {allowed}, got {value!r}")


def _stable_desc_order(values: torch.Tensor) -> torch.Tensor:
    """Indices of a 1-D tensor in the total order: value descending, NaN last (below -inf),
    ties (NaNs included) by lower index; ``-0.0 == +0.0``."""
    v = values.double().reshape(-1)
    nan = torch.isnan(v)
    # 1) numbers descending (stable: ties keep the lower index first); NaNs parked at key 0
    key = torch.where(nan, torch.zeros_like(v), -v) + 0.0  # "+ 0.0" folds -0.0 into +0.0
    by_value = torch.sort(key, stable=True).indices
    # 2) stable partition: every number before every NaN (NaNs keep ascending index order)
    by_nan = torch.sort(nan[by_value].to(torch.int8), stable=True).indices
    return by_value[by_nan]


# ----------------------------------------------------------------------------------------------
# score


def score_ref(
    q_window: torch.Tensor,
    key: torch.Tensor,
    kernel_size: int = 7,
    pooling: str = "max",
    aggregate: str = "mean",
    gqa_reduce: str = "mean",
    key_start: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """SnapKV observation-window scores, float32 ``[B, Hk, L]``.

    float64 logits -> mask (padding keys, causal window) -> float64 softmax -> aggregate over
    window queries -> GQA reduce -> pool over prefix columns -> padding columns = -inf.
    """
    if q_window.dim() != 4 or key.dim() != 4:
        _fail("q_window and key must be 4-D")
    B, Hq, W, D = q_window.shape
    Bk, Hk, N, Dk = key.shape
    if B != Bk or D != Dk:
        _fail("q_window / key batch or head-dim mismatch")
    if Hk == 0 or Hq % Hk != 0:
        _fail(f"Hq={Hq} must be a multiple of Hk={Hk}")
    if not 1 <= W <= N:
        _fail(f"window W={W} must satisfy 1 <= W <= N={N}")
    _check_option("pooling", pooling, ("max", "avg", "none"))
    _check_option("aggregate", aggregate, ("mean", "max"))
    _check_option("gqa_reduce", gqa_reduce, ("mean", "max"))
    if kernel_size < 1 or kernel_size % 2 == 0:
        _fail(f"kernel_size must be odd and >= 1, got {kernel_size}")
    G = Hq // Hk
    L = N - W
    ks = _key_start_list(key_start, B, N)
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0  # D = 0: every logit is the empty dot product 0

    q = q_window.double()
    k = key.double().repeat_interleave(G, dim=1)  # [B, Hq, N, D], query head j -> kv j // G
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hq, W, N]

    n = torch.arange(N).view(1, 1, N)
    t = torch.arange(W).view(1, W, 1)
    ks_t = torch.tensor(ks, dtype=torch.long).view(B, 1, 1)
    visible = (n >= ks_t) & (n <= L + t)  # [B, W, N]
    visible = visible.unsqueeze(1)  # [B, 1, W, N]
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # window queries that are themselves padding see no key at all -> contribute zeros
    has_key = visible.any(dim=-1, keepdim=True)
    probs = torch.where(has_key, probs, torch.zeros((), dtype=probs.dtype))

    pre = probs[..., :L]  # [B, Hq, W, L]
    if aggregate == "mean":
        agg = pre.sum(dim=2) / W
    else:
        agg = pre.amax(dim=2) if W > 0 else pre.sum(dim=2)
    grp = agg.view(B, Hk, G, L)
    red = grp.mean(dim=2) if gqa_reduce == "mean" else grp.amax(dim=2)  # [B, Hk, L]

    if L > 0 and pooling != "none" and kernel_size > 2 * L + 1:
        # A kernel wider than the row (any size up to 2^63 - 1): every window covers the whole
        # prefix, so max = the row max and avg = the row sum / kernel_size (padded zeros count).
        # Computed directly: F.*_pool1d would try to build a kernel of that size.
        if pooling == "max":
            red = red.amax(dim=-1, keepdim=True).expand(B, Hk, L)
        else:
            red = (red.sum(dim=-1, keepdim=True) / float(kernel_size)).expand(B, Hk, L)
    elif L > 0 and pooling != "none":
        x = red.reshape(B * Hk, 1, L)
        pad = kernel_size // 2
        if pooling == "max":
            x = F.max_pool1d(x, kernel_size, stride=1, padding=pad)
        else:
            x = F.avg_pool1d(x, kernel_size, stride=1, padding=pad, count_include_pad=True)
        red = x.view(B, Hk, L)

    out = red.float().clone()
    for b in range(B):
        out[b, :, : min(ks[b], L)] = float("-inf")
    return out


# ----------------------------------------------------------------------------------------------
# allocate


def _round_exact(c: list[int], C: int, alpha: float) -> list[int]:
    """Largest-remainder rounding of x_h = (1 - alpha) * c_h + alpha * C (float64)."""
    Hk = len(c)
    x = [(1.0 - alpha) * float(ch) + alpha * float(C) for ch in c]
    fl = [math.floor(v) for v in x]
    rem = Hk * C - sum(fl)
    if not 0 <= rem <= Hk:  # cannot happen; guards the reference itself
        raise AssertionError(f"bad remainder {rem} for x={x}")
    order = sorted(range(Hk), key=lambda h: (-(x[h] - fl[h]), h))
    out = list(fl)
    for h in order[:rem]:
        out[h] += 1
    return out


def _round_official(c: list[int], C: int, alpha: float) -> list[int]:
    """Official AdaKV rounding: round_half_even((1 - alpha) * c_h + floor(alpha * C))."""
    base = float(math.floor(alpha * float(C)))
    return [int(round((1.0 - alpha) * float(ch) + base)) for ch in c]  # round(): half-even


def winners_per_head_ref(row_scores: torch.Tensor, k: int) -> list[int]:
    """c_h for one batch row: how many of the global top-k of ``row_scores [Hk, Lb]`` are in h."""
    Hk, Lb = row_scores.shape
    order = _stable_desc_order(row_scores.reshape(-1))[:k]  # head-major flatten
    counts = torch.bincount(order // Lb, minlength=Hk) if Lb > 0 else torch.zeros(Hk, dtype=torch.long)
    return [int(v) for v in counts.tolist()]


def allocate_ref(
    scores: torch.Tensor,
    budget: int,
    floor_alpha: float = 0.2,
    adaptive: bool = True,
    rounding: str = "exact",
    key_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Ada-KV per-head budgets ``[B, Hk]`` int32 (semantics.md, allocate)."""
    if scores.dim() != 3:
        _fail("scores must be [B, Hk, L]")
    if budget < 0:
        _fail(f"budget must be >= 0, got {budget}")
    if not 0.0 <= floor_alpha <= 1.0:
        _fail(f"floor_alpha must be in [0, 1], got {floor_alpha}")
    _check_option("rounding", rounding, ("exact", "official"))
    B, Hk, L = scores.shape
    C = int(budget)
    alpha = float(floor_alpha)
    # key_start lies in [0, N]; only its effect on the prefix matters here
    ks = [0] * B if key_start is None else [int(x) for x in key_start.tolist()]
    out = torch.empty(B, Hk, dtype=torch.int32)
    for b in range(B):
        k0 = min(max(ks[b], 0), L)
        Lb = L - k0
        if Lb <= C or not adaptive:
            out[b] = C
            continue
        c = winners_per_head_ref(scores[b, :, k0:], Hk * C)
        assert sum(c) == Hk * C
        ch = _round_exact(c, C, alpha) if rounding == "exact" else _round_official(c, C, alpha)
        out[b] = torch.tensor(ch, dtype=torch.int32)
    return out


# ----------------------------------------------------------------------------------------------
# select


def select_ref(
    scores: torch.Tensor,
    budgets: torch.Tensor,
    key_start: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmented top-k: ``kept_idx [B, Hk, L]`` (ascending, -1 fill), ``kept_count [B, Hk]``."""
    B, Hk, L = scores.shape
    if tuple(budgets.shape) != (B, Hk):
        _fail(f"budgets must be [B, Hk]=({B}, {Hk}), got {tuple(budgets.shape)}")
    ks = [0] * B if key_start is None else [int(x) for x in key_start.tolist()]
    kept_idx = torch.full((B, Hk, L), -1, dtype=torch.int32)
    kept_count = torch.zeros(B, Hk, dtype=torch.int32)
    for b in range(B):
        k0 = min(max(ks[b], 0), L)
        Lb = L - k0
        for h in range(Hk):
            bud = int(budgets[b, h])
            if bud < 0:
                _fail(f"budgets must be >= 0, got {bud}")
            k = min(bud, Lb)
            top = _stable_desc_order(scores[b, h, k0:])[:k] + k0
            kept_idx[b, h, :k] = torch.sort(top).values.to(torch.int32)
            kept_count[b, h] = k
    return kept_idx, kept_count


# ----------------------------------------------------------------------------------------------
# compact / evict


def kept_positions_ref(
    kept_idx: torch.Tensor,
    kept_count: torch.Tensor,
    N: int,
    window: int,
    key_start: Optional[torch.Tensor] = None,
) -> list[torch.Tensor]:
    """Per segment ``s = b * Hk + h``: original token positions stored, in storage order."""
    B, Hk, _ = kept_idx.shape
    ks = _key_start_list(key_start, B, N)
    out = []
    for b in range(B):
        win = torch.arange(max(ks[b], N - window), N, dtype=torch.long)
        for h in range(Hk):
            cnt = int(kept_count[b, h])
            out.append(torch.cat([kept_idx[b, h, :cnt].long(), win]))
    return out


def compact_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    kept_idx: torch.Tensor,
    kept_count: torch.Tensor,
    budgets: torch.Tensor,
    window: int,
    reserve: int = 0,
    rows: Optional[int] = None,
    key_start: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Head-flattened cache ``(k_flat, v_flat, seg_start, seg_len)``."""
    B, Hk, N, D = key.shape
    if tuple(value.shape) != (B, Hk, N, D):
        _fail("value shape must match key")
    if not 0 <= window <= N:
        _fail(f"window must be in [0, N={N}], got {window}")
    if reserve < 0:
        _fail(f"reserve must be >= 0, got {reserve}")
    bud = budgets.reshape(-1).long()
    if (bud < 0).any():
        _fail("budgets must be >= 0")
    cap = bud + window + reserve
    seg_start = torch.zeros(B * Hk, dtype=torch.long)
    if B * Hk > 1:
        seg_start[1:] = torch.cumsum(cap, 0)[:-1]
    total = int(cap.sum())
    if rows is None:
        rows = total
    if rows < total:
        _fail(f"rows={rows} is smaller than the total capacity {total}")
    k_flat = torch.zeros(rows, D, dtype=key.dtype)
    v_flat = torch.zeros(rows, D, dtype=value.dtype)
    seg_len = torch.zeros(B * Hk, dtype=torch.int32)
    L = N - window
    for s, (cnt, bs) in enumerate(zip(kept_count.reshape(-1).tolist(), bud.tolist())):
        if not 0 <= cnt <= bs:
            _fail(f"kept_count {cnt} not in [0, budget={bs}] for segment {s}")
    positions = kept_positions_ref(kept_idx, kept_count, N, window, key_start)
    for b in range(B):
        for h in range(Hk):
            s = b * Hk + h
            pos = positions[s]
            cnt = int(kept_count[b, h])
            if cnt and (pos[:cnt].min() < 0 or pos[:cnt].max() >= L):
                _fail(f"kept_idx out of range [0, {L}) in segment {s}")
            st = int(seg_start[s])
            k_flat[st : st + len(pos)] = key[b, h, pos]
            v_flat[st : st + len(pos)] = value[b, h, pos]
            seg_len[s] = len(pos)
    return k_flat, v_flat, seg_start.to(torch.int32), seg_len


def evict_ref(
    q_window: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    budget: int,
    floor_alpha: float = 0.2,
    pooling: str = "max",
    kernel_size: int = 7,
    gqa_reduce: str = "mean",
    adaptive: bool = True,
    rounding: str = "exact",
    reserve: int = 0,
    key_start: Optional[torch.Tensor] = None,
    aggregate: str = "mean",
    scale: Optional[float] = None,
    *,
    scores: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """score -> allocate -> select -> compact.

    ``scores`` (keyword-only, reference extension): use these fp32 scores instead of
    ``score_ref`` (lets tests check an op's eviction pipeline exactly on the op's own scores).
    """
    B, Hq, W, D = q_window.shape
    Hk = key.shape[1]
    if scores is None:
        scores = score_ref(
            q_window, key, kernel_size, pooling, aggregate, gqa_reduce, key_start, scale
        )
    budgets = allocate_ref(scores, budget, floor_alpha, adaptive, rounding, key_start)
    kept_idx, kept_count = select_ref(scores, budgets, key_start)
    rows = B * Hk * (budget + W + reserve) if rounding == "exact" else None
    return compact_ref(key, value, kept_idx, kept_count, budgets, W, reserve, rows, key_start)


# ----------------------------------------------------------------------------------------------
# decode


def _capacities(seg_start: torch.Tensor, rows: int) -> torch.Tensor:
    st = seg_start.long()
    ends = torch.cat([st[1:], torch.tensor([rows], dtype=torch.long)])
    return ends - st


def segments_ref(
    flat: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor
) -> list[torch.Tensor]:
    """Valid rows of every segment of a flat cache, as a list of ``[len_s, D]`` views."""
    return [
        flat[int(st) : int(st) + int(ln)] for st, ln in zip(seg_start.tolist(), seg_len.tolist())
    ]


def append_ref(
    k_flat: torch.Tensor,
    v_flat: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional append: returns new ``(k_flat, v_flat, seg_len)``; inputs are untouched.

    Raises RuntimeError (before writing anything) if a segment would overflow its capacity.
    """
    B, Hk, T, D = key_new.shape
    S = seg_start.numel()
    if B * Hk != S:
        _fail(f"key_new has B*Hk={B * Hk} segments, cache has {S}")
    if T < 1:
        _fail("T must be >= 1")
    cap = _capacities(seg_start, k_flat.shape[0])
    new_len = seg_len.long() + T
    if (new_len > cap).any():
        s = int(torch.nonzero(new_len > cap)[0])
        _fail(f"append_ overflows segment {s}: capacity {int(cap[s])}, needs {int(new_len[s])}")
    k2, v2 = k_flat.clone(), v_flat.clone()
    for s in range(S):
        b, h = divmod(s, Hk)
        p = int(seg_start[s]) + int(seg_len[s])
        k2[p : p + T] = key_new[b, h]
        v2[p : p + T] = value_new[b, h]
    return k2, v2, new_len.to(torch.int32)


def attention_over_segments_ref(
    query: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of ``query [B, Hq, T, D]`` over explicit per-segment token lists.

    ``keys[s]``/``values[s]`` (``s = b * Hk + h``) hold the segment's tokens in order; the ``T``
    queries are the ``T`` newest tokens (causal among them). float64 math; returns
    ``(out [B, Hq, T, D] in query dtype, lse [B, Hq, T] float32)``.

    Non-finite inputs (docs/semantics.md, "Inputs nobody should trust"): a ``-inf`` logit is a
    masked key (weight 0), so a query that sees no key, or only ``-inf`` logits, gives
    ``out = 0``, ``lse = -inf`` (the empty-row marker). A NaN or ``+inf`` logit makes the
    softmax undefined: ``out`` and ``lse`` are NaN (never ``-inf``). NaN only in values gives a
    NaN output (where the NaN value has weight) with the logits' finite lse.
    """
    B, Hq, T, D = query.shape
    S = len(keys)
    Hk = S // B
    G = Hq // Hk
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0  # D = 0: every logit is the empty dot product 0
    out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    lse = torch.full((B, Hq, T), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for j in range(Hq):
            s = b * Hk + j // G
            kk = keys[s].double()
            vv = values[s].double()
            n_s = kk.shape[0]
            for t in range(T):
                n_t = n_s - T + 1 + t
                if n_t <= 0:
                    continue
                logits = (kk[:n_t] @ query[b, j, t].double()) * scale
                if (logits == float("-inf")).all():
                    continue  # every key masked: like a row that sees no key
                if logits.isnan().any() or (logits == float("inf")).any():
                    # softmax undefined (a NaN or +inf logit): NaN output and NaN lse
                    out[b, j, t] = float("nan")
                    lse[b, j, t] = float("nan")
                    continue
                lse[b, j, t] = torch.logsumexp(logits, 0)
                out[b, j, t] = torch.softmax(logits, 0) @ vv[:n_t]
    return out.to(query.dtype), lse.float()


def decode_attention_ref(
    query: torch.Tensor,
    k_flat: torch.Tensor,
    v_flat: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Decode attention over the flat cache (gathers each segment's valid rows)."""
    B, Hq, T, D = query.shape
    S = seg_start.numel()
    if B == 0 or S % B != 0 or Hq % (S // B) != 0:
        _fail(f"query heads Hq={Hq} / segments {S} / batch {B} mismatch")
    out, lse = attention_over_segments_ref(
        query,
        segments_ref(k_flat, seg_start, seg_len),
        segments_ref(v_flat, seg_start, seg_len),
        scale,
    )
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# paged per-head storage (docs/semantics.md "Paged storage")


def _paged_pages(page_table: torch.Tensor, s: int, first: int, end: int, P: int,
                 num_pages: int) -> list[int]:
    """Page ids holding rows ``[first, end)`` of segment ``s``, validated (width and range)."""
    if end <= first:
        return []
    width = page_table.shape[1]
    if end > width * P:
        _fail(f"segment {s} needs {end} rows but page_table has only {width} pages of P = {P}")
    ids = page_table[s, first // P : (end - 1) // P + 1].tolist()
    for i, pid in enumerate(ids):
        if not 0 <= pid < num_pages:
            _fail(f"page_table[{s}, {first // P + i}] = {pid} is outside [0, {num_pages})")
    return ids


def _paged_rows(page_table: torch.Tensor, s: int, n: int, P: int) -> torch.Tensor:
    """Flat pool row (``page * P + slot``) of tokens ``0..n-1`` of segment ``s``, int64."""
    i = torch.arange(n, dtype=torch.long)
    return page_table[s].long()[i // P] * P + i % P


def paged_segments_ref(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seg_len: torch.Tensor,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every segment's tokens, gathered through the page table: ``(keys, values)``, lists of
    ``[seg_len[s], D]`` tensors (copies). Validates lengths, table width and page ids."""
    num_pages, P, D = k_pages.shape
    kf, vf = k_pages.reshape(-1, D), v_pages.reshape(-1, D)
    keys, values = [], []
    for s, n in enumerate(seg_len.tolist()):
        if n < 0:
            _fail(f"seg_len[{s}] = {n} is negative")
        _paged_pages(page_table, s, 0, n, P, num_pages)
        rows = _paged_rows(page_table, s, n, P)
        keys.append(kf[rows])
        values.append(vf[rows])
    return keys, values


def paged_compact_ref(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seg_len: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kept_idx: torch.Tensor,
    kept_count: torch.Tensor,
    window: int,
    key_start: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional ``paged_compact_``: returns new ``(k_pages, v_pages, seg_len)``.

    Segment rows are ``compact``'s (``kept_positions_ref``); only rows ``[0, seg_len)`` of each
    segment are written. Raises (before writing) on bad counts/indices, a too-short table, an
    out-of-range page id or a page used twice."""
    B, Hk, N, D = key.shape
    num_pages, P, _ = k_pages.shape
    if not 0 <= window <= N:
        _fail(f"window must be in [0, N={N}], got {window}")
    if page_table.shape[0] != B * Hk or seg_len.numel() != B * Hk:
        _fail(f"page_table / seg_len must have B*Hk = {B * Hk} segments")
    L = N - window
    positions = kept_positions_ref(kept_idx, kept_count, N, window, key_start)
    ks = _key_start_list(key_start, B, N)
    used: dict[int, tuple[int, int]] = {}
    for s, pos in enumerate(positions):
        b, h = divmod(s, Hk)
        cnt = int(kept_count[b, h])
        if not 0 <= cnt <= L:
            _fail(f"kept_count[{b}, {h}] = {cnt} is outside [0, L = {L}]")
        if cnt and (int(pos[:cnt].min()) < ks[b] or int(pos[:cnt].max()) >= L):
            _fail(f"kept_idx of segment {s} outside the valid prefix [{ks[b]}, {L})")
        for i, pid in enumerate(_paged_pages(page_table, s, 0, len(pos), P, num_pages)):
            if pid in used:
                _fail(f"page {pid} is used twice (segments {used[pid][0]} and {s})")
            used[pid] = (s, i)
    kp, vp = k_pages.clone(), v_pages.clone()
    kf, vf = kp.view(-1, D), vp.view(-1, D)
    new_len = seg_len.clone()
    for s, pos in enumerate(positions):
        b, h = divmod(s, Hk)
        rows = _paged_rows(page_table, s, len(pos), P)
        kf[rows] = key[b, h, pos]
        vf[rows] = value[b, h, pos]
        new_len[s] = len(pos)
    return kp, vp, new_len


def paged_append_ref(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seg_len: torch.Tensor,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional ``paged_append_``: returns new ``(k_pages, v_pages, seg_len)``.

    Raises (before writing anything) if a segment's length is negative, its table is too short
    for ``seg_len + T`` rows, or a page it writes is out of range."""
    B, Hk, T, D = key_new.shape
    num_pages, P, _ = k_pages.shape
    S = seg_len.numel()
    if B * Hk != S or page_table.shape[0] != S:
        _fail(f"key_new has B*Hk={B * Hk} segments, page_table has {page_table.shape[0]}")
    if T < 1:
        _fail("T must be >= 1")
    lens = seg_len.tolist()
    for s, n in enumerate(lens):
        if n < 0:
            _fail(f"seg_len[{s}] = {n} is negative")
        _paged_pages(page_table, s, n, n + T, P, num_pages)
    kp, vp = k_pages.clone(), v_pages.clone()
    kf, vf = kp.view(-1, D), vp.view(-1, D)
    for s, n in enumerate(lens):
        b, h = divmod(s, Hk)
        rows = _paged_rows(page_table, s, n + T, P)[n:]
        kf[rows] = key_new[b, h]
        vf[rows] = value_new[b, h]
    return kp, vp, (seg_len.long() + T).to(torch.int32)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x [B, H, T, D]`` as transformers' ``apply_rotary_pos_emb`` computes it
    (``rotate_half``: the halves of a head vector rotate against each other), with ``cos``,
    ``sin [B or 1, T, D]``; float64 result."""
    x = x.double()
    c, s = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    h = x.shape[-1] // 2
    return x * c + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * s


def paged_append_rotary_ref(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seg_len: torch.Tensor,
    query: torch.Tensor,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional ``paged_append_rotary_``: returns ``(query rotated, k_pages, v_pages,
    seg_len)``: :func:`paged_append_ref` of the rotated keys (:func:`rotary_ref`, rounded once
    to the K/V dtype)."""
    if key_new.shape[-1] % 2:
        _fail(f"the head dim must be even, got {key_new.shape[-1]}")
    kp, vp, sl = paged_append_ref(k_pages, v_pages, page_table, seg_len,
                                  rotary_ref(key_new, cos, sin).to(key_new.dtype), value_new)
    return rotary_ref(query, cos, sin).to(query.dtype), kp, vp, sl


def paged_decode_attention_ref(
    query: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seg_len: torch.Tensor,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Decode attention over paged storage: ``attention_over_segments_ref`` of the segments
    gathered through the table (float64 math)."""
    B, Hq, T, D = query.shape
    S = seg_len.numel()
    if B == 0 or S % B != 0 or Hq % (S // B) != 0:
        _fail(f"query heads Hq={Hq} / segments {S} / batch {B} mismatch")
    keys, values = paged_segments_ref(k_pages, v_pages, page_table, seg_len)
    out, lse = attention_over_segments_ref(query, keys, values, scale)
    return (out, lse) if return_lse else out
