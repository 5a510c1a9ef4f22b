"""Tensor parallelism: the single-device Ada-KV allocation when a layer's heads are split
across ranks (SPEC section 8, issue 15).

Under tensor parallelism rank ``r`` of ``world`` holds query heads ``[r Hq/world, (r+1)
Hq/world)`` and KV heads ``[r Hk/world, (r+1) Hk/world)`` of every layer (the colwise split of
``q_proj`` / ``k_proj`` / ``v_proj`` and the rowwise split of ``o_proj`` that transformers'
``tp_plan`` uses), so a GQA group never straddles ranks. Everything per head (scores, the
value weight's products, selection, storage) stays local; what crosses heads goes through the
process group, once per layer at prefill:

* the global top-k of the allocation (Ada-KV, AdaCriticalKV, DefensiveKV, and across layers
  Layer-DefensiveKV): the ranks ``all_gather`` their ``[B, H/world, L]`` ranking scores, every
  rank allocates over all heads, exactly as one device does (same tensor, same kernel, same
  result), and keeps its own heads' budgets;
* DefensiveKV's cross-head quantities: the value norms (``all_gather``, so the per-token sum
  over heads is the single device's sum), the row's maximum (``all_reduce`` MAX: exact), the
  window masses (``all_gather`` of each rank's mean over its query heads, averaged: equal to
  the single device's mean up to float rounding).

:class:`HeadShards` is the only place that talks to ``torch.distributed``. NCCL on GPUs, gloo
on CPUs (tested with 2 and 4 processes, ``tests/test_distributed.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["HeadShards"]


class HeadShards:
    """This rank's contiguous block of every layer's heads, and the exchanges across ranks.

    ``group``: the tensor-parallel process group (default: the world)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("adakv: tensor parallelism needs torch.distributed initialised "
                               "(init_process_group)")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        # where host values travel (NCCL moves device tensors only)
        self._host_dev = (torch.device("cuda", torch.cuda.current_device())
                          if dist.get_backend(group) == "nccl" else torch.device("cpu"))

    def check_heads(self, num_heads: int, num_kv_heads: int) -> tuple[int, int]:
        """The local ``(Hq, Hk)`` of a model with ``num_heads`` query and ``num_kv_heads`` KV
        heads in all; a clear error when they do not split evenly."""
        for name, n in (("num_attention_heads", num_heads),
                        ("num_key_value_heads", num_kv_heads)):
            if n % self.world != 0:
                raise ValueError(f"adakv: {name} = {n} is not divisible by the tensor-parallel "
                                 f"world size {self.world}: each rank must hold whole heads")
        return num_heads // self.world, num_kv_heads // self.world

    def gather_heads(self, x: Tensor) -> Tensor:
        """``x [B, h, ...]`` of every rank -> ``[B, world h, ...]`` in head (rank) order."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=1)

    def own(self, x: Tensor) -> Tensor:
        """This rank's heads of ``x [B, world h, ...]``."""
        h = x.shape[1] // self.world
        return x[:, self.rank * h:(self.rank + 1) * h].contiguous()

    def max(self, x: Tensor) -> Tensor:
        """Elementwise maximum over the ranks (a copy)."""
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.MAX, group=self.group)
        return y

    def min(self, x: Tensor) -> Tensor:
        """Elementwise minimum over the ranks (a copy)."""
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.MIN, group=self.group)
        return y

    def min_int(self, x: int) -> int:
        """The smallest of the ranks' host integers ``x`` (one small all_reduce)."""
        return int(self.min(torch.tensor([int(x)], dtype=torch.int64,
                                         device=self._host_dev)).item())

    def mean_of_ranks(self, x: Tensor) -> Tensor:
        """The mean over the ranks of ``x`` (each rank's value weighs the same)."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.stack(parts).mean(dim=0)
