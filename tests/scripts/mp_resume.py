"""Checkpoint, resume and crash phases of strategy="bagpipe" on 1..N CPU processes.

Run by tests/test_multiprocess_resume.py in a subprocess with a timeout (Lightning's popen launcher re-runs
this script for the other ranks; one launch runs several phases, each with its own Trainer, so the
process start-up is paid once). Each phase writes ``OUT/<phase>/rank<r>.pt`` with the final tables,
dense head, dense optimizer state, step count and the global batches this rank trained; phases with
checkpoints write them under ``OUT/<phase>/ckpts``.

``--scenario first``: ``ref`` (uninterrupted), ``saving`` (a checkpoint after every step), ``inside-saving``
(one checkpoint saved inside step ``INSIDE_AT``, between backward and the optimizer step), ``det-saving``
(a model without randomness, every step, and ``after_fit.ckpt`` saved after fit returned), then
``crash``: checkpoints every 3 steps into ``last.ckpt``, and at step ``--kill-at`` rank 1 writes
``OUT/crash/rank1.ready`` and waits to be killed with SIGKILL.

``--scenario second``: ``resume<k>`` from ``saving``'s step ``k`` for each ``--resume-at``, ``resume-inside``
from ``inside-saving``'s checkpoint, ``restart`` from
the crashed run's ``last.ckpt``, and ``det-from-file`` from the one-process file ``--file-ckpt``.

``--scenario measure`` (the figures in docs/checkpoints.md): for each ``--rows N``, one table of N rows
(``dim=16``, RowWiseAdagrad), one training step, then the time of ``trainer.save_checkpoint`` during
training (a directory with 2 processes, a file with 1) and of restoring it (checks, and copying the rows
into the store)::

    python tests/scripts/mp_resume.py --scenario measure --out /tmp/m --devices 2 --store sharded \
        --rows 1048576 4194304 16777216
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402

import lightning_bagpipe as lb  # noqa: E402
from lightning_bagpipe.embedding.distributed import ShardedStore  # noqa: E402
from tests.helpers import ListDataModule, SaveInsideStep, TinyModel, random_batches, small_tables  # noqa: E402

TABLE_SIZES = (60, 45, 35)
LOOKAHEAD = 4
BATCH = 16
INSIDE_AT = 5  # the step inside which ``inside-saving`` saves a checkpoint


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scenario", choices=["first", "second", "measure"], required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--resume-at", type=int, nargs="*", default=[])
    p.add_argument("--kill-at", type=int, default=8)
    p.add_argument("--file-ckpt", type=Path, default=None)
    p.add_argument("--rows", type=int, nargs="*", default=[1 << 20])
    p.add_argument("--store", default="sharded", choices=["auto", "shared", "sharded"])
    return p.parse_args(argv)


class NoisyModel(TinyModel):
    """TinyModel + dropout (torch RNG) + a loss factor from numpy and ``random``; Adam everywhere."""

    def __init__(self, tables: lb.Tables) -> None:
        super().__init__(tables, optimizer=lb.optim.Adam(lr=0.05))
        self.drop = nn.Dropout(0.3)

    def forward(self, batch: lb.Batch) -> torch.Tensor:
        e = self.drop(self.emb(batch.sparse).flatten(1))
        assert batch.dense is not None
        return self.head(torch.cat([e, batch.dense], 1)).squeeze(1)

    def training_step(self, batch: lb.Batch, batch_idx: int) -> torch.Tensor:
        factor = 1.0 + 0.5 * random.random() + 0.5 * float(np.random.rand())
        return factor * super().training_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.head.parameters(), lr=self.dense_lr)


class Seen(Callback):
    """Records which global batch each training step of this rank trained on (by its slice's dense part)."""

    def __init__(self, batches: list[lb.Batch], rank: int, world: int) -> None:
        self.index: dict[bytes, int] = {}
        for i, b in enumerate(batches):
            lo, hi = rank * b.batch_size // world, (rank + 1) * b.batch_size // world
            assert b.dense is not None
            self.index[b.dense[lo:hi].numpy().tobytes()] = i
        self.seen: list[int] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.seen.append(self.index[batch.dense.numpy().tobytes()])


class KillRank1At(Callback):
    """At step ``step`` rank 1 tells the test its pid and waits (at most 120 s) to be killed."""

    def __init__(self, step: int, ready: Path) -> None:
        self.step, self.ready = step, ready

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_rank == 1 and trainer.global_step == self.step:
            self.ready.write_text(str(os.getpid()))
            time.sleep(120)
            raise RuntimeError("rank 1 was not killed within 120 s")


class NoGather(Callback):
    """Fails the run if a sharded store's rows are gathered before training ends (e.g. by a save)."""

    def __init__(self) -> None:
        self.original = ShardedStore.gather_to_local

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        def refuse(self: ShardedStore) -> None:
            raise AssertionError("a sharded store was gathered during training")

        ShardedStore.gather_to_local = refuse  # type: ignore[method-assign]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ShardedStore.gather_to_local = self.original  # type: ignore[method-assign]


def strategy_stats(trainer: pl.Trainer) -> dict[str, float]:
    strategy = trainer.strategy
    assert isinstance(strategy, lb.BagpipeStrategy)
    return strategy.cache_stats.as_dict() if strategy.cache_stats is not None else {}


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def fit(
    out: Path,
    phase: str,
    *,
    devices: int,
    steps: int,
    noisy: bool,
    store: str,
    seed: int,
    ckpt_path: Path | None = None,
    every: int = 0,
    extra: tuple[Callback, ...] = (),
    last_only: bool = False,
    save_after: Path | None = None,
) -> dict[str, Any]:
    """One fit; returns (and saves to ``out/phase/rank<r>.pt``) this rank's final state."""
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    tables = small_tables(TABLE_SIZES)
    batches = random_batches(tables, steps, BATCH, multi_hot=2, seed=11)
    capacity = (
        max(
            len(set(a.sparse.fused_ids(tables)) | set(b.sparse.fused_ids(tables)))
            for a, b in itertools.pairwise(batches)
        )
        + 4
    )
    torch.manual_seed(0)  # the same initial dense head in every phase
    model = NoisyModel(tables) if noisy else TinyModel(tables, lb.optim.Adam(lr=0.05))
    seen = Seen(batches, rank, devices)
    callbacks: list[Callback] = [seen, *extra]
    if every:
        callbacks.append(
            ModelCheckpoint(
                dirpath=out / phase / "ckpts",
                filename="{step}",
                every_n_train_steps=every,
                save_top_k=0 if last_only else -1,
                save_last=last_only,
            )
        )
    strategy = lb.BagpipeStrategy(store=store, timeout=timedelta(seconds=60))  # type: ignore[arg-type]
    trainer = pl.Trainer(
        strategy=strategy if devices > 1 else "bagpipe",
        accelerator="cpu",
        devices=devices,
        max_epochs=1,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=bool(every),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    dm = ListDataModule(tables, batches, lookahead=LOOKAHEAD, cache_rows=capacity)
    _seed(seed + 1000 * rank)  # every rank draws its own random numbers
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    if save_after is not None:
        trainer.save_checkpoint(save_after)  # after fit: every rank's store holds the whole table again
    result = {
        "rows": model.emb.store.tensor().clone(),
        "head": {k: v.clone() for k, v in model.head.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "steps": trainer.global_step,
        "seen": seen.seen,
        "stats": strategy_stats(trainer),
    }
    (out / phase).mkdir(parents=True, exist_ok=True)
    torch.save(result, out / phase / f"rank{trainer.global_rank}.pt")
    return result


class TimeSave(Callback):
    """After the first step, times ``trainer.save_checkpoint`` (all ranks enter together)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds = 0.0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        trainer.strategy.barrier()
        t0 = time.perf_counter()
        trainer.save_checkpoint(self.path)  # (ends with a barrier)
        self.seconds = time.perf_counter() - t0


def measure(args: argparse.Namespace) -> None:
    """Print save and restore times of one table of each size in ``args.rows``."""
    from lightning_bagpipe.strategies.sharded_checkpoint import load_bagpipe_checkpoint

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    if rank == 0:
        print("rows,table_MB,checkpoint_MB,largest_file_MB,save_s,restore_s", flush=True)
    for n in args.rows:
        tables = lb.Tables([("t", n)])
        batches = random_batches(tables, 2, 64, multi_hot=2, seed=1)
        model = TinyModel(tables, lb.optim.RowWiseAdagrad(lr=0.1), dim=16)
        path = args.out / f"rows{n}.ckpt"
        timer = TimeSave(path)
        strategy = lb.BagpipeStrategy(store=args.store, timeout=timedelta(seconds=600))
        trainer = pl.Trainer(
            strategy=strategy if args.devices > 1 else "bagpipe",
            accelerator="cpu",
            devices=args.devices,
            max_steps=1,
            logger=False,
            callbacks=[timer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, datamodule=ListDataModule(tables, batches, lookahead=1))
        trainer.strategy.barrier()
        t0 = time.perf_counter()
        modules = {"emb": model.emb}
        comm = trainer.strategy._checkpoint_comm()  # type: ignore[attr-defined]
        ckpt, _ = load_bagpipe_checkpoint(trainer.strategy.checkpoint_io, path, True, modules, comm)
        model.load_state_dict(ckpt["state_dict"])  # what Lightning does next (for a file: the row copy)
        del ckpt
        trainer.strategy.barrier()
        restore = time.perf_counter() - t0
        files = [path] if path.is_file() else list(path.iterdir())
        sizes = [f.stat().st_size / 1e6 for f in files]
        if rank == 0:
            table_mb = model.emb.store.nbytes / 1e6
            print(f"{n},{table_mb:.1f},{sum(sizes):.1f},{max(sizes):.1f},{timer.seconds:.2f},{restore:.2f}")
        trainer.strategy.barrier()
        if rank == 0:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def main(args: argparse.Namespace) -> None:
    if args.scenario == "measure":
        measure(args)
        return
    common = {"devices": args.devices, "steps": args.steps}
    out = args.out
    if args.scenario == "first":
        fit(out, "ref", noisy=True, store="sharded", seed=1, **common)
        fit(out, "saving", noisy=True, store="sharded", seed=1, every=1, extra=(NoGather(),), **common)
        inside = SaveInsideStep(INSIDE_AT, out / "inside-saving" / "inside.ckpt")
        fit(out, "inside-saving", noisy=True, store="sharded", seed=1, extra=(inside,), **common)
        after = out / "det-saving" / "after_fit.ckpt"
        fit(out, "det-saving", noisy=False, store="shared", seed=1, every=1, save_after=after, **common)
        ready = out / "crash" / "rank1.ready"
        ready.parent.mkdir(parents=True, exist_ok=True)
        kill = KillRank1At(args.kill_at, ready)
        fit(
            out,
            "crash",
            noisy=True,
            store="sharded",
            seed=1,
            every=3,
            last_only=True,
            extra=(kill,),
            **common,
        )
        raise SystemExit("the crash phase finished although rank 1 should have been killed")
    for k in args.resume_at:
        ckpt = out / "saving" / "ckpts" / f"step={k}.ckpt"
        fit(out, f"resume{k}", noisy=True, store="sharded", seed=99, ckpt_path=ckpt, **common)
    inside = out / "inside-saving" / "inside.ckpt"
    fit(out, "resume-inside", noisy=True, store="sharded", seed=42, ckpt_path=inside, **common)
    fit(
        out,
        "restart",
        noisy=True,
        store="sharded",
        seed=7,
        ckpt_path=out / "crash" / "ckpts" / "last.ckpt",
        **common,
    )
    if args.file_ckpt is not None:
        fit(out, "det-from-file", noisy=False, store="shared", seed=5, ckpt_path=args.file_ckpt, **common)


if __name__ == "__main__":
    main(parse())
