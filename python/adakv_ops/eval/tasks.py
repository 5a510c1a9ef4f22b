"""Retrieval tasks in the style of RULER (arXiv 2404.06654), generated locally and seeded.

Every sample is ``instruction + context + question -> answer``: the context is a haystack of
generated sentences (or a JSON object, for key-value retrieval) with the facts ("needles")
placed at chosen depths. The question comes after the context, so the same sample serves the
question-aware setting (the question is inside the scored prompt) and the question-agnostic
one (the context is compressed first, the question asked afterwards).

Tasks (RULER's names in brackets):
  passkey    one 5-digit pass key in the haystack [niah_single_1]
  multikey   4 "special magic numbers" under different keys, one asked [niah_multikey_1]
  multivalue 4 numbers under the same key, all asked, in the order they appear [niah_multivalue]
  kv         key-value retrieval from a JSON object of random 12-hex-digit ids [niah_multikey_3]
  vartrack   a chain of 5 variable assignments (VAR A = 12345, VAR B = VAR A, ...) [vt]

Multi-answer questions ask for a comma-separated list; the scored formats ("a, b, c, and d";
"VAR A, VAR B, ...") are what Qwen2.5-Coder-0.5B-Instruct writes greedily with the full cache.

Answers are scored by greedy exact match under teacher forcing (see runner.py), so
multi-answer tasks fix one order: the order of appearance in the context.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass, field

__all__ = ["TASKS", "Sample", "make_samples"]

TASKS = ("passkey", "multikey", "multivalue", "kv", "vartrack")

_ADJ = ("quiet", "bright", "old", "narrow", "green", "distant", "wooden", "crowded", "cold",
        "small", "golden", "empty", "busy", "hidden", "gentle", "broken", "tall", "silver")
_NOUN = ("river", "market", "teacher", "garden", "station", "bridge", "painter", "village",
         "library", "farmer", "harbor", "window", "forest", "engine", "letter", "kitchen",
         "mountain", "sailor", "museum", "road")
_VERB = ("watched", "crossed", "remembered", "painted", "followed", "visited", "described",
         "repaired", "passed", "noticed", "measured", "carried")
_PLACE = ("at dawn", "after the rain", "in the evening", "before the market opened",
          "during the long winter", "near the old wall", "on the way home", "by the sea")
_KEY_WORDS = ("amber", "cobalt", "falcon", "orchid", "granite", "willow", "ember", "harbor",
              "lantern", "meadow", "quartz", "saffron", "thistle", "velvet", "zephyr", "juniper",
              "marble", "nectar", "pebble", "raven", "sierra", "tundra", "umber", "violet")


@dataclass
class Sample:
    task: str
    length: int                       # target prompt length in tokens
    depth: float                      # depth of the (first) needle in [0, 1]
    instruction: str
    context: str
    question: str
    answer_prefix: str
    answer: str                       # continuation after answer_prefix (leading space)
    meta: dict = field(default_factory=dict)


def _sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} the "
            f"{rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_PLACE)}.")


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _key(rng: random.Random, used: set) -> str:
    while True:
        k = f"{rng.choice(_KEY_WORDS)}-{rng.choice(_KEY_WORDS)}"
        if k not in used:
            used.add(k)
            return k


class _Haystack:
    """Generated sentences with needles inserted at token depths; sized with the tokenizer."""

    def __init__(self, tok, rng: random.Random):
        self.tok, self.rng = tok, rng

    def build(self, n_tokens: int, needles: list[tuple[float, str]]) -> str:
        needle_tokens = sum(len(self.tok.encode(" " + n)) for _, n in needles)
        budget = max(n_tokens - needle_tokens, 0)
        sentences, used = [], 0
        while used < budget:
            s = _sentence(self.rng)
            sentences.append(s)
            used += len(self.tok.encode(" " + s))
        # place needles at their depths (sorted, stable), by sentence index
        for depth, text in sorted(needles, key=lambda x: x[0], reverse=True):
            sentences.insert(int(round(depth * len(sentences))), text)
        return " ".join(sentences)


def _overhead(tok, instruction: str, question: str, prefix: str) -> int:
    return len(tok.encode(instruction + "\n\n\n\n" + question + "\n" + prefix)) + 16


def _passkey(tok, rng, length, depth) -> Sample:
    key = _number(rng, 5)
    instr = ("There is an important pass key hidden inside a lot of irrelevant text. "
             "Find it and memorize it. I will quiz you about the pass key.")
    q = "What is the pass key?"
    prefix = "The pass key is"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    ctx = _Haystack(tok, rng).build(length - _overhead(tok, instr, q, prefix), [(depth, needle)])
    return Sample("passkey", length, depth, instr, ctx, q, prefix, " " + key)


def _multikey(tok, rng, length, depth) -> Sample:
    used: set = set()
    keys = [_key(rng, used) for _ in range(4)]
    vals = [_number(rng, 7) for _ in keys]
    depths = [depth] + [rng.random() for _ in keys[1:]]
    instr = ("Some special magic numbers are hidden inside the following text. Make sure to "
             "memorize them. I will quiz you about the numbers afterwards.")
    q = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
    prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
    needles = [(d, f"One of the special magic numbers for {k} is: {v}.")
               for d, k, v in zip(depths, keys, vals)]
    ctx = _Haystack(tok, rng).build(length - _overhead(tok, instr, q, prefix), needles)
    return Sample("multikey", length, depth, instr, ctx, q, prefix, " " + vals[0],
                  {"distractors": keys[1:]})


def _multivalue(tok, rng, length, depth) -> Sample:
    key = _key(rng, set())
    vals = [_number(rng, 7) for _ in range(4)]
    depths = sorted([depth] + [rng.random() for _ in vals[1:]])
    instr = ("Some special magic numbers are hidden inside the following text. Make sure to "
             "memorize them. I will quiz you about the numbers afterwards.")
    q = (f"What are all the special magic numbers for {key} mentioned in the provided text? "
         f"Answer with the numbers only, separated by commas, in the order they appear.")
    prefix = f"The special magic numbers for {key} mentioned in the provided text are"
    needles = [(d, f"One of the special magic numbers for {key} is: {v}.")
               for d, v in zip(depths, vals)]
    ctx = _Haystack(tok, rng).build(length - _overhead(tok, instr, q, prefix), needles)
    return Sample("multivalue", length, depth, instr, ctx, q, prefix,
                  " " + ", ".join(vals[:-1]) + ", and " + vals[-1])


def _hex(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(12))


def _kv(tok, rng, length, depth) -> Sample:
    instr = "Extract the value corresponding to the specified key in the JSON object below."
    budget = length - _overhead(tok, instr, "Key: \"000000000000\"", "x" * 60) - 8
    pairs, used = [], 0
    per_pair = len(tok.encode(json.dumps({_hex(rng): _hex(rng)})))
    while used + per_pair <= budget:
        pairs.append((_hex(rng), _hex(rng)))
        used += per_pair
    pairs = pairs or [(_hex(rng), _hex(rng))]
    target = min(int(round(depth * (len(pairs) - 1))), len(pairs) - 1)
    key, val = pairs[target]
    ctx = "JSON data:\n" + json.dumps(dict(pairs), indent=0)
    q = f"Key: \"{key}\"\nThe value associated with the specified key is:"
    prefix = f"The value associated with the key \"{key}\" is:"
    return Sample("kv", length, depth, instr, ctx, q, prefix, f" \"{val}\"",
                  {"pairs": len(pairs)})


def _varname(rng: random.Random, used: set) -> str:
    while True:
        v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if v not in used:
            used.add(v)
            return v


def _vartrack(tok, rng, length, depth) -> Sample:
    used: set = set()
    names = [_varname(rng, used) for _ in range(5)]
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}."
                                               for i in range(1, len(names))]
    # the chain keeps its order; the first link at `depth`, the rest spread after it
    rest = sorted(depth + (1 - depth) * rng.random() for _ in chain[1:])
    depths = [depth] + rest
    instr = ("Memorize and track the chain(s) of variable assignment hidden in the following "
             "text.")
    q = (f"Question: Find all variables that are assigned the value {value} in the text "
         f"above. Answer with the variable names only, separated by commas.")
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, "
              f"{len(names)} variables are assigned the value {value}, they are:")
    needles = list(zip(depths, chain))
    ctx = _Haystack(tok, rng).build(length - _overhead(tok, instr, q, prefix), needles)
    # inserted by descending depth; equal sentence slots keep chain order via small offsets
    return Sample("vartrack", length, depth, instr, ctx, q, prefix,
                  " " + ", ".join(f"VAR {n}" for n in names))


_MAKERS = {"passkey": _passkey, "multikey": _multikey, "multivalue": _multivalue, "kv": _kv,
           "vartrack": _vartrack}


def make_samples(task: str, length: int, n: int, tok, seed: int = 0) -> list[Sample]:
    """``n`` samples of ``task`` at about ``length`` prompt tokens; needle depths spread
    evenly over [0, 1] (``i / (n - 1)``); seeded by (seed, task, length)."""
    if task not in _MAKERS:
        raise ValueError(f"adakv.eval: unknown task {task!r}; choose from {TASKS}")
    rng = random.Random(f"{seed}/{task}/{length}")
    depths = [i / max(n - 1, 1) for i in range(n)] if n > 1 else [0.5]
    return [_MAKERS[task](tok, rng, length, d) for d in depths]
