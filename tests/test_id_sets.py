"""id_sets: sort-based set operations on id arrays, against Python sets."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_bagpipe.id_sets import member_of, union_ids, unique_below, unique_ids, unique_inverse_below


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000])
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_unique_and_union_are_the_sorted_distinct_values(n: int, dtype: type) -> None:
    rng = np.random.default_rng(n)
    a = rng.integers(0, max(1, n // 3), n).astype(dtype)  # many repeats
    b = rng.integers(0, 2**30, n).astype(dtype)
    assert unique_ids(a).tolist() == sorted(set(a.tolist()))
    assert union_ids(a, b, a[:3]).tolist() == sorted(set(a.tolist()) | set(b.tolist()))
    assert union_ids().tolist() == []


@pytest.mark.parametrize("n", [0, 1, 50, 2000])
def test_member_of_an_ascending_array_with_repeats(n: int) -> None:
    rng = np.random.default_rng(n)
    ascending = np.sort(rng.integers(0, 100, n))  # repeats, and values both below and above every query
    ids = rng.integers(-5, 110, 300)
    members = set(ascending.tolist())
    assert member_of(ids, ascending).tolist() == [int(i) in members for i in ids]
    assert member_of(ids[:0], ascending).shape == (0,)


def test_unique_below_and_its_inverse() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 40, 500)
    values[values == 7] = 8  # a value that never occurs inside the bound
    distinct = sorted(set(values.tolist()))
    assert unique_below(values, 40).tolist() == distinct
    uniq, inverse = unique_inverse_below(values, 40)
    assert uniq.tolist() == distinct
    assert uniq[inverse].tolist() == values.tolist()
    assert unique_inverse_below(values[:0], 40)[1].shape == (0,)
