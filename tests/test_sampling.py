"""adakv_ops.sampling.select_next (the engine's next-token selection) and sampling requests in
the engine: greedy rows stay exact, the sampled distribution is the one asked for."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import HAVE_OPS

if HAVE_OPS:
    from adakv_ops.sampling import SamplingParams, select_next

pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

P = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])


def _draw(n, temperature=1.0, top_p=1.0, top_k=0, seed=0, probs=P):
    logits = probs.clamp(min=1e-30).log().expand(n, -1).contiguous()
    logits[:, probs == 0] = float("-inf")
    g = torch.Generator().manual_seed(seed)
    ids = select_next(logits, torch.full((n,), float(temperature)), torch.full((n,), float(top_p)),
                      torch.full((n,), top_k, dtype=torch.int64), generator=g)
    return torch.bincount(ids, minlength=probs.numel()).double() / n


def _close(freq, want, n):
    # 5 standard deviations of a binomial frequency
    sd = (want * (1 - want) / n).sqrt()
    assert torch.all((freq - want).abs() <= 5 * sd + 1e-12), (freq, want)


def test_sampling_follows_the_asked_distribution():
    n = 40_000
    _close(_draw(n), P.double(), n)
    want = P.double() ** 2 / (P.double() ** 2).sum()                  # temperature 0.5
    _close(_draw(n, temperature=0.5, seed=1), want, n)
    want = torch.tensor([0, 0, 3 / 7, 4 / 7, 0], dtype=torch.float64)  # top_k 2
    _close(_draw(n, top_k=2, seed=2), want, n)
    _close(_draw(n, top_p=0.5, seed=3), want, n)                     # 0.4 < 0.5 <= 0.4 + 0.3
    want = torch.tensor([0, 0, 0, 1, 0], dtype=torch.float64)
    assert torch.equal(_draw(100, top_p=0.3, seed=4), want)          # the top token always
    assert torch.equal(_draw(100, top_k=1, seed=5), want)
    assert torch.equal(_draw(100, temperature=0.0, seed=6), want)     # greedy
    assert _draw(1000, seed=7)[4] == 0                                # impossible token


def test_rows_keep_their_own_settings_and_ties_go_to_the_lower_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 5.0, 5.0]])
    t = torch.tensor([0.0, 1.0, 1.0])
    p = torch.tensor([1.0, 1.0, 1.0])
    k = torch.tensor([0, 1, 0])
    for seed in range(20):
        out = select_next(logits, t, p, k, generator=torch.Generator().manual_seed(seed))
        assert out[0] == 1 and out[1] == 1 and out[2] in (2, 3)


def test_sampling_params_validation():
    for bad in (dict(temperature=-1), dict(temperature=math.nan), dict(temperature=True),
                dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(top_k=2.0)):
        with pytest.raises(ValueError, match="adakv: (temperature|top_p|top_k)"):
            SamplingParams(**bad)
    assert SamplingParams().greedy and SamplingParams(1.0, top_k=1).greedy
    assert not SamplingParams(0.7).greedy


def test_engine_sampling_requests():
    pytest.importorskip("transformers")
    from test_hf import make_model
    from test_serve import KW, _alone, _prompts

    from adakv_ops.serve import AdmissionError, Engine
    model = make_model("llama")
    prompts = _prompts(3, seed=41)

    def run(seed):
        eng = Engine(model, num_pages=4000, max_batch=6, seed=seed, **KW)
        a = eng.add_request(prompts[0], 12, temperature=1.0)
        b = eng.add_request(prompts[1], 7)                              # greedy next to it
        c = eng.add_request(prompts[2], 9, temperature=0.8, top_p=0.9, top_k=20)
        eng.step()
        copies = eng.fork(a, 2)
        out = eng.run()
        return [out[r] for r in (a, b, c, *copies)]

    first, again, other = run(0), run(0), run(1)
    assert first == again and first != other                        # seeded, reproducible
    assert first[1] == _alone(model, prompts[1], 7)                 # the greedy one is exact
    assert [len(x) for x in first] == [12, 7, 9, 12, 12]
    assert all(0 <= t < model.config.vocab_size for x in first for t in x)
    assert first[3] != first[0] or first[4] != first[0]             # forks sample on their own
    eng = Engine(model, num_pages=4000, max_batch=4, **KW)
    with pytest.raises(AdmissionError, match="top_p"):
        eng.add_request(prompts[0], 4, top_p=2.0)
