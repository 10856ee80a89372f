"""Deterministic initial embedding weights: a pure function of ``(seed, dim, fused row id)``.

The cache, the store and a plain reference model must start from the *same* table, whatever order or
granularity they build it in, so the weights are defined on fixed chunks of the fused id space:

1. Fused rows are split into chunks of :data:`CHUNK_ROWS` (65536) rows; chunk ``k`` covers fused rows
   ``[k * 65536, (k + 1) * 65536)``.
2. Chunk ``k`` draws ``u = torch.rand(65536, dim, generator=g)`` (always the full chunk, even past the
   last row) with ``g = torch.Generator().manual_seed(seed * 1_000_003 + k)``.
3. Fused row ``r = k * 65536 + i`` of table ``j`` (``n_j`` rows) gets
   ``w[r] = (2 * u[i] - 1) * b_j`` in float32, where ``b_j = float32(1 / sqrt(n_j))`` (computed in
   float64, then rounded). So every weight lies in ``[-b_j, b_j]``: TorchRec/DLRM's
   ``uniform(-sqrt(1/n), sqrt(1/n))`` convention.

Any sub-range therefore equals the same slice of the whole table; :func:`initial_weights` rebuilds one
table for a reference ``nn.Embedding``. Values are reproducible for a given torch version (torch's CPU
generator has been stable, but torch does not promise it across versions).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_bagpipe.embedding.store import EmbeddingStore
from lightning_bagpipe.tables import Tables

__all__ = ["CHUNK_ROWS", "SEED_STRIDE", "initial_rows", "initial_weights", "initialize_store"]

#: Fused rows per generator chunk (part of the recipe; changing it changes every weight).
CHUNK_ROWS = 65536
#: Chunk ``k`` is drawn from ``manual_seed(seed * SEED_STRIDE + k)``.
SEED_STRIDE = 1_000_003
_MAX_SEED = 2**32


def _check(tables: Tables, dim: int, seed: int) -> None:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if not isinstance(tables, Tables):
        raise ValueError(f"tables must be a lightning_bagpipe.Tables, got {type(tables).__name__}")


def _row_bounds(tables: Tables, start: int, stop: int) -> Tensor:
    """``float32(1 / sqrt(n_j))`` of the table of every fused row in ``[start, stop)``, as ``[K, 1]``."""
    bounds = (1.0 / np.sqrt(tables.sizes.astype(np.float64))).astype(np.float32)
    table_of = np.searchsorted(tables.offsets, np.arange(start, stop, dtype=np.int64), side="right") - 1
    return torch.from_numpy(bounds[table_of]).unsqueeze(1)


def _chunk_uniforms(seed: int, dim: int, k: int) -> Tensor:
    g = torch.Generator().manual_seed(int(seed) * SEED_STRIDE + k)
    return torch.rand(CHUNK_ROWS, dim, generator=g, dtype=torch.float32)


def initial_rows(tables: Tables, dim: int, seed: int, start: int, stop: int) -> Tensor:
    """Initial weights of fused rows ``[start, stop)`` as a ``[stop - start, dim]`` float32 tensor.

    See the module docstring for the exact recipe; the result depends only on ``seed``, ``dim`` and the
    row ids, never on how the range is split.
    """
    _check(tables, dim, seed)
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= tables.total_rows:
        raise ValueError(f"row range [{start}, {stop}) is not within the {tables.total_rows} fused rows")
    out = torch.empty(stop - start, int(dim), dtype=torch.float32)
    if stop == start:
        return out
    for k in range(start // CHUNK_ROWS, (stop - 1) // CHUNK_ROWS + 1):
        lo, hi = max(start, k * CHUNK_ROWS), min(stop, (k + 1) * CHUNK_ROWS)
        u = _chunk_uniforms(seed, int(dim), k)[lo - k * CHUNK_ROWS : hi - k * CHUNK_ROWS]
        out[lo - start : hi - start] = u.mul(2).sub_(1)
    out.mul_(_row_bounds(tables, start, stop))
    return out


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
    chunk_rows: int = 4 * CHUNK_ROWS,
) -> None:
    """Fill every row of ``store`` with its initial weights followed by ``state_init``.

    Works ``chunk_rows`` rows at a time, so memory stays bounded for tables larger than RAM. Records
    ``initialized=False`` first and ``initialized=True`` (with ``seed``, ``dim``, ``state_width`` and
    ``tables_fingerprint``) only after the rows are flushed, so an interrupted fill is detectable.
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
    )
