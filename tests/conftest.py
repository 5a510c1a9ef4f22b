"""Shared helpers for the adakv_ops test suite.

* ``ref``: the slow reference module ``adakv_ops.reference``. It is importable even before the
  compiled extension exists (a stub package pointing at python/adakv_ops is installed then).
* ``ops``: the ``adakv_ops`` package when its ops are registered, else ``None``;
  ``requires_ops`` skips a test in that case.
* Random input builders take an explicit ``seed`` so every parametrized case draws fresh data.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys
import types

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG_DIR = ROOT / "python" / "adakv_ops"


def _load():
    # CI sets ADAKV_REQUIRE_EXTENSION=1: a missing or broken extension must fail the run, not
    # skip every op test.
    required = os.environ.get("ADAKV_REQUIRE_EXTENSION") == "1"
    try:
        import adakv_ops  # noqa: F401

        have = hasattr(torch.ops, "adakv") and hasattr(torch.ops.adakv, "evict")
        pkg = adakv_ops if have else None
    except Exception:  # extension not built yet
        if required:
            raise
        for name in [m for m in sys.modules if m == "adakv_ops" or m.startswith("adakv_ops.")]:
            del sys.modules[name]
        stub = types.ModuleType("adakv_ops")
        stub.__path__ = [str(PKG_DIR)]
        sys.modules["adakv_ops"] = stub
        pkg = None
    reference = importlib.import_module("adakv_ops.reference")
    return pkg, reference


BENCH_DIR = ROOT / "benchmarks"


def bench_records(path) -> list:
    """The JSON-lines records a benchmark script wrote (its smoke tests read them)."""
    import json

    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def gpu_busy(ms: float = 150.0) -> None:
    """Queue roughly ``ms`` of work on the current CUDA stream as ONE kernel
    (``torch.cuda._sleep``; many small kernels would fill the launch queue, and then the host
    waits for the GPU to drain it). The sleep's cycles per ms are measured on a long sleep after
    a warm-up one, so a low idle clock does not shorten it much."""
    torch.cuda._sleep(1_000_000)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    torch.cuda._sleep(50_000_000)
    e.record()
    e.synchronize()
    per_ms = 5e7 / max(s.elapsed_time(e), 1e-3)
    torch.cuda._sleep(int(ms * per_ms))


ops, ref = _load()
HAVE_OPS = ops is not None
HAVE_CUDA = torch.cuda.is_available()

requires_ops = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")
requires_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="CUDA not available")

# device parametrization: CUDA cases are collected everywhere, skipped without a GPU
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------------------------
# numeric helpers


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    num = torch.linalg.vector_norm(a - b).item()
    den = torch.linalg.vector_norm(b).item()
    if den == 0.0:
        return num
    return num / den


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def randn(shape, seed_or_gen, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    g = seed_or_gen if isinstance(seed_or_gen, torch.Generator) else gen(seed_or_gen)
    return (torch.randn(shape, generator=g, dtype=torch.float32) * scale).to(dtype)


def make_qkv(B, Hq, Hk, N, W, D, seed, dtype=torch.float32, q_scale=2.0, codebook=None):
    """Random ``q_window [B,Hq,W,D]``, ``key``/``value [B,Hk,N,D]`` (never all-zero).

    ``q_scale`` sharpens attention so that scores are spread out. ``codebook=k`` draws every key
    from ``k`` random vectors per head: many exactly equal scores (tie-heavy, and identical in
    fp32 and fp64 computations).
    """
    g = gen(seed)
    q = randn((B, Hq, W, D), g, scale=q_scale)
    if codebook is None:
        k = randn((B, Hk, N, D), g)
    else:
        book = randn((B, Hk, codebook, D), g)
        idx = torch.randint(0, codebook, (B, Hk, N), generator=g)
        k = torch.gather(book, 2, idx.unsqueeze(-1).expand(B, Hk, N, D))
    v = randn((B, Hk, N, D), g)
    return q.to(dtype), k.to(dtype).contiguous(), v.to(dtype)


def make_key_start(B, N, seed, max_pad=None, force=True) -> torch.Tensor:
    """Left-padding starts ``[B]`` int32; row 0 unpadded, the others padded up to ``max_pad``."""
    g = gen(seed + 7919)
    max_pad = N // 3 if max_pad is None else max_pad
    ks = torch.randint(0, max_pad + 1, (B,), generator=g, dtype=torch.int32)
    if B > 0:
        ks[0] = 0
    if force and B > 1 and max_pad > 0 and int(ks[1:].max()) == 0:
        ks[1] = max(1, max_pad)
    return ks


def tie_scores(B, Hk, L, seed, levels=3, key_start=None, plateau=True) -> torch.Tensor:
    """Tie-heavy fp32 scores: few distinct values, optional max-pool plateaus, -inf padding."""
    g = gen(seed)
    s = torch.randint(1, levels + 1, (B, Hk, L), generator=g).float() / levels
    if plateau and L > 0:
        s = torch.nn.functional.max_pool1d(s.view(B * Hk, 1, L), 3, 1, 1).view(B, Hk, L)
    s = s.contiguous()
    if key_start is not None:
        for b, k in enumerate(key_start.tolist()):
            s[b, :, : min(k, L)] = float("-inf")
    return s


def rand_scores(B, Hk, L, seed, key_start=None) -> torch.Tensor:
    g = gen(seed)
    s = torch.rand((B, Hk, L), generator=g).pow(3).contiguous()
    if key_start is not None:
        for b, k in enumerate(key_start.tolist()):
            s[b, :, : min(k, L)] = float("-inf")
    return s


def to(dev, *ts):
    out = tuple(None if t is None else t.to(dev) for t in ts)
    return out if len(out) > 1 else out[0]


def cpu(*ts):
    return to("cpu", *ts)


def assert_equal(a: torch.Tensor, b: torch.Tensor, what: str = ""):
    a = a.detach().cpu()
    b = b.detach().cpu()
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert tuple(a.shape) == tuple(b.shape), f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if not torch.equal(a, b):
        # NaN == NaN here: poisoned rows must stay poisoned, not compare unequal.
        diff = (a != b) if not a.is_floating_point() else ~((a == b) | (a.isnan() & b.isnan()))
        if not diff.any():
            return
        idx = torch.nonzero(diff)[:5].tolist()
        raise AssertionError(
            f"{what}: {int(diff.sum())} elements differ, first at {idx}: "
            f"got {[a[tuple(i)].item() for i in idx]} expected {[b[tuple(i)].item() for i in idx]}"
        )


@pytest.fixture
def reference():
    return ref


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from a clean dynamo cache: many tests compile the same model
    ``forward`` code object (one per family), and their cache entries would otherwise add up
    to the recompile limit across tests."""
    yield
    if getattr(torch, "_dynamo", None) is not None and "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


def set_decode_schedule(monkeypatch, splits="auto", cluster="1", path=None):
    """The CUDA decode kernel's schedule for one test (read by the launcher on every call): a
    forced split count or the heuristic's ("auto"), the cluster merge allowed ("1") or not, and
    (``path`` "split" / "balanced"; None leaves it) the split or the work-balanced kernel."""
    if path is not None:
        monkeypatch.setenv("ADAKV_DECODE_BALANCED", "1" if path == "balanced" else "0")
    if splits == "auto":
        monkeypatch.delenv("ADAKV_DECODE_SPLITS", raising=False)
    else:
        monkeypatch.setenv("ADAKV_DECODE_SPLITS", splits)
    monkeypatch.setenv("ADAKV_DECODE_CLUSTER", cluster)
