"""The lookahead oracle on hand-computed traces, its input checks, and the oracle benchmark's smoke run."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from lightning_bagpipe.bench import oracle as bench
from lightning_bagpipe.oracle import LookaheadOracle, min_capacity
from lightning_bagpipe.oracle import lookahead as lookahead_module
from lightning_bagpipe.oracle.plan import CachePlan


def trace(*steps: list[int]) -> list[np.ndarray]:
    return [np.array(s, dtype=np.int64) for s in steps]


def plans_of(num_rows: int, lookahead: int, capacity: int | None, *steps: list[int]) -> list[CachePlan]:
    return list(LookaheadOracle(num_rows, lookahead, capacity).run(trace(*steps)))


def pairs(ids: np.ndarray, slots: np.ndarray) -> list[tuple[int, int]]:
    return list(zip(ids.tolist(), slots.tolist()))


# ---------------------------------------------------------------------- hand-computed plans
def test_retention_and_write_back_with_lookahead_one() -> None:
    p0, p1, p2 = plans_of(10, 1, None, [1, 2, 2], [2, 3], [3])
    # step 0: both fetched into slots 0, 1; 1 is not used at step 1 -> written back after step 0
    assert pairs(p0.fetch_ids, p0.fetch_slots) == [(1, 0), (2, 1)]
    assert p0.inverse.tolist() == [0, 1, 1] and p0.occurrence_slots.tolist() == [0, 1, 1]
    assert pairs(p0.writeback_ids, p0.writeback_slots) == [(1, 0)]
    # step 1: 2 stayed dirty (a hit), 3 goes to the next dense slot; 2 is not used at step 2
    assert (p1.hits, p1.clean_hits) == (1, 0)
    assert pairs(p1.fetch_ids, p1.fetch_slots) == [(3, 2)]
    assert pairs(p1.writeback_ids, p1.writeback_slots) == [(2, 1)]
    # step 2: 3 is a dirty hit and is written back at the end of the stream
    assert p2.misses == 0 and pairs(p2.writeback_ids, p2.writeback_slots) == [(3, 2)]


def test_uses_further_apart_than_lookahead_hit_the_clean_copy() -> None:
    p0, _, p2 = plans_of(10, 1, None, [5], [6], [5])
    assert p0.writeback_ids.tolist() == [5]  # not used at step 1
    assert p2.misses == 0 and (p2.hits, p2.clean_hits) == (1, 1)
    assert p2.slots.tolist() == [0]
    # with L = 2 the row stays dirty instead and step 2 is a dirty hit
    q0, _, q2 = plans_of(10, 2, None, [5], [6], [5])
    assert q0.writeback_ids.size == 0 and (q2.hits, q2.clean_hits) == (1, 0)


def test_occurrences_keep_input_order() -> None:
    (p,) = plans_of(100, 3, None, [42, 7, 42, 99, 7, 7])
    assert p.ids.tolist() == [7, 42, 99]
    assert p.inverse.tolist() == [1, 0, 1, 2, 0, 0]
    assert p.ids[p.inverse].tolist() == [42, 7, 42, 99, 7, 7]


def test_clean_copies_are_reused_before_dirty_rows() -> None:
    # L=4, C=3. x=0 is used at 0 and 5 (gap > L: clean copy with a known next use once batch 5 is in);
    # y=2 at 2 and 6 (dirty in between). Step 3 reuses z=1's slot (clean, never used again).
    # Step 4 must choose between clean x (next use 5) and dirty y (next use 6): the clean copy goes,
    # although y is used later, and nothing is written back before the fetch.
    p = plans_of(10, 4, 3, [0], [1], [2], [3], [4], [0], [2])
    assert pairs(p[3].fetch_ids, p[3].fetch_slots) == [(3, 1)] and p[3].evict_ids.size == 0
    assert pairs(p[4].fetch_ids, p[4].fetch_slots) == [(4, 0)] and p[4].evict_ids.size == 0
    # step 5: x comes back into w=3's slot (clean, never used again; v=4 is in flight), y is a hit at 6
    assert pairs(p[5].fetch_ids, p[5].fetch_slots) == [(0, 1)]
    assert p[6].misses == 0 and p[6].hits == 1


def test_dirty_rows_evicted_by_farthest_next_use_and_clean_ties_by_lru() -> None:
    a, b, c, d = 10, 11, 12, 13
    p = plans_of(20, 4, 3, [a, b], [c], [d], [a], [b])
    # step 0: a (next use 3) and b (next use 4) stay dirty; step 1: c (clean after the step)
    assert p[0].writeback_ids.size == 0
    # step 2: c is in flight; of the dirty a and b, b is used later -> written back and evicted
    assert pairs(p[2].evict_ids, p[2].evict_slots) == [(b, 1)]
    assert pairs(p[2].fetch_ids, p[2].fetch_slots) == [(d, 1)]
    # step 4: a is in flight; c and d are clean and never used again: c was used longer ago
    assert pairs(p[4].fetch_ids, p[4].fetch_slots) == [(b, 2)] and p[4].evict_ids.size == 0


def test_frequency_tie_break_keeps_the_row_used_more_often() -> None:
    # C=3, L=1, every row clean after its step. At step 5 (row 4; row 3 in flight) the candidates are
    # row 0 (used at 0 and 2) and row 2 (used once, at 3), neither used again within the window.
    steps = trace([0], [1], [0], [2], [3], [4], [5], [0])
    recency = list(LookaheadOracle(6, 1, 3).run(steps))
    frequency = list(LookaheadOracle(6, 1, 3, tie_break="frequency").run(steps))
    assert pairs(recency[5].fetch_ids, recency[5].fetch_slots) == [(4, 0)]  # row 0 is older: it goes
    assert pairs(frequency[5].fetch_ids, frequency[5].fetch_slots) == [(4, 2)]  # row 2 is used less
    assert recency[7].misses == 1 and frequency[7].misses == 0
    with pytest.raises(ValueError, match="tie_break must be 'recency' or 'frequency', got 'lfu'"):
        LookaheadOracle(5, 1, 3, tie_break="lfu")


def test_rows_of_the_in_flight_step_are_never_victims() -> None:
    # C=2: step 1's row 1 is in flight at step 2, so 0 (dirty, used again at 3) must be evicted
    # although 1 is never used again
    p = plans_of(5, 3, 2, [0], [1], [2], [0])
    assert pairs(p[2].evict_ids, p[2].evict_slots) == [(0, 0)]
    assert pairs(p[2].fetch_ids, p[2].fetch_slots) == [(2, 0)]
    assert pairs(p[3].fetch_ids, p[3].fetch_slots) == [(0, 1)]


def test_push_returns_plan_of_step_n_minus_lookahead_and_empty_batches() -> None:
    oracle = LookaheadOracle(8, 2)
    assert oracle.push(np.array([1, 2])) is None
    assert oracle.push(np.zeros(0, dtype=np.int64)) is None
    plan = oracle.push(np.array([2], dtype=np.int32))
    assert plan is not None and plan.step == 0 and plan.writeback_ids.tolist() == [1]
    assert oracle.pending == 2
    rest = oracle.finish()
    assert [p.step for p in rest] == [1, 2]
    assert rest[0].ids.size == 0 and rest[0].inverse.size == 0
    assert rest[1].ids.dtype == np.int64 and rest[1].inverse.dtype == np.int64


def test_stats_add_up() -> None:
    batches = [np.random.default_rng(s).integers(0, 100, 20) for s in range(30)]
    oracle = LookaheadOracle(100, 5, 45)
    plans = list(oracle.run(batches))
    st = oracle.stats
    assert st.steps == 30 and st.occurrences == 30 * 20
    assert st.unique_ids == sum(p.ids.size for p in plans) == st.hits + st.fetched
    assert st.fetched == sum(p.misses for p in plans)
    assert st.clean_hits == sum(p.clean_hits for p in plans)
    assert st.written_back == sum(p.writeback_ids.size for p in plans)
    assert st.evicted == sum(p.evict_ids.size for p in plans)
    assert st.slots_used == 45 and 0 < st.as_dict()["hit_rate"] < 1


# ---------------------------------------------------------------------- errors
def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="lookahead must be >= 1, got 0"):
        LookaheadOracle(10, 0)
    with pytest.raises(ValueError, match="cache capacity must be >= 1"):
        LookaheadOracle(10, 2, 0)
    with pytest.raises(ValueError, match="num_rows must be >= 1"):
        LookaheadOracle(0, 2)
    with pytest.raises(ValueError, match=r"lookahead must be an integer, got 2\.5"):
        LookaheadOracle(10, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_rows must be at most 2\*\*63 \(fused ids are int64\)"):
        LookaheadOracle(2**63 + 1, 2)


def test_bad_batches_are_named() -> None:
    oracle = LookaheadOracle(20, 2)
    with pytest.raises(ValueError, match=r"batch 0: fused id 25 \(occurrence 2\) is outside \[0, 20\)"):
        oracle.push(np.array([3, 4, 25, 30]))
    with pytest.raises(ValueError, match=r"fused id -1 \(occurrence 1\)"):
        oracle.push(np.array([3, -1]))
    for dtype in (np.int8, np.int32):  # negative ids of every signed width are caught
        with pytest.raises(ValueError, match=r"fused id -2 \(occurrence 0\)"):
            oracle.push(np.array([-2, 3], dtype=dtype))
    # also where the narrow type's negative ids, read as unsigned, are below num_rows (-1 of int32 as
    # unsigned is 2**32 - 1: they were planned as rows, -1 even as the last row with the dense index)
    for rows, dtype, index in ((1000, np.int8, "dense"), (2**33, np.int32, "compact")):
        wide = LookaheadOracle(rows, 1, 10, index=index)
        with pytest.raises(ValueError, match=rf"fused id -1 \(occurrence 1\) is outside \[0, {rows}\)"):
            wide.push(np.array([5, -1], dtype=dtype))
    with pytest.raises(ValueError, match="must be integers, got dtype float64"):
        oracle.push(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"1-D array of fused ids, got shape \(2, 2\)"):
        oracle.push(np.array([[1, 2], [3, 4]]))
    oracle.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        oracle.push(np.array([1]))


def test_step_larger_than_cache_is_a_clear_error() -> None:
    with pytest.raises(
        ValueError, match="step 1 uses 3 distinct rows but the cache holds 2; raise the cache"
    ):
        plans_of(10, 1, 2, [1], [1, 2, 3])


def test_in_flight_rows_that_do_not_fit_are_a_clear_error() -> None:
    # step 1 needs 2 rows of its own and step 0's 2 rows at once, but C=3
    with pytest.raises(
        ValueError, match=r"step 1 needs 4 cache rows at once \(2 distinct rows of its own plus 2"
    ):
        plans_of(10, 1, 3, [1, 2], [3, 4])
    with pytest.raises(ValueError, match="raise the cache capacity or lower the batch size"):
        plans_of(10, 1, 3, [1, 2], [3, 4])


# step 0 alone fits no cache of 3; steps 2 and 3 together need 9 rows, the most of any two steps
TOO_BIG = ([1, 2, 3, 4], [5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15])


def test_a_step_that_does_not_fit_reports_the_rule_and_the_largest_need_read_so_far() -> None:
    assert min_capacity(trace(*TOO_BIG)) == 9
    with pytest.raises(ValueError) as err:
        plans_of(20, 3, 3, *TOO_BIG)  # step 0 is planned once step 3 is read: every pair is known
    message = str(err.value)
    assert message.startswith("step 0 uses 4 distinct rows but the cache holds 3; raise the cache")
    # the rule: two consecutive steps, not one; the figure is the two-step need (9), not step 0's (4)
    assert "Each step's distinct rows and the previous step's must fit in the cache together" in message
    assert "the steps read so far (up to step 3) need at least 9 rows (step 3 with step 2)" in message
    assert "later steps may need more" in message  # streaming: the oracle has not seen the end
    # the fixes, by name: the datamodule's cache_rows, None, and how to compute the minimum
    assert "Set cache_rows (the capacity of LookaheadOracle) to at least 9, or to None" in message
    assert "lightning_bagpipe.oracle.min_capacity(" in message and "lightning-bagpipe trace" in message
    # the figure is enough: 9 rows run the whole stream, 8 do not
    assert len(plans_of(20, 3, 9, *TOO_BIG)) == 4
    with pytest.raises(ValueError, match="needs 9 cache rows at once"):
        plans_of(20, 3, 8, *TOO_BIG)


def test_the_need_reported_is_a_lower_bound_until_the_stream_ends() -> None:
    # L = 1: when step 0 fails only step 1 is known (need 6); steps 2 and 3 need 9 but are unread
    with pytest.raises(ValueError) as err:
        plans_of(20, 1, 3, *TOO_BIG)
    assert "the steps read so far (up to step 1) need at least 6 rows (step 1 with step 0)" in str(err.value)
    assert "later steps may need more" in str(err.value)
    # a failure in finish(): the stream has ended, so the figure is the stream's minimum, said as such
    with pytest.raises(ValueError) as err:
        plans_of(20, 8, 7, [1], [2], [3, 4, 5, 6], [7, 8, 9, 10])
    message = str(err.value)
    assert message.startswith("step 3 needs 8 cache rows at once (4 distinct rows of its own plus 4")
    assert "the whole stream (steps 0 to 3) needs 8 rows (step 3 with step 2)" in message
    assert "at least 8, or to None" in message and "may need more" not in message


def test_the_in_flight_error_counts_the_previous_step_in_the_reported_need() -> None:
    # step 1 fails with the rows of step 0 in flight: 4 rows at once, and step 2 with step 1 needs 5
    with pytest.raises(ValueError) as err:
        plans_of(20, 2, 3, [1, 2], [3, 4], [5, 6, 7], [8])
    message = str(err.value)
    assert message.startswith("step 1 needs 4 cache rows at once (2 distinct rows of its own plus 2 rows")
    assert "need at least 5 rows (step 2 with step 1)" in message
    assert "cache_rows" in message and "or to None to let the cache grow" in message


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.uint32, np.uint64])
def test_any_integer_dtype_gives_the_int64_plans(dtype: type) -> None:
    rng = np.random.default_rng(3)
    batches = [rng.integers(0, 300, 40) for _ in range(12)]
    want = list(LookaheadOracle(300, 3, 120).run(batches))
    got = list(LookaheadOracle(300, 3, 120).run([b.astype(dtype) for b in batches]))
    for a, b in zip(want, got):
        for name in CachePlan.__dataclass_fields__:
            va, vb = getattr(a, name), getattr(b, name)
            assert (
                (va.dtype == vb.dtype and np.array_equal(va, vb)) if isinstance(va, np.ndarray) else va == vb
            )


def test_victim_class_search_from_any_start() -> None:
    """The class of the k-th victim (smallest c with k slots of class <= c) does not depend on where the
    galloping search starts (the previous step's answer)."""
    rng = np.random.default_rng(0)
    oracle = LookaheadOracle(10, 3, 8)
    for _ in range(400):
        top = int(rng.integers(0, 20))
        cls = rng.integers(0, top + 2, int(rng.integers(1, 60))).astype(np.int32)  # top + 1: protected
        cls[rng.random(cls.size) < 0.2] = -(2**31) + 100  # "never used again": any negative class is 0
        available = int(np.count_nonzero(cls <= top))
        if available == 0:
            continue
        k = int(rng.integers(1, available + 1))
        want = next(c for c in range(top + 1) if np.count_nonzero(np.maximum(cls, 0) <= c) >= k)
        oracle._last_cut = int(rng.integers(-2, top + 4))
        assert oracle._cut_class(cls, k, top) == want


@pytest.mark.parametrize("size", [1, 40, 1024, 1025, 5000])
@pytest.mark.parametrize("with_then", [False, True])
def test_smallest_selects_by_key_then_then_then_index(size: int, with_then: bool) -> None:
    """Victim ties are cut by (key, then, index), whether the selection sorts or partitions."""
    rng = np.random.default_rng(size)
    key = rng.integers(0, 6, size).astype(np.int32)  # many equal keys
    then = rng.integers(0, 3, size).astype(np.int32) if with_then else None
    for k in {1, max(1, size // 3), size}:
        got = lookahead_module._smallest(key, k, then)
        order = sorted(range(size), key=lambda i: (key[i], then[i] if then is not None else 0, i))
        assert sorted(got.tolist()) == sorted(order[:k])


# ---------------------------------------------------------------------- the benchmark
def bench_args(**over: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([])
    args.batches, args.batch_size, args.lookahead, args.scale, args.capacity = 12, 64, 4, 0.0005, "0.5"
    for k, v in over.items():
        setattr(args, k, v)
    return args


def test_bench_smoke_reports_every_figure() -> None:
    result = bench.run(bench_args())
    json.dumps(result)  # JSON-ready
    for key in ("ids_per_second", "batches_per_second", "oracle_seconds", "config", "oracle", "stream"):
        assert key in result
    fetched = result["fetched"]
    assert set(fetched) == {"oracle", "oracle_frequency_ties", "lru", "lfu", "belady", "distinct_rows"}
    assert set(result["ratios"]) >= {"oracle_over_lru", "oracle_over_lfu", "oracle_over_belady"}
    assert result["ratios"]["oracle_over_lru"] == fetched["oracle"] / fetched["lru"]
    assert fetched["distinct_rows"] <= fetched["belady"]
    assert fetched["belady"] <= min(fetched["oracle"], fetched["oracle_frequency_ties"])
    assert result["config"]["capacity_rows"] == round(0.5 * fetched["distinct_rows"])
    assert result["stream"]["occurrences"] == 12 * 64 * 26


def test_bench_zipf_stream_is_skewed_seeded_and_in_range() -> None:
    cards = [1000, 50, 3]
    a = bench.zipf_stream(cards, 4, 2000, 1.2, seed=7)
    b = bench.zipf_stream(cards, 4, 2000, 1.2, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    ids = np.concatenate(a).reshape(4, 3, 2000)  # batch, feature, sample (key-major)
    offsets = np.array([0, 1000, 1050])
    local = ids - offsets[None, :, None]
    assert local.min() >= 0 and (local.max(axis=(0, 2)) < np.array(cards)).all()
    # the hottest row of the 1000-row table: about 25% of its draws (discrete Zipf: 1 / H(1000, 1.2) = 23%)
    top = np.bincount(local[:, 0].reshape(-1)).max() / local[:, 0].size
    assert 0.21 < top < 0.29


def test_bench_capacity_flag() -> None:
    with pytest.raises(ValueError, match="need up to"):
        bench.run(bench_args(capacity="3"))
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        bench.run(bench_args(capacity="1.5"))
    with pytest.raises(ValueError, match="row count or a fraction"):
        bench.run(bench_args(capacity="lots"))
