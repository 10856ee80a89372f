"""``lightning-bagpipe convert INPUT OUT_DIR/``: stream Criteo TSV into the Parquet layout.

The input (a file or a folder, plain or gzip) is parsed block by block by
:mod:`lightning_bagpipe.data.criteo_tsv`, hashed to table rows, and written by
:class:`~lightning_bagpipe.data.parquet.ParquetSink` in row groups, so memory stays at a few blocks plus
one row group whatever the input size. With ``--hashing vocab`` a first pass counts the values and the
vocabulary is saved as ``OUT_DIR/vocabulary.npz`` (convert validation/test files with
``--vocab OUT_DIR/vocabulary.npz`` so they share the training rows).

A conversion changes ``OUT_DIR`` only when it succeeds: the output folder is checked before the first
pass, the Parquet files and the vocabulary are written under hidden temporary names and renamed at the
end, and a failure (a malformed line, Ctrl-C) removes them. ``--overwrite`` replaces the old files at
that last step, so a failed run leaves the old dataset whole.

:func:`add_arguments` and :func:`run` are what the ``lightning-bagpipe`` CLI wires up;
:func:`convert_tsv` is the same as a function.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from lightning_bagpipe.data.criteo_shape import NUM_SPARSE
from lightning_bagpipe.data.criteo_tsv import (
    CriteoTSV,
    Hashing,
    ModuloHashing,
    Vocabulary,
    add_line_arguments,
    list_input_files,
)
from lightning_bagpipe.data.parquet import ParquetSink, check_output_dir
from lightning_bagpipe.temporaries import remove_stale_temporaries, temporary_path

VOCAB_FILE = "vocabulary.npz"


class Progress:
    """A one-line progress report on a terminal stream, rewritten at most every ``interval`` seconds."""

    def __init__(
        self, label: str, total_bytes: int, stream: TextIO | None = None, interval: float = 0.5
    ) -> None:
        self.label = label
        self.total = max(int(total_bytes), 1)
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.start = time.perf_counter()
        self._last = 0.0
        self.rows = 0

    def __call__(self, done_bytes: int) -> None:
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._write(done_bytes, now)

    def _write(self, done: int, now: float) -> None:
        mb_s = done / max(now - self.start, 1e-9) / 1e6
        rows = f", {self.rows:,} rows" if self.rows else ""
        self.stream.write(f"\r{self.label}: {100.0 * done / self.total:5.1f}% ({mb_s:.1f} MB/s{rows})")
        self.stream.flush()

    def finish(self) -> None:
        self._write(self.total, time.perf_counter())
        self.stream.write("\n")
        self.stream.flush()


@dataclass
class ConvertResult:
    """What :func:`convert_tsv` did."""

    files: list[Path]
    rows: int
    lines: int
    skipped_lines: int
    negative_dense: int
    seconds: float
    vocabulary: Path | None = None
    table_sizes: list[int] = field(default_factory=list)


def convert_tsv(
    input_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    hashing: Hashing | None = None,
    vocab_threshold: int | None = None,
    labeled: bool | None = None,
    skip_bad_lines: bool = False,
    rows_per_file: int = 1 << 22,
    row_group_rows: int = 1 << 17,
    overwrite: bool = False,
    progress: bool = True,
    stream: TextIO | None = None,
) -> ConvertResult:
    """Convert Criteo TSV at ``input_path`` into Parquet files in ``out_dir``.

    ``hashing`` maps hashes to rows (default :class:`ModuloHashing` with Criteo Kaggle's sizes). Pass
    ``vocab_threshold`` instead to build a :class:`Vocabulary` from the input first (saved next to the
    output as ``vocabulary.npz``).

    ``out_dir`` must not hold ``.parquet`` files (nor, when a vocabulary is built, ``vocabulary.npz``)
    unless ``overwrite``; this is checked before any pass over the input. The output is published only
    when the whole conversion succeeds (see :class:`ParquetSink`): on an error nothing this call wrote is
    left, and the files it was to overwrite are untouched.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    vocab_path = None if vocab_threshold is None else out / VOCAB_FILE
    if vocab_threshold is not None and hashing is not None:
        raise ValueError("pass either hashing or vocab_threshold, not both")
    # Before any pass: a mistaken run into a used folder must fail at once, having changed nothing.
    check_output_dir(out, overwrite=overwrite, other_files=[] if vocab_path is None else [VOCAB_FILE])
    vocabulary: Vocabulary | None = None
    if vocab_threshold is not None:
        total = sum(f.stat().st_size for f in list_input_files(input_path))
        count = Progress("counting values", total, stream) if progress else None
        hashing = vocabulary = Vocabulary.build(
            input_path, vocab_threshold, labeled=labeled, skip_bad_lines=skip_bad_lines, progress=count
        )
        if count is not None:
            count.finish()
    reader = CriteoTSV(input_path, hashing=hashing, labeled=labeled, skip_bad_lines=skip_bad_lines)
    bar = Progress("converting", reader.total_bytes, stream) if progress else None
    records = reader.iter_records(progress=bar)
    first = next(records, None)
    if first is None:
        raise ValueError(f"{input_path}: no samples to convert")
    sink = ParquetSink(
        out,
        reader.tables,
        labeled=first.labels is not None,
        rows_per_file=rows_per_file,
        row_group_rows=row_group_rows,
        overwrite=overwrite,
        extra_metadata={"hashing": reader.hashing.describe(), "source": str(input_path)},
    )
    staged_vocab: Path | None = None
    remove_stale_temporaries(out / VOCAB_FILE)  # (a killed conversion's; the sink removes its files')
    try:
        with sink:  # publishes the Parquet files on success, removes them on an error
            sink.write_records(first)
            for rec in records:
                sink.write_records(rec)
                if bar is not None:
                    bar.rows = sink.rows_written
            if vocabulary is not None and vocab_path is not None:
                staged_vocab = temporary_path(vocab_path)  # saved before the files are published ...
                vocabulary.save(staged_vocab)
        if staged_vocab is not None and vocab_path is not None:
            os.replace(staged_vocab, vocab_path)  # ... and renamed right after
            staged_vocab = None
        elif overwrite:  # the old conversion's vocabulary does not describe the new files
            (out / VOCAB_FILE).unlink(missing_ok=True)
    finally:
        if staged_vocab is not None:
            staged_vocab.unlink(missing_ok=True)
    if bar is not None:
        bar.rows = sink.rows_written
        bar.finish()
    stats = reader.stats
    return ConvertResult(
        files=list(sink.files),
        rows=sink.rows_written,
        lines=stats.lines,
        skipped_lines=stats.skipped_lines,
        negative_dense=stats.negative_dense,
        seconds=time.perf_counter() - start,
        vocabulary=vocab_path,
        table_sizes=[int(x) for x in reader.tables.sizes],
    )


def parse_table_sizes(text: str) -> list[int] | int:
    """``"1000000"`` (every table) or 26 comma-separated sizes."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"table sizes must be integers, got {text!r}") from None
    if len(sizes) == 1:
        return sizes[0]
    if len(sizes) != NUM_SPARSE:
        raise argparse.ArgumentTypeError(f"give one table size or {NUM_SPARSE}, got {len(sizes)}")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lightning-bagpipe convert``."""
    parser.add_argument("input", help="Criteo TSV file or folder of files (plain or .gz)")
    parser.add_argument("output", help="output folder for part-NNNNN.parquet files")
    parser.add_argument(
        "--hashing",
        choices=["modulo", "vocab"],
        default="modulo",
        help="modulo: row = 1 + hash %% (size - 1); vocab: count values first, rare ones share a row",
    )
    parser.add_argument(
        "--table-sizes",
        type=parse_table_sizes,
        default=None,
        help="modulo: rows per table, one number or 26 comma-separated (default: Criteo Kaggle sizes)",
    )
    parser.add_argument(
        "--vocab-threshold",
        type=int,
        default=None,
        help="vocab: values seen fewer times than this share the rare row (default 1: every seen value)",
    )
    parser.add_argument(
        "--vocab",
        default=None,
        help="use this saved vocabulary.npz (e.g. the training one) instead of building",
    )
    parser.add_argument("--rows-per-file", type=int, default=1 << 22, help="rows per Parquet file")
    parser.add_argument("--row-group-rows", type=int, default=1 << 17, help="rows per Parquet row group")
    add_line_arguments(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the .parquet files (and vocabulary.npz) in OUTPUT once the conversion succeeds",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    """Run ``convert`` for parsed ``args``; prints a summary and returns the exit code."""
    hashing: Hashing | None = None
    threshold = None
    if args.vocab_threshold is not None and (args.hashing != "vocab" or args.vocab is not None):
        raise SystemExit("--vocab-threshold applies to --hashing vocab when building a vocabulary")
    if args.vocab is not None:
        if args.table_sizes is not None:
            raise SystemExit("--vocab and --table-sizes do not go together")
        hashing = Vocabulary.load(args.vocab)
    elif args.hashing == "vocab":
        if args.table_sizes is not None:
            raise SystemExit("--table-sizes applies to --hashing modulo only")
        threshold = 1 if args.vocab_threshold is None else args.vocab_threshold
    elif args.table_sizes is not None:
        hashing = ModuloHashing(args.table_sizes)
    result = convert_tsv(
        args.input,
        args.output,
        hashing=hashing,
        vocab_threshold=threshold,
        labeled=args.labeled,
        skip_bad_lines=args.skip_bad_lines,
        rows_per_file=args.rows_per_file,
        row_group_rows=args.row_group_rows,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(
        f"wrote {result.rows:,} rows to {len(result.files)} file(s) in {args.output} "
        f"in {result.seconds:.1f} s ({result.rows / max(result.seconds, 1e-9):,.0f} rows/s); "
        f"{result.skipped_lines} malformed line(s) skipped, {result.negative_dense} negative dense value(s) "
        f"set to 0; {sum(result.table_sizes):,} table rows"
        + (f"; vocabulary in {result.vocabulary}" if result.vocabulary else "")
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m lightning_bagpipe.data.convert``)."""
    parser = argparse.ArgumentParser(prog="lightning-bagpipe convert", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
