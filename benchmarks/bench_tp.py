#!/usr/bin/env python
"""Tensor parallelism (issue 15): prefill with and without the cross-rank exchange, decode
tokens/s and memory per GPU, against tp = 1 in the same run.

Usage (a machine with 2 or 4 GPUs; NVLink multicast off, as the device docs require):
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/bench_tp.py --out tp.jsonl
    python benchmarks/bench_tp.py --out tp.jsonl          # tp = 1, the reference
CPU smoke test (gloo):
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --cpu

Model: the Llama-3.1-8B shape of ``bench_generate.py`` (random bf16 weights, ``--layers``
layers, default 32), saved once to ``--dir`` by rank 0 and loaded by every rank with
transformers' ``tp_plan="auto"``; prompt ``--n`` (32768) tokens, batch ``--batch`` (1),
``ada_snapkv`` (``--method``) budget 1024, window 32, paged storage.

Per run: prefill time (CUDA-synchronised wall time of ``AdaKVCache.prefill``, median of
``--reps``), the exchange's share of it (the time spent in ``HeadShards``' collectives,
timed on the host around each with a device synchronize: an upper bound, the collectives
themselves are small), decode tokens/s over ``--steps`` greedy steps (eager), and the peak
memory of the rank's GPU. Output: JSON lines and a table (rank 0).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_generate as bg  # noqa: E402

from adakv_ops import distributed as adist  # noqa: E402
from adakv_ops.hf import AdaKVCache, cache_kwarg  # noqa: E402


class _Timed:
    """Wraps HeadShards' collectives with a host timer (synchronising around each)."""

    def __init__(self, dev):
        self.dev, self.seconds, self.calls = dev, 0.0, 0

    def install(self):
        for name in ("gather_heads", "max", "mean_of_ranks", "min_int"):
            real = getattr(adist.HeadShards, name)

            def timed(shards, *a, _real=real, **k):
                if self.dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = _real(shards, *a, **k)
                if self.dev.type == "cuda":
                    torch.cuda.synchronize()
                self.seconds += time.perf_counter() - t
                self.calls += 1
                return out
            setattr(adist.HeadShards, name, timed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--n", type=int, default=None, help="prompt tokens (32768; --cpu 256)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="model layers (32; --cpu 2)")
    p.add_argument("--method", default="ada_snapkv")
    p.add_argument("--budget", type=int, default=None, help="C (1024; --cpu 16)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default="/tmp/bench_tp_model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = torch.device("cpu") if args.cpu else torch.device("cuda", int(os.environ.get(
        "LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group("gloo" if args.cpu else "nccl")
    args.n = args.n or (256 if args.cpu else 32768)
    args.budget = args.budget or (16 if args.cpu else 1024)
    layers = args.layers or (2 if args.cpu else 32)
    dtype = torch.float32 if args.cpu else torch.bfloat16

    from transformers import AutoModelForCausalLM
    cfg = bg.model_config(args)
    cfg.num_hidden_layers = layers
    if rank == 0 and not (Path(args.dir) / "config.json").exists():
        real = bg.model_config
        bg.model_config = lambda _a, _c=cfg: _c
        try:
            bg.build_model(args, torch.device("cpu"), dtype).save_pretrained(args.dir)
        finally:
            bg.model_config = real
    if world > 1:
        dist.barrier()
    kw = dict(attn_implementation="sdpa", dtype=dtype)
    if world > 1:
        import transformers
        kw.update(dict(distributed_config=transformers.DistributedConfig(tp_plan="auto"))
                  if hasattr(transformers, "DistributedConfig") else dict(tp_plan="auto"))
    else:
        kw["device_map"] = str(dev)
    model = AutoModelForCausalLM.from_pretrained(args.dir, **kw).eval()
    timer = _Timed(dev)
    timer.install()

    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.n), device=dev,
                        generator=torch.Generator(device=dev).manual_seed(1))
    times, exch = [], []
    cache = None
    for _ in range(args.reps + 1):
        del cache
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        cache = AdaKVCache(model, method=args.method, budget=args.budget, window=32)
        timer.seconds = 0.0
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = cache.prefill(ids)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
        exch.append(timer.seconds * 1e3)
    prefill_peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(args.steps):
            pos = torch.full((args.batch, 1), args.n + i, device=dev)
            logits = model(input_ids=tok, position_ids=pos, use_cache=True,
                           **cache_kwarg(cache)).logits
            tok = logits[:, -1].argmax(-1, keepdim=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    decode_s = time.perf_counter() - t
    rec = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
               device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               tp=world, rank=rank, N=args.n, B=args.batch, layers=layers, method=args.method,
               C=args.budget, prefill_ms=statistics.median(times[1:]),
               exchange_ms=statistics.median(exch[1:]), exchange_calls=timer.calls,
               decode_tok_s=args.batch * args.steps / decode_s,
               peak_prefill_gib=prefill_peak / 2**30,
               peak_gib=(torch.cuda.max_memory_allocated(dev) / 2**30
                         if dev.type == "cuda" else 0.0),
               kv_held_gib=sum(l.nbytes() for l in cache.adakv_layers) / 2**30)
    recs = [rec]
    if world > 1:
        recs = [None] * world
        dist.all_gather_object(recs, rec)
    if rank == 0:
        if args.out:
            with open(args.out, "a") as f:
                for r in recs:
                    f.write(json.dumps(r) + "\n")
        print("| tp | rank | prefill ms | exchange ms | decode tok/s | peak GiB | KV GiB |")
        print("|---|---|---|---|---|---|---|")
        for r in recs:
            print(f"| {r['tp']} | {r['rank']} | {r['prefill_ms']:.1f} | {r['exchange_ms']:.2f} "
                  f"| {r['decode_tok_s']:.1f} | {r['peak_gib']:.2f} | {r['kv_held_gib']:.3f} |")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
