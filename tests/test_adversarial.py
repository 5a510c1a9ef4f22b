"""Adversarial inputs for every adakv op (SPEC section 9, docs/semantics.md "Inputs nobody
should trust"), on CPU and (same cases, via ``DEVICES``) on CUDA.

Every case ends in one of two ways, never a crash:

* a clear error: the exception type and a regex naming the argument are asserted. Error cases
  run in a child process (one per device, all cases in it; a case that kills the child is
  reported as a crash and the child is restarted after it), so a segfault or a CUDA fault
  can never take the pytest process down. Data-dependent checks (starts, lengths, indices,
  ``key_start``) raise on CPU; on CUDA they are clamped (no host sync), so there a case must
  either raise the same clear error or run without a fault (``CLAMP``).
* a correct result, checked against ``adakv_ops.reference`` (NaN/Inf in q/k/v/scores, empty
  tensors, budget == length, budget > length, huge kernels, unsorted ``kept_idx``).

Plus the fake kernels (torch.compile tracing gives the C++ errors) and the HF layer
(size-like AdaKVCache arguments, unclaimed prefill). Fixed seeds throughout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import conftest  # noqa: E402
from conftest import DEVICES, assert_equal, make_qkv, rand_scores, ref, requires_ops  # noqa: E402

ops = conftest.ops
pytestmark = requires_ops

B, Hq, Hk, N, W, D, C = 2, 4, 2, 24, 4, 8, 5
L = N - W
R = 2  # reserve of the base flat cache
I32 = 2**31 - 1
NAN, INF = float("nan"), float("inf")

RAISE = "raise"   # both backends raise (shape / dtype / size checks)
CLAMP = "clamp"   # CPU raises; CUDA raises the same error or runs without a fault
CUDA_ONLY = "cuda_only"  # device-mismatch cases (need a second device)

# Ops with a CPU kernel only (their cases, names starting with these prefixes, are skipped on
# CUDA): none today (defensive_score and value_norm have native CUDA kernels).
CPU_ONLY_PREFIXES: tuple[str, ...] = ()


def i32(*v):
    return torch.tensor(v, dtype=torch.int32)


def base(dev: str) -> dict:
    """Small valid inputs of every op on ``dev`` (seeded)."""
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, 1)
    s = rand_scores(B, Hk, L, 2)
    bud = ref.allocate_ref(s, C)
    idx, cnt = ref.select_ref(s, bud)
    kf, vf, ss, sl = ref.evict_ref(q, k, v, C, reserve=R)
    g = torch.Generator().manual_seed(3)
    t = dict(q=q, k=k, v=v, s=s, bud=bud, idx=idx, cnt=cnt, kf=kf, vf=vf, ss=ss, sl=sl,
             kn=torch.randn(B, Hk, 1, D, generator=g), vn=torch.randn(B, Hk, 1, D, generator=g),
             qd=torch.randn(B, Hq, 1, D, generator=g),
             cs=torch.randn(B, 1, D, generator=g).cos(), sn=torch.randn(B, 1, D, generator=g).sin(),
             o=torch.randn(12, Hq * D, generator=torch.Generator().manual_seed(6)))
    t.update(_paged_base(kf, vf, ss, sl))
    t = {n: x.to(dev) for n, x in t.items()}
    t["dev"] = dev
    t["other"] = "cpu" if dev != "cpu" else None
    return t


PP = 4  # page size of the base paged pool
PW = (C + W + R + PP - 1) // PP + 1  # its page-table width (every entry a valid, distinct page)
NP = B * Hk * PW + 2  # its pages: two holes no segment owns


def _paged_base(kf, vf, ss, sl) -> dict:
    """The base flat cache's segments in a paged pool (shuffled pages, two holes)."""
    g = torch.Generator().manual_seed(4)
    pt = torch.randperm(NP, generator=g)[: B * Hk * PW].view(B * Hk, PW).int().contiguous()
    kp = torch.randn(NP, PP, D, generator=g)
    vp = torch.randn(NP, PP, D, generator=g)
    for s_, (st, n) in enumerate(zip(ss.tolist(), sl.tolist())):
        i = torch.arange(n)
        rows = pt[s_].long()[i // PP] * PP + i % PP
        kp.view(-1, D)[rows] = kf[st : st + n]
        vp.view(-1, D)[rows] = vf[st : st + n]
    return dict(kp=kp, vp=vp, pt=pt, psl=sl.clone())


def with_(x: torch.Tensor, index, value) -> torch.Tensor:
    y = x.clone()
    y[index] = value
    return y


def _compact(t, **kw):
    a = dict(key=t["k"], value=t["v"], kept_idx=t["idx"], kept_count=t["cnt"], budgets=t["bud"],
             window=W)
    a.update(kw)
    return ops.compact(a.pop("key"), a.pop("value"), a.pop("kept_idx"), a.pop("kept_count"),
                       a.pop("budgets"), a.pop("window"), **a)


def _append(t, **kw):
    a = dict(k_flat=t["kf"].clone(), v_flat=t["vf"].clone(), seg_start=t["ss"],
             seg_len=t["sl"].clone(), key_new=t["kn"], value_new=t["vn"])
    a.update(kw)
    ops.append_(a["k_flat"], a["v_flat"], a["seg_start"], a["seg_len"], a["key_new"],
                a["value_new"], a.get("overflow"))


def _decode(t, lse=False, **kw):
    a = dict(query=t["qd"], k_flat=t["kf"], v_flat=t["vf"], seg_start=t["ss"], seg_len=t["sl"])
    a.update(kw)
    return ops.decode_attention(a["query"], a["k_flat"], a["v_flat"], a["seg_start"],
                                a["seg_len"], return_lse=lse)


def _pcompact(t, **kw):
    a = dict(k_pages=t["kp"].clone(), v_pages=t["vp"].clone(), page_table=t["pt"],
             seg_len=t["psl"].clone(), key=t["k"], value=t["v"], kept_idx=t["idx"],
             kept_count=t["cnt"], window=W, key_start=None)
    a.update(kw)
    ops.paged_compact_(a["k_pages"], a["v_pages"], a["page_table"], a["seg_len"], a["key"],
                       a["value"], a["kept_idx"], a["kept_count"], a["window"], a["key_start"])
    return a


def _pappend(t, **kw):
    a = dict(k_pages=t["kp"].clone(), v_pages=t["vp"].clone(), page_table=t["pt"],
             seg_len=t["psl"].clone(), key_new=t["kn"], value_new=t["vn"], overflow=None,
             segment_index=None)
    a.update(kw)
    ops.paged_append_(a["k_pages"], a["v_pages"], a["page_table"], a["seg_len"], a["key_new"],
                      a["value_new"], a["overflow"], segment_index=a["segment_index"])
    return a


def _prappend(t, **kw):
    a = dict(k_pages=t["kp"].clone(), v_pages=t["vp"].clone(), page_table=t["pt"],
             seg_len=t["psl"].clone(), query=t["qd"], key_new=t["kn"], value_new=t["vn"],
             cos=t["cs"], sin=t["sn"], overflow=None, segment_index=None)
    a.update(kw)
    ops.paged_append_rotary_(a["k_pages"], a["v_pages"], a["page_table"], a["seg_len"],
                             a["query"], a["key_new"], a["value_new"], a["cos"], a["sin"],
                             a["overflow"], segment_index=a["segment_index"])
    return a


def _odd_head_dim(t):
    """Every tensor of a paged_append_rotary_ call with head dim D - 1 (odd)."""
    return dict(k_pages=t["kp"][..., :-1].contiguous(), v_pages=t["vp"][..., :-1].contiguous(),
                query=t["qd"][..., :-1], key_new=t["kn"][..., :-1], value_new=t["vn"][..., :-1],
                cos=t["cs"][..., :-1], sin=t["sn"][..., :-1])


def _pdecode(t, lse=False, **kw):
    a = dict(query=t["qd"], k_pages=t["kp"], v_pages=t["vp"], page_table=t["pt"],
             seg_len=t["psl"], segment_index=None)
    a.update(kw)
    return ops.paged_decode_attention(a["query"], a["k_pages"], a["v_pages"], a["page_table"],
                                      a["seg_len"], return_lse=lse,
                                      segment_index=a["segment_index"])


def _sidx(t, *values):
    """A segment_index on the base's device (the base paged pool has B * Hk = 4 table rows)."""
    return i32(*values).to(t["dev"])


def _segment_index_cases(prefix, fn, op):
    """The segment_index cases shared by paged_append_ and paged_decode_attention(_lse): the
    tensor checks (both backends raise) and the out-of-range values (the CPU raises naming the
    position and value; CUDA treats them as padding, CLAMP)."""
    S = B * Hk
    return [
        (f"{prefix}_sidx_int64", lambda t: fn(t, segment_index=_sidx(t, 3, 2, 1, 0).long()),
         r"adakv: segment_index.*int32", RAISE),
        (f"{prefix}_sidx_rank", lambda t: fn(t, segment_index=_sidx(t, 3, 2, 1, 0).view(2, 2)),
         r"adakv: segment_index.*dimensions", RAISE),
        (f"{prefix}_sidx_noncontiguous", lambda t: fn(t, segment_index=_sidx(t, *range(2 * S))[::2]),
         r"adakv: segment_index.*contiguous", RAISE),
        (f"{prefix}_sidx_length", lambda t: fn(t, segment_index=_sidx(t, 0, 1, 2, 3, -1)),
         r"adakv: .*segment_index has 5", RAISE),
        (f"{prefix}_sidx_empty", lambda t: fn(t, segment_index=_sidx(t)), r"adakv: .*segment_index",
         RAISE),
        (f"{prefix}_sidx_past_rows", lambda t: fn(t, segment_index=_sidx(t, 0, S, 2, -1)),
         rf"adakv: {op}: segment_index\[1\] = {S} is outside \[-1, {S}\)", CLAMP),
        (f"{prefix}_sidx_below_pad", lambda t: fn(t, segment_index=_sidx(t, 0, 1, -2, 3)),
         rf"adakv: {op}: segment_index\[2\] = -2 is outside", CLAMP),
        (f"{prefix}_sidx_int32_max", lambda t: fn(t, segment_index=_sidx(t, I32, 1, 2, 3)),
         rf"adakv: {op}: segment_index\[0\] = {I32} is outside", CLAMP),
        (f"{prefix}_sidx_device", lambda t: fn(t, segment_index=i32(0, 1, 2, 3)),
         r"adakv: segment_index is on .*device", CUDA_ONLY),
    ]


def _noncontig(x):
    return x.transpose(0, 1).contiguous().transpose(0, 1)


def _wide(dev, Dw=1 << 17):
    """Huge-but-legal flat cache: rows = 2^31 - 1 rows of 2^17 values (1 PiB, more than a
    48-bit address space, so the allocation fails even where the kernel overcommits memory):
    must fail with the library's allocation message, not torch's bare one (and never be
    attempted wrapped)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, W, Dw, generator=g).to(dev)
    k = torch.randn(1, 1, N, Dw, generator=g).to(dev)
    return q, k


def _nodata_qkv(dev, Bb, Hh):
    """D = 0 tensors: any B * Hk without memory (sizes near the int32 row limit)."""
    q = torch.empty(Bb, Hh, W, 0, device=dev)
    k = torch.empty(Bb, Hh, N, 0, device=dev)
    return q, k, torch.empty_like(k)


# (name, fn(t), regex the message must match, behaviour)

def _new_token_cases(prefix, fn):
    """The key_new / value_new / overflow cases of an append: append_ and paged_append_ share
    one validator (checks.cpp validate_new_tokens), so they share these cases."""
    return [
        (f"{prefix}_T0", lambda t: fn(t, key_new=t["kn"][:, :, :0].contiguous(), value_new=t["vn"][:, :, :0].contiguous()),
         r"adakv: .*T >= 1", RAISE),
        (f"{prefix}_segments", lambda t: fn(t, key_new=t["kn"].repeat(1, 2, 1, 1), value_new=t["vn"].repeat(1, 2, 1, 1)),
         r"adakv: .*segments", RAISE),
        (f"{prefix}_head_dim", lambda t: fn(t, key_new=t["kn"][..., :-1].contiguous(), value_new=t["vn"][..., :-1].contiguous()),
         r"adakv: .*head dim", RAISE),
        (f"{prefix}_dtype", lambda t: fn(t, key_new=t["kn"].half(), value_new=t["vn"].half()),
         r"adakv: .*key_new.*dtype", RAISE),
        (f"{prefix}_value_shape", lambda t: fn(t, value_new=t["vn"].repeat(1, 1, 2, 1)),
         r"adakv: .*value", RAISE),
        (f"{prefix}_overflow_shape", lambda t: fn(t, overflow=torch.zeros(B * Hk + 1, dtype=torch.int32, device=t["dev"])),
         r"adakv: .*overflow", RAISE),
        (f"{prefix}_overflow_dtype", lambda t: fn(t, overflow=torch.zeros(B * Hk, dtype=torch.int64, device=t["dev"])),
         r"adakv: .*overflow.*int32", RAISE),
    ]

CASES = [
    # ---- score
    ("score_q_rank", lambda t: ops.score(t["q"][0], t["k"]), r"adakv: .*q_window", RAISE),
    ("score_q_int", lambda t: ops.score(t["q"].int(), t["k"].int()), r"adakv: .*q_window.*float", RAISE),
    ("score_dtype_mismatch", lambda t: ops.score(t["q"], t["k"].half()), r"adakv: .*dtype", RAISE),
    ("score_W0", lambda t: ops.score(t["q"][:, :, :0].contiguous(), t["k"]), r"adakv: .*W = 0", RAISE),
    ("score_W_gt_N", lambda t: ops.score(torch.zeros(B, Hq, N + 1, D, device=t["dev"]), t["k"]),
     r"adakv: .*window W", RAISE),
    ("score_N0", lambda t: ops.score(t["q"], t["k"][:, :, :0].contiguous()), r"adakv: .*window W", RAISE),
    ("score_Hk0", lambda t: ops.score(t["q"], t["k"][:, :0].contiguous()), r"adakv: .*KV heads", RAISE),
    ("score_heads", lambda t: ops.score(t["q"][:, :3].contiguous(), t["k"]), r"adakv: .*heads", RAISE),
    ("score_kernel_even", lambda t: ops.score(t["q"], t["k"], kernel_size=4), r"adakv: .*kernel_size", RAISE),
    ("score_kernel_zero", lambda t: ops.score(t["q"], t["k"], kernel_size=0), r"adakv: .*kernel_size", RAISE),
    ("score_kernel_neg", lambda t: ops.score(t["q"], t["k"], kernel_size=-7), r"adakv: .*kernel_size", RAISE),
    ("score_kernel_over_int64", lambda t: ops.score(t["q"], t["k"], kernel_size=2**63 + 1),
     r"adakv: .*kernel_size", RAISE),
    ("score_ks_dtype", lambda t: ops.score(t["q"], t["k"], key_start=i32(0, 0).long().to(t["dev"])),
     r"adakv: .*key_start.*int32", RAISE),
    ("score_ks_shape", lambda t: ops.score(t["q"], t["k"], key_start=i32(0, 0, 0).to(t["dev"])),
     r"adakv: .*key_start", RAISE),
    ("score_ks_gt_N", lambda t: ops.score(t["q"], t["k"], key_start=i32(N + 1, 0).to(t["dev"])),
     r"adakv: .*key_start", CLAMP),
    ("score_ks_neg", lambda t: ops.score(t["q"], t["k"], key_start=i32(-1, 0).to(t["dev"])),
     r"adakv: .*key_start", CLAMP),
    ("score_device", lambda t: ops.score(t["q"], t["k"].to(t["other"])), r"adakv: .*device", CUDA_ONLY),
    # ---- allocate
    ("alloc_budget_neg", lambda t: ops.allocate(t["s"], -1), r"adakv: .*budget", RAISE),
    ("alloc_budget_huge", lambda t: ops.allocate(t["s"], 2**40), r"adakv: .*budget", RAISE),
    ("alloc_budget_int32_times_Hk", lambda t: ops.allocate(t["s"], 2**30), r"adakv: .*budget", RAISE),
    ("alloc_budget_over_int64", lambda t: ops.allocate(t["s"], 2**64), r"adakv: .*budget", RAISE),
    ("alloc_alpha", lambda t: ops.allocate(t["s"], C, floor_alpha=1.5), r"adakv: .*floor_alpha", RAISE),
    ("alloc_alpha_nan", lambda t: ops.allocate(t["s"], C, floor_alpha=NAN), r"adakv: .*floor_alpha", RAISE),
    ("alloc_rounding", lambda t: ops.allocate(t["s"], C, rounding="nearest"), r"adakv: .*rounding", RAISE),
    ("alloc_scores_f64", lambda t: ops.allocate(t["s"].double(), C), r"adakv: .*scores.*float32", RAISE),
    ("alloc_scores_rank", lambda t: ops.allocate(t["s"][0], C), r"adakv: .*scores", RAISE),
    ("alloc_ks_neg", lambda t: ops.allocate(t["s"], C, key_start=i32(-1, 0).to(t["dev"])),
     r"adakv: .*key_start", CLAMP),
    ("alloc_device", lambda t: ops.allocate(t["s"], C, key_start=i32(0, 0)), r"adakv: .*device", CUDA_ONLY),
    # ---- select
    ("select_budgets_neg", lambda t: ops.select(t["s"], with_(t["bud"], (0, 0), -1)), r"adakv: .*budgets", CLAMP),
    ("select_budgets_shape", lambda t: ops.select(t["s"], t["bud"][0].contiguous()), r"adakv: .*budgets", RAISE),
    ("select_budgets_int64", lambda t: ops.select(t["s"], t["bud"].long()), r"adakv: .*budgets.*int32", RAISE),
    ("select_scores_f16", lambda t: ops.select(t["s"].half(), t["bud"]), r"adakv: .*scores", RAISE),
    ("select_ks_neg", lambda t: ops.select(t["s"], t["bud"], key_start=i32(-1, 0).to(t["dev"])),
     r"adakv: .*key_start", CLAMP),
    ("select_device", lambda t: ops.select(t["s"], t["bud"].to(t["other"])), r"adakv: .*device", CUDA_ONLY),
    # ---- compact
    ("compact_idx_ge_L", lambda t: _compact(t, kept_idx=with_(t["idx"], (0, 0, 0), L)), r"adakv: .*kept_idx", CLAMP),
    ("compact_idx_neg", lambda t: _compact(t, kept_idx=with_(t["idx"], (0, 0, 0), -1)), r"adakv: .*kept_idx", CLAMP),
    ("compact_idx_huge", lambda t: _compact(t, kept_idx=with_(t["idx"], (1, 1, 0), I32)), r"adakv: .*kept_idx", CLAMP),
    ("compact_idx_below_key_start", lambda t: _compact(t, kept_idx=with_(t["idx"], (1, 0, 0), 0),
                                                       key_start=i32(0, 3).to(t["dev"])),
     r"adakv: .*kept_idx", CLAMP),
    ("compact_count_gt_budget", lambda t: _compact(t, kept_count=with_(t["cnt"], (0, 0), int(t["bud"][0, 0]) + 1)),
     r"adakv: .*kept_count", CLAMP),
    ("compact_count_huge", lambda t: _compact(t, kept_count=with_(t["cnt"], (0, 1), I32)), r"adakv: .*kept_count", CLAMP),
    ("compact_count_neg", lambda t: _compact(t, kept_count=with_(t["cnt"], (0, 0), -1)), r"adakv: .*kept_count", CLAMP),
    ("compact_budgets_neg", lambda t: _compact(t, budgets=with_(t["bud"], (1, 0), -5), kept_count=t["cnt"] * 0),
     r"adakv: .*budgets", CLAMP),
    ("compact_budgets_huge", lambda t: _compact(t, budgets=torch.full_like(t["bud"], I32)),
     r"adakv: .*(rows|budget)", CLAMP),
    ("compact_window_gt_N", lambda t: _compact(t, window=N + 1), r"adakv: .*window", RAISE),
    ("compact_window_neg", lambda t: _compact(t, window=-1), r"adakv: .*window", RAISE),
    ("compact_window_over_int64", lambda t: _compact(t, window=-(2**70)), r"adakv: .*window", RAISE),
    ("compact_reserve_neg", lambda t: _compact(t, reserve=-1), r"adakv: .*reserve", RAISE),
    ("compact_reserve_2^31", lambda t: _compact(t, reserve=2**31), r"adakv: .*reserve", RAISE),
    ("compact_reserve_near_int64", lambda t: _compact(t, reserve=2**63 - 12), r"adakv: .*reserve", RAISE),
    ("compact_reserve_over_int64", lambda t: _compact(t, reserve=2**64), r"adakv: .*reserve", RAISE),
    ("compact_reserve_sum_over_int32", lambda t: _compact(t, reserve=I32), r"adakv: .*(rows|reserve)", CLAMP),
    ("compact_rows_small", lambda t: _compact(t, rows=3), r"adakv: .*rows", CLAMP),
    ("compact_rows_neg", lambda t: _compact(t, rows=-1), r"adakv: .*rows", RAISE),
    ("compact_rows_huge", lambda t: _compact(t, rows=2**40), r"adakv: .*rows", RAISE),
    ("compact_rows_over_int64", lambda t: _compact(t, rows=2**65), r"adakv: .*rows", RAISE),
    ("compact_ks_gt_N", lambda t: _compact(t, key_start=i32(0, N + 1).to(t["dev"])), r"adakv: .*key_start", CLAMP),
    ("compact_idx_shape", lambda t: _compact(t, kept_idx=t["idx"][:, :, :-1].contiguous()), r"adakv: .*kept_idx", RAISE),
    ("compact_idx_int64", lambda t: _compact(t, kept_idx=t["idx"].long()), r"adakv: .*kept_idx.*int32", RAISE),
    ("compact_count_shape", lambda t: _compact(t, kept_count=t["cnt"][:1].contiguous()), r"adakv: .*kept_count", RAISE),
    ("compact_value_dtype", lambda t: _compact(t, value=t["v"].half()), r"adakv: .*value", RAISE),
    ("compact_alloc_fail", lambda t: ops.compact(
        _wide(t["dev"])[1], _wide(t["dev"])[1], torch.zeros(1, 1, L, dtype=torch.int32, device=t["dev"]),
        torch.zeros(1, 1, dtype=torch.int32, device=t["dev"]),
        torch.zeros(1, 1, dtype=torch.int32, device=t["dev"]), W, reserve=I32 - W, rows=I32),
     r"adakv: compact: could not allocate \d+ bytes for k_flat", RAISE),
    ("compact_device", lambda t: _compact(t, budgets=t["bud"].to(t["other"])), r"adakv: .*device", CUDA_ONLY),
    # ---- evict
    ("evict_reserve_near_int64", lambda t: ops.evict(t["q"], t["k"], t["v"], 8, reserve=2**63 - 12),
     r"adakv: .*reserve", RAISE),
    ("evict_reserve_neg", lambda t: ops.evict(t["q"], t["k"], t["v"], C, reserve=-1), r"adakv: .*reserve", RAISE),
    ("evict_reserve_2^31", lambda t: ops.evict(t["q"], t["k"], t["v"], C, reserve=2**31), r"adakv: .*reserve", RAISE),
    ("evict_reserve_over_int64", lambda t: ops.evict(t["q"], t["k"], t["v"], C, reserve=2**64), r"adakv: .*reserve", RAISE),
    ("evict_reserve_int32_rows", lambda t: ops.evict(t["q"], t["k"], t["v"], C, reserve=I32 - 20),
     r"adakv: .*reserve.*2\^31 - 1", RAISE),
    ("evict_budget_neg", lambda t: ops.evict(t["q"], t["k"], t["v"], -1), r"adakv: .*budget", RAISE),
    ("evict_budget_int32_rows", lambda t: ops.evict(t["q"], t["k"], t["v"], I32), r"adakv: .*budget.*2\^31 - 1", RAISE),
    ("evict_budget_wrap_mul", lambda t: ops.evict(t["q"], t["k"], t["v"], 2**62), r"adakv: .*budget", RAISE),
    ("evict_budget_wrap_add", lambda t: ops.evict(t["q"], t["k"], t["v"], 2**63 - 3), r"adakv: .*budget", RAISE),
    ("evict_budget_over_int64", lambda t: ops.evict(t["q"], t["k"], t["v"], 2**63), r"adakv: .*budget", RAISE),
    ("evict_rows_B_Hk", lambda t: ops.evict(*_nodata_qkv(t["dev"], 2**14, 2**14), C),
     r"adakv: .*B \* Hk \* \(budget \+ window \+ reserve\)", RAISE),
    ("evict_official_reserve_huge", lambda t: ops.evict(t["q"], t["k"], t["v"], C, rounding="official",
                                                        reserve=2**40), r"adakv: .*reserve", RAISE),
    ("evict_official_budget_neg", lambda t: ops.evict(t["q"], t["k"], t["v"], -3, rounding="official"),
     r"adakv: .*budget", RAISE),
    ("evict_kernel_even", lambda t: ops.evict(t["q"], t["k"], t["v"], C, kernel_size=6), r"adakv: .*kernel_size", RAISE),
    ("evict_kernel_over_int64", lambda t: ops.evict(t["q"], t["k"], t["v"], C, kernel_size=-(2**64)),
     r"adakv: .*kernel_size", RAISE),
    ("evict_alpha", lambda t: ops.evict(t["q"], t["k"], t["v"], C, floor_alpha=-0.5), r"adakv: .*floor_alpha", RAISE),
    ("evict_value_dtype", lambda t: ops.evict(t["q"], t["k"], t["v"].half(), C), r"adakv: .*value", RAISE),
    ("evict_value_shape", lambda t: ops.evict(t["q"], t["k"], t["v"][:, :, :-1].contiguous(), C),
     r"adakv: .*value", RAISE),
    ("evict_ks_gt_N", lambda t: ops.evict(t["q"], t["k"], t["v"], C, key_start=i32(0, N + 1).to(t["dev"])),
     r"adakv: .*key_start", CLAMP),
    ("evict_alloc_fail", lambda t: ops.evict(_wide(t["dev"])[0], _wide(t["dev"])[1], _wide(t["dev"])[1], 0,
                                             reserve=I32 - W),
     r"adakv: .*could not allocate \d+ bytes for k_flat", RAISE),
    ("evict_device", lambda t: ops.evict(t["q"], t["k"], t["v"].to(t["other"]), C), r"adakv: .*device", CUDA_ONLY),
    # ---- append_
    ("append_overflow", lambda t: _append(t, key_new=t["kn"].repeat(1, 1, R + 1, 1), value_new=t["vn"].repeat(1, 1, R + 1, 1)),
     r"adakv: append_ .*capacity", CLAMP),
    ("append_seg_start_nonmonotonic", lambda t: _append(t, seg_start=t["ss"].flip(0).contiguous()),
     r"adakv: .*seg_start", CLAMP),
    ("append_seg_start_neg", lambda t: _append(t, seg_start=with_(t["ss"], 0, -1)), r"adakv: .*seg_start", CLAMP),
    ("append_seg_start_past_rows", lambda t: _append(t, seg_start=with_(t["ss"], -1, t["kf"].shape[0] + 5)),
     r"adakv: .*seg_start", CLAMP),
    ("append_seg_start_int32_max", lambda t: _append(t, seg_start=with_(t["ss"], 1, I32)), r"adakv: .*seg_start", CLAMP),
    ("append_seg_len_neg", lambda t: _append(t, seg_len=with_(t["sl"], 0, -1)), r"adakv: .*seg_len", CLAMP),
    ("append_seg_len_gt_capacity", lambda t: _append(t, seg_len=with_(t["sl"], 0, C + W + R + 1)),
     r"adakv: .*capacity", CLAMP),
    ("append_seg_len_int32_max", lambda t: _append(t, seg_len=with_(t["sl"], 2, I32)), r"adakv: .*capacity", CLAMP),
    *_new_token_cases("append", _append),
    ("append_seg_start_int64", lambda t: _append(t, seg_start=t["ss"].long()), r"adakv: .*seg_start.*int32", RAISE),
    ("append_seg_len_count", lambda t: _append(t, seg_len=t["sl"][:-1].clone()), r"adakv: .*seg_len", RAISE),
    ("append_k_flat_rank", lambda t: _append(t, k_flat=t["kf"].unsqueeze(0).clone()), r"adakv: .*k_flat", RAISE),
    ("append_v_flat_shape", lambda t: _append(t, v_flat=t["vf"][:-1].clone()), r"adakv: .*v_flat", RAISE),
    ("append_device", lambda t: _append(t, key_new=t["kn"].to(t["other"])), r"adakv: .*device", CUDA_ONLY),
]
for _lse in (False, True):
    _p = "decode_lse" if _lse else "decode"
    CASES += [
        (f"{_p}_seg_start_neg", lambda t, l=_lse: _decode(t, l, seg_start=with_(t["ss"], 0, -1)), r"adakv: segment 0", CLAMP),
        (f"{_p}_seg_past_rows", lambda t, l=_lse: _decode(t, l, seg_len=with_(t["sl"], -1, t["kf"].shape[0])),
         r"adakv: segment 3", CLAMP),
        (f"{_p}_seg_len_neg", lambda t, l=_lse: _decode(t, l, seg_len=with_(t["sl"], 1, -4)), r"adakv: segment 1", CLAMP),
        (f"{_p}_seg_start_int32_max", lambda t, l=_lse: _decode(t, l, seg_start=with_(t["ss"], 2, I32)),
         r"adakv: segment 2", CLAMP),
        (f"{_p}_seg_len_int32_max", lambda t, l=_lse: _decode(t, l, seg_len=with_(t["sl"], 2, I32)), r"adakv: segment 2", CLAMP),
        (f"{_p}_batch", lambda t, l=_lse: _decode(t, l, query=t["qd"][:1].repeat(3, 1, 1, 1)), r"adakv: .*batch", RAISE),
        (f"{_p}_B0", lambda t, l=_lse: _decode(t, l, query=t["qd"][:0].contiguous()), r"adakv: .*batch", RAISE),
        (f"{_p}_heads", lambda t, l=_lse: _decode(t, l, query=t["qd"][:, :3].contiguous()), r"adakv: .*heads", RAISE),
        (f"{_p}_head_dim", lambda t, l=_lse: _decode(t, l, query=t["qd"][..., :-1].contiguous()), r"adakv: .*head dim", RAISE),
        (f"{_p}_dtype", lambda t, l=_lse: _decode(t, l, query=t["qd"].half()), r"adakv: .*dtype", RAISE),
        (f"{_p}_query_rank", lambda t, l=_lse: _decode(t, l, query=t["qd"][0]), r"adakv: .*query", RAISE),
        (f"{_p}_T0", lambda t, l=_lse: _decode(t, l, query=t["qd"][:, :, :0].contiguous()), r"adakv: .*T >= 1", RAISE),
        (f"{_p}_k_flat_int", lambda t, l=_lse: _decode(t, l, k_flat=t["kf"].int(), v_flat=t["vf"].int()),
         r"adakv: .*k_flat.*float", RAISE),
        (f"{_p}_seg_len_int64", lambda t, l=_lse: _decode(t, l, seg_len=t["sl"].long()), r"adakv: .*seg_len.*int32", RAISE),
        (f"{_p}_seg_count", lambda t, l=_lse: _decode(t, l, seg_start=t["ss"][:-1].contiguous()),
         r"adakv: .*seg_start", RAISE),
        (f"{_p}_device", lambda t, l=_lse: _decode(t, l, seg_start=t["ss"].to(t["other"])), r"adakv: .*device", CUDA_ONLY),
    ]
# ---- paged storage (docs/semantics.md "Paged storage")
CASES += [
    ("pcompact_page_past_pool", lambda t: _pcompact(t, page_table=with_(t["pt"], (0, 0), NP)),
     r"adakv: paged_compact_: page_table\[0, 0\]", CLAMP),
    ("pcompact_page_neg", lambda t: _pcompact(t, page_table=with_(t["pt"], (1, 1), -1)),
     r"adakv: paged_compact_: page_table\[1, 1\]", CLAMP),
    ("pcompact_page_int32_max", lambda t: _pcompact(t, page_table=with_(t["pt"], (3, 0), I32)),
     r"adakv: paged_compact_: page_table\[3, 0\]", CLAMP),
    ("pcompact_shared_page", lambda t: _pcompact(t, page_table=with_(t["pt"], (2, 1), int(t["pt"][0, 0]))),
     r"adakv: paged_compact_: page \d+ is used twice", CLAMP),
    ("pcompact_page_twice_in_segment", lambda t: _pcompact(t, page_table=with_(t["pt"], (1, 1), int(t["pt"][1, 0]))),
     r"adakv: paged_compact_: page \d+ is used twice", CLAMP),
    ("pcompact_table_too_short", lambda t: _pcompact(t, page_table=t["pt"][:, :1].contiguous()),
     r"adakv: paged_compact_: segment 0 needs .* page_table", CLAMP),
    ("pcompact_count_huge", lambda t: _pcompact(t, kept_count=with_(t["cnt"], (0, 1), I32)),
     r"adakv: .*kept_count", CLAMP),
    ("pcompact_count_neg", lambda t: _pcompact(t, kept_count=with_(t["cnt"], (1, 0), -1)),
     r"adakv: .*kept_count", CLAMP),
    ("pcompact_idx_ge_L", lambda t: _pcompact(t, kept_idx=with_(t["idx"], (0, 0, 0), L)),
     r"adakv: .*kept_idx", CLAMP),
    ("pcompact_ks_gt_N", lambda t: _pcompact(t, key_start=i32(0, N + 1).to(t["dev"])),
     r"adakv: .*key_start", CLAMP),
    ("pcompact_window_gt_N", lambda t: _pcompact(t, window=N + 1), r"adakv: .*window", RAISE),
    ("pcompact_window_over_int64", lambda t: _pcompact(t, window=2**70), r"adakv: .*window", RAISE),
    ("pcompact_v_pages_dtype", lambda t: _pcompact(t, v_pages=t["vp"].half()), r"adakv: .*v_pages.*dtype", RAISE),
    ("pcompact_key_dtype", lambda t: _pcompact(t, key=t["k"].half(), value=t["v"].half()),
     r"adakv: .*key .*dtype", RAISE),
    ("pcompact_head_dim", lambda t: _pcompact(t, k_pages=t["kp"][..., :-1].contiguous(),
                                              v_pages=t["vp"][..., :-1].contiguous()),
     r"adakv: .*head dim", RAISE),
    ("pcompact_pool_rank", lambda t: _pcompact(t, k_pages=t["kp"][0].clone()), r"adakv: .*k_pages", RAISE),
    ("pcompact_pool_P0", lambda t: _pcompact(t, k_pages=t["kp"][:, :0].contiguous(), v_pages=t["vp"][:, :0].contiguous()),
     r"adakv: .*page size P >= 1", RAISE),
    ("pcompact_pool_noncontiguous", lambda t: _pcompact(t, k_pages=_noncontig(t["kp"])),
     r"adakv: .*k_pages.*contiguous", RAISE),
    ("pcompact_table_int64", lambda t: _pcompact(t, page_table=t["pt"].long()), r"adakv: .*page_table.*int32", RAISE),
    ("pcompact_table_rank", lambda t: _pcompact(t, page_table=t["pt"].view(-1)), r"adakv: .*page_table", RAISE),
    ("pcompact_table_rows", lambda t: _pcompact(t, page_table=t["pt"][:-1].contiguous()), r"adakv: .*page_table", RAISE),
    ("pcompact_segments", lambda t: _pcompact(t, page_table=t["pt"].repeat(2, 1), seg_len=t["psl"].repeat(2)),
     r"adakv: .*segments", RAISE),
    ("pcompact_seg_len_count", lambda t: _pcompact(t, seg_len=t["psl"][:-1].clone()), r"adakv: .*seg_len", RAISE),
    ("pcompact_device", lambda t: _pcompact(t, page_table=t["pt"].to(t["other"])), r"adakv: .*device", CUDA_ONLY),
    ("pappend_overflow", lambda t: _pappend(t, key_new=t["kn"].repeat(1, 1, PW * PP, 1),
                                            value_new=t["vn"].repeat(1, 1, PW * PP, 1)),
     r"adakv: paged_append_ of \d+ tokens exceeds", CLAMP),
    ("pappend_seg_len_neg", lambda t: _pappend(t, seg_len=with_(t["psl"], 0, -1)), r"adakv: .*seg_len\[0\]", CLAMP),
    ("pappend_seg_len_int32_max", lambda t: _pappend(t, seg_len=with_(t["psl"], 2, I32)),
     r"adakv: paged_append_ .*segment 2", CLAMP),
    ("pappend_page_past_pool", lambda t: _pappend(t, page_table=with_(t["pt"], (1, int(t["psl"][1]) // PP), NP)),
     r"adakv: paged_append_: page_table\[1, ", CLAMP),
    ("pappend_page_neg", lambda t: _pappend(t, page_table=with_(t["pt"], (3, int(t["psl"][3]) // PP), -1)),
     r"adakv: paged_append_: page_table\[3, ", CLAMP),
    *_new_token_cases("pappend", _pappend),
    *_segment_index_cases("pappend", _pappend, "paged_append_"),
    ("pappend_sidx_repeated", lambda t: _pappend(t, segment_index=_sidx(t, 3, 1, -1, 1)),
     r"adakv: paged_append_: segment_index\[3\] = 1 repeats segment_index\[1\]", CLAMP),
    ("pappend_sidx_overflow_shape", lambda t: _pappend(
        t, segment_index=_sidx(t, 3, 1, -1, 0), page_table=t["pt"][:2].contiguous(),
        seg_len=t["psl"][:2].clone(), overflow=torch.zeros(2, dtype=torch.int32, device=t["dev"])),
     r"adakv: overflow must have shape \[4\]", RAISE),
    ("pappend_pool_shape", lambda t: _pappend(t, v_pages=t["vp"][:-1].clone()), r"adakv: .*v_pages", RAISE),
    ("pappend_device", lambda t: _pappend(t, key_new=t["kn"].to(t["other"])), r"adakv: .*device", CUDA_ONLY),
    # ---- paged_append_rotary_: paged_append_'s metadata and new-token cases, plus its own
    ("prappend_overflow", lambda t: _prappend(t, key_new=t["kn"].repeat(1, 1, PW * PP, 1),
                                              value_new=t["vn"].repeat(1, 1, PW * PP, 1),
                                              query=t["qd"].repeat(1, 1, PW * PP, 1),
                                              cos=t["cs"].repeat(1, PW * PP, 1),
                                              sin=t["sn"].repeat(1, PW * PP, 1)),
     r"adakv: paged_append_rotary_ of \d+ tokens exceeds", CLAMP),
    ("prappend_seg_len_neg", lambda t: _prappend(t, seg_len=with_(t["psl"], 0, -1)),
     r"adakv: paged_append_rotary_: seg_len\[0\]", CLAMP),
    ("prappend_seg_len_int32_max", lambda t: _prappend(t, seg_len=with_(t["psl"], 2, I32)),
     r"adakv: paged_append_rotary_ .*segment 2", CLAMP),
    ("prappend_page_past_pool", lambda t: _prappend(t, page_table=with_(t["pt"], (1, int(t["psl"][1]) // PP), NP)),
     r"adakv: paged_append_rotary_: page_table\[1, ", CLAMP),
    ("prappend_page_neg", lambda t: _prappend(t, page_table=with_(t["pt"], (3, int(t["psl"][3]) // PP), -1)),
     r"adakv: paged_append_rotary_: page_table\[3, ", CLAMP),
    *_new_token_cases("prappend", _prappend),
    *_segment_index_cases("prappend", _prappend, "paged_append_rotary_"),
    ("prappend_sidx_repeated", lambda t: _prappend(t, segment_index=_sidx(t, 3, 1, -1, 1)),
     r"adakv: paged_append_rotary_: segment_index\[3\] = 1 repeats segment_index\[1\]", CLAMP),
    ("prappend_query_batch", lambda t: _prappend(t, query=t["qd"].repeat(2, 1, 1, 1)),
     r"adakv: query has shape \[4, 4, 1, 8\] but key_new", RAISE),
    ("prappend_query_tokens", lambda t: _prappend(t, query=t["qd"].repeat(1, 1, 2, 1)),
     r"adakv: query has shape .* with key_new's B, T and D", RAISE),
    ("prappend_query_heads", lambda t: _prappend(t, query=t["qd"][:, :3]),
     r"adakv: query heads \(3\) must be a multiple of KV heads \(2", RAISE),
    ("prappend_query_dtype", lambda t: _prappend(t, query=t["qd"].double()),
     r"adakv: query .*float32, float16 or bfloat16", RAISE),
    ("prappend_query_rank", lambda t: _prappend(t, query=t["qd"][0]), r"adakv: query .*4 dimensions", RAISE),
    ("prappend_query_last_stride", lambda t: _prappend(t, query=t["qd"].repeat(1, 1, 1, 2)[..., ::2]),
     r"adakv: query .*stride 1 in its last dimension", RAISE),
    ("prappend_key_last_stride", lambda t: _prappend(t, key_new=t["kn"].repeat(1, 1, 1, 2)[..., ::2]),
     r"adakv: key_new .*stride 1 in its last dimension", RAISE),
    ("prappend_value_last_stride", lambda t: _prappend(t, value_new=t["vn"].repeat(1, 1, 1, 2)[..., ::2]),
     r"adakv: value .*stride 1 in its last dimension", RAISE),
    ("prappend_head_dim_odd", lambda t: _prappend(t, **_odd_head_dim(t)),
     r"adakv: paged_append_rotary_ .*head dim must be even, got D = 7", RAISE),
    ("prappend_cos_rank", lambda t: _prappend(t, cos=t["cs"][:, 0]), r"adakv: cos .*3 dimensions", RAISE),
    ("prappend_cos_batch", lambda t: _prappend(t, cos=t["cs"].repeat(2, 1, 1), sin=t["sn"].repeat(2, 1, 1)),
     r"adakv: cos \[B, T, D\] must have shape \[B, T, D\] = \[2, 1, 8\] \(or \[1, T, D\]", RAISE),
    ("prappend_cos_tokens", lambda t: _prappend(t, cos=t["cs"].repeat(1, 2, 1)),
     r"adakv: cos .*must have shape", RAISE),
    ("prappend_cos_dim", lambda t: _prappend(t, cos=t["cs"][..., :4]), r"adakv: cos .*must have shape", RAISE),
    ("prappend_cos_dtype", lambda t: _prappend(t, cos=t["cs"].half(), sin=t["sn"].half()),
     r"adakv: cos .*must be float32 or the K/V dtype", RAISE),
    ("prappend_cos_int", lambda t: _prappend(t, cos=t["cs"].int()), r"adakv: cos .*float32", RAISE),
    ("prappend_cos_last_stride", lambda t: _prappend(t, cos=t["cs"].repeat(1, 1, 2)[..., ::2]),
     r"adakv: cos .*stride 1 in its last dimension", RAISE),
    ("prappend_sin_shape", lambda t: _prappend(t, sin=t["sn"][:1]), r"adakv: sin has shape \[1, 1, 8\] but cos", RAISE),
    ("prappend_device", lambda t: _prappend(t, query=t["qd"].to(t["other"])), r"adakv: .*device", CUDA_ONLY),
    ("prappend_cos_device", lambda t: _prappend(t, cos=t["cs"].to(t["other"])), r"adakv: .*device", CUDA_ONLY),
]
for _lse in (False, True):
    _p = "pdecode_lse" if _lse else "pdecode"
    CASES += [
        (f"{_p}_seg_len_neg", lambda t, l=_lse: _pdecode(t, l, seg_len=with_(t["psl"], 1, -4)),
         r"adakv: .*seg_len\[1\]", CLAMP),
        (f"{_p}_seg_len_past_table", lambda t, l=_lse: _pdecode(t, l, seg_len=with_(t["psl"], 3, PW * PP + 1)),
         r"adakv: .*seg_len\[3\]", CLAMP),
        (f"{_p}_seg_len_int32_max", lambda t, l=_lse: _pdecode(t, l, seg_len=with_(t["psl"], 2, I32)),
         r"adakv: .*seg_len\[2\]", CLAMP),
        (f"{_p}_page_past_pool", lambda t, l=_lse: _pdecode(t, l, page_table=with_(t["pt"], (2, 0), NP)),
         r"adakv: .*page_table\[2, 0\]", CLAMP),
        (f"{_p}_page_neg", lambda t, l=_lse: _pdecode(t, l, page_table=with_(t["pt"], (0, 1), -1)),
         r"adakv: .*page_table\[0, 1\]", CLAMP),
        (f"{_p}_table_too_short", lambda t, l=_lse: _pdecode(t, l, page_table=t["pt"][:, :1].contiguous()),
         r"adakv: .*seg_len\[0\]", CLAMP),
        (f"{_p}_batch", lambda t, l=_lse: _pdecode(t, l, query=t["qd"][:1].repeat(3, 1, 1, 1)), r"adakv: .*batch", RAISE),
        (f"{_p}_B0", lambda t, l=_lse: _pdecode(t, l, query=t["qd"][:0].contiguous()), r"adakv: .*batch", RAISE),
        (f"{_p}_heads", lambda t, l=_lse: _pdecode(t, l, query=t["qd"][:, :3].contiguous()), r"adakv: .*heads", RAISE),
        (f"{_p}_head_dim", lambda t, l=_lse: _pdecode(t, l, query=t["qd"][..., :-1].contiguous()), r"adakv: .*head dim", RAISE),
        (f"{_p}_dtype", lambda t, l=_lse: _pdecode(t, l, query=t["qd"].half()), r"adakv: .*dtype", RAISE),
        (f"{_p}_query_rank", lambda t, l=_lse: _pdecode(t, l, query=t["qd"][0]), r"adakv: .*query", RAISE),
        (f"{_p}_T0", lambda t, l=_lse: _pdecode(t, l, query=t["qd"][:, :, :0].contiguous()), r"adakv: .*T >= 1", RAISE),
        (f"{_p}_pool_int", lambda t, l=_lse: _pdecode(t, l, k_pages=t["kp"].int(), v_pages=t["vp"].int()),
         r"adakv: .*k_pages.*float", RAISE),
        (f"{_p}_table_rank", lambda t, l=_lse: _pdecode(t, l, page_table=t["pt"][0]), r"adakv: .*page_table", RAISE),
        (f"{_p}_seg_len_int64", lambda t, l=_lse: _pdecode(t, l, seg_len=t["psl"].long()), r"adakv: .*seg_len.*int32", RAISE),
        (f"{_p}_device", lambda t, l=_lse: _pdecode(t, l, seg_len=t["psl"].to(t["other"])), r"adakv: .*device", CUDA_ONLY),
        *_segment_index_cases(_p, lambda t, l=_lse, **kw: _pdecode(t, l, **kw), "paged_decode_attention"),
        (f"{_p}_sidx_heads", lambda t, l=_lse: _pdecode(t, l, segment_index=_sidx(t, 0, 1, 2, 3, -1, -1)),
         r"adakv: .*KV heads \(3 = segments of segment_index / batch\)", RAISE),
        (f"{_p}_sidx_row_seg_len_bad", lambda t, l=_lse: _pdecode(
            t, l, seg_len=with_(t["psl"], 2, -4), segment_index=_sidx(t, 0, 1, 2, -1)),
         r"adakv: .*seg_len\[2\]", CLAMP),
    ]
# ---- the follow-up building blocks (defensive_score, value_norm)
CASES += [
    ("defensive_q_rank", lambda t: ops.defensive_score(t["q"][0], t["k"]), r"adakv: .*q_window", RAISE),
    ("defensive_key_rank", lambda t: ops.defensive_score(t["q"], t["k"][0]), r"adakv: .*key", RAISE),
    ("defensive_q_int", lambda t: ops.defensive_score(t["q"].int(), t["k"].int()),
     r"adakv: .*q_window.*float", RAISE),
    ("defensive_dtype_mismatch", lambda t: ops.defensive_score(t["q"], t["k"].bfloat16()),
     r"adakv: key has dtype", RAISE),
    ("defensive_key_noncontiguous", lambda t: ops.defensive_score(t["q"], _noncontig(t["k"])),
     r"adakv: key.*contiguous", RAISE),
    ("defensive_q_noncontiguous", lambda t: ops.defensive_score(_noncontig(t["q"]), t["k"]),
     r"adakv: q_window.*contiguous", RAISE),
    ("defensive_heads", lambda t: ops.defensive_score(t["q"][:, :3].contiguous(), t["k"]),
     r"adakv: .*multiple of KV heads", RAISE),
    ("defensive_Hk0", lambda t: ops.defensive_score(t["q"], t["k"][:, :0].contiguous()),
     r"adakv: .*KV heads", RAISE),
    ("defensive_batch", lambda t: ops.defensive_score(t["q"][:1].contiguous(), t["k"]),
     r"adakv: key has batch", RAISE),
    ("defensive_head_dim", lambda t: ops.defensive_score(t["q"][..., :-1].contiguous(), t["k"]),
     r"adakv: key has head dim", RAISE),
    ("defensive_W0", lambda t: ops.defensive_score(t["q"][:, :, :0].contiguous(), t["k"]),
     r"adakv: .*W = 0", RAISE),
    ("defensive_W_gt_N", lambda t: ops.defensive_score(torch.zeros(B, Hq, N + 1, D, device=t["dev"]), t["k"]),
     r"adakv: .*window W", RAISE),
    ("defensive_kernel_even", lambda t: ops.defensive_score(t["q"], t["k"], kernel_size=4),
     r"adakv: .*kernel_size", RAISE),
    ("defensive_kernel_zero", lambda t: ops.defensive_score(t["q"], t["k"], kernel_size=0),
     r"adakv: .*kernel_size", RAISE),
    ("defensive_kernel_neg", lambda t: ops.defensive_score(t["q"], t["k"], kernel_size=-5),
     r"adakv: .*kernel_size", RAISE),
    ("defensive_kernel_over_int64", lambda t: ops.defensive_score(t["q"], t["k"], kernel_size=2**63 + 1),
     r"adakv: .*kernel_size", RAISE),
    ("defensive_ks_dtype", lambda t: ops.defensive_score(t["q"], t["k"], key_start=i32(0, 0).long().to(t["dev"])),
     r"adakv: .*key_start.*int32", RAISE),
    ("defensive_ks_shape", lambda t: ops.defensive_score(t["q"], t["k"], key_start=i32(0, 0, 0).to(t["dev"])),
     r"adakv: .*key_start", RAISE),
    ("defensive_ks_gt_N", lambda t: ops.defensive_score(t["q"], t["k"], key_start=i32(0, N + 1).to(t["dev"])),
     r"adakv: key_start\[1\] = 25 is outside", CLAMP),
    ("defensive_ks_neg", lambda t: ops.defensive_score(t["q"], t["k"], key_start=i32(-1, 0).to(t["dev"])),
     r"adakv: key_start\[0\] = -1 is outside", CLAMP),
    ("defensive_ks_int32_max", lambda t: ops.defensive_score(t["q"], t["k"], key_start=i32(0, I32).to(t["dev"])),
     r"adakv: key_start\[1\]", CLAMP),
    # legal sizes whose outputs (2^48 * L floats) exceed any address space: a clear allocation
    # error before any work
    ("defensive_alloc_fail", lambda t: ops.defensive_score(*_nodata_qkv(t["dev"], 2**24, 2**24)[:2]),
     r"adakv: defensive_score: could not allocate \d+ bytes for the scores", RAISE),
    ("vnorm_value_rank", lambda t: ops.value_norm(t["v"][0], t["o"]), r"adakv: value .*dimensions", RAISE),
    ("vnorm_o_rank", lambda t: ops.value_norm(t["v"], t["o"].view(-1)), r"adakv: o_proj_weight .*dimensions", RAISE),
    ("vnorm_value_int", lambda t: ops.value_norm(t["v"].int(), t["o"].int()), r"adakv: value.*float", RAISE),
    ("vnorm_value_f64", lambda t: ops.value_norm(t["v"].double(), t["o"].double()), r"adakv: value.*float", RAISE),
    ("vnorm_dtype_mismatch", lambda t: ops.value_norm(t["v"], t["o"].half()),
     r"adakv: o_proj_weight has dtype", RAISE),
    ("vnorm_value_noncontiguous", lambda t: ops.value_norm(_noncontig(t["v"]), t["o"]),
     r"adakv: value.*contiguous", RAISE),
    ("vnorm_o_noncontiguous", lambda t: ops.value_norm(t["v"], t["o"].t().contiguous().t()),
     r"adakv: o_proj_weight.*contiguous", RAISE),
    ("vnorm_heads_not_multiple", lambda t: ops.value_norm(t["v"], t["o"][:, : 3 * D].contiguous()),
     r"adakv: o_proj_weight must be \[hidden, Hq \* D\] .*Hk = 2", RAISE),
    ("vnorm_width_not_multiple_of_D", lambda t: ops.value_norm(t["v"], t["o"][:, :-1].contiguous()),
     r"adakv: o_proj_weight must be \[hidden, Hq \* D\]", RAISE),
    ("vnorm_width0", lambda t: ops.value_norm(t["v"], t["o"][:, :0].contiguous()),
     r"adakv: o_proj_weight must be", RAISE),
    ("vnorm_D0", lambda t: ops.value_norm(t["v"][..., :0].contiguous(), t["o"]), r"adakv: value .*head dim", RAISE),
    ("vnorm_Hk0", lambda t: ops.value_norm(t["v"][:, :0].contiguous(), t["o"]), r"adakv: value .*KV head", RAISE),
    ("vnorm_length_neg", lambda t: ops.value_norm(t["v"], t["o"], length=-1), r"adakv: length must be in \[0, N = 24\]", RAISE),
    ("vnorm_length_gt_N", lambda t: ops.value_norm(t["v"], t["o"], length=N + 1), r"adakv: length", RAISE),
    ("vnorm_length_huge", lambda t: ops.value_norm(t["v"], t["o"], length=2**62), r"adakv: length", RAISE),
    ("vnorm_length_over_int64", lambda t: ops.value_norm(t["v"], t["o"], length=2**64), r"adakv: length", RAISE),
]


# ---- the decode step's GEMM (decode_gemm: y = x weight^T + bias, at most 256 rows)
def _gemm(t, M=4, N=24, K=16, dtype=torch.bfloat16, **kw):
    x = kw.pop("x", None)
    w = kw.pop("w", None)
    x = torch.randn(M, K, device=t["dev"]).to(dtype) if x is None else x
    w = torch.randn(N, K, device=t["dev"]).to(dtype) if w is None else w
    return torch.ops.adakv.decode_gemm(x, w, kw.pop("bias", None), kw.pop("split", 0))


CASES += [
    ("gemm_x_rank", lambda t: _gemm(t, x=torch.zeros(2, 4, 16, device=t["dev"], dtype=torch.bfloat16)),
     r"adakv: x \[M, K\] must have 2 dimensions", RAISE),
    ("gemm_w_rank", lambda t: _gemm(t, w=torch.zeros(24 * 16, device=t["dev"], dtype=torch.bfloat16)),
     r"adakv: weight \[N, K\] must have 2 dimensions", RAISE),
    ("gemm_K_mismatch", lambda t: _gemm(t, w=torch.zeros(24, 8, device=t["dev"], dtype=torch.bfloat16)),
     r"adakv: weight must be \[N, K\] with K = 16", RAISE),
    ("gemm_dtype_mismatch", lambda t: _gemm(t, w=torch.zeros(24, 16, device=t["dev"], dtype=torch.float16)),
     r"adakv: weight has dtype", RAISE),
    ("gemm_int", lambda t: _gemm(t, dtype=torch.int32, x=torch.zeros(4, 16, dtype=torch.int32, device=t["dev"]),
                                 w=torch.zeros(24, 16, dtype=torch.int32, device=t["dev"])),
     r"adakv: x \[M, K\] must be float32, float16 or bfloat16", RAISE),
    ("gemm_rows_257", lambda t: _gemm(t, M=257), r"adakv: decode_gemm takes at most 256 rows", RAISE),
    ("gemm_rows_huge", lambda t: _gemm(t, x=torch.empty(2**40, 0, device=t["dev"]).bfloat16(),
                                       w=torch.zeros(24, 0, device=t["dev"]).bfloat16()),
     r"adakv: decode_gemm takes at most 256 rows", RAISE),
    ("gemm_x_noncontiguous", lambda t: _gemm(t, x=torch.zeros(16, 4, device=t["dev"]).bfloat16().t()),
     r"adakv: x \[M, K\] must be contiguous", RAISE),
    ("gemm_w_noncontiguous", lambda t: _gemm(t, w=torch.zeros(16, 24, device=t["dev"]).bfloat16().t()),
     r"adakv: weight \[N, K\] must be contiguous", RAISE),
    ("gemm_bias_shape", lambda t: _gemm(t, bias=torch.zeros(23, device=t["dev"]).bfloat16()),
     r"adakv: bias must have shape \[N\] = \[24\]", RAISE),
    ("gemm_bias_rank", lambda t: _gemm(t, bias=torch.zeros(1, 24, device=t["dev"]).bfloat16()),
     r"adakv: bias \[N\] must have 1 dimensions", RAISE),
    ("gemm_bias_dtype", lambda t: _gemm(t, bias=torch.zeros(24, device=t["dev"])),
     r"adakv: bias has dtype", RAISE),
    ("gemm_bias_device", lambda t: _gemm(t, bias=torch.zeros(24, dtype=torch.bfloat16, device=t["other"])),
     r"adakv: bias is on", CUDA_ONLY),
    ("gemm_w_device", lambda t: _gemm(t, w=torch.zeros(24, 16, dtype=torch.bfloat16, device=t["other"])),
     r"adakv: weight is on", CUDA_ONLY),
    ("gemm_split_neg", lambda t: _gemm(t, split=-1), r"adakv: split must be in \[0, 8\]", RAISE),
    ("gemm_split_9", lambda t: _gemm(t, split=9), r"adakv: split must be in \[0, 8\]", RAISE),
    ("gemm_split_huge", lambda t: _gemm(t, split=2**62), r"adakv: split must be in \[0, 8\]", RAISE),
    # a legal problem whose output exceeds any allocation: a clear allocation error
    ("gemm_alloc_fail", lambda t: _gemm(t, M=256, x=torch.empty(256, 0, device=t["dev"]).bfloat16(),
                                        w=torch.empty(2**50, 0, device=t["dev"]).bfloat16()),
     r"adakv: decode_gemm(: could not allocate| \(CUDA\))", RAISE),
]
CASE_NAMES = [c[0] for c in CASES]
assert len(set(CASE_NAMES)) == len(CASE_NAMES)
_BY_NAME = {c[0]: c for c in CASES}


# ----------------------------------------------------------------------------------------------
# error cases, run in a child process


def _child(dev: str, names: list) -> None:
    """Run the named cases on ``dev``; one ``@@START`` / ``@@RESULT`` line pair per case."""
    torch.set_num_threads(1)
    t = base(dev)
    for name in names:
        _, fn, _, beh = _BY_NAME[name]
        print(f"@@START {name}", flush=True)
        if (beh == CUDA_ONLY and dev == "cpu") or (dev != "cpu" and name.startswith(CPU_ONLY_PREFIXES)):
            res = {"status": "skip"}
        else:
            try:
                fn(t)
                if dev != "cpu":
                    torch.cuda.synchronize()
                res = {"status": "ok"}
            except BaseException as e:  # noqa: BLE001  (reported, the parent asserts)
                res = {"status": "error", "type": type(e).__name__,
                       "is_runtime_error": isinstance(e, RuntimeError), "msg": str(e)[:4000]}
        print("@@RESULT " + json.dumps({"name": name, **res}), flush=True)


_RESULTS: dict = {}


def _results(dev: str) -> dict:
    if dev in _RESULTS:
        return _RESULTS[dev]
    out, pending = {}, list(CASE_NAMES)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    for _ in range(len(CASE_NAMES)):
        if not pending:
            break
        p = subprocess.run([sys.executable, __file__, dev, json.dumps(pending)], env=env,
                           capture_output=True, text=True, timeout=600)
        started = None
        for line in p.stdout.splitlines():
            if line.startswith("@@START "):
                started = line[8:].strip()
            elif line.startswith("@@RESULT "):
                r = json.loads(line[9:])
                out[r["name"]] = r
                started = None
        if started is not None or p.returncode != 0:
            victim = started or (pending[0] if not any(n in out for n in pending) else None)
            if victim is not None:
                out[victim] = {"status": "crash", "returncode": p.returncode,
                               "stderr": p.stderr[-2000:]}
        pending = [n for n in pending if n not in out]
    _RESULTS[dev] = out
    return out


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_raises_clear_error(name, dev):
    _, _, rx, beh = _BY_NAME[name]
    if beh == CUDA_ONLY and dev == "cpu":
        pytest.skip("needs a second device")
    if dev != "cpu" and name.startswith(CPU_ONLY_PREFIXES):
        pytest.skip("no CUDA kernel yet")
    r = _results(dev).get(name, {"status": "missing"})
    assert r["status"] != "crash", f"{name} on {dev} CRASHED the process: {r}"
    if dev != "cpu" and beh == CLAMP and r["status"] == "ok":
        return  # CUDA clamps instead of raising: it ran without a fault (synchronised)
    assert r["status"] == "error", f"{name} on {dev}: expected an error matching {rx!r}, got {r}"
    assert r["is_runtime_error"], f"{name} on {dev}: expected RuntimeError, got {r['type']}: {r['msg']}"
    first = r["msg"].splitlines()[0] if r["msg"] else ""
    assert re.search(rx, first), f"{name} on {dev}: message {first!r} does not match {rx!r}"
    assert "illegal memory access" not in r["msg"]


@pytest.mark.parametrize("dev", DEVICES)
def test_failed_append_changes_nothing(dev):
    t = base(dev)
    kf, vf, sl = t["kf"].clone(), t["vf"].clone(), t["sl"].clone()
    kn = t["kn"].repeat(1, 1, R + 1, 1)
    of = torch.zeros_like(sl)
    try:
        ops.append_(kf, vf, t["ss"], sl, kn, kn.clone(), of)
    except RuntimeError as e:
        assert dev == "cpu" and re.search(r"adakv: append_ .*capacity", str(e))
    else:
        assert dev != "cpu", "CPU append_ past the capacity must raise"
        assert of.tolist() == [1] * (B * Hk)  # CUDA: every segment flagged
    assert_equal(kf, t["kf"], "k_flat")
    assert_equal(vf, t["vf"], "v_flat")
    assert_equal(sl, t["sl"], "seg_len")


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("name", ["pcompact_page_past_pool", "pcompact_page_neg", "pcompact_shared_page",
                                  "pcompact_table_too_short", "pcompact_count_huge", "pappend_overflow",
                                  "pappend_seg_len_int32_max", "pappend_page_past_pool", "pappend_page_neg",
                                  "prappend_overflow", "prappend_seg_len_int32_max",
                                  "prappend_page_past_pool", "prappend_page_neg"])
def test_bad_paged_metadata_writes_nothing_outside(dev, name):
    """CPU: the bad call raises and changes nothing. CUDA (clamps): the two hole pages of the
    pool, which no table entry names, are never written, and a paged_append_ that cannot fit
    leaves its segment's length unchanged and flags it."""
    _, fn, _, _ = _BY_NAME[name]
    t = base(dev)
    holes = sorted(set(range(NP)) - set(t["pt"].view(-1).tolist()))
    assert len(holes) == 2
    if dev == "cpu":
        with pytest.raises(RuntimeError, match=r"adakv: "):
            fn(t)
        return
    try:
        seen = fn(t)  # _pcompact / _pappend / _prappend return the (copied) arguments they mutated
    except RuntimeError as e:  # CLAMP: raising the same clear error is allowed too
        assert str(e).startswith("adakv: ")
        return
    torch.cuda.synchronize()
    kp, vp = seen["k_pages"].cpu(), seen["v_pages"].cpu()
    for h in holes:
        assert_equal(kp[h], t["kp"][h].cpu(), f"hole page {h} (k)")
        assert_equal(vp[h], t["vp"][h].cpu(), f"hole page {h} (v)")
    if name in ("pappend_overflow", "prappend_overflow"):
        assert_equal(seen["seg_len"], t["psl"], "seg_len of segments that could not be written")


@pytest.mark.parametrize("dev", DEVICES)
def test_failed_paged_append_changes_nothing(dev):
    t = base(dev)
    kp, vp, sl = t["kp"].clone(), t["vp"].clone(), t["psl"].clone()
    kn = t["kn"].repeat(1, 1, PW * PP, 1)
    of = torch.zeros_like(sl)
    try:
        ops.paged_append_(kp, vp, t["pt"], sl, kn, kn.clone(), of)
    except RuntimeError as e:
        assert dev == "cpu" and re.search(r"adakv: paged_append_ .*exceeds", str(e))
    else:
        assert dev != "cpu", "CPU paged_append_ past the page table must raise"
        assert of.tolist() == [1] * (B * Hk)  # CUDA: every segment flagged
    assert of.tolist() == [0] * (B * Hk) or dev != "cpu"
    assert_equal(kp, t["kp"], "k_pages")
    assert_equal(vp, t["vp"], "v_pages")
    assert_equal(sl, t["psl"], "seg_len")


# ----------------------------------------------------------------------------------------------
# correct results against the reference


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("index", [(2, B * Hk, 0, -1), (1, -3, 0, 2), (3, I32, 1, 0), (3, 1, -1, 1)],
                         ids=["past_rows", "below_pad", "int32_max", "repeated"])
def test_bad_segment_index_changes_nothing(dev, index):
    """CPU: a segment_index value outside [-1, rows), or a row named twice by paged_append_,
    raises naming segment_index (position and value) before anything is written: pool, every
    length and overflow unchanged; decode raises the same for an out-of-range value. CUDA (no
    host check): an out-of-range entry is padding (overflow 2, out 0, lse -inf) and the other
    entries run; a repeated row stays in bounds (the two hole pages untouched)."""
    t = base(dev)
    S = B * Hk
    kp, vp, sl = t["kp"].clone(), t["vp"].clone(), t["psl"].clone()
    idx = i32(*index).to(dev)
    of = torch.zeros(S, dtype=torch.int32, device=dev)
    repeated = len({r for r in index if r >= 0}) < sum(r >= 0 for r in index)
    out_of_range = [i for i, r in enumerate(index) if r < -1 or r >= S]
    if dev == "cpu":
        what = "repeats" if repeated else "is outside"
        with pytest.raises(RuntimeError, match=rf"adakv: paged_append_: segment_index\[\d\] = "
                                               rf"-?\d+ {what}"):
            ops.paged_append_(kp, vp, t["pt"], sl, t["kn"], t["vn"], of, segment_index=idx)
        assert_equal(kp, t["kp"], "k_pages")
        assert_equal(vp, t["vp"], "v_pages")
        assert_equal(sl, t["psl"], "seg_len")
        assert of.tolist() == [0] * S
        if out_of_range:
            with pytest.raises(RuntimeError, match=rf"adakv: paged_decode_attention: segment_index"
                                                   rf"\[{out_of_range[0]}\] = "):
                _pdecode(t, True, segment_index=idx)
        return
    ops.paged_append_(kp, vp, t["pt"], sl, t["kn"], t["vn"], of, segment_index=idx)
    torch.cuda.synchronize()
    assert of.cpu().tolist() == [2 if i in out_of_range else 0 for i in range(S)]
    if repeated:
        holes = sorted(set(range(NP)) - set(t["pt"].view(-1).tolist()))
        for h in holes:
            assert_equal(kp[h], t["kp"][h], f"hole page {h} (k)")
            assert_equal(vp[h], t["vp"][h], f"hole page {h} (v)")
        return
    named = [i for i, r in enumerate(index) if 0 <= r < S]
    rows = [index[i] for i in named]
    kn = t["kn"].cpu().reshape(S, 1, D)[named].reshape(1, -1, 1, D)
    vn = t["vn"].cpu().reshape(S, 1, D)[named].reshape(1, -1, 1, D)
    pt, psl = t["pt"].cpu(), t["psl"].cpu()
    wk, wv, wl_rows = ref.paged_append_ref(t["kp"].cpu(), t["vp"].cpu(), pt[rows].contiguous(),
                                           psl[rows], kn, vn)
    wl = psl.clone()
    wl[rows] = wl_rows
    assert_equal(kp, wk, "k_pages")
    assert_equal(vp, wv, "v_pages")
    assert_equal(sl, wl, "seg_len")
    out, lse = _pdecode(dict(t, kp=kp, vp=vp, psl=sl), True, segment_index=idx)
    bad = torch.zeros(B, Hk, dtype=torch.bool)
    bad.view(-1)[[i for i, r in enumerate(index) if r < 0 or r >= S]] = True
    bad = bad.repeat_interleave(Hq // Hk, dim=1)
    out, lse = out.cpu(), lse.cpu()
    assert (out[bad] == 0).all() and torch.isneginf(lse[bad]).all()
    assert torch.isfinite(lse[~bad]).all()


@pytest.mark.parametrize("dev", DEVICES)
def test_rows_not_named_by_segment_index_are_ignored(dev):
    """Table rows that no segment_index entry names are neither checked nor read nor written:
    garbage there (negative length, page ids outside the pool) changes nothing."""
    t = base(dev)
    S = B * Hk
    pt = with_(t["pt"], (1, 0), NP + 7)
    sl = with_(t["psl"], 1, -5)
    idx = i32(3, -1, 0, 2).to(dev)
    out, lse = _pdecode(t, True, page_table=pt, seg_len=sl, segment_index=idx)
    want = _pdecode(t, True, page_table=t["pt"][idx.clamp(min=0).long()].contiguous(),
                    seg_len=torch.where(idx >= 0, t["psl"][idx.clamp(min=0).long()], 0).int())
    assert_equal(out, want[0], "out")
    assert_equal(lse, want[1], "lse")
    a = _pappend(t, page_table=pt, seg_len=sl, segment_index=idx,
                 overflow=torch.zeros(S, dtype=torch.int32, device=dev))
    assert a["overflow"].cpu().tolist() == [0] * S
    assert a["seg_len"].cpu().tolist() == [int(t["psl"][0]) + 1, -5, int(t["psl"][2]) + 1,
                                           int(t["psl"][3]) + 1]


def _close(a, b, what, atol=2e-5, rtol=1e-4):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.equal(a.isnan(), b.isnan()), (
        f"{what}: NaN pattern differs: got NaN at {torch.nonzero(a.isnan())[:5].tolist()}, "
        f"expected at {torch.nonzero(b.isnan())[:5].tolist()}")
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _nonfinite_scores(seed, shape):
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([NAN, INF, -INF, 0.0, -0.0, 0.25, 0.5, 1.0])
    return pool[torch.randint(0, len(pool), shape, generator=g)].contiguous()


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_nan_inf_scores_allocate_select(dev, seed):
    s = _nonfinite_scores(seed, (3, 4, 12))
    s[0, 1] = NAN   # a head of NaN only
    s[1, 2] = -INF  # a head of -inf only
    ks = i32(0, 2, 5)
    for rounding in ("exact", "official"):
        for Cb in (0, 3, 7, 12, 13):
            want = ref.allocate_ref(s, Cb, 0.2, True, rounding, ks)
            got = ops.allocate(s.to(dev), Cb, 0.2, True, rounding, ks.to(dev))
            assert_equal(got, want, f"allocate C={Cb} {rounding}")
            want_i, want_c = ref.select_ref(s, want, ks)
            got_i, got_c = ops.select(s.to(dev), want.to(dev), ks.to(dev))
            assert_equal(got_c, want_c, f"kept_count C={Cb}")
            assert_equal(got_i, want_i, f"kept_idx C={Cb}")


@pytest.mark.parametrize("dev", DEVICES)
def test_nan_ranks_below_minus_inf(dev):
    s = torch.tensor([[[1.0, NAN, -INF, 0.5, INF, NAN]]])
    idx, cnt = ops.select(s.to(dev), i32(4).view(1, 1).to(dev))
    assert idx.cpu().tolist() == [[[0, 2, 3, 4, -1, -1]]] and cnt.cpu().tolist() == [[4]]
    s2 = torch.tensor([[[NAN] * 4, [0.1, 0.2, -INF, 0.3]]])
    assert ops.allocate(s2.to(dev), 2, floor_alpha=0.0).cpu().tolist() == [[0, 4]]


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("where", ["q_nan", "k_nan", "k_inf", "v_nan", "q_inf"])
def test_nonfinite_qkv_score_and_evict(dev, where):
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, 11)
    if where == "q_nan":
        q[0, 1, 2, 3] = NAN
    elif where == "q_inf":
        q[1, 0, 0, 0] = INF
    elif where == "k_nan":
        k[1, 1, 5, 0] = NAN
    elif where == "k_inf":
        k[0, 0, 7, 2] = INF
    else:
        v[0, 1, 3, 0] = NAN
    ks = i32(0, 3)
    for pooling in ("max", "avg"):
        kernel = 7 if pooling == "max" else 5
        want = ref.score_ref(q, k, kernel, pooling, key_start=ks)
        got = ops.score(q.to(dev), k.to(dev), kernel, pooling, key_start=ks.to(dev))
        if dev == "cpu" or where == "v_nan":
            _close(got, want, f"score {where} {pooling}")
        else:
            # docs/semantics.md: with non-finite q/k the CUDA scores of the affected (b, h)
            # rows are unspecified (no crash, nothing out of bounds); every other row agrees.
            got = got.cpu()
            rows_ok = torch.isfinite(want).all(-1)
            assert bool((~rows_ok).any()), "the case must poison at least one row"
            _close(got[rows_ok], want[rows_ok], f"score {where} {pooling} (unaffected rows)")
    # evict on the op's own scores: allocate/select/compact follow the NaN rule exactly
    got = ops.evict(q.to(dev), k.to(dev), v.to(dev), C, reserve=1, key_start=ks.to(dev))
    s = ops.score(q.to(dev), k.to(dev), key_start=ks.to(dev)).cpu()
    want = ref.evict_ref(q, k, v, C, reserve=1, key_start=ks, scores=s)
    for a, b, n in zip(got, want, ("k_flat", "v_flat", "seg_start", "seg_len")):
        assert_equal(a, b, f"evict {where} {n}")


def _decode_case(kind):
    g = torch.Generator().manual_seed(17)
    Dd = 8
    kf = torch.randn(12, Dd, generator=g)
    vf = torch.randn(12, Dd, generator=g)
    ss, sl = i32(0, 4, 8), i32(4, 4, 3)
    q = torch.rand(1, 3, 1, Dd, generator=g) + 0.5  # positive: q . k = -inf stays -inf
    if kind == "q_nan":
        q[0, 0, 0, 2] = NAN
    elif kind == "v_nan":
        vf[5, 1] = NAN
    elif kind == "k_plus_inf":
        kf[1] = 0.0
        kf[1, 0] = INF
    elif kind == "k_minus_inf_first":
        kf[4] = 0.0
        kf[4, 0] = -INF  # the segment's first logit is -inf: weight 0, finite out and lse
    elif kind == "k_minus_inf_last":
        kf[7] = 0.0
        kf[7, 0] = -INF
    elif kind == "k_all_minus_inf":
        kf[8:11] = 0.0
        kf[8:11, 0] = -INF
    elif kind == "empty":
        sl = i32(4, 0, 3)
    return q, kf, vf, ss, sl


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("kind", ["q_nan", "v_nan", "k_plus_inf", "k_minus_inf_first",
                                  "k_minus_inf_last", "k_all_minus_inf", "empty"])
def test_nonfinite_decode_attention_lse(dev, kind):
    q, kf, vf, ss, sl = _decode_case(kind)
    want_o, want_l = ref.decode_attention_ref(q, kf, vf, ss, sl, return_lse=True)
    got_o, got_l = ops.decode_attention(*to_dev(dev, q, kf, vf, ss, sl), return_lse=True)
    _close(got_l, want_l, f"lse {kind}")
    _close(got_o, want_o, f"out {kind}")
    out_only = ops.decode_attention(*to_dev(dev, q, kf, vf, ss, sl))
    _close(out_only, want_o, f"out (no lse) {kind}")
    # the empty-segment marker -inf never stands for a poisoned (NaN) output
    assert not (got_o.isnan().any(-1) & (got_l == -INF)).any()


def to_dev(dev, *ts):
    return tuple(t.to(dev) for t in ts)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("budget", [0, 1, L - 1, L, L + 1, 3 * L])
def test_budget_vs_length(dev, budget):
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, 21)
    ks = i32(0, 4)  # row 1: L_b = L - 4, so L - 4 <= budget is also "not evicted"
    for rounding in ("exact", "official"):
        got = ops.evict(*to_dev(dev, q, k, v), budget, rounding=rounding, reserve=1,
                        key_start=ks.to(dev))
        s = ops.score(*to_dev(dev, q, k), key_start=ks.to(dev)).cpu()
        want = ref.evict_ref(q, k, v, budget, rounding=rounding, reserve=1, key_start=ks, scores=s)
        for a, b, n in zip(got, want, ("k_flat", "v_flat", "seg_start", "seg_len")):
            assert_equal(a, b, f"evict budget={budget} {rounding} {n}")


@pytest.mark.parametrize("dev", DEVICES)
def test_huge_budgets_select_allocate(dev):
    s = rand_scores(B, Hk, L, 4)
    for Cb in (2**30 - 1, I32 // Hk):  # budget * Hk still fits int32
        assert_equal(ops.allocate(s.to(dev), Cb), ref.allocate_ref(s, Cb), "allocate")
    bud = torch.full((B, Hk), I32, dtype=torch.int32)
    for a, b in zip(ops.select(s.to(dev), bud.to(dev)), ref.select_ref(s, bud)):
        assert_equal(a, b, "select budgets=2^31-1")


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("kernel", [2 * L + 1, 2 * L + 3, I32, 2**62 + 1, 2**63 - 1])
def test_huge_kernel_size(dev, kernel):
    q, k, _ = make_qkv(B, Hq, Hk, N, W, D, 31)
    ks = i32(0, 6)
    for pooling in ("max", "avg"):
        _close(ops.score(*to_dev(dev, q, k), kernel, pooling, key_start=ks.to(dev)),
               ref.score_ref(q, k, kernel, pooling, key_start=ks), f"kernel={kernel} {pooling}",
               atol=1e-7)


@pytest.mark.parametrize("dev", DEVICES)
def test_key_start_equal_N_and_L(dev):
    q, k, v = make_qkv(B, Hq, Hk, N, W, D, 41)
    for ks in (i32(0, N), i32(L, 0), i32(N, N)):
        s = ops.score(*to_dev(dev, q, k), key_start=ks.to(dev)).cpu()
        _close(s, ref.score_ref(q, k, key_start=ks), f"score ks={ks.tolist()}")
        got = ops.evict(*to_dev(dev, q, k, v), C, key_start=ks.to(dev))
        want = ref.evict_ref(q, k, v, C, key_start=ks, scores=s)
        for a, b, n in zip(got, want, ("k_flat", "v_flat", "seg_start", "seg_len")):
            assert_equal(a, b, f"evict ks={ks.tolist()} {n}")


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("shape", ["B0", "D0", "L0", "G1"])
def test_empty_and_degenerate_evict(dev, shape):
    Bb, Hqq, Hkk, Nn, Ww, Dd = {"B0": (0, 4, 2, N, W, D), "D0": (2, 4, 2, N, W, 0),
                                "L0": (2, 4, 2, W, W, D), "G1": (2, 2, 2, N, W, D)}[shape]
    q, k, v = make_qkv(Bb, Hqq, Hkk, Nn, Ww, Dd, 51) if Dd else (
        torch.zeros(Bb, Hqq, Ww, 0), torch.zeros(Bb, Hkk, Nn, 0), torch.zeros(Bb, Hkk, Nn, 0))
    if dev == "cuda" and Dd == 0:  # the CUDA kernels reject a zero head dim (docs/semantics.md)
        with pytest.raises(RuntimeError, match=r"adakv: .*head dim"):
            ops.score(*to_dev(dev, q, k))
        return
    s = ops.score(*to_dev(dev, q, k)).cpu()
    _close(s, ref.score_ref(q, k), f"score {shape}")
    got = ops.evict(*to_dev(dev, q, k, v), C, reserve=2)
    want = ref.evict_ref(q, k, v, C, reserve=2, scores=s)
    for a, b, n in zip(got, want, ("k_flat", "v_flat", "seg_start", "seg_len")):
        assert_equal(a, b, f"evict {shape} {n}")
    if Bb:
        kf, vf, ss, sl = got
        kn = torch.ones(Bb, Hkk, 2, Dd)
        want_k, want_v, want_l = ref.append_ref(*(x.cpu() for x in got), kn, kn)
        ops.append_(kf, vf, ss, sl, kn.to(dev), kn.to(dev))
        assert_equal(kf, want_k, "append k")
        assert_equal(sl, want_l, "append len")
        qd = torch.ones(Bb, Hqq, 2, Dd)
        _close(ops.decode_attention(qd.to(dev), kf, vf, ss, sl),
               ref.decode_attention_ref(qd, want_k, want_v, ss.cpu(), want_l), f"decode {shape}")


@pytest.mark.parametrize("dev", DEVICES)
def test_empty_scores_allocate_select(dev):
    for shape in ((0, 2, 5), (2, 2, 0), (2, 1, 3)):
        s = rand_scores(*shape, 61)
        for Cb in (0, 2, 9):
            bud = ref.allocate_ref(s, Cb)
            assert_equal(ops.allocate(s.to(dev), Cb), bud, f"allocate {shape}")
            for a, b in zip(ops.select(s.to(dev), bud.to(dev)), ref.select_ref(s, bud)):
                assert_equal(a, b, f"select {shape}")


@pytest.mark.parametrize("dev", DEVICES)
def test_unsorted_kept_idx_compact_follows_given_order(dev):
    t = base("cpu")
    idx = t["idx"].clone()
    idx[0, 0, : int(t["cnt"][0, 0])] = idx[0, 0, : int(t["cnt"][0, 0])].flip(0)
    idx[1, 1, :2] = 3  # a duplicate index
    want = ref.compact_ref(t["k"], t["v"], idx, t["cnt"], t["bud"], W, reserve=1)
    got = ops.compact(*to_dev(dev, t["k"], t["v"], idx, t["cnt"], t["bud"]), W, reserve=1)
    for a, b, n in zip(got, want, ("k_flat", "v_flat", "seg_start", "seg_len")):
        assert_equal(a, b, f"compact unsorted {n}")


@pytest.mark.parametrize("dev", DEVICES)
def test_append_to_exact_capacity_and_short_segments(dev):
    t = base("cpu")
    kn = torch.randn(B, Hk, R, D, generator=torch.Generator().manual_seed(71))
    want_k, want_v, want_l = ref.append_ref(t["kf"], t["vf"], t["ss"], t["sl"], kn, -kn)
    kf, vf, sl = to_dev(dev, t["kf"], t["vf"], t["sl"])
    ops.append_(kf, vf, t["ss"].to(dev), sl, kn.to(dev), (-kn).to(dev))  # fills every reserve
    assert_equal(kf, want_k, "k_flat")
    assert_equal(vf, want_v, "v_flat")
    assert_equal(sl, want_l, "seg_len")
    # decode with T larger than some segments (n_t <= 0: out 0, lse -inf)
    sl2 = i32(0, 1, 2, 7)
    qd = torch.randn(B, Hq, 3, D, generator=torch.Generator().manual_seed(72))
    wo, wl = ref.decode_attention_ref(qd, want_k, want_v, t["ss"], sl2, return_lse=True)
    go, gl = ops.decode_attention(qd.to(dev), kf, vf, t["ss"].to(dev), sl2.to(dev), return_lse=True)
    _close(gl, wl, "lse short")
    _close(go, wo, "out short")


# ----------------------------------------------------------------------------------------------
# fake kernels: torch.compile tracing gives the same clear errors (no wrapped static sizes)


@pytest.mark.parametrize("kw, rx", [
    (dict(budget=8, reserve=2**63 - 12), r"adakv: .*reserve"),
    (dict(budget=C, reserve=-1), r"adakv: .*reserve"),
    (dict(budget=C, reserve=2**31), r"adakv: .*reserve"),
    (dict(budget=I32), r"adakv: .*B \* Hk \* \(budget \+ window \+ reserve\)"),
    (dict(budget=C, reserve=I32 - 20), r"adakv: .*2\^31 - 1"),
    (dict(budget=-1), r"adakv: .*budget"),
    (dict(budget=C, rounding="official", reserve=2**40), r"adakv: .*reserve"),
])
def test_fake_evict_checks_sizes(kw, rx):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = make_qkv(B, Hq, Hk, N, W, D, 81)
    kw = dict(kw)
    budget = kw.pop("budget")
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        with pytest.raises(RuntimeError, match=rx):
            torch.ops.adakv.evict(fq, fk, fv, budget, 0.2, "max", 7, "mean", True,
                                  kw.get("rounding", "exact"), kw.get("reserve", 0), None,
                                  "mean", None)
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: ops.evict(q, k, v, budget, **kw), backend="eager",
                       fullgraph=True)
    with pytest.raises(RuntimeError, match=rx):
        fn(q, k, v)
    torch._dynamo.reset()


def test_fake_compact_and_score_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = base("cpu")
    with FakeTensorMode() as mode:
        f = {n: mode.from_tensor(x) for n, x in t.items() if isinstance(x, torch.Tensor)}
        with pytest.raises(RuntimeError, match=r"adakv: .*reserve"):
            torch.ops.adakv.compact(f["k"], f["v"], f["idx"], f["cnt"], f["bud"], W, 2**63 - 12, None, None)
        with pytest.raises(RuntimeError, match=r"adakv: .*rows"):
            torch.ops.adakv.compact(f["k"], f["v"], f["idx"], f["cnt"], f["bud"], W, 0, 2**40, None)
        with pytest.raises(RuntimeError, match=r"adakv: .*window"):
            torch.ops.adakv.compact(f["k"], f["v"], f["idx"], f["cnt"], f["bud"], N + 1, 0, None, None)
        with pytest.raises(RuntimeError, match=r"adakv: .*kernel_size"):
            torch.ops.adakv.score(f["q"], f["k"], 4, "max", "mean", "mean", None, None)
        with pytest.raises(RuntimeError, match=r"adakv: .*budget"):
            torch.ops.adakv.allocate(f["s"], -1, 0.2, True, "exact", None)


def test_fake_followup_checks():
    """defensive_score / value_norm fake kernels: the C++ errors, and the output shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = base("cpu")
    with FakeTensorMode() as mode:
        f = {n: mode.from_tensor(x) for n, x in t.items() if isinstance(x, torch.Tensor)}
        with pytest.raises(RuntimeError, match=r"adakv: .*kernel_size"):
            torch.ops.adakv.defensive_score(f["q"], f["k"], 4, None, None)
        with pytest.raises(RuntimeError, match=r"adakv: .*window W"):
            torch.ops.adakv.defensive_score(f["q"], f["k"][:, :, :2], 5, None, None)
        s, m, wm = torch.ops.adakv.defensive_score(f["q"], f["k"], 5, None, None)
        assert s.shape == m.shape == (B, Hk, L) and wm.shape == (B, 2)
        assert s.dtype == m.dtype == wm.dtype == torch.float32
        for n in (-1, N + 1):
            with pytest.raises(RuntimeError, match=r"adakv: length must be in \[0, N = 24\]"):
                torch.ops.adakv.value_norm(f["v"], f["o"], False, n)
        with pytest.raises(RuntimeError, match=r"adakv: o_proj_weight must be"):
            torch.ops.adakv.value_norm(f["v"], f["o"][:, :-1], False, None)
        with pytest.raises(RuntimeError, match=r"adakv: o_proj_weight must be"):
            torch.ops.adakv.value_norm(f["v"], f["o"][:, : 3 * D], False, None)
        assert torch.ops.adakv.value_norm(f["v"], f["o"], True, None).shape == (B, Hk, N)
        out = torch.ops.adakv.value_norm(f["v"], f["o"], False, L)
        assert out.shape == (B, Hk, L) and out.dtype == torch.float32
    torch._dynamo.reset()
    fn = torch.compile(lambda v, o: ops.value_norm(v, o, length=N + 1), backend="eager",
                       fullgraph=True)
    with pytest.raises(RuntimeError, match=r"adakv: length"):
        fn(t["v"], t["o"])
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# the HF layer


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    import test_hf  # the tiny random Llama of tests/test_hf.py

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield test_hf
    torch.set_num_threads(n)


@pytest.mark.parametrize("kw, name", [
    (dict(method="snapkv", budget=8, window=4, reserve=2**63 - 12), "reserve"),
    (dict(budget=8, window=4, reserve=2**31), "reserve"),
    (dict(budget=8, window=4, max_growth=2**63), "max_growth"),
    (dict(budget=8, window=4, max_growth=2**31), "max_growth"),
    (dict(budget=2**31, window=4), "budget"),
    (dict(budget=2**62, window=4), "budget"),
    (dict(budget=8, window=2**40), "window"),
    (dict(budget=8, window=0), "window"),
    (dict(method="streaming", budget=8, window=4, n_sink=2**40), "n_sink"),
    (dict(method="streaming", budget=8, window=4, n_sink=-1), "n_sink"),
    (dict(budget=8, window=4, kernel_size=2**63 + 1), "kernel_size"),
    (dict(budget=8, window=4, kernel_size=6), "kernel_size"),
    (dict(budget=8, window=4, reserve=I32 - 10), "reserve"),        # budget + window + reserve
    (dict(budget=8, window=4, max_growth=I32 - 10), "max_growth"),  # budget + window + max_growth
    (dict(method="ada_pyramid", budget=2**30, window=4, reserve=0), "budget"),  # 2 * budget
    (dict(budget=8, window=4, pyramid_beta=0), "pyramid_beta"),
])
def test_hf_size_arguments_rejected_up_front(hf, kw, name):
    model = hf.make_model("llama")
    with pytest.raises(ValueError, match=rf"adakv: .*{name}"):
        hf.AdaKVCache(model, **kw)


def test_hf_paged_sizes_checked_at_growth(hf):
    model = hf.make_model("llama")
    ids, mask = hf.make_batch(2, 20)
    # paged storage hands out pages as tokens come: a huge reserve only bounds the initial pool
    cache = hf.AdaKVCache(model, method="snapkv", budget=8, window=4, reserve=2**30)
    cache.compress(ids, mask)
    assert cache.pool.store.num_pages < 100
    # a segment never passes 2^31 - 1 rows, and nothing is allocated for the attempt
    for n in (2**31, 2**63 + 5):
        with pytest.raises(ValueError, match=r"adakv: reserving T=.*2\^31 - 1"):
            cache.ensure_capacity(n)
    with pytest.raises(ValueError, match=r"adakv: reserving T=.*2\^31 - 1"):
        cache.prepare_decode(2**40)
    assert cache.pool.store.num_pages < 100
    with pytest.raises(ValueError, match=r"num_tokens"):
        cache.ensure_capacity(-1)
    for bad in (0, -1, 2.0, True, 2**31):
        with pytest.raises(ValueError, match=r"adakv: (page_size|num_pages) must be an int"):
            hf.AdaKVCache(model, page_size=bad)
        with pytest.raises(ValueError, match=r"adakv: (page_size|num_pages) must be an int"):
            hf.AdaKVCache(model, num_pages=bad)
    with pytest.raises(ValueError, match=r"adakv: storage must be one of"):
        hf.AdaKVCache(model, storage="dense")


def test_hf_max_seq_len_bounds_the_tables(hf):
    """max_seq_len: bad values named up front; a sequence that outgrows it is refused with a
    clear error when its pages are reserved, the tables keep their width and the decode
    before it still stands."""
    model = hf.make_model("llama")
    for bad in (0, -1, 2.0, True, 2**31):
        with pytest.raises(ValueError, match=r"adakv: max_seq_len must be an int"):
            hf.AdaKVCache(model, max_seq_len=bad)
    ids, mask = hf.make_batch(2, 20)
    cache = hf.AdaKVCache(model, method="full", page_size=4, max_seq_len=24)
    cache.compress(ids, mask)
    st = cache.pool.store
    assert st.table_width == 24 // 4 + 1
    cache.prepare_decode(4)                           # 20 + 4 tokens: within max_seq_len
    lens = [list(layer.segment_lengths()) for layer in cache.adakv_layers]
    with pytest.raises(RuntimeError, match=r"max_pages_per_segment=7"):
        cache.ensure_capacity(64)
    assert st.table_width == 7
    assert [list(layer.segment_lengths()) for layer in cache.adakv_layers] == lens


def test_hf_derived_sizes_checked_at_prefill_and_growth(hf):
    model = hf.make_model("llama")
    ids, mask = hf.make_batch(2, 20)
    # legal per segment, but B * H * (budget + window + reserve) > 2^31 - 1 rows
    cache = hf.AdaKVCache(model, method="snapkv", budget=8, window=4, reserve=2**30,
                          storage="flat")
    with pytest.raises(ValueError, match=r"adakv: .*reserve.*2\^31 - 1"):
        cache.compress(ids, mask)
    cache = hf.AdaKVCache(model, method="full", budget=8, window=4, reserve=2**30,
                          storage="flat")
    with pytest.raises(ValueError, match=r"adakv: .*reserve"):
        cache.compress(ids, mask)
    # growing never computes a wrapped capacity
    cache = hf.AdaKVCache(model, budget=8, window=4, reserve=1, storage="flat")
    cache.compress(ids, mask)
    with pytest.raises(RuntimeError, match=r"adakv: .*growing"):
        cache.ensure_capacity(2**31)
    with pytest.raises(RuntimeError, match=r"adakv: .*growing"):
        cache.ensure_capacity(2**63 + 5)
    layer = cache.adakv_layers[0]
    assert layer.seg_start.dtype == torch.int32 and int(layer.seg_start.min()) >= 0
    with pytest.raises(RuntimeError, match=r"adakv: .*growing"):
        cache.prepare_decode(2**40)
    with pytest.raises(ValueError, match=r"num_tokens"):
        cache.ensure_capacity(-1)


def test_hf_unclaimed_prefill_raises(hf):
    model = hf.make_model("llama")
    ids, mask = hf.make_batch(2, 20)
    want = hf.generate(model, ids, mask, n=4)
    cache = hf.AdaKVCache(model, budget=8, window=4)
    hf.restore_attention(model)  # nothing claims the prefill entries any more
    with pytest.raises(RuntimeError, match=r"adakv: layer 0: the prefill .* never claimed"):
        hf.generate(model, ids, mask, cache, n=4)
    with pytest.raises(RuntimeError, match=r"never claimed"):
        cache.check_claimed()
    cache.reset()  # usable again after a reset (and a fresh AdaKVCache switches back)
    assert cache.get_seq_length() == 0
    # compress() detects it right away
    cache2 = hf.AdaKVCache(model, budget=8, window=4)
    hf.restore_attention(model)
    with pytest.raises(RuntimeError, match=r"never claimed"):
        cache2.compress(ids, mask)
    with pytest.raises(RuntimeError, match=r"never claimed"):
        cache2.snapshot()
    # the model itself is untouched: a plain generate still gives the full-cache result
    assert torch.equal(hf.generate(model, ids, mask, n=4), want)


if __name__ == "__main__":  # child process of the error cases: python test_adversarial.py DEV NAMES
    _child(sys.argv[1], json.loads(sys.argv[2]))
