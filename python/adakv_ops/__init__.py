"""adakv_ops: Ada-KV head-wise adaptive KV-cache eviction as PyTorch custom ops.

The ops live in ``torch.ops.adakv``; this package loads them and offers typed wrappers
(:mod:`adakv_ops.ops`). Exact semantics: ``docs/semantics.md``.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _load_library() -> None:
    here = Path(__file__).resolve().parent
    candidates = sorted(here.glob("_C*.so")) + sorted(here.glob("_C*.pyd"))
    if not candidates:
        # Editable install: the built library sits next to the installed redirect.
        import importlib.util

        spec = importlib.util.find_spec("adakv_ops._C")
        if spec is not None and spec.origin:
            candidates = [Path(spec.origin)]
    if not candidates:
        raise ImportError(
            "adakv_ops: the compiled extension _C was not found next to "
            f"{here}; build it with `pip install --no-build-isolation .`"
        )
    torch.ops.load_library(str(candidates[0]))


_load_library()

from . import _fake  # noqa: E402,F401  (registers the fake kernels)
from .budgets import pyramid_budgets  # noqa: E402
from .ops import (  # noqa: E402
    allocate,
    append_,
    compact,
    decode_attention,
    evict,
    score,
    select,
)

__version__ = "0.1.0"

__all__ = [
    "score",
    "allocate",
    "select",
    "compact",
    "evict",
    "append_",
    "decode_attention",
    "pyramid_budgets",
]
