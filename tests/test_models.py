"""DeepFM and DLRM: their math against plain loops, metrics against plain formulas, and training.

Reference math here is deliberately naive (Python loops over feature pairs, a full-table lookup by hand,
pairwise AUC counting) so it cannot share a bug with the vectorized model code.
"""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_bagpipe as lb
from lightning_bagpipe.models import DLRM, DeepFM, fm_second_order, mlp, pairwise_dot_interactions
from lightning_bagpipe.models.common import coerce_tables, memory_store_for_loading
from tests.helpers import ListDataModule, random_batches, small_tables

NUM_DENSE = 3
DIM = 4


def _trainer(**kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,  # type: ignore[arg-type]
    )


class _Loader:
    """A plain iterable over a list of batches (Lightning takes a bare list as a list of loaders)."""

    def __init__(self, batches: list[lb.Batch]) -> None:
        self.batches = batches

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _deepfm(tables: lb.Tables, **kw: object) -> DeepFM:
    torch.manual_seed(0)  # the dense layers' initialisation
    return DeepFM(tables, embedding_dim=DIM, hidden=(8,), num_dense=NUM_DENSE, seed=3, **kw)  # type: ignore[arg-type]


def _dlrm(tables: lb.Tables, **kw: object) -> DLRM:
    torch.manual_seed(0)  # the dense layers' initialisation
    return DLRM(tables, embedding_dim=DIM, bottom=(8, DIM), top=(8, 1), num_dense=NUM_DENSE, seed=3, **kw)  # type: ignore[arg-type]


def _pooled_by_hand(model: DeepFM | DLRM, batch: lb.Batch, width: int) -> torch.Tensor:
    """``[B, F, width]`` sum-pooled rows, looked up one occurrence at a time in the full store table."""
    tables = model.embedding.tables
    full = model.embedding.store.tensor()
    sp = batch.sparse
    b, nf = sp.batch_size, sp.num_features
    out = torch.zeros(b, nf, width)
    pos = 0
    lengths = sp.lengths.tolist()
    for f in range(nf):
        for s in range(b):
            for _ in range(lengths[f * b + s]):
                out[s, f] += full[int(tables.offsets[f]) + int(sp.values[pos]), :width]
                pos += 1
    return out


# ---------------------------------------------------------------------- interaction math
def test_fm_second_order_equals_sum_over_feature_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(5, 6, 3, generator=g, dtype=torch.float64)
    expect = torch.zeros(5, dtype=torch.float64)
    for f, h in itertools.combinations(range(6), 2):
        expect += (emb[:, f] * emb[:, h]).sum(1)
    torch.testing.assert_close(fm_second_order(emb), expect, rtol=1e-12, atol=1e-12)


def test_fm_second_order_gradients_are_those_of_the_pairwise_sum() -> None:
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    weights = torch.randn(4, generator=g, dtype=torch.float64)
    a = emb.clone().requires_grad_()
    (fm_second_order(a) * weights).sum().backward()
    b = emb.clone().requires_grad_()
    pairs = sum((b[:, f] * b[:, h]).sum(1) for f, h in itertools.combinations(range(5), 2))
    (pairs * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    # on a strided view (DeepFM splits the first-order column off the cached rows), and twice differentiable
    rows = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: fm_second_order(r[..., :5]), (rows,))
    assert torch.autograd.gradgradcheck(lambda r: fm_second_order(r[..., :5]), (rows,))


def test_pairwise_dot_interactions_equal_upper_triangle_dots_in_order() -> None:
    g = torch.Generator().manual_seed(1)
    vec = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    cols = [(vec[:, i] * vec[:, j]).sum(1) for i in range(5) for j in range(i + 1, 5)]
    got = pairwise_dot_interactions(vec)
    assert got.shape == (4, 10)
    torch.testing.assert_close(got, torch.stack(cols, 1), rtol=1e-12, atol=1e-12)


def test_interaction_functions_reject_wrong_rank() -> None:
    with pytest.raises(ValueError, match=r"\[batch, features, dim\]"):
        fm_second_order(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\[batch, vectors, dim\]"):
        pairwise_dot_interactions(torch.zeros(3))


def test_mlp_layers_and_bad_width() -> None:
    net = mlp(5, [7, 2], last_activation=False)
    assert [type(m).__name__ for m in net] == ["Linear", "ReLU", "Linear"]
    assert net(torch.zeros(3, 5)).shape == (3, 2)
    assert type(mlp(5, [7], last_activation=True)[-1]).__name__ == "ReLU"
    with pytest.raises(ValueError, match=r"layer 1 width .* got 0"):
        mlp(5, [7, 0], last_activation=False)


# ---------------------------------------------------------------------- full forward vs by-hand math
@pytest.mark.parametrize("multi_hot", [1, 3])
def test_deepfm_forward_equals_reference(multi_hot: int) -> None:
    tables = small_tables()
    model = _deepfm(tables).eval()
    batch = random_batches(tables, 1, 6, multi_hot=multi_hot, num_dense=NUM_DENSE, seed=5)[0]
    rows = _pooled_by_hand(model, batch, DIM + 1)
    emb, first = rows[..., :DIM], rows[..., DIM]
    dense = batch.dense
    assert dense is not None
    fm = torch.zeros(6)
    for f, h in itertools.combinations(range(len(tables)), 2):
        fm += (emb[:, f] * emb[:, h]).sum(1)
    linear = dense @ model.dense_linear.weight[0] + model.bias  # type: ignore[union-attr]
    deep = model.deep(torch.cat([emb.reshape(6, -1), dense], 1)).squeeze(1)
    with torch.no_grad():
        got = model(batch)
        parts = model.parts(batch)
    assert got.shape == (6,)
    torch.testing.assert_close(parts["first_order"], first.sum(1))
    torch.testing.assert_close(parts["fm"], fm)
    torch.testing.assert_close(got, first.sum(1) + linear.detach() + fm + deep.detach())


def test_dlrm_forward_equals_reference() -> None:
    tables = small_tables()
    model = _dlrm(tables).eval()
    batch = random_batches(tables, 1, 5, num_dense=NUM_DENSE, seed=6)[0]
    emb = _pooled_by_hand(model, batch, DIM)
    assert batch.dense is not None
    with torch.no_grad():
        x = model.bottom(batch.dense)
        vecs = [x] + [emb[:, f] for f in range(len(tables))]
        dots = [(vecs[i] * vecs[j]).sum(1) for i in range(len(vecs)) for j in range(i + 1, len(vecs))]
        expect = model.top(torch.cat([x, torch.stack(dots, 1)], 1)).squeeze(1)
        got = model(batch)
    assert got.shape == (5,)
    assert len(dots) == 6  # (F + 1) * F / 2 with F = 3
    torch.testing.assert_close(got, expect)


# ---------------------------------------------------------------------- configuration errors
def test_configuration_errors_name_the_value() -> None:
    tables = small_tables()
    with pytest.raises(ValueError, match=r"bottom MLP must end at embedding_dim=4"):
        DLRM(tables, embedding_dim=4, bottom=(8, 5), num_dense=NUM_DENSE)
    with pytest.raises(ValueError, match=r"top MLP must end in 1 output"):
        DLRM(tables, embedding_dim=4, bottom=(4,), top=(8, 2), num_dense=NUM_DENSE)
    with pytest.raises(ValueError, match=r"num_dense"):
        DLRM(tables, embedding_dim=4, bottom=(4,), num_dense=0)
    with pytest.raises(ValueError, match=r"hidden\[1\] must be a positive integer, got -3"):
        DeepFM(tables, hidden=(4, -3))
    with pytest.raises(ValueError, match=r"dense_optimizer must be one of"):
        DeepFM(tables, dense_optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"dense_lr must be a positive number, got 0"):
        DeepFM(tables, dense_lr=0)
    with pytest.raises(ValueError, match=r"tables\[1\] must be a TableSpec or a \[name, rows\] pair"):
        DeepFM([["a", 3], ["b"]])


def test_bad_batches_are_clear_errors() -> None:
    tables = small_tables()
    model = _deepfm(tables).eval()
    batch = random_batches(tables, 1, 4, num_dense=5, seed=0)[0]
    with pytest.raises(ValueError, match=r"batch.dense of shape \[4, 3\] .* got \[4, 5\]"):
        model(batch)
    batch = random_batches(tables, 1, 4, num_dense=NUM_DENSE, seed=0)[0]
    batch.labels = None
    with pytest.raises(ValueError, match=r"training_step: the batch has no labels"):
        model.training_step(batch, 0)


def test_deepfm_without_dense_features() -> None:
    tables = small_tables()
    model = DeepFM(tables, embedding_dim=DIM, hidden=(8,), num_dense=0).eval()
    batch = random_batches(tables, 1, 4, num_dense=1, seed=0)[0]
    batch.dense = None
    assert model(batch).shape == (4,)


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize("build", [_deepfm, _dlrm], ids=["deepfm", "dlrm"])
@pytest.mark.parametrize("dense_optimizer", ["adam", "adagrad"])
def test_plain_trainer_trains_dense_only(build: object, dense_optimizer: str) -> None:
    """Outside strategy='bagpipe' the dense weights train and the tables stay as they are (with a warning)."""
    tables = small_tables()
    model = build(tables, dense_optimizer=dense_optimizer)  # type: ignore[operator]
    before_rows = model.embedding.store.tensor().clone()
    before_dense = [p.detach().clone() for p in model.parameters()]
    batches = random_batches(tables, 4, 8, num_dense=NUM_DENSE, seed=2)
    trainer = _trainer(max_steps=4)
    with pytest.warns(UserWarning, match="training outside strategy='bagpipe'"):
        trainer.fit(model, train_dataloaders=_Loader(batches))
    assert trainer.global_step == 4
    opt = trainer.optimizers[0]
    assert type(opt).__name__.lower() == dense_optimizer
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before_dense, model.parameters()))
    assert torch.equal(model.embedding.store.tensor(), before_rows)
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))


def _learnable_batches(tables: lb.Tables, n: int, size: int, seed: int) -> list[lb.Batch]:
    """Labels decided by the parity of feature 0's id: learnable only through the embeddings."""
    out = random_batches(tables, n, size, num_dense=NUM_DENSE, zipf=1.05, seed=seed)
    for b in out:
        f0 = b.sparse.values[:size]
        b.labels = (f0 % 2).float()
    return out


def _mean_loss(model: DeepFM | DLRM, batches: list[lb.Batch]) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        losses = [F.binary_cross_entropy_with_logits(model(b), b.labels, reduction="sum") for b in batches]  # type: ignore[arg-type]
    model.train(was_training)  # Lightning keeps a module's eval mode during fit: restore it
    return float(sum(losses)) / sum(b.batch_size for b in batches)


@pytest.mark.parametrize("build", [_deepfm, _dlrm], ids=["deepfm", "dlrm"])
def test_bagpipe_strategy_training_decreases_loss(build: object) -> None:
    tables = small_tables()
    batches = _learnable_batches(tables, 20, 32, seed=4)
    model = build(tables, sparse_lr=0.2, dense_lr=0.01)  # type: ignore[operator]
    rows_before = model.embedding.store.tensor().clone()
    loss_before = _mean_loss(model, batches)
    labels = torch.cat([b.labels for b in batches])  # type: ignore[misc]
    p = float(labels.mean())
    best_constant = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    dm = ListDataModule(tables, batches, lookahead=4, cache_rows=40)
    trainer = _trainer(strategy="bagpipe", max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, dm)
    assert not [w for w in caught if "training outside" in str(w.message)]
    loss_after = _mean_loss(model, batches)
    assert trainer.global_step == 40
    assert not torch.equal(model.embedding.store.tensor(), rows_before)  # the tables trained
    assert loss_after < loss_before - 0.1
    assert loss_after < best_constant - 0.05  # better than any constant: the embeddings learned the parity
    stats = trainer.strategy.cache_stats  # type: ignore[attr-defined]
    assert stats is not None and stats.steps == 40 and stats.rows_fetched > 0


def test_train_loss_epoch_is_the_sample_weighted_mean_of_each_epoch() -> None:
    tables = small_tables()
    batches = _learnable_batches(tables, 6, 32, seed=5)
    batches[-1] = batches[-1].slice_samples(0, 8)  # a short last batch: the mean is sample-weighted
    losses: list[tuple[float, int]] = []
    epoch_means: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            losses.append((float(outputs["loss"]), batch.batch_size))

        # (the module's own on_train_epoch_end, which logs the mean, runs after the callbacks')
        def on_train_epoch_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            if trainer.current_epoch:
                epoch_means.append(float(trainer.callback_metrics["train_loss_epoch"]))

        def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            epoch_means.append(float(trainer.callback_metrics["train_loss_epoch"]))

    trainer = _trainer(max_epochs=2, callbacks=[Record()])
    trainer.fit(_deepfm(tables), train_dataloaders=_Loader(batches))
    for e in range(2):
        part = losses[6 * e : 6 * (e + 1)]
        expect = sum(v * n for v, n in part) / sum(n for _, n in part)
        assert epoch_means[e] == pytest.approx(expect, rel=1e-5)
    assert epoch_means[0] != epoch_means[1]  # reset between epochs


# ---------------------------------------------------------------------- metrics and prediction
def _auc_by_pairs(labels: list[float], scores: list[float]) -> float:
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_epoch_metrics_equal_plain_formulas(stage: str) -> None:
    tables = small_tables()
    model = _dlrm(tables)
    # batches of different sizes: the log loss must be the mean over samples, not over batches
    batches = [random_batches(tables, 1, n, num_dense=NUM_DENSE, seed=10 + n)[0] for n in (7, 20, 3)]
    labels: list[float] = []
    scores: list[float] = []
    bce: list[float] = []
    model.eval()
    with torch.no_grad():
        for b in batches:
            for y, z in zip(b.labels.tolist(), model(b).tolist()):  # type: ignore[union-attr]
                prob = 1.0 / (1.0 + math.exp(-z))
                labels.append(y)
                scores.append(prob)
                bce.append(-(y * math.log(prob) + (1 - y) * math.log(1 - prob)))
    trainer = _trainer()
    out = getattr(trainer, stage)(model, dataloaders=_Loader(batches), verbose=False)[0]
    prefix = "val" if stage == "validate" else "test"
    assert set(out) == {f"{prefix}_auc", f"{prefix}_logloss"}
    assert out[f"{prefix}_auc"] == pytest.approx(_auc_by_pairs(labels, scores), abs=1e-6)
    assert out[f"{prefix}_logloss"] == pytest.approx(sum(bce) / len(bce), rel=1e-5)


def test_predict_returns_probabilities() -> None:
    tables = small_tables()
    model = _deepfm(tables)
    batches = random_batches(tables, 2, 5, num_dense=NUM_DENSE, seed=8)
    preds = _trainer().predict(model, dataloaders=_Loader(batches))
    assert preds is not None and len(preds) == 2
    model.eval()
    with torch.no_grad():
        for b, p in zip(batches, preds):
            assert isinstance(p, torch.Tensor) and p.shape == (5,)
            assert bool(((p > 0) & (p < 1)).all())
            torch.testing.assert_close(p, torch.sigmoid(model(b)))


# ---------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_after_bagpipe_training(tmp_path: object) -> None:
    tables = small_tables()
    batches = random_batches(tables, 6, 16, num_dense=NUM_DENSE, seed=9)
    model = _deepfm(tables, sparse_optimizer=lb.optim.Adam(lr=0.01), dense_optimizer="adagrad")
    trainer = _trainer(strategy="bagpipe", max_steps=6)
    trainer.fit(model, ListDataModule(tables, batches, lookahead=2, cache_rows=60))
    path = f"{tmp_path}/m.ckpt"
    trainer.save_checkpoint(path)
    loaded = DeepFM.load_from_checkpoint(path)  # torch's default weights-only loading
    h = loaded.hparams
    assert h["tables"] == tables.to_list() and h["hidden"] == [8] and h["store"] is None
    assert h["sparse_optimizer"]["name"] == "adam" and h["dense_optimizer"] == "adagrad"
    assert isinstance(loaded.embedding.optimizer, lb.optim.Adam)
    torch.testing.assert_close(
        loaded.embedding.store.tensor(), model.embedding.store.tensor(), rtol=0, atol=0
    )
    model.eval()
    loaded.eval()
    with torch.no_grad():
        for b in batches[:2]:
            torch.testing.assert_close(loaded(b), model(b), rtol=0, atol=0)


def test_store_path_is_recorded_and_used(tmp_path: object) -> None:
    tables = small_tables()
    path = f"{tmp_path}/tables.f32"
    model = _dlrm(tables, store=path)
    assert model.hparams["store"] == path
    assert isinstance(model.embedding.store, lb.MmapStore)
    again = _dlrm(tables, store=model.embedding.store)
    assert again.hparams["store"] == path
    assert np.array_equal(again.embedding.store.tensor().numpy(), model.embedding.store.tensor().numpy())


def test_loading_a_checkpoint_leaves_the_training_file_alone(tmp_path: Path) -> None:
    # the hparams name the file the run trained on: loading must not write the checkpoint's rows into it
    tables = small_tables()
    batches = random_batches(tables, 6, 16, num_dense=NUM_DENSE, seed=9)
    trained_on = tmp_path / "tables.f32"
    model = _deepfm(tables, store=str(trained_on))
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    trainer = pl.Trainer(
        strategy="bagpipe", max_steps=6, callbacks=[ckpt], logger=False, enable_progress_bar=False
    )
    trainer.fit(model, ListDataModule(tables, batches, lookahead=2, cache_rows=60))
    model.embedding.store.flush()
    after_training = trained_on.read_bytes()
    early = torch.load(tmp_path / "step=3.ckpt", weights_only=True)["state_dict"]["embedding.rows"]
    assert not torch.equal(early, model.embedding.store.tensor())  # the file has moved on since step 3
    loaded = DeepFM.load_from_checkpoint(tmp_path / "step=3.ckpt")
    assert isinstance(loaded.embedding.store, lb.MemoryStore) and loaded.hparams["store"] is None
    assert torch.equal(loaded.embedding.store.tensor(), early)
    assert trained_on.read_bytes() == after_training
    into = tmp_path / "serve.f32"  # an explicit store= is honoured
    served = DeepFM.load_from_checkpoint(tmp_path / "step=3.ckpt", store=str(into))
    assert isinstance(served.embedding.store, lb.MmapStore) and served.hparams["store"] == str(into)
    assert torch.equal(served.embedding.store.tensor(), early)


def test_load_from_checkpoint_reads_directory_checkpoints(tmp_path: Path) -> None:
    tables = small_tables()
    batches = random_batches(tables, 4, 16, num_dense=NUM_DENSE, seed=2)
    model = _dlrm(tables)
    trainer = _trainer(strategy=lb.BagpipeStrategy(checkpoint_layout="directory"), max_steps=4)
    trainer.fit(model, ListDataModule(tables, batches, lookahead=2))
    trainer.save_checkpoint(tmp_path / "d.ckpt")
    assert (tmp_path / "d.ckpt").is_dir()
    loaded = DLRM.load_from_checkpoint(tmp_path / "d.ckpt")
    assert torch.equal(loaded.embedding.store.tensor(), model.embedding.store.tensor())
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), model.parameters()))


def test_tables_too_large_for_ram_ask_for_a_file_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lightning_bagpipe.models.common._memory_available", lambda: 1000 * 5 * 4 - 1)
    with pytest.raises(ValueError, match=r"1,000 rows x 5 floats.*store='tables.f32'"):
        memory_store_for_loading(1000, 5)
    monkeypatch.setattr("lightning_bagpipe.models.common._memory_available", lambda: 1000 * 5 * 4)
    assert memory_store_for_loading(1000, 5).tensor().shape == (1000, 5)


def test_model_tables_refuse_a_fractional_row_count() -> None:
    # (int() truncated it: a table of 10.7 rows silently lost its last row)
    with pytest.raises(ValueError, match=r"table 'a': num_embeddings must be an integer >= 1, got 10.7"):
        coerce_tables([("a", 10.7), ("b", 5)])
    assert coerce_tables([("a", 10), ("b", np.int64(5))]).sizes.tolist() == [10, 5]


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
@pytest.mark.parametrize("build", [_deepfm, _dlrm], ids=["deepfm", "dlrm"])
def test_the_models_train_under_a_true_precision(build, precision: str) -> None:
    # (the pooled rows stayed float32 and the dense input was cast to float32, so the first layer of the
    # bf16 or float64 model failed with a dtype mismatch); the rows stay float32 in the cache and store
    tables = small_tables()
    model = build(tables)
    before = model.embedding.store.tensor().clone()
    trainer = pl.Trainer(
        strategy="bagpipe",
        accelerator="cpu",
        precision=precision,  # type: ignore[arg-type]
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    batches = random_batches(tables, 6, 8, num_dense=NUM_DENSE, multi_hot=2)
    trainer.fit(model, datamodule=ListDataModule(tables, batches, batches[:2], lookahead=2))
    wanted = torch.bfloat16 if precision == "bf16-true" else torch.float64
    assert all(p.dtype == wanted for p in model.parameters())
    rows = model.embedding.store.tensor()
    assert rows.dtype == torch.float32 and not torch.equal(rows, before) and torch.isfinite(rows).all()
