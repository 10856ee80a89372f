"""Every benchmark suite refuses bad counts and sizes before any work, naming the flag."""

from __future__ import annotations

import pytest

from lightning_bagpipe.cli import main

CASES = [
    ("distributed", ["--warmup", "0"], "--warmup must be >= 1, got 0"),
    ("distributed", ["--repeats", "0"], "--repeats must be >= 1, got 0"),
    ("distributed", ["--steps", "2", "--warmup", "2"], "--steps must be more than --warmup"),
    ("distributed", ["--batch-size", "1"], "--batch-size must be >= 2, got 1"),
    ("distributed", ["--scale", "nan"], "--scale must be a finite number > 0, got nan"),
    ("train", ["--threads", "0"], "--threads must be >= 1, got 0"),
    ("train", ["--zipf", "nan"], "--zipf must be a finite number > 0, got nan"),
    ("train", ["--scale", "inf"], "--scale must be a finite number > 0, got inf"),
    ("oracle", ["--zipf", "nan"], "--zipf must be a finite number > 0, got nan"),
    ("oracle", ["--scale", "-1"], "--scale must be a finite number > 0, got -1.0"),
    ("scale", ["--buffer-mib", "0"], "--buffer-mib must be >= 1, got 0"),
    ("cache", ["--scale", "inf"], "--scale must be a finite number > 0, got inf"),
    ("cache", ["--zipf", "nan"], "--zipf must be a finite number >= 0, got nan"),
    ("scale", ["--zipf", "0"], "--zipf must be a finite number > 0, got 0.0"),
]


@pytest.mark.parametrize(("suite", "flags", "message"), CASES, ids=[f"{c[0]}{c[1]}" for c in CASES])
def test_a_bad_count_or_size_is_one_error_line_before_any_work(
    suite: str, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", suite, *flags]) == 2  # (no work: a suite that started would take seconds)
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lightning-bagpipe bench {suite}: error: ") and message in err, err


def test_a_cache_too_small_names_the_suites_flag(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--steps", "2", "--warmup", "1", "--repeats", "1", "--batch-size", "256", "--scale", "0.002"]
    assert main(["bench", "train", *flags, "--contenders", "bagpipe", "--cache-rows", "10"]) == 2
    err = capsys.readouterr().err
    assert err.count("[here: --cache-rows ") == 1, err
    assert err.rstrip().endswith("or more, or --cache-rows 0 for a cache that grows]"), err


@pytest.mark.parametrize("value", ["inf", "1e30", "nan"])
def test_trace_names_a_scale_out_of_range(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    # (inf and 1e30 ended in an OverflowError traceback, nan in "cannot convert float NaN to integer")
    assert main(["trace", "synthetic", "--batches", "2", "--batch-size", "8", "--scale", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-bagpipe trace: error: ") and "Traceback" not in err, err
    assert ("--scale must be a finite number > 0" if value != "1e30" else "scale 1e+30 makes tables") in err
