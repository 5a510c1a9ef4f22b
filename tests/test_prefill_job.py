"""``adakv_ops.hf.PrefillJob``: a prompt prefilled a unit at a time into a side cache over the
cache's page store while the cache decodes, then committed as the cache's last batch row.

The reference is the same prompt added by ``AdaKVCache.prefill`` after the same decode steps:
the committed cache holds the same rows bit for bit and decodes the same logits, for each order
(layer-major, chunk-major, one forward), method and re-eviction; a cancelled job gives its pages
back and leaves the cache as it was. Tiny random-weight models of ``test_hf`` (CPU, float32).
"""

from __future__ import annotations

import pytest
import torch

from conftest import HAVE_OPS

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

from test_hf import COMMON, make_model  # noqa: E402
from test_hf import _one_thread  # noqa: E402,F401  (autouse: one thread for tiny matmuls)
from test_chunked_prefill import _assert_identical_rows  # noqa: E402

if HAVE_OPS:
    from adakv_ops.hf import CACHE_KWARG, AdaKVCache, PrefillJob

L = COMMON["num_hidden_layers"]


def _prompts(*lens, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 128, (1, n), generator=g) for n in lens]


def _decode(model, cache, tok, pos):
    """One eager decode step of every row; returns the logits ``[B, vocab]``."""
    with torch.no_grad():
        return model(input_ids=tok, position_ids=pos, use_cache=True,
                     **{CACHE_KWARG: cache}).logits[:, -1]


@pytest.mark.parametrize("chunk,order", [(None, "auto"), (7, "auto"), (7, "chunk"), (16, "auto")])
@pytest.mark.parametrize("method", ["ada_snapkv", "layer_defensivekv", "ada_pyramid", "full"])
def test_a_job_between_decode_steps_gives_the_added_prompt(method, chunk, order):
    model = make_model("llama")
    first, joining = _prompts(33, 41)
    kw = dict(method=method, budget=10, window=6, page_size=4, max_batch=3)
    direct, job_cache = AdaKVCache(model, **kw), AdaKVCache(model, **kw)
    tok = torch.tensor([[5]])
    for c in (direct, job_cache):
        c.prefill(first)
    job = PrefillJob(job_cache, joining, chunk_size=chunk, order=order)
    costs = list(job.costs)
    assert sum(costs) == 41 * L
    assert len(costs) == (1 if chunk is None else
                          -(-41 // chunk) * (L if order == "auto" else 1))
    steps = 0
    ran = []
    while not job.done:                     # a decode step of the cache after every unit
        assert job.next_cost == costs[len(ran)]
        ran.append(job.step())
        logits = _decode(model, job_cache, tok, torch.tensor([[33 + steps]]))
        ref = _decode(model, direct, tok, torch.tensor([[33 + steps]]))
        assert torch.equal(logits, ref)      # the job does not touch the cache's rows
        steps += 1
        tok = logits.argmax(-1, keepdim=True)
    assert ran == costs and job.next_cost == 0 and job.remaining_cost == 0
    assert job_cache.batch_size == 1
    out = direct.prefill(joining, chunk_size=chunk, order=order)
    assert job.commit() == [1]
    assert job.state == "committed" and job_cache.batch_size == 2
    assert torch.equal(job.output.logits, out.logits)
    _assert_identical_rows(job_cache, direct)
    assert job_cache.get_seq_length() == direct.get_seq_length()
    assert job_cache.layer_budgets == direct.layer_budgets
    toks = torch.tensor([[7], [9]])
    pos = torch.tensor([[33 + steps], [41]])
    for i in range(3):
        a, b = _decode(model, job_cache, toks, pos + i), _decode(model, direct, toks, pos + i)
        assert torch.equal(a, b)
        toks = a.argmax(-1, keepdim=True)
    assert job_cache.pool.store.pages_used == direct.pool.store.pages_used


def test_a_job_into_an_empty_cache_and_with_re_eviction():
    """The first prompt of a cache as a job (the store is created for the cache), and the
    per-slot re-eviction state carried by the commit: both caches re-evict alike."""
    model = make_model("qwen2")
    a_prompt, b_prompt = _prompts(30, 26, seed=7)
    kw = dict(method="ada_snapkv", budget=8, window=4, page_size=4, max_growth=6,
              max_batch=2)
    direct, jobbed = AdaKVCache(model, **kw), AdaKVCache(model, **kw)
    direct.prefill(a_prompt, chunk_size=8)
    job = PrefillJob(jobbed, a_prompt, chunk_size=8)
    assert jobbed.pool.store is None
    job.run()
    assert job.commit() == [0] and jobbed.pool.store is not None
    direct.prefill(b_prompt)
    job = PrefillJob(jobbed, b_prompt)
    job.run()
    job.commit()
    _assert_identical_rows(jobbed, direct)
    toks, pos = torch.tensor([[3], [4]]), torch.tensor([[30], [26]])
    for i in range(20):                               # past max_growth: re-evicts twice
        a, b = _decode(model, jobbed, toks, pos + i), _decode(model, direct, toks, pos + i)
        assert torch.equal(a, b)
        toks = a.argmax(-1, keepdim=True)
    assert [l.n_reevict for l in jobbed.adakv_layers] == \
        [l.n_reevict for l in direct.adakv_layers]
    assert all(l.n_reevict > 0 for l in jobbed.adakv_layers)
    _assert_identical_rows(jobbed, direct)


@pytest.mark.parametrize("order", ["auto", "chunk"])
def test_a_cancelled_job_gives_its_pages_back(order):
    model = make_model("llama")
    first, joining = _prompts(20, 45)
    c = AdaKVCache(model, method="ada_snapkv", budget=8, window=4, page_size=4, max_batch=2)
    c.prefill(first)
    used = c.pool.store.pages_used
    job = PrefillJob(c, joining, chunk_size=8, order=order)
    for _ in range(3):
        job.step()
    # chunk-major holds the raw chunks in pages; layer-major (3 chunks of layer 0) none yet
    assert (job.pages_held() > 0) == (order == "chunk")
    assert c.pool.store.pages_used == used + job.pages_held()
    job.cancel()
    assert job.state == "cancelled" and job.pages_held() == 0
    assert c.pool.store.pages_used == used and c.batch_size == 1
    job.cancel()                                   # idempotent
    with pytest.raises(RuntimeError, match="cancelled"):
        job.step()
    ref = AdaKVCache(model, method="ada_snapkv", budget=8, window=4, page_size=4, max_batch=2)
    ref.prefill(first)
    tok = torch.tensor([[6]])
    assert torch.equal(_decode(model, c, tok, torch.tensor([[20]])),
                       _decode(model, ref, tok, torch.tensor([[20]])))
    job = PrefillJob(c, joining, chunk_size=8, order=order)   # the slot is free again
    job.run()
    assert job.commit() == [1]


def test_job_errors():
    model = make_model("llama")
    first, joining = _prompts(20, 25)
    c = AdaKVCache(model, budget=8, window=4, page_size=4, max_batch=1)
    c.prefill(first)
    job = PrefillJob(c, joining, chunk_size=10)
    with pytest.raises(RuntimeError, match="run every unit first"):
        job.commit()
    with pytest.raises(RuntimeError, match="max_sequences=1"):
        job.run()                           # no slot left: layer 0's eviction fails
    assert job.state == "failed"
    job.cancel()
    assert c.batch_size == 1 and c.pool.store.pages_used > 0
    with pytest.raises(ValueError, match="input_ids"):
        PrefillJob(c, joining[0])
    with pytest.raises(NotImplementedError, match="storage='paged'"):
        PrefillJob(AdaKVCache(model, budget=8, window=4, storage="flat"), joining)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        PrefillJob(AdaKVCache(make_model("gemma3"), budget=8, window=4), joining)
    ok = AdaKVCache(model, budget=8, window=4, page_size=4)
    job = PrefillJob(ok, joining)
    job.run()
    with pytest.raises(RuntimeError, match="done"):
        job.step()
    job.commit()
    with pytest.raises(RuntimeError, match="committed"):
        job.commit()


@pytest.mark.parametrize("bad,err,pat", [
    (lambda a: a - 100, ValueError, r"token ids in \[0, 128\)"),
    (lambda a: a + 1000, ValueError, r"token ids in \[0, 128\)"),
    (lambda a: a.float(), TypeError, "integer tensor"),
    (lambda a: a.bool(), TypeError, "integer tensor"),
    (lambda a: a.tolist(), TypeError, "tensor, got list"),
    (lambda a: a[None], ValueError, r"\[B, N\]"),
    (lambda a: a[:, :0], ValueError, r"N >= 1"),
])
@pytest.mark.parametrize("how", ["prefill", "job"])
def test_a_bad_prompt_is_refused_before_any_work(bad, err, pat, how):
    """Ids out of the vocabulary (on CUDA a device-side assert inside the embedding), a float,
    bool or list prompt, a wrong shape: refused naming ``input_ids``, with the cache's rows and
    pages as they were; an attention mask of another shape likewise."""
    model = make_model("llama")
    a, b = _prompts(20, 25)
    cache = AdaKVCache(model, budget=8, window=4, page_size=4, max_batch=3)
    cache.prefill(a)
    used = cache.pool.store.pages_used

    def run(ids, mask=None):
        if how == "prefill":
            cache.prefill(ids, mask, chunk_size=7)
        else:
            PrefillJob(cache, ids, mask, chunk_size=7).run()

    with pytest.raises(err, match=pat):
        run(bad(b))
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        run(b, torch.ones(1, 24, dtype=torch.long))
    assert cache.batch_size == 1 and cache.pool.store.pages_used == used
    run(b)                                   # the cache takes a good prompt after them
    if how == "job":
        assert cache.batch_size == 1         # (a job joins on commit)
    else:
        assert cache.batch_size == 2


@pytest.mark.parametrize("order", ["auto", "chunk"])
def test_the_cache_may_add_remove_fork_and_restore_rows_while_a_job_runs(order):
    """Between two units the cache prefills a row, forks one, removes one and restores a
    snapshot; the commit then joins the job's prompt after those rows, identical to the same
    prompt prefilled directly at that point."""
    model = make_model("llama")
    a, b, c = _prompts(33, 41, 20)
    kw = dict(method="ada_snapkv", budget=10, window=6, page_size=4, max_batch=5)
    cache, ref = AdaKVCache(model, **kw), AdaKVCache(model, **kw)
    for x in (cache, ref):
        x.prefill(a)
    job = PrefillJob(cache, b, chunk_size=7, order=order)
    job.step()
    snap = cache.snapshot()
    tok = torch.tensor([[5]])
    _decode(model, cache, tok, torch.tensor([[33]]))          # a token the restore drops
    cache.restore(snap)
    job.step()
    for x in (cache, ref):
        x.prefill(c)
        x.fork_rows([0])
        x.remove_rows([1])                                     # rows: a, fork of a
    job.run()
    ref.prefill(b, chunk_size=7, order=order)
    assert job.commit() == [2]
    _assert_identical_rows(cache, ref)
    toks, pos = torch.tensor([[5], [6], [7]]), torch.tensor([[33], [33], [41]])
    for i in range(2):
        assert torch.equal(_decode(model, cache, toks, pos + i), _decode(model, ref, toks, pos + i))


@pytest.mark.parametrize("order", ["auto", "chunk"])
def test_a_reset_while_a_job_holds_pages_refuses_its_commit(order):
    model = make_model("llama")
    a, b, c = _prompts(33, 41, 20)
    cache = AdaKVCache(model, budget=10, window=6, page_size=4, max_batch=3, num_pages=400)
    cache.prefill(a)
    old = cache.pool.store
    job = PrefillJob(cache, b, chunk_size=7, order=order)
    while job.pages_held() == 0:
        job.step()
    cache.reset()
    cache.prefill(c)                                # a new store
    assert cache.pool.store is not old
    job.run()
    with pytest.raises(RuntimeError, match="reset"):
        job.commit()
    held = job.pages_held()
    assert cache.batch_size == 1 and held > 0
    used = old.pages_used               # the old store: the job's pages and the reset row's
    job.cancel()
    assert job.pages_held() == 0 and old.pages_used == used - held
    assert cache.batch_size == 1


def test_a_reset_before_a_job_writes_a_page_lets_it_join_the_next_store():
    model = make_model("llama")
    a, b = _prompts(33, 41)
    kw = dict(budget=10, window=6, page_size=4, max_batch=3)
    cache, ref = AdaKVCache(model, **kw), AdaKVCache(model, **kw)
    cache.prefill(a)
    job = PrefillJob(cache, b, chunk_size=7)         # layer-major: pages at layer 0's end
    job.step()
    assert job.pages_held() == 0
    cache.reset()
    job.run()
    assert job.commit() == [0]
    ref.prefill(b, chunk_size=7)
    _assert_identical_rows(cache, ref)
