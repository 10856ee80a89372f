"""The lookahead oracle: per-step cache plans from a stream of global batches, and reference simulators.

* :class:`LookaheadOracle` turns the stream into one :class:`CachePlan` per step;
* :mod:`~lightning_bagpipe.oracle.simulators` counts the fetches of LRU, LFU and offline Belady caches
  (baselines for the benchmark and references for the tests).
"""

from lightning_bagpipe.oracle.lookahead import LookaheadOracle, OracleStats
from lightning_bagpipe.oracle.plan import CachePlan
from lightning_bagpipe.oracle.simulators import belady_fetches, lfu_fetches, lru_fetches, min_capacity

__all__ = [
    "CachePlan",
    "LookaheadOracle",
    "OracleStats",
    "belady_fetches",
    "lfu_fetches",
    "lru_fetches",
    "min_capacity",
]
