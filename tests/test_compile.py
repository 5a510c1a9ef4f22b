"""torch.compile(fullgraph=True) of the eviction + decode path gives the eager result (CPU).

Inductor on CPU compiles C++; each compiled function is kept small and reused across calls.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, assert_equal, make_qkv, randn, requires_ops, to

pytestmark = requires_ops

import conftest  # noqa: E402

ops = conftest.ops

B, Hq, Hk, N, W, D, C, R = 2, 8, 2, 96, 8, 16, 12, 6


def prefill_and_step(q_window, key, value, key_start, key_new, value_new, query):
    k_flat, v_flat, seg_start, seg_len = ops.evict(q_window, key, value, C, reserve=R,
                                                   key_start=key_start)
    ops.append_(k_flat, v_flat, seg_start, seg_len, key_new, value_new)
    out = ops.decode_attention(query, k_flat, v_flat, seg_start, seg_len)
    return out, k_flat, v_flat, seg_start, seg_len


def decode_step(k_flat, v_flat, seg_start, seg_len, key_new, value_new, query):
    ops.append_(k_flat, v_flat, seg_start, seg_len, key_new, value_new)
    out, lse = ops.decode_attention(query, k_flat, v_flat, seg_start, seg_len, return_lse=True)
    return out, lse


def _inputs(seed, T, dtype):
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, seed, dtype=dtype)
    ks = torch.tensor([0, 21], dtype=torch.int32)
    kn = randn((B, Hk, T, D), seed + 1, dtype)
    vn = randn((B, Hk, T, D), seed + 2, dtype)
    qn = randn((B, Hq, T, D), seed + 3, dtype)
    return q, k, v, ks, kn, vn, qn


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_evict_append_decode(device, backend):
    torch._dynamo.reset()
    fn = torch.compile(prefill_and_step, fullgraph=True, backend=backend)
    for seed, T in [(0, 1), (1, 1), (2, 1)]:
        args = to(device, *_inputs(seed, T, torch.float32))
        eager = prefill_and_step(*args)
        comp = fn(*args)
        for name, a, e in zip(("out", "k_flat", "v_flat", "seg_start", "seg_len"), comp, eager):
            if name == "out":
                torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
            else:
                assert_equal(a, e, name)
        assert comp[1].shape[0] == B * Hk * (C + W + R)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_decode_step_repeated(device, backend, dtype):
    torch._dynamo.reset()
    q, k, v, ks, *_ = to(device, *_inputs(5, 1, dtype))
    cache_e = list(ops.evict(q, k, v, C, reserve=R, key_start=ks))
    cache_c = [t.clone() for t in cache_e]
    fn = torch.compile(decode_step, fullgraph=True, backend=backend)
    for step, T in enumerate([1, 1, 1, 2, 1]):  # total 6 == reserve
        kn, vn, qn = to(device, randn((B, Hk, T, D), 10 + step, dtype),
                        randn((B, Hk, T, D), 20 + step, dtype),
                        randn((B, Hq, T, D), 30 + step, dtype))
        out_e, lse_e = decode_step(*cache_e, kn, vn, qn)
        out_c, lse_c = fn(*cache_c, kn, vn, qn)
        torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse_c, lse_e, rtol=1e-6, atol=1e-6)
        for name, a, e in zip(("k_flat", "v_flat", "seg_start", "seg_len"), cache_c, cache_e):
            assert_equal(a, e, f"{name} after step {step}")


P = 4


def paged_decode_step(k_pages, v_pages, page_table, seg_len, key_new, value_new, query):
    ops.paged_append_(k_pages, v_pages, page_table, seg_len, key_new, value_new)
    out, lse = ops.paged_decode_attention(query, k_pages, v_pages, page_table, seg_len,
                                          return_lse=True)
    return out, lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_paged_decode_step_repeated(device, backend, dtype):
    torch._dynamo.reset()
    q, k, v, ks, *_ = _inputs(7, 1, dtype)
    s = ops.score(q, k, key_start=ks)
    bud = ops.allocate(s, C, key_start=ks)
    idx, cnt = ops.select(s, bud, key_start=ks)
    S, width = B * Hk, (C + W + R + P - 1) // P + 1
    num_pages = S * width + 5
    table = torch.randperm(num_pages, generator=torch.Generator().manual_seed(8))[: S * width]
    table = table.view(S, width).int().contiguous()
    kp = randn((num_pages, P, D), 9, dtype)
    vp = randn((num_pages, P, D), 10, dtype)
    seg_len = torch.zeros(S, dtype=torch.int32)
    ops.paged_compact_(kp, vp, table, seg_len, k, v, idx, cnt, W, key_start=ks)
    cache_e = list(to(device, kp, vp, table, seg_len))
    cache_c = [t.clone() for t in cache_e]
    fn = torch.compile(paged_decode_step, fullgraph=True, backend=backend)
    for step, T in enumerate([1, 1, 2, 1]):
        kn, vn, qn = to(device, randn((B, Hk, T, D), 40 + step, dtype),
                        randn((B, Hk, T, D), 50 + step, dtype),
                        randn((B, Hq, T, D), 60 + step, dtype))
        out_e, lse_e = paged_decode_step(*cache_e, kn, vn, qn)
        out_c, lse_c = fn(*cache_c, kn, vn, qn)
        torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse_c, lse_e, rtol=1e-6, atol=1e-6)
        for name, a, e in zip(("k_pages", "v_pages", "page_table", "seg_len"), cache_c, cache_e):
            assert_equal(a, e, f"{name} after step {step}")
