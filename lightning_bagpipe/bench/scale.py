"""Scale benchmark: a table larger than RAM-friendly sizes in a memory-mapped store, with its memory bill.

``lightning-bagpipe bench scale --json PATH`` trains DeepFM with ``Trainer(strategy="bagpipe")`` on synthetic
Criteo-shaped data whose 26 tables add up to ``--rows`` rows (default ``2**28``; the sizes are Criteo
Kaggle's, scaled), each row ``dim`` weights + 1 first-order weight + 1 row-wise Adagrad state float, kept
in an :class:`~lightning_bagpipe.MmapStore` file. Contenders, each in a fresh process (so its peak
resident set, ``VmHWM``, is its own) and interleaved over ``--repeats``:

* **tiered_big**: ``--rows`` rows in a :class:`~lightning_bagpipe.TieredStore` (the library's store for
  tables far larger than RAM): a new file, initialised lazily, with a RAM write buffer of
  ``--buffer-mib`` and the default spill log (runs long enough to fill the buffer use it: ``--steps``);
* **mmap_big**: the same rows in a plain :class:`~lightning_bagpipe.MmapStore` file;
* **memory_touched**: the big run itself with its table in RAM: the rows its batches touch, renumbered
  table by table in order (:class:`Renumbered`), in a :class:`~lightning_bagpipe.MemoryStore` that holds
  only them, each starting from the initial values of the big row it stands for. Renumbering in order
  leaves the oracle's plans the same, so it trains the same model as ``tiered_big``, step for step,
  and the ratio between the two is the cost of keeping the ``--rows`` rows out of RAM;
* **tiered_small**, **mmap_small** and **memory_small**: ``--small-rows`` rows (a table that fits in
  RAM) in a ``TieredStore``, a plain memory-mapped file and a :class:`~lightning_bagpipe.MemoryStore`,
  on data of the same shape over the smaller tables (fewer distinct rows per step, so more cache hits):
  each store's own cost at equal size;
* **oracle_big**: the lookahead oracle alone on the big run's id stream, for its resident memory.

Initialisation: the library fills every row of a new ``MmapStore`` (``2**28`` rows are 19 GB of
writes). For the two plain-file contenders this benchmark instead creates the file sparse
(``ftruncate``) and writes only the rows the run will touch (known in advance: the synthetic stream is
deterministic), with the library's own initial values
(:func:`~lightning_bagpipe.embedding.init.initial_rows_at`), then marks the store initialised so
``CachedEmbedding`` opens it as is. Rows never touched stay zero and are never read. This shortcut lives
in this file only and is for benchmarks. ``tiered_big`` and ``memory_small`` need none: the library
initialises them (lazily, and in full). Every contender therefore starts from the same initial rows, so
the two big ones train the same model, and so do the two small ones (their losses must match).

Before every run on a plain file the file is written anew (training writes its rows back, so a reused
file would start trained) and dropped from the page cache (``posix_fadvise(DONTNEED)``), so rows come
from disk as for a table larger than RAM (``--warm`` keeps them cached). Every run of a contender must
then produce the same losses (``max_abs_loss_diff_between_repeats``).

Reported per run: samples/s (timed after ``--warmup`` steps), ``VmHWM``, the peaks of ``RssAnon``
(process memory) and ``RssFile`` (mapped file pages, which the kernel can reclaim) sampled every 50 ms,
cache figures, the tiered store's spills, log merges and compactions (counts and seconds), and the
file's apparent and allocated size on disk. The tiered and RAM contenders then save a checkpoint, as a
user's run ends (``trainer.save_checkpoint``, inside the memory window): its size and seconds are
reported (a tiered store's holds only the rows written; a plain file's would be the whole table, so
those skip it; ``--no-checkpoint`` skips it everywhere).
"""

from __future__ import annotations

import argparse
import functools
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_bagpipe.arguments import require_counts, require_positive
from lightning_bagpipe.bench.common import (
    RssSampler,
    disk_usage,
    interleaved,
    machine_info,
    median_figures,
    proc_status_bytes,
    require_matplotlib,
    save_figure,
    suite_config,
    worker_failure,
)
from lightning_bagpipe.data.batch import Batch, SparseFeatures
from lightning_bagpipe.data.criteo_shape import CRITEO_KAGGLE_CARDINALITIES
from lightning_bagpipe.data.datamodule import BagpipeDataModule
from lightning_bagpipe.embedding.init import INIT_RECIPE, initial_rows_at
from lightning_bagpipe.embedding.store import EmbeddingStore, MemoryStore, MmapStore
from lightning_bagpipe.embedding.tiered_store import TieredStore, store_files
from lightning_bagpipe.id_sets import unique_ids
from lightning_bagpipe.optim.sparse import RowWiseAdagrad, SparseOptimizer
from lightning_bagpipe.tables import Tables

CONTENDERS = ("tiered_big", "mmap_big", "memory_touched", "tiered_small", "mmap_small", "memory_small")
_PAGE = 4096
_QUEUE = 4
_GIB = 2**30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's flags (``--json`` is added by the command line front end)."""
    parser.add_argument("--rows", type=int, default=2**28, help="total table rows of the big run (2**28)")
    parser.add_argument(
        "--small-rows", type=int, default=2**24, help="total rows of the pair that fits in RAM (2**24)"
    )
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=1, help="runs per contender (medians reported)")
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--lookahead", type=int, default=16, help="oracle lookahead L")
    parser.add_argument("--cache-rows", type=int, default=262144, help="cache capacity in rows")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the synthetic ids")
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)} (memory_small, the baseline, always runs)",
    )
    parser.add_argument(
        "--buffer-mib", type=int, default=256, help="RAM write buffer of the tiered_big store, in MiB (256)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the store files go (default: a temp dir)"
    )
    parser.add_argument("--keep-files", action="store_true", help="do not delete the store files at the end")
    parser.add_argument("--warm", action="store_true", help="keep the files in the page cache between runs")
    parser.add_argument("--no-oracle", action="store_true", help="skip the oracle-only memory measurement")
    parser.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="skip the checkpoint the tiered and RAM contenders save after training",
    )
    parser.add_argument(
        "--madvise-random",
        action="store_true",
        help="also run the big table with its mapping advised MADV_RANDOM (an experiment: mmap_big_random)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is killed")
    parser.add_argument(
        "--plot", type=Path, default=None, help="draw samples/s and peak RSS per contender here"
    )
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)


def _check(args: argparse.Namespace) -> None:
    unknown = sorted(set(_names(args)) - {*CONTENDERS, "mmap_big_random"})
    if unknown:
        raise ValueError(f"--contenders: unknown contender(s) {', '.join(unknown)}; choose from {CONTENDERS}")
    require_counts(args, "rows", "small_rows", "batch_size", "steps", "warmup", "repeats", "embedding_dim")
    require_counts(args, "lookahead", "cache_rows", "buffer_mib")
    require_positive(args, "zipf", "timeout")
    for flag in ("rows", "small_rows"):
        if getattr(args, flag) < 26 * 2:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 52 (26 tables of >= 2 rows)")


def _names(args: argparse.Namespace) -> list[str]:
    """The contenders to run, in the suite's order, the baseline ``memory_small`` always among them."""
    chosen = {n.strip() for n in str(args.contenders).split(",") if n.strip()} | {"memory_small"}
    extra = ["mmap_big_random"] if args.madvise_random else []
    return [n for n in CONTENDERS if n in chosen] + extra + sorted(chosen - {*CONTENDERS})


def scale_for(rows: int) -> float:
    """The ``scale`` of Criteo Kaggle's cardinalities whose tables add up to about ``rows`` rows."""
    return rows / sum(CRITEO_KAGGLE_CARDINALITIES)


# ---------------------------------------------------------------------- the suite (parent process)
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Initialise the store files, run the contenders in fresh processes, collect medians."""
    _check(args)
    own_dir = args.dir is None
    root = Path(tempfile.mkdtemp(prefix="bagpipe-scale-")) if own_dir else Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    base = {
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "embedding_dim": args.embedding_dim,
        "lookahead": args.lookahead,
        "cache_rows": args.cache_rows,
        "zipf": args.zipf,
        "seed": args.seed,
        "buffer_bytes": args.buffer_mib * 2**20,
    }
    names = _names(args)
    files = {"mmap_big": (root / "big.f32", args.rows), "mmap_small": (root / "small.f32", args.small_rows)}
    files = {n: f for n, f in files.items() if n in names or (n == "mmap_big" and args.madvise_random)}
    out: dict[str, Any] = {"suite": "scale", "config": suite_config(args), "dir": str(root)}
    load0 = os.getloadavg()[0]
    try:
        _check_disk(root, args)
        inits: dict[str, dict[str, Any]] = {}

        def initialize(name: str) -> None:
            """A new file with the initial rows: training writes its rows back, so every run needs one."""
            path, rows = files[name]
            _remove_store_files(path)
            cfg = {**base, "role": "init", "rows": rows, "path": str(path), "drop_cache": not args.warm}
            inits.setdefault(name, _launch(cfg, args.timeout))

        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        losses: dict[str, list[list[float]]] = {}
        tiered = root / "tiered.f32"
        for _, name in interleaved(names, args.repeats):
            if name == "memory_small":
                cfg = {**base, "role": "train", "store": "memory", "rows": args.small_rows}
            elif name == "memory_touched":
                cfg = {**base, "role": "train", "store": "memory_touched", "rows": args.rows}
            elif name.startswith("tiered_"):
                _remove_store_files(tiered)  # every run starts from a new, lazily initialised file
                rows = args.rows if name == "tiered_big" else args.small_rows
                cfg = {**base, "role": "train", "store": "tiered", "rows": rows, "path": str(tiered)}
            else:
                initialize(name.removesuffix("_random"))
                path, rows = files[name.removesuffix("_random")]
                cfg = {**base, "role": "train", "store": "mmap", "rows": rows, "path": str(path)}
                cfg["advise_random"] = name.endswith("_random")
            if cfg["store"] != "mmap" and not args.no_checkpoint:
                cfg["checkpoint"] = str(root / "run.ckpt")  # (a plain file's would be the whole table)
            result = _launch(cfg, args.timeout)
            if name.startswith("tiered_"):
                result["disk"] = disk_usage(*store_files(tiered))  # rows, bitmap and spill log
            losses.setdefault(name, []).append(result.pop("losses"))
            runs[name].append(result)
        contenders: dict[str, Any] = {n: median_figures(r) for n, r in runs.items()}
        for name, (path, _) in files.items():
            if name in contenders:
                contenders[name]["init"] = inits[name]
                contenders[name]["disk"] = disk_usage(path)
        if not args.no_oracle:
            contenders["oracle_big"] = _launch({**base, "role": "oracle", "rows": args.rows}, args.timeout)
    finally:
        if not args.keep_files:
            for path in [*(p for p, _ in files.values()), root / "tiered.f32"]:
                _remove_store_files(path)
            if own_dir:
                shutil.rmtree(root, ignore_errors=True)
    mem = contenders["memory_small"]
    out["contenders"] = contenders
    out["ratios"] = {
        f"{n}_over_memory_small": contenders[n]["samples_per_second"] / mem["samples_per_second"]
        for n in names
        if n != "memory_small"
    }
    if "tiered_big" in contenders and "memory_touched" in contenders:
        big, same_in_ram = contenders["tiered_big"], contenders["memory_touched"]
        out["ratios"]["tiered_big_over_memory_touched"] = (
            big["samples_per_second"] / same_in_ram["samples_per_second"]
        )
    out["checks"] = {
        **{f"{n}_loss_decreased": bool(contenders[n].get("loss_decreased")) for n in names},
        "max_abs_loss_diff_mmap_small_vs_memory_small": _max_diff(losses, "mmap_small", "memory_small"),
        "max_abs_loss_diff_tiered_big_vs_mmap_big": _max_diff(losses, "tiered_big", "mmap_big"),
        "max_abs_loss_diff_tiered_big_vs_memory_touched": _max_diff(losses, "tiered_big", "memory_touched"),
        "max_abs_loss_diff_tiered_small_vs_memory_small": _max_diff(losses, "tiered_small", "memory_small"),
        # the same rows and data in every run of a contender: the same losses, step for step
        "max_abs_loss_diff_between_repeats": max(
            (d for n in names if (d := _max_diff(losses, n, n)) is not None), default=None
        ),
    }
    if "tiered_big" in contenders:
        out["goals"] = {
            "tiered_big_peak_rss_under_2GiB": contenders["tiered_big"]["vm_hwm_bytes"] < 2 * _GIB,
            "tiered_big_at_least_0.8x_memory_small": out["ratios"]["tiered_big_over_memory_small"] >= 0.8,
        }
        if "tiered_big_over_memory_touched" in out["ratios"]:
            touched = out["ratios"]["tiered_big_over_memory_touched"] >= 0.8
            out["goals"]["tiered_big_at_least_0.8x_memory_touched"] = touched
    out["machine"] = {
        **machine_info(),
        "load_average_1m_before": load0,
        "load_average_1m_after": os.getloadavg()[0],
    }
    if args.plot is not None:
        out["plot"] = str(args.plot)  # drawn by plot() once the JSON is written
    return out


def plot(out: dict[str, Any], path: Path) -> None:
    """Samples/s (with min-max and the ratio to ``memory_small``) and peak RSS (with the 2 GiB line) of
    every training contender of :func:`run`'s figures."""
    plt = require_matplotlib()
    names = [n for n in out["contenders"] if n != "oracle_big"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    figures = out["contenders"]
    colors = ["C3" if n == "tiered_big" else "C7" if n.startswith("memory_") else "C0" for n in names]
    med = [figures[n]["samples_per_second"] for n in names]
    err = [
        [m - figures[n].get("samples_per_second_min", m) for m, n in zip(med, names)],
        [figures[n].get("samples_per_second_max", m) - m for m, n in zip(med, names)],
    ]
    ax.bar(names, med, yerr=err, capsize=4, color=colors)
    for i, n in enumerate(names):
        ratio = out["ratios"].get(f"{n}_over_memory_small")
        if ratio is not None:
            ax.annotate(f"{ratio:.2f}x", (i, med[i]), ha="center", va="bottom", xytext=(0, 3),
                        textcoords="offset points")  # fmt: skip
    ax.set_ylabel("samples / s (median, min-max)")
    ax.set_title(f"DeepFM, {out['config']['rows']:,} rows (big) vs {out['config']['small_rows']:,} (small)")
    ax.tick_params(axis="x", labelrotation=20)
    bx.bar(names, [figures[n]["vm_hwm_bytes"] / _GIB for n in names], color=colors)
    bx.axhline(2.0, color="k", linestyle="--", linewidth=1, label="2 GiB goal")
    bx.set_ylabel("peak RSS (VmHWM), GiB")
    bx.set_title("memory of the training process")
    bx.tick_params(axis="x", labelrotation=20)
    bx.legend()
    save_figure(fig, path)


def _max_diff(losses: dict[str, list[list[float]]], a: str, b: str) -> float | None:
    """The largest step-by-step loss difference between any run of ``a`` and any run of ``b``."""
    if a not in losses or b not in losses:
        return None
    diffs = [abs(x - y) for ra in losses[a] for rb in losses[b] for x, y in zip(ra, rb)]
    return max(diffs) if diffs else None


def _remove_store_files(path: Path) -> None:
    for f in store_files(path):
        f.unlink(missing_ok=True)


def _check_disk(root: Path, args: argparse.Namespace) -> None:
    """Refuse to start when the two sparse files might not fit: a file allocates at most one page per id
    occurrence of the stream, and at most its full size (the kernel can allocate whole large folios)."""
    width = args.embedding_dim + 2
    occurrences = (args.warmup + args.steps + args.lookahead + _QUEUE) * args.batch_size * 26
    sizes = (args.rows, args.rows, args.small_rows)  # mmap_big, tiered_big, mmap_small
    worst = sum(min(rows * width * 4, occurrences * _PAGE) for rows in sizes)
    free = shutil.disk_usage(root).free
    if worst > free * 0.9:
        raise ValueError(
            f"bench scale: the store files under {root} may allocate up to {worst / _GIB:.1f} GiB but only "
            f"{free / _GIB:.1f} GiB are free; pass --dir on a larger disk or lower --rows/--steps"
        )


def drop_page_cache(path: Path) -> None:
    """Write the file's dirty pages and drop it from the page cache, so the next run reads from disk."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _launch(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "lightning_bagpipe.bench.scale",
            "--worker",
            json.dumps({**cfg, "out": str(out)}),
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, start_new_session=True
        )
        if done.returncode != 0 or not out.exists():
            what = f"a {cfg['role']} run ({cfg.get('store', 'oracle')}) failed"
            raise worker_failure(what, done.returncode, done.stderr)
        result: dict[str, Any] = json.loads(out.read_text())
        return result


# ---------------------------------------------------------------------- lazy initialisation (bench only)
def lazy_rows(
    tables: Tables, dim: int, optimizer: SparseOptimizer, seed: int, ids: np.ndarray, chunk: int = 1 << 20
) -> Iterator[tuple[np.ndarray, Tensor]]:
    """Initial ``(ids, rows)`` of the distinct ``ids`` only, ``chunk`` rows at a time, ids ascending: the
    library's initial weights (:func:`initial_rows_at`) followed by the optimizer's initial state."""
    uniq = unique_ids(np.asarray(ids, dtype=np.int64))
    state = optimizer.initial_state(dim)
    for lo in range(0, uniq.size, chunk):
        part = uniq[lo : lo + chunk]
        rows = torch.empty(part.size, dim + state.numel(), dtype=torch.float32)
        rows[:, :dim] = initial_rows_at(tables, dim, seed, part)
        rows[:, dim:] = state
        yield part, rows


def mark_initialized(
    store: EmbeddingStore, tables: Tables, dim: int, optimizer: SparseOptimizer, seed: int
) -> None:
    """Record in ``store``'s metadata what ``CachedEmbedding`` checks, so it opens the rows as they are."""
    store.set_metadata(
        initialized=True,
        tables=tables.to_list(),
        tables_fingerprint=tables.fingerprint(),
        dim=int(dim),
        optimizer=optimizer.name,
        state_width=optimizer.state_width(dim),
        seed=int(seed),
        init_recipe=INIT_RECIPE,
        init="bench scale: only the rows the run touches",
    )


def lazy_initialize_file(
    path: str | os.PathLike[str],
    tables: Tables,
    dim: int,
    optimizer: SparseOptimizer,
    seed: int,
    ids: np.ndarray,
) -> int:
    """Create a sparse :class:`MmapStore` file at ``path`` holding only the initial rows of ``ids``.

    The rows are written through a mapping of this function's own advised ``MADV_RANDOM``: with the
    default advice the kernel reads around every faulting page and dirties whole large folios, so a
    scattered write of a few rows allocates (and later reads) most of the file.
    """
    width = optimizer.row_width(dim)
    MmapStore(path, num_rows=tables.total_rows, width=width, mode="create").close()  # sparse file + sidecar
    written = 0
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m.madvise(mmap.MADV_RANDOM)
        table = np.frombuffer(m, dtype=np.float32).reshape(tables.total_rows, width)
        for part, rows in lazy_rows(tables, dim, optimizer, seed, ids):
            table[part] = rows.numpy()
            written += part.size
        del table  # release the buffer before the mapping closes
        m.flush()
    store = MmapStore(path, mode="open")
    mark_initialized(store, tables, dim, optimizer, seed)
    store.close()
    return written


class AdvisedMmapStore(MmapStore):
    """An existing :class:`MmapStore` file whose mapping is advised ``MADV_RANDOM`` (``--madvise-random``).

    An experiment, not a library store: it measures what the library's store would gain from that advice
    (no read-around on the row-sized random reads and writes of the cache's fetches and write-backs).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path, mode="open")
        assert self._array is not None
        self._array._mmap.madvise(mmap.MADV_RANDOM)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- the big run in RAM (memory_touched)
class Renumbered:
    """A one-hot synthetic stream whose touched rows are renumbered, table by table and in order, into
    tables just large enough to hold them (at least one row each).

    The oracle's plans depend on ids only through their order, so the renumbered stream gets the same
    plans, and a table whose rows start from the values of the rows they stand for
    (:meth:`initial_store`) trains the same model as the original, step for step.
    """

    def __init__(self, src: Any) -> None:
        self.original: Tables = src.tables
        n_tables = len(self.original)
        touched = _touched(src)  # fused ids, ascending
        table_of = np.searchsorted(self.original.offsets, touched, side="right") - 1
        counts = np.bincount(table_of, minlength=n_tables)
        self.tables = Tables([(spec.name, max(1, int(c))) for spec, c in zip(self.original, counts)])
        first = np.searchsorted(touched, self.original.offsets)  # rank of each table's first touched row
        self.touched = touched
        self.new_ids = self.tables.offsets[table_of] + (np.arange(touched.size) - first[table_of])
        self.values: list[np.ndarray] = []  # per batch: the renumbered rows, key-major, per table
        for ids in src.id_batches():
            if ids.size % n_tables:
                raise ValueError("Renumbered: the stream must be one-hot (a row per feature and sample)")
            rank = np.searchsorted(touched, ids).reshape(n_tables, -1) - first[:, None]
            self.values.append(rank.reshape(-1).astype(np.int32))

    def initial_store(self, dim: int, optimizer: SparseOptimizer, seed: int) -> MemoryStore:
        """A RAM store of the renumbered tables holding the original rows' initial values (and the
        optimizer's initial state), marked initialised so ``CachedEmbedding`` takes it as it is."""
        store = MemoryStore(self.tables.total_rows, optimizer.row_width(dim))
        lo = 0
        for part, rows in lazy_rows(self.original, dim, optimizer, seed, self.touched):
            store.write(torch.from_numpy(self.new_ids[lo : lo + part.size]), rows)
            lo += part.size
        mark_initialized(store, self.tables, dim, optimizer, seed)
        return store

    def batches(self, src: Iterable[Batch]) -> Iterable[Batch]:
        """``src``'s batches (the stream this was built from) with their rows renumbered."""
        return _RenumberedBatches(src, self.values)


class _RenumberedBatches:
    def __init__(self, src: Iterable[Batch], values: list[np.ndarray]) -> None:
        self.src, self.values = src, values

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[Batch]:
        for batch, values in zip(self.src, self.values, strict=True):
            sparse = SparseFeatures(batch.sparse.keys, torch.from_numpy(values).long(), batch.sparse.lengths)
            yield Batch(sparse, batch.dense, batch.labels)


# ---------------------------------------------------------------------- worker processes
def _source(cfg: dict[str, Any]) -> Any:
    from lightning_bagpipe.data.synthetic import SyntheticCriteo

    batches = cfg["warmup"] + cfg["steps"] + cfg["lookahead"] + _QUEUE
    return SyntheticCriteo(
        cfg["batch_size"], batches, scale=scale_for(cfg["rows"]), zipf=cfg["zipf"], seed=cfg["seed"]
    )


def _touched(src: Any) -> np.ndarray:
    return unique_ids(np.concatenate([b.copy() for b in src.id_batches()]))


def _worker_init(cfg: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    src = _source(cfg)
    dim = cfg["embedding_dim"] + 1  # DeepFM's rows: the embedding and the first-order weight
    opt = RowWiseAdagrad(lr=0.02)
    written = lazy_initialize_file(cfg["path"], src.tables, dim, opt, cfg["seed"], _touched(src))
    if cfg.get("drop_cache", True):
        drop_page_cache(Path(cfg["path"]))
    return {
        "total_rows": src.tables.total_rows,
        "rows_initialized": written,
        "init_seconds": time.perf_counter() - t0,
        **disk_usage(cfg["path"]),
    }


def _worker_train(cfg: dict[str, Any]) -> dict[str, Any]:
    import warnings

    import lightning.pytorch as pl

    from lightning_bagpipe.bench.train import _Clock
    from lightning_bagpipe.data.criteo import CriteoDataModule
    from lightning_bagpipe.models.deepfm import DeepFM
    from lightning_bagpipe.strategies.bagpipe import BagpipeStrategy

    warnings.filterwarnings("ignore")
    pl.seed_everything(cfg["seed"], verbose=False)
    batches = cfg["warmup"] + cfg["steps"] + cfg["lookahead"] + _QUEUE
    synthetic = CriteoDataModule(
        "synthetic",
        batch_size=cfg["batch_size"],
        lookahead=cfg["lookahead"],
        cache_rows=cfg["cache_rows"],
        scale=scale_for(cfg["rows"]),
        num_batches=batches,
        val_batches=0,
        zipf=cfg["zipf"],
        seed=cfg["seed"],
    )
    dim = cfg["embedding_dim"] + 1
    opt = RowWiseAdagrad(lr=0.02)
    store: Any
    dm: BagpipeDataModule = synthetic
    if cfg["store"] == "memory_touched":  # the same run, its touched rows renumbered into RAM
        renumbered = Renumbered(_source(cfg))
        store = renumbered.initial_store(dim, opt, cfg["seed"])
        dm = _RenumberedData(synthetic, renumbered)
    elif cfg["store"] == "memory":
        store = None  # a MemoryStore, every row initialised by the library
    elif cfg["store"] == "tiered":
        store = functools.partial(TieredStore, cfg["path"], buffer_bytes=cfg["buffer_bytes"])
    elif cfg.get("advise_random"):
        store = AdvisedMmapStore(cfg["path"])
    else:
        store = cfg["path"]  # the library's MmapStore, opened by CachedEmbedding
    model = DeepFM(
        dm.tables, embedding_dim=cfg["embedding_dim"], sparse_optimizer=opt, store=store, seed=cfg["seed"]
    )
    before = proc_status_bytes()
    clock = _Clock(cfg["warmup"], cfg["batch_size"])
    trainer = pl.Trainer(
        strategy=BagpipeStrategy(log_stats=False),
        accelerator="cpu",
        devices=1,
        max_steps=cfg["warmup"] + cfg["steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[clock],
    )
    saved: dict[str, Any] = {}
    with RssSampler() as sampler:
        trainer.fit(model, datamodule=dm)
        if cfg.get("checkpoint"):  # what a user's end-of-fit checkpoint costs (inside the RSS window)
            t0 = time.perf_counter()
            trainer.save_checkpoint(cfg["checkpoint"])
            seconds = time.perf_counter() - t0
            written = model.embedding.store.written_ids()  # what the checkpoint saved of the tables
            ckpt = Path(cfg["checkpoint"])  # a file, or a directory (checkpoint_layout="auto" on many rows)
            parts = list(ckpt.iterdir()) if ckpt.is_dir() else [ckpt]
            saved = {
                "checkpoint_seconds": seconds,
                "checkpoint_bytes": disk_usage(*parts)["apparent_bytes"],
                "checkpoint_layout": "directory" if ckpt.is_dir() else "file",
                "checkpoint_table_rows": dm.tables.total_rows if written is None else int(written.size),
            }
            if ckpt.is_dir():
                shutil.rmtree(ckpt)
            else:
                ckpt.unlink()
    after = proc_status_bytes()
    stats = trainer.strategy.cache_stats if isinstance(trainer.strategy, BagpipeStrategy) else None
    out: dict[str, Any] = {
        **clock.clock.figures(),
        "losses": clock.clock.losses,
        "total_rows": dm.tables.total_rows,
        "store_bytes": dm.tables.total_rows * opt.row_width(dim) * 4,
        "vm_hwm_bytes": after["VmHWM"],
        "vm_hwm_before_fit_bytes": before["VmHWM"],
        **sampler.peaks(),
        **saved,
    }
    if isinstance(model.embedding.store, TieredStore):
        out["spills"] = model.embedding.store.spills  # (the flush as fit ends included)
        out["compactions"] = model.embedding.store.compactions  # (full spill logs written to the file)
        out["log_merges"] = model.embedding.store.log_merges  # (full spill logs merged into one run)
        out["spill_seconds"] = model.embedding.store.spill_seconds  # (waited for by the row executor)
        out["compaction_seconds"] = model.embedding.store.compaction_seconds
    if stats is not None:
        steps = max(1, stats.steps)
        out.update(
            hit_rate=stats.hit_rate,
            rows_fetched_per_step=stats.rows_fetched / steps,
            fetch_wait_ms_per_step=1000.0 * stats.wait_s / steps,
        )
    return out


class _RenumberedData(BagpipeDataModule):
    """``data``'s training batches, renumbered (``memory_touched``)."""

    def __init__(self, data: BagpipeDataModule, renumbered: Renumbered) -> None:
        super().__init__(
            renumbered.tables,
            batch_size=data.batch_size,
            lookahead=data.lookahead,
            cache_rows=data.cache_rows,
            queue_batches=data.queue_batches,
            prefetch_depth=data.prefetch_depth,
            sync=data.sync,
        )
        self.data, self.renumbered = data, renumbered

    def train_source(self) -> Iterable[Batch]:
        return self.renumbered.batches(self.data.train_source())


def _worker_oracle(cfg: dict[str, Any]) -> dict[str, Any]:
    from lightning_bagpipe.oracle.lookahead import LookaheadOracle

    src = _source(cfg)
    stream = [b.copy() for b in src.id_batches()]
    before = proc_status_bytes()
    t0 = time.perf_counter()
    oracle = LookaheadOracle(src.tables.total_rows, cfg["lookahead"], cfg["cache_rows"])
    created = proc_status_bytes()
    for ids in stream:
        oracle.push(ids)
    oracle.finish()
    seconds = time.perf_counter() - t0
    after = proc_status_bytes()
    return {
        "total_rows": src.tables.total_rows,
        "rss_anon_before_bytes": before["RssAnon"],
        "rss_anon_after_create_bytes": created["RssAnon"],
        "rss_anon_after_stream_bytes": after["RssAnon"],
        "oracle_rss_bytes": after["RssAnon"] - before["RssAnon"],
        "oracle_rss_bytes_per_row": (after["RssAnon"] - before["RssAnon"]) / src.tables.total_rows,
        "vm_hwm_bytes": after["VmHWM"],
        "seconds": seconds,
        "batches": len(stream),
    }


def _worker(cfg: dict[str, Any]) -> None:
    role = cfg["role"]
    fn = {"init": _worker_init, "train": _worker_train, "oracle": _worker_oracle}[role]
    result = fn(cfg)
    Path(cfg["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    add_arguments(p)
    a, _ = p.parse_known_args()
    if a.worker is not None:
        _worker(json.loads(a.worker))
    else:  # the suite itself, as ``lightning-bagpipe bench scale`` runs it (--json, --plot, errors)
        from lightning_bagpipe.cli import main as cli_main

        sys.exit(cli_main(["bench", "scale", *sys.argv[1:]]))
