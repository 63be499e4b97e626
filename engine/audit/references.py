"""Closed-form posteriors of the conjugate belief models: the exact oracle and a fast path.

Both are textbook conjugate updates (e.g. Gelman et al., *Bayesian Data Analysis*, 3rd ed.,
sections 2.5 and 3.5): with a Normal prior and Normal observations of known scale the posterior
is Normal, its precision the prior precision plus ``n`` observation precisions.

All functions are vectorised over any leading axes (problems, or checkpoints and tokens) and
take the padded observations plus each problem's count of valid ones (valid rows first, as
:class:`engine.audit.beliefs.BeliefSet` stores them).
"""

from __future__ import annotations

import numpy as np

__all__ = ["normal_normal", "mvnormal_known_cov"]


def _valid(n_pad: int, num_obs) -> np.ndarray:
    return np.arange(n_pad) < np.asarray(num_obs)[..., None]


def normal_normal(prior_mu, prior_sigma, obs_sigma, observed, num_obs=None):
    """Posterior of ``theta ~ N(prior_mu, prior_sigma)``, ``y_i ~ N(theta, obs_sigma)``.

    Parameters
    ----------
    prior_mu, prior_sigma, obs_sigma
        ``[...]`` prior mean and standard deviation, observation standard deviation.
    observed
        ``[..., n]`` observations; only the first ``num_obs`` of each problem count.
    num_obs
        ``[...]`` valid observations per problem (default: all ``n``).

    Returns
    -------
    (mean, std)
        ``[...]`` each: posterior precision ``1/prior_sigma**2 + num_obs/obs_sigma**2``.
    """
    observed = np.asarray(observed, dtype=float)
    n_pad = observed.shape[-1]
    if num_obs is None:
        num_obs = np.full(observed.shape[:-1], n_pad)
    valid = _valid(n_pad, num_obs)
    total = np.where(valid, observed, 0.0).sum(-1)
    prior_prec = 1.0 / np.square(prior_sigma)
    obs_prec = 1.0 / np.square(obs_sigma)
    post_prec = prior_prec + np.asarray(num_obs) * obs_prec
    mean = (prior_prec * np.asarray(prior_mu) + obs_prec * total) / post_prec
    return mean, 1.0 / np.sqrt(post_prec)


def mvnormal_known_cov(prior_mu, prior_cov, obs_cov, observed, num_obs=None):
    """Posterior of ``theta ~ MvN(prior_mu, prior_cov)``, ``y_i ~ MvN(theta, obs_cov)``.

    Parameters
    ----------
    prior_mu
        ``[..., K]``.
    prior_cov, obs_cov
        ``[..., K, K]`` symmetric positive definite.
    observed
        ``[..., n, K]``; only the first ``num_obs`` rows of each problem count.
    num_obs
        ``[...]`` valid rows per problem (default all ``n``).

    Returns
    -------
    (mean, cov)
        ``[..., K]`` and ``[..., K, K]``: precision ``prior_cov^-1 + num_obs obs_cov^-1``,
        mean ``cov (prior_cov^-1 prior_mu + obs_cov^-1 sum_i y_i)``.
    """
    observed = np.asarray(observed, dtype=float)
    n_pad = observed.shape[-2]
    if num_obs is None:
        num_obs = np.full(observed.shape[:-2], n_pad)
    valid = _valid(n_pad, num_obs)
    total = np.where(valid[..., None], observed, 0.0).sum(-2)
    prior_prec = np.linalg.inv(prior_cov)
    obs_prec = np.linalg.inv(obs_cov)
    post_prec = prior_prec + np.asarray(num_obs, dtype=float)[..., None, None] * obs_prec
    post_cov = np.linalg.inv(post_prec)
    post_cov = 0.5 * (post_cov + np.swapaxes(post_cov, -1, -2))
    rhs = (prior_prec @ np.asarray(prior_mu)[..., None])[..., 0] + (obs_prec @ total[..., None])[..., 0]
    mean = (post_cov @ rhs[..., None])[..., 0]
    return mean, post_cov
