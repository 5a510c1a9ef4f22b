"""torch.library.opcheck on every adakv op (schema, fake kernel, autograd registration,
AOT dispatch with dynamic shapes), several shapes each, CPU (CUDA variants skipped without GPU).

Ops with data-dependent output sizes get ``rows`` explicitly (compact) or exact rounding
(evict), as the docs prescribe for graph capture.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, make_key_start, make_qkv, rand_scores, randn, ref, requires_ops, to

pytestmark = requires_ops

A = torch.ops.adakv if hasattr(torch.ops, "adakv") else None

SHAPES = [
    # B, Hq, Hk, N, W, D, C, padded
    (1, 4, 2, 40, 8, 16, 6, False),
    (2, 8, 2, 97, 16, 32, 20, True),
    (3, 4, 4, 33, 8, 8, 64, True),  # G = 1; C >= L (nothing evicted)
]
IDS = ["x".join(map(str, s)) for s in SHAPES]


def inputs(shape, seed, device, dtype=torch.float32):
    B, Hq, Hk, N, W, D, C, padded = shape
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, seed, dtype=dtype)
    ks = make_key_start(B, N, seed, max_pad=N // 3) if padded else None
    return to(device, q, k, v, ks) if ks is not None else (*to(device, q, k, v), None)


def opcheck(op, args, kwargs=None):
    torch.library.opcheck(op, args, kwargs or {}, raise_exception=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_score(device, shape, dtype):
    q, k, v, ks = inputs(shape, 1, device, dtype)
    opcheck(A.score.default, (q, k), dict(kernel_size=7, pooling="max", aggregate="mean",
                                          gqa_reduce="mean", key_start=ks, scale=None))
    opcheck(A.score.default, (q, k), dict(kernel_size=5, pooling="avg", aggregate="max",
                                          gqa_reduce="max", key_start=ks, scale=0.1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_opcheck_allocate_select(device, shape):
    B, Hq, Hk, N, W, D, C, padded = shape
    q, k, v, ks = inputs(shape, 2, device)
    s = to(device, rand_scores(B, Hk, N - W, 3, None if ks is None else ks.cpu()))
    for rounding in ("exact", "official"):
        opcheck(A.allocate.default, (s, C), dict(floor_alpha=0.2, adaptive=True,
                                                 rounding=rounding, key_start=ks))
    opcheck(A.allocate.default, (s, C, 0.0, False, "exact", ks))
    bud = to(device, ref.allocate_ref(s.cpu(), C, key_start=None if ks is None else ks.cpu()))
    opcheck(A.select.default, (s, bud, ks))
    opcheck(A.select.default, (s, bud))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("reserve", [0, 3])
def test_opcheck_compact(device, shape, reserve):
    B, Hq, Hk, N, W, D, C, padded = shape
    q, k, v, ks = inputs(shape, 4, device)
    ks_c = None if ks is None else ks.cpu()
    s = rand_scores(B, Hk, N - W, 5, ks_c)
    bud = ref.allocate_ref(s, C, key_start=ks_c)
    idx, cnt = ref.select_ref(s, bud, ks_c)
    rows = int((bud + W + reserve).sum()) + 2
    opcheck(A.compact.default, (k, v, *to(device, idx, cnt, bud), W),
            dict(reserve=reserve, rows=rows, key_start=ks))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_evict(device, shape, dtype):
    B, Hq, Hk, N, W, D, C, padded = shape
    q, k, v, ks = inputs(shape, 6, device, dtype)
    opcheck(A.evict.default, (q, k, v, C), dict(reserve=2, key_start=ks))
    opcheck(A.evict.default, (q, k, v, C, 0.5, "avg", 5, "max", True, "exact", 0, ks, "max", 0.2))


def flat_cache(S, D, caps, lens, device, dtype, seed):
    caps = torch.tensor(caps)
    st = torch.zeros(S, dtype=torch.int32)
    st[1:] = torch.cumsum(caps, 0)[:-1].int()
    rows = int(caps.sum())
    kf = randn((rows, D), seed, dtype)
    vf = randn((rows, D), seed + 1, dtype)
    return to(device, kf, vf, st, torch.tensor(lens, dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,Hq,Hk,D,T", [(1, 4, 2, 16, 1), (2, 8, 2, 64, 3), (2, 3, 3, 8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_append_and_decode(device, B, Hq, Hk, D, T, dtype):
    S = B * Hk
    caps = [20 + 3 * s for s in range(S)]
    lens = [(5 * s) % 15 for s in range(S)]
    kf, vf, st, ln = flat_cache(S, D, caps, lens, device, dtype, 7)
    kn = to(device, randn((B, Hk, T, D), 8, dtype))
    vn = to(device, randn((B, Hk, T, D), 9, dtype))
    opcheck(A.append_.default, (kf, vf, st, ln, kn, vn))
    ov = torch.zeros(S, dtype=torch.int32, device=device)
    opcheck(A.append_.default, (kf, vf, st, ln, kn, vn, ov))
    q = to(device, randn((B, Hq, T, D), 10, dtype))
    ln2 = ln + T
    for scale in (None, 0.3):
        opcheck(A.decode_attention.default, (q, kf, vf, st, ln2, scale))
        opcheck(A.decode_attention_lse.default, (q, kf, vf, st, ln2, scale))


def paged_pool(S, P, D, lens, extra, device, dtype, seed):
    """Pool [num_pages, P, D] with shuffled page ids; segment s owns ceil((lens[s] + extra) / P)
    pages; unused table entries -1."""
    need = [(n + extra + P - 1) // P for n in lens]
    num_pages = sum(need) + 3
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(num_pages, generator=g).int()
    table = torch.full((S, max(need) + 1), -1, dtype=torch.int32)
    at = 0
    for s, k in enumerate(need):
        table[s, :k] = ids[at : at + k]
        at += k
    kp = randn((num_pages, P, D), seed, dtype)
    vp = randn((num_pages, P, D), seed + 1, dtype)
    return to(device, kp, vp, table, torch.tensor(lens, dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("P", [3, 16])
def test_opcheck_paged_compact(device, shape, P):
    B, Hq, Hk, N, W, D, C, padded = shape
    q, k, v, ks = inputs(shape, 4, device)
    ks_c = None if ks is None else ks.cpu()
    s = rand_scores(B, Hk, N - W, 5, ks_c)
    bud = ref.allocate_ref(s, C, key_start=ks_c)
    idx, cnt = ref.select_ref(s, bud, ks_c)
    lens = [int(c) + W for c in cnt.view(-1).tolist()]  # an upper bound of compact's seg_len
    kp, vp, table, ln = paged_pool(B * Hk, P, D, lens, 0, device, torch.float32, 11)
    opcheck(A.paged_compact_.default, (kp, vp, table, ln * 0, k, v, *to(device, idx, cnt), W),
            dict(key_start=ks))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,Hq,Hk,D,T", [(1, 4, 2, 16, 1), (2, 8, 2, 64, 3), (2, 3, 3, 8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("P", [1, 16])
def test_opcheck_paged_append_and_decode(device, B, Hq, Hk, D, T, dtype, P):
    S = B * Hk
    lens = [(5 * s) % 15 for s in range(S)]
    # opcheck runs the op several times: room for a few appends
    kp, vp, table, ln = paged_pool(S, P, D, lens, 8 * T, device, dtype, 12)
    kn = to(device, randn((B, Hk, T, D), 8, dtype))
    vn = to(device, randn((B, Hk, T, D), 9, dtype))
    opcheck(A.paged_append_.default, (kp, vp, table, ln.clone(), kn, vn))
    ov = torch.zeros(S, dtype=torch.int32, device=device)
    opcheck(A.paged_append_.default, (kp, vp, table, ln.clone(), kn, vn, ov))
    q = to(device, randn((B, Hq, T, D), 10, dtype))
    ln2 = ln + T
    for scale in (None, 0.3):
        opcheck(A.paged_decode_attention.default, (q, kp, vp, table, ln2, scale))
        opcheck(A.paged_decode_attention_lse.default, (q, kp, vp, table, ln2, scale))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,Hq,Hk,D,T", [(1, 4, 2, 16, 1), (2, 8, 2, 64, 3), (2, 3, 3, 8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("P", [1, 16])
def test_opcheck_paged_append_rotary(device, B, Hq, Hk, D, T, dtype, P):
    """Contiguous inputs, and views of one fused projection output with a one-row angle table
    (strided query / key / value, broadcast cos / sin); with overflow flags and with a
    segment_index whose last entry is padding."""
    S = B * Hk
    lens = [(5 * s) % 15 for s in range(S)]
    kp, vp, table, ln = paged_pool(S, P, D, lens, 8 * T, device, dtype, 17)
    q = to(device, randn((B, Hq, T, D), 18, dtype))
    kn = to(device, randn((B, Hk, T, D), 19, dtype))
    vn = to(device, randn((B, Hk, T, D), 20, dtype))
    cos = to(device, randn((B, T, D), 21, torch.float32))
    sin = to(device, randn((B, T, D), 22, torch.float32))
    opcheck(A.paged_append_rotary_.default, (kp, vp, table, ln.clone(), q, kn, vn, cos, sin))
    fused = to(device, randn((B, T, (Hq + 2 * Hk) * D), 23, dtype))
    fq = fused[..., : Hq * D].view(B, T, Hq, D).transpose(1, 2)
    fk = fused[..., Hq * D : (Hq + Hk) * D].view(B, T, Hk, D).transpose(1, 2)
    fv = fused[..., (Hq + Hk) * D :].view(B, T, Hk, D).transpose(1, 2)
    c1, s1 = cos[:1].to(dtype), sin[:1].to(dtype)
    ov = torch.zeros(S, dtype=torch.int32, device=device)
    opcheck(A.paged_append_rotary_.default, (kp, vp, table, ln.clone(), fq, fk, fv, c1, s1, ov))
    idx = torch.arange(S, dtype=torch.int32)
    idx[-1] = -1
    opcheck(A.paged_append_rotary_.default, (kp, vp, table, ln.clone(), fq, fk, fv, c1, s1),
            dict(segment_index=idx.to(device)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,Hq,Hk,D,T", [(1, 4, 2, 16, 1), (2, 8, 2, 64, 3), (2, 3, 3, 8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("P", [1, 16])
def test_opcheck_paged_segment_index(device, B, Hq, Hk, D, T, dtype, P):
    """paged_append_ / paged_decode_attention(_lse) through a segment_index: tables of more rows
    than batch segments, the batch a reversed subset of them, its last entry padding (-1)."""
    S = B * Hk
    S_tab = S + 3
    lens = [(5 * s) % 15 for s in range(S_tab)]
    kp, vp, table, ln = paged_pool(S_tab, P, D, lens, 8 * T, device, dtype, 13)
    idx = torch.tensor(list(range(S_tab))[::-1][:S], dtype=torch.int32)
    idx[-1] = -1
    idx = idx.to(device)
    kn = to(device, randn((B, Hk, T, D), 14, dtype))
    vn = to(device, randn((B, Hk, T, D), 15, dtype))
    opcheck(A.paged_append_.default, (kp, vp, table, ln.clone(), kn, vn),
            dict(segment_index=idx))
    ov = torch.zeros(S, dtype=torch.int32, device=device)
    opcheck(A.paged_append_.default, (kp, vp, table, ln.clone(), kn, vn, ov, idx))
    q = to(device, randn((B, Hq, T, D), 16, dtype))
    ln2 = ln + T
    for scale in (None, 0.3):
        opcheck(A.paged_decode_attention.default, (q, kp, vp, table, ln2, scale, idx))
        opcheck(A.paged_decode_attention_lse.default, (q, kp, vp, table, ln2, scale),
                dict(segment_index=idx))


# defensive_score / value_norm (SPEC 7.1 / 7.2 building blocks): on CUDA the native kernels
# (D = 8 / 16 / 32 here: the CUDA-core paths; tests/test_cuda_followups.py has the tensor-core
# ones under opcheck too).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_defensive_score(device, shape, dtype):
    q, k, v, ks = inputs(shape, 21, device, dtype)
    opcheck(A.defensive_score.default, (q, k), dict(kernel_size=5, key_start=ks, scale=None))
    opcheck(A.defensive_score.default, (q, k, 3, ks, 0.2))
    opcheck(A.defensive_score.default, (q, k))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_value_norm(device, shape, dtype):
    B, Hq, Hk, N, W, D, C, padded = shape
    q, k, v, ks = inputs(shape, 22, device, dtype)
    o = to(device, randn((24, Hq * D), 23, dtype))
    opcheck(A.value_norm.default, (v, o))
    opcheck(A.value_norm.default, (v, o), dict(normalize=True, length=N - W))
    opcheck(A.value_norm.default, (v, o, False, 0))
