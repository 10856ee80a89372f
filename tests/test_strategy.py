"""strategy="bagpipe" on one process: registration, Lightning features, checkpoints, logging and errors."""

from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import StrategyRegistry

import lightning_bagpipe as lb
from lightning_bagpipe.data.batch import StepPlan
from tests.helpers import ListDataModule, TinyModel, quiet_trainer, random_batches, small_tables


def _bagpipe_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("bagpipe")]


@pytest.fixture
def data():
    tables = small_tables()
    train = random_batches(tables, 24, 8, multi_hot=2, seed=1)
    val = random_batches(tables, 3, 8, multi_hot=2, seed=2)
    return tables, train, val


def _twin(model: TinyModel, cls=TinyModel, **kw) -> TinyModel:
    """A fresh model with the same initial dense parameters and tables as ``model`` (before training)."""
    other = cls(model.emb.tables, **kw)
    other.load_state_dict(model.state_dict())
    return other


def _dm(tables, train, val=None, cache_rows=60, lookahead=4):
    return ListDataModule(tables, train, val, lookahead=lookahead, cache_rows=cache_rows)


def test_registered_name_resolves_case_insensitively() -> None:
    assert "bagpipe" in StrategyRegistry
    for name in ("bagpipe", "BAGPIPE"):
        trainer = pl.Trainer(strategy=name, accelerator="cpu", logger=False)
        assert isinstance(trainer.strategy, lb.BagpipeStrategy)
    lb.BagpipeStrategy.register_strategies(StrategyRegistry)  # idempotent: no "already present" error
    trainer = pl.Trainer(strategy=lb.BagpipeStrategy(log_stats=False), accelerator="cpu", logger=False)
    assert trainer.strategy.log_stats is False


class StoreMatchesCache(Callback):
    """During evaluation the store must hold the newest value of every row resident in the cache."""

    def __init__(self) -> None:
        self.checked = 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        driver = trainer.strategy.driver
        if driver is None or batch_idx:
            return
        emb = pl_module.emb
        slots = torch.nonzero(torch.from_numpy(driver.slot_ids >= 0)).flatten()
        ids = torch.from_numpy(driver.slot_ids)[slots]
        assert torch.equal(emb.store.tensor()[ids], emb._cache[slots])
        self.checked += 1


def test_validation_mid_epoch_reads_a_current_store_and_everything_stops(data) -> None:
    tables, train, val = data
    model = TinyModel(tables)
    check = StoreMatchesCache()
    trainer = quiet_trainer(val_check_interval=0.25, num_sanity_val_steps=0, callbacks=[check])
    trainer.fit(model, datamodule=_dm(tables, train, val))
    assert check.checked == 4
    assert "val_loss" in trainer.callback_metrics
    assert not _bagpipe_threads()
    # after fit the store is the model: validate/test/predict read it without the cache
    out = trainer.validate(model, datamodule=_dm(tables, train, val))
    assert out[0]["val_loss"] == pytest.approx(float(trainer.callback_metrics["val_loss"]))
    preds = trainer.predict(model, dataloaders=_dm(tables, train, val).val_dataloader())
    assert len(preds) == 3 and preds[0].shape == (8,)


def test_max_steps_stops_cleanly_with_the_store_flushed(data) -> None:
    tables, train, _ = data
    m1 = TinyModel(tables)
    m2 = _twin(m1)
    trainer = quiet_trainer(max_steps=7)
    trainer.fit(m1, datamodule=_dm(tables, train))
    assert trainer.global_step == 7
    assert not _bagpipe_threads()
    # same 7 steps on a cache large enough to never evict: identical tables (flush at the end was complete)
    quiet_trainer(max_steps=7).fit(
        m2, datamodule=_dm(tables, train, cache_rows=tables.total_rows, lookahead=30)
    )
    assert torch.allclose(m1.emb.store.tensor(), m2.emb.store.tensor(), atol=1e-6, rtol=0)
    assert not torch.equal(m1.emb.store.tensor(), TinyModel(tables).emb.store.tensor())


def test_several_epochs_and_cache_figures_are_logged(data) -> None:
    tables, train, _ = data
    trainer = quiet_trainer(max_epochs=2, log_every_n_steps=1)
    trainer.fit(TinyModel(tables), datamodule=_dm(tables, train[:10]))
    assert trainer.global_step == 20
    for key in (
        "bagpipe/hit_rate",
        "bagpipe/rows_fetched",
        "bagpipe/rows_written_back",
        "bagpipe/fetch_wait_ms",
    ):
        assert key in trainer.logged_metrics
    assert trainer.strategy.cache_stats.steps == 20


def test_cache_figures_are_logged_per_interval(data) -> None:
    """With log_every_n_steps=4, the logged figures are those of the last 4 steps, not of the last one."""
    tables, train, _ = data
    per_step: list[tuple[int, int, int]] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            s = trainer.strategy.driver.last
            per_step.append((s.hits, s.unique_rows, s.rows_fetched))

    trainer = quiet_trainer(max_steps=8, log_every_n_steps=4, callbacks=[Record()])
    trainer.fit(TinyModel(tables), datamodule=_dm(tables, train[:10], cache_rows=60, lookahead=3))
    interval = per_step[4:8]  # logged at step 8: steps 5 to 8
    hits, unique = sum(h for h, _, _ in interval), sum(u for _, u, _ in interval)
    assert trainer.logged_metrics["bagpipe/hit_rate"].item() == pytest.approx(hits / unique, rel=1e-6)
    fetched = [f for _, _, f in interval]
    assert trainer.logged_metrics["bagpipe/rows_fetched"].item() == pytest.approx(sum(fetched) / 4, rel=1e-6)
    assert len(set(fetched)) > 1  # the steps differ, so the mean is not the last step's figure


def test_one_store_write_per_step(data) -> None:
    """A step's end-of-use write-backs travel with the next pre-step's evictions: one store write per step
    (one collective on a sharded store, one round trip to a remote one), not two."""
    tables, train, _ = data
    model = TinyModel(tables)
    writes: list[int] = []
    store = model.emb.store
    original = store.write

    def counted(ids, rows, check_unique=False):  # type: ignore[no-untyped-def]
        writes.append(len(ids))
        return original(ids, rows, check_unique=check_unique)

    store.write = counted  # type: ignore[method-assign]
    trainer = quiet_trainer(max_steps=24)
    trainer.fit(model, datamodule=_dm(tables, train, cache_rows=30, lookahead=16))
    stats = trainer.strategy.cache_stats
    assert stats.rows_evicted > 0 and stats.rows_written_back > stats.rows_evicted  # both kinds of writes
    # (store writes with no rows are skipped on one process; the final flush adds one)
    assert len(writes) <= trainer.global_step + 1
    assert sum(writes) >= stats.rows_written_back


@pytest.mark.parametrize("preset", [None, "GOMP_SPINCOUNT", "OMP_WAIT_POLICY"])
def test_cpu_training_suggests_shorter_openmp_spinning_unless_chosen(
    data, preset, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tables, train, _ = data
    for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(k, raising=False)
    if preset is not None:
        monkeypatch.setenv(preset, "10000" if preset == "GOMP_SPINCOUNT" else "PASSIVE")
    with caplog.at_level(logging.INFO):
        quiet_trainer(max_steps=2).fit(TinyModel(tables), datamodule=_dm(tables, train[:2]))
    hinted = any("GOMP_SPINCOUNT=10000" in r.getMessage() for r in caplog.records)
    assert hinted is (preset is None)


class ManualModel(TinyModel):
    def __init__(self, tables, **kw) -> None:
        super().__init__(tables, **kw)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = F.binary_cross_entropy_with_logits(self(batch), batch.labels)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_trains_the_same_model(data) -> None:
    tables, train, _ = data
    auto = TinyModel(tables)
    manual = _twin(auto, ManualModel)
    quiet_trainer().fit(auto, datamodule=_dm(tables, train))
    quiet_trainer().fit(manual, datamodule=_dm(tables, train))
    assert torch.allclose(auto.emb.store.tensor(), manual.emb.store.tensor(), atol=1e-6, rtol=0)
    for p, q in zip(auto.head.parameters(), manual.head.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)


class LooksWithoutGrad(TinyModel):
    """Reads the step's rows under torch.no_grad() and in eval mode too (scoring candidates, a metric)
    before the lookup it trains with."""

    gaps: list[float]

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            quiet = self.emb(batch.sparse)
        self.emb.eval()
        evaluated = self.emb(batch.sparse)
        self.emb.train()
        trained = self.emb(batch.sparse)
        self.gaps.append(max((quiet - trained).abs().max().item(), (evaluated - trained).abs().max().item()))
        return super().training_step(batch, batch_idx)


def test_a_lookup_without_grad_inside_a_step_reads_the_cached_rows_and_trains_nothing(data) -> None:
    # (it read the store, whose copies of rows still cached were older: 0.01 to 0.1 off, and on several
    # processes with a sharded store the store read collided with the executor's collectives)
    tables, train, _ = data
    plain = TinyModel(tables)
    looking = _twin(plain, LooksWithoutGrad)
    looking.gaps = []
    quiet_trainer().fit(plain, datamodule=_dm(tables, train))
    quiet_trainer().fit(looking, datamodule=_dm(tables, train))
    assert len(looking.gaps) == len(train) and max(looking.gaps) == 0.0
    assert torch.equal(plain.emb.store.tensor(), looking.emb.store.tensor())


class EvalModule(ListDataModule):
    """Validation batches for ``trainer.test`` and ``trainer.predict`` too."""

    def test_source(self):
        return self.val_batches

    def predict_source(self):
        return self.val_batches


def test_a_compiled_forward_trains_and_evaluates_like_the_eager_one(data) -> None:
    # torch.compile must skip CachedEmbedding (numpy, the cache's threads): dynamo tracing its store reads
    # in evaluation failed with a guard error; the rest of the forward is compiled
    tables, train, val = data
    eager = TinyModel(tables)
    compiled = _twin(eager)
    compiled.forward = torch.compile(compiled.forward, backend="eager")  # (no C++ build: a fast test)
    results = []
    for model in (eager, compiled):
        dm = EvalModule(tables, train, val, lookahead=4, cache_rows=60)
        quiet_trainer().fit(model, datamodule=dm)
        trainer = quiet_trainer()
        metrics = trainer.validate(model, datamodule=dm, verbose=False) + trainer.test(
            model, datamodule=dm, verbose=False
        )
        predictions = torch.cat(trainer.predict(model, datamodule=dm))
        results.append((model.emb.store.tensor(), model.head.weight.detach(), metrics, predictions))
    (rows, weight, metrics, predictions), (c_rows, c_weight, c_metrics, c_predictions) = results
    assert torch.equal(rows, c_rows) and torch.equal(weight, c_weight)
    assert metrics == c_metrics and len(metrics) == 2
    assert predictions.shape == (sum(b.batch_size for b in val),)
    assert torch.equal(predictions, c_predictions)


def test_gradient_clipping_of_dense_parameters_still_applies(data) -> None:
    tables, train, _ = data
    model = TinyModel(tables, dense_lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.head.parameters()])
    quiet_trainer(max_steps=1, gradient_clip_val=1e-4, gradient_clip_algorithm="norm").fit(
        model, datamodule=_dm(tables, train)
    )
    after = torch.cat([p.detach().flatten() for p in model.head.parameters()])
    assert 0 < float((after - before).norm()) <= 1e-4 * 1.0001


def test_checkpoint_holds_flushed_tables_and_loads_without_the_strategy(data, tmp_path: Path) -> None:
    tables, train, _ = data
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    model = TinyModel(tables)
    ref = _twin(model)
    quiet_trainer(max_steps=10, enable_checkpointing=True, callbacks=[ckpt]).fit(
        model, datamodule=_dm(tables, train)
    )
    at5 = torch.load(tmp_path / "epoch=0-step=5.ckpt", weights_only=True)
    # an independent run stopped at step 5 has exactly the tables the checkpoint saved mid-run
    quiet_trainer(max_steps=5).fit(ref, datamodule=_dm(tables, train))
    assert torch.equal(at5["state_dict"]["emb.rows"], ref.emb.store.tensor())
    loaded = TinyModel.load_from_checkpoint(tmp_path / "epoch=0-step=10.ckpt", tables=tables)
    assert torch.equal(loaded.emb.store.tensor(), model.emb.store.tensor())
    batch = train[0]
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(batch), model.eval()(batch))


class FailAt(TinyModel):
    def __init__(self, tables, fail_at: int) -> None:
        super().__init__(tables)
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx == self.fail_at:
            raise RuntimeError("boom in step")
        return loss


def test_a_failed_step_writes_nothing_to_the_store(data) -> None:
    tables, train, _ = data
    failing = FailAt(tables, fail_at=6)
    ref = _twin(failing)
    with pytest.raises(RuntimeError, match="boom in step"):
        quiet_trainer().fit(failing, datamodule=_dm(tables, train))
    assert not _bagpipe_threads()
    quiet_trainer(max_steps=6).fit(ref, datamodule=_dm(tables, train))
    assert torch.equal(failing.emb.store.tensor(), ref.emb.store.tensor())


def _failing_store_method(monkeypatch: pytest.MonkeyPatch, name: str, at: int) -> None:
    """The store's ``name`` (read or write) raises an OSError at its ``at``-th call, once (transient)."""
    original = getattr(lb.MemoryStore, name)
    calls = itertools.count(1)

    def flaky(self, *args, **kwargs):
        if next(calls) == at:
            raise OSError(5, "Input/output error (injected)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(lb.MemoryStore, name, flaky)


@pytest.mark.parametrize(("name", "at"), [("read", 2), ("read", 4), ("read", 7), ("write", 3), ("write", 6)])
def test_a_store_failure_mid_fit_leaves_the_store_at_the_last_completed_step(
    data, monkeypatch: pytest.MonkeyPatch, name: str, at: int
) -> None:
    # the row executor stops at its first failure and skips what is queued after it; the rows only the
    # cache held (dirty rows, queued and pending write-backs) are written from the main thread. They
    # were lost: the store matched no step at all
    tables, train, _ = data
    failing = TinyModel(tables)
    clean = _twin(failing)
    with monkeypatch.context() as m:
        _failing_store_method(m, name, at)
        trainer = quiet_trainer()
        with pytest.raises(RuntimeError, match=r"background fetch/write-back failed.*injected"):
            trainer.fit(failing, datamodule=_dm(tables, train))
    steps = trainer.global_step
    assert 0 < steps < len(train)
    quiet_trainer(max_steps=steps).fit(clean, datamodule=_dm(tables, train))
    assert torch.equal(failing.emb.store.tensor(), clean.emb.store.tensor())
    assert not _bagpipe_threads()


def test_the_write_jobs_tracked_for_a_recovery_stay_few(data) -> None:
    # the driver keeps each queued write job until it is known to have written (for a recovery after a
    # failure): done ones must be dropped, or the list grows all run and a recovery rewrites stale slots
    tables, train, val = data
    seen: list[int] = []

    class Count(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            seen.append(len(trainer.strategy.driver._writes))

    # (an epoch's end, or a validation, writes the last rows back, sometimes none: that job must not stay)
    trainer = quiet_trainer(callbacks=[Count()], max_epochs=3, val_check_interval=5, num_sanity_val_steps=0)
    trainer.fit(TinyModel(tables), datamodule=_dm(tables, train, val, lookahead=8))
    assert len(seen) == 3 * len(train) and max(seen) <= 3, seen


def test_a_checkpoint_on_the_exception_of_a_store_failure_holds_the_last_completed_step(
    data, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # (Lightning's OnExceptionCheckpoint: the save raised again, Lightning then skipped the teardown and
    # the pipeline's threads were left running)
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    tables, train, _ = data
    model = TinyModel(tables)
    with monkeypatch.context() as m:
        _failing_store_method(m, "read", 4)
        trainer = quiet_trainer(
            callbacks=[OnExceptionCheckpoint(tmp_path)], default_root_dir=tmp_path, enable_checkpointing=True
        )
        with pytest.raises(RuntimeError, match="injected"):
            trainer.fit(model, datamodule=_dm(tables, train))
    assert not _bagpipe_threads()
    saved = torch.load(tmp_path / "on_exception.ckpt", weights_only=True)
    assert torch.equal(saved["state_dict"]["emb.rows"], model.emb.store.tensor())


def test_nan_loss_follows_lightnings_usual_behaviour(data) -> None:
    tables, train, _ = data

    class NanModel(TinyModel):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * float("nan")

    # Lightning's usual: with detect_anomaly the backward raises; nothing of that step reaches the store
    model = NanModel(tables)
    before = model.emb.store.tensor().clone()
    with pytest.raises(RuntimeError, match="nan"):
        quiet_trainer(detect_anomaly=True).fit(model, datamodule=_dm(tables, train))
    assert torch.equal(model.emb.store.tensor(), before)


def test_capacity_below_one_steps_rows_is_a_clear_error(data) -> None:
    tables, train, _ = data
    with pytest.raises(ValueError, match=r"cache"):
        quiet_trainer().fit(TinyModel(tables), datamodule=_dm(tables, train, cache_rows=5))
    assert not _bagpipe_threads()


def test_a_cache_too_small_for_an_accumulation_group_names_the_setting(data) -> None:
    # a cache that holds two batches' rows but not two groups of three
    tables, train, _ = data
    ids = [set(b.sparse.fused_ids(tables)) for b in train]
    pairs = max(len(a | b) for a, b in itertools.pairwise(ids))
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=3 a step is the 3 batches"):
        quiet_trainer(accumulate_grad_batches=3).fit(
            TinyModel(tables), datamodule=_dm(tables, train, cache_rows=pairs)
        )
    assert not _bagpipe_threads()


def test_plain_trainer_reads_the_store_and_warns_that_rows_do_not_train(data) -> None:
    tables, train, _ = data
    model = TinyModel(tables)
    before = model.emb.store.tensor().clone()
    with pytest.warns(UserWarning, match="outside strategy='bagpipe'"):
        quiet_trainer(strategy="auto", max_steps=3).fit(model, datamodule=_dm(tables, train))
    assert torch.equal(model.emb.store.tensor(), before)


def test_accumulation_changed_inside_an_epoch_is_a_clear_error(data) -> None:
    # the loader planned the epoch's steps as groups of 2 batches; a Trainer that accumulates 3 from batch 3
    # on would update rows the plan no longer holds (or skip updates): refused, naming the setting
    tables, train, _ = data

    class Change(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 3:
                trainer.accumulate_grad_batches = 3

    with pytest.raises(
        ValueError, match=r"planned for accumulate_grad_batches=2 but the Trainer accumulates 3"
    ):
        quiet_trainer(accumulate_grad_batches=2, callbacks=[Change()]).fit(
            TinyModel(tables), datamodule=_dm(tables, train)
        )
    assert not _bagpipe_threads()


def test_a_batch_without_a_plan_is_refused(data) -> None:
    tables, train, _ = data

    class PlainLoaderModel(TinyModel):
        def train_dataloader(self):
            return (b for b in train)  # an iterable of plain batches, no plan

    with pytest.raises(ValueError, match="BagpipeDataModule"):
        quiet_trainer(max_steps=2).fit(PlainLoaderModel(tables))


def test_weighted_bags_under_mean_pooling_are_a_clear_error() -> None:
    tables = small_tables()
    weighted = random_batches(tables, 6, 8, multi_hot=2, weighted=True)
    for trainer in (quiet_trainer(max_steps=2), quiet_trainer(strategy="auto", max_steps=2)):
        with pytest.raises(ValueError, match=r"pooling='mean'.*weighted bags.*pooling='sum'"):
            trainer.fit(TinyModel(tables, pooling="mean"), datamodule=_dm(tables, weighted))


def test_bad_module_arguments_are_clear_errors() -> None:
    tables = small_tables()
    with pytest.raises(ValueError, match="lr"):
        lb.optim.RowWiseAdagrad(lr=None)
    with pytest.raises(TypeError, match="sparse optimizer"):
        lb.CachedEmbedding(tables, dim=4, optimizer=torch.optim.SGD)  # type: ignore[arg-type]
    wrong = lb.MemoryStore(tables.total_rows, 7)
    with pytest.raises(ValueError, match="7"):
        lb.CachedEmbedding(tables, dim=4, optimizer=lb.optim.SGD(lr=0.1), store=wrong)
    emb = lb.CachedEmbedding(tables, dim=4, optimizer=lb.optim.SGD(lr=0.1))
    bad = lb.SparseFeatures.from_dense(tables.names, torch.tensor([[0, 0, 35]]))
    with pytest.raises(ValueError, match=r"feature 'f2': id 35 is outside \[0, 35\)"):
        emb(bad)


def test_counts_and_sizes_are_refused_rather_than_truncated() -> None:
    # int() would turn 4.5 into 4 and True into 1: each is an error naming the argument
    sgd = lb.optim.SGD(lr=0.1)
    with pytest.raises(ValueError, match=r"table 'a': num_embeddings must be an integer >= 1, got 10.5"):
        lb.Tables([("a", 10.5)])
    with pytest.raises(ValueError, match=r"num_embeddings must be an integer >= 1, got True"):
        lb.Tables([("a", True)])
    assert lb.Tables([("a", np.int64(10))]).sizes.tolist() == [10]  # numpy integers are integers
    with pytest.raises(ValueError, match=r"dim must be an integer >= 1, got 4.5"):
        lb.CachedEmbedding(small_tables(), dim=4.5, optimizer=sgd)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"seed must be an integer, got 1.5"):
        lb.CachedEmbedding(small_tables(), dim=4, optimizer=sgd, seed=1.5)  # type: ignore[arg-type]
    for delay in (-1, float("nan")):
        with pytest.raises(ValueError, match=r"io_delay_ms must be a finite number >= 0"):
            lb.BagpipeStrategy(io_delay_ms=delay)


def test_a_fit_after_predict_in_the_same_process_trains() -> None:
    # predict runs under inference mode; layouts it caches per batch shape must still serve training
    from lightning_bagpipe.data.batch import _one_hot_layout

    _one_hot_layout.cache_clear()
    tables = small_tables()
    batches = random_batches(tables, 3, 8)

    class Predicting(ListDataModule):
        def predict_source(self) -> list[lb.Batch]:
            return self.batches

    assert len(quiet_trainer().predict(TinyModel(tables), datamodule=Predicting(tables, batches))) == 3
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(TinyModel(tables), datamodule=ListDataModule(tables, batches, lookahead=2))
    assert trainer.global_step == 2


def test_a_checkpoint_replaces_a_checkpoint_never_a_directory_that_is_not_one(data, tmp_path: Path) -> None:
    # (a directory checkpoint saved onto a folder of other checkpoints deleted all of it; a file saved onto
    # another world size's directory checkpoint failed with IsADirectoryError)
    tables, train, _ = data
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")

    def fitted(layout: str) -> pl.Trainer:
        trainer = quiet_trainer(
            strategy=lb.BagpipeStrategy(checkpoint_layout=layout), max_steps=2, default_root_dir=tmp_path
        )
        trainer.fit(TinyModel(tables), datamodule=_dm(tables, train))
        return trainer

    for layout in ("file", "directory"):
        with pytest.raises(ValueError, match="is a directory that is not a bagpipe checkpoint"):
            fitted(layout).save_checkpoint(folder)
        assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    last = tmp_path / "last.ckpt"
    fitted("directory").save_checkpoint(last)
    assert (last / "manifest.json").exists()
    fitted("file").save_checkpoint(last)  # (how a run resumed on one process saves over it)
    assert last.is_file() and "state_dict" in torch.load(last, weights_only=True)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_the_ranks_compare_a_resumed_streams_first_step_and_then_every_16th() -> None:
    # A resumed stream's steps start past 0 (the loader numbers them from its skip position): its first
    # step must be compared too, or ranks reading other data after a resume trained silently.
    strategy = lb.BagpipeStrategy(parallel_devices=[torch.device("cpu")])
    calls: list[tuple[int, int]] = []

    class Driver:
        groups = object()  # (several ranks)

    def all_gather(t: torch.Tensor) -> torch.Tensor:
        calls.append(plan.key)
        return torch.stack([t, t + 1])  # rank 1 read other batches

    strategy._driver = Driver()  # type: ignore[assignment]
    strategy.all_gather = all_gather  # type: ignore[method-assign]
    none = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    for key, compared in (((3, 5), True), ((4, 5), True), ((4, 6), False), ((4, 16), True)):
        plan = StepPlan(key=key, capacity=8, fetch=none, evict=none, writeback=none, digest=7)
        if compared:
            message = r"rank\(s\) \[1\] read other global batches than rank 0 at batch 9"
            with pytest.raises(ValueError, match=message):
                strategy._check_same_stream(plan, 9)
        else:
            strategy._check_same_stream(plan, 9)
    assert calls == [(3, 5), (4, 5), (4, 16)]
