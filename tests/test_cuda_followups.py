"""CUDA kernels of the follow-up building blocks against the CPU kernels (csrc/cpu/followups.cpp)
on the same input values, the fp64 oracle (adakv_ops.reference_followups) and the torch-op
versions (adakv_ops._composite):

* defensive_score: the score kernel family's kDef passes (csrc/cuda/score.cu,
  score_kernel.cuh), tensor-core path (fp16 / bf16, D in {64, 128, 256}) and SIMT path (fp32,
  other head dims, misaligned views);
* value_norm: the tensor-core GEMM with an L1 epilogue and its CUDA-core path
  (csrc/cuda/value_norm.cu).

Every test here skips without a GPU (the module name puts them all under ``-k cuda``); the
``sanitize``-marked ones are the small cases compute-sanitizer runs (memcheck, racecheck).

Tolerances (why not tighter, why not looser):
* scores / snap_mean: the CPU kernel takes fp32 dot products in sequence, std::exp, and fp64
  sums for the prefix mass, the pooled total and the mean of R; the CUDA kernels accumulate the
  logits on tensor cores (or FFMA) in another order, use ex2.approx (2 ulp), and fp32 row sums
  merged over slots and chunks. Each probability differs by ~1e-6 relative, a row sum over up
  to N terms by ~1e-5: rtol 2e-4, with an absolute floor of 1e-6 times the largest finite value
  (scores are probabilities of size ~1/L, so a fixed absolute tolerance like 1e-3 would accept
  anything at realistic L: the floor is relative to the tensor instead).
* window_mass: masses in [0, 1] (sums of probabilities): 2e-5 absolute.
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

from conftest import HAVE_CUDA, HAVE_OPS, make_key_start, make_qkv, randn

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
# defensive_score


def cpu_def(q, k, kernel, ks=None, scale=None):
    ks_cpu = None if ks is None else ks.cpu().clamp(0, k.shape[2])  # CUDA clamps, CPU raises
    return A.defensive_score(q.cpu(), k.cpu(), kernel, ks_cpu, scale)


def cuda_def(q, k, kernel, ks=None, scale=None):
    return A.defensive_score(q.cuda(), k.cuda(), kernel, None if ks is None else ks.cuda(), scale)


def check_scores(got, exp, what, rtol=2e-4):
    got = got.cpu()
    assert got.dtype == torch.float32 and got.shape == exp.shape, what
    assert not torch.isnan(got).any(), f"{what}: NaN in output"
    assert torch.equal(torch.isneginf(got), torch.isneginf(exp)), f"{what}: -inf pattern differs"
    fin = torch.isfinite(exp)
    assert torch.isfinite(got[fin]).all(), f"{what}: non-finite value on a valid column"
    if fin.any():
        scale = float(exp[fin].abs().max())
        torch.testing.assert_close(got[fin], exp[fin], rtol=rtol, atol=1e-6 * scale,
                                   msg=lambda m: f"{what}: {m}")


def check_mass(got, exp, what, rows=None):
    got = got.cpu()
    assert got.dtype == torch.float32 and got.shape == exp.shape, what
    if rows is not None:
        got, exp = got[rows], exp[rows]
    torch.testing.assert_close(got, exp, rtol=0, atol=2e-5, msg=lambda m: f"{what}: {m}")


def check_defensive(got, exp, what):
    check_scores(got[0], exp[0], f"{what} scores")
    check_scores(got[1], exp[1], f"{what} snap_mean")
    check_mass(got[2], exp[2], f"{what} window_mass")


def key_start_for(kind, B, N, W, seed):
    """none; mixed (random left padding); edge: [0, inside the window, N, ...]; at_L: ks = L
    (no valid prefix, full window) and ks = L - 1 (one valid prefix token); wild: values
    outside [0, N] (clamped on CUDA)."""
    L = N - W
    if kind == "none":
        return None
    if kind == "mixed":
        return make_key_start(B, N, seed, max_pad=max(1, L // 2))
    if kind == "edge":
        return torch.tensor([0, min(L + 1, N), N, L // 3][:B], dtype=torch.int32)
    if kind == "at_L":
        return torch.tensor([L, max(L - 1, 0), 0][:B], dtype=torch.int32)
    if kind == "wild":
        return torch.tensor([N + 9, -4, 3][:B], dtype=torch.int32)
    raise ValueError(kind)


DEF_SHAPES = [
    # B, Hq, Hk, N, W, D, key_start kind
    (1, 32, 8, 2085, 32, 128, "none"),    # Llama-3.1-8B layer, odd N
    (2, 8, 2, 1000, 16, 64, "mixed"),     # G = 4
    (3, 4, 4, 300, 8, 64, "edge"),        # G = 1, W = 8 (half of each 16-row tile padding)
    (2, 8, 2, 777, 40, 128, "mixed"),     # G = 4, Wp = 48: 192 rows, 2 row blocks
    (2, 14, 2, 500, 16, 128, "mixed"),    # G = 7
    (1, 14, 2, 301, 40, 128, "none"),     # G = 7, W = 40: 336 rows; SIMT (shared memory)
    (1, 8, 1, 513, 1, 256, "none"),       # W = 1, D = 256
    (2, 4, 2, 120, 64, 128, "at_L"),      # W > N - W (L = 56)
    (2, 8, 8, 70, 5, 64, "mixed"),        # odd W, tiny N
    (3, 4, 2, 90, 40, 64, "wild"),        # key_start outside [0, N]
    (1, 4, 2, 64, 64, 64, "none"),        # N == W: no prefix
    (2, 4, 2, 37, 33, 128, "mixed"),      # L = 4 < radius of the wider kernels: whole prefix
    (1, 8, 2, 333, 17, 32, "mixed"),      # D = 32: SIMT path for every dtype
    (2, 6, 3, 257, 8, 80, "edge"),        # D = 80: SIMT path
    (2, 4, 2, 100, 8, 8, "at_L"),         # D = 8: SIMT path
]
DEF_IDS = ["x".join(map(str, s)) for s in DEF_SHAPES]
KERNELS = [5, 1, 3, 7, 33]  # 5: the authors'; 33: the largest halo (radius 16)


@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("shape", DEF_SHAPES, ids=DEF_IDS)
def test_defensive_score_cuda_matches_cpu(shape, dtype):
    B, Hq, Hk, N, W, D, kind = shape
    sd = seed_of("def", shape, dtype)
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, sd, dtype=DT[dtype])
    ks = key_start_for(kind, B, N, W, sd)
    for kernel in KERNELS:
        scale = 0.07 if kernel == 3 else None
        exp = cpu_def(q, k, kernel, ks, scale)
        got = cuda_def(q, k, kernel, ks, scale)
        check_defensive(got, exp, f"{shape} {dtype} kernel={kernel}")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_defensive_score_cuda_matches_oracle_and_composite(dtype):
    """Against the fp64 expectation of tests/test_followup_ops.py and the torch-op version on
    CUDA tensors (a second, independent implementation)."""
    from test_followup_ops import expected_defensive
    from adakv_ops import _composite

    B, Hq, Hk, N, W, D = 3, 8, 2, 260, 16, 64
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 41, dtype=DT[dtype])
    ks = torch.tensor([0, 37, N - W - 1], dtype=torch.int32)
    got = cuda_def(q, k, 5, ks)
    e_scores, e_snap, e_mass = expected_defensive(q, k, 5, ks)
    check_scores(got[0], e_scores.float(), "scores vs fp64", rtol=5e-4)
    check_scores(got[1], e_snap.float(), "snap_mean vs fp64", rtol=5e-4)
    check_mass(got[2], e_mass.float(), "window_mass vs fp64")
    comp = _composite.defensive_score(q.cuda(), k.cuda(), 5, ks.cuda(), None)
    for g, c, n in zip(got, comp, ("scores", "snap_mean", "window_mass")):
        torch.testing.assert_close(g.cpu(), c.cpu(), rtol=5e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_defensive_score_cuda_snap_is_the_score_mean(dtype):
    """snap_mean is score(pooling="none", mean, mean) (bit for bit on the CPU; on CUDA the two
    kernels fold the rows in different orders: fp32-close)."""
    B, Hq, Hk, N, W, D = 2, 8, 2, 700, 32, 128
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 5, dtype=DT[dtype])
    ks = torch.tensor([0, 99], dtype=torch.int32).cuda()
    _, snap, _ = A.defensive_score(q.cuda(), k.cuda(), 5, ks, None)
    want = A.score(q.cuda(), k.cuda(), 1, "none", "mean", "mean", ks, None)
    check_scores(snap, want.cpu(), "snap vs score", rtol=5e-5)


@pytest.mark.parametrize("kernel", [41, 43, 2**31 - 1, 2**63 - 1, 31])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_defensive_score_cuda_huge_kernels(kernel, dtype):
    """Kernels at least as wide as the prefix (every window covers it: pool_whole) and radius
    15 on L = 20, on both paths."""
    B, Hq, Hk, N, W, D = 2, 4, 2, 52, 32, 64
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 91, dtype=DT[dtype])
    ks = torch.tensor([0, 6], dtype=torch.int32)
    check_defensive(cuda_def(q, k, kernel, ks), cpu_def(q, k, kernel, ks), f"kernel={kernel}")


def test_defensive_score_cuda_unsupported_radius_and_fallback():
    """A radius in (16, L - 1) has no CUDA kernel: the op says so; adakv_ops.defensive_score
    runs the torch-op version instead (same results as the CPU kernel)."""
    import adakv_ops

    B, Hq, Hk, N, W, D = 2, 4, 2, 300, 16, 64
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 17, dtype=torch.bfloat16)
    ks = torch.tensor([0, 40], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"adakv: defensive_score is not implemented for CUDA "
                                           r"with kernel_size = 35"):
        cuda_def(q, k, 35, ks)
    got = adakv_ops.defensive_score(q.cuda(), k.cuda(), 35, ks.cuda())
    check_defensive(got, cpu_def(q, k, 35, ks), "fallback kernel=35")
    got = adakv_ops.defensive_score(q.cuda(), k.cuda(), 33, ks.cuda())  # native
    check_defensive(got, cpu_def(q, k, 33, ks), "native kernel=33")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_defensive_score_cuda_ignores_padding_values(dtype):
    """Padding keys and padding window queries are never used: NaN there must not leak."""
    B, Hq, Hk, N, W, D = 4, 8, 2, 300, 32, 128
    L = N - W
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, seed_of("poison", dtype), dtype=DT[dtype])
    ks = torch.tensor([0, 70, L + 10, 131], dtype=torch.int32)
    qp, kp = q.clone(), k.clone()
    for b, s in enumerate(ks.tolist()):
        kp[b, :, :s] = NAN
        t_pad = max(0, min(W, s - L))  # window queries at positions < ks
        qp[b, :, :t_pad] = NAN
    check_defensive(cuda_def(qp, kp, 5, ks), cpu_def(q, k, 5, ks), "poisoned padding")


@pytest.mark.parametrize("where", ["q_nan", "k_nan", "k_inf", "q_inf"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_defensive_score_cuda_nonfinite_inputs(where, dtype):
    """SPEC 9 rule of the score family (docs/semantics.md): with non-finite q_window / key the
    CUDA outputs of the affected (batch row, KV head) pairs, and the window masses of the
    affected batch rows, are unspecified (no fault, nothing out of bounds); every other row is
    exact."""
    B, Hq, Hk, N, W, D = 2, 8, 4, 200, 16, 64
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 23, dtype=DT[dtype])
    bad_b, bad_h = 1, 2
    if where == "q_nan":
        q[bad_b, bad_h * 2, 3, 5] = NAN
    elif where == "q_inf":
        q[bad_b, bad_h * 2 + 1, 0, 0] = INF
    elif where == "k_nan":
        k[bad_b, bad_h, 17, 0] = NAN
    else:
        k[bad_b, bad_h, N - 3, 2] = INF
    ks = torch.tensor([0, 9], dtype=torch.int32)
    got = cuda_def(q, k, 5, ks)
    torch.cuda.synchronize()
    exp = cpu_def(q, k, 5, ks)
    ok = torch.ones(B, Hk, dtype=torch.bool)
    ok[bad_b, bad_h] = False
    check_scores(got[0][ok], exp[0][ok], f"{where} scores (unaffected rows)")
    check_scores(got[1][ok], exp[1][ok], f"{where} snap_mean (unaffected rows)")
    check_mass(got[2], exp[2], f"{where} window_mass (unaffected batch row)", rows=[0])


def test_defensive_score_cuda_sharp_and_flat_attention():
    """Very peaked logits (prefix mass that underflows for some rows, where the pooled row sums
    to 0 and contributes 0: D7) and constant keys (uniform probabilities)."""
    B, Hq, Hk, N, W, D = 2, 8, 2, 700, 16, 64
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 11, dtype=torch.bfloat16, q_scale=12.0)
    ks = torch.tensor([0, 33], dtype=torch.int32)
    check_defensive(cuda_def(q, k, 5, ks), cpu_def(q, k, 5, ks), "sharp")
    kc = torch.ones_like(k)
    check_defensive(cuda_def(q, kc, 5, ks), cpu_def(q, kc, 5, ks), "flat")


@pytest.mark.parametrize("case", [
    # B, Hq, Hk, N, W, dtype, padded
    (1, 32, 8, 32768, 32, "bf16", False),
    (2, 16, 4, 16411, 32, "fp16", True),
], ids=["llama8b-32k-bf16", "b2-16k-fp16-padded"])
def test_defensive_score_cuda_long(case):
    B, Hq, Hk, N, W, dtype, padded = case
    D = 128
    sd = seed_of("long", case)
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, sd, dtype=DT[dtype])
    ks = make_key_start(B, N, sd, max_pad=N // 4) if padded else None
    check_defensive(cuda_def(q, k, 5, ks), cpu_def(q, k, 5, ks), str(case))


def test_defensive_score_cuda_empty():
    q, k, _ = make_qkv(0, 4, 2, 20, 4, 64, 3, dtype=torch.bfloat16)
    s, m, wm = cuda_def(q, k, 5)
    assert s.shape == (0, 2, 16) and m.shape == (0, 2, 16) and wm.shape == (0, 2)
    q, k, _ = make_qkv(2, 4, 2, 6, 6, 64, 3, dtype=torch.bfloat16)  # W == N
    s, m, wm = cuda_def(q, k, 5)
    assert s.shape == (2, 2, 0) and wm.cpu().tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_defensive_score_cuda_misaligned_views():
    """Contiguous views at an odd element offset cannot use 16-byte async copies: SIMT path."""
    B, Hq, Hk, N, W, D = 1, 8, 2, 190, 16, 64
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 31, dtype=torch.bfloat16)
    qb = torch.empty(q.numel() + 3, dtype=q.dtype, device="cuda")
    kb = torch.empty(k.numel() + 5, dtype=k.dtype, device="cuda")
    qv, kv = qb[3:].view(q.shape), kb[5:].view(k.shape)
    qv.copy_(q)
    kv.copy_(k)
    assert qv.is_contiguous() and kv.is_contiguous()
    check_defensive(A.defensive_score(qv, kv, 5, None, None), cpu_def(q, k, 5), "misaligned")


def test_defensive_score_cuda_no_host_sync_side_stream_and_graph():
    B, Hq, Hk, N, W, D = 2, 8, 2, 513, 32, 128
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 3, dtype=torch.bfloat16)
    ks = torch.tensor([0, 40], dtype=torch.int32)
    qc, kc, ksc = q.cuda(), k.cuda(), ks.cuda()
    A.defensive_score(qc, kc, 5, ksc, None)  # warm-up (lazy init, attribute setup)
    A.defensive_score(qc.float(), kc.float(), 5, ksc, None)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            outs = [A.defensive_score(qc, kc, 5, ksc, None),
                    A.defensive_score(qc.float(), kc.float(), 5, ksc, None)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    check_defensive(outs[0], cpu_def(q, k, 5, ks), "side stream bf16")
    check_defensive(outs[1], cpu_def(q.float(), k.float(), 5, ks), "side stream fp32")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        A.defensive_score(qc, kc, 5, ksc, None)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = A.defensive_score(qc, kc, 5, ksc, None)
    for seed in (22, 23):
        q2, k2, _ = make_qkv(B, Hq, Hk, N, W, D, seed, dtype=torch.bfloat16)
        ks2 = torch.tensor([0, seed], dtype=torch.int32)
        qc.copy_(q2)
        kc.copy_(k2)
        ksc.copy_(ks2)
        g.replay()
        torch.cuda.synchronize()
        check_defensive(out, cpu_def(q2, k2, 5, ks2), f"graph replay {seed}")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_defensive_score_opcheck_cuda(dtype):
    B, Hq, Hk, N, W, D = 2, 8, 2, 150, 16, 64
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 5, dtype=DT[dtype])
    ks = torch.tensor([0, 21], dtype=torch.int32).cuda()
    q, k = q.cuda(), k.cuda()
    torch.library.opcheck(A.defensive_score.default, (q, k),
                          dict(kernel_size=5, key_start=ks, scale=None))
    torch.library.opcheck(A.defensive_score.default, (q, k, 3, None, 0.1))


def test_defensive_score_errors_cuda():
    q, k, _ = make_qkv(1, 4, 2, 64, 8, 64, 1, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="adakv: key_start is on cpu"):
        A.defensive_score(q.cuda(), k.cuda(), 5, torch.zeros(1, dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match="adakv: key is on cpu"):
        A.defensive_score(q.cuda(), k, 5, None, None)
    with pytest.raises(RuntimeError, match="adakv: .*kernel_size"):
        A.defensive_score(q.cuda(), k.cuda(), 4, None, None)
    with pytest.raises(RuntimeError, match="adakv: key has dtype"):
        A.defensive_score(q.cuda(), k.cuda().half(), 5, None, None)
    with pytest.raises(RuntimeError, match="adakv: key .*contiguous"):
        A.defensive_score(q.cuda(), k.cuda().transpose(2, 3).contiguous().transpose(2, 3), 5,
                          None, None)


SANITIZE_DEF = [
    # B, Hq, Hk, N, W, D, dtype, key_start, kernel
    (2, 8, 2, 203, 16, 64, "bf16", [0, 50], 5),
    (1, 8, 2, 150, 40, 128, "fp16", [0], 5),        # 2 row blocks, D = 128 (Q from smem)
    (2, 4, 2, 90, 8, 256, "bf16", [0, 85], 33),     # radius 16, padding reaching the window
    (2, 4, 2, 40, 20, 64, "bf16", [0, 3], 63),      # pool_whole
    (2, 4, 2, 77, 5, 24, "fp32", [0, 30], 5),       # SIMT path
    (2, 4, 2, 77, 5, 24, "fp32", [0, 30], 33),      # SIMT path, radius 16
]


@pytest.mark.sanitize
@pytest.mark.parametrize("case", SANITIZE_DEF, ids=[f"d{i}" for i in range(len(SANITIZE_DEF))])
def test_defensive_score_sanitize_small(case):
    B, Hq, Hk, N, W, D, dtype, ks, kernel = case
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, seed_of("san", case), dtype=DT[dtype])
    ks = torch.tensor(ks, dtype=torch.int32)
    check_defensive(cuda_def(q, k, kernel, ks), cpu_def(q, k, kernel, ks), str(case))


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
