"""BagpipeStrategy: Lightning training with BagPipe's lookahead embedding cache."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_bagpipe.data.batch import Batch, StepPlan
from lightning_bagpipe.embedding.cached import CachedEmbedding
from lightning_bagpipe.embedding.driver import CacheDriver, TotalStats

log = logging.getLogger(__name__)


class BagpipeStrategy(DDPStrategy):
    """Data-parallel training whose :class:`~lightning_bagpipe.CachedEmbedding` rows come from a cache.

    Dense parameters train as with DDP. Each training batch from a
    :class:`~lightning_bagpipe.BagpipeDataModule` carries the oracle's plan; the strategy makes the rows the
    step reads resident before ``training_step`` (while prefetching the next step's rows in the background),
    applies the sparse optimizer to the touched rows together with the dense optimizer step, writes rows
    back after their last use, and flushes the cache to the store before validation, before checkpoints
    and at the end of fit.

    On one process no ``DistributedDataParallel`` wrapper is used. Several processes (``devices > 1``)
    are not supported yet and raise a clear error.
    """

    strategy_name = "bagpipe"

    def __init__(self, *, log_stats: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log_stats = log_stats
        self._driver: CacheDriver | None = None
        self._failed = False
        self.cache_stats: TotalStats | None = None

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
        if self.world_size > 1:
            raise NotImplementedError(
                f"strategy='bagpipe' runs on one process for now (got world_size={self.world_size}); "
                "use devices=1 and num_nodes=1"
            )
        if trainer.state.fn == TrainerFn.FITTING and trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "strategy='bagpipe' does not support accumulate_grad_batches > 1: a cached row must be "
                "updated before it is written back; use a larger batch instead"
            )
        super().setup(trainer)
        self._failed = False
        assert self.lightning_module is not None
        modules = [m for m in self.lightning_module.modules() if isinstance(m, CachedEmbedding)]
        if trainer.state.fn == TrainerFn.FITTING and modules:
            self._driver = CacheDriver(modules)
            self.cache_stats = self._driver.total
            callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
            if self.log_stats and not any(isinstance(c, _CacheStatsLogger) for c in callbacks):
                callbacks.append(_CacheStatsLogger())

    @override
    def configure_ddp(self) -> None:
        if self.world_size == 1:
            return  # one process: nothing to all-reduce, keep the plain module
        super().configure_ddp()

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._failed = True
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        driver, self._driver = self._driver, None
        if driver is not None:
            # After a failure the cache holds only completed steps' updates (the sparse update is applied
            # at the end of a step), so flushing leaves the store consistent with the last good step.
            try:
                driver.close(flush=True)
            except Exception as err:
                if not self._failed:
                    raise
                rank_zero_warn(f"bagpipe: could not flush the cache after the failure above: {err!r}")
        super().teardown()

    # ------------------------------------------------------------------ the training step
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self._driver is None:
            return
        plan = _find_plan(batch)
        if plan is None:
            raise ValueError(
                "strategy='bagpipe' trains CachedEmbedding rows from the cache plan that BagpipeDataModule "
                "attaches to each training batch; this batch has none. Feed training data through a "
                "BagpipeDataModule (or its train_dataloader())"
            )
        self._driver.before_step(plan)

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | Module | None = None,
        **kwargs: Any,
    ) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._driver is not None:
            assert self.lightning_module is not None
            self._driver.after_update(self.lightning_module.trainer.global_step)
        return out

    # ------------------------------------------------------------------ keeping the store current
    def _sync_store(self) -> None:
        if self._driver is not None:
            self._driver.sync_store()

    @override
    def on_validation_start(self) -> None:
        self._sync_store()
        super().on_validation_start()

    @override
    def on_test_start(self) -> None:
        self._sync_store()
        super().on_test_start()

    @override
    def on_predict_start(self) -> None:
        self._sync_store()
        super().on_predict_start()

    @override
    def on_train_end(self) -> None:
        if self._driver is not None:
            self._driver.sync_store(durable=True)
        super().on_train_end()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        # the first call of a checkpoint save: flush so the saved tables hold every update
        if self._driver is not None:
            self._driver.sync_store(durable=True)
        return super().lightning_module_state_dict()


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


class _CacheStatsLogger(Callback):
    """Logs the cache figures of each step through Lightning's logging (progress bar and loggers)."""

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy, BagpipeStrategy) or strategy.driver is None:
            return
        s = strategy.driver.last
        bs = _batch_size(batch)
        pl_module.log("bagpipe/hit_rate", s.hit_rate, on_step=True, prog_bar=True, batch_size=bs)
        pl_module.log_dict(
            {
                "bagpipe/rows_fetched": float(s.rows_fetched),
                "bagpipe/rows_written_back": float(s.rows_written_back),
                "bagpipe/fetch_wait_ms": s.wait_ms,
            },
            on_step=True,
            batch_size=bs,
        )


def _batch_size(batch: Any) -> int:
    return batch.batch_size if isinstance(batch, Batch) else 1
