"""CacheDriver: carries out each step's plan on every CachedEmbedding, in the order the oracle assumes.

Per training step ``t`` (called by the strategy):

``before_step(plan_t)``
    queue the write-back of step ``t-1``'s last-use rows, make sure step ``t``'s evictions and fetches
    are queued (they normally were, during step ``t-1``), wait for them, then queue step ``t+1``'s
    evictions and fetches so they overlap step ``t``.
``after_update(step)``
    apply the sparse optimizer to the rows step ``t`` touched (right after the dense optimizer step).

The driver also keeps, per slot, which row it holds and whether the cache copy is newer than the store
(dirty), so :meth:`sync_store` can flush every dirty row before validation, checkpoints and the end of fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_bagpipe.data.batch import StepPlan
from lightning_bagpipe.embedding.cached import CachedEmbedding
from lightning_bagpipe.embedding.distributed import RankGroups
from lightning_bagpipe.embedding.executor import IdSlots, RowExecutor, _Ticket


@dataclass
class StepStats:
    """Cache figures of the last step (logged by the strategy)."""

    unique_rows: int = 0
    hits: int = 0
    rows_fetched: int = 0
    rows_written_back: int = 0
    rows_evicted: int = 0
    wait_ms: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.unique_rows if self.unique_rows else 1.0


@dataclass
class TotalStats:
    """Cache figures accumulated over a fit."""

    steps: int = 0
    unique_rows: int = 0
    hits: int = 0
    rows_fetched: int = 0
    rows_written_back: int = 0
    rows_evicted: int = 0
    wait_s: float = 0.0
    sync_rows: int = 0
    sync_bytes: int = 0
    replicated_baseline_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.unique_rows if self.unique_rows else 1.0

    def as_dict(self) -> dict[str, float]:
        return {
            "steps": self.steps,
            "hit_rate": self.hit_rate,
            "rows_fetched": self.rows_fetched,
            "rows_written_back": self.rows_written_back,
            "rows_evicted": self.rows_evicted,
            "fetch_wait_ms_total": 1000.0 * self.wait_s,
            "sync_bytes": self.sync_bytes,
            "replicated_baseline_bytes": self.replicated_baseline_bytes,
        }


class CacheDriver:
    """Drives the caches of ``modules`` (they share one plan stream) through one executor."""

    def __init__(
        self,
        modules: Sequence[CachedEmbedding],
        groups: RankGroups | None = None,
        *,
        prefetch: bool = True,
        io_delay_s: float = 0.0,
    ) -> None:
        if not modules:
            raise ValueError("no CachedEmbedding modules to drive")
        fps = {m.tables.fingerprint() for m in modules}
        if len(fps) > 1:
            raise ValueError(
                "all CachedEmbedding modules of a model must serve the same tables (they share one plan); "
                f"found {len(fps)} different table configurations"
            )
        self.modules = list(modules)
        self.groups = groups
        self.prefetch = prefetch
        self.io_delay_s = io_delay_s
        self.fingerprint = fps.pop()
        self._updated = False
        self._pos: Tensor | None = None
        self.executor: RowExecutor | None = None
        self.rows = 0
        self.slot_ids = np.zeros(0, dtype=np.int64)
        self.dirty = np.zeros(0, dtype=bool)
        self._queued_key: tuple[int, int] | None = None
        self._queued_ticket: _Ticket | None = None
        self._current: StepPlan | None = None
        self._writeback: IdSlots | None = None
        self.last = StepStats()
        self.total = TotalStats()

    # ------------------------------------------------------------------ per step
    def before_step(self, plan: StepPlan) -> None:
        if plan.tables_fingerprint and plan.tables_fingerprint != self.fingerprint:
            raise ValueError(
                "the batches were planned for other tables than the model's CachedEmbedding "
                f"(fingerprints {plan.tables_fingerprint} vs {self.fingerprint}); give the DataModule and "
                "the CachedEmbedding the same tables"
            )
        self._end_step()
        if self.executor is None:
            self._start(plan.capacity)
        assert self.executor is not None
        self._submit_writeback()
        if plan.key == self._queued_key:
            ticket = self._queued_ticket
        else:
            ticket = self._submit_prestep(plan.evict, plan.fetch)
        waited = self.executor.wait(ticket)
        self._queued_key, self._queued_ticket = None, None
        if (
            self.prefetch
            and plan.next_key is not None
            and plan.next_fetch is not None
            and plan.next_evict is not None
        ):
            self._queued_ticket = self._submit_prestep(plan.next_evict, plan.next_fetch)
            self._queued_key = plan.next_key
        self._current = plan
        self._updated = False
        self.last = StepStats(
            unique_rows=plan.unique_ids,
            hits=plan.hits,
            rows_fetched=int(plan.fetch[0].size),
            rows_written_back=int(plan.evict[0].size + plan.writeback[0].size),
            rows_evicted=int(plan.evict[0].size),
            wait_ms=1000.0 * waited,
        )
        t = self.total
        t.steps += 1
        t.unique_rows += plan.unique_ids
        t.hits += plan.hits
        t.rows_fetched += self.last.rows_fetched
        t.rows_written_back += self.last.rows_written_back
        t.rows_evicted += self.last.rows_evicted
        t.wait_s += waited

    def after_update(self, step: int) -> None:
        """Apply the sparse optimizer to the rows this step touched (once per step)."""
        plan = self._current
        if plan is None or self._updated:
            return
        self._updated = True
        if self.groups is None:
            for m in self.modules:
                taken = m._take_grads()
                if taken is not None:
                    m._update_rows(*taken, step)
            self.dirty[plan.slots] = True
            return
        self._sync_update(plan, step)

    def _sync_update(self, plan: StepPlan, step: int) -> None:
        """LRPP: all-reduce replicated rows' gradients in one collective, average them like DDP, update.

        Every rank updates every replicated row (its copy stays identical to the others'); local rows are
        updated by their one owner with its own gradient, averaged over the world size the same way.
        """
        assert self.groups is not None
        world = self.groups.world_size
        device = self.modules[0].cache_device
        sync_ids, sync_slots_np = plan.sync
        sync_slots = torch.from_numpy(sync_slots_np).to(device)
        if self._pos is None or self._pos.numel() != self.rows or self._pos.device != device:
            self._pos = torch.full((self.rows,), -1, dtype=torch.long, device=device)
        pos = self._pos  # slot -> position in the all-reduce buffer; reset after use, so O(rows touched)
        pos[sync_slots] = torch.arange(sync_slots.numel(), device=device)
        bufs: list[Tensor] = []
        owns: list[tuple[Tensor, Tensor]] = []
        for m in self.modules:
            buf = torch.zeros(sync_slots.numel(), m.dim, device=device)
            own = (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, m.dim, device=device))
            taken = m._take_grads()
            if taken is not None:
                slots, grad = taken
                p = pos[slots]
                shared = p >= 0
                buf[p[shared]] = grad[shared]
                own = (slots[~shared], grad[~shared])
            bufs.append(buf)
            owns.append(own)
        pos[sync_slots] = -1
        flat = torch.cat([b.flatten() for b in bufs])
        if flat.numel():
            dist.all_reduce(flat, group=self.groups.grads)
        flat /= world
        self.total.sync_rows += int(sync_slots.numel())
        self.total.sync_bytes += flat.numel() * flat.element_size()
        self.total.replicated_baseline_bytes += plan.unique_ids * sum(m.dim for m in self.modules) * 4
        offset = 0
        for m, (own_slots, own_grad) in zip(self.modules, owns):
            n = sync_slots.numel() * m.dim
            synced = flat[offset : offset + n].view(-1, m.dim)
            offset += n
            m._update_rows(torch.cat([sync_slots, own_slots]), torch.cat([synced, own_grad / world]), step)
        # dirty flags track the rows this rank must write back: replicated rows it is the writer of and its
        # own local rows; a row another rank updated alone is that rank's to write now
        mine = sync_ids % world == self.groups.rank
        self.dirty[plan.foreign[1]] = False
        self.dirty[sync_slots_np[mine]] = True
        self.dirty[plan.own[1]] = True

    # ------------------------------------------------------------------ store consistency
    def sync_store(self, durable: bool = False) -> None:
        """Write every row whose cache copy is newer than the store; afterwards the store is current."""
        if self.executor is None:
            return
        self._end_step()
        self._submit_writeback()
        self.executor.drain()
        slots = np.flatnonzero(self.dirty)
        if slots.size or self.groups is not None:  # (sharded stores write collectively)
            ids = self.slot_ids[slots]
            for m in self.modules:
                m._store_rows(ids, slots)
        if self.groups is not None:
            self.groups.barrier()  # every rank's rows are in the store before anyone reads it
        if durable:
            for m in self.modules:
                m.store.flush()

    def close(self, flush: bool = True) -> None:
        """Stop the executor; with ``flush``, first bring the store up to date.

        Without ``flush`` on several ranks nothing waits for the other ranks (they may be gone).
        """
        if self.executor is None:
            return
        try:
            if flush:
                self.sync_store(durable=True)
        finally:
            self.executor.close(wait=flush or self.groups is None)
            self.executor = None
            for m in self.modules:
                m._deactivate()

    # ------------------------------------------------------------------ internals
    def _start(self, capacity: int) -> None:
        self.rows = capacity if capacity > 0 else 1024
        for m in self.modules:
            m._activate(self.rows)
        self.slot_ids = np.full(self.rows, -1, dtype=np.int64)
        self.dirty = np.zeros(self.rows, dtype=bool)
        self.executor = RowExecutor(self.modules, self.groups, self.io_delay_s)

    def _end_step(self) -> None:
        """Close the current step: its end-of-use rows become due for write-back."""
        if self._current is None:
            return
        for m in self.modules:
            m._pending.clear()  # gradients no optimizer step consumed (e.g. manual optimization without step)
        self._writeback = self._current.writeback
        self._current = None

    def _submit_writeback(self) -> None:
        if self._writeback is None:
            return
        assert self.executor is not None
        ids, slots = self._writeback
        self._writeback = None
        self.executor.submit_writeback((ids, slots))
        self.dirty[slots] = False

    def _submit_prestep(self, evict: IdSlots, fetch: IdSlots) -> _Ticket:
        assert self.executor is not None
        need = int(max(fetch[1].max(initial=-1), evict[1].max(initial=-1))) + 1
        if need > self.rows:
            self._grow(need)
        self.dirty[evict[1]] = False
        self.dirty[fetch[1]] = False
        self.slot_ids[fetch[1]] = fetch[0]
        return self.executor.submit_prestep(evict, fetch)

    def _grow(self, need: int) -> None:
        """Unbounded caches grow by doubling (after draining queued copies into the old buffer)."""
        assert self.executor is not None
        self.executor.drain()
        rows = max(need, 2 * self.rows)
        for m in self.modules:
            m._ensure_cache(rows)
        self.slot_ids = np.concatenate([self.slot_ids, np.full(rows - self.rows, -1, dtype=np.int64)])
        self.dirty = np.concatenate([self.dirty, np.zeros(rows - self.rows, dtype=bool)])
        self.rows = rows
