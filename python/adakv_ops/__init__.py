"""adakv_ops: Ada-KV head-wise adaptive KV-cache eviction as PyTorch custom ops.

The ops live in ``torch.ops.adakv``; this package loads them and offers typed wrappers
(:mod:`adakv_ops.ops`). Exact semantics: ``docs/semantics.md``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch


def _find_library(name: str) -> Optional[Path]:
    here = Path(__file__).resolve().parent
    found = sorted(here.glob(f"{name}.*so")) + sorted(here.glob(f"{name}.*pyd"))
    found = [p for p in found if p.stem.split(".")[0] == name]
    if found:
        return found[0]
    # Editable install: the built library sits next to the installed redirect.
    import importlib.util

    spec = importlib.util.find_spec(f"adakv_ops.{name}")
    if spec is not None and spec.origin and spec.origin.endswith((".so", ".pyd")):
        return Path(spec.origin)
    return None


#: Whether the CUDA kernels (``_C_cuda``) are loaded; ``cuda_load_error`` says why not.
cuda_kernels_loaded = False
cuda_load_error: Optional[str] = None


def _load_libraries() -> None:
    """Loads ``_C`` (op schemas + CPU kernels), then ``_C_cuda`` on a CUDA build of torch.

    Both are built against torch's stable ABI, so they load on every supported torch. The CUDA
    library is skipped on a CPU-only torch; if it fails to load on a CUDA torch, the CPU ops
    still work and ``cuda_load_error`` holds the reason (a warning says so too).
    """
    global cuda_kernels_loaded, cuda_load_error
    cpu = _find_library("_C")
    if cpu is None:
        raise ImportError(
            "adakv_ops: the compiled extension _C was not found next to "
            f"{Path(__file__).resolve().parent}; build it with "
            "`pip install --no-build-isolation .`"
        )
    torch.ops.load_library(str(cpu))
    cuda = _find_library("_C_cuda")
    if cuda is None:
        cuda_load_error = "this build has no CUDA kernels (built without a CUDA toolkit)"
    elif not torch.version.cuda:
        cuda_load_error = f"torch {torch.__version__} is a CPU-only build"
    else:
        try:
            torch.ops.load_library(str(cuda))
            cuda_kernels_loaded = True
        except OSError as e:  # e.g. a torch without libtorch_cuda's stable shim
            cuda_load_error = f"loading {cuda.name} failed: {e}"
            warnings.warn(f"adakv_ops: CUDA kernels not loaded ({cuda_load_error}); "
                          "the CPU kernels work", RuntimeWarning, stacklevel=2)


_load_libraries()

from . import _fake  # noqa: E402,F401  (registers the fake kernels)
from . import _composite  # noqa: E402

#: Ops whose CUDA kernel is the torch-op implementation of ``adakv_ops._composite`` because the
#: CUDA library provides none (built without CUDA, or not loaded): empty when the native kernels
#: are loaded. Registered on a CUDA build of torch only.
composite_cuda_ops = _composite.register() if torch.version.cuda else []
from .budgets import pyramid_budgets  # noqa: E402
from .ops import (  # noqa: E402
    allocate,
    append_,
    compact,
    decode_attention,
    defensive_score,
    evict,
    paged_append_,
    paged_append_rotary_,
    paged_compact_,
    paged_decode_attention,
    score,
    select,
    value_norm,
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
    "paged_compact_",
    "paged_append_",
    "paged_append_rotary_",
    "paged_decode_attention",
    "defensive_score",
    "value_norm",
    "pyramid_budgets",
]
