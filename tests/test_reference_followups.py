"""The fp64 reference of the authors' follow-up methods (adakv_ops.reference_followups, SPEC 7).

Hand-computed tiny cases for every step, independent scalar / Python-sort re-implementations
on random inputs, the properties SPEC 7 fixes, and the proof by exhaustion on random inputs
that the bounded Layer-DefensiveKV cascade selects exactly the unbounded global top-k. Needs no
compiled extension.
"""

from __future__ import annotations

import importlib
import math
import random
import zlib
from fractions import Fraction

import pytest
import torch

from conftest import gen, make_key_start, make_qkv, randn, ref

rf = importlib.import_module("adakv_ops.reference_followups")

EPS = 1e-4


def _ks(ks):
    return None if ks is None else torch.tensor(ks, dtype=torch.int32)


def _wo(Hq, D, hidden, seed):
    return randn((hidden, Hq * D), seed)


def _kept_lists(kept_idx, kept_count):
    """[..., H, N] -1-filled tensors -> nested lists of kept columns."""
    flat_i = kept_idx.reshape(-1, kept_idx.shape[-1])
    flat_c = kept_count.reshape(-1)
    return [flat_i[s, : int(flat_c[s])].tolist() for s in range(flat_c.numel())]


def _check_layout(kept_idx, kept_count, ks, N):
    """Every kept list is ascending, unique, inside the row's valid columns, -1 filled after."""
    B = kept_count.shape[-2]
    flat_i = kept_idx.reshape(-1, B, kept_idx.shape[-2], N)
    flat_c = kept_count.reshape(-1, B, kept_count.shape[-1])
    for lay in range(flat_i.shape[0]):
        for b in range(B):
            for h in range(flat_i.shape[2]):
                c = int(flat_c[lay, b, h])
                cols = flat_i[lay, b, h, :c].tolist()
                assert cols == sorted(set(cols))
                assert all(ks[b] <= x < N for x in cols)
                assert (flat_i[lay, b, h, c:] == -1).all()


# ----------------------------------------------------------------------------------------------
# errors


def _qkvo(B=1, Hq=2, Hk=1, N=8, W=2, D=4, hidden=6):
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, seed=1)
    return q, k, v, _wo(Hq, D, hidden, 2)


_BASE, _DEF = rf.criticalkv_base_scores_ref, rf.defensive_scores_ref
_ALLOC = rf.defensive_allocate_ref
_LSEL, _BOUND = rf.layer_defensive_select_ref, rf.layer_defensive_bounded_ref
_Z = torch.zeros

ERROR_CASES = [
    ("q 3-D", lambda q, k, v, o: _BASE(q[0], k), "q_window must be 4-D"),
    ("int key", lambda q, k, v, o: _BASE(q, k.long()), "key must be a floating"),
    ("Hq % Hk", lambda q, k, v, o: _BASE(q[:, :1], k.expand(1, 2, 8, 4)), "multiple of Hk"),
    ("W > N", lambda q, k, v, o: _BASE(_Z(1, 2, 9, 4), k), "1 <= W <= N"),
    ("head dim", lambda q, k, v, o: _BASE(q, k[..., :3]), "head dim"),
    ("even kernel", lambda q, k, v, o: _BASE(q, k, kernel_size=4), "odd"),
    ("key_start range", lambda q, k, v, o: _BASE(q, k, torch.tensor([9])), "out of range"),
    ("key_start shape", lambda q, k, v, o: _BASE(q, k, torch.tensor([0, 0])),
     "key_start must have shape"),
    ("value shape", lambda q, k, v, o: _DEF(q, k, v[:, :, :5], o, 2), "value shape"),
    ("o_proj shape", lambda q, k, v, o: _DEF(q, k, v, o[:, :5], 2), "o_proj_weight must be"),
    ("o_proj int", lambda q, k, v, o: _DEF(q, k, v, o.long(), 2),
     "o_proj_weight must be a floating"),
    ("negative C", lambda q, k, v, o: _DEF(q, k, v, o, -1), "budget C"),
    ("float C", lambda q, k, v, o: _DEF(q, k, v, o, 2.0), "budget C"),
    ("compute dtype", lambda q, k, v, o: _DEF(q, k, v, o, 2, compute_dtype=torch.int32),
     "compute_dtype"),
    ("base compute dtype", lambda q, k, v, o: _BASE(q, k, compute_dtype=torch.int32),
     "compute_dtype"),
    ("value_norm compute dtype",
     lambda q, k, v, o: rf.value_norm_ref(v, o, compute_dtype="bf16"), "compute_dtype"),
    ("select compute dtype", lambda q, k, v, o: rf.criticalkv_select_ref(
        _Z(1, 2, 8), _Z(1, 2, 8), 1, 2, compute_dtype=torch.int64), "compute_dtype"),
    ("key_start float", lambda q, k, v, o: _DEF(q, k, v, o, 2, key_start=_Z(1)),
     "key_start must be an integer"),
    ("value_norm D", lambda q, k, v, o: rf.value_norm_ref(v, o[:, :7]), "o_proj_weight must be"),
    ("value_norm Hq", lambda q, k, v, o: rf.value_norm_ref(v.expand(1, 3, 8, 4), o),
     "multiple of Hk"),
    ("scores 2-D", lambda q, k, v, o: _ALLOC(_Z(2, 8), 1, 2), "3-D"),
    ("scores int", lambda q, k, v, o: _ALLOC(_Z(1, 2, 8, dtype=torch.long), 1, 2), "floating"),
    ("window 0", lambda q, k, v, o: _ALLOC(_Z(1, 2, 8), 1, 0), "window W"),
    ("vnorm shape", lambda q, k, v, o: rf.criticalkv_select_ref(_Z(1, 2, 8), _Z(1, 2, 7), 1, 2),
     "vnorm must have"),
    ("alpha", lambda q, k, v, o: rf.ada_criticalkv_select_ref(_Z(1, 2, 8), _Z(1, 2, 8), 1, 2,
                                                              alpha=1.5), "alpha"),
    ("no layers", lambda q, k, v, o: _LSEL([], 1, 2), "at least one layer"),
    ("layer shapes", lambda q, k, v, o: _LSEL([_Z(1, 2, 8), _Z(1, 2, 9)], 1, 2), "layer 0 has"),
    ("too few layers", lambda q, k, v, o: _BOUND(iter([_Z(1, 2, 8)]), 2, 1, 2),
     "expected n_layers=2"),
    ("too many layers", lambda q, k, v, o: _BOUND([_Z(1, 2, 8)] * 3, 2, 1, 2),
     "more than n_layers"),
    ("n_layers 0", lambda q, k, v, o: _BOUND([], 0, 1, 2), "n_layers must be"),
]


@pytest.mark.parametrize("name,fn,msg", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_raise_clearly(name, fn, msg):
    q, k, v, o = _qkvo()
    with pytest.raises(RuntimeError, match=msg):
        fn(q, k, v, o)


def test_output_shapes_and_dtypes():
    B, Hq, Hk, N, W, D = 2, 4, 2, 11, 3, 4
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, seed=5)
    o = _wo(Hq, D, 6, 6)
    base = rf.criticalkv_base_scores_ref(q, k)
    vn = rf.value_norm_ref(v, o)
    assert base.shape == vn.shape == (B, Hk, N) and base.dtype == vn.dtype == torch.float64
    for fn in (rf.criticalkv_select_ref, rf.ada_criticalkv_select_ref):
        idx, cnt = fn(base, vn, 2, W)
        assert idx.shape == (B, Hk, N) and cnt.shape == (B, Hk)
        assert idx.dtype == cnt.dtype == torch.int32
    for aw in (False, True):
        s = rf.defensive_scores_ref(q, k, v, o, 2, as_written=aw)
        assert s.shape == (B, Hk, N) and s.dtype == torch.float64
        idx, cnt = rf.defensive_select_ref(s, 2, W, as_written=aw)
        assert idx.shape == (B, Hk, N) and cnt.dtype == torch.int32
        lk = rf.layer_defensive_select_ref([s, s, s], 2, W, as_written=aw)
        assert lk.kept_idx.shape == (3, B, Hk, N) and lk.kept_count.shape == (3, B, Hk)


# ----------------------------------------------------------------------------------------------
# 7.1 base score


def test_base_scores_hand_uniform_attention():
    # q = 0: every visible key has the same logit. N = 6, W = 2, L = 4: window query 0 sees
    # 5 keys (1/5 each), query 1 sees 6 (1/6): the window mean is 11/60 on every prefix column.
    # avg_pool1d(5, padding 2), zeros counted: edges see 3 of the 4 columns, the middle 4.
    q = torch.zeros(1, 2, 2, 3)
    k = randn((1, 1, 6, 3), 9)
    s = rf.criticalkv_base_scores_ref(q, k)
    exp = [11 / 100, 11 / 75, 11 / 75, 11 / 100, 11 / 75, 11 / 75]
    assert torch.allclose(s[0, 0], torch.tensor(exp, dtype=torch.float64), rtol=1e-14, atol=0)
    # a padded row: key_start 1 leaves N_b = 5, L_b = 3: 1/4 and 1/5 -> 9/40, pooled 27/200
    s = rf.criticalkv_base_scores_ref(q, k, torch.tensor([1], dtype=torch.int32))
    exp = [-math.inf, 27 / 200, 27 / 200, 27 / 200, 27 / 200, 27 / 200]
    assert torch.allclose(s[0, 0], torch.tensor(exp, dtype=torch.float64), rtol=1e-14, atol=0)


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def naive_base(q, k, ks, kernel=5):
    """Scalar loops, math.exp: window mean per query head, avg pool per query head, group mean."""
    B, Hq, W, D = q.shape
    _, Hk, N, _ = k.shape
    G, L = Hq // Hk, N - W
    out = torch.full((B, Hk, N), -math.inf, dtype=torch.float64)
    qd, kd = q.double().tolist(), k.double().tolist()
    for b in range(B):
        if L - ks[b] <= 0:
            out[b, :, max(ks[b], L):] = 0.0
            continue
        per_q = []
        for j in range(Hq):
            h = j // G
            agg = [0.0] * N
            for t in range(W):
                vis = [n for n in range(ks[b], N) if n <= L + t]
                lg = {n: _dot(qd[b][j][t], kd[b][h][n]) / math.sqrt(D) for n in vis}
                m = max(lg.values())
                z = sum(math.exp(x - m) for x in lg.values())
                for n in vis:
                    agg[n] += math.exp(lg[n] - m) / z / W
            p = kernel // 2
            pooled = [sum(agg[i] for i in range(n - p, n + p + 1) if ks[b] <= i < L) / kernel
                      for n in range(N)]
            per_q.append(pooled)
        for h in range(Hk):
            for n in range(ks[b], L):
                out[b, h, n] = sum(per_q[h * G + g][n] for g in range(G)) / G
        out[b, :, max(ks[b], L):] = max(float(out[b, h, n])
                                        for h in range(Hk) for n in range(ks[b], L))
    return out


BASE_CASES = [  # B, Hq, Hk, N, W, D, ks
    (1, 2, 2, 9, 3, 4, [0]),  # G = 1
    (2, 4, 2, 13, 4, 8, [0, 3]),  # G = 2, padding
    (2, 4, 1, 11, 2, 5, [2, 0]),  # G = 4
    (3, 2, 1, 7, 5, 3, [0, 1, 6]),  # W > L, a row with no valid prefix
]


@pytest.mark.parametrize("case", BASE_CASES)
def test_base_scores_match_scalar_loops_and_score_ref(case):
    B, Hq, Hk, N, W, D, ks = case
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, seed=sum(case[:6]))
    got = rf.criticalkv_base_scores_ref(q, k, _ks(ks))
    exp = naive_base(q, k, ks)
    fin = torch.isfinite(exp)
    assert torch.equal(torch.isfinite(got), fin)
    assert torch.allclose(got[fin], exp[fin], rtol=1e-12, atol=1e-15)
    # aggregate -> pool -> GQA reduce equals score_ref's aggregate -> GQA reduce -> pool (linear)
    s = ref.score_ref(q, k, 5, "avg", "mean", "mean", _ks(ks))
    L = N - W
    pre = got[..., :L]
    fin = torch.isfinite(pre)
    assert torch.equal(fin, torch.isfinite(s))
    assert torch.allclose(pre[fin].float(), s[fin], rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# value norm


def test_value_norm_hand():
    # Hk = 1, Hq = 2 (G = 2), D = 2, hidden = 3; W_o[j] = weight^T[2j : 2j + 2] (D x hidden).
    weight = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.0, -1.0, 1.0, 1.0], [3.0, 1.0, 0.0, 0.0]])
    value = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    # head 0: v @ [[1, 0, 3], [0, -1, 1]] = [1, -2, 5] -> 8; head 1: v @ [[2, 1, 0], [-1, 1, 0]]
    # = [0, 3, 0] -> 3; mean over the group: 5.5
    n = rf.value_norm_ref(value, weight)
    assert n.shape == (1, 1, 1) and float(n) == 5.5


@pytest.mark.parametrize("B,Hq,Hk,N,D,hidden",
                         [(2, 4, 2, 7, 3, 5), (1, 3, 3, 5, 4, 9), (2, 8, 2, 4, 2, 6)])
def test_value_norm_matches_einsum(B, Hq, Hk, N, D, hidden):
    g = gen(B * 100 + Hq * 10 + N)
    value = torch.randn(B, Hk, N, D, generator=g)
    weight = torch.randn(hidden, Hq * D, generator=g)
    G = Hq // Hk
    wo = weight.double().t().reshape(Hq, D, hidden)
    vexp = value.double().repeat_interleave(G, dim=1)  # [B, Hq, N, D]
    direct = torch.einsum("bjnd,jdk->bjnk", vexp, wo).abs().sum(-1).view(B, Hk, G, N).mean(2)
    got = rf.value_norm_ref(value, weight)
    assert torch.allclose(got, direct, rtol=1e-13, atol=0)
    # it really uses each query head's own slice: permuting the query heads of o_proj changes it
    if G > 1:
        perm = torch.arange(Hq).view(Hq, 1) * D + torch.arange(D)
        perm = perm[torch.tensor([1, 0] + list(range(2, Hq)))].reshape(-1)
        other = rf.value_norm_ref(value, weight[:, perm])
        assert torch.allclose(other, got)  # swap inside group 0: same mean
        swapped = torch.tensor(list(range(G, 2 * G)) + list(range(G)) + list(range(2 * G, Hq)))
        perm2 = (swapped.view(Hq, 1) * D + torch.arange(D)).reshape(-1)
        if Hk > 1:
            assert not torch.allclose(rf.value_norm_ref(value, weight[:, perm2]), got)


# ----------------------------------------------------------------------------------------------
# 7.1 selection


def test_criticalkv_uniform_hand():
    # Hk = 1, N = 8, W = 2, C = 2: C + W = 4 slots, stage 1 int(0.5 * 4) = 2.
    base = torch.tensor([[[0.5, 0.1, 0.4, 0.3, 0.2, 0.05, 0.5, 0.5]]], dtype=torch.float64)
    vn = torch.tensor([[[1.0, 10.0, 1.0, 1.0, 3.0, 100.0, 1.0, 1.0]]], dtype=torch.float64)
    # stage-2 keys (s + 1e-4) * n: c0 .5001, c1 1.001, c2 .4001, c3 .3001, c4 .6003, c5 5.01
    # default: the window is stage 1 (forced) -> fill 2 by stage 2: c5, c1
    idx, cnt = rf.criticalkv_select_ref(base, vn, 2, 2)
    assert _kept_lists(idx, cnt) == [[1, 5, 6, 7]]
    # as written: c0 ties the window at the row max and ranks first (lower token): stage 1 =
    # {c0, c6}; c7 falls to stage 2 (key .5001) and loses to c5 and c1: a window token evicted
    idx, cnt = rf.criticalkv_select_ref(base, vn, 2, 2, as_written=True)
    assert _kept_lists(idx, cnt) == [[0, 1, 5, 6]]


def test_ada_criticalkv_hand():
    # Hk = 2, N = 10, W = 1, C = 4: C + W = 5, n_safe = int(5 * 0.2) = 1, 10 slots in the row.
    h0 = [0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.44, 0.43, 0.42, 0.9]
    h1 = [0.01, 0.02, 0.3, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.9]
    base = torch.tensor([[h0, h1]], dtype=torch.float64)
    vn = torch.ones(1, 2, 10, dtype=torch.float64)
    vn[0, 0, 8] = 100.0  # c8 of head 0: stage-2 key 42.01
    # marked: each head's window (default) / top-1 (as written: head 0's c0 ties its window and
    # ranks first). Global: 2 marked + the 8 best others, all in head 0 -> C_h = (9, 1).
    # head 0: stage 1 = first max(1, int(4.5)) = 4 of its order; stage 2 fills 5 of c3..c8 by
    # key: c8 (42.01), c3, c4, c5, c6 -> c7 dropped. head 1 keeps its window only.
    for aw in (False, True):
        idx, cnt = rf.ada_criticalkv_select_ref(base, vn, 4, 1, as_written=aw)
        assert cnt.tolist() == [[9, 1]]
        assert _kept_lists(idx, cnt) == [[0, 1, 2, 3, 4, 5, 6, 8, 9], [9]]
    # the safeguard protects a head the global top-k would starve: N = 24, C = 9, W = 1 ->
    # n_safe = int(10 * 0.2) = 2, 20 slots over 48 tokens; head 0's 23 prefix tokens all beat
    # head 1's. Marked: head 0 {c23, c0}, head 1 {c23 (window), c5 (its best, 0.3)}; the 16
    # other slots all go to head 0 -> C_h = (18, 2). Without the safeguard (alpha = 0) only the
    # windows are marked and head 1 keeps its window alone -> (19, 1).
    h0 = [0.9 - 0.01 * i for i in range(23)] + [0.9]
    h1 = [0.01] * 23 + [0.9]
    h1[5] = 0.3
    base = torch.tensor([[h0, h1]], dtype=torch.float64)
    vn = torch.ones(1, 2, 24, dtype=torch.float64)
    idx, cnt = rf.ada_criticalkv_select_ref(base, vn, 9, 1)
    assert cnt.tolist() == [[18, 2]] and _kept_lists(idx, cnt)[1] == [5, 23]
    idx, cnt = rf.ada_criticalkv_select_ref(base, vn, 9, 1, alpha=0.0)
    assert cnt.tolist() == [[19, 1]] and _kept_lists(idx, cnt)[1] == [23]


def naive_critical(base, vn, C, W, ks, as_written, adaptive, alpha=0.2):
    """Python sorts on explicit tuple keys (NaN-free data)."""
    B, Hk, N = base.shape
    L = N - W
    out = []
    for b in range(B):
        cols = list(range(ks[b], N))
        n_win = N - max(ks[b], L)
        if len(cols) <= C + W:
            out += [cols[:] for _ in range(Hk)]
            continue

        def rank_key(h, i):
            tier = 0 if (not as_written and i >= L) else 1
            return (tier, -float(base[b, h, i]), i)

        orders = [sorted(cols, key=lambda i, h=h: rank_key(h, i)) for h in range(Hk)]
        if adaptive:
            n_marked = int((C + W) * alpha) if as_written else max(int((C + W) * alpha), n_win)
            marked = {(h, i) for h in range(Hk) for i in orders[h][:n_marked]}
            glob = sorted(((h, i) for h in range(Hk) for i in cols),
                          key=lambda x: (0 if x in marked else 1, -float(base[b, x[0], x[1]]),
                                         x[0], x[1]))
            budgets = [sum(1 for h2, _ in glob[: Hk * (C + W)] if h2 == h) for h in range(Hk)]
        else:
            n_marked = 0 if as_written else n_win
            budgets = [C + W] * Hk
        for h in range(Hk):
            n_first = int(0.5 * budgets[h]) if adaptive else int(0.5 * (C + W))
            nf = max(n_marked, n_first)
            forced = orders[h][:nf]
            rest = sorted(orders[h][nf:],
                          key=lambda i: (-(float(base[b, h, i]) + EPS) * float(vn[b, h, i]), i))
            out.append(sorted(forced + rest[: budgets[h] - nf]))
    return out


def _random_critical_inputs(seed, B, Hk, N, W, ks, ties):
    g = gen(seed)
    L = N - W
    if ties:
        base = torch.randint(1, 4, (B, Hk, N), generator=g).double() / 4
        vn = torch.randint(1, 3, (B, Hk, N), generator=g).double()
    else:
        base = torch.rand(B, Hk, N, generator=g, dtype=torch.float64) ** 2
        vn = torch.rand(B, Hk, N, generator=g, dtype=torch.float64) * 3
    for b in range(B):
        base[b, :, : ks[b]] = -math.inf
        if L - ks[b] > 0:
            base[b, :, max(ks[b], L):] = base[b, :, ks[b]:L].max()
    return base, vn


CRIT_SHAPES = [  # B, Hk, N, W, C, ks
    (1, 1, 9, 2, 2, [0]),
    (2, 2, 13, 3, 4, [0, 4]),
    (2, 4, 17, 4, 1, [0, 2]),  # C < W: stage 1 smaller than the window
    (3, 3, 12, 5, 3, [0, 6, 12]),  # W > prefix in a row, a fully padded row
    (2, 2, 10, 3, 7, [0, 1]),  # C >= L: keep all
    (1, 8, 21, 1, 6, [0]),
]


@pytest.mark.parametrize("case", CRIT_SHAPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("as_written", [False, True])
def test_criticalkv_matches_python_sort_and_properties(case, ties, as_written):
    B, Hk, N, W, C, ks = case
    base, vn = _random_critical_inputs(zlib.crc32(repr(case).encode()) % 1000 + ties, B, Hk, N, W,
                                        ks, ties)
    L = N - W
    for adaptive, fn in ((False, rf.criticalkv_select_ref), (True, rf.ada_criticalkv_select_ref)):
        idx, cnt = fn(base, vn, C, W, _ks(ks), as_written=as_written)
        _check_layout(idx, cnt, ks, N)
        got = _kept_lists(idx, cnt)
        assert got == naive_critical(base, vn, C, W, ks, as_written, adaptive)
        for b in range(B):
            N_b = N - ks[b]
            row = got[b * Hk: (b + 1) * Hk]
            if N_b <= C + W:
                assert all(r == list(range(ks[b], N)) for r in row)
                continue
            assert sum(len(r) for r in row) == Hk * (C + W)  # exact budget
            if not adaptive:
                assert all(len(r) == C + W for r in row)
            win = list(range(max(ks[b], L), N))
            for h, r in enumerate(row):
                if not as_written:
                    assert set(win) <= set(r)  # window kept
                # safeguard honoured (adaptive) / stage 1 honoured: the top tokens by base score
                order = sorted(range(ks[b], N), key=lambda i: (
                    0 if (not as_written and i >= L) else 1, -float(base[b, h, i]), i))
                n_first = int(0.5 * len(r)) if adaptive else int(0.5 * (C + W))
                n_safe = int(0.2 * (C + W)) if adaptive else 0
                assert set(order[: max(n_first, n_safe)]) <= set(r)
                if adaptive:
                    assert len(r) >= n_safe


def test_criticalkv_as_written_differs_only_where_the_window_is_at_stake():
    # C = 1 < W = 4: stage 1 is int(0.5 * 5) = 2 tokens, so as written two window tokens of every
    # head go to stage 2. In a head that does not hold the row max the window ranks strictly
    # first, so the literal run equals the default exactly when stage 2 keeps the rest of the
    # window, and evicts a window token otherwise; the default always keeps the window.
    same = differ = 0
    for seed in range(30):
        B, Hq, Hk, N, W, D, C = 1, 4, 4, 19, 4, 4, 1
        q, k, v = make_qkv(B, Hq, Hk, N, W, D, seed=seed, q_scale=1.0)
        o = _wo(Hq, D, 6, seed + 50)
        base = rf.criticalkv_base_scores_ref(q, k)
        vn = rf.value_norm_ref(v, o)
        d = _kept_lists(*rf.criticalkv_select_ref(base, vn, C, W))
        a = _kept_lists(*rf.criticalkv_select_ref(base, vn, C, W, as_written=True))
        L = N - W
        h_max = int(base[0, :, :L].max(dim=1).values.argmax())
        for h in range(Hk):
            assert set(range(L, N)) <= set(d[h]) and len(d[h]) == len(a[h]) == C + W
            if h == h_max:
                continue
            if set(range(L, N)) <= set(a[h]):
                assert d[h] == a[h]
                same += 1
            else:
                assert d[h] != a[h]
                differ += 1
    assert same > 0 and differ > 0


def test_criticalkv_end_to_end_wrapper():
    q, k, v = make_qkv(2, 4, 2, 15, 3, 4, seed=8)
    o = _wo(4, 4, 5, 9)
    ks = _ks([0, 2])
    base = rf.criticalkv_base_scores_ref(q, k, ks)
    vn = rf.value_norm_ref(v, o)
    for adaptive, fn in ((True, rf.ada_criticalkv_select_ref), (False, rf.criticalkv_select_ref)):
        got = rf.criticalkv_ref(q, k, v, o, 4, adaptive=adaptive, key_start=ks)
        exp = fn(base, vn, 4, 3, ks)
        assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


# ----------------------------------------------------------------------------------------------
# 7.2 stage-1 floor


def test_stage1_count_hand():
    f = rf.defensive_stage1_count_ref
    ave = torch.tensor([2.0, 5.0, 3.0], dtype=torch.float64)  # normalised .2 .5 .3; sorted .5 .3 .2
    assert f(ave, 0.7, 10)[0] == 1  # cumsum .5 .8 1.0: first >= .7 at index 1
    assert f(ave, 0.7, 10)[1].tolist() == [1]
    assert f(ave, 0.95, 10)[0] == 2 and sorted(f(ave, 0.95, 10)[1].tolist()) == [1, 2]
    assert f(ave, 0.4, 10)[0] == 0  # the first token already reaches it
    assert f(ave, 1.5, 10)[0] == 0  # none does
    assert f(ave, 0.95, 1)[0] == 1 and f(ave, 0.95, 1)[1].tolist() == [1]  # clamp
    assert f(ave, 0.95, 0)[0] == 0
    # the authors' negative clamp: sorted[:-1] forces all but the last
    c, forced = f(ave, 0.95, -1)
    assert c == -1 and sorted(forced.tolist()) == [1, 2]
    # ties in the sort go to the lower token
    c, forced = f(torch.ones(4, dtype=torch.float64), 0.6, 10)
    assert c == 2 and forced.tolist() == [0, 1]
    # zero mass: 0/0, nothing reaches the threshold
    assert f(torch.zeros(3, dtype=torch.float64), 0.5, 10)[0] == 0


# ----------------------------------------------------------------------------------------------
# 7.2 scores: hand cases


def test_defensive_scores_hand_single_head():
    # Hq = Hk = 1, D = 1, N = 5, W = 1 (L = 4), q = 0: the window query sees all 5 keys, 1/5
    # each. base = 4/5; pooled prefix row [3, 4, 4, 3] / 25, sum 14/25, rescaled to 4/5:
    # [6, 8, 8, 6] / 35; mean floor 1/5 -> [7, 8, 8, 7] / 35. One KV head: value weight 1.
    # ave = 1/5 each -> 1/4 normalised; window_bias (window mass) = 1/5, threshold 0.7,
    # cumsum .25 .5 .75 -> count 2; clamp floor(4 (C + 1) / 5) - 1 = 2 for C = 3.
    # Forced: tokens 0, 1 (ties: lower token) -> the max 8/35; the window gets it too.
    q = torch.zeros(1, 1, 1, 1)
    k = randn((1, 1, 5, 1), 3)
    v = torch.ones(1, 1, 5, 1)
    o = torch.ones(2, 1)
    s, parts = rf.defensive_scores_ref(q, k, v, o, 3, return_parts=True)
    exp = torch.tensor([8, 8, 8, 7, 8], dtype=torch.float64) / 35
    assert torch.allclose(s[0, 0], exp, rtol=1e-14, atol=0)
    R_exp = torch.tensor([7, 8, 8, 7], dtype=torch.float64) / 35
    assert torch.allclose(parts["R"][0, 0, :4], R_exp)
    assert parts["count"].tolist() == [[2]] and parts["clamp"].tolist() == [2]
    assert abs(float(parts["window_bias"][0]) - 0.2) < 1e-15
    assert parts["forced"][0, 0].tolist() == [True, True, False, False, False]
    # C = 1: clamp floor(8 / 5) - 1 = 0 -> nothing forced
    s1, p1 = rf.defensive_scores_ref(q, k, v, o, 1, return_parts=True)
    assert p1["count"].tolist() == [[0]]
    assert torch.allclose(s1[0, 0], torch.tensor([7, 8, 8, 7, 8], dtype=torch.float64) / 35)
    # as written (float64 to isolate the logic): slip mass = column 3 = 1/5 = window mass, and
    # clamp int((4 * 4 - 5) / 5) = 2: identical here
    sa, pa = rf.defensive_scores_ref(q, k, v, o, 3, as_written=True, compute_dtype=torch.float64,
                                     return_parts=True)
    assert torch.equal(sa, s) and pa["count"].tolist() == [[2]]


def test_defensive_scores_hand_value_weight():
    # Hq = Hk = 2, D = 1, N = 3, W = 1 (L = 2), q = 0: 1/3 everywhere; pooled rows rescale
    # back to [1/3, 1/3]; n = |v| (o_proj = [[1, 1]]): head 0 |v| = [1, 3], head 1 [3, 1] ->
    # weights [1/4, 3/4] and [3/4, 1/4] -> R = [1/12, 1/4], [1/4, 1/12]. ave normalised 1/2,
    # threshold 0.9 - 1/3 -> count 1; clamp floor(2 * 3 / 3) - 1 = 1 for C = 2: token 0 of each
    # head gets the row max 1/4.
    q = torch.zeros(1, 2, 1, 1)
    k = randn((1, 2, 3, 1), 4)
    v = torch.tensor([[1.0, 3.0, 7.0], [-3.0, 1.0, 7.0]]).view(1, 2, 3, 1)
    o = torch.ones(1, 2)
    s, parts = rf.defensive_scores_ref(q, k, v, o, 2, return_parts=True)
    assert torch.allclose(parts["R"][0, :, :2], torch.tensor([[1 / 12, 1 / 4], [1 / 4, 1 / 12]],
                                                             dtype=torch.float64), rtol=1e-14)
    assert parts["count"].tolist() == [[1, 1]]
    exp = torch.tensor([[1 / 4, 1 / 4, 1 / 4], [1 / 4, 1 / 12, 1 / 4]], dtype=torch.float64)
    assert torch.allclose(s[0], exp, rtol=1e-14)
    # C = 1: clamp floor(4 / 3) - 1 = 0
    _, p1 = rf.defensive_scores_ref(q, k, v, o, 1, return_parts=True)
    assert p1["count"].tolist() == [[0, 0]]


# ----------------------------------------------------------------------------------------------
# 7.2 scores: scalar re-implementation on random inputs


def naive_defensive(q, k, v, weight, C, ks, as_written=False):
    """Scalar loops in float64 (math.exp, explicit pooling taps), SPEC 7.2 steps 1-5."""
    B, Hq, W, D = q.shape
    _, Hk, N, _ = k.shape
    G, L = Hq // Hk, N - W
    hidden = weight.shape[0]
    wt = weight.double().tolist()  # o_proj(x)[c] = sum_m weight[c][m] x[m], m = j * D + d
    qd, kd, vd = q.double().tolist(), k.double().tolist(), v.double().tolist()
    rows = {}
    for b in range(B):
        L_b, N_b = L - ks[b], N - ks[b]
        if L_b <= 0:
            continue
        P, wmass, slip = [], [], []
        for j in range(Hq):
            h = j // G
            Pj, wm, sm = [], [], []
            for t in range(W):
                vis = [n for n in range(ks[b], N) if n <= L + t]
                lg = {n: _dot(qd[b][j][t], kd[b][h][n]) / math.sqrt(D) for n in vis}
                m = max(lg.values())
                z = sum(math.exp(x - m) for x in lg.values())
                p = {n: math.exp(lg[n] - m) / z for n in vis}
                Pj.append([p[n] for n in range(ks[b], L)])
                wm.append(sum(p.get(n, 0.0) for n in range(L, N)))
                sm.append(sum(p[n] for n in range(max(ks[b], L - W), L)))
            P.append(Pj)
            wmass += wm
            slip += sm
        R = []
        for h in range(Hk):
            Rh = [-math.inf] * L_b
            for g in range(G):
                for t in range(W):
                    row = P[h * G + g][t]
                    base = sum(row)
                    pooled = [sum(row[i] for i in range(n - 2, n + 3) if 0 <= i < L_b) / 5
                              for n in range(L_b)]
                    tot = sum(pooled)
                    pooled = [x / tot * base for x in pooled]
                    Rh = [max(a, c) for a, c in zip(Rh, pooled)]
            mean = sum(Rh) / L_b
            R.append([max(x, mean) for x in Rh])
        n = [[0.0] * L_b for _ in range(Hk)]
        for h in range(Hk):
            for i in range(L_b):
                acc = 0.0
                for g in range(G):
                    j = h * G + g
                    acc += sum(abs(sum(vd[b][h][ks[b] + i][d] * wt[c][j * D + d] for d in range(D)))
                               for c in range(hidden))
                n[h][i] = acc / G
        for i in range(L_b):
            tot = sum(n[h][i] for h in range(Hk))
            for h in range(Hk):
                R[h][i] *= n[h][i] / tot
        ave = [[sum(P[h * G + g][t][i] for g in range(G) for t in range(W)) / (G * W)
                for i in range(L_b)] for h in range(Hk)]
        rows[b] = dict(R=R, ave=ave, wb=sum(wmass) / len(wmass), slip=slip, L_b=L_b, N_b=N_b)
    out = torch.full((B, Hk, N), -math.inf, dtype=torch.float64)
    counts = {}
    if as_written and rows:
        allslip = [x for r in rows.values() for x in r["slip"]]
        wb_all = sum(allslip) / len(allslip)
        m_all = max(x for r in rows.values() for rh in r["R"] for x in rh)
    for b in range(B):
        if b not in rows:
            out[b, :, max(ks[b], L):] = m_all if (as_written and rows) else 0.0
            continue
        r = rows[b]
        wb = wb_all if as_written else r["wb"]
        m = m_all if as_written else max(x for rh in r["R"] for x in rh)
        frac = Fraction(r["L_b"] * (C + W), r["N_b"]) - W
        clamp = int(frac) if as_written else max(0, math.floor(frac))
        for h in range(Hk):
            s = sum(r["ave"][h])
            norm = [x / s for x in r["ave"][h]]
            order = sorted(range(r["L_b"]), key=lambda i: (-norm[i], i))
            cum, count = 0.0, 0
            for pos, i in enumerate(order):
                cum += norm[i]
                if cum >= 0.9 - wb:
                    count = pos
                    break
            count = min(count, clamp)
            sc = list(r["R"][h])
            for i in order[:count]:
                sc[i] = m
            out[b, h, ks[b]:L] = torch.tensor(sc, dtype=torch.float64)
            counts[(b, h)] = count
        out[b, :, L:] = m
    return out, counts


DEF_CASES = [  # B, Hq, Hk, N, W, D, hidden, C, ks
    (1, 2, 2, 11, 3, 4, 5, 3, [0]),  # G = 1
    (2, 4, 2, 14, 4, 3, 6, 4, [0, 3]),  # G = 2, padding
    (2, 4, 1, 13, 2, 4, 4, 2, [1, 0]),  # G = 4, Hk = 1
    (3, 4, 2, 9, 5, 2, 3, 1, [0, 2, 7]),  # W > L, a row with no valid prefix
    (1, 6, 3, 17, 3, 2, 4, 8, [0]),  # G = 2, Hk = 3, odd N
]


@pytest.mark.parametrize("case", DEF_CASES)
@pytest.mark.parametrize("as_written", [False, True])
def test_defensive_scores_match_scalar_loops(case, as_written):
    B, Hq, Hk, N, W, D, hidden, C, ks = case
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, seed=sum(case[:8]) + as_written)
    o = _wo(Hq, D, hidden, sum(case[:8]) + 1)
    got, parts = rf.defensive_scores_ref(q, k, v, o, C, _ks(ks), as_written=as_written,
                                         compute_dtype=torch.float64, return_parts=True)
    exp, counts = naive_defensive(q, k, v, o, C, ks, as_written)
    fin = torch.isfinite(exp)
    assert torch.equal(torch.isfinite(got), fin)
    assert torch.allclose(got[fin], exp[fin], rtol=1e-11, atol=1e-15)
    for (b, h), c in counts.items():
        assert int(parts["count"][b, h]) == c


def test_defensive_scores_properties():
    B, Hq, Hk, N, W, D, C = 2, 4, 2, 21, 4, 4, 5
    ks = [0, 5]
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, seed=77)
    o = _wo(Hq, D, 8, 78)
    s, parts = rf.defensive_scores_ref(q, k, v, o, C, _ks(ks), return_parts=True)
    L = N - W
    for b in range(B):
        L_b, N_b = L - ks[b], N - ks[b]
        m = float(parts["max"][b])
        assert (s[b, :, : ks[b]] == -math.inf).all()
        assert (s[b, :, L:] == m).all()  # window columns get the row maximum
        assert float(s[b, :, ks[b]:L].max()) == m
        # stage-1 floor: count tokens, the clamp as defined, all at the max
        assert int(parts["clamp"][b]) == max(0, (L_b * (C + W)) // N_b - W)
        for h in range(Hk):
            f = parts["forced"][b, h]
            assert int(f.sum()) == int(parts["count"][b, h]) <= int(parts["clamp"][b])
            assert (s[b, h][f] == m).all()
        # value weight normalised across the KV heads: sums to 1 for every token
        wsum = parts["weight"][b, :, ks[b]:L].sum(dim=0)
        assert torch.allclose(wsum, torch.ones_like(wsum), rtol=0, atol=1e-14)
        assert (parts["R"][b, :, ks[b]:L] >= 0).all()
    # a padded row is the row alone (D2)
    alone = rf.defensive_scores_ref(q[1:], k[1:, :, ks[1]:], v[1:, :, ks[1]:], o, C)
    assert torch.allclose(s[1, :, ks[1]:], alone[0], rtol=1e-13, atol=0)


def test_defensive_rescale_keeps_each_query_mass():
    # step 2 on its own: with G = 1, W = 1, Hk = 1 and o_proj weight making n constant, R before
    # the floor is the pooled row rescaled to the query's prefix mass -> sum(R_pre) = mass.
    q, k, _ = make_qkv(1, 1, 1, 16, 1, 4, seed=21)
    v = torch.ones(1, 1, 16, 4)
    o = torch.ones(3, 4)
    _, parts = rf.defensive_scores_ref(q, k, v, o, 0, return_parts=True)
    probs = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 2.0, dim=-1)[0, 0, 0]
    mass = float(probs[:15].sum())
    R = parts["R"][0, 0, :15]
    pooled = torch.nn.functional.avg_pool1d(probs[:15].view(1, 1, 15), 5, 1, 2).view(15)
    pre = pooled / pooled.sum() * mass
    assert abs(float(pre.sum()) - mass) < 1e-14
    assert torch.allclose(R, torch.maximum(pre, pre.mean()), rtol=1e-13)


def test_defensive_as_written_equals_default_exactly_where_the_slip_does_not_matter():
    # float64 arithmetic, B = 1: the two forms share steps 1-4 and the clamp (both >= 0 here);
    # they differ only through window_bias -> the count. Equal counts <=> equal scores.
    same = differ = 0
    for seed in range(24):
        N = 12 + seed % 7
        W = 1 + seed % 4
        q, k, v = make_qkv(1, 4, 2, N, W, 3, seed=seed, q_scale=0.5 + (seed % 5))
        o = _wo(4, 3, 5, seed + 100)
        C = N - W  # clamp large enough never to bind on both sides... unless the count is large
        d, pd = rf.defensive_scores_ref(q, k, v, o, C, return_parts=True)
        a, pa = rf.defensive_scores_ref(q, k, v, o, C, as_written=True, compute_dtype=torch.float64,
                                        return_parts=True)
        assert torch.equal(pd["R"], pa["R"]) and torch.equal(pd["clamp"], pa["clamp"])
        assert float(pd["window_bias"][0]) != float(pa["window_bias"][0])
        if torch.equal(pd["count"], pa["count"]):
            assert torch.equal(d, a)
            same += 1
        else:
            assert not torch.equal(d, a)
            differ += 1
    assert same > 0 and differ > 0


def test_defensive_as_written_window_bias_and_batch_coupling():
    B, Hq, Hk, N, W, D = 3, 2, 1, 13, 3, 4
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, seed=31)
    o = _wo(Hq, D, 4, 32)
    ks = [0, 2, 4]
    L = N - W
    s, p = rf.defensive_scores_ref(q, k, v, o, 3, _ks(ks), return_parts=True)
    sa, pa = rf.defensive_scores_ref(q, k, v, o, 3, _ks(ks), as_written=True,
                                     compute_dtype=torch.float64, return_parts=True)
    slips, wms = [], []
    for b in range(B):
        kk = k[b, :, ks[b]:].double()
        kk = kk.repeat_interleave(Hq // Hk, 0)
        logits = (q[b].double() @ kk.transpose(-1, -2)) / math.sqrt(D)
        N_b, L_b = N - ks[b], L - ks[b]
        mask = torch.arange(N_b).view(1, N_b) > L_b + torch.arange(W).view(W, 1)
        probs = torch.softmax(logits.masked_fill(mask, -math.inf), -1)
        wms.append(float(probs[..., L_b:].sum(-1).mean()))
        slips.append(probs[..., L_b - W:L_b].sum(-1))
        assert abs(float(p["window_bias"][b]) - wms[b]) < 1e-14  # intended: per row
    wb_all = float(torch.stack(slips).mean())
    assert all(abs(float(x) - wb_all) < 1e-14 for x in pa["window_bias"])  # as written: batch
    assert len(set(p["max"].tolist())) == B  # per-row maxima by default
    assert len(set(pa["max"].tolist())) == 1  # one batch-wide maximum as written
    for b in range(B):
        assert (sa[b, :, L:] == float(pa["max"][0])).all()


def test_defensive_as_written_negative_clamp_slice():
    # short prompt: N = 10, W = 4, C = 0 -> L = 6, clamp int((6 * 4 - 40) / 10) = int(-1.6) = -1:
    # the authors' sorted[:-1] forces L - 1 = 5 tokens; the default clamps to 0.
    q, k, v = make_qkv(1, 2, 1, 10, 4, 4, seed=12)
    o = _wo(2, 4, 3, 13)
    _, pa = rf.defensive_scores_ref(q, k, v, o, 0, as_written=True, return_parts=True)
    _, pd = rf.defensive_scores_ref(q, k, v, o, 0, return_parts=True)
    assert pa["clamp"].tolist() == [-1] and pa["count"].tolist() == [[-1]]
    assert int(pa["forced"].sum()) == 5
    assert pd["clamp"].tolist() == [0] and int(pd["forced"].sum()) == 0


def test_defensive_as_written_is_bf16():
    q, k, v = make_qkv(2, 4, 2, 19, 4, 8, seed=40)
    o = _wo(4, 8, 16, 41)
    ks = _ks([0, 3])
    a = rf.defensive_scores_ref(q, k, v, o, 4, ks, as_written=True)
    fin = torch.isfinite(a)
    assert torch.equal(a[fin], a[fin].bfloat16().double())  # every value is a bf16 value
    a64, p64 = rf.defensive_scores_ref(q, k, v, o, 4, ks, as_written=True,
                                       compute_dtype=torch.float64, return_parts=True)
    _, pb = rf.defensive_scores_ref(q, k, v, o, 4, ks, as_written=True, return_parts=True)
    R64, Rb = p64["R"], pb["R"]
    f = torch.isfinite(R64)
    assert (Rb[f] - R64[f]).abs().max() <= 0.05 * R64[f].abs().max()  # bf16-close
    assert not torch.equal(Rb, R64)  # and really rounded


# ----------------------------------------------------------------------------------------------
# 7.2 step 6 / 7.3 allocation


def test_defensive_allocate_hand():
    s = torch.tensor([[[0.9, 0.1, 0.8, 0.9], [0.7, 0.6, 0.5, 0.9]]], dtype=torch.float64)
    # C = 1, W = 1: default keeps both windows, the prefix competes for 2: h0c0, h0c2
    idx, cnt = rf.defensive_select_ref(s, 1, 1)
    assert cnt.tolist() == [[3, 1]] and _kept_lists(idx, cnt) == [[0, 2, 3], [3]]
    assert torch.equal(rf.defensive_select_ref(s, 1, 1, as_written=True)[0], idx)
    # a window below the competition: as written drops it, the default keeps it
    s[0, 1, 3] = 0.65
    idx_a, cnt_a = rf.defensive_select_ref(s, 1, 1, as_written=True)
    assert _kept_lists(idx_a, cnt_a) == [[0, 2, 3], [0]]
    assert _kept_lists(*rf.defensive_select_ref(s, 1, 1)) == [[0, 2, 3], [3]]
    # all ties: lower head, then lower token
    t = torch.zeros(1, 3, 4, dtype=torch.float64)
    assert rf.defensive_allocate_ref(t, 1, 1).tolist() == [[4, 1, 1]]  # 3 prefix slots: all h0
    assert rf.defensive_allocate_ref(t, 1, 1, as_written=True).tolist() == [[4, 2, 0]]  # 6 slots


def test_layer_defensive_hand():
    # 2 layers, Hk = 1, N = 3, W = 1, C = 1: layer 0 [.1, .2 | .2], layer 1 [.5, .9 | .9]
    s0 = torch.tensor([[[0.1, 0.2, 0.2]]], dtype=torch.float64)
    s1 = torch.tensor([[[0.5, 0.9, 0.9]]], dtype=torch.float64)
    d = rf.layer_defensive_select_ref([s0, s1], 1, 1)
    # default: both windows kept, 2 prefix slots: L1c1 (.9), L1c0 (.5)
    assert _kept_lists(d.kept_idx, d.kept_count) == [[2], [0, 1, 2]]
    a = rf.layer_defensive_select_ref([s0, s1], 1, 1, as_written=True)
    # as written, 4 slots over 6: .9 .9 .5, then .2 (L0c1 before L0c2): layer 0 loses its window
    assert _kept_lists(a.kept_idx, a.kept_count) == [[1], [0, 1, 2]]
    # an empty segment as written: layer 0 with two heads far below layer 1
    s0 = torch.tensor([[[0.1, 0.2, 0.2], [0.01, 0.02, 0.02]]], dtype=torch.float64)
    s1 = torch.tensor([[[0.5, 0.9, 0.9], [0.6, 0.7, 0.9]]], dtype=torch.float64)
    a = rf.layer_defensive_select_ref([s0, s1], 1, 1, as_written=True)
    assert a.kept_count.tolist() == [[[2, 0]], [[3, 3]]]
    d = rf.layer_defensive_select_ref([s0, s1], 1, 1)
    assert d.kept_count.tolist() == [[[1, 1]], [[3, 3]]]  # never empty: each window kept
    # ties across layers go to the lower layer
    z = torch.zeros(1, 1, 3, dtype=torch.float64)
    assert rf.layer_defensive_allocate_ref([z, z], 1, 1).tolist() == [[[3]], [[1]]]


def naive_global(layer_scores, C, W, ks, as_written):
    """Python sort on (-score, layer, head, token); NaN lowest via the key (NaN-safe)."""
    n_layers = len(layer_scores)
    B, Hk, N = layer_scores[0].shape
    L = N - W
    K = n_layers * Hk * (C + W) if as_written else n_layers * Hk * C
    out = []
    for b in range(B):
        cand = range(ks[b], N) if as_written else range(ks[b], max(ks[b], L))
        fixed = [] if as_written else list(range(max(ks[b], L), N))
        items = []
        for lay in range(n_layers):
            for h in range(Hk):
                for i in cand:
                    x = float(layer_scores[lay][b, h, i])
                    items.append(((1, 0.0) if math.isnan(x) else (0, -x), lay, h, i))
        items.sort()
        kept = {(lay, h): list(fixed) for lay in range(n_layers) for h in range(Hk)}
        for _, lay, h, i in items[:K]:
            kept[(lay, h)].append(i)
        out.append({key: sorted(v) for key, v in kept.items()})
    return out


def _random_layer_scores(rng, n_layers, B, Hk, N, W, ks, kind):
    out = []
    for _ in range(n_layers):
        if kind == "ties":
            s = torch.tensor([[[rng.randint(0, 3) / 3 for _ in range(N)] for _ in range(Hk)]
                              for _ in range(B)], dtype=torch.float64)
        else:
            s = torch.tensor([[[rng.random() for _ in range(N)] for _ in range(Hk)]
                              for _ in range(B)], dtype=torch.float64)
        if kind == "nan":
            for _ in range(3):
                s[rng.randrange(B), rng.randrange(Hk), rng.randrange(N)] = math.nan
            s[rng.randrange(B), rng.randrange(Hk), rng.randrange(N)] = -math.inf
        for b in range(B):
            s[b, :, : ks[b]] = -math.inf
        out.append(s)
    return out


def _cascade_case(seed):
    rng = random.Random(seed)
    n_layers = rng.randint(1, 5)
    B = rng.randint(1, 3)
    Hk = rng.choice([1, 2, 3, 4])
    N = rng.randint(1, 19)
    W = rng.randint(1, N)
    C = rng.choice([0, 1, 2, rng.randint(0, N + 2)])
    ks = [0] + [rng.randint(0, N) for _ in range(B - 1)]
    kind = rng.choice(["ties", "ties", "random", "nan"])
    return rng, n_layers, B, Hk, N, W, C, ks, kind


@pytest.mark.parametrize("as_written", [False, True])
def test_bounded_cascade_equals_unbounded_topk_random(as_written):
    trimmed = 0
    for seed in range(300):
        rng, n_layers, B, Hk, N, W, C, ks, kind = _cascade_case(seed * 2 + as_written)
        layers = _random_layer_scores(rng, n_layers, B, Hk, N, W, ks, kind)
        full = rf.layer_defensive_select_ref(layers, C, W, _ks(ks), as_written)
        bounded, stats = rf.layer_defensive_bounded_ref(iter(layers), n_layers, C, W, _ks(ks),
                                                        as_written)
        assert torch.equal(bounded.kept_idx, full.kept_idx), (seed, kind)
        assert torch.equal(bounded.kept_count, full.kept_count), (seed, kind)
        # and both equal a plain Python sort
        naive = naive_global(layers, C, W, ks, as_written)
        for b in range(B):
            for lay in range(n_layers):
                for h in range(Hk):
                    c = int(full.kept_count[lay, b, h])
                    assert full.kept_idx[lay, b, h, :c].tolist() == naive[b][(lay, h)]
        bound = n_layers * Hk * (C + W)
        assert stats.bound == bound
        for b in range(B):
            N_b = N - ks[b]
            assert len(stats.held[b]) == n_layers
            assert max(stats.held[b]) <= bound  # never more than the final cache
            assert max(stats.in_flight[b]) <= bound + Hk * N_b  # plus one layer at most
            trimmed += stats.held[b][-1] < n_layers * Hk * N_b
            # exact budget: every slot used, or every valid token kept
            total = int(full.kept_count[:, b].sum())
            if as_written:
                assert total == min(bound, n_layers * Hk * N_b)
            else:
                n_win, L_b = min(N_b, W), max(0, N_b - W)
                assert total == n_layers * Hk * (n_win + min(C, L_b))
            if not as_written and N_b > 0:
                assert (full.kept_count[:, b] >= 1).all()  # never an empty segment
    assert trimmed > 100  # the cascade really trims (not a trivial keep-all)


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("as_written", [False, True])
def test_bounded_cascade_on_real_defensive_scores(G, as_written):
    # odd N, W > prefix in a padded row, B > 1 with left padding, GQA G = 1, 2, 4
    Hk, D, hidden = 2, 4, 6
    Hq = Hk * G
    for (B, N, W, C, ks) in [(2, 15, 3, 2, [0, 4]), (3, 11, 5, 1, [0, 7, 2]), (2, 9, 2, 9, [0, 3])]:
        layers = []
        for lay in range(3):
            q, k, v = make_qkv(B, Hq, Hk, N, W, D, seed=lay * 31 + N + G, q_scale=1.0 + lay)
            o = _wo(Hq, D, hidden, lay + 7)
            layers.append(rf.defensive_scores_ref(q, k, v, o, C, _ks(ks), as_written=as_written))

        def gen_layers():
            for s in layers:
                yield s

        full = rf.layer_defensive_select_ref(layers, C, W, _ks(ks), as_written)
        bounded, stats = rf.layer_defensive_bounded_ref(gen_layers(), 3, C, W, _ks(ks), as_written)
        assert torch.equal(bounded.kept_idx, full.kept_idx)
        assert torch.equal(bounded.kept_count, full.kept_count)
        _check_layout(full.kept_idx, full.kept_count, ks, N)
        L = N - W
        for b in range(B):
            assert max(stats.held[b]) <= stats.bound
            if N - ks[b] <= C + W:  # C >= L_b: keep all
                assert (full.kept_count[:, b] == N - ks[b]).all()
            elif not as_written:
                assert int(full.kept_count[:, b].sum()) == 3 * Hk * (C + W)
                for lay in range(3):
                    for h in range(Hk):
                        c = int(full.kept_count[lay, b, h])
                        assert set(range(L, N)) <= set(full.kept_idx[lay, b, h, :c].tolist())
        # one layer: the layer cascade is DefensiveKV's per-layer allocation
        one = rf.defensive_select_ref(layers[0], C, W, _ks(ks), as_written)
        b1, _ = rf.layer_defensive_bounded_ref([layers[0]], 1, C, W, _ks(ks), as_written)
        assert torch.equal(one[0], b1.kept_idx[0]) and torch.equal(one[1], b1.kept_count[0])


def test_layer_as_written_equals_default_when_every_window_wins():
    same = differ = 0
    for seed in range(80):
        rng, n_layers, B, Hk, N, W, C, ks, _ = _cascade_case(1000 + seed)
        layers = _random_layer_scores(rng, n_layers, B, Hk, N, W, ks, "random")
        # the windows carry each layer's max, as defensive_scores_ref gives them
        for s in layers:
            for b in range(B):
                L = N - W
                if L - ks[b] > 0:
                    s[b, :, L:] = s[b, :, ks[b]:L].max()
        d = rf.layer_defensive_select_ref(layers, C, W, _ks(ks))
        a = rf.layer_defensive_select_ref(layers, C, W, _ks(ks), as_written=True)
        all_windows = True
        for b in range(B):
            L = N - W
            win = set(range(max(ks[b], L), N))
            for lay in range(n_layers):
                for h in range(Hk):
                    c = int(a.kept_count[lay, b, h])
                    all_windows &= win <= set(a.kept_idx[lay, b, h, :c].tolist())
        if all_windows:
            assert torch.equal(a.kept_idx, d.kept_idx)
            same += 1
        else:
            assert not torch.equal(a.kept_idx, d.kept_idx)
            differ += 1
    assert same > 0 and differ > 0


def test_defensivekv_end_to_end_budget_and_window():
    B, Hq, Hk, N, W, D, C = 2, 4, 2, 25, 4, 4, 6
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, seed=90, q_scale=8.0)
    o = _wo(Hq, D, 8, 91)
    ks = make_key_start(B, N, seed=90, max_pad=5)
    idx, cnt = rf.defensivekv_ref(q, k, v, o, C, ks)
    L = N - W
    for b in range(B):
        assert int(cnt[b].sum()) == Hk * (C + W)
        for h in range(Hk):
            assert set(range(L, N)) <= set(idx[b, h, : int(cnt[b, h])].tolist())
    assert len(set(cnt.reshape(-1).tolist())) > 1  # adaptive: heads differ


def test_criticalkv_in_a_low_precision_dtype():
    """CriticalKV's compute_dtype (D11): the base score and the value norm of bf16 inputs are
    bf16 values near the float64 ones (not equal to them), and the selection keeps the same
    number of rows per batch row."""
    q, k, v = (x.bfloat16() for x in make_qkv(2, 4, 2, 90, 8, 16, seed=3))
    o = _wo(4, 16, 24, 4).bfloat16()
    for fn, args in ((_BASE, (q, k)), (rf.value_norm_ref, (v, o))):
        lo, hi = fn(*args, compute_dtype=torch.bfloat16), fn(*args)
        fin = torch.isfinite(hi)
        assert torch.equal(lo[fin], lo[fin].bfloat16().double())    # every value a bf16 value
        assert not torch.equal(lo[fin], hi[fin])
        torch.testing.assert_close(lo[fin], hi[fin], rtol=3e-2, atol=1e-6)
    for adaptive in (False, True):
        lo = rf.criticalkv_ref(q, k, v, o, 20, adaptive=adaptive, as_written=True,
                               compute_dtype=torch.bfloat16)
        hi = rf.criticalkv_ref(q, k, v, o, 20, adaptive=adaptive, as_written=True)
        assert torch.equal(lo[1].sum(dim=1), hi[1].sum(dim=1))       # the same memory
