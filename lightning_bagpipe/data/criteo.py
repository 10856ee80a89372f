"""CriteoDataModule: a ready-made :class:`BagpipeDataModule` for synthetic data, Criteo TSV or Parquet.

``source`` picks the data:

* ``"synthetic"``: :class:`~lightning_bagpipe.data.synthetic.SyntheticCriteo` (validation uses the
  ``"val"`` split, test and predict the ``"test"`` split: other samples of the same planted model);
* a ``.parquet`` file, or a folder holding ``.parquet`` files:
  :class:`~lightning_bagpipe.data.parquet.CriteoParquet`;
* any other file or folder: raw Criteo TSV through :class:`~lightning_bagpipe.data.criteo_tsv.CriteoTSV`,
  with ``hashing="modulo"`` (``table_sizes``) or ``hashing="vocab"`` (a :class:`Vocabulary` built from
  the training files with ``vocab_threshold``, or loaded from ``vocab_path``).

``val_path``, ``test_path`` and ``predict_path`` (file sources only; each a TSV or Parquet file or folder)
are read the same way and must map to the same tables (TSV files use the training hashing/vocabulary).
Prediction files may be unlabeled (39-field TSV, Parquet without ``label``): their format is detected
whatever ``labeled`` says. The sources are built once, in ``__init__``, because the tables must be known
before training starts; every epoch re-iterates them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl

from lightning_bagpipe.data.batch import Batch
from lightning_bagpipe.data.criteo_tsv import CriteoTSV, Hashing, ModuloHashing, Vocabulary
from lightning_bagpipe.data.datamodule import BagpipeDataModule
from lightning_bagpipe.data.loader import EvalLoader
from lightning_bagpipe.data.parquet import CriteoParquet
from lightning_bagpipe.data.synthetic import DEFAULT_ZIPF, SyntheticCriteo

Source = SyntheticCriteo | CriteoTSV | CriteoParquet


def detect_kind(path: str | os.PathLike[str]) -> Literal["parquet", "tsv"]:
    """``"parquet"`` for a ``.parquet`` file or a folder with ``.parquet`` files, else ``"tsv"``."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data source {str(p)!r} does not exist")
    if p.is_file():
        return "parquet" if p.name.endswith(".parquet") else "tsv"
    return "parquet" if any(c.name.endswith(".parquet") for c in p.iterdir() if c.is_file()) else "tsv"


class CriteoDataModule(BagpipeDataModule):
    """Train on synthetic Criteo-shaped data, Criteo TSV files or Parquet (see the module docstring).

    Args:
        source: ``"synthetic"`` or a path (kind detected by :func:`detect_kind`).
        val_path: validation data for file sources (``None``: no validation). Synthetic sources validate
            on ``val_batches`` batches of the ``"val"`` split (``0``: no validation).
        test_path, predict_path: data for ``trainer.test`` and ``trainer.predict`` (file sources; ``None``:
            none, and asking for it is an error that says so). Prediction files may be unlabeled. Synthetic
            sources test and predict on ``test_batches`` batches of the ``"test"`` split (the same batches
            for both; ``None``: as many as ``val_batches``; ``0``: none).
        batch_size, lookahead, cache_rows, queue_batches, sync, prefetch_depth: as in
            :class:`BagpipeDataModule`.
        scale, num_batches, val_batches, test_batches, zipf, multi_hot, seed: the synthetic generator's
            options.
        hashing, table_sizes, vocab_threshold, vocab_path: TSV hash-to-row mapping (modulo with
            ``table_sizes``, default Criteo Kaggle's; or a vocabulary built with ``vocab_threshold`` or
            loaded from ``vocab_path``).
        labeled, skip_bad_lines: TSV parsing options (``labeled`` does not apply to ``predict_path``,
            whose format is always detected).
        drop_last: drop each training pass's last partial batch (file sources; evaluation keeps every
            sample).
    """

    def __init__(
        self,
        source: str | os.PathLike[str] = "synthetic",
        *,
        val_path: str | os.PathLike[str] | None = None,
        test_path: str | os.PathLike[str] | None = None,
        predict_path: str | os.PathLike[str] | None = None,
        batch_size: int = 4096,
        lookahead: int = 64,
        cache_rows: int | None = None,
        queue_batches: int = 4,
        scale: float = 1.0,
        num_batches: int | None = 1000,
        val_batches: int = 10,
        test_batches: int | None = None,
        zipf: float | Sequence[float] = DEFAULT_ZIPF,
        multi_hot: int = 1,
        seed: int = 0,
        hashing: Literal["modulo", "vocab"] = "modulo",
        table_sizes: int | Sequence[int] | None = None,
        vocab_threshold: int = 1,
        vocab_path: str | os.PathLike[str] | None = None,
        labeled: bool | None = None,
        skip_bad_lines: bool = False,
        drop_last: bool = False,
        sync: Literal["partitioned", "replicated"] = "partitioned",
        prefetch_depth: int = 4,
    ) -> None:
        self.kind = "synthetic" if str(source) == "synthetic" else detect_kind(source)
        self._where = str(source)
        self._train: Source
        self._val: Source | None = None
        self._test: Source | None = None
        self._predict: Source | None = None
        if self.kind == "synthetic":
            for name, value in (
                ("val_path", val_path),
                ("test_path", test_path),
                ("predict_path", predict_path),
            ):
                if value is not None:
                    raise ValueError(
                        f"{name} is for file sources; synthetic data validates on its 'val' split and tests "
                        "and predicts on its 'test' split"
                    )

            def synthetic(num: int | None, split: str) -> SyntheticCriteo:
                return SyntheticCriteo(
                    batch_size, num, scale=scale, zipf=zipf, multi_hot=multi_hot, seed=seed, split=split
                )

            self._train = synthetic(num_batches, "train")
            if val_batches:
                self._val = synthetic(val_batches, "val")
            test_batches = val_batches if test_batches is None else test_batches
            if test_batches:
                self._test = self._predict = synthetic(test_batches, "test")
        else:
            if test_batches is not None:
                raise ValueError("test_batches is for synthetic data; file sources test on test_path")

            def files(
                path: str | os.PathLike[str], labeled: bool | None = labeled, drop_last: bool = False
            ) -> CriteoTSV | CriteoParquet:
                return self._file_source(
                    path,
                    batch_size,
                    hashing,
                    table_sizes,
                    vocab_threshold,
                    vocab_path,
                    labeled,
                    skip_bad_lines,
                    drop_last=drop_last,
                )

            self._train = files(source, drop_last=drop_last)
            tsv_evaluated = [p for p in (val_path, test_path, predict_path) if p and detect_kind(p) == "tsv"]
            if self.kind == "parquet" and tsv_evaluated and hashing == "vocab" and vocab_path is None:
                raise ValueError(
                    f"hashing='vocab' builds a vocabulary from the training TSV, but the training data is "
                    f"Parquet ({str(source)!r}) and {str(tsv_evaluated[0])!r} is TSV: give vocab_path "
                    "(--vocab-path), the vocabulary.npz that convert saved beside the Parquet files"
                )
            self._val = None if val_path is None else files(val_path)
            self._test = None if test_path is None else files(test_path)
            # Prediction files may lack labels whatever the training files have: always detect.
            self._predict = None if predict_path is None else files(predict_path, labeled=None)
            for what, path, data in (
                ("validation", val_path, self._val),
                ("test", test_path, self._test),
                ("prediction", predict_path, self._predict),
            ):
                if data is not None and data.tables != self._train.tables:
                    hint = (
                        " (a TSV file read with Parquet training data needs the hashing the Parquet files "
                        "were converted with: their vocabulary.npz as vocab_path / --vocab-path, or the same "
                        "table_sizes / --table-size)"
                        if self.kind == "parquet" and isinstance(data, CriteoTSV)
                        else ""
                    )
                    raise ValueError(
                        f"{what} data {str(path)!r} has {data.tables}, training data has "
                        f"{self._train.tables}; they must share tables{hint}"
                    )
        super().__init__(
            self._train.tables,
            batch_size=batch_size,
            lookahead=lookahead,
            cache_rows=cache_rows,
            queue_batches=queue_batches,
            sync=sync,
            prefetch_depth=prefetch_depth,
        )
        if self._val is None:
            # Show Lightning the stock (not overridden) hook, so a fit sees no validation loader instead of
            # warning that an empty one has length zero.
            self.val_dataloader = pl.LightningDataModule.val_dataloader.__get__(self)  # type: ignore[method-assign]

    def _file_source(
        self,
        path: str | os.PathLike[str],
        batch_size: int,
        hashing: str,
        table_sizes: int | Sequence[int] | None,
        vocab_threshold: int,
        vocab_path: str | os.PathLike[str] | None,
        labeled: bool | None,
        skip_bad_lines: bool,
        drop_last: bool,
    ) -> CriteoTSV | CriteoParquet:
        if detect_kind(path) == "parquet":
            return CriteoParquet(path, batch_size, drop_last=drop_last)
        return CriteoTSV(
            path,
            batch_size,
            hashing=self._hashing(
                path, hashing, table_sizes, vocab_threshold, vocab_path, labeled, skip_bad_lines
            ),
            labeled=labeled,
            skip_bad_lines=skip_bad_lines,
            drop_last=drop_last,
        )

    def _hashing(
        self,
        path: str | os.PathLike[str],
        mode: str,
        table_sizes: int | Sequence[int] | None,
        vocab_threshold: int,
        vocab_path: str | os.PathLike[str] | None,
        labeled: bool | None,
        skip_bad_lines: bool,
    ) -> Hashing:
        """The TSV hashing, built once and shared by the training and evaluation files."""
        existing: Hashing | None = getattr(self, "_tsv_hashing", None)
        if existing is not None:
            return existing
        hashing: Hashing
        if mode == "modulo":
            if vocab_path is not None:
                raise ValueError("vocab_path needs hashing='vocab'")
            hashing = ModuloHashing() if table_sizes is None else ModuloHashing(table_sizes)
        elif mode == "vocab":
            if table_sizes is not None:
                raise ValueError("table_sizes applies to hashing='modulo' only")
            if vocab_path is not None:
                hashing = Vocabulary.load(vocab_path)
            else:
                hashing = Vocabulary.build(
                    path, vocab_threshold, labeled=labeled, skip_bad_lines=skip_bad_lines
                )
        else:
            raise ValueError(f"hashing must be 'modulo' or 'vocab', got {mode!r}")
        self._tsv_hashing = hashing
        return hashing

    @property
    def train_data(self) -> Source:
        """The training source object (e.g. to read ``stats`` of a TSV pass)."""
        return self._train

    @property
    def val_data(self) -> Source | None:
        return self._val

    @property
    def test_data(self) -> Source | None:
        return self._test

    @property
    def predict_data(self) -> Source | None:
        return self._predict

    def train_source(self) -> Iterable[Batch]:
        return self._train

    def val_source(self) -> Iterable[Batch] | None:
        return self._val

    def test_source(self) -> Iterable[Batch] | None:
        return self._test

    def predict_source(self) -> Iterable[Batch] | None:
        return self._predict

    def val_dataloader(self) -> Any:
        self._check_last_batch(self._val, "validation", "val_path")
        return super().val_dataloader()

    def test_dataloader(self) -> EvalLoader:
        self._require(self._test, "trainer.test", "test_path")
        self._check_last_batch(self._test, "test", "test_path")
        return super().test_dataloader()

    def predict_dataloader(self) -> EvalLoader:
        self._require(self._predict, "trainer.predict", "predict_path")
        self._check_last_batch(self._predict, "prediction", "predict_path")
        return super().predict_dataloader()

    def _check_last_batch(self, data: Source | None, what: str, path_arg: str) -> None:
        """Refuse, before the pass, evaluation data whose last batch has fewer samples than there are
        processes (every process needs one sample of every batch), when the number of samples is known
        (Parquet, synthetic data; a TSV source is only checked as its batches come, by the loader).

        Evaluation keeps every sample (no ``drop_last``), so the way out is another batch size or fewer
        processes; the message suggests both.
        """
        world = self._rank()[1]
        if data is None or world == 1 or isinstance(data, CriteoTSV):
            return
        size = data.batch_size
        total = data.num_rows if isinstance(data, CriteoParquet) else len(data) * size
        last = total % size or size
        if total == 0 or last >= world:
            return
        if isinstance(data, SyntheticCriteo):
            where = f"the synthetic {what} data"
        else:
            where = f"{what} data {str(data.path)!r} ({path_arg})"
        if total < world:
            raise ValueError(
                f"{where} holds {total} sample(s), fewer than the {world} processes: every process needs "
                f"at least one sample of every batch; use at most {total} process(es)"
            )
        sizes = " or ".join(str(b) for b in _fitting_batch_sizes(total, size, world))
        raise ValueError(
            f"{where} has {total:,} samples: batch_size={size} leaves a last batch of {last} sample(s), "
            f"fewer than the {world} processes, and every process needs at least one sample of every "
            "batch. Evaluation keeps every sample (no drop_last): choose a batch size that leaves at least "
            f"{world} samples in the last batch"
            + (f" (e.g. {sizes})" if sizes else "")
            + f", or use at most {last} process(es)"
        )

    def _require(self, data: Source | None, use: str, path_arg: str) -> None:
        """Raise an error that says how to give the data ``use`` needs when there is none."""
        if data is not None:
            return
        if self.kind == "synthetic":
            fix = "test_batches > 0 (it defaults to val_batches) for batches of the 'test' split"
        else:
            fix = f"{path_arg}= (a TSV or Parquet file or folder)"
        raise ValueError(f"CriteoDataModule({self._where!r}) has no data for {use}: pass {fix}")


def _fitting_batch_sizes(total: int, size: int, world: int, reach: int = 10_000) -> list[int]:
    """The batch sizes nearest to ``size`` (at most one below it, one above, within ``reach``) that split
    ``total`` samples into batches of at least ``world`` samples each: a message's suggestion."""

    def fits(b: int) -> bool:
        return b >= world and (total % b == 0 or total % b >= world)

    below = next((b for b in range(size - 1, max(world, size - reach) - 1, -1) if fits(b)), None)
    above = next((b for b in range(size + 1, size + reach) if fits(b)), None)
    return [b for b in (below, above) if b is not None]


__all__ = ["CriteoDataModule", "detect_kind"]
