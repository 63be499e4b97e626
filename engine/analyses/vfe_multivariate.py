"""``analysis=vfe_multivariate``: audit K-dimensional Gaussian beliefs N(mu_q, cov_q).

The generative model is the MvNormal with known covariances (closed form in
``engine.audit.references.mvnormal_known_cov``); ``cfg.model`` is not used. See
:func:`engine.audit.audit_vfe`.
"""

from __future__ import annotations

from pathlib import Path


def run(cfg, run_dir: Path):
    from engine.analyses.vfe_audit import run_from_config

    return run_from_config(cfg, run_dir, "multivariate")
