"""Tests of ``adakv_ops.hf`` (AdaKVCache) on tiny random-weight transformers models (CPU).

Families: Llama, Mistral, Qwen2, Qwen3, Gemma 3 (text; sliding + full layers). Every model has
4 layers, hidden 64, 4 query heads, 2 KV heads, head dim 16, vocab 128, float32.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from conftest import HAVE_OPS

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

if HAVE_OPS:
    import adakv_ops
    from adakv_ops.hf import STORAGES, AdaKVCache, AdaKVLayer, restore_attention
else:
    STORAGES = ("paged", "flat")

from transformers import DynamicCache  # noqa: E402
from transformers.cache_utils import DynamicSlidingWindowLayer  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=None)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"sliding_window": 8, "query_pre_attn_scalar": 24,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention",
                                "full_attention"]}),
}
FAMILY_NAMES = list(FAMILIES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls: one thread is fastest and immune to other processes on the machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(family: str, attn: str = "sdpa", seed: int = 0):
    cfg_name, model_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**COMMON, **extra)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    return model


def make_batch(B: int, N: int, seed: int = 1, pads=(0, 5, 11)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (B, N), generator=g)
    mask = torch.ones_like(ids)
    for b in range(B):
        p = pads[b % len(pads)]
        ids[b, :p] = 0
        mask[b, :p] = 0
    return ids, mask


def generate(model, ids, mask, cache=None, n=12):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                              max_new_tokens=n, min_new_tokens=n, do_sample=False)


def positions(mask):
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


# ---------------------------------------------------------------------------------------------
# 1. no eviction => exactly the model's own full-cache output


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("method", ["ada_snapkv", "full"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_generate_matches_full_cache(family, B, method, storage):
    model = make_model(family)
    ids, mask = make_batch(B, 30)
    ref = generate(model, ids, mask, DynamicCache(config=model.config), n=12)
    cache = AdaKVCache(model, method=method, budget=64, window=8, storage=storage)
    out = generate(model, ids, mask, cache, n=12)
    assert torch.equal(out, ref)
    # positions continue from the real (padded) prompt length
    assert cache.get_seq_length() == 30 + 12 - 1
    full = [i for i, l in enumerate(cache.layers) if isinstance(l, AdaKVLayer)]
    if family == "gemma3":
        assert full == [1, 3]
        assert all(isinstance(cache.layers[i], DynamicSlidingWindowLayer) for i in (0, 2))
    else:
        assert full == [0, 1, 2, 3]


@pytest.mark.parametrize("kw", [
    dict(method="snapkv"), dict(method="streaming"),
    dict(method="ada_snapkv", per_query_head=True), dict(method="full", per_query_head=True),
    dict(method="ada_snapkv", reserve=0),   # grows 1, 2, 4, ... rows per segment
], ids=["snapkv", "streaming", "ada_per_qhead", "full_per_qhead", "growth"])
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_methods_without_eviction_match_full_cache(family, kw, storage):
    model = make_model(family)
    ids, mask = make_batch(3, 26)
    ref = generate(model, ids, mask, n=16)
    cache = AdaKVCache(model, budget=40, window=6, storage=storage, **kw)
    out = generate(model, ids, mask, cache, n=16)
    assert torch.equal(out, ref)
    if kw.get("reserve") == 0 and storage == "flat":
        # amortised doubling: 15 appended tokens need 1+1+2+4+8 rows of reserve -> 5 repacks
        assert all(l.n_grow == 5 for l in cache.adakv_layers)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_eager_original_implementation(family):
    model = make_model(family, attn="eager")
    ids, mask = make_batch(3, 24)
    ref = generate(model, ids, mask, n=10)
    cache = AdaKVCache(model, budget=32, window=4)
    assert model.config._attn_implementation == "adakv_eager"
    assert torch.equal(generate(model, ids, mask, cache, n=10), ref)
    assert torch.equal(generate(model, ids, mask, n=10), ref)


# ---------------------------------------------------------------------------------------------
# 2. with eviction, every layer holds exactly what the ops compute on its own Q/K/V

_CAPTURED: dict = {}


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _CAPTURED[module.layer_idx] = (query, key, value, kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_capture():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("adakv_test_capture", _capture_attention)
    AttentionMaskInterface.register("adakv_test_capture", sdpa_mask)


def _capture_qkv(model, ids, mask):
    _register_capture()
    _CAPTURED.clear()
    model.set_attn_implementation("adakv_test_capture")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
              past_key_values=DynamicCache(config=model.config), use_cache=True)
    model.set_attn_implementation("sdpa")
    return dict(_CAPTURED)


def _streaming_expected(k, v, ks, C, W, n_sink, R):
    """Independent StreamingLLM layout: sinks + most recent prefix tokens + window."""
    B, H, N, D = k.shape
    L = N - W
    ks_list = ks.tolist()
    seg_k, seg_len, seg_start = [], [], []
    cap = C + W + R
    for b in range(B):
        valid = list(range(ks_list[b], L))
        kept = valid if len(valid) <= C else valid[:n_sink] + valid[len(valid) - (C - n_sink):]
        pos = kept + list(range(max(ks_list[b], L), N))
        for h in range(H):
            seg_start.append((b * H + h) * cap)
            seg_len.append(len(pos))
            seg_k.append(k[b, h, pos])
    return seg_k, torch.tensor(seg_start, dtype=torch.int32), torch.tensor(seg_len,
                                                                           dtype=torch.int32)


EVICT_CASES = [(f, dict(method="ada_snapkv")) for f in FAMILY_NAMES] + [
    ("llama", dict(method="snapkv")),
    ("llama", dict(method="pyramid")),
    ("gemma3", dict(method="ada_pyramid")),
    ("qwen3", dict(method="ada_snapkv", per_query_head=True)),
    ("llama", dict(method="ada_snapkv", pooling="avg", kernel_size=5, rounding="official",
                   alpha=0.5)),
    ("llama", dict(method="streaming", n_sink=3)),
    ("gemma3", dict(method="streaming")),
    ("qwen2", dict(method="full")),
]


@pytest.mark.parametrize("family,kw", EVICT_CASES,
                         ids=[f"{f}-{'-'.join(str(x) for x in kw.values())}"
                              for f, kw in EVICT_CASES])
def test_eviction_matches_ops(family, kw):
    model = make_model(family)
    B, N, C, W, R = 3, 48, 10, 6, 5
    ids, mask = make_batch(B, N)
    captured = _capture_qkv(model, ids, mask)
    cache = AdaKVCache(model, budget=C, window=W, reserve=R, storage="flat", **kw)
    cache.compress(ids, mask)
    ks = (mask.cumsum(-1) == 0).sum(-1).to(torch.int32)
    s = cache.settings
    n_full = len(cache.adakv_layers)
    expected_bytes = 0
    for rank, layer in enumerate(cache.adakv_layers):
        q, k, v, scale = captured[layer.layer_idx]
        Hk, D = k.shape[1], k.shape[3]
        G = q.shape[1] // Hk
        H = Hk * G if s.per_query_head else Hk
        if s.per_query_head:
            k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        Cl = C
        if s.method in ("pyramid", "ada_pyramid"):
            Cl = adakv_ops.pyramid_budgets(C, n_full, N, W)[rank]
        if s.method == "full":
            Cl = N
        assert layer.budget == Cl
        if s.method == "streaming":
            seg_k, seg_start, seg_len = _streaming_expected(k, v, ks, C, W, s.n_sink, R)
            assert torch.equal(layer.seg_start, seg_start)
            assert torch.equal(layer.seg_len, seg_len)
            for i, rows in enumerate(seg_k):
                st = int(seg_start[i])
                assert torch.equal(layer.k_flat[st:st + rows.shape[0]], rows)
        elif s.method == "full":
            # every valid token, in order, then the reserve
            cap = N + R
            for b in range(B):
                for h in range(H):
                    st = (b * H + h) * cap
                    n = N - int(ks[b])
                    assert int(layer.seg_start[b * H + h]) == st
                    assert int(layer.seg_len[b * H + h]) == n
                    assert torch.equal(layer.k_flat[st:st + n], k[b, h, int(ks[b]):])
                    assert torch.equal(layer.v_flat[st:st + n], v[b, h, int(ks[b]):])
        else:
            exp = adakv_ops.evict(q[:, :, N - W:].contiguous(), k.contiguous(), v.contiguous(),
                                  Cl, floor_alpha=s.alpha, pooling=s.pooling,
                                  kernel_size=s.kernel_size, gqa_reduce=s.gqa_reduce,
                                  adaptive=s.method.startswith("ada"), rounding=s.rounding,
                                  reserve=R, key_start=ks, scale=scale)
            for name, got, want in zip(("k_flat", "v_flat", "seg_start", "seg_len"),
                                       (layer.k_flat, layer.v_flat, layer.seg_start,
                                        layer.seg_len), exp):
                assert torch.equal(got, want), f"layer {layer.layer_idx}: {name}"
        rows = layer.k_flat.shape[0]
        if s.method == "full":
            assert rows == B * H * (N + R)
        elif s.rounding == "exact":
            assert rows == B * H * (Cl + W + R)
        expected_bytes += rows * 2 * D * layer.k_flat.element_size()
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer):  # gemma3: bounded, not evicted
            assert layer.keys.shape[2] == 8 - 1
            expected_bytes += layer.keys.nbytes + layer.values.nbytes
    assert cache.kv_bytes() == expected_bytes
    # no full-length tensor survives eviction
    assert all(l._pending is None for l in cache.adakv_layers)


@pytest.mark.parametrize("family,kw", EVICT_CASES,
                         ids=[f"{f}-{'-'.join(str(x) for x in kw.values())}"
                              for f, kw in EVICT_CASES])
def test_paged_storage_holds_the_flat_rows(family, kw):
    """Paged and flat storage keep the same rows of every segment, bit for bit (one policy),
    and the paged store holds only those rows rounded up to pages."""
    model = make_model(family)
    ids, mask = make_batch(3, 48)
    flat = AdaKVCache(model, budget=10, window=6, reserve=5, storage="flat", **kw)
    paged = AdaKVCache(model, budget=10, window=6, reserve=5, storage="paged", page_size=4,
                       **kw)
    flat.compress(ids, mask)
    paged.compress(ids, mask)
    assert paged.layer_budgets == flat.layer_budgets
    for lf, lp in zip(flat.adakv_layers, paged.adakv_layers):
        assert lp.segment_lengths() == lf.segment_lengths()
        for s in range(len(lf.segment_lengths())):
            for a, b in zip(lf.segment_kv(s), lp.segment_kv(s)):
                assert torch.equal(a, b)
        pages = sum(-(-n // 4) for n in lp.segment_lengths())
        assert lp.nbytes() == pages * paged.pool.store.bytes_per_page


@pytest.mark.parametrize("storage", STORAGES)
def test_eviction_reduces_memory_and_still_generates(storage):
    model = make_model("llama")
    ids, mask = make_batch(3, 64)
    full = AdaKVCache(model, method="full", window=8, reserve=16, storage=storage, page_size=8)
    ada = AdaKVCache(model, budget=8, window=8, reserve=16, storage=storage, page_size=8)
    out_full = generate(model, ids, mask, full, n=6)
    out_ada = generate(model, ids, mask, ada, n=6)
    assert out_ada.shape == out_full.shape
    assert ada.kv_bytes() < full.kv_bytes() / 2
    assert ada.get_seq_length() == full.get_seq_length() == 64 + 5


# ---------------------------------------------------------------------------------------------
# 3. a plain cache on the same model behaves exactly as before


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_dynamic_cache_unchanged(family):
    model = make_model(family)
    ids, mask = make_batch(3, 30)
    before = generate(model, ids, mask, n=10)
    with torch.no_grad():
        logits_before = model(input_ids=ids, attention_mask=mask).logits
    cache = AdaKVCache(model, budget=8, window=4)
    generate(model, ids, mask, cache, n=10)   # leaves nothing behind
    assert torch.equal(generate(model, ids, mask, n=10), before)
    assert torch.equal(generate(model, ids, mask, DynamicCache(config=model.config), n=10),
                       before)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits_before)
    # two caches on one model share the mailbox and keep working
    c2 = AdaKVCache(model, budget=8, window=4)
    generate(model, ids, mask, c2, n=4)
    restore_attention(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(generate(model, ids, mask, n=10), before)


# ---------------------------------------------------------------------------------------------
# 4. question-agnostic: compress once, answer several questions


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_compressed_context_reuse(family, storage):
    model = make_model(family)
    ctx, cmask = make_batch(2, 40, seed=3, pads=(0, 7))
    g = torch.Generator().manual_seed(5)
    questions = [torch.randint(2, 128, (2, 6), generator=g) for _ in range(2)]

    def ask(cache, q, n=10):
        ids = torch.cat([ctx, q], 1)
        mask = torch.cat([cmask, torch.ones_like(q)], 1)
        out = generate(model, ids, mask, cache, n=n)
        return out[:, ids.shape[1]:]

    cache = AdaKVCache(model, budget=12, window=4, reserve=4, storage=storage)
    cache.compress(ctx, cmask)

    def state(c):
        return [(l.segment_lengths(), [tuple(t.clone() for t in l.segment_kv(s))
                                       for s in range(len(l.segment_lengths()))])
                for l in c.adakv_layers]

    before = state(cache)
    pages = cache.pool.store.pages_used if storage == "paged" else None
    answers = []
    for q in [questions[0], questions[1], questions[0], questions[1]]:
        with cache.reuse():
            answers.append(ask(cache, q))
        assert cache.get_seq_length() == 40
        after = state(cache)          # the compressed context is unchanged
        for (la, kva), (lb, kvb) in zip(before, after):
            assert la == lb
            assert all(torch.equal(x, y) for a, b in zip(kva, kvb) for x, y in zip(a, b))
        if storage == "paged":        # the answer's pages went back to the free list
            assert cache.pool.store.pages_used == pages
    assert torch.equal(answers[0], answers[2])
    assert torch.equal(answers[1], answers[3])
    if storage == "flat":
        assert any(l.n_grow > 0 for l in cache.adakv_layers)  # the answers grew the cache
    # same answer as a fresh compression answering directly
    fresh = AdaKVCache(model, budget=12, window=4, reserve=4, storage=storage)
    fresh.compress(ctx, cmask)
    assert torch.equal(ask(fresh, questions[1]), answers[1])
    # with a budget that keeps everything, the answer is the full-cache answer
    big = AdaKVCache(model, budget=64, window=4, storage=storage)
    big.compress(ctx, cmask)
    snap = big.snapshot()
    for q in questions:
        ref = ask(DynamicCache(config=model.config), q)
        assert torch.equal(ask(big, q), ref)
        big.restore(snap)


@pytest.mark.parametrize("change", ["prefill", "fork", "remove", "remove_then_prefill", "reset"])
def test_restore_refuses_a_batch_whose_rows_changed_and_changes_nothing(change):
    """A snapshot restores the batch it recorded: after a row joined, left or was forked (or a
    ``reset``) ``restore`` raises before touching anything, and the cache decodes as if it had
    not been called (a half-restored batch would mix two states)."""
    model = make_model("llama")
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randint(2, 128, (1, n), generator=g) for n in (33, 41, 20))
    kw = dict(method="ada_snapkv", budget=10, window=6, page_size=4, max_batch=4)
    cache, ref = AdaKVCache(model, **kw), AdaKVCache(model, **kw)
    snap = None
    for x in (cache, ref):
        x.prefill(a)
        x.prefill(b)
        if x is cache:
            snap = cache.snapshot()
        if change == "prefill":
            x.prefill(c)
        elif change == "fork":
            x.fork_rows([0])
        elif change == "remove":
            x.remove_rows([0])
        elif change == "remove_then_prefill":     # the new row takes the freed slot's id
            x.remove_rows([1])
            x.prefill(c)
        else:
            x.reset()
            x.prefill(c)
    with pytest.raises(ValueError, match="rows changed|another sequence"):
        cache.restore(snap)
    from adakv_ops.hf import CACHE_KWARG
    B = cache.batch_size
    tok, pos = torch.full((B, 1), 7), torch.full((B, 1), 60)
    with torch.no_grad():
        got, want = (model(input_ids=tok, position_ids=pos, use_cache=True,
                           **{CACHE_KWARG: x}).logits for x in (cache, ref))
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# 5. decode-time re-eviction keeps the cache bounded


class _Recorder(transformers.LogitsProcessor):
    def __init__(self, cache):
        self.cache, self.bytes, self.max_len = cache, [], []

    def __call__(self, input_ids, scores):
        self.bytes.append(self.cache.kv_bytes())
        self.max_len.append(max(max(l.segment_lengths()) for l in self.cache.adakv_layers))
        return scores


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("method", ["ada_snapkv", "snapkv", "ada_pyramid", "streaming"])
def test_reeviction_bounded(method, storage):
    model = make_model("llama")
    ids, mask = make_batch(2, 40, pads=(0, 6))
    C, W, M = 8, 4, 8
    cache = AdaKVCache(model, method=method, budget=C, window=W, max_growth=M, storage=storage)
    rec = _Recorder(cache)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                       max_new_tokens=60, min_new_tokens=60, do_sample=False,
                       logits_processor=transformers.LogitsProcessorList([rec]))
    # a head keeps at most all the Hk * C_l winners of its layer (Ada), plus window and growth
    bound = 2 * max(cache.layer_budgets.values()) + W + M
    assert max(rec.max_len) <= bound
    assert all(l.n_reevict >= 6 and l.n_grow == 0 for l in cache.adakv_layers)
    assert cache.get_seq_length() == 40 + 59
    if storage == "flat":
        assert len(set(rec.bytes)) == 1                  # storage never grows
        for l in cache.adakv_layers:
            assert l.k_flat.shape[0] == 2 * 2 * (l.budget + W + M)
    else:                                                # pages held stay bounded too
        st = cache.pool.store
        segs = 2 * 2 * len(cache.adakv_layers)
        assert max(rec.bytes) <= segs * -(-bound // st.page_size) * st.bytes_per_page


@pytest.mark.parametrize("storage", STORAGES)
def test_reeviction_lossless_when_budget_covers_everything(storage):
    # Re-evicting with a budget larger than every segment keeps every token: the repacked
    # cache must give exactly the full-cache output.
    model = make_model("qwen2")
    ids, mask = make_batch(3, 20)
    ref = generate(model, ids, mask, n=40)
    cache = AdaKVCache(model, budget=100, window=4, max_growth=8, storage=storage)
    assert torch.equal(generate(model, ids, mask, cache, n=40), ref)
    assert all(l.n_reevict >= 4 for l in cache.adakv_layers)


# ---------------------------------------------------------------------------------------------
# 6. torch.compile: the decode step, and the model's decode forward, without graph breaks


def _compressed(family="llama", B=2, N=40, model=None, **kw):
    model = make_model(family) if model is None else model
    ids, mask = make_batch(B, N, pads=(0, 5))
    cache = AdaKVCache(model, budget=12, window=4, reserve=16, **kw)
    out = cache.compress(ids, mask)
    return model, cache, mask, out.logits[:, -1:].argmax(-1)


@pytest.mark.parametrize("storage", STORAGES)
def test_decode_step_compiles_fullgraph(storage):
    import torch._dynamo.testing

    _, cache, _, _ = _compressed(storage=storage)
    cache.ensure_capacity(1)          # paged: the page for the appended row is handed out
    layer = cache.adakv_layers[1]
    B, Hq, Hk, D = 2, 4, 2, 16

    def step(layer, q, k, v):
        layer.append(k, v)
        return layer.attend(q, 0.25)

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    snap = cache.snapshot()           # (the ops alone do no host accounting: restore each time)
    for _ in range(3):
        q = torch.randn(B, Hq, 1, D, generator=g)
        k, v = torch.randn(2, B, Hk, 1, D, generator=g).unbind(0)
        cache.restore(snap)
        want = step(layer, q, k, v)
        cache.restore(snap)
        got = compiled(layer, q, k, v)
        torch.testing.assert_close(got, want)
    assert counter.frame_count == 1


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("max_growth", [None, 8])
def test_model_decode_forward_compiles_fullgraph(max_growth, storage):
    import torch._dynamo.testing

    model, cache, mask, tok = _compressed(max_growth=max_growth, storage=storage)
    if max_growth is None:
        cache.ensure_capacity(12)
    pos0 = positions(mask)[:, -1:] + 1

    def run(fwd, steps=10):
        t, toks = tok, []
        for i in range(steps):
            cache.prepare_decode(1)
            with torch.no_grad():
                out = fwd(input_ids=t, position_ids=pos0 + i, past_key_values=cache,
                          use_cache=True)
            t = out.logits[:, -1:].argmax(-1)
            toks.append(t)
        return torch.cat(toks, 1)

    want = run(model.forward)
    n_reevict = [l.n_reevict for l in cache.adakv_layers]
    # a fresh compression of the same prompt (a paged snapshot cannot outlive a re-eviction)
    _, cache, _, _ = _compressed(max_growth=max_growth, storage=storage, model=model)
    if max_growth is None:
        cache.ensure_capacity(12)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model.forward, backend=counter, fullgraph=True)
    got = run(compiled)
    assert torch.equal(got, want)
    if max_growth is None:
        assert counter.frame_count == 1         # one graph for all steps (no growth)
    else:
        assert n_reevict[0] >= 1
        # the re-evicted layout only changes data, not shapes: still one graph
        assert counter.frame_count == 1


def test_compiled_forward_requires_prepare_decode():
    model, cache, mask, tok = _compressed()
    fwd = torch.compile(model.forward, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="prepare_decode"), torch.no_grad():
        fwd(input_ids=tok, position_ids=positions(mask)[:, -1:] + 1, past_key_values=cache,
            use_cache=True)


# ---------------------------------------------------------------------------------------------
# 7. errors


def test_errors():
    model = make_model("llama")
    with pytest.raises(ValueError, match="method"):
        AdaKVCache(model, method="nope")
    with pytest.raises(ValueError, match="max_growth"):
        AdaKVCache(model, window=8, max_growth=4)
    with pytest.raises(ValueError, match="budget"):
        AdaKVCache(model, budget=-1)
    flex = make_model("llama", attn="flex_attention") if hasattr(torch.nn, "attention") else None
    if flex is not None:
        with pytest.raises(ValueError, match="sdpa"):
            AdaKVCache(flex)
    cache = AdaKVCache(model, budget=8, window=4)
    with pytest.raises(RuntimeError, match="snapshot"):
        cache.snapshot()
    ids, mask = make_batch(1, 20)
    cache.compress(ids, mask)
    with pytest.raises(RuntimeError, match="empty"):
        cache.compress(ids, mask)
    with pytest.raises(NotImplementedError):
        cache.crop(-1)
    assert math.isfinite(cache.kv_bytes())


# ---------------------------------------------------------------------------------------------
# 8. the cache argument's name: `cache=` (transformers >= 5.24) and `past_key_values=`


def _takes_cache_name() -> bool:
    from packaging.version import Version
    return Version(transformers.__version__).release >= (5, 24)


def _cache_name_warnings(record):
    return [w for w in record if issubclass(w.category, FutureWarning)
            and "past_key_values" in str(w.message)]


def test_cache_kwarg_rule():
    from adakv_ops.hf import CACHE_KWARG, cache_kwarg
    assert CACHE_KWARG == ("cache" if _takes_cache_name() else "past_key_values")
    sentinel = object()
    assert cache_kwarg(sentinel) == {CACHE_KWARG: sentinel}
    model = make_model("llama")
    assert cache_kwarg(sentinel, model) == {CACHE_KWARG: sentinel}

    class _OldStyle(torch.nn.Module):  # a custom model whose forward was not renamed
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return past_key_values

    assert cache_kwarg(sentinel, _OldStyle()) == {"past_key_values": sentinel}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_generate_cache_name_matches_past_key_values(family):
    model = make_model(family)
    ids, mask = make_batch(3, 30, seed=4)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10,
              do_sample=False)
    from adakv_ops.hf import cache_kwarg
    outs = {}
    names = ["past_key_values"] + (["cache"] if _takes_cache_name() else [])
    with torch.no_grad():
        ref = model.generate(**kw, **cache_kwarg(DynamicCache(config=model.config)))
        for name in names:
            cache = AdaKVCache(model, budget=12, window=4)        # evicts: 30 > 12 + 4
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                outs[name] = model.generate(**kw, **{name: cache})
            assert cache.get_seq_length() == 30 + 10 - 1
            assert all(sum(l.segment_lengths()) < len(l.segment_lengths()) * 30
                       for l in cache.adakv_layers)
        big = AdaKVCache(model, budget=64, window=4)               # keeps everything
        assert torch.equal(model.generate(**kw, **cache_kwarg(big)), ref)
    for name in names[1:]:
        assert torch.equal(outs[name], outs["past_key_values"])


def test_forward_cache_name_matches_past_key_values():
    """A prefill + decode forward loop gives the same logits whichever name carries the cache."""
    model = make_model("llama")
    ids, mask = make_batch(2, 30, seed=6)
    pos = positions(mask)
    names = ["past_key_values"] + (["cache"] if _takes_cache_name() else [])
    logits = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for name in names:
            cache = AdaKVCache(model, budget=12, window=4)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                        **{name: cache})
            steps = [out.logits[:, -1]]
            tok = out.logits[:, -1:].argmax(-1)
            for i in range(4):
                out = model(input_ids=tok, position_ids=pos[:, -1:] + 1 + i, use_cache=True,
                            **{name: cache})
                steps.append(out.logits[:, -1])
                tok = out.logits[:, -1:].argmax(-1)
            assert cache.get_seq_length() == 34
            logits[name] = torch.stack(steps)
    for name in names[1:]:
        assert torch.equal(logits[name], logits["past_key_values"])


@pytest.mark.skipif(not _takes_cache_name(), reason="transformers < 5.24 has no `cache=`")
def test_past_key_values_still_warns_upstream():
    # guards the next test: on this transformers the old name does emit the FutureWarning
    model = make_model("llama")
    ids, mask = make_batch(1, 12)
    with pytest.warns(FutureWarning, match="past_key_values"), torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                       past_key_values=AdaKVCache(model, budget=8, window=4))


def test_library_calls_emit_no_past_key_values_warning(monkeypatch):
    import importlib
    import io
    import types
    from contextlib import redirect_stdout
    from pathlib import Path

    from adakv_ops.demo import main as demo_main
    from adakv_ops.eval.runner import Prompt, run_sample, run_text
    from adakv_ops.hf import cache_kwarg

    bench_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))
    bench = importlib.import_module("bench_generate")

    model = make_model("llama")
    ids, mask = make_batch(2, 30)
    g = torch.Generator().manual_seed(7)
    seq = torch.randint(2, 128, (40,), generator=g).tolist()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # AdaKVCache.compress + generate through cache_kwarg
        cache = AdaKVCache(model, budget=12, window=4, reserve=4)
        cache.compress(ids, mask)
        with cache.reuse(), torch.no_grad():
            model.generate(input_ids=torch.cat([ids, ids[:, -3:]], 1),
                           attention_mask=torch.cat([mask, torch.ones_like(ids[:, -3:])], 1),
                           max_new_tokens=3, do_sample=False, **cache_kwarg(cache))
        # the evaluation runner (DynamicCache + AdaKVCache forwards)
        run_sample(model, Prompt(seq[:30], seq[30:36], seq[36:40]), ["ada_snapkv"], [0.5],
                   window=4)
        run_text(model, seq, ["snapkv"], [0.5], prefix=30, cont=8, window=4)
        # the benchmark's prefill / decode loops
        ctx = types.SimpleNamespace(sync=lambda: None)
        bcache = AdaKVCache(model, budget=12, window=4)
        tok, _ = bench.prefill(ctx, model, ids[:1, 5:], bcache)
        bench.decode(ctx, model, bcache, tok, 25, 3)
        # the demo's real-model path (tiny random Llama, no download)
        with redirect_stdout(io.StringIO()):
            assert demo_main(["--model", "tiny-random-llama", "--prompt-tokens", "128",
                              "--max-new-tokens", "2", "--threads", "1"]) == 0
    assert _cache_name_warnings(record) == [], [str(w.message) for w in record]
