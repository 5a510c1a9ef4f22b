"""The decode step's projections on adakv's Hopper GEMM (``torch.ops.adakv.decode_gemm``).

Why: at decode every weight byte is read once per step for a few hundred rows, so a step's
GEMMs should stream the weights at the copy bandwidth. cuBLAS's kernels for these shapes leave
part of it unused where a projection has few 128-row output tiles for the GPU's SMs (o_proj,
qkv and down of an 8B model: 57-71% of the copy bandwidth at 128 rows on an H200,
``benchmarks/results/serve-h200.md``); ``csrc/cuda/decode_gemm.cu`` splits K over a thread-block
cluster for those. Measured status (``benchmarks/results/decode-gemm-h100.md``): faster than
cuBLAS only for down_proj and the LM head at 64 rows, slower elsewhere, so it is opt-in
(``Engine(decode_gemm=True)``), not a default.

* :func:`linear` is ``torch.nn.functional.linear`` with the kernel where it applies: at most
  :data:`MAX_ROWS` rows, fp16 / bf16, contiguous weight, ``K % 8 == 0``; anything else (prefill
  chunks, other dtypes) goes to ``F.linear``.
* :func:`route_projections` makes a model's ``nn.Linear`` modules (and the fused projections of
  :mod:`adakv_ops.fusion`) compute through :func:`linear`, when the model lives on an sm_90 GPU
  and the CUDA kernels are loaded; :func:`unroute_projections` undoes it. The choice is made in
  Python on the module's class or flag and the row count (``torch.compile`` specialises on
  both), so compiled decode steps and their CUDA graphs contain the kernel and prefill chunks
  of more than :data:`MAX_ROWS` rows keep ``F.linear``.

The outputs equal ``F.linear``'s up to the rounding another summation order gives (fp32
accumulation, one rounding to the output dtype).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
import torch.nn.functional as F

__all__ = ["MAX_ROWS", "RoutedLinear", "available", "linear", "route_projections",
           "unroute_projections"]

#: the most rows of x the kernel takes (one token tile)
MAX_ROWS = 256


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel runs for weights of ``dtype`` on ``device``: an sm_90 GPU, fp16 /
    bf16, and the CUDA kernels of adakv_ops loaded. A host query: call it outside compiled code."""
    import adakv_ops
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if not adakv_ops.cuda_kernels_loaded:
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``, computed by ``adakv::decode_gemm`` when ``x`` has at most
    :data:`MAX_ROWS` rows (all dimensions but the last), the dtypes are fp16 / bf16, ``K`` is a
    multiple of 8 and the weight is contiguous; the caller guarantees the device
    (:func:`available`) and 16-byte aligned storage (the op raises otherwise)."""
    K = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    if (rows == 0 or rows > MAX_ROWS or K % 8 != 0 or x.dtype != weight.dtype
            or x.dtype not in (torch.float16, torch.bfloat16) or not weight.is_contiguous()
            or (bias is not None and bias.dtype != x.dtype)):
        return F.linear(x, weight, bias)
    y = torch.ops.adakv.decode_gemm(x.reshape(rows, K).contiguous(), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class RoutedLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`linear` (the class a routed module takes; its
    parameters and state-dict keys are those of the ``nn.Linear`` it was)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def route_projections(model: nn.Module) -> int:
    """Route every plain ``nn.Linear`` of ``model`` and every fused projection
    (:class:`adakv_ops.fusion.FusedLinear`) through :func:`linear`, in place, if the kernel is
    :func:`available` for the model's first parameter; returns how many modules were routed
    (0 where it is not available: the model is left as it is)."""
    from .fusion import FusedLinear
    p = next(model.parameters(), None)
    if p is None or not available(p.device, p.dtype):
        return 0
    routed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = RoutedLinear
            routed += 1
        elif isinstance(module, FusedLinear) and not module.decode_gemm:
            module.decode_gemm = True
            routed += 1
    return routed


def unroute_projections(model: nn.Module) -> int:
    """Undo :func:`route_projections`; returns how many modules were restored."""
    from .fusion import FusedLinear
    restored = 0
    for module in model.modules():
        if type(module) is RoutedLinear:
            module.__class__ = nn.Linear
            restored += 1
        elif isinstance(module, FusedLinear) and module.decode_gemm:
            module.decode_gemm = False
            restored += 1
    return restored
