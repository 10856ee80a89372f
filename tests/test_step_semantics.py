"""What a lookup means at each point of a fit, beyond the batch's own features in a training step:
micro-batches of the batch, rows read from callbacks or under ``torch.no_grad()``, gradients no optimizer
step applies (manual optimization), a training loader given for evaluation, and loss scaling
("16-mixed"). Each either equals plain reference math on full tables, or is refused with an error
that says what to do instead."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

import lightning_bagpipe as lb
from tests.helpers import ListDataModule, TinyModel, quiet_trainer, random_batches, small_tables
from tests.test_exactness import BATCH, DENSE_LR, DIM, OPTIMIZERS, train_reference

TABLES = (60, 45, 35)


def _setup(steps: int, seed: int = 3) -> tuple[lb.Tables, list[lb.Batch]]:
    tables = small_tables(TABLES)
    return tables, random_batches(tables, steps, BATCH, multi_hot=3, seed=seed)


def _fit(model: TinyModel, tables: lb.Tables, batches: list[lb.Batch], **trainer: object) -> None:
    quiet_trainer(**trainer).fit(
        model, datamodule=ListDataModule(tables, batches, lookahead=4, cache_rows=110)
    )


def _pooled(table: torch.Tensor, tables: lb.Tables, sp: lb.SparseFeatures) -> torch.Tensor:
    """Sum-pooled bags of ``sp`` over a full fused ``table`` (samples x features x dim)."""
    key_of = torch.repeat_interleave(torch.arange(len(tables)), sp.lengths.view(len(tables), -1).sum(1))
    ids = sp.values + torch.as_tensor(tables.offsets)[key_of]
    bags = F.embedding_bag(ids, table, sp.offsets[:-1], mode="sum")
    return bags.view(len(tables), sp.batch_size, -1).transpose(0, 1)


class MicroBatched(TinyModel):
    """The batch in two halves, each with its own forward pass: the mean loss over the batch, as one pass."""

    def training_step(self, batch: lb.Batch, batch_idx: int) -> torch.Tensor:
        h = batch.batch_size // 3
        total = sum(
            F.binary_cross_entropy_with_logits(self(part), part.labels, reduction="sum")
            for part in (batch.slice_samples(0, h), batch.slice_samples(h, batch.batch_size))
        )
        return total / batch.batch_size


def test_micro_batches_sliced_from_the_batch_train_like_the_whole_batch() -> None:
    tables, batches = _setup(20)
    torch.manual_seed(0)
    model = MicroBatched(tables, OPTIMIZERS["adagrad"][0](), dense_lr=DENSE_LR)
    hp = OPTIMIZERS["adagrad"][1]
    ref_table, ref_state, _ = train_reference(model, batches, "adagrad", hp, dtype=torch.float64)
    _fit(model, tables, batches)
    trained = model.emb.store.tensor().double()
    assert torch.allclose(trained[:, :DIM], ref_table, atol=1e-6, rtol=0)
    assert torch.allclose(trained[:, DIM:], ref_state, atol=1e-6, rtol=0)


class Probing(TinyModel):
    """Reads a probe set of rows under no_grad in step 5, and trains through unplanned ids if asked."""

    def __init__(self, tables: lb.Tables, probe: lb.SparseFeatures, train_probe: bool = False) -> None:
        super().__init__(tables, lb.optim.SGD(lr=0.1), dense_lr=DENSE_LR)
        self.probe, self.train_probe = probe, train_probe
        self.seen: torch.Tensor | None = None

    def training_step(self, batch: lb.Batch, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.train_probe:
            loss = loss + self.emb(self.probe).sum()
        if batch_idx == 5:
            with torch.no_grad():
                self.seen = self.emb(self.probe)
        return loss


def test_rows_read_under_no_grad_inside_a_step_are_the_current_ones() -> None:
    tables, batches = _setup(12)
    probe = random_batches(tables, 1, 8, multi_hot=2, seed=99, zipf=1.05)[0].sparse  # ids beyond the batch's
    torch.manual_seed(0)
    model = Probing(tables, probe)
    ref_table, _, _ = train_reference(
        copy.deepcopy(model), batches[:5], "sgd", {"lr": 0.1}, dtype=torch.float64
    )
    _fit(model, tables, batches)
    assert model.seen is not None
    assert torch.allclose(model.seen.double(), _pooled(ref_table, tables, probe), atol=1e-6, rtol=0)


def test_training_through_ids_no_plan_put_in_the_cache_is_refused() -> None:
    tables, batches = _setup(6)
    probe = random_batches(tables, 1, 8, seed=99)[0].sparse
    model = Probing(tables, probe, train_probe=True)
    with pytest.raises(RuntimeError, match=r"without a cache plan inside a training step.*sampled negatives"):
        _fit(model, tables, batches)


class ProbeAtEnd(Callback):
    """Looks the probe set up where Lightning runs callbacks: at every epoch's end and the fit's."""

    def __init__(self, probe: lb.SparseFeatures) -> None:
        self.probe, self.seen = probe, {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self.seen[f"epoch{trainer.current_epoch}"] = pl_module.emb(self.probe).detach()
        if trainer.current_epoch == 0:
            self.seen["export0"] = torch.cat(list(pl_module.emb.export().values()))

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self.seen["end"] = pl_module.emb(self.probe).detach()


def test_callbacks_read_the_rows_as_trained_so_far() -> None:
    tables, batches = _setup(10)
    probe = random_batches(tables, 1, 8, multi_hot=2, seed=98)[0].sparse
    torch.manual_seed(0)
    model = TinyModel(tables, lb.optim.SGD(lr=0.1), dense_lr=DENSE_LR)
    ref_table, _, _ = train_reference(
        copy.deepcopy(model), batches, "sgd", {"lr": 0.1}, dtype=torch.float64
    )  # (one epoch)
    spy = ProbeAtEnd(probe)
    _fit(model, tables, batches, max_epochs=2, callbacks=[spy])
    assert torch.allclose(spy.seen["epoch0"].double(), _pooled(ref_table, tables, probe), atol=1e-6, rtol=0)
    assert torch.allclose(spy.seen["export0"].double(), ref_table, atol=1e-6, rtol=0)
    with torch.no_grad():
        after = model.emb(probe)  # (fit is over: the store is the model)
    assert torch.equal(spy.seen["end"], after) and torch.equal(spy.seen["epoch1"], after)


class ManualSteps(TinyModel):
    """Manual optimization: ``every`` batches per optimizer step, or a lookup after the step."""

    def __init__(self, tables: lb.Tables, every: int = 1, late_lookup: bool = False) -> None:
        super().__init__(tables, lb.optim.SGD(lr=0.1), dense_lr=DENSE_LR)
        self.automatic_optimization = False
        self.every, self.late_lookup = every, late_lookup

    def training_step(self, batch: lb.Batch, batch_idx: int) -> None:
        opt = self.optimizers()
        self.manual_backward(F.binary_cross_entropy_with_logits(self(batch), batch.labels))
        if (batch_idx + 1) % self.every == 0:
            opt.step()  # type: ignore[union-attr]
            opt.zero_grad()  # type: ignore[union-attr]
        if self.late_lookup:
            self.manual_backward(self(batch).sum())


def test_manual_optimization_stepping_every_batch_trains_like_the_uncached_loop() -> None:
    tables, batches = _setup(15)
    torch.manual_seed(0)
    model = ManualSteps(tables)
    ref_table, _, ref_head = train_reference(model, batches, "sgd", {"lr": 0.1}, dtype=torch.float64)
    _fit(model, tables, batches)
    assert torch.allclose(model.emb.store.tensor().double()[:, :DIM], ref_table, atol=1e-6, rtol=0)
    for p, q in zip(model.head.parameters(), ref_head.parameters()):
        assert torch.allclose(p.double(), q, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "every, late, lost",
    [(2, False, "and no optimizer step followed"), (1, True, "after the step's optimizer step")],
    ids=["accumulating_by_hand", "backward_after_step"],
)
def test_manual_optimization_that_would_lose_embedding_gradients_is_refused(
    every: int, late: bool, lost: str
) -> None:
    tables, batches = _setup(6)
    with pytest.raises(
        RuntimeError, match=f"embedding gradients were computed {lost}.*accumulate_grad_batches"
    ):
        _fit(ManualSteps(tables, every, late), tables, batches)


def test_a_training_loader_given_as_validation_loader_is_refused() -> None:
    tables, batches = _setup(6)
    model = TinyModel(tables)
    train = ListDataModule(tables, batches, lookahead=4, cache_rows=110)
    other = ListDataModule(tables, batches, lookahead=4, cache_rows=110)
    with pytest.raises(ValueError, match=r"training loader .* was given as a val loader.*val_source"):
        quiet_trainer().fit(
            model, train_dataloaders=train.train_dataloader(), val_dataloaders=other.train_dataloader()
        )


class Scaled(TinyModel):
    """TinyModel with its head split out (``logits``), so that the AMP reference reuses it."""

    def logits(self, e: torch.Tensor, batch: lb.Batch) -> torch.Tensor:
        return self.head(torch.cat([e.flatten(1), batch.dense], 1)).squeeze(1)

    def forward(self, batch: lb.Batch) -> torch.Tensor:
        return self.logits(self.emb(batch.sparse), batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=DENSE_LR)


class WithSideTables(Scaled):
    """Also a dense parameter with sparse gradients (a small ``nn.Embedding(sparse=True)`` of the first
    feature) and one whose gradient is not contiguous (stored transposed)."""

    def __init__(self, tables: lb.Tables) -> None:
        super().__init__(tables, lb.optim.SGD(lr=0.1), dense_lr=DENSE_LR)
        self.side = torch.nn.Embedding(TABLES[0], 1, sparse=True)
        self.side.weight.data.normal_(0, 0.1)
        self.w = torch.nn.Parameter((torch.randn(3, 2) * 0.1).t())  # [2, 3] with strides (1, 2)
        assert not self.w.is_contiguous()

    def logits(self, e: torch.Tensor, batch: lb.Batch) -> torch.Tensor:
        first = batch.sparse.values[: batch.batch_size]  # (one id per bag: feature 0 of every sample)
        side = self.side(first).squeeze(1) + (batch.dense[:, :2] @ self.w).sum(1)
        return super().logits(e, batch) + side


def _scaled_reference(
    model: Scaled, batches: list[lb.Batch], init_scale: float
) -> tuple[torch.Tensor, Scaled, float]:
    """The plain AMP loop: the full table is a parameter of the same GradScaler-driven SGD as the dense
    parameters (SGD leaves rows with a zero gradient as they are), the forward under fp16 autocast."""
    ref = copy.deepcopy(model)
    table = model.emb.store.tensor()[:, :DIM].clone().requires_grad_()
    opt = torch.optim.SGD([{"params": ref.parameters(), "lr": DENSE_LR}, {"params": [table], "lr": 0.1}])
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    for batch in batches:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            logits = ref.logits(_pooled(table, model.emb.tables, batch.sparse), batch)
            loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return table.detach(), ref, scaler.get_scale()


@pytest.mark.parametrize("side_tables", [False, True], ids=["tiny", "sparse_and_strided_dense_grads"])
def test_16_mixed_loss_scaling_trains_rows_on_unscaled_gradients_and_skips_overflowing_steps(
    side_tables: bool,
) -> None:
    # Lightning's "16-mixed" on a GPU: a GradScaler scales the loss; emulated on CPU with the same plugin.
    # The large initial scale overflows fp16 in the first steps: the scaler skips them (rows too) and
    # backs off, then trains on gradients it unscales.
    tables = small_tables(TABLES)
    batches = random_batches(tables, 14, BATCH, multi_hot=1, seed=3)
    torch.manual_seed(0)
    model = WithSideTables(tables) if side_tables else Scaled(tables, lb.optim.SGD(lr=0.1), dense_lr=DENSE_LR)
    init_scale = 2.0**22
    ref_table, ref, ref_scale = _scaled_reference(model, batches, init_scale)
    assert ref_scale < init_scale / 4  # (steps were skipped in the reference too)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))
    _fit(model, tables, batches, plugins=[plugin])
    assert plugin.scaler is not None and plugin.scaler.get_scale() == ref_scale
    assert torch.allclose(model.emb.store.tensor()[:, :DIM], ref_table, atol=1e-6, rtol=0)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), name


def test_the_learning_rate_finder_leaves_the_model_as_it_found_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Lightning's lr_find trains a few steps, then restores its checkpoint in the middle of the fit: the
    # cache's trial rows were then written over the restored store (31 of 140 rows), and the fit after it
    # started from them. The restore now discards the cache first.
    from lightning.pytorch.tuner import Tuner

    tables, batches = _setup(20)
    torch.manual_seed(0)
    tuned = TinyModel(tables, lb.optim.Adagrad(lr=0.1), dense_lr=DENSE_LR)
    plain = copy.deepcopy(tuned)
    trainer = quiet_trainer(default_root_dir=tmp_path)
    dm = ListDataModule(tables, batches, lookahead=4, cache_rows=110)
    Tuner(trainer).lr_find(tuned, datamodule=dm, num_training=8, update_attr=False, min_lr=1e-4, max_lr=1e-3)
    assert torch.equal(tuned.emb.store.tensor(), plain.emb.store.tensor())
    trainer.fit(tuned, datamodule=dm)
    _fit(plain, tables, batches)
    assert torch.equal(tuned.emb.store.tensor(), plain.emb.store.tensor())
    for p, q in zip(tuned.head.parameters(), plain.head.parameters()):
        assert torch.equal(p, q)


class CopyAtEpochEnd(Callback):
    """The "keep the best model" pattern: a deep copy of the module at an epoch's end."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self.copy = copy.deepcopy(pl_module)
        self.rows = torch.cat(list(pl_module.emb.export().values()))


def test_a_deep_copy_during_fit_holds_the_rows_as_trained_so_far(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # (a copy took the store as it was, behind the cache: 21 of its rows were stale at the epoch's end)
    tables, batches = _setup(10)
    model = TinyModel(tables, lb.optim.SGD(lr=0.1), dense_lr=DENSE_LR)
    spy = CopyAtEpochEnd()
    _fit(model, tables, batches, callbacks=[spy])
    copied = spy.copy.emb
    assert torch.equal(torch.cat(list(copied.export().values())), spy.rows)
    assert not copied._active and copied._cache is None  # (an inactive module: no cache, no driver)
    # a file store cannot be copied: a copy would be a snapshot that no longer writes the file
    for store in (str(tmp_path / "t.f32"), functools.partial(lb.TieredStore, tmp_path / "tt.f32")):
        on_file = lb.CachedEmbedding(tables, dim=DIM, optimizer=lb.optim.SGD(lr=0.1), store=store)
        with pytest.raises(
            TypeError, match=r"Store\('.*f32'\) keeps its rows in a file: it cannot be copied"
        ):
            copy.deepcopy(on_file)
        on_file.store.close()


@pytest.mark.parametrize("averaging", ["swa", "ema"])
def test_weight_averaging_callbacks_are_refused(averaging: str) -> None:
    # SWA and EMA average parameters; the rows are not parameters, and an EMA run's checkpoints held the
    # initial rows as the model's weights
    from lightning.pytorch import callbacks

    tables, batches = _setup(4)
    make = {
        "swa": lambda: callbacks.StochasticWeightAveraging(swa_lrs=0.01),
        "ema": callbacks.EMAWeightAveraging,
    }
    with pytest.raises(
        ValueError, match=r"averages the model's parameters, but CachedEmbedding rows are not"
    ):
        _fit(TinyModel(tables), tables, batches, callbacks=[make[averaging]()])
