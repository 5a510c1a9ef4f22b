"""CUDA decode_attention / decode_attention_lse against the CPU op (the reference backend).

Covers: random segment lengths including 0 and == capacity, GQA groups 1/4/8, batch 1/3,
T 1/3 (and up to 8, more query blocks than one CTA), head dims 64/128/256 (tensor-core path)
and 8/16/32 (CUDA-core path), fp32/fp16/bf16, lse, custom scale, the split-K path (few long
segments) and the single-split path (many short segments), long segments (32K), rows past
seg_len poisoned with NaN (never read), out-of-range metadata (clamped on CUDA), opcheck,
no host sync, CUDA-graph capture + replay after in-place cache updates, and clear errors for
unsupported shapes.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from conftest import assert_equal, gen, rel_err, requires_ops, set_decode_schedule

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
    requires_ops,
]

A = torch.ops.adakv if hasattr(torch.ops, "adakv") else None


@pytest.fixture(autouse=True, params=["split", "balanced"])
def decode_path(request, monkeypatch):
    """Every test of this module runs on both schedules of the decode kernel family: the split
    kernel (ADAKV_DECODE_BALANCED=0, whatever the shapes) and the work-balanced kernel
    (ADAKV_DECODE_BALANCED=1: wherever it can run, i.e. fp16 / bf16, D in {64, 128, 256},
    G * T <= 16, at most 2048 segments; the other shapes fall back to the split kernel)."""
    monkeypatch.setenv("ADAKV_DECODE_BALANCED", "0" if request.param == "split" else "1")
    return request.param
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["fp32", "fp16", "bf16"]


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) % 100_000


# ----------------------------------------------------------------------------------------------
# inputs


def flat_cache(caps, lens, D, dtype, seed, extra_rows=5, order=None, gap=0):
    """Flat cache with segment capacities ``caps`` and lengths ``lens`` (CPU tensors).

    Rows past each segment's length (and the spare rows at the end, which belong to the last
    segment by position) hold NaN: they must never be read. ``order`` lays the segments out in
    memory in that order (default: ascending), ``gap`` rows of NaN between consecutive blocks.
    """
    caps = torch.as_tensor(caps, dtype=torch.long)
    lens = torch.as_tensor(lens, dtype=torch.long)
    S = caps.numel()
    order = list(range(S)) if order is None else list(order)
    st = torch.zeros(S, dtype=torch.long)
    pos = 0
    for s in order:
        st[s] = pos
        pos += int(caps[s]) + gap
    rows = pos + extra_rows
    g = gen(seed)
    kf = torch.full((rows, D), float("nan"))
    vf = torch.full((rows, D), float("nan"))
    for s in range(S):
        a, n = int(st[s]), int(lens[s])
        kf[a : a + n] = torch.randn(n, D, generator=g)
        vf[a : a + n] = torch.randn(n, D, generator=g)
    return kf.to(dtype), vf.to(dtype), st.int(), lens.int()


def random_lens(caps, T, g):
    """Random lengths in [0, cap]; first segment empty, last full, second shorter than T."""
    caps = torch.as_tensor(caps, dtype=torch.long)
    lens = (torch.rand(caps.numel(), generator=g, dtype=torch.float64) * (caps + 1)).long()
    lens = lens.clamp(max=caps)
    lens[0] = 0
    lens[-1] = caps[-1]
    if caps.numel() > 2:
        lens[1] = min(int(caps[1]), max(T - 1, 1))
    return lens


def make_case(B, Hq, Hk, T, D, dtype, seed, cap_lo=None, cap_hi=300, q_scale=2.0, **kw):
    g = gen(seed)
    S = B * Hk
    cap_lo = T if cap_lo is None else cap_lo
    caps = torch.randint(cap_lo, cap_hi + 1, (S,), generator=g)
    lens = random_lens(caps, T, g)
    kf, vf, st, ln = flat_cache(caps, lens, D, dtype, seed + 1, **kw)
    q = (torch.randn((B, Hq, T, D), generator=g) * q_scale).to(dtype)
    return q, kf, vf, st, ln


def cuda(*ts):
    return tuple(t.cuda() for t in ts)


def cpu_ref(q, kf, vf, st, ln, scale=None):
    return A.decode_attention_lse(q.cpu(), kf.cpu(), vf.cpu(), st.cpu(), ln.cpu(), scale)


def check(out, lse, exp_out, exp_lse, dtype, fp32_tol=1e-5):
    out, lse = out.cpu(), lse.cpu()
    assert out.dtype == dtype and tuple(out.shape) == tuple(exp_out.shape)
    assert lse.dtype == torch.float32 and tuple(lse.shape) == tuple(exp_lse.shape)
    assert torch.isfinite(out).all(), "non-finite output (poisoned row read?)"
    empty = torch.isneginf(exp_lse)
    assert torch.equal(torch.isneginf(lse), empty), "empty rows differ"
    assert (out[empty] == 0).all(), "rows without visible keys must be 0"
    tol = fp32_tol if dtype == torch.float32 else 1e-2
    assert rel_err(out, exp_out) < tol
    # per query row too, so that one wrong row cannot hide in the global norm
    o, e = out.double().flatten(0, 2), exp_out.double().flatten(0, 2)
    row_err = (o - e).norm(dim=-1) / e.norm(dim=-1).clamp_min(1e-3)
    assert row_err.max().item() < 5 * tol, f"worst row error {row_err.max().item():.3g}"
    fin = ~empty
    torch.testing.assert_close(lse[fin], exp_lse[fin], rtol=1e-5,
                               atol=1e-5 if dtype == torch.float32 else 1e-4)


def run_and_check(q, kf, vf, st, ln, dtype, scale=None, fp32_tol=1e-5):
    exp_out, exp_lse = cpu_ref(q, kf, vf, st, ln, scale)
    args = cuda(q, kf, vf, st, ln)
    out = A.decode_attention(*args, scale)
    out2, lse = A.decode_attention_lse(*args, scale)
    check(out2, lse, exp_out, exp_lse, dtype, fp32_tol)
    assert_equal(out, out2, "decode_attention vs decode_attention_lse")
    assert_equal(args[1].cpu(), kf, "k_flat untouched")
    assert_equal(args[4].cpu(), ln, "seg_len untouched")
    return out2, lse


# ----------------------------------------------------------------------------------------------
# correctness vs the CPU op


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("B", [1, 3])
def test_decode_matches_cpu(B, G, T, D, dtype):
    Hk = 2
    sd = seed_of("cuda_decode", B, G, T, D, str(dtype))
    q, kf, vf, st, ln = make_case(B, G * Hk, Hk, T, D, dtype, sd)
    run_and_check(q, kf, vf, st, ln, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_decode_custom_scale(D, dtype):
    sd = seed_of("cuda_decode_scale", D, str(dtype))
    q, kf, vf, st, ln = make_case(2, 8, 2, 2, D, dtype, sd, q_scale=1.0)
    for scale in (0.37, 1.0 / 64, 0.0):
        run_and_check(q, kf, vf, st, ln, dtype, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("G,T", [(4, 8), (8, 5), (16, 1), (2, 16)])
def test_decode_many_query_rows(G, T, dtype):
    """G * T > 16: the query rows of one KV head span several CTAs."""
    sd = seed_of("cuda_decode_rows", G, T, str(dtype))
    q, kf, vf, st, ln = make_case(2, 2 * G, 2, T, 128, dtype, sd)
    run_and_check(q, kf, vf, st, ln, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [8, 16, 32])
def test_decode_small_head_dims(D, dtype):
    sd = seed_of("cuda_decode_small", D, str(dtype))
    q, kf, vf, st, ln = make_case(3, 8, 2, 3, D, dtype, sd)
    run_and_check(q, kf, vf, st, ln, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_decode_single_split_many_segments(dtype):
    """Many short segments (batch 64, Llama-8B heads): one split, no merge kernel."""
    sd = seed_of("cuda_decode_nosplit", str(dtype))
    q, kf, vf, st, ln = make_case(64, 32, 8, 1, 128, dtype, sd, cap_lo=1, cap_hi=60)
    run_and_check(q, kf, vf, st, ln, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("T", [1, 3])
def test_decode_long_segments(T, dtype):
    """32K-token segments (batch 1, Llama-8B heads): many splits merged by log-sum-exp."""
    sd = seed_of("cuda_decode_long", T, str(dtype))
    g = gen(sd)
    caps = torch.tensor([32768 + 64, 32768, 20000, 64, 32768, 1, 17, 31000])
    lens = torch.tensor([32768, 32768, 1234, 0, 32767, 1, 17, 30001])
    kf, vf, st, ln = flat_cache(caps, lens, 128, dtype, sd)
    q = (torch.randn((1, 32, T, 128), generator=g) * 2).to(dtype)
    # fp32: the CPU reference accumulates 32K rows serially in fp32 (its own error ~1e-5 * sqrt
    # of the length); measured GPU-vs-CPU error on an H100 was 7.3e-5.
    run_and_check(q, kf, vf, st, ln, dtype, scale=None if T == 1 else 0.3, fp32_tol=2e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_segments_out_of_order_with_gaps(dtype):
    sd = seed_of("cuda_decode_order", str(dtype))
    g = gen(sd)
    S = 6
    caps = torch.randint(3, 200, (S,), generator=g)
    lens = random_lens(caps, 2, g)
    kf, vf, st, ln = flat_cache(caps, lens, 64, dtype, sd, order=[4, 1, 5, 0, 3, 2], gap=7)
    q = (torch.randn((2, 12, 2, 64), generator=g) * 2).to(dtype)
    run_and_check(q, kf, vf, st, ln, dtype)


# Split-count / merge-path overrides (read by the CUDA launcher on every call): splits 1 (no
# merge), 2..16 (sm_90: one thread-block cluster per query block, merged in distributed shared
# memory; elsewhere the two-launch merge), 20 and 40 (more than a cluster: two-launch merge), and
# ADAKV_DECODE_CLUSTER=0 (two-launch merge at any split count).
SPLIT_CASES = [("auto", "1"), ("1", "1"), ("2", "1"), ("3", "1"), ("5", "1"), ("8", "1"),
               ("16", "1"), ("20", "1"), ("40", "1"), ("auto", "0"), ("4", "0")]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("splits,cluster", SPLIT_CASES,
                         ids=[f"s{a}-c{b}" for a, b in SPLIT_CASES])
def test_decode_split_counts(monkeypatch, splits, cluster, dtype):
    """Every split count / merge path gives the CPU result: batch 2, G 4, T 2, segments of
    length 0, 1 (< T), short, longer than the splits, full; more splits than keys."""
    set_decode_schedule(monkeypatch, splits, cluster)
    sd = seed_of("cuda_decode_splits", splits, cluster, str(dtype))
    q, kf, vf, st, ln = make_case(2, 16, 4, 2, 128, dtype, sd, cap_hi=900)
    run_and_check(q, kf, vf, st, ln, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("D", [16, 64, 256])
@pytest.mark.parametrize("G,T", [(4, 1), (8, 3)])
@pytest.mark.parametrize("splits", ["3", "16"])
def test_decode_cluster_merge_shapes(monkeypatch, splits, G, T, D, dtype):
    """The in-launch (cluster) merge over head dims, dtypes, T > 1 and G * T > 16 (several
    query blocks per segment, each its own cluster)."""
    set_decode_schedule(monkeypatch, splits, "1")
    sd = seed_of("cuda_decode_cluster", splits, G, T, D, str(dtype))
    q, kf, vf, st, ln = make_case(3, 2 * G, 2, T, D, dtype, sd, cap_hi=500)
    run_and_check(q, kf, vf, st, ln, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_decode_b1_llama_skewed(dtype):
    """The batch-1 benchmark regime with the default split choice: Llama-3.1-8B heads, Ada-like
    skewed lengths (one head ~2.8K, others a few hundred), capacity with reserve."""
    sd = seed_of("cuda_decode_b1", str(dtype))
    g = gen(sd)
    lens = torch.tensor([2855, 300, 410, 1500, 260, 980, 700, 1443])
    caps = lens + 64
    kf, vf, st, ln = flat_cache(caps, lens, 128, dtype, sd)
    q = (torch.randn((1, 32, 1, 128), generator=g) * 2).to(dtype)
    run_and_check(q, kf, vf, st, ln, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("T", [1, 3])
def test_decode_batch64_skewed(T, dtype):
    """The batch-64 serving regime (512 segments of Llama-3.1-8B heads, Ada-skewed lengths
    from 0 to ~1200 keys, G 4): the balanced schedule cuts segments across warps at tile
    boundaries and merges the pieces."""
    sd = seed_of("cuda_decode_b64", T, str(dtype))
    q, kf, vf, st, ln = make_case(64, 32, 8, T, 128, dtype, sd, cap_lo=1, cap_hi=1200)
    run_and_check(q, kf, vf, st, ln, dtype)


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 64), (torch.float16, 128),
                                     (torch.bfloat16, 256)], ids=["bf16-64", "fp16-128", "bf16-256"])
def test_decode_fewer_tiles_than_warps(dtype, D):
    """160 segments of at most 20 keys: fewer key tiles than warps in the balanced grid, so
    many warps hold no tile (and write no piece): the merge must skip them."""
    sd = seed_of("cuda_decode_fewtiles", str(dtype), D)
    q, kf, vf, st, ln = make_case(40, 16, 4, 1, D, dtype, sd, cap_lo=1, cap_hi=20)
    run_and_check(q, kf, vf, st, ln, dtype)


@pytest.mark.parametrize("B,Hk", [(256, 8), (683, 3)], ids=["S2048", "S2049"])
def test_decode_segment_count_limit(B, Hk):
    """2048 segments (the balanced kernel's limit) and 2049 (the split kernel takes over)."""
    sd = seed_of("cuda_decode_seglimit", B, Hk)
    q, kf, vf, st, ln = make_case(B, 2 * Hk, Hk, 1, 64, torch.bfloat16, sd, cap_lo=1, cap_hi=40)
    run_and_check(q, kf, vf, st, ln, torch.bfloat16)


def test_decode_nan_key_poisons_only_its_segment():
    """A NaN in a visible key row makes that segment's rows NaN (out and lse: SPEC 9, never
    "empty"), wherever the segment's pieces were cut; every other row is unaffected."""
    sd = seed_of("cuda_decode_nan_many")
    B, Hk, G, D = 40, 4, 4, 128
    q, kf, vf, st, ln = make_case(B, G * Hk, Hk, 1, D, torch.bfloat16, sd, cap_lo=40, cap_hi=400)
    s_bad = int((ln >= 10).nonzero()[7])                  # a segment with visible keys
    kf[int(st[s_bad]) + int(ln[s_bad]) // 2, 3] = float("nan")
    out, lse = A.decode_attention_lse(*cuda(q, kf, vf, st, ln))
    out, lse = out.cpu(), lse.cpu()
    b, h = divmod(s_bad, Hk)
    bad = torch.zeros(B, G * Hk, dtype=torch.bool)
    bad[b, h * G:(h + 1) * G] = True
    assert torch.isnan(lse[bad]).all() and torch.isnan(out[bad]).all()
    assert not torch.isnan(lse[~bad]).any() and not torch.isnan(out[~bad]).any()
    kf2 = kf.clone()
    kf2[int(st[s_bad]) + int(ln[s_bad]) // 2, 3] = 0.0
    exp_out, exp_lse = cpu_ref(q, kf2, vf, st, ln)
    torch.testing.assert_close(lse[~bad], exp_lse[~bad], rtol=1e-5, atol=1e-4)


@pytest.mark.sanitize
@pytest.mark.parametrize("dtype,D,T", [(torch.bfloat16, 128, 1), (torch.float16, 64, 3),
                                       (torch.bfloat16, 256, 2)],
                         ids=["bf16-128-T1", "fp16-64-T3", "bf16-256-T2"])
def test_decode_sanitize_balanced(monkeypatch, dtype, D, T):
    """Sanitizer cases of the balanced schedule: segments cut across warps, empty segments,
    empty warps, T > 1."""
    monkeypatch.setenv("ADAKV_DECODE_BALANCED", "1")
    sd = seed_of("cuda_decode_san_bal", str(dtype), D, T)
    q, kf, vf, st, ln = make_case(6, 8, 2, T, D, dtype, sd, cap_hi=500)
    run_and_check(q, kf, vf, st, ln, dtype)


@pytest.mark.sanitize
@pytest.mark.parametrize("splits,cluster", [("4", "1"), ("16", "1"), ("4", "0")],
                         ids=["cluster4", "cluster16", "twolaunch4"])
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float32, 64)],
                         ids=["bf16-128", "fp32-64"])
def test_decode_sanitize_merge_paths(monkeypatch, splits, cluster, dtype, D):
    """Sanitizer cases for both merge paths (cluster / distributed shared memory and the
    two-launch workspace merge), T 3, empty and full segments."""
    set_decode_schedule(monkeypatch, splits, cluster)
    sd = seed_of("cuda_decode_san_merge", splits, cluster, str(dtype), D)
    q, kf, vf, st, ln = make_case(1, 8, 2, 3, D, dtype, sd, cap_hi=300)
    run_and_check(q, kf, vf, st, ln, dtype)


@pytest.mark.sanitize
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 64), (torch.float16, 256),
                                     (torch.float32, 128), (torch.bfloat16, 16)],
                         ids=["bf16-64", "fp16-256", "fp32-128", "bf16-16"])
@pytest.mark.parametrize("cap_hi", [40, 700], ids=["short", "split"])
def test_decode_sanitize_small(dtype, D, cap_hi):
    """Small cases for compute-sanitizer (memcheck / racecheck): both the single-split and the
    split + merge paths, empty / full / shorter-than-T segments, NaN-poisoned spare rows."""
    sd = seed_of("cuda_decode_san", str(dtype), D, cap_hi)
    q, kf, vf, st, ln = make_case(1, 8, 2, 3, D, dtype, sd, cap_hi=cap_hi)
    run_and_check(q, kf, vf, st, ln, dtype)


@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_out_of_range_metadata_is_clamped(dtype):
    """seg_start / seg_len outside the cache: CUDA clamps (no host sync to raise), reads
    nothing outside [0, rows) and matches the CPU op on the clamped metadata."""
    sd = seed_of("cuda_decode_clamp", str(dtype))
    caps = [30, 50, 40, 20]
    kf, vf, st, ln = flat_cache(caps, [30, 50, 40, 20], 64, dtype, sd, extra_rows=0)
    rows = kf.shape[0]
    st_bad = st.clone()
    ln_bad = ln.clone()
    st_bad[0] = -7  # -> 0
    ln_bad[1] = 10**6  # -> rows - st[1]
    ln_bad[2] = -3  # -> 0
    st_bad[3] = rows + 100  # -> rows, length 0
    st_ok = st_bad.clamp(0, rows)
    ln_ok = torch.minimum(ln_bad.clamp(min=0), rows - st_ok).int()
    kf = torch.nan_to_num(kf, nan=0.5)  # every row may now be read legitimately
    vf = torch.nan_to_num(vf, nan=-0.5)
    q = (torch.randn((2, 4, 1, 64), generator=gen(sd)) * 2).to(dtype)
    exp_out, exp_lse = cpu_ref(q, kf, vf, st_ok.int(), ln_ok)
    out, lse = A.decode_attention_lse(*cuda(q, kf, vf, st_bad.int(), ln_bad.int()))
    check(out, lse, exp_out, exp_lse, dtype)


def test_decode_zero_query_heads():
    q = torch.empty((2, 0, 1, 64), device="cuda")
    kf, vf, st, ln = cuda(*flat_cache([4, 4], [2, 3], 64, torch.float32, 1))
    out, lse = A.decode_attention_lse(q, kf, vf, st, ln)
    assert out.shape == (2, 0, 1, 64) and lse.shape == (2, 0, 1)


# ----------------------------------------------------------------------------------------------
# errors


def test_decode_unsupported_head_dim_raises():
    q, kf, vf, st, ln = cuda(*make_case(1, 4, 2, 1, 80, torch.bfloat16, 3))
    with pytest.raises(RuntimeError, match="not implemented for CUDA"):
        A.decode_attention(q, kf, vf, st, ln)
    with pytest.raises(RuntimeError, match="not implemented for CUDA"):
        A.decode_attention_lse(q, kf, vf, st, ln)


def test_decode_misaligned_view_raises():
    q, kf, vf, st, ln = cuda(*make_case(1, 4, 2, 1, 64, torch.bfloat16, 4))
    flat = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")
    q_odd = flat[1:].view(q.shape)  # contiguous, 2-byte aligned only
    q_odd.copy_(q)
    with pytest.raises(RuntimeError, match="not implemented for CUDA"):
        A.decode_attention(q_odd, kf, vf, st, ln)


# ----------------------------------------------------------------------------------------------
# opcheck, host sync, CUDA graphs


OPCHECK_CASES = [
    # B, Hq, Hk, T, D, dtype, cap_hi
    (1, 8, 2, 1, 64, torch.bfloat16, 600),  # split path
    (3, 4, 4, 3, 128, torch.float32, 50),
    (2, 16, 2, 2, 256, torch.float16, 80),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=["bf16-split", "fp32-T3", "fp16-d256"])
def test_decode_opcheck_cuda(case):
    B, Hq, Hk, T, D, dtype, cap_hi = case
    q, kf, vf, st, ln = cuda(*make_case(B, Hq, Hk, T, D, dtype, 11, cap_hi=cap_hi))
    for scale in (None, 0.3):
        torch.library.opcheck(A.decode_attention.default, (q, kf, vf, st, ln, scale),
                              raise_exception=True)
        torch.library.opcheck(A.decode_attention_lse.default, (q, kf, vf, st, ln, scale),
                              raise_exception=True)


@pytest.mark.parametrize("cap_hi", [40, 2000], ids=["single-split", "split"])
def test_decode_no_host_sync(cap_hi):
    args = cuda(*make_case(2, 8, 2, 1, 128, torch.bfloat16, 12, cap_hi=cap_hi))
    A.decode_attention(*args)  # first call configures the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = A.decode_attention(*args)
        out2, lse = A.decode_attention_lse(*args, 0.25)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert out.shape == args[0].shape and lse.shape == args[0].shape[:3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("B,cap", [(1, 1500), (16, 40)], ids=["split", "single-split"])
def test_decode_cuda_graph_replay(B, cap, dtype):
    """Capture decode_attention(_lse), then change seg_len / k_flat / v_flat / query in place
    (decode steps) and replay: the graph result equals a fresh eager call (bitwise: same launch
    shape, deterministic kernels) and the CPU op."""
    Hq, Hk, T, D = 8, 2, 1, 128
    S = B * Hk
    sd = seed_of("cuda_decode_graph", B, cap, str(dtype))
    g = gen(sd)
    caps = torch.full((S,), cap)
    lens = (torch.rand(S, generator=g) * (cap - 8)).long() + 1
    lens[0] = 0
    kf, vf, st, ln = flat_cache(caps, lens, D, dtype, sd)
    kf, vf = torch.nan_to_num(kf, nan=9.0), torch.nan_to_num(vf, nan=-9.0)
    q = (torch.randn((B, Hq, T, D), generator=g) * 2).to(dtype)
    q, kf, vf, st, ln = cuda(q, kf, vf, st, ln)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            A.decode_attention(q, kf, vf, st, ln)
            A.decode_attention_lse(q, kf, vf, st, ln, 0.2)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out = A.decode_attention(q, kf, vf, st, ln)
        g_out2, g_lse = A.decode_attention_lse(q, kf, vf, st, ln, 0.2)

    for step in range(3):
        # one decode step in place: new token per segment (within capacity), new query,
        # some old rows rewritten
        new_len = (ln + 1 + step).clamp(max=cap)
        rows = (st.long() + new_len.long() - 1).clamp(min=0)
        kf[rows] = (torch.randn((S, D), device="cuda") * 1.5).to(dtype)
        vf[rows] = torch.randn((S, D), device="cuda").to(dtype)
        kf[:64].mul_(-1)
        ln.copy_(new_len.int())
        q.copy_((torch.randn(q.shape, device="cuda") * 2).to(dtype))
        graph.replay()
        e_out = A.decode_attention(q, kf, vf, st, ln)
        e_out2, e_lse = A.decode_attention_lse(q, kf, vf, st, ln, 0.2)
        torch.cuda.synchronize()
        assert_equal(g_out, e_out, f"graph vs eager out (step {step})")
        assert_equal(g_out2, e_out2, f"graph vs eager out, lse op (step {step})")
        assert_equal(g_lse, e_lse, f"graph vs eager lse (step {step})")
        exp_out, exp_lse = cpu_ref(q, kf, vf, st, ln, 0.2)
        check(g_out2, g_lse, exp_out, exp_lse, dtype)
