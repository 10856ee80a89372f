"""CacheDriver: carries out each step's plan on every CachedEmbedding, in the order the oracle assumes.

Per training step ``t`` (called by the strategy):

``before_step(plan_t)``
    queue the write-back of step ``t-1``'s last-use rows, make sure step ``t``'s evictions and fetches
    are queued (they normally were, during step ``t-1``), wait for them, then queue step ``t+1``'s
    evictions and fetches so they overlap step ``t`` (and, with a prefetch depth ``D > 1``, the early
    fetch of step ``t+D``'s rows into host memory).
``after_update(step)``
    apply the sparse optimizer to the rows step ``t`` touched (right after the dense optimizer step).

With gradient accumulation the batches of a step share its plan: ``before_step`` of the second and later
batches changes nothing, and the rows' gradients of every batch add up until ``after_update``.

The driver also keeps, per slot, which row it holds and whether the cache copy is newer than the store
(dirty), so :meth:`sync_store` can flush every dirty row before validation, checkpoints and the end of fit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_bagpipe.data.batch import StepPlan
from lightning_bagpipe.embedding.cached import CachedEmbedding
from lightning_bagpipe.embedding.distributed import RankGroups
from lightning_bagpipe.embedding.executor import IdSlots, RowExecutor, _Ticket
from lightning_bagpipe.id_sets import member_of


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
    sync_bytes: float = 0.0
    """Bytes each rank sent for the replicated rows' gradients (see :func:`allreduce_bytes`,
    :func:`exchange_bytes`)."""
    replicated_baseline_bytes: float = 0.0
    """What full replication would send: every row any rank touched, all-reduced every step."""
    allreduce_steps: int = 0
    """Steps whose replicated rows' gradients were all-reduced (steps without replicated rows count
    in neither)."""
    exchange_steps: int = 0
    """Steps that used the exchange (each rank sends only the replicated rows it used)."""
    deferred_rows: int = 0
    """Replicated rows whose sync finished one step late (the next step did not read them)."""
    early_rows: int = 0
    """Rows fetched ``prefetch_depth`` steps before their step (the rest of :attr:`rows_fetched` were
    fetched one step before, or at the step's start without prefetch)."""

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
            "allreduce_steps": self.allreduce_steps,
            "exchange_steps": self.exchange_steps,
            "deferred_rows": self.deferred_rows,
            "early_rows": self.early_rows,
        }


def allreduce_bytes(numel: int, element_size: int, world: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``numel`` elements: ``2 (W - 1) / W * numel * size``."""
    return 2 * (world - 1) / world * numel * element_size


def exchange_bytes(block_numel: int, element_size: int, world: int) -> float:
    """Bytes each rank sends in an all-gather of blocks padded to ``block_numel``.

    ``(W - 1) * block_numel * size``: every rank's block reaches the ``W - 1`` others.
    """
    return float((world - 1) * block_numel * element_size)


def sum_blocks(
    gathered: Sequence[Tensor], blocks: Sequence[Tensor], dims: Sequence[int], rows: int
) -> Tensor:
    """Sum every rank's block of gradients into one flat buffer, in rank order (identical bits everywhere).

    ``gathered[r]`` is rank ``r``'s (padded) block: for each module in turn, the ``len(blocks[r]) x dim``
    gradients of the rows at positions ``blocks[r]``, flattened. Returns the modules' ``rows x dim``
    buffers, flattened and concatenated (the all-reduce's layout); rows no rank sent stay zero.
    """
    device = gathered[0].device if gathered else torch.device("cpu")
    out = [torch.zeros(rows, d, device=device) for d in dims]
    for block, part in zip(blocks, gathered):  # rank 0, 1, ..., W - 1: the same order on every rank
        offset = 0
        for buf, d in zip(out, dims):
            n = block.numel() * d
            buf.index_add_(0, block, part[offset : offset + n].view(-1, d))
            offset += n
    return torch.cat([b.flatten() for b in out])


@dataclass
class _WriteJob:
    """A queued job that writes ``rows`` to the store (its ``ticket`` is set once it is queued)."""

    rows: list[IdSlots]
    ticket: _Ticket | None = None

    @property
    def wrote(self) -> bool:
        """Whether the job's write completed (whatever happened after it in the job)."""
        return self.ticket is not None and self.ticket.wrote

    @property
    def written(self) -> bool:
        """Whether the job ended without error (nothing of it is left to recover)."""
        return self.ticket is not None and self.ticket.done.is_set() and self.ticket.error is None


class CacheDriver:
    """Drives the caches of ``modules`` (they share one plan stream) through one executor."""

    def __init__(
        self,
        modules: Sequence[CachedEmbedding],
        groups: RankGroups | None = None,
        *,
        prefetch: bool = True,
        io_delay_s: float = 0.0,
        defer_sync: bool = True,
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
        self.defer_sync = defer_sync
        self.fingerprint = fps.pop()
        self._updated = False
        self._pos: Tensor | None = None
        self.executor: RowExecutor | None = None
        self.rows = 0
        self.slot_ids = np.zeros(0, dtype=np.int64)
        self.dirty = np.zeros(0, dtype=bool)
        self._queued_key: tuple[int, int] | None = None
        self._stream = -1  # plan stream (epoch) of the last step
        self._queued_ticket: _Ticket | None = None
        self._current: StepPlan | None = None
        self._writeback: IdSlots | None = None
        self._writes: deque[_WriteJob] = deque()  # write jobs not known to have written their rows
        self._recovered = False  # the store was brought up to date after the executor failed
        self._store_current = True  # no sparse update since the store last matched the cache
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
        if self._current is not None and plan.key == self._current.key:
            if self._updated:  # (the strategy checks the accumulation first: this is a safety net)
                raise RuntimeError(
                    f"step {plan.key} of the cache plan received a batch after its optimizer step: the "
                    "loader's gradient accumulation groups and Lightning's optimizer steps disagree"
                )
            return  # a later batch of the same step (gradient accumulation): its rows are in place
        cur = self._current
        if (
            cur is not None
            and cur.accumulate > 1
            and plan.key[0] == cur.key[0]
            and not self._updated
            and any(m._pending for m in self.modules)
        ):
            raise RuntimeError(
                f"step {cur.key} of the cache plan ended without an optimizer step: the loader's gradient "
                "accumulation groups and Lightning's optimizer steps disagree (its gradients would be lost)"
            )
        self._check_gradients_applied()
        self._end_step()
        if self.executor is None:
            self._start(plan.capacity)
        elif plan.key[0] != self._stream:
            self._new_stream()
        self._stream = plan.key[0]
        assert self.executor is not None
        # Step t-1's last-use rows ride along with the next prestep's evictions: one store write (one
        # collective on a sharded store, one round trip to a remote one) per step instead of two. Every
        # later fetch still runs after them (same executor, writes before the barrier and the fetch).
        if plan.key == self._queued_key:
            ticket = self._queued_ticket
        else:
            self._reserve(plan.evict, plan.fetch)
            writeback = self._take_writeback()
            ticket = self._prestep(plan.evict, plan.fetch, writeback, key=plan.key, early=plan.early)
        waited = self.executor.wait(ticket)
        # (taken only now: if the wait fails, the rows are still the pending write-back, which a recovery
        # writes; None if the prestep above took them)
        writeback = self._take_writeback()
        early_rows = ticket.early_rows if ticket is not None else 0
        self._queued_key, self._queued_ticket = None, None
        if (
            self.prefetch
            and plan.next_key is not None
            and plan.next_fetch is not None
            and plan.next_evict is not None
        ):
            self._reserve(plan.next_evict, plan.next_fetch)
            self._queued_ticket = self._prestep(
                plan.next_evict,
                plan.next_fetch,
                writeback,
                key=plan.next_key,
                early=plan.next_early,
                ahead=plan.ahead,
            )
            self._queued_key = plan.next_key
            writeback = None
        if writeback is not None:
            self._write_job(writeback)
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
        t.early_rows += early_rows

    def after_update(self, step: int, grad_scale: float = 1.0) -> None:
        """Apply the sparse optimizer to the rows this step touched (once per step); their gradients are
        divided by ``grad_scale`` first (the loss scale of a ``"16-mixed"`` run)."""
        plan = self._current
        if plan is None or self._updated:
            return
        self._updated = True
        self._store_current = False
        if self.groups is None:
            for m in self.modules:
                taken = m._take_grads(grad_scale)
                if taken is not None:
                    m._update_rows(*taken, step)
            self.dirty[plan.slots] = True
            return
        self._sync_update(plan, step, grad_scale)

    def _sync_update(self, plan: StepPlan, step: int, grad_scale: float) -> None:
        """LRPP: sum replicated rows' gradients across ranks, average them like DDP, update.

        The collective is the plan's choice (the same on every rank): an all-reduce of the replicated
        rows, or, with ``plan.sync_blocks``, an exchange in which each rank sends only the replicated rows
        it used and every rank adds the blocks in rank order. Every rank updates every replicated row (its
        copy stays identical to the others'); local rows are updated by their one owner with its own
        gradient, averaged over the world size the same way.

        **One step late.** Replicated rows that the next step does not read are summed by a second,
        asynchronous collective and updated by the executor, after the jobs already queued and before the
        next step's pre-step job (its write-backs, evictions and fetches), so their communication overlaps
        the next step's compute. Nothing reads or writes them in between: the next step does not use them,
        and every store transfer that could touch them is queued after the update.
        """
        assert self.groups is not None
        world = self.groups.world_size
        device = self.modules[0].cache_device
        sync_ids, sync_slots_np = plan.sync
        sync_slots = torch.from_numpy(sync_slots_np).to(device)
        if self._pos is None or self._pos.numel() != self.rows or self._pos.device != device:
            self._pos = torch.full((self.rows,), -1, dtype=torch.long, device=device)
        pos = self._pos  # slot -> position in the sync buffer; reset after use, so O(rows touched)
        pos[sync_slots] = torch.arange(sync_slots.numel(), device=device)
        bufs: list[Tensor] = []
        owns: list[tuple[Tensor, Tensor]] = []
        sent: list[Tensor] = []
        for m in self.modules:
            buf = torch.zeros(sync_slots.numel(), m.dim, device=device)
            own = (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, m.dim, device=device))
            taken = m._take_grads(grad_scale)
            if taken is not None:
                slots, grad = taken
                p = pos[slots]
                shared = p >= 0
                buf[p[shared]] = grad[shared]
                own = (slots[~shared], grad[~shared])
                sent.append(p[shared])
            bufs.append(buf)
            owns.append(own)
        pos[sync_slots] = -1
        dims = [m.dim for m in self.modules]
        if plan.sync_blocks is not None:
            self._check_block(sent, plan.sync_blocks, sync_slots.numel(), device)
        if sync_slots.numel():
            if plan.sync_blocks is None:
                self.total.allreduce_steps += 1
            else:
                self.total.exchange_steps += 1
        late = self._late_rows(plan, sync_ids)
        synced = self._launch(bufs, ~late, plan.sync_blocks, dims, device)()
        now_slots = sync_slots[torch.from_numpy(~late).to(device)] if late.any() else sync_slots
        offset = 0
        for m, (own_slots, own_grad) in zip(self.modules, owns):
            n = now_slots.numel() * m.dim
            grad_now = synced[offset : offset + n].view(-1, m.dim)
            offset += n
            m._update_rows(torch.cat([now_slots, own_slots]), torch.cat([grad_now, own_grad / world]), step)
        if late.any():
            assert self.executor is not None
            finish = self._launch(bufs, late, plan.sync_blocks, dims, device)
            late_slots = sync_slots[torch.from_numpy(late).to(device)]
            modules = list(self.modules)

            def deferred() -> None:
                grads = finish()
                at = 0
                for m in modules:
                    k = late_slots.numel() * m.dim
                    m._update_rows(late_slots, grads[at : at + k].view(-1, m.dim), step)
                    at += k

            self.executor.submit_deferred(deferred)
            self.total.deferred_rows += int(np.count_nonzero(late))
        self.total.sync_rows += int(sync_slots.numel())
        self.total.replicated_baseline_bytes += allreduce_bytes(plan.unique_ids * sum(dims), 4, world)
        # dirty flags track the rows this rank must write back: replicated rows it is the writer of and its
        # own local rows; a row another rank updated alone is that rank's to write now
        mine = sync_ids % world == self.groups.rank
        self.dirty[plan.foreign[1]] = False
        self.dirty[sync_slots_np[mine]] = True
        self.dirty[plan.own[1]] = True

    def _late_rows(self, plan: StepPlan, sync_ids: np.ndarray) -> np.ndarray:
        """Which replicated rows may finish their sync one step late: those the next step does not read."""
        if not self.defer_sync or plan.next_ids is None:
            return np.zeros(sync_ids.size, dtype=bool)
        return ~member_of(sync_ids, plan.next_ids)  # (a plan's ids are ascending)

    def _launch(
        self,
        bufs: list[Tensor],
        mask: np.ndarray,
        sync_blocks: tuple[np.ndarray, ...] | None,
        dims: list[int],
        device: torch.device,
    ) -> Callable[[], Tensor]:
        """Start summing the gradients of the sync rows in ``mask`` across ranks; returns the function that
        waits for the sum and returns it averaged over the world (modules' rows flattened, concatenated)."""
        assert self.groups is not None
        world = self.groups.world_size
        rows = int(np.count_nonzero(mask))
        if rows == mask.size:  # every row (nothing deferred): no subset copy
            part = bufs
        else:
            keep = torch.from_numpy(np.flatnonzero(mask)).to(device)
            part = [b.index_select(0, keep) for b in bufs]
        flat = torch.cat([b.flatten() for b in part])
        if not flat.numel():
            return lambda: flat
        if sync_blocks is None:
            work = dist.all_reduce(flat, group=self.groups.grads, async_op=True)
            self.total.sync_bytes += allreduce_bytes(flat.numel(), flat.element_size(), world)

            def summed() -> Tensor:
                work.wait()
                return flat / world

            return summed
        # the exchange over this subset of rows: each rank's block, renumbered within the subset
        position = np.cumsum(mask, dtype=np.int64) - 1
        blocks = [torch.from_numpy(position[b[mask[b]]]).to(device) for b in sync_blocks]
        rank = self.groups.rank
        block_numel = max(int(b.numel()) for b in blocks) * sum(dims)
        send = torch.zeros(block_numel, device=device)
        mine = torch.cat([b[blocks[rank]].flatten() for b in part])
        send[: mine.numel()] = mine
        gathered = [torch.empty_like(send) for _ in range(world)]
        work = dist.all_gather(gathered, send, group=self.groups.grads, async_op=True)
        self.total.sync_bytes += exchange_bytes(block_numel, send.element_size(), world)

        def gathered_sum() -> Tensor:
            work.wait()
            return sum_blocks(gathered, blocks, dims, rows) / world

        return gathered_sum

    def _check_block(
        self, sent: list[Tensor], sync_blocks: tuple[np.ndarray, ...], rows: int, device: torch.device
    ) -> None:
        """``sent`` (the sync positions this rank holds gradients for) must lie in its own exchange block
        (the plan says which rows each rank used), else a gradient would be lost."""
        assert self.groups is not None
        rank = self.groups.rank
        in_block = torch.zeros(rows, dtype=torch.bool, device=device)
        in_block[torch.from_numpy(sync_blocks[rank]).to(device)] = True
        if sent and not bool(in_block[torch.cat(sent)].all()):
            raise RuntimeError(
                f"rank {rank} has gradients for replicated rows outside its exchange block: the loader's "
                "slice of the batch and the plan's occurrence ranks disagree"
            )

    # ------------------------------------------------------------------ store consistency
    def sync_store(self, durable: bool = False) -> None:
        """Write every row whose cache copy is newer than the store; afterwards the store is current.

        The current step stays open: a checkpoint saved from inside a step (a hook between backward and
        the optimizer step, or on an exception) holds the rows before its update, and the step still
        applies its update afterwards.
        """
        if self.executor is None or self._recovered:
            return
        try:
            self._submit_writeback()
            self.executor.drain()
        except Exception:
            if self.executor.failed is not None and self.groups is None:
                self._write_back_after_failure()  # (the store is current again; the error still stands)
            raise
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
        self._store_current = True

    def pending_grads(self) -> list[Tensor]:
        """The gradients this step's lookups have received so far."""
        return [r.grad for m in self.modules for _, r in m._pending if r.grad is not None]

    def skip_update(self) -> None:
        """End the step's update without applying it (the loss scaler skipped the step): its gradients
        are dropped, its rows unchanged."""
        if self._current is None or self._updated:
            return
        self._updated = True
        self._drop_pending()

    @property
    def step_open(self) -> bool:
        """Whether a training step has begun and not yet applied its sparse update."""
        return self._current is not None and not self._updated

    def make_store_current(self) -> None:
        """Bring the store up to date for a lookup of rows no plan put in the cache (a callback, a loader
        without plans): nothing to do if no sparse update ran since the store last matched the cache."""
        if self._store_current or self.executor is None:
            return
        if self.groups is not None:  # writing the store is collective: one rank alone would hang
            raise RuntimeError(
                "CachedEmbedding read its store during fit on several processes after a training step "
                "(features without a cache plan, export() or state_dict()): the store is behind the cache, "
                "and bringing it up to date takes every rank. Read such rows in validation (the data "
                "module's val_source), from the batch's own features in training_step, after fit, or "
                "through a checkpoint."
            )
        self.sync_store()

    def _check_gradients_applied(self) -> None:
        """Refuse to drop embedding gradients that no optimizer step applied (the step is ending)."""
        if self._current is None:
            return
        if self.pending_grads():
            when = "after the step's optimizer step" if self._updated else "and no optimizer step followed"
            self._drop_pending()  # (said once: a teardown that flushes the cache does not repeat it)
            raise RuntimeError(
                f"step {self._current.key} of the cache plan: embedding gradients were computed {when}, so "
                "they would be lost. The cached rows are updated once per training step, at its first "
                "optimizer step: with manual optimization, run every backward through a CachedEmbedding "
                "before the step's first optimizer.step(), and step in every batch (for gradient "
                "accumulation use Trainer(accumulate_grad_batches=k))."
            )

    def discard_cache(self) -> None:
        """Forget what the cache holds without writing it to the store: a checkpoint is about to replace
        the store's rows in the middle of a fit (Lightning's learning-rate finder restores the model it
        started from), and the cache's newer rows would otherwise be written over them. The next plan
        starts a new stream (an empty cache)."""
        if self.executor is None:
            return
        self.executor.drain()  # (writes already queued land before the rows are replaced)
        self._drop_pending()
        self._current, self._writeback = None, None
        self._queued_key, self._queued_ticket = None, None
        self.executor.forget_staged()
        self.slot_ids.fill(-1)
        self.dirty.fill(False)
        self._stream = -1
        self._store_current = True

    @property
    def recovered(self) -> bool:
        """Whether the row executor failed and the store was brought up to date without it (one process):
        the store then matches the last completed step, and the cache takes no more steps."""
        return self._recovered

    def close(self, flush: bool = True, check: bool = True) -> None:
        """Stop the executor; with ``flush``, first bring the store up to date.

        Without ``flush`` on several ranks nothing waits for the other ranks (they may be gone). With
        ``check`` (a fit that did not fail), gradients its last step never applied are an error.
        """
        if self.executor is None:
            return
        lost: RuntimeError | None = None
        if flush and check:  # (the store is still brought up to date and the executor stopped; then raised)
            try:
                self._check_gradients_applied()
            except RuntimeError as e:
                lost = e
        self._end_step()  # (a step that did not reach its update writes nothing)
        try:
            if flush:
                try:
                    self.sync_store(durable=True)
                except Exception:
                    if not self._recovered:  # (recovered: the store is current despite the failure)
                        raise
        finally:
            self.executor.close(wait=flush or self.groups is None)
            self.executor = None
            for m in self.modules:
                m._deactivate()
        if lost is not None:
            raise lost

    # ------------------------------------------------------------------ internals
    def _new_stream(self) -> None:
        """Start a new epoch's plan stream, which the oracle made for an empty cache.

        An epoch that ran to its end left every row written back. One that Lightning cut short
        (``limit_train_batches``) stopped before steps its plans counted on: rows they would have written
        back later are still dirty, and a pre-step for the first step that never ran may have fetched
        rows. So the store is brought up to date and the cache forgets what it holds.
        """
        assert self.executor is not None
        self.sync_store()
        self._queued_key, self._queued_ticket = None, None  # (carried out by sync_store's drain)
        self.executor.forget_staged()  # rows read early for steps that never ran
        self.slot_ids.fill(-1)
        self.dirty.fill(False)

    def _start(self, capacity: int) -> None:
        self.rows = capacity if capacity > 0 else 1024
        for m in self.modules:
            m._activate(self.rows, self)
        self.slot_ids = np.full(self.rows, -1, dtype=np.int64)
        self.dirty = np.zeros(self.rows, dtype=bool)
        self.executor = RowExecutor(self.modules, self.groups, self.io_delay_s)

    def _end_step(self) -> None:
        """Close the current step: its end-of-use rows become due for write-back."""
        if self._current is None:
            return
        self._drop_pending()  # gradients no optimizer step consumed (e.g. manual optimization without step)
        self._writeback = self._current.writeback
        self._current = None

    def _drop_pending(self) -> None:
        """Forget the lookups of the step (and any gradients they received)."""
        for m in self.modules:
            m._pending.clear()

    def _take_writeback(self) -> IdSlots | None:
        """The last step's last-use rows, now due for write-back (their slots count as clean from here)."""
        rows, self._writeback = self._writeback, None
        if rows is not None:
            self.dirty[rows[1]] = False
        return rows

    def _submit_writeback(self) -> None:
        rows = self._take_writeback()
        if rows is not None:
            self._write_job(rows)

    # Every job that writes rows to the store is tracked until it is known to have written them: the rows'
    # slots count as clean from the moment it is queued, so after a failure of the executor these are
    # the rows whose newest values are only in the cache (see _write_back_after_failure).
    def _prestep(self, evict: IdSlots, fetch: IdSlots, writeback: IdSlots | None, **kw: Any) -> _Ticket:
        assert self.executor is not None
        job = self._track([r for r in (writeback, evict) if r is not None])
        job.ticket = self.executor.submit_prestep(evict, fetch, writeback, **kw)
        return job.ticket

    def _write_job(self, rows: IdSlots) -> None:
        assert self.executor is not None
        job = self._track([rows])  # (first: if queueing fails, the rows are still known)
        job.ticket = self.executor.submit_writeback(rows)
        if job.ticket is None:  # nothing to write (no rows, one process): nothing to track
            self._writes.pop()

    def _track(self, rows: list[IdSlots]) -> _WriteJob:
        """Record a write job about to be queued; forget the earlier ones done without error."""
        while self._writes and self._writes[0].written:
            self._writes.popleft()
        job = _WriteJob(rows)
        self._writes.append(job)
        return job

    def _write_back_after_failure(self) -> None:
        """Bring the store up to date from this thread after the row executor failed (one process).

        The executor skips every job after the one that failed, so the store lacks: the rows of write
        jobs that did not write (their slots still hold them: a job's fetch follows its write, and no
        later job ran), the last step's end-of-use rows, and the dirty rows. Their cache copies are the
        updates of every completed step; written here, the store matches the last completed step again.
        """
        assert self.executor is not None and self.groups is None
        self.executor.close(wait=True)  # (the queued jobs are skipped; afterwards nothing runs)
        rows = [r for job in self._writes if not job.wrote for r in job.rows]
        self._writes.clear()
        pending = self._take_writeback()
        if pending is not None:
            rows.append(pending)
        slots = np.flatnonzero(self.dirty)
        rows.append((self.slot_ids[slots], slots))
        self.dirty.fill(False)
        for ids, where in rows:  # (in the order the rows were written: a later copy is the newer one)
            if ids.size:
                for m in self.modules:
                    m._store_rows(ids, where)
        for m in self.modules:
            m.store.flush()
        self._recovered = True

    def _reserve(self, evict: IdSlots, fetch: IdSlots) -> None:
        """Book a pre-step job's slots before it is queued: grow an unbounded cache to hold them, and
        record which row each fetched slot will hold (evicted and fetched slots are clean)."""
        need = int(max(fetch[1].max(initial=-1), evict[1].max(initial=-1))) + 1
        if need > self.rows:
            self._grow(need)
        self.dirty[evict[1]] = False
        self.dirty[fetch[1]] = False
        self.slot_ids[fetch[1]] = fetch[0]

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
