"""SpillLog: a TieredStore's appended runs of rows, against a plain dict of each id's newest row."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
import torch

from lightning_bagpipe.embedding.spill_log import SpillLog, log_files

WIDTH = 3


def assert_holds_newest(log: SpillLog, newest: dict[int, list[float]], probe: np.ndarray) -> np.ndarray:
    """``log`` finds and reads each probed id's newest row, exactly the ids of ``newest``; its items are
    those ids, ascending (int64), with their newest positions. Returns the probe's positions."""
    pos = log.find(probe)
    assert (pos >= 0).tolist() == [int(i) in newest for i in probe]
    assert log.read(pos[pos >= 0]).tolist() == [newest[int(i)] for i in probe if int(i) in newest]
    ids, at = log.items()
    assert ids.dtype == np.int64 and ids.tolist() == sorted(newest) and at.tolist() == log.find(ids).tolist()
    return pos


def test_the_newest_copy_of_each_id_wins_across_runs_and_a_reopen(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    log = SpillLog(tmp_path / "t.f32", 400, WIDTH, None)
    newest: dict[int, list[float]] = {}
    for _ in range(8):
        ids = rng.choice(60, size=int(rng.integers(1, 40)), replace=False)  # any order, distinct
        rows = torch.randn(ids.size, WIDTH)
        log.append(ids, rows)
        newest.update(zip(ids.tolist(), rows.tolist()))

    probe = np.concatenate([np.arange(70), [5, 5]])  # ids 60..69 were never appended; repeats ok
    assert_holds_newest(log, newest, probe)
    runs = log.runs
    assert len(runs) == 8 and sum(runs) == log.length
    log.close()
    again = SpillLog(tmp_path / "t.f32", 400, WIDTH, runs)  # what a flushed store records
    assert_holds_newest(again, newest, probe)
    with pytest.raises(ValueError, match="do not fit in the"):
        again.append(np.arange(400 - again.length + 1), torch.zeros(400 - again.length + 1, WIDTH))
    again.clear()
    assert again.length == 0 and (again.find(np.arange(70)) == -1).all()


def test_damaged_or_mismatched_log_files_are_named(tmp_path: Path) -> None:
    log = SpillLog(tmp_path / "t.f32", 100, WIDTH, None)
    log.append(np.array([3, 9, 4]), torch.ones(3, WIDTH))
    log.close()
    with pytest.raises(ValueError, match=r"t.f32.log should hold 50 rows .* found 1200 bytes"):
        SpillLog(tmp_path / "t.f32", 50, WIDTH, [3])
    with pytest.raises(ValueError, match=r"runs \[3, 98\] do not fit in 100 rows"):
        SpillLog(tmp_path / "t.f32", 100, WIDTH, [3, 98])
    _, ids_file = log_files(tmp_path / "t.f32")
    raw = np.fromfile(ids_file, dtype=np.int64)
    raw[:3] = [9, 4, 3]  # no longer the sorted run the log wrote
    raw.tofile(ids_file)
    with pytest.raises(ValueError, match="the run at row 0 is not sorted; the log is damaged"):
        SpillLog(tmp_path / "t.f32", 100, WIDTH, [3])
    for damaged in ([3, 4, 125], [-1, 4, 9]):  # sorted, but not rows of a 13-row store
        raw[:3] = damaged
        raw.tofile(ids_file)
        with pytest.raises(
            ValueError, match=rf"holds row id {max(damaged) if damaged[0] >= 0 else -1}, outside"
        ):
            SpillLog(tmp_path / "t.f32", 100, WIDTH, [3], num_rows=13)


def test_a_sorted_run_written_a_chunk_at_a_time_is_one_run_in_the_other_pair_of_files(tmp_path: Path) -> None:
    first = SpillLog(tmp_path / "t.f32", 100, WIDTH, None)
    first.append(np.array([7, 2]), torch.zeros(2, WIDTH))
    log = SpillLog(tmp_path / "t.f32", 100, WIDTH, None, pair=1)
    assert (log.rows_path, log.ids_path) == log_files(tmp_path / "t.f32", 1) != log_files(tmp_path / "t.f32")
    ids = np.array([1, 4, 9, 10, 30, 31, 50])
    rows = torch.arange(ids.size * WIDTH, dtype=torch.float32).view(-1, WIDTH)
    calls: list[tuple[int, int]] = []

    def chunk(lo: int, hi: int) -> torch.Tensor:
        calls.append((lo, hi))
        return rows[lo:hi]

    log.append_sorted(ids, chunk, 3)
    assert calls == [(0, 3), (3, 6), (6, 7)] and log.runs == [7]
    assert torch.equal(log.read(log.find(ids)), rows)
    log.close()
    again = SpillLog(tmp_path / "t.f32", 100, WIDTH, [7], pair=1)
    assert again.items()[0].tolist() == ids.tolist()
    assert first.find(np.array([2, 7])).tolist() == [0, 1]  # the other pair's files are untouched
    with pytest.raises(ValueError, match="needs distinct ascending ids"):
        again.append_sorted(np.array([3, 3]), chunk, 3)
    again.remove()
    assert not again.rows_path.exists() and not again.ids_path.exists() and again.length == 0


def test_runs_of_ids_below_2_32_are_kept_in_4_bytes_and_found_next_to_larger_ids(tmp_path: Path) -> None:
    """Runs whose ids fit in 32 bits are kept as uint32 in RAM (the file keeps int64); lookups of ids on
    either side of 2**32, whose low 32 bits collide, still find each id's own newest copy."""
    big = 2**32
    log = SpillLog(tmp_path / "t.f32", 100, WIDTH, None)
    newest: dict[int, list[float]] = {}
    for ids in ([5, 7, big - 1], [5, big + 5, big + 7], [7, 9]):  # big + 5 has the low bits of 5
        arr = np.array(ids, dtype=np.int64)
        rows = torch.randn(arr.size, WIDTH)
        log.append(arr, rows)
        newest.update(zip(ids, rows.tolist()))
    assert [run.dtype for _, run in log._runs] == [np.uint32, np.int64, np.uint32]
    probe = np.array([5, 7, 9, big - 1, big + 5, big + 7, big + 9, 6, big + 6])
    pos = assert_holds_newest(log, newest, probe)
    log.close()
    again = SpillLog(tmp_path / "t.f32", 100, WIDTH, log.runs)
    assert again.find(probe).tolist() == pos.tolist()


@pytest.mark.parametrize("gap, span", [(0, 1), (2, 8), (32, 1 << 14)])
def test_reads_of_scattered_clustered_and_repeated_positions_return_those_rows(
    tmp_path: Path, gap: int, span: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the log reads rows a pread at a time: alone, or a span of close positions at once
    monkeypatch.setattr(SpillLog, "READ_GAP_ROWS", gap)
    monkeypatch.setattr(SpillLog, "READ_SPAN_ROWS", span)
    rng = np.random.default_rng(gap)
    log = SpillLog(tmp_path / "t.f32", 300, WIDTH, None)
    rows = torch.randn(250, WIDTH)
    for lo in range(0, 250, 50):  # positions 0..249 hold rows[0..249]
        log.append(np.arange(lo, lo + 50), rows[lo : lo + 50])
    clusters = np.concatenate([np.arange(s, s + int(rng.integers(1, 12))) for s in (0, 60, 61, 120, 238)])
    scattered = rng.choice(250, size=40, replace=False)
    positions = rng.permutation(np.concatenate([clusters, scattered, [7, 7, 249]]))
    reads: list[int] = []
    pread = os.pread

    def counted(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counted)
    assert torch.equal(log.read(positions), rows[torch.from_numpy(positions)])
    row_bytes = 4 * WIDTH
    assert max(reads) <= span * row_bytes  # a span's scratch buffer is bounded
    if gap == 0:  # then only equal or adjacent positions share a read
        assert len(reads) >= np.unique(positions).size / span
    assert log.read(np.zeros(0, dtype=np.int64)).shape == (0, WIDTH)
    for bad in ([250], [-1]):  # written rows only: past the runs is garbage
        with pytest.raises(IndexError, match=r"\[0, 250\)"):
            log.read(np.array(bad))


def _fail(code: int) -> Callable[..., NoReturn]:
    def call(*args: object) -> NoReturn:
        raise OSError(code, os.strerror(code))

    return call


def test_io_errors_name_the_file_and_what_was_being_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare ``OSError(28, 'No space left on device')`` says neither which file nor what failed; its repr
    (how a background write-back failure is reported) leaves out even ``filename``."""
    log = SpillLog(tmp_path / "t.f32", 100, WIDTH, None)
    log.append(np.array([3, 9]), torch.ones(2, WIDTH))
    rows_file, ids_file = log_files(tmp_path / "t.f32")
    cases = [
        (
            "pwrite",
            errno.ENOSPC,
            lambda: log.append(np.array([1, 2]), torch.zeros(2, WIDTH)),
            rows_file,
            "appending rows to the spill log",
        ),
        (
            "pread",
            errno.EIO,
            lambda: log.read(np.array([0, 1])),
            rows_file,
            "reading rows from the spill log",
        ),
        ("fsync", errno.EIO, log.flush, rows_file, "flushing (fsync) the spill log file"),
    ]
    for name, code, call, path, doing in cases:
        with monkeypatch.context() as m:
            m.setattr(os, name, _fail(code))
            with pytest.raises(OSError) as caught:
                call()
        err = caught.value
        assert (err.errno, err.filename) == (code, str(path))
        assert repr(err) == f"OSError({code}, '{os.strerror(code)} while {doing} {path}')"
        assert isinstance(err.__cause__, OSError) and err.__cause__.filename is None
    # the ids of a run are written after its rows: a failure there names the ids file
    real = os.pwrite

    def ids_fail(fd: int, data: memoryview, offset: int) -> int:
        if len(data) == 16:  # (two int64 ids; the rows take 24 bytes)
            _fail(errno.ENOSPC)()
        return real(fd, data, offset)

    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", ids_fail)
        with pytest.raises(OSError, match=f"while appending ids to the spill log {re.escape(str(ids_file))}"):
            log.append(np.array([5, 6]), torch.zeros(2, WIDTH))
    # failed appends add no run: the log holds what it held, and takes rows again once there is room
    assert log.runs == [2] and log.read(log.find(np.array([3, 9]))).eq(1).all()
    log.append(np.array([4]), torch.full((1, WIDTH), 2.0))
    assert log.runs == [2, 1] and log.read(log.find(np.array([4]))).eq(2).all()
    gone = re.escape(str(tmp_path / "gone" / "t.f32.log"))
    with pytest.raises(FileNotFoundError, match=f"while creating the spill log file {gone}"):
        SpillLog(tmp_path / "gone" / "t.f32", 100, WIDTH, None)
