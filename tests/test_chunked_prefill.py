"""Chunked prefill through the model (``AdaKVCache.prefill(chunk_size=...)``,
``adakv_ops.hf.generate_chunked``): the kept rows of every layer are those of a one-shot
prefill, for every method, model family and storage, and generation continues identically.
Both orders: chunk-major (each chunk through the model; padded batches, sliding layers) and
layer-major (the cache runs one decoder layer's chunks at a time; unpadded prompts), which
gives the chunk-major logits and rows bit for bit and never holds more than one layer's raw
prompt (never in pages).

Tiny random-weight models of ``test_hf`` (CPU, float32), batch 2 with left padding, or
unpadded batches of 1 and 2.
"""

from __future__ import annotations

import pytest
import torch

from conftest import HAVE_OPS

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

from test_hf import COMMON, FAMILY_NAMES, STORAGES, make_batch, make_model  # noqa: E402
from test_hf import _one_thread  # noqa: E402,F401  (autouse: one thread for tiny matmuls)

if HAVE_OPS:
    from adakv_ops.hf import CACHE_KWARG, METHODS, AdaKVCache, generate_chunked

#: the families whose every layer is evicted (layer-major applies to their unpadded prompts)
ALL_FULL = [f for f in FAMILY_NAMES if f != "gemma3"]


def _rows(cache):
    """Per evicted layer: segment lengths and every segment's K/V rows."""
    return [(l.segment_lengths(), [l.segment_kv(s) for s in range(len(l.segment_lengths()))])
            for l in cache.adakv_layers]


def _assert_identical_rows(a, b):
    """The same rows bit for bit (two chunked orders: the same arithmetic)."""
    for (la, kva), (lb, kvb) in zip(_rows(a), _rows(b), strict=True):
        assert la == lb
        for (ka, va), (kb, vb) in zip(kva, kvb):
            assert torch.equal(ka, kb) and torch.equal(va, vb)


def _assert_same_rows(a, b):
    for (la, kva), (lb, kvb) in zip(_rows(a), _rows(b)):
        assert la == lb                                  # the same number of rows per head
        for (ka, va), (kb, vb) in zip(kva, kvb):         # ... and the same rows
            torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_chunked_prefill_keeps_the_one_shot_rows(family, method, storage):
    model = make_model(family)
    ids, mask = make_batch(2, 45, pads=(0, 7))
    kw = dict(method=method, budget=10, window=6, storage=storage, page_size=4)
    one = AdaKVCache(model, **kw)
    ref = one.prefill(ids, mask).logits
    for chunk in (7, 16):
        cache = AdaKVCache(model, **kw)
        out = cache.prefill(ids, mask, chunk_size=chunk).logits
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        assert cache.get_seq_length() == 45
        assert cache.layer_budgets == one.layer_budgets
        assert all(l.held == 0 and l.evicted for l in cache.adakv_layers)
        _assert_same_rows(cache, one)
        if storage == "paged":   # the raw prompt pages are all back: only the kept rows
            st = cache.pool.store
            assert st.pages_used == sum(-(-n // 4) for l in cache.adakv_layers
                                        for n in l.segment_lengths())


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generate_chunked_matches_generate(family, storage):
    model = make_model(family)
    ids, mask = make_batch(2, 40, pads=(0, 5))
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=10, min_new_tokens=10,
                             **{CACHE_KWARG: AdaKVCache(model, budget=8, window=4,
                                                        storage=storage)})
    for chunk in (1, 9, 40):
        cache = AdaKVCache(model, budget=8, window=4, storage=storage)
        out = generate_chunked(model, cache, ids, mask, prefill_chunk_size=chunk,
                               max_new_tokens=10, min_new_tokens=9)
        assert torch.equal(out, ref), chunk
        assert cache.get_seq_length() == 40 + 10 - 1


def test_chunk_attention_sees_the_prompt_so_far():
    # a chunked prefill with a budget that keeps everything gives the full-cache logits
    model = make_model("qwen3")
    ids, mask = make_batch(2, 33, pads=(0, 4))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits[:, -1:]
    for storage in STORAGES:
        cache = AdaKVCache(model, budget=64, window=4, storage=storage)
        out = cache.prefill(ids, mask, chunk_size=5).logits
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_arguments():
    model = make_model("llama")
    ids, mask = make_batch(1, 20)
    cache = AdaKVCache(model, budget=8, window=4)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            cache.prefill(ids, mask, chunk_size=bad)
    cache.prefill(ids, mask, chunk_size=6)
    with pytest.raises(RuntimeError, match="empty cache"):
        cache.compress(ids, mask)
    flat = AdaKVCache(model, budget=8, window=4, storage="flat")
    flat.prefill(ids, mask)
    with pytest.raises(RuntimeError, match="needs storage='paged'"):
        flat.prefill(ids, mask)
    q = AdaKVCache(model, budget=8, window=4, per_query_head=True)
    with pytest.raises(NotImplementedError, match="per_query_head"):
        q.prefill(ids, mask, chunk_size=6, order="chunk")   # the store holds Hk raw heads
    q = AdaKVCache(model, budget=8, window=4, per_query_head=True)
    q.prefill(ids, mask, chunk_size=6)       # layer-major: the layer's own buffer, then Hq heads
    one = AdaKVCache(model, budget=8, window=4, per_query_head=True)
    one.prefill(ids, mask)
    _assert_same_rows(q, one)
    flat = AdaKVCache(model, budget=8, window=4, per_query_head=True, storage="flat")
    flat.prefill(ids, mask, chunk_size=6)       # the flat storage holds the raw chunks itself
    one = AdaKVCache(model, budget=8, window=4, per_query_head=True, storage="flat")
    one.prefill(ids, mask)
    _assert_same_rows(flat, one)
    with pytest.raises(NotImplementedError, match="greedy"):
        generate_chunked(model, AdaKVCache(model, budget=8, window=4), ids, mask,
                         prefill_chunk_size=4, max_new_tokens=3, do_sample=True)


@pytest.mark.parametrize("method", ["ada_snapkv", "streaming", "ada_pyramid", "full"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prompts_prefilled_one_at_a_time_into_one_store(family, method):
    """Rows added by prefill() on a filled (paged) cache: each prompt with its own length, no
    padding held; the same rows and the same decode logits as one left-padded batch."""
    model = make_model(family)
    ids, mask = make_batch(3, 40, pads=(0, 9, 3))
    kw = dict(method=method, budget=10, window=6, page_size=4)
    batched = AdaKVCache(model, **kw)
    batched.prefill(ids, mask)
    one = AdaKVCache(model, max_batch=3, **kw)
    for b, chunk in zip(range(3), (None, 5, 16)):
        n_pad = int((mask[b] == 0).sum())
        one.prefill(ids[b:b + 1, n_pad:], chunk_size=chunk)       # no padding at all
    assert one.get_seq_length() == 40
    _assert_same_rows(one, batched)
    if method == "full":   # only the real tokens are held: 40 + 31 + 37 per head and layer
        assert [l.segment_lengths() for l in one.adakv_layers][0] == [40, 40, 31, 31, 37, 37]
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -1:] + 1
    tok = torch.randint(2, 128, (3, 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for i in range(4):
            la = model(input_ids=tok, position_ids=pos + i, use_cache=True, **{CACHE_KWARG: batched}).logits
            lb = model(input_ids=tok, position_ids=pos + i, use_cache=True, **{CACHE_KWARG: one}).logits
            torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
            tok = la[:, -1:].argmax(-1)
    with pytest.raises(RuntimeError, match="max_batch=3"):
        one.prefill(ids[:1])
    gem = make_model("gemma3")
    c = AdaKVCache(gem, budget=8, window=4)
    c.prefill(ids[:1])
    with pytest.raises(NotImplementedError, match="sliding-window"):
        c.prefill(ids[1:2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cuda_paged_cache_matches_flat_and_chunked_matches_one_shot(family):
    """On the CUDA kernels: paged == flat generate outputs; chunked == one-shot rows (fp32)."""
    model = make_model(family).cuda()
    ids, mask = make_batch(3, 70, pads=(0, 9, 2))
    ids, mask = ids.cuda(), mask.cuda()
    outs = {}
    for storage in STORAGES:
        with torch.no_grad():
            outs[storage] = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                min_new_tokens=12,
                **{CACHE_KWARG: AdaKVCache(model, budget=12, window=6, storage=storage)})
    assert torch.equal(outs["paged"], outs["flat"])
    for method in ("ada_snapkv", "streaming", "full"):
        one = AdaKVCache(model, method=method, budget=12, window=6, page_size=16)
        one.prefill(ids, mask)
        ch = AdaKVCache(model, method=method, budget=12, window=6, page_size=16)
        ch.prefill(ids, mask, chunk_size=17)
        _assert_same_rows(ch, one)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_unpadded_chunks_attend_without_a_mask(family, method, monkeypatch):
    """Unpadded prompts on an all-full-attention sdpa model: the chunks attend with
    causal_lower_right (the model builds no per-chunk mask); same rows and logits."""
    import adakv_ops.hf.layer as layer_mod

    calls = []
    real = layer_mod._chunk_attention
    monkeypatch.setattr(layer_mod, "_chunk_attention",
                        lambda *a: calls.append(a[0].shape) or real(*a))
    model = make_model(family)
    ids = torch.randint(2, 128, (2, 41), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = model(input_ids=ids).logits[:, -1:]
    one = AdaKVCache(model, method=method, budget=9, window=5)
    one.prefill(ids)
    assert not calls
    cache = AdaKVCache(model, method=method, budget=9, window=5)
    out = cache.prefill(ids, torch.ones_like(ids), chunk_size=10).logits
    assert len(calls) == 5 * len(cache.adakv_layers)           # 5 chunks per layer
    _assert_same_rows(cache, one)
    if method == "full":
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("G", [1, 2, 4])
def test_chunk_attention_reads_the_kv_heads_without_repeating_them(G, monkeypatch):
    """The chunk attention maps query head j to KV head j // G with one SDPA call per group
    member (no repeat_interleave copy of the held prompt): equal to SDPA over repeated K/V,
    also on a view of a longer buffer (the layer-major prompt buffer)."""
    from torch.nn.attention.bias import causal_lower_right

    from adakv_ops.hf.layer import _chunk_attention

    g = torch.Generator().manual_seed(G)
    B, Hk, n, N, D = 2, 3, 5, 17, 16
    q = torch.randn(B, Hk * G, n, D, generator=g)
    kb, vb = torch.randn(2, B, Hk, 40, D, generator=g)
    k, v = kb[:, :, :N], vb[:, :, :N]                  # views, as the layer's buffer gives
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
        attn_mask=causal_lower_right(n, N), scale=0.3).transpose(1, 2)

    def no_repeat(*a, **k):
        raise AssertionError("repeat_interleave called")
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", no_repeat)
    out, _ = _chunk_attention(q, k, v, 0.3)
    assert out.shape == (B, n, Hk * G, D) and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


# -- layer-major order -----------------------------------------------------------------------


def _kept_pages(cache, P=4):
    return sum(-(-n // P) for l in cache.adakv_layers for n in l.segment_lengths())


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ALL_FULL)
def test_layer_major_gives_the_chunk_major_and_one_shot_cache(family, method, storage):
    """Unpadded batches of 1 and 2, chunks that do (15) and do not (7) divide N = 45: the
    layer-major logits and rows are the chunk-major ones bit for bit and the one-shot ones
    (within rounding of the other attention shape); paged, no raw prompt page was ever taken
    (the page watermark is the one-shot prefill's)."""
    model = make_model(family)
    kw = dict(method=method, budget=10, window=6, storage=storage, page_size=4)
    for B in (1, 2):
        ids = torch.randint(2, 128, (B, 45), generator=torch.Generator().manual_seed(B))
        one = AdaKVCache(model, **kw)
        ref = one.prefill(ids).logits
        for chunk in (7, 15):
            lay = AdaKVCache(model, **kw)
            assert lay.prefill_order(45, chunk_size=chunk) == "layer"
            out = lay.prefill(ids, torch.ones_like(ids) if B == 2 else None,
                              chunk_size=chunk).logits
            ch = AdaKVCache(model, **kw)
            out_ch = ch.prefill(ids, chunk_size=chunk, order="chunk").logits
            assert torch.equal(out, out_ch)
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            assert lay.get_seq_length() == 45
            assert lay.layer_budgets == one.layer_budgets == ch.layer_budgets
            assert all(l.held == 0 and l.evicted and l._prompt_buf is None
                       for l in lay.adakv_layers)
            _assert_identical_rows(lay, ch)
            _assert_same_rows(lay, one)
            if storage == "paged":
                st = lay.pool.store
                assert st.pages_used == _kept_pages(lay)
                assert st.peak_pages_used == one.pool.store.peak_pages_used
                if method != "full":      # chunk-major held the raw prompt in pages
                    assert st.peak_pages_used < ch.pool.store.peak_pages_used


@pytest.mark.parametrize("kw", [
    dict(per_query_head=True, storage="flat"), dict(per_query_head=True),
    dict(max_growth=6), dict(rounding="official"), dict(reserve=0, storage="flat"),
    dict(method="layer_defensivekv", as_written=True),
], ids=["qhead_flat", "qhead_paged", "max_growth", "official", "reserve0", "ldkv_as_written"])
def test_layer_major_with_other_settings(kw):
    """Layer-major with the other cache settings: the one-shot rows, and the chunk-major rows
    bit for bit where chunk-major runs (paged per_query_head chunks need layer-major: the
    layer's own buffer holds the K/V heads, the store only the Hq kept heads); decoding goes
    on identically."""
    model = make_model("qwen3")
    ids = torch.randint(2, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    kw = dict(dict(budget=8, window=5, page_size=4), **kw)
    one, lay, ch = (AdaKVCache(model, **kw) for _ in range(3))
    one.prefill(ids)
    lay.prefill(ids, chunk_size=9, order="layer")
    _assert_same_rows(lay, one)
    if kw.get("per_query_head") and kw.get("storage") != "flat":
        with pytest.raises(NotImplementedError, match="per_query_head"):
            ch.prefill(ids, chunk_size=9, order="chunk")
        ch = None
    else:
        ch.prefill(ids, chunk_size=9, order="chunk")
        _assert_identical_rows(lay, ch)
    tok = torch.randint(2, 128, (2, 1), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for i in range(8):                      # max_growth=6: re-evicts on the way
            kwf = dict(input_ids=tok, position_ids=torch.full((2, 1), 40 + i), use_cache=True)
            la = model(**kwf, **{CACHE_KWARG: lay}).logits
            lo = model(**kwf, **{CACHE_KWARG: one}).logits
            torch.testing.assert_close(la, lo, atol=1e-4, rtol=1e-4)
            if ch is not None:
                assert torch.equal(model(**kwf, **{CACHE_KWARG: ch}).logits, la)
            tok = la[:, -1:].argmax(-1)


def test_layer_major_honours_position_ids():
    """position_ids given to prefill (here: per row, stretched / with a gap) are used in
    both orders alike."""
    model = make_model("llama")
    ids = torch.randint(2, 128, (2, 30), generator=torch.Generator().manual_seed(6))
    r = torch.arange(30)
    pos = torch.stack([2 * r, r + 5 * (r >= 15)])
    kw = dict(budget=6, window=4)
    lay, ch, one, plain = (AdaKVCache(model, **kw) for _ in range(4))
    a = lay.prefill(ids, chunk_size=8, position_ids=pos).logits
    b = ch.prefill(ids, chunk_size=8, order="chunk", position_ids=pos).logits
    c = one.prefill(ids, position_ids=pos).logits
    d = plain.prefill(ids, chunk_size=8).logits
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a, d, atol=1e-4)           # the positions made a difference
    _assert_identical_rows(lay, ch)
    _assert_same_rows(lay, one)


def test_layer_major_with_per_layer_type_rope():
    """A Gemma 3 whose every layer is full attention (its RoPE takes the layer type, its
    embedding scales inside embed_tokens): layer-major applies and gives the chunk-major
    cache."""
    cfg = transformers.Gemma3TextConfig(**COMMON, sliding_window=8, query_pre_attn_scalar=24,
                                        layer_types=["full_attention"] * 4)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    ids = torch.randint(2, 128, (1, 33), generator=torch.Generator().manual_seed(7))
    kw = dict(budget=6, window=4)
    lay, ch, one = (AdaKVCache(model, **kw) for _ in range(3))
    assert lay.prefill_order(33, chunk_size=10) == "layer"
    a = lay.prefill(ids, chunk_size=10).logits
    assert torch.equal(a, ch.prefill(ids, chunk_size=10, order="chunk").logits)
    torch.testing.assert_close(a, one.prefill(ids).logits, atol=1e-4, rtol=1e-4)
    _assert_identical_rows(lay, ch)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_chunked_layer_major_matches_generate(family, storage):
    model = make_model(family)
    ids = torch.randint(2, 128, (2, 40), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=10, min_new_tokens=10,
                             **{CACHE_KWARG: AdaKVCache(model, budget=8, window=4,
                                                        storage=storage)})
    for chunk in (1, 9, 40):
        cache = AdaKVCache(model, budget=8, window=4, storage=storage)
        assert cache.prefill_order(40, chunk_size=chunk) == ("one-shot" if chunk == 40
                                                              else "layer")
        out = generate_chunked(model, cache, ids, mask, prefill_chunk_size=chunk,
                               max_new_tokens=10, min_new_tokens=9)
        assert torch.equal(out, ref), chunk


def test_layer_major_refused_where_unsupported_and_auto_falls_back():
    """order='layer' raises a ValueError naming the reason; 'auto' runs chunk-major there
    (still the one-shot rows); one chunk is the one-shot path whatever the order."""
    llama = make_model("llama")
    ids, mask = make_batch(2, 30, pads=(0, 5))
    kw = dict(budget=6, window=4)
    with pytest.raises(ValueError, match="padded"):
        AdaKVCache(llama, **kw).prefill(ids, mask, chunk_size=8, order="layer")
    with pytest.raises(ValueError, match="order must be one of"):
        AdaKVCache(llama, **kw).prefill(ids, mask, chunk_size=8, order="layers")
    with pytest.raises(ValueError, match="forward arguments"):
        AdaKVCache(llama, **kw).prefill(ids[:1], chunk_size=8, order="layer",
                                        output_attentions=False)
    cache = AdaKVCache(llama, **kw)
    assert cache.prefill_order(30, mask, chunk_size=8) == "chunk"
    assert cache.prefill_order(30, mask, chunk_size=30, order="layer") == "one-shot"
    assert cache.prefill_order(30, chunk_size=None, order="layer") == "one-shot"
    cache.prefill(ids, mask, chunk_size=8)                # auto: chunk-major
    one = AdaKVCache(llama, **kw)
    one.prefill(ids, mask)
    _assert_same_rows(cache, one)
    gem = make_model("gemma3")
    with pytest.raises(ValueError, match="sliding-window layers"):
        AdaKVCache(gem, **kw).prefill(ids[:1], chunk_size=8, order="layer")
    g = AdaKVCache(gem, **kw)
    assert g.prefill_order(30, chunk_size=8) == "chunk"
    g.prefill(ids[:1], chunk_size=8)
    g1 = AdaKVCache(gem, **kw)
    g1.prefill(ids[:1])
    _assert_same_rows(g, g1)
    eager = make_model("llama", attn="eager")
    with pytest.raises(ValueError, match="'eager', not 'sdpa'"):
        AdaKVCache(eager, **kw).prefill(ids[:1], chunk_size=8, order="layer")
    assert AdaKVCache(eager, **kw).prefill_order(30, chunk_size=8) == "chunk"


@pytest.mark.parametrize("method", ["ada_snapkv", "layer_defensivekv", "ada_pyramid", "full"])
def test_layer_major_adds_prompts_one_at_a_time(method):
    """Prompts added to a filled paged cache one at a time, layer-major: the rows and decode
    logits of one-shot additions, the rows of chunk-major additions bit for bit, and the page
    watermark of the one-shot additions (no raw page)."""
    model = make_model("llama")
    lens = (40, 31, 37)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(2, 128, (1, n), generator=g) for n in lens]
    kw = dict(method=method, budget=10, window=6, page_size=4, max_batch=3)
    one, lay, ch = (AdaKVCache(model, **kw) for _ in range(3))
    for p, chunk in zip(prompts, (6, 11, 16)):
        one.prefill(p)
        lay.prefill(p, chunk_size=chunk)
        ch.prefill(p, chunk_size=chunk, order="chunk")
    assert lay.get_seq_length() == 40 and lay.batch_size == 3
    _assert_same_rows(lay, one)
    _assert_identical_rows(lay, ch)
    st = lay.pool.store
    assert st.pages_used == _kept_pages(lay)
    assert st.peak_pages_used == one.pool.store.peak_pages_used
    pos = torch.tensor([[n] for n in lens])
    tok = torch.randint(2, 128, (3, 1), generator=g)
    with torch.no_grad():
        for i in range(4):
            la = model(input_ids=tok, position_ids=pos + i, use_cache=True,
                       **{CACHE_KWARG: lay}).logits
            lo = model(input_ids=tok, position_ids=pos + i, use_cache=True,
                       **{CACHE_KWARG: one}).logits
            torch.testing.assert_close(la, lo, atol=1e-4, rtol=1e-4)
            tok = la[:, -1:].argmax(-1)


@pytest.mark.parametrize("storage", STORAGES)
def test_layer_major_holds_one_layer_of_raw_prompt_at_a_time(storage, monkeypatch):
    """The memory bound, instrumented: at every layer update of a layer-major prefill at most
    one layer holds raw prompt K/V, in one contiguous [B, Hk, N, D] buffer allocated once;
    the store holds only what the evicted layers kept (its watermark never passes the final
    kept pages). Chunk-major, for contrast: every layer holds the prompt by the last chunk,
    in pages."""
    from adakv_ops.hf.layer import EvictedLayer

    model = make_model("llama")
    N, chunk, B = 45, 8, 2
    ids = torch.randint(2, 128, (B, N), generator=torch.Generator().manual_seed(12))
    seen = []
    real = EvictedLayer.update

    def spy(self, k, v, *a, **kw):
        out = real(self, k, v, *a, **kw)
        layers = cache.adakv_layers
        holding = [l for l in layers if l.held > 0 or l._prompt_buf is not None]
        bufs = [l._prompt_buf[0] for l in holding if l._prompt_buf is not None]
        st = cache.pool.store if cache.pool is not None else None
        seen.append((len(holding), [(tuple(b.shape), b.data_ptr()) for b in bufs],
                     None if st is None else st.pages_used))
        return out

    monkeypatch.setattr(EvictedLayer, "update", spy)
    cache = AdaKVCache(model, budget=6, window=4, storage=storage, page_size=4)
    cache.prefill(ids, chunk_size=chunk)
    L = len(cache.adakv_layers)
    assert len(seen) == L * -(-N // chunk)
    assert max(n for n, _, _ in seen) == 1
    for i in range(L):       # one buffer per layer, the whole prompt, the same one each chunk
        mine = {b for _, bufs, _ in seen[i * 6:(i + 1) * 6] for b in bufs}
        assert len(mine) == 1 and next(iter(mine))[0] == (B, 2, N, 16)
    if storage == "paged":
        final = cache.pool.store.pages_used
        assert all(p is None or p <= final for _, _, p in seen)
        assert cache.pool.store.peak_pages_used == final
    seen.clear()
    cache = AdaKVCache(model, budget=6, window=4, storage=storage, page_size=4)
    cache.prefill(ids, chunk_size=chunk, order="chunk")
    assert max(n for n, _, _ in seen) == L
    if storage == "paged":
        # every layer held the prompt before the last chunk (40 tokens) in pages at once
        assert cache.pool.store.peak_pages_used >= L * B * 2 * -(-(N - N % chunk) // 4)



def test_engine_admits_with_layer_major_prefill():
    """The serving engine with chunked prefill: admission counts no raw prompt pages where
    its prefill runs layer-major (the raw prompt never enters the pool), and every request
    gets the tokens it gets alone; on an eager model (chunk-major) it still counts them."""
    from test_serve import KW, _alone, _prompts

    from adakv_ops.serve import Engine

    model = make_model("llama")
    prompts = _prompts(5, seed=4, lo=20, hi=40)
    news = [4, 7, 2, 5, 3]
    eng = Engine(model, num_pages=4000, max_batch=3, chunk_size=8, **KW)
    assert eng._page_bounds(30, 5)[1] == 0
    assert eng._page_bounds(8, 5)[1] == 0                     # one chunk: one-shot
    rids = [eng.add_request(p, n) for p, n in zip(prompts, news)]
    peak = 0
    while eng.has_work():
        eng.step()
        peak = max(peak, eng.cache.pool.store.peak_pages_used)
    for rid, p, n in zip(rids, prompts, news):
        assert eng.result(rid) == _alone(model, p, n, chunk=8), rid
    assert eng.pages_free == 4000
    bounds = sum(sorted(eng._requests[r].pages_bound for r in rids)[-3:])
    assert peak <= bounds                      # never more than the kept-row bounds reserve
    eager = Engine(make_model("llama", attn="eager"), num_pages=4000, max_batch=3,
                   chunk_size=8, **KW)
    assert eager._page_bounds(30, 5)[1] == 4 * 2 * 8       # layers x heads x ceil(30 / P)
