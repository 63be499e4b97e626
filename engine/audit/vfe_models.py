"""PyMC templates of the generative models a belief approximates (one token's posterior).

A template's latent is ``theta`` and its per-token inputs are ``pm.Data`` containers named
after beliefs fields: ``observed`` (the observations, the observed value of the likelihood, so
the engine masks padded rows of ragged tokens), and any of ``prior_mu``, ``prior_sigma``,
``obs_sigma`` (univariate) or ``prior_mu``, ``prior_chol``, ``obs_chol`` (multivariate, Cholesky
factors of ``prior_cov``/``obs_cov``). The containers' initial values only fix dtypes; one
compiled program serves every token.

Custom models (``conf/model/*.yaml``) point ``_target_`` at a builder like these; only
``normal_normal`` and ``mvnormal`` have a closed form (``references.py``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["normal_normal", "student_t", "bernoulli_logit", "mvnormal", "UNIVARIATE_INPUTS"]

UNIVARIATE_INPUTS = ("observed", "prior_mu", "prior_sigma", "obs_sigma")
MULTIVARIATE_INPUTS = ("observed", "prior_mu", "prior_chol", "obs_chol")


def _univariate_inputs():
    import pymc as pm

    return (
        pm.Data("observed", np.zeros(2)),
        pm.Data("prior_mu", 0.0),
        pm.Data("prior_sigma", 1.0),
        pm.Data("obs_sigma", 1.0),
    )


def normal_normal():
    """``theta ~ N(prior_mu, prior_sigma)``, ``observed_i ~ N(theta, obs_sigma)`` (closed form)."""
    import pymc as pm

    with pm.Model() as model:
        observed, prior_mu, prior_sigma, obs_sigma = _univariate_inputs()
        theta = pm.Normal("theta", prior_mu, prior_sigma)
        pm.Normal("y", theta, obs_sigma, observed=observed)
    return model


def student_t(nu: float = 4.0):
    """Heavy-tailed observations: ``observed_i ~ StudentT(nu, theta, obs_sigma)``; no closed form."""
    import pymc as pm

    with pm.Model() as model:
        observed, prior_mu, prior_sigma, obs_sigma = _univariate_inputs()
        theta = pm.Normal("theta", prior_mu, prior_sigma)
        pm.StudentT("y", nu=float(nu), mu=theta, sigma=obs_sigma, observed=observed)
    return model


def bernoulli_logit():
    """Binary observations (0/1): ``observed_i ~ Bernoulli(sigmoid(theta))``; no closed form."""
    import pymc as pm

    with pm.Model() as model:
        observed = pm.Data("observed", np.zeros(2))
        prior_mu = pm.Data("prior_mu", 0.0)
        prior_sigma = pm.Data("prior_sigma", 1.0)
        theta = pm.Normal("theta", prior_mu, prior_sigma)
        pm.Bernoulli("y", logit_p=theta, observed=observed)
    return model


def mvnormal(dim: int):
    """``theta ~ MvN(prior_mu, prior_cov)``, ``observed_i ~ MvN(theta, obs_cov)``, K = ``dim``.

    Covariances enter as Cholesky factors (``prior_chol``, ``obs_chol``), computed once on the
    host, so no leapfrog step factorises a matrix.
    """
    import pymc as pm

    K = int(dim)
    with pm.Model() as model:
        observed = pm.Data("observed", np.zeros((2, K)))
        prior_mu = pm.Data("prior_mu", np.zeros(K))
        prior_chol = pm.Data("prior_chol", np.eye(K))
        obs_chol = pm.Data("obs_chol", np.eye(K))
        theta = pm.MvNormal("theta", prior_mu, chol=prior_chol, shape=K)
        pm.MvNormal("y", theta, chol=obs_chol, observed=observed)
    return model
