"""Hidden temporary files beside their target, named for the process that writes them.

Every all-or-nothing write of the library (checkpoint files and directories, converted Parquet files, a
vocabulary, a store's sidecar and bitmap, the shared copy of an in-RAM table) writes
``.<name>.<host>.<pid>.<random>.tmp`` next to its target (``<host>``: :func:`host_id`) and renames it
into place once complete. The leading dot keeps readers of a folder from taking a half-written file for
data; the host and pid let a later writer remove what a killed one left, and never what a live one is
writing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
from pathlib import Path

__all__ = ["TMP_SUFFIX", "host_id", "pid_alive", "remove_stale_temporaries", "temporary_path"]

TMP_SUFFIX = ".tmp"


def host_id() -> str:
    """This host's name, and its PID namespace where the system has one: a pid names a process only in its
    namespace, and containers that share a host name (``--network=host``) may share a folder too
    (``/dev/shm`` under ``--ipc=host``), so one must not take another's live writer for a dead one."""
    try:
        return f"{socket.gethostname()}-ns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def temporary_path(target: Path) -> Path:
    """A hidden name beside ``target``, unique to this process and call, to write ``target`` under."""
    unique = f"{host_id()}.{os.getpid()}.{secrets.token_hex(4)}"
    return target.with_name(f".{target.name}.{unique}{TMP_SUFFIX}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete the temporaries (files or directories) of ``target`` that dead processes of this host
    wrote; returns them."""
    prefix, host = f".{target.name}.", host_id()
    removed = []
    for p in target.parent.glob(f".{target.name}.*{TMP_SUFFIX}"):
        parts = p.name[len(prefix) : -len(TMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or pid_alive(int(parts[1])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed
