#!/usr/bin/env python
"""Serving capacity on one GPU (issue 12): 32K prompts prefilled one at a time into one paged
store, then compiled CUDA-graph decode at batch 32, 64 and 128.

Usage (one H200, ~8 minutes):  python benchmarks/bench_capacity.py --out results.jsonl
CPU smoke test:                python benchmarks/bench_capacity.py --cpu

Model: the Llama-3.1-8B shape of ``bench_generate.py`` (random bf16 weights). Cache:
``AdaKVCache(model, "ada_snapkv", budget=1024, window=32, storage="paged", page_size=64,
num_pages=..., max_batch=128)``: one page pool for every layer, sized up front.

Phases, for each batch ``B`` of ``--batches`` (default 32,64,128): prompts of ``--prompt``
random tokens (32768) are prefilled one at a time (``cache.prefill(ids, chunk_size=--chunk)``,
which adds each prompt as a new sequence of the cache's batch) until the batch holds ``B``
sequences; then ``cache.ensure_capacity`` (pages for the decode steps ahead, so no tensor moves
inside the graphs), and a greedy decode with ``torch.compile(model.forward,
mode="reduce-overhead", fullgraph=True)`` (CUDA graphs), ``cache.prepare_decode(1)`` before
each step (host page accounting, no device read), each row at its own position. ``--warmup``
steps (compilation and graph recording for that batch) then ``--steps`` timed steps (CUDA
events around the whole loop, host work included).

Roofline of a step: the bytes a step must read at least (the weights, except the embedding
table of which it reads B rows, plus every kept K/V row of every layer, plus the appended
rows) at the copy bandwidth measured in the same run (a 4 GiB device-to-device copy,
read + write bytes, median of 20). ``pct_roofline`` = measured tok/s over roofline tok/s.
The ideal full-cache engine of the issue (each step reads weights + the full KV at copy
bandwidth, as many 32K sequences as fit next to the weights) is computed the same way.

Output: JSON lines (``--out``, flushed after every record) and a table on stdout.
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
import bench_ops  # noqa: E402

from adakv_ops.hf import AdaKVCache, cache_kwarg  # noqa: E402


def copy_bandwidth(dev, nbytes=4 << 30):
    """Device copy bandwidth in bytes / s (read + write; ``bench_ops.copy_bandwidth`` over a
    4 GiB copy); NaN off CUDA (no roofline there)."""
    if dev.type != "cuda":
        return float("nan")
    return bench_ops.copy_bandwidth(False, nbytes)[0] * 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--batches", default=None)
    ap.add_argument("--prompt", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cpu = args.cpu
    batches = [int(x) for x in (args.batches or ("2,4" if cpu else "32,64,128")).split(",")]
    N = args.prompt or (96 if cpu else 32768)
    C = args.budget or (16 if cpu else 1024)
    W, P = args.window if not cpu else 8, args.page_size if not cpu else 8
    dev = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    out = open(args.out, "w") if args.out else None

    def emit(rec):
        print(json.dumps(rec), flush=True)
        if out:
            out.write(json.dumps(rec) + "\n")
            out.flush()

    bw = copy_bandwidth(dev)
    model = bg.build_model(args, dev, dtype)
    cfg = model.config
    el = torch.empty((), dtype=dtype).element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    Hk, D, L = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    Bmax = max(batches)
    steps_total = len(batches) * (args.warmup + args.steps) + 2
    # pool: every sequence's kept rows (C + W + the decode steps, rounded up to pages, Ada's
    # per-head spread ~ +1 page per head on average) + one prompt's raw pages in flight
    per_seq = L * Hk * (-(-(C + W + steps_total) // P) + 2)
    raw = L * Hk * -(-N // P)
    pages = Bmax * per_seq + raw + 1024
    cache = AdaKVCache(model, method="ada_snapkv", budget=C, window=W, page_size=P,
                       num_pages=pages, max_batch=Bmax)
    hbm = torch.cuda.get_device_properties(dev).total_memory if not cpu else 0
    full_kv_seq = L * 2 * Hk * (N + args.steps) * D * el
    ideal_B = int((hbm * 0.97 - weights) // full_kv_seq) if not cpu else 0
    ideal_tok_s = (ideal_B * bw / (weights + ideal_B * full_kv_seq)) if not cpu else 0
    emit({"kind": "header", "device": torch.cuda.get_device_name() if not cpu else "cpu",
          "torch": torch.__version__, "date": datetime.date.today().isoformat(),
          "prompt": N, "chunk": args.chunk, "budget": C, "window": W, "page_size": P,
          "pool_pages": pages, "pool_gib": 2 * pages * P * D * el / 2**30,
          "weights_gib": weights / 2**30, "copy_bw_gbs": bw / 1e9, "hbm_gib": hbm / 2**30,
          "ideal_full_cache_batch": ideal_B, "ideal_full_cache_tok_s": ideal_tok_s})
    step = torch.compile(model.forward, mode=None if cpu else "reduce-overhead",
                         fullgraph=True)
    g = torch.Generator().manual_seed(args.seed)
    pos = torch.zeros((0, 1), dtype=torch.long)
    tok = torch.zeros((0, 1), dtype=torch.long)
    prefill_s = []
    for B in batches:
        with torch.no_grad():
            while len(cache.pool.seqs if cache.pool.store else []) < B:
                ids = torch.randint(0, cfg.vocab_size, (1, N), generator=g).to(dev)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                o = cache.prefill(ids, chunk_size=args.chunk)
                nxt = o.logits[:, -1:].argmax(-1).cpu()
                prefill_s.append(time.perf_counter() - t0)
                tok = torch.cat([tok, nxt])
                pos = torch.cat([pos, torch.full((1, 1), N, dtype=torch.long)])
        cache.ensure_capacity(args.warmup + args.steps + 1)
        t_dev, p_dev = tok.to(dev), pos.to(dev)

        def one(t, p):
            cache.prepare_decode(1)
            if not cpu:
                torch.compiler.cudagraph_mark_step_begin()
            o = step(input_ids=t, position_ids=p, **cache_kwarg(cache), use_cache=True)
            return o.logits[:, -1:].argmax(-1), p + 1

        t_c0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.warmup):
                t_dev, p_dev = one(t_dev, p_dev)
            if not cpu:
                torch.cuda.synchronize()
            warm_s = time.perf_counter() - t_c0
            kv_rows = sum(sum(l.segment_lengths()) for l in cache.adakv_layers)
            if not cpu:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                t_dev, p_dev = one(t_dev, p_dev)
            if not cpu:
                e1.record()
                e1.synchronize()
                secs = e0.elapsed_time(e1) / 1e3
            else:
                secs = time.perf_counter() - t0
        tok, pos = t_dev.cpu(), p_dev.cpu()
        kv_read = (kv_rows + L * B * Hk * args.steps / 2) * 2 * D * el   # mean over the steps
        step_bytes = weights - embed.numel() * el + B * cfg.hidden_size * el + kv_read
        tok_s = B * args.steps / secs
        roof = B * bw / step_bytes if not cpu else float("nan")
        full_seq = L * 2 * Hk * N * D * el
        emit({"kind": "decode", "batch": B, "steps": args.steps, "step_ms": secs / args.steps * 1e3,
              "tok_s": tok_s, "roofline_tok_s": roof, "pct_roofline": tok_s / roof,
              "kv_held_gib": cache.kv_bytes() / 2**30,
              "kv_held_pct_full": cache.kv_bytes() / (B * full_seq) * 100,
              "kv_rows": kv_rows, "step_bytes_gib": step_bytes / 2**30,
              "warmup_s": warm_s, "prefill_s_median": statistics.median(prefill_s),
              "prefills": len(prefill_s),
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if not cpu else None})
    print()
    print(f"{'batch':>5} {'step ms':>8} {'tok/s':>8} {'roofline':>9} {'%roof':>6} "
          f"{'KV GiB':>7} {'%full':>6}")
    if out:
        out.close()
        for line in open(args.out):
            r = json.loads(line)
            if r["kind"] == "decode":
                print(f"{r['batch']:>5} {r['step_ms']:8.2f} {r['tok_s']:8.0f} "
                      f"{r['roofline_tok_s']:9.0f} {100 * r['pct_roofline']:6.1f} "
                      f"{r['kv_held_gib']:7.2f} {r['kv_held_pct_full']:6.2f}")


if __name__ == "__main__":
    main()
