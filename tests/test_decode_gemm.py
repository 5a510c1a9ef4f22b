"""adakv::decode_gemm (y = x weight^T + bias for at most 256 rows of x) and its routing
(adakv_ops.gemm): the CPU kernel against an fp64 reference, argument errors, opcheck; the
Hopper kernel (csrc/cuda/decode_gemm.cu: TMA + wgmma, split-K over a cluster) against the same
reference on many shapes and every forced split, in CUDA graphs and under torch.compile; the
routing of a model's projections.

The CUDA tests need an sm_90 GPU (they skip elsewhere; the names carry ``cuda`` for ``-k``).

Tolerances: both kernels multiply the same 16-bit values exactly and accumulate in fp32, in
another order than the fp64 reference; the one rounding to the output dtype dominates: half an
ulp of the result (bf16 2^-8, fp16 2^-11 relative) plus the fp32 accumulation (~K 2^-24 of the
sum of |products|). Checked as |y - ref| <= rtol |ref| + atol * sqrt(K) * scale, with rtol one
ulp of the dtype and atol scaled by the products' magnitude: an indexing or reduction bug gives
errors of the size of the result itself.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import HAVE_CUDA, HAVE_OPS, randn

pytestmark = pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built")

A = torch.ops.adakv if HAVE_OPS else None
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _sm90() -> bool:
    if not (HAVE_CUDA and HAVE_OPS):
        return False
    import adakv_ops
    return adakv_ops.cuda_kernels_loaded and torch.cuda.get_device_capability()[0] == 9


SM90 = _sm90()
needs_sm90 = pytest.mark.skipif(not SM90, reason="needs an sm_90 GPU and the CUDA kernels")


def make(M, N, K, dtype, seed, bias=False, device="cpu"):
    x = randn((M, K), seed, dtype).to(device)
    w = randn((N, K), seed + 1, dtype, scale=1.0 / math.sqrt(max(K, 1))).to(device)
    b = randn((N,), seed + 2, dtype).to(device) if bias else None
    return x, w, b


def reference(x, w, b):
    y = x.double() @ w.double().t()
    if b is not None:
        y = y + b.double()
    return y


def check_close(y, x, w, b, what=""):
    ref = reference(x.cpu(), w.cpu(), b.cpu() if b is not None else None)
    y = y.cpu().double()
    assert y.shape == ref.shape, what
    K = x.shape[1]
    # magnitude of the accumulated products per output (for the fp32 accumulation term)
    mag = (x.cpu().double().abs() @ w.cpu().double().abs().t())
    tol = 1.01 * ULP[x.dtype] * ref.abs() + 4 * 2.0**-24 * K * mag + 1e-30
    if b is not None:
        tol = tol + ULP[x.dtype] * b.cpu().double().abs()
    bad = (y - ref).abs() > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} outputs off; max err "
                           f"{(y - ref).abs().max().item():.3e}")


# ---- CPU ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (5, 7, 9), (64, 40, 72), (130, 33, 200),
                                   (256, 16, 64), (3, 0, 8), (0, 5, 8), (4, 6, 0)])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_matches_reference(dtype, M, N, K, bias):
    x, w, b = make(M, N, K, dtype, seed=M * 1000 + N * 10 + K, bias=bias)
    y = A.decode_gemm(x, w, b)
    assert y.dtype == dtype and y.shape == (M, N)
    check_close(y, x, w, b, f"cpu {dtype} {M}x{N}x{K}")


def test_cpu_split_does_not_change_the_result():
    x, w, b = make(9, 11, 40, torch.bfloat16, seed=3, bias=True)
    ys = [A.decode_gemm(x, w, b, split=s) for s in range(0, 9)]
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], rtol=0, atol=0)


@pytest.mark.parametrize("case,match", [
    (lambda x, w, b: (x[None], w, b), "x \\[M, K\\] must have 2 dimensions"),
    (lambda x, w, b: (x, w[None], b), "weight \\[N, K\\] must have 2 dimensions"),
    (lambda x, w, b: (x, w[:, :4].contiguous(), b), "weight must be \\[N, K\\] with K = 8"),
    (lambda x, w, b: (x, w.half(), b), "weight has dtype"),
    (lambda x, w, b: (x, w, b[:3]), "bias must have shape \\[N\\] = \\[5\\]"),
    (lambda x, w, b: (x, w, b.half()), "bias has dtype"),
    (lambda x, w, b: (x.t().contiguous().t(), w, b), "x \\[M, K\\] must be contiguous"),
    (lambda x, w, b: (x.int(), w.int(), None), "x \\[M, K\\] must be float32, float16 or bfloat16"),
    (lambda x, w, b: (torch.zeros(257, 8), w, b), "at most 256 rows of x"),
])
def test_errors_name_the_argument(case, match):
    x, w, b = make(4, 5, 8, torch.float32, seed=1, bias=True)
    args = case(x, w, b)
    with pytest.raises(RuntimeError, match=match):
        A.decode_gemm(*args)


@pytest.mark.parametrize("split", [-1, 9, 2**40])
def test_bad_split(split):
    x, w, _ = make(4, 5, 8, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match="split must be in \\[0, 8\\]"):
        A.decode_gemm(x, w, None, split)


def test_opcheck_cpu():
    x, w, b = make(6, 10, 24, torch.float32, seed=5, bias=True)
    torch.library.opcheck(A.decode_gemm.default, (x, w, b, 0))
    torch.library.opcheck(A.decode_gemm.default, (x, w, None, 2))


def _nonfinite_case(device):
    x, w, b = make(5, 12, 72, torch.bfloat16, seed=21, bias=True, device=device)
    x[1, 3] = float("nan")
    x[3, 70] = float("inf")
    w[7, 0] = float("nan")
    return x, w, b


def _check_nonfinite(y, x, w, b):
    """NaN / inf reach exactly the outputs whose dot product reads them: row 1 (NaN in x), row
    3 (inf in x: +-inf or NaN), column 7 (NaN in the weight); every other output is finite and
    matches the reference."""
    y = y.cpu()
    assert y[1].isnan().all() and y[:, 7].isnan().all()
    assert (~y[3].isfinite()).all()
    rest = torch.ones_like(y, dtype=torch.bool)
    rest[[1, 3]] = False
    rest[:, 7] = False
    assert y[rest].isfinite().all()
    ref = reference(x.cpu(), w.cpu(), b.cpu())
    keep = [0, 2, 4]
    cols = [c for c in range(12) if c != 7]
    xs, ws, bs = x.cpu()[keep], w.cpu()[cols], b.cpu()[cols]
    check_close(y[keep][:, cols], xs, ws, bs, "finite part")
    assert torch.equal(ref[rest].isfinite(), torch.ones_like(ref[rest], dtype=torch.bool))


def test_nonfinite_inputs_reach_only_their_outputs():
    x, w, b = _nonfinite_case("cpu")
    _check_nonfinite(A.decode_gemm(x, w, b), x, w, b)


def test_fake_kernel_shapes_and_errors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, w, b = make(6, 10, 24, torch.bfloat16, seed=5, bias=True)
    with FakeTensorMode() as mode:
        fx, fw, fb = (mode.from_tensor(t) for t in (x, w, b))
        y = A.decode_gemm(fx, fw, fb, 0)
        assert y.shape == (6, 10) and y.dtype == torch.bfloat16
        with pytest.raises(RuntimeError, match="at most 256 rows"):
            A.decode_gemm(mode.from_tensor(torch.zeros(257, 24, dtype=torch.bfloat16)), fw, None, 0)
        with pytest.raises(RuntimeError, match="weight must be \\[N, K\\] with K = 24"):
            A.decode_gemm(fx, mode.from_tensor(torch.zeros(10, 8, dtype=torch.bfloat16)), None, 0)
        with pytest.raises(RuntimeError, match="split must be in"):
            A.decode_gemm(fx, fw, None, 9)


def test_linear_falls_back_off_the_kernel():
    """adakv_ops.gemm.linear is F.linear exactly wherever the kernel does not apply (CPU here,
    fp32, more than 256 rows)."""
    from adakv_ops import gemm
    for shape in [(3, 16), (2, 5, 16), (300, 16)]:
        x = randn(shape, 7, torch.float32)
        w = randn((9, 16), 8, torch.float32)
        b = randn((9,), 9, torch.float32)
        torch.testing.assert_close(gemm.linear(x, w, b), F.linear(x, w, b), rtol=0, atol=0)


def test_route_projections_leaves_a_cpu_model_alone():
    from adakv_ops import fusion, gemm
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    assert gemm.route_projections(model) == 0
    assert all(type(m) is nn.Linear for m in model if isinstance(m, nn.Linear))
    assert not gemm.available(torch.device("cpu"), torch.bfloat16)
    fl = fusion.FusedLinear([nn.Linear(8, 4), nn.Linear(8, 2)])
    assert fl.decode_gemm is False


# ---- CUDA (sm_90) ------------------------------------------------------------------------------

SHAPES = [
    # M, N, K: odd M on every token tile, N off the 128-row tile and off 4, K off the 64 block
    (1, 128, 64), (7, 200, 72), (32, 4096, 512), (33, 130, 136), (64, 6144, 4096),
    (65, 256, 1024), (100, 1000, 200), (128, 4096, 4096), (129, 384, 520), (200, 97, 64),
    (256, 4096, 2048), (256, 129, 8),
]


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_cuda_matches_reference(dtype, M, N, K):
    x, w, b = make(M, N, K, dtype, seed=M + 7 * N + 13 * K, bias=(M % 2 == 1), device="cuda")
    y = A.decode_gemm(x, w, b)
    torch.cuda.synchronize()
    check_close(y, x, w, b, f"cuda {dtype} {M}x{N}x{K}")


@needs_sm90
@pytest.mark.parametrize("split", range(1, 9))
@pytest.mark.parametrize("M,N,K", [(64, 384, 4096), (128, 200, 1000), (256, 128, 512),
                                   (5, 256, 576)])
def test_cuda_every_split(split, M, N, K):
    x, w, b = make(M, N, K, torch.bfloat16, seed=split + M, bias=True, device="cuda")
    y = A.decode_gemm(x, w, b, split)
    check_close(y, x, w, b, f"split {split} {M}x{N}x{K}")
    # deterministic: the same inputs give the same bits
    torch.testing.assert_close(A.decode_gemm(x, w, b, split), y, rtol=0, atol=0)


@needs_sm90
@pytest.mark.sanitize
@pytest.mark.parametrize("M,N,K,split", [(3, 130, 72, 0), (64, 256, 512, 4), (129, 100, 200, 3),
                                         (256, 64, 128, 2)])
def test_cuda_small_cases_sanitize(M, N, K, split):
    x, w, b = make(M, N, K, torch.bfloat16, seed=M * N, bias=True, device="cuda")
    check_close(A.decode_gemm(x, w, b, split), x, w, b, "sanitize")


@needs_sm90
@pytest.mark.parametrize("split", [0, 1, 3])
def test_cuda_nonfinite_inputs_reach_only_their_outputs(split):
    x, w, b = _nonfinite_case("cuda")
    _check_nonfinite(A.decode_gemm(x, w, b, split), x, w, b)


@needs_sm90
def test_cuda_degenerate_sizes():
    x, w, b = make(4, 6, 0, torch.bfloat16, seed=2, bias=True, device="cuda")
    torch.testing.assert_close(A.decode_gemm(x, w, b), b.expand(4, 6))
    torch.testing.assert_close(A.decode_gemm(x, w, None), torch.zeros(4, 6, dtype=x.dtype,
                                                                       device="cuda"))
    x, w, _ = make(0, 6, 16, torch.bfloat16, seed=2, device="cuda")
    assert A.decode_gemm(x, w).shape == (0, 6)
    x, w, _ = make(3, 0, 16, torch.bfloat16, seed=2, device="cuda")
    assert A.decode_gemm(x, w).shape == (3, 0)


@needs_sm90
def test_cuda_errors():
    x, w, _ = make(4, 6, 12, torch.bfloat16, seed=2, device="cuda")
    with pytest.raises(RuntimeError, match="multiple of 8"):
        A.decode_gemm(x, w)
    x, w, _ = make(4, 6, 16, torch.float32, seed=2, device="cuda")
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        A.decode_gemm(x, w)
    x, w, _ = make(4, 6, 16, torch.bfloat16, seed=2, device="cuda")
    with pytest.raises(RuntimeError, match="is on"):
        A.decode_gemm(x, w.cpu())
    base = torch.zeros(4 * 16 + 1, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        A.decode_gemm(base[1:].view(4, 16), w)


@needs_sm90
def test_cuda_opcheck():
    x, w, b = make(40, 136, 128, torch.bfloat16, seed=11, bias=True, device="cuda")
    torch.library.opcheck(A.decode_gemm.default, (x, w, b, 0))


@needs_sm90
def test_cuda_graph_and_compile():
    x, w, b = make(128, 512, 1024, torch.bfloat16, seed=12, bias=True, device="cuda")
    ref = A.decode_gemm(x, w, b)
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        A.decode_gemm(static_x, w, b)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = A.decode_gemm(static_x, w, b)
    x2, _, _ = make(128, 512, 1024, torch.bfloat16, seed=13, device="cuda")
    static_x.copy_(x2)
    g.replay()
    torch.cuda.synchronize()
    check_close(out, x2, w, b, "graph replay")

    from adakv_ops import gemm

    def f(t):
        return torch.relu(gemm.linear(t, w, b))
    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(cf(x[None]), torch.relu(ref)[None], rtol=0, atol=0)


@needs_sm90
def test_cuda_route_projections():
    from adakv_ops import fusion, gemm
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).to(
        "cuda", torch.bfloat16)
    x = torch.randn(2, 3, 64, device="cuda", dtype=torch.bfloat16)
    ref = model(x)
    assert gemm.route_projections(model) == 2
    assert type(model[0]) is gemm.RoutedLinear
    torch.testing.assert_close(model(x), ref, rtol=2e-2, atol=2e-2)
    assert gemm.unroute_projections(model) == 2
    assert type(model[0]) is nn.Linear
    fl = fusion.FusedLinear([nn.Linear(64, 32), nn.Linear(64, 16)]).to("cuda", torch.bfloat16)
    holder = nn.Module()
    holder.fl = fl
    assert gemm.route_projections(holder) == 1 and fl.decode_gemm
