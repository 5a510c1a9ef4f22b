"""Bad inputs raise a clear error (CPU): RuntimeError from the kernels' checks, or
RuntimeError / TypeError / ValueError from the schema, with a message naming the problem.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, assert_equal, make_qkv, rand_scores, randn, ref, requires_ops

pytestmark = requires_ops

import conftest  # noqa: E402

ops = conftest.ops
ERR = (RuntimeError, ValueError, TypeError)

B, Hq, Hk, N, W, D, C = 2, 4, 2, 30, 6, 8, 5
L = N - W


def base():
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, 1)
    ks = torch.tensor([0, 3], dtype=torch.int32)
    s = rand_scores(B, Hk, L, 2, ks)
    bud = ref.allocate_ref(s, C, key_start=ks)
    idx, cnt = ref.select_ref(s, bud, ks)
    return dict(q=q, k=k, v=v, ks=ks, s=s, bud=bud, idx=idx, cnt=cnt)


def cache(reserve=2):
    t = base()
    return ops.evict(t["q"], t["k"], t["v"], C, reserve=reserve, key_start=t["ks"])


def nc(x):
    """A non-contiguous view with the same shape and values."""
    big = torch.full((*x.shape[:-1], 2 * x.shape[-1]), 7.0, dtype=x.dtype)
    big[..., ::2] = x
    y = big[..., ::2]
    assert not y.is_contiguous() and torch.equal(y, x)
    return y


# each case: (id, callable(t) raising, regex the message must match)
CASES = [
    # --- score
    ("score_q_rank", lambda t: ops.score(t["q"][0], t["k"]), r"q_window"),
    ("score_key_rank", lambda t: ops.score(t["q"], t["k"][0]), r"key"),
    ("score_dtype_mismatch", lambda t: ops.score(t["q"], t["k"].bfloat16()), r"(?i)dtype"),
    ("score_int_dtype", lambda t: ops.score(t["q"].int(), t["k"].int()), r"(?i)dtype|float"),
    ("score_noncontig_key", lambda t: ops.score(t["q"], nc(t["k"])), r"(?i)contiguous"),
    ("score_noncontig_q", lambda t: ops.score(nc(t["q"]), t["k"]), r"(?i)contiguous"),
    ("score_window_gt_N", lambda t: ops.score(randn((B, Hq, N + 1, D), 3), t["k"]), r"(?i)window|\bW\b"),
    ("score_heads", lambda t: ops.score(randn((B, 3, W, D), 3), t["k"]), r"(?i)head"),
    ("score_head_dim", lambda t: ops.score(randn((B, Hq, W, D + 1), 3), t["k"]), r"(?i)head dim|\bD\b"),
    ("score_batch", lambda t: ops.score(randn((B + 1, Hq, W, D), 3), t["k"]), r"(?i)batch"),
    ("score_pooling", lambda t: ops.score(t["q"], t["k"], pooling="mean"), r"pooling"),
    ("score_aggregate", lambda t: ops.score(t["q"], t["k"], aggregate="sum"), r"aggregate"),
    ("score_gqa_reduce", lambda t: ops.score(t["q"], t["k"], gqa_reduce="min"), r"gqa_reduce"),
    ("score_even_kernel", lambda t: ops.score(t["q"], t["k"], kernel_size=4), r"kernel"),
    ("score_zero_kernel", lambda t: ops.score(t["q"], t["k"], kernel_size=0), r"kernel"),
    ("score_ks_int64", lambda t: ops.score(t["q"], t["k"], key_start=t["ks"].long()), r"key_start"),
    ("score_ks_high", lambda t: ops.score(t["q"], t["k"], key_start=torch.tensor([0, N + 1], dtype=torch.int32)), r"key_start"),
    ("score_ks_neg", lambda t: ops.score(t["q"], t["k"], key_start=torch.tensor([-1, 0], dtype=torch.int32)), r"key_start"),
    ("score_ks_shape", lambda t: ops.score(t["q"], t["k"], key_start=torch.zeros(B + 1, dtype=torch.int32)), r"key_start"),
    # --- allocate
    ("alloc_neg_budget", lambda t: ops.allocate(t["s"], -1), r"budget"),
    ("alloc_alpha", lambda t: ops.allocate(t["s"], C, floor_alpha=1.5), r"alpha"),
    ("alloc_alpha_neg", lambda t: ops.allocate(t["s"], C, floor_alpha=-0.1), r"alpha"),
    ("alloc_rounding", lambda t: ops.allocate(t["s"], C, rounding="floor"), r"rounding"),
    ("alloc_scores_f64", lambda t: ops.allocate(t["s"].double(), C), r"scores"),
    ("alloc_scores_rank", lambda t: ops.allocate(t["s"][0], C), r"scores"),
    ("alloc_ks_int64", lambda t: ops.allocate(t["s"], C, key_start=t["ks"].long()), r"key_start"),
    ("alloc_budget_float", lambda t: ops.allocate(t["s"], 1.5), r"(?i)budget|int"),
    # --- select
    ("select_budgets_int64", lambda t: ops.select(t["s"], t["bud"].long()), r"budgets"),
    ("select_budgets_shape", lambda t: ops.select(t["s"], t["bud"][:1]), r"budgets"),
    ("select_neg_budget", lambda t: ops.select(t["s"], -t["bud"]), r"budget"),
    ("select_noncontig", lambda t: ops.select(nc(t["s"]), t["bud"]), r"(?i)contiguous"),
    # --- compact
    ("compact_count_gt_budget", lambda t: ops.compact(t["k"], t["v"], t["idx"], t["cnt"] + 100, t["bud"], W), r"kept_count|budget"),
    ("compact_idx_range", lambda t: ops.compact(t["k"], t["v"], t["idx"].clamp(min=0) + L, t["cnt"], t["bud"], W), r"kept_idx"),
    ("compact_rows_small", lambda t: ops.compact(t["k"], t["v"], t["idx"], t["cnt"], t["bud"], W, rows=3), r"rows"),
    ("compact_value_shape", lambda t: ops.compact(t["k"], t["v"][:, :, 1:].contiguous(), t["idx"], t["cnt"], t["bud"], W), r"value"),
    ("compact_value_dtype", lambda t: ops.compact(t["k"], t["v"].half(), t["idx"], t["cnt"], t["bud"], W), r"(?i)dtype"),
    ("compact_window", lambda t: ops.compact(t["k"], t["v"], t["idx"], t["cnt"], t["bud"], N + 1), r"window"),
    ("compact_reserve", lambda t: ops.compact(t["k"], t["v"], t["idx"], t["cnt"], t["bud"], W, reserve=-1), r"reserve"),
    ("compact_idx_int64", lambda t: ops.compact(t["k"], t["v"], t["idx"].long(), t["cnt"], t["bud"], W), r"kept_idx"),
    ("compact_ks_range", lambda t: ops.compact(t["k"], t["v"], t["idx"], t["cnt"], t["bud"], W, key_start=torch.tensor([0, N + 5], dtype=torch.int32)), r"key_start"),
    # --- evict
    ("evict_neg_budget", lambda t: ops.evict(t["q"], t["k"], t["v"], -3), r"budget"),
    ("evict_reserve", lambda t: ops.evict(t["q"], t["k"], t["v"], C, reserve=-1), r"reserve"),
    ("evict_value_dtype", lambda t: ops.evict(t["q"], t["k"], t["v"].bfloat16(), C), r"(?i)dtype"),
    ("evict_value_shape", lambda t: ops.evict(t["q"], t["k"], t["v"][:1].contiguous(), C), r"value"),
    ("evict_noncontig_value", lambda t: ops.evict(t["q"], t["k"], nc(t["v"]), C), r"(?i)contiguous"),
    ("evict_heads", lambda t: ops.evict(randn((B, 5, W, D), 3), t["k"], t["v"], C), r"(?i)head"),
    ("evict_window_gt_N", lambda t: ops.evict(randn((B, Hq, N + 2, D), 3), t["k"], t["v"], C), r"(?i)window|\bW\b"),
    ("evict_rounding", lambda t: ops.evict(t["q"], t["k"], t["v"], C, rounding="banker"), r"rounding"),
    ("evict_pooling", lambda t: ops.evict(t["q"], t["k"], t["v"], C, pooling="min"), r"pooling"),
    ("evict_kernel", lambda t: ops.evict(t["q"], t["k"], t["v"], C, kernel_size=6), r"kernel"),
    ("evict_alpha", lambda t: ops.evict(t["q"], t["k"], t["v"], C, floor_alpha=2.0), r"alpha"),
    ("evict_ks_range", lambda t: ops.evict(t["q"], t["k"], t["v"], C, key_start=torch.tensor([0, N + 1], dtype=torch.int32)), r"key_start"),
    ("evict_ks_int64", lambda t: ops.evict(t["q"], t["k"], t["v"], C, key_start=t["ks"].long()), r"key_start"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises(case):
    _, fn, pattern = case
    t = base()
    with pytest.raises(ERR, match=pattern):
        fn(t)


def _decode_cases():
    kf, vf, st, ln = cache()
    q = randn((B, Hq, 1, D), 5)
    kn = randn((B, Hk, 1, D), 6)
    vn = randn((B, Hk, 1, D), 7)
    return kf, vf, st, ln, q, kn, vn


DECODE_CASES = [
    ("dec_query_rank", lambda kf, vf, st, ln, q, kn, vn: ops.decode_attention(q[0], kf, vf, st, ln), r"query"),
    ("dec_heads", lambda kf, vf, st, ln, q, kn, vn: ops.decode_attention(randn((B, 3, 1, D), 1), kf, vf, st, ln), r"(?i)head"),
    ("dec_segments", lambda kf, vf, st, ln, q, kn, vn: ops.decode_attention(randn((3, Hq, 1, D), 1), kf, vf, st, ln), r"(?i)segment|batch|B \*|seg_start"),
    ("dec_head_dim", lambda kf, vf, st, ln, q, kn, vn: ops.decode_attention(randn((B, Hq, 1, D + 2), 1), kf, vf, st, ln), r"(?i)head dim|\bD\b"),
    ("dec_dtype", lambda kf, vf, st, ln, q, kn, vn: ops.decode_attention(q.half(), kf, vf, st, ln), r"(?i)dtype"),
    ("dec_seg_len_int64", lambda kf, vf, st, ln, q, kn, vn: ops.decode_attention(q, kf, vf, st, ln.long()), r"seg_len"),
    ("dec_seg_start_int64", lambda kf, vf, st, ln, q, kn, vn: ops.decode_attention(q, kf, vf, st.long(), ln), r"seg_start"),
    ("dec_kflat_rank", lambda kf, vf, st, ln, q, kn, vn: ops.decode_attention(q, kf[None], vf, st, ln), r"k_flat"),
    ("dec_vflat_shape", lambda kf, vf, st, ln, q, kn, vn: ops.decode_attention(q, kf, vf[1:].contiguous(), st, ln), r"v_flat"),
    ("dec_T0", lambda kf, vf, st, ln, q, kn, vn: ops.decode_attention(q[:, :, :0].contiguous(), kf, vf, st, ln), r"(?i)T >= 1|token"),
    ("dec_noncontig_q", lambda kf, vf, st, ln, q, kn, vn: ops.decode_attention(nc(randn((B, Hq, 2, D), 1)), kf, vf, st, ln), r"(?i)contiguous"),
    ("dec_lse_heads", lambda kf, vf, st, ln, q, kn, vn: torch.ops.adakv.decode_attention_lse(randn((B, 3, 1, D), 1), kf, vf, st, ln), r"(?i)head"),
    ("app_segments", lambda kf, vf, st, ln, q, kn, vn: ops.append_(kf, vf, st, ln, randn((B, Hk + 1, 1, D), 1), randn((B, Hk + 1, 1, D), 2)), r"(?i)segment|B \* Hk"),
    ("app_T0", lambda kf, vf, st, ln, q, kn, vn: ops.append_(kf, vf, st, ln, kn[:, :, :0].contiguous(), vn[:, :, :0].contiguous()), r"(?i)T >= 1|token"),
    ("app_dtype", lambda kf, vf, st, ln, q, kn, vn: ops.append_(kf, vf, st, ln, kn.bfloat16(), vn.bfloat16()), r"(?i)dtype"),
    ("app_value_dtype", lambda kf, vf, st, ln, q, kn, vn: ops.append_(kf, vf, st, ln, kn, vn.half()), r"(?i)dtype"),
    ("app_head_dim", lambda kf, vf, st, ln, q, kn, vn: ops.append_(kf, vf, st, ln, randn((B, Hk, 1, D + 1), 1), randn((B, Hk, 1, D + 1), 2)), r"(?i)head dim|\bD\b"),
    ("app_seg_len_int64", lambda kf, vf, st, ln, q, kn, vn: ops.append_(kf, vf, st, ln.long(), kn, vn), r"seg_len"),
    ("app_noncontig", lambda kf, vf, st, ln, q, kn, vn: ops.append_(kf, vf, st, ln, nc(kn), vn), r"(?i)contiguous"),
    ("app_overflow", lambda kf, vf, st, ln, q, kn, vn: ops.append_(kf, vf, st, ln, randn((B, Hk, 3, D), 1), randn((B, Hk, 3, D), 2)), r"(?i)overflow|capacity"),
    ("app_overflow_len", lambda kf, vf, st, ln, q, kn, vn: ops.append_(kf, vf, st, ln + 2, kn, vn), r"(?i)overflow|capacity"),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_bad_decode_input_raises_and_changes_nothing(case):
    _, fn, pattern = case
    args = _decode_cases()
    before = [a.clone() for a in args[:4]]
    with pytest.raises(ERR, match=pattern):
        fn(*args)
    for a, b, name in zip(args[:4], before, ("k_flat", "v_flat", "seg_start", "seg_len")):
        assert_equal(a, b, name)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=DEVICES[1].marks)])
def test_device_mismatch_raises(device):
    t = base()
    with pytest.raises(ERR, match=r"(?i)device|cuda|cpu"):
        ops.score(t["q"].to(device), t["k"])
    with pytest.raises(ERR, match=r"(?i)device|cuda|cpu"):
        ops.allocate(t["s"].to(device), C, key_start=t["ks"])
