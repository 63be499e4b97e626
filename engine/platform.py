"""Every XLA / LAPACK workaround of the engine, in one place, applied before JAX starts.

``import engine`` calls :func:`apply_workarounds`, so Python API users, the CLI, tests and
benchmarks all run with the same flags without exporting anything by hand. Flags only take
effect if set before JAX initialises its backend; once it has, they are left alone (and
:func:`backend_started` says so).

The workarounds, each for jaxlib 0.10.2 on CPU:

1. ``CPU_XLA_FLAGS``: the concurrency-optimised XLA:CPU scheduler intermittently never finishes
   a chunk program on few cores (all pool threads idle, or blocked in batched LAPACK solves);
   without it the same programs finish, and no slower. Set unless the user's ``XLA_FLAGS``
   already names the flag.
2. Batched LAPACK on CPU (``lapack_dtrsm_ffi``, ``potrf``) splits its batch over XLA's intra-op
   pool and blocks its own thread; with every pool thread doing so the multivariate audit never
   finished. ``engine.model.linalg`` writes small triangular solves and Cholesky factors in plain XLA
   ops instead (also for PyTensor's ``SolveTriangular``/``Cholesky`` when a template compiles,
   see ``engine.model._pymc_jax``, for BlackJAX's dense Euclidean metric and for the engine's
   dense kernels). Templates calling other batched LAPACK routines on CPU can still
   hit it on few cores; ``NPROC`` at twice the cores avoids it at 28-56% throughput.
3. ``pymc.sampling.jax`` rewrites ``XLA_FLAGS`` on import (100 host devices);
   ``engine.model._pymc_jax`` imports it lazily and restores the variable.
4. Several CPU devices need ``--xla_force_host_platform_device_count`` before JAX starts.
   :func:`apply_workarounds` makes one host device per usable core (``runtime.devices=-1``, the
   default, shards every chunk over them); a user's own ``XLA_FLAGS`` naming the flag wins, and
   :func:`configure` (the CLI, from ``runtime.devices``) sets another count where asked.
5. Compiling a chunk program (NUTS warmup and draws) takes ~10 CPU-s, more than sampling a small
   audit: JAX's persistent compilation cache is on by default (:func:`compile_cache_dir`), so a
   second run of the same template and settings loads its programs instead of compiling them.
   ``ENGINE_COMPILE_CACHE=0`` turns it off, ``ENGINE_COMPILE_CACHE=/path`` moves it, and a
   user's own ``JAX_COMPILATION_CACHE_DIR`` wins. The cache key is XLA's (program, compile
   options, devices, jax version), so a changed program never loads a stale executable.
6. XLA:CPU's intra-op (Eigen) thread pool deadlocks when an op splits its work over that same
   pool and blocks its pool thread until the pieces finish, and every pool thread does so at
   once: batched LAPACK (workaround 2) and, as reported upstream for ducc FFTs, the diagnostics'
   autocovariances. Two host devices running programs at once (stopping chunks side by side)
   make that likely on 2 cores: w2 with ``dense_mass`` and per-problem stopping hung in 2 of 3
   runs, both pool threads in ``TriMatrixEquationSolver``'s ``BlockingCounter::Wait``.
   BlackJAX's dense metric and the engine's dense kernels now factor the mass matrix with
   ``engine.model.linalg`` (no LAPACK call); ``--xla_cpu_multi_thread_eigen=false`` keeps
   XLA's own ops (the FFTs among them) on the calling thread, with no loss measured (w1, N=2000:
   4.54 s against 4.57 s; the demo audit 3.1 s against 3.3 s): the engine's parallelism is one
   host device per core, so the intra-op pool has no cores to spare. The LAPACK FFI calls still
   use the pool whatever this flag, hence workaround 2. Set unless the user's ``XLA_FLAGS``
   already names the flag.
"""

from __future__ import annotations

import os
import sys

__all__ = ["CPU_XLA_FLAGS", "COMPILE_CACHE_ENV", "compile_cache_dir", "apply_workarounds", "configure", "add_xla_flags", "backend_started", "num_cores"]

CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false", "--xla_cpu_multi_thread_eigen=false")
"""XLA:CPU flags every run gets (workarounds 1 and 6)."""

HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"

_DEFAULT_HOST_DEVICES = ""
"""The host device flag :func:`apply_workarounds` added (empty when the user's ``XLA_FLAGS`` set it)."""


COMPILE_CACHE_ENV = "ENGINE_COMPILE_CACHE"
"""Environment variable: ``0``/``off`` disables the persistent compilation cache, a path moves it."""


COMPILE_CACHE_MIN_SECONDS = 0.1
"""Programs that compiled in at least this long are written to the persistent cache (JAX's
default, 1 s, leaves out the stopping gate's programs, which compile in about a second on a
small CPU and are many); ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` overrides it."""

CACHE_MIN_SECONDS_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def compile_cache_dir() -> str | None:
    """Where compiled programs persist (workaround 5): ``ENGINE_COMPILE_CACHE`` if it names a
    path, else ``$XDG_CACHE_HOME/engine/jax`` (``~/.cache/engine/jax``); ``None`` when turned off."""
    value = os.environ.get(COMPILE_CACHE_ENV, "").strip()
    if value.lower() in ("0", "off", "false", "no"):
        return None
    if value and value.lower() not in ("1", "on", "true", "yes"):
        return os.path.expanduser(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "engine", "jax")


def _enable_compile_cache() -> None:
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # the user's own setting
        return
    path = compile_cache_dir()
    if path is None:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:  # a read-only home: run without the cache
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    min_seconds = os.environ.setdefault(CACHE_MIN_SECONDS_ENV, str(COMPILE_CACHE_MIN_SECONDS))
    if "jax" in sys.modules:  # imported already (JAX reads the variables when it loads its config)
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_seconds))


def backend_started() -> bool:
    """Whether JAX has initialised a backend (after which ``XLA_FLAGS`` no longer matter)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def add_xla_flags(*flags: str) -> None:
    """Append ``flags`` to ``XLA_FLAGS``, skipping any whose name is already there."""
    current = os.environ.get("XLA_FLAGS", "")
    for flag in flags:
        if flag.split("=")[0] not in current:
            current = f"{current} {flag}".strip()
    os.environ["XLA_FLAGS"] = current


def num_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def apply_workarounds() -> bool:
    """Set :data:`CPU_XLA_FLAGS` and one host device per core unless JAX has started (or the
    user's ``XLA_FLAGS`` already names the flag); returns whether they could be set."""
    global _DEFAULT_HOST_DEVICES
    _enable_compile_cache()
    if backend_started():
        return False
    if HOST_DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
        _DEFAULT_HOST_DEVICES = f"{HOST_DEVICE_FLAG}={num_cores()}"
    add_xla_flags(*CPU_XLA_FLAGS, f"{HOST_DEVICE_FLAG}={num_cores()}")
    return True


def configure(platform: str | None = "cpu", devices: int | None = 1) -> None:
    """The CLI's ``runtime.platform`` and ``runtime.devices`` before JAX starts: one host
    device per requested device on CPU (-1: one per core), and ``JAX_PLATFORMS``."""
    started = "jax" in sys.modules
    if platform == "cpu" and devices not in (None, 1, -1) and not started:
        current = os.environ.get("XLA_FLAGS", "")
        if _DEFAULT_HOST_DEVICES and _DEFAULT_HOST_DEVICES in current:  # the engine's default, not the user's
            os.environ["XLA_FLAGS"] = current.replace(_DEFAULT_HOST_DEVICES, "").strip()
        add_xla_flags(f"{HOST_DEVICE_FLAG}={int(devices)}")
    if platform:
        value = "cuda,cpu" if platform == "gpu" else platform
        if started:
            os.environ["JAX_PLATFORMS"] = value
        else:
            os.environ.setdefault("JAX_PLATFORMS", value)
