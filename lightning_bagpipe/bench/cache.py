"""Cache benchmark: rows fetched by the lookahead oracle (several ``L``) vs LRU, LFU and offline Belady.

``lightning-bagpipe bench cache --json PATH [--plot PATH.png]`` reads one id stream (synthetic
Criteo-shaped Zipf data by default, or ``--data`` naming a Parquet folder or Criteo TSV files) and, for
every cache capacity of a sweep, counts the rows each policy loads from the store:

* the **oracle** (:class:`~lightning_bagpipe.oracle.lookahead.LookaheadOracle`) with each lookahead of
  ``--lookahead``; it may not evict the rows of the step in flight (their prefetch overlaps it), so it
  needs at least two consecutive steps' distinct rows of capacity;
* **LRU** and **LFU** (perfect LFU: counts kept across evictions), the policies of FBGEMM's cache;
* **Belady**, offline, the whole trace known in advance (the lower bound for any online policy under
  the same in-flight constraint as the oracle).

Every policy sees the same stream and the same capacities (one run each: the counts are deterministic,
so there is nothing to repeat; the wall times are reported for information only). Ratios are the
oracle's fetches (best ``L`` at each capacity, and the largest ``L``) over each baseline's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lightning_bagpipe.bench.common import (
    machine_info,
    parse_int_list,
    require_matplotlib,
    save_figure,
    suite_config,
)
from lightning_bagpipe.trace import (
    BASELINES,
    access_skew,
    add_stream_arguments,
    parse_capacities,
    plot_fetches,
    recommend,
    stream_bounds,
    stream_from_args,
    sweep,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's flags (``--json`` is added by the command line front end)."""
    parser.add_argument(
        "--data", type=str, default="synthetic", help="'synthetic', a Parquet file or folder, or Criteo TSV"
    )
    add_stream_arguments(parser, default_batches=128)
    parser.add_argument(
        "--lookahead", type=str, default="1,4,16,64", help="comma-separated oracle lookaheads"
    )
    parser.add_argument(
        "--capacity",
        type=str,
        default="auto",
        help="comma-separated capacities: row counts, or fractions in (0, 1] of the distinct rows read; "
        "'auto' (default): 1x to 8x the smallest capacity that can run the oracle",
    )
    parser.add_argument("--plot", type=Path, default=None, help="draw rows fetched vs capacity to this PNG")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Read the stream, sweep every policy over the capacities; returns the JSON-ready figures."""
    lookaheads = parse_int_list(args.lookahead, "--lookahead")
    stream = stream_from_args(args)
    skew = access_skew(stream)
    bounds = stream_bounds(stream)
    capacities = parse_capacities(args.capacity, bounds)
    result = sweep(stream, lookaheads, capacities, bounds=bounds)
    largest = max(result.lookaheads)
    per_capacity = []
    for i, cap in enumerate(result.capacities):
        best, best_l = result.best_oracle(i)
        row: dict[str, Any] = {"capacity_rows": cap, "best_lookahead": best_l, "oracle_best": best}
        for name in BASELINES:
            base = result.baselines[name][i]
            row[f"oracle_best_over_{name}"] = _ratio(best, base)
            row[f"oracle_L{largest}_over_{name}"] = _ratio(result.oracle[largest][i], base)
        per_capacity.append(row)
    out: dict[str, Any] = {
        "suite": "cache",
        "config": suite_config(args),
        "stream": {
            "data": stream.source,
            "batches": len(stream.batches),
            "occurrences": stream.occurrences,
            "total_rows": stream.tables.total_rows,
            "distinct_rows": result.distinct_rows,
            "min_feasible_capacity": result.min_feasible_capacity,
            "top1pct_rows_access_share": skew["overall"]["top1pct_share"],
            "top10pct_rows_access_share": skew["overall"]["top10pct_share"],
            "read_seconds": stream.read_seconds,
        },
        "capacities": result.capacities,
        "contenders": result.as_dict()["fetched"],
        "seconds": result.seconds,
        "ratios": per_capacity,
        # sized for DeepFM rows of dim 16: 16 weights + 1 first-order weight + 1 row-wise Adagrad state
        "recommendation": recommend(result, row_bytes=4 * (16 + 1 + 1)),
        "machine": machine_info(),
    }
    if args.plot is not None:
        out["plot"] = str(args.plot)  # drawn by plot() once the JSON is written
    return out


def _ratio(a: int | None, b: int | None) -> float | None:
    return None if a is None or not b else a / b


def plot(out: dict[str, Any], path: Path) -> None:
    """Rows fetched against capacity, one line per policy, from :func:`run`'s figures."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    s = out["stream"]
    plot_fetches(
        ax,
        {
            "capacities": out["capacities"],
            "fetched": out["contenders"],
            "min_feasible_capacity": s["min_feasible_capacity"],
            "distinct_rows": s["distinct_rows"],
        },
    )
    batches = f"{s['batches']} batches x {out['config']['batch_size']}"
    ax.set_title(f"{s['data']}: {batches}, {s['distinct_rows']:,} rows read")
    save_figure(fig, path)
