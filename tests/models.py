"""Small PyMC templates and closed-form posteriors shared by the core tests."""

from __future__ import annotations

import numpy as np
import pymc as pm


def normal_normal_model(num_obs: int = 20) -> pm.Model:
    """theta ~ N(prior_mu, prior_sigma); y_j ~ N(theta, obs_sigma), all per-problem data."""
    with pm.Model() as model:
        y = pm.Data("y", np.zeros(num_obs))
        prior_mu = pm.Data("prior_mu", 0.0)
        prior_sigma = pm.Data("prior_sigma", 1.0)
        obs_sigma = pm.Data("obs_sigma", 1.0)
        theta = pm.Normal("theta", prior_mu, prior_sigma)
        pm.Normal("obs", theta, obs_sigma, observed=y)
    return model


def normal_normal_data(num_problems: int, num_obs: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Random priors, noise scales and data for :func:`normal_normal_model`."""
    rng = np.random.default_rng(seed)
    prior_mu = rng.normal(0, 2, num_problems)
    prior_sigma = rng.uniform(0.3, 3.0, num_problems)
    obs_sigma = rng.uniform(0.5, 2.0, num_problems)
    theta = rng.normal(prior_mu, prior_sigma)
    y = theta[:, None] + obs_sigma[:, None] * rng.normal(size=(num_problems, num_obs))
    return {"y": y, "prior_mu": prior_mu, "prior_sigma": prior_sigma, "obs_sigma": obs_sigma}


def normal_normal_posterior(data: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form posterior mean and sd of theta, per problem."""
    y = np.asarray(data["y"])
    n = y.shape[-1]
    precision = 1 / data["prior_sigma"] ** 2 + n / data["obs_sigma"] ** 2
    mean = (data["prior_mu"] / data["prior_sigma"] ** 2 + y.sum(-1) / data["obs_sigma"] ** 2) / precision
    return mean, np.sqrt(1 / precision)


def hierarchical_model(num_groups: int = 3) -> pm.Model:
    """Centred tau ~ HalfNormal(1), theta_j ~ N(0, tau), y_j ~ N(theta_j, 1): a prior reading
    another free variable (hierarchical); NUTS at the default target diverges in its neck."""
    with pm.Model() as model:
        y = pm.Data("y", np.zeros(num_groups))
        tau = pm.HalfNormal("tau", 1.0)
        theta = pm.Normal("theta", 0.0, tau, shape=num_groups)
        pm.Normal("obs", theta, 1.0, observed=y)
    return model
