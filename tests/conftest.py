"""Shared test set-up: CPU JAX, strict rank promotion, quiet third-party warnings, quicker XLA
compiles.

The tests are compile-bound (hundreds of small programs, each run briefly), so they compile at
XLA:CPU backend optimisation level ``ENGINE_TEST_XLA_OPT_LEVEL`` (default 1: chunk programs
compile in about 60% of the time and run about 1.4x slower; the programs' meaning is the same).
``ENGINE_TEST_XLA_OPT_LEVEL=`` (empty) tests XLA's default level, what users run. Subprocesses
inherit it through ``XLA_FLAGS``; JAX's persistent cache keys on the flags, so the levels never
share compiled programs."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
TEST_XLA_OPT_ENV = "ENGINE_TEST_XLA_OPT_LEVEL"
_level = os.environ.get(TEST_XLA_OPT_ENV, "1").strip()
if _level and "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level={_level}".strip()

import engine  # noqa: E402,F401  (applies engine.platform's XLA workarounds before JAX starts)
import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")


@pytest.fixture(autouse=True)
def _x64_default():
    """Every test starts from JAX's x64 mode on (PyTensor's JAX backend sets it on import)."""
    jax.config.update("jax_enable_x64", True)
    yield


COMPILE_LOG_ENV = "ENGINE_TEST_COMPILE_LOG"
"""Set to a file path to append one line per XLA compile (or persistent-cache load): the test,
the program, the seconds, and whether the persistent cache served it. To see where suite time
goes: ``ENGINE_TEST_COMPILE_LOG=/tmp/compiles.tsv pytest ...``."""

if os.environ.get(COMPILE_LOG_ENV):
    from jax import monitoring

    _cache_hits = [0]

    def _on_event(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            _cache_hits[0] += 1

    def _on_duration(event, duration, **kwargs):
        if event != "/jax/core/compile/backend_compile_duration":
            return
        hit, _cache_hits[0] = _cache_hits[0], 0
        test = os.environ.get("PYTEST_CURRENT_TEST", "-").rsplit(" ", 1)[0]
        with open(os.environ[COMPILE_LOG_ENV], "a") as log:
            log.write(f"{test}\t{kwargs.get('fun_name', '?')}\t{duration:.3f}\t{'hit' if hit else 'compile'}\n")

    monitoring.register_event_listener(_on_event)
    monitoring.register_event_duration_secs_listener(_on_duration)


def two_host_devices() -> str:
    """This process's ``XLA_FLAGS`` (the tests' optimisation level, the engine's workarounds) with
    two forced CPU host devices, for a subprocess."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + ["--xla_force_host_platform_device_count=2"])
