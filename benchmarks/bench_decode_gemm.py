#!/usr/bin/env python
"""The weights' side of a decode step (issue 13's roofline gap): the GEMMs of the
Llama-3.1-8B-shaped model at the decode batch sizes, alone and inside a compiled decoder layer
without attention, against the weights' roofline (their bytes at the copy bandwidth measured in
the same run).

Usage (one GPU, ~1 minute):  python benchmarks/bench_decode_gemm.py --out gemm.jsonl
CPU smoke test:              python benchmarks/bench_decode_gemm.py --cpu

``bench_serve.py`` splits a decode step into its attention (at 91-102% of the copy bandwidth on
an H100) and the rest, which runs at 62-75% of the weights' roofline: this script says how
much of that rest the GEMMs alone cost. The engine's projections as it runs them
(``Engine(fuse_projections=True)``): per layer ``x [M, 4096]`` times ``qkv [6144, 4096]``,
``o [4096, 4096]``, ``gate_up [28672, 4096]``, ``down [4096, 14336]`` (``F.linear``, bf16,
cuBLAS through torch), 32 layers with weights of their own (14 GiB: no L2 reuse), then the
LM head ``[128256, 4096]``. Rows, per ``M`` of ``--batches``:

* ``<shape> x32``: that GEMM of the 32 layers, replayed in one CUDA graph;
* ``gemms``: the 129 GEMMs of a step in order, in one CUDA graph (their sum with the gaps
  between them);
* ``layers``: the step without attention: per layer RMSNorm, qkv, o (its input a slice of
  the qkv output: no attention), residual add, RMSNorm, gate_up, SiLU x mul, down, residual
  add, compiled by ``torch.compile`` (Inductor fuses the elementwise work into Triton
  kernels) and replayed in one CUDA graph, then the final norm and the LM head; what the
  rest of the engine's step adds to it is RoPE, the append and the attention's launch.

Each row: median ms of the graph (CUDA events, ``--reps`` replays after warm-up), the weights
it reads, and ``pct_roofline`` = bytes / copy bandwidth / time.

``--gemm``: ``torch`` (``F.linear``: cuBLAS / cuBLASLt as torch's preferred BLAS library says),
``adakv`` (``adakv_ops.gemm.linear``: the Hopper kernel of ``csrc/cuda/decode_gemm.cu``, rows
named ``adakv <row>``) or ``both`` (the default on an sm_90 GPU with the kernels loaded: every
row twice, the same weights and inputs, one run). ``--splits 1,2,4,8`` adds, per GEMM shape, the
kernel with each forced split-K factor (rows ``adakv <shape> x32 split=S``) and ``head`` rows
(the LM head alone) to every variant.
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
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_capacity import copy_bandwidth  # noqa: E402
from bench_ops import graph_replay_ms  # noqa: E402

SHAPES_8B = dict(hidden=4096, ffn=14336, heads=32, kv_heads=8, head_dim=128, layers=32,
                 vocab=128256)
SHAPES_CPU = dict(hidden=256, ffn=512, heads=8, kv_heads=2, head_dim=32, layers=2, vocab=1024)


def build_weights(sh, dev, dtype):
    h, f, D = sh["hidden"], sh["ffn"], sh["head_dim"]
    qkv_out = (sh["heads"] + 2 * sh["kv_heads"]) * D
    layers = []
    for _ in range(sh["layers"]):
        layers.append(dict(
            qkv=torch.randn(qkv_out, h, device=dev, dtype=dtype) * 0.02,
            o=torch.randn(h, sh["heads"] * D, device=dev, dtype=dtype) * 0.02,
            gate_up=torch.randn(2 * f, h, device=dev, dtype=dtype) * 0.02,
            down=torch.randn(h, f, device=dev, dtype=dtype) * 0.02,
            n1=torch.ones(h, device=dev, dtype=dtype), n2=torch.ones(h, device=dev, dtype=dtype)))
    head = torch.randn(sh["vocab"], h, device=dev, dtype=dtype) * 0.02
    norm = torch.ones(h, device=dev, dtype=dtype)
    return layers, head, norm


def rms_norm(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def layer_no_attention(x, L, q_width, ffn, linear=F.linear):
    """One decoder layer of the engine's decode step with the attention left out (its output
    replaced by the query slice of the qkv projection, so the o projection keeps its input
    shape and its data dependence)."""
    h = rms_norm(x, L["n1"])
    qkv = linear(h, L["qkv"])
    x = x + linear(qkv[:, :q_width].contiguous(), L["o"])
    h = rms_norm(x, L["n2"])
    gu = linear(h, L["gate_up"])
    return x + linear(F.silu(gu[:, :ffn]) * gu[:, ffn:], L["down"])


def time_ms(fn, cpu, reps):
    """Median ms of ``fn``: on CUDA one CUDA graph of it replayed ``reps`` times (CUDA
    events), on the CPU wall clock."""
    if cpu:
        fn()
        times = []
        for _ in range(max(3, reps // 10)):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    return graph_replay_ms(fn, reps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="smoke test: a tiny shape on the CPU")
    ap.add_argument("--batches", default=None, help="decode batch sizes M (default 64,128,256)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled layers row")
    ap.add_argument("--gemm", choices=("torch", "adakv", "both"), default=None,
                    help="which GEMM (default: both where the adakv kernel runs, else torch)")
    ap.add_argument("--splits", default=None,
                    help="also the adakv kernel with each forced split-K factor, e.g. 1,2,4,8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cpu = args.cpu or not torch.cuda.is_available()
    dev = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    sh = SHAPES_CPU if cpu else SHAPES_8B
    batches = [int(x) for x in (args.batches or ("4,8" if cpu else "64,128,256")).split(",")]
    bw = copy_bandwidth(dev)
    layers, head, norm = build_weights(sh, dev, dtype)
    el = torch.empty((), dtype=dtype).element_size()
    names = ("qkv", "o", "gate_up", "down")
    layer_bytes = {n: layers[0][n].numel() * el for n in names}
    step_bytes = sh["layers"] * sum(layer_bytes.values()) + head.numel() * el
    q_width, ffn = sh["heads"] * sh["head_dim"], sh["ffn"]
    header = {"kind": "header", "device": "cpu" if cpu else torch.cuda.get_device_name(),
              "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "copy_bw_gbs": bw / 1e9, "shapes": sh, "step_weight_bytes": step_bytes}
    print(json.dumps(header), flush=True)
    recs = []

    def record(M, row, ms, nbytes):
        pct = None if cpu else 100 * nbytes / bw / (ms * 1e-3)
        r = {"kind": "gemm", "M": M, "row": row, "ms": ms, "weight_bytes": nbytes,
             "pct_roofline": pct}
        recs.append(r)
        print(json.dumps(r), flush=True)

    from adakv_ops import gemm as adakv_gemm
    have_kernel = adakv_gemm.available(dev, dtype)
    which = args.gemm or ("both" if have_kernel else "torch")
    if which != "torch" and not have_kernel:
        raise SystemExit("the adakv decode GEMM needs an sm_90 GPU and the CUDA kernels")
    variants = [(p, f) for p, f in (("", F.linear), ("adakv ", adakv_gemm.linear))
                if which == "both" or (which == "adakv") == (p == "adakv ")]
    splits = [int(v) for v in args.splits.split(",")] if args.splits else []

    for M in batches:
        x = torch.randn(M, sh["hidden"], device=dev, dtype=dtype)
        xf = torch.randn(M, sh["ffn"], device=dev, dtype=dtype)

        def shape_rows(lin, prefix, suffix=""):
            """One row per GEMM shape: that GEMM of every layer through ``lin``."""
            for n in names:
                inp = xf if n == "down" else x
                record(M, f"{prefix}{n} x{sh['layers']}{suffix}",
                       time_ms(lambda n=n, inp=inp: [lin(inp, L[n]) for L in layers],
                               cpu, args.reps),
                       sh["layers"] * layer_bytes[n])

        for prefix, lin in variants:
            shape_rows(lin, prefix)
            if splits:
                record(M, f"{prefix}head", time_ms(lambda lin=lin: lin(x, head), cpu, args.reps),
                       head.numel() * el)

            def gemms(lin=lin):
                for L in layers:
                    lin(x, L["qkv"])
                    lin(x, L["o"])
                    lin(x, L["gate_up"])
                    lin(xf, L["down"])
                return lin(x, head)
            record(M, f"{prefix}gemms", time_ms(gemms, cpu, args.reps), step_bytes)
            if not args.no_compile:
                body = torch.compile(layer_no_attention, dynamic=False)

                def step(lin=lin, body=body):
                    h = x
                    for L in layers:
                        h = body(h, L, q_width, ffn, lin)
                    return lin(rms_norm(h, norm), head)
                record(M, f"{prefix}layers", time_ms(step, cpu, args.reps), step_bytes)
        for S in (splits if have_kernel else []):
            shape_rows(lambda a, w, S=S: torch.ops.adakv.decode_gemm(a, w, None, S), "adakv ",
                       f" split={S}")
        del x, xf
    if args.out:
        with open(args.out, "w") as fh:
            for r in [header] + recs:
                fh.write(json.dumps(r) + "\n")
    print(f"\n{header['device']}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"{'M':>5} {'row':>26} {'ms':>8} {'%roof':>7}")
    for r in recs:
        pct = f"{r['pct_roofline']:7.1f}" if r["pct_roofline"] is not None else "      -"
        print(f"{r['M']:>5} {r['row']:>26} {r['ms']:8.3f} {pct}")
    return recs


if __name__ == "__main__":
    main()
