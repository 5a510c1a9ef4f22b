"""Torch-op implementations of ``adakv::defensive_score`` and ``adakv::value_norm`` (cuBLAS
GEMMs, a softmax, ``avg_pool1d``): the CUDA fallback and a second reference.

They compute exactly what the CPU kernels (``csrc/cpu/followups.cpp``) compute, as
``docs/semantics.md`` defines it. Both ops have native CUDA kernels (``csrc/cuda/score.cu``,
``csrc/cuda/value_norm.cu``); these versions are

* registered for the CUDA dispatch key only when the CUDA library provides no kernel of its own
  (:func:`register`: an extension built without CUDA, or ``_C_cuda`` failing to load on a CUDA
  torch), so the ops still run on CUDA tensors then;
* what :func:`adakv_ops.defensive_score` runs on CUDA for a pooling radius the native kernel
  does not take (``kernel_size > 33`` on a prefix longer than the window radius);
* an independent implementation the native kernels are tested against on the GPU
  (``tests/test_cuda_followups.py``), besides the C++ CPU kernels (``tests/test_composite.py``
  checks these against those on CPU tensors).

Not a serving-path kernel: ``defensive_score`` materialises one batch row's ``[Hq, W, N]``
window probabilities, ``value_norm`` chunks of ``[Hk, G, T, hidden]`` products. No host read:
loops run over batch rows and token chunks, whose counts are shapes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _fake

__all__ = ["defensive_score", "value_norm", "register"]

_VALUE_NORM_TEMP = 1 << 26  # floats of one [Hk, G, T, hidden] chunk (256 MiB)


def _check_same(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.dtype != b.dtype or a.device != b.device:
        raise RuntimeError(f"adakv: {name_a} ({a.dtype}, {a.device}) and {name_b} ({b.dtype}, "
                           f"{b.device}) must have the same dtype and device")
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise RuntimeError(f"adakv: {name_a} must be float32, float16 or bfloat16, got {a.dtype}")


def defensive_score(q_window: Tensor, key: Tensor, kernel_size: int = 5,
                    key_start: Optional[Tensor] = None, scale: Optional[float] = None):
    """``(scores, snap_mean, window_mass)`` of ``adakv::defensive_score`` (see ``ops.py``)."""
    _fake._defensive_score_fake(q_window, key, kernel_size, key_start, scale)  # shape checks
    _check_same("q_window", q_window, "key", key)
    if q_window.shape[0] != key.shape[0] or q_window.shape[3] != key.shape[3] or \
            key.shape[1] == 0 or q_window.shape[1] % key.shape[1] != 0:
        raise RuntimeError(f"adakv: q_window {list(q_window.shape)} and key "
                           f"{list(key.shape)} must share B and D, with Hq a multiple of Hk")
    if key_start is not None and (key_start.dtype != torch.int32 or key_start.device != key.device
                                  or tuple(key_start.shape) != (key.shape[0],)):
        raise RuntimeError(f"adakv: key_start must be int32 [B] on {key.device}")
    B, Hq, W, D = q_window.shape
    _, Hk, N, _ = key.shape
    G, L = Hq // Hk, N - W
    dev = key.device
    sc = scale if scale is not None else 1.0 / math.sqrt(D)
    scores = torch.full((B, Hk, L), float("-inf"), device=dev, dtype=torch.float32)
    snap = torch.full((B, Hk, L), float("-inf"), device=dev, dtype=torch.float32)
    mass = torch.zeros((B, 2), device=dev, dtype=torch.float32)
    if B == 0 or L == 0:
        return scores, snap, mass
    ks = (key_start.to(device=dev, dtype=torch.int64) if key_start is not None
          else torch.zeros(B, device=dev, dtype=torch.int64)).clamp(0, N)
    col = torch.arange(N, device=dev)
    pos = L + torch.arange(W, device=dev)
    r = kernel_size // 2
    for b in range(B):
        k0 = ks[b]
        q = q_window[b].float().view(Hk, G, W, D) * sc
        logits = torch.matmul(q, key[b].float().unsqueeze(1).transpose(-1, -2))  # [Hk,G,W,N]
        visible = (col.view(1, N) <= pos.view(W, 1)) & (col >= k0).view(1, N)
        p = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        valid = (col[:L] >= k0)                                      # [L]
        pre = torch.where(valid, p[..., :L], torch.zeros((), device=dev))
        base = pre.sum(dim=-1, keepdim=True, dtype=torch.float64)
        pooled = F.avg_pool1d(pre.reshape(-1, 1, L), kernel_size, stride=1, padding=r,
                              count_include_pad=True).view(Hk, G, W, L)
        pooled = torch.where(valid, pooled, torch.zeros((), device=dev))
        tot = pooled.sum(dim=-1, keepdim=True, dtype=torch.float64)
        rescaled = torch.where(tot > 0, (pooled.double() / tot * base).float(),
                               torch.zeros((), device=dev))
        R = rescaled.amax(dim=(1, 2))                                # [Hk, L]: NaN propagates
        n_valid = (L - k0).clamp(min=1)
        mean = (torch.where(valid, R.double(), torch.zeros((), device=dev, dtype=torch.float64))
                .sum(dim=-1, keepdim=True) / n_valid).float()
        R = torch.maximum(R, mean)
        has = k0 < L
        scores[b] = torch.where(valid & has, R, scores[b])
        snap[b] = torch.where(valid & has, pre.mean(dim=(1, 2)), snap[b])
        slip = (col[:L] >= torch.maximum(k0, torch.tensor(L - W, device=dev)))
        wm = p[..., L:].sum(dim=-1, dtype=torch.float64).mean()
        sm = torch.where(slip, p[..., :L], torch.zeros((), device=dev)).sum(
            dim=-1, dtype=torch.float64).mean()
        mass[b] = torch.where(has, torch.stack([wm, sm]).float(), mass[b])
    return scores, snap, mass


def value_norm(value: Tensor, o_proj_weight: Tensor, normalize: bool = False,
               length: Optional[int] = None) -> Tensor:
    """``adakv::value_norm`` (see ``ops.py``): float32 products, chunks of tokens."""
    _fake._value_norm_fake(value, o_proj_weight, normalize, length)      # shape checks
    _check_same("value", value, "o_proj_weight", o_proj_weight)
    B, Hk, N, D = value.shape
    hidden, HqD = o_proj_weight.shape
    Hq = HqD // D
    G = Hq // Hk
    n = N if length is None else length
    out = torch.empty((B, Hk, n), device=value.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    wo = o_proj_weight.float().t().reshape(Hk, G, D, hidden)
    T = max(16, _VALUE_NORM_TEMP // max(Hq * hidden, 1))
    for b in range(B):
        for t0 in range(0, n, T):
            v = value[b, :, t0:min(t0 + T, n)].float().unsqueeze(1)   # [Hk, 1, T, D]
            out[b, :, t0:t0 + v.shape[2]] = torch.matmul(v, wo).abs().sum(dim=-1).mean(dim=1)
    if normalize:
        out = out / out.sum(dim=1, keepdim=True)
    return out


def register() -> list[str]:
    """Register these as the CUDA kernels of the ops the CUDA library has no kernel for;
    returns the names registered."""
    done = []
    for name, fn in (("defensive_score", defensive_score), ("value_norm", value_norm)):
        qual = f"adakv::{name}"
        if torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA"):
            continue
        torch.library.register_kernel(qual, "cuda", fn)
        done.append(name)
    return done
