"""Next-token selection for a batch of requests with their own sampling settings (the engine's
``step``; device work only, no host read).

Per row ``b``: ``temperature[b] == 0`` is greedy (argmax); otherwise the logits are divided by
the temperature, restricted to the ``top_k[b]`` most likely tokens (``0``: no limit) and to the
smallest set of most likely tokens whose probability reaches ``top_p[b]`` (``1``: no limit;
the most likely token is always kept), renormalised and sampled with ``generator``. Ties in
the ranking go to the lower token id (a stable sort), so the kept set is well defined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ._checks import is_int

__all__ = ["SamplingParams", "select_next"]


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings; the defaults are greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        t, p, k = self.temperature, self.top_p, self.top_k
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) \
                or t < 0:
            raise ValueError(f"adakv: temperature must be a finite number >= 0, got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"adakv: top_p must be a number in (0, 1], got {p!r}")
        if not is_int(k, 0):
            raise ValueError(f"adakv: top_k must be an int >= 0 (0: no limit), got {k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def select_next(logits: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """Next token of every row of ``logits [B, V]``: ``temperature``, ``top_p`` ``[B]``
    float32 and ``top_k [B]`` int64 on the same device (see the module docstring). Returns
    ``[B]`` int64."""
    logits = logits.float()
    greedy = logits.argmax(-1)
    V = logits.shape[-1]
    t = temperature.clamp(min=1e-6).unsqueeze(1)
    x, order = (logits / t).sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(V, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).unsqueeze(1)
    x = x.masked_fill(rank >= k, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    before = probs.cumsum(-1) - probs                  # mass of the more likely tokens
    drop = (before >= top_p.unsqueeze(1)) & (rank > 0)
    probs = probs.masked_fill(drop, 0.0)
    pick = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    sampled = order.gather(1, pick.unsqueeze(1)).squeeze(1)
    return torch.where(temperature == 0, greedy, sampled)
