"""Multi-process bagpipe checkpoints: a directory holding one table shard per rank, and a manifest.

With several processes, ``strategy="bagpipe"`` saves a checkpoint as a **directory** (named like the file
Lightning asked for, e.g. ``ckpts/step=100.ckpt/``). No rank gathers the tables: each rank writes the rows
it is authoritative for.

``manifest.json``
    Written last, by rank 0. Format and version, the world size, per CachedEmbedding the shard files and
    their row ranges, and for *every* file of the directory its size in bytes and CRC-32.
``checkpoint.pt``
    Rank 0's Lightning checkpoint (dense weights, optimizer states, loops, loader position, callbacks)
    *without* the ``<module>.rows`` tensors, and a ``"bagpipe"`` section of layout ``"sharded"`` (format
    version 2) with each module's table configuration. Loads with ``torch.load(weights_only=True)``, and
    with ``Model.load_from_checkpoint(..., strict=False)`` (tables left at their initial values).
``<module>.rows.<r>-of-<W>.npy``
    Rows ``[r*N//W, (r+1)*N//W)`` of the module's store (weights and sparse-optimizer state), a plain
    float32 ``.npy`` array, written by rank ``r``: for ``store="sharded"`` the rank's own shard (read from
    ``ShardedStore.local``), for ``store="shared"`` the same range of the one shared file.
``rank.<r>-of-<W>.pt``
    Rank ``r``'s RNG states (torch, CUDA, numpy, ``random``), written by rank ``r``.

A save is atomic at the directory level: rank 0 creates a temporary directory next to the target and
broadcasts its name; every rank writes and fsyncs its files there; the ranks exchange what they wrote (or
the error that stopped them); rank 0 writes ``checkpoint.pt`` and the manifest, fsyncs the directory and
swaps it into place (``renameat2(RENAME_EXCHANGE)`` when the filesystem has it, else two renames), then
tells every rank the outcome. A crash or ``kill -9`` at any point leaves the previous checkpoint intact.

Loading (:func:`load_bagpipe_checkpoint`) checks the manifest, every file's size and CRC-32 and the table
configuration, then copies *all* rows into each rank's store, so a checkpoint resumes on any number of
processes (the rows are re-sharded by whatever store the run uses). Per-rank RNG states are restored only
when the world size is the one that saved them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import types
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_bagpipe.__about__ import __version__
from lightning_bagpipe.embedding.cached import ROWS_IN_PLACE, CachedEmbedding
from lightning_bagpipe.embedding.distributed import ShardedStore
from lightning_bagpipe.embedding.init import INIT_RECIPE
from lightning_bagpipe.embedding.store import EmbeddingStore, fsync_dir
from lightning_bagpipe.strategies.checkpointing import (
    _OLD_SUFFIX,
    SECTION,
    SHARDED_VERSION,
    WRITTEN_ROWS_VERSION,
    AtomicCheckpointIO,
    RngSnapshot,
    _install,
    _io_failure,
    _local_path,
    _remove,
    _rows_key,
    add_bagpipe_section,
    capture_rng_states,
    check_replaceable,
    read_checkpoint,
    verify_bagpipe_section,
)
from lightning_bagpipe.temporaries import host_id, pid_alive, remove_stale_temporaries, temporary_path

__all__ = [
    "MANIFEST",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "META",
    "Comm",
    "LocalComm",
    "WorldComm",
    "is_sharded_checkpoint",
    "load_bagpipe_checkpoint",
    "load_checkpoint_for_inference",
    "read_sharded_checkpoint",
    "row_bounds",
    "rows_left_out",
    "save_sharded_checkpoint",
]

#: Name of the manifest inside a directory checkpoint.
MANIFEST = "manifest.json"
#: Name of rank 0's Lightning checkpoint (without table rows) inside a directory checkpoint.
META = "checkpoint.pt"
#: ``format`` field of the manifest.
MANIFEST_FORMAT = "lightning-bagpipe-sharded-checkpoint"
#: ``version`` field of the manifest; this library reads versions <= MANIFEST_VERSION. Version 2 adds shards
#: in the written-rows layout (``ids_file``, ``init_seed``, ``init_state``); manifests without them stay 1.
MANIFEST_VERSION = 2

_CHUNK = 16 << 20

M = TypeVar("M", bound=pl.LightningModule)


# ---------------------------------------------------------------------------------------------- ranks
class Comm(Protocol):
    """What a directory save needs from the ranks: who we are, broadcast, all-gather (picklable objects)."""

    rank: int
    world_size: int

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...

    def all_gather(self, obj: Any) -> list[Any]: ...


class LocalComm:
    """One process: the collectives are identities (for ``world_size == 1`` and for tests)."""

    rank = 0
    world_size = 1

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]


class WorldComm:
    """The ranks of torch.distributed's default group (called from the main thread only, like Lightning)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _agree(comm: Comm, error: BaseException | None, what: str) -> None:
    """Every rank raises if any rank failed (so no rank walks on into a collective and hangs)."""
    text = None if error is None else f"{type(error).__name__}: {error}"
    outcomes = comm.all_gather(text)
    if error is not None:
        raise error
    for r, message in enumerate(outcomes):
        if message is not None:
            raise RuntimeError(f"{what} failed on rank {r}: {message}")


def row_bounds(num_rows: int, world_size: int) -> np.ndarray:
    """Rank ``r`` holds rows ``[b[r], b[r+1])``: the same contiguous split as :class:`ShardedStore`."""
    return (np.arange(world_size + 1, dtype=np.int64) * int(num_rows)) // int(world_size)


# ---------------------------------------------------------------------------------------------- state dict
@contextlib.contextmanager
def rows_left_out(modules: Iterable[CachedEmbedding]) -> Iterator[None]:
    """While active, ``state_dict()`` leaves the ``<module>.rows`` tensors of ``modules`` out.

    A directory checkpoint saves the rows as per-rank shards, so the state dict must not hold them: for a
    sharded store, building ``<module>.rows`` would gather every shard onto every rank.
    """
    patched: list[CachedEmbedding] = []
    try:
        for m in modules:
            m.__dict__["_save_to_state_dict"] = types.MethodType(nn.Module._save_to_state_dict, m)
            patched.append(m)
        yield
    finally:
        for m in patched:
            m.__dict__.pop("_save_to_state_dict", None)


def _authoritative_rows(
    module: CachedEmbedding, rank: int, world_size: int
) -> tuple[int, int, EmbeddingStore, np.ndarray | None]:
    """Rows ``[lo, hi)`` this rank saves, the store that holds them here, and, where that store keeps
    track of written rows, the ids of the rows of the range it has written (else ``None``: all of them)."""
    store = module.store
    bounds = row_bounds(store.num_rows, world_size)
    if isinstance(store, ShardedStore):
        if store.groups.world_size != world_size or not np.array_equal(store.bounds, bounds):
            raise RuntimeError(
                f"the sharded store of {module!r} splits rows over {store.groups.world_size} ranks, "
                f"the checkpoint over {world_size}"
            )
        source: EmbeddingStore = store.local  # rank r is authoritative for its range of its local store
    else:
        source = store  # an unshared store of a finished run, or the one file all ranks share
    lo, hi = int(bounds[rank]), int(bounds[rank + 1])
    return lo, hi, source, source.written_ids(lo, hi)


# ---------------------------------------------------------------------------------------------- save
def _shard_name(module: str, rank: int, world_size: int) -> str:
    return f"{_rows_key(module)}.{rank:05d}-of-{world_size:05d}.npy"


def _ids_name(module: str, rank: int, world_size: int) -> str:
    return f"{_rows_key(module)}.ids.{rank:05d}-of-{world_size:05d}.npy"


def _rank_name(rank: int, world_size: int) -> str:
    return f"rank.{rank:05d}-of-{world_size:05d}.pt"


def _write_npy(path: Path, rows: Tensor | np.ndarray) -> dict[str, int]:
    """Write ``rows`` as a ``.npy`` file straight from its memory; fsync; return bytes and CRC-32. (Errors:
    see :func:`_write_npy_chunks`.)"""
    arr = np.ascontiguousarray(rows) if isinstance(rows, np.ndarray) else rows.detach().cpu().numpy()
    return _write_npy_chunks(path, arr.dtype, arr.shape, [arr])


def _write_npy_chunks(
    path: Path, dtype: np.dtype[Any] | type, shape: tuple[int, ...], chunks: Iterable[np.ndarray]
) -> dict[str, int]:
    """Write a ``.npy`` file of ``shape`` whose data is ``chunks`` in order, holding one chunk at a time;
    fsync; return bytes and CRC-32. A failed write removes the file and raises an OSError naming it (and
    the space left, for a full disk)."""
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    head = header.getvalue()
    crc, size = zlib.crc32(head), len(head)
    with _written_or_removed(path, "writing the checkpoint file"), open(path, "xb") as f:
        f.write(head)
        for chunk in chunks:
            data = memoryview(np.ascontiguousarray(chunk, dtype=dtype).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
            f.write(data)
            crc, size = zlib.crc32(data, crc), size + data.nbytes
        f.flush()
        os.fsync(f.fileno())
    expected = len(head) + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size != expected:
        raise RuntimeError(f"{path}: wrote {size} bytes, a {shape} array takes {expected}")
    return {"bytes": size, "crc32": crc}


#: Rows per read of a written-rows shard: it is written a chunk at a time, never held whole in RAM.
SHARD_CHUNK_ROWS = 1 << 16


def _write_torch(path: Path, obj: Any) -> dict[str, int]:
    """``torch.save`` to a new file, fsync it, and return its size and CRC-32 (read back). A failed write
    removes the file and raises an error naming it (see :func:`_written_or_removed`)."""
    with _written_or_removed(path, "saving the checkpoint file"), open(path, "xb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return _file_facts(path)


@contextlib.contextmanager
def _written_or_removed(path: Path, doing: str) -> Iterator[None]:
    """Around the writing of new file ``path``: if it raises, remove the partial file, and raise an I/O
    failure again as one that names the file and what was being done to it (``doing``): a full disk's bare
    ``OSError(28)``, or torch's ``unexpected pos`` RuntimeError, names neither."""
    try:
        yield
    except BaseException as err:
        what = f"{doing} {path}"
        if not isinstance(err, FileExistsError):  # (else the file is not ours)
            with contextlib.suppress(OSError):
                path.unlink()
            what += " (removed)"
        failure = _io_failure(err, what, path)
        if failure is None:
            raise
        raise failure from err


def _file_facts(path: Path) -> dict[str, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": crc}


def _write_rank_files(
    tmp: Path, modules: dict[str, CachedEmbedding], rank: int, world_size: int, rng: RngSnapshot | None
) -> dict[str, Any]:
    """This rank's shards and RNG file; returns the manifest entries for them."""
    files: dict[str, dict[str, int]] = {}
    shards: dict[str, dict[str, Any]] = {}
    for name, m in modules.items():
        lo, hi, source, ids = _authoritative_rows(m, rank, world_size)
        fname = _shard_name(name, rank, world_size)
        if ids is None:  # every row of the range, a zero-copy view of the store
            facts = _write_npy(tmp / fname, source.tensor()[lo:hi].contiguous())
        else:  # the rows written, read from the store a chunk at a time
            chunks = (
                source.read(ids[i : i + SHARD_CHUNK_ROWS]).numpy()
                for i in range(0, ids.size, SHARD_CHUNK_ROWS)
            )
            facts = _write_npy_chunks(tmp / fname, np.float32, (int(ids.size), int(m.width)), chunks)
        files[fname] = {**facts, "rank": rank}
        shards[name] = {"file": fname, "rank": rank, "rows": [lo, hi]}
        if ids is not None:  # the written-rows layout: which rows, and where every other one starts
            meta = source.metadata
            iname = _ids_name(name, rank, world_size)
            files[iname] = {**_write_npy(tmp / iname, ids), "rank": rank}
            shards[name].update(ids_file=iname, init_seed=int(meta["seed"]), init_state=meta["state_init"])
    fname = _rank_name(rank, world_size)
    files[fname] = {
        **_write_torch(tmp / fname, {"rank": rank, "world_size": world_size, "rng": capture_rng_states(rng)}),
        "rank": rank,
    }
    return {"files": files, "shards": shards}


def save_sharded_checkpoint(
    checkpoint: dict[str, Any],
    path: _PATH,
    modules: dict[str, CachedEmbedding],
    comm: Comm,
    storage_options: Any | None = None,
    rng: RngSnapshot | None = None,
) -> None:
    """Save ``checkpoint`` (identical dense parts on every rank) as a directory; collective on ``comm``.

    ``checkpoint["state_dict"]`` must not hold the ``<module>.rows`` tensors (see :func:`rows_left_out`);
    each rank writes its row range of every module in ``modules``. Every rank returns once the directory
    is in place, or raises if any rank failed (then nothing at ``path`` has changed). ``rng``: this
    rank's RNG states to save (default: the current ones).
    """
    if storage_options is not None:
        raise TypeError(
            f"multi-process bagpipe checkpoints do not take storage_options (got {storage_options!r})"
        )
    target = comm.broadcast(os.fspath(path) if comm.rank == 0 else None)  # rank 0's name wins
    error: BaseException | None = None
    tmp: Path | None = None
    if comm.rank == 0:
        try:
            tmp = _make_temporary_dir(target)
        except Exception as err:
            error = err
    _agree(comm, error, f"creating the directory of checkpoint {target}")
    tmp = Path(comm.broadcast(str(tmp) if comm.rank == 0 else None))

    mine: dict[str, Any] | None = None
    try:
        mine = _write_rank_files(tmp, modules, comm.rank, comm.world_size, rng)
    except Exception as err:
        error = err
    parts = comm.all_gather(mine)
    try:
        _agree(comm, error, f"writing the table shards of checkpoint {target}")
    except BaseException:
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    outcome: str | None = None
    if comm.rank == 0:
        try:
            _finish(tmp, Path(target), checkpoint, modules, parts, comm.world_size)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            outcome = f"{type(err).__name__}: {err}"
            comm.broadcast(outcome)
            raise
    outcome = comm.broadcast(outcome)
    if outcome is not None:
        raise RuntimeError(f"rank 0 could not complete checkpoint {target}: {outcome}")


def _make_temporary_dir(target: str) -> Path:
    local = _local_path(target)
    if local is None:
        raise ValueError(
            f"multi-process bagpipe checkpoints are directories on a filesystem every rank can reach; "
            f"{target} is a remote URL"
        )
    dest = Path(local)
    check_replaceable(dest)  # (before anything is written)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    _remove_stale_old_copies(dest)
    tmp = temporary_path(dest)
    tmp.mkdir()
    return tmp


def _finish(
    tmp: Path,
    target: Path,
    checkpoint: dict[str, Any],
    modules: dict[str, CachedEmbedding],
    parts: list[dict[str, Any]],
    world_size: int,
) -> None:
    """Rank 0: write checkpoint.pt and the manifest, fsync, swap the directory into place."""
    add_bagpipe_section(checkpoint, modules, rows_in_state_dict=False)
    section = checkpoint[SECTION]
    section.pop("rng", None)  # each rank's generators are in its own rank file
    written = any("ids_file" in shard for part in parts for shard in part["shards"].values())
    version = WRITTEN_ROWS_VERSION if written else SHARDED_VERSION
    section.update(version=version, layout="sharded", world_size=world_size)
    if written:
        for entry in section["modules"].values():
            entry["init_recipe"] = INIT_RECIPE
    leaked = [e["rows_key"] for e in section["modules"].values() if e["rows_key"] in checkpoint["state_dict"]]
    if leaked:
        raise RuntimeError(f"the state dict of a directory checkpoint must not hold the table rows {leaked}")
    files: dict[str, dict[str, int]] = {}
    for part in parts:
        files.update(part["files"])
    files[META] = {**_write_torch(tmp / META, checkpoint), "rank": 0}
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION if written else 1,
        "library_version": __version__,
        "world_size": world_size,
        "global_step": int(checkpoint.get("global_step", -1)),
        "checkpoint": META,
        "ranks": [_rank_name(r, world_size) for r in range(world_size)],
        "modules": {
            name: {
                "total_rows": int(m.tables.total_rows),
                "width": int(m.width),
                "dtype": "float32",
                "shards": [part["shards"][name] for part in parts],
            }
            for name, m in modules.items()
        },
        "files": dict(sorted(files.items())),
    }
    with open(tmp / MANIFEST, "x") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    _install(tmp, target)


def _old_copies(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.*{_OLD_SUFFIX}"))


def _remove_stale_old_copies(target: Path) -> None:
    """Previous checkpoints parked by an interrupted fallback replace, once ``target`` exists again."""
    if not os.path.lexists(target):
        return  # then the parked copy may be the only checkpoint: keep it
    host = host_id()
    for p in _old_copies(target):
        parts = p.name[len(target.name) + 2 : -len(_OLD_SUFFIX)].rsplit(".", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not pid_alive(int(parts[1])):
            _remove(p)


# ---------------------------------------------------------------------------------------------- load
def is_sharded_checkpoint(path: _PATH) -> bool:
    """Whether ``path`` is a local directory (a directory checkpoint, or a directory that is not one)."""
    local = _local_path(path)
    return local is not None and Path(local).is_dir()


def _read_manifest(d: Path) -> dict[str, Any]:
    mpath = d / MANIFEST
    if not mpath.exists():
        listing = sorted(p.name for p in d.iterdir())[:8]
        raise ValueError(
            f"{d} is not a bagpipe checkpoint: it is a directory without {MANIFEST} (a multi-process "
            f"bagpipe checkpoint is a directory with {MANIFEST}, {META} and one table shard per rank; "
            f"this one holds {listing})"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{mpath} is not valid JSON ({err}); the checkpoint is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{d} is not a bagpipe checkpoint: {mpath} is not a {MANIFEST_FORMAT} manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or not 1 <= version <= MANIFEST_VERSION:
        raise ValueError(
            f"{mpath}: manifest version {version!r} is not supported (this lightning-bagpipe {__version__} "
            f"reads versions 1..{MANIFEST_VERSION}; written by {manifest.get('library_version', 'unknown')})"
        )
    for key in ("world_size", "files", "modules", "ranks"):
        if key not in manifest:
            raise ValueError(f"{mpath}: the manifest has no {key!r}; the checkpoint is damaged")
    world = manifest["world_size"]
    ranks = manifest["ranks"]
    if not isinstance(world, int) or world < 1 or not isinstance(ranks, list) or len(ranks) != world:
        raise ValueError(f"{mpath}: world_size {world!r} and rank files {ranks!r} disagree; it is damaged")
    return manifest


def _describe(name: str, entry: dict[str, Any], world_size: int) -> str:
    if name == META:
        return f"{name} (rank 0's Lightning checkpoint)"
    return f"{name} (written by rank {entry.get('rank', '?')} of {world_size})"


def _verify_file(d: Path, manifest: dict[str, Any], name: str) -> None:
    """Raise ValueError naming the file when it is missing, truncated, too long or fails its CRC-32."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise ValueError(f"{d}: the manifest does not list {name}; the checkpoint is damaged")
    what = _describe(name, entry, manifest["world_size"])
    p = d / name
    if not p.is_file():
        raise ValueError(f"{d}: {what} is missing; the checkpoint is incomplete")
    size = p.stat().st_size
    if size != entry["bytes"]:
        kind = "truncated" if size < entry["bytes"] else "longer than the manifest says"
        raise ValueError(f"{d}: {what} is {kind}: {size} bytes, the manifest says {entry['bytes']}")
    crc = _file_facts(p)["crc32"]
    if crc != entry["crc32"]:
        raise ValueError(
            f"{d}: {what} is corrupted: CRC-32 {crc:#010x} does not match the manifest's "
            f"{int(entry['crc32']) & 0xFFFFFFFF:#010x}"
        )


def _check_layout(
    d: Path, manifest: dict[str, Any], modules: dict[str, CachedEmbedding]
) -> dict[str, list[dict[str, Any]]]:
    """Each module's shards, checked to tile its rows exactly; keyed by module name."""
    saved = manifest["modules"]
    if sorted(saved) != sorted(modules):
        raise ValueError(
            f"{d}: the checkpoint's CachedEmbedding modules {sorted(saved)} do not match the model's "
            f"{sorted(modules)}"
        )
    out = {}
    for name, m in modules.items():
        entry = saved[name]
        if (entry.get("total_rows"), entry.get("width")) != (m.tables.total_rows, m.width):
            raise ValueError(
                f"{d}: CachedEmbedding {name!r} was saved with {entry.get('total_rows')} rows x "
                f"{entry.get('width')} floats, the model has {m.tables.total_rows} x {m.width}"
            )
        shards = sorted(entry["shards"], key=lambda s: s["rows"][0])
        edges = [0] + [b for s in shards for b in s["rows"]] + [m.tables.total_rows]
        unlisted = [
            f for s in shards for f in (s["file"], s.get("ids_file")) if f and f not in manifest["files"]
        ]
        if unlisted:
            raise ValueError(f"{d}: the manifest has no size or checksum of shards {unlisted}; it is damaged")
        if any(edges[i] != edges[i + 1] for i in range(0, len(edges), 2)) or any(
            s["rows"][0] > s["rows"][1] for s in shards
        ):
            raise ValueError(
                f"{d}: the shards of CachedEmbedding {name!r} do not cover rows 0..{m.tables.total_rows} "
                f"exactly once ({[s['rows'] for s in shards]}); the manifest is damaged"
            )
        out[name] = shards
    return out


def _load_npy(d: Path, fname: str) -> np.ndarray:
    try:
        return np.load(d / fname, mmap_mode="c", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"{d}: shard {fname} is not a readable .npy array ({err})") from None


def _written_recipe(
    d: Path, name: str, module: CachedEmbedding, shards: list[dict[str, Any]]
) -> tuple[int, Tensor]:
    """The seed and initial optimizer state that the written-rows shards of a module agree on."""
    recipes = {(s.get("init_seed"), repr(s.get("init_state"))) for s in shards if "ids_file" in s}
    first = next(s for s in shards if "ids_file" in s)
    seed, state = first.get("init_seed"), first.get("init_state")
    sw = module.width - module.dim
    if (
        len(recipes) != 1
        or not isinstance(seed, int)
        or not isinstance(state, list)
        or len(state) != sw
        or not all(isinstance(x, (int, float)) for x in state)
    ):
        raise ValueError(
            f"{d}: the shards of CachedEmbedding {name!r} do not name one seed and {sw} initial optimizer "
            f"state values for the rows they leave out ({sorted(recipes)}); the manifest is damaged"
        )
    return seed, torch.tensor(state, dtype=torch.float32)


def _restore_rows(d: Path, name: str, module: CachedEmbedding, shards: list[dict[str, Any]]) -> None:
    """Copy every shard into this process's store of the module (no full-table copy in RAM): the store
    then holds every row, without a whole table ever being built (a lazy store stays lazy)."""
    store = module.store.local if isinstance(module.store, ShardedStore) else module.store
    written = any("ids_file" in s for s in shards)
    if written:  # every row back to its initial value first: the shards hold only the rows written since
        store = module._restart_rows(*_written_recipe(d, name, module, shards))
    for shard in shards:
        lo, hi = shard["rows"]
        arr = _load_npy(d, shard["file"])
        ids = None
        if "ids_file" in shard:
            ids = _load_npy(d, shard["ids_file"])
            if ids.dtype != np.int64 or ids.ndim != 1:
                raise ValueError(
                    f"{d}: {shard['ids_file']} holds a {ids.dtype} array of shape {list(ids.shape)}, not the "
                    "1-D int64 row ids of a written-rows shard"
                )
            if ids.size and (int(ids[0]) < lo or int(ids[-1]) >= hi or bool(np.any(ids[1:] <= ids[:-1]))):
                raise ValueError(
                    f"{d}: the row ids in {shard['ids_file']} are not strictly increasing within the shard's "
                    f"rows {lo}..{hi}; the checkpoint is damaged"
                )
        k = hi - lo if ids is None else ids.size
        if arr.dtype != np.float32 or arr.shape != (k, module.width) or not arr.flags.c_contiguous:
            raise ValueError(
                f"{d}: shard {shard['file']} holds a {arr.dtype} array of shape {list(arr.shape)}, "
                f"CachedEmbedding {name!r} needs float32 [{k}, {module.width}] (rows {lo}..{hi})"
            )
        if ids is not None:
            if ids.size:
                store.write(np.array(ids), torch.from_numpy(arr), check_unique=False)
        elif hi > lo:
            store.write_range(lo, torch.from_numpy(arr))
        del arr, ids


def read_sharded_checkpoint(
    path: _PATH,
    modules: dict[str, CachedEmbedding],
    *,
    rank: int,
    world_size: int,
    resuming: bool = True,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Verify the directory checkpoint ``path``, restore every module's rows into its store.

    Returns the Lightning checkpoint dict (its ``state_dict["<module>.rows"]`` are
    :data:`~lightning_bagpipe.embedding.cached.ROWS_IN_PLACE`: the rows are in the stores already, and
    Lightning's ``load_state_dict`` leaves them there) and this rank's saved RNG states
    when ``world_size`` equals the saving world size, else ``None`` (with a warning when ``resuming`` a
    fit; validate, test and predict need no RNG states).
    """
    d = Path(os.fspath(path))
    manifest = _read_manifest(d)
    saved_world = manifest["world_size"]
    _verify_file(d, manifest, META)
    checkpoint = read_checkpoint(AtomicCheckpointIO(), d / META, weights_only=True)
    verify_bagpipe_section(checkpoint, d, modules, layout="sharded")
    layout = _check_layout(d, manifest, modules)
    for name in manifest["files"]:
        if name != META:
            _verify_file(d, manifest, name)
    state_dict = checkpoint.setdefault("state_dict", {})
    for name, m in modules.items():
        _restore_rows(d, name, m, layout[name])
        state_dict[_rows_key(name)] = ROWS_IN_PLACE
    if saved_world != world_size:
        if resuming:
            _warn_world_changed(f"checkpoint {d} was saved by {saved_world} processes", world_size)
        return checkpoint, None
    rank_file = d / manifest["ranks"][rank]
    saved_rank = read_checkpoint(AtomicCheckpointIO(), rank_file, weights_only=True)
    if saved_rank.get("rank") != rank or saved_rank.get("world_size") != world_size:
        raise ValueError(f"{rank_file} holds the state of rank {saved_rank.get('rank')}, not of rank {rank}")
    return checkpoint, {"rng": saved_rank.get("rng")}


def load_bagpipe_checkpoint(
    io: CheckpointIO,
    path: _PATH,
    weights_only: bool | None,
    modules: dict[str, CachedEmbedding],
    comm: Comm,
    *,
    resuming: bool = True,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load a file or directory bagpipe checkpoint on every rank; return it and what to resume RNGs from
    (``resuming``: a fit resumes from it, so a checkpoint of another world size is warned about).

    A file is read through ``io`` and checked (section, configuration, rows CRC); a directory is read by
    :func:`read_sharded_checkpoint`. Every rank loads; if any rank fails, every rank raises (the failing
    rank its own error, the others one naming that rank), so no rank goes on into a collective and hangs.
    """
    result: tuple[dict[str, Any], dict[str, Any] | None] | None = None
    error: BaseException | None = None
    try:
        result = _load_on_this_rank(io, path, weights_only, modules, comm.rank, comm.world_size, resuming)
    except Exception as err:
        error = err
    _agree(comm, error, f"loading checkpoint {os.fspath(path)}")
    assert result is not None
    return result


def _load_on_this_rank(
    io: CheckpointIO,
    path: _PATH,
    weights_only: bool | None,
    modules: dict[str, CachedEmbedding],
    rank: int,
    world_size: int,
    resuming: bool,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    local = _local_path(path)
    if local is not None and not os.path.lexists(local):
        parked = _old_copies(Path(local))
        hint = f"; an interrupted save left the previous checkpoint at {parked[-1]}" if parked else ""
        raise FileNotFoundError(f"checkpoint {os.fspath(path)} does not exist{hint}")
    if is_sharded_checkpoint(path):
        assert local is not None
        return read_sharded_checkpoint(local, modules, rank=rank, world_size=world_size, resuming=resuming)
    checkpoint = read_checkpoint(io, path, weights_only)
    section = verify_bagpipe_section(checkpoint, path, modules)
    saved_world = int((section or {}).get("world_size", 1))
    if section is not None and saved_world != world_size:
        if resuming:
            _warn_world_changed(
                f"checkpoint {os.fspath(path)} was saved by {saved_world} process(es)", world_size
            )
        return checkpoint, None
    return checkpoint, section


def _warn_world_changed(saved: str, world_size: int) -> None:
    rank_zero_warn(
        f"bagpipe: {saved} and is resumed on {world_size}: the tables, dense state and the position in the "
        "batch stream are restored, the per-rank RNG states are not (each rank's generators continue from "
        "their current seed)"
    )


# ---------------------------------------------------------------------------------------------- inference
def load_checkpoint_for_inference(
    model_cls: type[M],
    path: _PATH,
    *,
    map_location: Any = None,
    strict: bool = True,
    **kwargs: Any,
) -> M:
    """``model_cls.load_from_checkpoint(path)`` for bagpipe checkpoints, files and directories alike.

    For a single-file checkpoint this is ``model_cls.load_from_checkpoint(path, weights_only=True, ...)``.
    For a directory it loads ``checkpoint.pt`` the same way, then checks the shards (size, CRC-32, table
    configuration) and copies them into each CachedEmbedding's store, shard by shard, without building the
    whole table in RAM first. Pass ``store=...`` (if your ``__init__`` takes it) to restore into a
    memory-mapped store. The returned module needs no strategy: every forward reads the store.

    With ``strict`` (the default), keys other than the table rows that are missing from the checkpoint, or
    that the model does not have, are a ValueError.
    """
    if not is_sharded_checkpoint(path):
        return model_cls.load_from_checkpoint(
            path, map_location=map_location, strict=strict, weights_only=True, **kwargs
        )
    d = Path(os.fspath(path))
    manifest = _read_manifest(d)
    _verify_file(d, manifest, META)
    with warnings.catch_warnings():  # the rows are missing by design; other keys are checked below
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in")
        model = model_cls.load_from_checkpoint(
            d / META, map_location=map_location, strict=False, weights_only=True, **kwargs
        )
    modules = {n: m for n, m in model.named_modules() if isinstance(m, CachedEmbedding)}
    meta = read_checkpoint(AtomicCheckpointIO(), d / META, weights_only=True)
    verify_bagpipe_section(meta, d, modules, layout="sharded")
    layout = _check_layout(d, manifest, modules)
    for name in manifest["files"]:
        if name != META:
            _verify_file(d, manifest, name)
    rows = {_rows_key(n) for n in modules}
    have, saved = set(model.state_dict()), set(meta.get("state_dict") or {})
    missing, unexpected = sorted(have - saved - rows), sorted(saved - have)
    if strict and (missing or unexpected):
        raise ValueError(
            f"{d / META} does not fit {model_cls.__name__}: missing keys {missing}, unexpected keys "
            f"{unexpected} (pass strict=False to load anyway)"
        )
    if missing:
        rank_zero_warn(f"{d / META}: keys of {model_cls.__name__} not in the checkpoint: {missing}")
    for name, m in modules.items():
        _restore_rows(d, name, m, layout[name])
    return model
