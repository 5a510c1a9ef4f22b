"""Paged decode vs the contiguous kernel (issue 12's evidence): one Llama-3.1-8B layer (Hq 32,
Hk 8, D 128, bf16), Ada-like per-head lengths, at batch 1 (~1K tokens/head) and batch 64
(2K tokens/head), for several page sizes P (``--configs`` picks other batch x budget pairs,
``--sigma`` the spread of the heads' lengths: 1 by default, 0 for even heads). Pages are
scattered (a random permutation of the pool), as after many joins and leaves.

Times are CUDA-event medians over rotating input sets larger than L2, eager (each call behind a
``torch.cuda._sleep``, so the events time the GPU and not the launch latency) and replayed in a
CUDA graph (batch 1; batch 64 with ``--graph-all``); bandwidth is the bytes the kernel must read
(kept K/V + queries + metadata) against the device-to-device copy bandwidth measured in the
same run.

Peers on the same per-head lengths and the same data (T = 1 decode only; the script measures
no T > 1):

* ``flex_attention``: ``torch.nn.attention.flex_attention`` over a dense padded cache
  ``[B, Hk, Nmax, D]`` (KV head ``h`` of row ``b`` holds its tokens in ``[0, len)``, zeros after;
  ``Nmax`` = longest head rounded up to 128), query ``[B, Hq, 1, D]``, ``enable_gqa=True``,
  ``scale = 1/sqrt(D)``, ``torch.compile(flex_attention, dynamic=False)``. The block mask is
  ``create_block_mask`` of ``kv_idx < lens[b, h // G]`` over the *query* heads ``h`` (``lens``
  an int32 ``[B, Hk]`` device tensor), built once outside the timed loop; its one-off time is
  ``block_mask_ms`` and the first (compiling) call is ``first_call_s``. Only the flex call is
  timed. ``pct_copy`` counts the same bytes as the other rows (valid K/V rows only), so the
  padding Flex reads shows up as lost bandwidth; ``touched_kv_bytes`` is the K/V it reads (the
  128-row KV blocks the block mask keeps), ``padded_kv_bytes`` the whole dense K/V tensors and
  ``pct_copy_touched`` the bandwidth on the touched bytes. Its output is checked against the
  contiguous kernel's (``max_abs_diff``); above ``--tol`` (bf16: 2e-2) the run still writes its
  records, then exits non-zero. On ``--cpu`` it runs eagerly (unfused; a smoke check only).
* ``flashinfer P=...``: ``flashinfer.BatchDecodeWithPagedKVCacheWrapper`` over the same page
  pools (each segment a request of one KV head with ``G`` query heads, NHD pages
  ``[num_pages, P, 1, D]``); skipped with the reason printed when ``import flashinfer`` fails
  (or on ``--cpu``).

    python benchmarks/bench_paged.py --out benchmarks/results/paged-h200.jsonl
    python benchmarks/bench_paged.py --cpu --quick --out /tmp/paged-cpu.jsonl   # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import (ada_budgets, calibrate_sleep, copy_bandwidth, device_name,  # noqa: E402
                       event_ms, graph_replay_ms, nsets_for)

import adakv_ops  # noqa: E402

Hq, Hk, D, W = 32, 8, 128, 32
CPU_SHAPES = dict(Hq=8, Hk=2, D=64, W=8)  # --cpu: a small layer (smoke test)
# decode schedules of the kernel family (--schedules): the environment each is timed under
SCHEDULE_ENV = {"default": {}, "split": {"ADAKV_DECODE_BALANCED": "0"},
                "balanced": {"ADAKV_DECODE_BALANCED": "1"},
                # a forced split count of the split kernel (the heuristic's alternatives)
                **{f"split{n}": {"ADAKV_DECODE_SPLITS": str(n), "ADAKV_DECODE_BALANCED": "0"}
                   for n in (1, 2, 3, 4, 6, 8, 16)}}


def median_ms(fn, nsets, reps=200, cpu=False, sleep_cycles=0):
    """Median time of one call. CUDA: each call is preceded by ``torch.cuda._sleep`` (about
    twice the call's time) so that the host has queued the call before the GPU reaches the
    start event: the events time the GPU's work, not the Python / launch latency (as
    bench_ops.py does; without it a 150 us kernel was charged ~10-15 us of launch gap)."""
    for i in range(max(4, nsets)):
        fn(i % nsets)
    if cpu:
        times = []
        for r in range(reps):
            t = time.perf_counter()
            fn(r % nsets)
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = [event_ms(lambda r=r: fn(r % nsets), sleep_cycles) for r in range(reps)]
    return statistics.median(times)


def graph_ms(fn, nsets, calls=64, reps=30):
    """Per-call time of ``calls`` calls replayed in one CUDA graph (launch overhead removed)."""
    return graph_replay_ms(lambda: [fn(i % nsets) for i in range(calls)], reps) / calls


def build(B, C, P_list, gen, dev, ordered=False, sigma=1.0):
    lens = (ada_budgets(B, Hk, C, gen, sigma=sigma).reshape(-1) + W).to(torch.int64)
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
        perm = torch.arange(num_pages) if ordered else torch.randperm(num_pages, generator=gen)
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


def build_dense(lay, B, dev, align=128):
    """The dense padded layout of every input set: ``k, v [B, Hk, Nmax, D]``, KV head ``s`` of
    the flat cache in row ``s`` at ``[0, len)``, zeros after; ``Nmax`` = longest head rounded up
    to ``align``. Same data as the flat sets (no random numbers drawn)."""
    lens = lay["lens"]
    S = lens.numel()
    nmax = (int(lens.max()) + align - 1) // align * align
    seg = torch.repeat_interleave(torch.arange(S), lens)
    pos = torch.arange(lay["rows"]) - (torch.cumsum(lens, 0) - lens)[seg]
    seg, pos = seg.to(dev), pos.to(dev)
    dense = []
    for st in lay["sets"]:
        kd = torch.zeros(S, nmax, D, device=dev, dtype=torch.bfloat16)
        vd = torch.zeros_like(kd)
        kd[seg, pos] = st["k"]
        vd[seg, pos] = st["v"]
        dense.append((kd.view(B, Hk, nmax, D), vd.view(B, Hk, nmax, D)))
    return dense, nmax


def flex_setup(lay, B, dev, flex_fn, sync):
    """The flex_attention variant: dense padded K/V, a block mask over the query heads built
    once (timed apart), the compiled (CUDA) or eager (CPU) flex call."""
    from torch.nn.attention.flex_attention import create_block_mask

    G = Hq // Hk
    dense, nmax = build_dense(lay, B, dev)
    lens_d = lay["lens"].view(B, Hk).to(torch.int32).to(dev)

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < lens_d[b, h // G]   # h is a query head: its KV head is h // G

    sync()
    t0 = time.perf_counter()
    bm = create_block_mask(mask_mod, B, Hq, 1, nmax, device=dev)
    sync()
    bm_ms = (time.perf_counter() - t0) * 1e3
    # K/V rows the kernel reads: the KV blocks the mask keeps, per query head; the G query
    # heads of a group keep the same blocks of one KV head, so count them once
    kv_bs = bm.BLOCK_SIZE[1]
    nblk = bm.kv_num_blocks.to(torch.int64)
    if bm.full_kv_num_blocks is not None:
        nblk = nblk + bm.full_kv_num_blocks.to(torch.int64)
    rows_touched = int((nblk[:, :, 0] * kv_bs).clamp(max=nmax).sum()) // G
    sets = lay["sets"]
    scale = 1.0 / math.sqrt(D)

    def flex(i):
        k, v = dense[i]
        return flex_fn(sets[i]["q"], k, v, block_mask=bm, enable_gqa=True, scale=scale)

    extra = dict(nmax=nmax, block_mask_ms=bm_ms, block_mask_method="create_block_mask",
                 kv_block_size=kv_bs, touched_kv_bytes=2 * rows_touched * D * 2,
                 padded_kv_bytes=2 * B * Hk * nmax * D * 2,
                 valid_kv_bytes=2 * lay["rows"] * D * 2)
    return flex, extra, dense


def flashinfer_setup(lay, B, P, dev):
    """FlashInfer's paged decode over the same pool: segment s = one request, 1 KV head, G
    query heads; NHD pages [num_pages, P, 1, D]."""
    import flashinfer

    G, S = Hq // Hk, B * Hk
    table, _ = lay["paged"][P]
    lens = lay["lens"]
    npg = (lens + P - 1) // P
    indptr = torch.zeros(S + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(npg, 0).to(torch.int32)
    keep = torch.arange(table.shape[1])[None, :] < npg[:, None]
    indices = table.cpu()[keep].contiguous()            # row-major: segment order, then page j
    last = (lens - (npg - 1) * P).to(torch.int32)       # 1..P (every segment holds >= W tokens)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    wrapper.plan(indptr.to(dev), indices.to(dev), last.to(dev), G, 1, D, P,
                 pos_encoding_mode="NONE", q_data_type=torch.bfloat16,
                 kv_data_type=torch.bfloat16, sm_scale=1.0 / math.sqrt(D))
    sets = lay["sets"]

    def fi(i):
        st = sets[i]
        kp, vp = st["paged"][P]
        out = wrapper.run(st["q"].view(S, G, D), (kp.view(-1, P, 1, D), vp.view(-1, P, 1, D)))
        return out.view(B, Hq, 1, D)

    return fi, dict(flashinfer=getattr(flashinfer, "__version__", "?"))


def main():
    global Hq, Hk, D, W
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", default="16,32,64,128")
    ap.add_argument("--out", default=None)
    ap.add_argument("--label", default="", help="prefix of every variant name (e.g. the build)")
    ap.add_argument("--cpu", action="store_true",
                    help="smoke test on CPU: a small layer (Hq 8, Hk 2, D 64, W 8), batch 1 "
                         "(C 64) and 4 (C 120), wall-clock medians, no CUDA graphs")
    ap.add_argument("--quick", action="store_true", help="fewer timed calls (smoke test)")
    ap.add_argument("--ordered", action="store_true",
                    help="pages of each segment consecutive in the pool (isolates the cost of "
                         "scattered pages)")
    ap.add_argument("--no-flex", action="store_true", help="skip the flex_attention peer")
    ap.add_argument("--no-flashinfer", action="store_true", help="skip the FlashInfer peer")
    ap.add_argument("--schedules", default="default",
                    help="comma list of decode schedules timed for the library's kernels: "
                         "default (the launcher's choice), split (ADAKV_DECODE_BALANCED=0), "
                         "balanced (ADAKV_DECODE_BALANCED=1), splitN (ADAKV_DECODE_SPLITS=N, "
                         "N in 1, 2, 3, 4, 6, 8, 16)")
    ap.add_argument("--configs", default="1x1024,64x2048",
                    help="comma list of BATCHxC (Ada budget per head, the window added): "
                         "batch 1 is always also replayed in a CUDA graph, others with "
                         "--graph-all")
    ap.add_argument("--sigma", type=float, default=1.0,
                    help="spread of the per-head budgets (lognormal sigma of ada_budgets; 0: "
                         "every head C, as a model with even attention gets)")
    ap.add_argument("--graph-all", action="store_true",
                    help="also replay batch 64 in a CUDA graph (launch gaps removed)")
    ap.add_argument("--tol", type=float, default=2e-2,
                    help="max |diff| vs the contiguous kernel allowed for flex / FlashInfer")
    args = ap.parse_args()
    cpu = args.cpu
    if cpu:
        Hq, Hk, D, W = (CPU_SHAPES[k] for k in ("Hq", "Hk", "D", "W"))
        configs = ((1, 64, False), (4, 120, False))
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --cpu for the CPU smoke test")
        configs = tuple((b, c, b == 1 or args.graph_all) for b, c in
                        (map(int, x.split("x")) for x in args.configs.split(",") if x))
    reps = (20 if cpu else 50) if args.quick else 200
    dev = torch.device("cpu" if cpu else "cuda")

    def sync():
        if not cpu:
            torch.cuda.synchronize()

    schedules = [x for x in args.schedules.split(",") if x]
    bad = [x for x in schedules if x not in SCHEDULE_ENV]
    if bad:
        sys.exit(f"unknown schedule(s) {bad}: choose from {sorted(SCHEDULE_ENV)}")
    # --pages "" measures the contiguous kernel alone (a build without the paged ops, as a peer)
    P_list = [int(x) for x in args.pages.split(",") if x]
    gen = torch.Generator().manual_seed(0)
    copy_gbps, _, _ = copy_bandwidth(cpu)
    sleep_per_ms = None if cpu else calibrate_sleep()
    date = datetime.date.today().isoformat()
    name = device_name(cpu)
    header = (f"# {name}, torch {torch.__version__}, {date}; copy bandwidth {copy_gbps:.0f} GB/s "
              f"(read + write, same run); layer Hq {Hq} Hk {Hk} D {D} bf16, W {W}, "
              f"budget spread sigma {args.sigma}")
    print(header)

    flex_fn, flex_why = None, None
    if args.no_flex:
        flex_why = "--no-flex"
    else:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            if cpu:
                # eager (unfused) flex on CPU: the smoke test checks the layout and the mask,
                # compiling for CPU would take ~25 s per shape for no useful timing
                warnings.filterwarnings("ignore", message="flex_attention called without "
                                        "torch.compile")
                flex_fn = flex_attention
            else:
                flex_fn = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # noqa: BLE001
            flex_why = f"flex_attention unavailable: {type(e).__name__}: {e}"
    if flex_why:
        print(f"# flex_attention skipped: {flex_why}")
    elif cpu:
        print("# flex_attention on CPU runs eagerly (unfused reference path): smoke check of "
              "the layout and the block mask, its timings mean nothing")
    fi_why = None
    if args.no_flashinfer:
        fi_why = "--no-flashinfer"
    elif cpu:
        fi_why = "FlashInfer needs CUDA"
    elif not P_list:
        fi_why = "no page sizes (--pages '')"
    else:
        try:
            import flashinfer  # noqa: F401
        except Exception as e:  # noqa: BLE001
            fi_why = f"import flashinfer failed: {type(e).__name__}: {e}"
    if fi_why:
        print(f"# flashinfer skipped: {fi_why}")

    records, failures = [], []
    for B, C, graph in configs:
        lay = build(B, C, P_list, gen, dev, ordered=args.ordered, sigma=args.sigma)
        sl, ss = lay["seg_len"], lay["seg_start"]
        nbytes = 2 * lay["rows"] * D * 2 + 2 * B * Hq * D * 2 + 2 * sl.numel() * 4
        sets, ns = lay["sets"], lay["nsets"]

        def contiguous(i):
            st = sets[i]
            return adakv_ops.decode_attention(st["q"], st["k"], st["v"], ss, sl)

        ref = contiguous(0).float()
        # (label, P, fn, extra fields or None for the library's own setups, environment)
        variants = []
        for sched in schedules:
            env = SCHEDULE_ENV[sched]
            tag = "" if sched == "default" else f" [{sched}]"
            variants.append((f"contiguous{tag}", None, contiguous, None, env))
            for P in P_list:
                table, _ = lay["paged"][P]

                def paged(i, P=P, table=table):
                    st = sets[i]
                    kp, vp = st["paged"][P]
                    return adakv_ops.paged_decode_attention(st["q"], kp, vp, table, sl)

                variants.append((f"paged P={P}{tag}", P, paged, None, env))
        dense = None
        if flex_fn is not None:
            flex, extra, dense = flex_setup(lay, B, dev, flex_fn, sync)
            extra["flex_compiled"] = not cpu
            variants.append(("flex_attention", None, flex, extra, {}))
        if fi_why is None:
            for P in P_list:
                try:
                    fi, extra = flashinfer_setup(lay, B, P, dev)
                    variants.append((f"flashinfer P={P}", P, fi, extra, {}))
                except Exception as e:  # noqa: BLE001
                    print(f"# flashinfer P={P} skipped at B={B}: {type(e).__name__}: "
                          f"{str(e)[:200]}")
        base = None
        for label, P, fn, extra, env in variants:
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)  # read by the launcher on every call (not inside the timing)
            t0 = time.perf_counter()
            out0 = fn(0)
            sync()
            first_s = time.perf_counter() - t0
            err = float((out0.float() - ref).abs().max())
            del out0
            if cpu:
                ms = median_ms(fn, ns, reps, cpu)
            else:  # a first estimate sizes the sleep that hides the launch latency
                est = median_ms(fn, ns, 10, cpu)
                cycles = int(min(2.0, max(0.05, 2 * est)) * sleep_per_ms)
                ms = median_ms(fn, ns, reps, cpu, sleep_cycles=cycles)
            gms, gnote = None, None
            if graph and not cpu:
                if extra is None:
                    gms = graph_ms(fn, ns)
                else:
                    try:
                        gms = graph_ms(fn, ns)
                    except Exception as e:  # noqa: BLE001
                        gnote = f"CUDA graph failed: {type(e).__name__}: {str(e)[:160]}"
                        torch.cuda.synchronize()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            base = ms if base is None else base
            gbps = nbytes / (ms * 1e-3) / 1e9
            label = args.label + label
            rec = dict(case=f"decode B={B}", variant=label, page_size=P, B=B,
                       tokens_per_head=float(lay["lens"].float().mean()), ms=ms, graph_ms=gms,
                       pct_copy=100 * gbps / copy_gbps, vs_contiguous=ms / base,
                       pct_copy_graph=(100 * nbytes / (gms * 1e-3) / 1e9 / copy_gbps
                                       if gms else None),
                       budget=C, sigma=args.sigma, max_abs_diff=err, copy_gbps=copy_gbps,
                       device=name,
                       torch=torch.__version__, date=date)
            tail = ""
            if extra is not None:
                rec.update(extra)
                rec.update(first_call_s=first_s, counted_bytes=nbytes, tolerance=args.tol,
                           error_ok=err <= args.tol)
                if "touched_kv_bytes" in extra:
                    touched = nbytes - extra["valid_kv_bytes"] + extra["touched_kv_bytes"]
                    rec["pct_copy_touched"] = 100 * touched / (ms * 1e-3) / 1e9 / copy_gbps
                    tail = (f"  [mask {extra['block_mask_ms']:.1f} ms once; reads "
                            f"{extra['touched_kv_bytes'] / extra['valid_kv_bytes']:.3f}x the "
                            f"valid K/V ({rec['pct_copy_touched']:.1f}% of copy BW on those); "
                            f"dense {extra['padded_kv_bytes'] / extra['valid_kv_bytes']:.2f}x]")
                if gnote:
                    rec["note"] = gnote
                    tail += f"  [{gnote}]"
                if not rec["error_ok"]:
                    failures.append(f"B={B} {label}: max|diff| {err:.3e} > tol {args.tol:g}")
                    tail += f"  FAIL: max|diff| above {args.tol:g}"
            records.append(rec)
            g = (f"{gms * 1e3:8.2f} us ({rec['pct_copy_graph']:5.1f}%)" if gms is not None
                 else "       -           ")
            print(f"B={B:3d} {label:22s} eager {ms * 1e3:8.2f} us  graph {g}  "
                  f"{rec['pct_copy']:5.1f}% of copy BW  x{rec['vs_contiguous']:.3f} of contiguous"
                  f"  max|diff| {err:.1e}{tail}")
        del lay, sets, dense, variants
        if not cpu:
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    if failures:
        for msg in failures:
            print(f"FAIL {msg}", file=sys.stderr)
        sys.exit(f"{len(failures)} peer(s) disagree with the contiguous kernel beyond the "
                 f"tolerance (records written)")


if __name__ == "__main__":
    main()
