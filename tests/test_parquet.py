"""Parquet layout: convert TSV -> Parquet -> read gives the TSV's batches; schema checks; the CLI."""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lightning_bagpipe.data import convert
from lightning_bagpipe.data.criteo_tsv import CriteoTSV, ModuloHashing, Vocabulary
from lightning_bagpipe.data.parquet import (
    METADATA_KEY,
    CriteoParquet,
    ParquetSink,
    measure_read_throughput,
    write_parquet,
)
from lightning_bagpipe.data.synthetic import SyntheticCriteo
from lightning_bagpipe.tables import Tables
from lightning_bagpipe.temporaries import host_id
from tests.test_criteo_tsv import SIZES, random_lines, write


def same_batches(a, b) -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.sparse.keys == y.sparse.keys
        assert torch.equal(x.sparse.values, y.sparse.values)
        assert torch.equal(x.sparse.lengths, y.sparse.lengths)
        assert x.sparse.values.dtype == y.sparse.values.dtype == torch.int64
        assert (x.dense is None and y.dense is None) or torch.equal(x.dense, y.dense)
        assert (x.labels is None and y.labels is None) or torch.equal(x.labels, y.labels)


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def tsv_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "tsv"
    d.mkdir()
    write(d / "day_0", random_lines(rng, 230))
    write(d / "day_1.gz", random_lines(rng, 170), gz=True)
    return d


# ---------------------------------------------------------------------------------------------- round trip
def test_convert_then_read_equals_reading_the_tsv(tsv_dir, tmp_path):
    out = tmp_path / "pq"
    result = convert.convert_tsv(
        tsv_dir, out, hashing=ModuloHashing(SIZES), rows_per_file=150, row_group_rows=64, progress=False
    )
    assert result.rows == result.lines == 400 and result.skipped_lines == 0
    assert [f.name for f in result.files] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    # Files of 150, 150, 100 rows; row groups of 64 within each file.
    groups = [
        [pq.ParquetFile(f).metadata.row_group(i).num_rows for i in range(pq.ParquetFile(f).num_row_groups)]
        for f in result.files
    ]
    assert groups == [[64, 64, 22], [64, 64, 22], [64, 36]]
    tsv = CriteoTSV(tsv_dir, 48, hashing=ModuloHashing(SIZES))
    reader = CriteoParquet(out, 48)
    assert reader.tables == tsv.tables
    assert len(reader) == 9  # 400 = 8 * 48 + 16: the partial batch is kept
    same_batches(tsv, reader)
    assert len(CriteoParquet(out, 48, drop_last=True)) == 8
    same_batches(
        CriteoTSV(tsv_dir, 48, hashing=ModuloHashing(SIZES), drop_last=True),
        CriteoParquet(out, 48, drop_last=True),
    )


def test_schema_is_the_documented_one(tsv_dir, tmp_path):
    out = tmp_path / "pq"
    convert.convert_tsv(tsv_dir, out, hashing=ModuloHashing(SIZES), progress=False)
    schema = pq.read_schema(out / "part-00000.parquet")
    assert schema.names == ["label"] + [f"I{j}" for j in range(1, 14)] + [f"C{j}" for j in range(1, 27)]
    assert all(schema.field(n).type == pa.float32() for n in schema.names[:14])
    assert all(schema.field(n).type == pa.int64() for n in schema.names[14:])
    meta = json.loads(schema.metadata[METADATA_KEY])
    assert meta["tables"] == [[f"C{j + 1}", s] for j, s in enumerate(SIZES)]
    assert meta["hashing"] == {"mode": "modulo"} and meta["label"] == "label"


def test_unlabeled_conversion_has_no_label_column(tmp_path):
    path = write(tmp_path / "test.txt", random_lines(np.random.default_rng(1), 40, labeled=False, strip=0.0))
    out = tmp_path / "pq"
    convert.convert_tsv(path, out, hashing=ModuloHashing(SIZES), progress=False)
    assert "label" not in pq.read_schema(out / "part-00000.parquet").names
    reader = CriteoParquet(out, 16)
    assert all(b.labels is None for b in reader)
    same_batches(CriteoTSV(path, 16, hashing=ModuloHashing(SIZES)), reader)


def test_multi_hot_round_trip(tmp_path):
    source = SyntheticCriteo(200, 4, scale=0.001, multi_hot=3, seed=2)
    files = write_parquet(source, tmp_path / "mh", source.tables, rows_per_file=300, row_group_rows=128)
    assert len(files) == 3
    schema = pq.read_schema(files[0])
    assert schema.field("C1").type == pa.list_(pa.int64())
    reader = CriteoParquet(tmp_path / "mh", 200)
    assert reader.tables == source.tables and len(reader) == 4
    same_batches(source, reader)
    # Batches of another size carry the same samples in the same order.
    ids = np.concatenate([b.sparse.fused_ids(reader.tables) for b in CriteoParquet(tmp_path / "mh", 800)])
    assert np.array_equal(np.sort(ids), np.sort(np.concatenate(list(source.id_batches()))))


def test_column_projection(tsv_dir, tmp_path):
    out = tmp_path / "pq"
    convert.convert_tsv(tsv_dir, out, hashing=ModuloHashing(SIZES), progress=False)
    full = list(CriteoParquet(out, 100))
    part = CriteoParquet(out, 100, columns=["C3", "I2", "C1"])
    assert part.tables.names == ["C1", "C3"]  # table order, whatever the request order
    assert part.tables.sizes.tolist() == [SIZES[0], SIZES[2]]
    for a, b in zip(full, part):
        assert b.labels is None and b.dense.shape == (100, 1)
        assert torch.equal(b.dense[:, 0], a.dense[:, 1])
        assert torch.equal(b.sparse.values.view(2, -1), a.sparse.values.view(26, -1)[[0, 2]])
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['C99'\]"):
        CriteoParquet(out, 100, columns=["C1", "C99"])


def test_files_are_read_in_natural_order(tmp_path):
    tables = Tables([("a", 2000)])
    d = tmp_path / "pq"
    d.mkdir()
    for k in (10, 2, 1):  # part-1 < part-2 < part-10
        with ParquetSink(tmp_path / f"tmp{k}", tables, dense=[], labeled=False) as sink:
            sink.write_records(_records(np.arange(5) + 100 * k))
        (tmp_path / f"tmp{k}" / "part-00000.parquet").rename(d / f"part-{k}.parquet")
    values = torch.cat([b.sparse.values for b in CriteoParquet(d, 4)]).tolist()
    assert values == [100 + i for i in range(5)] + [200 + i for i in range(5)] + [1000 + i for i in range(5)]


def _records(ids: np.ndarray):
    from lightning_bagpipe.data.criteo_tsv import Records

    return Records(None, np.zeros((ids.size, 0), np.float32), ids.reshape(1, -1).astype(np.int64))


# ---------------------------------------------------------------------------------------------- schema errors
@pytest.fixture
def good_pq(tsv_dir, tmp_path):
    out = tmp_path / "pq"
    convert.convert_tsv(tsv_dir, out, hashing=ModuloHashing(SIZES), rows_per_file=200, progress=False)
    return out


def _rewrite(path, fn):
    table = pq.read_table(path)
    pq.write_table(fn(table), path)


def test_missing_column_is_named(good_pq):
    _rewrite(good_pq / "part-00001.parquet", lambda t: t.drop_columns(["C5"]))
    with pytest.raises(ValueError, match=r"part-00001\.parquet: column 'C5' is missing"):
        CriteoParquet(good_pq, 10)


@pytest.mark.parametrize(
    ("column", "typ", "expected"), [("C2", pa.int32(), "int64"), ("I4", pa.float64(), "float")]
)
def test_wrong_type_is_named(good_pq, column, typ, expected):
    def cast(t):
        i = t.schema.get_field_index(column)
        return t.set_column(i, pa.field(column, typ), t.column(column).cast(typ))

    _rewrite(good_pq / "part-00000.parquet", cast)
    with pytest.raises(ValueError, match=rf"column '{column}' has type .*expected {expected}"):
        CriteoParquet(good_pq, 10)


def test_files_without_metadata_need_tables(tmp_path):
    path = tmp_path / "foreign.parquet"
    ids = pa.array(np.arange(6, dtype=np.int64) % 3)
    pq.write_table(
        pa.table(
            {"label": pa.array(np.ones(6, np.float32)), "x": pa.array(np.zeros(6, np.float32)), "item": ids}
        ),
        path,
    )
    with pytest.raises(ValueError, match="no 'lightning_bagpipe' schema metadata"):
        CriteoParquet(path, 4)
    reader = CriteoParquet(path, 4, tables=[("item", 3)], dense=["x"])
    batches = list(reader)
    assert [b.batch_size for b in batches] == [4, 2]
    assert batches[0].sparse.values.tolist() == [0, 1, 2, 0] and batches[0].dense.shape == (4, 1)
    too_small = CriteoParquet(path, 6, tables=[("item", 2)])
    with pytest.raises(ValueError, match=r"column 'item': id 2 is outside \[0, 2\)"):
        list(too_small)


def test_nulls_are_rejected(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"item": pa.array([1, None, 0], pa.int64())}), path)
    with pytest.raises(ValueError, match="column 'item' holds nulls"):
        list(CriteoParquet(path, 3, tables=[("item", 3)]))


def test_sink_rejects_mismatched_input(tmp_path):
    source = SyntheticCriteo(16, 1, scale=0.001, multi_hot=3)
    with (
        ParquetSink(tmp_path / "a", source.tables, multi_hot=False) as sink,
        pytest.raises(ValueError, match="multi_hot=True"),
    ):
        sink.write_batch(source.batch(0))
    one_hot = SyntheticCriteo(16, 1, scale=0.001)
    write_parquet(one_hot, tmp_path / "c", one_hot.tables)
    with pytest.raises(FileExistsError, match="pass overwrite"):
        write_parquet(one_hot, tmp_path / "c", one_hot.tables)
    with (
        ParquetSink(tmp_path / "b", one_hot.tables, labeled=False) as sink,
        pytest.raises(ValueError, match="labels"),
    ):
        sink.write_batch(one_hot.batch(0))


@pytest.mark.parametrize("name", ["part-00000.parquet", "part-00001.parquet"])
@pytest.mark.parametrize("damage", ["empty", "truncated", "not parquet"])
def test_unreadable_parquet_file_is_named(good_pq, name, damage):
    victim = good_pq / name
    data = victim.read_bytes()
    victim.write_bytes(
        {"empty": b"", "truncated": data[: len(data) // 2], "not parquet": b"label,I1\n1,2\n"}[damage]
    )
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: not a readable Parquet file"):
        CriteoParquet(good_pq, 10)


# ---------------------------------------------------------------------------------------------- failures
def _folder(path: Path) -> dict[str, bytes] | None:
    """Every file of a folder (hidden ones too) with its contents; ``None`` if there is no folder."""
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())} if path.exists() else None


def _write_until(sink: ParquetSink, source: SyntheticCriteo, error: BaseException) -> None:
    """Write ``source``'s batches, then raise ``error`` once the sink has written two files' rows."""
    for batch in source:
        sink.write_batch(batch)
        if sink.rows_written >= 2 * sink.rows_per_file:
            raise error
    raise AssertionError("the source is too short to fail mid-way")


def test_sink_output_appears_only_when_complete(tmp_path):
    first, second = SyntheticCriteo(50, 8, scale=0.001), SyntheticCriteo(50, 8, scale=0.001, seed=1)
    out = tmp_path / "pq"
    kw = {"rows_per_file": 100, "row_group_rows": 50}
    # An error after two files: nothing is left, not even the folder the sink created.
    with pytest.raises(RuntimeError, match="boom"), ParquetSink(out, first.tables, **kw) as sink:
        _write_until(sink, first, RuntimeError("boom"))
    assert _folder(out) is None
    files = write_parquet(first, out, first.tables, **kw)
    before = _folder(out)
    assert before is not None and sorted(before) == [f.name for f in files]  # no hidden leftovers
    # With overwrite, an interrupted rewrite leaves the old dataset whole ...
    with pytest.raises(KeyboardInterrupt), ParquetSink(out, second.tables, overwrite=True, **kw) as sink:
        _write_until(sink, second, KeyboardInterrupt())
    assert _folder(out) == before
    same_batches(CriteoParquet(out, 50), first)
    # ... and a completed one replaces it (the old files gone, also those of a longer dataset).
    write_parquet(list(second)[:3], out, second.tables, overwrite=True, **kw)
    assert sorted(_folder(out) or {}) == ["part-00000.parquet", "part-00001.parquet"]
    same_batches(CriteoParquet(out, 50), list(second)[:3])
    with pytest.raises(ValueError, match="aborted: it takes no more rows"):
        sink.write_batch(first.batch(0))  # an aborted sink takes no more rows


def test_failed_conversion_leaves_no_partial_dataset(tmp_path, monkeypatch):
    lines = random_lines(np.random.default_rng(5), 300)
    bad = write(tmp_path / "day.tsv", [*lines[:250], "garbage", *lines[250:]])
    # Small parse blocks: the bad line comes after several row groups and files were written.
    monkeypatch.setattr(convert, "CriteoTSV", functools.partial(CriteoTSV, chunk_bytes=2000))
    kw = {"hashing": ModuloHashing(SIZES), "rows_per_file": 100, "row_group_rows": 50, "progress": False}
    out = tmp_path / "pq"
    with pytest.raises(ValueError, match=r"day\.tsv, line 251"):
        convert.convert_tsv(bad, out, **kw)
    assert _folder(out) is None
    good = write(tmp_path / "good.tsv", lines[:120])
    convert.convert_tsv(good, out, **kw)
    before = _folder(out)
    with pytest.raises(ValueError, match=r"day\.tsv, line 251"):
        convert.convert_tsv(bad, out, overwrite=True, **kw)
    assert _folder(out) == before  # --overwrite replaces the old files only once a conversion succeeds
    same_batches(CriteoParquet(out, 64), CriteoTSV(good, 64, hashing=ModuloHashing(SIZES)))


def test_vocab_conversion_changes_a_used_folder_only_on_success(tsv_dir, tmp_path, monkeypatch):
    out = tmp_path / "pq"
    convert.convert_tsv(tsv_dir, out, vocab_threshold=1, progress=False)
    before = _folder(out)
    assert before is not None and "vocabulary.npz" in before
    # A mistaken second conversion into the folder is refused before any pass over its input.
    passes: list[object] = []
    build = Vocabulary.build
    monkeypatch.setattr(Vocabulary, "build", lambda *a, **k: passes.append(a) or build(*a, **k))
    val = write(tmp_path / "val.tsv", random_lines(np.random.default_rng(9), 30))
    with pytest.raises(
        FileExistsError, match=r"holds 1 \.parquet file\(s\) and vocabulary\.npz; pass overwrite"
    ):
        convert.convert_tsv(val, out, vocab_threshold=1, progress=False)
    assert passes == [] and _folder(out) == before
    # With overwrite, a conversion interrupted after the vocabulary was built changes nothing either.
    write_records = ParquetSink.write_records
    written: list[int] = []

    def interrupted(sink: ParquetSink, records) -> None:
        if written:  # the second block (tsv_dir has two files)
            raise KeyboardInterrupt
        write_records(sink, records)
        written.append(len(records))

    monkeypatch.setattr(ParquetSink, "write_records", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.convert_tsv(tsv_dir, out, vocab_threshold=2, overwrite=True, progress=False)
    assert len(passes) == 1 and _folder(out) == before
    # A conversion that succeeds replaces both.
    monkeypatch.setattr(ParquetSink, "write_records", write_records)
    result = convert.convert_tsv(tsv_dir, out, vocab_threshold=2, overwrite=True, progress=False)
    vocab = Vocabulary.load(out / "vocabulary.npz")
    assert result.vocabulary == out / "vocabulary.npz" and vocab.threshold == 2
    assert sorted(_folder(out) or {}) == sorted(before)  # no hidden leftovers
    same_batches(CriteoParquet(out, 100), CriteoTSV(tsv_dir, 100, hashing=vocab))
    # Converted again by modulo: the vocabulary no longer describes the files, so it goes with them.
    convert.convert_tsv(tsv_dir, out, overwrite=True, progress=False)
    assert not (out / "vocabulary.npz").exists() and len(list(out.glob("*.parquet"))) == 1


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_modulo_with_table_sizes_and_progress(tsv_dir, tmp_path, capsys):
    out = tmp_path / "pq"
    assert convert.run(cli(str(tsv_dir), str(out), "--table-sizes", "50", "--row-group-rows", "100")) == 0
    captured = capsys.readouterr()
    assert "converting: 100.0%" in captured.err and "wrote 400 rows to 1 file(s)" in captured.out
    reader = CriteoParquet(out, 64)
    assert reader.tables.sizes.tolist() == [50] * 26
    same_batches(CriteoTSV(tsv_dir, 64, hashing=ModuloHashing(50)), reader)
    with pytest.raises(FileExistsError):
        convert.run(cli(str(tsv_dir), str(out), "--quiet"))
    assert convert.run(cli(str(tsv_dir), str(out), "--quiet", "--overwrite")) == 0
    assert capsys.readouterr().err == ""


def test_cli_vocab_mode_and_reusing_the_vocabulary(tsv_dir, tmp_path):
    out = tmp_path / "train"
    assert (
        convert.run(cli(str(tsv_dir), str(out), "--hashing", "vocab", "--vocab-threshold", "2", "--quiet"))
        == 0
    )
    vocab = Vocabulary.load(out / "vocabulary.npz")
    assert vocab.threshold == 2
    same_batches(CriteoTSV(tsv_dir, 100, hashing=vocab), CriteoParquet(out, 100))
    val = write(tmp_path / "val.tsv", random_lines(np.random.default_rng(9), 30))
    assert (
        convert.run(cli(str(val), str(tmp_path / "val"), "--vocab", str(out / "vocabulary.npz"), "--quiet"))
        == 0
    )
    val_reader = CriteoParquet(tmp_path / "val", 100)
    assert val_reader.tables == vocab.tables
    same_batches(CriteoTSV(val, 100, hashing=vocab), val_reader)


def test_cli_skip_bad_lines_and_option_errors(tmp_path, capsys):
    lines = random_lines(np.random.default_rng(3), 20, strip=0.0)
    path = write(tmp_path / "t.tsv", [*lines[:10], "garbage", *lines[10:]])
    with pytest.raises(ValueError, match=r"t\.tsv, line 11"):
        convert.run(cli(str(path), str(tmp_path / "a"), "--quiet", "--labeled"))
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        assert convert.run(cli(str(path), str(tmp_path / "b"), "--quiet", "--skip-bad-lines")) == 0
    assert "1 malformed line(s) skipped" in capsys.readouterr().out
    assert CriteoParquet(tmp_path / "b", 100).num_rows == 20
    with pytest.raises(SystemExit, match="--vocab-threshold applies"):
        convert.run(cli(str(path), str(tmp_path / "c"), "--vocab-threshold", "3"))
    with pytest.raises(SystemExit):
        cli(str(path), str(tmp_path / "c"), "--table-sizes", "1,2,3")


def test_measure_read_throughput(good_pq):
    rate = measure_read_throughput(good_pq, batch_size=64, max_batches=3)
    assert rate > 0


# ---------------------------------------------------------------------------------------------- DataModule
def test_datamodule_detects_parquet_and_tsv(tsv_dir, good_pq, tmp_path):
    from lightning_bagpipe.data.criteo import CriteoDataModule, detect_kind

    assert detect_kind(good_pq) == "parquet" and detect_kind(good_pq / "part-00000.parquet") == "parquet"
    assert detect_kind(tsv_dir) == "tsv" and detect_kind(tsv_dir / "day_0") == "tsv"
    with pytest.raises(FileNotFoundError):
        detect_kind(tmp_path / "missing")
    val_tsv = write(tmp_path / "val.tsv", random_lines(np.random.default_rng(11), 25))
    tsv = CriteoDataModule(tsv_dir, val_path=val_tsv, batch_size=64, table_sizes=SIZES)
    pq_dm = CriteoDataModule(good_pq, batch_size=64)
    assert tsv.kind == "tsv" and pq_dm.kind == "parquet" and tsv.tables == pq_dm.tables
    same_batches(tsv.train_source(), pq_dm.train_source())
    same_batches(tsv.val_source(), CriteoTSV(val_tsv, 64, hashing=ModuloHashing(SIZES)))
    assert pq_dm.val_source() is None
    # The training loader attaches a plan to every batch.
    loader = pq_dm.train_dataloader()
    try:
        planned = list(loader)
    finally:
        pq_dm.teardown("fit")
    assert len(planned) == 7 and all(b.plan is not None for b in planned)


def test_datamodule_vocab_is_shared_with_validation(tsv_dir, tmp_path):
    from lightning_bagpipe.data.criteo import CriteoDataModule

    val = write(tmp_path / "val.tsv", random_lines(np.random.default_rng(12), 25))
    dm = CriteoDataModule(tsv_dir, val_path=val, batch_size=50, hashing="vocab", vocab_threshold=2)
    vocab = Vocabulary.build(tsv_dir, 2)
    assert dm.tables == vocab.tables
    same_batches(dm.val_source(), CriteoTSV(val, 50, hashing=vocab))
    vocab.save(tmp_path / "v.npz")
    loaded = CriteoDataModule(tsv_dir, batch_size=50, hashing="vocab", vocab_path=tmp_path / "v.npz")
    same_batches(loaded.train_source(), dm.train_source())
    with pytest.raises(ValueError, match="vocab_path needs hashing='vocab'"):
        CriteoDataModule(tsv_dir, batch_size=50, vocab_path=tmp_path / "v.npz")


def test_datamodule_rejects_validation_with_other_tables(tsv_dir, good_pq):
    from lightning_bagpipe.data.criteo import CriteoDataModule

    with pytest.raises(ValueError, match="must share tables"):
        CriteoDataModule(good_pq, val_path=tsv_dir, batch_size=8, table_sizes=100)


def test_files_a_killed_conversion_left_are_removed_by_the_next_one(tsv_dir, tmp_path):
    out = tmp_path / "pq"
    host = host_id()  # (temporaries are named .<name>.<host>.<pid>.<random>.tmp)
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that has ended (a writer killed with -9 leaves its files behind)
    stale = [
        out / f".part-00000.parquet.{host}.{dead.pid}.0a1b2c3d.tmp",
        out / f".vocabulary.npz.{host}.{dead.pid}.00ff00ff.tmp",
    ]
    live = out / f".part-00000.parquet.{host}.{os.getppid()}.0a1b2c3d.tmp"  # another writer, still running
    for f in [*stale, live]:
        f.write_bytes(b"half a file")
    convert.convert_tsv(tsv_dir, out, progress=False)
    assert not any(f.exists() for f in stale) and live.exists()
    assert len(list(out.glob("*.parquet"))) == 1
