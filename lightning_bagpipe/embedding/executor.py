"""The background worker that moves rows between stores and caches, in plan order.

One worker thread serves every :class:`~lightning_bagpipe.CachedEmbedding` of a model (they share one plan).
Jobs run strictly in submission order, which is what makes the oracle's guarantees hold: a write-back of a
slot always completes before a later fetch that reuses the slot or re-reads the same id.

On CUDA the copies run on a side stream through pinned host buffers: a fetch's host->device copy is
recorded as an event the training step waits on, and a write-back first waits for the compute stream so
it reads rows only after the step's update. On CPU the worker copies directly; the training thread only
waits for its own step's fetches.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_bagpipe.pipeline_threads import pipeline_thread

if TYPE_CHECKING:
    from lightning_bagpipe.embedding.cached import CachedEmbedding
    from lightning_bagpipe.embedding.distributed import RankGroups

IdSlots = tuple[np.ndarray, np.ndarray]


class _Ticket:
    """Completion of one submitted job (set by the worker, possibly with an error)."""

    __slots__ = ("cuda_event", "done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.cuda_event: Any = None


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
        self._jobs: queue.Queue[tuple[Callable[[], None], _Ticket] | None] = queue.Queue()
        self._failed: BaseException | None = None
        self._cuda = any(m.cache_device.type == "cuda" for m in self.modules)
        self._stream: Any = torch.cuda.Stream() if self._cuda else None
        self._process_threads = torch.get_num_threads()  # read here, in the thread that starts the worker
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._last: _Ticket | None = None

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        with pipeline_thread(self._process_threads):
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
                            fn()
                            ticket.cuda_event = torch.cuda.Event()
                            ticket.cuda_event.record(self._stream)
                    else:
                        fn()
                except BaseException as err:
                    self._failed = err
                    ticket.error = err
            else:
                ticket.error = self._failed
            ticket.done.set()

    def _submit(self, fn: Callable[[], None]) -> _Ticket:
        self.raise_if_failed()
        if not self._thread.is_alive():
            raise RuntimeError("the bagpipe row executor has been closed")
        ticket = _Ticket()
        self._jobs.put((fn, ticket))
        self._last = ticket
        return ticket

    def raise_if_failed(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"a background fetch/write-back failed: {self._failed!r}") from self._failed

    # ------------------------------------------------------------------ jobs
    def submit_prestep(self, evict: IdSlots, fetch: IdSlots, writeback: IdSlots | None = None) -> _Ticket:
        """Write back ``evict`` rows (and ``writeback`` rows, in the same store write), then load ``fetch``
        rows; returns the ticket to wait on."""
        evict_ids, evict_slots = evict
        if writeback is not None and writeback[0].size:
            evict_ids = np.concatenate([writeback[0], evict_ids])
            evict_slots = np.concatenate([writeback[1], evict_slots])
        fetch_ids, fetch_slots = fetch
        compute_event = self._compute_event() if evict_ids.size else None

        def job() -> None:
            if evict_ids.size or self.groups is not None:
                self._write_back(evict_ids, evict_slots, compute_event)
            if self.groups is not None:
                # every rank's earlier write-backs are in the store before any rank fetches
                self.groups.barrier()
            if fetch_ids.size or self.groups is not None:
                self._delay(fetch_ids)
                for m in self.modules:
                    m._load_rows(fetch_ids, fetch_slots)

        return self._submit(job)

    def submit_writeback(self, rows: IdSlots) -> _Ticket | None:
        """Write back rows after the step that last used them (they stay cached as clean copies)."""
        ids, slots = rows
        if not ids.size and self.groups is None:
            return None
        compute_event = self._compute_event()
        return self._submit(lambda: self._write_back(ids, slots, compute_event))

    def submit_deferred(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` after every job queued so far and before every job queued later (nothing waits on
        it; a failure surfaces at the next wait, like a failed fetch)."""
        self._submit(fn)

    def _write_back(self, ids: np.ndarray, slots: np.ndarray, compute_event: Any) -> None:
        if compute_event is not None:
            torch.cuda.current_stream().wait_event(compute_event)
        self._delay(ids)
        for m in self.modules:
            m._store_rows(ids, slots)

    def _delay(self, ids: np.ndarray) -> None:
        """Opt-in emulated network latency per batch of rows moved (benchmarks on one machine)."""
        if self.io_delay_s and ids.size:
            time.sleep(self.io_delay_s)

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
        waited = time.perf_counter() - t0
        if ticket.error is not None:
            raise RuntimeError(f"a background fetch/write-back failed: {ticket.error!r}") from ticket.error
        if ticket.cuda_event is not None:
            torch.cuda.current_stream().wait_event(ticket.cuda_event)
        return waited

    def drain(self) -> None:
        """Wait for every submitted job."""
        if self._last is not None:
            self.wait(self._last)
            if self._cuda:
                torch.cuda.synchronize()

    def close(self, wait: bool = True) -> None:
        """Finish queued jobs and stop the thread (idempotent).

        ``wait=False`` (after a failure on several ranks) does not join: the thread may be blocked in a
        collective with a rank that is gone; it is a daemon and ends with the process.
        """
        if self._thread.is_alive():
            self._jobs.put(None)
            if wait:
                self._thread.join()
