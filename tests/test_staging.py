"""adakv_ops.staging: host -> device copies through the pinned ring give the right values even
when the ring is lapped while the GPU is busy (the host then waits for the copies it would
overwrite), and do not make the host wait for queued work otherwise (CUDA only); on the CPU a
copy is Tensor.to."""
from __future__ import annotations

import time

import pytest
import torch

from adakv_ops.staging import HostStaging, to_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def test_cpu_copy_is_tensor_to():
    t = torch.arange(10, dtype=torch.int32)
    out = to_device(t, torch.device("cpu"))
    assert torch.equal(out, t)


def _busy(ms=150):
    """Queue roughly ``ms`` of GPU work (conftest.gpu_busy)."""
    from conftest import gpu_busy
    gpu_busy(ms)


@cuda
def test_cuda_ring_lapped_while_busy_keeps_every_value():
    st = HostStaging(torch.device("cuda"), nbytes=4096)
    g = torch.Generator().manual_seed(0)
    srcs = [torch.randint(0, 1 << 30, (int(torch.randint(1, 300, (1,), generator=g)),),
                          generator=g, dtype=torch.int32) for _ in range(400)]
    _busy()
    outs = [st.copy(s) for s in srcs]
    torch.cuda.synchronize()
    assert all(torch.equal(o.cpu(), s) for o, s in zip(outs, srcs))
    assert st.waits > 0                  # 400 copies of up to 1.2 KB lap a 4 KB ring
    big = torch.arange(5000, dtype=torch.int64)
    assert torch.equal(st.copy(big).cpu(), big) and st.fallbacks == 1


@cuda
def test_cuda_copies_do_not_wait_for_queued_work():
    st = HostStaging(torch.device("cuda"))
    srcs = [torch.arange(i, i + 512, dtype=torch.int64) for i in range(20)]
    for s in srcs[:2]:
        st.copy(s)                       # warm-up
    torch.cuda.synchronize()
    _busy(200)
    t = time.perf_counter()
    outs = [st.copy(s) for s in srcs]
    host = time.perf_counter() - t
    t = time.perf_counter()
    torch.cuda.synchronize()
    wait = time.perf_counter() - t
    assert all(torch.equal(o.cpu(), s) for o, s in zip(outs, srcs))
    assert st.waits == 0
    assert host < 0.25 * wait, (host, wait)   # the host ran ahead of the queued work
