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

Everything is vectorized. The window is one flat buffer of next uses, one entry per distinct id of
every unplanned step. Per row the oracle keeps its cache slot and, while the row's latest occurrence
is in the window, that occurrence's flat index (reset to -1 when it is planned), so linking a new batch
to the previous occurrences of its ids is one gather and one scatter. Victims: every slot gets a small
class number that orders (clean before dirty, farthest next use first) exactly; a few counting passes
find the class of the ``k``-th victim, every slot of a lower class is a victim, and only the slots of
that one class are ordered further (LRU, or uses then LRU, then lowest slot; ``np.partition``, no
sort). The plans are a pure function of the stream and the arguments, so every rank can run its own
copy of the oracle on the global batches and get the same plans.

Memory: the per-row state (:mod:`~lightning_bagpipe.oracle.row_index`): 12 bytes per fused row with the
dense index, about 110 bytes per live row (resident or in the window) with the compact one; 21 bytes
per cache slot; and the window: 4 bytes per distinct id of each of the ``L + 1`` batches held, plus
the batches' distinct ids and inverses (8 bytes each; 8 more per distinct id if compact).
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from lightning_bagpipe.id_sets import member_of
from lightning_bagpipe.oracle.plan import CachePlan
from lightning_bagpipe.oracle.row_index import CompactRowIndex, DenseRowIndex

AUTO_COMPACT_ROWS = 2**26
"""``index="auto"`` picks the compact row index above this many fused rows (dense: 768 MiB and up)."""

_NEVER = 2**31 - 1
"""Next use of a row not used again within the known stream ("farthest")."""
_MASK = 2**31 - 1
"""Flat occurrence indices are stored modulo 2**31 (a stored index is always in the window, which
holds fewer than 2**31 entries, so its position is unambiguous)."""
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
        num_rows: size of the fused id space (at most ``2**63``); every id must be in ``[0, num_rows)``.
        lookahead: ``L >= 1``; a row is kept dirty in the cache iff it is used again within ``L`` steps.
        capacity: cache slots ``C``; ``None`` lets the cache grow (slots are allocated densely from 0
            and rows are never evicted, so the fetch count is the number of distinct ids).
        tie_break: how victims with the same class and next use are ordered (mostly rows not used in
            the window): ``"recency"`` (default, the documented policy) takes the least recently used
            first; ``"frequency"`` takes the row used by the fewest steps so far first, then the least
            recently used. Frequency suits skewed (Zipf) streams with a short lookahead; it costs
            4 more bytes per fused row (dense index) or keeps an entry for every row seen (compact).
        index: where the per-row state lives (:mod:`~lightning_bagpipe.oracle.row_index`; the plans are
            the same): ``"dense"`` (arrays over the whole id space, 12 bytes per fused row, fastest),
            ``"compact"`` (entries for the rows in the cache or the window only, found by binary
            search; for id spaces too large for per-row arrays) or ``"auto"`` (default: compact above
            :data:`AUTO_COMPACT_ROWS` fused rows).

    Feed batches with :meth:`push`; the plan of step ``n - L`` comes back once batch ``n`` is in.
    :meth:`finish` plans the remaining steps. :meth:`run` does both for an iterable.
    """

    def __init__(
        self,
        num_rows: int,
        lookahead: int,
        capacity: int | None = None,
        *,
        tie_break: str = "recency",
        index: str = "auto",
    ) -> None:
        num_rows = _as_int(num_rows, "num_rows")
        lookahead = _as_int(lookahead, "lookahead")
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        if num_rows > 2**63:
            raise ValueError(f"num_rows must be at most 2**63 (fused ids are int64), got {num_rows}")
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

        if index not in ("auto", "dense", "compact"):
            raise ValueError(f"index must be 'auto', 'dense' or 'compact', got {index!r}")
        if index == "auto":
            index = "compact" if num_rows > AUTO_COMPACT_ROWS else "dense"
        self.index = index
        by_frequency = tie_break == "frequency"
        # Per fused row (the live ones only if compact): flat index of the latest occurrence if it is in
        # the window (mod 2**31, else -1), cache slot (or -1), and with frequency ties the steps that
        # used the row. Rows are addressed by handle (the id itself if dense).
        self._rows: DenseRowIndex | CompactRowIndex = (
            DenseRowIndex(num_rows, by_frequency) if index == "dense" else CompactRowIndex(by_frequency)
        )

        # Per cache slot.
        n_slots = capacity if capacity is not None else 0
        self._slot_row = np.full(n_slots, -1, dtype=np.int64)  # handle of the slot's row
        self._dirty = np.zeros(n_slots, dtype=bool)
        # next use of the slot's row, minus L + 2 if the row is dirty (a dirty row's next use is in the
        # window, never "never"): what _choose_victims needs to class a slot in two passes
        self._slot_next = np.full(n_slots, _NEVER, dtype=np.int32)
        self._last_use = np.zeros(n_slots, dtype=np.int32)
        self._cls = np.empty(0, dtype=np.int32)  # working space of _choose_victims
        self._last_cut = 0  # class of the last step's k-th victim (where the next search starts)
        self._n_free = n_slots  # slots [capacity - n_free, capacity) were never used
        self._in_use = 0
        self._prev_slots = _EMPTY  # slots of step t - 1's rows (in flight while step t is prepared)

        # The window: one entry per distinct id of every pushed-but-unplanned step.
        self._win_next = np.zeros(0, dtype=np.int32)
        self._win_lo = 0  # buffer position of the first live entry
        self._win_hi = 0  # buffer position past the last live entry
        self._flat_lo = 0  # flat (stream-wide) index of the entry at _win_lo
        # (distinct ids, their handles, inverse of every occurrence) of every unplanned step, oldest first
        self._steps: deque[tuple[np.ndarray, np.ndarray, np.ndarray]] = deque()
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
        rows = self._rows.handles(uniq)
        self._link(rows, step)
        self._append(uniq, rows, inverse)
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
        """Distinct ids (ascending, int64) and the inverse of every occurrence; validates the batch."""
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"batch {step}: ids must be a 1-D array of fused ids, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"batch {step}: fused ids must be integers, got dtype {arr.dtype}")
        if arr.size == 0:
            return _EMPTY, _EMPTY
        if arr.size > _NEVER:
            raise ValueError(f"batch {step}: {arr.size} id occurrences exceed the limit of {_NEVER}")
        # one pass: viewed as unsigned, a negative id is huge (at least 2**(bits - 1); a narrower type's
        # negative ids can be below a large num_rows, so those are also compared with 0)
        narrow_signed = arr.dtype.kind == "i" and arr.dtype.itemsize < 8
        as_unsigned = int(arr.view(arr.dtype.str.replace("i", "u")).max())
        if as_unsigned >= self.num_rows or (narrow_signed and int(arr.min()) < 0):
            bad = (arr < 0) | (arr >= self.num_rows)
            pos = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"batch {step}: fused id {int(arr[pos])} (occurrence {pos}) is outside [0, {self.num_rows}) "
                f"({np.unique(arr[bad]).size} distinct ids out of range in this batch)"
            )
        return self._rows.unique(arr)

    def _link(self, rows: np.ndarray, step: int) -> None:
        """Record ``step`` as the next use of the previous occurrence of each of the rows ``rows``.

        A previous occurrence still in the window gets it in its window entry; a resident row whose
        occurrences are all planned already (its next use was unknown) gets it in its slot.
        """
        prev = self._rows.last_occ[rows]
        in_win = prev >= 0  # planning a row's latest occurrence resets its index to -1
        # (np.compress: about twice as fast as boolean indexing)
        rel = (np.compress(in_win, prev) - (self._flat_lo & _MASK)) & _MASK  # int32 throughout
        self._win_next[self._win_lo : self._win_hi][rel] = step
        slots = self._rows.slot[np.compress(~in_win, rows)]
        self._slot_next[np.compress(slots >= 0, slots)] = step  # (such a row is clean: see _slot_next)

    def _append(self, uniq: np.ndarray, rows: np.ndarray, inverse: np.ndarray) -> None:
        """Add a step's distinct ids to the window (next use unknown yet) as their rows' latest occurrence."""
        n = uniq.size
        live = self._win_hi - self._win_lo
        if live + n > _MASK:
            raise OverflowError(
                f"the lookahead window would hold {live + n} ids (limit {_MASK}); lower the lookahead"
            )
        if self._win_hi + n > self._win_next.size:
            size = max(self._win_next.size, 2 * (live + n), 1024)
            nxt = np.empty(size, dtype=np.int32)
            nxt[:live] = self._win_next[self._win_lo : self._win_hi]
            self._win_next = nxt
            self._win_lo, self._win_hi = 0, live
        hi = self._win_hi
        self._win_next[hi : hi + n] = _NEVER
        flat0 = self._flat_lo + (hi - self._win_lo)
        flat = np.arange(n, dtype=np.int32) + np.int32(flat0 & _MASK)  # may wrap around: masked below
        self._rows.last_occ[rows] = flat & _MASK
        self._win_hi = hi + n
        self._steps.append((uniq, rows, inverse))

    # ------------------------------------------------------------------ planning
    def _plan_next(self) -> CachePlan:
        """Plan the oldest unplanned step (its window entries carry every next use within ``L``)."""
        step = self._planned
        ids, rows, inverse = self._steps.popleft()
        n = ids.size
        lo = self._win_lo
        next_use = self._win_next[lo : lo + n]
        self._win_lo += n
        self._flat_lo += n

        index = self._rows
        slots = index.slot[rows].astype(np.int64)
        resident = slots >= 0
        hit_slots = np.compress(resident, slots)  # (np.compress: about twice as fast as slots[resident])
        clean_hits = hit_slots.size - int(np.count_nonzero(self._dirty[hit_slots]))
        miss = np.flatnonzero(~resident)
        fetch_ids = ids[miss]
        fetch_rows = fetch_ids if rows is ids else rows[miss]  # (a dense index's handles are the ids)
        new_slots, evict_ids, evict_slots = self._make_room(step, ids, fetch_ids.size, hit_slots)
        slots[miss] = new_slots
        index.slot[fetch_rows] = new_slots
        self._slot_row[new_slots] = fetch_rows

        # After the step: rows used again within (t, t + L] stay dirty, the others are written back.
        done = next_use > step + self.lookahead  # i.e. never: batches after step + L are not known yet
        written = np.flatnonzero(done)
        writeback_ids = ids[written]
        # the occurrence leaving the window was the row's latest
        index.last_occ[writeback_ids if rows is ids else rows[written]] = -1
        keep = ~done
        self._dirty[slots] = keep
        self._slot_next[slots] = next_use - keep * np.int32(self.lookahead + 2)
        self._last_use[slots] = step
        self._prev_slots = slots
        if index.uses.size:
            index.uses[rows] = np.minimum(index.uses[rows], _NEVER - 1) + 1

        st = self.stats
        st.steps += 1
        st.occurrences += inverse.size
        st.unique_ids += n
        st.fetched += fetch_ids.size
        st.hits += hit_slots.size
        st.clean_hits += clean_hits
        st.written_back += written.size
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
            writeback_ids=writeback_ids,
            writeback_slots=slots[written],
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
            raise self._too_small(step, ids, f"step {step} uses {ids.size} distinct rows")
        take = min(n_miss, self._n_free)
        start = self.capacity - self._n_free
        free = np.arange(start, start + take, dtype=np.int64)
        self._n_free -= take
        self._in_use += take
        k = n_miss - take
        if k == 0:
            return free, _EMPTY, _EMPTY
        victims = self._choose_victims(step, k, ids, hit_slots, start)
        index = self._rows
        victim_rows = self._slot_row[victims]
        victim_ids = index.ids(victim_rows)
        dirty = self._dirty[victims]
        index.slot[victim_rows] = -1
        if index.compact:  # rows out of the cache and the window need no entry
            index.release(np.compress(index.last_occ[victim_rows] < 0, victim_rows))
        self.stats.clean_reused += int(victims.size - np.count_nonzero(dirty))
        ev_ids, ev_slots = np.compress(dirty, victim_ids), np.compress(dirty, victims)
        order = np.argsort(ev_ids, kind="stable")
        return np.concatenate([free, victims]), ev_ids[order], ev_slots[order]

    def _choose_victims(
        self, step: int, k: int, ids: np.ndarray, hit_slots: np.ndarray, first_free: int
    ) -> np.ndarray:
        """The ``k`` occupied, unprotected slots to reuse: clean before dirty, then farthest next use,
        then (frequency ties only: fewest uses,) least recently used, then lowest slot.

        Slots ``[first_free, capacity)`` were handed out to this step's misses just before. Every slot
        gets a small class number for its (dirty, next use) pair, which orders the slots exactly as those
        two keys do; counting passes find the class of the ``k``-th victim, lower classes are taken whole,
        and only that one class is ordered further (no pass over the cache sorts or partitions 64-bit keys).
        """
        lookahead = self.lookahead
        protected = 2 * lookahead + 4
        if self._cls.size != self._slot_next.size:
            self._cls = np.empty(self._slot_next.size, dtype=np.int32)
        cls = self._cls
        # An unprotected slot's next use is in (step, step + L] (only batches up to step + L are known)
        # or "never": class L + 1 - (next - step) is 1 (farthest) .. L (nearest), and <= 0 for never
        # (0 in effect: no class below 0 is ever searched or compared). Dirty slots get L + 2 more, as
        # their _slot_next is their next use minus L + 2.
        np.subtract(step + lookahead + 1, self._slot_next, out=cls)
        cls[first_free:] = protected
        cls[hit_slots] = protected
        cls[self._prev_slots] = protected
        cut = self._cut_class(cls, k, protected - 1)
        if cut == protected - 1 and np.count_nonzero(cls < protected) < k:
            in_flight = np.setdiff1d(self._rows.ids(self._slot_row[self._prev_slots]), ids).size
            raise self._too_small(
                step,
                ids,
                f"step {step} needs {ids.size + in_flight} cache rows at once ({ids.size} distinct rows of "
                f"its own plus {in_flight} rows of step {step - 1}, which is still in flight and cannot be "
                "evicted)",
            )
        cand = np.flatnonzero(cls <= cut)  # the victims and the rest of their class, ascending
        cand_cls = np.maximum(cls[cand], 0)
        take = cand_cls < cut  # lower classes: taken whole
        ties = np.flatnonzero(cand_cls == cut)
        need = k - (cand.size - ties.size)
        if ties.size > need:
            last = self._last_use[cand[ties]]
            if self.tie_break == "frequency":
                ties = ties[_smallest(self._rows.uses[self._slot_row[cand[ties]]], need, last)]
            else:
                ties = ties[_smallest(last, need)]
        take[ties] = True
        return cand[take]  # ascending

    def _too_small(self, step: int, ids: np.ndarray, need: str) -> ValueError:
        """The error for step ``step`` not fitting: ``need`` (what the step needs), the rule, and the
        largest need among the steps read so far, which is all the oracle can know of the stream: a lower
        bound of the capacity the stream needs until the stream has ended (then it is the minimum, as
        every earlier step fitted)."""
        prev = np.sort(self._rows.ids(self._slot_row[self._prev_slots])) if step > 0 else _EMPTY
        known = [prev, ids, *(uniq for uniq, _, _ in self._steps)]  # steps step - 1, step, step + 1, ...
        best, best_step = 0, step
        for i in range(1, len(known)):  # ascending distinct ids: |a u b| = |a| + |b| - |a n b|
            a, b = known[i - 1], known[i]
            rows = a.size + b.size - int(np.count_nonzero(member_of(b, a)))
            if rows > best:
                best, best_step = rows, step + i - 1
        last = step + len(known) - 2
        pair = f"step {best_step} with step {best_step - 1}" if best_step > 0 else "step 0 on its own"
        if self._finished:  # every step is known, and every step before this one fitted
            bound = f"the whole stream (steps 0 to {last}) needs {best} rows ({pair})"
        else:
            bound = (
                f"the steps read so far (up to step {last}) need at least {best} rows ({pair}); later "
                "steps may need more"
            )
        return ValueError(
            f"{need} but the cache holds {self.capacity}; raise the cache capacity or lower the batch "
            "size. Each step's distinct rows and the previous step's must fit in the cache together (a "
            f"step's rows are fetched while the previous step computes); {bound}. Set cache_rows (the "
            f"capacity of LookaheadOracle) to at least {best}, or to None to let the cache grow. "
            "lightning_bagpipe.oracle.min_capacity(batch.sparse.fused_ids(tables) for batch in batches) "
            "computes a whole stream's minimum; `lightning-bagpipe trace DATA` reports it for Parquet, "
            "Criteo TSV or synthetic data"
        )

    def _cut_class(self, cls: np.ndarray, k: int, top: int) -> int:
        """The class of the ``k``-th victim: the smallest ``c`` with at least ``k`` slots of class ``<= c``
        (``top`` qualifies). Each probe is one cheap counting pass over ``cls``; the search gallops out
        from the previous step's answer, which consecutive steps mostly share, then bisects."""

        def enough(c: int) -> bool:
            return int(np.count_nonzero(cls <= c)) >= k

        # invariant: fewer than k slots of class <= lo, at least k of class <= hi (classes below 0 count
        # as 0, so -1 never qualifies; the caller checks that `top` qualifies when the answer is `top`)
        lo, hi = -1, top
        guess = min(max(self._last_cut, 0), top)
        width = 1
        if enough(guess):
            hi = guess
            while hi - width > lo:
                if not enough(hi - width):
                    lo = hi - width
                    break
                hi -= width
                width *= 2
        else:
            lo = guess
            while lo + width < hi:
                if enough(lo + width):
                    hi = lo + width
                    break
                lo += width
                width *= 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if enough(mid):
                hi = mid
            else:
                lo = mid
        self._last_cut = hi
        return hi

    def _grow(self, n_slots: int) -> None:
        """Unbounded cache: make room for ``n_slots`` slots (amortized doubling)."""
        old = self._slot_row.size
        if n_slots <= old:
            return
        size = max(n_slots, 2 * old, 1024)
        self._slot_row = _extend(self._slot_row, size, -1)
        self._dirty = _extend(self._dirty, size, False)
        self._slot_next = _extend(self._slot_next, size, _NEVER)
        self._last_use = _extend(self._last_use, size, 0)


def _smallest(key: np.ndarray, k: int, then: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``k`` smallest entries of ``key`` (in no particular order); among equal keys the
    smallest ``then`` first (if given), then the lowest index. Small inputs: one stable sort; large
    ones: linear time (``np.partition`` finds the k-th value, no sort)."""
    if key.size <= _SMALL:
        order = np.argsort(key, kind="stable") if then is None else np.lexsort((then, key))
        return order[:k]
    kth = np.partition(key, k - 1)[k - 1]
    below = np.flatnonzero(key < kth)
    ties = np.flatnonzero(key == kth)
    need = k - below.size
    if then is not None and ties.size > need:
        ties = ties[_smallest(then[ties], need)]
    return np.concatenate([below, ties[:need]])


_SMALL = 1024
"""Up to this many entries :func:`_smallest` sorts (a few microseconds) instead of partitioning."""


def _extend(arr: np.ndarray, size: int, fill: int | bool) -> np.ndarray:
    out = np.full(size, fill, dtype=arr.dtype)
    out[: arr.size] = arr
    return out


def _as_int(value: object, what: str) -> int:
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
