"""Training benchmark: DeepFM samples/s with the BagPipe cache next to the ways people train it today.

``lightning-bagpipe bench train --json PATH [--plot PATH.png]`` trains DeepFM
(:mod:`lightning_bagpipe.models`) on synthetic Criteo-shaped data in one process, once per contender per
repeat, on the *same* batches (generated once, kept in memory), with the same batch size, embedding
dimension, dense layers, dense optimizer (Adam), number of steps and warm-up:

* **bagpipe**: ``Trainer(strategy="bagpipe")`` with a :class:`~lightning_bagpipe.BagpipeDataModule`; rows
  live in a RAM store, the oracle plans in the loader thread, a cache of ``--cache-rows`` rows serves
  the steps, and :class:`~lightning_bagpipe.optim.RowWiseAdagrad` updates the cached rows;
* **ideal**: the same model and the same row-wise Adagrad code with every row local in one tensor and no
  cache management: each step deduplicates its ids (``torch.unique``), gathers the rows, and applies
  the same optimizer to the touched rows after the dense step. Same start weights and same math as
  bagpipe, so its per-step losses must equal bagpipe's (reported as ``max_abs_loss_diff_vs_ideal``);
* **plain**: how a Lightning user writes it today: one ``torch.nn.EmbeddingBag(sparse=True)`` per table
  and ``torch.optim.Adagrad`` on the sparse gradients (element-wise: torch has no row-wise Adagrad),
  Adam on the rest, manual optimization (Lightning runs one optimizer per step automatically);
* **torchrec**: TorchRec's ``EmbeddingBagCollection`` sharded by ``DistributedModelParallel`` (gloo,
  world of one, table-wise, FBGEMM's fused CPU kernel) with ``RowWiseAdagrad`` applied in backward,
  inside the same LightningModule. Only when ``torchrec`` and ``fbgemm_gpu`` import; otherwise skipped
  with the reason. FBGEMM needs row widths divisible by 4, so its rows are ``dim + 1`` rounded up to a
  multiple of 4 (the extra columns are unused);
* **ideal_prededuped** (extra, on request): ideal with each batch's deduplication, pooling layout and row
  grouping computed before the run and not timed. Not a system: the bound for any system that moves
  that work off the step (as bagpipe's loader does) on a machine where doing it elsewhere costs nothing;
* **floor**: the same dense part fed a fixed embedding tensor (no tables, no lookups, no row updates):
  the speed no embedding system can pass. The tensor is a fresh leaf that requires a gradient, so the
  backward pass computes the gradient of the loss with respect to the pooled embeddings (and drops it):
  every embedding system needs that gradient, so a floor without it would be a bound no system can
  approach (``docs/benchmarks.md`` gives both).

Every run is a fresh model and Trainer; contenders are interleaved over ``--repeats`` and medians are
reported. A step's time is wall time from the end of one step to the end of the next (loader wait
included); the first ``--warmup`` steps are excluded. The data source holds ``--lookahead`` + 4 more
batches than are trained, so bagpipe's oracle thread plans one batch per step throughout the timed
window, as in a long run. Each run checks that its loss fell (mean of the last fifth of the steps below
the first fifth), so no contender is fast because it learns nothing.

For bagpipe a step-time breakdown is measured with timers (no profiler): callbacks mark batch start,
backward start/end and the optimizer step; the model marks ``training_step``; wrappers on the
CachedEmbedding time the sparse update and the background thread's fetches and write-backs. The
oracle's own cost is measured separately: a :class:`~lightning_bagpipe.oracle.lookahead.LookaheadOracle`
with the same lookahead and capacity planning the same id stream, per batch, divided by bagpipe's step.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import socket
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_bagpipe.arguments import require_counts, require_positive
from lightning_bagpipe.bench.breakdown import StepBreakdown, TimedDeepFM
from lightning_bagpipe.bench.common import (
    StepClock,
    interleaved,
    machine_info,
    median_figures,
    parse_int_list,
    require_matplotlib,
    save_figure,
    suite_config,
)
from lightning_bagpipe.data.batch import Batch, PoolingIndex, SparseFeatures
from lightning_bagpipe.data.datamodule import BagpipeDataModule
from lightning_bagpipe.data.synthetic import SyntheticCriteo
from lightning_bagpipe.embedding.cached import CachedEmbedding
from lightning_bagpipe.embedding.pooling import pooled_lookup
from lightning_bagpipe.models.deepfm import DeepFM
from lightning_bagpipe.optim.sparse import RowWiseAdagrad, SparseOptimizer
from lightning_bagpipe.oracle.lookahead import LookaheadOracle
from lightning_bagpipe.strategies.bagpipe import BagpipeStrategy
from lightning_bagpipe.tables import Tables

CONTENDERS = ("bagpipe", "ideal", "plain", "torchrec", "floor")
#: Also accepted by ``--contenders``, not run by default: the floor without the embeddings' gradient, and
#: ideal with its dedup and layout computed before the run (a bound, not a system).
EXTRA_CONTENDERS = ("floor_no_input_grad", "ideal_prededuped")
#: Goals of the project, reported (never enforced): bagpipe's samples/s over each contender's.
GOALS = {"ideal": 0.9, "floor": 0.8, "torchrec": 1.2, "plain": 1.4}
#: Batches the loader buffers beyond the lookahead (BagpipeDataModule's default ``queue_batches``).
_QUEUE = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's flags (``--json`` is added by the command line front end)."""
    parser.add_argument("--batch-size", type=int, default=4096, help="samples per step")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender (medians reported)")
    parser.add_argument("--scale", type=float, default=0.1, help="Criteo Kaggle's table sizes times this")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the synthetic ids")
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--hidden", type=str, default="128,64", help="DeepFM's MLP widths")
    parser.add_argument("--lookahead", type=int, default=64, help="bagpipe: oracle lookahead L")
    parser.add_argument(
        "--cache-rows",
        type=int,
        default=131072,
        help="bagpipe: cache capacity in rows (0: as many as needed)",
    )
    parser.add_argument("--sparse-lr", type=float, default=0.02, help="embedding learning rate (all)")
    parser.add_argument("--dense-lr", type=float, default=1e-3, help="Adam learning rate of the MLPs (all)")
    parser.add_argument(
        "--contenders",
        type=str,
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)} (also: {','.join(EXTRA_CONTENDERS)})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--plot", type=Path, default=None, help="draw samples/s and bagpipe's breakdown here")


def _check(args: argparse.Namespace) -> list[str]:
    require_counts(args, "batch_size", "steps", "warmup", "repeats", "embedding_dim", "lookahead")
    if args.threads is not None:
        require_counts(args, "threads")
    if args.cache_rows < 0:
        raise ValueError(f"--cache-rows must be >= 0 (0: as many as needed), got {args.cache_rows}")
    require_positive(args, "scale", "zipf", "sparse_lr", "dense_lr")
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONTENDERS + EXTRA_CONTENDERS]
    if unknown or not names:
        raise ValueError(
            f"--contenders: unknown {unknown or names}; choose from {list(CONTENDERS + EXTRA_CONTENDERS)}"
        )
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------- shared set-up
@dataclass
class _Setup:
    """What every run of the suite shares: flags, tables and the in-memory batches."""

    args: argparse.Namespace
    tables: Tables
    batches: list[Batch]
    hidden: list[int]

    @property
    def steps(self) -> int:
        return self.args.warmup + self.args.steps


def _deepfm(setup: _Setup, cls: type[DeepFM] = DeepFM) -> DeepFM:
    """A freshly seeded DeepFM (same dense weights and table rows for every contender)."""
    a = setup.args
    pl.seed_everything(a.seed, verbose=False)
    return cls(
        setup.tables,
        embedding_dim=a.embedding_dim,
        hidden=setup.hidden,
        sparse_optimizer=RowWiseAdagrad(lr=a.sparse_lr),
        dense_lr=a.dense_lr,
        seed=a.seed,
    )


def _trainer(setup: _Setup, callbacks: list[Callback], strategy: Any = "auto") -> pl.Trainer:
    return pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        max_steps=setup.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )


class _Batches:
    """An iterable over the in-memory batches with a length (Lightning passes it through untouched)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _ListData(BagpipeDataModule):
    """The in-memory batches through BagPipe's loader (oracle thread, plans)."""

    def __init__(self, setup: _Setup) -> None:
        a = setup.args
        super().__init__(
            setup.tables,
            batch_size=a.batch_size,
            lookahead=a.lookahead,
            cache_rows=a.cache_rows or None,
            queue_batches=_QUEUE,
        )
        self.batches = setup.batches

    def train_source(self) -> list[Batch]:
        return self.batches


class _Clock(Callback):
    """Lightning face of :class:`~lightning_bagpipe.bench.common.StepClock` (with bagpipe's fetch waits)."""

    def __init__(self, warmup: int, batch_size: int) -> None:
        self.clock = StepClock(warmup, batch_size)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.begin()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else None
        strategy = trainer.strategy
        wait = (
            strategy.driver.last.wait_ms
            if isinstance(strategy, BagpipeStrategy) and strategy.driver
            else None
        )
        self.clock.step_end(None if loss is None else float(loss), wait)


def _fit(setup: _Setup, model: pl.LightningModule, strategy: Any = "auto", **fit: Any) -> tuple[Any, ...]:
    clock = _Clock(setup.args.warmup, setup.args.batch_size)
    trainer = _trainer(setup, [clock], strategy)
    trainer.fit(model, **fit)
    if trainer.global_step != setup.steps:
        raise RuntimeError(f"trained {trainer.global_step} steps instead of {setup.steps}")
    return trainer, clock.clock


# ---------------------------------------------------------------------- bagpipe (with a step breakdown)
def _run_bagpipe(setup: _Setup) -> dict[str, Any]:
    model = _deepfm(setup, TimedDeepFM)
    assert isinstance(model, TimedDeepFM)
    model.marks = {}
    breakdown = StepBreakdown(setup.args.warmup, model.marks)
    breakdown.wrap(model.embedding)
    clock = _Clock(setup.args.warmup, setup.args.batch_size)
    trainer = _trainer(setup, [clock, breakdown], "bagpipe")
    trainer.fit(model, datamodule=_ListData(setup))
    if trainer.global_step != setup.steps:
        raise RuntimeError(f"bagpipe trained {trainer.global_step} steps instead of {setup.steps}")
    stats = trainer.strategy.cache_stats if isinstance(trainer.strategy, BagpipeStrategy) else None
    out = clock.clock.figures()
    out["losses"] = clock.clock.losses
    if stats is not None:
        out.update(
            hit_rate=stats.hit_rate,
            rows_fetched_per_step=stats.rows_fetched / max(1, stats.steps),
            rows_written_back_per_step=stats.rows_written_back / max(1, stats.steps),
            fetch_wait_ms_per_step=1000.0 * stats.wait_s / max(1, stats.steps),
        )
    out["breakdown"] = breakdown.figures()
    return out


# ---------------------------------------------------------------------- ideal: every row local
class FullTableEmbedding(nn.Module):
    """Every table row (weights + optimizer state) in one local tensor; no cache, no plan.

    Same interface and math as :class:`~lightning_bagpipe.CachedEmbedding` under ``strategy="bagpipe"``:
    gather the step's distinct rows, sum-pool, and after the dense step apply the sparse optimizer to the
    touched rows (:meth:`apply_update`). ``table`` is ``[total_rows, dim + state]``.
    """

    _offsets: Tensor

    def __init__(self, table: Tensor, tables: Tables, dim: int, optimizer: SparseOptimizer) -> None:
        super().__init__()
        self.table = table
        self.dim = int(dim)
        self.optimizer = optimizer
        self.register_buffer("_offsets", torch.as_tensor(tables.offsets), persistent=False)
        self._pending: tuple[Tensor, Tensor] | None = None
        self.prepared: dict[int, tuple[Tensor, PoolingIndex]] = {}
        """``dedup`` results computed ahead, by the address of a batch's ``values`` (ideal_prededuped)."""
        self.prepared_hits = 0
        """Forward passes that used them."""

    def forward(self, features: SparseFeatures) -> Tensor:
        b, f = features.batch_size, features.num_features
        grad = self.training and torch.is_grad_enabled()
        done = self.prepared.get(features.values.data_ptr()) if self.prepared else None
        if done is not None:
            self.prepared_hits += 1
        uniq, index = done if done is not None else self.dedup(features, grouped=grad)
        rows = self.table[:, : self.dim].index_select(0, uniq)
        if grad:
            rows.requires_grad_()
            self._pending = (uniq, rows)
        return pooled_lookup(rows, index, b, f)

    def dedup(self, features: SparseFeatures, grouped: bool) -> tuple[Tensor, PoolingIndex]:
        """The batch's distinct fused ids and its pooling layout (with the row grouping if ``grouped``):
        the work ``forward`` does on the step's critical path."""
        b, f = features.batch_size, features.num_features
        per_key = features.lengths.view(f, b).sum(1)
        key_of = torch.repeat_interleave(torch.arange(f), per_key)
        ids = features.values + self._offsets[key_of]
        uniq, inverse = torch.unique(ids, return_inverse=True)
        return uniq, PoolingIndex.from_lookup(inverse, features.lengths, f, uniq.numel(), grouped=grouped)

    def apply_update(self, step: int) -> None:
        """The sparse optimizer on the rows the last forward touched (weights and state together)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        uniq, rows = pending
        if rows.grad is None:
            return
        full = self.table.index_select(0, uniq)
        self.optimizer.update(full, rows.grad, step)
        self.table.index_copy_(0, uniq, full)


class _IdealDeepFM(DeepFM):
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        emb = self.embedding
        assert isinstance(emb, FullTableEmbedding)
        emb.apply_update(self.trainer.global_step)


def _run_ideal(setup: _Setup, prededuped: bool = False) -> dict[str, Any]:
    model = _deepfm(setup, _IdealDeepFM)
    cached = model.embedding
    assert isinstance(cached, CachedEmbedding)
    full = FullTableEmbedding(cached.store.tensor(), setup.tables, cached.dim, cached.optimizer)
    model.embedding = full  # type: ignore[assignment]
    if prededuped:  # a bound, not a system: the step's dedup and layout done before the run, untimed
        full.prepared = {b.sparse.values.data_ptr(): full.dedup(b.sparse, True) for b in setup.batches}
    _, clock = _fit(setup, model, train_dataloaders=_Batches(setup.batches))
    out = {**clock.figures(), "losses": clock.losses}
    if prededuped:
        out["steps_prededuped"] = full.prepared_hits
    return out


# ---------------------------------------------------------------------- plain Lightning
class PlainEmbeddingBags(nn.Module):
    """One ``nn.EmbeddingBag(sparse=True)`` per table, as a Lightning user writes it today."""

    def __init__(self, table: Tensor, tables: Tables, dim: int) -> None:
        super().__init__()
        self.bags = nn.ModuleList(
            nn.EmbeddingBag.from_pretrained(
                table[int(o) : int(o) + t.num_embeddings, :dim].clone(), freeze=False, mode="sum", sparse=True
            )
            for t, o in zip(tables, tables.offsets)
        )

    def forward(self, features: SparseFeatures) -> Tensor:
        b, f = features.batch_size, features.num_features
        lengths = features.lengths.view(f, b)
        values = torch.split(features.values, lengths.sum(1).tolist())
        offsets = torch.zeros_like(lengths)
        torch.cumsum(lengths[:, :-1], 1, out=offsets[:, 1:])
        return torch.stack([bag(v, o) for bag, v, o in zip(self.bags, values, offsets)], dim=1)


class _PlainDeepFM(DeepFM):
    """DeepFM on plain EmbeddingBags: torch.optim.Adagrad on the sparse gradients, Adam on the MLPs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.sparse_lr = float(kwargs.get("sparse_optimizer", RowWiseAdagrad(lr=0.02)).lr)

    def configure_optimizers(self) -> Any:
        sparse = list(self.embedding.parameters())
        ids = {id(p) for p in sparse}
        dense = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [torch.optim.Adagrad(sparse, lr=self.sparse_lr), torch.optim.Adam(dense, lr=self.dense_lr)]

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        optimizers = self.optimizers()
        assert isinstance(optimizers, list)
        opt_sparse, opt_dense = optimizers
        loss = super().training_step(batch, batch_idx)
        opt_sparse.zero_grad()
        opt_dense.zero_grad()
        self.manual_backward(loss)
        opt_dense.step()
        # the raw optimizer: Lightning counts every wrapped optimizer's step as a global step
        opt_sparse.optimizer.step()
        return loss.detach()


def _run_plain(setup: _Setup) -> dict[str, Any]:
    model = _deepfm(setup, _PlainDeepFM)
    cached = model.embedding
    assert isinstance(cached, CachedEmbedding)
    model.embedding = PlainEmbeddingBags(cached.store.tensor(), setup.tables, cached.dim)  # type: ignore[assignment]
    del cached
    _, clock = _fit(setup, model, train_dataloaders=_Batches(setup.batches))
    return {
        **clock.figures(),
        "losses": clock.losses,
        "sparse_optimizer": "torch.optim.Adagrad (element-wise)",
    }


# ---------------------------------------------------------------------- floor: no tables at all
class FixedEmbedding(nn.Module):
    """The same ``[B, F, dim]`` tensor for every batch (no rows): the dense part alone.

    With ``input_grad`` (the default) each call returns a fresh leaf that requires a gradient, so the
    backward pass also computes the gradient with respect to the embeddings, which every embedding system
    must compute; it is never applied.
    """

    fixed: Tensor

    def __init__(self, fixed: Tensor, input_grad: bool = True) -> None:
        super().__init__()
        self.register_buffer("fixed", fixed, persistent=False)
        self.input_grad = input_grad

    def forward(self, features: SparseFeatures) -> Tensor:
        if features.batch_size != self.fixed.shape[0]:
            raise ValueError(
                f"floor: batch of {features.batch_size} samples, fixed tensor has {self.fixed.shape[0]}"
            )
        if self.input_grad and self.training and torch.is_grad_enabled():
            return self.fixed.detach().requires_grad_()
        return self.fixed


def _run_floor(setup: _Setup, input_grad: bool = True) -> dict[str, Any]:
    model = _deepfm(setup, DeepFM)
    cached = model.embedding
    assert isinstance(cached, CachedEmbedding)
    first = setup.batches[0].sparse
    with torch.no_grad():
        fixed = cached(first).detach().clone()  # the first batch's pooled rows, read from the store
    model.embedding = FixedEmbedding(fixed, input_grad)  # type: ignore[assignment]
    del cached
    _, clock = _fit(setup, model, train_dataloaders=_Batches(setup.batches))
    return {**clock.figures(), "losses": clock.losses}


# ---------------------------------------------------------------------- TorchRec (optional)
def torchrec_unavailable() -> str | None:
    """Why the TorchRec contender cannot run here (``None`` if it can)."""
    try:
        import fbgemm_gpu  # noqa: F401
        import torchrec  # noqa: F401
    except Exception as err:  # ImportError, or an op library that fails to load
        return (
            f"torchrec/fbgemm_gpu do not import ({type(err).__name__}: {err}); install them with "
            "pip install fbgemm-gpu-cpu==1.8.0 pyre-extensions tensordict tqdm && "
            "pip install --no-deps torchrec==1.8.0 (matching torch 2.13)"
        )
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TorchRecEmbedding(nn.Module):
    """TorchRec's EmbeddingBagCollection behind DistributedModelParallel (fused row-wise Adagrad in backward).

    ``forward(features) -> [B, F, dim]``. Rows are ``dim`` rounded up to a multiple of 4 wide (FBGEMM's
    requirement); the extra columns are never read, so their gradient is zero.
    """

    def __init__(self, table: Tensor, tables: Tables, dim: int, lr: float) -> None:
        super().__init__()
        import torch.distributed as dist
        from torch.distributed.optim import _apply_optimizer_in_backward
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
        from torchrec.optim.rowwise_adagrad import RowWiseAdagrad as TRRowWiseAdagrad

        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            dist.init_process_group("gloo", rank=0, world_size=1)
        self.dim = int(dim)
        self.width = 4 * math.ceil(self.dim / 4)
        self.keys = list(tables.names)
        configs = [
            EmbeddingBagConfig(name=t.name, embedding_dim=self.width, num_embeddings=t.num_embeddings,
                               feature_names=[t.name])
            for t in tables
        ]  # fmt: skip

        class _Holder(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))

            def forward(self, kjt: Any) -> Any:
                return self.ebc(kjt)

        holder = _Holder()
        _apply_optimizer_in_backward(TRRowWiseAdagrad, holder.ebc.parameters(), {"lr": lr})
        constraints = {
            t.name: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"])
            for t in tables
        }
        sharders: list[Any] = [EmbeddingBagCollectionSharder()]
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints
        )
        plan = planner.collective_plan(holder, sharders, dist.GroupMember.WORLD)
        self.dmp = DistributedModelParallel(
            module=holder, device=torch.device("cpu"), plan=plan, sharders=sharders
        )
        state = self.dmp.state_dict()
        with torch.no_grad():
            for t, o in zip(tables, tables.offsets.tolist()):
                shard = state[f"ebc.embedding_bags.{t.name}.weight"].local_shards()[0].tensor
                shard.zero_()
                shard[:, : self.dim] = table[o : o + t.num_embeddings, : self.dim]

    def forward(self, features: SparseFeatures) -> Tensor:
        from torchrec import KeyedJaggedTensor

        kjt = KeyedJaggedTensor(keys=self.keys, values=features.values, lengths=features.lengths.int())
        pooled = self.dmp(kjt).values()  # [B, F * width], features in key order
        return pooled.view(features.batch_size, len(self.keys), self.width)[..., : self.dim]


class _TorchRecDeepFM(DeepFM):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        dense = [p for _, p in in_backward_optimizer_filter(self.named_parameters()) if p.requires_grad]
        return torch.optim.Adam(dense, lr=self.dense_lr)


def _run_torchrec(setup: _Setup) -> dict[str, Any]:
    reason = torchrec_unavailable()
    if reason is not None:
        return {"skipped": reason}
    model = _deepfm(setup, _TorchRecDeepFM)
    cached = model.embedding
    assert isinstance(cached, CachedEmbedding)
    model.embedding = TorchRecEmbedding(cached.store.tensor(), setup.tables, cached.dim, setup.args.sparse_lr)  # type: ignore[assignment]
    del cached
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, clock = _fit(setup, model, train_dataloaders=_Batches(setup.batches))
    return {**clock.figures(), "losses": clock.losses, "row_width": model.embedding.width}


RUNNERS: dict[str, Callable[[_Setup], dict[str, Any]]] = {
    "bagpipe": _run_bagpipe,
    "ideal": _run_ideal,
    "plain": _run_plain,
    "torchrec": _run_torchrec,
    "floor": _run_floor,
    "floor_no_input_grad": lambda setup: _run_floor(setup, input_grad=False),
    "ideal_prededuped": lambda setup: _run_ideal(setup, prededuped=True),
}


# ---------------------------------------------------------------------- the oracle's share of a step
def oracle_cost(setup: _Setup) -> dict[str, float]:
    """Median milliseconds the oracle spends per batch on the trained stream (same ``L`` and capacity)."""
    a = setup.args
    stream = [b.sparse.fused_ids(setup.tables) for b in setup.batches]
    oracle = LookaheadOracle(setup.tables.total_rows, a.lookahead, a.cache_rows or None)
    times = []
    for ids in stream:
        t0 = time.perf_counter()
        oracle.push(ids)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    rest = oracle.finish()
    finish = time.perf_counter() - t0
    planned = times[a.lookahead :]  # pushes that emitted a plan (steady state)
    return {
        "oracle_ms_per_batch": 1000.0 * statistics.median(planned or times),
        "oracle_ms_per_batch_mean": 1000.0 * (sum(times) + finish) / max(1, len(times)),
        "oracle_planned_after_stream": float(len(rest)),
    }


# ---------------------------------------------------------------------- the suite
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the batches, run every contender ``--repeats`` times interleaved; JSON-ready figures."""
    names = _check(args)
    hidden = parse_int_list(args.hidden, "--hidden")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        # Lightning's DDP launcher (strategy="bagpipe" is a DDP strategy) resets torch's threads to the
        # core count unless OMP_NUM_THREADS is set
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`.*")
    t0 = time.perf_counter()
    trained = args.warmup + args.steps
    total = trained + args.lookahead + _QUEUE  # the oracle keeps planning through the timed window
    src = SyntheticCriteo(args.batch_size, total, scale=args.scale, zipf=args.zipf, seed=args.seed)
    setup = _Setup(args, src.tables, list(src), hidden)
    gen_seconds = time.perf_counter() - t0

    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    skipped: dict[str, str] = {}
    losses: dict[str, list[float]] = {}
    breakdowns: list[dict[str, float]] = []
    for _, name in interleaved(names, args.repeats):
        if name in skipped:
            continue
        gc.collect()
        fig = RUNNERS[name](setup)
        if "skipped" in fig:
            skipped[name] = fig["skipped"]
            print(f"bench train: skipping {name}: {fig['skipped']}")
            continue
        losses.setdefault(name, fig.pop("losses"))
        bd = fig.pop("breakdown", None)
        if bd:
            breakdowns.append(bd)
        runs[name].append(fig)
    contenders = {n: median_figures(r) for n, r in runs.items() if r}
    for n, reason in skipped.items():
        contenders[n] = {"skipped": reason}
    out: dict[str, Any] = {
        "suite": "train",
        "config": {
            **suite_config(args),
            "tables": len(setup.tables),
            "total_rows": setup.tables.total_rows,
            "batches_generated": total,
            "generate_seconds": gen_seconds,
        },
        "contenders": contenders,
        "ratios": {},
        "goals": {},
        "checks": {n: bool(f.get("loss_decreased")) for n, f in contenders.items() if "skipped" not in f},
        "machine": machine_info(),
    }
    bag = contenders.get("bagpipe", {})
    for other, o in contenders.items():
        if other == "bagpipe" or "samples_per_second" not in bag or "samples_per_second" not in o:
            continue
        ratio = bag["samples_per_second"] / o["samples_per_second"]
        out["ratios"][f"bagpipe_over_{other}"] = ratio
        if other in GOALS:  # (the extra contenders are reported, not judged)
            out["goals"][f"bagpipe_at_least_{GOALS[other]}x_{other}"] = ratio >= GOALS[other]
    if "bagpipe" in losses and "ideal" in losses:
        diffs = [abs(x - y) for x, y in zip(losses["bagpipe"], losses["ideal"])]
        out["checks"]["max_abs_loss_diff_vs_ideal"] = max(diffs) if diffs else None
    if breakdowns:
        out["bagpipe_breakdown_ms"] = {k: statistics.median(b[k] for b in breakdowns) for k in breakdowns[0]}
    if "samples_per_second" in bag:
        cost = oracle_cost(setup)
        out["oracle"] = {
            **cost,
            "fraction_of_bagpipe_step": cost["oracle_ms_per_batch"] / bag["median_step_ms"],
        }
    out["losses_per_step"] = losses
    if args.plot is not None:
        out["plot"] = str(args.plot)  # drawn by plot() once the JSON is written
    return out


def plot(out: dict[str, Any], path: Path) -> None:
    """Samples/s of every contender of :func:`run`'s figures and bagpipe's step breakdown."""
    plt = require_matplotlib()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    items = [(n, f) for n, f in out["contenders"].items() if "samples_per_second" in f]
    names = [n for n, _ in items]
    med = [f["samples_per_second"] for _, f in items]
    lo = [m - f["samples_per_second_min"] for m, (_, f) in zip(med, items)]
    hi = [f["samples_per_second_max"] - m for m, (_, f) in zip(med, items)]
    labels = [n.replace("_", "\n", 1) for n in names]  # floor_no_input_grad on two lines
    ax.bar(labels, med, yerr=[lo, hi], capsize=4, color=["C3" if n == "bagpipe" else "C0" for n in names])
    ax.set_ylabel("samples / s (median, min-max)")
    ax.set_title("DeepFM training throughput, one process")
    bd = out.get("bagpipe_breakdown_ms")
    if bd:
        bottom = 0.0
        for phase in StepBreakdown.PHASES:
            v = bd.get(f"{phase}_ms", 0.0)
            bx.bar(["bagpipe step"], [v], bottom=[bottom], label=f"{phase} {v:.1f} ms")
            bottom += v
        bx.bar(["background\n(wall time)"], [bd.get("background_fetch_ms", 0.0)], label="fetch (overlapped)")
        bx.bar(
            ["background\n(wall time)"],
            [bd.get("background_writeback_ms", 0.0)],
            bottom=[bd.get("background_fetch_ms", 0.0)],
            label="write-back (overlapped)",
        )
        bx.set_ylabel("ms per step (median)")
        bx.set_title("bagpipe step breakdown")
        bx.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_bagpipe.bench.train [--json PATH] ...``: ``lightning-bagpipe bench train``."""
    from lightning_bagpipe.cli import main as cli_main

    return cli_main(["bench", "train", *(argv or [])])


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
