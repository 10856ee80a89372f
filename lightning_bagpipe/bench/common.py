"""Helpers shared by the benchmark suites: fair ordering, medians, step clocks, memory and machine facts.

Machines are noisy, so every suite repeats its contenders, *interleaves* them (repeat ``r`` starts with a
different contender, so none always runs first on a cold machine or last on a hot one) and reports
medians. Memory figures come from ``/proc/self/status`` (no psutil): ``VmHWM`` is the peak resident set
of the process; ``RssAnon`` and ``RssFile`` split the current resident set into anonymous memory and
pages of mapped files (a memory-mapped store's pages, which the kernel can drop under pressure).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_bagpipe import pipeline_threads

__all__ = [
    "RssSampler",
    "StepClock",
    "disk_usage",
    "interleaved",
    "loss_trend",
    "machine_info",
    "median_figures",
    "parse_int_list",
    "proc_status_bytes",
    "require_matplotlib",
    "save_figure",
    "suite_config",
]


def interleaved(contenders: Sequence[str], repeats: int) -> Iterator[tuple[int, str]]:
    """``(repeat, contender)`` pairs: every contender once per repeat, each repeat rotated by one.

    >>> list(interleaved(["a", "b", "c"], 2))
    [(0, 'a'), (0, 'b'), (0, 'c'), (1, 'b'), (1, 'c'), (1, 'a')]
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    n = len(contenders)
    for r in range(repeats):
        for i in range(n):
            yield r, contenders[(r + i) % n]


def median_figures(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The median of every numeric figure over ``runs`` (non-numeric values: the first run's).

    Adds ``runs`` (how many) and, for ``samples_per_second`` when present, its ``min``/``max`` over the runs
    as ``samples_per_second_min``/``_max``, so the spread is visible next to the median.
    """
    if not runs:
        raise ValueError("no runs to summarize")
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [r.get(key) for r in runs]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = statistics.median(values)  # type: ignore[type-var]
        elif all(isinstance(v, bool) for v in values):
            out[key] = all(values)
        else:
            out[key] = first
    sps = [r["samples_per_second"] for r in runs if isinstance(r.get("samples_per_second"), (int, float))]
    if sps:
        out["samples_per_second_min"] = min(sps)
        out["samples_per_second_max"] = max(sps)
    out["runs"] = len(runs)
    return out


def worker_failure(what: str, returncode: int, stderr: str) -> Exception:
    """The error to raise for a worker process that failed: a ``ValueError`` carrying the worker's own
    message when it ended on one (a flag or data the user can fix: the command reports it in one line),
    else a ``RuntimeError`` with the end of its stderr."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    for kind in ("ValueError: ", "FileNotFoundError: ", "FileExistsError: "):
        if last.startswith(kind):
            return ValueError(f"{what}: {last.removeprefix(kind)}")
    return RuntimeError(f"{what} (exit {returncode}):\n{stderr[-3000:]}")


def parse_int_list(text: str, flag: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]``; a ValueError naming ``flag`` and the bad item otherwise."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"{flag}: {item!r} in {text!r} is not an integer") from None
        if value < 1:
            raise ValueError(f"{flag}: values must be >= 1, got {value} in {text!r}")
        out.append(value)
    if not out:
        raise ValueError(f"{flag}: expected a comma-separated list of integers, got {text!r}")
    return out


def suite_config(args: argparse.Namespace) -> dict[str, Any]:
    """The suite's flags as plain JSON values (without the CLI's own bookkeeping attributes)."""
    skip = {"json", "_run", "command", "suite", "worker"}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in skip}


# ---------------------------------------------------------------------- step clock
class StepClock:
    """Wall-clock time and loss of every training step.

    A step's time runs from the end of the previous step to the end of this one, so it includes waiting
    for the batch (the loader) and everything the strategy does; the first ``warmup`` steps are excluded.
    ``samples_per_second`` is the timed samples over the timed wall time; ``cpu_ms_per_step`` the
    process's CPU time (all threads) per timed step, which shows work done off the critical path.
    Framework-free: a Lightning callback calls :meth:`begin` and :meth:`step_end` (``bench.train``'s
    ``_Clock``).
    """

    def __init__(self, warmup: int, batch_size: int) -> None:
        self.warmup = int(warmup)
        self.batch_size = int(batch_size)
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.waits: list[float] = []
        self.cpu: list[float] = []
        self.start = 0.0

    def begin(self) -> None:
        self.start = time.perf_counter()

    def step_end(self, loss: float | None, fetch_wait_ms: float | None = None) -> None:
        """Record the end of a step, its loss and (bagpipe) how long it waited for its rows."""
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if loss is not None:
            self.losses.append(float(loss))
        if fetch_wait_ms is not None:
            self.waits.append(float(fetch_wait_ms))

    @property
    def timed_steps(self) -> int:
        return max(0, len(self.ends) - self.warmup)

    def figures(self) -> dict[str, Any]:
        """``samples_per_second``, ``median_step_ms``, ``timed_steps``, ``warmup_seconds`` (from
        :meth:`begin` to the end of the warm-up), the loss at start and end and, when recorded, the mean
        fetch wait of the timed steps."""
        if self.timed_steps < 1 or self.warmup < 1:
            raise ValueError(
                f"need at least one warm-up step and one timed step, got {len(self.ends)} steps with "
                f"warmup={self.warmup}"
            )
        t0 = self.ends[self.warmup - 1]
        wall = self.ends[-1] - t0
        steps = [b - a for a, b in zip(self.ends[self.warmup - 1 : -1], self.ends[self.warmup :])]
        out: dict[str, Any] = {
            "samples_per_second": self.timed_steps * self.batch_size / wall,
            "median_step_ms": 1000.0 * statistics.median(steps),
            "timed_steps": self.timed_steps,
            "timed_seconds": wall,
            "warmup_seconds": t0 - self.start if self.start else None,
            # CPU time of every thread of the process (training, loader, oracle, executor) per timed step
            "cpu_ms_per_step": 1000.0 * (self.cpu[-1] - self.cpu[self.warmup - 1]) / self.timed_steps,
            **loss_trend(self.losses),
        }
        if len(self.waits) == len(self.ends):
            out["fetch_wait_ms_per_timed_step"] = statistics.fmean(self.waits[self.warmup :])
        return out


def loss_trend(losses: Sequence[float]) -> dict[str, Any]:
    """Mean loss of the first and last fifth of the steps (at least one step each) and whether it fell."""
    if not losses:
        return {"loss_first": None, "loss_last": None, "loss_decreased": False}
    k = max(1, len(losses) // 5)
    first = statistics.fmean(losses[:k])
    last = statistics.fmean(losses[-k:])
    return {"loss_first": first, "loss_last": last, "loss_decreased": bool(last < first)}


# ---------------------------------------------------------------------- memory and disk
def proc_status_bytes(pid: int | str = "self") -> dict[str, int]:
    """``VmHWM``, ``VmRSS``, ``RssAnon``, ``RssFile`` and ``RssShmem`` of a process, in bytes (0 if absent).

    Linux only: read from ``/proc/PID/status`` (values there are in kB).
    """
    keys = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
    out = dict.fromkeys(keys, 0)
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in out:
            out[name] = int(rest.split()[0]) * 1024
    return out


class RssSampler:
    """Samples this process's ``RssAnon``/``RssFile`` in a thread; keeps the peaks (``VmHWM`` only has the
    peak of their sum). Use as a context manager; ``peaks()`` also works while running."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = float(interval)
        self.peak_anon = 0
        self.peak_file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        s = proc_status_bytes()
        self.peak_anon = max(self.peak_anon, s["RssAnon"])
        self.peak_file = max(self.peak_file, s["RssFile"] + s["RssShmem"])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def peaks(self) -> dict[str, int]:
        return {"peak_rss_anon_bytes": self.peak_anon, "peak_rss_file_bytes": self.peak_file}


def disk_usage(*paths: str | os.PathLike[str]) -> dict[str, int]:
    """The apparent size of the files that exist among ``paths`` and the bytes actually allocated on disk
    (sparse files allocate less)."""
    stats = [os.stat(p) for p in paths if os.path.exists(p)]
    return {
        "apparent_bytes": sum(int(st.st_size) for st in stats),
        "allocated_bytes": sum(int(st.st_blocks) * 512 for st in stats),
    }


# ---------------------------------------------------------------------- machine
_OPENMP_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def machine_info() -> dict[str, Any]:
    """CPU model and count, memory, OS and library versions: enough to tell two machines' figures apart."""
    import numpy as np
    import torch

    cpu = platform.processor() or platform.machine()
    mem = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        # other work on the machine while the suite ran (1, 5 and 15 minute run-queue averages)
        "load_average": list(os.getloadavg()),
        # OpenMP settings change CPU timings a lot (docs/benchmarks.md: "OpenMP spinning")
        "openmp_env": {k: os.environ[k] for k in _OPENMP_ENV if k in os.environ},
        "pipeline_nice": pipeline_threads.PIPELINE_NICE,
    }
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:  # pragma: no cover - lightning is a dependency
        pass
    return info


def require_matplotlib(flag: str = "--plot") -> Any:
    """``matplotlib.pyplot`` with a non-interactive backend, or a clear error naming the ``plot`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(
            f"{flag} needs matplotlib: pip install 'lightning-bagpipe[plot]' (or pip install matplotlib)"
        ) from None
    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` (a PNG; parent folders created) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
