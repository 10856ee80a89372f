"""Where a bagpipe step's time goes: the step-time breakdown of ``bench train`` and ``bench distributed``.

Measured with timers, no profiler, so the figures are those of a normal run: Lightning callbacks mark
batch start, backward start and end and the optimizer step; :class:`TimedDeepFM` marks
``training_step`` (the forward pass); wrappers time the sparse update and, with several ranks, the
cross-rank sync of cached rows on the training thread, and the fetches and write-backs on the executor
thread (overlapped with the step: reported beside it, as wall time of that thread).

Phases of the step, median milliseconds over the timed steps (``StepBreakdown.figures``):

* ``data``: from the end of the previous step to this one's start (loader queue, batch to device);
* ``plan_and_fetch_wait``: the strategy's pre-step work, waiting for the step's rows included
  (``fetch_wait`` is that wait alone);
* ``forward``, ``zero_grad``, ``backward`` (with several ranks, DDP's all-reduce of the dense gradients
  runs inside ``backward``);
* ``dense_optimizer``: the dense optimizer's step;
* ``cache_sync``: summing the gradients of replicated cached rows across ranks (LRPP), without the
  update itself (0 on one process);
* ``sparse_update``: the row-wise optimizer on the cached rows (training thread only; rows whose sync
  finishes one step late are updated by the executor);
* ``other``: the rest (Lightning's own work between the hooks).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_bagpipe.data.batch import Batch
from lightning_bagpipe.embedding.cached import CachedEmbedding
from lightning_bagpipe.models.deepfm import DeepFM
from lightning_bagpipe.strategies.bagpipe import BagpipeStrategy

__all__ = ["StepBreakdown", "TimedDeepFM"]


class TimedDeepFM(DeepFM):
    """DeepFM that marks the start and end of ``training_step`` (the forward pass) for the breakdown.

    Set ``marks`` to the dict given to :class:`StepBreakdown` before training.
    """

    marks: dict[str, float]

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        self.marks["fwd0"] = time.perf_counter()
        loss = super().training_step(batch, batch_idx)
        self.marks["fwd1"] = time.perf_counter()
        return loss


class StepBreakdown(Callback):
    """Per-step phase times of a bagpipe run (training thread) and the executor's busy time (background).

    ``wrap(model.embedding)`` before fit; steps up to ``warmup`` are not recorded.
    """

    PHASES = ("data", "plan_and_fetch_wait", "forward", "zero_grad", "backward", "dense_optimizer",
              "cache_sync", "sparse_update", "other")  # fmt: skip
    #: Phases timed on the training thread only.
    _TRAINING_THREAD = ("sparse_update", "cache_sync")

    def __init__(self, warmup: int, marks: dict[str, float]) -> None:
        self.warmup = warmup
        self.marks = marks
        self.rows: list[dict[str, float]] = []
        self.busy = {"fetch": 0.0, "writeback": 0.0, "sparse_update": 0.0, "cache_sync": 0.0}
        self._inside: dict[str, bool] = {}
        self._busy0 = dict(self.busy)
        self._prev_end: float | None = None
        self._thread = threading.current_thread()

    def wrap(self, emb: CachedEmbedding) -> None:
        """Time the module's fetches and write-backs (executor thread) and its sparse update."""
        for attr, key in (
            ("_load_rows", "fetch"),  # store -> cache
            ("_read_rows", "fetch"),  # store -> host, several steps early (prefetch_depth)
            ("_put_rows", "fetch"),  # host -> cache (also called by _load_rows: counted once)
            ("_store_rows", "writeback"),
            ("_update_rows", "sparse_update"),
        ):
            setattr(emb, attr, self._timed(getattr(emb, attr), key))

    def _timed(self, fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            if self._inside.get(key):  # a timed method called by another of the same phase
                return fn(*a, **k)
            if key in self._TRAINING_THREAD and threading.current_thread() is not self._thread:
                return fn(*a, **k)  # a late update on the executor: not part of the step
            self._inside[key] = True
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self._inside[key] = False
                self.busy[key] += time.perf_counter() - t0
                if key == "sparse_update":
                    self.marks.setdefault("sparse0", t0)
                elif key == "cache_sync":
                    self.marks.setdefault("sync0", t0)

        return call

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        driver = strategy.driver if isinstance(strategy, BagpipeStrategy) else None
        if driver is not None and driver.groups is not None:
            driver._sync_update = self._timed(driver._sync_update, "cache_sync")  # type: ignore[method-assign]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.marks.clear()
        self.marks["start"] = time.perf_counter()
        self._busy0 = dict(self.busy)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.marks["bwd0"] = time.perf_counter()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.marks["bwd1"] = time.perf_counter()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.marks["opt0"] = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        end = time.perf_counter()
        m = self.marks
        prev, self._prev_end = self._prev_end, end
        if trainer.global_step <= self.warmup or prev is None:
            return
        strategy = trainer.strategy
        wait = (
            strategy.driver.last.wait_ms / 1e3
            if isinstance(strategy, BagpipeStrategy) and strategy.driver
            else 0.0
        )
        delta = {k: self.busy[k] - self._busy0[k] for k in self.busy}
        # with several ranks the update runs inside the sync: the sync's own time excludes it
        embedded = delta["cache_sync"] if delta["cache_sync"] > 0 else delta["sparse_update"]
        first = min(m.get("sync0", end), m.get("sparse0", end))
        row = {
            "data": m["start"] - prev,
            "plan_and_fetch_wait": m["fwd0"] - m["start"],
            "fetch_wait": wait,
            "forward": m["fwd1"] - m["fwd0"],
            "zero_grad": m["bwd0"] - m["fwd1"],
            "backward": m["bwd1"] - m["bwd0"],
            "dense_optimizer": first - m["opt0"],
            "cache_sync": max(0.0, delta["cache_sync"] - delta["sparse_update"]),
            "sparse_update": delta["sparse_update"],
            "other": end - first - embedded + (m["opt0"] - m["bwd1"]),
            "background_fetch": delta["fetch"],
            "background_writeback": delta["writeback"],
            "step": end - prev,
        }
        self.rows.append(row)

    def figures(self) -> dict[str, float]:
        """Median milliseconds per step of every phase (``{phase}_ms``)."""
        if not self.rows:
            return {}
        return {f"{k}_ms": 1000.0 * statistics.median(r[k] for r in self.rows) for k in self.rows[0]}
