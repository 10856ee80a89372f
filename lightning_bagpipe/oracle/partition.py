"""Logically replicated, physically partitioned (LRPP): one rank's share of a global :class:`CachePlan`.

Every rank runs the same oracle on the same global stream, so every rank holds the same plan. From it
each rank derives, deterministically and without communication, what *it* must do at step ``t``:

* **local rows**: used by the samples of exactly one rank at ``t`` and not reused within the lookahead
  (they are written back after ``t``). Only that rank fetches, updates and writes them back; nobody
  communicates their gradients.
* **replicated rows**: every other row of the step (used by several ranks, or reused soon). Every rank
  holds them in the same slot, their gradients are summed across ranks in one collective (in the plan's
  fixed id order) and averaged like DDP's dense gradients, and every rank applies the same update.
  Exactly one rank (``id % world_size``) writes each of them back.

Which collective sums the replicated rows' gradients is chosen per step from the plan alone, so every
rank chooses the same. Many replicated rows are used by one rank only at ``t`` (they are replicated
because they are reused soon), so instead of an all-reduce over all ``n`` of them each rank ``r`` may send
just the rows it used, ``A_r`` (an *exchange*: a padded all-gather of per-rank blocks), and every rank adds
the ``W`` blocks in rank order. Bytes each rank sends per embedding value (times 4 bytes per float):

* all-reduce (ring): ``2 (W - 1) / W * n``
* exchange (all-gather, blocks padded to the largest): ``(W - 1) * max_r |A_r|``

The exchange is chosen iff it is strictly cheaper: ``W * max_r |A_r| < 2 n`` (integers, exact).

A rank's clean copy of a row is only trusted if the row's last update was replicated or made by that
rank; otherwise the rank fetches the row again (after the owner's write-back, which the executors'
per-step barrier orders before the fetch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lightning_bagpipe.id_sets import member_of, unique_below
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
    """Replicated rows (same list and order on every rank): gradients summed across ranks."""
    own: IdSlots
    """Local rows of this rank: updated with this rank's gradient alone."""
    foreign: IdSlots
    """Local rows of other ranks: this rank's copy goes stale and it stops being their writer."""
    sync_blocks: tuple[np.ndarray, ...] | None = None
    """``None``: all-reduce ``sync``'s gradients. Else the exchange: for each rank ``r`` (in rank order),
    the ascending positions into ``sync`` of the rows rank ``r`` used this step (same on every rank)."""


def occurrence_ranks(lengths: np.ndarray, num_features: int, world_size: int) -> np.ndarray:
    """Rank that trains each id occurrence of a global batch (key-major ``lengths`` of ``F * B`` bags)."""
    b = lengths.size // num_features
    sample = np.arange(b, dtype=np.int64)
    bounds = (np.arange(world_size + 1, dtype=np.int64) * b) // world_size
    rank_of_sample = np.searchsorted(bounds, sample, side="right") - 1
    return np.repeat(np.tile(rank_of_sample, num_features), lengths.astype(np.int64))


#: ``BagpipeDataModule(sync=...)``: LRPP, or the full-replication baseline.
SYNC_MODES = ("partitioned", "replicated")


class RankPartitioner:
    """Derives :class:`RankView` s step after step (it remembers who last updated each row alone).

    ``replicate=True`` is the full-replication baseline: no row is local, every row of the step is
    all-reduced (never exchanged). Same results, more bytes; for benchmarks.
    """

    def __init__(self, num_rows: int, rank: int, world_size: int, *, replicate: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.rank = rank
        self.world_size = world_size
        self.replicate = replicate
        # -1: the row's last update was replicated (every holder is current); r: only rank r is current
        self.last_owner = np.full(num_rows, -1, dtype=np.int32)

    def view(self, plan: CachePlan, occ_rank: np.ndarray) -> RankView:
        """This rank's share of ``plan``; ``occ_rank`` is the rank of every occurrence (input order)."""
        r, world = self.rank, self.world_size
        ids, slots = plan.ids, plan.slots
        n = ids.size
        pairs = unique_below(plan.inverse.astype(np.int64) * world + occ_rank, n * world)
        uniq_of_pair, rank_of_pair = pairs // world, pairs % world
        users = np.bincount(uniq_of_pair, minlength=n)
        owner = np.full(n, -1, dtype=np.int64)
        single = users[uniq_of_pair] == 1
        owner[uniq_of_pair[single]] = rank_of_pair[single]
        ends_here = member_of(ids, plan.writeback_ids)  # (the plan's id arrays are ascending)
        local = (users == 1) & ends_here & (not self.replicate)
        replicated = ~local
        used_here = np.zeros(n, dtype=bool)
        used_here[uniq_of_pair[rank_of_pair == r]] = True
        need = used_here | replicated

        fetched = member_of(ids, plan.fetch_ids)
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
        blocks = None if self.replicate else sync_blocks(uniq_of_pair, rank_of_pair, replicated, world)
        return RankView(
            fetch=(ids[take], slots[take]),
            evict=(plan.evict_ids[ev_mine], plan.evict_slots[ev_mine]),
            writeback=(plan.writeback_ids[wb_mine], plan.writeback_slots[wb_mine]),
            sync=(ids[replicated], slots[replicated]),
            own=(ids[mine], slots[mine]),
            foreign=(ids[foreign], slots[foreign]),
            sync_blocks=blocks,
        )


def exchange_is_cheaper(block_rows: np.ndarray, sync_rows: int) -> bool:
    """Whether the padded all-gather of per-rank blocks sends fewer bytes per rank than a ring all-reduce.

    ``block_rows[r]`` is how many replicated rows rank ``r`` used; ``sync_rows`` how many there are.
    ``(W - 1) * max_r |A_r| < 2 (W - 1) / W * n``, multiplied out to integers; ties go to the all-reduce.
    """
    world = block_rows.size
    return world > 1 and world * int(block_rows.max(initial=0)) < 2 * sync_rows


def sync_blocks(
    uniq_of_pair: np.ndarray, rank_of_pair: np.ndarray, replicated: np.ndarray, world: int
) -> tuple[np.ndarray, ...] | None:
    """Per-rank positions into the replicated-row list of the rows each rank used, or ``None``.

    ``(uniq_of_pair, rank_of_pair)`` are the step's distinct (row index, rank) pairs; ``replicated`` marks
    the replicated rows among the step's distinct rows (their order is the sync list's order). Returns
    ``None`` when the all-reduce is the cheaper collective (see :func:`exchange_is_cheaper`).
    """
    position = np.cumsum(replicated, dtype=np.int64) - 1  # row index -> position in the sync list
    keep = replicated[uniq_of_pair]
    rank, pos = rank_of_pair[keep], position[uniq_of_pair[keep]]
    counts = np.bincount(rank, minlength=world)
    if not exchange_is_cheaper(counts, int(np.count_nonzero(replicated))):
        return None
    order = np.lexsort((pos, rank))  # by rank, then ascending position
    return tuple(np.split(pos[order], np.cumsum(counts)[:-1]))
