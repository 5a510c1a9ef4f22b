"""CUDA kernels of allocate / select / compact / append_ versus the CPU kernels.

The CPU ops (``torch.ops.adakv.*`` on CPU tensors) are the reference: every integer output must
be identical, and compact / append_ are byte copies, so their float outputs must be identical
too. Covered: odd lengths, length-0 segments, budget 0 / == length / > length / negative,
batch > 1 with left padding (including key_start > L and == N), tie-heavy scores (constant
rows, max-pool plateaus, +-0.0, infinities), both select paths (shared-memory and multi-CTA,
forced with ADAKV_SELECT_SMEM_MAX_L), unaligned / non-multiple-of-4 rows, every vector width of
the copies, opcheck, no host sync, CUDA-graph capture.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from conftest import HAVE_CUDA, assert_equal, gen, randn, requires_ops

pytestmark = [requires_ops, pytest.mark.skipif(not HAVE_CUDA, reason="CUDA not available")]

A = torch.ops.adakv if hasattr(torch.ops, "adakv") else None
DEV = "cuda"


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) % 100_000


def cuda(t):
    return None if t is None else t.to(DEV)


def poison_allocator(nbytes=64 << 20):
    """Leave NaN garbage in the caching allocator so that unwritten outputs show up."""
    t = torch.full((nbytes // 4,), float("nan"), device=DEV)
    del t


# ----------------------------------------------------------------------------------------------
# inputs


def make_key_start(B, L, N, seed, mode):
    """[B] int32 left padding. mode: None (no tensor), "pad" (random, row 0 unpadded), "edge"
    (also a row starting inside the window (> L) and a row with no token at all (== N))."""
    if mode is None:
        return None
    g = gen(seed)
    ks = torch.randint(0, max(L // 2, 0) + 1, (B,), generator=g, dtype=torch.int32)
    ks[0] = 0
    if B > 1:
        ks[1] = max(1, L // 3)
    if mode == "edge":
        if B > 2:
            ks[2] = min(L + 1, N)
        if B > 3:
            ks[3] = N
    return ks


def make_scores(kind, B, Hk, L, seed, ks, pad_fill=float("-inf")):
    g = gen(seed)
    if kind == "rand":
        s = torch.rand((B, Hk, L), generator=g).pow(3)
    elif kind == "tie":  # few levels, max-pool plateaus
        s = torch.randint(1, 4, (B, Hk, L), generator=g).float() / 3
        if L > 0:
            s = torch.nn.functional.max_pool1d(s.view(B * Hk, 1, L), 7, 1, 3).view(B, Hk, L)
    elif kind == "const":  # one plateau: every key equal
        s = torch.full((B, Hk, L), 0.125)
    elif kind == "mixed":  # signs, +-0.0, +-inf, denormals, duplicates across heads
        vals = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 1e-40, -1e-40,
                             3.5, 3.5, 2.0 ** -20, -(2.0 ** 100)])
        s = vals[torch.randint(0, len(vals), (B, Hk, L), generator=g)]
        s = s + (torch.rand((B, Hk, L), generator=g) < 0.3) * torch.randn((B, Hk, L), generator=g)
    else:
        raise ValueError(kind)
    s = s.float().contiguous()
    if ks is not None:
        for b, k in enumerate(ks.tolist()):
            s[b, :, : min(k, L)] = pad_fill  # padding columns are never selected
    return s


def unaligned(t):
    """A contiguous copy of t whose data pointer is 4 bytes past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


# ----------------------------------------------------------------------------------------------
# allocate

ALLOC_SHAPES = [
    # B, Hk, L, C, key_start mode
    (1, 1, 1, 0, None),
    (1, 2, 5, 1, None),
    (2, 4, 100, 7, "pad"),
    (4, 8, 1001, 64, "edge"),
    (1, 8, 4000, 1024, None),
    (3, 3, 1023, 300, "pad"),
    (4, 2, 50, 60, "pad"),  # L < C: nothing evicted
    (2, 4, 9001, 700, "edge"),  # several CTAs per head
    (1, 32, 2049, 100, None),  # many heads
    (1, 8, 32768, 1024, None),
    (2, 256, 300, 20, "pad"),  # the most heads of the one-launch (cluster) path
    (1, 300, 64, 3, None),  # more: multi-launch passes on every device
    (64, 8, 130, 16, "edge"),  # many batch rows (one cluster each)
]
ALLOC_IDS = ["x".join(map(str, s)) for s in ALLOC_SHAPES]


# "cluster": the one-launch allocate forced at every size (sm_90; by default it takes rows of
# Hk * L <= 2^17; elsewhere the same as "multi"); "multi": ADAKV_ALLOCATE_CLUSTER=0, the
# multi-launch radix passes.
ALLOC_PATHS = ["cluster", "multi"]


def _alloc_path(monkeypatch, path):
    monkeypatch.setenv("ADAKV_ALLOCATE_CLUSTER", "1" if path == "cluster" else "0")


@pytest.mark.parametrize("path", ALLOC_PATHS)
@pytest.mark.parametrize("shape", ALLOC_SHAPES, ids=ALLOC_IDS)
@pytest.mark.parametrize("kind", ["rand", "tie", "const", "mixed"])
@pytest.mark.parametrize("rounding", ["exact", "official"])
def test_allocate(monkeypatch, shape, kind, rounding, path):
    _alloc_path(monkeypatch, path)
    B, Hk, L, C, mode = shape
    sd = seed_of("allocate", shape, kind, rounding)
    ks = make_key_start(B, L, L + 8, sd, mode)
    s = make_scores(kind, B, Hk, L, sd, ks, pad_fill=float("inf") if sd % 2 else float("-inf"))
    for alpha in (0.0, 0.2, 0.5, 1.0, 0.37):
        exp = A.allocate(s, C, alpha, True, rounding, ks)
        got = A.allocate(cuda(s), C, alpha, True, rounding, cuda(ks))
        assert_equal(got, exp, f"allocate alpha={alpha}")
    assert_equal(A.allocate(cuda(s), C, 0.2, False, rounding, cuda(ks)),
                 A.allocate(s, C, 0.2, False, rounding, ks), "allocate adaptive=False")


@pytest.mark.parametrize("path", ALLOC_PATHS)
def test_allocate_unaligned_and_large(monkeypatch, path):
    _alloc_path(monkeypatch, path)
    B, Hk, L, C = 1, 8, 131070, 1024  # L % 4 != 0 and an unaligned row: scalar loads
    s = make_scores("tie", B, Hk, L, 11, None)
    exp = A.allocate(s, C, 0.2, True, "exact", None)
    assert_equal(A.allocate(unaligned(cuda(s)), C, 0.2, True, "exact", None), exp, "unaligned")
    assert int(exp.sum()) == Hk * C
    s = make_scores("rand", B, Hk, 131072, 12, None)
    assert_equal(A.allocate(cuda(s), C, 0.2, True, "exact", None),
                 A.allocate(s, C, 0.2, True, "exact", None), "128K")


@pytest.mark.sanitize
@pytest.mark.parametrize("path", ALLOC_PATHS)
def test_allocate_small_sanitize(monkeypatch, path):
    _alloc_path(monkeypatch, path)
    ks = torch.tensor([0, 3, 40], dtype=torch.int32)
    s = make_scores("tie", 3, 4, 37, 5, ks)
    for rounding in ("exact", "official"):
        assert_equal(A.allocate(cuda(s), 5, 0.2, True, rounding, cuda(ks)),
                     A.allocate(s, 5, 0.2, True, rounding, ks), rounding)


# ----------------------------------------------------------------------------------------------
# select

SELECT_SHAPES = [
    # B, Hk, L, C, key_start mode
    (1, 1, 1, 1, None),
    (1, 2, 7, 3, None),
    (2, 4, 100, 7, "pad"),
    (4, 8, 1001, 64, "edge"),
    (3, 3, 1023, 300, "pad"),
    (2, 4, 9001, 700, "edge"),
    (1, 8, 4097, 1024, None),
    (64, 8, 300, 16, "edge"),  # many segments (one cluster each)
]
SELECT_IDS = ["x".join(map(str, s)) for s in SELECT_SHAPES]
# "cluster": the one-launch select (sm_90; forced for every length, by default it takes
# L >= 16384; elsewhere the paths below); "smem": one CTA per segment with the row in shared
# memory; "multi": the multi-launch radix passes.
SELECT_PATHS = ["cluster", "smem", "multi"]


def _select_path(monkeypatch, path):
    monkeypatch.setenv("ADAKV_SELECT_CLUSTER", "1" if path == "cluster" else "0")
    if path == "multi":
        monkeypatch.setenv("ADAKV_SELECT_SMEM_MAX_L", "0")
    else:
        monkeypatch.delenv("ADAKV_SELECT_SMEM_MAX_L", raising=False)


def budget_variants(B, Hk, L, C, s, ks, g):
    yield "ada", A.allocate(s, C, 0.2, True, "exact", ks)
    yield "official", A.allocate(s, C, 0.5, True, "official", ks)
    r = torch.randint(0, L + 3, (B, Hk), generator=g, dtype=torch.int32)
    r.view(-1)[0] = 0
    if r.numel() > 1:
        r.view(-1)[1] = L  # >= L_b: the whole valid prefix
    if r.numel() > 2:
        r.view(-1)[2] = 1
    yield "random", r


def check_select(s, bud, ks, what):
    exp_idx, exp_cnt = A.select(s, bud.clamp(min=0), ks)
    got_idx, got_cnt = A.select(cuda(s), cuda(bud), cuda(ks))
    assert_equal(got_cnt, exp_cnt, f"{what}: kept_count")
    assert_equal(got_idx, exp_idx, f"{what}: kept_idx")


@pytest.mark.parametrize("path", SELECT_PATHS)
@pytest.mark.parametrize("shape", SELECT_SHAPES, ids=SELECT_IDS)
@pytest.mark.parametrize("kind", ["rand", "tie", "const", "mixed"])
def test_select(shape, kind, path, monkeypatch):
    _select_path(monkeypatch, path)
    B, Hk, L, C, mode = shape
    sd = seed_of("select", shape, kind)
    ks = make_key_start(B, L, L + 8, sd, mode)
    s = make_scores(kind, B, Hk, L, sd, ks, pad_fill=float("inf") if sd % 2 else float("-inf"))
    g = gen(sd + 1)
    poison_allocator()
    for name, bud in budget_variants(B, Hk, L, C, s, ks, g):
        check_select(s, bud, ks, f"{path}/{name}")


@pytest.mark.parametrize("path", SELECT_PATHS)
def test_select_negative_budgets_and_unaligned(path, monkeypatch):
    _select_path(monkeypatch, path)
    B, Hk, L = 2, 3, 1030  # L % 4 != 0
    ks = torch.tensor([0, 5], dtype=torch.int32)
    s = make_scores("tie", B, Hk, L, 3, ks)
    bud = torch.tensor([[-5, 0, 17], [1030, 1025, 1024]], dtype=torch.int32)
    check_select(s, bud, ks, "negative budgets")  # CUDA treats negative budgets as 0
    # 16-byte aligned data, L % 4 == 0, then the same scores at an unaligned address
    s4 = make_scores("rand", B, Hk, 1024, 4, ks)
    bud4 = A.allocate(s4, 100, 0.2, True, "exact", ks)
    exp = A.select(s4, bud4, ks)
    got = A.select(unaligned(cuda(s4)), cuda(bud4), cuda(ks))
    assert_equal(got[0], exp[0], "unaligned kept_idx")
    assert_equal(got[1], exp[1], "unaligned kept_count")


@pytest.mark.parametrize("L,kind", [(2048, "tie"), (8160, "rand"), (32768, "rand"),
                                    (40000, "tie"), (131072, "rand")])
def test_select_long(L, kind):
    """Default path choice: sm_90 runs the cluster kernel for L >= 16384 (the shared-memory
    kernel below); elsewhere 32K runs the shared-memory path, longer rows the multi-CTA one."""
    B, Hk, C = 1, 8, 1024
    s = make_scores(kind, B, Hk, L, L, None)
    bud = A.allocate(s, C, 0.2, True, "exact", None)
    check_select(s, bud, None, f"L={L}")


def test_select_empty_shapes():
    s = torch.rand(2, 3, 0)
    bud = torch.full((2, 3), 4, dtype=torch.int32)
    idx, cnt = A.select(cuda(s), cuda(bud), None)
    assert idx.shape == (2, 3, 0) and cnt.tolist() == [[0] * 3] * 2
    idx, cnt = A.select(cuda(torch.rand(0, 3, 5)), cuda(torch.zeros(0, 3, dtype=torch.int32)))
    assert idx.shape == (0, 3, 5) and cnt.shape == (0, 3)


@pytest.mark.sanitize
@pytest.mark.parametrize("path", SELECT_PATHS)
def test_select_small_sanitize(path, monkeypatch):
    _select_path(monkeypatch, path)
    ks = torch.tensor([0, 3, 40], dtype=torch.int32)
    s = make_scores("tie", 3, 4, 37, 6, ks)
    bud = torch.tensor([[0, 5, 37, 9], [2, 34, 100, 1], [3, 3, 3, 3]], dtype=torch.int32)
    check_select(s, bud, ks, path)


# ----------------------------------------------------------------------------------------------
# compact


def pipeline_cpu(B, Hk, N, W, C, kind, seed, ks):
    L = N - W
    s = make_scores(kind, B, Hk, L, seed, None if ks is None else ks.clamp(max=L))
    bud = A.allocate(s, C, 0.2, True, "exact", ks)
    idx, cnt = A.select(s, bud, ks)
    return bud, idx, cnt


COMPACT_CASES = [
    # B, Hk, N, W, D, C, dtype, key_start mode
    (1, 2, 40, 8, 128, 6, torch.bfloat16, None),  # 16-byte vectors
    (2, 4, 300, 16, 64, 20, torch.float32, "pad"),
    (4, 2, 90, 8, 8, 30, torch.float16, "edge"),  # 16-byte rows; a row in the window, one empty
    (3, 3, 77, 5, 3, 10, torch.float16, "pad"),  # 6-byte rows: 2-byte copies
    (2, 2, 50, 4, 2, 9, torch.float32, "pad"),  # 8-byte rows
    (2, 2, 50, 4, 1, 9, torch.float32, "edge"),  # 4-byte rows
    (1, 8, 2080, 32, 128, 1024, torch.bfloat16, None),
    (2, 3, 64, 64, 16, 4, torch.float32, "pad"),  # W == N: empty prefix
]
COMPACT_IDS = ["x".join(map(str, c[:6])) + f"-{str(c[6])[6:]}-{c[7]}" for c in COMPACT_CASES]


@pytest.mark.parametrize("case", COMPACT_CASES, ids=COMPACT_IDS)
@pytest.mark.parametrize("reserve", [0, 5])
@pytest.mark.parametrize("rows_mode", ["exact", "extra", "none"])
def test_compact(case, reserve, rows_mode):
    B, Hk, N, W, D, C, dtype, mode = case
    sd = seed_of("compact", case, reserve, rows_mode)
    ks = make_key_start(B, N - W, N, sd, mode)
    bud, idx, cnt = pipeline_cpu(B, Hk, N, W, C, "tie", sd, ks)
    key = randn((B, Hk, N, D), sd + 1, dtype)
    value = randn((B, Hk, N, D), sd + 2, dtype)
    total = int((bud + W + reserve).sum())
    rows = {"exact": total, "extra": total + 7, "none": None}[rows_mode]
    exp = A.compact(key, value, idx, cnt, bud, W, reserve, rows, ks)
    poison_allocator()
    got = A.compact(cuda(key), cuda(value), cuda(idx), cuda(cnt), cuda(bud), W, reserve, rows,
                    cuda(ks))
    for g, e, name in zip(got, exp, ["k_flat", "v_flat", "seg_start", "seg_len"]):
        assert_equal(g, e, name)


def test_compact_unaligned_vectors():
    """Row size a multiple of 16 bytes but key at an odd 4-byte offset: narrower copies."""
    B, Hk, N, W, D, C = 2, 2, 40, 4, 8, 5
    ks = torch.tensor([0, 3], dtype=torch.int32)
    bud, idx, cnt = pipeline_cpu(B, Hk, N, W, C, "rand", 9, ks)
    key = randn((B, Hk, N, D), 1)
    value = randn((B, Hk, N, D), 2)
    exp = A.compact(key, value, idx, cnt, bud, W, 2, None, ks)
    got = A.compact(unaligned(cuda(key)), cuda(value), cuda(idx), cuda(cnt), cuda(bud), W, 2,
                    None, cuda(ks))
    for g, e, name in zip(got, exp, ["k_flat", "v_flat", "seg_start", "seg_len"]):
        assert_equal(g, e, name)


def test_compact_clamps_bad_device_data():
    """Inconsistent inputs (the CPU kernel raises) must not write or read out of bounds."""
    B, Hk, N, W, D = 2, 2, 30, 4, 16
    L = N - W
    key = cuda(randn((B, Hk, N, D), 3))
    value = cuda(randn((B, Hk, N, D), 4))
    idx = cuda(torch.randint(-50, 50, (B, Hk, L), dtype=torch.int32))
    cnt = cuda(torch.tensor([[100, -3], [5, 26]], dtype=torch.int32))
    bud = cuda(torch.tensor([[4, -2], [10, 40]], dtype=torch.int32))
    ks = cuda(torch.tensor([-4, 99], dtype=torch.int32))
    kf, vf, st, ln = A.compact(key, value, idx, cnt, bud, W, 1, 9, ks)  # rows < sum(cap)
    torch.cuda.synchronize()
    assert kf.shape == (9, D)
    assert (st >= 0).all() and (st <= 9).all() and (ln >= 0).all()
    caps = torch.diff(torch.cat([st.cpu(), torch.tensor([9], dtype=torch.int32)]))
    assert (ln.cpu() <= caps).all()


@pytest.mark.sanitize
def test_compact_small_sanitize():
    B, Hk, N, W, D, C = 3, 2, 21, 4, 8, 3
    ks = torch.tensor([0, 2, 19], dtype=torch.int32)
    bud, idx, cnt = pipeline_cpu(B, Hk, N, W, C, "tie", 2, ks)
    key = randn((B, Hk, N, D), 5, torch.bfloat16)
    value = randn((B, Hk, N, D), 6, torch.bfloat16)
    for rows in (None, int((bud + W + 1).sum()) + 3):
        exp = A.compact(key, value, idx, cnt, bud, W, 1, rows, ks)
        got = A.compact(cuda(key), cuda(value), cuda(idx), cuda(cnt), cuda(bud), W, 1, rows,
                        cuda(ks))
        for g, e, name in zip(got, exp, ["k_flat", "v_flat", "seg_start", "seg_len"]):
            assert_equal(g, e, name)


# ----------------------------------------------------------------------------------------------
# append_


def flat_cache(caps, lens, D, dtype, seed, extra_rows=0):
    caps = torch.tensor(caps)
    S = len(caps)
    st = torch.zeros(S, dtype=torch.int32)
    st[1:] = torch.cumsum(caps, 0)[:-1].int()
    rows = int(caps.sum()) + extra_rows
    kf = randn((rows, D), seed, dtype)
    vf = randn((rows, D), seed + 1, dtype)
    return kf, vf, st, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hk,D,T", [(1, 8, 128, 1), (2, 3, 64, 3), (2, 2, 3, 2), (1, 2, 256, 70)])
def test_append(dtype, B, Hk, D, T):
    S = B * Hk
    sd = seed_of("append", dtype, B, Hk, D, T)
    caps = [T + 5 + 3 * s for s in range(S)]
    lens = [(7 * s) % 6 for s in range(S)]
    lens[0] = caps[0] - T  # fills its segment exactly
    kf, vf, st, ln = flat_cache(caps, lens, D, dtype, sd, extra_rows=2)
    kn = randn((B, Hk, T, D), sd + 2, dtype)
    vn = randn((B, Hk, T, D), sd + 3, dtype)
    g = [cuda(t) for t in (kf, vf, st, ln)]
    A.append_(kf, vf, st, ln, kn, vn)
    ov = torch.zeros(S, dtype=torch.int32, device=DEV)
    A.append_(*g, cuda(kn), cuda(vn), ov)
    assert_equal(g[0], kf, "k_flat")
    assert_equal(g[1], vf, "v_flat")
    assert_equal(g[2], st, "seg_start")
    assert_equal(g[3], ln, "seg_len")
    assert int(ov.sum()) == 0


@pytest.mark.sanitize
@pytest.mark.parametrize("T", [1, 2])
def test_append_overflow_writes_nothing(T):
    D = 16
    caps, lens = [10, 10, 10, 4], [10, 5, 9, 0]
    kf, vf, st, ln = flat_cache(caps, lens, D, torch.bfloat16, 21)
    kn = randn((2, 2, T, D), 22, torch.bfloat16)
    vn = randn((2, 2, T, D), 23, torch.bfloat16)
    g = [cuda(t) for t in (kf, vf, st, ln)]
    ov = torch.zeros(4, dtype=torch.int32, device=DEV)
    ov[3] = 1  # sticky: never cleared
    A.append_(*g, cuda(kn), cuda(vn), ov)
    exp_k, exp_v, exp_len = kf.clone(), vf.clone(), ln.clone()
    exp_ov = [1, 0, 0, 1]
    for s in range(4):
        if lens[s] + T > caps[s]:
            exp_ov[s] = 1
            continue
        r = int(st[s]) + lens[s]
        exp_k[r:r + T] = kn.view(4, T, D)[s]
        exp_v[r:r + T] = vn.view(4, T, D)[s]
        exp_len[s] += T
    assert_equal(g[0], exp_k, "k_flat")
    assert_equal(g[1], exp_v, "v_flat")
    assert_equal(g[3], exp_len, "seg_len")
    assert ov.cpu().tolist() == exp_ov
    # without the overflow tensor: same behaviour, no flags
    g2 = [cuda(t) for t in (kf, vf, st, ln)]
    A.append_(*g2, cuda(kn), cuda(vn))
    assert_equal(g2[0], exp_k, "k_flat (no overflow tensor)")
    assert_equal(g2[3], exp_len, "seg_len (no overflow tensor)")


def test_append_cuda_graph():
    B, Hk, D, T, steps = 1, 8, 128, 1, 4
    S = B * Hk
    caps = [20] * S
    lens = [3 + s for s in range(S)]
    kf, vf, st, ln = flat_cache(caps, lens, D, torch.bfloat16, 31)
    g = [cuda(t) for t in (kf, vf, st, ln)]
    kn_static = torch.zeros((B, Hk, T, D), dtype=torch.bfloat16, device=DEV)
    vn_static = torch.zeros_like(kn_static)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    # capture does not run the kernel: seg_len is untouched until replay
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph, stream=side):
            A.append_(*g, kn_static, vn_static)
    torch.cuda.current_stream().wait_stream(side)
    assert_equal(g[3], ln, "seg_len after capture")
    for step in range(steps):
        kn = randn((B, Hk, T, D), 100 + step, torch.bfloat16)
        vn = randn((B, Hk, T, D), 200 + step, torch.bfloat16)
        kn_static.copy_(kn)
        vn_static.copy_(vn)
        graph.replay()
        A.append_(kf, vf, st, ln, kn, vn)
    torch.cuda.synchronize()
    assert_equal(g[0], kf, "k_flat")
    assert_equal(g[1], vf, "v_flat")
    assert_equal(g[3], ln, "seg_len")


# ----------------------------------------------------------------------------------------------
# graph capture of the eviction stages, host syncs, opcheck


def test_evict_stages_cuda_graph(monkeypatch):
    B, Hk, N, W, D, C, reserve = 2, 4, 600, 16, 64, 50, 3
    L = N - W
    ks = torch.tensor([0, 37], dtype=torch.int32)
    s = make_scores("tie", B, Hk, L, 41, ks)
    key = randn((B, Hk, N, D), 42, torch.bfloat16)
    value = randn((B, Hk, N, D), 43, torch.bfloat16)
    rows = B * Hk * (C + W + reserve)

    def run(s_, k_, v_, ks_):
        bud = A.allocate(s_, C, 0.2, True, "exact", ks_)
        idx, cnt = A.select(s_, bud, ks_)
        return (bud, idx, cnt) + tuple(A.compact(k_, v_, idx, cnt, bud, W, reserve, rows, ks_))

    exp = run(s, key, value, ks)
    for path in SELECT_PATHS:
        _select_path(monkeypatch, path)
        inp = [cuda(t) for t in (s, key, value, ks)]
        run(*inp)  # warm up (kernel attributes, allocator)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            with torch.cuda.graph(graph, stream=side):
                out = run(*inp)
        torch.cuda.current_stream().wait_stream(side)
        # new data into the static inputs, replay twice
        inp[0].fill_(0.5)
        graph.replay()
        inp[0].copy_(cuda(s))
        graph.replay()
        torch.cuda.synchronize()
        for g, e in zip(out, exp):
            assert_equal(g, e, f"graph replay ({path})")


@pytest.mark.parametrize("path", SELECT_PATHS)
def test_no_host_sync(path, monkeypatch):
    _select_path(monkeypatch, path)
    B, Hk, N, W, D, C = 2, 4, 300, 16, 64, 20
    L = N - W
    ks = cuda(torch.tensor([0, 21], dtype=torch.int32))
    s = cuda(make_scores("rand", B, Hk, L, 51, ks.cpu()))
    key = cuda(randn((B, Hk, N, D), 52, torch.float16))
    value = cuda(randn((B, Hk, N, D), 53, torch.float16))
    kn = cuda(randn((B, Hk, 1, D), 54, torch.float16))
    rows = B * Hk * (C + W + 2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for rounding in ("exact", "official"):
            bud = A.allocate(s, C, 0.2, True, rounding, ks)
        bud = A.allocate(s, C, 0.2, True, "exact", ks)
        A.allocate(s, C, 0.2, False, "exact", ks)
        idx, cnt = A.select(s, bud, ks)
        kf, vf, st, ln = A.compact(key, value, idx, cnt, bud, W, 2, rows, ks)
        ov = torch.zeros_like(ln)
        A.append_(kf, vf, st, ln, kn, kn, ov)
        A.append_(kf, vf, st, ln, kn, kn)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def opcheck(op, args, kwargs=None):
    torch.library.opcheck(op, args, kwargs or {}, raise_exception=True)


@pytest.mark.parametrize("padded", [False, True])
def test_opcheck_cuda(padded):
    B, Hk, N, W, D, C = 2, 2, 97, 16, 32, 20
    L = N - W
    ks = torch.tensor([0, 9], dtype=torch.int32) if padded else None
    s = make_scores("rand", B, Hk, L, 61, ks)
    sc, ksc = cuda(s), cuda(ks)
    for rounding in ("exact", "official"):
        opcheck(A.allocate.default, (sc, C), dict(floor_alpha=0.2, adaptive=True,
                                                  rounding=rounding, key_start=ksc))
    bud = A.allocate(s, C, 0.2, True, "exact", ks)
    opcheck(A.select.default, (sc, cuda(bud), ksc))
    idx, cnt = A.select(s, bud, ks)
    key = cuda(randn((B, Hk, N, D), 62, torch.bfloat16))
    value = cuda(randn((B, Hk, N, D), 63, torch.bfloat16))
    rows = int((bud + W + 2).sum()) + 3
    opcheck(A.compact.default, (key, value, cuda(idx), cuda(cnt), cuda(bud), W),
            dict(reserve=2, rows=rows, key_start=ksc))
    kf, vf, st, ln = A.compact(key, value, cuda(idx), cuda(cnt), cuda(bud), W, 2, rows, ksc)
    kn = cuda(randn((B, Hk, 2, D), 64, torch.bfloat16))
    opcheck(A.append_.default, (kf, vf, st, ln, kn, kn))
    opcheck(A.append_.default, (kf, vf, st, ln, kn, kn, torch.zeros_like(ln)))
