"""``IdMap``: a hash table from row ids to small integers, vectorised over batches of ids (pure numpy).

The oracle's compact row index and the tiered store's write buffer both need to find a few tens of
thousands of ids per step among up to millions, in an id space (``2**28`` rows and more) far too large
for an array indexed by id. A sorted array answers lookups with ``np.searchsorted`` but pays a copy of
the whole array for every batch of inserts or removals; this table pays per id only.

Open addressing with linear probing, on a power-of-two table kept at most half full (live entries plus
removed ones' tombstones). Every operation takes a whole array of ids and probes them together, one
numpy pass per probe round, so the rounds (a handful at half load) cost, not the ids.
"""

from __future__ import annotations

import numpy as np

__all__ = ["IdMap"]

_EMPTY = -1
_GONE = -2  # a removed entry: lookups probe past it, inserts may reuse it
_FIB = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the top bits of id * 2**64 / golden ratio


class IdMap:
    """Map distinct non-negative ``int64`` ids to values in ``[0, 2**31)`` (handles, slots), 12 bytes per
    table entry, 2 to 6 entries per live id.

    Args:
        capacity: live entries to make room for up front; the table grows (rehashing) beyond it.

    :meth:`add` takes ids that are *not* present (the callers know; checking would cost a lookup) and
    :meth:`remove` ids that *are* (a KeyError names one that is not).
    """

    def __init__(self, capacity: int = 0) -> None:
        self._live = 0
        self._allocate(self._size_for(capacity))

    @staticmethod
    def _size_for(entries: int) -> int:
        return 1 << max(4, int(2 * max(entries, 1) - 1).bit_length())

    def _allocate(self, size: int) -> None:
        self._keys = np.full(size, _EMPTY, dtype=np.int64)
        self._vals = np.zeros(size, dtype=np.int32)
        self._mask = size - 1
        self._shift = np.uint64(64 - (size.bit_length() - 1))
        self._filled = 0  # live entries plus tombstones

    def __len__(self) -> int:
        return self._live

    @property
    def nbytes(self) -> int:
        """Bytes held by the table."""
        return int(self._keys.nbytes + self._vals.nbytes)

    def _home(self, ids: np.ndarray) -> np.ndarray:
        return ((ids.astype(np.uint64) * _FIB) >> self._shift).astype(np.int64)

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """The table position of every id, ``-1`` where absent."""
        out = np.full(ids.size, -1, dtype=np.int64)
        idx = np.arange(ids.size)
        pos = self._home(ids)
        while idx.size:
            k = self._keys[pos]
            hit = k == ids[idx]
            out[idx[hit]] = pos[hit]
            go = ~hit & (k != _EMPTY)
            idx, pos = idx[go], (pos[go] + 1) & self._mask
        return out

    def find(self, ids: np.ndarray) -> np.ndarray:
        """The value of every id (any order, repeats allowed), ``-1`` where absent."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = self._positions(ids)
        found = pos >= 0
        out = np.full(ids.size, -1, dtype=np.int64)
        out[found] = self._vals[pos[found]]
        return out

    def add(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Insert distinct ``ids`` that are not present, mapped to ``values``."""
        ids = np.asarray(ids, dtype=np.int64)
        values = np.asarray(values, dtype=np.int64)
        if not ids.size:
            return
        if int(values.min()) < 0 or int(values.max()) >= 2**31:
            raise ValueError(
                f"IdMap.add: values must lie in [0, 2**31), got {int(values.min())}..{int(values.max())}"
            )
        if 2 * (self._filled + ids.size) > self._keys.size:  # over half full: grow (or drop tombstones)
            self._rehash(self._size_for(3 * (self._live + ids.size) // 2))
        idx = np.arange(ids.size)
        pos = self._home(ids)
        while idx.size:
            k = self._keys[pos]
            free = np.flatnonzero(k < 0)  # empty or a tombstone (the id is absent, so either will do)
            claim, want = pos[free], ids[idx[free]]
            was_empty = k[free] == _EMPTY
            self._keys[claim] = want  # ids claiming the same position: exactly one of them lands
            won = self._keys[claim] == want
            self._vals[claim[won]] = values[idx[free[won]]]
            self._filled += int(was_empty[won].sum())
            rest = np.ones(idx.size, dtype=bool)
            rest[free[won]] = False
            idx, pos = idx[rest], (pos[rest] + 1) & self._mask
        self._live += ids.size

    def remove(self, ids: np.ndarray) -> None:
        """Remove distinct ``ids`` that are present."""
        ids = np.asarray(ids, dtype=np.int64)
        if not ids.size:
            return
        pos = self._positions(ids)
        if (pos < 0).any():
            raise KeyError(f"IdMap.remove: id {int(ids[pos < 0][0])} is not present")
        self._keys[pos] = _GONE
        self._live -= ids.size

    def clear(self) -> None:
        """Remove every entry (the table keeps its size)."""
        self._keys.fill(_EMPTY)
        self._live = self._filled = 0

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live ``(ids, values)``, in table order (values as ``int64``)."""
        live = self._keys >= 0
        return self._keys[live], self._vals[live].astype(np.int64)

    def _rehash(self, size: int) -> None:
        ids, values = self.items()
        self._allocate(max(size, self._size_for(ids.size)))
        self._live = 0
        self.add(ids, values)
