"""Shared test set-up: CPU JAX, strict rank promotion, quiet third-party warnings."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# jaxlib 0.10.2's concurrency-optimised XLA:CPU scheduler intermittently never finishes a chunk
# program (see engine.run.CPU_XLA_FLAGS); every test process runs without it
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")


@pytest.fixture(autouse=True)
def _x64_default():
    """Every test starts from JAX's x64 mode on (PyTensor's JAX backend sets it on import)."""
    jax.config.update("jax_enable_x64", True)
    yield
