"""Smoke test: the distributed benchmark suite runs its contenders and writes valid JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning_bagpipe.cli import main
from tests.helpers import has_matplotlib


def test_bench_distributed_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "dist.json"
    plot = tmp_path / "dist.png"
    code = main(
        [
            "bench",
            "distributed",
            "--steps",
            "5",
            "--warmup",
            "2",
            "--batch-size",
            "256",
            "--scale",
            "0.002",
            "--cache-rows",
            "20000",
            "--delay-ms",
            "0,5",
            "--json",
            str(out),
            *(["--plot", str(plot)] if has_matplotlib() else []),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    if has_matplotlib():
        assert plot.stat().st_size > 0 and result["plot"] == str(plot)
    assert result["machine"]["cpus"] == os.cpu_count() and "load_average" in result["machine"]
    assert set(result["contenders"]) == {
        f"{name}@{d}ms" for name in ("prefetch", "sync_fetch", "replicate") for d in (0, 5)
    }
    for name, figures in result["contenders"].items():
        assert figures["samples_per_second"] > 0
        bd = figures["breakdown_ms"]  # rank 0's step-time breakdown
        assert bd["forward_ms"] > 0 and bd["backward_ms"] > 0 and bd["step_ms"] > 0
        if name.startswith("replicate"):  # every row of every step is all-reduced
            assert bd["cache_sync_ms"] > 0
        assert 0 < figures["sync_bytes_per_step"] <= figures["replicated_baseline_bytes_per_step"]
    checks = result["checks"]
    assert all(checks[f"{key}_loss_decreased"] is True for key in result["contenders"])
    # when rows arrive never changes what is computed; other plans only the order of a row's sums
    assert checks["max_abs_loss_diff_across_latencies_and_repeats"] == 0.0
    assert 0.0 <= checks["max_abs_loss_diff_sync_fetch_vs_prefetch"] < 1e-5
    assert 0.0 <= checks["max_abs_loss_diff_replicate_vs_prefetch"] < 1e-5
    assert result["ratios"]["sync_bytes_over_full_replication"] < 1.0
    # the replicated baseline sends exactly what the baseline formula says it does
    assert abs(result["ratios"]["replicate_sync_bytes_over_full_replication"] - 1.0) < 1e-9
