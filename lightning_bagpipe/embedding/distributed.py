"""Stores and communication for several processes (LRPP).

* :class:`RankGroups`: this rank, the world size and two process groups of their own: ``grads`` (the
  main thread's per-step all-reduce of replicated rows' gradients) and ``store`` (the executor thread's
  per-step barrier and the sharded store's all-to-alls). Each group is used by one thread only, in the
  same order on every rank, as gloo requires.
* :func:`share_store`: one store for all ranks of a node: a memory-mapped file (the module's own
  ``MmapStore`` file, or a new one in ``/dev/shm`` filled by rank 0 from its in-RAM store).
* :class:`ShardedStore`: rows split into ``world_size`` contiguous ranges, rank ``r`` authoritative for
  range ``r``; reads and writes are collective all-to-alls with variable splits (works on gloo and NCCL).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_bagpipe.embedding.store import EmbeddingStore, MmapStore
from lightning_bagpipe.embedding.tiered_store import TieredStore
from lightning_bagpipe.temporaries import remove_stale_temporaries, temporary_path


@dataclass
class RankGroups:
    """Who we are among the ranks, and the process groups the cache uses."""

    rank: int
    world_size: int
    grads: Any
    store: Any

    def barrier(self) -> None:
        dist.barrier(group=self.store)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.store)
        return box[0]

    def destroy(self) -> None:
        """Release the cache's own process groups (after every rank is done with them)."""
        self.barrier()
        for group in (self.grads, self.store):
            dist.destroy_process_group(group)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.store)
        return out


_SHM_NAME = "lightning-bagpipe"
"""The shared copies of in-RAM tables are folders ``.lightning-bagpipe.<host>.<pid>.<random>.tmp`` of the
shared-memory file system."""


def _shm_root() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _size_text(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _shm_need(store: EmbeddingStore) -> int:
    """Bytes a shared copy of ``store`` takes: its rows in whole pages, and a page for the sidecar."""
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    return -(-store.nbytes // page) * page + page


def _shm_problem(root: str, store: EmbeddingStore, name: str, st: os.statvfs_result) -> str:
    """The error of a shared store that does not fit in ``root`` (whose ``statvfs`` is ``st``)."""
    need = _shm_need(store)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    if root == "/dev/shm":
        room = (
            f"a larger /dev/shm (a Docker container's is 64 MiB unless it is started with --shm-size: "
            f"docker run --shm-size=N with N of at least {_size_text(total - free + need)}, more if data "
            "loader workers use it too)"
        )
    else:
        room = f"{_size_text(need - free)} more free space in {root}"
    return (
        f"BagpipeStrategy(store='shared') (the default on one node) copies the in-RAM table of "
        f"{name or 'the embedding'} ({store.num_rows:,} rows x {store.width} floats: {_size_text(need)}) "
        f"into {root} for the ranks of this node to share, but {root} has {_size_text(free)} free of "
        f"{_size_text(total)}. Options: {room}; or BagpipeStrategy(store='sharded') (each rank keeps its "
        "share of the rows in its own RAM); or the tables in a file that every rank maps: "
        "CachedEmbedding(..., store='path/to/tables.f32')"
    )


def _shm_shortfall(root: str, store: EmbeddingStore, name: str) -> str | None:
    """Why the tables of ``store`` do not fit in ``root`` (``None``: they do, or the system cannot say).
    Checked before the file is made: once a shared mapping of a full tmpfs is written, the process dies
    of SIGBUS ("Bus error") instead of raising."""
    try:
        st = os.statvfs(root)
    except (OSError, AttributeError):
        return None
    return None if st.f_bavail * st.f_frsize >= _shm_need(store) else _shm_problem(root, store, name, st)


def _reserve(path: str, nbytes: int) -> bool:
    """Allocate every block of the new file ``path`` now (``posix_fallocate``), so that writing its mapping
    cannot end in SIGBUS if the space went to another process since it was checked. ``False`` if the space
    is not there; ``True`` once reserved, or where the system cannot reserve it."""
    if not hasattr(os, "posix_fallocate"):
        return True
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as err:
        return err.errno not in (errno.ENOSPC, errno.EDQUOT)  # (else not supported here: EOPNOTSUPP...)
    finally:
        os.close(fd)
    return True


def store_place(store: EmbeddingStore) -> tuple[str, str, int, int] | None:
    """Where a store's rows are, to tell whether ranks share one: a file's host, real path, and the
    device and inode of the file it mapped when it opened; ``None`` for an in-RAM store (rank 0 shares
    it; a file store's ranks must already share the file)."""
    if not isinstance(store, MmapStore):
        return None
    return (socket.gethostname(), os.path.realpath(store.path), *store.file_id)


def share_store(
    store: EmbeddingStore, groups: RankGroups, name: str
) -> tuple[EmbeddingStore, Callable[[bool], None]]:
    """One store for every rank of the node; returns it and a function that ends the sharing.

    An ``MmapStore`` is already shared: every rank maps the same file. An in-RAM store is copied by rank 0
    into a new file in ``/dev/shm`` that the others then map; ending the sharing copies the trained rows
    back into each rank's own in-RAM store and removes the file (``end(collective=False)`` after a failure
    on another rank: no barrier).
    """
    if isinstance(store, TieredStore):
        raise ValueError(
            f"{store.describe()} keeps written rows in its own process's RAM, so the ranks of a node "
            "cannot share it: use BagpipeStrategy(store='sharded')"
        )
    if isinstance(store, MmapStore):
        store.flush()
        groups.barrier()
        return store, lambda collective: None
    path = None
    short: str | None = None  # why the tables do not fit where they would be shared
    if groups.rank == 0:
        root = _shm_root()
        # named for this process (temporaries), so that a later run removes what a killed one left (first:
        # the space it holds may be what this table needs)
        remove_stale_temporaries(Path(root) / _SHM_NAME)
        short = _shm_shortfall(root, store, name)
        if short is None:
            folder = str(temporary_path(Path(root) / _SHM_NAME))
            os.makedirs(folder)
            path = os.path.join(folder, f"{name or 'embedding'}.rows")
            shared = MmapStore(path, num_rows=store.num_rows, width=store.width, mode="create")
            if not _reserve(path, shared.nbytes):
                shared.close()
                shutil.rmtree(folder, ignore_errors=True)
                short = _shm_problem(root, store, name, os.statvfs(root))
        if short is None:
            shared.write_range(0, store.tensor())
            shared.set_metadata(**store.metadata)
            shared.flush()
    path, short = groups.broadcast_object((path, short))  # (every rank raises, not only rank 0)
    if short is not None:
        raise RuntimeError(short if groups.rank == 0 else f"rank 0 could not share the tables: {short}")
    if groups.rank != 0:
        shared = MmapStore(path, mode="open")
    groups.barrier()

    def end(collective: bool = True) -> None:
        shared.flush()
        store.write_range(0, shared.tensor())
        if collective:
            groups.barrier()
        shared.close()
        if groups.rank == 0:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)

    return shared, end


def shard_store(store: EmbeddingStore, groups: RankGroups) -> tuple[EmbeddingStore, Callable[[bool], None]]:
    """Rows of ``store`` sharded across ranks; returns the sharded view and a function ending it.

    Ending gathers every shard into each rank's own store and flushes it (a file store then reopens with
    the whole table); ``end(collective=False)`` (after a failure on another rank) skips that, leaving each
    rank's store current for its own shard only.
    """
    sharded = ShardedStore(store, groups)

    def end(collective: bool = True) -> None:
        if collective:
            sharded.gather_to_local()
            store.flush()

    return sharded, end


class ShardedStore(EmbeddingStore):
    """Rows sharded across ranks; every read and write is a collective call on ``groups.store``.

    Rank ``r`` is authoritative for rows ``[bounds[r], bounds[r+1])`` of its ``local`` store (the other
    rows of ``local`` are ignored while sharded).
    """

    def __init__(self, local: EmbeddingStore, groups: RankGroups) -> None:
        super().__init__(local.num_rows, local.width)
        self.local = local
        self.groups = groups
        self.metadata = local.metadata
        self._table = local._t()  # for closed checks only: rows go through local's read and write
        w = groups.world_size
        self.bounds = (np.arange(w + 1, dtype=np.int64) * self.num_rows) // w
        self.bytes_sent = 0

    def describe(self) -> str:
        return f"ShardedStore(rank {self.groups.rank} of {self.groups.world_size})"

    def set_metadata(self, **kv: Any) -> None:
        self.local.set_metadata(**kv)

    def read(self, ids: Any) -> Tensor:
        ids_np = _as_ids(ids)
        order, send_counts, recv_counts = self._route(ids_np)
        req = self._exchange(torch.from_numpy(ids_np[order]), send_counts, recv_counts)
        rows = self.local.read(req.numpy()) if req.numel() else torch.zeros(0, self.width)
        got = self._exchange(rows, recv_counts, send_counts)
        out = torch.empty(ids_np.size, self.width)
        out[torch.from_numpy(order)] = got
        return out

    def read_into(self, ids: Any, out: Tensor) -> None:
        out.copy_(self.read(ids))

    def write(self, ids: Any, rows: Tensor, check_unique: bool = False) -> None:
        ids_np = _as_ids(ids)
        order, send_counts, recv_counts = self._route(ids_np)
        t_order = torch.from_numpy(order)
        got_ids = self._exchange(torch.from_numpy(ids_np[order]), send_counts, recv_counts)
        got_rows = self._exchange(rows.detach().cpu().to(torch.float32)[t_order], send_counts, recv_counts)
        if got_ids.numel():
            self.local.write(got_ids.numpy(), got_rows, check_unique=False)

    def read_range(self, start: int, stop: int) -> Tensor:
        return self.read(np.arange(start, stop, dtype=np.int64))

    def write_range(self, start: int, rows: Tensor) -> None:
        self.write(np.arange(start, start + rows.shape[0], dtype=np.int64), rows)

    def tensor(self) -> Tensor:
        """The whole table, gathered from every shard (collective)."""
        self.gather_to_local()
        return self.local.tensor()

    def gather_to_local(self) -> None:
        """Every rank's ``local`` store receives every shard (collective; used when sharding ends)."""
        sizes = (self.bounds[1:] - self.bounds[:-1]).tolist()
        longest = max(sizes)
        lo = int(self.bounds[self.groups.rank])
        mine = torch.zeros(longest, self.width)  # gloo's all_gather needs equal sizes: pad
        mine[: sizes[self.groups.rank]] = self.local.read_range(lo, lo + sizes[self.groups.rank])
        parts = [torch.empty(longest, self.width) for _ in sizes]
        dist.all_gather(parts, mine, group=self.groups.store)
        for r, part in enumerate(parts):
            if r != self.groups.rank and sizes[r]:
                self.local.write_range(int(self.bounds[r]), part[: sizes[r]])

    def flush(self) -> None:
        self.local.flush()

    def close(self) -> None:
        """Ends nothing: the local store belongs to the module."""

    # routing ----------------------------------------------------------------------------------
    def _route(self, ids: np.ndarray) -> tuple[np.ndarray, Tensor, Tensor]:
        owner = np.searchsorted(self.bounds, ids, side="right") - 1
        order = np.argsort(owner, kind="stable")
        send = torch.from_numpy(np.bincount(owner, minlength=self.groups.world_size).astype(np.int64))
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.groups.store)
        return order, send, recv

    def _exchange(self, data: Tensor, send_counts: Tensor, recv_counts: Tensor) -> Tensor:
        out = torch.empty((int(recv_counts.sum()), *data.shape[1:]), dtype=data.dtype)
        dist.all_to_all_single(
            out,
            data.contiguous(),
            output_split_sizes=recv_counts.tolist(),
            input_split_sizes=send_counts.tolist(),
            group=self.groups.store,
        )
        per_item = data[0].numel() if data.dim() > 1 and len(data) else 1
        to_others = int(send_counts.sum()) - int(send_counts[self.groups.rank])
        self.bytes_sent += to_others * per_item * data.element_size()
        return out


def _as_ids(ids: Any) -> np.ndarray:
    if isinstance(ids, Tensor):
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids, dtype=np.int64)


__all__ = ["RankGroups", "ShardedStore", "shard_store", "share_store"]
