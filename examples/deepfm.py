"""Train DeepFM with lightning-bagpipe's lookahead embedding cache.

With no arguments it trains on synthetic Criteo-shaped data (tables scaled to 1% of Criteo Kaggle's
33.8M rows, ids as skewed as the real ones, labels from a planted model) and prints the validation AUC and
log loss next to the planted model's own AUC, the throughput and the cache figures. ``--help`` lists every
flag: Criteo TSV or Parquet input, batch size, lookahead, cache size, memory, mmap or tiered store, ...

    python examples/deepfm.py
    python examples/deepfm.py --data day_0.gz --val-data day_1.gz --max-steps 20000 --cache-rows 2000000
    python examples/deepfm.py --scale 7.95 --store tiered --cache-rows 262144 --max-steps 200  # 268M rows
"""

import os
import sys

# CPU-only tuning, set before torch loads: OpenMP's idle threads spin for less time between parallel
# regions, leaving the cores to the oracle and row threads (docs/benchmarks.md, "OpenMP spinning").
# Your own setting wins; it has no effect once torch is imported.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from lightning_bagpipe.models.train import main

if __name__ == "__main__":
    sys.exit(main(model="deepfm"))
