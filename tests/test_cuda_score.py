"""CUDA kernel of adakv::score versus the CPU kernel (the reference backend).

Both backends get the same input values; the CPU kernel computes in fp32 from them, the CUDA
kernel on tensor cores (fp16 / bf16, D in {64, 128, 256}, fp32 accumulate) or on the SIMT
path (fp32 inputs, other head dims), so the scores agree to fp32 rounding.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from conftest import HAVE_CUDA, HAVE_OPS, make_key_start, make_qkv

pytestmark = [
    pytest.mark.skipif(not HAVE_CUDA, reason="CUDA not available"),
    pytest.mark.skipif(not HAVE_OPS, reason="adakv_ops extension not built"),
]

A = torch.ops.adakv if HAVE_OPS else None

DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPTS = [  # pooling, kernel, aggregate, gqa_reduce
    ("max", 7, "mean", "mean"),
    ("avg", 5, "max", "mean"),
    ("none", 1, "mean", "max"),
    ("max", 3, "max", "max"),
    ("avg", 1, "mean", "mean"),
]


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) % 100_000


def cpu_score(q, k, ks=None, **kw):
    ks_cpu = None if ks is None else ks.cpu().clamp(0, k.shape[2])  # CUDA clamps, CPU raises
    return A.score(q.cpu(), k.cpu(), key_start=ks_cpu, **kw)


def cuda_score(q, k, ks=None, **kw):
    return A.score(q.cuda(), k.cuda(), key_start=None if ks is None else ks.cuda(), **kw)


def check(got, exp, rtol=3e-5, what=""):
    got = got.cpu()
    assert got.dtype == torch.float32 and got.shape == exp.shape, what
    assert not torch.isnan(got).any(), f"{what}: NaN in output"
    assert torch.equal(torch.isneginf(got), torch.isneginf(exp)), f"{what}: -inf pattern differs"
    fin = torch.isfinite(exp)
    assert torch.isfinite(got[fin]).all(), f"{what}: non-finite score on a valid column"
    if fin.any():
        scale = float(exp[fin].abs().max())
        torch.testing.assert_close(got[fin], exp[fin], rtol=rtol, atol=1e-6 * scale, msg=what)


def kwargs(opt, scale=None):
    pooling, kernel, aggregate, gqa = opt
    return dict(kernel_size=kernel, pooling=pooling, aggregate=aggregate, gqa_reduce=gqa,
                scale=scale)


SHAPES = [
    # B, Hq, Hk, N, W, D, padded
    (1, 32, 8, 2085, 32, 128, False),   # Llama-3.1-8B layer, odd N
    (2, 8, 2, 1000, 16, 64, True),
    (3, 4, 4, 300, 8, 64, True),        # G = 1, W = 8 (masked rows in each 16-row tile)
    (2, 12, 2, 777, 40, 128, True),     # G * Wp = 288 rows: 3 row blocks, 3 tiles per head
    (1, 8, 1, 513, 1, 256, False),      # W = 1, D = 256
    (2, 4, 2, 129, 64, 128, True),      # short prefix (L = 65)
    (2, 8, 8, 70, 5, 64, True),         # odd W, tiny N
    (1, 4, 2, 64, 64, 64, False),       # W == N: empty output
    (1, 8, 2, 333, 17, 32, True),       # D = 32: SIMT path for every dtype
    (2, 6, 3, 257, 8, 80, True),        # D = 80: SIMT path
]
IDS = ["x".join(map(str, s)) for s in SHAPES]


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_score_matches_cpu(shape, dtype):
    B, Hq, Hk, N, W, D, padded = shape
    sd = seed_of("score", shape, dtype)
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, sd, dtype=DT[dtype])
    ks = make_key_start(B, N, sd, max_pad=N // 3) if padded else None
    for i, opt in enumerate(OPTS):
        scale = 0.07 if i == 3 else None
        exp = cpu_score(q, k, ks, **kwargs(opt, scale))
        got = cuda_score(q, k, ks, **kwargs(opt, scale))
        check(got, exp, what=f"{shape} {dtype} {opt}")


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_score_key_start_edges(dtype):
    # key_start: 0, inside the prefix, == L, inside the window, == N, > N and < 0 (clamped)
    B, Hq, Hk, N, W, D = 8, 8, 2, 200, 16, 64
    L = N - W
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, seed_of("edges", dtype), dtype=DT[dtype])
    ks = torch.tensor([0, 37, 64, L, L + 5, N, N + 9, -4], dtype=torch.int32)
    for opt in OPTS:
        exp = cpu_score(q, k, ks, **kwargs(opt))
        got = cuda_score(q, k, ks, **kwargs(opt))
        check(got, exp, what=f"{dtype} {opt}")
    got = cuda_score(q, k, ks).cpu()
    for b in (3, 4, 5, 6):
        assert torch.isneginf(got[b]).all()


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_score_ignores_padding_values(dtype):
    # Padding keys and padding window queries are never used: NaN there must not leak.
    B, Hq, Hk, N, W, D = 4, 8, 2, 300, 32, 128
    L = N - W
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, seed_of("poison", dtype), dtype=DT[dtype])
    ks = torch.tensor([0, 70, L + 10, 131], dtype=torch.int32)
    qp, kp = q.clone(), k.clone()
    for b, s in enumerate(ks.tolist()):
        kp[b, :, :s] = float("nan")
        t_pad = max(0, min(W, s - L))  # window queries at positions < ks
        qp[b, :, :t_pad] = float("nan")
    for opt in OPTS:
        exp = cpu_score(q, k, ks, **kwargs(opt))
        got = cuda_score(qp, kp, ks, **kwargs(opt))
        check(got, exp, what=f"{dtype} {opt}")


@pytest.mark.parametrize("case", [
    # B, Hq, Hk, N, W, dtype, padded
    (1, 32, 8, 32768, 32, "bf16", False),
    (2, 16, 4, 16411, 32, "fp16", True),
], ids=["llama8b-32k-bf16", "b2-16k-fp16-padded"])
def test_score_long(case):
    B, Hq, Hk, N, W, dtype, padded = case
    D = 128
    sd = seed_of("long", case)
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, sd, dtype=DT[dtype])
    ks = make_key_start(B, N, sd, max_pad=N // 4) if padded else None
    exp = cpu_score(q, k, ks)
    got = cuda_score(q, k, ks)
    check(got, exp, rtol=5e-5, what=str(case))


def test_score_sharp_and_flat_attention():
    # Very peaked logits (p underflows far from the peak) and constant logits (uniform p).
    B, Hq, Hk, N, W, D = 2, 8, 2, 700, 16, 64
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 11, dtype=torch.bfloat16, q_scale=12.0)
    ks = torch.tensor([0, 33], dtype=torch.int32)
    for opt in OPTS[:3]:
        exp = cpu_score(q, k, ks, **kwargs(opt))
        check(cuda_score(q, k, ks, **kwargs(opt)), exp, what="sharp")
    kc = torch.ones_like(k)
    for opt in OPTS[:3]:
        exp = cpu_score(q, kc, ks, **kwargs(opt))
        check(cuda_score(q, kc, ks, **kwargs(opt)), exp, what="flat")


def test_score_no_host_sync_and_side_stream():
    B, Hq, Hk, N, W, D = 2, 8, 2, 513, 32, 128
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 3, dtype=torch.bfloat16)
    ks = torch.tensor([0, 40], dtype=torch.int32)
    qc, kc, ksc = q.cuda(), k.cuda(), ks.cuda()
    A.score(qc, kc, key_start=ksc)  # warm-up (lazy init, attribute setup)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            outs = [A.score(qc, kc, 7, p, "mean", "mean", ksc) for p in ("max", "avg", "none")]
            outs.append(A.score(qc.float(), kc.float(), key_start=ksc))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    for p, got in zip(("max", "avg", "none"), outs):
        check(got, cpu_score(q, k, ks, kernel_size=7, pooling=p), what=p)
    check(outs[3], cpu_score(q.float(), k.float(), ks), what="fp32")


def test_score_cuda_graph():
    B, Hq, Hk, N, W, D = 2, 8, 2, 400, 16, 64
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 21, dtype=torch.bfloat16)
    ks = torch.tensor([0, 17], dtype=torch.int32)
    qs, kst, kss = q.cuda(), k.cuda(), ks.cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        A.score(qs, kst, key_start=kss)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = A.score(qs, kst, key_start=kss)
    for seed in (22, 23):
        q2, k2, _ = make_qkv(B, Hq, Hk, N, W, D, seed, dtype=torch.bfloat16)
        ks2 = torch.tensor([0, seed], dtype=torch.int32)
        qs.copy_(q2)
        kst.copy_(k2)
        kss.copy_(ks2)
        g.replay()
        torch.cuda.synchronize()
        check(out, cpu_score(q2, k2, ks2), what=f"graph replay {seed}")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_score_opcheck_cuda(dtype):
    B, Hq, Hk, N, W, D = 2, 8, 2, 150, 16, 64
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 5, dtype=DT[dtype])
    ks = torch.tensor([0, 21], dtype=torch.int32).cuda()
    q, k = q.cuda(), k.cuda()
    torch.library.opcheck(A.score.default, (q, k), dict(kernel_size=7, pooling="max",
                          aggregate="mean", gqa_reduce="mean", key_start=ks, scale=None))
    torch.library.opcheck(A.score.default, (q, k), dict(kernel_size=5, pooling="avg",
                          aggregate="max", gqa_reduce="max", key_start=None, scale=0.1))


def test_score_errors_cuda():
    q, k, _ = make_qkv(1, 4, 2, 64, 8, 64, 1, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="device"):
        A.score(q.cuda(), k.cuda(), key_start=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="kernel_size"):
        A.score(q.cuda(), k.cuda(), kernel_size=4)


SANITIZE = [
    # B, Hq, Hk, N, W, D, dtype, key_start
    (2, 8, 2, 203, 16, 64, "bf16", [0, 50]),
    (1, 12, 2, 150, 40, 128, "fp16", [0]),     # 3 row blocks
    (2, 4, 2, 90, 8, 256, "bf16", [0, 85]),     # padding reaching the window
    (2, 4, 2, 77, 5, 24, "fp32", [0, 30]),      # SIMT path
]


@pytest.mark.sanitize
@pytest.mark.parametrize("case", SANITIZE, ids=[f"s{i}" for i in range(len(SANITIZE))])
def test_score_sanitize_small(case):
    B, Hq, Hk, N, W, D, dtype, ks = case
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, seed_of("san", case), dtype=DT[dtype])
    ks = torch.tensor(ks, dtype=torch.int32)
    for opt in (OPTS[0], OPTS[2], ("max", 41, "max", "mean")):
        check(cuda_score(q, k, ks, **kwargs(opt)), cpu_score(q, k, ks, **kwargs(opt)),
              what=f"{case} {opt}")


def test_score_misaligned_views():
    # Contiguous views at an odd element offset cannot use 16-byte async copies.
    B, Hq, Hk, N, W, D = 1, 8, 2, 190, 16, 64
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 31, dtype=torch.bfloat16)
    qb = torch.empty(q.numel() + 3, dtype=q.dtype, device="cuda")
    kb = torch.empty(k.numel() + 5, dtype=k.dtype, device="cuda")
    qv = qb[3:].view(q.shape)
    kv = kb[5:].view(k.shape)
    qv.copy_(q)
    kv.copy_(k)
    assert qv.is_contiguous() and kv.is_contiguous()
    check(A.score(qv, kv), cpu_score(q, k), what="misaligned")
