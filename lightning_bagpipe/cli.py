"""The ``lightning-bagpipe`` command: ``bench SUITE``, ``convert``, ``train``, ``trace``.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``; this file
only wires them up, importing a module when its command runs. A bench suite may also expose
``summary(result) -> str`` (printed instead of the JSON) and ``plot(result, path)`` (called after the
JSON is written, so a failed plot never loses the figures).

Errors a user can fix (``ValueError`` and ``OSError``: bad data or flags, a missing or existing file) are
reported as one ``lightning-bagpipe COMMAND: error: MESSAGE`` line with exit status 2, as argparse reports
bad flags; ``--traceback`` shows the Python traceback instead. Anything else (``TypeError``,
``RuntimeError``, ...) is a bug or a failure of the environment and keeps its traceback. A reader that
closes the output early (``lightning-bagpipe trace DATA | head``) is no error: the command stops quietly
with status 141, as a tool killed by ``SIGPIPE`` does (see :func:`_stop_writing`). The library's
messages name keyword arguments (``pass skip_bad_lines=True``); :data:`FLAG_HINTS` rewrites them into
the command's flags (``pass --skip-bad-lines``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import select
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO, cast

from lightning_bagpipe.arguments import output_file

DESCRIPTION = """\
Train recommendation models (DeepFM, DLRM) whose embedding tables are larger
than memory, with a lookahead embedding cache; prepare Criteo data for them,
size the cache your data needs, and run the benchmarks.

Run 'lightning-bagpipe COMMAND --help' for the options of a command."""
EPILOG = """\
Errors in the data or the options are reported in one line (exit status 2);
add --traceback to the command to see the Python traceback instead."""

BENCH_SUITES = {
    "oracle": (
        "lightning_bagpipe.bench.oracle",
        "oracle planning speed and rows fetched vs LRU, LFU, Belady",
    ),
    "distributed": (
        "lightning_bagpipe.bench.distributed",
        "2 processes: prefetch vs synchronous fetch vs full replication, by store latency",
    ),
    "train": (
        "lightning_bagpipe.bench.train",
        "DeepFM samples/s: bagpipe vs ideal, plain Lightning, TorchRec, floor",
    ),
    "cache": (
        "lightning_bagpipe.bench.cache",
        "rows fetched over a capacity sweep: oracle vs LRU, LFU, Belady",
    ),
    "scale": ("lightning_bagpipe.bench.scale", "a 2**28-row table in a file store: speed, memory, disk"),
}
COMMANDS = {
    "convert": ("lightning_bagpipe.data.convert", "convert Criteo TSV files (plain or gzip) to Parquet"),
    "train": (
        "lightning_bagpipe.models.train",
        "train DeepFM or DLRM on synthetic data, Criteo TSV or Parquet",
    ),
    "trace": ("lightning_bagpipe.trace", "measure your data's access skew and the cache size it needs"),
}
#: Per command: a keyword hint of the library (``pass KEYWORD``) -> the flags that do the same.
FLAG_HINTS: dict[str, dict[str, str]] = {
    "convert": {
        "skip_bad_lines=True": "--skip-bad-lines",
        "labeled=True or labeled=False": "--labeled or --unlabeled",
        "overwrite": "--overwrite",
    },
    "train": {
        "skip_bad_lines=True": "--skip-bad-lines",
        "labeled=True or labeled=False": "--labeled or --unlabeled",
    },
    "trace": {
        "skip_bad_lines=True": "--skip-bad-lines",
        "labeled=True or labeled=False": "--labeled or --unlabeled",
    },
    "bench cache": {
        "skip_bad_lines=True": "--skip-bad-lines",
        "labeled=True or labeled=False": "--labeled or --unlabeled",
    },
}
#: The error types reported in one line (see the module docstring).
USER_ERRORS = (ValueError, OSError)
#: Exit status after the output was closed early: 128 + SIGPIPE (13), what a shell reports for a tool that
#: ``SIGPIPE`` killed (``yes | head``), so ``set -o pipefail`` scripts see the same as with other tools.
EXIT_BROKEN_PIPE = 141


def _module(name: str) -> Any:
    return importlib.import_module(name)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the module of the command (or bench suite) named in ``argv`` is imported."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="lightning-bagpipe",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--traceback", action="store_true", help="on an error, show the Python traceback, not one line"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd, (mod, help_text) in COMMANDS.items():
        p = sub.add_parser(cmd, help=help_text, description=_sentence(help_text), parents=[common])
        if argv[:1] == [cmd]:
            _module(mod).add_arguments(p)
            p.set_defaults(_run=mod)
    bench = sub.add_parser(
        "bench",
        help="run a benchmark suite: " + ", ".join(BENCH_SUITES),
        description="Run a benchmark suite.",
    )
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for suite, (mod, help_text) in BENCH_SUITES.items():
        p = suites.add_parser(suite, help=help_text, description=_sentence(help_text), parents=[common])
        if argv[:2] == ["bench", suite]:
            p.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
            _module(mod).add_arguments(p)
            p.set_defaults(_run=mod)
    return parser


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def flag_hints(command: str, message: str) -> str:
    """``message`` with the library's keyword hints (``pass skip_bad_lines=True``) turned into the flags
    of ``command`` (``pass --skip-bad-lines``); hints without a flag in :data:`FLAG_HINTS` are kept. A
    cache too small (the oracle's message names ``cache_rows``) gets a note naming ``--cache-rows``, for
    the commands that have it (:data:`GROWING_CACHE`)."""
    for keyword, flags in FLAG_HINTS.get(command, {}).items():
        message = re.sub(rf"\bpass {re.escape(keyword)}(?![\w=])", f"pass {flags}", message)
    if command in GROWING_CACHE and "cache_rows" in message and "[here: " not in message:  # (once)
        message += f" [{cache_rows_note(message, GROWING_CACHE[command])}]"
    return message


#: Commands with a ``--cache-rows`` flag, and how each asks for a cache that grows (None: it cannot).
GROWING_CACHE: dict[str, str | None] = {
    "train": "no --cache-rows",
    "bench train": "--cache-rows 0",
    "bench scale": None,
    "bench distributed": None,
}


def cache_rows_note(message: str, grow: str | None) -> str:
    """Which ``--cache-rows`` the oracle's message (``... cache_rows ... at least N ...``) asks for."""
    least = re.search(r"cache_rows\b[^.;]*? at least (\d+)", message)
    rows = f"--cache-rows {least[1]} or more" if least else "a larger --cache-rows"
    return f"here: {rows}" + (f", or {grow} for a cache that grows" if grow else "")


class _TrackedStream:
    """A text stream that remembers whether its last write ended a line (``convert``'s progress line
    does not until it finishes), so an error message can start on a line of its own."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names (default ``sys.argv[1:]``); 0 on success, 2 on a user error, 141
    when the output was closed early (:data:`EXIT_BROKEN_PIPE`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    command = f"bench {args.suite}" if args.command == "bench" else args.command
    show_traceback = vars(args).pop("traceback")  # the CLI's own flag: not passed on to the command
    stderr = _TrackedStream(sys.stderr)
    try:
        with contextlib.redirect_stderr(cast(TextIO, stderr)):
            _run(args)
    except USER_ERRORS as err:
        # A BrokenPipeError is no error when the reader of our output has gone (`| head`); another pipe
        # that broke (to a worker process, ...) is reported like any OSError.
        if isinstance(err, BrokenPipeError) and (closed := _closed_outputs()):
            return _stop_writing(closed)
        if show_traceback:
            raise
        message = str(err)
    except SystemExit as err:  # a command's own "raise SystemExit('message')"
        if show_traceback or not isinstance(err.code, str):
            raise
        message = err.code
    else:
        return 0
    newline = "" if stderr.at_line_start else "\n"
    sys.stderr.write(f"{newline}lightning-bagpipe {command}: error: {flag_hints(command, message)}\n")
    return 2


def _closed_outputs() -> list[int]:
    """The file descriptors of stdout and stderr that are pipes whose reader has gone.

    ``poll`` reports an error on the write end of such a pipe. Where it cannot tell (no ``poll``, a
    stream that is no real file), the answer is "not closed", so the error is reported as before.
    """
    closed = []
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            if any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
                closed.append(fd)
        except (AttributeError, OSError, ValueError):
            continue
    return closed


def _stop_writing(fds: list[int]) -> int:
    """Stop quietly after writing to a closed pipe; returns :data:`EXIT_BROKEN_PIPE`.

    Python ignores ``SIGPIPE`` and raises ``BrokenPipeError`` instead. As the Python documentation's
    recipe says (``signal`` module, "Note on SIGPIPE"), the closed outputs ``fds`` are pointed at
    ``/dev/null``, so that flushing them at exit does not fail again ("Exception ignored ...
    BrokenPipeError"); no message is printed: the reader asked for no more output.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    return EXIT_BROKEN_PIPE


def _run(args: argparse.Namespace) -> None:
    """Run the parsed command; a bench suite's results go to ``--json``, then stdout, then its plot (so a
    plot that fails loses no figures)."""
    _check_outputs(args)  # before any work, not after it
    module = _module(args._run)
    result = module.run(args)
    if args.command != "bench":
        return
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    summary = getattr(module, "summary", None)
    if summary is None:
        print(text)
    else:
        print(summary(result))
        print("(all the figures: --json PATH)" if args.json is None else f"all the figures: {args.json}")
    if getattr(args, "plot", None) is not None:
        sys.stdout.flush()
        module.plot(result, args.plot)


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse ``--json`` and ``--plot`` paths that cannot be written, and ``--plot`` without matplotlib or
    of a format it cannot write, before the command does any work."""
    for flag in ("json", "plot", "metrics_json"):
        output_file(f"--{flag.replace('_', '-')}", getattr(args, flag, None))
    plot = getattr(args, "plot", None)
    if plot is None:
        return
    from lightning_bagpipe.bench.common import require_matplotlib

    try:
        plt = require_matplotlib()
    except RuntimeError as err:
        raise ValueError(str(err)) from None
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if Path(plot).suffix.lstrip(".").lower() not in formats:
        known = ", ".join(f".{f}" for f in sorted(formats))
        raise ValueError(f"--plot {plot}: name a file of a format matplotlib writes ({known})")


if __name__ == "__main__":
    sys.exit(main())
