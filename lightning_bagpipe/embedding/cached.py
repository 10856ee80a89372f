"""CachedEmbedding: pooled embedding lookups for many tables, served from a plan-driven device cache.

Under ``strategy="bagpipe"`` training, every lookup reads ``cache[slot]`` with the slots the oracle put in
the batch (no id -> slot lookup in the hot path) and gradients flow only into the rows the step touched;
the strategy then applies the row-wise sparse optimizer to those cache rows. Each cache row holds the
embedding weights *and* that row's optimizer state, so both travel together between cache and store.

Everywhere else (validation, test, predict, a plain Trainer, a notebook call) the module reads rows straight
from the store, without the cache and without gradients, so a trained model is usable anywhere.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_bagpipe.arguments import integer
from lightning_bagpipe.data.batch import PoolingIndex, SparseFeatures
from lightning_bagpipe.embedding.distributed import ShardedStore
from lightning_bagpipe.embedding.init import initialize_store
from lightning_bagpipe.embedding.pooling import pooled_lookup
from lightning_bagpipe.embedding.store import EmbeddingStore, MemoryStore
from lightning_bagpipe.embedding.store_open import new_or_unfinished, open_path
from lightning_bagpipe.embedding.tiered_store import TieredStore
from lightning_bagpipe.optim.sparse import SparseOptimizer
from lightning_bagpipe.tables import Tables, TableSpec

#: State-dict keys (after the module's prefix) of the written-rows layout, besides ``rows``: the ids of the
#: saved rows, and the seed and optimizer state every other row starts from.
WRITTEN_IDS, INIT_SEED, INIT_STATE = "row_ids", "rows_init_seed", "rows_init_state"
#: Stands for ``state_dict["<module>.rows"]`` once a loader has put the rows into the module's store itself
#: (the shards of a directory checkpoint): loading it changes nothing.
ROWS_IN_PLACE = torch.empty(0)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    return "nothing" if value is None else type(value).__name__


class CachedEmbedding(nn.Module):
    """Sum- or mean-pooled embeddings of every sparse feature, one table per feature.

    Args:
        tables: one table per feature, in the order of the batch's feature keys.
        dim: embedding dimension shared by the tables of this module. Every module of a model serves
            all its tables and shares one oracle plan; for another dimension add a second module over
            the same tables (it costs no oracle work) and use the features you need from it.
        optimizer: the row-wise sparse optimizer that trains this module's rows
            (:mod:`lightning_bagpipe.optim`).
        store: where the full tables live: ``None`` (host RAM), a path (a memory-mapped file, created or
            reopened; a file a ``TieredStore`` wrote reopens as one), an
            :class:`~lightning_bagpipe.embedding.store.EmbeddingStore`, or a callable
            ``(num_rows, width) -> EmbeddingStore`` such as ``functools.partial(TieredStore, path)``.
            A new store is filled with the initial rows, except one that initialises lazily
            (:class:`~lightning_bagpipe.embedding.tiered_store.TieredStore`), which computes them on
            first read.
        seed: seed of the deterministic initialisation
            (:func:`~lightning_bagpipe.embedding.init.initial_rows`).
        pooling: ``"sum"`` or ``"mean"`` over each bag (an empty bag, a missing value, pools to zeros either
            way, with no gradient, as in ``nn.EmbeddingBag``).

    ``forward(features)`` returns ``[batch, features, dim]``.
    """

    _anchor: Tensor
    _offsets: Tensor
    _sizes: Tensor

    def __init__(
        self,
        tables: Tables | list[TableSpec] | list[tuple[str, int]],
        dim: int,
        optimizer: SparseOptimizer,
        *,
        store: EmbeddingStore | str | Path | Callable[[int, int], EmbeddingStore] | None = None,
        seed: int = 0,
        pooling: Literal["sum", "mean"] = "sum",
    ) -> None:
        super().__init__()
        dim = integer("dim", dim, minimum=1)
        seed = integer("seed", seed)
        if pooling not in ("sum", "mean"):
            raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}")
        if not isinstance(optimizer, SparseOptimizer):
            raise TypeError(
                "optimizer must be a lightning_bagpipe.optim sparse optimizer "
                f"(SGD, Adagrad, RowWiseAdagrad, Adam), got {type(optimizer).__name__}"
            )
        self.tables = Tables.coerce(tables)
        self.dim = dim
        self.optimizer = optimizer
        self.pooling = pooling
        self.seed = seed
        self.width = self.dim + optimizer.state_width(self.dim)
        self.store = self._open_store(store)
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)
        self.register_buffer("_offsets", torch.as_tensor(self.tables.offsets), persistent=False)
        self.register_buffer("_sizes", torch.as_tensor(self.tables.sizes), persistent=False)
        self._cache: Tensor | None = None
        self._pinned: Tensor | None = None
        self._active = False
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._warned_inactive = False
        self._owner: weakref.ref[_Owner] | None = None  # the driver of an active cache
        self._save_written_rows = False  # set while a checkpoint is taken (checkpointing.written_rows_only)

    # ------------------------------------------------------------------ store
    def _store_metadata(self) -> dict[str, Any]:
        return {
            "tables": self.tables.to_list(),
            "tables_fingerprint": self.tables.fingerprint(),
            "dim": self.dim,
            "optimizer": self.optimizer.name,
            "state_width": self.width - self.dim,
            "seed": self.seed,
        }

    def _open_store(
        self, store: EmbeddingStore | str | Path | Callable[[int, int], EmbeddingStore] | None
    ) -> EmbeddingStore:
        n = self.tables.total_rows
        what = f"CachedEmbedding({len(self.tables)} tables, dim={self.dim}, optimizer={self.optimizer.name})"
        created = opened = False  # a new store made here / an existing file opened by its path
        if store is None:
            s: EmbeddingStore = MemoryStore(n, self.width)
            created = True
        elif isinstance(store, (str, Path)):
            s, created = open_path(Path(store), n, self.width)
            opened = not created
        elif isinstance(store, EmbeddingStore):
            s = store
        elif callable(store):
            s = store(n, self.width)
            if not isinstance(s, EmbeddingStore):
                raise TypeError(f"store factory {store!r} returned {type(s).__name__}, not an EmbeddingStore")
        else:
            raise TypeError(
                f"store must be None, a path, an EmbeddingStore or a callable, got {type(store).__name__}"
            )
        try:
            self._prepare_store(s, created, opened, what)
        except BaseException:
            if isinstance(store, (str, Path)):  # opened here: let go of the file
                with contextlib.suppress(Exception):
                    s.close()
            raise
        return s

    def _prepare_store(self, s: EmbeddingStore, created: bool, opened: bool, what: str) -> None:
        """Initialise store ``s`` if it is new (or its initialisation was interrupted), else check that its
        metadata describes rows of this module, then its shape (ValueError otherwise)."""
        if created or new_or_unfinished(s, opened):
            s.validate(self.tables.total_rows, self.width, what=what)
            state = self.optimizer.initial_state(self.dim)
            if isinstance(s, TieredStore):  # rows computed on first read instead of written now
                s.initialize_lazily(self.tables, self.dim, state, self.seed)
            else:
                initialize_store(s, self.tables, self.dim, state, self.seed)
            s.set_metadata(initialized=True, **self._store_metadata())
            return
        meta = s.metadata
        fp = meta["tables_fingerprint"]
        if fp != self.tables.fingerprint():
            raise ValueError(f"store {s!r} was created for other tables (fingerprint {fp}) than {what}")
        if meta.get("optimizer") not in (None, self.optimizer.name):
            raise ValueError(
                f"store {s!r} holds {meta['optimizer']} optimizer state, but {what} uses "
                f"{self.optimizer.name}"
            )
        if meta["dim"] != self.dim:
            raise ValueError(
                f"store {s!r} holds rows of dim {meta['dim']} and {meta['state_width']} optimizer state "
                f"columns, but {what} needs dim {self.dim} and {self.width - self.dim}"
            )
        s.validate(self.tables.total_rows, self.width, what=what)

    def export(self) -> dict[str, Tensor]:
        """The trained tables as plain ``[num_embeddings, dim]`` tensors, keyed by feature name.

        During fit it first brings the store up to date with the cache (on several processes it must
        then be current already, as after validation; on a sharded store every rank must call it).
        """
        self._store_up_to_date()
        full = self.store.tensor()
        return {
            t.name: full[int(o) : int(o) + t.num_embeddings, : self.dim].clone()
            for t, o in zip(self.tables, self.tables.offsets)
        }

    def export_state(self) -> Tensor:
        """Every row's optimizer state, ``[total_rows, state_width]`` in fused-id order (read like
        :meth:`export`)."""
        self._store_up_to_date()
        return self.store.tensor()[:, self.dim :].clone()

    # ------------------------------------------------------------------ cache (driven by the strategy)
    @property
    def cache_device(self) -> torch.device:
        return self._anchor.device

    def _ensure_cache(self, rows: int) -> Tensor:
        if self._cache is None or self._cache.shape[0] < rows or self._cache.device != self.cache_device:
            new = torch.zeros(rows, self.width, device=self.cache_device)
            if self._cache is not None and self._cache.device == self.cache_device:
                new[: self._cache.shape[0]] = self._cache
            self._cache = new
        return self._cache

    def _activate(self, capacity: int | None, owner: _Owner | None = None) -> None:
        self._ensure_cache(max(1, capacity or 1))
        self._active = True
        self._owner = None if owner is None else weakref.ref(owner)
        self._pending.clear()

    def _deactivate(self) -> None:
        self._active = False
        self._owner = None
        self._pending.clear()
        self._cache = None
        self._pinned = None

    def _load_rows(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Store -> cache (runs on the executor thread)."""
        cache = self._cache
        if cache is not None and cache.device.type == "cuda" and ids.size:
            rows = self._staging(ids.size)  # pinned, so the host-to-device copy runs asynchronously
            self.store.read_into(ids, rows)
        else:
            rows = self.store.read(ids)  # (a collective call for a sharded store: even when empty)
        self._put_rows(slots, rows)
        if cache is not None and cache.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the staging buffer is reused by the next job

    def _read_rows(self, ids: np.ndarray) -> Tensor:
        """Store -> host tensor, for rows fetched several steps early (runs on the executor thread; a
        collective call for a sharded store, even when empty)."""
        return self.store.read(ids)

    def _put_rows(self, slots: np.ndarray, rows: Tensor) -> None:
        """Host rows -> cache ``slots`` (runs on the executor thread)."""
        if not slots.size:
            return
        cache = self._cache
        if cache is None or cache.shape[0] <= int(slots.max()):
            raise RuntimeError(f"slot {int(slots.max())} is outside the cache")
        cache.index_copy_(
            0, torch.from_numpy(slots).to(cache.device), rows.to(cache.device, non_blocking=True)
        )

    def _staging(self, rows: int) -> Tensor:
        """A pinned host buffer of at least ``rows`` rows (grown on demand, reused between jobs)."""
        buf = self._pinned
        if buf is None or buf.shape[0] < rows:
            buf = torch.empty(max(rows, 2 * (0 if buf is None else buf.shape[0])), self.width).pin_memory()
            self._pinned = buf
        return buf[:rows]

    def _store_rows(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Cache -> store (runs on the executor thread)."""
        assert self._cache is not None
        rows = self._cache.index_select(0, torch.from_numpy(slots).to(self._cache.device))
        self.store.write(ids, rows.cpu(), check_unique=False)

    def _take_grads(self, scale: float = 1.0) -> tuple[Tensor, Tensor] | None:
        """The summed gradient of every cache slot this step's forward passes read (divided by a loss
        ``scale``), and forget them."""
        pending, self._pending = self._pending, []
        grads = [(s, r.grad if scale == 1.0 else r.grad / scale) for s, r in pending if r.grad is not None]
        if not grads:
            return None
        if len(grads) == 1:  # the usual case: one call in the step (no copies)
            return grads[0]
        slots = torch.cat([s for s, _ in grads])
        grad = torch.cat([g for _, g in grads])
        # the module was called more than once in the step: one summed gradient per slot
        slots, inv = torch.unique(slots, return_inverse=True)
        summed = torch.zeros(slots.numel(), self.dim, device=grad.device, dtype=grad.dtype)
        return slots, summed.index_add_(0, inv, grad)

    def _update_rows(self, slots: Tensor, grad: Tensor, step: int) -> None:
        """Apply the sparse optimizer to cache rows ``slots`` (weights and state updated together)."""
        if self._cache is None or slots.numel() == 0:
            return
        rows = self._cache.index_select(0, slots)
        self.optimizer.update(rows, grad, step)
        self._cache.index_copy_(0, slots, rows)

    # ------------------------------------------------------------------ forward
    @torch.compiler.disable
    def forward(self, features: SparseFeatures) -> Tensor:
        if features.weights is not None and self.pooling != "sum":
            raise ValueError(
                f"CachedEmbedding(pooling={self.pooling!r}) got weighted bags (SparseFeatures.weights): "
                "per-occurrence weights need pooling='sum', which pools them as a weighted sum"
            )
        lookup = features.lookup
        if self._active and lookup is not None:  # a training batch: its rows are in the cache, current
            assert self._cache is not None
            rows = self._cache[:, : self.dim].index_select(0, lookup.slots)
            if self.training and torch.is_grad_enabled():
                rows.requires_grad_()
                self._pending.append((lookup.slots, rows))
            # (else, e.g. under torch.no_grad() inside training_step: the same rows, not trained; the
            # store's copies may be older than the cache's)
            index = lookup.pooling
            if index is None:  # a lookup built by hand, without its pooling layout
                index = PoolingIndex.from_lookup(
                    lookup.inverse, features.lengths, features.num_features, rows.shape[0]
                )
        else:
            if self._active:
                self._current_store(features)
            elif self.training and torch.is_grad_enabled() and not self._warned_inactive:
                self._warned_inactive = True
                rank_zero_warn(
                    "CachedEmbedding is training outside strategy='bagpipe': rows are read from the store "
                    "and receive no updates. Use Trainer(strategy='bagpipe') to train the embeddings."
                )
            ids = self._fused_ids(features)
            uniq, inverse = torch.unique(ids, return_inverse=True)
            rows = self.store.read(uniq.cpu().numpy())[:, : self.dim].to(self.cache_device)
            index = PoolingIndex.from_lookup(
                inverse, features.lengths, features.num_features, rows.shape[0], grouped=False
            )
        weights = features.weights
        if weights is not None and weights.dtype != rows.dtype:  # (a "-true" precision converted them)
            weights = weights.to(rows.dtype)
        out = pooled_lookup(
            rows, index, features.batch_size, features.num_features, mode=self.pooling, weights=weights
        )
        # The rows stay float32 (the cache and the store hold them so); under Lightning's "bf16-true",
        # "16-true" or "64-true" precision the dense layers expect the default dtype it sets
        wanted = torch.get_default_dtype()
        return out if out.dtype == wanted else out.to(wanted)

    def _current_store(self, features: SparseFeatures) -> None:
        """Before features without a cache plan read the store during fit: refuse them if they would need
        training, else bring the store up to date (the cache holds the newest copies of its rows)."""
        owner = self._active_owner()
        if owner is None:
            return
        if self.training and torch.is_grad_enabled() and owner.step_open:
            raise RuntimeError(
                "CachedEmbedding got features without a cache plan inside a training step (the loader plans "
                "the batch's own features; SparseFeatures.slice_samples keeps the plan). Only planned rows "
                "are in the cache and can be trained: ids that are not in the batch (sampled negatives, "
                f"candidates) must be part of the batches the data source yields. Got keys {features.keys} "
                f"for {features.batch_size} samples. To read rows without training them, look them up under "
                "torch.no_grad()."
            )
        owner.make_store_current()

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``copy.deepcopy``, pickling) of the module as trained so far, without the cache: during
        fit the store is brought up to date first, and the copy is an inactive module over a copy of the
        store."""
        self._store_up_to_date()
        state = self.__dict__.copy()
        state.update(_active=False, _owner=None, _cache=None, _pinned=None, _pending=[])
        return state

    def _active_owner(self) -> _Owner | None:
        """The driver of the active cache (``None`` outside fit)."""
        return None if self._owner is None else self._owner()

    def _store_up_to_date(self) -> None:
        """Before the store is read during fit: bring it up to date with the cache's newer rows."""
        owner = self._active_owner()
        if owner is not None:
            owner.make_store_current()

    def _fused_ids(self, features: SparseFeatures) -> Tensor:
        if features.keys != self.tables.names:
            features.to("cpu").validate(self.tables)  # raises, naming the unknown or missing keys
        b = features.batch_size
        per_key = features.lengths.view(len(features.keys), b).sum(1)
        key_of = torch.repeat_interleave(torch.arange(len(features.keys), device=per_key.device), per_key)
        bad = (features.values < 0) | (features.values >= self._sizes[key_of])
        if bool(bad.any()):
            features.to("cpu").validate(self.tables)
        return features.values + self._offsets[key_of]

    # ------------------------------------------------------------------ checkpoints
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        self._store_up_to_date()  # (a checkpoint's save has done it already)
        ids = self.store.written_ids() if self._save_written_rows else None
        if ids is None:
            destination[prefix + "rows"] = self.store.tensor()
            return
        # the written-rows layout: the rows written since initialisation and the recipe of all others
        meta = self.store.metadata
        destination[prefix + "rows"] = self.store.read(ids)
        destination[prefix + WRITTEN_IDS] = torch.from_numpy(ids)
        destination[prefix + INIT_SEED] = torch.tensor(int(meta["seed"]), dtype=torch.int64)
        destination[prefix + INIT_STATE] = torch.tensor(meta["state_init"], dtype=torch.float32)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "rows"
        if state_dict.get(key) is ROWS_IN_PLACE:
            state_dict.pop(key)
        elif prefix + WRITTEN_IDS in state_dict:
            error = self._load_written_rows(
                state_dict.pop(key, None),
                state_dict.pop(prefix + WRITTEN_IDS),
                state_dict.pop(prefix + INIT_SEED, None),
                state_dict.pop(prefix + INIT_STATE, None),
                prefix,
            )
            if error:
                error_msgs.append(error)
        elif key in state_dict:
            rows = state_dict.pop(key)
            expect = (self.tables.total_rows, self.width)
            if tuple(rows.shape) != expect:
                error_msgs.append(
                    f"{key}: checkpoint table rows have shape {tuple(rows.shape)}, this module expects "
                    f"{expect} ({len(self.tables)} tables, dim {self.dim} + {self.width - self.dim} "
                    "optimizer state columns)"
                )
            else:
                self.store.write_range(0, rows.to(torch.float32).cpu())
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _load_written_rows(self, rows: Any, ids: Any, seed: Any, state: Any, prefix: str) -> str | None:
        """Restore a written-rows state dict: every row back to the saved recipe's initial value, then the
        saved rows written over it. Returns what is wrong with the entries instead, if anything."""
        key = prefix + "rows"
        n, w, sw = self.tables.total_rows, self.width, self.width - self.dim
        if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.dtype != torch.int64:
            return f"{prefix + WRITTEN_IDS}: expected a 1-D int64 tensor of row ids, got {_describe(ids)}"
        k = ids.numel()
        if not isinstance(rows, Tensor) or tuple(rows.shape) != (k, w):
            return (
                f"{key}: {k} written row ids need rows of shape [{k}, {w}] ({len(self.tables)} tables, dim "
                f"{self.dim} + {sw} optimizer state columns), got {_describe(rows)}"
            )
        ids_np = ids.cpu().numpy()
        if k and (int(ids_np[0]) < 0 or int(ids_np[-1]) >= n or bool(np.any(ids_np[1:] <= ids_np[:-1]))):
            return f"{prefix + WRITTEN_IDS}: row ids must be strictly increasing and within [0, {n})"
        if not isinstance(seed, Tensor) or seed.numel() != 1 or seed.is_floating_point():
            return f"{prefix + INIT_SEED}: expected the initial rows' integer seed, got {_describe(seed)}"
        if not isinstance(state, Tensor) or state.dim() != 1 or state.numel() != sw:
            return f"{prefix + INIT_STATE}: expected {sw} initial optimizer states, got {_describe(state)}"
        self._restart_rows(int(seed), state)
        self.store.write(ids_np, rows.to(torch.float32).cpu(), check_unique=False)
        return None

    def _restart_rows(self, seed: int, state: Tensor) -> EmbeddingStore:
        """Put every row of this process's store back to its initial value under ``seed`` and optimizer
        state ``state`` (a lazily initialised store writes nothing); return that store."""
        init_state = state.to(torch.float32).cpu().reshape(-1)
        local = self.store.local if isinstance(self.store, ShardedStore) else self.store
        if isinstance(local, TieredStore):
            local.initialize_lazily(self.tables, self.dim, init_state, seed)
            local.reset_to_initial()
        else:
            initialize_store(local, self.tables, self.dim, init_state, seed)
        local.set_metadata(**{**self._store_metadata(), "seed": seed})
        return local

    def extra_repr(self) -> str:
        return (
            f"tables={len(self.tables)}, rows={self.tables.total_rows}, dim={self.dim}, "
            f"optimizer={self.optimizer.name}, pooling={self.pooling}, store={type(self.store).__name__}"
        )


class _Owner(Protocol):
    """What a module asks of the driver of its active cache (:class:`~.driver.CacheDriver`)."""

    @property
    def step_open(self) -> bool:
        """Whether a training step has begun and not yet applied its sparse update."""
        ...

    def make_store_current(self) -> None:
        """Bring the store up to date with the cache (or refuse, naming why)."""
        ...
