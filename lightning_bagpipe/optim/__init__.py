"""Row-wise sparse optimizers for cached embeddings (state kept inside each store/cache row).

See :mod:`lightning_bagpipe.optim.sparse` and ``docs/stores-and-optimizers.md``.
"""

from lightning_bagpipe.optim.sparse import (
    SGD,
    Adagrad,
    Adam,
    LRLike,
    RowWiseAdagrad,
    SparseOptimizer,
    from_hparams,
)

__all__ = ["SGD", "Adagrad", "Adam", "LRLike", "RowWiseAdagrad", "SparseOptimizer", "from_hparams"]
