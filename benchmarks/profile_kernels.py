"""Per-kernel GPU times (torch.profiler / CUPTI) of the #3 cases: decode B1 / B64 and the evict
stages at N = 8K / 32K / 128K. Developer tool: `python benchmarks/profile_kernels.py [cases]`."""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
import adakv_ops  # noqa: E402
import bench_ops as bo  # noqa: E402

Hq, Hk, D, W, C = 32, 8, 128, 32, 1024
dev = "cuda"
dt = torch.bfloat16


def layout(B, C, reserve=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bud = bo.ada_budgets(B, Hk, C, gen).reshape(-1)
    lens = bud + W
    cap = lens + reserve
    start = torch.cumsum(cap, 0) - cap
    return start.int().to(dev), lens.int().to(dev), int(cap.sum())


def prof(name, fn, nsets, reps=40):
    for i in range(3):
        fn(i % nsets)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for r in range(reps):
            torch.cuda._sleep(200000)
            fn(r % nsets)
        torch.cuda.synchronize()
    ev = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    agg = {}
    for e in ev:
        if "sleep" in e.name:
            continue
        agg.setdefault(e.name, []).append(e.device_time)
    tot = 0.0
    print(f"== {name}")
    for k, v in agg.items():
        v = sorted(v)
        med = v[len(v) // 2]
        tot += med * len(v) / reps
        print(f"   {med:8.2f} us x{len(v) / reps:.0f}  {k[:110]}")
    # event timing (launch gaps included)
    s = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    e = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        torch.cuda._sleep(200000)
        s[r].record()
        fn(r % nsets)
        e[r].record()
    torch.cuda.synchronize()
    t = sorted(a.elapsed_time(b) * 1e3 for a, b in zip(s, e))
    print(f"   kernels sum {tot:.2f} us; event median {t[len(t) // 2]:.2f} us")


def graph_time(fn, nsets):
    """us per call of ``fn(0..nsets-1)`` replayed in one CUDA graph (GPU time: a sleep ahead
    of each replay)."""
    return bo.graph_replay_ms(lambda: [fn(i) for i in range(nsets)], 30, warmup=1,
                              sleep_cycles=200000) * 1e3 / nsets


def decode(B, C, nsets):
    ss, sl, rows = layout(B, C)
    L = [dict(q=torch.randn(B, Hq, 1, D, device=dev, dtype=dt),
              k=torch.randn(rows, D, device=dev, dtype=dt),
              v=torch.randn(rows, D, device=dev, dtype=dt)) for _ in range(nsets)]
    fn = lambda i: adakv_ops.decode_attention(L[i]["q"], L[i]["k"], L[i]["v"], ss, sl)  # noqa
    prof(f"decode B{B} C{C} (mean {sl.float().mean():.0f} max {int(sl.max())})", fn, nsets)
    if B == 1:
        print(f"   graph: {graph_time(fn, nsets):.2f} us/layer")
    else:
        kept = int(sl.sum())
        nb = 2 * kept * D * 2
        for _ in range(2):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ts = []
            for _ in range(20):
                a.record(); fn(0); b.record(); torch.cuda.synchronize()
                ts.append(a.elapsed_time(b))
            ts.sort()
            print(f"   event {ts[10]*1e3:.1f} us = {nb / ts[10] / 1e6:.0f} GB/s")


def evict(N):
    nsets = max(1, min(8, int(120e6 // (2 * Hk * N * D * 2))))
    sets = [dict(q=torch.randn(1, Hq, W, D, device=dev, dtype=dt),
                 k=torch.randn(1, Hk, N, D, device=dev, dtype=dt),
                 v=torch.randn(1, Hk, N, D, device=dev, dtype=dt)) for _ in range(nsets)]
    sc = [adakv_ops.score(s["q"], s["k"]) for s in sets]
    bu = [adakv_ops.allocate(x, C) for x in sc]
    prof(f"evict N={N}", lambda i: adakv_ops.evict(sets[i]["q"], sets[i]["k"], sets[i]["v"], C), nsets)
    prof(f"score N={N}", lambda i: adakv_ops.score(sets[i]["q"], sets[i]["k"]), nsets)
    prof(f"allocate N={N}", lambda i: adakv_ops.allocate(sc[i], C), nsets)
    prof(f"select N={N}", lambda i: adakv_ops.select(sc[i], bu[i]), nsets)


if __name__ == "__main__":
    cases = sys.argv[1:] or ["b1", "b64", "evict"]
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    if "b1" in cases:
        decode(1, C, 32)
    if "b64" in cases:
        decode(64, 2016, 1)
    # (ADAKV_DECODE_SPLITS, ADAKV_DECODE_CLUSTER)
    sweeps = {"b1sweep": (1, C, 32, [("", "1"), ("8", "1"), ("12", "1"), ("", "0")]),
              "b64sweep": (64, 2016, 1, [("", "1"), ("3", "1"), ("4", "1"), ("6", "1"),
                                         ("", "0")])}
    for case, (B, CC, ns, combos) in sweeps.items():
        if case in cases:
            for sp, cl in combos:
                os.environ["ADAKV_DECODE_SPLITS"] = sp
                os.environ["ADAKV_DECODE_CLUSTER"] = cl
                print(f"##### splits={sp or 'auto'} cluster={cl}")
                decode(B, CC, ns)
            os.environ["ADAKV_DECODE_SPLITS"] = ""
            os.environ["ADAKV_DECODE_CLUSTER"] = "1"
    if "evict" in cases:
        for N in (8192, 32768, 131072):
            evict(N)
