"""A prompt prefilled a unit at a time while the cache decodes: :class:`PrefillJob`.

A serving engine that prefills a long prompt in one go stalls every running sequence for the
whole prefill (about 11 s for a 128K prompt of an 8B model on one H100). A job runs the same
prefill (:meth:`AdaKVCache.prefill`: the same order, chunks, kept sets and logits) one unit at
a time, into a *side cache*: a cache of the same model and settings whose sequences live in
the cache's own page store. The cache's rows, layer state and compiled decode are not touched
until :meth:`PrefillJob.commit`, so the cache can decode between any two units; the commit makes
the prompt's sequence the cache's last batch row (its pages stay where the prefill wrote them)
and leaves every layer as a prefill of added rows would.

Units and their costs (token-layers: tokens x decoder layers they pass) are
:meth:`AdaKVCache.prefill_unit_costs`: one per forward of a chunk (chunk-major; one for a
prompt prefilled in one forward) or one per chunk of each layer (layer-major). Paged storage
and models without sliding-window layers only (as for adding rows to a filled cache).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .cache import check_prompt

__all__ = ["PrefillJob"]


class PrefillJob:
    """Prefill ``input_ids [B, N]`` for ``cache`` one unit at a time (see the module).

    ``step()`` runs the next unit and returns its cost; once ``done``, ``commit()`` joins the
    prompt's rows to the cache's batch and returns them (``output``: the model output of the
    prefill, logits of the last position). ``cancel()`` gives the pages back at any point.

    Between units the cache may decode, add rows (``prefill``), remove or fork rows and
    ``restore()`` a snapshot: none of these touches the job's sequences, and the commit joins
    them after whatever rows the cache then holds. A ``reset()`` of the cache drops its page
    store; a job whose sequences are already in that store can no longer join (``commit()``
    raises and says so; ``cancel()`` frees its pages), one that has not written a page yet
    opens the cache's next store.
    """

    def __init__(self, cache, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                 chunk_size: Optional[int] = None, order: str = "auto", **kwargs):
        self.cache = cache
        self._side = cache._side_cache()       # (holds nothing until a unit runs)
        check_prompt(self._side._model(), input_ids, attention_mask)
        #: the units' costs in token-layers, in the order ``step`` runs them
        self.costs = self._side.prefill_unit_costs(input_ids.shape[1], attention_mask,
                                                   chunk_size, order, **kwargs)
        self._units = self._side._prefill_units(input_ids, attention_mask, chunk_size, order,
                                                kwargs)
        self._next = 0
        self.output = None
        self.state = "prefilling"   # -> "done" -> "committed"; or "cancelled"

    @property
    def done(self) -> bool:
        return self.state == "done"

    @property
    def next_cost(self) -> int:
        """The cost of the unit ``step`` runs next (0 once every unit ran)."""
        return self.costs[self._next] if self._next < len(self.costs) else 0

    @property
    def remaining_cost(self) -> int:
        return sum(self.costs[self._next:])

    def step(self) -> int:
        """Run the next unit (device work queued on the current stream; no host read but
        what the prefill itself does); returns its cost. A unit that raises leaves the job
        unusable: ``cancel()`` it."""
        if self.state != "prefilling":
            raise RuntimeError(f"adakv: step() on a prefill job that is {self.state}")
        try:
            with torch.no_grad():
                cost = next(self._units)
                self._next += 1
                if self._next == len(self.costs):
                    try:
                        next(self._units)            # the prefill's end: its output
                    except StopIteration as end:
                        self.output = end.value
                    else:
                        raise RuntimeError("adakv: the prefill ran more units than planned")
                    self.state = "done"
        except StopIteration:
            raise RuntimeError("adakv: the prefill ran fewer units than planned") from None
        except BaseException:
            self.state = "failed"
            raise
        if cost != self.costs[self._next - 1]:
            raise RuntimeError(f"adakv: prefill unit {self._next - 1} cost {cost}, planned "
                               f"{self.costs[self._next - 1]}")
        return cost

    def run(self) -> None:
        """Run every unit left."""
        while self.state == "prefilling":
            self.step()

    def commit(self) -> list[int]:
        """The prompt's rows join the cache's batch as its last rows; returns them."""
        if self.state != "done":
            raise RuntimeError(f"adakv: commit() on a prefill job that is {self.state} (run "
                               f"every unit first)")
        rows = self.cache._adopt(self._side)
        self.state = "committed"
        self._side = None
        return rows

    def pages_held(self) -> int:
        """Pages the job's sequences hold in the store now (0 once committed or cancelled)."""
        pool = None if self._side is None else self._side.pool
        if pool is None or pool.store is None:
            return 0
        return sum(pool.store.pages_held(q) for q in pool.seqs)

    def cancel(self) -> None:
        """Stop the prefill (its state is undone) and give its pages back; a committed job
        is the cache's: nothing to cancel."""
        if self.state in ("committed", "cancelled"):
            return
        self._units.close()
        if self._side is not None:
            self._side.pool.drop()
        self._side = None
        self.state = "cancelled"
