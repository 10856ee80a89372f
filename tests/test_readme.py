"""The README's quick-start snippet runs as written."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs(tmp_path: Path, monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python snippet"
    script = tmp_path / "quick_start.py"
    script.write_text(blocks[0])
    monkeypatch.chdir(tmp_path)
    ns = runpy.run_path(str(script))
    trainer, model = ns["trainer"], ns["model"]
    assert trainer.global_step == 20
    stats = trainer.strategy.cache_stats
    assert stats.steps == 20 and 0 < stats.hit_rate < 1
    user = ns["user_rows"]
    assert user.shape == (1000, 8)
    # the embeddings trained: exported rows differ from the seed initialisation
    fresh = type(model)()
    assert not torch.equal(fresh.emb.export()["user"], user)
