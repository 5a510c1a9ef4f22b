"""Reference PyTorch paths that adakv_ops is benchmarked against (timing baselines only).

These are *not* the test oracle (that is ``adakv_ops.reference``). They are what a user gets
today without adakv_ops: the official Ada-KV code path (https://github.com/FFY0/AdaKV, GQA mode)
written with ordinary GPU-friendly PyTorch ops, plus the attention kernels a serving engineer
would reach for (SDPA over a padded cache, SDPA over the full cache, FlexAttention over the
flat cache). Every function works on CPU and CUDA.

Layout conventions are those of docs/semantics.md: flat cache ``k_flat, v_flat [rows, D]``,
``seg_start, seg_len [B * Hk]`` int32, segment ``s = b * Hk + h``; query head ``j`` reads KV head
``j // G`` with ``G = Hq // Hk``.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "reference_evict",
    "reference_decode_append",
    "pack_flat",
    "pad_flat_cache",
    "padded_sdpa",
    "padded_sdpa_decode",
    "full_sdpa_decode",
    "FlexDecode",
    "flex_decode",
]


# ---------------------------------------------------------------------------------------------
# eviction (prefill side)


def reference_evict(q_window: Tensor, key: Tensor, value: Tensor, budget: int,
                    alpha: float = 0.2, window: Optional[int] = None, kernel_size: int = 7):
    """Official Ada-KV (GQA mode) eviction of one layer, in plain PyTorch.

    Steps, as the official code does them: window logits with ``matmul`` (query heads of a KV
    group stacked, so K is not repeated), causal mask added on the ``W x W`` window block,
    softmax in fp32, mean over the window queries, mean over the ``G`` query heads of a group,
    ``max_pool1d(kernel 7, padding 3)``; flatten heads, ``torch.topk`` of ``Hk * C`` over the
    flattened ``[Hk * L]`` scores, count winners per head (``scatter_add_``), safeguard
    ``round((1 - alpha) * c_h + floor(alpha * C))`` (official per-head rounding); per-head
    selection from a descending sort, a boolean keep-mask over ``[B, Hk, N]`` (top ``C_h`` prefix
    tokens plus the window), and ``key[mask]`` to produce the head-flattened varlen cache with
    cumulative lengths. The boolean indexing is a host sync, as in the official code.

    Args:
        q_window: ``[B, Hq, W, D]`` (``W`` defaults to ``q_window.shape[2]``).
        key, value: ``[B, Hk, N, D]``.
        budget: average per-head prefix budget ``C`` (``C < N - W``).

    Returns:
        ``(k_flat [rows, D], v_flat [rows, D], seg_start [B*Hk] int32, seg_len [B*Hk] int32)``,
        packed (no reserve), kept prefix tokens in ascending position then the window.
    """
    B, Hq, Wq, D = q_window.shape
    _, Hk, N, _ = key.shape
    W = Wq if window is None else window
    G = Hq // Hk
    L = N - W
    C = budget
    assert 0 < C < L, "reference_evict needs 0 < budget < N - W"
    q = q_window[:, :, -W:, :].reshape(B, Hk, G * W, D)
    logits = torch.matmul(q, key.transpose(2, 3)) / math.sqrt(D)  # [B, Hk, G*W, N]
    logits = logits.view(B, Hk, G, W, N)
    mask = torch.full((W, W), torch.finfo(logits.dtype).min, device=key.device,
                      dtype=logits.dtype)
    cond = torch.arange(W, device=key.device)
    mask.masked_fill_(cond < (cond + 1).view(W, 1), 0)
    logits[..., -W:] += mask
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    scores = probs[..., :L].mean(dim=-2).mean(dim=-2)  # window mean, then GQA mean: [B, Hk, L]
    scores = F.max_pool1d(scores, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)

    # Ada-KV allocation
    winners = scores.reshape(B, Hk * L).topk(Hk * C, dim=-1).indices // L
    counts = torch.zeros(B, Hk, device=key.device, dtype=torch.int64)
    counts.scatter_add_(-1, winners, torch.ones_like(winners))
    budgets = torch.round(counts * (1 - alpha) + math.floor(alpha * C)).to(torch.int64)

    # per-head selection: sort, keep the first C_h of each head, plus the window
    order = scores.argsort(dim=-1, descending=True)  # [B, Hk, L]
    keep_sorted = torch.arange(L, device=key.device) < budgets.unsqueeze(-1)
    keep = torch.zeros(B, Hk, N, device=key.device, dtype=torch.bool)
    keep[..., :L].scatter_(-1, order, keep_sorted)
    keep[..., L:] = True
    k_flat = key[keep]  # [rows, D], head-major, ascending position (host sync)
    v_flat = value[keep]
    seg_len = keep.sum(dim=-1).reshape(-1).to(torch.int32)
    seg_start = (torch.cumsum(seg_len, 0, dtype=torch.int32) - seg_len).to(torch.int32)
    return k_flat, v_flat, seg_start, seg_len


# ---------------------------------------------------------------------------------------------
# decode append


def reference_decode_append(k_flat: Tensor, v_flat: Tensor, seg_start: Tensor, seg_len: Tensor,
                            k_new: Tensor, v_new: Tensor):
    """One decode step of the official flat cache: copy everything into a fresh, larger tensor.

    The official ``update_flatten_view`` kernel allocates ``[rows + S * T, D]`` and copies the
    whole cache, shifting segment ``s`` by ``s * T`` rows, then writes the new tokens at the end of
    every segment. Same here with ``index_copy_`` (sync-free). The input must be packed
    (``seg_start`` = exclusive cumsum of ``seg_len``, as the official cache always is); ``k_new``,
    ``v_new`` are ``[B, Hk, T, D]``.

    Returns new ``(k_flat, v_flat, seg_start, seg_len)``; the inputs are left untouched.
    Cost is proportional to the cache size (that is the point of the comparison).
    """
    rows, D = k_flat.shape
    S = seg_start.numel()
    T = k_new.shape[2]
    dev = k_flat.device
    ends = (seg_start + seg_len).to(torch.int64)  # exclusive end of each segment
    r = torch.arange(rows, device=dev)
    seg_of_row = torch.searchsorted(ends, r, right=True)
    dst_old = r + seg_of_row * T
    shift = torch.arange(S, device=dev) * T
    dst_new = ((ends + shift).unsqueeze(1) + torch.arange(T, device=dev)).reshape(-1)
    out_k = torch.empty(rows + S * T, D, device=dev, dtype=k_flat.dtype)
    out_v = torch.empty_like(out_k)
    out_k.index_copy_(0, dst_old, k_flat)
    out_v.index_copy_(0, dst_old, v_flat)
    out_k.index_copy_(0, dst_new, k_new.reshape(S * T, D))
    out_v.index_copy_(0, dst_new, v_new.reshape(S * T, D))
    new_start = (seg_start + shift).to(torch.int32)
    new_len = (seg_len + T).to(torch.int32)
    return out_k, out_v, new_start, new_len


def pack_flat(k_flat: Tensor, v_flat: Tensor, seg_start: Tensor, seg_len: Tensor):
    """Drop the reserve rows: a packed copy (``seg_start`` = exclusive cumsum of ``seg_len``)."""
    rows = k_flat.shape[0]
    r = torch.arange(rows, device=k_flat.device)
    ends = (seg_start + seg_len).to(torch.int64)
    starts = seg_start.to(torch.int64)
    s = torch.searchsorted(starts, r, right=True) - 1
    valid = r < ends[s]
    k = k_flat[valid].contiguous()
    v = v_flat[valid].contiguous()
    new_len = seg_len.to(torch.int32).clone()
    new_start = (torch.cumsum(new_len, 0, dtype=torch.int32) - new_len).to(torch.int32)
    return k, v, new_start, new_len


# ---------------------------------------------------------------------------------------------
# decode attention baselines


def pad_flat_cache(k_flat: Tensor, v_flat: Tensor, seg_start: Tensor, seg_len: Tensor, B: int,
                   align: int = 64):
    """Gather the flat cache into ``[B, Hk, maxlen, D]`` plus a boolean mask ``[B, Hk, 1, maxlen]``.

    ``maxlen`` is the longest segment rounded up to ``align``. This is the one-off (per layout
    change) cost a user of the padded layout pays; it is not part of the timed decode call.
    """
    S = seg_start.numel()
    Hk = S // B
    D = k_flat.shape[1]
    lens = seg_len.to(torch.int64)
    maxlen = int(lens.max().item())
    maxlen = max(align, (maxlen + align - 1) // align * align)
    pos = torch.arange(maxlen, device=k_flat.device)
    valid = pos.unsqueeze(0) < lens.unsqueeze(1)  # [S, maxlen]
    idx = (seg_start.to(torch.int64).unsqueeze(1) + pos.unsqueeze(0)).clamp_(max=k_flat.shape[0] - 1)
    k_pad = k_flat[idx].masked_fill_(~valid.unsqueeze(-1), 0).view(B, Hk, maxlen, D)
    v_pad = v_flat[idx].masked_fill_(~valid.unsqueeze(-1), 0).view(B, Hk, maxlen, D)
    mask = valid.view(B, Hk, 1, maxlen)
    return k_pad, v_pad, mask


def padded_sdpa(query: Tensor, k_pad: Tensor, v_pad: Tensor, mask: Tensor,
                scale: Optional[float] = None) -> Tensor:
    """SDPA over a pre-padded cache: the timed part of the padded baseline.

    ``query [B, Hq, 1, D]``; ``k_pad, v_pad [B, Hk, maxlen, D]``; ``mask [B, Hk, 1, maxlen]`` bool.
    GQA the efficient way for one decode token: the ``G`` query heads of a KV group are laid out as
    ``G`` query positions of that KV head (``[B, Hk, G, D]``), so K/V are read once per group and
    the mask broadcasts (no ``repeat_interleave``). Returns ``[B, Hq, 1, D]``.
    """
    B, Hq, T, D = query.shape
    Hk = k_pad.shape[1]
    G = Hq // Hk
    assert T == 1, "padded_sdpa: one decode token"
    q = query.reshape(B, Hk, G, D)
    out = F.scaled_dot_product_attention(q, k_pad, v_pad, attn_mask=mask, scale=scale)
    return out.reshape(B, Hq, 1, D)


def padded_sdpa_decode(query: Tensor, k_flat: Tensor, v_flat: Tensor, seg_start: Tensor,
                       seg_len: Tensor, scale: Optional[float] = None) -> Tensor:
    """SDPA over the compressed cache padded to its longest head.

    Pads (:func:`pad_flat_cache`) and calls :func:`padded_sdpa`. In the benchmark only the SDPA
    call on pre-padded tensors plus mask is timed (a user of this layout keeps the padded tensors
    and appends into them); the padding cost is reported separately as a note.
    """
    B = query.shape[0]
    k_pad, v_pad, mask = pad_flat_cache(k_flat, v_flat, seg_start, seg_len, B)
    return padded_sdpa(query, k_pad, v_pad, mask, scale)


def full_sdpa_decode(query: Tensor, k_full: Tensor, v_full: Tensor, gqa: str = "enable_gqa",
                     scale: Optional[float] = None) -> Tensor:
    """SDPA of one new token over the full uncompressed cache ``[B, Hk, N, D]`` (context only).

    ``gqa="enable_gqa"``: ``scaled_dot_product_attention(..., enable_gqa=True)``;
    ``gqa="reshape"``: the ``G`` query heads as ``G`` query positions of their KV head;
    ``gqa="repeat"``: ``repeat_interleave`` K/V to ``Hq`` heads (inside the timed call).
    """
    B, Hq, T, D = query.shape
    Hk = k_full.shape[1]
    G = Hq // Hk
    if gqa == "enable_gqa":
        return F.scaled_dot_product_attention(query, k_full, v_full, scale=scale, enable_gqa=True)
    if gqa == "reshape":
        assert T == 1
        out = F.scaled_dot_product_attention(query.reshape(B, Hk, G, D), k_full, v_full,
                                             scale=scale)
        return out.reshape(B, Hq, 1, D)
    if gqa == "repeat":
        k = k_full.repeat_interleave(G, dim=1)
        v = v_full.repeat_interleave(G, dim=1)
        return F.scaled_dot_product_attention(query, k, v, scale=scale)
    raise ValueError(gqa)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


class FlexDecode:
    """FlexAttention over the head-flattened cache, with the block mask built once.

    Two layouts of the same computation (``T = 1``):

    * ``"seq"``: the flat cache is one long KV sequence ``[1, 1, rows, D]`` and the ``B * Hq``
      query heads are ``B * Hq`` query positions of one head (``[1, 1, B*Hq, D]``). Query ``i``
      (row ``b = i // Hq``, head ``j = i % Hq``) sees kv rows ``[seg_start[s], seg_start[s] +
      seg_len[s])`` with ``s = i // G`` (``= b * Hk + j // G``). Short query lengths (< 128) take
      Flex's split-KV decoding kernel.
    * ``"heads"``: queries ``[1, B*Hk, G, D]`` (the ``G`` query heads of a segment as ``G`` query
      positions), K/V ``[1, 1, rows, D]`` shared through ``enable_gqa``; head ``h = s`` sees its
      segment's rows. One program per segment (Flex's main kernel).

    Block mask: ``create_block_mask`` from the ``mask_mod`` when the dense mask it materialises
    (``H * Q_LEN * KV_LEN`` booleans, both padded to 128, plus temporaries) fits
    ``dense_limit_bytes``; otherwise ``torch.compile(create_block_mask)`` when even a
    materialised mask would fit ``compiled_limit_bytes``; otherwise (or if that fails) the block
    mask is written directly from the segment bounds (``BlockMask.from_kv_blocks``, interior
    blocks marked full; same blocks as ``create_block_mask`` finds) and ``build_method`` says so.
    ``dense_mask_bytes`` is the estimate (the issue saw 257 GiB at batch 64). ``build_ms`` is the build time (first build, including any
    compilation). ``flex_attention`` is compiled with ``torch.compile(dynamic=False)``
    (``compile=False`` runs it eagerly, e.g. on CPU).
    """

    def __init__(self, seg_start: Tensor, seg_len: Tensor, rows: int, B: int, Hq: int, Hk: int,
                 layout: str = "seq", compile: bool = True,
                 dense_limit_bytes: float = 4e9, allow_compiled_mask: bool = True,
                 compiled_limit_bytes: float = 64e9):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.B, self.Hq, self.Hk, self.G = B, Hq, Hk, Hq // Hk
        self.layout = layout
        self.rows = rows
        dev = seg_start.device
        lo = seg_start.to(torch.int32).contiguous()
        hi = (seg_start + seg_len).to(torch.int32).contiguous()
        self._lo, self._hi = lo, hi
        G = self.G
        S = B * Hk
        if layout == "seq":
            H, Q_LEN = 1, B * Hq

            def mask_mod(b, h, q_idx, kv_idx):
                s = q_idx // G
                return (kv_idx >= lo[s]) & (kv_idx < hi[s])
        elif layout == "heads":
            H, Q_LEN = S, G

            def mask_mod(b, h, q_idx, kv_idx):
                return (kv_idx >= lo[h]) & (kv_idx < hi[h])
        else:
            raise ValueError(layout)
        self.H, self.Q_LEN = H, Q_LEN
        self.mask_mod = mask_mod
        # create_block_mask pads Q and KV to the block size (128) and materialises the boolean
        # mask plus temporaries (comparisons, the padded copy): ~6 bytes per padded element
        self.dense_mask_bytes = 6.0 * H * _round_up(Q_LEN, 128) * _round_up(rows, 128)
        self.build_method = None
        self.build_note = ""
        t0 = time.perf_counter()
        bm = None
        if self.dense_mask_bytes <= dense_limit_bytes:
            bm = create_block_mask(mask_mod, 1, H, Q_LEN, rows, device=dev)
            self.build_method = "create_block_mask"
        if bm is None and allow_compiled_mask and self.dense_mask_bytes <= compiled_limit_bytes:
            try:
                bm = torch.compile(create_block_mask)(mask_mod, 1, H, Q_LEN, rows, device=dev)
                self.build_method = "torch.compile(create_block_mask)"
            except Exception as e:  # noqa: BLE001
                self.build_note = f"compiled create_block_mask failed: {type(e).__name__}: {str(e)[:120]}"
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        if bm is None:
            bm = self._direct_block_mask(mask_mod, H, Q_LEN, rows, dev)
            self.build_method = "BlockMask.from_kv_blocks"
        if dev.type == "cuda":
            torch.cuda.synchronize()
        self.build_ms = (time.perf_counter() - t0) * 1e3
        self.block_mask = bm
        self._flex = torch.compile(flex_attention, dynamic=False) if compile else flex_attention

    def _direct_block_mask(self, mask_mod, H, Q_LEN, KV_LEN, dev, BS: int = 128):
        """Block mask written from the segment bounds (no dense mask)."""
        from torch.nn.attention.flex_attention import BlockMask

        lo = self._lo.to(torch.int64).cpu()
        hi = self._hi.to(torch.int64).cpu()
        nq = (Q_LEN + BS - 1) // BS
        nkv = (KV_LEN + BS - 1) // BS
        G = self.G
        num = torch.zeros(1, H, nq, dtype=torch.int32)
        idx = torch.zeros(1, H, nq, nkv, dtype=torch.int32)
        fnum = torch.zeros(1, H, nq, dtype=torch.int32)
        fidx = torch.zeros(1, H, nq, nkv, dtype=torch.int32)
        for h in range(H):
            for qb in range(nq):
                if self.layout == "seq":
                    q0, q1 = qb * BS, min(Q_LEN, (qb + 1) * BS)
                    segs = range(q0 // G, (q1 - 1) // G + 1)
                else:
                    segs = [h]
                a = min(int(lo[s]) for s in segs)
                b = max(int(hi[s]) for s in segs)
                if b <= a:
                    continue
                blocks = list(range(a // BS, (b - 1) // BS + 1))
                full, part = [], []
                for kb in blocks:
                    k0, k1 = kb * BS, min(KV_LEN, (kb + 1) * BS)
                    # a block is full only if every query of the q block sees all of it
                    if (self.layout == "heads" and k0 >= a and k1 <= b and k1 - k0 == BS
                            and Q_LEN <= BS):
                        full.append(kb)
                    else:
                        part.append(kb)
                num[0, h, qb] = len(part)
                idx[0, h, qb, :len(part)] = torch.tensor(part, dtype=torch.int32) if part else 0
                fnum[0, h, qb] = len(full)
                if full:
                    fidx[0, h, qb, :len(full)] = torch.tensor(full, dtype=torch.int32)
        return BlockMask.from_kv_blocks(num.to(dev), idx.to(dev), fnum.to(dev), fidx.to(dev),
                                        BLOCK_SIZE=BS, mask_mod=mask_mod,
                                        seq_lengths=(Q_LEN, KV_LEN))

    def __call__(self, query: Tensor, k_flat: Tensor, v_flat: Tensor) -> Tensor:
        """``query [B, Hq, 1, D]`` over ``k_flat, v_flat [rows, D]`` -> ``[B, Hq, 1, D]``."""
        B, Hq, T, D = query.shape
        k = k_flat.view(1, 1, self.rows, D)
        v = v_flat.view(1, 1, self.rows, D)
        if self.layout == "seq":
            q = query.reshape(1, 1, B * Hq, D)
            out = self._flex(q, k, v, block_mask=self.block_mask)
        else:
            q = query.reshape(1, B * self.Hk, self.G, D)
            out = self._flex(q, k, v, block_mask=self.block_mask, enable_gqa=True)
        return out.reshape(B, Hq, 1, D)


def flex_decode(query: Tensor, k_flat: Tensor, v_flat: Tensor, seg_start: Tensor,
                seg_len: Tensor, layout: str = "seq", compile: bool = True) -> Tensor:
    """One-shot FlexAttention decode over the flat cache (builds the block mask every call).

    For timing, build a :class:`FlexDecode` once and time only its ``__call__``.
    """
    B, Hq = query.shape[:2]
    Hk = seg_start.numel() // B
    fd = FlexDecode(seg_start, seg_len, k_flat.shape[0], B, Hq, Hk, layout=layout,
                    compile=compile)
    return fd(query, k_flat, v_flat)
