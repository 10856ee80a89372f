"""BagpipeStrategy: Lightning training with BagPipe's lookahead embedding cache."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_bagpipe.arguments import non_negative
from lightning_bagpipe.data.batch import Batch, StepPlan
from lightning_bagpipe.data.datamodule import accumulated_batches, epoch_batches, trained_batches
from lightning_bagpipe.data.loader import BagpipeLoader, EvalLoader
from lightning_bagpipe.embedding.cached import CachedEmbedding
from lightning_bagpipe.embedding.distributed import RankGroups, shard_store, share_store, store_place
from lightning_bagpipe.embedding.driver import CacheDriver, TotalStats
from lightning_bagpipe.embedding.store import EmbeddingStore
from lightning_bagpipe.embedding.tiered_store import TieredStore
from lightning_bagpipe.strategies.checkpointing import (
    AtomicCheckpointIO,
    RngSnapshot,
    add_bagpipe_section,
    restore_rng_states,
    rng_snapshot,
    written_rows_only,
)
from lightning_bagpipe.strategies.sharded_checkpoint import (
    Comm,
    LocalComm,
    WorldComm,
    load_bagpipe_checkpoint,
    rows_left_out,
    save_sharded_checkpoint,
)

log = logging.getLogger(__name__)


class BagpipeStrategy(DDPStrategy):
    """Data-parallel training whose :class:`~lightning_bagpipe.CachedEmbedding` rows come from a cache.

    Dense parameters train as with DDP. Each training batch from a
    :class:`~lightning_bagpipe.BagpipeDataModule` carries the oracle's plan; the strategy makes the rows the
    step reads resident before ``training_step`` (while prefetching the next step's rows in the background),
    applies the sparse optimizer to the touched rows together with the dense optimizer step, writes rows
    back after their last use, and flushes the cache to the store before validation, before checkpoints
    and at the end of fit.

    On one process no process group and no ``DistributedDataParallel`` wrapper are used. With several
    processes (``devices > 1``, ``num_nodes > 1``) the cache is logically replicated and physically
    partitioned (see ``docs/architecture.md``): ``store="shared"`` (one mapping per node, the default on one
    node) or ``store="sharded"`` (rows sharded over all-to-all, the default on several nodes or for a
    ``TieredStore``, which cannot be shared).
    ``prefetch=False`` fetches each step's rows at its start (a baseline for benchmarks) and
    ``io_delay_ms`` emulates a remote store. ``defer_sync`` (default on) lets replicated rows that the next
    step does not read finish their gradient sync one step late, overlapping the next step's compute;
    ``False`` syncs every replicated row within its step.

    Checkpoints are a directory (a shard per rank) on several processes. On one process
    ``checkpoint_layout="auto"`` saves one file, unless that file would hold more than
    :attr:`AUTO_DIRECTORY_BYTES` of rows copied into memory from a lazily initialised ``TieredStore``
    (its written rows): then a directory, whose shards are written from the store a chunk at a time.
    ``"file"`` and ``"directory"`` choose one layout always (``docs/checkpoints.md``).
    """

    #: On one process, ``checkpoint_layout="auto"`` saves a directory instead of a file when the file would
    #: hold more than this many bytes of rows that must first be read into memory (the written rows of a
    #: lazily initialised ``TieredStore``; a RAM store's table is saved from where it is).
    AUTO_DIRECTORY_BYTES = 256 * 2**20

    strategy_name = "bagpipe"

    def __init__(
        self,
        *,
        store: Literal["auto", "shared", "sharded"] = "auto",
        prefetch: bool = True,
        io_delay_ms: float = 0.0,
        log_stats: bool = True,
        defer_sync: bool = True,
        checkpoint_layout: Literal["auto", "file", "directory"] = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if store not in ("auto", "shared", "sharded"):
            raise ValueError(f"store must be 'auto', 'shared' or 'sharded', got {store!r}")
        if checkpoint_layout not in ("auto", "file", "directory"):
            raise ValueError(
                f"checkpoint_layout must be 'auto' (a directory on several processes; on one, a file unless "
                f"it would hold too many rows copied into memory), 'file' (on one process) or 'directory', "
                f"got {checkpoint_layout!r}"
            )
        self.checkpoint_layout = checkpoint_layout
        self._save_as_directory: bool | None = None  # decided with the state dict of the save under way
        self._told_directory = False
        self.store_mode = store
        self.prefetch = prefetch
        self.io_delay_ms = non_negative("io_delay_ms", io_delay_ms)
        self.log_stats = log_stats
        self.defer_sync = defer_sync
        self._store_restore: list[tuple[CachedEmbedding, EmbeddingStore, Callable[[bool], None]]] = []
        self._driver: CacheDriver | None = None
        self._failed = False
        self.cache_stats: TotalStats | None = None
        self._resume_section: dict[str, Any] | None = None
        self._stream_checked: tuple[int, int] | None = None  # the last step whose batches ranks compared
        self._stream_sized = True  # the training source has a length (else: compared at every step)
        self._step_rng: RngSnapshot | None = None

    # ------------------------------------------------------------------ registration
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(
                cls.strategy_name,
                cls,
                description="BagPipe lookahead embedding cache (lightning-bagpipe)",
            )

    # ------------------------------------------------------------------ set-up and teardown
    @property
    def driver(self) -> CacheDriver | None:
        """The cache driver of the current fit (``None`` outside fit or without CachedEmbedding)."""
        return self._driver

    # ``cache_stats`` (a :class:`~lightning_bagpipe.embedding.driver.TotalStats`) keeps the figures of the
    # last fit after teardown: steps, hit rate, rows fetched / written back / evicted, fetch wait.

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if self.world_size == 1:
            # one process: the plain Strategy set-up (no DDP wrapper, no collectives, no process group)
            super(DDPStrategy, self).setup(trainer)
        else:
            super().setup(trainer)
        self._failed = False
        assert self.lightning_module is not None
        modules = [m for m in self.lightning_module.modules() if isinstance(m, CachedEmbedding)]
        if trainer.state.fn == TrainerFn.FITTING and modules:
            _refuse_weight_averaging(trainer)
            groups = self._distribute(modules) if self.world_size > 1 else None
            self._driver = CacheDriver(
                modules,
                groups,
                prefetch=self.prefetch,
                io_delay_s=self.io_delay_ms / 1e3,
                defer_sync=self.defer_sync,
            )
            self.cache_stats = self._driver.total
            if modules[0].cache_device.type == "cpu" and not any(k in os.environ for k in _OPENMP_WAIT):
                rank_zero_info(
                    "bagpipe: training on CPU. Starting Python with GOMP_SPINCOUNT=10000 leaves the cache's "
                    "background threads more of the CPU (10-15% faster in docs/benchmarks.md; the examples "
                    "set it). It has no effect once torch is imported."
                )
            callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
            if self.log_stats and not any(isinstance(c, _CacheStatsLogger) for c in callbacks):
                callbacks.append(_CacheStatsLogger())

    def _distribute(self, modules: list[CachedEmbedding]) -> RankGroups:
        """Process groups of the cache, config checks across ranks, and one store view for all ranks."""
        backend = "nccl" if modules[0].cache_device.type == "cuda" else "gloo"
        groups = RankGroups(
            rank=self.global_rank,
            world_size=self.world_size,
            grads=dist.new_group(backend=backend, timeout=self._timeout),
            store=dist.new_group(backend="gloo", timeout=self._timeout),
        )
        mode = self.store_mode
        if mode == "auto":  # (a TieredStore keeps rows in its process's RAM: it cannot be shared)
            tiered = any(isinstance(m.store, TieredStore) for m in modules)
            mode = "sharded" if self.num_nodes > 1 or tiered else "shared"
        mine = [_module_config(m) for m in modules]
        places = [store_place(m.store) for m in modules]
        every = groups.all_gather_object((mine, places))
        for r, (theirs, _) in enumerate(every):
            if theirs != mine:
                diff = (
                    "; ".join(
                        f"module {i} {field}: {a!r} vs {b!r}"
                        for i, (ours, other) in enumerate(zip(mine, theirs))
                        for field, a, b in zip(_CONFIG_FIELDS, ours, other)
                        if a != b
                    )
                    or f"{len(theirs)} modules vs {len(mine)}"
                )
                raise ValueError(
                    f"rank {r}'s CachedEmbedding modules differ from rank {self.global_rank}'s ({diff}): "
                    "every rank must build the same model"
                )
        for r, (_, theirs) in enumerate(every):
            for ours, other in zip(places, theirs):
                if ours and other and ours[:2] == other[:2] and ours[2:] != other[2:]:
                    raise ValueError(
                        f"rank {r} and rank {self.global_rank} opened different files at {ours[1]}: it was "
                        "replaced while a rank had the old one open, so one rank would train other rows. "
                        "Under torchrun every rank starts at once: create or replace the store before the "
                        "ranks open it (Lightning's own launcher starts the other ranks once rank 0 has)"
                    )
        if mode == "shared" and len({str(p) for _, p in every}) > 1:  # not one store for every rank
            if self.store_mode == "shared":
                raise ValueError(
                    "store='shared' needs one store for every rank: the same file on one machine (or an "
                    f"in-RAM store, which rank 0 shares), but the ranks have {[p for _, p in every]}. Use "
                    "store='sharded' (each rank its own file) or give every rank the same path"
                )
            mode = "sharded"  # (auto: each rank's own file holds its shard)
        named = {id(m): n for n, m in self.lightning_module.named_modules()}  # type: ignore[union-attr]
        self._store_restore = []
        for m in modules:
            original = m.store
            if mode == "sharded":
                m.store, end = shard_store(original, groups)
            else:
                m.store, end = share_store(original, groups, named.get(id(m), "embedding"))
            self._store_restore.append((m, original, end))
        rank_zero_info(f"bagpipe: {self.world_size} ranks, {mode} store, LRPP cache sync")
        return groups

    def _undistribute(self, collective: bool = True) -> None:
        """Give each module its own store back (filled with the trained rows unless a rank failed)."""
        restore, self._store_restore = self._store_restore, []
        for m, original, end in restore:
            end(collective)
            m.store = original

    @override
    def setup_environment(self) -> None:
        if self.num_nodes * self.num_processes <= 1:
            # one process: no rendezvous (it would bind MASTER_PORT for nothing and clash with children)
            super(DDPStrategy, self).setup_environment()
            self.set_world_ranks()
            return
        super().setup_environment()

    @override
    @override
    def _setup_model(self, model: Module) -> Module:  # type: ignore[override]
        if self.world_size == 1:
            return model  # one process: nothing to all-reduce, keep the plain module
        _ignore_cache_buffers(model)
        return super()._setup_model(model)

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._failed = True
        super().on_exception(exception)

    @property
    def _trainer(self) -> pl.Trainer | None:
        return self.lightning_module.trainer if self.lightning_module is not None else None

    def _failing(self) -> bool:
        """Whether the run is ending on an exception (Lightning marks it interrupted before it calls the
        callbacks' ``on_exception``, and this strategy's last)."""
        trainer = self._trainer
        interrupted = trainer is not None and trainer.state.status == TrainerStatus.INTERRUPTED
        return self._failed or interrupted

    def _abandon_pipeline(self) -> None:
        """Stop the row executor and the loaders' threads without flushing (a failed run whose teardown
        Lightning skips)."""
        driver, self._driver = self._driver, None
        if driver is not None:
            driver.close(flush=False)
        trainer = self._trainer
        if trainer is not None:
            for loader in _library_loaders(trainer.train_dataloader):
                if isinstance(loader, BagpipeLoader):
                    loader.close()

    @override
    def teardown(self) -> None:
        self._resume_section = None
        self._step_rng = None
        driver, self._driver = self._driver, None
        if driver is not None:
            # After a failure the cache holds only completed steps' updates (the sparse update is applied
            # at the end of a step), so flushing leaves the store consistent with the last good step.
            try:
                # with several ranks, a failure elsewhere may have left peers gone: no collectives then
                alone = driver.groups is None
                driver.close(flush=alone or not self._failed, check=not self._failing())
                self._undistribute(collective=alone or not self._failed)
                if not alone and not self._failed:
                    assert driver.groups is not None
                    driver.groups.destroy()
            except Exception as err:
                if not self._failed:
                    raise
                rank_zero_warn(f"bagpipe: could not flush the cache after the failure above: {err!r}")
        super().teardown()

    # ------------------------------------------------------------------ the training step
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._step_rng = rng_snapshot()  # what a checkpoint saved during this step restores
        if self._driver is None:
            return
        plan = _find_plan(batch)
        if plan is None:
            raise ValueError(
                "strategy='bagpipe' trains CachedEmbedding rows from the cache plan that BagpipeDataModule "
                "attaches to each training batch; this batch has none. Feed training data through a "
                "BagpipeDataModule (or its train_dataloader())"
            )
        assert self.lightning_module is not None
        accumulate = self.lightning_module.trainer.accumulate_grad_batches
        if plan.accumulate != accumulate:
            raise ValueError(
                f"this batch was planned for accumulate_grad_batches={plan.accumulate} but the Trainer "
                f"accumulates {accumulate}: the cache keeps a step's rows from its first batch to its "
                "optimizer step, so the loader must group batches as Lightning does. Let the "
                "BagpipeDataModule or the strategy set the loader up (it reads the Trainer and a "
                "GradientAccumulationScheduler when an epoch starts), or change accumulate_grad_batches only "
                "between epochs"
            )
        self._check_same_stream(plan, batch_idx)
        self._driver.before_step(plan)

    #: On several ranks, every this many steps (and a stream's first) the ranks compare the checksums of
    #: the step's global batches (one all-gather of an int64 on the default process group). Sources of
    #: unknown length are compared at every step: the checksum says whether a step ends the stream, so
    #: ranks whose streams end at different steps are caught there (a sized source's length is compared
    #: when training starts).
    STREAM_CHECK_EVERY = 16

    def _check_same_stream(self, plan: StepPlan, batch_idx: int) -> None:
        """Refuse ranks that read different global batches: each rank trains its slice of the global batch,
        and every rank's oracle plans the global stream, so per-rank data (sharded like a plain DDP
        dataset, or shuffled with another seed) would train a wrong model silently or abort gloo."""
        groups = None if self._driver is None else self._driver.groups
        checked = self._stream_checked
        if groups is None or plan.key == checked:
            return
        first = checked is None or checked[0] != plan.key[0]  # (a resumed stream starts past step 0)
        if self._stream_sized and not first and plan.key[1] % self.STREAM_CHECK_EVERY:
            return
        self._stream_checked = plan.key
        # (on the default group, as DDP's own: the cache's store group carries the executor thread's
        # collectives, which a call from this thread would interleave with differently on each rank)
        mine = torch.tensor(plan.digest, dtype=torch.int64, device=self.root_device)
        digests = [int(d) for d in self.all_gather(mine).view(-1).tolist()]
        if len(set(digests)) > 1:
            differ = [r for r, d in enumerate(digests) if d != digests[0]]
            raise ValueError(
                f"rank(s) {differ} read other global batches than rank 0 at batch {batch_idx} of this epoch "
                "(or their stream ends at another step): with strategy='bagpipe' every rank reads the whole "
                "global stream (the loader takes each rank's slice of every batch, and every rank's oracle "
                "plans all of it). Do not shard the data per rank; return the same batches, in the same "
                "order, from train_source on every rank"
            )

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | Module | None = None,
        **kwargs: Any,
    ) -> Any:
        scaler = getattr(self.precision_plugin, "scaler", None)
        if self._driver is None or scaler is None or not scaler.is_enabled():
            out = super().optimizer_step(optimizer, closure, model, **kwargs)
            if self._driver is not None:
                assert self.lightning_module is not None
                self._driver.after_update(self.lightning_module.trainer.global_step)
            return out
        return self._scaled_optimizer_step(scaler, optimizer, closure, model, **kwargs)

    def _scaled_optimizer_step(
        self,
        scaler: torch.amp.GradScaler,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | Module | None,
        **kwargs: Any,
    ) -> Any:
        """An optimizer step under a loss-scaling precision (``"16-mixed"``): the rows' gradients are
        unscaled like the dense ones, and a step the scaler skips (non-finite gradients) skips the rows
        too. Non-finite row gradients skip the dense step as well, as they would with the rows among the
        optimizer's parameters (the check is one all-reduce on several processes)."""
        assert self._driver is not None and self.lightning_module is not None
        driver = self._driver
        scale = float(scaler.get_scale())  # (the backward ran with it; update() changes it afterwards)
        finite = True

        def checked_closure() -> Any:
            nonlocal finite
            result = closure()
            params = [p for group in optimizer.param_groups for p in group["params"]]
            dense = [p.grad for p in params if p.grad is not None]
            bad = torch.zeros((), device=self.root_device)
            for g in driver.pending_grads() + dense:
                values = g.coalesce().values() if g.is_sparse else g  # (an nn.Embedding(sparse=True)'s)
                bad += (~torch.isfinite(values)).any().to(bad.device, torch.float32)
            if self.world_size > 1:
                bad = self.reduce(bad, reduce_op="sum")
            finite = bool(bad.item() == 0)
            if not finite:  # the scaler then skips the dense step too (and backs off its scale)
                strided = [g for g in dense if not g.is_sparse]
                if strided:
                    strided[0].fill_(float("nan"))
                elif dense:
                    dense[0]._values().fill_(float("nan"))
            return result

        out = super().optimizer_step(optimizer, checked_closure, model, **kwargs)
        if finite:
            driver.after_update(self.lightning_module.trainer.global_step, grad_scale=scale)
        else:
            driver.skip_update()
        return out

    # ------------------------------------------------------------------ keeping the store current
    def _sync_store(self) -> None:
        if self._driver is not None:
            self._driver.sync_store()

    def _bind(self, loaders: Any) -> None:
        """Give the library's loaders in ``loaders`` (what the Trainer runs) this process's rank: one
        given to the Trainer directly was built before the ranks were known."""
        for loader in _library_loaders(loaders):
            loader.bind(self.global_rank, self.world_size)

    def _bind_evaluation(self, loaders: Any, stage: str) -> None:
        """:meth:`_bind`, refusing a training loader: its batches' cache lookups point into the plans of
        the training steps, which an evaluation does not run."""
        for loader in _library_loaders(loaders):
            if isinstance(loader, BagpipeLoader):
                raise ValueError(
                    f"a training loader (BagpipeLoader, from train_dataloader()) was given as a {stage} "
                    "loader: its batches carry cache plans for training steps. Give the data module a "
                    f"{stage}_source (its {stage}_dataloader() returns an EvalLoader), or pass an EvalLoader"
                )
        self._bind(loaders)

    @override
    def on_validation_start(self) -> None:
        self._sync_store()
        self._bind_evaluation(self.lightning_module.trainer.val_dataloaders, "val")  # type: ignore[union-attr]
        super().on_validation_start()

    @override
    def on_test_start(self) -> None:
        self._sync_store()
        self._bind_evaluation(self.lightning_module.trainer.test_dataloaders, "test")  # type: ignore[union-attr]
        super().on_test_start()

    @override
    def on_predict_start(self) -> None:
        self._sync_store()
        self._bind_evaluation(self.lightning_module.trainer.predict_dataloaders, "predict")  # type: ignore[union-attr]
        super().on_predict_start()

    @override
    def on_train_end(self) -> None:
        if self._driver is not None:
            self._driver.sync_store(durable=True)
        super().on_train_end()

    # ------------------------------------------------------------------ checkpoints and resume
    @property
    @override
    def checkpoint_io(self) -> CheckpointIO:
        """Atomic saves by default (temporary name, fsync, rename); a user's CheckpointIO is kept."""
        if self._checkpoint_io is None:
            self._checkpoint_io = AtomicCheckpointIO()
        elif (
            isinstance(self._checkpoint_io, _WrappingCheckpointIO)
            and self._checkpoint_io.checkpoint_io is None
        ):
            self._checkpoint_io.checkpoint_io = AtomicCheckpointIO()
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO | None) -> None:
        self._checkpoint_io = io

    def _cached_modules(self) -> dict[str, CachedEmbedding]:
        if self.lightning_module is None:
            return {}
        return {n: m for n, m in self.lightning_module.named_modules() if isinstance(m, CachedEmbedding)}

    def _checkpoint_comm(self) -> Comm:
        """The ranks a checkpoint is saved and loaded by (torch.distributed's default group)."""
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            return WorldComm(self.global_rank, self.world_size)
        return LocalComm()

    def _directory_checkpoints(self) -> bool:
        if self.world_size > 1 or self.checkpoint_layout == "directory":
            return True
        if self.checkpoint_layout == "file":
            return False
        copied = sum(_rows_copied_bytes(m) for m in self._cached_modules().values())
        if copied <= self.AUTO_DIRECTORY_BYTES:
            return False
        if not self._told_directory:
            self._told_directory = True
            rank_zero_info(
                f"bagpipe: saving checkpoints as directories: a single file would first read up to "
                f"{copied / 2**30:.2f} GiB of written TieredStore rows into memory (more than "
                f"BagpipeStrategy.AUTO_DIRECTORY_BYTES, {self.AUTO_DIRECTORY_BYTES / 2**20:.0f} MiB); a "
                "directory's shards are written a chunk at a time. checkpoint_layout='file' insists on a file"
            )
        return True

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        # one file through checkpoint_io, or a directory, each rank writing its shard
        directory, self._save_as_directory = self._save_as_directory, None
        rng = self._checkpoint_rng()
        if not (self._directory_checkpoints() if directory is None else directory):
            add_bagpipe_section(checkpoint, self._cached_modules(), rng=rng)
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        if not isinstance(self.checkpoint_io, AtomicCheckpointIO):
            rank_zero_warn(
                f"bagpipe: multi-process checkpoints are directories written by every rank; the "
                f"{type(self.checkpoint_io).__name__} plugin is not used for them"
            )
        save_sharded_checkpoint(
            checkpoint, filepath, self._cached_modules(), self._checkpoint_comm(), storage_options, rng
        )

    def _checkpoint_rng(self) -> RngSnapshot | None:
        """The RNG states a checkpoint saves: those at the start of the training step under way, if any
        (the resumed run trains that step's batch again, so it must draw the same numbers), else None
        (the current ones)."""
        trainer = self._trainer
        if self._step_rng is None or trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return None
        progress: Any = trainer.fit_loop.epoch_loop.batch_progress.current  # (a _ProcessedTracker)
        return self._step_rng if progress.started > progress.processed else None

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        # a file or a directory, from any number of processes (the rows are re-sharded on load)
        trainer = self._trainer
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        if self._driver is not None:  # mid-fit (the learning-rate finder restoring its start)
            self._driver.discard_cache()
        checkpoint, section = load_bagpipe_checkpoint(
            self.checkpoint_io,
            checkpoint_path,
            weights_only,
            self._cached_modules(),
            self._checkpoint_comm(),
            resuming=fitting,
        )
        if fitting:
            self._resume_section = section  # RNG states are restored when training starts
            _complete_a_finished_epoch(checkpoint)
        return checkpoint

    @override
    def on_train_start(self) -> None:
        if self._driver is not None:
            idle = [m for m in self._driver.modules if not m.training]
            if idle:
                rank_zero_warn(
                    f"{len(idle)} CachedEmbedding module(s) are in eval mode at the start of training: their "
                    "rows are read from the store and not trained. Call model.train() before fit."
                )
        if self._driver is not None and self._driver.groups is not None:
            trainer = self.lightning_module.trainer  # type: ignore[union-attr]
            n = trainer.num_training_batches
            loaders = [
                ld for ld in _library_loaders(trainer.train_dataloader) if isinstance(ld, BagpipeLoader)
            ]
            # the sources' own lengths too: the oracle reads past limit_train_batches for its lookahead
            lengths = [
                None if x == float("inf") else int(x) for x in [n, *(ld._known_length() for ld in loaders)]
            ]
            mine = [(ld.lookahead, ld.cache_rows, ld.prefetch_depth, ld.sync) for ld in loaders]
            every = self._driver.groups.all_gather_object((lengths, mine))
            self._stream_sized = None not in lengths  # (else compared at every step: _check_same_stream)
            counts = [c for c, _ in every]
            if any(c != lengths for c in counts):
                raise ValueError(
                    f"the ranks' training sources yield different numbers of batches {counts} (per rank: "
                    "batches of the epoch, then the sources' own lengths); every rank must read the same "
                    "global stream"
                )
            for r, (_, theirs) in enumerate(every):
                if theirs != mine:
                    raise ValueError(
                        f"rank {r}'s training loader settings {theirs} differ from rank {self.global_rank}'s "
                        f"{mine} (lookahead, cache_rows, prefetch_depth, sync): every rank plans "
                        "the same global stream with the same oracle, so the data module must be configured "
                        "alike on every rank"
                    )
        if self.lightning_module is not None:
            trainer = self.lightning_module.trainer
            self._bind(trainer.train_dataloader)
            for loader in _library_loaders(trainer.train_dataloader):  # (also one given to fit() directly)
                if isinstance(loader, BagpipeLoader):
                    loader.progress = lambda: trained_batches(trainer)
                    loader.accumulation = lambda: accumulated_batches(trainer)
                    loader.epoch_length = lambda: epoch_batches(trainer)
        section, self._resume_section = self._resume_section, None
        if section is not None:
            restore_rng_states(section)
        super().on_train_start()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        # the first call of a checkpoint save: write the cache back so the saved tables hold every update.
        # Not durable: the checkpoint holds the rows, and a TieredStore would spill its buffer to the file
        # at every checkpoint (the end of fit still flushes every store).
        if self._driver is not None:
            try:
                self._driver.sync_store()
            except Exception:
                # a checkpoint saved on the exception (OnExceptionCheckpoint) after the row executor failed:
                # on one process the store was brought up to date without it, so the checkpoint holds the
                # last completed step; otherwise Lightning will not tear down after this error, so the
                # pipeline's threads are stopped here
                failing = self._failing()
                if not (failing and self._driver.recovered):
                    if failing:
                        self._abandon_pipeline()
                    raise
        self._save_as_directory = self._directory_checkpoints()  # (save_checkpoint follows with the same)
        if not self._save_as_directory:
            with written_rows_only(self._cached_modules().values()):  # not the whole of a lazy table
                return super().lightning_module_state_dict()
        with rows_left_out(self._cached_modules().values()):  # each rank saves its own shard instead
            return super().lightning_module_state_dict()


def _rows_copied_bytes(module: CachedEmbedding) -> int:
    """At most how many bytes of rows a single-file checkpoint copies into memory from ``module``'s store:
    the written rows of a lazily initialised ``TieredStore`` (other stores' tables are saved in place)."""
    store = module.store
    if not isinstance(store, TieredStore) or not store.metadata.get("lazy"):
        return 0
    return store.written_rows_bound() * (store.width * 4 + 8)


def _find_plan(batch: Any) -> StepPlan | None:
    if isinstance(batch, Batch):
        return batch.plan
    if isinstance(batch, (list, tuple)):
        items: list[Any] = list(batch)
    elif isinstance(batch, dict):
        items = list(batch.values())
    else:
        return None
    for item in items:
        if isinstance(item, Batch) and item.plan is not None:
            return item.plan
    return None


def _complete_a_finished_epoch(checkpoint: dict[str, Any]) -> None:
    """Count an epoch that a checkpoint saw finish (saved from ``on_train_epoch_end``: its last batch
    processed, the epoch not yet marked completed) as completed, as Lightning itself does on resume, but
    there only for epoch-based training: with ``max_steps`` set, Lightning 2.6 restarted "mid" the finished
    epoch, at an index past its last batch, took one more batch from the loader (the next epoch's first,
    as the loader had moved on) and then began another epoch, so a batch was trained twice and an epoch
    lost (a plain DataLoader is replayed the same way)."""
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not isinstance(loop, dict):
        return
    epochs = loop.get("epoch_progress", {})
    batches = loop.get("epoch_loop.batch_progress", {})
    cur = epochs.get("current", {})
    finished = (
        batches.get("is_last_batch") is True
        and cur.get("ready") == cur.get("started") == cur.get("processed")
        and cur.get("completed") == cur.get("processed", 0) - 1
    )
    if not finished:
        return
    for counts in (epochs.get("current", {}), epochs.get("total", {})):
        if "processed" in counts:
            counts["completed"] = counts["processed"]
    batches["current"] = {k: 0 for k in batches.get("current", {})}
    batches["is_last_batch"] = False
    # Lightning now starts the next epoch counting from 0, so the count a loader saved for the resume
    # that went on counting (a source without a length; see BagpipeLoader.state_dict) no longer applies
    positions = [*loop.get("state_dict", {}).get("combined_loader", [])]
    sections = [v for v in checkpoint.values() if isinstance(v, dict) and "train_loader" in v]
    positions += [v["train_loader"] for v in sections]
    for position in positions:
        if isinstance(position, dict):
            position.pop("counted", None)


def _refuse_weight_averaging(trainer: pl.Trainer) -> None:
    """Callbacks that average the model's parameters (SWA, EMA) would pair averaged dense layers with
    embedding rows that are not averaged: the rows are not parameters (they live in the cache and the
    store), and the averaged copy's store never changes, so its checkpoints hold the initial rows."""
    averaging: list[type] = [StochasticWeightAveraging]
    with contextlib.suppress(ImportError):  # (Lightning 2.6 and later)
        from lightning.pytorch.callbacks import WeightAveraging

        averaging.append(WeightAveraging)
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
    for c in callbacks:
        if isinstance(c, tuple(averaging)):
            raise ValueError(
                f"{type(c).__name__} averages the model's parameters, but CachedEmbedding rows are not "
                "parameters (they live in the cache and the store): the averaged model would pair averaged "
                "dense layers with rows that are not averaged, and its checkpoints would hold the initial "
                "rows. It is not supported with strategy='bagpipe'"
            )


_CONFIG_FIELDS = ("tables fingerprint", "dim", "optimizer", "seed", "rows", "width")


def _module_config(m: CachedEmbedding) -> tuple[Any, ...]:
    """What every rank's copy of a module must agree on (in the order of ``_CONFIG_FIELDS``)."""
    return (m.tables.fingerprint(), m.dim, m.optimizer.hparams(), m.seed, m.store.num_rows, m.store.width)


def _library_loaders(loaders: Any) -> list[BagpipeLoader | EvalLoader]:
    """The library's loaders in what the Trainer runs: a loader, or a list, tuple or dict of them."""
    if isinstance(loaders, (BagpipeLoader, EvalLoader)):
        return [loaders]
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return [found for item in loaders for found in _library_loaders(item)]
    return []


#: OpenMP settings that decide how long idle threads spin (a user who set one has chosen already).
_OPENMP_WAIT = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


class _CacheStatsLogger(Callback):
    """Logs the cache figures through Lightning's logging (progress bar and loggers).

    Once per ``Trainer(log_every_n_steps=n)`` steps, the figures of the steps since the last log:
    ``bagpipe/hit_rate`` over those steps' distinct rows, and per-step means of rows fetched, rows
    written back and fetch wait. (Each ``self.log`` call costs Lightning ~0.5 ms of Python, too much to
    spend four times per step when a step takes tens of milliseconds.)
    """

    def __init__(self) -> None:
        self._seen: tuple[int, int, int, int, int, float] | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy, BagpipeStrategy) or strategy.driver is None:
            return
        t = strategy.driver.total
        now = (t.steps, t.unique_rows, t.hits, t.rows_fetched, t.rows_written_back, t.wait_s)
        if self._seen is None or now[0] < self._seen[0]:  # a new fit: the driver's totals restarted
            self._seen = (0, 0, 0, 0, 0, 0.0)
        every = max(1, int(getattr(trainer, "log_every_n_steps", 50)))  # (set at runtime, not typed)
        if trainer.global_step % every and not trainer.should_stop:
            return
        steps, unique, hits, fetched, written, wait_s = (x - y for x, y in zip(now, self._seen))
        self._seen = now
        if steps <= 0:
            return
        bs = _batch_size(batch)
        pl_module.log("bagpipe/hit_rate", hits / unique if unique else 1.0, prog_bar=True, batch_size=bs)
        pl_module.log_dict(
            {
                "bagpipe/rows_fetched": fetched / steps,
                "bagpipe/rows_written_back": written / steps,
                "bagpipe/fetch_wait_ms": 1000.0 * wait_s / steps,
            },
            batch_size=bs,
        )


def _batch_size(batch: Any) -> int:
    return batch.batch_size if isinstance(batch, Batch) else 1


def _ignore_cache_buffers(model: Module) -> None:
    """Keep DDP away from every :class:`CachedEmbedding` buffer (device anchor, table offsets and sizes).

    They are constants, equal on every rank by construction, and DDP would otherwise broadcast them from
    rank 0 at the start of every forward pass: a collective per step, and a point where every rank waits
    for rank 0. The model's other buffers (batch-norm statistics, ...) are still broadcast as usual.
    """
    names = [
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if isinstance(module, CachedEmbedding)
        for name, _ in module.named_buffers(recurse=False)
    ]
    if names:  # (the documented workaround torch offers until it has a public API for this)
        previous = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
        ignore = list(dict.fromkeys(previous + names))  # (a second fit of the same model adds nothing)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
