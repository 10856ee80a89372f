"""Two CPU processes (gloo) train exactly what one process trains on the same global batches.

Each case runs tests/scripts/mp_train.py in its own session with a timeout (Lightning's popen launcher
re-runs the script for rank 1); on timeout or failure the whole process group is killed, so nothing is
left behind. The one-process reference runs the same script's ``run`` in this process.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_bagpipe as lb
from lightning_bagpipe.embedding.distributed import RankGroups
from lightning_bagpipe.embedding.driver import CacheDriver, sum_blocks

SCRIPT = Path(__file__).resolve().parent / "scripts" / "mp_train.py"
sys.path.insert(0, str(SCRIPT.parent))
import mp_train  # noqa: E402

TIMEOUT_S = 150


def _launch(args: list[str], out: Path | None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), "--devices", "2", *args]
    if out is not None:
        cmd += ["--out", str(out)]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK")
    }
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
    )
    try:
        stdout, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        pytest.fail(f"2-process run did not finish within {TIMEOUT_S}s:\n{stdout[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever the outcome, no process survives the run
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, "")


def _two_ranks_train_like_one(
    tmp_path: Path, args: list[str], steps: int, rank_args: tuple[str, ...] = ()
) -> list[dict]:
    """Train with ``args`` on two processes (plus ``rank_args``) and on one; assert that each rank's
    tables, optimizer state and dense head equal the one process's after ``steps`` steps. Returns the
    ranks' results for further checks."""
    done = _launch([*args, *rank_args], tmp_path)
    assert done.returncode == 0, done.stdout[-4000:]
    ref = mp_train.run(mp_train.parse([*args, "--devices", "1"]))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r, got in enumerate(ranks):
        assert got["steps"] == ref["steps"] == steps
        diff = (got["rows"] - ref["rows"]).abs().max()
        assert diff <= 1e-5, f"rank {r}: tables and optimizer state differ by {diff}"
        for k, v in ref["head"].items():
            assert torch.allclose(got["head"][k], v, atol=1e-5, rtol=0), k
    return ranks


@pytest.mark.parametrize("multi_hot", [1, 3], ids=["one_hot", "multi_hot"])
@pytest.mark.parametrize("store", ["shared", "sharded"])
@pytest.mark.parametrize("lookahead", [1, 8])
def test_two_processes_equal_one(tmp_path: Path, lookahead: int, store: str, multi_hot: int) -> None:
    opt = "adam" if multi_hot > 1 else "rowwise_adagrad"
    args = [
        "--lookahead",
        str(lookahead),
        "--store",
        store,
        "--multi-hot",
        str(multi_hot),
        "--optimizer",
        opt,
    ]
    ranks = _two_ranks_train_like_one(tmp_path, args, 30)
    # DDP broadcasts the model's own buffer each step, not the CachedEmbedding's constant ones
    assert ranks[0]["ddp_buffers"] == ranks[1]["ddp_buffers"] == ["seen"]
    stats = ranks[0]["stats"]
    # the cache worked under pressure and only part of the touched rows needed a gradient exchange
    assert stats["rows_fetched"] > 0 and stats["sync_bytes"] < stats["replicated_baseline_bytes"]
    # both collectives for replicated rows ran, so the exactness above covers each of them
    for r in range(2):
        assert ranks[r]["stats"]["exchange_steps"] > 0 and ranks[r]["stats"]["allreduce_steps"] > 0
        # some replicated rows finished their sync one step late, so the exactness covers that too
        assert ranks[r]["stats"]["deferred_rows"] > 0
    if lookahead == 8:
        assert ranks[0]["stats"]["rows_evicted"] + ranks[1]["stats"]["rows_evicted"] > 0
        # rows were fetched prefetch_depth steps early (on a sharded store: an all-to-all of their own)
        assert ranks[0]["stats"]["early_rows"] > 0 and ranks[1]["stats"]["early_rows"] > 0


@pytest.mark.parametrize(
    "store", ["sharded", "auto"]
)  # ("auto" picks sharded: a TieredStore cannot be shared)
def test_two_processes_on_tiered_stores_equal_one_in_ram(tmp_path: Path, store: str) -> None:
    """store="sharded" over each rank's own TieredStore, whose 6-row buffer spills many times, trains what
    one process trains on a RAM store (every store starts from the same initial rows)."""
    args = ["--lookahead", "8", "--store", store, "--optimizer", "rowwise_adagrad"]
    ranks = _two_ranks_train_like_one(tmp_path, args, 30, rank_args=("--tiered-buffer-rows", "6"))
    assert all(got["spills"] > 1 for got in ranks)


def test_a_loader_given_to_fit_directly_trains_each_ranks_slice(tmp_path: Path) -> None:
    """A BagpipeLoader built before the Trainer (rank 0 of 1) and given to fit(): each rank must train its
    own slice with two-rank plans. (It used to train whole batches with one-rank plans, and every row
    got half its gradient, silently.)"""
    _two_ranks_train_like_one(tmp_path, ["--store", "sharded"], 30, rank_args=("--direct-loader",))


def test_two_processes_with_empty_bags_equal_one(tmp_path: Path) -> None:
    """Bags of 0 to 2 ids: each rank's occurrences and lookups come from bag lengths with zeros in them."""
    args = ["--lookahead", "8", "--store", "sharded", "--multi-hot", "2", "--min-bag", "0"]
    _two_ranks_train_like_one(tmp_path, args, 30)


def test_two_processes_with_epochs_cut_short_equal_one(tmp_path: Path) -> None:
    """limit_train_batches stops each epoch before the steps its plans counted on (dirty rows, a queued
    pre-step): every rank must bring the store up to date before the next epoch's plans."""
    args = ["--lookahead", "8", "--store", "sharded", "--epochs", "3", "--limit-train-batches", "7"]
    _two_ranks_train_like_one(tmp_path, args, 21)


@pytest.mark.parametrize("defer", [True, False], ids=["deferred", "in_step"])
def test_full_replication_baseline_equals_one_process(tmp_path: Path, defer: bool) -> None:
    """sync="replicated" (the benchmark baseline): no local rows, every row all-reduced; same model, with
    and without the one-step-late sync of rows the next step does not read."""
    args = ["--lookahead", "8", "--store", "shared", "--sync", "replicated"]
    if not defer:
        args.append("--no-defer-sync")
    done = _launch(args, tmp_path)
    assert done.returncode == 0, done.stdout[-4000:]
    ref = mp_train.run(mp_train.parse([*args, "--devices", "1"]))
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert (got["rows"] - ref["rows"]).abs().max() <= 1e-5
        stats = got["stats"]
        assert stats["exchange_steps"] == 0 and stats["allreduce_steps"] == stats["steps"] == 30
        assert abs(stats["sync_bytes"] - stats["replicated_baseline_bytes"]) < 1e-6 * stats["sync_bytes"]
        assert (stats["deferred_rows"] > 0) is defer


def test_mismatched_tables_across_ranks_fail_fast_on_every_rank() -> None:
    done = _launch(["--mismatch-rank1"], None)
    assert done.returncode != 0
    assert "every rank must build the same model" in done.stdout


@pytest.mark.parametrize("limit", [[], ["--limit-train-batches", "27"]], ids=["whole", "limited"])
def test_sources_of_different_length_fail_fast(limit: list[str]) -> None:
    # (limited: Lightning's epochs have equal lengths, but the oracle reads past the limit for its
    # lookahead, so the sources' own lengths must agree: before, gloo aborted)
    done = _launch(["--short-rank1", "--capacity", "80", *limit], None)
    assert done.returncode != 0
    assert "different numbers of batches" in done.stdout, done.stdout[-3000:]


@pytest.mark.parametrize("limit", [[], ["--limit-train-batches", "27"]], ids=["whole", "limited"])
def test_unsized_sources_that_end_at_different_steps_fail_there_naming_it(limit: list[str]) -> None:
    # (generators: no length to compare before training; the streams agree until rank 1's ends. Before,
    # gloo aborted: "Received data size doesn't match expected size")
    done = _launch(["--unsized", "--short-rank1", "--capacity", "80", *limit], None)
    assert done.returncode != 0
    found = re.search(r"rank\(s\) \[1\] read other global batches than rank 0 at batch (\d+) ", done.stdout)
    assert found and "or their stream ends at another step" in done.stdout, done.stdout[-3000:]
    assert int(found[1]) < 28  # (before rank 1's last step: where the ranks' plans would first differ)


def test_unsized_sources_that_agree_train_like_one_process(tmp_path: Path) -> None:
    _two_ranks_train_like_one(tmp_path, ["--unsized", "--store", "sharded"], 30)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rank1-lr", "0.3"], r"module 0 optimizer: \{.*'lr': 0\.\d+.*\} vs"),
        (
            ["--rank1-capacity", "57"],
            r"training loader settings .* \(lookahead, cache_rows, prefetch_depth, sync\)",
        ),
        (
            ["--rank1-seed", "12", "--capacity", "80"],
            r"rank\(s\) \[1\] read other global batches than rank 0 at batch 0 of this epoch",
        ),
    ],
    ids=["sparse_lr", "cache_rows", "other_batches"],
)
def test_ranks_configured_differently_fail_fast_naming_the_setting(flags: list[str], message: str) -> None:
    # (before: another lr trained a wrong model silently, another capacity one 1e-3 off, other batches
    # (per-rank data, as a plain DDP dataset shards it) aborted gloo or trained a wrong model)
    done = _launch(flags, None)
    assert done.returncode != 0
    assert re.search(message, done.stdout), done.stdout[-3000:]


def test_a_file_store_per_rank_is_sharded_not_shared(tmp_path: Path) -> None:
    # Each rank its own MmapStore file (as a TieredStore per rank is documented): "auto" shards the rows
    # over the files and trains what one process trains; "shared" (one file for all) is refused. Before,
    # both ran "shared" on different files: a wrong model, and the ranks' tables differed.
    _two_ranks_train_like_one(tmp_path / "auto", ["--store", "auto"], 30, rank_args=("--file-per-rank",))
    done = _launch(["--store", "shared", "--file-per-rank"], tmp_path / "shared")
    assert done.returncode != 0
    assert "store='shared' needs one store for every rank" in done.stdout, done.stdout[-3000:]


@pytest.mark.parametrize("store", ["shared", "sharded"])
def test_two_processes_under_16_mixed_loss_scaling(tmp_path: Path, store: str) -> None:
    """ "16-mixed" (a GradScaler) on two processes. Each rank's fp16 forward covers half the batch, so the
    model equals one process's only to fp16 rounding (1e-3; rows trained on scaled gradients would be
    hundreds of times off), and with scales that overflow, each rank's mean loss overflows at other
    scales than one process's: then the ranks must agree with each other on every skipped step."""
    args = ["--store", store, "--optimizer", "sgd", "--fp16-scale", "256"]
    done = _launch(args, tmp_path / "small")
    assert done.returncode == 0, done.stdout[-4000:]
    ref = mp_train.run(mp_train.parse([*args, "--devices", "1"]))
    for r in range(2):
        got = torch.load(tmp_path / "small" / f"rank{r}.pt", weights_only=True)
        assert got["grad_scale"] == ref["grad_scale"] == 256.0 * 2**0  # (no overflow, no growth yet)
        assert (got["rows"] - ref["rows"]).abs().max() <= 1e-3
        assert (got["rows"] - ref["rows"]).abs().max() > 0  # (the rounding is real: this is not one process)
    done = _launch(["--store", store, "--fp16-scale", str(2.0**22)], tmp_path / "big")
    assert done.returncode == 0, done.stdout[-4000:]
    ranks = [torch.load(tmp_path / "big" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["grad_scale"] == ranks[1]["grad_scale"] < 2.0**22 / 4  # (steps were skipped)
    assert torch.equal(ranks[0]["rows"], ranks[1]["rows"])
    for k, v in ranks[0]["head"].items():
        assert torch.equal(ranks[1]["head"][k], v), k
    assert torch.isfinite(ranks[0]["rows"]).all()


def test_an_exception_on_one_rank_ends_the_run_on_all_ranks() -> None:
    done = _launch(["--fail-rank1-at", "5"], None)
    assert done.returncode != 0
    assert "rank 1 fails on purpose at step 5" in done.stdout


def test_exchanged_blocks_are_summed_in_rank_order() -> None:
    """Every rank adds the gathered blocks 0, 1, ..., W-1 into zeros: the same bits on every rank.

    Three ranks, two modules (dims 3 and 2); blocks padded with NaN, which must never be read. The reference
    adds row by row in rank order; float addition does not commute across three terms, so another order
    (or a lost block) changes bits.
    """
    gen = torch.Generator().manual_seed(5)
    world, rows, dims = 3, 40, (3, 2)
    grads = [[torch.randn(rows, d, generator=gen) * 10 ** (r - 1) for d in dims] for r in range(world)]
    blocks = [torch.nonzero(torch.rand(rows, generator=gen) < 0.8).flatten() for _ in range(world)]
    width = max(int(b.numel()) for b in blocks) * sum(dims)
    gathered = []
    for r in range(world):
        packed = torch.cat([g[blocks[r]].flatten() for g in grads[r]])
        gathered.append(torch.cat([packed, torch.full((width - packed.numel(),), float("nan"))]))
    got = sum_blocks(gathered, blocks, dims, rows)
    ref = [torch.zeros(rows, d) for d in dims]
    for r in range(world):
        for k in blocks[r].tolist():
            for m in range(len(dims)):
                ref[m][k] = ref[m][k] + grads[r][m][k]
    assert torch.equal(got, torch.cat([x.flatten() for x in ref]))


def test_a_gradient_outside_the_ranks_exchange_block_is_an_error_not_a_loss() -> None:
    """If the plan says rank 0 used only sync row 0 but it holds a gradient for row 1, it must not drop it."""
    emb = lb.CachedEmbedding(lb.Tables([("f0", 10)]), dim=2, optimizer=lb.optim.SGD(lr=0.1))
    driver = CacheDriver([emb], RankGroups(rank=0, world_size=2, grads=None, store=None))
    blocks = (np.array([0], dtype=np.int64), np.array([1], dtype=np.int64))
    with pytest.raises(RuntimeError, match="outside its exchange block"):
        driver._check_block([torch.tensor([0, 1])], blocks, 2, torch.device("cpu"))


@pytest.mark.parametrize("store", ["shared", "sharded"])
def test_two_processes_with_gradient_accumulation_equal_one(tmp_path: Path, store: str) -> None:
    """accumulate_grad_batches=3 (30 batches: 10 steps): each rank's rows of a step stay cached over its
    three batches, and the replicated rows' gradients cross ranks once per optimizer step."""
    args = ["--lookahead", "4", "--store", store, "--multi-hot", "2", "--accumulate", "3"]
    ranks = _two_ranks_train_like_one(tmp_path, args, 10)
    for r in range(2):
        assert ranks[r]["stats"]["steps"] == 10 and ranks[r]["stats"]["rows_evicted"] > 0
