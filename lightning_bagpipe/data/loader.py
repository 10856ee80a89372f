"""Loaders that turn a source of global batches into this rank's batches.

:class:`BagpipeLoader` (training) runs the lookahead oracle in a background thread: it reads global
batches, validates them, feeds their fused ids to the oracle, and once a batch's plan is known (``L``
steps later) slices batch and plan for this rank and queues the result. The queue is bounded, so the
thread never runs more than ``lookahead + queue_batches`` steps ahead of training.

With gradient accumulation (``Trainer(accumulate_grad_batches=k)``) a *step* is one optimizer step: the
``k`` consecutive batches Lightning accumulates (``[g k, (g + 1) k)`` of the epoch, the last group of an
epoch possibly shorter) are planned as one oracle step, so the cache holds the rows of all of them from
the first forward pass to the update. Every batch of the group carries the same :class:`StepPlan` and its
own lookup into the group's slots.

:class:`EvalLoader` (validation, test, predict) only validates and slices: evaluation reads the store
directly and needs no plan.

Neither is a ``torch.utils.data.DataLoader``, so Lightning passes them through untouched and never
re-wraps them with a ``DistributedSampler``: the global stream order is the oracle's to keep.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import types
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from lightning_bagpipe.arguments import integer
from lightning_bagpipe.data.batch import Batch, CacheLookup, SparseFeatures, StepPlan
from lightning_bagpipe.id_sets import member_of, unique_below, unique_inverse_below
from lightning_bagpipe.oracle.lookahead import LookaheadOracle
from lightning_bagpipe.oracle.partition import SYNC_MODES, RankPartitioner, RankView, occurrence_ranks
from lightning_bagpipe.oracle.plan import CachePlan
from lightning_bagpipe.pipeline_threads import pipeline_thread
from lightning_bagpipe.tables import Tables

SourceFn = Callable[[], Iterable[Batch]]
_EMPTY = np.zeros(0, dtype=np.int64)
#: One-shot iterators (generator objects) a pass over a source has read, so that one returned again, used
#: up, is refused (:meth:`_LoaderBase._open_source`); weak, so that a source's old generators can go.
_READ_ONE_SHOT: weakref.WeakSet[Any] = weakref.WeakSet()
_READ_LOCK = threading.Lock()


def _not_empty(it: Iterator[Batch], refusal: Exception) -> Iterator[Batch]:
    """The items of ``it``; ``refusal`` is raised if there are none."""
    empty = True
    for item in it:
        empty = False
        yield item
    if empty:
        raise refusal


def rank_bounds(batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Samples ``[start, stop)`` of a global batch trained by ``rank``."""
    return rank * batch_size // world_size, (rank + 1) * batch_size // world_size


def occurrence_mask(batch: Batch, start: int, stop: int) -> np.ndarray:
    """Boolean mask over the key-major id occurrences of samples ``[start, stop)``."""
    sp = batch.sparse
    b = sp.batch_size
    in_range = np.zeros(b, dtype=bool)
    in_range[start:stop] = True
    per_bag = np.tile(in_range, sp.num_features)
    return np.repeat(per_bag, sp.lengths.numpy())


def check_batch(batch: Batch, tables: Tables, where: str) -> np.ndarray:
    """Validate a global batch against ``tables``; return its fused ids (key-major).

    ``where`` (``"train batch 7"``) starts every message. The sparse features are checked first: the
    number of samples, which dense features and labels must match, is theirs.
    """
    if not isinstance(batch, Batch):
        raise TypeError(
            f"{where}: a source must yield lightning_bagpipe.Batch objects, got {type(batch).__name__}"
        )
    if not isinstance(batch.sparse, SparseFeatures):
        raise TypeError(
            f"{where}: sparse must be lightning_bagpipe.SparseFeatures, got {_type_name(batch.sparse)}"
        )
    try:
        ids = batch.sparse.fused_ids(tables)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    except TypeError as err:
        raise TypeError(f"{where}: {err}") from None
    b = batch.batch_size
    if b == 0:
        raise ValueError(
            f"{where} has 0 samples: every batch needs at least one (a mean loss over none is NaN). Leave "
            "empty batches out of the source"
        )
    for name, t in (("dense", batch.dense), ("labels", batch.labels)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{where}: {name} must be a torch.Tensor, got {_type_name(t)}: convert it in the source "
                "with torch.from_numpy(...) or torch.as_tensor(..., dtype=torch.float32)"
            )
        if name == "dense" and not t.dtype.is_floating_point:  # (labels may be classes: cross_entropy)
            raise ValueError(
                f"{where}: {name} must be floating point (float32), got dtype {t.dtype}: convert it in the "
                f"source with {name}.float()"
            )
        want = 2 if name == "dense" else None
        if (want is not None and t.dim() != want) or t.dim() == 0:
            shape = "[batch, features]" if name == "dense" else "[batch]"
            raise ValueError(f"{where}: {name} must be {shape}, got shape {tuple(t.shape)}")
        if t.shape[0] != b:
            raise ValueError(
                f"{where}: {name} has {t.shape[0]} rows but the sparse features have {b} samples"
            )
    return ids


def _type_name(x: object) -> str:
    """``numpy.ndarray`` for an array: the module tells what it is, and what converts it."""
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"


class _LoaderBase:
    """Shared bookkeeping: the source, the rank slice and the per-epoch resume position."""

    def __init__(self, source_fn: SourceFn, tables: Tables, rank: int, world_size: int, name: str) -> None:
        self._source_fn = source_fn
        self.tables = tables
        self.rank = rank
        self.world_size = world_size
        self.name = name
        self._length: int | None = None
        self._read_one_shot: object = None  # the last one-shot iterator a pass read that no weak set holds

    def _open_source(self) -> Iterator[Batch]:
        """A new pass over the source: an iterator over what ``source_fn()`` returns.

        A one-shot iterator (``iter(src) is src``: a generator object, ``iter(list)``, a file) can be read
        only once: returned again, it yields nothing more (or only what the earlier pass left), and the
        pass would silently train or evaluate on that. A generator object an earlier pass read is
        refused; another such iterator (it may be a class whose ``__iter__`` restarts it and returns
        itself) is refused when its new pass yields nothing.
        """
        src = self._source_fn()
        try:
            it = iter(src)
        except TypeError:
            raise TypeError(
                f"the {self.name} source must be an iterable of lightning_bagpipe.Batch objects, got "
                f"{_type_name(src)}"
            ) from None
        if it is not src:  # (a list, or an object whose __iter__ starts a new pass: read again each time)
            return it
        with _READ_LOCK:
            again = it in _READ_ONE_SHOT or it is self._read_one_shot
            if not again:
                try:
                    _READ_ONE_SHOT.add(it)
                except TypeError:  # (not weakly referenceable, e.g. iter(list): this loader remembers it)
                    self._read_one_shot = it
        if not again:
            return it
        refusal = ValueError(
            f"the {self.name} source returned the same one-shot iterator ({_type_name(it)}) that an "
            "earlier pass has read: it yields nothing more (or only what that pass left), so this pass "
            f"would silently {'train' if self.name == 'train' else 'evaluate'} on that. Make "
            f"{self.name}_source() (or the source function given to the loader) return a new generator "
            "on each call (call the generator function there, or make it a generator function itself), "
            "or return a re-iterable such as a list"
        )
        if isinstance(it, types.GeneratorType):  # (it cannot restart)
            raise refusal
        return _not_empty(it, refusal)

    def bind(self, rank: int, world_size: int) -> None:
        """Read ``rank``'s slice of every batch of ``world_size``: the strategy calls this before a pass.

        A loader built before the Trainer knew the ranks (one given to ``fit``, ``validate``, ``test`` or
        ``predict`` directly: rank 0 of 1 by default) takes them here; otherwise every rank would train
        whole global batches with plans made for one rank. A loader built for other ranks is an error.
        """
        if (self.rank, self.world_size) == (rank, world_size):
            return
        if (self.rank, self.world_size) != (0, 1):
            raise ValueError(
                f"this {self.name} loader was built for rank {self.rank} of {self.world_size}, but the "
                f"Trainer runs it as rank {rank} of {world_size}: build it with rank={rank}, "
                f"world_size={world_size}, or pass a BagpipeDataModule (datamodule=...), which knows them"
            )
        self._check_idle()
        self.rank, self.world_size = rank, world_size

    def _check_idle(self) -> None:
        """Raise if a pass is under way (its slices are being cut for the current ranks)."""

    def __len__(self) -> int:
        if self._length is None:
            src = self._source_fn()
            try:
                self._length = len(src)  # type: ignore[arg-type]
            except TypeError:
                raise TypeError(f"the {self.name} source has no length") from None
        return self._length

    def _local(self, batch: Batch, index: int) -> tuple[Batch, tuple[int, int]]:
        """This rank's samples of ``batch`` (the source's batch ``index``) in a new :class:`Batch` (sharing
        its tensors): the loader attaches lookups and plans to it, never to the source's own objects, which
        an in-memory source keeps."""
        if self.world_size == 1:
            shell = Batch(replace(batch.sparse, lookup=None), batch.dense, batch.labels)
            return shell, (0, batch.batch_size)
        b = batch.batch_size
        if b < self.world_size:  # (check_batch refused empty batches first, at any world size)
            problem = (
                f"{self.name} batch {index} has {b} sample(s) and cannot be split over {self.world_size} "
                "ranks: every rank needs at least one sample of every batch."
            )
            if self.name == "train":
                raise ValueError(
                    f"{problem} Drop the last, partial batch (drop_last=True on CriteoParquet/CriteoTSV, or "
                    "in your own source) or choose a batch size that leaves it at least "
                    f"{self.world_size} samples"
                )
            # Evaluation keeps every sample: dropping the batch would leave its samples out of the metrics,
            # and CriteoDataModule's evaluation sources take no drop_last.
            raise ValueError(
                f"{problem} Evaluation keeps every sample: choose a batch size that leaves the last, partial "
                f"batch at least {self.world_size} samples (or none), or use at most {b} process(es)"
            )
        start, stop = rank_bounds(b, self.rank, self.world_size)
        return batch.slice_samples(start, stop), (start, stop)


class EvalLoader(_LoaderBase):
    """Validation/test/predict batches for this rank (validated, sliced, no plan)."""

    def __iter__(self) -> Iterator[Batch]:
        for i, batch in enumerate(self._open_source()):
            check_batch(batch, self.tables, f"{self.name} batch {i}")
            yield self._local(batch, i)[0]


class BagpipeLoader(_LoaderBase):
    """Training batches for this rank, each carrying its cache plan; the oracle runs in a thread.

    ``state_dict`` holds the epoch's position: the number of batches training has finished, read from
    :attr:`progress` (Lightning's count, set by the data module and the strategy). Batches handed out
    count only when nothing tells that: Lightning asks for the next batch before a step ends when the
    source has no length, and a checkpoint saved during a step (on an exception, or from a hook inside
    the step) must resume at that step's batch, not after it.
    """

    def __init__(
        self,
        source_fn: SourceFn,
        tables: Tables,
        *,
        lookahead: int,
        cache_rows: int | None,
        rank: int = 0,
        world_size: int = 1,
        queue_batches: int = 4,
        sync: str = "partitioned",
        prefetch_depth: int = 1,
    ) -> None:
        super().__init__(source_fn, tables, rank, world_size, "train")
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        self.sync = sync
        self.lookahead = integer("lookahead", lookahead, minimum=1)
        self.prefetch_depth = min(integer("prefetch_depth", prefetch_depth, minimum=1), self.lookahead)
        """How many steps ahead rows are fetched (at most ``L``: see :func:`early_mask`)."""
        self.cache_rows = cache_rows
        self.queue_batches = integer("queue_batches", queue_batches, minimum=1)
        self.epoch = 0
        self.yielded = 0
        self.progress: Callable[[], int | None] | None = None
        """How many of the epoch's batches training has finished, or None when unknown (outside a fit)."""
        self.accumulation: Callable[[], int] | None = None
        """How many consecutive batches share one optimizer step in the epoch about to start (Lightning's
        ``accumulate_grad_batches``; set by the data module and the strategy), read when an epoch's
        first batch is asked for; None: 1."""
        self.epoch_length: Callable[[], float] | None = None
        """How many batches Lightning trains in an epoch (``limit_train_batches`` applied; inf: unknown)."""
        self._resume_from = 0
        self._counted = 0  # Lightning's count of batches before the resumed epoch's first (state_dict)
        self._epoch_counted = 0  # the same, for the epoch under way
        self._finished = False  # the current epoch's last batch was handed out
        self._threads: weakref.WeakSet[_OracleThread] = weakref.WeakSet()

    # -------------------------------------------------------------- state (exact resume)
    def state_dict(self) -> dict[str, int]:
        done = self.progress() if self.progress is not None else None
        if done is not None:  # (an epoch Lightning counts on from the last one's count: see below)
            done -= self._epoch_counted
        position = done if done is not None and 0 <= done <= self.yielded else self.yielded
        limit = self.epoch_length() if self.epoch_length is not None else float("inf")
        limit -= self._epoch_counted
        if position >= limit:  # Lightning's epoch is over (limit_train_batches may end it early)
            return {"epoch": self.epoch + 1, "batches_yielded": 0}
        if self._finished and position == self.yielded:  # every batch of the epoch trained
            # (a source without a length cannot tell a resumed loader that its epoch is over). Lightning
            # does not know the epoch ended either: resumed, it goes on counting the next epoch's batches
            # from ``position``, and groups them for gradient accumulation by that count
            counted = {} if done is None else {"counted": position + self._epoch_counted}  # (None: no fit)
            return {"epoch": self.epoch + 1, "batches_yielded": 0, **counted}
        return {"epoch": self.epoch, "batches_yielded": position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._resume_from = int(state["batches_yielded"])
        self._counted = int(state.get("counted", 0))

    # -------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Batch]:
        # Creating the iterator starts the epoch (and uses up a pending resume position), as Lightning
        # expects; the oracle thread itself only starts when the first batch is asked for, so Lightning's
        # probing ``iter()`` costs nothing.
        self.close()
        skip, self._resume_from = self._resume_from, 0
        counted, self._counted = self._counted, 0
        if skip and skip >= self._known_length():
            skip = 0  # resumed after the last batch of an epoch: the next epoch starts from scratch
            self.epoch += 1
        elif skip == 0 and self.yielded:
            self.epoch += 1
        self.yielded = skip
        self._finished = False
        self._epoch_counted = counted
        return self._run_epoch(self.epoch, skip, counted)

    def _run_epoch(self, epoch: int, skip: int, counted: int) -> Iterator[Batch]:
        # (a generator: this runs when the epoch's first batch is asked for. By then Lightning has set the
        # accumulation it will use: a GradientAccumulationScheduler sets it when the epoch starts, and an
        # epoch resumed mid-way keeps the value Lightning really accumulates)
        accumulate = integer(
            "accumulate_grad_batches", 1 if self.accumulation is None else self.accumulation(), minimum=1
        )
        thread = _OracleThread(self, epoch, skip, accumulate, counted)
        self._threads.add(thread)
        thread.start()
        try:
            while True:
                item = thread.get()
                if item is None:
                    self._finished = True
                    return
                self.yielded += 1
                yield item
        finally:
            thread.stop()

    def _check_idle(self) -> None:
        if any(t.is_alive() and not t.stopping for t in self._threads):
            raise RuntimeError("a BagpipeLoader cannot change ranks while an epoch is being planned")

    def _known_length(self) -> float:
        try:
            return super().__len__()
        except TypeError:
            return float("inf")

    def close(self) -> None:
        """Stop every background thread of this loader (idempotent)."""
        for t in list(self._threads):
            t.stop()


#: Numbers every oracle run (an epoch's plan stream) of the process, increasing: the first part of each
#: plan's key, so that the driver tells a new stream from the last (its plans assume an empty cache)
#: even when a reloaded loader counts its epochs from 0 again.
_STREAMS = itertools.count()


class _OracleThread(threading.Thread):
    """Reads the source, runs the oracle and queues rank-local batches with their plans."""

    _DONE = object()

    def __init__(
        self, loader: BagpipeLoader, epoch: int, skip: int, accumulate: int = 1, counted: int = 0
    ) -> None:
        super().__init__(name=f"bagpipe-oracle-e{epoch}", daemon=True)
        self.loader = loader
        self.epoch = epoch
        self.stream = next(_STREAMS)
        self.skip = skip
        self.accumulate = accumulate
        self.counted = counted  # Lightning counts batch i of this epoch as its (counted + i + 1)th
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=loader.queue_batches)
        self._stop_event = threading.Event()
        self.error: BaseException | None = None
        self._process_threads = torch.get_num_threads()  # read here, in the thread that starts this one

    # ---------------------------------------------------------- consumer side
    def get(self) -> Batch | None:
        while True:
            try:
                item = self.queue.get(timeout=0.05)
            except queue.Empty:
                if not self.is_alive() and self.queue.empty():
                    if self.error is not None:
                        raise self.error from None
                    raise RuntimeError(
                        "the bagpipe loader thread ended without finishing the epoch"
                    ) from None
                continue
            if item is self._DONE:
                if self.error is not None:
                    raise self.error
                return None
            return item

    #: Seconds :meth:`stop` waits for the thread to end. The thread checks for the stop between batches,
    #: so one blocked inside the user's source (a stalled read) ends only when the source returns; the
    #: caller (a failing or interrupted fit) must not wait for that: the daemon thread ends by itself.
    STOP_WAIT_S = 1.0

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (the thread may still be finishing a batch of the source)."""
        return self._stop_event.is_set()

    def stop(self) -> None:
        self._stop_event.set()
        deadline = time.monotonic() + self.STOP_WAIT_S
        while self.is_alive() and time.monotonic() < deadline:
            try:
                while True:
                    self.queue.get_nowait()
            except queue.Empty:
                pass
            self.join(timeout=0.05)

    # ---------------------------------------------------------- producer side
    def _put(self, item: Any) -> bool:
        while not self._stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            with pipeline_thread(self._process_threads):
                self._produce()
        except BaseException as err:  # surfaced in the training loop by get()
            self.error = err
        finally:
            self._put(self._DONE)

    def _produce(self) -> None:
        ld = self.loader
        oracle = LookaheadOracle(ld.tables.total_rows, ld.lookahead, ld.cache_rows)
        parts = (
            RankPartitioner(ld.tables.total_rows, ld.rank, ld.world_size, replicate=ld.sync == "replicated")
            if ld.world_size > 1
            else None
        )
        pending: deque[list[_Member]] = deque()  # steps (groups of batches) waiting for their plan
        depth = ld.prefetch_depth
        ready: deque[_Planned] = deque()  # planned, waiting for the plans of the next ``depth`` steps
        evicted: deque[np.ndarray] = deque(maxlen=max(0, depth - 2))  # global evictions of recent steps
        step = self.skip
        world = ld.world_size

        def planned(plan: CachePlan) -> _Planned:
            group = pending.popleft()
            if parts is None:
                view = RankView(
                    fetch=(plan.fetch_ids, plan.fetch_slots),
                    evict=(plan.evict_ids, plan.evict_slots),
                    writeback=(plan.writeback_ids, plan.writeback_slots),
                    sync=(_EMPTY, _EMPTY),
                    own=(plan.ids, plan.slots),
                    foreign=(_EMPTY, _EMPTY),
                )
            else:
                ranks = [
                    occurrence_ranks(m.batch.sparse.lengths.numpy(), m.batch.sparse.num_features, world)
                    for m in group
                ]
                view = parts.view(plan, ranks[0] if len(ranks) == 1 else np.concatenate(ranks))
            early = early_mask(view.fetch[0], evicted) if depth > 1 else None
            evicted.append(plan.evict_ids)
            return _Planned(group, plan, view, early)

        def emit_ready(final: bool) -> bool:
            nonlocal step
            while len(ready) > (0 if final else depth):
                cur = ready.popleft()
                nxt = ready[0] if ready else None
                ahead = ready[depth - 1] if depth > 1 and len(ready) >= depth else None
                if not self._emit(cur, nxt, ahead, step):
                    return False
                step += 1
            return True

        k, counted = self.accumulate, self.counted
        group: list[tuple[_Member, np.ndarray]] = []  # the batches of the step being read

        def push_group() -> bool:
            ids = group[0][1] if len(group) == 1 else np.concatenate([g[1] for g in group])
            pending.append([m for m, _ in group])
            group.clear()
            with _accumulation_explained(k):
                plan = oracle.push(ids)
            if plan is not None:
                ready.append(planned(plan))
            return emit_ready(final=False)

        for i, batch in enumerate(ld._open_source()):
            if self._stop_event.is_set():
                return
            if i < self.skip:
                continue
            ids = check_batch(batch, ld.tables, f"train batch {i}")
            group.append((_Member(i, batch, ids.size), ids))
            # Lightning steps after batch i when (counted + i + 1) % k == 0, and after an epoch's last batch
            if (counted + i + 1) % k == 0 and not push_group():
                return
        if group and not push_group():
            return
        with _accumulation_explained(k):
            plans = oracle.finish()
        for plan in plans:
            ready.append(replace(planned(plan), at_end=True))
        emit_ready(final=True)

    def _emit(self, cur: _Planned, nxt: _Planned | None, ahead: _Planned | None, step: int) -> bool:
        """Queue the batches of ``cur`` as this rank's batches of ``step``; ``nxt`` is the next step's,
        ``ahead`` the one ``prefetch_depth`` steps on (its early rows are fetched while ``cur`` trains)."""
        plan, view = cur.plan, cur.view
        ld = self.loader
        world = ld.world_size
        shells = [ld._local(m.batch, m.index) for m in cur.group]
        if len(cur.group) == 1 and world == 1:
            ids, slots = plan.ids, plan.slots
            lookups = [(slots, plan.inverse)]
        elif len(cur.group) == 1:
            (start, stop), batch = shells[0][1], cur.group[0].batch
            mask = occurrence_mask(batch, start, stop)
            uniq, inverse = unique_inverse_below(plan.inverse[mask], plan.ids.size)
            ids, slots = plan.ids[uniq], plan.slots[uniq]
            lookups = [(slots, inverse)]
        else:  # each batch's occurrences are a run of the step's; its lookup reads some of the step's rows
            runs = []
            at = 0
            for m, (_, (start, stop)) in zip(cur.group, shells):
                run = plan.inverse[at : at + m.occurrences]
                at += m.occurrences
                runs.append(run if world == 1 else run[occurrence_mask(m.batch, start, stop)])
            lookups = []
            for run in runs:
                uniq, inverse = unique_inverse_below(run, plan.ids.size)
                lookups.append((plan.slots[uniq], inverse))
            if world == 1:  # (every row of the step is some batch's)
                ids, slots = plan.ids, plan.slots
            else:
                used = unique_below(np.concatenate(runs), plan.ids.size)
                ids, slots = plan.ids[used], plan.slots[used]
        capacity = ld.cache_rows if ld.cache_rows is not None else -1
        # whether this step's instructions come from plans made knowing where the stream ends: ranks whose
        # streams end at different steps differ here first, before their instructions do
        end_seen = any(p is None or p.at_end for p in (cur, nxt)) or (ahead is not None and ahead.at_end)
        step_plan = StepPlan(
            key=(self.stream, step),
            capacity=capacity,
            fetch=view.fetch,
            evict=view.evict,
            writeback=view.writeback,
            ids=ids,
            slots=slots,
            sync=view.sync,
            own=view.own,
            foreign=view.foreign,
            sync_blocks=view.sync_blocks,
            next_key=None if nxt is None else (self.stream, step + 1),
            next_fetch=None if nxt is None else nxt.view.fetch,
            next_evict=None if nxt is None else nxt.view.evict,
            next_ids=None if nxt is None else nxt.plan.ids,
            early=cur.early,
            next_early=None if nxt is None else nxt.early,
            ahead=None
            if ahead is None or ahead.early is None
            else ((self.stream, step + ld.prefetch_depth), ahead.view.fetch[0][ahead.early]),
            unique_ids=int(plan.ids.size),
            hits=int(plan.hits),
            clean_hits=int(plan.clean_hits),
            tables_fingerprint=ld.tables.fingerprint(),
            accumulate=self.accumulate,
            digest=0 if world == 1 else stream_digest((m.batch for m in cur.group), end_seen),
        )
        for (local, _), (lookup_slots, inverse) in zip(shells, lookups):
            local.sparse.lookup = CacheLookup.from_inverse(
                torch.from_numpy(lookup_slots),
                torch.from_numpy(inverse.astype(np.int64, copy=False)),  # (the plan's own array: no copy)
                local.sparse.lengths,
                local.sparse.num_features,
            )
            local.plan = step_plan
            if not self._put(local):
                return False
        return True


@contextmanager
def _accumulation_explained(k: int) -> Iterator[None]:
    """Add to the oracle's errors (a cache too small for a step) that a step is ``k`` batches."""
    try:
        yield
    except ValueError as err:
        if k == 1:
            raise
        raise ValueError(
            f"{err}. With accumulate_grad_batches={k} a step is the {k} batches of one optimizer step: "
            f"`lightning-bagpipe trace DATA --accumulate-grad-batches {k}` reports the minimum for such "
            "steps, and min_capacity does when given each group's fused ids, concatenated"
        ) from None


def early_mask(fetch_ids: np.ndarray, evicted: Iterable[np.ndarray]) -> np.ndarray:
    """Which of step ``u``'s fetch rows may be read from the store ``D`` steps early.

    The early read is issued by the job that prepares step ``u - D + 1``, after that job's store write.
    Until step ``u``'s own job, the store can only change through later writes: end-of-use write-backs of
    steps ``s >= u - D``, which never hold a row that step ``u`` fetches while ``D <= L`` (such a row is
    used again within ``L`` steps, so it was kept), and capacity evictions of steps ``u - D + 2 .. u - 1``
    (``evicted``, every rank's). A row evicted there is fetched at step ``u`` itself.
    """
    gone = [e for e in evicted if e.size]
    if not gone or not fetch_ids.size:
        return np.ones(fetch_ids.size, dtype=bool)
    return ~member_of(fetch_ids, np.sort(np.concatenate(gone)))


@dataclass
class _Member:
    """A batch of a step: its index in the epoch, and how many id occurrences it has."""

    index: int
    batch: Batch
    occurrences: int


@dataclass
class _Planned:
    group: list[_Member]  # the batches of the step (one, or Lightning's accumulation group)
    plan: CachePlan
    view: RankView
    early: np.ndarray | None
    at_end: bool = False  # planned by the oracle's finish(): knowing where the stream ends


def stream_digest(batches: Iterable[Batch], end_seen: bool = False) -> int:
    """CRC-32 of global batches' sparse ids and bag lengths, and of whether their step's plans were made
    knowing where the stream ends (``end_seen``): equal on every rank reading the same stream."""
    crc = zlib.crc32(b"\x01" if end_seen else b"\x00")
    for b in batches:
        crc = zlib.crc32(b.sparse.values.numpy().tobytes(), crc)
        crc = zlib.crc32(b.sparse.lengths.numpy().tobytes(), crc)
    return crc
