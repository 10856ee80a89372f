"""The ``lightning-bagpipe`` command line: user errors in one line naming flags, ``--plot`` refused before
any work, the JSON written before the plot, ``bench oracle``'s capacity and summary, the help text."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import lightning_bagpipe.bench.cache as cache_suite
import lightning_bagpipe.trace as trace_module
from lightning_bagpipe.cli import EXIT_BROKEN_PIPE, flag_hints, main
from lightning_bagpipe.data.convert import convert_tsv
from lightning_bagpipe.data.criteo_tsv import ModuloHashing
from lightning_bagpipe.data.synthetic import SyntheticCriteo, write_criteo_tsv
from lightning_bagpipe.models import train as train_module
from tests.helpers import has_matplotlib

#: A trace of two tiny synthetic batches (seconds to run).
TINY_TRACE = [
    "trace",
    "synthetic",
    "--scale",
    "0.001",
    "--batches",
    "2",
    "--batch-size",
    "64",
    "--lookahead",
    "1",
]


def _one_error_line(err: str, command: str) -> str:
    """The single ``error:`` line of ``err``, which must start a line and come without a traceback."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"lightning-bagpipe {command}: error: "), err
    return errors[0]


@pytest.fixture
def tsv(tmp_path: Path) -> tuple[Path, Path]:
    """A well-formed Criteo TSV file, and a copy whose third line has an extra field."""
    good = tmp_path / "good.tsv"
    write_criteo_tsv(list(SyntheticCriteo(8, 1, scale=0.0005, seed=3)), good)
    lines = good.read_text().splitlines()
    lines[2] += "\textra"
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(lines) + "\n")
    return good, bad


# ---------------------------------------------------------------------- user errors
def test_convert_bad_line_is_one_error_line_naming_the_flag(
    tsv: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, bad = tsv
    # without --quiet: the error line must not be glued to the unfinished progress line
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err, "convert")
    assert "line 3" in line and "pass --skip-bad-lines" in line and "skip_bad_lines" not in line
    with pytest.warns(UserWarning, match="skipped 1 malformed line"):
        assert main(["convert", str(bad), str(tmp_path / "out"), "--quiet", "--skip-bad-lines"]) == 0


def test_convert_existing_output_names_overwrite(
    tsv: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, _ = tsv
    out = str(tmp_path / "out")
    assert main(["convert", str(good), out, "--quiet"]) == 0
    assert main(["convert", str(good), out, "--quiet"]) == 2
    assert _one_error_line(capsys.readouterr().err, "convert").endswith("pass --overwrite")
    assert main(["convert", str(good), out, "--quiet", "--overwrite"]) == 0


def test_missing_input_and_command_exits_are_error_lines(
    tsv: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["trace", str(tmp_path / "no_such_dir")]) == 2
    assert "no_such_dir" in _one_error_line(capsys.readouterr().err, "trace")
    # convert's own SystemExit("message") is reported the same way
    good, _ = tsv
    assert main(["convert", str(good), str(tmp_path / "o"), "--hashing", "vocab", "--table-sizes", "5"]) == 2
    assert "--table-sizes applies" in _one_error_line(capsys.readouterr().err, "convert")


def test_traceback_flag_raises_the_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        main(["trace", str(tmp_path / "no_such_dir"), "--traceback"])


def test_trace_skip_bad_lines_flag(tsv: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, bad = tsv
    flags = ["--batch-size", "4", "--batches", "0", "--table-size", "50", "--lookahead", "1"]
    assert main(["trace", str(bad), *flags]) == 2
    assert "pass --skip-bad-lines" in _one_error_line(capsys.readouterr().err, "trace")
    with pytest.warns(UserWarning, match="skipped 1 malformed line"):
        assert main(["trace", str(bad), *flags, "--skip-bad-lines"]) == 0
    assert "recommendation" in capsys.readouterr().out


def test_trace_labeled_flags(
    tsv: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, _ = tsv
    flags = ["--batch-size", "4", "--batches", "0", "--table-size", "50", "--lookahead", "1"]
    assert main(["trace", str(good), *flags, "--unlabeled"]) == 2  # 40-field lines read as 39-field ones
    assert "line 1: 40 tab-separated fields, expected 39" in _one_error_line(capsys.readouterr().err, "trace")
    assert main(["trace", str(good), *flags, "--labeled"]) == 0
    short = tmp_path / "short.tsv"
    short.write_text("1\t2\t3\n")
    assert main(["trace", str(short), *flags]) == 2
    assert "pass --labeled or --unlabeled" in _one_error_line(capsys.readouterr().err, "trace")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--table-size", "5"], "--table-size applies to Criteo TSV data; synthetic tables are"),
        (["--skip-bad-lines"], "--skip-bad-lines applies to Criteo TSV data; synthetic data has no lines"),
        (["--unlabeled"], "--labeled/--unlabeled applies to Criteo TSV data; synthetic data has no lines"),
    ],
)
def test_trace_refuses_tsv_flags_for_synthetic_data(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = TINY_TRACE
    assert main([*args, *flags]) == 2
    assert message in _one_error_line(capsys.readouterr().err, "trace")


TSV_FLAGS = {  # train's TSV flags, and how its error names them
    "--table-size": (["--table-size", "50"], "--table-size"),
    "--hashing": (["--hashing", "vocab"], "--hashing vocab"),
    "--vocab-threshold": (["--hashing", "vocab", "--vocab-threshold", "2"], "--vocab-threshold"),
    "--vocab-path": (["--vocab-path", "v.npz"], "--vocab-path"),
    "--skip-bad-lines": (["--skip-bad-lines"], "--skip-bad-lines"),
    "--unlabeled": (["--unlabeled"], "--labeled/--unlabeled"),
}


@pytest.mark.parametrize("flag", list(TSV_FLAGS))
def test_train_refuses_tsv_flags_for_parquet_data(
    flag: str, tsv: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, _ = tsv
    convert_tsv(good, tmp_path / "pq", hashing=ModuloHashing(50), progress=False)
    flags, named = TSV_FLAGS[flag]
    base = ["--data", str(tmp_path / "pq"), "--batch-size", "4", "--max-steps", "1", "--no-logger"]
    parser = argparse.ArgumentParser()
    train_module.add_arguments(parser)
    with pytest.raises(ValueError, match="TSV options, but the data is Parquet") as err:
        train_module.build_datamodule(parser.parse_args([*base, *flags]))
    assert str(err.value).startswith(f"{named}: ") or f", {named}:" in str(err.value)
    # The same through the command: one error line.
    assert main(["train", *base, *flags, "--no-checkpoint", "--root-dir", str(tmp_path / "run")]) == 2
    assert "but the data is Parquet" in _one_error_line(capsys.readouterr().err, "train")
    # With TSV validation data the flags apply to it (tables of 50 rows, as the Parquet training data's).
    if flag == "--table-size":
        args = parser.parse_args([*base, *flags, "--val-data", str(good)])
        assert train_module.build_datamodule(args).tables.sizes.tolist() == [50] * 26


@pytest.mark.parametrize(
    "flags", [["--scale", "0.5"], ["--zipf", "1.2"], ["--multi-hot", "3"], ["--val-batches", "0"]]
)
def test_train_refuses_synthetic_options_for_file_data(
    flags: list[str], tsv: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # (they were ignored: a user who passes --scale with a file expects it to size something)
    good, _ = tsv
    parser = argparse.ArgumentParser()
    train_module.add_arguments(parser)
    args = parser.parse_args(["--data", str(good), "--batch-size", "4", *flags])
    with pytest.raises(ValueError, match=rf"^{flags[0]}: options of synthetic data, but --data is "):
        train_module.build_datamodule(args)
    # on synthetic data they apply, and without them the defaults do
    synthetic = parser.parse_args(["--batch-size", "4", "--max-steps", "2", *flags])
    dm = train_module.build_datamodule(synthetic)
    plain = train_module.build_datamodule(parser.parse_args(["--batch-size", "4", "--max-steps", "2"]))
    assert (
        plain.tables.total_rows
        == train_module.build_datamodule(
            parser.parse_args(
                ["--batch-size", "4", "--max-steps", "2", "--scale", str(train_module.DEFAULT_SCALE)]
            )
        ).tables.total_rows
    )
    if flags[0] == "--scale":
        assert dm.tables.total_rows > plain.tables.total_rows


def test_train_hashing_flags_that_disagree_are_refused_naming_the_flags(tsv: tuple[Path, Path]) -> None:
    # (they fell through to the data module, whose errors named keyword arguments: "vocab_path needs
    # hashing='vocab'")
    good, _ = tsv
    parser = argparse.ArgumentParser()
    train_module.add_arguments(parser)
    for flags, message in (
        (["--hashing", "modulo", "--vocab-path", "v.npz"], r"--vocab-path needs --hashing vocab"),
        (["--hashing", "vocab", "--table-size", "10"], r"--table-size applies to --hashing modulo only"),
    ):
        args = parser.parse_args(["--data", str(good), "--batch-size", "4", *flags])
        with pytest.raises(ValueError, match=message):
            train_module.build_datamodule(args)
    # a saved vocabulary alone implies its hashing, as convert's --vocab does
    assert main(["convert", str(good), str(good.parent / "pq_vocab"), "--hashing", "vocab"]) == 0
    vocab = good.parent / "pq_vocab" / "vocabulary.npz"
    args = parser.parse_args(["--data", str(good), "--batch-size", "4", "--vocab-path", str(vocab)])
    dm = train_module.build_datamodule(args)
    assert type(dm.train_data.hashing).__name__ == "Vocabulary"  # type: ignore[union-attr]
    assert args.hashing is None  # (resolved, not written back: a second build sees the same flags)
    synthetic = parser.parse_args(["--data", "synthetic", "--batch-size", "4"])
    train_module.build_datamodule(synthetic)
    train_module.build_datamodule(synthetic)


def test_train_refuses_a_vocab_threshold_that_builds_no_vocabulary(tsv: tuple[Path, Path]) -> None:
    good, _ = tsv
    parser = argparse.ArgumentParser()
    train_module.add_arguments(parser)
    for flags in (
        ["--vocab-threshold", "2"],
        ["--hashing", "vocab", "--vocab-path", "v.npz", "--vocab-threshold", "2"],
    ):
        args = parser.parse_args(["--data", str(good), "--batch-size", "4", *flags])
        with pytest.raises(ValueError, match="--vocab-threshold applies to --hashing vocab when building"):
            train_module.build_datamodule(args)
    args = parser.parse_args(
        ["--data", str(good), "--batch-size", "4", "--hashing", "vocab", "--vocab-threshold", "2"]
    )
    assert train_module.build_datamodule(args).train_data.hashing.threshold == 2  # type: ignore[union-attr]


def test_closed_output_ends_the_command_quietly(tmp_path: Path) -> None:
    # `lightning-bagpipe trace DATA | head`: the reader has gone before the report is written. That is no
    # error: no message, and status 141 (128 + SIGPIPE) as for a tool that SIGPIPE ended.
    argv = TINY_TRACE
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_bagpipe.cli", *argv, "--json", str(tmp_path / "t.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # no reader: the report's write fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE == 141, err
    assert "error" not in err and "Broken pipe" not in err and "Exception ignored" not in err, err
    assert json.loads((tmp_path / "t.json").read_text())["batches"] == 2  # written before the report


def test_a_broken_pipe_that_is_not_the_output_is_an_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only a closed stdout/stderr ends the command quietly; any other broken pipe is reported.
    def broken(args: Any) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(trace_module, "run", broken)
    assert main(["trace", "synthetic"]) == 2
    assert "Broken pipe" in _one_error_line(capsys.readouterr().err, "trace")


def test_flag_hints_rewrite_only_known_keywords_of_the_command() -> None:
    msg = "x; pass labeled=True or labeled=False"
    assert flag_hints("convert", msg) == "x; pass --labeled or --unlabeled"
    assert flag_hints("convert", "out holds files; pass overwrite") == "out holds files; pass --overwrite"
    assert flag_hints("convert", "pass overwrite_store") == "pass overwrite_store"  # another keyword
    assert flag_hints("bench oracle", "pass skip_bad_lines=True") == "pass skip_bad_lines=True"  # no flag


# ---------------------------------------------------------------------- --plot
@pytest.mark.parametrize("command", [["trace", "synthetic"], ["bench", "cache"]])
def test_plot_without_matplotlib_is_refused_before_any_work(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" raises ImportError

    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the data was read before --plot was refused")

    monkeypatch.setattr(trace_module, "load_stream", no_work)
    out = tmp_path / "r.json"
    assert main([*command, "--plot", str(tmp_path / "p.png"), "--json", str(out)]) == 2
    io = capsys.readouterr()
    line = _one_error_line(io.err, "trace" if command[0] == "trace" else "bench cache")
    assert "--plot needs matplotlib" in line and "lightning-bagpipe[plot]" in line
    assert io.out == "" and not out.exists()


@pytest.mark.skipif(not has_matplotlib(), reason="--plot is refused without matplotlib")
@pytest.mark.parametrize("command", [["trace", "synthetic"], ["bench", "cache"]])
def test_json_is_written_before_the_plot(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing_plot(*args: Any) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(trace_module, "plot", failing_plot)
    monkeypatch.setattr(cache_suite, "plot", failing_plot)
    out = tmp_path / "r.json"
    flags = ["--scale", "0.001", "--batches", "4", "--batch-size", "128", "--lookahead", "2"]
    assert main([*command, *flags, "--plot", str(tmp_path / "p.png"), "--json", str(out)]) == 2
    assert "no space left" in capsys.readouterr().err
    assert json.loads(out.read_text())["batches" if command[0] == "trace" else "stream"]


@pytest.mark.parametrize(
    "command",
    [["bench", "oracle"], ["trace", "synthetic"], ["train", "--max-steps", "1", "--metrics-json"]],
    ids=["bench", "trace", "train"],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the command worked before refusing its output")

    monkeypatch.setattr(trace_module, "load_stream", no_work)
    monkeypatch.setattr(train_module, "_run", no_work)
    monkeypatch.setattr("lightning_bagpipe.bench.oracle.run", no_work)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    name = "train" if command[0] == "train" else " ".join(command[:2]) if command[0] == "bench" else "trace"
    flag = [] if command[0] == "train" else ["--json"]
    for path, why in [(tmp_path, "is a directory"), (a_file / "r.json", "a_file is a file")]:
        assert main([*command, *flag, str(path)]) == 2
        line = _one_error_line(capsys.readouterr().err, name.split(" --")[0])
        assert why in line and str(path) in line
    if command[0] == "train":  # the example scripts' own entry point too
        with pytest.raises(SystemExit) as stop:
            train_module.main(["--metrics-json", str(tmp_path)], model="deepfm")
        assert stop.value.code == 2 and "is a directory" in capsys.readouterr().err


@pytest.mark.skipif(not has_matplotlib(), reason="--plot is refused without matplotlib")
def test_a_plot_format_matplotlib_cannot_write_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the data was read before --plot was refused")

    monkeypatch.setattr(trace_module, "load_stream", no_work)
    for plot in ("p.txt", "p"):  # (without a suffix matplotlib wrote p.png, and the JSON named p)
        assert main(["trace", "synthetic", "--plot", str(tmp_path / plot)]) == 2
        line = _one_error_line(capsys.readouterr().err, "trace")
        assert "name a file of a format matplotlib writes" in line and ".png" in line


@pytest.mark.skipif(not has_matplotlib(), reason="--plot is refused without matplotlib")
def test_a_failed_plot_without_json_still_prints_the_figures(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def failing_plot(*args: Any) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(cache_suite, "plot", failing_plot)
    flags = ["--scale", "0.001", "--batches", "4", "--batch-size", "128", "--lookahead", "2"]
    assert main(["bench", "cache", *flags, "--plot", str(tmp_path / "p.png")]) == 2
    io = capsys.readouterr()
    assert "no space left" in io.err and json.loads(io.out)["stream"]


# ---------------------------------------------------------------------- bench oracle
ORACLE = ["bench", "oracle", "--batches", "4", "--batch-size", "256", "--scale", "0.002", "--lookahead", "2"]


def test_bench_oracle_raises_the_default_capacity_and_prints_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.json"
    assert main([*ORACLE, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["suite"] == "oracle" and "load_average" in r["machine"]  # (as every suite's JSON)
    need = r["stream"]["min_feasible_capacity"]
    assert r["config"]["capacity_rows"] == need > round(0.1 * r["stream"]["distinct_rows"])
    assert r["config"]["capacity_raised_to_minimum"] is True
    io = capsys.readouterr()
    notes = io.err.strip().splitlines()
    assert len(notes) == 1 and "note:" in notes[0] and f"using --capacity {need}" in notes[0]
    lines = io.out.splitlines()
    assert len(lines) <= 10 and not io.out.lstrip().startswith("{")  # a summary, not the JSON
    text = io.out
    assert "ms per batch" in text and "M ids/s" in text and f"capacity {need:,} rows" in text
    for policy in ("oracle", "LRU", "LFU", "Belady"):
        assert f"{r['fetched'][policy.lower()]:,}" in text
    assert lines[-1] == f"all the figures: {out}"

    # given explicitly, a capacity below the minimum is an error naming the minimum
    assert main([*ORACLE, "--capacity", "0.1"]) == 2
    line = _one_error_line(capsys.readouterr().err, "bench oracle")
    assert f"the minimum is --capacity {need} " in line
    assert main([*ORACLE, "--capacity", str(need), "--no-baselines"]) == 0
    io = capsys.readouterr()
    assert io.err == "" and "LRU" not in io.out and "(all the figures: --json PATH)" in io.out


# ---------------------------------------------------------------------- help
def test_help_describes_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for command in ("convert", "train", "trace", "bench"):
        assert f"\n    {command} " in text
    assert "--traceback" in text
    assert "add_arguments" not in text and "run(args)" not in text
