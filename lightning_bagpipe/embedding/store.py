"""Where the full embedding tables live: a float32 row store in RAM or in a memory-mapped file.

A *row* is one float32 vector of width ``dim + state_width``: the embedding weights (``[:dim]``)
followed by that row's sparse-optimizer state (``[dim:]``). Weights and state always travel together,
so a row fetched into the device cache and written back later carries its own optimizer state and
never inherits another row's (the bug the BagPipe reference implementation has with cache slots).

Two stores implement one interface, :class:`EmbeddingStore`:

* :class:`MemoryStore`: a host tensor (pinned when CUDA is available, so fetches can be asynchronous).
* :class:`MmapStore`: a raw float32 file plus a JSON sidecar, for tables larger than RAM, for
  resuming from disk, and for sharing one table between the processes of a node.

A process that opens or creates a store file holds an advisory ``flock`` on it until it closes the
store (or dies), so a second run on the same file is refused (:class:`StoreInUseError`) instead of
interleaving its writes with the first's (see :class:`MmapStore`, "Locking").

Every access is vectorized (``index_select`` / ``index_copy_`` on one CPU tensor view of the whole
table). Thread-safety: any number of concurrent readers plus one writer are safe as long as the writer's
rows are disjoint from the rows being read at that moment; ordering reads and write-backs of the *same*
row is the executor's job. ``close`` must not race with other calls.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import weakref
import zlib
from abc import ABC
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_bagpipe.embedding.store_lock import (
    RANK_VARIABLES,
    StoreInUseError,
    acquire,
    locks_by_default,
    release,
    store_lock,
)
from lightning_bagpipe.id_sets import union_ids
from lightning_bagpipe.temporaries import remove_stale_temporaries, temporary_path

__all__ = [
    "CHECKSUM_KEY",
    "RANK_VARIABLES",
    "STORE_FORMAT",
    "STORE_VERSION",
    "EmbeddingStore",
    "Ids",
    "MemoryStore",
    "MmapStore",
    "StoreInUseError",
    "locks_by_default",
    "sidecar_checksum",
    "store_lock",
]

#: Row ids accepted by reads and writes: a 1-D integer numpy array, tensor (any device) or int sequence.
Ids = np.ndarray | Tensor | Sequence[int]

#: ``format`` field of an :class:`MmapStore` sidecar.
STORE_FORMAT = "lightning-bagpipe-store"
#: ``version`` field of an :class:`MmapStore` sidecar; bumped on incompatible layout changes.
STORE_VERSION = 1
#: Key of an :class:`MmapStore` sidecar holding a checksum of everything else in it
#: (:func:`sidecar_checksum`), written with every sidecar and checked on open. Sidecars written before it
#: (no such key) open unchecked.
CHECKSUM_KEY = "checksum"
#: The top-level keys of a sidecar besides :data:`CHECKSUM_KEY`.
_SIDECAR_KEYS = frozenset({"format", "version", "num_rows", "width", "dtype", "metadata"})

_ITEMSIZE = 4  # float32
_INT64_MAX = np.iinfo(np.int64).max


_PAGE = mmap.PAGESIZE

#: An ``MmapStore`` file larger than this fraction of physical memory is mapped for random access
#: (``MADV_RANDOM``: no read-ahead); smaller files keep the kernel's read-ahead.
RANDOM_ACCESS_FRACTION = 0.25


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a table may not fit
        return 0


def _as_ids(ids: Ids, num_rows: int, where: str) -> Tensor:
    """``ids`` as a 1-D int64 CPU tensor, checked to lie in ``[0, num_rows)`` (ValueError otherwise)."""
    if isinstance(ids, Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"{where}: row ids must be integers, got a tensor of dtype {ids.dtype}")
        t = ids.detach().to("cpu")
    else:
        a = np.asarray(ids)
        if a.size == 0 and not isinstance(ids, np.ndarray):
            a = a.astype(np.int64)  # an empty list has no dtype to check
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{where}: row ids must be integers, got an array of dtype {a.dtype}")
        if a.dtype.kind == "u" and a.size and int(a.max()) > _INT64_MAX:
            raise ValueError(f"{where}: row id {int(a.max())} is outside [0, {num_rows})")
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    if t.dim() != 1:
        raise ValueError(f"{where}: row ids must be 1-D, got shape {tuple(t.shape)}")
    t = t.to(torch.int64)
    if t.numel():
        lo, hi = torch.aminmax(t)
        if int(lo) < 0 or int(hi) >= num_rows:
            bad = ((t < 0) | (t >= num_rows)).nonzero()
            pos = int(bad[0, 0])
            raise ValueError(
                f"{where}: row id {int(t[pos])} at position {pos} is outside [0, {num_rows}) "
                f"({bad.shape[0]} bad ids of {t.numel()})"
            )
    return t


def _check_unique(ids: Tensor, where: str) -> None:
    """ValueError naming a repeated id. O(K) when ``ids`` is strictly increasing, else one sort."""
    if ids.numel() < 2 or bool((ids[1:] > ids[:-1]).all()):
        return
    s = torch.sort(ids).values
    dup = s[1:] == s[:-1]
    if bool(dup.any()):
        raise ValueError(
            f"{where}: row id {int(s[1:][dup][0])} appears more than once "
            f"({int(dup.sum())} repeated occurrences); a write must name each row once"
        )


def sidecar_checksum(header: dict[str, Any]) -> str:
    """The checksum of a sidecar's content: ``"crc32:"`` and eight hex digits, the CRC-32 (``zlib.crc32``)
    of the canonical JSON (sorted keys, no spaces, ASCII) of every key but :data:`CHECKSUM_KEY`, as the
    content reads back from the file (so it does not depend on how the file is indented)."""
    body = {k: v for k, v in header.items() if k != CHECKSUM_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"crc32:{zlib.crc32(canonical.encode()):08x}"


def _check_json(kv: dict[str, Any], where: str) -> None:
    for k, v in kv.items():
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: metadata {k!r}={v!r} is not plain JSON ({e})") from None


class EmbeddingStore(ABC):
    """A table of ``num_rows`` float32 rows of ``width`` values, addressed by fused row id.

    Subclasses only provide the backing CPU tensor (``self._table``); every read and write is
    implemented here on top of it, so both stores behave identically.

    ``metadata`` is a plain JSON-able dict describing what the rows hold (tables fingerprint, ``dim``,
    optimizer name, state width, seed, ``initialized``); :meth:`set_metadata` updates it and, for a
    file store, persists it.
    """

    num_rows: int
    width: int
    metadata: dict[str, Any]
    _table: Tensor | None

    def __init__(self, num_rows: int, width: int) -> None:
        num_rows, width = _positive(num_rows, "num_rows"), _positive(width, "width")
        self.num_rows = num_rows
        self.width = width
        self.metadata = {}
        self._table = None

    # ------------------------------------------------------------------ description
    def describe(self) -> str:
        """Short human-readable name used in error messages."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.describe()}[{self.num_rows} x {self.width} float32]"

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.width * _ITEMSIZE

    @property
    def closed(self) -> bool:
        return self._table is None

    def _t(self) -> Tensor:
        if self._table is None:
            raise RuntimeError(f"{self.describe()} is closed")
        return self._table

    # ------------------------------------------------------------------ validation
    def validate(self, num_rows: int, width: int, what: str = "the embedding tables") -> None:
        """Raise ValueError naming both shapes unless the store holds ``num_rows`` rows of ``width``."""
        if (self.num_rows, self.width) != (int(num_rows), int(width)):
            raise ValueError(
                f"{self.describe()} holds {self.num_rows} rows x {self.width} floats but {what} "
                f"needs {int(num_rows)} rows x {int(width)} floats"
            )

    def check_metadata(self, **expected: Any) -> None:
        """Raise ValueError for every key whose stored metadata value differs from ``expected``.

        Keys the store has no value for are not compared (a freshly created store has none). Values are
        compared as JSON holds them (a tuple equals the list a reopened file store reads back).
        """
        bad = {k: (self.metadata[k], v) for k, v in expected.items() if k in self.metadata}
        bad = {k: sv for k, sv in bad.items() if _as_json(sv[0]) != _as_json(sv[1])}
        if bad:
            parts = ", ".join(f"{k}: store has {s!r}, expected {v!r}" for k, (s, v) in bad.items())
            raise ValueError(f"{self.describe()} was written for a different configuration ({parts})")

    def set_metadata(self, **kv: Any) -> None:
        """Update :attr:`metadata` with plain JSON values (and persist them, for file stores)."""
        _check_json(kv, self.describe())
        self.metadata.update(kv)

    # ------------------------------------------------------------------ access
    def read(self, ids: Ids) -> Tensor:
        """A new ``[K, width]`` float32 CPU tensor holding rows ``ids`` (in that order)."""
        t = self._t()
        idx = _as_ids(ids, self.num_rows, f"{self.describe()}.read")
        self._will_read(idx)
        return torch.index_select(t, 0, idx)

    def _will_read(self, idx: Tensor) -> None:
        """Hook before a gather of rows ``idx`` (file stores start reading their pages in parallel)."""
        return None

    def read_into(self, ids: Ids, out: Tensor) -> None:
        """Like :meth:`read`, into a preallocated ``[K, width]`` float32 CPU tensor (e.g. pinned)."""
        t = self._t()
        idx = _as_ids(ids, self.num_rows, f"{self.describe()}.read_into")
        self._check_out(out, idx.numel())
        self._will_read(idx)
        torch.index_select(t, 0, idx, out=out)

    def write(self, ids: Ids, rows: Tensor, *, check_unique: bool = True) -> None:
        """Store ``rows[i]`` at row ``ids[i]``; ``rows`` may live on any device (copied to the host).

        A write that names a row twice is ambiguous (which copy wins is unspecified), so it is rejected
        with a ValueError. The check is O(K) for strictly increasing ids and one sort otherwise; a caller
        that guarantees distinct ids (the executor, whose ids come from the oracle) may pass
        ``check_unique=False``.
        """
        t = self._t()
        where = f"{self.describe()}.write"
        idx = _as_ids(ids, self.num_rows, where)
        src = self._rows(rows, idx.numel(), where)
        if check_unique:
            _check_unique(idx, where)
        t.index_copy_(0, idx, src)

    def read_range(self, start: int, stop: int) -> Tensor:
        """A copy of rows ``[start, stop)``."""
        t = self._t()
        start, stop = self._range(start, stop, "read_range")
        return t[start:stop].clone()

    def write_range(self, start: int, rows: Tensor) -> None:
        """Store ``rows`` at rows ``[start, start + len(rows))``."""
        t = self._t()
        where = f"{self.describe()}.write_range"
        k = rows.shape[0] if rows.dim() else 0
        start, stop = self._range(start, int(start) + k, "write_range")
        t[start:stop].copy_(self._rows(rows, k, where))

    def tensor(self) -> Tensor:
        """The whole table as a zero-copy ``[num_rows, width]`` CPU tensor (writes go to the store)."""
        return self._t()

    def written_ids(self, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        """Ids in ``[start, stop)`` of the rows written since the store was initialised, ascending (int64).

        Every other row still holds its initial value, so a checkpoint needs only these rows and the
        initialisation recipe. ``None`` when the store does not keep track (every row counts as written):
        only a lazily initialised store (:class:`~lightning_bagpipe.embedding.tiered_store.TieredStore`)
        does.
        """
        self._t()
        return None

    def flush(self) -> None:
        """Make written rows durable. A no-op in RAM."""
        self._t()

    def reserve(self) -> None:
        """Make sure every row has its space (before filling them all). A no-op in RAM."""
        return None

    def close(self) -> None:
        """Flush and release the table. Idempotent; tensors from :meth:`tensor` keep their memory alive."""
        if self._table is not None:
            self.flush()
            self._table = None

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers
    def _check_out(self, out: Tensor, k: int) -> None:
        """ValueError unless ``out`` can receive ``k`` rows: a float32 CPU tensor of shape ``[k, width]``."""
        expected = (k, self.width)
        if tuple(out.shape) != expected or out.dtype != torch.float32 or out.device.type != "cpu":
            raise ValueError(
                f"{self.describe()}.read_into: out must be a float32 CPU tensor of shape {list(expected)}, "
                f"got {out.dtype} on {out.device} with shape {list(out.shape)}"
            )

    def _rows(self, rows: Tensor, k: int, where: str) -> Tensor:
        if not isinstance(rows, Tensor):
            raise ValueError(f"{where}: rows must be a torch.Tensor, got {type(rows).__name__}")
        if rows.dtype != torch.float32:
            raise ValueError(f"{where}: rows must be float32, got {rows.dtype}")
        if tuple(rows.shape) != (k, self.width):
            raise ValueError(f"{where}: rows must have shape [{k}, {self.width}], got {list(rows.shape)}")
        return rows.detach().to("cpu")

    def _range(self, start: int, stop: int, op: str) -> tuple[int, int]:
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.num_rows:
            raise ValueError(
                f"{self.describe()}.{op}: row range [{start}, {stop}) is not within [0, {self.num_rows})"
            )
        return start, stop


def _positive(n: Any, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), or itself if it is not JSON."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return value


class MemoryStore(EmbeddingStore):
    """The table in host RAM, zero-initialised.

    ``pin_memory=None`` pins the buffer iff CUDA is available, so host-to-device fetches of gathered
    rows can be asynchronous; pass ``False`` to save the pinned-memory budget, ``True`` to insist (a
    ValueError without CUDA). Use it when the tables fit comfortably in RAM.
    """

    def __init__(self, num_rows: int, width: int, pin_memory: bool | None = None) -> None:
        super().__init__(num_rows, width)
        cuda = torch.cuda.is_available()
        if pin_memory and not cuda:
            raise ValueError(
                "MemoryStore(pin_memory=True) needs CUDA, but torch.cuda.is_available() is False"
            )
        self.pinned: bool = cuda if pin_memory is None else bool(pin_memory)
        self._table = torch.zeros(self.num_rows, self.width, dtype=torch.float32, pin_memory=self.pinned)


class MmapStore(EmbeddingStore):
    """The table in a memory-mapped raw float32 file ``path`` with a JSON sidecar ``path + ".json"``.

    The file is ``num_rows * width`` little-endian-native float32 values, row-major, no header. The
    sidecar holds ``{"format", "version", "num_rows", "width", "dtype", "metadata", "checksum"}``, the last a
    CRC-32 of the others (:func:`sidecar_checksum`), checked on open: a damaged sidecar is a ValueError
    naming it (one without ``checksum``, from before, opens unchecked).

    Modes: ``"create"`` makes a new sparse file (``ftruncate``: no RAM or disk is spent on rows never
    written, which read as zeros) and refuses to overwrite an existing one; ``"open"`` maps an existing
    file and checks it against its sidecar (and against ``num_rows``/``width`` when given); ``"auto"``
    opens if ``path`` exists, else creates.

    Use it when the tables exceed RAM (the OS pages rows in and out), to keep trained tables on disk
    between runs, or to share one table between the processes of a node (the mapping is shared, so a
    row written by one process is visible to the others; create the file in one process first).

    **Locking.** With ``lock=True`` the store takes an advisory ``flock`` on ``path`` as it opens or
    creates it, before it reads or writes anything, and holds it until :meth:`close` (or until the
    process dies: the system lets go of it then, even after ``kill -9``). If another process holds it, the
    store is not opened: :class:`StoreInUseError` names the file and the holder's pid. Stores of one
    process share its lock on a file, so a process may open a file it has open already. ``lock=None``
    (default) locks unless this process is a rank other than 0 of a multi-process run
    (:func:`locks_by_default`): the ranks of one run map one file, and their rank 0 holds the lock for
    them. ``lock=False`` never locks (e.g. to read a file a live run is writing, at your own risk).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        num_rows: int | None = None,
        width: int | None = None,
        mode: Literal["auto", "create", "open"] = "auto",
        *,
        lock: bool | None = None,
    ) -> None:
        self.path = Path(path)
        self.sidecar = Path(str(self.path) + ".json")
        self._unlock: weakref.finalize[Any, MmapStore] | None = None
        self.created = False
        """Whether this object created the file (``mode="create"``, or ``"auto"`` on a missing file)."""
        self._sidecar_existed = False
        if mode not in ("auto", "create", "open"):
            raise ValueError(f"MmapStore mode must be 'auto', 'create' or 'open', got {mode!r}")
        locking = locks_by_default() if lock is None else bool(lock)
        if mode == "auto":
            mode = "open" if self.path.exists() else "create"
        if mode == "create" and (num_rows is None or width is None):
            raise ValueError(
                f"MmapStore('{self.path}'): creating a store needs num_rows and width "
                f"(got num_rows={num_rows}, width={width})"
            )
        if mode == "open" and locking and self.path.exists():  # (a missing file: the error below names it)
            self._hold(acquire(self.path))  # first: a store in use is left untouched, sidecar included
        try:
            if mode == "create":
                assert num_rows is not None and width is not None
                super().__init__(num_rows, width)
                self._create(locking)
            else:
                header = self._read_sidecar()
                super().__init__(header["num_rows"], header["width"])
                self.metadata = dict(header.get("metadata") or {})
                self._check_open(num_rows, width)
            self._array: np.memmap | None = np.memmap(
                self.path, dtype=np.float32, mode="r+", shape=(self.num_rows, self.width)
            )
            st = os.stat(self.path)
            self.file_id = (st.st_dev, st.st_ino)  # the mapped file's (the path may name another later)
        except BaseException:
            if self.created:  # a creation that failed leaves nothing behind (the lock still keeps others out)
                self.path.unlink(missing_ok=True)
                if not self._sidecar_existed:
                    self.sidecar.unlink(missing_ok=True)
                self.created = False
            self._let_go()  # (a store that failed to open holds no lock)
            raise
        self._table = torch.from_numpy(self._array)
        # Rows are read and written scattered. On a file much larger than what RAM can cache, reading ahead
        # around each row wastes the disk and the page cache: tell the kernel not to (measured ~20x faster
        # training and a third of the page-cache footprint on a 2^28-row, 18 GiB table). A file that fits
        # comfortably is better served by read-ahead, which soon caches all of it (bench scale: 2.4x faster
        # on a 1.2 GiB table than with MADV_RANDOM).
        self.random_access = self.nbytes > RANDOM_ACCESS_FRACTION * _physical_memory()
        self._touched = 0  # bytes of pages mapped in since the last release (an upper bound)
        self.releases = 0
        """How many times the mapped pages were let go (:attr:`MAPPED_BYTES_LIMIT`)."""
        raw = getattr(self._array, "_mmap", None)
        if self.random_access and raw is not None and hasattr(mmap, "MADV_RANDOM"):
            with contextlib.suppress(OSError):
                raw.madvise(mmap.MADV_RANDOM)

    def describe(self) -> str:
        return f"MmapStore('{self.path}')"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(refuse_copy(self))

    @property
    def locked(self) -> bool:
        """Whether this store holds the lock on its file (shares this process's lock)."""
        return self._unlock is not None and self._unlock.alive

    def _hold(self, key: tuple[int, int] | None) -> None:
        if key is not None:  # released by close(), or when the store is garbage collected
            self._unlock = weakref.finalize(self, release, key)

    def _let_go(self) -> None:
        if self._unlock is not None:
            self._unlock()

    #: Gathers of at least this many rows from a random-access mapping first ask the kernel for their
    #: pages (``MADV_WILLNEED``).
    WILLNEED_MIN_ROWS = 256

    #: A random-access mapping lets go of its pages once rows read and written since the last time may
    #: have mapped in this many bytes (``MADV_DONTNEED`` on the whole mapping). Pages a process has
    #: touched stay mapped, and count in its resident set, until the kernel reclaims them; over a run on
    #: a table far larger than RAM they would add up to gigabytes of RSS (1.6 GiB in ``bench scale``).
    #: Letting go keeps them in the page cache (written rows included: the mapping is shared, so their
    #: data stays in the file's dirty pages); the next access maps a page in again without disk I/O
    #: while it is cached.
    MAPPED_BYTES_LIMIT = 256 * 2**20

    def _touch(self, rows: int) -> None:
        """Count the pages ``rows`` rows may map in; past :attr:`MAPPED_BYTES_LIMIT`, let go of them all."""
        if not self.random_access or not rows:
            return
        self._touched += rows * (_PAGE + self.width * 4)  # a row spans at most this many pages' bytes
        if self._touched < self.MAPPED_BYTES_LIMIT:
            return
        raw = getattr(self._array, "_mmap", None)
        if raw is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        self._touched = 0
        with contextlib.suppress(OSError, ValueError):
            raw.madvise(mmap.MADV_DONTNEED)
            self.releases += 1

    @override
    def read(self, ids: Ids) -> Tensor:
        rows = super().read(ids)
        self._touch(rows.shape[0])
        return rows

    @override
    def read_into(self, ids: Ids, out: Tensor) -> None:
        super().read_into(ids, out)
        self._touch(out.shape[0])

    @override
    def write(self, ids: Ids, rows: Tensor, *, check_unique: bool = True) -> None:
        super().write(ids, rows, check_unique=check_unique)
        self._touch(rows.shape[0] if rows.dim() else 0)

    def _will_read(self, idx: Tensor) -> None:
        """On a random-access mapping, ask the kernel to read the pages of rows ``idx`` now, all at once.

        With ``MADV_RANDOM`` (no read-ahead) a gather faults its rows in one page at a time, each a
        synchronous disk read; ``MADV_WILLNEED`` on the pages first queues all the reads together, so the
        disk serves them in parallel and the gather then finds them in memory. Neighbouring pages are
        merged into one call. Small gathers skip this (the system calls would cost more than they save).
        """
        raw = getattr(self._array, "_mmap", None)
        if not self.random_access or raw is None or not hasattr(mmap, "MADV_WILLNEED"):
            return  # (with read-ahead on, the extra calls cost more than they bring: 36K vs 21K samples/s)
        if idx.numel() < self.WILLNEED_MIN_ROWS:
            return
        row_bytes = self.width * 4
        first = idx.numpy() * row_bytes
        pages = union_ids(first // _PAGE, (first + row_bytes - 1) // _PAGE)
        # runs of consecutive pages: one madvise each
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        starts = pages[np.concatenate([[0], breaks])]
        ends = pages[np.concatenate([breaks - 1, [pages.size - 1]])] + 1
        size = len(raw)
        with contextlib.suppress(OSError, ValueError):
            for a, b in zip(starts.tolist(), ends.tolist()):
                raw.madvise(mmap.MADV_WILLNEED, a * _PAGE, min(b * _PAGE, size) - a * _PAGE)

    # ------------------------------------------------------------------ files
    def _create(self, locking: bool) -> None:
        if self.path.exists():
            raise FileExistsError(
                f"MmapStore('{self.path}'): file exists; open it with mode='open' (or 'auto') or delete it"
            )
        if self.path.parent and not self.path.parent.exists():
            raise FileNotFoundError(f"MmapStore('{self.path}'): directory {self.path.parent} does not exist")
        self._sidecar_existed = self.sidecar.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        self.created = True
        if locking:  # the new file's own descriptor holds the lock (or is closed), before anything is written
            self._hold(acquire(self.path, fd))
        else:
            os.close(fd)
        os.truncate(self.path, self.nbytes)
        self._write_sidecar()

    def _read_sidecar(self) -> dict[str, Any]:
        if not self.path.exists():
            raise FileNotFoundError(f"MmapStore('{self.path}'): no such file (use mode='create' or 'auto')")
        if not self.sidecar.exists():
            raise ValueError(
                f"MmapStore('{self.path}'): sidecar {self.sidecar} is missing, so the file's shape is unknown"
            )
        try:
            header = json.loads(self.sidecar.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(
                f"MmapStore('{self.path}'): sidecar {self.sidecar} is not valid JSON ({e})"
            ) from None
        if not isinstance(header, dict) or header.get("format") != STORE_FORMAT:
            raise ValueError(f"MmapStore('{self.path}'): {self.sidecar} is not a {STORE_FORMAT} sidecar")
        if header.get("version") != STORE_VERSION:
            raise ValueError(
                f"MmapStore('{self.path}'): sidecar version {header.get('version')!r} is not supported "
                f"(this library reads version {STORE_VERSION})"
            )
        self._verify_sidecar(header)
        if header.get("dtype") != "float32":
            raise ValueError(
                f"MmapStore('{self.path}'): dtype {header.get('dtype')!r} in {self.sidecar}, need float32"
            )
        for key in ("num_rows", "width"):
            v = header.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(
                    f"MmapStore('{self.path}'): {key}={v!r} in {self.sidecar} is not a positive int"
                )
        return header

    def _verify_sidecar(self, header: dict[str, Any]) -> None:
        """ValueError naming the sidecar unless its checksum matches its content. A sidecar without one
        (written before checksums were) is not checked, unless it has a key no version writes (the
        checksum's own key, damaged)."""

        def damaged(what: str) -> ValueError:
            return ValueError(
                f"MmapStore('{self.path}'): sidecar {self.sidecar} is damaged: {what}, so the shape and the "
                "metadata it records (what the rows hold, how rows never written are computed, where a "
                "TieredStore's newest rows are) cannot be trusted. Restore the sidecar from a backup taken "
                "with the store's other files; or delete the store's files "
                "(lightning_bagpipe.embedding.tiered_store.store_files(path) lists them) and resume from a "
                f"checkpoint, or start from new rows. (If you edited the sidecar on purpose, remove its "
                f"'{CHECKSUM_KEY}' key: it then opens unchecked, and store.set_metadata() writes it again "
                "with a new checksum.)"
            )

        if CHECKSUM_KEY not in header:
            unknown = sorted(set(header) - _SIDECAR_KEYS)
            if unknown:
                what = (
                    f"it has no '{CHECKSUM_KEY}' but {', '.join(map(repr, unknown))}, which no version writes"
                )
                raise damaged(what)
            return
        stored, computed = header[CHECKSUM_KEY], sidecar_checksum(header)
        if stored != computed:
            what = f"its content does not match its checksum (recorded {stored!r}, computed {computed!r})"
            raise damaged(what)

    def _check_open(self, num_rows: int | None, width: int | None) -> None:
        for key, want in (("num_rows", num_rows), ("width", width)):
            have = getattr(self, key)
            if want is not None and int(want) != have:
                raise ValueError(
                    f"MmapStore('{self.path}'): the file holds {key}={have} (per {self.sidecar}) "
                    f"but {key}={int(want)} was requested"
                )
        size = self.path.stat().st_size
        if size != self.nbytes:
            kind = "truncated" if size < self.nbytes else "longer than expected"
            raise ValueError(
                f"MmapStore('{self.path}'): file is {kind}: it has {size} bytes but its sidecar describes "
                f"{self.num_rows} rows x {self.width} float32 = {self.nbytes} bytes"
            )

    def _write_sidecar(self) -> None:
        header = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "num_rows": self.num_rows,
            "width": self.width,
            "dtype": "float32",
            "metadata": self.metadata,
        }
        # the checksum of the values as they read back (a tuple reads as a list, an int key as a string)
        header = _as_json(header)
        header[CHECKSUM_KEY] = sidecar_checksum(header)
        text = json.dumps(header, indent=1, sort_keys=True)
        write_atomically(self.sidecar, lambda f: f.write(text.encode()), "writing the sidecar")

    # ------------------------------------------------------------------ overrides
    def set_metadata(self, **kv: Any) -> None:
        """Update :attr:`metadata` and rewrite the sidecar atomically (temp file, fsync, rename)."""
        super().set_metadata(**kv)
        self._write_sidecar()

    def reserve(self) -> None:
        """Allocate the file's blocks now (``posix_fallocate``): a full disk is then an ``OSError`` naming the
        file here, not a ``SIGBUS`` that kills the process when a write through the mapping finds no space.
        (File systems that cannot preallocate are left as they are.)"""
        allocate(self.path, [(0, self.nbytes)], f"{self.nbytes:,} bytes for the store file {self.path}")

    def flush(self) -> None:
        """``msync`` the mapping: written rows reach the file."""
        self._t()
        if self._array is not None:
            try:
                self._array.flush()
            except OSError as err:
                raise OSError(
                    err.errno,
                    f"{err.strerror} while flushing (msync) the store file {self.path}",
                    str(self.path),
                ) from err

    def close(self) -> None:
        """Flush, drop the mapping and let go of the lock (this store's share of it)."""
        super().close()
        self._array = None
        self._let_go()


def allocate(path: Path, ranges: Iterable[tuple[int, int]], what: str) -> None:
    """``posix_fallocate`` the byte ranges ``[a, b)`` of file ``path``, so that writes through a mapping of
    them cannot find the disk full (a ``SIGBUS``); an ``OSError`` ``"... while allocating {what}"`` naming
    ``path`` when the space is not there. File systems that cannot preallocate are left as they are."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        for a, b in ranges:
            os.posix_fallocate(fd, a, b - a)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return
        raise OSError(err.errno, f"{err.strerror} while allocating {what}", str(path)) from err
    finally:
        os.close(fd)


def refuse_copy(store: EmbeddingStore) -> str:
    """Why a file store cannot be copied or pickled (``copy.deepcopy``, ``torch.save`` of a model, a
    "spawn" start method): a copy would be a RAM snapshot that no longer reads or writes the file."""
    return (
        f"{store.describe()} keeps its rows in a file: it cannot be copied or pickled (a copy would hold a "
        "snapshot in RAM and no longer write the file). Save a model with a checkpoint or state_dict(), "
        "read its rows with export(), or open the file again; start processes with Lightning's default "
        "launcher, not start_method='spawn'"
    )


def write_atomically(path: Path, write: Callable[[BinaryIO], object], what: str) -> None:
    """Replace file ``path`` with what ``write`` writes, all or nothing: a temporary file, fsynced, renamed
    over it. An ``OSError`` names ``what`` was being done and ``path``; no failure leaves a temporary, and
    those of killed writers (:mod:`~lightning_bagpipe.temporaries`) are removed first."""
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # (an interrupt too: the temporary goes)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):
            raise OSError(err.errno, f"{err.strerror} while {what} {path}", str(path)) from err
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable (best effort: not every OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
