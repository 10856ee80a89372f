"""Gradient accumulation under strategy="bagpipe" in Lightning flows beyond a plain fit.

Each flow is run twice: with bagpipe, and either through the plain reference loop of test_exactness or
through plain Lightning with an uncached twin of the model (the full table as a dense parameter, SGD on
it, which is the sparse SGD's math on the rows a step touched). Both must train the same model.
"""

from __future__ import annotations

import argparse
import copy
import itertools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler, ModelCheckpoint
from torch import nn

import lightning_bagpipe as lb
from tests.helpers import ListDataModule, TinyModel, quiet_trainer, random_batches, small_tables
from tests.test_exactness import DENSE_LR, DIM, OPTIMIZERS, train_reference

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*outside strategy='bagpipe'.*:UserWarning",
    "ignore:.*callbacks used to create the checkpoint.*:UserWarning",
    "ignore:.*`training_step` returned `None`.*",
    "ignore:.*does not have many workers.*",
    "ignore:.*validation_step.*",
    "ignore:.*Total length of .* across ranks is zero.*:UserWarning",
)

TABLES = small_tables((60, 45, 35))
BATCH = 16


def _batches(n: int = 12, seed: int = 6) -> list[lb.Batch]:
    return random_batches(TABLES, n, BATCH, multi_hot=2, seed=seed)


def _model(opt: str = "sgd") -> TinyModel:
    torch.manual_seed(0)
    return TinyModel(TABLES, OPTIMIZERS[opt][0](), dense_lr=DENSE_LR)


def _dm(batches: list[lb.Batch], **kw: Any) -> ListDataModule:
    return ListDataModule(TABLES, batches, **({"lookahead": 4, "cache_rows": 110} | kw))


# ---------------------------------------------------------------------- the uncached twin in plain Lightning
class PlainTwin(pl.LightningModule):
    """TinyModel (sparse SGD, lr 0.1) without a cache: its initial table as an ``nn.Parameter``."""

    def __init__(self, cached: TinyModel) -> None:
        super().__init__()
        self.tables = cached.emb.tables
        self.table = nn.Parameter(cached.emb.store.tensor()[:, :DIM].clone())
        self.head = copy.deepcopy(cached.head)
        self.register_buffer("offsets", torch.as_tensor(self.tables.offsets), persistent=False)

    def forward(self, batch: lb.Batch) -> torch.Tensor:
        sp, n = batch.sparse, len(self.tables)
        key_of = torch.repeat_interleave(torch.arange(n), sp.lengths.view(n, -1).sum(1))
        ids = sp.values + self.offsets[key_of]
        e = F.embedding_bag(ids, self.table, sp.offsets[:-1], mode="sum").view(n, -1, DIM).transpose(0, 1)
        return self.head(torch.cat([e.flatten(1), batch.dense], 1)).squeeze(1)

    def training_step(self, batch: lb.Batch, batch_idx: int) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self(batch), batch.labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": self.head.parameters(), "lr": DENSE_LR}, {"params": [self.table], "lr": 0.1}]
        return torch.optim.SGD(groups)


class ResumableList:
    """A plain training loader over a list that Lightning resumes mid-epoch (as the BagpipeLoader does:
    at the first batch the checkpointed run had not trained)."""

    def __init__(self, items: list[lb.Batch], trainer: pl.Trainer) -> None:
        self.items, self.trainer, self.start = items, trainer, 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        start, self.start = self.start, 0
        return iter(self.items[start:])

    def state_dict(self) -> dict[str, int]:
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"start": done if done < len(self.items) else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = state["start"]


class PlainData(pl.LightningDataModule):
    def __init__(self, batches: list[lb.Batch]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> ResumableList:
        return ResumableList(self.batches, self.trainer)


def _plain_trainer(**kw: Any) -> pl.Trainer:
    """The quiet Trainer of the bagpipe runs, with Lightning's own strategy (for the uncached twin)."""
    return quiet_trainer(**({"strategy": "auto"} | kw))


def _reference(batches: list[lb.Batch], accumulate: list[int]) -> tuple[torch.Tensor, ...]:
    """The plain loop of test_exactness (row-wise Adagrad, float64) for ``_model("rowwise_adagrad")``,
    one epoch of ``batches`` per entry of ``accumulate``."""
    hp = OPTIMIZERS["rowwise_adagrad"][1]
    return train_reference(
        _model("rowwise_adagrad"), batches, "rowwise_adagrad", hp, dtype=torch.float64, accumulate=accumulate
    )


def _assert_like_twin(model: TinyModel, twin: PlainTwin) -> None:
    trained = model.emb.store.tensor()[:, :DIM]
    assert torch.allclose(trained, twin.table.detach(), atol=1e-6, rtol=0), (trained - twin.table).abs().max()
    for p, q in zip(model.head.parameters(), twin.head.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)


def _assert_like_reference(model: TinyModel, ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    table, state, head = ref
    trained = model.emb.store.tensor().double()
    assert torch.allclose(trained[:, :DIM], table, atol=1e-6, rtol=0), (trained[:, :DIM] - table).abs().max()
    assert torch.allclose(trained[:, DIM:], state, atol=1e-6, rtol=0)
    for p, q in zip(model.head.parameters(), head.parameters()):
        assert torch.allclose(p.double(), q, atol=1e-6, rtol=0)


class SaveAtBatchEnd(Callback):
    """Saves a checkpoint at the end of batch ``batch_idx`` of epoch 0 (what a time-based ModelCheckpoint
    does when its interval elapses there)."""

    def __init__(self, batch_idx: int, path: Path) -> None:
        self.batch_idx, self.path = batch_idx, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 0 and batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)


# ---------------------------------------------------------------------- flows that work (regressions)
def test_validation_between_the_batches_of_a_group_changes_nothing() -> None:
    # val_check_interval=4 with k=3: validation runs after batches 4 and 8 of each epoch, inside groups
    batches, val = _batches(), _batches(3, seed=99)
    model = _model("rowwise_adagrad")
    ref = _reference(batches, [3, 3])
    where: list[int] = []

    class Where(Callback):
        def on_validation_start(self, trainer, pl_module) -> None:
            where.append(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    trainer = quiet_trainer(
        accumulate_grad_batches=3,
        val_check_interval=4,
        max_epochs=2,
        num_sanity_val_steps=0,
        callbacks=[Where()],
    )
    trainer.fit(model, datamodule=ListDataModule(TABLES, batches, val, lookahead=4, cache_rows=110))
    assert any(r % 3 for r in where)  # some validations ran in the middle of a group
    assert trainer.global_step == 8
    _assert_like_reference(model, ref)


@pytest.mark.parametrize("skipped", [{2}, {4}, {0, 1, 2}], ids=["last", "middle", "whole_group"])
def test_a_training_step_returning_none_inside_a_group_trains_like_plain_lightning(skipped: set[int]) -> None:
    class Skipping:
        def training_step(self, batch, batch_idx):
            if batch_idx in skipped:
                self(batch)  # a forward pass whose loss is dropped
                return None
            return super().training_step(batch, batch_idx)

    batches = _batches()
    model = _model()
    twin = PlainTwin(model)
    model.__class__ = type("SkippingTiny", (Skipping, TinyModel), {})
    twin.__class__ = type("SkippingTwin", (Skipping, PlainTwin), {})
    quiet_trainer(accumulate_grad_batches=3).fit(model, datamodule=_dm(batches))
    _plain_trainer(accumulate_grad_batches=3).fit(twin, datamodule=PlainData(batches))
    _assert_like_twin(model, twin)


def test_a_checkpoint_between_the_batches_of_a_group_resumes_like_plain_lightning(tmp_path: Path) -> None:
    # saved after batch 4 (the second of group [3, 4, 5]): both resume at batch 5 without the group's
    # partial gradients
    batches = _batches()
    runs = {}
    for kind in ("bagpipe", "plain"):
        model = _model()
        twin = PlainTwin(model)
        path = tmp_path / f"{kind}.ckpt"
        kw: dict[str, Any] = {"accumulate_grad_batches": 3, "max_epochs": 2, "default_root_dir": tmp_path}
        if kind == "bagpipe":
            quiet_trainer(callbacks=[SaveAtBatchEnd(4, path)], **kw).fit(model, datamodule=_dm(batches))
            resumed = _model()
            quiet_trainer(**kw).fit(resumed, datamodule=_dm(batches), ckpt_path=path)
        else:
            _plain_trainer(callbacks=[SaveAtBatchEnd(4, path)], **kw).fit(twin, datamodule=PlainData(batches))
            resumed = PlainTwin(_model())
            _plain_trainer(**kw).fit(resumed, datamodule=PlainData(batches), ckpt_path=path)
        runs[kind] = resumed
    _assert_like_twin(runs["bagpipe"], runs["plain"])


# ---------------------------------------------------------------------- problems
SCHEDULE = {0: 1, 1: 3}


def test_a_schedule_resumes_from_an_epoch_end_checkpoint(tmp_path: Path) -> None:
    # GradientAccumulationScheduler + the default end-of-epoch ModelCheckpoint: resumed from epoch 0's
    # checkpoint, epoch 1 must accumulate 3 batches as in the uninterrupted run. (A loader that asked the
    # schedule for trainer.current_epoch while Lightning sets up the data planned epoch 1 for k=1: the
    # fit loop had not moved current_epoch past the checkpoint's epoch yet.)
    batches = _batches()
    model = _model("rowwise_adagrad")
    ref = _reference(batches, [1, 3])
    every_epoch = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    quiet_trainer(
        max_epochs=1,
        callbacks=[GradientAccumulationScheduler(SCHEDULE), every_epoch],
        enable_checkpointing=True,
        default_root_dir=tmp_path,
    ).fit(model, datamodule=_dm(batches))
    resumed = _model("rowwise_adagrad")
    trainer = quiet_trainer(
        max_epochs=2, callbacks=[GradientAccumulationScheduler(SCHEDULE)], default_root_dir=tmp_path
    )
    trainer.fit(resumed, datamodule=_dm(batches), ckpt_path=tmp_path / "epoch=0.ckpt")
    assert trainer.global_step == 12 + 4
    _assert_like_reference(resumed, ref)


def test_a_schedule_resumes_from_a_mid_epoch_checkpoint_like_plain_lightning(tmp_path: Path) -> None:
    # ModelCheckpoint(every_n_train_steps=...) in epoch 1 (k=3), resumed: Lightning does not call the
    # scheduler's on_train_epoch_start for a restarted epoch, so the Trainer accumulates its own value (1)
    # for the rest of it. bagpipe's loader asks the schedule (3) instead and the first batch is refused
    batches = _batches()
    ckpt = tmp_path / "step=14.ckpt"  # epoch 0: 12 steps; step 14 is after batch 5 of epoch 1
    runs = {}
    for kind in ("bagpipe", "plain"):
        model = _model()
        twin = PlainTwin(model)
        every = ModelCheckpoint(dirpath=tmp_path / kind, filename="{step}", every_n_train_steps=14)
        kw: dict[str, Any] = {"max_epochs": 2, "default_root_dir": tmp_path}
        if kind == "bagpipe":
            quiet_trainer(
                callbacks=[GradientAccumulationScheduler(SCHEDULE), every], enable_checkpointing=True, **kw
            ).fit(model, datamodule=_dm(batches))
            resumed = _model()
            quiet_trainer(callbacks=[GradientAccumulationScheduler(SCHEDULE)], **kw).fit(
                resumed, datamodule=_dm(batches), ckpt_path=tmp_path / kind / ckpt.name
            )
        else:
            _plain_trainer(
                callbacks=[GradientAccumulationScheduler(SCHEDULE), every], enable_checkpointing=True, **kw
            ).fit(twin, datamodule=PlainData(batches))
            resumed = PlainTwin(_model())
            _plain_trainer(callbacks=[GradientAccumulationScheduler(SCHEDULE)], **kw).fit(
                resumed, datamodule=PlainData(batches), ckpt_path=tmp_path / kind / ckpt.name
            )
        runs[kind] = resumed
    _assert_like_twin(runs["bagpipe"], runs["plain"])


def test_a_cache_too_small_for_the_last_groups_names_the_setting() -> None:
    # the oracle plans the last `lookahead` steps of an epoch in finish(), whose error is not given the
    # accumulation note that push() errors get: with the default lookahead (64) that is every step of an
    # epoch shorter than 64 groups, and the message points at min_capacity over single batches
    batches = _batches(14)
    groups = [
        set().union(*(set(b.sparse.fused_ids(TABLES)) for b in batches[i : i + 3])) for i in range(0, 14, 3)
    ]
    need = max(len(a | b) for a, b in itertools.pairwise(groups))
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=3 a step is the 3 batches"):
        quiet_trainer(accumulate_grad_batches=3).fit(
            _model(), datamodule=_dm(batches, lookahead=64, cache_rows=need - 1)
        )


def test_the_train_command_s_default_epoch_holds_every_accumulated_batch() -> None:
    # `train --help`: --train-batches defaults to --max-steps, "i.e. one epoch". With
    # --accumulate-grad-batches 3, 4 optimizer steps train 12 batches: the synthetic epoch of 4 batches is
    # trained 3 times over instead of 12 distinct batches
    from lightning_bagpipe.models.train import add_arguments, build_datamodule

    parser = argparse.ArgumentParser()
    add_arguments(parser, "deepfm")
    args = parser.parse_args(
        ["--scale", "0.001", "--batch-size", "64", "--max-steps", "4", "--accumulate-grad-batches", "3"]
    )
    assert len(build_datamodule(args).train_source()) == 4 * 3
