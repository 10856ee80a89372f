"""Multi-process checkpoints: directory format, bitwise resume on two processes, a killed rank, bad input.

Two launches of tests/scripts/mp_resume.py (each in its own session with a timeout; the process group is
killed afterwards, so nothing is left behind) run every two-process phase:

1. ``first``: an uninterrupted run, the same run saving a directory checkpoint after every step, a model
   without randomness saving every step, then a run that checkpoints every 3 steps into ``last.ckpt`` until
   this test kills rank 1 with SIGKILL after 8 completed steps, as it starts on batch 8.
2. ``second``: resumes from several steps of the saving run, restarts the killed run from its
   ``last.ckpt``, and resumes a one-process file checkpoint on two processes.

Everything else (the one-process references, resuming a two-process checkpoint on one process, inference
loading, corrupted and foreign checkpoints, a kill in the middle of a directory save) runs in this process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lightning_bagpipe as lb
from lightning_bagpipe.strategies import checkpointing
from lightning_bagpipe.strategies import sharded_checkpoint as sc
from lightning_bagpipe.strategies.checkpointing import rows_checksum
from lightning_bagpipe.temporaries import host_id
from tests.helpers import ListDataModule, TinyModel, quiet_trainer, random_batches, small_tables

SCRIPT = Path(__file__).resolve().parent / "scripts" / "mp_resume.py"
sys.path.insert(0, str(SCRIPT.parent))
import mp_resume  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*outside strategy='bagpipe'.*:UserWarning",
    "ignore:.*Checkpoint directory .* exists and is not empty.*:UserWarning",
    "ignore:.*callbacks used to create the checkpoint.*:UserWarning",
    "ignore:.*Total length of .* across ranks is zero.*:UserWarning",
)

TIMEOUT_S = 180
STEPS = 12
RESUME_AT = [4, 9]  # (4: before the heaviest evictions of this stream; 9: late in the epoch)
FILE_AT = 5
KILL_AT = 8


# ---------------------------------------------------------------------------------------------- launches
def _env() -> dict[str, str]:
    drop = ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK", "PL_GLOBAL_SEED")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _finish(proc: subprocess.Popen[str], deadline: float) -> str:
    try:
        stdout, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        pytest.fail(f"the 2-process run did not end within {TIMEOUT_S}s:\n{stdout[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever the outcome, no process survives
            os.killpg(proc.pid, signal.SIGKILL)
    return stdout


def _start(args: list[str]) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(SCRIPT), "--devices", "2", "--steps", str(STEPS), *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=_env()
    )


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@dataclass
class Launches:
    out: Path
    first_stdout: str
    first_returncode: int
    killed_pid: int
    killed_after_s: float
    second_stdout: str
    one_process: dict[str, Any]

    def result(self, phase: str, rank: int) -> dict[str, Any]:
        path = self.out / phase / f"rank{rank}.pt"
        assert path.exists(), f"phase {phase} wrote no result for rank {rank}:\n{self.second_stdout[-3000:]}"
        return torch.load(path, weights_only=True)

    def ckpt(self, phase: str, name: str) -> Path:
        return self.out / phase / "ckpts" / name


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> Launches:
    out = tmp_path_factory.mktemp("mp_resume")
    # the one-process runs: a reference of the model without randomness, with a file checkpoint each step
    one = mp_resume.fit(out, "det-1p", devices=1, steps=STEPS, noisy=False, store="shared", seed=1, every=1)

    proc = _start(["--scenario", "first", "--out", str(out), "--kill-at", str(KILL_AT)])
    deadline = time.monotonic() + TIMEOUT_S
    ready = out / "crash" / "rank1.ready"
    pid = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if ready.exists() and ready.read_text():
            pid = int(ready.read_text())
            break
        time.sleep(0.05)
    killed_at = time.monotonic()
    if pid:
        os.kill(pid, signal.SIGKILL)  # rank 1 dies as it starts on batch KILL_AT (KILL_AT steps done)
    first = _finish(proc, deadline)
    killed_after = time.monotonic() - killed_at
    assert pid, f"rank 1 never reached step {KILL_AT}:\n{first[-4000:]}"

    second = _start(
        [
            "--scenario",
            "second",
            "--out",
            str(out),
            "--resume-at",
            *map(str, RESUME_AT),
            "--file-ckpt",
            str(out / "det-1p" / "ckpts" / f"step={FILE_AT}.ckpt"),
        ]
    )
    second_out = _finish(second, time.monotonic() + TIMEOUT_S)
    assert second.returncode == 0, second_out[-5000:]
    return Launches(out, first, proc.returncode, pid, killed_after, second_out, one)


def _assert_bitwise(got: dict[str, Any], ref: dict[str, Any], what: str) -> None:
    assert got["steps"] == ref["steps"] == STEPS, what
    assert torch.equal(got["rows"], ref["rows"]), f"{what}: tables or sparse optimizer state differ"
    for k, v in ref["head"].items():
        assert torch.equal(got["head"][k], v), f"{what}: dense {k} differs"
    ga, ra = got["optimizer"]["state"], ref["optimizer"]["state"]
    assert ga.keys() == ra.keys() and ra, what
    for p in ra:
        for name in ra[p]:
            assert torch.equal(torch.as_tensor(ga[p][name]), torch.as_tensor(ra[p][name])), (what, p, name)


def _assert_close(got: dict[str, Any], ref: dict[str, Any], what: str) -> None:
    """Equal up to float reduction order (the tolerance 1 vs 2 processes have, tests/test_multiprocess.py)."""
    assert got["steps"] == ref["steps"] == STEPS, what
    diff = (got["rows"] - ref["rows"]).abs().max()
    assert diff <= 1e-5, f"{what}: tables and optimizer state differ by {diff}"
    for k, v in ref["head"].items():
        assert torch.allclose(got["head"][k], v, atol=1e-5, rtol=0), f"{what}: dense {k}"


# ---------------------------------------------------------------------------------------------- exact resume
def test_saving_directory_checkpoints_changes_nothing(launches: Launches) -> None:
    for r in range(2):
        _assert_bitwise(launches.result("saving", r), launches.result("ref", r), f"rank {r}")


@pytest.mark.parametrize("k", RESUME_AT)
def test_two_process_resume_is_bitwise_the_uninterrupted_run(launches: Launches, k: int) -> None:
    ref = [launches.result("ref", r) for r in range(2)]
    for r in range(2):
        got = launches.result(f"resume{k}", r)
        assert got["seen"] == list(range(k, STEPS)), f"rank {r} must continue at the next unseen batch"
        _assert_bitwise(got, ref[r], f"resume from step {k}, rank {r}")


def test_a_checkpoint_saved_inside_a_step_changes_nothing_and_resumes_at_that_step(
    launches: Launches,
) -> None:
    # the directory holds each rank's RNG states of the step's start, and the save leaves the step's
    # row update to happen afterwards
    k = mp_resume.INSIDE_AT
    for r in range(2):
        ref = launches.result("ref", r)
        _assert_bitwise(launches.result("inside-saving", r), ref, f"the run that saved, rank {r}")
        got = launches.result("resume-inside", r)
        assert got["seen"] == list(range(k, STEPS)), f"rank {r} must train step {k}'s batch again"
        _assert_bitwise(got, ref, f"resume from inside step {k}, rank {r}")


def test_the_cache_was_under_pressure_in_the_saving_run(launches: Launches) -> None:
    stats = [launches.result("saving", r)["stats"] for r in range(2)]
    assert sum(s["rows_evicted"] for s in stats) > 0 and all(s["rows_fetched"] > 0 for s in stats)


# ---------------------------------------------------------------------------------------------- format
def test_directory_layout_one_shard_per_rank_and_a_manifest(launches: Launches) -> None:
    d = launches.ckpt("saving", f"step={STEPS}.ckpt")
    assert d.is_dir()
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["format"] == "lightning-bagpipe-sharded-checkpoint" and manifest["world_size"] == 2
    assert manifest["global_step"] == STEPS
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted(
        [
            "checkpoint.pt",
            "emb.rows.00000-of-00002.npy",
            "emb.rows.00001-of-00002.npy",
            "manifest.json",
            "rank.00000-of-00002.pt",
            "rank.00001-of-00002.pt",
        ]
    )
    # every file's size and CRC-32 are in the manifest (recomputed here from the bytes)
    for name, entry in manifest["files"].items():
        data = (d / name).read_bytes()
        assert entry["bytes"] == len(data) and entry["crc32"] == zlib.crc32(data), name
    # rank r's shard holds rows [r*N//2, (r+1)*N//2): the final tables, split in two contiguous halves
    total = sum(mp_resume.TABLE_SIZES)
    final = launches.result("saving", 0)["rows"]
    shards = manifest["modules"]["emb"]["shards"]
    assert [s["rows"] for s in shards] == [[0, total // 2], [total // 2, total]]
    assert [s["rank"] for s in shards] == [0, 1]
    for s in shards:
        arr = np.load(d / s["file"])
        lo, hi = s["rows"]
        assert arr.dtype == np.float32 and torch.equal(torch.from_numpy(arr), final[lo:hi])
    # checkpoint.pt: rank 0's Lightning checkpoint without the rows, weights-only loadable
    meta = torch.load(d / "checkpoint.pt", weights_only=True)
    assert "emb.rows" not in meta["state_dict"] and "head.weight" in meta["state_dict"]
    assert meta["bagpipe"]["layout"] == "sharded" and meta["bagpipe"]["world_size"] == 2
    # saved after the epoch's last batch: the position is the start of the next epoch
    assert meta["ListDataModule"] == {"train_loader": {"epoch": 1, "batches_yielded": 0}}
    ranks = [torch.load(d / f"rank.0000{r}-of-00002.pt", weights_only=True) for r in range(2)]
    assert [x["rank"] for x in ranks] == [0, 1]
    assert not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])  # per-rank generators


def test_a_save_after_fit_returned_writes_the_final_tables(launches: Launches) -> None:
    d = launches.ckpt("det-saving", "../after_fit.ckpt")
    final = launches.result("det-saving", 0)["rows"]
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["global_step"] == STEPS
    parts = [np.load(d / s["file"]) for s in manifest["modules"]["emb"]["shards"]]
    assert torch.equal(torch.from_numpy(np.concatenate(parts)), final)


# ---------------------------------------------------------------------------------------------- world size
def test_a_one_process_file_resumes_on_two_processes(launches: Launches) -> None:
    for r in range(2):
        got = launches.result("det-from-file", r)
        assert got["seen"] == list(range(FILE_AT, STEPS))
        _assert_close(got, launches.one_process, f"1 -> 2 processes, rank {r}")
        _assert_close(got, launches.result("det-saving", r), f"1 -> 2 processes vs 2 processes, rank {r}")
    assert "saved by 1 process(es) and is resumed on 2" in launches.second_stdout


@pytest.mark.parametrize("k", [3, 10])
def test_a_two_process_directory_resumes_on_one_process(launches: Launches, k: int) -> None:
    ckpt = launches.ckpt("det-saving", f"step={k}.ckpt")
    with pytest.warns(UserWarning, match="saved by 2 processes and is resumed on 1"):
        got = mp_resume.fit(
            launches.out,
            f"det-2to1-{k}",
            devices=1,
            steps=STEPS,
            noisy=False,
            store="shared",
            seed=3,
            ckpt_path=ckpt,
        )
    assert got["seen"] == list(range(k, STEPS))
    _assert_close(got, launches.one_process, f"2 -> 1 processes from step {k}")
    _assert_close(got, launches.result("det-saving", 0), f"2 -> 1 vs 2 processes from step {k}")


def test_validating_a_two_process_directory_on_one_process_says_nothing_of_resuming(
    launches: Launches, recwarn: pytest.WarningsRecorder
) -> None:
    # (the RNG states of a fit matter only to a fit: validate, test and predict used to warn that the
    # checkpoint "is resumed on 1" and its RNG states were not restored)
    tables = small_tables(mp_resume.TABLE_SIZES)
    batches = random_batches(tables, 2, mp_resume.BATCH, multi_hot=2, seed=5)
    model = TinyModel(tables, lb.optim.Adam(lr=0.05))
    dm = ListDataModule(tables, batches, batches, lookahead=2)
    quiet_trainer().validate(model, datamodule=dm, ckpt_path=launches.ckpt("det-saving", "step=3.ckpt"))
    assert not [w for w in recwarn if "is resumed on" in str(w.message)]
    assert not torch.equal(
        model.emb.store.tensor(), TinyModel(tables, lb.optim.Adam(lr=0.05)).emb.store.tensor()
    )


# ---------------------------------------------------------------------------------------------- the fault
def test_a_rank_killed_with_sigkill_ends_the_run_and_nothing_hangs(launches: Launches) -> None:
    assert launches.first_returncode != 0
    assert launches.killed_after_s < 60, "the surviving rank must be ended promptly, not by a timeout"
    assert not _alive(launches.killed_pid)
    # the checkpoint written before the kill is complete and verifies
    last = launches.ckpt("crash", "last.ckpt")
    manifest = json.loads((last / "manifest.json").read_text())
    assert manifest["global_step"] == 6
    for name in manifest["files"]:
        sc._verify_file(last, manifest, name)
    assert not [p.name for p in last.parent.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_restart_after_the_kill_equals_the_uninterrupted_run(launches: Launches) -> None:
    for r in range(2):
        got = launches.result("restart", r)
        # batches 0-5 come from the checkpoint, 6 and 7 (trained by the killed run) are lost: none twice
        assert got["seen"] == list(range(6, STEPS))
        _assert_bitwise(got, launches.result("ref", r), f"restart after the kill, rank {r}")


# ---------------------------------------------------------------------------------------------- inference
def test_directory_checkpoint_loads_for_inference_without_the_strategy(
    launches: Launches, tmp_path: Path
) -> None:
    d = launches.ckpt("saving", f"step={STEPS}.ckpt")
    tables = small_tables(mp_resume.TABLE_SIZES)
    final = launches.result("saving", 0)
    model = sc.load_checkpoint_for_inference(mp_resume.NoisyModel, d, tables=tables)
    assert isinstance(model, mp_resume.NoisyModel)
    assert torch.equal(model.emb.store.tensor(), final["rows"])
    assert torch.equal(model.head.weight, final["head"]["weight"])
    # into a memory-mapped store, through a plain Trainer's predict (no cache, no strategy)
    mm = sc.load_checkpoint_for_inference(
        TinyModel,
        launches.ckpt("det-saving", f"step={STEPS}.ckpt"),
        tables=tables,
        optimizer=lb.optim.Adam(lr=0.05),
        store=tmp_path / "s.bin",
    )
    assert isinstance(mm.emb.store, lb.MmapStore)
    assert torch.equal(mm.emb.store.tensor(), launches.result("det-saving", 0)["rows"])
    batches = random_batches(tables, 2, 8, multi_hot=2, seed=4)
    emb = mm.emb.store.tensor()[:, : mm.emb.dim]
    ids = batches[0].sparse.fused_ids(tables)
    with torch.no_grad():  # reference: sum-pool the saved rows of each bag by hand
        lengths = batches[0].sparse.lengths.view(len(tables), 8)
        bags = torch.split(torch.as_tensor(ids), lengths.reshape(-1).tolist())
        pooled = torch.stack([emb[b].sum(0) for b in bags]).view(len(tables), 8, -1).transpose(0, 1)
        assert torch.allclose(mm.emb(batches[0].sparse), pooled, atol=1e-6)
    preds = quiet_trainer(strategy="auto").predict(
        mm, dataloaders=ListDataModule(tables, batches, batches).val_dataloader()
    )
    assert preds is not None and len(preds) == 2
    # a single-file checkpoint goes through the same helper
    one = sc.load_checkpoint_for_inference(
        TinyModel,
        launches.ckpt("det-1p", f"step={STEPS}.ckpt"),
        tables=tables,
        optimizer=lb.optim.Adam(lr=0.05),
    )
    assert torch.equal(one.emb.store.tensor(), launches.one_process["rows"])


def test_inference_loading_refuses_another_model(launches: Launches) -> None:
    d = launches.ckpt("saving", "step=3.ckpt")
    with pytest.raises(ValueError, match=r"table 2 is f2:35 rows in the checkpoint, f2:36 rows in the model"):
        sc.load_checkpoint_for_inference(mp_resume.NoisyModel, d, tables=small_tables((60, 45, 36)))
    # keys other than the rows must match too (strict, like load_from_checkpoint)
    with pytest.raises(ValueError, match=r"missing keys \['extra.weight'\]"):
        sc.load_checkpoint_for_inference(_WithExtra, d, tables=small_tables(mp_resume.TABLE_SIZES))


class _WithExtra(TinyModel):
    def __init__(self, tables: lb.Tables) -> None:
        super().__init__(tables, lb.optim.Adam(lr=0.05))
        self.extra = torch.nn.Linear(2, 2, bias=False)


# ---------------------------------------------------------------------------------------------- bad input
def _resume_one_process(path: Path, sizes: tuple[int, ...] = mp_resume.TABLE_SIZES) -> None:
    tables = small_tables(sizes)
    train = random_batches(tables, 4, 8, multi_hot=2, seed=3)
    model = mp_resume.NoisyModel(tables)
    quiet_trainer().fit(model, datamodule=ListDataModule(tables, train, lookahead=2), ckpt_path=path)


@pytest.fixture
def copy_of(launches: Launches, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.ckpt"
    shutil.copytree(launches.ckpt("saving", "step=3.ckpt"), dst)
    return dst


def test_another_table_configuration_is_refused(launches: Launches) -> None:
    d = launches.ckpt("saving", "step=3.ckpt")
    with pytest.raises(
        ValueError, match=r"table 2 is f2:35 rows in the checkpoint, f2:36 rows in the model"
    ) as e:
        _resume_one_process(d, (60, 45, 36))
    assert str(d) in str(e.value)


def test_missing_shard_is_named(copy_of: Path) -> None:
    (copy_of / "emb.rows.00001-of-00002.npy").unlink()
    with pytest.raises(
        ValueError, match=r"emb.rows.00001-of-00002.npy \(written by rank 1 of 2\) is missing"
    ):
        _resume_one_process(copy_of)


def test_truncated_shard_is_named(copy_of: Path) -> None:
    shard = copy_of / "emb.rows.00000-of-00002.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(
        ValueError, match=r"emb.rows.00000-of-00002.npy \(written by rank 0 of 2\) is truncated"
    ):
        _resume_one_process(copy_of)


def test_corrupted_shard_is_named(copy_of: Path) -> None:
    shard = copy_of / "emb.rows.00001-of-00002.npy"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit in the middle of the rows
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"emb.rows.00001-of-00002.npy .* is corrupted: CRC-32"):
        _resume_one_process(copy_of)


def test_damaged_metadata_and_manifest_are_named(copy_of: Path) -> None:
    meta = copy_of / "checkpoint.pt"
    meta.write_bytes(meta.read_bytes()[:-10] + bytes(10))
    with pytest.raises(ValueError, match=r"checkpoint.pt \(rank 0's Lightning checkpoint\) is corrupted"):
        _resume_one_process(copy_of)
    (copy_of / "manifest.json").write_text('{"format": "lightning-bagpipe-sharded-checkpoint", ')
    with pytest.raises(ValueError, match=r"manifest.json is not valid JSON"):
        _resume_one_process(copy_of)


def test_shards_that_do_not_tile_the_rows_are_refused(copy_of: Path) -> None:
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["modules"]["emb"]["shards"][1]["rows"] = [60, 140]  # overlaps rows 60..69 of shard 0
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError, match=r"do not cover rows 0..140 exactly once \(\[\[0, 70\], \[60, 140\]\]\)"
    ):
        _resume_one_process(copy_of)


def test_a_directory_that_is_not_a_bagpipe_checkpoint_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "some.ckpt"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    with pytest.raises(
        ValueError, match=r"some.ckpt is not a bagpipe checkpoint: it is a directory without "
    ):
        _resume_one_process(d)
    (d / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match=r"is not a lightning-bagpipe-sharded-checkpoint manifest"):
        _resume_one_process(d)


def test_the_metadata_file_alone_is_refused_with_a_hint(launches: Launches) -> None:
    d = launches.ckpt("saving", "step=3.ckpt")
    with pytest.raises(ValueError, match=r"metadata file of a multi-process .* pass the directory"):
        _resume_one_process(d / "checkpoint.pt")


# ---------------------------------------------------------------------------------------------- atomic saves
def _tiny_module() -> tuple[dict[str, Any], dict[str, lb.CachedEmbedding]]:
    tables = small_tables()
    emb = lb.CachedEmbedding(tables, dim=4, optimizer=lb.optim.SGD(lr=0.1), seed=3)
    return {"state_dict": {}, "global_step": 1}, {"emb": emb}


def _save_in_a_child(target: Path, value: float, kill_in: str | None) -> int:
    """Fork; the child saves a 1-rank directory checkpoint of rows filled with ``value``, and with
    ``kill_in`` SIGKILLs itself when it reaches that function of the save. Returns the exit status.

    The module is built before the fork, so the child runs no parallel torch kernels (fork-safe)."""
    checkpoint, modules = _tiny_module()
    modules["emb"].store.tensor().fill_(value)
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            if kill_in is not None:
                for module in (sc, checkpointing):  # (the swap's helpers live in checkpointing)
                    original = getattr(module, kill_in, None)
                    if original is None:
                        continue

                    def die(*args: Any, original: Any = original, **kwargs: Any) -> Any:
                        os.kill(os.getpid(), signal.SIGKILL)
                        return original(*args, **kwargs)

                    setattr(module, kill_in, die)
            sc.save_sharded_checkpoint(checkpoint, target, modules, sc.LocalComm())
            os._exit(0)
        except BaseException:
            os._exit(3)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the saving child hung")


def _rows_of(d: Path) -> torch.Tensor:
    _, modules = _tiny_module()
    sc.read_sharded_checkpoint(d, modules, rank=0, world_size=1)
    return modules["emb"].store.tensor()


@pytest.mark.parametrize("kill_in", ["_write_npy", "fsync_dir", "_install", "_remove"])
def test_kill_during_a_directory_save_leaves_the_previous_checkpoint(tmp_path: Path, kill_in: str) -> None:
    target = tmp_path / "last.ckpt"
    assert _save_in_a_child(target, 1.0, None) == 0
    status = _save_in_a_child(target, 2.0, kill_in)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    rows = _rows_of(target)
    # killed before the swap: the old checkpoint; killed after it (while removing the old one): the new one
    expected = 2.0 if kill_in == "_remove" else 1.0
    assert torch.equal(rows, torch.full_like(rows, expected))
    leftovers = [p for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert leftovers and all(p.name.startswith(".last.ckpt.") for p in leftovers)
    # the next save (by a live process) removes the dead process's temporaries
    assert _save_in_a_child(target, 3.0, None) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    rows = _rows_of(target)
    assert torch.equal(rows, torch.full_like(rows, 3.0))


def test_replacing_without_rename_exchange_keeps_a_complete_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        checkpointing, "_exchange", lambda a, b: False
    )  # a filesystem without RENAME_EXCHANGE
    target = tmp_path / "last.ckpt"
    for value in (1.0, 2.0):
        checkpoint, modules = _tiny_module()
        modules["emb"].store.tensor().fill_(value)
        sc.save_sharded_checkpoint(checkpoint, target, modules, sc.LocalComm())
        assert torch.equal(_rows_of(target), torch.full_like(_rows_of(target), value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # an interrupted replace (the old one parked, the new one not yet renamed in) is named on load
    parked = tmp_path / f".last.ckpt.{host_id()}.1.00000000.old"
    target.rename(parked)
    with pytest.raises(FileNotFoundError, match=r"the previous checkpoint at .*\.old"):
        sc.load_bagpipe_checkpoint(None, target, True, _tiny_module()[1], sc.LocalComm())  # type: ignore[arg-type]


class _Rank0OfTwo:
    """Rank 0's side of a 2-rank save in which rank 1 cannot write its shard (its disk is full)."""

    rank, world_size = 0, 2

    def __init__(self) -> None:
        self.gathers = 0

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather(self, obj: Any) -> list[Any]:
        self.gathers += 1  # 1: temporary directory made; 2: what each rank wrote; 3: outcome of writing
        return [obj, "OSError: [Errno 28] No space left on device" if self.gathers == 3 else None]


def test_a_failure_on_one_rank_fails_the_save_on_every_rank(tmp_path: Path) -> None:
    checkpoint, modules = _tiny_module()
    with pytest.raises(RuntimeError, match=r"shards .* failed on rank 1: OSError: \[Errno 28\] No space"):
        sc.save_sharded_checkpoint(checkpoint, tmp_path / "c.ckpt", modules, _Rank0OfTwo())
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing installed, the temporary removed


def test_row_bounds_tile_the_rows_like_the_sharded_store() -> None:
    for n, w in [(140, 2), (7, 3), (3, 4), (1000, 7)]:
        b = sc.row_bounds(n, w)
        assert b[0] == 0 and b[-1] == n and np.all(np.diff(b) >= 0) and len(b) == w + 1
        sizes = np.diff(b)
        assert sizes.max() - sizes.min() <= 1


def _lazy_module(path: Path | None) -> tuple[dict[str, Any], dict[str, lb.CachedEmbedding]]:
    """A module over 1,000 rows in a TieredStore at ``path`` (in RAM if None); Adagrad starts rows at 0.5."""
    store = None if path is None else functools.partial(lb.TieredStore, path, buffer_bytes=1024)
    opt = lb.optim.Adagrad(lr=0.1, initial_accumulator_value=0.5)
    emb = lb.CachedEmbedding(small_tables((400, 250, 350)), dim=4, optimizer=opt, seed=3, store=store)
    return {"state_dict": {}, "global_step": 1}, {"emb": emb}


def test_a_lazy_store_saves_only_its_written_rows_and_restores_them_into_any_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sc, "SHARD_CHUNK_ROWS", 2)  # the shard is written two rows at a time
    checkpoint, modules = _lazy_module(tmp_path / "a.f32")
    emb = modules["emb"]
    n = emb.tables.total_rows
    ids = np.array([3, 17, 399, 640, 999])
    emb.store.write(ids, torch.randn(ids.size, emb.width))
    expected = emb.store.read(np.arange(n))
    target = tmp_path / "c.ckpt"
    sc.save_sharded_checkpoint(checkpoint, target, modules, sc.LocalComm())
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["version"] == 2
    (shard,) = manifest["modules"]["emb"]["shards"]
    assert shard["init_seed"] == 3 and shard["init_state"] == [0.5] * 4
    assert np.load(target / shard["ids_file"]).tolist() == ids.tolist()
    saved = np.load(target / shard["file"])
    assert saved.shape == (ids.size, emb.width) and np.array_equal(saved, expected[ids].numpy())
    meta = torch.load(target / "checkpoint.pt", weights_only=True)["bagpipe"]
    assert meta["version"] == 3 and meta["modules"]["emb"]["init_recipe"] == "splitmix64-v1"
    emb.store.close()
    # into RAM, and into a file store holding rows the checkpoint does not (they go back to initial)
    for store_path in (None, tmp_path / "a.f32"):
        mods = _lazy_module(store_path)[1]
        into = mods["emb"]
        into.store.write([5], torch.full((1, emb.width), 9.0))
        ckpt, _ = sc.read_sharded_checkpoint(target, mods, rank=0, world_size=1)
        into.load_state_dict({"rows": ckpt["state_dict"]["emb.rows"]})  # (the rows are in place already)
        assert torch.equal(into.store.read(np.arange(n)), expected), store_path
    # damaged: ids outside the shard, or a shard without its recipe
    bad = json.loads((target / "manifest.json").read_text())
    del bad["modules"]["emb"]["shards"][0]["init_seed"]
    (target / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"do not name one seed and 4 initial optimizer state values"):
        sc.read_sharded_checkpoint(target, _lazy_module(tmp_path / "d.f32")[1], rank=0, world_size=1)


def test_rows_left_out_of_the_state_dict_only_while_asked(tmp_path: Path) -> None:
    _, modules = _tiny_module()
    emb = modules["emb"]
    assert "rows" in emb.state_dict()
    with sc.rows_left_out([emb]):
        assert "rows" not in emb.state_dict()
    assert rows_checksum(emb.state_dict()["rows"]) == rows_checksum(emb.store.tensor())
