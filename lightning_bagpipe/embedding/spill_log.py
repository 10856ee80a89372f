"""The spill log of a :class:`~lightning_bagpipe.embedding.tiered_store.TieredStore`: appended rows, by id.

A ``TieredStore`` whose RAM buffer is full must put its rows on disk. Written to their own places in the
id-addressed row file, each costs a 4 KiB page (a fault, and a page the kernel writes out), however
small the row: on a ``2**28``-row table that held long runs to 0.29-0.40x the speed of a RAM store. The
log instead appends a spill's rows one after the other, sorted by id (a *run*), 57 rows of 72 bytes to a
page; the runs' ids, kept in RAM (8 bytes per row), find each row's newest copy by binary search. When
the log is full, the store writes its newest rows into the row file at once (a *compaction*) and starts
the log again.

Two files next to the store's: ``path.log`` (``float32`` rows, ``capacity`` of them, a sparse file) and
``path.log.ids`` (the ``int64`` id of each). Rows past the runs are garbage. Reopening with the run
lengths the store recorded at its last flush reads the ids back.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["SpillLog", "log_files"]

_PAGE = mmap.PAGESIZE


def log_files(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The two files of the spill log of a store at ``path``: rows and ids."""
    return Path(f"{path}.log"), Path(f"{path}.log.ids")


class SpillLog:
    """Append-only rows, in sorted runs, found by id.

    Args:
        path: the store's row file; the log's files are named after it (:func:`log_files`).
        capacity: rows the log holds before it must be emptied.
        width: floats per row.
        segments: ``None`` to create the files anew, else the lengths of the runs of existing files to
            keep, oldest first (rows past them are garbage).

    Each :meth:`append` writes one *run*: its rows sorted by id. The index is the runs' ids, kept in RAM
    (8 bytes per row; a hash table took 24 to 48): a lookup is a binary search in each run, newest
    first, and the newest copy of an id wins.
    """

    #: After this many bytes of rows read, the mapping lets go of its pages (they stay in the page
    #: cache), as ``MmapStore.MAPPED_BYTES_LIMIT`` but smaller: a compaction reads a whole log.
    MAPPED_BYTES_LIMIT = 64 * 2**20

    def __init__(
        self, path: str | os.PathLike[str], capacity: int, width: int, segments: list[int] | None
    ) -> None:
        self.capacity = int(capacity)
        self.width = int(width)
        self.rows_path, self.ids_path = log_files(path)
        mode: Literal["w+", "r+"] = "w+" if segments is None else "r+"
        if segments is not None:
            for p, itemsize in ((self.rows_path, 4 * self.width), (self.ids_path, 8)):
                size = p.stat().st_size if p.exists() else -1
                if size != self.capacity * itemsize:
                    raise ValueError(
                        f"spill log {p} should hold {self.capacity} rows ({self.capacity * itemsize} bytes), "
                        f"found {'no file' if size < 0 else f'{size} bytes'}"
                    )
            if any(int(n) < 1 for n in segments) or sum(int(n) for n in segments) > self.capacity:
                raise ValueError(f"spill log {self.rows_path}: runs {segments} do not fit in {capacity} rows")
        if segments is None:
            with open(self.ids_path, "wb") as f:
                f.truncate(self.capacity * 8)  # (sparse: nothing is allocated until written)
        self._rows = np.memmap(self.rows_path, dtype=np.float32, mode=mode, shape=(self.capacity, self.width))
        self._table = torch.from_numpy(self._rows)
        self._runs: list[tuple[int, np.ndarray]] = []  # (first position, ids ascending), oldest first
        self.length = 0
        self._touched = 0
        if segments:
            ids = np.fromfile(self.ids_path, dtype=np.int64, count=sum(int(n) for n in segments))
            for n in segments:
                run = ids[self.length : self.length + int(n)]
                if run.size > 1 and bool(np.any(run[1:] <= run[:-1])):
                    raise ValueError(
                        f"spill log {self.ids_path}: the run at row {self.length} is not sorted; the log is "
                        "damaged"
                    )
                self._runs.append((self.length, run))
                self.length += int(n)

    @property
    def room(self) -> int:
        """Rows that can still be appended."""
        return self.capacity - self.length

    @property
    def runs(self) -> list[int]:
        """The length of every run, oldest first (what reopening needs)."""
        return [int(ids.size) for _, ids in self._runs]

    def append(self, ids: np.ndarray, rows: Tensor) -> None:
        """Append the rows of distinct ``ids`` as one run; they become those ids' newest copies."""
        n = ids.size
        if n > self.room:
            raise ValueError(f"spill log {self.rows_path}: {n} rows do not fit in the {self.room} left")
        if not n:
            return
        order = np.argsort(ids, kind="stable")
        run = np.ascontiguousarray(ids[order], dtype=np.int64)
        data = rows.detach().to(torch.float32)[torch.from_numpy(order)].contiguous().numpy()
        lo = self.length
        # write(), not the mapping: no page fault per fresh page of the sparse file (the mapping sees the
        # same page cache)
        _pwrite_all(self.rows_path, data, lo * self.width * 4)
        _pwrite_all(self.ids_path, run, lo * 8)
        self._runs.append((lo, run))
        self.length += n

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Log position of each id's newest copy, ``-1`` where the log has none."""
        out = np.full(ids.size, -1, dtype=np.int64)
        todo = np.arange(ids.size)
        for start, run in reversed(self._runs):
            if not todo.size:
                break
            q = ids[todo]
            pos = np.minimum(np.searchsorted(run, q), run.size - 1)
            hit = run[pos] == q
            out[todo[hit]] = start + pos[hit]
            todo = todo[~hit]
        return out

    def read(self, positions: np.ndarray, out: Tensor) -> None:
        """Rows at ``positions`` into ``out``."""
        torch.index_select(self._table, 0, torch.from_numpy(positions), out=out)
        self._touch(positions.size)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """Every id in the log, ascending, and the position of its newest copy."""
        if not self._runs:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        ids = np.concatenate([run for _, run in self._runs])
        order = np.argsort(ids, kind="stable")  # equal ids: oldest run first
        ids = ids[order]
        newest = np.ones(ids.size, dtype=bool)
        newest[:-1] = ids[1:] != ids[:-1]
        pos = np.concatenate([np.arange(start, start + run.size) for start, run in self._runs])
        return ids[newest], pos[order[newest]]

    def clear(self) -> None:
        """Forget every row (the files keep their size; their old rows are garbage)."""
        self._runs = []
        self.length = 0
        self._release()

    def flush(self) -> None:
        """Make the appended rows and ids durable."""
        for p in (self.rows_path, self.ids_path):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Flush and let go of the mapped pages (the mapping ends with this object)."""
        self.flush()
        self._release()

    def _touch(self, rows: int) -> None:
        self._touched += rows * (self.width * 4 + _PAGE)  # a row read maps at most this many bytes
        if self._touched >= self.MAPPED_BYTES_LIMIT:
            self._release()

    def _release(self) -> None:
        """Let go of the mapped pages (they stay in the page cache), so they do not add up in the RSS."""
        self._touched = 0
        raw = getattr(self._rows, "_mmap", None)
        if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError, ValueError):
                raw.madvise(mmap.MADV_DONTNEED)


def _pwrite_all(path: Path, arr: np.ndarray, offset: int) -> None:
    """Write the bytes of ``arr`` into ``path`` at ``offset`` (all of them: ``pwrite`` may write fewer)."""
    view = memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    finally:
        os.close(fd)
