"""IdMap: the vectorised id -> value hash table, against a plain dict."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_bagpipe.id_map import IdMap


@pytest.mark.parametrize("capacity", [0, 1, 5, 300])
def test_id_map_agrees_with_a_dict_through_adds_removes_growth_and_clears(capacity: int) -> None:
    rng = np.random.default_rng(capacity)
    m = IdMap(capacity)
    ref: dict[int, int] = {}
    sizes = set()
    for step in range(200):
        if step == 150:
            m.clear()
            ref.clear()
        absent = np.setdiff1d(rng.integers(0, 2**40, 30), np.fromiter(ref, dtype=np.int64, count=len(ref)))
        add = rng.permutation(absent)[: int(rng.integers(0, 30))]
        values = rng.integers(0, 2**31, add.size)
        m.add(add, values)
        ref.update(zip(add.tolist(), values.tolist()))
        if ref and step % 3:
            present = np.fromiter(ref, dtype=np.int64, count=len(ref))
            gone = rng.choice(present, size=int(rng.integers(0, present.size + 1)), replace=False)
            m.remove(gone)
            for i in gone.tolist():
                del ref[i]
        sizes.add(m.nbytes)
        known = np.fromiter(ref, dtype=np.int64, count=len(ref))
        probe = np.concatenate([known, known[:5], rng.integers(0, 2**40, 20)])  # repeats allowed
        found = m.find(probe)
        assert found.dtype == np.int64
        assert found.tolist() == [ref.get(int(i), -1) for i in probe], step
        assert len(m) == len(ref)
        ids, vals = m.items()
        assert dict(zip(ids.tolist(), vals.tolist())) == ref
    assert len(sizes) > 1  # the table grew (and removals left tombstones that lookups probed past)


def test_ids_that_collide_in_one_call_all_land() -> None:
    m = IdMap(64)
    ids = np.arange(64, dtype=np.int64) << 40  # same low bits: many share a home position
    m.add(ids, np.arange(64) * 3)
    assert m.find(ids).tolist() == (np.arange(64) * 3).tolist()
    m.remove(ids[::2])
    assert m.find(ids).tolist() == [-1 if i % 2 == 0 else 3 * i for i in range(64)]
    m.add(ids[::2], np.arange(32))  # reuses the tombstones
    assert m.find(ids[::2]).tolist() == list(range(32)) and len(m) == 64


def test_values_outside_int32_are_refused() -> None:
    with pytest.raises(ValueError, match=r"values must lie in \[0, 2\*\*31\), got 0..2147483648"):
        IdMap().add(np.array([1, 2]), np.array([0, 2**31]))


def test_removing_an_absent_id_is_an_error() -> None:
    m = IdMap()
    m.add(np.array([5]), np.array([1]))
    with pytest.raises(KeyError, match="id 6 is not present"):
        m.remove(np.array([5, 6]))
