"""The fused rotary decode forward (``adakv_ops.hf.rotary_decode``, ``Engine(rotary_append=
True)``): every request gets the greedy tokens it gets alone on the unfused model, eager and
compiled with batch buckets, with joins, leaves and decode-time re-eviction; the fused path
really runs; other modules and prefill keep their forward.

Tiny random-weight models of ``test_hf`` (CPU, float32; the CUDA case is skipped without a
GPU). The op itself is tested in test_paged_rotary.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import HAVE_OPS

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

from test_hf import make_model  # noqa: E402
from test_serve import KW, _alone, _prompts  # noqa: E402

if HAVE_OPS:
    import adakv_ops
    from adakv_ops.hf.rotary_decode import install_rotary_decode, uninstall_rotary_decode
    from adakv_ops.serve import Engine

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture
def count_fused(monkeypatch):
    """Counts the eager calls of ``adakv_ops.ops.paged_append_rotary_`` (the layers' path)."""
    calls = []
    real = adakv_ops.ops.paged_append_rotary_

    def counted(*args, **kwargs):
        calls.append(args[4].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(adakv_ops.ops, "paged_append_rotary_", counted)
    return calls


def _run(eng, prompts, news, join_after=2):
    """Requests 0..join_after-1 first, the rest join after two steps; runs to the end."""
    rids = [eng.add_request(p, n) for p, n in zip(prompts[:join_after], news[:join_after])]
    eng.step()
    eng.step()
    rids += [eng.add_request(p, n) for p, n in zip(prompts[join_after:], news[join_after:])]
    eng.run()
    return rids


@pytest.mark.parametrize("family", FAMILIES)
def test_rotary_append_gives_the_unfused_tokens_of_each_request_alone(family, count_fused):
    model = make_model(family)
    prompts = _prompts(5, seed=41)
    news = [6, 9, 3, 7, 5]
    want = [_alone(model, p, n, chunk=8) for p, n in zip(prompts, news)]   # unfused model
    assert not count_fused
    eng = Engine(model, num_pages=4000, max_batch=3, chunk_size=8, rotary_append=True, **KW)
    n_layers = model.config.num_hidden_layers
    assert eng.rotary_modules == n_layers
    rids = _run(eng, prompts, news)
    for rid, w in zip(rids, want):
        assert eng.result(rid) == w, rid
    # every decode step of every layer took the fused path; no prefill did
    steps = eng.stats["decode_steps"]
    assert len(count_fused) == steps * n_layers
    assert all(s[2] == 1 for s in count_fused)        # one token per row: decode only
    assert eng.pages_free == 4000


def test_rotary_append_compiled_with_buckets_and_reeviction():
    """compile=True (aot_eager): fixed shapes per batch bucket with pad rows (segment_index
    -1 entries: the query is rotated, nothing stored), re-eviction (the window queries are
    the fused op's rotated ones), a fork: the tokens of each request alone, unfused."""
    import torch._dynamo.testing

    model = make_model("llama")
    kw = dict(KW, max_growth=5)
    prompts = _prompts(3, seed=43, lo=12, hi=40)
    news = [14, 6, 19]
    want = [_alone(model, p, n, **kw) for p, n in zip(prompts, news)]
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    eng = Engine(model, num_pages=4000, max_batch=4, compile=True, backend=counter,
                 rotary_append=True, **kw)
    rids = [eng.add_request(p, n) for p, n in zip(prompts[:2], news[:2])]
    eng.step()
    eng.step()
    rids.append(eng.add_request(prompts[2], news[2]))
    eng.step()
    copy = eng.fork(rids[0])[0]
    reevicted = 0                     # (the counters restart when the last request leaves)
    while eng.has_work():
        eng.step()
        reevicted = max(reevicted, min(l.n_reevict for l in eng.cache.adakv_layers))
    assert reevicted >= 1
    for rid, w in zip(rids, want):
        assert eng.result(rid) == w, rid
    assert eng.result(copy) == eng.result(rids[0])
    assert counter.frame_count <= 3
    graphs = "\n".join(str(g.graph) for g in counter.graphs)
    assert "paged_append_rotary_" in graphs and "paged_append_.default" not in graphs


def test_install_is_idempotent_and_uninstall_restores_the_classes():
    model = make_model("qwen3")
    attn = [m for m in model.modules() if type(m).__name__ == "Qwen3Attention"]
    n = len(attn)
    assert install_rotary_decode(model) == n
    assert install_rotary_decode(model) == n
    assert all(type(m).__name__ == "RotaryDecodeQwen3Attention" for m in attn)
    assert isinstance(attn[0], type(attn[0]).__mro__[2])             # still a Qwen3Attention
    assert uninstall_rotary_decode(model) == n
    assert all(type(m).__name__ == "Qwen3Attention" for m in attn)
    assert uninstall_rotary_decode(model) == 0
    gemma = make_model("gemma3")                                      # not a supported class
    assert install_rotary_decode(gemma) == 0


def test_a_plain_cache_and_generate_are_unchanged(count_fused):
    """A model with the fused forward installed: transformers' own cache and generate() give
    the outputs of the original forward (the fused path only serves AdaKVCache decode)."""
    model = make_model("llama")
    ids = torch.randint(2, 128, (2, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
        install_rotary_decode(model)
        got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    assert not count_fused


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_with_adakv_cache_on_the_fused_forward(family, count_fused):
    """Outside the engine: generate() with a paged AdaKVCache on a model with the fused forward
    installed (left-padded batch) gives the unfused model's tokens, and its decode steps take
    the fused path."""
    from test_hf import generate, make_batch

    from adakv_ops.hf import AdaKVCache
    model = make_model(family)
    ids, mask = make_batch(3, 30)
    want = generate(model, ids, mask, AdaKVCache(model, **KW), n=8)
    assert install_rotary_decode(model) == model.config.num_hidden_layers
    got = generate(model, ids, mask, AdaKVCache(model, **KW), n=8)
    assert torch.equal(got, want)
    assert len(count_fused) == 7 * model.config.num_hidden_layers    # 7 decode forwards


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_rotary_append_engine(compile):
    """The CUDA kernel in the engine (fp32 tiny model, joins and leaves, buckets with pad rows
    when compiled): the tokens of the unfused engine."""
    prompts = _prompts(5, seed=47)
    news = [4, 8, 2, 6, 5]
    results = []
    for rotary in (False, True):
        model = make_model("llama").cuda()
        eng = Engine(model, num_pages=4000, max_batch=4, chunk_size=8, compile=compile,
                     backend="aot_eager", rotary_append=rotary, **KW)
        rids = _run(eng, prompts, news, join_after=3)
        results.append([eng.result(r) for r in rids])
    assert results[1] == results[0]
