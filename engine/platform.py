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
   see ``engine.model._pymc_jax``). Templates calling other batched LAPACK routines on CPU can still
   hit it on few cores; ``NPROC`` at twice the cores avoids it at 28-56% throughput.
3. ``pymc.sampling.jax`` rewrites ``XLA_FLAGS`` on import (100 host devices);
   ``engine.model._pymc_jax`` imports it lazily and restores the variable.
4. Several CPU devices need ``--xla_force_host_platform_device_count`` before JAX starts
   (:func:`configure`, which the CLI calls from ``runtime.devices``).
"""

from __future__ import annotations

import os
import sys

__all__ = ["CPU_XLA_FLAGS", "apply_workarounds", "configure", "add_xla_flags", "backend_started"]

CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)
"""XLA:CPU flags every run gets (workaround 1)."""

HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"


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


def apply_workarounds() -> bool:
    """Set :data:`CPU_XLA_FLAGS` unless JAX has started; returns whether they could be set."""
    if backend_started():
        return False
    add_xla_flags(*CPU_XLA_FLAGS)
    return True


def configure(platform: str | None = "cpu", devices: int | None = 1) -> None:
    """The CLI's ``runtime.platform`` and ``runtime.devices`` before JAX starts: one host
    device per requested device on CPU (-1: one per core), and ``JAX_PLATFORMS``."""
    started = "jax" in sys.modules
    if platform == "cpu" and devices not in (None, 1) and not started:
        count = (os.cpu_count() or 1) if int(devices) == -1 else int(devices)
        add_xla_flags(f"{HOST_DEVICE_FLAG}={count}")
    if platform:
        value = "cuda,cpu" if platform == "gpu" else platform
        if started:
            os.environ["JAX_PLATFORMS"] = value
        else:
            os.environ.setdefault("JAX_PLATFORMS", value)
