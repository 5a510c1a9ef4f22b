#!/usr/bin/env python
"""Benchmark every adakv_ops op beside the PyTorch path it replaces.

Usage (GPU, about 3-4 minutes):   python benchmarks/bench_ops.py
Smoke test:                       python benchmarks/bench_ops.py --quick
CPU smoke test (no CUDA needed):  python benchmarks/bench_ops.py --cpu --quick --out /tmp/x.jsonl

Writes one JSON object per measurement (``--out``, default
``benchmarks/results/ops-<device-slug>.jsonl``) and a markdown table (``--md``, default: the same
path with ``.md``); the summary table is printed last. See benchmarks/README.md for what each
case measures and how bytes / targets are defined.

Timing (CUDA): every timed call is preceded by ``torch.cuda._sleep`` (so the launch queue is
ahead of the GPU and the CUDA-event pair measures GPU time, not Python launch latency), then
``start.record(); call(); end.record()``; median over many calls after a warm-up. Inputs rotate
over several independent sets (layers) whose total size exceeds the 50 MB L2, so repeated calls
do not hit L2. A back-to-back eager loop (launch overhead included) is reported in ``note`` as
``wall``. Each case group runs in its own subprocess (``--no-isolate`` to disable), so a kernel
fault in one group is recorded as an error and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import baselines as bl  # noqa: E402

try:
    import adakv_ops  # noqa: E402
    OPS_ERR = None
except Exception as _e:  # noqa: BLE001
    try:
        sys.path.insert(0, str(ROOT / "python"))
        for _m in [m for m in sys.modules if m == "adakv_ops" or m.startswith("adakv_ops.")]:
            del sys.modules[_m]
        import adakv_ops  # noqa: E402
        OPS_ERR = None
    except Exception as _e2:  # noqa: BLE001
        adakv_ops = None
        OPS_ERR = f"import adakv_ops failed: {type(_e2).__name__}: {_e2}"

CASES = ["evict", "append", "decode_b1", "decode_bN", "graph"]
FATAL_MARKERS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                 "misaligned address", "an illegal instruction", "CUDA error: unknown error")


# ---------------------------------------------------------------------------------------------
# configuration


def make_config(args):
    if args.cpu:
        c = dict(Hq=8, Hk=2, D=64, W=8, C=64, evict_N=[512, 1024], b1_sets=2, bN=4, bN_C=120,
                 sdpa_N=[512, 2048], graph_sets=2, reserve=16, budget_s=0.15, max_reps=15,
                 min_reps=3, flex_b1=["seq", "heads"], flex_bN=["heads", "seq"])
        if args.quick:
            c.update(evict_N=[512], sdpa_N=[512], budget_s=0.05, max_reps=5)
    else:
        c = dict(Hq=32, Hk=8, D=128, W=32, C=1024, evict_N=[8192, 32768, 131072], b1_sets=32,
                 bN=64, bN_C=2016, sdpa_N=[8192, 32768, 131072], graph_sets=32, reserve=64,
                 budget_s=0.25, max_reps=300, min_reps=10, flex_b1=["seq", "heads"],
                 flex_bN=["heads"])
        if args.quick:
            c.update(evict_N=[8192], bN=8, sdpa_N=[8192], budget_s=0.1, max_reps=100,
                     flex_b1=["seq"], flex_bN=["heads"])
    if args.flex_layouts:
        lay = [x for x in args.flex_layouts.split(",") if x]
        c.update(flex_b1=lay, flex_bN=lay)
    if args.no_flex:
        c.update(flex_b1=[], flex_bN=[])
    return c


# ---------------------------------------------------------------------------------------------
# measurement context


class Ctx:
    def __init__(self, args, cfg, copy_gbps, sink):
        self.args, self.cfg = args, cfg
        self.cpu = args.cpu
        self.dev = torch.device("cpu" if args.cpu else "cuda")
        self.dtype = torch.bfloat16
        self.copy_gbps = copy_gbps
        self.sink = sink
        self.dead = None
        self.date = datetime.date.today().isoformat()
        self.device_name = device_name(self.cpu)
        self.gen = torch.Generator(device="cpu").manual_seed(args.seed)  # layouts
        self.dgen = torch.Generator(device=self.dev).manual_seed(args.seed + 1)  # data
        self.sleep_cycles_per_ms = None
        if not self.cpu:
            self.sleep_cycles_per_ms = calibrate_sleep()

    # -- timing ---------------------------------------------------------------------------
    def sync(self):
        if not self.cpu:
            torch.cuda.synchronize()

    def bench(self, call, nsets=1, pre=None, wall=True, budget_s=None, max_reps=None):
        """Median per-call time in ms of ``call(i)``, rotating ``i`` over ``nsets`` input sets.

        ``pre(i)`` runs before each timed call, outside the timed region (e.g. resetting the
        lengths that ``append_`` bumps). Returns ``(median_ms, wall_ms or None)``.
        """
        cfg = self.cfg
        budget_s = cfg["budget_s"] if budget_s is None else budget_s
        max_reps = cfg["max_reps"] if max_reps is None else max_reps
        nwarm = max(2, min(nsets, 8))
        for i in range(nwarm):
            if pre:
                pre(i % nsets)
            call(i % nsets)
        self.sync()
        t0 = time.perf_counter()
        for i in range(3):
            if pre:
                pre(i % nsets)
            call(i % nsets)
        self.sync()
        est = (time.perf_counter() - t0) / 3
        if self.cpu:
            reps = int(max(cfg["min_reps"], min(max_reps, budget_s / max(est, 1e-6))))
            times = []
            for r in range(reps):
                if pre:
                    pre(r % nsets)
                t = time.perf_counter()
                call(r % nsets)
                times.append((time.perf_counter() - t) * 1e3)
            med = statistics.median(times)
        else:
            sleep_ms = min(2.0, max(0.05, 2 * est * 1e3))
            cycles = int(sleep_ms * self.sleep_cycles_per_ms)
            reps = int(max(cfg["min_reps"], min(max_reps, budget_s / (est + sleep_ms * 1e-3))))
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for r in range(reps):
                if pre:
                    pre(r % nsets)
                torch.cuda._sleep(cycles)
                starts[r].record()
                call(r % nsets)
                ends[r].record()
            torch.cuda.synchronize()
            med = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
        wall_ms = None
        if wall:
            n = max(3, min(reps, 200))
            self.sync()
            t = time.perf_counter()
            for r in range(n):
                call(r % nsets)
            self.sync()
            wall_ms = (time.perf_counter() - t) / n * 1e3
        return med, wall_ms

    # -- records --------------------------------------------------------------------------
    def shape(self, B, N=None, C=None, W=None):
        c = self.cfg
        return dict(B=B, Hq=c["Hq"], Hk=c["Hk"], D=c["D"], N=N, C=C, W=c["W"] if W is None else W)

    def emit(self, op, shape, ms, ref=None, ref_ms=None, nbytes=None, note="", target=None,
             check=None):
        """Record one measurement. ``check(rec) -> bool`` decides ``met`` for ``target``."""
        gbps = None
        if ms is not None and nbytes:
            gbps = nbytes / (ms * 1e-3) / 1e9
        rec = {
            "op": op,
            "device": self.device_name,
            "torch": torch.__version__,
            "date": self.date,
            "shape": shape,
            "ms": _r(ms),
            "ref_ms": _r(ref_ms),
            "gbps": _r(gbps, 2),
            "ref": ref,
            "copy_gbps": _r(self.copy_gbps, 1),
            "pct_copy": _r(100 * gbps / self.copy_gbps, 1) if gbps and self.copy_gbps else None,
            "speedup": _r(ref_ms / ms, 2) if ms and ref_ms else None,
        }
        met = None
        if target:
            if self.cpu:
                met = "n/a (cpu)"
            elif check is not None:
                try:
                    ok = check(rec)
                    met = "n/a" if ok is None else ("met" if ok else "missed")
                except Exception:  # noqa: BLE001  (a null value)
                    met = "missed"
            note = (note + "; " if note else "") + f"target {target}: {met}"
        rec["note"] = note
        rec["_target"] = target
        rec["_met"] = met
        self.sink(rec)
        return rec

    def fail_note(self, e):
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        if any(m in str(e) for m in FATAL_MARKERS):
            self.dead = msg
        return msg

    def try_bench(self, *a, **k):
        """``bench`` that returns ``(None, None, error)`` instead of raising."""
        if self.dead:
            return None, None, f"skipped: CUDA context lost earlier ({self.dead})"
        try:
            ms, wall = self.bench(*a, **k)
            return ms, wall, None
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            err = self.fail_note(e)
            if not self.cpu:
                try:
                    torch.cuda.synchronize()
                except Exception as e2:  # noqa: BLE001
                    self.fail_note(e2)
            return None, None, err

    def randn(self, *shape):
        """Random N(0, 1) data on the device (never zeros)."""
        return torch.randn(*shape, generator=self.dgen, device=self.dev, dtype=self.dtype)

    def free(self):
        import gc

        gc.collect()
        if not self.cpu:
            torch.cuda.empty_cache()


def _r(x, nd=5):
    if x is None:
        return None
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return round(float(x), nd)


def device_name(cpu):
    if cpu:
        import platform

        return "cpu: " + (platform.processor() or platform.machine())
    return torch.cuda.get_device_name()


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def calibrate_sleep():
    """Cycles of ``torch.cuda._sleep`` per millisecond on this GPU."""
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(100_000)
    s.record()
    torch.cuda._sleep(2_000_000)
    e.record()
    torch.cuda.synchronize()
    return 2_000_000 / max(s.elapsed_time(e), 1e-3)


def copy_bandwidth(cpu, nbytes=None):
    """Device-to-device copy bandwidth of an ``nbytes`` copy (default 1 GiB, 256 MiB on the CPU)
    in GB/s, counting bytes read + bytes written: ``(GB/s, median ms, nbytes)``."""
    dev = "cpu" if cpu else "cuda"
    if nbytes is None:
        nbytes = (256 << 20) if cpu else (1 << 30)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(5 if cpu else 40):
        if cpu:
            t = time.perf_counter()
            dst.copy_(src)
            dt = (time.perf_counter() - t) * 1e3
        else:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dst.copy_(src)
            e.record()
            torch.cuda.synchronize()
            dt = s.elapsed_time(e)
        if i >= 2:
            times.append(dt)
    ms = statistics.median(times)
    del src, dst
    if not cpu:
        torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9, ms, nbytes


def cuda_graph_of(fn, warmup=2):
    """``fn()`` captured in a CUDA graph, after ``warmup`` calls on a side stream (lazy
    initialisation, allocator pools, compilation stay out of the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_replay_ms(fn, reps=30, warmup=2, sleep_cycles=0):
    """Median ms of one replay of ``fn()``'s CUDA graph (:func:`cuda_graph_of`) over ``reps``
    replays after three more, CUDA events around each; ``sleep_cycles`` > 0 puts a
    ``torch.cuda._sleep`` before each replay (the events then time the GPU alone)."""
    graph = cuda_graph_of(fn, warmup)
    for _ in range(3):
        graph.replay()
    times = [event_ms(graph.replay, sleep_cycles) for _ in range(reps)]
    del graph
    return statistics.median(times)


def event_ms(fn, sleep_cycles=0):
    """ms of one ``fn()`` between two CUDA events (waits for the second); ``sleep_cycles`` > 0
    queues a ``torch.cuda._sleep`` first, so that the host has queued ``fn``'s work before the
    GPU reaches the first event (the events then time the GPU, not the launch)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if sleep_cycles:
        torch.cuda._sleep(sleep_cycles)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def nsets_for(set_bytes, cap=16):
    """Enough independent input sets that their total exceeds ~3x the 50 MB L2."""
    return int(max(1, min(cap, math.ceil(150e6 / max(set_bytes, 1)))))


# ---------------------------------------------------------------------------------------------
# input builders


def spread_stats(values) -> dict:
    """How spread a list of numbers is (e.g. the rows the segments hold): their count
    (``segments``), min, mean, max, ``p90`` (the value at rank ``int(0.9 (n - 1))`` ascending)
    and ``cv``, the coefficient of variation (population standard deviation / mean; 0 for no
    values or a zero mean)."""
    v = sorted(values)
    if not v:
        return {"segments": 0, "min": 0, "mean": 0.0, "max": 0, "p90": 0, "cv": 0.0}
    mean = statistics.fmean(v)
    return {"segments": len(v), "min": v[0], "mean": mean, "max": v[-1],
            "p90": v[int(0.9 * (len(v) - 1))],
            "cv": statistics.pstdev(v) / mean if mean > 0 else 0.0}


def ada_budgets(B, Hk, C, gen, alpha=0.2, sigma=1.0):
    """Per-head budgets [B, Hk] shaped like Ada-KV's: lognormal shares of the Hk*C winners,
    safeguarded with alpha, rounded so each row sums to Hk*C exactly."""
    w = torch.exp(sigma * torch.randn(B, Hk, generator=gen, dtype=torch.float64))
    c = Hk * C * w / w.sum(1, keepdim=True)
    x = (1 - alpha) * c + alpha * C
    fl = torch.floor(x)
    rem = (Hk * C - fl.sum(1)).long()
    frac = x - fl
    order = torch.argsort(-frac, dim=1, stable=True)
    for b in range(B):
        fl[b, order[b, : int(rem[b])]] += 1
    return fl.long()


def flat_layout(ctx, B, C, reserve):
    """seg_start, seg_len (int32 on device) and rows for an Ada-like flat cache."""
    cfg = ctx.cfg
    Hk, W = cfg["Hk"], cfg["W"]
    bud = ada_budgets(B, Hk, C, ctx.gen).reshape(-1)
    lens = bud + W
    cap = lens + reserve
    start = torch.cumsum(cap, 0) - cap
    rows = B * Hk * (C + W + reserve)
    assert int(cap.sum()) == rows
    return (start.to(torch.int32).to(ctx.dev), lens.to(torch.int32).to(ctx.dev), rows)


def flat_layers(ctx, B, C, reserve, nsets):
    """``nsets`` layers sharing one segment layout, each with its own random K/V/query/new
    token (random data, never zeros)."""
    cfg = ctx.cfg
    Hq, Hk, D = cfg["Hq"], cfg["Hk"], cfg["D"]
    ss, sl, rows = flat_layout(ctx, B, C, reserve)
    L = []
    for _ in range(nsets):
        L.append(dict(k=ctx.randn(rows, D), v=ctx.randn(rows, D), q=ctx.randn(B, Hq, 1, D),
                      kn=ctx.randn(B, Hk, 1, D), vn=ctx.randn(B, Hk, 1, D)))
    return ss, sl, rows, L


def decode_bytes(ctx, B, seg_len):
    es = torch.finfo(ctx.dtype).bits // 8
    D, Hq = ctx.cfg["D"], ctx.cfg["Hq"]
    kept = int(seg_len.sum())
    return 2 * kept * D * es + 2 * B * Hq * D * es + 2 * seg_len.numel() * 4


def _gib(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def fmt_wall(name, w):
    return f"wall[{name}] {w * 1e3:.1f} us/call" if w is not None else ""


def join(*parts):
    return "; ".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# cases


def case_evict(ctx):
    cfg = ctx.cfg
    Hq, Hk, D, W, C = cfg["Hq"], cfg["Hk"], cfg["D"], cfg["W"], cfg["C"]
    B = 1
    es = 2
    tgt_ms = {8192: 0.05, 32768: 0.10, 131072: 0.30}
    for N in cfg["evict_N"]:
        shape = ctx.shape(B, N=N, C=C)
        L = N - W
        set_bytes = (2 * B * Hk * N * D + B * Hq * W * D) * es
        nsets = nsets_for(set_bytes, cap=8)
        sets = [dict(q=ctx.randn(B, Hq, W, D), k=ctx.randn(B, Hk, N, D),
                     v=ctx.randn(B, Hk, N, D)) for _ in range(nsets)]
        nbytes = (B * Hk * N * D + B * Hq * W * D + 4 * B * Hk * (C + W) * D) * es
        ops_err = OPS_ERR
        ms = wall = None
        if ops_err is None:
            ms, wall, ops_err = ctx.try_bench(
                lambda i: adakv_ops.evict(sets[i]["q"], sets[i]["k"], sets[i]["v"], C), nsets)
        ref_ms, ref_wall, ref_err = ctx.try_bench(
            lambda i: bl.reference_evict(sets[i]["q"], sets[i]["k"], sets[i]["v"], C), nsets,
            max_reps=60)
        t = tgt_ms.get(N)
        ctx.emit("evict", shape, ms, ref="reference_evict", ref_ms=ref_ms, nbytes=nbytes,
                 note=join(f"adakv: {ops_err}" if ops_err else "",
                           f"ref: {ref_err}" if ref_err else "", f"{nsets} input sets",
                           fmt_wall("adakv", wall), fmt_wall("ref", ref_wall)),
                 target=(f"<= {t} ms and >= 15x" if t else ">= 15x"),
                 check=lambda r, t=t: ((t is None or r["ms"] <= t) and r["speedup"] >= 15)
                 if r["ref_ms"] is not None or r["ms"] is None else
                 (None if t is None else (False if r["ms"] > t else None)))
        # stage split
        if OPS_ERR is None and not ctx.dead:
            stage_times = {}
            try:
                inter = []
                for s in sets:
                    sc = adakv_ops.score(s["q"], s["k"])
                    bu = adakv_ops.allocate(sc, C)
                    ki, kc = adakv_ops.select(sc, bu)
                    inter.append(dict(sc=sc, bu=bu, ki=ki, kc=kc))
                ctx.sync()
                inter_err = None
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                inter_err = ctx.fail_note(e)
            rows = B * Hk * (C + W)
            stages = [
                ("score", lambda i: adakv_ops.score(sets[i]["q"], sets[i]["k"]),
                 (B * Hk * N * D + B * Hq * W * D) * es + B * Hk * L * 4),
                ("allocate", lambda i: adakv_ops.allocate(inter[i]["sc"], C), B * Hk * L * 4),
                ("select", lambda i: adakv_ops.select(inter[i]["sc"], inter[i]["bu"]),
                 2 * B * Hk * L * 4),
                ("compact", lambda i: adakv_ops.compact(
                    sets[i]["k"], sets[i]["v"], inter[i]["ki"], inter[i]["kc"], inter[i]["bu"],
                    W, 0, rows), 4 * B * Hk * (C + W) * D * es + B * Hk * (C + W) * 4),
            ]
            for name, fn, nb in stages:
                if inter_err:
                    sms, err = None, f"stage inputs failed: {inter_err}"
                else:
                    sms, _, err = ctx.try_bench(fn, nsets, wall=False)
                stage_times[name] = sms
                ctx.emit(f"evict.{name}", shape, sms, nbytes=nb,
                         note=join(err or "", "stage of adakv_ops.evict, timed alone"))
            tot = sum(v for v in stage_times.values() if v is not None)
            if ms and tot:
                print(f"  evict N={N}: stages sum {tot:.4f} ms vs fused call {ms:.4f} ms: " +
                      ", ".join(f"{k} {100 * (v or 0) / tot:.0f}%" for k, v in stage_times.items()))
        del sets
        ctx.free()


def case_append(ctx):
    cfg = ctx.cfg
    Hk, D, W, C = cfg["Hk"], cfg["D"], cfg["W"], cfg["C"]
    B, T = 1, 1
    reserve = cfg["reserve"]
    nsets = cfg["b1_sets"]
    ss, sl, rows, layers = flat_layers(ctx, B, C, reserve, nsets)
    lens0 = sl.unsqueeze(0).repeat(nsets, 1).contiguous()
    lens = lens0.clone()
    shape = ctx.shape(B, N=None, C=C)
    es = 2
    nbytes = 4 * B * Hk * T * D * es + 2 * B * Hk * 4
    ops_err = OPS_ERR
    ms = wall = None
    if ops_err is None:
        def call(i):
            x = layers[i]
            adakv_ops.append_(x["k"], x["v"], ss, lens[i], x["kn"], x["vn"])

        ms, _, ops_err = ctx.try_bench(call, nsets, pre=lambda i: lens[i].copy_(lens0[i]),
                                       wall=False)
        if ops_err is None:
            # back-to-back loop without resets: stays inside the reserve
            n = min(200, nsets * (reserve - 4))
            lens.copy_(lens0)
            ctx.sync()
            t = time.perf_counter()
            for r in range(n):
                call(r % nsets)
            ctx.sync()
            wall = (time.perf_counter() - t) / n * 1e3
            grew = int((lens - lens0).sum())
            if grew != n * B * Hk * T:
                ops_err = f"seg_len grew by {grew}, expected {n * B * Hk * T}"
            lens.copy_(lens0)
    # reference: the official per-step copy of the whole (packed) cache
    packed = [bl.pack_flat(x["k"], x["v"], ss, sl) for x in layers]
    ref_ms, ref_wall, ref_err = ctx.try_bench(
        lambda i: bl.reference_decode_append(*packed[i], layers[i]["kn"], layers[i]["vn"]),
        nsets)
    ctx.emit("append_", shape, ms, ref="reference_decode_append", ref_ms=ref_ms, nbytes=nbytes,
             note=join(f"adakv: {ops_err}" if ops_err else "", f"ref: {ref_err}" if ref_err else "",
                       f"T=1, {nsets} layers, ~{int(sl.float().mean())} tokens/head",
                       fmt_wall("adakv", wall), fmt_wall("ref", ref_wall)),
             target="<= 0.004 ms", check=lambda r: r["ms"] <= 0.004)
    del layers, packed
    ctx.free()


def _decode_common(ctx, B, C, nsets, flex_layouts, full_sdpa, targets):
    cfg = ctx.cfg
    Hq, Hk, D, W = cfg["Hq"], cfg["Hk"], cfg["D"], cfg["W"]
    reserve = cfg["reserve"]
    ss, sl, rows, layers = flat_layers(ctx, B, C, reserve, nsets)
    shape = ctx.shape(B, N=None, C=C)
    nbytes = decode_bytes(ctx, B, sl)
    per_head = float(sl.float().mean())
    base_note = (f"flat cache built directly: {nsets} layer(s), Ada-like per-head lengths, "
                 f"mean {per_head:.0f} max {int(sl.max())} tokens/head")
    ops_err = OPS_ERR
    ms = wall = None
    out0 = None
    if ops_err is None:
        ms, wall, ops_err = ctx.try_bench(
            lambda i: adakv_ops.decode_attention(layers[i]["q"], layers[i]["k"], layers[i]["v"],
                                                 ss, sl), nsets)
        if ops_err is None:
            out0 = adakv_ops.decode_attention(layers[0]["q"], layers[0]["k"], layers[0]["v"], ss,
                                              sl).float()

    def agree(o):
        if out0 is None or o is None:
            return ""
        return f"max|out-adakv| {float((o.float() - out0).abs().max()):.2e}"

    # padded SDPA
    pad_note = ""
    try:
        t = time.perf_counter()
        pads = [bl.pad_flat_cache(x["k"], x["v"], ss, sl, B) for x in layers]
        ctx.sync()
        pad_ms = (time.perf_counter() - t) * 1e3 / nsets
        maxlen = pads[0][0].shape[2]
        pad_note = f"padded to {maxlen} rows/head; padding (not timed) {pad_ms:.3f} ms/layer"
        ref_ms, ref_wall, ref_err = ctx.try_bench(
            lambda i: bl.padded_sdpa(layers[i]["q"], *pads[i]), nsets)
        o = bl.padded_sdpa(layers[0]["q"], *pads[0]) if ref_err is None else None
        pad_note = join(pad_note, agree(o))
        del pads
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        ref_ms, ref_wall, ref_err = None, None, ctx.fail_note(e)
    tgt, chk = targets.get("padded", (None, None))
    ctx.emit("decode_attention", shape, ms, ref="padded_sdpa", ref_ms=ref_ms, nbytes=nbytes,
             note=join(f"adakv: {ops_err}" if ops_err else "", f"ref: {ref_err}" if ref_err else "",
                       base_note, pad_note, fmt_wall("adakv", wall), fmt_wall("ref", ref_wall)),
             target=tgt, check=chk)
    ctx.free()

    # FlexAttention over the same flat cache
    for layout in flex_layouts:
        ref_ms = ref_wall = None
        fnote = ""
        if ctx.dead:
            ref_err = f"skipped: CUDA context lost earlier ({ctx.dead})"
        else:
            try:
                fd = bl.FlexDecode(ss, sl, rows, B, Hq, Hk, layout=layout, compile=not ctx.cpu,
                                   dense_limit_bytes=(2e9 if ctx.cpu else 8e9))
                fnote = (f"block mask via {fd.build_method} in {fd.build_ms:.0f} ms "
                         f"(dense create_block_mask would need ~{_gib(fd.dense_mask_bytes)})"
                         + (f" [{fd.build_note}]" if fd.build_note else ""))
                t = time.perf_counter()
                o = fd(layers[0]["q"], layers[0]["k"], layers[0]["v"])
                ctx.sync()
                first_ms = (time.perf_counter() - t) * 1e3
                fnote = join(fnote, f"first call (compile) {first_ms / 1e3:.1f} s", agree(o))
                ref_ms, ref_wall, ref_err = ctx.try_bench(
                    lambda i: fd(layers[i]["q"], layers[i]["k"], layers[i]["v"]), nsets)
                del fd, o
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                ref_err = ctx.fail_note(e)
                if "out of memory" in str(e).lower():
                    ref_err = "out of memory: " + ref_err
        tgt, chk = targets.get("flex", (None, None))
        ctx.emit("decode_attention", shape, ms, ref=f"flex_attention[{layout}]", ref_ms=ref_ms,
                 nbytes=nbytes,
                 note=join(f"adakv: {ops_err}" if ops_err else "", f"ref: {ref_err}" if ref_err else "",
                           fnote, fmt_wall("adakv", wall), fmt_wall("ref", ref_wall)),
                 target=tgt, check=chk)
        ctx.free()

    # full-cache SDPA (context: what decoding costs without compression)
    for N in full_sdpa:
        try:
            set_bytes = 2 * B * Hk * N * D * 2
            ns = nsets_for(set_bytes, cap=8)
            fs = [dict(k=ctx.randn(B, Hk, N, D), v=ctx.randn(B, Hk, N, D),
                       q=ctx.randn(B, Hq, 1, D)) for _ in range(ns)]
            best = None
            notes = []
            for g in ("enable_gqa", "reshape"):
                r_ms, r_wall, r_err = ctx.try_bench(
                    lambda i, g=g: bl.full_sdpa_decode(fs[i]["q"], fs[i]["k"], fs[i]["v"], gqa=g),
                    ns, wall=False)
                notes.append(f"{g}: {r_ms:.4f} ms" if r_ms is not None else f"{g}: {r_err}")
                if r_ms is not None and (best is None or r_ms < best):
                    best = r_ms
            err = None if best is not None else "all SDPA variants failed"
            del fs
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            best, err, notes = None, ctx.fail_note(e), []
        ctx.emit("decode_attention", ctx.shape(B, N=N, C=C), ms, ref=f"sdpa_full_cache(N={N})",
                 ref_ms=best, nbytes=nbytes,
                 note=join(f"ref: {err}" if err else "",
                           "context: uncompressed cache of N tokens/head vs adakv compressed "
                           f"cache (~{per_head:.0f}/head); best of " + ", ".join(notes)))
        ctx.free()
    del layers
    ctx.free()


def case_decode_b1(ctx):
    cfg = ctx.cfg
    _decode_common(
        ctx, 1, cfg["C"], cfg["b1_sets"], cfg["flex_b1"], cfg["sdpa_N"],
        targets={"padded": ("<= 0.008 ms", lambda r: r["ms"] <= 0.008),
                 "flex": ("<= 0.008 ms and >= 1.5x vs Flex",
                          lambda r: None if r["ref_ms"] is None and r["ms"] is not None
                          else r["ms"] <= 0.008 and r["speedup"] >= 1.5)})


def case_decode_bN(ctx):
    cfg = ctx.cfg
    _decode_common(
        ctx, cfg["bN"], cfg["bN_C"], 1, cfg["flex_bN"], [],
        targets={"padded": (">= 85% of copy bandwidth", lambda r: r["pct_copy"] >= 85),
                 "flex": (">= 85% of copy bandwidth", lambda r: r["pct_copy"] >= 85)})


def case_graph(ctx):
    cfg = ctx.cfg
    Hk, D, C = cfg["Hk"], cfg["D"], cfg["C"]
    B = 1
    shape = ctx.shape(B, N=None, C=C)
    kinds = [("append_", "<= 0.004 ms", 0.004), ("decode_attention", "<= 0.008 ms", 0.008),
             ("append_+decode_attention", "<= 0.012 ms (4 + 8 us)", 0.012)]
    if ctx.cpu or OPS_ERR:
        why = "CUDA graphs need CUDA" if ctx.cpu else OPS_ERR
        for k, tgt, _ in kinds:
            ctx.emit(f"graph[{k}]", shape, None, note=f"skipped: {why}")
        return
    nsets = cfg["graph_sets"]
    ss, sl, rows, layers = flat_layers(ctx, B, C, cfg["reserve"], nsets)
    lens0 = sl.unsqueeze(0).repeat(nsets, 1).contiguous()
    lens = lens0.clone()
    nbytes_dec = decode_bytes(ctx, B, sl)
    outs = [None] * nsets

    def do_append(i):
        x = layers[i]
        adakv_ops.append_(x["k"], x["v"], ss, lens[i], x["kn"], x["vn"])

    def do_decode(i):
        x = layers[i]
        outs[i] = adakv_ops.decode_attention(x["q"], x["k"], x["v"], ss, lens[i])

    for kind, tgt, lim in kinds:
        fns = {"append_": [do_append], "decode_attention": [do_decode],
               "append_+decode_attention": [do_append, do_decode]}[kind]
        ms = None
        err = None
        if ctx.dead:
            err = f"skipped: CUDA context lost earlier ({ctx.dead})"
        else:
            try:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        for i in range(nsets):
                            for f in fns:
                                f(i)
                        lens.copy_(lens0)
                torch.cuda.current_stream().wait_stream(s)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for i in range(nsets):
                        for f in fns:
                            f(i)
                torch.cuda.synchronize()
                lens.copy_(lens0)
                tot, _, err = ctx.try_bench(lambda i: g.replay(), 1,
                                            pre=lambda i: lens.copy_(lens0), wall=False,
                                            max_reps=100)
                ms = tot / nsets if tot is not None else None
                if err is None and "append_" in kind:
                    lens.copy_(lens0)
                    g.replay()
                    torch.cuda.synchronize()
                    if not torch.equal(lens, lens0 + 1):
                        err = "seg_len not bumped by exactly 1 per replay"
                del g
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                err = ctx.fail_note(e)
        nb = {"append_": 4 * B * Hk * D * 2, "decode_attention": nbytes_dec,
              "append_+decode_attention": nbytes_dec + 4 * B * Hk * D * 2}[kind]
        ctx.emit(f"graph[{kind}]", shape, ms, nbytes=nb,
                 note=join(err or "", f"CUDA graph of {nsets} layers replayed; ms per layer; "
                           f"~{int(sl.float().mean())} tokens/head"),
                 target=tgt, check=lambda r, lim=lim: r["ms"] <= lim)
        ctx.free()


CASE_FNS = {"evict": case_evict, "append": case_append, "decode_b1": case_decode_b1,
            "decode_bN": case_decode_bN, "graph": case_graph}


# ---------------------------------------------------------------------------------------------
# output


def shape_str(s):
    return " ".join(f"{k}{v}" for k, v in s.items() if v is not None)


def _f(x, nd=4):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def table_rows(records):
    rows = []
    for r in records:
        op = r["op"] + (f" vs {r['ref']}" if r.get("ref") else "")
        rows.append([op, shape_str(r["shape"]), _f(r["ms"]), _f(r["ref_ms"]),
                     _f(r["speedup"], 2), _f(r["gbps"], 1), _f(r["pct_copy"], 1),
                     r.get("_target") or "-", r.get("_met") or "-"])
    return rows


HEAD = ["op", "shape", "ms", "ref_ms", "speedup", "GB/s", "%copy", "target", "met"]


def print_table(records, header):
    rows = table_rows(records)
    w = [max(len(HEAD[i]), *(len(r[i]) for r in rows)) if rows else len(HEAD[i])
         for i in range(len(HEAD))]
    print()
    print(header)
    print("  ".join(h.ljust(w[i]) for i, h in enumerate(HEAD)))
    print("  ".join("-" * w[i] for i in range(len(HEAD))))
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))


def write_md(path, records, header_lines):
    lines = ["# adakv_ops op benchmarks", ""] + [f"- {h}" for h in header_lines] + [""]
    lines.append("| " + " | ".join(HEAD + ["note"]) + " |")
    lines.append("|" + "---|" * (len(HEAD) + 1))
    for r, row in zip(records, table_rows(records)):
        note = (r.get("note") or "").replace("|", "/")
        lines.append("| " + " | ".join(row + [note]) + " |")
    Path(path).write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# driver


def run_case_inprocess(args, cfg, copy_gbps, case, sink):
    ctx = Ctx(args, cfg, copy_gbps, sink)
    try:
        CASE_FNS[case](ctx)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        ctx.emit(case, ctx.shape(1), None, note=f"case failed: {ctx.fail_note(e)}")


def child_main(args):
    cfg = make_config(args)
    out = open(args.child_out, "a")

    def sink(rec):
        out.write(json.dumps(rec) + "\n")
        out.flush()
        print(f"[{rec['op']}{' vs ' + rec['ref'] if rec.get('ref') else ''}] "
              f"{shape_str(rec['shape'])}: ms={rec['ms']} ref_ms={rec['ref_ms']} "
              f"speedup={rec['speedup']} gbps={rec['gbps']} {rec['note']}", flush=True)

    run_case_inprocess(args, cfg, args.copy_gbps, args.child, sink)
    out.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small subset (smoke test)")
    p.add_argument("--cpu", action="store_true", help="run on CPU (smoke test; small shapes)")
    p.add_argument("--out", default=None, help="JSON lines output")
    p.add_argument("--md", default=None, help="markdown table output")
    p.add_argument("--cases", default=",".join(CASES), help="comma list of " + ",".join(CASES))
    p.add_argument("--flex-layouts", default=None, help="override Flex layouts: seq,heads")
    p.add_argument("--no-flex", action="store_true", help="skip the FlexAttention baselines")
    p.add_argument("--no-isolate", action="store_true",
                   help="run all cases in this process (default: one subprocess per case)")
    p.add_argument("--case-timeout", type=float, default=240.0, help="seconds per case subprocess")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--copy-gbps", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if os.environ.get("ADAKV_DEBUG") == "1":
        print("note: unsetting ADAKV_DEBUG (it adds a host sync to every append_)")
        os.environ.pop("ADAKV_DEBUG")
    if args.cpu:
        torch.set_num_threads(1)  # stable smoke timings on small, shared machines
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu for the CPU smoke test")
    if args.child:
        child_main(args)
        return

    t_start = time.time()
    cfg = make_config(args)
    dname = device_name(args.cpu)
    dslug = "cpu" if args.cpu else slug(dname)
    out = Path(args.out) if args.out else HERE / "results" / f"ops-{dslug}.jsonl"
    md = Path(args.md) if args.md else out.with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    md.parent.mkdir(parents=True, exist_ok=True)
    if OPS_ERR:
        print(f"WARNING: {OPS_ERR}; only the baselines will be timed")

    copy_gbps, copy_ms, copy_bytes = copy_bandwidth(args.cpu)
    print(f"device: {dname}; torch {torch.__version__}; copy bandwidth {copy_gbps:.1f} GB/s "
          f"({copy_bytes >> 20} MiB copied in {copy_ms:.3f} ms, read+write counted)")
    records = []
    date = datetime.date.today().isoformat()
    records.append({
        "op": "device_copy", "device": dname, "torch": torch.__version__, "date": date,
        "shape": {"B": None, "Hq": None, "Hk": None, "D": None, "N": None, "C": None, "W": None},
        "ms": _r(copy_ms), "ref_ms": None, "gbps": _r(copy_gbps, 2), "ref": None,
        "copy_gbps": _r(copy_gbps, 1), "pct_copy": 100.0, "speedup": None,
        "note": f"dst.copy_(src) of {copy_bytes >> 20} MiB; bytes = read + written",
        "_target": None, "_met": None})

    cases = [c for c in args.cases.split(",") if c]
    for case in cases:
        if case not in CASE_FNS:
            sys.exit(f"unknown case {case}; choose from {CASES}")
        print(f"\n== {case} ==", flush=True)
        if args.no_isolate:
            run_case_inprocess(args, cfg, copy_gbps, case, records.append)
            continue
        with tempfile.TemporaryDirectory() as td:
            cout = Path(td) / "records.jsonl"
            cerr = Path(td) / "stderr.txt"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case,
                   "--child-out", str(cout), "--copy-gbps", repr(copy_gbps),
                   "--seed", str(args.seed)]
            for flag in ("quick", "cpu", "no_flex"):
                if getattr(args, flag):
                    cmd.append("--" + flag.replace("_", "-"))
            if args.flex_layouts:
                cmd += ["--flex-layouts", args.flex_layouts]
            err = None
            with open(cerr, "w") as ef:
                # own session, so a timeout also ends its compile workers (by process group id)
                proc = subprocess.Popen(cmd, stderr=ef, start_new_session=True)
                try:
                    rc = proc.wait(timeout=args.case_timeout)
                    if rc != 0:
                        err = f"case subprocess exited with code {rc}"
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()
                    err = f"case subprocess timed out after {args.case_timeout:.0f} s"
            got = []
            if cout.exists():
                got = [json.loads(line) for line in cout.read_text().splitlines() if line.strip()]
            records.extend(got)
            tail = cerr.read_text()[-3000:] if cerr.exists() else ""
            if err or (tail and "Traceback" in tail):
                print(f"-- {case}: stderr tail --\n{tail}", flush=True)
            if err:
                last = " | ".join(tail.strip().splitlines()[-2:])[-300:]
                records.append({
                    "op": case, "device": dname, "torch": torch.__version__, "date": date,
                    "shape": {"B": None, "Hq": cfg["Hq"], "Hk": cfg["Hk"], "D": cfg["D"],
                              "N": None, "C": cfg["C"], "W": cfg["W"]},
                    "ms": None, "ref_ms": None, "gbps": None, "ref": None,
                    "copy_gbps": _r(copy_gbps, 1), "pct_copy": None, "speedup": None,
                    "note": f"{err} after {len(got)} record(s): {last}",
                    "_target": None, "_met": None})

    with open(out, "w") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n")
    header = [f"device: {dname}", f"torch: {torch.__version__}", f"date: {date}",
              f"copy bandwidth: {copy_gbps:.1f} GB/s (read+write)",
              f"mode: {'cpu ' if args.cpu else ''}{'quick' if args.quick else 'full'}; "
              f"dtype bf16; Llama-3.1-8B layer shapes" if not args.cpu else
              f"mode: cpu {'quick' if args.quick else 'full'}, 1 thread (small shapes; targets are GPU targets)",
              "ms = adakv_ops median per call (GPU time, CUDA events); ref_ms = baseline median; "
              "GB/s from the minimal bytes moved (benchmarks/README.md)"]
    write_md(md, records, header)
    met = [r for r in records if r.get("_met") in ("met", "missed")]
    print_table(records, f"adakv_ops benchmarks: {dname}, torch {torch.__version__}, {date}, "
                         f"copy {copy_gbps:.0f} GB/s; {len(records)} records -> {out}, {md}; "
                         f"targets met {sum(r['_met'] == 'met' for r in met)}/{len(met)}; "
                         f"{time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
