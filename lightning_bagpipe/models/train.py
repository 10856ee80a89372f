"""Train DeepFM or DLRM with ``strategy="bagpipe"`` from the command line (the example scripts' engine).

``examples/deepfm.py`` and ``examples/dlrm.py`` are ``main(model=...)`` of this module. Following the
``lightning-bagpipe`` sub-command convention it also offers ``add_arguments(parser)`` and ``run(args)``,
so the package CLI can expose it as ``lightning-bagpipe train --model deepfm ...``.

One run: build a :class:`~lightning_bagpipe.data.criteo.CriteoDataModule` (synthetic data by default, or a
Criteo TSV file/folder, or Parquet), build the model, ``Trainer(strategy="bagpipe").fit``, make sure the
final model was validated, then print (and optionally write as JSON) validation AUC and log loss, the
planted model's AUC on synthetic data, training throughput and the cache figures the strategy kept.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_bagpipe.arguments import output_file
from lightning_bagpipe.cli import flag_hints
from lightning_bagpipe.data.criteo import CriteoDataModule, detect_kind
from lightning_bagpipe.data.criteo_tsv import add_line_arguments
from lightning_bagpipe.data.synthetic import DEFAULT_ZIPF, SyntheticCriteo
from lightning_bagpipe.embedding.store_lock import store_lock
from lightning_bagpipe.embedding.tiered_store import DEFAULT_BUFFER_BYTES, TieredStore, store_files
from lightning_bagpipe.models.common import (
    DEFAULT_DENSE_LR,
    DEFAULT_SPARSE_LR,
    DENSE_OPTIMIZERS,
    ClickModel,
    StoreLike,
)
from lightning_bagpipe.models.deepfm import DEFAULT_HIDDEN, DeepFM
from lightning_bagpipe.models.dlrm import DLRM
from lightning_bagpipe.optim.sparse import SparseOptimizer, from_hparams
from lightning_bagpipe.strategies.bagpipe import BagpipeStrategy
from lightning_bagpipe.temporaries import pid_alive

__all__ = [
    "MODELS",
    "CheckpointTimer",
    "ThroughputMeter",
    "add_arguments",
    "build_datamodule",
    "build_model",
    "main",
    "run",
]

MODELS = ("deepfm", "dlrm")
SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "adam", "sgd")
DEFAULT_SCALE = 0.01
"""``--scale`` of synthetic data when not given (33.8M rows x 0.01)."""
DEFAULT_VAL_BATCHES = 10
"""``--val-batches`` of synthetic data when not given."""


def _widths(text: str) -> list[int]:
    """Parse ``"128,64"`` into ``[128, 64]`` (argparse type)."""
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer widths like 128,64, got {text!r}"
        ) from None
    if any(w < 1 for w in out):
        raise argparse.ArgumentTypeError(f"layer widths must be positive, got {text!r}")
    return out


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return v

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def add_arguments(parser: argparse.ArgumentParser, model: str | None = None) -> None:
    """Add every flag of a training run to ``parser``.

    With ``model`` (``"deepfm"`` or ``"dlrm"``) only that model's architecture flags are added; without it,
    a ``--model`` flag chooses and both models' flags are present.
    """
    pos_int, pos_float = _positive(int), _positive(float)
    if model is None:
        parser.add_argument(
            "--model", choices=MODELS, default="deepfm", help="model to train (default: deepfm)"
        )
    elif model not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {model!r}")

    data = parser.add_argument_group("data")
    add = data.add_argument
    add(
        "--data",
        default="synthetic",
        metavar="SOURCE",
        help="'synthetic' (default: Criteo-shaped data with a planted model), a Criteo TSV file or folder "
        "(optionally gzip), or a Parquet file or folder (see docs/data.md)",
    )
    add("--val-data", metavar="PATH", help="validation TSV/Parquet for file sources (default: no validation)")
    add(
        "--batch-size",
        type=pos_int,
        default=2048,
        help="global batch size, samples per step (default: %(default)s)",
    )
    add(
        "--scale",
        type=pos_float,
        help="synthetic: multiplies Criteo Kaggle's table sizes, 33.8M rows in all "
        f"(default: {DEFAULT_SCALE})",
    )
    add(
        "--train-batches",
        type=pos_int,
        help="synthetic: batches per training epoch (default: --max-steps x --accumulate-grad-batches, "
        "i.e. one epoch)",
    )
    add(
        "--val-batches",
        type=int,
        help=f"synthetic: validation batches, 0 for none (default: {DEFAULT_VAL_BATCHES})",
    )
    add(
        "--zipf",
        type=float,
        help=f"synthetic: Zipf exponent of ids (default: {DEFAULT_ZIPF})",
    )
    add(
        "--multi-hot",
        type=pos_int,
        help="synthetic: largest bag size, 1 = one-hot (default: 1)",
    )
    add(
        "--hashing",
        choices=("modulo", "vocab"),
        default=None,
        help="TSV: map hashed categoricals to rows by modulo table sizes, or by a vocabulary built in one "
        "pass over the training files (default: modulo; vocab with --vocab-path)",
    )
    add(
        "--table-size",
        type=pos_int,
        help="TSV with --hashing modulo: one row count for every table (default: Criteo Kaggle's sizes)",
    )
    add(
        "--vocab-threshold",
        type=pos_int,
        help="TSV with --hashing vocab: values seen fewer times share one row (default: 1)",
    )
    add("--vocab-path", metavar="PATH", help="TSV with --hashing vocab: load this saved vocabulary")
    add_line_arguments(data)

    cache = parser.add_argument_group("cache and store")
    add = cache.add_argument
    add(
        "--lookahead",
        type=pos_int,
        default=64,
        help="optimizer steps (batches, unless accumulated) the oracle looks ahead, L (default: %(default)s)",
    )
    add("--cache-rows", type=pos_int, help="cache capacity in rows (default: grow to what the plan needs)")
    add(
        "--store",
        choices=("memory", "mmap", "tiered"),
        default="memory",
        help="where the full tables live: host RAM; a memory-mapped file; or 'tiered', that file behind a "
        "RAM write buffer with rows initialised lazily (TieredStore, the store for tables far larger than "
        "RAM; one file per process) (default: %(default)s)",
    )
    add(
        "--store-path",
        type=Path,
        metavar="PATH",
        help="file of the mmap or tiered store (default: ROOT_DIR/tables.f32; with several processes a "
        "tiered store adds .rankR before the suffix); an existing file is an error unless --overwrite-store",
    )
    add(
        "--overwrite-store",
        action="store_true",
        help="replace an existing store file (refused while another run has it open)",
    )
    add(
        "--buffer-mib",
        type=pos_int,
        help="RAM write buffer of the tiered store, in MiB (default: 256)",
    )

    arch = parser.add_argument_group("model")
    add = arch.add_argument
    add("--embedding-dim", type=pos_int, default=16, help="embedding width (default: %(default)s)")
    if model in (None, "deepfm"):
        add(
            "--hidden",
            type=_widths,
            help="DeepFM: hidden widths of the deep MLP, e.g. 400,400,400 "
            f"(default: {','.join(map(str, DEFAULT_HIDDEN))})",
        )
    if model in (None, "dlrm"):
        add(
            "--bottom",
            type=_widths,
            help="DLRM: bottom MLP widths, ending at --embedding-dim (default: 64,EMBEDDING_DIM)",
        )
        add("--top", type=_widths, help="DLRM: top MLP widths, ending at 1 (default: 64,1)")
    add(
        "--sparse-optimizer",
        choices=SPARSE_OPTIMIZERS,
        default="rowwise_adagrad",
        help="embedding optimizer (default: %(default)s)",
    )
    add(
        "--sparse-lr",
        type=pos_float,
        default=DEFAULT_SPARSE_LR,
        help="embedding learning rate (default: %(default)s)",
    )
    add(
        "--dense-optimizer",
        choices=DENSE_OPTIMIZERS,
        default="adam",
        help="MLP optimizer (default: %(default)s)",
    )
    add(
        "--dense-lr",
        type=pos_float,
        default=DEFAULT_DENSE_LR,
        help="MLP learning rate (default: %(default)s)",
    )
    add("--seed", type=int, default=0, help="seeds data, tables and dense weights (default: %(default)s)")

    run_g = parser.add_argument_group("trainer and output")
    add = run_g.add_argument
    add(
        "--devices",
        type=pos_int,
        default=1,
        help="devices (processes); each trains a slice of every global batch (default: 1)",
    )
    add(
        "--accelerator",
        default="auto",
        help="Lightning accelerator: auto, cpu, gpu, ... (default: %(default)s)",
    )
    add("--max-steps", type=pos_int, default=1000, help="optimizer steps to train (default: %(default)s)")
    add("--max-epochs", type=pos_int, help="also stop after this many epochs (default: no epoch limit)")
    add(
        "--accumulate-grad-batches",
        type=pos_int,
        default=1,
        help="batches whose gradients add up to one optimizer step (default: %(default)s)",
    )
    add("--root-dir", type=Path, metavar="PATH", help="logs and checkpoints go here (default: runs/MODEL)")
    add("--no-logger", action="store_true", help="disable Lightning's default logger (TensorBoard, else CSV)")
    add(
        "--no-checkpoint",
        action="store_true",
        help="save no checkpoint (by default one at the end of every epoch, only the newest kept: many "
        "short epochs of a small file over large tables mean many large saves)",
    )
    add("--no-progress-bar", action="store_true", help="hide Lightning's progress bar")
    add("--threads", type=pos_int, help="torch CPU threads (default: torch's choice)")
    add(
        "--metrics-json",
        type=Path,
        metavar="PATH",
        help="write the final figures as JSON: val AUC and log loss, true AUC, samples/s, hit rate, rows "
        "fetched, ...",
    )
    parser.set_defaults(_fixed_model=model)


def _model_name(args: argparse.Namespace) -> str:
    return str(getattr(args, "model", None) or args._fixed_model)


def _hashing(args: argparse.Namespace) -> Literal["modulo", "vocab"]:
    """``--hashing``, or its default: a saved vocabulary implies its hashing (as convert's --vocab does)."""
    if args.hashing is not None:
        return "vocab" if args.hashing == "vocab" else "modulo"  # (argparse's choices)
    return "vocab" if args.vocab_path is not None else "modulo"


def build_datamodule(args: argparse.Namespace) -> CriteoDataModule:
    """The CriteoDataModule the flags describe. Flags that do not apply to the data are refused, naming
    them, rather than ignored (a user who passes ``--table-size`` expects it to size the tables)."""
    synthetic = str(args.data) == "synthetic"
    if synthetic and args.val_data is not None:
        raise ValueError("--val-data is for file sources; synthetic data validates on its own 'val' split")
    tsv_flags = {
        f"--hashing {args.hashing}": args.hashing is not None,
        "--table-size": args.table_size is not None,
        "--vocab-threshold": args.vocab_threshold is not None,
        "--vocab-path": args.vocab_path is not None,
        "--skip-bad-lines": args.skip_bad_lines,
        "--labeled/--unlabeled": args.labeled is not None,
    }
    given = [k for k, v in tsv_flags.items() if v]
    if synthetic and given:
        raise ValueError(f"{', '.join(given)}: TSV options, but --data is synthetic")
    # The TSV options shape how TSV files are read: they apply if the training or validation data is TSV.
    if given and not synthetic and all(detect_kind(p) == "parquet" for p in (args.data, args.val_data) if p):
        raise ValueError(
            f"{', '.join(given)}: TSV options, but the data is Parquet: its files record their tables "
            "(no hashing or table sizes to choose) and have no lines to skip or to detect labels in"
        )
    hashing = _hashing(args)
    if args.vocab_path is not None and hashing != "vocab":
        raise ValueError("--vocab-path needs --hashing vocab (or no --hashing: the vocabulary implies it)")
    if args.table_size is not None and hashing != "modulo":
        raise ValueError("--table-size applies to --hashing modulo only (a vocabulary sizes the tables)")
    if args.vocab_threshold is not None and (hashing != "vocab" or args.vocab_path is not None):
        raise ValueError("--vocab-threshold applies to --hashing vocab when building a vocabulary")
    synthetic_flags = {
        "--scale": args.scale,
        "--train-batches": args.train_batches,
        "--val-batches": args.val_batches,
        "--zipf": args.zipf,
        "--multi-hot": args.multi_hot,
    }
    given_synthetic = [k for k, v in synthetic_flags.items() if v is not None]
    if not synthetic and given_synthetic:
        raise ValueError(
            f"{', '.join(given_synthetic)}: options of synthetic data, but --data is {args.data}: a file "
            "source has its own tables, length and ids (validation data: --val-data)"
        )
    val_batches = DEFAULT_VAL_BATCHES if args.val_batches is None else args.val_batches
    if val_batches < 0:
        raise ValueError(f"--val-batches must be >= 0, got {val_batches}")
    return CriteoDataModule(
        args.data,
        val_path=args.val_data,
        batch_size=args.batch_size,
        lookahead=args.lookahead,
        cache_rows=args.cache_rows,
        scale=DEFAULT_SCALE if args.scale is None else args.scale,
        num_batches=args.train_batches or args.max_steps * args.accumulate_grad_batches,
        val_batches=val_batches,
        zipf=DEFAULT_ZIPF if args.zipf is None else args.zipf,
        multi_hot=1 if args.multi_hot is None else args.multi_hot,
        seed=args.seed,
        hashing=hashing,
        table_sizes=args.table_size,
        vocab_threshold=1 if args.vocab_threshold is None else args.vocab_threshold,
        vocab_path=args.vocab_path,
        labeled=args.labeled,
        skip_bad_lines=args.skip_bad_lines,
    )


def _store_arg(args: argparse.Namespace, root: Path) -> StoreLike:
    """The model's ``store=``: ``None`` (RAM), an mmap file's path, or a TieredStore factory."""
    if args.buffer_mib is not None and args.store != "tiered":
        raise ValueError("--buffer-mib needs --store tiered")
    if args.store == "memory":
        if args.store_path is not None:
            raise ValueError("--store-path needs --store mmap or tiered")
        return None
    path = Path(args.store_path) if args.store_path is not None else root / "tables.f32"
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    # torchrun (torchelastic) starts every rank at once; Lightning's launcher starts the others once rank 0
    # has run this far
    all_at_once = args.devices > 1 and "TORCHELASTIC_RUN_ID" in os.environ
    replace = [path]
    if args.store == "tiered" and args.devices > 1:
        # a TieredStore is one process's: each rank has its own file
        ranks = [path.with_name(f"{path.stem}.rank{r}{path.suffix}") for r in range(args.devices)]
        path = ranks[rank]
        # rank 0 (it runs before the launcher starts the others) checks and replaces every rank's file at
        # once: a rank finding its file held by another run must not stop the run after rank 0 removed its
        # own. The other ranks then find no file. (All at once, each rank sees to its own.)
        replace = ranks if rank == 0 and not all_at_once else [path]
    elif rank > 0:
        # a rank Lightning's launcher started (it re-runs this script): rank 0 created the file already;
        # under torchrun rank 0 makes it meanwhile (_shared_file_made waits for it)
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)
    existing = [p for p in replace if p.exists()]
    for p in existing:
        if not args.overwrite_store:
            raise FileExistsError(
                f"store file {p} exists (from an earlier run?); pass --overwrite-store to replace it or "
                "--store-path to use another file"
            )
        if not store_files(p)[1].exists():
            raise FileExistsError(
                f"{p} exists but is not a lightning-bagpipe store ({store_files(p)[1]} is missing)"
            )
    if existing:
        # a live run holds a file's lock: refused (StoreInUseError, naming its pid) before anything is
        # removed; while the files go, this process holds every lock, so no run can open them meanwhile
        with contextlib.ExitStack() as held:
            for p in existing:
                held.enter_context(store_lock(p, "replace it (--overwrite-store)"))
            for p in existing:
                for f in store_files(p):
                    f.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.store == "tiered":
        mib = args.buffer_mib if args.buffer_mib is not None else DEFAULT_BUFFER_BYTES // 2**20
        return functools.partial(TieredStore, path, buffer_bytes=mib * 2**20)
    return str(path)


#: Seconds a rank other than 0 waits, under torchrun, for rank 0 to make the shared store file.
SHARED_FILE_WAIT_S = 600.0


@contextlib.contextmanager
def _shared_file_made(args: argparse.Namespace, store: StoreLike) -> Iterator[None]:
    """Around building the model: under torchrun every rank starts at once, so with one store file for all
    ranks (``--store mmap``) the ranks other than 0 wait until rank 0 has made (or replaced) and opened it,
    which it says with a hidden marker file named for the torchrun job. Lightning's own launcher starts the
    other ranks only once rank 0 has built its model: nothing to wait for then."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if args.devices < 2 or not run or not isinstance(store, str):
        yield
        return
    path = Path(store)
    # named for this launch: torchrun's run id is "none" without --standalone, and a marker a killed job
    # left must not stand for this one (the ranks of one node share their torchrun agent, the parent)
    marker = path.with_name(f".{path.name}.made.{run}.{os.getppid()}")
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for old in path.parent.glob(f".{path.name}.made.*"):  # markers of killed jobs' agents
            agent = old.name.rsplit(".", 1)[-1]
            if agent.isdigit() and not pid_alive(int(agent)):
                old.unlink(missing_ok=True)
        yield
        marker.touch()
        # every rank has read it once the process group is up: the end of this process removes it
        atexit.register(marker.unlink, missing_ok=True)
        return
    deadline = time.monotonic() + SHARED_FILE_WAIT_S
    while not marker.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"waited {SHARED_FILE_WAIT_S:.0f} s for rank 0 to make the store file {path} "
                f"(marker {marker})"
            )
        time.sleep(0.05)
    yield


def build_model(
    args: argparse.Namespace, datamodule: CriteoDataModule, store: StoreLike = None
) -> ClickModel:
    """The model the flags describe, over the datamodule's tables."""
    opt: SparseOptimizer = from_hparams({"name": args.sparse_optimizer}, lr=args.sparse_lr)
    common: dict[str, Any] = {
        "embedding_dim": args.embedding_dim,
        "sparse_optimizer": opt,
        "dense_optimizer": args.dense_optimizer,
        "dense_lr": args.dense_lr,
        "store": store,
        "seed": args.seed,
    }
    name = _model_name(args)
    given = {
        flag: getattr(args, flag)
        for flag, model in (("hidden", "deepfm"), ("bottom", "dlrm"), ("top", "dlrm"))
        if model != name and getattr(args, flag, None) is not None
    }
    if given:  # (the package's `train` command has both models' flags)
        flags = " and ".join(f"--{flag}" for flag in given)
        own = "--hidden" if name == "deepfm" else "--bottom and --top"
        raise ValueError(f"{flags}: not a flag of --model {name}, whose MLP widths are {own}")
    if name == "deepfm":
        hidden = args.hidden if args.hidden is not None else list(DEFAULT_HIDDEN)
        return DeepFM(datamodule.tables, hidden=hidden, **common)
    bottom = args.bottom if args.bottom is not None else [64, args.embedding_dim]
    top = args.top if args.top is not None else [64, 1]
    return DLRM(datamodule.tables, bottom=bottom, top=top, **common)


class ThroughputMeter(Callback):
    """Training samples per second (global: local batch times ranks) over a fit, excluding validation and
    the time :meth:`exclude` is told about (checkpoint saves: :class:`CheckpointTimer`).

    Also remembers the ``global_step`` of the last (non-sanity) validation, so a caller can tell whether
    the final model was validated.
    """

    def __init__(self) -> None:
        self.samples = 0
        self.train_seconds = 0.0
        self.last_val_step: int | None = None
        self._start: float | None = None
        self._val_start: float | None = None
        self._val_seconds = 0.0
        self._excluded = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        self._val_seconds = 0.0
        self._excluded = 0.0
        self.samples = 0

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` just spent (e.g. saving a checkpoint) out of the training time, unless they were
        spent in validation, which is left out already."""
        if self._start is not None and self._val_start is None:
            self._excluded += seconds

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # every rank trains an equal slice of the global batch: count global samples
        self.samples += int(getattr(batch, "batch_size", 0)) * trainer.world_size

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start is not None and self._start is not None:
            self._val_seconds += time.perf_counter() - self._val_start
        self._val_start = None
        if not trainer.sanity_checking:
            self.last_val_step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is not None:
            self.train_seconds = time.perf_counter() - self._start - self._val_seconds - self._excluded

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else 0.0


class CheckpointTimer(ModelCheckpoint):
    """Lightning's default checkpoint callback (same arguments) that times its saves, remembers the files,
    and leaves the save time out of a :class:`ThroughputMeter`'s training time."""

    def __init__(self, meter: ThroughputMeter | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.meter = meter
        self.saves = 0
        self.save_seconds = 0.0
        self.saved: list[str] = []

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        start = time.perf_counter()
        super()._save_checkpoint(trainer, filepath)
        self.saves += 1
        if filepath not in self.saved:
            self.saved.append(filepath)
        self._took(time.perf_counter() - start)

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        start = time.perf_counter()  # deleting a large file takes a while too
        super()._remove_checkpoint(trainer, filepath)
        self._took(time.perf_counter() - start)

    def _took(self, seconds: float) -> None:
        self.save_seconds += seconds
        if self.meter is not None:
            self.meter.exclude(seconds)

    @property
    def kept(self) -> list[str]:
        """The saved checkpoints still on disk (the default keeps only the latest), oldest first."""
        return [p for p in self.saved if os.path.exists(p)]


def _disk_bytes(path: str | os.PathLike[str]) -> int:
    """Size of a checkpoint: a file, or a directory (a sharded checkpoint) with everything in it."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


#: The tables-sized-to-the-data hint appears when training touched fewer than this share of the rows.
TOUCHED_HINT_SHARE = 0.01


def _tables_hint(args: argparse.Namespace, kind: str, r: dict[str, Any]) -> str | None:
    """A hint when training touched a tiny share of the tables' rows (file sources with fixed table sizes,
    one process: the cache figures are rank 0's otherwise); ``None`` when there is nothing to say."""
    touched, rows = r["rows_fetched"], r["table_rows"]
    if touched is None or r["world_size"] != 1 or touched >= TOUCHED_HINT_SHARE * rows:
        return None
    if kind == "tsv" and _hashing(args) == "modulo":
        sizes = (
            "Criteo Kaggle's sizes, the default"
            if args.table_size is None
            else f"{args.table_size:,} rows each (--table-size)"
        )
        fix = (
            "--hashing vocab gives each value of the training data its own row (or --table-size N sets a "
            "smaller row count for every table)"
        )
    elif kind == "parquet":
        sizes = "the sizes in the Parquet metadata"
        fix = "convert the TSV again with `lightning-bagpipe convert --hashing vocab` (or --table-sizes)"
    else:  # synthetic tables are sized by --scale on purpose; a vocabulary fits the data already
        return None
    return (
        f"hint: training touched at most {touched:,} of the {rows:,} table rows "
        f"({100 * touched / rows:.2g}%; the tables have {sizes}), yet every row costs memory, start-up time "
        f"and checkpoint space: {fix}"
    )


def _in_flags(message: str) -> str:
    """A library error message in this command's terms: the flags instead of the keyword arguments."""
    message = flag_hints("train", message)  # (with the --cache-rows note)
    if "labeled=" in message:
        message += " [--labeled or --unlabeled sets labeled=]"
    return message


def _metric(trainer: pl.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train as the flags say; return (and print, and with ``--metrics-json`` write) the final figures.

    A ``ValueError`` naming a keyword argument the flags set (``labeled=``, ``cache_rows``, ...) is raised
    again naming the flag.
    """
    output_file("--metrics-json", args.metrics_json)  # (before training, not after it)
    try:
        return _run(args)
    except ValueError as err:
        message = _in_flags(str(err))
        if message == str(err):
            raise
        raise ValueError(message) from err


def _run(args: argparse.Namespace) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = _model_name(args)
    root = Path(args.root_dir) if args.root_dir is not None else Path("runs") / name
    pl.seed_everything(args.seed, verbose=False)
    dm = build_datamodule(args)
    store = _store_arg(args, root)
    try:
        with _shared_file_made(args, store):
            model = build_model(args, dm, store)
    except FileExistsError as err:  # (made by another run between _store_arg's check and the creation)
        raise FileExistsError(
            f"store file {store} appeared while this run started (another run?): {err}. Pass --store-path "
            "to use another file"
        ) from err
    meter = ThroughputMeter()
    checkpoint = None if args.no_checkpoint else CheckpointTimer(meter)
    # several processes share one mmap file per node (the default); each keeps its own tiered store
    strategy = BagpipeStrategy(store="sharded") if args.store == "tiered" and args.devices > 1 else "bagpipe"
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator=args.accelerator,
        devices=args.devices,
        max_steps=args.max_steps,
        max_epochs=args.max_epochs if args.max_epochs is not None else -1,
        accumulate_grad_batches=args.accumulate_grad_batches,
        default_root_dir=root,
        logger=not args.no_logger,
        enable_checkpointing=not args.no_checkpoint,
        enable_progress_bar=not args.no_progress_bar,
        callbacks=[meter] if checkpoint is None else [meter, checkpoint],
        num_sanity_val_steps=0,
        log_every_n_steps=min(50, args.max_steps),
    )
    trainer.fit(model, dm)
    has_val = dm.val_data is not None
    if has_val and meter.last_val_step != trainer.global_step:
        trainer.validate(model, datamodule=dm, verbose=False)  # the fit stopped between validations
    used = trainer.strategy
    stats = used.cache_stats.as_dict() if isinstance(used, BagpipeStrategy) and used.cache_stats else {}
    true_auc = None
    if trainer.is_global_zero and isinstance(dm.val_data, SyntheticCriteo):
        true_auc = dm.val_data.true_auc(len(dm.val_data))  # the planted model's AUC on the same samples
    kept = checkpoint.kept if checkpoint is not None and trainer.is_global_zero else []
    result: dict[str, Any] = {
        "model": name,
        "data": str(args.data),
        "steps": trainer.global_step,
        "batch_size": args.batch_size,
        "accumulate_grad_batches": args.accumulate_grad_batches,
        "world_size": trainer.world_size,
        "lookahead": args.lookahead,
        "cache_rows": args.cache_rows,
        "table_rows": dm.tables.total_rows,
        "val_auc": _metric(trainer, "val_auc") if has_val else None,
        "val_logloss": _metric(trainer, "val_logloss") if has_val else None,
        "true_auc": true_auc,
        "train_seconds": meter.train_seconds,
        "samples_per_second": meter.samples_per_second,
        "hit_rate": stats.get("hit_rate"),
        "rows_fetched": stats.get("rows_fetched"),
        "rows_written_back": stats.get("rows_written_back"),
        "rows_evicted": stats.get("rows_evicted"),
        "fetch_wait_ms_total": stats.get("fetch_wait_ms_total"),
        "checkpoints": [{"path": p, "bytes": _disk_bytes(p)} for p in kept],
        "checkpoint_saves": 0 if checkpoint is None else checkpoint.saves,
        "checkpoint_seconds": 0.0 if checkpoint is None else checkpoint.save_seconds,
    }
    if trainer.is_global_zero:
        print(_summary(result))
        hint = _tables_hint(args, dm.kind, result)
        if hint is not None:
            print(hint)
        if args.metrics_json is not None:
            path = Path(args.metrics_json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _step_samples(r: dict[str, Any]) -> str:
    k = r.get("accumulate_grad_batches", 1)
    return f"{k} x {r['batch_size']}" if k > 1 else str(r["batch_size"])


def _summary(r: dict[str, Any]) -> str:
    saves, seconds = r["checkpoint_saves"], r["checkpoint_seconds"]
    lines = [
        f"{r['model']} on {r['data']}: {r['steps']} steps of {_step_samples(r)} samples, "
        f"{r['table_rows']:,} table rows",
        f"  validation AUC      {_fmt(r['val_auc'], '.4f')}  (true model's AUC {_fmt(r['true_auc'], '.4f')})",
        f"  validation log loss {_fmt(r['val_logloss'], '.4f')}",
        f"  throughput          {_fmt(r['samples_per_second'], ',.0f')} samples/s "
        f"({r['train_seconds']:.1f} s of training{', checkpoint saves not included' if saves else ''})",
        f"  cache{' of rank 0' if r['world_size'] > 1 else ''} (L={r['lookahead']}, "
        f"rows={r['cache_rows'] or 'as needed'}): hit rate "
        f"{_fmt(r['hit_rate'], '.2%')}, rows fetched {_fmt(r['rows_fetched'], ',')}, written back "
        f"{_fmt(r['rows_written_back'], ',')}, evicted {_fmt(r['rows_evicted'], ',')}",
    ]
    if not saves:
        lines.append("  checkpoint          none saved")
    took = f"{seconds:.{2 if seconds < 1 else 1}f} s"
    took = f"saved in {took}" if saves == 1 else f"{saves} saves took {took}, this is the last"
    for ckpt in r["checkpoints"]:
        lines.append(f"  checkpoint          {ckpt['path']} ({_size(ckpt['bytes'])}; {took})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, model: str | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run; ``model`` fixes the model (the example scripts)."""
    title = {"deepfm": "DeepFM", "dlrm": "DLRM", None: "DeepFM or DLRM"}[model]
    parser = argparse.ArgumentParser(
        description=f"Train {title} with lightning-bagpipe's lookahead embedding cache (strategy='bagpipe'). "
        "With no arguments: synthetic Criteo-shaped data, under a minute on a 2-core CPU.",
    )
    add_arguments(parser, model)
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as err:  # (ValueErrors name flags: run; OSErrors name their file)
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
