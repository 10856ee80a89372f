"""DeepFM (Guo et al., IJCAI'17) on a :class:`~lightning_bagpipe.CachedEmbedding`.

``logit = first-order + dense linear + FM second-order + deep MLP``:

* **first order**: one scalar weight per table row, summed over the features (and over each bag);
* **dense linear**: ``Linear(num_dense, 1)`` plus the model's global bias;
* **FM second order**: ``sum_{f < g} <e_f, e_g>`` over the features' pooled embeddings, computed in
  ``O(F * dim)`` as ``0.5 * sum_dim((sum_f e_f)^2 - sum_f e_f^2)`` (:func:`fm_second_order`);
* **deep**: an MLP over ``concat(e_1 .. e_F, dense)``.

Storage choice: the first-order weight is the *last column* of the same cached row as the embedding, so
one :class:`~lightning_bagpipe.CachedEmbedding` of width ``embedding_dim + 1`` serves both: one cache, one
plan, one gather per step, and a row's weight, vector and optimizer state always move together. With
:class:`~lightning_bagpipe.optim.RowWiseAdagrad` (the default) that column shares the row's single
accumulator with the vector, as every column of a row does; element-wise optimizers (``Adagrad``,
``Adam``) treat it independently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

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

__all__ = ["DEFAULT_HIDDEN", "DeepFM", "fm_second_order"]

#: Hidden widths of the deep MLP. The paper's (400, 400, 400) trained the default ``examples/deepfm.py`` run
#: 3.8x slower on a 2-core CPU (162 s vs 43 s) to the same validation AUC (0.7911 vs 0.7916).
DEFAULT_HIDDEN: tuple[int, ...] = (128, 64)


class _FMSecondOrder(torch.autograd.Function):
    """The FM term with its gradient in one expression: ``d/d e_f = g * (sum_h e_h - e_f)``.

    Autograd's own backward of the forward formula builds several ``[B, F, D]`` temporaries from a
    strided input (DeepFM's embeddings are a column split of the cached rows). Alone, with the split and
    the deep input's concatenation, forward and backward took 8.8 ms with autograd's backward and 4.0
    ms with this one (batch 4096, 26 features, 2 CPU threads); inside a whole DeepFM step the gain
    measured about 1 ms (4%) and less than the noise for bagpipe. The backward is written in
    differentiable ops from the saved input, so higher-order gradients still work.
    """

    @staticmethod
    def forward(ctx: Any, emb: Tensor) -> Tensor:
        ctx.save_for_backward(emb)
        total = emb.sum(dim=1)
        return 0.5 * (total * total - (emb * emb).sum(dim=1)).sum(dim=1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (emb,) = ctx.saved_tensors
        return grad[:, None, None] * (emb.sum(dim=1, keepdim=True) - emb)


def fm_second_order(emb: Tensor) -> Tensor:
    """Factorization-machine pairwise term ``sum_{f<g} <emb[:, f], emb[:, g]>``: ``[B, F, D]`` -> ``[B]``."""
    if emb.dim() != 3:
        raise ValueError(f"fm_second_order expects [batch, features, dim], got shape {list(emb.shape)}")
    out: Tensor = _FMSecondOrder.apply(emb)
    return out


class DeepFM(ClickModel):
    """DeepFM click model whose embeddings (and first-order weights) live in a BagPipe cache.

    Args:
        tables: one table per sparse feature, in batch feature order (``Tables``, ``TableSpec`` s or
            ``[name, rows]`` pairs).
        embedding_dim: embedding width ``D`` shared by all features (the cached row holds ``D + 1``
            weights: the last is the first-order weight).
        hidden: widths of the deep MLP's hidden layers (a final ``Linear(., 1)`` is added). The default
            is smaller than the paper's ``(400, 400, 400)`` to keep CPU runs short.
        num_dense: dense features per sample (13 for Criteo; 0 for none).
        sparse_optimizer: trains the embedding rows under ``strategy="bagpipe"``; default
            ``RowWiseAdagrad(lr=sparse_lr)``. May be an ``hparams()`` dict (as stored in checkpoints).
        sparse_lr: learning rate of the default sparse optimizer (ignored when ``sparse_optimizer`` is given).
        dense_optimizer: ``"adam"`` or ``"adagrad"`` for the MLP and linear weights.
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
        hidden: Sequence[int] = DEFAULT_HIDDEN,
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
        widths = int_list(hidden, "hidden")
        opt = resolve_sparse_optimizer(sparse_optimizer, sparse_lr)
        self.save_hyperparameters(
            {
                "tables": tabs.to_list(),
                "embedding_dim": dim,
                "hidden": widths,
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
        self.embedding = CachedEmbedding(tabs, dim + 1, opt, store=store, seed=seed, pooling=pooling)
        self.bias = nn.Parameter(torch.zeros(1))
        self.dense_linear = nn.Linear(self.num_dense, 1, bias=False) if self.num_dense else None
        deep_in = self.num_features * dim + self.num_dense
        self.deep = nn.Sequential(
            mlp(deep_in, widths, last_activation=True), nn.Linear(widths[-1] if widths else deep_in, 1)
        )

    def parts(self, batch: Batch) -> dict[str, Tensor]:
        """The four logit terms (each ``[B]``): ``first_order``, ``linear``, ``fm``, ``deep``."""
        rows = self.embedding(batch.sparse)  # [B, F, D + 1]
        # split, not two slices: its gradient is one concatenation instead of two zero-filled full copies
        emb, first_col = rows.split([self.embedding_dim, 1], dim=-1)
        first = first_col.squeeze(-1)
        dense = self.dense_input(batch)
        linear = self.bias.expand(first.shape[0])
        if self.dense_linear is not None:
            linear = linear + self.dense_linear(dense).squeeze(1)
        deep = self.deep(torch.cat([emb.flatten(1), dense], dim=1)).squeeze(1)
        return {"first_order": first.sum(dim=1), "linear": linear, "fm": fm_second_order(emb), "deep": deep}

    def forward(self, batch: Batch) -> Tensor:
        p = self.parts(batch)
        return p["first_order"] + p["linear"] + p["fm"] + p["deep"]
