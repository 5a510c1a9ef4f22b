"""Self-consistency of the slow reference (adakv_ops.reference, adakv_ops.budgets).

Checks the reference against naive loop implementations and hand-computed cases; needs no
compiled extension.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from conftest import (
    assert_equal,
    make_key_start,
    make_qkv,
    rand_scores,
    randn,
    ref,
    rel_err,
    tie_scores,
)

from adakv_ops.budgets import pyramid_budgets, uniform_budgets

# ----------------------------------------------------------------------------------------------
# score


def naive_score(q, k, kernel, pooling, aggregate, gqa_reduce, ks, scale=None):
    """Per-query Python loops, float64, math.exp."""
    B, Hq, W, D = q.shape
    _, Hk, N, _ = k.shape
    G, L = Hq // Hk, N - W
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qd, kd = q.double().tolist(), k.double().tolist()
    out = [[[0.0] * L for _ in range(Hk)] for _ in range(B)]
    for b in range(B):
        per_head = []
        for j in range(Hq):
            h = j // G
            agg = [0.0 if aggregate == "mean" else -math.inf] * L
            for t in range(W):
                vis = [n for n in range(N) if ks[b] <= n <= L + t]
                probs = [0.0] * N
                if vis:
                    lg = {n: sum(a * c for a, c in zip(qd[b][j][t], kd[b][h][n])) * scale for n in vis}
                    m = max(lg.values())
                    z = sum(math.exp(v - m) for v in lg.values())
                    for n in vis:
                        probs[n] = math.exp(lg[n] - m) / z
                for n in range(L):
                    if aggregate == "mean":
                        agg[n] += probs[n] / W
                    else:
                        agg[n] = max(agg[n], probs[n])
            per_head.append(agg)
        for h in range(Hk):
            rows = per_head[h * G : (h + 1) * G]
            for n in range(L):
                vals = [r[n] for r in rows]
                red = sum(vals) / G if gqa_reduce == "mean" else max(vals)
                out[b][h][n] = red
        for h in range(Hk):
            row = out[b][h]
            p = kernel // 2
            if pooling == "max":
                row = [max(row[max(0, n - p) : n + p + 1]) for n in range(L)]
            elif pooling == "avg":
                row = [sum(row[max(0, n - p) : n + p + 1]) / kernel for n in range(L)]
            out[b][h] = [(-math.inf if n < ks[b] else v) for n, v in enumerate(row)]
    return torch.tensor(out, dtype=torch.float64).view(B, Hk, L)


SCORE_CASES = [
    # B, Hq, Hk, N, W, D, ks
    (2, 4, 2, 13, 4, 8, [0, 3]),
    (1, 2, 2, 9, 9, 4, [0]),  # W == N: empty prefix
    (3, 3, 1, 11, 3, 5, [0, 9, 11]),  # padding inside the window, and a fully padded row
    (2, 4, 4, 10, 2, 6, [1, 0]),
]


@pytest.mark.parametrize("case", SCORE_CASES)
@pytest.mark.parametrize(
    "pooling,kernel", [("max", 7), ("max", 3), ("avg", 5), ("avg", 1), ("none", 7)]
)
@pytest.mark.parametrize("aggregate", ["mean", "max"])
@pytest.mark.parametrize("gqa_reduce", ["mean", "max"])
def test_score_ref_matches_naive_loop(case, pooling, kernel, aggregate, gqa_reduce):
    B, Hq, Hk, N, W, D, ks = case
    seed = zlib.crc32(repr((case, pooling, kernel, aggregate, gqa_reduce)).encode()) % 10_000
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, seed)
    ks_t = torch.tensor(ks, dtype=torch.int32)
    got = ref.score_ref(q, k, kernel, pooling, aggregate, gqa_reduce, ks_t)
    exp = naive_score(q, k, kernel, pooling, aggregate, gqa_reduce, ks)
    assert got.dtype == torch.float32 and got.shape == (B, Hk, N - W)
    fin = torch.isfinite(exp)
    assert torch.equal(torch.isfinite(got), fin)
    assert torch.allclose(got[fin].double(), exp[fin], rtol=1e-6, atol=1e-9)


def test_score_ref_scale_and_dtype():
    q, k, _ = make_qkv(2, 4, 2, 20, 5, 8, seed=3)
    a = ref.score_ref(q, k, scale=0.3)
    b = naive_score(q, k, 7, "max", "mean", "mean", [0, 0], scale=0.3)
    assert torch.allclose(a.double(), b, rtol=1e-6)
    # bf16 inputs are computed from their exact values
    qb, kb = q.bfloat16(), k.bfloat16()
    assert torch.equal(ref.score_ref(qb, kb), ref.score_ref(qb.float(), kb.float()))


def test_score_ref_probability_mass():
    # no pooling, mean/mean, no padding: scores are the mean prefix attention mass (<= 1)
    q, k, _ = make_qkv(1, 2, 1, 30, 6, 8, seed=11)
    s = ref.score_ref(q, k, pooling="none")
    assert (s >= 0).all()
    assert float(s.sum()) < 1.0 + 1e-6
    # W=1: the only window query sees every key; total prefix mass = 1 - p(last)
    s1 = ref.score_ref(q[:, :, -1:], k, pooling="none")
    assert 0 < float(s1.sum()) < 1.0


# ----------------------------------------------------------------------------------------------
# allocate


def python_winners(row, k):
    """c_h by a plain Python sort on (-score, head, token)."""
    Hk, L = row.shape
    items = sorted((-float(row[h, n]), h, n) for h in range(Hk) for n in range(L))
    c = [0] * Hk
    for _, h, _ in items[:k]:
        c[h] += 1
    return c


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [2, 5, None])
def test_allocate_ref_winners_total_order(seed, levels):
    Hk, L, C = 4, 37, 9
    s = rand_scores(1, Hk, L, seed) if levels is None else tie_scores(1, Hk, L, seed, levels)
    got = ref.allocate_ref(s, C, floor_alpha=0.0)[0].tolist()
    assert got == python_winners(s[0], Hk * C)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0, 0.37])
def test_allocate_ref_exact_sum_and_bounds(seed, alpha):
    B, Hk, L = 3, 8, 50
    ks = make_key_start(B, L, seed, max_pad=30)
    s = tie_scores(B, Hk, L, seed, levels=4, key_start=ks) if seed % 2 else rand_scores(B, Hk, L, seed, ks)
    for C in [0, 1, 7, 19, 25, 49, 50, 60]:
        bud = ref.allocate_ref(s, C, alpha, key_start=ks)
        assert bud.dtype == torch.int32 and bud.shape == (B, Hk)
        for b in range(B):
            Lb = L - int(ks[b])
            if Lb <= C:
                assert (bud[b] == C).all()
            else:
                assert int(bud[b].sum()) == Hk * C
                assert (bud[b] >= 0).all() and (bud[b] <= Lb).all()
                if alpha == 1.0:
                    assert (bud[b] == C).all()
        assert (ref.allocate_ref(s, C, alpha, adaptive=False, key_start=ks) == C).all()


def _scores_with_counts(counts, L):
    """Scores whose global top-sum(counts) has exactly counts[h] winners in head h."""
    Hk = len(counts)
    s = torch.full((1, Hk, L), 0.1)
    for h, c in enumerate(counts):
        s[0, h, :c] = 1.0 + 0.01 * h
    return s


def test_allocate_ref_hand_cases():
    # Hk=3, C=5, alpha=0.5, c=[10,5,0]: x=[7.5,5,2.5] -> floor [7,5,2], R=1, tie -> head 0
    s = _scores_with_counts([10, 5, 0], 20)
    assert ref.allocate_ref(s, 5, 0.5).tolist() == [[8, 5, 2]]
    # official: round_half_even(0.5*c + floor(2.5)=2) = [7, round(4.5)=4, 2] (drifts to 13)
    assert ref.allocate_ref(s, 5, 0.5, rounding="official").tolist() == [[7, 4, 2]]
    # Hk=2, C=3, alpha=0.5: c=[5,1] -> official [round(3.5)=4, round(1.5)=2]; exact [4, 2]
    s = _scores_with_counts([5, 1], 10)
    assert ref.allocate_ref(s, 3, 0.5, rounding="official").tolist() == [[4, 2]]
    assert ref.allocate_ref(s, 3, 0.5).tolist() == [[4, 2]]
    # c=[3,3] -> official [round(2.5)=2, 2] (sum 4 != 6); exact [3,3]
    s = _scores_with_counts([3, 3], 10)
    assert ref.allocate_ref(s, 3, 0.5, rounding="official").tolist() == [[2, 2]]
    assert ref.allocate_ref(s, 3, 0.5).tolist() == [[3, 3]]
    # alpha=0.2, C=10, c=[15,5]: x = [14, 6]
    s = _scores_with_counts([15, 5], 30)
    assert ref.allocate_ref(s, 10, 0.2).tolist() == [[14, 6]]
    assert ref.allocate_ref(s, 10, 0.2, rounding="official").tolist() == [[14, 6]]
    # Hk=4, C=3, alpha=0.5 with c=[12,0,0,0]: x=[7.5,1.5,1.5,1.5] -> floors [7,1,1,1], R=2
    # -> heads 0 and 1 get the units: [8,2,1,1]
    s = _scores_with_counts([12, 0, 0, 0], 20)
    assert ref.allocate_ref(s, 3, 0.5).tolist() == [[8, 2, 1, 1]]
    # official: [round(6+1)=7, 1, 1, 1]
    assert ref.allocate_ref(s, 3, 0.5, rounding="official").tolist() == [[7, 1, 1, 1]]


def test_allocate_ref_all_ties_go_to_lower_head():
    s = torch.full((1, 3, 10), 0.5)
    assert ref.allocate_ref(s, 4, 0.0).tolist() == [[10, 2, 0]]
    idx, cnt = ref.select_ref(s, torch.tensor([[10, 2, 0]], dtype=torch.int32))
    assert cnt.tolist() == [[10, 2, 0]]
    assert idx[0, 1].tolist() == [0, 1] + [-1] * 8
    assert idx[0, 2].tolist() == [-1] * 10


def test_allocate_ref_official_rounding_formula_random():
    for seed in range(20):
        Hk, L, C = 6, 40, 11
        alpha = [0.0, 0.2, 0.5, 0.7, 1.0][seed % 5]
        s = tie_scores(1, Hk, L, seed, levels=6)
        c = python_winners(s[0], Hk * C)
        expect = [round((1 - alpha) * ch + math.floor(alpha * C)) for ch in c]
        assert ref.allocate_ref(s, C, alpha, rounding="official")[0].tolist() == expect


def test_allocate_ref_not_evicted_rows():
    s = rand_scores(2, 2, 10, 0, key_start=torch.tensor([0, 6], dtype=torch.int32))
    bud = ref.allocate_ref(s, 4, key_start=torch.tensor([0, 6], dtype=torch.int32))
    assert bud[1].tolist() == [4, 4]  # L_b = 4 <= C
    assert int(bud[0].sum()) == 8


# ----------------------------------------------------------------------------------------------
# select / compact / evict


@pytest.mark.parametrize("seed", range(6))
def test_select_ref_matches_python_sort(seed):
    B, Hk, L = 2, 3, 29
    ks = torch.tensor([0, 5], dtype=torch.int32)
    s = tie_scores(B, Hk, L, seed, levels=3, key_start=ks)
    g = torch.Generator().manual_seed(seed)
    bud = torch.randint(0, L + 4, (B, Hk), generator=g, dtype=torch.int32)
    idx, cnt = ref.select_ref(s, bud, ks)
    for b in range(B):
        Lb = L - int(ks[b])
        for h in range(Hk):
            k = min(int(bud[b, h]), Lb)
            items = sorted((-float(s[b, h, n]), n) for n in range(int(ks[b]), L))
            exp = sorted(n for _, n in items[:k])
            assert cnt[b, h] == k
            assert idx[b, h, :k].tolist() == exp
            assert (idx[b, h, k:] == -1).all()


def test_select_ref_negative_budget_raises():
    with pytest.raises(RuntimeError, match="budget"):
        ref.select_ref(rand_scores(1, 2, 5, 0), torch.tensor([[1, -1]], dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_ref_layout(dtype):
    B, Hk, N, D, Wn, reserve = 2, 3, 20, 4, 5, 2
    ks = torch.tensor([0, 4], dtype=torch.int32)
    key = randn((B, Hk, N, D), 1, dtype)
    val = randn((B, Hk, N, D), 2, dtype)
    s = rand_scores(B, Hk, N - Wn, 3, ks)
    bud = torch.tensor([[2, 6, 4], [0, 5, 20]], dtype=torch.int32)
    idx, cnt = ref.select_ref(s, bud, ks)
    kf, vf, st, ln = ref.compact_ref(key, val, idx, cnt, bud, Wn, reserve, rows=200, key_start=ks)
    cap = (bud.view(-1) + Wn + reserve).tolist()
    assert st.dtype == torch.int32 and ln.dtype == torch.int32
    assert st.tolist() == [sum(cap[:i]) for i in range(B * Hk)]
    assert kf.shape == (200, D) and kf.dtype == dtype
    pos = ref.kept_positions_ref(idx, cnt, N, Wn, ks)
    for s_ in range(B * Hk):
        b, h = divmod(s_, Hk)
        p = pos[s_]
        assert int(ln[s_]) == len(p) == int(cnt[b, h]) + min(Wn, N - int(ks[b]))
        assert (p[1:] > p[:-1]).all()  # ascending positions, window last
        assert torch.equal(kf[int(st[s_]) : int(st[s_]) + len(p)], key[b, h, p])
        assert torch.equal(vf[int(st[s_]) : int(st[s_]) + len(p)], val[b, h, p])
        end = int(st[s_ + 1]) if s_ + 1 < B * Hk else 200
        assert (kf[int(st[s_]) + len(p) : end] == 0).all()
    # row 1 segment 2: budget 20 > L_b = 11 -> keeps all valid prefix tokens
    assert int(cnt[1, 2]) == N - Wn - 4
    with pytest.raises(RuntimeError, match="rows"):
        ref.compact_ref(key, val, idx, cnt, bud, Wn, reserve, rows=10, key_start=ks)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rounding", ["exact", "official"])
def test_evict_ref_invariants(seed, rounding):
    B, Hq, Hk, N, W, D, C, R = 3, 4, 2, 60, 8, 8, 10, 3
    ks = torch.tensor([0, 17, 50], dtype=torch.int32)  # row 2: N_b = 10 <= C + W (not evicted)
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, seed)
    kf, vf, st, ln = ref.evict_ref(q, k, v, C, reserve=R, key_start=ks, rounding=rounding)
    scores = ref.score_ref(q, k, key_start=ks)
    bud = ref.allocate_ref(scores, C, key_start=ks, rounding=rounding)
    if rounding == "exact":
        assert kf.shape[0] == B * Hk * (C + W + R)
        for b in range(B):
            assert int(st[b * Hk]) == b * Hk * (C + W + R)
    else:
        assert kf.shape[0] == int((bud + W + R).sum())
    for b in range(B):
        Nb = N - int(ks[b])
        for h in range(Hk):
            s_ = b * Hk + h
            if Nb <= C + W:
                assert int(ln[s_]) == Nb
                seg = kf[int(st[s_]) : int(st[s_]) + Nb]
                assert torch.equal(seg, k[b, h, int(ks[b]) :])
            else:
                assert int(ln[s_]) == int(bud[b, h]) + W
    # explicit scores override gives the same result
    again = ref.evict_ref(q, k, v, C, reserve=R, key_start=ks, rounding=rounding, scores=scores)
    for a, e in zip(again, (kf, vf, st, ln)):
        assert_equal(a, e)


# ----------------------------------------------------------------------------------------------
# append / decode


def dense_attention(q, k, v, causal_T):
    """Standard GQA attention: q [B,Hq,T,D] over k,v [B,Hk,n,D], the T newest causal."""
    B, Hq, T, D = q.shape
    Hk, n = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(Hq // Hk, 1)
    vv = v.double().repeat_interleave(Hq // Hk, 1)
    lg = q.double() @ kk.transpose(-1, -2) / math.sqrt(D)
    mask = torch.arange(n).view(1, n) <= (n - T + torch.arange(T)).view(T, 1)
    lg = lg.masked_fill(~mask, float("-inf"))
    return torch.softmax(lg, -1) @ vv, torch.logsumexp(lg, -1)


@pytest.mark.parametrize("T", [1, 3])
def test_decode_attention_ref_full_cache_equals_dense(T):
    B, Hq, Hk, n, D = 2, 6, 2, 17, 8
    k = randn((B, Hk, n, D), 0)
    v = randn((B, Hk, n, D), 1)
    q = randn((B, Hq, T, D), 2)
    kf, st, ln = k.reshape(B * Hk * n, D), torch.arange(B * Hk, dtype=torch.int32) * n, torch.full((B * Hk,), n, dtype=torch.int32)
    out, lse = ref.decode_attention_ref(q, kf, v.reshape(-1, D), st, ln, return_lse=True)
    exp, exp_lse = dense_attention(q, k, v, T)
    assert rel_err(out, exp) < 1e-6
    assert torch.allclose(lse.double(), exp_lse, rtol=1e-6)


def test_decode_attention_ref_short_and_empty_segments():
    D, T = 4, 3
    kf = randn((20, D), 0)
    vf = randn((20, D), 1)
    st = torch.tensor([0, 5, 10, 15], dtype=torch.int32)
    ln = torch.tensor([0, 1, 5, 2], dtype=torch.int32)
    q = randn((2, 4, T, D), 2)  # Hk = 2, G = 2
    out, lse = ref.decode_attention_ref(q, kf, vf, st, ln, return_lse=True)
    # segment 0 (b0, heads 0,1): empty -> zeros, -inf
    assert (out[0, :2] == 0).all() and torch.isinf(lse[0, :2]).all()
    # segment 1 (b0 heads 2,3), len 1: t=0,1 see nothing; t=2 sees row 5 only -> out = v[5]
    assert (out[0, 2:, :2] == 0).all()
    assert torch.allclose(out[0, 2:, 2], vf[5].expand(2, D))
    # segment 3 (len 2): t=0 -> nothing, t=1 -> row 15, t=2 -> rows 15,16
    assert (out[1, 2:, 0] == 0).all()
    assert torch.allclose(out[1, 2:, 1], vf[15].expand(2, D))


def test_append_ref_and_overflow():
    D = 3
    kf = randn((10, D), 0)
    vf = randn((10, D), 1)
    st = torch.tensor([0, 4], dtype=torch.int32)
    ln = torch.tensor([2, 5], dtype=torch.int32)
    kn = randn((1, 2, 1, D), 2)
    vn = randn((1, 2, 1, D), 3)
    k2, v2, l2 = ref.append_ref(kf, vf, st, ln, kn, vn)
    assert l2.tolist() == [3, 6]
    assert torch.equal(k2[2], kn[0, 0, 0]) and torch.equal(v2[9], vn[0, 1, 0])
    assert torch.equal(k2[:2], kf[:2]) and ln.tolist() == [2, 5]
    with pytest.raises(RuntimeError, match="overflow"):
        ref.append_ref(kf, vf, st, ln, randn((1, 2, 3, D), 4), randn((1, 2, 3, D), 5))


# ----------------------------------------------------------------------------------------------
# budgets


def test_pyramid_official_values():
    b = pyramid_budgets(128, 32, prompt_len=10_000, window=32)
    # min_=6, max_=250, steps=244//31=7
    assert b == [250 - 7 * l for l in range(32)]
    assert sum(b) / 32 > 128  # the official schedule overshoots
    assert sum(b) <= 1.15 * 32 * 128


@pytest.mark.parametrize("C", [0, 1, 5, 19, 20, 64, 128, 333, 1024])
@pytest.mark.parametrize("n_layers", [1, 2, 3, 7, 32, 80])
def test_pyramid_properties(C, n_layers):
    off = pyramid_budgets(C, n_layers, 100_000, 16)
    ex = pyramid_budgets(C, n_layers, 100_000, 16, exact_mean=True)
    for b in (off, ex):
        assert len(b) == n_layers
        assert all(isinstance(x, int) and x >= 0 for x in b)
        assert all(b[i] >= b[i + 1] for i in range(n_layers - 1))  # non-increasing
    assert sum(ex) == n_layers * C
    assert sum(off) >= n_layers * C
    if n_layers == 1:
        assert off == ex == [C]
    else:
        min_ = C // 20
        assert off[0] == ex[0] == 2 * C - min_
        # exact variant stays within 1 of the real-valued schedule
        s = (2 * C - 2 * min_) / (n_layers - 1)
        assert all(abs(x - (2 * C - min_ - l * s)) < 1 + 1e-9 for l, x in enumerate(ex))


def test_pyramid_exact_mean_hand_case():
    # C=10, 4 layers: min_=0, max_=20, s=20/3 -> x=[20, 13.33, 6.67, 0] -> [20, 13, 7, 0]
    assert pyramid_budgets(10, 4, 1000, 8, exact_mean=True) == [20, 13, 7, 0]
    # official: steps = 20 // 3 = 6 -> [20, 14, 8, 2]
    assert pyramid_budgets(10, 4, 1000, 8) == [20, 14, 8, 2]
    # ties of the remainder go to the lower layer: C=3, 3 layers: min_=0, max_=6, s=3 -> exact
    assert pyramid_budgets(3, 3, 1000, 8, exact_mean=True) == [6, 3, 0]
    # C=5, 3 layers, beta=2: min_=2, max_=8, s=3 -> [8, 5, 2]
    assert pyramid_budgets(5, 3, 1000, 8, beta=2, exact_mean=True) == [8, 5, 2]
    # C=1, 3 layers: x=[2,1,0]
    assert pyramid_budgets(1, 3, 1000, 8, exact_mean=True) == [2, 1, 0]
    # C=1, 4 layers: s=2/3 -> x=[2, 1.33, .67, 0] floors [2,1,0,0] R=1 -> layer 2 (.67)
    assert pyramid_budgets(1, 4, 1000, 8, exact_mean=True) == [2, 1, 1, 0]
    # C=1, 5 layers: s=.5 -> x=[2,1.5,1,.5,0]: floors sum 4, R=1 -> tie .5/.5 -> lower layer 1
    assert pyramid_budgets(1, 5, 1000, 8, exact_mean=True) == [2, 2, 1, 0, 0]


def test_pyramid_clamp():
    assert pyramid_budgets(100, 4, prompt_len=150, window=32) == [118, 118, 69, 6]
    assert pyramid_budgets(100, 1, prompt_len=50, window=32) == [18]
    assert max(pyramid_budgets(64, 8, prompt_len=40, window=32, exact_mean=True)) == 8
    assert uniform_budgets(7, 3) == [7, 7, 7]
    with pytest.raises(ValueError):
        pyramid_budgets(-1, 4, 100, 8)
    with pytest.raises(ValueError):
        pyramid_budgets(4, 0, 100, 8)


# ----------------------------------------------------------------------------------------------
# NaN / inf scores: one total order (docs/semantics.md, "Inputs nobody should trust")


def _python_total_order(vals):
    """Independent oracle: (is NaN, -value, index) ascending; NaN below -inf, -0.0 == +0.0."""
    key = [(1, 0.0, i) if math.isnan(x) else (0, -(x + 0.0), i) for i, x in enumerate(vals)]
    return [i for _, _, i in sorted(key)]


def test_nan_ranks_lowest_total_order():
    nan, inf = float("nan"), float("inf")
    vals = [1.0, nan, -inf, 0.5, inf, nan, -0.0, 0.0, -inf, 0.5]
    got = ref._stable_desc_order(torch.tensor(vals)).tolist()
    assert got == _python_total_order(vals)
    assert got == [4, 0, 3, 9, 6, 7, 2, 8, 1, 5]  # +inf, numbers, -inf, then NaNs by index
    g = torch.Generator().manual_seed(11)
    for _ in range(20):  # random mixes of NaN, +-inf, ties
        pool = torch.tensor([nan, inf, -inf, 0.0, -0.0, 0.25, 0.5, 1.0])
        v = pool[torch.randint(0, len(pool), (40,), generator=g)]
        assert ref._stable_desc_order(v).tolist() == _python_total_order(v.tolist())


def test_nan_scores_select_and_allocate():
    nan, inf = float("nan"), float("inf")
    s = torch.tensor([[[1.0, nan, -inf, 0.5, inf, nan]]])
    idx, cnt = ref.select_ref(s, torch.tensor([[4]], dtype=torch.int32))
    assert cnt.tolist() == [[4]]
    assert idx.tolist() == [[[0, 2, 3, 4, -1, -1]]]  # -inf beats both NaNs
    idx, _ = ref.select_ref(s, torch.tensor([[5]], dtype=torch.int32))
    assert idx[0, 0, :5].tolist() == [0, 1, 2, 3, 4]  # the lower-index NaN next
    # allocate: an all-NaN head loses every global top-k slot to a head holding -inf
    s2 = torch.tensor([[[nan] * 4, [0.1, 0.2, -inf, 0.3]]])
    assert ref.allocate_ref(s2, 2, floor_alpha=0.0).tolist() == [[0, 4]]
    # two all-NaN heads: plain ties -> the lower head index wins
    s3 = torch.full((1, 2, 4), nan)
    assert ref.winners_per_head_ref(s3[0], 4) == [4, 0]
