"""paged_append_rotary_ against the work it replaces in a decode step (``Engine(rotary_append=
True)``), one Llama-3.1-8B layer shape (Hq 32, Hk 8, D 128, bf16, page size 64), per layer:

* ``unfused``: what the compiled step runs without it: ``torch.compile`` (``dynamic=False``)
  of transformers' ``apply_rotary_pos_emb`` on views of one fused QKV product, the rotated
  query made contiguous (the decode kernel's input), the rotated key and the value made
  contiguous, then ``paged_append_`` (Inductor's kernels + the append);
* ``fused``: ``paged_append_rotary_`` on the same views (one kernel).

Each variant is captured in one CUDA graph of ``--layers`` layers (each layer its own QKV
product and its own table rows of one pool) and replayed; the time per layer is the CUDA-event
median of the replays over the layer count. Every replay appends one token to every segment:
the tables hold room for all of them, so no append overflows and nothing is reset inside the
timed graph. Segment lengths are Ada-like around ``C`` (only the pages the appends write are
real: earlier table entries name one shared page that nothing writes). Before timing, the two
variants' outputs (rotated query, appended K/V rows, lengths) are compared on one layer.

    python benchmarks/bench_rotary_append.py --out benchmarks/results/rotary-append-h100.jsonl
    python benchmarks/bench_rotary_append.py --cpu --out /tmp/rotary-cpu.jsonl   # smoke test
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import ada_budgets, device_name, graph_replay_ms  # noqa: E402

import adakv_ops  # noqa: E402

SHAPE = dict(Hq=32, Hk=8, D=128, P=64)
CPU_SHAPE = dict(Hq=8, Hk=2, D=64, P=16)   # --cpu: a small layer (smoke test)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rotary(q, k, cos, sin):
    """transformers' ``apply_rotary_pos_emb`` (``unsqueeze_dim=1``), written out so that the
    benchmark does not depend on a model module."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def build_layer(B, C, shape, room, gen, dev, dtype):
    """One layer's inputs: the fused QKV product [B, 1, (Hq + 2 Hk) D] and the views the
    model takes of it, a pool whose table gives each segment its current page and ``room``
    more rows, Ada-like lengths (``C`` per head on average, plus a 32-row window)."""
    Hq, Hk, D, P = shape["Hq"], shape["Hk"], shape["D"], shape["P"]
    S = B * Hk
    lens = (ada_budgets(B, Hk, C, gen).reshape(-1) + 32).to(torch.int64)
    first = lens // P                               # the page of the next row
    last = (lens + room - 1) // P                   # the page of the last appended row
    width = int(last.max()) + 1
    npages = (last - first + 1)
    num_pages = 1 + int(npages.sum())               # page 0: the shared stand-in
    table = torch.zeros(S, width, dtype=torch.int32)
    at = 1
    for s in range(S):
        n = int(npages[s])
        table[s, int(first[s]):int(first[s]) + n] = torch.arange(at, at + n, dtype=torch.int32)
        at += n
    qkv = torch.randn(B, 1, (Hq + 2 * Hk) * D, generator=gen).to(dev, dtype)
    q = qkv[..., : Hq * D].view(B, 1, Hq, D).transpose(1, 2)
    k = qkv[..., Hq * D:(Hq + Hk) * D].view(B, 1, Hk, D).transpose(1, 2)
    v = qkv[..., (Hq + Hk) * D:].view(B, 1, Hk, D).transpose(1, 2)
    return dict(q=q, k=k, v=v, table=table.to(dev), lens0=lens.to(torch.int32).to(dev),
                seg_len=lens.to(torch.int32).to(dev),
                k_pages=torch.zeros(num_pages, P, D, device=dev, dtype=dtype),
                v_pages=torch.zeros(num_pages, P, D, device=dev, dtype=dtype))


def unfused_step(L, cos, sin):
    q, k = apply_rotary(L["q"], L["k"], cos, sin)
    adakv_ops.paged_append_(L["k_pages"], L["v_pages"], L["table"], L["seg_len"], k.contiguous(),
                            L["v"].contiguous())
    return q.contiguous()


def fused_step(L, cos, sin):
    return adakv_ops.paged_append_rotary_(L["k_pages"], L["v_pages"], L["table"], L["seg_len"],
                                          L["q"], L["k"], L["v"], cos, sin)


def check_equal(L, cos, sin, unfused, dtype):
    """Both variants on copies of one layer: the same rotated query, appended rows and
    lengths (up to one rounding of the rotation; float32 exactly)."""
    outs = []
    for fn in (unfused, fused_step):
        M = dict(L, k_pages=L["k_pages"].clone(), v_pages=L["v_pages"].clone(),
                 seg_len=L["lens0"].clone())
        q = fn(M, cos, sin)
        outs.append((q.float(), M["k_pages"].float(), M["v_pages"].float(), M["seg_len"]))
    # one rounding step of the largest value (bf16: 2^-8 relative); float32 near-exact
    rel = 1e-6 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(("query", "k_pages", "v_pages", "seg_len"), outs[0], outs[1]):
        a, b = a.float(), b.float()
        err = float((a - b).abs().max()) if a.numel() else 0.0
        scale = float(b.abs().max()) if b.numel() else 0.0
        if err > rel * max(1.0, scale):
            raise SystemExit(f"fused and unfused differ in {name}: max |diff| {err} "
                             f"(largest value {scale})")


def wall_ms(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,64,128", help="(--cpu: 1 and 4)")
    ap.add_argument("--budget", type=int, default=1024, help="C: the heads' average kept rows")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=30, help="timed replays per variant")
    ap.add_argument("--cpu", action="store_true",
                    help="smoke test: a small layer on the CPU, eager, wall-clock medians")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cpu = args.cpu
    if not cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu for the smoke test")
    dev = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    shape = CPU_SHAPE if cpu else SHAPE
    layers = 2 if cpu else args.layers
    reps = min(args.reps, 5) if cpu else args.reps
    room = 4 * (reps + 8)            # rows appended per segment: warm-up, capture, replays
    gen = torch.Generator().manual_seed(0)
    unfused = unfused_step if cpu else torch.compile(unfused_step, dynamic=False)
    header = {"kind": "header", "device": device_name(cpu), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), **shape, "dtype": str(dtype),
              "layers": layers, "budget": args.budget, "reps": reps}
    print(json.dumps(header), flush=True)
    records = []
    batches = [1, 4] if cpu else [int(x) for x in args.batches.split(",") if x]
    for B in batches:
        D = shape["D"]
        Ls = [build_layer(B, args.budget if not cpu else 40, shape, room, gen, dev, dtype)
              for _ in range(layers)]
        th = torch.rand(B, 1, D // 2, generator=gen) * 6.28
        th = torch.cat([th, th], dim=-1)
        cos, sin = th.cos().to(dev, dtype), th.sin().to(dev, dtype)
        check_equal(Ls[0], cos, sin, unfused, dtype)
        res = {}
        for name, fn in (("unfused", unfused), ("fused", fused_step)):
            run = lambda fn=fn: [fn(L, cos, sin) for L in Ls]   # noqa: E731
            ms = wall_ms(run, reps) if cpu else graph_replay_ms(run, reps)
            res[name] = ms / layers
        rec = {"kind": "rotary_append", "batch": B, "us_per_layer": {
            k: round(v * 1e3, 3) for k, v in res.items()},
            "saved_us_per_layer": round((res["unfused"] - res["fused"]) * 1e3, 3),
            "saved_ms_per_step_32_layers": round((res["unfused"] - res["fused"]) * 32, 4)}
        records.append(rec)
        print(json.dumps(rec), flush=True)
        del Ls
    print(f"{'batch':>5} {'unfused us':>11} {'fused us':>9} {'saved us':>9}  (per layer; "
          f"{'CPU wall' if cpu else 'CUDA graph'})")
    for r in records:
        u = r["us_per_layer"]
        print(f"{r['batch']:>5} {u['unfused']:>11.2f} {u['fused']:>9.2f} "
              f"{r['saved_us_per_layer']:>9.2f}")
    if args.out:
        with open(args.out, "w") as f:
            for r in [header] + records:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
