"""Small shared builders for the tests: tables, random global batches and a DataModule over a list."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

import lightning_bagpipe as lb


def small_tables(sizes: Iterable[int] = (40, 25, 35)) -> lb.Tables:
    return lb.Tables((f"f{i}", int(n)) for i, n in enumerate(sizes))


def random_batches(
    tables: lb.Tables,
    num_batches: int,
    batch_size: int,
    *,
    multi_hot: int = 1,
    min_bag: int = 1,
    num_dense: int = 3,
    zipf: float = 1.2,
    seed: int = 0,
    weighted: bool = False,
) -> list[lb.Batch]:
    """Skewed random global batches; bags of min_bag..multi_hot ids (one-hot when both are 1; 0 allows
    empty bags, a missing value)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_batches):
        lengths = rng.integers(min_bag, multi_hot + 1, size=(len(tables), batch_size))
        values = []
        for f, t in enumerate(tables):
            n = int(lengths[f].sum())
            ranks = rng.zipf(zipf, size=n) - 1
            values.append(np.minimum(ranks, t.num_embeddings - 1))
        ids = np.concatenate(values)
        weights = rng.uniform(0.1, 2.0, size=ids.size).astype(np.float32) if weighted else None
        sparse = lb.SparseFeatures.from_lengths(
            tables.names, torch.from_numpy(ids), torch.from_numpy(lengths.reshape(-1)), weights
        )
        dense = torch.from_numpy(rng.standard_normal((batch_size, num_dense)).astype(np.float32))
        labels = torch.from_numpy((rng.random(batch_size) < 0.3).astype(np.float32))
        out.append(lb.Batch(sparse=sparse, dense=dense, labels=labels))
    return out


class ListDataModule(lb.BagpipeDataModule):
    """A BagpipeDataModule over in-memory lists of global batches."""

    def __init__(
        self,
        tables: lb.Tables,
        batches: list[lb.Batch],
        val_batches: list[lb.Batch] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(tables, batch_size=batches[0].batch_size, **kwargs)  # type: ignore[arg-type]
        self.batches = batches
        self.val_batches = val_batches

    def train_source(self) -> list[lb.Batch]:
        return self.batches

    def val_source(self) -> list[lb.Batch] | None:
        return self.val_batches


class TinyModel(pl.LightningModule):
    """Embeddings of every feature + dense features -> linear head -> BCE."""

    def __init__(
        self,
        tables: lb.Tables,
        optimizer: lb.optim.SparseOptimizer | None = None,
        dim: int = 4,
        num_dense: int = 3,
        dense_lr: float = 0.05,
        store: object = None,
        pooling: str = "sum",
    ) -> None:
        super().__init__()
        self.emb = lb.CachedEmbedding(
            tables,
            dim=dim,
            optimizer=optimizer or lb.optim.SGD(lr=0.1),
            seed=7,
            store=store,  # type: ignore[arg-type]
            pooling=pooling,  # type: ignore[arg-type]
        )
        self.head = nn.Linear(len(tables) * dim + num_dense, 1)
        self.dense_lr = dense_lr

    def forward(self, batch: lb.Batch) -> torch.Tensor:
        e = self.emb(batch.sparse).flatten(1)
        return self.head(torch.cat([e, batch.dense], 1)).squeeze(1)

    def training_step(self, batch: lb.Batch, batch_idx: int) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self(batch), batch.labels)

    def validation_step(self, batch: lb.Batch, batch_idx: int) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(self(batch), batch.labels)
        self.log("val_loss", loss, batch_size=batch.batch_size)
        return loss

    def test_step(self, batch: lb.Batch, batch_idx: int) -> torch.Tensor:
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch: lb.Batch, batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=self.dense_lr)


def quiet_trainer(**kwargs: object) -> pl.Trainer:
    """A Trainer on CPU with bagpipe and no logger/checkpoint/progress output unless asked for."""
    defaults: dict[str, object] = {
        "strategy": "bagpipe",
        "accelerator": "cpu",
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    defaults.update(kwargs)
    return pl.Trainer(**defaults)  # type: ignore[arg-type]


def has_matplotlib() -> bool:
    """Whether the optional ``plot`` extra is installed (plot tests check the file only then)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


class SaveInsideStep(Callback):
    """Saves a checkpoint between backward and the optimizer step of step ``step`` (after the step's
    forward drew from every generator; on several ranks every rank saves, together)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
