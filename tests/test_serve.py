"""The continuous-batching engine (``adakv_ops.serve``) and ``AdaKVCache.remove_rows``:
requests join and leave mid-generation and each gets exactly the greedy tokens it gets alone.

Tiny random-weight models of ``test_hf`` (CPU, float32).
"""

from __future__ import annotations

import pytest
import torch

from conftest import HAVE_OPS

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

from test_hf import make_model  # noqa: E402

if HAVE_OPS:
    from adakv_ops.hf import CACHE_KWARG, AdaKVCache
    from adakv_ops.serve import AdmissionError, Engine

KW = dict(method="ada_snapkv", budget=10, window=4, page_size=4)


def _prompts(n, seed=0, lo=9, hi=40):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 128, (int(torch.randint(lo, hi, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


@torch.no_grad()
def _alone(model, prompt, n, chunk=None, **kw):
    """Greedy tokens of one request alone in its own cache."""
    cache = AdaKVCache(model, **{**KW, **kw})
    out = cache.prefill(torch.tensor([prompt]), chunk_size=chunk)
    toks = [int(out.logits[0, -1].argmax())]
    for i in range(n - 1):
        logits = model(input_ids=torch.tensor([[toks[-1]]]),
                       position_ids=torch.tensor([[len(prompt) + i]]), use_cache=True,
                       **{CACHE_KWARG: cache}).logits
        toks.append(int(logits[0, -1].argmax()))
    return toks


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_join_and_leave_mid_generation_give_the_tokens_of_each_request_alone(family):
    model = make_model(family)
    prompts = _prompts(6, seed=1)
    news = [5, 9, 3, 12, 1, 7]
    eng = Engine(model, num_pages=4000, max_batch=4, chunk_size=8, **KW)
    rids = [eng.add_request(prompts[i], news[i]) for i in range(3)]
    for _ in range(2):
        eng.step()
    rids += [eng.add_request(prompts[i], news[i]) for i in range(3, 6)]   # join mid-run
    seen_batch = set()
    while eng.has_work():
        eng.step()
        seen_batch.add(len(eng.running))
    assert max(seen_batch) == 4                       # max_batch reached: some waited
    for rid, p, n in zip(rids, prompts, news):
        assert eng.state(rid) == "finished"
        assert eng.result(rid) == _alone(model, p, n, chunk=8), rid
    assert eng.pages_free == 4000                     # every page is back


def test_remove_rows_keeps_the_others_untouched():
    model = make_model("llama")
    prompts = _prompts(4, seed=3)
    cache = AdaKVCache(model, **KW)
    for p in prompts:
        cache.prefill(torch.tensor([p]))
    before = [[l.segment_kv(s) for s in range(len(l.segment_lengths()))]
              for l in cache.adakv_layers]
    st = cache.pool.store
    used = st.pages_used
    held1 = st.pages_held(cache.pool.seqs[1])
    cache.remove_rows([1])
    assert cache.batch_size == 3 and st.pages_used == used - held1
    for l, segs in zip(cache.adakv_layers, before):
        H = len(segs) // 4
        rest = segs[:H] + segs[2 * H:]
        for s, (k, v) in enumerate(rest):
            a, b = l.segment_kv(s)
            assert torch.equal(a, k) and torch.equal(b, v)
    # decode over the gathered (non-consecutive) batch == each alone
    tok = torch.tensor([[5], [6], [7]])
    pos = torch.tensor([[len(prompts[i])] for i in (0, 2, 3)])
    with torch.no_grad():
        got = model(input_ids=tok, position_ids=pos, use_cache=True,
                    **{CACHE_KWARG: cache}).logits[:, -1]
        for row, i in enumerate((0, 2, 3)):
            one = AdaKVCache(model, **KW)
            one.prefill(torch.tensor([prompts[i]]))
            want = model(input_ids=tok[row:row + 1], position_ids=pos[row:row + 1],
                         use_cache=True, **{CACHE_KWARG: one}).logits[:, -1]
            torch.testing.assert_close(got[row:row + 1], want, atol=1e-5, rtol=1e-5)
    cache.remove_rows([0, 1, 2])
    assert cache.batch_size == 0 and st.pages_used == 0 and cache.get_seq_length() == 0
    cache.prefill(torch.tensor([prompts[0]]))       # the store is reused for a new batch
    assert cache.pool.store is st and cache.batch_size == 1
    with pytest.raises(ValueError, match="rows must be batch rows"):
        cache.remove_rows([1])
    with pytest.raises(ValueError, match="repeated row"):
        AdaKVCache(model, **KW).remove_rows([]) or cache.remove_rows([0, 0])
    flat = AdaKVCache(model, budget=10, window=4, storage="flat")
    with pytest.raises(NotImplementedError, match="storage='paged'"):
        flat.remove_rows([0])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])   # layer-major, chunk-major units
def test_a_long_prompt_is_prefilled_over_steps_while_the_others_decode(attn):
    model = make_model("llama", attn)
    short = _prompts(2, seed=11, lo=9, hi=14)
    long = _prompts(1, seed=12, lo=61, hi=62)[0]
    eng = Engine(model, num_pages=4000, max_batch=4, chunk_size=8, max_prefill_tokens=16,
                 **KW)
    assert eng.cache.prefill_order(61, chunk_size=8) == ("layer" if attn == "sdpa" else "chunk")
    a, b = (eng.add_request(p, 30) for p in short)
    while eng.running != [a, b]:
        eng.step()
    c = eng.add_request(long, 6)
    prefilling, most = 0, 0
    while eng.state(c) in ("queued", "prefilling"):
        got = eng.step()
        if eng.state(c) == "prefilling":
            prefilling += 1
            assert a in got and b in got            # the others decode between the units
            most = max(most, eng.pages_held(c))
            assert eng.running == [a, b]
    # 61 tokens x 4 layers at 16 tokens' worth a step: at least 3 steps with c in between
    assert prefilling >= 3 and c in got
    # chunk-major holds the raw prompt in pages until its last chunk; layer-major never does
    kept = eng.pages_held(c)
    assert (most > kept) if attn == "eager" else (most <= kept)
    out = eng.run()
    for rid, p, n in ((a, short[0], 30), (b, short[1], 30), (c, long, 6)):
        assert out[rid] == _alone(model, p, n, chunk=8), rid
    assert eng.pages_free == 4000


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_short_prompt_is_prefilled_ahead_of_a_long_one_in_progress(attn):
    """A short prompt queued behind a long one that is prefilled over steps joins in the next
    step (its whole prefill fits in what is left of the step); the long one still runs a unit
    every step; a long one queued behind the short keeps its place (arrival order among the
    queued); every request gets its tokens alone."""
    model = make_model("llama", attn)
    long = _prompts(1, seed=12, lo=61, hi=62)[0]
    short, short2 = _prompts(2, seed=13, lo=5, hi=8)
    long2 = _prompts(1, seed=14, lo=50, hi=51)[0]
    eng = Engine(model, num_pages=4000, max_batch=4, chunk_size=8, max_prefill_tokens=16,
                 **KW)
    c = eng.add_request(long, 6)
    eng.step()
    assert eng.state(c) == "prefilling"
    s = eng.add_request(short, 5)
    d = eng.add_request(long2, 3)                 # waits for c: one long prompt at a time
    e = eng.add_request(short2, 4)                # behind d: no passing it
    left = eng._job[1].remaining_cost
    got = eng.step()
    assert s in got and eng.state(s) == "running" and eng.state(c) == "prefilling"
    assert eng._job[1].remaining_cost < left      # c ran a unit in the same step
    assert eng.queued == [d, e]
    while eng.state(c) == "prefilling":
        assert s in eng.step()                    # s decodes between c's units
    assert eng.state(e) == "queued" or eng.state(d) != "queued"
    out = eng.run()
    for rid, p, n in ((c, long, 6), (s, short, 5), (d, long2, 3), (e, short2, 4)):
        assert out[rid] == _alone(model, p, n, chunk=8), rid
    assert eng.pages_free == 4000


def test_a_chunk_major_prefill_reserves_its_raw_pages_against_forks_and_short_prompts():
    """While a chunk-major prompt holds its raw prompt in pages (more than its kept worst
    case), neither a fork nor a short prompt ahead of it may take those pages."""
    model = make_model("llama", "eager")
    first = _prompts(1, seed=15, lo=12, hi=13)[0]
    long = _prompts(1, seed=16, lo=61, hi=62)[0]
    short = _prompts(1, seed=17, lo=6, hi=7)[0]
    probe = Engine(model, num_pages=1, max_batch=4, chunk_size=8, **KW)
    one, _ = probe._page_bounds(12, 8)
    bound, raw = probe._page_bounds(61, 4)
    sb, _ = probe._page_bounds(6, 3)
    assert raw > bound
    pool = one + raw + max(one, sb)               # one fork or the short fit beside raw, not bound
    eng = Engine(model, num_pages=pool, max_batch=4, chunk_size=8, max_prefill_tokens=16,
                 **KW)
    a = eng.add_request(first, 8)
    while a not in eng.running:
        eng.step()
    c = eng.add_request(long, 4)
    eng.step()
    assert eng.state(c) == "prefilling"
    eng.fork(a)                                   # fits beside c's raw pages
    with pytest.raises(AdmissionError, match="do not fit now"):
        eng.fork(a)                               # would fit beside c's bound only
    s = eng.add_request(short, 3)
    eng.step()
    assert eng.state(s) == "queued"               # not ahead of c: no pages for it now
    out = eng.run()
    assert out[c] == _alone(model, long, 4, chunk=8)
    assert out[s] == _alone(model, short, 3, chunk=8)
    assert eng.pages_free == pool


def _one_running_one_prefilling(family, seed, new_a):
    """An engine (chunk-major: an eager model holds the raw prompt in pages) with request
    ``a`` running and request ``c`` (4 new tokens) prefilled part of the way."""
    model = make_model(family, "eager")
    first, long = _prompts(2, seed=seed, lo=40, hi=50)
    eng = Engine(model, num_pages=4000, max_batch=2, chunk_size=8, max_prefill_tokens=8, **KW)
    a = eng.add_request(first, new_a)
    while a not in eng.running:
        eng.step()
    c = eng.add_request(long, 4)
    eng.step()
    assert eng.state(c) == "prefilling" and eng.pages_held(c) > 0
    return model, eng, first, long, a, c


def test_cancel_a_request_while_it_is_prefilled():
    model, eng, first, long, a, c = _one_running_one_prefilling("qwen2", 13, 12)
    assert eng.pages_free == 4000 - eng.pages_held(a) - eng.pages_held(c)
    eng.cancel(c)
    assert eng.state(c) == "cancelled" and eng.pages_held(c) == 0
    assert eng.pages_free == 4000 - eng.pages_held(a)
    d = eng.add_request(long, 4)                          # the slot is free again
    out = eng.run()
    assert out[a] == _alone(model, first, 12, chunk=8) and out[c] == []
    assert out[d] == _alone(model, long, 4, chunk=8)
    assert eng.pages_free == 4000


def test_admission_queues_what_does_not_fit_now_and_refuses_what_never_fits():
    model = make_model("llama")
    prompts = _prompts(3, seed=5, lo=30, hi=31)
    one = Engine(model, num_pages=1, max_batch=8, **KW)._page_bounds(30, 20)[0]
    pool = 2 * one + 5                                # two fit at once, the third waits
    eng = Engine(model, num_pages=pool, max_batch=8, **KW)
    rids = [eng.add_request(p, 20) for p in prompts]
    eng.step()
    assert eng.running == rids[:2] and eng.queued == rids[2:]
    assert all(eng.pages_held(r) > 0 for r in rids[:2]) and eng.pages_held(rids[2]) == 0
    out = eng.run()
    assert all(len(out[r]) == 20 for r in rids)
    assert out[rids[2]] == _alone(model, prompts[2], 20)
    with pytest.raises(AdmissionError, match=rf"needs up to \d+ pages .* the pool has {pool}"):
        eng.add_request(list(range(2, 100)) * 20, 500)
    for bad in ([], [1, 2, 999], ):
        with pytest.raises(AdmissionError):
            eng.add_request(bad, 4)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(AdmissionError, match="max_new_tokens"):
            eng.add_request([3, 4, 5], bad)


def test_a_step_prefills_at_most_max_prefill_tokens_and_decodes_in_between():
    model = make_model("llama")
    prompts = _prompts(5, seed=7, lo=20, hi=21)       # 20 tokens each
    eng = Engine(model, num_pages=4000, max_batch=8, max_prefill_tokens=45, **KW)
    first = eng.add_request(prompts[0], 30)
    eng.step()                                        # the first request runs
    rids = [eng.add_request(p, 6) for p in prompts[1:]]
    out = eng.step()                                  # 2 x 20 <= 45: two admitted, the rest wait
    assert [r for r in rids if r in out] == rids[:2] and eng.queued == rids[2:]
    assert first in out                               # the running request got its token
    out = eng.step()
    assert eng.queued == [] and set(rids[2:]) <= set(out) and first in out
    res = eng.run()
    for p, r in zip(prompts[1:], rids):
        assert res[r] == _alone(model, p, 6)
    alone = Engine(model, num_pages=4000, max_batch=8, max_prefill_tokens=1, **KW)
    a, b = alone.add_request(prompts[0], 2), alone.add_request(prompts[1], 2)
    assert a in alone.step() and alone.queued == [b]  # the first always, however long
    unbounded = Engine(model, num_pages=4000, max_batch=8, max_prefill_tokens=None, **KW)
    rids = [unbounded.add_request(p, 2) for p in prompts]
    assert set(unbounded.step()) == set(rids)
    for bad in (0, -3, 2.5, "8", True):
        with pytest.raises(ValueError, match="max_prefill_tokens"):
            Engine(model, num_pages=10, max_batch=2, max_prefill_tokens=bad, **KW)


def test_cancel_and_eos():
    model = make_model("qwen2")
    prompts = _prompts(3, seed=7)
    eng = Engine(model, num_pages=3000, max_batch=4, **KW)
    ref = _alone(model, prompts[1], 8)
    eos = ref[3]                                      # stop request 1 at its 4th token
    a = eng.add_request(prompts[0], 30)
    b = eng.add_request(prompts[1], 8, eos_token_id=eos)
    c = eng.add_request(prompts[2], 30)
    # several stop tokens (generation_config.eos_token_id is often a list): the first read stops
    d = eng.add_request(prompts[1], 8, eos_token_id=[127, ref[5], ref[2]])
    e = eng.add_request(prompts[1], 8, eos_token_id=torch.tensor([ref[4]]))
    eng.step()
    eng.step()
    eng.cancel(c)
    assert eng.state(c) == "cancelled" and c not in eng.running
    eng.cancel(a)
    eng.run()
    assert eng.result(b) == ref[:ref.index(eos) + 1]
    stop = min(i for i, t in enumerate(ref) if t in (127, ref[5], ref[2]))
    assert eng.result(d) == ref[:stop + 1]
    assert eng.result(e) == ref[:ref.index(ref[4]) + 1]
    assert eng.pages_free == 3000
    with pytest.raises(KeyError):
        eng.result(99)
    gem = make_model("gemma3")
    with pytest.raises(NotImplementedError, match="sliding-window"):
        Engine(gem, num_pages=100, max_batch=2, **KW)


def test_compiled_decode_over_a_gathered_batch():
    """After a leave the batch is no longer consecutive slots: the compiled decode forward
    (fullgraph, one graph for all steps) still gives the eager tokens."""
    import torch._dynamo.testing

    model = make_model("llama")
    prompts = _prompts(4, seed=11)

    def build():
        cache = AdaKVCache(model, **KW)
        for p in prompts:
            cache.prefill(torch.tensor([p]))
        cache.remove_rows([1])
        cache.ensure_capacity(8)
        return cache

    rows = (0, 2, 3)
    pos0 = torch.tensor([[len(prompts[i])] for i in rows])

    def run(fwd, cache, steps=6):
        tok, toks = torch.tensor([[3], [4], [5]]), []
        for i in range(steps):
            cache.prepare_decode(1)
            with torch.no_grad():
                out = fwd(input_ids=tok, position_ids=pos0 + i, use_cache=True,
                          **{CACHE_KWARG: cache})
            tok = out.logits[:, -1:].argmax(-1)
            toks.append(tok)
        return torch.cat(toks, 1)

    want = run(model.forward, build())
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    got = run(torch.compile(model.forward, backend=counter, fullgraph=True), build())
    assert torch.equal(got, want)
    assert counter.frame_count == 1


def test_engine_rejects_hostile_input_before_any_device_work():
    model = make_model("llama")
    eng = Engine(model, num_pages=500, max_batch=2, **KW)
    cases = [
        ([-1, 5], 3, "prompt ids"), ([5, 128], 3, "prompt ids"), ([2**40], 3, "prompt ids"),
        ([], 3, "empty"), ([3, 4], 2**31, "needs up to"), ([3, 4], 10**30, "needs up to"),
        ([3, 4], None, "max_new_tokens"), ([3, 4], "8", "max_new_tokens"),
    ]
    for prompt, n, pat in cases:
        with pytest.raises(AdmissionError, match=pat):
            eng.add_request(prompt, n)
    for prompt in ([3.5, "x"], [3.5, 4.0], [True, 4], "abc", torch.tensor([3.0, 4.0]),
                   torch.tensor([True, False]), [[3, 4]]):
        with pytest.raises(AdmissionError, match="prompt must"):
            eng.add_request(prompt, 3)
    for eos in (2.5, "2", [3, None], True, torch.tensor([1.5])):
        with pytest.raises(AdmissionError, match="eos_token_id must"):
            eng.add_request([3, 4], 3, eos_token_id=eos)
    assert eng.add_request(torch.tensor([[3, 4]]), 2) == 0      # an integer tensor is fine
    eng.cancel(0)
    assert eng.queued == [] and eng.pages_free == 500
    assert eng.step() == {}                        # nothing to do is not an error
    rid = eng.add_request([3, 4, 5], 2)
    eng.cancel(rid)
    eng.cancel(rid)                                # cancelling twice is harmless
    assert eng.state(rid) == "cancelled" and not eng.has_work()
    for bad in (-1, 99, "0", None):
        with pytest.raises(KeyError):
            eng.cancel(bad)
    with pytest.raises(ValueError, match="storage='paged'"):
        Engine(model, num_pages=10, max_batch=2, storage="flat")
    for bad in (0, -5, True, 2.5, "16"):
        with pytest.raises(ValueError, match="chunk_size must be"):
            Engine(model, num_pages=10, max_batch=2, chunk_size=bad, **KW)
    for bad in ("cublasLt", "cuda", 1, True, ["auto"]):
        with pytest.raises(ValueError, match="blas must be one of"):
            Engine(model, num_pages=10, max_batch=2, blas=bad, **KW)
    for bad in ([3], [0], [-1], [1.0], "x", [True], 2, torch.tensor([1])):   # a bucket beyond max_batch=2 would
        with pytest.raises(ValueError, match="buckets must be"):   # leave its request behind
            eng.warmup(bad)
    assert not eng.has_work() and eng.pages_free == 500


def test_decode_blas_policy():
    from adakv_ops.serve import CUBLASLT_MAX_BATCH, CUBLASLT_MIN_BATCH, decode_blas
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    for dt in (bf16, fp16):
        assert [decode_blas("auto", b, dt) for b in (CUBLASLT_MIN_BATCH, CUBLASLT_MAX_BATCH)] \
            == ["cublaslt"] * 2
        assert decode_blas("auto", CUBLASLT_MAX_BATCH + 1, dt) == "cublas"
        assert decode_blas("auto", CUBLASLT_MIN_BATCH - 1, dt) is None   # not measured
        assert decode_blas("auto", 1, dt) is None
    assert decode_blas("auto", 64, fp32) is None            # not measured: torch's setting
    assert decode_blas("cublas", 8, fp32) == "cublas"
    assert decode_blas("cublaslt", 512, bf16) == "cublaslt"
    assert decode_blas(None, 64, bf16) is None


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU build of torch has no cuBLASLt")
def test_preferred_blas_is_set_inside_the_block_only():
    from adakv_ops.serve import _preferred_blas
    before = torch.backends.cuda.preferred_blas_library()
    other = "cublas" if "lt" in str(before).lower() else "cublaslt"
    with _preferred_blas(other):
        assert other in str(torch.backends.cuda.preferred_blas_library()).lower()
    assert torch.backends.cuda.preferred_blas_library() == before
    with pytest.raises(RuntimeError, match="inside"):
        with _preferred_blas(other):
            raise RuntimeError("inside")
    assert torch.backends.cuda.preferred_blas_library() == before
    with _preferred_blas(None):
        assert torch.backends.cuda.preferred_blas_library() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("blas", ["cublaslt", "cublas"])
def test_cuda_engine_decode_blas_is_scoped_to_the_decode_step(blas):
    """A bf16 engine decoding with either library (compiled, CUDA graphs): the tokens come
    out, and torch's preference is the caller's again after every step."""
    model = make_model("llama").cuda().to(torch.bfloat16)
    before = torch.backends.cuda.preferred_blas_library()
    eng = Engine(model, num_pages=4000, max_batch=4, chunk_size=8, compile=True,
                 mode="reduce-overhead", blas=blas, **KW)
    rids = [eng.add_request(p, 5) for p in _prompts(3, seed=5)]
    while eng.has_work():
        eng.step()
        assert torch.backends.cuda.preferred_blas_library() == before
    assert all(len(eng.result(r)) == 5 for r in rids)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_compiled_engine_with_buckets_gives_the_eager_tokens(family):
    """compile=True: decode at a fixed shape per batch-size bucket (pad rows keep empty
    segments); the tokens are each request's tokens alone, and joins / leaves inside a bucket
    do not recompile."""
    import torch._dynamo.testing

    model = make_model(family)
    prompts = _prompts(5, seed=13)
    news = [6, 3, 9, 4, 7]
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    eng = Engine(model, num_pages=4000, max_batch=4, chunk_size=8, compile=True,
                 backend=counter, **KW)
    rids = [eng.add_request(p, n) for p, n in zip(prompts[:3], news[:3])]
    eng.step()
    rids += [eng.add_request(p, n) for p, n in zip(prompts[3:], news[3:])]
    buckets = set()
    while eng.has_work():
        if eng.running:
            buckets.add(eng._bucket(len(eng.running)))
        eng.step()
    for rid, p, n in zip(rids, prompts, news):
        assert eng.result(rid) == _alone(model, p, n, chunk=8), rid
    assert counter.frame_count <= len(buckets)        # one graph per bucket at most
    st = eng.cache.pool.store
    assert st.pages_used == 0                         # pad rows hold no page


def test_compiled_engine_runs_more_buckets_than_dynamo_recompile_limit():
    """One graph per bucket: with fullgraph=True a 9th graph (max_batch 256 has 9 buckets)
    would hit dynamo's default recompile limit of 8 and fail the step; the engine raises the
    limit. Here the limit is 2 and the batch grows through 4 buckets."""
    import torch._dynamo
    import torch._dynamo.testing

    model = make_model("llama")
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    prompts = _prompts(8, seed=3)
    rids, seen = [], set()
    with torch._dynamo.config.patch(recompile_limit=2):
        eng = Engine(model, num_pages=4000, max_batch=8, chunk_size=8, compile=True,
                     backend=counter, **KW)
        assert eng.buckets == [1, 2, 4, 8]
        for i, p in enumerate(prompts):
            rids.append(eng.add_request(p, 3 + 2 * i))
            eng.step()
            seen.add(eng._bucket(len(eng.running)))
        eng.run()
    assert seen == {1, 2, 4, 8} and counter.frame_count == 4
    for rid, p, i in zip(rids, prompts, range(8)):
        assert eng.result(rid) == _alone(model, p, 3 + 2 * i, chunk=8), rid


def test_warmup_compiles_every_bucket_before_the_first_request():
    """warmup(): every bucket's graph exists before a request arrives; serving then compiles
    nothing, gives each request its tokens alone, and leaves no trace of the warm-up (ids from
    0, statistics from zero, every page free)."""
    import torch._dynamo.testing

    model = make_model("llama")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    eng = Engine(model, num_pages=4000, max_batch=6, chunk_size=8, compile=True,
                 backend=counter, max_seq_len=200, **KW)
    assert eng.buckets == [1, 2, 4, 6]
    assert eng.warmup() > 0
    assert counter.frame_count == 4
    assert eng.pages_free == 4000 and not eng.has_work()
    assert eng.stats["decode_steps"] == 0 and eng.stats["prefills"] == 0
    # the last request's segments outgrow 16 pages of 4 rows (the tables' initial width):
    # max_seq_len fixed the width, so that is no new shape
    prompts, news = _prompts(6, seed=21), [5, 2, 7, 3, 6, 100]
    rids = [eng.add_request(p, n) for p, n in zip(prompts, news)]
    assert rids == list(range(6))
    out = eng.run()
    assert counter.frame_count == 4                  # nothing compiled while serving
    assert set(out) == set(rids)
    for rid, p, n in zip(rids, prompts, news):
        assert eng.result(rid) == _alone(model, p, n, chunk=8), rid
    assert eng.pages_free == 4000
    assert eng.cache.pool.store.table_width == 200 // 4 + 1
    with pytest.raises(AdmissionError, match="max_seq_len=200"):
        eng.add_request(prompts[0], 200 - len(prompts[0]) + 1)
    eng.add_request(prompts[0], 200 - len(prompts[0]))       # exactly max_seq_len: admitted
    with pytest.raises(RuntimeError, match="idle engine"):
        eng.warmup()
    assert Engine(model, num_pages=100, max_batch=2, **KW).warmup() == 0.0
    with pytest.warns(UserWarning, match="without max_seq_len"):
        Engine(model, num_pages=4000, max_batch=1, compile=True, backend="eager",
               **KW).warmup()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_engine_warmup_with_cuda_graphs():
    """warmup() with mode="reduce-overhead" (inductor + CUDA graphs) on the CUDA kernels: the
    graphs recorded for dummy requests then serve real ones with the tokens of the same
    compiled engine without a warm-up (same graphs, same arithmetic)."""
    model = make_model("llama").cuda()
    prompts, news = _prompts(4, seed=29), [6, 3, 8, 5]
    kw = dict(num_pages=4000, max_batch=4, chunk_size=8, compile=True, mode="reduce-overhead",
              **KW)
    want = Engine(model, **kw)
    wids = [want.add_request(p, n) for p, n in zip(prompts, news)]
    want.run()
    eng = Engine(model, **kw)
    assert eng.warmup() > 0 and eng.pages_free == 4000
    rids = [eng.add_request(p, n) for p, n in zip(prompts, news)]
    eng.run()
    for rid, wid in zip(rids, wids):
        assert eng.result(rid) == want.result(wid), rid


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("max_prefill", [16384, 16])       # 16: prompts split over steps
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_engine_join_and_leave(compile, max_prefill):
    """On the CUDA kernels (fp32 tiny model): joins, leaves, a gathered batch, bucket pads,
    prefills a unit at a time between (compiled) decode steps."""
    model = make_model("llama").cuda()
    prompts = _prompts(5, seed=17)
    news = [4, 8, 2, 6, 5]
    eng = Engine(model, num_pages=4000, max_batch=4, chunk_size=8, compile=compile,
                 backend="aot_eager", max_prefill_tokens=max_prefill, **KW)
    rids = [eng.add_request(p, n) for p, n in zip(prompts[:3], news[:3])]
    eng.step()
    rids += [eng.add_request(p, n) for p, n in zip(prompts[3:], news[3:])]
    eng.run()
    for rid, p, n in zip(rids, prompts, news):
        cache = AdaKVCache(model, **KW)
        out = cache.prefill(torch.tensor([p], device="cuda"), chunk_size=8)
        toks = [int(out.logits[0, -1].argmax())]
        with torch.no_grad():
            for i in range(n - 1):
                lg = model(input_ids=torch.tensor([[toks[-1]]], device="cuda"),
                           position_ids=torch.tensor([[len(p) + i]], device="cuda"),
                           use_cache=True, **{CACHE_KWARG: cache}).logits
                toks.append(int(lg[0, -1].argmax()))
        assert eng.result(rid) == toks, rid


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_engine_step_reads_without_waiting_for_the_step_it_launches():
    """``step()`` launches step k + 1 and reads step k's tokens: the read must wait for step
    k only (a pinned copy + event), never for the step just queued behind it, or the host's
    launch work would never overlap the device. A forward made slow on the device (GPU work
    queued before it) must not slow the call that launches it."""
    import time
    model = make_model("llama").cuda()
    eng = Engine(model, num_pages=4000, max_batch=4, chunk_size=8, **KW)
    for p in _prompts(2, seed=5):
        eng.add_request(p, 40)
    eng.step()
    eng.step()                                       # a decode step is in flight
    torch.cuda.synchronize()
    from conftest import gpu_busy
    fwd = eng._forward

    def slow_forward(**kw):
        gpu_busy(400)                              # ~400 ms queued before the forward
        return fwd(**kw)

    eng._forward = slow_forward
    t0 = time.perf_counter()
    out = eng.step()
    took = time.perf_counter() - t0
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    eng._forward = fwd
    assert len(out) == 2                             # the previous step's tokens were read
    assert total > 0.1, total                        # the busy work ran on the device
    assert took < 0.5 * total, (took, total)         # ... and the call did not wait for it
    eng.run()


def test_fork_gives_each_copy_the_tokens_of_its_source():
    model = make_model("llama")
    prompts = _prompts(2, seed=11)
    eng = Engine(model, num_pages=4000, max_batch=6, chunk_size=8, **KW)
    a = eng.add_request(prompts[0], 9)
    b = eng.add_request(prompts[1], 6)
    eng.step()
    eng.step()                                       # a and b decode a token
    held = eng.pages_held(a)
    copies = eng.fork(a, 3)
    assert eng.running == [a, b] + copies
    assert all(eng.pages_held(c) == held for c in copies)
    assert all(eng.result(c) == eng.result(a) for c in copies)
    out = eng.run()
    want = _alone(model, prompts[0], 9, chunk=8)
    assert out[a] == want and all(out[c] == want for c in copies)
    assert out[b] == _alone(model, prompts[1], 6, chunk=8)
    assert eng.pages_free == 4000
    # refusals change nothing
    eng2 = Engine(model, num_pages=4000, max_batch=2, **KW)
    r = eng2.add_request(prompts[0], 4)
    with pytest.raises(AdmissionError, match="only a running request"):
        eng2.fork(r)
    eng2.step()
    with pytest.raises(AdmissionError, match="do not fit now"):
        eng2.fork(r, 2)
    with pytest.raises(AdmissionError, match="n must be"):
        eng2.fork(r, 0)
    assert eng2.running == [r] and eng2.pages_held(r) > 0
    assert eng2.run()[r] == _alone(model, prompts[0], 4)


def test_fork_rows_of_the_cache_decode_as_their_sources():
    model = make_model("qwen3")
    prompts = _prompts(2, seed=12)
    cache = AdaKVCache(model, **KW)
    for p in prompts:
        cache.prefill(torch.tensor([p]))
    assert cache.fork_rows([1, 0, 1]) == [2, 3, 4]
    assert cache.batch_size == 5
    src = [1, 0, 1]
    tok = torch.tensor([[5], [6], [6], [5], [6]])
    pos = torch.tensor([[len(prompts[i])] for i in (0, 1, 1, 0, 1)])
    with torch.no_grad():
        got = model(input_ids=tok, position_ids=pos, use_cache=True,
                    **{CACHE_KWARG: cache}).logits[:, -1]
    for row, s_ in zip((2, 3, 4), src):
        torch.testing.assert_close(got[row], got[s_], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rows must be batch rows"):
        cache.fork_rows([5])
    with pytest.raises(NotImplementedError, match="storage='paged'"):
        AdaKVCache(model, budget=10, window=4, storage="flat").fork_rows([0])


def test_step_returns_every_token_once_in_order():
    """The pipelined step (launch this step, read the previous one): the tokens step() returns
    are each request's result, in order, once; the engine is idle only after the last read."""
    model = make_model("mistral")
    prompts = _prompts(4, seed=21)
    news = [1, 4, 7, 2]
    ref = _alone(model, prompts[2], 7)
    eng = Engine(model, num_pages=4000, max_batch=3, **KW)
    rids = [eng.add_request(p, n) for p, n in zip(prompts[:2], news[:2])]
    rids.append(eng.add_request(prompts[2], 7, eos_token_id=ref[4]))   # stops at its 5th
    rids.append(eng.add_request(prompts[3], news[3]))
    got = {r: [] for r in rids}
    calls = 0
    while eng.has_work():
        for rid, t in eng.step().items():
            got[rid].append(t)
        calls += 1
        assert calls < 50
    assert eng.step() == {} and not eng.has_work()
    for rid in rids:
        assert got[rid] == eng.result(rid) and eng.state(rid) == "finished"
    assert eng.result(rids[2]) == ref[:5]
    assert [len(got[r]) for r in rids] == [1, 4, 5, 2]
    assert eng.pages_free == 4000 and eng.stats["decode_steps"] >= 4


@pytest.mark.parametrize("family,method", [("llama", "ada_snapkv"), ("qwen2", "ada_pyramid"),
                                           ("mistral", "snapkv")])
def test_reeviction_in_the_engine_follows_each_request_alone(family, method):
    """max_growth: every request re-evicts on its own schedule (per-slot counters and query
    rings), so requests that join, leave and fork mid-run get exactly the tokens they get
    alone, and each one's pages stay within the C + window + max_growth bound."""
    model = make_model(family)
    kw = dict(KW, method=method, max_growth=6)
    prompts = _prompts(5, seed=31, lo=14, hi=50)
    news = [25, 9, 31, 17, 22]
    eng = Engine(model, num_pages=6000, max_batch=3, chunk_size=8, **kw)
    rids = [eng.add_request(prompts[i], news[i]) for i in range(2)]
    for _ in range(5):
        eng.step()
    rids += [eng.add_request(prompts[i], news[i]) for i in range(2, 5)]   # join mid-run
    bound = {r: eng._requests[r].pages_bound for r in rids}
    most = {r: 0 for r in rids}
    reevicted = 0                 # (the counters restart when the last request leaves)
    while eng.has_work():
        eng.step()
        for r in eng.running:
            most[r] = max(most[r], eng.pages_held(r))
        reevicted = max(reevicted, min(l.n_reevict for l in eng.cache.adakv_layers))
    assert reevicted >= 3
    for rid, p, n in zip(rids, prompts, news):
        assert eng.result(rid) == _alone(model, p, n, chunk=8, **kw), rid
        assert 0 < most[rid] <= bound[rid], rid
    assert eng.pages_free == 6000


def test_reeviction_engine_compiled_with_buckets():
    import torch._dynamo.testing

    model = make_model("llama")
    kw = dict(KW, max_growth=5)
    prompts = _prompts(3, seed=33, lo=12, hi=40)
    news = [14, 6, 19]
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    eng = Engine(model, num_pages=4000, max_batch=4, compile=True, backend=counter, **kw)
    rids = [eng.add_request(p, n) for p, n in zip(prompts[:2], news[:2])]
    eng.step()
    eng.step()
    rids.append(eng.add_request(prompts[2], news[2]))
    eng.step()
    copy = eng.fork(rids[0])[0]
    eng.run()
    for rid, p, n in zip(rids, prompts, news):
        assert eng.result(rid) == _alone(model, p, n, **kw), rid
    assert eng.result(copy) == eng.result(rids[0])
    assert counter.frame_count <= 3               # buckets 2 and 4 (and 1 as requests end)


def test_a_prefill_that_fails_gives_its_pages_back_and_the_engine_goes_on(monkeypatch):
    from adakv_ops.hf import PrefillJob
    model, eng, first, long, a, c = _one_running_one_prefilling("llama", 17, 10)
    real = PrefillJob.step

    def broken(self):
        raise RuntimeError("unit failed")
    monkeypatch.setattr(PrefillJob, "step", broken)
    with pytest.raises(RuntimeError, match="unit failed"):
        eng.step()
    monkeypatch.setattr(PrefillJob, "step", real)
    assert eng.state(c) == "cancelled" and eng.pages_held(c) == 0
    assert eng.pages_free == 4000 - eng.pages_held(a)
    out = eng.run()
    assert out[a] == _alone(model, first, 10, chunk=8)
    assert eng.pages_free == 4000


@pytest.mark.parametrize("seed,attn", [(0, "sdpa"), (1, "eager"), (2, "sdpa")])
def test_a_random_stream_of_arrivals_and_cancels_keeps_the_pages_accounted(seed, attn):
    """A long random run: requests arrive at random steps (prompts of 1-60 tokens, 1-12 new
    tokens), some are cancelled while queued, prefilling or running, the pool is small enough
    that requests wait, and prompts are prefilled over several steps (``max_prefill_tokens``
    below a prompt). After every step: the pages held by the running and the prefilling
    requests plus the free pages are the pool, and no running request holds more than its
    reservation. At the end every page is back, and each request that was not cancelled got
    exactly its tokens alone. ``attn``: sdpa prefills layer-major, eager chunk-major (its raw
    prompt in pages)."""
    model = make_model("llama", attn)
    g = torch.Generator().manual_seed(100 + seed)

    def rnd(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    chunk = 7
    pages = 150
    eng = Engine(model, num_pages=pages, max_batch=3, chunk_size=chunk, max_prefill_tokens=9,
                 **KW)
    reqs = {}
    for step in range(80):
        if step < 50 and rnd(0, 2) == 0:
            p = torch.randint(2, 128, (rnd(1, 60),), generator=g).tolist()
            n = rnd(1, 12)
            reqs[eng.add_request(p, n)] = (p, n)
        live = [r for r in reqs if eng.state(r) in ("queued", "prefilling", "running")]
        if live and rnd(0, 9) == 0:
            eng.cancel(live[rnd(0, len(live) - 1)])
        eng.step()
        held = sum(eng.pages_held(r) for r in reqs)
        assert held + eng.pages_free == pages, step
        for r in eng.running:
            assert eng.pages_held(r) <= eng._get(r).pages_bound, (step, r)
        assert len(eng.running) + (eng._job is not None) <= 3
    while eng.has_work():
        eng.step()
    assert eng.pages_free == pages
    states = [eng.state(r) for r in reqs]
    assert "finished" in states and "cancelled" in states
    assert set(states) <= {"finished", "cancelled"}
    for rid, (p, n) in reqs.items():
        if eng.state(rid) == "finished":
            assert eng.result(rid) == _alone(model, p, n, chunk=chunk), rid


def test_decode_gemm_routing_is_a_no_op_off_hopper():
    """Engine(decode_gemm=True) routes the projections through adakv_ops.gemm.linear only on an
    sm_90 GPU: on the CPU nothing is routed and the tokens are those of the default engine."""
    model = make_model("llama")
    prompts = _prompts(2, seed=5)
    eng = Engine(model, num_pages=4000, max_batch=2, chunk_size=8, decode_gemm=True, **KW)
    assert eng.routed_projections == 0
    rids = [eng.add_request(p, 4) for p in prompts]
    while eng.has_work():
        eng.step()
    for rid, p in zip(rids, prompts):
        assert eng.result(rid) == _alone(model, p, 4, chunk=8)
