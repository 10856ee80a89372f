"""One run per store file: an advisory ``flock`` on a store's row file.

A process that opens or creates a store file holds the lock until it closes the store (or dies, even by
``kill -9``), so a second run on the same file is refused (:class:`StoreInUseError`) instead of
interleaving its writes with the first's. Stores of one process share its lock on a file (reopening is
allowed); in a multi-process run only rank 0 locks a shared file (:func:`locks_by_default`). The lock is
advisory and local to one machine: a network file system may not honour it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no locks
    fcntl = None  # type: ignore[assignment]

__all__ = ["RANK_VARIABLES", "StoreInUseError", "acquire", "locks_by_default", "release", "store_lock"]


class StoreInUseError(ValueError):
    """Another process holds the lock of a store file: another run is using it.

    ``path`` is the row file; ``pid`` the holder's process id when the system says (``/proc/locks``),
    else ``None``.
    """

    def __init__(self, path: str | os.PathLike[str], pid: int | None, what: str = "open it") -> None:
        self.path = Path(path)
        self.pid = pid
        self.what = what
        who = f"process {pid}" if pid else "another process (its pid is unknown)"
        super().__init__(
            f"store file {self.path} is in use by {who}, which holds its lock: another run has this store "
            f"open, so this one cannot {what} (two runs on one store overwrite each other's rows). Wait for "
            "that run to end or stop it, or give this run another file"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # (pickles: raised in one process, reported in another)
        return type(self), (self.path, self.pid, self.what)


#: Environment variables in which launchers (Lightning, torchrun, SLURM, MPI) give a process its rank.
#: A process where one of them is set to anything but ``0`` does not lock a store by default
#: (:func:`locks_by_default`): its rank 0 holds the lock for the whole run.
RANK_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "SLURM_PROCID",
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
)


def locks_by_default() -> bool:
    """Whether a store opened here with ``lock=None`` takes the lock: unless this process is a rank other
    than 0 of a multi-process run (:data:`RANK_VARIABLES`), whose files its rank 0 has locked already."""
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


@dataclass
class _Held:
    """This process's lock on one file: the descriptor holding it and how many stores use it."""

    fd: int | None  # None in a forked child: the parent holds the lock
    count: int
    inherited: bool = False


_HELD: dict[tuple[int, int], _Held] = {}  # by (st_dev, st_ino) of the locked file
_HELD_MUTEX = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child lets go of its copies of the lock descriptors (else the lock would outlive the
    parent's ``close()`` as long as the child lives: a data loader worker, say); stores it inherited, and
    reopenings of their files, stay allowed there (the parent holds the lock)."""
    global _HELD_MUTEX
    _HELD_MUTEX = threading.Lock()
    for held in _HELD.values():
        if held.fd is not None:
            with contextlib.suppress(OSError):
                os.close(held.fd)
        held.fd, held.inherited = None, True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _lock_holder(st: os.stat_result) -> int | None:
    """Pid of the process holding an exclusive ``flock`` on the file ``st`` describes, per ``/proc/locks``
    (``None``: not Linux, or the holder is not visible from here)."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 31499 fe:00:2146529 0 EOF" (a waiter has "->" after the number)
        cols = line.split()
        if len(cols) >= 6 and cols[1] == "FLOCK" and cols[3] == "WRITE" and cols[5] == where:
            with contextlib.suppress(ValueError):
                pid = int(cols[4])
                return pid if pid > 0 else None
    return None


def _try_flock(fd: int, path: Path, what: str) -> bool:
    """``flock`` ``fd`` without waiting: ``True`` if locked, ``False`` if the file system does not lock
    (warned); :class:`StoreInUseError` naming the holder if another process holds the lock."""
    assert fcntl is not None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StoreInUseError(path, _lock_holder(os.fstat(fd)), what) from None
        warnings.warn(
            f"could not lock store file {path} ({e}); nothing stops another run from using it at the "
            "same time",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    return True


def acquire(path: Path, fd: int | None = None) -> tuple[int, int] | None:
    """Lock ``path`` for this process, or count one more user of this process's lock on it; returns the
    key to :func:`release` (``None``: nothing to release). ``fd``: a descriptor of the file to hold the
    lock with (it is closed unless it becomes the holder); else one is opened."""
    if fcntl is None:
        if fd is not None:
            os.close(fd)
        return None
    if fd is None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    keep = False
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with _HELD_MUTEX:
            held = _HELD.get(key)
            if held is not None:  # this process has it open already (or inherited it): share the lock
                held.count += 1
                return key
            if not _try_flock(fd, path, "open it"):
                return None
            _HELD[key] = _Held(fd, 1)
            keep = True
            return key
    finally:
        if not keep:
            os.close(fd)


def release(key: tuple[int, int]) -> None:
    """One user of this process's lock on ``key`` less; the last one closes the descriptor, which lets go
    of the lock (never ``LOCK_UN``: a forked child's copy must not unlock its parent)."""
    with _HELD_MUTEX:
        held = _HELD.get(key)
        if held is None:
            return
        held.count -= 1
        if held.count > 0 or held.inherited:
            return
        del _HELD[key]
        if held.fd is not None:
            with contextlib.suppress(OSError):
                os.close(held.fd)


@contextlib.contextmanager
def store_lock(path: str | os.PathLike[str], what: str = "replace it") -> Iterator[None]:
    """Hold the lock of the store file ``path`` for the block (nothing if it does not exist): a
    :class:`StoreInUseError` naming the holder if another process has the store open. For whoever removes
    or replaces a store's files: no run can open the old file meanwhile. This process's own open stores
    do not count (it may replace its own file)."""
    p = Path(path)
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        yield
        return
    try:
        st = os.fstat(fd)
        with _HELD_MUTEX:
            mine = (st.st_dev, st.st_ino) in _HELD
        if not mine:
            _try_flock(fd, p, what)
        yield
    finally:
        os.close(fd)
