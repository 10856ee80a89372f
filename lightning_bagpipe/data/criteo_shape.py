"""The shape of the Criteo Kaggle (Display Advertising Challenge) dataset.

13 integer ("dense") features ``I1..I13`` and 26 categorical features ``C1..C26``. The cardinalities are
the distinct values per categorical column of the Kaggle training set (33.76M rows in all), as used by
DLRM's and TorchRec's Criteo Kaggle configurations.
"""

from __future__ import annotations

import math

NUM_DENSE = 13
NUM_SPARSE = 26
DENSE_NAMES = [f"I{i}" for i in range(1, NUM_DENSE + 1)]
SPARSE_NAMES = [f"C{i}" for i in range(1, NUM_SPARSE + 1)]

CRITEO_KAGGLE_CARDINALITIES: list[int] = [
    1460,
    583,
    10131227,
    2202608,
    305,
    24,
    12517,
    633,
    3,
    93145,
    5683,
    8351593,
    3194,
    27,
    14992,
    5461306,
    10,
    5652,
    2173,
    4,
    7046547,
    18,
    15,
    286181,
    105,
    142572,
]


def scaled_cardinalities(scale: float = 1.0, minimum: int = 2) -> list[int]:
    """Criteo Kaggle's cardinalities multiplied by ``scale`` (at least ``minimum`` rows per table)."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    sizes = [max(minimum, round(n * scale)) for n in CRITEO_KAGGLE_CARDINALITIES]
    if sum(sizes) >= 2**62:
        raise ValueError(f"scale {scale} makes tables of {sum(sizes):.3g} rows in all; ids need < 2**62")
    return sizes
