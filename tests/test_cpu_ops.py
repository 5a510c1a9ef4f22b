"""adakv_ops ops versus the slow reference (adakv_ops.reference).

CPU is the primary target; every test is also parametrized on "cuda" (skipped without a GPU).
allocate / select / compact / evict are compared for exact equality on the *same* fp32 scores
(an fp64 reference or another device may order near-ties differently); score is compared with
a tolerance; decode_attention to fp32 / half precision tolerances.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from conftest import (
    DEVICES,
    assert_equal,
    cpu,
    make_key_start,
    make_qkv,
    rand_scores,
    randn,
    ref,
    rel_err,
    requires_ops,
    tie_scores,
    to,
)
import conftest

pytestmark = requires_ops
ops = conftest.ops


def seed_of(*parts) -> int:
    """Deterministic, case-specific seed (fresh data for every parametrized case)."""
    return zlib.crc32(repr(parts).encode()) % 100_000


# ----------------------------------------------------------------------------------------------
# score

SCORE_SHAPES = [
    # B, Hq, Hk, N, W, D, padded
    (1, 8, 2, 100, 8, 16, False),
    (2, 8, 2, 257, 32, 32, True),
    (3, 4, 4, 130, 64, 8, True),  # G = 1 (per-query-head mode), W = 64
    (2, 6, 3, 33, 8, 8, True),
    (1, 8, 8, 9, 8, 4, False),  # L = 1
    (1, 4, 2, 64, 64, 16, False),  # W == N: empty prefix
    (2, 4, 1, 3001, 32, 64, True),  # long, odd N
]
SCORE_OPTS = [("max", 7), ("avg", 5), ("none", 1), ("max", 3), ("max", 1)]


def score_tol_check(got, exp):
    got, exp = cpu(got), cpu(exp)
    assert got.dtype == torch.float32 and got.shape == exp.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(exp)), "-inf (padding) pattern differs"
    fin = torch.isfinite(exp)
    assert torch.isfinite(got[fin]).all()
    if fin.any():
        scale = float(exp[fin].abs().max())
        torch.testing.assert_close(got[fin], exp[fin], rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SCORE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pooling,kernel", SCORE_OPTS)
@pytest.mark.parametrize("aggregate", ["mean", "max"])
@pytest.mark.parametrize("gqa_reduce", ["mean", "max"])
def test_score(device, shape, pooling, kernel, aggregate, gqa_reduce):
    B, Hq, Hk, N, W, D, padded = shape
    sd = seed_of("score", shape, pooling, kernel, aggregate, gqa_reduce)
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, sd)
    ks = make_key_start(B, N, sd, max_pad=N // 3) if padded else None
    exp = ref.score_ref(q, k, kernel, pooling, aggregate, gqa_reduce, ks)
    got = ops.score(*to(device, q, k), kernel_size=kernel, pooling=pooling, aggregate=aggregate,
                    gqa_reduce=gqa_reduce, key_start=to(device, ks))
    score_tol_check(got, exp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(2))
def test_score_half_inputs_and_scale(device, dtype, seed):
    B, Hq, Hk, N, W, D = 2, 8, 2, 301, 16, 64
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, seed_of("score_half", dtype, seed), dtype=dtype)
    ks = torch.tensor([0, 40], dtype=torch.int32)
    for scale in (None, 0.05):
        exp = ref.score_ref(q, k, key_start=ks, scale=scale)
        got = ops.score(*to(device, q, k), key_start=to(device, ks), scale=scale)
        score_tol_check(got, exp)


@pytest.mark.parametrize("device", DEVICES)
def test_score_padding_reaching_window(device):
    # key_start inside the window (padding queries) and key_start == N (all padding)
    B, Hq, Hk, N, W, D = 3, 4, 2, 40, 8, 8
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 5)
    ks = torch.tensor([35, 40, 32], dtype=torch.int32)
    for pooling, kern in SCORE_OPTS:
        exp = ref.score_ref(q, k, kern, pooling, key_start=ks)
        got = ops.score(*to(device, q, k), kernel_size=kern, pooling=pooling, key_start=to(device, ks))
        score_tol_check(got, exp)
        assert torch.isneginf(cpu(got)).all()


# ----------------------------------------------------------------------------------------------
# allocate / select (exact, on identical scores)

ALLOC_SHAPES = [(3, 2, 50), (2, 8, 300), (1, 4, 2968), (4, 1, 17)]  # B, Hk, L


def make_scores(kind, B, Hk, L, seed, ks):
    if kind == "rand":
        return rand_scores(B, Hk, L, seed, ks)
    if kind == "tie":
        return tie_scores(B, Hk, L, seed, levels=3, key_start=ks)
    if kind == "tie2":
        return tie_scores(B, Hk, L, seed, levels=2, key_start=ks, plateau=False)
    # real scores: max pooling gives plateaus around every peak
    Hq = Hk * 2
    q, k, _ = make_qkv(B, Hq, Hk, L + 8, 8, 8, seed)
    return ref.score_ref(q, k, 7, "max", key_start=ks)


def budget_list(L):
    return sorted({0, 1, 3, L // 10, L // 3, L - 1, L, L + 5})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ALLOC_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["rand", "tie", "tie2", "real"])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("rounding", ["exact", "official"])
def test_allocate(device, shape, kind, alpha, rounding):
    B, Hk, L = shape
    sd = seed_of("alloc", shape, kind, alpha, rounding)
    ks = make_key_start(B, L + 8, sd, max_pad=L // 2) if B > 1 else None
    s = make_scores(kind, B, Hk, L, sd, ks)
    for C in budget_list(L):
        for adaptive in (True, False) if alpha == 0.2 else (True,):
            exp = ref.allocate_ref(s, C, alpha, adaptive, rounding, ks)
            got = ops.allocate(to(device, s), C, floor_alpha=alpha, adaptive=adaptive,
                               rounding=rounding, key_start=to(device, ks))
            assert_equal(got, exp, f"allocate C={C} adaptive={adaptive}")
            if rounding == "exact":
                for b in range(B):
                    Lb = L - (0 if ks is None else min(int(ks[b]), L))
                    if Lb > C:
                        assert int(cpu(got)[b].sum()) == Hk * C


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ALLOC_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["rand", "tie", "tie2", "real"])
@pytest.mark.parametrize("seed", range(2))
def test_select(device, shape, kind, seed):
    B, Hk, L = shape
    sd = seed_of("select", shape, kind, seed)
    ks = make_key_start(B, L + 8, sd, max_pad=L // 2) if B > 1 else None
    s = make_scores(kind, B, Hk, L, sd, ks)
    g = torch.Generator().manual_seed(sd)
    budgets = [ref.allocate_ref(s, C, 0.2, key_start=ks) for C in budget_list(L)[1::2]]
    budgets.append(torch.randint(0, L + 3, (B, Hk), generator=g, dtype=torch.int32))
    budgets.append(torch.zeros(B, Hk, dtype=torch.int32))
    for bud in budgets:
        ei, ec = ref.select_ref(s, bud, ks)
        gi, gc = ops.select(*to(device, s, bud), key_start=to(device, ks))
        assert_equal(gc, ec, "kept_count")
        assert_equal(gi, ei, "kept_idx")


# ----------------------------------------------------------------------------------------------
# compact


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("W", [8, 32, 64])
@pytest.mark.parametrize("reserve,extra_rows", [(0, None), (5, None), (3, 0), (2, 17)])
def test_compact(device, dtype, W, reserve, extra_rows):
    B, Hk, N, D = 3, 2, 211, 16
    sd = seed_of("compact", dtype, W, reserve, extra_rows)
    key = randn((B, Hk, N, D), sd, dtype)
    value = randn((B, Hk, N, D), sd + 1, dtype)
    ks = torch.tensor([0, 13, N - W // 2], dtype=torch.int32)  # row 2: padding into the window
    s = rand_scores(B, Hk, N - W, sd, ks)
    C = 20
    bud = ref.allocate_ref(s, C, 0.2, key_start=ks)
    idx, cnt = ref.select_ref(s, bud, ks)
    rows = None if extra_rows is None else int((bud + W + reserve).sum()) + extra_rows
    exp = ref.compact_ref(key, value, idx, cnt, bud, W, reserve, rows, ks)
    got = ops.compact(*to(device, key, value, idx, cnt, bud), W, reserve=reserve, rows=rows,
                      key_start=to(device, ks))
    for name, g_, e_ in zip(("k_flat", "v_flat", "seg_start", "seg_len"), got, exp):
        assert_equal(g_, e_, name)


@pytest.mark.parametrize("device", DEVICES)
def test_compact_budget_zero_and_window_only(device):
    B, Hk, N, D, W = 2, 3, 40, 8, 8
    key = randn((B, Hk, N, D), 1)
    value = randn((B, Hk, N, D), 2)
    bud = torch.tensor([[0, 0, 5], [3, 0, 40]], dtype=torch.int32)
    s = rand_scores(B, Hk, N - W, 3)
    idx, cnt = ref.select_ref(s, bud)
    exp = ref.compact_ref(key, value, idx, cnt, bud, W)
    got = ops.compact(*to(device, key, value, idx, cnt, bud), W)
    for name, g_, e_ in zip(("k_flat", "v_flat", "seg_start", "seg_len"), got, exp):
        assert_equal(g_, e_, name)
    # window = 0: prefix tokens only (all N positions are selectable)
    s0 = rand_scores(B, Hk, N, 4)
    idx0, cnt0 = ref.select_ref(s0, bud)
    exp = ref.compact_ref(key, value, idx0, cnt0, bud, 0, reserve=1)
    got = ops.compact(*to(device, key, value, idx0, cnt0, bud), 0, reserve=1)
    for name, g_, e_ in zip(("k_flat", "v_flat", "seg_start", "seg_len"), got, exp):
        assert_equal(g_, e_, name)


# ----------------------------------------------------------------------------------------------
# evict

EVICT_SHAPES = [
    # B, Hq, Hk, N, W, D, C, reserve, padded
    (1, 8, 2, 120, 8, 16, 16, 0, False),
    (2, 8, 2, 333, 32, 32, 40, 4, True),
    (2, 4, 4, 97, 8, 8, 30, 2, True),  # G = 1
    (3, 6, 2, 50, 8, 8, 64, 1, True),  # C >= L: nothing evicted
    (2, 8, 1, 2999, 64, 64, 256, 8, True),
    (2, 4, 2, 40, 8, 8, 0, 1, True),  # C = 0: window only
]
EVICT_OPTS = [
    # alpha, pooling, kernel, aggregate, gqa_reduce, rounding, adaptive
    (0.2, "max", 7, "mean", "mean", "exact", True),
    (0.0, "avg", 5, "mean", "max", "exact", True),
    (1.0, "max", 7, "max", "mean", "exact", True),
    (0.5, "none", 1, "max", "max", "official", True),
    (0.2, "max", 7, "mean", "mean", "official", True),
    (0.2, "max", 3, "mean", "mean", "exact", False),
]


def check_flat_invariants(flat, B, Hk, N, W, C, reserve, ks, exact):
    kf, vf, st, ln = (cpu(t) for t in flat)
    S = B * Hk
    assert st.dtype == torch.int32 and ln.dtype == torch.int32 and st.shape == (S,)
    rows = kf.shape[0]
    cap = torch.cat([st[1:], torch.tensor([rows], dtype=torch.int32)]) - st
    assert (ln <= cap).all()
    if exact:
        assert rows == B * Hk * (C + W + reserve)
        for b in range(B):
            Nb = N - (0 if ks is None else int(ks[b]))
            Lb = max(0, N - W - (0 if ks is None else int(ks[b])))
            bud = cap[b * Hk : (b + 1) * Hk] - W - reserve
            assert int(bud.sum()) == Hk * C  # sum_h C_h == Hk * C in every row
            lens = ln[b * Hk : (b + 1) * Hk]
            if Lb > C:
                assert torch.equal(lens, (bud + min(W, Nb)).int())
            else:
                assert (lens == Nb).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", EVICT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("opts", EVICT_OPTS, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("seed", range(2))
def test_evict_matches_reference_pipeline(device, shape, opts, seed):
    B, Hq, Hk, N, W, D, C, reserve, padded = shape
    alpha, pooling, kernel, aggregate, gqa_reduce, rounding, adaptive = opts
    sd = seed_of("evict", shape, opts, seed)
    dtype = [torch.float32, torch.bfloat16, torch.float16][sd % 3]
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, sd, dtype=dtype)
    ks = make_key_start(B, N, sd, max_pad=N // 2) if padded else None
    kw = dict(floor_alpha=alpha, pooling=pooling, kernel_size=kernel, gqa_reduce=gqa_reduce,
              adaptive=adaptive, rounding=rounding, reserve=reserve, aggregate=aggregate)
    got = ops.evict(*to(device, q, k, v), C, key_start=to(device, ks), **kw)
    # the op's own scores (same device): exact equality of the whole pipeline
    scores = cpu(ops.score(*to(device, q, k), kernel_size=kernel, pooling=pooling,
                           aggregate=aggregate, gqa_reduce=gqa_reduce, key_start=to(device, ks)))
    exp = ref.evict_ref(q, k, v, C, key_start=ks, scores=scores, **kw)
    for name, g_, e_ in zip(("k_flat", "v_flat", "seg_start", "seg_len"), got, exp):
        assert_equal(g_, e_, name)
    check_flat_invariants(got, B, Hk, N, W, C, reserve, ks, rounding == "exact")
    # the op's scores agree with the fp64 reference scores
    score_tol_check(scores, ref.score_ref(q, k, kernel, pooling, aggregate, gqa_reduce, ks))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pooling,kernel", [("max", 7), ("none", 1)])
def test_evict_tie_heavy_full_reference(device, seed, pooling, kernel):
    """Keys drawn from a tiny codebook: scores take few values, identical in fp32 and fp64,
    so the full fp64 reference (its own scores) must agree exactly, ties included."""
    B, Hq, Hk, N, W, D, C = 2, 8, 2, 150, 8, 16, 20
    sd = seed_of("evict_tie", seed, pooling)
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, sd, codebook=3)
    ks = torch.tensor([0, 31], dtype=torch.int32)
    for alpha in (0.0, 0.2):
        exp = ref.evict_ref(q, k, v, C, alpha, pooling, kernel, reserve=2, key_start=ks)
        got = ops.evict(*to(device, q, k, v), C, floor_alpha=alpha, pooling=pooling,
                        kernel_size=kernel, reserve=2, key_start=to(device, ks))
        for name, g_, e_ in zip(("k_flat", "v_flat", "seg_start", "seg_len"), got, exp):
            assert_equal(g_, e_, name)


@pytest.mark.parametrize("device", DEVICES)
def test_evict_not_evicted_row_keeps_everything(device):
    B, Hq, Hk, W, D, C = 2, 4, 2, 8, 8, 12
    N = C + W  # budget == length: row 0 fills its capacity exactly
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, 77)
    ks = torch.tensor([0, 5], dtype=torch.int32)
    kf, vf, st, ln = cpu(*ops.evict(*to(device, q, k, v), C, key_start=to(device, ks)))
    assert ln.tolist() == [N, N, N - 5, N - 5]
    assert st.tolist() == [0, N, 2 * N, 3 * N]
    for s in range(4):
        b, h = divmod(s, Hk)
        assert torch.equal(kf[int(st[s]) : int(st[s]) + int(ln[s])], k[b, h, int(ks[b]) :])
        assert torch.equal(vf[int(st[s]) : int(st[s]) + int(ln[s])], v[b, h, int(ks[b]) :])


# ----------------------------------------------------------------------------------------------
# decode_attention


POISON = 50.0


def random_flat_cache(S, D, dtype, seed, caps=None, lens=None):
    """Hand-built flat cache; rows past seg_len hold a large finite poison value."""
    g = torch.Generator().manual_seed(seed)
    if caps is None:
        caps = torch.randint(0, 40, (S,), generator=g)
    caps = torch.as_tensor(caps).long()
    if lens is None:
        lens = (torch.rand(S, generator=g) * (caps + 1).double()).long().clamp(max=caps)
    lens = torch.as_tensor(lens).long()
    st = torch.zeros(S, dtype=torch.long)
    st[1:] = torch.cumsum(caps, 0)[:-1]
    rows = int(caps.sum()) + 3
    kf = torch.full((rows, D), POISON)
    vf = torch.full((rows, D), -POISON)
    for s in range(S):
        a = int(st[s])
        kf[a : a + int(lens[s])] = torch.randn(int(lens[s]), D, generator=g)
        vf[a : a + int(lens[s])] = torch.randn(int(lens[s]), D, generator=g)
    return kf.to(dtype), vf.to(dtype), st.int(), lens.int()


DECODE_SHAPES = [
    # B, Hq, Hk, D
    (1, 8, 2, 64),
    (3, 4, 4, 16),  # G = 1
    (2, 8, 1, 128),
    (2, 6, 3, 32),
]


def check_decode(got_out, got_lse, exp_out, exp_lse, dtype):
    got_out, got_lse = cpu(got_out, got_lse)
    assert got_out.dtype == dtype and got_lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(got_lse), torch.isneginf(exp_lse))
    empty = torch.isneginf(exp_lse)
    assert (got_out[empty] == 0).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(got_out, exp_out) < tol
    fin = ~empty
    torch.testing.assert_close(got_lse[fin], exp_lse[fin], rtol=1e-5, atol=1e-4 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("T", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(2))
def test_decode_attention(device, shape, T, dtype, seed):
    B, Hq, Hk, D = shape
    S = B * Hk
    sd = seed_of("decode", shape, T, dtype, seed)
    g = torch.Generator().manual_seed(sd)
    caps = torch.randint(T, 60, (S,), generator=g)
    lens = torch.randint(0, 60, (S,), generator=g).clamp(max=caps)
    lens[0] = 0  # empty segment
    lens[-1] = caps[-1]  # full segment (len == capacity)
    if S > 2:
        lens[1] = 1  # shorter than T when T > 1
    kf, vf, st, ln = random_flat_cache(S, D, dtype, sd, caps, lens)
    q = randn((B, Hq, T, D), sd + 1, dtype)
    exp_out, exp_lse = ref.decode_attention_ref(q, kf, vf, st, ln, return_lse=True)
    args = to(device, q, kf, vf, st, ln)
    out = ops.decode_attention(*args)
    out2, lse = ops.decode_attention(*args, return_lse=True)
    out3, lse3 = torch.ops.adakv.decode_attention_lse(*args)
    check_decode(out, lse, exp_out, exp_lse, dtype)
    assert_equal(out2, cpu(out), "decode_attention(return_lse=True) vs decode_attention")
    assert_equal(out3, cpu(out2), "decode_attention_lse op vs wrapper")
    assert_equal(lse3, cpu(lse), "lse")
    # inputs untouched
    assert_equal(cpu(args[1]), kf, "k_flat")
    assert_equal(cpu(args[4]), ln, "seg_len")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_long_segments_and_scale(device, dtype):
    B, Hq, Hk, D, T = 2, 8, 2, 64, 2
    S = B * Hk
    sd = seed_of("decode_long", dtype)
    caps = torch.tensor([3000, 1, 2100, 777])
    lens = torch.tensor([2999, 1, 2100, 500])
    kf, vf, st, ln = random_flat_cache(S, D, dtype, sd, caps, lens)
    q = randn((B, Hq, T, D), sd + 1, dtype, scale=3.0)
    for scale in (None, 0.5):
        exp_out, exp_lse = ref.decode_attention_ref(q, kf, vf, st, ln, scale=scale, return_lse=True)
        out, lse = ops.decode_attention(*to(device, q, kf, vf, st, ln), scale=scale, return_lse=True)
        check_decode(out, lse, exp_out, exp_lse, dtype)


# ----------------------------------------------------------------------------------------------
# append_


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3])
def test_append_matches_reference(device, dtype, T):
    B, Hk, D = 2, 3, 16
    S = B * Hk
    sd = seed_of("append", dtype, T)
    g = torch.Generator().manual_seed(sd)
    caps = torch.randint(2 * T, 30, (S,), generator=g)
    lens = (caps - 2 * T - torch.randint(0, 3, (S,), generator=g)).clamp(min=0)
    lens[0] = caps[0] - 2 * T  # ends exactly full after two appends
    kf, vf, st, ln = random_flat_cache(S, D, dtype, sd, caps, lens)
    dk, dv, dst, dln = to(device, kf.clone(), vf.clone(), st.clone(), ln.clone())
    for step in range(2):
        kn = randn((B, Hk, T, D), sd + 10 + step, dtype)
        vn = randn((B, Hk, T, D), sd + 20 + step, dtype)
        kf, vf, ln = ref.append_ref(kf, vf, st, ln, kn, vn)
        ret = ops.append_(dk, dv, dst, dln, *to(device, kn, vn))
        assert ret is None
        assert_equal(dk, kf, "k_flat")
        assert_equal(dv, vf, "v_flat")
        assert_equal(dln, ln, "seg_len")
        assert_equal(dst, st, "seg_start")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 4])
def test_append_overflow_raises_and_changes_nothing_cpu(dtype, T):
    B, Hk, D = 2, 2, 8
    caps = torch.tensor([10, 10, 10, 10])
    lens = torch.tensor([2, 3, 10 - T + 1, 0])  # segment 2 overflows by one
    kf, vf, st, ln = random_flat_cache(4, D, dtype, 3, caps, lens)
    before = [t.clone() for t in (kf, vf, st, ln)]
    kn = randn((B, Hk, T, D), 4, dtype)
    vn = randn((B, Hk, T, D), 5, dtype)
    with pytest.raises(RuntimeError, match=r"(?i)overflow|capacity|room|full"):
        ops.append_(kf, vf, st, ln, kn, vn)
    for a, b, name in zip((kf, vf, st, ln), before, ("k_flat", "v_flat", "seg_start", "seg_len")):
        assert_equal(a, b, name)
    with pytest.raises(RuntimeError):
        ref.append_ref(*before, kn, vn)


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 8, 2, 200, 16, 32, 24), (1, 4, 4, 1500, 32, 64, 300),
                                   (3, 6, 3, 64, 8, 16, 100)], ids=lambda s: "x".join(map(str, s)))
def test_append_then_decode_equals_recompute(device, dtype, shape):
    """evict-style cache (via compact), several appends, decode == attention over the kept
    original tokens plus the appended ones (independent of the flat layout)."""
    B, Hq, Hk, N, W, D, C = shape
    steps = [1, 1, 3, 2]
    R = sum(steps)
    sd = seed_of("append_decode", dtype, shape)
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, sd, dtype=dtype)
    ks = make_key_start(B, N, sd, max_pad=N // 4)
    scores = ops.score(q, k, key_start=ks)
    bud = ref.allocate_ref(scores, C, 0.2, key_start=ks)
    idx, cnt = ref.select_ref(scores, bud, ks)
    pos = ref.kept_positions_ref(idx, cnt, N, W, ks)
    rows = B * Hk * (C + W + R)
    kf, vf, st, ln = ops.compact(*to(device, k, v, idx, cnt, bud), W, reserve=R, rows=rows,
                                 key_start=to(device, ks))
    keys = [k[s // Hk, s % Hk, pos[s]] for s in range(B * Hk)]
    vals = [v[s // Hk, s % Hk, pos[s]] for s in range(B * Hk)]
    for i, T in enumerate(steps):
        kn = randn((B, Hk, T, D), sd + 100 + i, dtype)
        vn = randn((B, Hk, T, D), sd + 200 + i, dtype)
        qn = randn((B, Hq, T, D), sd + 300 + i, dtype, scale=2.0)
        ops.append_(kf, vf, st, ln, *to(device, kn, vn))
        keys = [torch.cat([keys[s], kn[s // Hk, s % Hk]]) for s in range(B * Hk)]
        vals = [torch.cat([vals[s], vn[s // Hk, s % Hk]]) for s in range(B * Hk)]
        out, lse = ops.decode_attention(to(device, qn), kf, vf, st, ln, return_lse=True)
        exp_out, exp_lse = ref.attention_over_segments_ref(qn, keys, vals)
        check_decode(out, lse, exp_out, exp_lse, dtype)
    assert cpu(ln).tolist() == [len(x) for x in keys]
    if device == "cpu":  # one token more than the smallest free room: raises, writes nothing
        cap = torch.cat([st[1:], torch.tensor([rows], dtype=torch.int32)]) - st
        T = int((cap - ln).min()) + 1
        full = [t.clone() for t in (kf, vf, ln)]
        with pytest.raises(RuntimeError, match=r"(?i)overflow|capacity"):
            ops.append_(kf, vf, st, ln, k[:, :, :T].contiguous(), v[:, :, :T].contiguous())
        for a, b in zip((kf, vf, ln), full):
            assert_equal(a, b)


@conftest.requires_cuda
@pytest.mark.parametrize("T", [1, 3])
def test_append_overflow_cuda_flags(T, monkeypatch):
    """CUDA: an overflowing segment writes nothing and keeps its length; overflow[s] = 1
    (sticky); the other segments are appended normally. ADAKV_DEBUG=1 makes the wrapper raise."""
    B, Hk, D = 2, 2, 64
    caps = torch.tensor([10, 10, 10, 10])
    # random_flat_cache adds 3 spare rows, which belong to the last segment (capacity 13).
    lens = torch.tensor([2, 10 - T + 1, 0, 13])  # segments 1 and 3 overflow
    kf, vf, st, ln = random_flat_cache(4, D, torch.float32, 9, caps, lens)
    kn = randn((B, Hk, T, D), 4)
    vn = randn((B, Hk, T, D), 5)
    ek, ev, el = kf.clone(), vf.clone(), ln.clone()
    for s in (0, 2):
        b, h = divmod(s, Hk)
        p = int(st[s]) + int(ln[s])
        ek[p : p + T], ev[p : p + T] = kn[b, h], vn[b, h]
        el[s] += T
    dk, dv, dst, dln = to("cuda", kf, vf, st, ln)
    flags = torch.zeros(4, dtype=torch.int32, device="cuda")
    torch.ops.adakv.append_(dk, dv, dst, dln, *to("cuda", kn, vn), flags)
    assert cpu(flags).tolist() == [0, 1, 0, 1]
    assert_equal(dk, ek, "k_flat")
    assert_equal(dv, ev, "v_flat")
    assert_equal(dln, el, "seg_len")
    monkeypatch.setenv("ADAKV_DEBUG", "1")
    dk, dv, dst, dln = to("cuda", kf, vf, st, ln)
    with pytest.raises(RuntimeError, match=r"(?i)overflow|capacity"):
        ops.append_(dk, dv, dst, dln, *to("cuda", kn, vn))
