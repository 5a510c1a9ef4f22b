"""adakv_ops._composite (the torch-op versions of defensive_score and value_norm: the CUDA
fallback and a second reference) equals the C++ CPU kernels, run on CPU tensors: random shapes,
GQA, padding (a row whose valid tokens all lie in the window, key_start == N), W == N, every
dtype."""
from __future__ import annotations

import pytest
import torch

from conftest import HAVE_OPS, make_key_start, make_qkv, randn

pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

if HAVE_OPS:
    from adakv_ops import _composite

SHAPES = [  # B, Hq, Hk, N, W, D, kernel
    (1, 2, 1, 37, 4, 16, 5),
    (3, 4, 2, 61, 8, 16, 3),
    (2, 8, 2, 50, 5, 32, 7),
    (2, 4, 4, 9, 9, 16, 5),        # W == N: no prefix
    (3, 6, 3, 40, 1, 16, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_defensive_score_composite_matches_the_cpu_kernel(shape, dtype):
    B, Hq, Hk, N, W, D, kernel = shape
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, N + D)
    q, k = q.to(dtype), k.to(dtype)
    for ks in (None, make_key_start(B, N, N, max_pad=N)):
        if ks is not None and B > 1:
            ks[-1] = N - W // 2          # valid tokens in the window only
        want = torch.ops.adakv.defensive_score(q, k, kernel, ks, None)
        got = _composite.defensive_score(q, k, kernel, ks, None)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hk,N,D,hidden", [(1, 4, 1, 33, 16, 24), (3, 6, 2, 20, 8, 40),
                                                 (2, 2, 2, 5, 16, 8)])
def test_value_norm_composite_matches_the_cpu_kernel(B, Hq, Hk, N, D, hidden, dtype):
    v = randn((B, Hk, N, D), N).to(dtype)
    v[0, :, 2] = 0                                        # a token with no value: NaN normalised
    w = randn((hidden, Hq * D), hidden).to(dtype)
    for normalize in (False, True):
        for length in (None, 0, N // 2):
            want = torch.ops.adakv.value_norm(v, w, normalize, length)
            got = _composite.value_norm(v, w, normalize, length)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, equal_nan=True)


def test_composite_checks_its_arguments():
    q, k, v = make_qkv(1, 4, 2, 20, 4, 16, 0)
    with pytest.raises(RuntimeError, match="adakv: q_window .* same dtype"):
        _composite.defensive_score(q.half(), k)
    with pytest.raises(RuntimeError, match="adakv: .*multiple of Hk"):
        _composite.defensive_score(q[:, :3], k)
    with pytest.raises(RuntimeError, match="adakv: key_start"):
        _composite.defensive_score(q, k, key_start=torch.zeros(1, dtype=torch.int64))
    w = randn((8, 4 * 16), 1)
    with pytest.raises(RuntimeError, match="adakv: length"):
        _composite.value_norm(v, w, length=21)
    with pytest.raises(RuntimeError, match="adakv: value .* same dtype"):
        _composite.value_norm(v, w.half())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_followup_ops_match_the_cpu_kernels(dtype):
    """On CUDA the registered kernels (the native ones, or the torch-op ones where the CUDA
    library is not loaded) give the CPU kernels' results."""
    B, Hq, Hk, N, W, D = 3, 8, 2, 300, 16, 64
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, 5)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    ks = make_key_start(B, N, 5)
    w = randn((96, Hq * D), 6).to(dtype)
    want = torch.ops.adakv.defensive_score(q, k, 5, ks, None)
    got = torch.ops.adakv.defensive_score(q.cuda(), k.cuda(), 5, ks.cuda(), None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-3)
    for normalize in (False, True):
        want = torch.ops.adakv.value_norm(v, w, normalize, N - W)
        got = torch.ops.adakv.value_norm(v.cuda(), w.cuda(), normalize, N - W)
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-3)


def test_defensive_score_cuda_radius_routing():
    """adakv_ops.defensive_score sends a CUDA call to the torch-op version exactly when the
    native kernel has no pooling for it: radius min(kernel // 2, L - 1) above 16 that does not
    cover the whole prefix (the op's own check, csrc/cuda/score.cu, is the same rule)."""
    from adakv_ops import ops as _ops

    def native(N, W, kernel):
        q = torch.empty(1, 4, W, 8, device="meta")
        k = torch.empty(1, 2, N, 8, device="meta")
        return _ops._native_defensive_radius(q, k, kernel)

    assert native(300, 16, 5) and native(300, 16, 33)        # radius 2, 16
    assert not native(300, 16, 35) and not native(300, 16, 101)  # radius 17, 50 < L - 1
    assert native(36, 16, 41) and native(36, 16, 2**63 - 1)   # radius L - 1 = 19: whole prefix
    assert native(16, 16, 99) and native(17, 16, 99)          # L = 0; L = 1 (radius 0)
    assert native(300, 16, 4) and native(300, 16, 0)          # malformed: the op raises
