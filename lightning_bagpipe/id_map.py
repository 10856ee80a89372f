"""``IdMap``: a hash table from row ids to small integers, vectorised over batches of ids (pure numpy).

The oracle's compact row index and the tiered store's write buffer both need to find a few tens of
thousands of ids per step among up to millions, in an id space (``2**28`` rows and more) far too large
for an array indexed by id. A sorted array answers lookups with ``np.searchsorted`` but pays a copy of
the whole array for every batch of inserts or removals; this table pays per id only.

Open addressing with linear probing, on a power-of-two table kept at most half full (live entries plus
removed ones' tombstones). Every operation takes a whole array of ids and probes them together, one
numpy pass per probe round; most ids resolve in the first round, which therefore gets its own pass
without an index of the ids still probing. A growing table is sized for a quarter load: between the
oracle's inserts and removals, tombstones then take tens of batches to fill it to half, so it is
rebuilt rarely and probes stay short (in ``bench scale``'s stream, 41K lookups, 17K inserts and 17K
removals per batch, this halved the oracle's hash table time for twice its memory).
"""

from __future__ import annotations

import numpy as np

__all__ = ["IdMap"]

_EMPTY = -1
_GONE = -2  # a removed entry: lookups probe past it, inserts may reuse it
_FIB = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the top bits of id * 2**64 / golden ratio


class IdMap:
    """Map distinct non-negative ``int64`` ids to values in ``[0, 2**31)`` (handles, slots), 12 bytes per
    table entry, 2 entries per live id or more (4 to 8 once grown past ``capacity``).

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
        """Every id's home position (ids are non-negative, so their bits read the same as uint64)."""
        home = ids.view(np.uint64) * _FIB
        home >>= self._shift
        return home.view(np.int64)

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """The table position of every id, ``-1`` where absent."""
        pos = self._home(ids)
        k = self._keys[pos]
        hit = k == ids
        out = np.where(hit, pos, -1)
        go = k != _EMPTY
        go &= ~hit
        idx = np.flatnonzero(go)  # the ids still probing
        pos = pos[idx]
        while idx.size:
            pos += 1
            pos &= self._mask
            k = self._keys[pos]
            hit = k == ids[idx]
            out[idx[hit]] = pos[hit]
            go = k != _EMPTY
            go &= ~hit
            sel = np.flatnonzero(go)
            idx, pos = idx[sel], pos[sel]
        return out

    def find(self, ids: np.ndarray) -> np.ndarray:
        """The value of every id (any order, repeats allowed), ``-1`` where absent."""
        pos = self._positions(np.asarray(ids, dtype=np.int64))
        return np.where(pos >= 0, self._vals[pos], np.int64(-1))

    def add(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Insert distinct ``ids`` that are not present, mapped to ``values``."""
        ids = np.asarray(ids, dtype=np.int64)
        values = np.asarray(values, dtype=np.int64)
        n = ids.size
        if not n:
            return
        if int(values.min()) < 0 or int(values.max()) >= 2**31:
            raise ValueError(
                f"IdMap.add: values must lie in [0, 2**31), got {int(values.min())}..{int(values.max())}"
            )
        if 2 * (self._filled + n) > self._keys.size:  # over half full: grow (or drop tombstones)
            self._rehash(self._size_for(2 * (self._live + n)))
        pos = self._home(ids)
        while ids.size:  # (ids, values, pos: of the ids still probing)
            k = self._keys[pos]
            free = np.flatnonzero(k < 0)  # empty or a tombstone (the id is absent, so either will do)
            claim, want = pos[free], ids[free]
            self._keys[claim] = want  # ids claiming the same position: exactly one of them lands
            won = free[self._keys[claim] == want]
            self._vals[pos[won]] = values[won]
            self._filled += int(np.count_nonzero(k[won] == _EMPTY))
            rest = np.ones(ids.size, dtype=bool)
            rest[won] = False
            ids, values, pos = ids[rest], values[rest], pos[rest]
            pos += 1
            pos &= self._mask
        self._live += n

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
