"""``analysis=vfe_univariate``: audit 1-D Gaussian beliefs N(mu_q, sigma_q) over tokens x checkpoints.

The generative model is ``cfg.model`` (default Normal-Normal, closed form; ``student_t`` and
``bernoulli_logit`` have none). See :func:`engine.audit.vfe.audit_vfe` and
:mod:`engine.analyses.vfe_audit` (the config plumbing the VFE analyses share).
"""

from __future__ import annotations

from pathlib import Path


def run(cfg, run_dir: Path):
    from engine.analyses.vfe_audit import run_from_config

    return run_from_config(cfg, run_dir, "univariate")
