"""The oracle's row indexes: the compact index gives exactly the dense index's plans, on small id spaces
and on sparse 2**40-row ones, and its entries are only the rows in the cache or the window."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_bagpipe.oracle import lookahead as lookahead_module
from lightning_bagpipe.oracle.lookahead import LookaheadOracle
from lightning_bagpipe.oracle.plan import CachePlan
from lightning_bagpipe.oracle.row_index import CompactRowIndex, DenseRowIndex, radix_argsort
from tests.test_oracle_properties import crowded_traces, pair_need, replay, traces

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TIE_BREAKS = st.sampled_from(["recency", "frequency"])


# ---------------------------------------------------------------------- building blocks
@pytest.mark.parametrize("bound", [1, 200, 2**16, 2**16 + 1, 2**32, 2**40, 2**63])
def test_radix_argsort_is_a_stable_sort(bound: int) -> None:
    rng = np.random.default_rng(bound % 1000)
    values = rng.integers(0, bound, 3000, dtype=np.int64)
    values[::7] = values[0]  # duplicates: stability shows
    values[1] = bound - 1
    assert np.array_equal(radix_argsort(values, bound), np.argsort(values, kind="stable"))
    narrow = (values % 60000).astype(np.uint16)  # a narrow dtype with a wide bound
    assert np.array_equal(radix_argsort(narrow, max(bound, 2**20)), np.argsort(narrow, kind="stable"))


@pytest.mark.parametrize("kind", ["dense", "compact"])
def test_unique_matches_np_unique(kind: str) -> None:
    index = DenseRowIndex(5000, uses=False) if kind == "dense" else CompactRowIndex(uses=False)
    rng = np.random.default_rng(1)
    batches = [
        rng.integers(0, 5000, 1000),
        np.array([4999]),
        np.full(17, 3),
        rng.integers(0, 40, 500).astype(np.int32),
        np.arange(5000)[::-1].astype(np.uint16),
    ]
    for batch in batches:
        uniq, inverse = index.unique(batch)
        want_uniq, want_inverse = np.unique(batch, return_inverse=True)
        assert uniq.dtype == np.int64 and inverse.dtype == np.int64
        assert np.array_equal(uniq, want_uniq) and np.array_equal(inverse, want_inverse.reshape(-1))


def test_compact_handles_are_stable_until_released_and_then_reused() -> None:
    index = CompactRowIndex(uses=False)
    a = index.handles(np.array([5, 2**40, 2**41 + 3]))
    assert len(set(a.tolist())) == 3 and index.live == 3
    assert np.array_equal(index.ids(a), [5, 2**40, 2**41 + 3])
    assert (index.last_occ[a] == -1).all() and (index.slot[a] == -1).all()
    index.slot[a[1]] = 7
    b = index.handles(np.array([6, 2**40]))  # a known row keeps its handle and fields
    assert b[1] == a[1] and index.slot[b[1]] == 7 and index.live == 4
    index.release(a[:1])  # row 5 leaves
    c = index.handles(np.array([5, 9]))
    assert index.live == 5  # 5 came back as a new entry (it had left), 9 is new
    assert (index.slot[c] == -1).all() and np.array_equal(index.ids(c), [5, 9])
    assert a[0] in c.tolist()  # the released handle was reused
    assert np.array_equal(index.handles(np.array([6, 2**40, 2**41 + 3])), [b[0], a[1], a[2]])


def test_compact_index_with_use_counts_keeps_every_row() -> None:
    index = CompactRowIndex(uses=True)
    h = index.handles(np.array([1, 2]))
    index.uses[h] = [3, 4]
    index.release(h)
    assert np.array_equal(index.handles(np.array([1, 2])), h) and index.uses[h].tolist() == [3, 4]


def test_index_argument() -> None:
    assert LookaheadOracle(100, 2, 10).index == "dense"
    assert LookaheadOracle(100, 2, 10, index="compact").index == "compact"
    with pytest.raises(ValueError, match="index must be 'auto', 'dense' or 'compact', got 'hash'"):
        LookaheadOracle(100, 2, 10, index="hash")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lookahead_module, "AUTO_COMPACT_ROWS", 100)
        assert LookaheadOracle(100, 2, 10).index == "dense"
        assert LookaheadOracle(101, 2, 10).index == "compact"
    assert LookaheadOracle(2**60, 2, 10).index == "compact"  # no per-row arrays: constructing is instant
    with pytest.raises(
        ValueError, match=r"batch 0: fused id 1152921504606846976 \(occurrence 1\) is outside"
    ):
        LookaheadOracle(2**60, 2, 10).push(np.array([3, 2**60]))


# ---------------------------------------------------------------------- dense == compact
@st.composite
def sparse_traces(draw: st.DrawFn) -> tuple[int, list[np.ndarray]]:
    """Ids spread over a 2**40-row space: a few dozen random ids (some near 0 and 2**40 - 1), reused."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    num_rows = 2**40
    pool = np.concatenate([rng.integers(0, num_rows, draw(st.integers(1, 30))), [0, num_rows - 1]])
    batches = [rng.choice(pool, int(rng.integers(0, 12))) for _ in range(draw(st.integers(1, 16)))]
    return num_rows, batches


def plans_and_live(
    num_rows: int, batches: list[np.ndarray], lookahead: int, capacity: int | None, tie_break: str, index: str
) -> tuple[list[CachePlan], list[int]]:
    """Every plan, and after each push the compact index's entry count minus the rows it must hold."""
    oracle = LookaheadOracle(num_rows, lookahead, capacity, tie_break=tie_break, index=index)
    plans: list[CachePlan] = []
    excess = []
    resident: set[int] = set()
    for t, batch in enumerate(batches):
        plan = oracle.push(batch)
        if plan is not None:
            plans.append(plan)
            resident = (resident - set(plan.evict_ids.tolist()) - evicted_clean(plans)) | set(
                plan.ids.tolist()
            )
        window = set(np.concatenate([np.zeros(0, np.int64), *batches[len(plans) : t + 1]]).tolist())
        if index == "compact" and tie_break == "recency":
            index_rows = oracle._rows
            assert isinstance(index_rows, CompactRowIndex)
            index_rows._drop_released()
            excess.append(index_rows.live - len(resident | window))
    plans.extend(oracle.finish())
    return plans, excess


def evicted_clean(plans: list[CachePlan]) -> set[int]:
    """Rows whose slot the last plan gave to a fetched row (clean victims included): the previous
    holders of its fetch slots."""
    if len(plans) < 2:
        return set()
    holder: dict[int, int] = {}
    for p in plans[:-1]:
        for x, s in zip(p.ids.tolist(), p.slots.tolist()):
            holder[s] = x
    return {holder[s] for s in plans[-1].fetch_slots.tolist() if s in holder}


def assert_same_plans(a: list[CachePlan], b: list[CachePlan]) -> None:
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        for name in CachePlan.__dataclass_fields__:
            va, vb = getattr(pa, name), getattr(pb, name)
            if isinstance(va, np.ndarray):
                assert va.dtype == vb.dtype and np.array_equal(va, vb), (pa.step, name)
            else:
                assert va == vb, (pa.step, name)


@SETTINGS
@given(
    st.one_of(traces(), crowded_traces()),
    st.integers(1, 6),
    st.one_of(st.none(), st.integers(0, 3)),
    TIE_BREAKS,
)
def test_compact_index_gives_the_dense_plans(
    trace: tuple[int, list[np.ndarray]], lookahead: int, extra: int | None, tie_break: str
) -> None:
    num_rows, batches = trace
    capacity = None if extra is None else max(1, pair_need(batches)) + extra
    dense, _ = plans_and_live(num_rows, batches, lookahead, capacity, tie_break, "dense")
    compact, excess = plans_and_live(num_rows, batches, lookahead, capacity, tie_break, "compact")
    assert_same_plans(dense, compact)
    assert all(e == 0 for e in excess), "the compact index holds exactly the resident and window rows"


@SETTINGS
@given(sparse_traces(), st.integers(1, 6), st.one_of(st.none(), st.integers(0, 3)), TIE_BREAKS)
def test_sparse_2_40_id_space(
    trace: tuple[int, list[np.ndarray]], lookahead: int, extra: int | None, tie_break: str
) -> None:
    """A 2**40-row space (no dense index possible): the compact plans replay correctly and equal the
    dense plans of the same stream with its ids renumbered densely in order (the policy only compares
    ids by order, and ties go to slots, recency and use counts)."""
    num_rows, batches = trace
    capacity = None if extra is None else max(1, pair_need(batches)) + extra
    compact, excess = plans_and_live(num_rows, batches, lookahead, capacity, tie_break, "compact")
    replay(compact, batches, lookahead, capacity)
    assert all(e == 0 for e in excess)
    ids = np.unique(np.concatenate([np.zeros(0, np.int64), *batches]))
    renumbered = [np.searchsorted(ids, b) for b in batches]
    dense, _ = plans_and_live(max(1, ids.size), renumbered, lookahead, capacity, tie_break, "dense")
    for p in dense:  # back to the sparse ids
        for name in ("ids", "fetch_ids", "evict_ids", "writeback_ids"):
            setattr(p, name, ids[getattr(p, name)])
    assert_same_plans(dense, compact)


def test_compact_memory_follows_the_cache_not_the_id_space() -> None:
    """A 2**40-row space, 400 ids per step mostly new: entries stay within cache + window (a small
    fraction of the rows the stream touches)."""
    rng = np.random.default_rng(0)
    hot = rng.integers(0, 2**40, 1_000_000)
    oracle = LookaheadOracle(2**40, 4, 1000)
    assert oracle.index == "compact"
    most = 0
    for _ in range(100):
        oracle.push(np.concatenate([hot[:50], rng.choice(hot, 350)]))  # 50 hot rows, 350 mostly new
        index = oracle._rows
        assert isinstance(index, CompactRowIndex)
        most = max(most, index.live)
    oracle.finish()
    assert 1000 < most <= 1000 + 5 * 400 and oracle.stats.fetched > 10 * most
    assert oracle._rows.nbytes < 1_000_000
