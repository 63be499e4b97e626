"""Jitted programs compiled ahead of time, several at once.

A driver that runs several programs in turn (the stopping driver: warmup, then blocks, then a
finish) would compile each on first call, one after the other on one core, while XLA's
compiler releases the GIL. :class:`AheadProgram` wraps one jitted program: :meth:`~AheadProgram.ahead`
traces and lowers it for given arguments (concrete arrays or ``jax.ShapeDtypeStruct``) in the
calling thread, under the caller's precision (x64 mode is thread-local), and hands the XLA
compile to a shared thread pool (:data:`COMPILE_THREADS`); it returns the
output shapes, so the next program can be lowered from them before the first has run. A call
whose arguments match a compiled signature runs that executable (waiting for its compile); any
other call is the plain jitted call, so results never depend on what was compiled ahead.

The executable is what the jitted call would compile for the same arguments (same trace, same
lowering, same shardings and donation), so results are bitwise identical; it is also reused the
same way, since the wrapper is cached where the jitted program was.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np

__all__ = ["AheadProgram", "placement_of", "abstract", "device_ids"]

COMPILE_THREADS: int | None = None
"""Threads compiling ahead (``None``: :data:`THREADS_ENV` if set, else one less than
:func:`engine.platform.num_cores`, at least one: the calling thread traces the next program and runs the warmup meanwhile; on 2 cores one
compile thread measured faster than two)."""

THREADS_ENV = "ENGINE_COMPILE_THREADS"
"""Environment variable: the number of compile threads (read when the pool starts)."""

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from engine.platform import num_cores

            threads = COMPILE_THREADS
            if threads is None:
                env = os.environ.get(THREADS_ENV, "").strip()
                threads = int(env) if env.isdigit() else num_cores() - 1
            _POOL = ThreadPoolExecutor(max(1, int(threads)), thread_name_prefix="engine-compile")
        return _POOL


def device_ids(sharding) -> tuple | None:
    """The sorted ids of the devices ``sharding`` places on (``None`` for no sharding)."""
    return None if sharding is None else tuple(sorted(d.id for d in sharding.device_set))


def _leaf_signature(x) -> tuple:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x.shape, np.dtype(x.dtype), bool(x.weak_type), device_ids(x.sharding)
    committed = isinstance(x, jax.Array) and x.committed
    aval = jax.typeof(x)
    return aval.shape, np.dtype(aval.dtype), bool(aval.weak_type), device_ids(x.sharding) if committed else None


def signature(args) -> tuple:
    """What decides the executable a jitted call compiles: the arguments' tree, each leaf's
    shape, dtype, weak type and (when committed) devices, and x64 mode."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple(_leaf_signature(x) for x in leaves), bool(jax.config.jax_enable_x64)


def placement_of(tree):
    """The sharding of the first committed array in ``tree`` (what a jitted call's outputs are
    committed to), or ``None`` when none is committed."""
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array) and x.committed:
            return x.sharding
    return None


def abstract(tree, sharding=None):
    """``tree``'s leaves (arrays or ``ShapeDtypeStruct``) as ``ShapeDtypeStruct`` placed by
    ``sharding`` (``None``: uncommitted)."""
    def one(x):
        aval = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type, sharding=sharding)

    return jax.tree.map(one, tree)


class AheadProgram:
    """A jitted program plus executables compiled ahead of time (see the module docstring)."""

    def __init__(self, jitted):
        self.jitted = jitted
        self._entries: dict[tuple, tuple[Future, object]] = {}
        self._lock = threading.Lock()

    def ahead(self, *args):
        """Start compiling for ``args`` (arrays or ``ShapeDtypeStruct``) unless done already;
        returns the outputs' ``ShapeDtypeStruct`` tree (placement not included)."""
        key = signature(args)
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None:
            return entry[1]
        traced = self.jitted.trace(*args)
        lowered = traced.lower()
        future = _pool().submit(lowered.compile)
        with self._lock:
            entry = self._entries.setdefault(key, (future, traced.out_info))
        return entry[1]

    def compiled_for(self, *args) -> bool:
        """Whether an executable for ``args`` was compiled (or is compiling) ahead."""
        with self._lock:
            return signature(args) in self._entries

    def wait(self, *args) -> None:
        """Block until the executable compiling ahead for ``args`` is ready (if there is one)."""
        with self._lock:
            entry = self._entries.get(signature(args))
        if entry is not None:
            entry[0].result()

    def __call__(self, *args):
        with self._lock:
            entry = self._entries.get(signature(args))
        if entry is None:
            return self.jitted(*args)
        return entry[0].result()(*args)
