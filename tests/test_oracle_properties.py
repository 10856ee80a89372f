"""Property tests of the lookahead oracle: replay its plans on a plain Python cache model and check them.

The model executes the plans in the order the executor does: step ``t``'s evictions and fetches run
while step ``t - 1`` computes, i.e. *before* step ``t - 1``'s update and end-of-use write-backs. Rows
carry version numbers (every use bumps the row's version in the cache), so a stale read, a lost update
or a write-back of the wrong thing shows up as a version mismatch.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_bagpipe.bench.oracle import zipf_stream
from lightning_bagpipe.data.criteo_shape import CRITEO_KAGGLE_CARDINALITIES
from lightning_bagpipe.oracle import lookahead as lookahead_module
from lightning_bagpipe.oracle.lookahead import LookaheadOracle
from lightning_bagpipe.oracle.plan import CachePlan
from lightning_bagpipe.oracle.simulators import belady_fetches

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------- traces
@st.composite
def traces(draw: st.DrawFn) -> tuple[int, list[np.ndarray]]:
    """(num_rows, batches): uniform ids drawn by hypothesis, or Zipf-skewed ids from a seeded generator."""
    num_rows = draw(st.integers(1, 24))
    n_steps = draw(st.integers(1, 16))
    if draw(st.booleans()):
        batches = [
            np.array(draw(st.lists(st.integers(0, num_rows - 1), max_size=8)), dtype=np.int64)
            for _ in range(n_steps)
        ]
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        skew = draw(st.sampled_from([1.2, 1.5, 2.0]))
        sizes = rng.integers(0, 10, n_steps)
        batches = [((rng.zipf(skew, n) - 1) % num_rows).astype(np.int64) for n in sizes]
    return num_rows, batches


@st.composite
def crowded_traces(draw: st.DrawFn) -> tuple[int, list[np.ndarray]]:
    """k distinct ids per step out of a pool a few times k: with the tightest cache and L >= 2 these
    force dirty evictions as well as clean-copy reuse."""
    k = draw(st.integers(3, 6))
    num_rows = draw(st.integers(k + 2, 4 * k))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return num_rows, [rng.choice(num_rows, k, replace=False) for _ in range(draw(st.integers(6, 16)))]


def pair_need(batches: list[np.ndarray]) -> int:
    """Max over steps of the distinct rows of step t and t - 1 together (what must fit at once)."""
    sets = [set(b.tolist()) for b in batches]
    return max(len(s | (sets[t - 1] if t else set())) for t, s in enumerate(sets))


def run_oracle(
    num_rows: int, batches: list[np.ndarray], lookahead: int, capacity: int | None, tie_break: str = "recency"
) -> list[CachePlan]:
    oracle = LookaheadOracle(num_rows, lookahead, capacity, tie_break=tie_break)
    plans = list(oracle.run(batches))
    assert [p.step for p in plans] == list(range(len(batches)))
    assert oracle.stats.fetched == sum(p.misses for p in plans)
    return plans


# ---------------------------------------------------------------------- the replay model
def replay(plans: list[CachePlan], batches: list[np.ndarray], lookahead: int, capacity: int | None) -> None:
    """Execute ``plans`` on a model cache and store and assert every guarantee of the oracle."""
    cache: dict[int, int] = {}  # slot -> id held
    where: dict[int, int] = {}  # id -> slot
    cache_ver: dict[int, int] = {}  # slot -> version of the row it holds
    store_ver: defaultdict[int, int] = defaultdict(int)
    true_ver: defaultdict[int, int] = defaultdict(int)  # version after every update so far
    dirty: set[int] = set()  # ids whose cached version is newer than the store's
    seen: set[int] = set()

    sets = [set(b.tolist()) for b in batches]

    def used(t: int) -> set[int]:
        return sets[t] if 0 <= t < len(batches) else set()

    def used_again_within_lookahead(t: int, x: int) -> bool:
        return any(x in sets[s] for s in range(t + 1, min(len(batches), t + lookahead + 1)))

    def update_and_write_back(p: CachePlan) -> None:
        """Step p's optimizer update, then its end-of-use write-backs (after the update)."""
        for x, s in zip(p.ids.tolist(), p.slots.tolist()):
            assert cache.get(s) == x, f"step {p.step}: slot {s} lost row {x} before its update"
            cache_ver[s] += 1
            true_ver[x] += 1
            dirty.add(x)
        for x, s in zip(p.writeback_ids.tolist(), p.writeback_slots.tolist()):
            assert cache.get(s) == x and x in dirty
            store_ver[x] = cache_ver[s]
            dirty.discard(x)

    for t, (p, batch) in enumerate(zip(plans, batches)):
        ids = p.ids.tolist()
        # plan format
        assert np.array_equal(p.ids, np.unique(batch))
        assert np.array_equal(p.ids[p.inverse], batch), "inverse must follow the input order"
        assert p.slots.shape == p.ids.shape and len(set(p.slots.tolist())) == len(ids)
        for arr in (p.ids, p.slots, p.inverse, p.fetch_ids, p.fetch_slots, p.evict_ids, p.evict_slots):
            assert arr.dtype == np.int64
        if capacity is not None:
            assert all(0 <= s < capacity for s in p.slots.tolist())
        busy = used(t) | used(t - 1)  # step t and the in-flight step t - 1

        # 1. capacity evictions (dirty rows, written back before the fetch)
        for x, s in zip(p.evict_ids.tolist(), p.evict_slots.tolist()):
            assert x not in busy, f"step {t} evicts row {x} that step {t} or {t - 1} uses"
            assert cache.get(s) == x and x in dirty, f"step {t} evicts row {x} that is not dirty in slot {s}"
            store_ver[x] = cache_ver[s]
            dirty.discard(x)
            del cache[s], where[x], cache_ver[s]
        # 2. fetches, exactly of the step's rows that are not resident
        assert set(p.fetch_ids.tolist()) == {x for x in ids if x not in where}
        if capacity is None:  # slots are handed out densely from 0
            assert p.fetch_slots.tolist() == list(range(len(where), len(where) + p.misses))
        for x, s in zip(p.fetch_ids.tolist(), p.fetch_slots.tolist()):
            assert x not in used(t - 1), f"step {t} fetches row {x} that in-flight step {t - 1} updates"
            assert store_ver[x] == true_ver[x], f"step {t} fetches a stale row {x}"
            old = cache.get(s)
            if old is not None:  # a clean copy gives its slot up
                assert old not in dirty, f"step {t} overwrites dirty row {old} in slot {s}"
                assert old not in busy, f"step {t} overwrites row {old} that step {t} or {t - 1} uses"
                del where[old]
            cache[s], where[x], cache_ver[s] = x, s, store_ver[x]
        # step t - 1 finishes (its update and write-backs were queued after step t's fetches)
        if t > 0:
            update_and_write_back(plans[t - 1])
        # 3. step t runs: every row in its slot, at its latest version
        for x, s in zip(ids, p.slots.tolist()):
            assert where.get(x) == s and cache[s] == x
            assert cache_ver[s] == true_ver[x], f"step {t} reads a stale row {x}"
        fetched = set(p.fetch_ids.tolist())
        assert p.hits == len(ids) - len(fetched)
        assert p.clean_hits == sum(1 for x in ids if x not in fetched and x not in dirty)
        # 4. end-of-use write-backs: exactly the rows not used again within L steps
        expect_wb = {x for x in ids if not used_again_within_lookahead(t, x)}
        assert set(p.writeback_ids.tolist()) == expect_wb
        assert np.array_equal(p.writeback_slots, p.slots[np.isin(p.ids, p.writeback_ids)])
        seen |= set(ids)
    if plans:
        update_and_write_back(plans[-1])
    assert not dirty, f"rows left dirty at the end of the stream: {sorted(dirty)}"
    assert {x: store_ver[x] for x in seen} == {x: true_ver[x] for x in seen}


# ---------------------------------------------------------------------- properties
TIE_BREAKS = st.sampled_from(["recency", "frequency"])


@SETTINGS
@given(traces(), st.integers(1, 6), st.one_of(st.none(), st.integers(0, 6)), TIE_BREAKS)
def test_plans_replay_correctly(
    trace: tuple[int, list[np.ndarray]], lookahead: int, extra: int | None, tie_break: str
) -> None:
    num_rows, batches = trace
    capacity = None if extra is None else max(1, pair_need(batches)) + extra
    replay(run_oracle(num_rows, batches, lookahead, capacity, tie_break), batches, lookahead, capacity)


@SETTINGS
@given(st.one_of(traces(), crowded_traces()), st.integers(2, 6), TIE_BREAKS)
def test_tight_capacity_replays_correctly(
    trace: tuple[int, list[np.ndarray]], lookahead: int, tie_break: str
) -> None:
    """The smallest feasible cache: clean reuse and dirty evictions on most crowded traces."""
    num_rows, batches = trace
    capacity = max(1, pair_need(batches))
    replay(run_oracle(num_rows, batches, lookahead, capacity, tie_break), batches, lookahead, capacity)


@pytest.mark.parametrize("seed", range(6))
def test_replay_covers_dirty_evictions(seed: int) -> None:
    """Seeded crowded traces that do evict dirty rows and reuse clean copies, replayed."""
    rng = np.random.default_rng(seed)
    batches = [rng.choice(16, 5, replace=False) for _ in range(24)]
    capacity = pair_need(batches)
    oracle = LookaheadOracle(16, 4, capacity)
    plans = list(oracle.run(batches))
    assert oracle.stats.evicted > 0 and oracle.stats.clean_reused > 0
    replay(plans, batches, 4, capacity)


@SETTINGS
@given(traces(), st.integers(1, 6))
def test_unbounded_cache_fetches_each_row_once(trace: tuple[int, list[np.ndarray]], lookahead: int) -> None:
    num_rows, batches = trace
    plans = run_oracle(num_rows, batches, lookahead, None)
    distinct = set(np.concatenate(batches).tolist())
    assert sum(p.misses for p in plans) == len(distinct)
    assert sum(p.evict_ids.size for p in plans) == 0


@SETTINGS
@given(st.one_of(traces(), crowded_traces()), st.integers(0, 4), TIE_BREAKS)
def test_full_lookahead_matches_offline_belady(
    trace: tuple[int, list[np.ndarray]], extra: int, tie_break: str
) -> None:
    num_rows, batches = trace
    capacity = max(1, pair_need(batches)) + extra
    plans = run_oracle(num_rows, batches, len(batches), capacity, tie_break)
    assert sum(p.misses for p in plans) == belady_fetches(batches, capacity, protect_previous=True)


@SETTINGS
@given(traces(), st.integers(1, 6), st.one_of(st.none(), st.integers(0, 3)), TIE_BREAKS)
def test_same_stream_gives_identical_plans(
    trace: tuple[int, list[np.ndarray]], lookahead: int, extra: int | None, tie_break: str
) -> None:
    num_rows, batches = trace
    capacity = None if extra is None else max(1, pair_need(batches)) + extra
    first = run_oracle(num_rows, batches, lookahead, capacity, tie_break)
    second = run_oracle(num_rows, [b.copy() for b in batches], lookahead, capacity, tie_break)
    for a, b in zip(first, second):
        for name in CachePlan.__dataclass_fields__:
            va, vb = getattr(a, name), getattr(b, name)
            assert np.array_equal(va, vb) if isinstance(va, np.ndarray) else va == vb, name


@SETTINGS
@given(traces(), st.integers(1, 6))
def test_capacity_below_need_raises(trace: tuple[int, list[np.ndarray]], lookahead: int) -> None:
    num_rows, batches = trace
    need = pair_need(batches)
    if need < 2:
        return
    # the first step that does not fit needs exactly `need` rows (the most any step needs)
    with pytest.raises(ValueError, match=rf"(uses {need} distinct|needs {need} cache) rows") as err:
        run_oracle(num_rows, batches, lookahead, need - 1)
    assert f"but the cache holds {need - 1}; raise the cache capacity or lower the batch size" in str(
        err.value
    )


@SETTINGS
@given(traces(), st.integers(1, 6))
def test_plan_of_step_n_minus_l_after_push_n(trace: tuple[int, list[np.ndarray]], lookahead: int) -> None:
    num_rows, batches = trace
    oracle = LookaheadOracle(num_rows, lookahead)
    for n, batch in enumerate(batches):
        plan = oracle.push(batch)
        if n < lookahead:
            assert plan is None
        else:
            assert plan is not None and plan.step == n - lookahead
    rest = oracle.finish()
    assert [p.step for p in rest] == list(range(max(0, len(batches) - lookahead), len(batches)))


def test_criteo_shaped_stream_replays_correctly() -> None:
    """26 one-hot features with Criteo's cardinalities / 20000, Zipf ids: every event kind happens."""
    cards = [max(2, n // 20000) for n in CRITEO_KAGGLE_CARDINALITIES]
    stream = zipf_stream(cards, 40, 32, 1.1, seed=3)
    capacity = pair_need(stream) + 40
    oracle = LookaheadOracle(sum(cards), 6, capacity)
    plans = list(oracle.run(stream))
    assert oracle.stats.evicted > 0 and oracle.stats.clean_reused > 0 and oracle.stats.clean_hits > 0
    replay(plans, stream, 6, capacity)


# ---------------------------------------------------------------------- the victim policy, step by step
def reference_plans(
    batches: list[np.ndarray], lookahead: int, capacity: int, by_frequency: bool = False
) -> list[dict[str, object]]:
    """The documented policy written as plainly as possible: per step the fetched rows and their slots,
    the evicted dirty rows and their slots, hits and clean hits.

    Misses (ascending ids) take never-used slots first (ascending), then victims' slots (ascending).
    Victims are the unprotected resident rows sorted by (dirty, farthest next use among the batches
    pushed so far, [by_frequency: fewest steps that used the row so far,] least recently used, lowest slot).
    """
    n = len(batches)
    sets = [set(b.tolist()) for b in batches]
    slot: dict[int, int] = {}  # resident id -> slot
    dirty: dict[int, bool] = {}
    last: dict[int, int] = {}
    uses: defaultdict[int, int] = defaultdict(int)
    fresh = 0  # slots [fresh, capacity) were never used
    out: list[dict[str, object]] = []
    for t in range(n):
        known_until = min(n - 1, t + lookahead)  # batches pushed when step t is planned

        def next_use(x: int, t: int = t, known_until: int = known_until) -> int:
            return next((s for s in range(t + 1, known_until + 1) if x in sets[s]), 10**9)

        hits = [x for x in sets[t] if x in slot]
        misses = sorted(x for x in sets[t] if x not in slot)
        take = min(len(misses), capacity - fresh)
        free = list(range(fresh, fresh + take))
        fresh += take
        evicted: list[tuple[int, int]] = []
        if len(misses) > take:
            busy = sets[t] | (sets[t - 1] if t else set())
            cands = sorted(
                (x for x in slot if x not in busy),
                key=lambda x: (dirty[x], -next_use(x), uses[x] if by_frequency else 0, last[x], slot[x]),
            )
            victims = cands[: len(misses) - take]
            evicted = sorted((x, slot[x]) for x in victims if dirty[x])
            free += sorted(slot[x] for x in victims)
            for x in victims:
                del slot[x], dirty[x], last[x]
        out.append(
            {
                "fetch": list(zip(misses, free)),
                "evict": evicted,
                "hits": len(hits),
                "clean_hits": sum(1 for x in hits if not dirty[x]),
            }
        )
        for x, s in zip(misses, free):
            slot[x] = s
        for x in sets[t]:
            dirty[x] = next_use(x) <= t + lookahead
            last[x] = t
            uses[x] += 1
    return out


@SETTINGS
@given(st.one_of(traces(), crowded_traces()), st.integers(1, 6), st.integers(0, 3), TIE_BREAKS)
def test_victims_follow_the_documented_policy(
    trace: tuple[int, list[np.ndarray]], lookahead: int, extra: int, tie_break: str
) -> None:
    num_rows, batches = trace
    capacity = max(1, pair_need(batches)) + extra
    got = [
        {
            "fetch": list(zip(p.fetch_ids.tolist(), p.fetch_slots.tolist())),
            "evict": list(zip(p.evict_ids.tolist(), p.evict_slots.tolist())),
            "hits": p.hits,
            "clean_hits": p.clean_hits,
        }
        for p in LookaheadOracle(num_rows, lookahead, capacity, tie_break=tie_break).run(batches)
    ]
    assert got == reference_plans(batches, lookahead, capacity, by_frequency=tie_break == "frequency")


@SETTINGS
@given(st.one_of(traces(), crowded_traces()), st.integers(1, 6), st.one_of(st.none(), st.integers(0, 3)))
def test_wrapped_occurrence_indices_give_the_same_plans(
    trace: tuple[int, list[np.ndarray]], lookahead: int, extra: int | None
) -> None:
    """Latest-occurrence indices are stored modulo 2**31. With the smallest power-of-two modulus that
    still exceeds the largest window of the trace they wrap often, and the plans must not change."""
    num_rows, batches = trace
    capacity = None if extra is None else max(1, pair_need(batches)) + extra
    want = run_oracle(num_rows, batches, lookahead, capacity)
    sizes = [np.unique(b).size for b in batches]
    window = max(sum(sizes[t : t + lookahead + 1]) for t in range(len(sizes)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lookahead_module, "_MASK", (1 << window.bit_length()) - 1)
        got = run_oracle(num_rows, batches, lookahead, capacity)
    for a, b in zip(want, got):
        assert np.array_equal(a.fetch_ids, b.fetch_ids) and np.array_equal(a.slots, b.slots)
        assert np.array_equal(a.evict_ids, b.evict_ids) and np.array_equal(a.writeback_ids, b.writeback_ids)
