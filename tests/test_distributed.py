"""Tensor parallelism (SPEC 8, issue 15) on CPU: 2 and 4 gloo processes, each holding a
contiguous block of the heads (and its o_proj columns), give exactly the single-process kept
sets for every method that allocates across heads (Ada-KV, Ada-Pyramid, AdaCriticalKV,
DefensiveKV in both forms, Layer-DefensiveKV across layers), plus the per-head methods; a
world size that does not divide the heads is a clear error."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import HAVE_OPS

pytestmark = pytest.mark.skipif(not HAVE_OPS or not dist.is_available(),
                                reason="adakv_ops extension or torch.distributed missing")

TESTS = Path(__file__).resolve().parent
B, Hq, Hk, N, W, D, HIDDEN = 3, 8, 4, 57, 6, 16, 24
CASES = [  # (method, as_written, budget)
    ("ada_snapkv", False, 9), ("snapkv", False, 9), ("ada_pyramid", False, 9),
    ("streaming", False, 9), ("criticalkv", False, 9), ("ada_criticalkv", False, 9),
    ("ada_criticalkv", True, 9), ("defensivekv", False, 9), ("defensivekv", True, 9),
    ("ada_snapkv", False, 0), ("defensivekv", False, 60),
]
N_LAYERS = 3


def _inputs(seed):
    from conftest import make_key_start, make_qkv, randn
    layers = []
    for layer in range(N_LAYERS):
        q, k, v = make_qkv(B, Hq, Hk, N, W, D, seed + layer)
        wo = randn((HIDDEN, Hq * D), seed + 100 + layer)
        layers.append((q, k, v, wo))
    return layers, make_key_start(B, N, seed)


def _shard(t, dim, rank, world):
    n = t.shape[dim] // world
    return t.narrow(dim, rank * n, n).contiguous()


def _select(policy, layers, ks, C, shards, rank, world):
    """Kept (idx, count) of every layer (cascade for layer_defensivekv)."""
    from adakv_ops.cascade import LayerCascade
    out = []
    cascade = None
    if policy.method == "layer_defensivekv":
        cascade = LayerCascade(N_LAYERS, policy.cascade_slots(C, W))
    for li, (q, k, v, wo) in enumerate(layers):
        if shards is not None:
            q, k, v = (_shard(x, 1, rank, world) for x in (q, k, v))
            wo = _shard(wo, 1, rank, world)
        Cl = policy.layer_budget(li, N_LAYERS, N, W)
        if cascade is not None:
            kept, retrim = policy.keep_layer(cascade, q, k, v, wo, Cl, ks, shards=shards)
            for j, keep in enumerate(retrim):
                if keep is None:
                    continue
                idx, cnt = out[j]
                rows = []
                for b in range(idx.shape[0]):
                    for h in range(idx.shape[1]):
                        cols = idx[b, h, :int(cnt[b, h])].tolist()
                        rows.append([c for p, c in enumerate(cols) if bool(keep[b, h, p])])
                new_idx = torch.full_like(idx, -1)
                new_cnt = torch.zeros_like(cnt)
                for s, cols in enumerate(rows):
                    b, h = divmod(s, idx.shape[1])
                    new_idx[b, h, :len(cols)] = torch.tensor(cols, dtype=new_idx.dtype)
                    new_cnt[b, h] = len(cols)
                out[j] = (new_idx, new_cnt)
        else:
            kept = policy.keep(q, k, Cl, key_start=ks, value=v, o_proj_weight=wo, shards=shards)
        out.append((kept.kept_idx.clone(), kept.kept_count.clone()))
    return out


def _cases():
    return CASES + [("layer_defensivekv", False, 9), ("layer_defensivekv", True, 9)]


def _join(rank, world, rendezvous):
    """Join the test's gloo group through a rendezvous file (no TCP port to race for)."""
    sys.path.insert(0, str(TESTS))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)


def _worker(rank, world, rendezvous, result_dir):
    _join(rank, world, rendezvous)
    try:
        import adakv_ops  # noqa: F401
        from adakv_ops.distributed import HeadShards
        from adakv_ops.policy import EvictionPolicy
        shards = HeadShards()
        assert shards.check_heads(Hq, Hk) == (Hq // world, Hk // world)
        layers, ks = _inputs(7)
        res = {}
        for method, aw, C in _cases():
            pol = EvictionPolicy(method=method, budget=C, window=W, as_written=aw)
            res[(method, aw, C)] = _select(pol, layers, ks, C, shards, rank, world)
        torch.save(res, Path(result_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _rendezvous(tmp_path):
    return str(tmp_path / "rendezvous")


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_heads_keep_the_single_device_sets(world, tmp_path):
    from adakv_ops.policy import EvictionPolicy
    mp.spawn(_worker, args=(world, _rendezvous(tmp_path), str(tmp_path)), nprocs=world,
             join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    layers, ks = _inputs(7)
    for method, aw, C in _cases():
        pol = EvictionPolicy(method=method, budget=C, window=W, as_written=aw)
        want = _select(pol, layers, ks, C, None, 0, 1)
        for li in range(N_LAYERS):
            idx = torch.cat([p[(method, aw, C)][li][0] for p in parts], dim=1)
            cnt = torch.cat([p[(method, aw, C)][li][1] for p in parts], dim=1)
            assert torch.equal(cnt, want[li][1]), (method, aw, C, li)
            assert torch.equal(idx, want[li][0]), (method, aw, C, li)


def _bad_worker(rank, world, rendezvous, result_dir):
    _join(rank, world, rendezvous)
    try:
        from adakv_ops.distributed import HeadShards
        try:
            HeadShards().check_heads(8, 2)
            msg = "no error"
        except ValueError as e:
            msg = str(e)
        (Path(result_dir) / f"err{rank}.txt").write_text(msg)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_heads_not_divisible_by_the_world_size(tmp_path):
    mp.spawn(_bad_worker, args=(4, _rendezvous(tmp_path), str(tmp_path)), nprocs=4, join=True)
    for r in range(4):
        msg = (tmp_path / f"err{r}.txt").read_text()
        assert "num_key_value_heads = 2 is not divisible by the tensor-parallel world size 4" \
            in msg


def test_head_shards_needs_an_initialised_group():
    from adakv_ops.distributed import HeadShards
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        HeadShards()


# -- the Hugging Face cache under transformers' tensor parallelism (tp_plan="auto") -----------

HF_METHODS = [("ada_snapkv", False), ("ada_criticalkv", False), ("defensivekv", False),
              ("layer_defensivekv", False), ("defensivekv", True)]


def _tiny(family, path):
    import transformers
    from test_hf import COMMON, FAMILIES
    cfg_name, model_name, extra = FAMILIES[family]
    kw = dict(COMMON, num_attention_heads=8, num_key_value_heads=4)
    cfg = getattr(transformers, cfg_name)(**kw, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg).eval()
    model.save_pretrained(path)


def _hf_run(model, storage):
    from test_hf import make_batch

    from adakv_ops.hf import AdaKVCache, cache_kwarg
    ids, mask = make_batch(2, 48, pads=(0, 5))
    out = {}
    for method, aw in HF_METHODS:
        cache = AdaKVCache(model, method=method, budget=7, window=4, storage=storage,
                           as_written=aw)
        with torch.no_grad():
            toks = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=6, min_new_tokens=6, **cache_kwarg(cache))
        out[(method, aw)] = (toks, [l.segment_lengths() for l in cache.adakv_layers],
                             cache.settings.shards is not None)
    return out


def _tp_worker(rank, world, rendezvous, path, result_file, run, *args):
    """Load the model at ``path`` with transformers' tensor parallelism on a gloo group of
    ``world`` processes and save ``run(model, *args)`` to ``result_file`` (``{rank}``)."""
    _join(rank, world, rendezvous)
    try:
        import transformers
        from transformers import AutoModelForCausalLM
        if hasattr(transformers, "DistributedConfig"):     # newer transformers
            tp = dict(distributed_config=transformers.DistributedConfig(tp_plan="auto"))
        else:
            tp = dict(tp_plan="auto")
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa",
                                                     **tp).eval()
        torch.save(run(model, *args), result_file.format(rank=rank))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family,world,storage", [("llama", 2, "paged"), ("qwen2", 2, "flat"),
                                                  ("llama", 4, "paged"), ("mistral", 2, "paged"),
                                                  ("qwen3", 2, "paged"), ("gemma3", 2, "flat")])
def test_hf_cache_under_tensor_parallelism(family, world, storage, tmp_path):
    """Each rank's cache holds its own heads; greedy tokens and every head's kept length equal
    the single-process run."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")          # transformers' tp_plan loading needs it
    from transformers import AutoModelForCausalLM
    path = str(tmp_path / "model")
    _tiny(family, path)
    mp.spawn(_tp_worker, args=(world, _rendezvous(tmp_path), path,
                               str(tmp_path / "hf{rank}.pt"), _hf_run, storage),
             nprocs=world, join=True)
    parts = [torch.load(tmp_path / f"hf{r}.pt") for r in range(world)]
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    want = _hf_run(model, storage)
    for key, (toks, lens, tp) in want.items():
        assert not tp
        for r, p in enumerate(parts):
            r_toks, r_lens, r_tp = p[key]
            assert r_tp
            assert torch.equal(r_toks, toks), (key, r)
            for li, (one, mine) in enumerate(zip(lens, r_lens)):
                H = len(one) // 2                               # 2 batch rows
                hk = H // world                                 # this rank's heads
                own = [one[b * H + r * hk + h] for b in range(2) for h in range(hk)]
                assert mine == own, (key, r, li)


def _engine_run(model, rotary_append=False):
    from test_serve import _prompts

    import adakv_ops
    from adakv_ops.serve import Engine
    prompts = _prompts(5, seed=2, lo=12, hi=40)
    news = [5, 2, 7, 4, 3]
    out = {}
    fused = []                    # the query heads of each paged_append_rotary_ call
    real = adakv_ops.ops.paged_append_rotary_

    def counted(*a, **k):
        fused.append(a[4].shape[1])
        return real(*a, **k)

    adakv_ops.ops.paged_append_rotary_ = counted
    try:
        for method in ("ada_snapkv", "defensivekv"):
            eng = Engine(model, num_pages=3000, max_batch=3, chunk_size=8, method=method,
                         budget=6, window=4, page_size=4, rotary_append=rotary_append)
            rids = [eng.add_request(prompts[i], news[i]) for i in range(2)]
            eng.step()
            rids += [eng.add_request(prompts[i], news[i]) for i in range(2, 5)]
            eng.run()
            out[method] = [eng.result(r) for r in rids]
    finally:
        adakv_ops.ops.paged_append_rotary_ = real
    return out, sorted(set(fused))


@pytest.mark.parametrize("rotary_append", [False, True])
def test_engine_under_tensor_parallelism(rotary_append, tmp_path):
    """One engine per rank, fed the same requests (SPMD): joins, waits and leaves stay in
    lockstep (admission reads the fewest free pages of all ranks) and every request gets the
    single-process tokens (of the unfused forward, also with each rank's attention on
    paged_append_rotary_: its heads of the sharded projections)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM
    path = str(tmp_path / "model")
    _tiny("llama", path)
    mp.spawn(_tp_worker, args=(2, _rendezvous(tmp_path), path, str(tmp_path / "eng{rank}.pt"),
                               _engine_run, rotary_append), nprocs=2, join=True)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    want, none = _engine_run(model)
    assert none == []
    for r in range(2):
        got, fused = torch.load(tmp_path / f"eng{r}.pt")
        assert got == want, r
        assert fused == ([4] if rotary_append else []), r    # this rank's 4 of the 8 q heads


def _layer_major_run(model):
    """Kept lengths and logits of a layer-major and a chunk-major chunked prefill (unpadded
    batch of 2), and the greedy continuation of the layer-major one."""
    from adakv_ops.hf import AdaKVCache, cache_kwarg
    ids = torch.randint(2, 128, (2, 45), generator=torch.Generator().manual_seed(13))
    out = {}
    for method in ("ada_snapkv", "layer_defensivekv"):
        res = []
        for order in ("layer", "chunk"):
            cache = AdaKVCache(model, method=method, budget=7, window=4)
            logits = cache.prefill(ids, chunk_size=10, order=order).logits
            tok = logits[:, -1:].argmax(-1)
            toks = [tok]
            with torch.no_grad():
                for i in range(3):
                    tok = model(input_ids=tok, position_ids=torch.full((2, 1), 45 + i),
                                use_cache=True, **cache_kwarg(cache)).logits[:, -1:].argmax(-1)
                    toks.append(tok)
            res.append((torch.cat(toks, 1), logits,
                        [l.segment_lengths() for l in cache.adakv_layers]))
        out[method] = res
    return out


def test_layer_major_prefill_under_tensor_parallelism(tmp_path):
    """A layer-major chunked prefill under tensor parallelism (2 gloo ranks; the cascade of
    layer_defensivekv exchanges across ranks layer by layer): each rank gives the chunk-major
    logits and lengths bit for bit, and the single-process tokens and kept lengths."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM
    path = str(tmp_path / "model")
    _tiny("llama", path)
    mp.spawn(_tp_worker, args=(2, _rendezvous(tmp_path), path, str(tmp_path / "lm{rank}.pt"),
                               _layer_major_run), nprocs=2, join=True)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    want = _layer_major_run(model)
    for r in range(2):
        got = torch.load(tmp_path / f"lm{r}.pt")
        for method, ((toks, logits, lens), (c_toks, c_logits, c_lens)) in got.items():
            assert torch.equal(toks, c_toks) and torch.equal(logits, c_logits), (method, r)
            assert lens == c_lens, (method, r)
            w_toks, _, w_lens = want[method][0]
            assert torch.equal(toks, w_toks), (method, r)
            for one, mine in zip(w_lens, lens):
                H = len(one) // 2
                hk = H // 2
                assert mine == [one[b * H + r * hk + h] for b in range(2) for h in range(hk)]
