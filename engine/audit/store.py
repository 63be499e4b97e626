"""Durable, resumable per-chunk results.

A long audit writes each finished chunk's summaries as its own file: written to a temporary file
in the same folder, flushed and ``fsync``-ed, then atomically renamed, and the folder is
``fsync``-ed. A run killed at any moment therefore leaves only whole chunk files (at most the
chunk in flight is lost), and rerunning the same command skips them. ``manifest.json`` records
the chunk grid, a hash of everything that determines the results, and the library versions; a
different configuration in the same directory is refused unless the user asks to overwrite.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from engine.errors import InputError

__all__ = ["ChunkStore", "fingerprint", "atomic_write_bytes", "versions", "merge_shard_stores"]

MANIFEST = "manifest.json"
CHUNK_DIR = "chunks"


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically: temp file, fsync, rename, fsync folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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


class ChunkStore:
    """Per-chunk result files of one run directory.

    Parameters
    ----------
    directory
        Where ``manifest.json`` and ``chunks/`` live (the Hydra run directory, usually).
    settings
        Everything that determines the results (data identity, model, sampler, seed, chunk grid);
        hashed into the manifest.
    grid
        The run's chunk boundaries ``[(start, stop), ...]`` (``engine.sampling.batch.chunk_grid``).
    overwrite
        Discard results of a different configuration instead of refusing.
    """

    def __init__(self, directory: Path, settings: Mapping[str, Any], grid: Iterable[tuple[int, int]], *, overwrite: bool = False):
        self.directory = Path(directory)
        self.grid = [(int(a), int(b)) for a, b in grid]
        self.hash = fingerprint({"settings": settings, "grid": self.grid})
        self.chunk_dir = self.directory / CHUNK_DIR
        manifest_path = self.directory / MANIFEST
        if manifest_path.exists():
            try:
                old = json.loads(manifest_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise InputError(f"{manifest_path}: unreadable manifest ({err})") from err
            if old.get("config_hash") != self.hash:
                if not overwrite:
                    raise InputError(
                        f"{self.directory} holds results of a different configuration (hash "
                        f"{old.get('config_hash')} vs {self.hash}); use another run directory or "
                        "set runtime.overwrite=true to discard them"
                    )
                shutil.rmtree(self.chunk_dir, ignore_errors=True)
                manifest_path.unlink()
        if not manifest_path.exists():
            manifest = {
                "config_hash": self.hash,
                "grid": self.grid,
                "num_problems": self.grid[-1][1] if self.grid else 0,
                "versions": versions(),
                "settings": json.loads(json.dumps(settings, default=str)),
            }
            atomic_write_bytes(manifest_path, json.dumps(manifest, indent=2).encode())
        self.chunk_dir.mkdir(parents=True, exist_ok=True)

    def _path(self, start: int, stop: int, name: str = "chunk") -> Path:
        return self.chunk_dir / chunk_file_name(start, stop, name)

    def completed(self) -> list[tuple[int, int]]:
        """Chunks of the grid whose files are complete (atomic rename guarantees whole files)."""
        return [c for c in self.grid if self._path(*c).exists()]

    def pending(self) -> list[tuple[int, int]]:
        """Chunks of the grid still to run."""
        done = set(self.completed())
        return [c for c in self.grid if c not in done]

    def write(self, start: int, stop: int, results: Mapping[str, Any], *, name: str = "chunk",
              check_rows: bool = True) -> None:
        """Durably store one chunk's results (a possibly nested dict of ``[stop - start, ...]`` arrays).

        ``name`` other than "chunk" stores a side file of the chunk (e.g. the draws of a few of
        its problems, ``check_rows=False``); write side files first: the "chunk" file marks the
        chunk done.
        """
        flat = _flatten(results)
        if check_rows:
            for key, arr in flat.items():
                if arr.shape[:1] != (stop - start,):
                    raise ValueError(f"chunk {start}:{stop}: result {key!r} has shape {arr.shape}")
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **flat)
        atomic_write_bytes(self._path(start, stop, name), buffer.getvalue())

    def read(self, start: int, stop: int, *, name: str = "chunk") -> dict[str, Any]:
        path = self._path(start, stop, name)
        if not path.exists():
            raise InputError(f"{self.directory}: chunk {start}:{stop} has no {name} file")
        with np.load(path) as f:
            return _unflatten({k: f[k] for k in f.files})

    def gather(self, chunks: Iterable[tuple[int, int]] | None = None) -> dict[str, Any]:
        """Concatenate the results of ``chunks`` (default: the whole grid) in grid order."""
        chunks = self.grid if chunks is None else sorted(chunks)
        missing = [c for c in chunks if not self._path(*c).exists()]
        if missing:
            raise InputError(f"{self.directory}: chunk {missing[0][0]}:{missing[0][1]} has no results")
        parts = []
        for c in chunks:
            with np.load(self._path(*c)) as f:
                parts.append({k: f[k] for k in f.files})
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
    hashes, grid, owner = {}, None, {}
    for job, (store, shard) in shards.items():
        manifest = Path(store) / MANIFEST
        if not manifest.exists():
            raise InputError(f"shard {job} (data.shard={shard}): no store; it did not start")
        info = json.loads(manifest.read_text())
        hashes[job] = info["config_hash"]
        grid = grid or [tuple(c) for c in info["grid"]]
        for c in (Path(store) / CHUNK_DIR).glob("*.npz"):
            owner.setdefault(c.name, c)
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
    atomic_write_bytes(store_dir / MANIFEST, (Path(first_store) / MANIFEST).read_bytes())
    for name, path in owner.items():
        shutil.copyfile(path, store_dir / CHUNK_DIR / name)
