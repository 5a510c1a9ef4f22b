"""Per-layer budget schedules (docs/semantics.md, "Budget schedules").

Pure Python, no torch dependency. ``C`` is the per-head budget of selected prefix tokens
(window not counted).
"""

from __future__ import annotations

import math
from fractions import Fraction

from ._checks import is_int

__all__ = ["uniform_budgets", "pyramid_budgets"]


def _check(budget: int, n_layers: int) -> None:
    if not is_int(budget, 0):
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")
    if not is_int(n_layers, 1):
        raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")


def uniform_budgets(budget: int, n_layers: int) -> list[int]:
    """Uniform / Ada schedule: every layer gets ``budget``."""
    _check(budget, n_layers)
    return [budget] * n_layers


def pyramid_budgets(
    budget: int,
    n_layers: int,
    prompt_len: int,
    window: int,
    beta: int = 20,
    exact_mean: bool = False,
) -> list[int]:
    """PyramidKV layer budgets.

    ``min_ = C // beta``, ``max_ = 2 * C - min_``.

    * ``exact_mean=False`` (official PyramidKV schedule):
      ``steps = (max_ - min_) // (n_layers - 1)``, ``C_l = max_ - l * steps``.
      The mean overshoots ``C`` because ``steps`` is floored.
    * ``exact_mean=True``: real step ``s = (max_ - min_) / (n_layers - 1)``,
      ``x_l = max_ - l * s`` (sums to exactly ``n_layers * C``); ``floor`` plus largest
      remainder (ties to the lower layer) so the integer budgets sum to ``n_layers * C``.
      Computed with exact rational arithmetic.

    Both are then clamped to ``[0, prompt_len - window]`` (the number of prefix tokens; the
    clamp is also applied when ``n_layers == 1``, which otherwise gives ``[C]``).
    """
    _check(budget, n_layers)
    if beta < 1:
        raise ValueError(f"beta must be >= 1, got {beta!r}")
    limit = max(0, int(prompt_len) - int(window))
    C = budget
    if n_layers == 1:
        raw = [C]
    else:
        min_ = C // beta
        max_ = 2 * C - min_
        if not exact_mean:
            steps = (max_ - min_) // (n_layers - 1)
            raw = [max_ - l * steps for l in range(n_layers)]
        else:
            s = Fraction(max_ - min_, n_layers - 1)
            xs = [Fraction(max_) - l * s for l in range(n_layers)]
            fl = [math.floor(x) for x in xs]
            rem = n_layers * C - sum(fl)
            assert 0 <= rem < n_layers, rem
            # largest fractional part first, ties to the lower layer index
            order = sorted(range(n_layers), key=lambda l: (-(xs[l] - fl[l]), l))
            raw = list(fl)
            for l in order[:rem]:
                raw[l] += 1
            assert sum(raw) == n_layers * C
    return [max(0, min(c, limit)) for c in raw]
