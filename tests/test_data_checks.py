"""What the loaders refuse in a source's batches, and how they say it: one-shot sources read again,
sparse features whose lengths do not fit their values, dense features and labels that are not float
tensors, uint64 ids beyond int64, empty batches."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

import lightning_bagpipe as lb
from lightning_bagpipe.data.loader import BagpipeLoader, EvalLoader
from tests.helpers import ListDataModule, TinyModel, quiet_trainer, random_batches, small_tables


def _loader(source: Callable[[], object], tables: lb.Tables, **kw: object) -> BagpipeLoader:
    kw.setdefault("lookahead", 3)
    kw.setdefault("cache_rows", None)
    return BagpipeLoader(source, tables, **kw)  # type: ignore[arg-type]


def _oracle_threads_end() -> None:
    deadline = time.monotonic() + 2.0
    while any(t.name.startswith("bagpipe-oracle") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "an oracle thread is still running"
        time.sleep(0.02)


# ------------------------------------------------------------------ one-shot sources
ONE_SHOT = r"the {name} source returned the same one-shot iterator \({kind}\) that an earlier pass has read"


def test_a_generator_object_returned_again_is_refused_by_both_loaders() -> None:
    # a source that returns the same generator every call: the second epoch would train on nothing
    tables = small_tables()
    batches = random_batches(tables, 4, 8)
    gen = (b for b in batches)
    loader = _loader(lambda: gen, tables)
    assert len(list(loader)) == 4
    with pytest.raises(ValueError, match=ONE_SHOT.format(name="train", kind="generator")) as info:
        list(loader)
    assert "return a new generator on each call" in str(info.value)
    _oracle_threads_end()

    gen2 = (b for b in batches)
    val = EvalLoader(lambda: gen2, tables, 0, 1, "val")
    assert len(list(val)) == 4
    with pytest.raises(ValueError, match=ONE_SHOT.format(name="val", kind="generator") + ".*val_source"):
        list(val)


def test_a_one_shot_iterator_that_cannot_be_weakly_referenced_or_was_read_part_way_is_refused() -> None:
    tables = small_tables()
    batches = random_batches(tables, 4, 8)
    it = iter(batches)  # (a list_iterator: no weak reference)
    loader = _loader(lambda: it, tables)
    assert len(list(loader)) == 4
    with pytest.raises(ValueError, match=ONE_SHOT.format(name="train", kind="list_iterator")):
        list(loader)
    # a pass stopped early (max_steps, limit_train_batches) leaves the rest: the next would start mid-way
    gen = (b for b in batches)
    ev = EvalLoader(lambda: gen, tables, 0, 1, "test")
    next(iter(ev))
    with pytest.raises(ValueError, match=ONE_SHOT.format(name="test", kind="generator")):
        list(ev)


class _Rewinding:
    """An iterator whose ``__iter__`` starts it over and returns itself (a reader class, say)."""

    def __init__(self, batches: list[lb.Batch]) -> None:
        self.batches, self.at = batches, 0

    def __iter__(self) -> _Rewinding:
        self.at = 0
        return self

    def __next__(self) -> lb.Batch:
        if self.at == len(self.batches):
            raise StopIteration
        self.at += 1
        return self.batches[self.at - 1]


def test_an_iterator_that_rewinds_itself_is_read_again_every_pass() -> None:
    tables = small_tables()
    batches = random_batches(tables, 3, 8)
    source = _Rewinding(batches)
    loader = _loader(lambda: source, tables)
    for _ in range(3):
        assert len(list(loader)) == 3
    val = EvalLoader(lambda: source, tables, 0, 1, "val")
    assert [len(list(val)) for _ in range(2)] == [3, 3]


def test_a_source_returning_a_new_generator_each_call_trains_every_epoch() -> None:
    tables = small_tables()
    batches = random_batches(tables, 3, 8)

    def fresh() -> Iterator[lb.Batch]:
        yield from batches

    loader = _loader(fresh, tables)
    for _ in range(3):
        assert len(list(loader)) == 3
    val = EvalLoader(fresh, tables, 0, 1, "val")
    assert [len(list(val)) for _ in range(2)] == [3, 3]


class _SameGenerator(ListDataModule):
    """train_source returns one generator object, made once (the mistake)."""

    def __init__(self, tables: lb.Tables, batches: list[lb.Batch]) -> None:
        super().__init__(tables, batches, lookahead=2)
        self.gen = (b for b in batches)

    def train_source(self) -> Iterator[lb.Batch]:  # type: ignore[override]
        return self.gen


def test_a_fit_over_a_train_source_that_returns_the_same_generator_stops_at_the_second_epoch() -> None:
    tables = small_tables()
    model = TinyModel(tables)
    trainer = quiet_trainer(max_epochs=2)
    with pytest.raises(ValueError, match=ONE_SHOT.format(name="train", kind="generator")):
        trainer.fit(model, datamodule=_SameGenerator(tables, random_batches(tables, 3, 8)))
    assert trainer.global_step == 3  # the first epoch trained; the second was refused, not skipped


# ------------------------------------------------------------------ sparse layout (dataclass constructor)
def _raw(tables: lb.Tables, values: torch.Tensor, lengths: torch.Tensor) -> lb.Batch:
    b = lengths.numel() // len(tables)
    return lb.Batch(lb.SparseFeatures(tables.names, values, lengths), torch.rand(max(b, 1), 3), None)


_LONG = torch.long


@pytest.mark.parametrize(
    ("values", "lengths", "message"),
    [
        (
            torch.zeros(14, dtype=_LONG),
            torch.ones(14, dtype=_LONG),
            r"14 sparse lengths are not a multiple of the 3 features \['f0', 'f1', 'f2'\]",
        ),
        (
            torch.zeros(30, dtype=_LONG),
            torch.ones(24, dtype=_LONG),
            r"sparse lengths add up to 24 ids but values holds 30 \(.*'f0': 8, 'f1': 8, 'f2': 8\}\)",
        ),
        (
            torch.zeros(24, dtype=_LONG),
            torch.tensor([1] * 9 + [-1, 2] + [1] * 13),
            r"feature 'f1': negative bag length -1 for sample 1",
        ),
        (torch.zeros(24, 1, dtype=_LONG), torch.ones(24, dtype=_LONG), r"sparse values must be 1-D"),
        (torch.zeros(24, dtype=_LONG), torch.ones(24), r"sparse lengths must be integers"),
        (torch.zeros(24, dtype=_LONG), torch.ones(3, 8, dtype=_LONG), r"sparse lengths must be 1-D"),
    ],
)
def test_sparse_features_built_raw_are_checked_as_from_lengths_checks_them(
    values: torch.Tensor, lengths: torch.Tensor, message: str
) -> None:
    # SparseFeatures(keys, values, lengths) is what the library's own sources build: the loader checks it
    tables = small_tables()
    batches = random_batches(tables, 3, 8)
    batches[1] = _raw(tables, values, lengths)  # (its dense rows follow the lengths, right or wrong)
    with pytest.raises(ValueError, match=message) as info:
        list(_loader(lambda: batches, tables))
    assert str(info.value).startswith("train batch 1: ")
    assert "dense" not in str(info.value)  # (the sparse features are at fault, not the dense rows)
    with pytest.raises(ValueError, match=message):
        batches[1].sparse.validate(tables)


def test_raw_sparse_features_that_are_not_tensors_are_refused_naming_the_field() -> None:
    tables = small_tables()
    batches = random_batches(tables, 2, 8)
    sp = batches[1].sparse
    batches[1].sparse = lb.SparseFeatures(sp.keys, sp.values, sp.lengths.numpy())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"train batch 1: sparse lengths must be a torch.Tensor, got numpy"):
        list(_loader(lambda: batches, tables))


# ------------------------------------------------------------------ dense features and labels
@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("dense", lambda b: b.dense.numpy(), TypeError, r"dense must be a torch.Tensor, got numpy.ndarray"),
        (
            "labels",
            lambda b: b.labels.numpy(),
            TypeError,
            r"labels must be a torch.Tensor, got numpy.ndarray",
        ),
        ("dense", lambda b: b.dense.int(), ValueError, r"dense must be floating point.*torch.int32"),
        (
            "dense",
            lambda b: b.dense[:, 0],
            ValueError,
            r"dense must be \[batch, features\], got shape \(8,\)",
        ),
        ("labels", lambda b: b.labels[0], ValueError, r"labels must be \[batch\], got shape \(\)"),
        ("labels", lambda b: b.labels[:5], ValueError, r"labels has 5 rows but the sparse features have 8"),
    ],
)
def test_dense_and_labels_must_be_tensors_of_the_batch_and_dense_float(
    field: str, value: Callable[[lb.Batch], object], error: type[Exception], message: str
) -> None:
    tables = small_tables()
    batches = random_batches(tables, 4, 8)
    setattr(batches[2], field, value(batches[2]))
    for loader in (_loader(lambda: batches, tables), EvalLoader(lambda: batches, tables, 0, 1, "val")):
        with pytest.raises(error, match=message) as info:
            list(loader)
        assert str(info.value).startswith(f"{loader.name} batch 2: {field} ")
    _oracle_threads_end()


def test_integer_class_labels_pass_for_a_cross_entropy_loss() -> None:
    tables = small_tables()
    batches = random_batches(tables, 2, 8)
    for b in batches:
        b.labels = torch.arange(8) % 3  # (int64 class targets)
    got = list(_loader(lambda: batches, tables))
    assert [b.labels.dtype for b in got] == [torch.int64, torch.int64]


def test_a_numpy_array_is_refused_with_the_conversion_to_use() -> None:
    tables = small_tables()
    batches = random_batches(tables, 2, 8)
    dense = batches[0].dense
    assert dense is not None
    batches[0].dense = dense.numpy()  # type: ignore[assignment]
    with pytest.raises(TypeError, match=r"^train batch 0: dense .*torch.from_numpy"):
        list(_loader(lambda: batches, tables))


# ------------------------------------------------------------------ uint64 ids
def test_uint64_ids_beyond_int64_are_refused_naming_the_value_they_hold() -> None:
    names = ["user", "item"]
    ids = np.array([[3, 4], [5, 2**64 - 1], [6, 2**63]], dtype=np.uint64)
    with pytest.raises(
        ValueError, match=r"ids of feature 'item' hold 18446744073709551615 .*sample 1"
    ) as info:
        lb.SparseFeatures.from_dense(names, ids)
    assert "-1" not in str(info.value)  # (what a wrapping cast made of it)
    with pytest.raises(ValueError, match=r"values hold 9223372036854775808 .*position 2"):
        lb.SparseFeatures.from_lengths(["a"], np.array([1, 2, 2**63], dtype=np.uint64), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"values hold 9223372036854775808"):
        lb.SparseFeatures.from_lengths(["a"], torch.tensor([2**63], dtype=torch.uint64), torch.tensor([1]))
    # uint64 ids below 2**63 are ids like any other
    ok = lb.SparseFeatures.from_dense(names, np.array([[3, 2**63 - 1]], dtype=np.uint64))
    assert ok.values.tolist() == [3, 2**63 - 1]


# ------------------------------------------------------------------ empty batches
@pytest.mark.parametrize("world_size", [1, 2])
def test_an_empty_batch_mid_stream_is_refused_at_any_world_size(world_size: int) -> None:
    # on one process it trained with a NaN loss; on several the error told to drop "the last" batch
    tables = small_tables()
    batches = [
        *random_batches(tables, 1, 8),
        *random_batches(tables, 1, 0, seed=1),
        *random_batches(tables, 2, 8),
    ]
    message = r"^{} batch 1 has 0 samples: every batch needs at least one"
    for rank in range(world_size):
        with pytest.raises(ValueError, match=message.format("train")) as info:
            list(_loader(lambda: batches, tables, rank=rank, world_size=world_size))
        assert "last" not in str(info.value)
        with pytest.raises(ValueError, match=message.format("val")) as info:
            list(EvalLoader(lambda: batches, tables, rank, world_size, "val"))
        assert "last" not in str(info.value)
    _oracle_threads_end()


def test_a_fit_on_one_process_refuses_an_empty_batch() -> None:
    tables = small_tables()
    batches = [
        *random_batches(tables, 1, 8),
        *random_batches(tables, 1, 0, seed=1),
        *random_batches(tables, 1, 8),
    ]
    model = TinyModel(tables)
    with pytest.raises(ValueError, match=r"train batch 1 has 0 samples"):
        quiet_trainer().fit(model, datamodule=ListDataModule(tables, batches, lookahead=2))
