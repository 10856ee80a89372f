"""Data in: the batch type, the BagpipeDataModule and its loaders, and ready-made sources."""

from lightning_bagpipe.data.batch import Batch, CacheLookup, SparseFeatures, StepPlan
from lightning_bagpipe.data.criteo import CriteoDataModule
from lightning_bagpipe.data.criteo_tsv import CriteoTSV, ModuloHashing, Vocabulary
from lightning_bagpipe.data.datamodule import BagpipeDataModule
from lightning_bagpipe.data.loader import BagpipeLoader, EvalLoader
from lightning_bagpipe.data.parquet import CriteoParquet, measure_read_throughput, write_parquet
from lightning_bagpipe.data.synthetic import SyntheticCriteo, write_criteo_tsv

__all__ = [
    "BagpipeDataModule",
    "BagpipeLoader",
    "Batch",
    "CacheLookup",
    "CriteoDataModule",
    "CriteoParquet",
    "CriteoTSV",
    "EvalLoader",
    "ModuloHashing",
    "SparseFeatures",
    "StepPlan",
    "SyntheticCriteo",
    "Vocabulary",
    "measure_read_throughput",
    "write_criteo_tsv",
    "write_parquet",
]
