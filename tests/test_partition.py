"""LRPP: replaying every rank's share of the plans keeps every read current and the store exact.

A plain simulation in this file plays R ranks: each has its own cache (slot -> (id, version)); a shared
store holds versions; the truth is the number of updates each id has had. The schedule is the
executors' real one: at the start of step t every rank writes back its step t-1 rows, then every rank
evicts for t+1, (barrier), fetches for t+1; then step t computes. Every row a rank reads or updates must
hold the true version, and at the end the store must hold the truth for every id.

The exchange blocks (which replicated rows each rank sends) are checked against sets built from the raw
occurrences, and the all-reduce/exchange choice on hand-made steps that force each branch and the tie.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_bagpipe.oracle.lookahead import LookaheadOracle
from lightning_bagpipe.oracle.partition import RankPartitioner, RankView, occurrence_ranks

Trace = list[tuple[np.ndarray, np.ndarray]]  # per step: (fused ids, key-major bag lengths)


def _trace(seed: int, steps: int, batch: int, features: int, rows: int, zipf: bool) -> Trace:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        lengths = rng.integers(1, 3, size=features * batch)
        n = int(lengths.sum())
        ids = (rng.zipf(1.3, n) - 1) % rows if zipf else rng.integers(0, rows, n)
        out.append((ids.astype(np.int64), lengths))
    return out


def _simulate(
    trace: Trace, world: int, lookahead: int, capacity: int | None, features: int, flush_every: int = 0
) -> dict[str, int]:
    rows = 1 + max(int(t[0].max()) for t in trace)
    plans = list(LookaheadOracle(rows, lookahead, capacity).run(ids for ids, _ in trace))
    parts = [RankPartitioner(rows, r, world) for r in range(world)]
    views = []
    for (_, lengths), plan in zip(trace, plans):
        occ = occurrence_ranks(lengths, features, world)
        views.append([p.view(plan, occ) for p in parts])
    truth = np.zeros(rows, dtype=np.int64)
    store = np.zeros(rows, dtype=np.int64)
    caches: list[dict[int, tuple[int, int]]] = [{} for _ in range(world)]
    dirty: list[dict[int, int]] = [{} for _ in range(world)]  # slot -> id this rank must write back
    writes = np.zeros(rows, dtype=np.int64)

    def write(r: int, ids: np.ndarray, slots: np.ndarray) -> None:
        for i, s in zip(ids.tolist(), slots.tolist()):
            held = caches[r].get(s)
            assert held is not None and held[0] == i, f"rank {r} writes id {i} from slot {s} holding {held}"
            store[i] = held[1]
            writes[i] += 1
            dirty[r].pop(s, None)

    def flush() -> None:
        """What the driver does before evaluation/checkpoints: each rank writes its dirty rows."""
        for r in range(world):
            for s, i in dirty[r].items():
                held = caches[r][s]
                assert held[0] == i
                store[i] = held[1]

    def prestep(t: int) -> None:
        for r in range(world):
            write(r, *views[t][r].evict)
        for r in range(world):  # after the executors' barrier
            for i, s in zip(*(a.tolist() for a in views[t][r].fetch)):
                caches[r][s] = (i, int(store[i]))
                dirty[r].pop(s, None)

    prestep(0)
    for t, ((_, lengths), plan) in enumerate(zip(trace, plans)):
        if t > 0:
            for r in range(world):
                write(r, *views[t - 1][r].writeback)
        if t + 1 < len(plans):
            prestep(t + 1)
        occ = occurrence_ranks(lengths, features, world)
        for r in range(world):
            v = views[t][r]
            used = np.unique(plan.inverse[occ == r])
            for i, s in zip(plan.ids[used].tolist(), plan.slots[used].tolist()):
                assert caches[r].get(s) == (i, truth[i]), f"step {t} rank {r} reads stale id {i}"
            assert np.array_equal(v.sync[0], views[t][0].sync[0])  # same replicated rows on every rank
            for i, s in zip(*(a.tolist() for a in v.sync)):
                assert caches[r].get(s) == (i, truth[i]), f"step {t} rank {r} syncs stale id {i}"
        # every id of the step is updated exactly once: by all ranks (sync) or by its single owner
        owners = np.concatenate([views[t][r].own[0] for r in range(world)])
        assert np.array_equal(np.sort(np.concatenate([views[t][0].sync[0], owners])), plan.ids)
        truth[plan.ids] += 1
        for r in range(world):
            v = views[t][r]
            for i, s in zip(
                *(
                    a.tolist()
                    for a in (np.concatenate([v.sync[0], v.own[0]]), np.concatenate([v.sync[1], v.own[1]]))
                )
            ):
                caches[r][s] = (i, int(truth[i]))
            for s in v.foreign[1].tolist():
                dirty[r].pop(s, None)
            for i, s in zip(v.sync[0].tolist(), v.sync[1].tolist()):
                if i % world == r:
                    dirty[r][s] = i
            for i, s in zip(v.own[0].tolist(), v.own[1].tolist()):
                dirty[r][s] = i
        if flush_every and t % flush_every == 0:
            flush()
            assert np.array_equal(store, truth), f"after a flush at step {t} the store is not current"
    for r in range(world):
        write(r, *views[-1][r].writeback)
    assert np.array_equal(store, truth), "the store does not hold every row's last update"
    local = sum(int(v[r].own[0].size) for v in views for r in range(world))
    synced = sum(int(v[0].sync[0].size) for v in views)
    return {"local": local, "synced": synced, "writes": int(writes.sum())}


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    world=st.integers(2, 3),
    lookahead=st.sampled_from([1, 2, 5]),
    zipf=st.booleans(),
    capacity_slack=st.sampled_from([None, 0, 6]),
    flush_every=st.sampled_from([0, 1, 3]),
)
def test_every_rank_reads_current_rows_and_the_store_ends_exact(
    seed: int, world: int, lookahead: int, zipf: bool, capacity_slack: int | None, flush_every: int
) -> None:
    features, batch = 2, 6
    trace = _trace(seed, 14, batch, features, 40, zipf)
    capacity = None
    if capacity_slack is not None:
        need = max(len(np.union1d(a[0], b[0])) for a, b in itertools.pairwise(trace))
        capacity = need + capacity_slack
    _simulate(trace, world, lookahead, capacity, features, flush_every)


def test_rows_used_by_one_rank_without_reuse_are_not_communicated() -> None:
    trace = _trace(3, 30, 32, 3, 5000, zipf=True)
    stats = _simulate(trace, 2, 4, None, 3)
    assert stats["local"] > 0
    # skewed data: a real share of each step's rows stays local (no gradient exchange for them)
    assert stats["local"] / (stats["local"] + stats["synced"]) > 0.3


def _views(
    trace: Trace, world: int, lookahead: int, features: int
) -> list[tuple[list[RankView], list[set[int]]]]:
    """Every rank's view of every step, with the set of ids each rank's samples used (plain Python)."""
    rows = 1 + max(int(t[0].max()) for t in trace)
    parts = [RankPartitioner(rows, r, world) for r in range(world)]
    out = []
    for (ids, lengths), plan in zip(trace, LookaheadOracle(rows, lookahead, None).run(i for i, _ in trace)):
        occ = occurrence_ranks(lengths, features, world)
        used = [{int(i) for i, o in zip(ids.tolist(), occ.tolist()) if o == r} for r in range(world)]
        out.append(([p.view(plan, occ) for p in parts], used))
    return out


def _reference_blocks(sync_ids: np.ndarray, used: list[set[int]]) -> list[list[int]]:
    return [[k for k, i in enumerate(sync_ids.tolist()) if i in u] for u in used]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("zipf", [False, True])
def test_sync_blocks_list_the_replicated_rows_each_rank_used(world: int, zipf: bool) -> None:
    trace = _trace(7, 40, 12, 3, 300, zipf)
    chosen = {"exchange": 0, "allreduce": 0}
    for views, used in _views(trace, world, 4, 3):
        sync_ids = views[0].sync[0]
        ref = _reference_blocks(sync_ids, used)
        # the plain rule: W * max_r |A_r| < 2 n  <=>  (W-1) max_r |A_r| < 2 (W-1) / W * n
        exchange = world * max(len(b) for b in ref) < 2 * len(sync_ids)
        chosen["exchange" if exchange else "allreduce"] += 1
        for v in views:  # every rank derives the same blocks from the global plan
            if not exchange:
                assert v.sync_blocks is None
                continue
            assert v.sync_blocks is not None and len(v.sync_blocks) == world
            for r in range(world):
                assert v.sync_blocks[r].dtype == np.int64
                assert v.sync_blocks[r].tolist() == ref[r], f"rank {r}'s block"
    assert chosen["exchange"] > 0  # the data exercises the exchange


def _plan_views(batches: list[list[list[int]]], world: int) -> list[RankView]:
    """Rank 0's views of hand-made batches (lookahead 1): ``batches[t][sample]`` lists a sample's ids."""
    flat = [np.array([i for sample in b for i in sample], dtype=np.int64) for b in batches]
    lengths = [np.array([len(sample) for sample in b], dtype=np.int64) for b in batches]
    rows = 1 + max(int(f.max()) for f in flat)
    part = RankPartitioner(rows, 0, world)
    plans = LookaheadOracle(rows, 1, None).run(flat)
    return [part.view(plan, occurrence_ranks(n, 1, world)) for plan, n in zip(plans, lengths)]


def test_the_exchange_is_chosen_when_each_rank_used_few_of_the_replicated_rows() -> None:
    # one sample per rank; rows 5 and 6 are reused next step, so both are replicated at step 0, but rank 0
    # used only 5 and rank 1 only 6: (W-1) * 1 row sent against 2 (W-1)/W * 2 = 2 rows all-reduced
    v = _plan_views([[[5], [6]], [[5], [6]]], world=2)[0]
    assert v.sync[0].tolist() == [5, 6]
    assert v.sync_blocks is not None
    assert [b.tolist() for b in v.sync_blocks] == [[0], [1]]
    # three ranks, 5 replicated rows, blocks of 2, 3 and 1 rows (row 7 used by ranks 1 and 2): 3 * 3 < 2 * 5
    v = _plan_views([[[1, 2], [3, 4, 7], [7]], [[1, 3, 7], [2, 4], [8]]], world=3)[0]
    assert v.sync[0].tolist() == [1, 2, 3, 4, 7]
    assert v.sync_blocks is not None
    assert [b.tolist() for b in v.sync_blocks] == [[0, 1], [2, 3, 4], [4]]


def test_the_allreduce_is_chosen_when_it_sends_no_more_bytes() -> None:
    # two ranks, rank 0 used every replicated row: (W-1) * 2 = 2 (W-1)/W * 2, a tie goes to the all-reduce
    v = _plan_views([[[5, 6], [6]], [[5], [6]]], world=2)[0]
    assert v.sync[0].tolist() == [5, 6] and v.sync_blocks is None
    # three ranks all using both rows: the exchange would send 2 * 2 rows, the all-reduce 4/3 * 2
    v = _plan_views([[[5, 6], [5, 6], [5, 6]], [[5], [6], [5]]], world=3)[0]
    assert v.sync[0].tolist() == [5, 6] and v.sync_blocks is None
    # three ranks, 3 replicated rows, the largest block 2 rows: 3 * 2 = 2 * 3, a tie again
    v = _plan_views([[[1, 2], [2, 3], [3]], [[1], [2], [3]]], world=3)[0]
    assert v.sync[0].tolist() == [1, 2, 3] and v.sync_blocks is None


def test_replicate_mode_makes_every_row_of_every_step_replicated() -> None:
    """The full-replication baseline: no local rows, every step's rows all-reduced (never exchanged)."""
    trace = _trace(3, 20, 32, 3, 5000, zipf=True)
    rows = 1 + max(int(t[0].max()) for t in trace)
    parts = [RankPartitioner(rows, r, 2, replicate=True) for r in range(2)]
    lrpp = RankPartitioner(rows, 0, 2)
    local_somewhere = 0
    for (_ids, lengths), plan in zip(trace, LookaheadOracle(rows, 4, None).run(i for i, _ in trace)):
        occ = occurrence_ranks(lengths, 3, 2)
        for p in parts:
            v = p.view(plan, occ)
            assert v.sync[0].tolist() == plan.ids.tolist()
            assert v.own[0].size == 0 and v.foreign[0].size == 0 and v.sync_blocks is None
        local_somewhere += lrpp.view(plan, occ).own[0].size
    assert local_somewhere > 0  # (LRPP would have kept rows local on this trace)
