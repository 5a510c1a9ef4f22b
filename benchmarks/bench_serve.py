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

Not here yet (issue 13): the transformers ``generate_batch`` and one-shot AdaKVCache peers,
the mixed 8K-128K and decode-heavy (re-eviction) streams, page cloning for full-concurrency
decode of streams whose prefill would not fit one command.
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

from adakv_ops.serve import Engine  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=None)
    ap.add_argument("--new", default=None, help="lo,hi new tokens per request")
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--num-pages", type=int, default=None,
                    help="pool size (default: 85%% of the free memory after the weights)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cpu = args.cpu
    R = args.requests or (6 if cpu else 64)
    N = args.prompt or (48 if cpu else 32768)
    lo, hi = [int(x) for x in (args.new or ("3,8" if cpu else "256,1024")).split(",")]
    C = args.budget or (8 if cpu else 1024)
    W, P = (4, 8) if cpu else (args.window, args.page_size)
    max_batch = args.max_batch or (4 if cpu else 256)
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
    eng = Engine(model, num_pages=pages, max_batch=max_batch, chunk_size=args.chunk,
                 compile=args.compile, mode=None if cpu else "reduce-overhead",
                 method="ada_snapkv", budget=C, window=W, page_size=P)
    g = torch.Generator().manual_seed(args.seed)
    news = torch.randint(lo, hi + 1, (R,), generator=g).tolist()
    header = {"kind": "header", "device": "cpu" if cpu else torch.cuda.get_device_name(),
              "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "requests": R, "prompt": N, "new": [lo, hi], "budget": C, "window": W,
              "page_size": P, "num_pages": pages, "pool_gib": pages * page_bytes / 2**30,
              "max_batch": max_batch, "chunk": args.chunk, "compile": args.compile,
              "copy_bw_gbs": bw / 1e9, "weights_gib": weights / 2**30}
    print(json.dumps(header), flush=True)
    t0 = time.perf_counter()
    rids = []
    for n in news:
        prompt = torch.randint(0, cfg.vocab_size, (N,), generator=g).tolist()
        rids.append(eng.add_request(prompt, n))
    first = {}
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
    rec = {"kind": "serve", "max_concurrent": max_conc,
           "decode_tok_s": (sum(x[0] for x in timed) / max(sum(x[1] for x in timed), 1e-9)
                            if timed else None),
           "warmup_steps": len(warm), "warmup_s": sum(x[1] for x in warm),
           "prefill_s_total": st["prefill_s"], "prefills": st["prefills"],
           "tok_s_incl_prefill": sum(len(eng.result(r)) for r in rids) / wall,
           "ttft_median_s": statistics.median(ttft), "ttft_max_s": ttft[-1], "wall_s": wall,
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
          f"(max {rec['ttft_max_s']:.2f}), KV held max {rec['kv_held_max_gib']:.2f} GiB, step "
          f"at batch {Bmax}: {rec['step_ms_at_max_batch']:.2f} ms")


if __name__ == "__main__":
    main()
