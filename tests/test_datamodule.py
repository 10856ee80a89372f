"""BagpipeDataModule and its loaders: plans attached, rank slicing, errors, threads, resume position."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch

import lightning_bagpipe as lb
from lightning_bagpipe.data.loader import BagpipeLoader, EvalLoader, _OracleThread, rank_bounds
from tests.helpers import ListDataModule, TinyModel, quiet_trainer, random_batches, small_tables


def _oracle_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("bagpipe-oracle")]


def _loader(batches, tables, **kw) -> BagpipeLoader:
    kw.setdefault("lookahead", 3)
    kw.setdefault("cache_rows", None)
    return BagpipeLoader(lambda: batches, tables, **kw)


def test_each_batch_carries_its_plan_and_lookups_read_the_right_rows() -> None:
    tables = small_tables()
    batches = random_batches(tables, 12, 8, multi_hot=3)
    got = list(_loader(batches, tables))
    assert len(got) == 12
    resident: dict[int, int] = {}  # slot -> fused id, replaying the plans
    for i, (src, b) in enumerate(zip(batches, got)):
        plan = b.plan
        assert plan.key == (got[0].plan.key[0], i)  # (the stream's number, the step)
        assert (plan.next_key is None) == (i == 11)
        for sid, slot in zip(*plan.evict):
            assert resident.get(int(slot)) == int(sid)
        for fid, slot in zip(*plan.fetch):
            resident[int(slot)] = int(fid)
        occ_slots = b.sparse.lookup.slots[b.sparse.lookup.inverse].numpy()
        ids = src.sparse.fused_ids(tables)
        assert [resident[int(s)] for s in occ_slots] == ids.tolist()
        assert torch.equal(b.sparse.values, src.sparse.values)


@pytest.mark.parametrize("world_size", [1, 2])
def test_the_sources_batches_are_left_untouched(world_size: int) -> None:
    # an in-memory source keeps its batches: a plan or lookup attached to them would stay alive (MBs per
    # batch at Criteo size) for as long as the source does
    tables = small_tables()
    batches = random_batches(tables, 6, 8, multi_hot=2)
    got = list(_loader(batches, tables, rank=world_size - 1, world_size=world_size))
    assert all(b.plan is not None and b.sparse.lookup is not None for b in got)
    assert all(b.plan is None and b.sparse.lookup is None for b in batches)


def test_rank_slices_partition_the_global_batch() -> None:
    tables = small_tables()
    batches = random_batches(tables, 6, 10, multi_hot=2)
    parts = [list(_loader(batches, tables, rank=r, world_size=3)) for r in range(3)]
    for i, src in enumerate(batches):
        ids = src.sparse.fused_ids(tables)
        dense = torch.cat([parts[r][i].dense for r in range(3)])
        assert torch.equal(dense, src.dense)
        seen = []
        for r in range(3):
            b = parts[r][i]
            start, stop = rank_bounds(10, r, 3)
            assert b.batch_size == stop - start
            # one replicated-row list, in one order, on every rank
            assert np.array_equal(b.plan.sync[0], parts[0][i].plan.sync[0])
            seen.append(b.plan.ids[b.sparse.lookup.inverse.numpy()])
        # each rank's occurrences, mapped back to ids, are the global ids of its samples (key-major per rank)
        f = len(tables)
        lengths = src.sparse.lengths.view(f, 10)
        per_key = [ids[int(lengths[:k].sum()) : int(lengths[: k + 1].sum())] for k in range(f)]
        for r in range(3):
            start, stop = rank_bounds(10, r, 3)
            expect = np.concatenate(
                [per_key[k][int(lengths[k, :start].sum()) : int(lengths[k, :stop].sum())] for k in range(f)]
            )
            assert np.array_equal(seen[r], expect)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b.sparse.values.__setitem__(0, 10_000), r"feature 'f0': id 10000 is outside \[0, 40\)"),
        (lambda b: b.sparse.values.__setitem__(-1, -3), r"feature 'f2': id -3 is outside"),
        (lambda b: setattr(b.sparse, "keys", ["f0", "f1", "zz"]), r"unknown feature keys \['zz'\]"),
        (lambda b: setattr(b.sparse, "values", b.sparse.values.float()), "must be integers"),
        (lambda b: setattr(b, "dense", b.dense[:3]), "dense has 3 rows but the sparse features have 8"),
    ],
)
def test_bad_batches_surface_in_the_consumer_with_a_clear_error(mutate, message) -> None:
    tables = small_tables()
    batches = random_batches(tables, 6, 8)
    mutate(batches[4])
    it = iter(_loader(batches, tables))
    with pytest.raises((ValueError, TypeError), match=message) as info:
        list(it)
    assert "train batch 4" in str(info.value)
    time.sleep(0.1)
    assert not _oracle_threads()


def test_a_batch_smaller_than_the_world_is_refused_naming_it_and_the_fix() -> None:
    # every rank needs at least one sample of every batch: an empty slice would make a mean loss NaN
    tables = small_tables()
    batches = [*random_batches(tables, 3, 4), *random_batches(tables, 1, 1, seed=5)]
    expect = r"train batch 3 has 1 sample\(s\) and cannot be split over 2 ranks.*drop_last=True"
    for rank in (0, 1):
        with pytest.raises(ValueError, match=expect):
            list(_loader(batches, tables, rank=rank, world_size=2))
        evaluation = r"val batch 3 has 1 sample\(s\).*Evaluation keeps every sample: choose a batch size"
        with pytest.raises(ValueError, match=evaluation + r".*or use at most 1 process\(es\)$"):
            list(EvalLoader(lambda: batches, tables, rank, 2, "val"))
    assert [b.batch_size for b in EvalLoader(lambda: batches, tables, 0, 1, "val")] == [4, 4, 4, 1]


def test_ragged_lengths_and_non_integer_ids_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"lengths add up to 3 ids but values holds 4"):
        lb.SparseFeatures.from_lengths(["a"], torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"values must be integers.*1.5"):
        lb.SparseFeatures.from_lengths(["a"], torch.tensor([1.0, 1.5]), torch.tensor([2]))
    with pytest.raises(ValueError, match="negative length"):
        lb.SparseFeatures.from_lengths(["a"], torch.tensor([1]), torch.tensor([2, -1]))


def test_source_exception_keeps_its_traceback_and_never_hangs() -> None:
    tables = small_tables()
    good = random_batches(tables, 3, 4)

    def source():
        yield from good
        raise KeyError("disk went away")

    loader = BagpipeLoader(source, tables, lookahead=2, cache_rows=None)
    with pytest.raises(KeyError, match="disk went away") as info:
        list(loader)
    assert any(frame.name == "source" for frame in info.traceback)


def test_stopping_early_leaves_no_thread_running() -> None:
    tables = small_tables()
    batches = random_batches(tables, 40, 4)
    loader = _loader(batches, tables, queue_batches=2)
    it = iter(loader)
    next(it)
    next(it)
    assert _oracle_threads()
    loader.close()
    assert not _oracle_threads()
    it2 = iter(loader)  # a new epoch replaces the old thread
    next(it2)
    del it2
    loader.close()
    assert not _oracle_threads()


def test_without_a_trainer_state_dict_counts_batches_handed_out_and_resume_starts_at_the_next_one() -> None:
    tables = small_tables()
    batches = random_batches(tables, 10, 4)
    loader = _loader(batches, tables, queue_batches=4)
    it = iter(loader)
    first_key = next(it).plan.key
    for _ in range(2):
        next(it)
    time.sleep(0.05)  # the thread has fetched further ahead; the count must not include that
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches_yielded": 3}
    loader.close()
    resumed = _loader(batches, tables)
    resumed.load_state_dict(state)
    assert len(resumed) == 10  # the epoch's length: Lightning counts batch_idx from the resumed position
    rest = list(resumed)
    assert len(rest) == 7
    assert torch.equal(rest[0].dense, batches[3].dense)
    assert rest[0].plan.key[1] == 3 and rest[0].plan.key[0] > first_key[0]  # a new stream
    # the epoch ran out: the next one starts from its first batch (a source without a length could not
    # tell a resumed loader that nothing is left)
    assert resumed.state_dict() == {"epoch": 1, "batches_yielded": 0}


def test_the_position_is_the_count_of_batches_training_finished_when_known() -> None:
    # Lightning asks for the next batch before a step ends (sources without a length), and a checkpoint
    # saved during a step resumes at that step's batch: the position follows Lightning's count
    tables = small_tables()
    batches = random_batches(tables, 10, 4)
    loader = _loader(batches, tables)
    it = iter(loader)
    for _ in range(3):
        next(it)
    for trained, position in [(2, 2), (3, 3), (None, 3), (4, 3)]:  # (4: not this loader's count)
        loader.progress = lambda trained=trained: trained
        assert loader.state_dict() == {"epoch": 0, "batches_yielded": position}
    loader.close()


def test_batch_moves_with_lightnings_default_transfer() -> None:
    from lightning.pytorch.utilities import move_data_to_device

    tables = small_tables()
    b = next(iter(_loader(random_batches(tables, 2, 4), tables)))
    moved = move_data_to_device(b, torch.device("cpu"))
    assert isinstance(moved, lb.Batch) and moved.plan is b.plan
    assert torch.equal(moved.sparse.lookup.slots, b.sparse.lookup.slots)


def test_datamodule_does_not_let_lightning_rewrap_the_loader() -> None:
    tables = small_tables()
    dm = ListDataModule(tables, random_batches(tables, 4, 4), lookahead=2)
    loader = dm.train_dataloader()
    assert not isinstance(loader, torch.utils.data.DataLoader)
    assert len(loader) == 4
    dm.teardown("fit")


def test_datamodule_validates_its_arguments() -> None:
    tables = small_tables()
    batches = random_batches(tables, 1, 4)
    with pytest.raises(ValueError, match="lookahead must be an integer >= 1, got 0"):
        ListDataModule(tables, batches, lookahead=0)
    with pytest.raises(ValueError, match=r"cache_rows must be an integer >= 1, got 0"):
        ListDataModule(tables, batches, cache_rows=0)
    # fractional values are refused, not truncated; bools are not counts
    for name, bad in (
        ("lookahead", 2.5),
        ("cache_rows", 100.0),
        ("prefetch_depth", True),
        ("queue_batches", 0),
    ):
        with pytest.raises(ValueError, match=rf"{name} must be an integer >= 1.*got {bad!r}"):
            ListDataModule(tables, batches, **{name: bad})
    ListDataModule(tables, batches, lookahead=np.int64(3), cache_rows=np.int32(50))  # numpy integers are fine
    # a loader made directly checks the same way (it used to turn 0 or 2.5 into a queue of 1 or 2)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match=rf"queue_batches must be an integer >= 1, got {bad!r}"):
            _loader(batches, tables, queue_batches=bad)
    with pytest.raises(ValueError, match="sync must be one of"):
        ListDataModule(tables, random_batches(tables, 1, 4), sync="allreduce")


def test_a_batch_size_that_does_not_divide_over_the_ranks_is_warned_about() -> None:
    # each rank's mean loss counts the same (as with DDP): unequal slices differ from one process
    from types import SimpleNamespace

    tables = small_tables()
    for size, warned in ((5, True), (6, False)):
        dm = ListDataModule(tables, random_batches(tables, 2, size))
        dm.trainer = SimpleNamespace(global_rank=0, world_size=2)  # type: ignore[assignment]
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            dm.train_dataloader().close()
        hits = [w for w in seen if "does not divide over 2 ranks" in str(w.message)]
        assert bool(hits) == warned, [str(w.message) for w in seen]


def test_a_loader_built_before_the_ranks_were_known_takes_them_and_one_built_for_others_is_refused() -> None:
    tables = small_tables()
    batches = random_batches(tables, 4, 8)
    loader = _loader(batches, tables)  # rank 0 of 1: what a loader made before the Trainer has
    loader.bind(1, 2)
    got = list(loader)
    start, stop = rank_bounds(8, 1, 2)
    assert [b.sparse.values.tolist() for b in got] == [
        b.slice_samples(start, stop).sparse.values.tolist() for b in batches
    ]
    loader.bind(1, 2)  # (the same ranks again: nothing to do)
    with pytest.raises(ValueError, match=r"built for rank 1 of 2, but the Trainer runs it as rank 0 of 3"):
        loader.bind(0, 3)
    evaluation = EvalLoader(lambda: batches, tables, 0, 1, "val")
    evaluation.bind(0, 2)
    assert [b.batch_size for b in evaluation] == [4] * 4


def test_stopping_does_not_wait_for_a_source_that_stalls() -> None:
    # a fit that fails (or is interrupted) while the source is blocked in a read must report at once;
    # it used to wait for the source's next batch, forever if the read never returned
    tables = small_tables()
    batches = random_batches(tables, 12, 4)
    release = threading.Event()

    def stalls_at_6():
        for i, b in enumerate(batches):
            if i == 6:
                release.wait(timeout=60)  # (a stalled network read)
            yield b

    loader = BagpipeLoader(stalls_at_6, tables, lookahead=2, cache_rows=None, queue_batches=1)
    it = iter(loader)
    next(it)
    time.sleep(0.2)  # the oracle thread is now blocked inside the source
    t0 = time.perf_counter()
    loader.close()
    assert time.perf_counter() - t0 < _OracleThread.STOP_WAIT_S + 1.0
    release.set()  # the source returns: the thread sees the stop and ends by itself
    deadline = time.monotonic() + 10
    while _oracle_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _oracle_threads()


def test_printing_a_data_module_describes_it_without_loading() -> None:
    # (Lightning's __str__ iterated the training loader as if it were a list of loaders, and failed)
    tables = small_tables()
    dm = ListDataModule(tables, random_batches(tables, 4, 8), lookahead=3, cache_rows=40)
    assert str(dm) == (
        f"ListDataModule({tables!r}, batch_size=8, lookahead=3, cache_rows=40, sync='partitioned')"
    )
    assert not _oracle_threads()


def test_without_validation_data_lightning_sees_no_validation_loader(
    recwarn: pytest.WarningsRecorder,
) -> None:
    # (it saw an empty list, and warned "Total length of `list` across ranks is zero", an error under
    # `python -W error`); a val_dataloader of the user's own is left alone
    tables = small_tables()
    batches = random_batches(tables, 4, 8)
    quiet_trainer().fit(TinyModel(tables), datamodule=ListDataModule(tables, batches, lookahead=2))
    assert not [w for w in recwarn if "Total length" in str(w.message)]

    class OwnLoader(ListDataModule):
        def val_dataloader(self):
            return EvalLoader(lambda: batches[:1], tables, 0, 1, "val")

    dm = OwnLoader(tables, batches, lookahead=2)
    dm.setup("fit")
    assert len(list(dm.val_dataloader())) == 1
    with_val = ListDataModule(tables, batches, batches[:2], lookahead=2)
    with_val.setup("fit")
    assert len(list(with_val.val_dataloader())) == 2
