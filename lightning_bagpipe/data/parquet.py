"""Criteo-shaped data in Parquet: the schema, a streaming writer and the :class:`CriteoParquet` reader.

Schema (one row per sample):

=================  ===================================  ==============================================
column             type                                 meaning
=================  ===================================  ==============================================
``label``          ``float32``                          click (0 or 1); absent for unlabeled data
``I1`` .. ``I13``  ``float32``                          dense features, already ``log(1 + max(x, 0))``
``C1`` .. ``C26``  ``int64``, or ``list<int64>``         row ids within each feature's own table
                   (multi-hot)
=================  ===================================  ==============================================

The schema metadata key ``lightning_bagpipe`` holds JSON ``{"format": 1, "tables": [[name, rows], ...],
"dense": [...], "label": "label" | null, ...}``: the table sizes travel with the data, so a reader needs no
side file. No column may hold nulls. Files are read in natural order (``part-2`` before ``part-10``) and
row groups in file order, so the stream order is the write order.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from lightning_bagpipe.data.batch import Batch, SparseFeatures
from lightning_bagpipe.data.criteo_shape import DENSE_NAMES
from lightning_bagpipe.data.criteo_tsv import Records, list_input_files
from lightning_bagpipe.tables import Tables
from lightning_bagpipe.temporaries import remove_stale_temporaries, temporary_path

METADATA_KEY = b"lightning_bagpipe"
FORMAT_VERSION = 1
LABEL = "label"
_ID_LIST = pa.list_(pa.int64())
_SCAN_ROWS = 1 << 16


# ---------------------------------------------------------------------------------------------- schema
def criteo_schema(
    tables: Tables,
    *,
    dense: Sequence[str] = tuple(DENSE_NAMES),
    labeled: bool = True,
    multi_hot: bool = False,
    extra_metadata: Mapping[str, Any] | None = None,
) -> pa.Schema:
    """The Arrow schema (with the ``lightning_bagpipe`` metadata) of the documented layout."""
    fields = [pa.field(LABEL, pa.float32(), nullable=False)] if labeled else []
    fields += [pa.field(name, pa.float32(), nullable=False) for name in dense]
    id_type = _ID_LIST if multi_hot else pa.int64()
    fields += [pa.field(name, id_type, nullable=False) for name in tables.names]
    meta = {
        "format": FORMAT_VERSION,
        "tables": tables.to_list(),
        "dense": list(dense),
        "label": LABEL if labeled else None,
        "multi_hot": bool(multi_hot),
        **dict(extra_metadata or {}),
    }
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta).encode()})


def read_layout(schema: pa.Schema, where: str) -> dict[str, Any]:
    """The ``lightning_bagpipe`` metadata of ``schema`` (ValueError naming ``where`` if absent)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(
            f"{where}: no '{METADATA_KEY.decode()}' schema metadata (table sizes); write it with "
            "lightning_bagpipe.data.parquet or pass tables= (and dense=) to CriteoParquet"
        )
    try:
        meta = json.loads(raw)
        Tables(meta["tables"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where}: unreadable '{METADATA_KEY.decode()}' schema metadata ({err})") from err
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{where}: metadata format {meta.get('format')!r}, this reader knows {FORMAT_VERSION}"
        )
    return dict(meta)


# ---------------------------------------------------------------------------------------------- writing
def check_output_dir(
    out_dir: str | os.PathLike[str], *, overwrite: bool, other_files: Sequence[str] = ()
) -> None:
    """Raise ``FileExistsError`` if ``out_dir`` holds ``.parquet`` files (or any of ``other_files``, e.g.
    a vocabulary a conversion would replace) and ``overwrite`` is false. A missing folder is fine."""
    out = Path(out_dir)
    if overwrite or not out.is_dir():
        return
    held = [f"{n} .parquet file(s)" for n in [len(list(out.glob("*.parquet")))] if n]
    held += [name for name in other_files if (out / name).exists()]
    if held:
        raise FileExistsError(f"{out} already holds {' and '.join(held)}; pass overwrite")


class ParquetSink:
    """Stream samples into ``out_dir/part-00000.parquet, part-00001.parquet, ...``.

    Rows are buffered until a full row group of ``row_group_rows`` is ready, and a new file starts every
    ``rows_per_file`` rows, so memory stays around one row group whatever the input size. Use as a
    context manager or call :meth:`close`; :attr:`files` lists the files' names.

    The output appears only when it is complete: files are written under hidden temporary names
    (:func:`~lightning_bagpipe.temporaries.temporary_path`) and renamed to ``part-NNNNN.parquet`` by
    :meth:`close`, which is also when ``overwrite`` removes the folder's old ``.parquet`` files.
    :meth:`abort` (called by the context manager on an exception, e.g. a malformed input line or Ctrl-C)
    removes what this sink wrote and
    leaves the folder as it was, so a failed conversion never leaves a partial dataset that reads as
    valid, nor destroys the one it was to replace.

    Args:
        out_dir: output folder (created). It must not hold ``.parquet`` files unless ``overwrite``.
        tables: the tables (names and sizes go to the metadata; ids are checked against the sizes).
        labeled: write a ``label`` column.
        multi_hot: write ``list<int64>`` id columns (bags) instead of ``int64``.
        extra_metadata: more JSON-able entries for the metadata (e.g. how ids were hashed).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        tables: Tables,
        *,
        dense: Sequence[str] = tuple(DENSE_NAMES),
        labeled: bool = True,
        multi_hot: bool = False,
        rows_per_file: int = 1 << 22,
        row_group_rows: int = 1 << 17,
        extra_metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        compression: str = "snappy",
    ) -> None:
        if row_group_rows < 1 or rows_per_file < 1:
            raise ValueError(
                f"row_group_rows ({row_group_rows}) and rows_per_file ({rows_per_file}) must be >= 1"
            )
        self.out_dir = Path(out_dir)
        check_output_dir(self.out_dir, overwrite=overwrite)
        self._made_dir = not self.out_dir.exists()  # abort() removes it again
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name in {p.name[1:].split(".parquet.")[0] for p in self.out_dir.glob(".part-*.parquet.*.tmp")}:
            remove_stale_temporaries(self.out_dir / f"{name}.parquet")  # (left by a killed conversion)
        self.overwrite = bool(overwrite)
        self.tables = tables
        self.dense = list(dense)
        self.labeled = labeled
        self.multi_hot = multi_hot
        self.rows_per_file = int(rows_per_file)
        self.row_group_rows = int(row_group_rows)
        self.compression = compression
        self.schema = criteo_schema(
            tables, dense=self.dense, labeled=labeled, multi_hot=multi_hot, extra_metadata=extra_metadata
        )
        self.files: list[Path] = []
        """The output files' final names (they exist once :meth:`close` has returned)."""
        self.rows_written = 0
        self._staged: list[Path] = []  # files[i] is written as _staged[i] until close() renames it
        self._published: list[Path] = []  # the files close() has renamed so far
        self._state = "open"  # then "closed" or "aborted"
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    # -- input
    def write_records(self, records: Records) -> None:
        """Append one-hot samples (:class:`~lightning_bagpipe.data.criteo_tsv.Records`)."""
        n = len(records)
        if n == 0:
            return
        if (records.labels is None) == self.labeled:
            raise ValueError(f"the sink {'expects' if self.labeled else 'has no'} labels; records disagree")
        self._check_ids_rows(records.rows)
        cols: list[pa.Array] = [] if records.labels is None else [pa.array(records.labels, pa.float32())]
        cols += [
            pa.array(np.ascontiguousarray(records.dense[:, j]), pa.float32()) for j in range(len(self.dense))
        ]
        if self.multi_hot:
            offsets = pa.array(np.arange(n + 1, dtype=np.int32))
            cols += [pa.ListArray.from_arrays(offsets, pa.array(r, pa.int64())) for r in records.rows]
        else:
            cols += [pa.array(r, pa.int64()) for r in records.rows]
        self._append(pa.Table.from_arrays(cols, schema=self.schema))

    def write_batch(self, batch: Batch) -> None:
        """Append a global :class:`Batch` (multi-hot bags need ``multi_hot=True``)."""
        sp = batch.sparse
        if sp.keys != self.tables.names:
            raise ValueError(f"batch features {sp.keys} differ from the sink's tables {self.tables.names}")
        b = sp.batch_size
        if b == 0:
            return
        if (batch.labels is None) == self.labeled:
            raise ValueError(
                f"the sink {'expects' if self.labeled else 'has no'} labels; the batch disagrees"
            )
        dense = np.zeros((b, 0), np.float32) if batch.dense is None else batch.dense.detach().cpu().numpy()
        if dense.shape != (b, len(self.dense)):
            raise ValueError(
                f"batch dense features have shape {dense.shape}, expected ({b}, {len(self.dense)})"
            )
        sp.validate(self.tables)
        lengths = sp.lengths.numpy().reshape(len(sp.keys), b)
        values = sp.values.numpy()
        if not self.multi_hot and (lengths != 1).any():
            raise ValueError("the batch has multi-hot bags (lengths other than 1); write with multi_hot=True")
        cols: list[pa.Array] = []
        if batch.labels is not None:
            cols.append(
                pa.array(batch.labels.detach().cpu().numpy().astype(np.float32, copy=False), pa.float32())
            )
        cols += [pa.array(np.ascontiguousarray(dense[:, j]), pa.float32()) for j in range(dense.shape[1])]
        start = 0
        for f in range(len(sp.keys)):
            count = int(lengths[f].sum())
            vals = pa.array(values[start : start + count], pa.int64())
            if self.multi_hot:
                offsets = np.zeros(b + 1, dtype=np.int32)
                np.cumsum(lengths[f], out=offsets[1:])
                cols.append(pa.ListArray.from_arrays(pa.array(offsets), vals))
            else:
                cols.append(vals)
            start += count
        self._append(pa.Table.from_arrays(cols, schema=self.schema))

    def _check_ids_rows(self, rows: np.ndarray) -> None:
        if rows.shape[0] != len(self.tables):
            raise ValueError(f"records have {rows.shape[0]} features, the sink has {len(self.tables)} tables")
        lo, hi = rows.min(axis=1), rows.max(axis=1)
        bad = np.flatnonzero((lo < 0) | (hi >= self.tables.sizes))
        if bad.size:
            j = int(bad[0])
            v = lo[j] if lo[j] < 0 else hi[j]
            raise ValueError(
                f"feature {self.tables.names[j]!r}: id {v} is outside [0, {self.tables.sizes[j]})"
            )

    # -- output
    def _append(self, table: pa.Table) -> None:
        if self._state != "open":
            raise ValueError(f"this ParquetSink is {self._state}: it takes no more rows")
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        while self._pending_rows and (final or self._pending_rows >= self.row_group_rows):
            room = self.rows_per_file - self._file_rows
            n = min(self.row_group_rows, room, self._pending_rows)
            if not final and n < min(self.row_group_rows, room):
                return
            table = pa.concat_tables(self._pending) if len(self._pending) > 1 else self._pending[0]
            group, rest = table.slice(0, n), table.slice(n)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
            if self._writer is None:
                path = self.out_dir / f"part-{len(self.files):05d}.parquet"
                staged = temporary_path(path)
                self._staged.append(staged)  # before the writer creates it: abort() removes it
                self.files.append(path)
                self._writer = pq.ParquetWriter(staged, self.schema, compression=self.compression)
            self._writer.write_table(group, row_group_size=n)
            self._file_rows += n
            self.rows_written += n
            if self._file_rows >= self.rows_per_file:
                self._writer.close()
                self._writer, self._file_rows = None, 0

    def close(self) -> list[Path]:
        """Write what is buffered, close the current file and publish the output; returns the files.

        Publishing removes the folder's old ``.parquet`` files (with ``overwrite``) and renames this
        sink's files to their final names. If any of it fails, :meth:`abort` removes this sink's files.
        Closing again returns the same files.
        """
        if self._state == "closed":
            return self.files
        if self._state == "aborted":
            raise ValueError("this ParquetSink was aborted: its files are gone")
        try:
            self._flush(final=True)
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        return self.files

    def _publish(self) -> None:
        """Replace the folder's ``.parquet`` files (if ``overwrite``) by this sink's staged files."""
        existing = sorted(self.out_dir.glob("*.parquet"))
        if existing and not self.overwrite:  # another writer filled the folder meanwhile
            raise FileExistsError(
                f"{self.out_dir} gained {len(existing)} .parquet file(s) while this sink wrote; its own "
                "files were removed (pass overwrite to replace the others)"
            )
        for f in existing:
            f.unlink()
        for staged, final in zip(self._staged, self.files):
            os.replace(staged, final)
            self._published.append(final)

    def abort(self) -> None:
        """Discard the output: close the current file and remove every file this sink created.

        The folder's earlier files are left as they were (``overwrite`` removes them only when
        :meth:`close` succeeds); a folder the sink created is removed. Nothing happens after a successful
        :meth:`close`.
        """
        if self._state == "closed":
            return
        self._state = "aborted"
        self._pending, self._pending_rows = [], 0
        if self._writer is not None:
            # the file is removed below; the error that made us abort is the one to report
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        for f in self._staged + self._published:
            f.unlink(missing_ok=True)
        self.files, self._staged, self._published = [], [], []
        if self._made_dir:
            with contextlib.suppress(OSError):  # not empty: someone else's files arrived meanwhile
                self.out_dir.rmdir()

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()  # an error or an interrupt: no partial output


def write_parquet(
    batches: Iterable[Batch],
    out_dir: str | os.PathLike[str],
    tables: Tables,
    *,
    multi_hot: bool | None = None,
    rows_per_file: int = 1 << 22,
    row_group_rows: int = 1 << 17,
    overwrite: bool = False,
    extra_metadata: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write a source of global batches (e.g. :class:`~lightning_bagpipe.data.synthetic.SyntheticCriteo`)
    to Parquet. Dense column names are ``I1..`` and the label column is written when batches carry labels
    (both taken from the first batch). ``multi_hot=None`` uses list columns iff the first batch has a bag
    that is not of size 1; pass ``True`` when later batches may have bags."""
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise ValueError("no batches to write")
    if multi_hot is None:
        multi_hot = not first.sparse.is_one_hot()
    width = 0 if first.dense is None else int(first.dense.shape[1])
    sink = ParquetSink(
        out_dir,
        tables,
        dense=[f"I{j + 1}" for j in range(width)],
        labeled=first.labels is not None,
        multi_hot=multi_hot,
        rows_per_file=rows_per_file,
        row_group_rows=row_group_rows,
        overwrite=overwrite,
        extra_metadata=extra_metadata,
    )
    with sink:
        sink.write_batch(first)
        for batch in it:
            sink.write_batch(batch)
    return sink.files


# ---------------------------------------------------------------------------------------------- reading
class CriteoParquet:
    """Global batches streamed from a Parquet file or folder of the documented schema.

    Built on ``pyarrow.dataset``: files in natural order, row groups in order, only the needed columns
    decoded, a few record batches read ahead. Batches run across file boundaries; the last partial batch
    is kept unless ``drop_last``.

    Args:
        path: a ``.parquet`` file or a folder of them.
        batch_size: samples per global batch.
        columns: the columns to read (default: all of the layout). Sparse columns keep their table order,
            so the batch's features (and :attr:`tables`) are the requested sparse columns; leaving out
            ``label`` gives unlabeled batches; leaving out every dense column gives ``dense=None``.
        tables: table sizes for files written without the metadata (then ``dense`` names the dense
            columns and a ``label`` column is used if present).
        dense: dense column names, with ``tables``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int = 4096,
        *,
        columns: Sequence[str] | None = None,
        tables: Tables | Iterable[tuple[str, int]] | None = None,
        dense: Sequence[str] | None = None,
        drop_last: bool = False,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path)
        self.files = list_input_files(path, suffixes=[".parquet"])
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        schema = _read_metadata(self.files[0]).schema.to_arrow_schema()
        if tables is None:
            layout = read_layout(schema, str(self.files[0]))
            all_tables = Tables(layout["tables"])
            all_dense = list(layout["dense"])
            label = layout["label"]
        else:
            all_tables = Tables.coerce(tables)
            all_dense = list(dense or [])
            label = LABEL if LABEL in schema.names else None
        known = ([label] if label else []) + all_dense + all_tables.names
        wanted = known if columns is None else list(columns)
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; the layout has {known}")
        self.label: str | None = label if label in wanted else None
        self.dense_columns = [c for c in all_dense if c in wanted]
        self.tables = Tables(t for t in all_tables if t.name in wanted)
        self.columns = ([self.label] if self.label else []) + self.dense_columns + self.tables.names
        self._multi_hot: dict[str, bool] = {}
        self.num_rows = 0
        for f in self.files:
            self.num_rows += self._check_file(f, all_tables if tables is None else None)
        self._dataset = ds.dataset([str(f) for f in self.files], format="parquet")

    def _check_file(self, f: Path, expect_tables: Tables | None) -> int:
        """Check one file's schema against the layout; returns its row count."""
        meta = _read_metadata(f)
        schema = meta.schema.to_arrow_schema()
        if expect_tables is not None:
            layout = read_layout(schema, str(f))
            if Tables(layout["tables"]) != expect_tables:
                raise ValueError(f"{f}: table sizes differ from {self.files[0].name}'s")
        for name in self.columns:
            if name not in schema.names:
                raise ValueError(f"{f}: column {name!r} is missing")
            typ = schema.field(name).type
            if name == self.label or name in self.dense_columns:
                if typ != pa.float32():
                    raise ValueError(f"{f}: column {name!r} has type {typ}, expected float")
                continue
            if typ == pa.int64():
                multi = False
            elif typ == _ID_LIST or (pa.types.is_large_list(typ) and typ.value_type == pa.int64()):
                multi = True
            else:
                raise ValueError(f"{f}: column {name!r} has type {typ}, expected int64 or list<int64>")
            if self._multi_hot.setdefault(name, multi) != multi:
                raise ValueError(f"{f}: column {name!r} is {typ}, but other files store it differently")
        return int(meta.num_rows)

    def __len__(self) -> int:
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[Batch]:
        pending: list[pa.RecordBatch] = []
        have = 0
        seen = 0
        # Scanning in large record batches is several times faster than batch-sized ones; slicing is free.
        scan_rows = max(self.batch_size, _SCAN_ROWS)
        for rb in self._dataset.to_batches(
            columns=self.columns, batch_size=scan_rows, batch_readahead=2, fragment_readahead=1
        ):
            if rb.num_rows == 0:
                continue
            pending.append(rb)
            have += rb.num_rows
            while have >= self.batch_size:
                table = pa.Table.from_batches(pending)
                yield self._to_batch(table.slice(0, self.batch_size), seen)
                seen += self.batch_size
                rest = table.slice(self.batch_size)
                pending, have = rest.to_batches(), rest.num_rows
        if have and not self.drop_last:
            yield self._to_batch(pa.Table.from_batches(pending), seen)

    def _to_batch(self, table: pa.Table, first_row: int) -> Batch:
        """One global batch from ``table`` (rows ``first_row..`` of the stream, for messages)."""
        b = table.num_rows
        where = f"rows {first_row}..{first_row + b - 1} of {self.path}"
        for name in self.columns:
            if table.column(name).null_count:
                raise ValueError(f"column {name!r} holds nulls ({where})")
        labels = None
        if self.label:
            labels = torch.from_numpy(
                np.array(_column_numpy(table, self.label), dtype=np.float32)
            )  # writable copy
        dense = None
        if self.dense_columns:
            d = np.empty((b, len(self.dense_columns)), dtype=np.float32)
            for j, name in enumerate(self.dense_columns):
                d[:, j] = _column_numpy(table, name)
            dense = torch.from_numpy(d)
        values: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        for spec in self.tables:
            if self._multi_hot[spec.name]:
                arr = table.column(spec.name).combine_chunks()
                flat = arr.flatten()
                if flat.null_count:
                    raise ValueError(f"column {spec.name!r} holds null ids inside its lists ({where})")
                vals = flat.to_numpy()
                lens = arr.value_lengths().to_numpy().astype(np.int64)
            else:
                vals = _column_numpy(table, spec.name)
                lens = np.ones(b, dtype=np.int64)
            if vals.size and (int(vals.min()) < 0 or int(vals.max()) >= spec.num_embeddings):
                bad = vals[(vals < 0) | (vals >= spec.num_embeddings)][0]
                raise ValueError(
                    f"column {spec.name!r}: id {int(bad)} is outside [0, {spec.num_embeddings}) "
                    f"of its table ({where})"
                )
            values.append(vals.astype(np.int64, copy=False))
            lengths.append(lens)
        sparse = SparseFeatures(
            self.tables.names,
            torch.from_numpy(np.concatenate(values)),
            torch.from_numpy(np.concatenate(lengths)),
        )
        return Batch(sparse=sparse, dense=dense, labels=labels)

    def __repr__(self) -> str:
        return (
            f"CriteoParquet({str(self.path)!r}, batch_size={self.batch_size}, {len(self.files)} file(s), "
            f"{self.num_rows} rows, {self.tables})"
        )


def _read_metadata(f: Path) -> pq.FileMetaData:
    """The Parquet footer of ``f``; a ``ValueError`` naming the file if it is not readable Parquet (empty,
    truncated, or another format with a ``.parquet`` name): pyarrow's own message does not say which."""
    try:
        return pq.read_metadata(f)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(
            f"{f}: not a readable Parquet file ({err}); remove it from the folder or write it again"
        ) from err


def _column_numpy(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if col.num_chunks == 1:
        return col.chunk(0).to_numpy(zero_copy_only=False)
    return col.to_numpy()


def measure_read_throughput(
    path: str | os.PathLike[str], batch_size: int = 4096, max_batches: int = 200
) -> float:
    """Samples per second of reading and batching ``path`` with :class:`CriteoParquet` (first ``max_batches``
    batches, including the time to open the dataset)."""
    start = time.perf_counter()
    reader = CriteoParquet(path, batch_size)
    samples = 0
    for i, batch in enumerate(reader):
        samples += batch.batch_size
        if i + 1 >= max_batches:
            break
    elapsed = time.perf_counter() - start
    return samples / elapsed if elapsed > 0 else float("inf")


__all__ = [
    "FORMAT_VERSION",
    "LABEL",
    "METADATA_KEY",
    "CriteoParquet",
    "ParquetSink",
    "criteo_schema",
    "measure_read_throughput",
    "read_layout",
    "write_parquet",
]
