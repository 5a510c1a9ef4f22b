"""Paged decode vs the contiguous kernel (issue 12's evidence): one Llama-3.1-8B layer (Hq 32,
Hk 8, D 128, bf16), Ada-like per-head lengths, at batch 1 (~1K tokens/head) and batch 64
(2K tokens/head), for several page sizes P. Pages are scattered (a random permutation of the
pool), as after many joins and leaves.

Times are CUDA-event medians over rotating input sets larger than L2, eager and (batch 1)
replayed in a CUDA graph; bandwidth is the bytes the kernel must read (kept K/V + queries +
metadata) against the device-to-device copy bandwidth measured in the same run.

    python benchmarks/bench_paged.py --out benchmarks/results/paged-h200.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import ada_budgets, copy_bandwidth, nsets_for  # noqa: E402

import adakv_ops  # noqa: E402

Hq, Hk, D, W = 32, 8, 128, 32


def median_ms(fn, nsets, reps=200):
    for i in range(max(4, nsets)):
        fn(i % nsets)
    torch.cuda.synchronize()
    times = []
    for r in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(r % nsets)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def graph_ms(fn, nsets, calls=64, reps=30):
    """Per-call time of ``calls`` calls replayed in one CUDA graph (launch overhead removed)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i % nsets)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i % nsets)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / calls)
    return statistics.median(times)


def build(B, C, P_list, gen, dev):
    lens = (ada_budgets(B, Hk, C, gen).reshape(-1) + W).to(torch.int64)
    S = B * Hk
    rows = int(lens.sum())
    seg_start = (torch.cumsum(lens, 0) - lens).to(torch.int32)
    set_bytes = 2 * rows * D * 2
    nsets = nsets_for(set_bytes)
    sets = []
    for _ in range(nsets):
        k = torch.randn(rows, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(rows, D, device=dev, dtype=torch.bfloat16)
        q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
        sets.append(dict(k=k, v=v, q=q, paged={}))
    paged_meta = {}
    for P in P_list:
        npg = (lens + P - 1) // P
        width = int(npg.max())
        num_pages = int(npg.sum())
        perm = torch.randperm(num_pages, generator=gen)
        # every (segment, page j) pair, vectorised: pool page perm[o] holds rows [j P, j P + P)
        seg = torch.repeat_interleave(torch.arange(S), npg)
        first = torch.cumsum(npg, 0) - npg
        j = torch.arange(num_pages) - first[seg]
        ids = perm[:num_pages]
        table = torch.full((S, width), -1, dtype=torch.int32)
        table[seg, j] = ids.to(torch.int32)
        r = torch.arange(P)
        pos = j[:, None] * P + r[None, :]                      # token index inside the segment
        ok = pos < lens[seg][:, None]
        rowsrc = torch.full((num_pages * P,), -1, dtype=torch.int64)  # pool row -> flat row
        pool_rows = ids[:, None] * P + r[None, :]
        flat_rows = seg_start.to(torch.int64)[seg][:, None] + pos
        rowsrc[pool_rows[ok]] = flat_rows[ok]
        valid = rowsrc >= 0
        for st in sets:
            kp = torch.zeros(num_pages * P, D, device=dev, dtype=torch.bfloat16)
            vp = torch.zeros_like(kp)
            idx = rowsrc[valid].to(dev)
            kp[valid.to(dev)] = st["k"][idx]
            vp[valid.to(dev)] = st["v"][idx]
            st["paged"][P] = (kp.view(num_pages, P, D), vp.view(num_pages, P, D))
        paged_meta[P] = (table.to(dev), num_pages)
    return dict(lens=lens, seg_start=seg_start.to(dev), seg_len=lens.to(torch.int32).to(dev),
                sets=sets, nsets=nsets, paged=paged_meta, rows=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", default="16,32,64,128")
    ap.add_argument("--out", default=None)
    ap.add_argument("--label", default="", help="prefix of every variant name (e.g. the build)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    # --pages "" measures the contiguous kernel alone (a build without the paged ops, as a peer)
    P_list = [int(x) for x in args.pages.split(",") if x]
    gen = torch.Generator().manual_seed(0)
    copy_gbps, _, _ = copy_bandwidth(False)
    date = datetime.date.today().isoformat()
    name = torch.cuda.get_device_name()
    header = (f"# {name}, torch {torch.__version__}, {date}; copy bandwidth {copy_gbps:.0f} GB/s "
              f"(read + write, same run); layer Hq {Hq} Hk {Hk} D {D} bf16, W {W}")
    print(header)
    records = []
    for B, C, graph in ((1, 1024, True), (64, 2048, False)):
        lay = build(B, C, P_list, gen, dev)
        sl, ss = lay["seg_len"], lay["seg_start"]
        nbytes = 2 * lay["rows"] * D * 2 + 2 * B * Hq * D * 2 + 2 * sl.numel() * 4
        sets, ns = lay["sets"], lay["nsets"]

        def contiguous(i):
            st = sets[i]
            return adakv_ops.decode_attention(st["q"], st["k"], st["v"], ss, sl)

        ref = contiguous(0).float()
        variants = [("contiguous", None, contiguous)]
        for P in P_list:
            table, _ = lay["paged"][P]

            def paged(i, P=P, table=table):
                st = sets[i]
                kp, vp = st["paged"][P]
                return adakv_ops.paged_decode_attention(st["q"], kp, vp, table, sl)

            variants.append((f"paged P={P}", P, paged))
        base = None
        for label, P, fn in variants:
            err = float((fn(0).float() - ref).abs().max())
            ms = median_ms(fn, ns)
            gms = graph_ms(fn, ns) if graph else None
            base = ms if base is None else base
            gbps = nbytes / (ms * 1e-3) / 1e9
            label = args.label + label
            rec = dict(case=f"decode B={B}", variant=label, page_size=P, B=B,
                       tokens_per_head=float(lay["lens"].float().mean()), ms=ms, graph_ms=gms,
                       pct_copy=100 * gbps / copy_gbps, vs_contiguous=ms / base,
                       max_abs_diff=err, copy_gbps=copy_gbps, device=name,
                       torch=torch.__version__, date=date)
            records.append(rec)
            g = f"{gms * 1e3:8.2f} us" if gms is not None else "       -   "
            print(f"B={B:3d} {label:22s} eager {ms * 1e3:8.2f} us  graph {g}  "
                  f"{rec['pct_copy']:5.1f}% of copy BW  x{rec['vs_contiguous']:.3f} of contiguous"
                  f"  max|diff| {err:.1e}")
        del lay, sets
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
