"""Tests of the evaluation pipeline (``adakv_ops.eval``) and of the pieces of ``adakv_ops.hf``
it relies on (``QueryRecorder``, ``AdaKVCache.evict_from``), on tiny random models (CPU).
The CLI test is the end-to-end smoke run CI does."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import HAVE_OPS

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

if HAVE_OPS:
    from adakv_ops.eval import (METHODS_ALL, PromptBuilder, TASKS, load_model, make_samples,
                                run_sample, run_text)
    from adakv_ops.eval.__main__ import main as eval_main
    from adakv_ops.eval.report import aggregate, compact_record, sign_test_p
    from adakv_ops.eval.report import main as report_main
    from adakv_ops.eval.models import ByteTokenizer
    from adakv_ops.hf import AdaKVCache, QueryRecorder

from transformers import DynamicCache  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["tiny-random-llama", "tiny-random-gemma3"])
def tiny(request):
    model, tok, info = load_model(request.param)
    return model, tok, info


def _prefill_adakv(model, ids, method, budget, window, **kw):
    cache = AdaKVCache(model, method=method, budget=budget, window=window, reserve=16, **kw)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    return cache, out


@pytest.mark.parametrize("storage", ["paged", "flat"])
@pytest.mark.parametrize("method", ["ada_snapkv", "snapkv", "pyramid", "streaming", "full"])
def test_evict_from_matches_prefill_eviction(tiny, method, storage):
    """Evicting a DynamicCache afterwards == evicting inside the prefill forward: the same rows
    in every segment, and the same logits for the tokens that follow."""
    model, _, _ = tiny
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (1, 97))
    nxt = torch.randint(0, 256, (1, 5))
    window, budget = 8, 13
    ref, _ = _prefill_adakv(model, ids, method, budget, window, storage=storage)
    full = DynamicCache(config=model.config)
    with QueryRecorder(model, window) as rec:
        model(input_ids=ids, past_key_values=full, use_cache=True)
    got = AdaKVCache(model, method=method, budget=budget, window=window, reserve=16,
                     storage=storage)
    got.evict_from(full, rec.windows)
    assert got.get_seq_length() == ref.get_seq_length() == ids.shape[1]
    assert len(got.adakv_layers) >= 1
    for a, b in zip(ref.adakv_layers, got.adakv_layers):
        assert a.segment_lengths() == b.segment_lengths()
        for s in range(len(a.segment_lengths())):
            for x, y in zip(a.segment_kv(s), b.segment_kv(s)):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
        assert a.budget == b.budget
    l_ref = model(input_ids=nxt, past_key_values=ref, use_cache=True).logits
    l_got = model(input_ids=nxt, past_key_values=got, use_cache=True).logits
    torch.testing.assert_close(l_got, l_ref, rtol=1e-5, atol=1e-5)
    # the full cache is untouched and reusable
    assert full.get_seq_length() == ids.shape[1]


def test_query_recorder_concatenates_forwards(tiny):
    model, _, _ = tiny
    torch.manual_seed(2)
    a, b = torch.randint(0, 256, (1, 40)), torch.randint(0, 256, (1, 5))
    one = DynamicCache(config=model.config)
    with QueryRecorder(model, 12) as rec1:
        model(input_ids=torch.cat([a, b], 1), past_key_values=one, use_cache=True)
    two = DynamicCache(config=model.config)
    with QueryRecorder(model, 12) as rec2:
        model(input_ids=a, past_key_values=two, use_cache=True)
        model(input_ids=b, past_key_values=two, use_cache=True)
    assert set(rec1.windows) == set(rec2.windows) == set(range(model.config.num_hidden_layers))
    for i in rec1.windows:
        assert rec1.windows[i].shape[2] == 12
        torch.testing.assert_close(rec1.windows[i], rec2.windows[i], rtol=1e-5, atol=1e-5)
    # outside the context manager nothing is recorded
    model(input_ids=b, past_key_values=DynamicCache(config=model.config), use_cache=True)
    assert rec2.windows[0].shape[2] == 12


def test_evict_from_errors(tiny):
    model, _, _ = tiny
    ids = torch.randint(0, 256, (1, 30))
    full = DynamicCache(config=model.config)
    with QueryRecorder(model, 8) as rec:
        model(input_ids=ids, past_key_values=full, use_cache=True)
    cache = AdaKVCache(model, budget=4, window=8)
    with pytest.raises(ValueError, match="query window"):
        cache.evict_from(full, {i: w[:, :, :2] for i, w in rec.windows.items()})
    cache = AdaKVCache(model, budget=4, window=8)
    cache.evict_from(full, rec.windows)
    with pytest.raises(RuntimeError, match="empty cache"):
        cache.evict_from(full, rec.windows)


@pytest.mark.parametrize("task", TASKS)
def test_tasks_are_seeded_sized_and_answerable(task):
    tok = ByteTokenizer()
    a = make_samples(task, 600, 3, tok, seed=5)
    b = make_samples(task, 600, 3, tok, seed=5)
    c = make_samples(task, 600, 3, tok, seed=6)
    assert [s.context for s in a] == [s.context for s in b]
    assert [s.context for s in a] != [s.context for s in c]
    assert [s.depth for s in a] == [0.0, 0.5, 1.0]
    builder = PromptBuilder(tok, chat=False)
    for s in a:
        p = builder.build(s)
        n = len(p.context) + len(p.question)
        assert 0.75 * 600 <= n <= 1.1 * 600, n
        assert tok.decode(p.answer) == s.answer
        # every answer item is stated in the context
        for item in s.answer.replace(", and ", ", ").replace("VAR ", "").strip(" \"").split(", "):
            assert item in s.context, (item, task)


def test_run_sample_records(tiny):
    model, tok, info = tiny
    s = make_samples("passkey", 300, 1, tok)[0]
    p = PromptBuilder(tok, info["chat"]).build(s)
    fracs = [0.1, 0.3]
    methods = METHODS_ALL + ("defensivekv:as_written",)
    recs = run_sample(model, p, methods, fracs, window=8)
    assert len(recs) == 2 * (1 + (len(methods) - 1) * len(fracs))
    for r in recs:
        types = (getattr(model.config, "layer_types", None)
                 or ["full_attention"] * model.config.num_hidden_layers)
        n_global = sum(t == "full_attention" for t in types)
        assert len(r["evict_l1"]) == n_global >= 1     # one entry per evicted layer
        assert r["evict_rel_mean"] >= 0.0
        if r["method"] == "full":
            assert max(r["evict_l1"]) == 0.0 and r["kept_fraction"] == 1.0
        else:
            assert r["C"] == max(1, round(r["budget_frac"] * r["n_tokens"]))
            assert r["kept_fraction"] < 1.0
            assert min(r["evict_l1"]) >= 0.0
    # agnostic compresses the context only
    n = {r["setting"]: r["n_tokens"] for r in recs}
    assert n["aware"] == len(p.context) + len(p.question) and n["agnostic"] == len(p.context)


def test_run_text_full_is_exact(tiny):
    model, _, _ = tiny
    ids = torch.randint(0, 256, (200,)).tolist()
    recs = run_text(model, ids, ["full", "snapkv"], [0.2], prefix=160, cont=40, window=8)
    full = [r for r in recs if r["method"] == "full"][0]
    assert abs(full["kl"]) < 1e-6 and full["top1_agreement"] == 1.0
    ev = [r for r in recs if r["method"] == "snapkv"][0]
    assert ev["kl"] >= 0.0 and 0.0 <= ev["top1_agreement"] <= 1.0


def test_cli_smoke(tmp_path):
    """End to end, as in CI: tiny random model, two samples per task, every method, JSON +
    markdown (+ plots when matplotlib is installed), then --resume adds nothing."""
    out = tmp_path / "tiny.json"
    args = ["--model", "tiny-random-llama", "--lengths", "200", "--samples", "2", "--budgets",
            "0.1", "0.4", "--window", "8", "--text-prefix", "128", "--text-cont", "16",
            "--text-segments", "1", "--out", str(out), "--no-progress"]
    assert eval_main(args) == 0
    res = json.loads(out.read_text())
    n_methods = len(METHODS_ALL) - 1                    # every method but full, 2 budgets
    assert len(res["records"]) == len(TASKS) * 2 * 2 * (1 + n_methods * 2)
    assert res["aggregates"]["accuracy"]["aware"]["full@1"]["n"] == len(TASKS) * 2
    assert len(res["text_records"]) == 1 + n_methods * 2
    assert out.with_suffix(".md").exists()
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "tiny-accuracy.png").exists()
        assert (tmp_path / "tiny-eviction_loss.png").exists()
        assert (tmp_path / "tiny-ada_vs_uniform.png").exists()
    except ImportError:
        pass
    assert eval_main(args + ["--resume"]) == 0
    assert len(json.loads(out.read_text())["records"]) == len(res["records"])
    # the report alone rewrites the markdown from the JSON, identically
    md = out.with_suffix(".md").read_text()
    out.with_suffix(".md").unlink()
    assert report_main([str(out), "--no-plots"]) == 0
    assert out.with_suffix(".md").read_text() == md


def test_sign_test_p():
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(5, 5) == 1.0
    assert sign_test_p(0, 10) == pytest.approx(2 / 1024)
    assert sign_test_p(10, 0) == sign_test_p(0, 10)
    assert sign_test_p(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)


def test_compact_record_and_old_records_aggregate_alike():
    old = {"task": "passkey", "length": 100, "sample": 0, "setting": "aware",
           "method": "snapkv", "budget_frac": 0.1, "correct": True, "kept_fraction": 0.123456789,
           "evict_l1": [1.0, 3.0], "evict_rel": [0.1, 0.3], "layer_budgets": [10, 10]}
    new = compact_record(old)
    assert "layer_budgets" not in new and "evict_rel" not in new
    assert new["evict_rel_mean"] == pytest.approx(0.2) and new["kept_fraction"] == 0.12346
    a, b = aggregate([old], []), aggregate([new], [])
    assert a["eviction_rel"] == b["eviction_rel"] and a["eviction_l1"] == b["eviction_l1"]
    assert b["eviction_l1_by_layer"]["aware"]["snapkv@0.1"] == [1.0, 3.0]


def test_cli_local_model_directory(tmp_path):
    """--model takes a local Hugging Face directory (model + tokenizer saved by
    save_pretrained), the path users with their own checkpoints take."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the pass key is 12345. remember it. what is the pass key?"] * 20,
                            vocab_size=300, special_tokens=["<s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64,
                                         intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=4096))
    d = tmp_path / "my-model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / "res.json"
    assert eval_main(["--model", str(d), "--tasks", "passkey", "--lengths", "200",
                      "--samples", "1", "--budgets", "0.2", "--window", "8",
                      "--text-segments", "0", "--out", str(out), "--no-progress",
                      "--no-plots"]) == 0
    res = json.loads(out.read_text())
    assert res["model"]["name"] == "my-model" and res["model"]["chat"] is False
    assert len(res["records"]) == 2 * len(METHODS_ALL)


def test_default_text_fallback_files_exist():
    # an installed wheel run outside a checkout reads the package's own modules as prose
    from pathlib import Path

    import adakv_ops
    from adakv_ops.eval import __main__ as cli

    pkg = Path(adakv_ops.__file__).resolve().parent
    cwd = Path.cwd()
    import os
    os.chdir("/")
    try:
        files = cli._default_text()
    finally:
        os.chdir(cwd)
    assert all(f.exists() for f in files), files
    # from a wheel (CI) nothing above the package is a checkout: the fallback is what is read
    if not (pkg.parents[1] / "README.md").exists():
        assert all(pkg in f.parents for f in files), files


def test_authors_ordering_on_eviction_loss():
    def rec(method, frac, l1):
        return {"setting": "agnostic", "task": "kv", "length": 100, "sample": 0,
                "method": method, "budget_frac": frac, "correct": False, "evict_l1": [l1],
                "evict_rel_mean": 0.0, "kept_fraction": frac}
    records = [rec("full", 1.0, 0.0)]
    for m, a, b in (("snapkv", 5.0, 3.0), ("ada_snapkv", 5.0, 2.5), ("ada_criticalkv", 4.0, 2.0),
                    ("defensivekv", 3.0, 2.2), ("layer_defensivekv", 2.0, 1.0)):
        records += [rec(m, 0.1, a), rec(m, 0.2, b)]
    rows = aggregate(records, [])["authors_ordering"]
    assert [(r["budget_frac"], r["holds"]) for r in rows] == [(0.1, True), (0.2, False)]
    assert rows[1]["loss"]["defensivekv"] == 2.2 and rows[1]["form"] == "default"
    # the authors' forms as written, where they ran, in the follow-ups' places
    records += [rec("defensivekv:as_written", 0.2, 1.9), rec("layer_defensivekv:as_written", 0.2, 1.5)]
    rows = aggregate(records, [])["authors_ordering"]
    aw = [r for r in rows if r["form"] == "as_written"]
    assert [(r["budget_frac"], r["holds"]) for r in aw] == [(0.2, True)]
    assert aw[0]["loss"] == {"snapkv": 3.0, "ada_snapkv": 2.5,      # no ada_criticalkv:as_written
                             "defensivekv": 1.9, "layer_defensivekv": 1.5}
    pairs = {(r["ada"], r["uniform"]) for r in aggregate(records, [])["ada_vs_uniform"]}
    assert ("defensivekv:as_written", "ada_snapkv") in pairs
    assert ("layer_defensivekv:as_written", "layer_defensivekv") in pairs
