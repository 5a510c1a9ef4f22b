"""The follow-up methods of the eviction policy (criticalkv, ada_criticalkv, defensivekv; SPEC 7)
against the fp64 oracle adakv_ops.reference_followups: the same kept sets on random inputs of
many shapes (GQA, padding, rows that evict nothing, budget 0), and the methods end to end in
the Hugging Face cache (generate on every family, flat == paged storage)."""
from __future__ import annotations

import importlib

import pytest
import torch

from conftest import HAVE_OPS, make_key_start, make_qkv, randn

pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

if HAVE_OPS:
    from adakv_ops.policy import EvictionPolicy

rf = importlib.import_module("adakv_ops.reference_followups")

SHAPES = [  # B, Hq, Hk, N, W, D, C
    (1, 2, 1, 37, 4, 16, 8),
    (3, 4, 2, 61, 8, 16, 12),
    (2, 8, 2, 50, 5, 32, 0),
    (3, 4, 4, 29, 3, 16, 30),      # N <= C + W: nothing evicted
    (2, 6, 3, 80, 16, 16, 20),
]


def _policy_sets(kept, key_start, B, H, N):
    """Kept columns of every segment over all N positions (prefix kept + the valid window)."""
    L = N - kept.window
    out = []
    for b in range(B):
        ks = 0 if key_start is None else int(key_start[b])
        win = list(range(max(ks, L), N))
        for h in range(H):
            n = int(kept.kept_count[b, h])
            out.append(sorted(kept.kept_idx[b, h, :n].tolist() + win))
    return out


def _ref_sets(kept_idx, kept_count):
    flat_i = kept_idx.reshape(-1, kept_idx.shape[-1])
    flat_c = kept_count.reshape(-1)
    return [flat_i[s, : int(flat_c[s])].tolist() for s in range(flat_c.numel())]


def _inputs(shape, seed, padded):
    B, Hq, Hk, N, W, D, C = shape
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, seed)
    wo = randn((24, Hq * D), seed + 1)
    ks = make_key_start(B, N, seed) if padded else None
    return q, k, v, wo, ks


def _oracle(method, q, k, v, wo, C, ks, as_written):
    if method == "defensivekv":   # as_written in float64: the logic, not the bf16 rounding
        s = rf.defensive_scores_ref(q, k, v, wo, C, key_start=ks, as_written=as_written,
                                    compute_dtype=torch.float64)
        return rf.defensive_select_ref(s, C, q.shape[2], key_start=ks, as_written=as_written)
    return rf.criticalkv_ref(q, k, v, wo, C, adaptive=method == "ada_criticalkv", key_start=ks,
                             as_written=as_written)


@pytest.mark.parametrize("as_written", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["criticalkv", "ada_criticalkv", "defensivekv"])
def test_policy_keeps_the_reference_sets(method, shape, padded, as_written):
    B, Hq, Hk, N, W, D, C = shape
    for seed in range(3):
        q, k, v, wo, ks = _inputs(shape, 100 * seed + N, padded)
        kept = EvictionPolicy(method=method, budget=C, window=W, as_written=as_written).keep(
            q, k, C, key_start=ks, value=v, o_proj_weight=wo)
        want = _oracle(method, q, k, v, wo, C, ks, as_written)
        got = _policy_sets(kept, ks, B, Hk, N)
        assert got == _ref_sets(*want), (method, shape, seed)
        # the segment capacities sum to Hk * C (Hk * (C + W) as written) per row: a static
        # flat-cache size
        assert kept.budgets.sum(dim=1).tolist() == [Hk * (C + (W if as_written else 0))] * B
        assert kept.window == (0 if as_written else W)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shape", SHAPES + [(2, 16, 2, 300, 32, 64, 50)])
def test_as_written_defensivekv_scores_in_the_model_dtype(shape, padded, dtype):
    """A 16-bit model's as_written DefensiveKV computes in that dtype as the authors' code does
    (D11): the scores equal the oracle's low-precision form exactly (every value a value of the
    dtype), and the kept sets are the oracle's."""
    B, Hq, Hk, N, W, D, C = shape
    for seed in range(2):
        q, k, v, wo, ks = _inputs(shape, 100 * seed + N + 7, padded)
        q, k, v, wo = (x.to(dtype) for x in (q, k, v, wo))
        pol = EvictionPolicy(method="defensivekv", budget=C, window=W, as_written=True)
        got = pol.defensive_scores(q, k, v, wo, C, ks)
        want = rf.defensive_scores_ref(q, k, v, wo, C, key_start=ks, as_written=True,
                                       compute_dtype=dtype)
        assert got.dtype == torch.float32
        assert torch.equal(got.double(), want), (shape, seed)
        fin = torch.isfinite(got)
        assert torch.equal(got[fin], got[fin].to(dtype).float())
        kept = pol.keep(q, k, C, key_start=ks, value=v, o_proj_weight=wo)
        ref = rf.defensive_select_ref(want, C, W, key_start=ks, as_written=True)
        assert _policy_sets(kept, ks, B, Hk, N) == _ref_sets(*ref), (shape, seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shape", SHAPES + [(2, 16, 2, 300, 32, 64, 50)])
@pytest.mark.parametrize("method", ["criticalkv", "ada_criticalkv"])
def test_as_written_criticalkv_in_the_model_dtype(method, shape, padded, dtype):
    """A 16-bit model's as_written CriticalKV forms compute the base score, the value weight
    and the stage-2 product in that dtype (D11): the base scores equal the oracle's
    low-precision ones exactly and the kept sets are the oracle's."""
    from adakv_ops.policy import _critical_base_model_dtype
    B, Hq, Hk, N, W, D, C = shape
    for seed in range(2):
        q, k, v, wo, ks = _inputs(shape, 100 * seed + N + 11, padded)
        q, k, v, wo = (x.to(dtype) for x in (q, k, v, wo))
        base = _critical_base_model_dtype(q, k, ks, None)
        want = rf.criticalkv_base_scores_ref(q, k, ks, compute_dtype=dtype)[..., :N - W]
        assert base.dtype == dtype
        assert torch.equal(base.double(), want), (shape, seed)
        kept = EvictionPolicy(method=method, budget=C, window=W, as_written=True).keep(
            q, k, C, key_start=ks, value=v, o_proj_weight=wo)
        ref = rf.criticalkv_ref(q, k, v, wo, C, adaptive=method == "ada_criticalkv",
                                key_start=ks, as_written=True, compute_dtype=dtype)
        assert _policy_sets(kept, ks, B, Hk, N) == _ref_sets(*ref), (method, shape, seed)


def test_as_written_model_dtype_rows_without_a_prefix():
    """Rows whose prefix is all padding (or missing) are not scored: the oracle's result."""
    B, Hq, Hk, N, W, D, C = 3, 4, 2, 40, 6, 16, 5
    q, k, v = [x.bfloat16() for x in make_qkv(B, Hq, Hk, N, W, D, 5)]
    wo = randn((24, Hq * D), 6).bfloat16()
    ks = torch.tensor([0, N - W, N - 2], dtype=torch.int32)
    pol = EvictionPolicy(method="defensivekv", budget=C, window=W, as_written=True)
    got = pol.defensive_scores(q, k, v, wo, C, ks)
    want = rf.defensive_scores_ref(q, k, v, wo, C, key_start=ks, as_written=True)
    assert torch.equal(got.double(), want)


@pytest.mark.parametrize("method", ["criticalkv", "ada_criticalkv", "defensivekv"])
def test_as_written_model_dtype_refused_under_tensor_parallelism(method):
    q, k, v = [x.bfloat16() for x in make_qkv(1, 2, 1, 30, 4, 16, 0)]
    wo = randn((24, 2 * 16), 1).bfloat16()
    pol = EvictionPolicy(method=method, budget=4, window=4, as_written=True)
    with pytest.raises(NotImplementedError, match="tensor parallelism"):
        pol.keep(q, k, 4, value=v, o_proj_weight=wo, shards=object())


def test_policy_needs_values_and_o_proj():
    q, k, v = make_qkv(1, 2, 1, 20, 4, 16, 0)
    for method in ("criticalkv", "ada_criticalkv", "defensivekv"):
        p = EvictionPolicy(method=method, budget=4, window=4)
        assert p.needs_values and p.fixed_size
        with pytest.raises(ValueError, match="needs the layer's values and o_proj"):
            p.keep(q, k, 4, value=v)


# -- the Hugging Face cache -------------------------------------------------------------------

@pytest.mark.parametrize("method", ["criticalkv", "ada_criticalkv", "defensivekv",
                                    "layer_defensivekv"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_generate_with_the_followup_methods(family, method):
    pytest.importorskip("transformers")
    from test_hf import generate, make_batch, make_model

    from adakv_ops.hf import AdaKVCache
    model = make_model(family)
    ids, mask = make_batch(3, 44)
    outs = {}
    for storage in ("flat", "paged"):
        cache = AdaKVCache(model, method=method, budget=8, window=4, storage=storage)
        outs[storage] = generate(model, ids, mask, cache, n=6)
        lens = [l.segment_lengths() for l in cache.adakv_layers]
        outs[storage + "_lens"] = lens
    assert torch.equal(outs["flat"], outs["paged"])
    assert outs["flat_lens"] == outs["paged_lens"]
    with pytest.raises(NotImplementedError, match="max_growth"):
        AdaKVCache(model, method=method, budget=8, window=4, max_growth=16)


def test_cache_keeps_the_reference_rows():
    """One layer of a real forward: the rows the cache keeps are the oracle's."""
    pytest.importorskip("transformers")
    from test_hf import make_batch, make_model
    from transformers import DynamicCache

    from adakv_ops.hf import AdaKVCache, QueryRecorder, cache_kwarg
    model = make_model("llama")
    ids, mask = make_batch(2, 40, pads=(0, 6))
    full = DynamicCache()
    with torch.no_grad(), QueryRecorder(model, window=4) as rec:
        model(input_ids=ids, attention_mask=mask, **cache_kwarg(full), use_cache=True)
    ks = (mask == 0).sum(-1).to(torch.int32)
    for method in ("ada_criticalkv", "defensivekv"):
        cache = AdaKVCache(model, method=method, budget=7, window=4, storage="paged")
        cache.evict_from(full, rec.windows, attention_mask=mask)
        for i, layer in enumerate(cache.adakv_layers):
            k, v = full.layers[i].keys, full.layers[i].values
            wo = model.model.layers[i].self_attn.o_proj.weight.detach()
            q = rec.windows[i][:, :, -4:]
            if method == "defensivekv":
                want = rf.defensivekv_ref(q, k, v, wo, 7, key_start=ks)
            else:
                want = rf.criticalkv_ref(q, k, v, wo, 7, key_start=ks)
            sets = _ref_sets(*want)
            for s, cols in enumerate(sets):
                got_k, _ = layer.segment_kv(s)
                torch.testing.assert_close(got_k, k[s // k.shape[1], s % k.shape[1], cols],
                                           atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("as_written", [False, True])
@pytest.mark.parametrize("storage", ["flat", "paged"])
def test_layer_defensivekv_keeps_the_global_top_k(storage, as_written):
    """The cascade in the cache (re-trims of earlier layers included) keeps exactly the
    unbounded global top-k over all layers of the oracle, for one-shot and chunked prefill."""
    pytest.importorskip("transformers")
    from test_hf import make_batch, make_model, positions
    from transformers import DynamicCache

    from adakv_ops.hf import AdaKVCache, QueryRecorder, cache_kwarg
    model = make_model("llama")
    ids, mask = make_batch(2, 40, pads=(0, 6))
    full = DynamicCache()
    with torch.no_grad(), QueryRecorder(model, window=4) as rec:   # prefill's positions
        model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
              **cache_kwarg(full), use_cache=True)
    ks = (mask == 0).sum(-1).to(torch.int32)
    C = 5
    layer_scores = []
    for i in range(len(full.layers)):
        k, v = full.layers[i].keys, full.layers[i].values
        wo = model.model.layers[i].self_attn.o_proj.weight.detach()
        layer_scores.append(rf.defensive_scores_ref(rec.windows[i][:, :, -4:], k, v, wo, C,
                                                    key_start=ks, as_written=as_written,
                                                    compute_dtype=torch.float64))
    want = rf.layer_defensive_select_ref(layer_scores, C, 4, key_start=ks, as_written=as_written)
    caches = []
    kw = dict(method="layer_defensivekv", budget=C, window=4, storage=storage,
              as_written=as_written)
    one = AdaKVCache(model, **kw)
    one.evict_from(full, rec.windows, attention_mask=mask)
    caches.append(one)
    pre = AdaKVCache(model, **kw)
    pre.prefill(ids, mask)
    caches.append(pre)
    ch = AdaKVCache(model, **kw)
    ch.prefill(ids, mask, chunk_size=9)
    caches.append(ch)
    H = full.layers[0].keys.shape[1]
    for cache in caches:
        total = 0
        for i, layer in enumerate(cache.adakv_layers):
            k = full.layers[i].keys
            sets = _ref_sets(want.kept_idx[i], want.kept_count[i])
            assert layer.segment_lengths() == [len(c) for c in sets]
            for s, cols in enumerate(sets):
                got_k, _ = layer.segment_kv(s)
                torch.testing.assert_close(got_k, k[s // H, s % H, cols], atol=1e-5, rtol=1e-5)
            total += sum(len(c) for c in sets)
        # every row keeps n_layers * H * C prefix rows + its windows (n_layers * H * (C + W)
        # rows in all, as written)
        n_l = len(cache.adakv_layers)
        assert total == sum(n_l * H * (C + min(4, 40 - int(k0))) for k0 in ks)
        if not as_written:     # every head keeps its window: no segment empty
            assert min(min(l.segment_lengths()) for l in cache.adakv_layers) >= 4


@pytest.mark.parametrize("storage", ["flat", "paged"])
def test_layer_defensivekv_as_written_in_a_bf16_model(storage):
    """A bf16 model's as_written Layer-DefensiveKV scores in bf16 (D11) in the cache: its kept
    rows are the oracle's global top-k over the layers' bf16 scores."""
    pytest.importorskip("transformers")
    from test_hf import make_batch, make_model, positions
    from transformers import DynamicCache

    from adakv_ops.hf import AdaKVCache, QueryRecorder, cache_kwarg
    model = make_model("llama").to(torch.bfloat16)
    ids, mask = make_batch(2, 40, pads=(0, 6))
    full = DynamicCache()
    with torch.no_grad(), QueryRecorder(model, window=4) as rec:
        model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
              **cache_kwarg(full), use_cache=True)
    ks = (mask == 0).sum(-1).to(torch.int32)
    C = 5
    layer_scores = [rf.defensive_scores_ref(rec.windows[i][:, :, -4:], full.layers[i].keys,
                                            full.layers[i].values,
                                            model.model.layers[i].self_attn.o_proj.weight.detach(),
                                            C, key_start=ks, as_written=True)
                    for i in range(len(full.layers))]
    want = rf.layer_defensive_select_ref(layer_scores, C, 4, key_start=ks, as_written=True)
    cache = AdaKVCache(model, method="layer_defensivekv", budget=C, window=4, storage=storage,
                       as_written=True)
    cache.evict_from(full, rec.windows, attention_mask=mask)
    H = full.layers[0].keys.shape[1]
    for i, layer in enumerate(cache.adakv_layers):
        sets = _ref_sets(want.kept_idx[i], want.kept_count[i])
        assert layer.segment_lengths() == [len(c) for c in sets], i
        for s, cols in enumerate(sets):
            got_k, _ = layer.segment_kv(s)
            assert torch.equal(got_k, full.layers[i].keys[s // H, s % H, cols]), (i, s)


def test_generate_as_written_forms():
    """The authors' forms run end to end (flat == paged); as_written refused elsewhere."""
    pytest.importorskip("transformers")
    from test_hf import generate, make_batch, make_model

    from adakv_ops.hf import AdaKVCache
    model = make_model("qwen2")
    ids, mask = make_batch(2, 38)
    for method in ("criticalkv", "ada_criticalkv", "defensivekv", "layer_defensivekv"):
        outs = [generate(model, ids, mask, AdaKVCache(model, method=method, budget=6, window=4,
                                                      storage=st, as_written=True), n=5)
                for st in ("flat", "paged")]
        assert torch.equal(outs[0], outs[1]), method
    with pytest.raises(ValueError, match="as_written applies to"):
        AdaKVCache(model, method="ada_snapkv", as_written=True)


def test_layer_defensivekv_prefill_holds_at_most_the_final_cache():
    """Bounded memory (SPEC 7.3): during a one-shot prefill the store never holds more rows
    than the final cache (pages: + one partly filled page per segment), far below the
    unbounded version's every layer's full cache; defensivekv holds the same."""
    pytest.importorskip("transformers")
    from test_hf import make_batch, make_model

    from adakv_ops.hf import AdaKVCache
    model = make_model("llama")                     # 4 layers, 2 KV heads
    ids, mask = make_batch(2, 90, pads=(0, 9))
    P = 4
    for method in ("layer_defensivekv", "defensivekv"):
        cache = AdaKVCache(model, method=method, budget=6, window=4, page_size=P)
        cache.prefill(ids, mask)
        st = cache.pool.store
        segments = sum(len(l.segment_lengths()) for l in cache.adakv_layers)
        rows = sum(sum(l.segment_lengths()) for l in cache.adakv_layers)
        assert st.pages_used <= rows / P + segments
        assert st.peak_pages_used <= rows / P + segments, (method, st.peak_pages_used)
        full_pages = segments * -(-90 // P)
        assert st.peak_pages_used < full_pages / 4


@pytest.mark.parametrize("method", ["ada_criticalkv", "defensivekv", "layer_defensivekv"])
def test_engine_serves_the_followup_methods(method):
    """Continuous batching with the follow-ups: requests joining mid-run (prefilled alone into
    the shared store; layer_defensivekv re-trims only the joining row's earlier layers) get
    exactly the greedy tokens they get alone; every page comes back."""
    pytest.importorskip("transformers")
    from test_hf import make_model
    from test_serve import _alone, _prompts

    from adakv_ops.serve import Engine
    model = make_model("llama")
    prompts = _prompts(5, seed=4, lo=15, hi=45)
    news = [6, 3, 8, 5, 4]
    kw = dict(method=method, budget=6, window=4, page_size=4)
    eng = Engine(model, num_pages=4000, max_batch=3, chunk_size=8, **kw)
    rids = [eng.add_request(prompts[i], news[i]) for i in range(2)]
    eng.step()
    rids += [eng.add_request(prompts[i], news[i]) for i in range(2, 5)]
    eng.run()
    for rid, p, n in zip(rids, prompts, news):
        assert eng.result(rid) == _alone(model, p, n, chunk=8, **kw), (method, rid)
    assert eng.pages_free == 4000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("method", ["ada_criticalkv", "defensivekv"])
def test_cuda_policy_keeps_the_cpu_sets(method):
    from adakv_ops.cascade import LayerCascade
    shape = (3, 4, 2, 61, 8, 16, 12)
    B, Hq, Hk, N, W, D, C = shape
    q, k, v, wo, ks = _inputs(shape, 11, True)
    pol = EvictionPolicy(method=method, budget=C, window=W)
    cpu = pol.keep(q, k, C, key_start=ks, value=v, o_proj_weight=wo)
    gpu = pol.keep(q.cuda(), k.cuda(), C, key_start=ks.cuda(), value=v.cuda(),
                   o_proj_weight=wo.cuda())
    assert torch.equal(gpu.kept_count.cpu(), cpu.kept_count)
    assert torch.equal(gpu.kept_idx.cpu(), cpu.kept_idx)
    if method == "defensivekv":          # and the cascade on the device
        a = pol.keep_layer(LayerCascade(1, C), q, k, v, wo, C, ks)[0]
        g = pol.keep_layer(LayerCascade(1, C), q.cuda(), k.cuda(), v.cuda(), wo.cuda(), C,
                           ks.cuda())[0]
        assert torch.equal(g.kept_idx.cpu(), a.kept_idx)
