"""How the pipeline's background threads share the CPU with the training step.

Two threads run beside every training step: the loader's oracle thread (reads the source, plans, builds
each batch's lookup) and the row executor (fetches and write-backs). On a machine without a GPU they
compete for the same cores as torch's intra-op (OpenMP) threads, and an OpenMP parallel region runs at the
pace of its slowest thread: a background thread that takes a core for a millisecond stalls the whole
region, and a background torch op that starts its own team of intra-op threads doubles the contention.
:func:`pipeline_thread` sets up a pipeline thread so that it costs the step as little as possible:

* its torch ops run on **one intra-op thread** (OpenMP's thread count is per thread, so the training
  thread keeps its own);
* on Linux it runs at the **lowest ``nice`` priority** (``nice`` + :data:`PIPELINE_NICE`, 19 by default,
  a per-thread setting there): the step's threads win a contended core and the pipeline fills the gaps.
  It cannot fall behind for long: when it does, the step blocks on it and leaves it the cores. (On two
  cores, ``bench train``'s bagpipe step took ~5% less time at +19 than at +10: at +10 the pipeline still
  took ~10% of a core the step's OpenMP team was waiting for. A CPU-bound job *outside* the process also
  wins against it; set ``BAGPIPE_PIPELINE_NICE=0`` on a machine shared with one.)

``BAGPIPE_PIPELINE_NICE`` (environment) or :func:`set_pipeline_nice` changes the priority offset; 0 keeps
the threads at the process's priority.

With several ranks the row executor keeps the process's priority: its store collectives (all-to-alls,
the barrier) pair with the other ranks' executors, and a peer's executor starved by that rank's busy
training thread would make every rank wait (measured: 7 to 18 ms of fetch wait per step on two CPU
processes at lower priority, under 5 ms without).

A pipeline thread left running after a failure (the executor may be blocked in a collective with a rank
that is gone) is given :data:`EXIT_JOIN_SECONDS` to end when the interpreter exits
(:func:`join_at_exit`): finalising the interpreter while such a thread is inside a C++ call aborts the
process ("terminate called without an active exception") instead of letting it exit.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import torch

__all__ = ["EXIT_JOIN_SECONDS", "PIPELINE_NICE", "join_at_exit", "pipeline_thread", "set_pipeline_nice"]

#: How long the interpreter's exit waits, in all, for pipeline threads left running (:func:`join_at_exit`).
EXIT_JOIN_SECONDS = 5.0
_LEFT_RUNNING: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def join_at_exit(thread: threading.Thread) -> None:
    """Let the interpreter's exit wait (up to :data:`EXIT_JOIN_SECONDS` in all) for daemon ``thread``, which
    was left running: a collective it is blocked in fails once the other ranks are gone, and the thread
    then ends on its own, where finalising the interpreter under it would abort the process."""
    _LEFT_RUNNING.add(thread)


@atexit.register
def _join_left_running() -> None:
    deadline = time.monotonic() + EXIT_JOIN_SECONDS
    for thread in list(_LEFT_RUNNING):
        thread.join(max(0.0, deadline - time.monotonic()))


#: How much lower than the process's priority the pipeline threads run (Linux ``nice`` increment).
PIPELINE_NICE: int = int(os.environ.get("BAGPIPE_PIPELINE_NICE", "19"))


def set_pipeline_nice(increment: int) -> None:
    """Set the ``nice`` increment of pipeline threads started from now on (0 to 19; 0: no change)."""
    global PIPELINE_NICE
    if not 0 <= int(increment) <= 19:
        raise ValueError(f"pipeline nice increment must be in [0, 19], got {increment}")
    PIPELINE_NICE = int(increment)


def _lower_priority(increment: int) -> None:
    if increment <= 0 or not sys.platform.startswith("linux"):
        return  # elsewhere PRIO_PROCESS takes a process id, not a thread's
    tid = threading.get_native_id()
    with suppress(OSError):  # a sandbox may forbid it; the thread then keeps the process's priority
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))


@contextmanager
def pipeline_thread(process_threads: int, nice: int | None = None) -> Iterator[None]:
    """Run the body of a pipeline thread on one intra-op thread, at lower priority (see module docs).

    ``nice`` overrides :data:`PIPELINE_NICE` for this thread (``0``: the process's priority).

    ``process_threads`` is ``torch.get_num_threads()`` as read by the thread that *started* this one: torch
    keeps a process-wide default that ``set_num_threads`` also changes, and it is restored on exit so
    threads started later get the user's setting, unless the user set another one meanwhile (then the
    default is no longer the 1 set here, and theirs stays).
    """
    torch.set_num_threads(1)
    _lower_priority(PIPELINE_NICE if nice is None else nice)
    try:
        yield
    finally:
        if torch.get_num_threads() == 1:
            torch.set_num_threads(max(1, process_threads))
