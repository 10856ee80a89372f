"""Oracle benchmark: planning speed, and rows fetched against LRU, LFU and offline Belady.

``lightning-bagpipe bench oracle --json PATH`` (or ``python -m lightning_bagpipe.bench.oracle``) runs the
:class:`~lightning_bagpipe.oracle.lookahead.LookaheadOracle` on a synthetic Criteo-shaped id stream:
26 categorical features with Criteo Kaggle's cardinalities (times ``--scale``), one-hot, Zipf-skewed ids.
The stream is generated here, independently of the project's data generators, so the benchmark measures
the oracle alone:

* each feature draws ranks from a Zipf law (exponent ``--zipf``) over its cardinality, via the inverse
  CDF of the continuous power law on ``[0.5, n + 0.5)`` rounded to the nearest rank (see
  :func:`zipf_ranks`; vectorized, no per-table arrays);
* ranks become ids through a seeded affine permutation ``(a * rank + b) mod n`` with ``gcd(a, n) = 1``,
  so hot rows are scattered over each table (cache behaviour does not depend on the labels);
* fused id = table offset + id.

Measured: wall time of :meth:`~LookaheadOracle.push` + :meth:`~LookaheadOracle.finish` over the whole
stream (generation excluded) as ids/s and batches/s, and the rows each policy fetches with the same
cache capacity: the oracle (default ``tie_break="recency"``, and again with ``"frequency"``), LRU, LFU
and offline Belady (whole trace known, rows of the in-flight step protected, as for the oracle). The
capacity defaults to 10% of the distinct rows the stream touches, small enough to force evictions, or to
the smallest capacity that can run the stream (two consecutive steps' distinct rows) when that is more:
small streams with large batches need it, and the note printed says so. A ``--capacity`` given below it
is an error naming the minimum. The command prints :func:`summary`; ``--json`` has every figure.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_bagpipe.arguments import require_counts, require_positive
from lightning_bagpipe.bench.common import machine_info
from lightning_bagpipe.data.criteo_shape import scaled_cardinalities
from lightning_bagpipe.oracle.lookahead import LookaheadOracle, OracleStats
from lightning_bagpipe.oracle.simulators import belady_fetches, lfu_fetches, lru_fetches, min_capacity

#: ``--capacity`` when not given: this fraction of the distinct rows, raised to the stream's minimum.
DEFAULT_CAPACITY = "0.1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags (``--json`` is added by the command line front end)."""
    parser.add_argument("--batches", type=int, default=256, help="global batches in the stream")
    parser.add_argument("--batch-size", type=int, default=4096, help="samples per global batch")
    parser.add_argument("--lookahead", type=int, default=64, help="oracle lookahead L (batches)")
    parser.add_argument(
        "--capacity",
        type=str,
        default=None,
        help="cache rows: an integer count, or a decimal fraction in (0, 1] of the distinct rows touched "
        f"(default: {DEFAULT_CAPACITY}, or the smallest capacity the stream can run with if that is more)",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply Criteo Kaggle's cardinalities")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of every feature's ids")
    parser.add_argument("--seed", type=int, default=0, help="seed of the id stream")
    parser.add_argument(
        "--no-baselines", action="store_true", help="time the oracle only (skip LRU, LFU and Belady)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the stream, time the oracle, count every policy's fetches; returns the JSON-ready figures."""
    _check(args)
    cards = scaled_cardinalities(args.scale)
    t0 = time.perf_counter()
    stream = zipf_stream(cards, args.batches, args.batch_size, args.zipf, args.seed)
    gen_seconds = time.perf_counter() - t0
    total_rows = int(sum(cards))
    counts = np.bincount(np.concatenate(stream), minlength=total_rows)
    distinct = int(np.count_nonzero(counts))
    given = args.capacity is not None
    capacity_arg = args.capacity if given else DEFAULT_CAPACITY
    capacity = _capacity(capacity_arg, distinct)
    need = min_capacity(stream, protect_previous=True)
    raised = not given and capacity < need
    if raised:
        print(
            f"lightning-bagpipe bench oracle: note: the default --capacity {capacity_arg} ({capacity:,} "
            f"rows) is below the {need:,} distinct rows two consecutive steps need at once; using --capacity "
            f"{need}",
            file=sys.stderr,
        )
        capacity = need
    elif capacity < need:
        raise ValueError(
            f"--capacity {capacity_arg} gives {capacity:,} rows but two consecutive steps of this stream "
            f"need up to {need:,} distinct rows at once: the minimum is --capacity {need} (or lower "
            "--batch-size)"
        )

    stats, seconds = _time_oracle(stream, total_rows, args.lookahead, capacity, "recency")
    freq_stats, freq_seconds = _time_oracle(stream, total_rows, args.lookahead, capacity, "frequency")
    occurrences = sum(int(ids.size) for ids in stream)

    result: dict[str, Any] = {
        "suite": "oracle",
        "config": {
            "batches": args.batches,
            "batch_size": args.batch_size,
            "features": len(cards),
            "lookahead": args.lookahead,
            "capacity_arg": capacity_arg,
            "capacity_rows": capacity,
            "capacity_raised_to_minimum": raised,
            "scale": args.scale,
            "zipf": args.zipf,
            "seed": args.seed,
            "total_rows": total_rows,
        },
        "stream": {
            "occurrences": occurrences,
            "distinct_rows": distinct,
            "distinct_per_step_mean": stats.unique_ids / max(1, stats.steps),
            "min_feasible_capacity": need,
            "top1pct_rows_access_share": _top_share(counts, 0.01),
            "top1pct_rows_model_share": _model_top_share(cards, args.zipf, 0.01),
            "generate_seconds": gen_seconds,
        },
        "oracle_seconds": seconds,
        "ids_per_second": occurrences / seconds,
        "batches_per_second": args.batches / seconds,
        "oracle": stats.as_dict(),
        "oracle_frequency_ties": {**freq_stats.as_dict(), "seconds": freq_seconds},
        "fetched": {
            "oracle": stats.fetched,
            "oracle_frequency_ties": freq_stats.fetched,
            "distinct_rows": distinct,
        },
        "machine": machine_info(),
    }
    if not args.no_baselines:
        timings = {}
        for name, sim in (("lru", lru_fetches), ("lfu", lfu_fetches), ("belady", belady_fetches)):
            t0 = time.perf_counter()
            result["fetched"][name] = sim(stream, capacity)
            timings[name] = time.perf_counter() - t0
        result["baseline_seconds"] = timings
        fetched = result["fetched"]
        result["ratios"] = {
            "oracle_over_lru": fetched["oracle"] / fetched["lru"],
            "oracle_over_lfu": fetched["oracle"] / fetched["lfu"],
            "oracle_over_belady": fetched["oracle"] / fetched["belady"],
            "oracle_frequency_ties_over_lru": fetched["oracle_frequency_ties"] / fetched["lru"],
            "oracle_frequency_ties_over_belady": fetched["oracle_frequency_ties"] / fetched["belady"],
        }
        result["goals"] = {
            "oracle_at_most_0.8x_lru": result["ratios"]["oracle_over_lru"] <= 0.8,
            "oracle_within_10pct_of_belady": result["ratios"]["oracle_over_belady"] <= 1.1,
        }
    return result


def summary(result: dict[str, Any]) -> str:
    """What :func:`run` measured, in a few lines: the stream, the oracle's speed, each policy's fetches."""
    c, s, fetched = result["config"], result["stream"], result["fetched"]
    seconds = result["oracle_seconds"]
    lines = [
        f"bench oracle: {c['batches']} batches of {c['batch_size']:,} samples, {s['occurrences']:,} ids, "
        f"{s['distinct_rows']:,} distinct rows; L = {c['lookahead']}, capacity {c['capacity_rows']:,} rows "
        f"(minimum {s['min_feasible_capacity']:,})",
        f"oracle time: {seconds:.3f} s, {1000 * seconds / c['batches']:.2f} ms per batch, "
        f"{result['ids_per_second'] / 1e6:.1f} M ids/s "
        f"(frequency ties: {result['oracle_frequency_ties']['seconds']:.3f} s)",
        f"rows fetched (the stream reads {fetched['distinct_rows']:,} distinct rows):",
    ]
    names = {"oracle": "oracle", "oracle_frequency_ties": "oracle, frequency ties"}
    names |= {"lru": "LRU", "lfu": "LFU", "belady": "Belady"}
    for key, name in names.items():
        if key in fetched:
            over = fetched["oracle"] / fetched[key]
            ratio = "" if key.startswith("oracle") else f"   oracle/{name} {over:.3f}"
            lines.append(f"  {name:<24}{fetched[key]:>14,}{ratio}")
    return "\n".join(lines)


def _time_oracle(
    stream: list[np.ndarray], total_rows: int, lookahead: int, capacity: int, tie_break: str
) -> tuple[OracleStats, float]:
    """Run one oracle over the whole stream; its counters and the wall time of push + finish."""
    oracle = LookaheadOracle(total_rows, lookahead, capacity, tie_break=tie_break)
    t0 = time.perf_counter()
    for ids in stream:
        oracle.push(ids)
    oracle.finish()
    return oracle.stats, time.perf_counter() - t0


# ---------------------------------------------------------------------- the synthetic stream
def zipf_ranks(rng: np.random.Generator, sizes: np.ndarray, count: int, exponent: float) -> np.ndarray:
    """``[len(sizes), count]`` ranks in ``[0, sizes[f])``; rank ``r`` has probability about ``∝ (r+1)^-s``.

    Inverse CDF of the continuous power law ``x^-s`` on ``[0.5, n + 0.5)``, rounded to the nearest
    integer: vectorized, O(1) memory per table, and close to the discrete Zipf law (the hottest of 1000
    rows at ``s = 1.2`` gets 25% of the draws instead of Zipf's 23%).
    """
    lo = 0.5
    hi = sizes.astype(np.float64)[:, None] + 0.5
    u = rng.random((sizes.size, count))
    if abs(exponent - 1.0) < 1e-9:
        x = lo * np.exp(u * np.log(hi / lo))
    else:
        e = 1.0 - exponent
        x = (lo**e + u * (hi**e - lo**e)) ** (1.0 / e)
    ranks = np.floor(x + 0.5).astype(np.int64) - 1
    return np.clip(ranks, 0, sizes[:, None] - 1)  # float rounding can land a hair outside [0.5, n + 0.5)


def zipf_stream(
    cardinalities: Sequence[int], batches: int, batch_size: int, exponent: float, seed: int
) -> list[np.ndarray]:
    """``batches`` arrays of fused ids (key-major: feature 0's ``batch_size`` ids, then feature 1's, ...)."""
    rng = np.random.default_rng(seed)
    sizes = np.asarray(cardinalities, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    mult = np.array([_coprime_multiplier(rng, int(n)) for n in sizes], dtype=np.int64)
    shift = rng.integers(0, sizes)
    out = []
    for _ in range(batches):
        ranks = zipf_ranks(rng, sizes, batch_size, exponent)
        ids = (ranks * mult[:, None] + shift[:, None]) % sizes[:, None] + offsets[:, None]
        out.append(ids.reshape(-1))
    return out


def _coprime_multiplier(rng: np.random.Generator, n: int) -> int:
    """A random multiplier in ``[1, n)`` coprime with ``n`` (so ``a * r mod n`` permutes ``[0, n)``)."""
    if n <= 2:
        return 1
    while True:
        a = int(rng.integers(1, n))
        if math.gcd(a, n) == 1:
            return a


# ---------------------------------------------------------------------- helpers
def _check(args: argparse.Namespace) -> None:
    require_counts(args, "batches", "batch_size", "lookahead")
    require_positive(args, "zipf", "scale")


def _capacity(text: str, distinct: int) -> int:
    """``--capacity``: an integer is a row count; a decimal number in (0, 1] a fraction of ``distinct``."""
    try:
        rows = int(text)
    except ValueError:
        pass
    else:
        if rows < 1:
            raise ValueError(f"--capacity must be >= 1 row, got {text!r}")
        return rows
    try:
        fraction = float(text)
    except ValueError:
        raise ValueError(f"--capacity must be a row count or a fraction in (0, 1], got {text!r}") from None
    if not 0 < fraction <= 1:
        raise ValueError(f"--capacity fraction must be in (0, 1], got {text!r}")
    return max(1, round(fraction * distinct))


def _model_top_share(cardinalities: Sequence[int], exponent: float, fraction: float) -> float:
    """Probability mass of the hottest ``fraction`` of all tables' rows under :func:`zipf_ranks`'s law
    (features equally likely), i.e. the stream's skew without sampling noise."""
    sizes = np.asarray(cardinalities, dtype=np.int64)
    k = max(1, int(sizes.sum() * fraction))
    probs = []
    for n in sizes.tolist():
        edges = np.arange(min(n, k) + 1, dtype=np.float64) + 0.5  # rank r covers [r + 0.5, r + 1.5)
        total = _power_integral(0.5, n + 0.5, exponent)
        probs.append(_power_integral(edges[:-1], edges[1:], exponent) / total / sizes.size)
    flat = np.concatenate(probs)
    return float(np.partition(flat, flat.size - k)[flat.size - k :].sum())


def _power_integral(a: Any, b: Any, exponent: float) -> Any:
    """``∫_a^b x^-s dx`` (elementwise)."""
    if abs(exponent - 1.0) < 1e-9:
        return np.log(np.asarray(b) / a)
    e = 1.0 - exponent
    return (np.power(b, e) - np.power(a, e)) / e


def _top_share(counts: np.ndarray, fraction: float) -> float:
    """Share of all accesses that go to the hottest ``fraction`` of the tables' rows."""
    k = max(1, int(counts.size * fraction))
    top = np.partition(counts, counts.size - k)[counts.size - k :]
    return float(top.sum() / max(1, counts.sum()))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_bagpipe.bench.oracle [--json PATH] ...``: ``lightning-bagpipe bench oracle``."""
    from lightning_bagpipe.cli import main as cli_main

    return cli_main(["bench", "oracle", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
