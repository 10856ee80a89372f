"""The background worker that moves rows between stores and caches, in plan order.

One worker thread serves every :class:`~lightning_bagpipe.CachedEmbedding` of a model (they share one plan).
Jobs run strictly in submission order, which is what makes the oracle's guarantees hold: a write-back of a
slot always completes before a later fetch that reuses the slot or re-reads the same id.

Rows can also be fetched several steps early (``ahead``): they wait in host memory, keyed by the step
that needs them, and the pre-step job of that step copies them into their slots. The plan marks which
rows are safe to fetch that early (no store write can change them in between; see
``docs/architecture.md``, "Prefetch depth").

On CUDA the copies run on a side stream through pinned host buffers: a fetch's host->device copy is
recorded as an event the training step waits on, and a write-back first waits for the compute stream so
it reads rows only after the step's update. On CPU the worker copies directly; the training thread only
waits for its own step's fetches.

**Emulated remote store** (``io_delay_s``, opt-in, for benchmarks on one machine): every store request
that moves rows (a fetch, a write-back) is carried out at once, in order, but its rows count as arrived
only ``io_delay_s`` after it was issued, as with a remote store reached over an ordered, pipelined
channel (a gRPC stream, NCCL collectives on one communicator): requests do not wait for each other's
replies, the store applies them in the order sent, so a fetch sent after a write sees it. A step that
needs fetched rows waits until they have arrived; :meth:`RowExecutor.drain` also waits for the last
write-back's acknowledgement.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_bagpipe.pipeline_threads import join_at_exit, pipeline_thread

if TYPE_CHECKING:
    from lightning_bagpipe.embedding.cached import CachedEmbedding
    from lightning_bagpipe.embedding.distributed import RankGroups

IdSlots = tuple[np.ndarray, np.ndarray]


class _Ticket:
    """Completion of one submitted job (set by the worker, possibly with an error)."""

    __slots__ = ("cuda_event", "done", "early_rows", "error", "ready_at", "wrote")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.wrote = False
        """Whether the job's write to the store completed (a job that writes, then reads, may fail in its
        read: its rows are in the store all the same)."""
        self.cuda_event: Any = None
        self.ready_at = 0.0
        """``time.perf_counter()`` at which the job's fetched rows have arrived (emulated latency)."""
        self.early_rows = 0
        """Rows of this step that were fetched early (copied from host memory by this job)."""


class _Staged:
    """Rows fetched early for a later step: ids, one host tensor per module, and their arrival time."""

    __slots__ = ("ids", "ready_at", "rows")

    def __init__(self, ids: np.ndarray, rows: list[torch.Tensor], ready_at: float) -> None:
        self.ids = ids
        self.rows = rows
        self.ready_at = ready_at


class RowExecutor:
    """Runs fetch (store -> cache) and write-back (cache -> store) jobs on one background thread."""

    def __init__(
        self,
        modules: Sequence[CachedEmbedding],
        groups: RankGroups | None = None,
        io_delay_s: float = 0.0,
        name: str = "bagpipe-executor",
    ) -> None:
        self.modules = list(modules)
        self.groups = groups
        self.io_delay_s = io_delay_s
        self._jobs: queue.Queue[tuple[Callable[[_Ticket], None], _Ticket] | None] = queue.Queue()
        self._staged: dict[tuple[int, int], _Staged] = {}  # worker thread only
        self._acked_at = 0.0  # when the last write-back is acknowledged (emulated latency)
        self._failed: BaseException | None = None
        self._cuda = any(m.cache_device.type == "cuda" for m in self.modules)
        self._stream: Any = torch.cuda.Stream() if self._cuda else None
        self._process_threads = torch.get_num_threads()  # read here, in the thread that starts the worker
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._last: _Ticket | None = None

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        # with several ranks the executor's collectives pair with its peers': it keeps full priority
        with pipeline_thread(self._process_threads, nice=0 if self.groups is not None else None):
            self._serve()

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, ticket = job
            if self._failed is None:
                try:
                    if self._stream is not None:
                        with torch.cuda.stream(self._stream):
                            fn(ticket)
                            ticket.cuda_event = torch.cuda.Event()
                            ticket.cuda_event.record(self._stream)
                    else:
                        fn(ticket)
                except BaseException as err:
                    self._failed = err
                    ticket.error = err
            else:
                ticket.error = self._failed
            ticket.done.set()

    def _submit(self, fn: Callable[[_Ticket], None]) -> _Ticket:
        self.raise_if_failed()
        if not self._thread.is_alive():
            raise RuntimeError("the bagpipe row executor has been closed")
        ticket = _Ticket()
        self._jobs.put((fn, ticket))
        self._last = ticket
        return ticket

    @property
    def failed(self) -> BaseException | None:
        """The error of the first job that failed (every later job is skipped), if any."""
        return self._failed

    def raise_if_failed(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"a background fetch/write-back failed: {self._failed!r}") from self._failed

    # ------------------------------------------------------------------ jobs
    def submit_prestep(
        self,
        evict: IdSlots,
        fetch: IdSlots,
        writeback: IdSlots | None = None,
        *,
        key: tuple[int, int] | None = None,
        early: np.ndarray | None = None,
        ahead: tuple[tuple[int, int], np.ndarray] | None = None,
    ) -> _Ticket:
        """Write back ``evict`` rows (and ``writeback`` rows, in the same store write), then load ``fetch``
        rows; returns the ticket to wait on.

        ``key`` names the step the fetch is for: rows fetched early for it (``early`` masks them in
        ``fetch``) are copied from host memory instead of read again. ``ahead`` = ``(key, ids)`` then
        fetches rows of a later step into host memory, after this job's write.
        """
        evict_ids, evict_slots = evict
        if writeback is not None and writeback[0].size:
            evict_ids = np.concatenate([writeback[0], evict_ids])
            evict_slots = np.concatenate([writeback[1], evict_slots])
        fetch_ids, fetch_slots = fetch
        compute_event = self._compute_event() if evict_ids.size else None

        def job(ticket: _Ticket) -> None:
            if evict_ids.size or self.groups is not None:
                self._write_back(evict_ids, evict_slots, compute_event)
            ticket.wrote = True
            if self.groups is not None:
                # every rank's earlier write-backs are in the store before any rank fetches
                self.groups.barrier()
            direct_ids, direct_slots = fetch_ids, fetch_slots
            staged = self._take_staged(key)
            if staged is not None:
                if early is None or not np.array_equal(staged.ids, fetch_ids[early]):
                    raise RuntimeError(
                        f"rows fetched early for step {key} are not the ones its plan marks as early"
                    )
                for m, rows in zip(self.modules, staged.rows):
                    m._put_rows(fetch_slots[early], rows)
                ticket.ready_at = staged.ready_at
                ticket.early_rows = int(staged.ids.size)
                direct_ids, direct_slots = fetch_ids[~early], fetch_slots[~early]
            if direct_ids.size or self.groups is not None:
                ticket.ready_at = max(ticket.ready_at, self._request(direct_ids))
                for m in self.modules:
                    m._load_rows(direct_ids, direct_slots)
            if ahead is not None:
                ahead_key, ahead_ids = ahead
                arrival = self._request(ahead_ids)
                read = [m._read_rows(ahead_ids) for m in self.modules]
                self._staged[ahead_key] = _Staged(ahead_ids, read, arrival)

        return self._submit(job)

    def forget_staged(self) -> None:
        """Drop every row fetched early, after the jobs queued so far (their steps will not run: a new plan
        stream begins)."""
        self._submit(lambda ticket: self._staged.clear())

    def _take_staged(self, key: tuple[int, int] | None) -> _Staged | None:
        """The rows fetched early for step ``key`` (if any); forgets them and any for earlier steps."""
        if key is None or not self._staged:
            return None
        staged = self._staged.pop(key, None)
        for old in [k for k in self._staged if k < key]:
            del self._staged[old]
        return staged

    def submit_writeback(self, rows: IdSlots) -> _Ticket | None:
        """Write back rows after the step that last used them (they stay cached as clean copies)."""
        ids, slots = rows
        if not ids.size and self.groups is None:
            return None
        compute_event = self._compute_event()

        def job(ticket: _Ticket) -> None:
            self._write_back(ids, slots, compute_event)
            ticket.wrote = True

        return self._submit(job)

    def submit_deferred(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after every job queued so far and before every job queued later (nothing waits on
        it; a failure surfaces at the next wait, like a failed fetch)."""
        self._submit(lambda ticket: fn())

    def _write_back(self, ids: np.ndarray, slots: np.ndarray, compute_event: Any) -> None:
        if compute_event is not None:
            torch.cuda.current_stream().wait_event(compute_event)
        self._acked_at = max(self._acked_at, self._request(ids))
        for m in self.modules:
            m._store_rows(ids, slots)

    def _request(self, ids: np.ndarray) -> float:
        """A store request for ``ids`` is issued now: when its reply arrives (``0.0`` unless an emulated
        latency is set and rows move). The request itself is carried out at once, in issue order."""
        if self.io_delay_s and ids.size:
            return time.perf_counter() + self.io_delay_s
        return 0.0

    def _compute_event(self) -> Any:
        if not self._cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream())
        return ev

    # ------------------------------------------------------------------ waiting
    def wait(self, ticket: _Ticket | None) -> float:
        """Block until ``ticket`` is done; returns the seconds spent waiting."""
        if ticket is None:
            return 0.0
        t0 = time.perf_counter()
        while not ticket.done.wait(timeout=1.0):
            if not self._thread.is_alive():
                raise RuntimeError("the bagpipe row executor stopped while a step waited for its rows")
        if ticket.error is None:
            _sleep_until(ticket.ready_at)
        waited = time.perf_counter() - t0
        if ticket.error is not None:
            raise RuntimeError(f"a background fetch/write-back failed: {ticket.error!r}") from ticket.error
        if ticket.cuda_event is not None:
            torch.cuda.current_stream().wait_event(ticket.cuda_event)
        return waited

    def drain(self) -> None:
        """Wait for every submitted job (and, with an emulated latency, for the last write's
        acknowledgement)."""
        if self._last is not None:
            self.wait(self._last)
            _sleep_until(self._acked_at)
            if self._cuda:
                torch.cuda.synchronize()

    def close(self, wait: bool = True) -> None:
        """Finish queued jobs and stop the thread (idempotent).

        ``wait=False`` (after a failure on several ranks) does not join: the thread may be blocked in a
        collective with a rank that is gone. It is a daemon; the interpreter's exit gives it a few seconds
        to end (:func:`~lightning_bagpipe.pipeline_threads.join_at_exit`).
        """
        if self._thread.is_alive():
            self._jobs.put(None)
            if wait:
                self._thread.join()
                self._staged.clear()
            else:
                join_at_exit(self._thread)


def _sleep_until(deadline: float) -> None:
    left = deadline - time.perf_counter()
    if left > 0:
        time.sleep(left)
