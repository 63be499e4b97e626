"""Shared test set-up: CPU JAX, strict rank promotion, quiet third-party warnings."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
