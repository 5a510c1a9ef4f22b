"""paged_append_rotary_: the decode step's RoPE and paged append in one kernel, against
adakv_ops.reference (float64 rotation, rounded once) and transformers' apply_rotary_pos_emb.

Inputs are contiguous or strided views of one fused QKV projection output (how the engine's
decode forward passes them); angle tables of float32 or the K/V dtype, one row per batch row
or one for the whole batch; pools with shuffled pages, holes and garbage table entries past a
segment's pages (tests/test_paged.py's make_pool); segment_index with padding. The bad inputs
are in tests/test_adversarial.py; opcheck in tests/test_opcheck.py. CUDA cases run the same
checks (skipped without a GPU).
"""

from __future__ import annotations

import pytest
import torch

from conftest import (DEVICES, assert_equal, cpu, gen, randn, ref, requires_cuda, requires_ops,
                      to)
from test_paged import make_pool, n_pages

pytestmark = requires_ops

import conftest  # noqa: E402

ops = conftest.ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def angles(B, T, D, seed, dtype):
    """cos / sin ``[B, T, D]`` as a rotary embedding builds them (the angle of pair i repeated
    in both halves), positions spread over a long context."""
    g = gen(seed)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    pos = torch.randint(0, 40000, (B, T), generator=g).double()
    th = pos[..., None] * inv
    th = torch.cat([th, th], dim=-1)
    return th.cos().to(dtype), th.sin().to(dtype)


def qkv_inputs(B, Hq, Hk, T, D, seed, dtype, layout):
    """query [B, Hq, T, D], key / value [B, Hk, T, D]: contiguous, or views of one fused
    projection output [B, T, (Hq + 2 Hk) D] (the model's ``view(...).transpose(1, 2)``)."""
    g = gen(seed)
    if layout == "contiguous":
        return (randn((B, Hq, T, D), g, dtype), randn((B, Hk, T, D), g, dtype),
                randn((B, Hk, T, D), g, dtype))
    fused = randn((B, T, (Hq + 2 * Hk) * D), g, dtype)
    q = fused[..., : Hq * D].view(B, T, Hq, D).transpose(1, 2)
    k = fused[..., Hq * D : (Hq + Hk) * D].view(B, T, Hk, D).transpose(1, 2)
    v = fused[..., (Hq + Hk) * D :].view(B, T, Hk, D).transpose(1, 2)
    return q, k, v


def fresh(device, *ts):
    """Copies on ``device`` (``to`` returns the tensor itself on the CPU, and the op writes
    the pool and the lengths in place: the originals stay the test's expectations)."""
    return to(device, *(t.clone() for t in ts))


def written_rows(table, lens, T, P, rows):
    """Flat pool rows the append of T tokens writes for the table rows ``rows``."""
    out = []
    for r in rows:
        for i in range(int(lens[r]), int(lens[r]) + T):
            out.append(int(table[r, i // P]) * P + i % P)
    return torch.tensor(out, dtype=torch.long)


def check_pool(got_k, got_v, want_k, want_v, written, dtype, what):
    """V rows are copies (exact); K rows are rotations (the reference rounds a float64 result,
    the kernel a float32 one: within a rounding step); every other row untouched (exact)."""
    D = got_k.shape[-1]
    gk, gv = cpu(got_k).view(-1, D), cpu(got_v).view(-1, D)
    wk, wv = want_k.view(-1, D), want_v.view(-1, D)
    assert_equal(gv, wv, f"{what}: v_pages")
    keep = torch.ones(gk.shape[0], dtype=torch.bool)
    keep[written] = False
    assert_equal(gk[keep], wk[keep], f"{what}: k_pages rows not appended")
    torch.testing.assert_close(gk[written].double(), wk[written].double(), rtol=TOL[dtype],
                               atol=TOL[dtype], msg=f"{what}: appended keys")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("P", [1, 3, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("layout", ["fused", "contiguous"])
def test_paged_append_rotary_vs_reference(device, P, dtype, T, G, layout):
    B, Hk = 3, 2
    D = 64 if P == 16 else 16
    S, Hq = B * Hk, Hk * G
    sd = 11 + 100 * P + 10 * T + G + 1000 * DTYPES.index(dtype) + (layout == "fused")
    g = gen(sd)
    lens = torch.randint(0, 3 * P + 2, (S,), generator=g).int()
    lens[0] = 0          # an empty segment
    lens[1] = 2 * P      # at a page boundary
    pages = [n_pages(int(n) + T, P) + int(torch.randint(0, 2, (1,), generator=g)) for n in lens]
    kp, vp, table = make_pool(pages, P, D, dtype, sd + 1, extra_pages=5)
    q, k, v = qkv_inputs(B, Hq, Hk, T, D, sd + 2, dtype, layout)
    # float32 angles for G = 1, the K/V dtype for G = 4; one row for the batch when T = 3
    angle_dtype = torch.float32 if G == 1 else dtype
    cos, sin = angles(1 if T == 3 else B, T, D, sd + 3, angle_dtype)
    wq, wk, wv, wl = ref.paged_append_rotary_ref(kp, vp, table, lens, q, k, v, cos, sin)
    dkp, dvp, dtab, dlen = fresh(device, kp, vp, table, lens)
    ov = torch.zeros(S, dtype=torch.int32, device=device)
    got_q = ops.paged_append_rotary_(dkp, dvp, dtab, dlen, *to(device, q, k, v, cos, sin),
                                     overflow=ov)
    assert got_q.shape == (B, Hq, T, D) and got_q.dtype == dtype and got_q.is_contiguous()
    torch.testing.assert_close(cpu(got_q).double(), wq.double(), rtol=TOL[dtype],
                               atol=TOL[dtype], msg="rotated query")
    assert_equal(dlen, wl, "seg_len")
    assert ov.cpu().tolist() == [0] * S
    check_pool(dkp, dvp, wk, wv, written_rows(table, lens, T, P, range(S)), dtype, "pool")
    # the pool then decodes like any other: attention over the appended rows
    want = ref.paged_decode_attention_ref(wq, wk, wv, table, wl, return_lse=True)
    got = ops.paged_decode_attention(got_q, dkp, dvp, dtab, dlen, return_lse=True)
    torch.testing.assert_close(cpu(got[0]).double(), want[0].double(), rtol=4 * TOL[dtype],
                               atol=4 * TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [64, 128])
def test_matches_transformers_rotary(device, D):
    """float32: the rotated query and the stored key are transformers' apply_rotary_pos_emb of
    the same tensors, with the model's own rotary embedding (Llama 3.1 scaling)."""
    tf = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    B, Hq, Hk, T, P = 2, 8, 2, 1, 16
    cfg = tf.LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hk,
                         head_dim=D, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    rope = LlamaRotaryEmbedding(cfg)
    q, k, v = qkv_inputs(B, Hq, Hk, T, D, 5, torch.float32, "fused")
    pos = torch.tensor([[31000], [7]])
    cos, sin = rope(q, pos)
    wq, wk = apply_rotary_pos_emb(q, k, cos, sin)
    lens = torch.tensor([5, 0, 16, 31], dtype=torch.int32)
    kp, vp, table = make_pool([n_pages(int(n) + T, P) for n in lens], P, D, torch.float32, 6)
    dkp, dvp, dtab, dlen = fresh(device, kp, vp, table, lens)
    got_q = ops.paged_append_rotary_(dkp, dvp, dtab, dlen, *to(device, q, k, v, cos, sin))
    torch.testing.assert_close(cpu(got_q), wq, rtol=1e-6, atol=1e-6)
    pool = cpu(dkp).view(-1, D)
    for s in range(B * Hk):
        b, h = divmod(s, Hk)
        n = int(lens[s])
        row = int(table[s, n // P]) * P + n % P
        torch.testing.assert_close(pool[row], wk[b, h, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_index_and_padding(device, dtype):
    """A batch naming a reversed subset of a larger table's rows, its last segment padding
    (-1): the named rows get the append, the others (and the padding segment's pages) are
    untouched, the query is rotated for every batch row, padding included."""
    B, Hq, Hk, T, D, P = 2, 4, 2, 2, 16, 3
    S, S_tab = B * Hk, B * Hk + 3
    lens = torch.tensor([(5 * s) % 11 for s in range(S_tab)], dtype=torch.int32)
    kp, vp, table = make_pool([n_pages(int(n) + T, P) for n in lens], P, D, dtype, 21)
    idx = torch.tensor(list(range(S_tab))[::-1][:S], dtype=torch.int32)
    idx[-1] = -1
    q, k, v = qkv_inputs(B, Hq, Hk, T, D, 22, dtype, "fused")
    cos, sin = angles(B, T, D, 23, dtype)
    named = [int(r) for r in idx if r >= 0]     # batch segments 0 .. S - 2, in order
    rows, n = torch.tensor(named), len(named)
    # the reference on the gathered rows, one batch row per segment (its own angle row)
    kn, vn = _segments(k, n), _segments(v, n)
    _, wk, wv, wl_named = ref.paged_append_rotary_ref(
        kp, vp, table[rows].contiguous(), lens[rows].contiguous(), kn, kn, vn,
        cos[torch.arange(n) // Hk], sin[torch.arange(n) // Hk])
    wl = lens.clone()
    wl[rows] = wl_named
    dkp, dvp, dtab, dlen, didx = fresh(device, kp, vp, table, lens, idx)
    got_q = ops.paged_append_rotary_(dkp, dvp, dtab, dlen, *to(device, q, k, v, cos, sin),
                                     segment_index=didx)
    torch.testing.assert_close(cpu(got_q).double(), ref.rotary_ref(q, cos, sin),
                               rtol=TOL[dtype], atol=TOL[dtype], msg="query (padding included)")
    assert_equal(dlen, wl, "seg_len: named rows advanced, the others unchanged")
    check_pool(dkp, dvp, wk, wv, written_rows(table, lens, T, P, named), dtype, "pool")


def _segments(x, n):
    """The first n segments (b * Hk + h order) of x [B, Hk, T, D] as n batch rows of one head."""
    B, Hk, T, D = x.shape
    return x.reshape(B * Hk, T, D)[:n].reshape(n, 1, T, D).contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_overflow_writes_nothing_but_rotates_the_query(device):
    """A segment whose table cannot take the T new rows: CPU raises before anything is written;
    CUDA writes nothing for it, keeps its length, flags it, appends the others, and still
    returns the rotated query."""
    B, Hq, Hk, T, D, P = 1, 2, 2, 1, 16, 4
    lens = torch.tensor([3, 8], dtype=torch.int32)        # segment 1: its 2 pages are full
    kp, vp, table = make_pool([1, 2], P, D, torch.float32, 31, width=2, garbage=False)
    q, k, v = qkv_inputs(B, Hq, Hk, T, D, 32, torch.float32, "contiguous")
    cos, sin = angles(B, T, D, 33, torch.float32)
    dkp, dvp, dtab, dlen = fresh(device, kp, vp, table, lens)
    ov = torch.zeros(2, dtype=torch.int32, device=device)
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"adakv: paged_append_rotary_ of 1 tokens exceeds "
                                               r"the page_table of segment 1"):
            ops.paged_append_rotary_(dkp, dvp, dtab, dlen, q, k, v, cos, sin, overflow=ov)
        assert_equal(dkp, kp, "k_pages")
        assert_equal(dvp, vp, "v_pages")
        assert_equal(dlen, lens, "seg_len")
        return
    got_q = ops.paged_append_rotary_(dkp, dvp, dtab, dlen, *to(device, q, k, v, cos, sin),
                                     overflow=ov)
    assert ov.cpu().tolist() == [0, 1]
    assert dlen.cpu().tolist() == [4, 8]
    torch.testing.assert_close(cpu(got_q).double(), ref.rotary_ref(q, cos, sin), rtol=1e-5,
                               atol=1e-5)
    wq, wk, wv, _ = ref.paged_append_rotary_ref(kp, vp, table[:1].contiguous(), lens[:1].clone(),
                                                q[:, :1], k[:, :1], v[:, :1], cos, sin)
    check_pool(dkp, dvp, wk, wv, written_rows(table, lens, T, P, [0]), torch.float32, "pool")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_zero_query_heads(device):
    """B = 0 (no segment) and Hq = 0 (no query head): nothing written, empty results."""
    D, P = 16, 4
    kp, vp, table = make_pool([2, 2], P, D, torch.float32, 41)
    lens = torch.tensor([1, 2], dtype=torch.int32)
    dkp, dvp, dtab, dlen = fresh(device, kp, vp, table, lens)
    cos, sin = angles(1, 1, D, 42, torch.float32)
    q = torch.zeros(1, 0, 1, D)
    k, v = torch.randn(1, 2, 1, D), torch.randn(1, 2, 1, D)
    got = ops.paged_append_rotary_(dkp, dvp, dtab, dlen, *to(device, q, k, v, cos, sin))
    assert got.shape == (1, 0, 1, D)
    assert dlen.cpu().tolist() == [2, 3]
    e = torch.empty(0, dtype=torch.int32, device=device)     # no batch segment
    z = torch.zeros(0, 2, 1, D)
    got = ops.paged_append_rotary_(dkp, dvp, dtab, dlen, *to(device, z, z, z, cos, sin),
                                   segment_index=e)
    assert got.shape == (0, 2, 1, D)
    assert dlen.cpu().tolist() == [2, 3]


@pytest.mark.parametrize("device", DEVICES)
def test_head_dim_zero_advances_the_lengths(device):
    """D = 0 (tensors without data): nothing rotated or stored, the lengths advance by T as
    paged_append_'s do."""
    B, Hq, Hk, T, P = 2, 4, 2, 3, 4
    kp, vp = torch.empty(6, P, 0), torch.empty(6, P, 0)
    table = torch.arange(6, dtype=torch.int32)[:4].view(4, 1).repeat(1, 2).contiguous()
    table[:, 1] = torch.tensor([4, 5, 4, 5])      # only the first page of each is used below
    lens = torch.tensor([0, 1, 0, 1], dtype=torch.int32)
    dkp, dvp, dtab, dlen = fresh(device, kp, vp, table, lens)
    z = lambda h: torch.empty(B, h, T, 0)         # noqa: E731
    got = ops.paged_append_rotary_(dkp, dvp, dtab, dlen, *to(
        device, z(Hq), z(Hk), z(Hk), torch.empty(B, T, 0), torch.empty(B, T, 0)))
    assert got.shape == (B, Hq, T, 0)
    assert dlen.cpu().tolist() == [3, 4, 3, 4]


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_values_stay_in_their_rows(device):
    """NaN / Inf in one query head, one key and one angle row: they reach only the rows that
    read them (a rotation mixes the two halves of one head vector, nothing else); every other
    row matches the reference, nothing is dropped or clamped."""
    B, Hq, Hk, T, D, P = 2, 4, 2, 1, 16, 4
    lens = torch.tensor([1, 5, 0, 3], dtype=torch.int32)
    kp, vp, table = make_pool([n_pages(int(n) + T, P) for n in lens], P, D, torch.float32, 61)
    q, k, v = qkv_inputs(B, Hq, Hk, T, D, 62, torch.float32, "contiguous")
    cos, sin = angles(B, T, D, 63, torch.float32)
    q[0, 1, 0, 3] = float("nan")
    k[1, 0, 0, 10] = float("inf")
    cos[1, 0, 2] = float("nan")          # batch row 1: every head of it sees a NaN angle
    wq, wk, wv, wl = ref.paged_append_rotary_ref(kp, vp, table, lens, q, k, v, cos, sin)
    dkp, dvp, dtab, dlen = fresh(device, kp, vp, table, lens)
    got_q = cpu(ops.paged_append_rotary_(dkp, dvp, dtab, dlen, *to(device, q, k, v, cos, sin)))
    assert_equal(dlen, wl, "seg_len")
    assert torch.equal(got_q.isnan(), wq.isnan()), "NaN positions of the query"
    fin = ~wq.isnan()
    torch.testing.assert_close(got_q[fin], wq[fin], rtol=1e-5, atol=1e-5)
    assert got_q[0, 1].isnan().any() and not got_q[0, [0, 2, 3]].isnan().any()
    rows = written_rows(table, lens, T, P, range(B * Hk))
    gk = cpu(dkp).view(-1, D)[rows]
    want = wk.view(-1, D)[rows]
    assert torch.equal(gk.isnan(), want.isnan()) and torch.equal(gk.isinf(), want.isinf())
    ok = want.isfinite()
    torch.testing.assert_close(gk[ok], want[ok], rtol=1e-5, atol=1e-5)
    assert_equal(dvp, wv, "v_pages")


@pytest.mark.sanitize
@requires_cuda
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float16, 64),
                                     (torch.float32, 256)], ids=["bf16-128", "fp16-64", "fp32-256"])
def test_paged_append_rotary_sanitize_small(dtype, D):
    """compute-sanitizer cases (memcheck, racecheck): fused strided inputs, a one-row angle
    table, T 2, G 4, a segment_index with padding, a segment that overflows its table."""
    B, Hk, G, T, P = 2, 2, 4, 2, 16
    S, Hq = B * Hk, Hk * G
    lens = torch.tensor([0, 15, 31, 16], dtype=torch.int32)
    kp, vp, table = make_pool([1, 2, 2, 2], P, D, dtype, 51, width=2)   # segment 2 overflows
    q, k, v = qkv_inputs(B, Hq, Hk, T, D, 52, dtype, "fused")
    cos, sin = angles(1, T, D, 53, torch.float32)
    idx = torch.tensor([0, 1, 2, -1], dtype=torch.int32)
    ov = torch.zeros(S, dtype=torch.int32, device="cuda")
    dkp, dvp, dtab, dlen, didx = fresh("cuda", kp, vp, table, lens, idx)
    got_q = ops.paged_append_rotary_(dkp, dvp, dtab, dlen, *to("cuda", q, k, v, cos, sin),
                                     overflow=ov, segment_index=didx)
    torch.cuda.synchronize()
    assert ov.cpu().tolist() == [0, 0, 1, 0]
    assert dlen.cpu().tolist() == [2, 17, 31, 16]
    torch.testing.assert_close(cpu(got_q).double(), ref.rotary_ref(q, cos, sin),
                               rtol=TOL[dtype], atol=TOL[dtype])
    _, wk, wv, _ = ref.paged_append_rotary_ref(kp, vp, table[:2].contiguous(), lens[:2].clone(),
                                               _segments(k, 2), _segments(k, 2),
                                               _segments(v, 2), cos, sin)
    check_pool(dkp, dvp, wk, wv, written_rows(table, lens, T, P, [0, 1]), dtype, "pool")
