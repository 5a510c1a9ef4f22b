#!/usr/bin/env python
"""Cost and prefill memory of the Ada-KV authors' follow-up methods (issue 14's targets).

Usage (one GPU, ~3 minutes):  python benchmarks/bench_followups.py --out results.jsonl
CPU smoke test:               python benchmarks/bench_followups.py --cpu

Model: the Llama-3.1-8B shape of ``bench_generate.py`` (random bf16 weights; ``--layers``
of its 32 layers, default 8, since the costs are per layer), batch 1, prompt ``--n`` (32768),
budget ``C = --budget`` (1024), window 32.

1. Eviction cost of one layer (CUDA events, median of ``--reps`` after warm-up): ``evict``
   (ada_snapkv: score -> allocate -> select -> compact), and for ``ada_criticalkv`` and
   ``defensivekv`` the policy's selection (scores, value weight, stages, allocation) plus
   ``compact``; the parts alone: ``score`` (ada_snapkv's), ``defensive_score``, the value weight
   (``value_norm``, normalised, the native GEMM with an L1 epilogue on CUDA) against
   ``torch.matmul`` computing the ``[Hk, G, L, hidden]`` products alone (what the fused kernel
   never writes), same inputs, same run. Calibration of the same run: device-to-device copy
   bandwidth (``copy_`` of a 1 GiB buffer: read + write bytes / time) and the TFLOP/s of the
   matmul and of ``value_norm`` (``2 Hk G L D hidden`` flops each).
2. One layer's prefill time: a ``DynamicCache`` prefill of the prompt through the model,
   divided by its layers (embedding and the last position's head included: a slight
   overestimate of a layer).
3. Prefill memory: ``AdaKVCache.prefill`` (one-shot, paged storage) of the prompt per method;
   the store's peak (``PagedKVStore.peak_pages_used``) and final size, against one layer's full
   K/V; ``max_memory_allocated`` above what was allocated before the call (activations
   included).

Targets (issue 14): defensivekv evict <= 2x ada_snapkv evict and <= 3% of a layer's prefill;
the value weight faster than the matmul alone; layer_defensivekv's prefill memory <= final
cache + 1.1x one layer's full K/V. ``composite_cuda_ops`` in the record lists the ops that ran
as torch-op versions (empty when the native CUDA kernels are loaded).

Output: JSON lines (``--out``) and a short table on stdout (last).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_generate as bg  # noqa: E402  (model shape and random-weight builder)

import adakv_ops  # noqa: E402
from adakv_ops import ops as _ops  # noqa: E402
from adakv_ops.hf import AdaKVCache, cache_kwarg  # noqa: E402
from adakv_ops.policy import EvictionPolicy  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, dev, reps):
    for _ in range(3):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def eviction_costs(model, args, dev, dtype):
    cfg = model.config
    Hq, Hk, D, hidden = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                         cfg.hidden_size)
    N, W, C = args.n, args.window, args.budget
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, Hq, W, D, device=dev, dtype=dtype, generator=g)
    k = torch.randn(1, Hk, N, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(1, Hk, N, D, device=dev, dtype=dtype, generator=g)
    wo = model.model.layers[0].self_attn.o_proj.weight.detach()
    out = {}
    out["ada_snapkv"] = median_ms(lambda: _ops.evict(q, k, v, C), dev, args.reps)
    for method in ("ada_criticalkv", "defensivekv"):
        pol = EvictionPolicy(method=method, budget=C, window=W)

        def run():
            kept = pol.keep(q, k, C, value=v, o_proj_weight=wo)
            _ops.compact(k, v, kept.kept_idx, kept.kept_count, kept.budgets, kept.window,
                         rows=Hk * (C + W))
        out[method] = median_ms(run, dev, args.reps)
    L = N - W
    out["score"] = median_ms(lambda: _ops.score(q, k), dev, args.reps)
    out["defensive_score"] = median_ms(lambda: _ops.defensive_score(q, k), dev, args.reps)
    out["value_norm"] = median_ms(lambda: _ops.value_norm(v, wo, normalize=True, length=L), dev,
                                  args.reps)
    wo_h = wo.t().reshape(Hk, Hq // Hk, D, hidden)
    vp = v[0, :, :L].unsqueeze(1)
    out["matmul_products"] = median_ms(lambda: torch.matmul(vp, wo_h), dev, args.reps)
    return out


def calibration(costs, model, args, dev, dtype):
    """Copy bandwidth and GEMM throughput of this run (what the costs above compare with)."""
    cfg = model.config
    Hq, Hk, D, hidden = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                         cfg.hidden_size)
    nbytes = (1 << 30) if dev.type == "cuda" else (16 << 20)
    src = torch.empty(nbytes // 2, device=dev, dtype=torch.bfloat16).fill_(1)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), dev, max(3, args.reps // 5))
    del src, dst
    flops = 2.0 * Hk * (Hq // Hk) * (args.n - args.window) * D * hidden
    return dict(copy_GBps=2 * nbytes / (ms * 1e-3) / 1e9,
                matmul_TFLOPs=flops / (costs["matmul_products"] * 1e-3) / 1e12,
                value_norm_TFLOPs=flops / (costs["value_norm"] * 1e-3) / 1e12,
                dtype=str(dtype).replace("torch.", ""))


def layer_prefill_ms(model, ids, dev, reps=3):
    from transformers import DynamicCache

    times = []
    for _ in range(reps + 1):
        cache = DynamicCache(config=model.config)
        sync(dev)
        t = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, **cache_kwarg(cache), use_cache=True, logits_to_keep=1)
        sync(dev)
        times.append((time.perf_counter() - t) * 1e3)
        del cache
        gc.collect()
    return statistics.median(times[1:]) / model.config.num_hidden_layers


def prefill_memory(model, ids, args, dev):
    cfg = model.config
    out = {}
    for method in ("ada_snapkv", "defensivekv", "layer_defensivekv"):
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
        cache = AdaKVCache(model, method=method, budget=args.budget, window=args.window)
        sync(dev)
        t = time.perf_counter()
        cache.prefill(ids)
        sync(dev)
        ms = (time.perf_counter() - t) * 1e3
        st = cache.pool.store
        peak_alloc = (torch.cuda.max_memory_allocated() - before) if dev.type == "cuda" else 0
        out[method] = dict(prefill_ms=ms, store_peak_bytes=st.peak_pages_used * st.bytes_per_page,
                           final_bytes=st.pages_used * st.bytes_per_page,
                           peak_alloc_above_before=peak_alloc)
        del cache
    layer_kv = 2 * cfg.num_key_value_heads * args.n * cfg.head_dim * ids.new_empty(
        0, dtype=model.dtype).element_size()
    return out, layer_kv


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="small shapes on the CPU (smoke test)")
    p.add_argument("--n", type=int, default=None, help="prompt tokens (32768; --cpu 512)")
    p.add_argument("--budget", type=int, default=None, help="C (1024; --cpu 32)")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--layers", type=int, default=None, help="model layers (8; --cpu 2)")
    p.add_argument("--reps", type=int, default=None, help="timed runs (50; --cpu 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON lines")
    args = p.parse_args(argv)
    dev = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else torch.bfloat16
    args.n = args.n or (512 if args.cpu else 32768)
    args.budget = args.budget or (32 if args.cpu else 1024)
    args.reps = args.reps or (3 if args.cpu else 50)
    layers = args.layers or (2 if args.cpu else 8)
    cfg = bg.model_config(args)
    cfg.num_hidden_layers = layers
    real = bg.model_config
    bg.model_config = lambda _a, _c=cfg: _c          # build_model reads the config from here
    try:
        model = bg.build_model(args, dev, dtype)
    finally:
        bg.model_config = real
    ids = torch.randint(0, cfg.vocab_size, (1, args.n), device=dev,
                        generator=torch.Generator(device=dev).manual_seed(1))

    costs = eviction_costs(model, args, dev, dtype)
    calib = calibration(costs, model, args, dev, dtype)
    per_layer = layer_prefill_ms(model, ids, dev)
    mem, layer_kv = prefill_memory(model, ids, args, dev)

    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                N=args.n, C=args.budget, W=args.window, layers=layers,
                composite_cuda_ops=adakv_ops.composite_cuda_ops)
    rec = dict(meta, costs_ms=costs, calibration=calib, layer_prefill_ms=per_layer, memory=mem,
               layer_kv_bytes=layer_kv)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def mib(x):
        return f"{x / 2**20:.1f}"
    print(f"\n{meta}")
    print("| eviction of one layer | ms | vs ada_snapkv | vs a layer's prefill |")
    print("|---|---|---|---|")
    for k in ("ada_snapkv", "ada_criticalkv", "defensivekv"):
        print(f"| {k} | {costs[k]:.3f} | {costs[k] / costs['ada_snapkv']:.2f}x | "
              f"{100 * costs[k] / per_layer:.2f}% |")
    for k in ("score", "defensive_score"):
        print(f"| {k} alone | {costs[k]:.3f} | {costs[k] / costs['ada_snapkv']:.2f}x | "
              f"{100 * costs[k] / per_layer:.2f}% |")
    print(f"| value_norm (normalised) | {costs['value_norm']:.3f} | "
          f"{costs['value_norm'] / costs['ada_snapkv']:.2f}x | "
          f"{100 * costs['value_norm'] / per_layer:.2f}% |")
    print(f"| matmul [Hk,G,L,hidden] alone | {costs['matmul_products']:.3f} | | |")
    print(f"| a layer's prefill | {per_layer:.3f} | | |")
    print(f"\nvalue_norm / matmul alone: {costs['value_norm'] / costs['matmul_products']:.2f}x; "
          f"copy {calib['copy_GBps']:.0f} GB/s, matmul {calib['matmul_TFLOPs']:.1f} TFLOP/s, "
          f"value_norm {calib['value_norm_TFLOPs']:.1f} TFLOP/s ({calib['dtype']})")
    print("\n| prefill memory | store peak MiB | final MiB | peak / (final + 1.1 layer K/V) | "
          "alloc above before MiB | prefill ms |")
    print("|---|---|---|---|---|---|")
    for k, m in mem.items():
        ratio = m["store_peak_bytes"] / (m["final_bytes"] + 1.1 * layer_kv)
        print(f"| {k} | {mib(m['store_peak_bytes'])} | {mib(m['final_bytes'])} | {ratio:.3f} | "
              f"{mib(m['peak_alloc_above_before'])} | {m['prefill_ms']:.0f} |")
    print(f"(one layer's full K/V: {mib(layer_kv)} MiB)")


if __name__ == "__main__":
    main()
