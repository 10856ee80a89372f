"""Checkpoints and exact resume with strategy="bagpipe" on one process.

The central promise: a run stopped at step ``k`` and resumed from its checkpoint ends with *bitwise* the
same dense parameters, tables (weights + sparse optimizer state) and dense optimizer state as a run that
was never interrupted. The model below draws from torch, numpy and python ``random`` in every training
step, so the RNG states must be saved and restored too.

Run ``python -m tests.test_resume`` to print checkpoint size and save/load times against the table size
(the figures in docs/checkpoints.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch import nn

import lightning_bagpipe as lb
from lightning_bagpipe.oracle.lookahead import LookaheadOracle
from lightning_bagpipe.strategies import checkpointing as ckio
from lightning_bagpipe.strategies.checkpointing import (
    AtomicCheckpointIO,
    add_bagpipe_section,
    capture_rng_states,
    read_checkpoint,
    restore_rng_states,
    verify_bagpipe_section,
)
from lightning_bagpipe.temporaries import host_id
from tests.helpers import (
    ListDataModule,
    SaveInsideStep,
    TinyModel,
    quiet_trainer,
    random_batches,
    small_tables,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*outside strategy='bagpipe'.*:UserWarning",
    "ignore:.*callbacks used to create the checkpoint.*:UserWarning",
    "ignore:.*Total length of .* across ranks is zero.*:UserWarning",
    "ignore:.*sync_dist=True.*",
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- model and runs
class NoisyModel(TinyModel):
    """TinyModel + dropout (torch RNG) + a loss factor from numpy and ``random``; Adam on the dense head."""

    def __init__(self, tables: lb.Tables, sparse: str = "adam", **kw: Any) -> None:
        opt = lb.optim.Adam(lr=0.05) if sparse == "adam" else lb.optim.RowWiseAdagrad(lr=0.1)
        super().__init__(tables, optimizer=opt, **kw)
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


def _seed(s: int) -> None:
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def _model(tables: lb.Tables, **kw: Any) -> NoisyModel:
    torch.manual_seed(0)  # same initial head in every run; the tables' initialisation has its own seed
    return NoisyModel(tables, **kw)


class Seen(Callback):
    """Records which source batch each training step trained on (by its dense features)."""

    def __init__(self, source: list[lb.Batch]) -> None:
        self.source = source
        self.indices: list[int] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: lb.Batch, batch_idx: int
    ) -> None:
        assert batch.dense is not None
        hits = [i for i, b in enumerate(self.source) if b.dense is not None and b.dense.equal(batch.dense)]
        assert len(hits) == 1
        self.indices.append(hits[0])


@dataclass
class Run:
    model: TinyModel
    trainer: pl.Trainer
    seen: list[int]


def _fit(
    model: NoisyModel | TinyModel,
    dm: ListDataModule,
    source: list[lb.Batch],
    *,
    seed: int,
    ckpt_path: Path | None = None,
    callbacks: tuple[Callback, ...] | list[Callback] = (),
    **kw: Any,
) -> Run:
    seen = Seen(source)
    kw.setdefault("max_epochs", 1)
    trainer = quiet_trainer(callbacks=[seen, *callbacks], enable_checkpointing=bool(callbacks), **kw)
    _seed(seed)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return Run(model, trainer, seen.indices)


def _assert_same_result(a: Run, b: Run) -> None:
    """Bitwise equal dense parameters, tables (weights + sparse state) and dense optimizer state."""
    assert a.trainer.global_step == b.trainer.global_step
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs"
    oa, ob = a.trainer.optimizers[0].state_dict()["state"], b.trainer.optimizers[0].state_dict()["state"]
    assert oa.keys() == ob.keys() and oa
    for p in oa:
        for name in oa[p]:
            assert torch.equal(torch.as_tensor(oa[p][name]), torch.as_tensor(ob[p][name])), (p, name)


def _evictions(tables: lb.Tables, batches: list[lb.Batch], lookahead: int, capacity: int) -> list[int]:
    """Dirty rows evicted for capacity before each step, from the oracle itself."""
    oracle = LookaheadOracle(tables.total_rows, lookahead, capacity)
    plans = [p for b in batches if (p := oracle.push(b.sparse.fused_ids(tables))) is not None]
    plans += oracle.finish()
    return [int(p.evict_ids.size) for p in plans]


class UnsizedDataModule(ListDataModule):
    """The same batches from a generator, as from a TSV stream: without a length, Lightning asks for each
    next batch before the current step ends."""

    def train_source(self) -> Iterator[lb.Batch]:  # type: ignore[override]
        return (b for b in self.batches)


@dataclass
class Scenario:
    """A reference run, a run of the same length that saved a checkpoint after every step, its inputs."""

    tables: lb.Tables
    train: list[lb.Batch]
    lookahead: int
    cache_rows: int
    epochs: int
    sparse: str
    reference: Run
    ckpt_dir: Path
    sized: bool = True
    accumulate: int = 1

    def dm(self, lookahead: int | None = None, cache_rows: int | None = -1) -> ListDataModule:
        return (ListDataModule if self.sized else UnsizedDataModule)(
            self.tables,
            self.train,
            lookahead=lookahead or self.lookahead,
            cache_rows=self.cache_rows if cache_rows == -1 else cache_rows,
        )

    def ckpt(self, k: int) -> Path:
        return self.ckpt_dir / f"step={k}.ckpt"

    def resume(self, k: int, **dm_kw: Any) -> Run:
        # a different seed than the original runs: only the checkpoint's RNG states can make this exact
        return _fit(
            _model(self.tables, sparse=self.sparse),
            self.dm(**dm_kw),
            self.train,
            seed=12345,
            ckpt_path=self.ckpt(k),
            max_epochs=self.epochs,
            accumulate_grad_batches=self.accumulate,
        )


def _scenario(
    tmp: Path,
    *,
    n: int,
    lookahead: int,
    cache_rows: int,
    epochs: int,
    sparse: str,
    sized: bool = True,
    accumulate: int = 1,
) -> Scenario:
    tables = small_tables()
    train = random_batches(tables, n, 8, multi_hot=2, seed=3)

    def dm() -> ListDataModule:
        cls = ListDataModule if sized else UnsizedDataModule
        return cls(tables, train, lookahead=lookahead, cache_rows=cache_rows)

    kw = {"max_epochs": epochs, "accumulate_grad_batches": accumulate}
    reference = _fit(_model(tables, sparse=sparse), dm(), train, seed=1, **kw)
    every = ModelCheckpoint(dirpath=tmp, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    saving = _fit(_model(tables, sparse=sparse), dm(), train, seed=1, callbacks=[every], **kw)
    _assert_same_result(saving, reference)  # saving checkpoints (which flushes the cache) changes nothing
    return Scenario(tables, train, lookahead, cache_rows, epochs, sparse, reference, tmp, sized, accumulate)


@pytest.fixture(scope="module")
def evicting(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    """Small cache and long lookahead: dirty rows are evicted for capacity at several steps."""
    return _scenario(
        tmp_path_factory.mktemp("evicting"), n=16, lookahead=12, cache_rows=28, epochs=1, sparse="adam"
    )


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return _scenario(
        tmp_path_factory.mktemp("epochs"), n=8, lookahead=3, cache_rows=40, epochs=2, sparse="rowwise"
    )


# ---------------------------------------------------------------------------------------------- exact resume
def test_the_scenario_has_an_eviction_heavy_step(evicting: Scenario) -> None:
    ev = _evictions(evicting.tables, evicting.train, evicting.lookahead, evicting.cache_rows)
    assert max(ev) >= 4 and sum(e > 0 for e in ev) >= 3


@pytest.mark.parametrize("where", ["first", "before_most_evictions", "last"])
def test_resume_mid_epoch_is_bitwise_the_uninterrupted_run(evicting: Scenario, where: str) -> None:
    ev = _evictions(evicting.tables, evicting.train, evicting.lookahead, evicting.cache_rows)
    k = {"first": 1, "before_most_evictions": int(np.argmax(ev)), "last": len(evicting.train) - 1}[where]
    if where == "before_most_evictions":
        assert ev[k] >= 4  # in the uninterrupted run, step k evicts dirty rows to make room
    run = evicting.resume(k)
    assert run.seen == list(range(k, len(evicting.train)))  # continues at the next unseen batch
    _assert_same_result(run, evicting.reference)


def test_resume_into_a_spilling_tiered_store_is_bitwise_the_uninterrupted_run(
    evicting: Scenario, tmp_path: Path
) -> None:
    """The checkpoint's rows are written into a TieredStore (a small buffer, which spills during the
    rest of the run); the run ends as the uninterrupted one on a RAM store."""
    factory = functools.partial(lb.TieredStore, tmp_path / "rows.f32", buffer_bytes=1024)
    model = _model(evicting.tables, sparse=evicting.sparse, store=factory)
    store = model.emb.store
    assert isinstance(store, lb.TieredStore) and store.capacity < 20
    k = 4
    run = _fit(model, evicting.dm(), evicting.train, seed=12345, ckpt_path=evicting.ckpt(k))
    assert run.seen == list(range(k, len(evicting.train)))
    assert store.spills > 1
    _assert_same_result(run, evicting.reference)


@pytest.fixture(scope="module")
def lazy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Scenario, Path]:
    """A run on a TieredStore (small buffer: it spills) that saves a checkpoint after every step, next to
    the uninterrupted run on a RAM store; tables large enough that the run writes few of their rows."""
    tmp = tmp_path_factory.mktemp("lazy")
    tables = small_tables((400, 250, 350))
    train = random_batches(tables, 12, 8, multi_hot=2, seed=5)

    def dm() -> ListDataModule:
        return ListDataModule(tables, train, lookahead=4, cache_rows=60)

    reference = _fit(_model(tables, sparse="rowwise"), dm(), train, seed=1)
    every = ModelCheckpoint(dirpath=tmp / "ckpts", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    store = functools.partial(lb.TieredStore, tmp / "trained.f32", buffer_bytes=1024)
    saving = _fit(_model(tables, sparse="rowwise", store=store), dm(), train, seed=1, callbacks=[every])
    _assert_same_result(saving, reference)
    assert saving.model.emb.store.spills > 1
    saving.model.emb.store.close()  # the file now holds every step's rows, later than any checkpoint
    return Scenario(tables, train, 4, 60, 1, "rowwise", reference, tmp / "ckpts"), tmp / "trained.f32"


def test_a_lazy_store_checkpoints_only_the_rows_written_so_far(lazy_run: tuple[Scenario, Path]) -> None:
    sc, _ = lazy_run
    k = 5
    ckpt = torch.load(sc.ckpt(k), weights_only=True)
    sd, entry = ckpt["state_dict"], ckpt["bagpipe"]["modules"]["emb"]
    trained = np.unique(np.concatenate([b.sparse.fused_ids(sc.tables) for b in sc.train[:k]]))
    ids = sd["emb.row_ids"]
    assert ids.tolist() == trained.tolist()  # every row the first k steps trained, and no other
    assert 0 < ids.numel() < sc.tables.total_rows // 2
    width = 4 + 1
    assert sd["emb.rows"].shape == (ids.numel(), width) and entry["rows_shape"] == [ids.numel(), width]
    assert int(sd["emb.rows_init_seed"]) == 7 and sd["emb.rows_init_state"].tolist() == [0.0]
    assert ckpt["bagpipe"]["version"] == ckpt_version_written() and entry["rows_layout"] == "written"
    assert entry["row_ids_crc32"] == zlib.crc32(ids.numpy().tobytes())
    # the saved rows are the reference run's rows at step k (the uninterrupted run, on a RAM store)
    ref = _fit(_model(sc.tables, sparse="rowwise"), sc.dm(), sc.train, seed=1, max_steps=k)
    assert torch.equal(sd["emb.rows"], ref.model.emb.store.tensor()[ids])


def ckpt_version_written() -> int:
    return ckio.WRITTEN_ROWS_VERSION


@pytest.mark.parametrize("into", ["new_tiered_file", "ram", "the_trained_file"])
def test_a_written_rows_checkpoint_resumes_exactly_into_any_store(
    lazy_run: tuple[Scenario, Path], into: str, tmp_path: Path
) -> None:
    """Rows the checkpoint leaves out go back to their initial values, whatever the store held: even the
    run's own file, which holds rows trained after the checkpoint."""
    sc, trained_file = lazy_run
    store: Any = {
        "new_tiered_file": functools.partial(lb.TieredStore, tmp_path / "new.f32", buffer_bytes=1024),
        "ram": None,
        "the_trained_file": functools.partial(lb.TieredStore, trained_file, buffer_bytes=1024),
    }[into]
    model = _model(sc.tables, sparse="rowwise", store=store)
    k = 5
    if into == "the_trained_file":  # it holds the rows of every step, not those of step k
        saved = torch.load(sc.ckpt(k), weights_only=True)["state_dict"]
        assert not torch.equal(model.emb.store.read(saved["emb.row_ids"]), saved["emb.rows"])
    run = _fit(model, sc.dm(), sc.train, seed=12345, ckpt_path=sc.ckpt(k))
    assert run.seen == list(range(k, len(sc.train)))
    _assert_same_result(run, sc.reference)
    if into != "ram":
        model.emb.store.close()


def test_one_process_directory_checkpoints_of_a_lazy_store_resume_exactly(
    lazy_run: tuple[Scenario, Path], tmp_path: Path
) -> None:
    """``checkpoint_layout="directory"``: one process saves directories, whose shard is streamed from
    the store; they hold what the file checkpoints of the same steps hold, and resume as exactly."""
    sc, _ = lazy_run
    dirs = tmp_path / "dirs"
    every = ModelCheckpoint(dirpath=dirs, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    store = functools.partial(lb.TieredStore, tmp_path / "d.f32", buffer_bytes=1024)
    saving = _fit(
        _model(sc.tables, sparse="rowwise", store=store), sc.dm(), sc.train, seed=1, callbacks=[every],
        strategy=lb.BagpipeStrategy(checkpoint_layout="directory"),
    )  # fmt: skip
    _assert_same_result(saving, sc.reference)
    k = 5
    d = dirs / f"step={k}.ckpt"
    (shard,) = json.loads((d / "manifest.json").read_text())["modules"]["emb"]["shards"]
    in_file = torch.load(sc.ckpt(k), weights_only=True)["state_dict"]
    assert np.load(d / shard["ids_file"]).tolist() == in_file["emb.row_ids"].tolist()
    assert np.array_equal(np.load(d / shard["file"]), in_file["emb.rows"].numpy())
    run = _fit(_model(sc.tables, sparse="rowwise"), sc.dm(), sc.train, seed=12345, ckpt_path=d)
    assert run.seen == list(range(k, len(sc.train)))
    _assert_same_result(run, sc.reference)
    with pytest.raises(ValueError, match=r"checkpoint_layout must be 'auto'.*got 'dirs'"):
        lb.BagpipeStrategy(checkpoint_layout="dirs")  # type: ignore[arg-type]


def test_auto_layout_saves_a_directory_when_a_file_would_copy_too_many_rows_into_memory(
    lazy_run: tuple[Scenario, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On one process "auto" saves a file, unless the file would first read more than
    AUTO_DIRECTORY_BYTES of a lazy store's written rows into memory; "file" insists on a file; a RAM
    store's table is saved in place, so it stays a file."""
    sc, _ = lazy_run
    monkeypatch.setattr(lb.BagpipeStrategy, "AUTO_DIRECTORY_BYTES", 30 * (5 * 4 + 8))  # 30 rows of 5 floats
    k = 5
    saved = {}
    for name, layout, tiered in (("auto", "auto", True), ("file", "file", True), ("ram", "auto", False)):
        every = ModelCheckpoint(
            dirpath=tmp_path / name, filename="{step}", every_n_train_steps=1, save_top_k=-1
        )
        store = (
            functools.partial(lb.TieredStore, tmp_path / f"{name}.f32", buffer_bytes=1024) if tiered else None
        )
        _fit(
            _model(sc.tables, sparse="rowwise", store=store), sc.dm(), sc.train, seed=1, callbacks=[every],
            strategy=lb.BagpipeStrategy(checkpoint_layout=layout),
        )  # fmt: skip
        saved[name] = [tmp_path / name / f"step={s}.ckpt" for s in range(1, len(sc.train) + 1)]
    in_file = torch.load(sc.ckpt(k), weights_only=True)["state_dict"]
    assert in_file["emb.row_ids"].numel() > 30  # past the threshold by step k, not at step 1
    assert saved["auto"][0].is_file() and saved["auto"][k - 1].is_dir()
    assert all(p.is_file() for p in saved["file"] + saved["ram"])
    d = saved["auto"][k - 1]
    (shard,) = json.loads((d / "manifest.json").read_text())["modules"]["emb"]["shards"]
    assert np.load(d / shard["ids_file"]).tolist() == in_file["emb.row_ids"].tolist()
    assert np.array_equal(np.load(d / shard["file"]), in_file["emb.rows"].numpy())
    run = _fit(_model(sc.tables, sparse="rowwise"), sc.dm(), sc.train, seed=12345, ckpt_path=d)
    assert run.seen == list(range(k, len(sc.train)))
    _assert_same_result(run, sc.reference)


def test_a_written_rows_checkpoint_loads_for_inference(lazy_run: tuple[Scenario, Path]) -> None:
    sc, _ = lazy_run
    k = len(sc.train)
    loaded = NoisyModel.load_from_checkpoint(sc.ckpt(k), tables=sc.tables, sparse="rowwise")
    assert isinstance(loaded.emb.store, lb.MemoryStore)
    assert torch.equal(loaded.emb.store.tensor(), sc.reference.model.emb.store.tensor())


def test_damaged_written_rows_are_clear_errors(lazy_run: tuple[Scenario, Path], tmp_path: Path) -> None:
    sc, _ = lazy_run
    ckpt = torch.load(sc.ckpt(5), weights_only=True)
    ids = ckpt["state_dict"]["emb.row_ids"]
    flipped = ids.clone()
    flipped[3] += 1
    for bad, match in [
        ({"emb.row_ids": flipped}, r"row ids of CachedEmbedding 'emb' \('emb.row_ids'\) are corrupted"),
        ({"emb.row_ids": None}, r"has no row ids 'emb.row_ids'"),
    ]:
        damaged = {**ckpt, "state_dict": {**ckpt["state_dict"], **bad}}
        damaged["state_dict"] = {k: v for k, v in damaged["state_dict"].items() if v is not None}
        path = tmp_path / "bad.ckpt"
        torch.save(damaged, path)
        with pytest.raises(ValueError, match=match):
            _fit(_model(sc.tables, sparse="rowwise"), sc.dm(), sc.train, seed=0, ckpt_path=path)
    # the state dict on its own (no section to check it): out-of-order ids are named
    model = _model(sc.tables, sparse="rowwise")
    sd = dict(ckpt["state_dict"])
    sd["emb.row_ids"] = ids.flip(0)
    with pytest.raises(RuntimeError, match="row ids must be strictly increasing"):
        model.load_state_dict(sd)
    sd["emb.row_ids"] = ids
    sd["emb.rows"] = sd["emb.rows"][1:]
    with pytest.raises(RuntimeError, match=r"written row ids need rows of shape"):
        model.load_state_dict(sd)


@pytest.mark.parametrize(
    "k",
    [
        5,
        7,
        8,  # a checkpoint after the last batch of epoch 0: resume starts epoch 1
        12,
    ],
)
def test_resume_across_epochs_is_bitwise_the_uninterrupted_run(two_epochs: Scenario, k: int) -> None:
    n = len(two_epochs.train)
    run = two_epochs.resume(k)
    assert run.seen == [i % n for i in range(k, 2 * n)]
    _assert_same_result(run, two_epochs.reference)


@pytest.fixture(scope="module")
def unsized(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    """A source without a length, over two epochs."""
    return _scenario(
        tmp_path_factory.mktemp("unsized"),
        n=8,
        lookahead=3,
        cache_rows=28,
        epochs=2,
        sparse="adam",
        sized=False,
    )


@pytest.mark.parametrize("k", [1, 5, 8, 11])
def test_a_source_without_length_resumes_at_the_next_unseen_batch(unsized: Scenario, k: int) -> None:
    # Lightning asks such a loader for the next batch before the step ends: the position saved is the
    # count of batches trained, not of batches handed out
    n = len(unsized.train)
    run = unsized.resume(k)
    assert run.seen == [i % n for i in range(k, 2 * n)]
    _assert_same_result(run, unsized.reference)


@pytest.fixture(scope="module", params=[True, False], ids=["sized", "unsized"])
def accumulating(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    """accumulate_grad_batches=3 over epochs of 8 batches (groups of 3, 3 and 2), two epochs."""
    return _scenario(
        tmp_path_factory.mktemp("accumulating"),
        n=8,
        lookahead=3,
        cache_rows=60,
        epochs=2,
        sparse="adam",
        sized=request.param,
        accumulate=3,
    )


@pytest.mark.parametrize("step", [1, 2, 3, 5])
def test_resume_with_gradient_accumulation_is_bitwise_the_uninterrupted_run(
    accumulating: Scenario, step: int
) -> None:
    # a checkpoint after optimizer step ``step`` (3 per epoch) resumes at the first batch of the next group;
    # step 3 ends epoch 0 with its short group
    n, k = len(accumulating.train), accumulating.accumulate
    per_epoch = -(-n // k)
    first = (step // per_epoch) * n + (step % per_epoch) * k
    run = accumulating.resume(step)
    assert run.seen == [i % n for i in range(first, 2 * n)]
    if step == per_epoch and not accumulating.sized:
        # Lightning cannot tell that a source without a length ended its epoch: resumed, it counts the next
        # epoch's batches on from 8 and accumulates [0], [1, 2, 3], [4, 5, 6], [7] (what any model trains
        # on such a resume). The loader groups the same way, so every step's update is applied
        assert run.trainer.global_step == accumulating.reference.trainer.global_step + 1
        assert run.trainer.strategy.cache_stats.steps == 4
        return
    _assert_same_result(run, accumulating.reference)


@pytest.mark.parametrize("sized", [True, False], ids=["sized", "unsized"])
def test_an_epoch_end_checkpoint_resumed_with_max_steps_and_its_resumed_run_resumed_again_are_exact(
    tmp_path: Path, sized: bool
) -> None:
    # Lightning restores an epoch that a checkpoint saw finish (saved by ModelCheckpoint at the epoch's
    # end) as unfinished when max_steps is set: it took one more batch, the next epoch's first, and then
    # began another epoch (a batch twice, an epoch lost). And a source without a length, resumed from such
    # a checkpoint, was counted on from the finished epoch's last index, so the resumed run's own
    # checkpoints restarted the epoch when resumed again. The strategy now completes that epoch on load.
    tables = small_tables()
    train = random_batches(tables, 6, 8, multi_hot=2, seed=3)

    def dm() -> ListDataModule:
        return (ListDataModule if sized else UnsizedDataModule)(tables, train, lookahead=3, cache_rows=60)

    reference = _fit(_model(tables), dm(), train, seed=1, max_epochs=3)
    first = tmp_path / "first"
    _fit(_model(tables), dm(), train, seed=1, callbacks=[ModelCheckpoint(dirpath=first)])
    (end_of_epoch,) = first.glob("*.ckpt")
    second = tmp_path / "second"
    every = ModelCheckpoint(dirpath=second, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    run = _fit(
        _model(tables),
        dm(),
        train,
        seed=7,
        ckpt_path=end_of_epoch,
        callbacks=[every],
        max_epochs=3,
        max_steps=18,
    )
    assert run.seen == list(range(6)) * 2
    _assert_same_result(run, reference)
    again = _fit(_model(tables), dm(), train, seed=7, ckpt_path=second / "step=9.ckpt", max_epochs=3)
    assert again.seen == [3, 4, 5, *range(6)]
    _assert_same_result(again, reference)


@pytest.mark.parametrize("sized", [True, False], ids=["sized", "unsized"])
def test_resume_after_an_epoch_cut_short_starts_the_next_epoch(tmp_path: Path, sized: bool) -> None:
    # limit_train_batches=4 of 10: a checkpoint after batch 3 resumes at batch 0 of the next epoch (the
    # loader used to go on at batch 4, where its own epoch had stopped)
    tables = small_tables()
    train = random_batches(tables, 10, 8, multi_hot=2, seed=3)

    def dm() -> ListDataModule:
        return (ListDataModule if sized else UnsizedDataModule)(tables, train, lookahead=3, cache_rows=60)

    kw = {"max_epochs": 2, "limit_train_batches": 4}
    every = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    reference = _fit(_model(tables), dm(), train, seed=1, callbacks=[every], **kw)
    assert reference.seen == [0, 1, 2, 3] * 2
    for step in (2, 4):
        run = _fit(_model(tables), dm(), train, seed=7, ckpt_path=tmp_path / f"step={step}.ckpt", **kw)
        assert run.seen == ([0, 1, 2, 3] * 2)[step:]
        _assert_same_result(run, reference)


def test_a_loader_given_to_fit_directly_resumes_at_the_next_unseen_batch(
    unsized: Scenario, tmp_path: Path
) -> None:
    # no data module tells the loader what training finished: the strategy does
    sc, k = unsized, 5

    def fit(ckpt_path: Path | None, callbacks: list[Callback], seed: int) -> Run:
        model, seen = _model(sc.tables, sparse=sc.sparse), Seen(sc.train)
        trainer = quiet_trainer(
            callbacks=[seen, *callbacks], enable_checkpointing=bool(callbacks), max_epochs=sc.epochs
        )
        _seed(seed)
        trainer.fit(model, train_dataloaders=sc.dm().train_dataloader(), ckpt_path=ckpt_path)
        return Run(model, trainer, seen.indices)

    every = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    _assert_same_result(fit(None, [every], seed=1), sc.reference)
    run = fit(tmp_path / f"step={k}.ckpt", [], seed=3)
    n = len(sc.train)
    assert run.seen == [i % n for i in range(k, 2 * n)]
    _assert_same_result(run, sc.reference)


def test_a_checkpoint_saved_inside_a_step_leaves_training_alone_and_resumes_at_that_step(
    evicting: Scenario, tmp_path: Path
) -> None:
    sc, k = evicting, 7
    path = tmp_path / "inside.ckpt"
    run = _fit(
        _model(sc.tables, sparse=sc.sparse),
        sc.dm(),
        sc.train,
        seed=1,
        callbacks=[SaveInsideStep(k, path)],
        default_root_dir=tmp_path,
    )
    _assert_same_result(run, sc.reference)  # the save did not drop the step's row update
    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] == k  # before the step's update: the resumed run trains its batch again
    resumed = _fit(_model(sc.tables, sparse=sc.sparse), sc.dm(), sc.train, seed=99, ckpt_path=path)
    assert resumed.seen == list(range(k, len(sc.train)))
    _assert_same_result(resumed, sc.reference)  # with the generators as they were when the step began


class FailInsideStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("failed inside the step")


def test_the_checkpoint_lightning_saves_on_an_exception_resumes_exactly(
    evicting: Scenario, tmp_path: Path
) -> None:
    sc, k = evicting, 11
    on_exception = OnExceptionCheckpoint(dirpath=tmp_path)
    with pytest.raises(RuntimeError, match="failed inside the step"):
        _fit(
            _model(sc.tables, sparse=sc.sparse),
            sc.dm(),
            sc.train,
            seed=1,
            callbacks=[on_exception, FailInsideStep(k)],
            default_root_dir=tmp_path,
        )
    resumed = _fit(
        _model(sc.tables, sparse=sc.sparse), sc.dm(), sc.train, seed=5, ckpt_path=on_exception.ckpt_path
    )
    assert resumed.seen == list(range(k, len(sc.train)))
    _assert_same_result(resumed, sc.reference)


@pytest.mark.parametrize(("lookahead", "cache_rows"), [(1, None), (12, 60)])
def test_resume_with_another_lookahead_or_capacity_gives_the_same_model(
    evicting: Scenario, lookahead: int, cache_rows: int | None
) -> None:
    _assert_same_result(evicting.resume(6, lookahead=lookahead, cache_rows=cache_rows), evicting.reference)


def test_resume_needs_the_saved_rng_states(evicting: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    # the model really draws from the generators: skipping their restore breaks exactness
    monkeypatch.setattr("lightning_bagpipe.strategies.bagpipe.restore_rng_states", lambda section: None)
    run = evicting.resume(6)
    assert not torch.equal(run.model.head.weight, evicting.reference.model.head.weight)


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: lb.Batch, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_a_crashed_run_resumes_exactly_from_its_last_checkpoint(evicting: Scenario, tmp_path: Path) -> None:
    sc = evicting
    last = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_last=True, save_top_k=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(_model(sc.tables, sparse=sc.sparse), sc.dm(), sc.train, seed=1, callbacks=[last, CrashAt(11)])
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 9
    resumed = _fit(
        _model(sc.tables, sparse=sc.sparse), sc.dm(), sc.train, seed=777, ckpt_path=tmp_path / "last.ckpt"
    )
    assert resumed.seen == list(range(9, len(sc.train)))
    _assert_same_result(resumed, sc.reference)


def test_async_checkpoint_io_saves_through_the_atomic_io_and_resumes_exactly(
    evicting: Scenario, tmp_path: Path
) -> None:
    sc = evicting
    every = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=7, save_top_k=-1)
    io = AsyncCheckpointIO()
    _fit(_model(sc.tables, sparse=sc.sparse), sc.dm(), sc.train, seed=1, callbacks=[every], plugins=[io])
    assert isinstance(io.checkpoint_io, AtomicCheckpointIO)
    resumed = _fit(
        _model(sc.tables, sparse=sc.sparse), sc.dm(), sc.train, seed=3, ckpt_path=tmp_path / "step=7.ckpt"
    )
    assert resumed.seen == list(range(7, len(sc.train)))
    _assert_same_result(resumed, sc.reference)


def test_a_checkpoint_saved_after_fit_returned_starts_the_next_epoch_like_lightning(tmp_path: Path) -> None:
    # Lightning's rule: when fit stops (here at max_steps) the epoch counts as finished, so a checkpoint
    # saved afterwards resumes at the start of the next epoch. The bagpipe loader follows the same rule.
    tables = small_tables()
    train = random_batches(tables, 6, 8, multi_hot=2, seed=3)
    dm = ListDataModule(tables, train, lookahead=3)
    trainer = quiet_trainer(max_steps=4)
    trainer.fit(TinyModel(tables), datamodule=dm)
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")
    run = _fit(
        TinyModel(tables),
        ListDataModule(tables, train, lookahead=3),
        train,
        seed=0,
        ckpt_path=tmp_path / "after_fit.ckpt",
        max_epochs=2,
    )
    assert run.seen == list(range(6)) and run.trainer.global_step == 10


def test_checkpoints_saved_on_validation_and_save_last_resume_exactly(
    evicting: Scenario, tmp_path: Path
) -> None:
    sc = evicting
    val = random_batches(sc.tables, 2, 8, multi_hot=2, seed=9)
    dm = ListDataModule(sc.tables, sc.train, val, lookahead=sc.lookahead, cache_rows=sc.cache_rows)
    on_val = ModelCheckpoint(
        dirpath=tmp_path, filename="{step}-{val_loss:.4f}", monitor="val_loss", save_top_k=-1, save_last=True
    )
    _fit(
        _model(sc.tables, sparse=sc.sparse),
        dm,
        sc.train,
        seed=1,
        callbacks=[on_val],
        max_steps=10,
        val_check_interval=4,
        num_sanity_val_steps=0,
    )
    names = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert [n.split("-")[0] for n in names if n.startswith("step=")] == ["step=4", "step=8"]
    assert "last.ckpt" in names
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8 and last["bagpipe"]["version"] == ckio.FILE_VERSION  # the latest save
    for path in (next(tmp_path.glob("step=8-*.ckpt")), tmp_path / "last.ckpt"):
        dm2 = ListDataModule(sc.tables, sc.train, val, lookahead=sc.lookahead, cache_rows=sc.cache_rows)
        run = _fit(
            _model(sc.tables, sparse=sc.sparse),
            dm2,
            sc.train,
            seed=5,
            ckpt_path=path,
            val_check_interval=4,
            num_sanity_val_steps=0,
        )
        step = torch.load(path, weights_only=True)["global_step"]
        assert run.seen == list(range(step, len(sc.train)))
        _assert_same_result(run, sc.reference)


# ---------------------------------------------------------------------------------------------- contents
def test_checkpoint_section_describes_the_tables_and_checksums_the_saved_rows(evicting: Scenario) -> None:
    ckpt = torch.load(evicting.ckpt(5), weights_only=True)  # tensors and plain values only
    sec = ckpt["bagpipe"]
    assert sec["format"] == "lightning-bagpipe-checkpoint" and sec["version"] == 1
    entry = sec["modules"]["emb"]
    rows = ckpt["state_dict"]["emb.rows"]
    tables = evicting.tables
    assert entry["tables"] == [[t.name, t.num_embeddings] for t in tables]
    assert entry["tables_fingerprint"] == tables.fingerprint()
    assert entry["dim"] == 4 and entry["optimizer"] == "adam"
    assert entry["optimizer_hparams"]["lr"] == 0.05
    width = 4 + entry["state_width"]
    assert entry["rows_shape"] == [tables.total_rows, width] == list(rows.shape)
    assert entry["rows_crc32"] == zlib.crc32(rows.numpy().tobytes())
    # the position in the batch stream is saved (loops and datamodule) and equals the steps done
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches_yielded": 5}]
    assert ckpt["ListDataModule"] == {"train_loader": {"epoch": 0, "batches_yielded": 5}}
    assert set(sec["rng"]) == {"torch", "cuda", "numpy", "python"}


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    _seed(3)
    torch.rand(5), np.random.rand(5), random.random(), np.random.randn()  # leave numpy with a cached gaussian
    path = tmp_path / "rng.pt"
    torch.save({"rng": capture_rng_states()}, path)
    expect = (torch.rand(4), np.random.rand(4), np.random.randn(3), [random.random() for _ in range(3)])
    _seed(99)
    restore_rng_states(torch.load(path, weights_only=True))
    got = (torch.rand(4), np.random.rand(4), np.random.randn(3), [random.random() for _ in range(3)])
    assert torch.equal(got[0], expect[0])
    assert np.array_equal(got[1], expect[1]) and np.array_equal(got[2], expect[2])
    assert got[3] == expect[3]


# ---------------------------------------------------------------------------------------------- inference
def test_memory_mapped_model_loads_for_inference_without_the_strategy(tmp_path: Path) -> None:
    tables = small_tables()
    train = random_batches(tables, 10, 8, multi_hot=2, seed=4)
    model = TinyModel(tables, store=str(tmp_path / "train.bin"))
    trainer = quiet_trainer(max_steps=7)
    trainer.fit(model, datamodule=ListDataModule(tables, train, lookahead=3, cache_rows=40))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    inference_store = str(tmp_path / "inf.bin")
    loaded = TinyModel.load_from_checkpoint(tmp_path / "m.ckpt", tables=tables, store=inference_store)
    assert isinstance(loaded.emb.store, lb.MmapStore) and loaded.emb.store.path.name == "inf.bin"
    assert torch.equal(loaded.emb.store.tensor(), model.emb.store.tensor())
    assert not torch.equal(loaded.emb.store.tensor(), TinyModel(tables).emb.store.tensor())
    with torch.no_grad():
        assert torch.equal(loaded.eval()(train[0]), model.eval()(train[0]))
    # a plain Trainer predicts from it (reads the store, no cache, no strategy)
    plain = ListDataModule(tables, train, train[1:3])
    preds = quiet_trainer(strategy="auto").predict(loaded, dataloaders=plain.val_dataloader())
    assert preds is not None and len(preds) == 2
    assert isinstance(preds[0], torch.Tensor) and preds[0].shape == (8,)


# ---------------------------------------------------------------------------------------------- bad input
def _fit_from(path: Path, tables: lb.Tables | None = None, **model_kw: Any) -> None:
    tables = tables or small_tables()
    train = random_batches(tables, 4, 8, multi_hot=2, seed=3)
    quiet_trainer(max_epochs=1).fit(
        NoisyModel(tables, **model_kw), datamodule=ListDataModule(tables, train, lookahead=2), ckpt_path=path
    )


def test_checkpoint_of_another_table_configuration_is_refused(evicting: Scenario) -> None:
    path = evicting.ckpt(3)
    other = lb.Tables([("f0", 40), ("f1", 25), ("f2", 36)])
    with pytest.raises(
        ValueError,
        match=r"CachedEmbedding 'emb'.*table 2 is f2:35 rows in the checkpoint, "
        r"f2:36 rows in the model",
    ) as e:
        _fit_from(path, other)
    assert str(path) in str(e.value)
    width = r"dim: checkpoint 4, model 8 \(the module.s row width"
    with pytest.raises(ValueError, match=rf"CachedEmbedding 'emb'.*{width}"):
        _fit_from(path, dim=8)
    with pytest.raises(ValueError, match=r"optimizer: checkpoint 'adam', model 'rowwise_adagrad'"):
        _fit_from(path, sparse="rowwise")


def test_other_cached_module_names_are_refused(evicting: Scenario) -> None:
    ckpt = torch.load(evicting.ckpt(3), weights_only=True)
    emb = NoisyModel(evicting.tables).emb
    with pytest.raises(ValueError, match=r"modules \['emb'\] do not match the model's \['user_emb'\]"):
        verify_bagpipe_section(ckpt, "x.ckpt", {"user_emb": emb})


def _rows_record_offset(path: Path) -> int:
    """File offset of the middle of the largest record (the table rows) of a torch zip checkpoint."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
    return info.header_offset + 30 + int(name_len) + int(extra_len) + info.file_size // 2


def test_corrupted_and_foreign_files_are_clear_errors(evicting: Scenario, tmp_path: Path) -> None:
    good = evicting.ckpt(3).read_bytes()
    cases: dict[str, tuple[bytes, str]] = {
        "truncated.ckpt": (good[: len(good) // 2], "truncated or corrupted"),
        "empty.ckpt": (b"", "the file is empty"),
        "random.ckpt": (np.random.default_rng(0).bytes(2000), "not a torch checkpoint"),
        "notes.ckpt": (b"epoch,loss\n1,0.5\n", "not a torch checkpoint"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=reason) as e:
            _fit_from(tmp_path / name)
        assert str(tmp_path / name) in str(e.value), name

    flipped = tmp_path / "flipped.ckpt"
    corrupt = bytearray(good)
    corrupt[_rows_record_offset(evicting.ckpt(3))] ^= 0x40
    flipped.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match=r"rows of CachedEmbedding 'emb' \('emb.rows'\) are corrupted") as e:
        _fit_from(flipped)
    assert str(flipped) in str(e.value)


def test_a_plain_trainer_checkpoint_is_not_a_bagpipe_checkpoint(tmp_path: Path) -> None:
    tables = small_tables()
    train = random_batches(tables, 4, 8, multi_hot=2, seed=3)
    trainer = quiet_trainer(strategy="auto", max_steps=2)
    trainer.fit(NoisyModel(tables), datamodule=ListDataModule(tables, train, lookahead=2))
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="is not a bagpipe checkpoint") as e:
        _fit_from(tmp_path / "plain.ckpt")
    assert str(tmp_path / "plain.ckpt") in str(e.value)


def test_read_checkpoint_names_what_is_wrong(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list.pt is not a Lightning checkpoint: it holds a list"):
        read_checkpoint(io, tmp_path / "list.pt", True)
    torch.save({"model": nn.Linear(1, 1)}, tmp_path / "module.pt")
    with pytest.raises(ValueError, match=r"module.pt: it holds objects other than tensors"):
        read_checkpoint(io, tmp_path / "module.pt", True)
    with pytest.raises(ValueError, match="is a directory"):
        read_checkpoint(io, tmp_path, True)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(io, tmp_path / "missing.ckpt", True)


def test_a_newer_format_version_is_refused(evicting: Scenario, tmp_path: Path) -> None:
    ckpt = torch.load(evicting.ckpt(3), weights_only=True)
    ckpt["bagpipe"]["version"] = 99
    torch.save(ckpt, tmp_path / "future.ckpt")
    with pytest.raises(ValueError, match=r"format version 99 is not supported"):
        _fit_from(tmp_path / "future.ckpt")


def test_changed_sparse_hyperparameters_are_allowed_with_a_warning(evicting: Scenario) -> None:
    ckpt = torch.load(evicting.ckpt(3), weights_only=True)
    model = NoisyModel(evicting.tables)
    model.emb.optimizer.lr = 0.01
    with pytest.warns(UserWarning, match=r"lr 0.05 -> 0.01"):
        section = verify_bagpipe_section(ckpt, "x.ckpt", {"emb": model.emb})
    assert section is ckpt["bagpipe"]


# ---------------------------------------------------------------------------------------------- atomic saves
def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_atomic_save_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "sub" / "a.ckpt"
    io.save_checkpoint({"x": torch.arange(3)}, target)
    io.save_checkpoint({"x": torch.arange(5)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.arange(5))
    assert _listing(target.parent) == ["a.ckpt"]

    class Unpicklable:
        def __reduce__(self) -> Any:
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle this"):
        io.save_checkpoint({"x": torch.arange(7), "bad": Unpicklable()}, target)
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.arange(5))
    assert _listing(target.parent) == ["a.ckpt"]
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({}, target, storage_options={"a": 1})


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    code = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    host = host_id()
    stale = tmp_path / f".a.ckpt.{host}.{int(dead.stdout)}.0badc0de.tmp"
    live = tmp_path / f".a.ckpt.{host}.{os.getpid()}.00000000.tmp"
    stale.write_bytes(b"partial")
    live.write_bytes(b"in progress")
    AtomicCheckpointIO().save_checkpoint({"x": 1}, tmp_path / "a.ckpt")
    assert _listing(tmp_path) == sorted([live.name, "a.ckpt"])


def test_remote_paths_use_lightnings_transactional_save() -> None:
    io = AtomicCheckpointIO()
    io.save_checkpoint({"x": torch.arange(4)}, "memory://bagpipe-test/c.ckpt")
    assert torch.equal(io.load_checkpoint("memory://bagpipe-test/c.ckpt")["x"], torch.arange(4))
    io.remove_checkpoint("memory://bagpipe-test/c.ckpt")


def test_saving_builds_no_in_memory_copy_of_the_tables(tmp_path: Path) -> None:
    rows = torch.zeros(2_000_000, 4)  # 32 MB
    peaks = {}
    for name, io in (("atomic", AtomicCheckpointIO()), ("lightning", TorchCheckpointIO())):
        tracemalloc.start()
        io.save_checkpoint({"state_dict": {"emb.rows": rows}}, tmp_path / f"{name}.ckpt")
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks["lightning"] >= rows.nbytes  # the measurement sees Lightning's BytesIO copy ...
    assert peaks["atomic"] < rows.nbytes // 20  # ... and no such copy in ours


_SAVER = """
import sys, torch
from lightning_bagpipe.strategies.checkpointing import AtomicCheckpointIO
io, target = AtomicCheckpointIO(), sys.argv[1]
payload = torch.zeros(4_000_000)  # 16 MB: a save takes long enough to be killed in the middle
for i in range(1, 10_000):
    payload.fill_(i)
    print("saving", i, flush=True)
    io.save_checkpoint({"i": i, "payload": payload}, target)
    print("saved", i, flush=True)
"""


def test_kill_during_save_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    target = tmp_path / "ck" / "last.ckpt"
    for _attempt in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        watchdog = threading.Timer(120, proc.kill)  # never hang the suite on a stuck child
        watchdog.start()
        try:
            saved = 0
            assert proc.stdout is not None
            for line in proc.stdout:
                word, i = line.split()
                if word == "saved":
                    saved = int(i)
                elif saved >= 1:  # "saving <saved + 1>": the next save has started
                    time.sleep(0.005)
                    break
            temporaries = [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        if not temporaries:
            continue  # the kill missed the save; try again
        after = _listing(target.parent)
        assert "last.ckpt" in after and all(n == "last.ckpt" or n.endswith(".tmp") for n in after)
        ckpt = torch.load(target, weights_only=True)
        assert ckpt["i"] in (saved, saved + 1)  # the last complete save (or the next, if its rename landed)
        assert torch.equal(ckpt["payload"], torch.full((4_000_000,), float(ckpt["i"])))
        return
    pytest.fail("could not kill the saver in the middle of a save in 5 attempts")


# ---------------------------------------------------------------------------------------------- cost
def _rss_anon_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def _peak_anon_during(fn: Callable[[], object]) -> tuple[float, int]:
    """Seconds ``fn`` takes and the peak growth of anonymous RSS (bytes, sampled every 2 ms) meanwhile."""
    base, peak, stop = _rss_anon_kb(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon_kb() - base)
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    stop.set()
    t.join()
    return dt, peak[0] * 1024


def measure(rows: int, dim: int, directory: Path, store: str) -> dict[str, float]:
    """Size, times and extra RAM of saving and restoring one CachedEmbedding of ``rows`` rows.

    The rows use RowWiseAdagrad (``dim + 1`` floats). "Extra RAM" is the peak growth of anonymous memory
    (page-cache pages of files and of a memory-mapped store are not counted: the OS can drop them).
    """
    tables = lb.Tables([("t", rows)])
    emb = lb.CachedEmbedding(
        tables,
        dim=dim,
        optimizer=lb.optim.RowWiseAdagrad(lr=0.1),
        store=None if store == "ram" else str(directory / "store.bin"),
    )
    path = directory / "c.ckpt"

    def save(io: TorchCheckpointIO) -> None:
        checkpoint: dict[str, Any] = {"state_dict": {"emb.rows": emb.store.tensor()}}
        add_bagpipe_section(checkpoint, {"emb": emb})  # the checksum is part of the save time
        io.save_checkpoint(checkpoint, path)

    def restore(io: TorchCheckpointIO) -> None:
        checkpoint = read_checkpoint(io, path, True)
        verify_bagpipe_section(checkpoint, path, {"emb": emb})
        emb.load_state_dict({"rows": checkpoint["state_dict"]["emb.rows"]})

    t0 = time.perf_counter()
    ckio.rows_checksum(emb.store.tensor())
    crc_s = time.perf_counter() - t0
    out: dict[str, float] = {"rows": rows, "table_MB": emb.store.nbytes / 1e6, "crc_s": crc_s}
    for name, io in (("lightning", TorchCheckpointIO()), ("bagpipe", AtomicCheckpointIO())):
        out[f"{name}_save_s"], extra = _peak_anon_during(lambda io=io: save(io))  # type: ignore[misc]
        out[f"{name}_save_extra_MB"] = extra / 1e6
        out["file_MB"] = path.stat().st_size / 1e6
        out[f"{name}_restore_s"], extra = _peak_anon_during(lambda io=io: restore(io))  # type: ignore[misc]
        out[f"{name}_restore_extra_MB"] = extra / 1e6
    return out


def test_checkpoint_size_is_the_table_plus_a_small_overhead(tmp_path: Path) -> None:
    m = measure(20_000, 16, tmp_path, "ram")
    assert m["table_MB"] <= m["file_MB"] <= m["table_MB"] + 0.1


_COLUMNS = [
    ("rows", "rows", "{:>10.0f}"),
    ("table MB", "table_MB", "{:>9.1f}"),
    ("file MB", "file_MB", "{:>8.1f}"),
    ("crc s", "crc_s", "{:>6.2f}"),
    ("save s", "bagpipe_save_s", "{:>7.2f}"),
    ("+RAM MB", "bagpipe_save_extra_MB", "{:>8.0f}"),
    ("restore s", "bagpipe_restore_s", "{:>9.2f}"),
    ("+RAM MB", "bagpipe_restore_extra_MB", "{:>8.0f}"),
    ("| lightning save s", "lightning_save_s", "{:>18.2f}"),
    ("+RAM MB", "lightning_save_extra_MB", "{:>8.0f}"),
    ("restore s", "lightning_restore_s", "{:>9.2f}"),
    ("+RAM MB", "lightning_restore_extra_MB", "{:>8.0f}"),
]


def main() -> None:
    """Print checkpoint size, save and restore times and extra RAM against the table size."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--rows", type=int, nargs="+", default=[1 << 18, 1 << 20, 1 << 22, 1 << 24])
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--store", choices=["ram", "mmap"], default="ram")
    ap.add_argument("--dir", type=Path, default=Path("."), help="where the files are written (then deleted)")
    args = ap.parse_args()
    print(" ".join(f"{title:>{len(fmt.format(0))}}" for title, _, fmt in _COLUMNS))
    for rows in args.rows:
        d = args.dir / f"bagpipe-ckpt-measure-{rows}"
        d.mkdir(parents=True, exist_ok=False)
        try:
            m = measure(rows, args.dim, d, args.store)
        finally:
            for p in d.iterdir():
                p.unlink()
            d.rmdir()
        print(" ".join(fmt.format(m[key]) for _, key, fmt in _COLUMNS), flush=True)


if __name__ == "__main__":
    main()
