"""Synthetic Criteo-shaped click data with skewed ids and a planted model.

:class:`SyntheticCriteo` yields global :class:`~lightning_bagpipe.data.batch.Batch` objects shaped like
Criteo Kaggle: 13 dense features and 26 categorical features whose tables have Criteo Kaggle's
cardinalities (times ``scale``). It exists so that the cache, the oracle and the models can be exercised
and benchmarked without downloading 11 GB, on id streams as skewed as the real ones, with labels a model
can actually learn.

How a sample is drawn (all vectorized, per batch, from a generator seeded by ``(seed, split, batch)``):

* **Ids.** For each feature ``f`` with ``n_f`` rows, a popularity rank ``r`` in ``[0, n_f)`` follows a
  truncated power law: ``P(r)`` is the mass of the density ``x ** -zipf`` on ``[r + 1, r + 2)``, about
  ``(r + 1.5) ** -zipf`` (a Zipf law with a slightly flatter head; :class:`ZipfSampler`). The rank
  goes through a seeded affine permutation ``id = (a_f * r + b_f) mod n_f`` with ``gcd(a_f, n_f) = 1``,
  so the hot rows are spread over the table instead of being its low ids. With ``multi_hot = m > 1``
  every bag draws its length uniformly from ``[1, m]``; ids within a bag are independent draws (a bag
  may repeat an id).
* **Dense features.** ``I_j = log(1 + c)`` with ``c = floor(exp(N(mu_j, sigma_j)))``, and a per-feature
  share of missing values set to 0, mimicking Criteo's log-transformed counts.
* **Labels.** ``label ~ Bernoulli(sigmoid(logit))`` where ``logit`` = bias + the sum over features of a
  per-(feature, id) weight (mean over the bag) + a linear function of the dense features + an optional
  factorization-machine style pairwise term ``sum_{f<g} <v_f, v_g>`` with per-(feature, id) vectors.
  Weights and vectors come from a 64-bit hash of ``(seed, feature, id)``, so no table is ever
  materialised, and they are the same for every split. The bias is calibrated once so the click rate is
  close to ``ctr``. :meth:`SyntheticCriteo.with_truth` yields the true click probability next to each
  batch, and :meth:`SyntheticCriteo.true_auc` reports the AUC that the planted model itself reaches,
  the ceiling a trained model can approach.

With the default ``zipf = 1.0`` about 92% of accesses hit the 1% most-accessed rows of the fused id space
(measured over one Criteo-Kaggle-sized epoch at ``scale = 1.0``; see ``docs/data.md`` and
:func:`measure_skew`), matching BagPipe's observation that about 1% of rows take about 90% of accesses.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from lightning_bagpipe.data.batch import Batch, SparseFeatures
from lightning_bagpipe.data.criteo_shape import NUM_DENSE, scaled_cardinalities
from lightning_bagpipe.tables import Tables

DEFAULT_ZIPF = 1.0
"""Default Zipf exponent: top 1% of rows take about 92% of accesses (see the module docstring)."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TWO_POW_53 = float(2**53)
_FM_DIM = 4


def mix64(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The splitmix64 finalizer on a ``uint64`` array: a fast, well-mixed 64-bit hash (wraps mod 2**64).

    ``out`` may be ``x`` itself. Works in place with one scratch array: on batch-sized arrays, the page
    faults of fresh temporaries cost more than the arithmetic (measured: they doubled the batch time).
    """
    z = np.add(x, _GOLDEN, out=out)
    t = np.right_shift(z, np.uint64(30))
    z ^= t
    z *= _MIX1
    np.right_shift(z, np.uint64(27), out=t)
    z ^= t
    z *= _MIX2
    np.right_shift(z, np.uint64(31), out=t)
    z ^= t
    return z


def _unit(h: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """Map 64-bit hashes to floats uniform in ``[-1, 1)`` (``scratch``: a spare uint64 array like ``h``)."""
    top = np.right_shift(h, np.uint64(11), out=scratch)
    # Through int64 (the top 53 bits fit): numpy converts int64 to float much faster than uint64.
    x = np.multiply(top.view(np.int64), 2.0 / _TWO_POW_53)
    x -= 1.0
    return x


class ZipfSampler:
    """Truncated Zipf ranks for several tables at once, by inverting the CDF of a continuous density.

    For a table of ``n`` rows and exponent ``s``, rank ``r`` in ``[0, n)`` is ``floor(x) - 1`` where ``x``
    has density proportional to ``x ** -s`` on ``[1, n + 1)``: ``P(r) = F(r + 2) - F(r + 1)`` with
    ``F(x) = (x ** (1 - s) - 1) / ((n + 1) ** (1 - s) - 1)``, about ``(r + 1.5) ** -s`` normalised. The
    inverse CDF is ``x = exp(log1p(u * c) / a)`` with ``a = 1 - s`` and
    ``c = (n + 1) ** a - 1``; exponents within ``1e-6`` of 1 are evaluated at ``1 - 1e-6`` so one
    formula (no branch per element) serves every table. ``s = 0`` is uniform.
    """

    def __init__(self, sizes: np.ndarray, exponents: np.ndarray) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        a = 1.0 - np.asarray(exponents, dtype=np.float64)
        a = np.where(np.abs(a) < 1e-6, np.where(a < 0, -1e-6, 1e-6), a)
        self.inv_a = 1.0 / a
        self.c = np.expm1(a * np.log1p(self.sizes.astype(np.float64)))
        self.last = self.sizes - 1

    def ranks(self, u: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
        """Ranks for uniforms ``u`` (overwritten): ``u`` of shape ``[T, B]`` (row ``t`` for table ``t``)
        when ``counts`` is None, else a flat ``u`` holding ``counts[t]`` uniforms for each table ``t``."""
        if counts is None:
            c, inv_a, last = self.c[:, None], self.inv_a[:, None], self.last[:, None]
        else:
            c, inv_a, last = (np.repeat(p, counts) for p in (self.c, self.inv_a, self.last))
        x = np.multiply(u, c, out=u)  # in place (overwrites u): the generator's hottest lines
        np.log1p(x, out=x)
        x *= inv_a
        np.exp(x, out=x)
        r = x.astype(np.int64)
        r -= 1
        return np.minimum(r, last, out=r)


def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for 0/1 ``labels`` (Mann-Whitney U with tied scores sharing their mean rank)."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    pos = int(y.sum())
    neg = y.size - pos
    if pos == 0 or neg == 0:
        raise ValueError(f"AUC needs both classes; got {pos} positives and {neg} negatives")
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    # Average rank of each run of tied scores (ranks are 1-based).
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    run_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


@dataclass
class SkewReport:
    """Access skew of an id stream over a fused id space (see :func:`measure_skew`)."""

    accesses: int
    total_rows: int
    touched_rows: int
    top_fraction: float
    top_rows: int
    top_share: float
    """Share of all accesses that hit the ``top_rows`` most-accessed rows."""

    def __str__(self) -> str:
        return (
            f"{self.top_share:.1%} of {self.accesses} accesses hit the top {self.top_fraction:.2%} "
            f"({self.top_rows} of {self.total_rows}) rows; {self.touched_rows} rows touched at all"
        )


def measure_skew(
    id_batches: Iterable[np.ndarray], total_rows: int, top_fraction: float = 0.01, chunk_ids: int = 1 << 24
) -> SkewReport:
    """Count accesses per fused id and report the share taken by the ``top_fraction`` hottest rows.

    ``top_fraction`` is a fraction of *all* ``total_rows`` rows (touched or not), the way BagPipe states its
    "1% of embeddings" figure. Ids are buffered up to ``chunk_ids`` and counted with ``np.bincount``, so
    memory is one ``int64`` counter per row plus the buffer.
    """
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    counts = np.zeros(int(total_rows), dtype=np.int64)
    buf: list[np.ndarray] = []
    buffered = 0
    accesses = 0

    def flush() -> None:
        nonlocal buffered
        if buf:
            ids = np.concatenate(buf)
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= total_rows):
                bad = ids[(ids < 0) | (ids >= total_rows)][0]
                raise ValueError(f"fused id {int(bad)} is outside [0, {total_rows})")
            counts[:] += np.bincount(ids, minlength=int(total_rows))
            buf.clear()
            buffered = 0

    for ids in id_batches:
        arr = np.asarray(ids, dtype=np.int64).ravel()
        buf.append(arr)
        buffered += arr.size
        accesses += arr.size
        if buffered >= chunk_ids:
            flush()
    flush()
    top_rows = max(1, math.ceil(top_fraction * total_rows))
    top = np.partition(counts, counts.size - top_rows)[counts.size - top_rows :]
    share = float(top.sum()) / accesses if accesses else 0.0
    return SkewReport(accesses, int(total_rows), int((counts > 0).sum()), top_fraction, top_rows, share)


class SyntheticCriteo:
    """A deterministic stream of synthetic Criteo-shaped global batches (see the module docstring).

    Args:
        batch_size: samples per global batch.
        num_batches: batches per pass (``len(source)``); ``None`` streams without end.
        scale: multiplies Criteo Kaggle's 26 cardinalities (at least 2 rows per table).
        zipf: Zipf exponent of the id popularity, one value or one per feature; larger is more skewed.
        multi_hot: largest bag size; bag lengths are uniform in ``[1, multi_hot]`` (1 = one-hot).
        seed: fixes the planted model, the id permutations and (with ``split``) the sample stream.
        split: names the sample stream; ``"train"``, ``"val"``, ... give independent samples of the same
            distribution and the same planted model.
        ctr: target click rate; the planted model's bias is calibrated to reach it approximately.
        sparse_std, dense_std, pairwise_std: approximate standard deviations of the three logit terms;
            ``pairwise_std=0`` drops the pairwise term.
    """

    def __init__(
        self,
        batch_size: int = 4096,
        num_batches: int | None = 1000,
        *,
        scale: float = 1.0,
        zipf: float | Sequence[float] = DEFAULT_ZIPF,
        multi_hot: int = 1,
        seed: int = 0,
        split: str = "train",
        ctr: float = 0.25,
        sparse_std: float = 1.5,
        dense_std: float = 0.5,
        pairwise_std: float = 0.5,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_batches is not None and int(num_batches) < 0:
            raise ValueError(f"num_batches must be >= 0 or None, got {num_batches}")
        if int(multi_hot) < 1:
            raise ValueError(f"multi_hot must be >= 1, got {multi_hot}")
        if not 0.0 < ctr < 1.0:
            raise ValueError(f"ctr must be in (0, 1), got {ctr}")
        for name, v in (("sparse_std", sparse_std), ("dense_std", dense_std), ("pairwise_std", pairwise_std)):
            if v < 0 or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite value >= 0, got {v}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not isinstance(split, str) or not split:
            raise ValueError(f"split must be a non-empty string, got {split!r}")
        self.batch_size = int(batch_size)
        self.num_batches = None if num_batches is None else int(num_batches)
        self.scale = float(scale)
        self.multi_hot = int(multi_hot)
        self.seed = int(seed)
        self.split = split
        self.tables: Tables = Tables.from_sizes(scaled_cardinalities(scale))
        nf = len(self.tables)
        exps = np.asarray(zipf, dtype=np.float64)
        if exps.ndim == 0:
            exps = np.full(nf, float(exps))
        elif exps.shape != (nf,):
            raise ValueError(f"zipf must be one exponent or {nf} (one per feature), got shape {exps.shape}")
        if not np.all(np.isfinite(exps)) or np.any(exps < 0):
            bad = int(np.flatnonzero(~np.isfinite(exps) | (exps < 0))[0])
            raise ValueError(
                f"zipf exponent for feature {self.tables.names[bad]!r} must be >= 0, got {exps[bad]}"
            )
        self.zipf: np.ndarray = exps.copy()
        self._zipf = ZipfSampler(self.tables.sizes, self.zipf)
        self._split_key = zlib.crc32(split.encode())

        # The planted model and the permutations depend on the seed only (shared by all splits).
        rng = np.random.default_rng([self.seed, 0x5EED])
        sizes = self.tables.sizes
        self._perm_a, self._perm_b = _affine_permutations(rng, sizes)
        self._salt = rng.integers(0, 2**63 - 1, size=nf, dtype=np.int64).astype(np.uint64)
        strength = rng.exponential(1.0, size=nf)
        # Uniform[-1, 1) has variance 1/3: scale so the per-feature terms' variances add up to sparse_std**2.
        self._feat_scale = np.sqrt(3.0 * strength / strength.sum()) * sparse_std
        self._dense_mu = rng.uniform(0.0, 4.0, size=NUM_DENSE).astype(np.float32)
        self._dense_sigma = rng.uniform(0.5, 1.5, size=NUM_DENSE).astype(np.float32)
        self._dense_missing = rng.uniform(0.0, 0.4, size=NUM_DENSE).astype(np.float32)
        beta = rng.standard_normal(NUM_DENSE)
        # Dense features have std around 1 to 2; scale the linear part to roughly dense_std.
        self._beta = beta / np.linalg.norm(beta) * dense_std / 1.5
        pairs = nf * (nf - 1) / 2
        # sum_{f<g} <v_f, v_g> has variance pairs * k * var(v)^2, var(v) = scale^2 / 3.
        self._fm_scale = math.sqrt(3.0 * pairwise_std / math.sqrt(pairs * _FM_DIM)) if pairwise_std else 0.0
        self._bias = 0.0
        self._bias = self._calibrate_bias(ctr)

    # ------------------------------------------------------------------ stream
    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("this SyntheticCriteo stream is endless (num_batches=None)")
        return self.num_batches

    def _indices(self, num_batches: int | None = None) -> Iterator[int]:
        limit = self.num_batches if num_batches is None else int(num_batches)
        i = 0
        while limit is None or i < limit:
            yield i
            i += 1

    def __iter__(self) -> Iterator[Batch]:
        for i in self._indices():
            yield self.batch(i)

    def with_truth(self, num_batches: int | None = None) -> Iterator[tuple[Batch, np.ndarray]]:
        """Yield ``(batch, true click probability per sample)`` for the first ``num_batches`` batches."""
        for i in self._indices(num_batches):
            yield self._generate(i, with_labels=True)

    def id_batches(self, num_batches: int | None = None) -> Iterator[np.ndarray]:
        """Fast path: each batch's fused ids only (``int64``, key-major; ``batch.sparse.fused_ids``)."""
        for i in self._indices(num_batches):
            _, counts, ids = self._draw_ids(self._rng(i))
            if counts is None:
                ids.reshape(len(self.tables), -1)[:] += self.tables.offsets[:, None]
            else:
                ids += np.repeat(self.tables.offsets, counts)
            yield ids

    def batch(self, index: int) -> Batch:
        """Batch ``index`` of the stream (random access: each batch has its own seeded generator)."""
        return self._generate(index, with_labels=True)[0]

    def true_auc(self, num_batches: int = 20) -> float:
        """AUC of the planted model's true probabilities against the drawn labels over ``num_batches``."""
        labels, probs = [], []
        for batch, p in self.with_truth(num_batches):
            assert batch.labels is not None
            labels.append(batch.labels.numpy())
            probs.append(p)
        if not labels:
            raise ValueError("true_auc needs at least one batch")
        return binary_auc(np.concatenate(labels), np.concatenate(probs))

    # ------------------------------------------------------------------ generation
    def _rng(self, index: int) -> np.random.Generator:
        if index < 0:
            raise IndexError(f"batch index must be >= 0, got {index}")
        if self.num_batches is not None and index >= self.num_batches:
            raise IndexError(f"batch index {index} is outside this stream of {self.num_batches} batches")
        return np.random.default_rng([self.seed, self._split_key, int(index)])

    def _draw_ids(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Bag lengths (key-major, ``F*B``), the number of ids per feature (None when one-hot, where the
        layout is simply ``[F, B]``) and the table-local ids, flat and key-major."""
        nf, b = len(self.tables), self.batch_size
        if self.multi_hot == 1:
            lengths = np.ones(nf * b, dtype=np.int64)
            ids = self._zipf.ranks(rng.random((nf, b)))
            ids *= self._perm_a[:, None]
            ids += self._perm_b[:, None]
            np.remainder(ids, self.tables.sizes[:, None], out=ids)
            return lengths, None, ids.reshape(-1)
        lengths = rng.integers(1, self.multi_hot + 1, size=nf * b, dtype=np.int64)
        counts = lengths.reshape(nf, b).sum(1)
        ids = self._zipf.ranks(rng.random(int(counts.sum())), counts)
        ids *= np.repeat(self._perm_a, counts)
        ids += np.repeat(self._perm_b, counts)
        np.remainder(ids, np.repeat(self.tables.sizes, counts), out=ids)
        return lengths, counts, ids

    def _draw_dense(self, rng: np.random.Generator, b: int) -> np.ndarray:
        z = rng.standard_normal((b, NUM_DENSE), dtype=np.float32)
        counts = np.floor(np.exp(self._dense_mu + self._dense_sigma * z))
        counts[rng.random((b, NUM_DENSE), dtype=np.float32) < self._dense_missing] = 0.0
        return np.log1p(counts.astype(np.float64)).astype(np.float32)  # as the TSV reader computes it

    def _logit(
        self, lengths: np.ndarray, counts: np.ndarray | None, ids: np.ndarray, dense: np.ndarray
    ) -> np.ndarray:
        """The planted model's logit per sample (float64). Written with in-place operations on a few
        buffers, because fresh ``F * B`` temporaries (page faults) cost more than the arithmetic."""
        nf, b = len(self.tables), dense.shape[0]
        key = np.multiply(ids.view(np.uint64), _GOLDEN)
        if counts is None:  # one-hot: occurrences are laid out [F, B]
            key.reshape(nf, b)[:] += self._salt[:, None]
        else:
            key += np.repeat(self._salt, counts)
        bag = None if counts is None else np.repeat(np.arange(nf * b), lengths)

        def scale_and_pool(x: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
            """``x * scale`` (scale per feature) then the mean over each bag: ``[F, B]``."""
            per_feature = np.ndim(scale) != 0
            if bag is None or counts is None:
                x2 = x.reshape(nf, b)
                x2 *= np.asarray(scale)[:, None] if per_feature else scale
                return x2
            x *= np.repeat(np.asarray(scale), counts) if per_feature else scale
            return (np.bincount(bag, weights=x, minlength=nf * b) / lengths).reshape(nf, b)

        h = mix64(key, out=key)
        scratch = np.empty_like(h)
        w = scale_and_pool(_unit(h, scratch), self._feat_scale)
        logit = self._bias + w.sum(0) + (dense.astype(np.float64) - 1.5) @ self._beta
        if self._fm_scale:
            # Four 16-bit latent coordinates per (feature, id) from one more hash of the key.
            g = mix64(h, out=h)
            buf = np.empty(g.size, dtype=np.float64)
            pair = np.zeros(b)
            for k in range(_FM_DIM):  # one vectorized pass per latent dimension
                bits = np.right_shift(g, np.uint64(16 * k), out=scratch)
                bits &= np.uint64(0xFFFF)
                v = np.multiply(bits.view(np.int64), 2.0 / 65536.0, out=buf)
                v -= 1.0
                pooled = scale_and_pool(v, self._fm_scale)
                total = pooled.sum(0)
                np.square(pooled, out=pooled)
                pair += 0.5 * (total * total - pooled.sum(0))  # = sum_{f<g} v_f * v_g
            logit += pair
        return logit

    def _generate(self, index: int, with_labels: bool) -> tuple[Batch, np.ndarray]:
        rng = self._rng(index)
        lengths, counts, ids = self._draw_ids(rng)
        dense = self._draw_dense(rng, self.batch_size)
        prob = 1.0 / (1.0 + np.exp(-self._logit(lengths, counts, ids, dense)))
        labels = (rng.random(self.batch_size) < prob).astype(np.float32)
        sparse = SparseFeatures(self.tables.names, torch.from_numpy(ids), torch.from_numpy(lengths))
        batch = Batch(sparse=sparse, dense=torch.from_numpy(dense), labels=torch.from_numpy(labels))
        return batch, prob

    def _calibrate_bias(self, ctr: float) -> float:
        """Bias that makes the mean click probability of a fixed calibration batch equal ``ctr``."""
        rng = np.random.default_rng([self.seed, 0xB1A5])
        lengths, counts, ids = self._draw_ids(rng)
        base = self._logit(lengths, counts, ids, self._draw_dense(rng, self.batch_size))
        lo, hi = -30.0, 30.0
        for _ in range(60):  # bisection on a monotone function of the bias
            mid = 0.5 * (lo + hi)
            if float(np.mean(1.0 / (1.0 + np.exp(-(base + mid))))) < ctr:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def __repr__(self) -> str:
        return (
            f"SyntheticCriteo(batch_size={self.batch_size}, num_batches={self.num_batches}, "
            f"scale={self.scale}, multi_hot={self.multi_hot}, seed={self.seed}, split={self.split!r}, "
            f"{self.tables})"
        )


def write_criteo_tsv(batches: Iterable[Batch], path: str | os.PathLike[str], compress: bool = False) -> int:
    """Write one-hot batches as raw Criteo TSV lines; returns the number of lines.

    Fields: the label (``0``/``1``; omitted when batches have none, giving the 39-field test format), the
    dense features as integer counts ``round(exp(x) - 1)`` (the inverse of the reader's transform for
    non-negative counts), and every categorical as its table row written as 8 (or more) hex digits. Read
    back with ``ModuloHashing(sizes + 1)``, row ``r`` becomes ``r + 1`` (row 0 is the reader's missing
    row). It exists to exercise and benchmark the TSV path (``convert``, :class:`CriteoTSV`) on data as
    skewed as the synthetic stream. Formatting is vectorized (numpy nibbles, Arrow string joins).
    """
    opener = gzip.open if compress else open
    lines = 0
    with opener(path, "wb") as f:
        for batch in batches:
            if not batch.sparse.is_one_hot():
                raise ValueError("Criteo TSV is one-hot; this batch has multi-hot bags")
            b = batch.batch_size
            cols: list[pa.Array] = []
            if batch.labels is not None:
                cols.append(pc.cast(pa.array(batch.labels.numpy().astype(np.int64)), pa.string()))
            if batch.dense is not None:
                counts = np.rint(np.expm1(batch.dense.numpy().astype(np.float64))).astype(np.int64)
                cols += [pc.cast(pa.array(counts[:, j]), pa.string()) for j in range(counts.shape[1])]
            rows = batch.sparse.values.numpy().reshape(-1, b)
            digits = max(8, (int(rows.max()).bit_length() + 3) // 4) if rows.size else 8
            shifts = np.arange(4 * (digits - 1), -1, -4, dtype=np.int64)
            for r in rows:
                text = _HEX_DIGITS[(r[:, None] >> shifts) & 15].view(f"S{digits}").ravel()
                cols.append(pa.array(text, pa.binary()).cast(pa.string()))
            joined = pc.binary_join_element_wise(*cols, "\t")
            start = joined.offset
            offsets = np.frombuffer(joined.buffers()[1], dtype=np.int32)[start : start + b + 1]
            data = np.frombuffer(joined.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
            # Lay the lines out with a newline after each: line i moves right by i bytes.
            out = np.empty(data.size + b, dtype=np.uint8)
            out[np.arange(data.size) + np.repeat(np.arange(b), np.diff(offsets))] = data
            out[offsets[1:] - offsets[0] + np.arange(b)] = ord("\n")
            f.write(out.tobytes())
            lines += b
    return lines


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _affine_permutations(rng: np.random.Generator, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per table, ``(a, b)`` with ``gcd(a, n) = 1`` so ``r -> (a * r + b) mod n`` permutes ``[0, n)``.

    ``a < 2**62 / n`` keeps ``a * r`` inside ``int64``.
    """
    a_out = np.empty(sizes.size, dtype=np.int64)
    b_out = np.empty(sizes.size, dtype=np.int64)
    for f, n in enumerate(int(x) for x in sizes):
        high = max(2, min(n, (1 << 62) // max(n, 1)))
        a = int(rng.integers(1, high)) if high > 1 else 1
        while math.gcd(a, n) != 1:
            a = a % (high - 1) + 1
        a_out[f] = a
        b_out[f] = int(rng.integers(0, n))
    return a_out, b_out
