"""Embedding stores (RAM and memory-mapped file) and the deterministic initial weights."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_bagpipe.embedding.init import (
    initial_rows,
    initial_rows_at,
    initial_weights,
    initialize_store,
)
from lightning_bagpipe.embedding.store import (
    RANK_VARIABLES,
    EmbeddingStore,
    MemoryStore,
    MmapStore,
    StoreInUseError,
    locks_by_default,
    store_lock,
)
from lightning_bagpipe.tables import Tables

ROWS, WIDTH = 1000, 5


@pytest.fixture(params=["memory", "mmap"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmbeddingStore]:
    s: EmbeddingStore
    if request.param == "memory":
        s = MemoryStore(ROWS, WIDTH, pin_memory=False)
    else:
        s = MmapStore(tmp_path / "table.f32", ROWS, WIDTH, mode="create")
    yield s
    s.close()


# ---------------------------------------------------------------------------- read / write
def test_new_store_reads_zeros(store: EmbeddingStore) -> None:
    assert store.read(np.array([0, ROWS - 1])).eq(0).all()
    assert store.tensor().shape == (ROWS, WIDTH)


def test_roundtrip_random_ids(store: EmbeddingStore) -> None:
    g = torch.Generator().manual_seed(0)
    shadow = torch.zeros(ROWS, WIDTH)
    for _ in range(5):
        ids = torch.randperm(ROWS, generator=g)[:300]
        rows = torch.randn(300, WIDTH, generator=g)
        store.write(ids if _ % 2 else ids.numpy(), rows)
        shadow[ids] = rows
        probe = torch.randint(0, ROWS, (400,), generator=g)  # repeats are fine for reads
        assert torch.equal(store.read(probe), shadow[probe])
    assert torch.equal(store.tensor(), shadow)


def test_empty_reads_and_writes(store: EmbeddingStore) -> None:
    assert store.read([]).shape == (0, WIDTH)
    assert store.read(np.zeros(0, dtype=np.int64)).shape == (0, WIDTH)
    store.write(torch.zeros(0, dtype=torch.long), torch.zeros(0, WIDTH))
    assert store.tensor().eq(0).all()


def test_read_returns_a_copy(store: EmbeddingStore) -> None:
    out = store.read([3, 4])
    out.fill_(7.0)
    assert store.read([3, 4]).eq(0).all()


def test_read_into_preallocated_buffer(store: EmbeddingStore) -> None:
    store.write_range(0, torch.arange(ROWS * WIDTH, dtype=torch.float32).view(ROWS, WIDTH))
    buf = torch.full((8, WIDTH), -1.0)
    ids = np.array([9, 2, 500, 999], dtype=np.int32)
    store.read_into(ids, buf[:4])
    assert torch.equal(buf[:4], store.tensor()[torch.from_numpy(ids).long()])
    assert buf[4:].eq(-1).all()
    with pytest.raises(ValueError, match=r"shape \[4, 5\]"):
        store.read_into(ids, buf)
    with pytest.raises(ValueError, match="float32"):
        store.read_into(ids, buf[:4].double())


def test_range_roundtrip_and_bounds(store: EmbeddingStore) -> None:
    rows = torch.randn(100, WIDTH)
    store.write_range(900, rows)
    assert torch.equal(store.read_range(900, 1000), rows)
    assert store.read_range(0, 900).eq(0).all()
    assert store.read_range(5, 5).shape == (0, WIDTH)
    with pytest.raises(ValueError, match=r"\[950, 1050\) is not within \[0, 1000\)"):
        store.write_range(950, rows)
    with pytest.raises(ValueError, match=r"\[10, 5\)"):
        store.read_range(10, 5)


def test_tensor_is_zero_copy(store: EmbeddingStore) -> None:
    store.tensor()[7] = 3.0
    assert store.read([7]).eq(3.0).all()
    store.write([8], torch.ones(1, WIDTH))
    assert store.tensor()[8].eq(1.0).all()


def test_write_accepts_noncontiguous_rows(store: EmbeddingStore) -> None:
    rows = torch.randn(WIDTH, 3).t()  # [3, WIDTH], not contiguous
    store.write(torch.tensor([1, 5, 2]), rows)
    assert torch.equal(store.read([1, 5, 2]), rows)


def test_bad_ids_are_named(store: EmbeddingStore) -> None:
    with pytest.raises(ValueError, match=r"row id 1000 at position 2 is outside \[0, 1000\)"):
        store.read(np.array([1, 2, 1000]))
    with pytest.raises(ValueError, match=r"row id -3 at position 0"):
        store.write(torch.tensor([-3]), torch.zeros(1, WIDTH))
    with pytest.raises(ValueError, match="integers"):
        store.read(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="1-D"):
        store.read(torch.zeros(2, 2, dtype=torch.long))


def test_duplicate_ids_in_a_write_are_rejected(store: EmbeddingStore) -> None:
    with pytest.raises(ValueError, match="row id 4 appears more than once"):
        store.write(np.array([9, 4, 1, 4]), torch.ones(4, WIDTH))
    assert store.tensor().eq(0).all()  # nothing was written
    store.write(np.array([9, 4, 1]), torch.ones(3, WIDTH), check_unique=False)
    assert store.read([1, 4, 9]).eq(1).all()


def test_bad_rows_are_rejected(store: EmbeddingStore) -> None:
    with pytest.raises(ValueError, match="float32"):
        store.write([1], torch.zeros(1, WIDTH, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \[2, 5\]"):
        store.write([1, 2], torch.zeros(2, WIDTH + 1))


def test_validate_names_both_shapes(store: EmbeddingStore) -> None:
    store.validate(ROWS, WIDTH)
    with pytest.raises(ValueError, match=r"1000 rows x 5 floats but my tables needs 1000 rows x 6 floats"):
        store.validate(ROWS, 6, what="my tables")


def test_metadata_check(store: EmbeddingStore) -> None:
    store.set_metadata(dim=4, optimizer="sgd")
    store.check_metadata(dim=4, optimizer="sgd", seed=3)  # seed not recorded: not compared
    with pytest.raises(ValueError, match="optimizer: store has 'sgd', expected 'adam'"):
        store.check_metadata(dim=4, optimizer="adam")
    with pytest.raises(ValueError, match="not plain JSON"):
        store.set_metadata(bad=object())
    store.set_metadata(pair=(1, 2))  # held as a tuple in RAM, a list once a file store is reopened
    store.check_metadata(pair=(1, 2))
    store.check_metadata(pair=[1, 2])
    with pytest.raises(ValueError, match=r"pair: store has \(1, 2\), expected \(2, 1\)"):
        store.check_metadata(pair=(2, 1))


def test_metadata_compares_as_json_holds_it_after_a_reopen(tmp_path: Path) -> None:
    MmapStore(tmp_path / "t.f32", ROWS, WIDTH, mode="create").set_metadata(pair=(1, 2))
    again = MmapStore(tmp_path / "t.f32", mode="open")
    again.check_metadata(pair=(1, 2))  # (it read [1, 2] back, and once said it was a different value)
    again.close()


def test_closed_store_raises(store: EmbeddingStore) -> None:
    store.close()
    store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        store.read([0])


def test_concurrent_reader_and_writer_on_disjoint_rows(store: EmbeddingStore) -> None:
    """The executor thread writes some rows while the main thread reads others."""
    read_ids = np.arange(0, ROWS, 2)
    store.write(read_ids, torch.full((read_ids.size, WIDTH), 5.0))
    write_ids = np.arange(1, ROWS, 2)
    stop = threading.Event()

    def writer() -> None:
        v = 0.0
        while not stop.is_set():
            store.write(write_ids, torch.full((write_ids.size, WIDTH), v), check_unique=False)
            v += 1.0

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(200):
            assert store.read(read_ids).eq(5.0).all()
    finally:
        stop.set()
        t.join()


# ---------------------------------------------------------------------------- memory store
def test_memory_store_not_pinned_without_cuda() -> None:
    s = MemoryStore(4, 2)
    assert s.pinned == torch.cuda.is_available()
    assert s.tensor().is_pinned() == s.pinned
    assert not MemoryStore(4, 2, pin_memory=False).pinned


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_memory_store_pinning_requires_cuda() -> None:
    with pytest.raises(ValueError, match=r"pin_memory=True\) needs CUDA"):
        MemoryStore(4, 2, pin_memory=True)


@pytest.mark.parametrize("rows,width", [(0, 3), (3, 0), (-1, 2), (2.5, 2)])
def test_memory_store_bad_shape(rows: int, width: int) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        MemoryStore(rows, width)


# ---------------------------------------------------------------------------- mmap store
def test_mmap_persists_rows_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "t.f32"
    rows = torch.randn(ROWS, WIDTH)
    with MmapStore(path, ROWS, WIDTH) as s:  # auto -> create
        s.write_range(0, rows)
        s.set_metadata(dim=3, optimizer="adagrad", initialized=True)
    assert path.stat().st_size == ROWS * WIDTH * 4
    side = json.loads(Path(str(path) + ".json").read_text())
    assert side["format"] == "lightning-bagpipe-store" and side["version"] == 1 and side["dtype"] == "float32"
    assert (side["num_rows"], side["width"]) == (ROWS, WIDTH)
    assert side["metadata"] == {"dim": 3, "optimizer": "adagrad", "initialized": True}
    assert torch.equal(torch.from_numpy(np.fromfile(path, dtype=np.float32)).view(ROWS, WIDTH), rows)

    s2 = MmapStore(path)  # auto -> open; shape from the sidecar
    assert (s2.num_rows, s2.width) == (ROWS, WIDTH)
    assert s2.metadata == {"dim": 3, "optimizer": "adagrad", "initialized": True}
    assert torch.equal(s2.read_range(0, ROWS), rows)
    s2.close()
    s3 = MmapStore(path, ROWS, WIDTH, mode="open")
    assert torch.equal(s3.read([17]), rows[17:18])
    s3.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.f32", "t.f32.json"]  # no temp files left


def test_mmap_writes_visible_to_a_second_mapping(tmp_path: Path) -> None:
    a = MmapStore(tmp_path / "s.f32", 10, 2)
    b = MmapStore(tmp_path / "s.f32", mode="open")
    a.write([3], torch.tensor([[1.5, 2.5]]))
    assert torch.equal(b.read([3]), torch.tensor([[1.5, 2.5]]))
    a.close()
    b.close()


def test_mmap_large_sparse_create_is_fast(tmp_path: Path) -> None:
    n, w = 2**24, 4  # 256 MiB of rows
    t0 = time.perf_counter()
    s = MmapStore(tmp_path / "big.f32", n, w, mode="create")
    elapsed = time.perf_counter() - t0
    ids = np.array([0, 12_345_678, n - 1])
    s.write(ids, torch.arange(12, dtype=torch.float32).view(3, w))
    s.flush()
    assert torch.equal(s.read(ids[::-1].copy()), torch.arange(12, dtype=torch.float32).view(3, w).flip(0))
    assert s.read_range(n - 5, n - 1).eq(0).all()
    st = (tmp_path / "big.f32").stat()
    s.close()
    assert st.st_size == n * w * 4
    assert st.st_blocks * 512 < 8 * 2**20, "create must leave the file sparse"
    assert elapsed < 2.0


def test_mmap_open_mismatches_name_file_and_numbers(tmp_path: Path) -> None:
    path = tmp_path / "m.f32"
    MmapStore(path, 100, 4).close()
    with pytest.raises(ValueError, match=r"m\.f32.*num_rows=100.*num_rows=101 was requested"):
        MmapStore(path, 101, 4, mode="open")
    with pytest.raises(ValueError, match=r"m\.f32.*width=4.*width=5 was requested"):
        MmapStore(path, 100, 5)  # auto opens the existing file
    with open(path, "r+b") as f:
        f.truncate(100 * 4 * 4 - 12)
    with pytest.raises(ValueError, match=r"m\.f32'\): file is truncated: it has 1588 bytes .* 1600 bytes"):
        MmapStore(path, mode="open")


def test_mmap_create_and_open_errors(tmp_path: Path) -> None:
    path = tmp_path / "e.f32"
    with pytest.raises(FileNotFoundError, match=r"e\.f32"):
        MmapStore(path, mode="open")
    with pytest.raises(ValueError, match="needs num_rows and width"):
        MmapStore(path, 10)
    MmapStore(path, 10, 2).close()
    with pytest.raises(FileExistsError, match=r"e\.f32"):
        MmapStore(path, 10, 2, mode="create")
    with pytest.raises(ValueError, match="mode must be"):
        MmapStore(path, mode="append")  # type: ignore[arg-type]
    side = Path(str(path) + ".json")
    side.write_text("{not json")
    with pytest.raises(ValueError, match=r"e\.f32\.json is not valid JSON"):
        MmapStore(path)
    side.write_text(json.dumps({"format": "lightning-bagpipe-store", "version": 1, "dtype": "float64"}))
    with pytest.raises(ValueError, match="dtype 'float64'"):
        MmapStore(path)
    side.unlink()
    with pytest.raises(ValueError, match=r"sidecar .*e\.f32\.json is missing"):
        MmapStore(path)


# ---------------------------------------------------------------------------- initial weights
TABLES = Tables([("a", 70_000), ("b", 3), ("c", 100_000), ("d", 1)])  # 170_004 rows
DIM, SEED = 4, 7


@pytest.fixture(scope="module")
def whole() -> torch.Tensor:
    return initial_rows(TABLES, DIM, SEED, 0, TABLES.total_rows)


M64 = 2**64 - 1


def splitmix64(x: int) -> int:
    """The splitmix64 finalizer on Python ints (the reference the recipe is checked against)."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def test_initial_rows_follow_the_documented_recipe(whole: torch.Tensor) -> None:
    salt = splitmix64(SEED)
    for r in [0, 1, 65_535, 69_999, 70_000, 70_002, 70_003, 123_456, 170_003]:
        j = int(np.searchsorted(TABLES.offsets, r, side="right") - 1)
        bound = float(np.float32(1 / math.sqrt(TABLES.sizes[j])))
        for c in range(DIM):
            u = (splitmix64((r * DIM + c) ^ salt) >> 40) / 2**24
            assert float(whole[r, c]) == float(np.float32((2 * u - 1) * bound)), (r, c)


def test_initial_rows_at_any_ids_equal_the_whole(whole: torch.Tensor) -> None:
    ids = np.random.default_rng(0).integers(0, TABLES.total_rows, 5000)
    ids[:3] = [170_003, 0, 170_003]  # any order, repeats allowed
    assert torch.equal(initial_rows_at(TABLES, DIM, SEED, ids), whole[torch.from_numpy(ids)])
    assert initial_rows_at(TABLES, DIM, SEED, np.zeros(0, dtype=np.int64)).shape == (0, DIM)
    rows = torch.zeros(ids.size, DIM + 2)  # into the weight columns of wider rows
    initial_rows_at(TABLES, DIM, SEED, ids, out=rows[:, :DIM])
    assert torch.equal(rows[:, :DIM], whole[torch.from_numpy(ids)]) and not rows[:, DIM:].any()
    with pytest.raises(ValueError, match=r"out must be a float32 CPU tensor of shape \[5000, 4\]"):
        initial_rows_at(TABLES, DIM, SEED, ids, out=rows)
    with pytest.raises(ValueError, match="row id 170004 is not within the 170004 fused rows"):
        initial_rows_at(TABLES, DIM, SEED, [5, 170_004])
    with pytest.raises(ValueError, match="1-D integer"):
        initial_rows_at(TABLES, DIM, SEED, np.array([1.5]))


def test_initial_rows_subranges_equal_the_whole(whole: torch.Tensor) -> None:
    cuts = [
        (0, 1),
        (65_535, 65_537),
        (69_999, 70_004),
        (131_000, 170_004),
        (5, 5),
        (1000, 140_000),
        (170_003, 170_004),
    ]
    for lo, hi in cuts:
        assert torch.equal(initial_rows(TABLES, DIM, SEED, lo, hi), whole[lo:hi]), (lo, hi)


def test_initial_rows_bounds_per_table(whole: torch.Tensor) -> None:
    for j, spec in enumerate(TABLES):
        off, n = int(TABLES.offsets[j]), spec.num_embeddings
        w = whole[off : off + n]
        b = float(np.float32(1 / math.sqrt(n)))
        assert w.abs().max() <= b, spec.name
        if n > 1000:  # uniform: fills the interval, centred at 0
            assert w.abs().max() > 0.99 * b
            assert abs(float(w.mean())) < 0.01 * b
            assert w.min() < 0 < w.max()


def test_initial_rows_deterministic_and_seeded(whole: torch.Tensor) -> None:
    assert torch.equal(initial_rows(TABLES, DIM, SEED, 0, 1000), whole[:1000])
    other = initial_rows(TABLES, DIM, SEED + 1, 0, 1000)
    assert not torch.equal(other, whole[:1000])
    assert not torch.equal(whole[:1000], whole[1000:2000])  # rows differ
    assert not torch.equal(whole[:, 0], whole[:, 1])  # columns differ


def test_initial_weights_of_one_table(whole: torch.Tensor) -> None:
    assert torch.equal(initial_weights(TABLES, DIM, SEED, "c"), whole[70_003:170_003])
    assert torch.equal(initial_weights(TABLES, DIM, SEED, 3), whole[170_003:])
    with pytest.raises(KeyError, match="unknown feature 'z'"):
        initial_weights(TABLES, DIM, SEED, "z")


def test_initial_rows_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"\[0, 170005\) is not within the 170004 fused rows"):
        initial_rows(TABLES, DIM, SEED, 0, 170_005)
    with pytest.raises(ValueError, match="seed"):
        initial_rows(TABLES, DIM, -1, 0, 1)
    with pytest.raises(ValueError, match="dim"):
        initial_rows(TABLES, 0, SEED, 0, 1)


@pytest.mark.parametrize("chunk_rows", [1 << 18, 1000])
def test_initialize_store(tmp_path: Path, whole: torch.Tensor, chunk_rows: int) -> None:
    state = torch.tensor([0.5, -2.0, 3.0])
    s = MmapStore(tmp_path / "init.f32", TABLES.total_rows, DIM + 3)
    initialize_store(s, TABLES, DIM, state, SEED, chunk_rows=chunk_rows)
    t = s.tensor()
    assert torch.equal(t[:, :DIM], whole)
    assert torch.equal(t[:, DIM:], state.expand(TABLES.total_rows, 3))
    assert s.metadata == {
        "initialized": True,
        "seed": SEED,
        "dim": DIM,
        "state_width": 3,
        "tables_fingerprint": TABLES.fingerprint(),
        "init_recipe": "splitmix64-v1",
    }
    s.close()
    assert json.loads((tmp_path / "init.f32.json").read_text())["metadata"]["initialized"] is True


def test_initialize_store_rejects_mismatch() -> None:
    s = MemoryStore(TABLES.total_rows, DIM + 1, pin_memory=False)
    with pytest.raises(ValueError, match=r"170004 rows x 5 floats but 4 tables with dim=4 and state width 2"):
        initialize_store(s, TABLES, DIM, torch.zeros(2), SEED)
    with pytest.raises(ValueError, match="state_init must be a 1-D float32"):
        initialize_store(s, TABLES, DIM, torch.zeros(1, dtype=torch.float64), SEED)
    assert "initialized" not in s.metadata


def test_mmap_gather_asks_for_exactly_the_pages_of_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large gathers from a random-access mapping first MADV_WILLNEED the pages their rows lie on: every
    page, no other, neighbours merged."""
    import mmap

    from lightning_bagpipe.embedding import store as store_module

    monkeypatch.setattr(store_module, "RANDOM_ACCESS_FRACTION", 0.0)  # map this small file as a huge one
    width = 18  # 72-byte rows: some straddle a page boundary
    store = MmapStore(tmp_path / "t.f32", num_rows=20_000, width=width)
    assert store.random_access
    calls: list[tuple[int, int]] = []

    class Spy:
        def __init__(self, raw: mmap.mmap) -> None:
            self.raw = raw

        def __len__(self) -> int:
            return len(self.raw)

        def madvise(self, option: int, start: int, length: int) -> None:
            assert option == mmap.MADV_WILLNEED
            calls.append((start, length))

    arr = store._array
    assert arr is not None
    real = arr._mmap  # type: ignore[attr-defined]
    arr._mmap = Spy(real)  # type: ignore[attr-defined]
    try:
        rng = np.random.default_rng(0)
        ids = rng.choice(20_000, size=400, replace=False)
        store.read(ids)
        page = mmap.PAGESIZE
        asked = set()
        for start, length in calls:
            assert start % page == 0
            asked.update(range(start // page, (start + length + page - 1) // page))
        want = set()
        for i in ids.tolist():
            want.update(range(i * width * 4 // page, ((i + 1) * width * 4 - 1) // page + 1))
        assert asked == want
        assert len(calls) < len(want)  # neighbouring pages were merged into one call
        calls.clear()
        store.read(ids[:10])  # small gathers skip the hint
        assert calls == []
        store.random_access = False  # read-ahead mappings skip it too
        store.read(ids)
        assert calls == []
    finally:
        arr._mmap = real  # type: ignore[attr-defined]
        store.close()


def test_random_access_advice_only_for_files_large_against_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_bagpipe.embedding import store as store_module

    small = MmapStore(tmp_path / "a.f32", num_rows=1000, width=4)
    assert small.random_access is False  # a few KB: keep the kernel's read-ahead
    small.close()
    monkeypatch.setattr(store_module, "RANDOM_ACCESS_FRACTION", 0.0)
    big = MmapStore(tmp_path / "b.f32", num_rows=1000, width=4)
    assert big.random_access is True
    big.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssFile from /proc/self/status")
def test_a_random_access_mapping_lets_go_of_its_pages_and_keeps_every_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAPPED_BYTES_LIMIT the mapping drops its pages from the resident set; rows written before
    (still only in dirty page-cache pages) read back intact."""
    from lightning_bagpipe.embedding import store as store_module

    def rss_file() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no RssFile line")

    monkeypatch.setattr(store_module, "RANDOM_ACCESS_FRACTION", 0.0)  # map this small file as a huge one
    rows, width = 65_536, 256  # 64 MiB, one row per KiB
    store = MmapStore(tmp_path / "t.f32", num_rows=rows, width=width)
    store.MAPPED_BYTES_LIMIT = 1 << 62  # nothing let go while the rows go in
    ids = np.arange(rows, dtype=np.int64)
    values = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, width).contiguous()
    store.write(ids, values)
    mapped = rss_file()
    assert store.releases == 0
    store.MAPPED_BYTES_LIMIT = 32 * 2**20
    got = store.read(ids[::7])  # crosses the limit
    assert store.releases == 1
    assert rss_file() < mapped - 48 * 2**20  # the 64 MiB of pages are no longer resident in this process
    assert torch.equal(got, values[::7])
    assert torch.equal(store.read(ids), values)  # every written row survived the release
    released = store.releases
    store.random_access = False  # read-ahead mappings never let go
    store.read(ids)
    store.read(ids)
    assert store.releases == released
    store.close()


# ---------------------------------------------------------------------------- one store file, one run
REPO = Path(__file__).resolve().parent.parent
HOLDER_TIMEOUT_S = 90

#: A second process that opens a store (mmap or tiered) and holds it until its stdin closes.
_HOLDER = """
import signal, sys
signal.alarm(int(sys.argv[3]))  # never outlives a test that forgot it
from lightning_bagpipe.embedding.store import MmapStore
from lightning_bagpipe.embedding.tiered_store import TieredStore
kind, path = sys.argv[1], sys.argv[2]
store = MmapStore(path, mode="open") if kind == "mmap" else TieredStore(path, mode="open")
if kind == "tiered":  # rows in its buffer, its log and its bitmap, as a live run would have
    import numpy as np, torch
    ids = np.arange(0, store.num_rows, 3)
    store.write(ids, torch.full((ids.size, store.width), 7.0))
    store.flush()
print("ready", flush=True)
sys.stdin.read()
store.close()
"""

#: A process of its own that tries the file's lock without the package: exit 0 if free, 3 if held.
_PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(3)
"""


def _env_of_a_lone_run() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@contextlib.contextmanager
def holding(path: Path, kind: str = "mmap") -> Iterator[subprocess.Popen[bytes]]:
    """Another process (another run) with the store at ``path`` open, until the block ends (or it is
    killed in it); whatever happens, it does not survive the block."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, kind, str(path), str(HOLDER_TIMEOUT_S)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env_of_a_lone_run(),
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        deadline = time.monotonic() + HOLDER_TIMEOUT_S
        line = b""
        while time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 0.2)[0]:
                line = proc.stdout.readline()
                break
        if line.strip() != b"ready":
            proc.kill()
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"the holder process did not open {path}: {err.decode()[-3000:]}")
        yield proc
        if proc.poll() is None:
            proc.stdin.close()  # the holder closes its store and exits
            proc.wait(timeout=HOLDER_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def locked_elsewhere(path: Path) -> bool:
    """Whether some process holds the lock of ``path`` (asked by a process of its own)."""
    done = subprocess.run([sys.executable, "-c", _PROBE, str(path)], timeout=60, env=_env_of_a_lone_run())
    assert done.returncode in (0, 3)
    return done.returncode == 3


def fingerprint(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of ``folder``: its bytes and modification time (ns)."""
    return {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(folder.iterdir())}


@pytest.fixture
def lone_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process is no rank of a multi-process run: its stores lock by default."""
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_a_store_another_run_has_open_is_refused_naming_the_file_and_its_pid(
    tmp_path: Path, lone_run: None
) -> None:
    path = tmp_path / "x.f32"
    first = MmapStore(path, ROWS, WIDTH, mode="create")
    first.write_range(0, torch.ones(ROWS, WIDTH))
    first.close()
    assert not locked_elsewhere(path)  # a closed store holds no lock
    before = fingerprint(tmp_path)
    with holding(path) as other:
        for mode in ("auto", "open"):
            held = f"{re.escape(str(path))} is in use by process {other.pid}"
            with pytest.raises(StoreInUseError, match=held) as info:
                MmapStore(path, mode=mode)  # type: ignore[arg-type]
            assert info.value.pid == other.pid and info.value.path == path
            assert isinstance(info.value, ValueError)  # (a user error: the CLI prints one line)
        with pytest.raises(StoreInUseError):
            MmapStore(path, ROWS, WIDTH, lock=True)
        assert fingerprint(tmp_path) == before  # refused before anything was read or written
    # the other run ended (and closed its store): the file opens, with its rows
    again = MmapStore(path, mode="open")
    assert again.locked and torch.equal(again.tensor(), torch.ones(ROWS, WIDTH))
    again.close()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.f32", "x.f32.json"]  # no lock files


def test_a_killed_run_leaves_its_store_free(tmp_path: Path, lone_run: None) -> None:
    path = tmp_path / "x.f32"
    MmapStore(path, ROWS, WIDTH, mode="create").close()
    with holding(path) as other:
        assert locked_elsewhere(path)
        other.send_signal(signal.SIGKILL)  # no close(), no exit handlers
        other.wait(timeout=60)
        assert not locked_elsewhere(path)  # the system let go of the lock with the process
        s = MmapStore(path)
        assert s.locked
        s.close()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.f32", "x.f32.json"]


def test_one_process_may_open_its_own_store_again(tmp_path: Path, lone_run: None) -> None:
    """A notebook or test reopening a file (load_from_checkpoint(ckpt, store=path) beside the trained
    model): the process's stores share its lock, which lasts until the last of them is closed."""
    path = tmp_path / "x.f32"
    a = MmapStore(path, ROWS, WIDTH, mode="create")
    assert a.locked and locked_elsewhere(path)
    b = MmapStore(path, mode="open")
    c = MmapStore(str(path))
    assert b.locked and c.locked
    b.write(np.array([3]), torch.full((1, WIDTH), 2.0))
    assert torch.equal(a.read([3]), torch.full((1, WIDTH), 2.0))  # one file
    b.close()
    b.close()  # (idempotent: releases its share once)
    c.close()
    assert locked_elsewhere(path)  # a still has it open
    a.close()
    assert not locked_elsewhere(path)


def test_a_lock_is_let_go_when_the_store_fails_to_open_or_is_dropped(tmp_path: Path, lone_run: None) -> None:
    path = tmp_path / "x.f32"
    MmapStore(path, ROWS, WIDTH, mode="create").close()
    with pytest.raises(ValueError, match="num_rows=7 was requested"):
        MmapStore(path, num_rows=7)
    assert not locked_elsewhere(path)
    s = MmapStore(path)
    assert locked_elsewhere(path)
    del s
    gc.collect()
    assert not locked_elsewhere(path)  # an unclosed store lets go of its lock when it is collected


def test_ranks_other_than_zero_do_not_lock(
    tmp_path: Path, lone_run: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The processes of one multi-process run all map its file: rank 0 locks it for them."""
    assert locks_by_default()
    for name, value in [("LOCAL_RANK", "0"), ("RANK", "0"), ("LOCAL_RANK", "1"), ("RANK", "3")]:
        monkeypatch.setenv(name, value)
        assert locks_by_default() is (value == "0")
    path = tmp_path / "x.f32"
    rank0 = MmapStore(path, ROWS, WIDTH, lock=True)  # (as rank 0 of this run)
    monkeypatch.setenv("LOCAL_RANK", "1")
    rank1 = MmapStore(path)
    assert rank0.locked and not rank1.locked
    rank1.close()
    assert locked_elsewhere(path)
    rank0.close()
    monkeypatch.setenv("RANK", "1")
    rank1 = MmapStore(path, mode="open")  # without the lock ...
    assert not rank1.locked and not locked_elsewhere(path)
    rank1.close()
    forced = MmapStore(path, lock=True)  # ... unless asked
    assert forced.locked and locked_elsewhere(path)
    forced.close()
    never = MmapStore(path, lock=False)
    assert not never.locked and not locked_elsewhere(path)
    never.close()


def test_a_rank_other_than_zero_opens_the_file_its_rank_0_holds(
    tmp_path: Path, lone_run: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.f32"
    MmapStore(path, ROWS, WIDTH, mode="create").close()
    with holding(path):  # (the run's rank 0)
        monkeypatch.setenv("LOCAL_RANK", "1")
        rank1 = MmapStore(path, mode="open")
        assert not rank1.locked
        rank1.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_keep_its_parents_lock(tmp_path: Path, lone_run: None) -> None:
    """A forked child (a data loader worker, say) may reopen its parent's store, but the parent's close()
    still lets go of the lock while the child lives."""
    path = tmp_path / "x.f32"
    s = MmapStore(path, ROWS, WIDTH, mode="create")
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            again = MmapStore(path, mode="open")  # inherited from the parent: allowed
            again.close()
            code = 0
        finally:
            os.write(ready_w, bytes([code]))
            os.read(go_r, 1)
            os._exit(code)
    try:
        assert os.read(ready_r, 1) == bytes([0])
        s.close()
        assert not locked_elsewhere(path)  # the child lives on, without the lock
    finally:
        os.write(go_w, b"x")
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _cli_args(path: Path, store: str = "mmap", devices: int = 1) -> argparse.Namespace:
    return argparse.Namespace(
        store=store, store_path=path, overwrite_store=True, buffer_mib=None, devices=devices
    )


def test_overwrite_store_refuses_a_file_another_run_has_open(tmp_path: Path, lone_run: None) -> None:
    """--overwrite-store must not unlink a file a live run trains on (its training would be lost)."""
    from lightning_bagpipe.embedding.tiered_store import TieredStore
    from lightning_bagpipe.models.train import _store_arg

    path = tmp_path / "x.f32"
    MmapStore(path, ROWS, WIDTH, mode="create").close()
    before = fingerprint(tmp_path)
    with holding(path) as other:
        held = rf"{re.escape(str(path))} is in use by process {other.pid}.*--overwrite-store"
        with pytest.raises(StoreInUseError, match=held):
            _store_arg(_cli_args(path), tmp_path)
        assert fingerprint(tmp_path) == before  # nothing removed
    assert _store_arg(_cli_args(path), tmp_path) == str(path)  # the run ended: replaced
    assert not path.exists()
    # a tiered store on several processes: each rank's own file, locked by that rank
    rank0 = tmp_path / "t.rank0.f32"
    TieredStore(rank0, ROWS, WIDTH).close()
    with holding(rank0, "tiered"):
        with pytest.raises(StoreInUseError, match="--overwrite-store"):
            _store_arg(_cli_args(tmp_path / "t.f32", "tiered", devices=2), tmp_path)
        assert rank0.exists()
    # rank 0 checks every rank's file before it removes any: rank 1's file held by another run leaves
    # rank 0's own in place (it used to be removed, and the run then stopped at rank 1)
    rank1 = tmp_path / "t.rank1.f32"
    TieredStore(rank1, ROWS, WIDTH).close()
    with holding(rank1, "tiered") as other:
        held = rf"{re.escape(str(rank1))} is in use by process {other.pid}"
        with pytest.raises(StoreInUseError, match=held):
            _store_arg(_cli_args(tmp_path / "t.f32", "tiered", devices=2), tmp_path)
        assert rank0.exists() and rank1.exists()
    _store_arg(_cli_args(tmp_path / "t.f32", "tiered", devices=2), tmp_path)  # no run holds them: both go
    assert not rank0.exists() and not rank1.exists()
    # this process's own open store does not stop it (it replaces its own file)
    mine = MmapStore(path, ROWS, WIDTH)
    _store_arg(_cli_args(path), tmp_path)
    assert not path.exists()
    mine.close()


def test_store_lock_holds_the_file_for_its_block(tmp_path: Path, lone_run: None) -> None:
    path = tmp_path / "x.f32"
    with store_lock(path):  # (no file: nothing to hold)
        pass
    MmapStore(path, ROWS, WIDTH).close()
    with store_lock(path):
        assert locked_elsewhere(path)
    assert not locked_elsewhere(path)


def test_under_torchrun_each_rank_sees_to_its_own_store_file(
    tmp_path: Path, lone_run: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torchrun starts every rank at once: rank 0 cannot make or replace a shared mmap file before the
    # others open it (they trained another file, or failed), and replacing every rank's tiered file from
    # rank 0 removed files the other ranks had just made ("in use by process" of the same job)
    from lightning_bagpipe.embedding.tiered_store import TieredStore
    from lightning_bagpipe.models.train import _store_arg

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("LOCAL_RANK", "0")
    rank1 = tmp_path / "t.rank1.f32"
    TieredStore(rank1, ROWS, WIDTH).close()
    with holding(rank1, "tiered"):  # (rank 1, running: rank 0 leaves its file alone)
        factory = _store_arg(_cli_args(tmp_path / "t.f32", "tiered", devices=2), tmp_path)
        assert rank1.exists()
    assert factory.args == (tmp_path / "t.rank0.f32",)  # type: ignore[union-attr]
    monkeypatch.setenv("LOCAL_RANK", "1")
    missing = tmp_path / "new" / "t.f32"  # (every rank makes the folder)
    factory = _store_arg(_cli_args(missing, "tiered", devices=2), tmp_path)
    assert factory.args == (missing.with_name("t.rank1.f32"),)  # type: ignore[union-attr]
    assert missing.parent.is_dir()


def test_under_torchrun_the_other_ranks_open_a_shared_file_once_rank_0_made_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (before, a rank could open the old file that rank 0 then replaced: the ranks trained different files)
    from lightning_bagpipe.models import train as train_module

    args = _cli_args(tmp_path / "x.f32", devices=2)
    path = str(tmp_path / "x.f32")
    marker = tmp_path / f".x.f32.made.job7.{os.getppid()}"  # (named for this launch: its torchrun agent)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(train_module, "SHARED_FILE_WAIT_S", 0.3)
    made = train_module._shared_file_made(args, path)
    with pytest.raises(TimeoutError, match=r"for rank 0 to make the store file .*x\.f32"), made:
        raise AssertionError("rank 1 went on before rank 0 made the file")
    timer = threading.Timer(0.1, marker.touch)  # rank 0, a moment later
    timer.start()
    monkeypatch.setattr(train_module, "SHARED_FILE_WAIT_S", 30.0)
    with train_module._shared_file_made(args, path):
        assert marker.exists()
    timer.join()
    marker.unlink()
    monkeypatch.setenv("LOCAL_RANK", "0")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / f".x.f32.made.job7.{dead.pid}"  # a killed job's (torchrun's run id repeats)
    killed.touch()
    with train_module._shared_file_made(args, path):
        assert not marker.exists() and not killed.exists()  # (rank 0 makes the file, then says so)
    assert marker.exists()
    marker.unlink()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # Lightning's own launcher: nobody waits
    monkeypatch.setenv("LOCAL_RANK", "1")
    with train_module._shared_file_made(args, path):
        pass
