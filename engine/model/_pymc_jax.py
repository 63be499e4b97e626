"""Lazy, side-effect-free access to PyMC's JAX bridge.

``pymc.sampling.jax`` rewrites ``XLA_FLAGS`` on import (it forces 100 host devices). That
changes how many CPU devices JAX sees if the backend is not yet initialised, which would
silently alter sharding. We import it once, on first use, and restore the variable.
"""

from __future__ import annotations

import os
from functools import cache


@cache
def pymc_jax():
    """Return the ``pymc.sampling.jax`` module, imported with ``XLA_FLAGS`` preserved."""
    saved = os.environ.get("XLA_FLAGS")
    try:
        import pymc.sampling.jax as module
    finally:
        if saved is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = saved
    return module


def get_jaxified_graph(inputs, outputs):
    """PyTensor graph -> JAX callable (``pymc.sampling.jax.get_jaxified_graph``), with small
    triangular solves written out instead of LAPACK calls (``engine.model.linalg``)."""
    from engine.model.linalg import register_pytensor

    register_pytensor()
    return pymc_jax().get_jaxified_graph(inputs=inputs, outputs=outputs)
