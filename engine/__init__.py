"""JAX batch validation engine: MCMC ground truth for many small posteriors of one PyMC template.

Public API: :func:`sample_batched` (contract 2 of the design), :func:`audit_vfe` and :func:`sbc`.
Importing ``engine`` imports no JAX. It applies the XLA workarounds of :mod:`engine.platform`
(before JAX starts, so nobody sets flags by hand) and registers the settings schema with Hydra's
ConfigStore.
"""

from __future__ import annotations

from engine.platform import apply_workarounds as _apply_workarounds
from engine.settings import register_configs as _register_configs

__version__ = "0.1.0"
__all__ = ["sample_batched", "audit_vfe", "sbc", "__version__"]

_apply_workarounds()
_register_configs()


def __getattr__(name):
    if name == "sample_batched":
        from engine.sampling.api import sample_batched

        return sample_batched
    if name == "audit_vfe":
        from engine.audit.vfe import audit_vfe

        return audit_vfe
    if name == "sbc":
        from engine.calibration.sbc import sbc

        return sbc
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
