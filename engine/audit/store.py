"""Durable, resumable per-chunk results.

A long audit writes each finished chunk's summaries as its own file: written to a temporary file
in the same folder, flushed and ``fsync``-ed, then atomically renamed, and the folder is
``fsync``-ed. A run killed at any moment therefore leaves only whole chunk files (at most the
chunk in flight is lost), and rerunning the same command skips them. ``manifest.json`` records
the chunk grid, one hash per component of the run's identity (data, model, graph, sampler,
precision, ...), the library versions, and each stored file's SHA-256: a truncated or corrupted
chunk is detected on resume, logged and recomputed, never read as results. A different
configuration in the same directory is refused, naming the components that changed, unless the
user asks to overwrite (the old chunks are then moved aside, not deleted). A lock file keeps a
second process out of a store in use; a failed write (a full disk) leaves no chunk behind and
raises :class:`~engine.errors.StorageError`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from engine.errors import InputError, StorageError

__all__ = ["ChunkStore", "fingerprint", "atomic_write_bytes", "versions", "sha256_bytes", "lock_directory",
           "release_lock", "merge_shard_stores", "chunk_file_name"]

MANIFEST = "manifest.json"
CHUNK_DIR = "chunks"
LOCK = ".lock"

log = logging.getLogger("engine")

_HELD_LOCKS: dict[str, int] = {}
"""Real path of a store -> open file descriptor holding its lock (for this process' lifetime)."""


def versions() -> dict[str, str]:
    """Versions of the libraries that determine the numbers."""
    import importlib.metadata as md

    out = {}
    for name in ("engine", "jax", "jaxlib", "pymc", "pytensor", "blackjax", "numpyro", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


def fingerprint(settings: Mapping[str, Any]) -> str:
    """Stable hash of the settings that determine a run's results (JSON, sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sha256_bytes(payload: bytes) -> str:
    """Hex SHA-256 of ``payload`` (the checksum a manifest keeps per stored file)."""
    return hashlib.sha256(payload).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically: temp file, fsync, rename, fsync folder.

    Any failure (a full disk, a kill) leaves ``path`` as it was and removes the temp file; an
    ``OSError`` is re-raised as :class:`~engine.errors.StorageError` with one readable line.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise StorageError(_storage_message(path, err)) from err
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise StorageError(_storage_message(path, err)) from err
        raise


def _storage_message(path: Path, err: OSError) -> str:
    reason = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    return (f"could not write {path}: {reason}; nothing partial was kept (finished chunks are); "
            "free space or fix the folder, then rerun the same command to resume")


def lock_directory(directory: Path) -> None:
    """Hold ``directory/.lock`` (``fcntl.lockf``, released when the process ends) or raise
    :class:`InputError` when another process holds it."""
    import fcntl

    directory = Path(directory)
    key = os.path.realpath(directory)
    if key in _HELD_LOCKS:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(_storage_message(directory, err)) from err
    path = directory / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)
        raise InputError(
            f"{directory} is in use by another process (pid {owner}); wait for it to finish or "
            "use another run directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _HELD_LOCKS[key] = fd


def release_lock(directory: Path) -> None:
    """Release this process' lock on a store (the process ending releases it too)."""
    fd = _HELD_LOCKS.pop(os.path.realpath(directory), None)
    if fd is not None:
        os.close(fd)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}/"))
        elif value is not None:
            out[name] = np.asarray(value)
    return out


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def chunk_file_name(start: int, stop: int, name: str = "chunk") -> str:
    """The file of chunk ``start:stop`` (``name`` "chunk" for summaries, "draws" for kept draws)."""
    return f"{name}_{start:010d}_{stop:010d}.npz"


def _component_hashes(settings: Mapping[str, Any], grid: list) -> dict[str, str]:
    """One hash per top-level setting (its components) plus the chunk grid."""
    parts = {str(k): fingerprint({"value": v}) for k, v in settings.items()}
    parts["grid"] = fingerprint({"value": grid})
    return parts


class ChunkStore:
    """Per-chunk result files of one run directory.

    Parameters
    ----------
    directory
        Where ``manifest.json`` and ``chunks/`` live (the Hydra run directory, usually).
    settings
        Everything that determines the results, by component (e.g. ``data``, ``model``,
        ``graph``, ``sampler``, ``precision``); each component is hashed on its own so a refusal
        can name what changed.
    grid
        The run's chunk boundaries ``[(start, stop), ...]`` (``engine.sampling.batch.chunk_grid``).
    overwrite
        Recompute instead of refusing a different configuration; its chunks are moved aside to
        ``replaced_<old hash>/`` (never read, never deleted).

    Raises
    ------
    InputError
        A different configuration without ``overwrite``, or another process using the store.
    StorageError
        The manifest could not be written (a full disk).
    """

    def __init__(self, directory: Path, settings: Mapping[str, Any], grid: Iterable[tuple[int, int]], *, overwrite: bool = False):
        self.directory = Path(directory)
        self.grid = [(int(a), int(b)) for a, b in grid]
        self.identity = _component_hashes(settings, self.grid)
        self.hash = fingerprint(self.identity)
        self.chunk_dir = self.directory / CHUNK_DIR
        self.manifest_path = self.directory / MANIFEST
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(_storage_message(self.directory, err)) from err
        lock_directory(self.directory)
        self.manifest = None
        if self.manifest_path.exists():
            try:
                old = json.loads(self.manifest_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise InputError(f"{self.manifest_path}: unreadable manifest ({err})") from err
            if old.get("config_hash") == self.hash:
                self.manifest = old
            elif not overwrite:
                raise InputError(
                    f"{self.directory} holds results of a different configuration (changed: "
                    f"{', '.join(self._changed(old))}); use another run directory or set "
                    "runtime.overwrite=true to recompute (the stored chunks are kept aside)"
                )
            else:
                aside = self.directory / f"replaced_{old.get('config_hash', 'unknown')}"
                suffix = 1
                while aside.exists():
                    aside, suffix = aside.with_name(f"replaced_{old.get('config_hash')}_{suffix}"), suffix + 1
                aside.mkdir()
                for item in (self.chunk_dir, self.manifest_path):
                    if item.exists():
                        os.replace(item, aside / item.name)
                log.warning("%s: another configuration's results moved to %s (changed: %s)",
                            self.directory, aside, ", ".join(self._changed(old)))
        if self.manifest is None:
            self.manifest = {
                "config_hash": self.hash,
                "identity": self.identity,
                "grid": self.grid,
                "num_problems": self.grid[-1][1] if self.grid else 0,
                "versions": versions(),
                "settings": json.loads(json.dumps(settings, default=str)),
                "checksums": {},
            }
            self._save_manifest()
        self.manifest.setdefault("checksums", {})
        try:
            self.chunk_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(_storage_message(self.chunk_dir, err)) from err
        self._verified: set[str] = set()

    def close(self) -> None:
        """Release the directory's lock (also released when the process ends)."""
        release_lock(self.directory)

    def _changed(self, old: Mapping[str, Any]) -> list[str]:
        """Names of the identity components that differ from ``old``'s manifest."""
        before = old.get("identity")
        if not isinstance(before, Mapping):
            return ["unknown (the stored manifest predates per-component hashes)"]
        names = sorted(set(before) | set(self.identity))
        changed = [n for n in names if before.get(n) != self.identity.get(n)]
        return changed or ["unknown"]

    def _save_manifest(self) -> None:
        atomic_write_bytes(self.manifest_path, json.dumps(self.manifest, indent=2).encode())

    def _path(self, start: int, stop: int, name: str = "chunk") -> Path:
        return self.chunk_dir / chunk_file_name(start, stop, name)

    def _is_intact(self, path: Path) -> bool:
        """Whether ``path`` exists and matches its manifest checksum; a damaged file is logged."""
        if path.name in self._verified:
            return True
        if not path.exists():
            return False
        expected = self.manifest["checksums"].get(path.name)
        if expected is None:  # killed between the file's rename and the manifest's update
            return False
        if sha256_bytes(path.read_bytes()) != expected:
            log.warning("%s is truncated or corrupted (checksum mismatch); recomputing that chunk", path)
            return False
        self._verified.add(path.name)
        return True

    def completed(self) -> list[tuple[int, int]]:
        """Chunks of the grid whose files are whole and match their manifest checksums."""
        return [c for c in self.grid if self._is_intact(self._path(*c))]

    def pending(self) -> list[tuple[int, int]]:
        """Chunks of the grid still to run (never run, or damaged)."""
        done = set(self.completed())
        return [c for c in self.grid if c not in done]

    def write(self, start: int, stop: int, results: Mapping[str, Any], *, name: str = "chunk",
              check_rows: bool = True) -> None:
        """Durably store one chunk's results (a possibly nested dict of ``[stop - start, ...]`` arrays).

        The file is renamed into place whole, then its checksum enters the manifest; only then
        does the chunk count as done. ``name`` other than "chunk" stores a side file of the chunk
        (e.g. the draws of a few of its problems, ``check_rows=False``); write side files first:
        the "chunk" file marks the chunk done.

        Raises
        ------
        StorageError
            The file or the manifest could not be written (e.g. no space left on device).
        """
        flat = _flatten(results)
        if check_rows:
            for key, arr in flat.items():
                if arr.shape[:1] != (stop - start,):
                    raise ValueError(f"chunk {start}:{stop}: result {key!r} has shape {arr.shape}")
        buffer = io.BytesIO()
        np.savez(buffer, **flat)
        payload = buffer.getvalue()
        path = self._path(start, stop, name)
        self.manifest["checksums"].pop(path.name, None)
        self._verified.discard(path.name)
        atomic_write_bytes(path, payload)
        self.manifest["checksums"][path.name] = sha256_bytes(payload)
        self._save_manifest()
        self._verified.add(path.name)

    def read(self, start: int, stop: int, *, name: str = "chunk") -> dict[str, Any]:
        """One stored file's results; :class:`InputError` when missing or damaged."""
        return _unflatten(self._load(self._path(start, stop, name)))

    def _load(self, path: Path) -> dict[str, np.ndarray]:
        if not path.exists():
            raise InputError(f"{self.directory}: {path.name} has no results")
        payload = path.read_bytes()
        if sha256_bytes(payload) != self.manifest["checksums"].get(path.name):
            raise InputError(f"{path}: truncated or corrupted (checksum mismatch); rerun to recompute it")
        with np.load(io.BytesIO(payload)) as f:
            return {k: f[k] for k in f.files}

    def gather(self, chunks: Iterable[tuple[int, int]] | None = None) -> dict[str, Any]:
        """Concatenate the results of ``chunks`` (default: the whole grid) in grid order."""
        chunks = self.grid if chunks is None else sorted(chunks)
        missing = [c for c in chunks if not self._is_intact(self._path(*c))]
        if missing:
            raise InputError(f"{self.directory}: chunk {missing[0][0]}:{missing[0][1]} has no results")
        parts = [self._load(self._path(*c)) for c in chunks]
        if not parts:
            return {}
        return _unflatten({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def merge_shard_stores(shards: Mapping[str, tuple[Path, Any]], store_dir: Path, *, num_shards: int) -> None:
    """Join the stores of a sharded run into ``store_dir``.

    ``shards`` maps a job's name to ``(its store directory, its data.shard)``. Every store must
    hold the same configuration (manifest hash) and together every chunk of the grid; the
    first store's manifest and every chunk file are copied. Raises :class:`InputError` naming the
    job that did not start, ran another configuration, or (by ``chunk % num_shards``) the shard
    that did not finish; the shards' stores are never modified.
    """
    hashes, grid, owner, checksums = {}, None, {}, {}
    for job, (store, shard) in shards.items():
        manifest = Path(store) / MANIFEST
        if not manifest.exists():
            raise InputError(f"shard {job} (data.shard={shard}): no store; it did not start")
        info = json.loads(manifest.read_text())
        hashes[job] = info["config_hash"]
        grid = grid or [tuple(c) for c in info["grid"]]
        stored = info.get("checksums", {})
        for c in (Path(store) / CHUNK_DIR).glob("*.npz"):
            if c.name not in owner and c.name in stored:  # unconfirmed files are not results
                owner[c.name], checksums[c.name] = c, stored[c.name]
    if len(set(hashes.values())) > 1:
        first = next(iter(hashes))
        other = next(n for n, h in hashes.items() if h != hashes[first])
        raise InputError(f"shard {other} ran another configuration than shard {first}; they cannot be merged")
    for index, (start, stop) in enumerate(grid):
        name = chunk_file_name(start, stop)
        if name not in owner:
            raise InputError(
                f"chunk {start}:{stop} is missing: shard data.shard={index % num_shards} did not "
                "finish; rerun that job (its finished chunks are kept) and merge again"
            )
    store_dir = Path(store_dir)
    (store_dir / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
    first_store = next(iter(shards.values()))[0]
    manifest = json.loads((Path(first_store) / MANIFEST).read_text())
    manifest["checksums"] = checksums  # each shard's chunk files are verified again on reading
    atomic_write_bytes(store_dir / MANIFEST, json.dumps(manifest, indent=2).encode())
    for name, path in owner.items():
        shutil.copyfile(path, store_dir / CHUNK_DIR / name)
