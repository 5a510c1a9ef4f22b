"""The evaluation loop: one prefill per sample, every method and budget evicted from it.

Per sample (``run_sample``):
  1. Prefill the context with a plain ``DynamicCache`` while a ``QueryRecorder`` keeps the last
     ``W`` queries of every layer; keep a shallow copy of that cache (question-agnostic state).
  2. Run the question (+ answer prefix) on the full cache: the question-aware full state, whose
     last ``W`` queries now include the question.
  3. For each setting (aware / agnostic), method and budget: ``AdaKVCache.evict_from`` the
     matching full state (the same ops as at prefill), measure the eviction loss of every
     evicted layer, then teacher-force the rest of the prompt (agnostic: the question) and the
     gold answer on the compressed cache. A sample is correct when every answer token is the
     greedy (argmax) choice: exactly what greedy ``generate`` would produce as the answer's
     first tokens. ``full`` is the same path with nothing evicted (``method="full"``).

Eviction loss (SPEC section 6, the quantity Ada-KV bounds): per evicted layer, the attention
outputs of the ``W`` window queries over the full cache and over the evicted cache (window
causal in both, ``adakv_ops.decode_attention`` with ``T = W``), ``L1 = sum over query heads and
dims of |o_full - o_evicted|``, averaged over the window queries; ``rel`` divides by the same sum
of ``|o_full|``. Budgets: ``C = round(frac * N)`` kept prefix tokens per KV head on average
(``N`` = tokens of the compressed prompt), plus the ``W`` window tokens every method keeps.

Agreement on natural text (``run_text``): prefill ``prefix`` tokens, evict, teacher-force the
next ``cont`` tokens; KL(full || evicted) of the next-token distributions and top-1 agreement,
averaged over positions.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..hf import AdaKVCache, QueryRecorder, cache_kwarg
from .tasks import Sample

__all__ = ["PromptBuilder", "run_sample", "run_text", "METHODS_ALL", "METHODS_AS_WRITTEN",
           "SETTINGS"]

METHODS_ALL = ("full", "streaming", "snapkv", "ada_snapkv", "pyramid", "ada_pyramid", "criticalkv",
               "ada_criticalkv", "defensivekv", "layer_defensivekv")
#: the follow-up methods as the authors' code runs them (``AdaKVCache(as_written=True)``), for
#: comparison; not in the default run
METHODS_AS_WRITTEN = ("criticalkv:as_written", "ada_criticalkv:as_written",
                      "defensivekv:as_written", "layer_defensivekv:as_written")
SETTINGS = ("aware", "agnostic")


@dataclass
class Prompt:
    context: list[int]      # template head + instruction + context
    question: list[int]     # question + template tail + answer prefix
    answer: list[int]


class PromptBuilder:
    """Token ids of a sample, split where the context ends. Chat models get their chat
    template (user turn = instruction, context, question; the answer prefix opens the
    assistant turn); base models get plain text after BOS."""

    def __init__(self, tok, chat: bool):
        self.tok, self.chat = tok, chat

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=special))

    def build(self, s: Sample) -> Prompt:
        if self.chat:
            user = f"{s.instruction}\n\n{s.context}\n\n{s.question}"
            full = self.tok.apply_chat_template([{"role": "user", "content": user}],
                                                tokenize=False, add_generation_prompt=True)
            full = full + s.answer_prefix
            cut = full.index(s.context) + len(s.context)
            head, tail = full[:cut], full[cut:]
            ctx = self._encode(head)
        else:
            head = f"{s.instruction}\n\n{s.context}"
            tail = f"\n\n{s.question}\n{s.answer_prefix}"
            ctx = self._encode(head, special=True)
        q = self._encode(tail)
        qa = self._encode(tail + s.answer)
        ans = qa[len(q):] if qa[:len(q)] == q else self._encode(s.answer)
        return Prompt(ctx, q, ans)


def _shallow_copy(cache):
    c = copy.copy(cache)
    c.layers = [copy.copy(layer) for layer in cache.layers]
    return c


def _ids(x: list[int], device) -> torch.Tensor:
    return torch.tensor([x], dtype=torch.long, device=device)


def _window_outputs(cache: AdaKVCache, windows: dict) -> list[torch.Tensor]:
    """Attention outputs ``[B, Hq, W, D]`` of the window queries over each evicted layer."""
    outs = []
    for layer in cache.adakv_layers:
        q = windows[layer.layer_idx][:, :, -layer.window:].contiguous()
        outs.append(layer.attend(q, scale=layer._scale).float())
    return outs


def _eviction_loss(ref: list[torch.Tensor], got: list[torch.Tensor]):
    l1, rel = [], []
    for o_f, o_e in zip(ref, got):
        d = (o_e - o_f).abs().sum(dim=(1, 3))                     # [B, W]
        l1.append(d.mean().item())
        rel.append((d.sum() / o_f.abs().sum().clamp_min(1e-30)).item())
    return l1, rel


def _kept_fraction(cache: AdaKVCache, n: int) -> float:
    fr = []
    for layer in cache.adakv_layers:
        lens = layer.segment_lengths()
        fr.append(sum(lens) / (len(lens) * n))
    return sum(fr) / max(len(fr), 1)


def _teacher_force(model, cache, feed: list[int], device):
    out = model(input_ids=_ids(feed, device), **cache_kwarg(cache), use_cache=True)
    return out.logits[0].float()                                   # [T, V]


def _budget(frac: float, n: int) -> int:
    return max(1, int(round(frac * n)))


def _make_cache(model, method: str, C: int, window: int, reserve: int, alpha: float):
    name, _, form = method.partition(":")
    return AdaKVCache(model, method=name, budget=C, window=window, alpha=alpha,
                      reserve=reserve, as_written=form == "as_written")


@torch.no_grad()
def run_sample(model, prompt: Prompt, methods, fracs, window: int = 32, alpha: float = 0.2,
               settings=SETTINGS) -> list[dict]:
    """Records (one per setting x method x budget) of one sample; see the module doc."""
    device = next(model.parameters()).device
    ctx, q, ans = prompt.context, prompt.question, prompt.answer
    reserve = len(q) + len(ans) + 8
    full = DynamicCache(config=model.config)
    rec = QueryRecorder(model, window)
    with rec:
        model(input_ids=_ids(ctx, device), **cache_kwarg(full), use_cache=True,
              logits_to_keep=1)
        ctx_cache, ctx_windows = _shallow_copy(full), dict(rec.windows)
        out = model(input_ids=_ids(q, device), **cache_kwarg(full), use_cache=True,
                    logits_to_keep=1)
        aware_windows = dict(rec.windows)
    first_logits = out.logits[0, -1].float()                       # predicts ans[0]

    state = {
        "aware": (full, aware_windows, len(ctx) + len(q), ans[:-1]),
        "agnostic": (ctx_cache, ctx_windows, len(ctx), q + ans[:-1]),
    }
    records = []
    for setting in settings:
        src, windows, n, feed = state[setting]
        ref_cache = _make_cache(model, "full", n, window, reserve, alpha)
        ref_cache.evict_from(src, windows)
        ref_out = _window_outputs(ref_cache, windows)
        del ref_cache
        for method in methods:
            for frac in ([1.0] if method == "full" else fracs):
                C = n if method == "full" else _budget(frac, n)
                cache = _make_cache(model, method, C, window, reserve, alpha)
                cache.evict_from(src, windows)
                l1, rel = _eviction_loss(ref_out, _window_outputs(cache, windows))
                kept = _kept_fraction(cache, n)
                logits = _teacher_force(model, cache, feed, device)
                if setting == "aware":
                    logits = torch.cat([first_logits[None], logits], 0)
                logits = logits[-len(ans):]
                target = torch.tensor(ans, device=logits.device)
                hits = logits.argmax(-1) == target
                nll = F.cross_entropy(logits, target).item()
                records.append({
                    "setting": setting, "method": method, "budget_frac": frac, "C": C,
                    "n_tokens": n, "correct": bool(hits.all().item()),
                    "first_token_correct": bool(hits[0].item()), "answer_nll": nll,
                    "kept_fraction": kept, "evict_l1": l1,
                    "evict_rel_mean": sum(rel) / max(len(rel), 1),
                })
                del cache
    return records


@torch.no_grad()
def run_text(model, ids: list[int], methods, fracs, prefix: int, cont: int,
             window: int = 32, alpha: float = 0.2) -> list[dict]:
    """KL / top-1 agreement / NLL records of one text segment ``ids`` (``prefix + cont``)."""
    device = next(model.parameters()).device
    ctx, rest = ids[:prefix], ids[prefix:prefix + cont]
    full = DynamicCache(config=model.config)
    rec = QueryRecorder(model, window)
    with rec:
        model(input_ids=_ids(ctx, device), **cache_kwarg(full), use_cache=True,
              logits_to_keep=1)
    windows = dict(rec.windows)
    target = torch.tensor(rest[1:], device=device)
    ref = _make_cache(model, "full", prefix, window, cont + 8, alpha)
    ref.evict_from(full, windows)
    ref_logits = _teacher_force(model, ref, rest, device)[:-1]
    ref_logp = ref_logits.log_softmax(-1)
    del ref
    records = []
    for method in methods:
        for frac in ([1.0] if method == "full" else fracs):
            C = prefix if method == "full" else _budget(frac, prefix)
            cache = _make_cache(model, method, C, window, cont + 8, alpha)
            cache.evict_from(full, windows)
            logp = _teacher_force(model, cache, rest, device)[:-1].log_softmax(-1)
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
            agree = (logp.argmax(-1) == ref_logp.argmax(-1)).float().mean().item()
            nll = F.nll_loss(logp, target).item()
            records.append({"method": method, "budget_frac": frac, "C": C, "kl": kl,
                            "top1_agreement": agree, "nll": nll,
                            "ppl": math.exp(min(nll, 50.0))})
            del cache
    return records
