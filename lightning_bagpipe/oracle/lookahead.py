"""The lookahead oracle (BagPipe's "Oracle Cacher"): per-step cache instructions from the future.

The oracle reads the global batch stream ``L`` batches ahead of training. When batch ``t + L`` has been
pushed, everything that happens to step ``t``'s rows in ``(t, t + L]`` is known, and the oracle emits
step ``t``'s :class:`~lightning_bagpipe.oracle.plan.CachePlan`:

* **Retention** (BagPipe): after its use at step ``t`` a row stays resident and dirty iff it is used
  again within ``(t, t + L]``; otherwise it is written back after step ``t``.
* **Clean copies** (beyond BagPipe): a written-back row stays in its slot; a later use is a hit with no
  fetch as long as nothing reused the slot.
* **Capacity**: when a step's misses do not fit in free slots, clean copies are reused first (farthest
  next use first, "not in the window" being farthest; ties: least recently used, then lowest slot),
  then dirty rows are evicted the same way (written back before the fetch). With
  ``tie_break="frequency"``, rows with equal next use go fewest-uses-first instead (then LRU). Rows
  that step ``t`` or the in-flight step ``t - 1`` reads or writes are never victims: step ``t``'s
  evictions and fetches run while ``t - 1`` computes, and ``t - 1``'s end-of-use write-backs are
  queued after them. A step that cannot fit raises ``ValueError`` (the oracle cannot continue after it).

Everything is vectorized: the window is one flat buffer of ``(id, next use)`` entries, one per distinct
id of every unplanned step; per fused id the oracle keeps its cache slot and the flat index of its
latest occurrence, so linking a new batch to the previous occurrences of its ids is one scatter.
Victims are the slots below the ``k``-th smallest of a composite ``int64`` key (``np.partition``, no
full sort), equal keys going to the lowest slots. The plans are a pure function of the stream and the
arguments, so every rank can run its own copy of the oracle on the global batches and get the same plans.

Memory: 12 bytes per fused row (``int32`` slot, latest-occurrence index and scratch), 17 bytes per cache
slot, and the window: 20 bytes per distinct id and 8 per id occurrence of each of the ``L + 1`` batches.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from lightning_bagpipe.oracle.plan import CachePlan

_NEVER = 2**31 - 1
"""Next use of a row not used again within the known stream ("farthest")."""
_MASK = 2**31 - 1
"""Flat occurrence indices are stored modulo 2**31 (checked against the window's ids on use)."""
_PROTECTED = np.iinfo(np.int64).max
"""Victim key of a slot that must not be reused (free, or used by step t or t - 1)."""
_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class OracleStats:
    """Running counters of an oracle (all in rows, summed over the planned steps)."""

    steps: int = 0
    """Steps planned so far."""
    occurrences: int = 0
    """Id occurrences in the planned steps."""
    unique_ids: int = 0
    """Distinct ids per step, summed over steps."""
    fetched: int = 0
    """Rows loaded from the store (misses)."""
    hits: int = 0
    """Distinct ids already resident before their step (dirty or clean)."""
    clean_hits: int = 0
    """Of :attr:`hits`, those served by a clean copy left in place after a write-back."""
    written_back: int = 0
    """End-of-use write-backs (after the step)."""
    evicted: int = 0
    """Dirty rows evicted for capacity (written back before a fetch)."""
    clean_reused: int = 0
    """Clean copies whose slot was given to another row."""
    slots_used: int = 0
    """Highest number of cache slots in use at once."""

    @property
    def hit_rate(self) -> float:
        """Fraction of a step's distinct ids that were resident, over all steps."""
        return self.hits / self.unique_ids if self.unique_ids else 0.0

    def as_dict(self) -> dict[str, float]:
        """Plain counters plus the hit rate, for logs and JSON."""
        return {**asdict(self), "hit_rate": self.hit_rate}


class LookaheadOracle:
    """Plans cache fetches, evictions and write-backs for a stream of global batches.

    Args:
        num_rows: size of the fused id space; every id must be in ``[0, num_rows)``.
        lookahead: ``L >= 1``; a row is kept dirty in the cache iff it is used again within ``L`` steps.
        capacity: cache slots ``C``; ``None`` lets the cache grow (slots are allocated densely from 0
            and rows are never evicted, so the fetch count is the number of distinct ids).
        tie_break: how victims with the same class and next use are ordered (mostly rows not used in
            the window): ``"recency"`` (default, the documented policy) takes the least recently used
            first; ``"frequency"`` takes the row used by the fewest steps so far first, then the least
            recently used. Frequency suits skewed (Zipf) streams with a short lookahead; it costs
            4 more bytes per fused row.

    Feed batches with :meth:`push`; the plan of step ``n - L`` comes back once batch ``n`` is in.
    :meth:`finish` plans the remaining steps. :meth:`run` does both for an iterable.
    """

    def __init__(
        self, num_rows: int, lookahead: int, capacity: int | None = None, *, tie_break: str = "recency"
    ) -> None:
        num_rows = _as_int(num_rows, "num_rows")
        lookahead = _as_int(lookahead, "lookahead")
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {lookahead}")
        if capacity is not None:
            capacity = _as_int(capacity, "capacity")
            if capacity < 1:
                raise ValueError(f"cache capacity must be >= 1 row (or None for unbounded), got {capacity}")
        self.num_rows = num_rows
        self.lookahead = lookahead
        self.capacity = capacity
        if tie_break not in ("recency", "frequency"):
            raise ValueError(f"tie_break must be 'recency' or 'frequency', got {tie_break!r}")
        self.tie_break = tie_break
        self.stats = OracleStats()

        # Per fused row.
        self._slot_of = np.full(num_rows, -1, dtype=np.int32)
        self._last_occ = np.full(num_rows, -1, dtype=np.int32)  # flat index of latest occurrence, mod 2**31
        self._scratch = np.empty(num_rows, dtype=np.int32)  # working space of _unique (never read unwritten)
        self._uses = np.zeros(num_rows if tie_break == "frequency" else 0, dtype=np.int32)  # steps using it

        # Per cache slot.
        n_slots = capacity if capacity is not None else 0
        self._slot_id = np.full(n_slots, -1, dtype=np.int64)
        self._dirty = np.zeros(n_slots, dtype=bool)
        self._slot_next = np.full(n_slots, _NEVER, dtype=np.int32)
        self._last_use = np.zeros(n_slots, dtype=np.int32)
        self._key = np.empty(0, dtype=np.int64)  # working space of _choose_victims
        self._free = np.arange(n_slots, dtype=np.int64)  # free slots, handed out in ascending order
        self._n_free = n_slots
        self._in_use = 0
        self._prev_slots = _EMPTY  # slots of step t - 1's rows (in flight while step t is prepared)

        # The window: one entry per distinct id of every pushed-but-unplanned step.
        self._win_ids = np.zeros(0, dtype=np.int64)
        self._win_next = np.zeros(0, dtype=np.int32)
        self._win_lo = 0  # buffer position of the first live entry
        self._win_hi = 0  # buffer position past the last live entry
        self._flat_lo = 0  # flat (stream-wide) index of the entry at _win_lo
        # (distinct ids, inverse of every occurrence) of every unplanned step, oldest first
        self._steps: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._pushed = 0
        self._planned = 0
        self._finished = False

    # ------------------------------------------------------------------ public API
    @property
    def pending(self) -> int:
        """Batches pushed whose plan has not been emitted yet."""
        return self._pushed - self._planned

    def push(self, ids: np.ndarray) -> CachePlan | None:
        """Feed the fused ids (all occurrences, any order) of the next global batch.

        Returns the plan of step ``n - L`` once batch ``n`` (0-based) has been pushed, else ``None``.
        """
        if self._finished:
            raise RuntimeError("push() after finish(): this oracle's stream has ended; create a new oracle")
        step = self._pushed
        if step >= _NEVER - self.lookahead - 1:
            raise OverflowError(f"the oracle supports at most {_NEVER - self.lookahead - 2} steps per stream")
        uniq, inverse = self._unique(ids, step)
        self._link(uniq, step)
        self._append(uniq, inverse)
        self._pushed += 1
        if self._pushed > self.lookahead:
            return self._plan_next()
        return None

    def finish(self) -> list[CachePlan]:
        """End of stream: the plans of all remaining steps (rows are written back after their last use)."""
        self._finished = True
        return [self._plan_next() for _ in range(self.pending)]

    def run(self, batches: Iterable[np.ndarray]) -> Iterator[CachePlan]:
        """Plans of every batch of ``batches``, in step order (:meth:`push` each, then :meth:`finish`)."""
        for ids in batches:
            plan = self.push(ids)
            if plan is not None:
                yield plan
        yield from self.finish()

    # ------------------------------------------------------------------ push helpers
    def _unique(self, ids: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Distinct ids (ascending, int64) and the inverse of every occurrence; validates the batch.

        Sort-free except for the distinct ids: a per-row scratch array picks one representative
        occurrence per id, then maps every occurrence to its id's rank (``np.unique`` would sort all
        occurrences, several times slower on large batches).
        """
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"batch {step}: ids must be a 1-D array of fused ids, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"batch {step}: fused ids must be integers, got dtype {arr.dtype}")
        if arr.size == 0:
            return _EMPTY, _EMPTY
        if arr.size > _NEVER:
            raise ValueError(f"batch {step}: {arr.size} id occurrences exceed the limit of {_NEVER}")
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi >= self.num_rows:
            bad = (arr < 0) | (arr >= self.num_rows)
            pos = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"batch {step}: fused id {int(arr[pos])} (occurrence {pos}) is outside [0, {self.num_rows}) "
                f"({np.unique(arr[bad]).size} distinct ids out of range in this batch)"
            )
        occ = arr.astype(np.int64, copy=False)
        order = np.arange(occ.size, dtype=np.int32)
        scratch = self._scratch
        scratch[occ] = order  # for a repeated id one of its occurrences wins; which one does not matter
        uniq = np.sort(occ[scratch[occ] == order])
        scratch[uniq] = order[: uniq.size]
        return uniq, scratch[occ].astype(np.int64)

    def _link(self, uniq: np.ndarray, step: int) -> None:
        """Record ``step`` as the next use of the previous occurrence of each of ``uniq``'s ids.

        A previous occurrence still in the window gets it in its window entry; a resident row whose
        occurrences are all planned already (its next use was unknown) gets it in its slot.
        """
        prev = self._last_occ[uniq].astype(np.int64)
        rel = (prev - self._flat_lo) & _MASK
        live = self._win_hi - self._win_lo
        in_win = (prev >= 0) & (rel < live)
        cand = np.flatnonzero(in_win)
        pos = self._win_lo + rel[cand]
        in_win[cand] = self._win_ids[pos] == uniq[cand]  # a stale index may alias into the window
        self._win_next[self._win_lo + rel[in_win]] = step
        outside = uniq[~in_win]
        slots = self._slot_of[outside]
        self._slot_next[slots[slots >= 0]] = step

    def _append(self, uniq: np.ndarray, inverse: np.ndarray) -> None:
        n = uniq.size
        live = self._win_hi - self._win_lo
        if live + n > _MASK:
            raise OverflowError(
                f"the lookahead window would hold {live + n} ids (limit {_MASK}); lower the lookahead"
            )
        if self._win_hi + n > self._win_ids.size:
            size = max(self._win_ids.size, 2 * (live + n), 1024)
            ids = np.empty(size, dtype=np.int64)
            nxt = np.empty(size, dtype=np.int32)
            ids[:live] = self._win_ids[self._win_lo : self._win_hi]
            nxt[:live] = self._win_next[self._win_lo : self._win_hi]
            self._win_ids, self._win_next = ids, nxt
            self._win_lo, self._win_hi = 0, live
        hi = self._win_hi
        self._win_ids[hi : hi + n] = uniq
        self._win_next[hi : hi + n] = _NEVER
        flat0 = self._flat_lo + (hi - self._win_lo)
        self._last_occ[uniq] = (flat0 + np.arange(n, dtype=np.int64)) & _MASK
        self._win_hi = hi + n
        self._steps.append((uniq, inverse))

    # ------------------------------------------------------------------ planning
    def _plan_next(self) -> CachePlan:
        """Plan the oldest unplanned step (its window entries carry every next use within ``L``)."""
        step = self._planned
        ids, inverse = self._steps.popleft()
        n = ids.size
        lo = self._win_lo
        next_use = self._win_next[lo : lo + n].astype(np.int64)
        self._win_lo += n
        self._flat_lo += n

        slots = self._slot_of[ids].astype(np.int64)
        resident = slots >= 0
        hit_slots = slots[resident]
        clean_hits = int(np.count_nonzero(~self._dirty[hit_slots]))
        miss = ~resident
        fetch_ids = ids[miss]
        new_slots, evict_ids, evict_slots = self._make_room(step, ids, fetch_ids.size, hit_slots)
        slots[miss] = new_slots
        self._slot_of[fetch_ids] = new_slots
        self._slot_id[new_slots] = fetch_ids

        # After the step: rows used again within (t, t + L] stay dirty, the others are written back.
        done = next_use > step + self.lookahead
        self._dirty[slots] = ~done
        self._slot_next[slots] = next_use
        self._last_use[slots] = step
        self._prev_slots = slots
        if self._uses.size:
            self._uses[ids] = np.minimum(self._uses[ids], _NEVER - 1) + 1

        st = self.stats
        st.steps += 1
        st.occurrences += inverse.size
        st.unique_ids += n
        st.fetched += fetch_ids.size
        st.hits += hit_slots.size
        st.clean_hits += clean_hits
        st.written_back += int(np.count_nonzero(done))
        st.evicted += evict_ids.size
        st.slots_used = max(st.slots_used, self._in_use)
        self._planned += 1
        return CachePlan(
            step=step,
            ids=ids,
            slots=slots,
            inverse=inverse,
            fetch_ids=fetch_ids,
            fetch_slots=new_slots,
            evict_ids=evict_ids,
            evict_slots=evict_slots,
            writeback_ids=ids[done],
            writeback_slots=slots[done],
            hits=int(hit_slots.size),
            clean_hits=clean_hits,
        )

    def _make_room(
        self, step: int, ids: np.ndarray, n_miss: int, hit_slots: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slots for ``n_miss`` misses: free slots first, then victims.

        Returns the slots (in the order of the misses) and the dirty victims to write back (ids, slots).
        """
        if self.capacity is None:
            start = self._in_use  # nothing is evicted: slots [0, in_use) are all taken
            self._grow(start + n_miss)
            self._in_use += n_miss
            return np.arange(start, start + n_miss, dtype=np.int64), _EMPTY, _EMPTY
        if ids.size > self.capacity:
            raise ValueError(
                f"step {step} uses {ids.size} distinct rows but the cache holds {self.capacity}; "
                "raise the cache capacity or lower the batch size"
            )
        take = min(n_miss, self._n_free)
        start = self._free.size - self._n_free
        free = self._free[start : start + take].copy()
        self._n_free -= take
        self._in_use += take
        k = n_miss - take
        if k == 0:
            return free, _EMPTY, _EMPTY
        victims = self._choose_victims(step, k, ids, hit_slots)
        victims.sort()
        victim_ids = self._slot_id[victims]
        dirty = self._dirty[victims]
        self._slot_of[victim_ids] = -1
        self.stats.clean_reused += int(victims.size - np.count_nonzero(dirty))
        ev_ids, ev_slots = victim_ids[dirty], victims[dirty]
        order = np.argsort(ev_ids, kind="stable")
        return np.concatenate([free, victims]), ev_ids[order], ev_slots[order]

    def _choose_victims(self, step: int, k: int, ids: np.ndarray, hit_slots: np.ndarray) -> np.ndarray:
        """The ``k`` occupied, unprotected slots to reuse: clean before dirty, then farthest next use,
        then (frequency ties only: fewest uses,) least recently used, then lowest slot."""
        last = self._last_use
        by_frequency = self.tie_break == "frequency"
        # (free slots read _uses[-1] here; they are protected just below)
        third = self._uses[self._slot_id] if by_frequency else last
        # key = dirty << 62 | (NEVER - next use) << 31 | third, built in place (one buffer, no temporaries)
        if self._key.size != self._slot_next.size:
            self._key = np.empty(self._slot_next.size, dtype=np.int64)
        key = self._key
        np.subtract(_NEVER, self._slot_next, out=key, dtype=np.int64)
        np.left_shift(key, 31, out=key)
        np.bitwise_or(key, third, out=key, casting="unsafe")
        np.bitwise_or(key, np.left_shift(self._dirty, 62, dtype=np.int64), out=key)
        key[self._slot_id < 0] = _PROTECTED
        key[hit_slots] = _PROTECTED
        key[self._prev_slots] = _PROTECTED
        if np.count_nonzero(key != _PROTECTED) < k:
            in_flight = np.setdiff1d(self._slot_id[self._prev_slots], ids).size
            raise ValueError(
                f"step {step} needs {ids.size + in_flight} cache rows at once ({ids.size} distinct rows of "
                f"its own plus {in_flight} rows of step {step - 1}, which is still in flight and cannot be "
                f"evicted) but the cache holds {self.capacity}; raise the cache capacity or lower the "
                "batch size"
            )
        return _smallest(key, k, last if by_frequency else None)

    def _grow(self, n_slots: int) -> None:
        """Unbounded cache: make room for ``n_slots`` slots (amortized doubling)."""
        old = self._slot_id.size
        if n_slots <= old:
            return
        size = max(n_slots, 2 * old, 1024)
        self._slot_id = _extend(self._slot_id, size, -1)
        self._dirty = _extend(self._dirty, size, False)
        self._slot_next = _extend(self._slot_next, size, _NEVER)
        self._last_use = _extend(self._last_use, size, 0)


def _smallest(key: np.ndarray, k: int, then: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``k`` smallest entries of ``key``; among equal keys the smallest ``then`` first
    (if given), then the lowest index. Linear time (``np.partition`` finds the k-th value; no sort)."""
    kth = np.partition(key, k - 1)[k - 1]
    below = np.flatnonzero(key < kth)
    ties = np.flatnonzero(key == kth)
    need = k - below.size
    if then is not None and ties.size > need:
        ties = ties[_smallest(then[ties], need)]
    return np.concatenate([below, ties[:need]]).astype(np.int64)


def _extend(arr: np.ndarray, size: int, fill: int | bool) -> np.ndarray:
    out = np.full(size, fill, dtype=arr.dtype)
    out[: arr.size] = arr
    return out


def _as_int(value: object, what: str) -> int:
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
