"""Two-process benchmark: lookahead prefetch vs synchronous fetch, and LRPP's communication volume.

``lightning-bagpipe bench distributed --json PATH`` trains DeepFM on synthetic Criteo-shaped data with
``Trainer(strategy=BagpipeStrategy(store="sharded"), devices=2)`` (gloo, CPU) several times in one
invocation, each run a fresh pair of processes on the same data:

* **prefetch**: the oracle's plan with lookahead ``--lookahead``; step t+1's rows are fetched while step t
  computes;
* **sync_fetch**: no lookahead (``L=1``) and no prefetch: each step fetches its own rows at its start and
  waits for them (what a cache without an oracle does);
* **replicate**: as prefetch, but with full-replication sync (``BagpipeDataModule(sync="replicated")``):
  every row of the step is all-reduced every step, no rank-local rows;

each at every emulated store latency of ``--delay-ms`` (opt-in, as if the sharded store were remote: a
fetch's rows arrive that long after it is issued, requests are pipelined; see
:mod:`lightning_bagpipe.embedding.executor`). The prefetch contenders fetch ``--prefetch-depth`` steps
ahead. Contenders are interleaved and repeated (each repeat starts at a different run); medians are
reported, with each contender's milliseconds per step: synchronous fetching costs about compute +
latency per step, prefetching about compute alone while the latency stays under ``prefetch_depth``
steps of compute.

Each contender also reports rank 0's step-time breakdown (``breakdown_ms``: forward, backward with DDP's
dense all-reduce, fetch wait, cache sync, sparse update, dense optimizer, and the executor's fetches and
write-backs beside the step; :mod:`lightning_bagpipe.bench.breakdown`).

Also reported: the bytes each rank sends per step for the embedding sync (LRPP: replicated rows
only, by all-reduce or by exchange, whichever the plan finds cheaper) against the full-replication
baseline (every row any rank touched, all-reduced every step), both counted per rank with the formulas of
:mod:`lightning_bagpipe.embedding.driver` (ring all-reduce ``2 (W-1)/W * numel * 4`` bytes, padded
all-gather ``(W-1) * block_numel * 4``), for the prefetch run (``--lookahead``) and the ``L=1`` run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning_bagpipe.arguments import require_counts, require_positive
from lightning_bagpipe.bench.breakdown import StepBreakdown
from lightning_bagpipe.bench.common import (
    loss_trend,
    machine_info,
    require_matplotlib,
    save_figure,
    suite_config,
    worker_failure,
)

#: name -> (prefetch with the full lookahead?, BagpipeDataModule sync mode)
CONTENDERS = {
    "prefetch": (True, "partitioned"),
    "sync_fetch": (False, "partitioned"),
    "replicate": (True, "replicated"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=1024, help="global batch (split over 2 ranks)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=8, help="steps excluded from the timing")
    parser.add_argument("--scale", type=float, default=0.01, help="Criteo Kaggle cardinalities times this")
    parser.add_argument("--lookahead", type=int, default=16, help="lookahead of the prefetch contender")
    parser.add_argument("--cache-rows", type=int, default=200_000, help="cache slots per rank")
    parser.add_argument(
        "--delay-ms",
        type=str,
        default="0,20,40,60",
        help="emulated store latencies to run, comma-separated milliseconds (0: no delay)",
    )
    parser.add_argument(
        "--prefetch-depth", type=int, default=4, help="steps ahead the prefetch contenders fetch rows"
    )
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="runs per contender (medians reported)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run is killed")
    parser.add_argument(
        "--plot", type=Path, default=None, help="draw samples/s by store latency and the step breakdowns here"
    )
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)


def _delays(text: str) -> list[float]:
    try:
        delays = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--delay-ms must be comma-separated numbers, got {text!r}") from None
    if not delays or any(d < 0 for d in delays):
        raise ValueError(f"--delay-ms needs at least one latency, none negative; got {text!r}")
    return delays


def _check(args: argparse.Namespace) -> None:
    require_counts(args, "batch_size", minimum=2)  # (one sample per rank at least)
    require_counts(args, "warmup", "repeats", "lookahead", "cache_rows", "prefetch_depth", "embedding_dim")
    require_positive(args, "scale", "timeout")
    if args.steps <= args.warmup:
        raise ValueError(
            f"--steps must be more than --warmup (steps counts the warm-up ones), got {args.steps} and "
            f"{args.warmup}"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check(args)
    delays = _delays(args.delay_ms)
    runs: dict[str, list[dict[str, Any]]] = {}
    losses: dict[str, list[list[float]]] = {}  # contender -> rank 0's losses of every run (any latency)
    order = [(delay, name) for delay in delays for name in CONTENDERS]
    for r in range(args.repeats):
        shift = r % len(order)  # repeat r starts at a different run, so none is always first
        for delay, name in order[shift:] + order[:shift]:
            prefetch, sync = CONTENDERS[name]
            cfg = {
                "batch_size": args.batch_size,
                "steps": args.steps,
                "warmup": args.warmup,
                "scale": args.scale,
                "lookahead": args.lookahead if prefetch else 1,
                "prefetch": prefetch,
                "prefetch_depth": args.prefetch_depth if prefetch else 1,
                "sync": sync,
                "cache_rows": args.cache_rows,
                "delay_ms": delay,
                "embedding_dim": args.embedding_dim,
            }
            result = _launch(cfg, args.timeout)
            losses.setdefault(name, []).append(result.pop("losses"))
            runs.setdefault(f"{name}@{delay:g}ms", []).append(result)
    figures = {key: _median(rs) for key, rs in runs.items()}
    for key, rs in runs.items():
        figures[key]["loss_decreased"] = all(r["loss_decreased"] for r in rs)
    ratios = {
        f"prefetch_over_sync_fetch@{d:g}ms": figures[f"prefetch@{d:g}ms"]["samples_per_second"]
        / figures[f"sync_fetch@{d:g}ms"]["samples_per_second"]
        for d in delays
    }
    for d in delays:
        ratios[f"prefetch_over_replicate@{d:g}ms"] = (
            figures[f"prefetch@{d:g}ms"]["samples_per_second"]
            / figures[f"replicate@{d:g}ms"]["samples_per_second"]
        )
    d0 = delays[0]
    rep = figures[f"replicate@{d0:g}ms"]
    ratios["replicate_sync_bytes_over_full_replication"] = (  # 1.0 by construction: a check
        rep["sync_bytes_per_step"] / rep["replicated_baseline_bytes_per_step"]
    )
    p, s1 = figures[f"prefetch@{d0:g}ms"], figures[f"sync_fetch@{d0:g}ms"]
    ratios["sync_bytes_over_full_replication"] = (
        p["sync_bytes_per_step"] / p["replicated_baseline_bytes_per_step"]
    )
    ratios["sync_bytes_over_full_replication@L1"] = (
        s1["sync_bytes_per_step"] / s1["replicated_baseline_bytes_per_step"]
    )
    out = {
        "suite": "distributed",
        "config": suite_config(args),
        "world_size": 2,
        "store": "sharded",
        "contenders": figures,
        "ratios": ratios,
        "checks": {
            **{f"{key}_loss_decreased": bool(f["loss_decreased"]) for key, f in figures.items()},
            # a latency or a repeat changes when rows arrive, never what is computed: 0.0
            "max_abs_loss_diff_across_latencies_and_repeats": max(_max_diff(r, r) for r in losses.values()),
            # other plans (another lookahead, or every row all-reduced) sum the ranks' gradients of a
            # row in another order: float32 rounding apart
            "max_abs_loss_diff_sync_fetch_vs_prefetch": _max_diff(losses["sync_fetch"], losses["prefetch"]),
            "max_abs_loss_diff_replicate_vs_prefetch": _max_diff(losses["replicate"], losses["prefetch"]),
        },
        "machine": machine_info(),
    }
    if args.plot is not None:
        out["plot"] = str(args.plot)  # drawn by plot() once the JSON is written
    return out


def plot(out: dict[str, Any], path: Path) -> None:
    """Left: samples/s of each contender against the store latency. Right: rank 0's step breakdown of
    each contender at the lowest and the highest latency (the phases of StepBreakdown, stacked)."""
    plt = require_matplotlib()
    delays = _delays(out["config"]["delay_ms"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    figures = out["contenders"]
    for name in CONTENDERS:
        ax.plot(delays, [figures[f"{name}@{d:g}ms"]["samples_per_second"] for d in delays], "o-", label=name)
    ax.set_xlabel("emulated store latency (ms)")
    ax.set_ylabel("samples / s (median)")
    ax.set_title("2 processes, sharded store")
    ax.set_ylim(bottom=0)
    ax.legend()
    keys = [f"{name}@{d:g}ms" for d in sorted({delays[0], delays[-1]}) for name in CONTENDERS]
    labels = [k.replace("@", "\n") for k in keys]
    bottom = [0.0] * len(keys)
    for i, phase in enumerate(StepBreakdown.PHASES):
        vals = [figures[k]["breakdown_ms"].get(f"{phase}_ms", 0.0) for k in keys]
        bx.bar(labels, vals, bottom=bottom, label=phase, color=f"C{i % 10}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    bx.set_ylabel("ms per step, rank 0 (median)")
    bx.set_title("where a step's time goes")
    bx.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    """The largest step-by-step difference between any run of ``a`` and any run of ``b``."""
    return max((abs(x - y) for ra in a for rb in b for x, y in zip(ra, rb, strict=True)), default=0.0)


def _median(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats of every number (and of every number of a nested dict)."""
    out: dict[str, Any] = {}
    for k, v in rs[0].items():
        if isinstance(v, (int, float)):
            out[k] = statistics.median(r[k] for r in rs)
        elif isinstance(v, dict):
            out[k] = _median([r[k] for r in rs])
    return out


def _launch(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "lightning_bagpipe.bench.distributed",
            "--worker",
            json.dumps(cfg | {"out": str(out)}),
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, start_new_session=True
        )
        if done.returncode != 0 or not out.exists():
            raise worker_failure(f"benchmark run {cfg} failed", done.returncode, done.stderr)
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def _worker(cfg: dict[str, Any]) -> None:
    """One 2-process training run (this process is rank 0; Lightning re-runs it as rank 1)."""
    import warnings
    from datetime import timedelta

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from lightning_bagpipe.bench.breakdown import TimedDeepFM
    from lightning_bagpipe.data.criteo import CriteoDataModule
    from lightning_bagpipe.strategies.bagpipe import BagpipeStrategy

    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)

    class Clock(Callback):
        def __init__(self) -> None:
            self.t0 = 0.0
            self.t1 = 0.0
            self.samples = 0
            self.losses: list[float] = []  # rank 0's loss of every step

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int
        ) -> None:
            self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
            if trainer.global_step == cfg["warmup"]:
                self.t0 = time.perf_counter()
            elif trainer.global_step > cfg["warmup"]:
                self.samples += cfg["batch_size"]
                self.t1 = time.perf_counter()

    dm = CriteoDataModule(
        "synthetic",
        batch_size=cfg["batch_size"],
        lookahead=cfg["lookahead"],
        cache_rows=cfg["cache_rows"],
        scale=cfg["scale"],
        num_batches=cfg["steps"],
        val_batches=0,
        sync=cfg.get("sync", "partitioned"),
        prefetch_depth=cfg.get("prefetch_depth", 1),
    )
    model = TimedDeepFM(dm.tables, embedding_dim=cfg["embedding_dim"], hidden=(64, 32))
    model.marks = {}
    breakdown = StepBreakdown(cfg["warmup"], model.marks)
    breakdown.wrap(model.embedding)
    clock = Clock()
    strategy = BagpipeStrategy(
        store="sharded",
        prefetch=cfg["prefetch"],
        io_delay_ms=cfg["delay_ms"],
        log_stats=False,
        timeout=timedelta(seconds=120),
    )
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_steps=cfg["steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[clock, breakdown],
    )
    trainer.fit(model, datamodule=dm)
    import torch.distributed as dist

    if dist.is_initialized():  # end cleanly: a process exiting with live gloo groups may abort
        dist.barrier()
        dist.destroy_process_group()
    stats = strategy.cache_stats
    if trainer.global_rank == 0 and stats is not None:
        steps = max(1, stats.steps)
        Path(cfg["out"]).write_text(
            json.dumps(
                {
                    "losses": clock.losses,
                    **loss_trend(clock.losses),
                    "samples_per_second": clock.samples / max(1e-9, clock.t1 - clock.t0),
                    "ms_per_step": 1000.0
                    * (clock.t1 - clock.t0)
                    / max(1, clock.samples // cfg["batch_size"]),
                    "early_rows_per_step": stats.early_rows / steps,
                    "hit_rate": stats.hit_rate,
                    "rows_fetched_per_step": stats.rows_fetched / steps,
                    "fetch_wait_ms_per_step": 1000.0 * stats.wait_s / steps,
                    "sync_bytes_per_step": stats.sync_bytes / steps,
                    "replicated_baseline_bytes_per_step": stats.replicated_baseline_bytes / steps,
                    "exchange_step_fraction": stats.exchange_steps / steps,
                    "breakdown_ms": breakdown.figures(),
                }
            )
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    a, _ = p.parse_known_args()
    if a.worker is not None:
        _worker(json.loads(a.worker))
    else:  # the suite itself, as ``lightning-bagpipe bench distributed`` runs it (--json, --plot, errors)
        from lightning_bagpipe.cli import main as cli_main

        sys.exit(cli_main(["bench", "distributed", *sys.argv[1:]]))
