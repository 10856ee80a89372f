"""Embedding table specifications and the fused id space shared by data, oracle and embedding.

Every categorical feature has one table. The oracle, the cache and the store see one *fused* id space:
table ``j`` occupies fused ids ``[offsets[j], offsets[j] + num_embeddings_j)``. Keeping this in one place
means the data pipeline, the oracle's plans and the :class:`~lightning_bagpipe.CachedEmbedding` cannot
disagree on where a row lives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from lightning_bagpipe.arguments import integer


@dataclass(frozen=True)
class TableSpec:
    """One embedding table: the feature ``name`` it serves and its number of rows."""

    name: str
    num_embeddings: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"table name must be a non-empty string, got {self.name!r}")
        rows = integer(f"table {self.name!r}: num_embeddings", self.num_embeddings, minimum=1)
        object.__setattr__(self, "num_embeddings", rows)  # (a numpy integer becomes an int)


class Tables(Sequence[TableSpec]):
    """An ordered collection of tables with their fused-id offsets.

    The order is the order of features in every batch and of the ``features`` axis of the
    embedding output.
    """

    def __init__(self, tables: Iterable[TableSpec | tuple[str, int]]) -> None:
        specs = [t if isinstance(t, TableSpec) else TableSpec(str(t[0]), t[1]) for t in tables]
        if not specs:
            raise ValueError("at least one table is required")
        names = [t.name for t in specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate table names: {dup}")
        self._specs = specs
        sizes = np.array([t.num_embeddings for t in specs], dtype=np.int64)
        self.sizes: np.ndarray = sizes
        self.offsets: np.ndarray = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.total_rows: int = int(sizes.sum())
        self._index = {n: i for i, n in enumerate(names)}
        text = ";".join(f"{t.name}:{t.num_embeddings}" for t in specs)
        self._fingerprint = hashlib.sha1(text.encode()).hexdigest()[:16]

    @classmethod
    def from_sizes(cls, sizes: Sequence[int], prefix: str = "C") -> Tables:
        """Tables named ``{prefix}1 .. {prefix}N`` (Criteo's naming) with the given row counts."""
        return cls(TableSpec(f"{prefix}{i + 1}", n) for i, n in enumerate(sizes))

    @classmethod
    def coerce(cls, tables: Tables | Iterable[TableSpec | tuple[str, int]]) -> Tables:
        """Accept a :class:`Tables`, a list of :class:`TableSpec` or ``(name, rows)`` pairs."""
        return tables if isinstance(tables, Tables) else cls(tables)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._specs]

    def index(self, name: str) -> int:  # type: ignore[override]
        """Position of the table serving feature ``name``."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"unknown feature {name!r}; known features: {self.names}") from None

    def fingerprint(self) -> str:
        """A short hash of names and sizes, to detect mismatched configs across modules or ranks."""
        return self._fingerprint

    def to_list(self) -> list[list[str | int]]:
        """Plain ``[[name, rows], ...]``: safe for JSON and weights-only checkpoints."""
        return [[t.name, t.num_embeddings] for t in self._specs]

    def __getitem__(self, i: int) -> TableSpec:  # type: ignore[override]
        return self._specs[i]

    def __len__(self) -> int:
        return len(self._specs)

    def __iter__(self) -> Iterator[TableSpec]:
        return iter(self._specs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tables) and self._specs == other._specs

    def __hash__(self) -> int:
        return hash(tuple(self._specs))

    def __repr__(self) -> str:
        return f"Tables({len(self)} tables, {self.total_rows} rows)"
