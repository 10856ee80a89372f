"""CriteoDataModule through a Trainer: test and predict data, and no validation data."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden

import lightning_bagpipe as lb
from lightning_bagpipe.data import convert
from lightning_bagpipe.data.criteo import CriteoDataModule
from lightning_bagpipe.data.criteo_tsv import ModuloHashing, Vocabulary
from lightning_bagpipe.data.loader import EvalLoader
from tests.helpers import TinyModel, quiet_trainer
from tests.test_criteo_tsv import SIZES, random_lines, write


class CountingModel(TinyModel):
    """Counts the samples its test steps see."""

    def __init__(self, tables: lb.Tables) -> None:
        super().__init__(tables, num_dense=13)
        self.tested = 0

    def test_step(self, batch: lb.Batch, batch_idx: int) -> torch.Tensor:
        self.tested += batch.batch_size
        return super().test_step(batch, batch_idx)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Tiny TSV files: labeled training and test data, unlabeled (39-field) prediction data."""
    return {
        "train": write(tmp_path / "train.tsv", random_lines(np.random.default_rng(0), 40)),
        "test": write(tmp_path / "test.tsv", random_lines(np.random.default_rng(1), 37)),
        "predict": write(tmp_path / "pred.txt", random_lines(np.random.default_rng(2), 29, labeled=False)),
    }


def test_test_and_predict_read_their_files(files, tmp_path):
    # labeled=True describes the training and test files; prediction files are detected (unlabeled here).
    dm = CriteoDataModule(
        files["train"],
        test_path=files["test"],
        predict_path=files["predict"],
        batch_size=16,
        table_sizes=SIZES,
        labeled=True,
    )
    model = CountingModel(dm.tables)
    (metrics,) = quiet_trainer().test(model, datamodule=dm, verbose=False)
    assert model.tested == 37 and np.isfinite(metrics["val_loss"])  # batches of 16, 16 and 5
    predictions = quiet_trainer().predict(model, datamodule=dm)
    assert [p.shape[0] for p in predictions] == [16, 13]  # every sample of the 29 has one
    tsv_pred = torch.cat(predictions)
    assert ((tsv_pred > 0) & (tsv_pred < 1)).all()
    # The same prediction data as Parquet (no label column) gives the same predictions.
    out = tmp_path / "pred_pq"
    convert.convert_tsv(files["predict"], out, hashing=ModuloHashing(SIZES), progress=False)
    pq_dm = CriteoDataModule(files["train"], predict_path=out, batch_size=16, table_sizes=SIZES)
    assert torch.equal(torch.cat(quiet_trainer().predict(model, datamodule=pq_dm)), tsv_pred)


def test_missing_test_or_predict_data_is_a_clear_error(files):
    dm = CriteoDataModule(files["train"], batch_size=16, table_sizes=SIZES)
    model = TinyModel(dm.tables, num_dense=13)
    with pytest.raises(
        ValueError, match=r"train\.tsv'\) has no data for trainer\.predict: pass predict_path="
    ):
        quiet_trainer().predict(model, datamodule=dm)
    with pytest.raises(ValueError, match=r"has no data for trainer\.test: pass test_path="):
        dm.test_dataloader()


def test_evaluation_data_must_share_tables(files, tmp_path):
    out = tmp_path / "other_pq"
    convert.convert_tsv(files["predict"], out, hashing=ModuloHashing(50), progress=False)
    with pytest.raises(ValueError, match=r"prediction data '.*other_pq' has .* they must share tables"):
        CriteoDataModule(files["train"], predict_path=out, batch_size=16, table_sizes=SIZES)


def test_tsv_evaluation_of_parquet_training_data_needs_the_conversions_vocabulary(files, tmp_path):
    # (it built a vocabulary from the validation file, then refused the tables the two did not share)
    out = tmp_path / "train_pq"
    convert.convert_tsv(files["train"], out, hashing=Vocabulary.build(files["train"]), progress=False)
    with pytest.raises(ValueError, match=r"the training data is Parquet .* give vocab_path \(--vocab-path\)"):
        CriteoDataModule(out, val_path=files["test"], batch_size=16, hashing="vocab", labeled=True)
    with pytest.raises(
        ValueError, match=r"they must share tables \(a TSV file read with Parquet training data"
    ):
        CriteoDataModule(out, val_path=files["test"], batch_size=16, labeled=True)  # (modulo hashing)
    vocab = tmp_path / "vocabulary.npz"
    Vocabulary.build(files["train"]).save(vocab)
    dm = CriteoDataModule(out, val_path=files["test"], batch_size=16, hashing="vocab", vocab_path=vocab)
    assert dm.val_data.tables == dm.tables  # type: ignore[union-attr]


def test_no_validation_data_means_no_validation_loader(files):
    dm = CriteoDataModule(files["train"], batch_size=16, table_sizes=SIZES)
    # Lightning sees no val_dataloader (instead of an empty list, whose zero length it warns about).
    assert not is_overridden("val_dataloader", dm, pl.LightningDataModule)
    assert is_overridden("val_dataloader", CriteoDataModule(files["train"], val_path=files["test"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=1).fit(TinyModel(dm.tables, num_dense=13), datamodule=dm)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "Total length" in m], messages
    synthetic = CriteoDataModule("synthetic", scale=0.001, batch_size=8, num_batches=1, val_batches=0)
    assert not is_overridden("val_dataloader", synthetic, pl.LightningDataModule)


def test_synthetic_tests_and_predicts_on_the_test_split():
    dm = CriteoDataModule("synthetic", scale=0.001, batch_size=32, num_batches=2, val_batches=2)
    test = dm.test_data
    assert test is not None and test.split == "test" and len(test) == 2 and dm.predict_data is test
    assert dm.val_data is not None
    assert not torch.equal(next(iter(test)).sparse.values, next(iter(dm.val_data)).sparse.values)
    predictions = quiet_trainer().predict(TinyModel(dm.tables, num_dense=13), datamodule=dm)
    assert sum(p.shape[0] for p in predictions) == 64
    options = {"scale": 0.001, "batch_size": 8, "num_batches": 1}
    assert len(CriteoDataModule("synthetic", test_batches=3, **options).test_data) == 3  # type: ignore[arg-type]
    none = CriteoDataModule("synthetic", val_batches=0, **options)
    assert none.test_data is None and none.predict_data is None
    with pytest.raises(ValueError, match="pass test_batches > 0"):
        none.predict_dataloader()
    with pytest.raises(ValueError, match="test_path is for file sources"):
        CriteoDataModule("synthetic", test_path="x", **options)


def test_test_batches_is_for_synthetic_data(files):
    with pytest.raises(ValueError, match="test_batches is for synthetic data"):
        CriteoDataModule(files["train"], test_batches=2, batch_size=16, table_sizes=SIZES)


class _Ranks:
    """What the data module asks its Trainer: this process's rank and the number of processes."""

    def __init__(self, world_size: int) -> None:
        self.global_rank, self.world_size = 0, world_size


def test_evaluation_batches_too_small_for_the_processes_are_refused_up_front(files, tmp_path):
    # 37 samples in batches of 18 leave a last batch of 1, fewer than 2 processes. Evaluation keeps every
    # sample (no drop_last, whatever the training data's): the message suggests batch sizes or fewer
    # processes, and its length being known (Parquet), it comes when the loader is asked for.
    out = tmp_path / "test_pq"
    convert.convert_tsv(files["test"], out, hashing=ModuloHashing(SIZES), progress=False)
    paths = {"val_path": out, "test_path": out, "predict_path": out}
    dm = CriteoDataModule(files["train"], **paths, batch_size=18, table_sizes=SIZES, drop_last=True)
    dm.trainer = _Ranks(2)  # type: ignore[assignment]
    hooks = {"validation": dm.val_dataloader, "test": dm.test_dataloader, "prediction": dm.predict_dataloader}
    for what, hook in hooks.items():
        with pytest.raises(
            ValueError, match=rf"{what} data '.*test_pq' \(\w+_path\) has 37 samples: "
        ) as err:
            hook()
        message = str(err.value)
        assert "batch_size=18 leaves a last batch of 1 sample(s), fewer than the 2 processes" in message
        assert "drop_last=True" not in message and "use at most 1 process(es)" in message
    found = re.search(r"\(e\.g\. (\d+) or (\d+)\)", message)
    assert found is not None
    for size in map(int, found.groups()):  # the suggested batch sizes do fit
        fits = CriteoDataModule(files["train"], val_path=out, batch_size=size, table_sizes=SIZES)
        fits.trainer = _Ranks(2)  # type: ignore[assignment]
        fits.val_dataloader()
        ranks = [EvalLoader(fits.val_source, fits.tables, rank, 2, "val") for rank in (0, 1)]
        assert sum(b.batch_size for loader in ranks for b in loader) == 37
    dm.trainer = _Ranks(1)  # type: ignore[assignment]
    assert sum(b.batch_size for b in dm.val_dataloader()) == 37


def test_evaluation_batch_too_small_for_the_processes_names_the_evaluation_fixes(files):
    # TSV: the length is unknown until read, so the loader refuses the batch when it comes; its message
    # is about evaluation, which keeps every sample: a batch size or fewer processes, not drop_last
    # (CriteoDataModule's evaluation sources take none).
    dm = CriteoDataModule(files["train"], val_path=files["test"], batch_size=18, table_sizes=SIZES)
    dm.trainer = _Ranks(2)  # type: ignore[assignment]
    loader = dm.val_dataloader()
    with pytest.raises(
        ValueError, match=r"val batch 2 has 1 sample\(s\) and cannot be split over 2 ranks"
    ) as err:
        list(loader)
    message = str(err.value)
    assert "Evaluation keeps every sample: choose a batch size that leaves the last, partial batch" in message
    assert message.endswith("or use at most 1 process(es)") and "drop_last" not in message
