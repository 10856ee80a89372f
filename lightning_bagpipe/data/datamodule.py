"""BagpipeDataModule: the user says where global batches come from; the module does the rest."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from lightning_bagpipe.arguments import integer
from lightning_bagpipe.data.batch import Batch
from lightning_bagpipe.data.loader import BagpipeLoader, EvalLoader, SourceFn
from lightning_bagpipe.oracle.partition import SYNC_MODES
from lightning_bagpipe.tables import Tables, TableSpec


def trained_batches(trainer: pl.Trainer | None) -> int | None:
    """How many of the current epoch's training batches ``trainer`` has finished; None outside a fit.

    Lightning's own count (the batches whose training step ran to its end), which is where Lightning
    resumes the epoch from a checkpoint, so the loader resumes at the same batch.
    """
    if trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return None
    progress: Any = trainer.fit_loop.epoch_loop.batch_progress.current  # (a _ProcessedTracker)
    return int(progress.processed)


def epoch_batches(trainer: pl.Trainer | None) -> float:
    """How many batches ``trainer`` trains per epoch (``limit_train_batches`` applied); inf when unknown."""
    if trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return float("inf")
    return float(trainer.num_training_batches)


def accumulated_batches(trainer: pl.Trainer | None) -> int:
    """How many batches ``trainer`` accumulates per optimizer step now; 1 outside a fit.

    Read when an epoch's first batch is asked for: a ``GradientAccumulationScheduler`` has set the value
    for the epoch by then, and an epoch resumed mid-way (which never calls the scheduler) keeps the value
    Lightning really uses.
    """
    if trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return 1
    return int(trainer.accumulate_grad_batches)


class BagpipeDataModule(pl.LightningDataModule):
    """A LightningDataModule whose training loader runs the BagPipe oracle.

    Subclass it and implement :meth:`train_source`: an iterable of **global** :class:`Batch` objects in
    training order (every rank sees the same stream; each trains its slice of every global batch).
    Optionally implement :meth:`val_source`, :meth:`test_source` and :meth:`predict_source`.

    Args:
        tables: one table per sparse feature, in feature order.
        batch_size: the global batch size (what the source yields; each of ``R`` ranks trains ``B / R``).
        lookahead: ``L``, how many steps the oracle looks ahead (batches; with gradient accumulation, the
            ``accumulate_grad_batches`` batches of each optimizer step count as one). Larger ``L`` keeps
            rows resident across longer reuse gaps (fewer fetches) at the cost of more batches buffered in
            the loader.
        cache_rows: cache capacity in rows (slots) per :class:`~lightning_bagpipe.CachedEmbedding`;
            ``None`` lets the cache grow to whatever the oracle needs.
        queue_batches: planned batches buffered between the oracle thread and training.
        prefetch_depth: ``D``, how many steps before it a step's rows are fetched (at most ``L``). ``1``
            fetches step ``t+1``'s rows while step ``t`` computes; a larger ``D`` also reads the rows of
            step ``t+D`` into host memory then, so a store whose latency exceeds a step's compute (a remote
            or sharded store) still never makes a step wait. Rows a capacity eviction could change before
            their step are fetched at ``D = 1`` instead. Costs ``D - 1`` steps of fetched rows in host
            memory and ``D`` more batches held by the loader.
        sync: how several ranks keep cached rows consistent. ``"partitioned"`` (LRPP, the default): rows
            one rank uses and does not reuse soon stay on that rank, the others' gradients are summed by
            the cheaper of an all-reduce and an exchange (``docs/architecture.md``). ``"replicated"``:
            the full-replication baseline, every row of the step all-reduced every step (for benchmarks;
            same results, more bytes).
    """

    def __init__(
        self,
        tables: Tables | Iterable[TableSpec | tuple[str, int]],
        *,
        batch_size: int,
        lookahead: int = 64,
        cache_rows: int | None = None,
        queue_batches: int = 4,
        sync: Literal["partitioned", "replicated"] = "partitioned",
        prefetch_depth: int = 4,
    ) -> None:
        super().__init__()
        self.batch_size = integer("batch_size", batch_size, minimum=1)
        self.lookahead = integer("lookahead", lookahead, minimum=1)
        self.cache_rows = None if cache_rows is None else integer("cache_rows", cache_rows, minimum=1)
        self.queue_batches = integer("queue_batches", queue_batches, minimum=1)
        self.prefetch_depth = integer("prefetch_depth", prefetch_depth, minimum=1)
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        self.tables = Tables.coerce(tables)
        self.sync = sync
        self._train_loader: BagpipeLoader | None = None
        self._pending_state: dict[str, Any] | None = None
        for stage in ("val", "test", "predict"):
            if getattr(type(self), f"{stage}_source") is getattr(BagpipeDataModule, f"{stage}_source"):
                # No source: show Lightning the stock (not overridden) hook, so it sees no such loader
                # instead of warning about an empty one.
                stock = getattr(pl.LightningDataModule, f"{stage}_dataloader")
                setattr(self, f"{stage}_dataloader", stock.__get__(self))

    # ------------------------------------------------------------------ what users override
    def train_source(self) -> Iterable[Batch]:
        """Global training batches in training order. Must be overridden."""
        raise NotImplementedError(f"{type(self).__name__} must implement train_source()")

    def val_source(self) -> Iterable[Batch] | None:
        """Global validation batches, or ``None`` for no validation."""
        return None

    def test_source(self) -> Iterable[Batch] | None:
        return None

    def predict_source(self) -> Iterable[Batch] | None:
        return None

    def __str__(self) -> str:
        # (Lightning's own describes the datasets behind its loaders by iterating them: a BagpipeLoader
        # would start an oracle and hand out batches, not datasets)
        cache = "as needed" if self.cache_rows is None else self.cache_rows
        return (
            f"{type(self).__name__}({self.tables!r}, batch_size={self.batch_size}, "
            f"lookahead={self.lookahead}, cache_rows={cache}, sync={self.sync!r})"
        )

    # ------------------------------------------------------------------ Lightning hooks
    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> BagpipeLoader:
        rank, world = self._rank()
        if world > 1 and self.batch_size % world:
            small = self.batch_size // world
            rank_zero_warn(
                f"batch_size={self.batch_size} does not divide over {world} ranks: their slices hold {small} "
                f"and {small + 1} samples, and as with DDP each rank's mean loss counts the same, so "
                "training equals one process only when the slices are equal. Choose a batch size divisible "
                "by the number of ranks"
            )
        if self._train_loader is not None:
            self._train_loader.close()
        loader = BagpipeLoader(
            self.train_source,
            self.tables,
            lookahead=self.lookahead,
            cache_rows=self.cache_rows,
            rank=rank,
            world_size=world,
            queue_batches=self.queue_batches,
            sync=self.sync,
            prefetch_depth=self.prefetch_depth,
        )
        loader.progress = lambda: trained_batches(self.trainer)
        loader.accumulation = lambda: accumulated_batches(self.trainer)
        loader.epoch_length = lambda: epoch_batches(self.trainer)
        if self._pending_state is not None:
            loader.load_state_dict(self._pending_state)
            self._pending_state = None
        self._train_loader = loader
        return loader

    def _eval_loader(self, name: str, fn: SourceFn) -> EvalLoader:
        if fn() is None:
            raise NotImplementedError(f"{type(self).__name__} has no {name}_source()")
        rank, world = self._rank()
        return EvalLoader(lambda: fn() or (), self.tables, rank, world, name)

    def setup(self, stage: str) -> None:
        """Without validation data (:meth:`val_source` returns None), Lightning is shown no validation
        loader at all, rather than an empty one it warns about ("Total length ... is zero")."""
        if not type(self).val_dataloader.__module__.startswith("lightning_bagpipe."):
            return  # a val_dataloader of the user's own: theirs to decide
        if self.val_source() is None:
            self.val_dataloader = pl.LightningDataModule.val_dataloader.__get__(self)  # type: ignore[method-assign]
        else:
            self.__dict__.pop("val_dataloader", None)  # (validation data again: the class's loader)

    def val_dataloader(self) -> Any:
        if self.val_source() is None:
            return []
        return self._eval_loader("val", self.val_source)  # type: ignore[arg-type]

    def test_dataloader(self) -> EvalLoader:
        return self._eval_loader("test", self.test_source)  # type: ignore[arg-type]

    def predict_dataloader(self) -> EvalLoader:
        return self._eval_loader("predict", self.predict_source)  # type: ignore[arg-type]

    def teardown(self, stage: str) -> None:
        if self._train_loader is not None:
            self._train_loader.close()

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (batches handed out this epoch) for exact resume."""
        if self._train_loader is None:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train_loader")
        if state is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._pending_state = dict(state)
