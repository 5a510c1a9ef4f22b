"""Paged per-head storage (SPEC 3.1, docs/semantics.md "Paged storage"): paged_compact_,
paged_append_ and paged_decode_attention(_lse) against adakv_ops.reference and against the
contiguous ops on the same data.

Page tables are shuffled, have holes (pages of the pool no segment owns), entries past a
segment's pages hold -1 or garbage, pages are reused after a (host-side) free. With a
segment_index the batch names rows of a larger (or smaller) table, -1 for padding: the result is
the op's on the gathered tables. CUDA cases run the same checks (skipped without a GPU).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import (DEVICES, assert_equal, cpu, gen, make_key_start, make_qkv, randn,
                      ref, rel_err, requires_ops, set_decode_schedule, to)

pytestmark = requires_ops

import conftest  # noqa: E402

ops = conftest.ops

PAGE_SIZES = [1, 3, 16, 64]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def n_pages(n: int, P: int) -> int:
    return (n + P - 1) // P


def make_pool(pages_per_seg, P, D, dtype, seed, extra_pages=5, width=None, garbage=True):
    """Random pool ``[num_pages, P, D]`` (k, v) and a page table giving segment ``s`` exactly
    ``pages_per_seg[s]`` distinct, shuffled page ids; ``extra_pages`` pages nobody owns (holes);
    table entries past a segment's pages hold -1 or (``garbage``) out-of-range ids."""
    g = gen(seed)
    S = len(pages_per_seg)
    total = sum(pages_per_seg)
    num_pages = total + extra_pages
    width = max([1, *pages_per_seg]) + 1 if width is None else width
    ids = torch.randperm(num_pages, generator=g)[:total].int()
    table = torch.full((S, width), -1, dtype=torch.int32)
    if garbage:
        table[:, 1::2] = num_pages + 1000  # ignored entries: never read
    at = 0
    for s, k in enumerate(pages_per_seg):
        table[s, :k] = ids[at : at + k]
        at += k
    kp = randn((num_pages, P, D), g, dtype)
    vp = randn((num_pages, P, D), g, dtype)
    return kp, vp, table


def flat_from_segments(keys, values, D, dtype):
    """A contiguous flat cache holding the given segments back to back (capacity = length)."""
    lens = [k.shape[0] for k in keys]
    st = torch.zeros(len(lens), dtype=torch.int32)
    if len(lens) > 1:
        st[1:] = torch.cumsum(torch.tensor(lens), 0)[:-1].int()
    rows = max(1, sum(lens))
    kf = torch.zeros(rows, D, dtype=dtype)
    vf = torch.zeros(rows, D, dtype=dtype)
    for s, (k, v) in enumerate(zip(keys, values)):
        kf[int(st[s]) : int(st[s]) + lens[s]] = k
        vf[int(st[s]) : int(st[s]) + lens[s]] = v
    return kf, vf, st, torch.tensor(lens, dtype=torch.int32)


def check_decode(got, want, dtype, what):
    """out/lse against the float64 reference: same empty rows (out 0, lse -inf), fp32 or
    half-precision tolerances (as tests/test_cpu_ops.py)."""
    (out, lse), (w_out, w_lse) = cpu(*got), cpu(*want)
    assert out.dtype == dtype and lse.dtype == torch.float32, what
    assert torch.equal(torch.isneginf(lse), torch.isneginf(w_lse)), f"{what}: empty rows differ"
    empty = torch.isneginf(w_lse)
    assert (out[empty] == 0).all(), f"{what}: empty rows must be 0"
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, w_out) < tol, f"{what}: rel err {rel_err(out, w_out)}"
    fin = ~empty
    torch.testing.assert_close(lse[fin], w_lse[fin], rtol=1e-5,
                               atol=1e-5 if dtype == torch.float32 else 1e-4)


# ----------------------------------------------------------------------------------------------
# paged_compact_ == compact


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("P", PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", [1, 4])
def test_paged_compact_equals_compact(device, P, dtype, G):
    B, Hk, N, W, D, C = 3, 2, 53, 6, 16, 9
    Hq = Hk * G
    sd = 1000 * P + 10 * G + DTYPES.index(dtype)
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, sd, dtype=dtype)
    ks = make_key_start(B, N, sd, max_pad=N - 4)  # row 2 may have fewer than C prefix tokens
    q, k, v, ks = to(device, q, k, v, ks)
    s = ops.score(q, k, key_start=ks)
    bud = ops.allocate(s, C, key_start=ks)
    idx, cnt = ops.select(s, bud, key_start=ks)
    kf, vf, st, ln = ops.compact(k, v, idx, cnt, bud, W, reserve=2, key_start=ks)
    lens = ln.cpu().tolist()
    kp, vp, table = make_pool([n_pages(n, P) for n in lens], P, D, dtype, sd + 1)
    want = ref.paged_compact_ref(kp, vp, table, torch.zeros(B * Hk, dtype=torch.int32),
                                 *cpu(k, v, idx, cnt), W, cpu(ks))
    kp, vp, table = to(device, kp, vp, table)
    seg_len = torch.full((B * Hk,), 77, dtype=torch.int32, device=device)
    ops.paged_compact_(kp, vp, table, seg_len, k, v, idx, cnt, W, key_start=ks)
    assert_equal(seg_len, ln, "seg_len == compact's seg_len")
    # exactly compact's rows (bitwise), and nothing else of the pool touched
    pk, pv = ref.paged_segments_ref(*cpu(kp, vp, table, seg_len))
    for sgm, (a, b) in enumerate(zip(pk, ref.segments_ref(*cpu(kf, st, ln)))):
        assert_equal(a, b, f"k rows of segment {sgm}")
    for sgm, (a, b) in enumerate(zip(pv, ref.segments_ref(*cpu(vf, st, ln)))):
        assert_equal(a, b, f"v rows of segment {sgm}")
    assert_equal(kp, want[0], "k_pages (untouched slots kept)")
    assert_equal(vp, want[1], "v_pages (untouched slots kept)")
    # decode over the pages == decode over the flat cache
    for T in (1, 3):
        qd = to(device, randn((B, Hq, T, D), sd + 5 + T, dtype))
        got = ops.paged_decode_attention(qd, kp, vp, table, seg_len, return_lse=True)
        flat = ops.decode_attention(qd, kf, vf, st, ln, return_lse=True)
        if device == "cpu":  # the same kernel over the same rows: bitwise
            assert_equal(got[0], flat[0], f"out T={T}")
            assert_equal(got[1], flat[1], f"lse T={T}")
        else:
            torch.testing.assert_close(got[1], flat[1], rtol=1e-5, atol=1e-5)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            assert rel_err(got[0], flat[0]) < tol


# ----------------------------------------------------------------------------------------------
# random metadata against the reference: append then decode


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("P", PAGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("G", [1, 4])
def test_paged_append_decode_vs_reference(device, P, dtype, T, G):
    B, Hk, D = 2, 3, 64 if P == 16 else 16
    S, Hq = B * Hk, Hk * G
    sd = 7 + 100 * P + 10 * T + G + 1000 * DTYPES.index(dtype)
    g = gen(sd)
    # odd fills, empty segments, one segment exactly at a page boundary
    lens = torch.randint(0, 3 * P + 2, (S,), generator=g).int()
    lens[0] = 0
    lens[1] = 2 * P
    pages = [n_pages(int(n) + T, P) + int(torch.randint(0, 2, (1,), generator=g)) for n in lens]
    kp, vp, table = make_pool(pages, P, D, dtype, sd + 1, extra_pages=7)
    qd = randn((B, Hq, T, D), sd + 2, dtype)
    kn = randn((B, Hk, T, D), sd + 3, dtype)
    vn = randn((B, Hk, T, D), sd + 4, dtype)

    # decode before the append: segments shorter than T (out 0 / lse -inf rows)
    want = ref.paged_decode_attention_ref(qd, kp, vp, table, lens, return_lse=True)
    dq, dkp, dvp, dtab, dlen = to(device, qd, kp, vp, table, lens)
    got = ops.paged_decode_attention(dq, dkp, dvp, dtab, dlen, return_lse=True)
    check_decode(got, want, dtype, "decode before append")
    assert_equal(ops.paged_decode_attention(dq, dkp, dvp, dtab, dlen), cpu(got[0]), "no-lse out")
    assert_equal(torch.ops.adakv.paged_decode_attention_lse(dq, dkp, dvp, dtab, dlen, None)[1],
                 cpu(got[1]), "lse op vs wrapper")

    wk, wv, wl = ref.paged_append_ref(kp, vp, table, lens, kn, vn)
    ov = torch.zeros(S, dtype=torch.int32, device=device)
    ops.paged_append_(dkp, dvp, dtab, dlen, *to(device, kn, vn), overflow=ov)
    assert_equal(dlen, wl, "seg_len after append")
    assert_equal(dkp, wk, "k_pages after append")
    assert_equal(dvp, wv, "v_pages after append")
    assert ov.cpu().tolist() == [0] * S

    want = ref.paged_decode_attention_ref(qd, wk, wv, table, wl, scale=0.3, return_lse=True)
    got = ops.paged_decode_attention(dq, dkp, dvp, dtab, dlen, scale=0.3, return_lse=True)
    check_decode(got, want, dtype, "decode after append")
    # == the contiguous decode over the same segments
    keys, values = ref.paged_segments_ref(wk, wv, table, wl)
    flat = to(device, *flat_from_segments(keys, values, D, dtype))
    want_flat = ops.decode_attention(dq, *flat, scale=0.3, return_lse=True)
    if device == "cpu":
        assert_equal(got[0], want_flat[0], "paged out == flat out")
        assert_equal(got[1], want_flat[1], "paged lse == flat lse")
    else:
        check_decode(got, cpu(*want_flat), dtype, "paged vs flat (cuda)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("P", [3, 16])
def test_all_empty_bucket_slots(device, P):
    """Unused slots of a batch bucket: seg_len 0, table all -1: out 0, lse -inf."""
    B, Hk, Hq, T, D = 2, 2, 4, 1, 16
    kp, vp, table = make_pool([2, 0, 0, 1], P, D, torch.float32, 3, garbage=False)
    lens = torch.tensor([P + 1, 0, 0, 1], dtype=torch.int32)
    qd = randn((B, Hq, T, D), 4)
    want = ref.paged_decode_attention_ref(qd, kp, vp, table, lens, return_lse=True)
    got = ops.paged_decode_attention(*to(device, qd, kp, vp, table, lens), return_lse=True)
    check_decode(got, want, torch.float32, "bucket")
    out, lse = cpu(*got)
    assert (out[0, 2:] == 0).all() and (out[1, :2] == 0).all()
    assert torch.isneginf(lse[0, 2:]).all() and torch.isneginf(lse[1, :2]).all()


# ----------------------------------------------------------------------------------------------
# a serving-like lifetime: evict into pages, decode steps, free a sequence, reuse its pages


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("P", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pages_reused_after_free(device, P, dtype):
    B, Hk, G, N, W, D, C = 2, 2, 2, 40, 4, 16, 6
    S, Hq = B * Hk, Hk * G
    sd = 31 * P + DTYPES.index(dtype)
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, sd, dtype=dtype)
    ks = torch.tensor([0, 5], dtype=torch.int32)
    s = ref.score_ref(q, k, key_start=ks)
    bud = ref.allocate_ref(s, C, key_start=ks)
    idx, cnt = ref.select_ref(s, bud, ks)
    steps = [1, 2, 1]
    lens0 = [int(cnt.view(-1)[i]) + min(W, N - int(ks[i // Hk])) for i in range(S)]
    # every segment gets the pages its prompt and all decode steps need (pool shared, holes)
    need = [n_pages(n + sum(steps) + 1, P) for n in lens0]  # + the step after the reuse
    width = max(need) + 2
    kp, vp, table = make_pool(need, P, D, dtype, sd + 1, extra_pages=3, width=width)
    free = sorted(set(range(kp.shape[0])) - set(table.view(-1).tolist()))  # the holes
    seg_len = torch.zeros(S, dtype=torch.int32)
    want = ref.paged_compact_ref(kp, vp, table, seg_len, k, v, idx, cnt, W, ks)
    d = dict(zip(("kp", "vp", "table", "len"), to(device, kp, vp, table, seg_len)))
    ops.paged_compact_(d["kp"], d["vp"], d["table"], d["len"], *to(device, k, v, idx, cnt), W,
                       key_start=ks.to(device))
    wk, wv, wl = want
    for step, T in enumerate(steps):
        kn = randn((B, Hk, T, D), sd + 10 + step, dtype)
        vn = randn((B, Hk, T, D), sd + 20 + step, dtype)
        qd = randn((B, Hq, T, D), sd + 30 + step, dtype)
        wk, wv, wl = ref.paged_append_ref(wk, wv, table, wl, kn, vn)
        ops.paged_append_(d["kp"], d["vp"], d["table"], d["len"], *to(device, kn, vn))
        got = ops.paged_decode_attention(qd.to(device), d["kp"], d["vp"], d["table"], d["len"],
                                         return_lse=True)
        check_decode(got, ref.paged_decode_attention_ref(qd, wk, wv, table, wl, return_lse=True),
                     dtype, f"step {step}")
    assert_equal(d["kp"], wk, "k_pages after the steps")

    # sequence 0 finishes: its pages go back to the free list (host side); a new sequence
    # (prompt of different length) takes pages from the free list, reversed (shuffled order)
    freed = table[:Hk][:, :width].reshape(-1)
    freed = [i for i in freed.tolist() if 0 <= i < kp.shape[0]]
    free = list(reversed(free + sorted(freed)))
    q2, k2, v2 = make_qkv(1, Hq, Hk, N - 7, W, D, sd + 99, dtype=dtype)
    s2 = ref.score_ref(q2, k2)
    bud2 = ref.allocate_ref(s2, C + 2)
    idx2, cnt2 = ref.select_ref(s2, bud2)
    lens2 = [int(c) + W for c in cnt2.view(-1).tolist()]
    table2 = table.clone()
    table2[:Hk] = -1
    for h in range(Hk):
        for i in range(n_pages(lens2[h] + 1, P)):
            table2[h, i] = free.pop()
    # one compact call of the whole bucket would rewrite sequence 1 too; instead compact the new
    # sequence alone into a 1-row view of the table (B = 1), then decode the whole bucket
    sub_len = torch.zeros(Hk, dtype=torch.int32)
    wk, wv, wl2 = ref.paged_compact_ref(wk, wv, table2[:Hk].contiguous(), sub_len, k2, v2, idx2,
                                        cnt2, W)
    wl = torch.cat([wl2, wl[Hk:]])
    t2 = table2.to(device)
    dsub = torch.zeros(Hk, dtype=torch.int32, device=device)
    ops.paged_compact_(d["kp"], d["vp"], t2[:Hk].contiguous(), dsub, *to(device, k2, v2, idx2,
                                                                         cnt2), W)
    d["len"] = torch.cat([dsub, d["len"][Hk:]])
    assert_equal(d["kp"], wk, "k_pages after reuse (sequence 1 untouched)")
    assert_equal(d["vp"], wv, "v_pages after reuse")
    kn = randn((B, Hk, 1, D), sd + 50, dtype)
    wk, wv, wl = ref.paged_append_ref(wk, wv, table2, wl, kn, -kn)
    ops.paged_append_(d["kp"], d["vp"], t2, d["len"], *to(device, kn, -kn))
    qd = randn((B, Hq, 1, D), sd + 51, dtype)
    got = ops.paged_decode_attention(qd.to(device), d["kp"], d["vp"], t2, d["len"],
                                     return_lse=True)
    check_decode(got, ref.paged_decode_attention_ref(qd, wk, wv, table2, wl, return_lse=True),
                 dtype, "after reuse")
    assert_equal(d["len"], wl, "seg_len after reuse")


@pytest.mark.parametrize("device", DEVICES)
def test_paged_compact_no_window_and_all_padding(device):
    """window = 0, a row that is all padding (seg_len 0: no page needed, table row all -1)."""
    B, Hk, N, D, P = 2, 2, 12, 16, 4
    g = gen(5)
    k = randn((B, Hk, N, D), g)
    v = randn((B, Hk, N, D), g)
    ks = torch.tensor([0, N], dtype=torch.int32)
    idx = torch.full((B, Hk, N), -1, dtype=torch.int32)
    idx[0, 0, :3] = torch.tensor([7, 1, 4], dtype=torch.int32)  # given order, not sorted
    idx[0, 1, :1] = 11
    cnt = torch.tensor([[3, 1], [0, 0]], dtype=torch.int32)
    kp, vp, table = make_pool([1, 1, 0, 0], P, D, torch.float32, 6)
    want = ref.paged_compact_ref(kp, vp, table, torch.zeros(4, dtype=torch.int32), k, v, idx, cnt,
                                 0, ks)
    dk, dv, dt = to(device, kp, vp, table)
    ln = torch.zeros(4, dtype=torch.int32, device=device)
    ops.paged_compact_(dk, dv, dt, ln, *to(device, k, v, idx, cnt), 0, key_start=ks.to(device))
    assert ln.cpu().tolist() == [3, 1, 0, 0]
    assert_equal(dk, want[0], "k_pages")
    assert_equal(dv, want[1], "v_pages")


def test_cpu_errors_change_nothing():
    """CPU: a bad paged_compact_ / paged_append_ raises before writing anything."""
    B, Hk, N, W, D, P = 1, 2, 10, 2, 8, 2
    g = gen(9)
    k, v = randn((B, Hk, N, D), g), randn((B, Hk, N, D), g)
    idx = torch.arange(N - W, dtype=torch.int32).repeat(B, Hk, 1).contiguous()
    cnt = torch.full((B, Hk), 3, dtype=torch.int32)
    kp, vp, table = make_pool([3, 3], P, D, torch.float32, 10, width=3)
    bad = table.clone()
    bad[1, 2] = bad[0, 0]  # segment 1's last page is segment 0's first
    ln = torch.zeros(2, dtype=torch.int32)
    k0, v0 = kp.clone(), vp.clone()
    with pytest.raises(RuntimeError, match=r"adakv: paged_compact_: page \d+ is used twice"):
        ops.paged_compact_(kp, vp, bad, ln, k, v, idx, cnt, W)
    assert_equal(kp, k0, "k_pages")
    assert_equal(vp, v0, "v_pages")
    assert ln.tolist() == [0, 0]
    ops.paged_compact_(kp, vp, table, ln, k, v, idx, cnt, W)
    assert ln.tolist() == [5, 5]
    k0, v0 = kp.clone(), vp.clone()
    kn = randn((B, Hk, 2, D), 11)
    with pytest.raises(RuntimeError, match=r"adakv: paged_append_ of 2 tokens exceeds"):
        ops.paged_append_(kp, vp, table, ln, kn, kn)  # 5 + 2 > 3 pages * 2
    assert_equal(kp, k0, "k_pages after failed append")
    assert ln.tolist() == [5, 5]
    ov = torch.zeros(2, dtype=torch.int32)
    ops.paged_append_(kp, vp, table, ln, kn[:, :, :1].contiguous(), kn[:, :, :1].contiguous(), ov)
    assert ln.tolist() == [6, 6] and ov.tolist() == [0, 0]


@pytest.mark.parametrize("device", DEVICES)
def test_paged_append_overflow_flags_only_that_segment(device):
    """A segment whose table cannot fit the append: CPU raises and writes nothing; CUDA leaves
    that segment unchanged, sets overflow[s] = 1 and appends to the others."""
    B, Hk, D, P, T = 1, 3, 16, 4, 2
    kp, vp, table = make_pool([2, 1, 2], P, D, torch.float32, 12, garbage=False)
    lens = torch.tensor([3, 3, 6], dtype=torch.int32)  # segment 1: 3 + 2 > 1 page of 4
    kn = randn((B, Hk, T, D), 13)
    d = to(device, kp.clone(), vp.clone(), table, lens.clone())
    ov = torch.zeros(3, dtype=torch.int32, device=device)
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"adakv: paged_append_.*page_table\[1, 1\] = -1"):
            ops.paged_append_(*d, kn, kn, ov)
        assert_equal(d[0], kp, "k_pages")
        assert d[3].tolist() == [3, 3, 6] and ov.tolist() == [0, 0, 0]
        return
    ops.paged_append_(*d, *to(device, kn, kn), ov)
    assert ov.cpu().tolist() == [0, 1, 0]
    assert d[3].cpu().tolist() == [5, 3, 8]
    keys, _ = ref.paged_segments_ref(*cpu(d[0], d[1], d[2]), torch.tensor([5, 3, 8],
                                                                          dtype=torch.int32))
    assert_equal(keys[0][3:], kn[0, 0], "segment 0 appended")
    assert_equal(keys[2][6:], kn[0, 2], "segment 2 appended")
    assert_equal(cpu(d[0])[table[1, 0]], kp[table[1, 0]], "segment 1 untouched")


# ----------------------------------------------------------------------------------------------
# the reference itself


def test_reference_paged_equals_flat():
    """paged_*_ref agree with the flat reference on the same segments."""
    B, Hk, Hq, N, W, D, C, P = 2, 2, 4, 30, 4, 8, 5, 3
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, 77)
    ks = torch.tensor([0, 4], dtype=torch.int32)
    s = ref.score_ref(q, k, key_start=ks)
    bud = ref.allocate_ref(s, C, key_start=ks)
    idx, cnt = ref.select_ref(s, bud, ks)
    kf, vf, st, ln = ref.compact_ref(k, v, idx, cnt, bud, W, reserve=1, key_start=ks)
    kp, vp, table = make_pool([n_pages(int(n) + 1, P) for n in ln], P, D, torch.float32, 78)
    kp, vp, pl = ref.paged_compact_ref(kp, vp, table, torch.zeros_like(ln), k, v, idx, cnt, W, ks)
    assert_equal(pl, ln, "seg_len")
    kn = randn((B, Hk, 1, D), 79)
    kf, vf, ln = ref.append_ref(kf, vf, st, ln, kn, kn)
    kp, vp, pl = ref.paged_append_ref(kp, vp, table, pl, kn, kn)
    qd = randn((B, Hq, 1, D), 80)
    a = ref.decode_attention_ref(qd, kf, vf, st, ln, return_lse=True)
    b = ref.paged_decode_attention_ref(qd, kp, vp, table, pl, return_lse=True)
    assert_equal(a[0], b[0], "out")
    assert_equal(a[1], b[1], "lse")
    with pytest.raises(RuntimeError, match="outside"):
        ref.paged_segments_ref(kp, vp, torch.full_like(table, kp.shape[0]), pl)
    assert math.isfinite(float(b[1].sum()))


# ----------------------------------------------------------------------------------------------
# CUDA: the paged layout through every path of the shared decode kernel family


def check_paged_cuda_decode(qd, kp, vp, table, lens, dtype, what):
    """CUDA paged decode against the float64 reference and against the CUDA contiguous kernel
    over the same segments laid out back to back."""
    D = kp.shape[-1]
    dev = to("cuda", qd, kp, vp, table, lens)
    got = ops.paged_decode_attention(*dev, return_lse=True)
    keys, values = ref.paged_segments_ref(kp, vp, table, lens)
    flat = to("cuda", *flat_from_segments(keys, values, D, dtype))
    want_flat = ops.decode_attention(dev[0], *flat, return_lse=True)
    check_decode(got, ref.paged_decode_attention_ref(qd, kp, vp, table, lens, return_lse=True),
                 dtype, f"{what}: paged vs reference")
    check_decode(got, cpu(*want_flat), dtype, f"{what}: paged vs contiguous")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("splits,cluster", [("1", "0"), ("3", "0"), ("16", "0"), ("4", "1"),
                                            ("16", "1"), ("auto", "1")])
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float16, 64),
                                     (torch.bfloat16, 256), (torch.float32, 32)])
@pytest.mark.parametrize("P", [5, 16, 256])
@pytest.mark.parametrize("path", ["split", "balanced"])
def test_cuda_paged_decode_split_paths(monkeypatch, path, splits, cluster, dtype, D, P):
    """Paged decode == contiguous decode on the same data for the single-split, two-launch
    merge and cluster-merge paths (ADAKV_DECODE_SPLITS / ADAKV_DECODE_CLUSTER), page sizes
    that split a key tile (5), match it (16) or hold whole segments (256), scattered pages;
    and the same with the work-balanced schedule (ADAKV_DECODE_BALANCED=1; fp16 / bf16 with
    P % 16 == 0, else the split kernel) on both layouts."""
    set_decode_schedule(monkeypatch, splits, cluster, path)
    B, Hk, G, T = 2, 2, 4, 3
    S, Hq = B * Hk, Hk * G
    sd = 9000 + P + 7 * D + 13 * ["1", "3", "16", "4", "auto"].index(splits) + int(cluster)
    g = gen(sd)
    lens = torch.randint(T, 700, (S,), generator=g).int()
    lens[0] = 0
    lens[1] = 2 * P
    kp, vp, table = make_pool([n_pages(int(n), P) for n in lens], P, D, dtype, sd + 1)
    check_paged_cuda_decode(randn((B, Hq, T, D), sd + 2, dtype), kp, vp, table, lens, dtype,
                            f"{path}, splits {splits}, cluster {cluster}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("splits", ["1", "2", "auto"])
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float32, 32)])
@pytest.mark.parametrize("P", [16, 48, 64])
def test_cuda_paged_decode_long_segments(monkeypatch, splits, dtype, D, P):
    """Segments long enough that a warp of the split kernel walks more than 32 tiles (the
    table entries of its tiles are held 32 at a time and the next 32 loaded ahead): lengths
    at and around the batch edges (2048 keys per split on the tensor-core path, 1024 on the
    fp32 one, 32 tiles x 4 warps), several batches per warp, a power-of-two and a
    non-power-of-two page size; == the contiguous kernel on the same data and the float64
    reference."""
    set_decode_schedule(monkeypatch, splits, cluster="0", path="split")
    B, Hk, G, T = 2, 4, 2, 2
    Hq = Hk * G
    sd = 13_000 + P + D + 7 * ["1", "2", "auto"].index(splits)
    lens = torch.tensor([0, 1023, 2048, 2049, 1024 + 5, 4096 + 64 * 3 + 5, 6200, 9001],
                        dtype=torch.int32)
    kp, vp, table = make_pool([n_pages(int(n), P) for n in lens], P, D, dtype, sd + 1)
    check_paged_cuda_decode(randn((B, Hq, T, D), sd + 2, dtype), kp, vp, table, lens, dtype,
                            f"long segments, splits {splits}")


# ----------------------------------------------------------------------------------------------
# segment_index: batch segment i uses table row segment_index[i] (-1: padding) of tables with
# any number of rows (a store's sequence slots; the batch a subset of them plus pad rows)


def gather_rows(page_table, seg_len, index):
    """The tables a batch with ``segment_index = index`` reads, gathered: row ``i`` is
    ``page_table[index[i]]`` / ``seg_len[index[i]]``; a padding row (-1) has length 0 and a
    table row of -1."""
    valid = index >= 0
    rows = index[valid].long()
    pt = torch.full((index.numel(), page_table.shape[1]), -1, dtype=torch.int32)
    sl = torch.zeros(index.numel(), dtype=torch.int32)
    pt[valid] = page_table[rows]
    sl[valid] = seg_len[rows]
    return pt, sl


def check_indexed_decode(qd, kp, vp, table, lens, idx, dtype, what):
    """CUDA paged decode with ``segment_index = idx`` over the whole tables: bitwise the decode
    over the gathered tables, and the float64 reference."""
    dq, dkp, dvp = to("cuda", qd, kp, vp)
    got = ops.paged_decode_attention(dq, dkp, dvp, *to("cuda", table, lens), return_lse=True,
                                     segment_index=idx.cuda())
    gt, gl = gather_rows(table, lens, idx)
    want = ops.paged_decode_attention(dq, dkp, dvp, *to("cuda", gt, gl), return_lse=True)
    assert_equal(got[0], want[0], f"{what}: out")
    assert_equal(got[1], want[1], f"{what}: lse")
    check_decode(got, ref.paged_decode_attention_ref(qd, kp, vp, gt, gl, return_lse=True), dtype,
                 f"{what} vs reference")


def batch_index(S_tab, B, Hk, g, first_rows=(), pad_last_batch_row=True, pad_positions=(1,)):
    """A segment_index of ``B * Hk`` entries: padding (-1) at every head of the last batch row
    (the pad row of a CUDA-graph bucket) and at ``pad_positions``; the other entries name
    distinct random rows of a ``S_tab``-row table, ``first_rows`` among them, in random order."""
    S = B * Hk
    pad = set(pad_positions) | (set(range((B - 1) * Hk, S)) if pad_last_batch_row else set())
    named = [i for i in torch.randperm(S, generator=g).tolist() if i not in pad]
    rest = [r for r in torch.randperm(S_tab, generator=g).tolist() if r not in first_rows]
    rows = list(first_rows) + rest
    assert len(rows) >= len(named)
    idx = torch.full((S,), -1, dtype=torch.int32)
    for i, r in zip(named, rows):
        idx[i] = r
    return idx


def query_rows_of(index, B, Hk, G):
    """[B, Hq] mask of the query heads whose batch segment ``index`` marks."""
    return index.view(B, Hk).repeat_interleave(G, dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("P", [3, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("G", [1, 4])
def test_paged_decode_segment_index_equals_gathered(device, P, dtype, T, G):
    """Decode through segment_index == decode over page_table[idx], seg_len[idx] (bitwise: the
    same kernel over the same rows, the same split plan), for a permuted subset of the table's
    rows with padding entries (out 0, lse -inf), an empty segment and (T = 1) a row named twice
    (decode only reads)."""
    B, Hk, D = 3, 2, 64 if P == 16 else 16
    Hq, S_tab = Hk * G, 9
    sd = 40_000 + 100 * P + 10 * T + G + 1000 * DTYPES.index(dtype)
    g = gen(sd)
    lens = torch.randint(0, 3 * P + 2, (S_tab,), generator=g).int()
    lens[0] = 0  # an empty segment, named by the index
    kp, vp, table = make_pool([n_pages(int(n), P) for n in lens], P, D, dtype, sd + 1)
    idx = batch_index(S_tab, B, Hk, g, first_rows=(0,))
    if T == 1:  # name one row twice (keeping row 0 named)
        named = torch.nonzero(idx >= 0).flatten().tolist()
        j = next(i for i in named if idx[i] != 0)
        idx[j] = idx[next(i for i in named if i != j)]
    qd = randn((B, Hq, T, D), sd + 2, dtype)
    gt, gl = gather_rows(table, lens, idx)
    dq, dkp, dvp = to(device, qd, kp, vp)
    want = ops.paged_decode_attention(dq, dkp, dvp, *to(device, gt, gl), return_lse=True)
    dtab, dlen, didx = to(device, table, lens.clone(), idx)
    got = ops.paged_decode_attention(dq, dkp, dvp, dtab, dlen, return_lse=True,
                                     segment_index=didx)
    assert_equal(got[0], want[0], "out == gathered out")
    assert_equal(got[1], want[1], "lse == gathered lse")
    assert_equal(ops.paged_decode_attention(dq, dkp, dvp, dtab, dlen, segment_index=didx),
                 cpu(got[0]), "no-lse op")
    check_decode(got, ref.paged_decode_attention_ref(qd, kp, vp, gt, gl, return_lse=True), dtype,
                 "vs reference")
    out, lse = cpu(*got)
    pad = query_rows_of(idx < 0, B, Hk, G)
    assert pad.any() and (out[pad] == 0).all() and torch.isneginf(lse[pad]).all()
    empty = query_rows_of(idx == 0, B, Hk, G)
    assert empty.any() and torch.isneginf(lse[empty]).all(), "row 0 is empty"
    assert_equal(dlen, lens, "decode changes no length")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("P", [1, 3, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3])
def test_paged_append_segment_index_equals_gathered(device, P, dtype, T):
    """Append through segment_index == append on the gathered tables of the batch's rows, then
    the lengths scattered back: padding entries write nothing, rows the index does not name keep
    their length and pages; then a decode step through the index == over the gathered tables."""
    B, Hk, G, D = 3, 2, 2, 64 if P == 16 else 16
    S, Hq, S_tab = B * Hk, Hk * G, 10
    sd = 50_000 + 100 * P + 10 * T + 1000 * DTYPES.index(dtype)
    g = gen(sd)
    lens = torch.randint(0, 2 * P + 2, (S_tab,), generator=g).int()
    lens[3] = 0
    kp, vp, table = make_pool([n_pages(int(n) + T, P) for n in lens], P, D, dtype, sd + 1)
    idx = batch_index(S_tab, B, Hk, g, first_rows=(3,))
    kn = randn((B, Hk, T, D), sd + 2, dtype)
    vn = randn((B, Hk, T, D), sd + 3, dtype)
    valid = idx >= 0
    rows = idx[valid].long()
    # expected: the append of the non-padding segments on their gathered tables (device op and
    # reference agree), the new lengths scattered back into the table's rows
    gk = kn.reshape(S, T, D)[valid].reshape(1, -1, T, D)
    gv = vn.reshape(S, T, D)[valid].reshape(1, -1, T, D)
    wk, wv, wl_rows = ref.paged_append_ref(kp, vp, table[rows].contiguous(), lens[rows], gk, gv)
    wl = lens.clone()
    wl[rows] = wl_rows
    ek, ev, egl = to(device, kp.clone(), vp.clone(), lens[rows].contiguous())
    ops.paged_append_(ek, ev, table[rows].contiguous().to(device), egl, *to(device, gk, gv))
    assert_equal(ek, wk, "gathered append (device) == reference")
    assert_equal(egl, wl_rows, "gathered lengths")

    dkp, dvp, dtab, dlen, didx = to(device, kp.clone(), vp.clone(), table, lens.clone(), idx)
    ov = torch.zeros(S, dtype=torch.int32, device=device)
    ops.paged_append_(dkp, dvp, dtab, dlen, *to(device, kn, vn), overflow=ov,
                      segment_index=didx)
    assert_equal(dkp, wk, "k_pages")
    assert_equal(dvp, wv, "v_pages")
    assert_equal(dlen, wl, "seg_len (named rows + T, all others untouched)")
    unnamed = torch.ones(S_tab, dtype=torch.bool)
    unnamed[rows] = False
    assert unnamed.any() and torch.equal(cpu(dlen)[unnamed], lens[unnamed])
    assert_equal(dtab, table, "page_table")
    assert ov.cpu().tolist() == [0] * S

    qd = randn((B, Hq, T, D), sd + 4, dtype)
    gt, gl = gather_rows(table, wl, idx)
    dq = qd.to(device)
    got = ops.paged_decode_attention(dq, dkp, dvp, dtab, dlen, return_lse=True,
                                     segment_index=didx)
    want = ops.paged_decode_attention(dq, dkp, dvp, *to(device, gt, gl), return_lse=True)
    assert_equal(got[0], want[0], "decode after append: out")
    assert_equal(got[1], want[1], "decode after append: lse")
    check_decode(got, ref.paged_decode_attention_ref(qd, wk, wv, gt, gl, return_lse=True), dtype,
                 "decode after append vs reference")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("S_tab", [0, 3])
def test_segment_index_all_padding(device, S_tab):
    """A batch of padding only (every entry -1), over tables of 0 or 3 rows: the append writes
    nothing and changes no length, the decode gives out 0 and lse -inf everywhere."""
    B, Hk, G, T, D, P = 2, 2, 2, 2, 16, 4
    kp, vp, table = make_pool([2] * S_tab, P, D, torch.float32, 60 + S_tab, width=3)
    lens = torch.tensor([5, 0, 3][:S_tab], dtype=torch.int32)
    idx = torch.full((B * Hk,), -1, dtype=torch.int32)
    kn = randn((B, Hk, T, D), 61)
    dkp, dvp, dtab, dlen, didx = to(device, kp.clone(), vp.clone(), table, lens.clone(), idx)
    ov = torch.zeros(B * Hk, dtype=torch.int32, device=device)
    ops.paged_append_(dkp, dvp, dtab, dlen, *to(device, kn, -kn), overflow=ov,
                      segment_index=didx)
    assert_equal(dkp, kp, "k_pages")
    assert_equal(dvp, vp, "v_pages")
    assert_equal(dlen, lens, "seg_len")
    assert ov.cpu().tolist() == [0] * (B * Hk)
    out, lse = cpu(*ops.paged_decode_attention(randn((B, Hk * G, T, D), 62).to(device), dkp, dvp,
                                               dtab, dlen, return_lse=True, segment_index=didx))
    assert (out == 0).all() and torch.isneginf(lse).all()


def _paged_step_indexed(k_pages, v_pages, page_table, seg_len, key_new, value_new, query,
                        segment_index):
    ops.paged_append_(k_pages, v_pages, page_table, seg_len, key_new, value_new,
                      segment_index=segment_index)
    return ops.paged_decode_attention(query, k_pages, v_pages, page_table, seg_len,
                                      return_lse=True, segment_index=segment_index)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_paged_step_with_segment_index(device, backend):
    """torch.compile(fullgraph=True) of paged_append_ + paged_decode_attention through a
    segment_index gives the eager result, step after step, with the batch's membership (the
    index's values, not its shape) changing between steps."""
    torch._dynamo.reset()
    B, Hk, G, D, P, S_tab = 2, 2, 2, 16, 4, 7
    Hq, steps = Hk * G, [1, 2, 1]
    g = gen(70)
    lens = torch.randint(0, 2 * P, (S_tab,), generator=g).int()
    kp, vp, table = make_pool([n_pages(int(n) + sum(steps), P) for n in lens], P, D,
                              torch.float32, 71)
    cache_e = [t.clone() for t in to(device, kp, vp, table, lens)]
    cache_c = [t.clone() for t in cache_e]
    fn = torch.compile(_paged_step_indexed, fullgraph=True, backend=backend)
    for step, T in enumerate(steps):
        idx = batch_index(S_tab, B, Hk, g, pad_last_batch_row=step != 1).to(device)
        kn, vn, qn = to(device, randn((B, Hk, T, D), 72 + step), randn((B, Hk, T, D), 80 + step),
                        randn((B, Hq, T, D), 90 + step))
        out_e, lse_e = _paged_step_indexed(*cache_e, kn, vn, qn, idx)
        out_c, lse_c = fn(*cache_c, kn, vn, qn, idx)
        torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse_c, lse_e, rtol=1e-6, atol=1e-6)
        for name, a, e in zip(("k_pages", "v_pages", "page_table", "seg_len"), cache_c, cache_e):
            assert_equal(a, e, f"{name} after step {step}")
    assert not torch.equal(cpu(cache_e[3]), lens), "the steps appended"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float16, 64)])
@pytest.mark.parametrize("P", [16, 64])
@pytest.mark.parametrize("path", ["split", "balanced"])
def test_cuda_paged_decode_batch64_bucket(monkeypatch, path, dtype, D, P):
    """The serving engine's decode: a batch-64 bucket of Llama-8B heads (512 segments) on
    both schedules, over a store of 600 sequence slots, Ada-skewed
    lengths (0 .. 1500), pad rows (-1) in the segment index: bitwise the gathered-table
    decode, and the float64 reference."""
    set_decode_schedule(monkeypatch, path=path)
    B, Hk, G, T, S_tab = 64, 8, 4, 1, 600
    Hq = Hk * G
    sd = 71_000 + P + D
    g = gen(sd)
    lens = (torch.rand(S_tab, generator=g) ** 2 * 1500).int()
    lens[::37] = 0
    kp, vp, table = make_pool([n_pages(int(n), P) for n in lens], P, D, dtype, sd + 1)
    idx = batch_index(S_tab, B, Hk, g, pad_positions=(1, 100, 101))
    check_indexed_decode(randn((B, Hq, T, D), sd + 2, dtype), kp, vp, table, lens, idx, dtype,
                         "batch 64")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("splits,cluster", [("1", "0"), ("4", "0"), ("4", "1"), ("auto", "1")])
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float32, 32)])
@pytest.mark.parametrize("P", [5, 16])
@pytest.mark.parametrize("path", ["split", "balanced"])
def test_cuda_paged_decode_segment_index_split_paths(monkeypatch, path, splits, cluster, dtype,
                                                    D, P):
    """segment_index through every split / merge path of the decode kernel family (padding
    segments next to long ones in one cluster) and the work-balanced schedule: bitwise the
    gathered-table decode."""
    set_decode_schedule(monkeypatch, splits, cluster, path)
    B, Hk, G, T, S_tab = 3, 2, 4, 2, 11
    Hq = Hk * G
    sd = 60_000 + P + 7 * D + 13 * ["1", "4", "auto"].index(splits) + int(cluster)
    g = gen(sd)
    lens = torch.randint(T, 700, (S_tab,), generator=g).int()
    lens[4] = 0
    kp, vp, table = make_pool([n_pages(int(n), P) for n in lens], P, D, dtype, sd + 1)
    idx = batch_index(S_tab, B, Hk, g, first_rows=(4,))
    check_indexed_decode(randn((B, Hq, T, D), sd + 2, dtype), kp, vp, table, lens, idx, dtype,
                         "segment_index")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_segment_index_out_of_range_is_padding(monkeypatch):
    """CUDA cannot check values on the host: a segment_index value outside [-1, rows) is
    treated as padding (nothing read or written, out 0 / lse -inf), paged_append_ sets
    overflow[i] = 2 for it (1 stays the capacity flag), and with ADAKV_DEBUG=1 the wrapper
    raises an error naming segment_index."""
    B, Hk, G, T, D, P = 1, 4, 2, 1, 16, 4
    kp, vp, table = make_pool([2, 2, 1], P, D, torch.float32, 81, garbage=False)
    lens = torch.tensor([3, 2, 4], dtype=torch.int32)  # row 2: full, an append overflows
    idx = torch.tensor([1, 3, 2, -7], dtype=torch.int32)
    kn = randn((B, Hk, T, D), 82)
    dkp, dvp, dtab, dlen, didx = to("cuda", kp.clone(), vp.clone(), table, lens, idx)
    ov = torch.zeros(B * Hk, dtype=torch.int32, device="cuda")
    ops.paged_append_(dkp, dvp, dtab, dlen, kn.cuda(), kn.cuda(), overflow=ov, segment_index=didx)
    assert ov.cpu().tolist() == [0, 2, 1, 2]
    assert dlen.cpu().tolist() == [3, 3, 4]
    wk, _, _ = ref.paged_append_ref(kp, vp, table[1:2].contiguous(), lens[1:2],
                                    kn[:, :1].contiguous(), kn[:, :1].contiguous())
    assert_equal(dkp, wk, "only row 1 appended")
    out, lse = cpu(*ops.paged_decode_attention(randn((B, Hk * G, T, D), 83).cuda(), dkp, dvp,
                                               dtab, dlen, return_lse=True, segment_index=didx))
    bad = query_rows_of((idx < -1) | (idx >= 3), B, Hk, G)
    assert (out[bad] == 0).all() and torch.isneginf(lse[bad]).all()
    assert torch.isfinite(lse[~bad]).all()
    monkeypatch.setenv("ADAKV_DEBUG", "1")
    with pytest.raises(RuntimeError, match=r"adakv: paged_append_: segment_index values outside "
                                           r"\[-1, 3\).*batch segments \[1, 3\]"):
        ops.paged_append_(dkp, dvp, dtab, dlen, kn.cuda(), kn.cuda(), segment_index=didx)
    with pytest.raises(RuntimeError, match=r"adakv: paged_append_ overflowed .* \[0\]"):
        ops.paged_append_(dkp, dvp, dtab, dlen, kn.cuda(), kn.cuda(),
                          segment_index=torch.tensor([2, -1, -1, -1], dtype=torch.int32,
                                                     device="cuda"))
