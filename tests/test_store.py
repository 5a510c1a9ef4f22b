"""adakv_ops.store.PagedKVStore (issue 12): chunked prefill + eviction into per-head pages must
keep exactly the one-shot ``evict`` / ``compact`` rows; decode over the pages must match
``decode_attention`` over the contiguous cache; join / leave, admission, snapshots, growth.

CPU only, small shapes. Skipped until the paged ops (``torch.ops.adakv.paged_*``) exist.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import HAVE_OPS

if HAVE_OPS:
    import adakv_ops
    from adakv_ops import store as store_mod
    from adakv_ops.budgets import pyramid_budgets

pytestmark = pytest.mark.skipif(
    not HAVE_OPS or not store_mod.have_paged_ops(),
    reason="paged ops (torch.ops.adakv.paged_compact_ / paged_append_ / "
           "paged_decode_attention) not registered")

Hq, Hk, D, P = 8, 2, 16, 8
LAYERS = 3
WINDOW, BUDGET, ALPHA = 8, 6, 0.2
LENS = [37, 90, 5, 19]          # 5 < window (L = 0), 19 and up evict
METHODS = ("full", "streaming", "snapkv", "ada_snapkv", "pyramid", "ada_pyramid")
ADAPTIVE = {"ada_snapkv": True, "ada_pyramid": True, "snapkv": False, "pyramid": False}


def _rand(shape, dtype, g):
    return torch.randn(shape, generator=g).to(dtype)


def _prompt(N, dtype, seed):
    """Per layer (q [1, Hq, N, D], k, v [1, Hk, N, D])."""
    g = torch.Generator().manual_seed(seed)
    return [(_rand((1, Hq, N, D), dtype, g), _rand((1, Hk, N, D), dtype, g),
             _rand((1, Hk, N, D), dtype, g)) for _ in range(LAYERS)]


def _streaming_scores(L, n_sink=4):
    # the hf.py pattern, written out independently (key_start 0)
    n = torch.arange(L, dtype=torch.float32)
    return torch.where(n < n_sink, 2.0 * L + n_sink - n, n).view(1, 1, L)


def _one_shot(method, layer, q, k, v, reserve=0):
    """The one-shot flat cache of one sequence (B = 1), as AdaKVLayer._evict_prefill builds it."""
    N = k.shape[2]
    W = min(WINDOW, N)
    if method == "full":
        z = torch.zeros((1, Hk), dtype=torch.int32)
        return adakv_ops.compact(k, v, torch.empty((1, Hk, 0), dtype=torch.int32), z, z, N,
                                 reserve=reserve)
    if method == "streaming":
        scores = _streaming_scores(N - W).expand(1, Hk, N - W).contiguous()
        budgets = torch.full((1, Hk), BUDGET, dtype=torch.int32)
        idx, cnt = adakv_ops.select(scores, budgets)
        return adakv_ops.compact(k, v, idx, cnt, budgets, W, reserve=reserve)
    C = BUDGET
    if method.endswith("pyramid"):
        C = pyramid_budgets(BUDGET, LAYERS, N, W)[layer]
    return adakv_ops.evict(q[:, :, N - W:].contiguous(), k, v, C, floor_alpha=ALPHA,
                           adaptive=ADAPTIVE[method], reserve=reserve)


def _store(dtype, num_pages=400, **kw):
    return store_mod.PagedKVStore(LAYERS, Hk, D, page_size=P, num_pages=num_pages, dtype=dtype,
                                  **kw)


def _chunks(N, chunk):
    c = N if chunk is None else chunk
    return [(a, min(a + c, N)) for a in range(0, N, c)]


def _prefill(store, seq, prompt, method, chunk, check_attention=False):
    """Chunked prefill in model order (chunk by chunk, layer by layer), then finish_prefill."""
    N = prompt[0][1].shape[2]
    W = min(WINDOW, N)
    spans = _chunks(N, chunk)
    outs = [[] for _ in range(LAYERS)]
    for i, (a, b) in enumerate(spans):
        for l, (q, k, v) in enumerate(prompt):
            store.prefill_chunk(l, seq, k[:, :, a:b], v[:, :, a:b])
            if check_attention:
                outs[l].append(store.prefill_attention(l, seq, q[:, :, a:b].contiguous()))
            if i == len(spans) - 1:
                store.finish_prefill(l, seq, q[:, :, N - W:], method=method, budget=BUDGET,
                                     window=WINDOW, alpha=ALPHA)
    return outs


def _check_kept(store, seq, prompt, method):
    for l, (q, k, v) in enumerate(prompt):
        kf, vf, ss, sl = _one_shot(method, l, q, k, v)
        assert store.lengths(l, seq) == sl.tolist(), (l, seq)
        assert store.is_compressed(l, seq)
        for h in range(Hk):
            gk, gv = store.segment_kv(l, seq, h)
            a, n = int(ss[h]), int(sl[h])
            assert torch.equal(gk, kf[a:a + n]), (method, l, seq, h)
            assert torch.equal(gv, vf[a:a + n]), (method, l, seq, h)


def _pages_for(store, seq):
    return sum(-(-n // P) for l in range(LAYERS) for n in store.lengths(l, seq))


# -- chunked prefill == one-shot -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [None, 1, 7, 13, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("method", METHODS)
def test_chunked_prefill_matches_one_shot(method, chunk, dtype):
    store = _store(dtype)
    prompts, seqs = [], []
    for i, N in enumerate(LENS):                 # prompts one at a time, different lengths
        seq = store.add_sequence()
        prompt = _prompt(N, dtype, seed=100 * i + 7)
        _prefill(store, seq, prompt, method, chunk)
        prompts.append(prompt)
        seqs.append(seq)
    for seq, prompt in zip(seqs, prompts):
        _check_kept(store, seq, prompt, method)
        # no transient page survives: exactly ceil(len / P) pages per segment
        assert store.pages_held(seq) == _pages_for(store, seq)
    assert store.pages_used == sum(store.pages_held(s) for s in seqs)
    assert store.pages_free == store.num_pages - store.pages_used


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["sdpa", "paged"])
def test_prefill_attention_is_causal_over_prompt(impl, dtype):
    store = _store(dtype)
    seq = store.add_sequence()
    N = 45
    q, k, v = _prompt(N, dtype, seed=3)[0]
    G = Hq // Hk
    exp = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(G, 1),
                                         v.float().repeat_interleave(G, 1), is_causal=True)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in _chunks(N, 11):
        store.prefill_chunk(0, seq, k[:, :, a:b], v[:, :, a:b])
        got = store.prefill_attention(0, seq, q[:, :, a:b].contiguous(), impl=impl)
        assert got.shape == (1, Hq, b - a, D) and got.dtype == dtype
        torch.testing.assert_close(got.float(), exp[:, :, a:b], **tol)
    pk, pv = store.prompt_kv(0, seq)
    assert torch.equal(pk, k) and torch.equal(pv, v)


# -- decode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["ada_snapkv", "full", "pyramid"])
def test_decode_matches_contiguous_cache(method, dtype):
    store = _store(dtype)
    seqs, flats = [], []
    for i, N in enumerate(LENS):
        seq = store.add_sequence()
        prompt = _prompt(N, dtype, seed=11 * i + 1)
        _prefill(store, seq, prompt, method, chunk=7)
        seqs.append(seq)
        flats.append([list(_one_shot(method, l, *prompt[l], reserve=16))
                      for l in range(LAYERS)])
    g = torch.Generator().manual_seed(5)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    # contiguous batch, a reversed (gathered) batch, a subset padded to a bucket
    steps = [(seqs, 1, None), (seqs, 3, None), (seqs[::-1], 1, None), ([seqs[2], seqs[0]], 2, 4),
             (seqs, 1, None)]
    for order, T, pad in steps:
        B = len(order)
        store.reserve(order, T)
        for l in range(LAYERS):
            kn, vn = _rand((B, Hk, T, D), dtype, g), _rand((B, Hk, T, D), dtype, g)
            qn = _rand((B, Hq, T, D), dtype, g)
            store.append(l, order, kn, vn)
            got = store.attend(l, order, qn, pad_to=pad)
            assert got.shape == (B, Hq, T, D)
            for b, seq in enumerate(order):
                kf, vf, ss, sl = flats[seq][l]
                adakv_ops.append_(kf, vf, ss, sl, kn[b:b + 1].contiguous(),
                                  vn[b:b + 1].contiguous())
                exp = adakv_ops.decode_attention(qn[b:b + 1].contiguous(), kf, vf, ss, sl)
                torch.testing.assert_close(got[b:b + 1].float(), exp.float(), **tol)
                assert store.lengths(l, seq) == sl.tolist()
                assert store.seg_len[l][seq * Hk:(seq + 1) * Hk].tolist() == sl.tolist()
    for seq in seqs:
        assert store.pages_held(seq) == _pages_for(store, seq)


# -- join / leave, admission -----------------------------------------------------------------


def _decode_out(store, seqs, layer=1, seed=9):
    g = torch.Generator().manual_seed(seed)
    q = _rand((len(seqs), Hq, 1, D), store.dtype, g)
    return store.attend(layer, seqs, q)


def test_join_leave_keeps_others():
    dtype = torch.float32
    store = _store(dtype, num_pages=200)
    seqs = []
    for i, N in enumerate([40, 70, 33]):
        seq = store.add_sequence()
        _prefill(store, seq, _prompt(N, dtype, seed=i), "ada_snapkv", chunk=16)
        seqs.append(seq)
    assert seqs == [0, 1, 2]
    before = _decode_out(store, [0, 2])
    k_before = {s: [store.segment_kv(l, s, h) for l in range(LAYERS) for h in range(Hk)]
                for s in (0, 2)}
    free0, held1 = store.pages_free, store.pages_held(1)
    freed_pages = {p for l in range(LAYERS) for s in range(Hk, 2 * Hk)
                   for p in store._pages[l][s]}
    assert store.bytes_held(1) == held1 * 2 * P * D * 4
    others = {p for l in range(LAYERS) for s in (0, 1, 4, 5) for p in store._pages[l][s]}
    store.free_sequence(1)
    assert store.pages_free == free0 + held1
    free_list = set(store._free)
    assert freed_pages <= free_list
    assert store.sequences == [0, 2]
    with pytest.raises(KeyError):
        store.lengths(0, 1)
    new = store.add_sequence()
    assert new == 1                                  # the freed slot
    assert all(n == 0 for l in range(LAYERS) for n in store.lengths(l, new))
    prompt = _prompt(25, dtype, seed=77)
    _prefill(store, new, prompt, "snapkv", chunk=9)
    _check_kept(store, new, prompt, "snapkv")
    new_pages = {p for l in range(LAYERS) for s in range(Hk, 2 * Hk) for p in store._pages[l][s]}
    # taken from the free list (freed pages first), never from the others
    assert new_pages <= free_list and new_pages & freed_pages and not new_pages & others
    after = _decode_out(store, [0, 2])
    assert torch.equal(before, after)
    for s in (0, 2):
        now = [store.segment_kv(l, s, h) for l in range(LAYERS) for h in range(Hk)]
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(k_before[s], now))


def test_fork_copies_rows_into_own_pages():
    dtype = torch.float32
    store = _store(dtype, num_pages=200)
    a = store.add_sequence()
    prompt = _prompt(45, dtype, seed=3)
    _prefill(store, a, prompt, "ada_snapkv", chunk=16)
    store.append(0, [a], *(_rand((1, Hk, 3, D), dtype, torch.Generator().manual_seed(1))
                           for _ in range(2)))
    held, free0 = store.pages_held(a), store.pages_free
    b = store.fork_sequence(a)
    assert b != a and store.sequences == sorted([a, b])
    assert store.pages_held(b) == held and store.pages_free == free0 - held
    pa = {p for l in range(LAYERS) for s in store._segs(a) for p in store._pages[l][s]}
    pb = {p for l in range(LAYERS) for s in store._segs(b) for p in store._pages[l][s]}
    assert not pa & pb
    for l in range(LAYERS):
        assert store.lengths(l, b) == store.lengths(l, a)
        assert store.is_compressed(l, b)
        for h in range(Hk):
            for x, y in zip(store.segment_kv(l, a, h), store.segment_kv(l, b, h)):
                assert torch.equal(x, y)
    q = _rand((1, Hq, 1, D), dtype, torch.Generator().manual_seed(2))
    assert torch.equal(store.attend(1, [a], q), store.attend(1, [b], q))
    # appends to the fork leave the source alone, and the other way round
    ka = [store.segment_kv(l, a, h) for l in range(LAYERS) for h in range(Hk)]
    g = torch.Generator().manual_seed(5)
    store.append(1, [b], _rand((1, Hk, 9, D), dtype, g), _rand((1, Hk, 9, D), dtype, g))
    assert store.lengths(1, b) == [n + 9 for n in store.lengths(1, a)]
    now = [store.segment_kv(l, a, h) for l in range(LAYERS) for h in range(Hk)]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(ka, now))
    # freeing the source keeps the fork
    kb = [store.segment_kv(l, b, h) for l in range(LAYERS) for h in range(Hk)]
    store.free_sequence(a)
    now = [store.segment_kv(l, b, h) for l in range(LAYERS) for h in range(Hk)]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(kb, now))
    # all-or-nothing
    small = _store(dtype, num_pages=60)
    c = small.add_sequence()
    _prefill(small, c, _prompt(60, dtype, seed=8), "full", chunk=None)
    free, seqs = small.pages_free, small.sequences
    with pytest.raises(store_mod.OutOfPages, match="forking sequence"):
        small.fork_sequence(c)
    assert small.pages_free == free and small.sequences == seqs
    with pytest.raises(KeyError):
        small.fork_sequence(7)


def test_out_of_pages_is_clear_and_changes_nothing():
    dtype = torch.float32
    store = _store(dtype, num_pages=30)
    a = store.add_sequence()
    _prefill(store, a, _prompt(30, dtype, seed=1), "ada_snapkv", chunk=10)
    b = store.add_sequence()
    q, k, v = _prompt(80, dtype, seed=2)[0]
    state = (store.pages_free, [store.lengths(l, s) for l in range(LAYERS) for s in (a, b)],
             store.k_pages.clone(), store.v_pages.clone(),
             [t.clone() for t in store.seg_len], [t.clone() for t in store.page_table])

    def unchanged():
        assert store.pages_free == state[0]
        assert [store.lengths(l, s) for l in range(LAYERS) for s in (a, b)] == state[1]
        assert torch.equal(store.k_pages, state[2]) and torch.equal(store.v_pages, state[3])
        assert all(torch.equal(x, y) for x, y in zip(store.seg_len, state[4]))
        assert all(torch.equal(x, y) for x, y in zip(store.page_table, state[5]))

    need = Hk * math.ceil(80 / P)
    with pytest.raises(store_mod.OutOfPages, match=r"needs \d+ more page\(s\), \d+ free") as e:
        store.prefill_chunk(0, b, k, v)
    assert isinstance(e.value, RuntimeError)
    assert e.value.needed == need and e.value.free == state[0]
    unchanged()
    with pytest.raises(store_mod.OutOfPages):
        store.reserve([a, b], 200)
    unchanged()
    with pytest.raises(store_mod.OutOfPages):
        store.append(1, [a], torch.zeros(1, Hk, 500, D), torch.zeros(1, Hk, 500, D))
    unchanged()
    # freeing a makes room
    store.free_sequence(a)
    store.prefill_chunk(0, b, k, v)
    assert store.lengths(0, b) == [80, 80]


# -- snapshots -------------------------------------------------------------------------------


def test_snapshot_restore_ask_many():
    dtype = torch.float32
    store = _store(dtype)
    other = store.add_sequence()
    _prefill(store, other, _prompt(50, dtype, seed=4), "ada_snapkv", chunk=12)
    seq = store.add_sequence()
    prompt = _prompt(64, dtype, seed=5)
    _prefill(store, seq, prompt, "ada_pyramid", chunk=20)
    snap = store.snapshot(seq)
    free0 = store.pages_free
    lens0 = [store.lengths(l, seq) for l in range(LAYERS)]
    other_out = _decode_out(store, [other])
    g = torch.Generator().manual_seed(8)
    questions = [[(_rand((1, Hk, T, D), dtype, g), _rand((1, Hk, T, D), dtype, g),
                   _rand((1, Hq, T, D), dtype, g)) for _ in range(LAYERS)] for T in (13, 21)]

    def ask(qs):
        outs = []
        for l, (kq, vq, qq) in enumerate(qs):
            store.append(l, [seq], kq, vq)
            outs.append(store.attend(l, [seq], qq))
        return outs

    first = []
    for qs in questions:
        store.restore(seq, snap)
        first.append(ask(qs))
    assert store.pages_free < free0
    for qs, exp in zip(questions, first):
        store.restore(seq, snap)
        assert store.pages_free == free0
        assert [store.lengths(l, seq) for l in range(LAYERS)] == lens0
        assert [store.seg_len[l][seq * Hk:(seq + 1) * Hk].tolist()
                for l in range(LAYERS)] == lens0
        got = ask(qs)
        assert all(torch.equal(a, b) for a, b in zip(got, exp))
    store.restore(seq, snap)
    _check_kept(store, seq, prompt, "ada_pyramid")
    assert torch.equal(_decode_out(store, [other]), other_out)
    # a snapshot of a freed sequence does not restore into the slot's next owner
    store.free_sequence(seq)
    again = store.add_sequence()
    assert again == seq
    with pytest.raises(ValueError, match="another sequence"):
        store.restore(again, snap)


# -- growth, validation ----------------------------------------------------------------------


def test_tables_and_slots_grow():
    dtype = torch.float32
    store = _store(dtype, num_pages=600)
    assert store.table_width == 16 and store.max_sequences == 4
    seqs = [store.add_sequence() for _ in range(6)]            # slots double past 4
    assert store.max_sequences == 8 and seqs == list(range(6))
    prompt = _prompt(200, dtype, seed=6)                        # 25 pages > width 16
    _prefill(store, seqs[5], prompt, "snapkv", chunk=64)
    assert store.table_width >= 25
    _check_kept(store, seqs[5], prompt, "snapkv")
    fixed = _store(dtype, num_pages=600, max_pages_per_segment=4, max_sequences=1)
    s = fixed.add_sequence()
    with pytest.raises(RuntimeError, match="max_sequences=1"):
        fixed.add_sequence()
    with pytest.raises(RuntimeError, match="max_pages_per_segment=4"):
        fixed.prefill_chunk(0, s, prompt[0][1][:, :, :40], prompt[0][2][:, :, :40])
    assert fixed.pages_free == 600 and fixed.lengths(0, s) == [0, 0]


def test_validation():
    store = _store(torch.float32)
    s = store.add_sequence()
    with pytest.raises(ValueError, match="dtype"):
        store.prefill_chunk(0, s, torch.zeros(1, Hk, 3, D, dtype=torch.bfloat16),
                            torch.zeros(1, Hk, 3, D, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"\[B=1, Hk=2"):
        store.prefill_chunk(0, s, torch.zeros(1, 3, 3, D), torch.zeros(1, 3, 3, D))
    with pytest.raises(KeyError):
        store.append(0, [5], torch.zeros(1, Hk, 1, D), torch.zeros(1, Hk, 1, D))
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="T must be"):
            store.reserve([s], bad)
    with pytest.raises(RuntimeError, match="before any prompt"):
        store.finish_prefill(0, s, torch.zeros(1, Hq, 1, D), budget=4)
    store.prefill_chunk(0, s, torch.randn(1, Hk, 20, D), torch.randn(1, Hk, 20, D))
    with pytest.raises(ValueError, match="method"):
        store.finish_prefill(0, s, torch.zeros(1, Hq, 8, D), method="nope", budget=4)
    with pytest.raises(ValueError, match="expected min"):
        store.finish_prefill(0, s, torch.zeros(1, Hq, 5, D), budget=4, window=8)
    store.finish_prefill(0, s, torch.randn(1, Hq, 8, D), budget=4, window=8)
    with pytest.raises(RuntimeError, match="already evicted"):
        store.prefill_chunk(0, s, torch.zeros(1, Hk, 1, D), torch.zeros(1, Hk, 1, D))
