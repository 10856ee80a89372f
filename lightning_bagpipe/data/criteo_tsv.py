"""Read the raw Criteo Kaggle / Terabyte text format into global batches.

Each line is ``label, I1..I13, C1..C26`` separated by tabs (40 fields), or ``I1..I13, C1..C26`` (39 fields)
in unlabeled test files. Dense ``I`` fields are integers, categorical ``C`` fields are hexadecimal hashes
(8 hex digits in Criteo, so values up to ``2**32``; ids stay ``int64`` throughout). How each irregularity of
the real files is handled:

* **Empty field** = missing. A missing dense value is 0; a missing categorical value maps to the table's
  dedicated row :data:`MISSING_ROW` (row 0).
* **Short lines** (fewer fields than the format has) are malformed, like lines with too many: a missing
  column in the middle (``C7`` deleted) cannot be told apart from stripped trailing empty fields, and
  padding the line would shift ``C8..C26`` into the wrong tables. The real Criteo files keep every tab
  (a line whose last fields are empty ends in tabs), so a well-formed file has no short lines.
* **Negative dense values** (Criteo's ``I2`` has some): the dense transform is ``log(1 + max(x, 0))``, so they
  become 0; the count is reported in :attr:`ParseStats.negative_dense`.
* **Unlabeled files**: ``labeled=None`` tells the formats apart from the most fields on any line in the first
  block of each file (40 labeled, 39 unlabeled); pass ``labeled=`` to say it outright. Unlabeled batches have
  ``labels=None``. In a file found labeled, a 39-field line is a short line (malformed).
* **Malformed lines** (fewer or more fields than the format has, an empty line, a label other than
  ``0``/``1``, a non-integer dense value, a categorical value that is not 1 to 15 hex digits) raise a
  ``ValueError`` naming the file, the 1-based line number and the reason (for a wrong number of fields, the
  count), unless ``skip_bad_lines=True``: then they are dropped, counted in
  :attr:`ParseStats.skipped_lines` and reported by a :class:`BadLinesWarning` at the end of the pass.
* **Windows line ends** (``\\r\\n``) are accepted.

Input is a file or a folder of files read in natural order (``day_2`` before ``day_10``); hidden files are
ignored. Files starting with the gzip magic bytes are decompressed on the fly. Parsing is vectorized with
numpy over blocks of a few MB: newline and tab positions give every field's byte range, and digits are
accumulated one character position at a time across all fields of the block.

Hashes become table rows through a :class:`ModuloHashing` (``1 + hash % (rows - 1)``) or a
:class:`Vocabulary` built in one pass with a frequency threshold (values seen fewer times share
:data:`RARE_ROW`).
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import warnings
import zlib
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeGuard

import numpy as np
import torch

from lightning_bagpipe.data.batch import Batch, SparseFeatures
from lightning_bagpipe.data.criteo_shape import (
    CRITEO_KAGGLE_CARDINALITIES,
    DENSE_NAMES,
    NUM_DENSE,
    NUM_SPARSE,
    SPARSE_NAMES,
)
from lightning_bagpipe.tables import Tables

MISSING_ROW = 0
"""Row of every table that serves a missing (empty) categorical value."""
RARE_ROW = 1
"""Row of a :class:`Vocabulary` table shared by values below the frequency threshold (and unseen ones)."""

LABELED_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
UNLABELED_FIELDS = NUM_DENSE + NUM_SPARSE
_MAX_DECIMAL_DIGITS = 18  # < 2**63
_MAX_HEX_DIGITS = 15  # < 2**60: keeps hashes non-negative int64

ProgressFn = Callable[[int], None]
"""Called with the number of input bytes (compressed, over all files) consumed so far."""


class BadLinesWarning(UserWarning):
    """Malformed lines were skipped (``skip_bad_lines=True``)."""


# ---------------------------------------------------------------------------------------------- files
def _natural_key(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_input_files(path: str | os.PathLike[str], suffixes: Sequence[str] | None = None) -> list[Path]:
    """The file ``path``, or the non-hidden regular files of folder ``path`` in natural order.

    ``suffixes`` (e.g. ``[".parquet"]``) keeps only files with those endings. Raises ``FileNotFoundError``
    for a missing path and ``ValueError`` for a folder without matching files.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.exists():
        raise FileNotFoundError(f"input {str(p)!r} does not exist")
    if not p.is_dir():
        raise ValueError(f"input {str(p)!r} is neither a file nor a folder")
    files = [c for c in p.iterdir() if c.is_file() and not c.name.startswith(".")]
    if suffixes is not None:
        files = [c for c in files if any(c.name.endswith(s) for s in suffixes)]
    if not files:
        what = f" ending in {list(suffixes)}" if suffixes else ""
        raise ValueError(f"folder {str(p)!r} holds no files{what}")
    return sorted(files, key=lambda c: _natural_key(c.name))


def _open_binary(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """``(reader, raw file)``: a gzip reader when the file starts with the gzip magic bytes."""
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller
    magic = raw.read(2)
    raw.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw  # type: ignore[return-value]
    return raw, raw


def _line_blocks(path: Path, chunk_bytes: int, on_bytes: Callable[[int], None]) -> Iterator[bytes]:
    """Blocks of whole lines (each ending in ``\\n``; a final unterminated line gets one)."""
    reader, raw = _open_binary(path)
    try:
        rest = b""
        while True:
            try:
                data = reader.read(chunk_bytes)
            except (OSError, EOFError, zlib.error) as err:  # includes gzip.BadGzipFile
                raise ValueError(f"{path}: cannot read ({err})") from err
            on_bytes(raw.tell())
            if not data:
                if rest:
                    yield rest + b"\n"
                return
            data = rest + data
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            rest = data[cut + 1 :]
            yield data[: cut + 1]
    finally:
        reader.close()
        raw.close()


# ---------------------------------------------------------------------------------------------- parsing
@dataclass
class ParseStats:
    """Counters of one pass over the input."""

    lines: int = 0
    """Lines read (including skipped ones)."""
    rows: int = 0
    """Samples produced."""
    skipped_lines: int = 0
    """Malformed lines dropped (only with ``skip_bad_lines=True``)."""
    skipped_examples: list[str] = field(default_factory=list)
    """``file:line`` of the first few skipped lines."""
    negative_dense: int = 0
    """Negative dense values, which the transform ``log(1 + max(x, 0))`` turns into 0."""
    bytes_read: int = 0
    """Input bytes consumed (compressed size for gzip files)."""


@dataclass
class ParsedChunk:
    """Parsed lines of one block, before hashing: labels ``[n]`` or None, dense ``[n, 13]`` (transformed),
    ``hashes`` ``[26, n]`` (feature-major, ``-1`` where a categorical is missing)."""

    labels: np.ndarray | None
    dense: np.ndarray
    hashes: np.ndarray

    def __len__(self) -> int:
        return int(self.hashes.shape[1])


_HEX = np.full(256, -1, dtype=np.int8)
_HEX[ord("0") : ord("9") + 1] = np.arange(10)
_HEX[ord("a") : ord("f") + 1] = np.arange(10, 16)
_HEX[ord("A") : ord("F") + 1] = np.arange(10, 16)
_DEC = np.full(256, -1, dtype=np.int8)
_DEC[ord("0") : ord("9") + 1] = np.arange(10)


def _parse_digits(
    buf: np.ndarray, end: np.ndarray, length: np.ndarray, lut: np.ndarray, base: int, max_digits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Integers of the fields ``buf[end - length : end]`` (elementwise) and a flag per invalid field.

    Every field is read as the ``W = max(length)`` bytes that end where it ends (one gather through a
    strided window view of ``buf``); bytes before a field's start are masked to 0 digits, and the digits
    are combined with one matrix-vector product. Empty fields give 0 and are not flagged.
    """
    shape = end.shape
    end, length = end.reshape(-1), length.reshape(-1)
    bad = length > max_digits
    width = min(int(length.max()) if length.size else 0, max_digits)
    if width == 0:
        return np.zeros(shape, dtype=np.int64), bad.reshape(shape)
    padded = np.zeros(buf.size + width, dtype=np.uint8)
    padded[width:] = buf
    windows = np.lib.stride_tricks.as_strided(padded, shape=(buf.size + 1, width), strides=(1, 1))
    digits = lut[windows[end]]  # row i: the width bytes before end[i]; padded so end - width >= 0
    short = np.flatnonzero(length < width)
    if short.size * 4 > length.size:  # many short fields (dense features): mask every row
        digits[np.arange(width) < (width - length)[:, None]] = 0
    elif short.size:  # a few (hex hashes are nearly all 8 digits or missing): mask only those rows
        sub = digits[short]
        sub[np.arange(width) < (width - length[short])[:, None]] = 0
        digits[short] = sub
    bad |= (digits < 0).any(1)
    powers = base ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (digits.astype(np.int64) @ powers).reshape(shape), bad.reshape(shape)


def _explain(line: bytes, labeled: bool) -> str:
    """Why one line is malformed (the slow, readable re-check used only for error messages)."""
    if line.endswith(b"\r"):
        line = line[:-1]
    expected = LABELED_FIELDS if labeled else UNLABELED_FIELDS
    layout = "label, I1..I13, C1..C26" if labeled else "I1..I13, C1..C26"
    if not line:
        return "empty line"
    fields = line.split(b"\t")
    if len(fields) != expected:
        commas = (
            f" (the line holds {line.count(b',')} commas: fields are tab-separated)" if b"," in line else ""
        )
        return f"{len(fields)} tab-separated fields, expected {expected} ({layout}){commas}"
    if labeled and fields[0] not in (b"0", b"1"):
        return f"label {fields[0].decode('latin-1')!r} is not 0 or 1"
    dense = fields[1 : 1 + NUM_DENSE] if labeled else fields[:NUM_DENSE]
    for name, v in zip(DENSE_NAMES, dense):
        if v and not re.fullmatch(rb"-?[0-9]{1,%d}" % _MAX_DECIMAL_DIGITS, v):
            return f"dense feature {name} value {v.decode('latin-1')!r} is not an integer"
    for name, v in zip(SPARSE_NAMES, fields[expected - NUM_SPARSE :]):
        if v and not re.fullmatch(rb"[0-9a-fA-F]{1,%d}" % _MAX_HEX_DIGITS, v):
            return (
                f"categorical feature {name} value {v.decode('latin-1')!r} is not a hexadecimal hash "
                f"(1 to {_MAX_HEX_DIGITS} hex digits)"
            )
    return "malformed line"


def _field_bounds(
    buf: np.ndarray, expected: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Byte ranges of every field of a block of whole lines, field-major.

    Returns ``(line_starts, newlines, num_fields, f_start, f_end)`` with ``f_start``/``f_end`` of shape
    ``[expected, lines]``. Lines with another number of fields are malformed, but still get bounds that
    stay inside the block: fields absent from a short line are the empty range ``[0, 0)``, and a long line
    gets only its first ``expected - 1`` boundaries.
    """
    newlines = np.flatnonzero(buf == 10)
    n = newlines.size
    starts = np.empty(n, dtype=np.int64)
    starts[:1] = 0
    starts[1:] = newlines[:-1] + 1
    ends = newlines.astype(np.int64)
    ends -= (ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13)  # drop a \r before the \n
    tabs = np.flatnonzero(buf == 9)
    tabs_before = np.searchsorted(tabs, newlines)
    tabs_per_line = np.diff(tabs_before, prepend=0)
    num_fields = tabs_per_line + 1
    f_start = np.zeros((expected, n), dtype=np.int64)
    f_end = np.zeros((expected, n), dtype=np.int64)
    f_start[0] = starts
    if tabs.size == n * (expected - 1) and (tabs_per_line == expected - 1).all():
        grid = tabs.reshape(n, expected - 1).T  # the common case: every line has every field
        f_end[:-1] = grid
        f_start[1:] = grid + 1
        f_end[-1] = ends
    else:
        line_of_tab = np.repeat(np.arange(n), tabs_per_line)
        k = np.arange(tabs.size) - (tabs_before - tabs_per_line)[line_of_tab]  # field ending at each tab
        keep = k < expected - 1
        f_end[k[keep], line_of_tab[keep]] = tabs[keep]
        f_start[k[keep] + 1, line_of_tab[keep]] = tabs[keep] + 1
        f_end[np.minimum(num_fields, expected) - 1, np.arange(n)] = ends
    return starts, newlines, num_fields, f_start, f_end


def parse_block(
    data: bytes,
    *,
    labeled: bool,
    file: str,
    first_line: int,
    skip_bad_lines: bool,
    stats: ParseStats,
) -> ParsedChunk:
    """Parse a block of whole Criteo lines (each ending in ``\\n``); see the module docstring.

    ``first_line`` is the 1-based line number of the block's first line in ``file`` (for messages).
    Updates ``stats`` (lines, rows, skipped lines, negative dense values).
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    expected = LABELED_FIELDS if labeled else UNLABELED_FIELDS
    starts, newlines, num_fields, f_start, f_end = _field_bounds(buf, expected)
    n = newlines.size
    f_len = f_end - f_start

    bad = num_fields != expected  # too few (an empty line has 1) or too many fields
    labels = None
    col = 0
    if labeled:
        first = buf[f_start[0]]
        bad |= (f_len[0] != 1) | ((first != ord("0")) & (first != ord("1")))
        labels = (first == ord("1")).astype(np.float32)
        col = 1

    d_end = f_end[col : col + NUM_DENSE]
    d_len = f_len[col : col + NUM_DENSE]
    neg = (d_len > 0) & (buf[f_start[col : col + NUM_DENSE]] == ord("-"))
    d_value, d_bad = _parse_digits(buf, d_end, d_len - neg, _DEC, 10, _MAX_DECIMAL_DIGITS)
    d_bad |= neg & (d_len == 1)
    bad |= d_bad.any(0)

    c_len = f_len[col + NUM_DENSE :]
    hashes, c_bad = _parse_digits(buf, f_end[col + NUM_DENSE :], c_len, _HEX, 16, _MAX_HEX_DIGITS)
    hashes[c_len == 0] = -1
    bad |= c_bad.any(0)

    stats.lines += n
    if bad.any():
        bad_lines = np.flatnonzero(bad)
        if not skip_bad_lines:
            i = int(bad_lines[0])
            line = data[starts[i] : newlines[i]]
            raise ValueError(
                f"{file}, line {first_line + i}: {_explain(line, labeled)} "
                "(pass skip_bad_lines=True to skip malformed lines)"
            )
        stats.skipped_lines += bad_lines.size
        room = 5 - len(stats.skipped_examples)
        stats.skipped_examples += [f"{file}:{first_line + int(i)}" for i in bad_lines[: max(room, 0)]]
    good = ~bad
    stats.negative_dense += int((neg & (d_value > 0))[:, good].sum())
    d_value[neg] = 0  # the transform clips negative values: log(1 + max(x, 0))
    # A skipped line's non-digit fields parse to garbage (negative sums of -1 digits), which log1p would
    # warn about ("invalid value") although the line is dropped: zero them first.
    d_value[:, bad] = 0
    dense = np.log1p(d_value.T.astype(np.float64)).astype(np.float32)
    if not good.all():
        dense, hashes = dense[good], hashes[:, good]
        labels = None if labels is None else labels[good]
    stats.rows += int(hashes.shape[1])
    return ParsedChunk(labels, dense, np.ascontiguousarray(hashes))


def _count_fields(data: bytes) -> np.ndarray:
    """Fields per line of a block of whole lines."""
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 10)
    tabs = np.flatnonzero(buf == 9)
    return np.bincount(np.searchsorted(newlines, tabs), minlength=newlines.size) + 1


def iter_parsed(
    files: Sequence[Path],
    *,
    labeled: bool | None,
    skip_bad_lines: bool,
    stats: ParseStats,
    chunk_bytes: int = 4 << 20,
    progress: ProgressFn | None = None,
) -> Generator[ParsedChunk, None, None]:
    """Parse ``files`` in order, block by block. ``labeled=None`` detects the format per file (see the
    module docstring); every file must agree. Warns with :class:`BadLinesWarning` at the end if lines
    were skipped, also when the pass stops early (the generator is closed: a consumer that needs only the
    first batches, or training that ends after ``max_steps``), so dropped lines are never unreported."""
    try:
        yield from _iter_parsed(files, labeled, skip_bad_lines, stats, chunk_bytes, progress)
    finally:
        if stats.skipped_lines:
            warnings.warn(
                f"skipped {stats.skipped_lines} malformed line(s) of {stats.lines} read "
                f"(first: {', '.join(stats.skipped_examples)})",
                BadLinesWarning,
                stacklevel=2,
            )


def _iter_parsed(
    files: Sequence[Path],
    labeled: bool | None,
    skip_bad_lines: bool,
    stats: ParseStats,
    chunk_bytes: int,
    progress: ProgressFn | None,
) -> Iterator[ParsedChunk]:
    """:func:`iter_parsed` without the final warning."""
    resolved = labeled
    done_bytes = 0
    for path in files:
        line_no = 1

        def on_bytes(pos: int, base: int = done_bytes) -> None:
            stats.bytes_read = base + pos
            if progress is not None:
                progress(stats.bytes_read)

        detected_here = labeled is not None
        for data in _line_blocks(path, chunk_bytes, on_bytes):
            if not detected_here:
                fields = int(_count_fields(data).max())
                if fields < UNLABELED_FIELDS:
                    commas = (
                        " and holds commas: Criteo fields are separated by tabs (convert comma-separated "
                        "files first); if the fields are right,"
                        if b"," in data[: data.find(b"\n") if b"\n" in data else len(data)]
                        else ";"
                    )
                    raise ValueError(
                        f"{path}: cannot tell labeled ({LABELED_FIELDS} fields) from unlabeled "
                        f"({UNLABELED_FIELDS} fields) Criteo data: the longest of the first lines has "
                        f"{fields} tab-separated field(s){commas} pass labeled=True or labeled=False"
                    )
                here = fields >= LABELED_FIELDS  # longer lines are reported as malformed
                if resolved is not None and here != resolved:
                    kind = "labeled" if here else "unlabeled"
                    raise ValueError(f"{path} looks {kind} but the files before it do not; keep them apart")
                resolved = here
                detected_here = True
            assert resolved is not None
            chunk = parse_block(
                data,
                labeled=resolved,
                file=str(path),
                first_line=line_no,
                skip_bad_lines=skip_bad_lines,
                stats=stats,
            )
            line_no += data.count(b"\n")
            if len(chunk):
                yield chunk
        done_bytes = stats.bytes_read


# ---------------------------------------------------------------------------------------------- hashing
class ModuloHashing:
    """Hash to row: ``MISSING_ROW`` (0) for a missing value, else ``1 + hash % (rows - 1)``.

    Args:
        sizes: rows per table: one integer (Python or numpy) for all 26 tables, or one per table (each at
            least 2). Other values (floats, bools) are refused, not truncated. The default is Criteo
            Kaggle's cardinalities.
    """

    def __init__(
        self, sizes: int | np.integer | Sequence[int | np.integer] = CRITEO_KAGGLE_CARDINALITIES
    ) -> None:
        arr = _table_sizes(sizes)
        if (arr < 2).any():
            j = int(np.flatnonzero(arr < 2)[0])
            raise ValueError(
                f"table {SPARSE_NAMES[j]} needs at least 2 rows (missing + values), got {arr[j]}"
            )
        self.sizes = arr.astype(np.int64)
        self.tables = Tables.from_sizes(self.sizes.tolist())

    def map(self, hashes: np.ndarray) -> np.ndarray:
        """Rows for a ``[26, n]`` hash matrix (``-1`` = missing)."""
        rows = np.remainder(hashes, (self.sizes - 1)[:, None])
        rows += 1
        rows[hashes < 0] = MISSING_ROW
        return rows

    def describe(self) -> dict[str, object]:
        return {"mode": "modulo"}


def _is_integer(value: object) -> TypeGuard[int | np.integer]:
    """A Python or numpy integer (not a bool, which is an ``int`` to Python but no table size)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _table_sizes(sizes: object) -> np.ndarray:
    """``sizes`` (one integer for every table, or one per table) as ``int64 [26]``.

    Python and numpy integers are accepted; anything else (a float such as ``1000.7``, a bool, a string)
    is an error naming the value, so a size is never silently truncated."""
    values: list[object]
    if isinstance(sizes, np.ndarray) and sizes.ndim == 0:
        sizes = sizes[()]  # a numpy scalar
    if _is_integer(sizes):
        values = [sizes] * NUM_SPARSE
    elif isinstance(sizes, (str, bytes)) or not isinstance(sizes, (Sequence, np.ndarray)):
        raise ValueError(
            f"table sizes must be an integer or {NUM_SPARSE} integers, got {sizes!r} ({type(sizes).__name__})"
        )
    else:
        values = list(sizes)
        if len(values) != NUM_SPARSE:
            raise ValueError(f"need one table size or {NUM_SPARSE}, got {len(values)}")
    ints: list[int] = []
    for name, v in zip(SPARSE_NAMES, values):
        if not _is_integer(v):
            raise ValueError(f"table {name}: size {v!r} ({type(v).__name__}) is not an integer")
        if not -(2**63) <= int(v) < 2**63:
            raise ValueError(f"table {name}: size {v} does not fit in int64")
        ints.append(int(v))
    return np.array(ints, dtype=np.int64)


class Vocabulary:
    """Per-feature vocabulary: row ``MISSING_ROW`` (0) for missing values, ``RARE_ROW`` (1) for values seen
    fewer than ``threshold`` times (and values never seen), rows ``2..`` for the others in order of
    decreasing count (ties by hash), so hot values get low rows.

    Build it with :meth:`build` (one pass over the training files), keep it with :meth:`save` and
    :meth:`load`, and apply the same one to validation and test files.
    """

    def __init__(self, keys: Sequence[np.ndarray], rows: Sequence[np.ndarray], threshold: int) -> None:
        if len(keys) != NUM_SPARSE or len(rows) != NUM_SPARSE:
            raise ValueError(f"a vocabulary needs {NUM_SPARSE} features, got {len(keys)}")
        self.keys = [np.asarray(k, dtype=np.int64) for k in keys]
        self.rows = [np.asarray(r, dtype=np.int64) for r in rows]
        for name, k, r in zip(SPARSE_NAMES, self.keys, self.rows):
            if k.shape != r.shape or (k.size > 1 and (np.diff(k) <= 0).any()):
                raise ValueError(f"vocabulary of {name}: keys must be strictly increasing and match rows")
        self.threshold = int(threshold)
        self.tables = Tables.from_sizes([2 + k.size for k in self.keys])

    @classmethod
    def build(
        cls,
        path: str | os.PathLike[str],
        threshold: int = 1,
        *,
        labeled: bool | None = None,
        skip_bad_lines: bool = False,
        chunk_bytes: int = 4 << 20,
        progress: ProgressFn | None = None,
    ) -> Vocabulary:
        """Count every categorical value of the TSV file/folder ``path`` in one pass and keep those seen at
        least ``threshold`` times. Memory grows with the number of distinct values, not of lines."""
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        counters = [_Counter() for _ in range(NUM_SPARSE)]
        stats = ParseStats()
        for chunk in iter_parsed(
            list_input_files(path),
            labeled=labeled,
            skip_bad_lines=skip_bad_lines,
            stats=stats,
            chunk_bytes=chunk_bytes,
            progress=progress,
        ):
            for j, counter in enumerate(counters):
                column = chunk.hashes[j]
                counter.add(column[column >= 0])
        keys, rows = [], []
        for counter in counters:
            values, counts = counter.result()
            kept = counts >= threshold
            values, counts = values[kept], counts[kept]
            order = np.lexsort((values, -counts))  # by count descending, then hash
            row_of = np.empty(values.size, dtype=np.int64)
            row_of[order] = np.arange(2, 2 + values.size)
            keys.append(values)
            rows.append(row_of)
        return cls(keys, rows, threshold)

    def map(self, hashes: np.ndarray) -> np.ndarray:
        """Rows for a ``[26, n]`` hash matrix (``-1`` = missing)."""
        out = np.empty(hashes.shape, dtype=np.int64)
        for j in range(NUM_SPARSE):
            h, keys = hashes[j], self.keys[j]
            if keys.size == 0:
                out[j] = RARE_ROW
            else:
                pos = np.minimum(np.searchsorted(keys, h), keys.size - 1)
                out[j] = np.where(keys[pos] == h, self.rows[j][pos], RARE_ROW)
            out[j, h < 0] = MISSING_ROW
        return out

    def describe(self) -> dict[str, object]:
        return {"mode": "vocab", "threshold": self.threshold}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write to ``path`` (``.npz``)."""
        arrays: dict[str, np.ndarray] = {"threshold": np.array(self.threshold)}
        for name, k, r in zip(SPARSE_NAMES, self.keys, self.rows):
            arrays[f"{name}_keys"] = k
            arrays[f"{name}_rows"] = r
        with open(path, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocabulary:
        """Read a vocabulary written by :meth:`save`."""
        with np.load(path) as z:
            missing = [n for n in SPARSE_NAMES if f"{n}_keys" not in z or f"{n}_rows" not in z]
            if missing or "threshold" not in z:
                raise ValueError(
                    f"{path}: not a lightning-bagpipe vocabulary (lacks {missing or ['threshold']})"
                )
            return cls(
                [z[f"{n}_keys"] for n in SPARSE_NAMES],
                [z[f"{n}_rows"] for n in SPARSE_NAMES],
                int(z["threshold"]),
            )


class _Counter:
    """Counts of int64 values, merged in geometrically growing rounds so the total work stays
    ``O(N log N)`` (re-merging a growing sorted array on every block would be quadratic)."""

    def __init__(self) -> None:
        self.values = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_size = 0

    def add(self, x: np.ndarray) -> None:
        u, c = np.unique(x, return_counts=True)
        self.pending.append((u, c.astype(np.int64)))
        self.pending_size += u.size
        if self.pending_size >= max(1 << 20, self.values.size):
            self._merge()

    def _merge(self) -> None:
        if not self.pending:
            return
        values = np.concatenate([self.values, *(u for u, _ in self.pending)])
        counts = np.concatenate([self.counts, *(c for _, c in self.pending)])
        order = np.argsort(values, kind="stable")
        values, counts = values[order], counts[order]
        head = np.r_[True, values[1:] != values[:-1]] if values.size else np.zeros(0, dtype=bool)
        starts = np.flatnonzero(head)
        self.values = values[starts]
        self.counts = np.add.reduceat(counts, starts) if starts.size else counts[:0]
        self.pending, self.pending_size = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._merge()
        return self.values, self.counts


Hashing = ModuloHashing | Vocabulary


# ---------------------------------------------------------------------------------------------- records
@dataclass
class Records:
    """A columnar run of mapped samples: labels ``[n]`` (or None), dense ``[n, 13]`` and table rows
    ``[26, n]`` (feature-major, so a batch's key-major values are one contiguous copy)."""

    labels: np.ndarray | None
    dense: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.shape[1])

    def to_batch(self, tables: Tables) -> Batch:
        """A one-hot global :class:`Batch` (values key-major)."""
        values = np.ascontiguousarray(self.rows).reshape(-1)
        lengths = np.ones(values.size, dtype=np.int64)
        sparse = SparseFeatures(tables.names, torch.from_numpy(values), torch.from_numpy(lengths))
        labels = None if self.labels is None else torch.from_numpy(np.ascontiguousarray(self.labels))
        return Batch(sparse=sparse, dense=torch.from_numpy(np.ascontiguousarray(self.dense)), labels=labels)


def rebatch(chunks: Iterator[Records], batch_size: int, drop_last: bool = False) -> Iterator[Records]:
    """Cut a stream of record runs of any sizes into runs of exactly ``batch_size`` (the last one may be
    shorter unless ``drop_last``)."""
    parts: list[Records] = []
    have = 0

    def take(n: int) -> Records:
        nonlocal have
        out: list[Records] = []
        need = n
        while need:
            head = parts[0]
            if len(head) <= need:
                out.append(parts.pop(0))
                need -= len(head)
            else:
                out.append(Records(_cut(head.labels, 0, need), head.dense[:need], head.rows[:, :need]))
                parts[0] = Records(_cut(head.labels, need, None), head.dense[need:], head.rows[:, need:])
                need = 0
        have -= n
        if len(out) == 1:
            return out[0]
        labels = (
            None if out[0].labels is None else np.concatenate([r.labels for r in out if r.labels is not None])
        )
        return Records(
            labels, np.concatenate([r.dense for r in out]), np.concatenate([r.rows for r in out], axis=1)
        )

    for chunk in chunks:
        if len(chunk) == 0:
            continue
        parts.append(chunk)
        have += len(chunk)
        while have >= batch_size:
            yield take(batch_size)
    if have and not drop_last:
        yield take(have)


def _cut(x: np.ndarray | None, a: int, b: int | None) -> np.ndarray | None:
    return None if x is None else x[a:b]


# ---------------------------------------------------------------------------------------------- reader
class CriteoTSV:
    """Global batches from Criteo TSV files (see the module docstring for the format handling).

    Args:
        path: a file or a folder of files (natural order), plain or gzip.
        batch_size: samples per batch. Batches run across file boundaries; the last, partial batch is kept
            unless ``drop_last``.
        hashing: a :class:`ModuloHashing` (default: Criteo Kaggle's cardinalities) or a :class:`Vocabulary`.
        labeled: ``True`` for 40-field files, ``False`` for 39-field (unlabeled) ones, ``None`` to detect.
        skip_bad_lines: drop malformed lines (counted in :attr:`stats`) instead of raising.
        chunk_bytes: parse block size.

    Iterating twice gives the same batches. The number of batches is unknown until the files are read,
    so there is no ``len()``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int = 4096,
        *,
        hashing: Hashing | None = None,
        labeled: bool | None = None,
        skip_bad_lines: bool = False,
        drop_last: bool = False,
        chunk_bytes: int = 4 << 20,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(chunk_bytes) < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.path = Path(path)
        self.files = list_input_files(path)
        self.batch_size = int(batch_size)
        self.hashing: Hashing = hashing if hashing is not None else ModuloHashing()
        self.tables: Tables = self.hashing.tables
        self.labeled = labeled
        self.skip_bad_lines = bool(skip_bad_lines)
        self.drop_last = bool(drop_last)
        self.chunk_bytes = int(chunk_bytes)
        self.stats = ParseStats()
        """Counters of the latest pass (reset when a new pass starts)."""

    @property
    def skipped_lines(self) -> int:
        """Malformed lines skipped in the latest pass."""
        return self.stats.skipped_lines

    @property
    def total_bytes(self) -> int:
        """Size of the input files on disk (compressed size for gzip files)."""
        return sum(f.stat().st_size for f in self.files)

    def iter_records(self, progress: ProgressFn | None = None) -> Generator[Records, None, None]:
        """Mapped samples block by block (sizes follow the input blocks, not ``batch_size``).

        Closing this generator before the end closes the parse at once (not whenever it is garbage
        collected), so the :class:`BadLinesWarning` of a pass that stops early comes when it stops.
        """
        self.stats = ParseStats()
        parsed = iter_parsed(
            self.files,
            labeled=self.labeled,
            skip_bad_lines=self.skip_bad_lines,
            stats=self.stats,
            chunk_bytes=self.chunk_bytes,
            progress=progress,
        )
        try:
            for chunk in parsed:
                yield Records(chunk.labels, chunk.dense, self.hashing.map(chunk.hashes))
        finally:
            parsed.close()

    def __iter__(self) -> Iterator[Batch]:
        records = self.iter_records()
        try:
            for batch in rebatch(records, self.batch_size, self.drop_last):
                yield batch.to_batch(self.tables)
        finally:
            records.close()  # an early stop reports its skipped lines now (see iter_records)

    def __repr__(self) -> str:
        files = f"{len(self.files)} file(s)"
        return f"CriteoTSV({str(self.path)!r}, batch_size={self.batch_size}, {files}, {self.tables})"


__all__ = [
    "MISSING_ROW",
    "RARE_ROW",
    "BadLinesWarning",
    "CriteoTSV",
    "ModuloHashing",
    "ParseStats",
    "Records",
    "Vocabulary",
    "list_input_files",
    "parse_block",
    "rebatch",
]


def add_line_arguments(parser: argparse._ActionsContainer) -> None:
    """The command-line flags that set :class:`CriteoTSV`'s ``skip_bad_lines`` and ``labeled``, for every
    command that reads Criteo TSV (``convert``, ``train``, ``trace``, ``bench cache``)."""
    parser.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="Criteo TSV: skip malformed lines (counted) instead of failing",
    )
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument(
        "--labeled",
        dest="labeled",
        action="store_const",
        const=True,
        default=None,
        help="Criteo TSV: 40-field lines starting with a label (default: detect from the first lines)",
    )
    labels.add_argument(
        "--unlabeled",
        dest="labeled",
        action="store_const",
        const=False,
        help="Criteo TSV: 39-field lines without a label (Criteo's test files)",
    )
