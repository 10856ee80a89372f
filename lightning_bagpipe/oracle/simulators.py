"""Reference cache simulators: how many rows classic policies and offline Belady would fetch.

These are baselines for the oracle's benchmark and references for its tests, so they are written
plainly and independently of :mod:`lightning_bagpipe.oracle.lookahead`. Each simulates a cache of
``capacity`` rows over a stream of batches, where a batch is processed as a unit: all of a step's
distinct ids must be resident at once, and victims are chosen among the rows the step does not use.
They count loads only (the oracle's write-backs have no counterpart here).

* :func:`lru_fetches`: evict the least recently used row (ties: smallest id).
* :func:`lfu_fetches`: evict the least frequently used row, counting every occurrence since the start
  of the stream, also while the row was out of the cache ("perfect" LFU; ties: LRU, then smallest id).
* :func:`belady_fetches`: offline, knowing the whole trace, evict the row whose next use is farthest
  (never used again = farthest). With ``protect_previous`` the rows of step ``t - 1`` are not evictable
  at step ``t``, the constraint the oracle works under (step ``t``'s prefetch overlaps step ``t - 1``).

All raise ``ValueError`` when a step cannot fit, like the oracle.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from lightning_bagpipe.id_sets import union_ids

_NEVER = np.iinfo(np.int64).max // 4


def lru_fetches(batches: Iterable[np.ndarray], capacity: int) -> int:
    """Rows fetched by a least-recently-used cache of ``capacity`` rows (step-as-a-unit)."""
    steps, _, n_ids = _dense_steps(batches)
    last_use = np.full(n_ids, -1, dtype=np.int64)

    def key(t: int, ids: np.ndarray) -> np.ndarray:
        return last_use[ids]

    def after(t: int, ids: np.ndarray) -> None:
        last_use[ids] = t

    return _simulate(steps, n_ids, capacity, key, after, protect_previous=False)


def lfu_fetches(batches: Iterable[np.ndarray], capacity: int) -> int:
    """Rows fetched by a least-frequently-used cache of ``capacity`` rows (step-as-a-unit).

    A row's frequency is its number of occurrences so far in the stream (kept across evictions).
    """
    steps, counts, n_ids = _dense_steps(batches)
    freq = np.zeros(n_ids, dtype=np.int64)
    last_use = np.full(n_ids, -1, dtype=np.int64)
    stride = len(steps) + 1

    def key(t: int, ids: np.ndarray) -> np.ndarray:
        return freq[ids] * stride + last_use[ids] + 1

    def after(t: int, ids: np.ndarray) -> None:
        freq[ids] += counts[t]
        last_use[ids] = t

    return _simulate(steps, n_ids, capacity, key, after, protect_previous=False)


def belady_fetches(batches: Iterable[np.ndarray], capacity: int, protect_previous: bool = True) -> int:
    """Rows fetched by offline Belady (farthest next use evicted first) over the whole trace.

    With ``protect_previous`` (default) the rows used by step ``t - 1`` cannot be evicted at step ``t``.
    """
    steps, _, n_ids = _dense_steps(batches)
    following = _next_uses(steps)
    next_use = np.full(n_ids, _NEVER, dtype=np.int64)

    def key(t: int, ids: np.ndarray) -> np.ndarray:
        return -next_use[ids]

    def after(t: int, ids: np.ndarray) -> None:
        next_use[ids] = following[t]

    return _simulate(steps, n_ids, capacity, key, after, protect_previous=protect_previous)


def min_capacity(batches: Iterable[np.ndarray], protect_previous: bool = True) -> int:
    """Smallest cache that can run the stream: max over steps of the distinct rows that must be resident
    together (step ``t``'s, plus step ``t - 1``'s with ``protect_previous``)."""
    steps = _dense_steps(batches)[0]
    best = 0
    for t, ids in enumerate(steps):
        need = ids.size
        if protect_previous and t > 0:
            need = union_ids(ids, steps[t - 1]).size
        best = max(best, need)
    return best


# ---------------------------------------------------------------------- engine
def _simulate(
    steps: Sequence[np.ndarray],
    n_ids: int,
    capacity: int,
    key: Callable[[int, np.ndarray], np.ndarray],
    after: Callable[[int, np.ndarray], None],
    protect_previous: bool,
) -> int:
    """Run a slot cache over ``steps`` (dense distinct ids per step) and count the rows loaded.

    ``key(t, ids)`` ranks resident rows for eviction (smallest first; ties by smallest id) and
    ``after(t, ids)`` updates the policy's bookkeeping once step ``t`` has used ``ids``.
    """
    capacity = operator.index(capacity)
    if capacity < 1:
        raise ValueError(f"cache capacity must be >= 1 row, got {capacity}")
    slot_of = np.full(n_ids, -1, dtype=np.int64)
    slot_id = np.full(capacity, -1, dtype=np.int64)
    protected = np.zeros(n_ids, dtype=bool)
    used = 0  # slots [0, used) are occupied
    fetched = 0
    previous = np.zeros(0, dtype=np.int64)
    for t, ids in enumerate(steps):
        if ids.size > capacity:
            raise ValueError(f"step {t} uses {ids.size} distinct rows but the cache holds {capacity}")
        missing = ids[slot_of[ids] < 0]
        fetched += missing.size
        occupied = used
        take = min(missing.size, capacity - used)
        new_slots = np.arange(used, used + take, dtype=np.int64)
        used += take
        k = missing.size - take
        if k > 0:
            protected[ids] = True
            if protect_previous:
                protected[previous] = True
            candidates = np.flatnonzero(~protected[slot_id[:occupied]])
            protected[ids] = False
            protected[previous] = False
            if candidates.size < k:
                raise ValueError(
                    f"step {t} needs {occupied - candidates.size + missing.size} rows resident at once "
                    f"(its own and step {t - 1}'s) but the cache holds {capacity}"
                )
            cand_ids = slot_id[candidates]
            chosen = _smallest_k(key(t, cand_ids), cand_ids, k)
            victims = candidates[chosen]
            slot_of[slot_id[victims]] = -1
            new_slots = np.concatenate([new_slots, victims])
        slot_of[missing] = new_slots
        slot_id[new_slots] = missing
        after(t, ids)
        previous = ids
    return fetched


def _smallest_k(primary: np.ndarray, secondary: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest entries by ``(primary, secondary)`` (``secondary`` has no repeats)."""
    if k >= primary.size:
        return np.lexsort((secondary, primary))
    kth = primary[np.argpartition(primary, k - 1)[k - 1]]
    below = np.flatnonzero(primary < kth)
    ties = np.flatnonzero(primary == kth)
    ties = ties[np.argsort(secondary[ties], kind="stable")][: k - below.size]
    return np.concatenate([below, ties])


def _next_uses(steps: Sequence[np.ndarray]) -> list[np.ndarray]:
    """For every step's distinct ids, the next step using each id (``_NEVER`` if none)."""
    sizes = [s.size for s in steps]
    all_ids = np.concatenate(steps) if steps else np.zeros(0, dtype=np.int64)
    all_steps = np.repeat(np.arange(len(steps), dtype=np.int64), sizes)
    order = np.lexsort((all_steps, all_ids))  # by id, then step
    following = np.full(all_ids.size, _NEVER, dtype=np.int64)
    same = all_ids[order[1:]] == all_ids[order[:-1]]
    following[order[:-1][same]] = all_steps[order[1:][same]]
    return np.split(following, np.cumsum(sizes)[:-1]) if steps else []


def _dense_steps(batches: Iterable[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Distinct ids of every batch, renumbered densely (0..n-1 over the whole stream), with occurrence
    counts per distinct id, and the number of distinct ids. Validates the batches."""
    uniq: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    for t, batch in enumerate(batches):
        arr = np.asarray(batch)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"batch {t}: expected a 1-D integer array of ids, got {arr.dtype} {arr.shape}")
        u, c = np.unique(arr, return_counts=True)
        if u.size and u[0] < 0:
            raise ValueError(f"batch {t}: negative id {int(u[0])}")
        uniq.append(u.astype(np.int64, copy=False))
        counts.append(c.astype(np.int64))
    if not uniq:
        return [], [], 0
    sizes = np.cumsum([u.size for u in uniq])[:-1]
    distinct, dense = np.unique(np.concatenate(uniq), return_inverse=True)
    return np.split(dense.reshape(-1).astype(np.int64), sizes), counts, int(distinct.size)
