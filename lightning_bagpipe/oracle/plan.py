"""The oracle's output for one global step: :class:`CachePlan`.

All arrays are numpy ``int64``. Ids are in the fused id space (see :mod:`lightning_bagpipe.tables`).

The order of operations around step ``t`` (what the executor must do and what the oracle guarantees):

1. write back ``evict_ids`` from ``evict_slots`` (dirty rows evicted for capacity);
2. load ``fetch_ids`` from the store into ``fetch_slots``;
3. run step ``t``: occurrence ``i`` of the batch reads slot ``slots[inverse[i]]``;
4. after step ``t``'s optimizer update, write back ``writeback_ids`` from ``writeback_slots``
   (rows not used again within the lookahead); they stay in their slots as clean copies.

Steps 1-2 for ``t + 1`` run while step ``t`` computes, so the oracle never evicts, overwrites or writes
back a row that step ``t`` or ``t + 1`` reads or writes, except step ``t``'s own end-of-use write-backs in 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CachePlan:
    """Cache instructions for one global step (the whole global batch, every rank)."""

    step: int
    """Index of the step in the stream (0-based)."""
    ids: np.ndarray
    """Distinct fused ids used by the step, ascending."""
    slots: np.ndarray
    """Cache slot of ``ids[k]`` during the step."""
    inverse: np.ndarray
    """For every id occurrence of the batch (input order), its index into ``ids``."""
    fetch_ids: np.ndarray
    fetch_slots: np.ndarray
    evict_ids: np.ndarray
    evict_slots: np.ndarray
    writeback_ids: np.ndarray
    writeback_slots: np.ndarray
    hits: int
    """Distinct ids of the step already resident (dirty or clean) before it."""
    clean_hits: int
    """Of ``hits``, those served by a clean copy (a row written back earlier and left in place)."""

    @property
    def misses(self) -> int:
        return int(self.fetch_ids.size)

    @property
    def occurrence_slots(self) -> np.ndarray:
        """Slot of every id occurrence of the batch, in input order."""
        return self.slots[self.inverse]
