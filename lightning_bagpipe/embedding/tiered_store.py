"""A file store for tables far larger than RAM: rows start lazily and write-backs gather in RAM.

A plain :class:`~lightning_bagpipe.embedding.store.MmapStore` pays for every row it touches with a whole
4 KiB page of its file: each fetched row is a page fault (or a disk read), each written-back row dirties
a page the kernel must write out later. On a ``2**28``-row table whose rows are spread over 18 GiB, that
per-page work, not the disk, limits training (``docs/benchmarks.md``). :class:`TieredStore` keeps the same
file and avoids most of those pages:

* **Lazy initialisation.** A new file is not filled (``2**28`` rows would be 19 GB of writes). A bitmap
  of one bit per row records which rows the file holds; any other row is still its initial value, which
  the store computes when it is read (:func:`~lightning_bagpipe.embedding.init.initial_rows_at`: the
  same values every store starts from).
* **A RAM write buffer** of ``buffer_bytes`` (the rows and their :class:`~lightning_bagpipe.id_map.IdMap`
  index). Written rows go to RAM, where a later write of the same row replaces them and a later read
  finds them. When the buffer is full, its rows are appended to the spill log and the buffer starts
  empty again (a *spill*).
* **A spill log** of ``log_bytes`` on disk (:mod:`~lightning_bagpipe.embedding.spill_log`): a spill's
  rows one after the other, 57 of 72 bytes to a page, found by id in RAM, instead of a page of the row
  file each. When the log is full and most of it is older copies of rows, it is *merged*: its newest
  copies are written, in one run, into a new log beside it, which replaces it. Otherwise its newest rows
  are written into the row file, sorted by id (a *compaction*: a page per row again, but once per row
  however often it was spilled), and the log starts again. ``log_bytes=0`` spills straight into the row
  file.

So a row costs a page of the row file only at a compaction, or when it is read from there. Reads take
the newest copy: the buffer, else the log, else the row file if its bit is set, else the initial value.

:meth:`flush` spills (to the log) and saves the bitmap next to the file (``path + ".written"``) and the
log's run lengths in the metadata, so a flushed store reopens as it was (the runs' ids are read back).
The bitmap file carries a CRC-32 of its bits (:data:`BITMAP_MAGIC`), checked when the store opens: a
damaged bitmap is a ValueError naming it, not rows silently read from the wrong place.
Opened with another ``log_bytes``, a store first compacts the log it had.

:meth:`tensor` must return every row as a view of the file, so it first writes every
row still at its initial value: on a huge table, that is the full initialisation the store avoided.
A plain ``state_dict()`` and ``export()`` call it; checkpoints do not: they save the rows
:meth:`written_ids` lists and the recipe of the others. A ``TieredStore`` is one process's store: its
buffer is private, so it cannot be shared between the ranks of a node (``store="shared"``); use
``store="sharded"``.

Thread-safety: every method holds one lock, so the executor's fetches and write-backs and the main
thread's reads never see the buffer half-updated.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_bagpipe.embedding.init import INIT_RECIPE, initial_rows_at
from lightning_bagpipe.embedding.spill_log import SpillLog, log_files
from lightning_bagpipe.embedding.store import (
    EmbeddingStore,
    Ids,
    MmapStore,
    _as_ids,
    _check_unique,
    allocate,
    refuse_copy,
    write_atomically,
)
from lightning_bagpipe.id_map import IdMap
from lightning_bagpipe.id_sets import union_ids
from lightning_bagpipe.tables import Tables

__all__ = ["DEFAULT_BUFFER_BYTES", "DEFAULT_LOG_BYTES", "TieredStore", "store_files"]

#: Default size of the RAM write buffer (rows and their index).
DEFAULT_BUFFER_BYTES = 256 * 2**20
#: Default size of the spill log on disk (rows and their ids; sparse files, allocated as they are written).
#: Its index in RAM takes 4 bytes per row it holds (ids below ``2**32``): up to 26.8M rows of 72 bytes,
#: 107 MB, for the default.
#: (512 MiB until 2026-12-05: its compactions took 19 s each in long runs of ``bench scale``.)
DEFAULT_LOG_BYTES = 2 * 2**30

_EMPTY = -1
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_MATERIALIZE_ROWS = 1 << 18
_RESERVE_ROWS = 1 << 20  # ids per pass of TieredStore._reserve_rows
_PAGE = mmap.PAGESIZE
_ENTRY_BYTES = 12  # one IdMap entry: id and value
#: The bitmap file (``path + ".written"``) starts with this tag, then the CRC-32 (``zlib.crc32``, unsigned
#: 32-bit little-endian) of the bits that follow; a file of the bits alone (written before the header was)
#: opens unchecked.
BITMAP_MAGIC = b"LBPBITS1"
BITMAP_HEADER_BYTES = len(BITMAP_MAGIC) + 4


def store_files(path: str | os.PathLike[str]) -> tuple[Path, ...]:
    """Every file a store at ``path`` may keep: the row file, its JSON sidecar (an :class:`MmapStore`'s),
    then a ``TieredStore``'s bitmap of rows written and its spill log's two pairs of files, for whoever
    removes or replaces a store."""
    p = Path(path)
    return (p, Path(f"{p}.json"), Path(f"{p}.written"), *log_files(p, 0), *log_files(p, 1))


def buffer_capacity(buffer_bytes: int, width: int) -> int:
    """Rows a write buffer of ``buffer_bytes`` holds: each row (``width`` floats and its id) plus the
    index, a power-of-two table of 2 to 4 entries of 12 bytes per row (0 when not even one row fits)."""
    row = width * 4 + 8
    rows = buffer_bytes // (row + 2 * _ENTRY_BYTES)
    if rows < 1:
        return 0
    size = IdMap._size_for(rows)  # the table for that many rows, or the next smaller one, holds most
    fits = [min(n // 2, (buffer_bytes - _ENTRY_BYTES * n) // row) for n in (size, size // 2) if n >= 16]
    return int(max(0, *fits))


class TieredStore(EmbeddingStore):
    """An :class:`MmapStore` file behind a lazily initialised bitmap and a RAM write buffer.

    Args:
        path: the row file (same format and sidecar as :class:`MmapStore`, so either class opens it).
        num_rows, width: needed to create a file; checked when given for an existing one.
        buffer_bytes: RAM for written rows and their index (at least one row).
        log_bytes: disk for the spill log (rows and their ids), which a full buffer is appended to
            (:mod:`~lightning_bagpipe.embedding.spill_log`); ``0``: spills write the row file directly.
        mode: ``"auto"`` (open if ``path`` exists, else create), ``"create"`` or ``"open"``.
        lock: lock the row file (:class:`MmapStore`, "Locking") before the bitmap or the log is touched;
            :class:`~lightning_bagpipe.embedding.store.StoreInUseError` if another process has it open.
            ``True`` (default) on every rank, since a ``TieredStore`` is one process's store (with several
            ranks, each has its own file); ``None``: only where
            :func:`~lightning_bagpipe.embedding.store.locks_by_default`; ``False``: never.

    ``CachedEmbedding`` calls :meth:`initialize_lazily` on a new store instead of writing every row. Pass
    the store itself, or ``functools.partial(TieredStore, path)`` to let the module supply the shape.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        num_rows: int | None = None,
        width: int | None = None,
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        log_bytes: int = DEFAULT_LOG_BYTES,
        mode: Literal["auto", "create", "open"] = "auto",
        lock: bool | None = True,
    ) -> None:
        existed = {f for f in store_files(path) if f.exists()}
        self.file = MmapStore(path, num_rows, width, mode=mode, lock=lock)  # (locks first)
        try:
            self._open(self.file.created, buffer_bytes, log_bytes)
        except BaseException:
            if self.file.created:  # a creation that failed leaves nothing behind (bad arguments included)
                for f in store_files(path):
                    if f not in existed:
                        f.unlink(missing_ok=True)
            self.file.close()  # (lets go of the lock)
            raise

    def _open(self, created: bool, buffer_bytes: int, log_bytes: int) -> None:
        super().__init__(self.file.num_rows, self.file.width)
        self.metadata = self.file.metadata
        self._table = self.file.tensor()
        self.bitmap_path = store_files(self.file.path)[2]
        if (
            isinstance(buffer_bytes, bool)
            or not isinstance(buffer_bytes, int)
            or buffer_capacity(buffer_bytes, self.width) < 1
        ):
            smallest = self.width * 4 + 8 + _ENTRY_BYTES * IdMap._size_for(1)
            raise ValueError(
                f"TieredStore('{self.file.path}'): buffer_bytes must be an int of at least one row and its "
                f"index ({smallest} bytes for rows of {self.width} floats), got {buffer_bytes!r}"
            )
        if isinstance(log_bytes, bool) or not isinstance(log_bytes, int) or log_bytes < 0:
            raise ValueError(
                f"TieredStore('{self.file.path}'): log_bytes must be an int >= 0 (0: no spill log), "
                f"got {log_bytes!r}"
            )
        self.capacity = min(buffer_capacity(buffer_bytes, self.width), self.num_rows)
        self._lock = threading.RLock()
        self._buf = torch.empty(self.capacity, self.width, dtype=torch.float32)
        self._ids = np.empty(self.capacity, dtype=np.int64)
        self._map = IdMap(self.capacity)
        # one bit per row: "may be in the buffer" / "may be in the log", so that rows in neither (most
        # rows a step fetches or writes back for the first time) skip the hash tables' probes
        self._in_buf = np.zeros((self.num_rows + 7) // 8, dtype=np.uint8)
        self._in_log = np.zeros(0, dtype=np.uint8)
        self._count = 0
        self.spills = 0
        """How many times the buffer was written to disk (the log, or the row file)."""
        self.compactions = 0
        """How many times the full spill log was written into the row file."""
        self.spill_seconds = 0.0
        """Wall time spent writing rows to disk for :meth:`write`: spills, and writes too large for the
        buffer, with the compactions they cause (the writing thread waits for it)."""
        self.compaction_seconds = 0.0
        """Wall time of every compaction."""
        self.log_merges = 0
        """How many times the full spill log was replaced by one run of its newest copies."""
        self._init: tuple[Tables, int, int, Tensor] | None = None
        self._written = self._load_bitmap()
        if self.metadata.get("lazy"):
            self._init = self._recipe_from_metadata()
        self.log: SpillLog | None = None
        # (no more than twice the table: more would only hold older copies of the same rows)
        log_rows = min(log_bytes // (self.width * 4 + 8), max(2 * self.num_rows, self.capacity), 2**31 - 1)
        self._open_log(log_rows, created)

    def describe(self) -> str:
        return f"TieredStore('{self.file.path}')"

    def _open_log(self, log_rows: int, created: bool) -> None:
        """Reopen the spill log the last flush recorded, or start a new one of ``log_rows`` rows (none if
        0). A recorded log of another size (or one no longer wanted) is written into the row file first."""
        kept = None if created else self.metadata.get("log_runs")
        old_rows = int(self.metadata.get("log_capacity", 0))
        pair = 0 if created else int(self.metadata.get("log_pair", 0))
        if kept is not None and old_rows != log_rows:
            old = None
            if kept:
                old = SpillLog(
                    self.file.path, old_rows, self.width, [int(n) for n in kept], pair, self.num_rows
                )
                self.log = old
                self._compact()
                old.close()
                self.file.flush()
                self._save_bitmap()
            self.log, kept, pair = None, None, 0
            self.set_metadata(log_runs=[], log_capacity=0, log_pair=0)
            if old is not None:
                old.remove()  # (unreferenced now: its rows are in the row file)
        if log_rows >= 1:
            runs = [int(n) for n in kept] if kept else None  # (nothing to keep: new files)
            self.log = SpillLog(self.file.path, log_rows, self.width, runs, pair, self.num_rows)
            self._in_log = np.zeros((self.num_rows + 7) // 8, dtype=np.uint8)
            _set_bits(self._in_log, self.log.items()[0])

    # ------------------------------------------------------------------ lazy initialisation
    def initialize_lazily(self, tables: Tables, dim: int, state_init: Tensor, seed: int) -> None:
        """Make every row not yet written read as its initial weights followed by ``state_init``.

        Nothing is written to the row file; the recipe is recorded in the metadata, so a reopened store
        produces the same rows.
        """
        state = torch.as_tensor(state_init, dtype=torch.float32).reshape(-1)
        what = f"{len(tables)} tables with dim={dim}"
        self.validate(tables.total_rows, int(dim) + state.numel(), what=what)
        with self._lock:
            self._save_bitmap()  # first: metadata saying "lazy" must never lack the bitmap it relies on
            self.set_metadata(
                initialized=True,
                lazy=True,
                init_recipe=INIT_RECIPE,
                tables=tables.to_list(),
                tables_fingerprint=tables.fingerprint(),
                seed=int(seed),
                dim=int(dim),
                state_width=state.numel(),
                state_init=[float(x) for x in state.tolist()],
            )
            self._init = self._recipe_from_metadata()

    def _recipe_from_metadata(self) -> tuple[Tables, int, int, Tensor]:
        meta = self.metadata
        if meta.get("init_recipe") != INIT_RECIPE:
            raise ValueError(
                f"{self.describe()}: rows not yet written follow init recipe {meta.get('init_recipe')!r}, "
                f"but this version of lightning-bagpipe computes {INIT_RECIPE!r}"
            )
        try:
            tables = Tables.coerce([(str(name), int(rows)) for name, rows in meta["tables"]])
            state = torch.tensor(meta["state_init"], dtype=torch.float32)
            dim, seed = int(meta["dim"]), int(meta["seed"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{self.describe()}: lazy init metadata is incomplete ({e!r})") from None
        return tables, dim, seed, state

    def _initial(self, ids: np.ndarray) -> Tensor:
        out = torch.empty(ids.size, self.width)
        if self._init is None:
            return out.zero_()  # not initialised: like a new file, zeros
        tables, dim, seed, state = self._init
        initial_rows_at(tables, dim, seed, ids, out=out[:, :dim])
        out[:, dim:] = state
        return out

    # ------------------------------------------------------------------ the bitmap
    def _load_bitmap(self) -> np.ndarray:
        n = (self.num_rows + 7) // 8
        if self.bitmap_path.exists():
            data = np.fromfile(self.bitmap_path, dtype=np.uint8)
            return self._check_bitmap(data, n)
        if self.metadata.get("lazy"):
            raise ValueError(
                f"{self.describe()}: the file was initialised lazily but its bitmap {self.bitmap_path} "
                "is missing, so which rows the file holds is unknown"
            )
        # a file written by MmapStore (or a new one): it holds every row
        return np.full(n, 0xFF if self.metadata.get("initialized") else 0, dtype=np.uint8)

    def _check_bitmap(self, data: np.ndarray, n: int) -> np.ndarray:
        """The ``n`` bytes of bits of bitmap file contents ``data``, checked against the CRC-32 of its
        header (a ValueError naming the file if they do not match). A file of the bits alone, ``n`` bytes
        (written before the header was), is taken as it is."""
        header = data[:BITMAP_HEADER_BYTES].tobytes()
        tagged = header.startswith(BITMAP_MAGIC)
        if data.size == n and not tagged:
            return data  # (the format before the header: nothing to check)
        if data.size != n + BITMAP_HEADER_BYTES:
            size = data.size - BITMAP_HEADER_BYTES if tagged else data.size
            after = f", after its {BITMAP_HEADER_BYTES}-byte header" if tagged else ""
            raise ValueError(
                f"{self.describe()}: {self.bitmap_path} has {size} bytes, expected {n} "
                f"(one bit per row of {self.num_rows}{after})"
            )
        bits = data[BITMAP_HEADER_BYTES:]
        stored = int.from_bytes(header[len(BITMAP_MAGIC) :], "little")
        if not tagged or zlib.crc32(bits.data) != stored:
            what = (
                f"its header lacks its tag {BITMAP_MAGIC!r}"
                if not tagged
                else "its bits do not match the CRC-32 recorded in its header"
            )
            raise ValueError(
                f"{self.describe()}: the bitmap of the rows the row file holds, {self.bitmap_path}, is "
                f"damaged ({what}), so the store cannot tell which rows it holds: a row would be read from "
                "the file where it was never written, or computed as its initial value where it was trained. "
                "Restore the bitmap from a backup taken with the store's other files; or delete the store's "
                "files (lightning_bagpipe.embedding.tiered_store.store_files(path) lists them) and resume "
                "from a checkpoint, or start from new rows"
            )
        return bits

    def _save_bitmap(self) -> None:
        """Write the bitmap file atomically: its tag, the CRC-32 of the bits (checked when the store is
        opened again), the bits. (A CRC of a 32 MiB bitmap, 2**28 rows, takes about 8 ms here.)"""
        # (file.write, not ndarray.tofile, whose OSError on a full disk carries no errno)
        bits = self._written.data
        header = BITMAP_MAGIC + zlib.crc32(bits).to_bytes(4, "little")

        def write(f: BinaryIO) -> None:
            f.write(header)
            f.write(bits)

        write_atomically(self.bitmap_path, write, "saving the bitmap of written rows")

    def _in_file(self, ids: np.ndarray) -> np.ndarray:
        return _test_bits(self._written, ids)

    def _find_buffered(self, ids: np.ndarray) -> np.ndarray:
        """Buffer slot of each id, ``-1`` where the buffer does not hold it."""
        out = np.full(ids.size, _EMPTY, dtype=np.int64)
        if self._count:
            maybe = np.flatnonzero(_test_bits(self._in_buf, ids))
            if maybe.size:
                out[maybe] = self._map.find(ids[maybe])
        return out

    def _find_logged(self, ids: np.ndarray) -> np.ndarray:
        """Log position of each id's newest copy, ``-1`` where the log does not hold it."""
        out = np.full(ids.size, _EMPTY, dtype=np.int64)
        if self.log is not None and self.log.length:
            maybe = np.flatnonzero(_test_bits(self._in_log, ids))
            if maybe.size:
                out[maybe] = self.log.find(ids[maybe])
        return out

    def _append_log(self, ids: np.ndarray, rows: Tensor) -> None:
        assert self.log is not None
        self.log.append(ids, rows)
        _set_bits(self._in_log, ids)
        self._save_log_runs()  # a store reopened after a crash sees the log as of its last run

    def _clear_log(self) -> None:
        if self.log is not None:
            self.log.clear()
            self._in_log.fill(0)

    def _mark(self, ids: np.ndarray) -> None:
        """Record that the file holds rows ``ids``."""
        _set_bits(self._written, ids)

    # ------------------------------------------------------------------ the buffer
    def _spill(self) -> None:
        """Move every buffered row to disk and empty the buffer: appended to the spill log (emptied into
        the row file first if they do not fit), or without a log (or one too small) into the file."""
        n = self._count
        if not n:
            return
        self._to_disk(self._ids[:n], self._buf[:n])
        self._map.clear()
        self._in_buf.fill(0)
        self._count = 0
        self.spills += 1

    def _to_disk(self, ids: np.ndarray, rows: Tensor) -> None:
        """Rows of distinct ``ids`` to disk: appended to the spill log (merged, or else emptied into the row
        file, first if they do not fit), or, without a log or with one too small for them, into the row
        file."""
        t0 = time.perf_counter()
        log = self.log
        if log is not None and ids.size > log.room:
            items = log.items()  # (one sort of the log's ids, for the merge or the compaction)
            if not self._merge_log(items, ids.size):
                self._compact(items)
        log = self.log
        if log is not None and ids.size <= log.room:
            self._append_log(ids, rows)
        else:  # (an empty log, if any: the file's copies are the newest)
            order = np.argsort(ids, kind="stable")
            self._write_file(ids[order], rows, order)
            # the rows are in the file now: a store reopened after this process dies must read them
            # there, so the bitmap that says so is saved too (as after a compaction)
            self._save_bitmap()
        self.spill_seconds += time.perf_counter() - t0

    #: A full log is merged (see :meth:`_merge_log`) when its newest copies and the rows about to be
    #: appended fill at most this share of it; otherwise merging would free too little, and it is
    #: compacted into the row file.
    MERGE_MAX_FILL = 0.9

    def _merge_log(self, items: tuple[np.ndarray, np.ndarray], incoming: int) -> bool:
        """Replace the log by one run of its newest copies (``items``: ``log.items()``), written beside it
        (the other pair of log files), if that leaves room for ``incoming`` rows and more; ``False`` if it
        would not.

        A merge writes each row once, sequentially, and frees the space of older copies; a compaction
        costs a page of the row file per row (a fault and an allocation in a sparse file: 3 to 9 us
        per row here, 19 s for a full log of 512 MiB). The metadata names the new files only once they
        are written, so a crash in between reopens the old log.
        """
        log = self.log
        assert log is not None
        ids, pos = items
        if ids.size + incoming > self.MERGE_MAX_FILL * log.capacity:
            return False
        merged = SpillLog(self.file.path, log.capacity, self.width, None, pair=1 - log.pair)

        merged.append_sorted(ids, lambda lo, hi: log.read(pos[lo:hi]), self.SPILL_CHUNK_ROWS)
        self.log = merged
        self._save_log_runs()  # from here on a reopened store reads the merged log
        log.remove()
        self.log_merges += 1
        return True

    def _compact(self, items: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Write the newest copy of every row in the spill log into the row file (sorted by id), empty it.
        ``items``: ``log.items()``, if the caller has it already.

        The rows' blocks are allocated first (:meth:`_reserve_rows`): on a full disk a write through the
        mapping would end the process with SIGBUS; instead the ``OSError`` is raised before any row is
        written, the log keeps every row and a later compaction (once there is space) starts again."""
        log = self.log
        if log is None or not log.length:
            return
        t0 = time.perf_counter()
        ids, pos = log.items() if items is None else items  # (ascending)
        # (a full disk: an OSError here, before any row is written)
        self._reserve_rows(
            ids, "rows a compaction writes into it from the spill log (which still holds them)"
        )
        for lo in range(0, ids.size, self.SPILL_CHUNK_ROWS):
            part = slice(lo, lo + self.SPILL_CHUNK_ROWS)
            self.file.write(ids[part], log.read(pos[part]), check_unique=False)
            self._mark(ids[part])
        # the bitmap first, then the empty log: a crash in between leaves the log's rows both in the log
        # and in the file, the same values. (No msync: a process that dies leaves its writes in the page
        # cache, and waiting here for the kernel to write gigabytes of pages would stall the step.)
        self._save_bitmap()
        self._clear_log()
        self._save_log_runs()
        self.compactions += 1
        self.compaction_seconds += time.perf_counter() - t0

    def _reserve_rows(self, ids: np.ndarray, what: str) -> None:
        """Allocate the blocks of the row file that writing rows ``ids`` (ascending) through the mapping
        dirties, with one ``posix_fallocate`` per run of adjacent pages, so that a full disk is an
        ``OSError`` (its errno, the row file as its ``filename``) here rather than a SIGBUS at the first
        write that finds no space. Rows the file holds already are skipped: they were written before, so
        their pages have their blocks. (File systems that cannot preallocate are left as they are.)

        A call costs about 5 us on ext4 here: nothing measurable when the rows are dense (the default log
        on a large table: long runs, few calls), about 4 us more per row when they lie pages apart."""
        row = self.width * 4

        def runs() -> Iterator[tuple[int, int]]:
            for lo in range(0, ids.size, _RESERVE_ROWS):
                part = ids[lo : lo + _RESERVE_ROWS]
                new = part[~self._in_file(part)]
                if not new.size:
                    continue
                first = new * row // _PAGE  # the first and last page of each row (ascending)
                last = (new * row + row - 1) // _PAGE
                cut = np.flatnonzero(first[1:] > last[:-1] + 1) + 1  # where a run of pages starts
                starts = first[np.concatenate([[0], cut])] * _PAGE
                ends = np.minimum((last[np.append(cut - 1, new.size - 1)] + 1) * _PAGE, self.file.nbytes)
                yield from zip(starts.tolist(), ends.tolist())

        if ids.size:
            self._reserve(runs(), f"the {ids.size:,} {what}")

    def _reserve(self, runs: Iterable[tuple[int, int]], what: str) -> None:
        """Allocate the byte ranges ``[a, b)`` of the row file; an ``OSError`` naming the file and ``what``
        the space is for when it fails."""
        path = self.file.path
        allocate(path, runs, f"space in the store file {path} for {what}")

    #: Rows per file write of a spill, and per file read of a large read: after each the file store may let
    #: go of the pages it mapped (:attr:`MmapStore.MAPPED_BYTES_LIMIT`), so a spill of a large buffer, or a
    #: checkpoint's read of every written row, does not map gigabytes at once.
    SPILL_CHUNK_ROWS = 1 << 15

    def _write_file(self, ids: np.ndarray, rows: Tensor, order: np.ndarray) -> None:
        """Write ``rows[order]`` at sorted ``ids`` into the file, a chunk at a time, and mark them held
        (their blocks allocated first, as for a compaction)."""
        self._reserve_rows(ids, "rows a spill writes into it (the RAM buffer still holds them)")
        for lo in range(0, ids.size, self.SPILL_CHUNK_ROWS):
            part = slice(lo, lo + self.SPILL_CHUNK_ROWS)
            self.file.write(
                ids[part], rows.index_select(0, torch.from_numpy(order[part])), check_unique=False
            )
            self._mark(ids[part])

    @property
    def buffered_rows(self) -> int:
        """Rows in the RAM buffer now."""
        return self._count

    # ------------------------------------------------------------------ access
    def read(self, ids: Ids) -> Tensor:
        idx = _as_ids(ids, self.num_rows, f"{self.describe()}.read").numpy()
        out = torch.empty(idx.size, self.width)
        self._gather(idx, out)
        return out

    def read_into(self, ids: Ids, out: Tensor) -> None:
        idx = _as_ids(ids, self.num_rows, f"{self.describe()}.read_into").numpy()
        self._check_out(out, idx.size)
        self._gather(idx, out)

    def _gather(self, idx: np.ndarray, out: Tensor) -> None:
        """Rows ``idx`` into ``out``, each from its newest copy: buffer, log, file or recipe."""
        with self._lock:
            self._t()
            slots = self._find_buffered(idx)
            hit = slots >= 0
            if hit.any():
                # (index_copy_/index_select copy whole rows: about twice as fast as out[i] = buf[j])
                out.index_copy_(
                    0,
                    torch.from_numpy(np.flatnonzero(hit)),
                    self._buf.index_select(0, torch.from_numpy(slots[hit])),
                )
            rest = np.flatnonzero(~hit)
            if rest.size and self.log is not None and self.log.length:
                pos = self._find_logged(idx[rest])
                logged = pos >= 0
                if logged.any():
                    at, where = rest[logged], pos[logged]
                    for lo in range(0, at.size, self.SPILL_CHUNK_ROWS):
                        part = slice(lo, lo + self.SPILL_CHUNK_ROWS)
                        out.index_copy_(0, torch.from_numpy(at[part]), self.log.read(where[part]))
                    rest = rest[~logged]
            if rest.size:
                ids_rest = idx[rest]
                disk = self._in_file(ids_rest)
                if disk.any():
                    at, from_file = rest[disk], ids_rest[disk]
                    # a chunk at a time, so the file store lets go of the pages each chunk maps in
                    for lo in range(0, at.size, self.SPILL_CHUNK_ROWS):
                        part = slice(lo, lo + self.SPILL_CHUNK_ROWS)
                        out.index_copy_(0, torch.from_numpy(at[part]), self.file.read(from_file[part]))
                if not disk.all():
                    out.index_copy_(0, torch.from_numpy(rest[~disk]), self._initial(ids_rest[~disk]))

    def write(self, ids: Ids, rows: Tensor, *, check_unique: bool = True) -> None:
        where = f"{self.describe()}.write"
        t = _as_ids(ids, self.num_rows, where)
        src = self._rows(rows, t.numel(), where)
        if check_unique:
            _check_unique(t, where)
        idx = t.numpy()
        with self._lock:
            self._t()
            slots = self._find_buffered(idx)
            new = slots < 0
            m = int(new.sum())
            if self._count + m > self.capacity:
                self._spill()
                slots, new, m = np.full(idx.size, _EMPTY, dtype=np.int64), np.ones(idx.size, bool), idx.size
            if m > self.capacity:  # more rows than the buffer holds: straight to disk
                self._to_disk(idx, src)
                return
            old = np.flatnonzero(~new)
            if old.size:
                self._buf.index_copy_(
                    0, torch.from_numpy(slots[old]), src.index_select(0, torch.from_numpy(old))
                )
            if m:
                fresh = np.flatnonzero(new)
                slot = np.arange(self._count, self._count + m, dtype=np.int64)
                torch.index_select(
                    src, 0, torch.from_numpy(fresh), out=self._buf[self._count : self._count + m]
                )
                self._ids[self._count : self._count + m] = idx[fresh]
                self._map.add(idx[fresh], slot)
                _set_bits(self._in_buf, idx[fresh])
                self._count += m

    def read_range(self, start: int, stop: int) -> Tensor:
        start, stop = self._range(start, stop, "read_range")
        return self.read(np.arange(start, stop, dtype=np.int64))

    def write_range(self, start: int, rows: Tensor) -> None:
        where = f"{self.describe()}.write_range"
        k = rows.shape[0] if rows.dim() else 0
        start, stop = self._range(start, int(start) + k, "write_range")
        src = self._rows(rows, k, where)
        with self._lock:
            self._spill()  # no buffered or logged copy may outlive the rows written here
            self._compact()
            row = self.width * 4
            self._reserve(
                [(start * row, stop * row)], f"the {stop - start:,} rows write_range() writes into it"
            )
            self.file.write_range(start, src)
            for lo in range(start, stop, _MATERIALIZE_ROWS):
                self._mark(np.arange(lo, min(stop, lo + _MATERIALIZE_ROWS), dtype=np.int64))
            self._save_bitmap()  # (a store reopened after a crash reads these rows from the file)

    def written_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        """Ids in ``[start, stop)`` of the rows written since the store was initialised (in the file, the
        log or the buffer), ascending; every other row of the range is still its initial value.

        ``None`` when the file was not initialised lazily (it holds every row), and when more than half
        the rows of the range are written: the whole range is then the smaller description of them.
        """
        stop = self.num_rows if stop is None else stop
        start, stop = self._range(start, stop, "written_ids")
        with self._lock:
            self._t()
            if self._init is None:
                return None
            half = (stop - start) // 2
            lo_b = start >> 3
            bits = self._written[lo_b : (stop + 7) >> 3]
            if int(_POPCOUNT[bits].sum(dtype=np.int64)) > half + 16:  # (+16: the two edge bytes)
                return None
            nz = np.flatnonzero(bits)
            held = np.unpackbits(bits[nz], bitorder="little").reshape(-1, 8).astype(bool)
            ids = ((nz + lo_b).astype(np.int64)[:, None] * 8 + np.arange(8, dtype=np.int64))[held]
            logged = self.log.items()[0] if self.log is not None and self.log.length else ids[:0]
            ids = union_ids(ids, self._ids[: self._count], logged)
            ids = ids[(ids >= start) & (ids < stop)]
            return None if ids.size > half else ids

    def written_rows_bound(self) -> int:
        """At most how many rows :meth:`written_ids` lists, without listing them: the rows in the file,
        in the log (every copy) and in the buffer, counted once per place."""
        with self._lock:
            held = int(_POPCOUNT[self._written].sum(dtype=np.int64))
            return held + (self.log.length if self.log is not None else 0) + self._count

    def reset_to_initial(self) -> None:
        """Forget every written row: each reads as its initial value again. The file's old rows stay
        where they are, unreferenced, until a spill overwrites them; the bitmap is saved at once."""
        with self._lock:
            self._t()
            if self._init is None:
                raise ValueError(
                    f"{self.describe()}: the file was not initialised lazily, so it has no initial rows to "
                    "return to"
                )
            self._map.clear()
            self._in_buf.fill(0)
            self._count = 0
            if self.log is not None:
                self._clear_log()
                self._save_log_runs()
            self._written[:] = 0
            self._save_bitmap()

    #: :meth:`tensor` warns when it must write more than this many bytes of rows never written.
    MATERIALIZE_WARN_BYTES = 1 << 30

    def rows_in_file(self) -> int:
        """Rows on disk: in the row file (its bitmap's set bits) or the spill log; the others are still
        their initial values, unless the buffer holds them."""
        with self._lock:
            bits = self._written
            if not bits.size:
                return 0
            tail = self.num_rows - 8 * (bits.size - 1)  # valid bits of the last byte (1 to 8)
            last = int(bits[-1]) & ((1 << tail) - 1)
            held = int(_POPCOUNT[bits[:-1]].sum(dtype=np.int64)) + last.bit_count()
            if self.log is not None and self.log.length:
                held += int(np.count_nonzero(~self._in_file(self.log.items()[0])))
            return held

    def tensor(self) -> Tensor:
        """Every row as a zero-copy view of the file: spills, then writes each row still at its initial
        value (the whole initialisation, on a table never materialised before; a warning says so when
        that is more than :attr:`MATERIALIZE_WARN_BYTES`)."""
        with self._lock:
            self._spill()
            self._compact()
            todo = self.num_rows - self.rows_in_file()
            if todo * self.width * 4 > self.MATERIALIZE_WARN_BYTES:
                warnings.warn(
                    f"{self.describe()}: writing {todo:,} rows that were never written "
                    f"({todo * self.width * 4 / 1e9:.1f} GB) into the file, because the whole table was "
                    "asked for (state_dict(), export() or tensor()); on a huge "
                    "table this takes minutes, once. See docs/checkpoints.md",
                    stacklevel=2,
                )
            t = self.file.tensor()
            for lo in range(0, self.num_rows, _MATERIALIZE_ROWS):
                hi = min(self.num_rows, lo + _MATERIALIZE_ROWS)
                ids = np.arange(lo, hi, dtype=np.int64)
                todo = ids[~self._in_file(ids)]
                if todo.size:
                    self._reserve_rows(todo, "rows never written that tensor() writes into it")
                    self.file.write(todo, self._initial(todo), check_unique=False)
                    self._mark(todo)
            return t

    def set_metadata(self, **kv: Any) -> None:
        self.file.set_metadata(**kv)  # (updates the dict self.metadata shares with the file)

    def flush(self) -> None:
        """Spill the buffer (to the log), ``msync`` the files, then save the bitmap and the log's runs:
        the store reopens as it is now."""
        with self._lock:
            self._t()
            self._spill()
            self.file.flush()
            self._save_bitmap()
            if self.log is not None:
                self.log.flush()
                self._save_log_runs()

    def _save_log_runs(self) -> None:
        assert self.log is not None
        self.set_metadata(log_runs=self.log.runs, log_capacity=self.log.capacity, log_pair=self.log.pair)

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(refuse_copy(self))

    @property
    def locked(self) -> bool:
        """Whether this store holds the lock on its row file (through its :class:`MmapStore`)."""
        return self.file.locked

    def close(self) -> None:
        with self._lock:
            if self._table is None:
                return
            self.flush()
            self._table = None
            if self.log is not None:
                self.log.close()
            self.file.close()


def _test_bits(bits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Whether the bit of each id is set (one bit per row, little-endian within a byte)."""
    return ((bits[ids >> 3] >> (ids & 7).astype(np.uint8)) & 1).astype(bool)


def _set_bits(bits: np.ndarray, ids: np.ndarray) -> None:
    """Set the bit of each id (any order, repeats allowed)."""
    if ids.size:
        np.bitwise_or.at(bits, ids >> 3, np.left_shift(np.uint8(1), (ids & 7).astype(np.uint8)))
