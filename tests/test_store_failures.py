"""Store failures that used to pass silently or unexplained: damaged metadata that re-initialised trained
rows, I/O errors (a full disk) that named no file, and a /dev/shm too small for a shared table."""

from __future__ import annotations

import errno
import functools
import io
import itertools
import json
import mmap
import os
import re
import socket
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lightning_bagpipe as lb
from lightning_bagpipe.embedding import distributed
from lightning_bagpipe.embedding import store as store_module
from lightning_bagpipe.embedding import tiered_store as ts_module
from lightning_bagpipe.embedding.cached import CachedEmbedding
from lightning_bagpipe.embedding.init import initialize_store
from lightning_bagpipe.embedding.store import (
    CHECKSUM_KEY,
    EmbeddingStore,
    MemoryStore,
    MmapStore,
    sidecar_checksum,
)
from lightning_bagpipe.embedding.tiered_store import TieredStore
from lightning_bagpipe.strategies import sharded_checkpoint as sc
from lightning_bagpipe.strategies.checkpointing import atomic_torch_save
from lightning_bagpipe.temporaries import host_id

TABLES = lb.Tables([("a", 100), ("b", 300)])
DIM = 4


def emb(store: Any, optimizer: Any = None, dim: int = DIM) -> CachedEmbedding:
    return CachedEmbedding(TABLES, dim, optimizer or lb.optim.RowWiseAdagrad(lr=0.1), store=store, seed=1)


def tiered(path: Path) -> Any:
    """A factory of TieredStores small enough to spill to their log (and compact) within a few writes."""
    return functools.partial(TieredStore, path, buffer_bytes=4096, log_bytes=30_000)


TRAINED_IDS = np.arange(0, 400, 3)


def trained(path: Path, kind: str) -> torch.Tensor:
    """Create a store at ``path`` through a module, write "trained" rows into it, close it; return every
    row as it then reads."""
    m = emb(path if kind == "mmap" else tiered(path))
    rows = torch.randn(TRAINED_IDS.size, m.width) + 5.0
    m.store.write(TRAINED_IDS, rows)
    table = m.store.read(np.arange(TABLES.total_rows))
    m.store.close()
    return table


def edit_metadata(path: Path, change: Any) -> Path:
    """Change the metadata in the sidecar of ``path`` and write it with a matching checksum, as a store
    would (so the checks of what the metadata says are reached: a sidecar damaged behind the store's back
    fails its checksum first)."""
    sidecar = Path(f"{path}.json")
    header = json.loads(sidecar.read_text())
    change(header["metadata"])
    header[CHECKSUM_KEY] = sidecar_checksum(header)
    sidecar.write_text(json.dumps(header))
    return sidecar


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.parent.iterdir()) if p.name.startswith(path.name)}


# ---------------------------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("kind", ["mmap", "tiered"])
def test_a_store_whose_metadata_was_emptied_is_refused_and_left_as_it_was(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "t.f32"
    trained(path, kind)
    sidecar = edit_metadata(path, lambda meta: meta.clear())
    before = files_of(path)
    for store in (path, str(path)):
        with pytest.raises(ValueError, match=rf"sidecar {re.escape(str(sidecar))} lacks 'initialized'"):
            emb(store)
    assert files_of(path) == before  # (it used to re-initialise the file: every trained row overwritten)


KEYS = [("mmap", k) for k in ("tables_fingerprint", "dim", "state_width", "seed")]
# (a lazily initialised file without "lazy" would read its unwritten rows as zeros)
KEYS += [("tiered", "tables_fingerprint"), ("tiered", "lazy")]


@pytest.mark.parametrize("kind, key", KEYS)
def test_an_initialised_store_missing_a_key_is_refused_naming_it(tmp_path: Path, kind: str, key: str) -> None:
    path = tmp_path / "t.f32"
    trained(path, kind)
    sidecar = edit_metadata(path, lambda meta: meta.pop(key))
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(sidecar))} says initialized=true but lacks '{key}'"
    ):
        emb(path)


def test_the_ways_to_make_or_reopen_a_store_still_work(tmp_path: Path) -> None:
    # a new file (created here), then reopened with its trained rows
    path = tmp_path / "m.f32"
    before = trained(path, "mmap")
    again = emb(path)
    assert isinstance(again.store, MmapStore) and torch.equal(again.store.tensor(), before)
    again.store.close()
    # a lazily initialised TieredStore file, reopened by its path and through a factory
    tpath = tmp_path / "t.f32"
    before = trained(tpath, "tiered")
    for store in (tpath, tiered(tpath)):
        again = emb(store)
        assert isinstance(again.store, TieredStore)
        assert torch.equal(again.store.read(np.arange(TABLES.total_rows)), before)
        again.store.close()
    # new store objects handed in (and a factory's new file) are initialised
    fresh = emb(None).store.tensor()
    for store in (
        MemoryStore(TABLES.total_rows, DIM + 1, pin_memory=False),
        MmapStore(tmp_path / "new.f32", TABLES.total_rows, DIM + 1),
        TieredStore(tmp_path / "new_t.f32", TABLES.total_rows, DIM + 1),
        lambda n, w: MmapStore(tmp_path / "factory.f32", n, w),
        tiered(tmp_path / "factory_t.f32"),
    ):
        m = emb(store)
        assert m.store.metadata["initialized"] is True
        assert torch.equal(m.store.read(np.arange(TABLES.total_rows)), fresh)
        m.store.close()
    # an already initialised store object is used as it is
    same = emb(None)
    same.store.write([5], torch.ones(1, DIM + 1))
    assert emb(same.store).store.read([5]).eq(1).all()


def test_an_interrupted_initialisation_is_redone(tmp_path: Path) -> None:
    path = tmp_path / "m.f32"
    trained(path, "mmap")
    edit_metadata(path, lambda meta: meta.update(initialized=False))  # what initialize_store records first
    m = emb(path)
    assert m.store.metadata["initialized"] is True and torch.equal(m.store.tensor(), emb(None).store.tensor())


def test_a_store_object_holding_rows_but_no_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.f32"
    s = MmapStore(path, TABLES.total_rows, DIM + 1)
    s.write([7], torch.ones(1, DIM + 1))  # rows, but nothing recorded about them
    s.flush()
    with pytest.raises(ValueError, match=rf"sidecar .*m\.f32\.json is empty .*{re.escape(str(path))} shows"):
        emb(s)
    assert s.read([7]).eq(1).all()
    s.close()
    t = TieredStore(path, mode="open")  # its bitmap (saved by the flush) shows the file was used
    t.flush()
    t.close()
    edit_metadata(path, lambda meta: meta.clear())
    with pytest.raises(ValueError, match=r"is empty \(no 'initialized'\), but .*m\.f32\.written shows"):
        emb(tiered(path))
    # but a file whose creator stopped before initialising it holds nothing yet: a factory initialises it
    MmapStore(tmp_path / "stopped.f32", TABLES.total_rows, DIM + 1).close()
    assert emb(tiered(tmp_path / "stopped.f32")).store.metadata["lazy"] is True


def test_a_plain_mmap_store_of_a_tiered_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.f32"
    trained(path, "tiered")
    with pytest.raises(
        ValueError, match=r"says a TieredStore wrote the file.*Pass the path, or a TieredStore"
    ):
        emb(MmapStore(path, mode="open"))


def test_rows_in_the_spill_log_of_a_file_not_initialised_lazily_are_read_back_by_path(tmp_path: Path) -> None:
    path = tmp_path / "m.f32"
    emb(path).store.close()  # a plain file, initialised in full
    t = tiered(path)(TABLES.total_rows, DIM + 1)  # then written through a TieredStore: rows in its log
    rows = torch.full((40, DIM + 1), 7.0)
    t.write(np.arange(40), rows)
    t.close()
    assert json.loads(Path(f"{path}.json").read_text())["metadata"]["log_runs"]  # (not compacted)
    again = emb(path)
    assert isinstance(again.store, TieredStore)  # (a plain mapping would read the rows from before)
    assert torch.equal(again.store.read(np.arange(40)), rows)


def test_a_store_of_another_dim_with_the_same_width_is_refused() -> None:
    s = MemoryStore(TABLES.total_rows, 4, pin_memory=False)
    initialize_store(s, TABLES, 3, torch.zeros(1), 1)  # 3 weights, 1 state column
    with pytest.raises(
        ValueError, match=r"rows of dim 3 and 1 optimizer state columns, but .* needs dim 2 and 2"
    ):
        emb(s, lb.optim.Adagrad(lr=0.1), dim=2)  # (a state per weight: 4 columns too)


@pytest.mark.parametrize("kind", ["mmap", "tiered"])
def test_a_store_file_of_another_dim_optimizer_or_tables_says_which(tmp_path: Path, kind: str) -> None:
    # (reopened by path with another width, it said only "width=6 ... but width=10 was requested")
    path = tmp_path / "t.f32"
    first = emb(path if kind == "mmap" else tiered(path))
    first.store.close()
    for other, message in [
        ({"dim": DIM + 4}, rf"rows of dim {DIM} and 1 optimizer state columns, but .* needs dim {DIM + 4}"),
        ({"optimizer": lb.optim.Adam(lr=0.1)}, "holds rowwise_adagrad optimizer state, but .* uses adam"),
    ]:
        with pytest.raises(ValueError, match=message):
            emb(path, **other)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="was created for other tables"):
        CachedEmbedding(
            lb.Tables([("a", 100), ("b", 301)]), DIM, lb.optim.RowWiseAdagrad(lr=0.1), store=path, seed=1
        )
    emb(path).store.close()  # the right module still opens it


# ---------------------------------------------------------------------------------------------- item 2
def enospc(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_spill_to_a_full_disk_names_the_spill_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.f32"
    store = emb(tiered(path)).store
    assert isinstance(store, TieredStore) and store.log is not None
    monkeypatch.setattr(os, "pwrite", enospc)
    with pytest.raises(OSError) as caught:
        for lo in range(0, 400, 40):  # enough rows to fill the buffer: a spill
            store.write(np.arange(lo, lo + 40), torch.zeros(40, DIM + 1))
    err = caught.value
    log_file = str(store.log.rows_path)
    assert err.errno == errno.ENOSPC and err.filename == log_file
    # the executor reports a background failure by its repr, which leaves the filename out
    assert (
        repr(err)
        == f"OSError(28, 'No space left on device while appending rows to the spill log {log_file}')"
    )
    monkeypatch.undo()
    assert store.log.length == 0  # the failed append left no run behind
    store.close()


def test_atomic_save_to_a_full_disk_names_the_target_and_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "m.ckpt"
    atomic_torch_save({"x": torch.arange(3)}, target)
    real_save = torch.save

    class FullDisk:
        """A file that takes the first ``room`` bytes, then fails like a full disk."""

        def __init__(self, f: Any, room: int) -> None:
            self.f, self.room = f, room

        def write(self, data: Any) -> int:
            n = memoryview(data).nbytes
            if n > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= n
            return self.f.write(data)

        def flush(self) -> None:
            self.f.flush()

    # room for 2000 bytes: torch's zip writer cannot finish the file and raises RuntimeError("[enforce fail
    # at inline_container.cc:...] . unexpected pos ..."), the OSError as its context; then room for all,
    # but the fsync fails
    for room in (2000, 10**9):
        monkeypatch.setattr(
            torch,
            "save",
            lambda obj, f, room=room: real_save(obj, FullDisk(f, room)),  # type: ignore[arg-type]
        )
        if room > 2000:
            monkeypatch.setattr(os, "fsync", enospc)
        with pytest.raises(OSError) as caught:
            atomic_torch_save({"x": torch.zeros(10_000)}, target)
        message = str(caught.value)
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
        assert type(caught.value.__cause__) is (RuntimeError if room == 2000 else OSError)
        assert re.search(
            rf"while saving checkpoint {re.escape(str(target))} \(as the temporary file .*\.tmp", message
        )
        assert "now removed); " in message and "free on its filesystem" in message
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]  # no temporary left
        assert torch.equal(torch.load(target, weights_only=True)["x"], torch.arange(3))  # the old file


def test_a_directory_checkpoint_shard_that_cannot_be_written_is_named_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    npy, pt = tmp_path / "rows.npy", tmp_path / "rank.pt"
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(
        OSError, match=rf"space left on device while writing the checkpoint file {re.escape(str(npy))}"
    ):
        sc._write_npy(npy, torch.zeros(10, 3))
    with pytest.raises(OSError, match=rf"while saving the checkpoint file {re.escape(str(pt))} \(removed\)"):
        sc._write_torch(pt, {"x": 1})
    assert list(tmp_path.iterdir()) == []
    # a whole directory save: the error names the shard; nothing is left, the target is not created
    m = emb(None)
    target = tmp_path / "ck"
    with pytest.raises(
        OSError, match=r"writing the checkpoint file .*\.ck\..*\.tmp/emb\.rows\.00000-of-00001\.npy"
    ):
        sc.save_sharded_checkpoint({"state_dict": {}}, target, {"emb": m}, sc.LocalComm())
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- item 3
class OneRank:
    """The collectives of one rank of a two-rank node, as share_store uses them (rank 1 receives what
    rank 0 broadcast: ``sent``)."""

    def __init__(self, rank: int, sent: Any = None) -> None:
        self.rank, self.world_size, self.sent = rank, 2, sent

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if self.rank == 0:
            self.sent = obj
        return self.sent


def small_shm(monkeypatch: pytest.MonkeyPatch, root: Path, free: int) -> None:
    monkeypatch.setattr(distributed, "_shm_root", lambda: str(root))
    real = os.statvfs

    def statvfs(p: Any) -> os.statvfs_result:
        if str(p) != str(root):
            return real(p)
        return os.statvfs_result((4096, 4096, 16384, free // 4096, free // 4096, 100, 100, 100, 0, 255))

    monkeypatch.setattr(os, "statvfs", statvfs)


def test_a_table_that_does_not_fit_in_dev_shm_is_a_clear_error_on_every_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = emb(None).store  # 400 rows x 5 floats: 8 KiB, a page more with the sidecar
    small_shm(monkeypatch, tmp_path, 8192)
    rank0 = OneRank(0)
    with pytest.raises(RuntimeError) as caught:
        distributed.share_store(store, rank0, "emb")  # type: ignore[arg-type]
    message = str(caught.value)
    assert f"the in-RAM table of emb (400 rows x 5 floats: 12.0 KiB) into {tmp_path} for the ranks" in message
    assert f"{tmp_path} has 8.0 KiB free of 64.0 MiB" in message and "4.0 KiB more free space" in message
    assert "BagpipeStrategy(store='sharded')" in message and "store='path/to/tables.f32'" in message
    assert list(tmp_path.iterdir()) == []  # nothing was made
    with pytest.raises(
        RuntimeError, match=r"^rank 0 could not share the tables: BagpipeStrategy\(store='shared'\)"
    ):
        distributed.share_store(store, OneRank(1, rank0.sent), "emb")  # type: ignore[arg-type]


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_atomic_store_writes_leave_no_temporary_and_remove_killed_writers_ones(tmp_path: Path) -> None:
    # A store's sidecar and a TieredStore's bitmap are written to a temporary and renamed. One killed
    # mid-write (a kill during the end-of-fit flush) stayed beside the store for good; so did one of an
    # interrupted write. Now they are named for their process, and the next write removes dead ones'.
    target = tmp_path / "rows.f32.json"
    host = host_id()
    stale = tmp_path / f".rows.f32.json.{host}.{_dead_pid()}.0badcafe.tmp"
    live = tmp_path / f".rows.f32.json.{host}.{os.getppid()}.0badcafe.tmp"
    # a process of another PID namespace on a host of the same name (containers sharing a folder): its
    # pid means nothing here, so its file stays
    elsewhere = tmp_path / f".rows.f32.json.{socket.gethostname()}-ns1.{_dead_pid()}.0badcafe.tmp"
    for f in (stale, live, elsewhere):
        f.write_bytes(b"half")
    store_module.write_atomically(target, lambda f: f.write(b"{}"), "writing the sidecar")
    assert target.read_bytes() == b"{}" and not stale.exists() and live.exists() and elsewhere.exists()
    elsewhere.unlink()

    def interrupted(f: io.BufferedWriter) -> None:
        f.write(b"{")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store_module.write_atomically(target, interrupted, "writing the sidecar")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name])
    assert target.read_bytes() == b"{}"


def test_a_shared_table_is_named_for_its_process_and_a_killed_runs_copy_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rank 0 killed by SIGKILL (the OOM killer) never ends the sharing: its copy of the table stayed in
    # /dev/shm until reboot. The copy is now named for its process, and the next run removes dead ones'.
    monkeypatch.setattr(distributed, "_shm_root", lambda: str(tmp_path))
    host = host_id()
    stale = tmp_path / f".lightning-bagpipe.{host}.{_dead_pid()}.0badcafe.tmp"
    live = tmp_path / f".lightning-bagpipe.{host}.{os.getppid()}.0badcafe.tmp"  # (a live process's)
    for folder in (stale, live):
        folder.mkdir()
        (folder / "emb.rows").write_bytes(b"x" * 64)
    store = emb(None).store
    shared, end = distributed.share_store(store, OneRank(0), "emb")  # type: ignore[arg-type]
    assert not stale.exists() and live.exists()
    mine = Path(shared.path).parent  # type: ignore[attr-defined]
    assert mine.name.startswith(f".lightning-bagpipe.{host}.{os.getpid()}.") and mine.parent == tmp_path
    end(False)
    assert not mine.exists() and live.exists()


def test_the_dev_shm_hint_names_dockers_shm_size(monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.statvfs_result((4096, 4096, 16384, 10, 10, 100, 100, 100, 0, 255))  # 64 MiB, 40 KiB free
    message = distributed._shm_problem("/dev/shm", MemoryStore(2**20, 20, pin_memory=False), "emb", st)
    assert "(1,048,576 rows x 20 floats: 80.0 MiB) into /dev/shm" in message
    assert "/dev/shm has 40.0 KiB free of 64.0 MiB" in message
    assert "docker run --shm-size=N with N of at least 144.0 MiB" in message


def test_space_taken_after_the_check_is_an_error_rather_than_a_bus_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store: EmbeddingStore = emb(None).store
    small_shm(monkeypatch, tmp_path, 2**20)  # the check passes ...
    monkeypatch.setattr(os, "posix_fallocate", enospc)  # ... but the space is gone when the file is made
    with pytest.raises(RuntimeError, match=r"has 1\.0 MiB free of 64\.0 MiB"):
        distributed.share_store(store, OneRank(0), "emb")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []  # the file and its folder were removed


def test_a_table_that_fits_is_shared_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = emb(None)
    small_shm(monkeypatch, tmp_path, 2**20)
    shared, end = distributed.share_store(original.store, OneRank(0), "emb")  # type: ignore[arg-type]
    assert isinstance(shared, MmapStore) and str(shared.path).startswith(str(tmp_path))
    shared.write([3], torch.full((1, DIM + 1), 2.0))
    end(True)
    assert original.store.read([3]).eq(2).all() and list(tmp_path.iterdir()) == []


def test_sidecar_and_bitmap_write_failures_name_the_file_and_leave_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mm = MmapStore(tmp_path / "m.f32", num_rows=10, width=3, mode="create")
    ts = TieredStore(tmp_path / "t.f32", num_rows=10, width=3, mode="create")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(
        OSError, match=rf"No space left on device while writing the sidecar {re.escape(str(mm.sidecar))}"
    ):
        mm.set_metadata(note=1)
    with pytest.raises(
        OSError, match=rf"while saving the bitmap of written rows {re.escape(str(ts.bitmap_path))}"
    ):
        ts._save_bitmap()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
    monkeypatch.undo()
    mm.close()
    ts.close()


def test_a_full_disk_while_filling_a_new_file_store_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # without the space reserved first, the fill writes through the mapping and a full disk is a SIGBUS
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    path = tmp_path / "t.f32"
    with pytest.raises(
        OSError, match=rf"No space left on device while allocating .* store file {re.escape(str(path))}"
    ):
        emb(str(path))
    monkeypatch.undo()
    store = emb(str(path)).store  # (the interrupted fill is redone)
    assert store.metadata["initialized"] is True and float(store.tensor().abs().sum()) > 0


# ---------------------------------------------------------------------------------------------- item 4
# A compaction writes the spill log's rows into the row file through its mapping. In a sparse file a write
# into a page without a block needs one; on a full disk the process died of SIGBUS. The blocks are now
# allocated first (posix_fallocate of the rows' pages).
CTABLES = lb.Tables([("a", 2000)])
CDIM = 300  # rows of 301 floats (1204 bytes): some straddle two pages
CWIDTH = CDIM + 1


def compacting(path: Path, log_rows: int = 100) -> TieredStore:
    """A lazily initialised TieredStore of 2000 rows with a buffer of 32 rows and a log of ``log_rows``:
    writes of new rows fill the log with distinct rows, so a full log is compacted (not merged)."""
    s = TieredStore(
        path, CTABLES.total_rows, CWIDTH, buffer_bytes=40_000, log_bytes=log_rows * (4 * CWIDTH + 8)
    )
    assert s.capacity == 32
    s.initialize_lazily(CTABLES, CDIM, torch.zeros(1), seed=1)
    return s


def every_row(s: TieredStore) -> torch.Tensor:
    return s.read(np.arange(s.num_rows))


def test_a_full_disk_during_a_compaction_is_an_error_naming_the_row_file_and_loses_no_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.f32"
    s = compacting(path)
    order = np.random.default_rng(5).permutation(CTABLES.total_rows)
    ref = every_row(s)  # (the initial values)
    for step in range(0, 2000, 20):  # 20 new rows a write: the buffer spills every other write
        if s.compactions == 1:  # the file holds rows now; the disk fills before the next compaction
            monkeypatch.setattr(os, "posix_fallocate", enospc)
        ids, rows = order[step : step + 20], torch.randn(20, CWIDTH)
        before, compactions, logged = files_of(path), s.compactions, s.log.length  # type: ignore[union-attr]
        try:
            s.write(ids, rows)
        except OSError as caught:
            err = caught
            break
        ref[torch.from_numpy(ids)] = rows
    else:
        pytest.fail("no compaction met the full disk")
    assert err.errno == errno.ENOSPC and err.filename == str(path)
    assert re.fullmatch(
        rf"No space left on device while allocating space in the store file {re.escape(str(path))} for the "
        r"100 rows a compaction writes into it from the spill log \(which still holds them\)",
        err.strerror,
    )
    # raised before anything was written: every file as it was (row file, bitmap, log, sidecar), every row
    # reads as before, the log still holds its rows
    assert files_of(path) == before
    assert s.compactions == compactions == 1 and s.log is not None and s.log.length == logged == 100
    assert torch.equal(every_row(s), ref)
    with pytest.raises(OSError, match="No space left on device while allocating"):
        s.flush()  # (spills: the same compaction, the same error, still nothing changed)
    assert files_of(path) == before and torch.equal(every_row(s), ref)
    # once there is space again, the write that failed goes through: its spill compacts the log
    monkeypatch.undo()
    s.write(ids, rows)
    ref[torch.from_numpy(ids)] = rows
    assert s.compactions == 2 and torch.equal(every_row(s), ref)
    s.close()
    again = TieredStore(path, buffer_bytes=40_000, log_bytes=100 * (4 * CWIDTH + 8))
    assert torch.equal(every_row(again), ref)
    again.close()


def test_reopening_with_another_log_size_on_a_full_disk_is_an_error_and_keeps_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store opened with another ``log_bytes`` first compacts the log it had, in its constructor."""
    path = tmp_path / "t.f32"
    s = compacting(path)
    ids = np.arange(0, 2000, 23)
    rows = torch.randn(ids.size, CWIDTH)
    s.write(ids, rows)
    ref = every_row(s)
    s.close()
    before = files_of(path)
    assert json.loads(Path(f"{path}.json").read_text())["metadata"]["log_runs"]  # (rows in the log)
    monkeypatch.setattr(os, "posix_fallocate", enospc)
    with pytest.raises(OSError) as caught:
        TieredStore(path, buffer_bytes=40_000, log_bytes=0)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert files_of(path) == before  # the log is still the store's, unchanged
    monkeypatch.undo()
    again = TieredStore(path, buffer_bytes=40_000, log_bytes=0)
    assert again.log is None and again.compactions == 1 and torch.equal(every_row(again), ref)
    again.close()


def pages_of(ids: np.ndarray, row_bytes: int) -> set[int]:
    """The pages of the row file that rows ``ids`` lie in (a row may straddle two)."""
    page = mmap.PAGESIZE
    return {
        p for i in ids.tolist() for p in range(i * row_bytes // page, ((i + 1) * row_bytes - 1) // page + 1)
    }


def test_a_compaction_allocates_the_pages_of_its_new_rows_in_runs_and_still_writes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.f32"
    s = compacting(path, log_rows=4000)  # (a log that is never full: the test compacts it)
    row_bytes, nbytes = 4 * CWIDTH, s.file.nbytes
    calls: list[tuple[int, int]] = []
    real = os.posix_fallocate

    def spy(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", spy)
    ref = every_row(s)
    rng = np.random.default_rng(2)
    first = np.unique(np.concatenate([np.arange(100, 160), rng.choice(2000, 150, replace=False)]))
    second = np.unique(np.concatenate([first[::3], rng.choice(2000, 150, replace=False)]))  # some in the file
    for ids in (first, second):
        new = np.setdiff1d(ids, np.flatnonzero(np.unpackbits(s._written, bitorder="little")[:2000]))
        rows = torch.randn(ids.size, CWIDTH)
        for lo in range(0, ids.size, 30):  # (through the buffer into the log)
            s.write(ids[lo : lo + 30], rows[lo : lo + 30])
        s.flush()
        ref[torch.from_numpy(ids)] = rows
        calls.clear()
        s._compact()
        # one call per run of adjacent pages of the rows new to the file, each page once, none past its end
        want = sorted(pages_of(new, row_bytes))
        runs = 1 + sum(b != a + 1 for a, b in itertools.pairwise(want))
        got = [
            p
            for offset, length in calls
            for p in range(offset // mmap.PAGESIZE, -(-(offset + length) // mmap.PAGESIZE))
        ]
        assert sorted(got) == want and len(calls) == runs < len(new)
        assert ids is first or pages_of(np.setdiff1d(ids, new), row_bytes) - set(want)  # (skipped pages)
        assert all(offset % mmap.PAGESIZE == 0 and offset + length <= nbytes for offset, length in calls)
        assert path.stat().st_size == nbytes
        assert s.log is not None and s.log.length == 0 and torch.equal(every_row(s), ref)
    assert s.compactions == 2

    # a file system that cannot preallocate: the compaction writes its rows as it used to
    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    s.write(np.arange(1900, 1930), torch.ones(30, CWIDTH))
    s.flush()
    s._compact()
    ref[1900:1930] = 1.0
    assert s.compactions == 3 and torch.equal(every_row(s), ref)
    s.close()
    again = TieredStore(path, buffer_bytes=40_000)
    assert torch.equal(every_row(again), ref)
    again.close()


def test_a_spill_into_the_row_file_on_a_full_disk_is_an_error_and_keeps_the_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a spill log (``log_bytes=0``) a full buffer is written into the row file: its blocks are
    allocated first too, so a full disk is an error and the buffered rows stay."""
    path = tmp_path / "t.f32"
    s = TieredStore(path, CTABLES.total_rows, CWIDTH, buffer_bytes=40_000, log_bytes=0)
    assert s.capacity == 32 and s.log is None
    s.initialize_lazily(CTABLES, CDIM, torch.zeros(1), seed=1)
    ref = every_row(s)
    first = np.arange(0, 600, 30)  # 20 rows: they stay in the buffer
    rows = torch.randn(first.size, CWIDTH)
    s.write(first, rows)
    ref[torch.from_numpy(first)] = rows
    before = files_of(path)
    monkeypatch.setattr(os, "posix_fallocate", enospc)
    second = np.arange(1000, 1600, 30)  # 20 more: the buffer spills into the file first
    with pytest.raises(OSError) as caught:
        s.write(second, torch.randn(second.size, CWIDTH))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert "rows a spill writes into it (the RAM buffer still holds them)" in str(caught.value.strerror)
    assert files_of(path) == before and torch.equal(every_row(s), ref)
    monkeypatch.undo()
    s.close()  # (flushes the buffer into the file)
    again = TieredStore(path, buffer_bytes=40_000, log_bytes=0)
    assert torch.equal(every_row(again), ref)
    again.close()


def test_a_bitmap_save_to_a_full_disk_keeps_the_errno(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the bitmap was written by ndarray.tofile, whose OSError on a full disk had no errno (seen on a full
    # ext4 image); it is written by the file's own write now
    import lightning_bagpipe.embedding.store as store_module

    ts = TieredStore(tmp_path / "t.f32", num_rows=1000, width=3, mode="create")

    class FullFile(io.FileIO):
        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_module, "open", lambda path, mode: FullFile(path, "w"), raising=False)
    with pytest.raises(OSError) as caught:
        ts._save_bitmap()
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(ts.bitmap_path)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
    monkeypatch.undo()
    ts.close()


@pytest.mark.parametrize("call", ["write_range", "tensor"])
def test_write_range_and_tensor_on_a_full_disk_are_errors_that_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """The last writes through a TieredStore's mapping: a range of rows, and tensor()'s rows never written
    (the whole table of a lazily initialised store). Their blocks are allocated first too."""
    path = tmp_path / "t.f32"
    s = compacting(path)
    ref = every_row(s)
    s.flush()
    before = files_of(path)
    monkeypatch.setattr(os, "posix_fallocate", enospc)
    with pytest.raises(OSError) as caught:
        if call == "write_range":
            s.write_range(100, torch.randn(300, CWIDTH))
        else:
            s.tensor()
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    what = (
        "300 rows write_range() writes"
        if call == "write_range"
        else "rows never written that tensor() writes"
    )
    assert what in str(caught.value.strerror)
    assert files_of(path) == before and torch.equal(every_row(s), ref)
    monkeypatch.undo()
    if call == "write_range":
        rows = torch.randn(300, CWIDTH)
        s.write_range(100, rows)
        ref[100:400] = rows
    assert torch.equal(s.tensor(), ref)  # with space, both work
    s.close()


# ---------------------------------------------------------------------------------------------- item 5
# The two small files that decide what a store reads carry a checksum: a damaged bitmap would read rows
# from the file that were never written there (or compute as initial rows that were trained), a damaged
# sidecar would describe other rows (another seed: other initial values), both silently.
HEADER = ts_module.BITMAP_HEADER_BYTES
REMEDY = r"Restore the (bitmap|sidecar) from a backup .*\.store_files\(path\) lists them\) and resume"


def flip(file: Path, offset: int, mask: int = 1) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= mask
    file.write_bytes(bytes(data))


def lazy_trained(path: Path) -> tuple[TieredStore, torch.Tensor]:
    """A closed, lazily initialised TieredStore file with rows in its row file, its log and neither; the
    rows as they read."""
    s = TieredStore(path, TABLES.total_rows, DIM + 1, buffer_bytes=4096, log_bytes=30_000)
    s.initialize_lazily(TABLES, DIM, torch.zeros(1), seed=1)
    s.write(TRAINED_IDS, torch.randn(TRAINED_IDS.size, DIM + 1) + 5.0)
    s._compact()  # (rows in the row file: bits set)
    s.write(np.arange(1, 40, 2), torch.randn(20, DIM + 1))
    table = every_row(s)
    s.close()
    return s, table


@pytest.mark.parametrize("where", ["bits", "crc", "tag"])
def test_a_flipped_bit_in_the_bitmap_is_refused_naming_it(tmp_path: Path, where: str) -> None:
    path = tmp_path / "t.f32"
    s, table = lazy_trained(path)
    bitmap = s.bitmap_path
    assert bitmap.read_bytes()[:8] == ts_module.BITMAP_MAGIC
    assert bitmap.stat().st_size == HEADER + (TABLES.total_rows + 7) // 8
    # a bit of a row never written (it would read from the file's zeros), a byte of the CRC, of the tag
    offset = {"bits": HEADER + 1, "crc": 9, "tag": 0}[where]
    assert where != "bits" or not s._written[1] & 1
    flip(bitmap, offset)
    before = files_of(path)
    what = r"its bits do not match the CRC-32" if where != "tag" else r"its header lacks its tag"
    for opener in (
        lambda: TieredStore(path),
        lambda: emb(path),
        lambda: emb(tiered(path)),
        lambda: TieredStore(path, log_bytes=0),  # (would compact its log first)
    ):
        with pytest.raises(ValueError) as caught:
            opener()
        message = str(caught.value)
        assert re.search(rf"{re.escape(str(bitmap))}, is damaged \({what}", message), message
        assert "the store cannot tell which rows it holds" in message
        assert re.search(REMEDY, message), message
    assert files_of(path) == before  # refused before anything was written
    flip(bitmap, offset)  # (undone)
    # a whole byte of the bits, as a disk might garble it
    flip(bitmap, HEADER + 20, 0x5A)
    with pytest.raises(ValueError, match=r"is damaged \(its bits do not match"):
        TieredStore(path)
    flip(bitmap, HEADER + 20, 0x5A)  # (undone: the file is whole again)
    again = TieredStore(path)
    assert torch.equal(every_row(again), table)
    again.close()


def sidecar_text(path: Path) -> str:
    return Path(f"{path}.json").read_text()


@pytest.mark.parametrize("kind", ["mmap", "tiered"])
def test_a_value_changed_in_the_sidecar_is_refused_naming_it(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "t.f32"
    trained(path, kind)
    sidecar = Path(f"{path}.json")
    text = sidecar_text(path)
    header = json.loads(text)
    assert header[CHECKSUM_KEY] == sidecar_checksum(header) and re.fullmatch(
        r"crc32:[0-9a-f]{8}", header[CHECKSUM_KEY]
    )
    assert '"seed": 1,' in text  # one byte changed: still valid JSON, another valid seed
    for damaged, what in (
        (text.replace('"seed": 1,', '"seed": 3,'), "its content does not match its checksum"),
        (text.replace('"width": 5', '"width": 4'), "its content does not match its checksum"),
        (text.replace('"crc32:', '"crc33:'), "its content does not match its checksum"),
        # (the checksum's own key damaged: no longer checked, but no version writes that key)
        (text.replace('"checksum"', '"checksuM"'), r"it has no 'checksum' but 'checksuM'"),
    ):
        assert damaged != text
        sidecar.write_text(damaged)
        before = files_of(path)
        for opener in (lambda: emb(path), lambda: MmapStore(path), lambda: TieredStore(path)):
            with pytest.raises(ValueError) as caught:
                opener()
            message = str(caught.value)
            assert message.startswith(f"MmapStore('{path}'): sidecar {sidecar} is damaged: "), message
            assert what in message and "cannot be trusted" in message
            assert re.search(REMEDY, message), message
            assert "If you edited the sidecar on purpose, remove its 'checksum' key" in message
        assert files_of(path) == before
    # as the message says: an edit made on purpose opens once its checksum is removed
    edited = json.loads(text.replace('"seed": 1,', '"seed": 3,'))
    del edited[CHECKSUM_KEY]
    sidecar.write_text(json.dumps(edited))
    m = emb(path)
    assert m.store.metadata["seed"] == 3
    m.store.set_metadata()  # (written again, with its checksum; a TieredStore also does at every flush)
    m.store.close()
    assert json.loads(sidecar.read_text())[CHECKSUM_KEY] == sidecar_checksum(edited)
    emb(path).store.close()


@pytest.mark.parametrize("kind", ["mmap", "tiered"])
def test_files_written_before_checksums_still_open_and_are_checked_once_rewritten(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "t.f32"
    table = trained(path, kind)
    sidecar, bitmap = Path(f"{path}.json"), Path(f"{path}.written")
    # the formats before: the sidecar without 'checksum' (indented as it was), the bitmap's bits alone
    header = json.loads(sidecar.read_text())
    del header[CHECKSUM_KEY]
    sidecar.write_text(json.dumps(header, indent=1, sort_keys=True))
    if kind == "tiered":
        bitmap.write_bytes(bitmap.read_bytes()[HEADER:])
        assert bitmap.stat().st_size == (TABLES.total_rows + 7) // 8
    m = emb(path if kind == "mmap" else tiered(path))
    assert torch.equal(m.store.read(np.arange(TABLES.total_rows)), table)
    m.store.write([2], torch.full((1, DIM + 1), 3.0))
    m.store.close()
    table[2] = 3.0
    header = json.loads(sidecar.read_text())
    if kind == "mmap":  # (an MmapStore writes its sidecar only when its metadata changes)
        assert CHECKSUM_KEY not in header
        s = MmapStore(path)
        s.set_metadata()
        s.close()
        header = json.loads(sidecar.read_text())
    # rewritten with their checksums (a TieredStore at every flush), which are checked from then on
    assert header[CHECKSUM_KEY] == sidecar_checksum(header)
    if kind == "tiered":
        assert bitmap.read_bytes()[:8] == ts_module.BITMAP_MAGIC
        flip(bitmap, bitmap.stat().st_size - 1)
        with pytest.raises(ValueError, match=rf"{re.escape(str(bitmap))}, is damaged"):
            emb(path)
        flip(bitmap, bitmap.stat().st_size - 1)
    again = emb(path)
    assert torch.equal(again.store.read(np.arange(TABLES.total_rows)), table)
    again.store.close()
    # an old sidecar is not checked, so another valid value in one still opens (what checksums stop now)
    header = json.loads(sidecar.read_text())
    del header[CHECKSUM_KEY]
    header["metadata"]["note"] = "edited"
    sidecar.write_text(json.dumps(header))
    emb(path).store.close()
    # a bitmap of another length is still refused by its length, with or without its header
    if kind == "tiered":
        whole = bitmap.read_bytes()
        for wrong, size in ((whole[:-1], 49), (whole[HEADER:-1], 49), (whole + b"\0", 51)):
            bitmap.write_bytes(wrong)
            with pytest.raises(ValueError, match=rf"has {size} bytes, expected 50 \(one bit per row of 400"):
                TieredStore(path)


def checked(path: Path) -> None:
    """Assert that the sidecar and the bitmap of ``path`` (if any) are whole: their checksums match."""
    header = json.loads(Path(f"{path}.json").read_text())
    assert header[CHECKSUM_KEY] == sidecar_checksum(header)
    bitmap = Path(f"{path}.written")
    if bitmap.exists():
        data = bitmap.read_bytes()
        assert data[:8] == ts_module.BITMAP_MAGIC
        assert int.from_bytes(data[8:HEADER], "little") == zlib.crc32(data[HEADER:])


def test_a_store_reopens_after_many_flushes_spills_merges_and_compactions(tmp_path: Path) -> None:
    path = tmp_path / "t.f32"
    rng = np.random.default_rng(3)
    s = tiered(path)(TABLES.total_rows, DIM + 1)
    s.initialize_lazily(TABLES, DIM, torch.zeros(1), seed=1)
    ref = every_row(s)
    spills = merges = compactions = 0
    for rnd in range(6):
        for k in range(15):
            ids = np.sort(rng.choice(TABLES.total_rows, 40, replace=False))
            rows = torch.randn(ids.size, DIM + 1)
            s.write(ids, rows)
            ref[torch.from_numpy(ids)] = rows
            s.flush()
            if k == 14 and rnd in (1, 4):
                s._compact()  # (the log of 800 rows never fills with more than 90% distinct rows of 400)
            checked(path)
        spills, merges, compactions = spills + s.spills, merges + s.log_merges, compactions + s.compactions
        s.close()
        s = tiered(path)(TABLES.total_rows, DIM + 1)
        assert torch.equal(every_row(s), ref)
        if rnd == 2:
            s.reset_to_initial()
            ref = every_row(s)
    assert spills == 90 and merges > 0 and compactions > 0
    s.close()
    other = TieredStore(path, log_bytes=0)  # (another log size: its log is compacted into the file)
    assert other.compactions == 1 and torch.equal(every_row(other), ref)
    other.close()
    checked(path)
    assert torch.equal(every_row(TieredStore(path, log_bytes=0)), ref)


def test_a_crash_between_any_two_file_writes_is_not_reported_as_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file is replaced whole (temporary, fsync, rename) and checked on its own, so the files a
    process leaves when it dies before or after any of those writes open (the sidecar and the bitmap may
    be of different moments: each is whole)."""
    path = tmp_path / "run" / "t.f32"
    path.parent.mkdir()
    snapshots: list[dict[str, bytes]] = []
    real = store_module.write_atomically

    def spy(target: Path, write: Any, what: str) -> None:
        snapshots.append(files_of(path))  # a crash before this write ...
        real(target, write, what)
        snapshots.append(files_of(path))  # ... and after it

    monkeypatch.setattr(store_module, "write_atomically", spy)
    monkeypatch.setattr(ts_module, "write_atomically", spy)
    rng = np.random.default_rng(4)
    m = emb(tiered(path))
    for _ in range(25):
        ids = np.sort(rng.choice(TABLES.total_rows, 40, replace=False))
        m.store.write(ids, torch.randn(ids.size, DIM + 1))
        if rng.random() < 0.3:
            m.store.flush()
    assert isinstance(m.store, TieredStore) and m.store.log_merges > 0
    m.store.close()
    again = TieredStore(path, log_bytes=0)  # (compacts: the bitmap, then the sidecar)
    again.close()
    monkeypatch.undo()
    assert len(snapshots) > 60
    opened = 0
    for k, files in enumerate(snapshots):
        if "t.f32.json" not in files:
            continue  # (a crash while the store was created: no sidecar yet, as before)
        crashed = tmp_path / f"crash{k}"
        crashed.mkdir()
        for name, data in files.items():
            (crashed / name).write_bytes(data)
        s = TieredStore(crashed / "t.f32", buffer_bytes=4096, log_bytes=30_000)  # no ValueError
        s.read(np.arange(TABLES.total_rows))
        s.close()
        opened += 1
    assert opened > 60


# ---------------------------------------------------------------------- creations that fail
def test_a_store_whose_creation_fails_leaves_no_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.f32"

    def full_disk(self: MmapStore) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.sidecar))

    with monkeypatch.context() as m:
        m.setattr(MmapStore, "_write_sidecar", full_disk)
        with pytest.raises(OSError, match="No space"):
            MmapStore(path, 10, 3, mode="create")
    assert list(tmp_path.iterdir()) == []  # (it used to leave the row file, with no sidecar)
    MmapStore(path, 10, 3, mode="create").close()  # the retry is a creation again


def test_a_tiered_store_created_with_a_bad_argument_leaves_no_file_behind(tmp_path: Path) -> None:
    path = tmp_path / "t.f32"
    with pytest.raises(ValueError, match="buffer_bytes"):
        TieredStore(path, 1000, 5, buffer_bytes=10)
    assert list(tmp_path.iterdir()) == []
    TieredStore(path, 1000, 5, buffer_bytes=2**16, mode="create").close()
    # opening the existing store with a bad argument leaves its files as they were
    files = sorted(tmp_path.iterdir())
    with pytest.raises(ValueError, match="log_bytes"):
        TieredStore(path, buffer_bytes=2**16, log_bytes=-1)
    assert sorted(tmp_path.iterdir()) == files
    TieredStore(path, buffer_bytes=2**16).close()


def test_a_store_reports_the_file_it_mapped_not_what_its_path_names_now(tmp_path: Path) -> None:
    # Under torchrun a rank can open a store file that rank 0 then replaces (--overwrite-store): the ranks'
    # "one file?" check compared what the path named then, found one file, and the ranks trained
    # different files. Each store now reports the file it mapped, and the strategy refuses such ranks.
    path = tmp_path / "t.f32"
    old = MmapStore(path, num_rows=10, width=4, mode="create", lock=False)
    path.unlink()
    Path(f"{path}.json").unlink()
    new = MmapStore(path, num_rows=10, width=4, mode="create", lock=False)
    a, b = distributed.store_place(old), distributed.store_place(new)
    assert a is not None and b is not None
    assert a[:2] == b[:2] and a[2:] != b[2:]  # (same host and path, another file)
    assert distributed.store_place(MmapStore(path, lock=False)) == b
    old.close()
    new.close()
