"""Logically replicated, physically partitioned (LRPP): one rank's share of a global :class:`CachePlan`.

Every rank runs the same oracle on the same global stream, so every rank holds the same plan. From it
each rank derives, deterministically and without communication, what *it* must do at step ``t``:

* **local rows**: used by the samples of exactly one rank at ``t`` and not reused within the lookahead
  (they are written back after ``t``). Only that rank fetches, updates and writes them back; nobody
  communicates their gradients.
* **replicated rows**: every other row of the step (used by several ranks, or reused soon). Every rank
  holds them in the same slot, their gradients are summed across ranks in one all-reduce (in the plan's
  fixed id order) and averaged like DDP's dense gradients, and every rank applies the same update.
  Exactly one rank (``id % world_size``) writes each of them back.

A rank's clean copy of a row is only trusted if the row's last update was replicated or made by that
rank; otherwise the rank fetches the row again (after the owner's write-back, which the executors'
per-step barrier orders before the fetch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lightning_bagpipe.oracle.plan import CachePlan

IdSlots = tuple[np.ndarray, np.ndarray]


@dataclass
class RankView:
    """What one rank does for one step (all arrays int64)."""

    fetch: IdSlots
    """Rows to load before the step (global misses it needs, and its stale clean copies)."""
    evict: IdSlots
    """Dirty rows evicted for capacity that this rank writes back before the step's fetches."""
    writeback: IdSlots
    """Rows this rank writes back after the step."""
    sync: IdSlots
    """Replicated rows (same list and order on every rank): gradients all-reduced."""
    own: IdSlots
    """Local rows of this rank: updated with this rank's gradient alone."""
    foreign: IdSlots
    """Local rows of other ranks: this rank's copy goes stale and it stops being their writer."""


def occurrence_ranks(lengths: np.ndarray, num_features: int, world_size: int) -> np.ndarray:
    """Rank that trains each id occurrence of a global batch (key-major ``lengths`` of ``F * B`` bags)."""
    b = lengths.size // num_features
    sample = np.arange(b, dtype=np.int64)
    bounds = (np.arange(world_size + 1, dtype=np.int64) * b) // world_size
    rank_of_sample = np.searchsorted(bounds, sample, side="right") - 1
    return np.repeat(np.tile(rank_of_sample, num_features), lengths.astype(np.int64))


class RankPartitioner:
    """Derives :class:`RankView` s step after step (it remembers who last updated each row alone)."""

    def __init__(self, num_rows: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.rank = rank
        self.world_size = world_size
        # -1: the row's last update was replicated (every holder is current); r: only rank r is current
        self.last_owner = np.full(num_rows, -1, dtype=np.int32)

    def view(self, plan: CachePlan, occ_rank: np.ndarray) -> RankView:
        """This rank's share of ``plan``; ``occ_rank`` is the rank of every occurrence (input order)."""
        r, world = self.rank, self.world_size
        ids, slots = plan.ids, plan.slots
        n = ids.size
        pairs = np.unique(plan.inverse.astype(np.int64) * world + occ_rank)
        uniq_of_pair, rank_of_pair = pairs // world, pairs % world
        users = np.bincount(uniq_of_pair, minlength=n)
        owner = np.full(n, -1, dtype=np.int64)
        single = users[uniq_of_pair] == 1
        owner[uniq_of_pair[single]] = rank_of_pair[single]
        ends_here = np.isin(ids, plan.writeback_ids, assume_unique=True)
        local = (users == 1) & ends_here
        replicated = ~local
        used_here = np.zeros(n, dtype=bool)
        used_here[uniq_of_pair[rank_of_pair == r]] = True
        need = used_here | replicated

        fetched = np.isin(ids, plan.fetch_ids, assume_unique=True)
        prev = self.last_owner[ids]
        stale = ~fetched & (prev >= 0) & (prev != r)
        take = need & (fetched | stale)

        writer = ids % world
        writer[local] = owner[local]
        wb_pos = np.searchsorted(ids, plan.writeback_ids)
        wb_mine = writer[wb_pos] == r if plan.writeback_ids.size else np.zeros(0, dtype=bool)
        ev_mine = plan.evict_ids % world == r

        self.last_owner[ids[local]] = owner[local]
        self.last_owner[ids[replicated]] = -1
        mine = local & (owner == r)
        foreign = local & (owner != r)
        return RankView(
            fetch=(ids[take], slots[take]),
            evict=(plan.evict_ids[ev_mine], plan.evict_slots[ev_mine]),
            writeback=(plan.writeback_ids[wb_mine], plan.writeback_slots[wb_mine]),
            sync=(ids[replicated], slots[replicated]),
            own=(ids[mine], slots[mine]),
            foreign=(ids[foreign], slots[foreign]),
        )
