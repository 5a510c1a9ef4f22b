"""Host -> device copies that never make the host wait for the GPU (the serving step's inputs
and page-table updates).

A copy from pageable memory makes CUDA wait for the stream first, and allocating pinned memory
(``Tensor.pin_memory()``, PyTorch's caching host allocator growing with ``cudaHostAlloc``) can
synchronise too: measured on the H200 (``benchmarks/results/h2d-sync-h200.txt``), some pinned
copies blocked for a whole queued step and some did not, while copies from a preallocated
pinned buffer never did. :class:`HostStaging` is that buffer: one pinned arena per device,
handed out as a ring. Each copy takes the next ``len`` bytes (aligned), records a CUDA event
after its copy is queued, and before a region is written again the host waits for the events
of the copies that read it, which have long finished unless the ring is lapped within a step
(then it waits, correctly; the arena is sized so that one serving step's copies fit many
times). A copy larger than the arena takes the plain pinned path.

On the CPU (and for any non-CUDA device) a copy is ``Tensor.to``.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, Tuple

import torch
from torch import Tensor

__all__ = ["HostStaging", "to_device"]

_ALIGN = 64


class HostStaging:
    """A ring of pinned host memory for non-blocking host -> ``device`` copies."""

    def __init__(self, device: torch.device, nbytes: int = 8 << 20):
        self.device = torch.device(device)
        self.nbytes = int(nbytes)
        self._arena = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
        self._head = 0                                   # next free byte
        self._busy: Deque[Tuple[int, int, torch.cuda.Event]] = deque()  # (start, end, event)
        self.waits = 0                                   # times the ring had to wait
        self.fallbacks = 0                               # copies larger than the arena

    def _take(self, n: int) -> tuple[int, int]:
        """The ring's next region of ``n`` bytes (rounded up to the alignment), free to write:
        ``(start, end)``."""
        n = -(-n // _ALIGN) * _ALIGN
        if self._head + n > self.nbytes:                 # wrap around
            self._head = 0
        start, end = self._head, self._head + n
        # wait for the copies still reading [start, end): the ring hands out regions in order
        # and never splits one, so the oldest queued region is the next one ahead of the
        # write point, and only the front of the queue can be in the way
        while self._busy:
            s, e, ev = self._busy[0]
            if not (s < end and start < e):
                break
            if not ev.query():
                self.waits += 1
                ev.synchronize()
            self._busy.popleft()
        self._head = end
        return start, end

    def copy(self, t: Tensor) -> Tensor:
        """``t`` (a CPU tensor) on the device; returns at once (the copy is queued on the
        current stream)."""
        t = t.contiguous()
        n = t.numel() * t.element_size()
        if n > self.nbytes:
            self.fallbacks += 1
            return t.pin_memory().to(self.device, non_blocking=True)
        out = torch.empty(t.shape, dtype=t.dtype, device=self.device)
        if n == 0:
            return out
        start, end = self._take(n)
        buf = self._arena[start:start + n].view(t.dtype).view(t.shape)
        buf.copy_(t)
        out.copy_(buf, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self._busy.append((start, end, ev))
        return out


_STAGING: Dict[Tuple[str, int], HostStaging] = {}


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without making the host wait for the stream (CUDA: through
    the device's :class:`HostStaging` ring; elsewhere ``Tensor.to``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    st = _STAGING.get(("cuda", idx))
    if st is None:
        st = _STAGING[("cuda", idx)] = HostStaging(torch.device("cuda", idx))
    return st.copy(t)
