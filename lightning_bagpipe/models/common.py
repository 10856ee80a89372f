"""Shared pieces of the ready-made click-through-rate models: an MLP builder and a LightningModule base.

:class:`ClickModel` holds everything DeepFM and DLRM have in common, so each model only defines its
layers and ``forward(batch) -> logits``:

* the loss (binary cross-entropy on logits), logged as ``train_loss`` (per step) and
  ``train_loss_epoch`` (sample-weighted mean over the epoch);
* evaluation metrics from ``torchmetrics``, accumulated over the whole epoch and logged once per epoch:
  ``val_auc`` / ``val_logloss`` and ``test_auc`` / ``test_logloss`` (exact ROC AUC and mean BCE);
* ``predict_step`` returning click probabilities;
* the dense optimizer (Adam or Adagrad over the ordinary ``nn.Parameter`` s; the embedding rows are not
  parameters and are trained by their own sparse optimizer under ``strategy="bagpipe"``);
* helpers that turn constructor arguments into plain types for ``save_hyperparameters``, so
  ``Model.load_from_checkpoint(path)`` works with torch's weights-only checkpoint loading.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC
from typing_extensions import Self

from lightning_bagpipe.data.batch import Batch
from lightning_bagpipe.embedding.store import EmbeddingStore, MemoryStore, MmapStore
from lightning_bagpipe.embedding.tiered_store import TieredStore
from lightning_bagpipe.optim.sparse import RowWiseAdagrad, SparseOptimizer, from_hparams
from lightning_bagpipe.strategies.sharded_checkpoint import (
    is_sharded_checkpoint,
    load_checkpoint_for_inference,
)
from lightning_bagpipe.tables import Tables, TableSpec

__all__ = [
    "DEFAULT_DENSE_LR",
    "DEFAULT_SPARSE_LR",
    "DENSE_OPTIMIZERS",
    "ClickModel",
    "DenseOptimizerName",
    "SparseOptimizerLike",
    "StoreLike",
    "TablesLike",
    "coerce_tables",
    "memory_store_for_loading",
    "mlp",
    "resolve_sparse_optimizer",
    "store_hparam",
]

DenseOptimizerName = Literal["adam", "adagrad"]
DENSE_OPTIMIZERS: tuple[str, ...] = ("adam", "adagrad")
#: Learning rates of the default optimizers (RowWiseAdagrad for the rows, Adam for the MLPs), tuned on the
#: synthetic Criteo-shaped data (``examples/``): 0.02 and 0.05 learn equally well there, 0.2 is worse.
DEFAULT_SPARSE_LR = 0.02
DEFAULT_DENSE_LR = 1e-3

TablesLike = Tables | Iterable[TableSpec | tuple[str, int] | Sequence[Any]]
SparseOptimizerLike = SparseOptimizer | Mapping[str, Any] | None
StoreLike = EmbeddingStore | str | Path | Callable[[int, int], EmbeddingStore] | None


def mlp(in_features: int, sizes: Sequence[int], *, last_activation: bool) -> nn.Sequential:
    """``Linear -> ReLU`` layers of widths ``sizes``; the last layer's ReLU only if ``last_activation``.

    ``sizes`` may be empty (an identity). Raises ValueError on a non-positive width, naming its position.
    """
    if int(in_features) < 1:
        raise ValueError(f"mlp: in_features must be >= 1, got {in_features}")
    layers: list[nn.Module] = []
    width = int(in_features)
    for i, size in enumerate(sizes):
        if isinstance(size, bool) or int(size) != size or int(size) < 1:
            raise ValueError(
                f"mlp: layer {i} width must be a positive integer, got {size!r} in {list(sizes)}"
            )
        layers.append(nn.Linear(width, int(size)))
        if last_activation or i < len(sizes) - 1:
            layers.append(nn.ReLU())
        width = int(size)
    return nn.Sequential(*layers)


def resolve_sparse_optimizer(spec: SparseOptimizerLike, default_lr: float) -> SparseOptimizer:
    """A sparse optimizer from an instance, its ``hparams()`` dict (from a checkpoint) or ``None``.

    ``None`` gives :class:`~lightning_bagpipe.optim.RowWiseAdagrad` with ``default_lr``.
    """
    if spec is None:
        return RowWiseAdagrad(lr=default_lr)
    if isinstance(spec, SparseOptimizer):
        return spec
    if isinstance(spec, Mapping):
        return from_hparams(dict(spec))
    raise TypeError(
        "sparse_optimizer must be a lightning_bagpipe.optim optimizer, its hparams() dict or None, "
        f"got {type(spec).__name__}"
    )


def store_hparam(store: StoreLike) -> str | None:
    """What to record for ``store`` in the hyper-parameters: a file store's path, else ``None`` (also for a
    store factory, whose path this cannot know).

    A checkpoint holds every table row, so a model rebuilt from it with ``store=None`` is complete; the
    path only tells where the original kept its tables: ``load_from_checkpoint`` loads into RAM unless
    given ``store=...`` (and then writes the checkpoint's rows into that store).
    """
    if store is None:
        return None
    if isinstance(store, (str, Path)):
        return str(store)
    if isinstance(store, MmapStore):
        return str(store.path)
    if isinstance(store, TieredStore):
        return str(store.file.path)
    if isinstance(store, EmbeddingStore) or callable(store):
        return None
    raise TypeError(
        f"store must be None, a path, an EmbeddingStore or a callable, got {type(store).__name__}"
    )


def memory_store_for_loading(num_rows: int, width: int) -> MemoryStore:
    """A RAM store for a model loaded from a checkpoint, refused (ValueError) when its tables would not fit
    in the memory available (``MemAvailable`` on Linux; unchecked elsewhere)."""
    need = num_rows * width * 4
    available = _memory_available()
    if available is not None and need > available:
        raise ValueError(
            f"loading the tables into RAM needs {need / 2**30:.1f} GiB ({num_rows:,} rows x {width} floats), "
            f"but {available / 2**30:.1f} GiB is available: load into a file instead, with "
            "load_from_checkpoint(path, store='tables.f32') (a memory-mapped file) or "
            "store=functools.partial(lightning_bagpipe.TieredStore, 'tables.f32') (only written rows on disk)"
        )
    return MemoryStore(num_rows, width)


def _memory_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def coerce_tables(tables: TablesLike) -> Tables:
    """:class:`Tables` from a ``Tables``, ``TableSpec`` s or ``[name, rows]`` pairs (as saved in hparams)."""
    if isinstance(tables, Tables):
        return tables
    specs: list[TableSpec] = []
    for i, t in enumerate(tables):
        if isinstance(t, TableSpec):
            specs.append(t)
        elif isinstance(t, (tuple, list)) and len(t) == 2:
            specs.append(TableSpec(str(t[0]), t[1]))  # (as Tables does; a row count must be whole)
        else:
            raise ValueError(f"tables[{i}] must be a TableSpec or a [name, rows] pair, got {t!r}")
    return Tables(specs)


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int, or a ValueError naming ``name`` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def int_list(values: Sequence[int], name: str, *, allow_empty: bool = True) -> list[int]:
    """``values`` as a list of positive ints (for layer widths), or a ValueError naming ``name``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of layer widths, got {values!r}")
    out = [positive_int(v, f"{name}[{i}]") for i, v in enumerate(values)]
    if not out and not allow_empty:
        raise ValueError(f"{name} needs at least one layer")
    return out


class ClickModel(pl.LightningModule):
    """Base LightningModule of click models: loss, metrics, prediction and the dense optimizer.

    Subclasses implement :meth:`forward` (``Batch -> [B]`` logits) and call ``save_hyperparameters``.

    Args:
        num_dense: dense features per sample (``batch.dense`` is ``[B, num_dense]``; 0 = none).
        dense_optimizer: ``"adam"`` or ``"adagrad"``, over the model's ``nn.Parameter`` s only.
        dense_lr: its learning rate.
    """

    def __init__(self, *, num_dense: int, dense_optimizer: DenseOptimizerName, dense_lr: float) -> None:
        super().__init__()
        if isinstance(num_dense, bool) or not isinstance(num_dense, int) or num_dense < 0:
            raise ValueError(f"num_dense must be an integer >= 0, got {num_dense!r}")
        if dense_optimizer not in DENSE_OPTIMIZERS:
            raise ValueError(
                f"dense_optimizer must be one of {list(DENSE_OPTIMIZERS)}, got {dense_optimizer!r}"
            )
        if (
            isinstance(dense_lr, bool)
            or not isinstance(dense_lr, (int, float))
            or not math.isfinite(dense_lr)
        ):
            raise ValueError(f"dense_lr must be a positive number, got {dense_lr!r}")
        if dense_lr <= 0:
            raise ValueError(f"dense_lr must be a positive number, got {dense_lr!r}")
        self.num_dense = int(num_dense)
        self.dense_optimizer_name: str = dense_optimizer
        self.dense_lr = float(dense_lr)
        self.train_loss_mean = MeanMetric()
        self.val_auc = BinaryAUROC()
        self.val_logloss = MeanMetric()
        self.test_auc = BinaryAUROC()
        self.test_logloss = MeanMetric()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Self:
        """Lightning's ``load_from_checkpoint``, with the tables in RAM unless ``store=`` says otherwise, and
        for directory checkpoints (several processes) too.

        The hyper-parameters name the file the model trained on. Loading into that file would overwrite
        the training run's tables with the checkpoint's rows (the run may still be training, or have
        trained past this checkpoint), so it is used only when passed as ``store=`` explicitly. Tables
        larger than the memory available are a ValueError asking for a file store instead.
        """
        kwargs.setdefault("store", memory_store_for_loading)
        if is_sharded_checkpoint(checkpoint_path):
            if hparams_file is not None:
                raise ValueError("hparams_file is not supported for directory checkpoints")
            return load_checkpoint_for_inference(
                cls, checkpoint_path, map_location=map_location, strict=strict is not False, **kwargs
            )
        return super().load_from_checkpoint(
            checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs
        )

    # ------------------------------------------------------------------ inputs
    def dense_input(self, batch: Batch) -> Tensor:
        """``batch.dense`` as float ``[B, num_dense]``; a ValueError if it is missing or mis-shaped."""
        b = batch.batch_size
        if batch.dense is None:
            if self.num_dense == 0:
                return torch.zeros(b, 0, device=self.device)
            raise ValueError(
                f"{type(self).__name__} expects {self.num_dense} dense features but batch.dense is None"
            )
        if batch.dense.dim() != 2 or tuple(batch.dense.shape) != (b, self.num_dense):
            raise ValueError(
                f"{type(self).__name__} expects batch.dense of shape [{b}, {self.num_dense}] "
                f"(batch size, num_dense), got {list(batch.dense.shape)}"
            )
        return batch.dense.to(torch.get_default_dtype())  # (float32, or what a "-true" precision sets)

    @staticmethod
    def labels_of(batch: Batch, stage: str) -> Tensor:
        """``batch.labels`` as float ``[B]`` (of the default dtype, as the logits); a ValueError if missing or
        mis-shaped."""
        if batch.labels is None:
            raise ValueError(f"{stage}: the batch has no labels (batch.labels is None)")
        if tuple(batch.labels.shape) != (batch.batch_size,):
            raise ValueError(
                f"{stage}: batch.labels must have shape [{batch.batch_size}], got {list(batch.labels.shape)}"
            )
        return batch.labels.to(torch.get_default_dtype())

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        labels = self.labels_of(batch, "training_step")
        loss = F.binary_cross_entropy_with_logits(self(batch), labels)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch.batch_size)
        # the epoch mean goes through a metric object, which syncs across ranks once, at epoch end; it is
        # logged there too (logging a metric object every step costs Lightning ~1.5 ms of Python per step)
        self.train_loss_mean.update(loss.detach(), weight=batch.batch_size)
        return loss

    def on_train_epoch_end(self) -> None:
        if self.train_loss_mean.update_count:
            # the metric object, not its value: Lightning computes it (a sync across ranks) and resets it,
            # and does not warn that a tensor logged per epoch is not synced
            self.log("train_loss_epoch", self.train_loss_mean)

    def _evaluate(self, batch: Batch, auc: BinaryAUROC, logloss: MeanMetric, prefix: str) -> None:
        labels = self.labels_of(batch, f"{prefix}_step")
        logits = self(batch)
        auc.update(logits.detach().sigmoid(), labels.long())
        logloss.update(F.binary_cross_entropy_with_logits(logits.detach(), labels, reduction="none"))
        # metric objects: Lightning computes them over the whole epoch, then resets them
        self.log(f"{prefix}_auc", auc, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{prefix}_logloss", logloss, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_auc, self.val_logloss, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_auc, self.test_logloss, "test")

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Click probabilities ``[B]``."""
        return torch.sigmoid(self(batch))

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.dense_optimizer_name == "adagrad":
            return torch.optim.Adagrad(params, lr=self.dense_lr)
        return torch.optim.Adam(params, lr=self.dense_lr)
