"""The reference cache simulators: hand-computed traces, and offline Belady against exhaustive search."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_bagpipe.oracle.simulators import belady_fetches, lfu_fetches, lru_fetches, min_capacity


def trace(*steps: list[int]) -> list[np.ndarray]:
    return [np.array(s, dtype=np.int64) for s in steps]


# ---------------------------------------------------------------------- hand-computed traces
def test_lru_evicts_least_recently_used() -> None:
    # C=2: 1, 1 (hit), 2, 3 evicts 1 (last used at step 1, before 2), 1 evicts 2 -> 4 fetches
    assert lru_fetches(trace([1], [1], [2], [3], [1]), 2) == 4


def test_lru_breaks_ties_by_smallest_id_and_keeps_the_step_together() -> None:
    # C=2: {1,2} fetched together (tie at last use 0); 3 evicts 1 (smaller id); {1,3}: 1 evicts 2 -> 4
    assert lru_fetches(trace([1, 2], [3], [1, 3]), 2) == 4
    # the same tie: 2 stays, so a step using 2 and 3 is all hits -> 3 fetches
    assert lru_fetches(trace([2, 1], [3], [2, 3]), 2) == 3


def test_lfu_keeps_the_frequent_row() -> None:
    # C=2: 1 is used twice; 3 evicts 2 (used once), so 1 is still there at the end -> 3 fetches
    assert lfu_fetches(trace([1], [1], [2], [3], [1]), 2) == 3


def test_lfu_counts_occurrences_and_remembers_evicted_rows() -> None:
    # C=2. Step 0: 7 occurs three times. Step 2 (9) evicts 8 (1 use) not 7 (3 uses).
    assert lfu_fetches(trace([7, 7, 7, 8], [], [9], [7]), 2) == 3
    # C=2, frequency ties broken by least recent use:
    # s0: 4 (freq 2)  s1: 5 (freq 2)  s2: 6 evicts 4 (freq tie, older)  s3: 5 hit (freq 3)
    # s4: 4 evicts 6 (freq tie 3/3 with 5, older)  s5: 5 hit -> fetches 4, 5, 6, 4
    steps = trace([4, 4], [5, 5], [6, 6, 6], [5], [4], [5])
    assert lfu_fetches(steps, 2) == 4


def test_belady_evicts_farthest_next_use() -> None:
    # C=2, no protection: 1, 2, then 3 evicts 2 (never used again) -> 1 is a hit -> 3 fetches
    assert belady_fetches(trace([1], [2], [3], [1]), 2, protect_previous=False) == 3
    # with protection 2 (used by the in-flight step) cannot go: 1 is evicted and fetched again -> 4
    assert belady_fetches(trace([1], [2], [3], [1]), 2, protect_previous=True) == 4


def test_large_cache_fetches_each_row_once() -> None:
    steps = trace([1, 2, 3], [3, 4], [1, 5], [2, 2, 6])
    for sim in (lru_fetches, lfu_fetches, belady_fetches):
        assert sim(steps, 6) == 6


def test_min_capacity_and_errors() -> None:
    steps = trace([1, 2], [3, 4, 4], [1])
    assert min_capacity(steps, protect_previous=False) == 2
    assert min_capacity(steps, protect_previous=True) == 4
    with pytest.raises(ValueError, match="step 0 uses 2 distinct rows but the cache holds 1"):
        lru_fetches(steps, 1)
    with pytest.raises(ValueError, match="step 1 needs 4 rows resident at once"):
        belady_fetches(steps, 3, protect_previous=True)
    assert belady_fetches(steps, 2, protect_previous=False) == 5
    with pytest.raises(ValueError, match="batch 1: negative id -3"):
        lru_fetches(trace([1], [-3]), 2)
    with pytest.raises(ValueError, match="batch 0: expected a 1-D integer array"):
        lfu_fetches([np.array([1.5])], 2)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        lru_fetches(steps, 0)
    assert lru_fetches([], 3) == 0


# ---------------------------------------------------------------------- Belady is optimal
def optimum(steps: list[np.ndarray], capacity: int, protect_previous: bool) -> int | None:
    """Fewest fetches over every possible eviction schedule (exhaustive search over cache contents)."""
    sets = [frozenset(s.tolist()) for s in steps]
    best: dict[frozenset[int], int] = {frozenset(): 0}
    previous: frozenset[int] = frozenset()
    for used in sets:
        nxt: dict[frozenset[int], int] = {}
        for resident, cost in best.items():
            keep = used | (resident & previous if protect_previous else frozenset())
            optional = sorted(resident - keep)
            for r in range(len(optional) + 1):
                for kept in itertools.combinations(optional, r):
                    after = keep | frozenset(kept)
                    if len(after) <= capacity:
                        c = cost + len(used - resident)
                        nxt[after] = min(nxt.get(after, c), c)
        best, previous = nxt, used
    return min(best.values()) if best else None


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 5), max_size=5), min_size=1, max_size=7),
    st.booleans(),
    st.integers(0, 2),
)
def test_belady_matches_exhaustive_optimum(steps: list[list[int]], protect: bool, extra: int) -> None:
    batches = trace(*steps)
    capacity = max(1, min_capacity(batches, protect)) + extra
    assert belady_fetches(batches, capacity, protect) == optimum(batches, capacity, protect)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(5, 40), st.integers(0, 10))
def test_belady_never_loses_to_lru_or_lfu(seed: int, num_rows: int, extra: int) -> None:
    rng = np.random.default_rng(seed)
    batches = [(rng.zipf(1.3, rng.integers(1, 8)) - 1) % num_rows for _ in range(30)]
    capacity = min_capacity(batches, protect_previous=False) + extra
    best = belady_fetches(batches, capacity, protect_previous=False)
    assert best <= lru_fetches(batches, capacity)
    assert best <= lfu_fetches(batches, capacity)
    assert best >= len(np.unique(np.concatenate(batches)))
