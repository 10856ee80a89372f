"""The ``lightning-bagpipe`` command: ``bench SUITE``, ``convert``, ``train``, ``trace``.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``; this file
only wires them up, importing a module when its command runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_SUITES = {
    "oracle": "lightning_bagpipe.bench.oracle",
    "distributed": "lightning_bagpipe.bench.distributed",
    "train": "lightning_bagpipe.bench.train",
    "cache": "lightning_bagpipe.bench.cache",
    "scale": "lightning_bagpipe.bench.scale",
}
COMMANDS = {
    "convert": ("lightning_bagpipe.data.convert", "stream a Criteo TSV file or folder into Parquet"),
    "train": ("lightning_bagpipe.models.train", "train DeepFM or DLRM (what examples/*.py run)"),
    "trace": ("lightning_bagpipe.trace", "access skew and the cache size your data needs"),
}


def _module(name: str) -> Any:
    return importlib.import_module(name)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the module of the command (or bench suite) named in ``argv`` is imported."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="lightning-bagpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run a benchmark suite and write its figures as JSON")
    suites = bench.add_subparsers(dest="suite", required=True)
    for suite, mod in BENCH_SUITES.items():
        p = suites.add_parser(suite, help=f"benchmark suite '{suite}'")
        if argv[:2] == ["bench", suite]:
            p.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
            _module(mod).add_arguments(p)
            p.set_defaults(_run=mod)
    for cmd, (mod, help_text) in COMMANDS.items():
        p = sub.add_parser(cmd, help=help_text)
        if argv[:1] == [cmd]:
            _module(mod).add_arguments(p)
            p.set_defaults(_run=mod)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    result = _module(args._run).run(args)
    if args.command == "bench":
        text = json.dumps(result, indent=2, sort_keys=True)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text + "\n")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
