#!/usr/bin/env python
"""Peers of the serving benchmark (issue 13: "in the same run"), importable by ``bench_serve.py``.

CPU smoke test:     python benchmarks/serve_peers.py --cpu

Both functions take an already built model (random weights are fine), prompts (lists of token
ids) and new-token counts (one int, or one per prompt), decode greedily with no end-of-sequence
token (every request generates exactly its count) and return a dict of plain numbers
(JSON-serialisable). Times are wall clock, synchronised with the device; ``peak_gib`` is
``torch.cuda.max_memory_allocated`` after a reset (``None`` on the CPU). Free the engine's page
pool before calling them: transformers sizes its pool from the free memory.

* :func:`run_generate_batch`: transformers' own continuous batching over its paged *full*
  cache. Equal counts: ``model.generate_batch(inputs=prompts,
  generation_config=GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=-1),
  continuous_batching_config=ContinuousBatchingConfig(...), record_timestamps=True,
  persistent_manager=True)`` (the manager is kept only to read what it chose, then destroyed).
  Counts that differ: ``generate_batch`` takes one ``max_new_tokens`` for all, so the loop it
  runs is run here with each request's own count: ``with
  model.continuous_batching_context_manager(...) as m: m.add_request(ids, max_new_tokens=n_i,
  eos_token_id=-1, record_timestamps=True)`` per prompt, then ``m.get_result()`` until all are
  finished. ``api`` says which ran. ``eos_token_id=-1`` is what both versions read as "no eos".
  Attention: transformers' paged SDPA. On 5.17 that is ``"paged|sdpa"``
  (``integrations/sdpa_paged.py``), set before the manager starts so that it does not switch
  to flash attention; on 5.24 it is plain ``"sdpa"`` over the ``PagedAttentionCache`` (the
  ``paged|`` prefix is deprecated there) with ``auto_switch_to_flash=False``. The name is found
  by asking ``ALL_ATTENTION_FUNCTIONS`` for ``"paged|sdpa"``; ``attn_impl_used`` records what
  ran, including any switch the manager made (``attn_impl_calls``). The pool: blocks of
  ``block_size`` tokens of every layer (``page_size`` on 5.24, ``block_size`` on 5.17),
  ``num_blocks`` of them, sized by transformers from the free memory (``max_memory_percent``,
  0.8-0.9 on a GPU) unless given; ``max_batch_tokens`` caps the tokens of one forward. Reported:
  ``num_blocks``, ``token_capacity`` (blocks x block size), ``kv_pool_gib`` (the pool tensors),
  ``max_requests_per_batch`` and ``max_concurrent`` (the most requests alive at once, from
  the requests' lifespans: started, i.e. prefilling, until finished).
* :func:`run_oneshot_adakv`: the library's pre-engine way: one :class:`AdaKVCache`, every prompt
  left-padded into one batch and prefilled in one forward (``cache.prefill(ids, mask)``), then
  an eager greedy loop of ``max(counts) - 1`` decode forwards (the first token comes from the
  prefill logits, as in the engine), each row at its own position (``position_ids`` = its prompt
  length + step; no mask: padding was never kept). Every row decodes to the longest count.
  Reported: ``prefill_s``, ``decode_tok_s`` (``B * steps / decode seconds``),
  ``prefill_peak_gib`` and ``peak_gib``, ``kv_bytes`` (``cache.kv_bytes()``). A CUDA
  out-of-memory error gives ``{"oom": True, "batch": B, "phase": ...}`` (memory freed).

Rates of :func:`run_generate_batch`: ``wall_s`` runs from the first request added to the last
one finished (the requests' own ``perf_counter`` stamps: the warm-up and the teardown of the
call are left out; ``call_s`` has them); ``tok_s_incl_prefill`` = generated tokens / ``wall_s``;
``ttft_*`` from the first token's stamp. ``decode_tok_s``: the same prompts are run again with
1 new token each (``prefill_only_wall_s``); ``(generated - requests) / (wall_s -
prefill_only_wall_s)`` is the rate of the decode work (transformers' scheduler puts prefill
chunks and decode tokens in the same forwards, so this is the extra time the decode tokens
cost, not a time of decode-only steps). ``decode_tok_s_tail``: the tokens stamped after the
last request's first token over that interval (no prefill left, a shrinking batch).

Against ``adakv_ops.serve.Engine`` (same model, prompts and counts):

* the full cache holds every token of every request: its concurrency is bounded by the pool
  (``token_capacity`` over prompt + generated lengths), the engine's by ``budget + window`` rows
  per head after eviction plus the generated tokens; per decode step the full cache reads every
  token (SDPA over the gathered blocks), the engine the kept rows;
* the one-shot AdaKVCache holds as little KV as the engine but fixes the batch at one prefill:
  the activations of that ``B x N`` forward (every padded token through attention and the MLP)
  bound ``B``, nobody joins or leaves, and every row decodes until the longest is done;
* neither peer is compiled or CUDA-graphed here (transformers' continuous batching compiles
  only with ``default_compile_level`` or compile configs, which ``cb_options`` can pass).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import statistics
import sys
import time
from typing import Optional, Sequence, Union

import torch
import transformers
from transformers import GenerationConfig

from adakv_ops.hf import AdaKVCache, cache_kwarg, restore_attention

__all__ = ["PeerError", "run_generate_batch", "run_oneshot_adakv"]

Counts = Union[int, Sequence[int]]


class PeerError(RuntimeError):
    """A peer could not run (the message says which API, transformers version and why)."""


# ---------------------------------------------------------------------------------------------
# helpers


def _counts(prompts, max_new_tokens: Counts) -> list[int]:
    if not prompts:
        raise ValueError("serve_peers: no prompts")
    if isinstance(max_new_tokens, int):
        counts = [max_new_tokens] * len(prompts)
    else:
        counts = [int(n) for n in max_new_tokens]
    if len(counts) != len(prompts):
        raise ValueError(f"serve_peers: {len(counts)} new-token counts for {len(prompts)} prompts")
    if min(counts) < 1 or min(len(p) for p in prompts) < 1:
        raise ValueError("serve_peers: every prompt and new-token count must be >= 1")
    return counts


def _is_cuda(model) -> bool:
    return model.device.type == "cuda"


def _sync(model) -> None:
    if _is_cuda(model):
        torch.cuda.synchronize(model.device)


def _free(model) -> None:
    gc.collect()
    if _is_cuda(model):
        torch.cuda.empty_cache()


def _peak_gib(model) -> Optional[float]:
    return torch.cuda.max_memory_allocated(model.device) / 2**30 if _is_cuda(model) else None


def _reset_peak(model) -> None:
    _free(model)
    if _is_cuda(model):
        torch.cuda.reset_peak_memory_stats(model.device)


def _prompt_stats(prompts, counts) -> dict:
    lens = [len(p) for p in prompts]
    return {"requests": len(prompts), "prompt_len_min": min(lens), "prompt_len_max": max(lens),
            "prompt_len_mean": statistics.fmean(lens), "prompt_tokens": sum(lens),
            "new_min": min(counts), "new_max": max(counts), "requested_tokens": sum(counts)}


def _base(model, peer: str) -> dict:
    dev = model.device
    return {"kind": "peer", "peer": peer, "transformers": transformers.__version__,
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
            "dtype": str(model.dtype).replace("torch.", "")}


def _max_overlap(intervals) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals],
                    key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


# ---------------------------------------------------------------------------------------------
# transformers' continuous batching (paged full cache)


def _cb_config(block_size, num_blocks, max_batch_tokens, no_flash_switch, options):
    """A ``ContinuousBatchingConfig`` with only the fields this transformers has. Returns
    (config, name of the block-size field)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    # 5.24: page_size (block_size deprecated); 5.17: block_size only
    block_field = "page_size" if "page_size" in fields else "block_size"
    kw = {block_field: block_size}
    if num_blocks is not None:
        kw["num_blocks"] = num_blocks
    if max_batch_tokens is not None:
        kw["max_batch_tokens"] = max_batch_tokens
    if no_flash_switch and "auto_switch_to_flash" in fields:      # 5.24; not in 5.17
        kw["auto_switch_to_flash"] = False
    for k, v in (options or {}).items():
        if k not in fields:
            raise ValueError(f"serve_peers: ContinuousBatchingConfig of transformers "
                             f"{transformers.__version__} has no field {k!r}")
        kw[k] = v
    return ContinuousBatchingConfig(**kw), block_field


def _paged_name(attn_impl: str) -> str:
    """The name under which this transformers runs ``attn_impl`` over its paged cache."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if attn_impl.startswith("paged|") or attn_impl.startswith("flash"):
        return attn_impl
    paged = f"paged|{attn_impl}"
    # 5.17 registers "paged|sdpa" (integrations/sdpa_paged.py); 5.24 only "paged|eager": there
    # plain sdpa runs over the PagedAttentionCache and "paged|sdpa" is a deprecated alias
    return paged if paged in ALL_ATTENTION_FUNCTIONS else attn_impl


def _manager_info(mgr) -> dict:
    cfg = mgr.continuous_batching_config
    bp = getattr(mgr, "batch_processor", None)
    cache = getattr(bp, "cache", None)
    pool = None
    if cache is not None:
        if isinstance(getattr(cache, "cache_tensor", None), torch.Tensor):          # 5.24
            pool = cache.cache_tensor.nbytes
        elif getattr(cache, "key_cache", None) is not None:                          # 5.17
            pool = sum(t.nbytes for t in list(cache.key_cache) + list(cache.value_cache))
    block = getattr(cfg, "page_size", None) or getattr(cfg, "block_size", None)
    nb = getattr(cfg, "num_blocks", None)
    graphs = getattr(cfg, "use_cuda_graph", None)
    return {"num_blocks": nb, "block_size": block,
            "token_capacity": nb * block if nb is not None and block else None,
            "max_batch_tokens": getattr(cfg, "max_batch_tokens", None),
            "max_requests_per_batch": getattr(cfg, "max_requests_per_batch", None),
            "use_cuda_graph": list(graphs) if isinstance(graphs, tuple) else graphs,
            "use_async_batching": getattr(cfg, "use_async_batching", None),
            "prefix_sharing": getattr(mgr, "_use_prefix_sharing", None),
            "kv_pool_gib": None if pool is None else pool / 2**30}


def _cb_once(model, prompts, counts, cb_cfg, warmup, want_info):
    """One continuous-batching run. Returns (outputs in prompt order, manager info, call s);
    raises :class:`PeerError` (CUDA out-of-memory errors of the calling thread unchanged)."""
    if not hasattr(model, "generate_batch"):
        raise PeerError(f"serve_peers: transformers {transformers.__version__} has no "
                        f"generate_batch")
    try:
        return _cb_run(model, prompts, counts, cb_cfg, warmup, want_info)
    except (PeerError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001
        raise PeerError(f"serve_peers: transformers {transformers.__version__} continuous "
                        f"batching failed (attention {model.config._attn_implementation!r}): "
                        f"{type(e).__name__}: {e}") from e


@torch.no_grad()
def _cb_run(model, prompts, counts, cb_cfg, warmup, want_info):
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(counts), eos_token_id=-1)
    cb_cfg = dataclasses.replace(cb_cfg)          # the manager resolves a copy; keep ours clean
    uniform = len(set(counts)) == 1
    info = {}
    t0 = time.perf_counter()
    if uniform:
        api = "generate_batch"
        res = model.generate_batch(inputs=[list(p) for p in prompts], generation_config=gen,
                                   continuous_batching_config=cb_cfg, record_timestamps=True,
                                   persistent_manager=True, warmup=warmup)
        mgr = getattr(model, "_cached_continuous_batching_manager", None)
        try:
            if mgr is not None and want_info:
                info = _manager_info(mgr)
        finally:
            if mgr is not None:
                mgr.batch_processor = None
                model.destroy_cached_continuous_batching_manager()
        outs = list(res.values())                 # generate_batch returns them in input order
    else:
        api = "continuous_batching_context_manager+add_request"
        try:
            from transformers.generation.continuous_batching.utils import WorkloadHints
            hints = {"workload_hints": WorkloadHints(
                max_prompt_length=max(len(p) for p in prompts),
                max_generated_length=max(counts), num_requests=len(prompts))}
        except ImportError:
            hints = {}
        with model.continuous_batching_context_manager(
                generation_config=gen, continuous_batching_config=cb_cfg, block=True,
                timeout=5, warmup=warmup, **hints) as mgr:
            rids = [mgr.add_request(list(p), max_new_tokens=n, eos_token_id=-1,
                                    record_timestamps=True) for p, n in zip(prompts, counts)]
            got = {}
            while len(got) < len(rids):
                r = mgr.get_result(timeout=1)
                if r is None:
                    if not mgr.is_running():
                        break
                    continue
                if r.is_finished():
                    got[r.request_id] = r
            if want_info:
                info = _manager_info(mgr)
        outs = [got.get(r) for r in rids]
    _sync(model)
    call_s = time.perf_counter() - t0
    bad = [i for i, o in enumerate(outs) if o is None or o.error is not None]
    if len(outs) != len(prompts) or bad:
        errs = sorted({str(o.error)[:300] for o in outs if o is not None and o.error})
        raise PeerError(f"serve_peers: {api} (transformers {transformers.__version__}) "
                        f"returned {sum(o is not None for o in outs)} of {len(prompts)} "
                        f"results, {len(bad)} missing or failed; errors: {errs or 'none'}")
    wrong = [(i, len(o.generated_tokens), n) for i, (o, n) in enumerate(zip(outs, counts))
             if len(o.generated_tokens) != n]
    if wrong:
        raise PeerError(f"serve_peers: {api} generated the wrong number of tokens "
                        f"(request, got, asked): {wrong[:8]}")
    info["api"] = api
    return outs, info, call_s


def run_generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: Counts, *,
                       block_size: int = 256, num_blocks: Optional[int] = None,
                       max_batch_tokens: Optional[int] = None, attn_impl: Optional[str] = "sdpa",
                       decode_split: bool = True, warmup: bool = True,
                       cb_options: Optional[dict] = None, return_tokens: bool = False) -> dict:
    """transformers' continuous batching (``generate_batch``, paged full cache), greedy, no eos.

    ``block_size``: tokens per cache block (transformers' default 256); ``num_blocks`` /
    ``max_batch_tokens``: ``None`` lets transformers size them from the free memory.
    ``attn_impl``: ``"sdpa"`` (run as this version's paged SDPA, flash switch off), ``"eager"``
    (``paged|eager``), a flash implementation, or ``None`` (transformers' own choice).
    ``decode_split``: also time the same prompts with 1 new token each (for ``decode_tok_s``).
    ``cb_options``: more ``ContinuousBatchingConfig`` fields. ``return_tokens``: add the
    generated ids (``tokens``, in prompt order). Raises :class:`PeerError` (a ``RuntimeError``)
    when a request fails or the run cannot start (a CUDA out-of-memory error of this thread,
    e.g. while the pool is allocated, propagates as it is). Leaves the model on the attention
    implementation it came with."""
    counts = _counts(prompts, max_new_tokens)
    rec = _base(model, "hf_generate_batch")
    rec.update(_prompt_stats(prompts, counts))
    entry_impl = model.config._attn_implementation
    if entry_impl and entry_impl.startswith("adakv_"):      # an AdaKVCache / Engine hooked it
        restore_attention(model)
    preset = None if attn_impl is None else _paged_name(attn_impl)
    cb_cfg, block_field = _cb_config(block_size, num_blocks, max_batch_tokens,
                                     no_flash_switch=attn_impl is not None
                                     and not attn_impl.startswith("flash"),
                                     options=cb_options)
    # record every implementation the manager switches the model to (and back)
    seen = []
    set_impl = model.set_attn_implementation

    def recording_set(impl, *a, **k):
        seen.append(impl)
        return set_impl(impl, *a, **k)

    cb_log = logging.getLogger("ContinuousBatchingLogger")
    level = cb_log.level
    try:
        if preset is not None and model.config._attn_implementation != preset:
            set_impl(preset)
        start_impl = model.config._attn_implementation
        model.set_attn_implementation = recording_set
        cb_log.setLevel(logging.ERROR)     # persistent-manager / eos notices we asked for
        _reset_peak(model)
        outs, info, call_s = _cb_once(model, prompts, counts, cb_cfg, warmup, True)
        peak = _peak_gib(model)
        used = seen[0] if seen else start_impl
        outs1 = None
        if decode_split:
            _free(model)
            outs1, _, _ = _cb_once(model, prompts, [1] * len(prompts), cb_cfg, warmup, False)
    finally:
        cb_log.setLevel(level)
        model.__dict__.pop("set_attn_implementation", None)
        if model.config._attn_implementation != entry_impl:
            model.set_attn_implementation(entry_impl)
        _free(model)

    def span(os_):
        return min(o.created_time for o in os_), max(o.lifespan[1] for o in os_)

    t_start, t_end = span(outs)
    wall = t_end - t_start               # first request added -> last request finished
    gen = sum(len(o.generated_tokens) for o in outs)
    ts = [o.timestamps for o in outs]
    rec.update(info)
    rec.update({"attn_impl_requested": attn_impl, "attn_impl_used": used,
                "attn_impl_calls": seen, "block_size_field": block_field,
                "generated_tokens": gen, "wall_s": wall, "call_s": call_s,
                "tok_s_incl_prefill": gen / wall,
                "max_concurrent": _max_overlap([o.lifespan for o in outs]),
                "peak_gib": peak, "decode_tok_s": None, "prefill_only_wall_s": None,
                "decode_tok_s_tail": None, "ttft_median_s": None, "ttft_max_s": None})
    if all(t is not None and len(t) == len(o.generated_tokens) for t, o in zip(ts, outs)):
        first = sorted(t[0] - t_start for t in ts)
        rec["ttft_median_s"], rec["ttft_max_s"] = statistics.median(first), first[-1]
        last_first = max(t[0] for t in ts)
        tail = sum(sum(1 for x in t if x > last_first) for t in ts)
        if tail and t_end > last_first:
            rec["decode_tok_s_tail"] = tail / (t_end - last_first)
    if outs1 is not None:
        a, b = span(outs1)
        rec["prefill_only_wall_s"] = b - a
        if wall > b - a and gen > len(outs):
            rec["decode_tok_s"] = (gen - len(outs)) / (wall - (b - a))
    if return_tokens:
        rec["tokens"] = [list(o.generated_tokens) for o in outs]
    return rec


# ---------------------------------------------------------------------------------------------
# one-shot AdaKVCache: one padded batch, one prefill, eager decode


@torch.no_grad()
def _oneshot(model, prompts, counts, state, cache_kw, compile=False):
    dev = model.device
    B, N = len(prompts), max(len(p) for p in prompts)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    ids = torch.zeros(B, N, dtype=torch.long, device=dev)
    mask = torch.zeros(B, N, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):                      # left padding
        ids[b, N - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=dev)
        mask[b, N - len(p):] = 1
    cache = AdaKVCache(model, **cache_kw)
    state["phase"] = "prefill"
    _sync(model)
    t0 = time.perf_counter()
    out = cache.prefill(ids, mask)
    tok = out.logits[:, -1:].argmax(-1)
    del out
    _sync(model)
    t1 = time.perf_counter()
    prefill_peak = _peak_gib(model)
    kv_prefill = cache.kv_bytes()
    steps = max(counts) - 1
    toks = [tok]
    ckw = cache_kwarg(cache, model)
    state["phase"] = "decode"
    fwd, warm, cuda = model.forward, 0, _is_cuda(model)
    if compile:   # docs/hf.md: fixed tensors, pages handed out before each step, CUDA graphs
        fwd = torch.compile(model.forward, mode="reduce-overhead" if cuda else None,
                            fullgraph=True)
        cache.ensure_capacity(steps + 1)
        warm = min(2, steps)
    compile_s = 0.0
    for i in range(steps):
        if i == warm and warm:
            _sync(model)
            compile_s = time.perf_counter() - t1
            t1 = time.perf_counter()
        if compile:
            cache.prepare_decode(1)
            if cuda:
                torch.compiler.cudagraph_mark_step_begin()
        out = fwd(input_ids=tok, position_ids=(lens + i).unsqueeze(1), **ckw, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        toks.append(tok)
    out = None
    _sync(model)
    t2 = time.perf_counter()
    steps -= warm          # the timed steps (compilation and graph recording left out)
    tokens = torch.cat(toks, 1).tolist()
    prefill_s, decode_s = t1 - t0, t2 - t1
    rec = {"batch": B, "padded_len": N, "padding_tokens": B * N - int(lens.sum()),
           "prefill_s": prefill_s, "prefill_tok_s": int(lens.sum()) / prefill_s,
           "decode_steps": steps, "decode_s": decode_s, "compiled": compile,
           "compile_s": compile_s, "warmup_steps": warm,
           "decode_tok_s": B * steps / decode_s if steps else None,
           "ms_per_step": 1e3 * decode_s / steps if steps else None,
           "generated_tokens": B * (steps + warm + 1),
           "wall_s": prefill_s + compile_s + decode_s,
           "tok_s_incl_prefill": sum(counts) / (prefill_s + compile_s + decode_s),
           "prefill_peak_gib": prefill_peak, "kv_bytes_after_prefill": kv_prefill,
           "kv_bytes": cache.kv_bytes(), "kv_gib": cache.kv_bytes() / 2**30}
    return rec, [t[:n] for t, n in zip(tokens, counts)]


def run_oneshot_adakv(model, prompts: Sequence[Sequence[int]], max_new_tokens: Counts, *,
                      method: str = "ada_snapkv", budget: int = 1024, window: int = 32,
                      storage: str = "paged", return_tokens: bool = False,
                      compile: bool = False, **cache_options) -> dict:
    """One ``AdaKVCache`` (``method``, ``budget``, ``window``, ``storage`` and any other
    ``cache_options``, e.g. ``page_size``), every prompt left-padded into one batch and
    prefilled in one forward, then ``max(counts) - 1`` eager greedy decode steps for every row
    (each row at its own position); ``compile``: the decode forward compiled as docs/hf.md
    shows (``torch.compile(mode="reduce-overhead", fullgraph=True)``, CUDA graphs; the first
    2 steps, compilation and recording, are timed apart as ``compile_s``). ``requested_tokens`` counts each row's own count,
    ``generated_tokens`` what the batch computed. A CUDA out-of-memory error gives
    ``{"oom": True, "batch": B, "phase": ...}`` with the memory freed. Leaves the model on the
    attention implementation it came with."""
    counts = _counts(prompts, max_new_tokens)
    rec = _base(model, "adakv_oneshot")
    rec.update(_prompt_stats(prompts, counts))
    rec.update({"method": method, "budget": budget, "window": window, "storage": storage,
                "cache_options": {k: v for k, v in cache_options.items()}})
    entry_impl = model.config._attn_implementation
    state = {"phase": "setup"}
    cache_kw = dict(method=method, budget=budget, window=window, storage=storage, **cache_options)
    res, oom = None, False
    _reset_peak(model)
    try:
        res = _oneshot(model, prompts, counts, state, cache_kw, compile)
    except torch.OutOfMemoryError:
        oom = True          # the frames (cache, activations) are released with the exception
    finally:
        if model.config._attn_implementation != entry_impl:
            model.set_attn_implementation(entry_impl)
    peak = _peak_gib(model)
    _free(model)
    if oom:
        rec.update({"oom": True, "batch": len(prompts), "phase": state["phase"],
                    "peak_gib": peak})
        return rec
    r, tokens = res
    rec.update(r)
    rec.update({"oom": False, "peak_gib": peak})
    if return_tokens:
        rec["tokens"] = tokens
    return rec


# ---------------------------------------------------------------------------------------------
# CPU smoke test


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                      max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.float32).eval()


def smoke() -> bool:
    t0 = time.perf_counter()
    torch.set_num_threads(1)     # a tiny model: more threads only add barriers (they stall
    model = _tiny_model()        # badly when another process shares the cores)
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(40, 91, (4,), generator=g).tolist()
    news = [5, 8, 6, 7]                   # differ: the add_request path runs too
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lens]
    cpu_cb = dict(block_size=16, num_blocks=64, max_batch_tokens=256)
    ok = True

    def greedy(p, n):
        out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p),
                             dtype=torch.long), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, len(p):].tolist()

    # ragged counts: the manager + add_request path; equal counts: generate_batch itself
    for counts in (news, max(news)):
        r = run_generate_batch(model, prompts, counts, return_tokens=True, **cpu_cb)
        toks = r.pop("tokens")
        ns = [counts] * len(prompts) if isinstance(counts, int) else counts
        match = all(t == greedy(p, n) for t, p, n in zip(toks, prompts, ns))
        print(json.dumps(r), flush=True)
        print(f"generate_batch matches generate: {match} (api {r['api']}, "
              f"{len(prompts)} prompts, new tokens {ns})", flush=True)
        ok &= match and model.config._attn_implementation == "sdpa"

    r = run_oneshot_adakv(model, prompts, news, budget=16, window=4, page_size=8,
                          return_tokens=True)
    toks = r.pop("tokens")
    print(json.dumps(r), flush=True)
    # the same cache through model.generate (left-padded batch) gives the same tokens
    N = max(lens)
    ids = torch.tensor([[0] * (N - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (N - len(p)) + [1] * len(p) for p in prompts])
    cache = AdaKVCache(model, budget=16, window=4, page_size=8)
    out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwarg(cache),
                         max_new_tokens=max(news), min_new_tokens=max(news), do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    ref = [row[N:N + n] for row, n in zip(out.tolist(), news)]
    restore_attention(model)
    match = toks == ref
    print(f"oneshot loop matches AdaKVCache generate: {match}", flush=True)
    ok &= match and not r["oom"]
    print(f"smoke {'ok' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f} s", flush=True)
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="CPU smoke test (tiny random Llama)")
    args = ap.parse_args(argv)
    if not args.cpu:
        sys.exit("serve_peers.py: the GPU runs are part of bench_serve.py (import "
                 "run_generate_batch / run_oneshot_adakv); this command is the CPU smoke: --cpu")
    sys.exit(0 if smoke() else 1)


if __name__ == "__main__":
    main()
