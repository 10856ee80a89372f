"""The batch that flows from a data source through the oracle into ``training_step``.

:class:`SparseFeatures` is the one central sparse structure (a keyed jagged tensor in TorchRec's terms):
for ``F`` features and ``B`` samples it holds

* ``keys``: the feature names, in table order;
* ``values``: every id occurrence, flattened **key-major** (all of feature 0's ids for samples 0..B-1,
  then feature 1's, ...), each id a row of that feature's own table (not fused);
* ``lengths``: ``F * B`` bag sizes, key-major; one-hot features are the case of all lengths 1;
* ``weights``: optional per-occurrence weights (same shape as ``values``);
* ``lookup``: under ``strategy="bagpipe"`` training, the cache slots this rank's occurrences read.

:class:`Batch` adds dense features, labels and the step's cache instructions (:class:`StepPlan`).
Both are plain (non-frozen) dataclasses with a ``to(device)`` method, so Lightning's default batch
transfer moves them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_bagpipe.tables import Tables


@dataclass
class PoolingIndex:
    """A batch's occurrences laid out for pooling straight into a ``[B, F, dim]`` output.

    :class:`SparseFeatures` is key-major (all of feature 0, then feature 1, ...), but models consume
    pooled embeddings sample-major. Pooling the occurrences in sample-major order gives a contiguous
    ``[B, F, dim]`` result with no transpose in the forward pass or its gradient. Built from a lookup's
    ``inverse`` (occurrence -> distinct row) and the bag lengths by :meth:`from_lookup`:

    * ``perm``: the key-major occurrence at each sample-major position;
    * ``inverse``: the distinct row each sample-major position reads;
    * ``offsets``: where each of the ``B * F`` bags (sample ``b``, feature ``f`` at ``b * F + f``) starts;
    * ``order`` / ``row_offsets``: the positions grouped by row (stably sorted by ``inverse``; row
      ``r``'s group starts at ``row_offsets[r]``). With them the gradient of the rows is itself a pooling
      of the output gradient (:func:`~lightning_bagpipe.embedding.pooling.pooled_lookup`), ~40x faster on
      CPU than autograd's scatter. ``None`` when only a forward pass is needed;
    * ``one_hot``: every bag holds one occurrence (position ``i`` is bag ``i``), which the backward pass
      then need not work out from ``offsets``.

    The loader builds it in its own thread, off the training step.
    """

    perm: Tensor
    inverse: Tensor
    offsets: Tensor
    order: Tensor | None = None
    row_offsets: Tensor | None = None
    one_hot: bool = False

    @classmethod
    def from_lookup(
        cls, inverse: Tensor, lengths: Tensor, num_features: int, num_rows: int, *, grouped: bool = True
    ) -> PoolingIndex:
        """The sample-major layout of key-major ``inverse`` with ``F * B`` bag ``lengths``.

        ``grouped`` also computes the row grouping the backward pass uses.
        """
        f = num_features
        b = lengths.numel() // max(1, f)
        n = inverse.numel()
        hot = one_hot(lengths, n)
        if hot:  # occurrence k is bag k, a [F, B] block to transpose
            perm, offsets = _one_hot_layout(f, b, inverse.device)
            inv = inverse.view(f, b).t().reshape(-1)
        else:
            starts = torch.zeros_like(lengths)
            if lengths.numel() > 1:
                torch.cumsum(lengths[:-1], 0, out=starts[1:])
            lengths_sm = lengths.view(f, b).t().reshape(-1)
            starts_km = starts.view(f, b).t().reshape(-1)
            offsets = torch.zeros_like(lengths_sm)
            if lengths_sm.numel() > 1:
                torch.cumsum(lengths_sm[:-1], 0, out=offsets[1:])
            perm = torch.repeat_interleave(starts_km - offsets, lengths_sm, output_size=n)
            perm += torch.arange(n, device=inverse.device)
            inv = inverse[perm]
        if not grouped:
            return cls(perm, inv, offsets, one_hot=hot)
        order, row_offsets = group_by_row(inv, num_rows)
        return cls(perm, inv, offsets, order, row_offsets, hot)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PoolingIndex:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return PoolingIndex(
            self.perm.to(device, non_blocking=non_blocking),
            self.inverse.to(device, non_blocking=non_blocking),
            self.offsets.to(device, non_blocking=non_blocking),
            move(self.order),
            move(self.row_offsets),
            self.one_hot,
        )


def one_hot(lengths: Tensor, occurrences: int) -> bool:
    """Whether every bag of ``lengths`` holds exactly one of the ``occurrences`` ids. The count alone does
    not tell: empty bags can make up for longer ones."""
    if occurrences != lengths.numel():
        return False
    if lengths.device.type == "cpu":  # (numpy's test is ~4x faster on a batch's 100k lengths)
        return bool((lengths.numpy() == 1).all())
    return bool((lengths == 1).all())


@functools.lru_cache(maxsize=8)
def _one_hot_layout(num_features: int, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``perm`` and ``offsets`` of a one-hot batch: they depend on its shape only (shared, never written).

    Made outside inference mode even when first asked for under it (``trainer.predict``): a cached
    inference tensor could not be saved for backward by a later training step.
    """
    n = num_features * batch_size
    with torch.inference_mode(False):
        perm = torch.arange(n, device=device).view(num_features, batch_size).t().reshape(-1)
        return perm, torch.arange(n, device=device)


def group_by_row(inverse: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """Positions stably sorted by the row they read, and where each row's group starts.

    ``inverse`` maps positions to rows ``0 .. num_rows - 1``. Stable, so each row's positions keep their
    order and its gradient is summed in the same order as a sequential scatter would.
    """
    if inverse.device.type == "cpu" and num_rows <= 2**16:
        # numpy's stable sort of 16-bit keys is a radix sort: 2x faster than torch's on 32-bit keys
        order = torch.from_numpy(np.argsort(inverse.numpy().astype(np.uint16), kind="stable"))
    else:  # (32-bit keys sort about twice as fast as 64-bit ones; a step never reads 2**31 rows)
        order = torch.argsort(inverse.to(torch.int32), stable=True)
    counts = torch.bincount(inverse, minlength=num_rows)
    row_offsets = torch.zeros(num_rows, dtype=torch.long, device=inverse.device)
    if num_rows > 1:
        torch.cumsum(counts[:-1], 0, out=row_offsets[1:])
    return order, row_offsets


@dataclass
class CacheLookup:
    """Where this rank's id occurrences live in the cache during one training step.

    ``slots`` are the distinct cache slots the step reads (ascending) and ``inverse`` maps every
    occurrence of :attr:`SparseFeatures.values` to its index in ``slots``. ``pooling`` is the same map in
    the layout the pooling kernel uses (:class:`PoolingIndex`), built ahead of the step by
    :meth:`from_inverse`.
    """

    slots: Tensor
    inverse: Tensor
    pooling: PoolingIndex | None = None

    @classmethod
    def from_inverse(cls, slots: Tensor, inverse: Tensor, lengths: Tensor, num_features: int) -> CacheLookup:
        """The lookup of key-major ``inverse`` into ``slots``, with its :class:`PoolingIndex`."""
        return cls(slots, inverse, PoolingIndex.from_lookup(inverse, lengths, num_features, slots.numel()))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CacheLookup:
        return CacheLookup(
            self.slots.to(device, non_blocking=non_blocking),
            self.inverse.to(device, non_blocking=non_blocking),
            None if self.pooling is None else self.pooling.to(device, non_blocking=non_blocking),
        )


@dataclass
class SparseFeatures:
    """Sparse categorical features of one batch (see the module docstring for the layout)."""

    keys: list[str]
    values: Tensor
    lengths: Tensor
    weights: Tensor | None = None
    lookup: CacheLookup | None = None
    _offsets: Tensor | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_lengths(
        cls,
        keys: Sequence[str],
        values: Tensor | np.ndarray,
        lengths: Tensor | np.ndarray,
        weights: Tensor | np.ndarray | None = None,
    ) -> SparseFeatures:
        """Build from flat key-major ``values`` and ``F * B`` ``lengths``; checks they add up."""
        keys = list(keys)
        if len(keys) == 0:
            raise ValueError("at least one feature key is required")
        w = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        features = cls(keys, _as_long(values, "values"), _as_long(lengths, "lengths"), w)
        features._check_layout()
        return features

    @classmethod
    def from_offsets(
        cls,
        keys: Sequence[str],
        values: Tensor | np.ndarray,
        offsets: Tensor | np.ndarray,
        weights: Tensor | np.ndarray | None = None,
    ) -> SparseFeatures:
        """Build from ``F * B + 1`` offsets into ``values`` (``offsets[0] == 0``)."""
        off = _as_long(offsets, "offsets")
        if off.dim() != 1 or off.numel() < 1 or int(off[0]) != 0:
            raise ValueError("offsets must be 1-D with offsets[0] == 0")
        return cls.from_lengths(keys, values, off[1:] - off[:-1], weights)

    @classmethod
    def from_dense(cls, keys: Sequence[str], ids: Tensor | np.ndarray) -> SparseFeatures:
        """One-hot features from a ``[B, F]`` id matrix (column ``f`` is feature ``keys[f]``)."""
        m = _as_long(ids, "ids", columns=list(keys))
        if m.dim() != 2 or m.shape[1] != len(keys):
            raise ValueError(f"expected ids of shape [batch, {len(keys)}], got {tuple(m.shape)}")
        values = m.t().contiguous().view(-1)
        return cls(list(keys), values, torch.ones(values.numel(), dtype=torch.long))

    @classmethod
    def from_dict(cls, bags: Mapping[str, Sequence[Sequence[int]]]) -> SparseFeatures:
        """From ``{feature: [bag of ids per sample]}``; convenient in notebooks and tests."""
        keys = list(bags)
        samples = {k: len(bags[k]) for k in keys}
        if len(set(samples.values())) > 1:  # (a feature's bags would pair with another's samples)
            first = keys[0]
            other = next(k for k in keys if samples[k] != samples[first])
            raise ValueError(
                f"every feature needs one bag per sample: {first!r} has {samples[first]} bags but {other!r} "
                f"has {samples[other]}"
            )
        lengths: list[int] = []
        values: list[int] = []
        for k in keys:
            for bag in bags[k]:
                lengths.append(len(bag))
                values.extend(int(x) for x in bag)
        return cls.from_lengths(
            keys, torch.tensor(values, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)
        )

    # ------------------------------------------------------------------ shape
    @property
    def num_features(self) -> int:
        return len(self.keys)

    @property
    def batch_size(self) -> int:
        return self.lengths.numel() // max(1, len(self.keys))

    @property
    def offsets(self) -> Tensor:
        """``F * B + 1`` offsets of each bag into :attr:`values`."""
        if self._offsets is None or self._offsets.device != self.lengths.device:
            off = torch.zeros(self.lengths.numel() + 1, dtype=torch.long, device=self.lengths.device)
            torch.cumsum(self.lengths, 0, out=off[1:])
            self._offsets = off
        return self._offsets

    def is_one_hot(self) -> bool:
        return one_hot(self.lengths, self.values.numel())

    # ------------------------------------------------------------------ ids
    def fused_ids(self, tables: Tables) -> np.ndarray:
        """Occurrences as ids in the fused space (table offset + row), key-major, int64 numpy."""
        per_key = self.validate(tables)
        values = self.values.numpy().astype(np.int64, copy=False)
        if self.is_one_hot():  # a [F, B] block
            return (values.reshape(len(self.keys), -1) + np.asarray(tables.offsets)[:, None]).reshape(-1)
        return values + np.repeat(tables.offsets, per_key)

    def validate(self, tables: Tables) -> np.ndarray:
        """Raise a ValueError naming the feature and value for ids that do not fit ``tables``, or for
        ``values`` and ``lengths`` that do not fit together (as :meth:`from_lengths` checks them).

        Returns the number of occurrences of each feature (int64 numpy).
        """
        if self.keys != tables.names:
            unknown = [k for k in self.keys if k not in tables.names]
            missing = [n for n in tables.names if n not in self.keys]
            if unknown:
                raise ValueError(f"unknown feature keys {unknown}; the tables are {tables.names}")
            if missing:
                raise ValueError(f"batch lacks features {missing}; every batch carries all tables")
            raise ValueError(f"feature keys {self.keys} must be in table order {tables.names}")
        per_key = self._check_layout()
        f = len(self.keys)
        if self.batch_size == 0 or self.values.numel() == 0:
            return np.zeros(f, dtype=np.int64)
        # each feature's ids are one contiguous run of ``values``: check its min and max
        present = np.flatnonzero(per_key)
        starts = np.concatenate([[0], np.cumsum(per_key)[:-1]])[present]
        values = self.values.numpy()
        lo = np.minimum.reduceat(values, starts)
        hi = np.maximum.reduceat(values, starts)
        sizes = np.asarray(tables.sizes, dtype=np.int64)[present]
        if bool((lo < 0).any() or (hi >= sizes).any()):
            k = int(present[np.flatnonzero((lo < 0) | (hi >= sizes))[0]])
            start = int(np.concatenate([[0], np.cumsum(per_key)])[k])
            run = values[start : start + int(per_key[k])]
            bad = (run < 0) | (run >= tables.sizes[k])
            raise ValueError(
                f"feature {self.keys[k]!r}: id {int(run[np.flatnonzero(bad)[0]])} is outside "
                f"[0, {tables.sizes[k]}) of its table ({int(bad.sum())} bad ids of this feature in the batch)"
            )
        return per_key

    def _check_layout(self) -> np.ndarray:
        """Check that ``values`` and ``lengths`` fit together as :meth:`from_lengths` does (the dataclass
        constructor, which the library's own sources use, checks nothing); return each feature's number
        of occurrences (int64 numpy)."""
        for name in ("values", "lengths"):
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"sparse {name} must be a torch.Tensor, got {type(t).__module__}.{type(t).__name__}: "
                    "build the features with SparseFeatures.from_lengths (which converts), or convert with "
                    "torch.from_numpy / torch.as_tensor"
                )
        if self.values.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"sparse ids must be integers (int64 or int32), got dtype {self.values.dtype}")
        if self.lengths.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"sparse lengths must be integers (int64 or int32), got dtype {self.lengths.dtype}"
            )
        if self.values.dim() != 1:
            raise ValueError(
                "sparse values must be 1-D (key-major: every bag's ids), got shape "
                f"{tuple(self.values.shape)}"
            )
        if self.lengths.dim() != 1:
            raise ValueError(
                f"sparse lengths must be 1-D (key-major, F*B entries), got shape {tuple(self.lengths.shape)}"
            )
        f = len(self.keys)
        n = self.lengths.numel()
        if n % f:
            raise ValueError(
                f"{n} sparse lengths are not a multiple of the {f} features {self.keys}: every feature needs "
                "one bag length per sample"
            )
        lengths = self.lengths.cpu().numpy().reshape(f, n // f)
        if lengths.size and int(lengths.min()) < 0:
            k, sample = (int(i[0]) for i in np.nonzero(lengths < 0))
            raise ValueError(
                f"feature {self.keys[k]!r}: negative bag length {int(lengths[k, sample])} for sample "
                f"{sample} (negative lengths in the batch: {int((lengths < 0).sum())})"
            )
        per_key = lengths.sum(1, dtype=np.int64)
        total = int(per_key.sum())
        if total != self.values.numel():
            raise ValueError(
                f"sparse lengths add up to {total} ids but values holds {self.values.numel()} "
                f"(ids per feature by the lengths: {dict(zip(self.keys, per_key.tolist()))})"
            )
        if self.weights is not None and (
            not isinstance(self.weights, Tensor) or self.weights.shape != self.values.shape
        ):
            shape = getattr(self.weights, "shape", None)
            raise ValueError(
                f"sparse weights must be a tensor of the values' shape {tuple(self.values.shape)}, got "
                f"{type(self.weights).__name__} of shape {None if shape is None else tuple(shape)}"
            )
        return per_key

    def slice_samples(self, start: int, stop: int) -> SparseFeatures:
        """The features of samples ``[start, stop)`` (every feature), keeping the layout.

        A training batch's cache lookup is sliced with them: micro-batches of the batch (several forward
        passes in one ``training_step``) read, and train, the same cache rows as the whole batch."""
        b, f = self.batch_size, len(self.keys)
        ln = self.lengths.view(f, b)
        off = self.offsets.view(-1)
        starts = off[:-1].view(f, b)[:, start] if stop > start else off[:-1].view(f, b)[:, 0]
        ends = starts + ln[:, start:stop].sum(1)
        idx = torch.cat([torch.arange(int(s), int(e)) for s, e in zip(starts, ends)])
        w = self.weights[idx] if self.weights is not None else None
        lookup = None
        if self.lookup is not None:  # the same slots (rows the slice does not use get no gradient)
            lookup = CacheLookup(self.lookup.slots, self.lookup.inverse[idx.to(self.lookup.inverse.device)])
        return SparseFeatures(
            list(self.keys), self.values[idx], ln[:, start:stop].reshape(-1).clone(), w, lookup
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseFeatures:
        return SparseFeatures(
            list(self.keys),
            self.values.to(device, non_blocking=non_blocking),
            self.lengths.to(device, non_blocking=non_blocking),
            None if self.weights is None else self.weights.to(device, non_blocking=non_blocking),
            None if self.lookup is None else self.lookup.to(device, non_blocking=non_blocking),
        )


_NO_ROWS = np.zeros(0, dtype=np.int64)


@dataclass
class StepPlan:
    """This rank's cache instructions for one training step (host-side numpy arrays).

    ``key`` identifies the step: ``(stream, step)``, where ``stream`` numbers the oracle's runs (epochs) in
    the process, increasing. Before the step the executor writes
    back ``evict`` rows (capacity evictions) and then loads ``fetch`` rows; after the step's optimizer
    update it writes back ``writeback`` rows, which stay in their slots as clean copies. ``next_evict``
    and ``next_fetch`` are the next step's pre-step instructions, so they can start while this step
    computes; ``ahead`` reaches further: rows of a later step fetched early into host memory (``early``).
    Each pair is ``(fused ids, slots)``. ``ids``/``slots`` are the distinct rows this rank's
    occurrences read (host copies of :class:`CacheLookup`). With several ranks (LRPP, see
    :mod:`lightning_bagpipe.oracle.partition`) ``sync`` lists the replicated rows whose gradients are
    summed across ranks and that every rank updates, ``own`` the rows this rank alone updates, and
    ``foreign`` the rows another rank alone updates (this rank's copy goes stale and it no longer writes
    them back); on one process every row of the step is ``own``. ``sync_blocks`` picks the collective that
    sums ``sync``'s gradients: ``None`` an all-reduce, else, per rank in rank order, the positions into
    ``sync`` of the rows that rank used (each rank sends only those; see ``RankView.sync_blocks``).
    """

    key: tuple[int, int]
    capacity: int
    fetch: tuple[np.ndarray, np.ndarray]
    evict: tuple[np.ndarray, np.ndarray]
    writeback: tuple[np.ndarray, np.ndarray]
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sync: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (_NO_ROWS, _NO_ROWS))
    own: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (_NO_ROWS, _NO_ROWS))
    foreign: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (_NO_ROWS, _NO_ROWS))
    sync_blocks: tuple[np.ndarray, ...] | None = None
    next_key: tuple[int, int] | None = None
    next_fetch: tuple[np.ndarray, np.ndarray] | None = None
    next_evict: tuple[np.ndarray, np.ndarray] | None = None
    next_ids: np.ndarray | None = None
    """Every distinct id of the next global step (all ranks): replicated rows outside it can finish their
    gradient sync one step late."""
    early: np.ndarray | None = None
    """Boolean mask over ``fetch``: the rows that may be fetched several steps before this step (no store
    write can change them in between); ``None``: none."""
    next_early: np.ndarray | None = None
    """The same mask over ``next_fetch``."""
    ahead: tuple[tuple[int, int], np.ndarray] | None = None
    """``(key, ids)`` of a later step (``prefetch_depth`` steps on) whose early rows are fetched into host
    memory by the job that prepares the next step, after its store write."""
    unique_ids: int = 0
    hits: int = 0
    clean_hits: int = 0
    tables_fingerprint: str = ""
    accumulate: int = 1
    """The loader's gradient accumulation (``accumulate_grad_batches``): with ``k > 1`` a step is ``k``
    consecutive batches of the epoch (``[g k, (g + 1) k)``, the last group possibly shorter), which all
    carry this plan; ``ids``/``slots`` are then this rank's rows over all of them."""
    digest: int = 0
    """A checksum of the step's global batches (their ids and bag lengths) on several ranks, which the
    strategy compares across ranks: every rank must read the same global stream (0 on one rank)."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StepPlan:
        return self  # host-side instructions stay on the host


@dataclass
class Batch:
    """One (rank-local) batch: dense features ``[B, D]``, sparse features, labels ``[B]`` and plan."""

    sparse: SparseFeatures
    dense: Tensor | None = None
    labels: Tensor | None = None
    plan: StepPlan | None = None

    @property
    def batch_size(self) -> int:
        return self.sparse.batch_size

    def slice_samples(self, start: int, stop: int) -> Batch:
        """Samples ``[start, stop)`` without the plan (the loader attaches this rank's own); a training
        batch's cache lookup is sliced with the features (:meth:`SparseFeatures.slice_samples`)."""
        return Batch(
            self.sparse.slice_samples(start, stop),
            None if self.dense is None else self.dense[start:stop],
            None if self.labels is None else self.labels[start:stop],
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.sparse.to(device, non_blocking=non_blocking),
            None if self.dense is None else self.dense.to(device, non_blocking=non_blocking),
            None if self.labels is None else self.labels.to(device, non_blocking=non_blocking),
            self.plan,
        )

    def __len__(self) -> int:
        return self.batch_size


def _as_long(x: Any, what: str, columns: Sequence[str] | None = None) -> Tensor:
    """``x`` as an int64 tensor; a ValueError naming ``what`` for values that are not integers or do not
    fit int64. ``columns`` names the features of a ``[B, F]`` matrix's columns, for the message."""
    t = torch.as_tensor(x)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        bad = t[(t != t.round())] if t.dtype.is_floating_point else t[:1]
        example = f" (e.g. {bad[0].item()!r})" if bad.numel() else ""
        raise ValueError(f"{what} must be integers, got dtype {t.dtype}{example}")
    if t.dtype == torch.uint64:  # (.long() wraps values from 2**63 on round to negative ones)
        a = t.cpu().numpy()
        big = a >= np.uint64(2**63)
        if big.any():
            at = np.unravel_index(int(np.flatnonzero(big)[0]), a.shape)
            where = f" of feature {columns[int(at[1])]!r}" if columns is not None and a.ndim == 2 else ""
            position = f"sample {at[0]}" if where else f"position {', '.join(str(int(i)) for i in at)}"
            raise ValueError(
                f"{what}{where} hold {int(a[at])} (uint64, at {position}; {int(big.sum())} such values), "
                "which does not fit int64 (at most 2**63 - 1): ids are rows of each feature's own table, "
                "e.g. a hash taken modulo the table size"
            )
    return t.long()
