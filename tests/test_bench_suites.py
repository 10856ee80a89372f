"""Smoke tests of the benchmark suites (train, cache, scale) and the ``trace`` tool, on tiny inputs.

Benchmarks are never pass/fail on speed: these check that every suite runs its contenders, writes valid
JSON with the documented keys, and that the figures obey what must hold whatever the speed (bagpipe's
losses equal the ideal contender's, no policy fetches fewer rows than the stream reads, the skew and the
recommendation match plain reference computations written here).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_bagpipe.bench import breakdown as breakdown_module
from lightning_bagpipe.bench import scale as scale_suite
from lightning_bagpipe.bench import train as train_suite
from lightning_bagpipe.bench.breakdown import StepBreakdown
from lightning_bagpipe.bench.common import interleaved, median_figures
from lightning_bagpipe.cli import main
from lightning_bagpipe.data.criteo_tsv import BadLinesWarning
from lightning_bagpipe.data.parquet import write_parquet
from lightning_bagpipe.data.synthetic import SyntheticCriteo, write_criteo_tsv
from lightning_bagpipe.embedding.cached import CachedEmbedding
from lightning_bagpipe.embedding.init import initial_rows_at
from lightning_bagpipe.optim.sparse import RowWiseAdagrad
from lightning_bagpipe.trace import Bounds, parse_capacities
from tests.helpers import has_matplotlib


def _bench(tmp_path: Path, suite: str, *flags: str) -> dict[str, Any]:
    out = tmp_path / f"{suite}.json"
    assert main(["bench", suite, *flags, "--json", str(out)]) == 0
    result: dict[str, Any] = json.loads(out.read_text())
    return result


# ---------------------------------------------------------------------- helpers
def test_interleaved_rotates_the_order_each_repeat() -> None:
    order = list(interleaved(["a", "b", "c"], 3))
    assert [n for r, n in order if r == 0] == ["a", "b", "c"]
    assert [n for r, n in order if r == 1] == ["b", "c", "a"]
    assert [n for r, n in order if r == 2] == ["c", "a", "b"]
    with pytest.raises(ValueError, match="repeats"):
        list(interleaved(["a"], 0))


def test_median_figures_takes_medians_and_keeps_the_spread() -> None:
    runs = [{"samples_per_second": v, "name": "x", "ok": True} for v in (3.0, 1.0, 2.0)]
    m = median_figures(runs)
    assert m["samples_per_second"] == 2.0
    assert (m["samples_per_second_min"], m["samples_per_second_max"], m["runs"]) == (1.0, 3.0, 3)
    assert m["name"] == "x" and m["ok"] is True


# ---------------------------------------------------------------------- train
TRAIN_FLAGS = ("--steps", "4", "--warmup", "2", "--repeats", "1", "--batch-size", "256", "--scale", "0.002",
               "--lookahead", "4", "--cache-rows", "8000", "--hidden", "16")  # fmt: skip


def test_bench_train_runs_every_contender(tmp_path: Path) -> None:
    r = _bench(tmp_path, "train", *TRAIN_FLAGS)
    assert r["suite"] == "train"
    assert set(r["contenders"]) == set(train_suite.CONTENDERS)
    ran = [n for n, f in r["contenders"].items() if "skipped" not in f]
    assert {"bagpipe", "ideal", "plain", "floor"} <= set(ran)
    for name in ran:
        f = r["contenders"][name]
        assert f["samples_per_second"] > 0 and f["timed_steps"] == 4, name
        assert len(r["losses_per_step"][name]) == 6, name
    # same start, same data, same math: bagpipe's per-step losses are the ideal contender's, exactly
    assert r["checks"]["max_abs_loss_diff_vs_ideal"] == 0.0
    assert r["checks"]["bagpipe"] and r["checks"]["ideal"]
    assert {f"bagpipe_over_{n}" for n in ran if n != "bagpipe"} == set(r["ratios"])
    bd = r["bagpipe_breakdown_ms"]
    assert bd["step_ms"] > 0 and bd["forward_ms"] > 0 and bd["backward_ms"] > 0
    assert r["oracle"]["fraction_of_bagpipe_step"] > 0
    assert r["config"]["batches_generated"] == 6 + 4 + 4  # trained + lookahead + loader queue


def test_bench_train_skips_torchrec_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_suite, "torchrec_unavailable", lambda: "torchrec is not installed here")
    r = _bench(tmp_path, "train", *TRAIN_FLAGS, "--contenders", "torchrec,floor")
    assert r["contenders"]["torchrec"] == {"skipped": "torchrec is not installed here"}
    assert r["contenders"]["floor"]["samples_per_second"] > 0
    assert r["ratios"] == {}  # no bagpipe run, nothing to compare


def test_breakdown_times_every_way_rows_reach_the_cache_once(monkeypatch: pytest.MonkeyPatch) -> None:
    emb = CachedEmbedding([("a", 10), ("b", 5)], 4, RowWiseAdagrad(lr=0.1))
    emb._activate(8)
    breakdown = StepBreakdown(0, {})
    breakdown.wrap(emb)
    clock = iter(range(100))  # every perf_counter() call is one second later than the last
    monkeypatch.setattr(breakdown_module.time, "perf_counter", lambda: float(next(clock)))
    ids, slots = np.array([1, 12]), np.array([0, 3])
    emb._read_rows(ids)  # early fetch into host memory
    assert breakdown.busy["fetch"] == 1.0
    emb._put_rows(slots, emb.store.read(ids))  # its rows into the cache
    assert breakdown.busy["fetch"] == 2.0
    emb._load_rows(ids, slots)  # a direct fetch: its inner _put_rows is not counted again
    assert breakdown.busy["fetch"] == 3.0
    emb._store_rows(ids, slots)
    assert breakdown.busy["writeback"] == 1.0
    assert torch.equal(emb._cache[torch.from_numpy(slots)], emb.store.read(ids))


def test_breakdown_separates_the_cache_sync_from_its_update(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    # perf_counter() readings in call order: batch start, sync start, update start and end, sync end, end
    clock = iter([1.0, 10.0, 12.0, 13.0, 14.0, 15.0])
    monkeypatch.setattr(breakdown_module.time, "perf_counter", lambda: next(clock))
    marks: dict[str, float] = {}
    bd = StepBreakdown(0, marks)
    update = bd._timed(lambda: None, "sparse_update")
    sync = bd._timed(update, "cache_sync")  # the driver's _sync_update: a collective, then the update
    trainer = SimpleNamespace(global_step=1, strategy=None)
    bd._prev_end = 0.0
    bd.on_train_batch_start(trainer, None, None, 0)
    marks.update(fwd0=2.0, fwd1=3.0, bwd0=4.0, bwd1=5.0, opt0=6.0)  # the dense optimizer: 6 to 10
    sync()
    bd.on_train_batch_end(trainer, None, None, None, 0)
    row = bd.rows[-1]
    assert row["dense_optimizer"] == 10.0 - 6.0
    assert row["sparse_update"] == 13.0 - 12.0 and row["cache_sync"] == (14.0 - 10.0) - 1.0
    assert row["other"] == (15.0 - 14.0) + (6.0 - 5.0)
    assert row["step"] == 15.0


def test_floor_computes_the_embeddings_gradient_unless_told_not_to() -> None:
    from lightning_bagpipe.data.batch import SparseFeatures

    fixed = torch.randn(3, 2, 4)
    features = SparseFeatures.from_dense(["a", "b"], torch.zeros(3, 2, dtype=torch.long))
    floor = train_suite.FixedEmbedding(fixed)
    out = floor(features)
    (out * out).sum().backward()
    assert out.grad is not None and torch.equal(out.grad, 2 * fixed)  # d(sum x^2)/dx, computed each step
    assert floor.fixed.grad is None  # never applied to the tensor itself
    assert not train_suite.FixedEmbedding(fixed, input_grad=False)(features).requires_grad


def test_bench_train_runs_the_floor_without_input_gradient_on_request(tmp_path: Path) -> None:
    r = _bench(tmp_path, "train", *TRAIN_FLAGS, "--contenders", "bagpipe,floor_no_input_grad")
    assert r["contenders"]["floor_no_input_grad"]["samples_per_second"] > 0
    assert set(r["ratios"]) == {"bagpipe_over_floor_no_input_grad"}
    assert r["goals"] == {}  # the goal is stated against the floor with the gradient


def test_bench_train_prededuped_ideal_uses_its_precomputed_layout_and_trains_as_ideal(tmp_path: Path) -> None:
    r = _bench(tmp_path, "train", *TRAIN_FLAGS, "--contenders", "ideal,ideal_prededuped")
    pre = r["contenders"]["ideal_prededuped"]
    assert pre["steps_prededuped"] == 6  # every trained step (2 warm-up + 4 timed) skipped its own dedup
    # the same math on the same batches: the same loss at every step
    assert r["losses_per_step"]["ideal_prededuped"] == r["losses_per_step"]["ideal"]
    assert r["goals"] == {}  # reported, not judged


def test_bench_train_rejects_unknown_contenders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "train", "--contenders", "bagpipe,nope"]) == 2
    assert "nope" in capsys.readouterr().err


# ---------------------------------------------------------------------- cache
def test_bench_cache_sweeps_every_policy(tmp_path: Path) -> None:
    plot = tmp_path / "cache.png"
    flags = ["--batches", "12", "--batch-size", "128", "--scale", "0.001", "--lookahead", "1,4"]
    flags += ["--capacity", "auto"] + (["--plot", str(plot)] if has_matplotlib() else [])
    r = _bench(tmp_path, "cache", *flags)
    assert set(r["contenders"]) == {"oracle_L1", "oracle_L4", "lru", "lfu", "belady"}
    distinct = r["stream"]["distinct_rows"]
    caps = r["capacities"]
    assert caps[0] == r["stream"]["min_feasible_capacity"] and caps[-1] == distinct
    for name, fetched in r["contenders"].items():
        assert len(fetched) == len(caps)
        assert all(v is None or v >= distinct for v in fetched), name  # every row read is fetched once
        assert fetched[-1] == distinct, name  # a cache holding every row fetches each exactly once
    assert len(r["ratios"]) == len(caps)
    if has_matplotlib():
        assert plot.stat().st_size > 0


# ---------------------------------------------------------------------- scale (workers run in-process)
def test_bench_scale_runs_its_contenders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    roles = {
        "init": scale_suite._worker_init,
        "train": scale_suite._worker_train,
        "oracle": scale_suite._worker_oracle,
    }

    def in_process(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
        return json.loads(json.dumps(roles[cfg["role"]](cfg)))

    monkeypatch.setattr(scale_suite, "_launch", in_process)
    flags = ["--rows", "6000", "--small-rows", "3000", "--steps", "3", "--warmup", "2", "--repeats", "2",
             "--batch-size", "64", "--cache-rows", "3000", "--lookahead", "2"]  # fmt: skip
    flags += ["--dir", str(tmp_path / "st"), "--buffer-mib", "1"]
    plot = tmp_path / "scale.png"
    plotting = ["--plot", str(plot)] if has_matplotlib() else []
    r = _bench(tmp_path, "scale", *flags, *plotting)
    if has_matplotlib():
        assert plot.stat().st_size > 0 and r["plot"] == str(plot)
    contenders = ("tiered_big", "mmap_big", "memory_touched", "tiered_small", "mmap_small", "memory_small")
    assert set(r["contenders"]) == {*contenders, "oracle_big"}
    for name in contenders:
        f = r["contenders"][name]
        assert f["samples_per_second"] > 0 and f["vm_hwm_bytes"] > 0, name
    big = r["contenders"]["mmap_big"]
    assert 0 < big["init"]["rows_initialized"] < big["total_rows"]
    assert big["disk"]["apparent_bytes"] == big["total_rows"] * (16 + 2) * 4
    # the same initial rows in every store: the same training, step for step
    assert r["checks"]["max_abs_loss_diff_mmap_small_vs_memory_small"] == 0.0
    assert r["checks"]["max_abs_loss_diff_tiered_big_vs_mmap_big"] == 0.0
    # the big run's touched rows renumbered into RAM: the same plans, so the same training
    assert r["checks"]["max_abs_loss_diff_tiered_big_vs_memory_touched"] == 0.0
    touched = r["contenders"]["memory_touched"]
    assert 0 < touched["total_rows"] < big["total_rows"]
    assert r["checks"]["max_abs_loss_diff_tiered_small_vs_memory_small"] == 0.0
    # every repeat starts from the initial rows (a reused file would start from the trained ones)
    assert r["checks"]["max_abs_loss_diff_between_repeats"] == 0.0
    assert r["contenders"]["tiered_big"]["spills"] >= 1  # at least the flush at the end of fit
    # an end-of-fit checkpoint: a tiered store's holds the rows training wrote, fewer than the table
    tb, mem = r["contenders"]["tiered_big"], r["contenders"]["memory_small"]
    assert 0 < tb["checkpoint_table_rows"] < tb["total_rows"] and tb["checkpoint_bytes"] > 0
    assert mem["checkpoint_table_rows"] == mem["total_rows"]
    assert mem["checkpoint_bytes"] > mem["total_rows"] * (16 + 2) * 4  # the whole table, and the rest
    assert "checkpoint_bytes" not in r["contenders"]["mmap_big"]
    assert set(r["ratios"]) == {
        "tiered_big_over_memory_small",
        "mmap_big_over_memory_small",
        "memory_touched_over_memory_small",
        "tiered_small_over_memory_small",
        "mmap_small_over_memory_small",
        "tiered_big_over_memory_touched",
    }
    assert set(r["goals"]) == {
        "tiered_big_peak_rss_under_2GiB",
        "tiered_big_at_least_0.8x_memory_small",
        "tiered_big_at_least_0.8x_memory_touched",
    }
    for name in ("big.f32", "tiered.f32", "tiered.f32.written"):  # files removed unless --keep-files
        assert not (tmp_path / "st" / name).exists()
    r = _bench(tmp_path, "scale", *flags, "--contenders", "tiered_big", "--no-checkpoint", "--no-oracle")
    assert set(r["contenders"]) == {"tiered_big", "memory_small"}
    assert all("checkpoint_bytes" not in f for f in r["contenders"].values())


def test_bench_scale_contenders_flag_keeps_the_baseline_and_names_unknown_ones() -> None:
    import argparse

    p = argparse.ArgumentParser()
    scale_suite.add_arguments(p)
    assert scale_suite._names(p.parse_args(["--contenders", "tiered_big"])) == ["tiered_big", "memory_small"]
    assert scale_suite._names(p.parse_args([])) == list(scale_suite.CONTENDERS)
    with pytest.raises(ValueError, match=r"unknown contender.*mmap_huge"):
        scale_suite._check(p.parse_args(["--contenders", "tiered_big,mmap_huge"]))


def test_lazy_initialize_file_writes_only_the_given_rows_with_the_librarys_values(tmp_path: Path) -> None:
    src = SyntheticCriteo(8, 1, scale=0.0005)
    tables, dim, opt = src.tables, 5, RowWiseAdagrad(lr=0.1)
    ids = np.array([0, 3, int(tables.offsets[2]) + 1, tables.total_rows - 1])
    path = tmp_path / "lazy.f32"
    assert scale_suite.lazy_initialize_file(path, tables, dim, opt, 1, np.r_[ids, ids]) == 4
    in_ram = CachedEmbedding(tables, dim, opt, seed=1)  # every row, as the library initialises them
    opened = CachedEmbedding(tables, dim, opt, store=path, seed=1)  # opened as initialised: not refilled
    rows = opened.store.tensor()
    assert torch.equal(rows[ids], in_ram.store.tensor()[ids])
    others = np.setdiff1d(np.arange(tables.total_rows), ids)
    assert torch.all(rows[others] == 0)


# ---------------------------------------------------------------------- trace
def _tiny_batches() -> tuple[SyntheticCriteo, list[Any]]:
    src = SyntheticCriteo(64, 6, scale=0.0005, seed=3)
    return src, list(src)


def test_trace_on_parquet_matches_reference_skew_and_recommendation(tmp_path: Path) -> None:
    src, batches = _tiny_batches()
    write_parquet(batches, tmp_path / "pq", src.tables)
    out = tmp_path / "trace.json"
    args = ["trace", str(tmp_path / "pq"), "--batch-size", "64", "--batches", "0", "--lookahead", "1,2,8"]
    assert main([*args, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["batches"] == 6 and r["occurrences"] == 6 * 64 * 26

    # skew, recomputed plainly: per feature, count each row's accesses and sum the hottest ceil(x * rows)
    for f, spec in enumerate(src.tables):
        ids = np.concatenate([b.sparse.values.numpy().reshape(26, 64)[f] for b in batches])
        counts = np.sort(np.bincount(ids, minlength=spec.num_embeddings))[::-1]
        got = r["skew"]["per_feature"][spec.name]
        assert got["accesses"] == ids.size and got["rows_touched"] == int((counts > 0).sum())
        for frac, key in ((0.01, "top1pct_share"), (0.10, "top10pct_share")):
            k = max(1, math.ceil(frac * spec.num_embeddings))
            assert got[key] == pytest.approx(counts[:k].sum() / ids.size, abs=1e-12)

    # recommendation: smallest capacity whose best-L oracle fetches are within 5% of the sweep's fewest
    sw = r["sweep"]
    best = []
    for i in range(len(sw["capacities"])):
        vals = [sw["fetched"][f"oracle_L{lk}"][i] for lk in (1, 2, 8)]
        vals = [v for v in vals if v is not None]
        best.append(min(vals) if vals else None)
    fewest = min(b for b in best if b is not None)
    want = next(sw["capacities"][i] for i, b in enumerate(best) if b is not None and b <= 1.05 * fewest)
    assert r["recommendation"]["capacity_rows"] == want
    assert r["recommendation"]["oracle_fetched"] == best[sw["capacities"].index(want)]


def test_trace_reads_criteo_tsv_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, batches = _tiny_batches()
    write_criteo_tsv(batches, tmp_path / "day.tsv")
    flags = ["--batch-size", "100", "--batches", "0", "--table-size", "500", "--lookahead", "4"]
    plot = tmp_path / "trace.png"
    if has_matplotlib():
        flags += ["--plot", str(plot)]
    assert main(["trace", str(tmp_path / "day.tsv"), *flags]) == 0
    text = capsys.readouterr().out
    assert "access skew" in text and "recommendation: cache_rows=" in text
    if has_matplotlib():
        assert plot.stat().st_size > 0


def test_trace_bad_input_names_the_culprit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", str(tmp_path / "no_such_dir")]) == 2
    assert "no_such_dir" in capsys.readouterr().err
    bounds = Bounds(distinct_rows=100, min_capacity=10, min_capacity_one_step=5)
    with pytest.raises(ValueError, match="'abc'"):
        parse_capacities("0.5,abc", bounds)
    with pytest.raises(ValueError, match=r"'1\.5'"):
        parse_capacities("1.5", bounds)
    assert parse_capacities("0.5,7,7", bounds) == [7, 50]
    assert parse_capacities("auto", bounds)[0] == 10 and parse_capacities("auto", bounds)[-1] == 80
    assert main(["trace", "synthetic", "--lookahead", "4,0"]) == 2
    assert "error: --lookahead" in capsys.readouterr().err


def test_trace_reports_the_lines_skipped_before_it_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --batches 2 stops the pass early: the malformed lines skipped so far are still reported, in a
    # BadLinesWarning and in the report (the reader parses whole blocks, here the whole small file).
    _, batches = _tiny_batches()
    path = tmp_path / "day.tsv"
    write_criteo_tsv(batches, path)
    lines = path.read_text().splitlines()
    for i in (3, 70, 300):
        lines[i] = lines[i].replace("\t", ",", 3)
    path.write_text("\n".join(lines) + "\n")
    flags = [
        "--batch-size",
        "64",
        "--batches",
        "2",
        "--table-size",
        "500",
        "--lookahead",
        "2",
        "--no-baselines",
    ]
    out = tmp_path / "t.json"
    with pytest.warns(BadLinesWarning, match=rf"skipped 3 malformed line\(s\) of {len(lines)} read"):
        assert main(["trace", str(path), *flags, "--skip-bad-lines", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["batches"] == 2 and r["skipped_lines"] == 3 and r["lines_read"] == len(lines)
    assert f"skipped 3 malformed line(s) of the {len(lines)} read" in capsys.readouterr().out


@pytest.mark.parametrize(("batch", "count"), [(50, 1), (89, 2)])
def test_trace_header_gives_the_samples_read(
    batch: int, count: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 50 samples (less than one batch of 64), or 178 (a last batch of 50): not "N batches of 64 samples"
    src = SyntheticCriteo(batch, count, scale=0.0005, seed=3)
    write_parquet(src, tmp_path / "pq", src.tables)
    out = tmp_path / "t.json"
    args = ["trace", str(tmp_path / "pq"), "--batch-size", "64", "--batches", "0", "--lookahead", "1"]
    assert main([*args, "--no-baselines", "--json", str(out)]) == 0
    samples, n = batch * count, math.ceil(batch * count / 64)
    r = json.loads(out.read_text())
    assert r["samples"] == samples and r["batches"] == n
    head = capsys.readouterr().out.splitlines()[0]
    assert f": {samples:,} samples in {n} batch{'es' if n > 1 else ''} of at most 64," in head, head


def test_trace_sizes_the_cache_for_accumulated_steps(tmp_path: Path) -> None:
    # --accumulate-grad-batches 2: the oracle plans two batches as one step, so the smallest cache that
    # runs it holds two consecutive *pairs* of batches' rows (the sweep's 'auto' capacities start there)
    src, batches = _tiny_batches()
    write_parquet(batches, tmp_path / "pq", src.tables)
    fused = [set(b.sparse.fused_ids(src.tables).tolist()) for b in batches]
    for k in (1, 2):
        out = tmp_path / f"trace{k}.json"
        args = ["trace", str(tmp_path / "pq"), "--batch-size", "64", "--batches", "0", "--lookahead", "2"]
        assert main([*args, "--accumulate-grad-batches", str(k), "--json", str(out)]) == 0
        r = json.loads(out.read_text())
        steps = [set().union(*fused[i : i + k]) for i in range(0, len(fused), k)]
        smallest = max([len(steps[0])] + [len(a | b) for a, b in itertools.pairwise(steps)])
        assert r["batches"] == 6 and r["accumulate_grad_batches"] == k
        assert r["sweep"]["capacities"][0] == smallest


def test_renumbered_stream_keeps_each_tables_rows_in_order_and_their_initial_values() -> None:
    src = SyntheticCriteo(16, 3, scale=0.0005, seed=2)
    ren = scale_suite.Renumbered(src)
    tables, dim, opt = src.tables, 4, RowWiseAdagrad(lr=0.1)
    # plain reference: each table's distinct rows of the stream, ascending, numbered 0, 1, ...
    batches = [b.sparse.values.numpy().reshape(len(tables), -1) for b in src]
    for f in range(len(tables)):
        rows = np.unique(np.concatenate([b[f] for b in batches]))
        assert ren.tables[f].num_embeddings == rows.size
        for b, new in zip(batches, ren.values):
            assert np.array_equal(new.reshape(len(tables), -1)[f], np.searchsorted(rows, b[f]))
    store = ren.initial_store(dim, opt, seed=7)
    fused = np.unique(np.concatenate([b.sparse.fused_ids(tables) for b in src]))
    expected = initial_rows_at(tables, dim, 7, fused)
    assert torch.equal(store.read(torch.from_numpy(ren.new_ids))[:, :dim], expected)
    assert torch.equal(
        store.read(torch.from_numpy(ren.new_ids))[:, dim:], opt.initial_state(dim).expand(fused.size, -1)
    )
    renumbered = list(ren.batches(src))
    assert [b.sparse.values.tolist() for b in renumbered] == [v.tolist() for v in ren.values]
    assert all(torch.equal(a.labels, b.labels) for a, b in zip(renumbered, src))
