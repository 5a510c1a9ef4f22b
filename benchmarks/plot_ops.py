"""Plot the op benchmarks of `bench_ops.py` (one PNG per results file).

Usage: python benchmarks/plot_ops.py benchmarks/results/ops-h100.jsonl [more.jsonl ...]
Writes `<results>.png` beside each file (or `--out` for a single input). Three panels:
  evict time versus N (adakv_ops, its stages stacked, the targets; the PyTorch reference time
  and the speedup written above each bar);
  batch-1 decode (eager, CUDA graph) versus padded SDPA and FlexAttention, with the 8 us target;
  batch-64 decode as a share of the copy bandwidth measured in the same run, beside the peers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

EVICT_TARGET_MS = {8192: 0.05, 32768: 0.10, 131072: 0.30}
STAGES = ("score", "allocate", "select", "compact")


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pick(records: list[dict], op: str, ref=None, **shape) -> dict | None:
    for r in records:
        if r["op"] != op or (ref is not None and r.get("ref") != ref):
            continue
        if all(r["shape"].get(k) == v for k, v in shape.items()):
            return r
    return None


def bar_panel(ax, bars, value_fmt: str, target: float, target_label: str, ylabel: str) -> None:
    """Bars (label, value, colour) with their values written on top and a target line."""
    ax.bar(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars])
    for i, (_, v, _) in enumerate(bars):
        ax.text(i, v, value_fmt.format(v), ha="center", va="bottom", fontsize=8)
    ax.axhline(target, color="g", ls="--", lw=1, label=target_label)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=20, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def plot(records: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = records[0]["device"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    # 1. evict versus N: stacked stages, the fused call, the reference, the target.
    ax = axes[0]
    ns = sorted({r["shape"]["N"] for r in records if r["op"] == "evict"})
    xs = range(len(ns))
    bottom = [0.0] * len(ns)
    for stage in STAGES:
        ms = [(pick(records, f"evict.{stage}", N=n) or {"ms": 0.0})["ms"] for n in ns]
        ax.bar(xs, ms, 0.5, bottom=bottom, label=f"{stage} (alone)")
        bottom = [b + m for b, m in zip(bottom, ms)]
    fused = [pick(records, "evict", ref="reference_evict", N=n) for n in ns]
    ax.plot(xs, [r["ms"] for r in fused], "ko", label="evict (one call)")
    ax.plot(xs, [EVICT_TARGET_MS.get(n, float("nan")) for n in ns], "g_", ms=30, mew=2,
            label="target")
    top = max(max(bottom), max(r["ms"] for r in fused))
    for x, r in zip(xs, fused):  # the reference is 5-10x taller: written, not drawn
        ax.text(x, max(r["ms"], bottom[x]) + 0.02 * top,
                f"{r['ms']:.3f} ms\nref {r['ref_ms']:.2f} ms\n{r['ref_ms'] / r['ms']:.1f}x",
                ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, top * 1.45)
    ax.set_xticks(list(xs), [f"N={n // 1024}K" for n in ns])
    ax.set_ylabel("ms")
    ax.set_title("evict, one layer (Hk 8, C 1024; ref = PyTorch)")
    ax.legend(fontsize=7, loc="upper left")

    # 2. batch-1 decode in microseconds.
    ax = axes[1]
    bars = []
    sdpa = pick(records, "decode_attention", ref="padded_sdpa", B=1)
    if sdpa:
        bars.append(("adakv eager", sdpa["ms"] * 1e3, "C0"))
    graph = pick(records, "graph[decode_attention]")
    if graph:
        bars.append(("adakv graph", graph["ms"] * 1e3, "C0"))
    for ref in ("flex_attention[seq]", "flex_attention[heads]", "padded_sdpa"):
        r = pick(records, "decode_attention", ref=ref, B=1)
        if r:
            bars.append((ref.replace("_attention", ""), r["ref_ms"] * 1e3, "C3"))
    bar_panel(ax, bars, "{:.1f}", 8.0, "target 8 us", "us per layer")
    ax.set_title("decode, batch 1, ~1K tokens/head")

    # 3. batch-64 decode: share of the copy bandwidth (bytes = kept K + V read once).
    ax = axes[2]
    bars = []
    ours = pick(records, "decode_attention", ref="padded_sdpa", B=64)
    if ours:
        copy = ours["copy_gbps"]
        bars.append(("adakv", 100.0 * ours["gbps"] / copy, "C0"))
        for ref in ("flex_attention[heads]", "padded_sdpa"):
            r = pick(records, "decode_attention", ref=ref, B=64)
            if r:  # same bytes, the peer's time
                bars.append((ref.replace("_attention", ""), 100.0 * r["gbps"] * r["ms"]
                             / r["ref_ms"] / copy, "C3"))
        ax.set_title(f"decode, batch 64, 2K tokens/head (copy {copy / 1e3:.2f} TB/s)")
    bar_panel(ax, bars, "{:.1f}%", 85.0, "target 85%", "% of copy bandwidth")
    ax.set_ylim(0, 110)

    fig.suptitle(f"adakv_ops vs PyTorch paths: {device}, torch {records[0]['torch']}, "
                 f"{records[0]['date']} (Llama-3.1-8B layer, bf16)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="ops-<device>.jsonl files")
    p.add_argument("--out", type=Path, default=None, help="PNG path (one input only)")
    args = p.parse_args(argv)
    if args.out is not None and len(args.results) != 1:
        p.error("--out takes one results file")
    for path in args.results:
        out = args.out or path.with_suffix(".png")
        print("wrote", plot(load(path), out))


if __name__ == "__main__":
    main()
