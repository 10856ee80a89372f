"""Checkpoints of ``strategy="bagpipe"``: atomic saves, a ``"bagpipe"`` section, load-time checks, RNG states.

What a bagpipe checkpoint holds beyond Lightning's usual contents (dense weights, optimizer states, loop
progress, the loader's position in the global batch stream):

* every table row with its sparse-optimizer state, as ``state_dict["<module>.rows"]`` (the strategy flushes
  dirty cache rows before the state dict is taken, so these are the newest values);
* ``checkpoint["bagpipe"]`` (:func:`add_bagpipe_section`): a format version, per
  :class:`~lightning_bagpipe.CachedEmbedding` its table configuration, optimizer and a CRC-32 of its rows,
  and the RNG states of torch (CPU and CUDA), numpy's global generator and python's ``random``, which
  Lightning does not save but an exact resume needs.

Everything is tensors and plain Python values, so checkpoints load with ``torch.load(weights_only=True)``.

This module covers the single-file checkpoints of one process. With several processes the strategy saves
a directory instead (one table shard per rank, a manifest): see
:mod:`lightning_bagpipe.strategies.sharded_checkpoint`, which reuses the section and checks defined here.

On load (:func:`read_checkpoint`, :func:`verify_bagpipe_section`) an unreadable file, a checkpoint that was
not written by this strategy, a table configuration that differs from the model's, or rows whose checksum
does not match are each a ``ValueError`` naming the file and what is wrong. :func:`restore_rng_states` puts
the saved generators back when training resumes.

:class:`AtomicCheckpointIO` writes through a temporary file in the target directory, ``fsync``\\ s it and
renames it over the target, so a crash or ``kill -9`` during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pickle
import random
import shutil
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_bagpipe.__about__ import __version__
from lightning_bagpipe.embedding.cached import WRITTEN_IDS, CachedEmbedding
from lightning_bagpipe.embedding.init import INIT_RECIPE
from lightning_bagpipe.embedding.store import fsync_dir
from lightning_bagpipe.temporaries import TMP_SUFFIX, remove_stale_temporaries, temporary_path

__all__ = [
    "FILE_VERSION",
    "FORMAT",
    "SECTION",
    "SHARDED_VERSION",
    "VERSION",
    "WRITTEN_ROWS_VERSION",
    "AtomicCheckpointIO",
    "add_bagpipe_section",
    "atomic_torch_save",
    "capture_rng_states",
    "check_replaceable",
    "read_checkpoint",
    "restore_rng_states",
    "rng_snapshot",
    "rows_checksum",
    "verify_bagpipe_section",
    "written_rows_only",
]

#: Key of the bagpipe section in a checkpoint dict.
SECTION = "bagpipe"
#: ``format`` field of the section.
FORMAT = "lightning-bagpipe-checkpoint"
#: The newest section version this library reads (it reads versions 1..VERSION).
VERSION = 3
#: Version written into single-file checkpoints (the rows are ``state_dict["<module>.rows"]``).
FILE_VERSION = 1
#: Version written, in files and directories alike, when a module's rows are in the written-rows layout
#: (only the rows written since initialisation, their ids and the initialisation recipe of the others):
#: older readers refuse it by its version instead of misreading it.
WRITTEN_ROWS_VERSION = 3
#: Version written into the ``checkpoint.pt`` of directory checkpoints (``layout: "sharded"``; the rows are
#: per-rank shard files listed in the directory's manifest).
SHARDED_VERSION = 2

_OLD_SUFFIX = ".old"
_ZIP_MAGIC = b"PK\x03\x04"


# ---------------------------------------------------------------------------------------------- atomic save
class AtomicCheckpointIO(TorchCheckpointIO):
    """A :class:`~lightning.fabric.plugins.TorchCheckpointIO` whose local saves are atomic and copy-free.

    A local save streams ``torch.save`` straight into a temporary file next to the target, flushes and
    ``fsync``\\ s it, ``os.replace``\\ s it onto the target name and ``fsync``\\ s the directory (see
    :func:`atomic_torch_save`). Unlike Lightning's own save it never builds the whole checkpoint in an
    in-RAM buffer first, so saving a memory-mapped table does not need a second full copy in RAM.

    A local load memory-maps the file (``torch.load(mmap=True)``), so restoring the tables copies them from
    the page cache into the store instead of first reading the whole checkpoint into RAM.

    Remote paths (``s3://`` and other fsspec protocols) fall back to :class:`TorchCheckpointIO`
    (Lightning's transactional save, a plain load).
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint does not take storage_options "
                f"(got {storage_options!r}); write a custom CheckpointIO to use them"
            )
        if _local_path(path) is None:
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        local = _local_path(path)
        if local is not None and _looks_like_torch_zip(local):
            return torch.load(local, map_location=map_location, weights_only=weights_only, mmap=True)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def _local_path(path: _PATH) -> str | None:
    """``path`` as a local file name (``file://`` stripped), or None for a remote fsspec URL."""
    fs, local = url_to_fs(os.fspath(path))
    return local if isinstance(fs, LocalFileSystem) else None


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save(obj)`` to ``path`` so that ``path`` always holds either the old or the new file.

    Writes ``.<name>.<host>.<pid>.<random>.tmp`` in the target directory (created if missing), flushes and
    fsyncs it, renames it onto ``path`` and fsyncs the directory. If the save raises, the temporary file is
    removed and ``path`` is untouched. Temporary files left by a killed process of this host (for the same
    target) are removed first.
    """
    local = _local_path(path)
    if local is None:
        raise ValueError(f"atomic_torch_save writes local files only, got {os.fspath(path)}")
    target = Path(local)
    check_replaceable(target)
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = temporary_path(target)
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if target.is_dir() and not target.is_symlink():  # a directory checkpoint (another world size's)
            _install(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        failure = _io_failure(
            err, f"saving checkpoint {target} (as the temporary file {tmp}, now removed)", target
        )
        if failure is None:
            raise
        raise failure from err
    fsync_dir(directory)


def check_replaceable(target: Path) -> None:
    """Refuse to save a checkpoint at ``target`` if it is a directory that is not a bagpipe directory
    checkpoint (no ``manifest.json``): replacing it would delete everything in it (a folder of other
    checkpoints, given as the file name by mistake). A file, or a bagpipe checkpoint directory, is
    replaced as a whole."""
    if target.is_dir() and not (target / "manifest.json").exists():
        held = sorted(p.name for p in target.iterdir())[:5]
        raise ValueError(
            f"cannot save a checkpoint at {target}: it is a directory that is not a bagpipe checkpoint "
            f"(no manifest.json; it holds {held}{', ...' if len(held) == 5 else ''}), and saving would "
            "replace it with everything in it. Give the checkpoint a path of its own, e.g. "
            f"{target / 'model.ckpt'}"
        )


def _install(tmp: Path, target: Path) -> None:
    """Put the complete directory ``tmp`` at ``target`` so ``target`` is always the old or the new one."""
    if os.path.lexists(target):
        if _exchange(tmp, target):
            _remove(tmp)  # it now holds the previous checkpoint
        else:
            old = tmp.with_name(tmp.name.removesuffix(TMP_SUFFIX) + _OLD_SUFFIX)
            os.rename(target, old)  # a crash between these two renames leaves the previous one at ``old``
            os.rename(tmp, target)
            _remove(old)
    else:
        os.rename(tmp, target)
    fsync_dir(target.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(code)}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def _io_failure(err: BaseException, what: str, path: Path) -> BaseException | None:
    """The error to raise when writing file ``path`` failed with ``err``: one that says ``what`` was being
    done (``"... while <what>"``), keeps the system's errno and names ``path`` (and, for a full disk, the
    space left on its filesystem); ``None`` to raise ``err`` as it is (not an I/O failure).

    ``torch.save`` that cannot write (a full disk) raises the ``OSError`` of the write, or, when its zip
    writer then fails to finish the file, a ``RuntimeError`` such as ``[enforce fail at
    inline_container.cc:672] . unexpected pos 3904 vs 3796`` with that ``OSError`` as its context.
    """
    if not isinstance(err, (OSError, RuntimeError)):
        return None  # (an interrupt, a pickling error...: as they are)
    chain: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    os_error = next((c for c in chain if isinstance(c, OSError)), None)
    if os_error is None and "inline_container" not in str(err):  # (torch's writer: a short write)
        return None
    full = os_error is None or os_error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    doing = f"while {what}{_space_left(path.parent) if full else ''}"
    if os_error is None:
        return RuntimeError(f"{err} ({doing})")
    return OSError(os_error.errno, f"{os_error.strerror or os_error} {doing}", str(path))


def _space_left(directory: Path) -> str:
    """``"; N MiB free on its filesystem"``, or nothing if the system cannot tell."""
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):  # (no statvfs off POSIX)
        return ""
    free = st.f_bavail * st.f_frsize
    text = (
        f"{free / 2**30:,.1f} GiB"
        if free >= 2**30
        else f"{free / 2**20:.1f} MiB"
        if free >= 2**20
        else f"{free:,} bytes"
    )
    return f"; {text} free on its filesystem"


# ---------------------------------------------------------------------------------------------- section
def rows_checksum(rows: Tensor) -> int:
    """CRC-32 of the bytes of ``rows`` (native byte order); no copy of a contiguous CPU tensor is made."""
    t = rows.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().data)


def _module_key(name: str, key: str) -> str:
    """The state-dict key ``key`` of the module named ``name`` (the root module has the empty name)."""
    return f"{name}.{key}" if name else key


def _rows_key(name: str) -> str:
    return _module_key(name, "rows")


def _module_config(name: str, module: CachedEmbedding) -> dict[str, Any]:
    """What must match between a checkpoint and a model: tables, dim, optimizer (and its state width)."""
    return {
        "tables": module.tables.to_list(),
        "tables_fingerprint": module.tables.fingerprint(),
        "total_rows": int(module.tables.total_rows),
        "dim": int(module.dim),
        "state_width": int(module.width - module.dim),
        "optimizer": module.optimizer.name,
        "optimizer_hparams": _plain(module.optimizer.hparams()),
        "rows_key": _rows_key(name),
        "rows_shape": [int(module.tables.total_rows), int(module.width)],
        "rows_dtype": "float32",
    }


def _module_entry(name: str, module: CachedEmbedding, state_dict: dict[str, Any]) -> dict[str, Any]:
    key = _rows_key(name)
    rows = state_dict.get(key)
    if not isinstance(rows, Tensor):
        raise ValueError(
            f"bagpipe checkpoint: state_dict has no tensor {key!r} for CachedEmbedding {name!r}; "
            "the tables would not be saved (was it removed in on_save_checkpoint?)"
        )
    entry = {
        **_module_config(name, module),
        "rows_shape": [int(s) for s in rows.shape],
        "rows_dtype": str(rows.dtype).removeprefix("torch."),
        "rows_crc32": rows_checksum(rows),
    }
    ids = state_dict.get(_module_key(name, WRITTEN_IDS))
    if isinstance(ids, Tensor):
        entry.update(rows_layout="written", init_recipe=INIT_RECIPE, row_ids_crc32=rows_checksum(ids))
    return entry


@contextlib.contextmanager
def written_rows_only(modules: Iterable[CachedEmbedding]) -> Iterator[None]:
    """While active, ``state_dict()`` saves the rows of ``modules`` in the written-rows layout where their
    store keeps track of written rows (a lazily initialised ``TieredStore``): the rows written since
    initialisation, their ids and the recipe of every other row, instead of the whole table. Checkpoints
    use it; a plain ``state_dict()`` still holds whole tables."""
    mods = list(modules)
    try:
        for m in mods:
            m._save_written_rows = True
        yield
    finally:
        for m in mods:
            m._save_written_rows = False


def add_bagpipe_section(
    checkpoint: dict[str, Any],
    modules: dict[str, CachedEmbedding],
    *,
    rows_in_state_dict: bool = True,
    rng: RngSnapshot | None = None,
) -> None:
    """Write ``checkpoint["bagpipe"]``: format, version, per-module table config and row checksum, RNG states.

    ``modules`` maps module names (as in ``named_modules()``) to the model's CachedEmbedding modules; their
    rows must already be in ``checkpoint["state_dict"]`` (the checksum is taken over exactly those tensors).
    With ``rows_in_state_dict=False`` (directory checkpoints, whose rows are shard files checksummed by the
    manifest) only the configuration is recorded. ``rng``: the RNG states to save (default: the current).
    """
    state_dict = checkpoint.get("state_dict") or {}
    entries = {
        name: _module_entry(name, m, state_dict) if rows_in_state_dict else _module_config(name, m)
        for name, m in modules.items()
    }
    written = any(e.get("rows_layout") == "written" for e in entries.values())
    checkpoint[SECTION] = {
        "format": FORMAT,
        "version": WRITTEN_ROWS_VERSION if written else FILE_VERSION,
        "library_version": __version__,
        "world_size": 1,
        "modules": entries,
        "rng": capture_rng_states(rng),
    }


def _plain(value: Any) -> Any:
    """``value`` with tuples turned into lists (plain types for weights-only loading and comparison)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- reading
def read_checkpoint(io: CheckpointIO, path: _PATH, weights_only: bool | None) -> dict[str, Any]:
    """Load the checkpoint at ``path`` through ``io``; ValueError naming the file if it cannot be one.

    A missing file stays a ``FileNotFoundError`` and an unreadable one a ``PermissionError``. Anything else
    that stops the load (an empty, truncated or corrupted file, a file that is not a torch checkpoint, a
    directory, objects a weights-only load refuses) becomes a ``ValueError`` that says which.
    """
    try:
        checkpoint = io.load_checkpoint(path, weights_only=weights_only)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as err:
        raise ValueError(f"cannot load checkpoint {os.fspath(path)}: {_diagnose(path, err)}") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"checkpoint {os.fspath(path)} is not a Lightning checkpoint: it holds a "
            f"{type(checkpoint).__name__}, not a dict"
        )
    return checkpoint


def _diagnose(path: _PATH, err: Exception) -> str:
    text = str(err).strip()
    detail = f"{type(err).__name__}: {text.splitlines()[0] if text else '(no message)'}"
    if isinstance(err, pickle.UnpicklingError) and "weights only load failed" in str(err).lower():
        if not _looks_like_torch_zip(path):
            return f"the file is not a torch checkpoint ({detail})"
        return (
            "it holds objects other than tensors and plain Python values, which a weights-only load refuses; "
            "load it with weights_only=False only if you trust its source"
        )
    local = _local_path(path)
    if local is None:
        return f"it could not be read as a torch checkpoint ({detail})"
    p = Path(local)
    if p.is_dir():
        return "it is a directory, not a checkpoint file (directory checkpoints come with multi-process runs)"
    try:
        size = p.stat().st_size
    except OSError:
        return detail
    if size == 0:
        return "the file is empty"
    if not _looks_like_torch_zip(path):
        return f"the file is not a torch checkpoint (a torch checkpoint is a zip archive) ({detail})"
    return f"the file is truncated or corrupted ({detail})"


def _looks_like_torch_zip(path: _PATH) -> bool:
    """Whether local file ``path`` starts like a zip archive (torch's checkpoint format since 1.6)."""
    local = _local_path(path)
    if local is None:
        return False
    try:
        with open(local, "rb") as f:
            return f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- checks
def verify_bagpipe_section(
    checkpoint: dict[str, Any],
    path: _PATH,
    modules: dict[str, CachedEmbedding],
    *,
    layout: str = "file",
) -> dict[str, Any] | None:
    """Check that ``checkpoint`` (from ``path``) is a bagpipe checkpoint of ``modules``; return the section.

    Raises ValueError when the section is missing ("not a bagpipe checkpoint") or of an unknown format or
    version, when the checkpoint's CachedEmbedding modules or their tables, ``dim`` or optimizer differ from
    the model's, and when a module's saved rows do not match their checksum. Different sparse-optimizer
    hyper-parameters (e.g. a new learning rate) are allowed and only warned about.

    ``layout`` is where the caller found the checkpoint: ``"file"`` (the rows are in the state dict and are
    checked here) or ``"sharded"`` (the ``checkpoint.pt`` of a directory; the rows are shard files that the
    manifest checks). A section of the other layout is a ValueError saying which path to pass instead.
    """
    where = os.fspath(path)
    section = checkpoint.get(SECTION)
    if section is None:
        raise ValueError(
            f"{where} is not a bagpipe checkpoint: it has no {SECTION!r} section (it was not saved with "
            "strategy='bagpipe'). To train from its weights, load them with "
            "YourModel.load_from_checkpoint(...) and call fit without ckpt_path"
        )
    if not isinstance(section, dict) or section.get("format") != FORMAT:
        raise ValueError(f"{where}: the {SECTION!r} section is not a {FORMAT} section")
    version = section.get("version")
    if not isinstance(version, int) or version < 1 or version > VERSION:
        raise ValueError(
            f"{where}: bagpipe checkpoint format version {version!r} is not supported (this "
            f"lightning-bagpipe {__version__} reads versions 1..{VERSION}; the file was written by "
            f"{section.get('library_version', 'an unknown version')})"
        )
    found = section.get("layout", "file")
    if found != layout:
        if found == "sharded":
            raise ValueError(
                f"{where} is the metadata file of a multi-process (directory) bagpipe checkpoint, without "
                f"the table rows; pass the directory {os.path.dirname(where) or '.'} instead"
            )
        raise ValueError(f"{where}: expected a {layout!r} bagpipe section, found layout {found!r}")
    saved: dict[str, Any] = section.get("modules") or {}
    missing, extra = sorted(set(modules) - set(saved)), sorted(set(saved) - set(modules))
    if missing or extra:
        raise ValueError(
            f"{where}: the checkpoint's CachedEmbedding modules {sorted(saved)} do not match the model's "
            f"{sorted(modules)} (not in the checkpoint: {missing}; not in the model: {extra})"
        )
    state_dict = checkpoint.get("state_dict") or {}
    for name, module in modules.items():
        _verify_module(where, name, saved[name], module, state_dict if layout == "file" else None)
    return section


def _verify_module(
    where: str, name: str, entry: dict[str, Any], module: CachedEmbedding, state_dict: dict[str, Any] | None
) -> None:
    """Config of one module; its rows' shape and CRC too when ``state_dict`` (a file checkpoint) is given."""
    label = f"CachedEmbedding {name!r}"
    diffs = []
    model_tables = module.tables.to_list()
    saved_tables = [[str(t[0]), int(t[1])] for t in entry.get("tables", [])]
    if saved_tables != model_tables:
        diffs.append(_describe_table_difference(saved_tables, model_tables))
    for key, have in (
        ("dim", module.dim),
        ("optimizer", module.optimizer.name),
        ("state_width", module.width - module.dim),
    ):
        if entry.get(key) != have:
            diffs.append(f"{key}: checkpoint {entry.get(key)!r}, model {have!r}")
            if key == "dim":  # (what a user set may be narrower: DeepFM's rows hold embedding_dim + 1)
                diffs[-1] += " (the module's row width; DeepFM adds a first-order column to embedding_dim)"
    if diffs:
        raise ValueError(f"{where} was saved for another configuration of {label}: " + "; ".join(diffs))
    _warn_changed_hparams(label, entry, module)
    if state_dict is None:
        return

    key = entry.get("rows_key", _rows_key(name))
    rows = state_dict.get(key)
    if not isinstance(rows, Tensor):
        raise ValueError(f"{where}: the state_dict has no table rows {key!r} for {label}")
    if [int(s) for s in rows.shape] != list(entry.get("rows_shape", [])):
        raise ValueError(
            f"{where}: table rows {key!r} of {label} have shape {list(rows.shape)}, but the checkpoint "
            f"recorded {entry.get('rows_shape')}"
        )
    crc = rows_checksum(rows)
    if crc != entry.get("rows_crc32"):
        raise ValueError(
            f"{where}: the table rows of {label} ({key!r}) are corrupted: CRC-32 {crc:#010x} does not match "
            f"the saved {int(entry.get('rows_crc32', -1)) & 0xFFFFFFFF:#010x}"
        )
    ids_key = _module_key(name, WRITTEN_IDS)
    ids = state_dict.get(ids_key)
    if entry.get("rows_layout", "full") != "written":
        if ids is not None:
            raise ValueError(f"{where}: {ids_key!r} is in the state dict, but {label} was saved whole")
        return
    if entry.get("init_recipe") != INIT_RECIPE:
        raise ValueError(
            f"{where}: the rows of {label} not in the checkpoint start from init recipe "
            f"{entry.get('init_recipe')!r}; this lightning-bagpipe computes {INIT_RECIPE!r}"
        )
    if not isinstance(ids, Tensor):
        raise ValueError(f"{where}: the state_dict has no row ids {ids_key!r} for the rows of {label}")
    crc = rows_checksum(ids)
    if crc != entry.get("row_ids_crc32"):
        raise ValueError(
            f"{where}: the row ids of {label} ({ids_key!r}) are corrupted: CRC-32 {crc:#010x} does not "
            f"match the saved {int(entry.get('row_ids_crc32', -1)) & 0xFFFFFFFF:#010x}"
        )


def _warn_changed_hparams(label: str, entry: dict[str, Any], module: CachedEmbedding) -> None:
    saved_h, have_h = entry.get("optimizer_hparams") or {}, _plain(module.optimizer.hparams())
    changed = {k: (saved_h.get(k), v) for k, v in have_h.items() if saved_h.get(k) != v}
    if changed:
        text = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        rank_zero_warn(f"bagpipe: resuming {label} with other sparse-optimizer hyper-parameters ({text})")


def _describe_table_difference(saved: list[list[Any]], model: list[list[Any]]) -> str:
    def fmt(t: list[Any]) -> str:
        return f"{t[0]}:{t[1]} rows"

    if len(saved) != len(model):
        head = f"tables: checkpoint has {len(saved)} tables, model has {len(model)}"
    else:
        head = "tables differ"
    for i, (a, b) in enumerate(zip(saved, model)):
        if a != b:
            return f"{head}; table {i} is {fmt(a)} in the checkpoint, {fmt(b)} in the model"
    return head


# ---------------------------------------------------------------------------------------------- RNG
RngSnapshot = tuple[Any, ...]
"""The generators' states as they come (torch, CUDA, numpy, ``random``): :func:`rng_snapshot`."""


def rng_snapshot() -> RngSnapshot:
    """The RNG states of torch (CPU and each CUDA device), numpy (global) and ``random``, unconverted
    (~45 us: cheap enough to take at every step)."""
    cuda = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []
    return torch.get_rng_state(), cuda, np.random.get_state(legacy=True), random.getstate()


def capture_rng_states(snapshot: RngSnapshot | None = None) -> dict[str, Any]:
    """RNG states of torch (CPU and each CUDA device), numpy (global) and ``random``, as plain values:
    the current ones, or those of an earlier :func:`rng_snapshot`."""
    torch_state, cuda, np_state, py = snapshot if snapshot is not None else rng_snapshot()
    assert isinstance(np_state, tuple)  # legacy=True always gives the MT19937 tuple
    kind, keys, pos, has_gauss, cached = np_state
    py_version, py_state, py_gauss = py
    return {
        "torch": torch_state,
        "cuda": cuda,
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }


def restore_rng_states(section: dict[str, Any]) -> None:
    """Set the generators saved by :func:`capture_rng_states` (``section["rng"]``) back.

    CUDA states are restored for the devices present (a warning if the count differs from the saved one).
    """
    rng = section.get("rng")
    if not rng:
        return
    torch.set_rng_state(rng["torch"])
    cuda = list(rng.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if n != len(cuda):
            rank_zero_warn(
                f"bagpipe: the checkpoint has RNG states of {len(cuda)} CUDA devices, this process sees {n}; "
                f"restoring the first {min(n, len(cuda))}"
            )
        torch.cuda.set_rng_state_all(cuda[:n])
    npy = rng["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )
    py = rng["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
