"""Data in: the batch type, the BagpipeDataModule and its loaders, and ready-made sources."""

from lightning_bagpipe.data.batch import Batch, CacheLookup, SparseFeatures, StepPlan
from lightning_bagpipe.data.datamodule import BagpipeDataModule
from lightning_bagpipe.data.loader import BagpipeLoader, EvalLoader

__all__ = [
    "BagpipeDataModule",
    "BagpipeLoader",
    "Batch",
    "CacheLookup",
    "EvalLoader",
    "SparseFeatures",
    "StepPlan",
]
