"""CUDA kernels of the follow-up building blocks against the CPU kernels (csrc/cpu/followups.cpp)
on the same input values, the fp64 oracle (adakv_ops.reference_followups) and the torch-op
versions (adakv_ops._composite):

* value_norm: the tensor-core GEMM with an L1 epilogue and its CUDA-core path
  (csrc/cuda/value_norm.cu).

Every test here skips without a GPU (the module name puts them all under ``-k cuda``); the
``sanitize``-marked ones are the small cases compute-sanitizer runs (memcheck, racecheck).

Tolerances (why not tighter, why not looser):
* value_norm, fp16 / bf16: both backends multiply the same 16-bit values exactly in fp32; the
  difference is the fp32 accumulation over D (tensor-core order) and over hidden (relative
  ~1e-5 of the L1 norm). rtol 5e-3 leaves ample room (an indexing bug gives O(1) errors). fp32
  on the CUDA-core path: rtol 1e-4.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from conftest import HAVE_CUDA, HAVE_OPS, randn

pytestmark = [
    pytest.mark.skipif(not HAVE_CUDA, reason="CUDA not available"),
    pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built"),
]

A = torch.ops.adakv if HAVE_OPS else None

DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAN, INF = float("nan"), float("inf")


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) % 100_000


# ----------------------------------------------------------------------------------------------
# value_norm

def vn_inputs(B, Hk, G, N, D, hidden, seed, dtype):
    v = randn((B, Hk, N, D), seed, DT[dtype])
    o = randn((hidden, Hk * G * D), seed + 1, DT[dtype], scale=1 / math.sqrt(D))
    return v, o


def check_norms(got, exp, what, dtype):
    got = got.cpu()
    assert got.dtype == torch.float32 and got.shape == exp.shape, what
    assert torch.equal(got.isnan(), exp.isnan()), f"{what}: NaN pattern differs"
    assert torch.equal(got.isinf(), exp.isinf()), f"{what}: inf pattern differs"
    ok = torch.isfinite(exp)
    if ok.any():
        rtol = 1e-4 if dtype == "fp32" else 5e-3
        scale = float(exp[ok].abs().max())
        torch.testing.assert_close(got[ok], exp[ok], rtol=rtol, atol=1e-6 * scale,
                                   msg=lambda m: f"{what}: {m}")


VN_SHAPES = [
    # B, Hk, G, N, D, hidden
    (1, 8, 4, 1000, 128, 1024),   # Llama-3.1-8B heads (hidden reduced for the CPU reference)
    (2, 2, 1, 300, 64, 96),       # G = 1
    (3, 2, 2, 257, 64, 200),      # hidden not a multiple of the tile
    (1, 1, 7, 129, 128, 130),     # G = 7, Hk = 1
    (2, 2, 4, 77, 256, 520),      # D = 256
    (1, 2, 2, 600, 128, 4),       # hidden < 8
    (1, 4, 2, 33, 16, 24),        # D = 16: CUDA-core path
    (2, 3, 2, 50, 8, 7),          # D = 8
]
VN_IDS = ["x".join(map(str, s)) for s in VN_SHAPES]


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("shape", VN_SHAPES, ids=VN_IDS)
def test_value_norm_cuda_matches_cpu(shape, dtype):
    B, Hk, G, N, D, hidden = shape
    v, o = vn_inputs(B, Hk, G, N, D, hidden, seed_of("vn", shape, dtype), dtype)
    vc, oc = v.cuda(), o.cuda()
    for length in (None, N // 2 + 1, 0):
        for normalize in (False, True):
            exp = A.value_norm(v, o, normalize, length)
            got = A.value_norm(vc, oc, normalize, length)
            check_norms(got, exp, f"{shape} {dtype} length={length} normalize={normalize}", dtype)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_value_norm_cuda_matches_oracle_and_composite(dtype):
    import adakv_ops.reference_followups as rf
    from adakv_ops import _composite

    B, Hk, G, N, D, hidden = 2, 2, 4, 333, 128, 384
    v, o = vn_inputs(B, Hk, G, N, D, hidden, 7, dtype)
    got = A.value_norm(v.cuda(), o.cuda(), False, None)
    check_norms(got, rf.value_norm_ref(v, o).float(), "vs fp64 oracle", dtype)
    comp = _composite.value_norm(v.cuda(), o.cuda(), True, N - 5)
    check_norms(A.value_norm(v.cuda(), o.cuda(), True, N - 5), comp.cpu(), "vs composite", dtype)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_value_norm_cuda_nonfinite_and_zero(dtype):
    """NaN / inf in a value row reach exactly that token (all heads once normalised); a token
    whose values are 0 in every head is 0, and NaN (0 / 0) normalised; hidden = 0: zeros."""
    B, Hk, G, N, D, hidden = 2, 2, 2, 300, 64, 136
    v, o = vn_inputs(B, Hk, G, N, D, hidden, 13, dtype)
    clean = v.cuda()
    v[0, 1, 7, 3] = NAN
    v[1, 0, 250, 0] = INF
    v[1, :, 11] = 0.0
    vc, oc = v.cuda(), o.cuda()
    for normalize in (False, True):
        check_norms(A.value_norm(vc, oc, normalize, None), A.value_norm(v, o, normalize, None),
                    f"normalize={normalize}", dtype)
    z = torch.zeros(0, o.shape[1], dtype=o.dtype)
    assert (A.value_norm(vc, z.cuda(), False, None) == 0).all()
    assert A.value_norm(vc, z.cuda(), True, None).isnan().all()
    o2 = o.clone()
    o2[5, 3] = NAN  # a weight NaN: every token of KV head 0 (query head 0 reads column 3)
    got = A.value_norm(clean, o2.cuda(), False, None).cpu()
    assert got[:, 0].isnan().all() and not got[:, 1].isnan().any()


def test_value_norm_cuda_misaligned_views():
    B, Hk, G, N, D, hidden = 1, 2, 2, 200, 128, 256
    v, o = vn_inputs(B, Hk, G, N, D, hidden, 3, "bf16")
    vb = torch.empty(v.numel() + 3, dtype=v.dtype, device="cuda")
    ob = torch.empty(o.numel() + 1, dtype=o.dtype, device="cuda")
    vv, ov = vb[3:].view(v.shape), ob[1:].view(o.shape)
    vv.copy_(v)
    ov.copy_(o)
    check_norms(A.value_norm(vv, ov, True, None), A.value_norm(v, o, True, None), "misaligned",
                "bf16")


def test_value_norm_cuda_no_host_sync_side_stream_and_graph():
    B, Hk, G, N, D, hidden = 1, 4, 2, 700, 128, 512
    v, o = vn_inputs(B, Hk, G, N, D, hidden, 5, "bf16")
    vc, oc = v.cuda(), o.cuda()
    A.value_norm(vc, oc, True, None)  # warm-up
    A.value_norm(vc.float(), oc.float(), True, None)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            outs = [A.value_norm(vc, oc, True, N - 32), A.value_norm(vc.float(), oc.float(),
                                                                      False, None)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    check_norms(outs[0], A.value_norm(v, o, True, N - 32), "side stream bf16", "bf16")
    check_norms(outs[1], A.value_norm(v.float(), o.float(), False, None), "side stream fp32",
                "fp32")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        A.value_norm(vc, oc, True, None)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = A.value_norm(vc, oc, True, None)
    for seed in (8, 9):
        v2, o2 = vn_inputs(B, Hk, G, N, D, hidden, seed, "bf16")
        vc.copy_(v2)
        oc.copy_(o2)
        g.replay()
        torch.cuda.synchronize()
        check_norms(out, A.value_norm(v2, o2, True, None), f"graph replay {seed}", "bf16")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_value_norm_opcheck_cuda(dtype):
    v, o = vn_inputs(2, 2, 2, 90, 64, 40, 4, dtype)
    v, o = v.cuda(), o.cuda()
    torch.library.opcheck(A.value_norm.default, (v, o))
    torch.library.opcheck(A.value_norm.default, (v, o), dict(normalize=True, length=70))
    torch.library.opcheck(A.value_norm.default, (v, o, False, 0))


def test_value_norm_errors_cuda():
    v, o = vn_inputs(1, 2, 2, 20, 64, 8, 1, "bf16")
    with pytest.raises(RuntimeError, match="adakv: o_proj_weight is on cpu"):
        A.value_norm(v.cuda(), o, False, None)
    with pytest.raises(RuntimeError, match="adakv: o_proj_weight has dtype"):
        A.value_norm(v.cuda(), o.cuda().half(), False, None)
    with pytest.raises(RuntimeError, match="adakv: length must be in"):
        A.value_norm(v.cuda(), o.cuda(), False, 21)
    with pytest.raises(RuntimeError, match="adakv: value.*contiguous"):
        A.value_norm(v.cuda().transpose(2, 3).contiguous().transpose(2, 3), o.cuda(), False,
                     None)


SANITIZE_VN = [
    # B, Hk, G, N, D, hidden, dtype
    (1, 2, 2, 300, 64, 200, "bf16"),
    (2, 1, 3, 70, 128, 130, "fp16"),
    (1, 2, 1, 129, 256, 136, "bf16"),
    (2, 2, 2, 50, 24, 33, "fp32"),      # CUDA-core path
]


@pytest.mark.sanitize
@pytest.mark.parametrize("case", SANITIZE_VN, ids=[f"v{i}" for i in range(len(SANITIZE_VN))])
def test_value_norm_sanitize_small(case):
    B, Hk, G, N, D, hidden, dtype = case
    v, o = vn_inputs(B, Hk, G, N, D, hidden, seed_of("vsan", case), dtype)
    for normalize, length in ((False, None), (True, N - 7)):
        check_norms(A.value_norm(v.cuda(), o.cuda(), normalize, length),
                    A.value_norm(v, o, normalize, length), str(case), dtype)
