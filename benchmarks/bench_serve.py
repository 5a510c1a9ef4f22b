#!/usr/bin/env python
"""Serving benchmark of ``adakv_ops.serve.Engine`` (issue 13): a stream of requests, continuous
batching, one GPU.

Usage (one H200):   python benchmarks/bench_serve.py --requests 64 --prompt 32768 \\
                        --new 256,1024 --compile --out serve.jsonl
CPU smoke test:     python benchmarks/bench_serve.py --cpu

Model: the Llama-3.1-8B shape of ``bench_generate.py`` (random bf16 weights). Every request is
added at t = 0 (a burst); the engine admits what fits (page arithmetic), prefills each admitted
prompt alone in chunks of ``--chunk``, and decodes every running request one token per step
(``--compile``: ``torch.compile(mode="reduce-overhead")``, one CUDA graph per batch-size
bucket; the first two steps of every batch shape, compilation and graph recording, are
reported apart and left out of the rates). New-token counts are drawn uniformly from ``--new lo,hi`` (seeded).

Reported (JSON lines, then a table): max concurrent requests; decode tokens/s (tokens of
decode steps over the time of decode steps); tokens/s including prefill (all generated tokens
over the wall time); time to first token (median and max, queueing included); peak memory;
the most KV bytes held (pages in use x bytes per page); and per decode step at the largest
batch its time against the roofline (weights minus the embedding table + the kept K/V rows of
the running requests, at the copy bandwidth measured in the same run).

Full concurrency (``--fork-to 64,128,256``): prefilling hundreds of 32K prompts (or dozens of
128K ones) takes longer than one GPU command may run, so this mode prefills ``--requests``
prompts for real and then fills the batch with ``Engine.fork`` copies of them (each copy's
pages are a device copy of its source's: the same bytes per sequence as a real request, and
the decode kernel reads every copy's own pages). At each batch size it decodes ``--warmup``
steps (graph recording), then ``--steps`` timed steps: step time (median, host work and the
per-step token read included, as an engine runs), tokens/s, roofline, KV held, and the cost
of one leave (a cancelled request) and one join (a 512-token request admitted: ms of its
prefill), which should not grow with the batch; on CUDA also the step split into its
attention (every layer's ``paged_decode_attention`` over the running requests' own pages,
replayed alone in a CUDA graph: ms and percent of the copy bandwidth) and the rest (the
weights' side: GEMMs, norms, RoPE, the append, launch gaps; percent of the weights' roofline,
the weights minus the embedding at the copy bandwidth); ``--profile``
adds a ``torch.profiler`` breakdown of the device time of 3 steps at each batch (GEMMs,
the paged decode kernel, the append, fused elementwise, the rest) against the step time.

Streams: ``--prompt-mix 8192,32768,131072`` draws each request's prompt length from the list
(the mixed stream); ``--max-growth`` turns on decode-time re-eviction (the decode-heavy
stream, e.g. ``--prompt 4096 --new 8192,8192 --max-growth 256``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_generate as bg  # noqa: E402
from bench_capacity import copy_bandwidth  # noqa: E402
from bench_ops import graph_replay_ms, spread_stats  # noqa: E402

from adakv_ops.serve import BLAS_POLICIES, Engine  # noqa: E402

JOIN_PROMPT = 512   # prompt tokens of the request admitted to time a join (fork mode)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=None)
    ap.add_argument("--prompt-mix", default=None,
                    help="the stream's prompt lengths drawn uniformly from this list, e.g. "
                         "8192,32768,131072 (the mixed stream of issue 13; burst mode only)")
    ap.add_argument("--new", default=None, help="lo,hi new tokens per request")
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--max-prefill-tokens", type=int, default=16384,
                    help="Engine(max_prefill_tokens=...): prefill work per step; 0: no bound "
                         "(every prefill whole in the step that admits it)")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--num-pages", type=int, default=None,
                    help="pool size (default: 85%% of the free memory after the weights)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--mode", default="reduce-overhead",
                    help="torch.compile mode of the decode step with --compile; max-autotune "
                         "also records CUDA graphs and lets Inductor pick Triton GEMMs")
    ap.add_argument("--no-fuse", action="store_true",
                    help="leave q/k/v_proj and gate/up_proj unfused (Engine(fuse_projections="
                         "False)): the A/B of the fused projections")
    ap.add_argument("--decode-gemm", action="store_true",
                    help="Engine(decode_gemm=True): the projections on adakv's Hopper GEMM")
    ap.add_argument("--rotary-append", action="store_true",
                    help="Engine(rotary_append=True): RoPE fused into the paged append "
                         "(paged_append_rotary_)")
    ap.add_argument("--blas", default="auto", choices=[*BLAS_POLICIES, "none"],
                    help="Engine(blas=...): the decode GEMMs' BLAS library (none: torch's "
                         "setting)")
    ap.add_argument("--max-growth", type=int, default=None,
                    help="decode-time re-eviction every this many tokens per head (the "
                         "decode-heavy stream: e.g. --prompt 4096 --new 8192,8192 "
                         "--max-growth 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fork-to", default=None,
                    help="batch sizes reached by forking the prefilled requests, e.g. 64,128")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-warmup", action="store_true",
                    help="stream mode: no Engine.warmup() before the stream (each new batch "
                         "bucket then compiles during the run)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--peers", type=int, default=0,
                    help="after the engine: this many prompts of the same length through the "
                         "peers of serve_peers.py (transformers generate_batch, one-shot "
                         "AdaKVCache), --peer-new tokens each")
    ap.add_argument("--peer-new", type=int, default=64)
    ap.add_argument("--peer-only", default="generate_batch,oneshot")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cpu = args.cpu
    R = args.requests or (6 if cpu else 64)
    N = args.prompt or (48 if cpu else 32768)
    lo, hi = [int(x) for x in (args.new or ("3,8" if cpu else "256,1024")).split(",")]
    C = args.budget or (8 if cpu else 1024)
    W, P = (4, 8) if cpu else (args.window, args.page_size)
    targets = sorted(int(x) for x in args.fork_to.split(",")) if args.fork_to else []
    if targets and targets[0] < R:
        ap.error(f"--fork-to: every batch must hold the {R} real requests (--requests); "
                 f"got {targets[0]}")
    max_batch = args.max_batch or (max(targets) if targets else (4 if cpu else 256))
    dev = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    bw = copy_bandwidth(dev)
    model = bg.build_model(args, dev, dtype)
    cfg = model.config
    el = torch.empty((), dtype=dtype).element_size()
    D = cfg.head_dim
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    step_weights = weights - model.model.embed_tokens.weight.numel() * el
    page_bytes = 2 * P * D * el
    pages = args.num_pages
    if pages is None:
        pages = 4000 if cpu else int(torch.cuda.mem_get_info()[0] * 0.85 // page_bytes)
    if targets:    # every request outlives the measurement
        n_buckets = len(targets) + 2
        mpt = args.max_prefill_tokens
        join_steps = 1 if not mpt else -(-JOIN_PROMPT // mpt) + 1    # a join's prefill
        lo = hi = n_buckets * (args.warmup + args.steps + join_steps) + 8
    mix = [int(x) for x in args.prompt_mix.split(",")] if args.prompt_mix else [N]
    # the longest request (the fork mode's joins have JOIN_PROMPT prompt tokens): fixes the
    # page tables' width, so the decode graphs keep one shape (Engine docstring)
    max_seq_len = max(mix + [N, JOIN_PROMPT]) + hi
    eng = Engine(model, num_pages=pages, max_batch=max_batch, chunk_size=args.chunk,
                 max_prefill_tokens=args.max_prefill_tokens or None,
                 compile=args.compile, mode=None if cpu else args.mode,
                 method="ada_snapkv", budget=C, window=W, page_size=P,
                 max_growth=args.max_growth, max_seq_len=max_seq_len,
                 fuse_projections=not args.no_fuse,
                 blas=None if args.blas == "none" else args.blas,
                 decode_gemm=args.decode_gemm, rotary_append=args.rotary_append)
    g = torch.Generator().manual_seed(args.seed)
    news = torch.randint(lo, hi + 1, (R,), generator=g).tolist()
    header = {"kind": "header", "device": "cpu" if cpu else torch.cuda.get_device_name(),
              "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "requests": R, "prompt": N, "new": [lo, hi], "budget": C, "window": W,
              "page_size": P, "num_pages": pages, "pool_gib": pages * page_bytes / 2**30,
              "max_batch": max_batch, "chunk": args.chunk,
              "max_prefill_tokens": args.max_prefill_tokens or None, "compile": args.compile,
              "mode": args.mode if args.compile else None,
              "max_growth": args.max_growth, "max_seq_len": max_seq_len,
              "fused_projections": eng.fused_projections, "blas": eng.blas,
              "routed_projections": eng.routed_projections,
              "rotary_modules": eng.rotary_modules,
              "copy_bw_gbs": bw / 1e9, "weights_gib": weights / 2**30}
    print(json.dumps(header), flush=True)
    if targets:
        recs = fork_mode(args, eng, header, news, N, targets, cfg, g, step_weights, bw, el,
                         page_bytes, cpu)
        if args.peers:
            del eng
            run_peers(args, model, N, cfg, g, cpu)
        return recs
    warm_s = 0.0
    if args.compile and not args.no_warmup:
        # the graphs of the buckets this stream can reach, captured before it starts (as a
        # server does at start-up): no request's first token waits for a compilation
        warm_s = eng.warmup([b for b in eng.buckets if b <= eng._bucket(min(R, max_batch))])
        print(f"warm-up (compile + CUDA graphs of the buckets): {warm_s:.1f} s", flush=True)
    t0 = time.perf_counter()
    rids = []
    lens = [mix[int(i)] for i in torch.randint(0, len(mix), (len(news),), generator=g)]
    for n, n_prompt in zip(news, lens):
        prompt = torch.randint(0, cfg.vocab_size, (n_prompt,), generator=g).tolist()
        rids.append(eng.add_request(prompt, n))
    first, last, gaps = {}, {}, []   # gaps: between a request's consecutive tokens (ITL)
    max_conc, max_pages = 0, 0
    steps = []   # (batch, decode seconds of the step, kv rows)
    while eng.has_work():
        B = len(eng.running)
        kv_rows = (sum(sum(l.segment_lengths()) for l in eng.cache.adakv_layers)
                   if B else 0)
        before = eng.stats["decode_s"]
        out = eng.step()
        now = time.perf_counter() - t0
        for rid in out:
            first.setdefault(rid, now)
            if rid in last:
                gaps.append(now - last[rid])
            last[rid] = now
        if B:
            steps.append((B, eng.stats["decode_s"] - before, kv_rows))
        max_conc = max(max_conc, len(eng.running))
        max_pages = max(max_pages, pages - eng.pages_free)
    wall = time.perf_counter() - t0
    st = eng.stats
    # the first 2 steps of every batch shape compile / record graphs: left out of the rates
    seen_shape, warm, timed = {}, [], []
    for s_ in steps:
        shape = eng._bucket(s_[0]) if args.compile else s_[0]
        seen_shape[shape] = seen_shape.get(shape, 0) + 1
        (warm if seen_shape[shape] <= 2 else timed).append(s_)
    Bmax = max((s[0] for s in steps), default=0)
    at_max = [s for s in timed if s[0] == Bmax] or [s for s in steps if s[0] == Bmax]
    med = statistics.median(s[1] for s in at_max) if at_max else float("nan")
    kv = statistics.median(s[2] for s in at_max) if at_max else 0
    roof = (step_weights + kv * 2 * D * el) / bw if not cpu else float("nan")
    ttft = sorted(first[r] for r in rids)
    by_len = {}     # prompt length -> TTFT median (a short prompt behind long ones)
    for n_prompt in sorted(set(lens)):
        by_len[n_prompt] = statistics.median(first[r] for r, n in zip(rids, lens)
                                             if n == n_prompt)
    gaps.sort()
    itl = {"itl_median_ms": statistics.median(gaps) * 1e3 if gaps else None,
           "itl_p99_ms": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] * 1e3 if gaps else None,
           "itl_max_ms": gaps[-1] * 1e3 if gaps else None}
    rec = {"kind": "serve", "max_concurrent": max_conc, "prompt_lengths": lens,
           "engine_warmup_s": warm_s,
           "decode_tok_s": (sum(x[0] for x in timed) / max(sum(x[1] for x in timed), 1e-9)
                            if timed else None),
           "warmup_steps": len(warm), "warmup_s": sum(x[1] for x in warm),
           "prefill_s_total": st["prefill_s"], "prefills": st["prefills"],
           "tok_s_incl_prefill": sum(len(eng.result(r)) for r in rids) / wall,
           "ttft_median_s": statistics.median(ttft), "ttft_max_s": ttft[-1],
           "ttft_median_s_by_prompt": by_len, **itl,
           "wall_s": wall,
           "peak_gib": None if cpu else torch.cuda.max_memory_allocated() / 2**30,
           "kv_held_max_gib": max_pages * page_bytes / 2**30,
           "step_ms_at_max_batch": med * 1e3, "max_batch_seen": Bmax,
           "roofline_ms": roof * 1e3, "pct_roofline": roof / med if not cpu else None}
    print(json.dumps(rec), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(json.dumps(header) + "\n" + json.dumps(rec) + "\n")
    print(f"\nmax concurrent {max_conc}, decode {rec['decode_tok_s'] or 0:.0f} tok/s "
          f"(after {len(warm)} warm-up steps, {rec['warmup_s']:.1f} s), incl. prefill "
          f"{rec['tok_s_incl_prefill']:.0f} tok/s, TTFT median {rec['ttft_median_s']:.2f} s "
          f"(max {rec['ttft_max_s']:.2f}), inter-token gap median / p99 / max "
          f"{rec['itl_median_ms'] or 0:.1f} / {rec['itl_p99_ms'] or 0:.1f} / "
          f"{rec['itl_max_ms'] or 0:.1f} ms, KV held max {rec['kv_held_max_gib']:.2f} GiB, step "
          f"at batch {Bmax}: {rec['step_ms_at_max_batch']:.2f} ms")
    if len(by_len) > 1:
        print("TTFT median by prompt length: " +
              ", ".join(f"{n}: {t:.2f} s" for n, t in by_len.items()))


def run_peers(args, model, N, cfg, g, cpu):
    """The peers of issue 13 on ``--peers`` prompts of ``N`` tokens, ``--peer-new`` new tokens
    each, after the engine's pool is freed; records appended to ``--out``."""
    import gc

    from serve_peers import run_generate_batch, run_oneshot_adakv
    gc.collect()
    if not cpu:
        torch.cuda.empty_cache()
    prompts = [torch.randint(0, cfg.vocab_size, (N,), generator=g).tolist()
               for _ in range(args.peers)]
    recs = []
    for name in args.peer_only.split(","):
        try:
            if name == "generate_batch":
                r = run_generate_batch(model, prompts, args.peer_new)
            else:
                r = run_oneshot_adakv(model, prompts, args.peer_new,
                                      budget=args.budget or (8 if cpu else 1024),
                                      window=4 if cpu else args.window,
                                      page_size=8 if cpu else args.page_size,
                                      compile=args.compile)
        except Exception as e:  # noqa: BLE001 - a peer that fails is recorded, not fatal
            r = {"peer": name, "error": f"{type(e).__name__}: {e}"[:500]}
        r["kind"] = "peer"
        recs.append(r)
        print(json.dumps(r), flush=True)
        gc.collect()
        if not cpu:
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "a") as fh:
            for r in recs:
                fh.write(json.dumps(r) + "\n")
    for r in recs:
        print(f"peer {r.get('peer')}: decode {r.get('decode_tok_s') or 0:.0f} tok/s, incl. "
              f"prefill {r.get('tok_s_incl_prefill') or 0:.0f} tok/s, peak "
              f"{r.get('peak_gib') or 0:.1f} GiB, concurrent "
              f"{r.get('max_concurrent', r.get('batch'))}"
              + (f", ERROR {r['error'][:200]}" if "error" in r else "")
              + (", OOM" if r.get("oom") else ""))
    return recs


def _category(name: str) -> str:
    n = name.lower()
    if "decode_split_kernel" in n or "decode_balanced" in n or "decode_merge" in n:
        return "paged decode attention"
    # before "append": inductor names a kernel after the ops it feeds (the RoPE of k and the
    # copy of v that feed paged_append_ are "triton_..._paged_append_..."; they were counted
    # as the append in the profiles before 2026-12-08)
    if n.startswith("triton") or "fused" in n:
        return "fused elementwise (inductor)"
    if "append" in n:
        return "paged append"
    if any(k in n for k in ("gemm", "xmma", "cutlass", "nvjet", "cublas", "splitk")):
        return "GEMM (cuBLAS)"
    if "memcpy" in n or "memset" in n:
        return "memcpy / memset"
    return "other kernels"


def join_leave(eng, cfg, g, new, cpu, n_join=JOIN_PROMPT):
    """At the current batch: the cost of a leave (a forked request cancelled: its pages freed,
    the tables' rows zeroed, a new segment index) and of a join (a request of ``n_join``
    prompt tokens admitted by the next step: its prefill and eviction, over the steps it
    takes; ``prefill_s`` of the engine's stats), host wall time with the device synchronised. Neither should grow with
    the batch."""
    def sync():
        if not cpu:
            torch.cuda.synchronize()
    sync()
    t0 = time.perf_counter()
    eng.cancel(eng.running[-1])
    sync()
    leave = time.perf_counter() - t0
    rid = eng.add_request(torch.randint(0, cfg.vocab_size, (n_join,), generator=g).tolist(),
                          new)
    before = eng.stats["prefill_s"]
    eng.step()
    while eng.state(rid) in ("queued", "prefilling"):   # over steps (max_prefill_tokens)
        eng.step()
    return {"leave_ms": leave * 1e3, "join_prefill_ms": (eng.stats["prefill_s"] - before) * 1e3,
            "join_prompt": n_join}


def profile_steps(eng, n=3):
    """Device time of ``n`` engine steps by kernel category (ms per step), and the step's wall
    time."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            eng.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n
    cats, top = {}, []
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0)
        if t <= 0 or ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        c = _category(ev.key)
        cats[c] = cats.get(c, 0.0) + t / 1e3 / n
        top.append((t / 1e3 / n, ev.count // n, ev.key[:90]))
    top.sort(reverse=True)
    return {"wall_ms": wall * 1e3, "device_ms": sum(cats.values()),
            "by_category_ms": dict(sorted(cats.items(), key=lambda x: -x[1])),
            "top": [{"ms": round(a, 4), "calls": b, "kernel": k} for a, b, k in top[:25]]}


def attention_alone(eng, cfg, reps=40):
    """The step's attention apart from the rest: ``paged_decode_attention`` of every layer over
    the running requests' own tables and pages (``PagedKVStore.batch_table``, the engine's
    launch schedule), replayed in one CUDA graph, with a random query; the median ms of the
    graph and the K/V bytes it reads. What the step spends beyond it is the weights' side
    (GEMMs, norms, RoPE, the append, launch gaps)."""
    st = eng.cache.pool.store
    seqs = list(eng.cache.pool.seqs)
    Hq, D = cfg.num_attention_heads, cfg.head_dim
    q = torch.randn(len(seqs), Hq, 1, D, device=st.k_pages.device, dtype=st.k_pages.dtype)
    views = [st.batch_table(layer, seqs) for layer in range(cfg.num_hidden_layers)]
    kv_bytes = sum(int(sl.sum()) for _, sl in views) * 2 * D * st.k_pages.element_size()

    def run():
        for table, sl in views:
            torch.ops.adakv.paged_decode_attention(q, st.k_pages, st.v_pages, table, sl,
                                                   None, None)
    return graph_replay_ms(run, reps, warmup=1), kv_bytes


def fork_mode(args, eng, header, news, N, targets, cfg, g, step_weights, bw, el, page_bytes,
              cpu):
    """Prefill ``--requests`` prompts for real, then fork them up to each batch of ``targets``
    and time decode steps there."""
    D = cfg.head_dim
    recs = []
    t0 = time.perf_counter()
    rids = [eng.add_request(torch.randint(0, cfg.vocab_size, (N,), generator=g).tolist(), n)
            for n in news]
    while any(eng.state(r) in ("queued", "prefilling") for r in rids):   # prefilled, joined
        eng.step()
    prefill_wall = time.perf_counter() - t0
    real = list(eng.running)
    for B in targets:
        i = 0
        while len(eng.running) < B:
            k = min(B - len(eng.running), -(-(B - len(real)) // len(real)))
            eng.fork(real[i % len(real)], k)
            i += 1
        if not cpu:
            torch.cuda.synchronize()
        before = eng.stats["decode_s"]
        for _ in range(args.warmup):
            eng.step()
        warm = eng.stats["decode_s"] - before
        head_lens = [n for l in eng.cache.adakv_layers for n in l.segment_lengths()]
        kv_rows = sum(head_lens)
        times = []
        phases = {k: eng.stats[k] for k in ("decode_host_s", "decode_launch_s", "decode_wait_s")}
        for _ in range(args.steps):
            b0 = eng.stats["decode_s"]
            eng.step()
            times.append(eng.stats["decode_s"] - b0)
        phases = {k[7:-2] + "_ms": (eng.stats[k] - v) / args.steps * 1e3 for k, v in phases.items()}
        med = statistics.median(times)
        kv_read = kv_rows + (args.steps / 2) * B * eng._layers * eng._heads
        roof = (step_weights + kv_read * 2 * D * el) / bw if not cpu else float("nan")
        rec = {"kind": "fork_decode", "batch": B, "real_prefills": len(real), "prompt": N,
               "step_ms": med * 1e3, "tok_s": B / med, "roofline_ms": roof * 1e3,
               "pct_roofline": roof / med if not cpu else None,
               "roofline_tok_s": B / roof if not cpu else None,
               "kv_held_gib": (eng.num_pages - eng.pages_free) * page_bytes / 2**30,
               # how evenly the eviction spread the rows over the heads: it decides the
               # attention's best split count (benchmarks/results/paged-h100.md); forked
               # requests repeat their source's lengths
               "kv_rows": kv_rows, "head_rows": spread_stats(head_lens),
               "warmup_s": warm, "prefill_wall_s": prefill_wall,
               "step_phases_mean": phases,
               "peak_gib": None if cpu else torch.cuda.max_memory_allocated() / 2**30}
        # the decode figures first: timing the join may compile another bucket's graph
        if not cpu:   # the step split into its attention and the rest (the weights' side)
            attn_ms, attn_bytes = attention_alone(eng, cfg)
            rest_ms = med * 1e3 - attn_ms
            rec.update(attention_ms=attn_ms, attention_kv_bytes=attn_bytes,
                       attention_pct_copy=attn_bytes / bw / attn_ms * 1e3 * 100,
                       rest_ms=rest_ms, rest_roofline_ms=step_weights / bw * 1e3,
                       rest_pct_roofline=step_weights / bw * 1e3 / rest_ms * 100)
        hr = rec["head_rows"]
        print(f"batch {B}: step {med * 1e3:.2f} ms, {B / med:.0f} tok/s, roofline "
              f"{roof * 1e3:.2f} ms ({100 * roof / med:.1f}%); rows per head min {hr['min']} "
              f"mean {hr['mean']:.0f} max {hr['max']} (cv {hr['cv']:.2f})", flush=True)
        rec.update(join_leave(eng, cfg, g, news[0], cpu))
        if args.profile and not cpu:
            rec["profile"] = profile_steps(eng)
        recs.append(rec)
        print(json.dumps(rec), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            for r in [header] + recs:
                fh.write(json.dumps(r) + "\n")
    print(f"\nprompt {N}, {len(real)} real prefills ({prefill_wall:.1f} s), the rest forked, "
          f"{header['fused_projections']} projection groups fused")
    print(f"{'batch':>5} {'step ms':>8} {'tok/s':>8} {'roof ms':>8} {'%roof':>6} {'KV GiB':>7}"
          f" {'host':>6} {'launch':>6} {'wait':>6} {'leave':>7} {'join':>7} {'attn ms':>8}"
          f" {'attn %BW':>8} {'rest ms':>8} {'rest %roof':>10}")
    for r in recs:
        pct = 100 * r["pct_roofline"] if r["pct_roofline"] else float("nan")
        ph = r["step_phases_mean"]
        print(f"{r['batch']:>5} {r['step_ms']:8.2f} {r['tok_s']:8.0f} {r['roofline_ms']:8.2f} "
              f"{pct:6.1f} {r['kv_held_gib']:7.2f} {ph['host_ms']:6.2f} {ph['launch_ms']:6.2f} "
              f"{ph['wait_ms']:6.2f} {r['leave_ms']:7.2f} {r['join_prefill_ms']:7.1f}"
              + (f" {r['attention_ms']:8.2f} {r['attention_pct_copy']:8.1f} {r['rest_ms']:8.2f}"
                 f" {r['rest_pct_roofline']:10.1f}" if "attention_ms" in r else ""))
        if "profile" in r:
            p = r["profile"]
            print(f"  profile: wall {p['wall_ms']:.2f} ms/step, device {p['device_ms']:.2f}")
            for c, ms in p["by_category_ms"].items():
                print(f"    {c:32s} {ms:8.3f} ms")
            for t in p["top"][:12]:
                print(f"    {t['ms']:8.3f} ms x{t['calls']:<4d} {t['kernel']}")
    return recs


if __name__ == "__main__":
    main()
