"""JAX batch validation engine: MCMC ground truth for many small posteriors of one PyMC template.

Public API: :func:`sample_batched` (contract 2 of the design), :func:`audit_vfe` and :func:`sbc`.
Imports are lazy so that ``import engine`` stays cheap and has no side effects.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["sample_batched", "audit_vfe", "sbc", "__version__"]


def __getattr__(name):
    if name == "sample_batched":
        from engine.api import sample_batched

        return sample_batched
    if name == "audit_vfe":
        from engine.audit import audit_vfe

        return audit_vfe
    if name == "sbc":
        from engine.sbc_core import sbc

        return sbc
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
