"""DLRM (Naumov et al., 2019) on a :class:`~lightning_bagpipe.CachedEmbedding`.

* **bottom MLP** over the dense features, ending at ``embedding_dim`` (ReLU on every layer, as DLRM);
* **interaction**: the dot product of every pair among ``[bottom output, e_1 .. e_F]``, upper triangle
  without the diagonal, i.e. ``(F + 1) * F / 2`` values (:func:`pairwise_dot_interactions`);
* **top MLP** over ``concat(bottom output, interactions)``, ending in one logit (no activation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_bagpipe.data.batch import Batch
from lightning_bagpipe.embedding.cached import CachedEmbedding
from lightning_bagpipe.models.common import (
    DEFAULT_DENSE_LR,
    DEFAULT_SPARSE_LR,
    ClickModel,
    DenseOptimizerName,
    SparseOptimizerLike,
    StoreLike,
    TablesLike,
    coerce_tables,
    int_list,
    mlp,
    positive_int,
    resolve_sparse_optimizer,
    store_hparam,
)

__all__ = ["DLRM", "pairwise_dot_interactions"]


def pairwise_dot_interactions(vectors: Tensor) -> Tensor:
    """Dots ``<v_i, v_j>`` for ``i < j`` of ``[B, N, D]`` vectors -> ``[B, N * (N - 1) / 2]``.

    Pairs are ordered row-major over the upper triangle: ``(0, 1), (0, 2), .., (0, N-1), (1, 2), ..``.
    """
    if vectors.dim() != 3:
        raise ValueError(
            f"pairwise_dot_interactions expects [batch, vectors, dim], got shape {list(vectors.shape)}"
        )
    n = vectors.shape[1]
    gram = torch.bmm(vectors, vectors.transpose(1, 2))
    i, j = torch.triu_indices(n, n, offset=1, device=vectors.device)
    return gram[:, i, j]


class DLRM(ClickModel):
    """DLRM click model whose embeddings live in a BagPipe cache.

    Args:
        tables: one table per sparse feature, in batch feature order (``Tables``, ``TableSpec`` s or
            ``[name, rows]`` pairs).
        embedding_dim: embedding width ``D`` shared by all features.
        bottom: widths of the bottom MLP over the dense features; the last must equal ``embedding_dim``.
        top: widths of the top MLP; the last must be 1 (the logit).
        num_dense: dense features per sample (13 for Criteo; DLRM needs at least one).
        sparse_optimizer: trains the embedding rows under ``strategy="bagpipe"``; default
            ``RowWiseAdagrad(lr=sparse_lr)``. May be an ``hparams()`` dict (as stored in checkpoints).
        sparse_lr: learning rate of the default sparse optimizer (ignored when ``sparse_optimizer`` is given).
        dense_optimizer: ``"adam"`` or ``"adagrad"`` for the MLPs.
        dense_lr: learning rate of the dense optimizer.
        store: where the full tables live: ``None`` (RAM), a file path (memory-mapped), an
            :class:`~lightning_bagpipe.embedding.store.EmbeddingStore`, or a callable
            ``(num_rows, width) -> EmbeddingStore`` such as ``functools.partial(TieredStore, path)``
            (see :class:`~lightning_bagpipe.embedding.cached.CachedEmbedding`).
        seed: seed of the embedding rows' deterministic initialisation.
        pooling: ``"sum"`` or ``"mean"`` over multi-hot bags.

    ``forward(batch)`` returns the logits ``[B]``.
    """

    def __init__(
        self,
        tables: TablesLike,
        embedding_dim: int = 16,
        bottom: Sequence[int] = (64, 16),
        top: Sequence[int] = (64, 1),
        num_dense: int = 13,
        sparse_optimizer: SparseOptimizerLike = None,
        sparse_lr: float = DEFAULT_SPARSE_LR,
        dense_optimizer: DenseOptimizerName = "adam",
        dense_lr: float = DEFAULT_DENSE_LR,
        store: StoreLike = None,
        seed: int = 0,
        pooling: Literal["sum", "mean"] = "sum",
    ) -> None:
        super().__init__(num_dense=num_dense, dense_optimizer=dense_optimizer, dense_lr=dense_lr)
        tabs = coerce_tables(tables)
        dim = positive_int(embedding_dim, "embedding_dim")
        positive_int(num_dense, "num_dense (DLRM's bottom MLP needs dense features)")
        bottom_w = int_list(bottom, "bottom", allow_empty=False)
        top_w = int_list(top, "top", allow_empty=False)
        if bottom_w[-1] != dim:
            raise ValueError(
                f"the bottom MLP must end at embedding_dim={dim} (its output meets the embeddings in the "
                f"dot interactions), got bottom={bottom_w}"
            )
        if top_w[-1] != 1:
            raise ValueError(f"the top MLP must end in 1 output (the logit), got top={top_w}")
        opt = resolve_sparse_optimizer(sparse_optimizer, sparse_lr)
        self.save_hyperparameters(
            {
                "tables": tabs.to_list(),
                "embedding_dim": dim,
                "bottom": bottom_w,
                "top": top_w,
                "num_dense": int(num_dense),
                "sparse_optimizer": opt.hparams(),
                "sparse_lr": float(sparse_lr),
                "dense_optimizer": dense_optimizer,
                "dense_lr": float(dense_lr),
                "store": store_hparam(store),
                "seed": int(seed),
                "pooling": pooling,
            }
        )
        self.embedding_dim = dim
        self.num_features = len(tabs)
        self.embedding = CachedEmbedding(tabs, dim, opt, store=store, seed=seed, pooling=pooling)
        self.bottom = mlp(self.num_dense, bottom_w, last_activation=True)
        n = self.num_features + 1
        self.top = mlp(dim + n * (n - 1) // 2, top_w, last_activation=False)

    def forward(self, batch: Batch) -> Tensor:
        x = self.bottom(self.dense_input(batch))  # [B, D]
        emb = self.embedding(batch.sparse)  # [B, F, D]
        inter = pairwise_dot_interactions(torch.cat([x.unsqueeze(1), emb], dim=1))
        return self.top(torch.cat([x, inter], dim=1)).squeeze(1)
