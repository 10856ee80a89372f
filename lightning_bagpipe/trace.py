"""``lightning-bagpipe trace DATA``: how skewed is my data, and how big a cache does it need?

For a user's own data (a Parquet file or folder, Criteo TSV files, or ``synthetic``) and a batch size,
the tool reads the first ``--batches`` global batches and reports:

* **access skew**, per feature and over all tables: the share of accesses that go to the hottest 1% and
  10% of each table's rows (all rows of the table, touched or not, as BagPipe counts "1% of embeddings");
* **rows fetched** by the lookahead oracle for a range of lookaheads ``L`` and cache capacities, next to
  the classic LRU and LFU caches and offline Belady (the whole trace known in advance) with the same
  capacity (:mod:`lightning_bagpipe.oracle.simulators`);
* a **recommendation**: the smallest capacity in the sweep whose oracle fetches (at the best ``L`` for
  that capacity) are within 5% of the oracle's fewest fetches in the sweep (Belady, which knows the whole
  trace, may fetch a little less; JSON ``fewest_fetched_in_sweep``), with the cache's size
  in bytes for the embedding dimension and optimizer state given.

Capacities below the stream's minimum (two consecutive steps' distinct rows must be resident at once,
because step ``t + 1``'s fetches overlap step ``t``) cannot run the oracle and are reported as
infeasible. ``--plot PATH.png`` draws rows fetched against capacity and the per-feature skew (needs the
``plot`` extra, i.e. matplotlib). The same sweep backs ``lightning-bagpipe bench cache``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lightning_bagpipe.arguments import non_negative, require_counts, require_positive
from lightning_bagpipe.bench.common import parse_int_list, require_matplotlib, save_figure
from lightning_bagpipe.data.criteo_tsv import add_line_arguments
from lightning_bagpipe.id_sets import unique_ids
from lightning_bagpipe.oracle.lookahead import LookaheadOracle
from lightning_bagpipe.oracle.simulators import belady_fetches, lfu_fetches, lru_fetches, min_capacity
from lightning_bagpipe.tables import Tables

__all__ = [
    "BASELINES",
    "Bounds",
    "Stream",
    "Sweep",
    "access_skew",
    "add_arguments",
    "add_stream_arguments",
    "load_stream",
    "parse_capacities",
    "recommend",
    "run",
    "stream_bounds",
    "stream_from_args",
    "sweep",
]

#: The reference policies next to the oracle, by name.
BASELINES = {"lru": lru_fetches, "lfu": lfu_fetches, "belady": belady_fetches}
_DISPLAY = {"lru": "LRU", "lfu": "LFU", "belady": "Belady"}
#: The recommendation takes the smallest capacity within this factor of the fewest fetches.
WITHIN = 1.05


# ---------------------------------------------------------------------- the id stream
@dataclass
class Stream:
    """The fused ids of the first batches of a data source, with its tables."""

    source: str
    tables: Tables
    batch_size: int
    batches: list[np.ndarray]
    read_seconds: float = 0.0
    samples: int | None = None
    """Samples in :attr:`batches` (``None``: every batch is full, ``batch_size`` samples)."""
    skipped_lines: int | None = None
    """Criteo TSV with ``skip_bad_lines``: malformed lines dropped among the :attr:`lines_read` (which may
    run past the last batch traced: the reader parses whole blocks); ``None`` otherwise."""
    lines_read: int | None = None

    @property
    def num_samples(self) -> int:
        """Samples in :attr:`batches` (the last batch of a file source may be partial)."""
        return len(self.batches) * self.batch_size if self.samples is None else self.samples

    @property
    def occurrences(self) -> int:
        return sum(int(b.size) for b in self.batches)

    def grouped(self, k: int) -> Stream:
        """The stream as optimizer steps of ``k`` batches (``accumulate_grad_batches``): the oracle plans
        the batches Lightning accumulates as one step, so caches are sized for such steps."""
        if k == 1:
            return self
        steps = [np.concatenate(self.batches[i : i + k]) for i in range(0, len(self.batches), k)]
        return replace(self, batches=steps)

    def counts(self) -> np.ndarray:
        """Accesses per fused row (``int64``, one per row of every table)."""
        n = self.tables.total_rows
        counts = np.zeros(n, dtype=np.int64)
        chunk: list[np.ndarray] = []
        held = 0
        for i, ids in enumerate(self.batches):
            chunk.append(ids)
            held += ids.size
            if held >= 1 << 24 or i == len(self.batches) - 1:  # one bincount per ~16M ids
                counts += np.bincount(np.concatenate(chunk), minlength=n)
                chunk, held = [], 0
        return counts


def add_stream_arguments(parser: argparse.ArgumentParser, *, default_batches: int) -> None:
    """Flags that choose the data and how much of it to read (shared with ``bench cache``)."""
    parser.add_argument("--batch-size", type=int, default=4096, help="samples per global batch")
    parser.add_argument(
        "--batches",
        type=int,
        default=default_batches,
        help="global batches to read from the start of the data (0: all of a file source)",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="synthetic: Criteo Kaggle's sizes times this"
    )
    parser.add_argument("--zipf", type=float, default=1.0, help="synthetic: Zipf exponent of the ids")
    parser.add_argument("--multi-hot", type=int, default=1, help="synthetic: largest bag size")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: seed of the stream")
    parser.add_argument(
        "--table-size",
        type=int,
        default=None,
        help="Criteo TSV: one row count for every table (modulo hashing; default: Criteo Kaggle's sizes)",
    )
    add_line_arguments(parser)


def stream_from_args(args: argparse.Namespace) -> Stream:
    """:func:`load_stream` with the flags of :func:`add_stream_arguments` (checked here, so an error names
    the flag)."""
    require_counts(args, "batch_size", "multi_hot")
    require_counts(args, "batches", "seed", minimum=0)  # (--batches 0: all of a file)
    require_positive(args, "scale")
    non_negative("--zipf", args.zipf)
    return load_stream(
        str(args.data),
        batch_size=args.batch_size,
        batches=args.batches,
        scale=args.scale,
        zipf=args.zipf,
        multi_hot=args.multi_hot,
        seed=args.seed,
        table_size=args.table_size,
        skip_bad_lines=args.skip_bad_lines,
        labeled=args.labeled,
    )


def load_stream(
    data: str,
    *,
    batch_size: int,
    batches: int,
    scale: float = 1.0,
    zipf: float = 1.0,
    multi_hot: int = 1,
    seed: int = 0,
    table_size: int | None = None,
    skip_bad_lines: bool = False,
    labeled: bool | None = None,
) -> Stream:
    """Read the fused ids of the first ``batches`` global batches (``0``: all) of ``data``.

    ``data`` is ``"synthetic"`` (:class:`~lightning_bagpipe.data.synthetic.SyntheticCriteo`), a Parquet
    file or folder (:class:`~lightning_bagpipe.data.parquet.CriteoParquet`) or Criteo TSV files
    (:class:`~lightning_bagpipe.data.criteo_tsv.CriteoTSV` with modulo hashing; ``skip_bad_lines`` drops
    its malformed lines instead of failing; ``labeled`` as in ``CriteoTSV``: ``None`` detects the format).
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if batches < 0:
        raise ValueError(f"--batches must be >= 0 (0: all), got {batches}")
    t0 = time.perf_counter()
    if data == "synthetic":
        from lightning_bagpipe.data.synthetic import SyntheticCriteo

        _check_tsv_flags(
            table_size,
            skip_bad_lines,
            labeled,
            tables="synthetic tables are Criteo Kaggle's sizes times --scale",
            lines="synthetic data has no lines",
        )
        if batches == 0:
            raise ValueError("--batches 0 (all) needs a file source; synthetic data has no end")
        src = SyntheticCriteo(batch_size, batches, scale=scale, zipf=zipf, multi_hot=multi_hot, seed=seed)
        ids = [b.copy() for b in src.id_batches()]
        return Stream("synthetic", src.tables, batch_size, ids, time.perf_counter() - t0)
    from lightning_bagpipe.data.criteo import detect_kind

    kind = detect_kind(data)  # FileNotFoundError naming the path if it does not exist
    source: Any
    if kind == "parquet":
        from lightning_bagpipe.data.parquet import CriteoParquet

        _check_tsv_flags(
            table_size,
            skip_bad_lines,
            labeled,
            tables="Parquet files record their tables",
            lines="Parquet files have no lines",
        )
        source = CriteoParquet(data, batch_size)
    else:
        from lightning_bagpipe.data.criteo_tsv import CriteoTSV, ModuloHashing

        hashing = ModuloHashing() if table_size is None else ModuloHashing(table_size)
        source = CriteoTSV(data, batch_size, hashing=hashing, skip_bad_lines=skip_bad_lines, labeled=labeled)
    tables: Tables = source.tables
    out: list[np.ndarray] = []
    samples = 0
    reading = iter(source)
    try:
        for i, batch in enumerate(_take(reading, batches)):
            try:
                out.append(batch.sparse.fused_ids(tables))
            except ValueError as err:
                raise ValueError(f"{data}: batch {i}: {err}") from None
            samples += batch.batch_size
    finally:
        # Stop the reader now, not when it is garbage collected: a TSV pass cut short by --batches reports
        # (BadLinesWarning) the lines it skipped when it closes.
        close = getattr(reading, "close", None)
        if close is not None:
            close()
    if not out:
        raise ValueError(f"{data}: no batches to trace (the data is empty)")
    stream = Stream(str(data), tables, batch_size, out, time.perf_counter() - t0, samples=samples)
    if kind == "tsv" and skip_bad_lines:
        stream.skipped_lines, stream.lines_read = source.stats.skipped_lines, source.stats.lines
    return stream


def _check_tsv_flags(
    table_size: int | None, skip_bad_lines: bool, labeled: bool | None, *, tables: str, lines: str
) -> None:
    """Refuse the Criteo TSV flags for other data, saying why (``tables``, ``lines``), rather than ignore
    them: a user who passes ``--table-size`` expects it to size the tables."""
    if table_size is not None:
        raise ValueError(f"--table-size applies to Criteo TSV data; {tables}")
    if skip_bad_lines or labeled is not None:
        flag = "--skip-bad-lines" if skip_bad_lines else "--labeled/--unlabeled"
        raise ValueError(f"{flag} applies to Criteo TSV data; {lines}")


def _take(source: Iterator[Any], n: int) -> Iterator[Any]:
    for i, item in enumerate(source):
        if n and i >= n:
            return
        yield item


# ---------------------------------------------------------------------- skew
def _top_share(counts: np.ndarray, fraction: float) -> float:
    """Share of ``counts``' total taken by its hottest ``ceil(fraction * len)`` entries."""
    total = int(counts.sum())
    if total == 0:
        return 0.0
    k = min(counts.size, max(1, math.ceil(fraction * counts.size)))
    read = counts[counts > 0]  # (rows never read add nothing: partitioning only the rows read is far cheaper)
    if k >= read.size:
        return 1.0
    return float(np.partition(read, read.size - k)[read.size - k :].sum() / total)


def access_skew(stream: Stream, counts: np.ndarray | None = None) -> dict[str, Any]:
    """Per feature and overall: accesses, rows touched, and the access share of the top 1% / 10% of rows."""
    c = stream.counts() if counts is None else counts
    per_feature: dict[str, dict[str, Any]] = {}
    for spec, off in zip(stream.tables, stream.tables.offsets.tolist()):
        seg = c[off : off + spec.num_embeddings]
        per_feature[spec.name] = {
            "rows": spec.num_embeddings,
            "accesses": int(seg.sum()),
            "rows_touched": int(np.count_nonzero(seg)),
            "top1pct_share": _top_share(seg, 0.01),
            "top10pct_share": _top_share(seg, 0.10),
        }
    return {
        "overall": {
            "rows": stream.tables.total_rows,
            "accesses": int(c.sum()),
            "rows_touched": int(np.count_nonzero(c)),
            "top1pct_share": _top_share(c, 0.01),
            "top10pct_share": _top_share(c, 0.10),
        },
        "per_feature": per_feature,
    }


# ---------------------------------------------------------------------- capacity sweep
#: ``--capacity auto``: these multiples of the smallest capacity that can run the oracle.
AUTO_MULTIPLES = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


@dataclass
class Bounds:
    """What a stream needs from a cache, whatever the policy."""

    distinct_rows: int
    """Rows the stream reads at all: every policy fetches at least this many."""
    min_capacity: int
    """Smallest capacity that can run the oracle (and Belady): two consecutive steps' distinct rows."""
    min_capacity_one_step: int
    """Smallest capacity that can run LRU and LFU: one step's distinct rows."""


def stream_bounds(stream: Stream) -> Bounds:
    """The :class:`Bounds` of ``stream``."""
    batches = stream.batches
    return Bounds(
        distinct_rows=int(unique_ids(np.concatenate(batches)).size),
        min_capacity=min_capacity(batches, protect_previous=True),
        min_capacity_one_step=max(int(unique_ids(b).size) for b in batches),
    )


def parse_capacities(text: str, bounds: Bounds, flag: str = "--capacity") -> list[int]:
    """Comma-separated capacities: integers are row counts, decimals in (0, 1] fractions of the distinct
    rows the stream reads; ``auto`` is :data:`AUTO_MULTIPLES` of the smallest feasible capacity (at most
    the distinct rows). Returns sorted distinct row counts."""
    out: set[int] = set()
    if text.strip() == "auto":
        top = max(bounds.distinct_rows, bounds.min_capacity)
        return sorted({min(top, math.ceil(m * bounds.min_capacity)) for m in AUTO_MULTIPLES})
    distinct_rows = bounds.distinct_rows
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            rows = int(item)
        except ValueError:
            try:
                frac = float(item)
            except ValueError:
                raise ValueError(
                    f"{flag}: {item!r} is neither a row count nor a fraction in (0, 1] (in {text!r})"
                ) from None
            if not 0 < frac <= 1:
                raise ValueError(f"{flag}: fraction {item!r} must be in (0, 1] (in {text!r})") from None
            rows = max(1, round(frac * distinct_rows))
        if rows < 1:
            raise ValueError(f"{flag}: a capacity must be >= 1 row, got {item!r} (in {text!r})")
        out.add(rows)
    if not out:
        raise ValueError(f"{flag}: expected a comma-separated list of capacities, got {text!r}")
    return sorted(out)


@dataclass
class Sweep:
    """Rows fetched by every policy at every capacity (``None``: the capacity cannot run that policy)."""

    capacities: list[int]
    lookaheads: list[int]
    min_feasible_capacity: int
    distinct_rows: int
    oracle: dict[int, list[int | None]] = field(default_factory=dict)
    """``oracle[L][i]``: rows fetched with lookahead ``L`` at ``capacities[i]``."""
    baselines: dict[str, list[int | None]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per policy, summed over the capacities (``oracle_L{L}``, ``lru``, ...)."""

    def best_oracle(self, i: int) -> tuple[int | None, int | None]:
        """``(fetched, L)`` of the best lookahead at ``capacities[i]`` (smallest ``L`` on ties)."""
        best: tuple[int | None, int | None] = (None, None)
        for lookahead in self.lookaheads:
            v = self.oracle[lookahead][i]
            if v is not None and (best[0] is None or v < best[0]):
                best = (v, lookahead)
        return best

    def as_dict(self) -> dict[str, Any]:
        return {
            "capacities": self.capacities,
            "lookaheads": self.lookaheads,
            "min_feasible_capacity": self.min_feasible_capacity,
            "distinct_rows": self.distinct_rows,
            "fetched": {
                **{f"oracle_L{lookahead}": v for lookahead, v in self.oracle.items()},
                **self.baselines,
            },
            "seconds": self.seconds,
        }


def sweep(
    stream: Stream,
    lookaheads: Sequence[int],
    capacities: Sequence[int],
    *,
    baselines: Sequence[str] = tuple(BASELINES),
    bounds: Bounds | None = None,
) -> Sweep:
    """Count the rows every policy fetches at every capacity over ``stream``.

    The oracle and Belady need two consecutive steps' rows resident together (the oracle prefetches step
    ``t + 1`` while step ``t`` runs), so capacities below :func:`min_capacity` are ``None`` for them; LRU
    and LFU only need one step's rows.
    """
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline policies {unknown}; known: {sorted(BASELINES)}")
    batches = stream.batches
    b = stream_bounds(stream) if bounds is None else bounds
    need_pair, need_one = b.min_capacity, b.min_capacity_one_step
    result = Sweep(sorted(capacities), sorted(set(lookaheads)), need_pair, b.distinct_rows)
    for lookahead in result.lookaheads:
        fetched: list[int | None] = []
        t0 = time.perf_counter()
        for cap in result.capacities:
            if cap < need_pair:
                fetched.append(None)
                continue
            oracle = LookaheadOracle(stream.tables.total_rows, lookahead, cap)
            for ids in batches:
                oracle.push(ids)
            oracle.finish()
            fetched.append(int(oracle.stats.fetched))
        result.oracle[lookahead] = fetched
        result.seconds[f"oracle_L{lookahead}"] = time.perf_counter() - t0
    for name in baselines:
        fn = BASELINES[name]
        need = need_pair if name == "belady" else need_one
        t0 = time.perf_counter()
        result.baselines[name] = [None if cap < need else int(fn(batches, cap)) for cap in result.capacities]
        result.seconds[name] = time.perf_counter() - t0
    return result


def recommend(result: Sweep, row_bytes: int, within: float = WITHIN) -> dict[str, Any] | None:
    """The smallest capacity whose best-``L`` oracle fetches are within ``within`` of the sweep's fewest
    oracle fetches.

    ``None`` when no capacity of the sweep could run the oracle.
    """
    bests = [result.best_oracle(i) for i in range(len(result.capacities))]
    feasible = [b[0] for b in bests if b[0] is not None]
    if not feasible:
        return None
    fewest = min(feasible)
    for i, (fetched, lookahead) in enumerate(bests):
        if fetched is not None and fetched <= within * fewest:
            cap = result.capacities[i]
            rec: dict[str, Any] = {
                "capacity_rows": cap,
                "lookahead": lookahead,
                "oracle_fetched": fetched,
                "fewest_fetched_in_sweep": fewest,
                "cache_bytes": cap * row_bytes,
                "fraction_of_distinct_rows": cap / max(1, result.distinct_rows),
            }
            for name, values in result.baselines.items():
                v = values[i]
                rec[f"{name}_fetched"] = v
                rec[f"oracle_over_{name}"] = None if not v else fetched / v
            return rec
    return None  # pragma: no cover - the fewest always qualifies


# ---------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``trace`` command's flags."""
    parser.add_argument("data", help="'synthetic', a Parquet file or folder, or Criteo TSV file(s)")
    add_stream_arguments(parser, default_batches=128)
    parser.add_argument(
        "--lookahead", type=str, default="1,4,16,64", help="comma-separated lookaheads L to try"
    )
    parser.add_argument(
        "--capacity",
        type=str,
        default="auto",
        help="comma-separated cache capacities: row counts, or fractions in (0, 1] of the distinct rows "
        "read; 'auto' (default): 1x to 8x the smallest capacity that can run the oracle",
    )
    parser.add_argument("--embedding-dim", type=int, default=16, help="to size the cache in bytes")
    parser.add_argument(
        "--state-floats",
        type=int,
        default=1,
        help="optimizer state floats per row (row-wise Adagrad: 1), to size the cache in bytes",
    )
    parser.add_argument(
        "--accumulate-grad-batches",
        type=int,
        default=1,
        help="batches per optimizer step (Lightning's accumulate_grad_batches): the oracle plans them as "
        "one step, so capacities and lookaheads count such steps (default: %(default)s)",
    )
    parser.add_argument("--no-baselines", action="store_true", help="run the oracle only")
    parser.add_argument("--plot", type=Path, default=None, help="draw the sweep and the skew to this PNG")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Read the data, measure the skew, sweep lookaheads and capacities, print the report."""
    lookaheads = parse_int_list(args.lookahead, "--lookahead")
    for flag in ("embedding_dim",):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.state_floats < 0:
        raise ValueError(f"--state-floats must be >= 0, got {args.state_floats}")
    k = args.accumulate_grad_batches
    if k < 1:
        raise ValueError(f"--accumulate-grad-batches must be >= 1, got {k}")
    read = stream_from_args(args)
    skew = access_skew(read)
    stream = read.grouped(k)
    bounds = stream_bounds(stream)
    capacities = parse_capacities(args.capacity, bounds)
    baselines = () if args.no_baselines else tuple(BASELINES)
    result = sweep(stream, lookaheads, capacities, baselines=baselines, bounds=bounds)
    row_bytes = 4 * (args.embedding_dim + args.state_floats)
    report: dict[str, Any] = {
        "data": str(args.data),
        "batch_size": stream.batch_size,
        "batches": len(read.batches),
        "samples": read.num_samples,
        "accumulate_grad_batches": k,
        "occurrences": stream.occurrences,
        "read_seconds": stream.read_seconds,
        "row_bytes": row_bytes,
        "skew": skew,
        "sweep": result.as_dict(),
        "recommendation": recommend(result, row_bytes),
    }
    if read.skipped_lines is not None:
        report["skipped_lines"] = read.skipped_lines
        report["lines_read"] = read.lines_read
    # The JSON first: neither a failed plot nor a closed stdout (`| head`) loses the figures.
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(format_report(report))
    if args.plot is not None:  # (the command line checked that matplotlib imports before any work)
        plot(report, args.plot)
        print(f"plot written to {args.plot}")
    return report


# ---------------------------------------------------------------------- output
def _n(v: int | None) -> str:
    return "infeasible" if v is None else f"{v:,}"


def format_report(report: dict[str, Any]) -> str:
    """The report as plain text: skew table, fetch table, recommendation."""
    skew = report["skew"]
    ov = skew["overall"]
    n, size = report["batches"], report["batch_size"]
    samples = report.get("samples", n * size)
    # The last batch of a file source may be partial, or the only one (data smaller than a batch).
    read = (
        f"{n} batches of {size} samples"
        if samples == n * size
        else f"{samples:,} samples in {n} batch{'es' if n != 1 else ''} of at most {size}"
    )
    lines = [
        f"trace of {report['data']}: {read}"
        + (
            f" in optimizer steps of {report['accumulate_grad_batches']}"
            if report.get("accumulate_grad_batches", 1) > 1
            else ""
        )
        + ", "
        f"{report['occurrences']:,} id occurrences, {ov['rows_touched']:,} of {ov['rows']:,} rows touched",
    ]
    if report.get("skipped_lines") is not None:
        lines.append(
            f"skipped {report['skipped_lines']:,} malformed line(s) of the {report['lines_read']:,} read "
            "(--skip-bad-lines; whole blocks are read, so they may run past the last batch traced)"
        )
    lines += [
        "",
        "access skew: share of accesses to the hottest 1% / 10% of each table's rows",
        f"  {'feature':<10}{'rows':>12}{'touched':>12}{'top 1%':>9}{'top 10%':>9}",
    ]
    for name, f in skew["per_feature"].items():
        lines.append(
            f"  {name:<10}{f['rows']:>12,}{f['rows_touched']:>12,}{f['top1pct_share']:>9.1%}"
            f"{f['top10pct_share']:>9.1%}"
        )
    lines.append(
        f"  {'all':<10}{ov['rows']:>12,}{ov['rows_touched']:>12,}{ov['top1pct_share']:>9.1%}"
        f"{ov['top10pct_share']:>9.1%}"
    )
    sw = report["sweep"]
    names = list(sw["fetched"])
    lines += [
        "",
        f"rows fetched (min feasible capacity for the oracle: {sw['min_feasible_capacity']:,} rows; "
        f"distinct rows read: {sw['distinct_rows']:,})",
        "  " + f"{'capacity':>12}" + "".join(f"{n:>14}" for n in names),
    ]
    for i, cap in enumerate(sw["capacities"]):
        lines.append("  " + f"{cap:>12,}" + "".join(f"{_n(sw['fetched'][n][i]):>14}" for n in names))
    rec = report["recommendation"]
    lines.append("")
    if rec is None:
        lines.append("recommendation: none of the capacities can run the oracle; try larger ones")
    else:
        extra = "".join(
            f", {rec[f'oracle_over_{b}']:.2f}x {_DISPLAY[b]}'s fetches"
            for b in BASELINES
            if rec.get(f"oracle_over_{b}") is not None
        )
        lines.append(
            f"recommendation: cache_rows={rec['capacity_rows']:,} with lookahead={rec['lookahead']} "
            f"({rec['cache_bytes'] / 2**20:,.1f} MiB at {report['row_bytes']} bytes/row): "
            f"{rec['oracle_fetched']:,} rows fetched, within {WITHIN - 1:.0%} of the oracle's fewest in the "
            f"sweep ({rec['fewest_fetched_in_sweep']:,}){extra}"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Rows fetched against capacity (every policy), and the top-1% access share per feature."""
    plt = require_matplotlib()
    sw = report["sweep"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    plot_fetches(ax, sw)
    feats = report["skew"]["per_feature"]
    bx.bar(list(feats), [100 * f["top1pct_share"] for f in feats.values()], label="top 1% of rows")
    bx.bar(
        list(feats),
        [100 * (f["top10pct_share"] - f["top1pct_share"]) for f in feats.values()],
        bottom=[100 * f["top1pct_share"] for f in feats.values()],
        label="next 9% of rows",
        alpha=0.5,
    )
    bx.set_ylabel("% of the feature's accesses")
    bx.set_title("access skew per feature")
    bx.tick_params(axis="x", labelrotation=90)
    bx.legend()
    fig.suptitle(f"lightning-bagpipe trace: {report['data']}, batch {report['batch_size']}")
    save_figure(fig, path)


def plot_fetches(ax: Any, sweep_dict: dict[str, Any]) -> None:
    """Draw one line per policy of a :meth:`Sweep.as_dict` on ``ax`` (log-scale capacity)."""
    caps = sweep_dict["capacities"]
    for name, values in sweep_dict["fetched"].items():
        pts = [(c, v) for c, v in zip(caps, values) if v is not None]
        if not pts:
            continue
        style = "-o" if name.startswith("oracle") else "--s"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name.replace("_", " "))
    ax.axvline(sweep_dict["min_feasible_capacity"], color="grey", lw=0.8, ls=":", label="min feasible")
    ax.axhline(sweep_dict["distinct_rows"], color="black", lw=0.8, ls=":", label="distinct rows read")
    ax.set_xscale("log")
    ax.set_xlabel("cache capacity (rows)")
    ax.set_ylabel("rows fetched")
    ax.set_title("rows fetched vs cache capacity")
    ax.legend(fontsize=8)
