"""A continuous-batching engine over the paged :class:`adakv_ops.hf.AdaKVCache` (issue 13).

```python
from adakv_ops.serve import Engine

engine = Engine(model, num_pages=200_000, max_batch=128, budget=1024, window=32,
                chunk_size=16384)
rid = engine.add_request(prompt_ids, max_new_tokens=256, eos_token_id=tok.eos_token_id)
while engine.has_work():
    for rid, token in engine.step().items():   # one new token per running request
        ...
engine.result(rid)                             # the generated ids
```

Each :meth:`Engine.step`:

1. retires the requests that need no further step (``max_new_tokens`` reached, counting the
   token in flight; ``eos_token_id`` read; also :meth:`cancel`): ``AdaKVCache.remove_rows``
   gives their pages back at once, nobody else's rows move;
2. prefills: admits queued requests in arrival order while they fit, and runs their prefills
   (each alone, in chunks of ``chunk_size``: ``AdaKVCache.prefill``'s computation with
   ``order="auto"``, layer-major on the supported models, whose every layer is evicted, so the
   raw prompt never enters the pool) a unit at a time (:class:`adakv_ops.hf.PrefillJob`: a
   chunk of a layer, or of the model), up to ``max_prefill_tokens`` prompt tokens' worth per
   step (the first unit always). A prompt longer than that is prefilled over several steps
   while the running requests decode in between (a side cache over the same page store:
   nobody's rows move); once its last unit ran it is evicted into pages and joins the batch
   with its first token. Meanwhile, queued requests whose whole prefill fits in what is left
   of a step are prefilled in it and join ahead of the long prompt (a short prompt does not
   wait behind a long one; the queue's order is kept);
3. launches one decode step for every running request (one forward over the cache's batch,
   each row at its own position; greedy or sampled per request), fed with the previous step's
   tokens *on the device*;
4. reads the previous step's tokens while the device runs the new one: each step's token ids
   are copied into a pinned host buffer right behind its forward (one of two, alternating) and
   an event is recorded after the copy, so the read waits for that step only, never for the
   step just launched behind it (a plain ``ids.tolist()`` would wait for the whole stream).

So the host's work (page accounting, inputs, joins and leaves, the compiled forward's call)
overlaps the device's: a decode token is returned by the call after the one that launched its
step, and after an eos one extra step was computed for that request (its token is dropped).

Admission control (host-side page arithmetic, before any device work): a request is admitted
only when the pool can hold, next to the worst case of every running request, its own worst
case (kept rows of every layer + ``max_new_tokens``, rounded up to pages) and, while it is
prefilled (the running requests decode meanwhile), what its prefill holds in the pool
instead: nothing more for a one-forward prompt or a
layer-major chunked prefill (each layer holds its raw prompt in a buffer of its own, outside
the pool, and writes only its kept rows), the raw prompt of every layer for a chunk-major one
(held in pages until the last chunk; ``AdaKVCache.prefill_order`` says which order a prompt
gets, the same answer ``prefill`` acts on). So a running request never runs out of pages
mid-decode. A request that could never fit (even alone) is refused by :meth:`add_request`
with :class:`AdmissionError` naming what is short; one that does not fit now waits in the
queue. (A layer-major prefill's raw prompt, one layer's K/V, is device memory outside the
pool: leave room for it, as for the activations, when sizing ``num_pages``.)

Semantics: every request gets exactly the greedy tokens it gets alone (tested); positions are
per request (its prompt length + tokens so far). ``compile=True`` runs the decode forward in
CUDA graphs per batch-size bucket. Sampling (``temperature`` / ``top_p`` / ``top_k`` per
request, :mod:`adakv_ops.sampling`) draws from one device generator seeded by ``seed``: the
tokens are reproducible for the same engine, seed and arrival schedule, not equal to those of
the request alone.
"""

from __future__ import annotations

import contextlib
import operator
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import fusion, gemm
from ._checks import is_int
from .hf import AdaKVCache, PrefillJob, cache_kwarg
from .hf.rotary_decode import install_rotary_decode
from .hf.cache import is_integer_dtype
from .sampling import SamplingParams, select_next
from .store import to_device

__all__ = ["AdmissionError", "Engine", "Request"]


# The BLAS library of the decode step's GEMMs (``Engine(blas=...)``). Measured on an H100
# (torch 2.11 + CUDA 13, 2026-12-07, benchmarks/results/serve-h100.md, bench_decode_gemm.py):
# for the 8B model's decode GEMMs cuBLASLt's heuristics pick kernels that read the weights at
# 90% / 88% of the weights' roofline at M = 64 / 128 against cuBLAS's 85% / 81%, and worse
# ones at M = 256 (64% against 69%). "auto" takes cuBLASLt for the batch buckets in
# [CUBLASLT_MIN_BATCH, CUBLASLT_MAX_BATCH], cuBLAS above, and leaves smaller ones (not
# measured) to torch's setting.
BLAS_POLICIES = ("auto", "cublas", "cublaslt")
CUBLASLT_MIN_BATCH = 64
CUBLASLT_MAX_BATCH = 128


def decode_blas(policy: Optional[str], batch: int, dtype: torch.dtype = torch.bfloat16
                ) -> Optional[str]:
    """The BLAS library (``torch.backends.cuda.preferred_blas_library`` name) for the decode
    GEMMs of a step at ``batch`` rows of ``dtype`` weights under ``policy``: ``"auto"`` picks
    ``"cublaslt"`` for fp16 / bf16 from :data:`CUBLASLT_MIN_BATCH` to
    :data:`CUBLASLT_MAX_BATCH` rows and ``"cublas"`` above (``None``, torch's setting, below
    and for other dtypes: not measured), ``"cublas"`` / ``"cublaslt"`` always that one,
    ``None`` leaves torch's setting alone (returns ``None``)."""
    if policy is None:
        return None
    if policy not in BLAS_POLICIES:
        raise ValueError(f"adakv: blas must be one of {BLAS_POLICIES} or None, got {policy!r}")
    if policy == "auto":
        if dtype not in (torch.float16, torch.bfloat16) or batch < CUBLASLT_MIN_BATCH:
            return None
        return "cublaslt" if batch <= CUBLASLT_MAX_BATCH else "cublas"
    return policy


@contextlib.contextmanager
def _preferred_blas(name: Optional[str]):
    """torch's preferred BLAS library set to ``name`` inside the block and restored after
    (nothing done for ``None``). With CUDA graphs the library of each GEMM is the one set
    when its graph was recorded."""
    if name is None:
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


class AdmissionError(ValueError):
    """A request that can never be served by this engine (too big for the whole pool, or
    bad arguments)."""


def _token_ids(name: str, ids) -> List[int]:
    """``ids`` (ints, or an integer tensor) as a list of Python ints; anything else (a float,
    a bool, a string, a float tensor) raises :class:`AdmissionError` naming ``name``."""
    if isinstance(ids, Tensor):
        if not is_integer_dtype(ids.dtype):
            raise AdmissionError(f"adakv: {name} must hold integer token ids, got a "
                                 f"{ids.dtype} tensor")
        return ids.reshape(-1).tolist()
    if isinstance(ids, (str, bytes)):
        raise AdmissionError(f"adakv: {name} must be token ids, got a {type(ids).__name__}")
    out = []
    for t in ids:
        if isinstance(t, bool):
            raise AdmissionError(f"adakv: {name} must be integer token ids, got {t!r}")
        try:
            out.append(operator.index(t))
        except TypeError:
            raise AdmissionError(f"adakv: {name} must be integer token ids, got "
                                 f"{t!r}") from None
    return out


@dataclass
class Request:
    """One request: its prompt, limits, generated tokens and state
    (``"queued"``, ``"prefilling"``, ``"running"``, ``"finished"``, ``"cancelled"``)."""

    rid: int
    prompt: List[int]
    max_new_tokens: int
    eos_token_ids: Tuple[int, ...]     # stop tokens (none: () )
    tokens: List[int] = field(default_factory=list)
    state: str = "queued"
    pages_bound: int = 0        # worst-case pages once evicted, incl. its max_new_tokens
    raw_pages: int = 0          # pages its chunked prefill holds until the last chunk
    first_unit: int = 0         # cost of its prefill's first unit (token-layers)
    pending: int = 0            # tokens of decode steps launched but not read yet
    sampling: SamplingParams = field(default_factory=SamplingParams)

    @property
    def done(self) -> bool:
        """Its tokens are complete (``max_new_tokens`` read, or the eos token)."""
        return (len(self.tokens) >= self.max_new_tokens
                or (bool(self.tokens) and self.tokens[-1] in self.eos_token_ids))

    @property
    def ends(self) -> bool:
        """No further decode step is needed: done, or its last token is in flight."""
        return self.done or len(self.tokens) + self.pending >= self.max_new_tokens


class Engine:
    """Continuous batching of requests over one paged :class:`AdaKVCache`.

    Args:
        model: a transformers causal LM without sliding-window layers (Llama, Mistral, Qwen2,
            Qwen3), attention ``sdpa`` or ``eager``.
        num_pages: the page pool (all layers); fixed, so memory is what admission says.
        max_batch: the most requests running at once (sequence slots of the store).
        chunk_size: prefill chunk (default 16384, as ``max_prefill_tokens``: a longer prompt
            is prefilled over several steps with activation memory bounded by the chunk;
            ``None``: each prompt in one forward, one unit of work that no decode step
            interrupts).
        max_prefill_tokens: the prompt tokens' worth of prefill work one :meth:`step` does
            at most before it launches the decode step (serving schedulers' per-step token
            budget), counted in units (:meth:`AdaKVCache.prefill_unit_costs`: a chunk of
            ``n`` tokens through one layer costs ``n / L`` tokens) and never splitting one (the
            first unit of a step always runs, however long): a burst of queued prompts is
            prefilled over several steps, and so is one prompt longer than the budget when
            ``chunk_size`` splits it, the running requests decoding in between instead of
            stalling for the whole prefill. ``None``: every prefill that fits, whole, in one
            step.
        compile: decode with ``torch.compile(model.forward, fullgraph=True)`` (``mode`` as
            given, e.g. ``"reduce-overhead"`` for CUDA graphs) at a fixed shape per batch-size
            bucket (powers of two up to ``max_batch``): the batch is padded with pad rows
            (``-1`` entries of the paged ops' ``segment_index``: no slot, no page, output 0),
            so joins and leaves change no shape; ``False``: eager, exact batch.
            ``backend`` is torch.compile's. ``seed``: the sampling generator's seed.
        fuse_projections: fuse the model's ``q/k/v_proj`` and ``gate/up_proj`` in place into
            one GEMM each (:func:`adakv_ops.fusion.fuse_projections`; the same outputs up to
            a GEMM's rounding, the same memory), as serving engines load their weights: at
            decode the small ``k/v_proj`` GEMMs read their weights far below the copy
            bandwidth. ``False`` leaves the model as it is.
        blas: the BLAS library of the decode step's GEMMs on CUDA (torch's
            ``preferred_blas_library``, set around each decode forward and restored after it;
            prefill keeps torch's setting): ``"auto"`` (default) for fp16 / bf16 models
            cuBLASLt at batch buckets 64-128 and cuBLAS above (measured faster for
            decode-shaped GEMMs there, :func:`decode_blas`), torch's setting for smaller
            buckets and other dtypes; ``"cublas"`` / ``"cublaslt"`` always that one; ``None``
            torch's own setting.
        decode_gemm: route the model's projections through :func:`adakv_ops.gemm.linear`
            (adakv's Hopper GEMM for at most 256 rows, split-K over a cluster for projections
            with few output tiles; :func:`adakv_ops.gemm.route_projections`) when the model is
            on an sm_90 GPU in fp16 / bf16; prefill chunks and other devices keep torch's
            GEMMs. Off by default: on an H100 it beats cuBLAS only for down_proj and the LM
            head at 64 rows (benchmarks/results/decode-gemm-h100.md).
        rotary_append: decode with the rotary embedding fused into the paged append
            (:mod:`adakv_ops.hf.rotary_decode`: one ``paged_append_rotary_`` launch per layer
            instead of the RoPE of q and k, the K/V layout copies and the append) on the
            supported attention classes (Llama, Mistral, Qwen2, Qwen3); other modules, and
            prefill, keep their forward; under tensor parallelism each rank's layer gets its
            own heads of the sharded projections. Off by default until a GPU run has measured
            it (see docs/serve.md).
        **cache_kwargs: the ``AdaKVCache`` settings (``method``, ``budget``, ``window``,
            ``page_size``, ``max_growth``, ``max_seq_len``, ...). ``max_seq_len`` (prompt +
            new tokens of one request; a longer request is refused) fixes the page tables'
            shape: with ``compile=True`` it keeps every step on the graphs :meth:`warmup`
            recorded (without it a table that doubles is a new shape: every bucket compiles
            again). With ``max_growth`` (decode-time
            re-eviction) each request re-evicts on its own schedule, exactly when it would
            alone, and its pages are bounded by ``C + window + max_growth`` rows per head
            whatever ``max_new_tokens`` is (admission counts that bound).
    """

    def __init__(self, model, *, num_pages: int, max_batch: int,
                 chunk_size: Optional[int] = 16384, compile: bool = False,
                 max_prefill_tokens: Optional[int] = 16384,
                 mode: Optional[str] = None, backend: str = "inductor", seed: int = 0,
                 fuse_projections: bool = True, blas: Optional[str] = "auto",
                 decode_gemm: bool = False, rotary_append: bool = False, **cache_kwargs):
        if cache_kwargs.get("storage", "paged") != "paged":
            raise ValueError("adakv: the engine needs storage='paged'")
        decode_blas(blas, 1)   # rejects an unknown policy before anything is built
        for name, v in (("chunk_size", chunk_size), ("max_prefill_tokens", max_prefill_tokens)):
            if v is not None and not is_int(v, 1):
                raise ValueError(f"adakv: {name} must be a positive int or None, got {v!r}")
        self.model = model
        # bucket pad rows are -1 entries of the segment index: no slot, no page
        self.cache = AdaKVCache(model, num_pages=num_pages, max_batch=max_batch, **cache_kwargs)
        if len(self.cache.adakv_layers) != len(self.cache.layers):
            raise NotImplementedError("adakv: the engine does not support models with "
                                      "sliding-window layers yet")
        # the model is changed only once every setting is accepted
        #: the projection groups fused into one GEMM each (0 without ``fuse_projections``)
        self.fused_projections = fusion.fuse_projections(model) if fuse_projections else 0
        #: the modules routed through adakv's decode GEMM (0: torch's GEMMs everywhere)
        self.routed_projections = gemm.route_projections(model) if decode_gemm else 0
        #: the attention modules whose decode step runs paged_append_rotary_ (0: none)
        self.rotary_modules = install_rotary_decode(model) if rotary_append else 0
        self.chunk_size = chunk_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_batch = max_batch
        self.num_pages = num_pages
        cfg = model.config.get_text_config(decoder=True)
        self._layers = len(self.cache.adakv_layers)
        self._heads = self.cache.pool.heads          # this rank's heads (all, without TP)
        self._shards = self.cache.settings.shards   # tensor parallelism: one engine per rank
        first_param = next(model.parameters())
        self._device, self._dtype = first_param.device, first_param.dtype
        self.blas = blas
        self._queue: deque = deque()
        self._running: List[Request] = []       # batch row order of the cache
        self._job: Optional[tuple] = None       # (request, PrefillJob) being prefilled
        self._depth = model.config.get_text_config(decoder=True).num_hidden_layers
        self._requests: Dict[int, Request] = {}
        self._inflight = None                   # (ids on the device, requests, host copy)
        self._host_ids: List[Tensor] = []       # two pinned buffers for the ids (CUDA)
        self._host_turn = 0
        self._gen = torch.Generator(device=self._device).manual_seed(seed)
        self._next_id = 0
        self._vocab = cfg.vocab_size
        #: cumulative timings (host wall time; each part ends with a device read, so it is
        #: the device time too): decode steps, their tokens, prefills
        #: (decode_s = decode_host_s, the host's own work: inputs, page accounting, outputs;
        #: + decode_launch_s, the forward call until it returns, kernels queued; +
        #: decode_wait_s, waiting for the device to finish the step)
        self.stats = {"decode_s": 0.0, "decode_steps": 0, "decode_tokens": 0,
                      "decode_host_s": 0.0, "decode_launch_s": 0.0, "decode_wait_s": 0.0,
                      "prefill_s": 0.0, "prefills": 0}
        self._forward = (torch.compile(model.forward, fullgraph=True, mode=mode,
                                       backend=backend, dynamic=False)
                         if compile else model.forward)
        self._compiled = compile
        self._mode = mode
        if compile:
            # one compiled graph per bucket: with fullgraph=True, dynamo's recompile limit
            # (8 by default) would fail the step that reaches a 9th bucket (max_batch 256 has
            # 9), so the limit is raised to the buckets + a margin (a process-wide setting)
            from torch._dynamo import config as dynamo_config
            need = len(self.buckets) + 4
            if dynamo_config.recompile_limit < need:
                dynamo_config.recompile_limit = need

    @property
    def buckets(self) -> List[int]:
        """The decode batch shapes of ``compile=True``: powers of two up to ``max_batch``,
        and ``max_batch`` itself (what :meth:`_bucket` maps each batch size to)."""
        return sorted({self._bucket(1 << i) for i in range(self.max_batch.bit_length())}
                      | {self.max_batch})

    @torch.no_grad()
    def warmup(self, buckets: Optional[Sequence[int]] = None) -> float:
        """Compile (and with ``mode="reduce-overhead"`` or ``"max-autotune"`` record the CUDA
        graph of) the decode step of every bucket in ``buckets`` (default: :attr:`buckets`,
        all of them) before any request is served, as serving engines capture their graphs at
        start-up: otherwise the first step at each new batch bucket compiles it while every
        running request waits (tens of seconds per bucket for an 8B model). Each bucket: a
        one-token request is prefilled, forked to the bucket's size and decoded for three
        steps (compile, graph warm-up, recording), then cancelled; its pages go back, its ids
        are not kept, and the statistics start from zero. Runs only on an idle engine; returns
        the seconds taken (0 without ``compile``). Set ``max_seq_len`` (see the class):
        otherwise the first request whose segments outgrow the tables' initial width changes
        their shape and every bucket compiles again (a warning says so)."""
        if buckets is not None:
            if not isinstance(buckets, (list, tuple, range)):   # an int or a string too
                raise ValueError(f"adakv: buckets must be a list of batch sizes, got "
                                 f"{buckets!r}")
            for b in buckets:
                if not is_int(b, 1, self.max_batch):
                    raise ValueError(f"adakv: buckets must be batch sizes in [1, max_batch="
                                     f"{self.max_batch}], got {b!r}")
        if not self._compiled:
            return 0.0
        if self.has_work():
            raise RuntimeError("adakv: warmup() runs on an idle engine (no request queued or "
                               "running)")
        if self.cache.settings.max_seq_len is None:
            warnings.warn("adakv: Engine.warmup() without max_seq_len: the page tables start "
                          "16 pages wide and a longer sequence widens them, a new shape that "
                          "recompiles every bucket; pass max_seq_len to the Engine",
                          stacklevel=2)
        todo = sorted(set(self.buckets if buckets is None else
                          [self._bucket(b) for b in buckets]))
        t0 = time.perf_counter()
        next_id, gen_state = self._next_id, self._gen.get_state()
        for b in todo:
            rid = self.add_request([0], 8)
            while rid not in self.running:
                self.step()
            rids = [rid] + (self.fork(rid, b - 1) if b > 1 else [])
            for _ in range(3):
                self.step()
            for r in rids:
                self.cancel(r)
            while self.has_work():
                self.step()
        for r in range(next_id, self._next_id):
            self._requests.pop(r, None)
        self._next_id = next_id
        self._gen.set_state(gen_state)
        for k in self.stats:
            self.stats[k] = 0 if isinstance(self.stats[k], int) else 0.0
        return time.perf_counter() - t0

    # -- requests ------------------------------------------------------------------------------

    def add_request(self, prompt: Sequence[int], max_new_tokens: int,
                    eos_token_id: Union[int, Sequence[int], None] = None, *,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> int:
        """Queue a request; returns its id. Raises :class:`AdmissionError` if it can never
        fit this engine or an argument is bad (named in the message). ``prompt``: token ids
        (ints, or an integer tensor). ``eos_token_id``: a stop token, or several (a list, as
        ``generation_config.eos_token_id`` often is), or ``None``. ``temperature`` (0:
        greedy), ``top_p``, ``top_k`` (0: no limit): the request's sampling
        (:mod:`adakv_ops.sampling`; the engine's ``seed`` seeds one device generator for all
        requests)."""
        try:
            sampling = SamplingParams(temperature, top_p, top_k)
        except ValueError as e:
            raise AdmissionError(str(e)) from None
        prompt = _token_ids("prompt", prompt)
        eos = () if eos_token_id is None else _token_ids(
            "eos_token_id", [eos_token_id] if not isinstance(eos_token_id, (list, tuple, Tensor))
            else eos_token_id)
        if not prompt:
            raise AdmissionError("adakv: the prompt is empty")
        if any(not 0 <= t < self._vocab for t in prompt):
            raise AdmissionError(f"adakv: prompt ids must be in [0, {self._vocab})")
        if not is_int(max_new_tokens, 1):
            raise AdmissionError(f"adakv: max_new_tokens must be an int >= 1, got "
                                 f"{max_new_tokens!r}")
        longest = self.cache.settings.max_seq_len
        if longest is not None and len(prompt) + max_new_tokens > longest:
            raise AdmissionError(f"adakv: {len(prompt)} prompt tokens + {max_new_tokens} new "
                                 f"tokens exceed max_seq_len={longest}")
        req = Request(self._next_id, prompt, max_new_tokens, tuple(eos), sampling=sampling)
        req.pages_bound, req.raw_pages = self._page_bounds(len(prompt), max_new_tokens)
        req.first_unit = self.cache.prefill_unit_costs(len(prompt),
                                                       chunk_size=self.chunk_size)[0]
        need = max(req.pages_bound, req.raw_pages)
        if need > self.num_pages:
            raise AdmissionError(
                f"adakv: request of {len(prompt)} prompt tokens + {max_new_tokens} new tokens "
                f"needs up to {need} pages (kept rows {req.pages_bound}, raw prompt during a "
                f"chunked prefill {req.raw_pages}); the pool has "
                f"{self.num_pages}")
        self._next_id += 1
        self._requests[req.rid] = req
        self._queue.append(req)
        return req.rid

    def fork(self, rid: int, n: int = 1) -> List[int]:
        """``n`` copies of running request ``rid`` join the batch now, each with the request's
        kept rows copied into pages of its own (``AdaKVCache.fork_rows``), its tokens so far
        and its limits; returns their ids. Greedy decoding gives each copy the source's tokens;
        the use is parallel sampling from one prefill, and filling a batch from a few real
        prefills in a benchmark. Raises :class:`AdmissionError` (nothing forked) when the
        copies do not fit next to the running requests now."""
        req = self._get(rid)
        if req.state != "running":
            raise AdmissionError(f"adakv: request {rid} is {req.state}; only a running request "
                                 f"can be forked")
        if not is_int(n, 1):
            raise AdmissionError(f"adakv: n must be an int >= 1, got {n!r}")
        reserved = self._reserved()
        if self._slots_taken() + n > self.max_batch or \
                self.num_pages - reserved < n * req.pages_bound:
            raise AdmissionError(
                f"adakv: {n} copies of request {rid} do not fit now ({self._slots_taken()} of "
                f"max_batch={self.max_batch} running or prefilling, "
                f"{self.num_pages - reserved} of "
                f"{self.num_pages} pages unreserved, {req.pages_bound} needed per copy)")
        self._drain()
        if req.ends:
            raise AdmissionError(f"adakv: request {rid} has all its tokens; nothing to fork")
        row = self._running.index(req)
        self.cache.fork_rows([row] * n)
        out = []
        for _ in range(n):
            c = Request(self._next_id, req.prompt, req.max_new_tokens, req.eos_token_ids,
                        list(req.tokens), "running", req.pages_bound, req.raw_pages,
                        req.first_unit, sampling=req.sampling)
            self._next_id += 1
            self._requests[c.rid] = c
            self._running.append(c)
            out.append(c.rid)
        return out

    def cancel(self, rid: int) -> None:
        """Drop a queued, prefilling or running request (its pages go back now)."""
        req = self._get(rid)
        if req.state == "queued":
            self._queue.remove(req)
        elif req.state == "prefilling":
            self._job[1].cancel()
            self._job = None
        elif req.state == "running":
            self._retire([self._running.index(req)])
        else:
            return          # finished or already cancelled: nothing to drop
        req.state = "cancelled"

    def result(self, rid: int) -> List[int]:
        """The tokens generated so far for ``rid``."""
        return list(self._get(rid).tokens)

    def state(self, rid: int) -> str:
        return self._get(rid).state

    def has_work(self) -> bool:
        return bool(self._queue or self._running or self._job is not None
                    or self._inflight is not None)

    # -- memory accounting ---------------------------------------------------------------------

    @property
    def pages_free(self) -> int:
        """Free pages of the pool."""
        st = self.cache.pool.store
        return self.num_pages if st is None else st.pages_free

    def pages_held(self, rid: int) -> int:
        req = self._get(rid)
        if req.state == "prefilling":
            return self._job[1].pages_held()
        if req.state != "running":
            return 0
        return self.cache.pool.store.pages_held(self.cache.pool.seqs[self._running.index(req)])

    @property
    def running(self) -> List[int]:
        return [r.rid for r in self._running]

    @property
    def queued(self) -> List[int]:
        return [r.rid for r in self._queue]

    # -- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> Dict[int, int]:
        """One engine step; returns ``{request id: new token}`` for the tokens that became
        known in it.

        1. retire the requests that need no further decode step (``max_new_tokens`` reached
           counting the token in flight, eos read, cancelled): pages back to the free list;
        2. prefill: admit queued requests in arrival order while they fit and run their
           prefills' units while the step's ``max_prefill_tokens`` last (the first unit
           always; one prompt at a time, but the queue head's prompts that fit whole in the
           rest of a step go ahead of a long one in progress; a request whose last unit ran
           joins the batch and its first token is returned now);
        3. launch the decode step of every running request: inputs are the tokens of the
           step in flight, still on the device, so nothing waits for them;
        4. read the outputs of the *previous* step (the device is busy with the one just
           launched meanwhile).

        So the host's work of a step (page accounting, inputs, retire / admit, the compiled
        forward's call) overlaps the device's work of the step before, and each decode token
        is returned one call after its step is launched. A request that read its eos token
        had one more step launched; that token is dropped. ``has_work()`` stays true until the
        last step is read."""
        out: Dict[int, int] = {}
        t0 = time.perf_counter()
        self._retire([i for i, r in enumerate(self._running) if r.ends])
        t1 = time.perf_counter()
        if self._prefill(out):
            self._sync()                 # prefill_s is device time, as the decode parts are
        prefill = time.perf_counter() - t1
        self.stats["prefill_s"] += prefill
        launched, t_launch = None, 0.0
        if self._running:
            t1 = time.perf_counter()
            launched = self._launch()
            t_launch = time.perf_counter() - t1
        t_wait = 0.0
        if self._inflight is not None:
            _, rows, host = self._inflight
            t1 = time.perf_counter()
            ids = self._read(host)                          # waits for the previous step only
            t_wait = time.perf_counter() - t1
            for r, t in zip(rows, ids):
                r.pending -= 1
                if r.state != "cancelled" and not r.done:   # eos read: the extra one dropped
                    r.tokens.append(t)
                    out[r.rid] = t
        self._inflight = launched
        if launched is not None or t_wait:
            took = time.perf_counter() - t0 - prefill
            self.stats["decode_s"] += took
            self.stats["decode_launch_s"] += t_launch
            self.stats["decode_wait_s"] += t_wait
            self.stats["decode_host_s"] += took - t_launch - t_wait
        return out

    def _launch(self):
        """Queue the decode forward of the running requests; returns ``(ids, rows)``: the
        device tensor of their next tokens (not read) and the requests in batch order."""
        rows = list(self._running)
        B = len(rows)
        Bb = self._bucket(B) if self._compiled else B
        host_tok, from_prev, at = [], [], []
        prev = {} if self._inflight is None else \
            {id(r): i for i, r in enumerate(self._inflight[1])}
        for b, r in enumerate(rows):
            if r.pending:                      # its last token is an output still in flight
                from_prev.append(prev[id(r)])
                at.append(b)
                host_tok.append(0)
            else:
                host_tok.append(r.tokens[-1])
        poss = [len(r.prompt) + len(r.tokens) + r.pending - 1 for r in rows] + [0] * (Bb - B)
        # one pinned host->device copy (a pageable one would wait for the step in flight)
        n = len(at)
        packed = to_device(torch.tensor(host_tok + [0] * (Bb - B) + poss + from_prev + at),
                           self._device)
        tok, pos = packed[:Bb], packed[Bb:2 * Bb].unsqueeze(1)
        if n:
            src = self._inflight[0].index_select(0, packed[2 * Bb:2 * Bb + n])
            tok = tok.index_copy(0, packed[2 * Bb + n:], src)
        if self._compiled:
            self.cache.pool.set_bucket(Bb)
            self.cache.prepare_decode(1)
            if self._mode in ("reduce-overhead", "max-autotune"):    # CUDA graph trees
                torch.compiler.cudagraph_mark_step_begin()
        blas = (decode_blas(self.blas, Bb, self._dtype) if self._device.type == "cuda"
                else None)
        with _preferred_blas(blas):
            logits = self._forward(input_ids=tok.unsqueeze(1), position_ids=pos,
                                   **cache_kwarg(self.cache), use_cache=True).logits
        ids = self._next_tokens(logits[:B, -1], rows)   # a new tensor: the next replay keeps it
        host = self._copy_out(ids)
        for r in rows:
            r.pending += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += B
        return ids, rows, host

    def _copy_out(self, ids: Tensor):
        """Queue the copy of a step's token ids to the host right behind the step: on CUDA
        into the next of two pinned buffers (allocated once: a pinned allocation can
        synchronise), with an event recorded after it; returns what :meth:`_read` needs. Two
        buffers suffice: the buffer of step k is rewritten by step k + 2, launched after step k
        was read."""
        if ids.device.type != "cuda":
            return ids
        if not self._host_ids:               # B <= max_batch (admission and fork check it)
            self._host_ids = [torch.empty(self.max_batch, dtype=ids.dtype, pin_memory=True)
                              for _ in range(2)]
        buf = self._host_ids[self._host_turn]
        self._host_turn ^= 1
        out = buf[:ids.shape[0]]
        out.copy_(ids, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(ids.device))
        return out, ev

    @staticmethod
    def _read(host) -> List[int]:
        """The token ids of a launched step (waits for that step's copy only)."""
        if isinstance(host, Tensor):
            return host.tolist()
        buf, ev = host
        ev.synchronize()
        return buf.tolist()

    def _next_tokens(self, logits: Tensor, rows: List[Request]) -> Tensor:
        """Next token of each row (device work only): argmax when every row is greedy."""
        if all(r.sampling.greedy for r in rows):
            return logits.argmax(-1)
        sp = [r.sampling for r in rows]
        t = to_device(torch.tensor([0.0 if x.top_k == 1 else x.temperature for x in sp]),
                      self._device)
        p = to_device(torch.tensor([x.top_p for x in sp]), self._device)
        k = to_device(torch.tensor([x.top_k for x in sp]), self._device)
        return select_next(logits, t, p, k, generator=self._gen)

    def _drain(self) -> None:
        """Read the step in flight now (fork needs every token of its source)."""
        if self._inflight is None:
            return
        _, rows, host = self._inflight
        self._inflight = None
        for r, t in zip(rows, self._read(host)):
            r.pending -= 1
            if r.state != "cancelled" and not r.done:
                r.tokens.append(t)

    def run(self) -> Dict[int, List[int]]:
        """Step until every request is done; returns ``{request id: tokens}``."""
        while self.has_work():
            if not self._running and self._job is None and self._queue and \
                    not self._fits(self._queue[0]):
                raise RuntimeError("adakv: the next queued request does not fit an idle "
                                   "engine")  # cannot happen: add_request refuses it
            self.step()
        return {rid: list(r.tokens) for rid, r in self._requests.items()}

    # -- internals -----------------------------------------------------------------------------

    def _get(self, rid: int) -> Request:
        if rid not in self._requests:
            raise KeyError(f"adakv: no request {rid!r}")
        return self._requests[rid]

    def _page_bounds(self, n: int, new: int) -> tuple[int, int]:
        """(worst-case pages of the request once evicted, incl. its new tokens; raw prompt
        pages its prefill holds in the pool) over all layers. Raw pages: only a chunk-major
        prefill has them (``prefill_order``, the order ``_admit`` gets); one forward or
        layer-major holds the raw prompt outside the pool."""
        s = self.cache.settings
        P, H, L = s.page_size, self._heads, self._layers
        if s.method == "full":
            prefix = n
        else:
            top = s.policy.max_layer_budget
            prefix = min(top, n) if s.rounding == "exact" else min(top + 1, n)
        # decode rows: all of them, or with re-eviction at most max_growth per head between two
        # re-evictions (each brings a head back to its share of C + the window)
        grow = new if s.max_growth is None else min(new, s.max_growth)
        kept_prefix = H * prefix                       # every head of a layer together
        if self._shards is not None:   # this rank's heads may win up to the layer's H_all C
            kept_prefix = min(H * self._shards.world * prefix, H * n)
        rows = kept_prefix + H * (min(s.window, n) + grow)
        kept = L * (-(-rows // P) + H)                  # + one partly filled page per head
        chunked = self.cache.prefill_order(n, chunk_size=self.chunk_size) == "chunk"
        raw = L * H * -(-n // P) if chunked else 0
        return kept, raw

    def _bucket(self, B: int) -> int:
        b = 1
        while b < B:
            b *= 2
        return min(b, self.max_batch) if B <= self.max_batch else B

    def _reserved(self) -> int:
        """Pages reserved by the running requests and the one being prefilled (the larger of
        its worst case and what its prefill holds: a chunk-major prompt's raw pages)."""
        job = 0 if self._job is None else max(self._job[0].pages_bound, self._job[0].raw_pages)
        return sum(r.pages_bound for r in self._running) + job

    def _slots_taken(self) -> int:
        return len(self._running) + (self._job is not None)

    def _fits(self, req: Request) -> bool:
        """Host page arithmetic, the same on every rank (no exchange): a free slot, and next
        to every reserved worst case the larger of the request's own worst case and what its
        prefill holds in the pool (the running requests decode meanwhile, each within its
        reservation)."""
        if self._slots_taken() >= self.max_batch:
            return False
        return self.num_pages - self._reserved() >= max(req.pages_bound, req.raw_pages)

    def _prefill(self, out: Dict[int, int]) -> bool:
        """Step part 2 (see :meth:`step`); returns whether any unit ran."""
        budget = None if self.max_prefill_tokens is None else \
            self.max_prefill_tokens * self._depth          # token-layers (unit costs)
        spent = 0
        ahead = budget is not None and self._job is not None   # a prompt left by the last step
        while True:
            if self._job is None:
                if not (self._queue and self._fits(self._queue[0])):
                    break
                req = self._queue[0]
                if spent and budget is not None and spent + req.first_unit > budget:
                    break                                  # the next step starts it
                self._queue.popleft()
                self._job = (req, self._start(req))
            req, job = self._job
            if spent and budget is not None and spent + job.next_cost > budget:
                break
            spent += self._run_unit(req, job)
            if job.done:
                self._job = None
                out[req.rid] = self._join(req, job)
            elif ahead:         # once per step, after the long prompt's first unit of the step
                ahead = False
                spent += self._prefill_short(budget - spent, out)
        return spent > 0

    def _prefill_short(self, left: int, out: Dict[int, int]) -> int:
        """While a long prompt is prefilled over steps: the queued requests at the head of the
        queue whose whole prefill fits in ``left`` token-layers (and in the pool and the
        slots, next to the long one) are prefilled now, whole, and join ahead of it; returns
        the token-layers spent. Arrival order among the queued requests is kept (a long one at
        the head stops it)."""
        spent = 0
        while self._queue:
            req = self._queue[0]
            cost = len(req.prompt) * self._depth
            if spent + cost > left or not self._fits(req):
                break
            self._queue.popleft()
            job = self._start(req)
            while not job.done:
                spent += self._run_unit(req, job)
            out[req.rid] = self._join(req, job)
        return spent

    def _start(self, req: Request) -> PrefillJob:
        ids = torch.tensor([req.prompt], device=self._device)
        req.state = "prefilling"
        # "auto": the order _page_bounds counted (prefill_order)
        return PrefillJob(self.cache, ids, chunk_size=self.chunk_size, order="auto")

    def _run_unit(self, req: Request, job: PrefillJob) -> int:
        """One unit of ``req``'s prefill; a unit that raises cancels the request (its pages
        back, nothing joined) and the error propagates."""
        try:
            return job.step()
        except BaseException:
            job.cancel()
            if self._job is not None and self._job[1] is job:
                self._job = None
            req.state = "cancelled"
            raise

    def _join(self, req: Request, job: PrefillJob) -> int:
        """A finished prefill joins the batch as its last row; returns its first token."""
        job.commit()
        first = int(self._next_tokens(job.output.logits[:, -1], [req])[0])
        req.tokens.append(first)
        req.state = "running"
        self._running.append(req)
        self.stats["prefills"] += 1
        if req.ends:
            self._retire([len(self._running) - 1])
        return first

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()

    def _retire(self, rows: List[int]) -> None:
        if not rows:
            return
        self.cache.remove_rows(rows)
        drop = set(rows)
        for i in rows:
            self._running[i].state = "finished"
        self._running = [r for i, r in enumerate(self._running) if i not in drop]
