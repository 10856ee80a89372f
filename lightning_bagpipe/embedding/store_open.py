"""Opening a module's store: a path becomes the right store, and an existing store is initialised only
when it is new.

An existing file whose metadata no longer says what its rows are is refused (a ValueError naming its
sidecar) rather than initialised again, which would overwrite trained rows.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np

from lightning_bagpipe.embedding.store import EmbeddingStore, MmapStore
from lightning_bagpipe.embedding.tiered_store import TieredStore

__all__ = ["new_or_unfinished", "open_path"]

#: What the metadata of an initialised store records besides ``initialized: true`` (every way of
#: initialising one does: CachedEmbedding, :func:`~lightning_bagpipe.embedding.init.initialize_store` and
#: :meth:`~lightning_bagpipe.embedding.tiered_store.TieredStore.initialize_lazily`).
_INITIALIZED_KEYS = ("tables_fingerprint", "dim", "state_width", "seed")
_SCAN_BYTES = 1 << 20


def open_path(path: Path, num_rows: int, width: int) -> tuple[EmbeddingStore, bool]:
    """The store at ``path`` and whether this call created it: a new ``MmapStore`` file of ``num_rows`` x
    ``width`` if nothing is there, else the existing file, as a ``TieredStore`` when its metadata says one
    wrote it (rows never written, computed on read, or rows in its spill log: a plain mapping sees neither).
    An existing file is opened whatever its shape: the caller checks it against what its metadata records
    first, which says more (another dim, optimizer or tables) than two shapes."""
    if not path.exists():
        return MmapStore(path, num_rows=num_rows, width=width, mode="create"), True
    s = MmapStore(path, mode="open")
    if s.metadata.get("lazy") or s.metadata.get("log_runs"):
        s.close()
        return TieredStore(path, mode="open"), False
    return s, False


def _sidecar(s: EmbeddingStore) -> Path | None:
    if isinstance(s, TieredStore):
        return s.file.sidecar
    if isinstance(s, MmapStore):
        return s.sidecar
    return None


def _data_at(path: Path) -> int | None:
    """Offset of the first byte that is not zero in file ``path``, or ``None`` (all zeros, or holes: a new
    sparse store file). Holes are skipped without reading them where the filesystem reports them."""
    seek_data = getattr(os, "SEEK_DATA", None)
    with open(path, "rb") as f:
        fd, pos = f.fileno(), 0
        while True:
            if seek_data is not None:
                try:
                    pos = os.lseek(fd, pos, seek_data)
                except OSError as err:
                    if err.errno == errno.ENXIO:  # only holes from here on
                        return None
                    seek_data = None  # (not supported: read everything)
            chunk = os.pread(fd, _SCAN_BYTES, pos)
            if not chunk:
                return None
            nonzero = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8))
            if nonzero.size:
                return pos + int(nonzero[0])
            pos += len(chunk)


def _rows_on_disk(s: EmbeddingStore) -> Path | None:
    """A file of file store ``s`` that shows rows were written to it already (``None``: none do, or ``s``
    is not a file store): a ``TieredStore``'s bitmap, or a row file that is not all zeros."""
    if isinstance(s, TieredStore):
        if s.bitmap_path.exists():  # (saved by the lazy initialisation and by every flush)
            return s.bitmap_path
        path = s.file.path
    elif isinstance(s, MmapStore):
        path = s.path
    else:
        return None
    return None if _data_at(path) is None else path


def new_or_unfinished(s: EmbeddingStore, opened: bool) -> bool:
    """Whether store ``s``, which this module did not create, is to be initialised.

    Yes when its metadata says ``initialized: false`` (a fill that was interrupted), and for a new store
    handed in (a store object or a factory's): one in RAM without ``initialized``, or a file store with no
    metadata at all and no row written to its files yet. No for an initialised store whose metadata
    records what its rows are. Otherwise (and always for an existing file ``opened`` by its path whose
    metadata lacks ``initialized``) the store may hold trained rows its metadata no longer describes, which
    initialising it would overwrite: ValueError, naming the sidecar file and what it lacks.
    """
    meta = s.metadata
    flag = meta.get("initialized")
    sidecar = _sidecar(s)
    where = f"the metadata in its sidecar {sidecar}" if sidecar is not None else "its metadata"
    remedy = (
        "Restore the sidecar (from a backup), or, to start again from new rows, delete the store's files "
        "(lightning_bagpipe.embedding.tiered_store.store_files(path) lists them)"
        if sidecar is not None
        else "Record the store's metadata, or pass a new store"
    )
    if flag is False:
        return True
    if flag is True:
        missing = [k for k in _INITIALIZED_KEYS if k not in meta]
        if sidecar is not None and "state_init" in meta and "lazy" not in meta:
            missing.append("lazy")  # (state_init is recorded by a lazy initialisation only)
        if missing:
            raise ValueError(
                f"{s.describe()}: {where} says initialized=true but lacks {', '.join(map(repr, missing))}, "
                f"so what its rows hold is unknown (the sidecar was damaged or edited). {remedy}"
            )
        if isinstance(s, MmapStore) and (meta.get("lazy") or meta.get("log_runs")):
            raise ValueError(
                f"{s.describe()}: {where} says a TieredStore wrote the file: rows never written are computed "
                "on read, and newer rows may wait in its spill log, which a plain MmapStore does not see "
                "(they would read as zeros or old values). Pass the path, or a TieredStore"
            )
        return False
    if flag is not None:
        raise ValueError(
            f"{s.describe()}: {where} says initialized={flag!r}, expected true or false. {remedy}"
        )
    if not opened and sidecar is None:
        return True  # a store in RAM handed in without metadata: new
    if not opened and not meta:
        found = _rows_on_disk(s)
        if found is None:
            return True  # a new file store handed in (or one whose creator stopped before initialising it)
        raise ValueError(
            f"{s.describe()}: {where} is empty (no 'initialized'), but {found} shows that rows were written "
            "to the store: they may be trained rows whose description was lost, which initialising the "
            f"store would overwrite. {remedy}"
        )
    keys = ", ".join(map(repr, sorted(meta))) or "nothing"
    raise ValueError(
        f"{s.describe()}: {where} lacks 'initialized' (it holds {keys}), so whether the file holds trained "
        "rows is unknown, and initialising it would overwrite them: the sidecar was damaged, or another "
        f"process is creating the store right now. {remedy}"
    )
