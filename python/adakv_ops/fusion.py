"""Fuse a decoder's parallel projections into one GEMM each: ``q/k/v_proj`` of every attention
module and ``gate/up_proj`` of every MLP (the projections that read the same input).

Why: at decode a step multiplies a few hundred rows by every weight, and each separate
projection is its own GEMM. The small ones (``k_proj`` and ``v_proj`` of a GQA model, 1/4 of
``q_proj`` each on Llama-3.1-8B) fill a fraction of the GPU and read their weights well below
the copy bandwidth; one GEMM over the concatenated weights reads all three at the rate of the
large one. Serving engines (vLLM's ``QKVParallelLinear``, ``MergedColumnParallelLinear``) load
the weights fused for this reason.

How, without rewriting any model family's forward: the projections of a group are replaced by
:class:`ProjectionSlice` modules that share one :class:`FusedLinear` (the weights concatenated
in one tensor, the originals freed). The first slice called with an input computes the fused
product and keeps it for the others; each slice returns its own columns; the last one called
drops it. A slice called with another input (a family that projects something else) computes
its own product alone, so the outputs are those of the unfused model in every case, up to the
rounding a GEMM of another width may choose. The bookkeeping is Python state that
``torch.compile`` traces (set and cleared within one forward: nothing crosses the graph).

State dicts keep the unfused names: a slice saves its rows of the fused weight (and bias) as
``weight`` (``bias``), views like any module's tensors, and loads a checkpoint's ``weight`` /
``bias`` into those rows; the shared :class:`FusedLinear` has no key of its own. So
``load_state_dict`` of an unfused checkpoint works on a fused model, and the two models' state
dicts have the same keys. :func:`unfuse_projections` gives the model its ``nn.Linear``
projections back (for code that wants them, e.g. ``save_pretrained``: safetensors refuses
tensors that share memory).

Scope: modules with ``q_proj``, ``k_proj``, ``v_proj`` (attention) or ``gate_proj``,
``up_proj`` (MLP) that are plain ``nn.Linear`` of one dtype and device, with or without bias
(Llama, Mistral, Qwen2, Qwen3, Gemma 3 and their relatives); anything else is left as it is.
Tensor-parallel (DTensor) weights are not fused.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from . import gemm

__all__ = ["FusedLinear", "ProjectionSlice", "fuse_projections", "unfuse_projections"]

#: the groups of sibling projections fused, by attribute name
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedLinear(nn.Module):
    """The concatenated weight ``[sum(out_i), in]`` (and bias) of several linears that read the
    same input, and the product its slices share within one call."""

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        w = [lin.weight for lin in linears]
        self.weight = nn.Parameter(torch.cat([t.detach() for t in w]), requires_grad=False)
        has_bias = [lin.bias is not None for lin in linears]
        if any(has_bias):
            b = [lin.bias.detach() if lin.bias is not None else
                 torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device)
                 for lin in linears]
            self.bias = nn.Parameter(torch.cat(b), requires_grad=False)
        else:
            self.bias = None
        self.bounds = []
        self.has_bias = has_bias       # per part: whether its linear had a bias
        start = 0
        for lin in linears:
            self.bounds.append((start, start + lin.out_features))
            start += lin.out_features
        #: compute the product with adakv_ops.gemm.linear (set by gemm.route_projections)
        self.decode_gemm = False
        # the product of the current call, its input, and how many slices have read it
        self._input: Optional[Tensor] = None
        self._product: Optional[Tensor] = None
        self._reads = 0

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, parts={[b - a for a, b in self.bounds]}"

    def product(self, x: Tensor) -> Tensor:
        """The fused product for ``x``: computed by the first slice that asks, kept until every
        slice has read it."""
        if self._product is None or self._input is not x:
            if self.decode_gemm:
                self._product = gemm.linear(x, self.weight, self.bias)
            else:
                self._product = F.linear(x, self.weight, self.bias)
            self._input = x
            self._reads = 0
        out = self._product
        self._reads += 1
        if self._reads == len(self.bounds):
            self._product = None
            self._input = None
            self._reads = 0
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Nothing of its own to load: its slices load their rows (a fused model's state dict
        has no key under a ``FusedLinear``)."""


class ProjectionSlice(nn.Module):
    """Stands for one of the fused projections: its output columns of the shared product."""

    def __init__(self, fused: FusedLinear, index: int):
        super().__init__()
        self.fused = fused
        self.start, self.stop = fused.bounds[index]
        self.in_features = fused.weight.shape[1]
        self.out_features = self.stop - self.start
        self._has_bias = fused.has_bias[index]
        self.register_state_dict_post_hook(_slice_state_dict)

    @property
    def weight(self) -> Tensor:
        return self.fused.weight[self.start:self.stop]

    @property
    def bias(self) -> Optional[Tensor]:
        """Its rows of the fused bias; ``None`` where its linear had none (the fused bias is
        zero there)."""
        b = self.fused.bias
        return None if b is None or not self._has_bias else b[self.start:self.stop]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """``prefix + "weight"`` (and ``"bias"``) copied into its rows of the fused tensors,
        with ``nn.Module``'s reporting of missing, unexpected and mis-shaped keys."""
        for name, mine in (("weight", self.weight), ("bias", self.bias)):
            key = prefix + name
            if mine is None:
                continue                 # a "bias" key is reported as unexpected below
            if key not in state_dict:
                missing_keys.append(key)
                continue
            src = state_dict[key]
            if not isinstance(src, Tensor) or src.shape != mine.shape:
                shape = tuple(src.shape) if isinstance(src, Tensor) else type(src).__name__
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{shape} from checkpoint, the shape in current model is "
                                  f"{tuple(mine.shape)}.")
                continue
            with torch.no_grad():
                mine.copy_(src)
        if strict:
            ours = {prefix + "weight"} | ({prefix + "bias"} if self.bias is not None else set())
            unexpected_keys.extend(k for k in state_dict
                                   if k.startswith(prefix) and k not in ours)

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.stop} of the fused projection"

    def forward(self, x: Tensor) -> Tensor:
        return self.fused.product(x)[..., self.start:self.stop]


def _slice_state_dict(module: ProjectionSlice, state_dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook of a slice: its rows under the unfused names, the shared fused
    tensors (saved by the recursion under ``prefix + "fused."``) dropped."""
    for k in [k for k in state_dict if k.startswith(prefix + "fused.")]:
        del state_dict[k]
    state_dict[prefix + "weight"] = module.weight.detach()    # a view: rows of the fused one
    if module.bias is not None:
        state_dict[prefix + "bias"] = module.bias.detach()


def _fusable(linears: List[nn.Module]) -> bool:
    if not all(type(lin) is nn.Linear for lin in linears):
        return False
    w = [lin.weight for lin in linears]
    if any(type(t) is not nn.Parameter or t.is_meta for t in w):
        return False
    if any(type(t.data) is not Tensor for t in w):     # tensor subclasses (DTensor, ...)
        return False
    return (len({(t.dtype, t.device) for t in w}) == 1
            and len({lin.in_features for lin in linears}) == 1)


@torch.no_grad()
def fuse_projections(model: nn.Module) -> int:
    """Fuse, in place, every group of :data:`GROUPS` found on a module of ``model`` (see the
    module's doc); returns the number of groups fused. Peak memory grows by one group's
    weights at a time (each group's originals are freed once its fused copy exists).
    Idempotent: fused groups are not fused again."""
    fused = 0
    for module in list(model.modules()):
        for names in GROUPS:
            linears = [getattr(module, n, None) for n in names]
            if not _fusable(linears):
                continue
            group = FusedLinear(linears)
            for i, n in enumerate(names):
                setattr(module, n, ProjectionSlice(group, i))
            fused += 1
    return fused


@torch.no_grad()
def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections` in place: each group's slices become ``nn.Linear`` modules
    again, with their rows of the fused weight (and their bias) copied out, the fused tensors
    freed; returns the number of groups unfused. Peak memory grows by one group's weights at a
    time."""
    unfused = 0
    for module in list(model.modules()):
        for names in GROUPS:
            slices = [getattr(module, n, None) for n in names]
            if not all(isinstance(s, ProjectionSlice) for s in slices) or \
                    len({id(s.fused) for s in slices}) != 1:
                continue
            grad = slices[0].fused.weight.requires_grad
            for n, s in zip(names, slices):
                w = s.weight
                lin = nn.Linear(s.in_features, s.out_features, bias=s.bias is not None,
                                device="meta", dtype=w.dtype)
                lin.weight = nn.Parameter(w.clone(), requires_grad=grad)
                if s.bias is not None:
                    lin.bias = nn.Parameter(s.bias.clone(), requires_grad=grad)
                setattr(module, n, lin)
            unfused += 1
    return unfused
