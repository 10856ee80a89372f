"""The promise: training with strategy="bagpipe" gives the same model as training without any cache.

(a) trains a small model with CachedEmbedding under ``strategy="bagpipe"`` and a capacity that forces
evictions; (b) trains the same model in a plain loop on full tables, with each sparse optimizer's math
written out below (not the project's optimizer code). Weights, optimizer state and dense parameters must
agree within 1e-6.
"""

from __future__ import annotations

import copy
import itertools
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import GradientAccumulationScheduler

import lightning_bagpipe as lb
from tests.helpers import ListDataModule, TinyModel, quiet_trainer, random_batches, small_tables

STEPS = 50
BATCH = 16
DIM = 4
DENSE_LR = 0.05


# ---------------------------------------------------------------------- plain reference math
def ref_update(name: str, hp: dict, w: torch.Tensor, state: torch.Tensor, ids: torch.Tensor, g: torch.Tensor):
    """Update rows ``ids`` of full table ``w`` and state ``state`` with their summed gradients ``g``."""
    lr = hp["lr"]
    if name == "sgd":
        w[ids] -= lr * g
    elif name == "adagrad":
        acc = state[ids] + g * g
        state[ids] = acc
        w[ids] -= lr * g / (acc.sqrt() + hp["eps"])
    elif name == "rowwise_adagrad":
        acc = state[ids, 0] + (g * g).mean(1)
        state[ids, 0] = acc
        w[ids] -= lr * g / (acc.sqrt() + hp["eps"]).unsqueeze(1)
    elif name == "adam":
        b1, b2 = hp["betas"]
        d = w.shape[1]
        # torch.optim.Adam's formula, per row, with the row's own step count k (bias corrections in float64
        # as torch computes them from Python floats)
        m, v, k = state[ids, :d], state[ids, d : 2 * d], state[ids, 2 * d] + 1
        m = m + (1 - b1) * (g - m)
        v = b2 * v + (1 - b2) * g * g
        k64 = k.double().unsqueeze(1)
        step_size = (lr / (1 - b1**k64)).float()
        bc2_sqrt = (1 - b2**k64).sqrt().float()
        w[ids] -= step_size * (m / (v.sqrt() / bc2_sqrt + hp["eps"]))
        state[ids, :d], state[ids, d : 2 * d], state[ids, 2 * d] = m, v, k
    else:
        raise AssertionError(name)


def train_reference(
    model: TinyModel,
    batches: list[lb.Batch],
    name: str,
    hp: dict,
    twice: bool = False,
    dtype: torch.dtype = torch.float32,
    bf16_autocast: bool = False,
    accumulate: int | list[int] = 1,
):
    """The plain loop on full tables, in ``dtype`` (float64: the float32 runs' common ground truth); with
    ``bf16_autocast`` the forward runs under CPU autocast to bfloat16, as Lightning's "bf16-mixed" runs a
    training step. ``accumulate`` (per epoch of ``len(batches)`` batches when a list) sums the
    gradients of that many consecutive batches, each loss divided by it, before one update (the last group
    of an epoch may be shorter), as Lightning's ``accumulate_grad_batches`` does."""
    tables = model.emb.tables
    full = model.emb.store.tensor().clone().to(dtype)
    table = full[:, :DIM].clone()
    state = full[:, DIM:].clone()
    head = copy.deepcopy(model.head).to(dtype)
    opt = torch.optim.SGD(head.parameters(), lr=DENSE_LR)
    offsets = torch.as_tensor(tables.offsets)
    groups = []
    for k in accumulate if isinstance(accumulate, list) else [accumulate]:
        groups += [(k, batches[i : i + k]) for i in range(0, len(batches), k)]
    for k, group in groups:
        leaf = table.clone().requires_grad_()
        opt.zero_grad()
        touched = []
        for batch in group:
            sp = batch.sparse
            key_of = torch.repeat_interleave(
                torch.arange(len(tables)), sp.lengths.view(len(tables), -1).sum(1)
            )
            ids = sp.values + offsets[key_of]
            weights = None if sp.weights is None else sp.weights.to(dtype)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
                # TwiceModel looks the same rows up a second time: two lookups, whose gradients autograd sums
                lookups = [
                    F.embedding_bag(
                        ids, leaf, sp.offsets[:-1], mode=model.emb.pooling, per_sample_weights=weights
                    )
                    .view(len(tables), BATCH, DIM)
                    .transpose(0, 1)
                    for _ in range(2 if twice else 1)
                ]
                e = lookups[0] + 0.5 * lookups[1] if twice else lookups[0]
                loss = F.binary_cross_entropy_with_logits(
                    head(torch.cat([e.flatten(1), batch.dense.to(dtype)], 1)).squeeze(1),
                    batch.labels.to(dtype),
                )
            (loss / k if k > 1 else loss).backward()
            touched.append(ids)
        opt.step()
        rows = torch.unique(torch.cat(touched))
        with torch.no_grad():
            ref_update(name, hp, table, state, rows, leaf.grad[rows])
    return table, state, head


OPTIMIZERS = {
    "sgd": (lambda: lb.optim.SGD(lr=0.1), {"lr": 0.1}),
    "adagrad": (lambda: lb.optim.Adagrad(lr=0.1, eps=1e-10), {"lr": 0.1, "eps": 1e-10}),
    "rowwise_adagrad": (lambda: lb.optim.RowWiseAdagrad(lr=0.1, eps=1e-10), {"lr": 0.1, "eps": 1e-10}),
    "adam": (
        lambda: lb.optim.Adam(lr=0.01, betas=(0.9, 0.999), eps=1e-8),
        {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8},
    ),
}


@pytest.mark.parametrize("multi_hot", [1, 3], ids=["one_hot", "multi_hot"])
@pytest.mark.parametrize("lookahead", [1, 4, 32])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_bagpipe_equals_uncached_training(opt_name: str, lookahead: int, multi_hot: int) -> None:
    tables = small_tables((60, 45, 35))
    batches = random_batches(tables, STEPS, BATCH, multi_hot=multi_hot, seed=lookahead + multi_hot)
    # capacity: room for two consecutive steps' rows, far below the 140 rows the tables hold
    max_pair = max(
        len(set(a.sparse.fused_ids(tables)) | set(b.sparse.fused_ids(tables)))
        for a, b in itertools.pairwise(batches)
    )
    capacity = max_pair + 4
    make_opt, hp = OPTIMIZERS[opt_name]
    torch.manual_seed(0)
    model = TinyModel(tables, make_opt(), dense_lr=DENSE_LR)
    ref_table, ref_state, ref_head = train_reference(model, batches, opt_name, hp)

    dm = ListDataModule(tables, batches, lookahead=lookahead, cache_rows=capacity)
    trainer = pl.Trainer(
        strategy="bagpipe",
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == STEPS

    assert trainer.strategy.driver is None  # torn down after fit, flushed to the store
    stats = trainer.strategy.cache_stats
    distinct = len(set().union(*(set(b.sparse.fused_ids(tables)) for b in batches)))
    # capacity pressure: rows had to be fetched again after their slots were reused...
    assert stats.rows_fetched > distinct
    if lookahead == 32:  # ...and rows still due for reuse (dirty) were evicted and written back early
        assert stats.rows_evicted > 0
    # with L >= 4 rows were fetched prefetch_depth = 4 steps early, so the exactness covers them too
    assert (stats.early_rows > 0) is (lookahead >= 4)
    trained = model.emb.store.tensor()
    assert torch.allclose(trained[:, :DIM], ref_table, atol=1e-6, rtol=0), (
        (trained[:, :DIM] - ref_table).abs().max()
    )
    assert torch.allclose(trained[:, DIM:], ref_state, atol=1e-6, rtol=0), (
        (trained[:, DIM:] - ref_state).abs().max()
    )
    for p, q in zip(model.head.parameters(), ref_head.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)
    # the run must actually have exercised the cache: every table row cannot fit
    assert capacity < tables.total_rows
    assert not math.isnan(float(trained.sum()))


def assert_bagpipe_trains_like_reference(
    model: TinyModel, batches: list[lb.Batch], opt_name: str, twice: bool = False
) -> None:
    """Train ``model`` with bagpipe (L=4, 110 cache rows) and compare with the plain reference loop, run in
    float64: a float32 reference adds its own rounding, which row-wise Adagrad's first update (a gradient
    divided by its own norm) can amplify past the tolerance where a row's gradient nearly cancels."""
    hp = OPTIMIZERS[opt_name][1]
    ref_table, ref_state, ref_head = train_reference(model, batches, opt_name, hp, twice, dtype=torch.float64)
    quiet_trainer().fit(
        model, datamodule=ListDataModule(model.emb.tables, batches, lookahead=4, cache_rows=110)
    )
    trained = model.emb.store.tensor().double()
    assert torch.allclose(trained[:, :DIM], ref_table, atol=1e-6, rtol=0)
    assert torch.allclose(trained[:, DIM:], ref_state, atol=1e-6, rtol=0)
    for p, q in zip(model.head.parameters(), ref_head.parameters()):
        assert torch.allclose(p.double(), q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("opt_name", ["sgd", "adagrad"])
@pytest.mark.parametrize("pooling", ["weighted_sum", "mean"])
def test_weighted_and_mean_pooled_bags_train_exactly(opt_name: str, pooling: str) -> None:
    tables = small_tables((60, 45, 35))
    batches = random_batches(tables, 30, BATCH, multi_hot=3, seed=5, weighted=pooling == "weighted_sum")
    torch.manual_seed(0)
    model = TinyModel(
        tables,
        OPTIMIZERS[opt_name][0](),
        dense_lr=DENSE_LR,
        pooling="sum" if pooling == "weighted_sum" else "mean",
    )
    assert_bagpipe_trains_like_reference(model, batches, opt_name)


class TwiceModel(TinyModel):
    """Looks its embeddings up twice per step: the cache sums both lookups' gradients per row."""

    def forward(self, batch: lb.Batch) -> torch.Tensor:
        e = (self.emb(batch.sparse) + 0.5 * self.emb(batch.sparse)).flatten(1)
        return self.head(torch.cat([e, batch.dense], 1)).squeeze(1)


@pytest.mark.parametrize("opt_name", ["sgd", "rowwise_adagrad"])
def test_a_module_called_twice_in_a_step_trains_exactly(opt_name: str) -> None:
    tables = small_tables((60, 45, 35))
    batches = random_batches(tables, 20, BATCH, multi_hot=2, seed=11)
    torch.manual_seed(0)
    model = TwiceModel(tables, OPTIMIZERS[opt_name][0](), dense_lr=DENSE_LR)
    assert_bagpipe_trains_like_reference(model, batches, opt_name, twice=True)


@pytest.mark.parametrize("opt_name", ["sgd", "adagrad"])
def test_bf16_mixed_precision_trains_like_the_uncached_loop_under_autocast(opt_name: str) -> None:
    # Trainer(precision="bf16-mixed"): the dense part computes in bfloat16, the cached rows, their
    # gradients and the sparse update stay float32, as in a plain loop under autocast (float32 training
    # differs from that loop by ~1e-4, so the test tells the two apart). SGD and Adagrad agree with it to
    # 1e-8 or better; row-wise Adagrad is left out: its reference row mean rounds an ulp away from the
    # project's, and bfloat16's rounding of the following steps' activations amplifies that to ~1e-5.
    tables = small_tables((60, 45, 35))
    batches = random_batches(tables, STEPS, BATCH, multi_hot=3, seed=11)
    make_opt, hp = OPTIMIZERS[opt_name]
    torch.manual_seed(0)
    model = TinyModel(tables, make_opt(), dense_lr=DENSE_LR)
    ref_table, ref_state, ref_head = train_reference(model, batches, opt_name, hp, bf16_autocast=True)
    quiet_trainer(precision="bf16-mixed").fit(
        model, datamodule=ListDataModule(tables, batches, lookahead=4, cache_rows=110)
    )
    trained = model.emb.store.tensor()
    assert torch.allclose(trained[:, :DIM], ref_table, atol=1e-6, rtol=0)
    assert torch.allclose(trained[:, DIM:], ref_state, atol=1e-6, rtol=0)
    for p, q in zip(model.head.parameters(), ref_head.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("limit, epochs, reload", [(10, 2, 0), (7, 3, 1)])
def test_epochs_cut_short_by_limit_train_batches_train_exactly(limit: int, epochs: int, reload: int) -> None:
    # Lightning ends each epoch after ``limit`` batches, before the steps the oracle planned beyond them
    # (rows still due for write-back, a pre-step already queued); every epoch then starts over from batch 0,
    # with ``reload`` from a new loader that counts its epochs from 0 again
    tables = small_tables((60, 45, 35))
    batches = random_batches(tables, STEPS, BATCH, multi_hot=3, seed=3)
    make_opt, hp = OPTIMIZERS["adagrad"]
    torch.manual_seed(0)
    model = TinyModel(tables, make_opt(), dense_lr=DENSE_LR)
    ref_table, ref_state, ref_head = train_reference(
        model, batches[:limit] * epochs, "adagrad", hp, dtype=torch.float64
    )
    trainer = quiet_trainer(
        limit_train_batches=limit, max_epochs=epochs, reload_dataloaders_every_n_epochs=reload
    )
    trainer.fit(model, datamodule=ListDataModule(tables, batches, lookahead=8, cache_rows=110))
    assert trainer.global_step == limit * epochs
    trained = model.emb.store.tensor().double()
    assert torch.allclose(trained[:, :DIM], ref_table, atol=1e-6, rtol=0)
    assert torch.allclose(trained[:, DIM:], ref_state, atol=1e-6, rtol=0)
    for p, q in zip(model.head.parameters(), ref_head.parameters()):
        assert torch.allclose(p.double(), q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pooling", ["sum", "mean", "weighted_sum"])
def test_empty_bags_train_exactly_even_when_the_id_count_looks_one_hot(pooling: str) -> None:
    # bags of 0 to 2 ids (an empty bag is a missing value): a batch may hold exactly one id per bag on
    # average, F * B ids in all, without being one-hot; the one-hot layouts must not be taken for it
    tables = small_tables((60, 45, 35))
    batches = random_batches(
        tables, STEPS, BATCH, multi_hot=2, min_bag=0, seed=4, weighted=pooling == "weighted_sum"
    )
    looks_one_hot = [b for b in batches if b.sparse.values.numel() == len(tables) * BATCH]
    assert looks_one_hot and not any(b.sparse.is_one_hot() for b in looks_one_hot)
    assert all(bool((b.sparse.lengths == 0).any()) for b in batches)
    torch.manual_seed(0)
    # (weights with pooling "sum": a weighted sum)
    model = TinyModel(
        tables, OPTIMIZERS["adagrad"][0](), dense_lr=DENSE_LR, pooling="mean" if pooling == "mean" else "sum"
    )
    assert_bagpipe_trains_like_reference(model, batches, "adagrad")


# ---------------------------------------------------------------------- gradient accumulation
def _two_steps_rows(tables: lb.Tables, batches: list[lb.Batch], k: int) -> int:
    """The most distinct rows of two consecutive optimizer steps of ``k`` batches each."""
    steps = [
        set().union(*(set(b.sparse.fused_ids(tables)) for b in batches[i : i + k]))
        for i in range(0, len(batches), k)
    ]
    return max(len(a | b) for a, b in itertools.pairwise(steps))


@pytest.mark.parametrize("multi_hot", [1, 3], ids=["one_hot", "multi_hot"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("opt_name", ["sgd", "rowwise_adagrad", "adam"])
def test_accumulated_batches_train_like_the_uncached_loop(opt_name: str, k: int, multi_hot: int) -> None:
    # Trainer(accumulate_grad_batches=k): the rows of k batches stay cached from the first forward pass to
    # the update, which gets their gradients summed (each loss divided by k, as Lightning does). 50 batches:
    # with k=3 the epoch ends with a group of two
    tables = small_tables((60, 45, 35))
    batches = random_batches(tables, STEPS, BATCH, multi_hot=multi_hot, seed=20 + k)
    capacity = _two_steps_rows(tables, batches, k) + 4
    assert capacity < tables.total_rows
    make_opt, hp = OPTIMIZERS[opt_name]
    torch.manual_seed(0)
    model = TinyModel(tables, make_opt(), dense_lr=DENSE_LR)
    ref_table, ref_state, ref_head = train_reference(model, batches, opt_name, hp, accumulate=k)
    trainer = quiet_trainer(accumulate_grad_batches=k)
    trainer.fit(model, datamodule=ListDataModule(tables, batches, lookahead=8, cache_rows=capacity))
    assert trainer.global_step == math.ceil(STEPS / k)
    stats = trainer.strategy.cache_stats
    assert stats.steps == math.ceil(STEPS / k) and stats.rows_evicted > 0  # the cache was under pressure
    trained = model.emb.store.tensor()
    assert torch.allclose(trained[:, :DIM], ref_table, atol=1e-6, rtol=0), (
        (trained[:, :DIM] - ref_table).abs().max()
    )
    assert torch.allclose(trained[:, DIM:], ref_state, atol=1e-6, rtol=0)
    for p, q in zip(model.head.parameters(), ref_head.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)
    # and it is not what training every batch on its own gives
    plain_table, _, _ = train_reference(model, batches, opt_name, hp)
    assert not torch.allclose(trained[:, :DIM], plain_table, atol=1e-4, rtol=0)


def test_a_gradient_accumulation_schedule_trains_like_the_uncached_loop() -> None:
    # GradientAccumulationScheduler changes accumulate_grad_batches when an epoch starts, after the epoch's
    # loader has begun planning: the loader asks the schedule itself
    tables = small_tables((60, 45, 35))
    batches = random_batches(tables, 12, BATCH, multi_hot=2, seed=6)
    make_opt, hp = OPTIMIZERS["rowwise_adagrad"]
    torch.manual_seed(0)
    model = TinyModel(tables, make_opt(), dense_lr=DENSE_LR)
    schedule = [1, 3, 2]
    ref_table, ref_state, ref_head = train_reference(
        model, batches, "rowwise_adagrad", hp, dtype=torch.float64, accumulate=schedule
    )
    trainer = quiet_trainer(
        max_epochs=3, callbacks=[GradientAccumulationScheduler(dict(enumerate(schedule)))]
    )
    trainer.fit(model, datamodule=ListDataModule(tables, batches, lookahead=4, cache_rows=110))
    assert trainer.global_step == sum(math.ceil(12 / k) for k in schedule)
    trained = model.emb.store.tensor().double()
    assert torch.allclose(trained[:, :DIM], ref_table, atol=1e-6, rtol=0)
    assert torch.allclose(trained[:, DIM:], ref_state, atol=1e-6, rtol=0)
    for p, q in zip(model.head.parameters(), ref_head.parameters()):
        assert torch.allclose(p.double(), q, atol=1e-6, rtol=0)
