"""defensive_score and value_norm (the building blocks of the authors' follow-up methods, SPEC
7.1 / 7.2) against the fp64 oracle ``adakv_ops.reference_followups``, on the CPU kernels (the
CUDA kernels are checked against these in tests/test_cuda_followups.py).

* defensive_score: the oracle has no direct output for ``R`` before the value weight, so the
  expected values are built here in fp64 from ``_row_window_probs`` following the steps of
  docs/semantics.md; and end to end, ``scores * value_norm(normalize=True, length=L)`` against
  ``defensive_scores_ref(return_parts=True)["R"]``, ``snap_mean`` against ``score`` (bit for
  bit) and the window masses against the oracle's row probabilities.
* value_norm: against ``value_norm_ref`` (fp64 of the same inputs, bf16/fp16 included).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import conftest
from conftest import assert_equal, make_qkv, randn, requires_ops

pytestmark = requires_ops
ops = conftest.ops

rf = pytest.importorskip("adakv_ops.reference_followups")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) % 100_000


# ----------------------------------------------------------------------------------------------
# fp64 expectations


def pool_valid(P: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """avg_pool1d along the last axis (stride 1, padding kernel_size // 2, zeros outside,
    divisor kernel_size) for any odd kernel_size (also wider than the row), fp64."""
    n = P.shape[-1]
    r = kernel_size // 2
    cs = torch.nn.functional.pad(P.cumsum(-1), (1, 0))
    i = torch.arange(n)
    lo = (i - r).clamp(min=0)
    hi = (i + r + 1).clamp(max=n)
    return (cs[..., hi] - cs[..., lo]) / kernel_size


def expected_defensive(q, k, kernel_size=5, key_start=None, scale=None):
    """(scores, snap_mean, window_mass) in fp64, per docs/semantics.md."""
    B, Hq, W, _ = q.shape
    Hk, N = k.shape[1], k.shape[2]
    G, L = Hq // Hk, N - W
    ks = [0] * B if key_start is None else key_start.tolist()
    scores = torch.full((B, Hk, L), float("-inf"), dtype=torch.float64)
    snap = scores.clone()
    mass = torch.zeros(B, 2, dtype=torch.float64)
    for b in range(B):
        L_b = L - ks[b]
        if L_b <= 0:
            continue
        probs = rf._row_window_probs(q[b], k[b, :, ks[b]:], W, G, scale, torch.float64)
        P = probs[..., :L_b]  # [Hq, W, L_b]
        base = P.sum(-1, keepdim=True)
        if kernel_size <= 64 and not P.isnan().any():  # cross-check with torch (not huge kernels)
            torch.testing.assert_close(
                pool_valid(P, kernel_size),
                torch.nn.functional.avg_pool1d(P, kernel_size, 1, kernel_size // 2,
                                               count_include_pad=True))
        pooled = pool_valid(P, kernel_size)
        tot = pooled.sum(-1, keepdim=True)
        pooled = torch.where(tot > 0, pooled / tot * base, torch.zeros((), dtype=torch.float64))
        R = pooled.view(Hk, G, W, L_b).amax(dim=(1, 2))
        R = torch.maximum(R, R.mean(-1, keepdim=True))
        scores[b, :, ks[b]:] = R
        snap[b, :, ks[b]:] = P.view(Hk, G, W, L_b).mean(dim=(1, 2))
        mass[b, 0] = probs[..., L_b:].sum(-1).mean()
        mass[b, 1] = P[..., -W:].sum(-1).mean()
    return scores, snap, mass


def close_scores(got, exp, what, rtol=1e-4):
    """fp32 vs fp64: same -inf pattern, finite values to fp32 accuracy."""
    got = got.detach().cpu()
    assert got.dtype == torch.float32 and tuple(got.shape) == tuple(exp.shape), what
    assert torch.equal(torch.isneginf(got), torch.isneginf(exp)), f"{what}: -inf pattern differs"
    fin = torch.isfinite(exp)
    assert torch.isfinite(got[fin]).all(), f"{what}: non-finite values"
    if fin.any():
        scale = float(exp[fin].abs().max())
        torch.testing.assert_close(got[fin].double(), exp[fin], rtol=rtol, atol=1e-6 * scale,
                                   msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------
# defensive_score

DEF_SHAPES = [
    # B, Hq, Hk, N, W, D, padding
    (1, 4, 4, 33, 4, 16, "none"),      # G = 1
    (3, 4, 2, 57, 8, 16, "mixed"),     # G = 2, random left padding
    (3, 8, 2, 41, 4, 64, "edge"),      # G = 4; row 1: valid tokens all in the window; row 2: ks = N
    (1, 4, 1, 129, 8, 64, "none"),     # G = 4, Hk = 1
    (3, 2, 2, 23, 1, 16, "mixed"),     # W = 1
    (3, 4, 2, 9, 8, 16, "edge"),       # L = 1
    (1, 4, 2, 8, 8, 16, "none"),       # W == N: no prefix at all
    (3, 8, 4, 201, 8, 16, "last"),     # row 1 has exactly one valid prefix token
    (3, 4, 2, 35, 4, 64, "at_L"),      # row 0: ks = L (no valid prefix, a full valid window)
]
KERNELS = [1, 3, 5, 7]


def key_start_for(kind, B, N, W, seed):
    L = N - W
    if kind == "none":
        return None
    if kind == "mixed":
        g = torch.Generator().manual_seed(seed)
        ks = torch.randint(0, max(1, L // 2), (B,), generator=g, dtype=torch.int32)
        ks[0] = 0
        ks[-1] = max(1, int(ks[-1]))
        return ks
    if kind == "edge":
        return torch.tensor([0, min(L + 1, N), N][:B], dtype=torch.int32)
    if kind == "at_L":
        return torch.tensor([L, 0, 2][:B], dtype=torch.int32)
    if kind == "last":
        return torch.tensor([3, L - 1, 0][:B], dtype=torch.int32)
    raise ValueError(kind)


@pytest.mark.parametrize("shape", DEF_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_defensive_score(shape, kernel, dtype):
    B, Hq, Hk, N, W, D, pad = shape
    sd = seed_of("defensive", shape, kernel, str(dtype))
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, sd, dtype=dtype)
    ks = key_start_for(pad, B, N, W, sd)
    scores, snap, mass = ops.defensive_score(q, k, kernel_size=kernel, key_start=ks)
    e_scores, e_snap, e_mass = expected_defensive(q, k, kernel, ks)
    close_scores(scores, e_scores, "scores")
    close_scores(snap, e_snap, "snap_mean")
    assert mass.dtype == torch.float32 and tuple(mass.shape) == (B, 2)
    torch.testing.assert_close(mass.double(), e_mass, rtol=1e-5, atol=1e-6)
    # snap_mean is adakv::score's unpooled mean/mean, bit for bit (the same fp32 softmax)
    want = ops.score(q, k, kernel_size=1, pooling="none", aggregate="mean", gqa_reduce="mean",
                     key_start=ks)
    assert_equal(snap, want, "snap_mean vs score")


@pytest.mark.parametrize("shape", [s for s in DEF_SHAPES if s[3] > s[4]],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kernel", [1, 5, 7])
def test_defensive_score_end_to_end(shape, kernel):
    """scores * value weight == the oracle's R (steps 1-4); window masses == the oracle's
    window_bias inputs (intended per row; the slip per row)."""
    B, Hq, Hk, N, W, D, pad = shape
    sd = seed_of("defensive_e2e", shape, kernel)
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, sd)
    hidden = 24
    o = randn((hidden, Hq * D), sd + 1)
    ks = key_start_for(pad, B, N, W, sd)
    L = N - W
    _, parts = rf.defensive_scores_ref(q, k, v, o, 3, ks, kernel_size=kernel, return_parts=True)
    scores, snap, mass = ops.defensive_score(q, k, kernel, ks)
    weight = ops.value_norm(v, o, normalize=True, length=L)
    ksl = [0] * B if ks is None else ks.tolist()
    for b in range(B):
        lo = ksl[b]
        if L - lo <= 0:
            assert torch.isneginf(scores[b]).all() and torch.isneginf(snap[b]).all()
            assert mass[b].tolist() == [0.0, 0.0]
            continue
        torch.testing.assert_close(parts["weight"][b, :, lo:L], weight[b, :, lo:].double(),
                                   rtol=1e-5, atol=1e-7)
        want = parts["R"][b, :, lo:L]
        got = (scores[b, :, lo:] * weight[b, :, lo:]).double()
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6 * float(want.abs().max()))
        # window_bias of the oracle (intended, per row) is window_mass[b, 0]
        torch.testing.assert_close(float(mass[b, 0]), float(parts["window_bias"][b]),
                                   rtol=1e-5, atol=1e-6)
        probs = rf._row_window_probs(q[b], k[b, :, lo:], W, Hq // Hk, None, torch.float64)
        P = probs[..., : L - lo]
        torch.testing.assert_close(float(mass[b, 1]), float(P[..., -W:].sum(-1).mean()),
                                   rtol=1e-5, atol=1e-6)
    # as_written: the batch-wide slip is the mean of window_mass[:, 1] over the rows with a prefix
    rows = [b for b in range(B) if L - ksl[b] > 0]
    if rows:
        _, pw = rf.defensive_scores_ref(q, k, v, o, 3, ks, kernel_size=kernel, as_written=True,
                                        compute_dtype=torch.float64, return_parts=True)
        torch.testing.assert_close(float(mass[rows, 1].double().mean()),
                                   float(pw["window_bias"][rows[0]]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", [2 * 20 + 1, 2 * 20 + 3, 2**31 - 1, 2**63 - 1, 31])
def test_defensive_score_huge_kernel(kernel):
    """A kernel as wide as the row (or wider) pools the whole valid prefix: every column the
    same before the max, so R is flat per head."""
    B, Hq, Hk, N, W, D = 2, 4, 2, 24, 4, 8
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 91)
    ks = torch.tensor([0, 6], dtype=torch.int32)
    scores, snap, mass = ops.defensive_score(q, k, kernel, ks)
    e_scores, e_snap, e_mass = expected_defensive(q, k, kernel, ks)
    close_scores(scores, e_scores, f"scores kernel={kernel}")
    close_scores(snap, e_snap, "snap_mean")
    torch.testing.assert_close(mass.double(), e_mass, rtol=1e-5, atol=1e-6)


def test_defensive_score_scale_and_defaults():
    B, Hq, Hk, N, W, D = 2, 4, 2, 31, 4, 16
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 5)
    for scale in (None, 0.05, 1.0):
        got = ops.defensive_score(q, k, scale=scale)  # kernel_size 5 by default
        want = expected_defensive(q, k, 5, None, scale)
        for g_, w_, n in zip(got[:2], want[:2], ("scores", "snap_mean")):
            close_scores(g_, w_, f"{n} scale={scale}")
    a = torch.ops.adakv.defensive_score(q, k)
    b = ops.defensive_score(q, k, 5, None, None)
    for x, y in zip(a, b):
        assert_equal(x, y, "schema defaults")


def test_defensive_score_empty_and_no_prefix():
    q, k, _ = make_qkv(0, 4, 2, 20, 4, 8, 3)
    s, m, wm = ops.defensive_score(q, k)
    assert s.shape == (0, 2, 16) and m.shape == (0, 2, 16) and wm.shape == (0, 2)
    q, k, _ = make_qkv(2, 4, 2, 6, 6, 8, 3)  # W == N: L = 0
    s, m, wm = ops.defensive_score(q, k)
    assert s.shape == (2, 2, 0) and wm.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    q, k, _ = make_qkv(2, 4, 2, 12, 4, 8, 3)
    s, m, wm = ops.defensive_score(q, k, key_start=torch.tensor([8, 12], dtype=torch.int32))
    assert torch.isneginf(s).all() and torch.isneginf(m).all() and (wm == 0).all()


def test_defensive_score_nan_propagates():
    """A NaN in a query poisons its softmax row: snap_mean and the window masses of that batch
    row are NaN; its pooled row sums to NaN, which counts as "not > 0" (D7) and gives 0, exactly
    as the oracle's torch.where does; the other batch row is untouched."""
    B, Hq, Hk, N, W, D = 2, 4, 2, 24, 4, 8
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 7)
    q[1, 1, 2, 3] = float("nan")
    scores, snap, mass = ops.defensive_score(q, k)
    e_scores, e_snap, e_mass = expected_defensive(q, k)
    assert torch.equal(snap.isnan(), e_snap.isnan()) and snap[1, 0].isnan().all()
    assert torch.equal(scores.isnan(), e_scores.isnan())
    assert mass[1].isnan().all() and not mass[0].isnan().any()
    close_scores(scores[0], e_scores[0], "scores row 0")
    close_scores(snap[0], e_snap[0], "snap row 0")
    close_scores(scores[1], e_scores[1], "scores row 1 (D7 zeroes the NaN rows)")


def test_defensive_score_threads_agree():
    """The result does not depend on the thread count (no shared accumulation)."""
    B, Hq, Hk, N, W, D = 3, 8, 4, 77, 8, 16
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 13)
    ks = torch.tensor([0, 9, 30], dtype=torch.int32)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.defensive_score(q, k, 5, ks)
        torch.set_num_threads(max(2, n))
        many = ops.defensive_score(q, k, 5, ks)
    finally:
        torch.set_num_threads(n)
    for a, b, name in zip(one, many, ("scores", "snap_mean", "window_mass")):
        assert_equal(a, b, name)


# ----------------------------------------------------------------------------------------------
# value_norm

VN_SHAPES = [
    # B, Hk, G, N, D, hidden
    (1, 1, 4, 37, 16, 40),
    (3, 2, 1, 23, 16, 24),
    (3, 2, 2, 129, 64, 96),
    (1, 4, 4, 1025, 16, 33),
    (2, 3, 2, 5, 64, 7),
]


def value_norm_expected(v, o, normalize, length):
    want = rf.value_norm_ref(v, o)[..., :length]
    if normalize:
        want = want / want.sum(dim=1, keepdim=True)
    return want


def close_norms(got, want, what, rtol=2e-5):
    assert got.dtype == torch.float32 and tuple(got.shape) == tuple(want.shape), what
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN pattern differs"
    ok = ~want.isnan()
    if ok.any():
        scale = float(want[ok].abs().max())
        torch.testing.assert_close(got[ok].double(), want[ok], rtol=rtol, atol=1e-7 * scale,
                                   msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("shape", VN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("length", ["N", "short", 0])
def test_value_norm(shape, dtype, normalize, length):
    B, Hk, G, N, D, hidden = shape
    sd = seed_of("value_norm", shape, str(dtype), normalize, length)
    v = randn((B, Hk, N, D), sd, dtype)
    o = randn((hidden, Hk * G * D), sd + 1, dtype, scale=1 / math.sqrt(D))
    n = {"N": N, "short": N // 2 + 1, 0: 0}[length]
    got = ops.value_norm(v, o, normalize=normalize, length=None if length == "N" else n)
    # the oracle converts the (bf16 / fp16) inputs to fp64: compare on the same input values
    close_norms(got, value_norm_expected(v, o, normalize, n), "value_norm",
                rtol=2e-5 if dtype == torch.float32 else 1e-3)


def test_value_norm_zero_token_is_nan_after_normalize():
    B, Hk, G, N, D, hidden = 2, 2, 2, 19, 16, 24
    v = randn((B, Hk, N, D), 3)
    o = randn((hidden, Hk * G * D), 4)
    v[1, :, 5] = 0.0  # token 5 of row 1: zero in every head
    v[0, 0, 7] = 0.0  # one head only: norm 0 there, finite after normalising
    raw = ops.value_norm(v, o)
    assert (raw[1, :, 5] == 0).all() and raw[0, 0, 7] == 0
    got = ops.value_norm(v, o, normalize=True)
    assert got[1, :, 5].isnan().all() and got.isnan().sum() == Hk
    assert got[0, 0, 7] == 0 and got[0, 1, 7] == 1
    close_norms(got, value_norm_expected(v, o, True, N), "normalized")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_value_norm_chunks(dtype):
    """Several token chunks (the temporary [Hk, G, T, hidden] is bounded) and a ragged last
    chunk: same result as the oracle; every token written."""
    B, Hk, G, N, D, hidden = 2, 2, 4, 3001, 16, 640
    v = randn((B, Hk, N, D), 11, dtype)
    o = randn((hidden, Hk * G * D), 12, dtype, scale=0.25)
    for length in (N, 2049, 1):
        got = ops.value_norm(v, o, length=length)
        close_norms(got, value_norm_expected(v, o, False, length), f"length={length}",
                    rtol=2e-5 if dtype == torch.float32 else 1e-3)


def test_value_norm_hidden_zero_and_empty():
    v = randn((2, 2, 5, 8), 1)
    o = torch.zeros(0, 4 * 8)
    assert (ops.value_norm(v, o) == 0).all()
    assert ops.value_norm(v, o, normalize=True).isnan().all()
    assert ops.value_norm(v[:0].contiguous(), randn((3, 16), 2)).shape == (0, 2, 5)
    assert ops.value_norm(v, randn((3, 16), 2), length=0).shape == (2, 2, 0)


def test_value_norm_large_model_shape_matches_eager():
    """The per-layer shape of a real model (Hq = 4, D = 256, hidden = 640) against the same
    computation in eager torch (fp32)."""
    v = randn((1, 1, 700, 256), 21)
    o = randn((640, 4 * 256), 22, scale=1 / 16)
    wo = o.t().reshape(4, 256, 640)
    want = (v[0, 0].unsqueeze(0) @ wo).abs().sum(-1).mean(0).view(1, 1, -1)
    torch.testing.assert_close(ops.value_norm(v, o), want, rtol=1e-5, atol=1e-6)
