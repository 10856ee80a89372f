"""Pipeline threads run torch on one intra-op thread at lower priority, and leave the process's setting."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

from lightning_bagpipe import pipeline_threads
from lightning_bagpipe.pipeline_threads import pipeline_thread, set_pipeline_nice


def _observe(process_threads: int) -> dict[str, int]:
    seen: dict[str, int] = {}

    def body() -> None:
        before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) if sys.platform == "linux" else 0
        with pipeline_thread(process_threads):
            seen["threads"] = torch.get_num_threads()
            if sys.platform == "linux":
                seen["nice_delta"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) - before

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return seen


def test_one_intra_op_thread_inside_and_the_process_setting_kept() -> None:
    torch.set_num_threads(2)
    seen = _observe(torch.get_num_threads())
    assert seen["threads"] == 1
    assert torch.get_num_threads() == 2  # the training thread keeps its own count
    later: list[int] = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [2]  # threads started afterwards get the process default back


def test_a_thread_count_the_user_sets_meanwhile_is_kept() -> None:
    # (the pipeline thread restored the count it read at its start: torch.set_num_threads(1) in the
    # middle of a fit was undone for every thread started later)
    torch.set_num_threads(2)
    inside, done = threading.Event(), threading.Event()

    def body() -> None:
        with pipeline_thread(2):
            inside.set()
            done.wait(timeout=10)

    t = threading.Thread(target=body)
    t.start()
    inside.wait(timeout=10)
    try:
        torch.set_num_threads(3)  # the user's choice, while a pipeline thread runs
    finally:
        done.set()
        t.join()
    later: list[int] = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    try:
        assert later == [3]
    finally:
        torch.set_num_threads(2)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities are a Linux feature")
def test_priority_is_lowered_by_the_configured_increment() -> None:
    old = pipeline_threads.PIPELINE_NICE
    try:
        set_pipeline_nice(3)
        start = os.getpriority(os.PRIO_PROCESS, 0)
        assert _observe(1)["nice_delta"] == min(3, 19 - start)
        set_pipeline_nice(0)
        assert _observe(1)["nice_delta"] == 0
    finally:
        set_pipeline_nice(old)
    with pytest.raises(ValueError, match="nice increment"):
        set_pipeline_nice(25)


@pytest.mark.parametrize(("registered", "finished"), [(True, True), (False, False)])
def test_the_exit_waits_for_a_thread_left_running(tmp_path, registered: bool, finished: bool) -> None:
    # a daemon thread still busy when the interpreter exits (a collective with a gone rank): registered,
    # the exit lets it finish; not registered, the process exits under it
    import subprocess

    marker = tmp_path / "finished"
    script = f"""
import threading, time
from lightning_bagpipe.pipeline_threads import join_at_exit

def busy():
    time.sleep(1.0)
    open({str(marker)!r}, "w").close()

t = threading.Thread(target=busy, daemon=True)
t.start()
if {registered}:
    join_at_exit(t)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60, env=env)
    assert marker.exists() == finished
