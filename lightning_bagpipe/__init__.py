"""lightning-bagpipe: BagPipe's lookahead embedding cache for PyTorch Lightning.

Importing the package registers ``Trainer(strategy="bagpipe")`` in ``lightning.pytorch``'s registry.
"""

import warnings

from lightning.pytorch.strategies import StrategyRegistry

from lightning_bagpipe import models, optim
from lightning_bagpipe.__about__ import __version__
from lightning_bagpipe.data import BagpipeDataModule, Batch, SparseFeatures
from lightning_bagpipe.embedding import CachedEmbedding, MemoryStore, MmapStore, StoreInUseError, TieredStore
from lightning_bagpipe.strategies import BagpipeStrategy
from lightning_bagpipe.strategies.sharded_checkpoint import load_checkpoint_for_inference
from lightning_bagpipe.tables import Tables, TableSpec

BagpipeStrategy.register_strategies(StrategyRegistry)

# Lightning 2.6's pytree helper trips a torch 2.13 deprecation on every fit; silence that message only.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)

__all__ = [
    "BagpipeDataModule",
    "BagpipeStrategy",
    "Batch",
    "CachedEmbedding",
    "MemoryStore",
    "MmapStore",
    "SparseFeatures",
    "StoreInUseError",
    "TableSpec",
    "Tables",
    "TieredStore",
    "__version__",
    "load_checkpoint_for_inference",
    "models",
    "optim",
]
