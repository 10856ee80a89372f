"""The spill log of a :class:`~lightning_bagpipe.embedding.tiered_store.TieredStore`: appended rows, by id.

A ``TieredStore`` whose RAM buffer is full must put its rows on disk. Written to their own places in the
id-addressed row file, each costs a 4 KiB page (a fault, and a page the kernel writes out), however
small the row: on a ``2**28``-row table that held long runs to 0.29-0.40x the speed of a RAM store. The
log instead appends a spill's rows one after the other, sorted by id (a *run*), 57 rows of 72 bytes to a
page; the runs' ids, kept in RAM (4 bytes per row below id ``2**32``, else 8), find each row's newest
copy by binary search. When
the log is full, the store either *merges* it (one run of its newest copies, written with
:meth:`SpillLog.append_sorted` into a new log beside it) or writes its newest rows into the row file at
once (a *compaction*) and starts the log again.

Two files next to the store's: ``path.log`` (``float32`` rows, ``capacity`` of them, a sparse file) and
``path.log.ids`` (the ``int64`` id of each); a merge writes the other pair, ``path.log1`` and
``path.log1.ids`` (then the first again). Rows past the runs are garbage. Reopening with the run lengths
and the pair the store recorded at its last spill reads the ids back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["SpillLog", "log_files"]


def log_files(path: str | os.PathLike[str], pair: int = 0) -> tuple[Path, Path]:
    """The two files of the spill log of a store at ``path``: rows and ids. A store keeps two pairs of
    names (``pair`` 0 and 1) so that a merge can write the new log beside the old one."""
    name = f"{path}.log" if pair == 0 else f"{path}.log{int(pair)}"
    return Path(name), Path(f"{name}.ids")


class SpillLog:
    """Append-only rows, in sorted runs, found by id.

    Args:
        path: the store's row file; the log's files are named after it (:func:`log_files`).
        capacity: rows the log holds before it must be emptied.
        width: floats per row.
        segments: ``None`` to create the files anew, else the lengths of the runs of existing files to
            keep, oldest first (rows past them are garbage).
        pair: which of the store's two pairs of log files (:func:`log_files`) this log uses.

    Each :meth:`append` writes one *run*: its rows sorted by id. The index is the runs' ids, kept in RAM
    (4 bytes per row while the ids are below ``2**32``, else 8; a hash table took 24 to 48): a lookup is
    a binary search in each run, newest first, and the newest copy of an id wins.

    An ``OSError`` of the files (a full disk while appending, a failed ``fsync``) is raised again with its
    errno and a message naming the file and what was being done; an append that fails adds no run.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity: int,
        width: int,
        segments: list[int] | None,
        pair: int = 0,
        num_rows: int | None = None,
    ) -> None:
        self.capacity = int(capacity)
        self.width = int(width)
        self.pair = int(pair)
        self.rows_path, self.ids_path = log_files(path, self.pair)
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
            for p, itemsize in ((self.rows_path, 4 * self.width), (self.ids_path, 8)):
                try:
                    with open(p, "wb") as f:
                        f.truncate(self.capacity * itemsize)  # (sparse: nothing is allocated until written)
                except OSError as err:
                    raise _naming(err, "creating the spill log file", p) from err
        self._runs: list[tuple[int, np.ndarray]] = []  # (first position, ids ascending), oldest first
        self.length = 0
        if segments:
            try:
                ids = np.fromfile(self.ids_path, dtype=np.int64, count=sum(int(n) for n in segments))
            except OSError as err:
                raise _naming(err, "reading the ids of the spill log", self.ids_path) from err
            for n in segments:
                run = ids[self.length : self.length + int(n)]
                if run.size > 1 and bool(np.any(run[1:] <= run[:-1])):
                    raise ValueError(
                        f"spill log {self.ids_path}: the run at row {self.length} is not sorted; the log is "
                        "damaged"
                    )
                bound = np.iinfo(np.int64).max if num_rows is None else num_rows
                if run.size and (int(run[0]) < 0 or int(run[-1]) >= bound):
                    bad = int(run[0]) if int(run[0]) < 0 else int(run[-1])
                    raise ValueError(
                        f"spill log {self.ids_path}: the run at row {self.length} holds row id {bad}, "
                        f"outside the store's [0, {bound}); the log is damaged"
                    )
                self._runs.append((self.length, _in_ram(run)))
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
        order = np.argsort(ids, kind="stable")
        data = rows.detach().index_select(0, torch.from_numpy(order))
        self.append_sorted(ids[order], lambda lo, hi: data[lo:hi], max(1, ids.size))

    def append_sorted(self, ids: np.ndarray, rows: Callable[[int, int], Tensor], chunk: int) -> None:
        """Append distinct ascending ``ids`` as one run, their rows a chunk at a time: ``rows(lo, hi)``
        returns those of ``ids[lo:hi]``. A run of more rows than RAM should hold at once (a merge)."""
        n = ids.size
        if n > self.room:
            raise ValueError(f"spill log {self.rows_path}: {n} rows do not fit in the {self.room} left")
        if not n:
            return
        if n > 1 and bool(np.any(ids[1:] <= ids[:-1])):
            raise ValueError(f"spill log {self.rows_path}: append_sorted needs distinct ascending ids")
        lo = self.length
        # write(), not the mapping: no page fault per fresh page of the sparse file (the mapping sees the
        # same page cache)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            data = rows(a, b).detach().to(torch.float32).contiguous().numpy()
            _pwrite_all(self.rows_path, data, (lo + a) * self.width * 4, "appending rows to the spill log")
        run = np.ascontiguousarray(ids, dtype=np.int64)
        _pwrite_all(self.ids_path, run, lo * 8, "appending ids to the spill log")
        self._runs.append((lo, _in_ram(run)))
        self.length += n

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Log position of each id's newest copy, ``-1`` where the log has none."""
        out = np.full(ids.size, -1, dtype=np.int64)
        todo = np.arange(ids.size)
        for start, run in reversed(self._runs):
            if not todo.size:
                break
            q = ids[todo]
            if run.dtype == np.uint32:  # (an id too large for it is in no such run)
                q32 = q.astype(np.uint32)
                pos = np.minimum(np.searchsorted(run, q32), run.size - 1)
                hit = (run[pos] == q32) & (q < _NARROW)
            else:
                pos = np.minimum(np.searchsorted(run, q), run.size - 1)
                hit = run[pos] == q
            out[todo[hit]] = start + pos[hit]
            todo = todo[~hit]
        return out

    #: Sorted positions at most this many rows apart are read by one ``pread``, with the rows between.
    READ_GAP_ROWS = 8
    #: Rows one ``pread`` spans at most.
    READ_SPAN_ROWS = 1 << 14

    def read(self, positions: np.ndarray) -> Tensor:
        """A new tensor of the rows at ``positions`` (any order, repeats allowed), read with ``pread``.

        Not through a mapping: the log's files are written sequentially, so the kernel caches them in
        large folios (2 MB here) and maps a whole folio per fault. A few thousand scattered rows then
        mapped most of the log into the resident set during the read: up to 0.96 GB in the 1200-step
        ``bench scale`` run, whose peak passed 2 GiB through them. A ``pread`` copies the rows alone,
        from the same page cache. Positions close together (a merge reads the whole log in order) share
        one ``pread``; a scattered row costs about 1 us, against about 0.5 for a mapped read.
        """
        n = positions.size
        out = torch.empty(n, self.width, dtype=torch.float32)
        if not n:
            return out
        order = np.argsort(positions, kind="stable")
        at = np.asarray(positions, dtype=np.int64)[order]
        if int(at[0]) < 0 or int(at[-1]) >= self.length:
            raise IndexError(f"spill log {self.rows_path}: positions must lie in [0, {self.length})")
        # spans of close positions, each read whole into one buffer, one after the other
        cut = np.flatnonzero((np.diff(at) > self.READ_GAP_ROWS) | (np.diff(at // self.READ_SPAN_ROWS) != 0))
        first = np.concatenate([[0], cut + 1])
        lo = at[first]
        span = np.append(at[cut], at[-1]) + 1 - lo
        base = np.cumsum(span) - span  # where each span starts in the buffer
        size = 4 * self.width
        pread = os.pread
        try:
            fd = os.open(self.rows_path, os.O_RDONLY)
            try:
                data = b"".join([pread(fd, k * size, a * size) for a, k in zip(lo.tolist(), span.tolist())])
            finally:
                os.close(fd)
        except OSError as err:
            raise _naming(err, "reading rows from the spill log", self.rows_path) from err
        want = int(span.sum()) * size
        if len(data) != want:  # (a regular file reads short only at its end)
            raise OSError(f"spill log {self.rows_path}: short read ({len(data)} of {want} bytes)")
        which = np.repeat(np.arange(first.size), np.diff(np.append(first, n)))
        rows = np.frombuffer(data, dtype=np.float32).reshape(-1, self.width)
        out.numpy()[order] = rows[at - lo[which] + base[which]]
        return out

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
        return ids[newest].astype(np.int64), pos[order[newest]]

    def clear(self) -> None:
        """Forget every row (the files keep their size; their old rows are garbage)."""
        self._runs = []
        self.length = 0

    def flush(self) -> None:
        """Make the appended rows and ids durable."""
        for p in (self.rows_path, self.ids_path):
            try:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as err:
                raise _naming(err, "flushing (fsync) the spill log file", p) from err

    def close(self) -> None:
        """Flush (the log keeps no file open between calls)."""
        self.flush()

    def remove(self) -> None:
        """Forget every row and delete the files (a merged log replaced this one): nothing is flushed."""
        self.clear()
        for p in (self.rows_path, self.ids_path):
            try:
                p.unlink(missing_ok=True)
            except OSError as err:
                raise _naming(err, "deleting the spill log file", p) from err


_NARROW = 2**32


def _in_ram(run: np.ndarray) -> np.ndarray:
    """A run's ids (ascending) as the log keeps them in RAM: ``uint32`` when they fit, 4 bytes per row
    instead of 8 (the file keeps ``int64``)."""
    if run.size and int(run[-1]) < _NARROW:
        return run.astype(np.uint32)
    return run


def _naming(err: OSError, doing: str, path: Path) -> OSError:
    """``err`` as a new error of the same errno (and class) whose message says what failed on which file:
    ``OSError(28, 'No space left on device while appending rows to the spill log /x/t.f32.log')`` where
    the system call's error says neither, and its ``repr`` (how a background failure is reported) leaves
    out ``filename``."""
    return OSError(err.errno, f"{err.strerror or err} while {doing} {path}", str(path))


def _pwrite_all(path: Path, arr: np.ndarray, offset: int, doing: str) -> None:
    """Write the bytes of ``arr`` into ``path`` at ``offset`` (all of them: ``pwrite`` may write fewer).
    An OSError names ``path`` and what was being done (``doing``)."""
    view = memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        finally:
            os.close(fd)
    except OSError as err:
        raise _naming(err, doing, path) from err
