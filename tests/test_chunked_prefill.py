"""Chunked prefill through the model (``AdaKVCache.prefill(chunk_size=...)``,
``adakv_ops.hf.generate_chunked``): the kept rows of every layer are those of a one-shot
prefill, for every method, model family and storage, and generation continues identically.

Tiny random-weight models of ``test_hf`` (CPU, float32), batch 2 with left padding.
"""

from __future__ import annotations

import pytest
import torch

from conftest import HAVE_OPS

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

from test_hf import FAMILY_NAMES, STORAGES, make_batch, make_model  # noqa: E402

if HAVE_OPS:
    from adakv_ops.hf import CACHE_KWARG, METHODS, AdaKVCache, generate_chunked


def _rows(cache):
    """Per evicted layer: segment lengths and every segment's K/V rows."""
    return [(l.segment_lengths(), [l.segment_kv(s) for s in range(len(l.segment_lengths()))])
            for l in cache.adakv_layers]


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
        q.prefill(ids, mask, chunk_size=6)
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
