"""TieredStore: lazily initialised rows and a RAM write buffer in front of a memory-mapped file."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lightning_bagpipe as lb
from lightning_bagpipe.embedding.distributed import share_store
from lightning_bagpipe.embedding.init import initial_rows
from lightning_bagpipe.embedding.spill_log import SpillLog, log_files
from lightning_bagpipe.embedding.store import MmapStore
from lightning_bagpipe.embedding.tiered_store import DEFAULT_LOG_BYTES, TieredStore, buffer_capacity
from lightning_bagpipe.id_map import IdMap
from lightning_bagpipe.tables import Tables
from tests.helpers import ListDataModule, TinyModel, quiet_trainer, random_batches, small_tables
from tests.test_exactness import DENSE_LR, DIM, OPTIMIZERS, train_reference

TABLES = Tables([("a", 300), ("b", 7), ("c", 900)])
SEED = 3
STATE = torch.tensor([0.25, -1.0])
WIDTH = DIM + 2


def initial_table() -> torch.Tensor:
    """Every row's initial value: the recipe's weights, then the optimizer state."""
    full = torch.empty(TABLES.total_rows, WIDTH)
    full[:, :DIM] = initial_rows(TABLES, DIM, SEED, 0, TABLES.total_rows)
    full[:, DIM:] = STATE
    return full


def buffer_for(rows: int, width: int = WIDTH) -> int:
    """The smallest buffer_bytes that holds ``rows`` rows."""
    nbytes = rows * (width * 4 + 8)
    while buffer_capacity(nbytes, width) < rows:
        nbytes += 8
    return nbytes


#: Spill logs: none (spills write the row file), one of 50 rows (full after a few spills: compactions),
#: and the default.
LOGS = {"no_log": 0, "small_log": 50 * (WIDTH * 4 + 8), "default_log": DEFAULT_LOG_BYTES}


def lazy_store(path: Path, rows_in_buffer: int, log: str = "default_log") -> TieredStore:
    s = TieredStore(
        path, TABLES.total_rows, WIDTH, buffer_bytes=buffer_for(rows_in_buffer), log_bytes=LOGS[log]
    )
    assert s.capacity == min(rows_in_buffer, TABLES.total_rows)
    s.initialize_lazily(TABLES, DIM, STATE, SEED)
    s.SPILL_CHUNK_ROWS = 5  # spills write the file in several chunks
    return s


# ---------------------------------------------------------------------- the buffer's size
@pytest.mark.parametrize("nbytes", [300, 1000, 4096, 10**6, 256 * 2**20])
def test_the_buffer_and_its_index_fit_in_buffer_bytes(nbytes: int) -> None:
    rows = buffer_capacity(nbytes, WIDTH)
    assert rows >= 1
    index = IdMap(rows).nbytes  # what the store allocates for that many rows
    assert rows * (WIDTH * 4 + 8) + index <= nbytes
    if nbytes >= 4096:  # (below that the smallest index, 256 bytes, dominates)
        # one row more would need more than twice the budget's share per row: little is left unused
        assert (rows + 1) * (WIDTH * 4 + 8) + 2 * 12 * (rows + 1) > nbytes * 0.5


# ---------------------------------------------------------------------- the store against a plain table
@pytest.mark.parametrize("log", list(LOGS))
@pytest.mark.parametrize("rows_in_buffer", [1, 37, 5000])
def test_reads_return_the_newest_write_or_the_initial_value(
    tmp_path: Path, rows_in_buffer: int, log: str
) -> None:
    s = lazy_store(tmp_path / "t.f32", rows_in_buffer, log)
    ref = initial_table()
    rng = np.random.default_rng(rows_in_buffer)
    for step in range(60):
        ids = rng.choice(TABLES.total_rows, size=int(rng.integers(1, 80)), replace=False)
        rows = torch.randn(ids.size, WIDTH)
        s.write(ids, rows, check_unique=bool(step % 2))
        ref[torch.from_numpy(ids)] = rows
        probe = rng.integers(0, TABLES.total_rows, 200)
        assert torch.equal(s.read(probe), ref[torch.from_numpy(probe)]), step
    if rows_in_buffer < 80:
        assert s.spills > 0  # the buffer overflowed and was written to the file
        if log != "default_log":  # a full log was written to the file (there is no log to fill)
            assert (s.compactions > 0) == (log == "small_log")
    else:
        assert s.spills == 0 and s.buffered_rows > 0
    # the time spent writing to disk and compacting is counted (the writes spilled or compacted only)
    assert (s.spill_seconds > 0) == (rows_in_buffer < 80)
    assert (s.compaction_seconds > 0) == (s.compactions > 0)
    out = torch.empty(4, WIDTH)
    s.read_into([0, 5, 5, 1206], out)
    assert torch.equal(out, ref[[0, 5, 5, 1206]])
    assert torch.equal(s.read_range(290, 320), ref[290:320])
    s.write_range(100, torch.ones(50, WIDTH))
    ref[100:150] = 1.0
    assert torch.equal(s.read(np.arange(TABLES.total_rows)), ref)
    assert torch.equal(s.tensor(), ref)  # materialised: every row, as a view of the file
    s.close()


@pytest.mark.parametrize("log", ["no_log", "default_log"])
def test_a_new_store_writes_nothing_to_its_file_until_a_spill(tmp_path: Path, log: str) -> None:
    s = lazy_store(tmp_path / "t.f32", 100, log)
    s.write([5, 700], torch.full((2, WIDTH), 2.0))
    assert torch.equal(s.file.tensor(), torch.zeros(TABLES.total_rows, WIDTH))  # all in RAM
    assert s.read([5, 6])[0].eq(2.0).all() and torch.equal(s.read([6]), initial_table()[6:7])
    s.flush()
    on_disk = s.file.tensor()
    if log == "no_log":
        assert on_disk[[5, 700]].eq(2.0).all() and on_disk[6].eq(0).all()  # only the written rows
    else:  # appended to the spill log, one row after the other; the row file is untouched
        assert s.log is not None and s.log.length == 2 and on_disk.eq(0).all()
        rows_file, _ = log_files(tmp_path / "t.f32")
        assert np.fromfile(rows_file, dtype=np.float32, count=2 * WIDTH).tolist() == [2.0] * (2 * WIDTH)
    assert s.rows_in_file() == 2
    s.close()


def test_materialising_a_large_unwritten_table_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = lazy_store(tmp_path / "t.f32", 100)
    assert s.rows_in_file() == 0
    s.write([5, 700, 1206], torch.full((3, WIDTH), 2.0))
    assert s.rows_in_file() == 0  # still in the buffer
    s.flush()
    assert s.rows_in_file() == 3
    todo = TABLES.total_rows - 3
    monkeypatch.setattr(TieredStore, "MATERIALIZE_WARN_BYTES", todo * WIDTH * 4 - 1)
    with pytest.warns(UserWarning, match=f"writing {todo:,} rows that were never written"):
        full = s.tensor()
    assert torch.equal(full[[5, 700, 1206]], torch.full((3, WIDTH), 2.0))
    assert s.rows_in_file() == TABLES.total_rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything is in the file now: nothing to write, no warning
        s.tensor()
    s.close()
    small = lazy_store(tmp_path / "small.f32", 100)
    monkeypatch.setattr(TieredStore, "MATERIALIZE_WARN_BYTES", TABLES.total_rows * WIDTH * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at the limit: no warning
        small.tensor()
    small.close()


@pytest.mark.parametrize("rows_in_buffer", [12, 5000])
def test_written_ids_are_the_rows_in_the_buffer_or_the_file(tmp_path: Path, rows_in_buffer: int) -> None:
    s = lazy_store(tmp_path / "t.f32", rows_in_buffer)
    assert s.written_ids() is not None and s.written_ids().size == 0  # type: ignore[union-attr]
    rng = np.random.default_rng(rows_in_buffer)
    written: set[int] = set()
    for _ in range(12):
        ids = rng.choice(TABLES.total_rows, size=9, replace=False)
        s.write(ids, torch.randn(ids.size, WIDTH))
        written.update(ids.tolist())
    assert (s.spills > 0) == (rows_in_buffer == 12) and s.buffered_rows > 0
    got = s.written_ids()
    assert got is not None and got.dtype == np.int64
    assert got.tolist() == sorted(written)  # buffer and file, each row once, ascending
    for lo, hi in [(0, 300), (301, 1207), (8, 9), (0, TABLES.total_rows)]:
        part = s.written_ids(lo, hi)
        assert part is not None and part.tolist() == [i for i in sorted(written) if lo <= i < hi]
    with pytest.raises(ValueError, match=r"row range \[5, 1300\) is not within"):
        s.written_ids(5, 1300)
    # more than half of a range written: the range itself is the smaller description
    s.write_range(0, torch.zeros(160, WIDTH))
    assert s.written_ids(0, 300) is None and s.written_ids(300, 1207) is not None
    s.close()


def test_reset_to_initial_forgets_every_written_row(tmp_path: Path) -> None:
    s = lazy_store(tmp_path / "t.f32", 6)
    ids = np.arange(3, 1200, 11)
    for part in np.array_split(ids, 25):  # spills, and leaves some rows in the buffer
        s.write(part, torch.full((part.size, WIDTH), 5.0))
    assert s.spills > 0 and s.buffered_rows > 0
    s.reset_to_initial()
    assert s.written_ids() is not None and s.written_ids().size == 0  # type: ignore[union-attr]
    assert s.buffered_rows == 0 and s.rows_in_file() == 0
    assert torch.equal(s.read(np.arange(TABLES.total_rows)), initial_table())
    s.write([3], torch.full((1, WIDTH), -1.0))
    s.close()
    again = TieredStore(tmp_path / "t.f32", buffer_bytes=2**20)  # the reset bitmap was saved
    expect = initial_table()
    expect[3] = -1.0
    assert torch.equal(again.read(np.arange(TABLES.total_rows)), expect)
    again.close()


def test_a_file_that_holds_every_row_does_not_track_written_rows(tmp_path: Path) -> None:
    m = MmapStore(tmp_path / "full.f32", TABLES.total_rows, WIDTH)
    m.close()
    s = TieredStore(tmp_path / "full.f32", buffer_bytes=2**20)
    assert s.written_ids() is None and lb.MemoryStore(10, 3).written_ids() is None
    with pytest.raises(ValueError, match="not initialised lazily"):
        s.reset_to_initial()
    s.close()


@pytest.mark.parametrize("log", list(LOGS))
def test_a_flushed_store_reopens_as_it_was(tmp_path: Path, log: str) -> None:
    path = tmp_path / "t.f32"
    s = lazy_store(path, 10, log)
    ref = initial_table()
    ids = np.arange(0, 1200, 7)
    s.write(ids, torch.arange(ids.size * WIDTH, dtype=torch.float32).view(-1, WIDTH))
    ref[torch.from_numpy(ids)] = torch.arange(ids.size * WIDTH, dtype=torch.float32).view(-1, WIDTH)
    s.write([3], torch.full((1, WIDTH), -4.0))  # stays in the buffer until flush
    ref[3] = -4.0
    s.close()
    again = TieredStore(path, buffer_bytes=2**20, log_bytes=LOGS[log])
    assert again.metadata["lazy"] is True
    assert torch.equal(again.read(np.arange(TABLES.total_rows)), ref)
    again.close()
    # reopened with another log size (or none): the old log is written into the row file first
    other = "no_log" if log != "no_log" else "small_log"
    moved = TieredStore(path, buffer_bytes=2**20, log_bytes=LOGS[other])
    assert torch.equal(moved.read(np.arange(TABLES.total_rows)), ref)
    assert moved.log is None or moved.log.length == 0
    # the old log's files are gone; a new log has its own pair only
    assert [p.exists() for p in (*log_files(path, 0), *log_files(path, 1))] == [other != "no_log"] * 2 + [
        False
    ] * 2
    moved.close()
    assert torch.equal(TieredStore(path, buffer_bytes=2**20).read(np.arange(TABLES.total_rows)), ref)


def write_tracking_spills(
    s: TieredStore, ids: np.ndarray, ref: torch.Tensor, on_disk: torch.Tensor
) -> torch.Tensor:
    """Write random rows at ``ids`` into ``s`` and ``ref``; return the table a store abandoned right after
    reopens to: ``on_disk``, or, if this write spilled the buffer, ``ref`` as it was before the write (which
    then went into the emptied buffer)."""
    before, spills = ref.clone(), s.spills
    s.write(ids, torch.randn(ids.size, WIDTH))
    ref[torch.from_numpy(ids)] = s.read(ids)
    return before if s.spills > spills else on_disk


@pytest.mark.parametrize("log", LOGS)
def test_a_store_abandoned_without_a_flush_reopens_as_of_its_last_spill(tmp_path: Path, log: str) -> None:
    """A crash loses the buffer, never the log's consistency: the spills and compactions before it each
    record what the files hold (without a log, a spill into the row file saves the bitmap that says the
    rows are there: it once did not, and such rows reopened as their initial values)."""
    path = tmp_path / "t.f32"
    s = lazy_store(path, 20, log)
    rng = np.random.default_rng(4)
    ref, on_disk = initial_table(), initial_table()
    for _ in range(40):
        ids = rng.choice(TABLES.total_rows, size=int(rng.integers(1, 15)), replace=False)
        on_disk = write_tracking_spills(s, ids, ref, on_disk)
    assert s.spills > 2 and s.buffered_rows > 0
    assert (s.compactions > 0) == (log == "small_log")
    again = TieredStore(path, buffer_bytes=2**20, log_bytes=LOGS[log])  # s is never flushed nor closed
    assert torch.equal(again.read(np.arange(TABLES.total_rows)), on_disk)
    again.close()


def test_rows_write_range_wrote_survive_a_store_abandoned_without_a_flush(tmp_path: Path) -> None:
    path = tmp_path / "t.f32"
    s = lazy_store(path, 20)
    rows = torch.randn(7, WIDTH)
    s.write_range(3, rows)  # (how a checkpoint of the whole table is restored)
    expected = initial_table()
    expected[3:10] = rows
    again = TieredStore(path, buffer_bytes=2**20)  # s is never flushed nor closed
    assert torch.equal(again.read(np.arange(TABLES.total_rows)), expected)
    again.close()


def test_a_lazy_file_without_its_bitmap_or_with_another_recipe_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.f32"
    lazy_store(path, 10).close()
    bitmap = Path(str(path) + ".written")
    saved = bitmap.read_bytes()
    bitmap.unlink()
    with pytest.raises(ValueError, match=r"t\.f32\.written is missing"):
        TieredStore(path)
    bitmap.write_bytes(saved[:-1])
    with pytest.raises(ValueError, match="has 150 bytes, expected 151"):
        TieredStore(path)
    bitmap.write_bytes(saved)
    plain = MmapStore(path)
    plain.set_metadata(init_recipe="torch-chunks")
    plain.close()
    with pytest.raises(ValueError, match="'torch-chunks'"):
        TieredStore(path)


def test_an_mmap_store_file_opens_with_every_row_held(tmp_path: Path) -> None:
    path = tmp_path / "m.f32"
    m = MmapStore(path, TABLES.total_rows, WIDTH)
    m.write_range(0, torch.full((TABLES.total_rows, WIDTH), 9.0))
    m.set_metadata(initialized=True)
    m.close()
    s = TieredStore(path, buffer_bytes=2**20)
    assert s.read([0, 1206]).eq(9.0).all()
    assert s.rows_in_file() == TABLES.total_rows  # (1207 rows: the bitmap's last byte has 1 valid bit)
    s.close()


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"at least one row and its index \(224 bytes for rows of 6 floats\)"
    ):
        TieredStore(tmp_path / "a.f32", 10, WIDTH, buffer_bytes=223)
    assert TieredStore(tmp_path / "a.f32", 10, WIDTH, buffer_bytes=224, mode="create").capacity == 1
    s = lazy_store(tmp_path / "b.f32", 10)
    with pytest.raises(ValueError, match=r"row id 1207 at position 1 is outside \[0, 1207\)"):
        s.read([0, 1207])
    with pytest.raises(ValueError, match="row id 4 appears more than once"):
        s.write([4, 4], torch.zeros(2, WIDTH))
    with pytest.raises(ValueError, match="cannot share it: use BagpipeStrategy"):
        share_store(s, None, "emb")  # type: ignore[arg-type]
    s.close()


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize("opt_name", ["sgd", "rowwise_adagrad"])
def test_training_on_a_tiered_store_equals_uncached_training(tmp_path: Path, opt_name: str) -> None:
    """A 12-row buffer spills many times during the run; the model must still equal the plain loop's,
    which starts from the RAM store's fully written initial rows."""
    tables = small_tables((60, 45, 35))
    batches = random_batches(tables, 30, 16, multi_hot=2, seed=4)
    make_opt, hp = OPTIMIZERS[opt_name]
    torch.manual_seed(0)
    in_ram = TinyModel(tables, make_opt(), dense_lr=DENSE_LR)
    ref_table, ref_state, ref_head = train_reference(in_ram, batches, opt_name, hp)
    width = DIM + make_opt().state_width(DIM)
    factory = functools.partial(TieredStore, tmp_path / "emb.f32", buffer_bytes=buffer_for(12, width))
    torch.manual_seed(0)
    model = TinyModel(tables, make_opt(), dense_lr=DENSE_LR, store=factory)
    store = model.emb.store
    assert isinstance(store, TieredStore) and store.metadata["lazy"]
    quiet_trainer().fit(model, datamodule=ListDataModule(tables, batches, lookahead=4, cache_rows=110))
    assert store.spills > 1
    trained = store.read(np.arange(tables.total_rows))
    assert torch.allclose(trained[:, :DIM], ref_table, atol=1e-6, rtol=0)
    assert torch.allclose(trained[:, DIM:], ref_state, atol=1e-6, rtol=0)
    for p, q in zip(model.head.parameters(), ref_head.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)
    for name, table in model.emb.export().items():  # export materialises the file: same rows
        j = tables.index(name)
        lo = int(tables.offsets[j])
        assert torch.allclose(table, ref_table[lo : lo + table.shape[0]], atol=1e-6, rtol=0)


def test_a_store_factory_must_return_a_store() -> None:
    with pytest.raises(TypeError, match="returned int, not an EmbeddingStore"):
        lb.CachedEmbedding(TABLES, DIM, lb.optim.SGD(lr=0.1), store=lambda n, w: n)  # type: ignore[arg-type,return-value]


def test_a_path_to_a_file_a_tiered_store_wrote_reopens_as_one(tmp_path: Path) -> None:
    """Opened as a plain MmapStore, rows never written would read as zeros instead of their initial value."""
    path = tmp_path / "emb.f32"
    first = lb.CachedEmbedding(TABLES, DIM, lb.optim.SGD(lr=0.1), store=functools.partial(TieredStore, path))
    first.store.write([2], torch.full((1, DIM), 5.0))
    first.store.close()
    again = lb.CachedEmbedding(TABLES, DIM, lb.optim.SGD(lr=0.1), store=path)
    assert isinstance(again.store, TieredStore) and again.store.metadata["optimizer"] == "sgd"
    expected = initial_rows(TABLES, DIM, 0, 0, 4)
    expected[2] = 5.0
    assert torch.equal(again.store.read([0, 1, 2, 3]), expected)


def test_a_lazily_initialised_file_records_its_optimizer(tmp_path: Path) -> None:
    """At dim 1 Adagrad's and RowWiseAdagrad's rows have the same width: the metadata tells them apart."""
    path = tmp_path / "emb.f32"
    lb.CachedEmbedding(TABLES, 1, lb.optim.RowWiseAdagrad(lr=0.1), store=functools.partial(TieredStore, path))
    with pytest.raises(ValueError, match=r"holds rowwise_adagrad optimizer state, but .* uses adagrad"):
        lb.CachedEmbedding(TABLES, 1, lb.optim.Adagrad(lr=0.1), store=path)


def test_a_full_log_of_repeated_rows_is_merged_in_place_of_a_compaction(tmp_path: Path) -> None:
    """Rows written over and over fill the log with old copies: merging keeps the newest (in the other pair
    of log files) and never writes the row file. A store abandoned at any point reopens as of its last
    spill, a flushed one as it is."""
    path = tmp_path / "t.f32"
    s = lazy_store(path, 8, "small_log")
    rng = np.random.default_rng(7)
    pool = rng.choice(TABLES.total_rows, size=20, replace=False)  # few distinct rows: many copies
    ref, on_disk = initial_table(), initial_table()
    merges = 0
    for step in range(120):
        ids = rng.choice(pool, size=int(rng.integers(1, 8)), replace=False)
        on_disk = write_tracking_spills(s, ids, ref, on_disk)
        if s.log_merges > merges:  # just merged: a crash now finds the merged log
            merges = s.log_merges
            again = TieredStore(path, buffer_bytes=2**20, log_bytes=LOGS["small_log"])  # s never flushed
            assert torch.equal(again.read(np.arange(TABLES.total_rows)), on_disk), step
            assert again.log is not None and again.log.pair == s.log.pair  # type: ignore[union-attr]
        assert torch.equal(s.read(pool), ref[torch.from_numpy(pool)]), step
    assert (
        s.log_merges > 2
        and s.compactions == 0
        and s.rows_in_file() == len(set(pool.tolist()) & set(s.log.items()[0].tolist()))
    )  # type: ignore[union-attr]
    assert not s._written.any()  # the row file was never written
    s.flush()
    again = TieredStore(path, buffer_bytes=2**20, log_bytes=LOGS["small_log"])
    assert torch.equal(again.read(np.arange(TABLES.total_rows)), ref)
    again.close()


def test_a_merge_that_fails_midway_leaves_the_old_log_in_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.f32"
    s = lazy_store(path, 8, "small_log")
    real = SpillLog.append_sorted

    def half_then_fail(self: SpillLog, ids: np.ndarray, rows: Any, chunk: int) -> None:
        if self.pair == 0:  # a spill's append (the first merge writes the other pair)
            return real(self, ids, rows, chunk)
        real(self, ids[: ids.size // 2], rows, chunk)  # some rows reach the new files, then the process dies
        raise RuntimeError("disk gone")

    monkeypatch.setattr(SpillLog, "append_sorted", half_then_fail)
    rng = np.random.default_rng(3)
    pool = rng.choice(TABLES.total_rows, size=20, replace=False)
    ref, on_disk = initial_table(), initial_table()
    with pytest.raises(RuntimeError, match="disk gone"):
        for _ in range(200):
            ids = rng.choice(pool, size=int(rng.integers(1, 8)), replace=False)
            on_disk = write_tracking_spills(s, ids, ref, on_disk)
    assert s.log_merges == 0 and s.spills > 2
    again = TieredStore(path, buffer_bytes=2**20, log_bytes=LOGS["small_log"])
    assert torch.equal(again.read(np.arange(TABLES.total_rows)), on_disk)
    again.close()


# ---------------------------------------------------------------------- one store file, one run
def test_a_tiered_store_another_run_has_open_is_refused_before_its_log_or_bitmap_is_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs on one TieredStore file: the second is refused before it reads or rewrites the log, the
    bitmap or the sidecar (a reopening with another log size would compact the first run's log)."""
    from lightning_bagpipe.embedding.store import RANK_VARIABLES, StoreInUseError
    from tests.test_store import fingerprint, holding, locked_elsewhere

    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "t.f32"
    lazy_store(path, 8).close()
    with holding(path, "tiered") as other:
        assert sorted(f.name for f in tmp_path.iterdir()) == [
            "t.f32",
            "t.f32.json",
            "t.f32.log",
            "t.f32.log.ids",
            "t.f32.written",
        ]
        before = fingerprint(tmp_path)
        for log_bytes in (LOGS["default_log"], 0, LOGS["small_log"]):
            with pytest.raises(StoreInUseError, match=f"in use by process {other.pid}"):
                TieredStore(path, buffer_bytes=2**20, log_bytes=log_bytes)
        with pytest.raises(StoreInUseError):
            lb.CachedEmbedding(TABLES, dim=DIM, optimizer=lb.optim.Adagrad(lr=0.1), store=str(path))
        monkeypatch.setenv("LOCAL_RANK", "1")  # a TieredStore is one process's: every rank locks its file
        with pytest.raises(StoreInUseError):
            TieredStore(path)
        monkeypatch.delenv("LOCAL_RANK")
        assert fingerprint(tmp_path) == before
    assert not locked_elsewhere(path)
    again = TieredStore(path, buffer_bytes=2**20)  # the other run's rows, as it left them
    ids = np.arange(TABLES.total_rows)
    mine = ids % 3 == 0
    got = again.read(ids)
    assert torch.equal(got[mine], torch.full((int(mine.sum()), WIDTH), 7.0))
    assert torch.equal(got[~mine], initial_table()[~mine])
    assert again.file.locked and locked_elsewhere(path)
    again.close()
    assert not locked_elsewhere(path)


def test_a_tiered_store_says_whether_it_holds_its_files_lock(tmp_path: Path) -> None:
    # (docs/stores-and-optimizers.md: `store.locked`; a TieredStore had no such attribute)
    s = lazy_store(tmp_path / "t.f32", 8)
    assert s.locked and s.file.locked
    s.close()
    assert not s.locked
