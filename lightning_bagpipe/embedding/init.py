"""Deterministic initial embedding weights: a pure function of ``(seed, dim, fused row id, column)``.

The cache, the store and a plain reference model must start from the *same* table, whatever order or
granularity they build it in, and a store too large to initialise up front must be able to produce any
single row on demand (:class:`~lightning_bagpipe.embedding.tiered_store.TieredStore`). So each weight is
a hash of its own coordinates, not a draw from a sequential generator:

1. ``salt = splitmix64(seed)`` and, for fused row ``r`` and column ``c``,
   ``h = splitmix64((r * dim + c) XOR salt)``, all in unsigned 64-bit arithmetic (wrapping), where
   ``splitmix64(x)`` is the finalizer: ``z = x + 0x9E3779B97F4A7C15``;
   ``z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9``; ``z = (z ^ (z >> 27)) * 0x94D049BB133111EB``;
   ``z ^ (z >> 31)``.
2. ``u = (h >> 40) / 2**24``, uniform on a grid of ``2**24`` values in ``[0, 1)``.
3. Row ``r`` of table ``j`` (``n_j`` rows) gets ``w[r, c] = (2 * u - 1) * b_j`` in float32, where
   ``b_j = float32(1 / sqrt(n_j))`` (computed in float64, then rounded). ``2 * u - 1`` is exact in
   float32, so every weight lies in ``[-b_j, b_j)``: TorchRec/DLRM's ``uniform(-sqrt(1/n), sqrt(1/n))``.

Any set of rows therefore equals the same rows of the whole table (:func:`initial_rows_at`), and the
values do not depend on the torch or numpy version. :func:`initial_weights` rebuilds one table for a
reference ``nn.Embedding``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_bagpipe.data.synthetic import mix64
from lightning_bagpipe.embedding.store import EmbeddingStore
from lightning_bagpipe.tables import Tables

__all__ = ["INIT_RECIPE", "initial_rows", "initial_rows_at", "initial_weights", "initialize_store"]

#: Name of the recipe above, recorded in a store's metadata (a lazily initialised store regenerates its
#: untouched rows with it, so it refuses a file written with another recipe).
INIT_RECIPE = "splitmix64-v1"
_MAX_SEED = 2**32
_BLOCK = 2048  # rows hashed at a time: the temporaries stay in cache (3x faster than 64K)


def _check(tables: Tables, dim: int, seed: int) -> None:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if not isinstance(tables, Tables):
        raise ValueError(f"tables must be a lightning_bagpipe.Tables, got {type(tables).__name__}")


def _fill(out: np.ndarray, ids: np.ndarray, tables: Tables, dim: int, seed: int) -> None:
    """Write the initial weights of fused rows ``ids`` (int64, in range) into ``out`` (``[K, dim]`` f32)."""
    salt = mix64(np.array([seed], dtype=np.uint64))[0]
    cols = np.arange(dim, dtype=np.uint64)
    bounds = (1.0 / np.sqrt(tables.sizes.astype(np.float64))).astype(np.float32)
    for lo in range(0, ids.size, _BLOCK):
        part = ids[lo : lo + _BLOCK]
        h = part.astype(np.uint64)[:, None] * np.uint64(dim) + cols[None, :]
        h ^= salt
        mix64(h, out=h)
        h >>= np.uint64(40)
        u = h.astype(np.float32)  # exact: below 2**24
        u *= np.float32(2.0**-23)
        u -= np.float32(1.0)
        u *= bounds[np.searchsorted(tables.offsets, part, side="right") - 1][:, None]
        out[lo : lo + part.size] = u


def initial_rows_at(
    tables: Tables, dim: int, seed: int, ids: np.ndarray | Tensor, out: Tensor | None = None
) -> Tensor:
    """Initial weights of the fused rows ``ids`` (any order, repeats allowed) as ``[K, dim]`` float32,
    written into ``out`` when given (a float32 CPU tensor of that shape, e.g. a column slice of rows)."""
    _check(tables, dim, seed)
    a = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
    if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise ValueError(f"ids must be a 1-D integer array, got {a.dtype} of shape {a.shape}")
    a = a.astype(np.int64, copy=False)
    if a.size and (int(a.min()) < 0 or int(a.max()) >= tables.total_rows):
        bad = a[(a < 0) | (a >= tables.total_rows)][0]
        raise ValueError(f"row id {int(bad)} is not within the {tables.total_rows} fused rows")
    if out is None:
        out = torch.empty(a.size, int(dim), dtype=torch.float32)
    elif tuple(out.shape) != (a.size, int(dim)) or out.dtype != torch.float32 or out.device.type != "cpu":
        raise ValueError(
            f"out must be a float32 CPU tensor of shape {[a.size, int(dim)]}, got {out.dtype} on "
            f"{out.device} with shape {list(out.shape)}"
        )
    _fill(out.numpy(), a, tables, int(dim), int(seed))
    return out


def initial_rows(tables: Tables, dim: int, seed: int, start: int, stop: int) -> Tensor:
    """Initial weights of fused rows ``[start, stop)`` as a ``[stop - start, dim]`` float32 tensor."""
    _check(tables, dim, seed)
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= tables.total_rows:
        raise ValueError(f"row range [{start}, {stop}) is not within the {tables.total_rows} fused rows")
    return initial_rows_at(tables, dim, seed, np.arange(start, stop, dtype=np.int64))


def initial_weights(tables: Tables, dim: int, seed: int, table: str | int) -> Tensor:
    """The initial ``[n_j, dim]`` weight of one table (by name or position), e.g. for a reference model."""
    j = tables.index(table) if isinstance(table, str) else int(table)
    if not 0 <= j < len(tables):
        raise ValueError(f"table index {j} is not within the {len(tables)} tables")
    off = int(tables.offsets[j])
    return initial_rows(tables, dim, seed, off, off + int(tables.sizes[j]))


def initialize_store(
    store: EmbeddingStore,
    tables: Tables,
    dim: int,
    state_init: Tensor,
    seed: int,
    chunk_rows: int = 1 << 18,
) -> None:
    """Fill every row of ``store`` with its initial weights followed by ``state_init``.

    Works ``chunk_rows`` rows at a time, so memory stays bounded for tables larger than RAM. Records
    ``initialized=False`` first and ``initialized=True`` (with ``seed``, ``dim``, ``state_width``,
    ``tables_fingerprint`` and ``init_recipe``) only after the rows are flushed, so an interrupted fill
    is detectable.
    """
    _check(tables, dim, seed)
    state = torch.as_tensor(state_init)
    if state.dim() != 1 or state.dtype != torch.float32:
        raise ValueError(
            f"state_init must be a 1-D float32 tensor (one optimizer-state row), got {state.dtype} "
            f"of shape {list(state.shape)}"
        )
    width = int(dim) + state.numel()
    store.validate(
        tables.total_rows, width, what=f"{len(tables)} tables with dim={dim} and state width {state.numel()}"
    )
    if isinstance(chunk_rows, bool) or int(chunk_rows) < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    chunk = int(chunk_rows)
    store.set_metadata(initialized=False)
    store.reserve()  # (a file store: a full disk is an error here, not a SIGBUS while filling the mapping)
    buf = torch.empty(min(chunk, tables.total_rows), width, dtype=torch.float32)
    buf[:, dim:] = state.cpu()
    for lo in range(0, tables.total_rows, chunk):
        hi = min(lo + chunk, tables.total_rows)
        rows = buf[: hi - lo]
        rows[:, :dim] = initial_rows(tables, dim, seed, lo, hi)
        store.write_range(lo, rows)
    store.flush()
    store.set_metadata(
        initialized=True,
        seed=int(seed),
        dim=int(dim),
        state_width=state.numel(),
        tables_fingerprint=tables.fingerprint(),
        init_recipe=INIT_RECIPE,
    )
