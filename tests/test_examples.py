"""The example scripts: a tiny real run of each in a subprocess, plus their flags and error messages."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_bagpipe.data.criteo_shape import scaled_cardinalities
from lightning_bagpipe.data.parquet import write_parquet
from lightning_bagpipe.data.synthetic import SyntheticCriteo
from lightning_bagpipe.embedding.tiered_store import TieredStore
from lightning_bagpipe.models import DLRM, DeepFM
from lightning_bagpipe.models.train import add_arguments, main
from lightning_bagpipe.oracle import min_capacity
from lightning_bagpipe.strategies.sharded_checkpoint import load_checkpoint_for_inference
from lightning_bagpipe.tables import Tables

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = [
    "--scale",
    "0.001",
    "--batch-size",
    "256",
    "--max-steps",
    "40",
    "--val-batches",
    "4",
    "--lookahead",
    "8",
]
TIMEOUT_S = 180


def _child_env() -> dict[str, str]:
    """This environment minus the torch.distributed rendezvous variables.

    An earlier in-process fit under strategy="bagpipe" leaves ``MASTER_PORT`` set (and the port bound);
    a child inheriting it would fail to bind the same port.
    """
    skip = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"}
    return {k: v for k, v in os.environ.items() if k not in skip}


def _run_example(script: str, tmp_path: Path, *extra: str) -> tuple[dict, str]:
    metrics = tmp_path / "metrics.json"
    cmd = [
        sys.executable,
        str(EXAMPLES / script),
        *TINY,
        "--no-progress-bar",
        "--root-dir",
        str(tmp_path / "run"),
    ]
    proc = subprocess.run(
        [*cmd, "--metrics-json", str(metrics), *extra],
        cwd=tmp_path,
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(metrics.read_text()), proc.stdout


def _check_metrics(m: dict, model: str) -> None:
    assert m["model"] == model and m["data"] == "synthetic"
    assert m["steps"] == 40 and m["batch_size"] == 256 and m["lookahead"] == 8
    assert m["table_rows"] == 33785  # Criteo Kaggle's 26 tables at scale 0.001
    assert 0.55 < m["val_auc"] <= 1.0  # learned something in 40 steps
    assert 0.0 < m["val_logloss"] < 2.0
    assert 0.75 < m["true_auc"] < 1.0
    assert m["val_auc"] < m["true_auc"]  # the planted model is the ceiling
    assert m["samples_per_second"] > 0 and m["train_seconds"] > 0
    assert 0.0 < m["hit_rate"] < 1.0
    assert m["rows_fetched"] > 0 and m["rows_written_back"] > 0


def test_deepfm_example_tiny_run(tmp_path: Path) -> None:
    m, out = _run_example("deepfm.py", tmp_path)
    _check_metrics(m, "deepfm")
    assert "validation AUC" in out and "true model's AUC" in out and "hit rate" in out
    # Lightning's logger and checkpointing work as usual
    version = tmp_path / "run" / "lightning_logs" / "version_0"
    with open(version / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("val_auc") for r in rows) and any(r.get("train_loss_epoch") for r in rows)
    [ckpt] = list((version / "checkpoints").glob("*.ckpt"))
    # the summary says where the checkpoint went, its size and the time the save took
    [saved] = m["checkpoints"]
    assert Path(saved["path"]).resolve() == ckpt.resolve() and saved["bytes"] == ckpt.stat().st_size
    assert m["checkpoint_saves"] == 1 and m["checkpoint_seconds"] > 0
    line = re.escape(f"  checkpoint          {saved['path']} (")
    assert re.search(line + r"\d+\.\d (kB|MB); saved in \d+\.\d+ s\)\n", out), out
    assert "s of training, checkpoint saves not included)" in out
    assert "hint:" not in out  # 40 steps touch most of the 33,785 rows
    model = DeepFM.load_from_checkpoint(ckpt)
    assert len(model.hparams["tables"]) == 26 and model.embedding.tables.total_rows == 33785
    assert not torch.equal(model.embedding.store.tensor()[:, :16], torch.zeros(33785, 16))


def test_checkpoint_saves_are_timed_apart_from_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A slow checkpoint save (3 s here, a 2.4 GB file in real life) is reported on its own line and left
    out of the training time and the throughput."""
    slow_s = 3.0
    save = ModelCheckpoint._save_checkpoint

    def slow_save(self: ModelCheckpoint, trainer: object, filepath: str) -> None:
        time.sleep(slow_s)
        save(self, trainer, filepath)  # type: ignore[arg-type]

    monkeypatch.setattr(ModelCheckpoint, "_save_checkpoint", slow_save)
    metrics = tmp_path / "m.json"
    argv = ["--scale", "0.001", "--batch-size", "64", "--max-steps", "4", "--val-batches", "0"]
    argv += ["--lookahead", "2", "--no-progress-bar", "--no-logger", "--root-dir", str(tmp_path / "run")]
    assert main([*argv, "--metrics-json", str(metrics)], model="deepfm") == 0
    m = json.loads(metrics.read_text())
    [ckpt] = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    assert m["checkpoint_saves"] == 1 and m["checkpoint_seconds"] >= slow_s
    assert 0 < m["train_seconds"] < slow_s  # 4 tiny steps; the save's 3 s are not training
    assert m["samples_per_second"] == pytest.approx(4 * 64 / m["train_seconds"])
    out = capsys.readouterr().out
    assert f"  checkpoint          {ckpt} (" in out and "; saved in 3." in out
    # without a checkpoint the summary says so
    assert main([*argv, "--no-checkpoint", "--metrics-json", str(metrics)], model="deepfm") == 0
    m = json.loads(metrics.read_text())
    assert m["checkpoints"] == [] and m["checkpoint_saves"] == 0 and m["checkpoint_seconds"] == 0.0
    out = capsys.readouterr().out
    assert "  checkpoint          none saved" in out and "checkpoint saves not included" not in out


def test_dlrm_example_in_process_with_mmap_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The DLRM script's engine, run in-process (saves a second interpreter start-up) on an mmap store."""
    store = tmp_path / "tables.f32"
    metrics = tmp_path / "m.json"
    argv = [*TINY, "--no-progress-bar", "--no-checkpoint", "--no-logger", "--root-dir", str(tmp_path / "run")]
    argv += ["--store", "mmap", "--store-path", str(store), "--metrics-json", str(metrics)]
    assert main(argv, model="dlrm") == 0
    m = json.loads(metrics.read_text())
    _check_metrics(m, "dlrm")
    assert "validation AUC" in capsys.readouterr().out
    assert store.exists() and Path(f"{store}.json").exists()
    # the file holds the trained tables: a model reopening it starts from them, not from the initial rows
    tables = Tables.from_sizes(scaled_cardinalities(0.001))
    reopened = DLRM(tables, store=str(store)).embedding.store.tensor()
    fresh = DLRM(tables).embedding.store.tensor()
    assert reopened.shape == fresh.shape
    changed = int((reopened[:, :16] != fresh[:, :16]).any(1).sum())
    assert 0 < changed <= m["rows_written_back"]
    # a second run refuses to clobber the store unless told to
    with pytest.raises(SystemExit) as exit_info:
        main(argv, model="dlrm")
    assert exit_info.value.code == 2
    assert "--overwrite-store" in capsys.readouterr().err


def test_deepfm_example_on_a_tiered_store_trains_as_in_ram(tmp_path: Path) -> None:
    """--store tiered: a TieredStore file with a 1 MiB buffer trains the same model as the RAM store, and
    its file holds only the rows training wrote (no full initialisation)."""
    path = tmp_path / "tables.f32"
    base = [*TINY, "--no-progress-bar", "--no-checkpoint", "--no-logger", "--root-dir", str(tmp_path / "run")]
    figures = {}
    for store in ("tiered", "memory"):
        metrics = tmp_path / f"{store}.json"
        extra = ["--store-path", str(path), "--buffer-mib", "1"] if store == "tiered" else []
        assert main([*base, "--store", store, *extra, "--metrics-json", str(metrics)], model="deepfm") == 0
        figures[store] = json.loads(metrics.read_text())
    tiered, memory = figures["tiered"], figures["memory"]
    _check_metrics(tiered, "deepfm")
    assert tiered["val_logloss"] == memory["val_logloss"] and tiered["val_auc"] == memory["val_auc"]
    reopened = TieredStore(path)  # flushed at the end of fit: the file and its bitmap are complete
    assert reopened.metadata["lazy"] is True
    assert 0 < reopened.rows_in_file() <= tiered["rows_written_back"] < tiered["table_rows"]
    reopened.close()


def test_deepfm_example_on_two_processes_keeps_a_tiered_store_per_process(tmp_path: Path) -> None:
    m, _ = _run_example(
        "deepfm.py", tmp_path, "--devices", "2", "--accelerator", "cpu", "--store", "tiered",
        "--buffer-mib", "1", "--no-logger",
    )  # fmt: skip
    assert m["world_size"] == 2 and m["steps"] == 40
    stores = [TieredStore(tmp_path / "run" / f"tables.rank{rank}.f32") for rank in (0, 1)]
    for store in stores:  # each rank trained its shard (store="sharded") over its own file
        assert 0 < store.rows_in_file() < m["table_rows"]
    # the end-of-fit checkpoint: a directory whose shards hold only the rows each rank wrote
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    shards = manifest["modules"]["embedding"]["shards"]
    assert [s["rank"] for s in shards] == [0, 1] and all("ids_file" in s for s in shards)
    written = sum(np.load(ckpt / s["ids_file"]).size for s in shards)
    assert 0 < written < m["table_rows"] // 2
    model = load_checkpoint_for_inference(DeepFM, ckpt)  # into RAM: every other row is its initial value
    final = stores[0].read(np.arange(m["table_rows"]))  # rank 0 gathered every shard as fit ended
    assert torch.equal(model.embedding.store.tensor(), final)
    for store in stores:
        store.close()


@pytest.mark.parametrize("model", ["deepfm", "dlrm", None])
def test_every_flag_is_documented(model: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, model)
    flags = {s for a in parser._actions for s in a.option_strings}
    for needed in (
        "--data",
        "--val-data",
        "--batch-size",
        "--lookahead",
        "--cache-rows",
        "--store",
        "--store-path",
        "--devices",
        "--max-steps",
        "--metrics-json",
    ):
        assert needed in flags
    assert ("--hidden" in flags) == (model in ("deepfm", None))
    assert ("--bottom" in flags) == (model in ("dlrm", None))
    undocumented = [a.option_strings for a in parser._actions if not (a.help or "").strip()]
    assert not undocumented
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"], model=model)
    assert exit_info.value.code == 0
    assert "--metrics-json" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--store-path", "x.f32"], "--store-path needs --store mmap or tiered"),
        (["--buffer-mib", "4"], "--buffer-mib needs --store tiered"),
        (["--hidden", "64,0"], "layer widths must be positive"),
        (["--batch-size", "0"], "expected a positive int"),
        (["--data", "/nonexistent/criteo"], "does not exist"),
        (["--val-data", "v.tsv"], "--val-data is for file sources"),
        (["--table-size", "100"], "--table-size: TSV options, but --data is synthetic"),
        (["--labeled"], "--labeled/--unlabeled: TSV options, but --data is synthetic"),
        (["--labeled", "--unlabeled"], "not allowed with argument --labeled"),
    ],
)
def test_bad_flags_are_clear_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--max-steps", "1", "--no-logger", "--no-checkpoint"], model="deepfm")
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "deepfm", "--bottom", "8,16"], "--bottom: not a flag of --model deepfm"),
        (["--model", "deepfm", "--bottom", "8,16", "--top", "8,1"], "--bottom and --top: not a flag"),
        (["--model", "dlrm", "--hidden", "32"], "--hidden: not a flag of --model dlrm, whose MLP widths are"),
    ],
)
def test_the_other_models_widths_are_refused_not_ignored(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:  # (the package's `train` command has both models' flags)
        main([*argv, "--max-steps", "1", "--no-logger", "--no-checkpoint", "--scale", "0.001"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _write_tsv(path: Path, source: SyntheticCriteo) -> None:
    """Criteo's raw format from synthetic batches: label, 13 integer counts, 26 hex hashes (the ids)."""
    lines = []
    for batch in source:
        assert batch.dense is not None and batch.labels is not None
        b = batch.batch_size
        counts = torch.expm1(batch.dense).round().long().tolist()
        ids = batch.sparse.values.view(26, b).t().tolist()
        for label, dense, cats in zip(batch.labels.long().tolist(), counts, ids):
            lines.append("\t".join([str(label), *map(str, dense), *(f"{c + 1:08x}" for c in cats)]))
    path.write_text("\n".join(lines) + "\n")


def _synthetic(split: str, batches: int) -> SyntheticCriteo:
    return SyntheticCriteo(256, batches, scale=0.001, seed=1, split=split)


@pytest.mark.parametrize("kind", ["tsv", "parquet"])
def test_example_trains_from_files(kind: str, tmp_path: Path) -> None:
    train, val = tmp_path / f"train.{kind}", tmp_path / f"val.{kind}"
    if kind == "tsv":
        _write_tsv(train, _synthetic("train", 60))
        _write_tsv(val, _synthetic("val", 4))
        extra = ["--table-size", "5000"]
    else:
        write_parquet(_synthetic("train", 60), train, _synthetic("train", 0).tables)
        write_parquet(_synthetic("val", 4), val, _synthetic("train", 0).tables)
        extra = []
    metrics = tmp_path / "m.json"
    argv = ["--data", str(train), "--val-data", str(val), "--batch-size", "256", "--max-steps", "60"]
    argv += [
        "--lookahead",
        "4",
        "--no-progress-bar",
        "--no-checkpoint",
        "--no-logger",
        "--metrics-json",
        str(metrics),
    ]
    assert main([*argv, *extra], model="deepfm") == 0
    m = json.loads(metrics.read_text())
    assert m["data"] == str(train) and m["steps"] == 60 and m["true_auc"] is None
    assert m["table_rows"] == (26 * 5000 if kind == "tsv" else 33785)
    assert 0.55 < m["val_auc"] < 1.0 and 0.0 < m["val_logloss"] < 2.0
    assert m["rows_fetched"] > 0


def _tiny_tsv(path: Path, lines: int = 7, sep: str = "\t") -> Path:
    """A few Criteo lines: label, 13 integer counts, 26 hex hashes (few distinct ids)."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(lines):
        fields = [str(rng.integers(0, 2)), *map(str, rng.integers(0, 50, 13))]
        rows.append(sep.join(fields + [f"{h:08x}" for h in rng.integers(0, 2**32, 26)]))
    path.write_text("\n".join(rows) + "\n")
    return path


def _tsv_run(tmp_path: Path, *extra: str) -> dict:
    metrics = tmp_path / "m.json"
    argv = ["--data", str(tmp_path / "tiny.tsv"), "--batch-size", "4", "--max-steps", "2"]
    argv += ["--no-progress-bar", "--no-logger", "--no-checkpoint", "--metrics-json", str(metrics)]
    argv += ["--root-dir", str(tmp_path / "run")]
    assert main([*argv, *extra], model="deepfm") == 0
    return json.loads(metrics.read_text())


def test_tables_far_larger_than_the_data_get_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """7 lines touch at most 7 * 26 rows: 1,000 rows per table is far more than they need (the hint
    names the flags that size the tables to the data); a vocabulary is sized to the data already."""
    _tiny_tsv(tmp_path / "tiny.tsv")
    m = _tsv_run(tmp_path, "--table-size", "1000")
    out = capsys.readouterr().out
    assert m["table_rows"] == 26_000 and 0 < m["rows_fetched"] <= 7 * 26
    [hint] = [line for line in out.splitlines() if line.startswith("hint:")]
    assert f"training touched at most {m['rows_fetched']:,} of the 26,000 table rows" in hint
    assert "--hashing vocab" in hint and "--table-size" in hint
    m = _tsv_run(tmp_path, "--hashing", "vocab")
    out = capsys.readouterr().out
    assert m["table_rows"] < 26 * 10 and "hint:" not in out  # 7 values per table and 2 reserved rows


def test_tsv_format_flags_reach_the_reader(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--labeled/--unlabeled set the reader's labeled=, and its messages name the flags, not the keyword."""
    _tiny_tsv(tmp_path / "tiny.tsv")
    with pytest.raises(SystemExit):
        _tsv_run(tmp_path, "--table-size", "100", "--unlabeled")  # 40-field lines read as 39-field ones
    err = capsys.readouterr().err
    assert "tiny.tsv, line 1:" in err and "expected 39" in err
    # a comma-separated file: the format cannot be detected, and the message says which flag to pass
    _tiny_tsv(tmp_path / "tiny.tsv", sep=",")
    with pytest.raises(SystemExit):
        _tsv_run(tmp_path, "--table-size", "100")
    err = capsys.readouterr().err
    assert "--labeled or --unlabeled" in err and "labeled=True" not in err


def test_a_cache_too_small_names_the_flag_and_the_rows_needed(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--scale", "0.001", "--batch-size", "256", "--max-steps", "5", "--lookahead", "4"]
    argv += ["--cache-rows", "100", "--no-progress-bar", "--no-logger", "--no-checkpoint"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv, model="deepfm")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    least = re.search(r"need at least (\d+) rows \(step \d+ with step \d+\)", err)
    assert least is not None, err
    # all 5 steps are read when step 0 fails (L = 4): the figure is the stream's two-step minimum
    stream = SyntheticCriteo(256, 5, scale=0.001, seed=0, split="train")
    assert int(least[1]) == min_capacity(b.sparse.fused_ids(stream.tables) for b in stream)
    assert f"[here: --cache-rows {least[1]} or more, or no --cache-rows for a cache that grows]" in err


def test_train_accumulates_gradients_over_batches(tmp_path: Path) -> None:
    # --accumulate-grad-batches 2: 2 optimizer steps train 4 batches (throughput counts batches)
    metrics = tmp_path / "m.json"
    argv = ["--scale", "0.001", "--batch-size", "64", "--max-steps", "2", "--val-batches", "0"]
    argv += ["--lookahead", "2", "--no-progress-bar", "--no-logger", "--no-checkpoint"]
    argv += ["--accumulate-grad-batches", "2", "--root-dir", str(tmp_path / "run")]
    assert main([*argv, "--metrics-json", str(metrics)], model="deepfm") == 0
    m = json.loads(metrics.read_text())
    assert m["steps"] == 2 and m["accumulate_grad_batches"] == 2
    assert m["samples_per_second"] * m["train_seconds"] == pytest.approx(4 * 64)
