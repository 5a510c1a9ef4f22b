"""How unevenly a real model's Ada-KV eviction spreads a layer's budget over its heads: the
input the paged decode kernel's split count depends on (even heads want one split per head,
Ada-like spreads several: benchmarks/results/paged-h100.md), measured instead of assumed.

The serving benchmarks run a random Llama-8B-shaped model whose heads come out nearly even;
``bench_paged.py`` models "Ada-like" heads as lognormal shares (``ada_budgets``, sigma 1). This
script prefills real prompts through the offline Qwen2.5-Coder-0.5B (``adakv_ops.eval``'s model,
CPU, float32) into an ``AdaKVCache`` (``ada_snapkv``, window 32) and reports, per budget:

* ``cv``: the coefficient of variation of the rows the segments hold, each divided by the mean
  of its (prompt, layer) (Ada-KV keeps that mean fixed: SPEC section 2 step 3), pooled over
  prompts and layers;
* ``p90 / mean``, ``max / mean`` of the same ratios;
* the same statistics of ``ada_budgets`` at the model's KV-head count and at Llama-8B's 8, for
  sigma 0.5 and 1 (the synthetic spreads the kernel benchmarks use).

Prompts: the evaluation's five retrieval tasks (synthetic haystacks, ``eval/tasks.py``) and
Python source (a model of code reading code), ``--length`` tokens each.

    python benchmarks/head_spread.py --length 2048 --out benchmarks/results/head-spread-qwen-cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import ada_budgets, spread_stats  # noqa: E402

from adakv_ops.eval.models import load_model  # noqa: E402
from adakv_ops.eval.tasks import TASKS, make_samples  # noqa: E402
from adakv_ops.hf import AdaKVCache  # noqa: E402
from adakv_ops.hf.registration import cache_kwarg  # noqa: E402


def group_ratios(groups: list[list[int]]) -> list[float]:
    """Each value divided by the mean of its group (Ada-KV keeps a (prompt, layer)'s mean
    fixed); a group of mean 0 adds nothing."""
    out = []
    for g in groups:
        m = sum(g) / len(g)
        out.extend(x / m for x in g if m > 0)
    return out


def prompts(tok, length: int, per_task: int) -> list[tuple[str, list[int]]]:
    out = []
    for task in TASKS:
        for s in make_samples(task, length, per_task, tok, seed=7):
            text = s.instruction + s.context + s.question
            out.append((task, tok.encode(text)[:length]))
    import torch.nn.modules.module as nn_module
    import torch.optim.optimizer as optimizer
    for mod in (nn_module, optimizer):  # Python source the model knows
        ids = tok.encode(inspect.getsource(mod))
        if len(ids) >= length:
            out.append((f"code:{mod.__name__}", ids[:length]))
    return out


@torch.no_grad()
def model_groups(model, ids: list[int], budget: int, window: int) -> list[list[int]]:
    """The kept budget rows (window excluded) of each (layer, KV head), grouped by layer."""
    cache = AdaKVCache(model, method="ada_snapkv", budget=budget, window=window)
    model(input_ids=torch.tensor([ids]), **cache_kwarg(cache, model), use_cache=True,
          logits_to_keep=1)
    return [[n - window for n in layer.segment_lengths()] for layer in cache.adakv_layers]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--per-task", type=int, default=2)
    ap.add_argument("--fracs", default="0.1,0.2")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, info = load_model(args.model)
    cfg = model.config
    Hk = cfg.num_key_value_heads
    ps = prompts(tok, args.length, args.per_task)
    rec = {"model": info["name"], "kv_heads": Hk, "layers": cfg.num_hidden_layers,
           "length": args.length, "window": args.window, "prompts": [p[0] for p in ps],
           "torch": torch.__version__, "date": datetime.date.today().isoformat(),
           "by_budget": {}}
    print(f"{info['name']}: {cfg.num_hidden_layers} layers x {Hk} KV heads, "
          f"{len(ps)} prompts of {args.length} tokens")
    for frac in (float(x) for x in args.fracs.split(",")):
        C = max(1, round(frac * args.length))
        groups = []
        for _, ids in ps:
            groups += model_groups(model, ids, C, args.window)
        real = spread_stats(group_ratios(groups))
        g = torch.Generator().manual_seed(0)
        synth = {f"ada_budgets Hk={h} sigma={s}": spread_stats(group_ratios(
                     ada_budgets(2000, h, C, g, sigma=s).tolist()))
                 for h in sorted({Hk, 8}) for s in (0.5, 1.0)}
        rec["by_budget"][str(frac)] = {"budget": C, "model": real, **synth}
        print(f"\nbudget {frac:.0%} (C = {C}): rows / mean of their (prompt, layer)")
        print(f"  {'source':32s} {'segments':>8s} {'cv':>6s} {'p90':>6s} {'max':>6s} {'min':>6s}")
        for name, st in [(f"{info['name']} (real prompts)", real), *synth.items()]:
            print(f"  {name:32s} {st['segments']:8d} {st['cv']:6.2f} {st['p90']:6.2f} "
                  f"{st['max']:6.2f} {st['min']:6.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
