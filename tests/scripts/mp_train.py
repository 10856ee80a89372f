"""Train TinyModel with strategy="bagpipe" on 1..N CPU processes and save each rank's result.

Run by tests/test_multiprocess.py in a subprocess (Lightning's popen launcher re-runs this script for
the other ranks). Each rank writes ``OUT/rank{r}.pt`` with its final tables, dense head and cache stats.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

import lightning_bagpipe as lb  # noqa: E402
from tests.helpers import ListDataModule, TinyModel, random_batches, small_tables  # noqa: E402

OPTIMIZERS = {
    "sgd": lambda: lb.optim.SGD(lr=0.1),
    "adagrad": lambda: lb.optim.Adagrad(lr=0.1),
    "rowwise_adagrad": lambda: lb.optim.RowWiseAdagrad(lr=0.1),
    "adam": lambda: lb.optim.Adam(lr=0.01),
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--lookahead", type=int, default=4)
    p.add_argument("--store", default="shared")
    p.add_argument(
        "--tiered-buffer-rows", type=int, default=0, help="each rank keeps its rows in its own TieredStore"
    )
    p.add_argument("--multi-hot", type=int, default=1)
    p.add_argument("--min-bag", type=int, default=1, help="0: empty bags (missing values) too")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit-train-batches", type=int, default=None, help="Lightning's: epochs cut short")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--accumulate", type=int, default=1, help="Lightning's accumulate_grad_batches")
    p.add_argument("--capacity", type=int, default=0, help="0: two steps' rows + 4 (forces evictions)")
    p.add_argument("--optimizer", default="adagrad", choices=sorted(OPTIMIZERS))
    p.add_argument("--sync", default="partitioned", choices=["partitioned", "replicated"])
    p.add_argument("--no-defer-sync", action="store_true", help="sync every replicated row within its step")
    p.add_argument("--mismatch-rank1", action="store_true", help="rank 1 builds other tables (error test)")
    p.add_argument("--short-rank1", action="store_true", help="rank 1's source has fewer batches")
    p.add_argument("--unsized", action="store_true", help="the source is a generator (no length)")
    p.add_argument(
        "--fp16-scale", type=float, default=0.0, help='"16-mixed" with a GradScaler of this initial scale'
    )
    p.add_argument("--rank1-lr", type=float, default=None, help="rank 1's sparse optimizer's lr (error test)")
    p.add_argument("--rank1-capacity", type=int, default=None, help="rank 1's cache_rows (error test)")
    p.add_argument("--rank1-seed", type=int, default=None, help="rank 1 reads other batches (error test)")
    p.add_argument(
        "--file-per-rank",
        action="store_true",
        help="each rank's tables in its own MmapStore file (needs --out)",
    )
    p.add_argument("--fail-rank1-at", type=int, default=-1, help="rank 1 raises in this training step")
    p.add_argument(
        "--direct-loader", action="store_true", help="give fit() the loader, built before the Trainer's ranks"
    )
    return p.parse_args(argv)


class _Unsized(ListDataModule):
    """The same batches from a generator: a source of unknown length."""

    def train_source(self) -> Iterator[lb.Batch]:  # type: ignore[override]
        yield from self.batches


class _FailOnRank1(TinyModel):
    fail_at = -1

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        # a buffer of the model's own, which DDP must keep broadcasting (unlike the CachedEmbedding's)
        self.register_buffer("seen", torch.zeros(1))
        self.ddp_buffers: list[str] | None = None

    def on_train_start(self) -> None:
        ddp = self.trainer.strategy.model  # (unwrapped again at teardown)
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            self.ddp_buffers = sorted(ddp.named_module_buffers)  # the buffers DDP broadcasts each step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_rank == 1 and batch_idx == self.fail_at:
            raise RuntimeError(f"rank 1 fails on purpose at step {batch_idx}")
        return super().training_step(batch, batch_idx)


def _fp16(init_scale: float) -> MixedPrecision:
    """Lightning's "16-mixed" as on a GPU (a GradScaler), emulated on CPU."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def run(args: argparse.Namespace) -> dict:
    """Train; return (and with --out, save) this rank's final tables, dense head and cache stats."""
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    sizes = (60, 45, 35) if not (args.mismatch_rank1 and rank == 1) else (60, 45, 36)
    tables = small_tables(sizes)
    seed = args.rank1_seed if args.rank1_seed is not None and rank == 1 else 11
    batches = random_batches(
        tables, args.steps, args.batch, multi_hot=args.multi_hot, min_bag=args.min_bag, seed=seed
    )
    if args.short_rank1 and rank == 1:
        batches = batches[:-2]
    k = args.accumulate  # a step is k batches: two steps' rows must fit
    steps = [
        set().union(*(set(b.sparse.fused_ids(tables)) for b in batches[i : i + k]))
        for i in range(0, len(batches), k)
    ]
    capacity = args.capacity or max(len(a | b) for a, b in itertools.pairwise(steps)) + 4
    pl.seed_everything(0, verbose=False)
    store = None
    if args.tiered_buffer_rows:
        opt = OPTIMIZERS[args.optimizer]()
        row_bytes = (4 + opt.state_width(4)) * 4 + 32
        if args.out is None:
            raise SystemExit("--tiered-buffer-rows needs --out (the stores' files go there)")
        folder = args.out / f"tiered-rank{rank}"
        folder.mkdir(parents=True, exist_ok=True)
        store = functools.partial(
            lb.TieredStore, folder / "rows.f32", buffer_bytes=args.tiered_buffer_rows * row_bytes
        )
    if args.file_per_rank:
        if args.out is None:
            raise SystemExit("--file-per-rank needs --out (the stores' files go there)")
        folder = args.out / f"files-{args.devices}"
        folder.mkdir(parents=True, exist_ok=True)
        store = folder / f"rank{rank}.f32"
    optimizer = OPTIMIZERS[args.optimizer]()
    if args.rank1_lr is not None and rank == 1:
        optimizer.lr = args.rank1_lr
    model = _FailOnRank1(tables, optimizer, store=store)
    model.fail_at = args.fail_rank1_at
    strategy = lb.BagpipeStrategy(
        store=args.store, defer_sync=not args.no_defer_sync, timeout=timedelta(seconds=60)
    )
    trainer = pl.Trainer(
        strategy=strategy if args.devices > 1 else "bagpipe",
        accelerator="cpu",
        devices=args.devices,
        max_epochs=args.epochs,
        limit_train_batches=args.limit_train_batches,
        accumulate_grad_batches=args.accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[_fp16(args.fp16_scale)] if args.fp16_scale else None,
    )
    if args.rank1_capacity is not None and rank == 1:
        capacity = args.rank1_capacity
    module = _Unsized if args.unsized else ListDataModule
    dm = module(tables, batches, lookahead=args.lookahead, cache_rows=capacity, sync=args.sync)
    if args.direct_loader:  # (built with no Trainer: rank 0 of 1 until the strategy binds it)
        trainer.fit(model, train_dataloaders=dm.train_dataloader())
    else:
        trainer.fit(model, datamodule=dm)
    stats = trainer.strategy.cache_stats
    result = {
        "rows": model.emb.store.tensor().clone(),
        "head": {k: v.clone() for k, v in model.head.state_dict().items()},
        "steps": trainer.global_step,
        "grad_scale": trainer.precision_plugin.scaler.get_scale() if args.fp16_scale else None,
        "stats": stats.as_dict() if stats is not None else {},
    }
    if model.ddp_buffers is not None:
        result["ddp_buffers"] = model.ddp_buffers
    if isinstance(model.emb.store, lb.TieredStore):
        result["spills"] = model.emb.store.spills
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(result, args.out / f"rank{trainer.global_rank}.pt")
    if args.devices > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # exit without live gloo groups
    return result


if __name__ == "__main__":
    run(parse())
