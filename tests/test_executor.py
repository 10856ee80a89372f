"""The row executor's early fetches and its emulated remote-store latency; the loader's early-fetch rule."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest
import torch

import lightning_bagpipe as lb
from lightning_bagpipe import pipeline_threads
from lightning_bagpipe.data.loader import early_mask
from lightning_bagpipe.embedding.executor import RowExecutor
from lightning_bagpipe.pipeline_threads import set_pipeline_nice

DIM = 4


def _module() -> lb.CachedEmbedding:
    m = lb.CachedEmbedding([("a", 30), ("b", 20)], DIM, lb.optim.SGD(lr=0.1))
    m._activate(16)
    return m


def _ids(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


NONE = (_ids(), _ids())


def test_early_rows_are_copied_into_their_slots_by_the_step_that_needs_them() -> None:
    m = _module()
    ex = RowExecutor([m])
    try:
        # step 1 fetches 3 and 7 now and asks for step 3's rows 11 and 40 to be read early
        t1 = ex.submit_prestep(NONE, (_ids(3, 7), _ids(0, 1)), key=(0, 1), ahead=((0, 3), _ids(11, 40)))
        ex.wait(t1)
        assert t1.early_rows == 0
        # the store changes after the early read: only rows the plan does not mark early may change
        m.store.write(_ids(12), torch.full((1, m.width), 5.0))
        before = m.store.read(_ids(11, 40)).clone()
        fetch = (_ids(11, 12, 40), _ids(5, 6, 7))
        t3 = ex.submit_prestep(NONE, fetch, key=(0, 3), early=np.array([True, False, True]))
        ex.wait(t3)
        assert t3.early_rows == 2
        assert m._cache is not None
        assert torch.equal(m._cache[[5, 7]], before)
        assert torch.equal(m._cache[6], torch.full((m.width,), 5.0))
    finally:
        ex.close()


def test_rows_read_early_must_be_the_rows_the_plan_marks_early() -> None:
    m = _module()
    ex = RowExecutor([m])
    try:
        ex.wait(ex.submit_prestep(NONE, (_ids(1), _ids(0)), key=(0, 1), ahead=((0, 3), _ids(11, 40))))
        bad = ex.submit_prestep(NONE, (_ids(11, 40), _ids(5, 6)), key=(0, 3), early=np.array([True, False]))
        with pytest.raises(RuntimeError, match=r"fetched early for step \(0, 3\)"):
            ex.wait(bad)
    finally:
        ex.close(wait=False)


def test_a_step_without_rows_read_early_fetches_them_all() -> None:
    m = _module()
    ex = RowExecutor([m])
    try:  # e.g. the first steps after a resume: the plan marks rows early, nothing was read for them
        t = ex.submit_prestep(NONE, (_ids(11, 40), _ids(5, 6)), key=(0, 3), early=np.array([True, True]))
        ex.wait(t)
        assert t.early_rows == 0
        assert m._cache is not None
        assert torch.equal(m._cache[[5, 6]], m.store.read(_ids(11, 40)))
    finally:
        ex.close()


def test_emulated_latency_delays_arrival_not_issue() -> None:
    """A fetch's rows arrive ``delay`` after it was issued; requests do not wait for each other."""
    delay = 0.3
    m = _module()
    ex = RowExecutor([m], io_delay_s=delay)
    try:
        t0 = time.perf_counter()
        first = ex.submit_prestep(NONE, (_ids(1), _ids(0)), key=(0, 1), ahead=((0, 3), _ids(11)))
        second = ex.submit_prestep(NONE, (_ids(2), _ids(1)), key=(0, 2))
        waited = ex.wait(first)
        assert waited >= delay - 0.01 and first.ready_at >= t0 + delay
        ex.wait(second)
        # the second request was issued right after the first, not after the first's reply
        assert second.ready_at - first.ready_at < delay
        # step 3's early row was issued with step 1's job: it arrives with it, not a delay later
        third = ex.submit_prestep(NONE, (_ids(11), _ids(2)), key=(0, 3), early=np.array([True]))
        ex.wait(third)
        assert third.early_rows == 1 and third.ready_at < second.ready_at + delay
        # nothing moved, nothing delayed
        assert ex.submit_prestep(NONE, NONE, key=(0, 4)).ready_at == 0.0
        # a write-back's acknowledgement is what a drain waits for
        ex.submit_writeback((_ids(1), _ids(0)))
        t1 = time.perf_counter()
        ex.drain()
        assert time.perf_counter() - t1 >= delay - 0.05
    finally:
        ex.close()


def test_early_mask_holds_back_rows_evicted_in_between() -> None:
    fetch = _ids(4, 9, 12, 30)
    # rows 9 and 30 are evicted by steps in between: a store write may change them before their step
    got = early_mask(fetch, [_ids(30, 31), _ids(), _ids(9)])
    assert got.tolist() == [True, False, True, False]
    assert early_mask(fetch, []).all() and early_mask(_ids(), [_ids(1)]).size == 0


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities are a Linux feature")
def test_the_executor_keeps_full_priority_when_its_collectives_have_peers() -> None:
    def executor_nice(groups: object) -> int:
        ex = RowExecutor([_module()], groups)  # type: ignore[arg-type]
        seen: list[int] = []
        ex.submit_deferred(lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        ex.drain()
        ex.close()
        return seen[0] - os.getpriority(os.PRIO_PROCESS, 0)

    old = pipeline_threads.PIPELINE_NICE
    try:
        set_pipeline_nice(3)
        assert executor_nice(None) == min(3, 19 - os.getpriority(os.PRIO_PROCESS, 0))
        assert executor_nice(object()) == 0  # several ranks: a starved executor would stall its peers
    finally:
        set_pipeline_nice(old)
